"""A job's points as a list, with the metric they are ranked by, and helpers to pick, tabulate
and plot them."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from bitscout import rules
from bitscout.errors import ErrorCode, InvalidRequest, NotFound
from bitscout.methods import provenance_text
from bitscout.schemas import BudgetSpec, ParetoPointRead, ParetoRead

__all__ = ["Front", "Point"]

#: One evaluated precision map of a job (the wire model ``ParetoPointRead``).
Point = ParetoPointRead

_LIMITS = {
    "max_size_mb": ("size_mb", "MB"),
    "max_avg_bits": ("avg_bits", "bits"),
    "max_bops": ("bops", "BOPs"),
    "max_latency_ms": ("latency_ms", "ms"),
}


def _missing(name: str, extra: str) -> ImportError:
    return ImportError(f"{name} is not installed: pip install {extra}")


class Front(list[ParetoPointRead]):
    """Every stored point of a job (search results and uniform baselines), by id, with how to read
    them: ``metric`` and ``higher_is_better``, the unquantized model's ``baseline_metrics``, the
    job's ``budget`` and the ``recommended`` point's id.

    Example::

        >>> front = job.pareto()                                    # doctest: +SKIP
        >>> front.recommended_point.cost.size_mb                   # doctest: +SKIP
        21.4
        >>> front.best(max_size_mb=15).precision_map               # doctest: +SKIP
        {'bert.encoder.layer.0.attention.self.query': BitOptionRead(bits=4, symmetric=True), ...}
        >>> front.to_pandas()[["id", "method", "size_mb", "accuracy"]]   # doctest: +SKIP
    """

    def __init__(
        self,
        points: Iterable[ParetoPointRead] = (),
        *,
        job_id: str = "",
        metric: str | None = None,
        higher_is_better: bool = True,
        baseline_metrics: dict[str, float | None] | None = None,
        budget: BudgetSpec | None = None,
        recommended: int | None = None,
    ) -> None:
        super().__init__(points)
        self.job_id = job_id
        self.metric = metric
        self.higher_is_better = higher_is_better
        self.baseline_metrics: dict[str, float | None] = dict(baseline_metrics or {})
        self.budget = budget
        self.recommended = recommended

    @classmethod
    def from_read(cls, read: ParetoRead) -> Front:
        """The front of a ``GET /jobs/{id}/pareto`` answer."""
        return cls(
            read.points,
            job_id=read.job_id,
            metric=read.metric,
            higher_is_better=read.higher_is_better,
            baseline_metrics=read.baseline_metrics,
            budget=read.budget,
            recommended=read.recommended,
        )

    def _like(self, points: Iterable[ParetoPointRead]) -> Front:
        return Front(
            points,
            job_id=self.job_id,
            metric=self.metric,
            higher_is_better=self.higher_is_better,
            baseline_metrics=self.baseline_metrics,
            budget=self.budget,
            recommended=self.recommended,
        )

    def __repr__(self) -> str:
        return f"Front(job_id={self.job_id!r}, metric={self.metric!r}, points={len(self)}, recommended={self.recommended})"

    # -- selection ------------------------------------------------------------------------------
    def get(self, point_id: int) -> ParetoPointRead:
        """The point with this id; raises :class:`NotFound`."""
        for p in self:
            if p.id == point_id:
                return p
        raise NotFound(f"job {self.job_id} has no point {point_id}", field="point_id")

    @property
    def recommended_point(self) -> ParetoPointRead | None:
        """The best point that meets the job's budget (None when none does)."""
        return None if self.recommended is None else self.get(self.recommended)

    def on_front(self) -> Front:
        """Only the points on the combined Pareto front (no dominated points or baselines)."""
        return self._like(p for p in self if p.on_front)

    def value(self, point: ParetoPointRead, metric: str | None = None) -> float | None:
        """The point's value of ``metric`` (the front's metric by default); None when unknown."""
        name = metric or self.metric
        v = point.metrics.get(name) if name else None
        return None if v is None or not math.isfinite(v) else float(v)

    def best(
        self,
        *,
        max_size_mb: float | None = None,
        max_avg_bits: float | None = None,
        max_bops: float | None = None,
        max_latency_ms: float | None = None,
        metric: str | None = None,
        higher_is_better: bool | None = None,
        methods: Sequence[str] | None = None,
        on_front: bool = False,
    ) -> ParetoPointRead:
        """The best point (by ``metric``, the job's metric by default) among those within the given
        limits, from ``methods`` only when given (``"uniform"`` names the baselines), and on the
        front only with ``on_front=True``. Ties go to the smaller point.

        With no limit at all, the job's own budget applies. Raises :class:`InvalidRequest` (code
        ``budget_infeasible``, ``field`` the first limit, ``details["smallest"]`` the smallest value
        of it any point has) when no point fits.

        Example::

            >>> job.pareto().best(max_size_mb=20, max_avg_bits=4.5).id   # doctest: +SKIP
            7
        """
        limits = {
            k: float(v)
            for k, v in (
                ("max_size_mb", max_size_mb),
                ("max_avg_bits", max_avg_bits),
                ("max_bops", max_bops),
                ("max_latency_ms", max_latency_ms),
            )
            if v is not None
        }
        if not limits and self.budget is not None:
            limits = self.budget.limits()
        name = metric or self.metric
        if not name:
            raise InvalidRequest("the job names no metric: pass metric=...", field="metric")
        higher = self.higher_is_better if higher_is_better is None else higher_is_better
        pool = [p for p in self if (not on_front or p.on_front) and (methods is None or p.method in methods)]
        cost_limits = rules.cost_limits(limits)
        fitting = {p.id: p for p in pool if rules.meets(p.cost.model_dump(), cost_limits)}
        best = rules.recommended(
            ((p.id, self.value(p, name), p.cost.size_bytes, True) for p in fitting.values()), higher
        )
        if best is None:
            first = next(iter(limits), None)
            details: dict[str, Any] = {"limits": limits, "points": len(pool)}
            why = f"no point of job {self.job_id} "
            if first is not None and pool:
                attr, unit = _LIMITS[first]
                smallest = min(getattr(p.cost, attr) for p in pool)
                details["smallest"] = smallest
                why += f"meets {', '.join(f'{k} <= {v:g}' for k, v in limits.items())} (smallest {attr}: {smallest:.4g} {unit})"
            elif not pool:
                why += "matches (none stored yet?)"
            else:
                why += f"has a value of {name!r}"
            raise InvalidRequest(why, field=first, code=ErrorCode.budget_infeasible, details=details)
        return fitting[best]

    # -- tables and plots -----------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """One flat dict a point: id, method, label, costs, every metric, flags (``refined_from``: the
        id of the point a refined point was fine-tuned from; ``found``: how it was found,
        :func:`bitscout.methods.provenance_text`)."""
        metric_names: list[str] = []
        for p in self:
            for k in p.metrics:
                if k not in metric_names:
                    metric_names.append(k)
        out = []
        for p in self:
            row: dict[str, Any] = {
                "id": p.id,
                "method": p.method,
                "label": p.label,
                "size_mb": p.cost.size_mb,
                "size_bytes": p.cost.size_bytes,
                "avg_bits": p.cost.avg_bits,
                "bops": p.cost.bops,
                "latency_ms": p.cost.latency_ms,
            }
            for k in metric_names:
                row[k] = p.metrics.get(k)
            row.update(
                on_front=p.on_front,
                meets_budget=p.meets_budget,
                recommended=p.recommended,
                refined=p.refined,
                refined_from=p.refined_from,
                artifact_available=p.artifact_available,
                found=provenance_text(None if p.provenance is None else p.provenance.model_dump()),
            )
            out.append(row)
        return out

    def to_pandas(self) -> Any:
        """The points as a ``pandas.DataFrame`` (one row a point; see :meth:`rows`).

        Raises ImportError when pandas is not installed.
        """
        try:
            import pandas as pd
        except ImportError:
            raise _missing("pandas", "pandas") from None
        return pd.DataFrame(self.rows())

    def plot(
        self,
        ax: Any = None,
        *,
        metric: str | None = None,
        x: str = "size_mb",
        annotate: bool = True,
    ) -> Any:
        """Plot ``metric`` against ``x`` (a cost: size_mb, avg_bits, bops, latency_ms) with
        matplotlib: the front as a line per method, uniform baselines and off-front points as
        markers, the recommended point circled, the unquantized metric as a dashed line, the
        budget as a vertical line. Returns the Axes. Raises ImportError without matplotlib.
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError:
            raise _missing("matplotlib", "matplotlib") from None
        name = metric or self.metric
        if not name:
            raise InvalidRequest("the job names no metric: pass metric=...", field="metric")
        if ax is None:
            _fig, ax = plt.subplots(figsize=(7, 4.5))
        methods = sorted({p.method for p in self})
        for m in methods:
            pts = sorted(
                (
                    (getattr(p.cost, x), v, p)
                    for p in self
                    if p.method == m and (v := self.value(p, name)) is not None
                ),
                key=lambda t: t[0],
            )
            if not pts:
                continue
            front = [t for t in pts if t[2].on_front and m != "uniform"]
            other = [t for t in pts if t not in front]
            if front:
                ax.plot([t[0] for t in front], [t[1] for t in front], marker="o", label=m)
            if other:
                ax.scatter(
                    [t[0] for t in other],
                    [t[1] for t in other],
                    marker="s" if m == "uniform" else "x",
                    label=f"{m} (baseline)" if m == "uniform" else f"{m} (off front)",
                )
                if annotate and m == "uniform":
                    for xv, yv, p in other:
                        ax.annotate(p.label or p.method, (xv, yv), fontsize=7, alpha=0.7)
        rec = self.recommended_point
        if rec is not None and (rv := self.value(rec, name)) is not None:
            ax.scatter(
                [getattr(rec.cost, x)], [rv], s=160, facecolors="none", edgecolors="red", label="recommended"
            )
        base = self.baseline_metrics.get(name)
        if base is not None:
            ax.axhline(base, linestyle="--", color="grey", linewidth=1, label="unquantized")
        limit_key = {
            "size_mb": "max_size_mb",
            "avg_bits": "max_avg_bits",
            "bops": "max_bops",
            "latency_ms": "max_latency_ms",
        }.get(x)
        if self.budget is not None and limit_key is not None:
            lim = getattr(self.budget, limit_key)
            if lim is not None:
                ax.axvline(lim, linestyle=":", color="red", linewidth=1, label="budget")
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel(name + (" (higher is better)" if self.higher_is_better else " (lower is better)"))
        ax.set_title(f"job {self.job_id[:8]}")
        ax.legend(fontsize=8)
        return ax
