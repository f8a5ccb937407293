"""The peer benchmark (bitscout against NVIDIA ModelOpt): the budget conversion in exact arithmetic, the
translation of ModelOpt's formats, the report's peer section on a synthetic record, the part layout,
and the bitscout side end to end on a tiny model (ModelOpt's side too where its venv exists)."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest

from benchmarks import bench_peer, report, run
from benchmarks.bench_peer import from_peer_target, peer_option, peer_target, peer_weight_bytes

#: all-MiniLM-L6-v2's classifier: 6 blocks of q, k, v, o (384 x 384) and two FFN matrices (384 x 1536)
#: searched; the pooler (384 x 384) and a 5-class head (5 x 384) not
MINILM_S = 6 * (4 * 384 * 384 + 2 * 384 * 1536)
MINILM_X = 384 * 384 + 5 * 384


def test_budget_conversion_is_the_weighted_average_with_excluded_weights_at_16_bits() -> None:
    # three searched weights at 4 bits and one excluded at 16: (12 + 16) / 4 = 7, and back
    assert peer_target(Fraction(4), 3, 1) == 7
    assert from_peer_target(Fraction(7), 3, 1) == 4
    assert MINILM_S == 10_616_832 and MINILM_X == 149_376
    for b in (Fraction(5, 2), Fraction(3), Fraction(4), Fraction(5), Fraction(6), Fraction(16)):
        e = peer_target(b, MINILM_S, MINILM_X)
        assert e == (b * MINILM_S + 16 * MINILM_X) / (MINILM_S + MINILM_X)  # exact: Fractions throughout
        assert from_peer_target(e, MINILM_S, MINILM_X) == b
    # everything at 16 bits is 16 either way; below 16 ModelOpt's figure is the larger one
    assert peer_target(Fraction(16), MINILM_S, MINILM_X) == 16
    assert peer_target(Fraction(4), MINILM_S, MINILM_X) == Fraction(44_857_344, 10_766_208)
    assert peer_target(Fraction(4), MINILM_S, MINILM_X) > 4
    # no excluded weights: the same number
    assert peer_target(Fraction(3), 100, 0) == 3
    # floats agree with the exact value
    assert math.isclose(peer_target(4.0, MINILM_S, MINILM_X), 44_857_344 / 10_766_208, rel_tol=1e-15)
    with pytest.raises(ValueError):
        peer_target(4, 0, 1)


def test_modelopt_formats_translate_to_bitscout_options_and_bytes() -> None:
    from search.space import BitOption

    assert peer_option("INT8_ROW") == (BitOption(8), True)
    assert peer_option("NONE") == (BitOption(16), True)
    opt, kept = peer_option("INT4_B128")
    assert opt.bits == 4 and (kept or opt == BitOption(4))  # 4g128 where group sizes exist, else per row
    assert peer_option("INT3_B128")[0].bits == 3
    with pytest.raises(ValueError):
        peer_option("FP8")
    # 384 x 1536 at INT4 block-128: 4 bits a weight and 12 scales a row, 2 bytes each
    assert peer_weight_bytes(384, 1536, "INT4_B128") == 384 * 1536 // 2 + 2 * 384 * 12
    assert peer_weight_bytes(384, 384, "INT8_ROW") == 384 * 384 + 2 * 384
    assert peer_weight_bytes(384, 384, "NONE") == 2 * 384 * 384
    assert peer_weight_bytes(3, 100, "INT3_B128") == math.ceil(300 * 3 / 8) + 2 * 3  # one partial block a row
    assert [bench_peer.format_bits(f) for f in bench_peer.FORMAT_SETS["int2-int8"]] == [2, 3, 4, 8]


def test_worker_names_formats_and_builds_custom_ones() -> None:
    from benchmarks import peer_modelopt

    assert peer_modelopt.format_label(4, {-1: 128, "type": "static"}) == "INT4_B128"
    assert peer_modelopt.format_label(8, None) == "INT8_ROW"
    cfg = peer_modelopt.custom_format(3, 128)
    wq = next(e for e in cfg["quant_cfg"] if e["quantizer_name"] == "*weight_quantizer")
    assert wq["cfg"] == {"num_bits": 3, "block_sizes": {-1: 128, "type": "static"}} and cfg["algorithm"] == "max"


def _peer_record() -> dict:
    S, X = 3_000_000, 100_000  # noqa: N806

    def pt(b: float, acc: float, kl: float, **kw: object) -> dict:
        return {"avg_bits": b, "size_bytes": 20e6 + S * b / 8, "accuracy": acc, "kl": kl, **kw}

    def peer_pt(budget: float, bits: float, own: tuple[float, float], ours: tuple[float, float]) -> dict:
        return {"budget": budget, "target": peer_target(budget, S, X), "avg_bits": bits,
                "own": {"accuracy": own[0], "kl": own[1], "size_bytes": 20e6 + S * bits / 8 + 1e4},
                "ours": {"accuracy": ours[0], "kl": ours[1], "size_bytes": 20e6 + S * bits / 8, "eval_seconds": 1.0},
                "formats": {"a": "INT4_B128"}}

    return {
        "name": "bbc", "model": "bbc", "model_label": "synthetic classifier", "groups": 36, "bits": [2, 3, 4, 8],
        "calibration_rows": 128, "evaluation_rows": 500, "max_length": 64, "budgets": [3.0, 4.0, 6.0],
        "searched_weights": S, "excluded_weights": X, "excluded_layers": ["bert.pooler.dense", "classifier"],
        "targets": {str(b): peer_target(b, S, X) for b in (3.0, 4.0, 6.0)},
        "fp32": {"accuracy": 0.95, "kl": 0.0, "size_bytes": 90e6}, "eval_unit_seconds": 2.0,
        "finetune_epoch_seconds": 40.0,
        "uniform": [pt(2.0, 0.2, 1.0, label="uniform 2-bit"), pt(3.0, 0.90, 0.05, label="uniform 3-bit"),
                    pt(4.0, 0.94, 0.01, label="uniform 4-bit"), pt(8.0, 0.95, 0.0001, label="uniform 8-bit")],
        "ours": {"kl": {"score_seconds": 80.0, "score_epochs": 2.0, "whole_seconds": 120.0, "whole_epochs": 3.0,
                        "points": [pt(2.98, 0.93, 0.02, budget=3.0), pt(3.99, 0.95, 0.004, budget=4.0),
                                   pt(5.9, 0.95, 0.0005, budget=6.0)]}},
        "peer": {"versions": {"modelopt": "0.47.0"}, "int4_as": "4 bits per row",
                 "infeasible": {"int4-int8": {"3.0": peer_target(3.0, S, X)}},
                 "fp32_logits_max_abs_diff": 2e-6, "cost_denominator_matches": True,
                 "runs": [{"method": "gradient", "format_set": "int4-int8", "score_seconds": 20.0, "score_epochs": 0.5,
                           "auto_quantize_seconds": 30.0, "whole_seconds": 60.0, "whole_epochs": 1.5,
                           "through_ours_eval_seconds": 4.0,
                           "points": [peer_pt(4.0, 4.0, (0.93, 0.012), (0.94, 0.008)),
                                      peer_pt(6.0, 5.6, (0.95, 0.001), (0.95, 0.0009))]},
                          {"method": "kl_div", "format_set": "int4-int8", "error": "RuntimeError: boom"}]},
        "skipped": {"fisher": "no method 'fisher' is registered"},
    }


def test_report_peer_section_puts_both_tools_on_one_axis(tmp_path: Path) -> None:
    from tests.test_benchmarks import _synthetic_results

    results = _synthetic_results()
    results["parts"]["peer"] = {"status": "ok", "kind": "peer", "data": {"part": "peer", "configs": [_peer_record()]}}
    docs = tmp_path / "docs"
    page = report.render(results, docs)
    section = page[page.index("## Against NVIDIA ModelOpt"):page.index("## Against the oracle")]
    # the conversion, stated and applied: (4 * 3e6 + 16 * 1e5) / 3.1e6
    assert "*E = (b·S + 16·X) / (S + X)*" in section and "*b = (E·(S + X) − 16·X) / S*" in section
    assert f"| ModelOpt's target (effective bits) | {peer_target(3.0, 3e6, 1e5):.4f} | {13.6e6 / 3.1e6:.4f} |" in section
    # every series at every budget: accuracy / KL (bits, MB); the best uniform within each budget
    assert "| uniform (widest within the budget) | 0.900 / 0.0500 (3.00 b, 21.1 MB) | 0.940 / 0.0100 (4.00 b, 21.5 MB) " \
           "| 0.940 / 0.0100 (4.00 b, 21.5 MB) |" in section
    assert "| bitscout `kl` | 0.930 / 0.0200 (2.98 b, 21.1 MB) |" in section
    row = next(line for line in section.splitlines() if "`gradient`, INT4 block-128 / INT8, its quantizer" in line)
    assert row.split(" | ")[1].startswith("infeasible (target 3.")
    assert "0.930 / 0.0120 (4.00 b, 21.5 MB)" in row
    via = next(line for line in section.splitlines() if line.startswith("| ModelOpt") and "through bitscout's" in line)
    assert "0.940 / 0.0080 (4.00 b, 21.5 MB)" in via
    assert "`kl_div`, INT4 block-128 / INT8 (failed: RuntimeError: boom)" in section
    assert "4 bits per row" in section and "2.0e-06" in section and "cost denominator equals" in section
    # the costs, in seconds and fine-tuning epochs
    assert "| bitscout `kl` | 80.0 (2.00) | 120.0 (3.00) |" in section
    assert "| ModelOpt `gradient`, INT4 block-128 / INT8 | 20.0 (0.50) | 60.0 (1.50) |" in section
    assert "`fisher`: no method 'fisher' is registered" in section
    png = docs / "img" / "peer_bbc.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "![peer bbc](img/peer_bbc.png)" in section
    assert report.render(results, docs) == page


def test_peer_series_picks_the_widest_uniform_map_within_each_budget() -> None:
    series = {s["name"]: s for s in report.peer_series(_peer_record())}
    uni = series["uniform (widest within the budget)"]["points"]
    assert {b: p["avg_bits"] for b, p in uni.items()} == {3.0: 3.0, 4.0: 4.0, 6.0: 4.0}
    own = series["ModelOpt `gradient`, INT4 block-128 / INT8, its quantizer"]["points"]
    assert "infeasible" in own[3.0] and own[4.0]["accuracy"] == 0.93


def test_every_full_peer_config_runs_in_exactly_one_part() -> None:
    full = sorted(c.name for c in bench_peer.configs_for(False))
    assert full == ["bbc", "rt", "uncertainty"]
    ran = []
    for part in run.PARTS:
        if part.module == "benchmarks.bench_peer":
            args = list(part.args)
            ran += args[args.index("--configs") + 1:]
            assert part.kind == "peer" and part.timeout_s <= 3600
    assert sorted(ran) == full
    quick = next(p for p in run.PARTS if p.name == "peer")
    assert quick.in_quick and "--quick" in (quick.quick_args or ())
    assert [c.name for c in bench_peer.configs_for(True)] == ["bbc"]


def test_peer_venv_requirements_pin_the_cpu_torch_and_bitscouts_transformers() -> None:
    import transformers

    req = bench_peer.peer_requirements("0.47.0")
    assert req == ["nvidia-modelopt==0.47.0", "requests", "torch==2.13.0", f"transformers=={transformers.__version__}"]


def test_peer_venv_is_reused_when_its_marker_matches(tmp_path: Path) -> None:
    venv = tmp_path / "peer-venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    (venv / "bitscout-peer.json").write_text(json.dumps({"requirements": bench_peer.peer_requirements(),
                                                         "versions": {"modelopt": "0.47.0"}}))
    assert bench_peer.peer_venv_ready(tmp_path) and not bench_peer.peer_venv_ready(tmp_path, "0.1.0")
    python, info = bench_peer.ensure_peer_venv(tmp_path)
    assert python == venv / "bin" / "python" and info["created"] is False and info["versions"]["modelopt"] == "0.47.0"


def test_quick_mode_does_not_create_the_peer_venv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Path] = []
    monkeypatch.setattr(bench_peer, "ensure_peer_venv", lambda cache, version: made.append(cache))
    monkeypatch.setattr(bench_peer, "run_config", lambda cfg, **kw: {"name": cfg.name, "peer_skip": kw["peer_skip"],
                                                                     "peer_python": kw["peer_python"]})
    out = tmp_path / "peer.json"
    assert bench_peer.main(["--quick", "--cache", str(tmp_path), "--out", str(out)]) == 0
    (rec,) = json.loads(out.read_text())["configs"]
    assert made == [] and rec["peer_python"] is None and "quick mode does not create" in rec["peer_skip"]


@pytest.mark.slow
def test_peer_config_on_a_tiny_model_end_to_end(tmp_path: Path) -> None:
    """bitscout's side of the peer part on a tiny BERT: uniform maps, each method's map at each budget on
    the conversion's weights; ModelOpt's side too where its venv is in the repository's cache."""
    from benchmarks.bench_peer import PeerConfig, run_config
    from tests.tiny import build_model, sentiment_rows, train_classifier, write_jsonl

    model_dir = build_model(tmp_path / "m", "bert", layers=1, hidden=128, heads=4, intermediate=256)
    rows = sentiment_rows(160)
    train_classifier(model_dir, rows[:80], steps=20)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:80])
    data = write_jsonl(tmp_path / "d.jsonl", rows[80:])
    venv = bench_peer.ROOT / ".cache" / "peer-venv" / "bin" / "python"
    cfg = PeerConfig("tiny", "tiny", budgets=(3.0, 4.0, 6.0), methods=("kl", "no-such-method"),
                     peer_methods=("gradient",), format_sets=("int4-int8",), model_dir=str(model_dir),
                     data_file=str(data), train_file=str(train))
    rec = run_config(cfg, cache=tmp_path, quick=True, rows=(16, 48, 16), epoch_steps=1,
                     peer_python=venv if venv.is_file() else None, peer_skip="no ModelOpt venv in .cache")
    # one block: q, k, v, o (128 x 128) and the FFN (128 x 256, 256 x 128) searched; pooler and head not
    assert rec["searched_weights"] == 4 * 128 * 128 + 2 * 128 * 256
    assert rec["excluded_weights"] == 128 * 128 + 2 * 128
    assert "no-such-method" in rec["skipped"]
    assert sorted(round(u["avg_bits"]) for u in rec["uniform"]) == [2, 3, 4, 8]
    kl = rec["ours"]["kl"]
    assert [p["budget"] for p in kl["points"]] == [3.0, 4.0, 6.0]
    assert all(p["avg_bits"] <= p["budget"] + 1e-9 for p in kl["points"])
    assert kl["whole_seconds"] >= kl["score_seconds"] > 0 and rec["finetune_epoch_seconds"] > 0
    peer = rec["peer"]
    if not venv.is_file():
        assert peer["skipped"] == "no ModelOpt venv in .cache"
        return
    assert peer["cost_denominator_matches"] is True and peer["fp32_logits_max_abs_diff"] < 1e-4
    (grad,) = peer["runs"]
    assert [p["budget"] for p in grad["points"]] == [4.0, 6.0] and "3.0" in peer["infeasible"]["int4-int8"]
    for p in grad["points"]:
        assert p["avg_bits"] <= p["budget"] + 1e-6  # ModelOpt met its target on bitscout's axis too
        assert 0 <= p["own"]["accuracy"] <= 1 and p["ours"]["kl"] >= 0
