"""Batched restarts (torch.func.vmap) vs a sequential Python loop, same run, same inputs.

    OMP_NUM_THREADS=1 python bench/speech_restarts.py [--restarts 4] [--iterations 30] [--features mel]

Prints seconds per clip for each variant and their ratio. The two variants start from the
same random features and must reach the same final gradient distance (checked). Uses the
default KWS case geometry (80 mel bins x 126 frames, conv8-conv16-fc64 sigmoid CNN) and a
synthetic harmonic 1 s signal, so it needs neither flite nor a cache.
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--restarts", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--features", default="mel", choices=["mel", "mfcc"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from common.fl import client_update
    from common.observe import observe
    from common.threat import HONEST
    from common.types import Batch, FLProtocol
    from speechleak.attack import SpeechGradientInversion, SpeechInversionConfig
    from speechleak.prior import SpeechPrior
    from speechleak.frontend import FrontEnd, FrontEndConfig
    from speechleak.kit import kws_loss
    from speechleak.models import KWSCNN

    fe = FrontEnd(FrontEndConfig(kind=args.features))
    t = torch.arange(16000) / 16000
    wave = sum(torch.sin(2 * torch.pi * 150 * h * t) / h for h in range(1, 8)) * torch.hann_window(16000) * 0.2
    feats = fe(wave).unsqueeze(0)
    f, n_frames = feats.shape[1:]
    model = KWSCNN(f, n_frames, 10, act="sigmoid", generator=torch.Generator().manual_seed(0))
    upd = client_update(model, Batch({"feats": feats}, torch.tensor([3])), kws_loss, FLProtocol(),
                        generator=torch.Generator().manual_seed(1))
    obs = observe(upd, HONEST)
    names = {id(p): k for k, p in model.named_parameters()}
    prior = SpeechPrior("kws", fe, 16000, (f, n_frames), 10, lambda x, y: Batch({"feats": x}, y), kws_loss,
                        names[id(model.head.weight)], names[id(model.head.bias)], lower=-1.38, upper=4.0)
    for batched in (True, False):  # warm-up: the first vmap call pays one-off tracing costs
        SpeechGradientInversion(SpeechInversionConfig(iterations=2, restarts=args.restarts, batched=batched,
                                                      griffin_lim_iters=1)).reconstruct(
            obs, model, prior, generator=torch.Generator().manual_seed(0))
    results = {}
    for batched in (True, False):
        times, losses = [], []
        for _ in range(args.repeats):
            cfg = SpeechInversionConfig(iterations=args.iterations, restarts=args.restarts, batched=batched,
                                        griffin_lim_iters=1)
            t0 = time.perf_counter()
            rec = SpeechGradientInversion(cfg).reconstruct(obs, model, prior, generator=torch.Generator().manual_seed(0))
            times.append(rec.stats["feature_s"])
            losses.append(rec.stats["final_grad_loss"])
        results[batched] = (min(times), losses[0])
        print(f"{'batched (vmap)' if batched else 'sequential loop'}: {min(times):.2f} s per clip "
              f"({args.restarts} restarts x {args.iterations} iterations, best of {args.repeats}), "
              f"final loss {losses[0]:.6g}")
    rel = abs(results[True][1] - results[False][1]) / max(abs(results[False][1]), 1e-12)
    print(f"speed-up batched vs sequential: {results[False][0] / results[True][0]:.2f}x "
          f"(final losses agree to {rel:.1e} relative)")


if __name__ == "__main__":
    main()
