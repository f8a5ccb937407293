"""The live search over one loaded model: :class:`SearchOptions` (what to search) and
:class:`Search` (the model, its calibration and evaluation batches, the adapter, the space and the
cost model, and one method per stage).

Everything that can be checked without running the model (options, each method's options, space,
budget feasibility) is checked in the constructor, before any long computation. The stages are
called in order by the one orchestration, :func:`search.orchestration.run_search` (what
:meth:`Search.run` does in-process and the job runner does on Ray); the maps between a table and an
evaluation come from the torch-free planning core, :mod:`search.plan`.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from bitscout import options as options_grammar
from bitscout.methods import LoopOptions, activation_problem
from bitscout.rules import selection_problem
from search import methods
from search.actquant import ACT_SCALES, StaticScales
from search.adapter import ModelAdapter, WeightCache
from search.cost import CostModel, LatencyTable, get_profile
from search.data import TokenizedBatch
from search.errors import InvalidInputError
from search.pareto import front as pareto_front
from search.plan import (
    UNIFORM_BASELINES,
    Candidate,
    candidates_from_table,
    check_budget,
    recommended_index,
    uniform_candidates,
)
from search.result import Budget, ParetoPoint, SearchResult, SensitivityTable
from search.sensitivity import ProgressFn, SensitivityContext, StopFn
from search.space import BitOption, Granularity, PrecisionMap, PruneLimits, space_to_dict
from search.tasks import (
    Reference,
    Task,
    check_metric,
    check_task,
    evaluate,
    higher_is_better,
    model_output,
    reference_outputs,
)

#: the ties of a causal LM's search unless its options say otherwise (inference engines fuse them)
DEFAULT_TIES: tuple[str, ...] = ("attention_inputs", "ffn_inputs")


@dataclass(frozen=True)
class RefineChoice:
    """Which points to fine-tune after the search and for how long: ``points`` is
    ``"recommended"`` (the recommended point) or ``k`` (the ``k`` best front points that meet the
    budget); ``steps`` optimizer steps per point (:func:`search.orchestration.refine_points`)."""

    points: Literal["recommended"] | int = "recommended"
    steps: int = 200

    def __post_init__(self) -> None:
        if self.points != "recommended" and (
            isinstance(self.points, bool) or not isinstance(self.points, int) or self.points < 1
        ):
            raise InvalidInputError("refine points must be 'recommended' or a positive integer", field="refine.points")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise InvalidInputError("refine steps must be a positive integer", field="refine.steps")


@dataclass(frozen=True)
class SearchOptions:
    """What to search: methods, space, budget, metric, and how (see ``search --help``).

    ``method_options`` gives a method its options (e.g. ``{"hessian": {"tolerance": 0.05}}``; each
    method's model in :mod:`bitscout.methods` defines them); ``refine`` fine-tunes chosen points
    after the search.
    ``seq_len`` is the sequence length BOPs and latency are costed at (default: the data's max length).
    ``bits`` are bit options in the grammar of :mod:`bitscout.options` (``4``, ``"4a"``, ``"4g128"``).
    ``loop`` sets the closed loop after every score's first allocation (:mod:`search.loop`; on by
    default; a :class:`bitscout.methods.LoopOptions` or a mapping of its fields).
    ``tie`` names the sibling projections tied to one option (``("qkv", "gate_up")``, the kinds of
    :data:`bitscout.options.TIE_KINDS`); ``()`` ties nothing; None is the task's default:
    :data:`DEFAULT_TIES` for causal LMs, nothing otherwise.
    ``activation_bits`` crosses every integer option of ``bits`` with activation widths (``(8, 16)``:
    ``4`` becomes ``4a8`` and ``4a16``; :func:`bitscout.options.with_activation_bits`); ``act_scales``
    is ``"dynamic"`` (per-token scales) or ``"static"`` (one scale per matrix input, calibrated on
    the calibration rows): :mod:`search.actquant`. ``act_bits`` is the activation width the cost
    model assumes for weight-only integer options. ``latency_table`` (a measured table, the JSON
    object of :mod:`bitscout.latency`) replaces the ``device_profile`` roofline for latency.
    ``tt_ranks`` adds tensor-train options (``tt<r>@<b>`` for every rank ``r`` and width ``b`` of
    ``bits``) to the whole matrices they fit (:meth:`search.adapter.ModelAdapter.build_space`).
    """

    methods: tuple[str, ...] = ("kl",)
    granularity: Granularity = "layer"
    bits: tuple[int | str, ...] = (2, 3, 4, 8)
    symmetric: bool = True
    ffn_block_size: int = 64
    prune_limits: PruneLimits | None = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    include_head: bool = False
    include_embeddings: bool = False
    budget: Budget = field(default_factory=Budget)
    front_points: int = 16
    metric: str | None = None
    seed: int = 0
    seq_len: int = 128
    act_bits: int = 8
    activation_bits: tuple[int, ...] = ()
    act_scales: str = "dynamic"
    device_profile: str | Mapping[str, Any] = "a100"
    latency_table: Mapping[str, Any] | None = None
    uniform_baselines: tuple[int, ...] = UNIFORM_BASELINES
    clip: str = "mse"
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    refine: RefineChoice | None = None
    tie: tuple[str, ...] | None = None
    tt_ranks: tuple[int, ...] = ()
    loop: LoopOptions = field(default_factory=LoopOptions)

    def __post_init__(self) -> None:
        object.__setattr__(self, "loop", loop_options(self.loop))
        if not self.methods:
            raise InvalidInputError("at least one method is required", field="methods")
        if len(set(self.methods)) != len(self.methods):
            raise InvalidInputError("methods must not repeat", field="methods")
        for m in self.methods:
            methods.get(m)
        stray = sorted(set(self.method_options) - set(self.methods))
        if stray:
            raise InvalidInputError(
                f"method_options names {', '.join(stray)}, which is not among the methods ({', '.join(self.methods)})",
                field="method_options",
            )
        if isinstance(self.front_points, bool) or not isinstance(self.front_points, int) or not 2 <= self.front_points <= 64:
            raise InvalidInputError("front_points must be an integer between 2 and 64", field="front_points")
        if self.clip not in ("mse", "minmax"):
            raise InvalidInputError("clip must be 'mse' or 'minmax'", field="clip")
        selection = selection_problem(self.include or (), self.exclude or ())
        if selection is not None:
            raise InvalidInputError(selection[1], field=selection[0])
        for b in self.bits:
            BitOption.parse(b)  # a spelling outside the grammar fails here, before the model loads
        try:
            object.__setattr__(self, "activation_bits", options_grammar.parse_act_bits(self.activation_bits))
        except options_grammar.OptionSyntaxError as exc:
            raise InvalidInputError(str(exc), field="space.act_bits") from None
        if self.act_scales not in ACT_SCALES:
            raise InvalidInputError(
                f"act_scales must be one of {', '.join(ACT_SCALES)}, got {self.act_scales!r}", field="space.act_scales"
            )
        problem = activation_problem(self.methods, self.searched_bits)
        if problem is not None:
            raise InvalidInputError(problem, field="methods")
        for i, r in enumerate(self.tt_ranks):
            if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= options_grammar.MAX_TT_RANK:
                raise InvalidInputError(
                    f"a tensor-train rank is an integer from 1 to {options_grammar.MAX_TT_RANK}, got {r!r}",
                    field=f"space.tt_ranks.{i}",
                )
        if "dnas" in self.methods and (self.tt_ranks or any(BitOption.parse(b).is_tt for b in self.bits)):
            raise InvalidInputError(
                "the dnas method does not search tensor-train options; use kl, hessian, fisher or nsga2",
                field="space.tt_ranks",
            )
        if self.tie is not None:
            try:
                object.__setattr__(self, "tie", options_grammar.parse_ties(self.tie))
            except options_grammar.OptionSyntaxError as exc:
                raise InvalidInputError(str(exc), field="space.tie") from None

    @property
    def searched_bits(self) -> list[int | str]:
        """``bits`` with ``activation_bits`` crossed in (:func:`bitscout.options.with_activation_bits`)."""
        return options_grammar.with_activation_bits(self.bits, self.activation_bits)

    def ties_for(self, task: str) -> tuple[str, ...]:
        """The tie kinds of a search of ``task``: :attr:`tie`, or the task's default."""
        if self.tie is not None:
            return self.tie
        return DEFAULT_TIES if task == "causal_lm" else ()


def loop_options(value: LoopOptions | Mapping[str, Any] | None) -> LoopOptions:
    """``value`` as :class:`~bitscout.methods.LoopOptions` (None: the defaults); a bad field is an
    :class:`InvalidInputError` naming ``loop.<field>``."""
    if isinstance(value, LoopOptions):
        return value
    if value is not None and not isinstance(value, Mapping):
        raise InvalidInputError("loop must be a mapping of the loop's options", field="loop")
    from pydantic import ValidationError

    try:
        return LoopOptions.model_validate(dict(value or {}))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        raise InvalidInputError(f"loop.{where}: {err.get('msg')}", field=f"loop.{where}" if where else "loop") from None


class Search:
    """A live search over one loaded model (see the module docstring).

    ``calibration`` and ``evaluation`` are tokenized batches; they must be disjoint (the caller's
    :func:`search.data.split_data` makes them so). ``device`` is where the model and batches run.
    """

    def __init__(
        self,
        model: nn.Module,
        task: str,
        calibration: Sequence[TokenizedBatch],
        evaluation: Sequence[TokenizedBatch],
        options: SearchOptions,
        *,
        device: str | torch.device = "cpu",
    ) -> None:
        self.task: Task = check_task(task)
        if not calibration:
            raise InvalidInputError("no calibration data", field="calibration_size")
        if not evaluation:
            raise InvalidInputError("no evaluation data", field="evaluation_size")
        self.options = options
        for m in options.methods:
            methods.parse_options(m, options.method_options.get(m))  # bad options fail before any work
        has_labels = all(b.labels is not None for b in evaluation)
        self.metric = check_metric(options.metric, self.task, has_labels=has_labels)
        self.higher_is_better = higher_is_better(self.metric)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.calibration = [b.to(self.device) for b in calibration]
        self.evaluation = [b.to(self.device) for b in evaluation]
        self.adapter = ModelAdapter(
            model,
            include=options.include,
            exclude=options.exclude,
            include_head=options.include_head,
            include_embeddings=options.include_embeddings,
        )
        self.space = self.adapter.build_space(
            granularity=options.granularity,
            bits=options.searched_bits,
            symmetric=options.symmetric,
            ffn_block_size=options.ffn_block_size,
            prune_limits=options.prune_limits,
            tie=options.ties_for(self.task),
            tt_ranks=options.tt_ranks,
        )
        self.cost_model = CostModel(
            self.space,
            seq_len=options.seq_len,
            act_bits=options.act_bits,
            profile=get_profile(options.device_profile),
            latency_table=None if options.latency_table is None else LatencyTable.from_dict(options.latency_table),
        )
        check_budget(self.space, self.cost_model, options.budget)
        #: static activation scales (``act_scales="static"`` and a space with activation widths)
        self.act_static: StaticScales | None = None
        if options.act_scales == "static" and any(o.act_bits is not None for row in self.space.options for o in row):
            self.act_static = self.adapter.calibrate_activations(
                self.space, self.calibration, lambda m, b: model_output(m, b, self.task)
            )
        self.timings: dict[str, float] = {}
        #: where the model was loaded from and the data's label names (set by :func:`search.local.prepare`)
        self.model_path: str | None = None
        self.label_names: list[str] | None = None
        self._reference: Reference | None = None
        self._calibration_reference: Reference | None = None
        #: the quantized weight blocks of every (group, option) quantized so far, for the next maps
        self.weight_cache = WeightCache()
        self.baseline_metrics: dict[str, float] | None = None

    # -- stages -----------------------------------------------------------------------------
    def space_dict(self) -> dict[str, Any]:
        """The space and its cost model, serialised (what :func:`resolve` needs)."""
        return {
            "space": space_to_dict(self.space),
            "cost_model": {
                "seq_len": self.cost_model.seq_len,
                "act_bits": self.cost_model.act_bits,
                "batch": self.cost_model.batch,
                "profile": self.cost_model.profile.to_dict(),
                **(
                    {"latency_table": self.cost_model.latency_table.to_dict()}
                    if self.cost_model.latency_table is not None
                    else {}
                ),
            },
        }

    def reference(self) -> Reference:
        if self._reference is None:
            self._reference = reference_outputs(self.model, self.evaluation, self.task)
        return self._reference

    def sensitivity_context(self) -> SensitivityContext:
        return SensitivityContext(
            self.model, self.adapter, self.space, self.task, self.calibration, self.device, self.options.seed,
            self.options.clip, self.act_static, self.weight_cache,
        )

    def sensitivity(
        self, method: str, *, on_progress: ProgressFn | None = None, should_stop: StopFn | None = None
    ) -> SensitivityTable:
        t0 = time.perf_counter()
        table = methods.sensitivity_method(method, self.options.method_options.get(method)).compute(
            self.sensitivity_context(), on_progress=on_progress, should_stop=should_stop
        )
        self.timings[f"sensitivity:{method}"] = time.perf_counter() - t0
        return table

    def splits(self, method: str) -> bool:
        """Whether ``method``'s table can be scored in parts (:meth:`sensitivity_part`)."""
        return bool(getattr(methods.sensitivity_method(method, self.options.method_options.get(method)), "splits", False))

    def sensitivity_part(
        self, method: str, batch_ids: Sequence[int], *, on_progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
    ) -> Any:
        """``method`` measured on the calibration batches ``batch_ids`` only (a part for
        :meth:`combine_parts`; what one worker of a split sensitivity stage computes)."""
        impl = methods.sensitivity_method(method, self.options.method_options.get(method))
        return impl.partial(self.sensitivity_context(), batch_ids, on_progress=on_progress, should_stop=should_stop)

    def combine_parts(self, method: str, parts: Sequence[Any], *, seconds: float = 0.0) -> SensitivityTable:
        """The table of ``method`` from parts over disjoint batch sets covering every calibration
        batch: the table :meth:`sensitivity` computes, to the last bit."""
        impl = methods.sensitivity_method(method, self.options.method_options.get(method))
        table = impl.combine(self.sensitivity_context(), parts, seconds=seconds)
        self.timings[f"sensitivity:{method}"] = seconds
        return table

    def candidates(self, table: SensitivityTable) -> list[Candidate]:
        t0 = time.perf_counter()
        out = candidates_from_table(
            self.space, self.cost_model, table, self.options.budget, n_points=self.options.front_points
        )
        self.timings[f"allocation:{table.method}"] = time.perf_counter() - t0
        return out

    def uniform_candidates(self) -> list[Candidate]:
        return uniform_candidates(self.space, self.options.uniform_baselines, self.options.symmetric)

    def evaluate(self, pmap: PrecisionMap, *, should_stop: StopFn | None = None) -> dict[str, float]:
        """Every metric of the model fake-quantized under ``pmap`` on the evaluation batches."""
        reference = self.reference()  # full-precision outputs: computed before the weights change
        with self.adapter.quantized(pmap, self.space, clip=self.options.clip, act_static=self.act_static,
                                    cache=self.weight_cache):
            return evaluate(self.model, self.evaluation, self.task, reference=reference, should_stop=should_stop)

    def evaluate_candidate(self, c: Candidate, *, should_stop: StopFn | None = None) -> ParetoPoint:
        return ParetoPoint(
            precision_map=c.precision_map,
            cost=self.cost_model.cost(c.precision_map),
            metrics=self.evaluate(c.precision_map, should_stop=should_stop),
            method=c.method,
            label=c.label,
            predicted=c.predicted,
            budget=c.budget,
        )

    @torch.no_grad()
    def calibration_proxy(self, maps: Sequence[PrecisionMap], *, should_stop: StopFn | None = None) -> list[float]:
        """The mean per-row discrepancy (:func:`search.tasks.discrepancy`, the quantity the
        sensitivity methods score) of the model under each map to full precision, on the
        calibration batches only: one forward pass per batch and map (:mod:`search.loop`); the
        full-precision outputs are computed once, the quantized weights come from
        :attr:`weight_cache`."""
        from search.errors import CanceledError
        from search.tasks import discrepancy, eval_mode, output_passes

        if self._calibration_reference is None:
            with eval_mode(self.model):
                self._calibration_reference = reference_outputs(self.model, self.calibration, self.task)
        ref = self._calibration_reference
        n = max(1, sum(int(b.input_ids.shape[0]) for b in self.calibration))
        out = []
        with eval_mode(self.model):
            for pmap in maps:
                if should_stop is not None and should_stop():
                    raise CanceledError("search canceled")
                total = 0.0
                with self.adapter.quantized(pmap, self.space, clip=self.options.clip, act_static=self.act_static,
                                            cache=self.weight_cache):
                    # runs of rows sized to the pass budget, the reference read a run at a time
                    for i, start, b, o in output_passes(self.model, self.calibration, self.task):
                        r = ref.outputs.read(i, start, start + len(b), device=o.device)  # type: ignore[attr-defined]
                        total += float(discrepancy(r, o, b, self.task).sum())
                out.append(total / n)
        return out

    def baseline(self) -> dict[str, float]:
        if self.baseline_metrics is None:
            self.baseline_metrics = evaluate(self.model, self.evaluation, self.task, reference=self.reference())
        return self.baseline_metrics

    def assemble(self, points: Sequence[ParetoPoint], tables: Sequence[SensitivityTable]) -> SearchResult:
        """The result: the front (non-dominated in quality vs size over every method's points, uniform
        baselines included as reference points) and everything evaluated."""
        scored = [p for p in points if self.metric in p.metrics]
        front = pareto_front(scored, metric=self.metric, higher_is_better=self.higher_is_better, cost="size_bytes")
        return SearchResult(
            front=list(front),
            points=list(points),
            sensitivities=list(tables),
            metric=self.metric,
            higher_is_better=self.higher_is_better,
            baseline_metrics=self.baseline(),
            space=self.space_dict(),
            timings=dict(self.timings),
            versions=versions(),
            info={
                "task": self.task,
                "budget": self.options.budget.to_dict(),
                "methods": list(self.options.methods),
                "groups": len(self.space.groups),
                "granularity": self.space.granularity,
                "ties": len(self.space.ties),
                "recommended": recommended_index(points, self.options.budget),
                "seed": self.options.seed,
                **({"refine": {"points": self.options.refine.points, "steps": self.options.refine.steps}}
                   if self.options.refine is not None else {}),
            },
        )

    def run(self, *, on_progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> SearchResult:
        """Every stage in this process (:func:`search.orchestration.run_search`)."""
        from search.orchestration import SearchHooks, run_search

        return run_search(self, SearchHooks(on_progress=on_progress, should_stop=should_stop))


def split_batches(n: int, parts: int) -> list[list[int]]:
    """``range(n)`` cut into at most ``parts`` consecutive runs of sizes differing by one at most
    (none empty): the calibration batches each worker of a split sensitivity stage scores."""
    k = max(1, min(int(parts), int(n)))
    base, extra = divmod(int(n), k)
    out, start = [], 0
    for i in range(k):
        size = base + (1 if i < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return [r for r in out if r]


def versions() -> dict[str, str]:
    import numpy
    import scipy
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
    }


__all__ = ["DEFAULT_TIES", "RefineChoice", "Search", "SearchOptions", "loop_options", "split_batches", "versions"]
