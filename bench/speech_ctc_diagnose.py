"""Why does ``speech-ctc-tts`` stop at feature cosine ~0.75? (issue 21; development seeds only.)

For each development trial of ``speech/ctc-mel/fedsgd`` (B=1, transcript granted, random-init recogniser):

* ``start`` row: the preset's aligned espeak-ng start (4 voices, 60 warp iterations), its objective and cosine;
* ``trace`` rows: one float64 L-BFGS run from it with the preset's objective (L2 gradient distance + TV 1e-5,
  softplus bound), logged every ``--every`` evaluations: objective, feature / speech-frame cosine (does the
  distance keep falling while the cosine stalls?);
* ``truth`` row: the same objective at the clip's own features (0 for a noise-free update: the truth is
  distinguishable iff the result's objective is clearly above it) and at the result;
* ``component`` rows: the feature error e = result − clip split into parts (silent / speech frames, temporal
  modulation bands in cycles per frame, low / high mel bins, conv1's forward row space / null space) with, per
  part, its share of ||e||² and its gain ||J e_k|| / ||e_k|| (J: the Jacobian of the parameter gradient w.r.t.
  the features at the clip, by a central difference), next to the gain of a random direction of the same part:
  a part with a large error share and a low gain is (nearly) not seen by the update at all.

    OMP_NUM_THREADS=1 python bench/speech_ctc_diagnose.py --trials 0 --seed 0 --iterations 300 [--save DIR]

One JSON line per row. The start and the result are saved under ``--save`` (for the remedies' runs).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0)), 4)


class Problem:
    """One trial's matching problem in float64 (the preset's objective), with its truth."""

    def __init__(self, seed: int, trial: int, *, preset: str = "speech-ctc-tts") -> None:
        from common.functional import functional_gradient, trainable_params
        from common.grads import gradient_distance, total_variation
        from common.seed import derive_seed, make_generator
        from eval.catalog import catalog
        from eval.pipeline import Resources, TrialSpec, make_kit, prepare, prepare_trial

        case = catalog().cases.get("speech/ctc-mel/fedsgd").with_batch_size(1)
        self.p = prepare(TrialSpec(case, preset, seed=seed, trial=trial, overrides={"griffin_lim_iters": 1}))
        t = prepare_trial(self.p, make_kit("speech"), Resources(), device=torch.device("cpu"))
        a = t.attacker
        self.obs, self.model, self.prior = a.observation, a.model, a.prior
        self.generator = make_generator(derive_seed(seed, trial, "attack"))
        self.truth = t.truth["feats"].double()
        self.labels = self.obs.labels
        self.lower, self.upper = self.prior.lower, self.prior.upper
        self.target = {k: v.detach().double() for k, v in self.obs.tensors.items()}
        self.params = {k: v.detach().double() for k, v in trainable_params(self.model).items()}
        self.names = [k for k in self.params if k in self.target]
        self.reduction = self.obs.protocol.loss_reduction if self.obs.protocol else "mean"
        self._fg, self._gd, self._tv = functional_gradient, gradient_distance, total_variation

    def grads(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._fg(self.model, self.prior.loss_fn, self.params, self.prior.build_batch(feats, self.labels),
                        reduction=self.reduction)

    def objective(self, feats: torch.Tensor, *, tv: float = 1e-5, weights=None) -> torch.Tensor:
        d = self._gd("l2", self.grads(feats), self.target, names=self.names, weights=weights)
        return d + tv * self._tv(feats, dims=(-1, -2)) if tv > 0 else d

    def layer_errors(self, feats: torch.Tensor) -> dict[str, float]:
        g = self.grads(feats)
        return {k: round(float((g[k] - self.target[k]).norm() / self.target[k].norm().clamp(min=1e-30)), 5) for k in self.names}

    def to_feats(self, z: torch.Tensor) -> torch.Tensor:
        return self.lower + torch.nn.functional.softplus(4.0 * z) / 4.0

    def from_feats(self, f: torch.Tensor) -> torch.Tensor:
        lo = self.lower
        return torch.where(f - lo > 5.0, 4.0 * (f - lo), torch.log(torch.expm1((4.0 * (f - lo)).clamp(min=1e-4)))) / 4.0

    def tts_start(self) -> torch.Tensor:
        def fobj(feats, ar=None):
            return self.objective(feats)
        return self.p.attack._tts_start(self.labels, self.prior, fobj, device=torch.device("cpu"), dtype=torch.float64)[0][0]


def trace_lbfgs(pb: Problem, start: torch.Tensor, *, iterations: int, every: int, head: dict, history: int = 50,
                objective=None) -> tuple[torch.Tensor, list[dict]]:
    """The preset's L-BFGS from ``start`` (features), logging every ``every`` evaluations."""
    objective = objective or pb.objective
    z = pb.from_feats(start).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([z], lr=1.0, max_iter=iterations, history_size=history, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-14)
    rows, n, t0 = [], [0], time.perf_counter()
    speech = (pb.truth[0] - pb.lower).mean(0) > 0.05

    def closure():
        opt.zero_grad(set_to_none=True)
        f = pb.to_feats(z)
        loss = objective(f)
        loss.backward(inputs=[z])
        if n[0] % every == 0:
            fd = f.detach()
            rows.append({**head, "row": "trace", "evals": n[0], "objective": float(loss.detach()), "cosine": _cos(fd, pb.truth),
                         "speech_cosine": _cos(fd[0][:, speech], pb.truth[0][:, speech]), "s": round(time.perf_counter() - t0, 1)})
        n[0] += 1
        return loss

    opt.step(closure)
    return pb.to_feats(z.detach()).clamp(min=pb.lower, max=pb.upper), rows


def conv1_row_projection(conv: torch.nn.Conv1d, e: torch.Tensor, *, iters: int = 300) -> torch.Tensor:
    """Projection of e [1, F, T] onto the row space of x -> conv1(x) (bias-free): Wᵀ (W Wᵀ)⁻¹ W e by CG."""
    w = conv.weight.detach().double()
    s, p = conv.stride[0], int(conv.padding[0])

    def fwd(x):
        return torch.nn.functional.conv1d(x, w, stride=s, padding=p)

    def adj(y):
        out = torch.nn.functional.conv_transpose1d(y, w, stride=s, padding=p)
        if out.shape[-1] < e.shape[-1]:
            out = torch.nn.functional.pad(out, (0, e.shape[-1] - out.shape[-1]))
        return out[..., : e.shape[-1]]

    b = fwd(e)
    y = torch.zeros_like(b)
    r = b.clone()
    d = r.clone()
    rr = (r * r).sum()
    for _ in range(iters):
        ad = fwd(adj(d))
        alpha = rr / (d * ad).sum()
        y, r = y + alpha * d, r - alpha * ad
        rr_new = (r * r).sum()
        if rr_new.sqrt() < 1e-10 * b.norm():
            break
        d, rr = r + (rr_new / rr) * d, rr_new
    return adj(y)


def components(pb: Problem, e: torch.Tensor) -> dict[str, torch.Tensor]:
    """Parts of a feature error e [1, F, T] (each family sums to e)."""
    speech = ((pb.truth[0] - pb.lower).mean(0) > 0.05).to(e.dtype)
    out = {"frames:silence": e * (1 - speech), "frames:speech": e * speech}
    spec = torch.fft.rfft(e, dim=-1)
    freqs = torch.fft.rfftfreq(e.shape[-1])
    for lo, hi in ((0.0, 1 / 32), (1 / 32, 1 / 8), (1 / 8, 1 / 4), (1 / 4, 0.51)):
        m = ((freqs >= lo) & (freqs < hi)).to(spec.dtype)
        out[f"modulation:{lo:.3f}-{min(hi, 0.5):.3f}"] = torch.fft.irfft(spec * m, n=e.shape[-1], dim=-1)
    f = e.shape[1]
    bins = torch.zeros(f, dtype=e.dtype)
    bins[: f // 2] = 1
    out["mel:low"] = e * bins.view(1, -1, 1)
    out["mel:high"] = e * (1 - bins).view(1, -1, 1)
    row = conv1_row_projection(pb.model.conv1, e)
    out["conv1:row"], out["conv1:null"] = row, e - row
    return out


def jacobian_gain(pb: Problem, v: torch.Tensor, *, rel: float = 1e-4) -> float:
    """||J v|| / ||v||, J = ∂(parameter gradient)/∂features at the clip, by a central difference."""
    n = float(v.norm())
    if n == 0:
        return 0.0
    eps = rel * float(pb.truth.norm()) / n
    with torch.enable_grad():
        gp, gm = pb.grads(pb.truth + eps * v), pb.grads(pb.truth - eps * v)
    jv2 = sum(float(((gp[k] - gm[k]) / (2 * eps)).pow(2).sum()) for k in pb.names)
    return jv2 ** 0.5 / n


def analyse(pb: Problem, res: torch.Tensor, head: dict, gen: torch.Generator) -> list[dict]:
    rows = []
    with torch.no_grad():
        d_truth, d_res = float(pb.objective(pb.truth, tv=0)), float(pb.objective(res, tv=0))
    gnorm2 = sum(float(pb.target[k].pow(2).sum()) for k in pb.names)
    e = res - pb.truth
    rows.append({**head, "row": "truth", "distance_truth": d_truth, "distance_result": d_res, "target_norm_sq": gnorm2,
                 "relative_distance_result": d_res / gnorm2, "feature_cosine": _cos(res, pb.truth),
                 "linearised_distance": jacobian_gain(pb, e) ** 2 * float(e.pow(2).sum()),
                 "layer_rel_error_result": pb.layer_errors(res)})
    tot = float(e.pow(2).sum())
    for name, part in components(pb, e).items():
        rnd = components(pb, torch.randn(e.shape, generator=gen, dtype=e.dtype))[name]
        rows.append({**head, "row": "component", "part": name, "error_share": round(float(part.pow(2).sum()) / tot, 4),
                     "gain_error": round(jacobian_gain(pb, part), 4), "gain_random": round(jacobian_gain(pb, rnd), 4)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", default="0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--save", default="")
    args = ap.parse_args()
    if args.seed >= 1000:
        raise SystemExit("development seeds only (< 1000): this is a tuning diagnostic")
    torch.set_num_threads(1)
    for tr in [int(v) for v in args.trials.split(",")]:
        head = {"seed": args.seed, "trial": tr}
        pb = Problem(args.seed, tr)
        t0 = time.perf_counter()
        start = pb.tts_start()
        with torch.no_grad():
            print(json.dumps({**head, "row": "start", "objective": float(pb.objective(start)), "cosine": _cos(start, pb.truth),
                              "s": round(time.perf_counter() - t0, 1)}), flush=True)
        res, rows = trace_lbfgs(pb, start, iterations=args.iterations, every=args.every, head=head)
        for r in rows:
            print(json.dumps(r), flush=True)
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            torch.save({"start": start, "result": res, "truth": pb.truth}, Path(args.save) / f"s{args.seed}_t{tr}.pt")
        for r in analyse(pb, res, head, torch.Generator().manual_seed(1)):
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
