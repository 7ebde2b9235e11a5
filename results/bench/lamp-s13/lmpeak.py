# /tmp/lampw/todo.pkl: the 114 distinct texts of one dev round, written by lmprof.py (this folder; rng 11, as the lm-new worker)
import os, sys, time, threading, pickle, resource
sys.path.insert(0, os.getcwd())
import torch
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
peak = [0.0]; stop = [False]
def sampler():
    while not stop[0]:
        peak[0] = max(peak[0], rss()); time.sleep(0.005)
from textleak.prior import lm_prior
lm = lm_prior("smollm2")
todo = pickle.load(open("/tmp/lampw/todo.pkl", "rb"))
# a longer round: the same texts with a longer tail, 128 per call
extra = [t + " " + t.split()[0] + " reasonss ##s stories" for t in todo]
lm.nll(todo[:4])
threading.Thread(target=sampler, daemon=True).start()
for name, texts in (("dev114", todo), ("long128", (todo + extra)[:128])):
    time.sleep(0.1); base = rss(); peak[0] = base
    t0 = time.process_time(); v = lm.nll(texts); cpu = time.process_time() - t0
    time.sleep(0.05)
    print(name, "base", round(base), "peak", round(peak[0]), "transient", round(peak[0] - base), "vals", float(v.sum()), "cpu", round(cpu, 2))
stop[0] = True
