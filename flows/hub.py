"""What publishing adds to the orchestration layer: the Hub token from a Prefect Secret, a retried
push task, and the `jurassiclass.dataset.published` event that retraining triggers on."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from curation.config import Manifest
from flows.common import open_run

PUBLISHED_EVENT = "jurassiclass.dataset.published"


def dataset_resource(name: str) -> str:
    return f"jurassiclass.dataset.{name}"


def hub_token(m: Manifest) -> str | None:
    """The token in the Prefect Secret block named by publish.token_secret, if there is one
    (else None: huggingface_hub then reads $HF_TOKEN). Never logged."""
    try:
        from prefect.blocks.system import Secret

        return Secret.load(m.publish.token_secret).get()
    except Exception:  # no such block (ValueError) or no server: fall back to the environment
        return None


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[10, 60])
def push_task(manifest: str, workdir: str | None, overrides: dict | None, repo_id: str | None,
              revision: str | None) -> dict:
    """Upload the latest published version (a re-run finishes a half-done push)."""
    from curation import publish

    m, ws = open_run(manifest, workdir, overrides)
    result = publish.push(m, ws, repo_id=repo_id, revision=revision, token=hub_token(m))
    return {k: v for k, v in result.items() if k != "file_list"}


def emit_published(m: Manifest, summary: dict) -> None:
    """One event per new dataset version: the retrain deployment's trigger matches on it."""
    event = emit_event(
        event=PUBLISHED_EVENT,
        resource={
            "prefect.resource.id": dataset_resource(m.name),
            "prefect.resource.name": m.name,
            "jurassiclass.version": str(summary["version"]),
        },
        payload={
            "dataset": m.name, "version": summary["version"], "hash": summary["hash"], "folder": summary["folder"],
            "images": summary["images"], "per_split": summary["per_split"], "diff": summary.get("diff", {}),
        },
    )
    get_run_logger().info("emitted %s for %s v%s (%s)", PUBLISHED_EVENT, m.name, summary["version"],
                          getattr(event, "id", "not sent"))
