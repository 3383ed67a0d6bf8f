"""The catalog: one row per image (keyed by sha256) in a Delta Lake table, versioned, rows never deleted.

A workspace directory holds everything a run produces:

    WORKDIR/catalog/              one row per image, the single source of truth (a Delta table)
    WORKDIR/store/ab/abcd....jpg  content-addressed images
    WORKDIR/sightings/            every time an image was found (source, label, url), append-only (a Delta table)
    WORKDIR/stages/<stage>/       per-stage outputs (reports, plots, caches)
    WORKDIR/manifest.resolved.yaml  the exact settings of the last run
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
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
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, TypeVar

import polars as pl

from curation.errors import JurassiclassError
from curation.store import ImageStore, PartsTable, atomic_write_bytes, fsync_dir, fsync_file

if TYPE_CHECKING:
    from curation.config import Manifest

_logger = logging.getLogger(__name__)


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
_LOG_FILE = re.compile(r"\d{20}\.")  # a version's entry, checkpoint or checksum


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
# Layout: range partitioned by image_id into leaves of at most LEAF_MAX_ROWS rows. The partition
# column ``_bucket`` holds a leaf's key, a prefix of image_id: a row lives in the leaf with the
# greatest key <= its image_id among the keys of its bucket (the id's first two characters; a
# bucket's first leaf is keyed by the bucket itself). A commit that rewrites an overfull leaf
# splits it at row quantiles, so a merge of k rows rewrites at most k leaves of bounded size
# whatever the catalog's size; the leaves it touches are read from the log (no data scan) and
# replaced by a predicate on the partition column only. Tables of the first layout (one leaf per
# two-character bucket) are tables of this one whose leaves are too big: merges split what they
# touch and ``maintain`` splits the rest.
# Small appends land in one file in the ``in`` partition (an inbox, not an id prefix), so a scrape
# commit writes one file however many leaves its rows belong to. A full inbox is shelved: its rows
# move to the shelf of their bucket (``in`` + the bucket, e.g. ``in3a``) in one commit that adds a
# file per shelf and rewrites none; a full shelf is drained into its bucket's leaves. ``_seq`` keeps
# the order rows were added in (readers and ``add`` rely on "the first row of an image_id wins").
# Both are hidden from readers.
BUCKET_CHARS = 2
# A merge of one row rewrites at most LEAF_MAX_ROWS rows (~2 MB, a few ms). Every commit costs
# delta-rs time in the table's file count, about one per leaf (measured at 10M rows, 50-row
# appends, 20 a cell: 47.5 ms with leaves of <= 2,048 rows, 9,929 files; 34-44 ms with <= 4,096,
# 5,065 files; 10k rows: 23 ms). A 50-row merge at 10M costs the same with either (385 vs 390 ms:
# finding and reading rows dominates); at 1M, where every bucket is one leaf, it costs more with
# 4,096 (378 ms, 157k rows written, against 217 ms, 49k): the price of flat appends.
LEAF_MAX_ROWS = 4096
SPLIT_BATCH_ROWS = 1_000_000  # maintenance splits leaves in commits of about this many rows
INBOX = "in"
# The inbox is shelved once it holds INBOX_MAX_ROWS rows; an append of more goes straight to the
# leaves. Moving rows to the leaves rewrites nearly every leaf, so it costs the table's size whatever
# it moves (at 1M rows: 5.0 s for 10k inbox rows, 4.8 s for 200k). Draining the inbox straight to
# the leaves cost 326 us per appended row at 10M (32.6 s per 100k), which kept 50-row appends at
# 2.4x the 10k cost. Shelving costs the inbox's size (0.6 s per 100k rows at 10M, no shelf
# rewritten); as ids are uniform every shelf reaches SHELF_MAX_ROWS at about the same time, and
# their drain rewrites the leaves once per 256 x SHELF_MAX_ROWS rows (30.5 s per 1M at 10M; 40-44 s
# before `_writer_properties` and the lighter `_split`): 36 us a row in all, 9x less. Full shelves
# add ~70 ms to a 50-row merge at 1M (the ids of the shelves it touches are read: 448 vs 378 ms),
# ~140 ms when its rows are shelved. A merge that hits a shelved row rewrites its shelf (at most
# SHELF_MAX_ROWS rows, a leaf's worth) and read_partition reads its shelf whole. A bigger inbox
# costs merges that hit it (at 1M, 50 rows: 0.16 s with 10k rows in it, 0.35 s with 100k) and
# read_partition, which filters it (47 ms a call with 10k, 68 ms with 100k). Draining by appending
# the rows to their leaves as new files (no rewrite) measured 2.4 s for 100k rows at 1M (a file per
# leaf), and the next compaction then rewrote every leaf: 17.8 s.
INBOX_MAX_ROWS = 100_000
SHELF_MAX_ROWS = 4096
_BUCKET, _SEQ = "_bucket", "_seq"
_HIDDEN = (_BUCKET, _SEQ)
# Every COMPACT_EVERY versions a commit also compacts small files, checkpoints the log and
# vacuums files no version inside RETENTION_HOURS needs: versions older than that cannot be read.
COMPACT_EVERY = 100
# Every CHECKPOINT_EVERY versions a checkpoint too: opening the table replays the log from the
# last one. Writers keep the table open (`_locked_table`), so only readers replay, and a checkpoint
# costs the table's file count (measured at 10M rows: 94 ms; opening 22 ms from a checkpoint, 33 ms
# 49 commits after it): every 50 versions, ~2 ms a commit.
CHECKPOINT_EVERY = 50
RETENTION_HOURS = 7 * 24
# Log entries older than this go once a newer checkpoint is as old (Delta's delta.logRetentionDuration
# default); pinned versions keep theirs.
LOG_RETENTION_HOURS = 30 * 24
PINS_FILE = "catalog.pins.json"  # in the workspace, beside the table (vacuum deletes what the table does not name)
_RETRIES = 8
T = TypeVar("T")
# File statistics for image_id and _seq only (Delta's default is the first 32 columns, so every
# stage's columns): readers prune on image_id, shelving on _seq, and every commit replays and
# rewrites the statistics of all files in the log (measured at 10M rows, 50-row append: 132 -> 100
# ms; 5,000 rows: 173 -> 59 ms).
PROPERTIES = {"delta.dataSkippingStatsColumns": "image_id,_seq"}
# Columns with a value per image: a dictionary never pays there, and building one first costs
# parquet writing time.
_UNIQUE_COLUMNS = ("image_id", "path", "source_url", "page_url", "source_sha256", "phash", "dup_group")


def _writer_properties():
    """How data files are written: zstd, no dictionary for per-image columns, statistics per column
    chunk (the log's come from them; a leaf is one row group, so page statistics prune nothing).
    Against delta-rs's defaults (snappy, dictionaries, page statistics), measured writing 1M rows in
    256 leaves, 4 rounds interleaved: 1.95 s against 2.18 s, reads 0.45 s against 0.53 s, and 94 MB
    on disk against 173 MB."""
    from deltalake import ColumnProperties, WriterProperties

    chunk = ColumnProperties(statistics_enabled="CHUNK")
    plain = ColumnProperties(statistics_enabled="CHUNK", dictionary_enabled=False)
    return WriterProperties(compression="ZSTD", default_column_properties=chunk,
                            column_properties={c: plain for c in _UNIQUE_COLUMNS})


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


# The table as this process's lock holder last left it, per table path. Opening replays the log
# from its checkpoint, whose size is the table's file count (at 10M rows, ~10k files: 20-40 ms a
# commit); catching a kept snapshot up replays only the commits since (none: < 1 ms). Only lock
# holders use it (`_locked_table`), one at a time, so no caller's snapshot moves under it. It is
# kept with the identity of its version's log entry: a table deleted and made again at the same
# path (a user starting over) is opened afresh, never caught up from the old one's versions.
_LOCKED_TABLES: dict[str, tuple[object, tuple[int, int]]] = {}


def _log_identity(table: Path, version: int) -> tuple[int, int] | None:
    try:
        st = (table / "_delta_log" / f"{version:020d}.json").stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _locked_table(ws: Workspace):
    """The latest version of the table, for a caller holding `locked` (see _LOCKED_TABLES)."""
    from deltalake import DeltaTable

    key = _table(ws)
    dt, ident = _LOCKED_TABLES.get(key, (None, None))
    if dt is not None and ident is not None and _log_identity(ws.table_path, dt.version()) == ident:
        try:
            dt.update_incremental()
        except Exception:  # noqa: BLE001 - e.g. the log it would replay was cleaned up: open afresh
            dt = None
    else:
        dt = None
    if dt is None:
        dt = DeltaTable(key)
    _remember(ws, dt)
    return dt


def _remember(ws: Workspace, dt) -> None:
    _LOCKED_TABLES[_table(ws)] = (dt, _log_identity(ws.table_path, dt.version()))


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
            _write_frame(ws, _split(_with_hidden(ensure_columns(df, SCHEMA), _next_seq(ws))), mode="append",
                         note="migrate catalog.parquet")
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


def _with_hidden(df: pl.DataFrame, seq0: int, *, inbox: bool = False, keys: list[str] | None = None) -> pl.DataFrame:
    """``df`` with its sequence numbers and partition: the inbox, else the leaf of each row among
    ``keys`` (the table's leaf keys; none: each bucket is one leaf, split later if too big)."""
    part = pl.lit(INBOX) if inbox else _leaf_of(df["image_id"], keys or [])
    return df.with_columns(part.alias(_BUCKET), (pl.int_range(pl.len(), dtype=pl.Int64) + seq0).alias(_SEQ))


def _leaf_of(ids: pl.Series, keys: list[str]) -> pl.Series:
    """The leaf of each id among the sorted leaf ``keys``: the greatest key <= the id within its
    bucket, else the bucket itself (a leaf the commit creates)."""
    bucket = ids.str.slice(0, BUCKET_CHARS)
    if not keys:
        return bucket.alias(_BUCKET)
    ks = pl.Series(keys, dtype=pl.Utf8)
    idx = ks.search_sorted(ids, side="right").cast(pl.Int64) - 1
    cand = ks.gather(idx.clip(0, None)).set(idx < 0, None) if (idx < 0).any() else ks.gather(idx)
    return pl.select(pl.when(cand.str.slice(0, BUCKET_CHARS) == bucket).then(cand).otherwise(bucket)).to_series().alias(_BUCKET)


def _split(df: pl.DataFrame) -> pl.DataFrame:
    """Re-key the rows of leaves holding more than LEAF_MAX_ROWS into pieces of about half that,
    cut at id quantiles. Only for leaves whose every row is in ``df`` (a rewrite)."""
    sizes = df.group_by(_BUCKET).len().filter((pl.col("len") > LEAF_MAX_ROWS) & ~_in_inbox())
    if sizes.is_empty():
        return df
    is_big = pl.col(_BUCKET).is_in(sizes[_BUCKET].implode())
    big = df.filter(is_big)
    # Only the (leaf, id) pairs are sorted, not the rows (2M rows: 0.65 s against 0.85 s, and no
    # gather of every column); the cuts' ids give the new keys, and rows find theirs by search.
    pairs = big.select(_BUCKET, "image_id").sort(_BUCKET, "image_id")
    keys = []
    for (leaf,), g in pairs.group_by(_BUCKET, maintain_order=True):
        n, ids = g.height, g["image_id"]
        pieces = -(-n // (LEAF_MAX_ROWS // 2))
        keys += [leaf] + [_separator(ids[n * j // pieces - 1], ids[n * j // pieces]) for j in range(1, pieces)]
    # A leaf's new keys lie in its own range, so the greatest new key <= an id is one of its leaf's.
    big = big.with_columns(_leaf_of(big["image_id"], sorted(keys)))
    return pl.concat([df.filter(~is_big), big], how="vertical")


def _separator(before: str, first: str) -> str:
    """The shortest prefix of ``first`` that sorts after ``before`` (before < first)."""
    c = len(os.path.commonprefix([before, first]))
    return first[: c + 1]


def _files(dt) -> pl.DataFrame:
    """The table's data files from the log (no data read): their leaf, row count and largest
    ``_seq`` (null for a file written before _seq had statistics)."""
    acts = pl.DataFrame(dt.get_add_actions(flatten=True))
    col, seq = f"partition.{_BUCKET}", f"max.{_SEQ}"
    if acts.is_empty() or col not in acts.columns:
        return pl.DataFrame(schema={_BUCKET: pl.Utf8, "rows": pl.Int64, "max_seq": pl.Int64})
    return acts.select(pl.col(col).alias(_BUCKET), pl.col("num_records").cast(pl.Int64).alias("rows"),
                       (pl.col(seq) if seq in acts.columns else pl.lit(None)).cast(pl.Int64).alias("max_seq"))


def _leaves(dt) -> pl.DataFrame:
    """The table's leaves from the log's file statistics (no data read): key, rows, files."""
    return (_files(dt).group_by(_BUCKET)
            .agg(pl.col("rows").sum(), pl.len().alias("files")).sort(_BUCKET))


def _leaf_keys(leaves: pl.DataFrame) -> list[str]:
    return leaves.filter(~_in_inbox())[_BUCKET].to_list()


def _in_inbox() -> pl.Expr:
    """Rows of the inbox or a shelf (hex leaf keys never start with INBOX's letters)."""
    return pl.col(_BUCKET).str.starts_with(INBOX)


def _on_shelf() -> pl.Expr:
    return _in_inbox() & (pl.col(_BUCKET) != INBOX)


def _shelf_of(ids: pl.Series) -> pl.Series:
    return (INBOX + ids.str.slice(0, BUCKET_CHARS)).alias(_BUCKET)


def _check_ids(df: pl.DataFrame) -> None:
    if "image_id" not in df.columns:
        raise ValueError("catalog rows need an image_id")
    if df["image_id"].null_count() or df["image_id"].n_unique() != df.height:
        raise ValueError("catalog image_id must be unique and non-null")


def _has_copies(ids: pl.Series) -> bool:
    """Whether an id occurs twice. Counting distinct 64-bit hashes first is ~10x faster than
    comparing the strings (2M ids: 0.09 s against 0.85 s for sort + unique); the strings are only
    compared when two hashes are equal (a copy, or a collision)."""
    return ids.hash().n_unique() < ids.len() and ids.n_unique() < ids.len()


def _first_rows(df: pl.DataFrame, *, ordered: bool = True) -> pl.DataFrame:
    """One row per image_id, the first added (a blind append may have raced one in: the first
    wins, as in ``add``); ``ordered``: in the order they were added (a rewrite needs no order)."""
    if ordered:
        df = df.sort(_SEQ)
    if not _has_copies(df["image_id"]):
        return df
    return (df if ordered else df.sort(_SEQ)).unique("image_id", keep="first", maintain_order=True)


def _visible(df: pl.DataFrame) -> pl.DataFrame:
    """Rows in the order they were added, one per image_id, without the hidden columns."""
    if _SEQ in df.columns:
        df = _first_rows(df)
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


def _scan(dt, leaves: list[str] | None = None) -> pl.DataFrame:
    """The table's rows (of ``leaves`` only: partition pruning), hidden columns included."""
    lf = pl.scan_delta(dt)
    return (lf.filter(pl.col(_BUCKET).is_in(leaves)) if leaves is not None else lf).collect()


def _table_schema(ws: Workspace, dt=None) -> dict[str, pl.DataType]:
    if dt is None:
        if not _exists(ws):
            return {}
        dt = _open(ws)
    return dict(_polars_schema(dt.schema().to_json()))


@functools.lru_cache(maxsize=16)
def _polars_schema(schema_json: str) -> dict[str, pl.DataType]:
    """Polars types of a Delta schema, converted once per schema (4-9 ms of every append before)."""
    import pyarrow as pa
    from deltalake import Schema

    return dict(pl.from_arrow(pa.schema(Schema.from_json(schema_json).to_arrow()).empty_table()).schema)


def _in_list(keys: Iterable[str]) -> str:
    return ", ".join("'" + k.replace("'", "''") + "'" for k in sorted(set(keys)))


def _write_frame(ws: Workspace, df: pl.DataFrame, *, mode: str, predicate: str | None = None, note: str = "",
                 retries: int = _RETRIES, maintenance: bool = True, dt=None):
    """One Delta commit, on the snapshot ``dt`` when given (a rewrite commits only on what it read:
    a newer version makes it fail, and the caller start again); an append is retried when a
    writer outside our lock committed first. Returns the table after the commit."""
    from deltalake import CommitProperties

    ws.ensure()
    opts = {"partition_by": [_BUCKET], "schema_mode": "merge", "writer_properties": _writer_properties(),
            "commit_properties": CommitProperties(custom_metadata={"jurassiclass": note})}
    if predicate:
        opts["predicate"] = predicate
    if not (ws.table_path / "_delta_log").is_dir():
        opts["configuration"] = PROPERTIES
    _committed(lambda: df.write_delta(dt if dt is not None else _table(ws), mode=mode, delta_write_options=opts), retries)
    dt = dt if dt is not None else _locked_table(ws)  # a table written through is at the new version
    _remember(ws, dt)
    v = dt.version()
    _sync(ws.table_path, v)
    if maintenance and v and v % COMPACT_EVERY == 0:
        maintain(ws, drain=False)
        dt = _locked_table(ws)
    elif v and v % CHECKPOINT_EVERY == 0:
        _checkpoint(ws.table_path, dt)
    return dt


def _committed(write: Callable[[], T], retries: int = _RETRIES) -> T:
    """``write()`` (one Delta commit), retried with backoff while a writer outside our lock commits
    first; returns what it returns."""
    from deltalake.exceptions import CommitFailedError

    for attempt in range(retries):
        try:
            return write()
        except CommitFailedError:
            if attempt == retries - 1:
                raise
            time.sleep(0.01 * 2**attempt)
    raise AssertionError("unreachable")


def _checkpoint(table: Path, dt) -> None:
    """Checkpoint the log at ``dt``'s version, flushed like a commit: readers start from the
    checkpoint ``_last_checkpoint`` names, so it must not name one a power cut could tear."""
    dt.create_checkpoint()
    log = table / "_delta_log"
    for f in (log / f"{dt.version():020d}.checkpoint.parquet", log / "_last_checkpoint"):
        if f.exists():
            fsync_file(f)
    fsync_dir(log)


def _log_actions(table: Path, version: int) -> list[dict]:
    log = table / "_delta_log" / f"{version:020d}.json"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _sync(table: Path, version: int) -> None:
    """Flush commit ``version`` of the Delta table at ``table`` to disk: the data files it added,
    then its log entry and their directories, so a power cut cannot take back a commit a caller
    was told succeeded."""
    log = table / "_delta_log" / f"{version:020d}.json"
    added = [table / urllib.parse.unquote(a["add"]["path"]) for a in _log_actions(table, version) if "add" in a]
    # In parallel: a commit adds a file per leaf it touches, and the filesystem batches
    # concurrent flushes into one journal commit (measured 2-4x faster than one by one).
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(fsync_file, added + [log]))
        list(pool.map(fsync_dir, sorted({f.parent for f in added} | {log.parent, table})))


def commit_stats(ws: Workspace, version: int | None = None) -> dict:
    """What commit ``version`` (default the latest) did, from its log entry: files and rows it
    added and removed, and the bytes it wrote."""

    if version is None:
        version = _open(ws).version()
    acts = _log_actions(ws.table_path, version)
    adds = [a["add"] for a in acts if "add" in a]
    removes = [a["remove"] for a in acts if "remove" in a]
    return {
        "version": version,
        "files_added": len(adds),
        "rows_added": sum(json.loads(a.get("stats") or "{}").get("numRecords", 0) for a in adds),
        "bytes_added": sum(a.get("size", 0) for a in adds),
        "files_removed": len(removes),
        "leaves_removed": sorted({urllib.parse.unquote(r["path"]).split("/")[0].split("=", 1)[1] for r in removes}),
    }


def maintain(ws: Workspace, *, retention_hours: int = RETENTION_HOURS, drain: bool = True,
             log_retention_hours: int = LOG_RETENTION_HOURS) -> dict:
    """Move the inbox's and shelves' rows to their leaves (``drain``; else shelve a full inbox and
    drain full shelves), split leaves grown past LEAF_MAX_ROWS (big appends, the first layout's
    buckets), compact small files, checkpoint the log, and delete files no version younger than
    ``retention_hours`` reads, except the pinned versions' (``pin``). Commits run it every
    COMPACT_EVERY versions, draining only what is full: draining every shelf rewrites nearly every leaf."""
    with locked(ws):
        if not _prepare(ws):
            return {}
        moved = _drain_inbox(ws, full_only=not drain)
        dt = _locked_table(ws)
        if any(dt.metadata().configuration.get(k) != v for k, v in PROPERTIES.items()):  # a table made before them
            dt.alter.set_table_properties(PROPERTIES)
            _sync(ws.table_path, dt.version())
        leaves = _leaves(dt)
        big = leaves.filter((pl.col("rows") > LEAF_MAX_ROWS) & ~_in_inbox())
        # In commits of about SPLIT_BATCH_ROWS rows, so that memory stays bounded (a first-layout
        # table at 10M rows is all big leaves).
        batch = (big["rows"].cum_sum() // SPLIT_BATCH_ROWS).alias("batch")
        for (_,), part in big.with_columns(batch).group_by("batch", maintain_order=True):
            _rewrite(ws, _no_updates(), _no_updates(), extra=part[_BUCKET].to_list(),
                     note=f"split {part.height} leaves", maintenance=False)
        compacted, vacuumed = _tidy(ws.table_path, retention_hours, pinned=pins(ws), log_retention_hours=log_retention_hours)
        return {"inbox_rows_moved": moved, "leaves_split": big.height, "compacted_files": compacted,
                "vacuumed_files": vacuumed}


def _tidy(table: Path, retention_hours: int, *, pinned: Iterable[int] = (),
          log_retention_hours: int = LOG_RETENTION_HOURS) -> tuple[int, int]:
    """Compact the Delta table at ``table``'s small files (not the shelves'), checkpoint its log and
    delete files no version younger than ``retention_hours`` reads, nor a ``pinned`` one: (files
    compacted, files vacuumed)."""
    from deltalake import DeltaTable

    dt = DeltaTable(str(table))
    # A shelf gains a file per shelving, about SHELF_MAX_ROWS x 256 / INBOX_MAX_ROWS (~10) before
    # it drains: compacting them would rewrite every shelf after each shelving, all shelves holding
    # up to 256 x SHELF_MAX_ROWS rows, more than the drain it defers.
    shelves = _files(dt).filter(_on_shelf())[_BUCKET].unique().sort().to_list()
    stats = dt.optimize.compact(partition_filters=[(_BUCKET, "not in", shelves)] if shelves else None,
                                writer_properties=_writer_properties())
    dt = DeltaTable(str(table))
    _checkpoint(table, dt)
    pinned = sorted(set(pinned))
    for v in pinned:  # each read from a checkpoint of its own before older log entries go
        _checkpoint_at(table, v)
    try:
        kept = _files_of(table, pinned)
    except Exception as exc:  # keep everything rather than a pinned version's files
        _logger.warning("vacuum of %s skipped: a pinned version could not be read (%s)", table, exc)
        return stats.get("numFilesRemoved", 0), 0
    # full: also files no commit names (a writer killed mid-commit), once older than the retention.
    doomed = dt.vacuum(retention_hours=retention_hours, dry_run=True, enforce_retention_duration=False, full=True)
    doomed = [f for f in doomed if urllib.parse.unquote(f) not in kept]
    for f in doomed:
        (table / urllib.parse.unquote(f)).unlink(missing_ok=True)
    if pinned:
        _cleanup_log(table, pinned, log_retention_hours)
    else:
        dt.cleanup_metadata()
    return stats.get("numFilesRemoved", 0), len(doomed)


# ---------------------------------------------------------------- pinned versions
# The versions published datasets read stay readable however old: vacuum keeps their files, and a
# checkpoint at each (with its log entry) survives log cleanup, so reading one needs no older entry.
# A pin costs the files of its version that later commits rewrote: at most the table's size.


def pins(ws: Workspace) -> dict[int, list[str]]:
    """Pinned catalog versions and why each is kept (e.g. "published v3")."""
    path = ws.root / PINS_FILE
    return {int(k): v for k, v in json.loads(path.read_text()).items()} if path.exists() else {}


def pin_costs(ws: Workspace) -> list[dict]:
    """Per pinned version: why it is kept, and the files and bytes that it alone reads among the
    pinned versions and the latest (what unpinning it frees, at a vacuum past the retention);
    None for a version that cannot be read any more."""
    pinned = pins(ws)
    held: dict[int, dict[str, int] | None] = {}
    for v in sorted(pinned):
        try:
            held[v] = dict(_version_files(str(ws.table_path), v, _log_identity(ws.table_path, v)))
        except Exception:  # its log entries are gone
            held[v] = None
    latest = _file_sizes(_open(ws)) if held else {}
    out = []
    for v, why in sorted(pinned.items()):
        mine = held[v]
        if mine is None:
            out.append({"version": v, "why": why, "files": None, "bytes": None})
            continue
        others = set(latest).union(*(f for u, f in held.items() if u != v and f))
        only = [b for p, b in mine.items() if p not in others]
        out.append({"version": v, "why": why, "files": len(only), "bytes": sum(only)})
    return out


def _write_pins(ws: Workspace, pinned: dict[int, list[str]]) -> None:
    atomic_write_bytes(ws.root / PINS_FILE, json.dumps({str(k): v for k, v in sorted(pinned.items())}, indent=1).encode())
    fsync_dir(ws.root)


def pin(ws: Workspace, version: int, why: str) -> None:
    """Keep catalog ``version`` readable whatever its age (``why`` says for what)."""
    with locked(ws):
        _open_version(ws, version)  # one that does not exist, or is gone, is an error
        _checkpoint_at(ws.table_path, version)
        pinned = pins(ws)
        if why not in pinned.setdefault(version, []):
            pinned[version].append(why)
        _write_pins(ws, pinned)


def unpin(ws: Workspace, version: int) -> list[str]:
    """Stop keeping ``version``: the next vacuum deletes its files once no version younger than the
    retention reads them. Returns the reasons it was kept."""
    with locked(ws):
        pinned = pins(ws)
        if version not in pinned:
            raise CatalogVersionError(f"catalog version {version} is not pinned (pinned: {sorted(pinned) or 'none'})")
        why = pinned.pop(version)
        _write_pins(ws, pinned)
        return why


def _checkpoint_at(table: Path, version: int) -> None:
    """A checkpoint of ``version`` in the log, however old the version (delta-rs leaves the log's
    pointer at a newer checkpoint); none for a version whose log entries are gone."""
    from deltalake import DeltaTable

    if (table / "_delta_log" / f"{version:020d}.checkpoint.parquet").exists():
        return
    try:
        dt = DeltaTable(str(table), version=version)
    except Exception:  # its log entries are gone: nothing left to keep
        return
    _checkpoint(table, dt)


def _files_of(table: Path, versions: Iterable[int]) -> set[str]:
    """The data files (paths in the table) that ``versions`` read; none for a version whose log
    entry and checkpoint are both gone (nothing left to keep). Raises when one cannot be read."""
    log_dir = table / "_delta_log"
    return set().union(*(dict(_version_files(str(table), v, _log_identity(table, v))) for v in versions
                         if (log_dir / f"{v:020d}.json").exists() or (log_dir / f"{v:020d}.checkpoint.parquet").exists()))


@functools.lru_cache(maxsize=256)
def _version_files(table: str, version: int, identity: tuple[int, int] | None) -> tuple[tuple[str, int], ...]:
    """A version's files and their sizes. They never change: read once per process (at 10M rows,
    loading a version costs tens of ms, and maintenance asks for every pinned one), keyed by its
    log entry's identity so a table made again at the same path is read afresh."""
    from deltalake import DeltaTable

    return tuple(_file_sizes(DeltaTable(table, version=version)).items())


def _file_sizes(dt) -> dict[str, int]:
    """The table snapshot ``dt``'s data files (paths in the table) and their sizes, from its log."""
    acts = pl.DataFrame(dt.get_add_actions(flatten=True))
    return dict(zip(map(urllib.parse.unquote, acts["path"].to_list()), acts["size_bytes"].to_list()))


def _cleanup_log(table: Path, pinned: list[int], retention_hours: int) -> None:
    """Delta's log cleanup, keeping the pinned versions' entries and checkpoints: entries before the
    newest checkpoint older than ``retention_hours`` go (no version from that checkpoint on needs
    them; a pinned one reads its own)."""
    log = table / "_delta_log"
    cutoff = time.time() - retention_hours * 3600
    old = [int(p.name[:20]) for p in log.glob("*.checkpoint.parquet") if p.stat().st_mtime <= cutoff]
    if not old:
        return
    safe, keep = max(old), set(pinned)
    for p in log.iterdir():
        if _LOG_FILE.match(p.name) and int(p.name[:20]) < safe and int(p.name[:20]) not in keep:
            p.unlink()
    fsync_dir(log)


def _no_updates() -> pl.DataFrame:
    return pl.DataFrame(schema={"image_id": pl.Utf8})


def _inbox_size(dt) -> int:
    """Rows in the inbox of the table ``dt``, from the log's file statistics (no data read; at 10M
    rows, ~10k files: 0.5 ms)."""
    return int(_files(dt).filter(pl.col(_BUCKET) == INBOX)["rows"].sum())


def _drain_inbox(ws: Workspace, *, full_only: bool = False) -> int:
    """Shelve the inbox and drain the shelves into their leaves (under the lock); with
    ``full_only``, only an inbox of INBOX_MAX_ROWS rows and shelves of SHELF_MAX_ROWS. Returns the
    rows moved to leaves."""
    if _inbox_size(_locked_table(ws)) >= (INBOX_MAX_ROWS if full_only else 1):
        _shelve(ws)
    return _drain_shelves(ws, at_least=SHELF_MAX_ROWS if full_only else 1)


def _shelve(ws: Workspace) -> int:
    """Move the inbox's rows to their shelves in one commit that removes the inbox's files and adds
    a file per shelf. Shelved rows all predate the inbox's (``_seq`` is a clock), so the commit's
    predicate, "the inbox, or shelf rows from the inbox's first ``_seq`` on", matches no shelved row
    and rewrites no shelf: the shelves' ``_seq`` statistics prove it without reading them. A shelf
    file they cannot vouch for (written before those statistics; a clock set back) is rewritten
    with the rows moved to it. Returns the rows moved."""

    def attempt(dt) -> int:
        rows = _scan(dt, [INBOX])
        if rows.is_empty():
            return 0
        moved = rows.with_columns(_shelf_of(rows["image_id"]))
        shelves = moved[_BUCKET].unique().sort().to_list()
        s0 = int(rows[_SEQ].min())
        held = _files(dt).filter(pl.col(_BUCKET).is_in(shelves))
        stale = held.filter(pl.col("max_seq").is_null() | (pl.col("max_seq") >= s0))[_BUCKET].unique().to_list()
        if stale:
            moved = pl.concat([_scan(dt, stale), moved], how="vertical")
        predicate = (f"{_BUCKET} IN ({_in_list([INBOX, *stale])}) OR "
                     f"({_BUCKET} IN ({_in_list(shelves)}) AND {_SEQ} >= {s0})")
        _write_frame(ws, moved, mode="overwrite", predicate=predicate, note=f"shelve {rows.height}",
                     retries=1, maintenance=False, dt=dt)
        return rows.height

    return _optimistic(ws, attempt)


def _drain_shelves(ws: Workspace, *, at_least: int) -> int:
    """Move the rows of shelves holding at least ``at_least`` to their leaves, in commits that each
    rewrite leaves of about SPLIT_BATCH_ROWS rows in all (memory stays bounded: when ids are
    uniform, every shelf fills at once). Returns the rows moved."""
    leaves = _leaves(_locked_table(ws))
    shelves = leaves.filter(_on_shelf() & (pl.col("rows") >= at_least))
    if shelves.is_empty():
        return 0
    # A shelf's cost is its bucket's leaves' rows and its own.
    bucket_rows = (leaves.filter(~_in_inbox()).group_by(pl.col(_BUCKET).str.slice(0, BUCKET_CHARS).alias("b"))
                   .agg(pl.col("rows").sum().alias("leaf_rows")))
    plan = (shelves.with_columns(pl.col(_BUCKET).str.slice(len(INBOX)).alias("b"))
            .join(bucket_rows, on="b", how="left")
            .with_columns(((pl.col("rows") + pl.col("leaf_rows").fill_null(0)).cum_sum() // SPLIT_BATCH_ROWS).alias("batch")))
    for _, part in plan.group_by("batch", maintain_order=True):
        _rewrite(ws, _no_updates(), _no_updates(), drain=set(part[_BUCKET].to_list()),
                 note=f"drain {part.height} shelves", maintenance=False)
    return int(shelves["rows"].sum())


def _optimistic(ws: Workspace, attempt: Callable) -> int:
    """``attempt(dt)``, a read-modify-write committing on the snapshot ``dt`` it is given, under the
    lock: a conflicting commit from outside it makes it start again on a fresh snapshot, never a
    stale frame committed."""
    return _committed(lambda: attempt(_locked_table(ws)))


def version(ws: Workspace) -> int | None:
    """The catalog's current version (each commit adds one), or None before the first commit."""
    return _open(ws).version() if _prepare(ws) else None


def _open_version(ws: Workspace, version: int | None):
    try:
        return _open(ws, version)
    except Exception as exc:  # deltalake raises a bare Exception/TableNotFoundError for a missing version
        latest = _open(ws).version()
        if version is not None and 0 <= version < latest:  # its log entries are cleaned up
            raise _gone(version) from exc
        raise CatalogVersionError(f"catalog version {version} does not exist (latest is {latest})") from exc


def _gone(version: int | None) -> CatalogVersionError:
    return CatalogVersionError(f"catalog version {version} is older than the kept history ({RETENTION_HOURS} h; "
                               "the versions published datasets read are kept)")


def _scan_version(dt, version: int | None, leaves: list[str] | None = None) -> pl.DataFrame:
    try:
        return _scan(dt, leaves)
    except (OSError, pl.exceptions.ComputeError) as exc:  # vacuumed: the version's files are gone
        if not isinstance(exc, OSError) and "No such file" not in str(exc) and "not found" not in str(exc).lower():
            raise
        raise _gone(version) from exc


def read(ws: Workspace, version: int | None = None) -> pl.DataFrame:
    """The catalog (at ``version``, default the latest), or an empty one with the base schema."""
    if not _prepare(ws):
        if version is not None:
            raise CatalogVersionError(f"no catalog in {ws.root}: version {version} does not exist")
        return empty()
    return ensure_columns(_visible(_scan_version(_open_version(ws, version), version)), SCHEMA)


def ids(ws: Workspace) -> pl.Series:
    """The catalog's image_ids, reading that column only."""
    if not _prepare(ws):
        return pl.Series("image_id", [], pl.Utf8)
    return pl.scan_delta(_table(ws)).select("image_id").unique().collect()["image_id"]


def partitions(ws: Workspace) -> list[str]:
    """Keys of the table's partitions, for partition-wise work (one task per key): opaque strings,
    each with ``read_partition``. Every row belongs to exactly one, wherever the layout keeps it
    (a key is a bucket, the first two hex digits of image_id, whatever leaves it is split in)."""
    return [f"{i:0{BUCKET_CHARS}x}" for i in range(16 ** BUCKET_CHARS)] if _prepare(ws) else []


def read_partition(ws: Workspace, key: str, version: int | None = None) -> pl.DataFrame:
    """The rows of partition ``key`` (see ``partitions``) at ``version``: only its leaves' files
    are read, its shelf, and the inbox's rows that belong to it."""
    if not _prepare(ws):
        return empty()
    dt = _open_version(ws, version)
    leaves = [k for k in _leaf_keys(_leaves(dt)) if k.startswith(key)]
    df = _scan_version(dt, version, [*leaves, INBOX, INBOX + key]).filter(pl.col("image_id").str.starts_with(key))
    return ensure_columns(_visible(df), SCHEMA)


def ensure_columns(df: pl.DataFrame, columns: Mapping[str, pl.DataType]) -> pl.DataFrame:
    """Add missing columns as nulls of the given types (stages declare theirs this way)."""
    missing = [pl.lit(None, dtype=t).alias(c) for c, t in columns.items() if c not in df.columns]
    return df.with_columns(missing) if missing else df


def append(ws: Workspace, rows: pl.DataFrame) -> int:
    """Commit new rows, without reading the catalog: cost is flat in its size, except that once
    every INBOX_MAX_ROWS small-append rows one append also shelves the inbox, and once the shelves
    are full drains them to the leaves (a rewrite of most leaves: amortised, it is what a scrape
    pays for proportional merges).

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
        dt = _locked_table(ws) if _prepare(ws) else None
        frame = rows if dt is not None else ensure_columns(rows, SCHEMA)
        frame = _storable(frame, _table_schema(ws, dt) if dt is not None else dict(SCHEMA))
        inbox = rows.height <= INBOX_MAX_ROWS
        # A big append goes to the leaves as extra files (no rewrite); maintenance splits them.
        keys = None if inbox or dt is None else _leaf_keys(_leaves(dt))
        dt = _write_frame(ws, _with_hidden(frame, _next_seq(ws), inbox=inbox, keys=keys), mode="append",
                          note=f"append {rows.height}", dt=dt)
        if inbox and _inbox_size(dt) >= INBOX_MAX_ROWS:  # keep what a merge may have to rewrite small
            _drain_inbox(ws, full_only=True)
    return rows.height


def merge(ws: Workspace, updates: pl.DataFrame, columns: Iterable[str] | None = None, *,
          declare: Mapping[str, pl.DataType] | None = None) -> int:
    """Set ``columns`` (default: all of ``updates``' but image_id) for the image_ids ``updates`` lists,
    in one commit that rewrites only the leaves holding them (at most LEAF_MAX_ROWS rows each, the
    inbox when it holds one of them). New columns join the schema, and so do the columns of
    ``declare`` (a stage's, with their types) the table lacks, null where not set: no other leaf is
    rewritten for them. Ids the catalog lacks are ignored. Returns the rows matched."""
    cols = [c for c in (columns if columns is not None else updates.columns) if c != "image_id"]
    if updates.is_empty() or not cols:
        return 0
    updates = updates.select(["image_id", *cols]).unique("image_id", keep="last")
    with locked(ws):
        if not _prepare(ws):
            return 0
        return _rewrite(ws, updates, pl.DataFrame(schema=updates.schema).clear(), note=f"merge {updates.height}",
                        declare=declare)


def _rewrite(ws: Workspace, updates: pl.DataFrame, new: pl.DataFrame, *, note: str, drain: set[str] | None = None,
             extra: Iterable[str] = (), maintenance: bool = True, declare: Mapping[str, pl.DataType] | None = None) -> int:
    """Replace the leaves that ``updates`` and ``new`` touch (and ``extra``; with ``drain``, a set of
    shelves, those shelves and the leaves their rows move to) by their updated contents plus the
    new rows, splitting those grown past LEAF_MAX_ROWS, in one commit. Called under the lock (see
    ``_optimistic``). Returns the rows of ``updates`` matched."""

    def attempt(dt) -> int:
        leaves = _leaves(dt)
        keys = _leaf_keys(leaves)
        # The inbox and shelves that hold a row of the update (only those are rewritten: rewriting
        # one costs what it holds); found from the ids of the inbox and the update's shelves alone.
        if drain:
            hit = set(drain)
        elif updates.is_empty():
            hit = set()
        else:
            parts = set(leaves[_BUCKET].to_list()) & {INBOX, *_shelf_of(updates["image_id"]).unique().to_list()}
            hit = set(pl.scan_delta(dt).filter(pl.col(_BUCKET).is_in(sorted(parts)))
                      .filter(pl.col("image_id").is_in(updates["image_id"].implode()))
                      .select(_BUCKET).unique().collect()[_BUCKET].to_list()) if parts else set()
        ids = pl.concat([updates["image_id"], new["image_id"]])
        if drain:
            ids = pl.concat([ids, pl.scan_delta(dt).filter(pl.col(_BUCKET).is_in(sorted(drain)))
                             .select("image_id").collect()["image_id"]])
        touched = set(_leaf_of(ids, keys).to_list()) | set(extra)
        existing = sorted(touched & set(keys))
        if hit and not drain and existing:
            # Rows of the update in the inbox or a shelf: their future leaves stay as they are unless
            # one holds an earlier copy of one (a raced-in append: that copy is the row). A merge of
            # freshly appended rows rewrites the inbox, not a leaf per row.
            held = (pl.scan_delta(dt).filter(pl.col(_BUCKET).is_in(existing)).select(_BUCKET, "image_id")
                    .filter(pl.col("image_id").is_in(updates["image_id"].implode())).collect())
            needed = set(held[_BUCKET].to_list()) | set(_leaf_of(new["image_id"], keys).to_list()) | set(extra)
            existing = [k for k in existing if k in needed]
        cur = _first_rows(_scan(dt, [*existing, *sorted(hit)]), ordered=False)  # drops raced-in copies
        matched = cur.filter(pl.col("image_id").is_in(updates["image_id"].implode())).height
        schema = dict(cur.schema)
        out = update(cur, _storable(updates, schema))
        if not new.is_empty():
            out = ensure_columns(out, dict(new.schema))
            fresh = _with_hidden(_storable(ensure_columns(new, dict(out.schema)), schema), _next_seq(ws), keys=keys)
            out = pl.concat([out, fresh.select(out.columns).cast(dict(out.schema))], how="vertical")
        if declare:
            out = ensure_columns(out, declare)
        if drain:
            move = pl.col(_BUCKET).is_in(sorted(drain))
            moved = out.filter(move)
            out = pl.concat([out.filter(~move), moved.with_columns(_leaf_of(moved["image_id"], keys))], how="vertical")
        out = _split(out)
        rewritten = set(existing) | set(out[_BUCKET].unique().to_list()) | hit
        _write_frame(ws, out, mode="overwrite", predicate=f"{_BUCKET} IN ({_in_list(rewritten)})", note=note,
                     retries=1, maintenance=maintenance and not drain, dt=dt)
        return matched

    return _optimistic(ws, attempt)


def write(ws: Workspace, df: pl.DataFrame) -> None:
    """Commit ``df`` as the catalog: new image_ids are appended, changed rows merged, in one commit.

    Rows are never deleted: a frame that lacks rows the catalog has is refused (ValueError), and
    columns it lacks keep their values. The cost is that of the diff (reading the catalog) plus
    the leaves it changes; stages that know what changed call ``append``/``merge``.
    """
    _check_ids(df)
    with locked(ws):
        if not _prepare(ws):
            _write_frame(ws, _split(_with_hidden(_storable(df, {}), _next_seq(ws))), mode="append", note=f"write {df.height}")
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
            append(ws, new)
            return
        _rewrite(ws, changed, new, note=f"write +{new.height} ~{changed.height}")


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


def changes(df: pl.DataFrame, *updates: pl.DataFrame) -> pl.DataFrame:
    """What ``update``-ing ``df`` with each of ``updates`` in turn changes, as a frame for ``merge``:
    the rows they list, the columns they set, with ``df``'s types (a stage's declared columns)."""
    out = df
    for u in updates:
        out = update(out, u)
    ids = pl.concat([u["image_id"] for u in updates]).unique() if updates else pl.Series("image_id", [], pl.Utf8)
    cols = list(dict.fromkeys(c for u in updates for c in u.columns if c != "image_id"))
    return out.filter(pl.col("image_id").is_in(ids.implode())).select(["image_id", *cols])


# ---------------------------------------------------------------- sightings
# Every time an image was found: an append-only Delta table (WORKDIR/sightings/), one commit per
# record (a file), compacted every COMPACT_EVERY versions. ``_seq`` keeps the order of records.
# Workspaces from before keep their parquet parts, moved aside to sightings.parts.migrated/.


def _sightings_schema() -> dict[str, pl.DataType]:
    return {c: SCHEMA[c] for c in SIGHTING_COLUMNS}


def _sightings_migrated(ws: Workspace) -> Path:
    return ws.root / "sightings.parts.migrated"


def _sightings_exist(ws: Workspace) -> bool:
    from deltalake import DeltaTable

    return ws.sightings_dir.is_dir() and DeltaTable.is_deltatable(str(ws.sightings_dir))


_OLD_PART = re.compile(r"part-\d{20}-[0-9a-f]{8}\.parquet")  # PartsTable's names (Delta's differ)


def _old_parts(d: Path) -> bool:
    return d.is_dir() and any(_OLD_PART.fullmatch(p.name) for p in d.iterdir())


def _prepare_sightings(ws: Workspace) -> bool:
    """Convert loose parquet parts (the layout before the Delta table) once; whether a table exists.
    The parts' directory is renamed aside first, then its rows committed: a crash in between
    converts from the renamed directory next time."""
    d, moved = ws.sightings_dir, _sightings_migrated(ws)
    if _sightings_exist(ws):
        return True
    if not _old_parts(d) and not moved.is_dir():
        return False
    with locked(ws):
        if _sightings_exist(ws):
            return True
        if _old_parts(d):
            if moved.exists():
                raise JurassiclassError(f"cannot migrate sightings: both {d} and {moved} hold parquet parts")
            os.replace(d, moved)
            fsync_dir(ws.root)
        if not moved.is_dir():
            return False
        old = PartsTable(moved, _sightings_schema()).read()
        _append_sightings(ws, ensure_columns(old, _sightings_schema()).select(SIGHTING_COLUMNS), note="migrate parts")
        return True


def _append_sightings(ws: Workspace, rows: pl.DataFrame, *, note: str) -> None:
    from deltalake import CommitProperties, DeltaTable

    rows = _storable(rows, _sightings_schema()).with_columns(
        (pl.int_range(pl.len(), dtype=pl.Int64) + time.time_ns()).alias(_SEQ))
    opts = {"writer_properties": _writer_properties(),
            "commit_properties": CommitProperties(custom_metadata={"jurassiclass": note})}
    _committed(lambda: rows.write_delta(str(ws.sightings_dir), mode="append", delta_write_options=opts))
    v = DeltaTable(str(ws.sightings_dir)).version()
    _sync(ws.sightings_dir, v)
    if v and v % COMPACT_EVERY == 0:
        _tidy(ws.sightings_dir, RETENTION_HOURS)


def record_sightings(ws: Workspace, rows: pl.DataFrame) -> None:
    """Append where/under which label images were found: the same bytes found twice both count."""
    if rows.is_empty():
        return
    rows = ensure_columns(rows, SCHEMA).select(SIGHTING_COLUMNS)
    with locked(ws):
        _prepare_sightings(ws)
        _append_sightings(ws, rows, note=f"sightings {rows.height}")


def read_sightings(ws: Workspace) -> pl.DataFrame:
    """Every sighting, in the order they were recorded."""
    if not _prepare_sightings(ws):
        return pl.DataFrame(schema=_sightings_schema())
    df = pl.scan_delta(str(ws.sightings_dir)).collect()
    return ensure_columns(df.sort(_SEQ).drop(_SEQ), _sightings_schema()).select(SIGHTING_COLUMNS)


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
