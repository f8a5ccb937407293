"""The web status page: the job list at ``/`` and a job's page at ``/jobs/{id}``.

Plain HTML, CSS and vanilla JavaScript served from ``service/static`` (no CDN, no build step).
The pages hold no data: their script calls the REST API with the bearer token the user typed
into the login form or passed once in the address's fragment (``/#token=...``: browsers never
send a fragment, so the token never reaches the server's request line or its access log; the
page removes it from the address bar at once), kept in ``localStorage``. A token in the query
string (``?token=``) is never used (and :mod:`service.logs` keeps it out of the access log).
Every page is served with ``Cache-Control: no-store`` and a strict Content-Security-Policy
(scripts, styles and connections from this origin only).
"""

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

_NO_STORE = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)

router = APIRouter(include_in_schema=False)


def _page(name: str) -> FileResponse:
    headers = dict(_NO_STORE)
    headers["Content-Security-Policy"] = _CSP
    return FileResponse(STATIC_DIR / name, media_type="text/html; charset=utf-8", headers=headers)


@router.get("/")
def index() -> FileResponse:
    return _page("index.html")


@router.get("/favicon.ico")
def favicon() -> FileResponse:
    return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")


@router.get("/jobs")
def jobs_redirect() -> RedirectResponse:
    return RedirectResponse("/")


@router.get("/jobs/{job_id}")
def job_page(job_id: str) -> FileResponse:
    return _page("job.html")


def install_web(app: FastAPI) -> None:
    """Add the pages to ``app`` and mount their static files at ``/static``."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
