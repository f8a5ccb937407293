"""The bitscout job service: REST API, store, migrations, tokens, uploads and the web status page.

Layout:

* :mod:`service.settings` — ``Settings`` (env prefix ``BITSCOUT_``; ``DATABASE_URL`` honoured).
* :mod:`service.db` — engines (SQLite in WAL mode with ``BEGIN IMMEDIATE`` writes; PostgreSQL via
  psycopg 3), Alembic migrations in ``migrations/`` (version table ``bitscout_alembic_version``),
  ``check_schema`` / ``upgrade``.
* :mod:`service.models` — SQLAlchemy rows; :mod:`service.store` — ``Store``, the one class that owns
  transactions, one module per aggregate (jobs and events, points, artifacts, spaces and
  sensitivities, uploads, tokens) behind it; :mod:`service.blobs` — the file store for uploads and
  artifacts by checksum.
* :mod:`service.app` — ``create_app(settings, resolver=...)`` composes the app: the routers of
  :mod:`service.routes` (the API under ``/api/v1``, ``/healthz``, ``/readyz``, ``/metrics``, the web
  pages), the ``Annotated`` dependencies of :mod:`service.deps` (``Resolver`` is the protocol the
  workers implement for ``POST /jobs/{id}/resolve``), the exception handlers of
  :mod:`service.errors`, the middleware of :mod:`service.middleware` and the Prometheus metrics of
  :mod:`service.metrics`.
* :mod:`service.uploads` — checks and safe extraction of untrusted uploads; server-side paths.
* :mod:`service.security` — bearer tokens (stored hashed) and rate limits.
* :mod:`service.cli` — ``bitscout db upgrade|current|check``, ``bitscout token create|list|revoke``,
  ``ensure_admin_token`` (the config file the SDK reads) and ``serve_api``.

Run the API alone: ``bitscout db upgrade && uvicorn --factory service.app:app_from_env``.
This package never imports the search library, the workers, torch or Ray.
"""
