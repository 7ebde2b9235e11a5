"""TAG: Deng et al., "TAG: Gradient Attack on Transformer-based Language Models", Findings of EMNLP 2021.

Mirrors the TAG baseline of LAMP's reference code (eth-sri/lamp ``tag.sh``: ``attack.py --baseline
--loss tag --tag_factor 0.01 --lr 0.1 --lr_decay 1 --n_steps 2500``), which is how LAMP and DAGER
compare against TAG: continuous optimisation of dummy input embeddings with Adam to minimise
``Σ_l ‖g_l − g*_l‖² + tag_factor · Σ_l ‖g_l − g*_l‖₁``, one random Gaussian initialisation, no
regulariser, no LM prior, no discrete steps; tokens decoded as the nearest embedding (cosine).

Deviations:

* Labels: LAMP's TAG uses the true labels. When the threat model grants them we do the same;
  otherwise (``labels="optimize"``) soft labels are optimised jointly, as TAG's abstract claims it
  works "without the need of ground truth label" (its exact mechanism was not retrieved).
* Sequence lengths are required (LAMP's ``--know_padding``, default on); special tokens and
  padding are pinned. The attention mask is passed to the model (LAMP attended to [PAD]).
* The observed word-embedding gradient is not matched (the dummy input is embeddings, so that
  matrix is not in the dummy graph; LAMP skips it the same way). Special/unused ids are excluded
  from decoding, as LAMP's default exclusion list.
* Decoders (GPT-2, Llama): next-token targets of the dummy are the currently decoded tokens
  (hard, re-decoded every step); TAG/LAMP were defined for classifiers.
* FedAvg deltas are matched as ``delta / (local_lr · local steps)``, a one-step approximation.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from common.attack import AttackInfo
from common.threat import Capability
from common.types import Observation, Reconstruction

from ..components.search import TextAttackConfig, TextSearch
from ..prior import TextPrior

TAG_DEFAULTS = TextAttackConfig(
    loss="tag", tag_factor=0.01, lr=0.1, lr_decay=1.0, n_steps=2500, coeff_reg=0.0, init_size=None,
    coeff_perplexity=0.0, init_candidates=1, init_permutations=0, use_swaps=False, token_filter="none",
    labels="optimize",
)


class TAG:
    info: ClassVar[AttackInfo] = AttackInfo(
        "tag", "text", frozenset({Capability.GRADIENTS, Capability.BATCH_SIZE, Capability.SEQUENCE_LENGTHS}),
        "Deng, Wang, Li, Wang, Liu, Ding, Hu, Tang, Zhang. TAG: Gradient Attack on Transformer-based Language "
        "Models. Findings of EMNLP 2021", prior="text")

    def __init__(self, config: TextAttackConfig | None = None) -> None:
        self.config = config or self.default_config()

    @classmethod
    def default_config(cls) -> TextAttackConfig:
        return TAG_DEFAULTS

    def reconstruct(self, obs: Observation, model: nn.Module, prior: TextPrior, *,
                    generator: torch.Generator) -> Reconstruction[list[str]]:
        return TextSearch(self.config, obs, model, prior, generator).run()
