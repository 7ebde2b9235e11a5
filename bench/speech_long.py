"""Quality vs clip length: segment-based reconstruction of 1 s, 5 s and 30 s utterances.

    OMP_NUM_THREADS=1 python bench/speech_long.py --lengths 1,5,30 --clips 4,2,1 \
        --out runs/speech_length [--iterations 300] [--features mel]

Setting (after Zeng & Rudzicz 2025, who reconstruct long clips segment by segment): the
client trains the fixed-input 1 s KWS CNN of ``speech/kws-mel/fedsgd`` (conv8-conv16-fc64,
sigmoid, at init) on its long recording one 1 s window at a time and sends one FedSGD
gradient per window (streaming / on-device training; the window's label is any keyword
class and is recovered from the gradient). The server inverts every window's gradient with
the ``speech-lbfgs`` preset, turns each window into audio (NNLS mel inversion + Griffin-Lim)
and concatenates the windows. Long utterances are flite sentences of one voice (Rotten
Tomatoes: the CTC case's <= 60-character pool up to 10 s, the first 80 sentences of <= 100
characters beyond) joined with 0.15 s pauses and cut to the length.

Scores on the whole clip: mel-spectrogram SNR (power and dB scale) and mel cosine (pooled over windows), waveform
SNR, PESQ-wb, STOI (defined for >= 5 s), pocketsphinx WER against the reference text and
against pocketsphinx's transcript of the original. One JSON line per clip in
``OUT/segments.jsonl`` (resumable: finished (length, clip) pairs are skipped) and a table in
``OUT/table.md``; the first clip of each length is saved as WAV.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def long_clips(seconds: float, count: int, *, gap: float = 0.15) -> list[dict]:
    """``count`` clips of one flite voice each, sentences joined with pauses, cut to ``seconds``."""
    from speechleak import data as D

    # <= 60-character sentences (the CTC pool) give ~27 s per voice; longer clips use <= 100
    ds = D.sentence_dataset(max_chars=60) if seconds <= 10 else D.sentence_dataset(max_chars=100, limit=80)
    n = int(round(seconds * D.SAMPLE_RATE))
    by_voice: dict[str, list[int]] = {}
    for i in range(len(ds)):
        by_voice.setdefault(ds[i]["speaker"], []).append(i)
    voices = sorted(by_voice)
    out, used = [], {v: 0 for v in voices}
    k = 0
    while len(out) < count and k < 10 * count * len(voices):
        v = voices[k % len(voices)]
        k += 1
        parts, texts = [], []
        total = 0
        while total < n and used[v] < len(by_voice[v]):
            row = ds[by_voice[v][used[v]]]
            used[v] += 1
            w = D.trim_and_fit(D.read_wav(row["path"]), None)
            parts += [w, torch.zeros(int(gap * D.SAMPLE_RATE))]
            texts.append(row["text"])
            total += w.numel() + int(gap * D.SAMPLE_RATE)
        if total < n:
            continue
        wave = torch.cat(parts)[:n]
        out.append({"wave": wave, "text": " ".join(texts), "speaker": v})
    if len(out) < count:
        raise ValueError(f"only {len(out)} clips of {seconds} s can be built from the sentence pool")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1,5,30")
    ap.add_argument("--clips", default="4,2,1", help="clips per length")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--features", default="mel", choices=["mel", "mfcc"])
    ap.add_argument("--out", default="runs/speech_length")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from common.fl import client_update
    from common.observe import observe
    from common.seed import derive_seed, make_generator
    from common.threat import HONEST
    from common.types import Batch, FLProtocol
    from speechleak import PRESETS
    from speechleak import data as D
    from speechleak import metrics as M
    from speechleak.attack import SpeechGradientInversion, SpeechInversionConfig
    from speechleak.kit import SpeechKit, kws_loss
    from speechleak.models import KWSCNN
    from speechleak.speaker import transcribe

    import dataclasses

    kit = SpeechKit()
    from eval.catalog import catalog

    case = catalog().cases.get(f"speech/kws-{args.features}/fedsgd")
    fe = kit.make_prior(case, kit.load_model(case, device=torch.device("cpu"), generator=make_generator(derive_seed(0, "model"))),
                        "speech", device="cpu").frontend
    model = kit.load_model(case, device=torch.device("cpu"), generator=make_generator(derive_seed(0, "model")))
    assert isinstance(model, KWSCNN)
    prior = kit.make_prior(case, model, "speech", device="cpu")
    cfg = dataclasses.replace(SpeechInversionConfig(), **PRESETS["speech-lbfgs"].overrides)
    cfg = dataclasses.replace(cfg, iterations=args.iterations)
    attack = SpeechGradientInversion(cfg)
    protocol = FLProtocol("fedsgd", batch_size=1)
    seg = D.SAMPLE_RATE

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rec_path = out_dir / "segments.jsonl"  # not records.jsonl: eval.records would read it as run records
    done = set()
    if rec_path.exists():
        for line in rec_path.read_text().splitlines():
            r = json.loads(line)
            done.add((r["seconds"], r["clip"], r["features"], r["iterations"]))
    lengths = [float(x) for x in args.lengths.split(",")]
    counts = [int(x) for x in args.clips.split(",")]
    for seconds, count in zip(lengths, counts):
        clips = long_clips(seconds, count)
        for ci, clip in enumerate(clips):
            key = (seconds, ci, args.features, args.iterations)
            if key in done:
                continue
            t0 = time.perf_counter()
            wave = clip["wave"]
            n_seg = wave.numel() // seg
            rec_waves, rec_feats, true_feats, label_ok = [], [], [], []
            for s in range(n_seg):
                w = wave[s * seg:(s + 1) * seg]
                with torch.no_grad():
                    feats = fe(w).unsqueeze(0)
                label = int(torch.randint(0, prior.num_classes, (1,), generator=make_generator(derive_seed(ci, s, "label"))))
                batch = Batch({"feats": feats}, torch.tensor([label]))
                upd = client_update(model, batch, kws_loss, protocol, generator=make_generator(derive_seed(ci, s, "client")))
                obs = observe(upd, HONEST)
                rec = attack.reconstruct(obs, model, prior, generator=make_generator(derive_seed(ci, s, "attack")))
                rec_waves.append(rec.data["waves"][0])
                rec_feats.append(rec.data["features"][0])
                true_feats.append(feats[0])
                label_ok.append(rec.labels.tolist() == [label])
            attack_s = time.perf_counter() - t0
            rw = torch.cat(rec_waves)
            tw = wave[: rw.numel()]
            rf, tf = torch.cat(rec_feats, -1), torch.cat(true_feats, -1)
            rm, tm = fe.features_to_logmel(rf).exp(), fe.features_to_logmel(tf).exp()
            m: dict = {}
            m.update(M.feature_similarity(predictions=[rf], references=[tf]))
            m["mel_cosine"] = M.feature_similarity(predictions=[rm], references=[tm])["feature_cosine"]
            m.update(M.spectral_snr(predictions=[rm], references=[tm]))
            eps = fe.config.log_eps
            m.update(M.db_spectral_snr(predictions=[(rm - eps).clamp(min=0)], references=[(tm - eps).clamp(min=0)], floor=eps))
            m.update(M.snr(predictions=[rw], references=[tw]))
            m.update(M.pesq_wb(predictions=[rw], references=[tw]))
            m.update(M.stoi(predictions=[rw], references=[tw]))
            hyp, hyp_o = transcribe(rw), transcribe(tw)
            m.update(M.word_error(predictions=[hyp], references=[clip["text"]], prefix="asr_"))
            m.update(M.word_error(predictions=[hyp_o], references=[clip["text"]], prefix="asr_original_"))
            if hyp_o.strip():
                m.update(M.word_error(predictions=[hyp], references=[hyp_o], prefix="asr_vs_original_"))
            m["label_accuracy"] = sum(label_ok) / len(label_ok)
            row = {"seconds": seconds, "clip": ci, "features": args.features, "iterations": args.iterations,
                   "segments": n_seg, "speaker": clip["speaker"], "text": clip["text"], "hyp": hyp, "hyp_original": hyp_o,
                   "attack_s": attack_s, "s_per_segment": attack_s / n_seg,
                   "metrics": {k: float(v) for k, v in m.items()}}
            if ci == 0:
                D.write_wav(out_dir / f"original_{int(seconds)}s.wav", tw)
                D.write_wav(out_dir / f"reconstruction_{int(seconds)}s.wav", rw)
            with open(rec_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: row[k] for k in ("seconds", "clip", "segments", "attack_s")} |
                             {k: round(v, 3) for k, v in row["metrics"].items()}), flush=True)
    write_table(rec_path, out_dir / "table.md")


def write_table(rec_path: Path, out: Path) -> None:
    from collections import defaultdict
    from statistics import fmean

    groups = defaultdict(list)
    for line in rec_path.read_text().splitlines():
        r = json.loads(line)
        groups[(r["features"], r["seconds"], r["iterations"])].append(r)

    def mean(rs, k, d=2):
        v = [r["metrics"][k] for r in rs if k in r["metrics"]]
        return f"{fmean(v):.{d}f}" if v else "n/a"

    lines = ["| features | clip length | clips | segments | mel SNR (dB) | dB-mel SNR (dB) | mel cosine | waveform SNR (dB) | PESQ-wb | STOI | "
             "WER vs text (recon. / orig.) | WER vs orig. transcript | s per segment |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (feat, sec, it), rs in sorted(groups.items()):
        lines.append(f"| {feat} ({it} it) | {sec:g} s | {len(rs)} | {rs[0]['segments']} | {mean(rs, 'mel_snr', 1)} | {mean(rs, 'logmel_snr', 1)} | "
                     f"{mean(rs, 'mel_cosine', 3)} | {mean(rs, 'snr', 1)} | {mean(rs, 'pesq_wb')} | {mean(rs, 'stoi')} | "
                     f"{mean(rs, 'asr_wer')} / {mean(rs, 'asr_original_wer')} | {mean(rs, 'asr_vs_original_wer')} | "
                     f"{fmean(r['s_per_segment'] for r in rs):.1f} |")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
