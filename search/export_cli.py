"""``bitscout export RESULT.json --point N --out DIR [--format F] [--model DIR]``: write one point of a
search result as a checkpoint (see :mod:`search.export` for the files).

``--format`` (names in :mod:`bitscout.formats`): ``native`` (the default) writes bitscout's packed
artifact and, next to it, ``torchao.json`` (the part of the map torchao's kernels can run);
``compressed-tensors`` a checkpoint plain transformers (with the ``compressed-tensors`` package) and
the engines that read the format load; ``dense`` a plain ``model.safetensors`` of the dequantized
weights. Every format goes through :func:`search.export.export_point`, whose report is printed: the
file written, which groups an engine with 4/8-bit kernels runs as quantized, and one line per warning.

``--point N`` picks the N-th point of the result's front (0-based, in the order of the result file);
``--point recommended`` picks the point the search recommended for its budget. The model is loaded
from ``--model`` or else from the directory the search ran on (``info["model_path"]``), for the
task in ``info["task"]`` (or ``--task``), and quantized under the result's own search space with the
clip rule the search used (``info["clip"]``, default ``mse``).

Exit codes: 0 written, 1 export failed, 2 bad usage (bad arguments, unreadable result, no such point,
model missing). Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from bitscout.exit_codes import EXIT_ERROR, EXIT_OK, EXIT_USAGE


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _parser() -> _Parser:
    from bitscout.formats import DEFAULT_EXPORT_FORMAT, EXPORT_FORMATS

    p = _Parser(
        prog="bitscout export",
        description="Write one point of a search result as a checkpoint: bitscout's packed artifact (native), "
        "a compressed-tensors checkpoint plain transformers loads, or plain dequantized weights (dense).",
    )
    p.add_argument("result", metavar="RESULT.json", help="a search result (SearchResult JSON)")
    p.add_argument(
        "--point",
        required=True,
        help="index of the point in the result's front (0-based), or 'recommended'",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write the checkpoint into")
    p.add_argument(
        "--format",
        default=DEFAULT_EXPORT_FORMAT,
        type=_format,
        metavar="{" + ",".join(EXPORT_FORMATS) + "}",
        help=f"checkpoint format (default: {DEFAULT_EXPORT_FORMAT})",
    )
    p.add_argument("--model", metavar="DIR", help="model directory (default: the result's info.model_path)")
    p.add_argument("--task", help="task to load the model for (default: the result's info.task)")
    p.add_argument(
        "--device",
        help="device to quantize on; use the one the search ran on (default: the result's info.device, else cpu)",
    )
    p.add_argument("--force", action="store_true", help="overwrite a checkpoint already in DIR")
    p.add_argument(
        "--verify",
        action="store_true",
        help="native format: quantize a second time the way the search does and check the artifact against it "
        "(twice the time)",
    )
    return p


def _format(value: str) -> str:
    from bitscout.formats import parse_export_format

    try:
        return parse_export_format(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _pick_point(result: Any, point: str) -> tuple[Any, str]:
    if point == "recommended":
        idx = result.info.get("recommended")
        if not isinstance(idx, int) or not 0 <= idx < len(result.points):
            raise _UsageError("the result recommends no point (no point met its budget); pass --point N")
        return result.points[idx], f"recommended (points[{idx}])"
    try:
        n = int(point)
    except ValueError:
        raise _UsageError(f"--point must be an integer or 'recommended', got {point!r}") from None
    if not 0 <= n < len(result.front):
        raise _UsageError(f"--point {n} is out of range: the front has {len(result.front)} points (0 to {len(result.front) - 1})")
    return result.front[n], f"front[{n}]"


def _run(args: argparse.Namespace) -> int:
    from bitscout.formats import NATIVE
    from search.actquant import StaticScales
    from search.errors import InvalidInputError, ModelLoadError, SearchError
    from search.export import ARTIFACT_FILE, export_point, to_torchao_config, torchao_unsupported
    from search.result import SearchResult
    from search.space import space_from_dict
    from search.tasks import load_model

    src = Path(args.result)
    if not src.is_file():
        raise _UsageError(f"no result file at {str(src)!r}")
    try:
        result = SearchResult.from_json(src)
    except (InvalidInputError, UnicodeDecodeError) as exc:
        raise _UsageError(f"{src.name} is not a bitscout search result: {exc}") from exc
    point, where = _pick_point(result, str(args.point))
    space_data = result.space.get("space") if isinstance(result.space, dict) else None
    if not isinstance(space_data, dict):
        raise _UsageError(f"{src.name} holds no search space (space.space); it cannot be exported")
    try:
        space = space_from_dict(space_data)
    except InvalidInputError as exc:
        raise _UsageError(f"{src.name}: {exc.message}") from exc
    model_path = args.model or result.info.get("model_path")
    if not model_path:
        raise _UsageError("the result does not say which model it searched (no info.model_path): pass --model DIR")
    task = args.task or result.info.get("task")
    if not task:
        raise _UsageError("the result does not say its task (no info.task): pass --task")
    out = Path(args.out)
    if args.verify and args.format != NATIVE:
        raise _UsageError(f"--verify checks the native artifact; format {args.format} writes the quantizer's own values")
    main_file = out / (ARTIFACT_FILE if args.format == NATIVE else "model.safetensors")
    if main_file.exists() and not args.force:
        raise _UsageError(f"{main_file} exists: pass --force to overwrite it")
    label_names = result.info.get("label_names")
    act_static = StaticScales(result.info["act_static"]) if result.info.get("act_static") else None
    try:
        lm = load_model(
            model_path,
            task,
            num_labels=result.info.get("num_labels") or (len(label_names) if label_names else None),
            label_names=label_names,
            device=args.device or str(result.info.get("device") or "cpu"),
        )
    except (ModelLoadError, InvalidInputError) as exc:
        raise _UsageError(exc.message) from exc
    clip = str(result.info.get("clip") or "mse")
    metadata = {
        "result": str(src),
        "point": where,
        "method": point.method,
        "label": point.label,
        "metric": result.metric,
        "higher_is_better": result.higher_is_better,
        "metrics": dict(point.metrics),
        "cost": point.cost.to_dict(),
        "task": task,
        "model_path": str(model_path),
        "versions": dict(result.versions),
    }
    try:
        report = export_point(
            args.format,
            lm.model,
            space,
            point.precision_map,
            out,
            clip=clip,
            metadata=metadata,
            model_dir=model_path,
            # the native artifact carries the static activation ranges the search evaluated with
            **({"verify": args.verify, "act_static": act_static} if args.format == NATIVE else {}),
        )
        if args.format == NATIVE:
            configs = to_torchao_config(point.precision_map, space, model=lm.model, build=False)
            unsupported = torchao_unsupported(point.precision_map, space, model=lm.model)
    except InvalidInputError as exc:
        raise _UsageError(str(exc)) from exc
    except SearchError as exc:
        print(f"bitscout export: {exc}", file=sys.stderr)
        return EXIT_ERROR
    size = report.path.stat().st_size
    line = (
        f"wrote {report.path} ({report.format}, {size / 1e6:.3f} MB; cost model {point.cost.size_bytes / 1e6:.3f} MB): "
        f"{len(report.quantized)} groups an engine with 4/8-bit kernels runs quantized"
    )
    if report.no_kernel:
        line += f", {len(report.no_kernel)} stored as integers it has no kernel for"
    line += f", {len(report.dense)} in floating point"
    if report.pruned:
        line += f", {len(report.pruned)} pruned"
    if args.format == NATIVE:
        (out / "torchao.json").write_text(
            json.dumps({"configs": {k: v.to_dict() for k, v in configs.items()}, "unsupported": unsupported}, indent=2)
            + "\n"
        )
        line += f"; {out / 'torchao.json'} ({len(configs)} modules torchao can run, {len(unsupported)} groups it cannot)"
    print(line)
    for warning in report.warnings:
        print(f"warning: {warning}")
    return EXIT_OK


def export_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bitscout export`` (registered in ``bitscout.commands``)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(args_list)
    except _UsageError as exc:
        print(f"bitscout export: {exc} (see 'bitscout export --help')", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        return _run(args)
    except _UsageError as exc:
        print(f"bitscout export: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"bitscout export: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(export_main())
