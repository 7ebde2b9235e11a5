"""gradleak common layer: FL client simulation, threat model, defenses, matching, metrics,
the gradient-matching core (grads, functional, optim); the generic baselines live in
``common.baselines``. Importing it never imports transformers (nor torch, until a name is used)."""
from .preset import Preset

# The rest is imported on first use (PEP 562): the package's plain tables (ATTACKS, PRESETS,
# metrics) stay readable without importing torch, e.g. by the leaderboard.
_LAZY = {"AttackInfo": "attack", "Case": "case", "HONEST": "threat", "HONEST_WITH_LABELS": "threat",
         "Capability": "threat", "ThreatModel": "threat", "Batch": "types", "ClientUpdate": "types",
         "FLProtocol": "types", "Observation": "types", "Reconstruction": "types"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AttackInfo", "Preset", "Case", "Capability", "ThreatModel", "HONEST", "HONEST_WITH_LABELS",
    "Batch", "ClientUpdate", "FLProtocol", "Observation", "Reconstruction",
]

#: The generic continuous-input baselines (usable by any kit that builds a ContinuousPrior).
ATTACKS = {
    "dlg": "common.baselines.gradient_matching:DLG",
    "idlg": "common.baselines.gradient_matching:IDLG",
    "inverting-gradients": "common.baselines.gradient_matching:InvertingGradients",
}
PRESETS = {
    "dlg": Preset("dlg", {}, "DLG: L2 matching, L-BFGS, joint soft labels (Zhu et al. 2019)"),
    "idlg": Preset("idlg", {}, "iDLG: DLG with labels from the last-layer gradient (Zhao et al. 2020)"),
    "inverting-gradients": Preset("inverting-gradients", {}, "IG: cosine + signed Adam, 8 restarts (Geiping et al. 2020)"),
}
