"""Fixtures of the workers' tests: one real local Ray for the session, real SQLite / PostgreSQL
databases (the service tests' fixtures), a tiny real model and data under the server's roots.

Ray: ``ray.init(num_cpus=2, include_dashboard=False)`` once per session (started by the first
test that needs it, shut down at the end). Every test gets its own dispatcher id, so a dispatcher
never adopts another test's runners.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray")
pytest.importorskip("sqlalchemy")

from bitscout.schemas import JobRead  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.store import Store  # noqa: E402
from tests.conftest import require_or_skip  # noqa: E402
from tests.service.conftest import (  # noqa: E402,F401 - fixtures
    _truncate,
    pg_databases,
    pg_reachable,
    pg_url,
    sqlite_template,
)
from tests.tiny import build_model, sentiment_rows, write_jsonl  # noqa: E402
from workers.settings import RunnerConfig, WorkerSettings  # noqa: E402

RAY_CPUS = 2


@pytest.fixture(scope="session")
def ray_session() -> Iterator[dict[str, Any]]:
    import ray

    if not ray.is_initialized():
        # address="local": a new Ray of our own, even if a `ray start` cluster runs on this machine
        ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
    ctx = ray.get_runtime_context()
    yield {"address": ctx.gcs_address}
    ray.shutdown()


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``models/bert`` (a tiny BERT classifier), ``models/not-a-model``, ``inputs/sentiment.jsonl``."""
    root = tmp_path_factory.mktemp("workers-assets")
    build_model(root / "models" / "bert", "bert", layers=2, hidden=32, heads=4, intermediate=64)
    (root / "models" / "not-a-model").mkdir(parents=True)
    (root / "models" / "not-a-model" / "README.md").write_text("no weights here\n")
    write_jsonl(root / "inputs" / "sentiment.jsonl", sentiment_rows(400, seed=3))
    write_jsonl(root / "inputs" / "wrong-fields.jsonl", [{"body": "good movie", "stars": 5}] * 50)
    return root


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def any_db_url(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> str:  # noqa: F811
    """A migrated, empty database of each backend."""
    if request.param == "sqlite":
        return _sqlite_copy(tmp_path, sqlite_template)
    url = request.getfixturevalue("pg_url")
    if url is None:
        require_or_skip(False, pg_reachable()[1])
    _truncate(url)
    return str(url)


def _sqlite_copy(tmp_path: Path, template: Path) -> str:
    path = tmp_path / "bitscout.db"
    shutil.copy(template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:  # noqa: F811
    return _sqlite_copy(tmp_path, sqlite_template)


class Env:
    """A service configuration, its store and workers' settings for one test."""

    def __init__(self, db_url: str, tmp_path: Path, assets: Path) -> None:
        self.settings = Settings(
            database_url=db_url,
            data_dir=tmp_path / "data",
            model_root=assets / "models",
            data_root=assets / "inputs",
        )
        self.store = Store.from_settings(self.settings)
        self.workers = WorkerSettings(
            dispatcher_id=f"test-{uuid.uuid4().hex[:8]}",
            max_concurrent_jobs=2,
            poll_interval_s=0.2,
            heartbeat_interval_s=0.5,
            stale_after_s=30,
            max_attempts=3,
            cancel_grace_s=10,
            eval_workers=1,
            eval_cpus=1.0,
        )
        self.dispatchers: list[Any] = []

    def config(self, **overrides: Any) -> RunnerConfig:
        ws = self.workers.model_copy(update=overrides) if overrides else self.workers
        return RunnerConfig.build(self.settings, ws)

    def dispatcher(self, **overrides: Any) -> Any:
        from workers.dispatcher import Dispatcher

        ws = self.workers.model_copy(update=overrides) if overrides else self.workers
        d = Dispatcher(self.store, RunnerConfig.build(self.settings, ws), ws)
        self.dispatchers.append(d)
        return d

    def submit(self, **overrides: Any) -> JobRead:
        return self.store.create_job(owner="alice", spec=tiny_spec(**overrides))

    def events(self, job_id: str) -> list[Any]:
        return self.store.list_events(job_id=job_id, limit=1000)

    def kinds(self, job_id: str) -> list[str]:
        return [e.kind for e in self.events(job_id)]

    def wait(self, job_id: str, statuses: tuple[str, ...] = ("succeeded", "failed", "canceled"),
             timeout: float = 120.0) -> JobRead:
        deadline = time.monotonic() + timeout
        while True:
            job = self.store.get_job(job_id=job_id)
            if job.status.value in statuses:
                return job
            if time.monotonic() > deadline:
                kinds = [(e.kind, e.message) for e in self.events(job_id)]
                raise AssertionError(f"job {job_id} still {job.status.value} after {timeout} s: {kinds}")
            time.sleep(0.1)

    def wait_event(self, job_id: str, kind: str, *, timeout: float = 60.0,
                   where: Callable[[Any], bool] | None = None) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events(job_id):
                if e.kind == kind and (where is None or where(e)):
                    return e
            if time.monotonic() > deadline:
                raise AssertionError(f"no {kind!r} event for job {job_id} after {timeout} s: {self.kinds(job_id)}")
            time.sleep(0.05)

    def close(self) -> None:
        for d in self.dispatchers:
            d.stop()
        self.store.close()


def tiny_spec(**overrides: Any) -> dict[str, Any]:
    """A job spec (wire form) for the tiny model: KL over layer 0 at 2/4/8 bits, 4 front points."""
    spec: dict[str, Any] = {
        "model": {"path": "bert"},
        "task": "sequence_classification",
        "data": {"path": "sentiment.jsonl", "calibration_size": 16, "evaluation_size": 48, "max_length": 16},
        "methods": ["kl"],
        "space": {"bits": [2, 4, 8], "include": ["*.layer.0.*"]},
        "budget": {"max_avg_bits": 6.0},
        "front_points": 4,
    }
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(spec.get(k), dict):
            spec[k] = {**spec[k], **v}
        else:
            spec[k] = v
    return spec


@pytest.fixture
def env(sqlite_url: str, tmp_path: Path, assets: Path) -> Iterator[Env]:
    e = Env(sqlite_url, tmp_path, assets)
    try:
        yield e
    finally:
        e.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@pytest.fixture
def api(env: Env) -> Iterator[Any]:
    """A ``bitscout.Client`` talking to the real app in-process over ``env``'s store, with the
    resolver the service runs with (``resolve`` answers from the stored tables)."""
    import bitscout
    from service.app import create_app
    from tests.bitscout.support import SyncASGITransport
    from workers.resolver import SearchResolver

    app = create_app(env.settings, store=env.store, resolver=SearchResolver())
    transport = SyncASGITransport(app)
    token = env.store.create_token(name="alice")[1]
    client = bitscout.Client("http://testserver", token, transport=transport, retries=0)
    try:
        yield client
    finally:
        client.close()
        transport.close()
