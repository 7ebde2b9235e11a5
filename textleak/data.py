"""Sentence pools: the 200 Rotten Tomatoes sentences shipped in the gensim wheel, or a local file."""
from __future__ import annotations

import io
from pathlib import Path

from common.assets import rotten_tomatoes_file


class Sentences:
    """An in-memory table with columns ``text`` and ``label``, indexed as a ``datasets.Dataset`` is:
    ``ds[i]`` is the row as a dict, ``ds["text"]`` the column as a list, iteration yields rows.

    Used instead of ``datasets.Dataset`` because importing ``datasets`` (with pyarrow and pandas) adds
    ~85 MB to the process's resident memory for a pool of a few hundred sentences (issue 18).
    """

    column_names = ("text", "label")

    def __init__(self, text: list[str], label: list[int]) -> None:
        if len(text) != len(label):
            raise ValueError(f"{len(text)} texts but {len(label)} labels")
        self._cols = {"text": list(text), "label": [int(x) for x in label]}

    @property
    def num_rows(self) -> int:
        return len(self._cols["text"])

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, key: int | str):
        if isinstance(key, str):
            if key not in self._cols:
                raise KeyError(f"no column {key!r}; columns: {', '.join(self.column_names)}")
            return list(self._cols[key])
        i = int(key)
        return {"text": self._cols["text"][i], "label": self._cols["label"][i]}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"Sentences(num_rows={len(self)})"


def rotten_tomatoes_path() -> Path:
    return rotten_tomatoes_file()  # read the file only; gensim itself is never imported


def rotten_tomatoes():
    """200 Pang & Lee Rotten Tomatoes sentences (100 neg, 100 pos) as ``Sentences(text, label)``.

    The file is cp1252, one ``__label__neg|pos <lower-cased tokenised text>`` per line; label 1 = pos.
    """
    rows = []
    for line in rotten_tomatoes_path().read_bytes().decode("cp1252").splitlines():
        line = line.strip()
        if not line:
            continue
        tag, _, text = line.partition(" ")
        if tag not in ("__label__neg", "__label__pos"):
            raise ValueError(f"unexpected line in the Rotten Tomatoes file: {line[:60]!r}")
        rows.append({"text": text.strip(), "label": int(tag == "__label__pos")})
    return Sentences([r["text"] for r in rows], [r["label"] for r in rows])


def read_lines(path: str | Path) -> list[str]:
    """The file's lines as ``load_dataset("text")`` splits them (universal newlines, split on
    ``\\n`` only), read in memory: a user's file is never copied into the datasets cache."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text data {str(path)!r}: not a known dataset (rotten-tomatoes) or an existing file")
    try:
        with open(p, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{p.name} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    return [line.rstrip("\n") for line in io.StringIO(text).readlines()]


def text_file(path: str | Path):
    """One sentence per line (blank lines dropped, whitespace stripped), label 0, as an in-memory
    ``Sentences(text, label)``."""
    texts = [t.strip() for t in read_lines(path) if t.strip()]
    if not texts:
        raise ValueError(f"{Path(path)} has no non-empty lines; put one sentence per line")
    return Sentences(texts, [0] * len(texts))


def check_usable(path: str | Path, *, tokenizer, max_tokens: int | None, batch_size: int) -> None:
    """Refuse (ValueError) a file with fewer than ``batch_size`` sentences within the token limit:
    the case option ``max_tokens`` and the tokenizer's own maximum length, whichever is smaller."""
    texts = [t.strip() for t in read_lines(path) if t.strip()]
    if not texts:
        raise ValueError(f"{Path(path)} has no non-empty lines; put one sentence per line")
    model_max = getattr(tokenizer, "model_max_length", None)
    limits = [x for x in (max_tokens, model_max if isinstance(model_max, int) and model_max < 10**6 else None)
              if x is not None]
    if not limits:
        return
    limit = min(limits)
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    usable = sum(n <= limit for n in lengths)
    if usable < batch_size:
        if limit == max_tokens:
            what, fix = f"the case's max_tokens={limit}", "or raise --option max_tokens=N"
        else:
            what, fix = f"the model's maximum of {limit} tokens", f"of at most {limit} tokens"
        raise ValueError(f"{Path(path).name}: only {usable} of {len(texts)} lines fit the token limit ({what}; the "
                         f"longest has {max(lengths)} tokens) and the batch needs {batch_size}: put one sentence per "
                         f"line {fix}, or lower --batch-size")


def load_sentences(source: str):
    if source in ("rotten-tomatoes", "rotten_tomatoes", "rt"):
        return rotten_tomatoes()
    return text_file(source)
