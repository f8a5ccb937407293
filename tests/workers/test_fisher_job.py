"""A job asking for the ``fisher`` method, run by the runner in-process (no Ray): its table is stored,
its maps are on the front, and a bad option is refused when the job is written."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bitscout.schemas import JobStatus
from tests.workers.conftest import Env
from workers.runner import JobRunner


def _run(env: Env, job_id: str, worker: str):
    claim = env.store.claim_next_job(worker_id=worker)
    assert claim is not None and claim.id == job_id
    return JobRunner(job_id, worker, env.config(eval_workers=0), store=env.store).run()


def test_a_fisher_job_stores_its_table_and_front(env: Env):
    job = env.submit(methods=["fisher", "kl"], method_options={"fisher": {"weighting": "rows"}})
    out = _run(env, job.id, "w/fisher")
    assert out.status == "succeeded", out
    assert env.store.get_job(job_id=job.id).status is JobStatus.succeeded
    tables = {t.method: t for t in env.store.get_sensitivities(job_id=job.id)}
    assert set(tables) == {"fisher", "kl"}
    fisher = tables["fisher"]
    assert fisher.extra["weighting"] == "rows" and fisher.extra["forwards"] >= 1
    assert all(row["32"] == 0.0 for row in fisher.scores.values())
    assert fisher.scores.keys() == tables["kl"].scores.keys()
    points = env.store.get_points(job_id=job.id)
    assert any(p.method == "fisher" for p in points)


def test_a_bad_fisher_option_is_refused_before_a_job_exists(env: Env):
    """The options are typed in the job spec: a bad one is refused when the job is written, naming
    the option, and no row is stored."""
    before = env.store.list_jobs(owner="alice").total
    with pytest.raises(ValidationError) as exc:
        env.submit(methods=["fisher"], method_options={"fisher": {"labels": "gold"}})
    locs = [".".join(str(p) for p in e["loc"]) for e in exc.value.errors()]
    assert locs == ["method_options.fisher.labels"], locs
    assert env.store.list_jobs(owner="alice").total == before
