"""Activation quantization on the real MiniLM BBC classifier: W4A8 and W8A8 next to weight-only,
after post-training quantization and after KD + LSQ refinement (KDLSQ-BERT's recipe: distillation
from the full-precision model, learned weight steps and one learned static step per matrix input).

One run measures, on held-out BBC articles (rows neither the fine-tuning nor the calibration saw):

* the uniform maps W8, W4 (weight-only: activations in float), W8A8 and W4A8 (inputs of every
  searched matrix rounded per token to 8 bits), post-training;
* the KL table over the space ``{4, 4a8, 8, 8a8, 32}`` and, at each average-bits budget of
  ``--budgets``, its optimal map over the weight-only options and over the W/A options (the two
  fronts), post-training;
* the refinement (``--refine-steps`` steps, KD on logits, hidden states and attention, LSQ steps) of
  the uniform maps and of the fronts' maps at ``--refine-budgets``.

BOPs count the weight-only maps' activations at 32 bits (the cost model's ``act_bits``), so the
W/A maps' BOPs show what rounding the activations buys.

``python -m benchmarks.bench_act [--quick] [--out FILE.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _log(msg: str) -> None:
    print(f"[bench_act] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_act")
    p.add_argument("--cache", default=".cache")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--budgets", default="4.5,5.0,6.0")
    p.add_argument("--refine-budgets", default="5.0")
    p.add_argument("--refine-steps", type=int, default=None)
    p.add_argument("--fronts", action=argparse.BooleanOptionalAction, default=True,
                   help="the KL table and the two fronts (--no-fronts: the uniform maps only)")
    p.add_argument("--ptq", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate the post-training maps (--no-ptq: refine them only)")
    a = p.parse_args(argv)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from search import allocate as alloc
    from search.data import load_text_data, tokenize
    from search.local import DataOptions, prepare
    from search.pipeline import SearchOptions
    from search.plan import build_problem
    from search.refine import RefineConfig, refine
    from search.space import PrecisionMap, SearchSpace

    t_all = time.perf_counter()
    cache = Path(a.cache)
    model_dir = cache / "minilm-bbc"
    if not (model_dir / "metrics.json").is_file():
        from benchmarks.assets import bbc_classifier, ensure_packages

        ensure_packages()
        model_dir = bbc_classifier(cache)
    quick = a.quick
    data = DataOptions(source=str(cache / "bbc_heldout.jsonl"), label_field="label",
                       calibration=16 if quick else 64, evaluation=160 if quick else 500, max_length=64, batch_size=16)
    opts = SearchOptions(methods=("kl",), bits=(4, "4a8", 8, "8a8"), seq_len=64, act_bits=32, front_points=2)
    search = prepare(model_dir, data, opts, device="cpu")
    space, cm = search.space, search.cost_model
    fp = search.baseline() if a.ptq else {"accuracy": float("nan")}
    fp_cost = cm.cost(space.uniform(32))
    _log(f"full precision accuracy {fp['accuracy']:.4f}; {len(space.groups)} groups")

    def uniform(key: str) -> PrecisionMap:
        return PrecisionMap({g.name: key for g in space.groups})

    def row_of(label: str, pmap: PrecisionMap) -> dict:
        t1 = time.perf_counter()
        m = search.evaluate(pmap)
        c = cm.cost(pmap)
        r = {"label": label, "accuracy": m["accuracy"], "kl": m.get("kl"), "avg_bits": c.avg_bits,
             "size_mb": c.size_mb, "compression": fp_cost.size_bytes / c.size_bytes, "gbops": c.bops / 1e9,
             "eval_seconds": time.perf_counter() - t1}  # fmt: skip
        _log(f"{label}: accuracy {r['accuracy']:.4f}, KL {r['kl']:.4f}, {c.avg_bits:.2f} bits, {r['gbops']:.1f} GBOPs")
        return r

    maps: dict[str, PrecisionMap] = {k: uniform(k) for k in ("8", "4", "8a8", "4a8")}
    rows = [row_of(k, m) for k, m in maps.items()] if a.ptq else []

    t0 = time.perf_counter()
    table = None if not a.fronts else search.sensitivity("kl", on_progress=lambda s, f, m: _log(m) if int(f * 100) % 20 == 0 else None)
    t_kl = time.perf_counter() - t0
    _log(f"KL table in {t_kl:.0f} s")

    def sub(keep) -> SearchSpace:
        return SearchSpace(
            groups=space.groups, options=tuple(tuple(o for o in row if keep(o)) for row in space.options),
            granularity=space.granularity, other_params=space.other_params, other_bits=space.other_bits,
            other_macs_per_token=space.other_macs_per_token, n_blocks=space.n_blocks, ties=space.ties,
        )

    fronts = {"weight-only": sub(lambda o: o.act_bits is None), "W/A": sub(lambda o: o.act_bits is not None or o.bits == 32)}
    from search.cost import CostModel

    for budget in [float(b) for b in a.budgets.split(",")] if table is not None else []:
        for kind, sp in fronts.items():
            problem, plimits = build_problem(sp, CostModel(sp, seq_len=64, act_bits=32), table)
            al = alloc.allocate(problem, {"avg_bits": budget, **plimits})
            pmap = sp.from_choices(al.choices)
            label = f"{kind} <= {budget} bits"
            maps[label] = pmap
            rows.append({**row_of(label, pmap), "budget_avg_bits": budget, "front": kind})

    names = [search.model.config.id2label[i] for i in range(len(search.model.config.id2label))]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    train = tokenize(load_text_data(str(cache / "bbc_train.jsonl"), label_field="label", label_names=names),
                     tokenizer, max_length=64, batch_size=16)
    steps = a.refine_steps or (20 if quick else 100)
    cfg = RefineConfig(steps=steps, lr_weights=1e-4, lr_scales=5e-4, eval_every=steps,
                       patience=None, seed=0, kd_hidden=1.0, kd_attention=1.0, task=1.0)
    refined = []
    to_refine = ["4", "4a8", "8a8"] + [f"{k} <= {b} bits" for b in a.refine_budgets.split(",") if b and a.fronts
                                       for k in ("weight-only", "W/A")]
    for label in to_refine:
        t1 = time.perf_counter()
        res = refine(search, maps[label], config=cfg, train_batches=train, validation_batches=search.calibration)
        c = cm.cost(maps[label])
        ptq = next((r for r in rows if r["label"] == label),
                   {"accuracy": None, "kl": None, "avg_bits": c.avg_bits, "compression": fp_cost.size_bytes / c.size_bytes,
                    "gbops": c.bops / 1e9})
        refined.append({"label": label, "ptq_accuracy": ptq["accuracy"], "refined_accuracy": res.metrics["accuracy"],
                        "ptq_kl": ptq["kl"], "refined_kl": res.metrics.get("kl"), "avg_bits": ptq["avg_bits"],
                        "compression": ptq["compression"], "gbops": ptq["gbops"], "steps": res.steps,
                        "best_step": res.best_step, "seconds": time.perf_counter() - t1})  # fmt: skip
        _log(f"refined {label}: {ptq['accuracy']} -> {res.metrics['accuracy']:.4f}, KL {res.metrics.get('kl')} "
             f"({time.perf_counter() - t1:.0f} s)")
    report = {
        "model": "all-MiniLM-L6-v2 fine-tuned on BBC topics",
        "command": "python -m benchmarks.bench_act " + " ".join(argv if argv is not None else sys.argv[1:]),
        "fp32_accuracy": fp["accuracy"],
        "fp32_gbops": fp_cost.bops / 1e9,
        "evaluation_rows": sum(len(b) for b in search.evaluation),
        "calibration_rows": sum(len(b) for b in search.calibration),
        "kl_seconds": t_kl,
        "points": rows,
        "refined": refined,
        "refine_config": cfg.to_dict(),
        "torch_threads": torch.get_num_threads(),
        "total_seconds": time.perf_counter() - t_all,
    }
    print(f"{'point':<26}{'bits':>6}{'x':>6}{'GBOPs':>8}{'acc':>8}{'KL':>9}")
    for r in rows:
        print(f"{r['label']:<26}{r['avg_bits']:>6.2f}{r['compression']:>6.1f}{r['gbops']:>8.1f}{r['accuracy']:>8.4f}"
              f"{r['kl']:>9.4f}")
    for r in refined:
        print(f"refined {r['label']:<18}: {r['ptq_accuracy']} -> {r['refined_accuracy']:.4f}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
