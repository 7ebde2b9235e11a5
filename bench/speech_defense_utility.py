"""The attacked KWS model's own accuracy when it is trained under each defense.

    OMP_NUM_THREADS=1 python bench/speech_defense_utility.py [--case CASE] [--rounds 300] [--clients 8] \
        [--defenses 'none;gaussian:1e-4;gaussian:1e-3;gaussian:1e-2;topk:0.1'] [--out FILE]

Federated training of a KWS case's model (default ``speech/kws-mel/fedsgd``: conv8-conv16-fc64,
sigmoid, mel, same init; the sigmoid model stays at chance within 300 rounds even without a
defense, so ``speech/kws-mel-relu/fedsgd`` is the informative run): every round ``--clients`` clients each hold ONE keyword clip (B = 1, as in the
attacked setting), send a FedSGD gradient passed through the defense (common.defenses), and
the server averages them and takes an Adam step (lr 1e-3). Train: keyword clips of rate/pitch
variants 0 and 1 (160 clips); test: variant 2 (80 clips, same voices and words, another
speaking rate/pitch). Prints test accuracy per defense next to the no-defense baseline; the
attack's reconstruction quality under the same defenses was the development sweep ``sweeps2``
(records in git history at fdf13c2; docs/speechleak.md).
"""
from __future__ import annotations

import argparse
import json
import os
import time


def parse_defense(s: str) -> list[dict]:
    if s == "none":
        return []
    name, _, val = s.partition(":")
    if name == "gaussian":
        return [{"name": "gaussian", "sigma": float(val)}]
    if name == "topk":
        return [{"name": "topk", "keep": float(val)}]
    raise ValueError(f"unknown defense {s!r}; use none, gaussian:SIGMA or topk:KEEP")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--defenses", default="none;gaussian:1e-4;gaussian:1e-3;gaussian:1e-2")
    ap.add_argument("--case", default="speech/kws-mel/fedsgd",
                    help="the attacked KWS case whose model is trained (e.g. speech/kws-mel-relu/fedsgd)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from common.defenses import build_defense
    from common.fl import client_update
    from common.seed import derive_seed, make_generator
    from common.types import Batch, FLProtocol
    from eval.catalog import catalog
    from speechleak.kit import SpeechKit, frontend_for, kws_loss

    kit = SpeechKit()
    case = catalog().cases.get(args.case)
    pool = kit.load_pool(case, data_path=None)
    fe = frontend_for(case)
    rows = [pool.dataset[i] for i in range(len(pool))]
    waves = torch.stack([pool.wave(i) for i in range(len(pool))])
    with torch.no_grad():
        feats = fe(waves)
    labels = torch.tensor([r["label"] for r in rows])
    train = [i for i, r in enumerate(rows) if r["variant"] != 2]
    test = [i for i, r in enumerate(rows) if r["variant"] == 2]
    protocol = FLProtocol("fedsgd", batch_size=1)
    results = []
    for spec in args.defenses.split(";"):
        defenses = [build_defense(d) for d in parse_defense(spec)]
        model = kit.load_model(case, device=torch.device("cpu"), generator=make_generator(derive_seed(0, "model")))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        g = make_generator(derive_seed(0, "utility", spec))
        t0 = time.perf_counter()
        for r in range(args.rounds):
            pick = torch.randint(0, len(train), (args.clients,), generator=g).tolist()
            acc = None
            for i in pick:
                j = train[i]
                upd = client_update(model, Batch({"feats": feats[j:j + 1]}, labels[j:j + 1]), kws_loss, protocol,
                                    defenses=defenses, generator=g)
                acc = dict(upd.tensors) if acc is None else {k: acc[k] + upd.tensors[k] for k in acc}
            opt.zero_grad()
            for k, p in model.named_parameters():
                p.grad = acc[k] / args.clients
            opt.step()
        with torch.no_grad():
            pred = model(feats[test]).argmax(-1)
            tr_pred = model(feats[train]).argmax(-1)
        row = {"defense": spec, "test_accuracy": float((pred == labels[test]).float().mean()),
               "train_accuracy": float((tr_pred == labels[train]).float().mean()), "rounds": args.rounds,
               "clients_per_round": args.clients, "seconds": time.perf_counter() - t0}
        results.append(row)
        print(json.dumps(row), flush=True)
    base = results[0]["test_accuracy"] if results and results[0]["defense"] == "none" else None
    lines = ["| defense | test accuracy | train accuracy | vs no defense |", "|---|---|---|---|"]
    for r in results:
        rel = f"{r['test_accuracy'] - base:+.3f}" if base is not None else "n/a"
        lines.append(f"| {r['defense']} | {r['test_accuracy']:.3f} | {r['train_accuracy']:.3f} | {rel} |")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# {args.case}: {args.rounds} rounds x {args.clients} clients (B = 1 each), Adam lr 1e-3; chance 0.10\n\n")
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
