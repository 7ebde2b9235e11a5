"""A Unicode-aware ROUGE tokenizer (rouge_score's default drops every non-ASCII character, so
an exact reconstruction of Chinese or emoji text scored ROUGE 0).

* ASCII text is tokenized by rouge_score's own default tokenizer, unchanged: lowercased,
  split on everything but ``[a-z0-9]``, Porter-stemmed (tokens longer than 3) when asked.
  Published scores of ASCII text therefore do not move.
* Other text: lowercased; a word is a run of letters, digits and combining marks in any
  script (``café``, ``привет``, ``नमस्ते``), stemmed only when it is ASCII; each CJK character
  (Han, kana, Hangul) and each emoji (with its modifiers, variation selectors and ZWJ
  sequence) is a token of its own; everything else (punctuation, spaces) separates tokens.
"""
from __future__ import annotations

import unicodedata

_CJK_RANGES = (
    (0x1100, 0x11FF), (0x2E80, 0x2FDF), (0x3040, 0x30FF), (0x3100, 0x312F), (0x3130, 0x318F),
    (0x31A0, 0x31FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xA960, 0xA97F), (0xAC00, 0xD7FF),
    (0xF900, 0xFAFF), (0xFF66, 0xFF9F), (0x20000, 0x2FA1F), (0x30000, 0x3134F),
)
_ZWJ = "\u200d"
_EMOJI_MODIFIERS = ("\ufe0e", "\ufe0f", *map(chr, range(0x1F3FB, 0x1F400)), *map(chr, range(0xE0020, 0xE0080)))


def is_cjk(ch: str) -> bool:
    o = ord(ch)
    return any(lo <= o <= hi for lo, hi in _CJK_RANGES)


def is_emoji(ch: str) -> bool:
    """A pictographic symbol (Unicode category So: emoji, dingbats, regional indicators ...)."""
    return unicodedata.category(ch) == "So"


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or unicodedata.category(ch)[0] == "M"


def unicode_tokens(text: str, stemmer=None) -> list[str]:
    """The Unicode path (see the module docstring); on ASCII text it equals rouge_score's tokens."""
    text = text.lower()
    tokens: list[str] = []
    word: list[str] = []
    joined = False  # the last token is an emoji followed by a ZWJ: the next emoji extends it

    def flush() -> None:
        if word:
            w = "".join(word)
            if stemmer is not None and w.isascii() and len(w) > 3:
                w = stemmer.stem(w)
            if w:
                tokens.append(w)
            word.clear()

    last_emoji = False
    for ch in text:
        if last_emoji and (ch in _EMOJI_MODIFIERS or ch == _ZWJ):
            tokens[-1] += ch
            joined = ch == _ZWJ
            continue
        if is_emoji(ch):
            flush()
            if joined:
                tokens[-1] += ch
            else:
                tokens.append(ch)
            last_emoji, joined = True, False
            continue
        last_emoji = joined = False
        if is_cjk(ch):
            flush()
            tokens.append(ch)
        elif _is_word_char(ch):
            word.append(ch)
        else:
            flush()
    flush()
    return tokens


class UnicodeTokenizer:
    """``rouge_scorer.RougeScorer(..., tokenizer=UnicodeTokenizer(use_stemmer=...))``."""

    def __init__(self, use_stemmer: bool = False) -> None:
        if use_stemmer:
            from nltk.stem import porter

            self._stemmer = porter.PorterStemmer()
        else:
            self._stemmer = None

    def tokenize(self, text: str) -> list[str]:
        if text.isascii():
            from rouge_score import tokenize as _default

            return _default.tokenize(text, self._stemmer)
        return unicode_tokens(text, self._stemmer)
