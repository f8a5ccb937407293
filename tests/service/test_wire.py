"""The wire contract the SDK is built on: error codes and bodies, and the schemas' documentation."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from bitscout import errors, schemas
from bitscout.errors import HTTP_STATUS, BitscoutError, ErrorBody, ErrorCode, error_from_body

ALL_MODELS = [
    getattr(schemas, name)
    for name in dir(schemas)
    if isinstance(getattr(schemas, name), type)
    and issubclass(getattr(schemas, name), BaseModel)
    and not name.startswith("_")
    and getattr(schemas, name).__module__ == schemas.__name__
]


def test_every_code_has_one_status_and_a_class() -> None:
    assert set(HTTP_STATUS) == set(ErrorCode)
    expected = {
        "invalid_request", "not_found", "unauthorized", "forbidden", "conflict", "payload_too_large",
        "rate_limited", "unavailable", "model_load_failed", "data_invalid", "budget_infeasible",
        "out_of_memory", "canceled", "internal",
    }  # fmt: skip
    assert {c.value for c in ErrorCode} == expected
    for code in ErrorCode:
        err = error_from_body(HTTP_STATUS[code], {"code": code.value, "message": "m", "field": "a.b"})
        assert isinstance(err, errors.error_class(code)) and err.code is code and err.field == "a.b"
        assert err.status == HTTP_STATUS[code]
        assert ErrorBody.model_validate(err.to_body().model_dump(mode="json")).code is code


@pytest.mark.parametrize(
    ("status", "body", "cls", "code"),
    [
        (404, {"code": "not_found", "message": "no job"}, errors.NotFound, "not_found"),
        (
            422,
            {"code": "invalid_request", "message": "x", "field": "budget"},
            errors.InvalidRequest,
            "invalid_request",
        ),
        (
            422,
            {"code": "budget_infeasible", "message": "x", "details": {"smallest": 3}},
            errors.InvalidRequest,
            "budget_infeasible",
        ),
        (401, {"code": "unauthorized", "message": "x"}, errors.Unauthorized, "unauthorized"),
        (409, {"code": "conflict", "message": "x"}, errors.Conflict, "conflict"),
        (413, {"code": "payload_too_large", "message": "x"}, errors.PayloadTooLarge, "payload_too_large"),
        (
            429,
            {"code": "rate_limited", "message": "x", "details": {"retry_after_s": 2.5}},
            errors.RateLimited,
            "rate_limited",
        ),
        (503, {"code": "unavailable", "message": "x"}, errors.ServiceUnavailable, "unavailable"),
        (502, "<html>bad gateway</html>", errors.ServiceUnavailable, "unavailable"),
        (500, None, errors.InternalError, "internal"),
        (422, {"detail": [{"loc": ["body"]}]}, errors.InvalidRequest, "invalid_request"),
        (418, {"code": "from_the_future", "message": "x"}, errors.InvalidRequest, "invalid_request"),
    ],
)
def test_error_from_body(status: int, body: Any, cls: type[BitscoutError], code: str) -> None:
    err = error_from_body(status, body)
    assert type(err) is cls and err.code.value == code and err.status == status
    assert isinstance(err, BitscoutError) and str(err)


def test_rate_limited_and_job_failed() -> None:
    err = error_from_body(
        429, {"code": "rate_limited", "message": "slow down", "details": {"retry_after_s": 2.5}}
    )
    assert isinstance(err, errors.RateLimited) and err.retry_after == 2.5
    jf = errors.JobFailed("no config.json", job_id="abc", code="model_load_failed")
    assert jf.code is ErrorCode.model_load_failed and jf.job_id == "abc" and "model_load_failed" in str(jf)
    assert errors.NotFound("x").status == 404 and errors.NotFound().message


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.__name__)
def test_every_field_is_described(model: type[BaseModel]) -> None:
    for name, field in model.model_fields.items():
        assert field.description, f"{model.__name__}.{name} has no description"


def test_numbers_are_bounded() -> None:
    """Every number a client sends has bounds (ints and floats in request models)."""
    for model in ALL_MODELS:
        if model.model_config.get("extra") != "forbid":
            continue
        schema = model.model_json_schema()
        for name, prop in schema.get("properties", {}).items():
            options = prop.get("anyOf", [prop])
            for opt in options:
                if opt.get("type") in ("integer", "number"):
                    assert ("minimum" in opt or "exclusiveMinimum" in opt) and "maximum" in opt, (
                        model.__name__,
                        name,
                    )


def test_job_spec_defaults_and_metric() -> None:
    base = {
        "model": {"path": "m"},
        "data": {"path": "d.jsonl"},
        "methods": ["kl", "hessian"],
        "budget": {"max_size_mb": 5},
    }
    for task, metric in [
        ("sequence_classification", "accuracy"),
        ("embeddings", "cosine"),
        ("causal_lm", "perplexity"),
    ]:
        spec = schemas.JobSpec.model_validate({**base, "task": task})
        assert spec.metric is not None and spec.metric.value == metric
        assert spec.front_points == 16 and spec.device.value == "auto"
    with pytest.raises(ValidationError):
        schemas.JobSpec.model_validate({**base, "task": "embeddings", "metric": "accuracy"})
    create = schemas.JobCreate.model_validate({**base, "task": "causal_lm", "idempotency_key": "k"})
    assert "idempotency_key" not in create.spec().model_dump()
    assert schemas.SCHEMA_VERSION
    assert schemas.JobStatus.succeeded.finished and not schemas.JobStatus.running.finished


def test_sources_need_exactly_one() -> None:
    with pytest.raises(ValidationError):
        schemas.ModelSource()
    with pytest.raises(ValidationError):
        schemas.ModelSource(path="a", upload_id="0" * 32)
    with pytest.raises(ValidationError):
        schemas.DataSource(path="a", dataset="b")
    assert schemas.DataSource(dataset="ag_news").split == "train"


def test_sdk_modules_import_without_server_dependencies() -> None:
    code = (
        "import sys, bitscout.schemas, bitscout.errors\n"
        "bad = [m for m in ('fastapi', 'sqlalchemy', 'starlette', 'torch', 'service', 'search') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_method_options_name_methods_of_the_job() -> None:
    base = {
        "model": {"path": "m"},
        "data": {"path": "d.jsonl"},
        "task": "sequence_classification",
        "methods": ["kl", "hessian"],
        "budget": {"max_size_mb": 5},
    }
    spec = schemas.JobSpec.model_validate({**base, "method_options": {"hessian": {"max_probes": 48}}})
    assert spec.method_options[schemas.Method.hessian] == {"max_probes": 48}
    assert schemas.JobSpec.model_validate(base).method_options == {}
    with pytest.raises(ValidationError, match="does not run: dnas"):
        schemas.JobSpec.model_validate({**base, "method_options": {"dnas": {"steps": 3}}})
    with pytest.raises(ValidationError):
        schemas.JobSpec.model_validate({**base, "method_options": {"magic": {}}})

