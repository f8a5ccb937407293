"""The Ray task that runs one job attempt, importable without the search library.

The dispatcher lives in the API's process under ``bitscout serve``; that process never loads
torch or transformers. :data:`run_job_task` is defined here and imports the job runner (and with
it the search library) only inside the Ray worker that runs it.
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
