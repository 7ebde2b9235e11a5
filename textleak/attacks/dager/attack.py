"""The DAGER attack: spans of the first two blocks, the layer-1 vocabulary scan, and the decoder or
encoder search (see the package docstring for the algorithm and its deviations)."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from common.attack import AttackInfo
from common.threat import Capability
from common.types import Observation, Reconstruction
from textleak.models import max_length

from . import cert_cuts, certify, certify_dec, decoder, deep_rerank, encoder, frontier, frontier_rope, last_token, peel, peel_dec, verify
from .block import PostLNBlock
from .dec_block import ComplementDistance, PreLNDecoderBlock
from .l2_block import Layer2Stage
from .rope_block import RopeDecoderBlock
from .config import (FRONTIER_CLEAR, FRONTIER_CUT, FRONTIER_L1_KEEP, FRONTIER_L1_KEEP_ENC,
                     FRONTIER_FFN, FRONTIER_PRIOR_PENALTY, MAX_LEN, ROOT_QUOTA, NOISE_TAU_CAP, NOISE_TAU_FACTOR, RANK_CUTOFF, DagerConfig)
from .run import Run, declared_sigma
from .scan import scan_l1 as _scan_l1
from .span import (
    DagerPreconditionError,
    LayerInputs,
    Span,
    Tap,
    find_tap,
    first_layer_vectors,
    model_device,
    observed_matrix,
    span_of,
    weight_as_out_in,
)


@dataclass
class _Ctx:
    """What the exact and the ranked searches share (built once per reconstruction)."""
    obs: Observation
    model: nn.Module
    prior: Any
    run: Run
    spans: list[Span]
    li1: LayerInputs
    li2: LayerInputs
    max_len: int
    position_free: bool
    kind: str
    b: int | None
    probe: Tensor  # a 3-token input whose forward finds the taps (``find_tap``, ``frontier.ffn_inputs``)


def _decoder_block(model: nn.Module, li: LayerInputs, l1) -> PreLNDecoderBlock | RopeDecoderBlock | None:
    """The incremental first block at ``li``'s tap (GPT-2 layout, else Llama layout), checked on the first
    candidates of the first four positions (None where it does not reproduce the model)."""
    probe = [l1[p][0][0] for p in range(min(4, len(l1)))]
    return PreLNDecoderBlock.build(model, li, probe) or RopeDecoderBlock.build(model, li, probe)


class DAGER:
    info: ClassVar[AttackInfo] = AttackInfo(
        name="dager",
        modality="text",
        requires=frozenset({Capability.PUBLIC_PRIOR}),
        citation="Petrov et al., DAGER: Exact Gradient Inversion for Large Language Models, NeurIPS 2024",
        prior="text",
    )

    @classmethod
    def default_config(cls) -> DagerConfig:
        return DagerConfig()

    def __init__(self, config: DagerConfig | None = None, *, fast: bool = True, exact_scores: bool = True) -> None:
        """``fast=False`` selects the original (pre-optimisation) code paths: same results, slower;
        kept for ``bench/perf_dager.py`` and the equivalence tests. ``exact_scores=False`` (with ``fast``)
        computes the decoder search's layer-2 test on the incremental first block (``l2_block.py``): the
        same token ids on every batch tried, but layer-2 scores, and so confidences, at float32 round-off
        from the model forward's (about 1e-5 relative), so it is not the default."""
        self.config = config or DagerConfig()
        self.fast = fast
        self.exact_scores = exact_scores

    # ------------------------------------------------------------------------------------------
    def reconstruct(self, obs: Observation, model: nn.Module, prior: Any, *,
                    generator: torch.Generator) -> Reconstruction:
        t0, c0 = time.perf_counter(), time.process_time()
        was_training = model.training
        model.eval()
        self._gmodel: nn.Module | None = None  # the float64 copy of the model (``_f64``), released at the end
        self._residual = False  # attacking a certified residual (certify.py)
        try:
            return self._run(obs, model, prior, t0, c0)
        except DagerPreconditionError as e:
            if self.config.on_failure == "raise":
                raise
            b = obs.num_examples or 1
            return Reconstruction(data=[""] * b, stats={"precondition_failed": 1.0,
                                                        "seconds": time.perf_counter() - t0},
                                  confidence=[0.0] * b, extras={"status": f"precondition failed: {e}"})
        finally:
            model.train(was_training)
            self._gmodel = None

    # ------------------------------------------------------------------------------------------
    def spans(self, obs: Observation, model: nn.Module, probe: Tensor) -> tuple[list[Tap], list[Span], dict]:
        """Taps and spans of blocks 0 and 1, with saturation / degeneracy checks."""
        taps = [find_tap(model, i, probe) for i in (0, 1)]
        self._soft1: Tensor | None = None  # saturated layer 1: the weighted basis of the ranked scan
        sigma = declared_sigma(obs)
        spans, stats = [], {}
        for k, tap in enumerate(taps):
            mat = observed_matrix(tap, obs.tensors)
            edge = math.sqrt(mat.shape[0]) + math.sqrt(mat.shape[1])
            floor = sigma * edge * 1.05 if sigma > 0 else 0.0
            if obs.kind == "delta":  # theta_before - theta_after is rounded at the weights' scale
                w = torch.cat([weight_as_out_in(m, m.weight).detach().double().cpu()
                               for m, n in zip(tap.modules, tap.names) if n in obs.tensors])
                eps = float(torch.finfo(tap.modules[0].weight.dtype).eps)
                floor = max(floor, 2.0 * eps * float(w.pow(2).mean().sqrt()) * edge)
            src = next((obs.tensors[n] for n in tap.names if n in obs.tensors), None)
            eps = float(torch.finfo(src.dtype).eps) if src is not None and src.is_floating_point() else None
            sp = span_of(mat, noise_floor=floor, eps=eps)
            stats[f"rank_l{k + 1}"] = float(sp.rank)
            stats[f"max_rank_l{k + 1}"] = float(sp.max_rank)
            stats[f"edge_l{k + 1}"] = floor
            cutoff = min(RANK_CUTOFF, max(1, sp.max_rank // 10))
            if getattr(self, "_residual", False) and certify.clear_gap(sp):
                cutoff = 0  # a certified residual: its rank is its token count (certify.clear_gap)
            # a smooth spectrum past the width hides its saturation from NumPy's rank rule (SmolLM2 B=32, layer 2)
            hidden = (cutoff > 0 and sigma == 0.0 and obs.kind == "gradient" and sp.rank <= sp.max_rank - cutoff
                      and frontier_rope.gapless_saturated(sp, cutoff))
            if hidden:
                stats[f"gapless_saturated_l{k + 1}"] = 1.0
            if (sp.rank > sp.max_rank - cutoff or hidden) and self.config.rank_limit == "best_effort":
                # past the exact regime: keep the strongest directions, ranked search (frontier.py)
                stats[f"saturated_l{k + 1}"] = 1.0
                full = sp
                drop = max(2, round(FRONTIER_CUT[k] * sp.max_rank))
                keep = max(1, min(sp.rank, sp.max_rank - cutoff) - drop)
                sp = span_of(mat, noise_floor=floor, eps=eps, max_rank=keep)
            elif sp.rank > sp.max_rank - cutoff:  # (refuse: the reference's rule, a hidden saturation included)
                raise DagerPreconditionError(
                    f"rank saturated at layer {k + 1}: the update has numerical rank {sp.rank} of at most "
                    f"{sp.max_rank} (cutoff {cutoff}), so the batch has too many tokens for this width "
                    f"(DAGER needs total tokens < hidden size, or < LoRA rank); use a smaller batch")
            if stats.get(f"saturated_l{k + 1}") and k == 0:
                # the ranked layer-1 scan weighs every direction by s^2 / (s^2 + s_r^2) (s_r: the first
                # dropped one) instead of cutting: tokens along weak directions keep partial credit
                s_all = full.singular_values[: full.rank].double()
                lam = float(full.singular_values[sp.rank])
                self._soft1 = full.basis * (s_all.pow(2) / (s_all.pow(2) + lam * lam)).sqrt()
            spans.append(sp)
            # a noisy span tilts every direction by ~ noise / singular value: widen tau accordingly
            # the basis direction of singular value s is tilted by ~ noise / s, so a true input lies
            # up to ~ noise / s_rank off the measured span; noise = the first discarded singular value
            # (Gaussian noise: ~ sigma (sqrt(m) + sqrt(d)); otherwise float round-off)
            sv = sp.singular_values
            noise = float(sv[sp.rank]) if sp.rank < sv.numel() else floor  # measured, not the bound
            stats[f"tau_scale_l{k + 1}"] = noise / float(sv[sp.rank - 1])
        return taps, spans, stats

    def _taus(self, stats: dict[str, float]) -> tuple[float, float]:
        """tau_1, tau_2: the configured thresholds, widened (``adaptive_tau``) to the span's precision."""
        cfg = self.config
        base = (cfg.l1_span_thresh, cfg.l2_span_thresh)
        if not cfg.adaptive_tau:
            return base
        l1, l2 = (max(t, min(NOISE_TAU_CAP, NOISE_TAU_FACTOR * stats[f"tau_scale_l{k + 1}"]))
                  for k, t in enumerate(base))
        return l1, l2

    def _run(self, obs: Observation, model: nn.Module, prior: Any, t0: float, c0: float) -> Reconstruction:
        dev = model_device(model)
        tok = prior.tokenizer
        vocab = int(model.get_input_embeddings().num_embeddings)
        probe = torch.tensor([[tok.eos_token_id or 0, 1, 2]], device=dev) % vocab
        taps, spans, stats = self.spans(obs, model, probe)
        run = Run(self.config, self._taus(stats), t0=t0, c0=c0, stats=stats, fast=self.fast)
        stats["tau_l1"], stats["tau_l2"] = run.tau
        li1, li2 = LayerInputs(model, taps[0]), LayerInputs(model, taps[1])
        b = obs.num_examples
        # position-free first layer (rotary models): compare a few tokens at positions 0 and 3
        few = torch.arange(vocab)[: min(64, vocab)]
        position_free = bool(torch.allclose(first_layer_vectors(li1, few, 0), first_layer_vectors(li1, few, 3),
                                            rtol=1e-6, atol=1e-7))
        max_len = min(MAX_LEN, max_length(model))
        kind = getattr(prior, "kind", "decoder")
        run.li1 = li1
        if kind == "encoder" and self.config.fast_block:
            run.block = PostLNBlock.build(model, li1, li2, torch.arange(1000, 1024, device=dev).unsqueeze(0) % vocab)
        stats["fast_block"] = float(run.block is not None)
        ctx = _Ctx(obs, model, prior, run, spans, li1, li2, max_len, position_free, kind, b, probe)
        if self._use_frontier(obs, stats):  # (then rounds on the residual of its certified sentences: peel_dec)
            return peel_dec.more(self, ctx, self._frontier(ctx, None))
        try:
            exact = self._exact(ctx)
        except DagerPreconditionError:
            if not (self.config.noise_aware and declared_sigma(obs) > 0):
                raise
            exact = None  # nothing passed the noise-widened exact test: the ranked search alone
        if exact is not None and (not (self.config.noise_aware and declared_sigma(obs) > 0)
                                  or b is None or exact.stats.get("missing", 0.0) == 0.0):
            return exact
        # declared noise and sentences missing: the ranked search fills the missing slots
        return self._frontier(ctx, exact)

    @staticmethod
    def _use_frontier(obs: Observation, stats: dict[str, float]) -> bool:
        """Saturated rank (``rank_limit="best_effort"``) goes to the ranked search directly. Under a
        declared Gaussian noise the exact search runs first (with its noise-widened tau it stays
        exact on small noise: on the 64-wide GPT-2 at B=3 and sigma=1e-5 it recovers every
        sentence while the ranked search gets ROUGE-1 0.86), and the ranked search fills the
        sentences it leaves missing (``noise_aware``)."""
        return bool(stats.get("saturated_l1") or stats.get("saturated_l2"))

    def _exact(self, c: _Ctx) -> Reconstruction:
        """The reference's search (thresholded span tests); its sentences are certified by ``verify.flags``."""
        run, b = c.run, c.b
        l1 = _scan_l1(run, c.li1, c.spans[0], c.max_len, c.position_free)
        obs, model, prior, li2, kind = c.obs, c.model, c.prior, c.li2, c.kind
        position_free, max_len, spans = c.position_free, c.max_len, c.spans
        if kind == "encoder":
            sents, scores = peel.search(run, obs, model, li2, spans[1], l1, prior, b, c.li1.tap,
                                        partial(self._f64, model))
            # as the reference: the lowest layer-2 scores
            order = sorted(range(len(sents)), key=lambda i: scores[i])[: b if b is not None else None]
        else:
            run.ffn_prefilter = self._ffn_prefilter(c, l1) if run.fast else None
            run.stats["ffn_prefilter"] = float(run.ffn_prefilter is not None)
            run.l2_block = (Layer2Stage.build(model, li2, c.probe, l1)
                            if run.fast and not self.exact_scores and l1 else None)
            run.stats["l2_block"] = float(run.l2_block is not None)
            sents, scores = decoder.search(run, li2, spans[1], l1, b, max_len, position_free)
            keep = decoder.select(sents, scores, l1, position_free, b)  # choose before the (costly) completion
            sents, scores = [sents[i] for i in keep], [scores[i] for i in keep]
            if sents:
                sents = last_token.complete_last(obs, model, sents, batched=run.fast)
            order = decoder.select(sents, scores, l1, position_free, b)
        cert = verify.flags(obs, partial(self._f64, model), prior, kind, [sents[i] for i in order],
                            (c.li1.tap, li2.tap), run.stats)  # a check that can fail
        return _finish(run, prior.tokenizer, sents, scores, order, b, certified=cert)

    @staticmethod
    def _ffn_prefilter(c: _Ctx, l1) -> tuple[PreLNDecoderBlock, ComplementDistance] | None:
        """The exact decoder search's prefilter (GPT-2 or Llama layout, noise-free, unsaturated feed-forward input): the
        incremental first block and the distance to the feed-forward input's span; None otherwise."""
        if declared_sigma(c.obs) > 0 or not l1 or not l1[0][0]:
            return None
        ffn = frontier.ffn_inputs(c.obs, c.model, c.probe, 0.0)
        if ffn is None:
            return None
        li, sp = ffn
        cutoff = min(RANK_CUTOFF, max(1, sp.max_rank // 10))
        if sp.rank > sp.max_rank - cutoff - max(2, round(FRONTIER_CUT[1] * sp.max_rank)) - 1:
            return None  # saturated (ffn_inputs cut it): not an exact test
        blk = _decoder_block(c.model, li, l1)
        return (blk, ComplementDistance(sp.basis)) if blk is not None else None

    def _certifier(self, c: _Ctx) -> certify.Certifier | None:
        """The layer-1 certificate of the ranked encoder search (``certify.applies``, ``DagerConfig.certify``)."""
        if not (self.config.certify and certify.applies(c.obs, c.prior, c.kind, c.run.stats)):
            return None
        cert = certify.Certifier(c.obs, self._f64(c.model), c.prior, (c.li1.tap, c.li2.tap))
        return cert if cert.usable else None

    def _f64(self, model: nn.Module) -> nn.Module:
        """The float64 copy of the model for exact per-example gradients (peeling, certificates), made once per
        reconstruction when first needed (kept for the residual's runs)."""
        if self._gmodel is None:
            self._gmodel = copy.deepcopy(model).double().eval()
        return self._gmodel

    def _again(self, obs: Observation, c: _Ctx) -> Reconstruction | None:
        """The whole attack on a certified residual, within the same budget (None: a precondition failure)."""
        self._residual = True  # (its layer-2 span is exact at a clear gap: certify.clear_gap)
        try:
            return self._run(obs, c.model, c.prior, c.run.t0, c.run.c0)
        except DagerPreconditionError:
            return None

    def _frontier(self, c: _Ctx, exact: Reconstruction | None) -> Reconstruction:
        """The ranked search past the exact regime (``frontier.py``); with ``exact`` (the exact search's
        result under declared noise), its sentences are kept and the ranked search fills the rest."""
        run, stats, b = c.run, c.run.stats, c.b
        stats["frontier"] = 1.0
        run.ranked = True
        run.prior_penalty = FRONTIER_PRIOR_PENALTY
        tol = [frontier.tolerance(sp, stats[f"edge_l{k + 1}"]) for k, sp in enumerate(c.spans)]
        stats["tol_l1"], stats["tol_l2"] = tol
        n_pos = frontier.used_positions(c.obs, c.model, c.max_len)
        stats["used_positions"] = float(n_pos or 0)
        keep = FRONTIER_L1_KEEP_ENC if c.kind == "encoder" else FRONTIER_L1_KEEP
        t_scan = time.perf_counter()
        # decoders with both layers saturated: every position's candidates are the batch's token set (read
        # from the tied embedding's update), the layer-1 ranking dropped (it held the true token within its 64
        # nearest at 37 % of the pairs of a GPT-2 B=64 batch)
        tokset = (frontier.batch_token_set(c.obs, c.model)
                  if c.kind != "encoder" and stats.get("saturated_l1") and n_pos else None)
        stats["token_set"] = float(len(tokset)) if tokset else 0.0
        if tokset and n_pos:
            l1 = [(tokset, torch.zeros(len(tokset), dtype=torch.float64))] * n_pos
            firsts = frontier.first_tokens(c.obs, c.model, tokset, b or 8)
            if firsts:
                l1[0] = (firsts, torch.zeros(len(firsts), dtype=torch.float64))
            stats["first_tokens"] = float(len(firsts or ()))
        elif stats.get("saturated_l1") or declared_sigma(c.obs) > 0:
            soft = getattr(self, "_soft1", None) if stats.get("saturated_l1") else None
            l1 = frontier.ranked_scan(run, c.li1, c.spans[0], c.max_len, c.position_free, n_pos, keep, soft=soft)
        else:  # only layer 2 is saturated: layer 1's exact test still holds (its candidate lists are exact)
            l1 = _scan_l1(run, c.li1, c.spans[0], c.max_len, c.position_free)
        stats["scan_seconds"] = time.perf_counter() - t_scan
        if not l1:
            raise DagerPreconditionError("the ranked layer-1 scan found no position")
        if c.kind == "encoder":
            run.tau = (tol[0], 10.0 * FRONTIER_CLEAR * tol[1])  # "clear" = max distance <= FRONTIER_CLEAR tol
            cert = self._certifier(c)  # layer 1 certifies the ranked search's sentences (certify.py)
            sents, scores = encoder.search(run, c.obs, c.model, c.li2, c.spans[1], l1, c.prior, b,  # (+ cuts)
                                           on_take=cert_cuts.hook(cert, c.li2, c.spans[1], l1, stats))
            order = sorted(range(len(sents)), key=lambda i: scores[i])
            stats["cert_tested"] = float(cert.tested) if cert is not None else 0.0
            if cert is not None and cert.peeled:  # peeled: the residual is attacked from the start
                rest = [sents[i] for i in order if all(sents[i] != s for s, _ in cert.peeled)]
                again = lambda o: None if run.over_budget() else self._again(o, c)  # noqa: E731
                return certify.resume(cert, again, c.prior.tokenizer, stats, rest)
        else:
            # the first block's feed-forward input: as discriminative as layer 2 on true prefixes (GPT-2
            # B=32: the true extension ranks first at 98 % of steps on either) at about half the cost
            # only where layer 1's exact lists hold (layer 2 alone saturated, no noise): with layer 1 saturated
            # too (the 64-wide GPT-2 at B=8) it ranked worse than layer 2 (ROUGE-1 0.29 vs 0.36)
            # (with the token set, every candidate is a batch token and the feed-forward input, evaluated on
            # the incremental block, is the test that is cheap enough for all of them)
            use = FRONTIER_FFN and (not stats.get("saturated_l1") or tokset) and declared_sigma(c.obs) == 0.0
            ffn = frontier.ffn_inputs(c.obs, c.model, c.probe, 0.0) if use else None
            stats["ffn_test"] = float(ffn is not None)
            li_t, span_t = ffn if ffn is not None else (c.li2, c.spans[1])
            blk = None
            if ffn is not None and run.fast:
                blk = _decoder_block(c.model, li_t, l1)
            rot = None  # rotary (position-free) block: repeats banned, the span and thresholds of frontier_rope
            if isinstance(blk, RopeDecoderBlock) and c.position_free and not tokset:
                blk, span_t, rot = frontier_rope.adapt(c.obs, li_t, span_t, blk, stats)
            stats["fast_decoder_block"] = float(blk is not None)
            rerank, thr = (deep_rerank.token_set_rerank(c.obs, c.model, c.probe, (c.li2, c.spans[1]))
                           if tokset and blk is not None else (None, rot))
            sents, scores = frontier.search_decoder(run, li_t, span_t, l1, b, block=blk,
                                                    root_quota=ROOT_QUOTA if stats.get("first_tokens") else 0,
                                                    rerank=rerank, thresholds=thr,
                                                    acts=frontier.activation_span(c.obs, c.model) if tokset and blk is not None else None)
            # with the token set the set cover counts batch tokens (each true sentence brings its own ones)
            cover_free = c.position_free or bool(tokset)
            keep_i = decoder.select(sents, scores, l1, cover_free, b)
            sents, scores = [sents[i] for i in keep_i], [scores[i] for i in keep_i]
            if sents:
                sents = last_token.complete_last(c.obs, c.model, sents, batched=run.fast)
            order = decoder.select(sents, scores, l1, cover_free, b)
        run.tau = (tol[0], tol[1])  # confidences relative to the tolerance
        prev: list[list[int]] = []
        if exact is not None:  # keep the exact search's sentences, fill the missing slots
            prev = [list(t) for t in exact.extras["token_ids"] if t]
            stats["exact_found"] = float(len(prev))
        seen = {tuple(s) for s in prev}
        order = [i for i in order if tuple(sents[i]) not in seen]
        if b is not None:
            order = order[: max(0, b - len(prev))]
        all_sents = prev + [sents[i] for i in order]
        all_scores = [0.0] * len(prev) + [scores[i] for i in order]
        return _finish(run, c.prior.tokenizer, all_sents, all_scores, list(range(len(all_sents))), b,
                       certified=certify_dec.flags(c, l1, all_sents) if c.kind != "encoder" else [False] * len(all_sents))


def _finish(run: Run, tok: Any, sents: list[list[int]], scores: list[float], order: list[int],
            b: int | None, *, certified: list[bool]) -> Reconstruction:
    """The chosen sentences (padded to B with empty ones), decoded, with confidences, the
    per-sentence ``certified`` flags (``extras``; their fraction in ``stats["certified"]``) and stats."""
    stats = run.stats
    chosen = [sents[i] for i in order]
    conf = [float(math.exp(-scores[i] / max(run.tau[1], 1e-12))) for i in order]
    cert = list(certified[: len(chosen)])
    stats["found"] = float(len(sents))
    stats.pop("missing", None)  # (an exact search before the ranked one may have set it)
    if b is not None and len(chosen) < b:
        stats["missing"] = float(b - len(chosen))
        conf += [0.0] * (b - len(chosen))
        cert += [False] * (b - len(chosen))
        chosen += [[] for _ in range(b - len(chosen))]
    stats["certified"] = sum(cert) / len(cert) if cert else 0.0
    texts = [tok.decode([int(t) for t in s], skip_special_tokens=True).strip() for s in chosen]
    stats["seconds"] = time.perf_counter() - run.t0
    stats["precondition_failed"] = 0.0
    stats["timed_out"] = float(run.timed_out)
    return Reconstruction(data=texts, stats=stats, confidence=conf,
                          extras={"token_ids": chosen, "status": "ok", "certified": cert})
