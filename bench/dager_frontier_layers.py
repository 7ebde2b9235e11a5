"""Development diagnostic for DAGER past the rank limit (issue 20): on the true prefixes of a GPT-2
configuration batch (seed 0, trial 0), how often the true next token ranks first among itself and 95 random
batch tokens at the (saturated, cut as layer 2's) span of several taps: block k's attention input (``bkg0``;
``b1g0`` is DAGER's layer 2) and feed-forward input (``bkg2``), alone and with log-ratios summed. Development
seed only.

    python bench/dager_frontier_layers.py 64
"""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.getcwd() + "/bench")
import torch
from dager_frontier_dev import trial
from textleak.attacks.dager.span import find_tap, observed_matrix, span_of, LayerInputs, decoder_last_inputs, span_distance
from textleak.attacks.dager.frontier import batch_token_set
B = int(sys.argv[1]) if len(sys.argv) > 1 else 64
p, kit, t = trial("text/gpt2/dager", B, 0, 0, {})
obs, model = t.attacker.observation, t.attacker.model
ids = t.truth["token_ids"]
probe = torch.tensor([[50256, 1, 2]])
tokset = batch_token_set(obs, model)
print("tokset", len(tokset))
tests = []
for blk in range(4):
    for grp in (0, 2):
        if blk == 0 and grp == 0: continue
        tap = find_tap(model, blk, probe, group=grp)
        mat = observed_matrix(tap, obs.tensors)
        src = next((obs.tensors[n] for n in tap.names if n in obs.tensors))
        sp = span_of(mat, eps=float(torch.finfo(src.dtype).eps))
        keep = min(sp.rank, sp.max_rank - 20) - max(2, round(0.03 * sp.max_rank))
        sp2 = span_of(mat, eps=float(torch.finfo(src.dtype).eps), max_rank=keep)
        tests.append((f"b{blk}g{grp}", LayerInputs(model, tap), sp2, sp.rank))
        print(tests[-1][0], "rank", sp.rank, "kept", keep, flush=True)
g = torch.Generator().manual_seed(1)
rows = []  # per (sentence, pos): list of per-test (true ratio, rank of true among cands)
for si, x in enumerate(ids):
    for pos in (2, 6, 12, 20, 30):
        if pos >= len(x) - 1: continue
        wrong = [tokset[i] for i in torch.randperm(len(tokset), generator=g)[:95].tolist() if tokset[i] != x[pos]]
        cands = [x[pos]] + wrong
        row = []
        for name, li, sp, _ in tests:
            xs = decoder_last_inputs(li, [x[:pos]], [cands])[0]
            d = span_distance(sp.basis, xs.double(), exact_below=1.01)
            r = d / d.median()
            row.append(r)
        rows.append((si, pos, torch.stack(row)))  # [T, K]
names = [n for n, *_ in tests]
import collections
res = collections.defaultdict(list)
for si, pos, R in rows:
    lr = R.clamp_min(1e-12).log()
    for k, n in enumerate(names):
        res[n].append(int((R[k] < R[k, 0]).sum()))
    for combo in [(0, 1), (0, 1, 2), (0, 1, 2, 3), tuple(range(len(names)))]:
        s = lr[list(combo)].sum(0)
        res["+".join(names[c] for c in combo)].append(int((s < s[0]).sum()))
    res["pos"].append(pos)
pos = torch.tensor(res.pop("pos"))
for n, v in res.items():
    v = torch.tensor(v)
    out = [f"{n:40s} top1 {float((v == 0).float().mean()):.2f} top3 {float((v < 3).float().mean()):.2f}"]
    for P in (2, 6, 12, 20, 30):
        m = pos == P
        if m.any():
            out.append(f"p{P}:{float((v[m] == 0).float().mean()):.2f}")
    print(" ".join(out))
