"""DAGER's ranked encoder search (issue 20): suffix exchange between stitched sentences and the ranked
search's one-sentence-per-round acceptance, on the tiny float64 BERT of ``test_dager.py``."""
from __future__ import annotations


import pytest
import torch

pytest.importorskip("transformers")

from .test_dager import _tiny_bert_obs  # noqa: E402


def _spans(obs, model, prior):
    from textleak.attacks.dager import DAGER
    from textleak.attacks.dager.span import LayerInputs

    tok = prior.tokenizer
    probe = torch.tensor([[tok.eos_token_id or 0, 1, 2]]) % model.get_input_embeddings().num_embeddings
    taps, spans, _ = DAGER().spans(obs, model, probe)
    return LayerInputs(model, taps[1]), spans[1]


def _true_ids(truth, prior):
    pad = prior.tokenizer.pad_token_id
    return [[int(x) for x in s if int(x) != pad] for s in truth["token_ids"]]


def test_suffix_exchange_undoes_stitched_sentences():
    """Two true sentences of a tiny-BERT batch (B=3, FedSGD) stitched at a cut (the prefix of one with the
    suffix of the other, and back) score worse than the true pair, and ``exchange_suffixes`` returns the
    true pair; the true sentences are left as they are. (Under noise the tiny BERT's layer-2 rank falls
    from 33 to 7-9 of 64 and the truth is no longer the minimum there; MiniLM keeps 66-76 at sigma 1e-5.)"""
    from textleak.attacks.dager.config import DagerConfig
    from textleak.attacks.dager.enc_refine import exchange_suffixes, layer2_scorer, sq_scores
    from textleak.attacks.dager.run import Run

    kit, case, model, obs, prior, truth = _tiny_bert_obs(3)
    li2, span2 = _spans(obs, model, prior)
    sents = sorted(_true_ids(truth, prior), key=len)
    a, b = sents[-2], sents[-1]
    c = min(len(a), len(b)) // 2
    stitched = [a[:c] + b[c:], b[:c] + a[c:]]
    assert stitched[0] != a and stitched[1] != b
    own, bad = sq_scores(li2, span2, [a, b]).sum(), sq_scores(li2, span2, stitched).sum()
    assert float(own) < float(bad)
    run = Run(DagerConfig(), (1.0, 1.0))
    fixed, made = exchange_suffixes(run, layer2_scorer(li2, span2), stitched + [sents[0]])
    assert made >= 1
    assert sorted(map(tuple, fixed)) == sorted(map(tuple, [a, b, sents[0]]))
    same, none = exchange_suffixes(run, layer2_scorer(li2, span2), [a, b, sents[0]])
    assert none == 0 and same == [a, b, sents[0]]


def test_separator_cosine_ranks_true_lengths_first():
    """The length order of the exact encoder search (``enc_lengths.separator_affinity``): on a real MiniLM
    FedSGD batch (B=4, pretrained) the separator passes layer 1 at ~45 positions, and the cosine of the
    position rows with the separator's word row (both off the other batch tokens' word rows) puts the 4 true
    lengths among its first 6 (the prior's coefficient, the order before, among its first 8); on the tiny
    BERT at B=3 (every sentence ends with '.') the 3 true lengths come first."""
    from textleak.attacks.dager.enc_lengths import separator_affinity
    from textleak.attacks.dager.prior import embedding_prior

    from .test_dager import _setup

    for obs_of in (lambda: _tiny_bert_obs(3)[2:], lambda: _setup("text/minilm-bert/dager", 4)[2:6]):
        model, obs, prior, truth = obs_of()
        tok = prior.tokenizer
        true = {len(s) for s in _true_ids(truth, prior)}
        n = max(true) + 4
        fit = embedding_prior(obs, model, n)
        aff = separator_affinity(obs, model, fit, tok.sep_token_id, n)
        assert aff is not None and aff.shape == (n,)
        ranked = [int(p) + 1 for p in aff[1:].argsort(descending=True) + 1]  # lengths, best first
        limit = len(true) if len(true) < 4 else len(true) + 2
        assert true <= set(ranked[:limit]), (sorted(true), ranked[:10])


def test_length_order_decays_failures():
    """``enc_lengths.order``: lengths by decreasing affinity; a length that failed moves down by
    ``FAILED_DECAY`` per failure (not behind every untried length), a negative affinity further down."""
    from textleak.attacks.dager.enc_lengths import FAILED_DECAY, order

    aff = torch.zeros(10, dtype=torch.float64)
    aff[4], aff[6], aff[2], aff[8] = 0.8, 0.3, 0.5, -0.1  # lengths 5, 7, 3, 9
    assert order([3, 5, 7, 9], aff, None) == [5, 3, 7, 9]
    assert FAILED_DECAY == 0.5
    assert order([3, 5, 7, 9], aff, {5: 1}) == [3, 5, 7, 9]  # 0.4 < 0.5: behind 3, still before 7
    assert order([3, 5, 7, 9], aff, {5: 2}) == [3, 7, 5, 9]  # 0.2
    assert order([3, 5, 7, 9], aff, {9: 3, 7: 1}) == [5, 3, 7, 9]  # 0.15; -0.8 stays last


def test_feasible_lengths_from_the_layer2_rank():
    """``enc_lengths.feasible`` / ``longest`` (issue 18): on the tiny BERT (B=3) and a real MiniLM batch (B=4,
    pretrained) the layer-2 rank is the batch's token count and the last nonzero position-embedding row ends the
    longest sentence; the true lengths are feasible, and so are few of the candidate lengths where the separator
    passes layer 1 (B-1 missing sentences once one is known: only the true lengths remain)."""
    from textleak.attacks.dager.enc_lengths import feasible, longest

    from .test_dager import _setup

    for obs_of in (lambda: _tiny_bert_obs(3)[2:], lambda: _setup("text/minilm-bert/dager", 4)[2:6]):
        model, obs, prior, truth = obs_of()
        lens = sorted(len(s) for s in _true_ids(truth, prior))
        _, span2 = _spans(obs, model, prior)
        assert span2.rank == sum(lens)
        assert longest(obs, model) == lens[-1]
        cands = list(range(2, lens[-1] + 1))  # every length up to the longest (the separator passes almost anywhere)
        ok = feasible(cands, span2.rank, len(lens), lens[-1])
        assert set(lens) <= ok
        # one sentence found (the shortest): the other lengths sum to the rest, the longest known
        rest = feasible(cands, span2.rank - lens[0], len(lens) - 1, lens[-1])
        assert set(lens[1:]) <= rest
        if len(lens) == 3:
            assert rest == set(lens[1:])  # two missing, the longest known: the other one is fixed
    assert feasible([3, 5, 7, 9], 12, 2, 7) == {5, 7}  # 7 + 5; 9 is above the longest, 3 + 7 != 12
    assert feasible([3, 5, 7, 9], 12, 2, None) == {3, 5, 7, 9}
    assert feasible([3, 5, 7, 9], 9, 1, 9) == {9} and feasible([3, 5], 9, 1, 9) == set()


def test_deep_score_separates_truth_under_noise_and_refine_undoes_stitches():
    """``deep.DeepScore`` (the attention-context spans of blocks 0-2) on a real MiniLM FedSGD batch (B=4,
    pretrained) under a declared Gaussian sigma = 1e-5: every true sentence scores below its one-token
    substitutions and a stitch of two true sentences above the pair, and ``deep.refine`` turns a
    stitched pair plus a substituted sentence back into the true sentences."""
    from textleak.attacks.dager.config import DagerConfig
    from textleak.attacks.dager.deep import DeepScore, refine
    from textleak.attacks.dager.enc_refine import exchange_suffixes
    from textleak.attacks.dager.run import Run

    from .test_dager import _setup

    sigma = 1e-5
    _, _, model, obs, prior, truth, _ = _setup("text/minilm-bert/dager", 4,
                                               defenses=[{"name": "gaussian", "sigma": sigma}])
    sents = sorted(_true_ids(truth, prior), key=len)
    deep = DeepScore(model, obs, sigma, torch.tensor([sents[0]]))
    assert len(deep.taps) == 3
    own = deep.sums(sents)
    pool = sorted({t for s in sents for t in s[1:-1]})
    for i, s in enumerate(sents):
        subs = [s[:p] + [t] + s[p + 1:] for p in (1, len(s) // 2, len(s) - 2) for t in pool[:6] if t != s[p]]
        assert float(deep.sums(subs).min()) > float(own[i]), i
    a, b = sents[-2], sents[-1]
    c = min(len(a), len(b)) // 2
    stitched = [a[:c] + b[c:], b[:c] + a[c:]]
    assert float(deep.sums(stitched).sum()) > float(own[-2] + own[-1])
    p = len(sents[0]) // 2
    wrong = sents[0][:p] + [pool[0] if pool[0] != sents[0][p] else pool[1]] + sents[0][p + 1:]
    def wide_for(n):  # every batch token at every inner position, the true token among them
        return [[s0] if q in (0, n - 1) else pool for q, s0 in enumerate([sents[0][0]] * (n - 1) + [sents[0][-1]])]

    run = Run(DagerConfig(), (1.0, 1.0))
    fixed, made = refine(run, deep, stitched + [wrong, sents[1]], wide_for, exchange_suffixes)
    assert made >= 2
    assert sorted(map(tuple, fixed)) == sorted(map(tuple, [a, b, sents[0], sents[1]]))


def test_deep_refine_never_turns_a_sentence_into_a_variant_of_another():
    """``deep.variant`` follows the ranked search's rules (same length with half the tokens equal, or half the
    inner bigrams shared), and ``deep.refine`` refuses repairs and exchanges that would make one sentence a
    variant of another: with a score that rewards copying sentence A, sentence B is repaired towards A only
    while it stays no variant of it (without ``others`` the same repair copies A); a sentence with a stray token
    after [CLS] loses it (``DROP_FIRST``)."""
    from textleak.attacks.dager.config import DagerConfig
    from textleak.attacks.dager.deep import no_new_variants, refine, repair, variant
    from textleak.attacks.dager.enc_refine import exchange_suffixes
    from textleak.attacks.dager.run import Run

    assert variant([1, 5, 6, 7, 2], [1, 5, 6, 8, 2]) and variant([1, 9, 5, 6, 7, 2], [1, 5, 6, 7, 2])
    assert not variant([1, 5, 6, 7, 2], [1, 8, 9, 10, 2])
    a, b = [1, 10, 11, 12, 13, 14, 15, 2], [1, 20, 21, 22, 23, 24, 25, 2]

    class CopyA:  # distance 0 where a position holds A's token, 1 elsewhere
        taps = [0, 1]

        def per_position(self, seqs, blocks=None):
            return torch.tensor([[0.0 if p < len(a) and t == a[p] else 1.0 for p, t in enumerate(s)] for s in seqs],
                                dtype=torch.float64)

        def sums(self, seqs):
            return torch.tensor([float(self.per_position([s]).sum()) for s in seqs], dtype=torch.float64)

        def means(self, seqs):
            return self.sums(seqs) / torch.tensor([len(s) for s in seqs], dtype=torch.float64)

    deep, run = CopyA(), Run(DagerConfig(), (1.0, 1.0))
    wide = [[1]] + [[a[p], b[p]] for p in range(1, len(a) - 1)] + [[2]]
    assert repair(run, deep, b, wide) == a  # unguarded: a copy
    fixed, made = refine(run, deep, [a, b], lambda n: wide, exchange_suffixes)
    assert made >= 1 and fixed[0] == a and fixed[1] != b and not variant(fixed[1], a)
    assert no_new_variants([a, b])(fixed) and not no_new_variants([a, b])([a, a])
    shifted = [a[0], 99] + a[1:]  # a stray token after [CLS], the sentence one position late (DROP_FIRST)
    assert refine(run, deep, [shifted, b], lambda n: wide, exchange_suffixes)[0][0] == a


def test_deep_score_is_off_where_layer_2_is_a_tight_test():
    """``deep.deep_score`` returns None (layer 2's exchange and repairs are kept) without declared noise and where
    the ranked search's layer-2 tolerance is under ``DEEP_MIN_TOL`` (MiniLM at sigma 1e-6), before touching the
    model."""
    from common.types import Observation
    from textleak.attacks.dager.config import DagerConfig
    from textleak.attacks.dager.deep import DEEP_MIN_TOL, deep_score
    from textleak.attacks.dager.run import Run

    noisy = Observation(kind="gradient", tensors={}, defenses=({"name": "gaussian", "sigma": 1e-6},))
    clean = Observation(kind="gradient", tensors={})
    run = Run(DagerConfig(), (1.0, 1.0))
    run.stats["tol_l2"] = DEEP_MIN_TOL / 2
    assert deep_score(run, noisy, None, 102) is None
    run.stats["tol_l2"] = 2 * DEEP_MIN_TOL
    assert deep_score(run, clean, None, 102) is None
