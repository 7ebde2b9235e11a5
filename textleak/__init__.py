"""textleak: TAG, LAMP and DAGER on Hugging Face transformers (plain tables only, no heavy imports)."""
from common.attack import Preset

KITS = {"text": "textleak.kit:TextKit"}
CASE_MODULES: tuple[str, ...] = ("textleak.cases",)
ATTACKS = {
    "tag": "textleak.attacks.tag:TAG",
    "lamp": "textleak.attacks.lamp:LAMP",
}
PRESETS = {
    "tag": Preset("tag", {}, "TAG (Deng et al. 2021) as LAMP's tag.sh: L2 + 0.01·L1, Adam lr 0.1, 2500 steps"),
    "lamp-cos": Preset("lamp", {"loss": "cos", "coeff_perplexity": 0.2, "coeff_reg": 1.0, "lr": 0.01, "lr_decay": 0.89},
                       "LAMP_cos (Balunović et al. 2022) as lamp_cos.sh"),
    "lamp-l1l2": Preset("lamp", {"loss": "tag", "tag_factor": 0.01, "coeff_perplexity": 60.0, "coeff_reg": 25.0,
                                 "lr": 0.01, "lr_decay": 0.89},
                        "LAMP_L1+L2 (Balunović et al. 2022) as lamp_l1l2.sh"),
}
