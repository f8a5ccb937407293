"""A sensitivity stage split across two local Ray workers (and the runner): the table equals the one
the search computes in one process, to the last bit."""

from __future__ import annotations

from pathlib import Path

import torch

from search.local import DataOptions, prepare
from search.pipeline import SearchOptions
from tests.tiny import build_model, sentiment_rows, write_jsonl
from workers.pool import EvalPool, ScorePool


def test_a_table_scored_across_two_ray_workers_equals_the_one_process_table(ray_session, tmp_path: Path):
    model = build_model(tmp_path / "llama", "llama", task="causal_lm", layers=3)
    data = write_jsonl(tmp_path / "text.jsonl", sentiment_rows(60, seed=4))
    search = prepare(model, DataOptions(str(data), calibration=20, evaluation=8, max_length=16, batch_size=4),
                     SearchOptions(methods=("kl",), bits=(2, 4, 8)), task="causal_lm", device="cpu")  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what the tasks run with: the same kernels, the same rounding
    try:
        whole = search.sensitivity("kl")
        shipped = EvalPool(search, size=0)
        pool = ScorePool(search, shipped._ship, size=2, cpus=1.0)
        split = pool.score("kl")
    finally:
        torch.set_num_threads(threads)
    assert split is not None
    where = pool.placement["kl"]
    assert len(where) == 3 and sum(where.values()) == len(search.calibration) == 5  # runner + two workers
    assert split.extra["parts"] == 3
    assert split.scores == whole.scores
    assert split.samples == whole.samples


def test_the_pool_declines_what_it_cannot_split(ray_session, tmp_path: Path):
    model = build_model(tmp_path / "llama", "llama", task="causal_lm", layers=2)
    data = write_jsonl(tmp_path / "text.jsonl", sentiment_rows(30, seed=5))
    search = prepare(model, DataOptions(str(data), calibration=8, evaluation=4, max_length=16, batch_size=4),
                     SearchOptions(methods=("fisher", "kl"), bits=(4, 8)), task="causal_lm", device="cpu")  # fmt: skip
    ship = EvalPool(search, size=0)._ship
    assert ScorePool(search, ship, size=2).score("fisher") is None  # not scored in parts
    assert ScorePool(search, ship, size=0).score("kl") is None  # no workers asked for
