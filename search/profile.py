"""``bitscout profile``: measure, on this machine, the latency of every searched matrix shape of a
model at every option, and write a latency table (format: :mod:`bitscout.latency`) that a search
or a job takes as its latency cost model (``--latency-table``).

What is timed
=============

One call of the kernel an option runs for a ``[tokens, in]`` input and an ``[out, in]`` matrix,
the weights prepared beforehand (as a deployment stores them) and the input's own quantization
included (a W8A8 kernel quantizes its input at run time):

==================================  ============================================================
option                              kernel (``kernel`` field of the entry)
==================================  ============================================================
``32``                              ``F.linear`` in float32 (``fp32 matmul``)
``16``                              ``F.linear`` in float16 (``fp16 matmul``; bfloat16 where the
                                    device has no float16 matmul)
integer ``b`` with ``a`` 2-8,       per-token int8 quantization of the input, ``torch._int_mm``
per-row scales                      (int8 × int8 → int32), rescale by the token and row scales
                                    (``int8 _int_mm``); widths below 8 run the same int8 kernel
                                    (torch offers no narrower integer matmul)
integer ``b``, weight-only or       the codes (int8) dequantized with their scales, then the float
``a16``, or group-wise scales       matmul (``dequant+fp32 matmul`` / ``dequant+fp16 matmul``);
                                    an activation width is applied to the input first
==================================  ============================================================

Each time is the median of ``repeats`` calls after ``warmup`` calls (CUDA: synchronised). A
kernel that fails on the device (``_int_mm`` refuses some shapes on CUDA) falls back to the
dequantize-and-matmul path, and the entry's ``kernel`` says so.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bitscout import options as options_grammar
from bitscout.exit_codes import EXIT_ERROR, EXIT_OK, EXIT_USAGE
from bitscout.latency import LATENCY_TABLE_FORMAT, parse_latency_table
from search.actquant import fake_quantize_activation
from search.errors import InvalidInputError, SearchError
from search.space import BitOption

#: the options profiled when none are asked for
DEFAULT_BITS: tuple[int | str, ...] = (2, 3, 4, 8, 16, 32)
DEFAULT_ACT_BITS: tuple[int, ...] = (8, 16)


def _timer(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _codes_and_scales(w: torch.Tensor, opt: BitOption) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8-held codes of ``w`` at ``opt.bits`` and their float scales (per row, or per group)."""
    q = 2 ** (opt.bits - 1) - 1
    rows = w if opt.group_size is None else w.reshape(-1, opt.group_size)
    scale = (rows.abs().amax(dim=1, keepdim=True) / q).clamp_min(2.0**-24)
    codes = torch.round(rows / scale).clamp(-q, q).to(torch.int8)
    return codes, scale


def kernel_for(
    opt: BitOption, x: torch.Tensor, w: torch.Tensor, device: torch.device
) -> tuple[str, Callable[[], Any]]:
    """The kernel ``opt`` runs (its name, and a call that runs it once) for input ``x`` and weights ``w``."""
    half = torch.float16
    if opt.bits == 32:
        return "fp32 matmul", lambda: F.linear(x, w)
    if opt.bits == 16:
        xh, wh = x.to(half), w.to(half)
        try:
            F.linear(xh, wh)
            return "fp16 matmul", lambda: F.linear(xh, wh)
        except RuntimeError:
            xb, wb = x.to(torch.bfloat16), w.to(torch.bfloat16)
            return "bf16 matmul", lambda: F.linear(xb, wb)
    codes, scale = _codes_and_scales(w, opt)
    out_f, in_f = w.shape
    a = opt.act_bits
    if a is not None and a <= 8 and opt.group_size is None:
        w_t = codes.t().contiguous()  # [in, out] int8, prepared once
        w_scale = scale.reshape(1, out_f)

        def int_mm() -> torch.Tensor:
            amax = x.abs().amax(dim=-1, keepdim=True)
            s = (amax / 127).clamp_min(2.0**-24)
            xq = torch.round(x / s).clamp(-127, 127).to(torch.int8)
            return torch._int_mm(xq, w_t).to(torch.float32) * s * w_scale

        try:
            int_mm()
            return "int8 _int_mm", int_mm
        except RuntimeError:
            pass
    dtype = half if a == 16 or device.type == "cuda" else torch.float32
    scale_d = scale.to(dtype)
    x_d = x.to(dtype)
    shape = w.shape

    def dequant_mm() -> torch.Tensor:
        xin = fake_quantize_activation(x_d, a) if a is not None and a < 16 else x_d
        wd = (codes.to(dtype) * scale_d).reshape(shape)
        return F.linear(xin, wd)

    try:
        dequant_mm()
    except RuntimeError:  # no float16 matmul on this device
        dtype = torch.float32
        scale_d, x_d = scale.to(dtype), x.to(dtype)
    name = "dequant+fp16 matmul" if dtype == half else "dequant+fp32 matmul"
    return name, dequant_mm


def profile_shapes(
    shapes: Iterable[tuple[int, int]],
    options: Sequence[BitOption],
    tokens: Sequence[int],
    *,
    device: str | torch.device = "cpu",
    warmup: int = 3,
    repeats: int = 10,
    seed: int = 0,
    on_entry: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The latency table of ``shapes`` (``(out, in)``) at ``options`` for each token count."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("--device cuda but torch sees no CUDA device", field="device")
    gen = torch.Generator().manual_seed(seed)
    entries: list[dict[str, Any]] = []
    with torch.no_grad():
        for out_f, in_f in sorted(set(shapes)):
            w = (torch.randn(out_f, in_f, generator=gen) / in_f**0.5).to(dev)
            for t in tokens:
                x = torch.randn(t, in_f, generator=gen).to(dev)
                for opt in options:
                    if opt.group_size is not None and in_f % opt.group_size:
                        continue
                    name, fn = kernel_for(opt, x, w, dev)
                    ms = _timer(fn, dev, warmup, repeats)
                    entry = {"tokens": int(t), "shape": [out_f, in_f], "option": opt.key(), "ms": ms, "kernel": name}
                    entries.append(entry)
                    if on_entry is not None:
                        on_entry(entry)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    table = {
        "format": LATENCY_TABLE_FORMAT,
        "device": dev.type,
        "device_name": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "entries": entries,
    }
    return parse_latency_table(table)


def model_shapes(model_dir: str | Path, *, include_head: bool = False, include_embeddings: bool = False) -> list[tuple[int, int]]:
    """The ``(out, in)`` shapes of the matrices a search of the model would take (the adapter's)."""
    from search.adapter import ModelAdapter
    from search.local import detect_task_from_dir
    from search.tasks import load_model

    task = detect_task_from_dir(model_dir)
    lm = load_model(model_dir, task)
    adapter = ModelAdapter(lm.model, include_head=include_head, include_embeddings=include_embeddings)
    return sorted({tuple(info.shape) for info in adapter.matrices.values() if info.kind != "embedding"})  # type: ignore[misc]


def profile_options(bits: Sequence[int | str], act_bits: Sequence[int]) -> list[BitOption]:
    """The options to time: ``bits`` as weight-only options and crossed with ``act_bits``."""
    plain = [BitOption.parse(b) for b in bits]
    crossed = [BitOption.parse(b) for b in options_grammar.with_activation_bits(bits, act_bits)] if act_bits else []
    return sorted({o for o in [*plain, *crossed] if not o.pruned})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bitscout profile",
        description="Measure the latency of every searched matrix shape of a model at every option on this "
        "machine and write a latency table (the cost model of --latency-table).",
        epilog="example:\n  bitscout profile --device cpu --model ./minilm --bits 4,8,16,32 --act-bits 8 "
        "--tokens 128 --out table.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="a transformers model directory")
    p.add_argument("--out", required=True, help="where to write the table (JSON)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to measure (default: cpu)")
    p.add_argument("--bits", default=",".join(map(str, DEFAULT_BITS)), help="options to time (default: 2,3,4,8,16,32)")
    p.add_argument("--act-bits", default=",".join(map(str, DEFAULT_ACT_BITS)),
                   help="activation widths crossed with the integer options, or 'none' (default: 8,16)")
    p.add_argument("--tokens", default="128", help="input rows per call, comma-separated (default: 128, "
                   "the search's seq_len x batch)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per entry, the median is kept (default: 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (default: 3)")
    p.add_argument("--include-head", action="store_true", help="also the task head / lm_head")
    p.add_argument("--quiet", action="store_true", help="no line per entry")
    return p


def _ints(text: str, what: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidInputError(f"{what} must be comma-separated positive integers, got {text!r}", field=what) from None
    if not out or any(v < 1 for v in out):
        raise InvalidInputError(f"{what} must be comma-separated positive integers, got {text!r}", field=what)
    return out


def profile_main(argv: Sequence[str] | None = None) -> int:
    """``bitscout profile``."""
    a = build_parser().parse_args(argv)
    try:
        try:
            bits = [options_grammar.wire_option(b) for b in a.bits.split(",") if b.strip()]
            act = () if a.act_bits.strip().lower() == "none" else options_grammar.parse_act_bits(a.act_bits)
        except options_grammar.OptionSyntaxError as exc:
            raise InvalidInputError(str(exc), field="bits") from None
        tokens = _ints(a.tokens, "tokens")
        if a.repeats < 1 or a.warmup < 0:
            raise InvalidInputError("--repeats must be at least 1 and --warmup at least 0", field="repeats")
        options = profile_options(bits, act)
        shapes = model_shapes(a.model, include_head=a.include_head)

        def show(e: dict[str, Any]) -> None:
            if not a.quiet:
                print(f"{e['shape']} x {e['tokens']} tokens @ {e['option']}: {e['ms']:.4f} ms ({e['kernel']})",
                      file=sys.stderr)

        table = profile_shapes(shapes, options, tokens, device=a.device, warmup=a.warmup, repeats=a.repeats, on_entry=show)
    except SearchError as exc:
        print(f"bitscout profile: {exc}", file=sys.stderr)
        return EXIT_USAGE if exc.code in ("invalid_request", "model_load_failed") else EXIT_ERROR
    Path(a.out).write_text(json.dumps(table, indent=1))
    print(f"wrote {len(table['entries'])} entries ({len(shapes)} shapes x {len(options)} options x "
          f"{len(tokens)} token counts) to {a.out}", file=sys.stderr)
    return EXIT_OK
