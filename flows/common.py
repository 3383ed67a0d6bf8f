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

import yaml

from curation import catalog
from curation.catalog import Workspace
from curation.config import Manifest, ManifestError, dump_manifest, parse_manifest

REPO_ROOT = Path(__file__).resolve().parent.parent


def manifest_file(path: str | Path) -> Path:
    """A manifest path as given, else relative to the repository (deployments name `manifests/x.yaml`)."""
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
        p = REPO_ROOT / p
    return p.resolve()


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> Manifest:
    """Read a manifest and deep-merge ``overrides`` (e.g. ``{"scrape": {"target_per_class": 50}}``) before validation."""
    p = manifest_file(path)
    if not p.is_file():
        raise ManifestError(f"{path}: manifest file not found (looked at {p})")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ManifestError(f"{p}: not valid YAML: {exc}") from None
    if overrides:
        if not isinstance(data, dict):
            raise ManifestError(f"{p}: expected a mapping at the top level")
        data = _merge(data, overrides)
    origin = f"{p} (with overrides {overrides})" if overrides else str(p)
    return parse_manifest(data, origin=origin, base_dir=p.parent)


def workspace_for(m: Manifest, workdir: str | Path | None) -> Workspace:
    """The run's workspace: ``workdir`` if given, else the manifest's, else workspaces/<name> in the repo."""
    if workdir:
        return Workspace(Path(workdir).expanduser()).ensure()
    if m.workdir is not None:
        return Workspace(m.workdir).ensure()
    return Workspace(REPO_ROOT / "workspaces" / m.name).ensure()


def open_run(manifest: str | Path, workdir: str | None = None, overrides: dict | None = None) -> tuple[Manifest, Workspace]:
    """Load, pick the workspace and save the resolved settings beside the outputs (like the CLI)."""
    m = load(manifest, overrides)
    ws = workspace_for(m, workdir)
    catalog.save_resolved_manifest(ws, dump_manifest(m))
    return m, ws


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


def artifact_key(*parts: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    key = "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts if p)
    return key[:100] or "artifact"
