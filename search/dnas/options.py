"""The options of the DNAS search (``SearchOptions.method_options["dnas"]``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from search.errors import InvalidInputError

__all__ = ["DNASOptions", "LossKind"]

LossKind = Literal["auto", "task", "kd", "task+kd"]


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
      (:attr:`DNAS.pair_scores`): to second order the expected loss of a map drawn from ``p``, whose
      derivative at a point mass toward another option is the whole change of the loss, curvature
      included. No noise is drawn. Neither relaxation's steps beat the best start consistently
      (``docs/methods/dnas.md``): hence ``start_candidates``.
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

