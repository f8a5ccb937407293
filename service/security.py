"""Bearer-token authentication (with a short in-memory cache) and per-user rate limits."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass

from bitscout.errors import RateLimited, Unauthorized
from service.store import Principal, Store


class TokenVerifier:
    """Checks bearer tokens against the store, trusting a verified token for ``ttl_s`` seconds
    (so a revoked token stops working within ``ttl_s``), and records ``last_used_at`` at most once
    a minute per token."""

    def __init__(self, store: Store, *, ttl_s: float = 2.0, touch_every_s: float = 60.0) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.touch_every_s = touch_every_s
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._touched: dict[str, float] = {}
        self._lock = threading.Lock()

    def cached(self, authorization: str | None) -> Principal | None:
        """The principal if this header's token was verified less than ``ttl_s`` ago, else None
        (no database access: safe on the event loop)."""
        if not authorization or self.ttl_s <= 0:
            return None
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        key = hashlib.sha256(secret.strip().encode("utf-8", "surrogateescape")).hexdigest()
        hit = self._cache.get(key)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        return None

    def verify(self, authorization: str | None) -> Principal:
        """The principal for an ``Authorization`` header value; raises ``Unauthorized``."""
        if not authorization:
            raise Unauthorized(
                "missing bearer token: send 'Authorization: Bearer <token>' (see `bitscout token`)"
            )
        scheme, _, secret = authorization.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        key = hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        touch = now - self._touched.get(key, -1e18) >= self.touch_every_s
        principal = self.store.verify_token(secret=secret, touch=touch)
        if principal is None:
            with self._lock:
                self._cache.pop(key, None)
            raise Unauthorized("unknown or revoked token")
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = (principal, now + self.ttl_s)
            if touch:
                self._touched[key] = now
        return principal

    def forget(self) -> None:
        """Drop every cached verification (e.g. after revoking tokens in-process)."""
        with self._lock:
            self._cache.clear()


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """A token bucket per key: ``burst`` at once, refilled at ``per_min`` per minute (0: no limit)."""

    def __init__(self, *, per_min: float, burst: int, what: str) -> None:
        self.per_s = per_min / 60.0
        self.burst = float(burst)
        self.what = what
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def hit(self, key: str) -> None:
        """Take one token for ``key``; raises ``RateLimited`` (with ``retry_after_s``) when empty."""
        if self.per_s <= 0:
            return
        now = time.monotonic()
        with self._lock:
            b = self._buckets.get(key)
            if b is None:
                b = self._buckets[key] = _Bucket(self.burst, now)
            b.tokens = min(self.burst, b.tokens + (now - b.at) * self.per_s)
            b.at = now
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                return
            wait = (1.0 - b.tokens) / self.per_s
        raise RateLimited(
            f"too many {self.what}; try again in {wait:.1f} s",
            details={"retry_after_s": round(wait, 3)},
        )
