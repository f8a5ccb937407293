"""The benchmark harness: the report's helpers against brute force, the report on a synthetic results
file, and the orchestrator's handling of failing and missing parts."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest

from benchmarks import report, run
from search.pareto import hypervolume_2d, pareto_mask


def _points(n: int, seed: int) -> list[dict[str, float]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        bits = rng.choice([2.0, 2.5, 3.0, 4.0, 6.0, 8.0]) + rng.random()
        out.append({"method": "kl", "size_bytes": 1e6 * bits, "avg_bits": bits,
                    "metric": round(rng.uniform(0.2, 0.95), 2)})
    return out


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("hib", [True, False])
def test_front_and_hypervolume_match_brute_force(seed: int, hib: bool) -> None:
    pts = _points(30, seed)
    xy = np.array([[p["size_bytes"], p["metric"]] for p in pts])
    mask = pareto_mask(xy, (True, not hib))
    fr = report.front_rows(pts, higher_is_better=hib)
    assert sorted((p["size_bytes"], p["metric"]) for p in fr) == sorted(map(tuple, xy[mask].tolist()))
    ref = (xy[:, 0].max() * 1.1, 0.1 if hib else 1.0)
    expected = hypervolume_2d(xy, ref, (True, not hib))
    assert report.hypervolume_rows(pts, ref, higher_is_better=hib) == pytest.approx(expected, rel=1e-12)

    # brute force on a grid of unit cells: the dominated area, counted cell by cell
    small = [{"size_bytes": float(s), "metric": float(m), "avg_bits": 1.0}
             for s, m in random.Random(seed).sample(list(itertools.product(range(10), range(10))), 6)]
    area = sum(
        1
        for x, y in itertools.product(range(12), range(12))
        if any(p["size_bytes"] <= x and (p["metric"] >= y + 1 if hib else p["metric"] <= y) for p in small)
    )
    ref2 = (12.0, 0.0 if hib else 12.0)
    assert report.hypervolume_rows(small, ref2, higher_is_better=hib) == pytest.approx(area)


def test_metric_at_bits_takes_the_best_point_small_enough() -> None:
    pts = [
        {"size_bytes": 8, "avg_bits": 8.0, "metric": 0.95},
        {"size_bytes": 4, "avg_bits": 4.0, "metric": 0.93},
        {"size_bytes": 3.5, "avg_bits": 3.5, "metric": 0.94},
        {"size_bytes": 3, "avg_bits": 3.0, "metric": 0.80},
        {"size_bytes": 2, "avg_bits": 2.0, "metric": float("nan")},
    ]
    assert report.metric_at_bits(pts, 8.0) == 0.95
    assert report.metric_at_bits(pts, 4.0) == 0.94
    assert report.metric_at_bits(pts, 3.0) == 0.80
    assert report.metric_at_bits(pts, 2.5) is None  # the only 2-bit point has no finite metric
    assert report.metric_at_bits(pts, 4.0, higher_is_better=False) == 0.80


def test_compression_within_one_point() -> None:
    pts = [
        {"size_bytes": 50e6, "avg_bits": 8.0, "metric": 0.951},
        {"size_bytes": 40e6, "avg_bits": 4.0, "metric": 0.941},
        {"size_bytes": 35e6, "avg_bits": 3.0, "metric": 0.939},
    ]
    got = report.compression_within(pts, fp32_metric=0.95, fp32_size=90e6)
    assert got is not None
    assert got["whole_model"] == pytest.approx(90 / 40)
    assert got["quantized_weights"] == pytest.approx(8.0)
    assert got["avg_bits"] == 4.0
    assert report.compression_within(pts, fp32_metric=0.99, fp32_size=90e6) is None
    # lower is better: within 0.01 above
    low = report.compression_within(pts, fp32_metric=0.93, fp32_size=90e6, higher_is_better=False)
    assert low is not None and low["avg_bits"] == 3.0


def test_method_series_adds_refined_points_to_their_method() -> None:
    pts = [{"method": m, "size_bytes": 1.0, "metric": 0.5} for m in ("uniform", "kl", "kl+refine", "nsga2", "hessian")]
    series = report.method_series(pts)
    assert list(series) == ["kl", "kl+refine", "hessian", "nsga2", "uniform"]
    assert [p["method"] for p in series["kl+refine"]] == ["kl", "kl+refine"]


def _synthetic_results() -> dict:
    def cfg(name: str, include_embeddings: bool) -> dict:
        pts = []
        for m, shift in (("kl", 0.0), ("hessian", -0.01), ("nsga2", -0.03)):
            for bits in (2.0, 2.5, 3.0, 4.0, 6.0, 8.0):
                pts.append({"method": m, "refined": False, "label": "sweep", "size_bytes": 30e6 + 5e6 * bits,
                            "avg_bits": bits, "bops": 1.0, "metric": min(0.96, 0.5 + 0.12 * bits) + shift})
        pts.append({"method": "kl+refine", "refined": True, "label": "refined", "size_bytes": 30e6 + 5e6 * 2.5,
                    "avg_bits": 2.5, "bops": 1.0, "metric": 0.93})
        for b in (8, 6, 4, 3, 2):
            pts.append({"method": "uniform", "refined": False, "label": f"uniform {b}-bit",
                        "size_bytes": 30e6 + 5e6 * b, "avg_bits": float(b), "bops": 1.0,
                        "metric": 0.96 if b >= 6 else 0.3 + 0.1 * b})
        return {
            "name": name, "model": "bbc", "model_label": "synthetic model", "task": "sequence_classification",
            "metric": "accuracy", "higher_is_better": True, "granularity": "layer",
            "include_embeddings": include_embeddings, "groups": 36, "options": ["2s", "3s", "fp32"],
            "device": "cpu", "calibration_rows": 8, "evaluation_rows": 16, "max_length": 32,
            "fp32": {"metric": 0.96, "metrics": {"accuracy": 0.96}, "size_bytes": 90e6, "avg_bits": 32.0},
            "eval_unit_seconds": 1.0,
            "methods": {"kl": {"units": 12.0, "distinct_maps": 6, "evaluations": 6},
                        "nsga2": {"units": 7.0, "distinct_maps": 3, "evaluations": 3, "n_evaluations": 6}},
            "skipped": {"dnas": "search.dnas is not available"},
            "refine": {"kl@2.5": {"avg_bits": 2.5, "before": 0.8, "after": 0.93, "steps": 10, "units": 30.0}},
            "points": pts,
        }

    return {
        "schema": 1,
        "meta": {
            "started": "2026-01-01T00:00:00+00:00", "mode": "quick", "seed": 0, "git_commit": "abc",
            "machine": {"cpu_model": "Test CPU", "cores": 2, "platform": "linux", "python": "3.11",
                        "load_average_start": [7.0, 6.0, 5.0], "load_average_end": [6.5, 6.0, 5.0]},
            "versions": {"torch": "2.x"}, "device": {"device": "cpu"},
            "unit_seconds_start": 0.1, "unit_seconds_end": 0.12,
        },
        "parts": {
            "quality": {"status": "ok", "kind": "quality", "seconds": 10.0, "seconds_in_units": 90.0,
                        "data": {"part": "quality", "device": "cpu",
                                 "configs": [cfg("bbc-layer", False), cfg("bbc-layer-embeddings", True)]}},
            "oracle": {"status": "ok", "kind": "oracle", "seconds": 5.0, "data": {
                "part": "oracle", "device": "cpu", "model": "tiny", "groups": 6, "options_per_group": 4,
                "bits": [2, 4, 8], "maps": 4096, "evaluation_rows": 64, "fp32": {"accuracy": 1.0, "kl": 0.0},
                "exhaustive_hv": {"accuracy": 0.0, "kl": 1e-4, "log_kl": 2.0},
                "methods": {"kl": {"distinct_maps": 9, "hv_fraction_accuracy": 0.97, "hv_fraction_kl": 0.99},
                            "uniform": {"distinct_maps": 3, "hv_fraction_accuracy": 0.8, "hv_fraction_kl": 0.7}}}},
            "kl": {"status": "ok", "kind": "cost", "seconds": 3.0, "data": {
                "groups": 36, "calibration_sequences": 32, "kl_cost": {"seconds_over_one_forward_pass": 40.0,
                                                                         "naive_units": 181, "ratio_to_naive_time": 0.22,
                                                                         "ratio_to_naive_blocks": 0.4}}},
            "allocate": {"status": "ok", "kind": "cost", "seconds": 3.0, "data": {
                "rows": [{"groups": g, "method": "dp", "seconds": 1e-4 * g} for g in (10, 100, 1000, 10000)]}},
            "hessian": {"status": "failed", "kind": "cost", "error": "exit status 1", "data": None},
            "dnas": {"status": "skipped", "kind": "cost", "reason": "benchmarks.bench_dnas does not exist"},
            "service": {"status": "ok", "kind": "service", "seconds": 20.0, "data": {
                "targets": {"poll_p99_ms": 50.0}, "args": {"workers": 2},
                "results": [{"backend": "sqlite", "submit": {"p50_ms": 3.0, "p99_ms": 9.0},
                             "poll": [{"clients": 8, "per_s": 2000.0, "p50_ms": 3.0, "p99_ms": 11.0, "errors": 0},
                                      {"clients": 32, "per_s": 1500.0, "p50_ms": 16.0, "p99_ms": 60.0, "errors": 0}]}]}},
        },
    }


def test_report_renders_every_section_and_plot(tmp_path: Path) -> None:
    results_file = tmp_path / "results.json"
    results = _synthetic_results()
    results["parts"]["oracle"]["run"] = {"started": "2026-01-02T03:04:05+00:00", "mode": "full",
                                         "cpu": "Some CPU, 2 cores", "git_commit": "abcdef0123456789"}
    results_file.write_text(json.dumps(results))
    docs = tmp_path / "docs"
    assert report.main(["--results", str(results_file), "--docs", str(docs)]) == 0
    page = (docs / "benchmarks.md").read_text()
    for heading in ("# Benchmarks", "## Headline", "## Quality on real models", "## Against the oracle", "## Cost",
                    "## Service", "## Literature"):
        assert heading in page
    for quote in ("2.3%", "13x", "14.9x", "MiniLM", "BERT-base", "GLUE", "post-training"):
        assert quote in page
    assert "Quick mode" in page and "Loaded machine" in page
    assert "Accuracy is saturated" in page
    assert "Part `hessian` failed: exit status 1" in page
    assert "benchmarks.bench_dnas does not exist" in page
    # NSGA-II spent its budget (the KL sweep's maps) though it returns only its front
    assert "| `nsga2` | 7.0 | 3 | 6 |" in page and "| `kl` | 12.0 | 6 | 6 |" in page
    # each part says which run measured it; one without a stamp says so too
    oracle_row = next(line for line in page.splitlines() if line.startswith("| `oracle` |"))
    assert "| 2026-01-02, full, Some CPU, 2 cores, `abcdef0` |" in oracle_row
    assert "| – |" in next(line for line in page.splitlines() if line.startswith("| `hessian` |"))
    # the kl series: best at <= 2.5 bits is 0.5 + 0.12 * 2.5 = 0.8; with refinement 0.93
    assert "| bbc-layer | `kl` | 0.960 | 0.960 | 0.960 | 0.860 | 0.800 |" in page
    assert "| bbc-layer | `kl+refine` | 0.960 | 0.960 | 0.960 | 0.930 | 0.930 |" in page
    for png in ("quality_bbc-layer.png", "quality_bbc-layer-embeddings.png", "oracle.png", "allocation.png",
                "service.png"):
        data = (docs / "img" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    # generated from the results only: a second run gives the same page
    assert report.render(json.loads(results_file.read_text()), docs) == page


def test_config_summary_hypervolume_fractions() -> None:
    rec = _synthetic_results()["parts"]["quality"]["data"]["configs"][0]
    summ = report.config_summary(rec)
    fracs = {k: v["hv_fraction"] for k, v in summ["series"].items()}
    assert all(0 <= f <= 1 + 1e-12 for f in fracs.values())
    assert fracs["kl+refine"] >= fracs["kl"] > fracs["nsga2"]
    assert math.isclose(max(fracs.values()), 1.0)  # some series makes the best-known front here
    assert summ["series"]["uniform"]["within_1pt"]["avg_bits"] == 6.0


def test_run_part_records_failures_and_missing_modules(tmp_path: Path) -> None:
    missing = run.Part("nope", "benchmarks.bench_does_not_exist")
    rec = run.run_part(missing, quick=True, cache=tmp_path, parts_dir=tmp_path, timeout_s=30)
    assert rec["status"] == "skipped" and "does not exist" in rec["reason"]

    failing = run.Part("report", "benchmarks.report", args=("--results", str(tmp_path / "absent.json")))
    rec = run.run_part(failing, quick=False, cache=tmp_path, parts_dir=tmp_path, timeout_s=120)
    assert rec["status"] == "failed"
    assert rec["returncode"] not in (0, None)
    assert "error" in rec["log_tail"]  # the part's own output is kept


def test_part_command_passes_quick_cache_and_out(tmp_path: Path) -> None:
    quality = next(p for p in run.PARTS if p.name == "quality")
    cmd = run.part_command(quality, quick=True, cache=tmp_path, out=tmp_path / "q.json")
    assert cmd[1:4] == ["-m", "benchmarks.bench_quality", "--quick"]
    assert cmd[-4:] == ["--cache", str(tmp_path), "--out", str(tmp_path / "q.json")]
    service = next(p for p in run.PARTS if p.name == "service")
    cmd = run.part_command(service, quick=True, cache=tmp_path, out=tmp_path / "s.json")
    assert "--quick" not in cmd and "--duration" in cmd and "--cache" not in cmd


def test_machine_info_and_unit() -> None:
    info = run.machine_info()
    assert info["cores"] >= 1 and len(info["load_average_start"]) == 3
    assert run.work_unit_seconds(repeats=1) > 0


@pytest.mark.slow
def test_quality_config_on_a_tiny_model_end_to_end(tmp_path: Path) -> None:
    """The quality part's real code path (the one CUDA takes too, on ``device``) on a tiny BERT: every
    method's points, the uniform baselines, a refined point, and a report built from the record."""
    from benchmarks.bench_quality import QualityConfig, run_config
    from tests.tiny import build_model, sentiment_rows, train_classifier, write_jsonl

    model_dir = build_model(tmp_path / "m", "bert", layers=1, hidden=32, heads=4, intermediate=64)
    rows = sentiment_rows(160)
    train_classifier(model_dir, rows[:80], steps=30)
    data = write_jsonl(tmp_path / "d.jsonl", rows[80:])
    cfg = QualityConfig("tiny-layer", "tiny", "layer", methods=("kl", "nsga2", "no-such-method"),
                        refine_methods=("kl",), refine_bits=(3.0,), model_dir=str(model_dir), data_file=str(data))
    rec = run_config(cfg, cache=tmp_path, quick=True, seed=0, device="cpu", rows=(16, 48, 16))
    methods = {p["method"] for p in rec["points"]}
    assert {"kl", "nsga2", "uniform"} <= methods
    assert "no-such-method" in rec["skipped"]
    assert rec["fp32"]["size_bytes"] > max(p["size_bytes"] for p in rec["points"] if p["method"] == "uniform")
    uniform_bits = sorted(round(p["avg_bits"]) for p in rec["points"] if p["method"] == "uniform")
    assert uniform_bits == [2, 3, 4, 6, 8]
    # equal evaluation budget: nsga2 evaluated as many maps as kl proposed
    assert rec["methods"]["nsga2"]["n_evaluations"] == rec["methods"]["kl"]["distinct_maps"]
    if "refine" not in rec["skipped"]:
        assert any(p["method"] == "kl+refine" and p["refined"] for p in rec["points"])
    results = _synthetic_results()
    results["parts"]["quality"]["data"]["configs"] = [rec]
    page = report.render(results, tmp_path / "docs")
    assert "### tiny-layer" in page and (tmp_path / "docs" / "img" / "quality_tiny-layer.png").is_file()


def test_report_takes_configs_from_every_quality_part_complete_first(tmp_path: Path) -> None:
    results = _synthetic_results()
    main_cfgs = results["parts"]["quality"]["data"]["configs"]
    partial = {**main_cfgs[1], "incomplete": True, "points": main_cfgs[1]["points"][:3]}
    results["parts"]["quality"]["data"]["configs"] = [main_cfgs[0], partial]
    results["parts"]["quality-embeddings"] = {"status": "ok", "kind": "quality",
                                              "data": {"configs": [main_cfgs[1]], "device": "cpu"}}
    page = report.render(results, tmp_path / "docs")
    assert page.count("### bbc-layer-embeddings") == 1
    assert "stopped by its time limit" not in page  # the complete record replaced the partial one


def test_run_merge_keeps_parts_not_rerun(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"schema": 1, "meta": {"started": "earlier"},
                               "parts": {"oracle": {"status": "ok", "kind": "oracle", "data": {"x": 1}}}}))
    # a run of a part that does not exist: recorded as skipped, the earlier part kept
    with pytest.raises(SystemExit):
        run.main(["--only", "no-such-part", "--out", str(out)])
    run.PARTS, saved = (*run.PARTS, run.Part("ghost", "benchmarks.bench_ghost_missing")), run.PARTS
    try:
        assert run.main(["--only", "ghost", "--merge", "--out", str(out), "--no-report"]) == 0
    finally:
        run.PARTS = saved
    merged = json.loads(out.read_text())
    assert merged["parts"]["oracle"]["data"] == {"x": 1}
    assert merged["parts"]["ghost"]["status"] == "skipped"
    assert merged["meta"]["merged_from"] == "earlier"


def test_assets_part_runs_first_and_builds_the_rt_and_uncertainty_classifiers_only_in_full_mode(tmp_path: Path) -> None:
    assert run.PARTS[0].name == "assets"
    part = run.PARTS[0]
    full = run.part_command(part, quick=False, cache=tmp_path, out=tmp_path / "a.json")
    quick = run.part_command(part, quick=True, cache=tmp_path, out=tmp_path / "a.json")
    assert full[1:5] == ["-m", "benchmarks.assets", "--rt", "--uncertainty"]
    assert "--rt" not in quick and "--uncertainty" not in quick and "--quick" not in quick
    for cmd in (full, quick):
        assert cmd[-4:] == ["--cache", str(tmp_path), "--out", str(tmp_path / "a.json")]


def test_report_dnas_section_is_a_table_per_method_with_its_cost_and_plot(tmp_path: Path) -> None:
    results = _synthetic_results()
    points = [{"method": m, "label": "x", "size_mb": 50.0 + b, "avg_bits": b, "accuracy": acc, "kl": 0.1}
              for m, b, acc in (("dnas", 2.0, 0.93), ("dnas", 2.9, 0.95), ("kl", 2.1, 0.92), ("kl", 3.0, 0.94),
                                ("uniform", 2.0, 0.90), ("uniform", 3.0, 0.94))]
    per = {"dnas": {"points": 2, "best_accuracy_at_avg_bits_le_3": 0.95, "best_accuracy_at_avg_bits_le_2.5": 0.93,
                    "best_kl_at_avg_bits_le_3": 0.0134, "best_kl_at_avg_bits_le_2.5": 0.0563, "low_bit_area": 3.244},
           "kl": {"points": 2, "best_accuracy_at_avg_bits_le_3": 0.94, "best_accuracy_at_avg_bits_le_2.5": 0.92,
                  "best_kl_at_avg_bits_le_3": 0.0174, "best_kl_at_avg_bits_le_2.5": 0.0631, "low_bit_area": 3.232}}
    results["parts"]["dnas"] = {"status": "ok", "kind": "cost", "data": {
        "model": "synthetic", "groups": 96, "fp32_accuracy": 0.956,
        "settings": {"calibration": 128, "evaluation": 1000},
        "cost": {"dnas_in_finetune_epochs": 2.37, "target_epochs": 3.0,
                 "sensitivity_in_finetune_epochs": {"kl": 28.2}},
        "memory": {"ratio_step_peak_above_loaded": 1.01, "target_ratio": 1.5},
        "low_bit_end": {"per_method": per}, "points": points}}
    docs = tmp_path / "docs"
    (docs / "img").mkdir(parents=True)
    page = report.render(results, docs)
    section = page[page.index("### DNAS"):page.index("### Refinement")]
    assert "| dnas | 2 | 0.950 | 0.930 | 0.0134 | 0.0563 | 3.244 |" in section
    assert "| kl | 2 | 0.940 | 0.920 | 0.0174 | 0.0631 | 3.232 |" in section
    assert "DNAS 2.37 (target ≤ 3); kl table 28.2" in section and "1.01× a plain fine-tuning step" in section
    assert "![dnas](img/dnas.png)" in section
    assert (docs / "img" / "dnas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_cost_parts_are_tables_a_reader_reads_not_dumps(tmp_path: Path) -> None:
    results = _synthetic_results()
    parts = results["parts"]
    parts["assets"] = {"status": "ok", "kind": "cost", "data": {"models": {
        "bbc": {"seconds": 0.2, "built": False, "heldout_accuracy": 0.958, "heldout_rows": 1425, "train_rows": 800},
        "rt": {"seconds": 181.0, "built": True, "heldout_accuracy": 0.778, "heldout_rows": 10808, "train_rows": 2000}}}}
    parts["hessian"] = {"status": "ok", "kind": "cost", "data": {
        "model": "m", "task": "embeddings", "loss": "self_distillation", "granularity": "layer", "groups": 36,
        "batches": 2, "batch_size": 8, "max_length": 32, "threads": 1, "m": 24.0, "stopped": "tolerance",
        "cost_units": 150.4, "cost_units_wall": 160.0, "cost_target_units": 172.0, "hvp_units_per_probe": 6.5,
        "graph_units_per_pass": 3.4, "kendall_tau": 0.95, "reference_probes": 200, "relative_error_median": 0.04,
        "relative_error_max": 0.2, "groups_under_tolerance": 30, "tolerance": 0.05}}
    parts["refine"] = {"status": "ok", "kind": "cost", "data": {
        "model": "m", "maps_from": "kl", "train_rows": 800, "validation_rows": 128, "evaluation_rows": 600,
        "fp32_accuracy": 0.955, "target": "avg 3 bits: within 1 point", "target_met": True,
        "points": [{"target_avg_bits": 2.5, "avg_bits": 2.5, "ptq_accuracy": 0.932, "refined_accuracy": 0.957,
                    "ptq_kl": 0.0525, "refined_kl": 0.0346, "steps": 125, "best_step": 50, "refine_epochs": 5.34}]}}
    parts["workers"] = {"status": "ok", "kind": "cost", "data": {
        "model": "m", "in_process_mean_s": 100.0, "service_cold": {"seconds": 120.0}, "service_warm": {"seconds": 102.0},
        "service_parallel_eval": {"seconds": 80.0}, "orchestration_fraction_cold": 0.15,
        "orchestration_fraction_warm": 0.012, "overhead_fraction_warm": 0.0196,
        "targets": {"overhead_fraction": 0.05, "submit_to_running_s": 2.0},
        "submit_to_running": {"to_running": {"p50_s": 0.31, "max_s": 0.9}, "to_runner_start": {"p50_s": 0.5}}}}
    parts["allocate"] = {"status": "ok", "kind": "cost", "data": {
        "rows": [{"groups": g, "options": 6, "ours_one_ms": 0.01 * g, "milp_one_ms": 0.5 * g,
                  "ours_front32_ms": 0.2 * g, "milp_front32_ms": 16.0 * g, "milp_front32_estimated": g > 100,
                  "ours_one_gap_max": 0.0, "ours_front32_gap_max": 1e-4, "ours_vs_milp_one": 0.0}
                 for g in (10, 100, 1000)],
        "summary": {"one_budget_10000_ms": 40.0, "front32_10000_ms": 700.0, "max_certified_gap": 1e-4,
                    "targets_met": True},
        "targets": {"one_budget_10000_ms": 100.0, "front32_10000_ms": 1000.0, "gap": 0.001}}}
    docs = tmp_path / "docs"
    (docs / "img").mkdir(parents=True)
    page = report.render(results, docs)
    cost = page[page.index("## Cost"):page.index("## Service")]
    assert "| rt | built | 181 | 2000 | 10808 | 0.778 |" in cost
    assert "| bbc | found up to date | 0 | 800 | 1425 | 0.958 |" in cost
    assert "| probes per batch (Hutchinson), stopped by | 24, tolerance |" in cost
    assert "150 (target ≤ 172 = 4 + 7 m)" in cost and "0.950 (200 probes per batch" in cost
    assert "| 2.5 | 2.50 | 0.932 | 0.957 | 0.0525 | 0.0346 | 125 (50) | 5.34 |" in cost and "**met**" in cost
    # workers: wall time over the in-process mean; the parallel run is faster than in-process
    assert "| service, warm | 1.020 | 0.012 |" in cost and "| service, cold (first job: Ray starts a worker) | 1.200 | 0.150 |" in cost
    assert "| service, parallel evaluation (1 extra Ray task) | 0.800 | – |" in cost
    assert "p50 0.31 s, max 0.90 s (target ≤ 2 s)" in cost
    # allocation: the MILP's time over ours, per size; estimated MILP fronts are marked
    assert "| 10 | 6 | 0.1 | 5.0 | 50× | 2.0 | 160.0 | 80× | 0.0001 | 0 |" in cost
    assert "16000.0 (est.)" in cost and "targets met" in cost
    # none of the curated parts falls back to the dump of scalars
    assert "| figure | value |\n|---|---|\n| `" not in cost
    assert (docs / "img" / "allocation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_full_quality_config_runs_in_exactly_one_part() -> None:
    from benchmarks.bench_quality import configs_for

    full = [c.name for c in configs_for(False)]
    quick = [c.name for c in configs_for(True)]
    ran_full: list[str] = []
    ran_quick: list[str] = []
    for part in run.PARTS:
        if part.module != "benchmarks.bench_quality":
            continue
        args = list(part.args)
        ran_full += args[args.index("--configs") + 1:]
        if part.in_quick:
            qargs = list(part.quick_args or ())
            ran_quick += qargs[qargs.index("--configs") + 1:]
    assert sorted(ran_full) == sorted(full)  # each once, none missing, none unknown
    assert sorted(ran_quick) == sorted(quick)


def test_quality_configs_flag_refuses_unknown_names(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import bench_quality

    with pytest.raises(SystemExit) as exc:
        bench_quality.main(["--quick", "--configs", "bbc-layr", "--out", "/nonexistent/x.json"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown configuration(s) bbc-layr" in err and "bbc-layer" in err


def test_literature_bottom_line_names_each_configuration_against_the_bound() -> None:
    line = report._bottom_line({"a": 0.8, "b": -1.0, "c": 4.6})
    assert "2 of 3 configurations stay within Q-BERT's 2.3-point bound" in line
    assert "a (0.8 points below full precision); b (1.0 points above full precision)" in line
    assert "noise of the held-out rows" in line and "Beyond it: c (4.6 points below full precision)" in line
    assert "no configuration stays within" in report._bottom_line({"c": 4.6})
    assert report._drop_text(0.01) == "level with full precision"


def test_run_merge_keeps_earlier_figures_when_the_rerun_has_none(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"schema": 1, "meta": {"started": "earlier"},
                               "parts": {"ghost": {"status": "ok", "kind": "cost", "data": {"x": 1}}}}))
    run.PARTS, saved = (*run.PARTS, run.Part("ghost", "benchmarks.bench_ghost_missing")), run.PARTS
    try:
        run.main(["--only", "ghost", "--merge", "--out", str(out), "--no-report"])
    finally:
        run.PARTS = saved
    ghost = json.loads(out.read_text())["parts"]["ghost"]
    assert ghost["data"] == {"x": 1} and ghost["status"] == "ok"
    assert ghost["rerun"]["status"] == "skipped" and "does not exist" in ghost["rerun"]["reason"]
    # nor when the run's time limit is spent before the part starts
    run.PARTS = (*saved, run.Part("ghost", "benchmarks.bench_ghost_missing"))
    try:
        run.main(["--only", "ghost", "--merge", "--out", str(out), "--no-report", "--total-limit", "1"])
    finally:
        run.PARTS = saved
    ghost = json.loads(out.read_text())["parts"]["ghost"]
    assert ghost["data"] == {"x": 1} and ghost["status"] == "ok"
    assert ghost["rerun"] == {"status": "skipped", "reason": "the run's time limit was spent"}


def test_run_stamps_each_part_with_its_own_run_and_leaves_merged_parts_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a part that really runs: a module that writes its figures where --out says
    (tmp_path / "bench_stamp_probe.py").write_text(
        "import json, sys\nout = sys.argv[sys.argv.index('--out') + 1]\nopen(out, 'w').write(json.dumps({'x': 2}))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    out = tmp_path / "results.json"
    earlier = {"status": "ok", "kind": "cost", "data": {"x": 1}, "seconds": 100.0, "seconds_in_units": 5000.0,
               "run": {"started": "2026-01-01T00:00:00+00:00", "cpu": "an older machine", "unit_seconds": 0.02}}
    out.write_text(json.dumps({"schema": 1, "meta": {"started": "earlier"}, "parts": {"older": earlier}}))
    run.PARTS, saved = (*run.PARTS, run.Part("probe", "bench_stamp_probe")), run.PARTS
    try:
        assert run.main(["--only", "probe", "--merge", "--out", str(out), "--no-report", "--note", "why"]) == 0
    finally:
        run.PARTS = saved
    parts = json.loads(out.read_text())["parts"]
    probe = parts["probe"]
    assert probe["status"] == "ok" and probe["data"] == {"x": 2}
    stamp = probe["run"]
    assert stamp["mode"] == "full" and stamp["note"] == "why" and stamp["started"][:4].isdigit()
    assert stamp["cpu"].endswith(f"{os.cpu_count()} cores") and stamp["unit_seconds"] > 0
    assert probe["seconds_in_units"] == pytest.approx(probe["seconds"] / stamp["unit_seconds"])
    # the merged part keeps its own run's stamp and its own work units, not this run's
    assert parts["older"] == earlier


def test_report_lists_parts_in_run_order_whatever_order_a_merge_left(tmp_path: Path) -> None:
    results = _synthetic_results()
    results["parts"] = dict(reversed(list(results["parts"].items())))
    results["meta"]["merged_from"] = "2026-01-01T00:00:00+00:00"
    page = report.render(results, tmp_path)
    lines = page.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("| part | status |"))) + 2
    table = lines[start: lines.index("", start)]
    shown = [line.split("`")[1] for line in table]
    order = [x.name for x in run.PARTS]
    assert sorted(shown) == sorted(results["parts"]) and len(shown) >= 3
    assert shown == sorted(shown, key=order.index)
    assert "Of the last run, which merged its parts" in page


def test_report_names_the_quick_parts_of_a_quick_run_merged_into_full_ones(tmp_path: Path) -> None:
    results = _synthetic_results()
    results["parts"]["quality"]["run"] = {"started": "2026-01-01", "mode": "full"}
    results["parts"]["oracle"]["run"] = {"started": "2026-01-02", "mode": "quick"}
    page = report.render(results, tmp_path)
    assert "> **Quick-mode parts.** `oracle` was measured in quick mode" in page and "> **Quick mode.**" not in page
    results["parts"]["quality"]["run"]["mode"] = "quick"
    page = report.render(results, tmp_path)
    assert "> **Quick mode.**" in page and "Quick-mode parts" not in page
