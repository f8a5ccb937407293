"""The workers' parts without Ray: settings, spec mapping, model and data sources, the progress
reporter, error codes, and the store's re-queue reason."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
from pathlib import Path

import pytest

from bitscout.schemas import JobSpec, JobStatus
from search.errors import CanceledError, DataError, InfeasibleBudgetError, ModelLoadError
from service.store import JobNotOwned
from tests.workers.conftest import Env, tiny_spec, wait_until
from workers.progress import Reporter
from workers.runner import JobRunner, error_of
from workers.settings import RunnerConfig, WorkerSettings
from workers.spec import data_options, notes, search_options


def test_worker_settings_come_from_the_environment_only_when_constructed(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray-head:6379")
    monkeypatch.setenv("BITSCOUT_MAX_CONCURRENT_JOBS", "5")
    ws = WorkerSettings()
    assert ws.ray_address == "ray-head:6379" and ws.max_concurrent_jobs == 5
    monkeypatch.setenv("BITSCOUT_RAY_ADDRESS", "other:6379")
    assert WorkerSettings().ray_address == "other:6379"
    assert WorkerSettings(ray_address="x:1").ray_address == "x:1"
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.delenv("BITSCOUT_RAY_ADDRESS")
    assert WorkerSettings().ray_address is None
    assert WorkerSettings().dispatcher_id.startswith("dispatcher@")
    with pytest.raises(ValueError):
        WorkerSettings(max_concurrent_jobs=0)


def test_runner_config_is_built_from_both_settings(tmp_path):
    from service.settings import Settings

    s = Settings(data_dir=tmp_path, model_root=tmp_path / "m", max_archive_unpacked_mb=10)
    cfg = RunnerConfig.build(s, WorkerSettings(heartbeat_interval_s=0.7, eval_workers=3))
    assert cfg.database_url.startswith("sqlite:///") and cfg.work_dir == str((tmp_path / "work").resolve())
    assert cfg.model_root == str(tmp_path / "m") and cfg.data_root is None
    assert cfg.max_archive_unpacked_bytes == 10_000_000 and cfg.heartbeat_interval_s == 0.7 and cfg.eval_workers == 3
    import pickle

    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_the_spec_maps_to_search_and_data_options():
    spec = JobSpec.model_validate(tiny_spec(
        methods=["kl", "nsga2"], seed=7, front_points=5,
        space={"bits": [0, 4, 8], "symmetric": False, "granularity": "group", "ffn_block_size": 32,
               "max_head_fraction": 0.5, "include": [], "exclude": ["*.output.dense"], "include_head": True},
        budget={"max_size_mb": 1.5, "max_latency_ms": 2.0, "device_profile": "h100"},
        refine={"points": "recommended", "steps": 10},
    ))  # fmt: skip
    o = search_options(spec, method_options={"nsga2": {"storage": "sqlite:///x.db"}})
    assert o.methods == ("kl", "nsga2") and o.bits == (0, 4, 8) and o.symmetric is False
    assert o.granularity == "group" and o.ffn_block_size == 32 and o.prune_limits.max_head_fraction == 0.5
    assert o.include is None and o.exclude == ("*.output.dense",) and o.include_head is True
    assert o.budget.max_size_mb == 1.5 and o.budget.max_latency_ms == 2.0 and o.device_profile == "h100"
    assert o.metric == "accuracy" and o.seed == 7 and o.front_points == 5 and o.seq_len == 16
    assert o.method_options["nsga2"]["storage"] == "sqlite:///x.db"
    d = data_options(spec, "/data/x.jsonl")
    assert (d.source, d.label_field, d.calibration, d.evaluation, d.max_length) == ("/data/x.jsonl", "label", 16, 48, 16)
    assert notes(spec) == []
    cuda = JobSpec.model_validate(tiny_spec(device="cuda"))
    assert "GPU" in notes(cuda)[0]
    emb = JobSpec.model_validate(tiny_spec(task="embeddings"))
    assert data_options(emb, "x.jsonl").label_field is None and search_options(emb).metric == "cosine"


def test_error_codes_of_what_ends_a_job():
    assert error_of(ModelLoadError("no config.json", field="model"))[0] == "model_load_failed"
    assert error_of(DataError("no rows"))[0] == "data_invalid"
    code, msg = error_of(InfeasibleBudgetError("too small", field="max_size_mb", smallest=3.0))
    assert code == "budget_infeasible" and "too small" in msg
    assert error_of(MemoryError())[0] == "out_of_memory"
    assert error_of(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))[0] == "out_of_memory"
    code, msg = error_of(KeyError("x\nsecond line"))
    assert code == "internal" and "KeyError" in msg and "\n" not in msg
    # with the job's spec, a search error names the spec's path of its field
    from search.errors import InvalidInputError

    spec = JobSpec.model_validate(tiny_spec())
    assert error_of(InvalidInputError("none left", field="exclude"), spec)[1] == "space.exclude: none left"
    assert error_of(InvalidInputError("none", field="include"), spec)[1] == "space.include: none"
    assert error_of(DataError("no column", field="text_field"), spec)[1] == "data.text_field: no column"
    assert error_of(DataError("bad line", field="source"), spec)[1] == "data.path: bad line"
    assert error_of(ModelLoadError("no config", field="model"), spec)[1] == "model.path: no config"
    assert error_of(InfeasibleBudgetError("small", field="max_avg_bits"), spec)[1] == "budget.max_avg_bits: small"
    assert error_of(DataError("bad", field="data.upload_id"), spec)[1] == "data.upload_id: bad"


# ---------------------------------------------------------------------------------- sources


def _model_archive(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in sorted(folder.iterdir()):
            tar.add(f, arcname=f"tiny/{f.name}")
    return buf.getvalue()


def test_sources_find_models_and_data_under_the_roots_uploads_and_the_hf_cache(env: Env, assets: Path, monkeypatch):
    from workers import sources

    cfg = env.config()
    spec = JobSpec.model_validate(tiny_spec())
    assert sources.model_dir(spec, env.store, cfg) == (assets / "models" / "bert").resolve()
    assert sources.data_source(spec, env.store, cfg) == str((assets / "inputs" / "sentiment.jsonl").resolve())

    up = env.store.put_upload(owner="alice", filename="tiny.tar.gz", kind="model",
                              source=_model_archive(assets / "models" / "bert"))  # fmt: skip
    spec_up = JobSpec.model_validate(tiny_spec(model={"path": None, "upload_id": up.id}))
    extracted = sources.model_dir(spec_up, env.store, cfg)
    assert (extracted / "config.json").is_file() and extracted.name == "tiny"
    assert sources.model_dir(spec_up, env.store, cfg) == extracted  # extracted once, by checksum

    data = (assets / "inputs" / "sentiment.jsonl").read_bytes()
    dup = env.store.put_upload(owner="alice", filename="reviews.JSONL", kind="data", source=data)
    spec_data = JobSpec.model_validate(tiny_spec(data={"path": None, "upload_id": dup.id}))
    linked = Path(sources.data_source(spec_data, env.store, cfg))
    assert linked.suffix == ".jsonl" and linked.read_bytes() == data

    import dataclasses

    root = env.settings.data_dir / "other-root"
    root.mkdir(parents=True)
    (root / "escape").symlink_to(assets / "models" / "bert")  # a link that leaves the root
    with pytest.raises(ModelLoadError) as exc:
        sources.model_dir(JobSpec.model_validate(tiny_spec(model={"path": "escape"})), env.store,
                          dataclasses.replace(cfg, model_root=str(root)))  # fmt: skip
    assert exc.value.field == "model.path"
    with pytest.raises(ModelLoadError, match="under the server's model root"):
        sources.model_dir(JobSpec.model_validate(tiny_spec(model={"path": "/etc"})), env.store, cfg)
    with pytest.raises(DataError):
        sources.data_source(JobSpec.model_validate(tiny_spec(data={"path": "missing.jsonl"})), env.store, cfg)

    monkeypatch.setenv("HF_HUB_CACHE", str(env.settings.data_dir / "hf-empty"))
    hf = JobSpec.model_validate(tiny_spec(model={"path": None, "hf_id": "someone/model", "revision": "a" * 40}))
    with pytest.raises(ModelLoadError, match="not in the server's Hugging Face cache"):
        sources.model_dir(hf, env.store, cfg)
    named = JobSpec.model_validate(tiny_spec(data={"path": None, "dataset": "ag_news", "split": "test"}))
    assert sources.data_source(named, env.store, cfg) == "ag_news:test"
    with pytest.raises(DataError, match="configurations"):
        sources.data_source(JobSpec.model_validate(tiny_spec(data={"path": None, "dataset": "glue", "dataset_config": "sst2"})),
                            env.store, cfg)  # fmt: skip


# ---------------------------------------------------------------------------------- progress


def test_the_reporter_writes_progress_at_a_bounded_rate_and_sees_cancels(env: Env):
    job = env.submit()
    rec = env.store.claim_next_job(worker_id="w/1")
    assert rec is not None
    calls = []
    real = env.store.heartbeat

    def counting(**kw):
        calls.append((time.monotonic(), kw))
        return real(**kw)

    env.store.heartbeat = counting  # type: ignore[method-assign]
    rep = Reporter(env.store, job_id=job.id, worker_id="w/1", interval_s=0.5, min_interval_s=0.2).start()
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.5:
            rep.report("sensitivity:kl", (time.monotonic() - t0) / 1.5, "probing")
            time.sleep(0.001)
        n = len(calls)
        assert 2 <= n <= 1.5 / 0.2 + 2, n  # hundreds of reports, a handful of writes
        j = env.store.get_job(job_id=job.id)
        assert j.stage == "sensitivity:kl" and 0.3 < j.progress <= 1.0 and j.message == "probing"
        assert not rep.should_stop()
        env.store.request_cancel(job_id=job.id)
        assert wait_until(rep.should_stop, 3)
        assert rep.cancel_requested and not rep.lost
        # a stage change is written soon, not at the next interval
        rep.report("evaluate", 0.9, "evaluating")
        assert wait_until(lambda: env.store.get_job(job_id=job.id).stage == "evaluate", 1.0)
    finally:
        rep.stop()
    assert [e.stage for e in env.events(job.id) if e.kind == "stage"] == ["sensitivity:kl", "evaluate"]


def test_the_reporter_stops_when_the_job_is_taken_away(env: Env):
    job = env.submit()
    env.store.claim_next_job(worker_id="w/1")
    rep = Reporter(env.store, job_id=job.id, worker_id="w/1", interval_s=0.2).start()
    try:
        env.store.requeue_running(worker_id="w/1", reason="testing")
        assert wait_until(lambda: rep.lost, 3)
        assert rep.should_stop()
    finally:
        rep.stop()
    with pytest.raises(JobNotOwned):
        env.store.heartbeat(job_id=job.id, worker_id="w/1")


def test_the_runner_in_process_ends_jobs_with_their_codes(env: Env):
    """JobRunner without Ray (eval_workers=0): success, a bad model, a job no longer its own."""
    ok = env.submit()
    claim = env.store.claim_next_job(worker_id="w/ok")
    assert claim is not None and claim.id == ok.id
    out = JobRunner(ok.id, "w/ok", env.config(eval_workers=0), store=env.store).run()
    assert out.status == "succeeded" and env.store.get_job(job_id=ok.id).status is JobStatus.succeeded

    bad = env.submit(model={"path": "not-a-model"})
    env.store.claim_next_job(worker_id="w/bad")
    out = JobRunner(bad.id, "w/bad", env.config(eval_workers=0), store=env.store).run()
    assert out.status == "failed" and out.code == "model_load_failed"

    other = env.submit()
    env.store.claim_next_job(worker_id="w/other")
    out = JobRunner(other.id, "w/not-me", env.config(eval_workers=0), store=env.store).run()
    assert out.status == "lost" and env.store.get_job(job_id=other.id).status is JobStatus.running


def test_failed_jobs_name_the_users_inputs_and_never_the_servers_paths(env: Env, assets: Path, tmp_path: Path):
    """Real runs (no Ray) that end on bad data, a bad model and a selection that leaves nothing: each
    message names the input as the user gave it, with the job spec's path, and holds no server path."""
    import dataclasses
    import json as _json

    root = tmp_path / "inputs"
    (root / "broken").mkdir(parents=True)
    rows = [_json.dumps({"text": "good movie", "label": "pos"}), _json.dumps({"text": "bad", "label": "neg"})]
    (root / "broken" / "bad.jsonl").write_text(rows[0] + "\n{not json\n" + rows[1] + "\n")
    cfg = dataclasses.replace(env.config(eval_workers=0), data_root=str(root))
    up = env.store.put_upload(owner="alice", filename="reviews.jsonl", kind="data",
                              source=(rows[0] + "\n" + rows[1] + "\n[1, 2]\n").encode())  # fmt: skip
    server_paths = [str(p) for p in (env.settings.data_dir, env.settings.data_dir.resolve(), root, assets,
                                     cfg.work_dir, cfg.blob_dir)] + [up.sha256]  # fmt: skip

    def failed(**overrides) -> tuple[str | None, str]:
        job = env.submit(**overrides)
        env.store.claim_next_job(worker_id="w/paths")
        out = JobRunner(job.id, "w/paths", cfg, store=env.store).run()
        assert out.status == "failed", out
        read = env.store.get_job(job_id=job.id)
        texts = [read.error_message or ""] + [e.message or "" for e in env.events(job.id)]
        for text in texts:
            assert not any(p in text for p in server_paths), text
        return read.error_code, read.error_message or ""

    code, msg = failed(data={"path": None, "upload_id": up.id})
    assert code == "data_invalid" and msg.startswith("data.upload_id: file 'reviews.jsonl' line 3 is a JSON array")
    code, msg = failed(data={"path": "broken/bad.jsonl"})
    assert code == "data_invalid" and msg.startswith("data.path: file 'broken/bad.jsonl' line 2 is not valid JSON")
    (root / "ok.jsonl").write_bytes((assets / "inputs" / "sentiment.jsonl").read_bytes())
    code, msg = failed(model={"path": "not-a-model"}, data={"path": "ok.jsonl"})
    assert code == "model_load_failed" and msg.startswith("model.path: 'not-a-model' is not a transformers model"), msg
    code, msg = failed(data={"path": "ok.jsonl"}, space={"include": ["nothing.*"]})
    assert code == "invalid_request" and msg.startswith("space.include: no quantizable matrix"), msg
    code, msg = failed(data={"path": "ok.jsonl"}, space={"include": ["*.layer.0.*"], "exclude": ["*.0.*"]})
    assert code == "invalid_request" and msg.startswith("space.exclude: the exclude patterns leave out all"), msg


def test_server_paths_are_rewritten_at_path_boundaries_only(tmp_path: Path):
    from workers.sources import ServerPaths

    work = tmp_path / "srv" / "work"
    cfg = RunnerConfig(database_url="sqlite://", blob_dir=str(tmp_path / "srv" / "blobs"), work_dir=str(work),
                       model_root=str(tmp_path / "models"))  # fmt: skip
    paths = ServerPaths(cfg)
    paths.name(work / "data" / "abc.jsonl", "reviews.jsonl")
    text = (f"cannot read '{work}/data/abc.jsonl': no; see {work}/models/x, {tmp_path}/models-old/x, "
            f"{tmp_path}/models/bert/config.json, {tmp_path / 'srv'} and {tmp_path / 'srv' / 'blobs'}/ab/cd")  # fmt: skip
    assert paths.scrub(text) == (
        f"cannot read 'reviews.jsonl': no; see <work dir>/models/x, {tmp_path}/models-old/x, "
        "<model root>/bert/config.json, <data dir> and <file store>/ab/cd"
    )


def test_the_runner_refines_the_recommended_point(env: Env):
    job = env.submit(refine={"points": "recommended", "steps": 4})
    env.store.claim_next_job(worker_id="w/rf")
    out = JobRunner(job.id, "w/rf", env.config(eval_workers=0), store=env.store).run()
    assert out.status == "succeeded", out
    points = env.store.get_points(job_id=job.id)
    refined = [p for p in points if p.refined]
    assert len(refined) == 1
    origin = points[refined[0].refined_from]
    assert not origin.refined and origin.precision_map == refined[0].precision_map
    assert origin.cost == refined[0].cost
    assert "refined" in env.kinds(job.id)
    assert not (env.settings.data_dir / "work" / "refine" / job.id).exists()  # checkpoints removed
    # The refined weights exist only in the artifact stored with the point: it reloads to the stored metric.
    assert refined[0].artifact_available and not origin.artifact_available
    path, name, _ = env.store.get_artifact(job_id=job.id, point_id=refined[0].id)
    assert name.endswith(".tar.gz")
    with tarfile.open(path) as tar:
        tar.extractall(env.settings.data_dir / "art", filter="data")
    from search.export import load_artifact
    from search.local import prepare
    from search.tasks import evaluate, load_model
    from workers import sources

    spec = env.store.get_job_record(job_id=job.id).spec
    cfg = env.config()
    search = prepare(sources.model_dir(spec, env.store, cfg), data_options(spec, sources.data_source(spec, env.store, cfg)),
                     search_options(spec), task=spec.task.value, device="cpu")  # fmt: skip
    fresh = load_model(search.model_path, search.task).model
    loaded = load_artifact(env.settings.data_dir / "art", fresh)
    got = evaluate(loaded, search.evaluation, search.task, reference=search.reference())
    metric = search.metric
    assert got[metric] == refined[0].metrics[metric]
    assert got["kl"] == pytest.approx(refined[0].metrics["kl"], rel=1e-5, abs=1e-7)


def test_the_runner_refines_the_k_best_front_points_that_meet_the_budget(env: Env):
    job = env.submit(refine={"points": 2, "steps": 2}, budget={"max_avg_bits": 4.0}, front_points=6)
    env.store.claim_next_job(worker_id="w/k")
    out = JobRunner(job.id, "w/k", env.config(eval_workers=0), store=env.store).run()
    assert out.status == "succeeded", out
    points = env.store.get_points(job_id=job.id)
    refined = [p for p in points if p.refined]
    origins = [points[p.refined_from] for p in refined]
    # the points within the budget, one per map, ranked by their calibration discrepancy alone
    eligible = [p for p in points if p.method != "uniform" and not p.refined and p.meets_budget
                and p.provenance is not None and p.provenance.proxy is not None]
    distinct = {json.dumps({k: v.model_dump() for k, v in p.precision_map.items()}, sort_keys=True) for p in eligible}
    assert len(refined) == min(2, len(distinct)) >= 1
    assert all(o.meets_budget and o.cost.avg_bits <= 4.0 + 1e-9 for o in origins)
    # over-budget points (up to 8 bits) measure closer to full precision, yet none of them is refined;
    # no eligible map measures below the refined ones on the calibration rows
    worst = max(o.provenance.proxy for o in origins)
    rest = [p for p in eligible if p.precision_map not in [o.precision_map for o in origins]]
    assert all(p.provenance.proxy >= worst for p in rest)
    assert all(p.artifact_available for p in refined)


def test_the_runner_stops_on_cancel_between_steps(env: Env, monkeypatch):
    job = env.submit(methods=["kl", "hessian"], space={"include": []})
    env.store.claim_next_job(worker_id="w/c")
    runner = JobRunner(job.id, "w/c", env.config(eval_workers=0, heartbeat_interval_s=0.2), store=env.store)
    out: list = []
    t = threading.Thread(target=lambda: out.append(runner.run()))
    t.start()
    env.wait_event(job.id, "sensitivity_stored", timeout=60)
    env.store.request_cancel(job_id=job.id)
    t.join(timeout=20)
    assert out and out[0].status == "canceled"
    assert env.store.get_job(job_id=job.id).status is JobStatus.canceled
    assert env.store.get_sensitivity_tables(job_id=job.id)  # kept
    assert isinstance(CanceledError("x"), Exception)


def test_requeue_running_records_the_reason(env: Env):
    job = env.submit()
    env.store.claim_next_job(worker_id="w/r")
    assert env.store.requeue_running(worker_id="w/r", reason="its Ray worker died: boom") == [job.id]
    ev = [e for e in env.events(job.id) if e.kind == "requeued"][-1]
    assert "its Ray worker died: boom" in ev.message
    env.store.claim_next_job(worker_id="w/r2")
    env.store.requeue_running(worker_id="w/r2", max_attempts=2, reason="gone again")
    j = env.store.get_job(job_id=job.id)
    assert j.status is JobStatus.failed and "gone again" in j.error_message


def test_refinement_holds_back_calibration_batches_for_early_stopping():
    from search.orchestration import split_validation

    assert split_validation([]) == ([], [])
    assert split_validation(["a"]) == (["a"], ["a"])
    assert split_validation(["a", "b"]) == (["a"], ["b"])
    train, val = split_validation(list("abcdefgh"))
    assert train == list("abcdef") and val == list("gh")  # the last quarter, disjoint from training
