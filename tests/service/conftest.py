"""Fixtures of the service tests: one store contract over SQLite and PostgreSQL.

PostgreSQL: a fresh database ``bitscout_test_<random>`` on 127.0.0.1:5432 (user ``postgres``,
override with ``BITSCOUT_TEST_PG``) is created once per test run, migrated, emptied before each
test and dropped at the end. Where PostgreSQL is unreachable its tests skip with the reason
(a failure under ``BITSCOUT_REQUIRE_ALL=1``).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_or_skip

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")

from service import db  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.store import Store  # noqa: E402

PG_BASE = os.environ.get("BITSCOUT_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
TABLES = ("job_events", "sensitivities", "job_spaces", "point_exports", "points", "jobs", "uploads", "api_tokens")


def _pg_admin_url() -> str:
    return f"{PG_BASE}/postgres"


def pg_reachable() -> tuple[bool, str]:
    try:
        import psycopg
    except ImportError:
        return False, "psycopg is not installed"
    try:
        conninfo = _pg_admin_url().replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(conninfo, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True, ""
    except Exception as exc:  # noqa: BLE001
        return False, f"PostgreSQL unreachable at {PG_BASE}: {type(exc).__name__}: {str(exc).strip()[:200]}"


class PgDatabases:
    """Creates fresh databases and drops them all at the end of the run."""

    def __init__(self) -> None:
        self.created: list[str] = []

    def _admin(self) -> Any:
        import psycopg

        return psycopg.connect(
            _pg_admin_url().replace("postgresql+psycopg://", "postgresql://"), autocommit=True
        )

    def create(self) -> str:
        name = f"bitscout_test_{uuid.uuid4().hex[:12]}"
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return f"{PG_BASE}/{name}"

    def drop_all(self) -> None:
        if not self.created:
            return
        with self._admin() as conn:
            for name in self.created:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.clear()


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[PgDatabases | None]:
    ok, _reason = pg_reachable()
    if not ok:
        yield None
        return
    dbs = PgDatabases()
    try:
        yield dbs
    finally:
        dbs.drop_all()


@pytest.fixture(scope="session")
def pg_url(pg_databases: PgDatabases | None) -> str | None:
    """One migrated PostgreSQL database for the whole run (None when unreachable)."""
    if pg_databases is None:
        return None
    url = pg_databases.create()
    engine = db.make_engine(url)
    try:
        db.upgrade(engine)
    finally:
        engine.dispose()
    return url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite database file, copied for each test."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    engine = db.make_engine(f"sqlite:///{path}")
    try:
        db.upgrade(engine)
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        engine.dispose()
    return path


def _truncate(url: str) -> None:
    engine = db.make_engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> str:
    """A migrated, empty database of each backend."""
    if request.param == "sqlite":
        path = tmp_path / "bitscout.db"
        shutil.copy(sqlite_template, path)
        return f"sqlite:///{path}"
    url = request.getfixturevalue("pg_url")
    if url is None:
        require_or_skip(False, pg_reachable()[1])
    _truncate(url)
    return str(url)


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    (data / "inputs").mkdir(parents=True)
    return Settings(
        database_url=db_url,
        data_dir=data,
        model_root=data / "models",
        data_root=data / "inputs",
        submit_rate_per_min=0,
        upload_rate_per_min=0,
        max_upload_mb=2,
        max_archive_files=16,
        max_archive_unpacked_mb=4,
        token_cache_s=0,
    )


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    st = Store.from_settings(settings)
    try:
        yield st
    finally:
        st.close()


def job_spec(**overrides: Any) -> dict[str, Any]:
    """A valid job spec (wire form)."""
    spec: dict[str, Any] = {
        "model": {"hf_id": "sentence-transformers/all-MiniLM-L6-v2", "revision": "a" * 40},
        "task": "sequence_classification",
        "data": {"dataset": "ag_news"},
        "methods": ["kl"],
        "budget": {"max_size_mb": 10.0},
    }
    spec.update(overrides)
    return spec


def make_points(n: int = 5, *, groups: int = 6, with_uniform: bool = True) -> list[dict[str, Any]]:
    """Points in the form of ``search.result.ParetoPoint.to_dict()``."""
    pts = []
    names = [
        f"bert.encoder.layer.{i // 2}.{'attention.self.query' if i % 2 == 0 else 'output.dense'}"
        for i in range(groups)
    ]
    for i in range(n):
        bits = [2, 3, 4, 6, 8][i % 5]
        pts.append(
            {
                "precision_map": {
                    g: {"bits": bits if j % 2 else max(2, bits - 1), "symmetric": True}
                    for j, g in enumerate(names)
                },
                "cost": {
                    "size_bytes": 4e6 + i * 2e6,
                    "avg_bits": float(bits),
                    "bops": 1e9 * (i + 1),
                    "latency_ms": 1.0 + i,
                },
                "metrics": {"accuracy": 0.5 + 0.08 * i, "kl": 0.5 / (i + 1)},
                "method": "kl",
                "refined": False,
                "label": f"kl #{i}",
                "predicted": 1.0 / (i + 1),
                "budget": {"size_bytes": 4e6 + i * 2e6},
            }
        )
    if with_uniform:
        for bits in (4, 8):
            pts.append(
                {
                    "precision_map": {g: {"bits": bits, "symmetric": True} for g in names},
                    "cost": {
                        "size_bytes": bits * 1.5e6,
                        "avg_bits": float(bits),
                        "bops": 1e9 * bits,
                        "latency_ms": bits / 2,
                    },
                    "metrics": {"accuracy": 0.6 + 0.03 * bits, "kl": 0.1 / bits},
                    "method": "uniform",
                    "label": f"uniform {bits}-bit",
                    "on_front": False,
                }
            )
    return pts
