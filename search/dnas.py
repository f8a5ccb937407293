"""DNAS: differentiable search of per-group bit-widths with group pruning (method ``dnas``).

After "Automatic Mixed-Precision Quantization Search of BERT" (Zhao et al., IJCAI 2021): every group
``g`` of the search space carries architecture logits ``a_g`` over its allowed options (bit-widths,
``0`` = pruned, ``16``/``32`` = float). One step of the search:

1. **Mixture.** Draw Gumbel noise ``e`` (a seeded :class:`torch.Generator`) and form, per group,
   ``y_g = softmax((a_g + e_g) / tau)``; the group's weight is the mixture
   ``W_g = sum_k y_gk Q_k(w_g)`` of its quantized versions (``Q_0 = 0`` when pruned, ``Q_32 = w``).
   ``Q_k`` is exactly what the pipeline evaluates (:func:`search.quant.fake_quantize` of each member
   slice, MSE clipping, float16 scales). The biases of ``out`` members follow ``(1 - y_pruned) * b``.
   The mixed matrices are handed to *one* forward pass through :func:`torch.func.functional_call`:
   no copy of the network per choice and nothing written into the model. The K quantized versions
   of a group's weights are constants computed once (weights are small next to activations), so a
   step costs about one forward-backward pass however many options there are.
2. **Loss.** ``L_task`` is the task loss when the calibration batches carry labels (cross-entropy
   for classification), else knowledge distillation from the full-precision outputs computed once at
   the start (:func:`search.tasks.discrepancy`: KL of the output distribution, per token for causal
   LMs, ``1 - cosine`` for embeddings); ``loss="task"``/``"kd"``/``"task+kd"`` choose explicitly. The
   resource term is a hinge on the *expected* cost under ``p_g = softmax(a_g)`` (the distribution the
   maps are derived from, no noise), ``E[cost] = offset + sum_g p_g . c_g`` with ``c_g`` the group's
   additive costs of the swept metric (:meth:`search.cost.CostModel.group_costs` of
   :func:`search.pipeline.sweep_metric`). The logits minimise
   ``log(L_task) + lambda * relu(log(E[cost] / target)) + floor * log(E[cost] / target)``
   (the multiplicative form ``L_task * max(1, E/target)^lambda`` of FBNet, in logs): ``lambda`` is the
   exchange rate between a relative loss increase and a relative cost decrease whatever the scale of
   the loss (a KL near 0 or a cross-entropy near 1), so one default fits every task. While the
   expected cost stays above the target every logit is pushed toward cheaper options, least where the
   task loss resists, and ``lambda`` grows by dual ascent (``lambda *= exp(dual_lr * log(E/target))``,
   never below ``resource_weight``) until the target is reached; below it only the task loss (and the
   weak ``floor``) acts and gives bits back where they help most, so ``E[cost]`` settles near the
   target. A hinge (rather than a log-barrier) never rewards going below the target and stays finite
   when the search starts far above it; the weak floor keeps moving the groups the task loss is
   indifferent to (Adam's steps are full-size even for a tiny gradient when it is the only one) to
   their cheapest option, which is how redundant groups get pruned.
3. **Updates.** Adam on the logits. With ``train_weights`` the steps alternate: even steps update
   shadow copies of the group weights (small learning rate, straight-through rounding), odd steps the
   logits; with ``lsq`` the per-row quantizer step sizes are learned too (LSQ, in log space). The model
   itself is never written: the shadows are private copies, so the derived maps are evaluated by the
   pipeline on the original weights like every other method's.

**Start.** By default (``init="sensitivity"``) the logits start from a sensitivity table that the
search estimates itself at the cost of about one fine-tuning epoch per draw
(:meth:`DNAS.sensitivity_scores`): the Fisher (second-order) model of every (group, option)'s output
discrepancy, the quantity :class:`search.sensitivity.KLSensitivity` measures with one forward pass
per (group, option). One backward pass per micro-batch, with labels drawn from the model's own
prediction, gives an unbiased estimate of the quadratic form ``d^T F d`` for every option's whole
weight change ``d`` at once. The logits are ``a_gk = -(s_gk + mu * c_gk) / T`` (``c_gk`` the
group's cost of the swept metric; :meth:`DNAS.init_from_scores`, ``mu`` bisected so that the
expected cost is the first target),
whose argmax is an optimal allocation of the scores for its own cost (the Lagrangian solution), so
the steps learn the interactions the additive table misses instead of spending themselves on the
descent from a prior that knows nothing. ``init="budget"`` starts from the cost-only prior whose
expected cost is the first target, ``"uniform"`` from equal logits.

**A front.** The search runs for several targets of the swept metric, from the largest to the
smallest, each warm-started from the previous one's logits (the temperature is annealed from
``tau_start`` to ``tau_end`` within each target, the Adam state restarts). Largest first: the
first target is the mildest perturbation of the full-precision model, so its gradients are measured
near a good model and its long warm-up learns which groups are sensitive; every later target then
only has to move further down the same path, which is what a warm start can do in a few steps (going
up from the cheapest target would start from a badly damaged model whose gradients mislead). With
``start_candidates`` (the default) the allocations of the start's own scores, raw and calibrated, are
proposed at the same targets too, so the front never loses a map the steps moved away from. Each
target's map is derived from its final probabilities and repaired to meet the target exactly by
:func:`search.allocate.allocate` under the target (plus the other limits of the budget and the
structural pruning limits). The values (``values``) are by default ``-log p_gk`` (``probability``):
the allocator then returns the most probable map that meets the target, with the groups treated as
independent; a one-hot ``p`` gives the argmax itself. ``values="corrected"`` (with the sensitivity
start) allocates ``s_gk - T * (a_gk - a_gk(init))``, the starting scores plus what the steps learned;
``values="cdf"`` allocates ``-log P_g(bits <= b_k)`` (minus the log of the probability mass at or
below each option's precision: the chance that option ``k`` suffices, reading ``p_g`` as the belief about the
cheapest sufficient option). On the MiniLM BBC classifier (the ``--quick`` space of
``benchmarks/bench_dnas.py``; held-out output KL of the maps at <= 3 average bits over that of the
KL-sensitivity allocations of the same sizes, geometric mean; differences of ~0.2 are within the
run-to-run noise): the former defaults (``init="budget"``, ``cdf``) 2.37x; ``probability`` values
from the same kind of run 1.57x; the allocation of the Fisher scores alone 1.47-1.65x; the
sensitivity start with ``probability`` values 1.52x / 1.44x / 1.36x / 1.34x at ``T`` 0.3 / 0.1 /
0.03 / 0.01, and 1.26x at 0.03 with more steps (``epochs`` 4); ``corrected`` values 1.46x. Starting
from the exact KL table instead (many more epochs than the search itself) gave 1.07x with a small
correction (``T`` 0.3) and 1.45x with a large one (``T`` 1): the steps have not yet learned
interactions that beat the additive KL table at this cost. The defaults (``T`` 0.03, ``epochs``
1.5) keep the whole search, scores included, under 3 fine-tuning epochs on the full MiniLM space (a
step costs about 0.9 of a fine-tuning step there, the scores about 0.8 epoch, building the quantized
versions and the references about 0.5; ``epochs`` 3.5 came to 4.6). Full benchmark with these
defaults (every block, 96 groups, bits 0/2/3/4/8, 300 held-out rows): 1.80 epochs; best accuracy at
<= 3 average bits 0.960 (KL front 0.960), at <= 2.5 0.943 (0.953); output KL at the same sizes
1.01-1.31x that of the KL allocations (the KL table itself costs about 47 epochs); with
``epochs`` 3.5, 1.30-1.47x: on this model the steps still move the start away from the additive
optimum rather than toward a better joint one. Hence ``start_candidates`` (the start's own
allocations, raw and calibrated, proposed beside the learned maps; see :class:`DNASOptions`). With it,
on 1,000 held-out articles (same space, full precision 0.956): best accuracy at <= 3 / <= 2.5 average
bits 0.955 / 0.950 against the KL front's 0.954 / 0.948 and the Hessian front's 0.948 / 0.945;
area under the accuracy-vs-size curve from the smallest map to uniform 3-bit 3.244 (KL 3.232,
Hessian 3.147); best output KL at <= 2.5 bits 0.056 (KL 0.063, Hessian 0.068), at <= 3 bits 0.0134
(Hessian 0.0120, the uniform 3-bit map 0.0117); 2.37 fine-tuning epochs in all (the KL table 28,
the Hessian 43), step memory 1.01x a fine-tuning step. Both kinds of map reach the front: learned
maps at 2.3 and 2.6 bits, start maps at 1.9 and 2.9 bits. With ``sweep``, more maps
are allocated at no search cost at budgets between the targets, each from the run with the nearest
target, and below the smallest target down to the smallest achievable cost (``front_points // 2``
budgets spaced geometrically, as the sensitivity fronts), from the run with the smallest target
(without them the front stopped at the 2-bit end while the sensitivity fronts go on to the
all-pruned map, which the benchmark's ``low_bit_area`` counts), and above the largest target up to
every group at its dearest option, from the run with the largest target and the start's scores
(without them the front had nothing above half the quantization range: on the 4,096-map oracle
DNAS's hypervolume on log10 output KL, which weights the maps near full precision, was 0.57 against
0.91-0.95 for the other methods). When the budget limits the swept metric, one more
map is allocated at the budget with the probabilities of the run whose target is nearest to it.

Options (``SearchOptions.method_options["dnas"]``, see :class:`DNASOptions`).
Progress goes to ``on_progress("dnas", fraction, message)``; ``should_stop()`` is checked between
steps and raises :class:`~search.errors.CanceledError`. The model is left exactly as found: weights
untouched, ``requires_grad`` flags and the training flag restored, no parametrization installed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from search import allocate as alloc
from search import quant
from search.adapter import ModelAdapter, _is_conv1d
from search.cost import CostModel
from search.data import TokenizedBatch
from search.errors import CanceledError, InfeasibleBudgetError, InvalidInputError
from search.result import Budget
from search.sensitivity import ProgressFn, SensitivityContext, StopFn, calibrate_scores
from search.space import BitOption, Member, PrecisionMap, SearchSpace
from search.tasks import Task, discrepancy, model_output, scored_tokens, task_loss

if TYPE_CHECKING:  # pragma: no cover
    from search.pipeline import Candidate, Search

__all__ = [
    "DNAS",
    "DNASOptions",
    "DNASResult",
    "TargetRun",
    "default_targets",
    "dnas_candidates",
    "run_dnas",
]

LossKind = Literal["auto", "task", "kd", "task+kd"]
#: allocation values are capped here (a probability of e^-50 is as good as impossible)
_MAX_VALUE = 50.0
#: added to the task loss before its log (a loss of exactly 0 has no direction)
_LOSS_EPS = 1e-12
#: the largest exchange rate the dual ascent may reach
_MAX_LAMBDA = 1e4


@dataclass(frozen=True)
class DNASOptions:
    """How the DNAS search runs (``SearchOptions.method_options["dnas"]``).

    * ``targets``: absolute targets of the swept metric (``size_bytes``, ``avg_bits``, ``bops`` or
      ``latency_ms``, in the :class:`~search.result.Cost` units); None: ``target_fractions`` of the
      range from the smallest achievable cost to the cost of every group at its widest integer
      option (see :func:`default_targets`).
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
      option)'s output discrepancy (:meth:`DNAS.sensitivity_scores`, ``sensitivity_draws`` backward
      passes over the calibration micro-batches, about one fine-tuning epoch each, counted in the
      search's time): ``p_gk ∝ exp(-(s_gk + mu * c_gk) / T)`` with ``c`` the groups' costs of the
      swept metric, ``T`` = ``sensitivity_temperature`` times the median over groups of the group's
      largest score and ``mu`` set so that the expected cost is the first target
      (:meth:`DNAS.init_from_scores`); a low temperature starts near the allocation of the scores;
      ``budget`` starts from the prior ``p_gk ∝ exp(-beta * cost per weight)`` whose expected cost
      is the first target (the most even distribution that meets it); ``uniform`` from equal logits.
    * ``calibrate``: rescale the start's scores like the Hessian's
      (:func:`search.sensitivity.calibrate_scores`: the narrow grids by how much more their uniform
      maps measurably hurt than the additive scores say; a few forward passes). Off by default: on the
      full MiniLM benchmark (96 groups, 300 held-out rows) it gave best accuracy 0.953 / 0.940 at
      <= 3 / <= 2.5 average bits and output KL 0.0181 / 0.0866, against 0.960 / 0.943 and
      0.0176 / 0.0684 without it in the previous session's run: no gain the noise could not explain.
      ``calibration_sequences`` (default 32; None: all): the measurement runs on the first calibration
      batches holding at least that many sequences (it estimates one ratio per width, which needs
      far fewer sequences than the scores; on all 128 MiniLM sequences it cost 1.0 fine-tuning epoch,
      a third of the search).
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
      (:attr:`DNAS.pair_scores`): to second order the expected loss of a map drawn from ``p``, whose
      derivative at a point mass toward another option is the whole change of the loss, curvature
      included. No noise is drawn. On the MiniLM BBC classifier (96 groups, targets 3 / 2.75 / 2.5 /
      2.25 average bits, output KL on 600 held-out articles over that of the KL table's maps of the
      same sizes, geometric mean): ``gumbel`` 1.05x, ``expected`` 1.12x (``arch_lr`` 0.2) and 1.08x
      (0.05); the start's allocations without steps 1.15x (raw) and 1.01x (calibrated); the
      calibrated start followed by ``gumbel`` steps 1.22x. Single maps differ by 1.2-1.7x from one
      variant to the next at the same size, so none of these differences is a ranking, but the steps
      do not beat the best start consistently: hence ``start_candidates``.
    * ``start_candidates`` (default true; with ``init="sensitivity"``): also propose, at every target
      and at the budget, the allocations of the start's scores, both as estimated and calibrated
      against the uniform maps (:func:`search.sensitivity.calibrate_scores`: one forward pass per
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

    targets: tuple[float, ...] | None = None
    target_fractions: tuple[float, ...] = (0.5, 0.3, 0.15, 0.05)
    steps: int | None = None
    steps_next: int | None = None
    epochs: float = 1.5
    min_steps: int = 3
    batch_size: int | None = 8
    arch_lr: float = 0.2
    tau_start: float = 1.0
    tau_end: float = 0.2
    resource_weight: float = 2.0
    dual_lr: float = 0.5
    resource_floor: float = 0.05
    loss: LossKind = "auto"
    train_weights: bool = False
    weight_lr: float = 1e-5
    lsq: bool = False
    scale_lr: float = 1e-3
    sweep: bool = True
    init: Literal["budget", "uniform", "sensitivity"] = "sensitivity"
    sensitivity_draws: int = 1
    sensitivity_temperature: float = 0.03
    calibrate: bool = False
    calibration_sequences: int | None = 32
    values: Literal["cdf", "probability", "corrected"] = "probability"
    relaxation: Literal["gumbel", "expected"] = "gumbel"
    start_candidates: bool = True

    def __post_init__(self) -> None:
        f = "method_options.dnas"
        if self.targets is not None:
            try:
                targets = tuple(float(t) for t in self.targets)
            except (TypeError, ValueError):
                raise InvalidInputError("targets must be a list of numbers", field=f"{f}.targets") from None
            if not targets or any(not math.isfinite(t) or t <= 0 for t in targets):
                raise InvalidInputError("targets must be positive numbers", field=f"{f}.targets")
            object.__setattr__(self, "targets", targets)
        try:
            fracs = tuple(float(t) for t in self.target_fractions)
        except (TypeError, ValueError):
            raise InvalidInputError("target_fractions must be numbers", field=f"{f}.target_fractions") from None
        if not fracs or any(not 0 < t <= 1 for t in fracs):
            raise InvalidInputError("target_fractions must lie in (0, 1]", field=f"{f}.target_fractions")
        object.__setattr__(self, "target_fractions", fracs)
        for name in ("steps", "steps_next", "batch_size", "sensitivity_draws", "calibration_sequences"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise InvalidInputError(f"{name} must be a positive integer", field=f"{f}.{name}")
        if isinstance(self.min_steps, bool) or not isinstance(self.min_steps, int) or self.min_steps < 1:
            raise InvalidInputError("min_steps must be a positive integer", field=f"{f}.min_steps")
        for name in ("epochs", "arch_lr", "tau_start", "tau_end", "weight_lr", "scale_lr", "sensitivity_temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                raise InvalidInputError(f"{name} must be a positive number", field=f"{f}.{name}")
        for name in ("resource_weight", "dual_lr", "resource_floor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise InvalidInputError(f"{name} must be a non-negative number", field=f"{f}.{name}")
        if self.loss not in ("auto", "task", "kd", "task+kd"):
            raise InvalidInputError("loss must be 'auto', 'task', 'kd' or 'task+kd'", field=f"{f}.loss")
        if self.init not in ("budget", "uniform", "sensitivity"):
            raise InvalidInputError("init must be 'budget', 'uniform' or 'sensitivity'", field=f"{f}.init")
        if self.values not in ("cdf", "probability", "corrected"):
            raise InvalidInputError("values must be 'cdf', 'probability' or 'corrected'", field=f"{f}.values")
        if self.relaxation not in ("gumbel", "expected"):
            raise InvalidInputError("relaxation must be 'gumbel' or 'expected'", field=f"{f}.relaxation")
        if self.relaxation == "expected" and self.init != "sensitivity":
            raise InvalidInputError("relaxation 'expected' needs init 'sensitivity' (its variance term comes from the "
                                    "start's Fisher pass)", field=f"{f}.relaxation")
        if self.values == "corrected" and self.init != "sensitivity":
            raise InvalidInputError("values 'corrected' needs init 'sensitivity'", field=f"{f}.values")
        for name in ("train_weights", "lsq", "sweep", "calibrate", "start_candidates"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"{name} must be true or false", field=f"{f}.{name}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> DNASOptions:
        data = dict(data or {})
        known = {x.name for x in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(
                f"unknown dnas option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}",
                field="method_options.dnas",
            )
        for k in ("targets", "target_fractions"):
            if data.get(k) is not None and not isinstance(data[k], str | bytes):
                try:
                    data[k] = tuple(data[k])
                except TypeError:
                    pass
        return cls(**data)


@dataclass
class TargetRun:
    """One target of the front: its steps, how the expected cost moved, and the map derived."""

    target: float
    steps: int
    expected_cost_start: float
    expected_cost_end: float
    task_loss_start: float
    task_loss_end: float
    probabilities: list[np.ndarray]
    #: with ``init="sensitivity"``: the scores plus the learned correction ``-T * (a - a_init)``
    corrected: list[np.ndarray] | None = None
    precision_map: PrecisionMap | None = None
    allocation: alloc.Allocation | None = None


@dataclass
class DNASResult:
    """Every target's run, the candidate maps (deduplicated), the swept metric and the time taken."""

    metric: str
    runs: list[TargetRun]
    candidates: list[Candidate]
    seconds: float
    steps: int
    micro_batches: int
    info: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Helpers


def _split(batches: Sequence[TokenizedBatch], size: int | None) -> list[TokenizedBatch]:
    if size is None:
        return list(batches)
    out = []
    for b in batches:
        n = len(b)
        for s in range(0, n, size):
            out.append(
                TokenizedBatch(
                    b.input_ids[s : s + size],
                    b.attention_mask[s : s + size],
                    None if b.labels is None else b.labels[s : s + size],
                )
            )
    return out


def _smallest_meeting(expected: Any, target: float, *, limit: float, steps: int) -> float:
    """The smallest non-negative ``x`` (to bisection precision) with ``expected(x) <= target``, for a
    non-increasing ``expected``: 0 when it already holds at 0, else doubling up to ``limit`` then
    ``steps`` bisections; the upper end, which meets the target whenever ``limit`` does."""
    lo, hi = 0.0, 0.0
    if expected(0.0) > target:
        hi = 1.0
        while expected(hi) > target and hi < limit:
            hi *= 2
        for _ in range(steps):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if expected(mid) > target else (lo, mid)
    return hi


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class _Forward(nn.Module):
    """``model_output`` of the wrapped model, so that :func:`torch.func.functional_call` can swap its
    matrices (parameter names ``inner.<module>.weight``) for one call without touching the model."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.inner = model
        self.task = task

    def forward(self, batch: TokenizedBatch) -> torch.Tensor:
        return model_output(self.inner, batch, self.task)


@dataclass
class _MemberState:
    group: int
    member: Member
    base: torch.Tensor  # [r, c] float32 original slice (constant)
    int_idx: list[int]  # option indices of quantized versions (integer or float16), in stack order
    stack: torch.Tensor | None  # [Kq, r, c] quantized versions (constant; None when recomputed)
    full_idx: int | None  # option index of 32 bits
    pruned_idx: int | None
    shadow: torch.Tensor | None = None  # trainable copy of ``base``
    qparams: list[tuple[BitOption, torch.Tensor, torch.Tensor, int, int]] = field(default_factory=list)
    log_scales: list[torch.Tensor] = field(default_factory=list)


@dataclass
class _ModulePlan:
    name: str
    param_name: str
    conv: bool
    weight: torch.Tensor  # [out, in] view of the original weight (detached)
    bias: torch.Tensor | None
    bias_name: str | None
    pieces: list[tuple[str, int, int, int]]  # (axis, start, stop, member index)


# ------------------------------------------------------------------------------------------------
# The search


class DNAS:
    """A differentiable search over ``space`` on ``model`` (see the module docstring).

    Construct, call :meth:`run_target` for each target (warm-started from the previous), read
    :meth:`probabilities`, and :meth:`close` (or use as a context manager) to restore the model's
    ``requires_grad`` flags and training mode.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        space: SearchSpace,
        cost_model: CostModel,
        task: Task,
        batches: Sequence[TokenizedBatch],
        *,
        metric: str,
        options: DNASOptions | None = None,
        seed: int = 0,
        clip: str = "mse",
        device: torch.device | str = "cpu",
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.space = space
        self.cost_model = cost_model
        self.task = task
        self.options = options or DNASOptions()
        self.metric = metric
        self.clip = clip
        self.device = torch.device(device)
        self.batches = _split(batches, self.options.batch_size)
        if not self.batches:
            raise InvalidInputError("no calibration data", field="calibration_size")
        costs = cost_model.group_costs()
        if metric not in costs:
            raise InvalidInputError(f"unknown cost metric {metric!r}", field="metric")
        self.costs = [torch.tensor(np.asarray(c), dtype=torch.float64, device=self.device) for c in costs[metric]]
        self.offset = float(cost_model.offsets()[metric])
        self.generator = torch.Generator(device="cpu").manual_seed(int(seed))
        self.logits = [torch.zeros(len(o), dtype=torch.float32, device=self.device) for o in space.options]
        for lg in self.logits:
            lg.requires_grad_(True)
        has_labels = all(b.labels is not None for b in self.batches)
        kind = self.options.loss
        labelled = ("sequence_classification", "token_classification", "regression")
        if kind == "auto":
            kind = "task+kd" if (task in labelled and has_labels) else "kd"
        if "task" in kind and task in labelled and not has_labels:
            raise InvalidInputError("the task loss needs labels in the calibration data", field="method_options.dnas.loss")
        if "task" in kind and task == "embeddings":
            raise InvalidInputError("embeddings have no task loss: use loss 'kd'", field="method_options.dnas.loss")
        self.loss_kind = kind
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        self._training = model.training
        self._closed = False
        model.eval()
        for p, _ in self._flags:
            p.requires_grad_(False)
        try:
            self._forward = _Forward(model, task)
            self.refs: list[torch.Tensor | None] = [None] * len(self.batches)
            if "kd" in kind:
                with torch.no_grad():
                    self.refs = [model_output(model, b, task) for b in self.batches]
            self._build()
        except BaseException:
            self.close()
            raise
        self._batch_pos = 0
        self.lam = float(self.options.resource_weight)
        self.scores: list[np.ndarray] | None = None
        self.pair_scores: list[torch.Tensor] | None = None
        self.init_logits: list[torch.Tensor] | None = None
        self.temperature = 1.0

    # -- setup --------------------------------------------------------------------------------
    def _build(self) -> None:
        learn = self.options.train_weights or self.options.lsq
        self.members: list[_MemberState] = []
        by_module: dict[str, list[int]] = {}
        for gi, (g, opts) in enumerate(zip(self.space.groups, self.space.options, strict=True)):
            for m in g.members:
                base = self.adapter.member_slice(m).detach().to(torch.float32)
                int_idx = [k for k, o in enumerate(opts) if 0 < o.bits < 32]
                full = next((k for k, o in enumerate(opts) if o.bits == 32), None)
                pruned = next((k for k, o in enumerate(opts) if o.pruned), None)
                st = _MemberState(gi, m, base, int_idx, None, full, pruned)
                if learn:
                    st.shadow = base.clone().requires_grad_(self.options.train_weights)
                    for k in int_idx:
                        o = opts[k]
                        if o.bits == 16:
                            st.qparams.append((o, torch.empty(0), torch.empty(0), 0, 0))
                            st.log_scales.append(torch.empty(0))
                            continue
                        qp = quant.choose_qparams(base, o.bits, symmetric=o.symmetric, clip=self.clip)  # type: ignore[arg-type]
                        st.qparams.append((o, qp.scale, qp.zero_point.to(torch.float32), qp.qmin, qp.qmax))
                        st.log_scales.append(qp.scale.log().clone().requires_grad_(self.options.lsq))
                elif int_idx:
                    st.stack = torch.stack(
                        [
                            quant.fake_quantize(base, opts[k].bits, symmetric=opts[k].symmetric, clip=self.clip)  # type: ignore[arg-type]
                            for k in int_idx
                        ]
                    )
                by_module.setdefault(m.module, []).append(len(self.members))
                self.members.append(st)
        self.plans: list[_ModulePlan] = []
        for name, idxs in by_module.items():
            module = self.adapter.module(name)
            conv = _is_conv1d(module)
            b = getattr(module, "bias", None)
            pieces = [(self.members[i].member.axis, self.members[i].member.start,
                       int(self.members[i].member.stop or 0), i) for i in idxs]
            self.plans.append(
                _ModulePlan(
                    name=name,
                    param_name=f"inner.{name}.weight",
                    conv=conv,
                    weight=self.adapter.weight(name).detach(),
                    bias=b.detach() if isinstance(b, torch.Tensor) else None,
                    bias_name=f"inner.{name}.bias" if isinstance(b, torch.Tensor) else None,
                    pieces=pieces,
                )
            )

    def trainable(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The shadow weights and the log step sizes that are trained (empty unless asked for)."""
        ws = [m.shadow for m in self.members if m.shadow is not None and m.shadow.requires_grad]
        ss = [s for m in self.members for s in m.log_scales if s.requires_grad]
        return ws, ss

    # -- the mixture --------------------------------------------------------------------------
    def _versions(self, st: _MemberState) -> torch.Tensor | None:
        if st.stack is not None or not st.int_idx:
            return st.stack
        w = st.shadow if st.shadow is not None else st.base
        outs = []
        for (o, _s0, zp, qmin, qmax), ls in zip(st.qparams, st.log_scales, strict=True):
            if o.bits == 16:
                outs.append(w + (w.half().to(w.dtype) - w).detach())
                continue
            s = ls.exp()[:, None]
            q = torch.clamp(_round_ste(w / s) + zp[:, None], qmin, qmax)
            outs.append((q - zp[:, None]) * s)
        return torch.stack(outs)

    def _member_weight(self, st: _MemberState, y: torch.Tensor) -> torch.Tensor:
        w = st.shadow if st.shadow is not None else st.base
        out: torch.Tensor | None = None
        versions = self._versions(st)
        if versions is not None:
            coef = y[st.int_idx]
            out = torch.tensordot(coef, versions, dims=1)
        if st.full_idx is not None:
            term = y[st.full_idx] * w
            out = term if out is None else out + term
        if out is None:  # only pruning allowed
            out = torch.zeros_like(w) * y.sum()
        return out

    def _overrides(self, ys: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        mixed = [self._member_weight(st, ys[st.group]) for st in self.members]
        keep = [None if st.pruned_idx is None else 1 - ys[st.group][st.pruned_idx] for st in self.members]
        return self._assemble_overrides(mixed, keep)

    def _assemble_overrides(self, mixed: list[torch.Tensor], keep: list[torch.Tensor | None]
                            ) -> dict[str, torch.Tensor]:
        """The overriding matrices (and ``out`` members' biases scaled by ``keep``) of every module."""
        out: dict[str, torch.Tensor] = {}
        for plan in self.plans:
            w = self._assemble(plan.weight, [(a, s, e, mixed[i]) for a, s, e, i in plan.pieces])
            out[plan.param_name] = w.t() if plan.conv else w
            if plan.bias is not None and plan.bias_name is not None:
                bias_pieces = []
                for a, s, e, i in plan.pieces:
                    k = keep[i]
                    if a == "out" and k is not None:
                        bias_pieces.append(("out", s, e, plan.bias[s:e] * k))
                if bias_pieces:
                    out[plan.bias_name] = self._assemble_1d(plan.bias, bias_pieces)
        return out

    @staticmethod
    def _assemble(base: torch.Tensor, pieces: list[tuple[str, int, int, torch.Tensor]]) -> torch.Tensor:
        """The ``[out, in]`` matrix with each piece in place: concatenation along the pieces' axis
        (gaps from ``base``) when they share one, else out-of-place slice scatters."""
        axes = {a for a, *_ in pieces}
        if axes == {"all"} and len(pieces) == 1:
            return pieces[0][3]
        if len(axes) == 1 and axes <= {"out", "in"}:
            dim = 0 if axes == {"out"} else 1
            parts: list[torch.Tensor] = []
            pos = 0
            for _, s, e, t in sorted(pieces, key=lambda p: p[1]):
                if s < pos:
                    break
                if s > pos:
                    parts.append(base.narrow(dim, pos, s - pos))
                parts.append(t)
                pos = e
            else:
                if pos < base.shape[dim]:
                    parts.append(base.narrow(dim, pos, base.shape[dim] - pos))
                return torch.cat(parts, dim=dim)
        out = base
        for a, s, e, t in pieces:
            if a == "all":
                out = t
            else:
                out = torch.slice_scatter(out, t, dim=0 if a == "out" else 1, start=s, end=e)
        return out

    @staticmethod
    def _assemble_1d(base: torch.Tensor, pieces: list[tuple[str, int, int, torch.Tensor]]) -> torch.Tensor:
        out = base
        for _, s, e, t in pieces:
            out = torch.slice_scatter(out, t, dim=0, start=s, end=e)
        return out

    # -- quantities -----------------------------------------------------------------------------
    def probabilities(self) -> list[np.ndarray]:
        """``softmax(a_g)`` of every group, in ``space.options`` order."""
        with torch.no_grad():
            return [torch.softmax(lg.double(), 0).cpu().numpy() for lg in self.logits]

    def _expected_cost(self) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for lg, c in zip(self.logits, self.costs, strict=True):
            total = total + (torch.softmax(lg.double(), 0) * c).sum()
        return total + self.offset

    def init_at(self, target: float) -> None:
        """Set the logits to the prior ``p_gk ∝ exp(-beta * cost per weight of option k)`` (the same
        ``beta`` for every group) whose expected cost is ``target`` (bisection on ``beta``; uniform
        when the target is above the uniform distribution's expected cost)."""
        per_weight = [(c - c.min()) / max(1, g.n_params) for g, c in zip(self.space.groups, self.costs, strict=True)]
        norm = max(max(float(r.max()) for r in per_weight), 1e-30)
        per_weight = [r / norm for r in per_weight]

        def expected(beta: float) -> float:
            return self.offset + float(sum((torch.softmax(-beta * r, 0) * c).sum()
                                           for r, c in zip(per_weight, self.costs, strict=True)))

        hi = _smallest_meeting(expected, target, limit=1e6, steps=60)
        with torch.no_grad():
            for lg, r in zip(self.logits, per_weight, strict=True):
                lg.copy_((-hi * r).to(lg.dtype))

    def init_from_scores(self, scores: Sequence[np.ndarray], target: float, temperature: float) -> float:
        """Set the logits to ``a_gk = -(s_gk + mu * c_gk) / T``: the Boltzmann distribution of the
        Lagrangian of the scores ``s`` and the group costs ``c`` of the swept metric, with
        ``T = temperature *`` the median over groups of the group's largest score and ``mu`` the
        smallest non-negative multiplier whose expected cost is at most ``target`` (bisection). Its
        argmax minimises ``s_g + mu * c_g`` in every group: an optimal allocation of the scores for its
        own cost (Everett), so the search starts from the sensitivity solution. Returns ``T``."""
        tops = np.array([float(np.max(s)) for s in scores])
        pos = tops[tops > 0]
        T = float(temperature) * (float(np.median(pos)) if pos.size else 1.0)
        cmax = max(max(float((c - c.min()).max()) for c in self.costs), 1e-300)
        base = [torch.as_tensor(-np.asarray(sc, dtype=np.float64) / T, device=self.device) for sc in scores]
        rel = [(c - c.min()) / cmax for c in self.costs]  # mu in units of T per largest cost step

        def logits(mu: float) -> list[torch.Tensor]:
            return [b - mu * r for b, r in zip(base, rel, strict=True)]

        def expected(mu: float) -> float:
            return self.offset + float(sum((torch.softmax(lg, 0) * c).sum()
                                           for lg, c in zip(logits(mu), self.costs, strict=True)))

        hi = _smallest_meeting(expected, target, limit=1e15, steps=100)
        with torch.no_grad():
            for lg, new in zip(self.logits, logits(hi), strict=True):
                lg.copy_(new.to(lg.dtype))
        self.init_logits = [lg.detach().clone() for lg in self.logits]
        self.scores = [np.asarray(sc, dtype=np.float64) for sc in scores]
        self.temperature = T
        return T

    def expected_cost(self) -> float:
        """``E[cost]`` of the swept metric under the current probabilities (offsets included)."""
        with torch.no_grad():
            return float(self._expected_cost())

    def sensitivity_scores(self, draws: int = 1, *, should_stop: StopFn | None = None) -> list[np.ndarray]:
        """Fisher estimate of every (group, option)'s output discrepancy, in ``space.options`` order.

        The discrepancy of a small change ``d`` of the weights is ``d^T F d / 2`` to second order, with
        ``F`` the Fisher information of the output distribution (the Hessian of the KL at the
        reference; for embeddings that of ``1 - cosine``; for regression that of the squared error,
        ``2 I``). For outputs ``z`` with that Hessian
        ``A A^T``, the gradient ``g`` of ``r^T A^T z`` for a random ``r`` with ``E[r r^T] = I`` has
        ``E[g g^T] = F``: for the KL, ``r^T A^T z`` is the log-likelihood of a label drawn from the
        model's own prediction (per token for causal LMs and token classification, over the tokens
        the discrepancy averages, weighted ``1/sqrt(tokens)`` so that the per-token mean is
        matched); for embeddings, a Gaussian direction orthogonal to the reference embedding over
        its norm; for regression, a Gaussian of variance 2 times the output. The draws of different examples are independent and zero-mean, so
        the gradient of a micro-batch's *sum* gives ``E[(g . d)^2] = sum of d^T F_i d`` over its
        examples: one backward pass per micro-batch estimates, for *every* option's whole change
        ``d = Q_k(w_g) - w_g`` at once (pruning: ``-w_g`` and the ``out`` members' biases), the full
        quadratic form, interactions inside the group included, not only its diagonal. The score is
        ``sum over micro-batches of (g . d)^2 / (2 * examples * draws)``; the option of 32 bits
        scores 0. It is the second-order model of :class:`search.sensitivity.KLSensitivity`'s score
        at the cost of about one epoch of fine-tuning per draw, instead of one forward pass per
        (group, option).
        """
        n_opts = [len(o) for o in self.space.options]
        total = [np.zeros(n, dtype=np.float64) for n in n_opts]
        second = [np.zeros((n, n), dtype=np.float64) for n in n_opts]
        n_examples = 0
        gen = self.generator
        for _ in range(int(draws)):
            for b in self.batches:
                if should_stop is not None and should_stop():
                    raise CanceledError("dnas search canceled")
                leaves = [(st.shadow if st.shadow is not None else st.base).detach().clone().requires_grad_(True)
                          for st in self.members]
                keep = [None if st.pruned_idx is None else torch.ones((), device=self.device, requires_grad=True)
                        for st in self.members]
                with torch.enable_grad():
                    out = torch.func.functional_call(self._forward, self._assemble_overrides(leaves, keep), (b,),
                                                     strict=False)
                    loss = self._fisher_loss(out, b, gen)
                    wanted = leaves + [k for k in keep if k is not None]
                    grads = torch.autograd.grad(loss, wanted, allow_unused=True)
                gw = grads[: len(leaves)]
                gk = iter(grads[len(leaves):])
                per_group = [torch.zeros(n, dtype=torch.float64, device=self.device) for n in n_opts]
                with torch.no_grad():
                    for st, leaf, g, k in zip(self.members, leaves, gw, keep, strict=True):
                        gb = next(gk) if k is not None else None
                        if g is None:
                            continue
                        row = per_group[st.group]
                        w = leaf.detach()
                        versions = self._versions(st)
                        if versions is not None and st.int_idx:
                            # the changes themselves (not <g, Q(w)> - <g, w>: no cancellation at 8 bits)
                            dots = torch.tensordot(versions.detach() - w, g, dims=([1, 2], [0, 1]))
                            row[st.int_idx] += dots.double()
                        if st.pruned_idx is not None:
                            gw0 = (g * w).sum().double()
                            row[st.pruned_idx] += -gw0 - (0.0 if gb is None else gb.double())
                for tot, sec, row in zip(total, second, per_group, strict=True):
                    r = row.cpu().numpy()
                    tot += r * r
                    sec += np.outer(r, r)
                n_examples += len(b)
        n = max(1, n_examples)
        # the score of the change between two options, (d_k - d_j)^T F (d_k - d_j) / 2, from the same passes
        self.pair_scores = [
            torch.tensor(0.5 * (np.diag(c)[:, None] + np.diag(c)[None, :] - 2.0 * c) / n, dtype=torch.float32,
                         device=self.device)
            for c in second
        ]
        return [0.5 * t / n for t in total]

    def _fisher_loss(self, out: torch.Tensor, b: TokenizedBatch, gen: torch.Generator) -> torch.Tensor:
        """``r^T A^T z`` of :meth:`sensitivity_scores`, summed over the micro-batch's examples."""
        if self.task == "embeddings":
            ref = out.detach()
            norm = ref.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            u = ref / norm
            r = torch.randn(ref.shape, generator=gen, dtype=torch.float32).to(ref.device)
            r = r - (r * u).sum(-1, keepdim=True) * u
            return ((r * out) / norm).sum()
        if self.task == "regression":
            r = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out.device) * math.sqrt(2.0)
            return (r * out.float()).sum()
        logp = F.log_softmax(out.float(), dim=-1)
        probs = logp.detach().exp().reshape(-1, logp.shape[-1]).cpu()
        y = torch.multinomial(probs, 1, generator=gen).reshape(logp.shape[:-1]).to(logp.device)
        ll = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        if self.task in ("causal_lm", "token_classification"):
            mask = scored_tokens(b, self.task).to(ll.dtype)
            ll = ll * mask / mask.sum(1, keepdim=True).clamp_min(1.0).sqrt()
        return ll.sum()

    def _sample(self, tau: float) -> list[torch.Tensor]:
        ys = []
        for lg in self.logits:
            u = torch.rand(lg.shape, generator=self.generator, dtype=torch.float32).clamp_(1e-10, 1 - 1e-7)
            gumbel = (-torch.log(-torch.log(u))).to(lg.device)
            ys.append(torch.softmax((lg + gumbel) / tau, 0))
        return ys

    def _task_loss(self, out: torch.Tensor, i: int) -> torch.Tensor:
        b = self.batches[i]
        terms = []
        if "task" in self.loss_kind:
            if self.task != "causal_lm":  # classification, token classification, regression: the mean loss
                total, count = task_loss(out, b, self.task)
                terms.append(total / count.clamp_min(1.0))
            else:  # causal_lm: next-token cross-entropy over real tokens
                logits = out[:, :-1]
                target = b.input_ids[:, 1:]
                mask = b.attention_mask[:, 1:].reshape(-1).bool()
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
                terms.append(nll[mask].mean())
        if "kd" in self.loss_kind:
            ref = self.refs[i]
            assert ref is not None  # noqa: S101 - built in __init__ whenever kd is used
            terms.append(discrepancy(ref, out, b, self.task).mean().float())
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]

    def step(self, *, tau: float, target: float, update: Literal["arch", "weights"], optimizer: torch.optim.Optimizer
             ) -> tuple[float, float]:
        """One step on the next micro-batch; returns (task loss, expected cost before the step)."""
        i = self._batch_pos % len(self.batches)
        self._batch_pos += 1
        pairs = self.pair_scores if (update == "arch" and self.options.relaxation == "expected") else None
        ys = [torch.softmax(lg, 0) for lg in self.logits] if pairs is not None else self._sample(tau)
        out = torch.func.functional_call(self._forward, self._overrides(ys), (self.batches[i],), strict=False)
        task_loss = self._task_loss(out, i)
        if pairs is not None:
            # E_p[L] = L(E_p[W]) + sum_g p_g^T M_g p_g / 2 to second order (M_g: pair_scores)
            task_loss = task_loss + 0.5 * sum(y @ m @ y for y, m in zip(ys, pairs, strict=True))
        e_cost = self._expected_cost()
        loss = task_loss
        if update == "arch":
            # log form: the exchange rate between relative loss and relative cost is resource_weight
            loss = torch.log(task_loss + _LOSS_EPS)
            log_ratio = torch.log(e_cost / target).float()
            if self.options.resource_weight > 0:
                loss = loss + self.lam * torch.relu(log_ratio)
            if self.options.resource_floor > 0:
                loss = loss + self.options.resource_floor * log_ratio
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if update == "arch" and self.options.dual_lr > 0:
            # dual ascent on the exchange rate: it grows while E[cost] stays above the target
            ratio = math.log(float(e_cost.detach()) / target)
            self.lam = min(_MAX_LAMBDA, max(self.options.resource_weight, self.lam * math.exp(self.options.dual_lr * ratio)))
        return float(task_loss.detach()), float(e_cost.detach())

    def run_target(
        self,
        target: float,
        steps: int,
        *,
        on_step: Any = None,
        should_stop: StopFn | None = None,
    ) -> TargetRun:
        """``steps`` steps toward ``target`` from the current logits (warm start)."""
        if self._closed:
            raise InvalidInputError("this DNAS search is closed", field="dnas")
        o = self.options
        arch_opt = torch.optim.Adam(self.logits, lr=o.arch_lr, betas=(0.9, 0.95))
        ws, ss = self.trainable()
        groups = []
        if ws:
            groups.append({"params": ws, "lr": o.weight_lr})
        if ss:
            groups.append({"params": ss, "lr": o.scale_lr})
        weight_opt = torch.optim.Adam(groups) if groups else None
        e_start = self.expected_cost()
        first_loss = last_loss = float("nan")
        for s in range(steps):
            if should_stop is not None and should_stop():
                raise CanceledError("dnas search canceled")
            tau = o.tau_start * (o.tau_end / o.tau_start) ** (s / max(1, steps - 1))
            update: Literal["arch", "weights"] = "weights" if (weight_opt is not None and s % 2 == 0) else "arch"
            loss, _ = self.step(tau=tau, target=target, update=update,
                                optimizer=weight_opt if update == "weights" else arch_opt)  # type: ignore[arg-type]
            if s == 0:
                first_loss = loss
            last_loss = loss
            if on_step is not None:
                on_step(s + 1, steps, loss)
        return TargetRun(
            target=float(target),
            steps=steps,
            expected_cost_start=e_start,
            expected_cost_end=self.expected_cost(),
            task_loss_start=first_loss,
            task_loss_end=last_loss,
            probabilities=self.probabilities(),
            corrected=self.corrected_values(),
        )

    def corrected_values(self) -> list[np.ndarray] | None:
        """``s_gk - T * (a_gk - a_gk(init))``: the scores the logits started from, corrected by what the
        search learned (None unless :meth:`init_from_scores` ran)."""
        if self.init_logits is None or self.scores is None:
            return None
        with torch.no_grad():
            return [np.asarray(sc, dtype=np.float64) - self.temperature * (lg.double() - a0.double()).cpu().numpy()
                    for sc, lg, a0 in zip(self.scores, self.logits, self.init_logits, strict=True)]

    def close(self) -> None:
        """Restore the model's ``requires_grad`` flags and training mode (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for p, flag in self._flags:
            p.requires_grad_(flag)
        self.model.train(self._training)

    def __enter__(self) -> DNAS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------
# The front


def _values(probs: list[np.ndarray], space: SearchSpace, mode: str = "cdf",
            corrected: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Allocation values: ``cdf``: ``-log P_g(bits <= b_k)``, minus the log of the probability mass at
    or below each option's precision (options in order of bits, as the space sorts them);
    ``probability``: ``-log p_gk``; ``corrected``: the given values (see :func:`run_dnas`)."""
    if mode == "corrected" and corrected is not None:
        return [np.clip(v - v.min(), 0.0, None) for v in corrected]
    if mode == "probability":
        return [np.minimum(-np.log(np.clip(p, 1e-300, 1.0)), _MAX_VALUE).clip(min=0.0) for p in probs]
    out = []
    for p, opts in zip(probs, space.options, strict=True):
        order = np.argsort([o.bits for o in opts], kind="stable")
        cdf = np.empty(len(p))
        cdf[order] = np.cumsum(p[order])
        out.append(np.minimum(-np.log(np.clip(cdf, 1e-300, 1.0)), _MAX_VALUE).clip(min=0.0))
    return out


def default_targets(problem: alloc.Problem, space: SearchSpace, metric: str, fractions: Sequence[float]) -> list[float]:
    """Targets of ``metric`` at ``fractions`` of the quantization range, largest first: from every
    group at its narrowest integer option (the 2-bit end; pruning then trades against bits inside
    the range) to every group at its widest integer option (groups without an integer option: at
    their cheapest and dearest options)."""

    def at(pick: Any) -> float:
        idx = []
        for opts in space.options:
            ints = [k for k, o in enumerate(opts) if o.is_integer] or list(range(len(opts)))
            idx.append(pick(ints, key=lambda k, opts=opts: opts[k].bits))
        return problem.cost_of(np.array(idx, dtype=np.int64))[metric]

    lo = max(at(min), problem.smallest(metric))
    hi = at(max)
    if hi <= lo:
        hi = problem.cost_of(np.array([len(o) - 1 for o in space.options], dtype=np.int64))[metric]
    ts = sorted({lo + (hi - lo) * f for f in fractions}, reverse=True)
    return [t for t in ts if t > lo] or [hi]


def _steps_plan(o: DNASOptions, n_targets: int, n_batches: int) -> list[int]:
    total = o.epochs * n_batches
    share = total / (n_targets + 1)  # the first target counts twice
    first = o.steps if o.steps is not None else max(o.min_steps, round(2 * share))
    nxt = o.steps_next if o.steps_next is not None else max(o.min_steps, round(share))
    if o.steps is not None and o.steps_next is None:
        nxt = max(1, o.steps // 2)
    return [first] + [nxt] * (n_targets - 1)


def run_dnas(
    search: Search,
    *,
    options: DNASOptions | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> DNASResult:
    """The DNAS front of a live :class:`~search.pipeline.Search` (see the module docstring)."""
    from search.pipeline import Candidate, _in_budget_units, build_problem, sweep_metric

    t0 = time.perf_counter()
    o = options or DNASOptions.from_mapping(search.options.method_options.get("dnas"))
    report = on_progress or (lambda stage, frac, msg: None)
    budget: Budget = search.options.budget
    metric = sweep_metric(budget)
    limits = budget.limits()
    problem0, plimits = build_problem(search.space, search.cost_model, None)
    extra = {k: v for k, v in limits.items() if k != metric}
    extra.update(plimits)
    targets = list(o.targets) if o.targets is not None else default_targets(
        problem0, search.space, metric, o.target_fractions
    )
    targets = sorted(targets, reverse=True)
    report("dnas", 0.0, f"dnas: {len(targets)} targets of {metric}")
    dn = DNAS(
        search.model, search.adapter, search.space, search.cost_model, search.task, search.calibration,
        metric=metric, options=o, seed=search.options.seed, clip=search.options.clip, device=search.device,
    )
    runs: list[TargetRun] = []
    t_scores = 0.0
    calibration: dict[str, Any] = {"applied": False}
    start_tables: list[tuple[str, list[np.ndarray]]] = []
    try:
        if o.init == "budget":
            dn.init_at(targets[0])
        elif o.init == "sensitivity":
            report("dnas", 0.0, "dnas: sensitivity scores")
            scores = dn.sensitivity_scores(o.sensitivity_draws, should_stop=should_stop)
            if o.calibrate or o.start_candidates:
                calibrated, calibration = _calibrate(search, scores, should_stop, o.calibration_sequences)
                if o.start_candidates:
                    start_tables = [("start", scores), ("start, calibrated", calibrated)]
                if o.calibrate:
                    scores = calibrated
            dn.init_from_scores(scores, targets[0], o.sensitivity_temperature)
            t_scores = time.perf_counter() - t0
        plan = _steps_plan(o, len(targets), len(dn.batches))
        total = sum(plan)
        done = 0
        for ti, (target, steps) in enumerate(zip(targets, plan, strict=True)):
            def on_step(s: int, n: int, loss: float, ti: int = ti, base: int = done) -> None:
                report("dnas", (base + s) / total,
                       f"dnas target {ti + 1}/{len(targets)} ({metric} {targets[ti]:.4g}): step {s}/{n}, loss {loss:.4g}")

            runs.append(dn.run_target(target, steps, on_step=on_step, should_stop=should_stop))
            done += steps
    finally:
        dn.close()

    cands: list[Candidate] = []
    seen: set[PrecisionMap] = set()

    def derive(run: TargetRun | list[np.ndarray], lims: dict[str, float], label: str) -> alloc.Allocation | None:
        values = run if isinstance(run, list) else _values(run.probabilities, search.space, o.values, run.corrected)
        problem = alloc.Problem(values=values, weights=problem0.weights, offsets=problem0.offsets, names=problem0.names)
        try:
            a = alloc.allocate(problem, {**lims, **plimits})
        except InfeasibleBudgetError:
            return None
        pmap = search.space.from_choices(a.choices)
        if pmap not in seen:
            seen.add(pmap)
            cands.append(Candidate(pmap, "dnas", float(a.objective), dict(a.limits), label, bool(a.exact), float(a.gap)))
        return a

    if metric in limits and runs:
        nearest = min(runs, key=lambda r: abs(math.log(r.target / limits[metric])))
        try:
            if derive(nearest, limits, "budget") is None:
                alloc.allocate(problem0, {**limits, **plimits})
        except InfeasibleBudgetError as exc:
            raise _in_budget_units(exc) from None
    for r in runs:
        a = derive(r, {**extra, metric: r.target}, f"target {r.target:.4g}")
        if a is not None:
            r.allocation = a
            r.precision_map = search.space.from_choices(a.choices)
    for name, table in start_tables:
        # the maps the steps started from: the allocations of the start's scores at the same targets
        for r in runs:
            derive(table, {**extra, metric: r.target}, f"{name}, target {r.target:.4g}")
        if metric in limits:
            derive(table, limits, f"{name}, budget")
    if o.sweep and len(runs) > 1:
        # more maps at no search cost: budgets between the targets, from the nearest run's probabilities
        lo_t, hi_t = min(targets), max(targets)
        for lim in np.linspace(lo_t, hi_t, search.options.front_points):
            nearest = min(runs, key=lambda r, lim=lim: abs(math.log(r.target / lim)))
            derive(nearest, {**extra, metric: float(lim)}, "sweep")
    if o.sweep and runs:
        # ... and below the smallest target, down to the smallest achievable cost (geometric, as the
        # sensitivity fronts), from the probabilities of the run with the smallest target
        low = min(runs, key=lambda r: r.target)
        problem = alloc.Problem(values=_values(low.probabilities, search.space, o.values, low.corrected),
                                weights=problem0.weights, offsets=problem0.offsets, names=problem0.names)
        try:
            below = alloc.allocate_front(problem, metric, max(2, search.options.front_points // 2),
                                         extra_limits={**extra, **plimits}, spacing="geometric")
        except InfeasibleBudgetError:
            below = []
        for a in below:
            size = problem0.cost_of(a.choices)[metric]
            if size < low.target:
                pmap = search.space.from_choices(a.choices)
                if pmap not in seen:
                    seen.add(pmap)
                    cands.append(Candidate(pmap, "dnas", float(a.objective), dict(a.limits), "sweep", bool(a.exact),
                                           float(a.gap)))
                # below the smallest target the learned probabilities know least: the start's scores too
                for name, table in start_tables:
                    derive(table, {**extra, metric: size}, f"{name}, sweep")
        # ... and above the largest target, up to every group at its dearest option (full precision
        # where the space has it), from the run with the largest target and the start's scores: the
        # targets stop at half the quantization range, and without these the front has nothing near
        # full precision, where the maps that lose least lie
        high = max(runs, key=lambda r: r.target)
        dearest = np.array([int(np.argmax(w)) for w in problem0.weights[metric]], dtype=np.int64)
        top = float(problem0.cost_of(dearest)[metric])
        if top > high.target:
            for lim in np.geomspace(high.target, top, max(2, search.options.front_points // 2) + 1)[1:]:
                derive(high, {**extra, metric: float(lim)}, "sweep above")
                for name, table in start_tables:
                    derive(table, {**extra, metric: float(lim)}, f"{name}, sweep above")
    seconds = time.perf_counter() - t0
    search.timings["search:dnas"] = seconds
    return DNASResult(
        metric=metric, runs=runs, candidates=cands, seconds=seconds, steps=sum(r.steps for r in runs),
        micro_batches=len(dn.batches), info={"loss": dn.loss_kind, "targets": targets, "sensitivity_seconds": t_scores,
              "calibration": calibration},
    )


def _calibrate(search: Search, scores: list[np.ndarray], should_stop: StopFn | None, sequences: int | None = None
               ) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The start's Fisher scores rescaled like the Hessian's (:func:`search.sensitivity.calibrate_scores`):
    the narrow grids by how much more their uniform maps measurably hurt than the additive scores say."""
    space = search.space
    table = {g.name: {o.key(): float(v) for o, v in zip(opts, row, strict=True)}
             for g, opts, row in zip(space.groups, space.options, scores, strict=True)}
    batches = list(search.calibration)
    if sequences is not None:  # the first whole batches holding at least ``sequences`` sequences
        kept, n = [], 0
        for b in batches:
            if n >= sequences:
                break
            kept.append(b)
            n += len(b)
        batches = kept
    ctx = SensitivityContext(search.model, search.adapter, space, search.task, batches, search.device,
                             search.options.seed, search.options.clip)
    new, info = calibrate_scores(ctx, table, should_stop=should_stop)
    return [np.array([new[g.name][o.key()] for o in opts]) for g, opts in zip(space.groups, space.options, strict=True)], info


def dnas_candidates(
    search: Search, *, on_progress: ProgressFn | None = None, should_stop: StopFn | None = None
) -> list[Candidate]:
    """``EXTRA_METHODS["dnas"]``: the DNAS front's maps, for the pipeline to evaluate."""
    return run_dnas(search, on_progress=on_progress, should_stop=should_stop).candidates


def _register() -> None:
    from search.pipeline import EXTRA_METHODS

    EXTRA_METHODS.setdefault("dnas", dnas_candidates)


_register()
