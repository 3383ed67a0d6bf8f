"""One Prefect flow per curation stage, each a thin wrapper over a plain function in `curation/`.

The stage list and its order live in `BUILD` (build-dataset) and `COLLECT` (collect-review); a new
stage is one `Stage(...)` entry plus, if it should be deployable alone, a flow.

Re-runs skip completed work because every stage is idempotent and resumable by design (ingest and
scrape skip known files/URLs, dedup hashes only new images, scoring caches embeddings, the catalog
never duplicates an image_id and is written atomically under a file lock). Prefect's result cache
is therefore off for stage tasks: their outcome depends on the catalog and the sources, not on
their inputs alone, and a cached "done" would wrongly skip a periodic re-scrape.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE

from curation import progress
from curation.config import FolderSource, Manifest
from flows import artifacts
from flows.common import brief, combine, open_run, plain
from flows.failures import log_failure
from flows.runners import resolve_address, task_runner_for


def _call(module: str, fn: str, **kwargs: Any) -> Callable:
    def call(m: Manifest, ws, **extra: Any) -> Any:
        return getattr(importlib.import_module(f"curation.{module}"), fn)(m, ws, **kwargs, **extra)

    call.__qualname__ = f"curation.{module}.{fn}"
    return call


@dataclass(frozen=True)
class Stage:
    name: str  # task and flow name, part of its artifact keys, accepted by build-dataset's `skip`
    call: Callable[[Manifest, Any], Any]  # the plain curation function
    applies: Callable[[Manifest], bool] = lambda m: True
    network: bool = False  # retried: network errors are transient
    map_over: str | None = None  # "folder_sources": independent parts run as parallel tasks
    # Takes `dask_address` itself: its heavy step runs per catalog partition on Dask (curation/cluster.py).
    cluster: bool = False


def _has_folder(m: Manifest) -> bool:
    return bool(m.sources_of(FolderSource))


def _has_web(m: Manifest) -> bool:
    from curation.scrape import has_web_sources  # imported late: flows load stages lazily

    return has_web_sources(m)


# Several folder sources: one task per source (on Dask via the task runner). One source with an
# address: its per-file validation runs in chunks of files on that cluster (cluster=True).
INGEST = Stage("ingest", _call("ingest", "run", show_progress=False), applies=_has_folder, map_over="folder_sources",
               cluster=True)
# Not mapped per class: the stage already downloads concurrently (scrape.concurrency, per host),
# and one journal + in-run URL memory per workspace is what makes its resume exact.
SCRAPE = Stage("scrape", _call("scrape", "run", show_progress=False), applies=_has_web, network=True)
# Global by nature: duplicates are found across classes; CLIP thresholds and the softmax over
# classes need every image at once.
# Their heavy steps (hashing, CLIP encoding) are partition-wise, so with `dask_address` they go to Dask.
DEDUP = Stage("dedup", _call("dedup", "run", show_progress=False), cluster=True)
SCORE = Stage("score", _call("clip_score", "run", show_progress=False), cluster=True)
REVIEW_PUSH = Stage("review-push", _call("review", "push", show_progress=False), network=True)
REVIEW_PULL = Stage("review-pull", _call("review", "pull"), network=True)
REVIEW_STATUS = Stage("review-status", _call("review", "status"), network=True)
# Nothing to publish yet (nobody reviewed) is a skipped summary, not a failure: build-dataset runs
# before review as well as after it.
PUBLISH = Stage("publish", _call("publish", "run", show_progress=False))

# build-dataset, in pipeline order.
BUILD: list[Stage] = [INGEST, SCRAPE, DEDUP, SCORE, REVIEW_PUSH, PUBLISH]

# collect-review: bring reviewers' decisions back into the catalog, then report progress.
COLLECT: list[Stage] = [REVIEW_PULL, REVIEW_STATUS]

BY_NAME: dict[str, Stage] = {s.name: s for s in BUILD + COLLECT}


def parts_of(stage: Stage, m: Manifest) -> list[dict] | None:
    """The independent parts a stage is mapped over, or None to run it as one task."""
    if stage.map_over == "folder_sources":
        idx = [i for i, s in enumerate(m.sources) if isinstance(s, FolderSource)]
        if len(idx) > 1:
            return [{"sources": [i]} for i in idx]
    return None


def restrict(m: Manifest, part: dict | None) -> Manifest:
    """The manifest narrowed to one part (some of its sources); everything else unchanged."""
    if not part:
        return m
    return m.model_copy(update={"sources": [m.sources[i] for i in part["sources"]]})


@task(cache_policy=NO_CACHE)
def stage_task(stage: str, manifest: str, workdir: str | None = None, overrides: dict | None = None,
               part: dict | None = None, dask_address: str | None = None) -> dict | list:
    """Run one stage (or one part of it) and return its summary as plain data."""
    try:
        m, ws = open_run(manifest, workdir, overrides)
        extra = {"dask_address": dask_address} if dask_address and BY_NAME[stage].cluster else {}
        with progress.listening(artifacts.Progress(stage if not part else f"{stage} {part}")):
            summary = BY_NAME[stage].call(restrict(m, part), ws, **extra)
    except Exception as exc:
        # The cause on the task's own page; the flow above it logs the traceback, once.
        log_failure(get_run_logger(), stage if not part else f"{stage} {part}", exc, traceback=False)
        raise
    return plain(summary) if summary is not None else {}


# Errors that say the setup is wrong (a missing file or key, a bad manifest): retrying cannot help.
_PERMANENT = ("JurassiclassError", "ManifestError", "SourceError", "ReviewError", "ClipSetupError", "WeightsUnavailable",
              "PublishError", "FileNotFoundError", "ValueError", "KeyError", "TypeError")


def _transient(task, task_run, state) -> bool:
    try:
        state.result()
    except Exception as exc:
        return not any(cls.__name__ in _PERMANENT for cls in type(exc).__mro__)
    return False


def _task_for(stage: Stage):
    # Network stages retry with back-off on transient errors; a local stage's error is deterministic.
    return stage_task.with_options(
        name=stage.name,
        retries=2 if stage.network else 0,
        retry_delay_seconds=[10, 60] if stage.network else 0,
        retry_condition_fn=_transient if stage.network else None,
        task_run_name=_task_run_name,
    )


def _task_run_name() -> str:
    from prefect.runtime import task_run

    params = task_run.parameters
    part = params.get("part") or {}
    label = ",".join(f"{k[:-1] if k.endswith('s') else k} {v}" for k, vals in part.items() for v in vals)
    return f"{params.get('stage', 'stage')}[{label}]" if label else str(params.get("stage", "stage"))


def run_stage(stage: str, manifest: str, workdir: str | None, overrides: dict | None,
              dask_address: str | None = None) -> dict | list:
    """Body of every stage flow: run the stage's task(s), publish its summary, return it."""
    from prefect.runtime import flow_run

    try:
        return _run_stage(stage, manifest, workdir, overrides, dask_address)
    except Exception as exc:
        # Run on its own (a deployment of one stage), this flow is the one users watch: the
        # traceback goes here. As a subflow, its parent logs it where `--watch` shows it.
        log_failure(get_run_logger(), stage, exc, traceback=flow_run.parent_flow_run_id is None)
        raise


def _run_stage(stage: str, manifest: str, workdir: str | None, overrides: dict | None,
               dask_address: str | None = None) -> dict | list:
    st = BY_NAME[stage]
    m, _ = open_run(manifest, workdir, overrides)
    t = _task_for(st)
    parts = parts_of(st, m)
    if parts is None:
        summary = t(stage, manifest, workdir, overrides, None, dask_address)
    else:
        futures = t.map(unmapped(stage), unmapped(manifest), unmapped(workdir), unmapped(overrides), parts)
        futures.wait()
        results, failed = [], []
        for part, fut in zip(parts, futures):
            state = fut.state
            if state.is_completed():
                results.append(fut.result())
            else:
                failed.append(f"{part}: {state.message or state.name}")
        if failed:
            # Parts that finished are in the catalog; a re-run redoes only the failed ones' work.
            raise RuntimeError(f"{stage} failed for {len(failed)} of {len(parts)} parts: " + "; ".join(failed))
        summary = combine(results)
    get_run_logger().info("%s: %s", stage, brief(summary))
    artifacts.stage_summary(m, stage, summary)
    return summary


@flow(name="ingest", log_prints=True)
def ingest_flow(manifest: str, workdir: str | None = None, overrides: dict | None = None,
                dask_address: str | None = None) -> dict:
    """Ingest the manifest's `folder` sources (mapped per source when there are several; one
    source's files validated in chunks on Dask with `dask_address`)."""
    return run_stage("ingest", manifest, workdir, overrides, dask_address)


@flow(name="scrape", log_prints=True)
def scrape_flow(manifest: str, workdir: str | None = None, overrides: dict | None = None) -> dict:
    """Fill each class up to its target from the manifest's web sources (resumable, retried)."""
    return run_stage("scrape", manifest, workdir, overrides)


@flow(name="dedup", log_prints=True)
def dedup_flow(manifest: str, workdir: str | None = None, overrides: dict | None = None,
               dask_address: str | None = None) -> dict:
    """Hash new images and mark near duplicates across all classes (hashing per catalog partition
    on Dask with `dask_address`: "local" or a scheduler address)."""
    return run_stage("dedup", manifest, workdir, overrides, dask_address)


@flow(name="score", log_prints=True)
def score_flow(manifest: str, workdir: str | None = None, overrides: dict | None = None,
               dask_address: str | None = None) -> dict:
    """CLIP relevance/realism scores and keep/reject decisions for every candidate (images encoded
    per catalog partition on Dask with `dask_address`, on its GPU workers when it has some)."""
    return run_stage("score", manifest, workdir, overrides, dask_address)


@flow(name="review-push", log_prints=True)
def review_push_flow(manifest: str, workdir: str | None = None, overrides: dict | None = None) -> dict:
    """Create or update the FiftyOne review dataset from the catalog."""
    return run_stage("review-push", manifest, workdir, overrides)


@flow(name="review-pull", log_prints=True)
def review_pull_flow(manifest: str, workdir: str | None = None, overrides: dict | None = None) -> dict:
    """Read reviewers' decisions (tags, label edits) back into the catalog."""
    return run_stage("review-pull", manifest, workdir, overrides)


@flow(name="review-status", log_prints=True)
def review_status_flow(manifest: str, workdir: str | None = None, overrides: dict | None = None) -> list:
    """Review progress per class, live from the review dataset."""
    return run_stage("review-status", manifest, workdir, overrides)


@flow(name="publish", log_prints=True)
def publish_flow(manifest: str, workdir: str | None = None, overrides: dict | None = None, push: bool = False,
                 repo_id: str | None = None, revision: str | None = None) -> dict:
    """Publish the catalog as the next dataset version (nothing if unchanged); emit
    `jurassiclass.dataset.published` for a new version; with `push`, upload it to the Hub
    (`repo_id`, else the manifest's publish.repo_id; token from the Prefect Secret block
    publish.token_secret, else $HF_TOKEN)."""
    from flows import hub
    from flows.locks import workspace_slot

    m, ws = open_run(manifest, workdir, overrides)
    with workspace_slot(m.name):
        summary = run_stage("publish", manifest, workdir, overrides)
        if summary.get("changed"):
            hub.emit_published(m, summary)
        if push and not summary.get("skipped"):
            summary["pushed"] = hub.push_task(manifest, workdir, overrides, repo_id, revision)
            get_run_logger().info("pushed %s to %s@%s", summary["pushed"]["tag"], summary["pushed"]["repo_id"],
                                  summary["pushed"]["revision"])
    return summary


FLOWS: dict[str, Callable] = {
    "ingest": ingest_flow, "scrape": scrape_flow, "dedup": dedup_flow, "score": score_flow,
    "review-push": review_push_flow, "review-pull": review_pull_flow, "review-status": review_status_flow,
    "publish": publish_flow,
}


def call_stage(stage: str, manifest: str, workdir: str | None, overrides: dict | None,
               dask_address: str | None = None) -> dict | list:
    """Run a stage's flow as a subflow of the caller: a stage mapped over parts runs its tasks on
    Dask, a partition-wise stage (dedup, score) gets the address, when one is given or in $DASK_ADDRESS."""
    fn = FLOWS[stage]
    dask_address = resolve_address(dask_address)
    mapped = dask_address and parts_of(BY_NAME[stage], open_run(manifest, workdir, overrides)[0]) is not None
    runner = task_runner_for(dask_address) if mapped else None
    if runner is not None:
        fn = fn.with_options(task_runner=runner)
    if dask_address and BY_NAME[stage].cluster:
        return fn(manifest=manifest, workdir=workdir, overrides=overrides, dask_address=dask_address)
    return fn(manifest=manifest, workdir=workdir, overrides=overrides)
