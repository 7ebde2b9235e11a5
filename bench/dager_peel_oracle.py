"""Development oracle for certified peeling on decoders (issue 20, direction A): peel the exact per-example
gradients of k TRUE sentences of a SmolLM2 B=32 batch from the observed FedSGD update and report the residual's
layer-1 / layer-2 / feed-forward-input spectra, the per-token certificate of true sentences against near misses,
and (``--search``) what DAGER recovers on the residual. Development seeds (< 1000) only.

    python bench/dager_peel_oracle.py --seed 0 --trial 0 [--ks 8,12,16] [--search 12] [--wrong run.pkl] [--no-cert]
    python bench/dager_peel_oracle.py --seed 0 --trial 0 --peel-from run.pkl

``--wrong`` / ``--peel-from`` read a pickle of a run ({"ids": token ids, "cert": flags}, as the attack's
``extras``): its non-exact sentences are scored, or its certified sentences peeled and the attack run again on the
residual (scaled to a B - k batch) with the combined ROUGE printed.
"""
from __future__ import annotations

import argparse
import copy
import os
import pickle
import sys
import time
from dataclasses import replace

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="text/smollm2/dager")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trial", type=int, default=0)
    ap.add_argument("--ks", default="8,12,16")
    ap.add_argument("--search", type=int, default=0, help="run DAGER on the residual after peeling this many")
    ap.add_argument("--peel-from", default="", help="pickle of a run: peel its certified sentences, rerun DAGER on "
                    "the residual (scaled to a B - k batch)")
    ap.add_argument("--no-cert", action="store_true", help="skip the certificate part")
    ap.add_argument("--wrong", default="", help="pickle of a run (bench output) whose non-exact sentences are tested")
    a = ap.parse_args()
    if a.seed >= 1000:
        raise SystemExit("development seeds only")
    import torch
    torch.set_num_threads(1)
    from common.seed import derive_seed, make_generator
    from common.types import Batch
    from dager_frontier_dev import trial
    from textleak.attacks.dager import DAGER
    from textleak.attacks.dager.frontier_rope import gapless_saturated
    from textleak.attacks.dager.span import LayerInputs, find_tap, first_layer_vectors, observed_matrix, span_of

    p, kit, t = trial(a.case, a.batch_size, a.seed, a.trial, {})
    view = t.attacker
    obs, model, prior = view.observation, view.model, view.prior
    model.eval()
    b = a.batch_size
    truth = [list(x) for x in t.truth["token_ids"]]
    tok = prior.tokenizer
    probe = torch.tensor([[tok.eos_token_id or 0, 1, 2]])
    taps = {"l1": find_tap(model, 0, probe), "l2": find_tap(model, 1, probe), "ffn": find_tap(model, 0, probe, group=2)}
    li1 = LayerInputs(model, taps["l1"])
    gmodel = copy.deepcopy(model).double().eval()
    params = dict(gmodel.named_parameters())
    tap_names = [n for tp in taps.values() for n in tp.names if n in obs.tensors]

    def grads(seq, names):
        batch = Batch({"input_ids": torch.tensor([seq]), "attention_mask": torch.ones(1, len(seq), dtype=torch.long)})
        with torch.enable_grad():
            loss = prior.loss_fn(gmodel, batch).sum() / b
            gs = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        return {n: (torch.zeros_like(params[n]) if g is None else g.detach()) for n, g in zip(names, gs)}

    def spec(tensors, key):
        mat = observed_matrix(taps[key], tensors)
        sp = span_of(mat)
        s = sp.singular_values.double()
        cutoff = min(20, max(1, sp.max_rank // 10))
        r = sp.rank
        gap = float(s[r - 1] / s[r]) if r < s.numel() else float("inf")
        return (f"{key}: rank {r}/{sp.max_rank} gap s[r-1]/s[r]={gap:.3g} s[r-1]/s0={float(s[r-1]/s[0]):.2e} "
                f"gapless_sat={gapless_saturated(sp, cutoff)} n>1e-6={int((s > 1e-6 * s[0]).sum())}")

    all_names = [n for n in obs.tensors if n in params]
    if a.peel_from:
        run = pickle.load(open(a.peel_from, "rb"))
        done = [list(x) for x, c in zip(run["ids"], run["cert"]) if c]
        ts = {tuple(x) for x in truth}
        print(f"peeling {len(done)} certified sentences of the run ({sum(tuple(x) in ts for x in done)} true)")
        acc = {n: obs.tensors[n].double().clone() for n in all_names}
        for s in done:
            g = grads(s, all_names)
            for n in all_names:
                acc[n] -= g[n]
        k = len(done)
        f = b / (b - k)  # the residual is the gradient of the remaining B - k sentences under a mean over B - k
        robs = replace(obs, num_examples=b - k,
                       tensors={**obs.tensors, **{n: (v * f).to(obs.tensors[n].dtype) for n, v in acc.items()}})
        c0 = time.process_time()
        rec = DAGER().reconstruct(robs, model, prior, generator=make_generator(derive_seed(a.seed, a.trial, "attack")))
        cpu = time.process_time() - c0
        rest = ts - {tuple(x) for x in done}
        got = [tuple(x) for x in rec.extras["token_ids"] if x]
        print(f"round 2 on the residual: {cpu:.1f} CPU s, exact {sum(x in rest for x in got)} of {len(rest)} remaining; "
              f"certified {sum(rec.extras['certified'])} (true {sum(c and x in rest for c, x in zip(rec.extras['certified'], got))})")
        print({k_: round(v, 4) for k_, v in rec.stats.items()})
        allp = [x for x in done] + [list(x) for x in rec.extras["token_ids"]]
        texts = [tok.decode(x, skip_special_tokens=True).strip() for x in allp][:b]
        from common.types import Reconstruction
        m, _ = kit.score(Reconstruction(data=texts + [""] * (b - len(texts))), t.truth, case=p.case)
        print("combined", {k_: round(float(v), 4) for k_, v in m.items()})
        return
    c0 = time.process_time()
    g_true = [grads(s, tap_names) for s in truth]
    print(f"per-sentence tap gradients: {time.process_time() - c0:.1f} CPU s for {b} sentences", flush=True)
    # 1. scale: the client's loss is the mean over B of per-sequence mean next-token losses -> share 1/B
    for key in taps:
        m_obs = observed_matrix(taps[key], obs.tensors)
        m_sum = observed_matrix(taps[key], {n: sum(g[n] for g in g_true) for n in taps[key].names if n in obs.tensors})
        print(f"scale check {key}: |obs - sum_i g_i/B| / |obs| = {float((m_obs - m_sum).norm() / m_obs.norm()):.2e}")
    # token statistics
    pred = [s[:-1] for s in truth]
    n_pred = sum(len(x) for x in pred)
    print(f"predicting tokens {n_pred}, distinct {len(set(t for x in pred for t in x))}")
    # 2. residual spectra after peeling k true sentences (truth order)
    base = {n: obs.tensors[n].double() for n in tap_names}
    for key in taps:
        print("  k=0", spec(obs.tensors, key))
    ks = [int(x) for x in a.ks.split(",") if x]
    for k in ks:
        res = {n: base[n] - sum(g_true[i][n] for i in range(k)) for n in tap_names}
        rest = pred[k:]
        print(f"k={k}: remaining predicting tokens {sum(len(x) for x in rest)}, distinct {len(set(t for x in rest for t in x))}")
        for key in taps:
            print("   ", spec(res, key))
        nr = sum(len(x) for x in rest)
        for key in ("l2", "ffn"):
            sv = torch.linalg.svdvals(observed_matrix(taps[key], res)).double()
            idx = sorted({i for i in (nr - 40, nr - 10, nr - 1, nr, nr + 10, nr + 40, 575) if 0 <= i < sv.numel()})
            print(f"    {key} s_i/s_0:", " ".join(f"[{i}]{float(sv[i] / sv[0]):.1e}" for i in idx),
                  "| largest ratio s_i/s_(i+1) past 300:",
                  max(((float(sv[i] / sv[i + 1]), i) for i in range(300, sv.numel() - 1)), default=None))
        for err in (1e-2, 1e-4, 1e-6):
            rs = {n: base[n] - (1 + err) * sum(g_true[i][n] for i in range(k)) for n in tap_names}
            if a.no_cert:
                continue
            print(f"    scale x(1+{err:g}):", spec(rs, "l1"), "|", spec(rs, "l2"))
    if a.no_cert:
        return
    # 3. the per-token certificate: coefficients of the layer-1 update on the batch's token directions
    tset = sorted(set(t for x in pred for t in x))
    x = first_layer_vectors(li1, torch.tensor(tset), 0).double()  # [T, d]
    pinv = torch.linalg.pinv(x.t())  # [T, d]: C = M pinv^T
    m1 = observed_matrix(taps["l1"], obs.tensors)
    coef = m1 @ pinv.t()  # [960, T]
    recon = float((m1 - coef @ x).norm() / m1.norm())
    print(f"layer-1 update explained by the {len(tset)} token directions: relative residual {recon:.2e}")
    col = {t_: j for j, t_ in enumerate(tset)}

    def cert(g, seq):
        d = observed_matrix(taps["l1"], g) @ pinv.t()
        toks = sorted(set(t_ for t_ in seq[:-1] if t_ in col))
        if not toks:
            return float("inf"), []
        rel = [float((coef[:, col[t_]] - d[:, col[t_]]).norm() / coef[:, col[t_]].norm()) for t_ in toks]
        return min(rel), sorted(rel)[:3]

    uniq = [sum(1 for t_ in set(s) if sum(t_ in set(o) for o in pred) == 1) for s in pred]
    print("true sentences: (unique predicting tokens, certificate min rel. residual)")
    vals = []
    for i, s in enumerate(truth):
        c, top = cert(g_true[i], s)
        vals.append(c)
        print(f"  T{i:02d} len {len(s)} uniq {uniq[i]} cert {c:.2e} {['%.1e' % v for v in top]}")
    l1n = taps["l1"].names
    print("near misses:")
    near = []
    for i, s in enumerate(truth[:12]):
        near.append((f"T{i:02d} cut one short", s[:-1]))
        alt = truth[(i + 1) % b][-1] if truth[(i + 1) % b][-1] != s[-1] else truth[(i + 2) % b][-1]
        near.append((f"T{i:02d} wrong last", s[:-1] + [alt]))
        if len(s) > 4:
            near.append((f"T{i:02d} wrong middle", s[:2] + [s[3], s[2]] + s[4:]))
    if a.wrong:
        run = pickle.load(open(a.wrong, "rb"))
        ts = {tuple(x) for x in truth}
        for j, s in enumerate(run["ids"]):
            if s and tuple(s) not in ts:
                near.append((f"search W{j:02d} len {len(s)}", list(s)))
    for name, s in near:
        c, top = cert(grads(s, l1n), s)
        print(f"  {name}: cert {c:.2e} {['%.1e' % v for v in top]}")
    # 4. DAGER on the residual after peeling --search true sentences (every observed tensor peeled)
    if a.search:
        k = a.search
        acc = {n: obs.tensors[n].double().clone() for n in all_names}
        c0 = time.process_time()
        for s in truth[:k]:
            g = grads(s, all_names)
            for n in all_names:
                acc[n] -= g[n]
        print(f"full residual of {k}: {time.process_time() - c0:.1f} CPU s", flush=True)
        robs = replace(obs, tensors={**obs.tensors, **{n: v.to(obs.tensors[n].dtype) for n, v in acc.items()}})
        c0 = time.process_time()
        rec = DAGER().reconstruct(robs, model, prior, generator=make_generator(derive_seed(a.seed, a.trial, "attack")))
        cpu = time.process_time() - c0
        rest = {tuple(x) for x in truth[k:]}
        got = [tuple(x) for x in rec.extras["token_ids"] if x]
        print(f"residual search: {cpu:.1f} CPU s, exact {sum(x in rest for x in got)} of {len(rest)} remaining; "
              f"returned {len(got)}; certified {sum(rec.extras['certified'])}")
        print({k_: round(v, 4) for k_, v in rec.stats.items()})
        for x in got:
            if x not in rest:
                print("   wrong:", tok.decode(list(x))[:100])


if __name__ == "__main__":
    main()
