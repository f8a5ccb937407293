"""Every method against the oracle: the exhaustive front of a model small enough to evaluate every map.

A tiny BERT (one layer: six linear groups, ``tests.tiny``) is trained on synthetic sentiment; every
precision map of its space (``options ** groups`` maps, full precision counted as an option: bits 2/4/8 give 4^6 = 4,096, or
bits 2/8 with ``--quick`` 3^6 = 729) is
evaluated on the same held-out rows, giving the exact accuracy-vs-size and KL-vs-size fronts. Each
method's points (``kl``, ``hessian``, ``dnas``, ``nsga2`` at the KL sweep's evaluation budget, and the
uniform baselines) are then scored by the hypervolume of their front as a fraction of the exhaustive
front's, with the reference point (largest size, worst metric over every map) shared by all. The search
metric is the KL divergence to the full-precision model (accuracy on this easy task saturates: when
every map scores the same accuracy, its hypervolume is zero and no fraction is reported). The KL front
is scored both on KL and on log10 KL: on the linear scale the few maps with a large KL dominate the
area, the log scale weighs every decade of KL alike.

``python -m benchmarks.bench_oracle [--quick] [--out FILE.json]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

__all__ = ["main", "run"]

#: KL values below this count as this in the log-KL front (full precision has KL 0)
KL_FLOOR = 1e-12


def log(msg: str) -> None:
    print(f"[oracle] {msg}", file=sys.stderr, flush=True)


def _hv(rows: list[tuple[float, float]], reference: tuple[float, float], hib: bool) -> float:
    import numpy as np

    from search.pareto import hypervolume_2d

    if not rows:
        return 0.0
    return hypervolume_2d(np.array(rows, dtype=float), reference, (True, not hib))


def _front_rows(rows: list[tuple[float, float]], hib: bool) -> list[list[float]]:
    from bitscout import rules

    return sorted([float(rows[i][0]), float(rows[i][1])] for i in rules.pareto_front(rows, higher_is_better=hib))


def run(*, quick: bool, seed: int, workdir: Path) -> dict[str, Any]:
    import torch

    from benchmarks.bench_quality import method_available
    from search import methods as registry
    from search.local import DataOptions, prepare
    from search.pipeline import SearchOptions
    from tests.tiny import build_model, sentiment_rows, train_classifier, write_jsonl

    torch.manual_seed(seed)
    torch.set_num_threads(1)  # a tiny model: more threads only add synchronisation (and suffer most under load)
    model_dir = build_model(workdir / "tiny-bert", "bert", layers=1, hidden=32, heads=4, intermediate=64, seed=seed)
    rows = sentiment_rows(800, seed=seed)
    train_classifier(model_dir, rows[:400], steps=80, seed=seed)
    data_file = write_jsonl(workdir / "heldout.jsonl", rows[400:])
    bits = (2, 8) if quick else (2, 4, 8)
    methods = [m for m in ("kl", "hessian", "dnas", "nsga2") if method_available(m) is None]
    skipped = {m: method_available(m) for m in ("kl", "hessian", "dnas", "nsga2") if m not in methods}
    # the search metric is the KL to full precision: on this easy task accuracy saturates (most maps
    # score the same), so a front over accuracy would hold a single map
    opts = SearchOptions(methods=tuple(methods), bits=bits, front_points=8, seq_len=16, seed=seed, metric="kl",
                         method_options={"hessian": {"tolerance": 0.2, "max_probes": 16}})
    data = DataOptions(source=str(data_file), label_field="label", calibration=64, evaluation=128 if quick else 256, max_length=16,
                       batch_size=64)
    search = prepare(model_dir, data, opts, task="sequence_classification", device="cpu")
    space = search.space
    n_maps = 1
    for o in space.options:
        n_maps *= len(o)
    log(f"{len(space.groups)} groups, {n_maps} maps")
    search.baseline()

    t0 = time.perf_counter()
    table: dict[Any, dict[str, float]] = {}
    for choice in itertools.product(*[range(len(o)) for o in space.options]):
        pmap = space.from_choices(choice)
        m = search.evaluate(pmap)
        m["log_kl"] = math.log10(max(m["kl"], KL_FLOOR))
        table[pmap] = m
        if len(table) % 500 == 0:
            log(f"{len(table)}/{n_maps} maps in {time.perf_counter() - t0:.0f}s")
    exhaustive_s = time.perf_counter() - t0
    per_eval = exhaustive_s / len(table)
    log(f"evaluated every map in {exhaustive_s:.0f}s")
    size = {pm: search.cost_model.cost(pm).size_bytes for pm in table}

    metrics = {"accuracy": True, "kl": False, "log_kl": False}
    refs = {
        m: (max(size.values()) * 1.0001,
            min(v[m] for v in table.values()) if hib else max(v[m] for v in table.values()))
        for m, hib in metrics.items()
    }
    exhaustive_hv = {m: _hv([(size[pm], v[m]) for pm, v in table.items()], refs[m], hib) for m, hib in metrics.items()}

    per_method: dict[str, Any] = {}
    kl_distinct: int | None = None

    def score(maps: list[Any], extra: dict[str, Any]) -> dict[str, Any]:
        uniq = list(dict.fromkeys(maps))
        out = {"distinct_maps": len(uniq), **extra}
        for m, hib in metrics.items():
            hv = _hv([(size[pm], table[pm][m]) for pm in uniq], refs[m], hib)
            out[f"hv_{m}"] = hv
            out[f"hv_fraction_{m}"] = hv / exhaustive_hv[m] if exhaustive_hv[m] > 0 else None
        return out

    for m in methods:
        t_m = time.perf_counter()
        try:
            if registry.is_sensitivity(m):
                cands = search.candidates(search.sensitivity(m))
            else:
                kw = {"n_evaluations": kl_distinct} if m == "nsga2" and kl_distinct else {}
                cands = registry.get(m).load()(search, **kw)
            maps = [c.precision_map for c in cands]
            if m == "kl":
                kl_distinct = len(set(maps))
            per_method[m] = score(maps, {"seconds_over_one_evaluation": (time.perf_counter() - t_m) / per_eval})
            log(f"{m}: {per_method[m]}")
        except Exception as exc:  # noqa: BLE001
            skipped[m] = f"failed: {type(exc).__name__}: {exc}"
            log(f"{m} failed\n{traceback.format_exc()}")
    per_method["uniform"] = score([c.precision_map for c in search.uniform_candidates()], {})

    return {
        "part": "oracle",
        "quick": quick,
        "seed": seed,
        "device": "cpu",
        "model": "tiny BERT (1 layer, hidden 32, 4 heads) trained on synthetic sentiment",
        "groups": len(space.groups),
        "options_per_group": len(space.options[0]),
        "bits": list(bits),
        "maps": len(table),
        "evaluation_rows": data.evaluation,
        "fp32": dict(search.baseline()),
        "exhaustive_seconds_per_map": per_eval,
        "reference": {m: list(r) for m, r in refs.items()},
        "exhaustive_hv": exhaustive_hv,
        "methods": per_method,
        "skipped": {k: v for k, v in skipped.items() if v},
        "exhaustive_front": {m: _front_rows([(size[pm], table[pm][m]) for pm in table], hib) for m, hib in metrics.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_oracle", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None, help="unused (accepted for a uniform command line)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="bitscout-oracle-") as tmp:
        out = run(quick=a.quick, seed=a.seed, workdir=Path(tmp))
    text = json.dumps(out, indent=1)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    print(json.dumps({k: out[k] for k in ("maps", "exhaustive_hv", "methods")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
