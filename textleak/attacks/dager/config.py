"""DAGER's configuration: the knobs that presets, suites, tests or benchmarks set, and the fixed
constants of the search (the reference's ``args_factory.py`` defaults where it has one)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal


@dataclass(frozen=True)
class DagerConfig:
    """Defaults follow the reference's ``args_factory.py`` where it has one."""
    RANGES: ClassVar[dict[str, str]] = {  # checked by common.attack.validate_config
        "l1_span_thresh": ">0", "l2_span_thresh": ">0"}

    l1_span_thresh: float = 1e-5  # tau_1 (reference default)
    l2_span_thresh: float = 1e-3  # tau_2 (reference default)
    adaptive_tau: bool = True  # raise tau_1/tau_2 to the precision the spectrum allows (see DAGER.spans)
    trim_tails: bool = True  # decoders with a widened tau_2: end a path at a distance jump (see decoder.search)
    fast_block: bool = True  # post-LN encoders: evaluate block 1 incrementally (block.PostLNBlock)
    encoder_preselect: int = 4  # with fast_block: per beam, fully score only this many candidates (the
    # best at the new position); 0: all
    on_failure: Literal["report", "raise"] = "report"
    time_budget_s: float = 0.0  # > 0: stop the sequence search after this many seconds (stats timed_out)
    budget_clock: Literal["wall", "cpu"] = "wall"  # what time_budget_s counts: wall-clock seconds, or this
    # process's CPU seconds (all its threads; load-independent, so published suites on a shared machine use it)
    rank_limit: Literal["best_effort", "refuse"] = "best_effort"  # saturated rank: the ranked search of
    # frontier.py (sentences not certified), or refuse as the reference (precondition failure)
    certify: bool = True  # saturated layer 2, noise-free FedSGD encoders: certify the ranked search's sentences by
    # layer 1 and peel them (certify.py; rotary decoders: certify only, certify_dec.py); False: best effort as before
    noise_aware: bool = True  # declared Gaussian noise that swamps the span: the ranked search (frontier.py)
    peel_rounds: int = 0  # rotary decoders past layer 2's rank: extra rounds of the attack on the residual of the
    # certified sentences (peel_dec.py; off: +0.04 ROUGE-1 on 4 SmolLM2 B=32 development batches, but 2.5-3x the CPU
    # and a peak RSS of 9.7-14.3 GB: docs/dager.md "SmolLM2 at B = 32")


# -- spans and thresholds (attack.py, run.py) ---------------------------------------------------------
#: saturated when rank > max_rank - RANK_CUTOFF (reference: d - 20); the rank follows NumPy's
#: ``matrix_rank`` rule (the reference's default) or a declared noise floor
RANK_CUTOFF = 20
MAX_LEN = 128  # positions scanned at most
CHUNK = 4096  # tokens per forward chunk in the vocabulary scan
NOISE_TAU_FACTOR = 3.0  # tau >= factor * noise / smallest kept singular value
NOISE_TAU_CAP = 0.05  # never widen beyond this (the reference's loosest tau, lora.sh)
GAP_RATIO = 30.0  # cut a widened tau at a distance gap this large (layer-1 scan, decoder steps)

# -- past the exact regime (frontier.py) ---------------------------------------------------------------
FRONTIER_L1_KEEP = 64  # decoders: layer-1 candidates kept per position (nearest first)
FRONTIER_L1_KEEP_ENC = 96  # encoders: more (the embedding prior narrows them to the batch token set)
FRONTIER_ACCEPT = 0.3  # decoders: extra extensions of a path below this x the step's median layer-2 distance
FRONTIER_TRIM = FRONTIER_ACCEPT  # decoders: a finished path loses its trailing tokens above this x the median
FRONTIER_CONTINUE = 0.75  # decoders: a path's best extension below this x the median continues it
FRONTIER_CHILDREN = 3  # decoders: weak extensions (ratio >= FRONTIER_ACCEPT) per path two steps back at most
FRONTIER_BEAM_PER_SENTENCE = 2  # decoders: live paths at most this x B + 16
FRONTIER_CHILDREN_MAX = 8  # decoders: extensions per path at most (strong ones branch: shared prefixes)
FRONTIER_CUT = (0.03, 0.03)  # saturated rank: drop the weakest max(2, this x max_rank) directions (layer 1, 2;
# single-token layer-1 inputs separate best with more dropped: measured on the 64-wide GPT-2 at B=8)
FRONTIER_FFN = True  # decoders: rank extensions at the first block's feed-forward input (frontier.ffn_inputs)
TOKEN_SET_GAP = 2.0  # decoders, both layers saturated: the batch token set is the word-embedding rows above
# the largest norm-ratio gap when that gap is at least this (frontier.batch_token_set)
FRONTIER_SHORTLIST = 32  # decoders with the token set: extensions per path (nearest at the feed-forward input)
# ranked again at layer 2's span through the model
ROOT_QUOTA = 1  # decoders with the first tokens read from the embedding updates: beam paths kept per first token
FRONTIER_MIN_TOL = 1e-3  # the calibrated tolerance never below this
FRONTIER_DUPLICATE = 0.5  # encoders: a same-length sentence sharing this fraction of tokens is a variant
#: ranked encoder search: a sequence sharing this fraction of its inner bigrams with an accepted sentence is a variant of it
#: (any length)
RANKED_BIGRAM_DUPLICATE = 0.5
FRONTIER_PRIOR_PENALTY = 1e-3  # encoders: the beam's prior weight (0.05 measured worse on MiniLM)
FRONTIER_CLEAR = 1.0  # encoders: a sentence whose max layer-2 distance is <= this x the tolerance is
# clearly accepted (the search's "tau_2 / 10"); every length's best is kept and the B best returned

# -- decoders (decoder.py) ------------------------------------------------------------------------------
FFN_PREFILTER = 0.05  # exact decoder search on GPT-2 (fast path): an extension goes to the layer-2 test only when
# its distance to the first block's feed-forward-input span is below this (true ones: ~1e-6; NOISE_TAU_CAP)
MAX_RUN = 4  # rotary decoders: longest run of one token allowed at the start (see decoder.search)
LAST_TOKEN_CANDIDATES = 6  # last-token completion: candidates re-ranked by their exact gradient term

# -- encoders (encoder.py, beam.py, prior.py) -----------------------------------------------------------
ENCODER_EXHAUSTIVE_MAX = 16384  # above this many combinations per length: the beam
ENCODER_BEAM = 16  # beam width (left to right, with a soft suffix)
ENCODER_REFINE = 3  # beam passes per length: a soft suffix, then the previous pass's best sentence
PRIOR_PENALTY = 1e-3  # beam score += this * sum over the prefix of -log(prior weight)
PRIOR_SHARPNESS = 4.0  # soft-suffix weight of a candidate: max(relative coefficient, 0) ** this
PRIOR_CONCENTRATION = 0.7  # a token whose coefficient peaks below this is treated as repeated (kept everywhere)
PRIOR_RELATIVE = 0.3  # otherwise kept where its coefficient is >= this fraction of its peak
PRIOR_NOISE_FACTOR = 3.0  # under declared Gaussian noise: batch rows have norm > this * sigma * sqrt(d)
