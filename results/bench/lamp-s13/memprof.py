"""RSS timeline of a shortened lamp-cos run (full init, 3 rounds)."""
import os, sys, time, threading, json, resource
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
from dataclasses import replace
samples = []; marks = []
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
stop = False
def sampler():
    while not stop:
        samples.append((time.perf_counter(), rss())); time.sleep(0.02)
threading.Thread(target=sampler, daemon=True).start()
def mark(s):
    marks.append((time.perf_counter(), s, rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024))
    print(f"{s:30s} rss {marks[-1][2]:.0f} maxrss {marks[-1][3]:.0f}", flush=True)
mark("start")
import torch; mark("import torch")
import transformers; mark("import transformers")
from perf_lamp_workers import _setup
from common.seed import make_generator
from textleak.components.search import TextSearch
kit, case, model, t, preset = _setup("cpu"); mark("setup")
obs, prior = t.attacker.observation, t.attacker.prior
prior.lm(); mark("lm loaded")
n = int(os.environ.get("NSTEPS", "240"))
cfg = replace(preset("lamp-cos"), n_steps=n, swap_burnin=24 / n)
s = TextSearch(cfg, obs, model, prior, make_generator(3)); mark("search built")
init = s.initialise
def initialise():
    r = init(); mark("init done"); return r
s.initialise = initialise
ds = s.discrete_step
def discrete_step(x):
    mark("round start"); r = ds(x); mark("round end"); return r
s.discrete_step = discrete_step
rec = s.run(); mark("run done")
stop = True
t0 = marks[0][0]
# peaks per interval between marks
out = []
for (ta, sa, *_), (tb, sb, *_) in zip(marks, marks[1:]):
    seg = [r for tt, r in samples if ta <= tt <= tb]
    out.append((sa + " -> " + sb, round(tb - ta, 1), round(max(seg) if seg else 0)))
for o in out: print(o)
print(rec.data, rec.stats)
