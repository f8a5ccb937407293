"""A job with tensor-train options, run by the runner in-process (no Ray): the TT options reach the
space, the allocator picks some, the stored points name ``tt_rank``, and a bad rank fails the job (or
the request) naming ``space.tt_ranks``."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bitscout.schemas import JobSpec
from tests.workers.conftest import Env, tiny_spec
from workers.runner import JobRunner


def _run(env: Env, job_id: str, worker: str):
    claim = env.store.claim_next_job(worker_id=worker)
    assert claim is not None and claim.id == job_id
    return JobRunner(job_id, worker, env.config(eval_workers=0), store=env.store).run()


def test_a_job_with_tt_ranks_searches_tt_options_and_stores_their_rank(env: Env):
    job = env.submit(space={"tt_ranks": [4, 8]}, budget={"max_avg_bits": 3.0})
    out = _run(env, job.id, "w/tt")
    assert out.status == "succeeded", out
    table = env.store.get_sensitivities(job_id=job.id)[0]
    keys = set(next(iter(table.scores.values())))
    assert {"tt4@2", "tt4@4", "tt4@8", "tt8@2", "tt8@4", "tt8@8"} <= keys
    points = env.store.get_points(job_id=job.id)
    tt_entries = [o for p in points for o in p.precision_map.values() if o.tt_rank is not None]
    assert tt_entries and all(o.tt_rank in (4, 8) and o.key().startswith("tt") for o in tt_entries)
    plain = next(o for p in points for o in p.precision_map.values() if o.tt_rank is None)
    assert plain.model_dump()["tt_rank"] is None


def test_a_tt_rank_no_matrix_takes_fails_the_job_naming_space_tt_ranks(env: Env):
    job = env.submit(space={"tt_ranks": [4000]})
    out = _run(env, job.id, "w/tt-bad")
    assert out.status == "failed" and out.code == "invalid_request"
    message = env.store.get_job(job_id=job.id).error_message or ""
    assert message.startswith("space.tt_ranks: tensor-train rank 4000 fits no matrix"), message


@pytest.mark.parametrize("ranks,says", [([0], "space.tt_ranks.0"), ([8, 8], "space.tt_ranks"), ([True], "space.tt_ranks.0")])
def test_the_wire_refuses_bad_tt_ranks_naming_the_field(ranks, says):
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate(tiny_spec(space={"tt_ranks": ranks}))
    assert says in {".".join(map(str, err["loc"])) for err in e.value.errors()}
