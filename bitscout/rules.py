"""The domain rules that the search library, the service and the SDK all apply, written once.

A dependency-free leaf (standard library only): ``search`` imports it (import-linter allows this
module and :mod:`bitscout.errors` / :mod:`bitscout.methods`, nothing else of ``bitscout``), the
service stores what it decides, the SDK answers ``Front.best`` with it.

* **Budget feasibility** — :data:`BUDGET_FIELDS` names every limit and the cost it bounds;
  :func:`cost_limits` turns a budget into limits on costs (sizes in bytes); :func:`meets` says
  whether a cost is within them, with a relative tolerance of :data:`RTOL` so that a map
  allocated exactly at a limit meets it despite rounding.
* **The recommended point** — :func:`recommended`: the best metric among the points that meet the
  budget; ties go to the smaller size, then to the earlier point.
* **The 2-D Pareto front** — :func:`pareto_front`: the points no other point beats on both a cost
  (lower is better) and a quality metric; of identical points the first is kept.
* **Stored text** — :func:`text_problem` / :func:`text_problems`: every string the service stores
  must be UTF-8 text without NUL characters (PostgreSQL refuses U+0000 in text and JSON columns,
  and a lone surrogate has no UTF-8 form), on every database alike.
* **Module-name globs** — :func:`selection_problem`: what is wrong with a space's ``include`` /
  ``exclude`` patterns before any model is seen: a pattern that cannot match a module name
  (:func:`glob_problem`), or an ``exclude`` that leaves nothing to search (a pattern that matches
  every name, :func:`matches_every_name`, or every ``include`` pattern excluded as it is).

Example::

    >>> cost_limits({"max_size_mb": 20, "max_avg_bits": None})
    {'size_bytes': 20000000.0}
    >>> meets({"size_bytes": 2e7, "avg_bits": 4.0}, {"size_bytes": 2e7})
    True
    >>> recommended([(0, 0.9, 10.0, True), (1, 0.95, 12.0, True), (2, 0.99, 30.0, False)], True)
    1
    >>> pareto_front([(10.0, 0.9), (12.0, 0.95), (11.0, 0.8)], higher_is_better=True)
    [0, 1]
    >>> list(text_problems({"data": {"text_field": "te\\x00xt"}}))
    [(('data', 'text_field'), 'contains a NUL character (U+0000), which is not allowed')]
    >>> selection_problem(["*.query"], ["*"])
    ('exclude', "the pattern '*' matches every module name: nothing would be left to search")
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence

__all__ = [
    "BUDGET_FIELDS",
    "RTOL",
    "budget_field_of",
    "cost_limits",
    "glob_problem",
    "matches_every_name",
    "meets",
    "pareto_front",
    "recommended",
    "selection_problem",
    "text_problem",
    "text_problems",
]

#: Budget field -> (the cost it limits, the factor from the budget's unit to the cost's unit).
BUDGET_FIELDS: dict[str, tuple[str, float]] = {
    "max_size_mb": ("size_bytes", 1e6),
    "max_avg_bits": ("avg_bits", 1.0),
    "max_bops": ("bops", 1.0),
    "max_latency_ms": ("latency_ms", 1.0),
}

#: Relative tolerance of :func:`meets`.
RTOL = 1e-9


def cost_limits(budget: Mapping[str, float | None]) -> dict[str, float]:
    """The limits a budget (``{max_size_mb: ..., ...}``; None or absent: no limit) sets on costs,
    keyed by cost (``size_bytes``, ``avg_bits``, ``bops``, ``latency_ms``), in the costs' units.
    Keys other than the budget fields are ignored."""
    out: dict[str, float] = {}
    for name, (cost, scale) in BUDGET_FIELDS.items():
        value = budget.get(name)
        if value is not None:
            out[cost] = float(value) * scale
    return out


def budget_field_of(cost: str) -> str:
    """The budget field that limits ``cost`` (``size_bytes`` -> ``max_size_mb``)."""
    for name, (c, _) in BUDGET_FIELDS.items():
        if c == cost:
            return name
    raise KeyError(cost)


def meets(cost: Mapping[str, float], limits: Mapping[str, float], *, rtol: float = RTOL) -> bool:
    """True when every limit (from :func:`cost_limits`) holds for ``cost`` (a mapping with the
    limited costs; a missing or non-finite cost fails its limit)."""
    for name, limit in limits.items():
        value = cost.get(name)
        if value is None or not math.isfinite(value) or value > limit * (1 + rtol):
            return False
    return True


def recommended(points: Iterable[tuple[int, float | None, float, bool]], higher_is_better: bool) -> int | None:
    """The id of the recommended point among ``(id, metric value, size in bytes, meets the budget)``:
    the best value among the points that meet the budget and have a finite value; ties go to the
    smaller size, then the smaller id. None when no point qualifies."""
    best: tuple[float, float, int] | None = None
    for pid, value, size, ok in points:
        if not ok or value is None or not math.isfinite(value):
            continue
        key = (-value if higher_is_better else value, size, pid)
        if best is None or key < best:
            best = key
    return None if best is None else best[2]


def pareto_front(points: Sequence[tuple[float, float]], *, higher_is_better: bool) -> list[int]:
    """Indices of the non-dominated ``(cost, quality)`` pairs, by cost ascending.

    A pair is dominated when another has no higher cost and no worse quality, and is better in
    one. Of identical pairs only the first is kept. Pairs with a non-finite entry are left out.
    O(N log N).
    """
    sign = -1.0 if higher_is_better else 1.0
    rows = [
        (float(c), sign * float(q), i)
        for i, (c, q) in enumerate(points)
        if math.isfinite(c) and math.isfinite(q)
    ]
    rows.sort()
    out: list[int] = []
    best = math.inf
    for _, q, i in rows:
        if q < best:
            out.append(i)
            best = q
    return out


# --------------------------------------------------------------------------- stored text


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored as text, or None when it can: a NUL character (U+0000, which
    PostgreSQL's text and JSON columns refuse) or a lone surrogate (which has no UTF-8 form)."""
    if "\x00" in value:
        return "contains a NUL character (U+0000), which is not allowed"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode text (it holds a lone surrogate)"
    return None


def text_problems(value: object, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """Every string inside ``value`` (nested mappings' keys and values, list and tuple items) that
    :func:`text_problem` refuses, as ``(path, problem)``; a refused key is reported at its mapping's
    path. Values of other types are not looked into."""
    if isinstance(value, str):
        problem = text_problem(value)
        if problem is not None:
            yield path, problem
    elif isinstance(value, Mapping):
        for k, v in value.items():
            if isinstance(k, str) and (problem := text_problem(k)) is not None:
                yield path, f"a key {problem}"
            yield from text_problems(v, (*path, k if isinstance(k, str | int) else str(k)))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from text_problems(v, (*path, i))


# --------------------------------------------------------------------------- module-name globs


def glob_problem(pattern: str) -> str | None:
    """Why ``pattern`` (an ``fnmatch`` glob over module names, ``*`` matching dots too) can match no
    module name, or None: it is empty, holds whitespace or control characters (module names have
    none), or opens a ``[`` character class it never closes (which ``fnmatch`` would read as a
    literal ``[``)."""
    if not pattern:
        return "is empty"
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in pattern):
        return "holds whitespace or control characters, which no module name has"
    i, n = 0, len(pattern)
    while i < n:
        if pattern[i] == "[":
            j = i + 1
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                return f"opens a character class at position {i} ('[') that is never closed"
            i = j
        i += 1
    return None


def matches_every_name(pattern: str) -> bool:
    """True when ``pattern`` is made of wildcards only and holds a ``*`` (``*``, ``**``, ``?*``...):
    it matches every module name (of at least as many characters as it has ``?``)."""
    return "*" in pattern and set(pattern) <= {"*", "?"}


def selection_problem(include: Sequence[str], exclude: Sequence[str]) -> tuple[str, str] | None:
    """The first problem of an ``include`` / ``exclude`` selection that is knowable without the model,
    as ``(list name, message)``, or None: a malformed pattern (:func:`glob_problem`), an exclude
    pattern that matches every name, or every include pattern also among the exclude patterns."""
    for which, patterns in (("include", include), ("exclude", exclude)):
        for i, pattern in enumerate(patterns):
            problem = glob_problem(pattern)
            if problem is not None:
                return which, f"pattern {i} ({pattern[:80]!r}) {problem}"
    every = [p for p in exclude if matches_every_name(p)]
    if every:
        return "exclude", f"the pattern {every[0]!r} matches every module name: nothing would be left to search"
    if include and set(include) <= set(exclude):
        return "exclude", "every include pattern is also an exclude pattern: nothing would be left to search"
    return None
