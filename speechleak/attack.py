"""Speech gradient inversion: labels first, then feature (or waveform) recovery by gradient
matching, then waveform recovery (Griffin-Lim, optional refinement through the front end).

Mirrors Li, Zhang, Liu, "Speech Privacy Leakage from Shared Gradients in Distributed
Learning" (ICASSP 2023; no public code): L2 gradient distance + anisotropic total variation
on the feature map, Adam, features first and Griffin-Lim afterwards. Options add the cosine
distance of Inverting Gradients (Geiping et al. 2020), per-layer weighting, a smoothness
prior, end-to-end waveform optimisation through the differentiable front end, FedAvg
simulation, and CTC targets through the log-space CTC of ``speechleak.ctc``.

Deviations (all documented in docs/speechleak.md):
* Li et al. run 8,000 Adam iterations; the default here is 2,000 and the committed runs use
  fewer (2 shared CPU cores).
* Restarts run as one tensor through ``torch.func.vmap(torch.func.grad(...))``; distances,
  layer weights, FedAvg simulation and the Adam / L-BFGS loop are the gradient-matching core's
  (``common.grads``, ``common.fl``, ``common.optim``); the lowest final gradient distance wins.
* For CTC targets the transcript is taken as observed (as Dang et al. 2022 assume); the
  bag-of-characters estimate from the output-bias gradient is reported alongside, not used.
  ``ctc_targets="free"`` drops the transcript and optimises a per-frame alignment jointly (our
  addition); ``init_seconds_per_char`` starts from silence outside a centred speech block (our
  addition: breaks the time-shift symmetry of padded clips, see docs/speechleak.md).
  ``init_tts_voice`` starts instead from the attacker's own TTS rendering of the granted transcript,
  aligned to the gradient through a few warp parameters (our addition; ``speech-ctc-tts``);
  ``init_tts_average`` runs the search from the best few aligned voices and averages the results in
  feature space (our addition: their errors are partly independent).
  ``refine_first_layer_steps`` adds, after the search, a fixed point on the first convolution's weight
  gradient (linear in the input once that layer's output error is fixed; solved in closed form, silence
  outside the start's speech block held at the floor): our addition, off by default (issue 21).
  ``coarse_iterations`` starts each search with a coarse-to-fine stage: a residual of the start at 1/``coarse_time_factor``
  of the frame rate is optimised first (slow, timing components), then the frames (our addition, issue 21).
  ``output_time_blur`` blurs the recovered features over time (Gaussian, σ frames) before the waveform stage: a
  shrinkage for the frame timing the update leaves uncertain (our addition, issue 21; off by default).
  ``search_threads`` runs the voices' alignments and the averaged searches on threads (same results; wall time only).
* FedAvg: the client's local SGD is simulated with the observed hyper-parameters and the
  identity minibatch order (the shuffle order is private).
"""
from __future__ import annotations

import time
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from common.attack import AttackInfo
from common.fl import local_training
from common.functional import functional_gradient, graph_gradient, trainable_params
from common.grads import delta_scale, delta_to_gradient, gradient_distance, layer_weights, total_variation
from common.labels import recover_labels
from common.optim import optimise, step_decay
from common.threat import Capability
from common.types import Batch, Observation, Reconstruction

from .config import SpeechInversionConfig, tts_voices
from .ctc import first_layer_refine, output_error, speech_block, time_blur
from .frontend import refine_waveform
from .prior import SpeechPrior
from .search import centred_block_init, coarse_residual, model_for_thread, run_concurrently

__all__ = ["SpeechGradientInversion", "SpeechInversionConfig", "SpeechPrior", "char_occupancy", "time_smoothness"]


def time_smoothness(x: Tensor) -> Tensor:
    return x.diff(dim=-1).pow(2).mean()


def greedy_decode(align: Tensor) -> str:
    """Best-path CTC decoding of one utterance's alignment [T', V]: argmax, collapse, drop blanks."""
    from .models import decode_ids

    ids = align.argmax(-1).tolist()
    return decode_ids([c for k, c in enumerate(ids) if c != 0 and (k == 0 or c != ids[k - 1])])


def char_occupancy(obs: Observation, prior: SpeechPrior, model: nn.Module, b: int, generator: torch.Generator) -> Tensor | None:
    """Bag of characters for CTC (bias-gradient histogram, after Dang et al. 2021's RLG idea):
    the output-bias gradient is Σ_t (p_tc − γ_tc) per utterance, so the expected number of
    frames aligned to character c is ≈ Σ_t p̄_tc − g_c, with p̄ estimated on random public
    feature maps. Returns the per-class occupancy estimate (mean per utterance)."""
    if prior.label_bias is None or prior.label_bias not in obs.tensors:
        return None
    g = obs.tensors[prior.label_bias].detach().double()
    reduction = obs.protocol.loss_reduction if obs.protocol else "mean"
    if reduction == "sum":
        g = g / b
    feats = torch.randn((8, *prior.input_shape), generator=generator) * 0.5
    with torch.no_grad():
        lp = functional_call(model, dict(model.named_parameters()), (feats.to(g.device, torch.float32),))
    p_sum = lp.exp().sum(1).mean(0).double()  # Σ_t p_tc averaged over random inputs
    return (p_sum - g).clamp(min=0.0)


class SpeechGradientInversion:
    """Li et al. 2023 gradient inversion for speech models (see the module docstring)."""

    info: ClassVar[AttackInfo] = AttackInfo(
        "speech-inversion", "speech", frozenset({Capability.GRADIENTS, Capability.BATCH_SIZE, Capability.PUBLIC_PRIOR}),
        "Li, Zhang, Liu. Speech Privacy Leakage from Shared Gradients in Distributed Learning. ICASSP 2023 "
        "(arXiv 2302.10441)", prior="speech")

    def __init__(self, config: SpeechInversionConfig | None = None) -> None:
        self.config = config or self.default_config()

    @classmethod
    def default_config(cls) -> SpeechInversionConfig:
        return SpeechInversionConfig()

    def _unserved(self, *, ctc: bool, fedsgd: bool) -> str | None:
        """Why the CTC-only options of the config cannot serve a case (None when they can)."""
        cfg = self.config
        if cfg.init_tts_voice and not (ctc and cfg.ctc_targets == "observed" and cfg.domain == "features"):
            return ("init_tts_voice renders a granted transcript: it needs a CTC case, ctc_targets=observed "
                    "and domain=features; unset it otherwise")
        if cfg.coarse_iterations and cfg.coarse_time_factor > 1 and cfg.domain != "features":
            return ("coarse_iterations optimises a temporally downsampled residual of the features: it needs "
                    "domain=features; set coarse_iterations=0 otherwise")
        if cfg.output_time_blur and cfg.domain != "features":
            return "output_time_blur blurs recovered features: it needs domain=features; set output_time_blur=0 otherwise"
        if cfg.refine_first_layer_steps and not (ctc and fedsgd and cfg.domain == "features"):
            return ("refine_first_layer_steps needs a CTC case with a FedSGD gradient and domain=features; "
                    "set refine_first_layer_steps=0 otherwise")
        return None

    def check_case(self, case: Any) -> None:
        """Refuse, before any work, settings this case cannot serve (ValueError naming the fix)."""
        opts = getattr(case, "options", {}) or {}
        why = self._unserved(ctc=opts.get("task") == "ctc", fedsgd=case.protocol.kind == "fedsgd")
        if why:
            raise ValueError(why)

    # -- labels -------------------------------------------------------------------------
    def _labels(self, obs: Observation, prior: SpeechPrior, model: nn.Module, b: int,
                generator: torch.Generator) -> Tensor:
        if prior.task == "ctc" and self.config.ctc_targets == "free":
            return torch.zeros((b, 1), dtype=torch.long)  # no transcript: the alignment is optimised
        if obs.labels is not None:
            return obs.labels.clone()
        if prior.task == "ctc":
            raise ValueError("CTC inversion needs the transcripts: use a case that grants Capability.LABELS")
        if self.config.labels == "observed":
            raise ValueError("labels=observed but the threat model does not grant labels; use --set labels=recover")
        feats = torch.randn((64, *prior.input_shape), generator=generator) * 0.5
        with torch.no_grad():
            dev = next(model.parameters()).device
            mean_probs = functional_call(model, dict(model.named_parameters()), (feats.to(dev),)).softmax(-1).mean(0)
        tensors = obs.tensors
        if obs.kind == "delta":
            # FedAvg: delta = lr * sum of step gradients ~ lr * epochs * steps * (mean gradient)
            tensors = delta_to_gradient(tensors, obs.require_protocol())
        return recover_labels(tensors, num_examples=b, weight=prior.label_weight, bias=prior.label_bias,
                              mean_probs=mean_probs.cpu(), reduction=obs.protocol.loss_reduction if obs.protocol else "mean")

    def _tts_start(self, labels: Tensor, prior: SpeechPrior, feature_objective, *, device,
                   dtype) -> list[tuple[Tensor, str]]:
        """[B, F, T] start: each transcript rendered by a public TTS voice, placed as a centred block of
        len(transcript) * init_seconds_per_char (the rendering's own length when 0) and aligned by
        ``init_warp_grid`` (width x centre grid) and ``init_warp_iterations`` of L-BFGS on the warp parameters
        (see ``BlockWarp``). With several voices (comma-separated ``init_tts_voice``) the one with the lowest
        matching objective after its alignment is kept (one voice for the whole batch; ranking right after the
        grid picked worse voices on development clips). Returns every (start, voice), best objective first."""
        from .ctc import BlockWarp, grid_align, tts_features
        from .models import decode_ids

        cfg = self.config
        if prior.lower is None:
            raise ValueError("init_tts_voice needs a mel front end with a known floor (prior.lower)")
        fc = prior.frontend.config
        n_frames = prior.input_shape[1]
        texts = [decode_ids([c for c in row if c != 0]) for row in labels.tolist()]

        def align(voice: str) -> tuple[float, str, Tensor]:  # (objective after alignment, voice, start)
            warps = []
            for text in texts:
                tpl = tts_features(text, voice, prior.frontend, floor=prior.lower).to(device, dtype)
                width = (len(text) * cfg.init_seconds_per_char * fc.sample_rate / fc.hop if cfg.init_seconds_per_char > 0
                         else tpl.shape[1])
                warps.append(BlockWarp(tpl, n_frames, width=min(width, n_frames), floor=prior.lower,
                                       knots=cfg.init_warp_knots))

            def start() -> Tensor:
                return torch.stack([w() for w in warps]).clamp(min=prior.lower, max=prior.upper)

            if cfg.init_warp_grid:
                grid_align(warps, lambda: feature_objective(start()), points=cfg.init_warp_grid)
            if cfg.init_warp_iterations > 0:
                optimise([p for w in warps for p in w.parameters()], lambda: feature_objective(start()), optimizer="lbfgs",
                         lr=1.0, iterations=cfg.init_warp_iterations, history_size=50)
            with torch.no_grad():
                feats0 = start()
                return float(feature_objective(feats0)), voice, feats0

        jobs = [lambda v=v: align(v) for v in tts_voices(cfg.init_tts_voice)]
        scored = run_concurrently(jobs, cfg.search_threads)
        return [(c[2], c[1]) for c in sorted(scored, key=lambda c: c[0])]

    def _refine_first_layer(self, feats: Tensor, blocks, obs: Observation, model: nn.Module, prior: SpeechPrior,
                            params: dict[str, Tensor], labels: Tensor, reduction: str) -> Tensor:
        """``refine_first_layer_steps`` of :func:`speechleak.ctc.first_layer_refine` on feats [B, F, T]."""
        from common.functional import functional_losses, reduce_loss

        cfg = self.config
        conv = getattr(model, "conv1", None)
        if not (prior.task == "ctc" and obs.kind == "gradient" and cfg.domain == "features" and prior.lower is not None
                and isinstance(conv, nn.Conv1d) and "conv1.weight" in obs.tensors):
            raise ValueError("refine_first_layer_steps needs a CTC case with a FedSGD gradient, mel features and a model "
                             "whose first layer is a Conv1d named conv1; set refine_first_layer_steps=0 otherwise")
        if blocks is None:
            blocks = [speech_block(f, prior.lower) for f in feats]
        mg = cfg.refine_first_layer_margin

        def error_fn(x: Tensor) -> Tensor:  # ∂loss/∂(conv1 output) at x
            return output_error(conv, lambda xx: reduce_loss(functional_losses(model, prior.loss_fn, params,
                                                                               prior.build_batch(xx, labels)), reduction), x)

        return first_layer_refine(error_fn, feats, obs.tensors["conv1.weight"].to(feats.dtype), kernel=conv.kernel_size[0],
                                  stride=conv.stride[0], padding=int(conv.padding[0]), blocks=[(a - mg, b + mg) for a, b in blocks],
                                  floor=prior.lower, upper=prior.upper, steps=cfg.refine_first_layer_steps,
                                  ridge=cfg.refine_first_layer_ridge)

    # -- main ---------------------------------------------------------------------------
    def reconstruct(self, obs: Observation, model: nn.Module, prior: SpeechPrior, *,
                    generator: torch.Generator) -> Reconstruction[dict]:
        cfg = self.config
        t0 = time.perf_counter()
        b = obs.require_num_examples()
        dtype = torch.float64 if cfg.precision == "float64" else torch.float32
        target = {k: v.detach().to(dtype) for k, v in obs.tensors.items()}
        device = next(iter(target.values())).device
        params = {k: v.detach().to(dtype) for k, v in trainable_params(model).items()}
        names = [k for k in params if k in target]
        weights = layer_weights(cfg.layer_weights, target, names, decay=cfg.layer_decay)
        labels = self._labels(obs, prior, model, b, generator).to(device)
        extras: dict[str, Any] = {}
        if prior.task == "ctc":
            occ = char_occupancy(obs, prior, model, b, generator)
            if occ is not None:
                extras["char_occupancy"] = occ.cpu()
        protocol = obs.protocol
        if obs.kind == "delta" and protocol is None:
            raise ValueError("matching a FedAvg delta needs the local hyper-parameters: grant Capability.LOCAL_HPARAMS")
        reduction = protocol.loss_reduction if protocol else "mean"
        frontend = prior.frontend.to(device)
        f, t = prior.input_shape
        if cfg.domain == "waveform":
            x0 = torch.randn((cfg.restarts, b, prior.num_samples), generator=generator) * 0.05
        else:
            x0 = torch.randn((cfg.restarts, b, f, t), generator=generator) * cfg.init_scale
            fc = prior.frontend.config
            if prior.task == "ctc" and prior.lower is not None and cfg.ctc_targets == "free" and cfg.init_block_seconds > 0:
                x0 = centred_block_init(x0, torch.ones(b), cfg.init_block_seconds * fc.sample_rate / fc.hop, prior.lower)
            elif cfg.init_seconds_per_char > 0 and prior.task == "ctc" and prior.lower is not None:
                x0 = centred_block_init(x0, (labels != 0).sum(-1).cpu(), cfg.init_seconds_per_char * fc.sample_rate / fc.hop,
                                        prior.lower)
        lower = prior.lower if (cfg.domain == "features" and prior.lower is not None and prior.frontend.config.kind == "mel") else None
        # L-BFGS cannot project onto the bounds: it optimises z with x = lower + softplus(4 z) / 4 instead
        bounded = cfg.optimizer == "lbfgs" and lower is not None

        def from_feats(f: Tensor) -> Tensor:  # inverse of to_feats in the feature domain (softplus bound)
            if not bounded:
                return f
            return torch.where(f - lower > 5.0, 4.0 * (f - lower), torch.log(torch.expm1((4.0 * (f - lower)).clamp(min=1e-4)))) / 4.0

        x0 = from_feats(x0)
        x = x0.to(device, dtype).requires_grad_(True)
        align = None  # free-transcript CTC: alignment logits [R, B, T', V]
        if prior.task == "ctc" and cfg.ctc_targets == "free":
            with torch.no_grad():
                t_out = functional_call(model, dict(model.named_parameters()), (torch.zeros((1, f, t), device=device),)).shape[1]
            align = torch.zeros((cfg.restarts, b, t_out, prior.num_classes), device=device, dtype=dtype, requires_grad=True)
        if cfg.domain == "waveform":
            frontend = frontend.to(dtype)

        def to_feats(xr: Tensor) -> Tensor:
            if cfg.domain == "waveform":
                return frontend(xr)
            if bounded:
                return lower + nn.functional.softplus(4.0 * xr) / 4.0
            return xr

        orders = [torch.arange(b)] * protocol.local_epochs if obs.kind == "delta" else None  # shuffle is private
        vmapped = cfg.batched and prior.task != "ctc"  # the native CTC (kit.ctc_loss) has no vmap rule

        def simulated_update(feats: Tensor, ar: Tensor | None = None) -> dict[str, Tensor]:
            batch = prior.build_batch(feats, labels) if ar is None else Batch({"feats": feats, "soft_targets": ar.softmax(-1)}, None)
            m = model_for_thread(model)  # a search thread's own copy (search_threads > 1)
            if obs.kind == "gradient":  # plain autograd where no vmap runs (the same tensors, cheaper)
                grad_fn = functional_gradient if vmapped else graph_gradient
                return grad_fn(m, prior.loss_fn, params, batch, reduction=reduction)
            cur = local_training(m, prior.loss_fn, batch, protocol, params=params, orders=orders,
                                 create_graph=True, functional=True)
            return {k: params[k] - cur[k] for k in params}

        # FedAvg deltas are ~lr * steps times smaller than gradients: rescale the L2 term so the
        # prior weights mean the same for both observation kinds (cosine is scale-free).
        d_scale = 1.0
        if obs.kind == "delta" and cfg.distance == "l2":
            d_scale = 1.0 / delta_scale(protocol) ** 2

        def objective(xr: Tensor, ar: Tensor | None = None) -> Tensor:
            return feature_objective(to_feats(xr), ar)

        def feature_objective(feats: Tensor, ar: Tensor | None = None) -> Tensor:
            d = d_scale * gradient_distance(cfg.distance, simulated_update(feats, ar), target, names=names,
                                            weights=weights, min_norm_sq=1e-30)
            if cfg.tv_weight > 0:
                d = d + cfg.tv_weight * total_variation(feats, dims=(-1, -2))  # anisotropic, over (time, freq)
            if cfg.smooth_weight > 0:
                d = d + cfg.smooth_weight * time_smoothness(feats)
            return d

        def losses(xv: Tensor) -> Tensor:
            if vmapped:
                return vmap(objective)(xv)
            return torch.stack([objective(xv[r], None if align is None else align[r]) for r in range(xv.shape[0])])

        t_warp = None
        why = self._unserved(ctc=prior.task == "ctc", fedsgd=obs.kind == "gradient")  # as check_case, for library callers
        if why:
            raise ValueError(why)
        starts: list = [None]
        if cfg.init_tts_voice:
            t_w = time.perf_counter()
            starts = self._tts_start(labels, prior, feature_objective, device=device, dtype=dtype)[:cfg.init_tts_average]
            extras["init_voice"] = starts[0][1]
            extras["speech_block"] = [speech_block(f0, prior.lower) for f0 in starts[0][0]]
            t_warp = time.perf_counter() - t_w
        lbfgs = cfg.optimizer == "lbfgs"

        def search(start) -> tuple[Tensor, Tensor]:  # (searched variable, its features in the bounds)
            xs = x if len(starts) == 1 else x.detach().clone().requires_grad_(True)  # several searches: one each
            if start is not None:
                with torch.no_grad():
                    xs.copy_(from_feats(start[0]).unsqueeze(0).expand_as(xs))

            def clamp(_: int) -> None:
                with torch.no_grad():
                    if cfg.domain == "waveform":
                        xs.clamp_(-1.0, 1.0)
                    elif lower is not None:
                        xs.clamp_(min=lower, max=prior.upper)

            if cfg.coarse_iterations > 0 and cfg.coarse_time_factor > 1:
                coarse_residual(xs, lambda xv: losses(xv).sum(), factor=cfg.coarse_time_factor, optimizer=cfg.optimizer,
                                lr=1.0 if lbfgs else cfg.lr, iterations=cfg.coarse_iterations, extra=[] if align is None else [align])
            optimise([xs] if align is None else [xs, align], lambda: losses(xs).sum(), optimizer=cfg.optimizer,
                     lr=1.0 if lbfgs else cfg.lr, iterations=cfg.iterations, history_size=50, signed=cfg.signed_grad,
                     schedule=step_decay(cfg.iterations) if cfg.lr_schedule else None, after_step=clamp)
            with torch.no_grad():  # each search's result in the bounds, as a single search would return it
                return xs, (to_feats(xs.detach()) if lower is None else to_feats(xs.detach()).clamp(min=lower, max=prior.upper))

        # one search per start; several (init_tts_average) are averaged in feature space
        searched = run_concurrently([lambda s=s: search(s) for s in starts], cfg.search_threads)
        if len(searched) > 1:
            extras["init_voices_averaged"] = [v for _, v in starts]
            with torch.no_grad():
                x.copy_(from_feats(torch.stack([f for _, f in searched]).mean(0)))
        with torch.no_grad():
            final = losses(x).detach()
        best = int(torch.argmin(torch.nan_to_num(final, nan=float("inf"))).item())
        xb = x.detach()[best]
        if align is not None:
            extras["transcript"] = [greedy_decode(a) for a in align.detach()[best]]
            extras["alignment"] = align.detach()[best].softmax(-1).float().cpu()
        if cfg.refine_first_layer_steps > 0:
            t_r = time.perf_counter()
            xb = from_feats(self._refine_first_layer(to_feats(xb).detach(), extras.get("speech_block"), obs, model, prior,
                                                     params, labels, reduction))
            extras["refine_first_layer_s"] = time.perf_counter() - t_r
        with torch.no_grad():
            feats = to_feats(xb).float()
            if cfg.domain == "features":  # a diverged run (e.g. on heavily noised gradients) must still score
                hi = prior.upper if lower is not None and prior.upper is not None else 1e3
                feats = torch.nan_to_num(feats, nan=0.0, posinf=hi, neginf=lower if lower is not None else -1e3)
                feats = feats.clamp(min=lower, max=hi) if lower is not None else feats.clamp(-1e3, 1e3)
                feats = time_blur(feats, cfg.output_time_blur)  # within the bounds: a convex combination of frames
            if cfg.domain == "waveform":
                frontend = frontend.float()
                xb = xb.float()
        t_feat = time.perf_counter() - t0
        if cfg.domain == "waveform":
            waves = xb
        else:
            waves = frontend.features_to_wave(feats, length=prior.num_samples, n_iter=cfg.griffin_lim_iters,
                                              mel_inversion=cfg.mel_inversion)
            if cfg.refine_iterations > 0:
                waves = refine_waveform(frontend, feats, waves, iterations=cfg.refine_iterations)
        return Reconstruction(
            data={"features": feats.cpu(), "waves": waves.cpu()},
            labels=labels.detach().cpu(),
            stats={"final_grad_loss": float(final[best]), "restarts": float(cfg.restarts),
                   "feature_s": t_feat, "attack_s": time.perf_counter() - t0,
                   **({} if t_warp is None else {"init_warp_s": t_warp})},
            extras=extras,
        )
