"""``bitscout serve`` (the API, the dispatcher and a local Ray in one command) and
``bitscout dispatcher`` (the dispatcher alone, e.g. next to a Ray cluster).

Both read the service's settings (``BITSCOUT_DATA_DIR``, ``DATABASE_URL``...) and the workers'
(``BITSCOUT_MAX_CONCURRENT_JOBS``, ``RAY_ADDRESS``...) from the environment; the options below
override them. Errors are one readable line; exit codes are those of :mod:`bitscout.exit_codes`:
2 for a bad option or setting, 1 for a database, a Ray cluster or a server that cannot be used.

The database: ``bitscout serve`` migrates an empty database (SQLite or PostgreSQL alike) at its
first start; a database that is not empty and not at the newest schema is refused with the
command to run (``bitscout db upgrade``), as ``bitscout dispatcher`` refuses any database not
at the newest schema (it never migrates).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from bitscout.exit_codes import EXIT_ERROR, EXIT_OK, EXIT_USAGE

SERVE_EXAMPLE = """examples:
  bitscout serve                                   # SQLite in ~/.local/share/bitscout, a local Ray
  bitscout serve --port 9000 --model-root ~/models --data-root ~/data
  bitscout serve --ray-address ray-head:6379 --database-url postgresql://bitscout@db/bitscout
"""

DISPATCHER_EXAMPLE = """example:
  bitscout dispatcher --ray-address ray-head:6379 --database-url postgresql://bitscout@db/bitscout
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, help="SQLite database, uploads, artifacts (default: BITSCOUT_DATA_DIR "
                   "or ~/.local/share/bitscout)")
    p.add_argument("--database-url", help="SQLAlchemy URL, e.g. postgresql://user@host/db (default: DATABASE_URL or "
                   "SQLite in the data dir)")
    p.add_argument("--ray-address", help="a Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--model-root", type=Path, help="server-side model paths must lie under this")
    p.add_argument("--data-root", type=Path, help="server-side data paths must lie under this")
    p.add_argument("--max-concurrent-jobs", type=int, help="jobs run at once (default 2)")
    p.add_argument("--eval-workers", type=int, help="Ray actors per job that evaluate maps next to the runner")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _settings(args: argparse.Namespace) -> tuple[Any, Any]:
    from service.settings import Settings
    from workers.settings import WorkerSettings

    svc: dict[str, Any] = {}
    for name in ("data_dir", "database_url", "model_root", "data_root"):
        value = getattr(args, name, None)
        if value is not None:
            svc[name] = value
    wk: dict[str, Any] = {}
    for src, dst in (("ray_address", "ray_address"), ("max_concurrent_jobs", "max_concurrent_jobs"),
                     ("eval_workers", "eval_workers"), ("num_cpus", "ray_num_cpus")):  # fmt: skip
        value = getattr(args, src, None)
        if value is not None:
            wk[dst] = value
    return Settings(**svc), WorkerSettings(**wk)


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return "<database>"


def _prepare_database(settings: Any, *, migrate_empty: bool) -> None:
    """The start-up rule of :func:`service.db.prepare_schema`, the same for SQLite and PostgreSQL:
    an empty database is migrated when ``migrate_empty`` (``bitscout serve``'s first start); any
    database not at head otherwise is refused (``SchemaOutOfDate`` names the command to run)."""
    from service import db

    engine = db.make_engine(settings.url)
    try:
        if db.prepare_schema(engine, migrate_empty=migrate_empty):
            print(f"database {_redact(settings.url)}: migrated empty -> {db.head_revision()}", file=sys.stderr)
    finally:
        engine.dispose()


def _warn_sqlite_on_cluster(prog: str, settings: Any, wsettings: Any) -> None:
    if settings.is_sqlite and wsettings.ray_address and wsettings.ray_address.lower() != "local":
        print(
            f"{prog}: warning: the database is SQLite ({_redact(settings.url)}) but jobs run on the Ray cluster at "
            f"{wsettings.ray_address}: every Ray node must see this file (and {settings.data_dir}); with several "
            "machines use PostgreSQL (--database-url) and a shared data directory",
            file=sys.stderr,
        )


def _logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)


# --------------------------------------------------------------------------- serve


def _start(parser: argparse.ArgumentParser, argv: list[str], *, migrate_empty: bool) -> Any:
    """Parse ``argv``, set up logging, build the settings and check the database: ``(args, settings,
    worker settings)``, or the exit code (after a one-line error naming the command)."""
    _common(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    _logging(args.log_level)
    try:
        settings, wsettings = _settings(args)
    except Exception as exc:  # noqa: BLE001 - a setting out of range: one line for the user
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        _prepare_database(settings, migrate_empty=migrate_empty)
    except Exception as exc:  # noqa: BLE001 - a database that cannot be used: one line for the user
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return args, settings, wsettings


def serve_main(argv: list[str]) -> int:
    """``bitscout serve``: the API, the dispatcher and a local Ray (or ``--ray-address``)."""
    parser = argparse.ArgumentParser(
        prog="bitscout serve",
        description="Run the bitscout service: the REST API and web page, the job dispatcher and Ray.",
        epilog=SERVE_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--no-dispatcher", action="store_true", help="serve the API only (run `bitscout dispatcher` "
                        "elsewhere)")  # fmt: skip
    started = _start(parser, argv, migrate_empty=True)
    if isinstance(started, int):
        return started
    args, settings, wsettings = started

    import uvicorn

    from service.app import create_app
    from service.cli import server_url
    from service.settings import default_config_path
    from workers.resolver import SearchResolver

    url = server_url(settings, args.host, args.port)
    try:
        from service.cli import ensure_admin_token

        ensure_admin_token(settings, url=url)
        app = create_app(settings, resolver=SearchResolver())
    except Exception as exc:  # noqa: BLE001
        print(f"bitscout serve: {exc}", file=sys.stderr)
        return EXIT_ERROR

    dispatcher = None
    ray_info: dict[str, Any] = {}
    if not args.no_dispatcher:
        _warn_sqlite_on_cluster("bitscout serve", settings, wsettings)
        try:
            dispatcher, ray_info = _start_dispatcher(settings, wsettings)
        except Exception as exc:  # noqa: BLE001
            print(f"bitscout serve: cannot start the dispatcher: {type(exc).__name__}: {exc}", file=sys.stderr)
            return EXIT_ERROR

    where_ray = (
        "no dispatcher here" if dispatcher is None
        else f"local Ray ({ray_info['resources'].get('CPU', 0):g} CPUs)" if ray_info.get("local")
        else f"Ray cluster at {ray_info.get('address')}"
    )  # fmt: skip
    print(
        f"bitscout is serving at {url}/  (API {url}/api/v1, docs {url}/api/v1/openapi.json)\n"
        f"  database: {_redact(settings.url)}\n"
        f"  jobs run on: {where_ray}\n"
        f"  admin token: saved in {default_config_path()} (the SDK and the CLI read it from there)\n"
        "  press Ctrl-C to stop",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="on")
    server = uvicorn.Server(config)
    try:
        server.run()
    except KeyboardInterrupt:  # pragma: no cover - uvicorn handles the signal itself
        pass
    finally:
        _stop_dispatcher(dispatcher, ray_info)
    print("bitscout serve: stopped", file=sys.stderr)
    return EXIT_OK


def _start_dispatcher(settings: Any, wsettings: Any) -> tuple[Any, dict[str, Any]]:
    from service.store import Store
    from workers.cluster import init_ray
    from workers.dispatcher import Dispatcher
    from workers.settings import RunnerConfig

    info = init_ray(wsettings)
    store = Store.from_settings(settings)
    dispatcher = Dispatcher(store, RunnerConfig.build(settings, wsettings), wsettings)
    dispatcher.start()
    return dispatcher, info


def _stop_dispatcher(dispatcher: Any, ray_info: dict[str, Any]) -> None:
    if dispatcher is None:
        return
    from workers.cluster import shutdown_ray

    # The runners stop with this process: their jobs go back to the queue now (a re-run reuses
    # the sensitivity tables they stored).
    dispatcher.stop()
    dispatcher.store.close()
    if ray_info.get("local"):
        shutdown_ray()


# --------------------------------------------------------------------------- dispatcher


def dispatcher_main(argv: list[str]) -> int:
    """``bitscout dispatcher``: claim queued jobs and run them on Ray, until interrupted."""
    parser = argparse.ArgumentParser(
        prog="bitscout dispatcher",
        description="Run the job dispatcher alone: it claims queued jobs from the database and runs them on Ray.",
        epilog=DISPATCHER_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    started = _start(parser, argv, migrate_empty=False)
    if isinstance(started, int):
        return started
    args, settings, wsettings = started

    from service.store import Store
    from workers.cluster import init_ray, shutdown_ray
    from workers.dispatcher import Dispatcher
    from workers.settings import RunnerConfig

    _warn_sqlite_on_cluster("bitscout dispatcher", settings, wsettings)
    try:
        info = init_ray(wsettings)
    except Exception as exc:  # noqa: BLE001
        print(f"bitscout dispatcher: cannot connect to Ray: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    store = Store.from_settings(settings)
    dispatcher = Dispatcher(store, RunnerConfig.build(settings, wsettings), wsettings)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    where = "local Ray" if info["local"] else f"Ray cluster at {info['address']}"
    print(f"bitscout dispatcher {wsettings.dispatcher_id}: database {_redact(settings.url)}, {where}; "
          "press Ctrl-C to stop", file=sys.stderr, flush=True)  # fmt: skip
    dispatcher.start()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        dispatcher.stop()
        store.close()
        if info["local"]:
            shutdown_ray()
    print("bitscout dispatcher: stopped", file=sys.stderr)
    return EXIT_OK
