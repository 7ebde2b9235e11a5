"""DAGER's encoder search: per sentence length, the sequences whose every layer-2 input lies in the span.

Layer 1 alone cannot fix the order: with learned absolute positions a token t at position a
and a token u at positions a and p put t at p in the span (w_t+P_p = (w_t+P_a) + (w_u+P_p)
- (w_u+P_a)), so every token of a connected token/position component passes at every
position of that component (~130 candidates per position on MiniLM at B=8). Two additions
make the search feasible (both deviations from the reference):

* the embedding prior (``prior.py``): the word/position-embedding updates place most tokens; candidates are cut to
  the batch token set, to the positions the prior allows, and ordered by it; sentence lengths are tried in the order
  of the separator's coefficient (the exact search on the fast path: of its cosine, ``enc_lengths.py``, with a second
  try at a wider preselection, ``ESCALATE``; each beam's sentence also cut at the shorter lengths, ``enc_cuts.py``).
  The least-squares fit puts a repeated token's mass on one of its positions, so its other occurrences can be missing
  from the lists: a failed exhaustive length repairs its best sequence from the wide lists (every batch token passing
  layer 1), and after a full pass without success the lengths are searched once more over the wide lists. Without
  those rows (LoRA, frozen embeddings, noise) the layer-1 lists are used as they are, longest length first.
* Above ``ENCODER_EXHAUSTIVE_MAX`` combinations: a left-to-right beam (``beam.py``). Positions
  not yet fixed hold the mean word embedding of their candidates (a soft suffix), and a prefix is
  scored by the sum of squared layer-2 distances of its positions. With the true prefix, the true
  next token ranks first (or within the top 3) at almost every position on MiniLM, whereas any
  wrong hard token raises every distance (attention mixes all positions), which defeated
  single-token local search.

* The ranked search (``Run.ranked``: declared Gaussian noise, or a saturated rank; issue 20) has no distance
  that certifies a sentence (under sigma 1e-5 on MiniLM the true sentences' max layer-2 distance equals that
  of their one-token substitutions). It runs in rounds: the longest length (the last row the
  position-embedding update uses) and the prior's next lengths get a beam each, and only the best sentence
  of the round by *mean* layer-2 distance is accepted; its (position, token) pairs then cost the later beams
  ``USED_PENALTY`` (through the prior weight), and variants of it (same-length overlap, shared bigrams) are
  skipped. Without this every length's beam followed the strongest sentence. The accepted sentences then
  exchange suffixes where that lowers their summed squared distance (``enc_refine.py``: the beam's stitches,
  one sentence's prefix with another's suffix) and get single-token repairs to no further gain.

As the reference ``filter_encoder``: the exhaustive search scores the mean layer-2 distance,
a sequence is accepted when every position's layer-2 input lies in the span, and the tokens
of every clearly accepted sentence are removed from the lists of the positions they occupy
when other candidates remain (``non-overlap``); a length that then finds nothing is searched
again with the full lists (two sentences can share a token at one position).
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Callable

from torch import nn

from common.types import Observation

from .beam import beam, repair, score_seqs
from .config import ENCODER_EXHAUSTIVE_MAX, FRONTIER_DUPLICATE, PRIOR_PENALTY, RANKED_BIGRAM_DUPLICATE
from .enc_cuts import harvest, separator_lengths
from .enc_lengths import feasible, longest, order, separator_affinity
from .deep import bigrams as _bigrams, deep_score
from .enc_refine import finish_ranked
from .prior import PriorWeight, embedding_prior, prior_lists
from .run import Run, declared_sigma
from .span import LayerInputs, Span

Found = tuple[list[list[int]], list[float]]  # sentences and their max layer-2 distances

#: ranked search (noise, saturated rank): a (position, token) pair that an accepted sentence holds costs the
#: beam this much (in summed squared layer-2 distance) when another sentence uses it again, through the prior
#: weight (``prior.PriorWeight``); without it every length's beam follows the strongest sentence
USED_PENALTY = 0.08
#: ranked search: the beams of this many pending lengths (in the prior's order) are run per round, and only the
#: best of their sentences (lowest mean layer-2 distance) is accepted; the others are searched again next round
#: with its pairs penalised (else the strongest sentence is accepted at the first length tried, a wrong one)
RANKED_WINDOW = 4
RANKED_REPEAT = False  # ranked search: search accepted lengths again (two sentences of one length)
RANKED_EXCHANGE = True  # ranked search: exchange suffixes between the accepted sentences (enc_refine.py)
RANKED_REPAIR = True  # ranked search: then single-token repairs of each (beam.repair, to no further gain)
#: ranked search without declared noise (saturated rank): beam passes per length (pass 1 and the repair of its
#: best beam; None: ``ENCODER_REFINE``). MiniLM B=16 (development seed 0, 300 CPU-second budget): ROUGE-1 0.347
#: with all passes (6 of 16 sentences accepted when the budget ran out) against 0.586 with one (15, in 180 CPU s);
#: seed 1: 0.343 (7 accepted) against 0.524 (16), both at the budget
RANKED_PASSES: int | None = 1
#: exact search with the length order of ``enc_lengths`` (issue 18): when the first as many lengths as sentences
#: are missing all fail in a peeling round, each is searched once more with this times ``encoder_preselect``
#: before the round goes on to the less likely lengths (0: off). On development MiniLM B=8 batches true
#: lengths fail while their lists are still wide and the round then swept every false length
ESCALATE = 2
#: exact search with the length order of ``enc_lengths``, no declared noise (issue 18): a length's first try runs
#: this many beam passes (``beam.beam``'s ``passes``; pass 1 and the repair of its best beam) instead of
#: ``ENCODER_REFINE``; the second try (``ESCALATE``) and the wide-list fallback run them all (0: off). On development
#: MiniLM B=8 batches a true length whose first pass failed almost never succeeded in passes 2-3 of that try, and
#: succeeded cheaply a few peels later
QUICK_PASSES = 1
#: exact search with the length order of ``enc_lengths``, peeling, no declared noise (issue 18): the lengths the rank
#: allows (``enc_lengths.feasible``: the missing sentences' lengths sum to the rank less the peeled sentences'
#: lengths, the longest read from the position-embedding update) are tried first and alone escalated; the
#: others keep their order after them (False: off)
FEASIBLE_FIRST = True
#: exact search with the length order of ``enc_lengths``, no declared noise (issue 18): a beam's first sentence and its
#: repair are also cut at every shorter candidate length and the cuts tested as sentences (``enc_cuts.harvest``; a
#: failed beam has mostly followed the prefix of another missing sentence) (False: off)
HARVEST = True


def search(run: Run, obs: Observation, model: nn.Module, li2: LayerInputs, span2: Span, l1, prior: Any,
           b: int | None, *, stop_early: bool = False, failed: dict[int, int] | None = None,
           exclude: frozenset = frozenset(), on_take: Callable[[list[int]], bool] | None = None) -> Found:
    """The encoder search over the observation ``obs`` (its embedding prior) and the layer-1 lists
    ``l1``. With ``stop_early`` it returns at the first length that accepts a sentence (the caller
    peels it); ``failed`` counts the lengths that found nothing (across calls); ``exclude`` holds
    sentences already peeled; ``on_take`` sees each sentence the ranked search accepts (True: stop there)."""
    s = _EncoderSearch(run, obs, model, li2, span2, l1, prior, b, exclude)
    s.on_take = on_take
    return s.run(stop_early, failed)


class _EncoderSearch:
    """The state of one encoder search: candidate lists, lengths, the non-overlap filter, results."""

    def __init__(self, run: Run, obs: Observation, model: nn.Module, li2: LayerInputs, span2: Span, l1,
                 prior: Any, b: int | None, exclude: frozenset) -> None:
        self.r, self.li2, self.span2, self.b, self.exclude = run, li2, span2, b, exclude
        self.obs, self.model = obs, model
        self.noisy = declared_sigma(obs) > 0.0
        tok = prior.tokenizer
        self.sep = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        self.special = set(int(i) for i in getattr(prior, "special_ids", ()) or ())
        fit = embedding_prior(obs, model, len(l1))
        self.fit = fit
        self.lists = prior_lists(fit, l1) or [list(c) for c, _ in l1]
        self.removed: dict[int, set[int]] = {}  # position -> tokens of clearly accepted sentences
        self.lam = lam = PRIOR_PENALTY if run.prior_penalty is None else run.prior_penalty  # the prior's weight
        factor = max(math.exp(-USED_PENALTY / lam), 1e-30) if run.ranked and lam > 0 else 0.05
        self.weight = PriorWeight(fit, self.removed, removed_factor=factor)
        self.clear: set[tuple[int, ...]] = set()  # ranked search: the one sentence accepted per searched length
        # repair lists: every batch token that passes layer 1 at the position (the prior's lists
        # miss the weak occurrences of repeated tokens)
        batch_set = set(fit[0]) if fit is not None else None
        self.wide = [[t for t in c if batch_set is None or t in batch_set] or list(c) for c, _ in l1]
        self.lengths = self._lengths(l1)
        # the exact search's length order (issue 18, enc_lengths.py; the original path keeps the coefficient's)
        self.affinity = (separator_affinity(obs, model, fit, self.sep, len(l1))
                         if run.fast and not run.ranked else None)
        # (HARVEST: the exact search with the affinity's length order, no declared noise)
        self.harvest = HARVEST and self.affinity is not None and not self.noisy and self.sep is not None
        run.stats["prior"] = float(fit is not None)
        run.stats["l1_candidates_prior"] = float(sum(len(c) for c in self.lists))
        self.word = model.get_input_embeddings().weight.detach()
        self.results: dict[tuple[int, ...], float] = {}
        self.on_take: Callable[[list[int]], bool] | None = None  # (ranked search: True stops it, certify.py)
        self.stopped = False

    def _lengths(self, l1) -> list[int]:
        """Sentence lengths (positions where the separator passes layer 1, plus one), in the order
        of the separator's prior coefficient, else longest first."""
        sep, fit = self.sep, self.fit
        ends = [n - 1 for n in separator_lengths(l1, sep)]
        if fit is not None and sep in fit[0]:
            col = fit[1][:, fit[0].index(sep)]
            ends.sort(key=lambda p: -float(col[p]) if p < col.numel() else 0.0)
        else:
            ends.sort(reverse=True)
        return [p + 1 for p in ends] or [len(l1)]

    def run(self, stop_early: bool, failed: dict[int, int] | None) -> Found:
        # Without the prior, every found sentence prunes the lists of the others (the reference's
        # non-overlap filter); with it, found tokens are only down-weighted in the soft suffix (a
        # frequent token such as "a" at position 1 is shared by several sentences). After a success
        # the search restarts from the best-ranked length (that length moves to the end, since two
        # sentences can share a length); it stops after a full pass without success, then (without
        # the prior) tries the remaining lengths once with the unpruned lists.
        if self.r.ranked:
            return self._run_ranked()
        lengths = self.lengths
        if self.affinity is not None:  # the separator's cosine, lengths that found nothing moved down
            lengths = order(lengths, self.affinity, failed)
        elif failed:  # peeling rounds: lengths that found nothing before go last (stable in the prior's order)
            lengths.sort(key=lambda n: failed.get(n, 0))
        likely = self._feasible() if stop_early and self.affinity is not None and FEASIBLE_FIRST else None
        if likely:  # the lengths the rank allows first (FEASIBLE_FIRST)
            lengths = [n for n in lengths if n in likely] + [n for n in lengths if n not in likely]
        pending = list(lengths)
        # the likely lengths (the first as many as sentences are missing) all failed: each is tried once more
        # with a wider preselection before the sweep goes on to the unlikely ones (ESCALATE)
        n_top = 0 if self.affinity is None or not ESCALATE else max(1, len(pending) if self.b is None else self.b)
        # (both measured without noise only: under a declared noise the rank is not the token count)
        self.quick = QUICK_PASSES if self.affinity is not None and QUICK_PASSES and not self.noisy else None
        while pending and not self._done():
            for i, length in enumerate(pending):
                if self._done():
                    break
                hit = self._try_length(length, passes=self.quick)
                if not hit and i + 1 == n_top:
                    for again in [n for n in pending[:n_top] if not likely or n in likely]:
                        if self._done():
                            break
                        hit = self._try_length(again, preselect=ESCALATE * self.r.config.encoder_preselect)
                        if hit:
                            i, length = pending.index(again), again
                            break
                if failed is not None and not (hit and self.own):  # (a length whose cuts alone found: failed)
                    failed[length] = failed.get(length, 0) + 1
                if hit:
                    if stop_early:  # the caller peels what was found and searches the rest again
                        return self._found()
                    pending.append(pending.pop(i))
                    break
            else:
                break
        self._fallback(pending)
        return self._found()

    def _feasible(self) -> set[int] | None:
        """The candidate lengths that the layer-2 rank allows for the missing sentences (``enc_lengths.feasible``),
        or None where the rank is not the token count (saturated, ranked) or the batch size is not granted."""
        if self.b is None or self.r.ranked or self.noisy or self.span2.rank >= self.span2.max_rank:
            return None
        total = self.span2.rank - sum(len(s) for s in self.exclude)
        top = longest(self.obs, self.model)
        self.r.stats["lengths_feasible"] = float(len(ok := feasible(self.lengths, total, self.b, top)))
        return ok

    def _try_length(self, length: int, preselect: int | None = None, passes: int | None = None) -> int:
        """Search one length over the prior's lists (without the prior: pruned by the non-overlap filter)."""
        full = self._lists_for(length, self.lists)
        per = full if self.fit is not None else [[t for t in c if t not in self.removed.get(p, ())] or c
                                                 for p, c in enumerate(full)]
        return self._length(per, self._lists_for(length, self.wide), preselect=preselect, passes=passes)

    def _fallback(self, pending: list[int]) -> None:
        """Search the lengths still pending once more with unpruned (no prior) or wide (prior) lists."""
        for length in pending:
            if self._done():
                break
            if self.fit is None:
                full = self._lists_for(length, self.lists)
                if any(self.removed.get(p, set()) & set(c) for p, c in enumerate(full)):
                    self._length(full, full)
            else:
                # the prior's lists miss the weak occurrences of repeated tokens: search the lengths
                # still unexplained once more over every batch token that passes layer 1
                full = self._lists_for(length, self.wide)
                if full != self._lists_for(length, self.lists):  # (no prior penalty: the prior is what failed)
                    self._length(full, full, penalise=False)

    def _found(self) -> Found:
        sents = [list(s) for s in self.results]
        return sents, [self.results[tuple(s)] for s in sents]

    def _length(self, per: list[list[int]], wide: list[list[int]], penalise: bool = True, *,
                preselect: int | None = None, passes: int | None = None) -> int:
        """Search one sentence length; returns how many sentences were clearly accepted. A ``wide``
        that is not ``per`` itself repairs the best exhaustive sequence from those lists."""
        r = self.r
        total = math.prod(len(c) for c in per)
        if total <= ENCODER_EXHAUSTIVE_MAX:
            seqs = [list(x) for x in itertools.product(*per)]
            mean, mx = score_seqs(self.li2, self.span2, seqs)
            cands = list(zip(seqs, mx.tolist()))
            if float(mx.min()) > 0.1 * r.tau[1] and wide is not per:
                # the lists can miss a weak occurrence of a repeated token: repair the best one
                cands.append(repair(r, seqs[int(mean.argmin())], wide, self.li2, self.span2))
        else:
            cands = beam(r, per, self.li2, self.span2, self.word, self.weight, wide, penalise, preselect=preselect,
                         passes=passes)
        own, n = len(cands), len(per)
        if self.harvest and total > ENCODER_EXHAUSTIVE_MAX and cands:  # (HARVEST)
            seen = set(self.results) | set(self.exclude)
            cands = cands + harvest(r.block, r.li1, self.li2, self.span2, r.tau[1], [cands[0][0], cands[-1][0]],
                                    self.lengths, n, self.sep, lambda s: tuple(s) in seen)
        found = self.own = 0
        for i, (s, v) in enumerate(cands):
            if v < r.tau[1] and tuple(s) not in self.results:
                hit = int(self._accept(s, v))
                found, self.own = found + hit, self.own + hit * (i < own)  # (own: the length's own sentences)
        return found

    def _run_ranked(self) -> Found:
        """The ranked search's rounds: the beams of the first ``RANKED_WINDOW`` pending lengths (at most the
        number of sentences still missing; the longest length, read from the position-embedding update, first)
        and, with ``RANKED_REPEAT`` (off), of the lengths already accepted (two sentences can share a length); the best of their sentences by
        mean layer-2 distance is accepted (``_take``)."""
        # the longest sentence ends at the last position the position-embedding update uses (the ranked
        # scan's lists stop there): that length first
        longest = len(self.lists)
        pending = [longest] + [n for n in self.lengths if n != longest]
        taken: list[int] = []  # accepted lengths, searched again (two sentences can share a length)
        while pending and not self._done():
            need = len(pending) if self.b is None else self.b - len(self.clear)
            window = pending[:max(1, min(need, RANKED_WINDOW))]
            if RANKED_REPEAT:
                window += [n for n in taken[-RANKED_WINDOW:] if n not in window]
            best: tuple[float, int, list[int], float] | None = None
            for length in window:
                if self.r.over_budget():
                    break
                pick = self._ranked_best(self._lists_for(length, self.lists), self._lists_for(length, self.wide))
                if pick is not None and (best is None or pick[0] < best[0]):
                    best = (pick[0], length, pick[1], pick[2])
            if best is None:
                break
            _, length, seq, mx = best
            self._take(seq, mx)
            if length in pending:
                pending.remove(length)
            if length not in taken:
                taken.append(length)
        if RANKED_EXCHANGE and len(self.clear) > 1 and not self.stopped:  # undo stitches (enc_refine.finish_ranked)
            keys = [k for k in self.results if k in self.clear]
            # the attention-context score under declared noise (deep.py), built only for this last step
            deep = deep_score(self.r, self.obs, self.li2.model, self.sep) if self.noisy else None
            new, made = finish_ranked(self.r, self.li2, self.span2, deep, [list(k) for k in keys],
                                      lambda n: self._lists_for(n, self.wide), repairs=RANKED_REPAIR)
            if made:
                _, mx = zip(*[score_seqs(self.li2, self.span2, [s]) for s in new])
                for k in keys:
                    del self.results[k]
                self.clear = set()
                for s, m in zip(new, mx):
                    self.results[tuple(s)] = float(m[0])
                    self.clear.add(tuple(s))
        return self._found()

    def _ranked_best(self, per: list[list[int]], wide: list[list[int]]) -> tuple[float, list[int], float] | None:
        """One length's best new sequence: (mean layer-2 distance, sequence, max distance), or None."""
        total = math.prod(len(c) for c in per)
        if total <= ENCODER_EXHAUSTIVE_MAX:
            seqs = [list(x) for x in itertools.product(*per)]
        else:
            passes = None if self.noisy else RANKED_PASSES
            seqs = [s for s, _ in beam(self.r, per, self.li2, self.span2, self.word, self.weight, wide, True,
                                       passes=passes)]
        seqs = [s for s in seqs if tuple(s) not in self.exclude and tuple(s) not in self.results]
        if not seqs:
            return None
        mean, mx = score_seqs(self.li2, self.span2, seqs)
        if total <= ENCODER_EXHAUSTIVE_MAX:  # the used pairs' penalty, as the beam's
            pen = [sum(-math.log(self.weight(p, t)) for p, t in enumerate(q)) * self.lam / len(q) for q in seqs]
            mean = mean + mean.new_tensor(pen)
        grams = [_bigrams(k) for k in self.clear]
        for i in mean.argsort().tolist():
            if self._duplicate(seqs[i], float(mx[i]), drop=False):
                continue
            own = _bigrams(tuple(seqs[i]))
            if own and any(len(own & g) >= RANKED_BIGRAM_DUPLICATE * len(own) for g in grams):
                continue  # a variant of an accepted sentence at another length (shifted: no used pair)
            return float(mean[i]), seqs[i], float(mx[i])
        return None

    def _take(self, seq: list[int], mx: float) -> None:
        """Accept ``seq`` in the ranked search; its pairs then cost ``USED_PENALTY`` to other sentences."""
        self._duplicate(seq, mx)
        self.results[tuple(seq)] = mx
        self.clear.add(tuple(seq))
        self._mark_used(seq)
        self.stopped = self.on_take is not None and self.on_take(seq)

    def _accept(self, seq: list[int], mx: float) -> bool:
        """Record a passing sequence; a clear pass (<= tau_2 / 10) also feeds the non-overlap filter."""
        if tuple(seq) in self.exclude:  # already peeled
            return False
        if self.r.ranked and self._duplicate(seq, mx):
            return False
        if mx < self.results.get(tuple(seq), math.inf):
            self.results[tuple(seq)] = mx
        if mx > 0.1 * self.r.tau[1]:
            return False
        self._mark_used(seq)
        return True

    def _mark_used(self, seq: list[int]) -> None:
        """Add the (position, token) pairs of an accepted sentence to ``removed`` (the non-overlap filter and
        the prior weight's used pairs)."""
        for p, t in enumerate(seq):
            self.removed.setdefault(p, set()).add(t)

    def _duplicate(self, seq: list[int], mx: float, drop: bool = True) -> bool:
        """Ranked search (``Run.ranked``): True when a sentence of the same length sharing at least
        ``FRONTIER_DUPLICATE`` of its tokens (same positions) is recorded with a lower score; such a
        sentence recorded with a higher score is dropped (a variant of one sentence is not another)."""
        for k in list(self.results):
            if len(k) == len(seq) and sum(a == b for a, b in zip(k, seq)) >= FRONTIER_DUPLICATE * len(seq):
                if self.results[k] <= mx:
                    return True
                if drop:
                    del self.results[k]
                    self.clear.discard(k)
        return False

    def _done(self) -> bool:
        b, tau2 = self.b, self.r.tau[1]
        if self.r.ranked:
            return self.stopped or self.r.over_budget() or (b is not None and len(self.clear) >= b)
        return self.r.over_budget() or (b is not None and sum(v <= 0.1 * tau2 for v in self.results.values()) >= b)

    def _lists_for(self, length: int, src: list[list[int]]) -> list[list[int]]:
        """The per-position lists of one length: the separator last, no special token inside."""
        full = []
        for p in range(length):
            c = src[p]
            if p == length - 1 and self.sep is not None:
                c = [self.sep]
            elif 0 < p < length - 1:
                c = [t for t in c if t not in self.special] or c
            full.append(c)
        return full
