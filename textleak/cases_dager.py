"""DAGER cases: exact batch recovery on SmolLM2-135M, GPT-2 (config), MiniLM BERT and tiny models.

Honest-but-curious server (``common.threat.HONEST``: update, batch size, local hyper-parameters,
public model + tokenizer; no labels, no sequence lengths). Data: the 200 Rotten Tomatoes
sentences (``--data FILE`` for one sentence per line). Batch sizes are set per run (suites use
B in 1..32); DAGER needs the batch's token count below the attention width (576 SmolLM2,
768 GPT-2, 384 MiniLM) — beyond that the attack reports ``precondition_failed``.
"""
from __future__ import annotations

from common.case import Case
from common.threat import HONEST
from common.types import FLProtocol

RT = "rotten-tomatoes"
SGD = FLProtocol("fedsgd", batch_size=1)
#: DAGER's FedAvg setting (fed_avg.sh uses GPT-2 on Rotten Tomatoes): 2 local epochs on 2 minibatches.
AVG = FLProtocol("fedavg", batch_size=2, local_epochs=2, local_batch_size=None, local_lr=1e-4, shuffle=True)


def _c(name, model, protocol, description, modality="text", **options) -> Case:
    return Case(name, modality, model, RT, protocol, HONEST, (), dict(options), description)


_SPECS = [
    ("text/smollm2/dager", "smollm2", SGD, "SmolLM2-135M (Llama, RoPE, hidden 576) next-token loss, FedSGD", {}),
    ("text/gpt2/dager", "gpt2", SGD, "GPT-2-small configuration (learned positions, hidden 768; random init, real "
     "tokenizer) next-token loss, FedSGD", {}),
    ("text/minilm-bert/dager", "minilm-bert", SGD, "MiniLM-L6 BERT encoder (pretrained, hidden 384) classifier, FedSGD", {}),
    ("text/gpt2/dager-fedavg", "gpt2", AVG, "GPT-2-small configuration, FedAvg (2 local epochs, lr 1e-4)", {}),
    ("text/smollm2/dager-fedavg", "smollm2", AVG, "SmolLM2-135M, FedAvg (2 local epochs, lr 1e-4)", {}),
    ("text/tiny-gpt2/dager", "tiny-gpt2", SGD, "2-layer GPT-2 (hidden 64), sentences <= 12 tokens", {"max_tokens": 12}),
    ("text/tiny-llama/dager", "tiny-llama", SGD, "2-layer Llama (hidden 64), sentences <= 12 tokens", {"max_tokens": 12}),
    ("text/tiny-bert/dager", "tiny-bert", SGD, "2-layer BERT classifier (hidden 64), sentences <= 12 tokens", {"max_tokens": 12}),
]
_LORA = [
    ("text/smollm2/dager-lora", "smollm2", SGD, "SmolLM2-135M with LoRA r=128 on q_proj/v_proj (peft), FedSGD of "
     "the adapters", {"lora_r": 128}),
    ("text/tiny-llama/dager-lora", "tiny-llama", SGD, "2-layer Llama with LoRA r=32 on q_proj/v_proj", {"lora_r": 32, "max_tokens": 12}),
]

CASES: dict[str, Case] = {n: _c(n, m, p, d, **o) for n, m, p, d, o in _SPECS}
CASES.update({n: _c(n, m, p, d, modality="text-lora", **o) for n, m, p, d, o in _LORA})
