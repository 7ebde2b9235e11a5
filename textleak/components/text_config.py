"""The configuration shared by TAG and LAMP (their presets are instances with each paper's defaults)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from .tokens import Filter


@dataclass(frozen=True)
class TextAttackConfig:
    RANGES: ClassVar[dict[str, str]] = {  # checked by common.attack.validate_config
        "lr": ">0", "lr_decay": "(0,1]", "lr_step": ">=1", "n_steps": ">=1", "grad_clip": ">0",
        "init_size": ">0", "init_candidates": ">=1", "swap_burnin": "[0,1]",
        "swap_every": ">=1", "swap_candidates": ">=1", "lm_topk": ">=1", "topk_factor": ">0", "chunk": ">=1",
        "ghost_chunk": ">=1", "ghost_lowrank": "(0,1)", "lm_screen": ">0"}
    loss: Literal["cos", "tag", "l2"] = "cos"
    tag_factor: float = 0.01
    lr: float = 0.01
    lr_decay: float = 0.9  # StepLR gamma every lr_step steps
    lr_step: int = 50
    n_steps: int = 2000
    grad_clip: float | None = None
    coeff_reg: float = 0.1  # embedding-norm regulariser
    init_size: float | None = 1.4  # None: mean norm of the allowed token embeddings
    coeff_perplexity: float = 0.1  # LM prior weight in the discrete step
    init_candidates: int = 500
    init_permutations: int = 500
    use_swaps: bool = True
    swap_burnin: float = 0.1
    swap_every: int = 75
    swap_candidates: int = 200
    lm_topk: int | None = None  # score the LM only on the k best candidates by gradient loss (None: all)
    token_filter: Filter = "auto"
    topk_factor: float = 3.0
    labels: Literal["recover", "optimize"] = "recover"  # when the labels are not granted
    batched: bool = True  # vectorised candidate scoring (False: one candidate at a time)
    chunk: int = 16  # candidates per vectorised call (at most; capped by gradmatch.vmap_chunk to ~1 GiB of gradients)
    ghost: bool = True  # score candidates from layer inputs/output gradients (False: vmap per-candidate gradients)
    ghost_chunk: int = 16  # candidates per ghost call (16: ~90 MB lower peak than 32 on MiniLM, same speed)
    ghost_step: bool = True  # continuous step from the ghost products too (False: autograd through the dummy gradient)
    ghost_lowrank: float | None = 1e-6  # ghost paths: low-rank Linear targets as truncated SVDs dropping <= this (None: dense)
    lm_shared_prefix: bool = True  # LM prior: a round's texts share the current text's prefixes (False: padded batch)
    # swap rounds: the LM under bf16 first, float32 only for candidates that can be the argmin if bf16 NLLs are
    # within this many nats (components/lm_screen.py; None: float32 for every new text, as before session 20)
    lm_screen: float | None = 0.25
    lm_bf16: bool = False  # LM prior under CPU bf16 autocast (about 2x faster on AMX CPUs; NLLs move ~0.01 nats)
