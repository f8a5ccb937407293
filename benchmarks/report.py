"""The benchmark report: ``docs/benchmarks.md`` and ``docs/img/*.png`` from the results file only.

``python -m benchmarks.report [--results benchmarks/results/results.json] [--docs docs]``

Nothing here measures anything: every figure comes from the results file written by
:mod:`benchmarks.run`, so the page can be regenerated (and checked) at any time. The helpers that
turn points into fronts, hypervolumes, accuracy-at-bits and compression are public and tested.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.run import PARTS
from bitscout import rules

__all__ = [
    "BITS_TABLE",
    "LITERATURE",
    "compression_within",
    "config_summary",
    "front_rows",
    "hypervolume_rows",
    "main",
    "method_series",
    "metric_at_bits",
    "peer_series",
    "render",
]

ROOT = Path(__file__).resolve().parent.parent
#: Average bits per weight of the user's table.
BITS_TABLE: tuple[float, ...] = (8.0, 4.0, 3.0, 2.5)
#: How far below full precision ("1 point": 0.01 of accuracy or cosine) a point may be.
TOLERANCE = 0.01
METHOD_ORDER = ("kl", "hessian", "dnas", "nsga2", "uniform")
COLORS = {"kl": "tab:blue", "hessian": "tab:orange", "dnas": "tab:green", "nsga2": "tab:purple", "uniform": "black"}

#: Published bounds quoted by the report (weight compression relative to 32-bit weights).
LITERATURE: tuple[dict[str, str], ...] = (
    {
        "work": "Q-BERT (Shen et al., AAAI 2020)",
        "setting": "BERT-base on SST-2, MNLI, CoNLL-03, SQuAD; Hessian-guided mixed precision with group-wise "
                   "quantization and quantization-aware fine-tuning",
        "claim": "at most 2.3% accuracy drop at 13x weight compression",
    },
    {
        "work": "KDLSQ-BERT (Jin et al., 2021)",
        "setting": "BERT-base / TinyBERT on GLUE and SQuAD; knowledge distillation with learned step size "
                   "quantization (quantization-aware training)",
        "claim": "accuracy comparable to full precision with 2-bit weights, about 14.9x weight compression",
    },
    {
        "work": "TernaryBERT (Zhang et al., EMNLP 2020)",
        "setting": "BERT-base / TinyBERT on GLUE and SQuAD; ternary weights trained with distillation",
        "claim": "performance comparable to full precision at 14.9x smaller weights",
    },
)


# ----------------------------------------------------------------------------------- helpers
def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _valid(points: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [p for p in points if _finite(p.get("metric")) and _finite(p.get("size_bytes"))]


def front_rows(points: Iterable[Mapping[str, Any]], *, higher_is_better: bool = True) -> list[Mapping[str, Any]]:
    """The points no other point beats on size (lower) and metric, sorted by size.

    Of points equal on both, the first is kept."""
    pts = _valid(points)
    kept = rules.pareto_front([(float(p["size_bytes"]), float(p["metric"])) for p in pts],
                              higher_is_better=higher_is_better)
    return [pts[i] for i in kept]


def hypervolume_rows(points: Iterable[Mapping[str, Any]], reference: tuple[float, float], *,
                     higher_is_better: bool = True) -> float:
    """Area dominated by ``points`` in the (size, metric) plane, bounded by ``reference = (size, metric)``."""
    sign = 1.0 if higher_is_better else -1.0
    ref_size, ref_q = float(reference[0]), sign * float(reference[1])
    fr = [p for p in front_rows(points, higher_is_better=higher_is_better)
          if p["size_bytes"] < ref_size and sign * p["metric"] > ref_q]
    area = 0.0
    for i, p in enumerate(fr):
        right = fr[i + 1]["size_bytes"] if i + 1 < len(fr) else ref_size
        area += (right - p["size_bytes"]) * (sign * p["metric"] - ref_q)
    return area


def metric_at_bits(points: Iterable[Mapping[str, Any]], bits: float, *, higher_is_better: bool = True) -> float | None:
    """The best metric among points with ``avg_bits <= bits`` (None when no point is that small)."""
    ok = [float(p["metric"]) for p in _valid(points) if _finite(p.get("avg_bits")) and p["avg_bits"] <= bits + 1e-9]
    if not ok:
        return None
    return max(ok) if higher_is_better else min(ok)


def compression_within(points: Iterable[Mapping[str, Any]], *, fp32_metric: float, fp32_size: float,
                       tolerance: float = TOLERANCE, higher_is_better: bool = True) -> dict[str, float] | None:
    """The most compressed point within ``tolerance`` of full precision.

    Returns ``{"whole_model": fp32_size / size, "quantized_weights": 32 / avg_bits, "metric", "avg_bits"}``
    for the smallest such point, or None when no point stays that close."""
    ok = [p for p in _valid(points)
          if (p["metric"] >= fp32_metric - tolerance if higher_is_better else p["metric"] <= fp32_metric + tolerance)]
    if not ok:
        return None
    best = min(ok, key=lambda p: (p["size_bytes"], p.get("avg_bits", 0)))
    bits = best.get("avg_bits")
    return {
        "whole_model": fp32_size / best["size_bytes"],
        "quantized_weights": 32.0 / bits if _finite(bits) and bits > 0 else math.nan,
        "metric": float(best["metric"]),
        "avg_bits": float(bits) if _finite(bits) else math.nan,
    }


def method_series(points: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Points per series: each method alone, ``<m>+refine`` (the method's points and their refined
    versions), and ``uniform``."""
    methods = {str(p["method"]) for p in points}
    base = [m for m in METHOD_ORDER if m in methods] + sorted(m for m in methods if m not in METHOD_ORDER and "+" not in m)
    out: dict[str, list[Mapping[str, Any]]] = {}
    for m in base:
        out[m] = [p for p in points if p["method"] == m]
        if f"{m}+refine" in methods:
            out[f"{m}+refine"] = [p for p in points if p["method"] in (m, f"{m}+refine")]
    return out


def config_summary(rec: Mapping[str, Any]) -> dict[str, Any]:
    """Per series: hypervolume (and its fraction of the best-known front), the metric at
    :data:`BITS_TABLE` bits, the compression within one point of full precision."""
    hib = bool(rec.get("higher_is_better", True))
    points = _valid(rec.get("points", []))
    fp32 = rec["fp32"]
    fp32_size = float(fp32["size_bytes"])
    if points:
        metrics = [float(p["metric"]) for p in points] + [float(fp32["metric"])]
        floor = min(metrics) if hib else max(metrics)
    else:
        floor = 0.0
    reference = (fp32_size, floor)
    best_known = hypervolume_rows(points, reference, higher_is_better=hib)
    series = {}
    for name, pts in method_series(points).items():
        hv = hypervolume_rows(pts, reference, higher_is_better=hib)
        series[name] = {
            "points": len(pts),
            "hypervolume": hv,
            "hv_fraction": hv / best_known if best_known > 0 else None,
            "at_bits": {str(b): metric_at_bits(pts, b, higher_is_better=hib) for b in BITS_TABLE},
            "within_1pt": compression_within(pts, fp32_metric=float(fp32["metric"]), fp32_size=fp32_size,
                                             higher_is_better=hib),
            "front": [{"size_mb": p["size_bytes"] / 1e6, "avg_bits": p.get("avg_bits"), "metric": p["metric"]}
                      for p in front_rows(pts, higher_is_better=hib)],
        }
    return {"reference": reference, "best_known_hypervolume": best_known, "series": series}


# ------------------------------------------------------------------------------------ format
def _f(v: Any, fmt: str = ".3f", none: str = "–") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    if isinstance(v, int | float):
        return format(v, fmt)
    return str(v)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines + [""]


def _part(results: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    rec = results.get("parts", {}).get(name)
    return rec.get("data") if rec and isinstance(rec.get("data"), dict) else None


def _status_line(results: Mapping[str, Any], name: str) -> str | None:
    rec = results.get("parts", {}).get(name)
    if rec is None:
        return f"*Part `{name}` was not run.*"
    status = rec.get("status")
    if status == "ok":
        return None
    if status == "skipped":
        return f"*Part `{name}` skipped: {rec.get('reason', '')}.*"
    return f"*Part `{name}` {status}: {rec.get('error', '')}; the figures below (if any) are what it wrote before.*"


# ------------------------------------------------------------------------------------- plots
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fronts(rec: Mapping[str, Any], path: Path) -> None:
    plt = _plt()
    hib = bool(rec.get("higher_is_better", True))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in method_series(rec.get("points", [])).items():
        if name == "uniform":
            u = sorted(_valid(pts), key=lambda p: p["size_bytes"])
            ax.plot([p["size_bytes"] / 1e6 for p in u], [p["metric"] for p in u], "ks--", label="uniform", ms=6, lw=0.8)
            for p in u:
                ax.annotate(p.get("label", "").replace("uniform ", ""), (p["size_bytes"] / 1e6, p["metric"]),
                            fontsize=7, xytext=(3, -9), textcoords="offset points")
            continue
        fr = front_rows(pts, higher_is_better=hib)
        base = name.split("+")[0]
        style = "o-" if "+" not in name else "^:"
        ax.plot([p["size_bytes"] / 1e6 for p in fr], [p["metric"] for p in fr], style, color=COLORS.get(base),
                label=name, ms=4, lw=1.2)
    fp32 = rec["fp32"]
    ax.axhline(fp32["metric"], color="grey", lw=0.8, ls=":")
    ax.axhline(fp32["metric"] - TOLERANCE if hib else fp32["metric"] + TOLERANCE, color="red", lw=0.6, ls=":",
               label="full precision − 1 point")
    ax.set_xlabel("model size (MB)")
    ax.set_ylabel(rec.get("metric", "metric"))
    lo = min([p["metric"] for p in _valid(rec.get("points", []))] + [fp32["metric"]])
    ax.set_ylim(max(lo - 0.02, fp32["metric"] - 0.35) if hib else None, None)
    ax.set_title(f"{rec['model_label']}\n{rec['granularity']} granularity"
                 + (", embeddings quantized" if rec.get("include_embeddings") else ""), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_oracle(data: Mapping[str, Any], path: Path) -> None:
    plt = _plt()
    methods = list(data.get("methods", {}))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    shown = [(k, label) for k, label in (("accuracy", "accuracy vs size"), ("kl", "KL vs size"),
                                         ("log_kl", "log KL vs size"))
             if any(data["methods"][m].get(f"hv_fraction_{k}") is not None for m in methods)]
    width = 0.8 / max(1, len(shown))
    for j, (metric, label) in enumerate(shown):
        vals = [data["methods"][m].get(f"hv_fraction_{metric}") or 0.0 for m in methods]
        ax.bar([i + (j - (len(shown) - 1) / 2) * width for i in range(len(methods))], vals, width, label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("hypervolume / exhaustive front")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Against the exhaustive front ({data.get('maps')} maps)", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_dnas(data: Mapping[str, Any], path: Path) -> bool:
    """Accuracy against average bits at the low-bit end: every method's points (the sensitivity methods'
    allocations at the DNAS maps' sizes included) and the best accuracy at each size or below."""
    rows = [r for r in data.get("points", []) if _finite(r.get("accuracy")) and _finite(r.get("avg_bits"))
            and r["avg_bits"] <= 4.0 + 1e-9]
    if not rows:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["avg_bits"], r["accuracy"]) for r in rows if r["method"] == m)
        if m == "uniform":
            ax.plot(*zip(*pts, strict=True), "ks--", ms=5, lw=0.8, label="uniform")
            continue
        best, step = -1.0, []
        for b, acc in pts:  # the best accuracy at these average bits or fewer
            best = max(best, acc)
            step.append((b, best))
        step.append((4.0, best))
        ax.plot(*zip(*pts, strict=True), "o", ms=3, alpha=0.4, color=COLORS.get(m))
        ax.step(*zip(*step, strict=True), where="post", lw=1.3, color=COLORS.get(m), label=m)
    fp = data.get("fp32_accuracy")
    if _finite(fp):
        ax.axhline(fp, color="grey", lw=0.8, ls=":", label="full precision")
    ax.set_xlabel("average bits of the searched weights (0 = pruned)")
    ax.set_ylabel("accuracy (held-out)")
    lo = min(r["accuracy"] for r in rows if r["avg_bits"] >= 1.5) if any(r["avg_bits"] >= 1.5 for r in rows) else None
    if lo is not None:
        ax.set_ylim(lo - 0.01, None)
        ax.set_xlim(1.5, 4.05)
    ax.set_title(f"DNAS against the sensitivity fronts: {data.get('model', '')}, {data.get('groups')} groups",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _dnas_lines(data: Mapping[str, Any], img: Path, img_rel: str) -> list[str]:
    """The DNAS part as a reader wants it: the low-bit end per method, the cost, the memory, the plot."""
    lines: list[str] = []
    low = data.get("low_bit_end") or {}
    per = low.get("per_method") or {}
    s = data.get("settings") or {}
    if per:
        lines += [f"{data.get('groups')} groups, {s.get('calibration')} calibration and {s.get('evaluation')} held-out "
                  f"articles, full precision {_f(data.get('fp32_accuracy'))}; the low-bit end is average 3 bits "
                  "and below (`low_bit_area`: area under the best-accuracy-at-size step curve from the smallest map "
                  "to the uniform 3-bit size; larger is better).", ""]
        lines += _table(["method", "points", "best acc. ≤ 3 bits", "≤ 2.5 bits", "best output KL ≤ 3 bits", "≤ 2.5 bits",
                         "low-bit area"],
                        [[m, v.get("points"), _f(v.get("best_accuracy_at_avg_bits_le_3")),
                          _f(v.get("best_accuracy_at_avg_bits_le_2.5")), _f(v.get("best_kl_at_avg_bits_le_3"), ".4f"),
                          _f(v.get("best_kl_at_avg_bits_le_2.5"), ".4f"), _f(v.get("low_bit_area"), ".3f")]
                         for m, v in per.items()])
    cost, mem = data.get("cost") or {}, data.get("memory") or {}
    if cost:
        sens = ", ".join(f"{k} table {_f(v, '.1f')}" for k, v in (cost.get("sensitivity_in_finetune_epochs") or {}).items())
        lines += [f"Cost in fine-tuning epochs over the same calibration micro-batches: DNAS "
                  f"{_f(cost.get('dnas_in_finetune_epochs'), '.2f')} (target ≤ {_f(cost.get('target_epochs'), '.0f')})"
                  + (f"; {sens}" if sens else "") + ". "
                  + (f"Peak memory of one step: {_f(mem.get('ratio_step_peak_above_loaded'), '.2f')}× a plain "
                     f"fine-tuning step (target ≤ {_f(mem.get('target_ratio'), '.1f')}×)." if mem else ""), ""]
    if plot_dnas(data, img / "dnas.png"):
        lines += [f"![dnas]({img_rel}/dnas.png)", ""]
    return lines


def _assets_lines(data: Mapping[str, Any]) -> list[str]:
    """What the assets part built (or found up to date) and how long it took."""
    rows = []
    for name, m in (data.get("models") or {}).items():
        rows.append([name, "built" if m.get("built") else "found up to date", _f(m.get("seconds"), ".0f"),
                     m.get("train_rows", "–"), m.get("heldout_rows", "–"), _f(m.get("heldout_accuracy"))])
    if not rows:
        return []
    return _table(["model", "this run", "seconds", "fine-tuning rows", "held-out rows", "held-out accuracy"], rows)


def _hessian_lines(data: Mapping[str, Any]) -> list[str]:
    """The Hessian-trace cost in forward-pass units and its ranking against a many-probe reference."""
    if "cost_units" not in data:
        return []
    lines = [f"{data.get('model')} ({data.get('task')}, {data.get('loss')} loss), {data.get('groups')} "
             f"{data.get('granularity')} groups, {data.get('batches')} calibration batch(es) of "
             f"{data.get('batch_size')} × {data.get('max_length')} tokens, {data.get('threads')} torch thread(s).", ""]
    lines += _table(["figure", "value"], [
        ["probes per batch (Hutchinson), stopped by", f"{_f(data.get('m'), '.0f')}, {data.get('stopped')}"],
        ["trace cost in forward passes (CPU time of this process)",
         f"{_f(data.get('cost_units'), '.0f')} (target ≤ {_f(data.get('cost_target_units'), '.0f')} = 4 + 7 m)"],
        ["trace cost in forward passes (wall clock)", _f(data.get("cost_units_wall"), ".0f")],
        ["one Hessian-vector product, in forward passes", _f(data.get("hvp_units_per_probe"), ".2f")],
        ["building the gradient graph, in forward passes", _f(data.get("graph_units_per_pass"), ".2f")],
        ["Kendall's τ against a reference run", f"{_f(data.get('kendall_tau'))} ({data.get('reference_probes')} "
                                                 "probes per batch, another seed; target ≥ 0.9)"],
        ["relative error of the traces against the reference: median / max",
         f"{_f(data.get('relative_error_median'))} / {_f(data.get('relative_error_max'))}"],
        ["groups within the tolerance", f"{data.get('groups_under_tolerance')} of {data.get('groups')} "
                                        f"(tolerance {data.get('tolerance')})"],
    ])
    return lines


def _refine_lines(data: Mapping[str, Any]) -> list[str]:
    """Refinement: each point's accuracy before and after, and its cost in fine-tuning epochs."""
    points = data.get("points") or []
    if not points:
        return []
    lines = [f"{data.get('model')}: maps from `{data.get('maps_from')}`, refined with knowledge distillation and "
             f"learned step sizes on {data.get('train_rows')} training rows, early-stopped on "
             f"{data.get('validation_rows')} validation rows, measured on {data.get('evaluation_rows')} held-out "
             f"rows; full precision {_f(data.get('fp32_accuracy'))}. One fine-tuning epoch (the unit) is a plain "
             "full-precision fine-tuning pass over the training rows.", ""]
    lines += _table(["target avg bits", "avg bits", "accuracy after search", "after refinement", "output KL before",
                     "after", "steps (best)", "cost in fine-tuning epochs"],
                    [[_f(p.get("target_avg_bits"), "g"), _f(p.get("avg_bits"), ".2f"), _f(p.get("ptq_accuracy")),
                      _f(p.get("refined_accuracy")), _f(p.get("ptq_kl"), ".4f"), _f(p.get("refined_kl"), ".4f"),
                      f"{p.get('steps')} ({p.get('best_step')})", _f(p.get("refine_epochs"), ".2f")] for p in points])
    if data.get("target"):
        lines += [f"Target: {data['target']}: **{'met' if data.get('target_met') else 'not met'}**.", ""]
    return lines


def _service_refine_lines(data: Mapping[str, Any]) -> list[str]:
    """One job with refinement through the service: the refined points and the end-to-end checks."""
    refined = data.get("refined") or []
    if not refined and not data.get("checks"):
        return []
    def kv(d: Any) -> str:
        return ", ".join(f"{k} {v}" for k, v in d.items()) if isinstance(d, dict) else str(d)

    lines = [f"One job submitted to `bitscout serve` ({data.get('model')}, budget {kv(data.get('budget'))}, "
             f"{data.get('calibration_rows')} calibration / {data.get('evaluation_rows')} held-out rows, refinement "
             f"{kv(data.get('refine'))}): {data.get('job_status')} with {data.get('n_points')} points; refinement took "
             f"{_f(data.get('refine_epochs_total'), '.2f')} fine-tuning epochs in all.", ""]
    if refined:
        lines += _table(["point", "refined from", "avg bits", "accuracy before", "after", "fine-tuning epochs",
                         "recommended"],
                        [[f"#{r.get('id')}", f"#{r.get('refined_from')}", _f(r.get("avg_bits"), ".2f"),
                          _f(r.get("origin_accuracy")), _f(r.get("refined_accuracy")), _f(r.get("refine_epochs"), ".2f"),
                          "yes" if r.get("recommended") else ""] for r in refined])
    checks = data.get("checks") or {}
    if checks:
        lines += _table(["check", "ok", "detail"],
                        [[k, "yes" if c.get("ok") else "**no**", str(c.get("detail", "")).replace("|", "/")]
                         for k, c in checks.items()])
    return lines


def _workers_lines(data: Mapping[str, Any]) -> list[str]:
    """Orchestration overhead: the same search in-process and through the service, and submit-to-running."""
    if "in_process_mean_s" not in data:
        return []
    base = data["in_process_mean_s"]

    def ratio(run: Mapping[str, Any] | None) -> str:
        return _f(run["seconds"] / base, ".3f") if run and run.get("seconds") and base else "–"

    cold, warm, par = data.get("service_cold"), data.get("service_warm"), data.get("service_parallel_eval")
    lat = (data.get("submit_to_running") or {}).get("to_running") or {}
    runner = (data.get("submit_to_running") or {}).get("to_runner_start") or {}
    targets = data.get("targets") or {}
    lines = [f"The same search (`{Path(str(data.get('model'))).name}`) in-process and through `bitscout serve` (API, dispatcher, "
             "local Ray, SQLite); times are ratios to the in-process run (mean of one before and one after).", ""]
    rows = [["in-process", "1.000", "–"],
            ["service, cold (first job: Ray starts a worker)", ratio(cold),
             _f(data.get("orchestration_fraction_cold"), ".3f")],
            ["service, warm", ratio(warm), _f(data.get("orchestration_fraction_warm"), ".3f")]]
    if par:
        rows.append(["service, parallel evaluation (1 extra Ray task)", ratio(par), "–"])
    lines += _table(["run", "wall time / in-process", "orchestration fraction (from the job's own timings)"], rows)
    lines += [f"Overhead target: at most {_f(targets.get('overhead_fraction'), '.0%')} of a job of a few minutes; "
              f"warm {_f(data.get('overhead_fraction_warm'), '.1%')} by wall time against the in-process run, "
              f"{_f(data.get('orchestration_fraction_warm'), '.1%')} from the job's own timings. Submission to "
              f"`running` on a warm Ray: p50 {_f(lat.get('p50_s'), '.2f')} s, max {_f(lat.get('max_s'), '.2f')} s "
              f"(target ≤ {_f(targets.get('submit_to_running_s'), '.0f')} s); to the runner's start: p50 "
              f"{_f(runner.get('p50_s'), '.2f')} s.", ""]
    return lines


#: the allocation benchmark's series plotted and tabulated, when its rows carry them
ALLOC_KEYS = (("ours_one_ms", "bitscout, one budget"), ("ours_front32_ms", "bitscout, 32-point front"),
              ("milp_one_ms", "HiGHS MILP, one budget"), ("milp_front32_ms", "HiGHS MILP, 32-point front"))



def _alloc_rows(data: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The allocation benchmark's rows that time bitscout's allocator (the layout the table and plot read)."""
    return [r for r in data.get("rows") or [] if isinstance(r, dict) and "ours_one_ms" in r]

def _allocate_lines(data: Mapping[str, Any]) -> list[str]:
    rows = _alloc_rows(data)
    if not rows:
        return []
    lines = ["bitscout's exact allocator (convex hull + dynamic programming, gap certified) against a general MILP "
             "solver (HiGHS, relative gap 1e-12) on the same problems: one budget, and a 32-point front. "
             "`ratio` is the MILP's time over bitscout's, measured in the same run.", ""]

    def ms(r: Mapping[str, Any], k: str) -> str:
        v = r.get(k)
        est = k == "milp_front32_ms" and r.get("milp_front32_estimated")
        return "–" if v is None else _f(v, ".1f") + (" (est.)" if est else "")

    def ratio(r: Mapping[str, Any], a: str, b: str) -> str:
        return _f(r[b] / r[a], ".0f") + "×" if r.get(a) and r.get(b) else "–"

    lines += _table(["groups", "options", "one budget ms", "MILP ms", "ratio", "front ms", "MILP front ms", "ratio",
                     "certified gap (max)", "objective vs MILP (relative, max)"],
                    [[r["groups"], r.get("options"), ms(r, "ours_one_ms"), ms(r, "milp_one_ms"),
                      ratio(r, "ours_one_ms", "milp_one_ms"), ms(r, "ours_front32_ms"), ms(r, "milp_front32_ms"),
                      ratio(r, "ours_front32_ms", "milp_front32_ms"),
                      _f(max(r.get("ours_one_gap_max") or 0.0, r.get("ours_front32_gap_max") or 0.0), ".2g"),
                      _f(max([x for x in (r.get("ours_vs_milp_one"), r.get("ours_vs_milp_front32_max")) if x is not None],
                             default=None), ".2g")] for r in rows])
    s, t = data.get("summary") or {}, data.get("targets") or {}
    if s:
        lines += [f"At 10,000 groups: one budget {_f(s.get('one_budget_10000_ms'), '.0f')} ms at worst (the table: "
                  "medians; target "
                  f"{_f(t.get('one_budget_10000_ms'), '.0f')}), a 32-point front {_f(s.get('front32_10000_ms'), '.0f')} ms "
                  f"(target {_f(t.get('front32_10000_ms'), '.0f')}); largest certified gap {_f(s.get('max_certified_gap'), '.2g')} "
                  f"(target {_f(t.get('gap'), 'g')}); targets {'met' if s.get('targets_met') else '**not met**'}.", ""]
    return lines



#: the cost parts rendered as a reader wants them (parts not named here get a table of their scalars)
CURATED = {"assets": _assets_lines, "hessian": _hessian_lines, "refine": _refine_lines,
           "service-refine": _service_refine_lines, "workers": _workers_lines}

def _alloc_series(data: Mapping[str, Any]) -> list[tuple[str, list[tuple[float, float]]]]:
    """(label, [(groups, seconds)]) series found in an allocation benchmark's JSON, whatever its layout."""
    found: dict[str, list[tuple[float, float]]] = {}

    def visit(obj: Any, label: str) -> None:
        if isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
            for r in obj:
                g = r.get("groups", r.get("n_groups"))
                if not _finite(g):
                    continue
                for k, v in r.items():
                    if _finite(v) and (k.endswith("seconds") or k.endswith("_s") or k.endswith("_ms")):
                        sec = v / 1000 if k.endswith("_ms") else v
                        name = "/".join(x for x in (label, str(r.get("method", r.get("solver", ""))), k) if x)
                        found.setdefault(name, []).append((float(g), float(sec)))
        elif isinstance(obj, dict):
            for k, v in obj.items():
                visit(v, k if not label else f"{label}/{k}")

    visit(data, "")
    return [(k, sorted(v)) for k, v in found.items() if len(v) >= 2]


def plot_allocation(data: Mapping[str, Any], path: Path) -> bool:
    rows = _alloc_rows(data)
    series = [(label + (" (estimated: 32 × one)" if k == "milp_front32_ms" and any(
                   r.get("milp_front32_estimated") for r in rows) else ""),
               [(float(r["groups"]), r[k] / 1000) for r in rows if _finite(r.get(k))]) for k, label in ALLOC_KEYS]
    series = [(label, pts) for label, pts in series if len(pts) >= 2] or _alloc_series(data)
    if not series:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in series[:8]:
        ax.loglog([g for g, _ in pts], [max(s, 1e-6) for _, s in pts], "o-", label=label, ms=3)
    ax.set_xlabel("groups")
    ax.set_ylabel("seconds")
    ax.set_title("Allocation time against the number of groups", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_service(data: Mapping[str, Any], path: Path) -> bool:
    results = data.get("results") or []
    if not results:
        return False
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.5))
    for r in results:
        polls = sorted(r.get("poll", []), key=lambda x: x["clients"])
        if not polls:
            continue
        c = [p["clients"] for p in polls]
        a1.plot(c, [p["per_s"] for p in polls], "o-", label=r["backend"])
        a2.plot(c, [p["p99_ms"] for p in polls], "o-", label=f"{r['backend']} p99")
        a2.plot(c, [p["p50_ms"] for p in polls], "x:", label=f"{r['backend']} p50")
    a1.set_xlabel("concurrent clients")
    a1.set_ylabel("status polls / s")
    a2.set_xlabel("concurrent clients")
    a2.set_ylabel("latency (ms)")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Service: status-poll throughput and latency", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------ render
def _scalars(obj: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if isinstance(obj, dict) and depth < 2:
        for k, v in obj.items():
            if isinstance(v, dict):
                out += _scalars(v, f"{prefix}{k}.", depth + 1)
            elif isinstance(v, bool | int | float | str) and not (isinstance(v, str) and len(v) > 80):
                out.append((f"{prefix}{k}", v))
    return out


def _quality_section(results: Mapping[str, Any], img: Path, img_rel: str) -> tuple[list[str], dict[str, Any]]:
    lines = ["## Quality on real models", ""]
    names = [k for k, v in results.get("parts", {}).items() if v.get("kind") == "quality"] or ["quality"]
    configs: list[Mapping[str, Any]] = []
    errors: dict[str, str] = {}
    for name in names:
        st = _status_line(results, name)
        if st:
            lines += [st, ""]
        part = _part(results, name)
        if part:
            for rec in part.get("configs", []):  # one record per configuration: a complete one wins
                same = [i for i, c in enumerate(configs) if c.get("name") == rec.get("name")]
                if not same:
                    configs.append(rec)
                elif configs[same[0]].get("incomplete") and not rec.get("incomplete"):
                    configs[same[0]] = rec
            errors.update(part.get("errors") or {})
    headline: dict[str, Any] = {}
    if not configs:
        return lines, headline
    # a fixed reading order whatever order the parts ran or merged in: model, then granularity
    order = {"bbc": 0, "rt": 1, "uncertainty": 2, "embeddings": 3}
    configs.sort(key=lambda c: (order.get(str(c.get("model")), 4), bool(c.get("include_embeddings")),
                                c.get("granularity") != "layer"))
    lines += [
        "Each configuration is one search over the same held-out rows (never used for calibration). "
        "`<method>+refine` is the method's front with some of its points refined (knowledge distillation "
        "with learned step sizes). **HV** is the hypervolume of the series' front in the (size, metric) "
        "plane, with the reference point (full-precision size, worst metric seen) common to every series of "
        "the configuration; **HV %** is its fraction of the best-known front (all points of the configuration). "
        "**@b** is the best metric of a point with at most *b* average bits per quantized weight. "
        "**within 1 pt** is the compression of the smallest point at most one point (0.01) below full "
        "precision: of the whole model (fp32 size / size) and of the quantized weights alone (32 / average bits). "
        "Times are in units of one full-precision evaluation pass over the same rows.",
        "",
    ]
    for rec in configs:
        summ = config_summary(rec)
        name = rec["name"]
        fp32 = rec["fp32"]
        lines += [f"### {name}: {rec['model_label']}", ""]
        lines += [
            f"{rec['granularity']} granularity ({rec['groups']} groups, options {', '.join(rec.get('options', []))}), "
            f"embeddings {'quantized' if rec.get('include_embeddings') else 'kept in full precision'}; "
            f"{rec.get('calibration_rows')} calibration and {rec.get('evaluation_rows')} evaluation rows of "
            f"{rec.get('max_length')} tokens; device `{rec.get('device')}`. Full precision: "
            f"{rec['metric']} {fp32['metric']:.4f}, {fp32['size_bytes'] / 1e6:.1f} MB.",
            "",
        ]
        if any(m in ("kl", "hessian") for m in rec.get("methods", {})):
            if rec.get("bit_targets"):
                lines += ["The sensitivity methods' points: the tool's sweep plus the allocator's optimal maps at average "
                          f"{', '.join(f'{t:g}' for t in rec['bit_targets'])} bits.", ""]
            else:
                lines += ["The sensitivity methods' points are the tool's own sweep only: evenly spaced in size from the "
                          "smallest map to full precision, so few of them fall between 2 and 8 average bits and the "
                          "@4 / @3 columns fall back to the next smaller point (later runs also allocate at fixed "
                          "average-bit targets).", ""]
        for note in rec.get("notes", []):
            lines += [f"*Note: {note}.*", ""]
        if rec.get("incomplete"):
            lines += ["*This configuration was stopped by its time limit: the methods below are the ones it finished.*", ""]
        rows = []
        for s_name, s in summ["series"].items():
            w = s["within_1pt"]
            rows.append([
                f"`{s_name}`", s["points"], _f(s["hypervolume"] / 1e6, ".3f"),
                _f(100 * s["hv_fraction"] if s["hv_fraction"] is not None else None, ".1f"),
                *[_f(s["at_bits"][str(b)], ".3f") for b in BITS_TABLE],
                _f(w["whole_model"] if w else None, ".2f") + ("×" if w else ""),
                _f(w["quantized_weights"] if w else None, ".2f") + ("×" if w else ""),
            ])
        lines += _table(["series", "points", "HV (MB·metric)", "HV %", *[f"@{b:g}" for b in BITS_TABLE],
                         "within 1 pt: whole model", "within 1 pt: quantized weights"], rows)
        mrows = [[f"`{m}`", _f(i.get("units"), ".1f"), i.get("distinct_maps", "–"), _evaluations(i)]
                 for m, i in rec.get("methods", {}).items()]
        if mrows:
            lines += _table(["method", "time (evaluation passes)", "maps proposed", "maps evaluated"], mrows)
        if rec.get("refine"):
            rrows = [[k, _f(v["avg_bits"], ".2f"), _f(v["before"], ".4f"), _f(v["after"], ".4f"), v["steps"],
                      _f(v.get("units"), ".1f")] for k, v in rec["refine"].items()]
            lines += _table(["refined point", "avg bits", "before", "after", "steps", "time (evaluation passes)"], rrows)
        if rec.get("skipped"):
            lines += ["Not measured here: " + "; ".join(f"`{k}`: {v}" for k, v in rec["skipped"].items()), ""]
        png = f"quality_{name}.png"
        plot_fronts(rec, img / png)
        lines += [f"![{name}]({img_rel}/{png})", ""]
        headline[name] = {"fp32": fp32["metric"], "metric": rec["metric"], "summary": summ,
                          "higher_is_better": bool(rec.get("higher_is_better", True))}
    for name, err in errors.items():
        lines += [f"*Configuration `{name}` failed: {err}*", ""]
    return lines, headline


#: ModelOpt's format sets, as the peer section names them
PEER_FORMAT_SETS = {"int4-int8": "INT4 block-128 / INT8", "int2-int8": "INT2 / INT3 / INT4 block-128, INT8"}
PEER_COLORS = {"gradient": "tab:red", "kl_div": "tab:brown"}


def peer_series(rec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The peer configuration's series, each ``{"name", "kind", "points": {budget: point}}`` with a point
    ``{"avg_bits", "size_bytes", "accuracy", "kl"}`` (or ``{"infeasible": target}``): the best uniform map
    within each budget, each bitscout method, and each ModelOpt run with its own quantizer and through
    bitscout's."""
    budgets = [float(b) for b in rec.get("budgets", [])]
    out: list[dict[str, Any]] = []
    uni = [u for u in rec.get("uniform", []) if _finite(u.get("avg_bits"))]
    upts: dict[float, Any] = {}
    for b in budgets:
        ok = [u for u in uni if u["avg_bits"] <= b + 1e-9]
        if ok:
            upts[b] = max(ok, key=lambda u: u["avg_bits"])
    out.append({"name": "uniform (widest within the budget)", "kind": "uniform", "points": upts})
    for m, info in (rec.get("ours") or {}).items():
        out.append({"name": f"bitscout `{m}`", "kind": "ours", "method": m,
                    "points": {float(p["budget"]): p for p in info.get("points", [])}})
    peer = rec.get("peer") or {}
    for run in peer.get("runs", []):
        fs = run.get("format_set")
        label = f"ModelOpt `{run.get('method')}`, {PEER_FORMAT_SETS.get(fs, fs)}"
        infeasible = {float(b): {"infeasible": t} for b, t in (peer.get("infeasible") or {}).get(fs, {}).items()}
        own: dict[float, Any] = dict(infeasible)
        via: dict[float, Any] = dict(infeasible)
        for p in run.get("points", []):
            b = float(p["budget"])
            own[b] = {"avg_bits": p.get("avg_bits"), **(p.get("own") or {})}
            via[b] = {"avg_bits": p.get("avg_bits"), **(p.get("ours") or {})}
        if run.get("error"):
            out.append({"name": label, "kind": "peer", "method": run.get("method"), "points": {},
                        "error": run["error"]})
            continue
        out.append({"name": label + ", its quantizer", "kind": "peer", "method": run.get("method"),
                    "format_set": fs, "points": own})
        out.append({"name": label + ", through bitscout's quantizer", "kind": "peer-via-ours",
                    "method": run.get("method"), "format_set": fs, "points": via})
    return out


def _peer_cell(p: Mapping[str, Any] | None) -> str:
    if p is None:
        return "–"
    if "infeasible" in p:
        return f"infeasible (target {_f(p['infeasible'], '.2f')})"
    mb = p.get("size_bytes")
    return (f"{_f(p.get('accuracy'))} / {_f(p.get('kl'), '.4f')} ({_f(p.get('avg_bits'), '.2f')} b, "
            f"{_f(mb / 1e6 if _finite(mb) else None, '.1f')} MB)")


def plot_peer(rec: Mapping[str, Any], path: Path) -> bool:
    """Accuracy and output KL against bits per quantized weight: uniform, bitscout's methods, ModelOpt's
    maps with its quantizer and through bitscout's; the top axis gives the size in MB."""
    series = peer_series(rec)
    if not any(s["points"] for s in series):
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    uni = sorted((u for u in rec.get("uniform", []) if _finite(u.get("avg_bits")) and _finite(u.get("size_bytes"))),
                 key=lambda u: u["avg_bits"])
    for ax, key, label in ((axes[0], "accuracy", "accuracy (held-out)"), (axes[1], "kl", "output KL (held-out)")):
        if uni:
            ax.plot([u["avg_bits"] for u in uni], [u[key] for u in uni], "ks--", ms=5, lw=0.8, label="uniform")
        for s in series:
            if s["kind"] == "uniform":
                continue
            pts = sorted((p["avg_bits"], p[key]) for p in s["points"].values()
                         if _finite(p.get("avg_bits")) and _finite(p.get(key)))
            if not pts:
                continue
            if s["kind"] == "ours":
                style = dict(marker="o", ls="-", color=COLORS.get(s["method"]), ms=4, lw=1.2)
            else:
                via = s["kind"] == "peer-via-ours"
                style = dict(marker="+" if via else "x", ls=":" if via else "--", ms=7,
                             color=PEER_COLORS.get(s["method"], "tab:gray"), lw=0.9,
                             alpha=1.0 if s.get("format_set") == "int4-int8" else 0.55)
            ax.plot(*zip(*pts, strict=True), label=s["name"].replace("`", ""), **style)
        fp = (rec.get("fp32") or {}).get(key)
        if key == "accuracy" and _finite(fp):
            ax.axhline(fp, color="grey", lw=0.8, ls=":", label="full precision")
            shown = [p["accuracy"] for s in series for p in s["points"].values() if _finite(p.get("accuracy"))]
            if shown:  # the budgets' range, not the collapse of the narrowest uniform map
                ax.set_ylim(max(min(shown) - 0.02, fp - 0.25), min(1.0, max(shown + [fp]) + 0.01))
        if key == "kl":
            ax.set_yscale("log")
        ax.set_xlabel("average bits per quantized weight")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(uni) >= 2:  # size is linear in the average bits for per-row maps: the uniform maps fix the line
            (b0, s0), (b1, s1) = (uni[0]["avg_bits"], uni[0]["size_bytes"] / 1e6), (uni[-1]["avg_bits"],
                                                                                  uni[-1]["size_bytes"] / 1e6)
            k = (s1 - s0) / (b1 - b0) if b1 != b0 else 1.0
            top = ax.secondary_xaxis("top", functions=(lambda b, k=k, b0=b0, s0=s0: s0 + k * (b - b0),
                                                       lambda m, k=k, b0=b0, s0=s0: b0 + (m - s0) / k))
            top.set_xlabel("model size (MB, per-row scales)", fontsize=8)
    axes[0].legend(fontsize=6, loc="lower right")
    fig.suptitle(f"{rec.get('model_label', rec.get('name'))}: bitscout against ModelOpt auto_quantize", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _peer_cost_rows(rec: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for m, i in (rec.get("ours") or {}).items():
        rows.append([f"bitscout `{m}`", f"{_f(i.get('score_seconds'), '.1f')} ({_f(i.get('score_epochs'), '.2f')})",
                     f"{_f(i.get('whole_seconds'), '.1f')} ({_f(i.get('whole_epochs'), '.2f')})",
                     f"table, allocation at {len(i.get('points', []))} budgets, evaluation of those maps"])
    for r in (rec.get("peer") or {}).get("runs", []):
        name = f"ModelOpt `{r.get('method')}`, {PEER_FORMAT_SETS.get(r.get('format_set'), r.get('format_set'))}"
        if r.get("error") or r.get("skipped"):
            rows.append([name, "–", "–", str(r.get("error") or r.get("skipped")).replace("|", "/")])
            continue
        rows.append([name, f"{_f(r.get('score_seconds'), '.1f')} ({_f(r.get('score_epochs'), '.2f')})",
                     f"{_f(r.get('whole_seconds'), '.1f')} ({_f(r.get('whole_epochs'), '.2f')})",
                     f"auto_quantize {_f(r.get('auto_quantize_seconds'), '.1f')} s (calibration of every format, "
                     f"scores, search), re-solve and quantize at {len(r.get('points', []))} targets, evaluation; "
                     f"its maps through bitscout's quantizer: {_f(r.get('through_ours_eval_seconds'), '.1f')} s more"])
    return rows


def _peer_section(results: Mapping[str, Any], img: Path, img_rel: str) -> list[str]:
    """bitscout against ModelOpt's auto_quantize: per classifier, accuracy and output KL at each budget on
    one axis (bits per quantized weight, MB), the budget conversion, the costs and a plot."""
    names = [k for k, v in results.get("parts", {}).items() if v.get("kind") == "peer"] or ["peer"]
    lines = ["## Against NVIDIA ModelOpt (auto_quantize)", ""]
    configs: list[Mapping[str, Any]] = []
    for name in names:
        st = _status_line(results, name)
        if st:
            lines += [st, ""]
        part = _part(results, name)
        if part:
            configs += [c for c in part.get("configs", []) if c.get("name") not in {x.get("name") for x in configs}]
            for cname, err in (part.get("errors") or {}).items():
                lines += [f"*Configuration `{cname}` failed: {err}*", ""]
            venv = part.get("peer_venv") or {}
            if venv.get("error"):
                lines += [f"*ModelOpt did not run: {venv['error']}*", ""]
    if not configs:
        return lines
    order = {"bbc": 0, "rt": 1, "uncertainty": 2}
    configs.sort(key=lambda c: order.get(str(c.get("model")), 3))
    first = configs[0]
    ver = ((first.get("peer") or {}).get("versions") or {})
    lines += [
        "The same classifier, the same calibration rows and the same held-out evaluation rows, in one run: "
        "bitscout's sensitivity methods (the allocator's optimal map at each budget) and uniform maps, "
        f"and NVIDIA ModelOpt {ver.get('modelopt', '')} `auto_quantize` in its own virtual environment (its "
        "`gradient` and `kl_div` scores, weight-only formats; its gradient score uses the cross-entropy of "
        "the calibration rows' labels). ModelOpt's chosen maps are evaluated twice: with its own fake "
        "quantizer (max calibration), and translated into bitscout precision maps through bitscout's "
        "quantizer (MSE-chosen scales). Each cell is **accuracy / output KL (average bits per quantized "
        "weight, model size)** on the held-out rows; both tools count bits the same way: scales are not "
        "counted in the bits (they are in the MB), a layer left unquantized counts 16 bits.",
        "",
        "**The budget conversion.** ModelOpt's effective bits average over every linear layer it sees, "
        "counting the ones bitscout does not search (the pooler and the classification head, passed to "
        "ModelOpt as disabled layers) and any layer left unquantized at 16 bits. With *S* searched weights "
        "and *X* excluded ones, a budget of *b* average bits is ModelOpt's target "
        "*E = (b·S + 16·X) / (S + X)*, and back *b = (E·(S + X) − 16·X) / S*. A budget below ModelOpt's "
        "narrowest format is infeasible for it.",
        "",
    ]
    for rec in configs:
        S, X = rec.get("searched_weights"), rec.get("excluded_weights")  # noqa: N806
        peer = rec.get("peer") or {}
        lines += [f"### {rec.get('name')}: {rec.get('model_label')}", ""]
        fp = rec.get("fp32") or {}
        lines += [f"{rec.get('groups')} layer groups, bitscout's options {', '.join(map(str, rec.get('bits', [])))} "
                  f"(and 32); {rec.get('calibration_rows')} calibration and {rec.get('evaluation_rows')} evaluation "
                  f"rows of {rec.get('max_length')} tokens. Full precision: accuracy {_f(fp.get('accuracy'), '.4f')}, "
                  f"{_f((fp.get('size_bytes') or math.nan) / 1e6, '.1f')} MB. *S* = {S:,}, *X* = {X:,} "
                  f"({', '.join(rec.get('excluded_layers', []))}).", ""]
        if peer.get("skipped"):
            lines += [f"*ModelOpt not run: {peer['skipped']}.*", ""]
        if peer.get("error"):
            lines += [f"*ModelOpt's process failed ({peer['error']}); the runs below are what it wrote before.*", ""]
        budgets = [float(b) for b in rec.get("budgets", [])]
        targets = rec.get("targets") or {}
        lines += _table(["budget (average bits)", *[f"{b:g}" for b in budgets]],
                        [["ModelOpt's target (effective bits)", *[_f(targets.get(str(b)), ".4f") for b in budgets]]])
        rows = [[s["name"] + (f" (failed: {s['error']})" if s.get("error") else ""),
                 *[_peer_cell(s["points"].get(b)) for b in budgets]] for s in peer_series(rec)]
        lines += _table(["series", *[f"≤ {b:g} bits" for b in budgets]], rows)
        if peer.get("int4_as") == "4 bits per row":
            lines += ["*ModelOpt's INT4 block-128 layers go through bitscout's quantizer as 4 bits per row: "
                      "bitscout's options have no group size yet, so those maps have fewer scales there (and a "
                      "smaller size) than ModelOpt's own.*", ""]
        if peer.get("fp32_logits_max_abs_diff") is not None:
            lines += [f"Both processes run the same model on the same rows: the full-precision logits differ by at "
                      f"most {_f(peer['fp32_logits_max_abs_diff'], '.1e')}"
                      + ("; ModelOpt's cost denominator equals *S + X*." if peer.get("cost_denominator_matches")
                         else ".") , ""]
        lines += [f"Cost: wall seconds and, in parentheses, fine-tuning epochs (one epoch of plain fine-tuning "
                  f"of the classifier on its training split, {_f(rec.get('finetune_epoch_seconds'), '.1f')} s in "
                  f"this run; one evaluation pass over the held-out rows {_f(rec.get('eval_unit_seconds'), '.1f')} s).",
                  ""]
        lines += _table(["series", "scoring s (epochs)", "whole search s (epochs)", "what the whole search holds"],
                        _peer_cost_rows(rec))
        if rec.get("skipped"):
            lines += ["Not measured here: " + "; ".join(f"`{k}`: {v}" for k, v in rec["skipped"].items()), ""]
        png = f"peer_{rec.get('name')}.png"
        if plot_peer(rec, img / png):
            lines += [f"![peer {rec.get('name')}]({img_rel}/{png})", ""]
    return lines


def _oracle_section(results: Mapping[str, Any], img: Path, img_rel: str) -> list[str]:
    lines = ["## Against the oracle", ""]
    st = _status_line(results, "oracle")
    if st:
        lines += [st, ""]
    data = _part(results, "oracle")
    if not data:
        return lines
    lines += [
        f"{data['model']}: {data['groups']} groups × {data['options_per_group']} options (bits "
        f"{', '.join(map(str, data['bits']))}) = **{data['maps']} maps, every one evaluated** on "
        f"{data['evaluation_rows']} held-out rows. Each method's hypervolume is a fraction of the exhaustive "
        "front's (reference: the largest size and the worst metric of any map). `nsga2` gets the evaluation "
        "budget of the KL sweep (as many distinct maps as KL proposed).",
        "",
    ]
    rows = [[f"`{m}`", v.get("distinct_maps"), _f(v.get("hv_fraction_kl"), ".3f"), _f(v.get("hv_fraction_log_kl"), ".3f"),
             _f(v.get("hv_fraction_accuracy"), ".3f")]
            for m, v in data["methods"].items()]
    lines += _table(["method", "distinct maps", "HV fraction (KL)", "HV fraction (log10 KL)", "HV fraction (accuracy)"],
                    rows)
    if not (data.get("exhaustive_hv") or {}).get("accuracy"):
        lines += [f"Accuracy is saturated on this model (every map scores {_f((data.get('fp32') or {}).get('accuracy'), '.3f')} "
                  "or the same value), so the accuracy front is a single point and no fraction is given: the search "
                  "metric here is the KL divergence to full precision.", ""]
    if data.get("skipped"):
        lines += ["Not measured: " + "; ".join(f"`{k}`: {v}" for k, v in data["skipped"].items()), ""]
    plot_oracle(data, img / "oracle.png")
    lines += [f"![oracle]({img_rel}/oracle.png)", ""]
    return lines


def _cost_section(results: Mapping[str, Any], img: Path, img_rel: str) -> list[str]:
    lines = ["## Cost", "",
             "Every figure is a ratio measured in one run of its part (forward-pass units, fine-tuning "
             "epochs, the same search in-process); the parts' own JSON holds the details.", ""]
    kl = _part(results, "kl")
    lines += ["### KL sensitivity", ""]
    st = _status_line(results, "kl")
    if st:
        lines += [st, ""]
    if kl and "kl_cost" in kl:
        c = kl["kl_cost"]
        lines += _table(["groups", "calibration sequences", "time / one forward pass", "naive 1 + G·K passes",
                         "ratio to naive (time)", "ratio to naive (block forwards)"],
                        [[kl.get("groups"), kl.get("calibration_sequences"), _f(c.get("seconds_over_one_forward_pass"), ".1f"),
                          _f(c.get("naive_units"), ".0f"), _f(c.get("ratio_to_naive_time"), ".3f"),
                          _f(c.get("ratio_to_naive_blocks"), ".3f")]])
    for name, title in (("assets", "Assets (the fine-tuned classifiers the other parts read)"),
                        ("hessian", "Hessian sensitivity"), ("dnas", "DNAS"), ("refine", "Refinement"),
                        ("service-refine", "Refinement through the service (end to end)"),
                        ("workers", "Orchestration overhead (workers)")):
        lines += [f"### {title}", ""]
        st = _status_line(results, name)
        if st:
            lines += [st, ""]
        data = _part(results, name)
        if not data:
            continue
        curated = (_dnas_lines(data, img, img_rel) if name == "dnas" and data.get("low_bit_end")
                   else CURATED[name](data) if name in CURATED else [])
        if curated:
            lines += curated
        else:  # a layout this page does not know: every scalar
            sc = _scalars(data)
            if sc:
                lines += _table(["figure", "value"], [[f"`{k}`", _f(v, ".4g") if isinstance(v, float) else v] for k, v in sc[:40]])
    lines += ["### Allocation time against the number of groups", ""]
    st = _status_line(results, "allocate")
    if st:
        lines += [st, ""]
    data = _part(results, "allocate")
    if data:
        if plot_allocation(data, img / "allocation.png"):
            lines += [f"![allocation]({img_rel}/allocation.png)", ""]
        curated = _allocate_lines(data)
        sc = [] if curated else _scalars(data)
        lines += curated
        if sc:
            lines += _table(["figure", "value"], [[f"`{k}`", _f(v, ".4g") if isinstance(v, float) else v] for k, v in sc[:40]])
    return lines


def _service_section(results: Mapping[str, Any], img: Path, img_rel: str) -> list[str]:
    lines = ["## Service", ""]
    st = _status_line(results, "service")
    if st:
        lines += [st, ""]
    data = _part(results, "service")
    if not data:
        return lines
    rows = []
    for r in data.get("results", []):
        s = r["submit"]
        for p in r.get("poll", []):
            rows.append([r["backend"], _f(s["p50_ms"], ".1f"), _f(s["p99_ms"], ".1f"), p["clients"], _f(p["per_s"], ".0f"),
                         _f(p["p50_ms"], ".1f"), _f(p["p99_ms"], ".1f"), p.get("errors", 0)])
    lines += ["Submission latency (sequential submits) and status polls under concurrent clients, uvicorn with "
              f"{(data.get('args') or {}).get('workers', '?')} workers on the same machine as the clients.", ""]
    lines += _table(["database", "submit p50 ms", "submit p99 ms", "clients", "polls/s", "poll p50 ms", "poll p99 ms",
                     "errors"], rows)
    if data.get("targets"):
        lines += ["Targets: " + ", ".join(f"{k} {v}" for k, v in data["targets"].items()), ""]
    if plot_service(data, img / "service.png"):
        lines += [f"![service]({img_rel}/service.png)", ""]
    return lines


def _literature_section(headline: Mapping[str, Any]) -> list[str]:
    lines = ["## Literature", "", "The published bounds bitscout is measured against:", ""]
    lines += _table(["work", "setting", "published result"], [[x["work"], x["setting"], x["claim"]] for x in LITERATURE])
    lines += ["Where bitscout stands, from the figures above:", ""]
    drops: dict[str, float] = {}

    def hib_of(h: Mapping[str, Any]) -> bool:
        return bool(h.get("higher_is_better", True))

    for name, h in headline.items():
        parts = []
        for s_name, s in h["summary"]["series"].items():
            w = s["within_1pt"]
            if w and s_name != "uniform":
                parts.append(f"`{s_name}` {w['quantized_weights']:.1f}× on the quantized weights "
                             f"({w['whole_model']:.2f}× whole model)")
        u = h["summary"]["series"].get("uniform", {}).get("within_1pt")
        ubit = f"; uniform baseline {u['quantized_weights']:.1f}×" if u else "; no uniform baseline stays within 1 point"
        low = []
        best = [(s["at_bits"]["2.5"], n) for n, s in h["summary"]["series"].items()
                if n != "uniform" and s["at_bits"].get("2.5") is not None]
        if best:
            v, n = max(best)
            drop = 100 * (h["fp32"] - v) if hib_of(h) else 100 * (v - h["fp32"])
            drops[name] = drop
            low.append(f"at 2.5 average bits (12.8× on the quantized weights) the best searched point (`{n}`) is "
                       + _drop_text(drop))
        lines.append(f"- **{name}** (full precision {h['metric']} {h['fp32']:.4f}): within one point of full precision at "
                     + (", ".join(parts) if parts else "no compression found by a search method") + ubit
                     + ("; " + "; ".join(low) if low else "") + ".")
    lines += [
        "",
        "How the settings differ, plainly:",
        "",
        "- **Model.** all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7M parameters, half of them in the embeddings) "
        "instead of BERT-base (12 layers, hidden 768, 110M). Small models have less redundancy: the same bits "
        "cost them more accuracy.",
        "- **Tasks.** BBC topic classification (5 easy classes), Rotten Tomatoes sentiment and embedding "
        "similarity, not GLUE / SQuAD. BBC is easier than MNLI; the drop at a given compression is not comparable "
        "across tasks.",
        "- **Method.** bitscout's fronts are weight-only post-training quantization (round-to-nearest with "
        "MSE-chosen per-row scales, activations in full precision), chosen from a sensitivity table in minutes "
        "on a CPU. Q-BERT, KDLSQ-BERT and TernaryBERT fine-tune the whole network with quantization in the loop "
        "(quantization-aware training, hours on GPUs) and quantize activations to 8 bits. bitscout's refinement "
        "(`+refine`) is a short KDLSQ-style run on a few hundred sequences, far shorter than the papers' training.",
        "- **Compression.** The papers' 13× and 14.9× are ratios of weight storage against 32-bit weights "
        "(how embeddings are counted differs between the papers). bitscout's \"quantized weights\" column is the "
        "closest figure: 32 / average bits over the quantized matrices (scales are counted in the size, not in the "
        "bits). The \"whole model\" column divides the float32 model's bytes by the quantized model's bytes, "
        "counting everything that stays in float32 (embeddings unless quantized, norms, biases, the head).",
        "- **Evaluation.** 128 (quick) to 500 (full) held-out rows per model, so one point of accuracy is one to "
        "five rows: differences under a point or two are noise.",
        _bottom_line(drops),
        "",
    ]
    return lines


def _drop_text(drop: float, *, noise: bool = True) -> str:
    """A drop from full precision in points, said the way round it is."""
    if drop >= 0.05:
        return f"{drop:.1f} points below full precision"
    if drop <= -0.05:
        return f"{-drop:.1f} points above full precision" + (" (within the noise of the held-out rows)" if noise else "")
    return "level with full precision"


def _bottom_line(drops: Mapping[str, float]) -> str:
    """Which configurations stay within Q-BERT's 2.3-point bound at 2.5 average bits, and which do not."""
    if not drops:
        return "- **Bottom line.** No configuration has a searched point at 2.5 average bits in this run."
    within = [f"{n} ({_drop_text(d, noise=False)})" for n, d in drops.items() if d <= 2.3]
    beyond = [f"{n} ({_drop_text(d, noise=False)})" for n, d in drops.items() if d > 2.3]
    text = "- **Bottom line.** At 12.8× on the quantized weights (2.5 average bits), "
    if within:
        text += (f"{len(within)} of {len(drops)} configurations stay within Q-BERT's 2.3-point bound at a comparable "
                 f"weight compression, on a smaller model and easier tasks (see above): {'; '.join(within)}."
                 + (" A point above full precision is noise of the held-out rows, not a gain."
                    if any(d <= -0.05 for d in drops.values()) else ""))
    else:
        text += "no configuration stays within Q-BERT's 2.3-point bound."
    if beyond:
        text += (f" Beyond it: {'; '.join(beyond)}. Weight-only post-training quantization does not reach the "
                 "KDLSQ-BERT / TernaryBERT figures there; closing that gap at 2-2.5 bits is what refinement "
                 "(`+refine`) is for.")
    return text


def render(results: Mapping[str, Any], docs: Path, *, img_rel: str = "img") -> str:
    """Write the PNGs under ``docs/img`` and return the Markdown page."""
    img = docs / img_rel
    img.mkdir(parents=True, exist_ok=True)
    meta = results.get("meta", {})
    machine = meta.get("machine", {})
    dev = meta.get("device", {})
    quick = meta.get("mode") == "quick"
    load0 = machine.get("load_average_start") or [math.nan]
    load1 = machine.get("load_average_end") or [math.nan]
    lines = [
        "# Benchmarks",
        "",
        "<!-- generated by `python -m benchmarks.report` from benchmarks/results/results.json: do not edit -->",
        "",
        f"Generated from `benchmarks/results/results.json` ({meta.get('mode', '?')} mode, started "
        f"{meta.get('started', '?')}, commit `{(meta.get('git_commit') or '?')[:10]}`). Regenerate with "
        "`make bench` (everything, about an hour per part at most on 2 cores) or `make bench-quick` "
        "(the small suite, about 10 minutes), or rebuild this page alone with `python -m benchmarks.report`.",
        "",
    ]
    parts = results.get("parts", {})
    stamped = {k: v["run"].get("mode") for k, v in parts.items() if isinstance(v.get("run"), Mapping)}
    quick_parts = sorted(k for k, m in stamped.items() if m == "quick")
    if quick and quick_parts and any(m == "full" for m in stamped.values()):
        # a quick run merged into a file of full-mode parts: only its own parts are coarse
        lines += [f"> **Quick-mode parts.** {', '.join(f'`{k}`' for k in quick_parts)} "
                  f"{'was' if len(quick_parts) == 1 else 'were'} measured in quick mode (fewer calibration and "
                  "evaluation rows, fewer methods and budgets): coarser than the full-mode parts around "
                  "them; the parts table says which run measured what.", ""]
    elif quick:
        lines += ["> **Quick mode.** Fewer calibration and evaluation rows, fewer methods per configuration, a "
                  "shorter refinement and no Rotten Tomatoes model: the fronts are coarser than a full run's.", ""]
    busy = _finite(load0[0]) and machine.get("cores") and load0[0] > 1.5 * machine["cores"]
    if busy:
        lines += [f"> **Loaded machine.** The load average was {load0[0]:.1f} at the start and "
                  f"{_f(load1[0], '.1f')} at the end on {machine.get('cores')} cores (other work was running): "
                  "absolute times are inflated several-fold, which is why every timing below is a ratio "
                  "measured in the same run.", ""]
    if dev.get("device", "cpu") == "cpu":
        lines += ["> **Device.** Every figure on this page was measured on the CPU: no GPU was present. On a machine "
                  "with CUDA the same suite runs there (the quality part picks CUDA when `torch.cuda.is_available()`), "
                  "and the parts table below says which figures came from which device.", ""]
    if meta.get("note"):
        lines += [f"> **Note.** {meta['note']}", ""]
    lines += ["## Machine and versions", ""]
    if meta.get("merged_from"):
        lines += ["Of the last run, which merged its parts into an earlier results file; each part's own run is "
                  "in the parts table below.", ""]
    part_devices = {k: (v.get("data") or {}).get("device") for k, v in parts.items() if isinstance(v.get("data"), dict)}
    rows = [
        ["CPU", f"{machine.get('cpu_model', '?')}, {machine.get('cores', '?')} cores"],
        ["load average (1 min) start / end", f"{_f(load0[0], '.2f')} / {_f(load1[0], '.2f')}"],
        ["device", dev.get("device", "cpu") + (f" ({dev.get('cuda_device')})" if dev.get("cuda_device") else "")],
        ["work unit (matmul workload) start / end",
         f"{_f(meta.get('unit_seconds_start'), '.3f')} s / {_f(meta.get('unit_seconds_end'), '.3f')} s"],
        ["seed", meta.get("seed", 0)],
        ["time limits", f"× {meta.get('time_scale', 1.0):g} (whole run {_f(meta.get('total_limit_s'), '.0f')} s, "
                        f"took {_f(meta.get('seconds'), '.0f')} s)"],
        ["platform", f"{machine.get('platform', '?')}, Python {machine.get('python', '?')}"],
        ["versions", ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items() if v)],
    ]
    lines += _table(["", ""], rows)
    prow = []
    order = {x.name: i for i, x in enumerate(PARTS)}  # the order they run, whatever order a merge left them in
    for k, v in sorted(parts.items(), key=lambda kv: order.get(kv[0], len(order))):
        prow.append([f"`{k}`", v.get("status"), part_devices.get(k) or ("cpu" if k in ("oracle",) else "–"),
                     _ran(v), _f(v.get("seconds"), ".0f"), _f(v.get("seconds_in_units"), ".0f"),
                     v.get("reason") or v.get("error") or v.get("note") or ""])
    lines += ["The parts (device: where its figures were measured, CUDA whenever a GPU is present; measured: the "
              "run that measured them, which for a file merged from several runs differs from part to part; wall "
              "in work units: its wall time over that run's matmul work unit, comparable across machines):", ""]
    lines += _table(["part", "status", "device", "measured", "wall s", "wall in work units", "note"], prow)

    q_lines, headline = _quality_section(results, img, img_rel)
    lines += _headline(headline)
    lines += q_lines
    lines += _peer_section(results, img, img_rel)
    lines += _oracle_section(results, img, img_rel)
    lines += _cost_section(results, img, img_rel)
    lines += _service_section(results, img, img_rel)
    lines += _literature_section(headline)
    return "\n".join(lines).rstrip() + "\n"


def _evaluations(info: Mapping[str, Any]) -> Any:
    """The maps a method evaluated: NSGA-II evaluates its generations' maps (its budget, the KL sweep's
    distinct maps) and returns only their front, so its own count is what it spent."""
    for key in ("search_evaluations", "n_evaluations", "evaluations"):
        if info.get(key) is not None:
            return info[key]
    return "–"


def _ran(record: Mapping[str, Any]) -> str:
    """When, in which mode, on which CPU and at which commit a part's figures were measured."""
    run = record.get("run")
    if not isinstance(run, Mapping):
        return "–"
    bits = [str(run.get("started") or "?")[:10], str(run.get("mode") or "?")]
    if run.get("cpu"):
        bits.append(str(run["cpu"]))
    if run.get("git_commit"):
        bits.append(f"`{str(run['git_commit'])[:7]}`")
    return ", ".join(bits)


def _headline(headline: Mapping[str, Any]) -> list[str]:
    if not headline:
        return []
    lines = ["## Headline", ""]
    rows = []
    for name, h in headline.items():
        series = h["summary"]["series"]
        for s_name in series:
            if s_name.startswith("uniform"):
                continue
            s = series[s_name]
            w = s["within_1pt"]
            rows.append([name, f"`{s_name}`", _f(h["fp32"], ".3f"), *[_f(s["at_bits"][str(b)], ".3f") for b in BITS_TABLE],
                         (_f(w["quantized_weights"], ".1f") + "×") if w else "–",
                         (_f(w["whole_model"], ".2f") + "×") if w else "–",
                         _f(100 * s["hv_fraction"] if s["hv_fraction"] is not None else None, ".0f")])
        u = series.get("uniform")
        if u:
            w = u["within_1pt"]
            rows.append([name, "uniform", _f(h["fp32"], ".3f"), *[_f(u["at_bits"][str(b)], ".3f") for b in BITS_TABLE],
                         (_f(w["quantized_weights"], ".1f") + "×") if w else "–",
                         (_f(w["whole_model"], ".2f") + "×") if w else "–",
                         _f(100 * u["hv_fraction"] if u["hv_fraction"] is not None else None, ".0f")])
    lines += _table(["configuration", "series", "full precision", *[f"@{b:g} bits" for b in BITS_TABLE],
                     "within 1 pt: quantized weights", "within 1 pt: whole model", "HV %"], rows)
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "results.json")
    p.add_argument("--docs", type=Path, default=ROOT / "docs")
    a = p.parse_args(argv)
    results = json.loads(a.results.read_text(encoding="utf-8"))
    a.docs.mkdir(parents=True, exist_ok=True)
    page = render(results, a.docs)
    (a.docs / "benchmarks.md").write_text(page, encoding="utf-8")
    print(f"wrote {a.docs / 'benchmarks.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
