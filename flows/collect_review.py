"""collect-review: reviewers' decisions (FiftyOne) in, catalog statuses and a review report out."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows import artifacts
from flows.common import brief, open_run
from flows.failures import log_failure
from flows.locks import workspace_slot
from flows.stages import COLLECT, call_stage


@flow(name="collect-review")
def collect_review(manifest: str = "manifests/demo.yaml", workdir: str | None = None, overrides: dict | None = None) -> dict:
    """Pull review decisions into the catalog, then publish the review status as artifacts."""
    log = get_run_logger()
    m, ws = open_run(manifest, workdir, overrides)
    summaries: dict[str, dict] = {}
    with workspace_slot(m.name):
        try:
            for st in COLLECT:
                if st.applies(m):
                    try:
                        summaries[st.name] = call_stage(st.name, manifest, workdir, overrides)
                    except Exception as exc:
                        log_failure(log, st.name, exc, traceback=True)
                        raise
                    # e.g. the pull's problems (unclear tags), in the log users watch
                    log.info("%s: %s", st.name, brief(summaries[st.name]))
        finally:
            artifacts.catalog_report(m, ws, summaries, title="collect-review")
    log.info("outputs in %s", ws.root)
    return {"workspace": str(ws.root), "stages": summaries}
