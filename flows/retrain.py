"""retrain: the loop closed in one run. [re-scrape and curate] -> [pull review decisions] -> publish
-> train the new dataset version -> promote the model only if it is not worse than the current one.

Each step stops the run when it fails, so a failed scrape never trains on half a dataset and a
failed training leaves the promoted model as it was. An unchanged dataset is not trained again
(the registry knows which dataset versions each retrain kind has trained). The whole run holds
the dataset's workspace slot, so a triggered `train` run for the version this run publishes
waits, then finds it trained and does nothing.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.common import brief, open_run
from flows.failures import log_failure
from flows.locks import workspace_slot


@flow(name="retrain")
def retrain(
    manifest: str = "manifests/demo.yaml",
    workdir: str | None = None,
    overrides: dict | None = None,
    rescrape: bool = False,
    collect_review: bool | None = None,
    force: bool = False,
    push_model: bool = False,
    dask_address: str | None = None,
) -> dict:
    """rescrape: run build-dataset first (scrape, dedup, score, review push, publish).
    collect_review: pull reviewers' decisions first (default: the manifest's retrain.collect_review).
    force: train even if this dataset version was trained already. push_model: push a newly
    promoted model to retrain.model_repo_id. dask_address: where the training folds run."""
    from flows.build_dataset import build_dataset
    from flows.collect_review import collect_review as collect
    from flows.stages import publish_flow
    from flows.train import call_train

    log = get_run_logger()
    m, ws = open_run(manifest, workdir, overrides)
    out: dict = {"workspace": str(ws.root)}

    def step(name: str, fn, **kwargs):
        # Subflows log into their own runs; `--watch retrain` shows this run's log, so their
        # results and failures are repeated here: the cause line first, the traceback once.
        try:
            result = fn(**kwargs)
        except Exception as exc:
            log_failure(log, name, exc, traceback=True)
            raise
        for stage, summary in (result.get("stages") or {"": result}).items() if isinstance(result, dict) else ():
            log.info("%s: %s", stage or name, brief(summary))
        return result

    with workspace_slot(m.name):
        if rescrape:
            out["build"] = step("build-dataset", build_dataset, manifest=manifest, workdir=workdir, overrides=overrides,
                                dask_address=dask_address)
        if m.retrain.collect_review if collect_review is None else collect_review:
            out["review"] = step("collect-review", collect, manifest=manifest, workdir=workdir, overrides=overrides)
        pub = step("publish", publish_flow, manifest=manifest, workdir=workdir, overrides=overrides)
        out["publish"] = {k: pub.get(k) for k in ("version", "changed", "images", "per_split", "diff", "skipped")}
        if pub.get("skipped") and not pub.get("folder"):
            log.info("nothing published yet (%s): nothing to train", pub["skipped"])
            return out
        out["train"] = step("train", call_train, manifest=manifest, workdir=workdir, overrides=overrides,
                            dataset=pub["folder"], force=force, push_model=push_model, dask_address=dask_address)
    return out
