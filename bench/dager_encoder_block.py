"""DAGER encoder beam step: the incremental post-LN first block vs the generic model forward, in
the same run, on the real MiniLM BERT.

    python bench/dager_encoder_block.py [--batch-size 8] [--width 16] [--candidates 20] [--repeats 3]
                                        [--attack-budget 0]

One FedSGD gradient of B Rotten Tomatoes sentences gives the layer-2 span. For the longest sentence
(length L) and prefix lengths p = L/4, L/2, 3L/4 - 1, a beam step is built as the attack builds it:
``width`` prefixes (the true prefix and copies with one token swapped for another candidate), ``candidates``
tokens at p (the true one and random batch tokens), a soft suffix. It is scored by

* ``generic``: every extension through the model's own forward up to block 2
  (``textleak.attacks.dager.beam.generic_step``, the code path without ``fast_block``),
* ``fast``: ``beam.beam_step`` on :class:`textleak.attacks.dager.block.PostLNBlock` without preselection
  (the scores must agree with ``generic``: max |diff| is printed),
* ``fast+pre``: the same with ``encoder_preselect`` (default config).

Seconds are the best of ``--repeats``. With ``--attack-budget S > 0`` the full attack is also run
with ``fast_block`` on and off at that time budget (ROUGE-1, exact match, seconds).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    import torch

    from common.fl import client_update
    from common.observe import observe
    from common.seed import make_generator
    from textleak.attacks.dager import DAGER, DagerConfig
    from textleak.attacks.dager.beam import beam_step, generic_step
    from textleak.attacks.dager.block import PostLNBlock
    from textleak.attacks.dager.span import LayerInputs, first_layer_vectors
    from textleak.cases_dager import CASES
    from textleak.kit import TextKit

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attack-budget", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    kit = TextKit()
    case = CASES["text/minilm-bert/dager"].with_batch_size(args.batch_size)
    model = kit.load_model(case, device=torch.device("cpu"), generator=make_generator(args.seed))
    pool = kit.load_pool(case, data_path=None)
    prior = kit.make_prior(case, model, "text", device="cpu")
    batch, truth = kit.sample(pool, case, model=model, device=torch.device("cpu"),
                              generator=make_generator(args.seed + 1))
    obs = observe(client_update(model, batch, kit.loss_fn, case.protocol, generator=make_generator(args.seed + 2)),
                  case.threat)
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    atk = DAGER()
    taps, spans, _ = atk.spans(obs, model, ids[:1, :3])
    li1, li2 = LayerInputs(model, taps[0]), LayerInputs(model, taps[1])
    blk = PostLNBlock.build(model, li1, li2, ids[:1, :16])
    assert blk is not None, "MiniLM should get the incremental block"
    basis = spans[1].basis.to(torch.float32)
    word = model.get_input_embeddings().weight.detach()
    longest = int(mask.sum(1).argmax())
    sent = ids[longest, : int(mask[longest].sum())].tolist()
    length = len(sent)
    pool_toks = sorted(set(ids[mask.bool()].tolist()))
    g = torch.Generator().manual_seed(args.seed)

    def rand_tok() -> int:
        return pool_toks[int(torch.randint(len(pool_toks), (1,), generator=g))]

    per = [[t] + [rand_tok() for _ in range(args.candidates - 1)] for t in sent]
    suffix = torch.stack([word[torch.tensor(c)].mean(0) for c in per])

    xtab = [first_layer_vectors(li1, torch.tensor(c), q) for q, c in enumerate(per)]
    pos_of = [{t: i for i, t in enumerate(c)} for c in per]
    xsuf = li1.from_embeds(suffix.unsqueeze(0))[0]

    def best_of(fn):
        best, out = float("inf"), None
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t)
        return best, out

    print(f"MiniLM, B={args.batch_size}, sentence length L={length}, width {args.width}, "
          f"{args.candidates} candidates/position, {torch.get_num_threads()} threads")
    print("p | extensions | generic s | fast s | fast+pre s | generic/fast | generic/fast+pre | max |diff|")
    for p in sorted({max(1, length // 4), length // 2, max(1, 3 * length // 4 - 1)}):
        beams = [list(sent[:p])]
        while len(beams) < args.width:
            bm = list(sent[:p])
            j = int(torch.randint(p, (1,), generator=g))
            bm[j] = per[j][int(torch.randint(1, len(per[j]), (1,), generator=g))]
            beams.append(bm)
        ext = [bm + [t] for bm in beams for t in per[p]]

        def generic():
            return generic_step(li2, word, suffix, ext, p, basis)

        def fast(pre: int):
            return beam_step(blk, beams, p, per[p], xtab, pos_of, xsuf, basis, None,
                             preselect=pre)

        t_g, sc_g = best_of(generic)
        t_f, (ext_f, sc_f) = best_of(lambda: fast(0))
        t_p, _ = best_of(lambda: fast(DagerConfig().encoder_preselect))
        assert ext_f == ext
        diff = float((sc_f - sc_g).abs().max())
        print(f"{p} | {len(ext)} | {t_g:.3f} | {t_f:.3f} | {t_p:.3f} | {t_g / t_f:.1f}x | {t_g / t_p:.1f}x | {diff:.1e}")

    if args.attack_budget > 0:
        print("full attack | fast_block | seconds | ROUGE-1 | exact match")
        for fb in (True, False):
            a = DAGER(DagerConfig(fast_block=fb, time_budget_s=args.attack_budget))
            t = time.perf_counter()
            rec = a.reconstruct(obs, model, prior, generator=make_generator(7))
            sec = time.perf_counter() - t
            m, _ = kit.score(rec, truth, case=case)
            print(f"B={args.batch_size} | {fb} | {sec:.1f} | {m['rouge1']:.3f} | {m['exact_match']:.3f}")


if __name__ == "__main__":
    main()
