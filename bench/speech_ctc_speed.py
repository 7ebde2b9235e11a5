"""Where one CTC clip's time goes, and old vs new settings in the same process (issue 21, speed; development seeds only).

Runs ``--preset`` (default ``speech-ctc-tts-c2f``) on ``speech/ctc-mel/fedsgd`` (B=1, transcript granted) trial by
trial, the way ``eval.pipeline.run_trial`` does (prepare, attack, score), with stage timers (CPU time from
``time.process_time``, summed over threads, and wall time): setup (model, data, client update), the attacker's TTS
rendering (espeak-ng), the warp alignment's L-BFGS, the coarse and the frame-wise searches, the rest of the feature
stage, Griffin-Lim, and the scoring split into pocketsphinx, PESQ, STOI, speaker embeddings and the rest. With several
``--variant`` JSON overrides (``{}`` = the preset) every trial runs each variant in turn, interleaved, in the same
process (the key ``"_functorch_grad": true`` restores torch.func.grad where the attack now uses plain autograd,
for old-vs-new timings); each row also carries the feature cosine and the largest absolute difference of the recovered features from
the first variant's (0.0: bit-identical). With ``search_threads`` > 1 the stages overlap and process CPU time counts
every thread, so only the totals (``attack``, ``score``) are meaningful.

    OMP_NUM_THREADS=1 python bench/speech_ctc_speed.py --seed 0 --trials 0,1,2 --variant '{}' --variant '{"search_threads": 2}'

One JSON line per (trial, variant).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Timers:
    """CPU and wall seconds per stage name (nested stages are also counted in their parents)."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        c, w = time.process_time(), time.perf_counter()
        try:
            yield
        finally:
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w

    def wrap(self, owner, attr: str, name: str):
        """Time every call of owner.attr under ``name``; returns an undo callable."""
        orig = getattr(owner, attr)

        def timed(*a, **k):
            with self(name):
                return orig(*a, **k)

        setattr(owner, attr, timed)
        return lambda: setattr(owner, attr, orig)


def run(seed: int, trial: int, preset: str, overrides: dict, *, score: bool) -> tuple[dict, torch.Tensor]:
    import speechleak.attack as A
    import speechleak.ctc as C
    import speechleak.search as SR
    import speechleak.speaker as S
    from speechleak import metrics as M
    from speechleak.frontend import FrontEnd
    from common.seed import derive_seed, make_generator
    from eval.catalog import catalog
    from eval.pipeline import Resources, TrialSpec, make_kit, prepare, prepare_trial

    tm = Timers()
    label = overrides
    stage = {"name": "warp_lbfgs"}
    orig_opt, orig_coarse = A.optimise, A.coarse_residual

    def optimise(*a, **k):
        with tm(stage["name"]):
            return orig_opt(*a, **k)

    def coarse(*a, **k):
        stage["name"] = "coarse_lbfgs"
        try:
            return orig_coarse(*a, **k)
        finally:
            stage["name"] = "fine_lbfgs"

    undo = [tm.wrap(C, "tts_features", "tts_render"), tm.wrap(FrontEnd, "features_to_wave", "griffin_lim"),
            tm.wrap(S, "transcribe", "score_pocketsphinx"), tm.wrap(M, "pesq_wb", "score_pesq"),
            tm.wrap(M, "stoi", "score_stoi"), tm.wrap(S, "speaker_embedding", "score_speaker")]
    A.optimise, A.coarse_residual, SR.optimise = optimise, coarse, optimise
    overrides = dict(overrides)
    if overrides.pop("_functorch_grad", False):  # the step before session 19: torch.func.grad on every path
        orig_gg = A.graph_gradient
        A.graph_gradient = A.functional_gradient
        undo.append(lambda: setattr(A, "graph_gradient", orig_gg))
    try:
        case = catalog().cases.get("speech/ctc-mel/fedsgd").with_batch_size(1)
        with tm("setup"):
            p = prepare(TrialSpec(case, preset, seed=seed, trial=trial, overrides=overrides))
            kit = make_kit("speech")
            t = prepare_trial(p, kit, Resources(), device=torch.device("cpu"))
        a = t.attacker
        with tm("attack"):
            rec = p.attack.reconstruct(a.observation, a.model, a.prior,
                                       generator=make_generator(derive_seed(seed, trial, "attack")))
            stage["name"] = "after_search"
        metrics = {}
        if score:
            with tm("score"):
                metrics, _ = kit.score(rec, t.truth, case=p.case)
    finally:
        A.optimise, A.coarse_residual, SR.optimise = orig_opt, orig_coarse, orig_opt
        for u in undo:
            u()
    feats = rec.data["features"]
    cos = float(torch.nn.functional.cosine_similarity(feats.flatten().double(), t.truth["feats"].flatten().double(), dim=0))
    row = {"seed": seed, "trial": trial, "preset": preset, "overrides": label, "feature_cosine": round(cos, 5),
           "final_grad_loss": rec.stats.get("final_grad_loss"),
           "voices": rec.extras.get("init_voices_averaged", rec.extras.get("init_voice")),
           **{k: round(metrics[k], 4) for k in ("pesq_wb", "stoi", "asr_wer", "speaker_top1") if k in metrics},
           "cpu_s": {k: round(v, 2) for k, v in tm.cpu.items()}, "wall_s": {k: round(v, 2) for k, v in tm.wall.items()},
           "threads": torch.get_num_threads()}
    return row, feats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trials", default="0")
    ap.add_argument("--preset", default="speech-ctc-tts-c2f")
    ap.add_argument("--variant", action="append", default=[], help="JSON config overrides; repeat to interleave")
    ap.add_argument("--no-score", action="store_true", help="skip the scoring stage")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    if args.seed >= 1000:
        raise SystemExit("development seeds only (< 1000): this is a tuning benchmark")
    torch.set_num_threads(args.threads)
    variants = [json.loads(v) for v in (args.variant or ["{}"])]
    for tr in [int(v) for v in args.trials.split(",")]:
        first = None
        for ov in variants:
            row, feats = run(args.seed, tr, args.preset, ov, score=not args.no_score)
            first = feats if first is None else first
            row["max_abs_diff_vs_first"] = float((feats - first).abs().max())
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
