"""Does a lamp-cos run leave reference cycles holding tensors (freed only by the cyclic GC)?"""
import os, sys, gc, time, collections
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
from dataclasses import replace
import torch
def rss():
    with open("/proc/self/statm") as f: return int(f.read().split()[1]) * 4096 / 2**20
from perf_lamp_workers import _setup
from common.seed import make_generator
from textleak.components.search import TextSearch
kit, case, model, t, preset = _setup("cpu")
obs, prior = t.attacker.observation, t.attacker.prior
prior.lm()
cfg = replace(preset("lamp-cos"), n_steps=int(os.environ.get("NSTEPS", "30")), swap_burnin=0.0, swap_every=10,
              init_candidates=50, init_permutations=10)
s = TextSearch(cfg, obs, model, prior, make_generator(3))
gc.collect(); gc.disable(); r0 = rss()
rec = s.run()
r1 = rss()
gc.set_debug(gc.DEBUG_SAVEALL); n = gc.collect(); r2 = rss()
tens = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
seen = {}
for o in tens:
    try: seen[o.untyped_storage().data_ptr()] = o.untyped_storage().nbytes()
    except Exception: pass
types = collections.Counter(type(o).__name__ for o in gc.garbage)
print(f"rss before run {r0:.0f} after {r1:.0f} after gc {r2:.0f}; unreachable {n}; tensors {len(tens)} {sum(seen.values())/2**20:.1f} MB")
print(types.most_common(15))
print(rec.data, rec.stats)
