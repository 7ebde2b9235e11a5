"""gradleak common layer: FL client simulation, threat model, defenses, matching, metrics,
the gradient-matching core (grads, functional, optim); the generic baselines live in
``common.baselines``. Importing it never imports transformers."""
from .attack import AttackInfo, Preset
from .case import Case
from .threat import HONEST, HONEST_WITH_LABELS, Capability, ThreatModel
from .types import Batch, ClientUpdate, FLProtocol, Observation, Reconstruction

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
