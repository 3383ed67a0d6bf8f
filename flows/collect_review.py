"""collect-review: reviewers' decisions (FiftyOne) in, catalog statuses and a review report out."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows import artifacts
from flows.common import open_run
from flows.locks import workspace_slot
from flows.stages import COLLECT, call_stage


@flow(name="collect-review")
def collect_review(manifest: str = "manifests/demo.yaml", workdir: str | None = None, overrides: dict | None = None) -> dict:
    """Pull review decisions into the catalog, then publish the review status as artifacts."""
    m, ws = open_run(manifest, workdir, overrides)
    summaries: dict[str, dict] = {}
    with workspace_slot(m.name):
        try:
            for st in COLLECT:
                if st.applies(m):
                    summaries[st.name] = call_stage(st.name, manifest, workdir, overrides)
        finally:
            artifacts.catalog_report(m, ws, summaries, title="collect-review")
    get_run_logger().info("outputs in %s", ws.root)
    return {"workspace": str(ws.root), "stages": summaries}
