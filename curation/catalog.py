"""The catalog: one row per image (keyed by sha256) in a Delta Lake table, versioned, rows never deleted.

A workspace directory holds everything a run produces:

    WORKDIR/catalog/              one row per image, the single source of truth (a Delta table)
    WORKDIR/store/ab/abcd....jpg  content-addressed images
    WORKDIR/sightings/*.parquet   every time an image was found (source, label, url), append-only
    WORKDIR/stages/<stage>/       per-stage outputs (reports, plots, caches)
    WORKDIR/manifest.resolved.yaml  the exact settings of the last run
"""

from __future__ import annotations

import fcntl
import os
import re
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping

import polars as pl

from curation.errors import JurassiclassError
from curation.store import ImageStore, PartsTable, atomic_write_bytes, fsync_dir

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


_LOG_ENTRY = re.compile(r"\d{20}\.json")


@dataclass(frozen=True)
class Workspace:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root).resolve())

    @property
    def table_path(self) -> Path:
        """The catalog's Delta table."""
        return self.root / "catalog"

    @property
    def legacy_catalog_path(self) -> Path:
        """Where catalogs before the Delta table lived; migrated on first use, kept renamed."""
        return self.root / "catalog.parquet"

    @property
    def catalog_path(self) -> Path:
        """The file that marks the catalog's state: the table's newest log entry (a new one per
        commit, so its bytes fingerprint the version), else the legacy catalog.parquet. It exists
        exactly when a catalog does. Prefer ``catalog.version(ws)`` in new code."""
        log = self.table_path / "_delta_log"
        entries = [p.name for p in log.glob("*.json") if _LOG_ENTRY.fullmatch(p.name)] if log.is_dir() else []
        return log / max(entries) if entries else self.legacy_catalog_path

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


# ---------------------------------------------------------------- the Delta table
# The catalog is a Delta Lake table (WORKDIR/catalog/): a commit writes new parquet files, then
# atomically creates one log entry naming them, so a commit costs what it changes and a crash at
# any point leaves the last committed version readable (its files are never touched).
#
# Layout: partitioned by ``_bucket`` (the first two hex digits of image_id, 256 buckets), so a
# merge rewrites only the buckets holding the rows it changes. Small appends land in one file in
# the ``in`` bucket (an inbox, not a hex prefix), so a scrape commit writes one file however many
# buckets its rows belong to; maintenance moves the inbox's rows to their buckets. ``_seq`` keeps
# the order rows were added in (readers and ``add`` rely on "the first row of an image_id wins").
# Both are hidden from readers.
BUCKET_CHARS = 2
INBOX = "in"
INBOX_MAX_ROWS = 10_000  # a bigger append goes straight to the buckets: a merge rewrites the inbox it hits
_BUCKET, _SEQ = "_bucket", "_seq"
_HIDDEN = (_BUCKET, _SEQ)
# Every COMPACT_EVERY versions a commit also compacts small files, checkpoints the log and
# vacuums files no version inside RETENTION_HOURS needs: versions older than that cannot be read.
COMPACT_EVERY = 100
RETENTION_HOURS = 7 * 24
_RETRIES = 8


class CatalogVersionError(JurassiclassError, ValueError):
    """A catalog version that does not exist, or whose files were vacuumed."""


def _table(ws: Workspace) -> str:
    return str(ws.table_path)


def _exists(ws: Workspace) -> bool:
    from deltalake import DeltaTable

    return ws.table_path.exists() and DeltaTable.is_deltatable(_table(ws))


def _open(ws: Workspace, version: int | None = None):
    from deltalake import DeltaTable

    return DeltaTable(_table(ws), version=version)


def _migrate(ws: Workspace) -> None:
    """Convert a workspace's legacy catalog.parquet into the table once; the old file is kept, renamed."""
    legacy = ws.legacy_catalog_path
    if not legacy.exists():
        return
    with locked(ws):
        if not legacy.exists():
            return
        if not _exists(ws):
            df = pl.read_parquet(legacy)
            _check_ids(df)
            _write_frame(ws, _with_hidden(ensure_columns(df, SCHEMA), _next_seq(ws)), mode="append", note="migrate catalog.parquet")
        # Renamed only once the table holds it: a crash before this line converts again next time.
        os.replace(legacy, legacy.with_name("catalog.parquet.migrated"))
        fsync_dir(ws.root)


def _prepare(ws: Workspace) -> bool:
    """Migrate if needed; whether a table exists."""
    if ws.legacy_catalog_path.exists():
        _migrate(ws)
    return _exists(ws)


def _next_seq(ws: Workspace) -> int:
    # Nanoseconds since the epoch: later commits get larger numbers without reading the table.
    # Commits are serialised by the lock and each takes well over a millisecond, so the ranges
    # of two commits (a row each, 1 ns apart) do not overlap below a million rows a commit.
    return time.time_ns()


def _with_hidden(df: pl.DataFrame, seq0: int, *, inbox: bool = False) -> pl.DataFrame:
    return df.with_columns(
        (pl.lit(INBOX) if inbox else pl.col("image_id").str.slice(0, BUCKET_CHARS)).alias(_BUCKET),
        (pl.int_range(pl.len(), dtype=pl.Int64) + seq0).alias(_SEQ),
    )


def _check_ids(df: pl.DataFrame) -> None:
    if "image_id" not in df.columns:
        raise ValueError("catalog rows need an image_id")
    if df["image_id"].null_count() or df["image_id"].n_unique() != df.height:
        raise ValueError("catalog image_id must be unique and non-null")


def _visible(df: pl.DataFrame) -> pl.DataFrame:
    """Rows in the order they were added, one per image_id (a blind append may have raced one in:
    the first wins, as in ``add``), without the hidden columns."""
    if _SEQ in df.columns:
        df = df.sort(_SEQ).unique("image_id", keep="first", maintain_order=True)
    return df.drop([c for c in _HIDDEN if c in df.columns])


def _storable(df: pl.DataFrame, table_schema: Mapping[str, pl.DataType]) -> pl.DataFrame:
    """Cast to the table's types for columns it has; columns it lacks are added (schema evolution)
    with types Delta can hold: all-null columns of no type and categoricals become strings."""
    casts = []
    for c, t in df.schema.items():
        if c in table_schema and table_schema[c] != t:
            casts.append(pl.col(c).cast(table_schema[c]))
        elif c not in table_schema and (t == pl.Null or isinstance(t, (pl.Categorical, pl.Enum))):
            casts.append(pl.col(c).cast(pl.Utf8))  # delta-rs cannot write dictionary-encoded strings
    return df.with_columns(casts) if casts else df


def _scan(dt, buckets: list[str] | None = None) -> pl.DataFrame:
    """The table's rows (of ``buckets`` only: partition pruning), hidden columns included."""
    lf = pl.scan_delta(dt)
    return (lf.filter(pl.col(_BUCKET).is_in(buckets)) if buckets is not None else lf).collect()


def _table_schema(ws: Workspace) -> dict[str, pl.DataType]:
    if not _exists(ws):
        return {}
    return dict(pl.scan_delta(_table(ws)).collect_schema())


def _write_frame(ws: Workspace, df: pl.DataFrame, *, mode: str, predicate: str | None = None, note: str = "",
                 retries: int = _RETRIES, maintenance: bool = True) -> None:
    """One Delta commit; an append is retried when a writer outside our lock committed first."""
    from deltalake import CommitProperties
    from deltalake.exceptions import CommitFailedError

    ws.ensure()
    opts = {"partition_by": [_BUCKET], "schema_mode": "merge", "commit_properties": CommitProperties(custom_metadata={"jurassiclass": note})}
    if predicate:
        opts["predicate"] = predicate
    for attempt in range(retries):
        try:
            df.write_delta(_table(ws), mode=mode, delta_write_options=opts)
            break
        except CommitFailedError:
            if attempt == retries - 1:
                raise
            time.sleep(0.01 * 2**attempt)
    v = _open(ws).version()
    _sync(ws, v)
    if maintenance and v and v % COMPACT_EVERY == 0:
        maintain(ws, drain=False)


def _sync(ws: Workspace, version: int) -> None:
    """Flush the commit to disk: the data files it added, then its log entry and their directories,
    so a power cut cannot take back a commit a caller was told succeeded."""
    import json

    log = ws.table_path / "_delta_log" / f"{version:020d}.json"
    added = [ws.table_path / urllib.parse.unquote(a["path"])
             for a in (json.loads(line).get("add") for line in log.read_text().splitlines()) if a]
    # In parallel: a commit adds a file per bucket it touches, and the filesystem batches
    # concurrent flushes into one journal commit (measured 2-4x faster than one by one).
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(_fsync_file, added + [log]))
        list(pool.map(fsync_dir, sorted({f.parent for f in added} | {log.parent, ws.table_path})))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def maintain(ws: Workspace, *, retention_hours: int = RETENTION_HOURS, drain: bool = True) -> dict:
    """Move the inbox's rows to their buckets (``drain``; else only once it holds INBOX_MAX_ROWS),
    compact small files, checkpoint the log, and delete files no version younger than
    ``retention_hours`` reads. Commits run it every COMPACT_EVERY versions, draining only a full
    inbox: a drain rewrites every bucket its rows fall in, nearly all of them."""
    with locked(ws):
        if not _prepare(ws):
            return {}
        moved = _drain_inbox(ws, at_least=0 if drain else INBOX_MAX_ROWS)
        dt = _open(ws)
        stats = dt.optimize.compact()
        dt = _open(ws)
        dt.create_checkpoint()
        # full: also files no commit names (a writer killed mid-commit), once older than the retention.
        removed = dt.vacuum(retention_hours=retention_hours, dry_run=False, enforce_retention_duration=False, full=True)
        dt.cleanup_metadata()
        return {"inbox_rows_moved": moved, "compacted_files": stats.get("numFilesRemoved", 0), "vacuumed_files": len(removed)}


def _inbox_rows(dt) -> int:
    """Rows in the inbox, from the log's file statistics (no data read)."""
    acts = pl.DataFrame(dt.get_add_actions(flatten=True))
    col = f"partition.{_BUCKET}"
    return int(acts.filter(pl.col(col) == INBOX)["num_records"].sum()) if col in acts.columns else 0


def _drain_inbox(ws: Workspace, *, at_least: int = 0) -> int:
    """Move the inbox's rows to their buckets, in one commit (under the lock), if it holds any
    and at least ``at_least``."""
    dt = _open(ws)
    if at_least and _inbox_rows(dt) < at_least:
        return 0
    inbox = _scan(dt, [INBOX])
    if inbox.is_empty():
        return 0
    moved = inbox.with_columns(pl.col("image_id").str.slice(0, BUCKET_CHARS).alias(_BUCKET))
    buckets = moved[_BUCKET].unique().sort().to_list()
    cur = _scan(dt, buckets)
    out = pl.concat([cur, moved.select(cur.columns).cast(dict(cur.schema))], how="vertical")
    out = out.sort(_SEQ).unique("image_id", keep="first", maintain_order=True)
    inlist = ", ".join(f"'{b}'" for b in [INBOX, *buckets])
    _write_frame(ws, out, mode="overwrite", predicate=f"{_BUCKET} IN ({inlist})", note="drain inbox", maintenance=False)
    return inbox.height


def version(ws: Workspace) -> int | None:
    """The catalog's current version (each commit adds one), or None before the first commit."""
    return _open(ws).version() if _prepare(ws) else None


def read(ws: Workspace, version: int | None = None) -> pl.DataFrame:
    """The catalog (at ``version``, default the latest), or an empty one with the base schema."""
    if not _prepare(ws):
        if version is not None:
            raise CatalogVersionError(f"no catalog in {ws.root}: version {version} does not exist")
        return empty()
    try:
        dt = _open(ws, version)
    except Exception as exc:  # deltalake raises a bare Exception/TableNotFoundError for a missing version
        latest = _open(ws).version()
        raise CatalogVersionError(f"catalog version {version} does not exist (latest is {latest})") from exc
    try:
        df = _scan(dt)
    except (OSError, pl.exceptions.ComputeError) as exc:  # vacuumed: the version's files are gone
        if not isinstance(exc, OSError) and "No such file" not in str(exc) and "not found" not in str(exc).lower():
            raise
        raise CatalogVersionError(f"catalog version {version} is older than the kept history ({RETENTION_HOURS} h)") from exc
    return ensure_columns(_visible(df), SCHEMA)


def ensure_columns(df: pl.DataFrame, columns: Mapping[str, pl.DataType]) -> pl.DataFrame:
    """Add missing columns as nulls of the given types (stages declare theirs this way)."""
    missing = [pl.lit(None, dtype=t).alias(c) for c, t in columns.items() if c not in df.columns]
    return df.with_columns(missing) if missing else df


def append(ws: Workspace, rows: pl.DataFrame) -> int:
    """Commit new rows, without reading the catalog: cost is flat in its size, except that once
    every INBOX_MAX_ROWS small-append rows one append also moves the inbox to its buckets (a
    rewrite of most buckets: amortised, it is what a scrape pays for proportional merges).

    For rows the caller knows are new (it keeps the ids it has seen). Should one not be, nothing is
    lost or doubled: readers keep the first row of an image_id, the one already there.
    Returns the rows written (duplicates within ``rows`` dropped, the first kept).
    """
    if rows.is_empty():
        return 0
    if rows["image_id"].null_count():
        raise ValueError("catalog image_id must be non-null")
    rows = rows.unique("image_id", keep="first", maintain_order=True)
    with locked(ws):
        exists = _prepare(ws)
        frame = rows if exists else ensure_columns(rows, SCHEMA)
        frame = _storable(frame, _table_schema(ws) if exists else dict(SCHEMA))
        inbox = rows.height <= INBOX_MAX_ROWS
        _write_frame(ws, _with_hidden(frame, _next_seq(ws), inbox=inbox), mode="append", note=f"append {rows.height}")
        if inbox and _inbox_rows(_open(ws)) >= INBOX_MAX_ROWS:  # keep what a merge may have to rewrite small
            _drain_inbox(ws)
    return rows.height


def merge(ws: Workspace, updates: pl.DataFrame, columns: Iterable[str] | None = None) -> int:
    """Set ``columns`` (default: all of ``updates``' but image_id) for the image_ids ``updates`` lists,
    in one commit that rewrites only the buckets holding them. New columns join the schema.
    Ids the catalog lacks are ignored. Returns the rows matched."""
    cols = [c for c in (columns if columns is not None else updates.columns) if c != "image_id"]
    if updates.is_empty() or not cols:
        return 0
    updates = updates.select(["image_id", *cols]).unique("image_id", keep="last")
    with locked(ws):
        if not _prepare(ws):
            return 0
        return _rewrite_buckets(ws, updates, pl.DataFrame(schema=updates.schema).clear(), note=f"merge {updates.height}")


def _rewrite_buckets(ws: Workspace, updates: pl.DataFrame, new: pl.DataFrame, *, note: str) -> int:
    """Replace the buckets that ``updates`` and ``new`` touch by their updated contents (plus the new
    rows), in one commit. Called under the lock; a conflicting commit from outside it makes the
    whole read-modify-write start again, never a stale frame committed."""
    from deltalake.exceptions import CommitFailedError

    buckets = pl.concat([updates["image_id"], new["image_id"]]).str.slice(0, BUCKET_CHARS).unique().sort().to_list()
    for attempt in range(_RETRIES):
        cur = _scan(_open(ws), [*buckets, INBOX])
        hits_inbox = cur.filter((pl.col(_BUCKET) == INBOX) & pl.col("image_id").is_in(updates["image_id"].implode())).height > 0
        if not hits_inbox:  # leave the inbox alone: rewriting it would cost what it holds
            cur = cur.filter(pl.col(_BUCKET) != INBOX)
        rewrite = [*buckets, INBOX] if hits_inbox else buckets
        inlist = ", ".join(f"'{b}'" for b in rewrite)
        cur = cur.sort(_SEQ).unique("image_id", keep="first", maintain_order=True)  # drops raced-in copies
        matched = cur.filter(pl.col("image_id").is_in(updates["image_id"].implode())).height
        schema = dict(cur.schema)
        out = update(cur, _storable(updates, schema))
        if not new.is_empty():
            out = ensure_columns(out, dict(new.schema))
            fresh = _with_hidden(_storable(ensure_columns(new, dict(out.schema)), schema), _next_seq(ws))
            out = pl.concat([out, fresh.select(out.columns).cast(dict(out.schema))], how="vertical")
        try:
            _write_frame(ws, out, mode="overwrite", predicate=f"{_BUCKET} IN ({inlist})", note=note, retries=1)
            return matched
        except CommitFailedError:
            if attempt == _RETRIES - 1:
                raise
            time.sleep(0.01 * 2**attempt)
    raise AssertionError("unreachable")


def write(ws: Workspace, df: pl.DataFrame) -> None:
    """Commit ``df`` as the catalog: new image_ids are appended, changed rows merged, in one commit.

    Rows are never deleted: a frame that lacks rows the catalog has is refused (ValueError), and
    columns it lacks keep their values. The cost is that of the diff (reading the catalog) plus
    the buckets it changes; hot paths that know what changed call ``append``/``merge``.
    """
    _check_ids(df)
    with locked(ws):
        if not _prepare(ws):
            _write_frame(ws, _with_hidden(_storable(df, {}), _next_seq(ws)), mode="append", note=f"write {df.height}")
            return
        cur = _visible(_scan(_open(ws)))
        lost = cur["image_id"].filter(~cur["image_id"].is_in(df["image_id"].implode()))
        if lost.len():
            raise ValueError(f"refusing to write a catalog that loses {lost.len()} rows (e.g. {lost[0]})")
        new = df.filter(~pl.col("image_id").is_in(cur["image_id"].implode()))
        changed = _changed(cur, df.filter(pl.col("image_id").is_in(cur["image_id"].implode())))
        if changed.is_empty() and new.is_empty():
            return
        if changed.is_empty():
            schema = _table_schema(ws)
            _write_frame(ws, _with_hidden(_storable(new, schema), _next_seq(ws), inbox=new.height <= INBOX_MAX_ROWS),
                         mode="append", note=f"write +{new.height}")
            return
        _rewrite_buckets(ws, changed, new, note=f"write +{new.height} ~{changed.height}")


def _changed(cur: pl.DataFrame, df: pl.DataFrame) -> pl.DataFrame:
    """Rows of ``df`` that differ from ``cur`` in any of df's columns (nulls compare equal)."""
    cols = [c for c in df.columns if c != "image_id"]
    if not cols or df.is_empty():
        return df.clear()
    shared = [c for c in cols if c in cur.columns]
    fresh = [c for c in cols if c not in cur.columns]
    old = cur.select(["image_id", *shared]).rename({c: f"__old_{c}" for c in shared})
    j = df.join(old, on="image_id", how="left")
    # Nested values compare by hash; others after casting the old value to the frame's type.
    diff = [
        pl.col(c).hash().ne(pl.col(f"__old_{c}").hash()) if j.schema[c].is_nested()
        else pl.col(c).ne_missing(pl.col(f"__old_{c}").cast(j.schema[c], strict=False))
        for c in shared
    ]
    diff += [pl.col(c).is_not_null() for c in fresh]
    return j.filter(pl.any_horizontal(diff)).select(df.columns) if diff else df.clear()


_local = threading.local()


@contextmanager
def locked(ws: Workspace) -> Iterator[None]:
    """Serialise read-modify-write of the catalog across processes (parallel tasks, workers).

    Re-entrant within a thread: ``append``/``merge``/``write`` take it themselves, and callers
    that read, decide and write hold it around all three."""
    ws.ensure()
    held = _local.__dict__.setdefault("held", {})
    if held.get(ws.root):
        held[ws.root] += 1
        try:
            yield
        finally:
            held[ws.root] -= 1
        return
    with open(ws.root / ".catalog.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        held[ws.root] = 1
        try:
            yield
        finally:
            held.pop(ws.root, None)
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
