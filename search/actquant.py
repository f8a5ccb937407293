"""Activation quantization: fake-quantizing the input of every quantized matrix whose option names
activation bits (``4a8``, ``8a8``: :attr:`search.space.BitOption.act_bits`).

What is quantized
=================

The input ``x`` of a searched matrix (``torch.nn.Linear`` or GPT-2's ``Conv1D``), ``[..., in]``,
is rounded before the matrix multiplies it, as a W\\ *b*\\ A\\ *a* kernel would:

======  ==========================================================================================
bits    rounding of ``x``
======  ==========================================================================================
2..8    symmetric integer grid ``[-(2^(a-1)-1), 2^(a-1)-1]``: ``round(x / s).clamp(...) * s``
        (round half to even); ``s`` per token (dynamic, the default) or one static scale
16      through float16: ``x.half()`` back to ``x``'s dtype
None    unchanged (weight-only quantization)
======  ==========================================================================================

Scales:

* ``dynamic`` (default): one scale per token (per row of ``x`` flattened to ``[tokens, in]``),
  ``s_t = max_j |x_tj| / (2^(a-1)-1)`` (``SCALE_EPS`` for an all-zero token), what per-token dynamic
  int8 kernels compute at run time.
* ``static``: one scale per matrix input, ``s = max |x| / (2^(a-1)-1)`` over every token of the
  calibration rows, measured once on the full-precision model (:func:`calibrate_static`), what a
  static int8 deployment freezes.

Groups and members
==================

A group at ``layer`` granularity is a whole matrix: its whole input takes the group's width (one
forward pre-hook). At ``group`` granularity a matrix may hold several groups: row blocks (a head
of q/k/v, a block of FFN up rows) read the whole input, column blocks (a head of the output
projection, a block of FFN down columns) read their own input columns. A member's activation
error is then added to the module's output: rows ``[s:e]`` get ``(Q(x) - x) @ W[s:e].T``, and a
column block ``[s:e]`` adds ``(Q(x[..., s:e]) - x[..., s:e]) @ W[:, s:e].T``, with scales over the
block's columns (per token, or the static scale of that block). So every group is quantized at
its own width, and at layer granularity the result equals quantizing the whole input.

Everything here runs on the device of its input and keeps no state beyond the hooks of
:func:`activations_quantized`, which removes them on exit.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from search.space import FULL_PRECISION, BitOption, Member, PrecisionMap, SearchSpace
from search.ste import half_ste, lsq_fake_quantize, lsq_grad_scale

ActScales = Literal["dynamic", "static"]
ACT_SCALES: tuple[str, ...] = ("dynamic", "static")
#: the smallest scale (the smallest positive float16), as for weights
SCALE_EPS = 2.0**-24

__all__ = [
    "ACT_SCALES",
    "ActScales",
    "StaticScales",
    "activations_quantized",
    "calibrate_static",
    "fake_quantize_activation",
    "member_key",
    "quantize_activations_of",
    "quantize_with_step",
    "ActivationCurvature",
    "InputProbes",
    "ProbeCall",
    "add_activation_scores",
    "input_hooks",
    "member_input",
]


def qmax_of(bits: int) -> int:
    """The largest code of the symmetric ``bits``-bit activation grid."""
    return 2 ** (bits - 1) - 1


def fake_quantize_activation(x: torch.Tensor, bits: int | None, amax: torch.Tensor | float | None = None) -> torch.Tensor:
    """``x`` rounded to ``bits`` (table in the module docstring): per-token scales over the last
    dimension when ``amax`` is None, else the static scale ``amax / qmax`` (a float or a scalar
    tensor). 16 rounds through float16; None and 32 leave ``x`` as it is."""
    if bits is None or bits >= 32:
        return x
    if bits == 16:
        return x.to(torch.float16).to(x.dtype)
    q = qmax_of(bits)
    xf = x.to(torch.float32)
    if amax is None:
        scale = (xf.abs().amax(dim=-1, keepdim=True) / q).clamp_min(SCALE_EPS)
    else:
        scale = torch.as_tensor(amax, dtype=torch.float32, device=x.device).clamp_min(SCALE_EPS * q) / q
    return (torch.round(xf / scale).clamp(-q, q) * scale).to(x.dtype)


def quantize_with_step(x: torch.Tensor, bits: int, step: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to ``bits`` with one learned static step for the whole input (LSQ on the
    activation scale, as KDLSQ-BERT: :func:`search.ste.lsq_fake_quantize` over ``x`` as one row,
    differentiable in ``x`` and ``step``); 16 bits round through float16. The one formula of a
    learned activation step, in refinement and after an artifact's reload."""
    if bits >= 16:
        return half_ste(x)
    q = qmax_of(bits)
    fq = lsq_fake_quantize(
        x.reshape(1, -1).to(torch.float32), step, torch.zeros(1, device=x.device),
        -q, q, lsq_grad_scale(x.numel(), q), half_scales=False,
    )
    return fq.reshape(x.shape).to(x.dtype)


def member_key(module: str, m: Member) -> str:
    """The key of the input a member reads: the module's whole input, or its column block."""
    return f"{module}[{m.start}:{m.stop}]" if m.axis == "in" else module


@dataclass(frozen=True)
class StaticScales:
    """The largest absolute input value of every member's input (:func:`member_key`) over the
    calibration rows; ``scale = amax / qmax`` at each width."""

    amax: Mapping[str, float]

    def get(self, key: str) -> float:
        try:
            return float(self.amax[key])
        except KeyError:
            raise KeyError(f"no calibrated activation range for {key}") from None

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.amax.items()}


def _input_members(space: SearchSpace) -> dict[str, list[Member]]:
    out: dict[str, list[Member]] = {}
    for g in space.groups:
        for m in g.members:
            out.setdefault(m.module, []).append(m)
    return out


@torch.no_grad()
def calibrate_static(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    space: SearchSpace,
    batches: Sequence[Any],
    forward: Any,
) -> StaticScales:
    """The static activation ranges of every searched matrix input: ``forward(model, batch)`` runs
    each calibration batch on the full-precision model while hooks record ``max |x|`` of every
    member's input (its module's input, or its column block)."""
    amax: dict[str, float] = {}
    hooks = []
    for name, members in _input_members(space).items():
        def hook(mod: nn.Module, args: tuple[Any, ...], name: str = name, members: list[Member] = members) -> None:
            x = args[0]
            for m in members:
                part = x[..., m.start : m.stop] if m.axis == "in" else x
                key = member_key(name, m)
                amax[key] = max(amax.get(key, 0.0), float(part.detach().abs().max()))

        hooks.append(modules[name].register_forward_pre_hook(hook))
    try:
        for b in batches:
            forward(model, b)
    finally:
        for h in hooks:
            h.remove()
    return StaticScales(amax)


def _weight_oi(module: nn.Module, conv: bool) -> torch.Tensor:
    w = module.weight
    return w.t() if conv else w


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def member_input(x: torch.Tensor, m: Member) -> torch.Tensor:
    """The part of a matrix input ``x`` a member reads: its column block, or the whole input."""
    return x[..., m.start : m.stop] if m.axis == "in" else x


#: a member's input transform: the member's input (:func:`member_input`) in, what the member reads out
Transform = Any


def input_hooks(modules: Mapping[str, nn.Module], per_module: Mapping[str, Sequence[tuple[Member, Transform]]]) -> list[Any]:
    """Install hooks that make each member read ``fn(its input)`` instead of its input, for the
    ``(member, fn)`` pairs of every module (see "Groups and members" in the module docstring): a
    whole-matrix member replaces the module's input (a forward pre-hook); row and column blocks add
    ``(fn(x_m) - x_m) @ W_m^T`` to their part of the output (a forward hook, out of place, so
    autograd follows it). Returns the hook handles. The one mechanism behind fake quantization,
    the DNAS mixture and the curvature probes."""
    handles: list[Any] = []
    for name, members in per_module.items():
        module = modules[name]
        whole = [(m, fn) for m, fn in members if m.axis == "all"]
        if whole:  # one member covers the whole matrix: transform its input before the matrix reads it
            (_, fn), = whole

            def pre(mod: nn.Module, args: tuple[Any, ...], fn: Transform = fn) -> Any:
                return (fn(args[0]), *args[1:])

            handles.append(module.register_forward_pre_hook(pre))
            continue
        conv = _is_conv1d(module)
        parts = list(members)

        def post(
            mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor, parts: list[Any] = parts, conv: bool = conv
        ) -> torch.Tensor:
            x = args[0]
            w = _weight_oi(mod, conv)
            extra = torch.zeros_like(out)
            for m, fn in parts:
                xm = member_input(x, m)
                dx = fn(xm) - xm
                if m.axis == "out":
                    rows = dx @ w[m.start : m.stop].t().to(dx.dtype)
                    extra = extra + torch.slice_scatter(torch.zeros_like(out), rows, dim=-1, start=m.start, end=m.stop)
                else:  # a column block
                    extra = extra + dx @ w[:, m.start : m.stop].t().to(dx.dtype)
            return out + extra

        handles.append(module.register_forward_hook(post))
    return handles


def _act_members(
    space: SearchSpace, pmap: Mapping[str, BitOption], groups: Sequence[int] | None
) -> dict[str, list[tuple[int, Member, int]]]:
    """``module -> [(group index, member, act bits)]`` of the groups of ``pmap`` with an activation width."""
    picked = range(len(space.groups)) if groups is None else groups
    per_module: dict[str, list[tuple[int, Member, int]]] = {}
    for gi in picked:
        g = space.groups[gi]
        opt = pmap.get(g.name, FULL_PRECISION)
        if opt.act_bits is None or opt.pruned:
            continue
        for m in g.members:
            per_module.setdefault(m.module, []).append((gi, m, opt.act_bits))
    return per_module


def quantize_activations_of(
    modules: Mapping[str, nn.Module],
    space: SearchSpace,
    pmap: Mapping[str, BitOption],
    *,
    static: StaticScales | None = None,
    groups: Sequence[int] | None = None,
) -> list[Any]:
    """Install the hooks that fake-quantize the inputs of the matrices of ``groups`` (indices into
    ``space.groups``; all by default) at their option's ``act_bits`` under ``pmap`` (groups it omits
    stay in full precision). Returns the hook handles (``h.remove()`` undoes them); nothing is
    installed for a map without activation widths. ``static`` gives static scales, else per token."""
    per_module: dict[str, list[tuple[Member, Transform]]] = {}
    for name, members in _act_members(space, pmap, groups).items():
        for _, m, a in members:
            amax = None if static is None else static.get(member_key(name, m))

            def fn(x: torch.Tensor, a: int = a, amax: float | None = amax) -> torch.Tensor:
                return fake_quantize_activation(x, a, amax)

            per_module.setdefault(name, []).append((m, fn))
    return input_hooks(modules, per_module)


@contextmanager
def activations_quantized(
    modules: Mapping[str, nn.Module],
    space: SearchSpace,
    pmap: PrecisionMap | Mapping[str, BitOption],
    *,
    static: StaticScales | None = None,
    groups: Sequence[int] | None = None,
) -> Iterator[None]:
    """Context manager: the inputs of the matrices of ``groups`` fake-quantized under ``pmap``
    (:func:`quantize_activations_of`) until exit."""
    handles = quantize_activations_of(modules, space, pmap, static=static, groups=groups)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------------
# Scoring activation widths from curvature (the ``fisher``, ``hessian`` and ``dnas`` methods)


@dataclass
class ProbeCall:
    """One call of a probed matrix for one member: the member's input (detached), the zero
    perturbation added to it (a leaf that requires a gradient: the gradient of the loss with
    respect to it is the member's input gradient), and the activation error ``Q_A(x) - x`` of
    every width ``A`` its group's options name."""

    group: int
    member: Member
    x: torch.Tensor
    eps: torch.Tensor
    errors: dict[int, torch.Tensor]


class InputProbes:
    """Zero perturbations ``eps`` at the input of every member of the groups whose options name an
    activation width: while :meth:`installed`, each member reads ``x_m + eps`` (:func:`input_hooks`),
    so a forward pass's value is unchanged and ``d loss / d eps`` is the gradient of the loss with
    respect to the input *as that member reads it* (a row block's own rows, a column block's own
    columns), and second derivatives with respect to ``eps`` are the member's input curvature.

    Every call of a probed module records a :class:`ProbeCall` (a module called twice has two);
    :meth:`reset` forgets them before the next pass. The activation error of each width is formed
    once per call, with the scales the search uses (per token, or ``static``)."""

    def __init__(self, space: SearchSpace, static: StaticScales | None = None) -> None:
        self.space = space
        self.static = static
        self.targets: dict[str, list[tuple[int, Member, tuple[int, ...]]]] = {}
        for gi, (g, opts) in enumerate(zip(space.groups, space.options, strict=True)):
            widths = tuple(sorted({o.act_bits for o in opts if o.act_bits is not None and not o.pruned}))
            if widths:
                for m in g.members:
                    self.targets.setdefault(m.module, []).append((gi, m, widths))
        self.calls: list[ProbeCall] = []

    def __bool__(self) -> bool:
        return bool(self.targets)

    def widths(self, group: int) -> tuple[int, ...]:
        """The activation widths group ``group``'s options name."""
        for members in self.targets.values():
            for gi, _, w in members:
                if gi == group:
                    return w
        return ()

    def reset(self) -> None:
        self.calls = []

    def tensors(self) -> list[torch.Tensor]:
        """The perturbations of every call since :meth:`reset`, in call order."""
        return [c.eps for c in self.calls]

    def _fn(self, name: str, gi: int, m: Member, widths: tuple[int, ...]) -> Transform:
        amax = None if self.static is None else self.static.get(member_key(name, m))

        def fn(xm: torch.Tensor) -> torch.Tensor:
            x = xm.detach()
            eps = torch.zeros_like(x, dtype=torch.float32).requires_grad_(True)
            errors = {a: (fake_quantize_activation(x, a, amax).float() - x.float()) for a in widths}
            self.calls.append(ProbeCall(gi, m, x, eps, errors))
            return xm + eps.to(xm.dtype)

        return fn

    @contextmanager
    def installed(self, modules: Mapping[str, nn.Module]) -> Iterator[InputProbes]:
        """The probes on ``modules`` (name -> module) until exit."""
        per_module = {
            name: [(m, self._fn(name, gi, m, widths)) for gi, m, widths in members]
            for name, members in self.targets.items()
        }
        handles = input_hooks(modules, per_module)
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def dots(self, grads: Sequence[torch.Tensor | None]) -> dict[tuple[int, int], torch.Tensor]:
        """``sum over the group's calls of <d loss / d eps, Q_A(x) - x>`` per (group, width): the
        first-order change of the loss when the group's inputs are rounded to ``A`` bits (``grads``
        in :meth:`tensors` order)."""
        out: dict[tuple[int, int], torch.Tensor] = {}
        for c, g in zip(self.calls, grads, strict=True):
            if g is None:
                continue
            for a, err in c.errors.items():
                d = (g.float() * err).sum(dtype=torch.float64)
                out[(c.group, a)] = out[(c.group, a)] + d if (c.group, a) in out else d
        return out


#: how a curvature weighs the squared activation error (the methods' ``weighting`` names): ``elements``
#: ``sum_e c_e dx_e^2``; ``rows`` (per token) ``sum_t mean_j(c_tj) sum_j dx_tj^2``; ``members``
#: ``mean(c over every element seen) * sum dx^2``
ActWeighting = Literal["elements", "rows", "members"]


class ActivationCurvature:
    """The curvature-weighted squared activation error of every (group, width), accumulated over
    calls of :class:`InputProbes`: for each call, ``c`` is a curvature estimate per element of the
    member's input (a squared per-example gradient for the Fisher, ``v * Hv`` for Hutchinson's
    diagonal) and ``dx = Q_A(x) - x``; :meth:`scores` weighs them as ``weighting`` says, summed over
    the group's members and calls. ``members`` keeps ``sum c``, the count of elements and
    ``sum dx^2`` per (member, width) apart, so that it does not depend on how the calibration rows
    were cut into batches; the other two are sums."""

    def __init__(self, weighting: ActWeighting = "elements") -> None:
        self.weighting = weighting
        self._sums: dict[tuple[int, int], float] = {}
        self._members: dict[tuple[int, int, Member], list[float]] = {}

    def add(self, calls: Sequence[ProbeCall], curvatures: Sequence[torch.Tensor | None]) -> None:
        for c, curv in zip(calls, curvatures, strict=True):
            if curv is None:
                continue
            cf = curv.detach().float()
            for a, err in c.errors.items():
                d2 = err.square()
                key = (c.group, a)
                if self.weighting == "elements":
                    v = float((cf * d2).sum(dtype=torch.float64))
                elif self.weighting == "rows":
                    v = float((cf.mean(-1, dtype=torch.float64) * d2.sum(-1, dtype=torch.float64)).sum())
                else:
                    mk = (c.group, a, c.member)
                    acc = self._members.setdefault(mk, [0.0, 0.0, 0.0])
                    acc[0] += float(cf.sum(dtype=torch.float64))
                    acc[1] += float(cf.numel())
                    acc[2] += float(d2.sum(dtype=torch.float64))
                    continue
                self._sums[key] = self._sums.get(key, 0.0) + v

    def totals(self) -> dict[tuple[int, int], float]:
        """The weighted sum per (group index, width), before any normalisation."""
        if self.weighting != "members":
            return dict(self._sums)
        out: dict[tuple[int, int], float] = {}
        for (gi, a, _), (csum, n, d2) in self._members.items():
            out[(gi, a)] = out.get((gi, a), 0.0) + csum / max(1.0, n) * d2
        return out


def add_activation_scores(
    space: SearchSpace, scores: dict[str, dict[str, float]], act: Mapping[tuple[int, int], float]
) -> dict[str, dict[str, float]]:
    """Every option with an activation width scored as its weights' score plus its activations'
    (``act[(group index, width)]``, clamped at 0): ``score(g, bAa) = score(g, b) + act(g, a)``, the
    two halves of the second-order model of a W/A option with the cross terms between the weight
    error and the activation error dropped (as a diagonal curvature drops those between weights).
    ``scores`` (group name -> option key -> score) is changed in place and returned."""
    for gi, (g, opts) in enumerate(zip(space.groups, space.options, strict=True)):
        row = scores.get(g.name)
        if row is None:
            continue
        for o in opts:
            if o.act_bits is None or o.pruned:
                continue
            row[o.key()] = row.get(o.key(), 0.0) + max(0.0, float(act.get((gi, o.act_bits), 0.0)))
    return scores
