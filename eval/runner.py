"""The runner's public names, kept for existing callers.

The trial pipeline lives in ``eval.pipeline`` (spec -> attacker's view + ground truth ->
record) and the driver loop in ``eval.driver`` (``run_many``); executors import only the
pipeline, so nothing imports back into this module.
"""
from __future__ import annotations

from .driver import USER_INPUT_ERRORS, preload, run_many
from .pipeline import (Prepared, Resources, TrialSpec, check_modality, check_threat, effective_case,
                       failure_record, prepare, record_header, resolve_attack, run_trial)

__all__ = ["USER_INPUT_ERRORS", "Prepared", "Resources", "TrialSpec", "check_modality", "check_threat",
           "effective_case", "failure_record", "preload", "prepare", "record_header", "resolve_attack",
           "run_many", "run_trial"]
