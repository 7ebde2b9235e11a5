from common.case import Case
from common.threat import HONEST, HONEST_WITH_LABELS
from common.types import FLProtocol

CASES = {
    "tabular/adult-fc/fedsgd": Case(
        "tabular/adult-fc/fedsgd", "tabular", "fc-100-100-2", "adult", FLProtocol("fedsgd", batch_size=1), HONEST,
        description="UCI Adult (d=105), TabLeak's FC [100,100,2], untrained, FedSGD, labels not granted"),
    "tabular/adult-fc/fedsgd-labels": Case(
        "tabular/adult-fc/fedsgd-labels", "tabular", "fc-100-100-2", "adult", FLProtocol("fedsgd", batch_size=1),
        HONEST_WITH_LABELS, description="as tabular/adult-fc/fedsgd with the labels granted"),
}
