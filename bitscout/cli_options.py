"""One vocabulary for the commands that describe a search: ``bitscout search`` (in this process)
and ``bitscout submit`` (a job on the service) take the same flags with the same defaults, and
the wire schemas (:mod:`bitscout.schemas`) default to the same values. Standard library only, so
that both the SDK and the search library import it.

Every flag is added with the argparse default ``None`` ("not given"): ``submit`` then sends only
what was given (a job file or the service fills in the rest, with these same defaults), and
``search`` fills the rest from :data:`DEFAULTS` (:func:`fill_defaults`). Older spellings stay as
hidden aliases (``--calibration`` for ``--calibration-size``, ``--evaluation`` for
``--evaluation-size``), so existing scripts keep working.

==========================  ==============================================  ====================
flag                        what                                            default
==========================  ==============================================  ====================
``--task``                  what the model does                             from config.json
``--method``                kl, hessian, dnas, nsga2 (repeat)               kl
``--option M.KEY=VALUE``    an option of one method (repeat)
``--metric``                the metric that orders the front                by task
``--seed``                  data split, probes, search                      0
``--front-points``          budgets in the sweep that traces the front      16
``--max-size-mb`` ...       budget limits (at least one)
``--device-profile``        the device latency is modelled on               a100
``--bits``                  allowed bit options (0 prunes, 32 unchanged,    2,3,4,6,8,32
                            ``4a`` asymmetric, ``4g128`` a scale per 128
                            input columns: :mod:`bitscout.options`)
``--tt-ranks``              tensor-train ranks: adds tt<r>@<b> for every    none
                            rank r and width b of --bits
``--tie``                   sibling projections taking one option: qkv,     by task (causal LMs:
                            gate_up or none                                 qkv,gate_up)
``--granularity``           layer or group                                  layer
``--ffn-block-size``        FFN neurons per group (group granularity)       256
``--asymmetric``            asymmetric integer grids                        symmetric
``--include`` / ``--exclude``  globs over module names (repeat)
``--include-head``          also search the task head / lm_head             no
``--include-embeddings``    also search the embedding matrices              no
``--max-head-prune``        largest fraction of a block's heads pruned      no cap
``--max-ffn-prune``         largest fraction of a block's FFN groups pruned  no cap
``--no-keep-one-head``      allow pruning every head of a block             keep one
``--text-field``            the text column                                 text
``--label-field``           the label column (classification, regression)   label
``--tokens-field``          the word list (token classification)            tokens
``--tags-field``            the tag list (token classification)             tags
``--calibration-size``      calibration rows                                128
``--evaluation-size``       evaluation rows (disjoint from calibration)     512
``--max-length``            tokens per sequence                             128
``--batch-size``            sequences per batch                             16
``--refine POINTS``         'recommended' or K lowest-discrepancy maps      no refinement
``--refine-steps``          optimizer steps per refined point               200
``--device``                auto, cpu or cuda                               auto
==========================  ==============================================  ====================
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from bitscout import options as bit_options
from bitscout.latency import LatencyTableError, check_device_profile, parse_latency_table

__all__ = [
    "DEFAULTS",
    "METHODS",
    "TASKS",
    "Defaults",
    "add_budget_options",
    "add_data_options",
    "add_refine_options",
    "add_search_options",
    "add_space_options",
    "bit_list",
    "tie_list",
    "fill_defaults",
    "method_option",
    "method_options",
    "refine_points",
]

#: The tasks a search knows (the wire's ``Task`` enum and ``search.tasks.TASKS`` hold the same names).
TASKS: tuple[str, ...] = (
    "sequence_classification", "token_classification", "regression", "embeddings", "causal_lm",
)  # fmt: skip
#: The built-in search methods.
METHODS: tuple[str, ...] = ("kl", "hessian", "dnas", "nsga2")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Defaults:
    """The default of every shared option (the wire schemas use the same values)."""

    methods: tuple[str, ...] = ("kl",)
    seed: int = 0
    front_points: int = 16
    device_profile: str = "a100"
    bits: tuple[int | str, ...] = (2, 3, 4, 6, 8, 32)
    tt_ranks: tuple[int, ...] = ()
    granularity: str = "layer"
    ffn_block_size: int = 256
    asymmetric: bool = False
    include_head: bool = False
    include_embeddings: bool = False
    keep_one_head: bool = True
    text_field: str = "text"
    label_field: str = "label"
    tokens_field: str = "tokens"
    tags_field: str = "tags"
    calibration_size: int = 128
    evaluation_size: int = 512
    max_length: int = 128
    batch_size: int = 16
    refine_steps: int = 200
    device: str = "auto"


DEFAULTS = Defaults()

_LIMITS = (
    ("max_size_mb", "MB", "largest model size in megabytes (10^6 bytes)"),
    ("max_avg_bits", "BITS", "largest average bits per weight"),
    ("max_bops", "BOPS", "largest bit operations per sequence"),
    ("max_latency_ms", "MS", "largest modelled latency in milliseconds"),
)
LIMIT_NAMES: tuple[str, ...] = tuple(n for n, _, _ in _LIMITS)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


# --------------------------------------------------------------------------- value types


def bit_list(text: str) -> list[int | str]:
    """``2,4,8`` -> ``[2, 4, 8]``; options in the grammar of :mod:`bitscout.options` (``4a``,
    ``4g128``, ``4ag128``) are kept as text."""
    parts = [x for x in text.replace(" ", "").split(",") if x]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected comma-separated bit options such as 2,4,8 or 4g128,8, got {text!r}")
    try:
        return [bit_options.wire_option(x) for x in parts]
    except bit_options.OptionSyntaxError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def act_bit_list(text: str) -> list[int]:
    """``8,16`` -> ``[8, 16]``: activation widths crossed with the integer options of ``--bits``."""
    try:
        return list(bit_options.parse_act_bits(text))
    except bit_options.OptionSyntaxError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def json_file(text: str) -> dict[str, Any]:
    """The JSON object in file ``text`` (a latency table, a device profile)."""
    try:
        data = json.loads(Path(text).read_text())
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError(f"{text!r} does not hold a JSON object")
    return data


def device_profile_arg(text: str) -> str | dict[str, Any]:
    """A profile name (``a100``), or a JSON file of a custom profile's figures
    (:data:`bitscout.latency.DEVICE_PROFILE_FIELDS`), checked here (a bad figure is named)."""
    if not text.lower().endswith(".json"):
        return text
    data = json_file(text)
    try:
        return check_device_profile(data)
    except LatencyTableError as exc:
        raise argparse.ArgumentTypeError(f"{text}: device_profile.{exc.field}: {exc}") from None


def latency_table_arg(text: str) -> dict[str, Any]:
    """A latency table file (``bitscout profile --out``), checked here (the bad field is named)."""
    data = json_file(text)
    try:
        return parse_latency_table(data)
    except LatencyTableError as exc:
        raise argparse.ArgumentTypeError(f"{text}: latency_table.{exc.field}: {exc}") from None
def rank_list(text: str) -> list[int]:
    """``8,16,32`` -> ``[8, 16, 32]``: tensor-train ranks (1 to :data:`bitscout.options.MAX_TT_RANK`)."""
    parts = [x for x in text.replace(" ", "").split(",") if x]
    out = []
    for x in parts:
        if not x.isdigit() or not 1 <= int(x) <= bit_options.MAX_TT_RANK:
            raise argparse.ArgumentTypeError(
                f"a tensor-train rank is an integer from 1 to {bit_options.MAX_TT_RANK}, got {x!r}"
            )
        out.append(int(x))
    if not out:
        raise argparse.ArgumentTypeError(f"expected comma-separated tensor-train ranks such as 8,16,32, got {text!r}")
    return sorted(set(out))


def tie_list(text: str) -> list[str]:
    """``qkv,gate_up`` -> ``["attention_inputs", "ffn_inputs"]``; ``none`` -> ``[]`` (nothing tied)."""
    try:
        return list(bit_options.parse_ties(text))
    except bit_options.OptionSyntaxError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def refine_points(text: str) -> str | int:
    """``recommended`` or a positive number of points."""
    if text == "recommended":
        return text
    if re.fullmatch(r"\d+", text.strip()):
        return int(text)
    raise argparse.ArgumentTypeError(f"expected 'recommended' or a number of points, got {text!r}")


def method_option(text: str) -> tuple[str, str, Any]:
    """``METHOD.KEY=VALUE``; the value is read as JSON (numbers, true/false, lists), else kept as text."""
    key, sep, raw = text.partition("=")
    method, dot, name = key.strip().partition(".")
    if not sep or not dot or not method or not name:
        raise argparse.ArgumentTypeError(f"expected METHOD.KEY=VALUE such as hessian.max_probes=32, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return method, name, value


def method_options(items: list[tuple[str, str, Any]] | None) -> dict[str, dict[str, Any]]:
    """``--option`` values grouped by method: ``{"hessian": {"max_probes": 32}}``."""
    out: dict[str, dict[str, Any]] = {}
    for method, name, value in items or ():
        out.setdefault(method, {})[name] = value
    return out


def methods_of(items: list[str] | None) -> list[str]:
    """``--method`` values (repeated and/or comma-separated), in order, without repeats."""
    out: list[str] = []
    for item in items or ():
        for m in item.split(","):
            m = m.strip()
            if m and m not in out:
                out.append(m)
    return out


# --------------------------------------------------------------------------- groups of flags


def add_search_options(p: argparse.ArgumentParser, *, task_default: str = "from the model's config.json") -> None:
    """``--task``, ``--method``, ``--option``, ``--metric``, ``--seed``, ``--front-points``, ``--device``,
    ``--no-loop``."""
    g = p.add_argument_group("search")
    g.add_argument("--task", choices=("auto", *TASKS), help=f"what the model does (default, auto: {task_default})")
    g.add_argument(
        "--method", dest="methods", action="append", metavar="METHOD",
        help=f"{', '.join(METHODS)} (repeat or comma-separate; default: {','.join(DEFAULTS.methods)})",
    )  # fmt: skip
    g.add_argument(
        "--option", dest="method_options", action="append", type=method_option, metavar="METHOD.KEY=VALUE",
        help="an option of one method, e.g. hessian.max_probes=32 or dnas.epochs=2 (repeat)",
    )  # fmt: skip
    g.add_argument("--metric", help="accuracy, kl, cosine, perplexity, mse, pearson (default: the task's)")
    g.add_argument("--seed", type=int, metavar="N", help=f"random seed: data split, probes, search (default: {DEFAULTS.seed})")
    g.add_argument(
        "--front-points", type=int, metavar="N",
        help=f"budgets in the sweep that traces the front (default: {DEFAULTS.front_points})",
    )  # fmt: skip
    g.add_argument("--device", metavar="DEVICE", help=f"where the model runs: {', '.join(DEVICES)} (default: {DEFAULTS.device})")
    g.add_argument(
        "--no-loop", dest="loop", action="store_const", const={"enabled": False}, default=None,
        help="skip the closed loop (measure, correct, local search, uniform guard): the first allocation only",
    )  # fmt: skip


def add_budget_options(p: argparse.ArgumentParser) -> None:
    """The budget limits and ``--device-profile``."""
    g = p.add_argument_group("budget (at least one limit)")
    for name, metavar, text in _LIMITS:
        g.add_argument(_flag(name), dest=name, type=float, metavar=metavar, help=text)
    g.add_argument(
        "--device-profile", metavar="NAME|FILE.json", type=device_profile_arg,
        help="the device latency is modelled on: a100, h100, rtx4090, cpu-avx512, jetson-orin, or a JSON file of a "
        "custom profile (memory_bandwidth_gbs, int8_tops, int4_tops, fp16_tflops, fp32_tflops) "
        f"(default: {DEFAULTS.device_profile})",
    )  # fmt: skip
    g.add_argument(
        "--latency-table", metavar="FILE.json", type=latency_table_arg,
        help="a latency table measured by `bitscout profile`: latency from its times instead of the device profile",
    )  # fmt: skip


def add_space_options(p: argparse.ArgumentParser) -> None:
    """Which matrices are searched and the options each may take."""
    g = p.add_argument_group("search space")
    g.add_argument(
        "--bits", type=bit_list, metavar="LIST",
        help="allowed bit options: widths (0 prunes, 32 unchanged), 'a' an asymmetric grid, 'g<N>' a scale per N "
        f"input columns, e.g. 4g128,8,3g64 (default: {','.join(map(str, DEFAULTS.bits))})",
    )  # fmt: skip
    g.add_argument(
        "--act-bits", type=act_bit_list, metavar="LIST",
        help="activation widths searched with every integer option, e.g. 8,16 (4 becomes 4a8 and 4a16); "
        "or name them in --bits (4a8) (default: weights only)",
    )  # fmt: skip
    g.add_argument(
        "--act-scales", choices=("dynamic", "static"),
        help="activation scales: per token at run time, or static ones calibrated on the calibration rows "
        "(default: dynamic)",
    )  # fmt: skip
    g.add_argument(
        "--tt-ranks", type=rank_list, metavar="LIST",
        help="tensor-train ranks: every whole matrix (and, with --include-embeddings, the word embedding) may also "
        "be factorised into TT-matrix cores of each rank, the cores at each width of --bits (tt<r>@<b>), e.g. 8,16,32 "
        "(default: none)",
    )  # fmt: skip
    g.add_argument(
        "--tie", type=tie_list, metavar="KINDS",
        help="sibling projections that take one option, found structurally: qkv, gate_up, or none "
        "(default: qkv,gate_up for causal LMs, none otherwise)",
    )  # fmt: skip
    g.add_argument("--granularity", choices=["layer", "group"], help=f"one bit-width per matrix, or per head and FFN block (default: {DEFAULTS.granularity})")
    g.add_argument("--ffn-block-size", type=int, metavar="N", help=f"FFN neurons per group at group granularity (default: {DEFAULTS.ffn_block_size})")
    g.add_argument("--asymmetric", action="store_true", default=None, help="asymmetric integer grids (default: symmetric)")
    g.add_argument("--include", action="append", metavar="GLOB", help="only modules matching this glob (repeat)")
    g.add_argument("--exclude", action="append", metavar="GLOB", help="leave modules matching this glob out (repeat)")
    g.add_argument("--include-head", action="store_true", default=None, help="also search the task head / lm_head")
    g.add_argument("--include-embeddings", action="store_true", default=None, help="also search the embedding matrices")
    g.add_argument("--max-head-prune", type=float, metavar="FRACTION", help="largest fraction of a block's heads pruned (default: no cap)")
    g.add_argument("--max-ffn-prune", type=float, metavar="FRACTION", help="largest fraction of a block's FFN groups pruned (default: no cap)")
    g.add_argument(
        "--keep-one-head", action=argparse.BooleanOptionalAction, default=None,
        help="never prune every head of a block (default: keep one)",
    )  # fmt: skip


def add_data_options(p: argparse.ArgumentParser) -> None:
    """Which fields of the data are read and how much of the data is used."""
    g = p.add_argument_group("data")
    g.add_argument("--text-field", metavar="NAME", help=f"the text column (default: {DEFAULTS.text_field})")
    g.add_argument(
        "--label-field", metavar="NAME",
        help=f"the label column: class names or indices, or numbers for regression (default: {DEFAULTS.label_field})",
    )  # fmt: skip
    g.add_argument("--tokens-field", metavar="NAME", help=f"token classification: the list of words (default: {DEFAULTS.tokens_field})")
    g.add_argument("--tags-field", metavar="NAME", help=f"token classification: the list of tags, one per word (default: {DEFAULTS.tags_field})")
    g.add_argument("--calibration-size", type=int, metavar="N", help=f"calibration rows (default: {DEFAULTS.calibration_size})")
    g.add_argument("--calibration", dest="calibration_size", type=int, help=argparse.SUPPRESS)
    g.add_argument(
        "--evaluation-size", type=int, metavar="N",
        help=f"evaluation rows, disjoint from calibration (default: {DEFAULTS.evaluation_size})",
    )  # fmt: skip
    g.add_argument("--evaluation", dest="evaluation_size", type=int, help=argparse.SUPPRESS)
    g.add_argument("--max-length", type=int, metavar="N", help=f"tokens per sequence; longer texts are cut (default: {DEFAULTS.max_length})")
    g.add_argument("--batch-size", type=int, metavar="N", help=f"sequences per batch (default: {DEFAULTS.batch_size})")


def add_refine_options(p: argparse.ArgumentParser) -> None:
    """``--refine`` and ``--refine-steps``."""
    g = p.add_argument_group("refinement (knowledge distillation with learned step sizes, after the search)")
    g.add_argument(
        "--refine", metavar="POINTS", type=refine_points,
        help="'recommended' or K: refine the recommended point or the K maps within the budget with the lowest calibration discrepancy",
    )  # fmt: skip
    g.add_argument(
        "--refine-steps", type=int, metavar="N",
        help=f"optimizer steps per refined point (default: {DEFAULTS.refine_steps})",
    )  # fmt: skip


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of ``args`` with every shared option that was not given set to its default."""
    out = argparse.Namespace(**vars(args))
    for f in fields(Defaults):
        if getattr(out, f.name, None) is None:
            setattr(out, f.name, getattr(DEFAULTS, f.name))
    return out
