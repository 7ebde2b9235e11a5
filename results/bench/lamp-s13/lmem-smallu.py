"""LM-call RSS transient vs number of texts (the streamed head's block = 2^21 / parents rows)."""
import os, sys, time, threading
sys.path.insert(0, os.getcwd())
import torch
samples = []; stop = False
def rss():
    with open("/proc/self/statm") as f: return int(f.read().split()[1]) * 4096 / 2**20
def sampler():
    while not stop: samples.append((time.perf_counter(), rss())); time.sleep(0.003)
threading.Thread(target=sampler, daemon=True).start()
from textleak.prior import lm_prior
lm = lm_prior("smollm2")
texts = [", much it ultimately ponders reasons we need stories so much.", "ultimately it ponders reasons we need much stories so, much.",
         "much, it ultimately ponders the reasons we need stories so much.", "so much it ultimately ponders reasons we need stories much ,"]
lm.nll(texts[:2])
for k in (1, 2, 4):
    for rep in range(2):
        t0 = time.perf_counter(); r0 = rss(); v = lm.nll(texts[:k]); time.sleep(0.01)
        print(k, rep, f"peak +{max(r for t, r in samples if t >= t0) - r0:.0f} MB", v.tolist(), flush=True)
