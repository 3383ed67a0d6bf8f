"""A Dask address in, partition-wise stage work out: connect, map a worker function over catalog partitions, gather small results.

Stages that scale with the catalog (dedup's hashing, the score stage's CLIP encoding) run per
partition (`catalog.partitions`) when given ``dask_address``: "local" starts a `LocalCluster` on this
machine, "tcp://host:8786" joins an existing scheduler. Worker functions take plain picklable
arguments (the workspace root, a partition key, the catalog version every task reads, settings) and
read their rows from the table themselves (`catalog.read_partition`); they return small frames or
dicts, and the driver commits catalog changes once. Ingest, whose files are not in the catalog yet, maps
over chunks of its file list instead (`map_chunks`). Workers must therefore see the workspace at the
same path (a shared filesystem with POSIX locks: the stages' caches are written by workers) and have
this project installed. GPU workers advertise ``--resources GPU=1``; tasks ask for it only when the
cluster has such workers.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from curation.errors import JurassiclassError
from curation.workers import usable_cores

LOCAL = "local"
GPU = "GPU"


class ClusterError(JurassiclassError, RuntimeError):
    """The Dask cluster cannot be reached or started."""


def local_workers() -> int:
    """Worker processes for a LocalCluster: one per core, at most four (each holds its own model)."""
    return min(4, usable_cores())


@contextmanager
def connect(address: str, *, timeout: float = 30) -> Iterator[Any]:
    """A `distributed.Client` for ``address`` ("local" = a LocalCluster here, closed on exit)."""
    from distributed import Client, LocalCluster

    # Not the process's default client: a Prefect DaskTaskRunner in the same process keeps its own.
    opts = {"set_as_default": False}
    if not address:
        raise ClusterError("dask_address is empty: use 'local' or a scheduler address such as tcp://host:8786")
    if address == LOCAL:
        # Loopback only; the scheduler's HTTP endpoint (dashboard) on a free port, so two runs never collide.
        with LocalCluster(n_workers=local_workers(), threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address="127.0.0.1:0") as cluster, Client(cluster, **opts) as client:
            yield client
        return
    try:
        client = Client(address, timeout=timeout, **opts)
    except (OSError, TimeoutError) as exc:
        raise ClusterError(f"cannot reach the Dask scheduler at {address}: {exc}") from exc
    with client:
        yield client


def gpu_workers(client: Any) -> int:
    """Workers that advertise a GPU resource (`dask worker --resources GPU=1`)."""
    try:
        workers = client.scheduler_info(n_workers=-1)["workers"]  # newer clients list only 5 by default
    except TypeError:
        workers = client.scheduler_info()["workers"]
    return sum(1 for w in workers.values() if (w.get("resources") or {}).get(GPU, 0) >= 1)


def partitions_holding(ws: Any, ids: Iterable[str]) -> list[str]:
    """The catalog partitions that hold ``ids`` (a partition key is a prefix of its rows' image_ids,
    `catalog.partitions`): a run maps only over those, not over all 256 for a few new images."""
    import polars as pl

    from curation import catalog

    keys = catalog.partitions(ws)
    ids = pl.Series("image_id", ids if isinstance(ids, pl.Series) else list(ids), dtype=pl.Utf8)
    if not keys or ids.is_empty():
        return []
    prefixes = set().union(*(ids.str.slice(0, w).unique().to_list() for w in {len(k) for k in keys}))
    return [k for k in keys if k in prefixes]


def worker_count(client: Any) -> int:
    """Workers the scheduler knows now."""
    try:
        return len(client.scheduler_info(n_workers=-1)["workers"])
    except TypeError:
        return len(client.scheduler_info()["workers"])


def _map(client: Any, fn: Callable, named: list[tuple[Any, Any]], args: tuple, resources: dict | None,
         kwargs: dict) -> Iterator[tuple[Any, Any]]:
    """``fn(*args, item, **kwargs)`` per (name, item), as (name, result) in completion order; see `map_partitions`."""
    from distributed import as_completed

    if not named:
        return
    # (name-run, item) keys: the dashboard groups tasks by function, one run's apart from another's.
    group = f"{getattr(fn, '__name__', 'task')}-{uuid.uuid4().hex}"
    futures = {client.submit(fn, *args, item, key=(group, name), resources=resources, **kwargs): name
               for name, item in named}
    try:
        for fut in as_completed(futures, loop=client.loop):
            yield futures[fut], fut.result()
    finally:
        client.cancel(list(futures))


def map_partitions(
    client: Any, fn: Callable, keys: Iterable[str], *args: Any, resources: dict | None = None, **kwargs: Any
) -> Iterator[tuple[str, Any]]:
    """``fn(*args, key, **kwargs)`` for every partition key, as (key, result) in completion order.

    A task's exception is raised here (the remaining tasks are cancelled): per-image failures are
    the worker function's to return as data, so one that escapes is a setup error (weights missing,
    workspace not shared), the same the in-process run would raise.
    """
    yield from _map(client, fn, [(k, k) for k in keys], args, resources, kwargs)


def map_chunks(
    client: Any, fn: Callable, chunks: Iterable[Any], *args: Any, resources: dict | None = None, **kwargs: Any
) -> Iterator[tuple[int, Any]]:
    """``fn(*args, chunk, **kwargs)`` for every chunk of work not tied to the catalog (ingest's files),
    as (chunk index, result) in completion order; errors as in `map_partitions`."""
    yield from _map(client, fn, list(enumerate(chunks)), args, resources, kwargs)
