"""Straight-through and learned-step-size primitives of the differentiable methods.

Pure tensor functions, no modules, no state, shared by DNAS (:mod:`search.dnas`) and refinement
(:mod:`search.refine`). They reproduce the grids of :mod:`search.quant` in the forward pass and give
them a usable gradient in the backward pass:

=============================  =========================================  ===============================
function                       forward                                    backward
=============================  =========================================  ===============================
:func:`round_ste`              ``round(x)`` (half to even)                identity
:func:`half_ste`               ``x`` rounded to a float16 value           identity
:func:`scaled_grad`            ``x``                                      the gradient times ``g``
:func:`lsq_fake_quantize`      ``(clamp(round(w / s) + z) - z) * s``      the LSQ estimator (Esser et al.
                               per row, as :func:`search.quant.quantize`  2020): see the function
                               and :func:`search.quant.dequantize`
=============================  =========================================  ===============================

:func:`lsq_grad_scale` is LSQ's gradient scale of a step size, ``1 / sqrt(n_weights_per_row * Q_p)``
(``n_weights_per_group`` with group-wise scales). :func:`by_group` lays a weight out by its scales'
groups: step sizes are ``[rows]`` per row or ``[rows, cols / N]`` with one per ``N`` input columns.
"""

from __future__ import annotations

import math

import torch

from search import quant

__all__ = ["by_group", "half_ste", "lsq_fake_quantize", "lsq_grad_scale", "round_ste", "scaled_grad"]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` (half to even) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def half_ste(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest float16 value (in ``x``'s dtype) forward, identity backward."""
    return x + (x.to(torch.float16).to(x.dtype) - x).detach()


def scaled_grad(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``g`` in the backward pass."""
    return (x - x * g).detach() + x * g


def by_group(w: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (``[rows, cols]``) as ``[rows, G, cols / G]`` and ``t`` (``[rows]``, ``G = 1``, or
    ``[rows, G]``) as ``[rows, G, 1]``, so that ``t`` broadcasts over each group's columns; reshape
    the result back to ``w.shape``."""
    rows = w.shape[0]
    t3 = t.reshape(rows, -1, 1)
    return w.reshape(rows, t3.shape[1], -1), t3


def lsq_grad_scale(n_per_row: int, qmax: int) -> float:
    """The LSQ gradient scale of a step size: ``1 / sqrt(n_weights_per_row * Q_p)``, ``Q_p`` the
    largest positive code (``2^(b-1) - 1`` symmetric, ``2^b - 1`` asymmetric)."""
    return 1.0 / math.sqrt(max(1, n_per_row) * max(1, qmax))


def lsq_fake_quantize(
    w: torch.Tensor,
    step: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    grad_scale: float,
    *,
    half_scales: bool = True,
    scale_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Differentiable per-row (or per-group) fake quantization with a learned step size (LSQ).

    ``step`` and ``zero_point`` are ``[rows]`` per row or ``[rows, cols / N]`` per group of ``N``
    input columns (:func:`by_group`).
    Forward: ``(clamp(round(w / s) + z, qmin, qmax) - z) * s`` per row of ``w`` (``s = step`` clamped to
    ``[SCALE_EPS, SCALE_MAX]`` and, with ``half_scales``, rounded as :func:`search.quant.round_scale`
    rounds the scales of a weight of ``scale_dtype``: to float16, and to bfloat16 first for a bfloat16
    weight), the formula of :func:`search.quant.quantize` / :func:`search.quant.dequantize` up to the
    last ulp.
    Backward (the LSQ estimator): ``dw_hat/dw`` is 1 where the code is not clamped and 0 where it is;
    ``dw_hat/ds`` is ``round(w/s) - w/s`` where not clamped and ``qmin - z`` / ``qmax - z`` where
    clamped, multiplied by ``grad_scale``; the rounding of ``s`` is straight-through.
    """
    s = step.clamp(quant.SCALE_EPS, quant.SCALE_MAX)
    if half_scales:
        s = s + (quant.round_scale(s.detach(), scale_dtype).to(s.dtype) - s).detach()
    w3, s3 = by_group(w, scaled_grad(s, grad_scale))
    z3 = zero_point.to(s3.dtype).reshape(s3.shape)
    q = (round_ste(w3 / s3) + z3).clamp(qmin, qmax)
    return ((q - z3) * s3).reshape(w.shape)
