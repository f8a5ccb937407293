"""The Ray tasks that run one job attempt and one point's export, importable without the search library.

The dispatcher lives in the API's process under ``bitscout serve``; that process never loads
torch or transformers. :data:`run_job_task` and :data:`run_export_task` are defined here and import
the job runner / the exporter (and with them the search library) only inside the Ray worker that
runs them.
"""

from __future__ import annotations

from typing import Any

import ray

from workers.settings import RunnerConfig


def run_job(job_id: str, worker_id: str, config: RunnerConfig, threads: int = 1) -> dict[str, Any]:
    """Run one job attempt in this process (:func:`workers.runner.run_job`); never raises."""
    from workers.runner import run_job as run

    return run(job_id, worker_id, config, threads)


#: The Ray task the dispatcher starts for each job attempt. Ray does not retry it: a lost worker
#: is the dispatcher's to handle (re-queue up to the retry limit, reusing what was stored).
run_job_task = ray.remote(max_retries=0, retry_exceptions=False)(run_job)


def run_export(task: dict[str, Any], config: RunnerConfig, threads: int = 1) -> dict[str, Any]:
    """Run one claimed export in this process (:func:`workers.exporter.run_export`); never raises."""
    from workers.exporter import run_export as run

    return run(task, config, threads)


#: The Ray task the dispatcher starts for each claimed export; not retried by Ray either (a lost
#: worker's export goes back to pending, up to the retry limit).
run_export_task = ray.remote(max_retries=0, retry_exceptions=False)(run_export)
