"""The workers of ``bench/perf_lamp.py`` (each runs in its own subprocess: ``perf_lamp.py --worker NAME``).

Split from ``perf_lamp.py`` (which builds the rows); see its docstring for what each worker measures.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import replace

CASE = "text/minilm-bert/fedsgd-short"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- workers (run in a subprocess each) ------------------------------------------------------------
def _random_minilm(generator):
    """MiniLM-L6's architecture (6 layers, hidden 384, its WordPiece) with random weights: the same
    per-step cost as the pretrained model where its weights cannot travel (a device machine)."""
    import transformers as tf

    from textleak.models import TextModelInfo, _finish, _fresh_head, _random_init, minilm_dir, minilm_tokenizer

    cfg = tf.BertConfig.from_pretrained(str(minilm_dir()), num_labels=2, attn_implementation="eager")
    model = _random_init(lambda: tf.BertForSequenceClassification(cfg), generator)
    _fresh_head(model, generator)
    return _finish(model, TextModelInfo("minilm-config-random", "encoder", minilm_tokenizer(), 2))


def _start(device: str = "cpu"):
    """``_setup`` and the projection benchmarks' shared start (``perf_lamp_s15``, ``perf_lamp_s20``): ``(kit, case,
    model, trial, preset, observation, prior, truth, input ids, x0)``, ``x0`` the true embeddings plus a fixed noise."""
    import torch

    from common.seed import make_generator

    kit, case, model, t, preset = _setup(device)
    obs, prior, truth = t.attacker.observation, t.attacker.prior, t.truth
    ids = t.batch.inputs["input_ids"]
    x0 = prior.embedding[ids] + 0.05 * torch.randn(ids.shape + (prior.embedding.shape[1],), generator=make_generator(5))
    return kit, case, model, t, preset, obs, prior, truth, ids, x0


def _setup(device: str):
    """``PERF_LAMP_RANDOM_MINILM=1``: MiniLM's architecture with random weights; ``PERF_LAMP_LM=NAME``:
    the LM prior (case option ``lm_prior``, e.g. ``gpt2``: GPT-2-small's configuration, random);
    ``PERF_LAMP_DATA_SEED=S`` (default 1, development seeds < 1000): the sentence (data seed S, client seed S + 1)."""
    import torch

    from common.seed import make_generator
    from eval.catalog import catalog
    from eval.pipeline import simulate
    from textleak.cases import CASES
    from textleak.kit import TextKit

    kit = TextKit()
    case = CASES[CASE].with_batch_size(1)
    if os.environ.get("PERF_LAMP_LM"):
        case = replace(case, options={**case.options, "lm_prior": os.environ["PERF_LAMP_LM"]})
    dev = torch.device(device)
    if os.environ.get("PERF_LAMP_RANDOM_MINILM") == "1":
        model = _random_minilm(make_generator(0)).to(dev)
    else:
        model = kit.load_model(case, device=dev, generator=make_generator(0))
    pool = kit.load_pool(case, data_path=None)
    t = simulate(case, kit, model=model, pool=pool, prior_kind="text", device=dev, keep_batch=True,
                 data_generator=make_generator(int(os.environ.get("PERF_LAMP_DATA_SEED", "1"))),
                 client_generator=make_generator(int(os.environ.get("PERF_LAMP_DATA_SEED", "1")) + 1))
    cat = catalog()

    def preset(name: str):
        _, cls, over = cat.resolve(name)
        return replace(cls.default_config(), **over)

    return kit, case, model, t, preset


def _timed(fn, reps: int, warm: int = 2) -> float:
    """Median seconds of ``fn`` over ``reps`` runs after ``warm`` warm-ups (a shared machine: medians)."""
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def _sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _step_fn(s, x0, device: str):
    """One continuous step as ``TextSearch.run`` takes it: objective (distance + regulariser) and backward."""
    cfg = s.cfg

    def step():
        x = x0.clone().requires_grad_(True)
        xe = s.pin(x)
        loss = s.step_distance(xe)
        if cfg.coeff_reg > 0:
            loss = loss + cfg.coeff_reg * (xe.norm(dim=-1)[s.body].mean() - s.init_size) ** 2
        loss.backward(inputs=[x])
        _sync(device)
    return step


def _floor_fn(s, model, x0, device: str):
    """The floor of one step: a bare forward + double backward of the same model and batch (the
    gradient's inner product with the target, differentiated to the input embeddings)."""
    import torch

    params = dict(model.named_parameters())
    names, target = s.matcher.names, s.matcher.target

    def floor():
        x = x0.clone().requires_grad_(True)
        logits = model(inputs_embeds=x, attention_mask=s.mask).logits
        loss = torch.nn.functional.cross_entropy(logits, s.labels)
        gs = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
        d = sum((g * target[n]).sum() for g, n in zip(gs, names))
        d.backward(inputs=[x])
        _sync(device)
    return floor


def _eager_lm(prior):
    """The previous LM prior (transformers' float32 load of the GGUF, full logits) installed on ``prior``."""
    from common.seed import make_generator
    from textleak.models import load_text_model, smollm2_tokenizer
    from textleak.prior import LMPrior

    m = load_text_model("smollm2", generator=make_generator(0))
    for p in m.parameters():
        p.requires_grad_(False)
    prior._lm = LMPrior(m, smollm2_tokenizer())
    return prior._lm


#: the discrete round before the LM trie (commit 389d911): padded LM batch, ghost chunks of 32 (and, with
#: :func:`_old_blocks`, the streamed head in blocks of 8M logits)
OLD_ROUND = {"lm_shared_prefix": False, "ghost_chunk": 32}


@contextmanager
def _old_blocks(on: bool = True):
    """``textleak.prior._streamed_ce``'s previous default block (8M logits) while ``on``."""
    import textleak.prior as tp

    keep = tp._streamed_ce.__defaults__
    if on:
        tp._streamed_ce.__defaults__ = (1 << 23,)
    try:
        yield
    finally:
        tp._streamed_ce.__defaults__ = keep


#: the library code before session 13 (``PERF_LAMP_SET=s13`` compares against it in one process)
PREV = "86c4b62"


@contextmanager
def _prev_lm(on: bool = True):
    """While ``on``: ``LMPrior._nll_trie`` as of commit ``PREV`` (every trie node through the layers, leaves
    included; the head's log-normaliser once per edge), loaded from git; the same LM and tokenizer otherwise."""
    import subprocess
    import types

    import textleak.prior as tp

    keep = tp.LMPrior._nll_trie
    if on:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        src = subprocess.run(["git", "show", f"{PREV}:textleak/components/lm_prefix.py"], cwd=root, check=True,
                             capture_output=True, text=True).stdout
        mod = types.ModuleType("prev_lm_prefix")
        exec(compile(src, f"{PREV}:lm_prefix.py", "exec"), mod.__dict__)

        def nll_trie(self, texts):
            emb = self.model.lm_head.emb
            return mod.trie_nll(self.model, [self._ids(t) for t in texts],
                                ce=lambda h, t: tp._streamed_ce(h, t, emb.rows, emb.num_embeddings))
        tp.LMPrior._nll_trie = nll_trie
    try:
        yield
    finally:
        tp.LMPrior._nll_trie = keep


def _time_calls(obj, attr: str) -> list[float]:
    """Wrap ``obj.attr`` (an instance attribute shadowing the method) to record each call's seconds."""
    inner, spent = getattr(obj, attr), []

    def timed(*a, **k):
        t0 = time.perf_counter()
        r = inner(*a, **k)
        spent.append(time.perf_counter() - t0)
        return r
    setattr(obj, attr, timed)
    return spent


def worker(name: str, quick: bool, device: str) -> dict:
    import torch

    from common.seed import make_generator
    from textleak.components.search import TextSearch

    kit, case, model, t, preset = _setup(device)
    obs, prior, truth = t.attacker.observation, t.attacker.prior, t.truth
    ids = t.batch.inputs["input_ids"]
    x0 = prior.embedding[ids].to(ids.device) + 0.05 * torch.randn(
        ids.shape + (prior.embedding.shape[1],), generator=make_generator(5)).to(ids.device)
    reps = 5 if quick else 20
    out: dict = {"seq_len": int(obs.seq_lens[0])}
    if name == "steps":  # floor, lamp-cos and tag continuous steps, interleaved (medians)
        fns = {}
        for attack, over in (("lamp-cos", {}), ("tag", {}), ("lamp-cos-old", {"ghost_step": False})):
            s = TextSearch(replace(preset(attack.removesuffix("-old")), coeff_perplexity=0.0, **over), obs, model, prior,
                           make_generator(3))
            fns[attack] = _step_fn(s, x0, device)
        fns["floor"] = _floor_fn(s, model, x0, device)
        ts: dict = {k: [] for k in fns}
        for i in range(reps + 2):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                if i >= 2:
                    ts[k].append(time.perf_counter() - t0)
        out.update({f"{k}_s": sorted(v)[len(v) // 2] for k, v in ts.items()})
    elif name.startswith("init-") or name.startswith("swap-") or name.startswith("round-"):
        ghost = not name.endswith("-old")
        cfg = replace(preset("lamp-cos"), ghost=ghost, lm_bf16=name.endswith("-bf16"))
        if not name.startswith("round-"):
            cfg = replace(cfg, coeff_perplexity=0.0)
        s = TextSearch(cfg, obs, model, prior, make_generator(3))
        n_cand = 64 if quick else 200
        if name.startswith("init-"):
            xs = torch.randn((n_cand,) + tuple(x0.shape), generator=make_generator(6)).to(x0.device)
            xs = torch.where(s.body.unsqueeze(-1), xs, s.pinned.unsqueeze(0))
            out["per_candidate_s"] = _timed(lambda: s.score_batches(xs), 1 if quick else 3, warm=1) / n_cand
            out["choice"] = int(s.score_batches(xs).argmin())
        else:
            if name.startswith("round-"):
                prior.lm()  # load the LM prior outside the timing
            s.cfg = replace(s.cfg, swap_candidates=200)
            res = []

            def one():
                s.rng = __import__("numpy").random.default_rng(11)  # the same 200 proposals each time
                s._nll_cache.clear()  # score every text each time
                res.append(s.discrete_step(x0)[0])
            out["round_s"] = _timed(one, 1 if quick else 3, warm=1)
            out["choice_sum"] = float(res[-1].sum())
    elif name == "project":  # one process, interleaved: floor, continuous step, one discrete round with the LM
        # prior (the paper's 200 candidates) new and old (OLD_ROUND: padded LM batch, 8M-logit head blocks,
        # ghost chunks of 32), init scoring new and old; the 2,000-step attack projected from these for both
        import numpy as np
        bf16 = os.environ.get("PERF_LAMP_LM_BF16") == "1"  # the opt-in bf16 LM prior
        s = TextSearch(replace(preset("lamp-cos"), lm_bf16=bf16), obs, model, prior, make_generator(3))
        s13 = os.environ.get("PERF_LAMP_SET") == "s13"  # old = commit PREV's LM trie, else OLD_ROUND
        so = TextSearch(replace(s.cfg, **({} if s13 else OLD_ROUND)), obs, model, prior, make_generator(3))
        out["old"] = f"commit {PREV} LM trie" if s13 else "OLD_ROUND"
        out["lm_bf16"] = bf16
        t0 = time.perf_counter()
        prior.lm()
        out["lm_load_s"] = time.perf_counter() - t0
        floor = _floor_fn(s, model, x0, device)
        step = _step_fn(s, x0, device)
        xs = torch.randn((64,) + tuple(x0.shape), generator=make_generator(6)).to(x0.device)
        xs = torch.where(s.body.unsqueeze(-1), xs, s.pinned.unsqueeze(0))
        ts: dict = {k: [] for k in ("floor", "step", "round", "round_old", "lm", "lm_old", "init", "init_old")}
        same = []
        for r in range(3 if quick else 4):
            res = {}
            for which in (("new", "old") if r % 2 == 0 else ("old", "new")):
                srch, sfx = (s, "") if which == "new" else (so, "_old")
                srch.rng = np.random.default_rng(11 + r)
                srch._nll_cache.clear()
                lm_t = _time_calls(srch, "nll")
                with _old_blocks(which == "old" and not s13), _prev_lm(which == "old" and s13):
                    t0 = time.perf_counter()
                    res[which] = srch.discrete_step(x0)[0]
                    ts["round" + sfx].append(time.perf_counter() - t0)
                    ts["lm" + sfx].append(sum(lm_t))
                    t0 = time.perf_counter()
                    srch.score_batches(xs)
                    ts["init" + sfx].append((time.perf_counter() - t0) / 64)
                del srch.nll
            same.append(bool(torch.equal(res["new"], res["old"])))
            for _ in range(5):
                for k, fn in (("floor", floor), ("step", step)):
                    t0 = time.perf_counter()
                    fn()
                    ts[k].append(time.perf_counter() - t0)
        print(json.dumps(ts), file=sys.stderr, flush=True)
        med = {k: sorted(v)[len(v) // 2] for k, v in ts.items()}
        out.update({f"{k}_s": v for k, v in med.items()}, samples=ts, load=os.getloadavg(), same_round=same)
        for sfx in ("", "_old"):
            total = 2000 * med["step"] + 1000 * med["init" + sfx] + 24 * med["round" + sfx]
            out.update({"projected_s" + sfx: total, "projected_ratio" + sfx: total / (2000 * med["floor"])})
    elif name in ("lm-new", "lm-old"):  # the LM prior alone: load, then the distinct texts of one discrete round
        import numpy as np
        s = TextSearch(preset("lamp-cos"), obs, model, prior, make_generator(3))
        t0 = time.perf_counter()
        lm = _eager_lm(prior) if name == "lm-old" else prior.lm()
        out["load_s"] = time.perf_counter() - t0
        texts: list[str] = []
        inner = s.nll
        s.nll = lambda ts: (texts.extend(ts), inner(ts))[1]
        s.rng = np.random.default_rng(11)
        s.discrete_step(x0)
        todo = sorted(set(texts))
        vals = []
        out["nll_s"] = _timed(lambda: vals.append(lm.nll(todo)), 1 if quick else 3, warm=1)
        out.update(n_texts=len(todo), nll=vals[-1].tolist())
    elif name in ("qlm-new", "qlm-old"):  # a short attack with the LM prior on, packed vs eager LM, same seeds
        from eval.pipeline import score
        if name == "qlm-old":
            _eager_lm(prior)
        else:
            prior.lm()  # loaded outside the timing, as the old one
        cfg = replace(preset("lamp-cos"), n_steps=80, init_candidates=16, init_permutations=16, swap_every=20,
                      swap_candidates=32)
        t0 = time.perf_counter()
        rec = TextSearch(cfg, obs, model, prior, make_generator(3)).run()
        out["attack_s"] = time.perf_counter() - t0
        m, _ = score(kit, rec, truth, case=case)
        out.update(rouge1=float(m["rouge1"]), rouge2=float(m["rouge2"]), text=rec.data[0], n_steps=cfg.n_steps,
                   best_loss=float(rec.stats["best_loss"]))
    elif name in ("short-new", "short-old"):  # a short attack with the LM prior on, this session's round vs OLD_ROUND
        from eval.pipeline import score
        old = name == "short-old"
        s13 = os.environ.get("PERF_LAMP_SET") == "s13"
        cfg = replace(preset("lamp-cos"), n_steps=80, init_candidates=16, init_permutations=16, swap_every=20,
                      swap_candidates=200, **(OLD_ROUND if old and not s13 else {}))
        t0 = time.perf_counter()
        prior.lm()
        out["lm_load_s"] = time.perf_counter() - t0
        with _old_blocks(old and not s13), _prev_lm(old and s13):
            t0 = time.perf_counter()
            rec = TextSearch(cfg, obs, model, prior, make_generator(3)).run()
            out["attack_s"] = time.perf_counter() - t0
        m, _ = score(kit, rec, truth, case=case)
        out.update(rouge1=float(m["rouge1"]), rouge2=float(m["rouge2"]), text=rec.data[0], n_steps=cfg.n_steps,
                   best_loss=float(rec.stats["best_loss"]), swaps=float(rec.stats["swaps_accepted"]))
    elif name.startswith("quality-"):
        from eval.pipeline import score
        cfg = replace(preset("lamp-cos"), ghost=name.endswith("-new"))
        if quick:
            cfg = replace(cfg, n_steps=80, init_candidates=16, init_permutations=16, swap_every=20,
                          swap_candidates=32)
        else:
            cfg = replace(cfg, n_steps=300, init_candidates=100, init_permutations=100, swap_every=25)
        t0 = time.perf_counter()
        rec = TextSearch(cfg, obs, model, prior, make_generator(3)).run()
        out["attack_s"] = time.perf_counter() - t0
        m, _ = score(kit, rec, truth, case=case)
        out.update(rouge1=float(m["rouge1"]), rouge2=float(m["rouge2"]), text=rec.data[0], n_steps=cfg.n_steps)
    elif name.startswith("sentences-"):  # 5 sentences, a mid-size attack without the LM (the part that changed)
        from eval.pipeline import score
        from eval.pipeline import simulate
        cfg = replace(preset("lamp-cos"), ghost=name.endswith("-new"), coeff_perplexity=0.0, n_steps=150,
                      init_candidates=100, init_permutations=100, swap_every=25, swap_candidates=64)
        res = []
        for seed in range(5):
            ts = simulate(case, kit, model=model, pool=kit.load_pool(case, data_path=None), prior_kind="text",
                          device=torch.device(device), keep_batch=True, data_generator=make_generator(100 + seed),
                          client_generator=make_generator(200 + seed))
            t0 = time.perf_counter()
            rec = TextSearch(cfg, ts.attacker.observation, model, ts.attacker.prior, make_generator(3)).run()
            m, _ = score(kit, rec, ts.truth, case=case)
            res.append({"attack_s": time.perf_counter() - t0, "rouge1": float(m["rouge1"]), "rouge2": float(m["rouge2"]),
                        "text": rec.data[0], "truth": ts.truth["sentences"][0]})
        out["sentences"] = res
    elif name.startswith("full"):  # the paper's lamp-cos (2,000 steps) on the sentence; floor steps before,
        # after and at every discrete round (timed apart from the attack: a loaded machine's floor drifts)
        from eval.pipeline import score
        variant = name.removeprefix("full").lstrip("-") or "new"
        over = {"new": {}, "old": {"ghost": False, "ghost_step": False}, "bf16": {"lm_bf16": True}}[variant]
        cfg = replace(preset("lamp-cos"), **over)
        s = TextSearch(cfg, obs, model, prior, make_generator(3))
        floor = _floor_fn(s, model, x0, device)
        t0 = time.perf_counter()
        prior.lm()
        out["lm_load_s"] = time.perf_counter() - t0
        no_floor = os.environ.get("PERF_LAMP_NO_FLOOR") == "1"  # the attack's own peak RSS: no floor steps (their
        if no_floor:  # parameter-gradient graph is ~0.2 GB the attack never builds)
            floor = lambda: None  # noqa: E731
        fl = [_timed(floor, 20)]
        inner, during = s.discrete_step, []

        def discrete_step(x):
            t1 = time.perf_counter()
            floor()
            during.append(time.perf_counter() - t1)
            return inner(x)
        s.discrete_step = discrete_step
        t0 = time.perf_counter()
        rec = s.run()
        out["attack_s"] = time.perf_counter() - t0 - sum(during)
        print(json.dumps({"attack_s": out["attack_s"], "text": rec.data[0], "during": during}), file=sys.stderr, flush=True)
        fl.append(_timed(floor, 20))
        out["floor_s"] = fl
        out["floor_during_s"] = sorted(during)[len(during) // 2] if during else None
        out["variant"] = variant
        out["load"] = os.getloadavg()
        m, _ = score(kit, rec, truth, case=case)
        out.update(rouge1=float(m["rouge1"]), rouge2=float(m["rouge2"]), text=rec.data[0], truth=truth["sentences"][0],
                   n_steps=cfg.n_steps, stats={k: float(v) for k, v in rec.stats.items()})
    else:
        raise ValueError(f"unknown worker {name!r}")
    out["peak_rss_mb"] = _rss_mb()
    if device.startswith("cuda"):
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out
