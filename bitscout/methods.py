"""The search methods' options: one pydantic model per method, the only definition of each
option's name, type, default and range.

A dependency-free leaf (pydantic only): the wire schema validates a job's ``method_options`` with
these models (a misspelled or out-of-range option is refused at ``POST /jobs`` with the field
named, e.g. ``method_options.hessian.max_probes``, and the OpenAPI document lists every option),
and the search library's implementations read their settings from the same models, so a default
exists once. The implementations themselves are registered in ``search.methods``; a test pins
the two registries to the same names.

Every model forbids unknown fields and is frozen. Booleans and integers are strict (``"yes"``,
``1`` for a flag and ``5.0`` for a count are refused); numbers accept integers.

Example::

    >>> HessianOptions(max_probes=32).tolerance
    0.05
    >>> options_model("dnas").model_validate({"steps": 10}).steps
    10
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from bitscout.options import parse_option

__all__ = [
    "ACTIVATION_METHODS",
    "OPTIONS",
    "activation_problem",
    "Method",
    "MethodOptionsSpec",
    "DNASOptions",
    "FisherOptions",
    "HessianOptions",
    "KLOptions",
    "LoopOptions",
    "MethodOptions",
    "NSGA2Options",
    "options_model",
    "provenance_text",
]

_Positive = Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False)]
_NonNegative = Annotated[StrictFloat, Field(ge=0, allow_inf_nan=False)]
_Count = Annotated[StrictInt, Field(ge=1)]


class MethodOptions(BaseModel):
    """Base of every method's options: unknown names are refused, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class KLOptions(MethodOptions):
    """``kl``: the output discrepancy of each (group, option) with only that group quantized."""

    replay: StrictBool = Field(
        default=True,
        description="Replay cached block inputs so a probe reruns only the blocks from the perturbed one on "
        "(false: rerun the whole model per probe; the same scores, slower).",
    )


class HessianOptions(MethodOptions):
    """``hessian``: Hutchinson estimates of the Hessian's trace / diagonal, weighing each option's
    quantization error."""

    tolerance: _Positive = Field(default=0.05, description="Target relative standard error of every group's trace.")
    min_probes: Annotated[StrictInt, Field(ge=2)] = Field(default=8, description="Probes per calibration batch, at least.")
    max_probes: Annotated[StrictInt, Field(ge=2)] = Field(default=200, description="Probes per calibration batch, at most.")
    margin: Annotated[StrictFloat, Field(ge=1, allow_inf_nan=False)] = Field(
        default=1.1, description="Factor on the projected number of probes."
    )
    weighting: Literal["trace", "members", "rows"] = Field(
        default="rows",
        description="How curvature weighs the quantization error: one trace per group, per member slice, or per row.",
    )
    calibrate: StrictBool = Field(
        default=True,
        description="Rescale the narrowest grids' scores by how much more their uniform maps measurably hurt on "
        "the calibration data than the additive scores predict (one forward pass per bit-width).",
    )

    @field_validator("max_probes")
    @classmethod
    def _probe_range(cls, v: int, info: ValidationInfo) -> int:
        if v < info.data.get("min_probes", 2):
            raise ValueError("max_probes must be at least min_probes")
        return v


class FisherOptions(MethodOptions):
    """``fisher``: the diagonal Fisher from per-example gradients of one forward and one backward
    pass per calibration (micro-)batch, weighing every weight's quantization error."""

    labels: Literal["sampled", "model", "data"] = Field(
        default="sampled",
        description="Labels whose log-likelihood gradients build the Fisher: drawn from the model's own prediction "
        "(the true Fisher), its argmax, or the data's labels.",
    )
    weighting: Literal["elements", "rows", "members"] = Field(
        default="elements", description="How the Fisher weighs the squared error: per element, per row, per member slice."
    )
    micro_batch: _Count | None = Field(default=None, description="Examples per forward/backward pass (memory).")
    draws: _Count = Field(default=1, description="Label draws per forward pass (labels 'sampled' only).")
    calibrate: StrictBool = Field(
        default=False, description="Rescale the narrow widths' scores from measured uniform maps, as the Hessian's."
    )

    @field_validator("draws")
    @classmethod
    def _draws_need_sampling(cls, v: int, info: ValidationInfo) -> int:
        if v > 1 and info.data.get("labels", "sampled") != "sampled":
            raise ValueError("draws > 1 needs labels 'sampled' (other labels are the same at every draw)")
        return v


class DNASOptions(MethodOptions):
    """``dnas``: differentiable search over a supernet whose groups mix their options (0 bits
    prunes), one run per cost target, warm-started (``search.dnas``).

    * ``targets``: absolute targets of the swept metric (``size_bytes``, ``avg_bits``, ``bops`` or
      ``latency_ms``, in the ``search.result.Cost`` units); None: ``target_fractions`` of the
      range from the smallest achievable cost to the cost of every group at its widest integer
      option (see ``search.dnas.default_targets``).
    * ``steps``: steps of the first (largest) target; ``steps_next``: of each later, warm-started
      target. None: derived from ``epochs`` (total passes over the calibration micro-batches, all
      targets together; the first target gets twice the share of a later one), at least
      ``min_steps`` each.
    * ``batch_size``: calibration batches are split into micro-batches of at most this many
      sequences (None: kept as they are).
    * ``arch_lr``: Adam step of the logits; ``tau_start`` / ``tau_end``: Gumbel-softmax temperature,
      annealed geometrically within each target.
    * ``loss``: ``auto`` (task loss when the batches carry labels, else distillation), ``task``,
      ``kd``, ``task+kd``.
    * ``train_weights``: alternate weight steps (``weight_lr``, straight-through rounding) with
      logit steps; ``lsq``: learn the per-row quantizer step sizes too (``scale_lr``, log space).
    * ``resource_weight``: the exchange rate of the hinge at the start of the search; ``dual_lr``:
      how fast it grows (multiplicatively) while ``E[cost]`` stays above the target, back down to
      ``resource_weight`` below it; ``resource_floor``: a weak pressure that acts below the target
      too, so that groups the task loss is indifferent to still move to their cheapest option.
    * ``init``: ``sensitivity`` (default) starts from the Fisher estimate ``s`` of every (group,
      option)'s output discrepancy (``DNAS.sensitivity_scores``, ``sensitivity_draws`` backward
      passes over the calibration micro-batches, about one fine-tuning epoch each, counted in the
      search's time): ``p_gk ∝ exp(-(s_gk + mu * c_gk) / T)`` with ``c`` the groups' costs of the
      swept metric, ``T`` = ``sensitivity_temperature`` times the median over groups of the group's
      largest score and ``mu`` set so that the expected cost is the first target
      (``DNAS.init_from_scores``); a low temperature starts near the allocation of the scores;
      ``budget`` starts from the prior ``p_gk ∝ exp(-beta * cost per weight)`` whose expected cost
      is the first target (the most even distribution that meets it); ``uniform`` from equal logits.
    * ``calibrate``: rescale the start's scores like the Hessian's
      (``search.sensitivity.calibrate_scores``: the narrow grids by how much more their uniform
      maps measurably hurt than the additive scores say; a few forward passes). Off by default (it
      showed no gain beyond the run-to-run noise: ``docs/methods/dnas.md``).
      ``calibration_sequences`` (default 32; None: all): the measurement runs on the first calibration
      batches holding at least that many sequences (it estimates one ratio per width, which needs
      far fewer sequences than the scores).
    * ``values``: what the allocator receives to derive each target's map: ``probability``
      (default) ``-log p_gk``, the most probable map that meets the target; ``cdf``
      ``-log P_g(bits <= b_k)``; ``corrected`` (needs ``init="sensitivity"``) the scores corrected by
      what the search learned, ``s_gk - T * (a_gk - a_gk(init))``.
    * ``relaxation``: how the logits' step sees the choice. ``gumbel`` (default): the mixture of a
      Gumbel-softmax sample, whose gradient is first order at the point drawn, so it misses the own
      curvature ``D^T F D / 2`` of moving a group from one option to another (near a good model it
      underrates a move to a coarser grid). ``expected`` (needs ``init="sensitivity"``): the mixture
      under ``p = softmax(a)`` itself plus the variance term ``sum_g p_g^T M_g p_g / 2``, where
      ``M_gkj = (d_k - d_j)^T F (d_k - d_j) / 2`` comes from the start's Fisher pass at no extra cost
      (``DNAS.pair_scores``): to second order the expected loss of a map drawn from ``p``, whose
      derivative at a point mass toward another option is the whole change of the loss, curvature
      included. No noise is drawn. Neither relaxation's steps beat the best start consistently
      (``docs/methods/dnas.md``): hence ``start_candidates``.
    * ``start_candidates`` (default true; with ``init="sensitivity"``): also propose, at every target
      and at the budget, the allocations of the start's scores, both as estimated and calibrated
      against the uniform maps (``search.sensitivity.calibrate_scores``: one forward pass per
      integer width over the calibration data), and with ``sweep`` at the budgets below the smallest
      target as well, where the learned probabilities know least. The front then keeps what the start
      knew wherever the steps moved away from it; they are evaluated like every other map.
    * ``sweep``: also derive ``SearchOptions.front_points`` maps at budgets spread between the
      smallest and the largest target, each from the probabilities of the run with the nearest
      target, and ``front_points // 2`` on each side of them: below the smallest target down to the
      smallest achievable cost, from the run with the smallest target, and above the largest target
      up to every group at its dearest option (full precision where the space offers it), from the
      run with the largest target and, with ``start_candidates``, the start's scores (labelled
      ``sweep above``; the learned probabilities mostly repeat the largest target's map there, so
      it is the start's scores that reach full precision).
    """

    targets: tuple[_Positive, ...] | None = Field(
        default=None, min_length=1,
        description="Absolute targets of the swept cost (in the cost's units); null: target_fractions of the range.",
    )
    target_fractions: tuple[Annotated[StrictFloat, Field(gt=0, le=1)], ...] = Field(
        default=(0.5, 0.3, 0.15, 0.05), min_length=1,
        description="Targets as fractions of the range from the smallest achievable cost to every group at its "
        "widest integer option.",
    )
    steps: _Count | None = Field(default=None, description="Steps of the first target (null: from epochs).")
    steps_next: _Count | None = Field(default=None, description="Steps of each later, warm-started target.")
    epochs: _Positive = Field(default=1.5, description="Passes over the calibration micro-batches, all targets together.")
    min_steps: _Count = Field(default=3, description="Steps per target, at least.")
    batch_size: _Count | None = Field(default=8, description="Sequences per micro-batch (null: the batches as they are).")
    arch_lr: _Positive = Field(default=0.2, description="Adam step of the option logits.")
    tau_start: _Positive = Field(default=1.0, description="Gumbel-softmax temperature at a target's start.")
    tau_end: _Positive = Field(default=0.2, description="Gumbel-softmax temperature at a target's end.")
    resource_weight: _NonNegative = Field(default=2.0, description="Exchange rate of the cost hinge at the start.")
    dual_lr: _NonNegative = Field(default=0.5, description="How fast the exchange rate grows above the target.")
    resource_floor: _NonNegative = Field(default=0.05, description="A weak cost pressure below the target too.")
    loss: Literal["auto", "task", "kd", "task+kd"] = Field(
        default="auto", description="Task loss with labels, distillation, or both ('auto': task loss when labeled)."
    )
    train_weights: StrictBool = Field(default=False, description="Alternate weight steps with logit steps.")
    weight_lr: _Positive = Field(default=1e-5, description="Step of the weights (train_weights).")
    lsq: StrictBool = Field(default=False, description="Learn the per-row quantizer step sizes too.")
    scale_lr: _Positive = Field(default=1e-3, description="Step of the step sizes (lsq), in log space.")
    sweep: StrictBool = Field(default=True, description="Also derive maps at budgets spread over the whole range.")
    init: Literal["budget", "uniform", "sensitivity"] = Field(
        default="sensitivity", description="Start from Fisher scores, from the budget's prior, or from equal logits."
    )
    sensitivity_draws: _Count = Field(default=1, description="Backward passes of the Fisher start.")
    sensitivity_temperature: _Positive = Field(default=0.03, description="Temperature of the start's distribution.")
    calibrate: StrictBool = Field(default=False, description="Calibrate the start's scores against uniform maps.")
    calibration_sequences: _Count | None = Field(
        default=32, description="Sequences the calibration measures on (null: all)."
    )
    values: Literal["cdf", "probability", "corrected"] = Field(
        default="probability", description="What the allocator receives to derive each target's map."
    )
    relaxation: Literal["gumbel", "expected"] = Field(
        default="gumbel", description="A Gumbel-softmax sample, or the expected mixture plus its variance term."
    )
    start_candidates: StrictBool = Field(
        default=True, description="Also propose the allocations of the start's scores, raw and calibrated."
    )

    @field_validator("values", "relaxation")
    @classmethod
    def _needs_sensitivity_init(cls, v: str, info: ValidationInfo) -> str:
        init = info.data.get("init", "sensitivity")
        if info.field_name == "relaxation" and v == "expected" and init != "sensitivity":
            raise ValueError("relaxation 'expected' needs init 'sensitivity' (its variance term comes from the "
                             "start's Fisher pass)")
        if info.field_name == "values" and v == "corrected" and init != "sensitivity":
            raise ValueError("values 'corrected' needs init 'sensitivity'")
        return v


class NSGA2Options(MethodOptions):
    """``nsga2``: the black-box baseline, Optuna's NSGA-II over whole maps at a fixed evaluation budget."""

    n_evaluations: _Count | None = Field(default=None, description="Maps measured on the calibration proxy (null: four per front point).")
    population_size: Annotated[StrictInt, Field(ge=2)] | None = Field(
        default=None, description="Population per generation (null: Optuna's default)."
    )
    seed: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)] | None = Field(
        default=None, description="Sampler seed (null: the job's seed)."
    )
    seed_uniform: StrictBool = Field(default=True, description="Start the population from the uniform maps.")


class LoopOptions(MethodOptions):
    """The closed loop after the first allocation of every score (``search.loop``): measure the
    candidate maps on the calibration proxy, correct the additive score model, re-allocate, search
    locally, guard against uniform maps, and sweep where the front bends. On by default.

    * ``enabled``: false keeps the first allocation's maps as they are (the open loop).
    * ``rounds``: correction rounds after the first allocation, at most (each stops the loop when it
      improves no budget's best measured map).
    * ``local_steps``: calibration-proxy evaluations of the local search (exchange moves at equal or
      lower cost), per score, at most.
    * ``extra_points``: maps added between the budgets where the measured front changes fastest.
    * ``noise_floor``: the proxy discrepancy below which the quality metric cannot tell a map from
      full precision (the sweep evaluates at most one map beyond it); null: the task's default
      (``search.loop.NOISE_FLOORS``).
    """

    enabled: StrictBool = Field(default=True, description="Run the closed loop (false: the first allocation only).")
    rounds: Annotated[StrictInt, Field(ge=0, le=10)] = Field(
        default=2, description="Correction rounds after the first allocation, at most."
    )
    local_steps: Annotated[StrictInt, Field(ge=0, le=10_000)] = Field(
        default=32, description="Calibration-proxy evaluations of the local search per score, at most."
    )
    extra_points: Annotated[StrictInt, Field(ge=0, le=64)] = Field(
        default=4, description="Maps added between the budgets where the measured front changes fastest."
    )
    noise_floor: _Positive | None = Field(
        default=None,
        description="Proxy discrepancy below which maps count as full precision (null: the task's default).",
    )


def provenance_text(provenance: Any) -> str:
    """A point's provenance (``ParetoPoint.provenance``, the wire's ``provenance``) in a few
    characters: ``kl r0``, ``kl r2 +ls``, ``kl guard``, ``reference``; ``-`` when unknown."""
    if not isinstance(provenance, dict) or not provenance:
        return "-"
    if provenance.get("reference"):
        return "reference"
    score = str(provenance.get("score") or "-")
    if provenance.get("guard"):
        return f"{score} guard"
    rnd = provenance.get("round")
    text = score if rnd is None else f"{score} r{rnd}"
    return text + (" +ls" if provenance.get("local_search") else "")


class Method(StrEnum):
    """A search method. Several in one job give one combined front, each point tagged by method."""

    kl = "kl"
    hessian = "hessian"
    fisher = "fisher"
    dnas = "dnas"
    nsga2 = "nsga2"


class MethodOptionsSpec(MethodOptions):
    """A job's per-method options, keyed by method: ``{"hessian": {"max_probes": 32}}``. Each entry
    is validated by its method's model, so a misspelled option fails with its full path
    (``method_options.hessian.max_probez``). It reads like the mapping it travels as: indexing by
    method gives the options the user set (``spec.method_options["hessian"] == {"max_probes": 32}``),
    and it serialises to that mapping."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kl: KLOptions | None = None
    hessian: HessianOptions | None = None
    fisher: FisherOptions | None = None
    dnas: DNASOptions | None = None
    nsga2: NSGA2Options | None = None

    def given(self) -> dict[str, MethodOptions]:
        """The methods that have options, with their (validated) options."""
        return {name: v for name in type(self).model_fields if isinstance(v := getattr(self, name), MethodOptions)}

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """The options as set by the user, per method (unset fields left out)."""
        return {name: v.model_dump(mode="json", exclude_unset=True) for name, v in self.given().items()}

    @model_serializer(mode="plain")
    def _serialise(self) -> dict[str, dict[str, Any]]:
        return self.as_dict()

    def __getitem__(self, method: str) -> dict[str, Any]:
        return self.as_dict()[str(method)]

    def __contains__(self, method: object) -> bool:
        return str(method) in self.given()

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]
        return iter(self.given())

    def __len__(self) -> int:
        return len(self.given())

    def keys(self) -> list[str]:
        return list(self.given())

    def items(self) -> list[tuple[str, dict[str, Any]]]:
        return list(self.as_dict().items())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, MethodOptionsSpec):
            return self.as_dict() == other.as_dict()
        if isinstance(other, dict):
            return self.as_dict() == {str(k): v for k, v in other.items()}
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, repr(v)) for k, v in self.as_dict().items())))


#: Method name -> its options model (the fields of :class:`MethodOptionsSpec`). :class:`Method`
#: and ``search.methods`` name exactly these methods (a test pins the three).
OPTIONS: dict[str, type[MethodOptions]] = {
    name: next(a for a in getattr(f.annotation, "__args__", ()) if isinstance(a, type) and issubclass(a, MethodOptions))
    for name, f in MethodOptionsSpec.model_fields.items()
}


#: The methods that score or search options with activation bits (``4a8``): ``kl`` probes each option
#: with its activations quantized, ``hessian`` and ``fisher`` add their curvature in the matrices'
#: inputs times the squared activation error, ``dnas`` mixes each group's rounded inputs, ``nsga2``
#: evaluates whole maps. A method outside this set would be refused by a job with activation widths
#: (field ``methods``).
ACTIVATION_METHODS: frozenset[str] = frozenset({"kl", "nsga2", "hessian", "fisher", "dnas"})


def activation_problem(methods: Any, options: Any) -> str | None:
    """Why ``methods`` cannot search ``options`` (bit options of :mod:`bitscout.options`): a message
    naming the first method that does not score activation widths, when an option names one; else None."""
    with_act = [o for o in options if parse_option(o).act_bits is not None]
    if not with_act:
        return None
    for m in methods:
        name = str(getattr(m, "value", m))
        if name not in ACTIVATION_METHODS:
            return (
                f"method {name} does not score activation widths (option {with_act[0]}); methods that do: "
                f"{', '.join(sorted(ACTIVATION_METHODS))}"
            )
    return None


def options_model(method: str) -> type[MethodOptions]:
    """The options model of ``method``; raises ``KeyError`` for an unknown name."""
    return OPTIONS[str(method)]
