"""Test support for the SDK: transports over the real app, a live uvicorn server, and a simulated
worker that runs a real search of a tiny model and stores it the way the workers do."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.from_thread
import httpx2

# --------------------------------------------------------------------------- transports


class SyncASGITransport(httpx2.BaseTransport):
    """httpx2's ``ASGITransport`` is async only: this runs it in a blocking portal (an event loop
    in a helper thread) so the synchronous ``bitscout.Client`` can talk to the app in-process."""

    def __init__(self, app: Any) -> None:
        self._inner = httpx2.ASGITransport(app=app, raise_app_exceptions=False)
        self._cm = anyio.from_thread.start_blocking_portal()
        self._portal = self._cm.__enter__()

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        request.read()

        async def call() -> tuple[int, list[tuple[str, str]], bytes]:
            response = await self._inner.handle_async_request(request)
            body = await response.aread()
            return response.status_code, list(response.headers.multi_items()), body

        status, headers, body = self._portal.call(call)
        return httpx2.Response(status, headers=headers, content=body, request=request)

    def close(self) -> None:
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = None  # type: ignore[assignment]


class FlakyTransport(httpx2.BaseTransport):
    """Fails the first ``fail`` requests (a connection error, or a bare ``status`` answer), then
    passes requests on to ``inner``; counts every request it sees."""

    def __init__(self, inner: httpx2.BaseTransport, *, fail: int, status: int | None = None) -> None:
        self.inner = inner
        self.fail = fail
        self.status = status
        self.calls: list[str] = []

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        self.calls.append(f"{request.method} {request.url.path}")
        if len(self.calls) <= self.fail:
            if self.status is None:
                raise httpx2.ConnectError("connection refused (simulated)", request=request)
            return httpx2.Response(
                self.status, json={"code": "unavailable", "message": "busy (simulated)"}, request=request
            )
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


class AsyncFlakyTransport(httpx2.AsyncBaseTransport):
    """The async :class:`FlakyTransport`."""

    def __init__(self, inner: httpx2.AsyncBaseTransport, *, fail: int, status: int | None = None) -> None:
        self.inner = inner
        self.fail = fail
        self.status = status
        self.calls: list[str] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self.calls.append(f"{request.method} {request.url.path}")
        if len(self.calls) <= self.fail:
            if self.status is None:
                raise httpx2.ConnectError("connection refused (simulated)", request=request)
            return httpx2.Response(
                self.status, json={"code": "unavailable", "message": "busy (simulated)"}, request=request
            )
        return await self.inner.handle_async_request(request)


# --------------------------------------------------------------------------- live server


@contextmanager
def live_server(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free localhost port in a thread; yields its URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


# --------------------------------------------------------------------------- the worker's side


@dataclass
class SimulatedRun:
    """What the simulated worker produced (kept to re-evaluate the applied model)."""

    job_id: str
    search: Any
    result: Any
    model_dir: Path
    data_file: Path
    exported: dict[int, Path] = field(default_factory=dict)


def run_job(
    store: Any,
    job_id: str,
    work: Path,
    *,
    worker_id: str = "sim-worker",
    export: str = "recommended",
    stage_delay: float = 0.0,
    before_finish: Callable[[], None] | None = None,
) -> SimulatedRun:
    """Do what a worker does for the queued job ``job_id``: claim it, unpack its uploaded model and
    data, run the real search (heartbeats with stage and message), store the space, the
    sensitivity tables and every point in one ``finish_job``, and export the recommended point
    (``export="recommended"``), every point (``"all"``) or none (``"none"``) with ``search.export``."""
    from search.local import DataOptions, prepare
    from search.pipeline import SearchOptions
    from search.result import Budget
    from service.store import FrontInfo, PointRecord
    from service.uploads import extract_model_archive

    rec = store.claim_next_job(worker_id=worker_id)
    assert rec is not None and rec.id == job_id, rec
    spec = rec.spec

    def beat(stage: str, frac: float, msg: str) -> None:
        store.heartbeat(job_id=job_id, worker_id=worker_id, progress=frac, stage=stage, message=msg)
        if stage_delay:
            time.sleep(stage_delay)

    beat("loading", 0.02, "unpacking the uploaded model")
    work.mkdir(parents=True, exist_ok=True)
    assert spec.model.upload_id and spec.data.upload_id
    model_dir = extract_model_archive(
        store.upload_path(upload_id=spec.model.upload_id),
        work / "model",
        max_files=64,
        max_unpacked_bytes=10**9,
    )
    data_rec = store.get_upload(upload_id=spec.data.upload_id)
    data_file = work / data_rec.filename
    shutil.copy(store.upload_path(upload_id=spec.data.upload_id), data_file)
    space = spec.space
    options = SearchOptions(
        methods=tuple(m.value for m in spec.methods),
        granularity=space.granularity,
        bits=tuple(space.bits),
        symmetric=space.symmetric,
        ffn_block_size=space.ffn_block_size,
        include=tuple(space.include) or None,
        exclude=tuple(space.exclude) or None,
        include_head=space.include_head,
        include_embeddings=space.include_embeddings,
        budget=Budget(**{k: v for k, v in spec.budget.limits().items()}),
        front_points=spec.front_points,
        metric=spec.metric.value if spec.metric else None,
        seed=spec.seed,
        tie=None if space.tie is None else tuple(space.tie),
    )
    data = DataOptions(
        source=str(data_file),
        text_field=spec.data.text_field,
        label_field=spec.data.label_field,
        calibration=spec.data.calibration_size,
        evaluation=spec.data.evaluation_size,
        max_length=spec.data.max_length,
    )
    search = prepare(model_dir, data, options, task=spec.task.value, device="cpu")
    store.put_space(job_id=job_id, space=search.space_dict())
    result = search.run(on_progress=lambda s, f, m: beat(s, 0.05 + 0.9 * f, m))
    for table in result.sensitivities:
        store.put_sensitivity(job_id=job_id, method=table.method, table=table.to_dict())
    points = [
        PointRecord.model_validate({**p.to_dict(), "on_front": any(p is q for q in result.front)})
        for p in result.points
    ]
    if before_finish is not None:
        before_finish()
    done = store.finish_job(
        job_id=job_id,
        worker_id=worker_id,
        points=points,
        front_info=FrontInfo(
            metric=result.metric,
            higher_is_better=result.higher_is_better,
            baseline_metrics=result.baseline_metrics,
        ),
    )
    run = SimulatedRun(job_id, search, result, model_dir, data_file)
    if export != "none":
        from search.export import export_artifact

        ids = range(len(points)) if export == "all" else [done.recommended_point]
        for pid in ids:
            if pid is None:
                continue
            out = work / f"artifact-{pid}"
            export_artifact(
                search.model, search.space, result.points[pid].precision_map, out, model_dir=model_dir
            )
            store.put_artifact(job_id=job_id, point_id=pid, path_or_bytes=out)
            run.exported[pid] = out
    return run


def evaluate_applied(run: SimulatedRun, model: Any) -> dict[str, float]:
    """The applied model's metrics on the very evaluation batches the search used."""
    from search.tasks import evaluate

    return evaluate(model, run.search.evaluation, run.search.task, reference=run.search.reference())
