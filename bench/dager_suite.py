"""Run a DAGER suite through the eval CLI, registering DAGER's tables first if the package
tables do not list them yet (standalone: ``python bench/dager_suite.py SUITE.toml --out DIR``)."""
from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def register() -> None:
    import importlib

    from common.attack import Preset
    from eval.catalog import catalog

    c = catalog()
    if "dager" not in c.attacks:
        c.attacks.add("dager", "textleak.attacks.dager:DAGER")
    presets = {
        "dager": Preset("dager", {}, "DAGER (Petrov et al. 2024), reference defaults (tau1 1e-5, tau2 1e-3)"),
        "dager-fedavg": Preset("dager", {"l1_span_thresh": 5e-3, "l2_span_thresh": 5e-3, "adaptive_tau": False},
                               "DAGER on FedAvg deltas, thresholds of the reference fed_avg.sh"),
    }
    for name, p in presets.items():
        if name not in c.presets:
            c.presets.add(name, p)
    if "text-lora" not in c.kits:
        c.kits.add("text-lora", "textleak.lora:LoraTextKit")
    for name, case in importlib.import_module("textleak.cases_dager").CASES.items():
        if name not in c.cases:
            c.cases.add(name, case)


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    register()
    from eval.__main__ import main

    sys.exit(main(["bench", *sys.argv[1:]]))
