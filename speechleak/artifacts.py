"""Listening and viewing artifacts of a speech trial (split out of the kit): original and
reconstructed WAVs side by side plus a spectrogram plot per example."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from . import data as D


def save_artifacts(rec_f: Tensor, rec_w: Tensor, truth: Any, *, directory) -> dict[str, str]:
    """original_k.wav / reconstruction_k.wav and spectrogram_k.png for every example; the
    reconstruction is put in the scorer's matched order (``truth["_perm"]``) first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    perm = truth.get("_perm", np.arange(truth["feats"].shape[0]))
    rec_f, rec_w = rec_f[perm], rec_w[perm]
    out = {}
    for k in range(truth["feats"].shape[0]):
        o, r = d / f"original_{k}.wav", d / f"reconstruction_{k}.wav"
        D.write_wav(o, truth["waves"][k])
        D.write_wav(r, rec_w[k])
        fig, ax = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
        for a, m, title in ((ax[0], truth["feats"][k], f"original ({truth['texts'][k]!r})"),
                            (ax[1], rec_f[k], "reconstruction")):
            a.imshow(m.numpy(), origin="lower", aspect="auto", cmap="magma")
            a.set_title(title, fontsize=9)
        ax[1].set_xlabel("frame")
        fig.tight_layout()
        png = d / f"spectrogram_{k}.png"
        fig.savefig(png, dpi=80)
        plt.close(fig)
        out.update({f"original_{k}": str(o), f"reconstruction_{k}": str(r), f"spectrogram_{k}": str(png)})
    return out
