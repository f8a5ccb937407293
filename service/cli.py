"""Command-line entry points of the service: ``bitscout db`` and ``bitscout token``, the admin
token that ``bitscout serve`` creates on first start, and a helper that serves the API alone.

Every command takes ``--database-url`` (default: ``BITSCOUT_DATABASE_URL`` / ``DATABASE_URL`` or
the SQLite database in the data directory), before or after its subcommand (``bitscout db
--database-url URL upgrade`` and ``bitscout db upgrade --database-url URL`` are the same). Errors
are one readable line; exit codes are those of :mod:`bitscout.exit_codes` (1 a database that
cannot be used, 2 bad usage). A token's name is stored text: one that holds a NUL character or an
undecodable byte is refused, as the API refuses such strings.

The client config file (``~/.config/bitscout/config.json``, or ``$BITSCOUT_CONFIG``) is JSON:
``{"url": "http://127.0.0.1:8000", "token": "bst_..."}``, readable only by its owner (mode 0600).
The SDK and the CLI read their defaults from it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitscout.errors import BitscoutError
from bitscout.exit_codes import EXIT_ERROR, EXIT_OK, EXIT_USAGE
from service.settings import Settings, default_config_path

if TYPE_CHECKING:
    from service.store import Store


_DATABASE_URL_HELP = "SQLAlchemy URL (default: from the environment or the data dir)"


def _database_url_option(parser: argparse.ArgumentParser, *, subcommand: bool = False) -> None:
    """``--database-url`` on the command and on each subcommand: a subcommand's copy defaults to
    nothing (``SUPPRESS``) so that it never hides the one given before the subcommand."""
    parser.add_argument(
        "--database-url", default=argparse.SUPPRESS if subcommand else None, help=_DATABASE_URL_HELP
    )


def _stored_text(value: str) -> str:
    """An argparse type: text that can be stored (:func:`bitscout.rules.text_problem`)."""
    from bitscout.rules import text_problem

    problem = text_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def _settings(database_url: str | None) -> Settings:
    if database_url:
        return Settings(database_url=database_url)
    return Settings()


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for display
        return "<database>"


# --------------------------------------------------------------------------- db


def db_main(argv: list[str]) -> int:
    """``bitscout db upgrade|current|check``."""
    parser = argparse.ArgumentParser(
        prog="bitscout db",
        description="Manage the service's database schema.",
        epilog="example: bitscout db upgrade --database-url postgresql://postgres@127.0.0.1/bitscout",
    )
    _database_url_option(parser)
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("upgrade", help="apply the migrations up to the newest (or --revision)")
    up.add_argument("--revision", default="head")
    cur = sub.add_parser("current", help="print the database's revision and the newest")
    chk = sub.add_parser("check", help="exit 1 unless the schema is at the newest revision and matches the models")
    for p in (up, cur, chk):
        _database_url_option(p, subcommand=True)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)

    from service import db

    settings = _settings(args.database_url)
    engine = db.make_engine(settings.url)
    try:
        if args.cmd == "upgrade":
            before = db.current_revision(engine)
            db.upgrade(engine, args.revision)
            after = db.current_revision(engine)
            print(f"database {_redact(settings.url)}: {before or 'empty'} -> {after}")
            return EXIT_OK
        head = db.head_revision()
        current = db.current_revision(engine)
        if args.cmd == "current":
            state = "up to date" if current == head else "out of date: run `bitscout db upgrade`"
            print(f"current: {current or 'empty'}\nhead:    {head}\n{state}")
            return EXIT_OK
        # check
        if current != head:
            print(
                f"schema at {current or 'empty'}, head is {head}: run `bitscout db upgrade`", file=sys.stderr
            )
            return EXIT_ERROR
        diff = db.schema_diff(engine)
        if diff:
            print(f"the database differs from the models: {diff}", file=sys.stderr)
            return EXIT_ERROR
        print(f"schema at {head}: up to date")
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - one readable line for the user
        print(f"bitscout db {args.cmd}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- tokens


def _open_store(settings: Settings) -> Store:
    from service import db
    from service.store import Store

    store = Store.from_settings(settings)
    db.check_schema(store.engine)
    return store


def token_main(argv: list[str]) -> int:
    """``bitscout token create --name NAME [--admin]``, ``list``, ``revoke ID|--name NAME``."""
    parser = argparse.ArgumentParser(
        prog="bitscout token",
        description="Manage API tokens. Tokens are stored hashed: a new token is shown once.",
        epilog="example: bitscout token create --name alice",
    )
    _database_url_option(parser)
    sub = parser.add_subparsers(dest="cmd", required=True)
    cr = sub.add_parser("create", help="create a token and print it")
    cr.add_argument(
        "--name", required=True, type=_stored_text, help="the user the token belongs to (jobs are per user)"
    )
    cr.add_argument("--admin", action="store_true", help="an admin token sees every user's jobs")
    cr.add_argument("--json", action="store_true", help="print JSON")
    ls = sub.add_parser("list", help="list tokens (never the secrets)")
    ls.add_argument("--all", action="store_true", help="include revoked tokens")
    ls.add_argument("--json", action="store_true", help="print JSON")
    rv = sub.add_parser("revoke", help="revoke a token by id (or prefix), or every token of --name")
    rv.add_argument("token_id", nargs="?", type=_stored_text, help="the token's id or its shown prefix")
    rv.add_argument("--name", type=_stored_text, help="revoke every token of this user")
    for p in (cr, ls, rv):
        _database_url_option(p, subcommand=True)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    settings = _settings(args.database_url)
    try:
        store = _open_store(settings)
    except Exception as exc:  # noqa: BLE001
        print(f"bitscout token: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        if args.cmd == "create":
            info, secret = store.create_token(name=args.name, admin=args.admin)
            if args.json:
                print(json.dumps({"id": info.id, "name": info.name, "admin": info.admin, "token": secret}))
            else:
                print(secret)
                print(f"(token {info.id} for {info.name}{', admin' if info.admin else ''}; it is not shown again)",
                      file=sys.stderr)  # fmt: skip
            return EXIT_OK
        if args.cmd == "list":
            tokens = store.list_tokens(include_revoked=args.all)
            if args.json:
                print(json.dumps([_token_json(t) for t in tokens], indent=2))
            else:
                print(f"{'id':32}  {'prefix':10}  {'name':20}  admin  created              revoked")
                for t in tokens:
                    print(
                        f"{t.id:32}  {t.prefix:10}  {t.name[:20]:20}  {'yes' if t.admin else 'no ':5}  "
                        f"{t.created_at:%Y-%m-%d %H:%M:%S}  {'' if t.revoked_at is None else f'{t.revoked_at:%Y-%m-%d %H:%M}'}"
                    )
            return EXIT_OK
        if args.cmd == "revoke":
            if (args.token_id is None) == (args.name is None):
                print("bitscout token revoke: give a token id or --name (not both)", file=sys.stderr)
                return EXIT_USAGE
            ids = store.revoke_token(token_id=args.token_id, name=args.name)
            print(f"revoked {len(ids)} token(s): {', '.join(ids)}")
            return EXIT_OK
        return EXIT_USAGE  # pragma: no cover
    except BitscoutError as exc:
        print(f"bitscout token {args.cmd}: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        store.close()


def _token_json(t: Any) -> dict[str, Any]:
    return {
        "id": t.id,
        "name": t.name,
        "prefix": t.prefix,
        "admin": t.admin,
        "created_at": t.created_at.isoformat(),
        "last_used_at": t.last_used_at.isoformat() if t.last_used_at else None,
        "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None,
    }


# --------------------------------------------------------------------------- config file


def read_config(path: Path | None = None) -> dict[str, Any]:
    """The client config file's content ({} when missing or unreadable)."""
    p = path or default_config_path()
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_config(values: dict[str, Any], path: Path | None = None) -> Path:
    """Merge ``values`` into the client config file, created with mode 0600 (directory 0700)."""
    p = path or default_config_path()
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = read_config(p)
    data.update(values)
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, p)
    return p


def server_url(settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> str:
    """How a client on this machine reaches the server."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104 - display only
    return f"http://{shown}:{port}"


def ensure_admin_token(
    settings: Settings,
    *,
    url: str | None = None,
    name: str = "admin",
    config_path: Path | None = None,
    upgrade: bool = False,
) -> str:
    """The admin token the local SDK and CLI use; created on first start.

    If the config file holds a token that is still valid in this database, it is kept (and the
    ``url`` updated); otherwise a new admin token named ``name`` is created and written with
    ``url`` into the config file (mode 0600). Returns the token. The schema must be at head,
    or pass ``upgrade=True`` to apply the migrations first (the embedded first start).
    """
    path = config_path or default_config_path()
    if upgrade:
        prepare_database(settings, upgrade=True)
    store = _open_store(settings)
    try:
        cfg = read_config(path)
        token = cfg.get("token")
        if isinstance(token, str) and store.verify_token(secret=token) is not None:
            if url and cfg.get("url") != url:
                write_config({"url": url}, path)
            return token
        _info, secret = store.create_token(name=name, admin=True)
        values: dict[str, Any] = {"token": secret}
        values["url"] = url or cfg.get("url") or server_url(settings)
        write_config(values, path)
        return secret
    finally:
        store.close()


def prepare_database(settings: Settings, *, upgrade: bool) -> str | None:
    """Bring the database to head (``upgrade=True``) or check that it is there; returns the revision.

    Raises ``service.db.SchemaOutOfDate`` (whose message says to run ``bitscout db upgrade``)
    when the schema is behind and ``upgrade`` is False.
    """
    from service import db

    engine = db.make_engine(settings.url)
    try:
        if upgrade:
            db.upgrade(engine)
        db.check_schema(engine)
        return db.current_revision(engine)
    finally:
        engine.dispose()


def serve_api(
    settings: Settings | None = None, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any
) -> None:
    """Run the API alone with uvicorn (no dispatcher); ``resolver`` may be passed in ``kwargs``."""
    import uvicorn

    from service.app import create_app

    resolver = kwargs.pop("resolver", None)
    app = create_app(settings or Settings(), resolver=resolver)
    uvicorn.run(app, host=host, port=port, log_level=kwargs.pop("log_level", "info"), **kwargs)
