"""The closed loop against the open loop and uniform maps, on held-out rows.

``python -m benchmarks.bench_loop [--quick] [--cache .cache] [--out FILE.json] [--model bbc]``

One KL table of the fine-tuned MiniLM classifier (layer granularity, bits 2/3/4/8) is computed once
and served to two searches through the same orchestration (:func:`search.orchestration.run_search`):
the loop off, and the loop on with its defaults. For each search and each budget of 3 and 4 average
bits, the record holds the KL map the search proposes there (the best on the calibration proxy for
the loop, the allocation at that budget without it), the best held-out KL point within the budget,
and the uniform map of that width: held-out output KL and accuracy. The held-out rows choose
nothing: they are read only to report. Costs are wall seconds measured in the same run: the KL
table, each search after the table, and the loop alone, with its forward-pass units.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

BUDGETS = (3.0, 4.0)


def log(msg: str) -> None:
    print(f"[loop] {msg}", file=sys.stderr, flush=True)


def _row(p: Any) -> dict[str, Any]:
    return {"label": p.label, "avg_bits": round(p.cost.avg_bits, 3), "size_mb": round(p.cost.size_mb, 3),
            "kl": p.metrics.get("kl"), "accuracy": p.metrics.get("accuracy"),
            "found": None if p.provenance is None else {k: p.provenance.get(k) for k in
                                                         ("score", "round", "local_search", "guard", "how", "proxy")}}


def _summary(result: Any, loop_on: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    kl_points = [p for p in result.points if p.method == "kl"]
    for b in BUDGETS:
        inside = [p for p in kl_points if p.cost.avg_bits <= b + 1e-9]
        if loop_on:
            proposed = min(inside, key=lambda p: p.provenance.get("proxy", float("inf"))) if inside else None
        else:
            at = [p for p in inside if p.label in ("sweep", "budget")]
            proposed = max(at, key=lambda p: p.cost.avg_bits) if at else None  # the largest allocation within b
        best = min(inside, key=lambda p: p.metrics["kl"]) if inside else None
        uni = next((p for p in result.points if p.method == "uniform" and abs(p.cost.avg_bits - b) < 1e-6), None)
        out[f"{b:g}"] = {"proposed": None if proposed is None else _row(proposed),
                         "best_heldout": None if best is None else _row(best),
                         "uniform": None if uni is None else _row(uni)}
    return out


def run(model: str, cache: Path, quick: bool) -> dict[str, Any]:
    import torch

    from benchmarks.assets import CLASSIFIERS
    from search.local import DataOptions, prepare
    from search.orchestration import SearchHooks, run_search
    from search.pipeline import SearchOptions

    torch.manual_seed(0)
    build, heldout = CLASSIFIERS[model]
    model_dir = build(cache)
    cal, ev, max_length = (64, 400, 64) if quick else (128, 500, 64)
    data = DataOptions(source=str(cache / heldout), label_field="label", calibration=cal, evaluation=ev,
                       max_length=max_length, batch_size=32)
    base = SearchOptions(methods=("kl",), granularity="layer", bits=(2, 3, 4, 8), front_points=8 if quick else 16,
                         seq_len=max_length, uniform_baselines=(8, 4, 3, 2))
    search = prepare(model_dir, data, replace(base, loop={"enabled": False}), device="cpu")
    log(f"{model}: {len(search.space.groups)} groups, {cal} calibration / {ev} held-out rows")
    t0 = time.perf_counter()
    table = search.sensitivity("kl")
    table_s = time.perf_counter() - t0
    log(f"kl table in {table_s:.1f}s")

    class Tables:
        def load(self, method: str) -> Any:
            return table

        def save(self, t: Any) -> None:
            pass

    record: dict[str, Any] = {"model": model, "groups": len(search.space.groups), "calibration_rows": cal,
                              "heldout_rows": ev, "kl_table_s": table_s,
                              "kl_table_forward_units": table.extra.get("forward_units"),
                              "baseline": search.baseline(), "runs": {}}
    for name, loop in (("open", {"enabled": False}), ("closed", {})):
        search.options = replace(base, loop=loop)
        search.timings = {}
        t0 = time.perf_counter()
        result = run_search(search, SearchHooks(tables=Tables()))
        seconds = time.perf_counter() - t0
        info = result.info["loop"]
        record["runs"][name] = {
            "seconds_after_table": seconds,
            "loop_s": search.timings.get("loop:kl", 0.0),
            "evaluation_s": search.timings.get("evaluation"),
            "evaluated_maps": len({p.precision_map for p in result.points}),
            "proxy_evaluations": info.get("proxy_evaluations", 0),
            "forward_units": info.get("forward_units", 0),
            "sweep": (info.get("methods", {}).get("kl") or {}).get("sweep"),
            "rounds": (info.get("methods", {}).get("kl") or {}).get("rounds"),
            "local": (info.get("methods", {}).get("kl") or {}).get("local"),
            "guard": (info.get("methods", {}).get("kl") or {}).get("guard"),
            "budgets": _summary(result, name == "closed"),
        }
        log(f"{name}: {seconds:.1f}s, {record['runs'][name]['evaluated_maps']} maps evaluated")
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_loop", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cache", type=Path, default=Path(".cache"))
    p.add_argument("--model", default="bbc", choices=("bbc", "rt", "uncertainty"))
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    rec = run(a.model, a.cache, a.quick)
    rec.update({"part": "loop", "quick": a.quick, "machine": {"cpu": platform.processor() or platform.machine(),
                                                               "threads": torch.get_num_threads()}})
    text = json.dumps(rec, indent=2, default=float)
    if a.out:
        a.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
