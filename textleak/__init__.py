"""textleak: TAG, LAMP and DAGER on Hugging Face transformers."""
KITS: dict[str, str] = {}
CASE_MODULES: tuple[str, ...] = ()
ATTACKS: dict[str, str] = {}
PRESETS: dict = {}
