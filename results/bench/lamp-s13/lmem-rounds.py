"""RSS per round/phase of a short lamp-cos run with many swap rounds early (issue 18 late-spike hunt)."""
import os, sys, time, threading, resource
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
from dataclasses import replace
samples = []
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
stop = False
def sampler():
    while not stop:
        samples.append((time.perf_counter(), rss())); time.sleep(0.01)
threading.Thread(target=sampler, daemon=True).start()
def hwm(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def peak(t0): 
    seg = [r for t, r in samples if t >= t0]; return max(seg) if seg else rss()
from perf_lamp_workers import _setup
from common.seed import make_generator
from textleak.components.search import TextSearch
kit, case, model, t, preset = _setup("cpu")
obs, prior = t.attacker.observation, t.attacker.prior
prior.lm(); print(f"lm loaded rss {rss():.0f} hwm {hwm():.0f}", flush=True)
n = int(os.environ.get("NSTEPS", "80")); every = int(os.environ.get("EVERY", "5"))
cfg = replace(preset("lamp-cos"), n_steps=n, swap_burnin=0.0, swap_every=every)
s = TextSearch(cfg, obs, model, prior, make_generator(3))
log = []
def wrap(name, fn):
    def w(*a, **k):
        t0 = time.perf_counter(); r0 = rss(); out = fn(*a, **k); p = peak(t0)
        extra = f" n_texts {len(a[0])} new {sum(1 for x in a[0] if x not in s._nll_cache) if name == 'nll' else ''}" if name == "nll" else ""
        log.append(f"  {name:20s} {time.perf_counter()-t0:6.1f}s rss {r0:.0f}->{rss():.0f} peak {p:.0f} (+{p-r0:.0f}) hwm {hwm():.0f}{extra}")
        print(log[-1], flush=True); return out
    return w
s.initialise = wrap("initialise", s.initialise)
s.candidate_distances = wrap("candidate_distances", s.candidate_distances)
lm = prior.lm()
orig_nll = s.nll
def nll(texts):
    todo = sorted({x for x in texts if x not in s._nll_cache})
    if todo:
        toks = lm.tokenizer(todo)["input_ids"] if hasattr(lm, "tokenizer") else None
        if toks is not None: print(f"    todo {len(todo)} tokens {sum(map(len, toks))} maxlen {max(map(len, toks))}", flush=True)
    return orig_nll(texts)
s.nll = wrap("nll", nll)
ds = s.discrete_step
k = [0]
def discrete_step(x):
    k[0] += 1; t0 = time.perf_counter(); r0 = rss()
    r = ds(x); p = peak(t0)
    print(f"round {k[0]:2d} rss {r0:.0f}->{rss():.0f} peak {p:.0f} (+{p-r0:.0f}) hwm {hwm():.0f} text {s.texts(s.ids_of(r[0]))[0]!r}", flush=True)
    return r
s.discrete_step = discrete_step
rec = s.run(); stop = True
print("done", rec.data, rec.stats, f"hwm {hwm():.0f}")
