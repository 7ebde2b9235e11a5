"""Utility of a CTC recogniser (``speech/ctc-*`` cases): held-out WER and CER after federated training.

The recogniser (speechleak.models.CTCRecognizer, randomly initialised as in ``speech/ctc-mel/fedsgd``)
is trained by eval/utility.py's ``measure`` loop exactly as the attacked setting sends updates: each
client holds one batch of the case's batch size (B=1 for the CTC cases), computes its FedSGD gradient
of the CTC loss (common.fl's ``client_update``), the defense acts on it, the server averages the
clients' defended gradients and takes an Adam step.

Held-out data: a seeded 20 % of the case's sentence pool (the flite Rotten Tomatoes sentences, at most
``max_chars`` characters, synthetic voices) is held out, disjoint from the training sentences; the
model's greedy CTC decoding (argmax per frame, repeats merged, blanks dropped) is scored by corpus WER
and CER (jiwer, speechleak.metrics.word_error), next to the mean CTC loss per sentence. Deviation from the keyword path: the report's frontier
axis ``test_accuracy`` is the held-out *character* accuracy ``max(0, 1 - CER)``, because a model this
small (about 0.2 M parameters) trained for CPU minutes on a few hundred sentences leaves held-out WER
near 1.0 under every defense (measured; see DEFAULTS), while its CER moves. ``majority_baseline`` is
``max(0, 1 - CER)`` of the best constant transcript (the training sentence whose constant output has
the lowest CER on the training sentences), so a model above it has learnt more than sentence priors.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from common.types import Batch

CTC_NOTE = "held-out {n_test} of {n} sentences (seeded 20 % split); greedy-decoding WER/CER; test_accuracy = 1 - CER"


def greedy_decode(log_probs: Tensor) -> list[str]:
    """Greedy CTC decoding of log-probs [B, T, V]: argmax per frame, repeats merged, blanks dropped."""
    from speechleak.models import BLANK, decode_ids

    out = []
    for row in log_probs.argmax(-1).tolist():
        ids, prev = [], None
        for i in row:
            if i != prev and i != BLANK:
                ids.append(i)
            prev = i
        out.append(" ".join(decode_ids(ids).split()))
    return out


def _char_accuracy(cer: float) -> float:
    return max(0.0, 1.0 - cer)


def best_constant_cer(train_texts: list[str], test_texts: list[str], *, candidates: int = 64,
                      generator: torch.Generator) -> float:
    """CER on ``test_texts`` of the constant transcript (one of ``candidates`` training sentences)
    with the lowest CER on the training sentences: the baseline of a recogniser that ignores audio."""
    import jiwer

    pick = torch.randperm(len(train_texts), generator=generator)[:candidates].tolist()
    refs = [train_texts[i] for i in torch.randperm(len(train_texts), generator=generator)[:128].tolist()]
    best = min(pick, key=lambda i: jiwer.cer(refs, [train_texts[i]] * len(refs)))
    return float(jiwer.cer(test_texts, [train_texts[best]] * len(test_texts)))


def ctc_split(kit, case, seed: int, model: nn.Module):
    """The eval.utility ``Split`` of a CTC case: seeded, disjoint 80/20 sentence split of the pool."""
    from speechleak.kit import ctc_loss, frontend_for, pad_targets
    from speechleak.metrics import word_error

    from .utility import Split

    pool = kit.load_pool(case, data_path=None)
    n = len(pool)
    waves = torch.stack([pool.wave(i) for i in range(n)])
    with torch.no_grad():
        feats = frontend_for(case)(waves)
    texts = [pool.dataset[i]["text"] for i in range(n)]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_test = max(1, n // 5)
    te, tr = perm[:n_test], perm[n_test:]
    if len(tr) < case.protocol.batch_size:
        raise ValueError(f"utility: {case.name}'s pool has {n} sentences; too few to hold out 20 % and fill a batch")
    tr_texts, te_texts = [texts[i] for i in tr.tolist()], [texts[i] for i in te.tolist()]
    const_cer = best_constant_cer(tr_texts, te_texts, generator=g)
    tr_eval = tr[:len(te)]  # as many training sentences as held-out ones, for the train scores

    def batch(idx: Tensor) -> Batch:
        ids = tr[idx]
        tg, tl = pad_targets([texts[i] for i in ids.tolist()])
        return Batch({"feats": feats[ids], "target_lengths": tl}, tg)

    def scores(ids: Tensor, model: nn.Module) -> dict[str, float]:
        hyp, loss = [], 0.0
        with torch.no_grad():
            for s in range(0, len(ids), 32):
                sel = ids[s:s + 32]
                tg, tl = pad_targets([texts[i] for i in sel.tolist()])
                loss += float(ctc_loss(model, Batch({"feats": feats[sel], "target_lengths": tl}, tg)).sum())
                hyp += greedy_decode(model(feats[sel]))
        return {**word_error(predictions=hyp, references=[texts[i] for i in ids.tolist()]), "loss": loss / len(ids)}

    def evaluate(model: nn.Module) -> dict[str, float]:
        was = model.training
        model.eval()
        test, train = scores(te, model), scores(tr_eval, model)
        model.train(was)
        return {"test_accuracy": _char_accuracy(test["cer"]), "train_accuracy": _char_accuracy(train["cer"]),
                "majority_baseline": _char_accuracy(const_cer), "test_wer": test["wer"], "test_cer": test["cer"],
                "train_wer": train["wer"], "train_cer": train["cer"], "constant_cer": const_cer,
                "test_loss": test["loss"], "train_loss": train["loss"]}

    return Split(len(tr), batch, evaluate, ctc_loss, CTC_NOTE.format(n_test=len(te), n=n))
