"""Per-step cost of the CTC gradient-matching objective (issue 21, item 1).

One objective evaluation = forward, parameter gradient with create_graph, L2 distance to a
target gradient, backward to the 80 x 501 mel input (4 s at hop 128) of the default
``CTCRecognizer`` (dim 96). Compared in the same process, best of ``--reps``:
``bare`` (the same model and double backward with a linear stand-in loss: the floor),
``autograd`` (``speechleak.ctc.ctc_nll``: Python loop over frames) and ``native``
(``ctc_nll_fast``: ATen CTC + finite-difference Hessian-vector product).

    OMP_NUM_THREADS=1 python bench/speech_ctc_profile.py --reps 5
    OMP_NUM_THREADS=1 python bench/speech_ctc_profile.py --lbfgs 40          # whole attack, s per L-BFGS iteration
    OMP_NUM_THREADS=1 python bench/speech_ctc_profile.py --delta-oracle 0,1,2 # diagnostic (issue 21)
    OMP_NUM_THREADS=1 python bench/speech_ctc_profile.py --trials 0,1,2 --variant '{"iterations": 300}'

``--lbfgs N``: the attack's feature stage (``speech-ctc-lbfgs``, N iterations, development seed 0, trial
``--trial``) with the old CTC (``ctc_nll``, float64), the native CTC in float64 (the preset) and in float32;
seconds per iteration, final distance and cosine. ``--variant JSON``: the feature stage of ``speech-ctc-lbfgs``
with these overrides on development trials (seed 0), one JSON line per trial (feature / speech / dynamics
cosine, final distance, seconds, chosen TTS voice). ``--delta-oracle``: after the attack (``--iterations``),
the input solved from the first convolution's weight gradient alone (a linear least-squares problem once
that layer's output error δ is fixed) with δ from the truth and with δ from the attack's result: how much
of the remaining error is the error in δ.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.functional import functional_gradient, trainable_params
from common.types import Batch
from speechleak.ctc import ctc_nll, ctc_nll_fast
from speechleak.kit import pad_targets
from speechleak.models import CTCRecognizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--frames", type=int, default=501)
    ap.add_argument("--lbfgs", type=int, default=0, help="time the whole attack for this many L-BFGS iterations")
    ap.add_argument("--delta-oracle", default="", help="comma-separated development trials for the δ diagnostic")
    ap.add_argument("--iterations", type=int, default=300, help="attack iterations before the δ diagnostic")
    ap.add_argument("--trial", type=int, default=0)
    ap.add_argument("--variant", default="", help="JSON overrides of speech-ctc-lbfgs: run them on --trials, one JSON line each")
    ap.add_argument("--trials", default="0", help="comma-separated development trials for --variant")
    args = ap.parse_args()
    if args.variant:
        for tr in [int(v) for v in args.trials.split(",")]:
            print(json.dumps(variant_row(tr, json.loads(args.variant))), flush=True)
        return
    if args.lbfgs:
        print("\n".join(lbfgs_rows(args.trial, args.lbfgs)))
        return
    if args.delta_oracle:
        print("\n".join(delta_oracle_rows([int(v) for v in args.delta_oracle.split(",")], args.iterations)))
        return
    tg, tl = pad_targets(["the movie is a charming and often funny comedy of manners"])
    results = {}
    for dt in (torch.float32, torch.float64):
        g = torch.Generator().manual_seed(0)
        model = CTCRecognizer(80, dim=96, generator=g)
        params = {k: v.detach().to(dt) for k, v in trainable_params(model).items()}
        x_true = torch.randn(1, 80, args.frames, generator=g, dtype=dt)

        def loss_with(fn):
            def loss(m, b):
                lp = m(b.inputs["feats"])
                if fn is None:
                    return (lp * 0.01).sum((1, 2))
                return fn(lp, b.labels, torch.full((lp.shape[0],), lp.shape[1]), b.inputs["target_lengths"])
            return loss

        for name, fn in (("bare", None), ("autograd", ctc_nll), ("native", ctc_nll_fast)):
            lf = loss_with(fn)
            grad = lambda x: functional_gradient(model, lf, params, Batch({"feats": x, "target_lengths": tl}, tg))
            target = {k: v.detach() for k, v in grad(x_true).items()}
            x = torch.zeros_like(x_true, requires_grad=True)
            best = float("inf")
            for _ in range(args.reps):
                t0 = time.perf_counter()
                d = sum((v - target[k]).pow(2).sum() for k, v in grad(x).items())
                torch.autograd.grad(d, x)
                best = min(best, time.perf_counter() - t0)
            results[(str(dt).split(".")[-1], name)] = best
    print("| dtype | bare model (s) | autograd CTC (s) | native CTC (s) | autograd / bare | native / bare | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for dt in ("float32", "float64"):
        b, a, n = (results[(dt, k)] for k in ("bare", "autograd", "native"))
        print(f"| {dt} | {b:.3f} | {a:.3f} | {n:.3f} | {a / b:.1f} | {n / b:.2f} | {a / n:.1f}x |")


# -- whole attack: seconds per L-BFGS iteration, old vs new CTC and float32 vs float64 -----------
def _trial(trial: int, overrides: dict):
    """(prepared spec, trial) of ``speech-ctc-lbfgs`` on ``speech/ctc-mel/fedsgd``, development seed 0."""
    from eval.catalog import catalog
    from eval.pipeline import Resources, TrialSpec, make_kit, prepare, prepare_trial

    case = catalog().cases.get("speech/ctc-mel/fedsgd").with_batch_size(1)
    p = prepare(TrialSpec(case, "speech-ctc-lbfgs", seed=0, trial=trial, overrides={"griffin_lim_iters": 1, **overrides}))
    return p, prepare_trial(p, make_kit("speech"), Resources(), device=torch.device("cpu"))


def _scores(rec_feats: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    from speechleak import metrics as M
    from speechleak.kit import frontend_for
    from eval.catalog import catalog

    fc = frontend_for(catalog().cases.get("speech/ctc-mel/fedsgd")).config
    floor = float((math.log(fc.log_eps) - fc.offset) / fc.scale)
    out = M.feature_similarity(predictions=list(rec_feats), references=list(truth))
    out.update(M.speech_region_similarity(predictions=list(rec_feats), references=list(truth), floor=floor))
    return out


def variant_row(trial: int, overrides: dict) -> dict:
    """One development trial of ``speech-ctc-lbfgs`` + ``overrides`` (feature stage only)."""
    from common.seed import derive_seed, make_generator

    p, t = _trial(trial, overrides)
    a = t.attacker
    rec = p.attack.reconstruct(a.observation, a.model, a.prior, generator=make_generator(derive_seed(0, trial, "attack")))
    out = {"seed": 0, "trial": trial, "overrides": overrides, **_scores(rec.data["features"], t.truth["feats"])}
    out.update({k: rec.stats[k] for k in ("final_grad_loss", "feature_s", "init_warp_s") if k in rec.stats})
    out.update({k: v for k, v in rec.extras.items() if k in ("init_voice", "init_voices_averaged")})
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def lbfgs_rows(trial: int, iterations: int) -> list[str]:
    """The attack's feature stage with the old CTC (``ctc_nll``: Python recursion over frames, float64),
    the native CTC in float64 (the preset) and the native CTC in float32; same clip, same start."""
    import speechleak.kit as kit
    from common.seed import derive_seed, make_generator

    rows = []
    fast = kit.ctc_nll_fast
    _trial(trial, {"iterations": 2})  # warm-up: imports, clip cache, first-call costs (not timed)
    for name, fn, prec in (("autograd CTC (before)", ctc_nll, "float64"), ("native CTC", fast, "float64"),
                           ("native CTC", fast, "float32")):
        kit.ctc_nll_fast = fn
        try:
            p, t = _trial(trial, {"iterations": iterations, "precision": prec})
            a = t.attacker
            rec = p.attack.reconstruct(a.observation, a.model, a.prior, generator=make_generator(derive_seed(0, trial, "attack")))
        finally:
            kit.ctc_nll_fast = fast
        s = _scores(rec.data["features"], t.truth["feats"])
        rows.append(f"| {name} | {prec} | {iterations} | {rec.stats['feature_s']:.1f} | {rec.stats['feature_s'] / iterations:.3f} "
                    f"| {rec.stats['final_grad_loss']:.4g} | {s['feature_cosine']:.4f} | {s['dynamics_cosine']:.4f} |")
    return ["| CTC | precision | L-BFGS iterations | feature s | s / iteration | final distance | feature cosine "
            "| dynamics cosine |", "|---|---|---|---|---|---|---|---|"] + rows


# -- diagnostic: how much of the input the first layer's gradient fixes once its output error is known ----
def _conv1_error(model, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """δ = ∂ctc/∂(conv1 output) at input x (the error the first layer's weight gradient pairs with its input patches)."""
    from speechleak.ctc import output_error
    from speechleak.kit import ctc_loss

    tl = (labels != 0).sum(-1)
    return output_error(model.conv1, lambda xx: ctc_loss(model, Batch({"feats": xx, "target_lengths": tl}, labels)).sum(),
                        x).detach()


def solve_first_layer(model, weight_grad: torch.Tensor, delta: torch.Tensor, x0: torch.Tensor, *,
                      iterations: int = 300) -> torch.Tensor:
    """min_x ||Σ_t δ_t ⊗ patch_t(x) − G1||² (linear in x for a fixed δ), L-BFGS from x0."""
    w = model.conv1.weight
    x = x0.detach().clone().contiguous().requires_grad_(True)
    opt = torch.optim.LBFGS([x], max_iter=iterations, history_size=50, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-14, tolerance_change=1e-16)

    def closure():
        opt.zero_grad()
        g = torch.autograd.grad((model.conv1(x) * delta).sum(), w, create_graph=True)[0]
        loss = (g - weight_grad).pow(2).sum()
        loss.backward(inputs=[x])
        return loss

    opt.step(closure)
    return x.detach()


def delta_oracle_rows(trials: list[int], iterations: int) -> list[str]:
    """Per clip: the attack's result, then the input solved from conv1's weight gradient alone with the
    first layer's output error δ taken from the truth (oracle) or from the attack's result."""
    from common.seed import derive_seed, make_generator

    rows = ["| trial | attack feature cosine | dynamics | cos(δ at result, δ at truth) | conv1 solve, δ from truth: "
            "cosine | dynamics | conv1 solve, δ from result: cosine |", "|---|---|---|---|---|---|---|"]
    for tr in trials:
        p, t = _trial(tr, {"iterations": iterations})
        a = t.attacker
        rec = p.attack.reconstruct(a.observation, a.model, a.prior, generator=make_generator(derive_seed(0, tr, "attack")))
        model = a.model.double()
        labels = a.observation.labels
        g1 = a.observation.tensors["conv1.weight"].double()
        xs, xh = t.truth["feats"].double(), rec.data["features"].double()
        ds, dh = _conv1_error(model, xs, labels), _conv1_error(model, xh, labels)
        s0 = _scores(xh.float(), xs.float())
        so = _scores(solve_first_layer(model, g1, ds, xh).float(), xs.float())
        sh = _scores(solve_first_layer(model, g1, dh, xh).float(), xs.float())
        dcos = float((ds.flatten() @ dh.flatten()) / (ds.norm() * dh.norm()))
        rows.append(f"| {tr} | {s0['feature_cosine']:.3f} | {s0['dynamics_cosine']:.3f} | {dcos:.3f} | {so['feature_cosine']:.3f} "
                    f"| {so['dynamics_cosine']:.3f} | {sh['feature_cosine']:.3f} |")
        print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    main()
