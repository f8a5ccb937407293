"""Quantization primitives: pure tensor functions, no modules, no state.

Weights are in the ``[out_features, in_features]`` layout of ``torch.nn.Linear`` and are quantized
*per output channel*: each row has its own scale (and its own zero point when asymmetric), or, with
``group_size=N``, *per group*: each run of ``N`` consecutive input columns of each row has its own
(``N`` must divide the columns). A group-wise grid is the per-row grid of the matrix reshaped to
``[rows * cols / N, N]``, so everything below about rows holds for every group: scales, zero points
and MSE clipping are chosen group by group, and ``QParams`` hold ``[rows, cols / N]`` tensors.
Every function keeps the device of its input and makes no device assumption (CPU and CUDA alike);
float16 / bfloat16 inputs are computed in float32 and results handed back in the input's dtype.
Everything is deterministic: no randomness, ties broken by a fixed order.

Bit-widths
==========

======  =====================================================================================
bits    meaning
======  =====================================================================================
0       pruned: the weight becomes zeros; its error is ``||w||^2``
2..8    integer grid per row (2, 3, 4, 5, 6 and 8 are the widths a search offers)
16      rounded through float16: ``w.half().to(w.dtype)`` (no scales)
32      unchanged
======  =====================================================================================

Integer grids
=============

=============  =======================  ==============================  ==========================
grid           codes ``q``              scale / zero point              real range covered
=============  =======================  ==============================  ==========================
symmetric      ``[-(2^(b-1)-1),         ``s = r * max|w| / (2^(b-1)-1)``  ``[-r max|w|, r max|w|]``
               2^(b-1)-1]`` (int8)      ``z = 0``
asymmetric     ``[0, 2^b - 1]``         ``lo = r * min(min w, 0)``        ``[lo, hi]``
               (uint8)                  ``hi = r * max(max w, 0)``
                                        ``s = (hi - lo) / (2^b - 1)``
                                        ``z = clamp(round(-lo / s), 0, 2^b - 1)``
=============  =======================  ==============================  ==========================

* The symmetric grid is the *restricted* one: ``-2^(b-1)`` is never used, so the grid is
  symmetric around an exact zero (at 2 bits this leaves the three levels ``{-s, 0, s}``).
* The asymmetric range always contains 0 (as in GPTQ), so zero (pruned or padded weights) is
  exactly representable; the clip ratio ``r`` shrinks both ends *toward zero*, and the zero point
  is an integer.
* ``quantize``: ``q = clamp(round(w / s) + z, qmin, qmax)`` (``round`` is half-to-even);
  ``dequantize``: ``(q - z) * s``.
* Scales are float32 tensors whose values are *float16 numbers*: every candidate scale is
  rounded to the nearest float16 (clamped to ``[SCALE_EPS, SCALE_MAX]``) before codes are
  chosen, so the search evaluates exactly what an artifact stores with float16 scales
  (``search.export``; ``search.cost`` counts 2 bytes a scale). The scales of a *bfloat16*
  weight are rounded to the nearest bfloat16 first (clamped to ``[SCALE_EPS,
  BF16_SCALE_MAX]``), then to float16: numbers of both types (:func:`round_scale`), because a
  compressed-tensors checkpoint (and the engines that read it) holds a module's scales in the
  model's dtype, and a float16 scale rounded to bfloat16 would give other weights than the ones
  evaluated. A float16 or float32 weight keeps the float16 rounding alone. A row whose range is 0 (an
  all-zero row) gets the scale ``SCALE_EPS`` (the smallest positive float16, ``2^-24``), so
  nothing divides by zero and the row dequantizes to exact zeros; rows whose values all lie
  below ``2^-25`` in magnitude (beyond float16's range) quantize to zeros.

Clipping
========

``clip="minmax"`` uses ``r = 1`` (the row's full range). ``clip="mse"`` tries ``grid`` ratios
``r`` in ``linspace(1.0, MSE_MIN_RATIO, grid)`` and keeps, *for every row separately*, the ratio
with the smallest squared error of that row (vectorised over rows; the loop runs over the
ratios only; on ties the larger ratio wins). Since ``r = 1`` is in the grid, MSE clipping is
never worse than min-max, row by row.

Packing
=======

``pack`` stores codes densely, ``bits`` bits each, in a little-endian bit stream: code ``i``
occupies stream bits ``[i*bits, (i+1)*bits)``, least significant bit first, and stream bit ``k``
is bit ``k % 8`` of byte ``k // 8``. ``n`` codes take ``ceil(n * bits / 8)`` bytes, the figure
``search.cost`` counts per member slice. Codes are the same ``[rows, cols]`` matrix whatever the
scales' granularity, so group-wise codes pack exactly like per-row ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from search.errors import InvalidInputError

__all__ = [
    "Clip",
    "MSE_MIN_RATIO",
    "QParams",
    "SCALE_EPS",
    "SCALE_MAX",
    "BF16_SCALE_MAX",
    "choose_qparams",
    "code_range",
    "dequantize",
    "fake_quantize",
    "pack",
    "quant_error",
    "quantize",
    "round_scale",
    "unpack",
]

Clip = Literal["mse", "minmax"]

#: Smallest clip ratio of the MSE search: ratios run from 1.0 down to this.
MSE_MIN_RATIO = 0.3
#: Scale used for rows whose range is zero (and the floor of every scale): the smallest positive
#: float16 (a subnormal), so that every scale is exactly representable in float16.
SCALE_EPS = 2.0**-24
#: Largest scale: the largest finite float16.
SCALE_MAX = float(torch.finfo(torch.float16).max)
#: Largest scale of a bfloat16 weight: the largest bfloat16 that is a finite float16 (65,280).
BF16_SCALE_MAX = 65280.0
#: Integer bit-widths the primitives accept (the search offers 2, 3, 4, 5, 6, 8).
_INT_BITS = range(2, 9)
#: Elements processed at once by the MSE search (bounds its temporaries).
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class QParams:
    """Quantization parameters of one weight matrix.

    ``scale``: float32 holding float16 values (exact as ``scale.half()``); ``zero_point``: int32
    (all 0 when symmetric); both on the weight's device, of shape ``[rows]`` per row, or
    ``[rows, cols / group_size]`` with group-wise scales (``group_size`` set: one entry per
    ``group_size`` input columns of each row). ``bits`` and ``symmetric`` fix the code range
    (see :func:`code_range`).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    symmetric: bool
    group_size: int | None = None

    def shape_for(self, w_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape ``scale`` and ``zero_point`` must have for a weight of ``w_shape``."""
        rows, cols = int(w_shape[0]), int(w_shape[1])
        if self.group_size is None:
            return (rows,)
        return (rows, cols // self.group_size)

    @property
    def qmin(self) -> int:
        return code_range(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return code_range(self.bits, self.symmetric)[1]


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The smallest and largest integer code: ``(-(2^(b-1)-1), 2^(b-1)-1)`` when symmetric,
    ``(0, 2^b - 1)`` when asymmetric."""
    _check_int_bits(bits)
    if symmetric:
        m = 2 ** (bits - 1) - 1
        return -m, m
    return 0, 2**bits - 1


def _check_int_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in _INT_BITS:
        raise InvalidInputError(f"integer quantization needs 2 to 8 bits, got {bits!r}", field="bits")


def _check_bits(bits: int) -> None:
    if (
        isinstance(bits, bool)
        or not isinstance(bits, int)
        or (bits not in _INT_BITS and bits not in (0, 16, 32))
    ):
        raise InvalidInputError(f"unknown bit-width {bits!r}; allowed: 0, 2 to 8, 16, 32", field="bits")


def _check_group_size(w: torch.Tensor, group_size: int | None) -> None:
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise InvalidInputError(f"group_size must be a positive integer, got {group_size!r}", field="group_size")
    if w.ndim != 2 or w.shape[1] % group_size:
        raise InvalidInputError(
            f"group_size {group_size} does not divide the {w.shape[-1] if w.ndim else 0} columns of the weight",
            field="group_size",
        )


def _as_rows(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``w`` with every group of ``group_size`` columns as one row (``w`` itself per row)."""
    return w if group_size is None else w.reshape(-1, group_size)


def _check_matrix(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or w.ndim != 2 or not w.is_floating_point():
        what = f"a {w.ndim}-d {w.dtype} tensor" if isinstance(w, torch.Tensor) else type(w).__name__
        raise InvalidInputError(f"expected a 2-d floating-point [out, in] weight, got {what}", field="weight")


def round_scale(scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``scale`` as the value every format stores exactly, kept as float32: clamped to ``[SCALE_EPS,
    SCALE_MAX]`` and rounded to the nearest float16 (half to even); for the scales of a weight of
    ``dtype`` bfloat16, clamped to ``[SCALE_EPS, BF16_SCALE_MAX]`` and rounded to the nearest bfloat16,
    then to float16, a number of both types (a bfloat16 number is a float16 one above ``2^-14``; below,
    the float16 rounding keeps fewer than 8 significant bits). See the module docstring."""
    s = scale.to(torch.float32)
    if dtype == torch.bfloat16:
        s = s.clamp(SCALE_EPS, BF16_SCALE_MAX).to(torch.bfloat16).to(torch.float32)
    return s.clamp(SCALE_EPS, SCALE_MAX).to(torch.float16).to(torch.float32)


def _params_at_ratio(
    w_min: torch.Tensor, w_max: torch.Tensor, ratio: float, bits: int, symmetric: bool, dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (float32 holding integers) per row for one clip ratio.

    ``w_min`` / ``w_max`` are the rows' minimum and maximum in float32; ``dtype`` is the weight's
    (:func:`round_scale`).
    """
    qmin, qmax = code_range(bits, symmetric)
    if symmetric:
        scale = round_scale(torch.maximum(w_max, -w_min) * ratio / qmax, dtype)
        return scale, torch.zeros_like(scale)
    lo = w_min.clamp_max(0.0) * ratio
    hi = w_max.clamp_min(0.0) * ratio
    scale = round_scale((hi - lo) / (qmax - qmin), dtype)
    zero_point = torch.round(-lo / scale).clamp(qmin, qmax)
    return scale, zero_point


def _codes(
    w32: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Integer codes as float32: ``clamp(round(w / s) + z, qmin, qmax)`` (one formula for all paths)."""
    return (torch.round(w32 / scale[:, None]) + zero_point[:, None]).clamp_(qmin, qmax)


def _row_sq_error(
    w32: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Squared error of every row (float64 sums of float32 squares) under the given parameters.

    The arithmetic of :func:`_codes` and :func:`dequantize`, in place in one temporary (the MSE search
    calls this once per clip ratio: a quarter of the time of the out-of-place expression)."""
    err = torch.div(w32, scale[:, None])
    err.round_().add_(zero_point[:, None]).clamp_(qmin, qmax).sub_(zero_point[:, None]).mul_(scale[:, None])
    return err.sub_(w32).square_().sum(dim=1, dtype=torch.float64)


def choose_qparams(
    w: torch.Tensor,
    bits: int,
    *,
    symmetric: bool = True,
    clip: Clip = "mse",
    grid: int = 20,
    group_size: int | None = None,
) -> QParams:
    """Per-row (or, with ``group_size``, per-group) scales and zero points for quantizing ``w`` to
    ``bits`` integer bits.

    ``clip="minmax"`` covers each row's (group's) full range; ``clip="mse"`` searches ``grid`` clip
    ratios in ``linspace(1.0, MSE_MIN_RATIO, grid)`` and keeps each row's (group's) best (see the
    module docstring). Raises :class:`InvalidInputError` for a non-2-d or non-float ``w``
    (``weight``), a bit-width outside 2..8 (``bits``), an unknown ``clip``, a ``grid`` below 1, or a
    ``group_size`` that does not divide the columns (``group_size``).
    """
    _check_matrix(w)
    _check_int_bits(bits)
    _check_group_size(w, group_size)
    if clip not in ("mse", "minmax"):
        raise InvalidInputError(f"clip must be 'mse' or 'minmax', got {clip!r}", field="clip")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise InvalidInputError(f"grid must be a positive integer, got {grid!r}", field="grid")
    symmetric = bool(symmetric)
    rows = int(w.shape[0])
    w32 = _as_rows(w.detach().to(torch.float32), group_size)
    scale, zero_point = _choose_rows(w32, bits, symmetric, clip, grid, w.dtype)
    if group_size is not None:
        scale, zero_point = scale.reshape(rows, -1), zero_point.reshape(rows, -1)
    return QParams(scale=scale, zero_point=zero_point.to(torch.int32), bits=bits, symmetric=symmetric,
                   group_size=group_size)


def _choose_rows(
    w32: torch.Tensor, bits: int, symmetric: bool, clip: Clip, grid: int, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (float32 holding integers) of every row of the float32 matrix ``w32``, the
    rows of a weight of ``dtype`` (:func:`round_scale`)."""
    qmin, qmax = code_range(bits, symmetric)
    if w32.shape[1] == 0:
        w_min = w_max = torch.zeros(w32.shape[0], dtype=torch.float32, device=w32.device)
    else:
        w_min, w_max = w32.amin(dim=1), w32.amax(dim=1)
    scale, zero_point = _params_at_ratio(w_min, w_max, 1.0, bits, symmetric, dtype)

    if clip == "mse" and grid > 1 and w32.numel() > 0:
        ratios = torch.linspace(1.0, MSE_MIN_RATIO, grid, dtype=torch.float64).tolist()
        rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, w32.shape[1]))
        scales, zero_points = [], []
        for start in range(0, w32.shape[0], rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            wc, lo_c, hi_c = w32[rows], w_min[rows], w_max[rows]
            best_s, best_z = scale[rows], zero_point[rows]
            best_err = _row_sq_error(wc, best_s, best_z, qmin, qmax)
            for r in ratios[1:]:
                s, z = _params_at_ratio(lo_c, hi_c, r, bits, symmetric, dtype)
                err = _row_sq_error(wc, s, z, qmin, qmax)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_s = torch.where(better, s, best_s)
                best_z = torch.where(better, z, best_z)
            scales.append(best_s)
            zero_points.append(best_z)
        scale, zero_point = torch.cat(scales), torch.cat(zero_points)
    return scale, zero_point


def quantize(w: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Integer codes of ``w`` under ``qp``: int8 when symmetric, uint8 when asymmetric,
    same shape and device as ``w``; every code lies in :func:`code_range`."""
    _check_matrix(w)
    _check_fit(tuple(w.shape), qp, "a weight")
    w_rows = _as_rows(w.detach().to(torch.float32), qp.group_size)
    codes = _codes(w_rows, qp.scale.reshape(-1), qp.zero_point.reshape(-1).to(torch.float32), qp.qmin, qp.qmax)
    return codes.reshape(w.shape).to(torch.int8 if qp.symmetric else torch.uint8)


def _check_fit(shape: tuple[int, ...], qp: QParams, what: str) -> None:
    ok = len(shape) == 2 and (qp.group_size is None or (qp.group_size > 0 and shape[1] % qp.group_size == 0))
    if not ok or qp.scale.shape != qp.shape_for(shape) or qp.zero_point.shape != qp.scale.shape:
        per = "per row" if qp.group_size is None else f"per {qp.group_size} columns"
        raise InvalidInputError(
            f"qparams of shape {tuple(qp.scale.shape)} ({per}) do not fit {what} of shape {tuple(shape)}",
            field="qparams",
        )


def dequantize(q: torch.Tensor, qp: QParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Real values of the codes ``q``: ``(q - zero_point) * scale`` per row (per group), as ``dtype``."""
    _check_fit(tuple(q.shape), qp, "codes")
    q_rows = _as_rows(q.to(torch.float32), qp.group_size)
    zp = qp.zero_point.reshape(-1).to(torch.float32)[:, None]
    return ((q_rows - zp) * qp.scale.reshape(-1)[:, None]).reshape(q.shape).to(dtype)


def fake_quantize(
    w: torch.Tensor,
    bits: int,
    *,
    symmetric: bool = True,
    clip: Clip = "mse",
    grid: int = 20,
    group_size: int | None = None,
) -> torch.Tensor:
    """``w`` as the quantized model sees it, in ``w``'s dtype and on its device.

    0 bits: zeros; 16: rounded through float16; 32: an unchanged copy; 2..8: per-row (per-group
    with ``group_size``) integer quantization (:func:`choose_qparams`, :func:`quantize`,
    :func:`dequantize`). Float and pruned widths accept any shape and ignore ``group_size``;
    integer widths need a 2-d ``[out, in]`` matrix.
    """
    _check_bits(bits)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise InvalidInputError("expected a floating-point weight tensor", field="weight")
    w = w.detach()
    if bits == 0:
        return torch.zeros_like(w)
    if bits == 16:
        return w.half().to(w.dtype)
    if bits == 32:
        return w.clone()
    qp = choose_qparams(w, bits, symmetric=symmetric, clip=clip, grid=grid, group_size=group_size)
    return dequantize(quantize(w, qp), qp, dtype=w.dtype)


def quant_error(
    w: torch.Tensor,
    bits: int,
    *,
    symmetric: bool = True,
    clip: Clip = "mse",
    grid: int = 20,
    group_size: int | None = None,
) -> float:
    """Sum of squared errors ``||w - fake_quantize(w)||^2`` (float64 accumulation).

    0 bits gives ``||w||^2``, 32 bits gives 0.
    """
    fq = fake_quantize(w, bits, symmetric=symmetric, clip=clip, grid=grid, group_size=group_size)
    diff = w.detach().to(torch.float32) - fq.to(torch.float32)
    if diff.ndim == 2:
        # Row (group) sums first, as the MSE search compares them, so that "never worse than
        # min-max" holds for the total too.
        rows = _as_rows(diff, group_size if bits in _INT_BITS else None)
        return float(rows.square_().sum(dim=1, dtype=torch.float64).sum())
    return float(diff.square_().sum(dtype=torch.float64))


def _check_pack_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise InvalidInputError(f"pack needs 1 to 8 bits per code, got {bits!r}", field="bits")


def pack(q_codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes densely, ``bits`` bits each, into a flat uint8 tensor of
    ``ceil(numel * bits / 8)`` bytes (layout in the module docstring).

    Codes are read flattened in row-major order. Unsigned codes must lie in ``[0, 2^bits - 1]``;
    signed codes in ``[-2^(bits-1), 2^(bits-1) - 1]`` are stored in two's complement (unpack them
    with ``signed=True``). Anything else raises :class:`InvalidInputError` (``codes``).
    """
    _check_pack_bits(bits)
    if q_codes.is_floating_point() or q_codes.is_complex() or q_codes.dtype == torch.bool:
        raise InvalidInputError(f"pack needs integer codes, got {q_codes.dtype}", field="codes")
    flat = q_codes.reshape(-1)
    if flat.numel():
        lo, hi = int(flat.min()), int(flat.max())
        if lo < -(2 ** (bits - 1)) or hi > 2**bits - 1 or (lo < 0 and hi > 2 ** (bits - 1) - 1):
            raise InvalidInputError(f"codes in [{lo}, {hi}] do not fit in {bits} bits", field="codes")
    n = flat.numel()
    n_bytes = math.ceil(n * bits / 8)
    chunks = math.ceil(n / 8)  # 8 codes fill exactly ``bits`` bytes
    low = torch.zeros(chunks * 8, dtype=torch.uint8, device=flat.device)
    low[:n] = (flat.to(torch.int16) & (2**bits - 1)).to(torch.uint8)
    codes = low.view(chunks, 8)
    out = torch.zeros(chunks, bits, dtype=torch.uint8, device=flat.device)
    for j in range(8):  # code j of a chunk: stream bits [j*bits, (j+1)*bits) of the chunk's bytes
        byte, shift = divmod(j * bits, 8)
        out[:, byte] |= codes[:, j] << shift  # uint8: the bits past the byte fall off
        if shift + bits > 8:
            out[:, byte + 1] |= codes[:, j] >> (8 - shift)
    return out.view(-1)[:n_bytes].clone() if chunks * bits != n_bytes else out.view(-1)


def unpack(packed: torch.Tensor, bits: int, numel: int, *, signed: bool = False) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as a flat tensor (uint8, or int8
    sign-extended when ``signed``). Reshape it to the codes' original shape."""
    _check_pack_bits(bits)
    if packed.dtype != torch.uint8 or packed.ndim != 1:
        raise InvalidInputError("unpack needs the flat uint8 tensor that pack returns", field="packed")
    if (
        isinstance(numel, bool)
        or not isinstance(numel, int)
        or numel < 0
        or math.ceil(numel * bits / 8) > packed.numel()
    ):
        raise InvalidInputError(
            f"{packed.numel()} bytes cannot hold {numel!r} codes of {bits} bits", field="numel"
        )
    chunks = math.ceil(numel / 8)  # 8 codes fill exactly ``bits`` bytes
    have = min(packed.numel(), chunks * bits)
    if have == chunks * bits:
        stream = packed[:have].view(chunks, bits)
    else:
        stream = torch.zeros(chunks * bits, dtype=torch.uint8, device=packed.device)
        stream[:have] = packed[:have]
        stream = stream.view(chunks, bits)
    mask = 2**bits - 1
    codes = torch.empty(chunks, 8, dtype=torch.uint8, device=packed.device)
    for j in range(8):
        byte, shift = divmod(j * bits, 8)
        code = stream[:, byte] >> shift
        if shift + bits > 8:
            code |= stream[:, byte + 1] << (8 - shift)  # uint8: the bits past the byte fall off
        codes[:, j] = code & mask
    flat = codes.view(-1)[:numel]
    if signed:  # sign-extend: the code's top bit to the int8 sign bit, then an arithmetic shift back
        return (flat << (8 - bits)).view(torch.int8) >> (8 - bits)
    return flat
