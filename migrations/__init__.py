"""Alembic migrations of the bitscout service schema (version table ``bitscout_alembic_version``).

Apply with ``bitscout db upgrade``; from a checkout also ``alembic -c migrations/alembic.ini upgrade head``
(the URL comes from ``BITSCOUT_DATABASE_URL`` / ``DATABASE_URL`` or the default SQLite database).
"""
