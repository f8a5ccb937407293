"""The closed loop, per method, against the open loop, uniform maps and ModelOpt, on held-out rows.

``python -m benchmarks.bench_loop [--quick] [--cache .cache] [--out FILE.json] [--model bbc]
[--methods kl,kl-open,fisher,nsga2,hessian,dnas] [--peer | --no-peer] [--peer-methods gradient]
[--no-proxy-cost] [--bits 2,3,4,8] [--granularity layer]``

On one fine-tuned MiniLM classifier (``--granularity``, default layer; ``--bits``, default 2/3/4/8, the
same syntax as the CLI: ``4g128`` keeps one scale per 128 input columns, the block ModelOpt's INT4
uses) and one set of calibration and
held-out rows, every search runs through the one orchestration (:func:`search.orchestration.run_search`)
with the loop's defaults (``kl-open``: the loop off), one method at a time, each with an empty
quantized-weight cache (it pays its own quantization). The held-out rows choose nothing: every
choice is made on the calibration proxy; they are read only to report. Per method and budget
(2.5, 3 and 4 average bits) the record holds the point the search recommends there (the lowest
calibration discrepancy within the budget: what a user deploys), the best held-out point of the
method within it (for reference), and the best uniform map within it (the lowest held-out output KL
over every uniform map of the space that fits, per row and group-wise alike: the strictest
reference): held-out output KL and accuracy.

Costs in the same run, in wall seconds, in units of one full-precision pass over the held-out rows
and in fine-tuning epochs (:func:`benchmarks.bench_peer._finetune_epoch`): the method's table, the
loop, the evaluation (a map evaluated by an earlier search is not evaluated again, but its seconds
are charged to every search that needs it), and the whole search. The proxy's cost: seconds per
measured map with the quantized weights cached and without (:class:`search.adapter.WeightCache`),
against the bare forward passes.

With ``--peer`` (the default where ModelOpt's venv is in the cache, :func:`benchmarks.bench_peer.
ensure_peer_venv`), ModelOpt's ``auto_quantize`` runs on the very same batches (its own process and
venv, :func:`benchmarks.bench_peer._run_peer`) at the same budgets, and its maps are evaluated both
with its quantizer and with bitscout's (:func:`benchmarks.bench_peer.peer_through_ours`). The
record's ``targets`` says, per target of the closed-loop benchmark, whether it holds.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

BUDGETS = (2.5, 3.0, 4.0)
#: the searches: name -> (method, loop on)
RUNS: dict[str, tuple[str, bool]] = {
    "kl": ("kl", True), "kl-open": ("kl", False), "fisher": ("fisher", True), "nsga2": ("nsga2", True),
    "hessian": ("hessian", True), "dnas": ("dnas", True),
}
DEFAULT_RUNS = ("kl", "kl-open", "fisher", "nsga2")
#: short method options for a run on a shared 2-core machine
QUICK_OPTIONS: dict[str, dict[str, Any]] = {"hessian": {"tolerance": 0.25, "min_probes": 2, "max_probes": 6},
                                            "dnas": {"epochs": 1}}


def log(msg: str) -> None:
    print(f"[loop] {msg}", file=sys.stderr, flush=True)


def _row(p: Any) -> dict[str, Any]:
    return {"label": p.label, "method": p.method, "avg_bits": round(p.cost.avg_bits, 3),
            "size_mb": round(p.cost.size_mb, 3), "kl": p.metrics.get("kl"), "accuracy": p.metrics.get("accuracy"),
            "found": None if p.provenance is None else {k: p.provenance.get(k) for k in
                                                         ("score", "round", "local_search", "guard", "how", "proxy")}}


def _summary(result: Any, method: str) -> dict[str, Any]:
    """Per budget: the recommended point (lowest calibration discrepancy within the budget, over the
    method's points and the uniform maps, as the search recommends), the method's best held-out point
    within it, and the uniform map within it with the lowest held-out output KL."""
    out: dict[str, Any] = {}
    mine = [p for p in result.points if p.method == method]
    uniform = [p for p in result.points if p.method == "uniform"]
    for b in BUDGETS:
        inside = [p for p in mine if p.cost.avg_bits <= b + 1e-9]
        candidates = [p for p in [*inside, *(u for u in uniform if u.cost.avg_bits <= b + 1e-9)]
                      if (p.provenance or {}).get("proxy") is not None]
        chosen = min(candidates, key=lambda p: (p.provenance["proxy"], p.cost.size_bytes)) if candidates else None
        best = min(inside, key=lambda p: p.metrics["kl"]) if inside else None
        within = [u for u in uniform if u.cost.avg_bits <= b + 1e-9]
        uni = min(within, key=lambda u: (u.metrics["kl"], u.cost.size_bytes)) if within else None
        out[f"{b:g}"] = {"recommended": None if chosen is None else _row(chosen),
                         "best_heldout": None if best is None else _row(best),
                         "uniform": None if uni is None else _row(uni)}
    return out


class MemoEvaluator:
    """The orchestration's evaluator over one search: a map evaluated before is answered from memory,
    its seconds charged again (``charged``) to the search that needs it."""

    def __init__(self, search: Any) -> None:
        self.search = search
        self.metrics: dict[Any, dict[str, float]] = {}
        self.seconds: dict[Any, float] = {}
        self.charged = 0.0

    def one(self, pmap: Any) -> tuple[dict[str, float], float]:
        if pmap not in self.metrics:
            t = time.perf_counter()
            self.metrics[pmap] = self.search.evaluate(pmap)
            self.seconds[pmap] = time.perf_counter() - t
        self.charged += self.seconds[pmap]
        return self.metrics[pmap], self.seconds[pmap]

    def evaluate_many(self, maps: list[Any], *, on_result: Any = None) -> list[dict[str, float]]:
        out = []
        for m in maps:
            out.append(self.one(m)[0])
            if on_result is not None:
                on_result(len(out), len(maps))
        return out


def proxy_cost(search: Any, n_maps: int = 3) -> dict[str, Any]:
    """Seconds per proxy measurement of ``n_maps`` maps: quantizing every time (no cache), from a warm
    weight cache, and the bare forward passes on the calibration batches (the floor)."""
    import torch

    from search.adapter import WeightCache
    from search.tasks import eval_mode, model_output

    space = search.space
    maps = [space.uniform(o) for o in space.options[0] if o.is_integer][:n_maps - 1]
    maps.append(space.from_choices([i % len(o) for i, o in enumerate(space.options)]))
    search.calibration_proxy(maps[:1])  # the full-precision reference outputs, once
    t0 = time.perf_counter()
    with torch.no_grad(), eval_mode(search.model):
        for b in search.calibration:
            model_output(search.model, b, search.task)
    forward = time.perf_counter() - t0
    search.weight_cache = WeightCache(limit_bytes=0)
    t0 = time.perf_counter()
    cold = search.calibration_proxy(maps)
    uncached = (time.perf_counter() - t0) / len(maps)
    search.weight_cache = WeightCache()
    search.calibration_proxy(maps)  # fills the cache
    t0 = time.perf_counter()
    warm = search.calibration_proxy(maps)
    cached = (time.perf_counter() - t0) / len(maps)
    if warm != cold:
        raise RuntimeError("the weight cache changed a measurement")
    return {"maps": len(maps), "forward_s": forward, "uncached_s_per_map": uncached, "cached_s_per_map": cached,
            "ratio": uncached / cached, "cached_over_forward": cached / forward,
            "cache_bytes": search.weight_cache.bytes}


def _targets(rec: dict[str, Any]) -> dict[str, Any]:
    """The closed-loop benchmark's targets, met or not, from the record."""
    out: dict[str, Any] = {}
    runs = rec["runs"]
    closed = [n for n in runs if n != "kl-open" and "budgets" in runs[n]]
    for b in ("3", "4"):
        rows = {}
        for n in closed:
            r = runs[n]["budgets"].get(b) or {}
            chosen, uni = r.get("recommended"), r.get("uniform")
            if not chosen or not uni:
                continue
            rows[n] = {"kl_ratio": chosen["kl"] / uni["kl"] if uni["kl"] else math.inf,
                       "accuracy_delta": chosen["accuracy"] - uni["accuracy"],
                       "met": chosen["kl"] <= 0.8 * uni["kl"] and chosen["accuracy"] >= uni["accuracy"]}
        out[f"kl_0.8x_uniform_at_{b}_bits"] = rows
    peer = rec.get("peer") or {}
    if peer.get("runs"):
        vs: dict[str, Any] = {}
        for run in peer["runs"]:
            for p in run.get("points", []):
                key = f"{p['budget']:g}"
                for n in closed:
                    r = (runs[n]["budgets"].get(key) or {}).get("recommended")
                    if not r or "ours" not in p:
                        continue
                    vs.setdefault(n, {})[f"{run['method']}/{run['format_set']}@{key}"] = {
                        "ours_kl": r["kl"], "peer_through_ours_kl": p["ours"]["kl"],
                        "ours_accuracy": r["accuracy"], "peer_through_ours_accuracy": p["ours"]["accuracy"],
                        "met": r["kl"] <= p["ours"]["kl"]}
        out["at_least_modelopt_allocation_through_ours"] = vs
        grad = [r for r in peer["runs"] if r.get("method") == "gradient" and r.get("score_seconds")]
        if grad and "fisher" in runs:
            g = min(r["score_seconds"] for r in grad)
            out["fisher_score_vs_modelopt_gradient"] = {"fisher_s": runs["fisher"]["table_s"], "gradient_s": g,
                                                        "ratio": runs["fisher"]["table_s"] / g,
                                                        "met": runs["fisher"]["table_s"] <= g}
        whole = {f"{r['method']}/{r['format_set']}": r["whole_seconds"] for r in peer["runs"] if r.get("whole_seconds")}
        if whole:
            # the peer run that reaches every budget (its INT2 / INT3 formats), its gradient score
            ref_name = "gradient/int2-int8" if "gradient/int2-int8" in whole else max(whole, key=whole.get)
            ref = whole[ref_name]
            out["whole_search_vs_2x_modelopt"] = {
                "modelopt_whole_s": whole, "against": ref_name,
                **{n: {"whole_s": runs[n]["whole_s"], "ratio": runs[n]["whole_s"] / ref,
                       "met": runs[n]["whole_s"] <= 2 * ref} for n in closed}}
    return out


def run(model: str, cache: Path, quick: bool, names: tuple[str, ...], peer_python: Path | None = None,
        peer_info: dict[str, Any] | None = None, peer_methods: tuple[str, ...] = ("gradient",),
        save: Any = None, classifier: tuple[Path, Path, Path] | None = None,
        rows: tuple[int, int, int] | None = None, epoch_steps: int | None = None,
        measure_proxy_cost: bool = True, bits: tuple[int | str, ...] = (2, 3, 4, 8),
        granularity: str = "layer") -> dict[str, Any]:
    """One record (see the module docstring). ``classifier`` (model folder, held-out pool, training
    split) and ``rows`` (calibration, held-out, max length) replace the named classifier and the
    mode's rows (tests: a tiny model)."""
    import torch

    from benchmarks import bench_peer
    from benchmarks.assets import CLASSIFIERS
    from search.adapter import WeightCache
    from search.local import DataOptions, prepare
    from search.orchestration import SearchHooks, run_search
    from search.pipeline import SearchOptions
    from search.space import BitOption

    torch.manual_seed(0)
    if classifier is None:
        build, heldout = CLASSIFIERS[model]
        model_dir, pool, train_file = build(cache), cache / heldout, cache / heldout.replace("_heldout", "_train")
    else:
        model_dir, pool, train_file = classifier
    cal, ev, max_length = rows or ((64, 400, 64) if quick else (128, 500, 64))
    steps = epoch_steps or (3 if quick else 8)
    data = DataOptions(source=str(pool), label_field="label", calibration=cal, evaluation=ev,
                       max_length=max_length, batch_size=32)
    widths = tuple(sorted({BitOption.parse(b).bits for b in bits if BitOption.parse(b).bits < 16}, reverse=True))
    base = SearchOptions(methods=("kl",), granularity=granularity, bits=bits, front_points=8 if quick else 16,
                         seq_len=max_length, uniform_baselines=widths)
    search = prepare(model_dir, data, base, device="cpu")
    log(f"{model}: {len(search.space.groups)} groups, {cal} calibration / {ev} held-out rows")
    epochs = [bench_peer._finetune_epoch(search, str(train_file), model_dir, steps)[0]]
    t0 = time.perf_counter()
    baseline = search.baseline()
    eval_unit = time.perf_counter() - t0
    record: dict[str, Any] = {"model": model, "granularity": granularity, "bits": [str(b) for b in bits],
                              "groups": len(search.space.groups), "calibration_rows": cal,
                              "heldout_rows": ev, "front_points": base.front_points, "baseline": baseline,
                              "eval_unit_s": eval_unit, "finetune_epoch_s": epochs[0], "runs": {}}
    if measure_proxy_cost:
        record["proxy_cost"] = proxy_cost(search)
        log(f"proxy: {record['proxy_cost']}")
    if save is not None:
        save(record)
    memo = MemoEvaluator(search)
    tables: dict[str, Any] = {}

    class Tables:
        def load(self, method: str) -> Any:
            return tables.get(method)

        def save(self, t: Any) -> None:
            tables[t.method] = t

    table_s: dict[str, float] = {}
    last = None
    for name in names:
        method, loop_on = RUNS[name]
        search.options = replace(base, methods=(method,), loop={} if loop_on else {"enabled": False},
                                 method_options={k: v for k, v in QUICK_OPTIONS.items() if k == method})
        search.timings = {}
        search.weight_cache = WeightCache()  # each search quantizes for itself
        memo.charged = 0.0
        t0 = time.perf_counter()
        try:
            result = run_search(search, SearchHooks(tables=Tables(), evaluator=memo))
        except Exception as exc:  # noqa: BLE001 - one failing method must not lose the others
            record["runs"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"{name} failed: {exc}")
            continue
        seconds = time.perf_counter() - t0
        computed = search.timings.get(f"sensitivity:{method}")  # None: the table of an earlier search
        if computed is not None:
            table_s[method] = computed
        t_table = table_s.get(method, 0.0)
        loop_s = search.timings.get(f"loop:{method}", 0.0)
        # the table (this run's or the earlier search's), the rest of the run without its own
        # evaluation, and the evaluation of every map it needs, charged in full
        rest = seconds - (computed or 0.0) - (search.timings.get("evaluation") or 0.0)
        whole = t_table + max(0.0, rest) + memo.charged
        last = result
        info = result.info["loop"]
        mine = (info.get("methods") or {}).get(method) or {}
        record["runs"][name] = {
            "method": method, "loop": loop_on, "table_s": t_table, "loop_s": loop_s,
            "evaluation_charged_s": memo.charged, "whole_s": whole,
            "whole_units": whole / eval_unit, "whole_epochs": whole / epochs[0],
            "table_epochs": t_table / epochs[0],
            "evaluated_maps": len({p.precision_map for p in result.points}),
            "proxy_measurements": result.info["proxy"]["measured"],
            "weight_cache": result.info["proxy"]["weight_cache"],
            "rounds": mine.get("rounds"), "local": mine.get("local"), "guard": mine.get("guard"),
            "sweep": mine.get("sweep"), "nsga2": getattr(search, "nsga2_info", None) if method == "nsga2" else None,
            "budgets": _summary(result, method),
            "points": [_row(p) for p in result.points if p.method == method],
        }
        log(f"{name}: table {t_table:.0f} s, loop {loop_s:.0f} s, whole {whole:.0f} s; "
            f"{record['runs'][name]['evaluated_maps']} maps")
        if save is not None:
            save(record)
    uniform = [p for p in last.points if p.method == "uniform"] if last is not None else []
    record["uniform"] = [_row(p) for p in uniform]

    if peer_python is not None:
        cost16, linear, searched, S, X = bench_peer.peer_axis(search)  # noqa: N806
        cfg = bench_peer.PeerConfig(model, model, budgets=BUDGETS, peer_methods=peer_methods,
                                    format_sets=("int4-int8", "int2-int8"))
        peer: dict[str, Any] = {"venv": dict(peer_info or {}), "runs": []}
        search.weight_cache = WeightCache()
        bench_peer._run_peer(cfg, search, model_dir, searched, S, X, peer_python, peer, quick=quick, seed=0)
        bench_peer.peer_through_ours(search, peer, cost16, linear, S, X, memo.one)
        record["peer"] = peer
    epochs.append(bench_peer._finetune_epoch(search, str(train_file), model_dir, steps)[0])
    record["finetune_epochs_measured"] = epochs
    record["targets"] = _targets(record)
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_loop", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cache", type=Path, default=Path(".cache"))
    p.add_argument("--model", default="bbc", choices=("bbc", "rt", "uncertainty"))
    p.add_argument("--methods", default=",".join(DEFAULT_RUNS), help=f"searches ({', '.join(RUNS)})")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=None,
                   help="ModelOpt side by side (default: where its venv is in the cache)")
    p.add_argument("--peer-methods", default="gradient", help="ModelOpt scores (gradient,kl_div)")
    p.add_argument("--no-proxy-cost", action="store_true", help="skip the proxy's cost with and without the cache")
    p.add_argument("--bits", default="2,3,4,8", help="bit options, as the CLI's --bits (4g128: group-wise scales)")
    p.add_argument("--granularity", default="layer", choices=("layer", "group"))
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    bits = tuple(int(b) if b.isdigit() else b for b in a.bits.split(",") if b)
    names = tuple(x for x in a.methods.split(",") if x)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        p.error(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(RUNS)}")
    import torch

    from benchmarks import bench_peer

    torch.set_num_threads(2)
    cache = a.cache if a.cache.is_absolute() else bench_peer.ROOT / a.cache
    python, info = None, {}
    if a.peer or (a.peer is None and bench_peer.peer_venv_ready(cache)):
        python, info = bench_peer.ensure_peer_venv(cache)

    def write(rec: dict[str, Any]) -> None:
        if a.out:
            a.out.write_text(json.dumps(rec, indent=2, default=float))

    rec = run(a.model, cache, a.quick, names, python, info, tuple(a.peer_methods.split(",")), save=write,
              measure_proxy_cost=not a.no_proxy_cost, bits=bits, granularity=a.granularity)
    rec.update({"part": "loop", "quick": a.quick, "machine": {"cpu": platform.processor() or platform.machine(),
                                                               "threads": torch.get_num_threads()}})
    write(rec)
    print(json.dumps(rec.get("targets"), indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
