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
    picked = range(len(space.groups)) if groups is None else groups
    per_module: dict[str, list[tuple[Member, int]]] = {}
    for gi in picked:
        g = space.groups[gi]
        opt = pmap.get(g.name, FULL_PRECISION)
        if opt.act_bits is None or opt.pruned:
            continue
        for m in g.members:
            per_module.setdefault(m.module, []).append((m, opt.act_bits))
    handles: list[Any] = []
    for name, members in per_module.items():
        module = modules[name]
        whole = [(m, a) for m, a in members if m.axis == "all"]
        if whole:  # one member covers the whole matrix: quantize its input before the matrix reads it
            (m, a), = whole
            amax = None if static is None else static.get(member_key(name, m))

            def pre(mod: nn.Module, args: tuple[Any, ...], a: int = a, amax: float | None = amax) -> Any:
                return (fake_quantize_activation(args[0], a, amax), *args[1:])

            handles.append(module.register_forward_pre_hook(pre))
            continue
        conv = _is_conv1d(module)
        parts = [(m, a, None if static is None else static.get(member_key(name, m))) for m, a in members]

        def post(
            mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor, parts: list[Any] = parts, conv: bool = conv
        ) -> torch.Tensor:
            x = args[0]
            w = _weight_oi(mod, conv)
            out = out.clone()
            for m, a, amax in parts:
                if m.axis == "out":
                    dx = fake_quantize_activation(x, a, amax) - x
                    out[..., m.start : m.stop] += dx @ w[m.start : m.stop].t().to(dx.dtype)
                else:  # a column block
                    xs = x[..., m.start : m.stop]
                    dx = fake_quantize_activation(xs, a, amax) - xs
                    out += dx @ w[:, m.start : m.stop].t().to(dx.dtype)
            return out

        handles.append(module.register_forward_hook(post))
    return handles


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
