"""Tensor-train options on the real MiniLM BBC classifier: where do they add points to the front?

One run measures, on held-out BBC articles (rows the calibration never sees):

* the KL sensitivity of every matrix at 2, 3, 4, 8 bits and at every tensor-train option
  ``tt<r>@<b>`` (ranks ``--ranks``, cores at those widths);
* at each average-bits budget of ``--budgets`` the optimal map of that table over the space *with* TT
  options and over the *bits-only* space (the same table without its TT options; infeasible below 2
  bits, where every matrix at 2 bits is the bits-only floor), each evaluated (accuracy, KL) with the
  factorised forward for TT groups;
* TT-QAT / KDLSQ refinement (``--refine-steps`` steps, layer-by-layer hidden-state distillation from
  the full-precision model, LSQ scales) of the maps at ``--refine-budgets``, with and without TT.

``python -m benchmarks.bench_tt [--quick] [--out FILE.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.assets import bbc_classifier, ensure_packages


def _log(msg: str) -> None:
    print(f"[bench_tt] {msg}", file=sys.stderr, flush=True)


def _histogram(pmap) -> dict[str, int]:
    out: dict[str, int] = {}
    for opt in pmap.values():
        out[opt.key()] = out.get(opt.key(), 0) + 1
    return dict(sorted(out.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_tt")
    p.add_argument("--cache", default=".cache")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--ranks", default="8,16,32,64")
    p.add_argument("--budgets", default="0.5,0.75,1.0,1.25,1.5,1.75,2.0,2.5,3.0")
    p.add_argument("--refine-budgets", default="1.5,2.0")
    p.add_argument("--refine-steps", type=int, default=None)
    a = p.parse_args(argv)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from search import allocate as alloc
    from search.cost import CostModel
    from search.data import load_text_data, tokenize
    from search.errors import InfeasibleBudgetError
    from search.local import DataOptions, prepare
    from search.pipeline import SearchOptions
    from search.plan import build_problem
    from search.refine import RefineConfig, refine
    from search.space import SearchSpace

    t_all = time.perf_counter()
    ensure_packages()
    model_dir = bbc_classifier(a.cache)
    cache = Path(a.cache)
    quick = a.quick
    ranks = tuple(int(r) for r in a.ranks.split(","))
    data = DataOptions(source=str(cache / "bbc_heldout.jsonl"), label_field="label",
                       calibration=16 if quick else 64, evaluation=160 if quick else 500, max_length=64, batch_size=16)
    opts = SearchOptions(methods=("kl",), bits=(2, 3, 4, 8), tt_ranks=ranks, seq_len=64, front_points=2)
    search = prepare(model_dir, data, opts, device="cpu")
    fp = search.baseline()
    space = search.space
    n_tt = sum(o.is_tt for row in space.options for o in row)
    _log(f"full precision accuracy {fp['accuracy']:.4f}; {len(space.groups)} groups, {n_tt} TT options")
    t0 = time.perf_counter()
    table = search.sensitivity("kl", on_progress=lambda s, f, m: _log(m) if int(f * 100) % 10 == 0 else None)
    t_kl = time.perf_counter() - t0
    _log(f"KL table in {t_kl:.0f} s")
    bits_space = SearchSpace(
        groups=space.groups, options=tuple(tuple(o for o in row if not o.is_tt) for row in space.options),
        granularity=space.granularity, other_params=space.other_params, other_bits=space.other_bits,
        other_macs_per_token=space.other_macs_per_token, n_blocks=space.n_blocks, ties=space.ties,
    )
    spaces = {"tt": (space, search.cost_model), "bits": (bits_space, CostModel(bits_space, seq_len=64))}

    def optimal(kind: str, budget: float):
        sp, cm = spaces[kind]
        problem, plimits = build_problem(sp, cm, table)
        try:
            al = alloc.allocate(problem, {"avg_bits": budget, **plimits})
        except InfeasibleBudgetError:
            return None
        return sp.from_choices(al.choices)

    rows = []
    maps = {}
    for budget in [float(b) for b in a.budgets.split(",")]:
        for kind in ("tt", "bits"):
            pmap = optimal(kind, budget)
            if pmap is None:
                rows.append({"kind": kind, "budget_avg_bits": budget, "feasible": False})
                continue
            cost = search.cost_model.cost(pmap)
            t1 = time.perf_counter()
            metrics = search.evaluate(pmap)
            maps[(kind, budget)] = pmap
            n_tt_groups = sum(o.is_tt for o in pmap.values())
            rows.append({
                "kind": kind, "budget_avg_bits": budget, "feasible": True, "avg_bits": cost.avg_bits,
                "size_mb": cost.size_mb, "bops": cost.bops, "accuracy": metrics["accuracy"], "kl": metrics.get("kl"),
                "tt_groups": n_tt_groups, "options": _histogram(pmap), "eval_seconds": time.perf_counter() - t1,
            })  # fmt: skip
            _log(f"{kind:>4} <= {budget} bits: avg {cost.avg_bits:.2f}, {cost.size_mb:.2f} MB, "
                 f"accuracy {metrics['accuracy']:.4f}, {n_tt_groups} TT groups")

    names = [search.model.config.id2label[i] for i in range(len(search.model.config.id2label))]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    train = tokenize(load_text_data(str(cache / "bbc_train.jsonl"), label_field="label", label_names=names),
                     tokenizer, max_length=64, batch_size=16)
    steps = a.refine_steps or (30 if quick else 150)
    cfg = RefineConfig(steps=steps, lr_weights=1e-4, lr_scales=5e-4, lr_cores=2e-4, eval_every=max(1, steps // 3),
                       patience=None, seed=0, kd_hidden=1.0, kd_attention=1.0, task=1.0)
    refined = []
    for budget in [float(b) for b in a.refine_budgets.split(",")]:
        for kind in ("tt", "bits"):
            pmap = maps.get((kind, budget))
            if pmap is None:
                continue
            t1 = time.perf_counter()
            res = refine(search, pmap, config=cfg, train_batches=train, validation_batches=search.calibration)
            row = next(r for r in rows if r["kind"] == kind and r["budget_avg_bits"] == budget)
            refined.append({
                "kind": kind, "budget_avg_bits": budget, "avg_bits": row["avg_bits"], "size_mb": row["size_mb"],
                "ptq_accuracy": row["accuracy"], "refined_accuracy": res.metrics["accuracy"],
                "ptq_kl": row["kl"], "refined_kl": res.metrics.get("kl"), "steps": res.steps,
                "best_step": res.best_step, "seconds": time.perf_counter() - t1,
            })  # fmt: skip
            _log(f"refined {kind} <= {budget}: {row['accuracy']:.4f} -> {res.metrics['accuracy']:.4f} "
                 f"({time.perf_counter() - t1:.0f} s)")
    report = {
        "model": "all-MiniLM-L6-v2 fine-tuned on BBC topics",
        "command": "python -m benchmarks.bench_tt" + (" --quick" if quick else ""),
        "quick": quick,
        "fp32_accuracy": fp["accuracy"],
        "ranks": list(ranks),
        "evaluation_rows": sum(len(b) for b in search.evaluation),
        "calibration_rows": sum(len(b) for b in search.calibration),
        "kl_seconds": t_kl,
        "front": rows,
        "refined": refined,
        "refine_config": cfg.to_dict(),
        "torch_threads": torch.get_num_threads(),
        "total_seconds": time.perf_counter() - t_all,
    }
    print(f"{'kind':>5}{'budget':>8}{'avg':>7}{'MB':>7}{'acc':>8}{'KL':>9}{'TT':>4}")
    for r in rows:
        if r["feasible"]:
            print(f"{r['kind']:>5}{r['budget_avg_bits']:>8}{r['avg_bits']:>7.2f}{r['size_mb']:>7.2f}"
                  f"{r['accuracy']:>8.4f}{r['kl']:>9.4f}{r['tt_groups']:>4}")
        else:
            print(f"{r['kind']:>5}{r['budget_avg_bits']:>8}  infeasible")
    for r in refined:
        print(f"refined {r['kind']:>4} <= {r['budget_avg_bits']}: {r['ptq_accuracy']:.4f} -> {r['refined_accuracy']:.4f}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
