"""Pieces of the auditor's report (``eval.report``): per-modality example views and plots.

Pure functions from records and their artifact files to HTML strings; every image and audio clip
is inlined as a data URI so the page is one self-contained file (no network, no CDN).
"""
from __future__ import annotations

import base64
import difflib
import html
import io
import json
import math
import textwrap
from pathlib import Path
from typing import Iterable, Sequence

# metrics whose range is [0, 1]: their plots use the whole range, never a zoomed axis
BOUNDED = {"accuracy", "cat_accuracy", "cont_accuracy", "exact_row", "exact_match", "token_accuracy",
           "rouge1", "rouge2", "rougeL", "mel_cosine", "feat_cosine", "cosine", "stoi", "certified",
           "certified_rows", "speaker_top1", "label_accuracy"}


def esc(x: object) -> str:
    return html.escape(str(x))


def data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def resolve_artifact(path: str, records_file: Path) -> Path | None:
    """An artifact path as recorded (relative to where the run started, or absolute), else the same
    ``artifacts/<id>/<file>`` tail under the records file's folder (a moved or copied run)."""
    p = Path(path)
    if p.is_file():
        return p
    parts = p.parts
    if "artifacts" in parts:
        q = records_file.parent.joinpath(*parts[parts.index("artifacts"):])
        if q.is_file():
            return q
    return None


# ---------------------------------------------------------------- text
def word_diff(reference: str, reconstruction: str) -> tuple[str, str]:
    """Both strings as HTML with the words that differ marked (<del> in the original, <mark> in the
    reconstruction)."""
    a, b = reference.split(), reconstruction.split()
    left, right = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            left += [esc(w) for w in a[i1:i2]]
            right += [esc(w) for w in b[j1:j2]]
        else:
            left += [f"<del>{esc(w)}</del>" for w in a[i1:i2]]
            right += [f"<mark>{esc(w)}</mark>" for w in b[j1:j2]]
    return " ".join(left), " ".join(right)


def text_examples(rows: Sequence[dict]) -> str:
    out = ["<table class='ex'><tr><th>original</th><th>reconstruction</th><th>ROUGE-1</th></tr>"]
    for r in rows:
        ref, rec = str(r.get("reference", "")), str(r.get("reconstruction", ""))
        left, right = word_diff(ref, rec)
        exact = " class='exact'" if ref.split() == rec.split() else ""
        r1 = r.get("rouge1")
        out.append(f"<tr{exact}><td>{left}</td><td>{right}</td>"
                   f"<td>{'' if r1 is None else f'{float(r1):.2f}'}</td></tr>")
    out.append("</table>")
    return "".join(out)


def count_exact_sentences(rows: Iterable[dict]) -> tuple[int, int]:
    rows = list(rows)
    return sum(str(r.get("reference", "")).split() == str(r.get("reconstruction", "")).split() for r in rows), len(rows)


# ---------------------------------------------------------------- tabular
def tabular_examples(cells: dict, *, max_rows: int = 16) -> str:
    """The batch as a table, reconstruction beside truth: wrong cells marked, per-feature accuracy."""
    cols = cells["columns"]
    rec, truth, wrong = cells["reconstruction"], cells["truth"], cells["wrong"]
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    out = [f"<table class='ex tab'><tr><th>row</th>{head}</tr>"]
    for i, (rr, tr, wr) in enumerate(zip(rec[:max_rows], truth[:max_rows], wrong[:max_rows])):
        tds = "".join(f"<td class='bad' title='true: {esc(t)}'>{esc(v)}</td>" if w else f"<td>{esc(v)}</td>"
                      for v, t, w in zip(rr, tr, wr))
        mark = " class='exact'" if not any(wr) else ""
        out.append(f"<tr{mark}><td>{i}</td>{tds}</tr>")
    n = len(wrong)
    acc = "".join(f"<td>{100 * (1 - sum(w[j] for w in wrong) / n):.0f}%</td>" for j in range(len(cols))) if n else ""
    out.append(f"<tr class='foot'><td>feature acc.</td>{acc}</tr></table>")
    if len(rec) > max_rows:
        out.append(f"<p class='note'>first {max_rows} of {len(rec)} rows shown</p>")
    return "".join(out)


# ---------------------------------------------------------------- speech
def speech_examples(artifacts: dict[str, Path], *, max_clips: int = 2) -> str:
    out = []
    for k in range(max_clips):
        o, r, s = (artifacts.get(f"{n}_{k}") for n in ("original", "reconstruction", "spectrogram"))
        if o is None or r is None:
            break
        out.append("<div class='clip'>"
                   f"<div>original <audio controls src='{data_uri(o, 'audio/wav')}'></audio></div>"
                   f"<div>reconstruction <audio controls src='{data_uri(r, 'audio/wav')}'></audio></div>")
        if s is not None:
            out.append(f"<img alt='spectrograms, clip {k}' src='{data_uri(s, 'image/png')}'>")
        out.append("</div>")
    return "".join(out)


# ---------------------------------------------------------------- plots
def line_plot(series: dict[str, list[tuple[float, float]]], *, title: str, xlabel: str, metric: str,
              logx: bool, bounded_x: bool = False) -> str:
    """A PNG data URI; a bounded metric is drawn on its full [0, 1] range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, pts in sorted(series.items()):
        pts = sorted(p for p in pts if math.isfinite(p[1]))
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    if metric in BOUNDED:
        ax.set_ylim(-0.02, 1.02)
    if bounded_x:
        ax.set_xlim(-0.02, 1.02)
    ax.set_title("\n".join(textwrap.wrap(title, 75)), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def load_json(path: Path) -> object:
    return json.loads(path.read_text(encoding="utf-8"))


CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
td:nth-child(2),th:nth-child(2){text-align:left}table.ex td,table.ex th{text-align:left;vertical-align:top}.wide{overflow-x:auto}
table.tab td{font-size:12px}td.bad{background:#fbb}tr.exact td{background:#e6f7e6}tr.foot td{font-style:italic}
mark{background:#fd8}del{color:#a00}.summary li{margin:.3em 0}.note{color:#666;font-size:90%}
.clip{display:inline-block;margin:.5em;vertical-align:top}.clip img{display:block;max-width:480px}
section{border-top:2px solid #ddd;margin-top:1.5em}"""
