"""Label recovery from the last layer's gradient (no model inversion needed).

* iDLG (Zhao et al. 2020, arXiv 2001.02610): for a single example with softmax +
  cross-entropy, the last layer's gradient row of the true class is the only one with a
  negative sign (bias entry, or row sum of the weight when the inputs are non-negative).
* Batches: the label-count estimate of Geng et al. 2021 ("Towards general deep leakage
  in federated learning"): with mean reduction the bias gradient is
  g_c = (1/B) Σ_b (p_bc − y_bc), so n_c ≈ B·(p̄_c − g_c). p̄ is estimated from the model's
  softmax on public dummy inputs, as in the paper. Counts are rounded by largest remainder
  so they sum to B.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor


def _class_signal(tensors: Mapping[str, Tensor], weight: str | None, bias: str | None) -> Tensor:
    if bias is not None and bias in tensors:
        return tensors[bias].detach().double().flatten().cpu()  # counts are numpy: work on the CPU
    if weight is not None and weight in tensors:
        return tensors[weight].detach().double().sum(dim=1).cpu()
    raise ValueError("label recovery needs the last layer's gradient: the observation has neither its weight nor its bias")


def idlg_label(tensors: Mapping[str, Tensor], *, weight: str | None, bias: str | None) -> int:
    """iDLG: the class whose last-layer gradient entry is most negative (B = 1)."""
    return int(torch.argmin(_class_signal(tensors, weight, bias)).item())


def label_counts(
    tensors: Mapping[str, Tensor],
    *,
    num_examples: int,
    weight: str | None,
    bias: str | None,
    mean_probs: Tensor | None = None,
    reduction: str = "mean",
) -> np.ndarray:
    """Estimated count of each class in the batch (Geng et al. 2021)."""
    g = _class_signal(tensors, weight, bias)
    c = g.numel()
    if mean_probs is None:
        mean_probs = torch.full((c,), 1.0 / c, dtype=torch.double)
    mean_probs = mean_probs.detach().double().flatten().cpu()
    if bias is None or bias not in tensors:
        # weight-row sums are scaled by the (unknown) activations: use only the sign pattern
        neg = (g < 0).double()
        share = neg / neg.sum() if neg.sum() > 0 else torch.full_like(g, 1.0 / c)
        raw = share * num_examples
    else:
        gb = g if reduction == "mean" else g / num_examples
        raw = (num_examples * (mean_probs - gb)).clamp(min=0)
        if raw.sum() <= 0:
            raw = torch.full_like(g, num_examples / c)
        raw = raw * (num_examples / raw.sum())
    floor = torch.floor(raw)
    rem = int(num_examples - floor.sum().item())
    order = torch.argsort(raw - floor, descending=True)
    counts = floor.clone()
    counts[order[:rem]] += 1
    return counts.long().numpy()


def recover_labels(
    tensors: Mapping[str, Tensor],
    *,
    num_examples: int,
    weight: str | None,
    bias: str | None,
    mean_probs: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Labels for the batch (order-free: sorted by class), iDLG for B = 1, counts otherwise."""
    if num_examples == 1:
        return torch.tensor([idlg_label(tensors, weight=weight, bias=bias)])
    counts = label_counts(tensors, num_examples=num_examples, weight=weight, bias=bias,
                          mean_probs=mean_probs, reduction=reduction)
    return torch.tensor(np.repeat(np.arange(len(counts)), counts))


def label_accuracy(predicted: Iterable[int], true: Iterable[int]) -> float | None:
    """Recovered labels scored as a multiset (order-free): the share of agreeing positions
    after sorting both; ``None`` when the counts differ (no score rather than a wrong one)."""
    p = sorted(int(x) for x in predicted)
    t = sorted(int(x) for x in true)
    if len(p) != len(t) or not t:
        return None
    return sum(a == b for a, b in zip(p, t)) / len(t)
