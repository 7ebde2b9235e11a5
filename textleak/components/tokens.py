"""Token support from the word-embedding gradient, and nearest-token decoding."""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..prior import TextPrior

Filter = Literal["auto", "nonzero", "norm-topk", "none"]


def token_support(embedding_grad: Tensor | None, prior: TextPrior, *, mode: Filter = "auto", n_tokens: int = 0,
                  topk_factor: float = 3.0, tol: float = 1e-9) -> Tensor:
    """Boolean mask [V] of the tokens allowed inside a sentence body.

    ``nonzero`` (LAMP ``--use_embedding``): rows of the observed word-embedding gradient with
    ``abs().sum() > tol``; exact for encoders, whose embedding matrix is only used at the input.
    ``norm-topk`` (breaching's ``embedding-norm``): the ``topk_factor · n_tokens`` rows of largest
    norm, for models whose input embedding is tied to the output layer (every row then gets a
    gradient). ``auto`` picks ``nonzero`` unless it keeps more than half the vocabulary.
    Special and unused ids are always excluded (LAMP's default exclusion list).
    """
    v = prior.vocab_size
    allowed = torch.ones(v, dtype=torch.bool)
    if embedding_grad is not None and mode != "none":
        g = embedding_grad.detach().float().cpu()
        nonzero = g.abs().sum(1) > tol
        use = mode
        if mode == "auto":
            use = "nonzero" if int(nonzero.sum()) <= v // 2 else "norm-topk"
        if use == "nonzero":
            allowed = nonzero
        else:
            k = min(v, max(1, int(topk_factor * max(n_tokens, 1))))
            allowed = torch.zeros(v, dtype=torch.bool)
            allowed[g.norm(dim=1).topk(k).indices] = True
    if prior.special_ids:
        allowed[list(prior.special_ids)] = False
    if not bool(allowed.any()):
        raise ValueError("token filtering left no candidate token; use --set token_filter=none")
    return allowed


def nearest_tokens(x: Tensor, embedding: Tensor, allowed: Tensor, metric: str = "cos") -> Tensor:
    """Id of the nearest allowed embedding row for every vector in ``x [..., d]``."""
    flat = x.detach().reshape(-1, x.shape[-1])
    e = embedding
    if metric == "cos":
        s = torch.nn.functional.normalize(flat, dim=-1) @ torch.nn.functional.normalize(e, dim=-1).T
    else:
        s = -torch.cdist(flat, e)
    s[:, ~allowed.to(s.device)] = float("-inf")
    return s.argmax(-1).reshape(x.shape[:-1])
