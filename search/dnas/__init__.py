"""DNAS: differentiable search of per-group bit-widths with group pruning (method ``dnas``).

After "Automatic Mixed-Precision Quantization Search of BERT" (Zhao et al., IJCAI 2021): every group
``g`` of the search space carries architecture logits ``a_g`` over its allowed options (bit-widths,
``0`` = pruned, ``16``/``32`` = float); the groups of a tie (``SearchSpace.ties``: q/k/v, gate/up)
share one set of logits (one per *decision*), whose costs and scores are the sums of theirs. One step of the search:

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
cheapest sufficient option).

With ``sweep``, more maps are allocated at no search cost at budgets between the targets, each from
the run with the nearest target; below the smallest target down to the smallest achievable cost
(``front_points // 2`` budgets spaced geometrically, as the sensitivity fronts), from the run with
the smallest target; and above the largest target up to every group at its dearest option, from the
run with the largest target and the start's scores. The front so spans the whole range, from the
all-pruned map to full precision, as the sensitivity fronts do. When the budget limits the swept
metric, one more map is allocated at the budget with the probabilities of the run whose target is
nearest to it.

**Activation widths.** An option with activation bits (``4a8``) mixes the group's inputs as the
weights are mixed (the decoupled mixture of EdMIPS): every member of the group reads
``x + sum_A c_A (Q_A(x) - x)``, ``c_A`` the summed ``y_gk`` of its options at width ``A`` (weight-only
options keep ``x``), the rounding passed straight through (:func:`search.actquant.input_hooks`,
with the search's scales), so a one-hot ``y`` is exactly the W/A map the pipeline evaluates. The
start's scores add the activation change to the weight change of each such option before squaring,
``(g_w . d + g_x . (Q_A(x) - x))^2``, with ``g_x`` the gradient in the member's input from the same
backward pass (:class:`search.actquant.InputProbes`).

**Cost.** A step costs about one forward-backward pass of a micro-batch, however many options there
are; the start's scores about one fine-tuning epoch per draw (``sensitivity_draws``); building the
quantized versions and the references a fraction of an epoch. ``epochs`` (default 1.5) bounds the
steps of all targets together, so the defaults keep the whole search, scores included, within a few
fine-tuning epochs of the model; the step's memory is about that of a fine-tuning step.

Options (``SearchOptions.method_options["dnas"]``, see :class:`DNASOptions`).
Progress goes to ``on_progress("dnas", fraction, message)``; ``should_stop()`` is checked between
steps and raises :class:`~search.errors.CanceledError`. The model is left exactly as found: weights
untouched, ``requires_grad`` flags and the training flag restored, no parametrization installed.

The package: :mod:`search.dnas.options` (:class:`DNASOptions`), :mod:`search.dnas.supernet` (the
mixture, the logits and the steps: :class:`DNAS`), :mod:`search.dnas.run` (targets, steps plan,
:func:`run_dnas`, the registration of ``dnas`` with the pipeline). Measured figures (start, values,
relaxation, calibration, cost in fine-tuning epochs, fronts): ``docs/methods/dnas.md``.
"""


from __future__ import annotations

from search.dnas.options import DNASOptions, LossKind
from search.dnas.run import DNASResult, default_targets, dnas_candidates, run_dnas
from search.dnas.supernet import DNAS, TargetRun

__all__ = [
    "DNAS",
    "DNASOptions",
    "DNASResult",
    "LossKind",
    "TargetRun",
    "default_targets",
    "dnas_candidates",
    "run_dnas",
]
