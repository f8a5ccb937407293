"""Recovery and cancellation on a real local Ray: a killed worker, a killed dispatcher, a cancel."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bitscout.schemas import JobStatus
from tests.workers.conftest import Env, wait_until

pytestmark = pytest.mark.ray

#: KL then Hessian over every layer: the Hessian takes a few seconds after the KL table is stored
SLOW = {"methods": ["kl", "hessian"], "space": {"bits": [2, 4, 8], "include": []}}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _kl_stored(e) -> bool:
    return (e.data or {}).get("method") == "kl"


def test_killing_the_runner_requeues_the_job_which_reuses_its_sensitivity_and_finishes_once(ray_session, env: Env):
    job = env.submit(**SLOW)
    env.dispatcher(eval_workers=0).start()
    env.wait_event(job.id, "sensitivity_stored", where=_kl_stored, timeout=90)
    runner = env.wait_event(job.id, "runner")
    pid = runner.data["pid"]
    os.kill(pid, signal.SIGKILL)  # the Ray worker running the job, mid-job (computing the Hessian)

    done = env.wait(job.id, timeout=120)
    assert done.status is JobStatus.succeeded, (done.error_code, done.error_message)
    assert done.attempts == 2
    events = env.events(job.id)
    kinds = [e.kind for e in events]
    assert "worker_lost" in kinds and "requeued" in kinds
    requeued = next(e for e in events if e.kind == "requeued")
    assert "Ray worker died" in requeued.message
    runners = [e for e in events if e.kind == "runner"]
    assert len(runners) == 2 and runners[1].data["pid"] != pid and runners[1].data["attempt"] == 2
    # the KL table was stored once and reused by the second attempt, not recomputed
    stored = [e for e in events if e.kind == "sensitivity_stored"]
    assert [e.data["method"] for e in stored].count("kl") == 1
    reused = [e for e in events if e.kind == "sensitivity_reused"]
    assert [e.data["method"] for e in reused] == ["kl"]
    assert sorted(t["method"] for t in env.store.get_sensitivity_tables(job_id=job.id)) == ["hessian", "kl"]
    # exactly one front stored
    assert kinds.count("succeeded") == 1
    points = env.store.get_points(job_id=job.id)
    assert len(points) == done.n_points
    keys = [(p.method, tuple(sorted((k, v.bits) for k, v in p.precision_map.items()))) for p in points]
    assert len(keys) == len(set(keys))


def test_a_runner_lost_on_every_attempt_fails_the_job_with_the_reason(ray_session, env: Env):
    job = env.submit(**SLOW)
    env.dispatcher(eval_workers=0, max_attempts=1).start()
    runner = env.wait_event(job.id, "runner", timeout=90)
    os.kill(runner.data["pid"], signal.SIGKILL)
    done = env.wait(job.id, timeout=60)
    assert done.status is JobStatus.failed and done.error_code == "internal"
    assert "worker was lost" in done.error_message and "Ray worker died" in done.error_message


def _dispatcher_process(env: Env, ray_address: str, dispatcher_id: str, log: Path) -> subprocess.Popen:
    environ = dict(os.environ)
    environ.update(
        RAY_AUTH_MODE="token",
        BITSCOUT_DISPATCHER_ID=dispatcher_id,
        BITSCOUT_POLL_INTERVAL_S="0.2",
        BITSCOUT_HEARTBEAT_INTERVAL_S="0.5",
        BITSCOUT_EVAL_WORKERS="0",
        BITSCOUT_MAX_CONCURRENT_JOBS="1",
    )
    environ.pop("RAY_ADDRESS", None)
    s = env.settings
    cmd = [
        sys.executable, "-m", "bitscout.cli", "dispatcher", "--database-url", s.url, "--data-dir", str(s.data_dir),
        "--model-root", str(s.model_root), "--data-root", str(s.data_root), "--ray-address", ray_address,
    ]  # fmt: skip
    return subprocess.Popen(cmd, env=environ, stdout=log.open("w"), stderr=subprocess.STDOUT)


def test_restarting_the_dispatcher_loses_no_job_and_runs_none_twice(ray_session, env: Env, tmp_path: Path):
    first = env.submit(**SLOW)
    queued = [env.submit(seed=i) for i in (1, 2)]
    dispatcher_id = env.workers.dispatcher_id
    proc = _dispatcher_process(env, ray_session["address"], dispatcher_id, tmp_path / "dispatcher.log")
    try:
        runner = env.wait_event(first.id, "runner", timeout=90)
        env.wait_event(first.id, "sensitivity_stored", where=_kl_stored, timeout=60)
    except AssertionError:
        proc.kill()
        raise AssertionError((tmp_path / "dispatcher.log").read_text()[-3000:]) from None
    assert all(env.store.get_job(job_id=j.id).status is JobStatus.queued for j in queued)
    proc.send_signal(signal.SIGKILL)  # the dispatcher dies without a word; Ray stops its runner
    proc.wait(timeout=30)
    assert env.store.get_job(job_id=first.id).status is JobStatus.running
    assert wait_until(lambda: not _pid_alive(runner.data["pid"]), timeout=30)

    restarted = env.dispatcher(max_concurrent_jobs=1, eval_workers=0)
    restarted.start()  # same id: re-queues what its previous run left running
    for j in [first, *queued]:
        done = env.wait(j.id, timeout=120)
        assert done.status is JobStatus.succeeded, (done.error_code, done.error_message)
        kinds = env.kinds(j.id)
        assert kinds.count("succeeded") == 1
        assert len(env.store.get_points(job_id=j.id)) == done.n_points
    kinds = env.kinds(first.id)
    assert kinds.count("claimed") == 2 and "requeued" in kinds
    requeued = next(e for e in env.events(first.id) if e.kind == "requeued")
    assert "restarted" in requeued.message
    assert "sensitivity_reused" in kinds
    for j in queued:  # the queued jobs ran exactly once
        assert env.kinds(j.id).count("claimed") == 1
        assert env.store.get_job(job_id=j.id).attempts == 1


def test_stopping_the_dispatcher_requeues_its_running_jobs(ray_session, env: Env):
    job = env.submit(**SLOW)
    d = env.dispatcher(eval_workers=0)
    d.start()
    env.wait_event(job.id, "runner", timeout=90)
    assert d.stop() == [job.id]
    assert env.store.get_job(job_id=job.id).status is JobStatus.queued
    env.dispatcher(eval_workers=0).start()
    assert env.wait(job.id, timeout=120).status is JobStatus.succeeded


def test_cancelling_a_running_job_ends_it_within_seconds_and_frees_its_resources(ray_session, env: Env):
    import ray

    job = env.submit(**SLOW)
    d = env.dispatcher(eval_workers=0).start()
    env.wait_event(job.id, "sensitivity_stored", where=_kl_stored, timeout=90)
    t0 = time.monotonic()
    env.store.request_cancel(job_id=job.id, owner="alice")
    done = env.wait(job.id, statuses=("canceled", "succeeded", "failed"), timeout=20)
    elapsed = time.monotonic() - t0
    assert done.status is JobStatus.canceled and done.error_code == "canceled"
    assert elapsed < 5, elapsed
    kinds = env.kinds(job.id)
    assert "cancel_requested" in kinds and kinds.count("canceled") == 1
    # what was stored stays
    assert [t["method"] for t in env.store.get_sensitivity_tables(job_id=job.id)] == ["kl"]
    assert env.store.get_space(job_id=job.id) is not None
    # its Ray resources are free again
    assert wait_until(lambda: d.handles == {} and ray.available_resources().get("CPU") == 2.0, 15)


def test_cancelling_a_job_waiting_for_resources_drops_it_from_rays_queue(ray_session, env: Env):
    import ray

    @ray.remote(num_cpus=2)
    def hog(seconds: float) -> None:
        time.sleep(seconds)

    blocker = hog.remote(30)
    wait_until(lambda: ray.available_resources().get("CPU", 0) == 0, 10)
    job = env.submit()
    d = env.dispatcher(eval_workers=0, heartbeat_interval_s=0.3).start()
    wait_until(lambda: env.store.get_job(job_id=job.id).status is JobStatus.running, 10)
    time.sleep(1.0)
    j = env.store.get_job(job_id=job.id)
    assert j.status is JobStatus.running and j.message and "waiting for a Ray worker" in j.message
    env.store.request_cancel(job_id=job.id, owner="alice")
    assert env.wait(job.id, timeout=10).status is JobStatus.canceled
    assert d.handles == {}
    ray.cancel(blocker, force=True)
    assert wait_until(lambda: ray.available_resources().get("CPU") == 2.0, 15)
    assert "runner" not in env.kinds(job.id)  # it never ran
