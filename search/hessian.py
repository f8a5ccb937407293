"""Hessian-trace sensitivity (HAWQ-V2) with Hutchinson's estimator, method name ``hessian``.

Score
=====

For a group ``g`` with ``n_g`` weights and an option ``o``::

    score(g, o) = max(0, tr(H_gg)) / n_g  *  sum over g's member slices of quant_error(slice, o)

``tr(H_gg)`` is the trace of the diagonal block of the Hessian of the calibration loss that belongs
to the group's weights, so ``tr(H_gg) / n_g`` is the group's mean curvature per weight (HAWQ-V2), and
``quant_error`` (:func:`search.quant.quant_error`) is the squared error ``||Q(w) - w||^2`` of each
member slice quantized exactly as :meth:`ModelAdapter._write_group` does (per output row of the slice,
or per group of input columns of each row for group-wise options, with the search's clipping). Bits
32 score 0; 16 score the half-precision rounding error; bits 0 (pruned) score ``||w||^2`` of the
group's *weights*. The biases that pruning also zeroes are left out of the score: their curvature is not estimated (only the weights' Hessian is), and for heads and FFN
blocks the pruned rows' biases only feed the pruned columns of the output projection, so the weights'
term already describes the removed function. A negative trace estimate (the Hessian need not be
positive semi-definite, and Hutchinson's estimate of a small trace can fall below 0) is clamped to 0:
a quadratic model with negative curvature would predict that quantizing helps, which is noise here.
The clamp is to a floor of ``TRACE_FLOOR`` (1%) of the median positive mean trace, not to 0: a group
scored 0 at every bit-width would be free to quantize to the coarsest grid, which does hurt.

Weighting
---------

``weighting="trace"`` (the formula above, HAWQ-V2) weighs the whole group's error by one mean
curvature. A sub-layer group spans slices of several matrices (a head: rows of the query, key and
value projections and columns of the output projection), whose curvatures differ by orders of
magnitude, and the rows of one slice differ too (each row has its own quantization scale, so its own
error). Hutchinson's estimator gives more than the trace: ``v * Hv`` is an unbiased estimate of the
Hessian's *diagonal*, so from the same probes (no extra Hessian-vector product, only a reduction per
member slice) the curvature is also estimated per member slice and per row:

* ``members``: ``score = sum over member slices s of (tr(H_ss) / n_s) * quant_error(s)``;
* ``rows``: ``score = sum over rows r of every slice of (sum_i H_ii over r / n_r) * ||Q(w_r) - w_r||^2``
  (with group-wise scales ``Q`` quantizes each group of the row on its own and the row's error is the
  sum of its groups' errors),
  the diagonal second-order estimate of the loss increase at row resolution; at 0 bits this is the
  Optimal Brain Damage saliency ``sum_i H_ii w_i^2`` of the removed weights, row by row.

``rows`` is the default (the measured comparison of the three is in ``docs/methods/hessian.md``).

Each per-slice or per-row mean curvature is floored like the group's (``TRACE_FLOOR`` of the median
positive group mean trace). The stop rule still applies to the groups' traces; the finer estimates
are noisier per row, but the score sums them over the group's rows. ``extra["member_traces"]`` reports
the trace of every member slice (they sum to the group's trace).

Activation widths
-----------------

An option with activation bits (``4a8``) is scored as its weights plus the rounding of the group's
matrix inputs, HAWQ-V2's activation term::

    score(g, bAa) = score(g, b) + sum over g's member inputs x of  sum_e H^x_ee * (Q_a(x) - x)_e^2

``H^x`` is the Hessian of the same calibration loss in the input *as the member reads it* (a zero
perturbation added at that input, :class:`search.actquant.InputProbes`: a row block's rows, a
column block's columns); its diagonal is estimated by Hutchinson's ``v * H^x v``, one Hessian-vector
product per probe serving every member, with as many Rademacher probes per batch as the weights'
estimate used for that batch (:class:`Rademacher` over the perturbations in call order, from a CPU
generator seeded with ``ctx.seed``; ``extra["activation_hvps"]`` counts them, one more gradient graph
per batch). ``weighting="rows"`` weighs each token's squared error by the mean curvature of its
columns; ``trace`` and ``members`` by the mean curvature of the whole member input (the HAWQ-V2 form
``tr(H^x) / n * ||Q(x) - x||^2``). ``Q_a`` uses the search's scales (per token or static). A negative
estimate adds 0. The cross terms between the weights' and the activations' errors are dropped
(:func:`search.actquant.add_activation_scores`).

Calibration
-----------

The scores are additive: the allocator predicts a map's damage as the sum of its groups' scores,
each measured alone. At the narrowest grids that sum is not what happens: the errors of many groups
compound, and the additive model underrates the narrowest widths relative to the others. With
``calibrate=True`` (the default) the method measures the uniform map of every integer bit-width of
the space on the calibration batches (one forward pass per width,
:func:`search.sensitivity.calibrate_scores`), takes each width's ratio ``r_b`` of measured discrepancy
(:func:`search.tasks.discrepancy`) to the sum of its scores, and multiplies every score at ``b`` bits
by ``f_b = max(1, r_b / median_b r_b)``, made non-increasing in ``b`` (a narrower grid never gets a
smaller factor than a wider one); pruning (0 bits) gets the factor of the narrowest integer width
(:func:`search.sensitivity.calibration_factors`). The widths that behave additively keep factor 1, so
the scale of the scores (and every ranking within one width) is unchanged. ``extra["calibration"]``
reports what was measured, predicted and the factors; ``calibrate=False`` keeps the raw scores.

Loss
====

The loss is the mean over the calibration set (examples, or predicted tokens for causal LMs), so that
traces do not depend on how the set is cut into batches:

* ``sequence_classification`` with labels in every batch: cross-entropy of the logits;
* ``token_classification`` with labels: cross-entropy per labeled token (the mean is over labeled tokens);
* ``regression`` with labels: squared error to the labels;
* ``causal_lm``: next-token cross-entropy (labels are the input ids shifted by one, over real tokens);
* otherwise (classification or regression without labels, ``embeddings``): *self-distillation* to the model's own
  full-precision output, the discrepancy the KL method and the metrics use
  (:func:`search.tasks.discrepancy`: ``KL(p_ref || p)`` of the output distribution, ``1 - cosine`` of
  the mean-pooled embedding), with the reference being the detached output of the same forward pass.
  Its gradient vanishes at the reference, but its Hessian does not: writing the loss as
  ``l(f(theta))`` with ``l`` minimal at ``f = f_ref``, the Hessian is
  ``J^T (d^2 l / d f^2) J + sum_k (dl/df_k) d^2 f_k / d theta^2`` and the second term is multiplied by
  the zero residual ``dl/df``. What remains is exactly the generalised Gauss-Newton matrix (for the
  KL, the Fisher information of the output distribution; for ``1 - cosine``,
  ``J^T (I - u u^T) J / ||f||^2`` with ``u`` the unit reference embedding): positive semi-definite,
  and the second-order term of the very discrepancy the search evaluates. Autograd differentiates
  through the residual's graph, so double backward computes this product without forming ``J``.

Estimator
=========

Hutchinson with Rademacher probes ``v`` (a seeded :class:`torch.Generator`, so runs are
reproducible): ``E[v^T H v] = tr(H)``. For every calibration batch the graph of the gradient is built
once (``torch.autograd.grad(loss, params, create_graph=True)``) and reused by every probe of that batch
(``retain_graph=True``); one Hessian-vector product per probe serves every group: the group's sample is
``sum over its blocks of v_block . (Hv)_block`` (:meth:`ModelAdapter.group_params` addresses the
blocks in each parameter's own layout). The probe is zero outside the groups' weights, and only the
parameters the groups touch require gradients during the computation.

Probes are independent across batches, and the estimate is stratified: the trace of the whole loss is
the sum over batches of each batch's mean sample, with squared standard error
``sum_b var_b / n_b`` (Welford's running mean and variance per batch and group). Per-group stop rule:
stop when every group's *relative* standard error ``se / |trace|`` is below ``tolerance``, or when every
batch has had ``max_probes`` probes; every batch gets at least ``min_probes``. A group whose mean trace
stays below the scores' floor (``TRACE_FLOOR`` of the median) even at its upper confidence bound
(estimate + 3 standard errors) counts as settled: it is scored at the floor whatever more probes
would say, and a trace near 0 has an unbounded relative error that no number of probes brings under
the tolerance (``extra["settled_below_floor"]`` counts them). The number of probes a
batch needs is projected from the statistics gathered so far (all groups, all batches seen), so that
usually one pass over the batches suffices; when the projection fell short, another pass rebuilds the
graphs of the batches that need more probes and tops them up.

Cost, in forward passes over the calibration batches: one gradient graph per batch and pass (a forward
and a backward with ``create_graph``, about 3.5 units) and one Hessian-vector product per probe and
batch (a double backward, about 6.5 units: it runs six matrix products per linear layer where the
forward runs one), so about ``3.5 + 6.5 m`` for ``m`` probes per batch in one pass
(``benchmarks/bench_hessian.py`` measures it), plus one forward pass per integer bit-width and one
for the reference when the scores are calibrated (``extra["calibration"]["forwards"]`` counts these
passes over single batches).

Reported: ``SensitivityTable.errors[group]`` is the group's relative standard error (the quantity the
stop rule compares with ``tolerance``); ``samples`` is the number of Hessian-vector products;
``extra`` holds the traces, their standard errors, mean traces, probes per batch, the stop reason and
the forward / backward accounting.

Model state
===========

The model is left exactly as found: weights are never written, ``requires_grad`` flags and the
train/eval mode of every module are restored (the computation runs in eval mode: dropout would make
the loss random), and so is the attention implementation. Scaled-dot-product attention kernels have
no double backward on CPU (nor the fused CUDA ones), so a transformers model whose
``config._attn_implementation`` is not ``"eager"`` is switched with ``model.set_attn_implementation
("eager")`` for the computation and switched back afterwards (:func:`search.attention.eager_attention`);
a model that cannot be switched runs with the math SDPA backend (differentiable twice) instead.

Measured figures (weightings compared, calibration, probe cost): ``docs/methods/hessian.md``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bitscout.methods import HessianOptions
from search.actquant import ActivationCurvature, InputProbes, add_activation_scores
from search.attention import attn_implementation, eager_attention
from search.data import TokenizedBatch
from search.errors import InvalidInputError
from search.quant import fake_quantize, quant_error
from search.result import SensitivityTable
from search.sensitivity import (
    ProgressFn,
    SensitivityContext,
    SensitivityMethod,
    StopFn,
    _check_stop,
    calibrate_scores,
)
from search.space import SearchSpace
from search.tasks import IGNORE_INDEX, Task, discrepancy, eval_mode, has_task_loss, model_output, task_loss
from search.tensor_train import option_weight

Weighting = Literal["trace", "members", "rows"]

#: Mean traces below this fraction of the median positive mean trace are raised to it (see above).
TRACE_FLOOR = 0.01

__all__ = ["HessianSensitivity", "batch_loss", "hessian_mode", "loss_kind", "loss_normaliser", "Rademacher"]

STAGE = "sensitivity:hessian"
#: relative errors above this are reported as this value (JSON has no infinity)
_MAX_REPORTED_ERROR = 1e6


# ------------------------------------------------------------------------------------------ loss


_SUPERVISED_KIND = {
    "sequence_classification": "cross_entropy",
    "token_classification": "token_cross_entropy",
    "regression": "squared_error",
}


def loss_kind(task: Task, batches: Sequence[TokenizedBatch]) -> str:
    """``"cross_entropy"`` (labelled classification), ``"token_cross_entropy"`` (labelled token
    classification), ``"squared_error"`` (labelled regression), ``"next_token"`` (causal LM) or
    ``"self_distillation"`` (everything else); see the module docstring."""
    if task == "causal_lm":
        return "next_token"
    if task in _SUPERVISED_KIND and has_task_loss(task, batches):
        return _SUPERVISED_KIND[task]
    return "self_distillation"


def loss_normaliser(task: Task, batches: Sequence[TokenizedBatch]) -> int:
    """What the summed loss is divided by: predicted tokens for causal LMs, labeled tokens for
    labelled token classification, examples otherwise."""
    if task == "causal_lm":
        return int(sum(int(b.attention_mask[:, 1:].sum()) for b in batches))
    if loss_kind(task, batches) == "token_cross_entropy":
        return int(sum(int((b.labels != IGNORE_INDEX).sum()) for b in batches if b.labels is not None))
    return int(sum(int(b.input_ids.shape[0]) for b in batches))


def batch_loss(model: nn.Module, batch: TokenizedBatch, task: Task, kind: str) -> torch.Tensor:
    """The *summed* loss of one batch (divide by :func:`loss_normaliser` for the mean)."""
    out = model_output(model, batch, task)
    if kind == "next_token":
        logits = out[:, :-1]
        target = batch.input_ids[:, 1:]
        mask = batch.attention_mask[:, 1:].reshape(-1).to(logits.dtype)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        return (nll * mask).sum()
    if kind in _SUPERVISED_KIND.values():
        return task_loss(out, batch, task)[0]
    return discrepancy(out.detach(), out, batch, task).sum()


# ------------------------------------------------------------------------------ model state


@contextmanager
def hessian_mode(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[dict[str, Any]]:
    """Prepare ``model`` for double backward and restore it exactly on exit.

    Only ``params`` require gradients; every module is in eval mode; the attention implementation is
    ``"eager"`` (or SDPA is limited to its math backend when the model cannot be switched). Yields a
    dict describing what was changed.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    info: dict[str, Any] = {
        "attn_implementation": attn_implementation(model),
        "switched_to_eager": False,
        "sdpa_math": False,
    }
    with ExitStack() as stack:
        try:
            switch = stack.enter_context(eager_attention([model]))
            info["switched_to_eager"] = switch.switched_to_eager
            if not switch.ok:
                # not switchable (or not a transformers model): keep SDPA on its math backend,
                # which autograd can differentiate twice
                from torch.nn.attention import SDPBackend, sdpa_kernel

                stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
                info["sdpa_math"] = True
            for p in model.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            stack.enter_context(eval_mode(model))
            yield info
        finally:
            for p, f in flags:
                p.requires_grad_(f)


# ------------------------------------------------------------------------------- estimator


class Rademacher:
    """Draws Rademacher probes (independent +-1 entries, probability 1/2 each) shaped like ``params``
    from the seeded ``gen``, into buffers allocated once and refilled by every :meth:`draw`.

    Eight entries come from one random byte (bit ``k`` of byte ``i`` is entry ``8 i + k``), so the
    generator draws an eighth of the numbers a draw per entry would; with the buffers reused this about
    halves the cost of a probe on CPU, where drawing and page faults dominate (figures in
    ``docs/methods/hessian.md``). The probes returned by a draw are overwritten by the next one.
    """

    def __init__(self, params: Sequence[torch.Tensor], gen: torch.Generator, device: torch.device) -> None:
        self.gen = gen
        self.device = device
        self.shifts = torch.arange(8, device=device, dtype=torch.uint8)
        self.values = [torch.empty(p.shape, device=device, dtype=p.dtype) for p in params]
        self.raw = [torch.empty(((p.numel() + 7) // 8,), device=device, dtype=torch.uint8) for p in params]
        self.bits = [torch.empty(((p.numel() + 7) // 8, 8), device=device, dtype=torch.uint8) for p in params]

    def draw(self) -> list[torch.Tensor]:
        out = []
        for v, raw, bits in zip(self.values, self.raw, self.bits, strict=True):
            raw.random_(0, 256, generator=self.gen)
            torch.bitwise_right_shift(raw.unsqueeze(-1), self.shifts, out=bits)
            bits.bitwise_and_(1)
            out.append(v.view(-1).copy_(bits.view(-1)[: v.numel()]).mul_(2).sub_(1).view(v.shape))
        return out


@dataclass
class _Reducer:
    """How one parameter's ``v * Hv`` is summed into the groups' samples.

    ``full``: the whole parameter belongs to group ``group`` (a dot product); ``rows`` / ``cols``: the
    groups hold blocks of rows / columns (in the parameter's own layout), ``index[k]`` is the group of
    row / column ``k`` (``n_groups`` for none, a bin that is dropped), so one reduction and one
    ``index_add_`` serve every group; ``blocks``: anything else, block by block.
    """

    kind: Literal["full", "rows", "cols", "blocks"]
    group: int = -1
    index: torch.Tensor | None = None
    blocks: tuple[tuple[int, Any], ...] = ()


@dataclass(frozen=True)
class _Segment:
    """One member slice of one group, for the per-row curvature: ``param[index]`` summed over
    ``dim`` (the parameter's input dimension) gives the slice's rows (in the ``[out, in]`` layout),
    stored at ``rows[offset : offset + length]``; ``cols`` is the slice's number of input columns."""

    group: int
    param: int
    index: Any
    dim: int
    offset: int
    length: int
    cols: int


@dataclass
class _Plan:
    """The parameters the groups touch, the probe masks, and how each parameter's samples are summed."""

    params: list[nn.Parameter]
    masks: list[torch.Tensor | None]  # None: the whole parameter is probed
    reducers: list[_Reducer]
    n_groups: int
    segments: list[_Segment] | None = None  # per member slice; only when the rows are collected
    n_rows: int = 0


_ALL = slice(None)


def _reducer(p: torch.Tensor, blocks: list[tuple[int, Any]], n_groups: int) -> _Reducer:
    if len(blocks) == 1 and blocks[0][1] == (_ALL, _ALL):
        return _Reducer("full", group=blocks[0][0])
    for dim, kind in ((0, "rows"), (1, "cols")):
        other = 1 - dim
        if all(
            isinstance(idx, tuple) and len(idx) == 2 and idx[other] == _ALL and isinstance(idx[dim], slice)
            for _, idx in blocks
        ):
            index = torch.full((p.shape[dim],), n_groups, dtype=torch.long)
            owned = torch.zeros(p.shape[dim], dtype=torch.bool)
            for g, idx in blocks:
                if owned[idx[dim]].any():
                    break  # overlapping blocks: sum them one by one
                owned[idx[dim]] = True
                index[idx[dim]] = g
            else:
                return _Reducer(kind, index=index.to(p.device))  # type: ignore[arg-type]
    return _Reducer("blocks", blocks=tuple(blocks))


def _plan(ctx: SensitivityContext, *, rows: bool = False) -> _Plan:
    params: list[nn.Parameter] = []
    pos: dict[int, int] = {}
    per_param: list[list[tuple[int, Any]]] = []  # (group, index) blocks of every parameter
    segments: list[_Segment] = []
    offset = 0
    for gi, g in enumerate(ctx.space.groups):
        for m, (p, idx) in zip(g.members, ctx.adapter.group_params(g), strict=True):
            if id(p) not in pos:
                pos[id(p)] = len(params)
                params.append(p)
                per_param.append([])
            per_param[pos[id(p)]].append((gi, idx))
            if rows:
                # the [out, in] view is the parameter itself for Linear, its transpose for Conv1D
                dim = 1 if ctx.adapter.weight(m.module) is p else 0
                block = p[idx]
                length, cols = int(block.shape[1 - dim]), int(block.shape[dim])
                segments.append(_Segment(gi, pos[id(p)], idx, dim, offset, length, cols))
                offset += length
    masks: list[torch.Tensor | None] = []
    for p, blocks in zip(params, per_param, strict=True):
        m = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
        for _, idx in blocks:
            m[idx] = True
        masks.append(None if bool(m.all()) else m.to(p.dtype))
    n_groups = len(ctx.space.groups)
    reducers = [_reducer(p, blocks, n_groups) for p, blocks in zip(params, per_param, strict=True)]
    return _Plan(params, masks, reducers, n_groups, segments if rows else None, offset)


class _Stats:
    """Welford running mean / M2 per (batch, group), and the stratified totals."""

    def __init__(self, n_batches: int, n_groups: int, n_rows: int = 0) -> None:
        self.n = np.zeros(n_batches, dtype=np.int64)
        self.mean = np.zeros((n_batches, n_groups), dtype=np.float64)
        self.m2 = np.zeros((n_batches, n_groups), dtype=np.float64)
        self.row_sums = np.zeros((n_batches, n_rows), dtype=np.float64) if n_rows else None

    def add(self, b: int, x: np.ndarray, rows: np.ndarray | None = None) -> None:
        self.n[b] += 1
        delta = x - self.mean[b]
        self.mean[b] += delta / self.n[b]
        self.m2[b] += delta * (x - self.mean[b])
        if rows is not None and self.row_sums is not None:
            self.row_sums[b] += rows

    def row_totals(self) -> np.ndarray | None:
        """Per-row curvature (sum over batches of each batch's mean ``v * Hv`` summed over the row)."""
        if self.row_sums is None:
            return None
        seen = self.n >= 1
        out: np.ndarray = (self.row_sums[seen] / self.n[seen][:, None]).sum(0)
        return out

    def _var(self, seen: np.ndarray) -> np.ndarray:
        var: np.ndarray = self.m2[seen] / (self.n[seen] - 1)[:, None]
        return var

    def totals(self) -> tuple[np.ndarray, np.ndarray]:
        """Trace estimate per group (sum of batch means) and its standard error."""
        seen = self.n >= 2
        trace = self.mean[self.n >= 1].sum(0)
        var = (self._var(seen) / self.n[seen][:, None]).sum(0) if seen.any() else np.zeros(self.mean.shape[1])
        return trace, np.sqrt(var)

    def relative_errors(self) -> np.ndarray:
        trace, se = self.totals()
        return _relative(se, trace)

    def settled(self, n_params: np.ndarray) -> np.ndarray:
        """Groups whose mean trace is below the scores' floor (``TRACE_FLOOR`` of the median positive
        mean trace) even at its upper confidence bound (estimate + 3 standard errors): they are scored
        at the floor whatever more probes would say, so the stop rule does not wait for them (a trace
        near 0 has an unbounded relative error)."""
        trace, se = self.totals()
        if not (self.n >= 2).any():
            return np.zeros(trace.shape, dtype=bool)
        means = trace / np.maximum(1, n_params)
        positive = means[means > 0]
        if not positive.size:
            return np.zeros(trace.shape, dtype=bool)
        floor = TRACE_FLOOR * float(np.median(positive))
        out: np.ndarray = (trace + 3.0 * se) / np.maximum(1, n_params) < floor
        return out

    def required(self, tolerance: float, ignore: np.ndarray | None = None) -> float:
        """Probes per batch that would bring every group's relative error under ``tolerance`` (but the
        ``ignore``d ones), if every batch had that many; batches not seen yet are extrapolated from the
        ones seen."""
        seen = self.n >= 2
        k = int(seen.sum())
        if k == 0:
            return 0.0
        scale = len(self.n) / k
        trace = self.mean[seen].sum(0) * scale
        s2 = self._var(seen).sum(0) * scale
        with np.errstate(divide="ignore", invalid="ignore"):
            req = np.where(s2 == 0, 0.0, s2 / (tolerance**2 * trace**2))
        if ignore is not None:
            req = np.where(ignore, 0.0, req)
        return float(np.nanmax(req)) if req.size else 0.0


def _relative(se: np.ndarray, trace: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(se == 0, 0.0, se / np.abs(trace))


class HessianSensitivity(SensitivityMethod):
    """Hutchinson Hessian-trace sensitivity (see the module docstring).

    Options (:class:`bitscout.methods.HessianOptions`): ``tolerance``: target relative standard
    error of every group's trace; ``min_probes`` / ``max_probes``: probes per calibration batch;
    ``margin``: factor on the projected number of probes; ``weighting``: how curvature weighs the
    quantization error (``trace``, ``members`` or ``rows``, see the module docstring);
    ``calibrate``: rescale the scores of the narrow bit-widths by how much more their uniform maps
    measurably hurt than the quadratic model predicts (see "Calibration" in the module docstring).
    """

    name = "hessian"

    options: HessianOptions

    @property
    def weighting(self) -> Weighting:
        return self.options.weighting

    @property
    def calibrate(self) -> bool:
        return self.options.calibrate

    @property
    def tolerance(self) -> float:
        return float(self.options.tolerance)

    @property
    def min_probes(self) -> int:
        return self.options.min_probes

    @property
    def max_probes(self) -> int:
        return self.options.max_probes

    @property
    def margin(self) -> float:
        return float(self.options.margin)

    # -------------------------------------------------------------------------------- compute
    def compute(
        self,
        ctx: SensitivityContext,
        *,
        on_progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
    ) -> SensitivityTable:
        t0 = time.perf_counter()
        if not ctx.batches:
            raise InvalidInputError(
                "Hessian sensitivity needs at least one calibration batch", field="calibration"
            )
        kind = loss_kind(ctx.task, ctx.batches)
        norm = loss_normaliser(ctx.task, ctx.batches)
        if norm == 0:
            raise InvalidInputError(
                "the calibration batches have no token to predict (sequences of one token)",
                field="calibration",
            )
        plan = _plan(ctx, rows=self.weighting != "trace")
        probes = InputProbes(ctx.space, ctx.act_static)
        act = ActivationCurvature("rows" if self.weighting == "rows" else "members")
        with hessian_mode(ctx.model, plan.params) as mode, torch.inference_mode(False), torch.enable_grad():
            stats, acct = self._estimate(ctx, plan, kind, norm, on_progress, should_stop)
            if probes:
                self._activations(ctx, kind, norm, probes, act, [int(n) for n in stats.n], acct, should_stop)
        trace, se = stats.totals()
        rel = _relative(se, trace)
        t_scores = time.perf_counter()
        scores = add_activation_scores(ctx.space, self._scores(ctx, trace, plan, stats.row_totals()), act.totals())
        acct["seconds_scores"] = time.perf_counter() - t_scores
        calibration: dict[str, Any] = {"applied": False}
        if self.calibrate:
            t_cal = time.perf_counter()
            scores, calibration = calibrate_scores(ctx, scores, should_stop=should_stop)
            acct["seconds_calibration"] = time.perf_counter() - t_cal

        space = ctx.space
        names = [g.name for g in space.groups]
        n_params = [g.n_params for g in space.groups]
        errors = {n: float(min(r, _MAX_REPORTED_ERROR)) for n, r in zip(names, rel, strict=True)}
        hvps = int(stats.n.sum())
        if on_progress is not None:
            on_progress(STAGE, 1.0, f"{hvps} Hessian-vector products, stopped at {acct['stopped']}")
        extra: dict[str, Any] = {
            "loss": kind,
            "loss_normaliser": norm,
            "tolerance": self.tolerance,
            "weighting": self.weighting,
            "calibration": calibration,
            "min_probes": self.min_probes,
            "max_probes": self.max_probes,
            "stopped": acct.pop("stopped"),
            "probes": int(stats.n.max()),
            "probes_per_batch": [int(x) for x in stats.n],
            "batches": len(ctx.batches),
            "hvps": hvps,
            "traces": {n: float(t) for n, t in zip(names, trace, strict=True)},
            "trace_se": {n: float(s) for n, s in zip(names, se, strict=True)},
            "mean_traces": {
                n: max(0.0, float(t)) / max(1, k) for n, t, k in zip(names, trace, n_params, strict=True)
            },
            "max_relative_error": float(min(rel.max(), _MAX_REPORTED_ERROR)) if rel.size else 0.0,
            **_member_traces(plan, stats.row_totals(), names),
            "attn_implementation": mode["attn_implementation"],
            "switched_to_eager": mode["switched_to_eager"],
            "sdpa_math": mode["sdpa_math"],
            **acct,
            "seconds": time.perf_counter() - t0,
        }
        return SensitivityTable(method=self.name, scores=scores, samples=hvps, errors=errors, extra=extra)

    def _estimate(
        self,
        ctx: SensitivityContext,
        plan: _Plan,
        kind: str,
        norm: int,
        on_progress: ProgressFn | None,
        should_stop: StopFn | None,
    ) -> tuple[_Stats, dict[str, Any]]:
        model, batches = ctx.model, ctx.batches
        n_batches, n_groups = len(batches), plan.n_groups
        stats = _Stats(n_batches, n_groups, plan.n_rows)
        devices = {p.device for p in plan.params}
        gen_device = next(iter(devices)) if len(devices) == 1 else torch.device("cpu")
        gen = torch.Generator(device=gen_device)
        gen.manual_seed(int(ctx.seed))
        probes = Rademacher(plan.params, gen, gen_device)
        acct: dict[str, Any] = {
            "rounds": 0,
            "graph_builds": 0,
            "seconds_forward": 0.0,
            "seconds_gradient": 0.0,
            "seconds_hvp": 0.0,
        }
        tol, lo, hi = self.tolerance, self.min_probes, self.max_probes
        last_report = 0.0
        progress = 0.0
        floor = lo  # raised when a pass did nothing although the rule is not met (float rounding)

        n_params = np.array([g.n_params for g in ctx.space.groups], dtype=np.float64)

        def target() -> int:
            need = stats.required(tol, ignore=stats.settled(n_params))
            if not math.isfinite(need):
                return hi
            return int(min(hi, max(floor, math.ceil(self.margin * need))))

        def report(message: str) -> None:
            nonlocal last_report, progress
            if on_progress is None:
                return
            goal = target()
            planned = sum(max(int(n), goal) for n in stats.n)
            progress = max(progress, min(0.999, float(stats.n.sum()) / max(1, planned)))
            now = time.perf_counter()
            if now - last_report > 0.5:
                last_report = now
                on_progress(STAGE, progress, message)

        stopped = "max_probes"
        while True:
            acct["rounds"] += 1
            before = int(stats.n.sum())
            for b, batch in enumerate(batches):
                if stats.n[b] >= target():
                    continue
                _check_stop(should_stop)
                t = time.perf_counter()
                loss = batch_loss(model, batch, ctx.task, kind) / norm
                acct["seconds_forward"] += time.perf_counter() - t
                if not bool(torch.isfinite(loss)):
                    raise InvalidInputError(
                        f"the calibration loss of batch {b} is not finite ({float(loss)})", field="model"
                    )
                t = time.perf_counter()
                grads = torch.autograd.grad(loss, plan.params, create_graph=True, allow_unused=True)
                acct["seconds_gradient"] += time.perf_counter() - t
                acct["graph_builds"] += 1
                live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
                while stats.n[b] < target():
                    _check_stop(should_stop)
                    t = time.perf_counter()
                    stats.add(b, *self._probe(plan, grads, live, probes))
                    acct["seconds_hvp"] += time.perf_counter() - t
                    report(f"batch {b + 1}/{n_batches}, probe {int(stats.n[b])}")
                del loss, grads
            rel = stats.relative_errors()
            if bool(((rel < tol) | stats.settled(n_params)).all()):
                stopped = "tolerance"
                break
            if bool((stats.n >= hi).all()):
                break
            if int(stats.n.sum()) == before:
                floor = min(hi, int(stats.n.min()) + 1)
        acct["stopped"] = stopped
        acct["settled_below_floor"] = int(stats.settled(n_params).sum())
        return stats, acct

    @staticmethod
    def _activations(
        ctx: SensitivityContext,
        kind: str,
        norm: int,
        probes: InputProbes,
        act: ActivationCurvature,
        n_probes: Sequence[int],
        acct: dict[str, Any],
        should_stop: StopFn | None,
    ) -> None:
        """The activation term (see "Activation widths" in the module docstring): per batch ``b``,
        ``n_probes[b]`` Hutchinson probes of the Hessian of the loss in the probed inputs, their mean
        ``v * Hv`` accumulated as each member input's curvature."""
        t0 = time.perf_counter()
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(ctx.seed))
        hvps = 0
        for b, batch in enumerate(ctx.batches):
            _check_stop(should_stop)
            probes.reset()
            with probes.installed(ctx.adapter._modules):
                loss = batch_loss(ctx.model, batch, ctx.task, kind) / norm
            eps = probes.tensors()
            grads = torch.autograd.grad(loss, eps, create_graph=True, allow_unused=True)
            live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            m = max(1, int(n_probes[b]))
            diag = [torch.zeros_like(e) for e in eps]
            draws = Rademacher(eps, gen, torch.device("cpu"))
            for _ in range(m):
                _check_stop(should_stop)
                vs = draws.draw()
                if not live:
                    continue
                hv = torch.autograd.grad(
                    [grads[i] for i in live],
                    eps,
                    grad_outputs=[vs[i].to(eps[i].device) for i in live],
                    retain_graph=True,
                    allow_unused=True,
                )
                hvps += 1
                for j, h in enumerate(hv):
                    if h is not None:
                        diag[j] += vs[j].to(h.device) * h.detach()
            act.add(probes.calls, [d / m for d in diag])
            del loss, grads
            probes.reset()
        acct["activation_hvps"] = hvps
        acct["seconds_activations"] = time.perf_counter() - t0

    @staticmethod
    def _probe(
        plan: _Plan,
        grads: Sequence[torch.Tensor | None],
        live: list[int],
        probes: Rademacher,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """One Rademacher probe: one Hessian-vector product, one sample per group (and, when the plan
        collects them, one per member row)."""
        vs = []
        for p, mask, v in zip(plan.params, plan.masks, probes.draw(), strict=True):
            v = v.to(p.device)
            vs.append(v if mask is None else v.mul_(mask))
        hv: list[torch.Tensor | None] = [None] * len(plan.params)
        if live:
            outputs: list[torch.Tensor] = []
            for i in live:
                g = grads[i]
                assert g is not None  # noqa: S101 - live grads exist
                outputs.append(g)
            hv = list(
                torch.autograd.grad(
                    outputs,
                    plan.params,
                    grad_outputs=[vs[i] for i in live],
                    retain_graph=True,
                    allow_unused=True,
                )
            )
        sums = torch.zeros(plan.n_groups + 1, device=probes.device, dtype=torch.float64)
        for v, h, red in zip(vs, hv, plan.reducers, strict=True):
            if h is None:
                continue
            if red.kind == "full":
                sums[red.group] += torch.dot(v.reshape(-1), h.reshape(-1)).to(sums.device, torch.float64)
            elif red.kind == "blocks":
                prod = v * h
                for gi, idx in red.blocks:
                    sums[gi] += prod[idx].sum().to(sums.device, torch.float64)
            else:
                assert red.index is not None  # noqa: S101 - set for rows / cols
                per = (v * h).sum(dim=1 if red.kind == "rows" else 0, dtype=torch.float32)
                sums.index_add_(0, red.index.to(sums.device), per.to(sums.device, torch.float64))
        rows = None
        if plan.segments is not None:
            out = torch.zeros(plan.n_rows, device=probes.device, dtype=torch.float64)
            prods: dict[int, torch.Tensor] = {}
            for seg in plan.segments:
                h = hv[seg.param]
                if h is None:
                    continue
                if seg.param not in prods:
                    prods[seg.param] = vs[seg.param] * h
                part = prods[seg.param][seg.index].sum(dim=seg.dim, dtype=torch.float32)
                out[seg.offset : seg.offset + seg.length] = part.to(out.device, torch.float64)
            rows = out.cpu().numpy()
        return sums[: plan.n_groups].cpu().numpy(), rows

    # --------------------------------------------------------------------------------- scores
    @torch.no_grad()
    def _scores(
        self,
        ctx: SensitivityContext,
        trace: np.ndarray,
        plan: _Plan | None = None,
        row_trace: np.ndarray | None = None,
    ) -> dict[str, dict[str, float]]:
        space: SearchSpace = ctx.space
        scores: dict[str, dict[str, float]] = {}
        clip: Literal["mse", "minmax"] = "minmax" if ctx.clip == "minmax" else "mse"
        means = [float(t) / max(1, g.n_params) for g, t in zip(space.groups, trace, strict=True)]
        positive = [m for m in means if m > 0]
        floor = TRACE_FLOOR * float(np.median(positive)) if positive else 0.0
        # the curvature per weight of every member slice (members) or of every row of it (rows)
        member_curv: dict[int, list[np.ndarray]] = {}
        if self.weighting != "trace" and plan is not None and plan.segments is not None and row_trace is not None:
            for seg in plan.segments:
                r = row_trace[seg.offset : seg.offset + seg.length]
                if self.weighting == "members":
                    c = np.full(seg.length, float(r.sum()) / max(1, seg.length * seg.cols))
                else:
                    c = r / max(1, seg.cols)
                member_curv.setdefault(seg.group, []).append(np.maximum(floor, c))
        for gi, (g, opts, raw) in enumerate(zip(space.groups, space.options, means, strict=True)):
            mean_trace = max(floor, raw)
            curv = member_curv.get(gi)
            row: dict[str, float] = {}
            for opt in opts:
                if opt.unchanged:
                    row[opt.key()] = 0.0
                    continue
                err = 0.0
                for k, m in enumerate(g.members):
                    w = ctx.adapter.member_slice(m)
                    if opt.is_tt:
                        d = w.detach().to(torch.float64) - option_weight(
                            w, int(opt.tt_rank), opt.bits, symmetric=opt.symmetric, clip=clip  # type: ignore[arg-type]
                        ).to(torch.float64)
                        rows = d.square().sum(dim=1).cpu().numpy()
                        err += mean_trace * float(rows.sum()) if curv is None else float(np.dot(curv[k], rows))
                    elif curv is None:
                        err += mean_trace * quant_error(
                            w, opt.bits, symmetric=opt.symmetric, clip=clip, group_size=opt.group_size
                        )
                    else:
                        err += float(np.dot(curv[k], _row_errors(w, opt.bits, opt.symmetric, clip, opt.group_size)))
                row[opt.key()] = max(0.0, err)
            scores[g.name] = row
        return scores


def _member_traces(plan: _Plan, row_trace: np.ndarray | None, names: list[str]) -> dict[str, Any]:
    """``{"member_traces": {group: [trace of each member slice]}}`` when the rows were collected."""
    if plan.segments is None or row_trace is None:
        return {}
    out: dict[str, list[float]] = {}
    for seg in plan.segments:
        out.setdefault(names[seg.group], []).append(float(row_trace[seg.offset : seg.offset + seg.length].sum()))
    return {"member_traces": out}


def _row_errors(
    w: torch.Tensor, bits: int, symmetric: bool, clip: Literal["mse", "minmax"], group_size: int | None = None
) -> np.ndarray:
    """Squared quantization error of every row of ``w`` (``[out, in]`` layout), float64, under the
    option's own quantizer: with group-wise scales, the sum of the errors of the row's groups."""
    fq = fake_quantize(w, bits, symmetric=symmetric, clip=clip, group_size=group_size)
    diff = w.detach().to(torch.float32) - fq.to(torch.float32)
    out: np.ndarray = diff.square_().sum(dim=1, dtype=torch.float64).cpu().numpy()
    return out
