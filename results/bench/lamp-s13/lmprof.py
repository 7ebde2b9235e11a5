import os, sys, time
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
import numpy as np, torch
from perf_lamp_workers import _setup
from common.seed import make_generator
from textleak.components.search import TextSearch
kit, case, model, t, preset = _setup("cpu")
obs, prior = t.attacker.observation, t.attacker.prior
ids = t.batch.inputs["input_ids"]
x0 = prior.embedding[ids] + 0.05 * torch.randn(ids.shape + (prior.embedding.shape[1],), generator=make_generator(5))
s = TextSearch(preset("lamp-cos"), obs, model, prior, make_generator(3))
lm = prior.lm()
texts = []
inner = s.nll
s.nll = lambda ts: (texts.extend(ts), inner(ts))[1]
s.rng = np.random.default_rng(11)
t0 = time.perf_counter(); s.discrete_step(x0); print("round", time.perf_counter() - t0)
todo = sorted(set(texts)); print(len(todo))
import pickle; pickle.dump(todo, open("/tmp/lampw/todo.pkl", "wb"))
for _ in range(2):
    t0 = time.perf_counter(); v = lm.nll(todo); print("nll", time.perf_counter() - t0)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as p:
    lm.nll(todo)
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
