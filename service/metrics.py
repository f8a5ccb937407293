"""Prometheus metrics of the service: requests, their latency, and jobs per status.

:class:`Metrics` owns one registry per app (never the global one, so several apps in one process
do not collide): ``bitscout_http_requests`` (counter by method, route template and status) and
``bitscout_http_request_duration_seconds`` (histogram by method and route template), which
:class:`~service.middleware.MetricsMiddleware` feeds, and the gauge ``bitscout_jobs`` by status,
read from the store at each scrape. A scrape never fails because the database is down: the gauge
is then empty.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from service.store import Store

__all__ = ["Metrics"]


class _JobsCollector:
    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        g = GaugeMetricFamily("bitscout_jobs", "Jobs per status", labels=["status"])
        try:
            counts = self.store.count_jobs()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the database is down
            counts = {}
        for status, n in counts.items():
            g.add_metric([status], n)
        yield g

    def describe(self) -> list[Any]:
        return []


class Metrics:
    """The registry of one app and its request metrics; :meth:`render` is the scrape's body."""

    def __init__(self, store: Store) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "bitscout_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "bitscout_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.registry.register(_JobsCollector(store))

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))
