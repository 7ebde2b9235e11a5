"""``python -m eval schema export CASE > schema.json``: a tabular case's encoding as JSON.

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
        raise UserError(f"case {case.name!r} is {case.modality}; `schema export` is for tabular cases "
                        f"(python -m eval list cases)")
    from tableak.kit import TabularKit

    try:
        return TabularKit().load_pool(case, data_path=None).schema
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"case {case.name!r}: {str(e).strip().splitlines()[0]}") from None


def export(case: Case, *, out=None) -> dict:
    from tableak.schema import schema_to_dict

    d = schema_to_dict(case_schema(case))
    d["case"] = case.name
    d["data"] = str(case.data)
    (out or sys.stdout).write(json.dumps(d, indent=1) + "\n")
    return d
