"""build-dataset: manifest in; ingest -> scrape -> dedup -> score -> review push -> publish on its workspace; artifacts out."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows import artifacts
from flows.common import brief, open_run
from flows.failures import log_failure
from flows.locks import workspace_slot
from flows.stages import BUILD, call_stage


@flow(name="build-dataset")
def build_dataset(
    manifest: str = "manifests/demo.yaml",
    workdir: str | None = None,
    overrides: dict | None = None,
    dask_address: str | None = None,
    skip: list[str] | None = None,
) -> dict:
    """Run every applicable stage of `flows.stages.BUILD` in order on one manifest.

    manifest: path (relative to the repository root or absolute). workdir: workspace override.
    overrides: deep-merged into the manifest (e.g. {"scrape": {"target_per_class": 50}}).
    dask_address: None (threads), "local" (a LocalCluster) or a scheduler address, for mapped stages.
    skip: stage names to leave out of this run. Returns the workspace path and each stage's summary.
    """
    log = get_run_logger()
    known = {s.name for s in BUILD}
    unknown = set(skip or ()) - known
    if unknown:
        raise ValueError(f"skip: unknown stage(s) {sorted(unknown)}; stages are {[s.name for s in BUILD]}")
    m, ws = open_run(manifest, workdir, overrides)
    steps = [s.name for s in BUILD if s.applies(m) and s.name not in set(skip or ())]
    log.info("build-dataset %s: stages %s, workspace %s", m.name, steps, ws.root)
    bar = artifacts.StepProgress("build-dataset", steps)
    summaries: dict[str, dict] = {}
    title = "build-dataset"
    with workspace_slot(m.name):
        try:
            for i, name in enumerate(steps, 1):
                title = f"build-dataset (failed in {name})"
                try:
                    summaries[name] = call_stage(name, manifest, workdir, overrides, dask_address)
                except Exception as exc:
                    # `--watch` shows this flow's log, not the subflow's: the cause line, then the traceback.
                    log_failure(log, name, exc, traceback=True)
                    raise
                log.info("%s: %s", name, brief(summaries[name]))  # the subflow's result, in the log users watch
                bar.done(i, name)
            title = "build-dataset"
        finally:
            # Published on failure too: the catalog shows what the finished stages produced.
            artifacts.catalog_report(m, ws, summaries, title=title)
    log.info("outputs in %s", ws.root)
    return {"workspace": str(ws.root), "stages": summaries}
