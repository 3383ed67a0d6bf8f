"""The `train` flow: a thin wrapper over `models.run` (prepare -> folds -> final fits -> finish).

Folds are independent tasks. Without `dask_address` they run one after another in this process
(two trainings sharing one machine's cores or GPU only slow each other down); with it they are
mapped over a Dask cluster, e.g. one GPU worker per fold (`dask-worker --nthreads 1 --resources GPU=1`).
Workers must see the workspace path. Deployments and schedules live in prefect.yaml.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from curation import report
from flows import artifacts
from flows.common import artifact_key, open_run, plain
from flows.runners import task_runner_for
from models import run as train_run


@task(cache_policy=NO_CACHE, task_run_name="fold[{job.model} {job.fold}]")
def fold_task(job: train_run.Job) -> dict:
    return train_run.run_fold(job)


@task(cache_policy=NO_CACHE, task_run_name="final[{job.model}]")
def final_task(job: train_run.Job) -> dict:
    return train_run.run_final(job)


def _map(t, jobs: list, mapped: bool) -> list[dict]:
    if not mapped:
        return [t(j) for j in jobs]
    futures = t.map(jobs)
    futures.wait()
    failed = [f"{j.model} {j.fold}: {f.state.message or f.state.name}" for j, f in zip(jobs, futures) if not f.state.is_completed()]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(jobs)} training jobs failed: " + "; ".join(failed))
    return [f.result() for f in futures]


def publish_artifacts(m, summary: train_run.TrainSummary) -> None:
    """Metrics table, the model cards and links to the confusion matrices (best-effort)."""
    rows = [{k: ("" if v is None else v) for k, v in r.items()} for r in train_run.table(summary).to_dicts()]
    artifacts._safe(create_table_artifact, rows, key=artifact_key(m.name, "train", "metrics"),
                    description=f"**train** `{summary.experiment}` on `{summary.dataset}`: CV and test metrics")
    md = [f"# train `{summary.experiment}`", "", summary.line(), "",
          report.markdown_table(train_run.table(summary)), ""]
    for ms in summary.models:
        base = summary.out_dir / ms.name
        for png in ("confusion_matrix.png", "per_class_accuracy.png", "curves.png"):
            p = base / "plots" / png
            if p.exists():
                artifacts._safe(create_link_artifact, p.as_uri(), link_text=f"{ms.name}/{png}",
                                key=artifact_key(m.name, "train", ms.name, png.split(".")[0]),
                                description=f"{ms.name}: {png}")
        md.append(f"- [{ms.name} model card]({(base / 'MODEL_CARD.md').as_uri()})")
    artifacts._safe(create_markdown_artifact, "\n".join(md), key=artifact_key(m.name, "train", "summary"),
                    description=f"train {summary.experiment}")


@flow(name="train", log_prints=True)
def train_flow(manifest: str, workdir: str | None = None, overrides: dict | None = None, dataset: str | None = None,
               experiment: str | None = None, models: list[str] | None = None, dask_address: str | None = None,
               register: bool = True, force: bool = False, push_model: bool = False) -> dict:
    """Cross-validate and train the manifest's models on a published dataset (default: the latest).

    register: record the run in the workspace's model registry (once per dataset version and
    retrain.kind; `force` trains again) and promote its best model unless it is worse than the
    current one on the same test split. push_model: push a newly promoted model to
    retrain.model_repo_id (token: the publish.token_secret Prefect Secret, else $HF_TOKEN).
    """
    from flows import hub, promotion
    from flows.locks import workspace_slot

    m, ws = open_run(manifest, workdir, overrides)
    log = get_run_logger()
    with workspace_slot(m.name):
        ref = train_run.resolve_dataset(ws, dataset)
        entry = promotion.claim(m, ws, ref, force=force) if register else None
        if register and entry is None:
            return {"skipped": f"dataset {ref} already trained for {m.retrain.kind!r}", "dataset": ref}
        try:
            if entry is not None and experiment is None:
                experiment = entry["id"]
            plan = train_run.prepare(m, ws, dataset=ref, experiment=experiment, models=models)
            # Mapped (concurrent) only on the Dask runner `call_train` installs; else one after another.
            mapped = bool(dask_address)
            _map(fold_task, plan.fold_jobs, mapped)
            _map(final_task, plan.final_jobs, mapped)
            summary = train_run.finish(m, ws, plan.experiment_dir)
        except BaseException as exc:
            if entry is not None:  # the promoted model is untouched; the registry says why this one is not there
                from models import registry

                registry.fail(ws, entry["id"], f"{type(exc).__name__}: {exc}")
            log.error("training failed: %s: %s", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            raise
        log.info("%s", summary.line())
        publish_artifacts(m, summary)
        out = plain(summary)
        if entry is not None:
            out["registry"] = promotion.complete_and_promote(m, ws, entry, out)
            if push_model and out["registry"]["promoted"]:
                from models import hub as model_hub

                out["registry"]["pushed"] = model_hub.push(m, ws, entry["id"], token=hub.hub_token(m))
    return out


def call_train(manifest: str, workdir: str | None = None, overrides: dict | None = None, dataset: str | None = None,
               experiment: str | None = None, models: list[str] | None = None, dask_address: str | None = None,
               register: bool = True, force: bool = False, push_model: bool = False) -> dict:
    """Run the train flow, its fold tasks mapped over Dask when ``dask_address`` is given."""
    fn = train_flow
    runner = task_runner_for(dask_address)
    if runner is not None:
        fn = fn.with_options(task_runner=runner)
    return fn(manifest=manifest, workdir=workdir, overrides=overrides, dataset=dataset, experiment=experiment,
              models=models, dask_address=dask_address, register=register, force=force, push_model=push_model)
