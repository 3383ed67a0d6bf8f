"""A folder tree ROOT/<class>/**/<image> in, store files and catalog rows (source=folder) out.

Every file with an image extension gets a row: images in folders the manifest does not name,
and loose files directly under ROOT, are stored and recorded as rejected with a reason, never
skipped silently. Re-ingesting the same tree adds nothing. Given a Dask address, the files are
validated in chunks on that cluster and the rows committed here, as in-process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Container
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from curation import catalog, cluster
from curation.catalog import Status, Workspace
from curation.config import FolderSource, ImageSettings, Manifest
from curation.images import Normalised, normalise
from curation.progress import progress_map, track

# Files per Dask task: enough to amortise a task's overhead, few enough to spread over workers.
CHUNK_FILES = 256

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


def _source_folders(manifest: Manifest) -> dict[str, str]:
    folders: dict[str, str] = {}
    for c in manifest.classes:
        folders[c.folder_name] = c.name
        folders.setdefault(c.folder_name.lower(), c.name)
    return folders


def _list_files(root: Path, summary: IngestSummary) -> list[Path]:
    files: list[Path] = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            summary.not_image_extension += 1
            continue
        files.append(p)
    summary.seen += len(files)
    return files


def validate_file(
    ws: Workspace, p: Path, *, root: Path, folders: dict[str, str], settings: ImageSettings, src: FolderSource,
    known: Container[tuple[str, str]],
) -> dict | None:
    """One file's catalog row (its image stored when it is one), or None when this exact file is known."""
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
    return build_row(ws, raw, label=label, settings=settings, provenance=prov, reject_reason=reason, raw_sha=raw_sha)


def validate_chunk(
    ws_root: str, root: str, folders: dict[str, str], settings: ImageSettings, src: FolderSource,
    chunk: tuple[list[str], list[tuple[str, str]]],
) -> list[dict | None]:
    """`validate_file` for a chunk of (paths, the known (url, sha256) pairs of those paths), run on a
    Dask worker: it reads the files from the shared filesystem and stores images into the workspace's
    store itself (content-addressed, atomic renames: concurrent writers of the same bytes are safe),
    and returns only the rows, in the chunk's order."""
    paths, known = chunk
    ws, base, seen = Workspace(ws_root), Path(root), set(map(tuple, known))
    return [validate_file(ws, Path(p), root=base, folders=folders, settings=settings, src=src, known=seen)
            for p in paths]


def _chunks(files: list[Path], workers: int) -> list[list[Path]]:
    """At most `CHUNK_FILES` files per task, and at least two tasks per worker when there are files enough."""
    n = max(-(-len(files) // CHUNK_FILES), min(len(files), 2 * max(1, workers)))
    size = -(-len(files) // n) if n else 1
    return [files[i:i + size] for i in range(0, len(files), size)]


def _validate_on_cluster(
    client, ws: Workspace, files: list[Path], root: Path, folders: dict[str, str], settings: ImageSettings,
    src: FolderSource, known: set[tuple[str, str]], show: bool,
) -> list[dict | None]:
    by_url: dict[str, list[str]] = {}
    for url, sha in known:
        by_url.setdefault(url, []).append(sha)
    tasks = []
    for chunk in _chunks(files, cluster.worker_count(client)):
        urls = [p.resolve().as_uri() for p in chunk]
        tasks.append(([str(p) for p in chunk], [(u, s) for u in urls for s in by_url.get(u, ())]))
    done: dict[int, list[dict | None]] = {}
    results = cluster.map_chunks(client, validate_chunk, tasks, str(ws.root), str(root), folders, settings, src)
    for i, rows in track(results, total=len(tasks), description=f"ingest {root.name} (chunks on dask)", show=show):
        done[i] = rows
    # Back in file order: of two identical files the first one's row is kept, as in-process.
    return [row for i in range(len(tasks)) for row in done[i]]


def _ingest_source(
    manifest: Manifest, ws: Workspace, src: FolderSource, known: set[tuple[str, str]], summary: IngestSummary, show: bool,
    client=None,
) -> list[dict]:
    root = src.path
    if not root.is_dir():
        raise FileNotFoundError(f"folder source {root} does not exist or is not a directory")
    folders = _source_folders(manifest)
    files = _list_files(root, summary)
    if client is not None:
        results = _validate_on_cluster(client, ws, files, root, folders, manifest.images, src, known, show)
    else:
        def work(p: Path) -> dict | None:
            return validate_file(ws, p, root=root, folders=folders, settings=manifest.images, src=src, known=known)

        results = progress_map(work, files, description=f"ingest {root.name}", show=show)
    rows = []
    for row in results:
        if row is None:
            summary.already_known += 1
        else:
            rows.append(row)
    return rows


def run(manifest: Manifest, ws: Workspace, *, show_progress: bool = True, dask_address: str | None = None) -> IngestSummary:
    """Ingest every `folder` source of the manifest into the workspace.

    ``dask_address`` ("local" or a scheduler address): the per-file validation (read, decode, size
    checks, sha256, store) runs in chunks of files on that Dask cluster (curation/cluster.py);
    the rows come back and are committed here, once, as in-process."""
    ws.ensure()
    summary = IngestSummary()
    sources = manifest.sources_of(FolderSource)
    if not sources:
        return summary
    sightings = catalog.read_sightings(ws)
    known = set(zip(sightings["source_url"].to_list(), sightings["source_sha256"].to_list()))
    rows: list[dict] = []
    with cluster.connect(dask_address) if dask_address else nullcontext() as client:
        for src in sources:
            rows.extend(_ingest_source(manifest, ws, src, known, summary, show_progress, client))
    if not rows:
        return summary
    # One time for the run's rows: files are read on threads (or Dask workers) in no fixed order,
    # and dedup keeps the earliest retrieved of equal copies; a per-file clock would let thread
    # order choose between them (the tie falls to the image id instead).
    stamp = catalog.utcnow()
    new = catalog.rows_frame([{**r, "retrieved_at": stamp} for r in rows])
    with catalog.locked(ws):
        # Only the rows it adds are committed (an append), not the catalog rewritten.
        fresh = new.unique("image_id", keep="first", maintain_order=True)
        fresh = fresh.filter(~fresh["image_id"].is_in(catalog.ids(ws).implode()))
        summary.added = catalog.append(ws, fresh)
        # Sightings go after the catalog: a crash in between re-ingests (idempotently), never loses.
        catalog.record_sightings(ws, new)
    for r in rows:
        if r["status"] == Status.rejected.value:
            summary.rejected[r["reason"]] = summary.rejected.get(r["reason"], 0) + 1
    return summary
