
from common.case import Case
from common.threat import HONEST, HONEST_WITH_LABELS
from common.types import FLProtocol

from .models import SIZE_LADDER

#: Case options the tabular kit reads (``--option KEY=VALUE``; ``--label`` sets ``label``).
OPTIONS = frozenset({"label", "categorical", "continuous", "drop", "layout", "train_epochs", "schema"})
#: The tabular kit builds its FC network from ``layout``; ``--model`` would be ignored.
TAKES_MODEL = False

_DESC = {"adult": "UCI Adult (d=105)", "german": "UCI German Credit (d=63)"}


def _pair(data: str, model: str, protocol: FLProtocol, tag: str, options: dict | None = None,
          desc: str = "") -> dict[str, Case]:
    base = f"tabular/{data}-{model}/{tag}"
    opts = dict(options or {})
    d = f"{_DESC.get(data, data)}, {desc}"
    return {
        base: Case(base, "tabular", model, data, protocol, HONEST, options=opts, description=d + ", labels not granted"),
        base + "-labels": Case(base + "-labels", "tabular", model, data, protocol, HONEST_WITH_LABELS, options=opts,
                               description=d + ", labels granted"),
    }


CASES: dict[str, Case] = {}
for _data in ("adult", "german"):
    CASES.update(_pair(_data, "fc", FLProtocol("fedsgd", batch_size=1), "fedsgd",
                       desc="TabLeak's FC [100,100,2], untrained, FedSGD"))
    CASES.update(_pair(_data, "fc", FLProtocol("fedsgd", batch_size=32), "fedsgd-trained",
                       {"train_epochs": 1}, desc="FC [100,100,2] after one epoch of Adam on the table, FedSGD"))
    for _e in (1, 5, 10):
        for _lb in (32, 16, 8):
            CASES.update(_pair(_data, "fc", FLProtocol("fedavg", batch_size=32, local_epochs=_e, local_batch_size=_lb,
                                                       local_lr=0.01), f"fedavg-e{_e}-b{_lb}",
                               desc=f"FC [100,100,2], FedAvg: 32 client rows, {_e} local epochs of batch {_lb}, lr 0.01"))
# network-size ablation (paper Table 3), B = 32
for _name, _layout in SIZE_LADDER.items():
    if _name == "fc-100-100-2":
        continue
    CASES.update(_pair("adult", _name, FLProtocol("fedsgd", batch_size=32), "fedsgd", {"layout": _layout},
                       desc=f"network {_name} {list(_layout)}, untrained, FedSGD"))
# the lead's original names stay valid
assert "tabular/adult-fc/fedsgd" in CASES and "tabular/adult-fc/fedsgd-labels" in CASES
