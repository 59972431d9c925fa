"""What a trial sends Tune, and how the driver's readers get every value of it back.

Tune keeps, for every trial for the whole sweep, a record of each numeric value the trial ever
reported: min, max, mean, last and its last-5 and last-10 windows (``Trial.run_metadata``). A trial
here reports ~110 numbers an epoch (every clinical metric, per class, for training and
validation), so the driver's memory grew ~1 MiB per trial (``docs/performance.md``), ~1 GB for a
sweep of 1000 short trials. Tune schedules on a few of them only.

:func:`pack` keeps those few as numbers (the ones the scheduler, the searcher and ``sweep status``
read: the caller names them) and sends the rest as one JSON string under :data:`PACKED_KEY`,
which Tune does not track. Tune's last result of a trial still holds every value, and Tune's own
``result.json`` per trial too; :func:`unpack` (the MLflow callback, anything that reads a result)
puts them back. Non-numeric values (tags, per-seed reports) pass through as they are.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

__all__ = ["PACKED_KEY", "pack", "unpack"]

PACKED_KEY = "cxr_values"  # a JSON object: the reported numbers Tune does not schedule on


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def pack(values: Mapping[str, Any], keep: Collection[str]) -> dict[str, Any]:
    """``values`` as Tune should get them: the numbers named in ``keep`` and every non-number as
    they are, the other numbers in one JSON string under :data:`PACKED_KEY`."""
    if PACKED_KEY in values:
        raise ValueError(f"{PACKED_KEY!r} is reserved: a trial may not report a value of that name")
    out: dict[str, Any] = {}
    rest: dict[str, float] = {}
    for k, v in values.items():
        if _number(v) and k not in keep:
            rest[k] = v
        else:
            out[k] = v
    if rest:
        out[PACKED_KEY] = json.dumps(rest)  # NaN and ±inf as JSON's NaN/Infinity, read back as such
    return out


def unpack(result: Mapping[str, Any]) -> dict[str, Any]:
    """A result (or a trial's last result) with the packed values back in place; one that was not
    packed is returned as a copy."""
    out = dict(result)
    packed = out.pop(PACKED_KEY, None)
    if isinstance(packed, str):
        out.update({k: v for k, v in json.loads(packed).items() if k not in out})
    return out
