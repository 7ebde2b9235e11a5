"""LAMP's discrete moves (Balunović et al., NeurIPS 2022, Sec. 4.2): the candidate sequence
transformations scored in a swap round, and the de-duplication of proposals drawn twice."""
from __future__ import annotations

import numpy as np


def propose_moves(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    """``count`` permutations of ``n`` body positions; row 0 is the identity (LAMP's 4 moves)."""
    out = np.tile(np.arange(n), (count, 1))
    for k in range(1, count):
        p = np.arange(n)
        kind = k % 4
        if n < 2:
            pass
        elif kind == 0:  # swap two tokens
            i, j = rng.integers(n), rng.integers(n)
            p[i], p[j] = p[j], p[i]
        elif kind == 1:  # move one token
            i, j = rng.integers(n), rng.integers(n + 1)
            tok = p[i]
            rest = np.delete(p, i)
            j = j if j <= i else j - 1
            p = np.insert(rest, min(j, n - 1), tok)
        elif kind == 2:  # move a span
            a, e = sorted(rng.integers(n + 1, size=2))
            if e > a:
                span, rest = p[a:e], np.concatenate([p[:a], p[e:]])
                q = rng.integers(len(rest) + 1)
                p = np.concatenate([rest[:q], span, rest[q:]])
        else:  # move a prefix to the end
            i = 1 + rng.integers(n - 1)
            p = np.concatenate([p[i:], p[:i]])
        out[k] = p
    return out


def first_occurrences(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the first occurrence of each distinct row, in order, and for every row the
    position of its row among them (``rows[first][inverse] == rows``)."""
    seen: dict[bytes, int] = {}
    first, inverse = [], np.empty(len(rows), dtype=np.int64)
    for i, r in enumerate(np.ascontiguousarray(rows)):
        k = r.tobytes()
        if k not in seen:
            seen[k] = len(first)
            first.append(i)
        inverse[i] = seen[k]
    return np.asarray(first, dtype=np.int64), inverse
