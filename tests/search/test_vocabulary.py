"""One vocabulary: ``bitscout search`` (in this process) and ``bitscout submit`` (a job) take the same
flags with the same defaults, the wire schemas default to the same values, the older spellings
still work, and ``search --refine`` refines in-process as a job does."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from bitscout import cli_options as opt
from bitscout.commands import _submit_parser, submit_options
from bitscout.schemas import DataSource, JobSpec, RefineSpec, SearchSpaceSpec
from search.cli import build_parser, data_from_args, options_from_args

SHARED_GROUPS = ("search", "budget (at least one limit)", "search space", "data",
                 "refinement (knowledge distillation with learned step sizes, after the search)")  # fmt: skip


def _flags(parser: argparse.ArgumentParser, title: str) -> set[str]:
    [group] = [g for g in parser._action_groups if g.title == title]
    return {s for a in group._group_actions for s in a.option_strings if a.help is not argparse.SUPPRESS}


def _help_flags(parser: argparse.ArgumentParser) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", parser.format_help()))


def test_search_and_submit_offer_the_same_data_space_and_budget_flags() -> None:
    search, submit = build_parser(), _submit_parser()
    for title in SHARED_GROUPS:
        assert _flags(search, title) == _flags(submit, title), title
    shared = {f for title in SHARED_GROUPS for f in _flags(search, title)}
    wanted = {"--calibration-size", "--evaluation-size", "--max-length", "--batch-size", "--text-field",
              "--label-field", "--tokens-field", "--tags-field", "--bits", "--granularity", "--ffn-block-size",
              "--asymmetric", "--include", "--exclude", "--include-head", "--include-embeddings",
              "--max-head-prune", "--max-ffn-prune", "--max-size-mb", "--max-avg-bits", "--max-bops",
              "--max-latency-ms", "--device-profile", "--refine", "--refine-steps", "--method", "--option",
              "--metric", "--seed", "--front-points", "--task", "--device"}  # fmt: skip
    assert wanted <= shared
    # what --help shows: every shared flag in both, the older spellings in neither
    for parser in (search, submit):
        shown = _help_flags(parser)
        assert shared <= shown and not {"--calibration", "--evaluation"} & shown


def test_the_defaults_are_defined_once_and_the_wire_has_them() -> None:
    search_args = build_parser().parse_args(["--model", "m", "--data", "d.jsonl"])
    data, options = data_from_args(search_args), options_from_args(search_args)
    wire = JobSpec.model_validate({"model": {"path": "m"}, "task": "sequence_classification",
                                   "data": {"path": "d.jsonl"}, "methods": ["kl"], "budget": {"max_avg_bits": 4}})  # fmt: skip
    d, sp = wire.data, wire.space
    assert (data.calibration, data.evaluation, data.max_length, data.batch_size) == (
        d.calibration_size, d.evaluation_size, d.max_length, d.batch_size) == (128, 512, 128, 16)  # fmt: skip
    assert (data.text_field, data.label_field, data.tokens_field, data.tags_field) == (
        d.text_field, d.label_field, d.tokens_field, d.tags_field) == ("text", "label", "tokens", "tags")  # fmt: skip
    assert list(options.bits) == sp.bits and options.ffn_block_size == sp.ffn_block_size == 256
    assert options.granularity == sp.granularity and options.symmetric == sp.symmetric
    assert options.seed == wire.seed and options.front_points == wire.front_points
    assert options.include_head is sp.include_head is False and options.prune_limits.keep_one_head is sp.keep_one_head
    assert RefineSpec().steps == opt.DEFAULTS.refine_steps and DataSource(path="x").batch_size == opt.DEFAULTS.batch_size
    assert SearchSpaceSpec().bits == list(opt.DEFAULTS.bits)
    # submit sends only what was given: the service fills in the same defaults
    sub = _submit_parser().parse_args(["--model", "server:m", "--data", "server:d.jsonl", "--max-avg-bits", "4"])
    opts = submit_options(sub)
    assert "data_options" not in opts and "space" not in opts and "seed" not in opts


def test_the_older_spellings_still_work() -> None:
    a = build_parser().parse_args(["--model", "m", "--data", "d", "--calibration", "16", "--evaluation", "32"])
    assert (data_from_args(a).calibration, data_from_args(a).evaluation) == (16, 32)
    s = _submit_parser().parse_args(["--model", "server:m", "--data", "server:d.jsonl", "--max-size-mb", "3",
                                     "--calibration", "16", "--evaluation", "32"])  # fmt: skip
    assert submit_options(s)["data_options"] == {"calibration_size": 16, "evaluation_size": 32}


def test_submit_sends_every_space_and_data_flag() -> None:
    s = _submit_parser().parse_args([
        "--model", "server:m", "--data", "server:d.jsonl", "--max-size-mb", "3", "--include-head",
        "--include-embeddings", "--max-head-prune", "0.5", "--max-ffn-prune", "0.25", "--no-keep-one-head",
        "--batch-size", "8", "--tokens-field", "words", "--tags-field", "ner", "--task", "token_classification",
    ])  # fmt: skip
    opts = submit_options(s)
    assert opts["space"] == {"include_head": True, "include_embeddings": True, "max_head_fraction": 0.5,
                             "max_ffn_fraction": 0.25, "keep_one_head": False}  # fmt: skip
    assert opts["data_options"] == {"batch_size": 8, "tokens_field": "words", "tags_field": "ner"}
    from bitscout._base import prepare_submission

    prepared = prepare_submission(
        model=opts["model"], data=opts["data"], methods=opts["methods"], budget=opts["budget"], task=opts["task"],
        space=opts["space"], metric=None, seed=None, idempotency_key=None, data_options=opts["data_options"],
        extra={}, progress=False,
    )  # fmt: skip
    job = prepared.with_uploads(None, None)
    assert job.space.max_head_fraction == 0.5 and job.space.include_head and not job.space.keep_one_head
    assert job.data.batch_size == 8 and job.data.tokens_field == "words" and job.task.value == "token_classification"
    assert job.metric is not None and job.metric.value == "accuracy"


def test_search_refines_in_process_as_a_job_does(tmp_path: Path, trained_bert: Path, sentiment_file: Path) -> None:
    from dataclasses import replace

    from search.local import DataOptions, prepare
    from search.orchestration import SearchHooks, refine_choice, split_validation
    from search.refine import RefineConfig, refine

    args = ["--model", str(trained_bert), "--data", str(sentiment_file), "--bits", "2,4,8", "--max-avg-bits", "3",
            "--front-points", "4"]  # fmt: skip
    options = options_from_args(build_parser().parse_args([*args, "--refine", "2", "--refine-steps", "3"]))
    assert options.refine is not None and options.refine.points == 2 and options.refine.steps == 3
    data = DataOptions(str(sentiment_file), label_field="label", calibration=24, evaluation=32, max_length=16,
                       batch_size=8)  # fmt: skip
    plain = prepare(trained_bert, data, replace(options, refine=None), device="cpu").run()
    search = prepare(trained_bert, data, options, device="cpu")
    refined = search.run()
    result = replace(refined, points=[p for p in refined.points if not p.refined])
    assert [p.metrics for p in result.points] == [p.metrics for p in plain.points]
    chosen = refine_choice(search, plain, SearchHooks())
    budget = search.options.budget
    eligible = {p.precision_map for p in plain.points if p.method != "uniform" and budget.is_feasible(p.cost)}
    assert len(chosen) == min(2, len(eligible)) >= 1
    assert all(plain.points[i].method != "uniform" and budget.is_feasible(plain.points[i].cost) for i in chosen)
    best = min((p for p in plain.points if p.precision_map in eligible), key=lambda p: p.provenance["proxy"])
    assert plain.points[chosen[0]].provenance["proxy"] == best.provenance["proxy"]  # chosen on calibration rows

    new = refined.points[len(plain.points):]
    assert len(new) == len(chosen) and all(p.refined for p in new)
    assert [p.refined_from for p in new] == chosen
    # each refined point is what refining its origin directly gives (same seed, same held-back batches)
    train, validation = split_validation(search.calibration)
    assert len(validation) >= 1 and len(train) >= 1 and not set(map(id, train)) & set(map(id, validation))
    direct = refine(search, plain.points[chosen[0]].precision_map, config=RefineConfig(steps=3, seed=0),
                    train_batches=train, validation_batches=validation)  # fmt: skip
    assert new[0].metrics == direct.metrics
    assert new[0].precision_map == plain.points[chosen[0]].precision_map and new[0].cost == plain.points[chosen[0]].cost
    # the recommendation: the refined point of the map chosen on the calibration proxy, when refined
    rec, rec_plain = refined.info["recommended"], plain.info["recommended"]
    assert rec_plain is not None
    assert rec == next((i for i, p in enumerate(refined.points) if p.refined and p.refined_from == rec_plain), rec_plain)


def test_search_refine_on_the_command_line(tmp_path: Path, trained_bert: Path, sentiment_file: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from search.cli import search_main
    from search.result import SearchResult

    out = tmp_path / "r.json"
    rc = search_main(["--model", str(trained_bert), "--data", str(sentiment_file), "--calibration-size", "16",
                      "--evaluation-size", "32", "--max-length", "16", "--bits", "2,4,8", "--max-avg-bits", "4",
                      "--front-points", "4", "--refine", "recommended", "--refine-steps", "2", "--quiet",
                      "--out", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    result = SearchResult.from_json(out)
    assert sum(p.refined for p in result.points) == 1 and result.info["refine"]["steps"] == 2
    [new] = [p for p in result.points if p.refined]
    assert new.precision_map == result.points[new.refined_from].precision_map
