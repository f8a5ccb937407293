"""The README and docs/: every relative link resolves, and product text speaks of the product (no
reference to work tickets or to the runs of a work log)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
WORK_LOG = re.compile(r"\b(?:session|issue|ticket)s?\s+#?\d+\b|\bwork tickets?\b", re.IGNORECASE)


def _docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _product_text() -> list[Path]:
    files = _docs()
    for package in ("bitscout", "search", "service", "workers", "benchmarks", "migrations"):
        files += sorted((ROOT / package).rglob("*.py"))
    files += sorted((ROOT / "service" / "static").rglob("*.*"))
    return [f for f in files if f.is_file()]


def test_every_relative_link_resolves() -> None:
    broken = []
    for doc in _docs():
        for target in LINK.findall(doc.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_product_text_names_no_work_log() -> None:
    hits = []
    for f in _product_text():
        for n, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if WORK_LOG.search(line):
                hits.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert hits == []


def test_the_checks_catch_what_they_look_for(tmp_path: Path) -> None:
    assert WORK_LOG.search("measured in session 6") and WORK_LOG.search("Targets (issue 6)")
    assert not WORK_LOG.search("opens a session in one read transaction")
    assert LINK.findall("see [x](docs/a.md#b) and [y](https://e.org)") == ["docs/a.md#b", "https://e.org"]
