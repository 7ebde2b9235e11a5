"""tableak: TabLeak (Vero et al., ICML 2023) and baselines on tabular FL updates."""
KITS = {"tabular": "tableak.kit:TabularKit"}
CASE_MODULES = ("tableak.cases",)
ATTACKS: dict[str, str] = {}
PRESETS: dict = {}
