"""Fixtures of the SDK tests: the real service app (SQLite) with tokens for three users, clients
in-process (through a transport) and over a real socket (uvicorn), and a tiny real model.

The SDK's own unit tests need none of this: the fixtures skip when the server's dependencies are
missing (``pip install bitscout`` alone), so those tests still run."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import bitscout
from tests.bitscout.support import SyncASGITransport, live_server


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the developer's own config file or environment."""
    monkeypatch.setenv("BITSCOUT_CONFIG", str(tmp_path / "no-config.json"))
    monkeypatch.delenv("BITSCOUT_URL", raising=False)
    monkeypatch.delenv("BITSCOUT_TOKEN", raising=False)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("fastapi")
    pytest.importorskip("sqlalchemy")
    from service import db

    path = tmp_path_factory.mktemp("sdk-template") / "template.db"
    engine = db.make_engine(f"sqlite:///{path}")
    try:
        db.upgrade(engine)
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        engine.dispose()
    return path


@dataclass
class Service:
    """The real app over a fresh SQLite database, its store, and a token per user."""

    app: Any
    store: Any
    settings: Any
    tokens: dict[str, str]
    work: Path
    _closers: list[Any] = field(default_factory=list)

    def transport(self) -> SyncASGITransport:
        t = SyncASGITransport(self.app)
        self._closers.append(t)
        return t

    def async_transport(self) -> Any:
        import httpx2

        return httpx2.ASGITransport(app=self.app, raise_app_exceptions=False)

    def client(self, user: str = "alice", **kwargs: Any) -> bitscout.Client:
        kwargs.setdefault("transport", self.transport())
        kwargs.setdefault("retries", bitscout.RetryPolicy(max_retries=3, backoff=0.01))
        c = bitscout.Client("http://testserver", self.tokens.get(user, user), **kwargs)
        self._closers.append(c)
        return c

    def async_client(self, user: str = "alice", **kwargs: Any) -> bitscout.AsyncClient:
        kwargs.setdefault("transport", self.async_transport())
        kwargs.setdefault("retries", bitscout.RetryPolicy(max_retries=3, backoff=0.01))
        return bitscout.AsyncClient("http://testserver", self.tokens.get(user, user), **kwargs)

    def close(self) -> None:
        for c in reversed(self._closers):
            c.close()


def make_service(tmp_path: Path, template: Path, *, resolver: Any = None, **overrides: Any) -> Service:
    from service.app import create_app
    from service.settings import Settings
    from service.store import Store

    data = tmp_path / "server"
    (data / "models").mkdir(parents=True, exist_ok=True)
    (data / "inputs").mkdir(parents=True, exist_ok=True)
    db_path = data / "bitscout.db"
    shutil.copy(template, db_path)
    values: dict[str, Any] = dict(
        database_url=f"sqlite:///{db_path}",
        data_dir=data,
        model_root=data / "models",
        data_root=data / "inputs",
        submit_rate_per_min=0,
        upload_rate_per_min=0,
        max_upload_mb=4,
        token_cache_s=0,
        metrics=False,
    )
    values.update(overrides)
    settings = Settings(**values)
    store = Store.from_settings(settings)
    tokens = {
        "alice": store.create_token(name="alice")[1],
        "bob": store.create_token(name="bob")[1],
        "admin": store.create_token(name="root", admin=True)[1],
    }
    app = create_app(settings, resolver=resolver, store=store)
    return Service(app, store, settings, tokens, tmp_path / "work")


@pytest.fixture
def service(tmp_path: Path, sqlite_template: Path) -> Iterator[Service]:
    """The app without a resolver (what a server without the workers package runs)."""
    svc = make_service(tmp_path, sqlite_template)
    try:
        yield svc
    finally:
        svc.close()
        svc.store.close()


@pytest.fixture
def resolving_service(tmp_path: Path, sqlite_template: Path) -> Iterator[Service]:
    """The app with an allocator behind ``/resolve``."""
    pytest.importorskip("torch")
    from workers.resolver import SearchResolver

    svc = make_service(tmp_path, sqlite_template, resolver=SearchResolver())
    try:
        yield svc
    finally:
        svc.close()
        svc.store.close()


@pytest.fixture
def live_url(service: Service) -> Iterator[str]:
    """``service`` over a real socket (uvicorn on a free localhost port)."""
    pytest.importorskip("uvicorn")
    with live_server(service.app) as url:
        yield url


# --------------------------------------------------------------------------- a tiny model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT classifier (trained a few steps, saved with safetensors and a tokenizer) and a
    JSONL file of labeled rows."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.tiny import build_model, sentiment_rows, train_classifier, write_jsonl

    root = tmp_path_factory.mktemp("sdk-tiny")
    folder = build_model(root / "tiny-bert", "bert", layers=2, hidden=32, heads=4, intermediate=64)
    train_classifier(folder, sentiment_rows(200, seed=7), steps=30)
    data = write_jsonl(root / "sentiment.jsonl", sentiment_rows(120, seed=1))
    return {"model": folder, "data": data}


#: Submit options that keep the real search on the tiny model to a second or two.
TINY_JOB: dict[str, Any] = {
    "task": "sequence_classification",
    "methods": ["kl"],
    "budget": {"max_avg_bits": 5.0},
    "space": {"bits": [2, 4, 8], "granularity": "layer"},
    "front_points": 4,
    "data_options": {"label_field": "label", "calibration_size": 16, "evaluation_size": 32, "max_length": 16},
}
