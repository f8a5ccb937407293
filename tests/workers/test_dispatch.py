"""Jobs through the real dispatcher and a real local Ray, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitscout.schemas import JobStatus
from tests.workers.conftest import Env, tiny_spec, wait_until

pytestmark = pytest.mark.ray


def test_a_job_goes_from_queued_to_succeeded(ray_session, any_db_url, tmp_path: Path, assets: Path):
    import ray

    env = Env(any_db_url, tmp_path, assets)
    try:
        job = env.submit(methods=["kl"])
        assert job.status is JobStatus.queued
        d = env.dispatcher().start()
        done = env.wait(job.id)
        assert done.status is JobStatus.succeeded, (done.error_code, done.error_message)
        assert done.progress == 1.0 and done.attempts == 1
        pareto = env.store.get_pareto(job_id=job.id)
        methods = {p.method for p in pareto.points}
        assert {"kl", "uniform"} <= methods
        assert done.n_points == len(pareto.points) > 0
        assert any(p.on_front for p in pareto.points)
        assert pareto.recommended is not None and pareto.points[pareto.recommended].meets_budget
        assert pareto.metric == "accuracy" and "accuracy" in pareto.baseline_metrics
        # the points were stored once: ids 0..n-1, one succeeded event
        assert [p.id for p in pareto.points] == list(range(done.n_points))
        kinds = env.kinds(job.id)
        assert kinds.count("succeeded") == 1 and kinds.count("claimed") == 1
        for k in ("created", "claimed", "dispatched", "runner", "loaded", "sensitivity_stored", "evaluated"):
            assert k in kinds, kinds
        stages = [e.stage for e in env.events(job.id) if e.kind == "stage"]
        assert "evaluate" in stages
        # the sensitivity table and the space are stored: resolve can answer new budgets
        assert env.store.get_space(job_id=job.id) is not None
        assert [t["method"] for t in env.store.get_sensitivity_tables(job_id=job.id)] == ["kl"]
        info = env.store.get_result_info(job_id=job.id)
        assert info["methods"] == ["kl"] and "evaluation" in info["timings"]
        # the runner and its evaluation actors are gone: every CPU is free again
        assert wait_until(lambda: d.handles == {} and ray.available_resources().get("CPU") == 2.0, 60)
    finally:
        env.close()


def test_two_jobs_run_at_once_and_several_methods_give_one_front(ray_session, env: Env):
    a = env.submit(methods=["kl", "hessian"])
    b = env.submit(methods=["kl"], seed=1)
    env.dispatcher(max_concurrent_jobs=2, eval_workers=0).start()
    ja, jb = env.wait(a.id), env.wait(b.id)
    assert ja.status is JobStatus.succeeded and jb.status is JobStatus.succeeded, (ja.error_message, jb.error_message)
    pts = env.store.get_points(job_id=a.id)
    assert {"kl", "hessian", "uniform"} <= {p.method for p in pts}
    assert sorted(t["method"] for t in env.store.get_sensitivity_tables(job_id=a.id)) == ["hessian", "kl"]
    # both were running at the same time
    sa = env.store.get_job(job_id=a.id)
    sb = env.store.get_job(job_id=b.id)
    assert sa.started_at is not None and sb.started_at is not None
    assert sb.started_at < sa.finished_at and sa.started_at < sb.finished_at


def test_concurrency_limit_is_respected(ray_session, env: Env):
    jobs = [env.submit(seed=i) for i in range(3)]
    d = env.dispatcher(max_concurrent_jobs=1, eval_workers=0).start()
    seen_max = 0
    import time

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        running = env.store.list_jobs(status="running").total
        seen_max = max(seen_max, running, len(d.handles))
        if all(env.store.get_job(job_id=j.id).status.finished for j in jobs):
            break
        time.sleep(0.05)
    assert seen_max == 1
    assert all(env.store.get_job(job_id=j.id).status is JobStatus.succeeded for j in jobs)


def test_bad_model_and_bad_data_fail_with_their_codes_and_the_dispatcher_carries_on(ray_session, env: Env):
    bad_model = env.submit(model={"path": "not-a-model"})
    bad_data = env.submit(data={"path": "wrong-fields.jsonl"})
    missing_dataset = env.submit(data={"dataset": "no-such-dataset-here", "path": None})
    infeasible = env.submit(budget={"max_avg_bits": 0.5})
    good = env.submit()
    env.dispatcher(max_concurrent_jobs=2, eval_workers=0).start()
    j = env.wait(bad_model.id)
    assert j.status is JobStatus.failed and j.error_code == "model_load_failed"
    assert "config.json" in j.error_message and "Traceback" not in j.error_message
    j = env.wait(bad_data.id)
    assert j.status is JobStatus.failed and j.error_code == "data_invalid"
    assert "text" in j.error_message and "\n" not in j.error_message
    j = env.wait(missing_dataset.id)
    assert j.status is JobStatus.failed and j.error_code == "data_invalid"
    j = env.wait(infeasible.id)
    assert j.status is JobStatus.failed and j.error_code == "budget_infeasible"
    assert "smallest" in j.error_message
    j = env.wait(good.id)
    assert j.status is JobStatus.succeeded


def test_a_job_asking_for_more_than_the_cluster_has_fails_at_once(ray_session, env: Env):
    job = env.submit(resources={"cpus": 64, "gpus": 0})
    gpu = env.submit(resources={"cpus": 1, "gpus": 2})
    env.dispatcher(eval_workers=0).start()
    for j in (job, gpu):
        done = env.wait(j.id, timeout=30)
        assert done.status is JobStatus.failed and done.error_code == "invalid_request"
        assert "Ray cluster" in done.error_message


def test_tiny_spec_is_a_valid_job_spec():
    from bitscout.schemas import JobSpec

    JobSpec.model_validate(tiny_spec())
