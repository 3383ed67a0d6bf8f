"""Task runners: the default thread pool, or Dask (a local cluster or a scheduler address) for scale-out.

`dask_address` is a flow parameter: None -> Prefect's thread pool; "local" -> a `LocalCluster` on
this machine; "tcp://host:8786" -> an existing Dask scheduler. Dask workers must see the same
workspace path (a shared filesystem with POSIX locks) and have this project installed.
"""

from __future__ import annotations

import os


def task_runner_for(dask_address: str | None):
    """A Prefect task runner for mapped stages, or None for the flow's default."""
    if not dask_address:
        return None
    from prefect_dask import DaskTaskRunner

    if dask_address == "local":
        workers = max(1, min(4, os.cpu_count() or 2))
        # Loopback only: the dashboard is off so nothing listens beyond the scheduler and workers.
        return DaskTaskRunner(cluster_kwargs={
            "n_workers": workers, "threads_per_worker": 1, "processes": True,
            "host": "127.0.0.1", "dashboard_address": None,
        })
    return DaskTaskRunner(address=dask_address)
