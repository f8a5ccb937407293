"""The bit-option grammar and the tie kinds, written once in ``bitscout.options``: the parser, the
wire's ``space.bits`` / ``space.tie``, the service's stored entries, and the CLIs' flags."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from pydantic import ValidationError

from bitscout import cli_options, schemas
from bitscout.commands import _submit_parser, submit_options
from bitscout.options import (
    OptionFields,
    OptionSyntaxError,
    option_key,
    parse_option,
    parse_ties,
    wire_option,
)

BASE = {
    "model": {"path": "m"},
    "data": {"path": "d.jsonl"},
    "task": "causal_lm",
    "methods": ["kl"],
    "budget": {"max_size_mb": 5},
}


@pytest.mark.parametrize(
    "text,fields,key",
    [
        ("4", OptionFields(4), "4"),
        ("4a", OptionFields(4, False), "4a"),  # the key stored sensitivity tables use for asymmetric grids
        ("4s", OptionFields(4, True), "4"),
        ("4g128", OptionFields(4, None, 128), "4g128"),
        ("4ag128", OptionFields(4, False, 128), "4ag128"),
        (" 3G64 ", OptionFields(3, None, 64), "3g64"),
        ("0", OptionFields(0), "0"),
        ("32a", OptionFields(32, True), "32"),  # a grid means nothing for a float option
        (8, OptionFields(8), "8"),
        ({"bits": 4, "symmetric": False, "group_size": 32}, OptionFields(4, False, 32), "4ag32"),
        ({"bits": 4, "symmetric": True, "group_size": None}, OptionFields(4, True), "4"),
        ("4a8", OptionFields(4, None, None, 8), "4a8"),  # 'a' followed by digits: activation bits
        ("4aa8", OptionFields(4, False, None, 8), "4aa8"),
        ("4g128a16", OptionFields(4, None, 128, 16), "4g128a16"),
        ("4ag128a8", OptionFields(4, False, 128, 8), "4ag128a8"),
        ({"bits": 8, "symmetric": True, "group_size": None, "act_bits": 8}, OptionFields(8, True, None, 8), "8a8"),
    ],
)
def test_the_grammar_reads_widths_grids_and_group_sizes(text, fields, key):
    assert parse_option(text) == fields
    assert parse_option(text).key() == key
    assert parse_option(parse_option(text).key()).key() == key


def test_keys_and_the_default_grid():
    assert option_key(4, True, 128) == "4g128" and option_key(4, False) == "4a" and option_key(16, False) == "16"
    assert parse_option("4g128").key(symmetric=False) == "4ag128"
    assert parse_option("4sg128").key(symmetric=False) == "4g128"
    assert [wire_option(x) for x in ("4", 8, "4g128", "4a", "4s", "32a")] == [4, 8, "4g128", "4a", "4s", 32]


@pytest.mark.parametrize(
    "bad,says",
    [
        ("4a7", "activation width 7"),
        ("4a32", "activation width 32"),
        ("16a8", "integer weight widths"),
        ({"bits": 0, "act_bits": 8}, "integer weight widths"),
        ({"bits": 4, "act_bits": True}, "activation width"),
        ("tt8@4a8", "activation bits do not apply"),
        ("tt8@0", "cannot be pruned"),
        ("tt8@4g128", "tensor-train cores"),
        ("tt0@4", "tensor-train rank"),
        ("tt5000@4", "tensor-train rank"),
        ({"bits": 4, "tt_rank": True}, "tensor-train rank"),
        ("16g128", "integer widths"),
        ("0g64", "integer widths"),
        ("4g0", "group size"),
        ("7", "unknown bit-width 7"),
        ("4x", "syntax"),
        ("g128", "syntax"),
        ("", "syntax"),
        (True, "cannot read"),
        ({"symmetric": True}, "'bits'"),
    ],
)
def test_what_the_grammar_refuses_it_says(bad, says):
    with pytest.raises(OptionSyntaxError) as e:
        parse_option(bad)
    assert says in str(e.value)


def test_tie_kinds_by_name_or_short_name():
    assert parse_ties("qkv,gate_up") == ("attention_inputs", "ffn_inputs")
    assert parse_ties(["ffn_inputs", "gate_up"]) == ("ffn_inputs",)
    assert parse_ties("none") == parse_ties([]) == parse_ties(None) == ()
    for bad in ("qkvo", "none,qkv", [3]):
        with pytest.raises(OptionSyntaxError):
            parse_ties(bad)  # type: ignore[arg-type]


def test_the_wire_takes_option_strings_and_ints_and_names_the_field():
    spec = schemas.JobSpec.model_validate({**BASE, "space": {"bits": ["4g128", 8, "3g64", "4a", 2]}})
    assert spec.space.bits == [2, "3g64", "4a", "4g128", 8]
    assert schemas.JobSpec.model_validate({**BASE, "space": {"bits": ["8a8", "4a8"]}}).space.bits == ["4a8", "8a8"]
    assert schemas.JobSpec.model_validate(BASE).space.bits == [2, 3, 4, 6, 8, 32]  # the default: unchanged
    for bad, says in (
        [["4a7"], "activation width"], [["4g", 8], "cannot read"], [[4, " 4g8", "4G8"], "unique"], [[0], "other than 0"],
        [["4", 8], "an integer"], [[4.0, 8], "cannot read"],
    ):
        with pytest.raises(ValidationError) as e:
            schemas.JobSpec.model_validate({**BASE, "space": {"bits": bad}})
        err = e.value.errors()[0]
        assert err["loc"][:2] == ("space", "bits") and says in err["msg"], err


def test_the_wire_takes_tie_kinds_and_leaves_the_default_to_the_task():
    assert schemas.JobSpec.model_validate(BASE).space.tie is None
    spec = schemas.JobSpec.model_validate({**BASE, "space": {"tie": ["qkv", "gate_up"]}})
    assert spec.space.tie == ["attention_inputs", "ffn_inputs"]
    assert schemas.JobSpec.model_validate({**BASE, "space": {"tie": "none"}}).space.tie == []
    with pytest.raises(ValidationError) as e:
        schemas.JobSpec.model_validate({**BASE, "space": {"tie": ["qkvo"]}})
    assert e.value.errors()[0]["loc"][:2] == ("space", "tie")


def test_a_point_names_every_field_and_its_key():
    opt = schemas.BitOptionRead.model_validate({"bits": 4, "symmetric": True, "group_size": 128})
    assert opt.key() == "4g128"
    assert opt.model_dump() == {"bits": 4, "symmetric": True, "group_size": 128, "act_bits": None, "tt_rank": None}
    assert schemas.BitOptionRead.model_validate({"bits": 4, "symmetric": False}).group_size is None
    w4a8 = schemas.BitOptionRead.model_validate({"bits": 4, "symmetric": True, "group_size": None, "act_bits": 8})
    assert w4a8.key() == "4a8"
    tt = schemas.BitOptionRead.model_validate({"bits": 4, "symmetric": True, "tt_rank": 16})
    assert tt.key() == "tt16@4" and tt.model_dump() == {
        "bits": 4, "symmetric": True, "group_size": None, "act_bits": None, "tt_rank": 16,
    }  # fmt: skip


def test_the_store_normalises_entries_with_the_same_grammar():
    pytest.importorskip("sqlalchemy", reason="the service's store needs the server extra")
    from service.store.records import PointOption

    assert PointOption.model_validate("4ag64").model_dump() == {
        "bits": 4, "symmetric": False, "group_size": 64, "act_bits": None, "tt_rank": None,
    }  # fmt: skip
    assert PointOption.model_validate("4a8").model_dump(exclude_none=True) == {
        "bits": 4, "symmetric": True, "act_bits": 8,
    }  # fmt: skip
    assert PointOption.model_validate("tt16@4a").model_dump(exclude_none=True) == {
        "bits": 4, "symmetric": False, "tt_rank": 16,
    }  # fmt: skip
    assert PointOption.model_validate({"bits": 4, "symmetric": True}).model_dump(exclude_none=True) == {
        "bits": 4, "symmetric": True,
    }  # fmt: skip
    with pytest.raises(ValidationError):
        PointOption.model_validate("4a7")


def test_the_clis_read_bits_and_ties_with_the_grammar():
    assert cli_options.bit_list("4g128,8,3g64") == ["4g128", 8, "3g64"]
    assert cli_options.tie_list("none") == [] and cli_options.tie_list("qkv") == ["attention_inputs"]
    assert cli_options.bit_list("4a8,8") == ["4a8", 8]
    with pytest.raises(argparse.ArgumentTypeError):
        cli_options.bit_list("4a7")
    sub = _submit_parser().parse_args(["--model", "server:m", "--data", "server:d.jsonl", "--max-avg-bits", "4",
                                       "--bits", "4g128,8", "--tie", "gate_up"])
    assert submit_options(sub)["space"] == {"bits": ["4g128", 8], "tie": ["ffn_inputs"]}
    pytest.importorskip("torch", reason="the in-process search CLI needs the search extra")
    from search.cli import build_parser, options_from_args

    a = build_parser().parse_args(["--model", "m", "--data", "d", "--bits", "4g128,8", "--tie", "gate_up"])
    opts = options_from_args(a)
    assert opts.bits == ("4g128", 8) and opts.tie == ("ffn_inputs",)
    assert options_from_args(build_parser().parse_args(["--model", "m", "--data", "d"])).tie is None


def test_the_grammar_is_a_leaf_without_dependencies():
    code = (
        "import sys, bitscout.options\n"
        "bad = [m for m in ('pydantic', 'httpx2', 'torch', 'bitscout.schemas', 'bitscout._base') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
