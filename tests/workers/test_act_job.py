"""A job with activation widths, a custom device profile and a measured latency table (an upload of
kind ``latency_table``), run by the runner in-process (no Ray)."""

from __future__ import annotations

import json

import pytest

from bitscout.schemas import JobStatus, UploadKind
from tests.workers.conftest import Env
from workers.runner import JobRunner

PROFILE = {"name": "edge", "memory_bandwidth_gbs": 50, "int8_tops": 4, "int4_tops": 4, "fp16_tflops": 1, "fp32_tflops": 1}


def _run(env: Env, job_id: str, worker: str):
    claim = env.store.claim_next_job(worker_id=worker)
    assert claim is not None and claim.id == job_id
    return JobRunner(job_id, worker, env.config(eval_workers=0), store=env.store).run()


def _table_upload(env: Env, shapes: list[list[int]], options: list[str], tokens: int = 16) -> str:
    table = {
        "format": "bitscout-latency-table/1",
        "device": "cpu",
        # a 4-bit weight-only matrix is slow, the W8A8 kernel fast: the opposite of the roofline
        "entries": [{"tokens": tokens, "shape": s, "option": o, "ms": {"4": 3.0, "8a8": 1.0}.get(o, 2.0)}
                    for s in shapes for o in options],
    }  # fmt: skip
    sha, size = env.store.blobs.put_bytes(json.dumps(table).encode())
    return env.store.add_upload(
        owner="alice", filename="t.json", kind=UploadKind.latency_table, sha256=sha, size=size, meta={}
    ).id


def test_a_job_with_activation_bits_through_the_runner(env: Env):
    job = env.submit(
        space={"bits": [4, 8], "act_bits": [8]},
        budget={"max_avg_bits": 6.0, "device_profile": PROFILE},
        loop={"enabled": False},  # every uniform reference map is evaluated
    )
    out = _run(env, job.id, "w/act")
    assert out.status == "succeeded", out
    points = env.store.get_points(job_id=job.id)
    entries = [e for p in points for e in p.precision_map.values()]
    assert entries and all(set(e.model_dump()) == {"bits", "symmetric", "group_size", "act_bits", "tt_rank"} for e in entries)
    assert {e.act_bits for e in entries if e.bits in (4, 8)} == {8}  # every integer option quantizes activations
    # BOPs at the searched widths: uniform 8a8 costs 8 x 8 per MAC, uniform 4a8 4 x 8
    u8 = next(p for p in points if p.label == "uniform 8a8")
    u4 = next(p for p in points if p.label == "uniform 4a8")
    space = env.store.get_space(job_id=job.id)
    other = space["cost_model"]
    assert other["profile"]["name"] == "edge"
    assert u8.cost.bops > u4.cost.bops


def test_a_latency_table_job_prices_latency_with_the_table(env: Env):
    shapes = [[32, 32], [64, 32], [32, 64]]
    up = _table_upload(env, shapes, ["4", "8a8", "32"])
    job = env.submit(space={"bits": [4, "8a8"]}, budget={"max_avg_bits": 8.0, "max_latency_ms": 6.5, "latency_table": up})
    out = _run(env, job.id, "w/table")
    assert out.status == "succeeded", out
    points = env.store.get_points(job_id=job.id)
    u4 = next(p for p in points if p.label == "uniform 4-bit")
    n = len(next(iter([p.precision_map for p in points])))
    assert u4.cost.latency_ms == 3.0 * n  # the table's time per matrix, nothing else
    rec = env.store.get_job(job_id=job.id)
    assert rec.status is JobStatus.succeeded and rec.recommended_point is not None
    best = points[rec.recommended_point]
    assert best.cost.latency_ms <= 6.5
    assert {(e.bits, e.act_bits) for e in best.precision_map.values()} == {(8, 8)}  # the table's fast kernel


def test_a_table_without_the_job_s_shapes_fails_naming_it(env: Env):
    up = _table_upload(env, [[1, 1]], ["4", "8a8", "32"])
    job = env.submit(space={"bits": [4, "8a8"]}, budget={"max_avg_bits": 8.0, "max_latency_ms": 6.5, "latency_table": up})
    out = _run(env, job.id, "w/gap")
    assert out.status == "failed" and out.code == "invalid_request"
    rec = env.store.get_job(job_id=job.id)
    assert "latency table" in (rec.error_message or "")


def test_a_fisher_w4a8_job_refines_and_its_artifact_reloads_to_the_refined_metrics(env: Env):
    """Activation widths scored by ``fisher`` in a job, the recommended W4A8 point refined (learned
    activation steps), and the stored artifact reloaded onto a fresh model: the refined metrics."""
    import tarfile

    from search.export import artifact_info, load_artifact
    from search.local import prepare
    from search.tasks import evaluate, load_model
    from workers import sources
    from workers.spec import data_options, search_options

    job = env.submit(methods=["fisher"], space={"bits": [4], "act_bits": [8]}, budget={"max_avg_bits": 6.0},
                     refine={"points": "recommended", "steps": 3}, loop={"enabled": False})
    out = _run(env, job.id, "w/fisher-act")
    assert out.status == "succeeded", out
    points = env.store.get_points(job_id=job.id)
    assert any(p.method == "fisher" for p in points)
    refined = [p for p in points if p.refined]
    assert len(refined) == 1 and refined[0].artifact_available
    assert any(e.act_bits == 8 for e in refined[0].precision_map.values())
    path, _, _ = env.store.get_artifact(job_id=job.id, point_id=refined[0].id)
    with tarfile.open(path) as tar:
        tar.extractall(env.settings.data_dir / "art-act", filter="data")
    assert artifact_info(env.settings.data_dir / "art-act").activations.steps  # the learned steps travel
    spec = env.store.get_job_record(job_id=job.id).spec
    cfg = env.config()
    search = prepare(sources.model_dir(spec, env.store, cfg), data_options(spec, sources.data_source(spec, env.store, cfg)),
                     search_options(spec), task=spec.task.value, device="cpu")  # fmt: skip
    loaded = load_artifact(env.settings.data_dir / "art-act", load_model(search.model_path, search.task).model)
    got = evaluate(loaded, search.evaluation, search.task, reference=search.reference())
    assert got[search.metric] == refined[0].metrics[search.metric]
    assert got["kl"] == pytest.approx(refined[0].metrics["kl"], rel=1e-5, abs=1e-7)
