"""``python -m eval schema export CASE > schema.json``: a tabular case's encoding (or a speech
case's front end, ``speechleak.frontend.frontend_dict``) as JSON.

The file names every encoded column in order: the features (categorical ones with their
category list, continuous ones with bounds), the label column and its classes, and the
standardisation (``mean``/``scale`` per encoded column). A federation encodes its rows with
it (``tableak.schema.load_schema`` + ``encode_frame``) and the audit reads the same file with
``--schema schema.json``, so the model width and the encoding never depend on the data at hand.
"""
from __future__ import annotations

import json
import sys

from common.case import Case

from .errors import UserError


def case_schema(case: Case):
    """The tabular schema a case's kit encodes with (``--schema`` / ``--data`` applied)."""
    if case.modality != "tabular":
        raise UserError(f"case {case.name!r} is {case.modality}; `schema export` is for tabular and speech cases "
                        f"(python -m eval list cases)")
    from tableak.kit import TabularKit

    try:
        return TabularKit().load_pool(case, data_path=None).schema
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"case {case.name!r}: {str(e).strip().splitlines()[0]}") from None


def case_frontend(case: Case):
    """The speech front end a case's kit computes features with (``--schema`` applied)."""
    from speechleak.kit import frontend_for

    try:
        return frontend_for(case).config
    except ValueError as e:
        raise UserError(f"case {case.name!r}: {str(e).strip().splitlines()[0]}") from None


def frontend_fingerprint(config) -> str:
    import hashlib
    from dataclasses import asdict

    return hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:16]


def export(case: Case, *, out=None) -> dict:
    """Write the case's encoding as JSON: a tabular schema, or a speech case's front end
    (sample rate, n_fft, hop, Hann window, n_mels, f_min/f_max, log and normalisation, MFCCs)."""
    if case.modality == "speech":
        from speechleak.frontend import frontend_dict

        d = {**frontend_dict(case_frontend(case)), "case": case.name}
        (out or sys.stdout).write(json.dumps(d, indent=1) + "\n")
        return d
    from tableak.schema import schema_to_dict

    d = schema_to_dict(case_schema(case))
    d["case"] = case.name
    d["data"] = str(case.data)
    (out or sys.stdout).write(json.dumps(d, indent=1) + "\n")
    return d


def schema_option(modality: str | None, path: str, *, case: str) -> str:
    """``--schema FILE`` as a case option: ``schema=...`` (tabular) or ``frontend=...`` (speech,
    read here so a bad file is refused before any work); an absolute path."""
    from pathlib import Path

    if modality not in (None, "tabular", "speech"):
        raise UserError(f"--schema is a tabular encoding or a speech front end; case {case!r} is {modality}: "
                        f"drop --schema")
    if not Path(path).is_file():
        raise UserError(f"--schema {path!r}: no such file; write one with "
                        f"`python -m eval schema export CASE > schema.json`")
    if modality != "speech":
        return f"schema={Path(path).resolve()}"
    from speechleak.frontend import load_frontend

    try:
        load_frontend(path)
    except ValueError as e:
        raise UserError(f"--schema {path!r}: {str(e).strip().splitlines()[0]}") from None
    return f"frontend={Path(path).resolve()}"
