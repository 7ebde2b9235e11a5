"""The defended model's utility: the other axis of the privacy-utility frontier.

``python -m eval utility SUITE --out DIR`` trains, for every (case, defense stack) of the suite and
for the same case without defense, the case's own model by federated SGD on the public pool with
the defense applied to every client update exactly as in the attacked setting (common.fl's
``client_update``): each round ``clients`` clients hold one batch of the case's batch size, the
server averages their (defended) gradients and takes an Adam step. It then measures held-out
accuracy and appends one JSON line per measurement to ``DIR/utility.jsonl``. The report joins these
lines with the attack records of the same (case, defenses) and draws attack success against
utility for each defense family. ``--defended-only`` keeps the settings the suite sweeps defenses
for (the main job); ``--resume`` skips settings already measured with the same seed.

Held-out data: tabular, a seeded 20 % split of the case's table (at most 4,000 rows); keyword
speech, the third rate/pitch variant of every (word, voice) (the same words and voices, another
speaking rate; see bench/speech_defense_utility.py); text, a seeded stratified 20 % of the case's
sentences (40 of the 200 Rotten Tomatoes sentences; accuracy moves in steps of 2.5 %).

Text protocol and its CPU reductions (``DEFAULTS``): a classifier (the pretrained MiniLM BERT, a
fresh 2-class head) is fine-tuned for sentiment in 30 rounds of 4 clients at Adam lr 1e-4, with its
embedding block (word, position and type tables, their LayerNorm: 12 M of its 23 M parameters)
frozen; every other tensor is trained. The update defenses act per tensor (noise, pruning,
quantisation, masking), so each trained tensor's defended update is distributed exactly as the
one the attack sees; DP-SGD clips
the whole per-example gradient, embedding tables included, so text under DP-SGD is refused. A
causal LM of the kit (randomly initialised) is trained whole (100 rounds of 4 clients, lr 1e-3) and
scored by held-out next-token accuracy (its ``test_accuracy``, the frontier's x axis) and
perplexity. A CTC recogniser (speech/ctc-* cases) is scored by greedy-decoding WER and CER on a seeded,
disjoint 20 % of its sentence pool (eval/utility_ctc.py; its ``test_accuracy`` is 1 - CER). Every
draw is seeded (no global RNG).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from common.types import Batch

from .errors import UserError


@dataclass(frozen=True)
class TrainConfig:
    """Federated training of the utility measurement: ``rounds`` server steps (Adam, ``lr``), each
    averaging ``clients`` client updates of one batch of the case's batch size."""

    rounds: int
    clients: int
    lr: float

    RANGES: ClassVar[dict[str, tuple[float, float]]] = {"rounds": (1, 100_000), "clients": (1, 1024), "lr": (1e-7, 1.0)}

    def __post_init__(self) -> None:
        for k, (lo, hi) in self.RANGES.items():
            if not lo <= getattr(self, k) <= hi:
                raise ValueError(f"utility: {k}={getattr(self, k)} is outside [{lo}, {hi}]")


#: per modality (text: per model kind): tabular and keyword speech as the first development runs; a
#: text classifier is a pretrained encoder fine-tuned for CPU in 30 rounds of 4 clients at a
#: fine-tuning rate; a causal LM of the kit is randomly initialised and needs a larger rate
DEFAULTS: dict[str, TrainConfig] = {"tabular": TrainConfig(200, 8, 1e-3), "speech": TrainConfig(200, 8, 1e-3),
                                    "text": TrainConfig(30, 4, 1e-4), "text-decoder": TrainConfig(100, 4, 1e-3),
                                    "speech-ctc": TrainConfig(300, 8, 3e-3)}


@dataclass
class Split:
    n_train: int
    batch: Callable[[Tensor], Batch]  # train indices -> the client's batch
    evaluate: Callable[[nn.Module], dict[str, float]]  # test_accuracy, train_accuracy, majority_baseline, ...
    loss_fn: Callable
    note: str


def _tensor_split(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, key: str, loss_fn: Callable,
                  note: str) -> Split:
    def evaluate(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            test_acc = float((model(test_x).argmax(-1) == test_y).float().mean())
            train_acc = float((model(train_x[:4000]).argmax(-1) == train_y[:4000]).float().mean())
        return {"test_accuracy": test_acc, "train_accuracy": train_acc,
                "majority_baseline": float(torch.bincount(test_y).max()) / len(test_y)}

    return Split(len(train_y), lambda idx: Batch({key: train_x[idx]}, train_y[idx]), evaluate, loss_fn, note)


def _tabular_split(kit, case, seed: int, model: nn.Module) -> Split:
    pool = kit.load_pool(case, data_path=None)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(pool.frame), generator=g)
    n_test = min(4000, len(perm) // 5)
    te, tr = perm[:n_test], perm[n_test:]
    return _tensor_split(pool.x[tr], pool.y[tr], pool.x[te], pool.y[te], "x", kit.loss_fn,
                         f"held-out {n_test} rows (seeded 20 % split, at most 4,000)")


def _speech_split(kit, case, seed: int, model: nn.Module) -> Split:
    from speechleak.kit import frontend_for, kws_loss

    if case.options.get("task") == "ctc":
        from .utility_ctc import ctc_split

        return ctc_split(kit, case, seed, model)
    pool = kit.load_pool(case, data_path=None)
    rows = [pool.dataset[i] for i in range(len(pool))]
    waves = torch.stack([pool.wave(i) for i in range(len(pool))])
    with torch.no_grad():
        feats = frontend_for(case)(waves)
    labels = torch.tensor([r["label"] for r in rows])
    test = torch.tensor([r.get("variant") == 2 for r in rows])
    if not bool(test.any()):
        raise UserError(f"utility: {case.name}'s pool has no held-out variant 2; use the bundled keyword data")
    return _tensor_split(feats[~test], labels[~test], feats[test], labels[test], "feats", kws_loss,
                         "held-out: rate/pitch variant 2 of every (word, voice)")


def text_split(kit, case, seed: int, model: nn.Module) -> Split:
    """A seeded, stratified 20 % of the case's sentence pool held out (sentences within the case's
    ``max_tokens``). A classifier (encoder) is scored by class accuracy; its embedding tables are
    frozen (the CPU reduction: every other tensor is trained). A causal LM is trained whole and
    scored by next-token accuracy (its ``test_accuracy``) and perplexity."""
    from textleak.models import info_of, input_embedding, max_length

    info = info_of(model)
    tok = info.tokenizer
    encoder = info.kind == "encoder"
    pool = kit.load_pool(case, data_path=None)
    limit = min(int(case.options.get("max_tokens") or 1 << 30), max_length(model))
    keep = [i for i, n in enumerate(pool.lengths(tok)) if n <= limit]
    texts = [pool.dataset[i]["text"] for i in keep]
    labels = torch.tensor([int(pool.dataset[i]["label"]) for i in keep], dtype=torch.long)
    perm = torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))
    test_mask = torch.zeros(len(keep), dtype=torch.bool)
    for c in labels.unique().tolist():
        members = perm[labels[perm] == c]
        test_mask[members[: round(0.2 * len(members))]] = True
    tr, te = (~test_mask).nonzero().flatten(), test_mask.nonzero().flatten()
    if len(tr) < case.protocol.batch_size or len(te) == 0:
        raise UserError(f"utility: {case.name} has only {len(keep)} sentences within {limit} tokens; too few to hold "
                        "out 20 % and fill a batch")
    if encoder:
        emb = getattr(getattr(model, "base_model", model), "embeddings", None) or input_embedding(model)
        for q in emb.parameters():
            q.requires_grad_(False)

    def enc(ids: list[int]) -> dict[str, Tensor]:
        e = tok([texts[i] for i in ids], padding=True, return_tensors="pt")
        return {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}

    def batch(idx: Tensor) -> Batch:
        ids = tr[idx].tolist()
        return Batch(enc(ids), labels[ids] if encoder else None)

    def scores(ids: list[int], model: nn.Module) -> tuple[float, float, Tensor]:
        """(accuracy, mean token NLL (decoders), targets) over ``ids``, 32 sentences at a time."""
        hit = tot = nll = 0.0
        seen = []
        with torch.no_grad():
            for s in range(0, len(ids), 32):
                x = enc(ids[s:s + 32])
                logits = model(**x).logits
                if encoder:
                    y = labels[ids[s:s + 32]]
                    hit, tot = hit + float((logits.argmax(-1) == y).sum()), tot + len(y)
                    seen.append(y)
                    continue
                m, y = x["attention_mask"][:, 1:].bool(), x["input_ids"][:, 1:]
                lp = logits[:, :-1].log_softmax(-1)
                hit += float(((lp.argmax(-1) == y) & m).sum())
                nll -= float(lp.gather(-1, y.unsqueeze(-1)).squeeze(-1)[m].sum())
                tot += float(m.sum())
                seen.append(y[m])
        return hit / tot, nll / tot, torch.cat(seen)

    def evaluate(model: nn.Module) -> dict[str, float]:
        acc, nll, y = scores(te.tolist(), model)
        out = {"test_accuracy": acc, "train_accuracy": scores(tr.tolist(), model)[0],
               "majority_baseline": float(torch.bincount(y).max()) / len(y)}
        return out if encoder else {**out, "perplexity": math.exp(nll)}

    what = ("class accuracy; embedding tables frozen, the rest trained" if encoder
            else "next-token accuracy and perplexity; whole model trained")
    return Split(len(tr), batch, evaluate, kit.loss_fn,
                 f"held-out {len(te)} of {len(keep)} sentences (seeded stratified 20 % split); {what}")


SPLITS = {"tabular": _tabular_split, "speech": _speech_split, "text": text_split}


def defaults_key(case, model: nn.Module) -> str:
    if case.modality == "text" and getattr(getattr(model, "textleak_info", None), "kind", "") == "decoder":
        return "text-decoder"
    if case.modality == "speech" and case.options.get("task") == "ctc":
        return "speech-ctc"
    return case.modality


def measure(case, *, seed: int, rounds: int | None = None, clients: int | None = None,
            lr: float | None = None) -> dict[str, Any]:
    """Train the case's model under the case's defenses (the modality's ``DEFAULTS`` unless given);
    held-out and train accuracy (and, for a causal LM, perplexity)."""
    from common.defenses import build_defense
    from common.fl import client_update
    from common.seed import derive_seed, make_generator
    from common.types import FLProtocol
    from eval.catalog import catalog

    if case.modality not in SPLITS:
        raise UserError(f"utility: {case.modality} cases are not supported yet (text, tabular, keyword speech and CTC recognisers are)")
    kit = catalog().kits.get(case.modality)()
    model = kit.load_model(case, device=torch.device("cpu"), generator=make_generator(derive_seed(seed, "model")))
    d = DEFAULTS[defaults_key(case, model)]
    cfg = TrainConfig(rounds if rounds is not None else d.rounds, clients if clients is not None else d.clients,
                      lr if lr is not None else d.lr)
    split = SPLITS[case.modality](kit, case, derive_seed(seed, "utility-split"), model)
    defenses = [build_defense(d) for d in case.defenses]
    if case.modality == "text" and any(d.stage == "gradient" for d in defenses):
        raise UserError(f"utility: {case.name}: DP-SGD clips the whole per-example gradient, embedding tables included, "
                        "which the text utility does not train; measure text cases without dpsgd")
    protocol = FLProtocol("fedsgd", batch_size=case.protocol.batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = make_generator(derive_seed(seed, "utility", json.dumps([dict(d) for d in case.defenses], sort_keys=True)))
    b = case.protocol.batch_size
    t0 = time.perf_counter()
    for _ in range(cfg.rounds):
        total = None
        for _c in range(cfg.clients):
            idx = torch.randint(0, split.n_train, (b,), generator=g)
            upd = client_update(model, split.batch(idx), split.loss_fn, protocol, defenses=defenses, generator=g)
            total = dict(upd.tensors) if total is None else {k: total[k] + upd.tensors[k] for k in total}
        opt.zero_grad()
        for k, p in model.named_parameters():
            if k in total:
                p.grad = (total[k] / cfg.clients).to(p.dtype)
        opt.step()
    return {**split.evaluate(model), "seconds": time.perf_counter() - t0, "note": split.note,
            "rounds": cfg.rounds, "clients": cfg.clients, "lr": cfg.lr}


def utility_cases(specs, *, defended_only: bool = False) -> list:
    """The suite's distinct (case, defenses) settings, each with its undefended twin; with
    ``defended_only`` only the settings (case, batch size) that the suite runs under some defense."""
    from .records import canonical_json

    swept = {(s.case.name, s.case.protocol.batch_size) for s in specs if s.case.defenses}
    cases: dict[str, Any] = {}
    for s in specs:
        if defended_only and (s.case.name, s.case.protocol.batch_size) not in swept:
            continue
        for c in (s.case, replace(s.case, defenses=())):
            cases.setdefault(canonical_json(c.to_dict()), c)
    return list(cases.values())


def cmd_utility(args) -> int:
    from common.defenses import build_defense

    from .leaderboard import _defense_text
    from .records import canonical_json, provenance
    from .suite import load_suite

    if (args.rounds is not None and args.rounds < 1) or (args.clients is not None and args.clients < 1) \
            or (args.lr is not None and not args.lr > 0):
        raise UserError("utility: --rounds and --clients must be >= 1 and --lr > 0")
    cases = [c for c in utility_cases(load_suite(args.suite), defended_only=args.defended_only)
             if args.modality is None or c.modality == args.modality]
    for c in cases:  # refuse before training anything
        if c.modality not in SPLITS:
            raise UserError(f"utility: {c.name} is a {c.modality} case; utility is measured for text, tabular and "
                            "keyword speech cases (and CTC recognisers) so far")
        if c.modality == "text" and any(build_defense(x).stage == "gradient" for x in c.defenses):
            raise UserError(f"utility: {c.name} under dpsgd: the text utility does not measure DP-SGD (it clips the "
                            "whole per-example gradient, embedding tables included, which it does not train)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done = set()
    if args.resume and (out / "utility.jsonl").is_file():
        for ln in (out / "utility.jsonl").read_text(encoding="utf-8").splitlines():
            try:
                u = json.loads(ln)
                done.add(canonical_json([u["case"], u["seed"]]))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by an interrupted run is measured again
    prov = provenance("cpu")
    with open(out / "utility.jsonl", "a", encoding="utf-8") as f:
        for i, c in enumerate(cases, 1):
            if canonical_json([c.to_dict(), args.seed]) in done:
                print(f"[{i}/{len(cases)}] {c.name} B={c.protocol.batch_size}: measured before (--resume)", flush=True)
                continue
            res = measure(c, rounds=args.rounds, clients=args.clients, lr=args.lr, seed=args.seed)
            strength = sum(build_defense(x).strength for x in c.defenses)
            line = {"kind": "utility", "case": c.to_dict(), "defense_strength": strength, "seed": args.seed,
                    "rounds": res["rounds"], "clients": res["clients"], "lr": res["lr"], "utility": res, **prov}
            f.write(canonical_json(line) + "\n")
            f.flush()
            dt = _defense_text(c.to_dict()) or "none"
            extra = f", perplexity {res['perplexity']:.1f}" if "perplexity" in res else ""
            extra += f", WER {res['test_wer']:.3f}, CER {res['test_cer']:.3f}" if "test_wer" in res else ""
            print(f"[{i}/{len(cases)}] {c.name} B={c.protocol.batch_size} defense {dt}: "
                  f"test accuracy {res['test_accuracy']:.3f} (majority {res['majority_baseline']:.3f}{extra}; "
                  f"{res['seconds']:.0f} s)", flush=True)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("utility", help="held-out accuracy of each suite case's model trained under its defenses")
    p.add_argument("suite", help="suite file whose (case, defenses) pairs are measured; required")
    p.add_argument("--out", required=True, help="run folder: utility.jsonl is appended there; required")
    for name, typ, what in (("rounds", int, "federated rounds"), ("clients", int, "clients per round"),
                            ("lr", float, "server Adam learning rate")):
        per = "; ".join(f"{m} {getattr(c, name)}" for m, c in DEFAULTS.items())
        p.add_argument(f"--{name}", type=typ, default=None, help=f"{what} (default per modality: {per})")
    p.add_argument("--defended-only", action="store_true",
                   help="only the settings the suite runs under some defense (each with its undefended twin)")
    p.add_argument("--resume", action="store_true", help="skip settings already in DIR/utility.jsonl for this seed")
    p.add_argument("--modality", choices=sorted(SPLITS), default=None, help="only this modality's cases")
    p.add_argument("--seed", type=int, default=0, help="seed, >= 0 (default: %(default)s)")
    p.set_defaults(fn=cmd_utility)
