from dataclasses import dataclass

import pytest

from common.attack import apply_overrides


@dataclass(frozen=True)
class _Cfg:
    lr: float = 0.1
    steps: int = 10
    fast_path: bool = True


def test_unknown_override_names_the_valid_keys():
    with pytest.raises(ValueError, match="valid keys: fast_path, lr, steps"):
        apply_overrides(_Cfg(), {"lrr": 1})
