"""The workspace's model registry: every training run with its dataset version, config, metrics and
model folder; which model is promoted; and the rule that promotes.

    WORKDIR/models/registry.json   {"entries": [...], "promoted": ID | null, "events": [...]}

An entry is claimed (``status: training``) before training starts and completed (``trained``) or
failed after, so a dataset version is trained once per experiment kind even when a schedule and a
trigger both ask, and a killed run is seen as such (its pid is gone) and claimed again. The
promoted pointer moves only through ``promote``: a failed or interrupted training never touches it.

Promotion compares like with like: the new model and the current promoted one are both evaluated
on the *new* dataset version's test split (publish keeps test images in test across versions), and
the new one is promoted unless it is worse by more than ``retrain.tolerance`` on
``retrain.metric``. Every decision, with both scores, is kept in ``events``.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np

from curation.catalog import Workspace
from curation.errors import JurassiclassError
from curation.store import atomic_write_bytes


class RegistryError(JurassiclassError, RuntimeError):
    """A registry request that cannot be done (unknown id, a model not trained)."""


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _path(ws: Workspace) -> Path:
    return ws.root / "models" / "registry.json"


def read(ws: Workspace) -> dict:
    p = _path(ws)
    if not p.exists():
        return {"entries": [], "promoted": None, "events": []}
    return json.loads(p.read_text(encoding="utf-8"))


def _write(ws: Workspace, reg: dict) -> None:
    atomic_write_bytes(_path(ws), (json.dumps(reg, indent=2, default=str) + "\n").encode())


@contextmanager
def _locked(ws: Workspace) -> Iterator[dict]:
    """Read-modify-write the registry under an exclusive file lock; written only if the body succeeds."""
    _path(ws).parent.mkdir(parents=True, exist_ok=True)
    with open(_path(ws).with_name(".registry.lock"), "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            reg = read(ws)
            yield reg
            _write(ws, reg)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _alive(entry: dict) -> bool:
    if entry.get("host") != socket.gethostname():
        return True  # another machine's run: trust its status
    try:
        os.kill(int(entry["pid"]), 0)
    except (ProcessLookupError, ValueError, KeyError, TypeError):
        return False
    except PermissionError:
        return True
    return True


def get(reg: dict, entry_id: str) -> dict:
    for e in reg["entries"]:
        if e["id"] == entry_id:
            return e
    raise RegistryError(f"no model {entry_id!r} in the registry (have: {', '.join(e['id'] for e in reg['entries']) or 'none'})")


def promoted(ws: Workspace) -> dict | None:
    reg = read(ws)
    return get(reg, reg["promoted"]) if reg["promoted"] else None


def claim(ws: Workspace, *, kind: str, dataset_version: int | None, dataset_hash: str | None, dataset_ref: str,
          force: bool = False) -> dict | None:
    """Register a training run about to start, or None when this dataset (by content hash) is
    already trained, or being trained by a live process, for this ``kind`` (the experiment's
    base name). An entry whose process died is marked ``failed: interrupted`` and claimed anew."""
    with _locked(ws) as reg:
        for e in reg["entries"]:
            if e["kind"] != kind or e["dataset_hash"] != dataset_hash or dataset_hash is None:
                continue
            if e["status"] == "training" and not _alive(e):
                e.update(status="failed", error="interrupted (its process is gone)", finished_at=_now())
            elif e["status"] in ("trained", "training") and not force:
                return None
        n = sum(1 for e in reg["entries"] if e["kind"] == kind) + 1
        entry = {
            "id": f"{kind}-{n:03d}", "kind": kind, "status": "training", "dataset_version": dataset_version,
            "dataset_hash": dataset_hash, "dataset_ref": dataset_ref, "created_at": _now(), "finished_at": None,
            "pid": os.getpid(), "host": socket.gethostname(), "experiment_dir": None, "model_dir": None,
            "metrics": {}, "error": None,
        }
        reg["entries"].append(entry)
        return dict(entry)


def complete(ws: Workspace, entry_id: str, *, experiment_dir: str | Path, model_dir: str | Path, metrics: dict) -> dict:
    with _locked(ws) as reg:
        e = get(reg, entry_id)
        e.update(status="trained", experiment_dir=str(experiment_dir), model_dir=str(model_dir), metrics=metrics,
                 finished_at=_now())
        return dict(e)


def fail(ws: Workspace, entry_id: str, error: str) -> None:
    with _locked(ws) as reg:
        e = get(reg, entry_id)
        e.update(status="failed", error=error[:500], finished_at=_now())


# ---------------------------------------------------------------- evaluation and promotion


def evaluate(model_dir: str | Path, dataset_ref: str, *, split: str = "test", batch_size: int = 64,
             pub=None) -> dict:
    """A model folder's metrics on one split of a published dataset (the same code for every model);
    ``pub``: the dataset already loaded from ``dataset_ref``."""
    import torch

    from models import export, metrics
    from models.data import decode, load_published

    pub = pub if pub is not None else load_published(dataset_ref)
    pred = export.load(Path(model_dir))
    if pred.class_names != pub.class_names:
        raise RegistryError(f"model classes {pred.class_names} differ from the dataset's {pub.class_names}")
    table = pub.test if split == "test" else pub.pool
    tf = pred.transform()
    probs = []
    for start in range(0, len(table), batch_size):
        rows = table[start:start + batch_size]["image"]
        probs.append(pred.probs(torch.stack([tf(decode(r["bytes"])) for r in rows])))
    y = np.asarray(table["label"], dtype=np.int64)
    p = np.concatenate(probs) if probs else np.zeros((0, len(pub.class_names)))
    return metrics.summary(y, p, pub.class_names)


@dataclass
class Decision:
    promoted: bool
    reason: str
    metric: str
    new: float | None
    current: float | None
    current_id: str | None


def decide(new: float, current: float | None, tolerance: float) -> tuple[bool, str]:
    """Promote unless the new score is below the current one by more than ``tolerance``."""
    if current is None:
        return True, "no model promoted yet"
    if new >= current - tolerance:
        return True, f"{new:.4f} is within {tolerance:g} of or above the current {current:.4f}"
    return False, f"{new:.4f} is worse than the current {current:.4f} by more than {tolerance:g}"


def promote_if_better(ws: Workspace, entry_id: str, *, metric: str, tolerance: float) -> Decision:
    """Evaluate the new model and the promoted one on the new model's dataset test split; promote or
    keep, recording the decision either way."""
    reg = read(ws)
    new = get(reg, entry_id)
    if new["status"] != "trained":
        raise RegistryError(f"{entry_id} is {new['status']}, not trained")
    cur = get(reg, reg["promoted"]) if reg["promoted"] else None
    from models.data import load_published

    pub = load_published(new["dataset_ref"])  # once, for both models
    new_m = evaluate(new["model_dir"], new["dataset_ref"], pub=pub)
    cur_m = evaluate(cur["model_dir"], new["dataset_ref"], pub=pub) if cur and Path(cur["model_dir"]).exists() else None
    ok, why = decide(new_m[metric], cur_m[metric] if cur_m else None, tolerance)
    with _locked(ws) as reg:
        e = get(reg, entry_id)
        e["evaluation"] = {"dataset_ref": new["dataset_ref"], metric: new_m[metric], "metrics": new_m}
        if ok:
            reg["promoted"] = entry_id
        reg["events"].append({
            "at": _now(), "entry": entry_id, "promoted": ok, "reason": why, "metric": metric, "new": new_m[metric],
            "current": cur_m[metric] if cur_m else None, "current_id": cur["id"] if cur else None,
            "dataset_version": new["dataset_version"],
        })
    return Decision(ok, why, metric, new_m[metric], cur_m[metric] if cur_m else None, cur["id"] if cur else None)


def promote(ws: Workspace, entry_id: str, *, reason: str = "promoted by hand") -> dict:
    """Make ``entry_id`` the promoted model (a person's decision, recorded as such)."""
    with _locked(ws) as reg:
        e = get(reg, entry_id)
        if e["status"] != "trained":
            raise RegistryError(f"{entry_id} is {e['status']}: only a trained model can be promoted")
        reg["events"].append({"at": _now(), "entry": entry_id, "promoted": True, "reason": reason,
                              "current_id": reg["promoted"], "dataset_version": e["dataset_version"]})
        reg["promoted"] = entry_id
        return dict(e)


def history_plot(ws: Workspace, metric: str, path: Path) -> Path | None:
    """The metric of every trained model across dataset versions, promoted ones marked."""
    reg = read(ws)
    pts = [(e["dataset_version"] or 0, (e.get("evaluation") or {}).get(metric, e["metrics"].get(metric)), e["id"])
           for e in reg["entries"] if e["status"] == "trained"]
    pts = [p for p in pts if p[1] is not None]
    if not pts:
        return None
    from curation.report import pyplot

    plt = pyplot()

    ever = {ev["entry"] for ev in reg["events"] if ev.get("promoted")}
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:blue", label="trained")
    prom = [p for p in pts if p[2] in ever]
    if prom:
        ax.plot([p[0] for p in prom], [p[1] for p in prom], "*", markersize=14, color="tab:orange", label="promoted")
    ax.set_xlabel("dataset version")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"test {metric} across dataset versions")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
