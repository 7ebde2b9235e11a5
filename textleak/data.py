"""Sentence pools: the 200 Rotten Tomatoes sentences shipped in the gensim wheel, or a local file."""
from __future__ import annotations

from pathlib import Path

from common.assets import rotten_tomatoes_file


def rotten_tomatoes_path() -> Path:
    return rotten_tomatoes_file()  # read the file only; gensim itself is never imported


def rotten_tomatoes():
    """200 Pang & Lee Rotten Tomatoes sentences (100 neg, 100 pos) as a ``datasets.Dataset(text, label)``.

    The file is cp1252, one ``__label__neg|pos <lower-cased tokenised text>`` per line; label 1 = pos.
    """
    import datasets

    rows = []
    for line in rotten_tomatoes_path().read_bytes().decode("cp1252").splitlines():
        line = line.strip()
        if not line:
            continue
        tag, _, text = line.partition(" ")
        if tag not in ("__label__neg", "__label__pos"):
            raise ValueError(f"unexpected line in the Rotten Tomatoes file: {line[:60]!r}")
        rows.append({"text": text.strip(), "label": int(tag == "__label__pos")})
    return datasets.Dataset.from_list(rows)


def text_file(path: str | Path):
    """One sentence per line (blank lines dropped), label 0, via ``load_dataset("text")``."""
    import datasets

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text data {str(path)!r}: not a known dataset (rotten-tomatoes) or an existing file")
    ds = datasets.load_dataset("text", data_files=str(p), split="train")
    ds = ds.filter(lambda r: bool(r["text"].strip()))
    if len(ds) == 0:
        raise ValueError(f"{p} has no non-empty lines; put one sentence per line")
    return ds.map(lambda r: {"text": r["text"].strip(), "label": 0})


def load_sentences(source: str):
    if source in ("rotten-tomatoes", "rotten_tomatoes", "rt"):
        return rotten_tomatoes()
    return text_file(source)
