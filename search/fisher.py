"""Fisher sensitivity, method name ``fisher``: one forward and one backward pass per calibration
(micro-)batch score every (group, option), whatever the number of groups.

Score
=====

For a group ``g`` and an option ``o``::

    score(g, o) = 1 / (2 N D)  *  sum over g's member slices s of  sum_e  F_e * (w_e - Q_o(w)_e)^2
                  (+ for o = 0: sum over the biases b that pruning zeroes of  F_b * b^2)

* ``F_e = sum over calibration examples i and draws k of (d l_ik / d w_e)^2`` is the diagonal of the
  Fisher information, accumulated in float32 per weight element from *per-example* gradients (not the
  square of a batch gradient); ``N`` is the number of calibration examples and ``D`` the number of
  draws, so scores are means per example and do not depend on how the calibration set is cut into
  batches (the KL table's normalisation).
* ``Q_o(w)`` is the member slice quantized exactly as :meth:`ModelAdapter._write_group` does
  (:func:`search.quant.fake_quantize` of the slice, per output row or per group of the option's
  ``group_size`` input columns, with the search's clipping):
  bits 32 score 0, 16 the half-precision rounding error, 0 (pruned) ``Q = 0`` and, since pruning
  also zeroes the biases of the group's output rows (``out`` and ``all`` members), their ``F_b b^2``.
* ``weighting`` says how ``F`` weighs the squared error ``d^2`` (as the ``hessian`` method's
  curvature does): ``elements`` (default) ``sum_e F_e d_e^2``; ``rows``: ``sum_r mean_j(F_rj)
  sum_j d_rj^2`` per output row ``r`` of the slice; ``members``: ``mean(F over the slice) * ||d||^2``.
  The biases are weighted element by element in all three.

To second order, the expected increase of the negative log-likelihood of the model's own outputs
when the weights move by ``d`` is ``d^T F d / 2``; with ``labels="sampled"`` that is the second-order
term of the very discrepancy the ``kl`` table measures (for classifiers and causal LMs the KL of the
output distribution, whose Hessian at the reference is the Fisher information; for embeddings
``1 - cosine``), and ``F``'s diagonal drops the interactions between weights. It is the score NVIDIA
ModelOpt's ``auto_quantize`` calls ``gradient`` (a second-order Taylor expansion with the Fisher in
place of the Hessian), taken on the weights rather than on each layer's output: no extra forward per
(layer, option), and every option of every group is scored from one ``F``.

Activation widths
-----------------

An option with activation bits (``4a8``) adds the same second-order model of the rounding of the
group's matrix inputs (:mod:`search.actquant`)::

    score(g, bAa) = score(g, b) + 1 / (2 N D) * sum over calls c of g's members of
                    sum_e (d l_ik / d x_e)^2 * (Q_a(x) - x)_e^2       (weighted as ``weighting`` says)

``d l / d x`` is the gradient of each example's log-likelihood in the input *as the member reads
it* (a row block's own rows of ``W``, a column block's own columns), taken in the same backward
pass from a zero perturbation added at that input (:class:`search.actquant.InputProbes`); every
activation element belongs to one example, so its squared gradient is already per example. ``Q_a``
rounds with the search's scales (per token, or static: ``SensitivityContext.act_static``).
``weighting``: ``elements`` as written, ``rows`` one mean curvature per token, ``members`` one per
member input (:class:`search.actquant.ActivationCurvature`). The cross terms between the weights'
and the activations' errors are dropped, as the diagonal drops those between weights
(:func:`search.actquant.add_activation_scores`).

Loss per example
================

The log-likelihood ``l_i`` whose per-example gradients build ``F``. A loss whose gradient vanishes at
the full-precision weights (the KL to the model's own output) cannot be used: its gradient is zero,
only its Hessian is not. The Fisher identity ``E_y[grad log p(y) grad log p(y)^T] = Hessian of the
KL`` replaces it with gradients of the log-likelihood of labels ``y``:

* ``sequence_classification``: ``l_i = log softmax(z_i)[y_i]`` of the logits ``z_i``;
* ``causal_lm``: ``l_i = sum_t m_it log p(y_it | x_i, < t) / sqrt(sum_t m_it)``, the next-token
  log-likelihood at every real token ``t`` (``m`` the attention mask; with ``labels="data"``, the
  positions that predict a real next token). The ``1 / sqrt`` weight makes ``E[g_i g_i^T]`` the mean
  over the sequence's tokens of the per-token Fisher, as the KL table averages its per-token KL;
* ``embeddings`` (mean-pooled last hidden state ``f_i``, reference ``f_ref = f_i`` detached): no
  labels exist, so ``l_i = r_i . f_i / ||f_ref||`` with ``r_i`` a standard Gaussian vector projected
  orthogonally to ``u = f_ref / ||f_ref||``. Its gradient is non-zero, and ``E[g_i g_i^T] =
  J^T (I - u u^T) J / ||f_ref||^2``, exactly the Hessian of ``1 - cosine(f_ref, f)`` at ``f_ref``
  (the Gauss-Newton term; ``J`` the Jacobian of ``f``): the surrogate's Fisher is the second-order
  model of the cosine discrepancy the search measures.

``labels`` (classification and causal LMs; embeddings take ``sampled`` only):

* ``sampled`` (default): ``y ~ softmax(z)``, the true Fisher, an unbiased estimate of the
  KL table's second-order model. Drawn by Gumbel-max, ``y = argmax(log softmax(z) - log(-log u))``
  with ``u`` uniform, and the embeddings' ``r`` by ``torch.randn``, all from one
  :class:`torch.Generator` on the device of the model's output seeded with ``ctx.seed``, in
  calibration order (batch, micro-batch, draw; the label draw first, over the output's shape):
  a run is reproducible, a different ``micro_batch`` draws different labels;
* ``model``: ``y = argmax z`` (the empirical Fisher of the model's own prediction: deterministic,
  but it underrates confident predictions, where ``1 - p_y`` is small);
* ``data``: the task's labels (classification labels, every batch must have them; causal LMs the
  next tokens): the empirical Fisher of the training loss, the form ModelOpt's examples use.

``draws`` (``sampled`` only) repeats the draw ``D`` times per forward pass (one backward each):
``D`` samples of ``F`` for the price of one forward.

Computation
===========

Per (micro-)batch: one forward pass, then ``D`` backward passes (``torch.autograd.grad``) of
``sum_i l_i``. No parameter requires a gradient during the pass (every flag is set to ``False`` and
restored afterwards), so autograd computes activation gradients only: forward hooks on every module
that uses a scored weight (``nn.Linear``, GPT-2's ``Conv1D``, ``nn.Embedding``; a weight tied to
another module's, e.g. an input embedding and the LM head, counts every module that uses it) keep the
module's input, and a hook on its output receives ``G_i = d l / d y_i``. The examples of a batch are
independent in eval mode, so ``G_i`` is the gradient of ``l_i`` alone and the per-example weight
gradient is ``G_i^T x_i`` (summed over tokens; for an embedding, ``G_i``'s rows added at the example's
token ids), formed in chunks of examples and squared into ``F`` (float32, one tensor the size of each
scored matrix). A weight used more than once per forward (tied weights, a module called twice) keeps
its uses until the backward ends and squares their sum. The first module outputs that would carry no
gradient become the graph's leaves, so the backward stops there (nothing flows into the embeddings
unless they are scored). Graphs are freed after each micro-batch.

The hooks need every module input to have the examples first (``[batch, ...]``); a model that routes
tokens across examples (a mixture of experts with a capacity limit) is refused. A weight that a module
reads without calling it (``F.linear(h, self.embed.weight)``) is not seen.

Cost: ``extra["forwards"]`` forward passes (one per micro-batch) and ``extra["backwards"]`` backward
passes (``D`` per micro-batch); ``forward_units`` is the cost in forward passes over one calibration
batch, counting a backward with per-example gradients as two (activation gradients one, per-example
weight gradients one), so ``3 x batches`` at ``D = 1``; ``seconds`` (with ``seconds_forward``,
``seconds_backward``, ``seconds_scores``) is measured. The scores then cost one quantization of every
member slice at every option (as the Hessian's), and no model pass.

``calibrate=True`` rescales the narrow bit-widths like the Hessian's scores
(:func:`search.sensitivity.calibrate_scores`: one forward pass per integer bit-width and one for the
reference); off by default: the closed loop corrects the score model from measured maps.

Model state: weights are never written, ``requires_grad`` flags and every module's train/eval mode
are restored (the pass runs in eval mode), and every hook is removed.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from bitscout.methods import FisherOptions
from search.actquant import ActivationCurvature, InputProbes, add_activation_scores
from search.adapter import ModelAdapter, _is_conv1d
from search.data import TokenizedBatch
from search.errors import InvalidInputError, UnsupportedModelError
from search.memory import PASS_BUDGET_BYTES, rows_per_pass
from search.result import SensitivityTable
from search.sensitivity import (
    ProgressFn,
    SensitivityContext,
    SensitivityMethod,
    StopFn,
    _check_stop,
    calibrate_scores,
)
from search.space import Member
from search.tasks import Task, eval_mode, model_output, output_row_bytes
from search.tensor_train import option_weight

__all__ = ["FisherSensitivity", "fisher_objective"]

Labels = Literal["sampled", "model", "data"]
Weighting = Literal["elements", "rows", "members"]

STAGE = "sensitivity:fisher"
_FIELD = "method_options.fisher"
#: elements of per-example gradients formed at once (bounds the pass's temporaries: 64 MB)
_CHUNK_ELEMENTS = 1 << 24


# ------------------------------------------------------------------------------------ objective


def _gumbel_targets(logp: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(logp.shape, generator=gen, device=gen.device, dtype=torch.float32).to(logp.device)
    u.clamp_min_(torch.finfo(torch.float32).tiny)
    return (logp.detach() - torch.log(-torch.log(u))).argmax(-1)


def fisher_objective(
    out: torch.Tensor, batch: TokenizedBatch, task: Task, labels: str, gen: torch.Generator
) -> torch.Tensor:
    """``sum_i l_i`` of one (micro-)batch (see "Loss per example" in the module docstring); ``out`` is
    :func:`search.tasks.model_output`, ``gen`` the seeded generator the labels are drawn from."""
    if task == "embeddings":
        ref = out.detach()
        norm = ref.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        u = ref / norm
        r = torch.randn(ref.shape, generator=gen, device=gen.device, dtype=torch.float32).to(ref.device)
        r = r - (r * u).sum(-1, keepdim=True) * u
        return ((r * out) / norm).sum()
    logp = F.log_softmax(out.float(), dim=-1)
    if task == "causal_lm":
        if labels == "data":
            logp, y, mask = logp[:, :-1], batch.input_ids[:, 1:], batch.attention_mask[:, 1:]
        else:
            mask = batch.attention_mask
            y = logp.detach().argmax(-1) if labels == "model" else _gumbel_targets(logp, gen)
        m = mask.to(logp.dtype)
        weight = m / m.sum(1, keepdim=True).clamp_min(1.0).sqrt()
        return (logp.gather(-1, y.unsqueeze(-1)).squeeze(-1) * weight).sum()
    if labels == "data":
        assert batch.labels is not None  # noqa: S101 - checked before the pass
        y = batch.labels
    else:
        y = logp.detach().argmax(-1) if labels == "model" else _gumbel_targets(logp, gen)
    return logp.gather(-1, y.unsqueeze(-1)).sum()


# ------------------------------------------------------------------------------ per-example grads


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if _is_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


@dataclass
class _Use:
    """One call of a module that uses a scored weight: its input and the gradient of its output."""

    module: str
    kind: str
    x: torch.Tensor
    g: torch.Tensor


def _per_example(use: _Use, rows: slice, shape: torch.Size) -> torch.Tensor:
    """The per-example gradients ``[examples in rows, *shape]`` of the weight (its own layout) from one use."""
    x, g = use.x[rows], use.g[rows]
    c = int(x.shape[0])
    if use.kind == "embedding":
        vocab, dim = int(shape[0]), int(shape[1])
        out = torch.zeros((c * vocab, dim), dtype=torch.float32, device=g.device)
        ids = x.reshape(c, -1) + torch.arange(c, device=x.device)[:, None] * vocab
        out.index_add_(0, ids.reshape(-1).to(g.device), g.reshape(-1, dim).float())
        return out.view(c, vocab, dim)
    xs = x.reshape(c, -1, x.shape[-1]).float()
    gs = g.reshape(c, -1, g.shape[-1]).float()
    if use.kind == "linear":  # weight [out, in]
        return torch.bmm(gs.transpose(1, 2), xs)
    return torch.bmm(xs.transpose(1, 2), gs)  # conv1d: weight [in, out]


class _Tracker:
    """Hooks on every module that uses a scored weight; accumulates ``F`` from per-example gradients."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, names: Sequence[str], biases: set[str]) -> None:
        self.fisher: dict[int, torch.Tensor] = {}  # id(weight) -> F in the weight's own layout
        self.bias_fisher: dict[str, torch.Tensor] = {}  # scored module -> F of its bias
        self.weight_of: dict[str, int] = {}  # scored module -> id(weight)
        params: dict[int, nn.Parameter] = {}
        for name in names:
            w = adapter.module(name).weight
            self.weight_of[name] = id(w)
            params[id(w)] = w
            self.fisher.setdefault(id(w), torch.zeros(w.shape, dtype=torch.float32, device=w.device))
            b = adapter.bias(name)
            if name in biases and b is not None:
                self.bias_fisher[name] = torch.zeros(b.shape, dtype=torch.float32, device=b.device)
        self.leaves: list[torch.Tensor] = []
        self.calls: dict[int, int] = defaultdict(int)
        self.stash: dict[int, list[_Use]] = defaultdict(list)
        self.batch_size = 0
        self.active = False
        self._handles: list[Any] = []
        try:
            for name, module in model.named_modules():
                w = getattr(module, "weight", None)
                if not isinstance(w, torch.Tensor) or id(w) not in params:
                    continue
                kind = _kind(module)
                if kind is None:
                    raise UnsupportedModelError(
                        f"the weight of {name!r} ({type(module).__name__}) is a scored matrix, but the fisher "
                        "method forms per-example gradients of linear, Conv1D and embedding modules only; "
                        "use the kl or hessian method",
                        field="model",
                    )
                self._handles.append(
                    module.register_forward_hook(partial(self._forward, name, kind, id(w)), with_kwargs=True)
                )
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.leaves = []
        self.stash.clear()

    def start(self, batch_size: int) -> None:
        """Before a forward pass over ``batch_size`` examples."""
        self.batch_size = batch_size
        self.leaves = []
        self.calls.clear()
        self.stash.clear()

    def _forward(self, name: str, kind: str, pid: int, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        if not self.active:
            return None
        x = args[0] if args else next(iter(kwargs.values()))
        if not isinstance(output, torch.Tensor) or not isinstance(x, torch.Tensor):  # pragma: no cover
            raise UnsupportedModelError(f"module {name!r} was called with a non-tensor input or output", field="model")
        if (
            kind == "embedding"
            and self.batch_size > 1
            and x.ndim >= 1
            and int(x.shape[0]) == 1
            and int(output.shape[0]) == 1
        ):
            # ids shared by every example (position ids): one copy per example, so that the
            # gradient of each example's copy is that example's own
            x = x.expand(self.batch_size, *x.shape[1:])
            output = output.expand(self.batch_size, *output.shape[1:])
            expanded = True
        else:
            expanded = False
        if x.ndim == 0 or int(x.shape[0]) != self.batch_size:
            raise UnsupportedModelError(
                f"module {name!r} sees inputs of shape {tuple(x.shape)}, not the batch's {self.batch_size} examples "
                "first: the fisher method needs per-example inputs (use kl or hessian)",
                field="model",
            )
        self.calls[pid] += 1
        out = output
        if not out.requires_grad:
            # the first scored outputs become the graph's leaves; the clone keeps in-place ops legal
            leaf = out.detach().requires_grad_(True)
            self.leaves.append(leaf)
            out = leaf.clone()
        out.register_hook(partial(self._grad, name, kind, pid, x.detach()))
        return out if (out is not output or expanded) else None

    def _grad(self, name: str, kind: str, pid: int, x: torch.Tensor, g: torch.Tensor) -> None:
        use = _Use(name, kind, x, g.detach())
        if self.calls[pid] > 1:
            self.stash[pid].append(use)
            return
        fisher = self.fisher[pid]
        if kind == "embedding":
            vocab, dim = int(fisher.shape[0]), int(fisher.shape[1])
            keys = (x.reshape(x.shape[0], -1) + torch.arange(x.shape[0], device=x.device)[:, None] * vocab).reshape(-1)
            uniq, inv = torch.unique(keys, return_inverse=True)
            sums = torch.zeros((uniq.numel(), dim), dtype=torch.float32, device=g.device)
            sums.index_add_(0, inv.to(g.device), g.reshape(-1, dim).float())
            fisher.index_add_(0, (uniq % vocab).to(fisher.device), sums.square_().to(fisher.device))
        else:
            n = int(x.shape[0])
            xs, gs = x.reshape(n, -1, x.shape[-1]), g.reshape(n, -1, g.shape[-1])
            if xs.shape[1] == 1:  # one position per example: (G x^T)^2 = G^2 (x^2)^T
                x2, g2 = xs[:, 0].float().square(), gs[:, 0].float().square()
                fisher += (g2.t() @ x2) if kind == "linear" else (x2.t() @ g2)
            else:
                step = max(1, _CHUNK_ELEMENTS // max(1, fisher.numel()))
                for s in range(0, n, step):
                    fisher += _per_example(use, slice(s, s + step), fisher.shape).square_().sum(0)
        self._bias(name, [use])

    def _bias(self, name: str, uses: list[_Use]) -> None:
        bf = self.bias_fisher.get(name)
        if bf is None:
            return
        total = None
        for u in uses:
            s = u.g.reshape(u.g.shape[0], -1, u.g.shape[-1]).float().sum(1)
            total = s if total is None else total + s
        assert total is not None  # noqa: S101 - at least one use
        bf += total.square().sum(0).to(bf.device)

    def finish_backward(self) -> None:
        """After a backward pass: square the summed per-example gradients of the weights used more than once."""
        for pid, uses in self.stash.items():
            fisher = self.fisher[pid]
            n = self.batch_size
            step = max(1, _CHUNK_ELEMENTS // max(1, fisher.numel()))
            for s in range(0, n, step):
                rows = slice(s, s + step)
                per = None
                for u in uses:
                    p = _per_example(u, rows, fisher.shape)
                    per = p if per is None else per.add_(p)
                assert per is not None  # noqa: S101 - at least one use
                fisher += per.square_().sum(0).to(fisher.device)
            by_module: dict[str, list[_Use]] = defaultdict(list)
            for u in uses:
                by_module[u.module].append(u)
            for module, mine in by_module.items():
                self._bias(module, mine)
        self.stash.clear()

    def member_fisher(self, adapter: ModelAdapter, m: Member) -> torch.Tensor:
        """``F`` of a member slice in the adapter's ``[out, in]`` layout, sliced like :meth:`ModelAdapter.member_slice`."""
        f = self.fisher[self.weight_of[m.module]]
        if _is_conv1d(adapter.module(m.module)):
            f = f.t()
        if m.axis == "out":
            return f[m.start : m.stop]
        if m.axis == "in":
            return f[:, m.start : m.stop]
        return f


# ---------------------------------------------------------------------------------------- method


def _split(batch: TokenizedBatch, size: int | None) -> list[TokenizedBatch]:
    n = len(batch)
    if size is None or size >= n:
        return [batch]
    return [
        TokenizedBatch(
            batch.input_ids[s : s + size],
            batch.attention_mask[s : s + size],
            None if batch.labels is None else batch.labels[s : s + size],
        )
        for s in range(0, n, size)
    ]


def _weighted(f: torch.Tensor, d2: torch.Tensor, weighting: str) -> float:
    if weighting == "elements":
        return float((f * d2).sum(dtype=torch.float64))
    if weighting == "rows":
        return float((f.mean(1, dtype=torch.float64) * d2.sum(1, dtype=torch.float64)).sum())
    return float(f.mean(dtype=torch.float64) * d2.sum(dtype=torch.float64))


class FisherSensitivity(SensitivityMethod):
    """Diagonal-Fisher sensitivity from per-example gradients (see the module docstring).

    Options (:class:`bitscout.methods.FisherOptions`): ``labels``: ``sampled`` (default), ``model`` or ``data``; ``weighting``: ``elements`` (default),
    ``rows`` or ``members``; ``micro_batch``: at most this many examples per forward / backward pass
    (memory; default: whole calibration batches, except a causal LM's, cut to the rows whose
    vocabulary-wide outputs fit :data:`search.memory.PASS_BUDGET_BYTES`: :meth:`micro_rows`); ``draws``: label draws per forward pass (``sampled``
    only); ``calibrate``: rescale the narrow bit-widths from measured uniform maps (default off).
    """

    name = "fisher"

    options: FisherOptions

    @property
    def labels(self) -> Labels:
        return self.options.labels

    @property
    def weighting(self) -> Weighting:
        return self.options.weighting

    @property
    def micro_batch(self) -> int | None:
        return self.options.micro_batch

    def micro_rows(self, ctx: SensitivityContext, batch: TokenizedBatch) -> int | None:
        """Examples per forward / backward pass of ``batch``: the ``micro_batch`` option, or for a
        causal LM the rows whose ``[T, vocabulary]`` float32 outputs fit the fixed
        :data:`search.memory.PASS_BUDGET_BYTES` (:func:`search.memory.rows_per_pass`: the logits,
        their log-softmax, the label draw and the backward's gradient are vocabulary-wide), not the
        machine's free memory, so that the label draws are the same on every machine; None
        (whole batches) otherwise."""
        if self.micro_batch is not None:
            return self.micro_batch
        row_bytes = output_row_bytes(ctx.model, batch, ctx.task)
        return None if row_bytes is None else rows_per_pass(row_bytes, PASS_BUDGET_BYTES)

    @property
    def draws(self) -> int:
        return self.options.draws

    @property
    def calibrate(self) -> bool:
        return self.options.calibrate

    def _check(self, ctx: SensitivityContext) -> None:
        if not ctx.batches:
            raise InvalidInputError("Fisher sensitivity needs at least one calibration batch", field="calibration")
        if ctx.task == "embeddings" and self.labels != "sampled":
            raise InvalidInputError(
                f"labels {self.labels!r} do not apply to embeddings (no output distribution); use 'sampled'",
                field=f"{_FIELD}.labels",
            )
        if (
            self.labels == "data"
            and ctx.task == "sequence_classification"
            and any(b.labels is None for b in ctx.batches)
        ):
            raise InvalidInputError(
                "labels 'data' needs a label in every calibration example (set the data's label field)",
                field=f"{_FIELD}.labels",
            )

    def compute(
        self,
        ctx: SensitivityContext,
        *,
        on_progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
    ) -> SensitivityTable:
        t0 = time.perf_counter()
        self._check(ctx)
        space, adapter, model = ctx.space, ctx.adapter, ctx.model
        names = list(dict.fromkeys(m.module for g in space.groups for m in g.members))
        prunes = {
            m.module
            for g, opts in zip(space.groups, space.options, strict=True)
            if any(o.pruned for o in opts)
            for m in g.members
            if m.axis in ("out", "all")
        }
        acct: dict[str, Any] = {"forwards": 0, "backwards": 0, "seconds_forward": 0.0, "seconds_backward": 0.0}
        flags = [(p, p.requires_grad) for p in model.parameters()]
        tracker = _Tracker(model, adapter, names, prunes)
        probes = InputProbes(space, ctx.act_static)
        act = ActivationCurvature(self.weighting)
        n_examples = ctx.n_samples
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            with eval_mode(model), torch.inference_mode(False), torch.enable_grad(), probes.installed(adapter._modules):
                self._pass(ctx, tracker, acct, on_progress, should_stop, probes, act)
            t_scores = time.perf_counter()
            scores, group_fisher = self._scores(ctx, tracker, n_examples)
            norm = 0.5 / (max(1, n_examples) * self.draws)
            add_activation_scores(space, scores, {k: v * norm for k, v in act.totals().items()})
            acct["seconds_scores"] = time.perf_counter() - t_scores
        finally:
            tracker.remove()
            for p, f in flags:
                p.requires_grad_(f)
        calibration: dict[str, Any] = {"applied": False}
        if self.calibrate:
            t_cal = time.perf_counter()
            scores, calibration = calibrate_scores(ctx, scores, should_stop=should_stop)
            acct["seconds_calibration"] = time.perf_counter() - t_cal
        n_batches = len(ctx.batches)
        per_batch = n_examples / max(1, n_batches)
        forward_units = (n_examples + 2 * self.draws * n_examples) / max(1e-12, per_batch)
        if on_progress is not None:
            on_progress(STAGE, 1.0, f"{acct['forwards']} forward and {acct['backwards']} backward passes")
        extra: dict[str, Any] = {
            "loss": {"sequence_classification": "log_likelihood", "causal_lm": "next_token_log_likelihood",
                     "embeddings": "cosine_surrogate"}[ctx.task],
            "labels": self.labels,
            "weighting": self.weighting,
            "draws": self.draws,
            "micro_batch": self.micro_batch,
            "micro_rows": sorted({len(mb) for b in ctx.batches for mb in _split(b, self.micro_rows(ctx, b))}),
            "batches": n_batches,
            "examples": n_examples,
            "calibration": calibration,
            "group_fisher": group_fisher,
            **acct,
            "forward_units": forward_units,
            "seconds": time.perf_counter() - t0,
        }
        return SensitivityTable(method=self.name, scores=scores, samples=n_examples, extra=extra)

    def _pass(
        self,
        ctx: SensitivityContext,
        tracker: _Tracker,
        acct: dict[str, Any],
        on_progress: ProgressFn | None,
        should_stop: StopFn | None,
        probes: InputProbes,
        act: ActivationCurvature,
    ) -> None:
        gen: torch.Generator | None = None
        total = sum(len(_split(b, self.micro_rows(ctx, b))) for b in ctx.batches)
        done = 0
        last_report = 0.0
        for batch in ctx.batches:
            for mb in _split(batch, self.micro_rows(ctx, batch)):
                _check_stop(should_stop)
                tracker.start(len(mb))
                probes.reset()
                tracker.active = True
                t = time.perf_counter()
                try:
                    out = model_output(ctx.model, mb, ctx.task)
                finally:
                    tracker.active = False
                acct["forwards"] += 1
                acct["seconds_forward"] += time.perf_counter() - t
                eps = probes.tensors()
                if not tracker.leaves and not eps:  # pragma: no cover - every scored module is hooked
                    raise UnsupportedModelError("no scored matrix took part in the forward pass", field="model")
                if gen is None:
                    gen = torch.Generator(device=out.device)
                    gen.manual_seed(int(ctx.seed))
                for k in range(self.draws):
                    t = time.perf_counter()
                    objective = fisher_objective(out, mb, ctx.task, self.labels, gen)
                    if not bool(torch.isfinite(objective)):
                        raise InvalidInputError(
                            f"the Fisher objective of a calibration batch is not finite ({float(objective)})", field="model"
                        )
                    grads = torch.autograd.grad(
                        objective, [*tracker.leaves, *eps], retain_graph=k + 1 < self.draws, allow_unused=True
                    )
                    tracker.finish_backward()
                    # the activation term: squared per-example input gradients of every probed member
                    act.add(probes.calls, [None if g is None else g.square() for g in grads[len(tracker.leaves):]])
                    acct["backwards"] += 1
                    acct["seconds_backward"] += time.perf_counter() - t
                del out
                tracker.start(0)
                probes.reset()
                done += 1
                now = time.perf_counter()
                if on_progress is not None and (now - last_report > 0.5 or done == total):
                    last_report = now
                    on_progress(STAGE, min(0.99, done / total), f"micro-batch {done}/{total}")

    @torch.no_grad()
    def _scores(
        self, ctx: SensitivityContext, tracker: _Tracker, n_examples: int
    ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
        adapter = ctx.adapter
        norm = 0.5 / (max(1, n_examples) * self.draws)
        clip: Literal["mse", "minmax"] = "minmax" if ctx.clip == "minmax" else "mse"
        scores: dict[str, dict[str, float]] = {}
        group_fisher: dict[str, float] = {}
        for g, opts in zip(ctx.space.groups, ctx.space.options, strict=True):
            row = dict.fromkeys((o.key() for o in opts), 0.0)
            fsum = 0.0
            for m in g.members:
                w = adapter.member_slice(m).detach()
                f = tracker.member_fisher(adapter, m)
                fsum += float(f.sum(dtype=torch.float64))
                w32 = w.to(torch.float32)
                for opt in opts:
                    if opt.unchanged:
                        continue
                    if opt.is_tt:
                        q = option_weight(w, int(opt.tt_rank), opt.bits, symmetric=opt.symmetric, clip=clip)  # type: ignore[arg-type]
                        q = q.to(torch.float32)
                    else:
                        q = adapter.fake_quantized(m, opt, clip).to(torch.float32)  # its scales kept for the maps
                    err = _weighted(f, (w32 - q).square_(), self.weighting)
                    if opt.pruned and m.module in tracker.bias_fisher and m.axis in ("out", "all"):
                        b = adapter.bias(m.module)
                        assert b is not None  # noqa: S101 - bias_fisher only for modules with a bias
                        fb = tracker.bias_fisher[m.module]
                        sl = slice(m.start, m.stop) if m.axis == "out" else slice(None)
                        err += float((fb[sl].double() * b.detach()[sl].double().square()).sum())
                    row[opt.key()] += err
            scores[g.name] = {k: max(0.0, v * norm) for k, v in row.items()}
            group_fisher[g.name] = fsum / (max(1, n_examples) * self.draws)
        return scores, group_fisher

