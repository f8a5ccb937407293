"""``bitscout serve``: one command starts the API, the dispatcher and a local Ray; a job submitted
over REST runs to the end; Ctrl-C stops everything cleanly."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_or_skip
from tests.service.conftest import PgDatabases, pg_reachable
from tests.workers.conftest import tiny_spec

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _call(method: str, url: str, token: str | None = None, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - a local test server
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_serve_runs_a_job_submitted_over_rest_and_stops_on_ctrl_c(tmp_path: Path, assets: Path):
    port = _free_port()
    env = dict(os.environ)
    env.update(XDG_CONFIG_HOME=str(tmp_path / "config"), HF_HUB_OFFLINE="1")
    for k in ("BITSCOUT_CONFIG", "RAY_ADDRESS", "BITSCOUT_RAY_ADDRESS", "DATABASE_URL", "BITSCOUT_DATABASE_URL"):
        env.pop(k, None)
    cmd = [
        sys.executable, "-m", "bitscout.cli", "serve", "--port", str(port), "--data-dir", str(tmp_path / "data"),
        "--model-root", str(assets / "models"), "--data-root", str(assets / "inputs"), "--num-cpus", "2",
        "--eval-workers", "0", "--log-level", "warning",
    ]  # fmt: skip
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if _call("GET", f"{base}/readyz")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        cfg = json.loads((tmp_path / "config" / "bitscout" / "config.json").read_text())
        assert cfg["url"] == base and cfg["token"].startswith("bst_")
        assert oct((tmp_path / "config" / "bitscout" / "config.json").stat().st_mode & 0o777) == "0o600"
        token = cfg["token"]
        status, job = _call("POST", f"{base}/api/v1/jobs", token, tiny_spec())
        assert status == 201, job
        deadline = time.monotonic() + 120
        while job["status"] not in ("succeeded", "failed", "canceled"):
            assert time.monotonic() < deadline, (job, log.read_text()[-3000:])
            time.sleep(0.3)
            job = _call("GET", f"{base}/api/v1/jobs/{job['id']}", token)[1]
        assert job["status"] == "succeeded", job
        status, pareto = _call("GET", f"{base}/api/v1/jobs/{job['id']}/pareto", token)
        assert status == 200 and pareto["points"]
        status, answer = _call("POST", f"{base}/api/v1/jobs/{job['id']}/resolve", token, {"budget": {"max_avg_bits": 5}})
        assert status == 200 and answer["cost"]["avg_bits"] <= 5 + 1e-9
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    out = log.read_text()
    assert code == 0, out[-3000:]
    assert f"bitscout is serving at {base}/" in out and "admin token: saved in" in out
    assert "bitscout serve: stopped" in out and "Traceback" not in out
    # the embedded SQLite database was created and migrated on the first start
    assert "migrated" in out


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_serve_migrates_an_empty_database_of_either_kind_and_refuses_one_out_of_date(
    backend: str, tmp_path: Path, pg_databases: PgDatabases | None, capsys: pytest.CaptureFixture[str]
) -> None:
    """What ``bitscout serve`` and ``bitscout dispatcher`` do with the database before anything else
    (their start-up path, without Ray): the same on SQLite and PostgreSQL."""
    import sqlalchemy as sa

    from bitscout.exit_codes import EXIT_ERROR
    from service import db
    from workers.cli import _start

    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'serve.db'}"
    else:
        if pg_databases is None:
            require_or_skip(False, pg_reachable()[1])
        assert pg_databases is not None
        url = pg_databases.create()
    argv = ["--database-url", url, "--data-dir", str(tmp_path / "data"), "--log-level", "warning"]

    def start(prog: str, migrate_empty: bool) -> Any:
        return _start(argparse.ArgumentParser(prog=prog), argv, migrate_empty=migrate_empty)

    # the dispatcher never migrates: an empty database is refused (a runtime error, exit 1), with the
    # command to run
    assert start("bitscout dispatcher", False) == EXIT_ERROR
    assert "bitscout db upgrade" in capsys.readouterr().err
    # serve's first start migrates the empty database
    assert not isinstance(start("bitscout serve", True), int)
    assert "migrated empty -> " in capsys.readouterr().err
    engine = db.make_engine(url)
    try:
        assert db.current_revision(engine) == db.head_revision() and db.schema_diff(engine) == []
        # at head: used as it is, by both
        assert not isinstance(start("bitscout serve", True), int)
        assert not isinstance(start("bitscout dispatcher", False), int)
        assert "migrated" not in capsys.readouterr().err
        # not empty and out of date: refused by both the same way, and left as it is
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE bitscout_alembic_version SET version_num = '0000'"))
        for prog, migrate in (("bitscout serve", True), ("bitscout dispatcher", False)):
            assert start(prog, migrate) == EXIT_ERROR
            err = capsys.readouterr().err
            assert err.startswith(f"{prog}: ") and "at revision 0000" in err and "bitscout db upgrade" in err
        assert db.current_revision(engine) == "0000"
    finally:
        engine.dispose()
