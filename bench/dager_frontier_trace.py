"""Development diagnostic for DAGER's token-set search past the rank limit (issue 20): follow every true
sentence's prefix through ``frontier.search_decoder`` (its ``trace`` hook) and print, per sentence, the step at
which its true prefix left the beam and why: ``inf(shortlist)`` (the true next token was not among the path's
``FRONTIER_SHORTLIST`` nearest at the first block's feed-forward input, so never reranked), ``ratio>cont`` (the
best extension's ratio to the step's median was over ``FRONTIER_CONTINUE``), ``weak-notbest`` (not the best
and over ``FRONTIER_ACCEPT``), ``pruned`` (beam cap or diversity rule). Development seeds (< 1000) only.

    python bench/dager_frontier_trace.py text/gpt2/dager 64 0
"""
import collections
import math
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.getcwd() + "/bench")
import torch
from dager_frontier_dev import trial
import textleak.attacks.dager.frontier as fr
from common.seed import derive_seed, make_generator
case = sys.argv[1]; B = int(sys.argv[2]); seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
if seed >= 1000:
    raise SystemExit("development diagnostic: seeds < 1000 only")
p, kit, t = trial(case, B, seed, 0, {"time_budget_s": 600.0, "budget_clock": "cpu"})
ids = t.truth["token_ids"]
tp = collections.defaultdict(set)  # step -> set of true prefixes of length p (before extension)
for i, x in enumerate(ids):
    for q in range(len(x) - 1):  # the last token is unobservable
        tp[q].add(tuple(x[:q]))
death = {}  # prefix tuple -> (step, reason, ratio, rank)
events = []
def trace(pp, cands, prev, ds, med, live, finished):
    livek = {tuple(x.ids) for x in live}
    prevk = {tuple(x.ids): k for k, x in enumerate(prev)}
    cidx = {c: j for j, c in enumerate(cands)}
    for i, x in enumerate(ids):
        if pp >= len(x) - 1: continue
        pre = tuple(x[:pp])
        if pre not in prevk: continue
        nxt = tuple(x[:pp + 1])
        if nxt in livek: continue
        d = ds[prevk[pre]]
        j = cidx.get(x[pp])
        r = float(d[j] / med) if j is not None else math.nan
        rank = int((d < d[j]).sum()) if j is not None else -1
        reason = "notcand" if j is None else ("inf(shortlist)" if not math.isfinite(r) else ("ratio>cont" if r >= 0.75 else ("weak-notbest" if rank > 0 and r >= 0.3 else "pruned")))
        events.append((i, pp, len(x) - 1, reason, r, rank, len(prev)))
orig = fr.search_decoder
def wrapped(*a, **k):
    k["trace"] = trace
    return orig(*a, **k)
fr.search_decoder = wrapped
view = t.attacker
c0 = time.process_time()
rec = p.attack.reconstruct(view.observation, view.model, view.prior, generator=make_generator(derive_seed(seed, 0, "attack")))
cpu = time.process_time() - c0
metrics, _ = kit.score(rec, t.truth, case=p.case)
print("cpu", round(cpu, 1), "metrics", {k: round(float(v), 4) for k, v in metrics.items()})
print("stats", {k: round(v, 3) for k, v in rec.stats.items()})
first = {}
for e in events:
    if e[0] not in first: first[e[0]] = e
cnt = collections.Counter(e[3] for e in first.values())
print("first death per sentence:", cnt, "of", len(ids), "sentences")
for i in sorted(first):
    e = first[i]
    print(f"s{i:02d} died at {e[1]}/{e[2]} {e[3]:16s} ratio={e[4]:.3f} rank={e[5]} live={e[6]}")
