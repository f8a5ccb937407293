"""``bitscout search``: a whole search in-process, with a progress bar, a printed front and a JSON result."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from bitscout import cli_options as opt
from bitscout.exit_codes import EXIT_ERROR, EXIT_OK, EXIT_USAGE, describe
from bitscout.methods import provenance_text
from search.errors import SearchError
from search.local import DataOptions
from search.pipeline import RefineChoice, SearchOptions
from search.result import Budget, SearchResult
from search.space import PruneLimits

#: the error codes of input the user can fix (exit 2); every other error exits 1
_INPUT_CODES = ("invalid_request", "model_load_failed", "data_invalid", "budget_infeasible")

EXAMPLE = """examples:
  bitscout search --model ./my-bert --data reviews.jsonl \\
      --method kl --max-size-mb 10 --out result.json
  bitscout search --model ./my-bert --data reviews.jsonl --label-field sentiment \\
      --method hessian --granularity group --bits 0,2,3,4,8 --max-avg-bits 3 \\
      --option hessian.max_probes=32 --option hessian.weighting=rows --refine 2
  bitscout search --model ./my-llama --data text.jsonl --bits 4g128,8,3g64 --tie qkv,gate_up --max-size-mb 300
  bitscout profile --device cpu --model ./my-bert --bits 4,8,16,32 --act-bits 8 --out table.json
  bitscout search --model ./my-bert --data reviews.jsonl --bits 4,8 --act-bits 8,16 \
      --latency-table table.json --max-latency-ms 2
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bitscout search",
        description="Search mixed-precision quantization maps of a transformers model in this process. "
        "The flags and their defaults are those of `bitscout submit`.",
        epilog=f"{EXAMPLE}\n{describe()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="a transformers model directory (config.json + safetensors)")
    p.add_argument("--data", required=True, help="a JSONL or CSV file, or a local `datasets` name")
    opt.add_search_options(p)
    opt.add_budget_options(p)
    opt.add_space_options(p)
    opt.add_data_options(p)
    p.add_argument(
        "--windows", action="store_true",
        help="causal LMs: cut the texts into windows of exactly --max-length tokens; --calibration-size and "
        "--evaluation-size then count windows, from disjoint texts",
    )  # fmt: skip
    opt.add_refine_options(p)
    w = p.add_argument_group("output")
    w.add_argument("--out", default=None, help="write the SearchResult JSON here")
    w.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def options_from_args(a: argparse.Namespace) -> SearchOptions:
    a = opt.fill_defaults(a)
    limits = PruneLimits(max_head_fraction=a.max_head_prune, max_ffn_fraction=a.max_ffn_prune,
                         keep_one_head=a.keep_one_head)  # fmt: skip
    return SearchOptions(
        method_options=opt.method_options(a.method_options),
        loop=getattr(a, "loop", None),
        methods=tuple(opt.methods_of(list(a.methods))),
        granularity=a.granularity,
        bits=tuple(a.bits),
        symmetric=not a.asymmetric,
        ffn_block_size=a.ffn_block_size,
        prune_limits=limits,
        include=tuple(a.include) if a.include else None,
        exclude=tuple(a.exclude) if a.exclude else None,
        include_head=a.include_head,
        include_embeddings=a.include_embeddings,
        budget=Budget(
            max_size_mb=a.max_size_mb, max_avg_bits=a.max_avg_bits, max_bops=a.max_bops, max_latency_ms=a.max_latency_ms
        ),
        front_points=a.front_points,
        metric=a.metric,
        seed=a.seed,
        seq_len=a.max_length,
        device_profile=a.device_profile,
        latency_table=a.latency_table,
        activation_bits=tuple(a.act_bits or ()),
        act_scales=a.act_scales or "dynamic",
        tie=None if a.tie is None else tuple(a.tie),
        tt_ranks=tuple(a.tt_ranks),
        refine=None if a.refine is None else RefineChoice(
            points=a.refine, steps=a.refine_steps if a.refine_steps is not None else opt.DEFAULTS.refine_steps
        ),
    )


def data_from_args(a: argparse.Namespace) -> DataOptions:
    a = opt.fill_defaults(a)
    return DataOptions(
        source=a.data,
        text_field=a.text_field,
        label_field=a.label_field,
        tokens_field=a.tokens_field,
        tags_field=a.tags_field,
        calibration=a.calibration_size,
        evaluation=a.evaluation_size,
        max_length=a.max_length,
        batch_size=a.batch_size,
        windows=bool(getattr(a, "windows", False)),
    )


def format_front(result: SearchResult, *, limit: int | None = None) -> str:
    """The front (and the uniform baselines) as a text table."""
    m = result.metric
    rec = result.info.get("recommended")
    rec_point = result.points[rec] if isinstance(rec, int) and 0 <= rec < len(result.points) else None
    rows = list(result.front)
    uniform = [p for p in result.points if p.method == "uniform" and p not in rows]
    header = f"{'':2}{'#':>3} {'method':<9}{'label':<15}{'found':<14}{'size MB':>9}{'avg bits':>9}{'GBOPs':>10}{'lat ms':>8}{m:>12}  pruned"
    lines = [header, "-" * len(header)]
    base = result.baseline_metrics.get(m)
    if base is not None:
        lines.append(f"{'':2}{'':>3} {'float':<9}{'full precision':<15}{'':<14}{'':>9}{'32.00':>9}{'':>10}{'':>8}{base:>12.4f}")
    for p in sorted(rows + uniform, key=lambda p: p.cost.size_bytes)[: limit or None]:
        mark = "*" if p is rec_point or (rec_point is not None and p.to_dict() == rec_point.to_dict()) else " "
        on_front = "" if p in rows else " (ref)"
        index = str(rows.index(p)) if p in rows else ""
        pruned = sum(1 for o in p.precision_map.values() if o.bits == 0)
        lines.append(
            f"{mark} {index:>3} {p.method:<9}{(p.label + on_front)[:14]:<15}{provenance_text(p.provenance)[:13]:<14}"
            f"{p.cost.size_mb:>9.3f}{p.cost.avg_bits:>9.2f}"
            f"{p.cost.bops / 1e9:>10.2f}{p.cost.latency_ms:>8.3f}{p.metrics.get(m, float('nan')):>12.4f}  {pruned}"
        )
    lines.append("# = index on the front (bitscout export RESULT --point #); * recommended: the best point that meets the budget")
    lines.append("found: the score and the closed loop's round (r0: the first allocation), +ls the local search, "
                 "guard a uniform map the guard put there")
    return "\n".join(lines)


def search_main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        from search.local import prepare, run_info

        options = options_from_args(a)
        data = data_from_args(a)
        bar = None
        if not a.quiet:
            from tqdm import tqdm

            bar = tqdm(total=1000, desc="search", bar_format="{l_bar}{bar}| {elapsed} {postfix}", file=sys.stderr)

        def progress(stage: str, frac: float, msg: str) -> None:
            if bar is not None:
                bar.n = int(min(1.0, max(0.0, frac)) * 1000)
                bar.set_description(stage[:24])
                bar.set_postfix_str(msg[:60])

        try:
            search = prepare(a.model, data, options, task=a.task, device=a.device or opt.DEFAULTS.device)
            result = search.run(on_progress=progress)
            result.info.update(run_info(search, a.model, data))
        finally:
            if bar is not None:
                bar.close()
        print(format_front(result))
        if a.out:
            result.to_json(a.out)
            print(f"wrote {a.out}")
    except SearchError as exc:
        where = f" ({exc.field})" if exc.field else ""
        print(f"bitscout search: {exc.message}{where}", file=sys.stderr)
        return EXIT_USAGE if exc.code in _INPUT_CODES else EXIT_ERROR
    except Exception as exc:  # a runtime failure (out of memory, a full disk): one line, no traceback
        if os.environ.get("BITSCOUT_DEBUG") == "1":
            raise
        text = str(exc).strip().splitlines()
        print(f"bitscout search: {type(exc).__name__}: {text[0] if text else ''} (BITSCOUT_DEBUG=1 shows the traceback)",
              file=sys.stderr)  # fmt: skip
        return EXIT_ERROR
    return EXIT_OK
