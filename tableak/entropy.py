"""Entropy-based uncertainty of a TabLeak reconstruction (eth-sri/tableak ``utils/entropy.py``)
and its heat map. The maps themselves are computed by the attack (``extras``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .schema import TabularSchema


def save_heatmap(path: str | Path, schema: TabularSchema, ent_cat: np.ndarray, ent_cont: np.ndarray,
                 errors: np.ndarray | None = None) -> None:
    """Two panels (categorical normalised entropy, continuous Gaussian entropy), rows x features;
    wrong cells (when ``errors`` [rows, n_cat + n_cont] is given) are marked with a cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cat_names = [f.name for f, _ in schema.categorical]
    cont_names = [f.name for f, _ in schema.continuous]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 0.5 * (len(cat_names) + len(cont_names)), 1 + 0.25 * len(ent_cat)),
                             gridspec_kw={"width_ratios": [max(1, len(cat_names)), max(1, len(cont_names))]})
    nc = len(cat_names)
    for ax, ent, names, title, off in [(axes[0], ent_cat, cat_names, "categorical entropy (0-1)", 0),
                                       (axes[1], ent_cont, cont_names, "continuous entropy", nc)]:
        if ent.size == 0:
            ax.axis("off")
            continue
        im = ax.imshow(ent, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("row")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
        if errors is not None:
            rr, cc = np.nonzero(errors[:, off:off + len(names)])
            ax.scatter(cc, rr, marker="x", c="red", s=12, label="wrong")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
