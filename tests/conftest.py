"""Shared test configuration.

The Hugging Face hub is unreachable: every test runs offline. Tests that need PostgreSQL or
Chromium skip with a visible reason where these are missing, unless ``BITSCOUT_REQUIRE_ALL=1``
(set by ``.ci/run``) turns such a skip into a failure.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def require_or_skip(available: bool, reason: str) -> None:
    """Skip the calling test with ``reason`` unless BITSCOUT_REQUIRE_ALL=1, then fail instead."""
    if available:
        return
    if os.environ.get("BITSCOUT_REQUIRE_ALL") == "1":
        pytest.fail(f"required in CI but unavailable: {reason}")
    pytest.skip(reason)
