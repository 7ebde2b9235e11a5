"""Target models: a keyword-spotting CNN and a small CTC recogniser, both on feature maps.

The models take the *feature map* [B, F, T] (the front end sits outside, in the kit's loss),
so an attack can optimise features directly, or compose the front end for waveform-level
optimisation. All parameters are created from an explicit ``torch.Generator``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

VOCAB = ["<b>", " "] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["'"]
BLANK = 0


def encode_text(text: str) -> list[int]:
    """Lower-case characters -> ids (blank 0, space 1, a-z, apostrophe); other characters dropped."""
    out = []
    for ch in " ".join(text.lower().split()):
        if ch in VOCAB[1:]:
            out.append(VOCAB.index(ch))
    return out


def decode_ids(ids) -> str:
    return "".join(VOCAB[i] for i in ids if 0 < i < len(VOCAB))


def _init(module: nn.Module, generator: torch.Generator) -> None:
    """Kaiming-uniform weights (PyTorch's default rule) drawn from ``generator``."""
    for name, p in module.named_parameters():
        with torch.no_grad():
            if p.dim() > 1:
                fan_in = p[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)
            elif name.endswith("bias"):
                p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * 0.05)
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


_ACTS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU}


def _act(name: str) -> nn.Module:
    try:
        return _ACTS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(_ACTS)}") from None


class KWSCNN(nn.Module):
    """Keyword-spotting CNN on [B, F, T] feature maps: conv blocks (3x3, act, 2x2 average pool)
    -> flatten -> FC -> act -> FC (class logits). ``head`` is the last layer (label recovery)."""

    def __init__(self, n_features: int, n_frames: int, n_classes: int, *, channels: tuple[int, ...] = (8, 16),
                 hidden: int = 64, act: str = "relu", generator: torch.Generator) -> None:
        super().__init__()
        self.input_shape = (n_features, n_frames)
        layers: list[nn.Module] = []
        c_in, f, t = 1, n_features, n_frames
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), _act(act), nn.AvgPool2d(2)]
            c_in, f, t = c, f // 2, t // 2
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in * f * t, hidden)
        self.act = _act(act)
        self.head = nn.Linear(hidden, n_classes)
        _init(self, generator)

    def forward(self, feats: Tensor) -> Tensor:
        h = self.features(feats.unsqueeze(1)).flatten(1)
        return self.head(self.act(self.fc(h)))


class CTCRecognizer(nn.Module):
    """Small Conformer-style CTC model on [B, F, T]: two strided 1-D convolutions (x4 time
    reduction), one pre-norm self-attention + feed-forward block written with plain matmuls
    (vmap- and double-backward-safe), and a linear head over ``VOCAB``. Returns log-probs [B, T/4, V]."""

    def __init__(self, n_features: int, *, dim: int = 96, heads: int = 2, act: str = "gelu",
                 generator: torch.Generator) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError("dim must be divisible by heads")
        self.heads = heads
        self.conv1 = nn.Conv1d(n_features, dim, 5, stride=2, padding=2)
        self.conv2 = nn.Conv1d(dim, dim, 5, stride=2, padding=2)
        self.act = _act(act)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, 2 * dim)
        self.ff2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, len(VOCAB))
        _init(self, generator)

    def forward(self, feats: Tensor) -> Tensor:
        h = self.act(self.conv2(self.act(self.conv1(feats))))  # [B, D, T']
        h = h.transpose(1, 2)  # [B, T', D]
        b, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)
        hd = d // self.heads
        q = q.reshape(b, t, self.heads, hd).transpose(1, 2)
        k = k.reshape(b, t, self.heads, hd).transpose(1, 2)
        v = v.reshape(b, t, self.heads, hd).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        h = h + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        h = h + self.ff2(self.act(self.ff1(self.norm2(h))))
        return torch.log_softmax(self.head(h), dim=-1)
