"""The benchmark suite: every part in its own process, merged into one results file, then the report.

``python -m benchmarks.run [--quick] [--only PART ...] [--skip PART ...] [--cache .cache]
[--out benchmarks/results/results.json] [--no-report]``

Each part is ``python -m benchmarks.<module> ... --out <parts dir>/<part>.json`` run in a subprocess
with a time limit, so one failing part does not stop the others: its exit status, the tail of its
output and its time are recorded in place of its figures. Parts whose module does not exist (yet)
are recorded as skipped. The merged file records the machine (CPU model, cores, load average at the
start and the end), the library versions, the seeds, the device every part ran on (CUDA when
``torch.cuda.is_available()``, else the CPU) and the mode.

Absolute times on a shared machine are noise: every part reports its timings as ratios measured in
its own run (forward-pass units, fine-tuning epochs, the same search in-process). The orchestrator
adds one more: each part's wall time in units of a fixed matrix-multiply workload timed at the start
and at the end (``unit_seconds``), which says how loaded the machine was.

Every part's record says which run measured it (``run``: its start, the mode, the commit, the CPU and
that run's work unit), so a file merged from several runs (``--merge``) keeps each part's provenance.

Then ``benchmarks.report`` turns the results file into ``docs/benchmarks.md`` and ``docs/img/*.png``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["PARTS", "Part", "machine_info", "main", "merge", "run_part"]

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path("benchmarks/results/results.json")


@dataclass(frozen=True)
class Part:
    """One benchmark part: ``python -m <module> <args>``; ``quick_args`` replace ``args`` with --quick."""

    name: str
    module: str
    args: tuple[str, ...] = ()
    quick_args: tuple[str, ...] | None = None
    timeout_s: float = 3600.0
    quick_timeout_s: float = 180.0
    in_quick: bool = True
    kind: str = "cost"  # "quality" | "peer" | "oracle" | "cost" | "service"
    notes: tuple[str, ...] = field(default_factory=tuple)


#: quality configurations of the classifier; of embeddings (the classifier's quantized, the embedding model).
#: Each part holds what fits an hour on 2 cores with every method: the BBC classifier's two granularities
#: took 40 minutes; Rotten Tomatoes 15 (layer) and 30 (group), the embedding model's group granularity 31
#: (full mode on a 2-core AMD EPYC; about three times as long on a slower 2-core machine).
QUALITY_BBC = ("bbc-layer", "bbc-group")
#: the quick peer part's limit (the BBC classifier; ModelOpt's venv is made once, in the cache)
PEER_QUICK_TIMEOUT_S = 300.0
QUALITY_EMBEDDINGS = ("bbc-layer-embeddings", "embeddings-layer")
#: The parts in the order they run. Cost parts belong to other modules; missing ones are skipped.
PARTS: tuple[Part, ...] = (
    Part("assets", "benchmarks.assets", args=("--rt", "--uncertainty"), quick_args=(), timeout_s=3600,
         quick_timeout_s=300,
         notes=("the fine-tuned classifiers every other part reads: built once, then found up to date",)),
    Part("quality", "benchmarks.bench_quality", args=("--configs", *QUALITY_BBC),
         quick_args=("--quick", "--configs", "bbc-layer"), timeout_s=3600, quick_timeout_s=330, kind="quality"),
    Part("quality-rt", "benchmarks.bench_quality", args=("--configs", "rt-layer"), timeout_s=3600,
         in_quick=False, kind="quality"),
    Part("quality-rt-group", "benchmarks.bench_quality", args=("--configs", "rt-group"), timeout_s=3600,
         in_quick=False, kind="quality"),
    Part("quality-uncertainty", "benchmarks.bench_quality", args=("--configs", "uncertainty-layer"),
         timeout_s=3600, in_quick=False, kind="quality"),
    Part("quality-uncertainty-group", "benchmarks.bench_quality", args=("--configs", "uncertainty-group"),
         timeout_s=3600, in_quick=False, kind="quality"),
    Part("quality-embeddings", "benchmarks.bench_quality", args=("--configs", *QUALITY_EMBEDDINGS),
         quick_args=("--quick", "--configs", *QUALITY_EMBEDDINGS), timeout_s=3600,
         quick_timeout_s=240, kind="quality"),
    Part("quality-embeddings-group", "benchmarks.bench_quality", args=("--configs", "embeddings-group"),
         timeout_s=3600, in_quick=False, kind="quality"),
    Part("peer", "benchmarks.bench_peer", args=("--configs", "bbc"), quick_args=("--quick", "--configs", "bbc"),
         timeout_s=3600, quick_timeout_s=PEER_QUICK_TIMEOUT_S, kind="peer",
         notes=("NVIDIA ModelOpt auto_quantize in its own venv, side by side on the same rows",)),
    Part("peer-rt", "benchmarks.bench_peer", args=("--configs", "rt"), timeout_s=3600, in_quick=False, kind="peer"),
    Part("peer-uncertainty", "benchmarks.bench_peer", args=("--configs", "uncertainty"), timeout_s=3600,
         in_quick=False, kind="peer"),
    Part("oracle", "benchmarks.bench_oracle", timeout_s=1800, quick_timeout_s=120, kind="oracle"),
    Part("kl", "benchmarks.bench_kl", quick_timeout_s=150),
    Part("hessian", "benchmarks.bench_hessian", quick_timeout_s=90),
    Part("allocate", "benchmarks.bench_allocate", quick_timeout_s=60),
    Part("dnas", "benchmarks.bench_dnas", quick_timeout_s=90, in_quick=False),
    Part("refine", "benchmarks.bench_refine", quick_timeout_s=120, in_quick=False),
    Part("workers", "benchmarks.bench_workers", quick_timeout_s=90, in_quick=False),
    Part("service", "benchmarks.bench_service", args=("--db", "both"),
         quick_args=("--db", "both", "--duration", "3", "--submits", "50", "--clients", "8,32"),
         timeout_s=900, quick_timeout_s=90, kind="service"),
    Part("service-refine", "benchmarks.service_refine", timeout_s=1800, quick_timeout_s=600, in_quick=False,
         kind="service", notes=("one job with refinement through bitscout serve: REST, SDK, CLI, web page, artifact",)),
)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def work_unit_seconds(repeats: int = 5) -> float:
    """Best-of time of a fixed float32 matrix-multiply workload (the unit part times are divided by)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((384, 384), dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x = a
        for _ in range(20):
            x = np.tanh(x @ a)
        best = min(best, time.perf_counter() - t)
    return best


def device_info() -> dict[str, Any]:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return {"device": "cpu", "torch": None}
    info: dict[str, Any] = {"device": "cuda" if torch.cuda.is_available() else "cpu",
                            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    return info


def machine_info() -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_start": list(os.getloadavg()),
    }


def library_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for pkg in ("bitscout", "torch", "transformers", "numpy", "scipy", "optuna", "fastapi", "sqlalchemy", "ray",
                "matplotlib"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def git_commit() -> str | None:
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)  # noqa: S607
    except OSError:
        return None
    return proc.stdout.strip() or None


def _accepts(module: str, flag: str) -> bool:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return False
    try:
        return f'"{flag}"' in Path(spec.origin).read_text(encoding="utf-8")
    except OSError:
        return False


def part_command(part: Part, *, quick: bool, cache: Path, out: Path) -> list[str]:
    """The command line of ``part``: its args, ``--quick`` and ``--cache`` when the module takes them, ``--out``."""
    args = list(part.quick_args if (quick and part.quick_args is not None) else part.args)
    if quick and part.quick_args is None and _accepts(part.module, "--quick"):
        args.append("--quick")
    if _accepts(part.module, "--cache"):
        args += ["--cache", str(cache)]
    return [sys.executable, "-m", part.module, *args, "--out", str(out)]


def run_part(part: Part, *, quick: bool, cache: Path, parts_dir: Path, timeout_s: float,
             threads: int | None = None) -> dict[str, Any]:
    """Run one part in a subprocess; its record (status, seconds, the figures or the error)."""
    if importlib.util.find_spec(part.module) is None:
        return {"status": "skipped", "reason": f"{part.module} does not exist", "kind": part.kind}
    out = parts_dir / f"{part.name}.json"
    out.unlink(missing_ok=True)
    cmd = part_command(part, quick=quick, cache=cache, out=out)
    log(f"{part.name}: {' '.join(cmd[1:])} (limit {timeout_s:.0f}s)")
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    log_file = parts_dir / f"{part.name}.log"
    with log_file.open("w", encoding="utf-8") as fh:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout_s, check=False)  # noqa: S603
            rc: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    seconds = time.perf_counter() - t0
    tail = log_file.read_text(encoding="utf-8", errors="replace")[-3000:]
    record: dict[str, Any] = {"kind": part.kind, "command": " ".join(["python", *cmd[1:]]), "seconds": seconds,
                              "returncode": rc}
    data = None
    if out.is_file():
        try:
            data = json.loads(out.read_text(encoding="utf-8"))
        except ValueError as exc:
            record["error"] = f"unreadable output: {exc}"
    if rc == 0 and data is not None:
        record["status"] = "ok"
    elif data is not None:
        record["status"] = "partial"
        record["error"] = "timed out" if rc is None else f"exit status {rc}"
        record["log_tail"] = tail
    else:
        record["status"] = "failed"
        record["error"] = f"timed out after {timeout_s:.0f}s" if rc is None else f"exit status {rc}"
        record["log_tail"] = tail
    record["data"] = data
    log(f"{part.name}: {record['status']} in {seconds:.0f}s")
    return record


def store(parts: dict[str, dict[str, Any]], name: str, record: dict[str, Any], *, merge: bool) -> bool:
    """Put a part's ``record`` in ``parts``; True when stored. Under ``--merge`` a record without figures
    (failed, timed out with nothing written, skipped) leaves the earlier figures in place, with a ``rerun``
    entry saying what happened, so a rerun never loses what was stored."""
    kept = parts.get(name) if merge else None
    if record.get("data") is None and kept and kept.get("data") is not None:
        kept["rerun"] = {k: record[k] for k in ("status", "error", "reason", "seconds") if k in record}
        log(f"{name}: the rerun has no figures; the earlier ones are kept")
        return False
    parts[name] = record
    return True


def merge(meta: dict[str, Any], parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The results file: ``meta`` plus one record per part."""
    return {"schema": 1, "meta": meta, "parts": parts}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the small suite (about 10 minutes on 2 cores)")
    p.add_argument("--only", nargs="+", default=None, metavar="PART", help=f"parts to run: {', '.join(x.name for x in PARTS)}")
    p.add_argument("--skip", nargs="+", default=(), metavar="PART")
    p.add_argument("--cache", type=Path, default=Path(".cache"))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--total-limit", type=float, default=None,
                   help="seconds for the whole run (default: 600 with --quick, none otherwise)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply every time limit (e.g. 4 on a machine loaded four-fold); recorded in the results")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for the parts (default: the libraries' own choice)")
    p.add_argument("--merge", action="store_true",
                   help="keep the parts of an existing results file that this run does not run")
    p.add_argument("--no-report", action="store_true", help="do not regenerate docs/benchmarks.md")
    p.add_argument("--note", default=None, help="a note stored in the results (e.g. the machine's state)")
    a = p.parse_args(argv)
    known = {x.name for x in PARTS}
    for name in [*(a.only or []), *a.skip]:
        if name not in known:
            p.error(f"unknown part {name!r}; known: {', '.join(sorted(known))}")
    chosen = [x for x in PARTS if (x.name in a.only if a.only else (x.in_quick or not a.quick)) and x.name not in a.skip]
    if not a.time_scale > 0:
        p.error("--time-scale must be positive")
    total_limit = a.total_limit if a.total_limit is not None else (600.0 * a.time_scale if a.quick else None)

    out = a.out if a.out.is_absolute() else ROOT / a.out
    cache = a.cache if a.cache.is_absolute() else ROOT / a.cache
    parts_dir = out.parent / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    meta: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "quick" if a.quick else "full",
        "seed": a.seed,
        "git_commit": git_commit(),
        "machine": machine_info(),
        "versions": library_versions(),
        "device": device_info(),
        "unit_seconds_start": work_unit_seconds(),
        "note": a.note,
        "time_scale": a.time_scale,
        "threads": a.threads,
        "total_limit_s": total_limit,
    }
    parts: dict[str, dict[str, Any]] = {}
    ran: set[str] = set()  # the parts this run measured (merged records keep their own run's figures)
    if a.merge and out.is_file():
        previous = json.loads(out.read_text(encoding="utf-8"))
        # every earlier record stays until its part's rerun has figures: a rerun that fails, times out
        # with nothing written or is stopped loses nothing stored
        parts.update(previous.get("parts", {}))
        meta["merged_from"] = previous.get("meta", {}).get("started")
    if a.quick:
        for x in PARTS:
            if x not in chosen and not a.only and x.name not in a.skip and x.name not in parts:
                parts[x.name] = {"status": "skipped", "reason": "full mode only", "kind": x.kind}
    for part in chosen:
        limit = (part.quick_timeout_s if a.quick else part.timeout_s) * a.time_scale
        if total_limit is not None:
            left = total_limit - (time.perf_counter() - started)
            if left < 20:
                store(parts, part.name, {"status": "skipped", "reason": "the run's time limit was spent",
                                         "kind": part.kind}, merge=a.merge)
                continue
            limit = min(limit, left)
        part_started = datetime.now(UTC).isoformat(timespec="seconds")
        record = run_part(part, quick=a.quick, cache=cache, parts_dir=parts_dir, timeout_s=limit, threads=a.threads)
        # where and when these figures were measured: a merged file holds parts of several runs
        record["run"] = {"started": part_started, "mode": meta["mode"], "git_commit": meta["git_commit"],
                         "cpu": f"{meta['machine']['cpu_model']}, {meta['machine']['cores']} cores",
                         "unit_seconds": meta["unit_seconds_start"], "note": a.note}
        if store(parts, part.name, record, merge=a.merge):
            ran.add(part.name)
        partial = merge(meta, parts)
        out.write_text(json.dumps(partial, indent=1))
    meta["unit_seconds_end"] = work_unit_seconds()
    unit = (meta["unit_seconds_start"] + meta["unit_seconds_end"]) / 2
    for name in ran:
        rec = parts[name]
        rec["run"]["unit_seconds"] = unit
        if "seconds" in rec:
            rec["seconds_in_units"] = rec["seconds"] / unit
    meta["machine"]["load_average_end"] = list(os.getloadavg())
    meta["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    meta["seconds"] = time.perf_counter() - started
    out.write_text(json.dumps(merge(meta, parts), indent=1))
    log(f"wrote {out} in {meta['seconds']:.0f}s: " + ", ".join(f"{k} {v['status']}" for k, v in parts.items()))
    if not a.no_report:
        from benchmarks import report

        report.main(["--results", str(out)])
    return 0 if any(v.get("status") == "ok" for v in parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
