"""What every flow needs: a manifest path (+ overrides) in, the validated manifest and its workspace out.

Flows take plain, serialisable parameters (paths, dicts) so deployments, retries and Dask workers
can pass them around; the manifest is loaded where it is used.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from pathlib import Path
from typing import Any

from curation import catalog
from curation.catalog import Workspace
from curation.config import Manifest, load_manifest

REPO_ROOT = Path(__file__).resolve().parent.parent


def manifest_file(path: str | Path) -> Path:
    """A manifest path as given, else relative to the repository (deployments name `manifests/x.yaml`)."""
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
        p = REPO_ROOT / p
    return p.resolve()


def open_run(manifest: str | Path, workdir: str | None = None, overrides: dict | None = None) -> tuple[Manifest, Workspace]:
    """Load (with overrides), pick the workspace and save the resolved settings (like the CLI);
    without a workdir the default workspace lives in the repository, not the worker's cwd."""
    m = load_manifest(manifest_file(manifest), overrides)
    return m, catalog.start_run(m, workdir, default_root=REPO_ROOT / "workspaces")


def plain(obj: Any) -> Any:
    """A stage summary (dataclass, enum, path, nested) as JSON-friendly data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [plain(v) for v in obj]
    if hasattr(obj, "to_dicts") and hasattr(obj, "columns"):  # a polars frame: its rows
        return [plain(r) for r in obj.to_dicts()]
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def combine(parts: list[dict]) -> dict:
    """Merge summaries of the same stage run on parts (per class): numbers add up, dicts merge."""
    out: dict = {}
    for part in parts:
        for k, v in (part or {}).items():
            if isinstance(v, bool) or k not in out:
                out[k] = v if not isinstance(v, dict) else dict(v)
            elif isinstance(v, (int, float)) and isinstance(out[k], (int, float)):
                out[k] += v
            elif isinstance(v, dict) and isinstance(out[k], dict):
                out[k] = combine([out[k], v])
            elif isinstance(v, list) and isinstance(out[k], list):
                out[k] = out[k] + v
    return out


def brief(summary: Any, limit: int = 600) -> str:
    """One log line for a stage's plain summary: its scalars, its small mappings flattened (e.g. the
    pull's ``problems``), list sizes; a list of rows (review status) by its length."""
    if isinstance(summary, list):
        return f"{len(summary)} rows"
    if not isinstance(summary, dict):
        return str(summary)[:limit]
    parts = []
    for k, v in summary.items():
        if isinstance(v, dict):
            inner = ", ".join(f"{kk}={vv}" for kk, vv in v.items() if not isinstance(vv, (dict, list)))
            parts.append(f"{k}: {inner or 'none'}")
        elif isinstance(v, list):
            parts.append(f"{k}: {len(v)}")
        elif v is not None and v != "":
            parts.append(f"{k}={v}")
    text = "; ".join(parts) or "done"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def artifact_key(*parts: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    key = "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts if p)
    return key[:100] or "artifact"
