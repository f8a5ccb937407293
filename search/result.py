"""Costs, budgets, Pareto points and search results (frozen, JSON round-trip).

``Cost`` is what a cost model says of a precision map; ``Budget`` is a set of limits on costs;
``ParetoPoint`` is an evaluated map; ``SearchResult`` is everything one search produced.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bitscout import rules
from search.errors import InvalidInputError
from search.space import PrecisionMap

#: Cost metrics, their units, and the Budget field that limits each.
COST_METRICS: dict[str, str] = {
    "size_bytes": "bytes",
    "avg_bits": "bits per weight",
    "bops": "bit operations",
    "latency_ms": "milliseconds",
}


@dataclass(frozen=True)
class Cost:
    """The cost of a precision map: exact size in bytes, average bits per quantizable weight,
    bit operations for one sequence, and modelled latency in milliseconds."""

    size_bytes: float
    avg_bits: float
    bops: float
    latency_ms: float

    @property
    def size_mb(self) -> float:
        return self.size_bytes / 1e6

    def get(self, metric: str) -> float:
        if metric == "size_mb":
            return self.size_mb
        if metric not in COST_METRICS:
            raise InvalidInputError(f"unknown cost metric {metric!r}; known: {', '.join(COST_METRICS)}", field="cost")
        return float(getattr(self, metric))

    def to_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Cost:
        return cls(**{f.name: float(data[f.name]) for f in fields(cls)})


@dataclass(frozen=True)
class Budget:
    """Limits on the costs of a map; any combination may be set (None: no limit).

    ``max_size_mb`` is in megabytes (10^6 bytes) of the whole model; ``max_avg_bits`` is the
    average bits per weight inside the search space; ``max_bops`` per sequence;
    ``max_latency_ms`` under the cost model's device profile.
    """

    max_size_mb: float | None = None
    max_avg_bits: float | None = None
    max_bops: float | None = None
    max_latency_ms: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                raise InvalidInputError(f"{f.name} must be a positive number, got {v!r}", field=f.name)

    def limits(self) -> dict[str, float]:
        """The set limits keyed by ``Cost`` attribute (size in bytes): :func:`bitscout.rules.cost_limits`."""
        return rules.cost_limits(asdict(self))

    @property
    def empty(self) -> bool:
        return not self.limits()

    def is_feasible(self, cost: Cost, *, rtol: float = rules.RTOL) -> bool:
        """Whether ``cost`` meets every limit (:func:`bitscout.rules.meets`)."""
        return rules.meets(cost.to_dict(), self.limits(), rtol=rtol)

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Budget:
        data = dict(data or {})
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise InvalidInputError(f"unknown budget field(s): {', '.join(sorted(unknown))}", field="budget")
        return cls(**data)


@dataclass(frozen=True)
class ParetoPoint:
    """An evaluated precision map: its cost, its metrics, how it was found.

    ``method`` is ``kl``, ``hessian``, ``dnas``, ``nsga2`` or ``uniform``; ``refined`` marks points
    fine-tuned after the search; ``predicted`` is the summed sensitivity the allocator minimised
    (None for points not found by an allocator); ``budget`` the limits it was allocated under;
    ``refined_from`` the index of the point a refined point was fine-tuned from; ``provenance``
    how it was found: ``score`` (the sensitivity method or DNAS start whose scores it was allocated
    from), ``round`` (0: the first allocation; then the closed loop's correction round),
    ``local_search``, ``guard`` (a uniform map that replaced a map measuring worse on the
    calibration proxy), ``how`` and ``proxy`` (its measured calibration discrepancy);
    ``{"reference": true}`` for the uniform reference maps (:mod:`search.loop`).
    """

    precision_map: PrecisionMap
    cost: Cost
    metrics: dict[str, float]
    method: str
    refined: bool = False
    label: str = ""
    predicted: float | None = None
    budget: dict[str, float] = field(default_factory=dict)
    refined_from: int | None = None
    provenance: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "precision_map": self.precision_map.to_dict(),
            "cost": self.cost.to_dict(),
            "metrics": dict(self.metrics),
            "method": self.method,
            "refined": self.refined,
            "label": self.label,
            "predicted": self.predicted,
            "budget": dict(self.budget),
        }
        if self.refined_from is not None:
            out["refined_from"] = self.refined_from
        if self.provenance is not None:
            out["provenance"] = dict(self.provenance)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ParetoPoint:
        return cls(
            precision_map=PrecisionMap.from_dict(data["precision_map"]),
            cost=Cost.from_dict(data["cost"]),
            metrics={k: float(v) for k, v in data["metrics"].items()},
            method=str(data["method"]),
            refined=bool(data.get("refined", False)),
            label=str(data.get("label", "")),
            predicted=None if data.get("predicted") is None else float(data["predicted"]),
            budget={k: float(v) for k, v in (data.get("budget") or {}).items()},
            refined_from=None if data.get("refined_from") is None else int(data["refined_from"]),
            provenance=None if data.get("provenance") is None else dict(data["provenance"]),
        )


@dataclass(frozen=True)
class SensitivityTable:
    """A score per (group, option): how much quantizing that group alone at that option hurts.

    ``scores[group][option key]``; ``method`` (``kl`` or ``hessian``), ``samples`` (calibration
    sequences, or probes for Hessian), ``errors`` (standard error per group where known) and
    ``extra`` (e.g. Hessian traces) describe how it was obtained.
    """

    method: str
    scores: dict[str, dict[str, float]]
    samples: int = 0
    errors: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "scores": {g: dict(s) for g, s in self.scores.items()},
            "samples": self.samples,
            "errors": dict(self.errors),
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SensitivityTable:
        return cls(
            method=str(data["method"]),
            scores={g: {k: float(v) for k, v in s.items()} for g, s in data["scores"].items()},
            samples=int(data.get("samples", 0)),
            errors={k: float(v) for k, v in (data.get("errors") or {}).items()},
            extra=dict(data.get("extra") or {}),
        )


@dataclass(frozen=True)
class SearchResult:
    """Everything one search produced: the front, every evaluated point, the sensitivity tables,
    the space it searched (serialised), timings in seconds, versions of the libraries used, and the
    name of the quality metric that orders the front (``higher_is_better`` tells its direction)."""

    front: list[ParetoPoint]
    points: list[ParetoPoint]
    sensitivities: list[SensitivityTable]
    metric: str
    higher_is_better: bool
    baseline_metrics: dict[str, float] = field(default_factory=dict)
    space: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "front": [p.to_dict() for p in self.front],
            "points": [p.to_dict() for p in self.points],
            "sensitivities": [s.to_dict() for s in self.sensitivities],
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "baseline_metrics": dict(self.baseline_metrics),
            "space": self.space,
            "timings": dict(self.timings),
            "versions": dict(self.versions),
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchResult:
        return cls(
            front=[ParetoPoint.from_dict(p) for p in data["front"]],
            points=[ParetoPoint.from_dict(p) for p in data["points"]],
            sensitivities=[SensitivityTable.from_dict(s) for s in data.get("sensitivities", [])],
            metric=str(data["metric"]),
            higher_is_better=bool(data["higher_is_better"]),
            baseline_metrics={k: float(v) for k, v in (data.get("baseline_metrics") or {}).items()},
            space=dict(data.get("space") or {}),
            timings={k: float(v) for k, v in (data.get("timings") or {}).items()},
            versions={k: str(v) for k, v in (data.get("versions") or {}).items()},
            info=dict(data.get("info") or {}),
        )

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, source: str | Path) -> SearchResult:
        p = Path(source) if not str(source).lstrip().startswith("{") else None
        text = p.read_text() if p is not None else str(source)
        try:
            return cls.from_dict(json.loads(text))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"not a bitscout search result: {exc}", field="result") from exc
