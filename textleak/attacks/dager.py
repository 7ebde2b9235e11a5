"""DAGER: exact gradient inversion of text batches via low-rank attention-input spans.

Petrov, Dimitrov, Baader, Müller, Vechev. "DAGER: Exact Gradient Inversion for Large Language
Models." NeurIPS 2024 (arXiv 2405.15586). Reference code: ``eth-sri/dager`` (read as the fork
``prithagupta/dager-gradient-inversion`` @ 5f8e306: ``attack.py``, ``utils/functional.py``
``check_if_in_span`` / ``get_layer_decomp`` / ``filter_l1`` / ``filter_decoder`` / ``filter_encoder``).

Algorithm (as the reference):

1. The update of the first block's attention input projections (Q/K/V, GPT-2 ``c_attn``, or
   a LoRA ``lora_A``) is ``sum_i g_i x_i^T``: its row space is the span of the layer inputs
   x_i when the token count is below the width. We take an orthonormal basis (SVD; rank by
   NumPy's ``matrix_rank`` rule or ``rank_tol``) for block 1 (layer 1) and block 2 (layer 2).
2. Layer-1 filter: every vocabulary token at every position is pushed through the model's own
   embedding / position / (pre-)LayerNorm code up to the first projection (a forward pre-hook
   stops the forward there) and kept when its span distance is below ``l1_span_thresh``.
   Rotary models (Llama) have position-free first-layer inputs: detected numerically, scanned once.
3. Decoders: sequences grow position by position; each prefix is extended by each layer-1
   candidate and the layer-2 input of the new position is span-checked (``l2_span_thresh``).
   All passing extensions are kept (capped at ``max_prefixes``); a prefix with no passing
   extension is a finished sentence. Encoders: for every sentence length (positions where the
   separator passes layer 1), combinations of per-position candidates are checked on layer 2
   (all positions' layer-2 inputs must lie in the span): exhaustively up to
   ``encoder_exhaustive_max`` combinations, by coordinate descent with restarts above that.

Deviations from the reference, all deliberate:

* Layers are found by structure (first ``ModuleList`` of ``num_hidden_layers`` blocks, the
  linear modules that read the same tensor as the block's first projection), not by
  hard-coded parameter indices (``layer_ids = range(4,137,12)`` etc. in the reference).
* Q, K and V updates are stacked before the SVD (the reference uses Q only for Llama and the
  fused QKV for GPT-2); they share the same row space, so this only adds signal.
* Extensions of one prefix are evaluated in a single forward pass with a custom 4-D attention
  mask (each candidate sees the prefix and itself, all at the same position id) instead of one
  sequence per candidate; the result is identical (tested) and costs L+K tokens instead of K(L+1).
* Under a next-token loss the last token of each sentence contributes no gradient to any
  attention input (its output predicts padding), so no span method can see it; with
  ``complete_last_token`` we append the token whose output-embedding gradient row best matches
  the final hidden state of the recovered prefix (an addition; the reference leaves it out).
* The encoder search uses coordinate descent with restarts once the combination count exceeds
  ``encoder_exhaustive_max`` (the reference's exhaustive search with ``maxB``/``non-overlap``
  heuristics is infeasible on 2 CPU cores).
* Post-LN (BERT-family) encoders evaluate block 1 incrementally in the beam and the repairs
  (``fast_block``, ``textleak/dager_block.py``; same scores as the model forward), and each beam
  fully scores only its ``encoder_preselect`` candidates nearest to the span at the new position
  (a speed heuristic; 0 scores every extension).
* Encoders under FedSGD peel (``peel``, an addition): once sentences are clearly recovered, their
  exact per-example gradients (label: the class whose removal drops the layer-1 rank) are
  subtracted from the update and the remaining sentences are searched with the embedding prior
  of the residual (the spans stay those of the observed update; see ``_encoder_peeling``).
* When Gaussian noise is a declared defense (defenses are public protocol facts), its sigma sets
  a singular-value noise floor ``sigma * (sqrt(m) + sqrt(d))`` for the rank, and the thresholds are
  widened to ``noise_tau_factor * floor / s_rank`` (capped at ``noise_tau_cap``); FedAvg deltas get
  the float rounding floor of ``theta_before - theta_after``. Without noise the floor is the first
  discarded singular value (float32 round-off), so tau_1/tau_2 never drop below the precision the
  observed spectrum allows (the reference instead tunes ``rank_tol`` per batch size). The reference instead filters
  outliers with ``p1_std_thrs`` / ``l2_std_thrs``.
* Precondition failures (rank saturated: token count too close to the width; all-zero update;
  projections not observed) raise :class:`DagerPreconditionError` (``on_failure="raise"``) or
  return empty sentences with ``stats["precondition_failed"] = 1`` and the reason in
  ``extras["status"]`` (``"report"``, the default, so that leaderboards score such trials as 0,
  as the reference README does for ``batch_tokens > embedding_dim``).
"""
from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from common.attack import AttackInfo
from common.threat import Capability
from common.types import Batch, Observation, Reconstruction

from ..dager_block import PostLNBlock
from ..dager_span import (
    DagerPreconditionError,
    LayerInputs,
    Span,
    decoder_last_inputs,
    find_tap,
    first_layer_vectors,
    model_device,
    observed_matrix,
    span_distance,
    span_of,
    transformer_blocks,
    weight_as_out_in,
)


@dataclass(frozen=True)
class DagerConfig:
    """Defaults follow the reference's ``args_factory.py`` where it has one."""
    RANGES: ClassVar[dict[str, str]] = {  # checked by common.attack.validate_config
        "rank_tol": ">0", "l1_span_thresh": ">0", "l2_span_thresh": ">0", "max_len": ">=1",
        "encoder_exhaustive_max": ">=1", "encoder_beam": ">=1", "encoder_refine": ">=1",
        "prior_concentration": "[0,1]", "prior_relative": "[0,1]", "last_token_candidates": ">=1",
        "max_run": ">=1", "noise_tau_cap": ">0", "chunk": ">=1"}

    rank_tol: float | None = None  # None: NumPy matrix_rank rule (the reference's default)
    rank_cutoff: int = 20  # saturated when rank > max_rank - rank_cutoff (reference: d - 20)
    l1_span_thresh: float = 1e-5  # tau_1 (reference default)
    l2_span_thresh: float = 1e-3  # tau_2 (reference default)
    max_len: int = 128  # positions scanned at most
    max_prefixes: int = 0  # decoder prefixes kept per step; 0 = 4 * B + 16
    max_candidates: int = 0  # layer-1 candidates kept per position; 0 = all under tau_1
    encoder_exhaustive_max: int = 16384
    encoder_beam: int = 16  # encoders, above encoder_exhaustive_max: left-to-right beam with a soft suffix
    encoder_refine: int = 3  # beam passes per length: a soft suffix, then the previous pass's best sentence
    fast_block: bool = True  # post-LN encoders: evaluate block 1 incrementally (textleak/dager_block.py)
    encoder_preselect: int = 4  # with fast_block: per beam, fully score only the candidates best at the new position; 0: all
    prior_penalty: float = 1e-3  # beam score += this * sum over the prefix of -log(prior weight); 0: off
    prior_sharpness: float = 4.0  # soft-suffix weight of a candidate: max(relative coefficient, 0) ** this
    embedding_prior: bool = True  # encoders: rank candidates by the word/position-embedding update (see _embedding_prior)
    prior_concentration: float = 0.7  # a token whose coefficient peaks below this is treated as repeated (kept everywhere)
    prior_relative: float = 0.3  # otherwise kept where its coefficient is >= this fraction of its peak
    prior_noise_factor: float = 3.0  # under declared Gaussian noise: batch rows have norm > this * sigma * sqrt(d)
    complete_last_token: bool = True  # decoders under next-token loss (see module docstring)
    last_token_candidates: int = 6  # candidates re-ranked by their exact gradient term
    max_run: int = 4  # rotary decoders: longest run of one token allowed at the start (see _decoder)
    noise_floor: bool = True  # use a declared Gaussian-noise sigma as a singular-value floor
    adaptive_tau: bool = True  # raise tau_1/tau_2 to the precision the spectrum allows (see spans)
    noise_tau_factor: float = 3.0  # tau >= factor * noise / smallest kept singular value
    noise_tau_cap: float = 0.05
    trim_tails: bool = True  # decoders with a widened tau_2: end a path at a distance jump (see _decoder)
    gap_ratio: float = 30.0  # cut a widened tau at a distance gap this large (layer-1 scan, decoder steps; 0: off)  # never widen beyond this (the reference's loosest tau, lora.sh)
    on_failure: Literal["report", "raise"] = "report"
    chunk: int = 4096  # tokens per forward chunk in the vocabulary scan
    peel: bool = True  # encoders, FedSGD: subtract each clearly recovered sentence's exact gradient (see _encoder_peeling)
    time_budget_s: float = 0.0  # > 0: stop the sequence search after this many seconds (stats timed_out)


@dataclass
class _Path:
    ids: list[int]
    score: float  # max layer-2 distance along the path


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

    def __init__(self, config: DagerConfig | None = None) -> None:
        self.config = config or DagerConfig()

    # ------------------------------------------------------------------------------------------
    def reconstruct(self, obs: Observation, model: nn.Module, prior: Any, *,
                    generator: torch.Generator) -> Reconstruction:
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            return self._run(obs, model, prior, generator, t0)
        except DagerPreconditionError as e:
            if self.config.on_failure == "raise":
                raise
            b = obs.num_examples or 1
            return Reconstruction(data=[""] * b, stats={"precondition_failed": 1.0,
                                                        "seconds": time.perf_counter() - t0},
                                  confidence=[0.0] * b, extras={"status": f"precondition failed: {e}"})
        finally:
            model.train(was_training)

    # ------------------------------------------------------------------------------------------
    def spans(self, obs: Observation, model: nn.Module, probe: Tensor) -> tuple[list, list[Span], dict]:
        """Taps and spans of blocks 0 and 1, with saturation / degeneracy checks."""
        cfg = self.config
        taps = [find_tap(model, i, probe) for i in (0, 1)]
        sigma = self._declared_sigma(obs) if cfg.noise_floor else 0.0
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
            sp = span_of(mat, rank_tol=cfg.rank_tol, noise_floor=floor, eps=eps)
            stats[f"rank_l{k + 1}"] = float(sp.rank)
            stats[f"max_rank_l{k + 1}"] = float(sp.max_rank)
            cutoff = min(cfg.rank_cutoff, max(1, sp.max_rank // 10))
            if sp.rank > sp.max_rank - cutoff:
                raise DagerPreconditionError(
                    f"rank saturated at layer {k + 1}: the update has numerical rank {sp.rank} of at most "
                    f"{sp.max_rank} (cutoff {cutoff}), so the batch has too many tokens for this width "
                    f"(DAGER needs total tokens < hidden size, or < LoRA rank); use a smaller batch")
            spans.append(sp)
            # a noisy span tilts every direction by ~ noise / singular value: widen tau accordingly
            # the basis direction of singular value s is tilted by ~ noise / s, so a true input lies
            # up to ~ noise / s_rank off the measured span; noise = the first discarded singular value
            # (Gaussian noise: ~ sigma (sqrt(m) + sqrt(d)); otherwise float round-off)
            sv = sp.singular_values
            noise = float(sv[sp.rank]) if sp.rank < sv.numel() else floor  # measured, not the bound
            stats[f"tau_scale_l{k + 1}"] = noise / float(sv[sp.rank - 1])
        return taps, spans, stats

    def _scan_l1(self, li1: LayerInputs, span1: Span, max_len: int, position_free: bool):
        """Layer-1 filter: per position, the vocabulary tokens whose first-layer input lies in the span."""
        cfg = self.config
        stats = self._stats
        vocab = int(li1.model.get_input_embeddings().num_embeddings)
        all_ids = torch.arange(vocab)
        l1: list[tuple[list[int], Tensor]] = []
        t_scan = time.perf_counter()
        for p in range(max_len):
            if position_free and p > 0:
                l1.append(l1[0])
                continue
            d = span_distance(span1.basis, first_layer_vectors(li1, all_ids, p, chunk=cfg.chunk))
            keep = torch.nonzero(d < self._gap_threshold(d, 0)).flatten()
            keep = keep[d[keep].argsort()]
            if cfg.max_candidates > 0:
                keep = keep[: cfg.max_candidates]
            if keep.numel() == 0:
                break
            l1.append((keep.tolist(), d[keep]))
        stats["scan_seconds"] = time.perf_counter() - t_scan
        stats["position_free"] = float(position_free)
        stats["l1_candidates"] = float(sum(len(c) for c, _ in l1[:1] if position_free) if position_free
                                       else sum(len(c) for c, _ in l1))
        if not l1:
            raise DagerPreconditionError("no vocabulary token lies in the layer-1 span (threshold too strict, "
                                         "or the update is too noisy); raise l1_span_thresh")
        return l1

    def _over_budget(self) -> bool:
        if self.config.time_budget_s > 0 and time.perf_counter() - self._t0 > self.config.time_budget_s:
            self._timed_out = True
            return True
        return False

    def _run(self, obs, model, prior, generator, t0) -> Reconstruction:
        cfg = self.config
        self._t0, self._timed_out = t0, False
        dev = model_device(model)
        tok = prior.tokenizer
        vocab = int(model.get_input_embeddings().num_embeddings)
        probe = torch.tensor([[tok.eos_token_id or 0, 1, 2]], device=dev) % vocab
        taps, spans, stats = self.spans(obs, model, probe)
        self._tau = [max(t, min(cfg.noise_tau_cap, cfg.noise_tau_factor * stats[f"tau_scale_l{k + 1}"]))
                     if cfg.adaptive_tau else t for k, t in enumerate((cfg.l1_span_thresh, cfg.l2_span_thresh))]
        stats["tau_l1"], stats["tau_l2"] = self._tau
        self._stats = stats
        li1, li2 = LayerInputs(model, taps[0]), LayerInputs(model, taps[1])
        b = obs.num_examples
        all_ids = torch.arange(vocab)
        # position-free first layer (rotary models): compare a few tokens at positions 0 and 3
        few = all_ids[: min(64, vocab)]
        position_free = bool(torch.allclose(first_layer_vectors(li1, few, 0), first_layer_vectors(li1, few, 3),
                                            rtol=1e-6, atol=1e-7))
        max_len = min(cfg.max_len, _max_positions(model))
        l1 = self._scan_l1(li1, spans[0], max_len, position_free)
        kind = getattr(prior, "kind", "decoder")
        self._li1, self._block = li1, None
        if kind == "encoder" and cfg.fast_block:
            self._block = PostLNBlock.build(model, li1, li2, torch.arange(1000, 1024, device=dev).unsqueeze(0) % vocab)
        stats["fast_block"] = float(self._block is not None)
        if kind == "encoder":
            sents, scores = self._encoder_peeling(obs, model, li2, spans[1], l1, prior, b, taps[0])
        else:
            sents, scores = self._decoder(li2, spans[1], l1, b, max_len, position_free)
            keep = _select(sents, scores, l1, position_free, b)  # choose before the (costly) completion
            sents, scores = [sents[i] for i in keep], [scores[i] for i in keep]
            if cfg.complete_last_token and sents:
                sents = self._complete_last(obs, model, sents)
        if kind == "encoder":  # as the reference: the lowest layer-2 scores
            order = sorted(range(len(sents)), key=lambda i: scores[i])[: b if b is not None else None]
        else:
            order = _select(sents, scores, l1, position_free, b)
        chosen = [sents[i] for i in order]
        conf = [float(math.exp(-scores[i] / max(self._tau[1], 1e-12))) for i in order]
        stats["found"] = float(len(sents))
        if b is not None and len(chosen) < b:
            stats["missing"] = float(b - len(chosen))
            conf += [0.0] * (b - len(chosen))
            chosen += [[] for _ in range(b - len(chosen))]
        texts = [tok.decode([int(t) for t in s], skip_special_tokens=True).strip() for s in chosen]
        stats["seconds"] = time.perf_counter() - t0
        stats["precondition_failed"] = 0.0
        stats["timed_out"] = float(self._timed_out)
        return Reconstruction(data=texts, stats=stats, confidence=conf,
                              extras={"token_ids": chosen, "status": "ok"})

    # -- decoders --------------------------------------------------------------------------------
    def _decoder(self, li2: LayerInputs, span2: Span, l1, b: int | None, max_len: int, position_free: bool):
        """Greedy breadth extension (the reference's ``filter_decoder``).

        Rotary models without a BOS token have one degenerate case: a sequence made of a single
        repeated token has the same layer-2 input at every position (attention averages identical
        values), so ``t``, ``t t``, ``t t t`` ... all pass. Runs of one token at the start are
        therefore capped at ``max_run``.

        With a widened tau_2 (``adaptive_tau``), false extensions of frequent tokens can continue
        past a sentence's true end: on SmolLM2 at B=8/16 the true tokens' layer-2 distances stay
        under ~1e-5 while such a tail's are far above. ``trim_tails`` (a deviation) therefore
        rejects an extension whose distance exceeds both the reference tau_2 and ``gap_ratio``
        times the largest distance along the path so far.
        """
        cfg = self.config
        cap = cfg.max_prefixes or (4 * (b or 8) + 16)
        live = [_Path([], 0.0)]
        finished: list[_Path] = []
        for p in range(max_len):
            if not live:
                break
            if self._over_budget():
                finished.extend(x for x in live if x.ids)
                live = []
                break
            cands = l1[p][0] if p < len(l1) else []
            if not cands:
                finished.extend(x for x in live if x.ids)
                live = []
                break
            xs = decoder_last_inputs(li2, [x.ids for x in live], [cands] * len(live))
            ds = [span_distance(span2.basis, x) for x in xs]
            thr = self._gap_threshold(torch.cat(ds), 1)
            nxt: list[_Path] = []
            for path, d in zip(live, ds):
                ok = torch.nonzero(d < thr).flatten().tolist()
                if path.ids:
                    lim = self._tail_limit(path.score)
                    ok = [j for j in ok if float(d[j]) <= lim]
                if not ok:
                    if path.ids:
                        finished.append(path)
                    continue
                for j in ok:
                    c = cands[j]
                    if (position_free and len(path.ids) >= cfg.max_run
                            and all(t == c for t in path.ids)):
                        continue
                    nxt.append(_Path(path.ids + [cands[j]], max(path.score, float(d[j]))))
            nxt.sort(key=lambda x: x.score)
            live = nxt[:cap]
        finished.extend(x for x in live if x.ids)
        return [f.ids for f in finished], [f.score for f in finished]

    def _tail_limit(self, score: float) -> float:
        """Largest layer-2 distance an extension of a path with max distance ``score`` may have
        (``trim_tails``): a run-on tail is above the reference tau_2 and ``gap_ratio`` times above
        the path so far. Unlimited unless tau_2 was widened."""
        cfg = self.config
        if not cfg.trim_tails or cfg.gap_ratio <= 0 or self._tau[1] <= cfg.l2_span_thresh:
            return math.inf
        return max(cfg.l2_span_thresh, cfg.gap_ratio * score)

    def _gap_threshold(self, d: Tensor, layer: int = 1) -> float:
        """The threshold of one layer-1 position scan (``layer`` 0) or decoder step (``layer`` 1):
        the widened tau, lowered to a clear gap in the step's sorted distances.

        The spectrum-adaptive tau_2 is a worst case (a token whose input lies along the weakest
        kept direction); true inputs usually sit orders of magnitude lower. Between the
        reference tau (``l1_span_thresh`` / ``l2_span_thresh``) and the widened one, we cut at the
        highest ratio gap of at least ``gap_ratio`` between consecutive sorted distances.
        Distances under the reference tau are always accepted.
        """
        cfg = self.config
        tau, base = self._tau[layer], (cfg.l1_span_thresh, cfg.l2_span_thresh)[layer]
        if cfg.gap_ratio <= 0 or tau <= base:
            return tau
        v = torch.sort(d[d < tau]).values
        if v.numel() < 2:
            return tau
        lo, hi = v[:-1].clamp_min(1e-12), v[1:]
        ratio = torch.where(hi > base, hi / lo, torch.zeros_like(hi))
        big = torch.nonzero(ratio >= cfg.gap_ratio).flatten()
        if big.numel():  # the highest clear gap (keeps every lower cluster)
            k = int(big[-1])
            return max(base, math.sqrt(float(lo[k]) * float(hi[k])))
        return tau

    def _complete_last(self, obs: Observation, model: nn.Module, sents: list[list[int]]) -> list[list[int]]:
        """Append the last token, unobservable in attention-input spans under a next-token loss.

        The output-embedding update holds ``-e_y h^T`` (scaled) for the position predicting
        target ``y``. For a FedSGD gradient we subtract the part the recovered prefixes explain
        (every known target, plus the softmax term ``p h^T`` of the last predicting position,
        computed with autograd under the kit's per-sequence-mean next-token loss), so the residual
        is supported on the unknown targets' rows only; each sentence takes the row most
        anti-aligned with its final hidden state. For FedAvg deltas the raw update is used.
        """
        out_emb = getattr(model, "get_output_embeddings", lambda: None)()
        if out_emb is None or not hasattr(out_emb, "weight"):
            return sents
        w = out_emb.weight
        name = next((n for n, p in model.named_parameters() if p is w), None)
        if name is None or name not in obs.tensors:
            return sents
        g = obs.tensors[name].detach().to(torch.float64).cpu()  # [V, d]
        dev = model_device(model)
        n = len(sents)
        m = max(len(s) for s in sents)
        ids = torch.zeros(n, m, dtype=torch.long)
        mask = torch.zeros(n, m, dtype=torch.long)
        for i, s in enumerate(sents):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        hid: list[Tensor] = []

        def hook(_m, args):
            hid.append(args[0])

        h = out_emb.register_forward_pre_hook(hook)
        try:
            if obs.kind == "gradient" and w.requires_grad:
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
                lp = logits.log_softmax(-1)
                lens = mask.sum(1)
                tgt = lp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # [n, m-1]
                known = (mask[:, 1:] > 0).to(lp.dtype)
                loss_b = -(tgt * known).sum(1)  # known targets
                last = logits[torch.arange(n), lens - 1].logsumexp(-1)  # softmax term of the last position
                loss_b = (loss_b + last) / lens.to(lp.dtype)  # the true sentence has len+1 tokens -> len targets
                proto = obs.protocol
                denom = float(obs.num_examples or n) if (proto is None or proto.loss_reduction == "mean") else 1.0
                (gp,) = torch.autograd.grad(loss_b.sum() / denom, [w])
                g = g - gp.detach().to(torch.float64).cpu()
            else:
                denom = 1.0
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=mask)
        finally:
            h.remove()
        hs = hid[0].detach().to(torch.float64).cpu()
        gn = g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
        k = self.config.last_token_candidates
        by_norm = g.norm(dim=1).topk(min(k, g.shape[0])).indices.tolist()  # the residual's heaviest rows
        cands, terms = [], []
        exact = obs.kind == "gradient" and w.requires_grad
        for i, s in enumerate(sents):
            v = hs[i, len(s) - 1]
            v = v / v.norm().clamp_min(1e-30)
            cand = (-(gn @ v)).topk(min(k, gn.shape[0])).indices.tolist()
            cand = cand + [c for c in by_norm if c not in cand]
            if exact and len(cand) > 1:
                cand, rows = self._rank_last(model, w, s, cand, g, denom, dev)
                terms.append([{r: t / (denom * len(s)) for r, t in rr.items()} for rr in rows])
            cands.append(cand)
        if not exact or not terms:
            return [s + [c[0]] for s, c in zip(sents, cands)]
        # joint fit: the residual is the sum of every sentence's last-target term; choose the
        # combination that explains it best (coordinate descent from the per-sentence cosine order),
        # so that a sentence does not take a row that another sentence's term explains
        choice = [0] * len(sents)
        resid = g.clone()
        for i, rr in enumerate(terms):
            for r, t in rr[0].items():
                resid[r] -= t
        def swap_gain(i: int, j: int) -> tuple[float, int, int] | None:
            """Residual change when sentences i and j exchange their last tokens (a pair move)."""
            ci, cj = cands[i][choice[i]], cands[j][choice[j]]
            if ci == cj or cj not in cands[i] or ci not in cands[j]:
                return None
            ni, nj = cands[i].index(cj), cands[j].index(ci)
            old_t = [terms[i][choice[i]], terms[j][choice[j]]]
            new_t = [terms[i][ni], terms[j][nj]]
            rows = set().union(*old_t, *new_t)
            delta = 0.0
            for r in rows:
                e = resid[r]
                new = e + sum(t.get(r, 0.0) for t in old_t) - sum(t.get(r, 0.0) for t in new_t)
                delta += float(new @ new) - float(e @ e)
            return delta, ni, nj

        for _ in range(4):
            moved = False
            for i in range(len(terms)):
                for j in range(i + 1, len(terms)):
                    got = swap_gain(i, j)
                    if got is not None and got[0] < -1e-30:
                        for k, n in ((i, got[1]), (j, got[2])):
                            for r, t in terms[k][choice[k]].items():
                                resid[r] += t
                            for r, t in terms[k][n].items():
                                resid[r] -= t
                            choice[k] = n
                        moved = True
            for i, rr in enumerate(terms):
                cur = rr[choice[i]]
                best_j, best_delta = choice[i], 0.0
                for j, alt in enumerate(rr):
                    if j == choice[i]:
                        continue
                    delta = 0.0
                    for r in set(cur) | set(alt):
                        e = resid[r]
                        new = e + cur.get(r, 0.0) - alt.get(r, 0.0)
                        delta += float(new @ new) - float(e @ e)
                    if delta < best_delta - 1e-30:
                        best_j, best_delta = j, delta
                if best_j != choice[i]:
                    alt = rr[best_j]
                    for r, t in cur.items():
                        resid[r] += t
                    for r, t in alt.items():
                        resid[r] -= t
                    choice[i], moved = best_j, True
            if not moved:
                break
        return [s + [c[j]] for s, c, j in zip(sents, cands, choice)]

    @staticmethod
    def _rank_last(model, w, s, cand, resid, denom, dev) -> tuple[list[int], list[dict[int, Tensor]]]:
        """Order candidate last tokens by how well their exact gradient term explains the residual.

        The term of target ``y`` in the update of ``w`` is ``-d logit_y / d w``: ``-h`` in row ``y``
        (output side) plus, when the input embedding is tied to ``w``, ``-d(w_y . h)/d x_t`` in the
        row of every input token ``x_t`` (input side); returns the candidates ordered by cosine and their
        (unscaled) row terms. ``h`` is captured at the output layer's
        input (the forward stops there), so the backward never touches the vocabulary logits.
        """
        from ..dager_span import _Stop

        emb = model.get_input_embeddings()
        tied = emb.weight is w
        ids = torch.tensor([s], device=dev)
        e = emb(ids).detach().requires_grad_(True)
        store: list[Tensor] = []

        def hook(_m, args):
            store.append(args[0])
            raise _Stop

        out_emb = model.get_output_embeddings()
        hnd = out_emb.register_forward_pre_hook(hook)
        try:
            with torch.enable_grad():
                model(inputs_embeds=e)
        except _Stop:
            pass
        finally:
            hnd.remove()
        h = store[0][0, -1]
        h64 = h.detach().to(torch.float64).cpu()
        r_norm = float(resid.norm())
        scores, terms = [], []
        for j, y in enumerate(cand):
            rows: dict[int, Tensor] = {int(y): -h64.clone()}
            if tied:
                (ge,) = torch.autograd.grad(h @ w[y].detach(), [e], retain_graph=j < len(cand) - 1)
                for t, tokid in enumerate(s):
                    g = -ge[0, t].detach().to(torch.float64).cpu()
                    rows[int(tokid)] = rows[int(tokid)] + g if int(tokid) in rows else g
            terms.append(rows)
            dot = sum(float(resid[k] @ v) for k, v in rows.items())
            nrm = math.sqrt(sum(float(v @ v) for v in rows.values()))
            scores.append(dot / (r_norm * nrm + 1e-30))
        order = sorted(range(len(cand)), key=lambda j: -scores[j])
        return [cand[j] for j in order], [terms[j] for j in order]

    # -- encoders --------------------------------------------------------------------------------
    @staticmethod
    def _declared_sigma(obs: Observation) -> float:
        """The largest Gaussian-noise sigma among the observation's declared defenses (0 if none)."""
        return max((float(d.get("sigma", 0.0)) for d in obs.defenses or () if d.get("name") == "gaussian"),
                   default=0.0)

    def _embedding_prior(self, obs: Observation, model: nn.Module, positions: int):
        """Least-squares position coefficients of every batch token from the embedding updates.

        For learned absolute positions the embedding sum ``w_t + P_p`` gets the same gradient
        ``e_o`` in the word row of ``t`` and the position row of ``p`` for every occurrence ``o``:
        ``dW_word[t] = sum_{o: t} e_o`` and ``dP[p] = sum_{o at p} e_o``. The nonzero word rows are
        the batch's token set; a token that occurs once has ``dW_word[t] = e_o`` exactly, so
        regressing each position row on the word rows gives it a coefficient near 1 at its position
        and near 0 elsewhere (the coefficients of a token sum to 1 over positions; a repeated token's
        mass is spread over its positions). Returns ``(token ids, C[position, token])`` or None when
        the model has no learned position table, the rows are not observed, or the word update is
        dense (tied output embedding, undeclared noise), so that no token set can be read from it.
        Under a declared Gaussian noise (sigma), the batch rows are those whose norm exceeds
        ``prior_noise_factor * sigma * sqrt(d)`` (a noise-only row has norm ~ sigma sqrt(d)).
        """
        word = model.get_input_embeddings()
        n_pos = _max_positions(model)
        pos = next((m for m in model.modules() if isinstance(m, nn.Embedding) and m is not word
                    and m.num_embeddings == n_pos and m.embedding_dim == word.embedding_dim), None)
        if pos is None:
            return None
        names = {id(p): n for n, p in model.named_parameters()}
        gw, gp = obs.tensors.get(names.get(id(word.weight), "")), obs.tensors.get(names.get(id(pos.weight), ""))
        if gw is None or gp is None:
            return None
        gw, gp = gw.detach().double().cpu(), gp[:positions].detach().double().cpu()
        sigma = self._declared_sigma(obs) if self.config.noise_floor else 0.0
        # a declared Gaussian noise fills every row, with norm ~ sigma sqrt(d) (relative spread
        # ~ 1 / sqrt(2d)); the batch's rows are those standing out above it
        floor = self.config.prior_noise_factor * sigma * math.sqrt(gw.shape[1])
        toks = torch.nonzero(gw.norm(dim=1) > floor).flatten()
        if toks.numel() == 0 or toks.numel() >= gw.shape[1]:
            return None
        coef = torch.linalg.lstsq(gw[toks].t(), gp.t()).solution.t()  # [positions, tokens]
        return toks.tolist(), coef

    def _prior_lists(self, prior_fit, l1) -> list[list[int]] | None:
        """Layer-1 candidates restricted to the batch token set and to the positions the embedding
        prior allows (repeated tokens everywhere), ordered by their relative coefficient."""
        if prior_fit is None:
            return None
        cfg = self.config
        toks, coef = prior_fit
        idx = {t: i for i, t in enumerate(toks)}
        peak = coef.max(0).values.clamp_min(1e-12)
        rel = coef / peak
        out = []
        for p, (cands, _) in enumerate(l1):
            if p >= coef.shape[0]:
                out.append([t for t in cands if t in idx])
                continue
            keep = [t for t in cands if t in idx and (float(peak[idx[t]]) < cfg.prior_concentration
                                                      or float(rel[p, idx[t]]) >= cfg.prior_relative)]
            keep.sort(key=lambda t: -float(rel[p, idx[t]]))
            out.append(keep or [t for t in cands if t in idx] or list(cands))
        return out

    def _can_peel(self, obs: Observation, prior: Any) -> bool:
        """Peeling needs the exact FedSGD gradient of a known loss: a gradient observation whose only
        declared defense (if any) is additive Gaussian noise, the batch size, and the prior's loss."""
        return (self.config.peel and obs.kind == "gradient" and obs.num_examples is not None
                and getattr(prior, "loss_fn", None) is not None
                and all(d.get("name") == "gaussian" for d in obs.defenses or ()))

    def _encoder_peeling(self, obs: Observation, model: nn.Module, li2: LayerInputs, span2: Span, l1, prior,
                         b: int | None, tap1):
        """The encoder search with explain-away (``peel``, an addition): each time the search clearly
        accepts sentences, their exact gradient (one float64 per-example backward, the label chosen
        by the rank drop it causes) is subtracted from the observed update and the remaining
        B - k sentences are searched with the embedding prior of the residual. There the found
        sentences' tokens are gone, so tokens that were repeated across sentences become unique,
        the batch token set shrinks, and the candidate lists with it (on MiniLM at B=8 from ~20
        per position to ~2 after six sentences).

        The spans and layer-1 lists stay those of the observed update: the residual also holds the
        client's own float32 round-off of each peeled sentence (~1e-6 of its gradient, in that
        sentence's input directions), which on some batches sits at the level of the weakest true
        singular values and would make the residual's numerical rank, and so its span, unreliable."""
        if not self._can_peel(obs, prior):
            return self._encoder(obs, model, li2, span2, l1, prior, b)
        pool: dict[tuple[int, ...], float] = {}
        peeled: list[list[int]] = []
        failed: dict[int, int] = {}
        cur = obs
        gmodel = None  # float64 copy for the per-example gradients, made at the first peel
        while True:
            rest = None if b is None else b - len(peeled)
            sents, scores = self._encoder(cur, model, li2, span2, l1, prior, rest, stop_early=True, failed=failed,
                                          exclude=frozenset(tuple(x) for x in peeled))
            for x, v in zip(sents, scores):
                pool[tuple(x)] = min(v, pool.get(tuple(x), math.inf))
            clear = [x for x, v in sorted(zip(sents, scores), key=lambda z: z[1])
                     if v <= 0.1 * self._tau[1]]  # (peeled sentences are excluded by _encoder)
            if not clear or self._over_budget() or (rest is not None and len(clear) >= rest):
                break
            # per-example gradients in float64, so that the residual carries only the client's own
            # round-off, not ours as well
            gmodel = gmodel or copy.deepcopy(model).double().eval()
            nxt = self._peel(cur, gmodel, prior, clear, tap1)
            if nxt is None:
                break
            cur, done = nxt
            peeled.extend(done)
            self._stats["peeled"] = float(len(peeled))
        sents = [list(x) for x in pool]
        return sents, [pool[tuple(x)] for x in sents]

    def _peel(self, obs: Observation, gmodel: nn.Module, prior: Any, seqs: list[list[int]], tap1):
        """Subtract the exact per-example gradients of ``seqs`` (computed on ``gmodel``, the float64
        copy of the model) from ``obs``; returns the residual observation and the sentences peeled,
        or None when no sentence lowers the rank of the layer-1 update (``tap1``).

        The label of a sentence is the class whose gradient, subtracted, leaves the lowest layer-1
        rank (the true label removes the sentence's own input directions; a wrong one leaves a
        difference term in the same directions). Embedding-table rows that the subtraction explains
        (residual under 1e-4 of the subtracted row: float round-off) are set to exactly zero, so
        the embedding prior reads the remaining token set."""
        dev = model_device(gmodel)
        params = dict(gmodel.named_parameters())
        names = [n for n in obs.tensors if n in params and params[n].requires_grad]
        proto = obs.protocol
        scale = 1.0 / obs.num_examples if proto is None or proto.loss_reduction == "mean" else 1.0
        tables = {n for n in names if any(m.weight is params[n] for m in gmodel.modules() if isinstance(m, nn.Embedding))}
        n_labels = int(getattr(prior, "num_labels", None) or 2)
        tensors = dict(obs.tensors)
        rank = span_of(observed_matrix(tap1, tensors)).rank
        done: list[list[int]] = []
        for seq in seqs:
            best = None
            for y in range(n_labels):
                batch = Batch({"input_ids": torch.tensor([seq], device=dev),
                               "attention_mask": torch.ones(1, len(seq), dtype=torch.long, device=dev)},
                              torch.tensor([y], device=dev))
                with torch.enable_grad():
                    loss = prior.loss_fn(gmodel, batch).sum() * scale
                    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
                resid = dict(tensors)
                for n, g in zip(names, grads):
                    if g is None:
                        continue
                    t = tensors[n]
                    g = g.detach().to(t.device).double()
                    r = t.double() - g
                    if n in tables:
                        sub = g.norm(dim=-1)
                        r[(sub > 0) & (r.norm(dim=-1) <= 1e-4 * sub)] = 0.0
                    resid[n] = r.to(t.dtype)
                mat = observed_matrix(tap1, resid)
                r_rank = span_of(mat).rank
                key = (r_rank, float(mat.norm()))
                if best is None or key < best[0]:
                    best = (key, resid)
            if best is None or best[0][0] >= rank:
                continue
            tensors, rank = best[1], best[0][0]
            done.append(seq)
        if not done:
            return None
        return replace(obs, tensors=tensors), done

    def _encoder(self, obs: Observation, model: nn.Module, li2: LayerInputs, span2: Span, l1, prior,
                 b: int | None, stop_early: bool = False, failed: dict[int, int] | None = None,
                 exclude: frozenset = frozenset()):
        """Per sentence length (positions where the separator passes layer 1), search the product of
        the per-position candidates for sequences whose every layer-2 input lies in the span.

        Layer 1 alone cannot fix the order: with learned absolute positions a token t at position a
        and a token u at positions a and p put t at p in the span (w_t+P_p = (w_t+P_a) + (w_u+P_p)
        - (w_u+P_a)), so every token of a connected token/position component passes at every
        position of that component (~130 candidates per position on MiniLM at B=8). Two additions
        make the search feasible (both deviations from the reference):

        * ``embedding_prior``: the word/position-embedding updates place most tokens (see
          ``_embedding_prior``); candidates are cut to the batch token set, to the positions the
          prior allows, and ordered by it; sentence lengths are tried in the order of the
          separator's coefficient. The least-squares fit puts a repeated token's mass on one of
          its positions, so its other occurrences can be missing from the lists: a failed
          exhaustive length repairs its best sequence from the wide lists (every batch token
          passing layer 1), and after a full pass without success the lengths are searched once
          more over the wide lists. Without those rows (LoRA, frozen embeddings, noise) the
          layer-1 lists are used as they are, longest length first.
        * Above ``encoder_exhaustive_max`` combinations: a left-to-right beam (``encoder_beam``).
          Positions not yet fixed hold the mean word embedding of their candidates (a soft suffix),
          and a prefix is scored by the sum of squared layer-2 distances of its positions. With the
          true prefix, the true next token ranks first (or within the top 3) at almost every
          position on MiniLM, whereas any wrong hard token raises every distance (attention mixes
          all positions), which defeated single-token local search.

        As the reference ``filter_encoder``: the exhaustive search scores the mean layer-2 distance,
        a sequence is accepted when every position's layer-2 input lies in the span, and the tokens
        of every clearly accepted sentence are removed from the lists of the positions they occupy
        when other candidates remain (``non-overlap``); a length that then finds nothing is searched
        again with the full lists (two sentences can share a token at one position).
        """
        tok = prior.tokenizer
        sep = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        special = set(int(i) for i in getattr(prior, "special_ids", ()) or ())
        fit = self._embedding_prior(obs, model, len(l1)) if self.config.embedding_prior else None
        lists = self._prior_lists(fit, l1) or [list(c) for c, _ in l1]
        if fit is not None:
            idx = {t: i for i, t in enumerate(fit[0])}
            rel = (fit[1] / fit[1].max(0).values.clamp_min(1e-12)).clamp(0.0, 1.0)

            def weight(p: int, t: int) -> float:
                i = idx.get(t)
                w = 1e-6 + (float(rel[p, i]) ** self.config.prior_sharpness if i is not None and p < rel.shape[0] else 0.0)
                return w * (0.05 if t in removed.get(p, ()) else 1.0)
        else:
            def weight(p: int, t: int) -> float:
                return 0.05 if t in removed.get(p, ()) else 1.0
        # repair lists: every batch token that passes layer 1 at the position (the prior's lists
        # miss the weak occurrences of repeated tokens)
        batch_set = set(fit[0]) if fit is not None else None
        wide = [[t for t in c if batch_set is None or t in batch_set] or list(c) for c, _ in l1]
        ends = [p for p, (c, _) in enumerate(l1) if sep is not None and sep in c and p > 0]
        if fit is not None and sep in fit[0]:
            col = fit[1][:, fit[0].index(sep)]
            ends.sort(key=lambda p: -float(col[p]) if p < col.numel() else 0.0)
        else:
            ends.sort(reverse=True)
        lengths = [p + 1 for p in ends] or [len(l1)]
        self._stats["prior"] = float(fit is not None)
        self._stats["l1_candidates_prior"] = float(sum(len(c) for c in lists))
        dev = model_device(li2.model)
        word = model.get_input_embeddings().weight.detach()
        removed: dict[int, set[int]] = {}
        results: dict[tuple[int, ...], float] = {}

        def score_batch(seqs: list[list[int]]) -> tuple[Tensor, Tensor]:
            means, maxs = [], []
            for s in range(0, len(seqs), 256):
                ids = torch.tensor(seqs[s:s + 256], device=dev)
                x = li2(ids)  # [n, L, d]
                d = span_distance(span2.basis, x.reshape(-1, x.shape[-1])).view(x.shape[0], x.shape[1])
                means.append(d.mean(1))
                maxs.append(d.max(1).values)
            return torch.cat(means), torch.cat(maxs)

        def accept(seq: list[int], mx: float) -> bool:
            """Record a passing sequence; a clear pass (<= tau_2 / 10) also feeds the non-overlap filter."""
            if tuple(seq) in exclude:  # already peeled
                return False
            if mx < results.get(tuple(seq), math.inf):
                results[tuple(seq)] = mx
            if mx > 0.1 * self._tau[1]:
                return False
            for p, t in enumerate(seq):
                removed.setdefault(p, set()).add(t)
            return True

        def done() -> bool:
            return self._over_budget() or (b is not None and sum(v <= 0.1 * self._tau[1] for v in results.values()) >= b)

        def lists_for(length: int, src: list[list[int]]) -> list[list[int]]:
            full = []
            for p in range(length):
                c = src[p]
                if p == length - 1 and sep is not None:
                    c = [sep]
                elif 0 < p < length - 1:
                    c = [t for t in c if t not in special] or c
                full.append(c)
            return full

        # Without the prior, every found sentence prunes the lists of the others (the reference's
        # non-overlap filter); with it, found tokens are only down-weighted in the soft suffix (a
        # frequent token such as "a" at position 1 is shared by several sentences). After a success
        # the search restarts from the best-ranked length (that length moves to the end, since two
        # sentences can share a length); it stops after a full pass without success, then (without
        # the prior) tries the remaining lengths once with the unpruned lists.
        if failed:  # peeling rounds: lengths that found nothing before go last (stable in the prior's order)
            lengths.sort(key=lambda n: failed.get(n, 0))
        pending = list(lengths)
        while pending and not done():
            for i, length in enumerate(pending):
                if done():
                    break
                full = lists_for(length, lists)
                per = full if fit is not None else [[t for t in c if t not in removed.get(p, ())] or c
                                                    for p, c in enumerate(full)]
                hit = self._encoder_length(per, score_batch, accept, results, li2, span2, word, weight,
                                           lists_for(length, wide))
                if failed is not None and not hit:
                    failed[length] = failed.get(length, 0) + 1
                if hit:
                    if stop_early:  # the caller peels what was found and searches the rest again
                        sents = [list(x) for x in results]
                        return sents, [results[tuple(x)] for x in sents]
                    pending.append(pending.pop(i))
                    break
            else:
                break
        for length in pending:
            if done():
                break
            if fit is None:
                full = lists_for(length, lists)
                if any(removed.get(p, set()) & set(c) for p, c in enumerate(full)):
                    self._encoder_length(full, score_batch, accept, results, li2, span2, word, weight, full)
            else:
                # the prior's lists miss the weak occurrences of repeated tokens: search the lengths
                # still unexplained once more over every batch token that passes layer 1
                full = lists_for(length, wide)
                if full != lists_for(length, lists):  # (no prior penalty: the prior is what failed)
                    self._encoder_length(full, score_batch, accept, results, li2, span2, word, weight, full,
                                         penalise=False)
        sents = [list(s) for s in results]
        return sents, [results[tuple(s)] for s in sents]

    def _encoder_length(self, per, score_batch, accept, results, li2, span2, word, weight, wide,
                        penalise: bool = True) -> int:
        """Search one sentence length; returns how many sentences were clearly accepted."""
        cfg = self.config
        total = math.prod(len(c) for c in per)
        if total <= cfg.encoder_exhaustive_max:
            seqs = [list(x) for x in itertools.product(*per)]
            mean, mx = score_batch(seqs)
            cands = list(zip(seqs, mx.tolist()))
            if float(mx.min()) > 0.1 * self._tau[1] and wide is not per:
                # the lists can miss a weak occurrence of a repeated token: repair the best one
                cands.append(self._repair(seqs[int(mean.argmin())], wide, li2, span2))
        else:
            cands = self._encoder_beam(per, li2, span2, word, weight, score_batch, wide, penalise)
        found = 0
        for s, v in cands:
            if v < self._tau[1] and tuple(s) not in results:
                found += int(accept(s, v))
        return found

    def _encoder_beam(self, per: list[list[int]], li2: LayerInputs, span2: Span, word: Tensor, weight,
                      score_batch, wide: list[list[int]], penalise: bool = True) -> list[tuple[list[int], float]]:
        """Left-to-right beam over the per-position candidates (see ``_encoder``); returns the final
        beams of every pass with their max layer-2 distance.

        Pass 1 fills the positions after the prefix with a soft suffix: the candidates' word
        embeddings weighted by ``weight`` (the embedding prior, else uniform). Each further pass
        (``encoder_refine``) uses the previous pass's best sentence as a hard suffix instead: a
        suffix with a third of its tokens wrong still ranks the true next token first (measured on
        MiniLM at B=8), so each pass repairs what the last one got wrong. Stops at a clear pass.
        """
        cfg = self.config
        width = max(1, cfg.encoder_beam)
        dev = word.device
        length = len(per)
        rows = []
        for p, c in enumerate(per):
            w = torch.tensor([weight(p, t) for t in c], dtype=word.dtype, device=dev)
            rows.append((w[:, None] * word[torch.tensor(c, device=dev)]).sum(0) / w.sum())
        suffix = torch.stack(rows)  # [L, d]
        lam = cfg.prior_penalty if penalise else 0.0
        pen = [{t: -math.log(weight(p, t)) for t in c} for p, c in enumerate(per)] if lam > 0 else None
        basis = span2.basis.to(device=dev, dtype=word.dtype)
        blk = self._block
        if blk is not None:  # layer-1 inputs of every candidate at its position, computed once
            xtab = [first_layer_vectors(self._li1, torch.tensor(c), p) for p, c in enumerate(per)]
            pos_of = [{t: i for i, t in enumerate(c)} for c in per]

        out: dict[tuple[int, ...], float] = {}
        for _ in range(max(1, cfg.encoder_refine)):
            beams: list[list[int]] = [[]]
            if blk is not None:
                xsuf = self._li1.from_embeds(suffix.unsqueeze(0))[0]  # [L, d]
            for p in range(length):
                if self._over_budget():
                    return [(list(k), v) for k, v in out.items()]
                ext = [bm + [t] for bm in beams for t in per[p]]
                if len(ext) <= width and p < length - 1:
                    beams = ext
                    continue
                if blk is not None:
                    near_pen = None if pen is None else lam * torch.tensor([pen[p][t] for t in per[p]])
                    ext, sc = self._beam_step(blk, beams, p, per[p], xtab, pos_of, xsuf, basis, near_pen)
                else:
                    sc = self._generic_step(li2, word, suffix, ext, p, basis)
                if pen is not None:  # the embedding prior as a tie-breaker (see prior_penalty)
                    sc = sc + lam * torch.tensor([sum(pen[q][t] for q, t in enumerate(e)) for e in ext],
                                                 dtype=sc.dtype)
                order = sc.argsort()[:width].tolist()
                beams = [ext[i] for i in order]
            mean, mx = score_batch(beams)
            mx = mx.tolist()
            for bm, v in zip(beams, mx):
                out[tuple(bm)] = v
            if min(mx) <= 0.1 * self._tau[1]:
                break
            best, v = self._repair(beams[int(mean.argmin())], wide, li2, span2)
            out[tuple(best)] = min(v, out.get(tuple(best), math.inf))
            if v <= 0.1 * self._tau[1]:
                break
            suffix = word[torch.tensor(best, device=dev)]
        return [(list(k), v) for k, v in out.items()]

    @staticmethod
    def _generic_step(li2: LayerInputs, word: Tensor, suffix: Tensor, ext: list[list[int]], p: int,
                      basis: Tensor) -> Tensor:
        """Beam-step scores through the model's own forward (no incremental block): each extension
        fills positions 0..p, the soft ``suffix`` [L, d] the rest; the sum of squared layer-2 distances
        over the prefix."""
        scores = []
        for s in range(0, len(ext), 128):
            chunk = torch.tensor(ext[s:s + 128], device=word.device)
            emb = suffix.unsqueeze(0).repeat(chunk.shape[0], 1, 1)
            emb[:, :p + 1] = word[chunk]
            scores.append(_sq_span_dist(basis, li2.from_embeds(emb)[:, :p + 1]).sum(1).cpu())
        return torch.cat(scores)

    def _beam_step(self, blk: PostLNBlock, beams: list[list[int]], p: int, cands: list[int], xtab, pos_of,
                   xsuf: Tensor, basis: Tensor, near_pen: Tensor | None) -> tuple[list[list[int]], Tensor]:
        """One beam step on the incremental block: every beam is a shared base (its prefix, a slot at
        ``p``, the soft suffix) and the candidates vary the slot. With ``encoder_preselect`` > 0 the
        candidates of each beam are first ranked by the layer-2 distance at ``p`` alone (plus the
        prior penalty ``near_pen`` of the candidate), and only the
        best few get the full score (sum of squared layer-2 distances over the prefix, as the
        generic path). Returns the scored extensions and their scores."""
        nb, k = len(beams), len(cands)
        base = xsuf.unsqueeze(0).repeat(nb, 1, 1)
        for q in range(p):
            base[:, q] = xtab[q][torch.tensor([pos_of[q][bm[q]] for bm in beams])]
        m = self.config.encoder_preselect
        if 0 < m < k:
            near = torch.cat([_sq_span_dist(basis, blk.vary(base, p, xtab[p][s:s + 256], [p]))[..., 0]
                              for s in range(0, k, 256)], 1)  # [nb, k]
            if near_pen is not None:
                near = near + near_pen.to(near)
            sel = near.topk(m, dim=1, largest=False).indices  # [nb, m]
        else:
            sel = torch.arange(k).unsqueeze(0).expand(nb, k)
        sc = torch.cat([_sq_span_dist(basis, blk.vary(base, p, xtab[p][sel[:, s:s + 16]], list(range(p + 1)))).sum(-1)
                        for s in range(0, sel.shape[1], 16)], 1)  # [nb, m]
        ext = [beams[b] + [cands[int(j)]] for b in range(nb) for j in sel[b]]
        return ext, sc.flatten().cpu()

    def _repair(self, seq: list[int], wide: list[list[int]], li2: LayerInputs, span2: Span) -> tuple[list[int], float]:
        """Single-token replacements from the wide lists, worst position first, while the mean layer-2
        distance drops: a sentence with a few wrong tokens shows them as its largest distances, and
        the true replacement removes most of the error (the beam's lists can miss the weak
        occurrences of repeated tokens). Returns the sentence and its max layer-2 distance."""
        dev = model_device(li2.model)

        def dists(seqs: list[list[int]]) -> Tensor:
            out = []
            for s in range(0, len(seqs), 128):
                x = li2(torch.tensor(seqs[s:s + 128], device=dev))
                out.append(span_distance(span2.basis, x.reshape(-1, x.shape[-1])).view(x.shape[0], x.shape[1]))
            return torch.cat(out)

        blk = self._block
        cur = list(seq)
        d = dists([cur])[0]
        tried: set[int] = set()
        for _ in range(2 * len(cur)):
            if self._over_budget() or float(d.max()) <= 0.1 * self._tau[1]:
                break
            p = next((int(q) for q in d.argsort(descending=True).tolist()
                      if int(q) not in tried and len(wide[int(q)]) > 1), None)
            if p is None:
                break
            toks = [t for t in wide[p] if t != cur[p]]
            if blk is None:
                trial = [cur[:p] + [t] + cur[p + 1:] for t in toks]
                dt = dists(trial)
            else:
                dt, toks = self._repair_trials(blk, cur, p, toks, span2)
                trial = [cur[:p] + [t] + cur[p + 1:] for t in toks]
            j = int(dt.mean(1).argmin())
            if float(dt[j].mean()) < float(d.mean()):
                cur, d = trial[j], dt[j]
                tried.clear()
            tried.add(p)
        return cur, float(d.max())

    def _repair_trials(self, blk: PostLNBlock, cur: list[int], p: int, toks: list[int],
                       span2: Span) -> tuple[Tensor, list[int]]:
        """Layer-2 distances [n, L] of ``cur`` with position ``p`` replaced by each of ``toks`` on the
        incremental block; with ``encoder_preselect`` > 0 only the (2 x preselect) replacements
        nearest to the span at ``p`` itself get the full evaluation. Returns the distances and the
        replacements evaluated."""
        dev = model_device(blk.q)
        base = self._li1(torch.tensor([cur], device=dev))  # [1, L, d]
        cand = first_layer_vectors(self._li1, torch.tensor(toks), p)  # [k, d]
        m = 2 * self.config.encoder_preselect
        if 0 < m < len(toks):
            x = blk.vary(base, p, cand, [p])[0, :, 0]  # [k, d]
            keep = span_distance(span2.basis, x).topk(m, largest=False).indices
            cand, toks = cand[keep.to(cand.device)], [toks[int(i)] for i in keep]
        every = list(range(len(cur)))
        out = []
        for s in range(0, len(toks), 16):
            x = blk.vary(base, p, cand[s:s + 16], every)[0]  # [m, L, d]
            out.append(span_distance(span2.basis, x.reshape(-1, x.shape[-1])).view(x.shape[0], x.shape[1]))
        return torch.cat(out), toks


def _sq_span_dist(basis: Tensor, x: Tensor) -> Tensor:
    """Squared distance ``1 - |R^T v|^2`` of each normalised row of ``x`` [..., d] to span(basis), in
    ``x``'s dtype (the beam's ranking score; acceptance uses ``span_distance``)."""
    v = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return (1.0 - (v @ basis).pow(2).sum(-1)).clamp_min(0.0)


def _select(sents: list[list[int]], scores: list[float], l1, position_free: bool, b: int | None) -> list[int]:
    """Choose up to B sentences that together explain the layer-1 span (greedy set cover).

    The universe is every (position, token) that passed layer 1 (tokens only for rotary models);
    each step takes the sentence covering most still-unexplained elements, ties broken by lower
    layer-2 score then length. This drops spurious short branches that explain nothing new.
    """
    if b is None or len(sents) <= b:
        return sorted(range(len(sents)), key=lambda i: scores[i])
    if position_free:
        universe = set(l1[0][0]) if l1 else set()
        cover = [set(s) & universe for s in sents]
    else:
        universe = {(p, t) for p, (c, _) in enumerate(l1) for t in c}
        cover = [{(p, t) for p, t in enumerate(s)} & universe for s in sents]
    covered: set = set()
    chosen: list[int] = []
    rest = list(range(len(sents)))
    while rest and len(chosen) < b:
        best = max(rest, key=lambda i: (len(cover[i] - covered), -scores[i], len(sents[i])))
        chosen.append(best)
        covered |= cover[best]
        rest.remove(best)
    return chosen


def _max_positions(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return 1 << 30


__all__ = ["DAGER", "DagerConfig", "DagerPreconditionError", "transformer_blocks"]
