"""Measured latency tables and custom device profiles: their formats and checks, written once.

A dependency-free leaf (standard library and :mod:`bitscout.options` only): ``bitscout profile``
writes a table, the service checks an uploaded one (``kind=latency_table``), the SDK and the
CLIs read one before they submit it, and ``search.cost`` prices maps with it.

Latency table
=============

A JSON object::

    {
      "format": "bitscout-latency-table/1",
      "device": "cpu",                       # where it was measured (free text: cpu, cuda, ...)
      "device_name": "...", "torch": "2.13.0", "threads": 2,   # optional, descriptive
      "entries": [
        {"tokens": 128, "shape": [384, 1536], "option": "4a8", "ms": 0.211, "kernel": "int8 _int_mm"},
        ...
      ]
    }

Each entry is the measured time in milliseconds of one matrix of ``shape`` ``[out, in]`` (the
``torch.nn.Linear`` layout) multiplying ``tokens`` input rows at ``option`` (a key of the bit-option
grammar: ``32``, ``16``, ``8``, ``4g128``, ``4a8``...); ``kernel`` says what ran (optional). One
entry per (tokens, shape, option). :func:`parse_latency_table` checks all of it and names the first
bad field as a path (``entries.3.ms``).

Device profile
==============

A custom roofline profile is an object of :data:`DEVICE_PROFILE_FIELDS` (every figure positive and
finite) plus an optional ``name`` and ``description``; :func:`check_device_profile` names the
first bad field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from bitscout.options import OptionSyntaxError, parse_option

__all__ = [
    "DEVICE_PROFILE_FIELDS",
    "LATENCY_TABLE_FORMAT",
    "MAX_TABLE_ENTRIES",
    "LatencyTableError",
    "check_device_profile",
    "parse_latency_table",
]

LATENCY_TABLE_FORMAT = "bitscout-latency-table/1"
#: the most entries one table may hold
MAX_TABLE_ENTRIES = 100_000
#: The figures of a roofline device profile and what each is.
DEVICE_PROFILE_FIELDS: dict[str, str] = {
    "memory_bandwidth_gbs": "peak memory bandwidth in GB/s (10^9 bytes/s)",
    "int8_tops": "dense int8 throughput in TOPS (10^12 operations/s)",
    "int4_tops": "dense int4 throughput in TOPS (the int8 figure where there is no faster int4 path)",
    "fp16_tflops": "dense fp16 throughput in TFLOPS",
    "fp32_tflops": "dense fp32 throughput in TFLOPS",
}


class LatencyTableError(ValueError):
    """A latency table or device profile that fails a check: ``field`` is the path of the bad part
    (``entries.3.ms``, ``int8_tops``), relative to the table or profile."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def _positive(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value) and value > 0


def check_device_profile(data: Any) -> dict[str, Any]:
    """A custom device profile checked and normalised (figures as floats, ``name`` defaulting to
    ``custom``); raises :class:`LatencyTableError` naming the bad field."""
    if not isinstance(data, Mapping):
        raise LatencyTableError("a device profile is an object of its figures", "")
    known = {*DEVICE_PROFILE_FIELDS, "name", "description"}
    for key in data:
        if key not in known:
            raise LatencyTableError(
                f"unknown device profile field {key!r}; known: {', '.join(sorted(known))}", str(key)
            )
    out: dict[str, Any] = {"name": data.get("name", "custom"), "description": data.get("description", "")}
    if not isinstance(out["name"], str) or not out["name"].strip() or len(out["name"]) > 64:
        raise LatencyTableError("a device profile's name is a non-empty string of at most 64 characters", "name")
    if not isinstance(out["description"], str):
        raise LatencyTableError("a device profile's description is a string", "description")
    for key, what in DEVICE_PROFILE_FIELDS.items():
        if key not in data:
            raise LatencyTableError(f"the device profile lacks {key} ({what})", key)
        if not _positive(data[key]):
            raise LatencyTableError(f"{key} must be a positive finite number ({what}), got {data[key]!r}", key)
        out[key] = float(data[key])
    return out


def _positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def parse_latency_table(data: Any) -> dict[str, Any]:
    """A latency table checked and normalised: options as canonical keys, shapes as lists, times as
    floats. Raises :class:`LatencyTableError` naming the first bad field (``entries.3.option``)."""
    if not isinstance(data, Mapping):
        raise LatencyTableError("a latency table is a JSON object", "")
    if data.get("format") != LATENCY_TABLE_FORMAT:
        raise LatencyTableError(
            f"not a latency table: format must be {LATENCY_TABLE_FORMAT!r}, got {data.get('format')!r} "
            "(write one with `bitscout profile`)",
            "format",
        )
    device = data.get("device")
    if not isinstance(device, str) or not device.strip():
        raise LatencyTableError("a latency table names the device it was measured on", "device")
    entries = data.get("entries")
    if not isinstance(entries, list) or not entries:
        raise LatencyTableError("a latency table needs a non-empty list of entries", "entries")
    if len(entries) > MAX_TABLE_ENTRIES:
        raise LatencyTableError(f"a latency table holds at most {MAX_TABLE_ENTRIES} entries", "entries")
    out_entries = []
    seen: set[tuple[int, int, int, str]] = set()
    for i, e in enumerate(entries):
        where = f"entries.{i}"
        if not isinstance(e, Mapping):
            raise LatencyTableError("an entry is an object {tokens, shape, option, ms}", where)
        for key in e:
            if key not in ("tokens", "shape", "option", "ms", "kernel"):
                raise LatencyTableError(f"unknown entry field {key!r}", f"{where}.{key}")
        if not _positive_int(e.get("tokens")):
            raise LatencyTableError(f"tokens must be a positive integer, got {e.get('tokens')!r}", f"{where}.tokens")
        shape = e.get("shape")
        if not isinstance(shape, list | tuple) or len(shape) != 2 or not all(_positive_int(s) for s in shape):
            raise LatencyTableError(f"shape must be [out, in] of positive integers, got {shape!r}", f"{where}.shape")
        try:
            key = parse_option(e.get("option")).key()
        except OptionSyntaxError as exc:
            raise LatencyTableError(str(exc), f"{where}.option") from None
        if not _positive(e.get("ms")):
            raise LatencyTableError(f"ms must be a positive finite number, got {e.get('ms')!r}", f"{where}.ms")
        kernel = e.get("kernel", "")
        if not isinstance(kernel, str):
            raise LatencyTableError("kernel is a string", f"{where}.kernel")
        ident = (int(e["tokens"]), int(shape[0]), int(shape[1]), key)
        if ident in seen:
            raise LatencyTableError(
                f"a second entry for {list(shape)} at {key} over {e['tokens']} tokens", f"{where}.option"
            )
        seen.add(ident)
        out_entries.append(
            {"tokens": ident[0], "shape": [ident[1], ident[2]], "option": key, "ms": float(e["ms"]), "kernel": kernel}
        )
    out = {k: v for k, v in data.items() if k in ("device_name", "torch", "threads", "note")}
    return {"format": LATENCY_TABLE_FORMAT, "device": device, **out, "entries": out_entries}
