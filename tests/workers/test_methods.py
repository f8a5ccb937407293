"""NSGA-II as a job (its trials measured on the calibration proxy, the maps it keeps evaluated in
parallel on Ray) and the resolver behind /resolve."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from bitscout.schemas import JobStatus
from tests.workers.conftest import Env

pytestmark = pytest.mark.ray


def _warm(n: int = 2) -> list[int]:
    """Start ``n`` Ray workers with torch, transformers' BERT and the workers imported, as a
    cluster that has run jobs before has them."""
    import os

    import ray

    @ray.remote(num_cpus=1)
    def warm() -> int:
        import time

        import transformers.models.bert.modeling_bert  # noqa: F401

        import workers.pool  # noqa: F401

        time.sleep(0.5)
        return os.getpid()

    return ray.get([warm.remote() for _ in range(n)])


def test_an_nsga2_job_measures_on_the_proxy_evaluates_in_parallel_and_returns_a_front(ray_session, env: Env):
    _warm()
    job = env.submit(
        methods=["nsga2"],
        front_points=6,  # 24 maps for NSGA-II
        data={"evaluation_size": 160, "max_length": 32},
    )
    env.dispatcher(eval_workers=1, eval_cpus=1.0).start()
    done = env.wait(job.id, timeout=180)
    assert done.status is JobStatus.succeeded, (done.error_code, done.error_message)
    pareto = env.store.get_pareto(job_id=job.id)
    nsga = [p for p in pareto.points if p.method == "nsga2"]
    assert nsga and all(p.metrics.get("accuracy") is not None for p in nsga)
    # NSGA-II's non-dominated maps: none beats another on both size and accuracy
    for p in nsga:
        for q in nsga:
            assert not (q.cost.size_bytes < p.cost.size_bytes and q.metrics["accuracy"] > p.metrics["accuracy"])
    info = env.store.get_result_info(job_id=job.id)
    assert info["nsga2"]["evaluated"] == 24 and info["nsga2"]["objective"] == "calibration proxy"
    assert all(p.provenance is not None and p.provenance.proxy is not None for p in nsga)
    # the maps it keeps were evaluated by the runner and by Ray tasks in other processes at the same time
    evaluation = info["evaluation"]
    assert len(evaluation["processes"]) >= 2 and evaluation["remote_maps"] >= 1, evaluation
    method = next(e for e in env.events(job.id) if e.kind == "method")
    assert "24 maps measured on the calibration proxy" in method.message
    # the Optuna study lives in its own SQLite file, never in the service's database
    study = env.settings.data_dir / "work" / "optuna" / f"{job.id}.db"
    assert study.is_file()
    tables = set(sa.inspect(env.store.engine).get_table_names())
    assert not {"studies", "trials", "trial_values"} & tables


def test_resolve_answers_a_new_budget_from_the_stored_tables(ray_session, env: Env):
    from service.app import create_app
    from workers.resolver import SearchResolver

    job = env.submit(methods=["kl", "hessian"])
    env.dispatcher(eval_workers=0).start()
    assert env.wait(job.id).status is JobStatus.succeeded
    space = env.store.get_space(job_id=job.id)
    tables = env.store.get_sensitivity_tables(job_id=job.id)
    r = SearchResolver()
    one = r.resolve(space=space, sensitivities=[t for t in tables if t["method"] == "kl"],
                    budget={"max_avg_bits": 4.0}, methods=["kl"])
    assert one["cost"]["avg_bits"] <= 4.0 + 1e-9 and one["method"] == "kl"
    both = r.resolve(space=space, sensitivities=tables, budget={"max_avg_bits": 4.0, "device_profile": "h100"},
                     methods=None)
    assert both["method"] in ("kl", "hessian") and len(both["alternatives"]) == 2
    assert both["cost"]["avg_bits"] <= 4.0 + 1e-9
    with pytest.raises(Exception) as exc:
        r.resolve(space=space, sensitivities=tables, budget={"max_avg_bits": 0.1}, methods=None)
    assert getattr(exc.value, "code", None) == "budget_infeasible"

    # through the API, as `bitscout serve` wires it
    from fastapi.testclient import TestClient

    _info, token = env.store.create_token(name="alice")
    client = TestClient(create_app(env.settings, resolver=SearchResolver()))
    headers = {"Authorization": f"Bearer {token}"}
    resp = client.post(f"/api/v1/jobs/{job.id}/resolve", json={"budget": {"max_avg_bits": 5.0}}, headers=headers)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["cost"]["avg_bits"] <= 5.0 + 1e-9 and body["precision_map"]
    resp = client.post(f"/api/v1/jobs/{job.id}/resolve", json={"budget": {"max_avg_bits": 0.1}}, headers=headers)
    assert resp.status_code == 422 and resp.json()["code"] == "budget_infeasible"
