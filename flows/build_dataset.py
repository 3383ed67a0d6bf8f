"""build-dataset: manifest in; ingest -> scrape -> dedup -> score -> review push -> publish on its workspace; artifacts out."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows import artifacts, stages
from flows.common import brief, open_run
from flows.failures import log_failure
from flows.locks import workspace_slot
from flows.stages import BUILD, call_stage


# Stages that bring images in and take them out; while classes are short of their targets they run
# again (`curation.targets`), before review and publish see the result.
GROW = ("ingest", "scrape", "dedup", "score")


@flow(name="build-dataset")
def build_dataset(
    manifest: str = "manifests/demo.yaml",
    workdir: str | None = None,
    overrides: dict | None = None,
    dask_address: str | None = None,
    skip: list[str] | None = None,
    rounds: int = 3,
) -> dict:
    """Run every applicable stage of `flows.stages.BUILD` in order on one manifest, topping classes up
    to their targets as `jurassiclass run` does.

    manifest: path (relative to the repository root or absolute). workdir: workspace override.
    overrides: deep-merged into the manifest (e.g. {"scrape": {"target_per_class": 50}}).
    dask_address: None (threads), "local" (a LocalCluster) or a scheduler address, for mapped stages.
    skip: stage names to leave out of this run. rounds: at most this many scrape -> dedup -> score
    rounds while classes are short of their targets (dedup and CLIP remove images scrape counted).
    Returns the workspace path, each stage's summary (later rounds as "scrape (round 2)", ...) and
    the classes against their targets.
    """
    log = get_run_logger()
    known = {s.name for s in BUILD}
    unknown = set(skip or ()) - known
    if unknown:
        raise ValueError(f"skip: unknown stage(s) {sorted(unknown)}; stages are {[s.name for s in BUILD]}")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, not {rounds}")
    m, ws = open_run(manifest, workdir, overrides)
    steps = [s.name for s in BUILD if s.applies(m) and s.name not in set(skip or ())]
    log.info("build-dataset %s: stages %s, workspace %s", m.name, steps, ws.root)
    bar = artifacts.StepProgress("build-dataset", steps)
    summaries: dict[str, dict | list] = {}
    failed_in = ""

    def stage(name: str, key: str | None = None) -> dict | list:
        nonlocal failed_in
        key = key or name
        outer, failed_in = failed_in, key
        try:
            summaries[key] = call_stage(name, manifest, workdir, overrides, dask_address)
        except Exception as exc:
            # `--watch` shows this flow's log, not the subflow's: the cause line, then the traceback.
            log_failure(log, key, exc, traceback=True)
            raise
        log.info("%s: %s", key, brief(summaries[key]))  # the subflow's result, in the log users watch
        failed_in = outer
        return summaries[key]

    result: dict = {"workspace": str(ws.root), "stages": summaries}
    with workspace_slot(m.name):
        try:
            last_grow = [n for n in steps if n in GROW][-1:]
            for i, name in enumerate(steps, 1):
                stage(name)
                bar.done(i, name)
                if [name] == last_grow:
                    failed_in = "targets"
                    result["targets"] = _top_up(m, ws, steps, rounds, summaries, stage, log)
                    failed_in = ""
        finally:
            # Published on failure too: the catalog shows what the finished stages produced.
            title = f"build-dataset (failed in {failed_in})" if failed_in else "build-dataset"
            artifacts.catalog_report(m, ws, summaries, title=title)
    log.info("outputs in %s", ws.root)
    return result


def _top_up(m, ws, steps: list[str], rounds: int, summaries: dict, stage, log) -> list[dict]:
    """Rounds 2.. of scrape -> dedup -> score while classes are short, then the classes against
    their targets (logged, a table artifact, returned)."""
    from curation import targets

    if "scrape" in summaries:
        def scrape(r: int) -> list[str]:
            return targets.exhausted_of(stage("scrape", f"scrape (round {r})"))

        def after(r: int) -> None:
            for name in ("dedup", "score"):
                if name in steps:
                    stage(name, f"{name} (round {r})")

        why = targets.top_up(m, ws, rounds, targets.exhausted_of(summaries["scrape"]), scrape, after)
        default_why = f"stopped after {rounds} round(s)"
    elif not stages.SCRAPE.applies(m):  # folder trees are ingested whole: nothing more to fetch
        why, default_why = {}, targets.EXHAUSTED
    else:
        why, default_why = {}, "scrape not run"
    table, line = targets.report(m, ws, why, default_why)
    log.info("%s", line)
    artifacts.targets(m, table, line)
    return table.to_dicts()
