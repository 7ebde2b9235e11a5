"""DAGER: exact gradient inversion of text batches via low-rank attention-input spans.

Petrov, Dimitrov, Baader, Müller, Vechev. "DAGER: Exact Gradient Inversion for Large Language
Models." NeurIPS 2024 (arXiv 2405.15586). Reference code: ``eth-sri/dager`` (read as the fork
``prithagupta/dager-gradient-inversion`` @ 5f8e306: ``attack.py``, ``utils/functional.py``
``check_if_in_span`` / ``get_layer_decomp`` / ``filter_l1`` / ``filter_decoder`` / ``filter_encoder``).

Algorithm (as the reference):

1. The update of the first block's attention input projections (Q/K/V, GPT-2 ``c_attn``, or
   a LoRA ``lora_A``) is ``sum_i g_i x_i^T``: its row space is the span of the layer inputs
   x_i when the token count is below the width. We take an orthonormal basis (SVD; rank by
   NumPy's ``matrix_rank`` rule or a declared noise floor) for block 1 (layer 1) and block 2 (layer 2).
2. Layer-1 filter: every vocabulary token at every position is pushed through the model's own
   embedding / position / (pre-)LayerNorm code up to the first projection (a forward pre-hook
   stops the forward there) and kept when its span distance is below ``l1_span_thresh``.
   Rotary models (Llama) have position-free first-layer inputs: detected numerically, scanned once.
3. Decoders: sequences grow position by position; each prefix is extended by each layer-1
   candidate and the layer-2 input of the new position is span-checked (``l2_span_thresh``).
   All passing extensions are kept (at most 4 B + 16 per step); a prefix with no passing
   extension is a finished sentence. Encoders: for every sentence length (positions where the
   separator passes layer 1), combinations of per-position candidates are checked on layer 2
   (all positions' layer-2 inputs must lie in the span): exhaustively up to
   ``ENCODER_EXHAUSTIVE_MAX`` combinations, by a beam with repairs above that (``beam.py``).

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
  attention input (its output predicts padding), so no span method can see it; the last-token
  completion (``last_token.py``) appends the token whose output-embedding gradient row best
  matches the final hidden state of the recovered prefix (an addition; the reference leaves it out).
* The encoder search uses a left-to-right beam once the combination count exceeds
  ``ENCODER_EXHAUSTIVE_MAX`` (the reference's exhaustive search with ``maxB``/``non-overlap``
  heuristics is infeasible on 2 CPU cores).
* Post-LN (BERT-family) encoders evaluate block 1 incrementally in the beam and the repairs
  (``fast_block``, ``block.py``; same scores as the model forward), and each beam
  fully scores only its ``encoder_preselect`` candidates nearest to the span at the new position
  (a speed heuristic; 0 scores every extension).
* Encoders under FedSGD peel (``peel.py``, an addition): once sentences are clearly recovered, their
  exact per-example gradients (label: the class whose removal drops the layer-1 rank) are
  subtracted from the update and the remaining sentences are searched with the embedding prior
  of the residual (the spans stay those of the observed update).
* Past the layer-2 rank limit with layer 1 unsaturated (encoders, noise-free FedSGD), each sentence the ranked
  search accepts is certified by the exact layer-1 test (``certify.py``, an addition): subtracting its exact
  gradient with the right label drops the layer-1 rank to the round-off floor, a wrong sentence drops none.
  Certified sentences are peeled, and once the residual's layer 2 shows a clear gap the whole attack runs on
  the residual (the exact search, certified); ``DagerConfig.certify`` (on) switches it.
* When Gaussian noise is a declared defense (defenses are public protocol facts), its sigma sets
  a singular-value noise floor ``sigma * (sqrt(m) + sqrt(d))`` for the rank, and the thresholds are
  widened to ``NOISE_TAU_FACTOR * floor / s_rank`` (capped at ``NOISE_TAU_CAP``); FedAvg deltas get
  the float rounding floor of ``theta_before - theta_after``. Without noise the floor is the first
  discarded singular value (float32 round-off), so tau_1/tau_2 never drop below the precision the
  observed spectrum allows (the reference instead tunes ``rank_tol`` per batch size, and filters
  outliers with ``p1_std_thrs`` / ``l2_std_thrs``).
* Precondition failures (all-zero update; projections not observed) raise
  :class:`DagerPreconditionError` (``on_failure="raise"``) or return empty sentences with
  ``stats["precondition_failed"] = 1`` and the reason in ``extras["status"]`` (``"report"``, the
  default). A saturated rank (token count too close to the width) is such a failure only with
  ``rank_limit="refuse"`` (the reference); by default the ranked search of ``frontier.py`` (an
  addition, after TIGER arXiv 2606.18312 and SOMP arXiv 2603.16761) returns a best-effort
  reconstruction, and under a declared Gaussian noise it fills what the exact search misses.
  ``extras["certified"]`` flags the sentences a check that can fail confirms (``verify.py``: the exact search's B
  encoder sentences' gradients sum to the update, else per sentence the layer-1 certificate, ``certify.py``); where
  no check applies (decoders, FedAvg, declared noise) those that passed the exact span tests on a noise-free,
  unsaturated update; ``stats["certified"]`` is their fraction of the B slots.
* Rotary decoders with only layer 2 saturated (noise-free FedSGD, an addition): layer 1's exact token coefficients
  certify the ranked search's sentences whose own gradient makes one of their tokens vanish (``certify_dec.py``);
  with ``peel_rounds`` (off by default) the certified sentences' exact gradients are peeled off for another round of
  the attack on the residual batch (``peel_dec.py``).

Modules: ``config`` (DagerConfig and the fixed constants), ``run`` (the per-call state: thresholds,
statistics, deadline), ``attack`` (DAGER: spans, layer-1 scan, orchestration), ``span`` (span
machinery), ``block`` (incremental post-LN first block), ``decoder`` and ``last_token`` (decoder
search), ``frontier`` (the ranked search past the exact regime), ``encoder`` and ``beam`` (encoder search), ``prior`` (embedding prior), ``peel``, ``certify`` (the layer-1 certificate past the layer-2 limit), ``verify`` (the exact search's flags), ``certify_dec`` and ``peel_dec`` (its decoder
counterpart and peeling), ``scan``
(the exact fast layer-1 scan for LayerNorm-fed first layers; ``DAGER(fast=False)`` keeps the
original code paths for benchmarks and equivalence tests).
"""
from .attack import DAGER
from .config import DagerConfig
from .span import DagerPreconditionError, transformer_blocks

__all__ = ["DAGER", "DagerConfig", "DagerPreconditionError", "transformer_blocks"]
