"""LoRA clients for any text attack: the text kit with a peft LoRA model (modality ``text-lora``).

The client fine-tunes only LoRA adapters on the attention projections; the server sees the
updates of ``lora_A`` / ``lora_B`` (``wrap_lora`` wraps any Hugging Face text model, and
``LoraTextKit`` is ``TextKit`` with it). DAGER uses it as in its LoRA section: the ``lora_A``
gradient of a projection is ``B^T (sum_i g_i x_i^T)``, so its row space is still inside the span
of the layer inputs and the span check runs unchanged with rank limited by ``r``.

Case options: ``lora_r`` (rank, default 128), ``lora_alpha`` (default = r), ``lora_targets``
(module names for ``peft.LoraConfig.target_modules``; default by architecture: ``q_proj``,
``v_proj`` for Llama, ``c_attn`` for GPT-2, ``query``, ``value`` for BERT). The adapters are
initialised with ``init_lora_weights=False`` (random A *and* B, drawn from the seed): with
peft's default B = 0 the A-gradient is exactly zero (a fresh adapter leaks nothing through A),
so we model a client some rounds into training, as the DAGER paper does.
"""
from __future__ import annotations

import torch
from torch import nn

from common.case import Case

from .kit import TextKit
from .models import attach, info_of

_DEFAULT_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}


def wrap_lora(model: nn.Module, *, r: int, alpha: int | None, targets, generator: torch.Generator) -> nn.Module:
    """Return a peft LoRA model around ``model`` (adapters only trainable), deterministic in ``generator``."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError("LoRA cases need peft: pip install peft") from None
    info = info_of(model)
    mtype = getattr(model.config, "model_type", "")
    targets = list(targets) if targets else _DEFAULT_TARGETS.get(mtype)
    if not targets:
        raise ValueError(f"no default LoRA targets for model type {mtype!r}; set the case option lora_targets")
    cfg = LoraConfig(r=int(r), lora_alpha=int(alpha or r), target_modules=targets, lora_dropout=0.0,
                     init_lora_weights=False, fan_in_fan_out=(mtype == "gpt2"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator).item()))
        peft_model = get_peft_model(model, cfg)
    peft_model.eval()
    return attach(peft_model, info)


class LoraTextKit(TextKit):
    modality = "text-lora"

    def load_model(self, case: Case, *, device: torch.device, generator: torch.Generator) -> nn.Module:
        base = super().load_model(case, device=torch.device("cpu"), generator=generator)
        o = case.options
        targets = o.get("lora_targets")
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        return wrap_lora(base, r=int(o.get("lora_r", 128)), alpha=o.get("lora_alpha"), targets=targets,
                         generator=generator).to(device)
