"""Task runners: the default thread pool, or Dask (a local cluster or a scheduler address) for scale-out.

`dask_address` is a flow parameter: None -> Prefect's thread pool; "local" -> a `LocalCluster` on
this machine; "tcp://host:8786" -> an existing Dask scheduler. Dask workers must see the same
workspace path (a shared filesystem with POSIX locks) and have this project installed.

Two uses: stages mapped over parts (ingest per folder source) run their Prefect tasks on a
`DaskTaskRunner`; dedup and score take the address themselves and map their heavy step (hashing,
CLIP encoding) over the catalog's partitions with `curation.cluster` (no Prefect task per partition).
For build-dataset's stages, a worker's ``DASK_ADDRESS`` environment variable is the default when a
run gives none (the compose stack sets it); "none" turns Dask off for a run.
"""

from __future__ import annotations

import os


def resolve_address(dask_address: str | None) -> str | None:
    """The run's address, else $DASK_ADDRESS; "none" (either place) means no Dask."""
    address = dask_address or os.environ.get("DASK_ADDRESS") or None
    return None if address is None or address.strip().lower() == "none" else address.strip()


def task_runner_for(dask_address: str | None):
    """A Prefect task runner for mapped stages, or None for the flow's default."""
    if not dask_address:
        return None
    from prefect_dask import DaskTaskRunner

    if dask_address == "local":
        workers = max(1, min(4, os.cpu_count() or 2))
        # Loopback only. The scheduler serves HTTP (dashboard, health) even with the dashboard off,
        # on 127.0.0.1:8787 by default: a free port instead, so concurrent runs never collide.
        return DaskTaskRunner(cluster_kwargs={
            "n_workers": workers, "threads_per_worker": 1, "processes": True,
            "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0",
        })
    return DaskTaskRunner(address=dask_address)
