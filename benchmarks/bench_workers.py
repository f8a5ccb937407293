"""Benchmark of the workers: orchestration overhead and submission-to-running latency.

The same search runs three ways on the fine-tuned MiniLM classifier (``benchmarks.assets``; a
tiny BERT with ``--quick``):

* **in-process**: ``search.local.prepare`` + ``Search.run`` in this process (imports done first,
  one torch thread: what one runner uses), timed from the start of ``prepare``; run before and
  after the service runs, the mean is the baseline (the machine may be shared);
* **through the service**: ``bitscout serve`` (API + dispatcher + a local Ray, SQLite) in a
  subprocess, the job submitted over REST and polled until it succeeded; wall time from the POST to
  the poll that sees ``succeeded``. The first job after the server starts is *cold* (Ray starts a
  worker process, which imports torch and transformers); the second is *warm* (Ray reuses it).
  These runs use ``--eval-workers 0`` so the compute is the in-process run's;
  ``overhead = (service - in-process) / service``. On a shared machine the two runs see different
  loads, so the same figure is also measured inside one run: ``orchestration = (service wall -
  the runner's own time in the search stages) / service wall`` (the runner times its stages and
  its store calls and stores them with the result);
* **with parallel evaluation**: a server with ``--eval-workers 1`` (the runner plus one Ray task
  at a time evaluate candidate maps), after warm-up jobs: the speed-up over in-process.

Submission to running, on a warm Ray: small jobs are submitted one at a time; for each, the time
from the POST until ``GET /jobs/{id}`` says ``running`` (claimed by the dispatcher), and until the
runner's own ``runner`` event (the runner process is executing the job).

Targets: overhead at most 5 % on a job of a few minutes; submission to running at most
2 s on a warm Ray.

    python -m benchmarks.bench_workers [--quick] [--cache .cache] [--out benchmarks/results/parts/workers.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

TARGETS = {"overhead_fraction": 0.05, "submit_to_running_s": 2.0}
ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[bench_workers] {msg}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _call(method: str, url: str, token: str | None = None, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - a local server
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


# --------------------------------------------------------------------------- assets and specs


def _assets(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path, dict[str, Any]]:
    """(model dir, data file, spec overrides)."""
    if args.quick:
        sys.path.insert(0, str(ROOT))
        from tests.tiny import build_model, sentiment_rows, train_classifier, write_jsonl

        model = train_classifier(build_model(tmp / "models" / "tiny-bert", "bert", layers=2), sentiment_rows(400), steps=30)
        data = write_jsonl(tmp / "inputs" / "sentiment.jsonl", sentiment_rows(600, seed=5))
        spec = {"data": {"calibration_size": 32, "evaluation_size": 256, "max_length": 32},
                "space": {"bits": [2, 3, 4, 8]}, "budget": {"max_avg_bits": 5.0}, "front_points": 8}  # fmt: skip
        return model, data, spec
    from benchmarks.assets import bbc_classifier

    model = bbc_classifier(args.cache)
    data = Path(args.cache) / "bbc_heldout.jsonl"
    spec = {
        "data": {"calibration_size": args.calibration, "evaluation_size": args.evaluation, "max_length": args.max_length},
        "space": {"bits": [2, 3, 4, 8]},
        "budget": {"max_avg_bits": 4.5},
        "front_points": args.front_points,
    }
    return model, data, spec


def _spec(model: Path, data_file: Path, *overrides: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"path": model.name},
        "task": "sequence_classification",
        "data": {"path": data_file.name, "label_field": "label"},
        "methods": ["kl"],
    }
    for src in overrides:
        for k, v in src.items():
            spec[k] = {**spec[k], **v} if isinstance(v, dict) and isinstance(spec.get(k), dict) else v
    return spec


def _small_spec(model: Path, data: Path) -> dict[str, Any]:
    """A job of a second or two: for the latency probes and the warm-up."""
    return _spec(model, data, {"data": {"calibration_size": 8, "evaluation_size": 16, "max_length": 16},
                               "space": {"bits": [4, 8], "include": ["*.layer.0.attention.self.query"]},
                               "budget": {"max_avg_bits": 6.0}, "front_points": 4})  # fmt: skip


# --------------------------------------------------------------------------- in-process


def in_process(spec: dict[str, Any], model: Path, data: Path) -> dict[str, Any]:
    import torch

    from bitscout.schemas import JobSpec
    from search.local import prepare
    from workers.spec import data_options, search_options

    torch.set_num_threads(1)
    js = JobSpec.model_validate(spec)
    t0 = time.perf_counter()
    search = prepare(model, data_options(js, str(data)), search_options(js), task=js.task.value, device="cpu")
    result = search.run()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "points": len(result.points), "timings": result.timings}


# --------------------------------------------------------------------------- the service


class Served:
    """``bitscout serve`` in a subprocess, on SQLite in a temporary data directory."""

    def __init__(self, tmp: Path, name: str, model_root: Path, data_root: Path, eval_workers: int) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.dir = tmp / name
        self.log_path = self.dir / "serve.log"
        self.dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(XDG_CONFIG_HOME=str(self.dir / "config"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        for k in ("BITSCOUT_CONFIG", "RAY_ADDRESS", "BITSCOUT_RAY_ADDRESS", "DATABASE_URL", "BITSCOUT_DATABASE_URL"):
            env.pop(k, None)
        cmd = [
            sys.executable, "-m", "bitscout.cli", "serve", "--port", str(self.port), "--data-dir", str(self.dir / "data"),
            "--model-root", str(model_root), "--data-root", str(data_root), "--eval-workers", str(eval_workers),
            "--max-concurrent-jobs", "1", "--log-level", "warning",
        ]  # fmt: skip
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT)  # noqa: S603
        deadline = time.monotonic() + 180
        while True:
            try:
                if _call("GET", f"{self.base}/readyz")[0] == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bitscout serve did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        self.start_s = time.perf_counter() - t0
        cfg = json.loads((self.dir / "config" / "bitscout" / "config.json").read_text())
        self.token = cfg["token"]

    def job(self, spec: dict[str, Any], *, poll_s: float = 0.25, timeout_s: float = 3600) -> dict[str, Any]:
        """Submit ``spec`` and wait for it; wall time and the job's own timestamps."""
        t0 = time.perf_counter()
        status, job = _call("POST", f"{self.base}/api/v1/jobs", self.token, spec)
        if status != 201:
            raise RuntimeError(f"submission failed: {status} {job}")
        running_s = None
        while job["status"] not in ("succeeded", "failed", "canceled"):
            if time.perf_counter() - t0 > timeout_s:
                raise RuntimeError(f"job {job['id']} did not finish in {timeout_s} s")
            time.sleep(poll_s)
            job = _call("GET", f"{self.base}/api/v1/jobs/{job['id']}", self.token)[1]
            if running_s is None and job["status"] != "queued":
                running_s = time.perf_counter() - t0
        wall = time.perf_counter() - t0
        if job["status"] != "succeeded":
            raise RuntimeError(f"job {job['id']} {job['status']}: {job.get('error_code')} {job.get('error_message')}")
        events = _call("GET", f"{self.base}/api/v1/jobs/{job['id']}/events", self.token)[1]
        evaluated = next((e.get("data") for e in events if e["kind"] == "evaluated"), None) or {}
        orch = dict(self.result_info(job["id"]).get("orchestration") or {})
        if orch.get("runner_search_s") is not None:
            # everything but the search itself: dispatch, worker start, store writes, client polling
            orch["orchestration_s"] = wall - orch["runner_search_s"]
            orch["orchestration_fraction"] = orch["orchestration_s"] / wall
        return {"seconds": wall, "first_seen_running_s": running_s, "id": job["id"], "n_points": job["n_points"],
                "breakdown": _breakdown(events), "evaluation": evaluated, "orchestration": orch,
                "messages": [f"{e['kind']}: {e['message']}" for e in events if e["kind"] in
                             ("loaded", "sensitivity_stored", "evaluated", "method")]}  # fmt: skip

    def result_info(self, job_id: str) -> dict[str, Any]:
        """What the runner stored with the result (read from the server's SQLite database)."""
        from service.settings import Settings
        from service.store import Store

        store = Store.from_settings(Settings(data_dir=self.dir / "data"))
        try:
            return store.get_result_info(job_id=job_id)
        finally:
            store.close()

    def latency(self, spec: dict[str, Any], n: int) -> dict[str, Any]:
        """Submission to running (claimed) and to the runner's start, ``n`` jobs one at a time."""
        to_running: list[float] = []
        to_runner: list[float] = []
        for _ in range(n):
            t0 = time.perf_counter()
            status, job = _call("POST", f"{self.base}/api/v1/jobs", self.token, spec)
            assert status == 201, job  # noqa: S101
            while True:
                job = _call("GET", f"{self.base}/api/v1/jobs/{job['id']}", self.token)[1]
                if job["status"] != "queued":
                    to_running.append(time.perf_counter() - t0)
                    break
                time.sleep(0.01)
            while job["status"] not in ("succeeded", "failed", "canceled"):
                time.sleep(0.05)
                job = _call("GET", f"{self.base}/api/v1/jobs/{job['id']}", self.token)[1]
            events = _call("GET", f"{self.base}/api/v1/jobs/{job['id']}/events", self.token)[1]
            b = _breakdown(events)
            if b.get("created_to_runner_s") is not None:
                to_runner.append(b["created_to_runner_s"])
        return {"n": n, "to_running": _stats(to_running), "to_runner_start": _stats(to_runner)}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _stats(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"p50_s": None, "max_s": None, "mean_s": None}
    return {"p50_s": statistics.median(xs), "max_s": max(xs), "mean_s": statistics.fmean(xs)}


def _ts(s: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def _breakdown(events: list[dict[str, Any]]) -> dict[str, float | None]:
    """Seconds from the job's creation to each milestone, from its event log."""
    at: dict[str, float] = {}
    for e in events:
        at.setdefault(e["kind"], _ts(e["at"]))
    t0 = at.get("created")

    def since(kind: str) -> float | None:
        return None if t0 is None or kind not in at else at[kind] - t0

    return {
        "created_to_claimed_s": since("claimed"),
        "created_to_runner_s": since("runner"),
        "created_to_loaded_s": since("loaded"),
        "created_to_succeeded_s": since("succeeded"),
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_workers", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model instead of MiniLM")
    ap.add_argument("--cache", default=".cache", help="where benchmarks.assets keeps the MiniLM classifier")
    ap.add_argument("--out", default="benchmarks/results/parts/workers.json")
    ap.add_argument("--calibration", type=int, default=16)
    ap.add_argument("--evaluation", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--front-points", type=int, default=8)
    ap.add_argument("--latency-jobs", type=int, default=8)
    ap.add_argument("--skip-parallel", action="store_true", help="skip the run with parallel evaluation")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The in-process run gets what Ray gives a runner that asks for 1 CPU: one OpenMP thread (Ray
    # sets OMP_NUM_THREADS to the task's CPUs) and one torch thread. Set before numpy / torch load.
    os.environ["OMP_NUM_THREADS"] = "1"

    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp_s:
        tmp = Path(tmp_s)
        model, data, overrides = _assets(args, tmp)
        spec = _spec(model, data, overrides)
        log(f"model {model}, data {data}; spec {json.dumps(spec)}")

        log("in-process run")
        local = in_process(spec, model, data)
        log(f"in-process: {local['seconds']:.1f} s")

        out: dict[str, Any] = {"quick": args.quick, "model": str(model), "spec": spec, "targets": TARGETS,
                               "machine": {"cores": os.cpu_count(), "platform": platform.platform(),
                                           "load_average_start": list(os.getloadavg())},
                               "in_process": local}  # fmt: skip
        served = Served(tmp, "serial", model.parent, data.parent, eval_workers=0)
        try:
            out["server_start_s"] = served.start_s
            log("service, cold (first job after the server started)")
            cold = served.job(spec)
            log(f"cold: {cold['seconds']:.1f} s")
            log("service, warm")
            warm = served.job(spec)
            log(f"warm: {warm['seconds']:.1f} s")
            log("submission to running, warm Ray")
            lat = served.latency(_small_spec(model, data), args.latency_jobs)
        finally:
            served.stop()
        # The machine may be shared: the in-process run again, after the service runs; the baseline
        # is the mean of the two.
        log("in-process run, again")
        local_b = in_process(spec, model, data)
        log(f"in-process: {local_b['seconds']:.1f} s")
        base = (local["seconds"] + local_b["seconds"]) / 2
        out["in_process_again"] = local_b
        out["in_process_mean_s"] = base
        out["service_cold"] = cold
        out["service_warm"] = warm
        out["overhead_fraction_warm"] = (warm["seconds"] - base) / warm["seconds"]
        out["overhead_fraction_cold"] = (cold["seconds"] - base) / cold["seconds"]
        out["overhead_s_warm"] = warm["seconds"] - base
        out["overhead_s_cold"] = cold["seconds"] - base
        # What orchestration itself adds, from the job's event log (less sensitive to the load):
        # queue + dispatch + worker start before the runner runs, and the client's polling lag.
        b = warm["breakdown"]
        if b.get("created_to_runner_s") is not None and b.get("created_to_succeeded_s") is not None:
            out["warm_dispatch_s"] = b["created_to_runner_s"]
            out["warm_runner_s"] = b["created_to_succeeded_s"] - b["created_to_runner_s"]
            out["warm_client_lag_s"] = warm["seconds"] - b["created_to_succeeded_s"]
        out["submit_to_running"] = lat
        # The same, measured inside one run (robust on a shared machine): job wall time minus the
        # runner's own time in the search stages.
        for name, run in (("warm", warm), ("cold", cold)):
            o = run.get("orchestration") or {}
            out[f"orchestration_fraction_{name}"] = o.get("orchestration_fraction")
            out[f"orchestration_s_{name}"] = o.get("orchestration_s")
        if not args.skip_parallel:
            served = Served(tmp, "parallel", model.parent, data.parent, eval_workers=1)
            try:
                # warm-up: Ray starts the runner's and the evaluation tasks' worker processes
                served.job(_spec(model, data, overrides, {"data": {"evaluation_size": 32}}))
                log("service with parallel evaluation (eval_workers=1)")
                par = served.job(spec)
            finally:
                served.stop()
            par["speedup_vs_in_process"] = base / par["seconds"]
            par["evaluation_in_process_s"] = local["timings"].get("evaluation")
            out["service_parallel_eval"] = par
            log(f"parallel: {par['seconds']:.1f} s ({par['speedup_vs_in_process']:.2f}x in-process)")
        out["machine"]["load_average_end"] = list(os.getloadavg())
        out["meets_targets"] = {
            "overhead_fraction_warm": out["overhead_fraction_warm"] <= TARGETS["overhead_fraction"],
            "orchestration_fraction_warm": (out["orchestration_fraction_warm"] or 1.0) <= TARGETS["overhead_fraction"],
            "orchestration_fraction_cold": (out["orchestration_fraction_cold"] or 1.0) <= TARGETS["overhead_fraction"],
            "submit_to_running_p50": (lat["to_running"]["p50_s"] or 1e9) <= TARGETS["submit_to_running_s"],
        }

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    log(f"wrote {args.out}")
    print(json.dumps({k: out[k] for k in ("overhead_fraction_warm", "overhead_fraction_cold",
                                          "orchestration_fraction_warm", "orchestration_fraction_cold",
                                          "submit_to_running", "meets_targets")}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
