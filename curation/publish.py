"""Catalog in, a versioned Hugging Face dataset folder out (and, when asked, pushed to the Hub).

What is published: ``accepted`` images (plus unreviewed ``candidate`` ones with
``publish.include: candidates``) whose licence the manifest allows (``licenses.publish_refusal``:
the allow-list, non-commercial only for a non-commercial dataset, never a re-encoded ND image).
Everything left out is counted by reason in the card and ``publish.json``.

The folder (``WORKDIR/published/v<N>/``, or ``--out``):

    README.md                   dataset card: YAML metadata (configs, dataset_info, licence), counts,
                                sources, licences, curation steps with their settings, limitations
    data/<split>-NNNNN-of-MMMMM.parquet   image bytes embedded (the stored bytes, byte for byte),
                                `label` a ClassLabel in manifest order, provenance columns, `fold`
    attribution.csv             author, licence and source of every image that needs attribution
    plots/*.png                 class balance per split, CLIP score histograms
    publish.json                version, content hash, counts, settings, the catalog rows read

Splits are group-aware, stratified and stable across versions (``curation.splits``). A version is
a content hash over image ids, labels, splits and folds: publishing unchanged data writes nothing,
a change makes version N+1 with a diff against N. History: ``WORKDIR/published/history.jsonl``
and ``published/index/v<N>.parquet`` (image_id, label, split, fold, group). Writes go to a temp
folder renamed into place, so a killed publish leaves no half version.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import polars as pl

from curation import catalog, splits
from curation.catalog import Status, Workspace
from curation.config import Manifest, PublishInclude
from curation.errors import JurassiclassError
from curation.licenses import publish_refusal

# Catalog columns this stage writes: where each image went in the latest version that held it.
COLUMNS: dict[str, pl.DataType] = {"split": pl.Utf8, "fold": pl.Int32, "published_version": pl.Int32,
                                   "publish_note": pl.Utf8}  # why the latest version left the image out
# Upstream columns published as provenance when present (nulls otherwise).
_UPSTREAM: dict[str, pl.DataType] = {
    "dup_group": pl.Utf8, "label_conflict": pl.Boolean, "clip_score": pl.Float64, "clip_margin": pl.Float64,
    "clip_real_margin": pl.Float64, "clip_top_label": pl.Utf8, "clip_decision": pl.Utf8, "clip_model": pl.Utf8,
    "review_decision": pl.Utf8, "reviewer_label": pl.Utf8, "pre_review_label": pl.Utf8,
}
# Published columns besides image and label, in order, with their dataset dtypes.
PROVENANCE: dict[str, str] = {
    "image_id": "string", "fold": "int32", "group": "string", "reviewed": "bool", "review_decision": "string",
    "source": "string", "query": "string", "source_url": "string", "page_url": "string", "license": "string",
    "author": "string", "retrieved_at": "string", "width": "int32", "height": "int32", "format": "string",
    "dup_group": "string", "clip_score": "float64", "clip_margin": "float64", "clip_real_margin": "float64",
    "clip_top_label": "string", "clip_decision": "string",
}
_ROW_GROUP = 100  # images per parquet row group: what the Hub's viewer and `datasets` stream well


class PublishError(JurassiclassError, RuntimeError):
    """A dataset that cannot be published as asked (nothing to publish, an empty split, a bad push)."""


class NothingToPublish(PublishError):
    """No catalog image qualifies yet (e.g. nothing reviewed): a state, not a failure, for `run`."""


@dataclass
class PublishSummary:
    version: int
    changed: bool  # a new version was written (False: unchanged data, or a dry run)
    hash: str
    folder: str | None
    images: int
    per_split: dict[str, int]
    per_class: list[dict]
    left_out: dict[str, int]
    warnings: list[str] = field(default_factory=list)
    diff: dict[str, int] = field(default_factory=dict)
    files: list[dict] = field(default_factory=list)  # what the folder holds (name, bytes)
    pushed: dict | None = None
    dry_run: bool = False
    seconds: float = 0.0
    skipped: str | None = None  # why nothing was published (no qualifying image yet)
    catalog_version: int | None = None  # the catalog version the rows were read from

    def line(self) -> str:
        if self.skipped:
            return f"publish: skipped, {self.skipped}"
        split = ", ".join(f"{k} {v}" for k, v in self.per_split.items())
        left = sum(self.left_out.values())
        if self.dry_run:
            what = f"dry run: would publish v{self.version}" if self.changed else f"dry run: unchanged (v{self.version})"
        else:
            what = f"v{self.version} published" if self.changed else f"unchanged, still v{self.version}"
        diff = ""
        if self.changed and self.diff:
            diff = "; vs previous: " + ", ".join(f"{v} {k}" for k, v in self.diff.items() if v)
        push = f"; pushed to {self.pushed['repo_id']}@{self.pushed['tag']}" if self.pushed else ""
        return f"publish: {what}: {self.images} images ({split}), {left} left out{diff}{push} ({self.seconds:.1f}s)"


# ---------------------------------------------------------------- history


def published_root(ws: Workspace) -> Path:
    return ws.root / "published"


def history(ws: Workspace) -> list[dict]:
    """Every published version, oldest first (one JSON object per line of history.jsonl)."""
    p = published_root(ws) / "history.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def latest(ws: Workspace) -> dict | None:
    h = history(ws)
    return h[-1] if h else None


def _append_history(ws: Workspace, entry: dict) -> None:
    p = published_root(ws) / "history.jsonl"
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _rewrite_history(ws: Workspace, entries: list[dict]) -> None:
    from curation.store import atomic_write_bytes

    atomic_write_bytes(published_root(ws) / "history.jsonl",
                       "".join(json.dumps(e, default=str) + "\n" for e in entries).encode())


def _index_path(ws: Workspace, version: int) -> Path:
    return published_root(ws) / "index" / f"v{version}.parquet"


# ---------------------------------------------------------------- selection and splits


def select(m: Manifest, df: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(rows to publish, rows left out with a `publish_reason`) from the catalog."""
    df = catalog.ensure_columns(df, {**_UPSTREAM, **COLUMNS})
    statuses = [Status.accepted.value]
    if m.publish.include is PublishInclude.candidates:
        statuses.append(Status.candidate.value)
    allowed = frozenset(m.publish.licenses)
    classes = set(m.class_names)
    reasons: list[str | None] = []
    for st, reason, label, path, lic, src_sha, iid in df.select(
        "status", "reason", "label", "path", "license", "source_sha256", "image_id"
    ).iter_rows():
        if st == Status.rejected.value:
            reasons.append(f"rejected:{reason or 'unknown'}")
        elif st not in statuses:
            reasons.append("not_reviewed")
        elif path is None:
            reasons.append("no_image")
        elif label not in classes:
            reasons.append("label_not_in_manifest")
        else:
            reasons.append(publish_refusal(lic, allowed=allowed, non_commercial=m.publish.non_commercial,
                                           re_encoded=src_sha is not None and src_sha != iid))
    df = df.with_columns(pl.Series("publish_reason", reasons, dtype=pl.Utf8))
    return df.filter(pl.col("publish_reason").is_null()).drop("publish_reason"), df.filter(pl.col("publish_reason").is_not_null())


def _assignment_settings(m: Manifest) -> dict:
    return {"splits": m.publish.splits.as_dict(), "folds": m.publish.folds, "seed": m.publish.seed}


def assign_splits(m: Manifest, rows: pl.DataFrame, prev: dict | None) -> tuple[pl.DataFrame, list[str]]:
    """Add `group`, `split` and `fold` to the rows; prior assignments (catalog columns) are kept
    when the previous version used the same split settings."""
    rows = rows.with_columns(pl.coalesce("dup_group", "image_id").alias("group"))
    same = prev is not None and prev.get("assignment") == _assignment_settings(m)
    prior = rows["split"].to_list() if same else [None] * rows.height
    # A near copy of a published test image (dedup's `leak_of`) goes to test with its group,
    # never to train: kept rather than dropped, so a copy that replaced its original as the
    # group's representative still holds that picture's place in test.
    if "leak_of" in rows.columns:
        prior = ["test" if leak is not None else p for p, leak in zip(prior, rows["leak_of"].to_list())]
    a = splits.assign(
        rows["label"].to_list(), rows["group"].to_list(),
        sizes=m.publish.splits.as_dict(), folds=m.publish.folds, seed=m.publish.seed,
        prior_split=prior,
        prior_fold=rows["fold"].to_list() if same else None,
        class_order=m.class_names,
    )
    g = rows["group"].to_list()
    rows = rows.with_columns(
        pl.Series("split", [a.split[x] for x in g], dtype=pl.Utf8),
        pl.Series("fold", [a.fold[x] for x in g], dtype=pl.Int32),
    )
    warnings = list(a.warnings)
    for s, frac in m.publish.splits.as_dict().items():
        if frac > 0 and rows.filter(pl.col("split") == s).is_empty():
            raise PublishError(f"the {s} split would be empty ({rows.height} images to publish): "
                               f"add images or set publish.splits.{s} to 0")
    return rows, warnings


def content_hash(rows: pl.DataFrame, class_names: list[str]) -> str:
    """sha256 over the class list and the sorted (image_id, label, split, fold) of every row."""
    h = hashlib.sha256(("\x1f".join(class_names) + "\n").encode())
    for iid, label, split, fold in rows.select("image_id", "label", "split", "fold").sort("image_id").iter_rows():
        h.update(f"{iid}\t{label}\t{split}\t{fold}\n".encode())
    return h.hexdigest()


def diff(prev_index: pl.DataFrame | None, rows: pl.DataFrame) -> dict[str, int]:
    """Images added, removed, relabelled and moved between splits since the previous version."""
    if prev_index is None:
        return {"added": rows.height, "removed": 0, "relabelled": 0, "moved": 0}
    j = prev_index.select("image_id", pl.col("label").alias("old_label"), pl.col("split").alias("old_split")).join(
        rows.select("image_id", "label", "split"), on="image_id", how="full", coalesce=True)
    return {
        "added": j.filter(pl.col("old_label").is_null()).height,
        "removed": j.filter(pl.col("label").is_null()).height,
        "relabelled": j.filter(pl.col("old_label").is_not_null() & pl.col("label").is_not_null()
                               & (pl.col("old_label") != pl.col("label"))).height,
        "moved": j.filter(pl.col("old_split").is_not_null() & pl.col("split").is_not_null()
                          & (pl.col("old_split") != pl.col("split"))).height,
    }


# ---------------------------------------------------------------- the folder


def features(class_names: list[str]):
    """The dataset's `datasets.Features`: image, label (ClassLabel in manifest order), provenance."""
    import datasets

    return datasets.Features({
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=list(class_names)),
        **{k: datasets.Value(v) for k, v in PROVENANCE.items()},
    })


def _table(rows: pl.DataFrame, ws: Workspace, class_index: dict[str, int], schema) -> "Any":
    import pyarrow as pa

    images = []
    for iid, path in rows.select("image_id", "path").iter_rows():
        images.append({"bytes": ws.abspath(path).read_bytes(), "path": f"{iid}{Path(path).suffix}"})
    cols: dict[str, Any] = {"image": images, "label": [class_index[x] for x in rows["label"]]}
    for k in PROVENANCE:
        cols[k] = rows[k].to_list()
    return pa.Table.from_pydict(cols, schema=schema)


def _leaf_names(schema) -> list[str]:
    """Parquet column paths (nested fields dotted: image.bytes), as per-column options name them."""
    out = []
    for f in schema:
        out += [f"{f.name}.{c.name}" for c in f.type] if hasattr(f.type, "num_fields") and f.type.num_fields else [f.name]
    return out


def _write_split(rows: pl.DataFrame, ws: Workspace, split: str, data_dir: Path, class_index: dict[str, int],
                 schema, shard_bytes: int, tick: Callable[[int], None]) -> list[Path]:
    """Stream one split into parquet shards of about `shard_bytes` of images; memory stays at
    one row group whatever the dataset size."""
    import pyarrow.parquet as pq

    parts: list[Path] = []
    writer = None
    written = 0
    # JPEG/PNG/WEBP bytes are compressed already: compressing them again costs time and saves nothing.
    compression = {name: ("NONE" if name.startswith("image") else "ZSTD") for name in _leaf_names(schema)}
    sizes = rows["_bytes"].to_list()
    start = 0
    while start < rows.height:
        if writer is None:
            parts.append(data_dir / f".{split}-{len(parts):05d}.tmp")
            writer = pq.ParquetWriter(parts[-1], schema, compression=compression, use_dictionary=False,
                                      write_statistics=False)
            written = 0
        # A row group ends at _ROW_GROUP images or where the shard reaches its size (one image at least).
        end, batch = start, 0
        while end < rows.height and end - start < _ROW_GROUP and (end == start or written + batch < shard_bytes):
            batch += sizes[end]
            end += 1
        writer.write_table(_table(rows.slice(start, end - start), ws, class_index, schema), row_group_size=_ROW_GROUP)
        written += batch
        tick(end - start)
        start = end
        if written >= shard_bytes:
            writer.close()
            writer = None
    if writer is not None:
        writer.close()
    final = []
    for i, p in enumerate(parts):
        q = data_dir / f"{split}-{i:05d}-of-{len(parts):05d}.parquet"
        os.replace(p, q)
        final.append(q)
    return final


def _size_category(n: int) -> str:
    for lim, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                      (10_000_000, "1M<n<10M")):
        if n < lim:
            return name
    return "10M<n<100M"


def write_folder(m: Manifest, ws: Workspace, rows: pl.DataFrame, folder: Path, *, version: int, digest: str,
                 left_out: dict[str, int], warnings: list[str], diff_counts: dict[str, int],
                 catalog_version: int | None = None, show_progress: bool = True) -> list[dict]:
    """Write the dataset folder (shards, card, attribution, plots, publish.json); returns its files."""
    from curation import card, progress

    feats = features(m.class_names)
    schema = feats.arrow_schema
    class_index = {c: i for i, c in enumerate(m.class_names)}
    data_dir = folder / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    shard_bytes = int(m.publish.shard_size_mb * 1_000_000)
    rows = rows.with_columns(
        pl.col("path").map_elements(lambda p: ws.abspath(p).stat().st_size, return_dtype=pl.Int64).alias("_bytes"),
        pl.col("review_decision").is_not_null().alias("reviewed"),
        pl.col("retrieved_at").dt.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").alias("retrieved_at"),
    )
    shards: dict[str, list[Path]] = {}
    bar = progress.track(range(rows.height), total=rows.height, description="publish: writing shards", show=show_progress)
    it = iter(bar)

    def tick(n: int) -> None:
        for _ in range(n):
            next(it, None)

    for s in splits.SPLITS:
        part = rows.filter(pl.col("split") == s).sort("label", "image_id")
        if part.height:
            shards[s] = _write_split(part, ws, s, data_dir, class_index, schema, shard_bytes, tick)
    for _ in it:  # finish the bar (and its observer) even when the loop above was exact
        pass
    card.write(m, ws, rows, folder, version=version, digest=digest, shards=shards, features=feats,
               left_out=left_out, warnings=warnings, diff_counts=diff_counts, catalog_version=catalog_version)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return [{"path": str(p.relative_to(folder)), "bytes": p.stat().st_size} for p in files]


# ---------------------------------------------------------------- the stage


def _catalog_read(ws: Workspace, version: int | None = None) -> pl.DataFrame:
    return catalog.ensure_columns(catalog.read(ws, version=version), {**_UPSTREAM, **COLUMNS})


def publish(m: Manifest, ws: Workspace, *, out: str | Path | None = None, dry_run: bool = False,
            show_progress: bool = True) -> PublishSummary:
    """Publish the catalog as the next dataset version, or nothing when it has not changed."""
    t0 = time.monotonic()
    catalog_version = catalog.version(ws)  # read that version, not "latest": a stage may commit meanwhile
    df = _catalog_read(ws, catalog_version)
    rows, dropped = select(m, df)
    left_out = dict(dropped.group_by("publish_reason").len().sort("publish_reason").iter_rows())
    if rows.is_empty():
        raise NothingToPublish(
            f"nothing to publish: 0 of {df.height} catalog images are {m.publish.include.value} with an allowed licence"
            + (f" (left out: {', '.join(f'{k} {v}' for k, v in left_out.items())})" if left_out else "")
            + ("; review images first, or set publish.include: candidates" if m.publish.include is PublishInclude.accepted else "")
        )
    prev = latest(ws)
    rows, warnings = assign_splits(m, rows, prev)
    digest = content_hash(rows, m.class_names)
    per_split = {s: rows.filter(pl.col("split") == s).height for s in splits.SPLITS}
    from curation.card import per_class_split

    per_class = per_class_split(m, rows)
    prev_index = pl.read_parquet(_index_path(ws, prev["version"])) if prev and _index_path(ws, prev["version"]).exists() else None
    summary = PublishSummary(
        version=prev["version"] if prev else 0, changed=False, hash=digest, folder=prev.get("folder") if prev else None,
        images=rows.height, per_split=per_split, per_class=per_class.to_dicts(), left_out=left_out, warnings=warnings,
        diff=diff(prev_index, rows), dry_run=dry_run, catalog_version=catalog_version,
    )
    if prev is not None and prev["hash"] == digest and (dry_run or Path(prev["folder"]).exists()):
        summary.seconds = time.monotonic() - t0
        return summary
    version = (prev["version"] if prev else 0) + 1
    folder = Path(out).resolve() if out else published_root(ws) / f"v{version}"
    if out and folder.exists() and any(folder.iterdir()):
        # Never delete what the user keeps there; only the workspace's own version folders are replaced.
        raise PublishError(f"--out {folder} exists and is not empty: name a new folder")
    summary.version, summary.changed = version, True
    # Beside its final place, so the rename is atomic; a dry run writes only to the system temp dir.
    tmp = (Path(tempfile.mkdtemp(prefix="jurassiclass-publish-")) / folder.name if dry_run
           else folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"))
    try:
        summary.files = write_folder(m, ws, rows, tmp, version=version, digest=digest, left_out=left_out,
                                     warnings=warnings, diff_counts=summary.diff, catalog_version=catalog_version,
                                     show_progress=show_progress)
        if dry_run:
            summary.seconds = time.monotonic() - t0
            return summary
        if folder.exists():  # an empty --out folder, or a version folder no history line names (a killed publish)
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if dry_run:
            shutil.rmtree(tmp.parent, ignore_errors=True)
    summary.folder = str(folder)
    # What the card names stays readable: `jurassiclass catalog --version N` however old it gets.
    catalog.pin(ws, catalog_version, f"published v{version}")

    index = rows.select("image_id", "label", "split", "fold", "group")
    _index_path(ws, version).parent.mkdir(parents=True, exist_ok=True)
    index.write_parquet(_index_path(ws, version))
    with catalog.locked(ws):
        cat = catalog.ensure_columns(catalog.read(ws), COLUMNS)
        upd = rows.select("image_id", "split", "fold", pl.lit(version, dtype=pl.Int32).alias("published_version"),
                          pl.lit(None, dtype=pl.Utf8).alias("publish_note"))
        notes = dropped.select("image_id", pl.col("publish_reason").alias("publish_note"))
        catalog.merge(ws, catalog.changes(cat, upd, notes), declare=COLUMNS)
    _append_history(ws, {
        "version": version, "hash": digest, "folder": str(folder), "created_at": datetime.now(timezone.utc).isoformat(),
        "images": rows.height, "per_split": per_split, "left_out": left_out, "diff": summary.diff,
        "assignment": _assignment_settings(m), "catalog_rows": df.height, "catalog_version": catalog_version,
        "warnings": warnings, "pushes": [],
    })
    summary.seconds = time.monotonic() - t0
    return summary


def run(m: Manifest, ws: Workspace, *, show_progress: bool = True) -> PublishSummary:
    """The stage as a pipeline step: like ``publish``, but "nothing qualifies yet" (e.g. no image
    reviewed) is a summary with ``skipped`` set rather than an error."""
    try:
        return publish(m, ws, show_progress=show_progress)
    except NothingToPublish as exc:
        prev = latest(ws)
        return PublishSummary(version=prev["version"] if prev else 0, changed=False, hash=prev["hash"] if prev else "",
                              folder=prev["folder"] if prev else None, images=0, per_split={}, per_class=[],
                              left_out={}, skipped=str(exc))


# ---------------------------------------------------------------- the Hub


def with_retries(fn: Callable[[], Any], *, attempts: int = 4, first_delay: float = 2.0, what: str = "") -> Any:
    """Call ``fn``, retrying network failures and 5xx/429 answers with exponential back-off."""
    from huggingface_hub.errors import HfHubHTTPError

    delay = first_delay
    for i in range(attempts):
        try:
            return fn()
        except HfHubHTTPError as exc:
            status = getattr(exc.response, "status_code", None)
            if status is not None and status < 500 and status != 429 or i == attempts - 1:
                raise
        except OSError:  # connection refused/reset, timeouts (httpx errors subclass neither: see below)
            if i == attempts - 1:
                raise
        except Exception as exc:  # httpx transport errors
            if type(exc).__module__.split(".")[0] != "httpx" or i == attempts - 1:
                raise
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


def push(m: Manifest, ws: Workspace, *, repo_id: str | None = None, revision: str | None = None,
         token: str | None = None, version: int | None = None, dry_run: bool = False, force: bool = False,
         retry_delay: float = 2.0) -> dict:
    """Upload a published version's folder to a Hub dataset repo: create the repo if needed, one
    commit per version (files of earlier versions that are gone are deleted), a tag ``v<N>``.

    Re-running after a failure finishes the job (uploaded files are not sent again, an existing
    tag is kept); a version already pushed to the same repo and branch is not pushed again
    unless ``force``. The token comes from ``token``, else ``$HF_TOKEN``; it is never printed or stored.
    """
    from huggingface_hub import HfApi

    repo_id = repo_id or m.publish.repo_id
    if not repo_id:
        raise PublishError("no Hub repo: pass --push ORG/NAME or set publish.repo_id in the manifest")
    revision = revision or m.publish.revision or "main"
    entries = history(ws)
    if not entries:
        raise PublishError("nothing published yet: run `jurassiclass publish` first")
    entry = next((e for e in entries if e["version"] == version), None) if version else entries[-1]
    if entry is None:
        raise PublishError(f"no published version {version} (have {[e['version'] for e in entries]})")
    folder = Path(entry["folder"])
    if not folder.is_dir():
        raise PublishError(f"the folder of version {entry['version']} is gone: {folder}")
    tag = f"v{entry['version']}"
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    result = {"repo_id": repo_id, "revision": revision, "tag": tag, "files": len(files),
              "bytes": sum((folder / f).stat().st_size for f in files)}
    if dry_run:
        return {**result, "dry_run": True, "file_list": files}
    done = [p for p in entry.get("pushes", []) if (p["repo_id"], p["revision"], p["tag"]) == (repo_id, revision, tag)]
    if done and not force:
        return {**done[-1], "already": True}
    token = token or os.environ.get("HF_TOKEN") or None
    api = HfApi(token=token)
    try:
        with_retries(lambda: api.create_repo(repo_id, repo_type="dataset", private=m.publish.private, exist_ok=True),
                     first_delay=retry_delay)
        if revision != "main":
            with_retries(lambda: api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True),
                         first_delay=retry_delay)
        commit = with_retries(lambda: api.upload_folder(
            repo_id=repo_id, repo_type="dataset", folder_path=str(folder), revision=revision,
            commit_message=f"{m.name} {tag} ({entry['images']} images, {entry['hash'][:12]})",
            # Shards of an earlier version that this one no longer has are removed in the same commit.
            delete_patterns=["data/*", "plots/*"],
        ), first_delay=retry_delay)
        oid = getattr(commit, "oid", None)
        with_retries(lambda: api.create_tag(repo_id, tag=tag, repo_type="dataset", revision=oid or revision,
                                            exist_ok=True), first_delay=retry_delay)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise PublishError(f"pushing {tag} to {repo_id}@{revision} failed: {first}; the local version is kept, "
                           "run the same command again to finish the push") from exc
    result.update(commit=oid, url=f"{api.endpoint}/datasets/{repo_id}/tree/{tag}")
    for e in entries:
        if e["version"] == entry["version"]:
            e.setdefault("pushes", []).append({**result, "at": datetime.now(timezone.utc).isoformat()})
    _rewrite_history(ws, entries)
    return result
