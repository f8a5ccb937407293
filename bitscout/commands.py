"""The SDK's own commands: ``bitscout submit | status | wait | cancel | pareto | resolve |
download | events``. Each is a function ``main(argv) -> int`` that :mod:`bitscout.cli` dispatches to.

Every command takes ``--url``, ``--token`` and ``--config`` (default: ``BITSCOUT_URL`` /
``BITSCOUT_TOKEN``, then the config file ``bitscout serve`` writes). ``submit`` takes the flags
``bitscout search`` takes, with the same defaults (:mod:`bitscout.cli_options`). Exit codes
(:mod:`bitscout.exit_codes`): 0 success, 1 a runtime error (the service is unreachable or failed,
a rate limit, a wait timed out), 2 bad usage or input (a bad flag, a request the service refused
as invalid, an unknown job), 3 the job failed or was canceled. Errors are one line on stderr,
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from bitscout import cli_options as opt
from bitscout._base import EXPORT_TIMEOUT_S
from bitscout._front import Front
from bitscout._job import Job
from bitscout._sync import Client
from bitscout.errors import BitscoutError, InvalidRequest, JobFailed
from bitscout.exit_codes import EXIT_ERROR, EXIT_JOB_FAILED, EXIT_OK, EXIT_USAGE, describe
from bitscout.formats import DEFAULT_EXPORT_FORMAT, EXPORT_FORMATS, parse_export_format
from bitscout.methods import provenance_text
from bitscout.schemas import JobRead, JobStatus, ResolveRead

__all__ = ["COMMANDS", "EXIT_ERROR", "EXIT_JOB_FAILED", "EXIT_OK", "EXIT_USAGE", "exit_code_of"]

#: Keys a job file may hold (the keyword arguments of ``Client.submit``).
JOB_FILE_KEYS = (
    "model", "data", "task", "methods", "budget", "space", "metric", "seed", "idempotency_key",
    "data_options", "front_points", "device", "resources", "refine", "method_options", "loop",
)  # fmt: skip


class UsageError(Exception):
    """Bad command-line usage (exit 2)."""


def exit_code_of(exc: BitscoutError) -> int:
    """The exit code of an error the service answered (or the SDK raised before sending): the job
    failed -> 3; the request was refused for what it says (4xx other than 429: invalid input, an
    unknown job, a bad token, a conflict) -> 2; anything else (unreachable, 429, 5xx) -> 1."""
    if isinstance(exc, JobFailed):
        return EXIT_JOB_FAILED
    return EXIT_USAGE if 400 <= exc.status < 500 and exc.status != 429 else EXIT_ERROR


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``bitscout submit: error: ... (see --help)``)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _parser(name: str, description: str, example: str) -> _Parser:
    p = _Parser(
        prog=f"bitscout {name}",
        description=description,
        epilog=f"example:\n  {example}\n\n{describe()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("connection")
    g.add_argument(
        "--url", help="the service's URL (default: BITSCOUT_URL, the config file, http://127.0.0.1:8000)"
    )
    g.add_argument("--token", help="API token (default: BITSCOUT_TOKEN or the config file)")
    g.add_argument(
        "--config",
        metavar="PATH",
        help="client config file (default: $BITSCOUT_CONFIG or ~/.config/bitscout/config.json)",
    )
    g.add_argument(
        "--request-timeout", type=float, default=30.0, metavar="S", help="seconds per request (default: 30)"
    )
    g.add_argument(
        "--retries",
        type=int,
        default=3,
        metavar="N",
        help="retries on connection errors, 429 and 5xx, with jittered backoff (default: 3)",
    )
    return p


def _client(args: argparse.Namespace) -> Client:
    return Client(
        args.url, args.token, config_path=args.config, timeout=args.request_timeout, retries=args.retries
    )


def _progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: when stderr is a terminal)",
    )


def _show_progress(args: argparse.Namespace) -> bool:
    return bool(args.progress) if args.progress is not None else sys.stderr.isatty()


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _err(prog: str, message: str) -> None:
    print(f"{prog}: {message}", file=sys.stderr)


def _run(
    prog: str,
    argv: Sequence[str],
    build: Callable[[], argparse.ArgumentParser],
    body: Callable[[argparse.Namespace], int],
) -> int:
    parser = build()
    try:
        args = parser.parse_args(list(argv))
    except UsageError as exc:
        _err(prog, f"error: {exc}")
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return body(args)
    except UsageError as exc:
        _err(prog, f"error: {exc}")
        return EXIT_USAGE
    except JobFailed as exc:
        _err(prog, str(exc))
        return EXIT_JOB_FAILED
    except BitscoutError as exc:
        code = exc.code.value
        _err(prog, f"{exc} ({code})" if code not in str(exc) else str(exc))
        return exit_code_of(exc)
    except TimeoutError as exc:
        _err(prog, str(exc))
        return EXIT_ERROR
    except ImportError as exc:
        _err(prog, str(exc))
        return EXIT_ERROR
    except OSError as exc:
        _err(prog, f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}")
        return EXIT_ERROR
    except Exception as exc:  # a bug: still one line, unless BITSCOUT_DEBUG=1 asks for the traceback
        if os.environ.get("BITSCOUT_DEBUG") == "1":
            raise
        _err(prog, f"unexpected error: {type(exc).__name__}: {exc} (BITSCOUT_DEBUG=1 shows the traceback)")
        return EXIT_ERROR


def _when(dt: datetime | None) -> str:
    return "-" if dt is None else dt.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _model_label(job: JobRead) -> str:
    m = job.spec.model
    if m.hf_id:
        return m.hf_id
    if m.path:
        return m.path
    return f"upload:{(m.upload_id or '')[:8]}"


def _finish_line(job: Job) -> str:
    d = job.data
    if d.status is JobStatus.succeeded:
        rec = (
            f", recommended point {d.recommended_point}"
            if d.recommended_point is not None
            else ", no point meets the budget"
        )
        return f"job {d.id} succeeded: {d.n_points} points{rec}"
    return f"job {d.id} {d.status.value}"


# --------------------------------------------------------------------------- submit

def _limits(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {n: getattr(args, n) for n in opt.LIMIT_NAMES if getattr(args, n) is not None}
    if args.device_profile:
        out["device_profile"] = args.device_profile
    if getattr(args, "latency_table", None) is not None:
        out["latency_table"] = args.latency_table  # a checked table; uploaded by submit before the job
    return out


def _submit_parser() -> _Parser:
    p = _parser(
        "submit",
        "Submit a search. Options come from flags, a YAML/JSON job file, or both (flags win). "
        "A local model directory or data file is uploaded first.",
        "bitscout submit --model ./minilm-bbc --data bbc.jsonl --task sequence_classification "
        "--method kl --max-size-mb 30 --wait\n  bitscout submit job.yaml --seed 3",
    )
    p.add_argument(
        "job_file", nargs="?", metavar="JOB_FILE", help="YAML or JSON file with the submit options"
    )
    p.add_argument(
        "--model", help="local model dir/archive, server:<dir>, hf:<org/name>@<revision>, upload:<id>"
    )
    p.add_argument("--data", help="local JSONL/JSON/CSV file, server:<file>, dataset:<name>, upload:<id>")
    p.add_argument(
        "--idempotency-key", metavar="KEY", help="resubmitting with the same key returns the same job"
    )
    opt.add_search_options(p)
    opt.add_budget_options(p)
    opt.add_space_options(p)
    opt.add_data_options(p)
    opt.add_refine_options(p)
    w = p.add_argument_group("output")
    w.add_argument("--wait", action="store_true", help="wait for the job to end (exit 3 if it fails)")
    w.add_argument("--poll", type=float, default=2.0, metavar="S", help="seconds between polls with --wait")
    w.add_argument("--json", action="store_true", help="print the job as JSON")
    _progress_flag(p)
    return p


def load_job_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML or JSON job file: a mapping of :meth:`Client.submit`'s keyword arguments.
    Local paths in ``model`` and ``data`` are relative to the file's folder."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read the job file {str(p)!r}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise UsageError(
            f"the job file {p.name} is not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: {str(exc).splitlines()[0]}"
        ) from None
    if not isinstance(data, dict):
        raise UsageError(f"the job file {p.name} must hold a mapping of options")
    unknown = sorted(set(data) - set(JOB_FILE_KEYS))
    if unknown:
        raise InvalidRequest(
            f"the job file {p.name} has unknown key(s) {', '.join(unknown)}; known: {', '.join(JOB_FILE_KEYS)}",
            field=unknown[0],
        )
    base = p.parent
    for key in ("model", "data"):
        value = data.get(key)
        if isinstance(value, str) and ":" not in value.split("/")[0] and not Path(value).is_absolute():
            candidate = base / value
            if candidate.exists():
                data[key] = str(candidate)
    return data


def _merge(into: dict[str, Any], key: str, values: Mapping[str, Any]) -> None:
    values = {k: v for k, v in values.items() if v is not None}
    if not values:
        return
    current = into.get(key)
    if current is None:
        into[key] = dict(values)
    elif isinstance(current, Mapping):
        into[key] = {**current, **values}
    else:
        raise UsageError(f"{key} in the job file must be a mapping to combine it with flags")


def submit_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``Client.submit`` from a job file and flags (flags win)."""
    opts: dict[str, Any] = load_job_file(args.job_file) if args.job_file else {}
    for key in ("model", "data", "task", "metric", "seed", "idempotency_key", "front_points", "device"):
        value = getattr(args, key)
        if value is not None and not (key == "task" and value == "auto"):
            opts[key] = value
    if args.methods:
        opts["methods"] = opt.methods_of(args.methods)
    _merge(opts, "budget", _limits(args))
    _merge(opts, "space", {
        "bits": args.bits, "tt_ranks": args.tt_ranks, "tie": args.tie, "granularity": args.granularity, "ffn_block_size": args.ffn_block_size,
        "symmetric": False if args.asymmetric else None, "include": args.include, "exclude": args.exclude,
        "include_head": args.include_head, "include_embeddings": args.include_embeddings,
        "max_head_fraction": args.max_head_prune, "max_ffn_fraction": args.max_ffn_prune,
        "keep_one_head": args.keep_one_head, "act_bits": args.act_bits, "act_scales": args.act_scales,
    })  # fmt: skip
    _merge(opts, "data_options", {
        "text_field": args.text_field, "label_field": args.label_field, "tokens_field": args.tokens_field,
        "tags_field": args.tags_field, "calibration_size": args.calibration_size,
        "evaluation_size": args.evaluation_size, "max_length": args.max_length, "batch_size": args.batch_size,
    })  # fmt: skip
    _merge(opts, "refine", {"points": args.refine, "steps": args.refine_steps})
    _merge(opts, "loop", getattr(args, "loop", None) or {})
    for method, name, value in args.method_options or ():
        current = opts.setdefault("method_options", {})
        if not isinstance(current, Mapping) or not isinstance(current.get(method, {}), Mapping):
            raise UsageError("method_options in the job file must map a method to its options")
        opts["method_options"] = {**current, method: {**current.get(method, {}), name: value}}
    for required in ("model", "data"):
        if opts.get(required) is None:
            raise UsageError(f"--{required} is required (or '{required}:' in a job file)")
    if opts.get("budget") is None:
        raise UsageError(
            "a budget is required: --max-size-mb, --max-avg-bits, --max-bops or --max-latency-ms"
        )
    opts.setdefault("methods", list(opt.DEFAULTS.methods))
    return opts


def _upload_latency_table(client: Any, table: Mapping[str, Any]) -> str:
    """Upload a checked latency table (``kind=latency_table``); its upload id."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "latency-table.json"
        path.write_text(json.dumps(table))
        return str(client.upload(path, kind="latency_table").id)


def submit_main(argv: Sequence[str]) -> int:
    """``bitscout submit``."""

    def body(args: argparse.Namespace) -> int:
        opts = submit_options(args)
        progress = _show_progress(args)
        with _client(args) as client:
            table = (opts.get("budget") or {}).get("latency_table")
            if isinstance(table, Mapping):
                opts["budget"] = {**opts["budget"], "latency_table": _upload_latency_table(client, table)}
            job = client.submit(**opts, progress=progress)
            print(f"submitted job {job.id} ({job.status.value})", file=sys.stderr)
            if args.wait:
                job.wait(progress=progress, poll_interval=args.poll, raise_on_failure=False)
            if args.json:
                _print_json(job.data.model_dump(mode="json"))
            else:
                print(job.id)
            if args.wait:
                print(_finish_line(job), file=sys.stderr)
                job.raise_for_status()
        return EXIT_OK

    return _run("bitscout submit", argv, _submit_parser, body)


# --------------------------------------------------------------------------- status, wait, cancel


def _status_parser() -> _Parser:
    p = _parser(
        "status",
        "Show a job, or list your jobs (newest first) when no job is given.",
        "bitscout status 3f2a9c...   |   bitscout status --status running",
    )
    p.add_argument("job", nargs="?", metavar="JOB", help="the job's id")
    p.add_argument(
        "--status", dest="filter", choices=[s.value for s in JobStatus], help="list only jobs in this status"
    )
    p.add_argument("--limit", type=int, default=20, help="jobs to list (default: 20)")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def _job_lines(d: JobRead) -> list[str]:
    lines = [
        f"job:        {d.id}",
        f"status:     {d.status.value}{' (cancel requested)' if d.cancel_requested else ''}",
        f"stage:      {d.stage or '-'}   {d.progress:.0%}",
    ]
    if d.message:
        lines.append(f"message:    {d.message}")
    lines += [
        f"model:      {_model_label(d)}   task: {d.spec.task.value}   methods: {', '.join(m.value for m in d.spec.methods)}",
        f"budget:     {', '.join(f'{k}={v:g}' for k, v in d.spec.budget.limits().items())}",
        f"created:    {_when(d.created_at)}   started: {_when(d.started_at)}   finished: {_when(d.finished_at)}",
    ]
    if d.status is JobStatus.succeeded:
        lines.append(
            f"points:     {d.n_points}   recommended: {d.recommended_point if d.recommended_point is not None else '-'}"
        )
    if d.error_code:
        lines.append(f"error:      {d.error_code}: {d.error_message or ''}")
    return lines


def status_main(argv: Sequence[str]) -> int:
    """``bitscout status [JOB]``."""

    def body(args: argparse.Namespace) -> int:
        with _client(args) as client:
            if args.job:
                d = client.job(args.job).data
                if args.json:
                    _print_json(d.model_dump(mode="json"))
                else:
                    print("\n".join(_job_lines(d)))
                return EXIT_OK
            page = client.jobs(status=args.filter, limit=max(1, min(args.limit, 200)))
            if args.json:
                _print_json(page.model_dump(mode="json"))
                return EXIT_OK
            print(f"{'id':32}  {'status':9}  {'stage':14}  {'done':>4}  {'created':19}  model")
            for j in page.items:
                print(
                    f"{j.id:32}  {j.status.value:9}  {(j.stage or '-')[:14]:14}  {j.progress:4.0%}  {_when(j.created_at):19}  {_model_label(j)}"
                )
            if page.total > len(page.items):
                print(f"({len(page.items)} of {page.total} jobs; --limit for more)", file=sys.stderr)
        return EXIT_OK

    return _run("bitscout status", argv, _status_parser, body)


def _wait_parser() -> _Parser:
    p = _parser(
        "wait",
        "Wait for a job to end, with a progress bar; exit 3 if it failed or was canceled.",
        "bitscout wait 3f2a9c... --timeout 3600",
    )
    p.add_argument("job", metavar="JOB", help="the job's id")
    p.add_argument("--poll", type=float, default=2.0, metavar="S", help="seconds between polls (default: 2)")
    p.add_argument(
        "--timeout",
        dest="wait_timeout",
        type=float,
        metavar="S",
        help="give up after S seconds (exit 1; the job goes on)",
    )
    p.add_argument("--json", action="store_true", help="print the finished job as JSON")
    _progress_flag(p)
    return p


def wait_main(argv: Sequence[str]) -> int:
    """``bitscout wait JOB``."""

    def body(args: argparse.Namespace) -> int:
        with _client(args) as client:
            job = client.job(args.job)
            job.wait(
                progress=_show_progress(args),
                poll_interval=args.poll,
                timeout=args.wait_timeout,
                raise_on_failure=False,
            )
            if args.json:
                _print_json(job.data.model_dump(mode="json"))
            else:
                print(_finish_line(job))
            job.raise_for_status()
        return EXIT_OK

    return _run("bitscout wait", argv, _wait_parser, body)


def _cancel_parser() -> _Parser:
    p = _parser(
        "cancel",
        "Cancel a job: a queued job ends at once, a running one within seconds.",
        "bitscout cancel 3f2a9c...",
    )
    p.add_argument("job", metavar="JOB", help="the job's id")
    return p


def cancel_main(argv: Sequence[str]) -> int:
    """``bitscout cancel JOB``."""

    def body(args: argparse.Namespace) -> int:
        with _client(args) as client:
            d = client.cancel(args.job).data
        if d.status is JobStatus.canceled:
            print(f"job {d.id} canceled")
        else:
            print(f"job {d.id}: cancel requested; it stops within seconds")
        return EXIT_OK

    return _run("bitscout cancel", argv, _cancel_parser, body)


# --------------------------------------------------------------------------- results


def _pareto_parser() -> _Parser:
    p = _parser(
        "pareto",
        "Show a job's points as a table (* recommended, F on the front, B meets the budget, A artifact to download, "
        "R refined after the search; its label names the point it was refined from; found: the score it was "
        "allocated from and the closed loop's round r<n>, +ls found by the local search, guard a uniform map the "
        "guard put there, reference a uniform baseline).",
        "bitscout pareto 3f2a9c... --front   |   bitscout pareto 3f2a9c... --json > front.json",
    )
    p.add_argument("job", metavar="JOB", help="the job's id")
    p.add_argument("--front", action="store_true", help="only points on the Pareto front")
    p.add_argument("--json", action="store_true", help="print every point with its precision map as JSON")
    return p


def front_table(front: Front) -> str:
    """The points as a text table."""
    metric_names: list[str] = []
    for p in front:
        for k in p.metrics:
            if k not in metric_names:
                metric_names.append(k)
    if front.metric in metric_names:
        metric_names.remove(front.metric)
        metric_names.insert(0, front.metric)
    head = (f"{'id':>4}  {'flags':5}  {'method':8}  {'label':18}  {'found':14}  {'size MB':>9}  {'avg bits':>8}  "
            f"{'latency ms':>10}")
    head += "".join(f"  {m:>10}" for m in metric_names)
    lines = [head]
    for p in front:
        flags = (
            ("*" if p.recommended else "")
            + ("F" if p.on_front else "")
            + ("B" if p.meets_budget else "")
            + ("A" if p.artifact_available else "")
            + ("R" if p.refined else "")
        )
        label = p.label
        if p.refined:
            label = f"refined from #{p.refined_from}" if p.refined_from is not None else "refined"
        found = provenance_text(None if p.provenance is None else p.provenance.model_dump())
        row = (f"{p.id:>4}  {flags:5}  {p.method[:8]:8}  {label[:18]:18}  {found[:14]:14}  {p.cost.size_mb:9.3f}  "
               f"{p.cost.avg_bits:8.2f}  {p.cost.latency_ms:10.3f}")
        for m in metric_names:
            v = p.metrics.get(m)
            row += f"  {'-' if v is None else format(v, '.4f'):>10}"
        lines.append(row)
    if front.baseline_metrics:
        base = ", ".join(f"{k}={v:.4f}" for k, v in front.baseline_metrics.items() if v is not None)
        lines.append(f"unquantized: {base}")
    order = "higher is better" if front.higher_is_better else "lower is better"
    lines.append(
        f"metric: {front.metric or '-'} ({order}); recommended point: {front.recommended if front.recommended is not None else '-'}"
    )
    return "\n".join(lines)


def pareto_main(argv: Sequence[str]) -> int:
    """``bitscout pareto JOB``."""

    def body(args: argparse.Namespace) -> int:
        with _client(args) as client:
            front = client.pareto(args.job)
        if args.front:
            front = front.on_front()
        if args.json:
            _print_json({
                "job_id": front.job_id, "metric": front.metric, "higher_is_better": front.higher_is_better,
                "baseline_metrics": front.baseline_metrics, "recommended": front.recommended,
                "budget": None if front.budget is None else front.budget.model_dump(mode="json", exclude_none=True),
                "points": [p.model_dump(mode="json") for p in front],
            })  # fmt: skip
        elif not front:
            print("no points (yet): the job has not succeeded", file=sys.stderr)
        else:
            print(front_table(front))
        return EXIT_OK

    return _run("bitscout pareto", argv, _pareto_parser, body)


def _resolve_parser() -> _Parser:
    p = _parser(
        "resolve",
        "Find the best precision map under a new budget from a job's stored sensitivities (no model run).",
        "bitscout resolve 3f2a9c... --max-size-mb 12 -o precision_map.json",
    )
    p.add_argument("job", metavar="JOB", help="the job's id")
    opt.add_budget_options(p)
    p.add_argument(
        "--method",
        dest="methods",
        action="append",
        metavar="METHOD",
        help="sensitivity tables to use (repeat; default: all)",
    )
    p.add_argument(
        "-o", "--output", metavar="FILE", help="write the precision map as JSON (for bitscout.apply)"
    )
    p.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    return p


def _resolve_summary(r: ResolveRead) -> str:
    counts: dict[str, int] = {}
    for o in r.precision_map.values():
        key = "pruned" if o.bits == 0 else f"{o.bits}-bit{'' if o.symmetric else ' asym'}"
        if o.group_size is not None:
            key += f" g{o.group_size}"
        counts[key] = counts.get(key, 0) + 1
    mix = ", ".join(f"{n} x {k}" for k, n in sorted(counts.items()))
    lines = [
        f"size: {r.cost.size_mb:.3f} MB   avg bits: {r.cost.avg_bits:.2f}   BOPs: {r.cost.bops:.3g}   latency: {r.cost.latency_ms:.3f} ms",
        f"groups: {len(r.precision_map)} ({mix})",
        f"predicted loss: {'-' if r.predicted is None else format(r.predicted, '.6g')}   "
        + ("optimal" if r.exact else f"gap <= {r.gap:.3g}" if r.gap is not None else "not proven optimal"),
    ]
    return "\n".join(lines)


def resolve_main(argv: Sequence[str]) -> int:
    """``bitscout resolve JOB --max-size-mb ...``."""

    def body(args: argparse.Namespace) -> int:
        limits = _limits(args)
        if not any(k.startswith("max_") for k in limits):
            raise UsageError(
                "give at least one limit: --max-size-mb, --max-avg-bits, --max-bops or --max-latency-ms"
            )
        methods = [m.strip() for item in args.methods or [] for m in item.split(",") if m.strip()] or None
        with _client(args) as client:
            r = client.resolve(args.job, limits, methods=methods)
        if args.output:
            out = Path(args.output)
            out.write_text(
                json.dumps({k: v.model_dump(exclude_none=True) for k, v in r.precision_map.items()}, indent=2) + "\n"
            )
            print(f"wrote {out}", file=sys.stderr)
        if args.json:
            _print_json(r.model_dump(mode="json"))
        else:
            print(_resolve_summary(r))
        return EXIT_OK

    return _run("bitscout resolve", argv, _resolve_parser, body)


def _export_format(text: str) -> str:
    try:
        return parse_export_format(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _download_parser() -> _Parser:
    p = _parser(
        "download",
        "Download a point's exported model into DIR (unpacked). Any point can be downloaded: one not "
        "stored in the format asked for is exported by the service first, and this waits for it.",
        "bitscout download 3f2a9c... recommended ./quantized\n"
        "  bitscout download 3f2a9c... 4 ./ct --format compressed-tensors",
    )
    p.add_argument("job", metavar="JOB", help="the job's id")
    p.add_argument("point", metavar="POINT", help="the point's id, or 'recommended'")
    p.add_argument("dir", metavar="DIR", help="where to put it (created if needed)")
    p.add_argument(
        "--format",
        type=_export_format,
        default=DEFAULT_EXPORT_FORMAT,
        metavar="F",
        help=f"checkpoint format: {', '.join(EXPORT_FORMATS)} (default: {DEFAULT_EXPORT_FORMAT}, for "
        "bitscout.apply; the others load with plain transformers)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=EXPORT_TIMEOUT_S,
        metavar="S",
        help=f"seconds to wait for the export (default: {EXPORT_TIMEOUT_S:g}); it goes on after that",
    )
    p.add_argument("--no-extract", action="store_true", help="keep the archive as downloaded")
    return p


def download_main(argv: Sequence[str]) -> int:
    """``bitscout download JOB POINT DIR [--format F]``."""

    def body(args: argparse.Namespace) -> int:
        point: int | str = args.point
        if args.point != "recommended":
            try:
                point = int(args.point)
            except ValueError:
                raise UsageError(f"POINT must be a point id or 'recommended', not {args.point!r}") from None
        with _client(args) as client:
            job = client.job(args.job)
            path = job.download(
                point if isinstance(point, int) else "recommended", args.dir, format=args.format,
                timeout=args.timeout, extract=not args.no_extract,
            )  # fmt: skip
        print(path)
        return EXIT_OK

    return _run("bitscout download", argv, _download_parser, body)


def _events_parser() -> _Parser:
    p = _parser("events", "Show a job's event log, oldest first.", "bitscout events 3f2a9c... --follow")
    p.add_argument("job", metavar="JOB", help="the job's id")
    p.add_argument("--after", type=int, metavar="ID", help="only events after this event id")
    p.add_argument("--follow", action="store_true", help="keep printing new events until the job ends")
    p.add_argument("--poll", type=float, default=2.0, metavar="S", help="seconds between polls with --follow")
    p.add_argument("--json", action="store_true", help="one JSON object a line")
    return p


def events_main(argv: Sequence[str]) -> int:
    """``bitscout events JOB``."""

    def body(args: argparse.Namespace) -> int:
        import time

        after = args.after
        with _client(args) as client:
            job = client.job(args.job)
            while True:
                for e in job.events(after=after):
                    after = e.id
                    if args.json:
                        print(e.model_dump_json(), flush=True)
                    else:
                        print(
                            f"{_when(e.at)}  {e.kind:16}  {(e.stage or '-'):14}  {e.message or ''}",
                            flush=True,
                        )
                if not args.follow or job.finished:
                    break
                time.sleep(args.poll)
                job.refresh()
        return EXIT_OK

    return _run("bitscout events", argv, _events_parser, body)


#: The SDK's built-in commands: name -> (main, one-line summary).
COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "submit": (submit_main, "submit a search (flags or a YAML/JSON job file)"),
    "status": (status_main, "show a job, or list jobs"),
    "wait": (wait_main, "wait for a job to end, with a progress bar"),
    "cancel": (cancel_main, "cancel a job"),
    "pareto": (pareto_main, "show a job's points (--json for machines)"),
    "resolve": (resolve_main, "best map under a new budget from stored sensitivities"),
    "download": (download_main, "download a point's exported model"),
    "events": (events_main, "show a job's event log"),
}
