"""NSGA-II: a black-box multi-objective search over per-group options (the ``nsga2`` method).

Each individual is one option index per decision of the :class:`~search.space.SearchSpace` (a group,
or a tied set of groups that takes one option: :attr:`~search.space.SearchSpace.decisions`); its two
objectives are the quality metric of the fake-quantized model (maximised or minimised as the
metric says) and a cost of the map (``size_bytes`` by default: the metric the budget's front is
swept over). Optuna's :class:`~optuna.samplers.NSGAIISampler` proposes one *generation* at a time
(``population_size`` maps); the caller's ``evaluate_many(maps) -> metrics`` evaluates the whole
generation at once, so a caller with several processes can evaluate a generation in parallel;
:func:`nsga2_candidates` measures it on the search's calibration proxy.

The search stops after ``n_evaluations`` *distinct* maps have been evaluated (maps proposed
again are answered from a cache and cost nothing), which makes it comparable with the
sensitivity methods at an equal evaluation budget. The first generation is seeded with the
uniform maps (every group at the same option), the rest of it is random.

The Optuna study lives in its own storage, never in the service's database: in memory by
default, or a separate SQLite file (``storage="sqlite:///.../nsga2.db"``). With a file and the
same ``study_name``, a re-run (a job re-queued after its worker died) resumes the study: the maps
already evaluated are read back from the trials' attributes and not evaluated again.

This module is pure: it imports Optuna and the search library, nothing of the service or Ray.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from bitscout import rules
from bitscout.methods import NSGA2Options
from search.errors import CanceledError, InvalidInputError
from search.result import COST_METRICS, Budget, Cost
from search.space import PrecisionMap, SearchSpace

if TYPE_CHECKING:
    from search.pipeline import Search
    from search.plan import Candidate

__all__ = [
    "PROXY_METRIC",
    "EvaluateMany",
    "NSGA2Point",
    "NSGA2Result",
    "default_n_evaluations",
    "default_population_size",
    "nsga2_candidates",
    "run_nsga2",
]

log = logging.getLogger(__name__)

#: ``evaluate_many(maps) -> one metrics dict per map``, in order.
EvaluateMany = Callable[[list[PrecisionMap]], list[dict[str, float]]]
ProgressFn = Callable[[str, float, str], None]
StopFn = Callable[[], bool]

#: user attribute of a trial holding the metrics of its map (for resumed studies)
_METRICS_ATTR = "bitscout_metrics"
_GENERATION_ATTR = "bitscout_generation"
#: how many more trials than ``n_evaluations`` may be asked for before giving up on new maps
_MAX_ASK_FACTOR = 20


@dataclass(frozen=True)
class NSGA2Point:
    """An evaluated map."""

    precision_map: PrecisionMap
    cost: Cost
    metrics: dict[str, float]
    generation: int


@dataclass
class NSGA2Result:
    """What a run produced: every distinct map evaluated (in order), the non-dominated ones sorted
    by cost, and how the run went."""

    evaluated: list[NSGA2Point]
    front: list[NSGA2Point]
    n_trials: int
    n_generations: int
    resumed: int = 0
    info: dict[str, Any] = field(default_factory=dict)


def default_n_evaluations(front_points: int) -> int:
    """The default evaluation budget of a job: four maps per front point."""
    return max(8, 4 * int(front_points))


def default_population_size(n_evaluations: int) -> int:
    """About twice the square root of the budget, between 4 and 32 (8 for 16 maps, 16 for 64)."""
    return int(min(32, max(4, round(2 * math.sqrt(max(1, n_evaluations))))))


def _space_size(space: SearchSpace) -> float:
    n = 1.0
    for opts in space.decision_options:
        n *= len(opts)
        if n > 1e18:
            break
    return n


def _front(points: Sequence[NSGA2Point], metric: str, higher_is_better: bool, cost_metric: str) -> list[NSGA2Point]:
    """Non-dominated points in (cost, metric), sorted by cost; the first of equal points is kept
    (:func:`bitscout.rules.pareto_front`)."""
    scored = [p for p in points if (v := p.metrics.get(metric)) is not None and math.isfinite(v)]
    kept = rules.pareto_front([(p.cost.get(cost_metric), p.metrics[metric]) for p in scored],
                              higher_is_better=higher_is_better)
    return [scored[i] for i in kept]


def run_nsga2(
    space: SearchSpace,
    cost_of: Callable[[PrecisionMap], Cost],
    evaluate_many: EvaluateMany,
    *,
    metric: str,
    higher_is_better: bool,
    n_evaluations: int,
    cost_metric: str = "size_bytes",
    population_size: int | None = None,
    seed: int = 0,
    storage: str | None = None,
    study_name: str | None = None,
    initial_maps: Sequence[PrecisionMap] = (),
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> NSGA2Result:
    """Run NSGA-II over ``space`` until ``n_evaluations`` distinct maps are evaluated.

    Args:
        space: the groups and their allowed options.
        cost_of: the cost of a map (``CostModel.cost``).
        evaluate_many: evaluates a list of maps, returning their metrics in order; called once
            per generation with the generation's new maps.
        metric: the quality metric (a key of the metrics dicts); ``higher_is_better`` its direction.
        n_evaluations: the evaluation budget (distinct maps).
        cost_metric: the second objective, a ``Cost`` attribute (minimised).
        population_size: maps per generation (default :func:`default_population_size`).
        seed: seeds the sampler (the same seed and budget give the same maps).
        storage: an Optuna storage URL (``sqlite:///path``); None keeps the study in memory.
        study_name: the study's name in ``storage`` (a run with the same name resumes it).
        initial_maps: maps evaluated first (e.g. uniform maps), before the sampler's own.
        on_progress: ``(stage, fraction, message)`` after each generation.
        should_stop: checked before each generation; True raises :class:`CanceledError`.
    """
    import optuna
    from optuna.trial import TrialState

    if isinstance(n_evaluations, bool) or not isinstance(n_evaluations, int) or n_evaluations < 1:
        raise InvalidInputError(f"n_evaluations must be a positive integer, got {n_evaluations!r}", field="n_evaluations")
    if cost_metric not in COST_METRICS:
        raise InvalidInputError(f"unknown cost metric {cost_metric!r}; known: {', '.join(COST_METRICS)}", field="cost_metric")
    pop = default_population_size(n_evaluations) if population_size is None else int(population_size)
    if pop < 2:
        raise InvalidInputError("population_size must be at least 2", field="population_size")
    report = on_progress or (lambda stage, frac, msg: None)
    stop = should_stop or (lambda: False)
    budget = int(min(n_evaluations, _space_size(space)))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.NSGAIISampler(population_size=pop, seed=seed)
    study = optuna.create_study(
        directions=["maximize" if higher_is_better else "minimize", "minimize"],
        sampler=sampler,
        storage=storage,
        study_name=study_name,
        load_if_exists=storage is not None and study_name is not None,
    )
    names = [f"g{i}" for i in range(len(space.decisions))]  # one parameter per decision (per group when untied)
    dists: dict[str, optuna.distributions.BaseDistribution] = {
        n: optuna.distributions.IntDistribution(0, len(opts) - 1)
        for n, opts in zip(names, space.decision_options, strict=True)
    }

    cache: dict[PrecisionMap, dict[str, float]] = {}
    evaluated: list[NSGA2Point] = []
    resumed = 0
    first_generation = 0
    # A resumed study: its finished trials are already evaluated; unfinished ones are dropped.
    for t in study.get_trials(deepcopy=False):
        got = t.user_attrs.get(_METRICS_ATTR)
        if t.state == TrialState.COMPLETE and isinstance(got, dict):
            pmap = space.from_choices([t.params[n] for n in names])
            if pmap not in cache:
                cache[pmap] = {str(k): float(v) for k, v in got.items()}
                gen = int(t.user_attrs.get(_GENERATION_ATTR, 0))
                first_generation = max(first_generation, gen + 1)
                evaluated.append(NSGA2Point(pmap, cost_of(pmap), cache[pmap], gen))
                resumed += 1
        elif t.state == TrialState.RUNNING:
            study.tell(t.number, state=TrialState.FAIL)
    if not study.trials or resumed == 0:
        for pmap in initial_maps:
            study.enqueue_trial(dict(zip(names, space.decision_choices(pmap), strict=True)), skip_if_exists=True)

    n_trials = len(study.trials)
    max_trials = n_trials + _MAX_ASK_FACTOR * max(budget, pop)
    generation = 0
    while len(cache) < budget and n_trials < max_trials:
        if stop():
            raise CanceledError("search canceled")
        asked: list[tuple[Any, PrecisionMap]] = []
        for _ in range(pop):
            trial = study.ask(fixed_distributions=dists)
            pmap = space.from_choices([trial.params[n] for n in names])
            asked.append((trial, pmap))
        n_trials += len(asked)
        new: list[PrecisionMap] = []
        for _t, pmap in asked:
            if pmap not in cache and pmap not in new and len(cache) + len(new) < budget:
                new.append(pmap)
        gen = first_generation + generation
        if new:
            results = evaluate_many(list(new))
            if len(results) != len(new):
                raise InvalidInputError(
                    f"evaluate_many returned {len(results)} results for {len(new)} maps", field="evaluate_many"
                )
            for pmap, got in zip(new, results, strict=True):
                cache[pmap] = {str(k): float(v) for k, v in got.items()}
                evaluated.append(NSGA2Point(pmap, cost_of(pmap), cache[pmap], gen))
        for trial, pmap in asked:
            known = cache.get(pmap)
            value = None if known is None else known.get(metric)
            if value is None or not math.isfinite(value):
                study.tell(trial, state=TrialState.FAIL)
                continue
            trial.set_user_attr(_METRICS_ATTR, known)
            trial.set_user_attr(_GENERATION_ATTR, gen)
            study.tell(trial, [float(value), float(cost_of(pmap).get(cost_metric))])
        generation += 1
        report(
            "nsga2",
            min(1.0, len(cache) / budget),
            f"NSGA-II generation {gen + 1}: {len(cache)}/{budget} maps evaluated",
        )
    front = _front(evaluated, metric, higher_is_better, cost_metric)
    return NSGA2Result(
        evaluated=evaluated,
        front=front,
        n_trials=n_trials,
        n_generations=generation,
        resumed=resumed,
        info={"population_size": pop, "n_evaluations": budget, "cost_metric": cost_metric, "seed": seed},
    )


#: the objective NSGA-II minimises inside a search: the calibration proxy's discrepancy
PROXY_METRIC = "proxy"


def nsga2_candidates(
    search: Search,
    *,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    measure_many: Callable[[list[PrecisionMap]], list[float]] | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    **overrides: Any,
) -> list[Candidate]:
    """The ``nsga2`` method of :class:`~search.pipeline.Search`: its non-dominated maps (plus the
    map that meets the budget with the lowest discrepancy, when that one is not on the front) as
    candidates for the evaluation.

    Its objectives are the calibration proxy (``measure_many(maps)``: the mean per-row discrepancy
    to full precision on the calibration rows, :meth:`~search.pipeline.Search.calibration_proxy`,
    minimised) and the cost: the evaluation rows choose nothing; the orchestration evaluates the
    maps it returns once, afterwards, and each carries its measured discrepancy
    (``provenance["proxy"]``). Without ``measure_many``, the search's own proxy measures them.

    Options (:class:`bitscout.methods.NSGA2Options`) come from
    ``search.options.method_options["nsga2"]`` and then ``overrides``: ``n_evaluations`` (maps
    measured; default :func:`default_n_evaluations` of ``front_points``), ``population_size``,
    ``seed`` (default the search's seed), ``seed_uniform`` (default True). ``storage`` /
    ``study_name`` are process settings, not options: an Optuna storage URL and study name that
    make the study resumable (the job runner keeps one per job).
    """
    from search.methods import parse_options
    from search.plan import Candidate, sweep_metric

    opts = cast(NSGA2Options, parse_options("nsga2", {**search.options.method_options.get("nsga2", {}), **overrides}))
    budget: Budget = search.options.budget
    cost_metric = sweep_metric(budget)
    n_eval = opts.n_evaluations or default_n_evaluations(search.options.front_points)
    measure = measure_many or (lambda maps: search.calibration_proxy(maps, should_stop=should_stop))

    def objective(maps: list[PrecisionMap]) -> list[dict[str, float]]:
        return [{PROXY_METRIC: float(v)} for v in measure(list(maps))]

    initial: list[PrecisionMap] = []
    if opts.seed_uniform:
        for o in sorted({o for group_options in search.space.options for o in group_options}):
            pmap = search.space.uniform(o)
            if pmap not in initial:
                initial.append(pmap)

    result = run_nsga2(
        search.space,
        search.cost_model.cost,
        objective,
        metric=PROXY_METRIC,
        higher_is_better=False,
        n_evaluations=int(n_eval),
        cost_metric=cost_metric,
        population_size=opts.population_size,
        seed=int(search.options.seed if opts.seed is None else opts.seed),
        storage=storage,
        study_name=study_name,
        initial_maps=initial,
        on_progress=on_progress,
        should_stop=should_stop,
    )
    search.nsga2_info = {**result.info, "n_trials": result.n_trials, "generations": result.n_generations,  # type: ignore[attr-defined]
                         "resumed": result.resumed, "evaluated": len(result.evaluated), "objective": "calibration proxy"}

    chosen: list[tuple[NSGA2Point, str]] = [(p, "front") for p in result.front]
    feasible = [p for p in result.evaluated if budget.limits() and budget.is_feasible(p.cost)]
    if feasible:
        best = min(feasible, key=lambda p: (p.metrics[PROXY_METRIC], p.cost.size_bytes))
        if all(best.precision_map != p.precision_map for p, _ in chosen):
            chosen.insert(0, (best, "budget"))
        else:
            chosen = [(p, "budget" if p.precision_map == best.precision_map else lab) for p, lab in chosen]
    return [
        Candidate(
            precision_map=p.precision_map,
            method="nsga2",
            predicted=None,
            budget={},
            label=label,
            exact=False,
            gap=0.0,
            provenance={"score": "nsga2", "round": p.generation, "local_search": False, "guard": False,
                        "how": f"NSGA-II {label}, generation {p.generation}", "proxy": p.metrics[PROXY_METRIC]},
        )
        for p, label in chosen
    ]
