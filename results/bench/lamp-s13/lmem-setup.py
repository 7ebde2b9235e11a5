import os, sys, gc, resource, time
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
def rss():
    with open("/proc/self/statm") as f: return int(f.read().split()[1])*4096/2**20
def mark(s): print(f"{s:28s} rss {rss():.0f} hwm {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024:.0f}", flush=True)
def tensors():
    import torch
    seen={}; 
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and o.device.type=="cpu":
                st=o.untyped_storage(); seen[st.data_ptr()]=st.nbytes()
        except Exception: pass
    return sum(seen.values())/2**20, len(seen)
mark("start")
import torch; mark("torch")
from dataclasses import replace
from common.seed import make_generator
from eval.catalog import catalog; mark("eval.catalog")
from eval.pipeline import simulate; mark("eval.pipeline")
from textleak.cases import CASES
from textleak.kit import TextKit; mark("textleak.kit")
kit=TextKit(); case=CASES["text/minilm-bert/fedsgd-short"].with_batch_size(1)
import transformers; mark("transformers")
model = kit.load_model(case, device=torch.device("cpu"), generator=make_generator(0)); mark("load_model"); print(tensors())
pool = kit.load_pool(case, data_path=None); mark("load_pool"); print(tensors())
t = simulate(case, kit, model=model, pool=pool, prior_kind="text", device=torch.device("cpu"), keep_batch=True, data_generator=make_generator(1), client_generator=make_generator(2)); mark("simulate"); print(tensors())
gc.collect(); mark("gc")
import ctypes; ctypes.CDLL("libc.so.6").malloc_trim(0); mark("trim")
mods=[m for m in sys.modules]; print(len(mods), [m for m in mods if m.split('.')[0] in ("datasets","pyarrow","pandas","sklearn","scipy","numba","librosa","matplotlib")][:0], sorted({m.split('.')[0] for m in mods}))
