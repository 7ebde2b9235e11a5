"""tableak: TabLeak (Vero et al., ICML 2023) and baselines on tabular FL updates."""
from common.metrics import MetricInfo
from common.preset import Preset

KITS = {"tabular": "tableak.kit:TabularKit"}
CASE_MODULES = ("tableak.cases",)
ATTACKS: dict[str, str] = {"tableak": "tableak.attack:TabLeak", "tabular-random": "tableak.attack:TabularRandom",
                           "tabular-exact": "tableak.exact:TabularExact"}
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

_K = "tableak.kit:"
# Every key TabularKit.score writes into a record. NB ``accuracy`` here is TabLeak's *cell*
# accuracy (fraction of feature cells recovered after Hungarian row matching), not classification
# accuracy; recovered labels are ``label_accuracy`` (common entry). A NaN/Inf cell counts as wrong.
METRICS = (
    MetricInfo("tabular_accuracy", _K + "tabular_scores", "tabular",
               ("accuracy", "cat_accuracy", "cont_accuracy", "exact_row"),
               description="TabLeak cell accuracy after row matching (accuracy: all cells; cat_/cont_: categorical / "
                           "continuous within 0.319 std); exact_row: fraction of rows with every cell right"),
    MetricInfo("nrmse", _K + "tabular_scores", "tabular", ("nrmse",), higher_is_better=False, range=(0.0, float("inf")),
               description="continuous features: RMSE / std per feature after row matching, averaged"),
    MetricInfo("certified_rows", "tableak.exact.attack:certified_fraction", "tabular", ("certified_rows",),
               description="tabular-exact: fraction of rows certified exact by its whole-gradient / span checks"),
    MetricInfo("entropy_quartiles", _K + "entropy_quartiles", "tabular",
               ("cat_acc_low_entropy", "cat_acc_high_entropy", "cont_acc_low_entropy", "cont_acc_high_entropy"),
               description="cell accuracy of the lowest / highest-entropy 25 % of cells (TabLeak's uncertainty)"),
)
