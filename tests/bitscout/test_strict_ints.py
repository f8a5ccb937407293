"""Integer fields of a job take integers only: ``true``, ``"5"`` and ``5.0`` are refused with the field
named, by the SDK before anything is sent and by the service (a raw request) with a 422."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import pytest

import bitscout
from bitscout.schemas import JobCreate
from tests.bitscout.conftest import Service

BASE: dict[str, Any] = {
    "model": {"hf_id": "org/model", "revision": "a" * 40},
    "task": "sequence_classification",
    "data": {"dataset": "ag_news"},
    "methods": ["kl"],
    "budget": {"max_size_mb": 10},
}

#: (where the integer goes, the field the error names)
INTEGER_FIELDS: list[tuple[tuple[str, ...], str]] = [
    (("seed",), "seed"),
    (("front_points",), "front_points"),
    (("data", "calibration_size"), "data.calibration_size"),
    (("data", "evaluation_size"), "data.evaluation_size"),
    (("data", "max_length"), "data.max_length"),
    (("data", "batch_size"), "data.batch_size"),
    (("space", "ffn_block_size"), "space.ffn_block_size"),
    (("refine", "steps"), "refine.steps"),
    (("refine", "points"), "refine.points"),
]
NOT_INTEGERS: list[Any] = [True, "5", 5.0]


def _with(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    body = json.loads(json.dumps(BASE))
    node = body
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return body


@pytest.mark.parametrize("value", NOT_INTEGERS, ids=repr)
@pytest.mark.parametrize(("path", "field"), INTEGER_FIELDS, ids=lambda x: ".".join(x) if isinstance(x, tuple) else x)
def test_the_schema_refuses_what_is_not_an_integer(path: tuple[str, ...], field: str, value: Any) -> None:
    good = _with(path, 16 if path[-1] != "points" else 2)
    JobCreate.model_validate_json(json.dumps(good))
    with pytest.raises(bitscout.InvalidRequest) as exc:
        bitscout._base._validate(JobCreate, _with(path, value))
    assert exc.value.field == field, exc.value


def test_bit_widths_are_integers_too() -> None:
    for value in (True, "4", 4.0):
        with pytest.raises(bitscout.InvalidRequest) as exc:
            bitscout._base._validate(JobCreate, _with(("space", "bits"), [value, 8]))
        assert exc.value.field == "space.bits.0"


def test_the_service_answers_422_naming_the_field(service: Service) -> None:
    http = httpx2.Client(transport=service.transport(), base_url="http://testserver",
                         headers={"Authorization": f"Bearer {service.tokens['alice']}"})  # fmt: skip
    try:
        for value in NOT_INTEGERS:
            r = http.post("/api/v1/jobs", json=_with(("seed",), value))
            assert r.status_code == 422, r.text
            body = r.json()
            assert body["code"] == "invalid_request" and body["field"] == "seed", body
        r = http.post("/api/v1/jobs", json=_with(("data", "calibration_size"), "64"))
        assert r.status_code == 422 and r.json()["field"] == "data.calibration_size"
        assert service.store.list_jobs().total == 0  # nothing refused was stored
        r = http.post("/api/v1/jobs", json=_with(("seed",), 5))
        assert r.status_code == 201 and r.json()["spec"]["seed"] == 5
    finally:
        http.close()


def test_the_sdk_refuses_before_sending(service: Service) -> None:
    from tests.bitscout.support import FlakyTransport

    counting = FlakyTransport(service.transport(), fail=0)
    client = service.client(transport=counting)
    spec = {"model": "hf:org/model@" + "a" * 40, "data": "dataset:ag_news", "task": "sequence_classification",
            "budget": {"max_size_mb": 10}}  # fmt: skip
    for value in NOT_INTEGERS:
        with pytest.raises(bitscout.InvalidRequest) as exc:
            client.submit(**spec, seed=value)
        assert exc.value.field == "seed" and str(exc.value).count("seed") == 1
    assert counting.calls == []
