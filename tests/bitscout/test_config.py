"""Where the client finds the service and its token: arguments, environment, the config file that
``bitscout serve`` writes (through the service's own ``ensure_admin_token``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bitscout
from bitscout._config import resolve_config
from tests.bitscout.conftest import Service
from tests.bitscout.support import live_server


def _write(path: Path, **values: str) -> Path:
    path.write_text(json.dumps(values))
    return path


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _write(tmp_path / "config.json", url="http://cfg:1/", token="bst_cfg")
    c = resolve_config(config_path=cfg)
    assert (c.url, c.token, c.url_source, c.token_source) == (
        "http://cfg:1",
        "bst_cfg",
        "config file",
        "config file",
    )
    monkeypatch.setenv("BITSCOUT_CONFIG", str(cfg))
    assert resolve_config().token == "bst_cfg"  # $BITSCOUT_CONFIG names the file
    monkeypatch.setenv("BITSCOUT_URL", "env:2")
    monkeypatch.setenv("BITSCOUT_TOKEN", "bst_env")
    c = resolve_config()
    assert (c.url, c.token, c.url_source, c.token_source) == (
        "http://env:2",
        "bst_env",
        "environment",
        "environment",
    )
    c = resolve_config("http://arg:3", "bst_arg")
    assert (c.url, c.token) == ("http://arg:3", "bst_arg")
    monkeypatch.delenv("BITSCOUT_URL")
    monkeypatch.delenv("BITSCOUT_TOKEN")
    monkeypatch.setenv("BITSCOUT_CONFIG", str(tmp_path / "none.json"))
    c = resolve_config()
    assert (c.url, c.token, c.url_source) == (bitscout.DEFAULT_URL, None, "default")


def test_the_config_token_never_goes_to_another_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _write(tmp_path / "config.json", url="http://127.0.0.1:8000", token="bst_local_admin")
    assert resolve_config("http://elsewhere.example", config_path=cfg).token is None
    monkeypatch.setenv("BITSCOUT_URL", "https://elsewhere.example")
    assert resolve_config(config_path=cfg).token is None
    assert resolve_config("http://127.0.0.1:8000/", config_path=cfg).token == "bst_local_admin"


def test_broken_config_files_are_ignored(tmp_path: Path) -> None:
    for text in ("", "{", "[1, 2]", '{"url": 3, "token": null}'):
        p = tmp_path / "c.json"
        p.write_text(text)
        c = resolve_config(config_path=p)
        assert c.url == bitscout.DEFAULT_URL and c.token is None


def test_client_reads_the_config_bitscout_serve_writes(
    service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.cli import ensure_admin_token

    cfg = tmp_path / "xdg" / "bitscout" / "config.json"
    with live_server(service.app) as url:
        token = ensure_admin_token(service.settings, url=url, config_path=cfg)
        assert cfg.stat().st_mode & 0o777 == 0o600
        monkeypatch.setenv("BITSCOUT_CONFIG", str(cfg))
        with bitscout.Client() as client:  # no arguments: URL and admin token from the file
            assert client.url == url and client.token == token
            alice = bitscout.Client(url, service.tokens["alice"]).submit(
                model="hf:org/m@" + "c" * 40,
                data="dataset:ag_news",
                task="embeddings",
                budget={"max_avg_bits": 4},
            )
            page = client.jobs()
            assert [j.id for j in page.items] == [alice.id] and page.items[
                0
            ].owner == "alice"  # admin sees all
            assert client.version()["schema_version"]
        # the XDG location when $BITSCOUT_CONFIG is not set
        monkeypatch.delenv("BITSCOUT_CONFIG")
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
        assert bitscout.default_config_path() == cfg
        assert bitscout.Client().token == token
