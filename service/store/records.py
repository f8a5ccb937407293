"""The store's own value types: what workers get from it besides the wire models.

* :class:`JobRecord` — a job as the workers see it (:class:`~bitscout.schemas.JobRead` plus who
  claimed it); :class:`JobNotOwned` — the error a worker gets once the job is no longer its own.
"""

from __future__ import annotations

from bitscout.errors import Conflict
from bitscout.schemas import JobRead

__all__ = ["JobNotOwned", "JobRecord"]


class JobNotOwned(Conflict):
    """The worker calling no longer owns the job (it was re-queued, claimed by another worker,
    canceled or finished): the caller must stop working on it and write nothing more."""


class JobRecord(JobRead):
    """A job as the workers see it: :class:`JobRead` plus who claimed it."""

    claimed_by: str | None = None
    idempotency_key: str | None = None
