"""The one place where a wire :class:`~bitscout.schemas.JobSpec` becomes search options, and the
search library's field names become the spec's again.

:func:`search_options` gives the :class:`~search.pipeline.SearchOptions` and :func:`data_options`
the :class:`~search.local.DataOptions` of a job, given where its data file lies on this machine
(:mod:`workers.sources` finds it). :func:`notes` lists what a job asks for that this version
does not do, so the runner can say so in the job's log instead of silently dropping it.
:data:`WIRE_FIELDS` and :func:`wire_field` map the ``field`` of a search error (``include``,
``text_field``, ``source``) to the job spec's path the user wrote (``space.include``,
``data.text_field``, ``data.upload_id``), so a failed job names its input as the API does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bitscout.cli_options import DEFAULTS
from bitscout.schemas import JobSpec, Task
from search.errors import DataError
from search.local import DataOptions
from search.pipeline import RefineChoice, SearchOptions
from search.result import Budget
from search.space import PruneLimits

#: what the search costs latency on when the budget names no device profile
DEFAULT_DEVICE_PROFILE = DEFAULTS.device_profile


def budget_of(spec: JobSpec) -> Budget:
    b = spec.budget
    return Budget(
        max_size_mb=b.max_size_mb, max_avg_bits=b.max_avg_bits, max_bops=b.max_bops, max_latency_ms=b.max_latency_ms
    )


def device_profile_of(spec: JobSpec) -> str | dict[str, Any]:
    """The budget's device profile: a name, or a custom profile's figures."""
    p = spec.budget.device_profile
    if p is None:
        return DEFAULT_DEVICE_PROFILE
    return p if isinstance(p, str) else p.model_dump()


def search_options(
    spec: JobSpec,
    *,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    latency_table: Mapping[str, Any] | None = None,
) -> SearchOptions:
    """The search options of ``spec``: its method options (validated on the wire by the same models
    the methods read; ``method_options`` replaces them when given), its refinement, and the latency
    table its ``budget.latency_table`` names (read from the upload by the runner)."""
    sp = spec.space
    limits = PruneLimits(
        max_head_fraction=sp.max_head_fraction, max_ffn_fraction=sp.max_ffn_fraction, keep_one_head=sp.keep_one_head
    )
    return SearchOptions(
        methods=tuple(m.value for m in spec.methods),
        granularity=sp.granularity,
        bits=tuple(sp.bits),
        symmetric=sp.symmetric,
        ffn_block_size=sp.ffn_block_size,
        prune_limits=limits,
        include=tuple(sp.include) or None,
        exclude=tuple(sp.exclude) or None,
        include_head=sp.include_head,
        include_embeddings=sp.include_embeddings,
        budget=budget_of(spec),
        front_points=spec.front_points,
        metric=spec.metric.value if spec.metric is not None else None,
        seed=spec.seed,
        seq_len=spec.data.max_length,
        device_profile=device_profile_of(spec),
        latency_table=latency_table,
        activation_bits=tuple(sp.act_bits),
        act_scales=sp.act_scales,
        method_options={k: dict(v) for k, v in (spec.method_options.as_dict() if method_options is None
                                                else method_options).items()},
        refine=None if spec.refine is None else RefineChoice(points=spec.refine.points, steps=spec.refine.steps),
        tie=None if sp.tie is None else tuple(sp.tie),
        tt_ranks=tuple(sp.tt_ranks),
        loop=spec.loop,
    )


def data_source_name(spec: JobSpec) -> str | None:
    """The ``datasets`` source string of a job that names a dataset (``name:split``), else None."""
    d = spec.data
    if d.dataset is None:
        return None
    if d.dataset_config is not None:
        raise DataError(
            f"dataset configurations ({d.dataset_config!r}) are not supported yet; upload the data as a "
            "JSONL or CSV file instead",
            field="data.dataset_config",
        )
    return f"{d.dataset}:{d.split}" if d.split else d.dataset


def data_options(spec: JobSpec, source: str, *, name: str | None = None) -> DataOptions:
    """The data options of ``spec`` reading from ``source`` (a local file, folder or dataset name);
    ``name`` is what messages call it (the user's name for it: :func:`workers.sources.data_name`)."""
    d = spec.data
    label = d.label_field if spec.task in (Task.sequence_classification, Task.regression) else None
    return DataOptions(
        source=source,
        text_field=d.text_field,
        label_field=label,
        tokens_field=d.tokens_field,
        tags_field=d.tags_field,
        calibration=d.calibration_size,
        evaluation=d.evaluation_size,
        max_length=d.max_length,
        batch_size=d.batch_size,
        name=name,
        windows=d.windows,
    )


def notes(spec: JobSpec) -> list[str]:
    """What the job asks for that this version does not do (reported as job events)."""
    out = []
    if spec.device.value == "cuda" and spec.resources.gpus == 0:
        out.append("device 'cuda' but resources.gpus is 0: Ray gives the job no GPU, so it will fail to find one")
    return out


#: The search library's field names (of :class:`search.errors.SearchError`) -> the job spec's paths.
#: ``source`` and ``model`` depend on the job's source: :func:`wire_field`.
WIRE_FIELDS: dict[str, str] = {
    "include": "space.include",
    "exclude": "space.exclude",
    "bits": "space.bits",
    "tt_rank": "space.tt_ranks",
    "granularity": "space.granularity",
    "ffn_block_size": "space.ffn_block_size",
    "include_head": "space.include_head",
    "include_embeddings": "space.include_embeddings",
    "text_field": "data.text_field",
    "label_field": "data.label_field",
    "calibration": "data.calibration_size",
    "calibration_size": "data.calibration_size",
    "evaluation": "data.evaluation_size",
    "evaluation_size": "data.evaluation_size",
    "max_length": "data.max_length",
    "max_size_mb": "budget.max_size_mb",
    "max_avg_bits": "budget.max_avg_bits",
    "max_bops": "budget.max_bops",
    "max_latency_ms": "budget.max_latency_ms",
    "device_profile": "budget.device_profile",
    "latency_table": "budget.latency_table",
    "act_bits": "space.act_bits",
}

#: Fields that are the spec's own paths already (the runner's and the wire's).
_WIRE_ROOTS = tuple(f"{name}." for name in JobSpec.model_fields)


def wire_field(spec: JobSpec, field: str | None) -> str | None:
    """The job spec's path of a search error's ``field`` (None stays None; a name the table does not
    know is returned as it is)."""
    if field is None or field.startswith(_WIRE_ROOTS):
        return field
    if field == "source":
        d = spec.data
        return "data.upload_id" if d.upload_id is not None else "data.path" if d.path is not None else "data.dataset"
    if field == "model":
        m = spec.model
        return "model.upload_id" if m.upload_id is not None else "model.path" if m.path is not None else "model.hf_id"
    return WIRE_FIELDS.get(field, field)
