"""Honest ``certified`` flags for the exact search (issue 20, an addition).

The exact search's span tests are necessary, not sufficient: near the rank limit of a small width (the 64-wide
tiny BERT at B=5, rank 42/48 of 64) wrong sentences pass them too. A sentence is therefore flagged certified only
when a check that can fail confirms it:

1. *The whole update* (``explains``): with FedSGD, no noise, a known loss and batch size (``peel.can_peel``), the B
   output sentences' exact per-example gradients (float64 copy of the model, ``peel.peel``'s scale, the labels read
   from the classifier head's update, else the assignment that fits best) must sum to the observed update of the first two blocks' attention-input
   projections (the tensors DAGER reads) within ``TOL`` relative residual norm. Then every sentence is certified.
2. Otherwise, for encoders with layer 1 unsaturated, per sentence by ``certify.py``'s layer-1 certificate (its
   exact gradient with some label removes layer-1 directions down to the round-off floor).
3. Otherwise not certified. Where no check applies (FedAvg deltas, declared noise, an unknown loss or batch size)
   the previous rule stays: certified means "passed the exact span tests on a noise-free update".

Decoders keep that previous rule too: ``explains`` checks them the same way (no label; GPT-2 B=8, development seed
0, trial 0: residual 8.1e-7 on the output, all right), but the float64 LM head's softmax over the vocabulary made
the check 5.4 of 23.2 CPU s (23 %), not a cheap addition.
"""
from __future__ import annotations

import itertools
import math
import time
from typing import Any, Callable

import torch
from torch import nn

from common.types import Batch, Observation

from .certify import Certifier
from .peel import can_peel, loss_scale
from .run import declared_sigma
from .span import Tap, model_device

#: relative residual norm ||U - sum_i g_i|| / ||U|| under which the sentences explain the update. Measured (development
#: seeds 0-1, trials 0-2, ``bench/dager_flags.py``, ``bench/dager_flags_tol.py``): MiniLM's true sentences (float32 client) 9.1e-7 to
#: 1.7e-6 at B=4/8/16/32, one of them cut by a token or one token swapped 0.035 to 0.60; the tiny float64 BERT
#: 2.0e-16 (B=4), its wrong B=5/6 outputs 0.40 / 0.50
TOL = 1e-5
#: label assignments searched exhaustively up to this many (encoders), by coordinate descent above
EXHAUSTIVE = 1 << 12


def flags(obs: Observation, f64: Callable[[], nn.Module], prior: Any, kind: str, sents: list[list[int]],
          taps: tuple[Tap, Tap], stats: dict[str, float]) -> list[bool]:
    """The per-sentence certified flags of the exact search's output ``sents``; ``f64`` gives the float64 copy of
    the model (made by the caller once, when first needed)."""
    if not (kind == "encoder" and can_peel(obs, prior) and declared_sigma(obs) == 0.0):
        return [declared_sigma(obs) == 0.0] * len(sents)  # no check (or decoders): the span tests only
    c0 = time.process_time()
    gmodel = f64()
    names = list(dict.fromkeys(n for tap in taps for n in tap.names if n and n in obs.tensors))
    rel = explains(obs, gmodel, prior, kind, sents, names)
    stats["cert_residual"] = rel
    out = [False] * len(sents)
    if rel <= TOL:
        out = [True] * len(sents)
    elif kind == "encoder" and not stats.get("saturated_l1"):
        cert = Certifier(obs, gmodel, prior, taps)
        if cert.usable:
            out = [cert.label(list(s)) is not None for s in sents]
    stats["cert_cpu_seconds"] = time.process_time() - c0
    return out


def explains(obs: Observation, gmodel: nn.Module, prior: Any, kind: str, sents: list[list[int]],
             names: list[str]) -> float:
    """The relative residual norm of ``obs``'s tensors ``names`` after subtracting the sentences' exact gradients
    (inf when there are not exactly B nonempty sentences): one padded float64 forward and backward of the B
    sentences, as the client's step. Encoders' labels are read from the classifier head's update in that same
    forward (``_head_labels``), else chosen among all labels' per-example gradients (``_assign``)."""
    b = obs.num_examples
    if not names or b is None or len(sents) != b or not all(sents):
        return math.inf
    scale = loss_scale(obs)
    params = dict(gmodel.named_parameters())
    target = torch.cat([obs.tensors[n].detach().double().flatten().cpu() for n in names])
    norm = float(target.norm())
    if norm == 0.0:
        return math.inf
    dev = model_device(gmodel)
    head = _head(obs, gmodel, prior) if kind == "encoder" else None  # (module, its observed update)

    def grad(seqs: list[list[int]], ys: list[int] | None) -> torch.Tensor:
        n = max(len(q) for q in seqs)
        ids = torch.tensor([list(q) + [int(getattr(prior, "pad_id", 0))] * (n - len(q)) for q in seqs], device=dev)
        mask = torch.tensor([[1] * len(q) + [0] * (n - len(q)) for q in seqs], device=dev)
        fixed = ys if ys is not None or kind != "encoder" else [0] * len(seqs)
        batch = Batch({"input_ids": ids, "attention_mask": mask},
                      torch.tensor(fixed, device=dev) if fixed is not None else None)
        got: list[torch.Tensor] = []
        hook = head[0].register_forward_hook(lambda m, i, o: got.extend((i[0], o))) if ys is None and head else None
        try:
            with torch.enable_grad():
                loss = prior.loss_fn(gmodel, batch).sum() * scale
                if hook is not None:  # CE(z, y) = CE(z, 0) + z_0 - z_y, y read from this forward's head
                    z = got[1]
                    y = _head_labels(head[1], got[0].detach(), z.detach(), scale)
                    loss = loss + scale * (z[:, 0] - z[torch.arange(len(y)), torch.tensor(y, device=dev)]).sum()
                gs = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        finally:
            if hook is not None:
                hook.remove()
        return torch.cat([(g if g is not None else torch.zeros_like(params[n])).detach().flatten().cpu()
                          for n, g in zip(names, gs)])

    ys: list[int] | None = None
    if kind == "encoder" and head is None:
        k = int(getattr(prior, "num_labels", None) or 2)
        vec = torch.stack([grad([s], [y]) for s in sents for y in range(k)]).view(b, k, -1)
        ys = _assign(target, vec)
    return float((target - grad(sents, ys)).norm()) / norm


def _head(obs: Observation, gmodel: nn.Module, prior: Any) -> tuple[nn.Module, torch.Tensor] | None:
    """The classifier head (``prior.label_weight``'s module) and its weight's observed update, when observed and
    its inputs can be independent (at most its width of sentences)."""
    name = getattr(prior, "label_weight", None)
    if not name or name not in obs.tensors:
        return None
    w = dict(gmodel.named_parameters())[name]
    head = next((m for m in gmodel.modules() if getattr(m, "weight", None) is w), None)
    ok = head is not None and w.dim() == 2 and obs.num_examples <= w.shape[1]
    return (head, obs.tensors[name]) if ok else None


def _head_labels(upd: torch.Tensor, h: torch.Tensor, z: torch.Tensor, scale: float) -> list[int]:
    """Each sentence's label from the classifier head's observed update ``scale * sum_i (p_i - e_{y_i}) h_i^T``:
    with the head inputs ``h_i`` and logits ``z_i`` of the sentences, the least-squares coefficients of
    ``sum_i p_i h_i^T - update / scale`` on the ``h_i`` are the one-hot labels."""
    h, p = h.double().cpu(), z.double().softmax(-1).cpu()  # [B, d], [B, k]
    rhs = p.T @ h - upd.detach().double().cpu() / scale  # [k, d] = sum_i e_{y_i} h_i^T
    coef = torch.linalg.lstsq(h.T, rhs.T).solution  # [B, k]
    return [int(c.argmax()) for c in coef]


def _assign(target: torch.Tensor, vec: torch.Tensor) -> list[int]:
    """The label per sentence minimising ``||target - sum_i vec[i, y_i]||`` (exhaustive over assignments up to
    ``EXHAUSTIVE``, from the Gram matrix; coordinate descent above)."""
    b, k, _ = vec.shape
    flat = vec.reshape(b * k, -1)
    gram = flat @ flat.T
    tv = flat @ target
    if k ** b <= EXHAUSTIVE:
        combos = torch.tensor(list(itertools.product(range(k), repeat=b)), dtype=torch.long)
        idx = combos + torch.arange(b) * k  # [C, b] rows of flat
        cost = -2.0 * tv[idx].sum(1) + gram[idx.unsqueeze(2), idx.unsqueeze(1)].sum((1, 2))
        return combos[int(cost.argmin())].tolist()
    y = [int(tv.view(b, k)[i].argmax()) for i in range(b)]
    for _ in range(10):
        changed = False
        for i in range(b):
            rest = target - sum(vec[j, y[j]] for j in range(b) if j != i)
            best = int(min(range(k), key=lambda c: float((rest - vec[i, c]).norm())))
            changed |= best != y[i]
            y[i] = best
        if not changed:
            break
    return y
