"""The SDK's parts: the front (best, tables, plots), uploads of model directories and data files,
downloads, progress bars, the retry policy, and ``bitscout.apply``'s errors."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import httpx2
import pytest

import bitscout
from bitscout._base import model_files, pack_model_dir
from tests.bitscout.conftest import Service

SPEC: dict[str, Any] = {
    "model": "hf:org/m@" + "a" * 40,
    "data": "dataset:ag_news",
    "task": "sequence_classification",
    "budget": {"max_size_mb": 10},
}


def _finished_job(service: Service, n: int = 5) -> bitscout.Job:
    from tests.service.conftest import make_points

    client = service.client()
    job = client.submit(**SPEC)
    rec = service.store.claim_next_job(worker_id="w")
    assert rec is not None
    service.store.finish_job(
        job_id=job.id,
        worker_id="w",
        points=make_points(n),
        front_info={"baseline_metrics": {"accuracy": 0.97}},
    )
    return job.refresh()


# --------------------------------------------------------------------------- the front


def test_front_best_and_tables(service: Service) -> None:
    job = _finished_job(service)
    front = job.pareto()
    assert repr(front).startswith("Front(") and front.metric == "accuracy" and front.higher_is_better
    sizes = {p.id: p.cost.size_mb for p in front}
    rec = front.recommended_point
    assert (
        rec is not None and rec.id == job.data.recommended_point == front.best().id
    )  # the job's budget: 10 MB
    assert front.best().cost.size_mb <= 10
    best8 = front.best(max_size_mb=8)
    assert best8.cost.size_mb <= 8 and all(
        (front.value(p) or 0) <= (front.value(best8) or 0) for p in front if p.cost.size_mb <= 8
    )
    assert front.best(max_size_mb=100, methods=["uniform"]).method == "uniform"
    assert front.best(max_size_mb=100, metric="kl", higher_is_better=False).metrics["kl"] == min(
        p.metrics["kl"] or 1 for p in front
    )
    assert all(p.on_front for p in front.on_front()) and len(front.on_front()) < len(front)
    with pytest.raises(bitscout.InvalidRequest) as ir:
        front.best(max_size_mb=1)
    assert ir.value.code is bitscout.ErrorCode.budget_infeasible and ir.value.field == "max_size_mb"
    assert ir.value.details and ir.value.details["smallest"] == min(sizes.values())
    with pytest.raises(bitscout.NotFound):
        front.get(999)
    rows = front.rows()
    assert rows[0]["id"] == 0 and {"size_mb", "accuracy", "kl", "on_front", "recommended"} <= set(rows[0])
    df = front.to_pandas()
    assert len(df) == len(front) and df.loc[df["recommended"], "id"].item() == rec.id
    # the job-level shortcuts
    assert job.best(max_size_mb=8).id == best8.id
    assert job.point(rec.id).precision_map == rec.precision_map == job.point().precision_map


def test_front_plot(service: Service, tmp_path: Path) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    job = _finished_job(service)
    ax = job.plot()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "kl" in labels and "recommended" in labels and "unquantized" in labels and "budget" in labels
    ax.figure.savefig(tmp_path / "front.png")
    assert (tmp_path / "front.png").stat().st_size > 1000
    ax2 = job.pareto().plot(x="avg_bits", metric="kl")
    assert ax2.get_xlabel() == "avg bits"


def test_front_without_optional_packages(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    job = _finished_job(service, n=2)
    front = job.pareto()
    real = builtins.__import__

    def no_extras(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] in ("pandas", "matplotlib"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_extras)
    with pytest.raises(ImportError, match="pip install pandas"):
        front.to_pandas()
    with pytest.raises(ImportError, match="pip install matplotlib"):
        front.plot()


def test_no_points_yet(service: Service) -> None:
    job = service.client().submit(**SPEC)
    assert len(job.pareto()) == 0
    with pytest.raises(bitscout.NotFound, match="no result yet"):
        job.download("recommended", "unused")
    with pytest.raises(bitscout.InvalidRequest, match="none stored yet"):
        job.best()
    assert "queued" in repr(job) and job.failure() is None
    with pytest.raises(TimeoutError, match="still queued"):
        job.wait(progress=False, poll_interval=0.01, timeout=0.05)


# --------------------------------------------------------------------------- uploads


def _model_dir(root: Path) -> Path:
    d = root / "my-model"
    (d / "1_Pooling").mkdir(parents=True)
    (d / ".git").mkdir()
    (d / "config.json").write_text('{"architectures": ["BertForSequenceClassification"]}')
    (d / "model.safetensors").write_bytes(_safetensors())
    (d / "tokenizer.json").write_text("{}")
    (d / "vocab.txt").write_text("a\nb\n")
    (d / "1_Pooling" / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    (d / "modeling.py").write_text("import os")
    (d / ".git" / "HEAD").write_text("ref")
    (d / "optimizer.pt").write_bytes(b"x")
    return d


def _safetensors() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    return len(header).to_bytes(8, "little") + header + b"\0" * 8


def test_model_directory_packing(tmp_path: Path) -> None:
    d = _model_dir(tmp_path)
    names = [p.relative_to(d).as_posix() for p in model_files(d)]
    assert names == [
        "1_Pooling/config.json",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "vocab.txt",
    ]
    a = pack_model_dir(d, tmp_path / "a.tar.gz")
    b = pack_model_dir(d, tmp_path / "b.tar.gz")
    assert a.read_bytes() == b.read_bytes()  # reproducible: a retried upload sends the same bytes
    with tarfile.open(a) as tar:
        assert sorted(tar.getnames()) == sorted(names)
    empty = tmp_path / "pickled"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    (empty / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(bitscout.InvalidRequest, match="safe_serialization=True") as ir:
        pack_model_dir(empty)
    assert ir.value.field == "model"
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    (weights_only / "model.safetensors").write_bytes(_safetensors())
    with pytest.raises(bitscout.InvalidRequest, match="no config.json"):
        pack_model_dir(weights_only)


def test_uploads_to_the_real_service(service: Service, tmp_path: Path) -> None:
    client = service.client()
    d = _model_dir(tmp_path)
    up = client.upload(d)
    assert up.kind.value == "model"
    assert up.filename == "my-model.tar.gz" and up.size > 0
    zpath = tmp_path / "m.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.write(d / "config.json", "config.json")
        zf.write(d / "model.safetensors", "model.safetensors")
    assert client.upload(zpath).kind.value == "model"
    rows = tmp_path / "rows.csv"
    rows.write_text("text,label\ngood,1\nbad,0\n")
    data = client.upload(rows)
    assert data.kind.value == "data" and data.filename == "rows.csv"
    # a submission names the uploads; the task comes from the model's config
    job = client.submit(
        model=d,
        data=rows,
        budget={"max_avg_bits": 4},
        methods="kl,hessian",
        data_options={"text_field": "text"},
    )
    assert job.spec.task is bitscout.Task.sequence_classification and [m.value for m in job.spec.methods] == [
        "kl",
        "hessian",
    ]
    assert job.spec.model.upload_id and job.spec.data.upload_id and job.spec.data.text_field == "text"
    job2 = client.submit(
        model=zpath, data=f"upload:{data.id}", task="embeddings", budget=bitscout.BudgetSpec(max_avg_bits=4)
    )
    assert job2.spec.data.upload_id == data.id and job2.spec.metric is bitscout.Metric.cosine
    with pytest.raises(bitscout.InvalidRequest) as ir:  # the server checks what is inside
        bad = tmp_path / "bad.tar.gz"
        with tarfile.open(bad, "w:gz") as tar:
            tar.add(d / "modeling.py", "modeling.py")
        client.upload(bad)
    assert ir.value.field == "file" and ir.value.status == 422
    with pytest.raises(bitscout.InvalidRequest, match="a data upload is one file"):
        client.upload(d, "data")
    with pytest.raises(bitscout.InvalidRequest, match="no file or directory"):
        client.upload(tmp_path / "missing")


def test_upload_progress_bar(
    service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bitscout import _progress

    monkeypatch.setattr(_progress, "UPLOAD_BAR_MIN_BYTES", 1024)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "good movie", "label": 1}\n' * 2000)
    service.client().upload(rows)
    assert "uploading data" in capsys.readouterr().err
    service.client().upload(rows, progress=False)
    assert "uploading" not in capsys.readouterr().err
    # a retried upload sends the whole file again
    from tests.bitscout.support import FlakyTransport

    flaky = FlakyTransport(service.transport(), fail=1, status=503)
    up = service.client(transport=flaky).upload(rows, progress=False)
    assert up.size == rows.stat().st_size and len(flaky.calls) == 2


# --------------------------------------------------------------------------- downloads


def test_download_never_writes_outside_its_directory(tmp_path: Path) -> None:
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz") as tar:
        for name in ("ok.json", "../escape.txt"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    served = {"n": 0}

    def handler(request: httpx2.Request) -> httpx2.Response:
        served["n"] += 1
        return httpx2.Response(
            200,
            content=evil.getvalue(),
            headers={"content-disposition": 'attachment; filename="../../x.tar.gz"'},
        )

    client = bitscout.Client("http://t", "tok", transport=httpx2.MockTransport(handler), retries=0)
    with pytest.raises(bitscout.BitscoutError, match="cannot be unpacked"):
        client.download("j", 1, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".bitscout-download")]
    path = client.download("j", 1, tmp_path / "raw", extract=False)
    assert path == tmp_path / "raw" / "x.tar.gz"  # the name is reduced to a safe base name


def _exporting_service(ready_after: int, *, retry_after: str = "3") -> tuple[Any, list[httpx2.Request]]:
    """A mock of the artifact endpoint: 202 (being exported) ``ready_after`` times, then the archive."""
    seen: list[httpx2.Request] = []
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        info = tarfile.TarInfo("model.safetensors")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"dense"))

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        if len(seen) <= ready_after:
            body = {"job_id": "j", "point_id": 4, "format": request.url.params["format"], "state": "running",
                    "attempts": 1, "message": "point 4 as dense is being exported", "retry_after_s": 3.0}
            return httpx2.Response(202, json=body, headers={"retry-after": retry_after})
        return httpx2.Response(200, content=archive.getvalue(),
                               headers={"content-disposition": 'attachment; filename="job-j-point-4-dense.tar.gz"'})

    return handler, seen


def test_download_waits_through_202s_honouring_retry_after(tmp_path: Path) -> None:
    handler, seen = _exporting_service(2)
    client = bitscout.Client("http://t", "tok", transport=httpx2.MockTransport(handler), retries=0)
    slept: list[float] = []
    client._sleep = slept.append  # type: ignore[method-assign]
    path = client.download("j", 4, tmp_path / "d", format="Dense", timeout=60)
    assert path == tmp_path / "d" and (path / "model.safetensors").read_bytes() == b"dense"
    assert slept == [3.0, 3.0] and len(seen) == 3
    assert all(r.url.path == "/api/v1/jobs/j/points/4/artifact" and r.url.params["format"] == "dense" for r in seen)
    # the default format is native; an unknown one is refused before any request, naming the field
    handler, seen = _exporting_service(0)
    client = bitscout.Client("http://t", "tok", transport=httpx2.MockTransport(handler), retries=0)
    client.download("j", 4, tmp_path / "n")
    assert seen[0].url.params["format"] == "native"
    with pytest.raises(bitscout.InvalidRequest) as err:
        client.download("j", 4, tmp_path / "x", format="gguf")
    assert err.value.field == "format" and len(seen) == 1


def test_download_gives_up_after_its_timeout_never_sleeping_past_it(tmp_path: Path, monkeypatch: Any) -> None:
    import time as time_mod

    clock = {"t": 1000.0}
    monkeypatch.setattr(time_mod, "monotonic", lambda: clock["t"])
    handler, seen = _exporting_service(10**6, retry_after="4")
    client = bitscout.Client("http://t", "tok", transport=httpx2.MockTransport(handler), retries=0)
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        clock["t"] += s

    client._sleep = sleep  # type: ignore[method-assign]
    with pytest.raises(TimeoutError, match=r"still being exported as dense \(running\) after 10 s"):
        client.download("j", 4, tmp_path / "d", format="dense", timeout=10)
    assert slept == [4.0, 4.0, 2.0] and len(seen) == 4  # the last wait ends at the deadline
    assert not (tmp_path / "d").exists() or not list((tmp_path / "d").iterdir())


def test_the_async_client_waits_the_same_way(tmp_path: Path) -> None:
    import asyncio

    handler, seen = _exporting_service(1)
    slept: list[float] = []

    async def main() -> Path:
        async with bitscout.AsyncClient("http://t", "tok", transport=httpx2.MockTransport(handler), retries=0) as c:
            async def sleep(s: float) -> None:
                slept.append(s)

            c._sleep = sleep  # type: ignore[method-assign]
            return await c.download("j", 4, tmp_path / "a", format="dense", timeout=60)

    path = asyncio.run(main())
    assert (path / "model.safetensors").read_bytes() == b"dense" and slept == [3.0] and len(seen) == 2


# --------------------------------------------------------------------------- progress while waiting


def test_wait_shows_stage_and_message(service: Service, capsys: pytest.CaptureFixture[str]) -> None:
    import threading
    import time

    client = service.client()
    job = client.submit(**SPEC)

    def worker() -> None:
        from tests.service.conftest import make_points

        st = service.store
        rec = st.claim_next_job(worker_id="w")
        assert rec is not None
        for frac, stage, msg in ((0.2, "sensitivity", "probe 3 of 12"), (0.7, "evaluate", "point 5 of 9")):
            st.heartbeat(job_id=job.id, worker_id="w", progress=frac, stage=stage, message=msg)
            time.sleep(0.15)
        st.finish_job(job_id=job.id, worker_id="w", points=make_points(2))

    t = threading.Thread(target=worker)
    t.start()
    job.wait(poll_interval=0.02, timeout=30)
    t.join()
    err = capsys.readouterr().err
    assert "sensitivity" in err and "probe 3 of 12" in err and "evaluate" in err and "100%" in err


# --------------------------------------------------------------------------- policy, apply


def test_retry_policy() -> None:
    p = bitscout.RetryPolicy(max_retries=3, backoff=0.5, max_backoff=1.5, jitter=0.0)
    assert [p.delay(i) for i in (1, 2, 3, 4)] == [0.5, 1.0, 1.5, 1.5]
    # Retry-After is honoured (plus the backoff), and one longer than max_retry_after is not waited for
    assert p.delay(1, retry_after=1.2) == 1.7 and p.wait(1, retry_after=1.2) == 1.7
    assert p.wait(1, retry_after=p.max_retry_after + 1) is None and p.delay(1, retry_after=60) == 60.5
    assert p.should_retry_status(503, attempt=2) and not p.should_retry_status(503, attempt=3)
    assert all(p.should_retry_status(s, attempt=0) for s in (429, 502, 503, 504))
    assert not any(p.should_retry_status(s, attempt=0) for s in (400, 401, 404, 409, 422, 500))
    req = httpx2.Request("GET", "http://x")
    assert p.should_retry_error(httpx2.ConnectError("x", request=req), attempt=0)
    assert p.should_retry_error(httpx2.ReadTimeout("x", request=req), attempt=0)
    assert not p.should_retry_error(httpx2.UnsupportedProtocol("x", request=req), attempt=0)
    jitter = bitscout.RetryPolicy(backoff=1.0, jitter=0.5)
    assert all(0.5 <= jitter.delay(1) <= 1.0 for _ in range(20))


def test_apply_needs_the_search_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    real = importlib.import_module
    apply_module = real("bitscout._apply")

    def missing(name: str, *args: Any) -> Any:
        if name == "search.export":
            err = ImportError("No module named 'torch'")
            err.name = "torch"
            raise err
        return real(name, *args)

    monkeypatch.setattr(apply_module.importlib, "import_module", missing)
    with pytest.raises(ImportError, match=r"pip install 'bitscout\[search\]'") as exc:
        bitscout.apply(object(), {"a": {"bits": 4}})
    assert "torch" in str(exc.value)


def test_apply_turns_search_errors_into_typed_errors(tiny: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny["model"]))
    with pytest.raises(bitscout.InvalidRequest, match="groups this model does not have") as ir:
        bitscout.apply(model, {"no.such.module": {"bits": 4, "symmetric": True}})
    assert ir.value.field == "precision_map"
    with pytest.raises(bitscout.InvalidRequest) as ir:
        bitscout.apply(model, tmp_path / "nothing.json")
    assert ir.value.field == "precision_map"
    art = tmp_path / "art"
    art.mkdir()
    (art / "model.quant.safetensors").write_bytes(b"not really")
    with pytest.raises(bitscout.InvalidRequest, match="carries its own space"):
        bitscout.apply(model, art, ffn_block_size=64)
    with pytest.raises(bitscout.InvalidRequest) as ir:
        bitscout.apply(model, art)
    assert ir.value.field == "artifact"
    name = "bert.encoder.layer.0.attention.self.query"
    before = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    out = bitscout.apply(model, bitscout.ParetoPointRead.model_validate({
        "id": 0, "method": "kl", "precision_map": {name: {"bits": 2}},
        "cost": {"size_bytes": 1, "size_mb": 0, "avg_bits": 2, "bops": 0, "latency_ms": 0}, "metrics": {},
    }))  # fmt: skip
    after = out.bert.encoder.layer[0].attention.self.query.weight
    assert out is model and not bool((after == before).all())
    assert len(set(after[0].tolist())) <= 4  # a 2-bit grid per row
