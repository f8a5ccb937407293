"""Connecting to Ray: a local Ray started in this process, or a cluster (``--ray-address`` /
``RAY_ADDRESS``)."""

from __future__ import annotations

import logging
import os
from typing import Any

from workers.settings import WorkerSettings

log = logging.getLogger("bitscout.workers.cluster")


def init_ray(settings: WorkerSettings) -> dict[str, Any]:
    """Connect to the cluster at ``settings.ray_address``, or start a local Ray; returns
    ``{"address": ..., "local": bool, "resources": {...}}``. Does nothing but report when Ray is
    already initialised in this process (tests, or an embedding application)."""
    import ray

    local = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {
            "namespace": settings.ray_namespace,
            "ignore_reinit_error": True,
            "logging_level": logging.WARNING,
            "log_to_driver": False,
        }
        address = settings.ray_address
        if address and address.lower() not in ("local",):
            ray.init(address=address, **kwargs)
        else:
            # An explicit local start: do not pick up a RAY_ADDRESS left in the environment.
            os.environ.pop("RAY_ADDRESS", None)
            local = True
            ray.init(
                address="local",
                num_cpus=settings.ray_num_cpus,
                num_gpus=settings.ray_num_gpus,
                include_dashboard=False,
                **kwargs,
            )
    ctx = ray.get_runtime_context()
    return {
        "address": getattr(ctx, "gcs_address", None),
        "local": local,
        "resources": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")},
    }


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
