"""The closed loop on the wire, through the real app: its options in the job spec (defaults filled
in, a bad field refused with its path) and every point's provenance in the pareto and point reads."""

from __future__ import annotations

from bitscout.methods import provenance_text
from tests.service.conftest import job_spec, make_points
from tests.service.test_api import API, Api, api, assert_error  # noqa: F401  (the fixture)


def test_the_loop_is_on_by_default_and_its_options_are_validated(api: Api) -> None:  # noqa: F811
    job = api.submit()
    assert job["spec"]["loop"] == {"enabled": True, "rounds": 2, "local_steps": 32, "extra_points": 4,
                                   "noise_floor": None}
    off = api.submit(loop={"enabled": False})
    assert off["spec"]["loop"]["enabled"] is False
    for bad, field in (({"rounds": 99}, "loop.rounds"), ({"local_stepz": 1}, "loop.local_stepz"),
                       ({"noise_floor": -1.0}, "loop.noise_floor")):
        r = api.client.post(f"{API}/jobs", json=job_spec(loop=bad), headers=api.h())
        assert_error(r, 422, "invalid_request", field)


def test_every_point_reads_back_with_its_provenance(api: Api) -> None:  # noqa: F811
    job = api.submit()
    rec = api.store.claim_next_job(worker_id="w")
    assert rec is not None and rec.id == job["id"]
    points = make_points(5)
    provs = [
        {"score": "kl", "round": 0, "local_search": False, "guard": False, "how": "sweep", "proxy": 0.5},
        {"score": "kl", "round": 2, "local_search": False, "guard": False, "how": "budget", "proxy": 0.1},
        {"score": "kl", "round": 1, "local_search": True, "guard": False, "how": "local from uniform 4-bit",
         "proxy": 0.05},
        {"score": "kl", "round": 1, "local_search": False, "guard": True, "how": "guard at uniform 4-bit",
         "proxy": 0.04},
        {"score": "hessian", "round": 0, "local_search": False, "guard": False, "how": "sweep", "proxy": 0.01},
    ]
    for p, prov in zip(points, provs, strict=False):
        p["provenance"] = prov
    for p in points[len(provs):]:
        p["provenance"] = {"reference": True, "score": None}
    api.store.finish_job(job_id=rec.id, worker_id="w", points=points, front_info={"baseline_metrics": {"accuracy": 0.97}})
    pareto = api.client.get(f"{API}/jobs/{rec.id}/pareto", headers=api.h()).json()
    got = [p["provenance"] for p in pareto["points"]]
    for g, want in zip(got, provs, strict=False):
        assert {k: g[k] for k in want} == want
    assert [provenance_text(g) for g in got[:5]] == ["kl r0", "kl r2", "kl r1 +ls", "kl guard", "hessian r0"]
    assert all(g["reference"] for g in got[5:])
    one = api.client.get(f"{API}/jobs/{rec.id}/points/2", headers=api.h()).json()
    assert one["provenance"]["local_search"] is True and one["provenance"]["how"] == "local from uniform 4-bit"
    # the CLI's table of the same read
    from bitscout._front import Front
    from bitscout.commands import front_table
    from bitscout.schemas import ParetoRead

    table = front_table(Front.from_read(ParetoRead.model_validate(pareto)))
    head, *rows = table.splitlines()
    assert "found" in head
    assert "kl r1 +ls" in rows[2] and "kl guard" in rows[3] and "reference" in rows[5]
