"""A fast, exact layer-1 vocabulary scan for models whose first-layer input is
``LayerNorm(word[t] + q_p)`` (learned absolute positions: GPT-2, BERT; ``q_p`` holds the position
row and any constant such as BERT's token-type row).

The plain scan pushes the whole vocabulary through the model at every position and projects every
vector onto the span: ``V x d x r`` multiply-adds per position (GPT-2 at B=8: 15 GFLOP, about half a
second per position on one core). Here a position costs ``O(V k)`` after one ``V x d x k``
precomputation, where ``C`` [d, k] holds ``k`` orthonormal directions of the span's orthogonal
complement: for a unit vector ``y``, ``|C^T y| <= |(I - R R^T) y|`` (its distance to the span),
so ``|C^T y|`` is a lower bound that needs no per-position matrix product. LayerNorm's mean,
variance and the norm of its output are sums over ``d`` that split into per-token terms (computed
once), per-position terms, and two matrix-vector products ``W q_p`` and ``W (gamma^2 q_p)``.

Only the tokens whose lower bound is under ``PREFILTER`` are pushed through the model and measured
exactly (``span_distance``, as the plain scan); every other token is farther than ``PREFILTER`` from
the span and so above any threshold the scan may use (the caller checks ``tau_1 < EXACT_MAX``). The
candidates and their distances are therefore those of the plain scan. :meth:`AffineScan.build`
returns None (the plain scan is used) unless the decomposition reproduces the model's own layer-1
inputs on probe tokens and positions.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from .config import CHUNK
from .run import Run
from .span import DagerPreconditionError, LayerInputs, Span, first_layer_vectors, model_device, span_distance

PREFILTER = 0.11  # tokens with lower bound under this are measured exactly
EXACT_MAX = 0.09  # the fast scan is used only when tau_1 is below this
SCAN_BLOCK = 8  # positions whose lower bounds are computed together
COMPLEMENT_DIRS = 64  # k: complement directions of the lower bound
_PROBE_TOKENS = (0, 1, 2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43)


class AffineScan:
    """Lower bounds of the layer-1 span distance of every vocabulary token at any position."""

    def __init__(self, ln: nn.LayerNorm, word: Tensor, q: Tensor) -> None:
        self.word = word  # [V, d] (model dtype)
        self.q = q.to(torch.float64)  # [P, d]: LayerNorm input minus word row, per position
        d = word.shape[1]
        self.d = d
        self.eps = float(ln.eps)
        gamma = ln.weight.detach() if ln.weight is not None else torch.ones(d, dtype=word.dtype)
        beta = ln.bias.detach() if getattr(ln, "bias", None) is not None else torch.zeros(d, dtype=word.dtype)
        self.gamma, self.beta = gamma.to(torch.float64).cpu(), beta.to(torch.float64).cpu()
        w = word.float().cpu()
        g2, gb = self.gamma.pow(2), self.gamma * self.beta
        stats = w @ torch.stack([torch.ones(d, dtype=torch.float64), g2, gb], 1).float()  # [V, 3]
        self.mean_e = stats[:, 0].double() / d
        self.g2e, self.gbe = stats[:, 1].double(), stats[:, 2].double()
        self.ee = w.pow(2).sum(1).double()
        self.g2ee = (w.pow(2) @ g2.float()).double()
        self.w = w

    @classmethod
    def build(cls, li1: LayerInputs, positions: int) -> AffineScan | None:
        """The decomposition when the model's layer-1 input is ``ln(word[t] + q_p)`` for an
        ``nn.LayerNorm`` ``ln`` whose output the tap reads, checked on probe tokens at probe
        positions; None otherwise."""
        model = li1.model
        emb = model.get_input_embeddings()
        word = emb.weight.detach().cpu()  # the probes below compare with _ln_inputs (CPU) on any device
        vocab = word.shape[0]
        toks = torch.tensor([t % vocab for t in _PROBE_TOKENS]).unique()
        probe_pos = sorted({0, 1, positions // 2, positions - 1})
        ln = _feeding_layernorm(li1, toks[:2])
        if ln is None:
            return None
        try:
            q = _ln_inputs(li1, ln, torch.tensor([int(toks[0])]), list(range(positions)))[:, 0] \
                - word[int(toks[0])].to(torch.float64)  # [P, d]
        except RuntimeError:
            return None
        for p in probe_pos:
            u = _ln_inputs(li1, ln, toks, [p])[0]  # [T, d]
            want = word[toks].to(torch.float64) + q[p]
            if not torch.allclose(u, want, rtol=1e-5, atol=1e-6 * float(want.abs().max())):
                return None
        return cls(ln, word, q)

    def lower_bound(self, comp: tuple[Tensor, Tensor], positions: list[int]) -> Tensor:
        """``|C^T y| / |y|`` [V, P] for every token's layer-1 input ``y`` at each of ``positions``;
        ``comp`` is ``(C, (gamma * W) C)`` from :meth:`complement`.

        With ``u = w_t + q_p``, ``y = gamma (u - mu) / s + beta``: ``C^T y = a A_t + a c_p + b g + h``
        with ``A = (gamma W) C``, ``a = 1/s``, ``b = -mu/s`` (per token and position) and the fixed
        vectors ``c_p = C^T (gamma q_p)``, ``g = C^T gamma``, ``h = C^T beta``; its squared norm and
        ``|y|^2`` expand into per-token sums (precomputed), per-position sums and the matrix products
        ``W [q_p, gamma^2 q_p]`` and ``A [c_p]``, all in float64 but for the products."""
        c, wc = comp
        q = self.q[positions]  # [P, d]
        g, bt = self.gamma, self.beta
        d = self.d
        g2 = g.pow(2)
        wq = (self.w @ torch.cat([q, q * g2], 0).t().float()).double()  # [V, 2P]
        n = len(positions)
        wq, wg2q = wq[:, :n], wq[:, n:]
        mu = self.mean_e.unsqueeze(1) + q.mean(1)  # [V, P]
        var = (self.ee.unsqueeze(1) + 2.0 * wq + (q * q).sum(1)) / d - mu * mu
        s = (var.clamp_min(0.0) + self.eps).sqrt()
        g2uu = self.g2ee.unsqueeze(1) + 2.0 * wg2q + (q * q) @ g2
        g2u = self.g2e.unsqueeze(1) + q @ g2
        gbu = self.gbe.unsqueeze(1) + q @ (g * bt)
        num1 = (g2uu - 2.0 * mu * g2u + mu * mu * float(g2.sum())).clamp_min(0.0)  # sum gamma^2 (u - mu)^2
        num2 = gbu - mu * float(g @ bt)  # sum gamma beta (u - mu)
        ynorm2 = (num1 / (s * s) + 2.0 * num2 / s + float(bt @ bt)).clamp_min(1e-300)
        cq = (q * g) @ c  # [P, k]
        cg, ch = c.t() @ g, c.t() @ bt  # [k]
        a, b = 1.0 / s, -mu / s  # [V, P]
        aq = (wc @ cq.t().float()).double()  # A_t . c_p  [V, P]
        z2 = (a * a * self.wc2.unsqueeze(1) + 2.0 * a * (a * aq + b * self.wcg.unsqueeze(1) + self.wch.unsqueeze(1))
              + a * a * (cq * cq).sum(1) + b * b * float(cg @ cg) + float(ch @ ch)
              + 2.0 * a * b * (cq @ cg) + 2.0 * a * (cq @ ch) + 2.0 * b * float(cg @ ch))
        return (z2.clamp_min(0.0) / ynorm2).sqrt()

    def complement(self, basis: Tensor, k: int = COMPLEMENT_DIRS) -> tuple[Tensor, Tensor]:
        """``k`` orthonormal directions of the orthogonal complement of ``basis`` [d, r] (float64,
        deterministic) and ``(gamma * W) C`` [V, k] (float32); caches the per-token products."""
        r64 = basis.to(torch.float64).cpu()
        d, r = r64.shape
        k = max(1, min(k, d - r))
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(d, k, generator=gen, dtype=torch.float64)
        for _ in range(2):  # project out the span twice (re-orthogonalisation)
            x = x - r64 @ (r64.t() @ x)
        return self.columns(torch.linalg.qr(x).Q)

    def columns(self, c: Tensor) -> tuple[Tensor, Tensor]:
        """``(C, (gamma * W) C)`` for orthonormal columns ``C`` [d, k] (float64), caching the
        per-token products that :meth:`lower_bound` needs."""
        c = c.to(torch.float64).cpu()
        wc = (self.w * self.gamma.float()) @ c.float()
        w64 = wc.double()
        self.wc2 = w64.pow(2).sum(1)
        self.wcg = w64 @ (c.t() @ self.gamma)
        self.wch = w64 @ (c.t() @ self.beta)
        return c, wc

    def ranked(self, li1: LayerInputs, basis: Tensor, positions: list[int], keep: int,
               proj: tuple[Tensor, Tensor]) -> list[tuple[Tensor, Tensor]]:
        """The ``keep`` tokens nearest to span(basis) at each of ``positions`` (ids, distances;
        nearest first). ``proj`` is :meth:`columns` of ``basis``: then :meth:`lower_bound` is the
        norm of the projection onto the span, and ``sqrt(1 - proj^2)`` the distance itself (its
        float32 products make it approximate); the ``4 keep`` nearest by it are measured exactly."""
        near = (1.0 - self.lower_bound(proj, positions).pow(2)).clamp_min(0.0).sqrt()  # [V, P]
        out = []
        for j, p in enumerate(positions):
            ids = near[:, j].topk(min(4 * keep, near.shape[0]), largest=False).indices
            d = span_distance(basis, first_layer_vectors(li1, ids, p), exact_below=1.01)
            v, i = d.topk(min(keep, d.numel()), largest=False)
            out.append((ids[i], v))
        return out

    def scan(self, li1: LayerInputs, basis: Tensor, comp: tuple[Tensor, Tensor], positions: list[int]) -> list[Tensor]:
        """Span distances [V] at each of ``positions``: exact (as ``span_distance``) for the tokens
        whose lower bound is under ``PREFILTER``, ``inf`` for the others (all farther than that)."""
        lb = self.lower_bound(comp, positions)
        out = []
        for j, p in enumerate(positions):
            ids = torch.nonzero(lb[:, j] < PREFILTER).flatten()
            d = torch.full((lb.shape[0],), float("inf"), dtype=torch.float64)
            if ids.numel():
                d[ids] = span_distance(basis, first_layer_vectors(li1, ids, p))
            out.append(d)
        return out

def _feeding_layernorm(li1: LayerInputs, toks: Tensor) -> nn.LayerNorm | None:
    """The ``nn.LayerNorm`` whose output equals the tap's input (on ``toks`` at position 0)."""
    model = li1.model
    outs: list[tuple[nn.Module, Tensor]] = []
    hs = [m.register_forward_hook(lambda mod, _a, out: outs.append((mod, out.detach())))
          for m in model.modules() if isinstance(m, nn.LayerNorm)]
    dev = model_device(model)
    try:
        x = first_layer_vectors(li1, toks, 0)
    finally:
        for h in hs:
            h.remove()
    for mod, out in outs:
        if out.dim() == 3 and out.shape[0] == x.shape[0] and torch.equal(out[:, 0].to(dev), x.to(dev)):
            return mod  # type: ignore[return-value]
    return None


def _ln_inputs(li1: LayerInputs, ln: nn.Module, toks: Tensor, positions: list[int]) -> Tensor:
    """The input of ``ln`` for every token of ``toks`` alone at each of ``positions`` -> [P, T, d]
    (float64), in one forward of ``P * T`` one-token rows."""
    dev = model_device(li1.model)
    ids = toks.repeat(len(positions)).view(-1, 1).to(dev)
    pos = torch.tensor(positions).repeat_interleave(toks.numel()).view(-1, 1).to(dev)
    got: list[Tensor] = []
    h = ln.register_forward_pre_hook(lambda _m, a: got.append(a[0].detach()))
    try:
        li1(ids, position_ids=pos)
    finally:
        h.remove()
    if len(got) != 1:
        raise RuntimeError("the LayerNorm did not run once per forward")
    return got[0][:, 0].to(torch.float64).cpu().view(len(positions), toks.numel(), -1)


def scan_l1(run: Run, li1: LayerInputs, span1: Span, max_len: int, position_free: bool):
    """Layer-1 filter: per position, the vocabulary tokens whose first-layer input lies in the span
    (``[(token ids, distances)]`` up to the first position with none)."""
    vocab = int(li1.model.get_input_embeddings().num_embeddings)
    all_ids = torch.arange(vocab)
    l1: list[tuple[list[int], Tensor]] = []
    t_scan = time.perf_counter()
    scan, block = None, []
    if run.fast and not position_free and run.tau[0] < EXACT_MAX:
        scan = AffineScan.build(li1, max_len)
    comp = scan.complement(span1.basis) if scan is not None else None
    run.stats["fast_scan"] = float(scan is not None)
    for p in range(max_len):
        if position_free and p > 0:
            l1.append(l1[0])
            continue
        if scan is not None and comp is not None:
            if p % SCAN_BLOCK == 0:  # positions in blocks: the lower bounds share matrix products
                block = scan.scan(li1, span1.basis, comp, list(range(p, min(p + SCAN_BLOCK, max_len))))
            d = block[p % SCAN_BLOCK]
        else:
            d = span_distance(span1.basis, first_layer_vectors(li1, all_ids, p, chunk=CHUNK))
        keep = torch.nonzero(d < run.gap_threshold(d, 0)).flatten()
        keep = keep[d[keep].argsort()]
        if keep.numel() == 0:
            break
        l1.append((keep.tolist(), d[keep]))
    stats = run.stats
    stats["scan_seconds"] = time.perf_counter() - t_scan
    stats["position_free"] = float(position_free)
    stats["l1_candidates"] = float(sum(len(c) for c, _ in l1[:1] if position_free) if position_free
                                   else sum(len(c) for c, _ in l1))
    if not l1:
        raise DagerPreconditionError("no vocabulary token lies in the layer-1 span (threshold too strict, "
                                     "or the update is too noisy); raise l1_span_thresh")
    return l1
