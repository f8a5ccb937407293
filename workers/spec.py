"""The one place where a wire :class:`~bitscout.schemas.JobSpec` becomes search options.

:func:`search_options` gives the :class:`~search.pipeline.SearchOptions` and :func:`data_options`
the :class:`~search.local.DataOptions` of a job, given where its data file lies on this machine
(:mod:`workers.sources` finds it). :func:`notes` lists what a job asks for that this version
does not do, so the runner can say so in the job's log instead of silently dropping it.
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


def search_options(spec: JobSpec, *, method_options: Mapping[str, Mapping[str, Any]] | None = None) -> SearchOptions:
    """The search options of ``spec``: its method options (validated on the wire by the same models
    the methods read; ``method_options`` replaces them when given) and its refinement."""
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
        device_profile=spec.budget.device_profile or DEFAULT_DEVICE_PROFILE,
        method_options={k: dict(v) for k, v in (spec.method_options.as_dict() if method_options is None
                                                else method_options).items()},
        refine=None if spec.refine is None else RefineChoice(points=spec.refine.points, steps=spec.refine.steps),
        tie=None if sp.tie is None else tuple(sp.tie),
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


def data_options(spec: JobSpec, source: str) -> DataOptions:
    """The data options of ``spec`` reading from ``source`` (a local file, folder or dataset name)."""
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
    )


def notes(spec: JobSpec) -> list[str]:
    """What the job asks for that this version does not do (reported as job events)."""
    out = []
    if spec.device.value == "cuda" and spec.resources.gpus == 0:
        out.append("device 'cuda' but resources.gpus is 0: Ray gives the job no GPU, so it will fail to find one")
    return out
