"""Log-space CTC in plain autograd (double-backward capable).

``torch.nn.functional.ctc_loss`` has no double backward (``derivative for
_ctc_loss_backward is not implemented``), so gradient matching cannot differentiate
through it. This is the forward (alpha) recursion of Graves et al. 2006 in log space, one
vectorised step per frame; it returns the same per-utterance negative log-likelihood as
``ctc_loss(..., reduction="none")`` and works under ``torch.func.grad``/``vmap``.
"""
from __future__ import annotations

import torch
from torch import Tensor

NEG = -1e5  # finite "log zero": keeps logsumexp gradients NaN-free


def _lse(stacked: Tensor) -> Tensor:
    """logsumexp over dim 0 from elementary ops (a detached max shift), so that every
    derivative order is finite; torch.logsumexp's double backward gives NaN here."""
    m = stacked.max(dim=0).values.detach()
    return m + torch.log(torch.exp(stacked - m.unsqueeze(0)).sum(0))


def ctc_nll(log_probs: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor,
            *, blank: int = 0) -> Tensor:
    """Per-utterance CTC negative log-likelihood.

    log_probs [B, T, V] (log-softmax over V, batch first); targets [B, S] (padded);
    input_lengths [B]; target_lengths [B]. Returns [B]. Unreachable alignments (T too short)
    give a huge value (about 1e5) instead of inf.
    """
    if log_probs.dim() != 3:
        raise ValueError(f"log_probs must be [B, T, V], got shape {tuple(log_probs.shape)}")
    b, t_max, _ = log_probs.shape
    s = targets.shape[1]
    L = 2 * s + 1
    ext = torch.full((b, L), blank, dtype=torch.long, device=log_probs.device)
    ext[:, 1::2] = targets.long()
    lp = torch.gather(log_probs, 2, ext.unsqueeze(1).expand(b, t_max, L))  # [B, T, L]
    prev2 = torch.cat([torch.full_like(ext[:, :2], -1), ext[:, :-2]], dim=1)
    skip_ok = (ext != blank) & (ext != prev2)
    pos = torch.arange(L, device=log_probs.device)
    neg = torch.full_like(lp[:, 0], NEG)
    alpha = torch.where(pos.unsqueeze(0) < 2, lp[:, 0], neg)
    alpha = torch.where((pos.unsqueeze(0) == 1) & (target_lengths.unsqueeze(1) == 0), neg, alpha)
    pad1 = torch.full_like(alpha[:, :1], NEG)
    pad2 = torch.full_like(alpha[:, :2], NEG)
    in_len = input_lengths.to(log_probs.device).unsqueeze(1)
    for t in range(1, t_max):
        a1 = torch.cat([pad1, alpha[:, :-1]], dim=1)
        a2 = torch.cat([pad2, alpha[:, :-2]], dim=1)
        a2 = torch.where(skip_ok, a2, neg)
        new = _lse(torch.stack([alpha, a1, a2])) + lp[:, t]
        alpha = torch.where(in_len > t, new, alpha)
    tl = target_lengths.to(log_probs.device).long()
    last = torch.gather(alpha, 1, (2 * tl).unsqueeze(1)).squeeze(1)
    before = torch.gather(alpha, 1, (2 * tl - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    before = torch.where(tl > 0, before, torch.full_like(before, NEG))
    return -_lse(torch.stack([last, before]))
