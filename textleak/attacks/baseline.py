"""``text-prior``: the public-prior baseline for text audits. A baseline, not an attack: it never
reads the update, only the batch size (and the sequence lengths when granted) and public data.

It answers "how much ROUGE does a guess with no access to the client's gradient get?", the
number an attack must beat before its output says anything about leakage (``eval audit`` runs it
next to every text attack, ``eval.audit.BASELINES``). As TabLeak's random baseline draws every
cell from the public marginals (Vero et al., ICML 2023, ``attacks/random_baseline.py``), this one
draws whole sentences from the case's public sentence pool (``TextKit.load_pool``, the same
within-``max_tokens`` sentences ``eval run`` draws client batches from; a prior over the data
distribution, never the client's batch): B distinct sentences uniformly, or, when the sequence
lengths are granted, one sentence per granted length among those with the nearest token count.
When the case has no readable pool, each sentence is random non-special tokens of the
tokenizer's vocabulary (the granted length, else ``random_length`` tokens).

Deviation (no paper defines a text prior baseline): TabLeak's baseline is per cell; sentences
are drawn whole, so ROUGE sees real word statistics (function words, punctuation) and the
baseline is not trivially low.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from common.attack import AttackInfo
from common.case import Case
from common.threat import Capability
from common.types import Observation, Reconstruction

CITATION = ("public-prior baseline (this suite, issue 22), after the random baseline of Vero, Balunović, Dimitrov, "
            "Vechev. TabLeak: Tabular Data Leakage in Federated Learning. ICML 2023 (arXiv 2210.01785)")


@dataclass(frozen=True)
class SentencePoolPrior:
    """Public text: the case's sentences (token counts with special tokens, as ``seq_lens``) and
    the ids that may occur inside a sentence. Built by ``sentence_pool_prior``; no client data."""

    tokenizer: Any
    sentences: tuple[str, ...]
    lengths: tuple[int, ...]
    body_ids: tuple[int, ...]  # vocabulary ids that are not special / unused tokens
    frame: int  # special tokens the tokenizer adds around a sentence ([CLS] ... [SEP]: 2)


def sentence_pool_prior(kit: Any, case: Case, model: nn.Module, *, device) -> SentencePoolPrior:
    """The ``text-pool`` prior (``TextKit.priors``): the case's pool within its ``max_tokens`` and
    the model's maximum length; empty when the pool cannot be read (then random tokens)."""
    from ..kit import excluded_ids, special_frame
    from ..models import info_of, input_embedding, max_length

    tok = info_of(model).tokenizer
    limit = min(int(case.options.get("max_tokens") or 10**9), max_length(model))
    try:
        texts = [str(t) for t in kit.load_pool(case, data_path=None).dataset["text"]]
    except (FileNotFoundError, ValueError):
        texts = []
    lengths = [len(x) for x in tok(texts)["input_ids"]] if texts else []
    keep = [i for i, n in enumerate(lengths) if n <= limit]
    vocab = int(input_embedding(model).weight.shape[0])
    bad = set(excluded_ids(tok, vocab))
    pre, suf = special_frame(tok)
    return SentencePoolPrior(tokenizer=tok, sentences=tuple(texts[i] for i in keep),
                             lengths=tuple(lengths[i] for i in keep),
                             body_ids=tuple(i for i in range(vocab) if i not in bad), frame=len(pre) + len(suf))


@dataclass(frozen=True)
class TextPriorConfig:
    RANGES: ClassVar[dict[str, str]] = {"random_length": ">=1"}  # checked by common.attack.validate_config
    match_lengths: bool = True  # with granted seq_lens: draw among pool sentences of the nearest token count
    random_length: int = 12  # tokens per random sentence when there is no pool and no granted length


class TextPriorBaseline:
    """Baseline, not an attack: B sentences from the public pool (or random tokens), seeded by the
    generator only; the observation's tensors are never read."""

    info: ClassVar[AttackInfo] = AttackInfo(
        "text-prior", "text", frozenset({Capability.BATCH_SIZE, Capability.PUBLIC_PRIOR}), CITATION, prior="text-pool")

    def __init__(self, config: TextPriorConfig | None = None) -> None:
        self.config = config or self.default_config()

    @classmethod
    def default_config(cls) -> TextPriorConfig:
        return TextPriorConfig()

    def reconstruct(self, obs: Observation, model: nn.Module, prior: SentencePoolPrior, *,
                    generator: torch.Generator) -> Reconstruction[list[str]]:
        b = obs.require_num_examples()
        lens = list(obs.seq_lens) if obs.seq_lens is not None and len(obs.seq_lens) == b else None
        n = len(prior.sentences)
        if n and lens is not None and self.config.match_lengths:
            pool = torch.tensor(prior.lengths)
            out = []
            for want in lens:
                gap = (pool - int(want)).abs()
                near = torch.nonzero(gap == gap.min()).flatten()
                out.append(prior.sentences[int(near[torch.randint(len(near), (1,), generator=generator)])])
        elif n:
            idx = torch.randperm(n, generator=generator)[:b] if n >= b else torch.randint(n, (b,), generator=generator)
            out = [prior.sentences[int(i)] for i in idx]
        else:
            ids = torch.tensor(prior.body_ids)
            out = []
            for k in range(b):
                m = max(1, int(lens[k]) - prior.frame) if lens is not None else self.config.random_length
                pick = ids[torch.randint(len(ids), (m,), generator=generator)]
                out.append(prior.tokenizer.decode(pick.tolist()).strip())
        return Reconstruction(data=out, labels=None, stats={"pool_size": float(n)})
