"""A job run by the runner in-process (no Ray) with the closed loop on and off: every stored point
says how it was found, the job's result info says what the loop did, and a bad loop option is
refused when the job is written, naming the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bitscout.methods import provenance_text
from tests.workers.conftest import Env
from workers.runner import JobRunner


def _run(env: Env, job_id: str, worker: str):
    claim = env.store.claim_next_job(worker_id=worker)
    assert claim is not None and claim.id == job_id
    return JobRunner(job_id, worker, env.config(eval_workers=0), store=env.store).run()


def test_a_job_with_the_loop_stores_each_points_provenance(env: Env):
    job = env.submit(methods=["kl"], loop={"rounds": 1, "local_steps": 6, "extra_points": 1})
    out = _run(env, job.id, "w/loop")
    assert out.status == "succeeded", out
    points = env.store.get_points(job_id=job.id)
    assert points and all(p.provenance is not None for p in points)
    for p in points:
        if p.method == "uniform":
            assert p.provenance.reference and provenance_text(p.provenance.model_dump()) == "reference"
        else:
            assert p.provenance.score == "kl" and p.provenance.round is not None
            assert p.provenance.proxy is not None and p.provenance.proxy >= 0
            assert provenance_text(p.provenance.model_dump()).startswith("kl ")
    info = env.store.get_result_info(job_id=job.id)["loop"]
    assert info["enabled"] and info["methods"]["kl"]["proxy_evaluations"] > 0
    assert info["methods"]["kl"]["sweep"]["stopped"]
    pareto = env.store.get_pareto(job_id=job.id)
    assert all(p.provenance is not None for p in pareto.points)


def test_a_job_without_the_loop_keeps_its_first_allocation(env: Env):
    job = env.submit(methods=["kl"], loop={"enabled": False})
    out = _run(env, job.id, "w/open")
    assert out.status == "succeeded", out
    points = env.store.get_points(job_id=job.id)
    kl = [p for p in points if p.method == "kl"]
    assert kl and {p.provenance.round for p in kl} == {0}
    assert not any(p.provenance.local_search or p.provenance.guard for p in kl)
    assert env.store.get_result_info(job_id=job.id)["loop"] == {"enabled": False}


@pytest.mark.parametrize(("loop", "where"), [
    ({"rounds": -1}, "loop.rounds"),
    ({"local_stepz": 3}, "loop.local_stepz"),
    ({"enabled": "yes"}, "loop.enabled"),
])
def test_a_bad_loop_option_is_refused_before_a_job_exists(env: Env, loop, where):
    before = env.store.list_jobs(owner="alice").total
    with pytest.raises(ValidationError) as exc:
        env.submit(methods=["kl"], loop=loop)
    locs = [".".join(str(p) for p in e["loc"]) for e in exc.value.errors()]
    assert locs == [where], locs
    assert env.store.list_jobs(owner="alice").total == before
