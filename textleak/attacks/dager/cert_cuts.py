"""Cuts of the ranked encoder search's sentences, certified by layer 1 (issue 20, ``CUTS``; an addition to the
reference, the certified counterpart of ``enc_cuts.py``).

Past the layer-2 rank limit (MiniLM B=16) the ranked search's outputs are mostly not exact; some are a true sentence
continued past its end (development seeds 0-2, trial 0: 0, 1 and 1 of 16 outputs; most others leave the true
sentence after a few tokens, which no cut fixes). The layer-1 certificate (``certify.py``) accepts only an exact sentence
with its label, so here each sentence the search accepts and the certificate rejects is also cut at the shorter
candidate lengths (``s[:n - 1] + [sep]`` for every length ``n`` at which the separator passes layer 1, the exact
lists of the unsaturated layer 1), and the cuts are certified: a certified cut is peeled like a certified sentence.
Each certificate test costs a float64 forward and backward per label, so the cuts are screened first: they are
ranked by their mean layer-2 distance (one forward of the first block each: a true cut's every row is a true
layer-2 input, a wrong cut changes every row through attention) and only the ``CUT_TESTS`` nearest are tested.
"""
from __future__ import annotations

from typing import Any, Callable

from .beam import score_seqs
from .enc_cuts import separator_lengths
from .span import LayerInputs, Span

#: test the cuts of the ranked search's uncertified sentences with the layer-1 certificate (False: off). MiniLM B=16
#: (development seeds 1 and 2, trial 0, 300 CPU-second budget): one right cut certified on each, none wrong; ROUGE-1
#: 0.542 -> 0.554 and 0.594 -> 0.594 (docs/dager.md, "Certified cuts")
CUTS = True
#: cuts per sentence tested with the certificate, nearest (mean layer-2 distance) first
CUT_TESTS = 3


def cuts(seq: list[int], lengths: list[int], sep: int, li2: LayerInputs, span2: Span, k: int) -> list[list[int]]:
    """The ``k`` cuts ``seq[:n - 1] + [sep]`` (``n`` in ``lengths``, shorter than ``seq``) of lowest mean layer-2
    distance, nearest first."""
    mine = [seq[:n - 1] + [sep] for n in lengths if 2 <= n < len(seq)]
    if not mine:
        return []
    mean = [float(score_seqs(li2, span2, [c])[0][0]) for c in mine]
    return [mine[i] for i in sorted(range(len(mine)), key=lambda i: mean[i])[:k]]


class CutTaker:
    """The ranked search's ``on_take`` with cuts: ``cert.take(seq)``, and when ``seq`` is not certified, its
    nearest cuts (``cuts``) until one is certified (peeled by ``cert.take``)."""

    def __init__(self, cert: Any, li2: LayerInputs, span2: Span, l1, stats: dict[str, float]) -> None:
        tok = cert.prior.tokenizer
        self.sep = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        self.cert, self.li2, self.span2, self.stats = cert, li2, span2, stats
        self.lengths = separator_lengths(l1, self.sep)

    def __call__(self, seq: list[int]) -> bool:
        cert = self.cert
        n = len(cert.peeled)
        cert.take(seq)  # (peels seq when certified)
        if len(cert.peeled) > n or cert.exact or not cert.usable:
            return cert.stop
        for c in cuts(seq, self.lengths, self.sep, self.li2, self.span2, CUT_TESTS):
            self.stats["cert_cuts_tested"] = self.stats.get("cert_cuts_tested", 0.0) + 1.0
            stop = cert.take(c)
            if len(cert.peeled) > n:
                self.stats["cert_cuts_peeled"] = self.stats.get("cert_cuts_peeled", 0.0) + 1.0
                return stop
        return False


def hook(cert: Any, li2: LayerInputs, span2: Span, l1, stats: dict[str, float]) -> Callable[[list[int]], bool] | None:
    """The ranked search's ``on_take``: None without a certificate, ``cert.take`` with ``CUTS`` off."""
    if cert is None:
        return None
    return CutTaker(cert, li2, span2, l1, stats) if CUTS and cert.prior is not None else cert.take
