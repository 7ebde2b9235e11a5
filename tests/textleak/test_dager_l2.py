"""DAGER's incremental second-block input (``l2_block.Layer2Stage``, issue 18): the span distances of
``prefix + [c]`` at the second block's input equal those of the model forward on tiny GPT-2 and tiny
Llama (with and without grouped-query attention), and the search returns the same token ids with it
and without it."""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)
pytest.importorskip("transformers")

from .test_dager import _setup  # noqa: E402
from .test_dager_speed import _gqa_llama  # noqa: E402


def _check_stage(model, rows: list[list[int]], basis: torch.Tensor | None = None) -> None:
    from textleak.attacks.dager.l2_block import Layer2Stage
    from textleak.attacks.dager.span import LayerInputs, decoder_last_inputs, find_tap, span_distance

    probe = torch.tensor([[1, 2, 3]])
    li2 = LayerInputs(model, find_tap(model, 1, probe))
    n, d = len(rows), int(model.get_input_embeddings().embedding_dim)
    cands = sorted(set(range(200, 260)) | {r[p] for r in rows for p in range(6)})
    l1 = [(cands, None)] * 6
    stage = Layer2Stage.build(model, li2, probe, l1)
    assert stage is not None
    if basis is None:  # a span of the true rows' second-block inputs (true extensions ~0, others far)
        true = torch.cat(decoder_last_inputs(li2, [r[:p] for r in rows for p in range(6)],
                                             [[r[p]] for r in rows for p in range(6)]))
        basis = torch.linalg.qr(true.t())[0][:, : min(true.shape[0], d - 8)]
    for p in range(6):
        prefixes = [r[:p] for r in rows]
        got = stage.distances(prefixes, p, cands, basis)
        want = span_distance(basis, torch.cat(decoder_last_inputs(li2, prefixes, [cands] * n))).view(n, -1)
        assert got.shape == (n, len(cands))
        assert (got - want).abs().max() < 1e-5, p
        true_col = [cands.index(r[p]) for r in rows]
        assert float(got[torch.arange(n), true_col].max()) < 1e-3  # the true extensions lie in the span
        assert float(got.median()) > 1e-2  # and most others do not (a real test, not all zeros)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_layer2_stage_equals_model_forward(name):
    _, _, model, _, _, _, batch = _setup(f"text/{name}/dager", 3)
    model.eval()
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    rows = [ids[i].tolist() for i in range(ids.shape[0]) if int(mask[i].sum()) >= 6]
    _check_stage(model, rows)


def test_layer2_stage_grouped_query_attention():
    model = _gqa_llama()
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, 200, (6,), generator=g).tolist() for _ in range(3)]
    _check_stage(model, rows)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_search_with_layer2_stage_same_tokens(name):
    """The exact search with the stage (``DAGER(exact_scores=False)``) and with the model forward
    (``DAGER()``) returns the same token ids and scores (to float32 round-off); the stage is used on the
    rotary model."""
    from common.seed import make_generator
    from textleak.attacks.dager import DAGER

    _, _, model, obs, prior, _, _ = _setup(f"text/{name}/dager", 3)
    rec = DAGER(exact_scores=False).reconstruct(obs, model, prior, generator=make_generator(7))
    off = DAGER().reconstruct(obs, model, prior, generator=make_generator(7))
    assert rec.stats["l2_block"] == 1.0 and off.stats["l2_block"] == 0.0
    if name == "tiny-llama":  # (tiny GPT-2: the feed-forward prefilter leaves layer 2 to the model forward)
        assert rec.stats["l2_block_paths"] > 0
    assert rec.extras["token_ids"] == off.extras["token_ids"]
    assert rec.confidence == pytest.approx(off.confidence, rel=1e-4)


def test_span_of_tall_matrix_equals_direct_svd():
    """``span_of`` on a tall update (the SVD of its QR factor) gives the direct SVD's singular values, rank
    and span (GPT-2's fused ``c_attn``: 3 d x d)."""
    from textleak.attacks.dager.span import span_of

    g = torch.Generator().manual_seed(0)
    m = torch.randn(192, 40, generator=g, dtype=torch.float64) @ torch.randn(40, 64, generator=g, dtype=torch.float64)
    m = m + 1e-9 * torch.randn(192, 64, generator=g, dtype=torch.float64)
    sp = span_of(m)
    _, s, vh = torch.linalg.svd(m, full_matrices=False)
    assert sp.rank == 40
    assert torch.allclose(sp.singular_values, s, rtol=1e-10, atol=1e-12 * float(s[0]))
    ref = vh[:40].t()
    assert float((sp.basis - ref @ (ref.t() @ sp.basis)).abs().max()) < 1e-10
