"""DAGER decoder speed-ups of session 16 (issue 18): the completion's residual with the output layer by hand
(``last_head.py``) against autograd's, and the exact decoder search's screened span distances
(``dec_dist.py``) against ``span_distance``, bit for bit where they matter, and end to end."""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)
pytest.importorskip("transformers")

from .test_dager import _sentences, _setup  # noqa: E402


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_residual_with_hand_output_layer_equals_autograd(name):
    """``packed_residual`` gives autograd's residual (float32 round-off), the same hidden states, denominator and
    graph, and the completion returns the same (true) last tokens from it."""
    from textleak.attacks.dager import last_head, last_token

    _, _, model, obs, _, truth, batch = _setup(f"text/{name}/dager", 6)
    model.eval()
    sents = _sentences(batch)
    sents = [s[:k] for s, k in zip(sents, (11, 3, 7, 4, 9, 2))]  # varied lengths: rows holding two sentences
    out = model.get_output_embeddings()
    assert last_head.supported(model, out)
    key = next(n for n, p in model.named_parameters() if p is out.weight)
    got, want = (last_token._residual(obs, model, out, obs.tensors[key], sents, True, head=h) for h in (True, False))
    scale = float(want[0].abs().max())
    assert float((got[0] - want[0]).abs().max()) < 1e-5 * scale
    assert float((got[0] - obs.tensors[key].double()).abs().max()) > 1e-3 * scale  # not a no-op
    assert torch.equal(got[1], want[1]) and got[2] == want[2]
    assert torch.equal(got[3].hidden, want[3].hidden)
    full = _sentences(batch)
    assert last_token.complete_last(obs, model, full) == truth["token_ids"]


def test_hand_output_layer_only_for_plain_heads():
    """A model class outside ``PLAIN_HEADS`` (or an output layer with a bias) keeps autograd's path."""
    from torch import nn

    from textleak.attacks.dager import last_head

    class Other(nn.Module):
        pass

    assert not last_head.supported(Other(), nn.Linear(4, 8, bias=False))
    _, _, model, _, _, _, _ = _setup("text/tiny-gpt2/dager", 2)
    assert not last_head.supported(model, nn.Linear(4, 8, bias=True))


@pytest.mark.parametrize("threads", [1, 2])
def test_screened_distances_bit_equal_under_the_bound(threads):
    """Rows near a span (noise of 1e-5 to 0.3), in chunks of every remainder, short ones included: every distance
    under ``below`` is ``span_distance``'s to the bit, every other is at least ``below``."""
    from textleak.attacks.dager import dec_dist
    from textleak.attacks.dager.span import span_distance

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(5)
        for d, r, n in ((64, 40, 9), (64, 31, 1426), (96, 70, 8195), (128, 100, 2003), (96, 20, 16), (64, 60, 17)):
            b, _ = torch.linalg.qr(torch.randn(d, r, dtype=torch.float64, generator=g))
            coef = torch.randn(n, r, dtype=torch.float64, generator=g)
            size = 10 ** (-4 * torch.rand(n, 1, generator=g, dtype=torch.float64)) * 0.3
            x = (coef @ b.t() + torch.randn(n, d, dtype=torch.float64, generator=g) * size).float()
            want = span_distance(b, x.double())
            for below in (1e-3, 0.02):
                got = dec_dist.Screen(b).distances(x, below)
                m = want < below
                assert m.any()
                assert torch.equal(got[m], want[m])
                assert bool((got[~m] >= below).all())
    finally:
        torch.set_num_threads(old)


def test_exact_rows_keep_the_chunk_layout():
    """``exact_rows`` equals ``span._exact`` on the whole chunk at the chosen rows (remainder rows and short
    chunks included)."""
    from textleak.attacks.dager.dec_dist import exact_rows
    from textleak.attacks.dager.span import _exact

    g = torch.Generator().manual_seed(2)
    b, _ = torch.linalg.qr(torch.randn(80, 50, dtype=torch.float64, generator=g))
    for n in (1, 5, 15, 16, 17, 18, 19, 403, 1001):
        v = torch.randn(n, 80, generator=g)
        full = _exact(b, v)
        for k in (1, 2, 3, 7):
            idx = torch.randperm(n, generator=g)[:min(k, n)]
            assert torch.equal(exact_rows(b, v, idx), full[idx])


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_search_with_screen_same_sentences_and_confidences(name, monkeypatch):
    """The whole attack with the screen and with every distance in float64: the same token ids and the same
    confidences, bit for bit (GPT-2: the prefiltered rows; Llama: the rotary model's full rows)."""
    from common.seed import make_generator
    from textleak.attacks.dager import DAGER, DagerConfig, decoder

    kit, case, model, obs, prior, truth, _ = _setup(f"text/{name}/dager", 4)
    calls: list[int] = []
    orig = decoder.Screen

    class Spy(orig):  # type: ignore[misc, valid-type]
        def distances(self, x, below):
            calls.append(x.shape[0])
            return super().distances(x, below)

    monkeypatch.setattr(decoder, "Screen", Spy)
    new = DAGER(DagerConfig()).reconstruct(obs, model, prior, generator=make_generator(0))
    assert calls
    monkeypatch.setattr(decoder, "Screen", lambda basis: None)
    old = DAGER(DagerConfig()).reconstruct(obs, model, prior, generator=make_generator(0))
    assert new.extras["token_ids"] == old.extras["token_ids"]
    assert list(new.confidence) == list(old.confidence)
    assert kit.score(new, truth, case=case)[0]["rouge1"] > 0.9
