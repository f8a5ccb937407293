"""Values bound for the store's JSON columns: every aggregate stores JSON through these helpers.

:func:`json_safe` makes any value storable (non-finite floats become None, tuples lists, keys
strings); :func:`finite` reads a number that must be finite (None otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def json_safe(value: Any) -> Any:
    """A copy of ``value`` that any JSON column accepts: non-finite floats become None, tuples lists,
    keys strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return json_safe(value.item())
    if hasattr(value, "to_dict"):
        return json_safe(value.to_dict())
    return str(value)


def finite(value: Any) -> float | None:
    """``value`` as a finite float, or None when it is not a number or not finite."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
