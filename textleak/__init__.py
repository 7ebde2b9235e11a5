"""textleak: TAG, LAMP and DAGER on Hugging Face transformers (plain tables only, no heavy imports)."""
from common.preset import Preset

KITS = {"text": "textleak.kit:TextKit", "text-lora": "textleak.lora:LoraTextKit"}
CASE_MODULES: tuple[str, ...] = ("textleak.cases", "textleak.cases_dager")
ATTACKS = {
    "tag": "textleak.attacks.tag:TAG",
    "lamp": "textleak.attacks.lamp:LAMP",
    "dager": "textleak.attacks.dager:DAGER",
    "text-prior": "textleak.attacks.baseline:TextPriorBaseline",
}
PRESETS = {
    "tag": Preset("tag", {}, "TAG (Deng et al. 2021) as LAMP's tag.sh: L2 + 0.01·L1, Adam lr 0.1, 2500 steps"),
    "tag-filter": Preset("tag", {"token_filter": "auto"},
                         "TAG with LAMP's token filter (vocabulary cut to the non-zero embedding-gradient rows), "
                         "for filter-matched comparisons with LAMP"),
    "lamp-cos": Preset("lamp", {"loss": "cos", "coeff_perplexity": 0.2, "coeff_reg": 1.0, "lr": 0.01, "lr_decay": 0.89},
                       "LAMP_cos (Balunović et al. 2022) as lamp_cos.sh"),
    "lamp-cos-nofilter": Preset("lamp", {"loss": "cos", "coeff_perplexity": 0.2, "coeff_reg": 1.0, "lr": 0.01,
                                         "lr_decay": 0.89, "token_filter": "none"},
                                "LAMP_cos without the token filter (full vocabulary), for filter-matched comparisons with TAG"),
    "lamp-l1l2": Preset("lamp", {"loss": "tag", "tag_factor": 0.01, "coeff_perplexity": 60.0, "coeff_reg": 25.0,
                                 "lr": 0.01, "lr_decay": 0.89},
                        "LAMP_L1+L2 (Balunović et al. 2022) as lamp_l1l2.sh"),
    "dager": Preset("dager", {}, "DAGER (Petrov et al. 2024): reference tau1 1e-5 / tau2 1e-3 with spectrum-adaptive widening"),
    "dager-fedavg": Preset("dager", {"l1_span_thresh": 5e-3, "l2_span_thresh": 5e-3, "adaptive_tau": False},
                           "DAGER with the fixed thresholds of the reference fed_avg.sh"),
    "text-prior": Preset("text-prior", {}, "Baseline, not an attack: B sentences from the public pool (nearest granted lengths)"),
}
#: TextKit.score writes rouge1/2/L, token_accuracy, exact_match and label_accuracy: all common entries.
METRICS: tuple = ()
