"""The user's own model for ``python -m eval audit``: text and speech (tabular: ``audit_inputs``).

``--model`` names the architecture the federation trained; the audit loads the captured
*before* parameters into it by name, so its parameter names are the model's own.

* **text**: a local Hugging Face directory (``save_pretrained``: ``config.json`` + weights,
  loaded with ``transformers`` from local files only, never a hub) or ``package.module:factory``
  (a callable returning an ``nn.Module`` with ``get_input_embeddings()`` that takes
  ``input_ids``/``attention_mask`` and returns ``.logits``). The tokenizer comes from
  ``--tokenizer`` (a directory, a kit name such as ``gpt2``, or a cached id), else from the model
  directory. A directory is loaded as a sequence classifier when its architecture says so or it
  holds a bare encoder (``BertModel`` ...), else as a causal LM. Whether the model is a
  classifier (logits ``[B, C]``, an *encoder* to the attacks) or a causal LM (logits
  ``[B, T, V]``, a *decoder*) is then read from one probe forward pass.
* **speech**: ``package.module:factory`` for a keyword model that maps the front end's features
  ``[B, n_features, frames]`` to class logits through a last ``nn.Linear``.

:func:`check_text_model` refuses, with one line naming the requirement, a model an attack
cannot use (no token embedding, a tokenizer larger than the embedding, fewer than two
transformer blocks or no attention input projections for DAGER) before any attack runs.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .audit_inputs import is_factory, load_factory
from .errors import UserError


#: model types audited as sequence classifiers when the directory holds only the bare encoder
ENCODERS = ("bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def load_tokenizer(spec: str, *, flag: str = "--tokenizer"):
    """``--tokenizer``: a kit model name, a local directory or a cached Hugging Face id (offline)."""
    from textleak.models import tokenizer_for

    try:
        tok = tokenizer_for(spec)
    except (ValueError, OSError) as e:
        raise UserError(f"{flag} {spec!r}: {_first_line(e)}") from None
    if not tok("hello world", add_special_tokens=False)["input_ids"]:  # e.g. a directory with a config only
        raise UserError(f"{flag} {spec!r}: the tokenizer found there is empty (no vocabulary files)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def _hf_directory(path: str):
    import transformers as tf

    try:
        config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {path!r}: not a Hugging Face model directory ({_first_line(e)}); it needs the "
                        f"config.json and weights that save_pretrained writes") from None
    archs = " ".join(getattr(config, "architectures", None) or [])
    classifier = "ForSequenceClassification" in archs or (  # a bare encoder (e.g. BertModel): a classifier
        config.model_type in ENCODERS and not any(k in archs for k in ("ForCausalLM", "LMHeadModel")))
    auto = tf.AutoModelForSequenceClassification if classifier else tf.AutoModelForCausalLM
    try:
        model = auto.from_pretrained(path, local_files_only=True, attn_implementation="eager", dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        what = "a sequence classifier" if classifier else "a causal language model"
        raise UserError(f"--model {path!r}: could not load it as {what} ({_first_line(e)}); text audits take a "
                        f"*ForSequenceClassification or *ForCausalLM model directory") from None
    return model


def user_text_model(spec: str, *, tokenizer: str | None) -> nn.Module:
    """The user's text model (directory or factory) with its tokenizer, ready for the text kit."""
    from transformers.utils import logging as hf_logging

    from textleak.models import TextModelInfo, attach

    if is_factory(spec):
        model = load_factory(spec)()
        if not isinstance(model, nn.Module):
            raise UserError(f"--model {spec!r}: the factory returned {type(model).__name__}, not a torch nn.Module")
        if tokenizer is None:
            raise UserError(f"--model {spec!r}: a model factory carries no tokenizer; pass --tokenizer DIR (the "
                            f"directory tokenizer.save_pretrained wrote, or a kit name such as gpt2)")
    elif Path(spec).is_dir():
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = _hf_directory(spec)
        finally:
            hf_logging.set_verbosity(level)
    else:
        raise UserError(f"--model {spec!r}: give a local Hugging Face model directory or package.module:factory")
    try:
        tok = load_tokenizer(tokenizer or spec)
    except UserError:
        if tokenizer is not None:
            raise
        raise UserError(f"--model {spec!r}: no tokenizer in the model directory; pass --tokenizer DIR (the directory "
                        f"tokenizer.save_pretrained wrote, or a kit name such as gpt2)") from None
    model.eval()  # no dropout: the client's gradient is deterministic
    for p in model.parameters():
        p.requires_grad_(True)
    _embedding(model, spec)
    probe = torch.tensor([tok("hello world")["input_ids"]])
    try:
        with torch.no_grad():
            logits = model(input_ids=probe, attention_mask=torch.ones_like(probe)).logits
    except Exception as e:  # noqa: BLE001 - any failure of the user's forward is a requirement not met
        raise UserError(f"--model {spec!r}: text attacks call model(input_ids=..., attention_mask=...) and read "
                        f".logits; that failed ({_first_line(e)})") from None
    kind = "encoder" if logits.dim() == 2 else "decoder"
    num_labels = int(logits.shape[-1]) if kind == "encoder" else None
    if kind == "encoder" and getattr(getattr(model, "config", None), "num_labels", None) is None:
        raise UserError(f"--model {spec!r}: a classifier needs config.num_labels (its head is found by it)")
    return attach(model, TextModelInfo(str(spec), kind, tok, num_labels))


def _embedding(model: nn.Module, spec: str) -> nn.Embedding:
    from textleak.models import input_embedding

    try:
        return input_embedding(model)
    except ValueError as e:
        raise UserError(f"--model {spec!r}: {_first_line(e)}") from None


def check_text_model(model: nn.Module, attack: str, *, spec: str) -> None:
    """Refuse (one line) a text model the attack cannot use, before any attack runs."""
    from textleak.models import info_of

    emb = _embedding(model, spec)
    tok = info_of(model).tokenizer
    if len(tok) > emb.num_embeddings:
        raise UserError(f"--model {spec!r}: the tokenizer has {len(tok)} tokens but the model's embedding only "
                        f"{emb.num_embeddings} rows: pass the federation's own --tokenizer")
    if attack != "dager":
        return
    from textleak.attacks.dager.span import DagerPreconditionError, find_tap, transformer_blocks

    try:
        blocks = transformer_blocks(model)
        if len(blocks) < 2:
            raise DagerPreconditionError(f"the model has {len(blocks)} transformer block")
        probe = torch.tensor([tok("hello world")["input_ids"]])
        taps = [find_tap(model, i, probe) for i in (0, 1)]
    except DagerPreconditionError as e:
        raise UserError(f"--model {spec!r}: DAGER needs an embedding followed by at least two transformer blocks "
                        f"whose attention input projections are linear layers ({_first_line(e)})") from None
    if not all(any(taps[i].names) for i in (0, 1)):
        raise UserError(f"--model {spec!r}: DAGER needs trainable attention input projections in blocks 0 and 1")


def user_speech_model(spec: str, *, input_shape: tuple[int, int]) -> nn.Module:
    """``package.module:factory()`` as a keyword model for the speech attacks: it maps features
    ``[B, *input_shape]`` (the front end's ``n_features`` x ``frames``) to class logits through a
    last ``nn.Linear`` with bias, exposed as ``head`` (a plain attribute: names unchanged)."""
    model = load_factory(spec)()
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {spec!r}: the factory returned {type(model).__name__}, not a torch nn.Module")
    layers = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]
    last = layers[-1] if layers else None
    if not isinstance(last, nn.Linear) or last.bias is None:
        raise UserError(f"--model {spec!r}: the speech attacks need a last nn.Linear layer (with bias) giving the "
                        f"class logits (labels are read from its gradient); the model's last layer is "
                        f"{type(last).__name__}")
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *input_shape))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--model {spec!r}: the speech attacks feed features of shape [B, {input_shape[0]}, "
                        f"{input_shape[1]}] (the front end's n_features x frames; see --schema); that failed "
                        f"({_first_line(e)})") from None
    if out.dim() != 2 or out.shape[1] != last.out_features:
        raise UserError(f"--model {spec!r}: expected logits [B, {last.out_features}], got {tuple(out.shape)}")
    if not isinstance(getattr(model, "head", None), nn.Linear):
        object.__setattr__(model, "head", last)
    return model.eval()
