"""`bitscout search` end to end on a tiny saved model, through the real entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from search.cli import search_main
from search.result import SearchResult


def test_search_command_writes_the_result_and_prints_the_front(tmp_path, trained_bert, sentiment_file, capsys):
    out = tmp_path / "result.json"
    rc = search_main([
        "--model", str(trained_bert), "--data", str(sentiment_file), "--label-field", "label",
        "--method", "kl", "--max-avg-bits", "6", "--calibration", "16", "--evaluation", "32",
        "--max-length", "16", "--front-points", "4", "--out", str(out), "--quiet",
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "uniform" in printed and "* recommended" in printed
    result = SearchResult.from_json(out)
    assert result.front and result.info["recommended"] is not None
    rec = result.points[result.info["recommended"]]
    assert rec.cost.avg_bits <= 6 + 1e-9


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, trained_bert, sentiment_file):
    cmd = [sys.executable, "-m", "bitscout.cli", "search", "--model", str(tmp_path), "--data", str(sentiment_file),
           "--label-field", "label", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "config.json" in proc.stderr
    proc = subprocess.run(cmd[:5] + [str(trained_bert), "--data", str(sentiment_file), "--label-field", "label",
                                     "--max-size-mb", "0.0001", "--calibration", "16", "--evaluation", "32", "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "smallest achievable size" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "bitscout.cli", "search", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "examples:" in proc.stdout and "--option" in proc.stdout


def test_result_json_is_plain_json(tmp_path, trained_bert, sentiment_file):
    out = tmp_path / "r.json"
    search_main(["--model", str(trained_bert), "--data", str(sentiment_file), "--label-field", "label",
                 "--calibration", "8", "--evaluation", "16", "--max-length", "12", "--front-points", "2",
                 "--bits", "4,8", "--out", str(out), "--quiet"])
    data = json.loads(out.read_text())
    assert set(data) >= {"front", "points", "sensitivities", "metric", "space", "versions", "timings"}


def test_method_options_on_the_command_line(tmp_path, trained_bert, sentiment_file, capsys):
    base = ["--model", str(trained_bert), "--data", str(sentiment_file), "--label-field", "label",
            "--calibration", "16", "--evaluation", "32", "--quiet", "--method", "hessian", "--front-points", "3"]
    out = tmp_path / "r.json"
    assert search_main([*base, "--option", "hessian.max_probes=4", "--option", "hessian.min_probes=2",
                        "--option", "hessian.weighting=rows", "--out", str(out)]) == 0
    table = json.loads(out.read_text())["sensitivities"][0]
    assert table["extra"]["weighting"] == "rows" and table["extra"]["max_probes"] == 4
    assert table["extra"]["probes"] <= 4
    capsys.readouterr()
    assert search_main([*base, "--option", "hessian.weighting=diag"]) == 2
    assert "weighting" in capsys.readouterr().err
    assert search_main([*base, "--option", "kl.samples=3"]) == 2
    assert "not among the methods" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        search_main([*base, "--option", "max_probes=4"])
    assert exc.value.code == 2
    assert "METHOD.KEY=VALUE" in capsys.readouterr().err


def test_a_runtime_error_exits_1_on_one_line(tmp_path, trained_bert, sentiment_file, capsys):
    """Input the user can fix exits 2; a failure of the run itself (here: the result cannot be
    written, the path is a directory) exits 1, on one line without a traceback."""
    rc = search_main(["--model", str(trained_bert), "--data", str(sentiment_file), "--calibration-size", "8",
                      "--evaluation-size", "16", "--max-length", "12", "--front-points", "2", "--bits", "4,8",
                      "--max-avg-bits", "8", "--out", str(tmp_path), "--quiet"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 1 and len(err) == 1 and "IsADirectoryError" in err[0] and "Traceback" not in err[0]
    import torch

    if not torch.cuda.is_available():  # asking for a GPU this machine lacks is input the user can fix
        rc = search_main(["--model", str(trained_bert), "--data", str(sentiment_file), "--max-avg-bits", "8",
                          "--device", "cuda", "--quiet"])
        assert rc == 2 and "device" in capsys.readouterr().err
