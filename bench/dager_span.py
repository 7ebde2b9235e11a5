"""DAGER span-check benchmark: seconds per batch vs B, and the batched span check vs a
one-token-at-a-time loop, measured in the same run.

    python bench/dager_span.py [--model tiny-gpt2|gpt2|smollm2] [--batch-sizes 1,2,4,8] [--loop-tokens 2000]

For each B: one FedSGD gradient of B Rotten Tomatoes sentences, then (a) the full DAGER attack
(wall seconds, ROUGE-1/2) and (b) the layer-1 vocabulary scan at position 0 with the batched
``span_distance`` vs ``span_distance_loop`` on the first ``--loop-tokens`` tokens (the loop is
extrapolated to the whole vocabulary; the two distance vectors are checked to agree).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    import torch

    torch.set_num_threads(1)
    from common.fl import client_update
    from common.observe import observe
    from common.seed import make_generator
    from textleak.attacks.dager import DAGER
    from textleak.attacks.dager.span import LayerInputs, first_layer_vectors, span_distance, span_distance_loop
    from textleak.cases_dager import CASES
    from textleak.kit import TextKit

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-gpt2", choices=["tiny-gpt2", "tiny-llama", "gpt2", "smollm2"])
    ap.add_argument("--batch-sizes", default="1,2,4")
    ap.add_argument("--loop-tokens", type=int, default=2000)
    args = ap.parse_args()
    kit = TextKit()
    case0 = CASES[f"text/{args.model}/dager"]
    model = kit.load_model(case0, device=torch.device("cpu"), generator=make_generator(0))
    pool = kit.load_pool(case0, data_path=None)
    prior = kit.make_prior(case0, model, "text", device="cpu")
    vocab = torch.arange(model.get_input_embeddings().num_embeddings)
    print(f"model {args.model}, vocabulary {vocab.numel()}")
    print("B | tokens | attack s | R1 | R2 | scan batched s | scan loop s (extrap.) | loop/batched | max |diff|")
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        case = case0.with_batch_size(b)
        batch, truth = kit.sample(pool, case, model=model, device=torch.device("cpu"), generator=make_generator(b))
        obs = observe(client_update(model, batch, kit.loss_fn, case.protocol, generator=make_generator(1)), case.threat)
        atk = DAGER()
        t = time.perf_counter()
        rec = atk.reconstruct(obs, model, prior, generator=make_generator(2))
        t_attack = time.perf_counter() - t
        m, _ = kit.score(rec, truth, case=case)
        if rec.stats.get("precondition_failed"):
            print(f"{b} | {int(batch.inputs['attention_mask'].sum())} | {t_attack:.2f} | {m['rouge1']:.3f} | "
                  f"{m['rouge2']:.3f} | precondition failed: {rec.extras['status'][:60]}")
            continue
        taps, spans, _ = atk.spans(obs, model, batch.inputs["input_ids"][:1, :3])
        vecs = first_layer_vectors(LayerInputs(model, taps[0]), vocab, 0)
        t = time.perf_counter()
        d_b = span_distance(spans[0].basis, vecs)
        t_b = time.perf_counter() - t
        n = min(args.loop_tokens, vecs.shape[0])
        t = time.perf_counter()
        d_l = span_distance_loop(spans[0].basis, vecs[:n])
        t_l = (time.perf_counter() - t) * vecs.shape[0] / n
        diff = float((d_b[:n] - d_l).abs().max())
        print(f"{b} | {int(batch.inputs['attention_mask'].sum())} | {t_attack:.2f} | {m['rouge1']:.3f} | "
              f"{m['rouge2']:.3f} | {t_b:.3f} | {t_l:.2f} | {t_l / t_b:.0f}x | {diff:.1e}")


if __name__ == "__main__":
    main()
