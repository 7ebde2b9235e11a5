"""The text kit: models, sentence pools, client batches, loss, prior and ROUGE scoring."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import Tensor, nn

from common.case import Case
from common.kit import build_prior
from common.labels import label_accuracy
from common.matching import assignment
from common.types import Batch, Reconstruction

from .attacks.baseline import sentence_pool_prior
from .data import load_sentences
from .models import classifier_head, embedding_param_name, info_of, input_embedding, load_text_model, max_length, param_name
from .prior import TextPrior


class TextPool:
    """A sentence pool with columns ``text`` and ``label`` (``textleak.data.Sentences``; indexed as a ``datasets.Dataset`` is)."""

    def __init__(self, dataset, source: str) -> None:
        self.dataset = dataset
        self.source = source
        self._lengths: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def lengths(self, tokenizer) -> list[int]:
        key = id(tokenizer)
        if key not in self._lengths:
            self._lengths[key] = [len(x) for x in tokenizer(list(self.dataset["text"]))["input_ids"]]
        return self._lengths[key]


def special_frame(tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Special tokens the tokenizer adds before / after a sentence (e.g. [CLS] ... [SEP])."""
    probe = tokenizer("hello")["input_ids"]
    body = tokenizer("hello", add_special_tokens=False)["input_ids"]
    for i in range(len(probe) - len(body) + 1):
        if probe[i:i + len(body)] == body:
            return tuple(probe[:i]), tuple(probe[i + len(body):])
    return (), ()


def excluded_ids(tokenizer, vocab_size: int) -> tuple[int, ...]:
    """Ids that never occur inside a sentence: special tokens and BERT's [unused*] slots."""
    ids = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None and i < vocab_size)
    vocab = tokenizer.get_vocab()
    for tok, i in vocab.items():
        if i < vocab_size and tok.startswith("[unused") and tok.endswith("]"):
            ids.add(int(i))
    for i in getattr(tokenizer, "added_tokens_decoder", {}) or {}:
        if int(i) < vocab_size:
            ids.add(int(i))
    return tuple(sorted(ids))


def text_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Per-example loss: cross-entropy of the class for encoders; mean next-token CE per
    sequence (padding masked) for decoders. Accepts ``input_ids`` or ``inputs_embeds``, hard or
    soft targets."""
    inputs = batch.inputs
    mask = inputs.get("attention_mask")
    if "inputs_embeds" in inputs:
        out = model(inputs_embeds=inputs["inputs_embeds"], attention_mask=mask)
    else:
        out = model(input_ids=inputs["input_ids"], attention_mask=mask)
    logits = out.logits
    if logits.dim() == 2:  # sequence classifier
        y = batch.labels
        if y is None:
            raise ValueError("an encoder classifier batch needs labels")
        return nn.functional.cross_entropy(logits, y, reduction="none")
    targets = inputs.get("targets", inputs.get("input_ids"))
    if targets is None:
        raise ValueError("a decoder batch needs input_ids or targets")
    lp = logits[:, :-1].log_softmax(-1)
    if targets.is_floating_point():  # soft targets [B, T, V]
        ce = -(targets[:, 1:] * lp).sum(-1)
    else:
        ce = -lp.gather(-1, targets[:, 1:].unsqueeze(-1)).squeeze(-1)
    m = (mask[:, 1:] if mask is not None else torch.ones_like(ce)).to(ce.dtype)
    return (ce * m).sum(1) / m.sum(1).clamp(min=1.0)


class TextKit:
    modality = "text"
    optional: ClassVar[frozenset[str]] = frozenset({"truth_from_file", "save_artifacts"})

    # -- model and data ------------------------------------------------------------------------
    def load_model(self, case: Case, *, device: torch.device, generator: torch.Generator) -> nn.Module:
        model = load_text_model(case.model, generator=generator, num_labels=int(case.options.get("num_labels", 2)),
                                task=case.options.get("task"))
        return model.to(device)

    def load_pool(self, case: Case, *, data_path: str | None) -> TextPool:
        source = data_path or case.data
        return TextPool(load_sentences(source), source)

    def sample(self, pool: TextPool, case: Case, *, model: nn.Module, device: torch.device,
               generator: torch.Generator) -> tuple[Batch, Any]:
        info = info_of(model)
        tok = info.tokenizer
        b = case.protocol.batch_size
        lengths = pool.lengths(tok)
        limit = case.options.get("max_tokens")
        eligible = [i for i, n in enumerate(lengths) if limit is None or n <= int(limit)]
        if len(eligible) < b:
            raise ValueError(f"only {len(eligible)} sentences of at most {limit} tokens in {pool.source!r}; "
                             f"need {b}: lower --batch-size or raise max_tokens")
        pick = torch.randperm(len(eligible), generator=generator)[:b].tolist()
        idx = [eligible[i] for i in pick]
        texts = [pool.dataset[i]["text"] for i in idx]
        labels = torch.tensor([int(pool.dataset[i]["label"]) for i in idx], dtype=torch.long)
        mx = max_length(model)
        longest = max(lengths[i] for i in idx)
        if longest > mx:
            raise ValueError(f"a sampled sentence has {longest} tokens but {info.name} accepts at most {mx}: "
                             f"set the case option max_tokens <= {mx} or shorten the data")
        enc = tok(texts, padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        seq_lens = [int(m) for m in mask.sum(1).tolist()]
        if info.kind == "encoder":
            batch = Batch({"input_ids": ids, "attention_mask": mask}, labels.to(device), {"seq_lens": seq_lens})
        else:  # the labels of a causal LM are its own tokens: they are never sent as "labels"
            batch = Batch({"input_ids": ids, "attention_mask": mask}, None, {"seq_lens": seq_lens})
        token_ids = [ids[i, :seq_lens[i]].tolist() for i in range(b)]
        refs = [tok.decode(t, skip_special_tokens=True).strip() for t in token_ids]
        truth = {"sentences": refs, "raw": texts, "labels": labels, "token_ids": token_ids, "kind": info.kind}
        return batch, truth

    @staticmethod
    def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
        return text_loss(model, batch)

    def truth_from_file(self, case: Case, path, *, model: nn.Module) -> dict[str, Any]:
        """Ground truth for ``eval audit``: the client's sentences, one per line."""
        tok = info_of(model).tokenizer
        texts = [t["text"] for t in load_sentences(str(path))]
        refs = [tok.decode(tok(t)["input_ids"], skip_special_tokens=True).strip() for t in texts]
        return {"sentences": refs, "raw": texts, "labels": torch.zeros(len(texts), dtype=torch.long),
                "token_ids": [tok(t)["input_ids"] for t in texts], "kind": info_of(model).kind}

    # -- prior ---------------------------------------------------------------------------------
    def _text_prior(self, case: Case, model: nn.Module, *, device) -> TextPrior:
        info = info_of(model)
        tok = info.tokenizer
        # a detached view, not a copy: the attacks only read it, and its rows stay unread (the model's pages stay
        # unresident) except those the attack gathers, ~45 MB less for MiniLM (issue 18)
        emb = input_embedding(model).weight.detach()
        pre, suf = special_frame(tok)
        head = classifier_head(model) if info.kind == "encoder" else None
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        return TextPrior(
            kind=info.kind, tokenizer=tok, embedding=emb, embedding_name=embedding_param_name(model),
            loss_fn=self.loss_fn, max_len=max_length(model), prefix_ids=pre, suffix_ids=suf, pad_id=int(pad),
            special_ids=excluded_ids(tok, emb.shape[0]), num_labels=info.num_labels,
            label_weight=param_name(model, head.weight) if head is not None else None,
            label_bias=param_name(model, head.bias) if head is not None and head.bias is not None else None,
            lm_name=case.options.get("lm_prior", "smollm2") or None, device=str(device),
        )

    #: prior kind (an attack's ``info.prior``) -> builder; "" / "none" (no declared prior) get the text prior too
    priors: ClassVar[Mapping[str, Callable[..., Any]]] = {"text": _text_prior, "": _text_prior, "none": _text_prior,
                                                          "text-pool": sentence_pool_prior}  # the text-prior baseline's

    def make_prior(self, case: Case, model: nn.Module, prior_kind: str, *, device) -> TextPrior:
        return build_prior(self, case, model, prior_kind, device=device)

    # -- scoring -------------------------------------------------------------------------------
    @staticmethod
    def align(predictions: list[str], references: list[str]) -> list[str]:
        """Hungarian matching of predictions to references on 1 − ROUGE-1 F (as LAMP)."""
        from common.metrics.text import _scorer

        preds = list(predictions) + [""] * max(0, len(references) - len(predictions))
        sc = _scorer(False)
        cost = [[1.0 - sc.score(r, p)["rouge1"].fmeasure for r in references] for p in preds]
        perm = assignment(cost)
        return [preds[i] for i in perm]

    def score(self, reconstruction: Reconstruction, truth: Any, *, case: Case) -> tuple[dict[str, float], str]:
        from common.metrics.text import exact_match, rouge, token_accuracy

        refs = truth["sentences"]
        preds = self.align([str(s) for s in reconstruction.data], refs)
        metrics = dict(rouge(predictions=preds, references=refs))
        metrics.update(token_accuracy(predictions=preds, references=refs))
        metrics.update(exact_match(predictions=preds, references=refs))
        if reconstruction.labels is not None and truth["kind"] == "encoder":
            acc = label_accuracy(reconstruction.labels.flatten().tolist(), truth["labels"].tolist())
            if acc is not None:
                metrics["label_accuracy"] = acc
        return metrics, "hungarian:1-rouge1"

    def save_artifacts(self, rec: Reconstruction, truth: Any, *, case: Case, directory: str | Path) -> dict[str, str]:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        refs = truth["sentences"]
        preds = self.align([str(s) for s in rec.data], refs)
        from common.metrics.text import rouge_per_example

        per = rouge_per_example(predictions=preds, references=refs)
        rows = [{"reference": r, "reconstruction": p, **s} for r, p, s in zip(refs, preds, per)]
        path = d / "sentences.json"
        path.write_text(json.dumps(rows, indent=1, ensure_ascii=False), encoding="utf-8")
        return {"sentences": str(path)}
