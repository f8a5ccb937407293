"""``bitscout search``: a whole search in-process, with a progress bar, a printed front and a JSON result."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from search.errors import InvalidInputError, SearchError
from search.pipeline import SearchOptions
from search.result import Budget, SearchResult
from search.space import PruneLimits

EXAMPLE = """examples:
  bitscout search --model ./my-bert --data reviews.jsonl --label-field label \\
      --method kl --max-size-mb 10 --out result.json
  bitscout search --model ./my-bert --data reviews.jsonl --label-field label \\
      --method hessian --granularity group --bits 0,2,3,4,8 --max-avg-bits 3 \\
      --option hessian.max_probes=32 --option hessian.weighting=rows
"""


def _csv_ints(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    if not parts:
        raise argparse.ArgumentTypeError("expected a comma-separated list such as 2,3,4,8")
    return parts


def _method_option(text: str) -> tuple[str, str, object]:
    """``METHOD.KEY=VALUE``; the value is read as JSON (numbers, true/false, lists), else kept as text."""
    import json

    key, sep, raw = text.partition("=")
    method, dot, name = key.strip().partition(".")
    if not sep or not dot or not method or not name:
        raise argparse.ArgumentTypeError(f"expected METHOD.KEY=VALUE such as hessian.max_probes=32, got {text!r}")
    try:
        value: object = json.loads(raw)
    except ValueError:
        value = raw
    return method, name, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bitscout search",
        description="Search mixed-precision quantization maps of a transformers model in this process.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="a transformers model directory (config.json + safetensors)")
    p.add_argument("--data", required=True, help="a JSONL or CSV file, or a local `datasets` name")
    p.add_argument("--task", default="auto", choices=["auto", "sequence_classification", "embeddings", "causal_lm"])
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default=None, help="the label column (classification accuracy)")
    p.add_argument("--method", action="append", dest="methods", help="kl, hessian, fisher, dnas, nsga2 (repeatable; default kl)")
    p.add_argument("--bits", type=_csv_ints, default=("2", "3", "4", "8"), help="allowed bit-widths (0 prunes), e.g. 2,3,4,8")
    p.add_argument("--asymmetric", action="store_true", help="asymmetric integer grids")
    p.add_argument(
        "--option", action="append", dest="method_options", type=_method_option, metavar="METHOD.KEY=VALUE",
        help="an option of one method, e.g. hessian.max_probes=32, hessian.weighting=rows, dnas.epochs=2 (repeatable)",
    )
    p.add_argument("--granularity", choices=["layer", "group"], default="layer")
    p.add_argument("--ffn-block-size", type=int, default=64)
    p.add_argument("--max-head-prune", type=float, default=None, help="max fraction of heads pruned per block")
    p.add_argument("--max-ffn-prune", type=float, default=None, help="max fraction of FFN groups pruned per block")
    p.add_argument("--include", action="append", help="glob of module names to include (repeatable)")
    p.add_argument("--exclude", action="append", help="glob of module names to exclude (repeatable)")
    p.add_argument("--include-head", action="store_true")
    p.add_argument("--include-embeddings", action="store_true")
    p.add_argument("--max-size-mb", type=float)
    p.add_argument("--max-avg-bits", type=float)
    p.add_argument("--max-bops", type=float)
    p.add_argument("--max-latency-ms", type=float)
    p.add_argument("--device-profile", default="a100", help="latency profile: a100, h100, rtx4090, cpu-avx512, jetson-orin")
    p.add_argument("--metric", default=None, help="accuracy, kl, cosine or perplexity (default: the task's)")
    p.add_argument("--calibration", type=int, default=64, help="calibration sequences")
    p.add_argument("--evaluation", type=int, default=256, help="evaluation sequences (disjoint from calibration)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--front-points", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", default=None, help="write the SearchResult JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def options_from_args(a: argparse.Namespace) -> SearchOptions:
    limits = None
    if a.max_head_prune is not None or a.max_ffn_prune is not None:
        limits = PruneLimits(max_head_fraction=a.max_head_prune, max_ffn_fraction=a.max_ffn_prune)
    bits: tuple[int | str, ...] = tuple(int(b) if b.isdigit() else b for b in a.bits)
    method_options: dict[str, dict[str, object]] = {}
    for method, name, value in a.method_options or ():
        method_options.setdefault(method, {})[name] = value
    return SearchOptions(
        method_options=method_options,
        methods=tuple(a.methods or ["kl"]),
        granularity=a.granularity,
        bits=bits,
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
    )


def format_front(result: SearchResult, *, limit: int | None = None) -> str:
    """The front (and the uniform baselines) as a text table."""
    m = result.metric
    rec = result.info.get("recommended")
    rec_point = result.points[rec] if isinstance(rec, int) and 0 <= rec < len(result.points) else None
    rows = list(result.front)
    uniform = [p for p in result.points if p.method == "uniform" and p not in rows]
    header = f"{'':2}{'#':>3} {'method':<9}{'label':<15}{'size MB':>9}{'avg bits':>9}{'GBOPs':>10}{'lat ms':>8}{m:>12}  pruned"
    lines = [header, "-" * len(header)]
    base = result.baseline_metrics.get(m)
    if base is not None:
        lines.append(f"{'':2}{'':>3} {'float':<9}{'full precision':<15}{'':>9}{'32.00':>9}{'':>10}{'':>8}{base:>12.4f}")
    for p in sorted(rows + uniform, key=lambda p: p.cost.size_bytes)[: limit or None]:
        mark = "*" if p is rec_point or (rec_point is not None and p.to_dict() == rec_point.to_dict()) else " "
        on_front = "" if p in rows else " (ref)"
        index = str(rows.index(p)) if p in rows else ""
        pruned = sum(1 for o in p.precision_map.values() if o.bits == 0)
        lines.append(
            f"{mark} {index:>3} {p.method:<9}{(p.label + on_front)[:14]:<15}{p.cost.size_mb:>9.3f}{p.cost.avg_bits:>9.2f}"
            f"{p.cost.bops / 1e9:>10.2f}{p.cost.latency_ms:>8.3f}{p.metrics.get(m, float('nan')):>12.4f}  {pruned}"
        )
    lines.append("# = index on the front (bitscout export RESULT --point #); * recommended: the best point that meets the budget")
    return "\n".join(lines)


def search_main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        from search.local import DataOptions, run_local

        options = options_from_args(a)
        stray = sorted(set(options.method_options) - set(options.methods))
        if stray:
            raise InvalidInputError(
                f"--option names {', '.join(stray)}, which is not among the methods ({', '.join(options.methods)})",
                field="method_options",
            )
        data = DataOptions(
            source=a.data,
            text_field=a.text_field,
            label_field=a.label_field,
            calibration=a.calibration,
            evaluation=a.evaluation,
            max_length=a.max_length,
            batch_size=a.batch_size,
        )
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
            result = run_local(a.model, data, options, task=a.task, device=a.device, on_progress=progress)
        finally:
            if bar is not None:
                bar.close()
    except SearchError as exc:
        where = f" ({exc.field})" if exc.field else ""
        print(f"bitscout search: {exc.message}{where}", file=sys.stderr)
        return 2
    print(format_front(result))
    if a.out:
        result.to_json(a.out)
        print(f"wrote {a.out}")
    return 0
