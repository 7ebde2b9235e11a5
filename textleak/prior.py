"""The public prior text attacks consume: tokenizer, embedding matrix, batch builder, LM prior.

``TextPrior.build_batch(embeds, attention_mask, labels)`` turns dummy input embeddings into
a :class:`common.types.Batch` for the kit's loss, so an attack never needs to know whether
the model is an encoder classifier or a causal LM. The optional language-model prior
(``LMPrior``) scores *decoded text* with its own tokenizer, so any causal LM works as the
prior of any attacked model (LAMP used a GPT-2 sharing BERT's vocabulary; we re-tokenise).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from common.types import Batch

from .components.lm_prefix import supports, trie_nll


class LMPrior:
    """Mean next-token negative log-likelihood of texts under a causal LM (one padded forward)."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_tokens: int = 128, chunk: int = 32) -> None:
        self.model = model
        self.chunk = chunk
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.start_id = start
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (start or 0)

    @torch.no_grad()
    def nll(self, texts: Sequence[str], *, chunk: int | None = None, shared: bool = True) -> Tensor:
        """Per text: mean NLL (nats per token) of its tokens given the start token. ``chunk`` texts per
        forward (default: the prior's; the values do not depend on it beyond float rounding). A
        packed GGUF model (:mod:`textleak.components.gguf_lm`) never forms the ``[texts, tokens,
        vocab]`` logits: the log-softmax is streamed over blocks of the tied head's rows. ``shared``: for
        Llama models every prefix the texts share is computed once (a token trie,
        :mod:`textleak.components.lm_prefix`; equal up to float rounding); else one padded forward."""
        chunk = chunk or self.chunk
        out = []
        for s in range(0, len(texts), chunk):
            part = list(texts[s:s + chunk])
            out.append(self._nll_trie(part) if shared and supports(self.model) else self._nll(part))
        return torch.cat(out) if out else torch.zeros(0)

    def _ids(self, text: str) -> list[int]:
        e = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_tokens - 1]
        return ([self.start_id] if self.start_id is not None else []) + e

    def _nll_trie(self, texts: list[str]) -> Tensor:
        """:meth:`nll` with every shared prefix computed once (:func:`textleak.components.lm_prefix.trie_nll`)."""
        rows = getattr(getattr(getattr(self.model, "lm_head", None), "emb", None), "rows", None)

        def ce(h: Tensor, t: Tensor, owner: Tensor) -> Tensor:
            if rows is not None:  # the packed tied head, streamed over the vocabulary, once per parent state
                return _streamed_ce(h, t, rows, self.model.lm_head.emb.num_embeddings, owner=owner)
            return nn.functional.cross_entropy(self.model.lm_head(h).float()[owner], t, reduction="none")
        return trie_nll(self.model, [self._ids(t) for t in texts], ce=ce, grouped=True)

    def _nll(self, texts: list[str]) -> Tensor:
        seqs = [self._ids(t) for t in texts]
        n = max(2, max(len(x) for x in seqs))
        dev = next(self.model.parameters()).device
        ids = torch.full((len(seqs), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, x in enumerate(seqs):
            ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, :len(x)] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        tgt = ids[:, 1:]
        m = mask[:, 1:].float()
        rows = getattr(getattr(getattr(self.model, "lm_head", None), "emb", None), "rows", None)
        if rows is None:
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            ce = nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")
        else:
            hidden = self.model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
            keep = m.bool()  # padding positions never reach the head
            ce = torch.zeros_like(m)
            ce[keep] = _streamed_ce(hidden[keep], tgt[keep], rows, self.model.lm_head.emb.num_embeddings)
        return ((ce * m).sum(1) / m.sum(1).clamp(min=1)).cpu()


def _streamed_ce(h: Tensor, tgt: Tensor, rows: Callable[[int, int], Tensor], vocab: int,
                 block_elems: int = 1 << 21, *, owner: Tensor | None = None, max_rows: int = 4096) -> Tensor:
    """Cross-entropy of ``h [N, d]`` against ``tgt [N]`` under a head whose rows ``rows(s, e)`` are
    formed block by block (about ``block_elems`` logits at a time): logsumexp per block, then over
    blocks; the target logit is read from its block (the same matrix product as the full logits).
    ``owner [M]``: ``M`` targets, target ``i`` scored from row ``owner[i]`` of ``h`` (each state once).
    At most ``max_rows`` head rows are formed at a time: with few states (a call on 1-4 new texts, as late
    swap rounds make) ``block_elems // N`` would de-quantise the whole 49,152-row head at once, a ~215 MB
    transient that set the 2,000-step run's peak RSS (issue 18); the values change by float rounding only."""
    step = min(max(1024, block_elems // max(1, h.shape[0])), max(1, max_rows))
    m = tgt.shape[0]
    own = owner if owner is not None else torch.arange(m, device=h.device)
    lse, tl = [], torch.empty(m, dtype=torch.float32, device=h.device)
    for s in range(0, vocab, step):
        e = min(vocab, s + step)
        z = nn.functional.linear(h, rows(s, e)).float()
        lse.append(torch.logsumexp(z, 1))
        sel = ((tgt >= s) & (tgt < e)).nonzero().flatten()
        tl[sel] = z[own[sel], tgt[sel] - s]
    return torch.logsumexp(torch.stack(lse, 1), 1)[own] - tl


@lru_cache(maxsize=2)
def _cached_lm(name: str, device: str) -> LMPrior:
    from common.seed import make_generator

    from .models import info_of, load_text_model, smollm2_file

    if name == "smollm2" and str(device) == "cpu":
        # the GGUF's Q4_1/Q8_0 blocks kept packed, de-quantised per layer (bit-equal weights): ~0.45 GB less
        # memory than the float32 load, whose peak is another ~0.2 GB higher
        # and the tokenizer built from the file's metadata alone (the same tokenizer as smollm2_tokenizer(),
        # without AutoTokenizer's full read of the file: ~20 s and ~120 MB less)
        from .components.gguf_lm import gguf_tokenizer, load_packed_llama

        path = smollm2_file()
        return LMPrior(load_packed_llama(*path), gguf_tokenizer(*path), chunk=128)
    model = load_text_model(name, generator=make_generator(0))
    info = info_of(model)
    if info.kind != "decoder":
        raise ValueError(f"the LM prior must be a causal language model; {name!r} is a {info.kind}")
    for p in model.parameters():
        p.requires_grad_(False)
    return LMPrior(model.to(device), info.tokenizer)


def lm_prior(name: str, device: str | torch.device = "cpu") -> LMPrior:
    return _cached_lm(name, str(device))


@dataclass
class TextPrior:
    """Public knowledge about the attacked text model (no client data)."""

    kind: str  # "encoder" (sequence classifier) | "decoder" (causal LM)
    tokenizer: Any
    embedding: Tensor  # [V, d] token-embedding matrix (detached; shares the model's storage: read only)
    embedding_name: str  # its name in model.named_parameters()
    loss_fn: Callable[[nn.Module, Batch], Tensor]
    max_len: int
    prefix_ids: tuple[int, ...]  # special tokens the tokenizer puts before a sentence ([CLS])
    suffix_ids: tuple[int, ...]  # ... and after it ([SEP])
    pad_id: int
    special_ids: tuple[int, ...]  # ids never inside a sentence body (special / unused tokens)
    num_labels: int | None = None
    label_weight: str | None = None  # classifier head parameters, found by identity
    label_bias: str | None = None
    lm_name: str | None = None  # causal LM used as the text prior (loaded lazily)
    device: str = "cpu"
    _lm: LMPrior | None = field(default=None, repr=False)

    @property
    def vocab_size(self) -> int:
        return int(self.embedding.shape[0])

    def lm(self) -> LMPrior:
        if self._lm is None:
            if not self.lm_name:
                raise ValueError("this case has no language-model prior (set the case option lm_prior)")
            self._lm = lm_prior(self.lm_name, self.device)
        return self._lm

    def build_batch(self, embeds: Tensor, attention_mask: Tensor | None, labels: Tensor | None = None,
                    targets: Tensor | None = None) -> Batch:
        """Batch for ``loss_fn`` from input embeddings ``[B, T, d]``.

        Encoders: ``labels`` are class ids [B] or probabilities [B, C]. Decoders: ``targets`` are
        the next-token targets, ids [B, T] or probabilities [B, T, V] (position t is the target
        of position t-1; position 0 is never a target).
        """
        inputs = {"inputs_embeds": embeds}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        if self.kind == "decoder":
            if targets is None:
                raise ValueError("a decoder batch needs next-token targets")
            inputs["targets"] = targets
            return Batch(inputs, None)
        return Batch(inputs, labels)

    def body_ids(self, ids: Sequence[int]) -> list[int]:
        """Strip the special prefix/suffix tokens from a full token sequence."""
        ids = list(ids)
        a, b = len(self.prefix_ids), len(self.suffix_ids)
        return ids[a: len(ids) - b if b else None]

    def decode(self, body: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in body], skip_special_tokens=True).strip()
