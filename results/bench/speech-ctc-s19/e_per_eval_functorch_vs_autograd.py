"""Per-evaluation CPU time of the preset's objective + input derivative: torch.func.grad vs plain autograd, interleaved."""
import sys, time, statistics, torch
sys.path.insert(0, "bench")
torch.set_num_threads(1)
from speech_ctc_diagnose import Problem
from common.functional import functional_gradient, graph_gradient
from common.grads import gradient_distance, total_variation
pb = Problem(0, 0)
g = torch.Generator().manual_seed(1)
x0 = (pb.truth + 0.3 * torch.randn(pb.truth.shape, generator=g, dtype=torch.float64)).clamp(min=pb.lower)
def make(fn):
    def obj(feats):
        gr = fn(pb.model, pb.prior.loss_fn, pb.params, pb.prior.build_batch(feats, pb.labels), reduction=pb.reduction)
        return gradient_distance("l2", gr, pb.target, names=pb.names) + 1e-5 * total_variation(feats, dims=(-1, -2))
    return obj
fns = {"functorch": make(functional_gradient), "autograd": make(graph_gradient)}
z = pb.from_feats(x0).clone().requires_grad_(True)
times = {k: [] for k in fns}
for rnd in range(12):
    for k, f in fns.items():
        t = time.process_time()
        for _ in range(10):
            d = f(pb.to_feats(z)); torch.autograd.grad(d, [z])
        if rnd >= 2:
            times[k].append((time.process_time() - t) / 10)
for k, v in times.items():
    print(k, "median cpu s/eval", round(statistics.median(v), 5), "min", round(min(v), 5))
print("ratio functorch/autograd (medians)", round(statistics.median(times["functorch"]) / statistics.median(times["autograd"]), 3))
