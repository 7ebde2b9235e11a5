"""speechleak: speech gradient inversion (keyword spotting, CTC recognition)."""
KITS: dict[str, str] = {}
CASE_MODULES: tuple[str, ...] = ()
ATTACKS: dict[str, str] = {}
PRESETS: dict = {}
