"""tableak: TabLeak (Vero et al., ICML 2023) and baselines on tabular FL updates."""
from common.attack import Preset

KITS = {"tabular": "tableak.kit:TabularKit"}
CASE_MODULES = ("tableak.cases",)
ATTACKS: dict[str, str] = {"tableak": "tableak.attack:TabLeak", "tabular-random": "tableak.attack:TabularRandom"}
PRESETS: dict = {
    "tableak-no-pooling": Preset("tableak", {"ensemble": 1, "pooling": "none"},
                                 "TabLeak without ensembling/pooling (paper config 47)"),
    "tableak-no-softmax": Preset("tableak", {"softmax": False, "pooling": "median"},
                                 "TabLeak without the softmax relaxation; median pooling (config 4103)"),
    "tableak-ig": Preset("tableak", {"softmax": False, "sigmoid": False, "ensemble": 1, "pooling": "none"},
                         "Inverting Gradients on the tabular encoding: cosine, sign+Adam lr 0.06, 1 run (config 0)"),
    "tableak-dlg": Preset("tableak", {"loss": "l2", "softmax": False, "sigmoid": False, "ensemble": 1,
                                      "pooling": "none"},
                          "Deep Leakage from Gradients on the tabular encoding: l2 distance, 1 run (config 1000)"),
    "tableak-random": Preset("tabular-random", {}, "Random baseline: each cell from the empirical marginals"),
}
