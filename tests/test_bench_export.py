"""The export benchmark's map (benchmarks/bench_export.py): the decisions take the options in turn, and a
decision an option does not fit takes the next one in turn that fits."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.bench_export import mixed_map
from search.adapter import ModelAdapter
from search.space import BitOption
from search.tasks import load_model
from tests.tiny import build_model


def test_mixed_map_takes_the_options_in_turn_skipping_those_that_do_not_fit(tmp_path: Path) -> None:
    # q/k/v/o/gate/up read 32 columns, down 64: 4g64 fits the down projections only.
    folder = build_model(tmp_path / "llama", "llama", task="causal_lm", layers=2, hidden=32, heads=4, intermediate=64)
    model = load_model(folder, "causal_lm").model
    space = ModelAdapter(model).build_space(granularity="layer", bits=("4g64", 8), tie=("qkv", "gate_up"), strict=False)
    options = [BitOption.parse(o) for o in ("4g64", "8", "32")]
    pmap = mixed_map(space, options)
    # decision k takes options[k % 3]; the qkv of block 0 and the gate/up of block 1 skip 4g64 for 8
    want = ["8", "8", "32", "4g64", "8", "32", "8", "8"]
    assert [[pmap[space.groups[gi].name].key() for gi in d] for d in space.decisions] == [
        [key] * len(d) for key, d in zip(want, space.decisions, strict=True)
    ]
    assert len(pmap) == len(space.groups)
    with pytest.raises(ValueError, match="q_proj"):
        mixed_map(space, [BitOption.parse("4g64")])
