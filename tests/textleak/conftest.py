import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)

pytest.importorskip("transformers")


def need(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"asset package {package} is not installed")


def observe_case(case_name: str, b: int, *, seed: int = 0, data: str | None = None, options: dict | None = None):
    """(kit, case, model, obs, prior, truth) for one client batch of a text case."""
    from dataclasses import replace

    from common.seed import make_generator
    from eval.pipeline import simulate
    from textleak.cases import CASES
    from textleak.kit import TextKit

    kit = TextKit()
    case = CASES[case_name].with_batch_size(b)
    if options:
        case = replace(case, options={**case.options, **options})
    cpu = torch.device("cpu")
    model = kit.load_model(case, device=cpu, generator=make_generator(seed))
    pool = kit.load_pool(case, data_path=data)
    t = simulate(case, kit, model=model, pool=pool, prior_kind="text", device=cpu, keep_batch=True,
                 data_generator=make_generator(seed + 1), client_generator=make_generator(seed + 2))
    obs, prior, truth, batch = t.attacker.observation, t.attacker.prior, t.truth, t.batch
    return kit, case, model, obs, prior, truth, batch
