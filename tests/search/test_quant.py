"""Quantization primitives: grids, clipping, round trips, packing, edge cases, bad input."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from search import quant
from search.errors import InvalidInputError
from search.quant import (
    SCALE_EPS,
    Clip,
    choose_qparams,
    code_range,
    dequantize,
    fake_quantize,
    pack,
    quant_error,
    quantize,
    unpack,
)

INT_BITS = (2, 3, 4, 5, 6, 8)


def gaussian(rows: int = 48, cols: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Rows of different magnitudes, like a real layer.
    return torch.randn(rows, cols, generator=g) * torch.linspace(0.01, 0.2, rows)[:, None]


def student_t(rows: int = 48, cols: int = 256, seed: int = 1, df: float = 3.0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.distributions.StudentT(df).sample((rows, cols)) * 0.02


def row_errors(w: torch.Tensor, fq: torch.Tensor) -> torch.Tensor:
    return (w.double() - fq.double()).square().sum(dim=1)


# --------------------------------------------------------------------------- grids and round trips


@pytest.mark.parametrize("bits", INT_BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip", ["mse", "minmax"])
def test_quantize_dequantize_round_trip_is_fake_quantize(bits: int, symmetric: bool, clip: Clip) -> None:
    w = student_t()
    qp = choose_qparams(w, bits, symmetric=symmetric, clip=clip)
    q = quantize(w, qp)
    assert q.dtype == (torch.int8 if symmetric else torch.uint8)
    assert q.shape == w.shape
    qmin, qmax = code_range(bits, symmetric)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    assert torch.equal(dequantize(q, qp), fake_quantize(w, bits, symmetric=symmetric, clip=clip))
    # Dequantized values lie on each row's grid.
    deq = dequantize(q, qp)
    steps = deq / qp.scale[:, None] + qp.zero_point[:, None].float()
    assert torch.allclose(steps, steps.round(), atol=1e-3)


@pytest.mark.parametrize("bits", INT_BITS)
def test_code_ranges_are_documented_ones(bits: int) -> None:
    assert code_range(bits, True) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    assert code_range(bits, False) == (0, 2**bits - 1)
    # The restricted symmetric grid never uses -2^(b-1), even for the most negative weight.
    w = torch.tensor([[-1.0, 0.25, 0.5]])
    q = quantize(w, choose_qparams(w, bits, clip="minmax"))
    assert int(q[0, 0]) == -(2 ** (bits - 1) - 1)


def test_minmax_scales_follow_the_formulas() -> None:
    w = torch.tensor([[-2.0, 0.5, 1.0], [0.5, 1.0, 3.0], [-4.0, -1.0, -0.5]])
    qp = choose_qparams(w, 4, symmetric=True, clip="minmax")
    # Scales are the formulas' values rounded to float16 (what an artifact stores).
    assert torch.equal(qp.scale, (torch.tensor([2.0, 3.0, 4.0]) / 7).half().float())
    assert torch.equal(qp.zero_point, torch.zeros(3, dtype=torch.int32))
    qa = choose_qparams(w, 4, symmetric=False, clip="minmax")
    # The asymmetric range always contains zero: [min(w, 0), max(w, 0)].
    assert torch.equal(qa.scale, (torch.tensor([3.0, 3.0, 4.0]) / 15).half().float())
    assert qa.zero_point.tolist() == [10, 0, 15]
    assert qa.zero_point.dtype == torch.int32


def test_asymmetric_represents_zero_exactly() -> None:
    w = gaussian() + 0.05  # shifted rows
    w[:, ::7] = 0.0
    for bits in INT_BITS:
        fq = fake_quantize(w, bits, symmetric=False)
        assert torch.all(fq[:, ::7] == 0)


def test_asymmetric_beats_symmetric_on_shifted_rows() -> None:
    w = gaussian().abs()  # one-signed rows: half of the symmetric grid is wasted
    for bits in (2, 3, 4):
        assert quant_error(w, bits, symmetric=False) < quant_error(w, bits, symmetric=True)


@pytest.mark.parametrize("bits", INT_BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip", ["mse", "minmax"])
def test_scales_are_float16_values_so_storing_them_in_half_is_exact(bits: int, symmetric: bool, clip: str) -> None:
    # Rows from 1e-9 to 1e5 in magnitude: subnormal, normal and (clamped) huge float16 scales.
    w = student_t(12, 64) * torch.logspace(-7, 7, 12)[:, None]
    qp = choose_qparams(w, bits, symmetric=symmetric, clip=clip)
    assert torch.equal(qp.scale.half().float(), qp.scale)
    assert torch.all(qp.scale >= SCALE_EPS) and torch.all(qp.scale <= quant.SCALE_MAX)
    stored = quant.QParams(qp.scale.half().float(), qp.zero_point.to(torch.uint8).to(torch.int32), bits, symmetric)
    assert torch.equal(dequantize(quantize(w, qp), stored), fake_quantize(w, bits, symmetric=symmetric, clip=clip))


def test_round_scale_of_every_bfloat16_number_is_a_number_of_both_types() -> None:
    # Every positive finite bfloat16 (brute force): the bfloat16 rounding keeps it, the float16 one keeps
    # it from 2^-14 (float16's normal range) to BF16_SCALE_MAX and leaves a bfloat16 number below.
    v = torch.arange(1, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    r = quant.round_scale(v, torch.bfloat16)
    assert torch.equal(r.to(torch.bfloat16).float(), r) and torch.equal(r.half().float(), r)
    normal = (v >= 2.0**-14) & (v <= quant.BF16_SCALE_MAX)
    assert torch.equal(r[normal], v[normal])
    assert float(r.min()) == SCALE_EPS and float(r.max()) == quant.BF16_SCALE_MAX
    assert torch.equal(quant.round_scale(v), v.clamp(SCALE_EPS, quant.SCALE_MAX).half().float())  # float16 alone


@pytest.mark.parametrize("bits", INT_BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip", ["mse", "minmax"])
def test_bfloat16_weights_take_scales_of_both_types(bits: int, symmetric: bool, clip: str) -> None:
    # A bfloat16 checkpoint's scales are stored in bfloat16 by compressed-tensors and in float16 by the
    # native artifact: both hold them exactly, from subnormal float16 scales to clamped huge ones.
    w = (student_t(12, 64) * torch.logspace(-7, 7, 12)[:, None]).to(torch.bfloat16)
    qp = choose_qparams(w, bits, symmetric=symmetric, clip=clip)
    assert torch.equal(qp.scale.half().float(), qp.scale)
    assert torch.equal(qp.scale.to(torch.bfloat16).float(), qp.scale)
    assert torch.all(qp.scale >= SCALE_EPS) and torch.all(qp.scale <= quant.BF16_SCALE_MAX)
    # (q - z) * s in bfloat16 (what compressed-tensors' decompression computes) is the evaluated weight.
    q = quantize(w, qp)
    s16 = qp.scale.to(torch.bfloat16)[:, None]
    z16 = qp.zero_point.to(torch.bfloat16)[:, None]
    assert torch.equal((q.to(torch.bfloat16) - z16) * s16, fake_quantize(w, bits, symmetric=symmetric, clip=clip))


def test_bfloat16_minmax_scales_follow_the_formulas() -> None:
    w = torch.tensor([[-2.0, 0.5, 1.0], [0.5, 1.0, 3.0], [-4.0, -1.0, -0.5]], dtype=torch.bfloat16)
    qp = choose_qparams(w, 4, symmetric=True, clip="minmax")
    # 2/7, 3/7, 4/7 rounded to bfloat16 (then float16, which keeps them): not their float16 roundings.
    want = (torch.tensor([2.0, 3.0, 4.0]) / 7).to(torch.bfloat16).float()
    assert torch.equal(qp.scale, want) and not torch.equal(want, (torch.tensor([2.0, 3.0, 4.0]) / 7).half().float())


# --------------------------------------------------------------------------- clipping


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("make", [gaussian, student_t], ids=["gaussian", "student_t"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_clipping_beats_minmax_at_low_bits(
    bits: int, make: Callable[[], torch.Tensor], symmetric: bool
) -> None:
    w = make()
    mse = quant_error(w, bits, symmetric=symmetric, clip="mse")
    minmax = quant_error(w, bits, symmetric=symmetric, clip="minmax")
    assert mse < 0.95 * minmax


@pytest.mark.parametrize("bits", INT_BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mse_clipping_is_never_worse_than_minmax_row_by_row(bits: int, symmetric: bool, seed: int) -> None:
    w = torch.cat([gaussian(16, 64, seed), student_t(16, 64, seed, df=2.0), torch.rand(8, 64) - 0.3])
    e_mse = row_errors(w, fake_quantize(w, bits, symmetric=symmetric, clip="mse"))
    e_mm = row_errors(w, fake_quantize(w, bits, symmetric=symmetric, clip="minmax"))
    assert torch.all(e_mse <= e_mm)
    assert quant_error(w, bits, symmetric=symmetric, clip="mse") <= quant_error(
        w, bits, symmetric=symmetric, clip="minmax"
    )


def test_mse_picks_each_rows_best_ratio_from_the_grid() -> None:
    w = student_t(8, 128)
    qp = choose_qparams(w, 3, clip="mse", grid=20)
    ratios = torch.linspace(1.0, quant.MSE_MIN_RATIO, 20, dtype=torch.float64).tolist()
    maxabs = w.abs().amax(dim=1)
    # Every row's scale is the float16 rounding of one grid ratio's scale (qmax = 3 at 3 bits).
    candidates = torch.stack([(maxabs * r / 3).half().float() for r in ratios], dim=1)
    assert torch.all((candidates == qp.scale[:, None]).any(dim=1))
    # No ratio of the grid does better on any row.
    best = row_errors(w, fake_quantize(w, 3, clip="mse"))
    for r in ratios:
        s = (maxabs * r / 3).half().float()
        fq = (torch.round(w / s[:, None]).clamp(-3, 3)) * s[:, None]
        assert torch.all(best <= row_errors(w, fq) * (1 + 1e-6))


def test_grid_of_one_is_minmax() -> None:
    w = student_t()
    assert torch.equal(fake_quantize(w, 3, grid=1), fake_quantize(w, 3, clip="minmax"))


# --------------------------------------------------------------------------- bit-widths


@pytest.mark.parametrize("symmetric", [True, False])
def test_error_decreases_with_bits(symmetric: bool) -> None:
    w = student_t()
    errors = [quant_error(w, b, symmetric=symmetric) for b in (0, 2, 3, 4, 5, 6, 8, 16)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert quant_error(w, 32) == 0.0


def test_sixteen_bits_round_through_half() -> None:
    w = gaussian() + 1e-4 * torch.rand(48, 256)
    fq = fake_quantize(w, 16)
    assert fq.dtype == torch.float32
    assert torch.equal(fq, w.half().float())
    assert not torch.equal(fq, w)
    assert quant_error(w, 16) == pytest.approx(float((w.double() - w.half().double()).square().sum()))


def test_thirty_two_bits_is_an_unchanged_copy() -> None:
    w = gaussian()
    fq = fake_quantize(w, 32)
    assert torch.equal(fq, w)
    fq.zero_()
    assert w.abs().sum() > 0  # not aliased


def test_zero_bits_prune() -> None:
    w = gaussian()
    fq = fake_quantize(w, 0)
    assert torch.equal(fq, torch.zeros_like(w))
    assert quant_error(w, 0) == pytest.approx(float(w.double().square().sum()), rel=1e-6)


def test_float_and_pruned_widths_accept_any_shape() -> None:
    v = torch.randn(7)
    assert torch.equal(fake_quantize(v, 0), torch.zeros(7))
    assert torch.equal(fake_quantize(v, 16), v.half().float())
    assert torch.equal(fake_quantize(v, 32), v)


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("bits", INT_BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip", ["mse", "minmax"])
def test_zero_and_constant_rows(bits: int, symmetric: bool, clip: Clip) -> None:
    w = torch.zeros(5, 9)
    w[1] = 0.37
    w[2] = -1.5
    w[3, 4] = 2.0  # a single spike in a zero row
    w[4] = 1e-30  # tiny but not zero: below float16's range
    qp = choose_qparams(w, bits, symmetric=symmetric, clip=clip)
    assert torch.all(torch.isfinite(qp.scale)) and torch.all(qp.scale >= SCALE_EPS)
    assert torch.equal(qp.scale.half().float(), qp.scale)  # float16 values
    fq = fake_quantize(w, bits, symmetric=symmetric, clip=clip)
    assert torch.all(torch.isfinite(fq))
    assert torch.equal(fq[0], torch.zeros(9))
    # Constant rows and lone spikes come back within a float16 scale's rounding (2^-11 relative).
    assert torch.allclose(fq[1:4], w[1:4], rtol=2**-11 * 1.01, atol=0)
    assert torch.equal(fq[3][w[3] == 0], torch.zeros(8))
    assert torch.equal(fq[4], torch.zeros(9))


def test_empty_matrices() -> None:
    for shape in [(0, 4), (3, 0)]:
        w = torch.zeros(shape)
        assert fake_quantize(w, 4).shape == shape
        assert quant_error(w, 4) == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(dtype: torch.dtype) -> None:
    w32 = student_t()
    w = w32.to(dtype)
    for bits in (3, 8):
        fq = fake_quantize(w, bits, symmetric=False)
        assert fq.dtype == dtype
        qp = choose_qparams(w, bits, symmetric=False)
        assert torch.equal(fq, dequantize(quantize(w.float(), qp), qp).to(dtype))
        if dtype == torch.float16:  # float16 weights take the float32 weights' scales
            assert torch.equal(fq, fake_quantize(w.float(), bits, symmetric=False).to(dtype))
    qp = choose_qparams(w, 4)
    assert qp.scale.dtype == torch.float32
    assert fake_quantize(w, 16).dtype == dtype
    assert torch.equal(fake_quantize(w, 32), w)


def test_non_contiguous_views_and_no_input_mutation() -> None:
    base = student_t(16, 64)
    keep = base.clone()
    view = base[:, 8:40]  # a column slice, as a member with axis="in"
    assert not view.is_contiguous()
    assert torch.equal(fake_quantize(view, 4), fake_quantize(view.contiguous(), 4))
    quant_error(view, 3, symmetric=False)
    assert torch.equal(base, keep)


def test_deterministic() -> None:
    w = student_t()
    a = fake_quantize(w, 3, symmetric=False)
    b = fake_quantize(w.clone(), 3, symmetric=False)
    assert torch.equal(a, b)


def test_chunked_search_matches_unchunked(monkeypatch: pytest.MonkeyPatch) -> None:
    w = student_t(40, 64)
    whole = choose_qparams(w, 3, symmetric=False)
    monkeypatch.setattr(quant, "_CHUNK_ELEMENTS", 3 * 64)  # 3 rows at a time, uneven last chunk
    chunked = choose_qparams(w, 3, symmetric=False)
    assert torch.equal(whole.scale, chunked.scale)
    assert torch.equal(whole.zero_point, chunked.zero_point)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu() -> None:
    w = student_t()
    wc = w.cuda()
    for bits in (2, 4, 8):
        for sym in (True, False):
            fq = fake_quantize(wc, bits, symmetric=sym)
            assert fq.device.type == "cuda"
            assert torch.allclose(fq.cpu(), fake_quantize(w, bits, symmetric=sym), atol=1e-6)
    codes = quantize(wc, choose_qparams(wc, 3))
    packed = pack(codes, 3)
    assert packed.device.type == "cuda"
    assert torch.equal(unpack(packed, 3, codes.numel(), signed=True).view_as(codes), codes)


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 13, 1001])
def test_pack_unpack_round_trip(bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + n)
    q = torch.randint(0, 2**bits, (n,), generator=g).to(torch.uint8)
    packed = pack(q, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack(packed, bits, n), q)
    signed = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (n,), generator=g).to(torch.int8)
    assert torch.equal(unpack(pack(signed, bits), bits, n, signed=True), signed)


@pytest.mark.parametrize("bits", INT_BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_quantized_codes(bits: int, symmetric: bool) -> None:
    w = gaussian(5, 13)  # 65 codes: odd length
    qp = choose_qparams(w, bits, symmetric=symmetric)
    q = quantize(w, qp)
    packed = pack(q, bits)
    assert packed.numel() == math.ceil(65 * bits / 8)
    back = unpack(packed, bits, q.numel(), signed=symmetric).view_as(q)
    assert torch.equal(back, q)
    assert torch.equal(dequantize(back, qp), fake_quantize(w, bits, symmetric=symmetric))


def test_pack_layout_is_little_endian_bit_stream() -> None:
    # codes 1, 2, 3 in 3 bits: stream 100 010 110 -> byte 0 = 0b11010001, byte 1 = 0
    assert pack(torch.tensor([1, 2, 3], dtype=torch.uint8), 3).tolist() == [0b11010001, 0]
    assert pack(torch.tensor([0xA, 0x5], dtype=torch.uint8), 4).tolist() == [0x5A]
    assert pack(torch.tensor([-1, 1], dtype=torch.int8), 2).tolist() == [0b0111]


def test_pack_rejects_codes_that_do_not_fit() -> None:
    with pytest.raises(InvalidInputError) as e:
        pack(torch.tensor([0, 8], dtype=torch.uint8), 3)
    assert e.value.field == "codes"
    with pytest.raises(InvalidInputError):
        pack(torch.tensor([-5], dtype=torch.int8), 3)
    with pytest.raises(InvalidInputError):
        pack(torch.tensor([-1, 5], dtype=torch.int8), 3)  # mixes signed and unsigned ranges
    with pytest.raises(InvalidInputError):
        pack(torch.tensor([0.5]), 3)
    with pytest.raises(InvalidInputError) as e:
        pack(torch.tensor([1], dtype=torch.uint8), 9)
    assert e.value.field == "bits"
    with pytest.raises(InvalidInputError) as e:
        unpack(torch.zeros(2, dtype=torch.uint8), 3, 6)
    assert e.value.field == "numel"
    with pytest.raises(InvalidInputError):
        unpack(torch.zeros(2, dtype=torch.int8), 3, 1)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bits", [1, 7.0, 9, 12, True, "4", -4])
def test_bad_bits(bits: Any) -> None:
    with pytest.raises(InvalidInputError) as e:
        fake_quantize(gaussian(), bits)
    assert e.value.field == "bits"


def test_bad_arguments() -> None:
    w = gaussian()
    with pytest.raises(InvalidInputError) as e:
        choose_qparams(w, 16)
    assert e.value.field == "bits"
    with pytest.raises(InvalidInputError) as e:
        fake_quantize(w, 4, clip="percentile")  # type: ignore[arg-type]
    assert e.value.field == "clip"
    with pytest.raises(InvalidInputError) as e:
        choose_qparams(w, 4, grid=0)
    assert e.value.field == "grid"
    with pytest.raises(InvalidInputError) as e:
        fake_quantize(torch.randn(3, 4, 5), 4)
    assert e.value.field == "weight"
    with pytest.raises(InvalidInputError) as e:
        fake_quantize(torch.ones(3, 4, dtype=torch.int32), 4)
    assert e.value.field == "weight"
    qp = choose_qparams(w, 4)
    with pytest.raises(InvalidInputError) as e:
        quantize(w[:10], qp)
    assert e.value.field == "qparams"
    with pytest.raises(InvalidInputError):
        dequantize(quantize(w, qp)[:10], qp)
