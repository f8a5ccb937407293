"""The bitscout job service: REST API, store, migrations, tokens, uploads and the web status page.

Layout:

* :mod:`service.settings` — ``Settings`` (env prefix ``BITSCOUT_``; ``DATABASE_URL`` honoured).
* :mod:`service.db` — engines (SQLite in WAL mode with ``BEGIN IMMEDIATE`` writes; PostgreSQL via
  psycopg 3), Alembic migrations in ``migrations/`` (version table ``bitscout_alembic_version``),
  ``check_schema`` / ``upgrade``.
* :mod:`service.models` — SQLAlchemy rows; :mod:`service.store` — ``Store``, the one class that owns
  transactions (jobs, events, claims, heartbeats, sensitivities, spaces, points, artifacts,
  uploads, tokens); :mod:`service.blobs` — the file store for uploads and artifacts by checksum.
* :mod:`service.app` — ``create_app(settings, resolver=...)``: the API under ``/api/v1``,
  ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus) and the pages of :mod:`service.web`;
  ``Resolver`` is the protocol the workers implement for ``POST /jobs/{id}/resolve``.
* :mod:`service.uploads` — checks and safe extraction of untrusted uploads; server-side paths.
* :mod:`service.security` — bearer tokens (stored hashed) and rate limits.
* :mod:`service.cli` — ``bitscout db upgrade|current|check``, ``bitscout token create|list|revoke``,
  ``ensure_admin_token`` (the config file the SDK reads) and ``serve_api``.

Run the API alone: ``bitscout db upgrade && uvicorn --factory service.app:app_from_env``.
This package never imports the search library, the workers, torch or Ray.
"""
