"""The store: the one class that owns the service's transactions.

Everything the API, the web page and the workers read or write about jobs goes through
:class:`Store`. Every public method is keyword-only, runs in its own transaction (committed when
it returns, rolled back when it raises) and returns wire models from :mod:`bitscout.schemas`, never
ORM rows. Errors are :class:`bitscout.errors.BitscoutError` subclasses (``NotFound``,
``Conflict``, ...), so the API turns them into responses unchanged.

Concurrency: on PostgreSQL, rows that a method changes conditionally are locked with
``SELECT ... FOR UPDATE`` (``SKIP LOCKED`` when claiming); on SQLite, every write transaction
starts with ``BEGIN IMMEDIATE`` and so holds the database's write lock from its first statement.
Either way, no two workers can claim one job, and a worker that lost a job (re-queued as stale,
then claimed by another) can no longer change it: its calls raise :class:`JobNotOwned`.

Job life cycle::

    create_job -> queued --claim_next_job--> running --finish_job--> succeeded
                    ^                          |  \\--fail_job-----> failed
                    |   requeue_stale /        |   \\--mark_canceled-> canceled
                    +---- requeue_running -----+
    request_cancel: queued -> canceled at once; running -> cancel_requested (the worker sees
    heartbeat() return False and calls mark_canceled).

Status changes write job events themselves (``created``, ``claimed``, ``stage``, ``requeued``,
``cancel_requested``, ``canceled``, ``succeeded``, ``failed``); workers add their own with
:meth:`Store.add_event`.

Layout: :class:`Store` is composed of one part per aggregate, each in its own module and each
built on :class:`~service.store._base.StoreBase` (engine, sessions, job locking, row conversion):

* :mod:`service.store.jobs` — jobs, claims, heartbeats, cancellation, recovery, events;
* :mod:`service.store.points` — a finished search's points and front info (``finish_job``);
* :mod:`service.store.artifacts` — points' exported models in the file store;
* :mod:`service.store.exports` — a point's artifact in every format: export requests, their claims,
  their results;
* :mod:`service.store.sensitivities` — search spaces and sensitivity tables;
* :mod:`service.store.uploads` — users' uploads;
* :mod:`service.store.tokens` — API tokens;
* :mod:`service.store.records` — the non-wire values the workers exchange with the store
  (``JobRecord``, ``JobNotOwned``, ``PointRecord``, ``FrontInfo``).

Import everything from this package (``from service.store import Store, JobNotOwned, ...``); the
modules' layout is not part of the contract.
"""

from __future__ import annotations

from service.store._json import json_safe
from service.store.artifacts import ArtifactsMixin
from service.store.exports import EXPORT_RETRY_AFTER_S, ArtifactFile, ExportsMixin
from service.store.jobs import JobsMixin
from service.store.points import PointsMixin
from service.store.records import (
    ExportNotOwned,
    ExportTask,
    FrontInfo,
    JobNotOwned,
    JobRecord,
    PointCost,
    PointOption,
    PointRecord,
)
from service.store.sensitivities import SensitivitiesMixin, space_key_of
from service.store.tokens import TOKEN_PREFIX, Principal, TokenInfo, TokensMixin, hash_token
from service.store.uploads import UploadsMixin

__all__ = [
    "EXPORT_RETRY_AFTER_S",
    "TOKEN_PREFIX",
    "ArtifactFile",
    "ExportNotOwned",
    "ExportTask",
    "FrontInfo",
    "JobNotOwned",
    "JobRecord",
    "PointCost",
    "PointOption",
    "PointRecord",
    "Principal",
    "Store",
    "TokenInfo",
    "hash_token",
    "json_safe",
    "space_key_of",
]


class Store(JobsMixin, PointsMixin, ExportsMixin, ArtifactsMixin, SensitivitiesMixin, UploadsMixin, TokensMixin):
    """Durable record of jobs, events, sensitivities, points, artifacts and their exports, uploads and tokens.

    Args:
        engine: an engine from :func:`service.db.make_engine` (SQLite or PostgreSQL) whose schema
            is at head.
        blob_dir: directory of the content-addressed file store (uploads and artifacts).

    Open one with :meth:`from_settings`; :meth:`close` disposes of its connections. Every public
    method is keyword-only and runs in its own transaction (see the module docstring).
    """
