"""Refinement through the service, end to end, on the real MiniLM BBC classifier.

``python -m benchmarks.service_refine --cache .cache [--out benchmarks/results/service_refine.json]``

Starts ``bitscout serve`` (API, dispatcher and a local Ray, SQLite in ``CACHE/service-refine-server``,
fresh every run), submits ONE job through the Python SDK (KL sensitivity, ``layer`` granularity, a
budget of average 3 bits, ``refine`` of the 2 best front points that meet the budget), follows it,
then checks that the refined points show everywhere a user looks:

a. REST: ``GET /api/v1/jobs/{id}/pareto`` has refined points whose ``refined_from`` names a stored
   point with the same cost and precision map;
b. SDK: ``Job.pareto()`` and ``Front.to_pandas()`` list them (``refined``, ``refined_from``);
c. CLI: ``bitscout pareto JOB`` marks them (flag ``R``, label ``refined from #N``);
d. web page: the job's page in headless Chromium (Playwright) marks them in the table and the plot;
   a screenshot goes to ``docs/img/refined_job.png``;
e. artifact: each refined point's artifact downloads through the SDK, loads with ``bitscout.apply``
   onto a fresh copy of the model and gives exactly the stored accuracy on the job's evaluation rows.

Figures (the JSON file): full-precision accuracy, each refined point's origin and refined accuracy,
the best front accuracy at average 4 / 3 / 2.5 bits before and after refinement, refinement seconds
(from the job's events) also in units of one full-precision fine-tuning epoch of the classifier
(800 training articles, batches of 16) timed in this process after the job, and the job's wall time.
Exits 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.assets import bbc_classifier, ensure_packages
from benchmarks.demo import _free_port, _wait_ready, stop_server

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "img" / "refined_job.png"
CHROMIUM = os.environ.get("BITSCOUT_CHROMIUM", "/usr/bin/chromium")


def log(msg: str) -> None:
    print(f"[service_refine] {msg}", file=sys.stderr, flush=True)


class Checks:
    def __init__(self) -> None:
        self.results: dict[str, dict[str, Any]] = {}

    def record(self, name: str, ok: bool, detail: str) -> None:
        self.results[name] = {"ok": bool(ok), "detail": detail}
        log(f"check {name}: {'PASS' if ok else 'FAIL'} - {detail}")

    def run(self, name: str, fn: Any) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - every check reports, none stops the others
            self.record(name, False, f"{type(exc).__name__}: {exc}")
            return None

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r["ok"] for r in self.results.values())


def best_at(points: list[dict[str, Any]], bits: float, *, refined: bool, uniform: bool = True) -> dict[str, Any] | None:
    """The most accurate point at average ``bits`` or fewer: refined ones only when ``refined``, the
    uniform baselines only when ``uniform`` (they are part of the job's front)."""
    pool = [
        p for p in points
        if (uniform or p["method"] != "uniform") and p["cost"]["avg_bits"] <= bits + 1e-9
        and p["metrics"].get("accuracy") is not None and (refined or not p["refined"])
    ]  # fmt: skip
    if not pool:
        return None
    best = max(pool, key=lambda p: (p["metrics"]["accuracy"], -p["cost"]["size_bytes"]))
    return {"id": best["id"], "avg_bits": best["cost"]["avg_bits"], "accuracy": best["metrics"]["accuracy"],
            "refined": best["refined"]}  # fmt: skip


# ----------------------------------------------------------------------------------------- checks
def check_rest(checks: Checks, url: str, token: str, job_id: str) -> dict[str, Any]:
    import httpx2

    r = httpx2.get(f"{url}/api/v1/jobs/{job_id}/pareto", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    r.raise_for_status()
    body = r.json()
    by_id = {p["id"]: p for p in body["points"]}
    refined = [p for p in body["points"] if p["refined"]]
    bad = []
    for p in refined:
        o = by_id.get(p["refined_from"])
        if o is None:
            bad.append(f"#{p['id']}: refined_from {p['refined_from']} is no point")
        elif o["refined"] or o["cost"] != p["cost"] or o["precision_map"] != p["precision_map"]:
            bad.append(f"#{p['id']}: its origin #{o['id']} differs in cost or map")
    checks.record("rest", bool(refined) and not bad,
                  f"{len(refined)} refined point(s) {[p['id'] for p in refined]} from "
                  f"{[p['refined_from'] for p in refined]}" + (f"; {bad}" if bad else ""))  # fmt: skip
    return body


def check_sdk(checks: Checks, job: Any, rest: dict[str, Any]) -> None:
    front = job.pareto()
    df = front.to_pandas()
    rows = df[df["refined"]]
    want = {p["id"]: p["refined_from"] for p in rest["points"] if p["refined"]}
    got = {int(r.id): int(r.refined_from) for r in rows.itertuples()}
    sdk_points = {p.id: p.refined_from for p in front if p.refined}
    checks.record("sdk", bool(want) and got == want and sdk_points == want,
                  f"Front: {sdk_points}, to_pandas: {got}, REST: {want}")  # fmt: skip


def check_cli(checks: Checks, url: str, token: str, job_id: str, rest: dict[str, Any]) -> str:
    env = {**os.environ, "BITSCOUT_URL": url, "BITSCOUT_TOKEN": token}
    proc = subprocess.run([sys.executable, "-m", "bitscout.cli", "pareto", job_id], env=env,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    out = proc.stdout
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip() and ln.split()[0].isdigit()}
    bad = []
    for p in rest["points"]:
        line = lines.get(str(p["id"]), "")
        flags = line.split()[1] if len(line.split()) > 1 else ""
        marked = "R" in flags and f"refined from #{p['refined_from']}" in line
        if p["refined"] != marked or (not p["refined"] and "refined" in line):
            bad.append(p["id"])
    n = sum(p["refined"] for p in rest["points"])
    checks.record("cli", proc.returncode == 0 and n > 0 and not bad,
                  f"exit {proc.returncode}; {n} refined row(s) marked R / 'refined from #N'"
                  + (f"; wrong rows {bad}" if bad else ""))  # fmt: skip
    return out


def check_web(checks: Checks, url: str, token: str, job_id: str, rest: dict[str, Any], screenshot: Path) -> None:
    if not Path(CHROMIUM).exists():
        checks.record("web", False, f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)")
        return
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"]  # fmt: skip
    refined = [p for p in rest["points"] if p["refined"]]
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{url}/jobs/{job_id}?token={token}")
            page.wait_for_selector("#points tbody tr.refined", timeout=30_000)
            bad = []
            for p in refined:
                cell = page.locator(f"#points tbody tr[data-point='{p['id']}'] td").last.inner_text()
                if f"refined from #{p['refined_from']}" not in cell:
                    bad.append(p["id"])
            rows = page.locator("#points tbody tr.refined").count()
            marks = page.locator("#plot circle.refined").count()
            if refined:  # select the first refined point: its map shows in the heat map of the screenshot
                page.locator(f"#points tbody tr[data-point='{refined[0]['id']}']").click()
                page.wait_for_selector(f"#points tbody tr.selected[data-point='{refined[0]['id']}']")
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    ok = bool(refined) and rows == len(refined) and marks == len(refined) and not bad and not errors
    checks.record("web", ok, f"{rows} refined row(s), {marks} refined plot marker(s); screenshot {screenshot}"
                  + (f"; unmarked {bad}" if bad else "") + (f"; page errors {errors}" if errors else ""))  # fmt: skip


def check_artifacts(checks: Checks, job: Any, rest: dict[str, Any], model_dir: Path, data_path: Path) -> list[Any]:
    import bitscout
    from search.local import prepare
    from search.tasks import evaluate, load_model
    from workers.spec import data_options, search_options

    spec = job.spec
    # the job's own data split and evaluation rows, rebuilt from its spec as the runner builds them
    search = prepare(model_dir, data_options(spec, str(data_path)), search_options(spec), task=spec.task.value,
                     device="cpu")  # fmt: skip
    reference = search.reference()
    refined = [p for p in rest["points"] if p["refined"]]
    results = []
    with tempfile.TemporaryDirectory(prefix="bitscout-refined-") as tmp:
        for p in refined:
            if not p["artifact_available"]:
                results.append({"id": p["id"], "ok": False, "why": "no artifact stored"})
                continue
            d = job.download(p["id"], Path(tmp) / f"point-{p['id']}")
            model = bitscout.apply(load_model(search.model_path, search.task).model, d)
            got = evaluate(model, search.evaluation, search.task, reference=reference)
            stored = p["metrics"]
            ok = got["accuracy"] == stored["accuracy"] and abs(got["kl"] - stored["kl"]) <= 1e-4 * max(1e-6, abs(stored["kl"]))
            results.append({"id": p["id"], "ok": ok, "reloaded": {k: float(v) for k, v in got.items()},
                            "stored": stored})  # fmt: skip
    checks.record("artifact", bool(results) and all(r["ok"] for r in results),
                  "; ".join(f"#{r['id']}: " + (f"reloaded accuracy {r['reloaded']['accuracy']:.4f} vs stored "
                                              f"{r['stored']['accuracy']:.4f}" if "reloaded" in r else r["why"])
                            for r in results) or "no refined point")  # fmt: skip
    return results


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.service_refine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--cache", default=".cache")
    p.add_argument("--out", default=None, help="JSON file for the figures and the checks")
    p.add_argument("--quick", action="store_true", help="fewer rows and steps (a smoke run)")
    p.add_argument("--max-avg-bits", type=float, default=3.0)
    p.add_argument("--points", type=int, default=2, help="best front points within the budget to refine")
    p.add_argument("--steps", type=int, default=None, help="refinement steps per point (default 100; 10 quick)")
    p.add_argument("--bits", default="2,3,4,8")
    p.add_argument("--calibration", type=int, default=None, help="calibration (= refinement training) rows")
    p.add_argument("--evaluation", type=int, default=None)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--front-points", type=int, default=8)
    p.add_argument("--epoch-steps", type=int, default=8, help="fine-tuning steps timed for the epoch unit")
    p.add_argument("--screenshot", default=str(SCREENSHOT))
    p.add_argument("--port", type=int, default=None)
    a = p.parse_args(argv)
    steps = a.steps or (10 if a.quick else 100)
    calibration = a.calibration or (32 if a.quick else 64)
    evaluation = a.evaluation or (96 if a.quick else 300)

    import bitscout

    t_all = time.perf_counter()
    ensure_packages()
    cache = Path(a.cache).resolve()
    model_dir = Path(bbc_classifier(cache)).resolve()
    data = (cache / "bbc_heldout.jsonl").resolve()
    server_dir = cache / "service-refine-server"
    shutil.rmtree(server_dir, ignore_errors=True)
    server_dir.mkdir(parents=True)
    port = a.port or _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "BITSCOUT_CONFIG": str(server_dir / "config.json")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "bitscout.cli", "serve", "--port", str(port), "--data-dir", str(server_dir),
           "--model-root", str(cache), "--data-root", str(cache), "--log-level", "warning"]  # fmt: skip
    log(f"starting bitscout serve on {url} (data dir {server_dir})")
    server = subprocess.Popen(cmd, env=env)
    checks = Checks()
    report: dict[str, Any] = {"model": "all-MiniLM-L6-v2 fine-tuned on BBC topics", "quick": a.quick}
    try:
        _wait_ready(url, server)
        config = json.loads((server_dir / "config.json").read_text())
        token = str(config.get("token") or config.get("servers", {}).get(url, {}).get("token"))
        client = bitscout.Client(url, token=token)
        t_submit = time.perf_counter()
        job = client.submit(
            model=f"server:{model_dir.relative_to(cache)}",
            data=f"server:{data.relative_to(cache)}",
            task="sequence_classification",
            methods=["kl"],
            budget={"max_avg_bits": a.max_avg_bits},
            space={"bits": [int(b) for b in a.bits.split(",")], "granularity": "layer"},
            data_options={"label_field": "label", "calibration_size": calibration, "evaluation_size": evaluation,
                          "max_length": a.max_length},
            front_points=a.front_points,
            refine={"points": a.points, "steps": steps},
            seed=0,
            progress=False,
        )  # fmt: skip
        log(f"submitted job {job.id}: {url}/jobs/{job.id}?token={token}")
        job.wait(progress=sys.stderr.isatty(), raise_on_failure=False)
        wall = time.perf_counter() - t_submit
        job.refresh()
        report.update(job_id=job.id, job_status=job.status.value, job_wall_seconds=wall)
        if not job.succeeded:
            checks.record("job", False, f"job ended {job.status.value}: {job.message}")
            return 1
        checks.record("job", True, f"succeeded in {wall:.0f} s")
        d = job.data
        if d.started_at and d.finished_at:
            report["job_run_seconds"] = (d.finished_at - d.started_at).total_seconds()

        rest = checks.run("rest", lambda: check_rest(checks, url, token, job.id)) or {"points": []}
        checks.run("sdk", lambda: check_sdk(checks, job, rest))
        cli_out = checks.run("cli", lambda: check_cli(checks, url, token, job.id, rest))
        if cli_out:
            print(cli_out)
        checks.run("web", lambda: check_web(checks, url, token, job.id, rest, Path(a.screenshot)))
        reloads = checks.run("artifact", lambda: check_artifacts(checks, job, rest, model_dir, data))

        # -- figures
        points = rest["points"]
        by_id = {p["id"]: p for p in points}
        events = [e for e in job.events() if e.kind == "refined"]
        seconds = {int(e.data["point"]): float(e.data.get("seconds", float("nan"))) for e in events if e.data}
        fp = (rest.get("baseline_metrics") or {}).get("accuracy")
        refined_rows = []
        for p in points:
            if not p["refined"]:
                continue
            o = by_id[p["refined_from"]]
            ev = next((e.data for e in events if e.data and int(e.data["point"]) == o["id"]), {}) or {}
            refined_rows.append({
                "id": p["id"], "refined_from": o["id"], "avg_bits": p["cost"]["avg_bits"], "size_mb": p["cost"]["size_mb"],
                "origin_accuracy": o["metrics"].get("accuracy"), "refined_accuracy": p["metrics"].get("accuracy"),
                "origin_kl": o["metrics"].get("kl"), "refined_kl": p["metrics"].get("kl"),
                "gap_to_fp_points": None if fp is None else 100 * (fp - p["metrics"]["accuracy"]),
                "refine_seconds": seconds.get(o["id"]), "steps": ev.get("steps"), "best_step": ev.get("best_step"),
                "recommended": p["recommended"], "artifact_available": p["artifact_available"],
            })  # fmt: skip
        report.update(
            fp32_accuracy=fp,
            evaluation_rows=evaluation,
            calibration_rows=calibration,
            refine={"points": a.points, "steps": steps},
            budget={"max_avg_bits": a.max_avg_bits},
            n_points=len(points),
            refined=refined_rows,
            front_before_after={
                str(b): {"before": best_at(points, b, refined=False), "after": best_at(points, b, refined=True),
                         "searched_before": best_at(points, b, refined=False, uniform=False)}
                for b in (4.0, 3.0, 2.5)
            },
            refine_seconds_total=sum(v for v in seconds.values()),
            artifact_reloads=reloads,
        )

        # -- the unit: one full-precision fine-tuning epoch of the classifier, timed here (server idle)
        def epoch() -> None:
            import torch
            import transformers

            from benchmarks.bench_refine import finetune_epoch_seconds
            from search.data import load_text_data, tokenize
            from search.tasks import load_model

            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
            lm = load_model(str(model_dir), "sequence_classification")
            names = [lm.model.config.id2label[i] for i in range(len(lm.model.config.id2label))]
            tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
            train = tokenize(load_text_data(str(cache / "bbc_train.jsonl"), label_field="label", label_names=names),
                             tok, max_length=a.max_length, batch_size=16)  # fmt: skip
            epoch_s, timed = finetune_epoch_seconds(lm.model, train, steps=a.epoch_steps)
            report.update(finetune_epoch_seconds=epoch_s, finetune_steps_timed=timed, finetune_epoch_steps=len(train),
                          torch_threads=torch.get_num_threads())  # fmt: skip
            for r in refined_rows:
                if r["refine_seconds"] is not None:
                    r["refine_epochs"] = r["refine_seconds"] / epoch_s
            report["refine_epochs_total"] = report["refine_seconds_total"] / epoch_s

        try:
            epoch()
        except Exception as exc:  # noqa: BLE001 - a figure, not a check
            log(f"could not time the fine-tuning epoch: {exc}")

        log(f"full precision accuracy {fp}")
        for r in refined_rows:
            log(f"point #{r['refined_from']} ({r['avg_bits']:.2f} bits, {r['size_mb']:.2f} MB): accuracy "
                f"{r['origin_accuracy']:.4f} -> {r['refined_accuracy']:.4f} (#{r['id']}) in "
                f"{r['refine_seconds']:.0f} s = {r.get('refine_epochs', float('nan')):.2f} epochs")  # fmt: skip
        for b, v in report["front_before_after"].items():
            before, after = v["before"], v["after"]
            log(f"best at <= {b} bits: before {before and before['accuracy']}, after {after and after['accuracy']}")
        return 0 if checks.ok else 1
    except KeyboardInterrupt:
        return 1
    finally:
        report["checks"] = checks.results
        report["all_checks_passed"] = checks.ok
        report["total_seconds"] = time.perf_counter() - t_all
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(report, indent=2, default=str))
            log(f"wrote {a.out}")
        stop_server(server, timeout=60)


if __name__ == "__main__":
    sys.exit(main())
