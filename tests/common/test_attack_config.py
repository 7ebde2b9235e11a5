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


@pytest.mark.parametrize("key,value,msg", [("iterations", "-5", "iterations=-5 is out of range: must be >=1"),
                                           ("restarts", "0", "restarts=0 is out of range"),
                                           ("lr", "nan", "lr=nan: must be a finite number"),
                                           ("lr", "0", "lr=0.0 is out of range: must be >0"),
                                           ("tv_weight", "-1", "tv_weight=-1.0 is out of range: must be >=0")])
def test_out_of_range_override_is_refused(key, value, msg):
    from common.baselines import GradientMatchingConfig

    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace("[", r"\[")):
        apply_overrides(GradientMatchingConfig(), {key: value})


def test_every_registered_attack_and_preset_default_is_in_range():
    from common.attack import validate_config
    from eval.catalog import catalog

    cat = catalog()
    for name in cat.presets.names():
        _, cls, overrides = cat.resolve(name)
        apply_overrides(cls.default_config(), overrides)
    for name in cat.attacks.names():
        validate_config(cat.attacks.get(name).default_config())
