"""The catalog: one parquet row per image (keyed by sha256), written atomically, rows never deleted.

A workspace directory holds everything a run produces:

    WORKDIR/catalog.parquet       one row per image, the single source of truth
    WORKDIR/store/ab/abcd....jpg  content-addressed images
    WORKDIR/sightings/*.parquet   every time an image was found (source, label, url), append-only
    WORKDIR/stages/<stage>/       per-stage outputs (reports, plots, caches)
    WORKDIR/manifest.resolved.yaml  the exact settings of the last run
"""

from __future__ import annotations

import fcntl
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping

import polars as pl

from curation.store import ImageStore, PartsTable, atomic_write_bytes

if TYPE_CHECKING:
    from curation.config import Manifest


class Status(str, Enum):
    candidate = "candidate"
    rejected = "rejected"
    accepted = "accepted"


# Columns every stage and check may rely on. Stages add their own (phash, clip_score, ...).
SCHEMA: dict[str, pl.DataType] = {
    "image_id": pl.Utf8,  # sha256 of the stored bytes
    "label": pl.Utf8,
    "path": pl.Utf8,  # relative to the workspace; null when the bytes were not an image
    "width": pl.Int32,
    "height": pl.Int32,
    "format": pl.Utf8,  # format as it arrived
    "source": pl.Utf8,
    "query": pl.Utf8,
    "source_url": pl.Utf8,
    "page_url": pl.Utf8,
    "license": pl.Utf8,
    "author": pl.Utf8,
    "retrieved_at": pl.Datetime("us", "UTC"),
    "status": pl.Utf8,
    "reason": pl.Utf8,
    "source_sha256": pl.Utf8,  # sha256 of the bytes as received (differs when normalisation re-encoded)
    "note": pl.Utf8,  # what normalisation did, or the detail of a rejection
}

SIGHTING_COLUMNS = [
    "image_id", "label", "source", "query", "source_url", "page_url", "license", "author", "retrieved_at", "source_sha256",
]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Workspace:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root).resolve())

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.parquet"

    @property
    def store(self) -> ImageStore:
        return ImageStore(self.root / "store")

    @property
    def sightings_dir(self) -> Path:
        return self.root / "sightings"

    def stage_dir(self, stage: str) -> Path:
        d = self.root / "stages" / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def abspath(self, rel: str) -> Path:
        return self.root / rel

    def relpath(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root))

    def ensure(self) -> "Workspace":
        self.root.mkdir(parents=True, exist_ok=True)
        return self


def empty() -> pl.DataFrame:
    return pl.DataFrame(schema=SCHEMA)


def read(ws: Workspace) -> pl.DataFrame:
    """The catalog, or an empty one with the base schema."""
    if not ws.catalog_path.exists():
        return empty()
    return ensure_columns(pl.read_parquet(ws.catalog_path), SCHEMA)


def ensure_columns(df: pl.DataFrame, columns: Mapping[str, pl.DataType]) -> pl.DataFrame:
    """Add missing columns as nulls of the given types (stages declare theirs this way)."""
    missing = [pl.lit(None, dtype=t).alias(c) for c, t in columns.items() if c not in df.columns]
    return df.with_columns(missing) if missing else df


def write(ws: Workspace, df: pl.DataFrame) -> None:
    """Atomically replace the catalog. Refuses to drop rows: rows are never deleted."""
    if df["image_id"].null_count() or df["image_id"].n_unique() != df.height:
        raise ValueError("catalog image_id must be unique and non-null")
    if ws.catalog_path.exists():
        old_ids = pl.read_parquet(ws.catalog_path, columns=["image_id"])["image_id"]
        lost = old_ids.filter(~old_ids.is_in(df["image_id"].implode()))
        if lost.len():
            raise ValueError(f"refusing to write a catalog that loses {lost.len()} rows (e.g. {lost[0]})")
    ws.ensure()
    tmp = ws.catalog_path.with_name(f".catalog.{uuid.uuid4().hex}.parquet")
    try:
        df.write_parquet(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, ws.catalog_path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def locked(ws: Workspace) -> Iterator[None]:
    """Serialise read-modify-write of the catalog across processes (parallel tasks, workers)."""
    ws.ensure()
    with open(ws.root / ".catalog.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def rows_frame(rows: Iterable[Mapping], schema: Mapping[str, pl.DataType] = SCHEMA) -> pl.DataFrame:
    """Plain dict rows to a frame with the catalog's types (unknown keys keep inferred types)."""
    rows = list(rows)
    if not rows:
        return pl.DataFrame(schema=dict(schema))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    sch = {k: schema[k] for k in keys if k in schema}
    return pl.DataFrame(rows, schema_overrides=sch, infer_schema_length=None).select(keys)


def add(df: pl.DataFrame, new: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """Append rows whose image_id is not in the catalog yet; returns (catalog, rows added)."""
    if new.is_empty():
        return df, 0
    new = new.unique("image_id", keep="first", maintain_order=True)
    new = new.filter(~pl.col("image_id").is_in(df["image_id"].implode()))
    if new.is_empty():
        return df, 0
    new = ensure_columns(new, dict(df.schema))
    df = ensure_columns(df, dict(new.schema))
    return pl.concat([df, new.select(df.columns).cast(dict(df.schema))], how="vertical"), new.height


def update(df: pl.DataFrame, updates: pl.DataFrame) -> pl.DataFrame:
    """Set the columns present in ``updates`` for the image_ids it lists; other rows are untouched."""
    cols = [c for c in updates.columns if c != "image_id"]
    if updates.is_empty() or not cols:
        return df
    df = ensure_columns(df, {c: updates.schema[c] for c in cols})
    upd = updates.select(["image_id", *cols]).unique("image_id", keep="last")
    upd = upd.with_columns(pl.lit(True).alias("__hit")).rename({c: f"__new_{c}" for c in cols})
    out = df.join(upd, on="image_id", how="left")
    return out.with_columns(
        [pl.when(pl.col("__hit")).then(pl.col(f"__new_{c}")).otherwise(pl.col(c)).cast(df.schema[c]).alias(c) for c in cols]
    ).select(df.columns)


def _sightings(ws: Workspace) -> PartsTable:
    return PartsTable(ws.sightings_dir, {c: SCHEMA[c] for c in SIGHTING_COLUMNS})


def record_sightings(ws: Workspace, rows: pl.DataFrame) -> None:
    """Append where/under which label images were found: the same bytes found twice both count."""
    _sightings(ws).append(ensure_columns(rows, SCHEMA).select(SIGHTING_COLUMNS))


def read_sightings(ws: Workspace) -> pl.DataFrame:
    return _sightings(ws).read()


def counts(df: pl.DataFrame) -> pl.DataFrame:
    """Per-class counts by status: columns label, candidate, accepted, rejected, total."""
    base = df.with_columns(pl.col("label").fill_null("(none)"))
    if base.is_empty():
        return pl.DataFrame(schema={"label": pl.Utf8, **{s.value: pl.UInt32 for s in Status}, "total": pl.UInt32})
    piv = base.group_by("label", "status").len().pivot(on="status", index="label", values="len")
    for s in Status:
        if s.value not in piv.columns:
            piv = piv.with_columns(pl.lit(0, dtype=pl.UInt32).alias(s.value))
    piv = piv.select("label", *[s.value for s in Status]).fill_null(0)
    return piv.with_columns(pl.sum_horizontal(*[s.value for s in Status]).alias("total")).sort("label")


def reasons(df: pl.DataFrame) -> pl.DataFrame:
    """Rejected images per reason."""
    rej = df.filter(pl.col("status") == Status.rejected.value)
    return rej.group_by("reason").len().rename({"len": "images"}).sort("images", descending=True)


def save_resolved_manifest(ws: Workspace, text: str) -> Path:
    p = ws.ensure().root / "manifest.resolved.yaml"
    atomic_write_bytes(p, text.encode())
    return p


def start_run(manifest: "Manifest", workdir: str | Path | None = None, *, default_root: Path = Path("workspaces")) -> Workspace:
    """The run's workspace (``workdir``, else the manifest's, else default_root/<name>), with the
    resolved settings saved beside its outputs so any result traces back to them."""
    from curation.config import dump_manifest

    if workdir:
        ws = Workspace(Path(workdir).expanduser())
    elif manifest.workdir is not None:
        ws = Workspace(manifest.workdir)
    else:
        ws = Workspace(default_root / manifest.name)
    save_resolved_manifest(ws.ensure(), dump_manifest(manifest))
    return ws
