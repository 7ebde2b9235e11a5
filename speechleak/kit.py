"""The speech kit: loads clips and models, samples client batches, builds the prior, scores.

Case options (all optional): ``task`` ("kws" | "ctc"), ``features`` ("mel" | "mfcc"),
``seconds`` (clip length; 1.0 for keywords), ``stage`` ("init" | "trained": the attacked
model's training stage), ``train_epochs``, ``channels``/``hidden`` (KWS CNN size),
``score_asr`` (pocketsphinx WER; default on for CTC only, since pocketsphinx cannot
transcribe isolated 1 s keywords even from the originals), ``oracle`` (also score Griffin-Lim from the
*true* features: the waveform-stage ceiling, default true).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from common.case import Case
from common.kit import build_prior
from common.labels import label_accuracy
from common.matching import assignment
from common.types import Batch, Reconstruction

from . import data as D
from . import metrics as M
from .prior import SpeechPrior
from .ctc import ctc_nll_fast
from .frontend import FrontEnd, FrontEndConfig, load_frontend
from .models import KWSCNN, CTCRecognizer, encode_text


def _opt(case: Case, key: str, default):
    return case.options.get(key, default)


def frontend_for(case: Case) -> FrontEnd:
    """The case's front end; the option ``frontend`` (a JSON file, ``frontend.load_frontend``)
    states the federation's own (``eval audit --schema``)."""
    if _opt(case, "frontend", None):
        return FrontEnd(load_frontend(case.options["frontend"]))
    return FrontEnd(FrontEndConfig(kind=_opt(case, "features", "mel")))


def num_samples(case: Case) -> int:
    return int(round(float(_opt(case, "seconds", 1.0)) * D.SAMPLE_RATE))


class SpeechPool:
    """A ``datasets.Dataset`` of clips plus lazily loaded, length-fitted waveforms."""

    def __init__(self, dataset, length: int, task: str) -> None:
        self.dataset = dataset
        self.length = length
        self.task = task
        self._waves: dict[int, Tensor] = {}
        self._emb: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def wave(self, i: int) -> Tensor:
        if i not in self._waves:
            self._waves[i] = D.trim_and_fit(D.read_wav(self.dataset[i]["path"]), self.length)
        return self._waves[i]

    def embedding(self, i: int) -> np.ndarray:
        from .speaker import speaker_embedding

        if i not in self._emb:
            self._emb[i] = speaker_embedding(self.wave(i))
        return self._emb[i]


def kws_loss(model: nn.Module, batch: Batch) -> Tensor:
    return nn.functional.cross_entropy(model(batch.inputs["feats"]), batch.labels, reduction="none")


def ctc_loss(model: nn.Module, batch: Batch) -> Tensor:
    lp = model(batch.inputs["feats"])
    b, t, _ = lp.shape
    in_len = torch.full((b,), t, dtype=torch.long, device=lp.device)
    return ctc_nll_fast(lp, batch.labels, in_len, batch.inputs["target_lengths"])


def soft_alignment_loss(model: nn.Module, batch: Batch) -> Tensor:
    """−Σ_t Σ_c γ_tc log p_tc per utterance for a given per-frame alignment γ (rows summing to 1):
    its logit gradient p − γ equals CTC's when γ is the CTC occupancy (transcript-free attack)."""
    return -(batch.inputs["soft_targets"] * model(batch.inputs["feats"])).sum((1, 2))


def pad_targets(texts: list[str]) -> tuple[Tensor, Tensor]:
    ids = [encode_text(t) for t in texts]
    s = max(1, max(len(i) for i in ids))
    out = torch.zeros((len(ids), s), dtype=torch.long)
    for k, i in enumerate(ids):
        out[k, : len(i)] = torch.tensor(i, dtype=torch.long)
    return out, torch.tensor([len(i) for i in ids], dtype=torch.long)


def train_model(model: nn.Module, frontend: FrontEnd, pool: SpeechPool, *, task: str, epochs: int,
                generator: torch.Generator, lr: float = 1e-3, batch_size: int = 32) -> nn.Module:
    """Plain Adam training on the pool (random time shifts of up to 0.1 s as augmentation)."""
    n = len(pool)
    idx_all = [i for i in range(n) if task == "ctc" or pool.dataset[i]["label"] >= 0]
    waves = torch.stack([pool.wave(i) for i in idx_all])
    with torch.no_grad():
        feats_all = frontend(waves)
    labels = torch.tensor([pool.dataset[i]["label"] for i in idx_all]) if task == "kws" else None
    texts = [pool.dataset[i]["text"] for i in idx_all]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(idx_all), generator=generator)
        for s in range(0, len(perm), batch_size):
            sel = perm[s: s + batch_size]
            shift = int(torch.randint(-12, 13, (1,), generator=generator))
            f = torch.roll(feats_all[sel], shifts=shift, dims=-1)
            if task == "kws":
                batch = Batch({"feats": f}, labels[sel])
                loss = kws_loss(model, batch).mean()
            else:
                tg, tl = pad_targets([texts[i] for i in sel.tolist()])
                loss = ctc_loss(model, Batch({"feats": f, "target_lengths": tl}, tg)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model


def _weights_path(tag: dict) -> Path:
    key = hashlib.sha256(json.dumps(tag, sort_keys=True).encode()).hexdigest()[:16]
    return D.cache_dir() / "models" / f"{key}.pt"


class SpeechKit:
    modality = "speech"
    optional: ClassVar[frozenset[str]] = frozenset({"save_artifacts"})

    def __init__(self) -> None:
        self._pools: dict = {}
        self._classifier = None

    # -- data ---------------------------------------------------------------------------
    def load_pool(self, case: Case, *, data_path: str | None) -> SpeechPool:
        task = _opt(case, "task", "kws")
        length = num_samples(case)
        source = data_path or case.data
        if source == "synthetic-keywords":
            ds = D.keyword_dataset()
        elif source == "rt-sentences":
            ds = D.sentence_dataset(max_chars=int(_opt(case, "max_chars", 60)))
        else:
            ds = D.load_wav_dir(source, keywords=D.KEYWORDS if task == "kws" and _opt(case, "fixed_keywords", False) else None)
        if task == "kws":
            ds = ds.filter(lambda r: r["label"] >= 0)
            if len(ds) == 0:
                raise ValueError(f"--data {source!r}: no labelled clips; keyword cases need DIR/<keyword>/*.wav")
        else:
            ds = ds.filter(lambda r: len(r["text"].strip()) > 0)
            if len(ds) == 0:
                raise ValueError(f"--data {source!r}: no transcripts; CTC cases need x.wav with x.txt next to it")
        return SpeechPool(ds, length, task)

    def _pool(self, case: Case) -> SpeechPool:
        key = (case.data, tuple(sorted(case.options.items())))
        if key not in self._pools:
            self._pools[key] = self.load_pool(case, data_path=None)
        return self._pools[key]

    # -- models -------------------------------------------------------------------------
    def load_model(self, case: Case, *, device: torch.device, generator: torch.Generator) -> nn.Module:
        task = _opt(case, "task", "kws")
        fe = frontend_for(case)
        t = fe.config.n_frames(num_samples(case))
        if task == "kws":
            n_classes = int(_opt(case, "num_classes", len(D.KEYWORDS)))
            model = KWSCNN(fe.config.n_features, t, n_classes, channels=tuple(_opt(case, "channels", (8, 16))),
                           hidden=int(_opt(case, "hidden", 64)), act=_opt(case, "act", "relu"), generator=generator)
        elif task == "ctc":
            model = CTCRecognizer(fe.config.n_features, dim=int(_opt(case, "dim", 96)), generator=generator)
        else:
            raise ValueError(f"unknown speech task {task!r}; use kws or ctc")
        stage = _opt(case, "stage", "init")
        if stage == "trained":
            epochs = int(_opt(case, "train_epochs", 15))
            seed = int(torch.randint(0, 2**31, (1,), generator=generator))
            tag = {"case_opts": dict(case.options), "data": case.data, "frontend": fe.config.to_dict(), "seed": seed,
                   "epochs": epochs, "v": 1}
            path = _weights_path(tag)
            if path.exists():
                model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            else:
                train_model(model, fe, self._pool(case), task=task, epochs=epochs,
                            generator=torch.Generator().manual_seed(seed))
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), path)
        elif stage != "init":
            raise ValueError(f"unknown training stage {stage!r}; use init or trained")
        return model.to(device).eval()

    def keyword_classifier(self, case: Case) -> tuple[nn.Module, FrontEnd]:
        """A separately trained mel KWS CNN (seed 12345, 20 epochs) used only for scoring."""
        if self._classifier is None:
            fe = FrontEnd(FrontEndConfig(kind="mel"))
            pool = self.load_pool(case, data_path=None) if case.data == "synthetic-keywords" else self._pool(case)
            g = torch.Generator().manual_seed(12345)
            model = KWSCNN(fe.config.n_features, fe.config.n_frames(pool.length), len(D.KEYWORDS), channels=(8, 16),
                           hidden=64, act="relu", generator=g)
            tag = {"classifier": True, "data": case.data, "length": pool.length, "v": 1}
            path = _weights_path(tag)
            if path.exists():
                model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            else:
                train_model(model, fe, pool, task="kws", epochs=20, generator=g)
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), path)
            self._classifier = (model.eval(), fe)
        return self._classifier

    # -- client batch -------------------------------------------------------------------
    def sample(self, pool: SpeechPool, case: Case, *, model: nn.Module, device, generator) -> tuple[Batch, Any]:
        b = case.protocol.batch_size
        if b > len(pool):
            raise ValueError(f"batch size {b} exceeds the {len(pool)} clips in the data")
        idx = torch.randperm(len(pool), generator=generator)[:b].tolist()
        fe = frontend_for(case).to(device)
        waves = torch.stack([pool.wave(i) for i in idx]).to(device)
        with torch.no_grad():
            feats = fe(waves)
        rows = [pool.dataset[i] for i in idx]
        if pool.task == "kws":
            labels = torch.tensor([r["label"] for r in rows], device=device)
            batch = Batch({"feats": feats}, labels)
        else:
            tg, tl = pad_targets([r["text"] for r in rows])
            labels = tg.to(device)
            batch = Batch({"feats": feats, "target_lengths": tl.to(device)}, labels)
        # speaker enrolment: mean embedding per voice over the pool's *other* clips
        enrolled: dict[str, list] = {}
        for i in range(len(pool)):
            if i in idx:
                continue
            enrolled.setdefault(pool.dataset[i]["speaker"], []).append(i)
        truth = {"waves": waves.cpu(), "feats": feats.cpu(), "texts": [r["text"] for r in rows],
                 "labels": [int(r["label"]) for r in rows], "speakers": [r["speaker"] for r in rows],
                 "pool": pool, "enrol_index": enrolled, "task": pool.task}
        return batch, truth

    loss_fn = staticmethod(lambda model, batch: ctc_loss(model, batch) if "target_lengths" in batch.inputs
                           else soft_alignment_loss(model, batch) if "soft_targets" in batch.inputs
                           else kws_loss(model, batch))

    def make_prior(self, case: Case, model: nn.Module, prior_kind: str, *, device) -> Any:
        return build_prior(self, case, model, prior_kind, device=device)

    def _speech_prior(self, case: Case, model: nn.Module, *, device) -> SpeechPrior:
        fe = frontend_for(case).to(device)
        n = num_samples(case)
        shape = (fe.config.n_features, fe.config.n_frames(n))
        names = {id(p): k for k, p in model.named_parameters()}
        task = _opt(case, "task", "kws")

        def build(x: Tensor, y: Tensor | None) -> Batch:
            if task == "kws":
                return Batch({"feats": x}, y)
            return Batch({"feats": x, "target_lengths": (y != 0).sum(-1)}, y)

        lower = float((np.log(fe.config.log_eps) - fe.config.offset) / fe.config.scale)
        return SpeechPrior(task=task, frontend=fe, num_samples=n, input_shape=shape,
                           num_classes=int(model.head.out_features), build_batch=build, loss_fn=self.loss_fn,
                           label_weight=names[id(model.head.weight)], label_bias=names[id(model.head.bias)],
                           lower=lower, upper=float(_opt(case, "feature_max", 4.0)))

    def _continuous_prior(self, case: Case, model: nn.Module, *, device):
        """Feature-space prior for the generic baselines (DLG, iDLG, IG) on keyword cases."""
        from common.kit import ContinuousPrior

        if _opt(case, "task", "kws") != "kws":
            raise ValueError("the speech kit builds a 'continuous' prior (for the generic baselines) on keyword "
                             "cases only; speech attacks use 'speech'")
        fe = frontend_for(case)
        shape = (fe.config.n_features, fe.config.n_frames(num_samples(case)))
        names = {id(p): k for k, p in model.named_parameters()}
        lo = float((np.log(fe.config.log_eps) - fe.config.offset) / fe.config.scale) if fe.config.kind == "mel" else None
        return ContinuousPrior(
            input_shape=shape, num_classes=int(model.head.out_features),
            build_batch=lambda x, y: Batch({"feats": x}, y), loss_fn=kws_loss,
            label_weight=names[id(model.head.weight)], label_bias=names[id(model.head.bias)],
            lower=None if lo is None else torch.full(shape, lo, device=device),
            upper=None if lo is None else torch.full(shape, float(_opt(case, "feature_max", 4.0)), device=device),
            sample_inputs=lambda n, g: (torch.randn((n, *shape), generator=g) * 0.5).to(device))

    #: prior kind (an attack's ``info.prior``) -> builder
    priors: ClassVar[Mapping[str, Callable[..., Any]]] = {"speech": _speech_prior, "continuous": _continuous_prior}

    @staticmethod
    def _unpack(rec: Reconstruction, truth: Any, case: Case) -> tuple[Tensor, Tensor]:
        """(features, waves) of a speech attack's dict, or of a generic baseline's feature tensor
        (waves then come from Griffin-Lim, computed once and cached on the reconstruction)."""
        if isinstance(rec.data, dict):
            return rec.data["features"].cpu(), rec.data["waves"].cpu()
        feats = rec.data.detach().cpu().float()
        if "_waves" not in rec.extras:
            rec.extras["_waves"] = frontend_for(case).features_to_wave(feats, length=truth["waves"].shape[-1])
        return feats, rec.extras["_waves"]

    # -- scoring ------------------------------------------------------------------------
    def score(self, reconstruction: Reconstruction, truth: Any, *, case: Case) -> tuple[dict[str, float], str]:
        rec_f, rec_w = self._unpack(reconstruction, truth, case)
        tf, tw = truth["feats"], truth["waves"]
        b = tf.shape[0]
        cost = ((rec_f.unsqueeze(1) - tf.unsqueeze(0)) ** 2).flatten(2).mean(-1).numpy()
        perm = assignment(cost)
        rec_f, rec_w = rec_f[perm], rec_w[perm]
        truth["_perm"] = perm
        fe = frontend_for(case)
        out: dict[str, float] = {}
        out.update(M.feature_similarity(predictions=list(rec_f), references=list(tf)))
        out.update(M.feature_cosine_share(predictions=list(rec_f), references=list(tf)))
        if truth["task"] == "ctc" and fe.config.kind == "mel":  # where the cosine comes from (diagnostic, issue 21)
            floor = float((np.log(fe.config.log_eps) - fe.config.offset) / fe.config.scale)
            out.update(M.speech_region_similarity(predictions=list(rec_f), references=list(tf), floor=floor))
        with torch.no_grad():
            rec_lm, true_lm = fe.features_to_logmel(rec_f), fe.features_to_logmel(tf)
        lm_cos = M.feature_similarity(predictions=list(rec_lm.exp()), references=list(true_lm.exp()))
        out["mel_cosine"] = lm_cos["feature_cosine"]
        out.update(M.spectral_snr(predictions=list(rec_lm.exp()), references=list(true_lm.exp())))
        out.update(M.db_spectral_snr(predictions=list((rec_lm.exp() - fe.config.log_eps).clamp(min=0)),
                                     references=list((true_lm.exp() - fe.config.log_eps).clamp(min=0)),
                                     floor=fe.config.log_eps))
        waves_p, waves_r = list(rec_w), list(tw)
        out.update(M.snr(predictions=waves_p, references=waves_r))
        out.update(M.pesq_wb(predictions=waves_p, references=waves_r))
        out.update(M.stoi(predictions=waves_p, references=waves_r))
        out.update(M.mcd(predictions=waves_p, references=waves_r))
        if _opt(case, "oracle", True):
            gl = fe.features_to_wave(tf, length=tw.shape[-1])
            o = {**M.pesq_wb(predictions=list(gl), references=waves_r), **M.stoi(predictions=list(gl), references=waves_r)}
            out.update({f"oracle_{k}": v for k, v in o.items()})
        if reconstruction.labels is not None and truth["task"] == "kws":
            acc = label_accuracy(reconstruction.labels.tolist(), truth["labels"])
            if acc is not None:
                out["label_accuracy"] = acc
        if "transcript" in reconstruction.extras:  # transcript-free CTC attack: the recovered text
            out.update(M.word_error(predictions=[reconstruction.extras["transcript"][k] for k in perm],
                                    references=truth["texts"], prefix="transcript_"))
        if "char_occupancy" in reconstruction.extras:
            out.update(M.char_histogram(predictions=[reconstruction.extras["char_occupancy"]], references=truth["texts"]))
        # speaker re-identification among the enrolled voices
        pool: SpeechPool = truth["pool"]
        enrolled = {s: np.mean([pool.embedding(i) for i in ix], axis=0) for s, ix in truth["enrol_index"].items() if ix}
        if len(enrolled) >= 2:
            from .speaker import speaker_embedding

            out.update(M.speaker_reid(predictions=[speaker_embedding(w) for w in waves_p], references=truth["speakers"],
                                      enrolled=enrolled))
            orig = M.speaker_reid(predictions=[speaker_embedding(w) for w in waves_r], references=truth["speakers"],
                                  enrolled=enrolled)
            out["speaker_top1_original"] = orig["speaker_top1"]
        if truth["task"] == "kws" and all(lab >= 0 for lab in truth["labels"]) and case.data == "synthetic-keywords":
            clf, cfe = self.keyword_classifier(case)
            with torch.no_grad():
                pred = M.predicted_labels(clf(cfe(rec_w)))  # None for a NaN/Inf reconstruction: a miss
                pred_o = clf(cfe(tw)).argmax(-1).tolist()
            out.update(M.keyword_accuracy(predictions=pred, references=truth["labels"]))
            out["keyword_accuracy_original"] = M.keyword_accuracy(predictions=pred_o, references=truth["labels"])["keyword_accuracy"]
        if _opt(case, "score_asr", truth["task"] == "ctc"):
            from .speaker import transcribe

            hyp = [transcribe(w) for w in waves_p]
            hyp_o = [transcribe(w) for w in waves_r]
            truth["_asr"] = (hyp, hyp_o)
            out.update(M.word_error(predictions=hyp, references=truth["texts"], prefix="asr_"))
            out.update(M.word_error(predictions=hyp_o, references=truth["texts"], prefix="asr_original_"))
            if any(h.strip() for h in hyp_o):
                out.update(M.word_error(predictions=hyp, references=[h if h.strip() else "" for h in hyp_o],
                                        prefix="asr_vs_original_"))
        return out, "hungarian:feature-mse"

    def save_artifacts(self, rec: Reconstruction, truth: Any, *, case: Case, directory) -> dict[str, str]:
        """original_k.wav / reconstruction_k.wav side by side plus a spectrogram plot per example."""
        from .artifacts import save_artifacts

        return save_artifacts(*self._unpack(rec, truth, case), truth, directory=directory)
