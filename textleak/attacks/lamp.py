"""LAMP: Balunović, Dimitrov, Jovanović, Vechev, "LAMP: Extracting Text from Gradients with Language
Model Priors", NeurIPS 2022 (arXiv 2202.08827).

Mirrors eth-sri/lamp ``attack.py`` / ``init.py`` / ``utilities.py`` (commit 852d12f). The class
defaults are ``args_factory.py``'s; the presets ``lamp-cos`` and ``lamp-l1l2`` are ``lamp_cos.sh``
(loss cos, coeff_perplexity 0.2, coeff_reg 1, lr 0.01, lr_decay 0.89, 2000 steps) and
``lamp_l1l2.sh`` (loss tag with tag_factor 0.01, coeff_perplexity 60, coeff_reg 25, same schedule).

Method: token support from the observed word-embedding gradient; ``init_candidates`` random
Gaussian batches scored by gradient loss, then ``init_permutations`` permutations of the best,
rescaled to ``init_size``; Adam (StepLR 50) on gradient loss + ``coeff_reg``·(mean token norm −
init_size)²; every ``swap_every`` steps after ``swap_burnin``·n_steps, for each sentence 200
transformations (swap, move token, move span, prefix to end) scored by gradient loss +
``coeff_perplexity``·LM loss, best kept; output = best-loss embeddings projected to the nearest
allowed token by cosine.

Deviations:

* Token filter on by default (``token_filter="auto"``: LAMP's ``--use_embedding``, rows of the
  embedding gradient with non-zero sum; for tied-embedding decoders, whose every row gets a
  gradient, the ``topk_factor``·n_tokens rows of largest norm). LAMP's scripts leave it off and
  exclude only BERT's special/unused ids, which we also always exclude.
* LM prior: LAMP used a GPT-2 trained on wikitext-103 sharing BERT's vocabulary, fed BERT ids. We
  score the *decoded text* with any causal LM and its own tokenizer (default SmolLM2-135M, case
  option ``lm_prior``); the LM term is the mean per-sentence NLL over the batch. SmolLM2 stays in its GGUF
  blocks on the CPU, de-quantised per layer (bit-equal weights; :mod:`textleak.components.gguf_lm`), and its
  log-softmax is streamed over the vocabulary (NLLs within 2e-4 nats of the full-logits float32 path, closer
  to float64); with B = 1 the current text is scored in its candidates' batch (one LM forward per round). For
  Llama-architecture LMs a round's texts go through a token trie (``lm_shared_prefix``, default on;
  :mod:`textleak.components.lm_prefix`): every prefix the re-orderings share is run once and a text's last
  token (which predicts nothing) not at all (~915 of ~1,680 tokens through the layers on a 13-word sentence's
  114 texts), the same NLLs up to float rounding (~1e-6 nats). The
  schedule is the reference's (200 proposals per sentence every ``swap_every`` steps after the burn-in, all
  scored with the LM; ``swap_tokens`` in eth-sri/lamp ``attack.py``).
* ``init_size=1.4`` is LAMP's value for BERT; ``None`` uses the mean norm of the allowed embeddings
  (for non-BERT models). The regulariser averages the norm over body tokens (LAMP: all positions).
* Candidates (init and discrete) are scored in batches, not one forward each. For ``cos``/``l2``
  on models built of ``Linear``/``LayerNorm``/``Embedding`` (BERT) or ``Linear``/``LlamaRMSNorm`` with the tied
  word embedding unmatched (Llama-layout decoders such as SmolLM2; session 22) the per-candidate gradient is
  never formed: one batched forward + backward gives each layer's inputs and output gradients, and
  the distance needs only ``<G_c, M>`` and ``|G_c|²`` per tensor (``textleak.components.ghost``;
  about 5x faster and ~2 GB less peak memory on MiniLM than per-candidate gradients). Otherwise
  (``ghost=False``, ``tag`` loss, GPT-2) per-sentence gradients are vectorised with
  ``torch.func.vmap`` (exact: a batch gradient is the sum of per-sentence contributions) and
  reduced to a distance chunk by chunk (``chunk`` candidates at a time, capped so the chunk's gradients stay
  under 1 GiB: ``gradmatch.vmap_chunk``, 2 on SmolLM2-135M, where 16 were OOM-killed at 21 GB); ``batched=False``
  restores the one-at-a-time loop. The gradient
  distance of the continuous step is one autograd node with a hand-written backward (same value
  and gradient as the plain formula; tested). Where the ghost products apply, the continuous
  step uses them too (``ghost_step``): the distance is built from each layer's inputs and output
  gradients (``create_graph=True``) and differentiated w.r.t. the embeddings, so the dummy
  parameter gradient is never formed (same value and embedding gradient up to float rounding;
  0.85-1.13x the bare forward + double backward on MiniLM, 0.10-0.20x below the plain path). Where the
  observed gradient of a ``Linear`` weight has low rank up to ``ghost_lowrank`` (default 1e-6 of its norm: one
  client step's weight gradient has rank <= its tokens, the rest is float32 rounding), the ghost products use its
  truncated SVD (``r·(in+out)`` per token instead of ``in·out``; distances move by <= 1e-6 relative, ~1e-7 on
  MiniLM; a noised or many-step gradient stays dense): the step at ~0.75x the floor's CPU time, the candidate
  scoring ~0.7x the dense products' (``bench/perf_lamp_s15.py``). A swap
  proposal drawn more than once in a round is scored once. ``lm_topk`` (default off) limits LM
  scoring to the best candidates by gradient loss, ``lm_bf16`` (default off) runs the LM prior
  under bf16 autocast (NLLs move by ~0.01 nats); both are CPU-budget options. ``lm_screen`` (a margin in nats,
  default 0.25; ``None``: off) scores a round's new texts under bf16 first and runs the float32 LM only on the candidates that can still be
  the argmin if every bf16 NLL is within the margin (``textleak.components.lm_screen``): the same choice, the
  float32 NLLs to float rounding.
* Labels: granted labels are used (LAMP's setting); otherwise recovered from the classifier-head
  gradient (iDLG for B=1, label counts for B>1; the sentence/label pairing is then arbitrary).
* Sequence lengths are required and the attention mask is passed; decoders use the decoded tokens
  as next-token targets; FedAvg deltas are rescaled to a mean gradient (see TAG's notes).
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

LAMP_DEFAULTS = TextAttackConfig(
    loss="cos", tag_factor=0.01, lr=0.01, lr_decay=0.9, n_steps=2000, coeff_reg=0.1, init_size=1.4,
    coeff_perplexity=0.1, init_candidates=500, init_permutations=500, use_swaps=True, swap_burnin=0.1,
    swap_every=75, swap_candidates=200, token_filter="auto", labels="recover",
)


class LAMP:
    info: ClassVar[AttackInfo] = AttackInfo(
        "lamp", "text",
        frozenset({Capability.GRADIENTS, Capability.BATCH_SIZE, Capability.SEQUENCE_LENGTHS, Capability.PUBLIC_PRIOR}),
        "Balunović, Dimitrov, Jovanović, Vechev. LAMP: Extracting Text from Gradients with Language Model "
        "Priors. NeurIPS 2022", prior="text")

    def __init__(self, config: TextAttackConfig | None = None) -> None:
        self.config = config or self.default_config()

    @classmethod
    def default_config(cls) -> TextAttackConfig:
        return LAMP_DEFAULTS

    def reconstruct(self, obs: Observation, model: nn.Module, prior: TextPrior, *,
                    generator: torch.Generator) -> Reconstruction[list[str]]:
        return TextSearch(self.config, obs, model, prior, generator).run()
