"""DNAS on the real MiniLM BBC classifier: its front against the sensitivity fronts, its cost, its memory.

Measured in one run (the machine is shared and noisy, so costs are reported as ratios):

* **fronts**: the DNAS maps, the KL (and Hessian, when :mod:`search.hessian` is there) allocations
  and the uniform 8/6/4/3/2-bit baselines, each evaluated on held-out BBC articles the calibration
  never sees: accuracy vs size (and average bits), sub-layer groups (attention heads and blocks of
  FFN neurons) with pruning allowed. The low-bit end is summarised per method by the best accuracy
  at average bits <= 3 and <= 2.5 and by the area under the accuracy-vs-size step curve from the
  smallest map to the size of the uniform 3-bit model (``low_bit_area``: larger is better);
* **search cost in fine-tuning epochs**: the DNAS search's wall time (reference outputs, quantized
  versions and every step of every target) divided by the time of one epoch of plain fine-tuning
  (AdamW on every parameter, cross-entropy, train mode) over the same calibration micro-batches
  (median of an epoch timed before and one after the searches); target <= 3;
* **memory of one step**: in a fresh process each (so that no allocator cache is shared), the peak
  resident memory of one DNAS step (its quantized weight versions and optimizer state included) and
  of one plain fine-tuning step (gradients and AdamW state included) on the same micro-batch,
  reported as the peak above the loaded model (``/proc/self/clear_refs`` resets the peak, Linux) and
  as the whole process's peak; target <= 1.5x. On a GPU the same comparison uses
  ``torch.cuda.max_memory_allocated``.

``--quick`` searches the last two blocks only, on short sequences, without the Hessian front
(``--hessian`` adds it); the full run searches every block.

``python -m benchmarks.bench_dnas [--quick] [--out F.json] [--hessian | --no-hessian]``
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.assets import bbc_classifier, ensure_packages


def log(message: str) -> None:
    print(f"[bench_dnas] {message}", file=sys.stderr, flush=True)


def _quiet() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _settings(quick: bool) -> dict[str, Any]:
    if quick:  # the last two blocks, short sequences: minutes on a loaded 2-core machine
        return {
            "calibration": 32, "evaluation": 64, "max_length": 32, "batch_size": 32, "micro_batch": 4,
            "bits": (0, 2, 3, 4), "ffn_block_size": 768, "front_points": 6,
            "include": ("*.layer.4.*", "*.layer.5.*"),
        }
    return {
        "calibration": 128, "evaluation": 1000, "max_length": 64, "batch_size": 32, "micro_batch": 8,
        "bits": (0, 2, 3, 4, 8), "ffn_block_size": 384, "front_points": 10, "include": None,
    }


def _prepare(cache: str, quick: bool, methods: tuple[str, ...]):
    from search.local import DataOptions, prepare
    from search.pipeline import SearchOptions

    s = _settings(quick)
    data = DataOptions(
        source=str(Path(cache) / "bbc_heldout.jsonl"), label_field="label", calibration=s["calibration"],
        evaluation=s["evaluation"], max_length=s["max_length"], batch_size=s["batch_size"],
    )
    opts = SearchOptions(
        methods=methods, granularity="group", bits=s["bits"], ffn_block_size=s["ffn_block_size"],
        front_points=s["front_points"], seq_len=s["max_length"], include=s["include"],
        method_options={"dnas": {"batch_size": s["micro_batch"]}, "hessian": {"max_probes": 16 if quick else 64}},
    )
    return prepare(bbc_classifier(cache), data, opts, device="cpu")


def _micro_batches(search, size: int):
    from search.dnas.supernet import _split

    return _split(search.calibration, size)


def finetune_epoch_seconds(search, batches) -> float:
    """One epoch of plain fine-tuning (AdamW, cross-entropy, train mode) over ``batches`` on a copy."""
    model = copy.deepcopy(search.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    t = time.perf_counter()
    for b in batches:
        out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    seconds = time.perf_counter() - t
    del model, opt
    return seconds


# ------------------------------------------------------------------------------------------------
# Memory probes (each in a fresh process)


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def memory_probe(cache: str, kind: str, quick: bool) -> dict[str, float]:
    """Peak memory of one ``kind`` step (``dnas`` or ``finetune``) on the first calibration micro-batch."""
    _quiet()
    torch.set_num_threads(1)
    search = _prepare(cache, quick, ("dnas",))
    batch = _micro_batches(search, _settings(quick)["micro_batch"])[:1]
    cuda = torch.cuda.is_available() and search.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident size (VmHWM)
    base = _rss_kb("VmRSS")
    if kind == "dnas":
        from search.dnas import DNAS, DNASOptions
        from search.plan import sweep_metric

        with DNAS(search.model, search.adapter, search.space, search.cost_model, search.task, batch,
                  metric=sweep_metric(search.options.budget), options=DNASOptions(batch_size=None)) as dn:
            opt = torch.optim.Adam(dn.logits, lr=0.1)
            dn.step(tau=1.0, target=dn.expected_cost() * 0.5, update="arch", optimizer=opt)
    else:
        model = search.model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        b = batch[0]
        loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    out = {"step_peak_above_loaded_mb": (_rss_kb("VmHWM") - base) / 1024, "process_peak_mb": _rss_kb("VmHWM") / 1024}
    if cuda:
        out["gpu_step_peak_mb"] = (torch.cuda.max_memory_allocated() - base_gpu) / 2**20
    return out


def _run_probe(cache: str, kind: str, quick: bool) -> dict[str, float]:
    cmd = [sys.executable, "-m", "benchmarks.bench_dnas", "--cache", cache, "--memory-probe", kind]
    if quick:
        cmd.append("--quick")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {kind} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# Fronts


def low_bit_area(points: list[dict[str, Any]], lo: float, hi: float) -> float:
    """Area under the best-accuracy-at-size-or-below step curve over sizes ``[lo, hi]`` (MB)."""
    pts = sorted((p["size_mb"], p["accuracy"]) for p in points if p["size_mb"] <= hi)
    area, best, prev = 0.0, 0.0, lo
    for size, acc in pts:
        size = max(size, lo)
        area += best * (size - prev)
        prev, best = size, max(best, acc)
    return area + best * (hi - prev)


def summarise(rows: list[dict[str, Any]], methods: list[str], lo: float, hi: float) -> dict[str, Any]:
    out = {}
    for m in methods:
        pts = [r for r in rows if r["method"] == m]
        out[m] = {
            "points": len(pts),
            "best_kl_at_avg_bits_le_3": min((r["kl"] for r in pts if r["avg_bits"] <= 3.0 + 1e-9), default=None),
            "best_kl_at_avg_bits_le_2.5": min((r["kl"] for r in pts if r["avg_bits"] <= 2.5 + 1e-9), default=None),
            "best_accuracy_at_avg_bits_le_3": max((r["accuracy"] for r in pts if r["avg_bits"] <= 3.0 + 1e-9), default=None),
            "best_accuracy_at_avg_bits_le_2.5": max((r["accuracy"] for r in pts if r["avg_bits"] <= 2.5 + 1e-9), default=None),
            "low_bit_area": low_bit_area(pts, lo, hi),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_dnas")
    p.add_argument("--cache", default=".cache")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--hessian", action=argparse.BooleanOptionalAction, default=None,
                   help="include the Hessian front (default: yes, except with --quick)")
    p.add_argument("--memory-probe", choices=("dnas", "finetune"), default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.memory_probe:
        print(json.dumps(memory_probe(a.cache, a.memory_probe, a.quick)))
        return 0
    _quiet()
    ensure_packages()
    from search import allocate as alloc
    from search.plan import Candidate, build_problem

    want = (not a.quick) if a.hessian is None else a.hessian
    has_hessian = want and Path(__file__).resolve().parents[1].joinpath("search", "hessian.py").exists()
    methods = ("kl", "hessian", "dnas") if has_hessian else ("kl", "dnas")
    search = _prepare(a.cache, a.quick, methods)
    micro = _micro_batches(search, _settings(a.quick)["micro_batch"])
    log(f"{len(search.space.groups)} groups, {len(micro)} calibration micro-batches, methods {methods}")
    epochs = [finetune_epoch_seconds(search, micro)]
    log(f"fine-tuning epoch: {epochs[0]:.1f} s")
    t0 = time.perf_counter()
    seen: set[str] = set()

    def progress(stage: str, frac: float, msg: str) -> None:
        if stage not in seen:
            seen.add(stage)
            log(f"stage {stage} ({time.perf_counter() - t0:.0f} s)")

    result = search.run(on_progress=progress)
    total = time.perf_counter() - t0
    epochs.append(finetune_epoch_seconds(search, micro))
    epoch = statistics.median(epochs)
    t_dnas = result.timings["search:dnas"]
    # the sensitivity methods' allocations at exactly the sizes of the DNAS maps (same-size comparison)
    points = list(result.points)
    dnas_sizes = sorted({p.cost.size_bytes for p in points if p.method == "dnas"})
    for table in result.sensitivities:
        problem, plimits = build_problem(search.space, search.cost_model, table)
        for size in dnas_sizes:
            a_ = alloc.allocate(problem, {"size_bytes": size, **plimits})
            cand = Candidate(search.space.from_choices(a_.choices), table.method, float(a_.objective),
                             dict(a_.limits), "at dnas size")
            if all(cand.precision_map != p.precision_map or p.method != table.method for p in points):
                points.append(search.evaluate_candidate(cand))
    log(f"search done in {total:.1f} s (dnas {t_dnas:.1f} s); epochs {epochs}")
    mem = {k: _run_probe(a.cache, k, a.quick) for k in ("dnas", "finetune")}
    rows = sorted(
        ({"method": pt.method, "label": pt.label, "size_mb": pt.cost.size_mb, "avg_bits": pt.cost.avg_bits,
          "accuracy": pt.metrics["accuracy"], "kl": pt.metrics.get("kl"), "on_front": pt in result.front}
         for pt in points),
        key=lambda r: (r["size_mb"], r["method"]),
    )
    uni3 = [r for r in rows if r["method"] == "uniform" and r["label"] == "uniform 3-bit"]
    lo = min(r["size_mb"] for r in rows)
    hi = uni3[0]["size_mb"] if uni3 else max(r["size_mb"] for r in rows if r["avg_bits"] <= 3.0)
    summary = summarise(rows, [*methods, "uniform"], lo, hi)
    sens = [m for m in methods if m != "dnas"]
    same_size = []
    for r in rows:
        if r["method"] != "dnas" or r["avg_bits"] > 3.0 + 1e-9:
            continue
        pair = {"size_mb": r["size_mb"], "avg_bits": r["avg_bits"], "dnas": {"accuracy": r["accuracy"], "kl": r["kl"]}}
        for m in sens:
            cands = [x for x in rows if x["method"] == m and x["size_mb"] <= r["size_mb"] + 1e-9]
            if cands:
                best = min(cands, key=lambda x: x["kl"])
                pair[m] = {"accuracy": best["accuracy"], "kl": best["kl"], "size_mb": best["size_mb"]}
        same_size.append(pair)
    best_sens_area = max(summary[m]["low_bit_area"] for m in sens)
    best_sens_acc3 = max((summary[m]["best_accuracy_at_avg_bits_le_3"] or 0.0) for m in sens)
    report = {
        "model": "all-MiniLM-L6-v2 fine-tuned on BBC topics",
        "settings": {**_settings(a.quick), "quick": a.quick},
        "groups": len(search.space.groups),
        "calibration_sequences": sum(len(b) for b in search.calibration),
        "fp32_accuracy": result.baseline_metrics["accuracy"],
        "cost": {
            "dnas_seconds": t_dnas,
            "finetune_epoch_seconds": epoch,
            "dnas_in_finetune_epochs": t_dnas / epoch,
            "target_epochs": 3.0,
            "sensitivity_in_finetune_epochs": {
                m: result.timings.get(f"sensitivity:{m}", float("nan")) / epoch for m in sens
            },
            "search_total_seconds": total,
        },
        "memory": {
            "dnas": mem["dnas"],
            "finetune": mem["finetune"],
            "ratio_step_peak_above_loaded": mem["dnas"]["step_peak_above_loaded_mb"]
            / max(1e-9, mem["finetune"]["step_peak_above_loaded_mb"]),
            "ratio_process_peak": mem["dnas"]["process_peak_mb"] / mem["finetune"]["process_peak_mb"],
            "target_ratio": 1.5,
        },
        "low_bit_end": {
            "size_range_mb": [lo, hi],
            "same_size_pairs": same_size,
            "per_method": summary,
            "dnas_at_least_as_good_as_best_sensitivity": {
                "same_size_kl_wins": sum(
                    all(p["dnas"]["kl"] <= p[m]["kl"] + 1e-12 for m in sens if m in p) for p in same_size
                ),
                "same_size_pairs": len(same_size),
                "low_bit_area": summary["dnas"]["low_bit_area"] >= best_sens_area - 1e-12,
                "best_accuracy_at_avg_bits_le_3": (summary["dnas"]["best_accuracy_at_avg_bits_le_3"] or 0.0)
                >= best_sens_acc3,
            },
        },
        "points": rows,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps({k: report[k] for k in ("cost", "memory", "low_bit_end")}, indent=2))
    print(f"{'method':<9}{'label':<16}{'size MB':>9}{'avg bits':>9}{'accuracy':>10}")
    for r in rows:
        print(f"{r['method']:<9}{r['label'][:15]:<16}{r['size_mb']:>9.2f}{r['avg_bits']:>9.2f}{r['accuracy']:>10.3f}"
              + ("  front" if r["on_front"] else ""))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
