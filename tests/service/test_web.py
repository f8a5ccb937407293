"""The web status page in a real browser (Debian's Chromium, headless, driven by Playwright).

The app is served by uvicorn on a free localhost port, with uvicorn's own logging configuration
and its access log captured; a finished job is written through the store; the test opens the pages
and checks that the plot and the table show the stored points, and that no token ever reaches the
access log.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_or_skip
from tests.service.conftest import job_spec, make_points

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("BITSCOUT_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    def __init__(self, base: str, store: Any, token: str, access: list[str]) -> None:
        self.base = base
        self.store = store
        self.token = token
        #: the access log's lines, as uvicorn formats them
        self.access = access


class _Lines(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        from uvicorn.logging import AccessFormatter

        super().__init__()
        self.lines = lines
        self.setFormatter(AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s', use_colors=False))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def served(tmp_path: Path, sqlite_template: Path) -> Iterator[Served]:
    import uvicorn

    from service.app import create_app
    from service.settings import Settings
    from service.store import Store

    shutil.copy(sqlite_template, tmp_path / "web.db")
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'web.db'}", data_dir=tmp_path / "data", token_cache_s=0
    )
    store = Store.from_settings(settings)
    _, token = store.create_token(name="alice")
    port = _free_port()
    # uvicorn configures its loggers here (its default configuration, access log on) ...
    config = uvicorn.Config(create_app(settings, store=store), host="127.0.0.1", port=port, log_level="info")
    # ... and its access logger then gets one more handler, which keeps every line it writes.
    access: list[str] = []
    handler = _Lines(access)
    logging.getLogger("uvicorn.access").addHandler(handler)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield Served(f"http://127.0.0.1:{port}", store, token, access)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        logging.getLogger("uvicorn.access").removeHandler(handler)
        store.close()


@pytest.fixture
def page() -> Iterator[Any]:
    require_or_skip(Path(CHROMIUM).exists(), f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    pw_mod = pytest.importorskip("playwright.sync_api")
    with pw_mod.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        # A refused token is a 401 the login test provokes on purpose, and requests cut short by a
        # navigation are not errors either; anything else is a bug.
        benign = ("401", "ERR_ABORTED", "Failed to fetch")
        pg.on(
            "console",
            lambda m: (
                errors.append(m.text) if m.type == "error" and not any(b in m.text for b in benign) else None
            ),
        )
        try:
            yield pg
        finally:
            browser.close()
        assert not errors, errors


def _finished_job(store: Any, n: int = 6) -> tuple[str, list[dict[str, Any]]]:
    store.create_job(owner="alice", spec=job_spec(methods=["kl", "hessian"], budget={"max_size_mb": 9.0}))
    rec = store.claim_next_job(worker_id="w")
    store.heartbeat(job_id=rec.id, worker_id="w", progress=0.5, stage="sensitivity", message="probing")
    points = make_points(n, groups=8)
    points[1]["method"] = "hessian"
    points[1]["provenance"] = {"score": "hessian", "round": 2, "local_search": True, "guard": False,
                               "how": "local from budget", "proxy": 0.01}
    points[2]["provenance"] = {"score": "kl", "round": 1, "local_search": False, "guard": True, "how": "guard at uniform 4-bit"}
    store.finish_job(
        job_id=rec.id, worker_id="w", points=points, front_info={"baseline_metrics": {"accuracy": 0.95}}
    )
    return rec.id, points


def test_job_list_and_finished_job_page(served: Served, page: Any) -> None:
    job_id, points = _finished_job(served.store)
    served.store.create_job(owner="alice", spec=job_spec())  # a queued one too
    page.goto(f"{served.base}/#token={served.token}")
    page.wait_for_selector(f"#jobs tbody tr[data-job='{job_id}']")
    assert page.locator("#jobs tbody tr").count() == 2
    assert "token" not in page.url  # the token left the address bar
    row = page.locator(f"#jobs tbody tr[data-job='{job_id}']")
    assert "succeeded" in row.inner_text() and "kl, hessian" in row.inner_text()

    row.locator("a").click()
    page.wait_for_url(f"**/jobs/{job_id}")
    page.wait_for_selector("#plot [data-point]")
    pareto = served.store.get_pareto(job_id=job_id)
    n = len(pareto.points)
    assert n == len(points)
    # one marker per stored point, uniform baselines drawn as their own markers
    assert page.locator("#plot [data-point]").count() == n
    assert page.locator("#plot [data-method='uniform']").count() == 2
    assert sorted(
        int(x)
        for x in page.locator("#plot [data-point]").evaluate_all("els => els.map(e => e.dataset.point)")
    ) == list(range(n))
    # the recommended point is marked, the budget line drawn
    assert page.locator(f"#plot [data-recommended='{pareto.recommended}']").count() == 1
    assert page.locator("#plot line.budget").count() == 1
    # the table rows match the stored points
    rows = page.locator("#points tbody tr")
    assert rows.count() == n
    for p in pareto.points:
        cells = page.locator(f"#points tbody tr[data-point='{p.id}'] td").all_inner_texts()
        assert cells[0] == str(p.id) and cells[1] == p.method and cells[2] == p.label
        assert cells[3] == {1: "hessian r2 +ls", 2: "kl guard"}.get(p.id, "-")
        assert float(cells[4]) == pytest.approx(p.cost.size_mb, rel=1e-3)
        assert float(cells[8]) == pytest.approx(p.metrics["accuracy"], rel=1e-3)
    # hover shows a tooltip
    page.locator("#plot [data-point='3']").hover()
    tip = page.locator("#tooltip")
    assert tip.is_visible() and "#3" in tip.inner_text() and "accuracy" in tip.inner_text()
    # the heat map shows the recommended point's map, and another one when a row is clicked
    cells = page.locator("#heatmap rect.cell")
    assert cells.count() == 8
    rec_map = pareto.points[pareto.recommended or 0].precision_map
    got = {c.get_attribute("data-group"): int(c.get_attribute("data-bits")) for c in cells.all()}
    assert got == {k: v.bits for k, v in rec_map.items()}
    page.locator("#points tbody tr[data-point='0']").click()
    page.wait_for_selector("#points tbody tr.selected[data-point='0']")
    got0 = {
        c.get_attribute("data-group"): int(c.get_attribute("data-bits"))
        for c in page.locator("#heatmap rect.cell").all()
    }
    assert got0 == {k: v.bits for k, v in pareto.points[0].precision_map.items()}
    # the event log and the summary
    assert page.locator("#events tbody tr").count() == 4
    assert page.locator("#status").inner_text() == "succeeded"
    # switching the cost axis redraws every marker
    page.select_option("#cost-select", "avg_bits")
    assert page.locator("#plot [data-point]").count() == n


def test_running_job_page_refreshes(served: Served, page: Any) -> None:
    served.store.create_job(owner="alice", spec=job_spec())
    rec = served.store.claim_next_job(worker_id="w")
    page.goto(f"{served.base}/jobs/{rec.id}#token={served.token}")
    page.wait_for_selector("#status.running")
    served.store.heartbeat(
        job_id=rec.id, worker_id="w", progress=0.6, stage="evaluation", message="map 3 of 5"
    )
    from playwright.sync_api import expect

    expect(page.locator("#stage")).to_contain_text("evaluation", timeout=10_000)
    assert "60%" in page.locator("#stage").inner_text()
    served.store.finish_job(job_id=rec.id, worker_id="w", points=make_points(3, with_uniform=False))
    page.wait_for_selector("#status.succeeded", timeout=10_000)
    page.wait_for_selector("#plot [data-point]")
    assert page.locator("#plot [data-point]").count() == 3


def test_login_form_and_bad_token(served: Served, page: Any) -> None:
    page.goto(f"{served.base}/")
    page.wait_for_selector("#login:not(.hidden)")
    page.fill("#token-input", "bst_wrong")
    page.click("#login-form button")
    page.wait_for_selector("#login-error:not(.hidden)")
    page.fill("#token-input", served.token)
    page.click("#login-form button")
    page.wait_for_selector("#content:not(.hidden)")
    assert page.locator("#empty").is_visible()


def test_refined_points_are_marked_even_when_recommended(served: Served, page: Any) -> None:
    served.store.create_job(owner="alice", spec=job_spec(budget={"max_size_mb": 9.0}))
    rec = served.store.claim_next_job(worker_id="w")
    points = make_points(4, groups=8, with_uniform=False)
    refined = {**points[0], "refined": True, "refined_from": 0, "label": "refined",
               "metrics": {**points[0]["metrics"], "accuracy": 0.99}}  # fmt: skip
    points.append(refined)
    served.store.finish_job(job_id=rec.id, worker_id="w", points=points)
    pareto = served.store.get_pareto(job_id=rec.id)
    assert pareto.recommended == 4  # the refined point is the best under the budget
    page.goto(f"{served.base}/jobs/{rec.id}#token={served.token}")
    page.wait_for_selector("#points tbody tr[data-point='4']")
    cell = page.locator("#points tbody tr[data-point='4'] td").last.inner_text()
    assert "recommended" in cell and "refined from #0" in cell
    assert page.locator("#points tbody tr.refined").count() == 1
    assert page.locator("#plot circle.refined[data-point='4']").count() == 1
    page.locator("#plot [data-point='4']").hover()
    assert "(refined from #0)" in page.locator("#tooltip").inner_text()


def test_the_token_never_reaches_the_access_log(served: Served, page: Any) -> None:
    job_id, _ = _finished_job(served.store)
    # the link the demo prints: the token in the fragment, which the browser never sends
    page.goto(f"{served.base}/jobs/{job_id}#token={served.token}")
    page.wait_for_selector("#plot [data-point]")
    assert "token" not in page.url
    assert page.evaluate("localStorage.getItem('bitscout_token')") == served.token
    page.goto(f"{served.base}/")
    page.wait_for_selector(f"#jobs tbody tr[data-job='{job_id}']")  # still signed in
    # a token in the query string reaches the server: it is never used, and never logged
    page.evaluate("localStorage.clear()")
    _, other = served.store.create_token(name="bob")
    page.goto(f"{served.base}/?token={other}")
    page.wait_for_selector("#login:not(.hidden)")
    assert "after '#'" in page.locator("#login-error").inner_text() and "token" not in page.url
    assert page.evaluate("localStorage.getItem('bitscout_token')") is None
    _wait_for(lambda: any("/?token=" in line for line in served.access))
    lines = "\n".join(served.access)
    assert f"GET /jobs/{job_id} HTTP/1.1" in lines and "/api/v1/jobs" in lines  # the log was captured
    assert served.token not in lines and other not in lines
    assert "/?token=[redacted]" in lines


def test_the_access_log_redacts_tokens_in_query_strings(served: Served) -> None:
    """Without a browser: whatever a client puts in a query string, the access log hides its token."""
    import httpx2 as httpx

    secret = served.token
    for path in (f"/?token={secret}", f"/jobs/x?a=1&token={secret}&b=2", f"/api/v1/jobs?access_token={secret}"):
        httpx.get(served.base + path, timeout=10)
    _wait_for(lambda: len([line for line in served.access if "redacted" in line]) >= 3)
    lines = "\n".join(served.access)
    assert secret not in lines
    assert "/jobs/x?a=1&token=[redacted]&b=2" in lines and "access_token=[redacted]" in lines


def _wait_for(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
