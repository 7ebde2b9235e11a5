"""First-layer fixed point after ``speech-ctc-tts`` (issue 21): old preset vs preset + refinement, same run.

For each development trial of ``speech/ctc-mel/fedsgd`` (B=1, transcript granted, random-init recogniser,
seed 0): the ``speech-ctc-tts`` attack once (its features = the old preset's result), then
``refine_first_layer_steps`` steps of ``speechleak.ctc.first_layer_refine`` applied to that result (the
input solved in closed form from conv1's weight gradient, its output error taken at the current estimate,
frames outside the TTS start's speech block held at the floor). Both feature maps go through the same
Griffin-Lim (100 iterations, NNLS) and the kit's scorer (feature / speech / dynamics cosine, PESQ-wb,
STOI, pocketsphinx WER); one JSON line per trial and row, seconds as measured in the same process.

    OMP_NUM_THREADS=1 python bench/speech_ctc_fixedpoint.py --trials 0,1,2 [--steps 20 --ridge 1.0]
    OMP_NUM_THREADS=1 python bench/speech_ctc_fixedpoint.py --trials 0 --diagnose   # + the δ diagnostics

``--diagnose`` adds, per trial: the cosine of the output error e = ∂loss/∂logits, and of the errors at the
conv2 / conv1 outputs, at the result vs at the clip; and the first-layer solve with the clip's own conv1
error (the oracle: what the update holds once that error is known); and two partial oracles of the fixed
point from the result (ridge 0.3): with the clip's conv2 output error (conv1's GELU mask from the estimate,
20 steps), and with the clip's error at the attention block's input (both GELU masks from the estimate,
30 steps). They locate what the fixed point lacks: the error signal through the attention block.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KEYS = ("feature_cosine", "speech_cosine", "dynamics_cosine", "pesq_wb", "stoi", "asr_wer", "asr_original_wer")


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _errors(model, x: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """∂loss/∂(head, conv2, conv1 outputs) at x (B=1: mean = sum)."""
    from common.types import Batch
    from speechleak.kit import ctc_loss

    box, hooks = {}, []
    for name in ("head", "conv2", "conv1"):
        hooks.append(getattr(model, name).register_forward_hook(lambda m, i, o, n=name: box.__setitem__(n, o)))
    try:
        loss = ctc_loss(model, Batch({"feats": x, "target_lengths": (labels != 0).sum(-1)}, labels)).sum()
    finally:
        for h in hooks:
            h.remove()
    return [g.detach() for g in torch.autograd.grad(loss, [box["head"], box["conv2"], box["conv1"]])]


def _attention_input_error(model, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """∂loss/∂h2 at x, h2 = the second activation's output (after conv2: the attention block's input)."""
    from common.types import Batch
    from speechleak.kit import ctc_loss

    outs: list[torch.Tensor] = []
    hook = model.act.register_forward_hook(lambda m, i, o: outs.append(o))
    try:
        loss = ctc_loss(model, Batch({"feats": x, "target_lengths": (labels != 0).sum(-1)}, labels)).sum()
    finally:
        hook.remove()
    return torch.autograd.grad(loss, outs[1])[0].detach()


def _partial_oracles(model, x: torch.Tensor, xs: torch.Tensor, labels, weight_grad, *, block, floor) -> dict:
    """The fixed point from x with the clip's conv2 output error / attention-input error plugged in."""
    import math

    from speechleak.ctc import first_layer_refine

    c1, c2 = model.conv1, model.conv2

    def gelu_d(z):
        return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)

    d2_true = _errors(model, xs, labels)[1]
    gh2_true = _attention_input_error(model, xs, labels)

    def from_d2(xx):
        return gelu_d(c1(xx)) * torch.nn.functional.conv_transpose1d(d2_true, c2.weight, stride=2, padding=2)

    def from_gh2(xx):
        z1 = c1(xx)
        d2 = gelu_d(c2(torch.nn.functional.gelu(z1))) * gh2_true
        return gelu_d(z1) * torch.nn.functional.conv_transpose1d(d2, c2.weight, stride=2, padding=2)

    kw = dict(kernel=5, stride=2, padding=2, blocks=[block], floor=floor, upper=4.0, ridge=0.3)
    with torch.no_grad():
        a = first_layer_refine(from_d2, x, weight_grad, steps=20, **kw)
        b = first_layer_refine(from_gh2, x, weight_grad, steps=30, **kw)
    return {"fixed_point_with_true_conv2_error_cosine": round(_cos(a, xs), 4),
            "fixed_point_with_true_attention_input_error_cosine": round(_cos(b, xs), 4),
            "attention_input_error_cosine_at_result": round(_cos(_attention_input_error(model, x, labels), gh2_true), 4)}


def run(trial: int, *, steps: int, ridge: float, margin: int, diagnose: bool) -> list[dict]:
    from common.functional import trainable_params
    from common.seed import derive_seed, make_generator
    from common.types import Reconstruction
    from eval.catalog import catalog
    from eval.pipeline import Resources, TrialSpec, make_kit, prepare, prepare_trial
    from speechleak.ctc import first_layer_refine

    case = catalog().cases.get("speech/ctc-mel/fedsgd").with_batch_size(1)
    ov = {"refine_first_layer_steps": steps, "refine_first_layer_ridge": ridge, "refine_first_layer_margin": margin}
    p = prepare(TrialSpec(case, "speech-ctc-tts", seed=0, trial=trial, overrides={"griffin_lim_iters": 1}))
    kit = make_kit("speech")
    t = prepare_trial(p, kit, Resources(), device=torch.device("cpu"))
    a = t.attacker
    rec = p.attack.reconstruct(a.observation, a.model, a.prior, generator=make_generator(derive_seed(0, trial, "attack")))
    feats_old = rec.data["features"].double()
    refiner = type(p.attack)(p.attack.config.__class__(**{**p.attack.config.__dict__, **ov}))
    params = {k: v.detach().double() for k, v in trainable_params(a.model).items()}
    t0 = time.perf_counter()
    feats_new = refiner._refine_first_layer(feats_old, rec.extras.get("speech_block"), a.observation, a.model, a.prior,
                                            params, a.observation.labels, "mean")
    refine_s = time.perf_counter() - t0
    fe = a.prior.frontend
    rows = []
    for name, feats, secs in (("speech-ctc-tts", feats_old, rec.stats["feature_s"]),
                              (f"speech-ctc-tts + first-layer fixed point ({steps} steps, ridge {ridge}, margin {margin})",
                               feats_new, rec.stats["feature_s"] + refine_s)):
        f32 = feats.float()
        waves = fe.features_to_wave(f32, length=a.prior.num_samples, n_iter=100, mel_inversion="nnls")
        r = Reconstruction(data={"features": f32, "waves": waves}, labels=rec.labels, stats=dict(rec.stats), extras={})
        m, _ = kit.score(r, t.truth, case=case)
        rows.append({"seed": 0, "trial": trial, "method": name, "feature_s": round(secs, 1),
                     **{k: round(float(m[k]), 4) for k in KEYS if k in m}, "voice": rec.extras.get("init_voice")})
    if diagnose:
        model = a.model.double()
        xs = t.truth["feats"].double()
        labels = a.observation.labels
        true_err, res_err = _errors(model, xs, labels), _errors(model, feats_old, labels)
        oracle = first_layer_refine(lambda x: true_err[2], torch.full_like(xs, a.prior.lower),
                                    a.observation.tensors["conv1.weight"].double(), kernel=5, stride=2, padding=2,
                                    blocks=[(0, xs.shape[-1] - 1)], floor=a.prior.lower, upper=None, steps=1, ridge=1e-6)
        rows.append({"seed": 0, "trial": trial, "diagnostic": True,
                     **{f"{n}_error_cosine_at_result": round(_cos(u, v), 4)
                        for n, u, v in zip(("output", "conv2", "conv1"), res_err, true_err)},
                     "oracle_conv1_solve_feature_cosine": round(_cos(oracle, xs), 6),
                     **_partial_oracles(model, feats_old, xs, labels, a.observation.tensors["conv1.weight"].double(),
                                        block=tuple(v + s for v, s in zip(rec.extras["speech_block"][0], (-margin, margin))),
                                        floor=a.prior.lower)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", default="0,1,2")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ridge", type=float, default=1.0)
    ap.add_argument("--margin", type=int, default=8)
    ap.add_argument("--diagnose", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for tr in [int(v) for v in args.trials.split(",")]:
        for row in run(tr, steps=args.steps, ridge=args.ridge, margin=args.margin, diagnose=args.diagnose):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
