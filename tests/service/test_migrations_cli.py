"""Migrations agree with the models on both databases; the db and token commands; the admin token."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import sqlalchemy as sa

from service import db
from service.cli import db_main, ensure_admin_token, read_config, token_main
from service.settings import Settings
from service.store import Store
from tests.conftest import require_or_skip
from tests.service.conftest import PgDatabases, pg_reachable


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path, pg_databases: PgDatabases | None) -> str:
    """A brand-new empty database of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    if pg_databases is None:
        require_or_skip(False, pg_reachable()[1])
    assert pg_databases is not None
    return pg_databases.create()


def test_upgrade_from_empty_and_models_agree(empty_url: str) -> None:
    engine = db.make_engine(empty_url)
    try:
        assert db.current_revision(engine) is None
        with pytest.raises(db.SchemaOutOfDate, match="bitscout db upgrade"):
            db.check_schema(engine)
        db.upgrade(engine)
        db.check_schema(engine)
        assert db.current_revision(engine) == db.head_revision()
        assert db.schema_diff(engine) == []
        names = set(sa.inspect(engine).get_table_names())
        assert {
            "jobs",
            "job_events",
            "points",
            "sensitivities",
            "job_spaces",
            "uploads",
            "api_tokens",
        } <= names
        assert "bitscout_alembic_version" in names and "alembic_version" not in names
        db.downgrade(engine, "base")
        assert set(sa.inspect(engine).get_table_names()) <= {"bitscout_alembic_version"}
        db.upgrade(engine)
        assert db.schema_diff(engine) == []
    finally:
        engine.dispose()


def test_single_head_and_scripts_import() -> None:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(db.alembic_config())
    assert len(script.get_heads()) == 1


def test_db_cli(empty_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert db_main(["--database-url", empty_url, "current"]) == 0
    assert "out of date" in capsys.readouterr().out
    assert db_main(["--database-url", empty_url, "check"]) == 1
    assert "bitscout db upgrade" in capsys.readouterr().err
    assert db_main(["--database-url", empty_url, "upgrade"]) == 0
    assert f"-> {db.head_revision()}" in capsys.readouterr().out and db.head_revision() == "0002"
    assert db_main(["--database-url", empty_url, "check"]) == 0
    assert db_main(["--database-url", empty_url, "upgrade"]) == 0  # idempotent
    assert db_main(["--help"]) == 0
    assert db_main(["nonsense"]) == 2


def test_db_and_token_take_the_database_url_before_or_after_the_subcommand(
    empty_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert db_main(["upgrade", "--database-url", empty_url]) == 0
    assert f"empty -> {db.head_revision()}" in capsys.readouterr().out
    assert db_main(["check", "--database-url", empty_url]) == 0
    assert db_main(["current", "--database-url", empty_url]) == 0
    assert "up to date" in capsys.readouterr().out
    # the subcommand's copy wins over the command's
    unreachable = "postgresql://nobody@127.0.0.1:1/nothing"
    assert db_main(["--database-url", unreachable, "check", "--database-url", empty_url]) == 0
    capsys.readouterr()
    assert token_main(["create", "--name", "alice", "--database-url", empty_url]) == 0
    assert capsys.readouterr().out.startswith("bst_")
    assert token_main(["list", "--json", "--database-url", empty_url]) == 0
    assert [t["name"] for t in json.loads(capsys.readouterr().out)] == ["alice"]


def test_a_token_name_that_cannot_be_stored_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    db_main(["upgrade", "--database-url", url])
    capsys.readouterr()
    # an argument with an undecodable byte reaches Python as a lone surrogate (surrogateescape)
    assert token_main(["create", "--name", "al\udcffice", "--database-url", url]) == 2
    assert "--name" in capsys.readouterr().err
    assert token_main(["create", "--name", "a\x00", "--database-url", url]) == 2
    assert "NUL" in capsys.readouterr().err
    assert token_main(["revoke", "--name", "a\x00", "--database-url", url]) == 2
    store = Store(db.make_engine(url), blob_dir=tmp_path / "b")
    try:
        assert store.list_tokens(include_revoked=True) == []
    finally:
        store.close()


def test_the_sqlite_database_and_the_data_dir_are_private(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data" / "bitscout")
    engine = db.make_engine(settings.url)
    try:
        db.upgrade(engine)
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT 1 FROM jobs"))
    finally:
        engine.dispose()
    db_file = settings.data_dir / "bitscout.db"
    assert stat.S_IMODE(db_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(settings.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700  # a missing parent too
    for extra in ("bitscout.db-wal", "bitscout.db-shm"):
        if (settings.data_dir / extra).exists():
            assert stat.S_IMODE((settings.data_dir / extra).stat().st_mode) == 0o600, extra
    store = Store.from_settings(settings)
    try:
        sha, _ = store.blobs.put_bytes(b"weights")
        for d in (settings.blob_dir, settings.blob_dir / "tmp", settings.blob_dir / sha[:2]):
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    finally:
        store.close()
    # a PostgreSQL deployment's data directory (blobs only) is private too
    pg_like = Settings(data_dir=tmp_path / "pg-data", database_url="postgresql://u@h/x")
    from service.blobs import BlobStore

    BlobStore(pg_like.blob_dir).put_bytes(b"x")
    assert stat.S_IMODE(pg_like.data_dir.stat().st_mode) == 0o700


def test_token_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert token_main(["--database-url", url, "list"]) == 1  # a database that cannot be used: a runtime error
    assert "bitscout db upgrade" in capsys.readouterr().err
    db_main(["--database-url", url, "upgrade"])
    capsys.readouterr()
    assert token_main(["--database-url", url, "create", "--name", "alice"]) == 0
    secret = capsys.readouterr().out.strip()
    assert secret.startswith("bst_")
    assert token_main(["--database-url", url, "create", "--name", "ops", "--admin", "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["admin"] is True and created["token"].startswith("bst_")
    assert token_main(["--database-url", url, "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in listed] == ["alice", "ops"] and all("token" not in t for t in listed)
    assert secret not in json.dumps(listed)
    assert token_main(["--database-url", url, "revoke", "--name", "alice"]) == 0
    capsys.readouterr()
    store = Store(db.make_engine(url), blob_dir=tmp_path / "b")
    assert store.verify_token(secret=secret) is None
    assert store.verify_token(secret=created["token"]) is not None
    store.close()
    assert token_main(["--database-url", url, "revoke", "nope"]) == 2
    assert token_main(["--database-url", url, "revoke"]) == 2


def test_entry_points_registered() -> None:
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="bitscout.commands")}
    assert eps.get("db") == "service.cli:db_main" and eps.get("token") == "service.cli:token_main"


def test_ensure_admin_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "conf" / "config.json"
    monkeypatch.setenv("BITSCOUT_CONFIG", str(cfg))
    settings = Settings(data_dir=tmp_path / "data")
    with pytest.raises(db.SchemaOutOfDate):
        ensure_admin_token(settings)
    assert not cfg.exists()
    tok = ensure_admin_token(settings, url="http://127.0.0.1:8123", upgrade=True)
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    assert read_config() == {"token": tok, "url": "http://127.0.0.1:8123"}
    assert ensure_admin_token(settings, url="http://127.0.0.1:9000") == tok  # kept on later starts
    assert read_config()["url"] == "http://127.0.0.1:9000"
    store = Store.from_settings(settings)
    principal = store.verify_token(secret=tok)
    assert principal is not None and principal.admin
    store.revoke_token(token_id=principal.token_id)
    store.close()
    new = ensure_admin_token(settings)
    assert new != tok and read_config()["token"] == new


def test_settings_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITSCOUT_DATA_DIR", str(tmp_path / "d"))
    s = Settings()
    assert s.url == f"sqlite:///{tmp_path / 'd' / 'bitscout.db'}" and s.blob_dir == tmp_path / "d" / "blobs"
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@db.example:5432/bs")
    assert Settings().url == "postgresql+psycopg://u@db.example:5432/bs"
    monkeypatch.setenv("BITSCOUT_DATABASE_URL", "postgres://v@h/x")
    assert Settings().url == "postgresql+psycopg://v@h/x"
    monkeypatch.setenv("BITSCOUT_ALLOWED_HOSTS", "a.example, b.example")
    monkeypatch.setenv("BITSCOUT_MAX_UPLOAD_MB", "12.5")
    s = Settings()
    assert s.allowed_hosts == ["a.example", "b.example"] and s.max_upload_mb == 12.5
    monkeypatch.setenv("BITSCOUT_ALLOWED_HOSTS", '["c.example"]')
    assert Settings().allowed_hosts == ["c.example"]
