"""The DNAS supernet: every group's mixture of its quantized versions in one forward pass, the
architecture logits, the resource term and the steps toward one target (see :mod:`search.dnas`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from search import allocate as alloc
from search import quant
from search.actquant import InputProbes, StaticScales, fake_quantize_activation, input_hooks, member_key
from search.adapter import ModelAdapter, _is_conv1d
from search.cost import CostModel
from search.data import TokenizedBatch
from search.dnas.options import DNASOptions
from search.errors import CanceledError, InvalidInputError
from search.plan import per_decision
from search.sensitivity import StopFn
from search.space import BitOption, Member, PrecisionMap, SearchSpace
from search.ste import by_group, half_ste, round_ste
from search.tasks import Task, discrepancy, model_output, scored_tokens, task_loss

__all__ = ["DNAS", "TargetRun"]

#: added to the task loss before its log (a loss of exactly 0 has no direction)
_LOSS_EPS = 1e-12
#: the largest exchange rate the dual ascent may reach
_MAX_LAMBDA = 1e4


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
    """A differentiable search over ``space`` on ``model`` (see :mod:`search.dnas`).

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
        act_static: StaticScales | None = None,
    ) -> None:
        self.model = model
        self.act_static = act_static
        self.adapter = adapter
        self.space = space
        self.cost_model = cost_model
        self.task = task
        self.options = options or DNASOptions()
        self.metric = metric
        self.clip = clip
        self.device = torch.device(device)
        if any(o.is_tt for opts in space.options for o in opts):
            raise InvalidInputError(
                "the dnas method does not search tensor-train options; use kl, hessian, fisher or nsga2",
                field="space.tt_ranks",
            )
        self.batches = _split(batches, self.options.batch_size)
        if not self.batches:
            raise InvalidInputError("no calibration data", field="calibration_size")
        costs = cost_model.group_costs()
        if metric not in costs:
            raise InvalidInputError(f"unknown cost metric {metric!r}", field="metric")
        # one set of logits and costs per decision: a tied set (q/k/v, gate/up) is one choice, its costs summed
        self.decision_of = space.decision_of
        self.costs = [torch.tensor(c, dtype=torch.float64, device=self.device) for c in per_decision(space, costs[metric])]
        self.offset = float(cost_model.offsets()[metric])
        self.generator = torch.Generator(device="cpu").manual_seed(int(seed))
        self.logits = [torch.zeros(len(o), dtype=torch.float32, device=self.device) for o in space.decision_options]
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
                        qp = quant.choose_qparams(base, o.bits, symmetric=o.symmetric, clip=self.clip,  # type: ignore[arg-type]
                                                  group_size=o.group_size)
                        st.qparams.append((o, qp.scale, qp.zero_point.to(torch.float32), qp.qmin, qp.qmax))
                        st.log_scales.append(qp.scale.log().clone().requires_grad_(self.options.lsq))
                elif int_idx:
                    st.stack = torch.stack(
                        [
                            quant.fake_quantize(base, opts[k].bits, symmetric=opts[k].symmetric, clip=self.clip,  # type: ignore[arg-type]
                                                group_size=opts[k].group_size)
                            for k in int_idx
                        ]
                    )
                by_module.setdefault(m.module, []).append(len(self.members))
                self.members.append(st)
        # the activation mixture: per member of a group with activation widths, each option's width
        self.act_members: dict[str, list[tuple[int, Member, list[int | None]]]] = {}
        for gi, (g, opts) in enumerate(zip(self.space.groups, self.space.options, strict=True)):
            widths = [None if o.pruned else o.act_bits for o in opts]
            if any(a is not None for a in widths):
                for m in g.members:
                    self.act_members.setdefault(m.module, []).append((gi, m, widths))
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
                outs.append(half_ste(w))
                continue
            w3, s3 = by_group(w, ls.exp())
            z3 = zp.reshape(s3.shape)
            q = torch.clamp(round_ste(w3 / s3) + z3, qmin, qmax)
            outs.append(((q - z3) * s3).reshape(w.shape))
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

    def _act_mixture(self, ys: list[torch.Tensor]) -> list[Any]:
        """Hooks that make every member of a group with activation widths read the mixture
        ``x + sum_A c_A (Q_A(x) - x)`` of its input's rounded versions, ``c_A`` the summed weight
        ``y_k`` of the group's options at width ``A`` (weight-only options keep ``x``), rounding
        passed straight through (see "Activation widths" in :mod:`search.dnas`)."""
        per_module: dict[str, list[tuple[Member, Any]]] = {}
        for name, members in self.act_members.items():
            for gi, m, widths in members:
                y = ys[self.decision_of[gi]]
                coef = {a: sum(y[k] for k, w in enumerate(widths) if w == a) for a in set(widths) if a is not None}
                amax = None if self.act_static is None else self.act_static.get(member_key(name, m))

                def fn(x: torch.Tensor, coef: dict[int, torch.Tensor] = coef, amax: float | None = amax) -> torch.Tensor:
                    delta = sum(c * (fake_quantize_activation(x.detach(), a, amax) - x.detach()) for a, c in coef.items())
                    return x + delta

                per_module.setdefault(name, []).append((m, fn))
        return input_hooks(self.adapter._modules, per_module)

    def _mixed_forward(self, ys: list[torch.Tensor], batch: TokenizedBatch) -> torch.Tensor:
        """The supernet's output on ``batch``: the mixed matrices and the mixed inputs under ``ys``."""
        handles = self._act_mixture(ys)
        try:
            return torch.func.functional_call(self._forward, self._overrides(ys), (batch,), strict=False)
        finally:
            for h in handles:
                h.remove()

    def _overrides(self, ys: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        of = self.decision_of
        mixed = [self._member_weight(st, ys[of[st.group]]) for st in self.members]
        keep = [None if st.pruned_idx is None else 1 - ys[of[st.group]][st.pruned_idx] for st in self.members]
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
        """``softmax(a_g)`` of every decision (a group, or a tied set), in ``space.decision_options`` order."""
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
        n_params = [sum(self.space.groups[i].n_params for i in members) for members in self.space.decisions]
        per_weight = [(c - c.min()) / max(1, n) for n, c in zip(n_params, self.costs, strict=True)]
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
        """Fisher estimate of every (decision, option)'s output discrepancy, in ``space.decision_options``
        order (a decision is a group, or a tied set whose groups change together).

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
        n_opts = [len(o) for o in self.space.decision_options]
        of = self.decision_of
        total = [np.zeros(n, dtype=np.float64) for n in n_opts]
        second = [np.zeros((n, n), dtype=np.float64) for n in n_opts]
        n_examples = 0
        gen = self.generator
        probes = InputProbes(self.space, self.act_static)
        for _ in range(int(draws)):
            for b in self.batches:
                if should_stop is not None and should_stop():
                    raise CanceledError("dnas search canceled")
                leaves = [(st.shadow if st.shadow is not None else st.base).detach().clone().requires_grad_(True)
                          for st in self.members]
                keep = [None if st.pruned_idx is None else torch.ones((), device=self.device, requires_grad=True)
                        for st in self.members]
                probes.reset()
                with torch.enable_grad():
                    with probes.installed(self.adapter._modules):
                        out = torch.func.functional_call(self._forward, self._assemble_overrides(leaves, keep), (b,),
                                                         strict=False)
                    loss = self._fisher_loss(out, b, gen)
                    eps = probes.tensors()
                    wanted = leaves + [k for k in keep if k is not None]
                    grads = torch.autograd.grad(loss, wanted + eps, allow_unused=True)
                gw = grads[: len(leaves)]
                gk = iter(grads[len(leaves) : len(wanted)])
                act_dots = probes.dots(grads[len(wanted) :]) if eps else {}
                per_group = [torch.zeros(n, dtype=torch.float64, device=self.device) for n in n_opts]
                with torch.no_grad():
                    # the activation change of each option with a width, added to its weights' change
                    for gi, opts in enumerate(self.space.options):
                        for k, o in enumerate(opts):
                            if o.act_bits is not None and not o.pruned and (gi, o.act_bits) in act_dots:
                                per_group[of[gi]][k] += act_dots[(gi, o.act_bits)].to(self.device)
                    for st, leaf, g, k in zip(self.members, leaves, gw, keep, strict=True):
                        gb = next(gk) if k is not None else None
                        if g is None:
                            continue
                        row = per_group[of[st.group]]
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
        out = self._mixed_forward(ys, self.batches[i])
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

