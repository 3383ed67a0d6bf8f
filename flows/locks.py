"""One writer per workspace across flow runs: a Prefect global concurrency limit of 1 per dataset.

Top-level runs that write a workspace (build-dataset, collect-review, publish, train, retrain)
take the dataset's slot; a second run on the same dataset waits for it (serialised, visible in
the UI as a run waiting on `jurassiclass-<dataset>`), so a scheduled re-scrape and a triggered
training never interleave their catalog and model writes. Subflows run inside their parent's
slot (taking it again would deadlock). The catalog's own file lock still guards each commit.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from prefect import get_client, get_run_logger
from prefect.context import FlowRunContext


LEASE_S = 60.0  # the server accepts no shorter lease


def slot_name(dataset: str) -> str:
    return f"jurassiclass-{dataset}"


def _is_subflow() -> bool:
    ctx = FlowRunContext.get()
    return ctx is not None and ctx.flow_run is not None and ctx.flow_run.parent_task_run_id is not None


def ensure_limit(name: str) -> None:
    """Create the limit (1 slot) if it does not exist; an existing one is left as the team set it."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # another run created it first
                pass


@contextmanager
def workspace_slot(dataset: str) -> Iterator[None]:
    """Hold the dataset's slot for the body of a top-level flow run (no-op inside a subflow)."""
    if _is_subflow():
        yield
        return
    from prefect.concurrency.sync import concurrency

    name = slot_name(dataset)
    ensure_limit(name)
    get_run_logger().info("waiting for the workspace slot %r (one run per dataset at a time)", name)
    # The lease is renewed while the run lives; a killed run's slot frees itself within LEASE_S.
    with concurrency(name, occupy=1, strict=True, lease_duration=LEASE_S):
        get_run_logger().info("holding %r", name)
        yield
