"""The command line against the real service over a real socket (uvicorn): every command, job
files, exit codes (0 success, 1 a runtime error, 2 bad usage or input, 3 a failed job), one-line
errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import bitscout
from bitscout import cli
from bitscout.commands import COMMANDS
from tests.bitscout.conftest import Service
from tests.bitscout.support import live_server, run_job

TINY_FLAGS = [
    "--task", "sequence_classification", "--method", "kl", "--max-avg-bits", "5", "--bits", "2,4,8",
    "--front-points", "4", "--label-field", "label", "--calibration-size", "16", "--evaluation-size", "32",
    "--max-length", "16", "--no-progress",
]  # fmt: skip
SERVER_SPEC = [
    "--model",
    "hf:org/model@" + "a" * 40,
    "--data",
    "dataset:ag_news",
    "--task",
    "sequence_classification",
    "--max-size-mb",
    "10",
]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def env(service: Service, monkeypatch: pytest.MonkeyPatch) -> Any:
    with live_server(service.app) as url:
        monkeypatch.setenv("BITSCOUT_URL", url)
        monkeypatch.setenv("BITSCOUT_TOKEN", service.tokens["alice"])
        yield url


def test_help_of_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    rc, usage, _ = run(capsys, "--help")
    assert rc == 0
    for name in COMMANDS:
        assert f"  {name} " in usage
        rc, out, err = run(capsys, name, "--help")
        assert rc == 0 and err == ""
        assert "example:" in out and f"bitscout {name}" in out and "exit codes" in out
    rc, out, _ = run(capsys)
    assert rc == 2 and "usage: bitscout" in out
    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and out.startswith("bitscout ")


def test_plugins_come_from_entry_points(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from importlib.metadata import EntryPoint

    calls: list[list[str]] = []
    fake = [
        EntryPoint("serve", "tests.bitscout.test_cli:_fake_plugin", "bitscout.commands"),
        EntryPoint("broken", "no_such_module_xyz:main", "bitscout.commands"),
        EntryPoint("status", "no_such_module_xyz:main", "bitscout.commands"),  # a built-in wins
    ]
    monkeypatch.setattr(cli, "entry_points", lambda group: fake)
    monkeypatch.setattr(sys.modules[__name__], "_CALLS", calls, raising=False)
    rc, out, _ = run(capsys, "--help")
    assert "serve" in out and "broken" in out
    assert run(capsys, "serve", "--port", "1")[0] == 7 and calls == [["--port", "1"]]
    rc, _, err = run(capsys, "broken")
    assert rc == 1 and "pip install 'bitscout[workers]'" in one_line_error(err)
    rc, _, err = run(capsys, "nope")
    assert rc == 2 and "unknown command 'nope'" in err
    rc, _, err = run(capsys, "status", "--url", "http://127.0.0.1:9", "--retries", "0", "x")
    assert rc == 1 and "cannot reach" in one_line_error(err)  # a runtime error, not bad usage


_CALLS: list[list[str]] = []


def _fake_plugin(argv: list[str]) -> int:
    _CALLS.append(argv)
    return 7


def test_usage_errors_are_one_line_exit_2(
    env: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for argv, needle in (
        (["submit", "--data", "dataset:x", "--max-size-mb", "1"], "--model is required"),
        (["submit", "--model", "server:m", "--data", "dataset:x"], "a budget is required"),
        (["submit", *SERVER_SPEC, "--bits", "two"], "cannot read bit option"),
        (["submit", *SERVER_SPEC, "--max-size-mb", "-3"], "budget.max_size_mb"),
        (["submit", str(tmp_path / "missing.yaml")], "cannot read the job file"),
        (["status", "--bogus"], "unrecognized arguments"),
        (["resolve", "abc"], "give at least one limit"),
        (["download", "abc", "first", str(tmp_path)], "POINT must be"),
        (["wait"], "required"),
    ):
        rc, out, err = run(capsys, *argv)
        assert rc == 2, (argv, err)
        assert needle in one_line_error(err), (argv, err)
    # an error that names a field names it once (not "model.path: model.path: ...")
    for argv, fld in (
        (["submit", "--model", "server:../x", "--data", "dataset:x", "--max-size-mb", "1", "--task", "embeddings"],
         "model.path"),
        (["submit", *SERVER_SPEC, "--max-size-mb", "-3"], "budget.max_size_mb"),
    ):  # fmt: skip
        rc, _, err = run(capsys, *argv)
        assert rc == 2 and one_line_error(err).count(fld) == 1, err


def test_service_errors_are_one_line(
    env: str, service: Service, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rc, out, _ = run(capsys, "submit", *SERVER_SPEC)
    assert rc == 0
    job_id = out.strip()
    rc, _, err = run(capsys, "status", "0" * 32)
    assert rc == 2 and "no job" in one_line_error(err) and "not_found" in err
    rc, _, err = run(capsys, "submit", *SERVER_SPEC[2:], "--model", "server:nope")
    assert rc == 2 and "model.path" in one_line_error(err)
    assert err.count("model.path") == 1, err  # the field once, not "model.path: model.path: ..."
    rc, _, err = run(capsys, "resolve", job_id, "--max-size-mb", "3", "--retries", "0")
    assert rc == 1 and "unavailable" in one_line_error(err)  # the service cannot answer: a runtime error
    monkeypatch.setenv("BITSCOUT_TOKEN", service.tokens["bob"])
    rc, _, err = run(capsys, "cancel", job_id)
    assert rc == 2 and "no job" in one_line_error(err)
    monkeypatch.setenv("BITSCOUT_TOKEN", "bst_wrong")
    rc, _, err = run(capsys, "status")
    assert rc == 2 and "unknown or revoked token" in one_line_error(err)
    monkeypatch.setenv("BITSCOUT_TOKEN", service.tokens["alice"])
    # a failed job: wait exits 3 with the job's error on one line
    service.store.fail_job(job_id=job_id, worker_id=None, code="out_of_memory", message="ran out of memory")
    rc, out, err = run(capsys, "wait", job_id, "--no-progress")
    assert rc == 3 and "out_of_memory" in one_line_error(err) and "ran out of memory" in err
    rc, out, err = run(capsys, "cancel", job_id)
    assert rc == 2 and "already failed" in one_line_error(err)
    rc, out, _ = run(capsys, "submit", *SERVER_SPEC, "--seed", "4")
    other = out.strip()
    rc, out, _ = run(capsys, "cancel", other)
    assert rc == 0 and "canceled" in out
    rc, out, err = run(capsys, "wait", other, "--no-progress")
    assert rc == 3 and "canceled" in one_line_error(err)
    rc, out, err = run(capsys, "status", other, "--json")
    assert rc == 0 and json.loads(out)["status"] == "canceled"


def test_every_command_end_to_end(
    resolving_service: Service,
    tiny: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = resolving_service
    with live_server(service.app) as url:
        monkeypatch.setenv("BITSCOUT_URL", url)
        monkeypatch.setenv("BITSCOUT_TOKEN", service.tokens["alice"])
        rc, out, err = run(capsys, "submit", "--model", tiny["model"], "--data", tiny["data"], *TINY_FLAGS)
        assert rc == 0, err
        job_id = out.strip()
        assert len(job_id) == 32 and f"submitted job {job_id}" in err
        done: dict[str, Any] = {}
        worker = threading.Thread(
            target=lambda: done.setdefault(
                "run", run_job(service.store, job_id, service.work / "a", stage_delay=0.01)
            )
        )
        worker.start()
        rc, out, err = run(capsys, "wait", job_id, "--poll", "0.05", "--progress")
        worker.join(120)
        assert rc == 0, err
        assert f"job {job_id} succeeded" in out and "recommended point" in out
        assert f"job {job_id[:8]}" in err  # the progress bar

        rc, out, _ = run(capsys, "status", job_id)
        assert rc == 0 and "succeeded" in out and "max_avg_bits=5" in out and "upload:" in out
        rc, out, _ = run(capsys, "status")
        assert rc == 0 and job_id in out and "succeeded" in out
        rc, out, _ = run(capsys, "status", "--json", "--status", "succeeded")
        assert rc == 0 and json.loads(out)["items"][0]["id"] == job_id

        rc, out, _ = run(capsys, "pareto", job_id)
        assert rc == 0 and "metric: accuracy (higher is better)" in out and "*FBA" in out and "uniform" in out
        rc, out, _ = run(capsys, "pareto", job_id, "--json")
        data = json.loads(out)
        rec = data["recommended"]
        assert (
            data["metric"] == "accuracy"
            and data["points"][rec]["recommended"]
            and data["points"][rec]["precision_map"]
        )
        rc, out, _ = run(capsys, "pareto", job_id, "--front", "--json")
        assert all(p["on_front"] for p in json.loads(out)["points"])

        rc, out, err = run(capsys, "resolve", job_id, "--max-avg-bits", "4", "-o", tmp_path / "map.json")
        assert rc == 0, err
        assert "avg bits:" in out and "groups:" in out
        pmap = json.loads((tmp_path / "map.json").read_text())
        assert pmap and all(set(v) == {"bits", "symmetric"} for v in pmap.values())
        rc, out, _ = run(capsys, "resolve", job_id, "--max-avg-bits", "4", "--method", "kl", "--json")
        assert json.loads(out)["cost"]["avg_bits"] <= 4 + 1e-9
        rc, out, err = run(capsys, "resolve", job_id, "--max-avg-bits", "0.01")
        assert rc == 2 and "budget" in one_line_error(err)

        rc, out, err = run(capsys, "download", job_id, "recommended", tmp_path / "dl")
        assert rc == 0, err
        assert (
            Path(out.strip()) == tmp_path / "dl" and (tmp_path / "dl" / "model.quant.safetensors").is_file()
        )
        rc, out, _ = run(capsys, "download", job_id, str(rec), tmp_path / "raw", "--no-extract")
        assert rc == 0 and out.strip().endswith(".tar.gz") and Path(out.strip()).is_file()
        other = next(p["id"] for p in data["points"] if not p["artifact_available"])
        # no workers run here: its export is recorded and the download waits for it up to --timeout
        rc, _, err = run(capsys, "download", job_id, str(other), tmp_path / "none", "--timeout", "0")
        assert rc == 1 and "still being exported as native" in one_line_error(err)
        rc, _, err = run(capsys, "download", job_id, str(other), tmp_path / "none", "--format", "gguf")
        assert rc == 2 and "format must be one of native, compressed-tensors, dense" in one_line_error(err)

        rc, out, _ = run(capsys, "events", job_id)
        assert rc == 0 and "created" in out.splitlines()[0] and "succeeded" in out
        rc, out, _ = run(capsys, "events", job_id, "--json", "--follow", "--poll", "0.01")
        kinds = [json.loads(line)["kind"] for line in out.splitlines()]
        assert kinds[0] == "created" and "succeeded" in kinds
        last = json.loads(out.splitlines()[-2])["id"]
        rc, out, _ = run(capsys, "events", job_id, "--after", str(last), "--json")
        assert len(out.splitlines()) == 1

        # a YAML job file with paths relative to it, and flags that override it; --wait and --json
        folder = tmp_path / "jobs"
        folder.mkdir()
        (folder / "model").symlink_to(tiny["model"], target_is_directory=True)
        (folder / "rows.jsonl").write_text(tiny["data"].read_text())
        (folder / "job.yaml").write_text(
            "model: model\ndata: rows.jsonl\ntask: sequence_classification\nmethods: [kl]\n"
            "budget: {max_avg_bits: 5}\nspace: {bits: [2, 4, 8]}\nfront_points: 4\nseed: 1\n"
            "data_options: {label_field: label, calibration_size: 16, evaluation_size: 32, max_length: 16}\n"
        )
        worker2 = threading.Thread(target=lambda: _run_next(service, tmp_path / "b"))
        worker2.start()
        rc, out, err = run(
            capsys,
            "submit",
            folder / "job.yaml",
            "--seed",
            "3",
            "--wait",
            "--poll",
            "0.05",
            "--json",
            "--no-progress",
        )
        worker2.join(120)
        assert rc == 0, err
        job2 = json.loads(out)
        assert (
            job2["status"] == "succeeded" and job2["spec"]["seed"] == 3 and job2["spec"]["model"]["upload_id"]
        )
        assert "succeeded" in err


def _run_next(service: Service, work: Path) -> None:
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        page = service.store.list_jobs(status="queued")
        if page.items:
            run_job(service.store, page.items[0].id, work)
            return
        time.sleep(0.02)


def test_json_job_file_and_unknown_keys(env: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = tmp_path / "job.json"
    f.write_text(
        json.dumps(
            {
                "model": "hf:org/m@" + "b" * 40,
                "data": "dataset:ag_news",
                "task": "embeddings",
                "budget": {"max_avg_bits": 4},
                "methods": ["kl", "hessian"],
            }
        )
    )
    rc, out, err = run(capsys, "submit", f, "--json")
    assert rc == 0, err
    spec = json.loads(out)["spec"]
    assert (
        spec["methods"] == ["kl", "hessian"]
        and spec["metric"] == "cosine"
        and spec["model"]["hf_id"] == "org/m"
    )
    f.write_text(json.dumps({"model": "x", "data": "y", "budgets": {}}))
    rc, _, err = run(capsys, "submit", f)
    assert rc == 2 and "unknown key(s) budgets" in one_line_error(err)
    f.write_text("{not json")
    rc, _, err = run(capsys, "submit", f)
    assert rc == 2 and "not valid JSON" in one_line_error(err)


def test_the_installed_command_never_shows_a_traceback(env: str, tmp_path: Path) -> None:
    environ = {**os.environ, "BITSCOUT_URL": env}
    for argv, rc in ((["status", "0" * 32], 2), (["submit", "--bits"], 2), (["wait", "--help"], 0)):
        p = subprocess.run(
            [sys.executable, "-m", "bitscout.cli", *argv],
            capture_output=True,
            text=True,
            env=environ,
            timeout=60,
        )
        assert p.returncode == rc, p.stderr
        assert "Traceback" not in p.stderr


def test_submit_asks_for_refinement_and_pareto_marks_refined_points(
    env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = run(capsys, "submit", *SERVER_SPEC, "--refine", "2", "--refine-steps", "30", "--json")
    assert rc == 0, err
    assert json.loads(out)["spec"]["refine"] == {"points": 2, "steps": 30}
    rc, out, err = run(capsys, "submit", *SERVER_SPEC, "--refine", "recommended", "--json")
    assert rc == 0, err
    assert json.loads(out)["spec"]["refine"] == {"points": "recommended", "steps": 200}
    rc, _, err = run(capsys, "submit", *SERVER_SPEC, "--refine", "best")
    assert rc == 2 and "'recommended' or a number" in one_line_error(err)

    from bitscout._front import Front
    from bitscout.commands import front_table
    from bitscout.schemas import ParetoRead

    cost = {"size_bytes": 2e7, "size_mb": 20.0, "avg_bits": 3.0, "bops": 1.0, "latency_ms": 1.0}
    pmap = {"layer.0": {"bits": 3}}
    read = ParetoRead.model_validate({
        "job_id": "j", "metric": "accuracy", "recommended": 1, "points": [
            {"id": 0, "method": "kl", "label": "sweep", "precision_map": pmap, "cost": cost, "metrics": {"accuracy": 0.8}},
            {"id": 1, "method": "kl", "label": "refined", "precision_map": pmap, "cost": cost,
             "metrics": {"accuracy": 0.9}, "refined": True, "refined_from": 0, "recommended": True,
             "artifact_available": True},
        ],
    })  # fmt: skip
    front = Front.from_read(read)
    lines = front_table(front).splitlines()
    assert "R" not in lines[1].split()[1] and "refined" not in lines[1]
    assert lines[2].split()[1] == "*FAR" and "refined from #0" in lines[2]
    assert [r["refined_from"] for r in front.rows()] == [None, 0]


def test_submit_passes_method_options(env: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, out, err = run(capsys, "submit", *SERVER_SPEC, "--method", "kl,hessian", "--option", "hessian.max_probes=32",
                       "--option", "hessian.weighting=rows", "--json")
    assert rc == 0, err
    assert json.loads(out)["spec"]["method_options"] == {"hessian": {"max_probes": 32, "weighting": "rows"}}
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"methods": ["hessian"], "method_options": {"hessian": {"tolerance": 0.1}}}))
    rc, out, err = run(capsys, "submit", str(job), *SERVER_SPEC, "--option", "hessian.max_probes=8", "--json")
    assert rc == 0, err
    assert json.loads(out)["spec"]["method_options"] == {"hessian": {"tolerance": 0.1, "max_probes": 8}}
    rc, _, err = run(capsys, "submit", *SERVER_SPEC, "--option", "hessian.max_probes=8")  # kl only
    assert rc == 2 and "method_options" in one_line_error(err)
    rc, _, err = run(capsys, "submit", *SERVER_SPEC, "--option", "max_probes")
    assert rc == 2 and "METHOD.KEY=VALUE" in one_line_error(err)


def test_exit_codes_are_defined_once() -> None:
    from bitscout import exit_codes
    from bitscout.commands import exit_code_of
    from bitscout.errors import (
        InternalError,
        JobFailed,
        NotFound,
        RateLimited,
        ServiceUnavailable,
        Unauthorized,
    )

    assert (exit_codes.EXIT_OK, exit_codes.EXIT_ERROR, exit_codes.EXIT_USAGE, exit_codes.EXIT_JOB_FAILED) == (0, 1, 2, 3)
    assert exit_code_of(JobFailed("x", job_id="j")) == 3
    assert exit_code_of(bitscout.InvalidRequest("x", field="seed")) == exit_code_of(NotFound("x")) == 2
    assert exit_code_of(Unauthorized("x")) == 2
    for runtime in (ServiceUnavailable("x"), InternalError("x"), RateLimited("x")):
        assert exit_code_of(runtime) == 1
    import importlib

    for module in ("bitscout.cli", "bitscout.commands", "search.cli", "search.export_cli", "service.cli", "workers.cli"):
        m = importlib.import_module(module)
        for name in ("EXIT_OK", "EXIT_USAGE"):
            assert getattr(m, name) is getattr(exit_codes, name), (module, name)
    assert "3 the job failed" in exit_codes.describe()


def test_submit_wait_on_a_job_that_fails_exits_3(
    env: str, service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail_it() -> None:
        import time

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            claimed = service.store.claim_next_job(worker_id="w/fail")
            if claimed is not None:
                service.store.fail_job(job_id=claimed.id, worker_id="w/fail", code="data_invalid",
                                       message="the data has no label")  # fmt: skip
                return
            time.sleep(0.02)

    worker = threading.Thread(target=fail_it)
    worker.start()
    rc, out, err = run(capsys, "submit", *SERVER_SPEC, "--wait", "--poll", "0.05", "--no-progress")
    worker.join(60)
    assert rc == 3, err
    assert "data_invalid" in err and "the data has no label" in err


def test_submit_asks_for_the_fisher_method(env: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "submit", *SERVER_SPEC, "--method", "fisher", "--option", "fisher.weighting=rows",
                       "--option", "fisher.micro_batch=8", "--json")
    assert rc == 0, err
    spec = json.loads(out)["spec"]
    assert spec["methods"] == ["fisher"]
    assert spec["method_options"] == {"fisher": {"weighting": "rows", "micro_batch": 8}}
