"""The whole-update check's residual (``verify.explains``, issue 20) on true MiniLM batches (permuted) and on two
wrong variants (one sentence cut by a token; one token swapped for another batch token), to set ``verify.TOL``.

    python bench/dager_flags_tol.py

Batches as ``bench/dager_same_ids.py`` draws them; development seeds 0-1, trials 0-2, B = 4, 8, 16, 32."""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    import copy
    import time

    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from common.fl import client_update
    from common.observe import observe
    from common.seed import derive_seed, make_generator
    from textleak.attacks.dager import verify
    from textleak.attacks.dager.span import find_tap
    from textleak.cases_dager import CASES
    from textleak.kit import TextKit
    kit = TextKit()
    for B in (4, 8, 16, 32):
        case = CASES["text/minilm-bert/dager"].with_batch_size(B)
        pool = kit.load_pool(case, data_path=None)
        for seed in (0, 1):
            model = kit.load_model(case, device=torch.device("cpu"), generator=make_generator(derive_seed(seed, "model")))
            prior = kit.make_prior(case, model, "text", device="cpu")
            gm = copy.deepcopy(model).double().eval()
            taps = [find_tap(model, i, torch.tensor([[0, 1, 2]])) for i in (0, 1)]
            for trial in (0, 1, 2):
                batch, truth = kit.sample(pool, case, model=model, device=torch.device("cpu"), generator=make_generator(derive_seed(seed, trial, "data")))
                obs = observe(client_update(model, batch, kit.loss_fn, case.protocol, generator=make_generator(derive_seed(seed, trial, "client"))), case.threat)
                names = list(dict.fromkeys(n for t in taps for n in t.names if n and n in obs.tensors))
                ids = [list(t) for t in truth["token_ids"]]
                g = torch.Generator().manual_seed(trial)
                perm = torch.randperm(B, generator=g).tolist()
                c = time.process_time()
                rel = verify.explains(obs, gm, prior, "encoder", [ids[i] for i in perm], names)
                t = time.process_time() - c
                # wrong: one sentence cut by its last real token, or swapped with another batch token
                w1 = [s for s in ids]; w1[0] = w1[0][:-2] + w1[0][-1:]
                w2 = [list(s) for s in ids]; w2[1][2] = ids[0][1]
                r1 = verify.explains(obs, gm, prior, "encoder", w1, names)
                r2 = verify.explains(obs, gm, prior, "encoder", w2, names)
                print(f"B={B} seed {seed} trial {trial}: true (permuted) {rel:.3g} ({t:.2f} CPU s); cut-one {r1:.3g}; swap-one {r2:.3g}", flush=True)


if __name__ == "__main__":
    main()
