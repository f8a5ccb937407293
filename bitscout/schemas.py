"""Wire schemas of the bitscout service (pydantic v2; no server dependency).

These models are the contract between the service, the SDK and the CLI: the service's OpenAPI
document is generated from them. ``...Spec`` / ``...Create`` / ``...Request`` are what a client
sends (unknown fields are rejected); ``...Read`` are what the service answers (unknown fields are
ignored, so an older SDK can read a newer server).

A precision map on the wire is an object ``{group name: {"bits": int, "symmetric": bool,
"group_size": int | null, "act_bits": int | null}}`` (``group_size`` null: one scale per row;
``act_bits`` null: activations not quantized; the bit-option
grammar is :mod:`bitscout.options`); group names are module names (``bert.encoder.layer.0.attention.self.query``) or sub-layer groups
(``bert.encoder.layer.2/ffn7``). Sizes are in bytes or in megabytes of 10^6 bytes.

Example::

    >>> spec = JobCreate(
    ...     model=ModelSource(path="minilm-bbc"),
    ...     task="sequence_classification",
    ...     data=DataSource(path="bbc.jsonl"),
    ...     methods=["kl"],
    ...     budget=BudgetSpec(max_size_mb=30),
    ... )
    >>> spec.metric.value
    'accuracy'
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from bitscout import options as _options
from bitscout.cli_options import DEFAULTS
from bitscout.methods import LoopOptions, MethodOptionsSpec, activation_problem
from bitscout.methods import Method as Method
from bitscout.rules import selection_problem, text_problems

#: Version of these wire schemas; bumped on any incompatible change.
SCHEMA_VERSION = "1.0"

#: Bit-widths a group may take: 0 prunes, 2-8 integer, 16 half precision, 32 unchanged.
ALLOWED_BITS: tuple[int, ...] = _options.ALLOWED_BITS
#: Bit options one space may list.
MAX_BIT_OPTIONS = 32

_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
_PRINTABLE_RE = re.compile(r"^[\x20-\x7e]+$")


class _Request(BaseModel):
    """Base of what a client sends: unknown fields are refused, and so is every string (values,
    list items and mapping keys, at any depth) that cannot be stored as text
    (:func:`bitscout.rules.text_problem`: a NUL character or a lone surrogate), with its full path."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False, use_enum_values=False)

    @model_validator(mode="before")
    @classmethod
    def _storable_text(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        problems = list(text_problems(data))
        if problems:
            raise ValidationError.from_exception_data(
                cls.__name__,
                [
                    InitErrorDetails(
                        type=PydanticCustomError("text_not_storable", "{problem}", {"problem": problem}),
                        loc=path,
                        input=data,
                    )
                    for path, problem in problems[:20]
                ],
            )
        return data


class _Read(BaseModel):
    model_config = ConfigDict(extra="ignore", from_attributes=True)


def _check_rel_or_abs_path(value: str) -> str:
    if "\x00" in value or any(ord(c) < 32 for c in value):
        raise ValueError("the path contains control characters")
    parts = re.split(r"[\\/]+", value)
    if ".." in parts:
        raise ValueError("the path may not contain '..'")
    return value


# --------------------------------------------------------------------------- enums


class Task(StrEnum):
    """What the model does, which decides how it is loaded and evaluated (which checkpoints are
    searched for which task: :mod:`bitscout.architectures`)."""

    sequence_classification = "sequence_classification"
    token_classification = "token_classification"
    regression = "regression"
    embeddings = "embeddings"
    causal_lm = "causal_lm"


class Metric(StrEnum):
    """The quality metric that orders the front."""

    accuracy = "accuracy"
    kl = "kl"
    cosine = "cosine"
    perplexity = "perplexity"
    mse = "mse"
    pearson = "pearson"


#: Metrics where a higher value is better.
HIGHER_IS_BETTER: dict[Metric, bool] = {
    Metric.accuracy: True,
    Metric.kl: False,
    Metric.cosine: True,
    Metric.perplexity: False,
    Metric.mse: False,
    Metric.pearson: True,
}

#: The metric a job gets when it names none.
DEFAULT_METRIC: dict[Task, Metric] = {
    Task.sequence_classification: Metric.accuracy,
    Task.token_classification: Metric.accuracy,
    Task.regression: Metric.mse,
    Task.embeddings: Metric.cosine,
    Task.causal_lm: Metric.perplexity,
}

#: The metrics each task can measure (accuracy of token classification: over labeled tokens).
TASK_METRICS: dict[Task, tuple[Metric, ...]] = {
    Task.sequence_classification: (Metric.accuracy, Metric.kl),
    Task.token_classification: (Metric.accuracy, Metric.kl),
    Task.regression: (Metric.mse, Metric.pearson),
    Task.embeddings: (Metric.cosine,),
    Task.causal_lm: (Metric.perplexity, Metric.kl),
}


class Device(StrEnum):
    """Where a job's model runs."""

    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"


class JobStatus(StrEnum):
    """Life cycle of a job: queued -> running -> succeeded | failed | canceled (running may go
    back to queued when its worker is lost)."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.canceled)


class ExportState(StrEnum):
    """Life cycle of a point's export into a format it is not stored in: pending -> running ->
    succeeded | failed (running goes back to pending when its worker is lost)."""

    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"


class UploadKind(StrEnum):
    """What an upload holds: a model archive (safetensors weights + config + tokenizer, as .tar,
    .tar.gz or .zip), a data file (JSONL, JSON or CSV) or a latency table (JSON written by
    ``bitscout profile``; name the kind, a ``.json`` file is taken for data otherwise)."""

    model = "model"
    data = "data"
    latency_table = "latency_table"


# --------------------------------------------------------------------------- sources


class ModelSource(_Request):
    """Where the model comes from: exactly one of ``hf_id`` (with a pinned ``revision``), ``path``
    (a directory under the server's model root) or ``upload_id`` (an uploaded archive)."""

    hf_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=96,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$",
        description="A Hugging Face model id, e.g. 'sentence-transformers/all-MiniLM-L6-v2'.",
        examples=["sentence-transformers/all-MiniLM-L6-v2"],
    )
    revision: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{40}$",
        description="The commit hash (40 hex digits) that pins the Hugging Face weights; required with hf_id.",
    )
    path: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="A model directory on the server, relative to (or inside) the server's model root.",
        examples=["minilm-bbc"],
    )
    upload_id: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{32}$",
        description="The id of an uploaded model archive (POST /api/v1/uploads with kind=model).",
    )

    @field_validator("path")
    @classmethod
    def _path_ok(cls, v: str | None) -> str | None:
        return None if v is None else _check_rel_or_abs_path(v)

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        given = [n for n in ("hf_id", "path", "upload_id") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of hf_id, path or upload_id")
        if self.hf_id is not None and self.revision is None:
            raise ValueError("hf_id needs a pinned revision (a 40-hex-digit commit hash)")
        if self.hf_id is None and self.revision is not None:
            raise ValueError("revision only goes with hf_id")
        return self


class DataSource(_Request):
    """The labeled (or plain) text the job calibrates and evaluates on: exactly one of
    ``upload_id`` (an uploaded JSONL/CSV file), ``path`` (a file under the server's data root) or
    ``dataset`` (a ``datasets`` name). Calibration and evaluation rows are disjoint."""

    upload_id: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{32}$", description="The id of an uploaded data file (kind=data)."
    )
    path: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="A JSONL/JSON/CSV file on the server, relative to (or inside) the server's data root.",
    )
    dataset: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$",
        description="A `datasets` name, e.g. 'ag_news'.",
    )
    dataset_config: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=_NAME_RE,
        description="The dataset's configuration name.",
    )
    split: str = Field(
        default="train",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.\[\]:%+-]+$",
        description="Dataset split.",
    )
    text_field: str = Field(
        default=DEFAULTS.text_field, min_length=1, max_length=128,
        description="The column (or JSON key) holding the text.",
    )  # fmt: skip
    label_field: str | None = Field(
        default=DEFAULTS.label_field,
        min_length=1,
        max_length=128,
        description="The column holding the label: a class name or index (sequence classification) or a "
        "number (regression); ignored by other tasks.",
    )
    tokens_field: str = Field(
        default=DEFAULTS.tokens_field, min_length=1, max_length=128,
        description="Token classification: the key holding each row's list of words.",
    )  # fmt: skip
    tags_field: str | None = Field(
        default=DEFAULTS.tags_field, min_length=1, max_length=128,
        description="Token classification: the key holding each row's list of tags, one per word (class names "
        "or indices, -100 for a word not counted); null for unlabeled data.",
    )  # fmt: skip
    calibration_size: int = Field(
        default=DEFAULTS.calibration_size,
        ge=1,
        le=100_000,
        strict=True,
        description="Rows used to measure sensitivities (and fine-tune, when refining).",
    )
    evaluation_size: int = Field(
        default=DEFAULTS.evaluation_size,
        ge=1,
        le=1_000_000,
        strict=True,
        description="Rows used to evaluate candidate maps; disjoint from calibration.",
    )
    max_length: int = Field(
        default=DEFAULTS.max_length, ge=8, le=32_768, strict=True,
        description="Tokens per sequence (longer texts are cut).",
    )  # fmt: skip
    batch_size: int = Field(
        default=DEFAULTS.batch_size, ge=1, le=4096, strict=True,
        description="Sequences per batch when calibrating and evaluating.",
    )  # fmt: skip
    windows: bool = Field(
        default=False, strict=True,
        description="Causal LMs: cut the texts into windows of exactly max_length tokens; calibration_size and "
        "evaluation_size then count windows, taken from disjoint texts.",
    )  # fmt: skip

    @field_validator("path")
    @classmethod
    def _path_ok(cls, v: str | None) -> str | None:
        return None if v is None else _check_rel_or_abs_path(v)

    @model_validator(mode="after")
    def _exactly_one(self) -> DataSource:
        given = [n for n in ("upload_id", "path", "dataset") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of upload_id, path or dataset")
        if self.dataset_config is not None and self.dataset is None:
            raise ValueError("dataset_config only goes with dataset")
        return self


# --------------------------------------------------------------------------- space, budget


_Glob = Annotated[str, Field(min_length=1, max_length=256, description="A glob over module / group names.")]


def _bit_option(value: Any) -> int | str:
    """One entry of ``space.bits``: an integer width, or an option string of :mod:`bitscout.options`
    (``"4a"``, ``"4g128"``), stored in the form :func:`bitscout.options.wire_option` gives."""
    if isinstance(value, str) and value.strip().isdigit():
        raise ValueError(f"a bare bit-width is an integer: write {int(value)}, not {value!r}")
    try:
        return _options.wire_option(value)
    except _options.OptionSyntaxError as exc:
        raise ValueError(str(exc)) from None


_BitOption = Annotated[int | str, BeforeValidator(_bit_option)]


class SearchSpaceSpec(_Request):
    """Which matrices are searched, at what granularity, and the options each may take."""

    bits: list[_BitOption] = Field(
        default_factory=lambda: list(DEFAULTS.bits),
        min_length=1,
        max_length=MAX_BIT_OPTIONS,
        description="Allowed bit options: a width from {0, 2, 3, 4, 5, 6, 8, 16, 32} (0 prunes, 16 keeps half "
        "precision, 32 leaves a group unchanged) or an option string '<bits>[a][g<N>]': 'a' an asymmetric grid, "
        "'g<N>' one scale per N input columns of each row (e.g. '4g128', '4ag128'); plain widths take `symmetric`; "
        "'tt<rank>@<bits>' a tensor-train factorisation with its cores at <bits> (see `tt_ranks`).",
        examples=[[2, 3, 4, 8], ["4g128", 8, "3g64"]],
    )
    symmetric: bool = Field(
        default=True, description="Symmetric integer grids (true) or asymmetric with a zero point (false)."
    )
    granularity: Literal["layer", "group"] = Field(
        default="layer",
        description="'layer': one bit-width per weight matrix; 'group': per attention head and per block of FFN neurons.",
    )
    ffn_block_size: int = Field(
        default=DEFAULTS.ffn_block_size, ge=1, le=65_536, strict=True,
        description="FFN neurons per group at 'group' granularity.",
    )  # fmt: skip
    max_head_fraction: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Largest fraction of a block's heads that may be pruned (no cap if null).",
    )
    max_ffn_fraction: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Largest fraction of a block's FFN groups that may be pruned (no cap if null).",
    )
    keep_one_head: bool = Field(default=True, description="Never prune every head of a block.")
    include: list[_Glob] = Field(
        default_factory=list,
        max_length=256,
        description="Only modules matching one of these globs (all if empty).",
    )
    exclude: list[_Glob] = Field(
        default_factory=list, max_length=256, description="Modules matching these are left out."
    )
    include_head: bool = Field(default=False, description="Also search the task head / lm_head.")
    include_embeddings: bool = Field(default=False, description="Also search the embedding matrices.")
    act_bits: list[int] = Field(
        default_factory=list,
        max_length=len(_options.ACT_BITS),
        description="Activation widths searched with every integer option of `bits` (2-8 integer, 16 half "
        "precision): [8, 16] turns 4 into '4a8' and '4a16' (the input activations of a group's matrices "
        "quantized to that width); options may also name theirs ('4a8'). Empty: weights only.",
        examples=[[8], [8, 16]],
    )
    act_scales: Literal["dynamic", "static"] = Field(
        default="dynamic",
        description="Activation scales: 'dynamic' (per token, at run time) or 'static' (one per matrix input, "
        "calibrated on the calibration rows).",
    )
    tt_ranks: list[Annotated[int, Field(ge=1, le=_options.MAX_TT_RANK, strict=True)]] = Field(
        default_factory=list,
        max_length=16,
        description="Tensor-train ranks: every whole matrix (and the word embedding with `include_embeddings`) may "
        "also be factorised into the cores of a TT-matrix of each rank, its cores at each width of `bits` "
        "(options 'tt<rank>@<bits>'); a rank above every matrix's full TT rank is refused when the job runs.",
        examples=[[8, 16, 32]],
    )
    tie: list[str] | None = Field(
        default=None,
        max_length=len(_options.TIE_KINDS) + len(_options.TIE_ALIASES),
        description="Sibling projections that must take one option because inference engines fuse them: "
        "'qkv' (attention_inputs: the attention's q/k/v projections) and 'gate_up' (ffn_inputs: the FFN's "
        "gate/up projections), found structurally; ['none'] or [] ties nothing; null: the task's default "
        "(both for causal LMs, none otherwise).",
        examples=[["qkv", "gate_up"], ["none"]],
    )

    @field_validator("include")
    @classmethod
    def _include_ok(cls, v: list[str]) -> list[str]:
        problem = selection_problem(v, [])
        if problem is not None:
            raise ValueError(problem[1])
        return v

    @field_validator("exclude")
    @classmethod
    def _exclude_ok(cls, v: list[str], info: ValidationInfo) -> list[str]:
        problem = selection_problem(info.data.get("include") or [], v)
        if problem is not None:
            raise ValueError(problem[1])
        return v

    @field_validator("bits")
    @classmethod
    def _bits_ok(cls, v: list[int | str]) -> list[int | str]:
        if len(set(v)) != len(v):
            raise ValueError("bit options must be unique")
        if all(_options.parse_option(b).bits == 0 for b in v):
            raise ValueError("at least one bit-width other than 0 (pruned) is needed")

        def order(b: int | str) -> tuple[int, int, int, str]:
            f = _options.parse_option(b)
            return (f.bits, f.group_size or 0, f.tt_rank or 0, str(b))

        return sorted(v, key=order)

    @field_validator("act_bits", mode="before")
    @classmethod
    def _act_bits_ok(cls, v: Any) -> Any:
        if isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            try:
                return list(_options.parse_act_bits(v))
            except _options.OptionSyntaxError as exc:
                raise ValueError(str(exc)) from None
        return v

    def searched_bits(self) -> list[int | str]:
        """``bits`` with ``act_bits`` crossed in (:func:`bitscout.options.with_activation_bits`)."""
        return _options.with_activation_bits(self.bits, self.act_bits)
    @field_validator("tt_ranks")
    @classmethod
    def _tt_ranks_ok(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("tensor-train ranks must be unique")
        return sorted(v)

    @field_validator("tie", mode="before")
    @classmethod
    def _tie_ok(cls, v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            try:
                return list(_options.parse_ties(v))
            except _options.OptionSyntaxError as exc:
                raise ValueError(str(exc)) from None
        return v


class DeviceProfileSpec(_Request):
    """A custom roofline device profile: peak memory bandwidth and dense throughput per compute
    class (every figure positive and finite; :data:`bitscout.latency.DEVICE_PROFILE_FIELDS`)."""

    name: str = Field(default="custom", min_length=1, max_length=64, pattern=_NAME_RE, description="Its name.")
    description: str = Field(default="", max_length=256, description="What it is.")
    memory_bandwidth_gbs: float = Field(gt=0, le=1e9, allow_inf_nan=False, description="Peak memory bandwidth in GB/s.")
    int8_tops: float = Field(gt=0, le=1e9, allow_inf_nan=False, description="Dense int8 throughput in TOPS.")
    int4_tops: float = Field(
        gt=0, le=1e9, allow_inf_nan=False, description="Dense int4 throughput in TOPS (the int8 figure without a faster int4 path)."
    )
    fp16_tflops: float = Field(gt=0, le=1e9, allow_inf_nan=False, description="Dense fp16 throughput in TFLOPS.")
    fp32_tflops: float = Field(gt=0, le=1e9, allow_inf_nan=False, description="Dense fp32 throughput in TFLOPS.")


def _profile_kind(value: Any) -> str:
    return "profile[custom]" if isinstance(value, dict | DeviceProfileSpec) else "profile[name]"


# a name or a custom profile's figures; the tags hold brackets, so a bad figure is named as
# budget.device_profile.int8_tops (service.errors drops such tags from the field's path)
_DeviceProfile = Annotated[
    Annotated[Annotated[str, Field(min_length=1, max_length=64, pattern=_NAME_RE)], Tag("profile[name]")]
    | Annotated[DeviceProfileSpec, Tag("profile[custom]")],
    Discriminator(_profile_kind),
]


class BudgetSpec(_Request):
    """Limits on the cost of a precision map; at least one is required. Any combination may be set."""

    max_size_mb: float | None = Field(
        default=None,
        gt=0,
        le=1e7,
        allow_inf_nan=False,
        description="Largest size of the whole model in megabytes (10^6 bytes).",
    )
    max_avg_bits: float | None = Field(
        default=None,
        gt=0,
        le=32,
        allow_inf_nan=False,
        description="Largest average bits per weight inside the search space.",
    )
    max_bops: float | None = Field(
        default=None,
        gt=0,
        le=1e24,
        allow_inf_nan=False,
        description="Largest bit operations for one sequence.",
    )
    max_latency_ms: float | None = Field(
        default=None,
        gt=0,
        le=1e7,
        allow_inf_nan=False,
        description="Largest modelled latency in milliseconds under device_profile.",
    )
    device_profile: _DeviceProfile | None = (
        Field(
            default=None,
            description="The device latency is modelled on: a named profile (a100, h100, rtx4090, cpu-avx512, "
            "jetson-orin), or a custom one's figures; the server's default if null.",
            examples=["a100", {"name": "edge", "memory_bandwidth_gbs": 100, "int8_tops": 20, "int4_tops": 40,
                               "fp16_tflops": 10, "fp32_tflops": 2}],
        )
    )
    latency_table: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{32}$",
        description="The id of an uploaded latency table (POST /api/v1/uploads with kind=latency_table, written "
        "by `bitscout profile`): latency from its measured times instead of device_profile's roofline.",
    )

    @model_validator(mode="after")
    def _one_limit(self) -> BudgetSpec:
        if not self.limits():
            raise ValueError("set at least one of max_size_mb, max_avg_bits, max_bops, max_latency_ms")
        return self

    def limits(self) -> dict[str, float]:
        """The set limits, keyed by field name."""
        out: dict[str, float] = {}
        for name in ("max_size_mb", "max_avg_bits", "max_bops", "max_latency_ms"):
            value = getattr(self, name)
            if value is not None:
                out[name] = float(value)
        return out


class RefineSpec(_Request):
    """Fine-tune chosen points after the search (knowledge distillation with learned step sizes)."""

    points: Literal["recommended"] | Annotated[int, Field(ge=1, le=64, strict=True)] = Field(
        default="recommended",
        description="'recommended' or the number of best front points (top-k) that meet the budget to refine.",
    )
    steps: int = Field(
        default=DEFAULTS.refine_steps, ge=1, le=100_000, strict=True, description="Optimizer steps per refined point."
    )


class ResourceSpec(_Request):
    """What one job may use on the cluster."""

    cpus: float = Field(default=1.0, ge=0.25, le=512, allow_inf_nan=False, description="CPU cores.")
    gpus: float = Field(
        default=0.0, ge=0.0, le=64, allow_inf_nan=False, description="GPUs (fractions allowed)."
    )


# --------------------------------------------------------------------------- jobs


class JobSpec(_Request):
    """What a user asks for: a search of ``model`` on ``data`` with ``methods`` under ``budget``."""

    model: ModelSource = Field(description="The model to search.")
    task: Task = Field(description="What the model does.")
    data: DataSource = Field(description="Calibration and evaluation data.")
    methods: list[Method] = Field(
        min_length=1,
        max_length=len(Method),
        description="Search methods (unique); several give one combined front.",
    )
    space: SearchSpaceSpec = Field(default_factory=SearchSpaceSpec, description="The search space.")
    budget: BudgetSpec = Field(description="The budget the recommended point must meet.")
    metric: Metric | None = Field(
        default=None,
        description="Quality metric (default: accuracy for sequence and token classification, mse for "
        "regression, cosine for embeddings, perplexity for causal LMs). Filled in by the server.",
    )
    seed: int = Field(
        default=DEFAULTS.seed, ge=0, le=2**31 - 1, strict=True, description="Random seed (data split, probes, search)."
    )
    front_points: int = Field(
        default=DEFAULTS.front_points, ge=4, le=64, strict=True, description="Budgets in the sweep that traces the front."
    )
    device: Device = Field(default=Device.auto, description="Where the model runs.")
    resources: ResourceSpec = Field(
        default_factory=ResourceSpec, description="Cluster resources for the job."
    )
    refine: RefineSpec | None = Field(default=None, description="Fine-tune chosen points after the search.")
    method_options: MethodOptionsSpec = Field(
        default_factory=MethodOptionsSpec,
        description=(
            "Per-method settings, keyed by a method of `methods`, e.g. "
            '{"hessian": {"tolerance": 0.1, "max_probes": 48}} or {"dnas": {"steps": 100}}; '
            "each method's options are listed in its schema (unknown names are refused)."
        ),
    )
    loop: LoopOptions = Field(
        default_factory=LoopOptions,
        description=(
            "The closed loop after every score's first allocation: maps measured on the calibration "
            'rows, the scores corrected, a local search and the uniform guard; {"enabled": false} '
            "keeps the first allocation only."
        ),
    )

    @field_validator("methods")
    @classmethod
    def _unique_methods(cls, v: list[Method]) -> list[Method]:
        if len(set(v)) != len(v):
            raise ValueError("methods must be unique")
        return v

    @model_validator(mode="after")
    def _method_options_name_run_methods(self) -> JobSpec:
        extra = [m for m in self.method_options if m not in self.methods]
        if extra:
            raise ValueError(f"method_options names methods the job does not run: {', '.join(extra)}")
        return self

    @model_validator(mode="after")
    def _methods_score_activations(self) -> JobSpec:
        problem = activation_problem(self.methods, self.space.searched_bits())
        if problem is not None:
            raise ValidationError.from_exception_data(
                type(self).__name__,
                [InitErrorDetails(type=PydanticCustomError("value_error", "{problem}", {"problem": problem}),
                                  loc=("methods",), input=[m.value for m in self.methods])],
            )
        return self

    @model_validator(mode="after")
    def _metric_fits_task(self) -> JobSpec:
        if self.metric is None:
            self.metric = DEFAULT_METRIC[self.task]
        elif self.metric not in TASK_METRICS[self.task]:
            allowed = ", ".join(m.value for m in TASK_METRICS[self.task])
            raise ValueError(
                f"metric {self.metric.value!r} does not fit task {self.task.value!r} (allowed: {allowed})"
            )
        return self

    @property
    def higher_is_better(self) -> bool:
        return HIGHER_IS_BETTER[self.metric or DEFAULT_METRIC[self.task]]


class JobCreate(JobSpec):
    """A job submission: the spec plus an optional idempotency key (the same key from the same
    user returns the same job instead of a new one)."""

    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=r"^[\x21-\x7e]+$",
        description="Client-chosen key (printable ASCII, no spaces); resubmitting with it returns the first job.",
    )

    def spec(self) -> JobSpec:
        """The job spec without the idempotency key."""
        return JobSpec.model_validate(self.model_dump(exclude={"idempotency_key"}))


class JobRead(_Read):
    """A job as the service reports it."""

    id: str = Field(max_length=64, description="The job's id.")
    status: JobStatus = Field(description="Where the job is in its life cycle.")
    spec: JobSpec = Field(description="What was asked (with defaults filled in).")
    progress: float = Field(ge=0.0, le=1.0, description="Fraction done, 0 to 1.")
    stage: str | None = Field(
        default=None, max_length=128, description="The current stage, e.g. 'sensitivity'."
    )
    message: str | None = Field(default=None, max_length=2000, description="The latest progress message.")
    created_at: datetime = Field(description="When the job was submitted (UTC).")
    started_at: datetime | None = Field(default=None, description="When a worker last started it.")
    finished_at: datetime | None = Field(default=None, description="When it ended.")
    updated_at: datetime = Field(description="When anything about the job last changed.")
    heartbeat_at: datetime | None = Field(default=None, description="The running worker's last heartbeat.")
    attempts: int = Field(ge=0, description="How many times a worker has started it.")
    error_code: str | None = Field(default=None, description="Why it failed (an ErrorCode value).")
    error_message: str | None = Field(
        default=None, max_length=4000, description="What went wrong, for a person."
    )
    cancel_requested: bool = Field(default=False, description="A cancel was asked for and not yet acted on.")
    n_points: int = Field(default=0, ge=0, description="Points stored for the job.")
    recommended_point: int | None = Field(
        default=None, ge=0, description="Id of the recommended point, once finished."
    )
    owner: str | None = Field(default=None, description="The user who submitted it.")


class JobList(_Read):
    """One page of jobs, newest first."""

    items: list[JobRead] = Field(description="The jobs on this page.")
    total: int = Field(ge=0, description="Jobs matching the filter.")
    limit: int = Field(ge=1, description="Page size asked for.")
    offset: int = Field(ge=0, description="Jobs skipped.")
    next_offset: int | None = Field(
        default=None, ge=0, description="Offset of the next page, null on the last."
    )


class CostRead(_Read):
    """The cost of a precision map."""

    size_bytes: float = Field(ge=0, description="Size of the whole model in bytes.")
    size_mb: float = Field(ge=0, description="Size in megabytes (10^6 bytes).")
    avg_bits: float = Field(ge=0, description="Average bits per weight inside the search space.")
    bops: float = Field(ge=0, description="Bit operations for one sequence.")
    latency_ms: float = Field(ge=0, description="Modelled latency in milliseconds.")


class BitOptionRead(_Read):
    """One group's choice: bits (0 pruned, 2-8 integer, 16 half, 32 unchanged), grid symmetry, the
    input columns that share one scale (null: one scale per row), the width its input activations
    are quantized to (null: not quantized) and the tensor-train rank (null: the matrix itself; else
    its TT-matrix cores at that rank take the bits). Every field is always named."""

    bits: int = Field(description="Bit-width.")
    symmetric: bool = Field(default=True, description="Symmetric integer grid.")
    group_size: int | None = Field(
        default=None,
        ge=1,
        description="Input columns per scale (group-wise scales); null: one scale per row.",
    )
    act_bits: int | None = Field(
        default=None,
        description="Bits of the group's input activations (2-8 integer, 16 half precision); null: not quantized.",
    )
    tt_rank: int | None = Field(
        default=None,
        ge=1,
        description="Tensor-train rank of the matrix's TT-matrix cores, which take `bits`; null: no factorisation.",
    )

    def key(self) -> str:
        """The option's canonical key (``"4"``, ``"4a"``, ``"4g128"``, ``"4a8"``, ``"tt16@4"``), as in
        sensitivity tables."""
        return _options.option_key(self.bits, self.symmetric, self.group_size, self.act_bits, self.tt_rank)



class PointProvenance(_Read):
    """How a point was found (``search.result.ParetoPoint.provenance``)."""

    score: str | None = Field(
        default=None, description="The scores it was allocated from: kl, hessian, fisher, or 'dnas start'."
    )
    round: int | None = Field(
        default=None, description="0: the first allocation; n: the closed loop's correction round n."
    )
    local_search: bool = Field(default=False, description="Found by the closed loop's local search.")
    guard: bool = Field(
        default=False, description="A uniform map that replaced maps measuring worse on the calibration rows."
    )
    reference: bool = Field(default=False, description="A uniform reference map.")
    how: str | None = Field(default=None, description="A short account, e.g. 'budget', 'dense', 'local from uniform 4-bit'.")
    proxy: float | None = Field(
        default=None, description="Its measured discrepancy to full precision on the calibration rows."
    )


class ParetoPointRead(_Read):
    """An evaluated precision map."""

    id: int = Field(ge=0, description="The point's id within its job (its index).")
    method: str = Field(description="How it was found: kl, hessian, fisher, dnas, nsga2, or uniform (a baseline).")
    label: str = Field(default="", description="A short name, e.g. 'uniform 4-bit'.")
    precision_map: dict[str, BitOptionRead] = Field(description="Group name -> chosen option.")
    cost: CostRead = Field(description="What the map costs.")
    metrics: dict[str, float | None] = Field(
        description="Measured metrics, e.g. {'accuracy': 0.95, 'kl': 0.01}; null where not finite (e.g. perplexity overflow)."
    )
    refined: bool = Field(default=False, description="Fine-tuned after the search.")
    refined_from: int | None = Field(default=None, description="Id of the point it was refined from.")
    on_front: bool = Field(default=True, description="On the combined Pareto front.")
    meets_budget: bool = Field(default=False, description="Meets the job's budget.")
    recommended: bool = Field(default=False, description="The job's recommended point.")
    predicted: float | None = Field(
        default=None, description="The summed sensitivity the allocator minimised."
    )
    artifact_available: bool = Field(
        default=False, description="A native artifact is stored (refined points, points exported before)."
    )
    artifact_formats: list[str] = Field(
        default_factory=list,
        description="Formats the point is stored in now; any other format is exported on its first download.",
    )
    provenance: PointProvenance | None = Field(
        default=None, description="How it was found (null: not recorded)."
    )


class ParetoRead(_Read):
    """A job's points and how to read them."""

    job_id: str = Field(description="The job.")
    metric: str | None = Field(default=None, description="The quality metric.")
    higher_is_better: bool = Field(default=True, description="Direction of the metric.")
    baseline_metrics: dict[str, float | None] = Field(
        default_factory=dict, description="Metrics of the unquantized model."
    )
    budget: BudgetSpec | None = Field(default=None, description="The job's budget.")
    points: list[ParetoPointRead] = Field(description="Every stored point (front and baselines).")
    recommended: int | None = Field(default=None, description="Id of the recommended point.")


class SensitivityRead(_Read):
    """A sensitivity table: a score per (group, option) and how it was obtained."""

    method: str = Field(description="kl, hessian or fisher.")
    samples: int = Field(default=0, ge=0, description="Calibration sequences (or probes) used.")
    scores: dict[str, dict[str, float | None]] = Field(
        description="scores[group][option key] (option keys: '4', '4a', '4g128', '0')."
    )
    errors: dict[str, float | None] = Field(
        default_factory=dict, description="Standard error per group, where known."
    )
    extra: dict[str, Any] = Field(
        default_factory=dict, description="Method-specific extras (e.g. Hessian traces)."
    )
    created_at: datetime = Field(description="When it was stored.")


class JobEventRead(_Read):
    """One entry of a job's log."""

    id: int = Field(ge=0, description="Increasing event id (use as ?after= to page).")
    at: datetime = Field(description="When it happened (UTC).")
    kind: str = Field(
        description="created, claimed, stage, message, requeued, cancel_requested, canceled, succeeded, failed..."
    )
    stage: str | None = Field(default=None, description="The stage at the time.")
    message: str | None = Field(default=None, description="What happened.")
    data: dict[str, Any] | None = Field(default=None, description="Machine-readable facts.")


class ResolveRequest(_Request):
    """Ask for the best map under a new budget, from the stored sensitivities (no model run)."""

    budget: BudgetSpec = Field(description="The new budget.")
    methods: list[Method] | None = Field(
        default=None,
        min_length=1,
        max_length=len(Method),
        description="Sensitivity tables to use (all the job's tables if null).",
    )


class ResolveRead(_Read):
    """The answer to a resolve request: a map, its cost, and how good the allocation is."""

    precision_map: dict[str, BitOptionRead] = Field(description="Group name -> chosen option.")
    cost: CostRead = Field(description="What the map costs.")
    predicted: float | None = Field(default=None, description="The summed sensitivity (lower is better).")
    exact: bool = Field(
        default=False, description="The allocation is proven optimal for the predicted objective."
    )
    gap: float | None = Field(
        default=None, ge=0, description="Bound on the distance from optimal, when not exact."
    )
    budget: BudgetSpec = Field(description="The budget it answers.")


class ExportRead(_Read):
    """A point's export into a format it is not stored in yet: the body of a download's 202 answer."""

    job_id: str = Field(description="The job.")
    point_id: int = Field(ge=0, description="The point.")
    format: str = Field(description="The format asked for (native, compressed-tensors, dense).")
    state: ExportState = Field(description="pending (queued), running, succeeded or failed.")
    attempts: int = Field(default=0, ge=0, description="Workers that started it (one unless a worker was lost).")
    message: str = Field(default="", description="What is happening, for a person.")
    retry_after_s: float | None = Field(default=None, ge=0, description="When to ask again (also Retry-After).")
    error_code: str | None = Field(default=None, description="Why it failed (state failed).")
    error_message: str | None = Field(default=None, description="What failed (state failed).")
    created_at: datetime | None = Field(default=None, description="When it was first asked for.")
    updated_at: datetime | None = Field(default=None, description="Its last change.")


class UploadRead(_Read):
    """A stored upload."""

    id: str = Field(description="The upload's id (use as upload_id).")
    filename: str = Field(description="The client's file name (base name only).")
    size: int = Field(ge=0, description="Bytes.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the content.")
    kind: UploadKind = Field(description="model or data.")
    created_at: datetime | None = Field(default=None, description="When it was uploaded.")
