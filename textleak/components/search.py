"""The optimisation engine shared by TAG and LAMP (LAMP's ``attack.py``; TAG is its ``--baseline``).

Continuous part (the core's Adam loop, ``common.optim.adam``): Adam on the dummy input embeddings of every sentence body (special tokens and
padding pinned, LAMP's ``fix_special_tokens``), loss = gradient distance + ``coeff_reg`` ·
(mean body-token norm − ``init_size``)², StepLR every ``lr_step`` steps.
Discrete part (LAMP only): every ``swap_every`` steps after ``swap_burnin``, for each sentence,
``swap_candidates`` sequence transformations (swap two tokens, move a token, move a span, move a
prefix to the end; candidate 0 = identity) are scored by gradient distance + ``coeff_perplexity``
· LM NLL of the decoded text, and the best is kept. Candidates are scored from one batched forward
+ backward without forming their gradients (:mod:`textleak.components.ghost`; ``ghost``), or else
in one vectorised per-candidate-gradient call (:mod:`textleak.components.gradmatch`) reduced to
distances chunk by chunk; a proposal drawn twice is scored once; LM NLLs come from padded
forwards with a per-text cache (``lm_screen``: a bf16 pass first, float32 only where the argmin can be,
:mod:`textleak.components.lm_screen`). With B = 1 and ghost scoring no gradient is materialised in the
discrete step at all, and with ``ghost_step`` none in the continuous step either
(:meth:`GradMatcher.ghost_batch_distance`); both take a low-rank observed ``Linear`` gradient as its truncated SVD
(``ghost_lowrank``, :meth:`GradMatcher.ghost_target`).
Initialisation: ``init_candidates`` random Gaussian batches, the best by gradient distance, then
``init_permutations`` random permutations of its body positions, then rescaling to
``init_size``.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor, nn

from common.grads import observed_gradient
from common.labels import recover_labels
from common.optim import adam, step_lr
from common.seed import numpy_rng
from common.types import Observation, Reconstruction

from ..prior import TextPrior
from .gradmatch import GradMatcher
from .lm_screen import screen
from .moves import first_occurrences as _first_occurrences, propose_moves
from .text_config import TextAttackConfig
from .tokens import nearest_tokens, token_support

__all__ = ["TextAttackConfig", "TextSearch"]


class TextSearch:
    def __init__(self, cfg: TextAttackConfig, obs: Observation, model: nn.Module, prior: TextPrior,
                 generator: torch.Generator) -> None:
        self.cfg, self.obs, self.model, self.prior, self.gen = cfg, obs, model, prior, generator
        self.rng: np.random.Generator = numpy_rng(generator)
        self.B = obs.require_num_examples()
        if obs.seq_lens is None:
            raise ValueError("TAG/LAMP need the sequence lengths (LAMP's know_padding): grant Capability.SEQUENCE_LENGTHS")
        self.lens = [int(n) for n in obs.seq_lens]
        if len(self.lens) != self.B:
            raise ValueError(f"{len(self.lens)} sequence lengths for a batch of {self.B}")
        if max(self.lens) > prior.max_len:
            raise ValueError(f"a sequence of {max(self.lens)} tokens exceeds the model's maximum of {prior.max_len}")
        self.pre, self.suf = len(prior.prefix_ids), len(prior.suffix_ids)
        if min(self.lens) < self.pre + self.suf + 1:
            raise ValueError("a sequence is shorter than its special tokens")
        self.T = max(self.lens)
        self.device = next(model.parameters()).device
        self.emb = prior.embedding.to(self.device)
        target = observed_gradient(obs)
        reduction = obs.protocol.loss_reduction if obs.protocol is not None else "mean"
        self.matcher = GradMatcher(model, prior, target, loss=cfg.loss, tag_factor=cfg.tag_factor,
                                   reduction=reduction, batch_size=self.B, chunk=cfg.chunk, lowrank=cfg.ghost_lowrank)
        n_tok = sum(n - self.pre - self.suf for n in self.lens)
        self.allowed = token_support(obs.tensors.get(prior.embedding_name), prior, mode=cfg.token_filter,
                                     n_tokens=n_tok, topk_factor=cfg.topk_factor)
        self.allowed_idx = self.allowed.nonzero().flatten().to(self.device)
        self.sub_emb = self.emb[self.allowed_idx]
        self.init_size = cfg.init_size if cfg.init_size is not None else float(self.sub_emb.norm(dim=1).mean())
        # masks and pinned embeddings
        self.mask = torch.zeros(self.B, self.T, dtype=torch.long, device=self.device)
        self.body = torch.zeros(self.B, self.T, dtype=torch.bool, device=self.device)
        self.pinned_ids = torch.full((self.B, self.T), prior.pad_id, dtype=torch.long, device=self.device)
        for b, n in enumerate(self.lens):
            self.mask[b, :n] = 1
            self.body[b, self.pre:n - self.suf] = True
            if self.pre:
                self.pinned_ids[b, :self.pre] = torch.tensor(prior.prefix_ids, device=self.device)
            if self.suf:
                self.pinned_ids[b, n - self.suf:n] = torch.tensor(prior.suffix_ids, device=self.device)
        self.pinned = self.emb[self.pinned_ids]
        self.labels, self.label_logits = self._labels()
        self.stats: dict[str, float] = {"allowed_tokens": float(self.allowed.sum())}
        self._nll_cache: dict[str, float] = {}
        self._rough_cache: dict[str, float] = {}  # lm_screen's bf16 NLLs (never used as scores)

    # -- labels ------------------------------------------------------------------------------
    def _labels(self) -> tuple[Tensor | None, Tensor | None]:
        if self.prior.kind == "decoder":
            return None, None
        if self.obs.labels is not None:
            return self.obs.labels.to(self.device), None
        if self.cfg.labels == "optimize":
            k = self.prior.num_labels or 2
            return None, torch.randn((self.B, k), generator=self.gen).to(self.device).requires_grad_(True)
        reduction = self.obs.protocol.loss_reduction if self.obs.protocol is not None else "mean"
        tensors = observed_gradient(self.obs)  # a FedAvg delta is rescaled to a mean gradient
        y = recover_labels(tensors, num_examples=self.B, weight=self.prior.label_weight,
                           bias=self.prior.label_bias, reduction=reduction)
        return y.to(self.device), None

    def _soft_labels(self) -> Tensor | None:
        if self.label_logits is not None:
            return self.label_logits.softmax(-1)
        return self.labels

    # -- helpers -----------------------------------------------------------------------------
    def pin(self, x: Tensor) -> Tensor:
        return torch.where(self.body.unsqueeze(-1), x, self.pinned)

    def ids_of(self, x: Tensor) -> Tensor:
        """Nearest allowed token per body position; pinned ids elsewhere."""
        local = nearest_tokens(x, self.sub_emb, torch.ones(self.sub_emb.shape[0], dtype=torch.bool, device=self.device))
        return torch.where(self.body, self.allowed_idx[local], self.pinned_ids)

    def targets_of(self, ids: Tensor) -> Tensor | None:
        return ids if self.prior.kind == "decoder" else None

    def texts(self, ids: Tensor) -> list[str]:
        return [self.prior.decode(ids[b, self.pre:n - self.suf].tolist()) for b, n in enumerate(self.lens)]

    def nll(self, texts: list[str]) -> Tensor:
        """LM NLL per text (cached per text; shared prefixes computed once with ``lm_shared_prefix``)."""
        todo = sorted({t for t in texts if t not in self._nll_cache})
        if todo:
            lm = self.prior.lm()
            if self.cfg.lm_bf16:
                dev = next(lm.model.parameters()).device.type
                with torch.autocast(dev, dtype=torch.bfloat16):
                    vals = lm.nll(todo, shared=self.cfg.lm_shared_prefix)
            else:
                vals = lm.nll(todo, shared=self.cfg.lm_shared_prefix)
            self._nll_cache.update(zip(todo, vals.tolist()))
        return torch.tensor([self._nll_cache[t] for t in texts])

    def rough_nll(self, texts: list[str]) -> Tensor:
        """``lm_screen``'s cheap NLLs: the LM under bf16 autocast (cached apart from :meth:`nll`'s float32 values)."""
        todo = sorted({t for t in texts if t not in self._rough_cache})
        if todo:
            lm = self.prior.lm()
            with torch.autocast(next(lm.model.parameters()).device.type, dtype=torch.bfloat16):
                self._rough_cache.update(zip(todo, lm.nll(todo, shared=self.cfg.lm_shared_prefix).tolist()))
        return torch.tensor([self._rough_cache[t] for t in texts])

    def sentence_label(self, b: int, c: int) -> Tensor | None:
        y = self._soft_labels()
        if y is None:
            return None
        y = y.detach()[b]
        return y.unsqueeze(0).expand(c, *y.shape)

    def candidate_grads(self, b: int, xc: Tensor, idc: Tensor) -> dict[str, Tensor]:
        """Gradient contributions of candidates ``xc [C, L_b, d]`` of sentence ``b``."""
        c = xc.shape[0]
        return self.matcher.sentence_grads(xc, self.sentence_label(b, c),
                                           idc if self.prior.kind == "decoder" else None, batched=self.cfg.batched)

    def candidate_distances(self, b: int, xc: Tensor, idc: Tensor, fixed: dict[str, Tensor] | None) -> Tensor:
        """Gradient distance of the batch with sentence ``b`` replaced by each candidate ``xc [C, L_b, d]``,
        the other sentences contributing ``fixed`` (``None``: zero; chunked; no C × parameter-count buffer)."""
        c = xc.shape[0]
        if self.ghost_ok():
            out = self._ghost_chunks(xc, lambda s, e: (xc[s:e], self.sentence_label(b, e - s),
                                                       idc[s:e] if self.prior.kind == "decoder" else None, None),
                                     fixed, group=1)
            if out is not None:
                return out
        if fixed is None:  # B = 1: no other sentence
            fixed = {k: torch.zeros_like(v) for k, v in self.matcher.target.items()}
        return self.matcher.sentence_distances(xc, fixed, self.sentence_label(b, c),
                                               idc if self.prior.kind == "decoder" else None,
                                               batched=self.cfg.batched)

    def score_batches(self, xs: Tensor) -> Tensor:
        """Gradient distance of whole candidate batches ``xs [C, B, T, d]`` (chunked)."""
        if self.ghost_ok():
            ghost = self._ghost_chunks(xs, self._flat_batches(xs), None, group=self.B)
            if ghost is not None:
                return ghost
        out = []
        step = self.matcher.chunk  # cfg.chunk, capped by the per-candidate gradient size (gradmatch.vmap_chunk)
        for s in range(0, xs.shape[0], step):
            chunk = xs[s:s + step]
            total = None
            for b, n in enumerate(self.lens):
                xb = chunk[:, b, :n]
                ids = self.ids_of_sentence(b, xb)
                g = self.candidate_grads(b, xb, ids)
                total = g if total is None else {k: total[k] + g[k] for k in g}
            out.append(self.matcher.distance(total, lead=1).detach())
        return torch.cat(out)

    def step_distance(self, xe: Tensor, targets: Tensor | None = None) -> Tensor:
        """Gradient distance of the dummy batch ``xe``, differentiable (the continuous step): from the
        ghost products where they apply (``ghost_step``), else autograd through the dummy gradient."""
        if self.cfg.ghost_step and self.ghost_ok():
            d = self.matcher.ghost_batch_distance(xe, self.mask, self._soft_labels(), targets)
            if d is not None:
                return d
        return self.matcher.batch_distance(xe, self.mask, self._soft_labels(), targets, create_graph=True)

    def ghost_ok(self) -> bool:
        return self.cfg.ghost and self.cfg.batched and self.matcher.ghost_ready()

    def _flat_batches(self, xs: Tensor):
        """Chunk ``[s, e)`` of candidate batches ``xs [C, B, T, d]`` as one padded batch of (e − s)·B examples."""
        def part(s: int, e: int):
            x = xs[s:e]
            y = self._soft_labels()
            y = None if y is None else y.detach().repeat((e - s,) + (1,) * (y.dim() - 1))
            tg = None
            if self.prior.kind == "decoder":
                tg = torch.cat([torch.cat([self.ids_of_sentence(b, x[:, b, :n]),
                                           self.pinned_ids[b, n:].expand(e - s, -1)], 1).unsqueeze(1)
                                for b, n in enumerate(self.lens)], 1).flatten(0, 1)
            return x.flatten(0, 1), y, tg, self.mask.repeat(e - s, 1)
        return part

    def _ghost_chunks(self, xs: Tensor, part, fixed: dict[str, Tensor] | None, *, group: int) -> Tensor | None:
        """Ghost distances (:meth:`GradMatcher.ghost_distances`) of ``xs.shape[0]`` candidates in
        chunks of ``ghost_chunk``; ``part(s, e)`` gives a chunk's (embeddings, labels, targets, mask)."""
        out = []
        for s in range(0, xs.shape[0], self.cfg.ghost_chunk):
            e = min(s + self.cfg.ghost_chunk, xs.shape[0])
            x, y, tg, mask = part(s, e)
            d = self.matcher.ghost_distances(x, fixed, y, tg, mask=mask, group=group)
            if d is None:
                return None
            out.append(d.detach())
        return torch.cat(out)

    def ids_of_sentence(self, b: int, xb: Tensor) -> Tensor:
        if self.prior.kind != "decoder":
            return torch.zeros(xb.shape[:2], dtype=torch.long, device=self.device)
        n = self.lens[b]
        local = nearest_tokens(xb, self.sub_emb, torch.ones(self.sub_emb.shape[0], dtype=torch.bool, device=self.device))
        ids = self.allowed_idx[local]
        body = self.body[b, :n]
        return torch.where(body, ids, self.pinned_ids[b, :n])

    # -- initialisation ------------------------------------------------------------------------
    def initialise(self) -> Tensor:
        cfg = self.cfg
        d = self.emb.shape[1]
        c = max(1, cfg.init_candidates)
        xs = torch.randn((c, self.B, self.T, d), generator=self.gen).to(self.device)
        xs = torch.where(self.body.unsqueeze(-1), xs, self.pinned.unsqueeze(0))
        if c > 1:
            scores = self.score_batches(xs)
            best = int(torch.argmin(scores))
            x, best_score = xs[best], float(scores[best])
        else:
            x, best_score = xs[0], float("nan")
        if cfg.init_permutations > 0 and c > 1:
            perms = []
            for _ in range(cfg.init_permutations):
                xp = x.clone()
                for b, n in enumerate(self.lens):
                    pos = torch.arange(self.pre, n - self.suf)
                    xp[b, pos] = x[b, pos[torch.from_numpy(self.rng.permutation(len(pos)))]]
                perms.append(xp)
            xs = torch.stack(perms)
            scores = self.score_batches(xs)
            i = int(torch.argmin(scores))
            if float(scores[i]) < best_score:
                x, best_score = xs[i], float(scores[i])
        self.stats["init_grad_loss"] = best_score
        x = x.clone()
        norms = x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        x = torch.where(self.body.unsqueeze(-1), x / norms * self.init_size, x)
        return x

    # -- discrete step ---------------------------------------------------------------------------
    def propose(self, n: int, count: int) -> np.ndarray:
        """``count`` permutations of ``n`` body positions; row 0 is the identity (LAMP's 4 moves)."""
        return propose_moves(self.rng, n, count)

    def discrete_step(self, x: Tensor) -> tuple[Tensor, int]:
        cfg = self.cfg
        x = x.detach().clone()
        ids = self.ids_of(x)
        # B = 1 with ghost scoring: no other sentence, so no materialised gradient at all
        alone = self.B == 1 and self.ghost_ok()
        grads = [] if alone else [self.candidate_grads(b, x[b:b + 1, :n], ids[b:b + 1, :n])
                                  for b, n in enumerate(self.lens)]
        total = {} if alone else {k: sum(g[k] for g in grads) for k in grads[0]}
        use_lm = cfg.coeff_perplexity > 0
        texts = self.texts(ids)
        # the other sentences' NLLs (B > 1); with B = 1 the current text is scored with its candidates (the identity)
        nlls = self.nll(texts) if use_lm and self.B > 1 else torch.zeros(self.B)
        changed = 0
        for b, n in enumerate(self.lens):
            nb = n - self.pre - self.suf
            if nb < 2:
                continue
            perms = torch.from_numpy(self.propose(nb, cfg.swap_candidates)).to(self.device) + self.pre
            full = torch.arange(n, device=self.device).expand(perms.shape[0], n).clone()
            full[:, self.pre:n - self.suf] = perms
            xc = x[b, :n][full]  # [C, n, d]
            idc = ids[b, :n][full]
            fixed = None if alone else {k: (total[k] - grads[b][k]) for k in total}
            # a proposal drawn twice (e.g. the 4th move has only nb - 1 distinct outcomes) is scored once
            first, inv = _first_occurrences(perms.cpu().numpy())
            if len(first) < len(inv):
                sel = torch.from_numpy(first).to(self.device)
                rec = self.candidate_distances(b, xc[sel], idc[sel], fixed).detach().cpu()[torch.from_numpy(inv)]
            else:
                rec = self.candidate_distances(b, xc, idc, fixed).detach().cpu()
            score = rec.clone()
            if use_lm:
                cand = list(range(len(rec)))
                if cfg.lm_topk is not None and cfg.lm_topk < len(rec):
                    cand = torch.argsort(rec)[:cfg.lm_topk].tolist()
                    if 0 not in cand:
                        cand.append(0)
                    score = torch.full_like(rec, float("inf"))
                ct = [self.prior.decode(idc[i, self.pre:n - self.suf].tolist()) for i in cand]
                other = float(nlls.sum() - nlls[b])
                if cfg.lm_screen is not None and not cfg.lm_bf16:  # float32 NLLs only where the argmin can be
                    keep = screen(rec[cand], ct, exact=self.nll, rough=self.rough_nll, known=self._nll_cache,
                                  coeff=cfg.coeff_perplexity, other=other, batch=self.B, margin=cfg.lm_screen)
                    cand = [c for c, k in zip(cand, keep.tolist()) if k]
                    ct = [t for t, k in zip(ct, keep.tolist()) if k]
                    score = torch.full_like(rec, float("inf"))
                lm = (self.nll(ct) + other) / self.B
                score[cand] = rec[cand] + cfg.coeff_perplexity * lm
            best = int(torch.argmin(score))
            if best != 0:
                changed += 1
                x[b, :n] = xc[best]
                ids[b, :n] = idc[best]
                if not alone:
                    grads[b] = self.candidate_grads(b, xc[best:best + 1], idc[best:best + 1])
                    total = {k: fixed[k] + grads[b][k] for k in fixed}
                if use_lm:
                    nlls[b] = float(self.nll([self.texts(ids)[b]])[0])
        return x, changed

    # -- main loop --------------------------------------------------------------------------------
    def run(self) -> Reconstruction[list[str]]:
        cfg = self.cfg
        t0 = time.perf_counter()
        x = self.initialise().requires_grad_(True)
        variables = [x] + ([self.label_logits] if self.label_logits is not None else [])
        best = {"loss": float("inf"), "x": x.detach().clone()}
        rounds = {"swaps": 0, "changed": 0}
        body = self.body.unsqueeze(-1)

        def objective() -> Tensor:
            xe = self.pin(x)
            targets = self.targets_of(self.ids_of(xe.detach())) if self.prior.kind == "decoder" else None
            loss = self.step_distance(xe, targets)
            if cfg.coeff_reg > 0:
                mean_norm = xe.norm(dim=-1)[self.body].mean()
                loss = loss + cfg.coeff_reg * (mean_norm - self.init_size) ** 2
            return loss

        def on_gradient(it: int, loss: Tensor) -> None:
            if cfg.grad_clip is not None:
                gn = x.grad.norm()
                if gn > cfg.grad_clip:
                    x.grad = x.grad * (cfg.grad_clip / (gn + 1e-6))
            lv = float(loss.detach())
            if lv <= best["loss"]:  # the point before this step
                best["loss"], best["x"] = lv, x.detach().clone()

        def after_step(it: int) -> None:
            with torch.no_grad():
                x.data = torch.where(body, x.data, self.pinned)
            if cfg.use_swaps and it >= cfg.swap_burnin * cfg.n_steps and it % cfg.swap_every == 1:
                new_x, ch = self.discrete_step(x.detach())
                rounds["swaps"] += 1
                rounds["changed"] += ch
                with torch.no_grad():
                    x.data = new_x

        adam(variables, objective, lr=cfg.lr, iterations=cfg.n_steps, schedule=step_lr(cfg.lr_step, cfg.lr_decay),
             on_gradient=on_gradient, after_step=after_step)
        best_loss, best_x = best["loss"], best["x"]
        swaps, changed = rounds["swaps"], rounds["changed"]
        x_final = self.pin(best_x)
        ids = self.ids_of(x_final)
        texts = self.texts(ids)
        self.stats.update({"best_loss": best_loss, "swap_rounds": float(swaps), "swaps_accepted": float(changed),
                           "attack_s": time.perf_counter() - t0})
        labels = None
        if self.prior.kind == "encoder":
            y = self._soft_labels()
            labels = y.detach().argmax(-1).cpu() if y is not None and y.is_floating_point() else (
                y.detach().cpu() if y is not None else None)
        return Reconstruction(data=texts, labels=labels, stats=self.stats,
                              extras={"token_ids": [ids[b, :n].tolist() for b, n in enumerate(self.lens)]})
