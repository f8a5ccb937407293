"""The allocator behind ``POST /jobs/{id}/resolve``: a new budget answered from the stored search
space and sensitivity tables, without the model (:func:`search.plan.resolve`).

A job with several tables (``kl`` and ``hessian``) gets one optimal map per table. Their predicted
objectives are in different units, so the answer is chosen by a vote: each table ranks every
method's map by the summed sensitivity it predicts for it, and the map with the smallest rank sum
wins (ties: the smaller map, then the first method). ``bitscout serve`` injects it with
``create_app(settings, resolver=SearchResolver())``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from search.errors import InfeasibleBudgetError, InvalidInputError
from search.plan import resolve
from search.result import SensitivityTable
from search.space import BitOption

_BUDGET_FIELDS = ("max_size_mb", "max_avg_bits", "max_bops", "max_latency_ms")


def _predicted(table: SensitivityTable, pmap: Mapping[str, Mapping[str, Any]]) -> float:
    total = 0.0
    for group, opt in pmap.items():
        key = BitOption(int(opt["bits"]), bool(opt.get("symmetric", True))).key()
        total += max(0.0, float(table.scores.get(group, {}).get(key, 0.0)))
    return total


class SearchResolver:
    """Implements the service's ``Resolver`` protocol with the search library's allocator."""

    def resolve(
        self,
        *,
        space: dict[str, Any],
        sensitivities: list[dict[str, Any]],
        budget: dict[str, Any],
        methods: list[str] | None,
    ) -> dict[str, Any]:
        if not sensitivities:
            raise InvalidInputError("no sensitivity table to resolve from", field="methods")
        limits = {k: budget.get(k) for k in _BUDGET_FIELDS if budget.get(k) is not None}
        space_data = dict(space)
        profile = budget.get("device_profile")
        if profile:
            space_data["cost_model"] = {**dict(space.get("cost_model") or {}), "profile": profile}
        tables = [SensitivityTable.from_dict(t) for t in sensitivities]
        answers: list[dict[str, Any]] = []
        infeasible: InfeasibleBudgetError | None = None
        for table in tables:
            try:
                answers.append(resolve(space_data, table, limits))
            except InfeasibleBudgetError as exc:
                infeasible = infeasible or exc
        if not answers:
            assert infeasible is not None  # noqa: S101
            raise infeasible
        if len(answers) == 1:
            return answers[0]
        ranks = [0] * len(answers)
        for table in tables:
            scores = [_predicted(table, a["precision_map"]) for a in answers]
            order = sorted(range(len(answers)), key=lambda i: scores[i])
            for rank, i in enumerate(order):
                ranks[i] += rank
        best = min(range(len(answers)), key=lambda i: (ranks[i], answers[i]["cost"]["size_bytes"], i))
        out = dict(answers[best])
        out["alternatives"] = [
            {"method": a["method"], "predicted": a["predicted"], "size_bytes": a["cost"]["size_bytes"], "rank_sum": r}
            for a, r in zip(answers, ranks, strict=True)
        ]
        return out
