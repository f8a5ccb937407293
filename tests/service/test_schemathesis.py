"""Property-based run over the OpenAPI document: no input a client can send gives a server error.

Bounded (a few dozen examples per operation, SQLite) so that it finishes in well under a minute.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
)

from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.store import Store  # noqa: E402
from tests.service.conftest import job_spec, make_points  # noqa: E402
from tests.service.test_api import FakeResolver  # noqa: E402

_STATE: dict[str, Any] = {}


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("schemathesis")
    shutil.copy(sqlite_template, tmp / "s.db")
    cfg = Settings(
        database_url=f"sqlite:///{tmp / 's.db'}",
        data_dir=tmp / "data",
        model_root=tmp / "models",
        data_root=tmp / "inputs",
        submit_rate_per_min=0,
        upload_rate_per_min=0,
        max_upload_mb=1,
    )
    store = Store.from_settings(cfg)
    _, token = store.create_token(name="alice")
    # a finished job with points and a stored artifact, so that its routes have something to read
    store.create_job(owner="alice", spec=job_spec())
    rec = store.claim_next_job(worker_id="w")
    assert rec is not None
    store.finish_job(job_id=rec.id, worker_id="w", points=make_points(3))
    store.put_artifact(job_id=rec.id, point_id=0, path_or_bytes=b"x")
    store.put_space(job_id=rec.id, space={"groups": ["a"]})
    store.put_sensitivity(job_id=rec.id, method="kl", table={"scores": {"a": {"4": 0.1}}, "samples": 8})
    _STATE["headers"] = {"Authorization": f"Bearer {token}"}
    _STATE["job_id"] = rec.id
    app = create_app(cfg, store=store, resolver=FakeResolver())
    schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", app)
    yield schema
    store.close()


def _run(strategy: Any, headers: dict[str, str], n: int) -> None:
    @given(case=strategy)
    @settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        case.call_and_validate(
            headers=headers,
            checks=[not_a_server_error, response_schema_conformance, content_type_conformance],
        )

    run()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(api_schema: Any, mode: GenerationMode) -> None:
    """Every operation, valid and invalid inputs: never a 5xx, and responses match the document."""
    ops = [r.ok() for r in api_schema.get_all_operations()]
    assert len(ops) >= 12
    ran = 0
    for op in ops:
        try:
            _run(
                op.as_strategy(generation_mode=mode),
                _STATE["headers"],
                25 if mode is GenerationMode.POSITIVE else 15,
            )
            ran += 1
        except Unsatisfiable:
            # An operation without inputs (e.g. GET /healthz) has no invalid variant.
            assert mode is GenerationMode.NEGATIVE
    assert ran >= 10


def test_routes_of_a_finished_job(api_schema: Any) -> None:
    """Valid inputs on the stored job's own routes: real data must match the documented schemas."""
    ran = 0
    for op in (r.ok() for r in api_schema.get_all_operations()):
        if "{job_id}" not in op.path:
            continue
        params = {"job_id": _STATE["job_id"]}
        if "{point_id}" in op.path:
            params["point_id"] = 0
        _run(
            op.as_strategy(generation_mode=GenerationMode.POSITIVE, path_parameters=params),
            _STATE["headers"],
            10,
        )
        ran += 1
    assert ran >= 7
