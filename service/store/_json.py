"""Values bound for the store's JSON and text columns: every aggregate stores through these helpers.

:func:`json_safe` makes any value storable (non-finite floats become None, tuples lists, keys
strings, strings :func:`storable`); :func:`storable` makes a text that the workers write (a
message, an error) storable on every database: a NUL character or a lone surrogate becomes
U+FFFD (what clients send is refused at the door instead, by :func:`bitscout.rules.text_problem`);
:func:`finite` reads a number that must be finite (None otherwise).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

_SURROGATE = re.compile("[\ud800-\udfff]")


def storable(text: str) -> str:
    """``text`` with every NUL character and lone surrogate replaced by U+FFFD (unchanged when it has
    none): what every text and JSON column of every database accepts."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = _SURROGATE.sub("\ufffd", text)
    return text


def json_safe(value: Any) -> Any:
    """A copy of ``value`` that any JSON column accepts: non-finite floats become None, tuples lists,
    keys strings, strings :func:`storable`."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, bool | int) or value is None:
        return value
    if isinstance(value, Mapping):
        return {storable(str(k)): json_safe(v) for k, v in value.items()}
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
