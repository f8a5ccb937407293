"""Quality on real models: every available method's front against the uniform baselines.

For each configuration (a model, a granularity, whether embeddings are quantized) this runs one live
:class:`~search.pipeline.Search` and, in the same process and on the same evaluation rows:

* the sensitivity methods ``kl`` and ``hessian`` (table + allocator sweep), the candidate-proposing
  methods ``dnas`` and ``nsga2`` (``nsga2`` at the evaluation budget of the KL sweep: as many distinct
  maps as KL proposed), each method that cannot be imported or fails is recorded with the reason;
* the uniform 8/6/4/3/2-bit baselines;
* with ``search.refine`` available, refinement (KD + learned step sizes) of the points of some methods
  nearest to 4, 3 and 2.5 average bits (``<method>+refine`` points);
* every point's cost (whole-model bytes, average bits of the quantized weights) and metrics.

Models: the MiniLM classifier fine-tuned on BBC topics (accuracy), the MiniLM classifiers fine-tuned
on Rotten Tomatoes and on the CoNLL-2010 uncertainty sentences (accuracy; full mode only: their
fine-tuning takes minutes), the MiniLM embedding
model on BBC texts (cosine to the full-precision embeddings). The front, hypervolume and the
user's table are computed from the points by :mod:`benchmarks.report`.

Method times are ratios: seconds divided by the seconds of one full-precision evaluation pass over
the same evaluation rows, measured in the same process.

``python -m benchmarks.bench_quality [--quick] [--cache .cache] [--out FILE.json] [--configs NAME ...]``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = ["QualityConfig", "configs_for", "run_config", "main"]


@dataclass(frozen=True)
class QualityConfig:
    """One search setting measured by this part."""

    name: str
    model: str  # "bbc" | "rt" | "embeddings"
    granularity: str = "layer"
    include_embeddings: bool = False
    methods: tuple[str, ...] = ("kl", "hessian", "dnas", "nsga2")
    refine_methods: tuple[str, ...] = ("kl",)
    refine_bits: tuple[float, ...] = (4.0, 3.0, 2.5)
    bits: tuple[int, ...] = (2, 3, 4, 6, 8)
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: average-bit targets the sensitivity methods also allocate at (the tool's own sweep runs from the
    #: smallest map to full precision, evenly in size, so few of its points fall between 2 and 8 bits)
    bit_targets: tuple[float, ...] = (2.25, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0)
    #: another model and data file (tests: a tiny model); ``model`` then only names it
    model_dir: str | None = None
    data_file: str | None = None
    label_field: str | None = "label"
    task: str = "sequence_classification"


MODEL_LABELS = {
    "bbc": "all-MiniLM-L6-v2 fine-tuned on BBC topics (5 classes)",
    "rt": "all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes (fresh / rotten)",
    "uncertainty": "all-MiniLM-L6-v2 fine-tuned on CoNLL-2010 sentences (certain / uncertain)",
    "embeddings": "all-MiniLM-L6-v2 sentence embeddings (BBC texts)",
}


def configs_for(quick: bool) -> list[QualityConfig]:
    """The configurations of a run. Quick mode: fewer methods, layer granularity only (a group-granularity
    KL table probes about 250 groups), no Rotten Tomatoes model (its fine-tuning takes minutes)."""
    if quick:
        fast = {"hessian": {"tolerance": 0.25, "min_probes": 2, "max_probes": 6},
                "dnas": {"epochs": 1.0, "min_steps": 3, "target_fractions": (0.4, 0.2, 0.08)}}
        return [
            QualityConfig("bbc-layer", "bbc", "layer", method_options=fast, refine_bits=(3.0,)),
            QualityConfig("bbc-layer-embeddings", "bbc", "layer", include_embeddings=True, methods=("kl",),
                          refine_methods=()),
            QualityConfig("embeddings-layer", "embeddings", "layer", methods=("kl",), refine_methods=()),
        ]
    full = {"hessian": {"tolerance": 0.1, "max_probes": 64}}
    return [
        QualityConfig("bbc-layer", "bbc", "layer", method_options=full, refine_methods=("kl", "hessian")),
        QualityConfig("bbc-group", "bbc", "group", method_options=full, refine_bits=(3.0,)),
        QualityConfig("bbc-layer-embeddings", "bbc", "layer", include_embeddings=True, methods=("kl", "hessian"),
                      method_options=full),
        QualityConfig("rt-layer", "rt", "layer", method_options=full, refine_bits=(3.0, 2.5)),
        QualityConfig("rt-group", "rt", "group", method_options=full, refine_bits=(3.0,)),
        QualityConfig("uncertainty-layer", "uncertainty", "layer", method_options=full, refine_bits=(3.0, 2.5)),
        QualityConfig("uncertainty-group", "uncertainty", "group", method_options=full, refine_bits=(3.0,)),
        QualityConfig("embeddings-layer", "embeddings", "layer", method_options=full, refine_bits=(3.0, 2.5)),
        QualityConfig("embeddings-group", "embeddings", "group", method_options=full, refine_bits=(3.0,)),
    ]


def log(msg: str) -> None:
    print(f"[quality] {msg}", file=sys.stderr, flush=True)


def method_available(name: str) -> str | None:
    """None when ``name`` can run here, else the reason it cannot."""
    from search import methods

    entry = methods.REGISTRY.get(name)
    if entry is None:
        return f"no method {name!r} is registered"
    try:
        entry.load()
    except Exception as exc:  # noqa: BLE001 - report why
        return f"importing {entry.implementation} failed: {exc}"
    return None


def _model(cfg: QualityConfig, cache: Path) -> tuple[Path, Any, str]:
    from benchmarks.assets import CLASSIFIERS, minilm_dir
    from search.local import DataOptions

    if cfg.model_dir is not None and cfg.data_file is not None:
        return Path(cfg.model_dir), DataOptions(source=cfg.data_file, label_field=cfg.label_field), cfg.task
    if cfg.model in CLASSIFIERS:
        build, heldout = CLASSIFIERS[cfg.model]
        return build(cache), DataOptions(source=str(cache / heldout), label_field="label"), "sequence_classification"
    if cfg.model == "embeddings":
        from benchmarks.assets import bbc_classifier as _build_data

        _build_data(cache)  # writes bbc_heldout.jsonl
        return minilm_dir(), DataOptions(source=str(cache / "bbc_heldout.jsonl")), "embeddings"
    raise ValueError(f"unknown model {cfg.model!r}")


def _row(pt: Any, metric: str) -> dict[str, Any]:
    return {
        "method": pt.method,
        "refined": bool(pt.refined),
        "label": pt.label,
        "size_bytes": pt.cost.size_bytes,
        "avg_bits": pt.cost.avg_bits,
        "bops": pt.cost.bops,
        "metric": pt.metrics.get(metric),
        "metrics": dict(pt.metrics),
    }


def _bit_targets(search: Any, table: Any, targets: tuple[float, ...]) -> list[Any]:
    """The allocator's optimal maps under ``avg_bits <= t`` for each target ``t`` (infeasible ones skipped)."""
    from search import allocate as alloc
    from search.errors import InfeasibleBudgetError
    from search.plan import Candidate, build_problem

    problem, plimits = build_problem(search.space, search.cost_model, table)
    out = []
    for t in targets:
        try:
            a = alloc.allocate(problem, {"avg_bits": float(t), **plimits})
        except InfeasibleBudgetError:
            continue
        out.append(Candidate(search.space.from_choices(a.choices), table.method, float(a.objective), dict(a.limits),
                             f"avg_bits<={t:g}", bool(a.exact), float(a.gap)))
    return out


def _progress(prefix: str) -> Any:
    last = [-1.0]

    def report(stage: str, frac: float, msg: str) -> None:
        if frac - last[0] >= 0.2 or frac >= 1.0:
            last[0] = frac
            log(f"{prefix}: {frac:.0%} {msg}")

    return report


def run_config(cfg: QualityConfig, *, cache: Path, quick: bool, seed: int, device: str,
               rows: tuple[int, int, int] | None = None,
               save: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Measure one configuration; returns its JSON record. ``rows``: (calibration, evaluation, max
    length) instead of the mode's. ``save(record)`` is called with the record so far after every
    method (a run stopped by its time limit keeps what it measured)."""
    import torch

    from search import methods as registry
    from search.local import prepare
    from search.pipeline import SearchOptions
    from search.plan import Candidate
    from search.space import BitOption

    model_dir, data, task = _model(cfg, cache)
    cal_rows, eval_rows, max_length = rows or ((8, 128, 32) if quick else (128, 500, 64))
    data = replace(data, calibration=cal_rows, evaluation=eval_rows, max_length=max_length, batch_size=32)
    methods: list[str] = []
    skipped: dict[str, str] = {}
    for m in cfg.methods:
        why = method_available(m)
        if why is None:
            methods.append(m)
        else:
            skipped[m] = why
    opts = SearchOptions(
        methods=tuple(methods) or ("kl",),  # the search needs one; only ``methods`` are run below
        granularity=cfg.granularity,  # type: ignore[arg-type]
        bits=cfg.bits,
        include_embeddings=cfg.include_embeddings,
        front_points=8 if quick else 16,
        seq_len=max_length,
        seed=seed,
        method_options=cfg.method_options,
    )
    t0 = time.perf_counter()
    search = prepare(model_dir, data, opts, task=task, device=device)
    log(f"{cfg.name}: {len(search.space.groups)} groups, device {search.device}, prepared in {time.perf_counter() - t0:.0f}s")
    metric = search.metric
    t0 = time.perf_counter()
    baseline = search.baseline()
    eval_unit = time.perf_counter() - t0  # one full-precision pass over the evaluation rows (with the reference)
    fp32_cost = search.cost_model.cost(search.space.full_precision())

    cache_metrics: dict[Any, dict[str, float]] = {}
    n_evals = 0

    def evaluate(c: Candidate) -> Any:
        nonlocal n_evals
        from search.result import ParetoPoint

        if c.metrics is not None:
            cache_metrics.setdefault(c.precision_map, dict(c.metrics))
        if c.precision_map not in cache_metrics:
            cache_metrics[c.precision_map] = search.evaluate(c.precision_map)
            n_evals += 1
        return ParetoPoint(precision_map=c.precision_map, cost=search.cost_model.cost(c.precision_map),
                           metrics=cache_metrics[c.precision_map], method=c.method, label=c.label,
                           predicted=c.predicted, budget=c.budget)

    points: list[Any] = []
    method_info: dict[str, Any] = {}
    refine_info: dict[str, Any] = {}

    def record() -> dict[str, Any]:
        return {
            "name": cfg.name,
            "model": cfg.model,
            "model_label": MODEL_LABELS.get(cfg.model, cfg.model),
            "task": task,
            "metric": metric,
            "higher_is_better": search.higher_is_better,
            "granularity": cfg.granularity,
            "include_embeddings": cfg.include_embeddings,
            "groups": len(search.space.groups),
            "options": [o.key() for o in sorted({o for opts in search.space.options for o in opts}, key=lambda o: o.bits)],
            "device": str(search.device),
            "calibration_rows": data.calibration,
            "evaluation_rows": data.evaluation,
            "max_length": data.max_length,
            "fp32": {"metric": baseline.get(metric), "metrics": dict(baseline), "size_bytes": fp32_cost.size_bytes,
                     "avg_bits": fp32_cost.avg_bits, "option": BitOption(32).key()},
            "eval_unit_seconds": eval_unit,
            "methods": method_info,
            "skipped": skipped,
            "refine": refine_info,
            "bit_targets": list(cfg.bit_targets),
            "points": [_row(p, metric) for p in points],
        }

    def checkpoint() -> None:
        if save is not None:
            save(record())

    # the uniform baselines first: cheap, and every comparison needs them
    for c in search.uniform_candidates():
        points.append(evaluate(c))
    checkpoint()
    kl_distinct: int | None = None
    for m in methods:
        t_m = time.perf_counter()
        try:
            before = n_evals
            if registry.is_sensitivity(m):
                table = search.sensitivity(m, on_progress=_progress(f"{cfg.name}: {m}"))
                t_sens = time.perf_counter() - t_m
                cands = search.candidates(table) + _bit_targets(search, table, cfg.bit_targets)
                proposed = time.perf_counter() - t_m
                extra = {"sensitivity_units": t_sens / eval_unit, "samples": table.samples}
            else:
                kwargs: dict[str, Any] = {}
                if m == "nsga2" and kl_distinct is not None:
                    kwargs["n_evaluations"] = kl_distinct
                cands = registry.get(m).load()(search, **kwargs)
                proposed = time.perf_counter() - t_m
                extra = {"n_evaluations": kwargs.get("n_evaluations")}
                if m == "nsga2":  # the maps its generations evaluated, of which it returns the front
                    extra["search_evaluations"] = (getattr(search, "nsga2_info", None) or {}).get("evaluated")
            distinct = len({c.precision_map for c in cands})
            if m == "kl":
                kl_distinct = distinct
            mpoints = [evaluate(c) for c in cands]
            points.extend(mpoints)
            method_info[m] = {
                "seconds": time.perf_counter() - t_m,
                "units": (time.perf_counter() - t_m) / eval_unit,
                "propose_units": proposed / eval_unit,
                "distinct_maps": distinct,
                "evaluations": n_evals - before + sum(1 for c in cands if c.metrics is not None),
                **extra,
            }
            log(f"{cfg.name}: {m} -> {distinct} maps in {time.perf_counter() - t_m:.0f}s")
            checkpoint()
        except Exception as exc:  # noqa: BLE001 - one failing method must not lose the others
            skipped[m] = f"failed: {type(exc).__name__}: {exc}"
            log(f"{cfg.name}: {m} failed\n{traceback.format_exc()}")

    refine_methods = [m for m in cfg.refine_methods if m in method_info]
    if refine_methods and importlib.util.find_spec("search.refine") is None:
        skipped["refine"] = "search.refine is not available"
    elif refine_methods:
        from search.pareto import front as pareto_front
        from search.refine import RefineConfig, refine

        steps = 12 if quick else 80
        rcfg = RefineConfig(steps=steps, eval_every=max(4, steps // 6), patience=3, seed=seed)
        cal = list(search.calibration)
        train, val = (cal[:-1], cal[-1:]) if len(cal) > 1 else (cal, cal)
        for m in refine_methods:
            mfront = pareto_front([p for p in points if p.method == m], metric=metric,
                                  higher_is_better=search.higher_is_better)
            done: set[Any] = set()
            for bits in cfg.refine_bits:
                ok = [p for p in mfront if p.cost.avg_bits <= bits + 1e-9]
                if not ok:
                    continue
                origin = max(ok, key=lambda p: p.cost.avg_bits)
                if origin.precision_map in done:
                    continue
                done.add(origin.precision_map)
                t_r = time.perf_counter()
                try:
                    res = refine(search, origin.precision_map, config=rcfg, train_batches=train, validation_batches=val)
                except Exception as exc:  # noqa: BLE001
                    skipped[f"refine:{m}"] = f"failed: {type(exc).__name__}: {exc}"
                    log(f"{cfg.name}: refine {m} failed\n{traceback.format_exc()}")
                    break
                pt = replace(res.point(origin), method=f"{m}+refine")
                points.append(pt)
                refine_info[f"{m}@{bits}"] = {
                    "avg_bits": origin.cost.avg_bits,
                    "before": origin.metrics.get(metric),
                    "after": pt.metrics.get(metric),
                    "steps": res.steps,
                    "best_step": res.best_step,
                    "units": (time.perf_counter() - t_r) / eval_unit,
                }
                log(f"{cfg.name}: refined {m} at {origin.cost.avg_bits:.2f} bits: "
                    f"{origin.metrics.get(metric):.4f} -> {pt.metrics.get(metric):.4f}")
                del res
                checkpoint()
    if device == "cuda":
        torch.cuda.empty_cache()
    return record()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=Path(".cache"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--configs", nargs="*", default=None, help="names of the configurations to run (default: all)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods instead of each configuration's ('' or 'none': the uniform baselines only)")
    p.add_argument("--no-refine", action="store_true", help="skip refinement")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from benchmarks.assets import ensure_packages

    ensure_packages()
    torch.manual_seed(a.seed)
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    configs = configs_for(a.quick)
    if a.configs:
        known = {c.name for c in configs_for(False)} | {c.name for c in configs_for(True)}
        unknown = [n for n in a.configs if n not in known]
        if unknown:
            p.error(f"--configs: unknown configuration(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        absent = [n for n in a.configs if n not in {c.name for c in configs}]
        if absent:
            log(f"not in {'quick' if a.quick else 'full'} mode, skipped: {', '.join(absent)}")
        configs = [c for c in configs if c.name in a.configs]
    if a.methods is not None:
        chosen = tuple(m for m in a.methods.split(",") if m and m != "none")
        configs = [replace(c, methods=chosen) for c in configs]
    if a.no_refine:
        configs = [replace(c, refine_methods=()) for c in configs]
    out: dict[str, Any] = {"part": "quality", "quick": a.quick, "seed": a.seed, "device": device, "configs": [],
                           "errors": {}}
    for cfg in configs:
        t0 = time.perf_counter()
        done = list(out["configs"])

        def save(partial: dict[str, Any], done: list[dict[str, Any]] = done) -> None:
            if a.out:
                partial = {**partial, "incomplete": True}
                a.out.parent.mkdir(parents=True, exist_ok=True)
                a.out.write_text(json.dumps({**out, "configs": [*done, partial]}, indent=1))

        try:
            rec = run_config(cfg, cache=a.cache, quick=a.quick, seed=a.seed, device=device, save=save)
            rec["seconds"] = time.perf_counter() - t0
            out["configs"].append(rec)
        except Exception as exc:  # noqa: BLE001 - keep the other configurations
            out["errors"][cfg.name] = f"{type(exc).__name__}: {exc}"
            log(f"{cfg.name} failed\n{traceback.format_exc()}")
        if a.out:  # written after every configuration: a part killed by its time limit keeps what it did
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(out, indent=1))
    for rec in out["configs"]:
        log(f"{rec['name']}: fp32 {rec['metric']} {rec['fp32']['metric']:.4f}, {len(rec['points'])} points, "
            f"{rec['seconds']:.0f}s")
    return 0 if out["configs"] else 1


if __name__ == "__main__":
    sys.exit(main())
