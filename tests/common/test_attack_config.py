from dataclasses import dataclass, field

import pytest

from common.attack import apply_overrides, config_dict, identity_config


@dataclass(frozen=True)
class _Cfg:
    lr: float = 0.1
    steps: int = 10
    fast_path: bool = field(default=True, metadata={"identity": False})


def test_identity_config_drops_execution_knobs_only():
    cfg = _Cfg()
    assert config_dict(cfg) == {"lr": 0.1, "steps": 10, "fast_path": True}
    assert identity_config(cfg) == {"lr": 0.1, "steps": 10}
    assert identity_config(apply_overrides(cfg, {"fast_path": "false"})) == identity_config(cfg)
    assert identity_config(apply_overrides(cfg, {"steps": "20"})) != identity_config(cfg)


def test_unknown_override_names_the_valid_keys():
    with pytest.raises(ValueError, match="valid keys: fast_path, lr, steps"):
        apply_overrides(_Cfg(), {"lrr": 1})
