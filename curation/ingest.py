"""A folder tree ROOT/<class>/**/<image> in, store files and catalog rows (source=folder) out.

Every file with an image extension gets a row: images in folders the manifest does not name,
and loose files directly under ROOT, are stored and recorded as rejected with a reason, never
skipped silently. Re-ingesting the same tree adds nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path


from curation import catalog
from curation.catalog import Status, Workspace
from curation.config import FolderSource, ImageSettings, Manifest
from curation.images import Normalised, normalise
from curation.progress import progress_map

IMAGE_EXTENSIONS = {
    ".jpg", ".jpeg", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".svg", ".heic", ".avif",
}


@dataclass
class IngestSummary:
    seen: int = 0
    added: int = 0
    already_known: int = 0
    not_image_extension: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


def _label_for(rel: Path, folders: dict[str, str]) -> tuple[str | None, str | None]:
    """(label, rejection reason) for a path relative to the root."""
    if len(rel.parts) < 2:
        return None, "no_class_folder"
    top = rel.parts[0]
    label = folders.get(top) or folders.get(top.lower())
    if label is None:
        return top, "class_not_in_manifest"
    return label, None


def build_row(
    ws: Workspace,
    raw: bytes,
    *,
    label: str | None,
    settings: ImageSettings,
    provenance: dict,
    reject_reason: str | None = None,
    raw_sha: str | None = None,
) -> dict:
    """Normalise raw bytes, store them if they are an image, and return the catalog row.

    Shared by every source: the row carries provenance, and a rejection is a status and a
    reason, never an exception.
    """
    raw_sha = raw_sha or hashlib.sha256(raw).hexdigest()
    result = normalise(raw, min_side=settings.min_side, max_pixels=settings.max_pixels)
    row = {
        "label": label,
        "source_sha256": raw_sha,
        "retrieved_at": catalog.utcnow(),
        **provenance,
    }
    if isinstance(result, Normalised):
        image_id, path = ws.store.put(result.data, result.ext)
        row.update(
            image_id=image_id,
            path=ws.relpath(path),
            width=result.width,
            height=result.height,
            format=result.format,
            note=result.note or None,
        )
        if reject_reason:
            row.update(status=Status.rejected.value, reason=reject_reason)
        else:
            row.update(status=Status.candidate.value, reason=None)
    else:
        # Not storable: the row keeps the raw bytes' hash as its id so it is still unique and stable.
        row.update(
            image_id=raw_sha,
            path=None,
            status=Status.rejected.value,
            reason=result.reason,
            note=result.detail or None,
        )
    return row


def _ingest_source(
    manifest: Manifest, ws: Workspace, src: FolderSource, known: set[tuple[str, str]], summary: IngestSummary, show: bool
) -> list[dict]:
    root = src.path
    if not root.is_dir():
        raise FileNotFoundError(f"folder source {root} does not exist or is not a directory")
    folders: dict[str, str] = {}
    for c in manifest.classes:
        folders[c.folder_name] = c.name
        folders.setdefault(c.folder_name.lower(), c.name)

    files: list[Path] = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            summary.not_image_extension += 1
            continue
        files.append(p)
    summary.seen += len(files)

    def work(p: Path) -> dict | None:
        try:
            raw = p.read_bytes()
        except OSError as exc:
            raw_id = hashlib.sha256(str(p).encode()).hexdigest()
            return {
                "image_id": raw_id, "label": None, "path": None, "status": Status.rejected.value,
                "reason": "unreadable", "note": str(exc), "source": "folder", "source_url": p.as_uri(),
                "retrieved_at": catalog.utcnow(),
            }
        url = p.resolve().as_uri()
        raw_sha = hashlib.sha256(raw).hexdigest()
        if (url, raw_sha) in known:
            return None
        label, reason = _label_for(p.relative_to(root), folders)
        prov = {"source": "folder", "query": None, "source_url": url, "page_url": None,
                "license": src.license, "author": src.author}
        return build_row(
            ws, raw, label=label, settings=manifest.images, provenance=prov, reject_reason=reason, raw_sha=raw_sha
        )

    rows = []
    for row in progress_map(work, files, description=f"ingest {root.name}", show=show):
        if row is None:
            summary.already_known += 1
        else:
            rows.append(row)
    return rows


def run(manifest: Manifest, ws: Workspace, *, show_progress: bool = True) -> IngestSummary:
    """Ingest every `folder` source of the manifest into the workspace."""
    ws.ensure()
    summary = IngestSummary()
    sightings = catalog.read_sightings(ws)
    known = set(zip(sightings["source_url"].to_list(), sightings["source_sha256"].to_list()))
    rows: list[dict] = []
    for src in manifest.sources_of(FolderSource):
        rows.extend(_ingest_source(manifest, ws, src, known, summary, show_progress))
    if not rows:
        return summary
    new = catalog.rows_frame(rows)
    with catalog.locked(ws):
        # Only the rows it adds are committed (an append), not the catalog rewritten.
        fresh = new.unique("image_id", keep="first", maintain_order=True)
        fresh = fresh.filter(~fresh["image_id"].is_in(catalog.read(ws)["image_id"]))
        summary.added = catalog.append(ws, fresh)
        # Sightings go after the catalog: a crash in between re-ingests (idempotently), never loses.
        catalog.record_sightings(ws, new)
    for r in rows:
        if r["status"] == Status.rejected.value:
            summary.rejected[r["reason"]] = summary.rejected.get(r["reason"], 0) + 1
    return summary
