"""Database engines and schema migrations.

* :func:`make_engine` opens SQLite (WAL mode, a busy timeout, foreign keys on, and explicit
  ``BEGIN`` / ``BEGIN IMMEDIATE`` so write transactions take the write lock up front and never
  fail half-way on a lock upgrade) or PostgreSQL (psycopg 3).
* The schema belongs to the Alembic migrations in ``migrations/`` (version table
  ``bitscout_alembic_version``). :func:`upgrade` applies them; :func:`check_schema` raises
  :class:`SchemaOutOfDate` with the command to run when the database is not at head.
* :func:`prepare_schema` is the start-up rule, the same for SQLite and PostgreSQL: an empty
  database (no bitscout revision, no bitscout table) is migrated at the first start; one at head
  is used as it is; any other (out of date, or bitscout tables without a revision) is refused
  with the command to run, and is never changed behind its operator's back.
* A SQLite database file is created readable by its owner only (0600, its directory 0700), like
  the config file that holds the admin token.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import StaticPool

from service.blobs import make_private_dir
from service.models import VERSION_TABLE
from service.settings import normalize_database_url

log = logging.getLogger(__name__)

#: Execution option that makes a SQLite transaction start with BEGIN IMMEDIATE.
SQLITE_IMMEDIATE = "bitscout_sqlite_immediate"
#: Execution option for single-statement reads on SQLite: no BEGIN (the statement is its own transaction).
SQLITE_NO_BEGIN = "bitscout_sqlite_no_begin"

UPGRADE_HINT = "run `bitscout db upgrade` (with the same database URL) to bring it to the current version"


class SchemaOutOfDate(RuntimeError):
    """The database schema is not at the migrations' head."""

    def __init__(self, current: str | None, head: str | None) -> None:
        self.current = current
        self.head = head
        where = "empty (no bitscout tables)" if current is None else f"at revision {current}"
        super().__init__(
            f"the database schema is {where}, but this version of bitscout needs {head}: {UPGRADE_HINT}"
        )


def migrations_dir() -> Path:
    import migrations

    return Path(migrations.__file__).resolve().parent


def make_engine(url: str, *, pool_size: int = 10, echo: bool = False) -> Engine:
    """An engine for ``url`` set up for the store (see the module docstring)."""
    url = normalize_database_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        kwargs: dict[str, Any] = {"connect_args": {"timeout": 60, "check_same_thread": False}}
        if database in ("", ":memory:"):
            kwargs["poolclass"] = StaticPool
        else:
            _create_private_file(Path(database).expanduser())
            kwargs["pool_size"] = max(pool_size, 5)
            kwargs["max_overflow"] = 20
        engine = sa.create_engine(url, echo=echo, **kwargs)
        _setup_sqlite(engine)
        return engine
    return sa.create_engine(
        url,
        echo=echo,
        pool_size=pool_size,
        max_overflow=max(pool_size, 10),
        # No pre-ping (it doubles the round trips of a status poll): a connection that broke (a
        # server restart) is invalidated by the failing statement, answered 503, and replaced.
        pool_recycle=1800,
    )


def _create_private_file(path: Path) -> None:
    """Create the SQLite database file (and its missing directories) readable by its owner only:
    0600, directories 0700. SQLite gives its ``-wal`` and ``-shm`` files the database's mode. An
    existing file keeps the mode its operator gave it."""
    if path.exists():
        return
    make_private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # created meanwhile by another process
        return
    os.close(fd)


def _setup_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy (below) emit BEGIN itself instead of pysqlite's implicit transactions.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        opts = conn.get_execution_options()
        if opts.get(SQLITE_NO_BEGIN, False):
            return
        conn.exec_driver_sql("BEGIN IMMEDIATE" if opts.get(SQLITE_IMMEDIATE, False) else "BEGIN")


# --------------------------------------------------------------------------- alembic


def alembic_config(url: str | None = None, *, connection: sa.Connection | None = None) -> Any:
    """An Alembic ``Config`` for the project's migrations, bound to ``url`` or ``connection``."""
    from alembic.config import Config

    mdir = migrations_dir()
    cfg = Config(str(mdir / "alembic.ini"))
    cfg.set_main_option("script_location", str(mdir))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", normalize_database_url(url).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str | None:
    """The newest migration's revision id."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None: never migrated)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return ctx.get_current_revision()


def check_schema(engine: Engine) -> None:
    """Raise :class:`SchemaOutOfDate` unless the database is at the migrations' head."""
    head = head_revision()
    current = current_revision(engine)
    if current != head:
        raise SchemaOutOfDate(current, head)


def is_empty(engine: Engine) -> bool:
    """True when the database holds no bitscout revision and none of bitscout's tables (other
    applications' tables do not count)."""
    from service.models import Base

    if current_revision(engine) is not None:
        return False
    present = set(sa.inspect(engine).get_table_names())
    return not (present & set(Base.metadata.tables))


def prepare_schema(engine: Engine, *, migrate_empty: bool) -> bool:
    """The start-up rule (see the module docstring): migrate an empty database when
    ``migrate_empty``, then require the schema at head. Returns True when it migrated.

    Raises :class:`SchemaOutOfDate` (its message says to run ``bitscout db upgrade``) for a database
    that is not empty and not at head, or empty while ``migrate_empty`` is False.
    """
    migrated = False
    if migrate_empty and is_empty(engine):
        upgrade(engine)
        migrated = True
    check_schema(engine)
    return migrated


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply the migrations up to ``revision``."""
    from alembic import command

    with engine.begin() as conn:
        command.upgrade(alembic_config(connection=conn), revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Undo migrations down to ``revision`` (``base``: drop everything)."""
    from alembic import command

    with engine.begin() as conn:
        command.downgrade(alembic_config(connection=conn), revision)


def schema_diff(engine: Engine) -> list[Any]:
    """Differences between the ORM models and the database (empty when they agree)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from service.models import Base

    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn, opts={"version_table": VERSION_TABLE, "compare_type": True, "render_as_batch": True}
        )
        return list(compare_metadata(ctx, Base.metadata))
