"""Speech section of the performance suite (``bench/perf.py``): ``speech-lbfgs`` per clip.

    python bench/perf_speech.py [--quick] [--device cpu|cuda]

Two settings, B=1, seed 0: the keyword CNN (``speech/kws-mel/fedsgd``, 1 s clip, labels
recovered) and the CTC recogniser (``speech/ctc-mel/fedsgd``, 4 s sentence, transcript granted),
each attacked with ``speech-lbfgs`` (float64 L-BFGS) for a fixed number of iterations
(``PERF_SPEECH_KWS_ITERS``, default 300 = the preset; ``PERF_SPEECH_CTC_ITERS``, default 30 of the
preset's 300: the CTC attack took about 16 minutes per clip on 2 CPU cores), without the
Griffin-Lim / refinement stage (timed: the feature optimisation only). The metric is the cosine
between the recovered and the true log-mel features. Clips come from ``$GRADLEAK_SPEECH_DATA``
(``kws/``, ``ctc/``; ``bench/gpu_prepare.sh``) when set, else from flite. On an accelerator each
setting runs on the device and on the CPU (same process, same clip); ratio = cpu / device seconds.
"""
from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _data(sub: str) -> str | None:
    root = os.environ.get("GRADLEAK_SPEECH_DATA")
    return str(Path(root) / sub) if root and (Path(root) / sub).is_dir() else None


def _one(case_name: str, sub: str, iterations: int, device: str) -> dict:
    import torch

    from common.seed import derive_seed, make_generator
    from eval.catalog import catalog
    from eval.pipeline import Resources, TrialSpec, make_kit, prepare, prepare_trial

    case = catalog().cases.get(case_name).with_batch_size(1)
    ov = {"iterations": iterations, "refine_iterations": 0}
    p = prepare(TrialSpec(case, "speech-lbfgs", seed=0, overrides=ov, data_path=_data(sub)))
    kit = make_kit("speech")
    dev = torch.device(device)
    t = prepare_trial(p, kit, Resources(), device=dev)
    a = t.attacker
    rec = p.attack.reconstruct(a.observation, a.model, a.prior, generator=make_generator(derive_seed(0, 0, "attack")))
    f, g = rec.data["features"].flatten().double(), t.truth["feats"].flatten().double()
    return {"feature_s": rec.stats["feature_s"], "cosine": float(f @ g / (f.norm() * g.norm())),
            "loss": rec.stats["final_grad_loss"], "frames": int(t.truth["feats"].shape[-1])}


def measure(*, quick: bool, device: str) -> list[dict]:
    settings = [("speech/kws-mel/fedsgd", "kws", int(os.environ.get("PERF_SPEECH_KWS_ITERS", 30 if quick else 300))),
                ("speech/ctc-mel/fedsgd", "ctc", int(os.environ.get("PERF_SPEECH_CTC_ITERS", 5 if quick else 30)))]
    devices = [device] if device == "cpu" else [device, "cpu"]
    rows = []
    for case_name, sub, iters in settings:
        res = {}
        try:
            if device != "cpu":  # warm-up on the device (kernels, cuBLAS/cuFFT plans): not timed
                _one(case_name, sub, 2, device)
            for d in devices:
                res[d] = _one(case_name, sub, iters, d)
        except KeyboardInterrupt:  # a time limit: return what was measured
            rows.append({"attack": "speech-lbfgs", "setting": case_name, "variant": "-", "baseline": "-", "wall_s": None,
                         "ratio": None, "peak_rss_mb": None, "metric_name": None, "metric": None,
                         "notes": f"interrupted (time limit); measured: {sorted(res)}"})
            _rows(rows, res, case_name, sub, iters)
            return rows
        _rows(rows, res, case_name, sub, iters)
    return rows


def _rows(rows: list[dict], res: dict, case_name: str, sub: str, iters: int) -> None:
    import torch

    for d in res:
        r = res[d]
        ratio = res["cpu"]["feature_s"] / r["feature_s"] if d != "cpu" and "cpu" in res else None
        rows.append({"attack": "speech-lbfgs", "setting": f"{case_name} B=1, {iters} L-BFGS iterations (float64), "
                     f"{r['frames']} frames", "variant": f"ours on {d}", "baseline": "ours on cpu" if ratio else "-",
                     "wall_s": round(r["feature_s"], 2), "ratio": None if ratio is None else round(ratio, 2),
                     "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                     "metric_name": "feature cosine", "metric": round(r["cosine"], 4), "device": d,
                     "notes": f"{torch.get_num_threads()} CPU threads; final gradient loss {r['loss']:.3g}; "
                              f"features only (no Griffin-Lim); clips {'carried' if _data(sub) else 'flite'}"})


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    for r in measure(quick=a.quick, device=a.device):
        print(r)


if __name__ == "__main__":
    main()
