from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny import build_model, sentiment_rows, train_classifier, write_jsonl


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def sentiment_file(tiny_root) -> Path:
    return write_jsonl(tiny_root / "sentiment.jsonl", sentiment_rows(240, seed=1))


@pytest.fixture(scope="session")
def trained_bert(tiny_root) -> Path:
    """A tiny BERT classifier trained for a few steps on the synthetic sentiment task."""
    folder = build_model(tiny_root / "bert-trained", "bert", layers=2, hidden=32, heads=4, intermediate=64)
    return train_classifier(folder, sentiment_rows(400, seed=7))
