"""The front of one model searched with and without group-wise options, with fused-layer ties on and off.

For each configuration (``--configs``: a label, the ``--bits`` list and the ``--tie`` kinds), one
search of the model on the same calibration and evaluation rows (one method, the closed loop off so
every configuration gets the same number of evaluations), then its 2-D front (average bits per
searched weight against the quality metric, :func:`bitscout.rules.pareto_front`), its best point at
each ``--at`` average-bit limit (and the least KL divergence from the full-precision model there:
accuracy on a few hundred rows saturates), every evaluated map, the uniform maps, and the wall time.

``python -m benchmarks.bench_options --model DIR --data FILE.jsonl [--windows] [--label-field F]
[--method fisher] [--calibration N] [--evaluation N] [--max-length N] [--front-points N]
[--configs 'rows:4,3,8:none;groups:4g128,3g128,4,3,8:none;...'] [--at 3.5,4,5] [--out FILE.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_CONFIGS = (
    "rows:4,3,8:none;groups:4g128,3g128,4,3,8:none;rows+ties:4,3,8:qkv,gate_up;groups+ties:4g128,3g128,4,3,8:qkv,gate_up"
)


def _log(msg: str) -> None:
    print(f"[bench_options] {msg}", file=sys.stderr, flush=True)


def _configs(text: str) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    out = []
    for part in text.split(";"):
        label, bits, tie = part.split(":")
        out.append((label, tuple(b.strip() for b in bits.split(",")), tuple(t.strip() for t in tie.split(","))))
    return out


def _best(pts: list[Any], limit: float, metric: str, sign: float) -> dict[str, Any] | None:
    """The best map (by the metric) at or under ``limit`` average bits, and the least KL divergence there."""
    ok = [pt for pt in pts if pt.cost.avg_bits <= limit + 1e-9]
    if not ok:
        return None
    b = max(ok, key=lambda pt: sign * pt.metrics[metric])
    least_kl = min(ok, key=lambda pt: pt.metrics.get("kl", float("inf")))
    return {"avg_bits": b.cost.avg_bits, metric: b.metrics[metric], "size_mb": b.cost.size_mb, "label": b.label,
            "least_kl": least_kl.metrics.get("kl"), "least_kl_avg_bits": least_kl.cost.avg_bits}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_options")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--label-field", default=None)
    p.add_argument("--windows", action="store_true", help="causal LMs: token windows of --max-length")
    p.add_argument("--method", default="fisher")
    p.add_argument("--calibration", type=int, default=32)
    p.add_argument("--evaluation", type=int, default=200)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--front-points", type=int, default=6)
    p.add_argument("--configs", default=DEFAULT_CONFIGS)
    p.add_argument("--at", default="3.5,4,5", help="average-bit limits the best front point is read at")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from benchmarks.run import cpu_model
    from bitscout.methods import LoopOptions
    from bitscout.rules import pareto_front
    from search.local import DataOptions, prepare
    from search.pipeline import SearchOptions
    from search.result import Budget

    data = DataOptions(source=a.data, label_field=a.label_field, calibration=a.calibration, evaluation=a.evaluation,
                       max_length=a.max_length, batch_size=a.batch_size, windows=a.windows)  # fmt: skip
    limits = [float(x) for x in a.at.split(",")]
    runs: list[dict[str, Any]] = []
    for label, bits, tie in _configs(a.configs):
        t0 = time.perf_counter()
        opts = SearchOptions(methods=(a.method,), bits=bits, tie=tie, front_points=a.front_points,
                             budget=Budget(max_avg_bits=max(limits)), loop=LoopOptions(enabled=False),
                             uniform_baselines=tuple(sorted({int(str(b).split("g")[0]) for b in bits}, reverse=True)))  # fmt: skip
        s = prepare(a.model, data, opts, device="cpu")
        result = s.run()
        seconds = time.perf_counter() - t0
        metric, hib = result.metric, result.higher_is_better
        pts = [pt for pt in result.points if metric in pt.metrics]
        front = [pts[i] for i in pareto_front([(pt.cost.avg_bits, pt.metrics[metric]) for pt in pts], higher_is_better=hib)]
        sign = 1.0 if hib else -1.0

        run = {
            "label": label, "bits": list(bits), "tie": list(tie), "seconds": seconds, "metric": metric,
            "baseline": result.baseline_metrics.get(metric), "decisions": len(s.space.decisions),
            "groups": len(s.space.groups),
            "front": [{"avg_bits": pt.cost.avg_bits, **pt.metrics, "size_mb": pt.cost.size_mb,
                       "label": pt.label, "method": pt.method} for pt in front],
            "maps": [{"avg_bits": pt.cost.avg_bits, **pt.metrics, "label": pt.label} for pt in pts],
            "best_at": {str(x): _best(pts, x, metric, sign) for x in limits},
            "uniform": {pt.label: {"avg_bits": pt.cost.avg_bits, **pt.metrics}
                        for pt in pts if pt.method == "uniform"},
            "evaluated": len(pts),
        }  # fmt: skip
        runs.append(run)
        _log(f"{label}: {len(front)} front points, {len(pts)} maps, {seconds:.0f} s; best at "
             + ", ".join(f"{k}: {v and (round(v[metric], 4), v['least_kl'])}" for k, v in run["best_at"].items()))  # fmt: skip
        del s, result
    out = {
        "model": str(a.model), "data": str(a.data), "method": a.method, "calibration": a.calibration,
        "evaluation": a.evaluation, "max_length": a.max_length, "windows": a.windows, "cpu": cpu_model(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d"), "runs": runs,
    }  # fmt: skip
    text = json.dumps(out, indent=2)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
