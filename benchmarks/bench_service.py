"""Benchmark of the job service over a real socket: submission latency and status-poll throughput.

The API runs under uvicorn (a separate process, ``--workers`` processes, httptools + uvloop) on a
fresh SQLite database (and a fresh PostgreSQL database when one is reachable). Then:

* **submit**: one client submits jobs one after another (``POST /api/v1/jobs``, the SDK's path,
  with httpx2 and keep-alive); latency per request, p50 / p99.
* **poll**: ``--clients`` concurrent keep-alive connections poll ``GET /api/v1/jobs/{id}`` for
  ``--duration`` seconds from ``--client-procs`` processes (a minimal asyncio HTTP/1.1 client, so
  that the load generator costs less CPU than the server it measures); requests per second and
  latency percentiles.

Targets (2 cores, SQLite): submit p50 <= 20 ms; >= 1000 polls/s with p99 <= 50 ms.

    python -m benchmarks.bench_service                  # SQLite and PostgreSQL
    python -m benchmarks.bench_service --db sqlite --clients 8,32,64 --duration 10 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

TARGETS = {"submit_p50_ms": 20.0, "polls_per_s": 1000.0, "poll_p99_ms": 50.0}
PG_BASE = os.environ.get("BITSCOUT_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def _spec(i: int) -> dict[str, Any]:
    return {
        "model": {"hf_id": "sentence-transformers/all-MiniLM-L6-v2", "revision": "a" * 40},
        "task": "sequence_classification",
        "data": {"dataset": "ag_news", "calibration_size": 128},
        "methods": ["kl", "hessian"],
        "budget": {"max_size_mb": 12.5},
        "seed": i,
    }


# --------------------------------------------------------------------------- server


class Server:
    def __init__(self, url: str, data_dir: Path, workers: int) -> None:
        from service import db
        from service.settings import Settings
        from service.store import Store

        settings = Settings(database_url=url, data_dir=data_dir)
        store = Store.from_settings(settings)
        db.upgrade(store.engine)
        _, self.token = store.create_token(name="bench")
        # a running job with progress, like the ones clients poll
        store.create_job(owner="bench", spec=_spec(0))
        rec = store.claim_next_job(worker_id="bench-worker")
        assert rec is not None  # noqa: S101
        store.heartbeat(
            job_id=rec.id, worker_id="bench-worker", progress=0.42, stage="sensitivity", message="probe 5/12"
        )
        self.job_id = rec.id
        store.close()
        self.port = _free_port()
        env = dict(os.environ)
        env.update(
            {
                "BITSCOUT_DATABASE_URL": url,
                "BITSCOUT_DATA_DIR": str(data_dir),
                "BITSCOUT_SUBMIT_RATE_PER_MIN": "0",
                "BITSCOUT_TOKEN_CACHE_S": "5",
                "BITSCOUT_POOL_SIZE": "8",
            }
        )
        cmd = [
            sys.executable, "-m", "uvicorn", "--factory", "service.app:app_from_env",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers),
            "--log-level", "warning", "--no-access-log", "--backlog", "2048",
        ]  # fmt: skip
        try:
            import httptools  # noqa: F401
            import uvloop  # noqa: F401

            cmd += ["--loop", "uvloop", "--http", "httptools"]
        except ImportError:
            pass
        self.proc = subprocess.Popen(cmd, env=env)  # noqa: S603
        self._wait_ready()

    def _wait_ready(self) -> None:
        import httpx2

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the server exited during start-up")
            try:
                if httpx2.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status_code == 200:
                    return
            except httpx2.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server did not become ready in 60 s")

    def pids(self) -> list[int]:
        """The server's processes (the uvicorn master and its workers)."""
        out = [self.proc.pid]
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:
                out.append(int(stat.parent.name))
        return out

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the server's processes (Linux)."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --------------------------------------------------------------------------- submit


def bench_submit(port: int, token: str, n: int, warmup: int = 20) -> dict[str, float]:
    import httpx2

    lat: list[float] = []
    with httpx2.Client(
        base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}
    ) as c:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            r = c.post("/api/v1/jobs", json=_spec(i + 1))
            dt = time.perf_counter() - t0
            if r.status_code != 201:
                raise RuntimeError(f"submit failed: {r.status_code} {r.text[:200]}")
            if i >= warmup:
                lat.append(dt * 1000)
    return {
        "n": n,
        "p50_ms": statistics.median(lat),
        "p99_ms": _pct(lat, 99),
        "mean_ms": statistics.fmean(lat),
        "per_s": 1000 / statistics.fmean(lat),
    }


# --------------------------------------------------------------------------- poll


async def _poll_conn(
    port: int, request: bytes, stop_at: float, start_at: float, lat: list[float], errors: list[str]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while True:
            now = time.perf_counter()
            if now >= stop_at:
                break
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            done = time.perf_counter()
            if status != 200:
                errors.append(str(status))
            elif now >= start_at:
                lat.append((done - now) * 1000)
    finally:
        writer.close()


def _poll_proc(
    port: int, path: str, token: str, conns: int, warmup: float, duration: float, out: Any
) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nAccept: application/json\r\n\r\n".encode()
    lat: list[float] = []
    errors: list[str] = []

    async def main() -> None:
        t0 = time.perf_counter()
        start_at, stop_at = t0 + warmup, t0 + warmup + duration
        await asyncio.gather(
            *(_poll_conn(port, request, stop_at, start_at, lat, errors) for _ in range(conns))
        )

    asyncio.run(main())
    out.put((lat, errors))


def bench_poll(server: Server, clients: int, procs: int, duration: float) -> dict[str, float]:
    port, job_id, token = server.port, server.job_id, server.token
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    warmup = 2.0
    ps = [
        ctx.Process(target=_poll_proc, args=(port, f"/api/v1/jobs/{job_id}", token, n, warmup, duration, q))
        for n in per
        if n
    ]
    for p in ps:
        p.start()
    lat: list[float] = []
    errors: list[str] = []
    time.sleep(warmup + 0.5)  # the clients start polling; measure the server's CPU over the window
    cpu0, t0 = server.cpu_seconds(), time.monotonic()
    time.sleep(max(0.0, duration - 1.0))
    cpu1, t1 = server.cpu_seconds(), time.monotonic()
    for _ in ps:
        got_lat, got_err = q.get(timeout=duration + 120)
        lat += got_lat
        errors += got_err
    for p in ps:
        p.join(timeout=30)
    return {
        "clients": clients,
        "requests": len(lat),
        "errors": len(errors),
        "per_s": len(lat) / duration,
        "p50_ms": _pct(lat, 50),
        "p95_ms": _pct(lat, 95),
        "p99_ms": _pct(lat, 99),
        "max_ms": max(lat) if lat else float("nan"),
        # CPU the server spent per poll, and the poll rate that would fill two cores at that cost:
        # robust to other load on a shared machine, unlike the measured rate.
        "server_cpu_ms_per_poll": 1000 * (cpu1 - cpu0) / max(1.0, len(lat) / duration * (t1 - t0)),
        "server_cpu_cores_busy": (cpu1 - cpu0) / (t1 - t0),
    }


# --------------------------------------------------------------------------- main


def _pg_database() -> tuple[str, str] | None:
    try:
        import psycopg
    except ImportError:
        return None
    name = f"bitscout_bench_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(f"{PG_BASE}/postgres", autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except Exception as exc:  # noqa: BLE001
        print(f"PostgreSQL skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    return f"{PG_BASE}/{name}", name


def _drop_pg(name: str) -> None:
    import psycopg

    with psycopg.connect(f"{PG_BASE}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_one(backend: str, args: argparse.Namespace) -> dict[str, Any] | None:
    tmp = Path(tempfile.mkdtemp(prefix=f"bitscout-bench-{backend}-"))
    pg_name = None
    if backend == "sqlite":
        url = f"sqlite:///{tmp / 'bench.db'}"
    else:
        got = _pg_database()
        if got is None:
            return None
        url, pg_name = got
    server = Server(url, tmp / "data", args.workers)
    try:
        submit = bench_submit(server.port, server.token, args.submits)
        polls = [bench_poll(server, n, args.client_procs, args.duration) for n in args.clients]
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        if pg_name:
            _drop_pg(pg_name)
    return {"backend": backend, "workers": args.workers, "submit": submit, "poll": polls}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    ap.add_argument(
        "--clients",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[8, 32],
        help="concurrent polling connections; a comma-separated list runs each",
    )
    ap.add_argument("--client-procs", type=int, default=1, help="processes generating the poll load")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of polling (after 2 s warm-up)")
    ap.add_argument("--submits", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_service.json")
    args = ap.parse_args(argv)
    backends = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    results = []
    for b in backends:
        r = run_one(b, args)
        if r is None:
            continue
        results.append(r)
        s = r["submit"]
        ok_submit = s["p50_ms"] <= TARGETS["submit_p50_ms"]
        print(
            f"{b:10s} submit: p50 {s['p50_ms']:6.2f} ms  p99 {s['p99_ms']:6.2f} ms  ({s['n']} sequential)"
            f"  [{'ok' if ok_submit else 'MISSED'} target p50 <= {TARGETS['submit_p50_ms']:.0f} ms]"
        )
        for p in r["poll"]:
            ok_poll = p["per_s"] >= TARGETS["polls_per_s"] and p["p99_ms"] <= TARGETS["poll_p99_ms"]
            print(
                f"{'':10s} poll:   {p['per_s']:7.0f} req/s  p50 {p['p50_ms']:6.2f} ms  p95 {p['p95_ms']:6.2f} ms  "
                f"p99 {p['p99_ms']:6.2f} ms  ({p['clients']:3d} clients, {p['errors']} errors; "
                f"server CPU {p['server_cpu_ms_per_poll']:.2f} ms/poll, {p['server_cpu_cores_busy']:.2f} cores busy)"
                f"  [{'ok' if ok_poll else 'MISSED'} target >= {TARGETS['polls_per_s']:.0f}/s, "
                f"p99 <= {TARGETS['poll_p99_ms']:.0f} ms]"
            )
    report = {
        "targets": TARGETS,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_at_end": list(os.getloadavg()),
        },
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(
        f"load average (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in os.getloadavg())}; written {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
