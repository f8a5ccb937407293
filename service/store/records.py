"""The store's own value types: what workers hand to it and get from it besides the wire models.

* :class:`JobRecord` — a job as the workers see it (:class:`~bitscout.schemas.JobRead` plus who
  claimed it); :class:`JobNotOwned` — the error a worker gets once the job is no longer its own.
* :class:`ExportTask` — a point's export a worker claimed; :class:`ExportNotOwned` — the error it gets
  once the export is no longer its own.
* :class:`PointRecord` (with :class:`PointOption` and :class:`PointCost`) — one evaluated point of a
  finished search, as :meth:`~service.store.Store.finish_job` takes it; :class:`FrontInfo` — the facts
  about the whole front stored with it.

These models are the boundary of ``finish_job``: a mapping in the same shape is validated into
them (:func:`point_records`, :func:`front_info_of`), and a malformed one raises
:class:`~bitscout.errors.InvalidRequest` whose ``field`` is the dotted path of the bad value
(``points.3.cost.avg_bits``) before anything is written. Values are normalised the way the rows
store them: a precision-map entry becomes ``{bits, symmetric}`` (and ``group_size`` when set),
non-finite metrics and predictions become None, and non-finite costs 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bitscout import options as bit_options
from bitscout.errors import Conflict, InvalidRequest
from bitscout.schemas import JobRead
from service.store._json import finite

__all__ = [
    "ExportNotOwned",
    "ExportTask",
    "FrontInfo",
    "JobNotOwned",
    "JobRecord",
    "PointCost",
    "PointOption",
    "PointRecord",
    "front_info_of",
    "point_records",
]


class JobNotOwned(Conflict):
    """The worker calling no longer owns the job (it was re-queued, claimed by another worker,
    canceled or finished): the caller must stop working on it and write nothing more."""


class ExportNotOwned(JobNotOwned):
    """The worker calling no longer holds the export it was running (it went back to pending after
    its worker was taken for lost, and may run elsewhere): it must store nothing."""


class ExportTask(BaseModel):
    """An export a worker claimed: which point of which job, in which format, under which claim."""

    job_id: str
    point_id: int
    format: str
    worker_id: str
    attempts: int


class JobRecord(JobRead):
    """A job as the workers see it: :class:`JobRead` plus who claimed it."""

    claimed_by: str | None = None
    idempotency_key: str | None = None


def _as_dict(value: Any) -> Any:
    """Objects with ``to_dict`` (the search library's ``PrecisionMap``, ``Cost``) as their dicts."""
    return value.to_dict() if hasattr(value, "to_dict") else value


class PointOption(BaseModel):
    """One precision-map entry: a bit-width, whether its integer grid is symmetric, and the input
    columns per scale (None: one scale per row), and the activation width (None: activations not
    quantized).

    Accepts ``{"bits": 4, "symmetric": False, "group_size": 128, "act_bits": 8}``, ``4``, ``"4"``,
    ``"4a"`` (asymmetric), ``"4s"``, ``"4g128"`` or ``"4a8"`` (the grammar of :mod:`bitscout.options`).
    """

    model_config = ConfigDict(extra="ignore")

    bits: int
    symmetric: bool = True
    group_size: int | None = None
    act_bits: int | None = None
    tt_rank: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return value
        try:
            fields = bit_options.parse_option(value)
            bits, symmetric, group_size, act_bits = fields.resolved()
        except bit_options.OptionSyntaxError as exc:
            raise ValueError(f"bad bit option {value!r}: {exc}") from None
        return {
            "bits": bits,
            "symmetric": symmetric,
            "group_size": group_size,
            "act_bits": act_bits,
            "tt_rank": fields.tt_rank,
        }


class PointCost(BaseModel):
    """What a point's map costs (``search.result.Cost.to_dict()``): ``size_bytes`` (or ``size_mb``),
    ``avg_bits``, ``bops`` and ``latency_ms``. A non-finite value is stored as 0."""

    model_config = ConfigDict(extra="ignore")

    size_bytes: float = Field(ge=0)
    avg_bits: float = Field(ge=0)
    bops: float = Field(ge=0)
    latency_ms: float = Field(ge=0)

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        value = _as_dict(value)
        if not isinstance(value, Mapping):
            return value
        cost = dict(value)
        if "size_bytes" not in cost and "size_mb" in cost:
            mb = finite(cost["size_mb"])
            cost["size_bytes"] = cost["size_mb"] if mb is None else mb * 1e6
        return cost

    @field_validator("size_bytes", "avg_bits", "bops", "latency_ms", mode="before")
    @classmethod
    def _finite_or_zero(cls, value: Any) -> Any:
        if isinstance(value, float | int) and not isinstance(value, bool) and finite(value) is None:
            return 0.0
        return value


#: Keys a point may carry that are neither stored nor kept in its ``extra``.
IGNORED_POINT_KEYS = frozenset({"id", "index", "recommended"})


class PointRecord(BaseModel):
    """One evaluated point of a finished search, as the runner hands it to ``finish_job``.

    The fields of ``search.result.ParetoPoint.to_dict()`` (``precision_map``, ``cost``,
    ``metrics``, ``method``, ``refined``, ``label``, ``predicted``, ``budget``) plus what the
    front says about it: ``on_front`` (default True), ``meets_budget`` (None: computed from the
    job's budget) and ``refined_from`` (index of another point of the same result). Any other key
    is kept in the stored row's ``extra``; ``id``, ``index`` and ``recommended`` are dropped (a
    point's id is its index in the result; the recommended point is in :class:`FrontInfo`).
    """

    model_config = ConfigDict(extra="allow")

    precision_map: dict[str, PointOption]
    cost: PointCost
    metrics: dict[str, float | None] = Field(default_factory=dict)
    method: str = "unknown"
    refined: bool = False
    label: str = ""
    predicted: float | None = None
    budget: dict[str, Any] | None = None
    on_front: bool = True
    meets_budget: bool | None = None
    refined_from: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _drop_ignored(cls, value: Any) -> Any:
        if isinstance(value, Mapping) and IGNORED_POINT_KEYS.intersection(value):
            return {k: v for k, v in value.items() if k not in IGNORED_POINT_KEYS}
        return value

    @field_validator("precision_map", mode="before")
    @classmethod
    def _pmap(cls, value: Any) -> Any:
        value = _as_dict(value)
        return {str(k): v for k, v in value.items()} if isinstance(value, Mapping) else value

    @field_validator("metrics", mode="before")
    @classmethod
    def _metrics(cls, value: Any) -> Any:
        if value is None:
            return {}
        return {str(k): finite(v) for k, v in value.items()} if isinstance(value, Mapping) else value

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, value: Any) -> Any:
        return str(value or "unknown")[:32]

    @field_validator("label", mode="before")
    @classmethod
    def _label(cls, value: Any) -> Any:
        return str(value or "")

    @field_validator("predicted", mode="before")
    @classmethod
    def _predicted(cls, value: Any) -> Any:
        return finite(value)

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, value: Any) -> Any:
        return value or None


class FrontInfo(BaseModel):
    """What ``finish_job`` stores about the whole front (read back by ``get_result_info``).

    ``metric`` and ``higher_is_better`` default to the job's metric and its direction;
    ``baseline_metrics`` are the unquantized model's; ``recommended`` is a point index (None: the
    best point by the metric that meets the budget). Anything else (``timings``, ``versions``,
    ``methods``, ``space_key``, ``evaluation``, ``orchestration``, ...) is kept as given.
    """

    model_config = ConfigDict(extra="allow")

    metric: str | None = None
    higher_is_better: bool | None = None
    baseline_metrics: dict[str, float | None] = Field(default_factory=dict)
    recommended: int | None = None

    @field_validator("baseline_metrics", mode="before")
    @classmethod
    def _baseline(cls, value: Any) -> Any:
        if value is None:
            return {}
        return {str(k): finite(v) for k, v in value.items()} if isinstance(value, Mapping) else value


def _field_of(prefix: str, exc: ValidationError) -> tuple[str, str]:
    """``(dotted field, message)`` of a validation error's first problem, under ``prefix``."""
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if not any(c in str(p) for c in "[(")]
    msg = str(first.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return ".".join([prefix, *loc]), msg


def point_records(points: Sequence[PointRecord | Mapping[str, Any]]) -> list[PointRecord]:
    """``points`` as :class:`PointRecord` s; raises ``InvalidRequest`` naming the first bad field."""
    out: list[PointRecord] = []
    for i, p in enumerate(points):
        if isinstance(p, PointRecord):
            out.append(p)
            continue
        try:
            out.append(PointRecord.model_validate(p))
        except ValidationError as exc:
            field, msg = _field_of(f"points.{i}", exc)
            raise InvalidRequest(f"point {i} is malformed: {field}: {msg}", field=field) from None
    return out


def front_info_of(front_info: FrontInfo | Mapping[str, Any] | None) -> FrontInfo:
    """``front_info`` as a :class:`FrontInfo`; raises ``InvalidRequest`` naming the bad field."""
    if isinstance(front_info, FrontInfo):
        return front_info
    try:
        return FrontInfo.model_validate(dict(front_info or {}))
    except ValidationError as exc:
        field, msg = _field_of("front_info", exc)
        raise InvalidRequest(f"front_info is malformed: {field}: {msg}", field=field) from None
