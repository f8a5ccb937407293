"""Refinement of a finished in-process search's best points (``bitscout search --refine``).

The points are chosen as a job chooses them: ``"recommended"`` refines the recommended point;
``k`` refines the ``k`` best front points (by the result's metric) that meet the budget, uniform
baselines left out (a point far over the budget, already close to full precision, gains
nothing). Early stopping selects on held-back calibration batches (:func:`split_validation`),
never on the evaluation rows the refined metrics are reported on. Each refined point keeps its
origin's map and cost, has the refined metrics and ``refined=True``; it is added to the result's
points, and the front and the recommendation are recomputed over every point.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from search.errors import InvalidInputError
from search.result import SearchResult
from search.sensitivity import ProgressFn, StopFn

__all__ = ["choose_points", "refine_result", "split_validation"]


def split_validation(batches: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """Calibration batches split for refinement: training batches and the last quarter (at least one
    batch) held back for early stopping; with a single batch it serves both."""
    batches = list(batches)
    if len(batches) < 2:
        return batches, batches
    k = max(1, len(batches) // 4)
    return batches[:-k], batches[-k:]


def choose_points(result: SearchResult, points: str | int, budget: Any) -> list[int]:
    """Indices (into ``result.points``) of the points to refine: the recommended one, or the
    ``points`` best front points that meet ``budget`` (uniform baselines left out)."""
    if points == "recommended":
        rec = result.info.get("recommended")
        return [rec] if isinstance(rec, int) else []
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise InvalidInputError(f"refine points must be 'recommended' or a positive integer, got {points!r}",
                                field="refine")  # fmt: skip
    ids = {id(p): i for i, p in enumerate(result.points)}
    sign = 1.0 if result.higher_is_better else -1.0
    front = [
        p for p in result.front
        if p.method != "uniform" and result.metric in p.metrics and (budget.empty or budget.is_feasible(p.cost))
    ]  # fmt: skip
    front.sort(key=lambda p: -sign * p.metrics[result.metric])
    return [ids[id(p)] for p in front[:points]]


def refine_result(
    search: Any,
    result: SearchResult,
    points: str | int,
    *,
    steps: int,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> SearchResult:
    """``result`` with the chosen points refined (see the module docstring) and added to its points.

    ``search`` is the :class:`~search.pipeline.Search` that produced ``result``. The new result's
    ``info["refined_from"]`` maps each refined point's index to its origin's, and
    ``info["refine"]`` says what was asked and done."""
    from search.refine import RefineConfig, refine

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidInputError(f"refine steps must be a positive integer, got {steps!r}", field="refine_steps")
    chosen = choose_points(result, points, search.options.budget)
    train, validation = split_validation(search.calibration)
    report = on_progress or (lambda stage, frac, msg: None)
    all_points = list(result.points)
    refined_from: dict[int, int] = {}
    t0 = time.perf_counter()
    for k, i in enumerate(chosen):
        origin = result.points[i]
        res = refine(
            search,
            origin.precision_map,
            config=RefineConfig(steps=steps, seed=search.options.seed),
            train_batches=train,
            validation_batches=validation,
            on_progress=lambda s, f, m, k=k, i=i: report(s, (k + f) / len(chosen), f"point {i}: {m}"),
            should_stop=should_stop,
        )
        refined_from[len(all_points)] = i
        all_points.append(res.point(origin))
    search.timings["refine"] = time.perf_counter() - t0
    out: SearchResult = search.assemble(all_points, result.sensitivities)
    out.info["refined_from"] = {str(k): v for k, v in refined_from.items()}
    out.info["refine"] = {"points": points, "steps": steps, "refined": len(chosen)}
    return out
