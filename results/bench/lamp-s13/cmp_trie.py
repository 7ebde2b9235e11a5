# /tmp/lampw/todo.pkl: the 114 distinct texts of one dev round, written by lmprof.py (this folder; rng 11, as the lm-new worker)
import os, sys, time, pickle
sys.path.insert(0, os.getcwd()); sys.path.insert(0, "/tmp/lampw")
import torch
from torch import nn, Tensor
from typing import Callable
exec(open("/tmp/lampw/old_sce.py").read())
old_sce = _streamed_ce
import old_lm_prefix
from textleak.prior import lm_prior
lm = lm_prior("smollm2")
todo = pickle.load(open("/tmp/lampw/todo.pkl", "rb"))
seqs = [lm._ids(t) for t in todo]
rows, V = lm.model.lm_head.emb.rows, lm.model.lm_head.emb.num_embeddings
def old(): return old_lm_prefix.trie_nll(lm.model, seqs, ce=lambda h, t: old_sce(h, t, rows, V))
def new(): return lm.nll(todo)
def pad(): return lm.nll(todo, shared=False)
r = {}
ts = {"old": [], "new": []}; cs = {"old": [], "new": []}
for i in range(int(sys.argv[1]) if len(sys.argv) > 1 else 2):
    for k, f in (("old", old), ("new", new)) if i % 2 == 0 else (("new", new), ("old", old)):
        t = time.perf_counter(); c = time.process_time(); r[k] = f(); ts[k].append(time.perf_counter() - t); cs[k].append(time.process_time() - c)
r["pad"] = pad()
print("wall", {k: [round(x, 2) for x in v] for k, v in ts.items()}); print("cpu", {k: [round(x, 2) for x in v] for k, v in cs.items()}, os.getloadavg())
print("new-old", (r["new"] - r["old"]).abs().max().item(), "new-pad", (r["new"] - r["pad"]).abs().max().item(), "old-pad", (r["old"] - r["pad"]).abs().max().item())
print("argmin", int(r["new"].argmin()), int(r["old"].argmin()), int(r["pad"].argmin()))
print("order same", torch.equal(r["new"].argsort(), r["old"].argsort()))
