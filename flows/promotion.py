"""The registry around a training run (claim -> train -> complete -> promote or keep) and its
artifacts (the registry table, a markdown comparison with the current model, the metric across
versions). Plain logic lives in `models.registry`; the Hub push of a promoted model in `models.hub`."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from curation.catalog import Workspace
from curation.config import Manifest
from flows import artifacts
from flows.common import artifact_key
from models import registry


def dataset_identity(ref: str) -> tuple[int | None, str | None]:
    """(version, content hash) of a published dataset folder or Hub reference."""
    meta = Path(ref) / "publish.json"
    if meta.is_file():
        d = json.loads(meta.read_text())
        return d.get("version"), d.get("hash")
    return None, ref  # a Hub ref: its revision names the content


def claim(m: Manifest, ws: Workspace, dataset_ref: str, *, force: bool = False) -> dict | None:
    version, digest = dataset_identity(dataset_ref)
    entry = registry.claim(ws, kind=m.retrain.kind, dataset_version=version, dataset_hash=digest,
                           dataset_ref=dataset_ref, force=force)
    log = get_run_logger()
    if entry is None:
        log.info("dataset v%s (%s) is already trained or in training for %r: nothing to do (force=true retrains)",
                 version, (digest or "")[:12], m.retrain.kind)
    else:
        log.info("registry: %s claimed for dataset v%s", entry["id"], version)
    return entry


def complete_and_promote(m: Manifest, ws: Workspace, entry: dict, summary: dict) -> dict:
    """Record the trained model, then promote it if it is not worse than the current one."""
    from models import export

    best = summary.get("best_model")
    exp_dir = Path(summary["out_dir"])
    model_dir = export.resolve(exp_dir / best if best else exp_dir)
    best_ms = next((x for x in summary.get("models", []) if x.get("name") == best), {})
    registry.complete(ws, entry["id"], experiment_dir=exp_dir, model_dir=model_dir,
                      metrics={"test": best_ms.get("test", {}), "cv_top1_mean": best_ms.get("cv_top1_mean"),
                               "cv_top1_std": best_ms.get("cv_top1_std"), "model": best})
    d = registry.promote_if_better(ws, entry["id"], metric=m.retrain.metric.value, tolerance=m.retrain.tolerance)
    get_run_logger().info("%s %s: %s", entry["id"], "PROMOTED" if d.promoted else "kept, not promoted", d.reason)
    publish_comparison(m, ws, entry["id"], d)
    return {"entry": entry["id"], "promoted": d.promoted, "reason": d.reason, "metric": d.metric, "new": d.new,
            "current": d.current, "current_id": d.current_id}


def publish_comparison(m: Manifest, ws: Workspace, entry_id: str, d: registry.Decision) -> None:
    reg = registry.read(ws)
    cur = f"`{d.current_id}`: {d.current:.4f}" if d.current is not None else "none"
    md = [f"# {entry_id}: {'promoted' if d.promoted else 'not promoted'}", "",
          f"Test {d.metric} on the new dataset's test split: new **{d.new:.4f}**, current {cur}; "
          f"tolerance {m.retrain.tolerance:g}. {d.reason}.", "",
          "| model | dataset version | status | test " + d.metric + " | promoted |", "| --- | --- | --- | --- | --- |"]
    for e in reg["entries"]:
        score = (e.get("evaluation") or {}).get(d.metric)
        md.append(f"| {e['id']} | v{e['dataset_version']} | {e['status']} | "
                  f"{'' if score is None else f'{score:.4f}'} | {'yes' if reg['promoted'] == e['id'] else ''} |")
    artifacts._safe(create_markdown_artifact, "\n".join(md), key=artifact_key(m.name, "model", "comparison"),
                    description=f"{entry_id} vs the promoted model")
    artifacts._safe(create_table_artifact, [{"id": e["id"], "dataset_version": e["dataset_version"], "status": e["status"],
                                             d.metric: (e.get("evaluation") or {}).get(d.metric, ""),
                                             "promoted": reg["promoted"] == e["id"]} for e in reg["entries"]],
                    key=artifact_key(m.name, "model", "registry"), description="the model registry")
    png = registry.history_plot(ws, d.metric, ws.root / "models" / f"{d.metric}_by_version.png")
    if png:
        artifacts._safe(create_link_artifact, png.as_uri(), link_text=png.name, key=artifact_key(m.name, "model", "history"),
                        description=f"test {d.metric} across dataset versions")
