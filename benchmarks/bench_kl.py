"""KL sensitivity on the real MiniLM BBC classifier: the front against uniform baselines, and the cost.

Measured in one run (these machines are noisy, so only ratios are reported):

* the cost of the KL sensitivity in forward-pass units: its wall time divided by the wall time of one
  full-precision forward pass over the same calibration batches, next to the naive count
  ``B * (1 + G * K)`` (in passes over the calibration set: ``1 + G * K``), and the exact count of block
  forwards / blocks;
* the KL front (accuracy vs size) and the uniform 8/6/4/3/2-bit baselines on held-out articles the
  calibration never sees.

``python -m benchmarks.bench_kl [--quick] [--out FILE.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.assets import bbc_classifier, ensure_packages


def forward_time(search, batches, repeats: int = 3) -> float:
    from search.tasks import model_output

    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            for b in batches:
                model_output(search.model, b, search.task)
            best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_kl")
    p.add_argument("--cache", default=".cache")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from search.local import DataOptions, prepare
    from search.pipeline import SearchOptions
    from search.result import Budget

    ensure_packages()
    model_dir = bbc_classifier(a.cache)
    data = DataOptions(
        source=str(Path(a.cache) / "bbc_heldout.jsonl"), label_field="label",
        calibration=32 if a.quick else 128, evaluation=100 if a.quick else 500, max_length=64, batch_size=32,
    )
    opts = SearchOptions(methods=("kl",), bits=(2, 3, 4, 6, 8), budget=Budget(max_avg_bits=4.0),
                         front_points=6 if a.quick else 16, seq_len=64)
    search = prepare(model_dir, data, opts, device="cpu")
    t_fwd = forward_time(search, search.calibration)
    t0 = time.perf_counter()
    table = search.sensitivity("kl")
    t_kl = time.perf_counter() - t0
    t_fwd2 = forward_time(search, search.calibration)
    t_fwd = min(t_fwd, t_fwd2)
    probes = table.extra["probes"]
    naive_units = 1 + probes
    time_units = t_kl / t_fwd
    block_units = table.extra["forward_units"] / len(search.calibration)
    cands = search.candidates(table) + search.uniform_candidates()
    search.baseline()
    points = [search.evaluate_candidate(c) for c in cands]
    result = search.assemble(points, [table])
    rows = sorted(
        ({"method": pt.method, "label": pt.label, "size_mb": pt.cost.size_mb, "avg_bits": pt.cost.avg_bits,
          "accuracy": pt.metrics["accuracy"], "kl": pt.metrics.get("kl"), "on_front": pt in result.front}
         for pt in points),
        key=lambda r: r["size_mb"],
    )
    report = {
        "model": "all-MiniLM-L6-v2 fine-tuned on BBC topics",
        "groups": len(search.space.groups),
        "options_probed_per_group": probes / len(search.space.groups),
        "calibration_sequences": table.samples,
        "fp32_accuracy": result.baseline_metrics["accuracy"],
        "kl_cost": {
            "seconds_over_one_forward_pass": time_units,
            "naive_units": naive_units,
            "ratio_to_naive_time": time_units / naive_units,
            "block_forward_units": block_units,
            "ratio_to_naive_blocks": block_units / naive_units,
            "target_ratio": 0.6,
        },
        "points": rows,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(report["kl_cost"], indent=2))
    print(f"{'method':<9}{'label':<16}{'size MB':>9}{'avg bits':>9}{'accuracy':>10}")
    for r in rows:
        print(f"{r['method']:<9}{r['label']:<16}{r['size_mb']:>9.2f}{r['avg_bits']:>9.2f}{r['accuracy']:>10.3f}"
              + ("  front" if r["on_front"] else ""))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
