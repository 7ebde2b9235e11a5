"""Text cases: (model, data, protocol, threat) bundles for TAG / LAMP (DAGER's live in cases_dager)."""
from __future__ import annotations

from common.case import Case
from common.threat import HONEST, Capability
from common.types import FLProtocol

#: LAMP's setting: batch size, sequence lengths (``--know_padding``) and the labels are known.
LAMP_THREAT = HONEST.with_grants(Capability.LABELS, Capability.SEQUENCE_LENGTHS, name="honest-but-curious+labels+seq_lens")
#: Labels not granted (recovered from the classifier-head gradient).
SEQLEN_THREAT = HONEST.with_grants(Capability.SEQUENCE_LENGTHS, name="honest-but-curious+seq_lens")

#: Case options the text kits read (``--option KEY=VALUE``); LoRA cases add the adapter's.
OPTIONS = frozenset({"max_tokens", "num_labels", "task", "lm_prior"})
LORA_OPTIONS = OPTIONS | {"lora_r", "lora_alpha", "lora_targets"}
#: ``--model`` picks the text model (kit name, cached HF id or local directory).
TAKES_MODEL = True

RT = "rotten-tomatoes"
FEDAVG = FLProtocol("fedavg", batch_size=1, local_epochs=2, local_lr=1e-2)


def _case(name, model, protocol, threat, description, **options) -> Case:
    return Case(name, "text", model, RT, protocol, threat, (), dict(options), description)


_SPECS = [
    ("text/minilm-bert/fedsgd", "minilm-bert", FLProtocol("fedsgd", batch_size=1), LAMP_THREAT,
     "MiniLM-L6 BERT (pretrained, fresh 2-way head) on Rotten Tomatoes, FedSGD, labels and lengths granted (LAMP's setting)", {}),
    ("text/minilm-bert/fedsgd-short", "minilm-bert", FLProtocol("fedsgd", batch_size=1), LAMP_THREAT,
     "as text/minilm-bert/fedsgd, sentences of at most 16 tokens (CPU-budget suite)", {"max_tokens": 16}),
    ("text/minilm-bert/fedsgd-nolabels", "minilm-bert", FLProtocol("fedsgd", batch_size=1), SEQLEN_THREAT,
     "as text/minilm-bert/fedsgd without labels (recovered from the classifier-head gradient)", {}),
    ("text/minilm-bert/fedavg", "minilm-bert", FEDAVG, LAMP_THREAT,
     "MiniLM BERT, FedAvg (2 local epochs, lr 0.01), labels and lengths granted", {}),
    ("text/smollm2/fedsgd", "smollm2", FLProtocol("fedsgd", batch_size=1), SEQLEN_THREAT,
     "SmolLM2-135M (Llama, GGUF dequantised) next-token loss on Rotten Tomatoes, FedSGD", {}),
    ("text/smollm2/fedavg", "smollm2", FEDAVG, SEQLEN_THREAT, "SmolLM2-135M next-token loss, FedAvg", {}),
    ("text/gpt2/fedsgd", "gpt2", FLProtocol("fedsgd", batch_size=1), SEQLEN_THREAT,
     "GPT-2-small configuration (random init, real GPT-2 tokenizer) next-token loss, FedSGD", {}),
    ("text/gpt2/fedavg", "gpt2", FEDAVG, SEQLEN_THREAT, "GPT-2-small configuration, FedAvg", {}),
    ("text/tiny-gpt2/fedsgd", "tiny-gpt2", FLProtocol("fedsgd", batch_size=1), SEQLEN_THREAT,
     "2-layer GPT-2 (hidden 64, random init, GPT-2 tokenizer), FedSGD (tests, quick runs)", {"max_tokens": 32}),
    ("text/tiny-gpt2/fedavg", "tiny-gpt2", FEDAVG, SEQLEN_THREAT, "2-layer GPT-2, FedAvg", {"max_tokens": 32}),
    ("text/tiny-llama/fedsgd", "tiny-llama", FLProtocol("fedsgd", batch_size=1), SEQLEN_THREAT,
     "2-layer Llama (hidden 64, random init, GPT-2 tokenizer), FedSGD", {"max_tokens": 32}),
    ("text/tiny-bert/fedsgd", "tiny-bert", FLProtocol("fedsgd", batch_size=1), LAMP_THREAT,
     "2-layer BERT classifier (hidden 64, random init, WordPiece), FedSGD, labels granted", {"max_tokens": 32}),
]

CASES: dict[str, Case] = {n: _case(n, m, p, t, d, **o) for n, m, p, t, d, o in _SPECS}
