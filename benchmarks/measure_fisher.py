"""The figures of ``docs/methods/fisher.md``: fisher's scoring time next to the KL table's and the
Hessian's on the same calibration rows, the Kendall tau of the scores against the KL table's, and
the held-out quality of the maps each table allocates at a few average-bit budgets.

``.venv/bin/python docs/methods/measure_fisher.py [--model embeddings|bbc] [--calibration 64]
[--evaluation 200] [--cache .cache] [--out FILE.json] [--no-hessian] [--hessian-max-probes N]
[--tables DIR] [--no-maps]``

``embeddings``: all-MiniLM-L6-v2 itself (sentence embeddings, mean pooling) on BBC texts, the
discrepancy ``1 - cosine``; ``bbc``: the MiniLM BBC classifier of ``benchmarks.assets`` (built on
first use). Layer groups, bits 2/3/4/8, the same calibration rows for every table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.assets import bbc_classifier, bbc_jsonl, ensure_packages, minilm_dir  # noqa: E402

FISHER_VARIANTS: dict[str, dict[str, object]] = {
    "fisher": {},
    "fisher rows": {"weighting": "rows"},
    "fisher members": {"weighting": "members"},
    "fisher model labels": {"labels": "model"},
    "fisher data labels": {"labels": "data"},
    "fisher 4 draws": {"draws": 4},
}
#: the tables whose maps are evaluated on the held-out rows
MAPPED = ("kl", "hessian", "fisher", "fisher rows", "fisher members")
BUDGETS = (3.0, 4.0)


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b (ties neither concordant nor discordant)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    iu = np.triu_indices(len(x), 1)
    dx = np.sign(x[:, None] - x[None, :])[iu]
    dy = np.sign(y[:, None] - y[None, :])[iu]
    nx, ny = float(np.abs(dx).sum()), float(np.abs(dy).sum())
    return float((dx * dy).sum() / np.sqrt(nx * ny)) if nx and ny else 0.0


def taus(table, ref) -> dict[str, float]:
    """tau over every (group, option < 32), and the mean over options of tau across groups."""
    keys = [(g, k) for g in ref.scores for k in ref.scores[g] if k != "32"]
    out = {"all": kendall_tau([table.scores[g][k] for g, k in keys], [ref.scores[g][k] for g, k in keys])}
    per = []
    for opt in sorted({k for _, k in keys}, key=int):
        gs = [g for g, k in keys if k == opt]
        t = kendall_tau([table.scores[g][opt] for g in gs], [ref.scores[g][opt] for g in gs])
        out[f"bits {opt}"] = t
        per.append(t)
    out["mean over bit-widths"] = float(np.mean(per))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="docs/methods/measure_fisher.py")
    p.add_argument("--model", choices=("embeddings", "bbc"), default="embeddings")
    p.add_argument("--calibration", type=int, default=64)
    p.add_argument("--evaluation", type=int, default=200)
    p.add_argument("--cache", default=".cache")
    p.add_argument("--out", default=None)
    p.add_argument("--no-hessian", action="store_true")
    p.add_argument("--no-maps", action="store_true", help="scores and their times only; no map is evaluated")
    p.add_argument("--hessian-max-probes", type=int, default=200, help="the hessian method's max_probes")
    p.add_argument("--tables", default=None,
                   help="a folder: each table (and its time) is written there as it is computed and read back by a "
                        "rerun with the same arguments instead of being computed again")
    a = p.parse_args(argv)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from search import allocate as alloc
    from search.local import DataOptions, prepare
    from search.pipeline import Candidate, SearchOptions, _budget_limits, build_problem
    from search.result import Budget
    from search.space import BitOption

    ensure_packages()
    embeddings = a.model == "embeddings"
    if embeddings:
        model_dir, source, label = minilm_dir(), bbc_jsonl(a.cache), None
    else:
        model_dir, source, label = bbc_classifier(a.cache), Path(a.cache) / "bbc_heldout.jsonl", "label"
    data = DataOptions(source=str(source), label_field=label, calibration=a.calibration, evaluation=a.evaluation,
                       max_length=64, batch_size=32)
    variants = {k: v for k, v in FISHER_VARIANTS.items() if not (embeddings and "labels" in k)}
    options = {"kl": {}, "hessian": {"max_probes": a.hessian_max_probes}, **variants}
    methods = [*variants, "kl", *([] if a.no_hessian else ["hessian"])]
    quality = "cosine" if embeddings else "kl"
    opts = SearchOptions(methods=("kl",), bits=(2, 3, 4, 8), budget=Budget(max_avg_bits=4.0), seq_len=64)
    search = prepare(model_dir, data, opts, task="embeddings" if embeddings else "sequence_classification",
                     device="cpu")
    from search.fisher import FisherSensitivity
    from search.sensitivity import SensitivityContext, get_method

    ctx = SensitivityContext(search.model, search.adapter, search.space, search.task, search.calibration,
                             search.device, search.options.seed, search.options.clip)
    from search.result import SensitivityTable

    tables, seconds, cpu_seconds = {}, {}, {}
    folder = Path(a.tables) if a.tables else None
    tag = f"{a.model}-c{a.calibration}-s{search.options.seed}"
    for m in methods:
        name = "fisher" if m.startswith("fisher") else m
        saved = folder / f"{tag}-{m.replace(' ', '_')}-{json.dumps(options[m], sort_keys=True)}.json" if folder else None
        if saved is not None and saved.is_file():
            record = json.loads(saved.read_text())
            tables[m], seconds[m] = SensitivityTable.from_dict(record["table"]), record["seconds"]
            cpu_seconds[m] = record.get("cpu_seconds")
            print(f"[measure] {m}: {seconds[m]:.1f} s (read back)", file=sys.stderr, flush=True)
            continue
        t, c = time.perf_counter(), time.process_time()
        method = FisherSensitivity(**options[m]) if name == "fisher" else get_method(name, **options[m])  # type: ignore[arg-type]
        tables[m] = method.compute(ctx)
        seconds[m], cpu_seconds[m] = time.perf_counter() - t, time.process_time() - c
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps({"table": tables[m].to_dict(), "seconds": seconds[m],
                                         "cpu_seconds": cpu_seconds[m]}))
        print(f"[measure] {m}: {seconds[m]:.1f} s wall, {cpu_seconds[m]:.1f} s CPU", file=sys.stderr, flush=True)
    ref = tables["kl"]
    search.baseline()
    rows: list[dict[str, object]] = []
    for b in () if a.no_maps else BUDGETS:
        uni = search.space.uniform(BitOption(int(b))) if float(b).is_integer() else None
        maps = {}
        for m in (m for m in methods if m in MAPPED):
            problem, plimits = build_problem(search.space, search.cost_model, tables[m])
            choice = alloc.allocate(problem, {**_budget_limits(Budget(max_avg_bits=b)), **plimits})
            maps[m] = search.space.from_choices(choice.choices)
        if uni is not None:
            maps["uniform"] = uni
        for m, pmap in maps.items():
            pt = search.evaluate_candidate(Candidate(pmap, m.split()[0]))
            rows.append({"budget_avg_bits": b, "table": m, "avg_bits": pt.cost.avg_bits, **pt.metrics})
            print(f"[measure] <= {b} bits {m}: avg {pt.cost.avg_bits:.2f} {quality} {pt.metrics[quality]:.5f} "
                  f"{pt.metrics}", file=sys.stderr, flush=True)
    report = {
        "command": " ".join(["docs/methods/measure_fisher.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "model": "all-MiniLM-L6-v2 sentence embeddings on BBC texts" if embeddings
        else "all-MiniLM-L6-v2 fine-tuned on BBC topics (benchmarks.assets)",
        "groups": len(search.space.groups),
        "calibration_rows": ctx.n_samples,
        "calibration_batches": len(ctx.batches),
        "evaluation_rows": sum(len(b) for b in search.evaluation),
        "baseline": search.baseline_metrics,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "fisher_breakdown": {m: {k: tables[m].extra[k] for k in ("seconds_forward", "seconds_backward", "seconds_scores")}
                             for m in methods if m.startswith("fisher")},
        "hessian": {k: tables["hessian"].extra.get(k) for k in ("probes", "hvps", "stopped", "max_probes")}
        if "hessian" in tables else None,
        "tau_vs_kl": {m: taus(tables[m], ref) for m in methods if m != "kl"},
        "maps": rows,
    }
    print(json.dumps({k: report[k] for k in ("seconds", "cpu_seconds", "fisher_breakdown", "hessian", "tau_vs_kl")}, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
