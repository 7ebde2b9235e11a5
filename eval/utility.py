"""The defended model's utility: the other axis of the privacy-utility frontier.

``python -m eval utility SUITE --out DIR`` trains, for every (case, defense stack) of the suite and
for the same case without defense, the case's own model by federated SGD on the public pool with
the defense applied to every client update exactly as in the attacked setting (common.fl's
``client_update``): each round ``clients`` clients hold one batch of the case's batch size, the
server averages their (defended) gradients and takes an Adam step. It then measures held-out
accuracy and appends one JSON line per measurement to ``DIR/utility.jsonl``. The report joins these
lines with the attack records of the same (case, defenses) and draws attack success against
utility for each defense family.

Held-out data: tabular, a seeded 20 % split of the case's table (at most 4,000 rows); keyword
speech, the third rate/pitch variant of every (word, voice) (the same words and voices, another
speaking rate; see bench/speech_defense_utility.py). Text utility is not measured yet (refused).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import UserError


@dataclass
class Split:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    key: str  # the model's input name
    loss_fn: Callable
    note: str


def _tabular_split(kit, case, seed: int) -> Split:
    pool = kit.load_pool(case, data_path=None)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(pool.frame), generator=g)
    n_test = min(4000, len(perm) // 5)
    te, tr = perm[:n_test], perm[n_test:]
    return Split(pool.x[tr], pool.y[tr], pool.x[te], pool.y[te], "x", kit.loss_fn,
                 f"held-out {n_test} rows (seeded 20 % split, at most 4,000)")


def _speech_split(kit, case, seed: int) -> Split:
    from speechleak.kit import frontend_for, kws_loss

    if "ctc" in case.name:
        raise UserError(f"utility: {case.name} is a recogniser; utility (WER) is measured only for keyword cases so far")
    pool = kit.load_pool(case, data_path=None)
    rows = [pool.dataset[i] for i in range(len(pool))]
    waves = torch.stack([pool.wave(i) for i in range(len(pool))])
    with torch.no_grad():
        feats = frontend_for(case)(waves)
    labels = torch.tensor([r["label"] for r in rows])
    test = torch.tensor([r.get("variant") == 2 for r in rows])
    if not bool(test.any()):
        raise UserError(f"utility: {case.name}'s pool has no held-out variant 2; use the bundled keyword data")
    return Split(feats[~test], labels[~test], feats[test], labels[test], "feats", kws_loss,
                 "held-out: rate/pitch variant 2 of every (word, voice)")


SPLITS = {"tabular": _tabular_split, "speech": _speech_split}


def measure(case, *, rounds: int, clients: int, lr: float, seed: int) -> dict[str, Any]:
    """Train the case's model under the case's defenses; held-out and train accuracy."""
    from common.defenses import build_defense
    from common.fl import client_update
    from common.seed import derive_seed, make_generator
    from common.types import Batch, FLProtocol
    from eval.catalog import catalog

    if case.modality not in SPLITS:
        raise UserError(f"utility: {case.modality} cases are not supported yet (tabular and keyword speech are)")
    kit = catalog().kits.get(case.modality)()
    split = SPLITS[case.modality](kit, case, derive_seed(seed, "utility-split"))
    model = kit.load_model(case, device=torch.device("cpu"), generator=make_generator(derive_seed(seed, "model")))
    defenses = [build_defense(d) for d in case.defenses]
    protocol = FLProtocol("fedsgd", batch_size=case.protocol.batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = make_generator(derive_seed(seed, "utility", json.dumps([dict(d) for d in case.defenses], sort_keys=True)))
    b, n = case.protocol.batch_size, len(split.train_y)
    t0 = time.perf_counter()
    for _ in range(rounds):
        total = None
        for _c in range(clients):
            idx = torch.randint(0, n, (b,), generator=g)
            upd = client_update(model, Batch({split.key: split.train_x[idx]}, split.train_y[idx]), split.loss_fn,
                                protocol, defenses=defenses, generator=g)
            total = dict(upd.tensors) if total is None else {k: total[k] + upd.tensors[k] for k in total}
        opt.zero_grad()
        for k, p in model.named_parameters():
            p.grad = (total[k] / clients).to(p.dtype)
        opt.step()
    with torch.no_grad():
        test_acc = float((model(split.test_x).argmax(-1) == split.test_y).float().mean())
        train_acc = float((model(split.train_x[:4000]).argmax(-1) == split.train_y[:4000]).float().mean())
    majority = float(torch.bincount(split.test_y).max()) / len(split.test_y)
    return {"test_accuracy": test_acc, "train_accuracy": train_acc, "majority_baseline": majority,
            "seconds": time.perf_counter() - t0, "note": split.note}


def cmd_utility(args) -> int:
    from common.defenses import build_defense

    from .leaderboard import _defense_text
    from .records import canonical_json, provenance
    from .suite import load_suite

    if args.rounds < 1 or args.clients < 1 or not args.lr > 0:
        raise UserError("utility: --rounds and --clients must be >= 1 and --lr > 0")
    specs = load_suite(args.suite)
    cases: dict[str, Any] = {}
    for s in specs:
        for c in (s.case, replace(s.case, defenses=())):
            cases.setdefault(canonical_json(c.to_dict()), c)
    for c in cases.values():  # refuse before training anything
        if c.modality not in SPLITS:
            raise UserError(f"utility: {c.name} is a {c.modality} case; utility is measured for tabular and "
                            "keyword speech cases so far")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance("cpu")
    with open(out / "utility.jsonl", "a", encoding="utf-8") as f:
        for i, c in enumerate(cases.values(), 1):
            res = measure(c, rounds=args.rounds, clients=args.clients, lr=args.lr, seed=args.seed)
            strength = sum(build_defense(d).strength for d in c.defenses)
            line = {"kind": "utility", "case": c.to_dict(), "defense_strength": strength, "seed": args.seed,
                    "rounds": args.rounds, "clients": args.clients, "lr": args.lr, "utility": res, **prov}
            f.write(canonical_json(line) + "\n")
            f.flush()
            d = _defense_text(c.to_dict()) or "none"
            print(f"[{i}/{len(cases)}] {c.name} B={c.protocol.batch_size} defense {d}: "
                  f"test accuracy {res['test_accuracy']:.3f} (majority {res['majority_baseline']:.3f})", flush=True)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("utility", help="held-out accuracy of each suite case's model trained under its defenses")
    p.add_argument("suite", help="suite file whose (case, defenses) pairs are measured; required")
    p.add_argument("--out", required=True, help="run folder: utility.jsonl is appended there; required")
    p.add_argument("--rounds", type=int, default=200, help="federated rounds (default: %(default)s)")
    p.add_argument("--clients", type=int, default=8, help="clients per round (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="server Adam learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed, >= 0 (default: %(default)s)")
    p.set_defaults(fn=cmd_utility)
