"""Catalog in, a persistent FiftyOne review dataset out (push); reviewers' tags and label edits back in (pull).

Review vocabulary (sample tags in the App, or any FiftyOne client):
  `accept`            the image is a good example of its label
  `reject`            the image must not be used (wins over a label correction)
  `relabel:<class>`   the image shows <class>; editing the `ground_truth` label does the same
A sample with none of these is not reviewed yet. Deleting a sample in the App is a decision too
(`deleted`: rejected with reason `reviewer_deleted`, never pushed again). Tags that read as no
single decision are left alone by `pull` and listed in the `unclear-decisions` view.

The human decision lives in the catalog columns `review_decision` (accept|reject|relabel),
`reviewer_label` and `reviewed_at`; `pull` sets `status` (accepted, or rejected with reason
`reviewer_rejected`) and `label` from them, and keeps what the pipeline had said in
`pre_review_status/_reason/_label` so that a decision taken back in the App restores it.
The dataset belongs to the workspace by an id kept inside it (`stages/review/workspace_id`), so a
moved workspace keeps its dataset (sample files are re-pointed) and another one cannot take it;
`forget` saves a dataset's decisions and deletes it (one an earlier, deleted workspace left);
`push` does it itself for such a dataset when it holds no decision.
`push` never writes tags and never overwrites a `ground_truth` a reviewer has edited, so
re-pushing after any upstream stage re-ran loses nothing; a dataset created afresh (new
database) gets its tags back from the catalog.

FiftyOne is imported lazily: it is heavy and reads its database settings at import time
(`FIFTYONE_DATABASE_URI` for a shared MongoDB, pinged first; unset: the bundled mongod, one user).
Writes go through FiftyOne's public API, except new samples' insert (`curation/fiftyone_bulk.py`).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import polars as pl

from curation import catalog, fiftyone_bulk
from curation.catalog import Status, Workspace
from curation.config import Manifest, ThresholdMode
from curation.errors import JurassiclassError
from curation.progress import track
from curation.store import atomic_write_bytes

if TYPE_CHECKING:  # pragma: no cover
    import fiftyone as fo

TAG_ACCEPT = "accept"
TAG_REJECT = "reject"
RELABEL_PREFIX = "relabel:"
_REVIEW_TAG_PATTERNS = [TAG_ACCEPT, TAG_REJECT, re.compile("^" + RELABEL_PREFIX)]
REJECT_REASON = "reviewer_rejected"
DELETED_REASON = "reviewer_deleted"


class Decision(str, Enum):
    accept = "accept"
    reject = "reject"
    relabel = "relabel"
    deleted = "deleted"  # the sample was deleted in the App: rejected, and never pushed again


# Written only by `pull`: no other stage may overwrite these.
REVIEW_COLUMNS: dict[str, pl.DataType] = {
    "review_decision": pl.Utf8,
    "reviewer_label": pl.Utf8,
    "reviewed_at": pl.Datetime("us", "UTC"),
    "pre_review_status": pl.Utf8,
    "pre_review_reason": pl.Utf8,
    "pre_review_label": pl.Utf8,
}

# Written by dedup and CLIP scoring when they ran; absent columns are pushed as empty fields.
UPSTREAM_COLUMNS: dict[str, pl.DataType] = {
    "dup_group": pl.Utf8,
    "dup_of": pl.Utf8,
    "label_conflict": pl.Boolean,
    "clip_score": pl.Float64,
    "clip_margin": pl.Float64,
    "clip_real_margin": pl.Float64,
    "clip_top_label": pl.Utf8,
    "clip_top_prob": pl.Float64,
    "clip_model": pl.Utf8,
    "clip_decision": pl.Utf8,
    # written by the training stage (models/label_issues.py): out-of-fold confident learning
    "label_issue": pl.Boolean,
    "oof_top_label": pl.Utf8,
    "oof_self_confidence": pl.Float64,
}

# Catalog column -> FiftyOne field, refreshed on every push (never tags, never ground_truth).
_COPIED = {
    "label": "pipeline_label",
    "status": "status",
    "reason": "reason",
    "source": "source",
    "query": "query",
    "license": "license",
    "author": "author",
    "source_url": "source_url",
    "page_url": "page_url",
    "width": "width",
    "height": "height",
    "dup_group": "dup_group",
    "dup_of": "dup_of",
    "clip_score": "clip_score",
    "clip_margin": "clip_margin",
    "clip_real_margin": "clip_real_margin",
    "clip_top_label": "clip_top_label",
    "clip_top_prob": "clip_top_prob",
    "clip_model": "clip_model",
    "clip_decision": "clip_decision",
    "label_issue": "label_issue",
    "oof_top_label": "oof_top_label",
    "oof_self_confidence": "oof_self_confidence",
    "review_decision": "review_decision",
    "reviewer_label": "reviewer_label",
}
_DERIVED = {"label_conflict": bool, "wrong_class": bool, "suggested_label": str, "score_gap": float}
_KEPT = {"kept", "keep", "pass", "passed", "ok"}

VIEWS = {
    "not-reviewed": "no accept/reject/relabel tag and ground_truth unchanged, lowest score first",
    "lowest-score-per-class": "every class, lowest CLIP score first",
    "suspected-wrong-label": "zero-shot CLIP prefers another class (likely_<class>), most confident first",
    "dup-label-conflicts": "duplicate groups whose members carry different labels, grouped",
    "borderline": "score within the borderline band of the threshold, closest first",
    "rescue-rejected": "rejected by the pipeline and not reviewed, best score first",
    "label-issues": "trained model's out-of-fold check doubts the label, most suspicious (lowest self-confidence) first",
    "unclear-decisions": "tags `review pull` could not read as one decision (accept and reject, unknown or "
                         "conflicting relabel class); left unchanged in the catalog until fixed",
    "duplicate-groups": "members of duplicate groups, group by group, each group's representative first",
}

# Why a view can be empty, appended to its description when it is.
_EMPTY_BECAUSE = {
    "not-reviewed": "every sample has a decision",
    "lowest-score-per-class": "no sample has a CLIP score (scoring skipped or not run)",
    "suspected-wrong-label": "CLIP prefers another class for no sample (or scoring did not run)",
    "dup-label-conflicts": "no duplicate group mixes labels",
    "borderline": "no sample's score is within the borderline band (or no sample has a score)",
    "rescue-rejected": "no rejected sample is waiting for review",
    "label-issues": "no out-of-fold label issue flagged (run `jurassiclass train` to get them)",
    "unclear-decisions": "the last `review pull` found no unclear tags",
    "duplicate-groups": "dedup found no duplicate groups (or has not run)",
}


class ReviewError(JurassiclassError, RuntimeError):
    """A review operation that cannot proceed; the message (one line) says what to do."""


class DatabaseUnreachable(ReviewError):
    """FIFTYONE_DATABASE_URI names a MongoDB that does not answer."""


class AppPortInUse(ReviewError):
    """The App's port is already taken on its address."""


class NothingToCalibrate(ReviewError):
    """No reviewed image with a score: the message says whether scores or reviews are missing."""


# ---------------------------------------------------------------- fiftyone access


_DB_CHECKED: set[str] = set()


def _fo():
    """Import FiftyOne with quiet, offline-friendly settings (it reads env at import).

    A shared database (`FIFTYONE_DATABASE_URI`) is pinged first with a short timeout: FiftyOne
    itself waits ~30 s per attempt and then fails with a long traceback.
    """
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    uri = os.environ.get("FIFTYONE_DATABASE_URI")
    if uri and uri not in _DB_CHECKED:
        check_database(uri)
        _DB_CHECKED.add(uri)
    import fiftyone as fo

    return fo


def check_database(uri: str, timeout_s: float = 3.0) -> None:
    """Raise DatabaseUnreachable (one line) unless the MongoDB at ``uri`` answers a ping."""
    from pymongo import MongoClient
    from pymongo.errors import ConfigurationError, InvalidURI, PyMongoError

    shown = re.sub(r"//[^@/]*@", "//***@", uri)  # never print a password
    ms = int(timeout_s * 1000)
    try:
        client = MongoClient(uri, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms, socketTimeoutMS=ms)
    except (InvalidURI, ConfigurationError, ValueError) as exc:
        raise DatabaseUnreachable(f"FIFTYONE_DATABASE_URI={shown} is not a MongoDB URI ({exc})") from None
    try:
        client.admin.command("ping")
    except PyMongoError:
        raise DatabaseUnreachable(
            f"cannot reach the FiftyOne database at {shown} (FIFTYONE_DATABASE_URI) within {timeout_s:g} s: "
            "start MongoDB there, fix the URI, or unset it to use FiftyOne's bundled database"
        ) from None
    finally:
        client.close()


def dataset_name(manifest: Manifest) -> str:
    return manifest.review.dataset_name or manifest.name


def _workspace_id_file(root: Path) -> Path:
    return Path(root) / "stages" / "review" / "workspace_id"


def workspace_id(ws: Workspace) -> str:
    """The workspace's identity for FiftyOne datasets: a random id kept in the workspace, so it moves with it."""
    path = _workspace_id_file(ws.root)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(uuid.uuid4().hex + "\n", encoding="utf-8")
    return path.read_text(encoding="utf-8").strip()


def _load(manifest: Manifest, ws: Workspace, *, create: bool = False) -> "fo.Dataset":
    fo = _fo()
    name = dataset_name(manifest)
    wid = workspace_id(ws)
    if fo.dataset_exists(name):
        ds = fo.load_dataset(name)
        owner, owner_id = ds.info.get("workspace"), ds.info.get("workspace_id")
        if owner_id != wid and (owner_id or (owner and owner != str(ws.root))):
            # Same path, other id: the workspace was deleted and made again; the dataset may hold
            # decisions never pulled, so it is not taken over.
            which = (f"an earlier workspace at {owner} (deleted or made again since)" if owner == str(ws.root)
                     else f"workspace {owner}, not {ws.root}")
            raise ReviewError(
                f"FiftyOne dataset {name!r} belongs to {which}: set review.dataset_name in the manifest to "
                f"review this workspace separately, or run `jurassiclass review forget -m <manifest>` to save "
                f"its decisions in this workspace and delete it"
            )
        if owner and owner != str(ws.root):
            _rebase(ds, Path(owner), ws.root)
        if owner_id is None or owner != str(ws.root) or "token" not in ds.info:
            ds.info = {**ds.info, "workspace": str(ws.root), "workspace_id": wid,
                       "token": ds.info.get("token") or uuid.uuid4().hex}
            ds.save()
        return ds
    if not create:
        raise ReviewError(f"no FiftyOne dataset {name!r}: run `jurassiclass review push` first")
    ds = fo.Dataset(name, persistent=True)
    # token: this dataset's identity, so a dataset deleted and made afresh is told apart from a sample deleted.
    ds.info = {"workspace": str(ws.root), "workspace_id": wid, "manifest": manifest.name, "token": uuid.uuid4().hex}
    ds.save()
    return ds


def _rebase(ds: "fo.Dataset", old: Path, new: Path) -> None:
    """The workspace moved: point samples' files at its new place (the store moved with it)."""
    ids, paths = ds.values(["image_id", "filepath"])
    moved = {}
    for iid, fp in zip(ids, paths):
        p = Path(fp)
        if p.is_relative_to(old):
            moved[iid] = str(new / p.relative_to(old))
    if moved:
        ds.set_values("filepath", moved, key_field="image_id")


def _declare_fields(ds: "fo.Dataset", df: pl.DataFrame) -> None:
    fo = _fo()
    kinds = {pl.Utf8: fo.StringField, pl.Boolean: fo.BooleanField, pl.Float64: fo.FloatField, pl.Int32: fo.IntField}
    schema = ds.get_field_schema()
    wanted: dict[str, Any] = {"image_id": fo.StringField, "pushed_label": fo.StringField}
    for col, fld in _COPIED.items():
        dtype = df.schema[col]
        wanted[fld] = fo.FloatField if dtype.is_float() else fo.IntField if dtype.is_integer() else kinds.get(dtype, fo.StringField)
    for fld, typ in _DERIVED.items():
        wanted[fld] = {bool: fo.BooleanField, str: fo.StringField, float: fo.FloatField}[typ]
    wanted["dup_group"] = fo.StringField  # dedup may store ints; one type keeps the field stable
    wanted["review_problem"] = fo.StringField  # written by pull: why a sample's tags are unclear
    fiftyone_bulk.declare_fields(ds, {fld: ftype() for fld, ftype in wanted.items() if fld not in schema})
    if "ground_truth" not in schema:
        ds.add_sample_field("ground_truth", fo.EmbeddedDocumentField, embedded_doc_type=fo.Classification)
    ds.create_index("image_id", unique=True)
    for fld in ("pipeline_label", "status", "clip_margin", "clip_score", "dup_group", "wrong_class"):
        ds.create_index(fld)


# ---------------------------------------------------------------- derived fields


def _class_lookup(manifest: Manifest) -> dict[str, str]:
    return {c.name.lower(): c.name for c in manifest.classes}


def thresholds(manifest: Manifest, df: pl.DataFrame | None = None) -> dict[str, float | None]:
    """Per class: the cut-off on the review score (explicit, the CLIP stage's absolute one, or the
    lowest score the CLIP stage kept in that class when its threshold is a percentile)."""
    r = manifest.review
    attr = {"clip_margin": "min_margin", "clip_real_margin": "min_real_margin", "clip_score": "min_score"}[r.score.value]
    out: dict[str, float | None] = {}
    for c in manifest.class_names:
        if r.threshold is not None:
            out[c] = r.threshold
            continue
        t = getattr(manifest.clip.thresholds_for(c), attr)
        if t is not None and t.mode is ThresholdMode.absolute:
            out[c] = t.value
            continue
        out[c] = None
        if df is not None and "clip_decision" in df.columns and r.score.value in df.columns:
            kept = df.filter((pl.col("label") == c) & pl.col("clip_decision").str.to_lowercase().is_in(list(_KEPT)))
            out[c] = kept[r.score.value].min() if kept.height else None
    return out


def _prepare(manifest: Manifest, df: pl.DataFrame) -> pl.DataFrame:
    """The catalog rows to push, with upstream columns filled and review-only fields derived."""
    df = catalog.ensure_columns(df, {**UPSTREAM_COLUMNS, **REVIEW_COLUMNS})
    df = df.filter(pl.col("path").is_not_null())
    # Deleted in the App is a decision: such an image never comes back, even into a new dataset.
    df = df.filter(pl.col("review_decision").is_null() | (pl.col("review_decision") != Decision.deleted.value))
    if not manifest.review.include_rejected:
        df = df.filter((pl.col("status") != Status.rejected.value) | pl.col("review_decision").is_not_null())
    classes = _class_lookup(manifest)
    score = manifest.review.score.value
    thr = thresholds(manifest, df)
    likely = pl.col("reason").str.extract(r"^likely_(.+)$", 1)
    top = pl.col("clip_top_label")
    top_other = pl.when(top.is_not_null() & (top != pl.col("label")) & top.str.to_lowercase().is_in(list(classes))).then(top)
    df = df.with_columns(
        pl.col("dup_group").cast(pl.Utf8),
        *[pl.col(c).cast(pl.Float64).fill_nan(None) for c in ("clip_score", "clip_margin", "clip_real_margin", "clip_top_prob")],
    )
    return df.with_columns(
        pl.coalesce(likely, top_other).alias("suggested_label"),
        (likely.is_not_null() | top_other.is_not_null()).alias("wrong_class"),
        pl.col("label_conflict").fill_null(False),
        (pl.col(score) - pl.col("label").replace_strict(thr, default=None, return_dtype=pl.Float64)).alias("score_gap"),
    )


# ---------------------------------------------------------------- decisions


@dataclass(frozen=True)
class SampleDecision:
    decision: Decision | None
    label: str | None = None  # the label the reviewer confirms (accept/relabel)
    problem: str | None = None  # why a tagged sample could not be read as a decision


def decide(tags: Iterable[str], gt_label: str | None, pushed_label: str | None, classes: dict[str, str]) -> SampleDecision:
    """One sample's decision from its tags and (possibly edited) ground_truth label.

    ``classes`` maps lower-cased class names to manifest names (relabel tags are case-blind).
    """
    tags = set(tags or ())
    accept, reject = TAG_ACCEPT in tags, TAG_REJECT in tags
    targets = {t[len(RELABEL_PREFIX):].strip() for t in tags if t.startswith(RELABEL_PREFIX)}
    if gt_label and gt_label != pushed_label:
        targets.add(gt_label)
    if accept and reject:
        return SampleDecision(None, problem="accept_and_reject")
    if reject:
        return SampleDecision(Decision.reject)
    resolved = {classes.get(t.lower()) for t in targets}
    if None in resolved:
        return SampleDecision(None, problem="unknown_class")
    if len(resolved) > 1:
        return SampleDecision(None, problem="conflicting_labels")
    if resolved:
        new = resolved.pop()
        if new != pushed_label:
            return SampleDecision(Decision.relabel, new)
        return SampleDecision(Decision.accept, new)
    if accept:
        if pushed_label not in classes.values():
            return SampleDecision(None, problem="accepted_without_class")
        return SampleDecision(Decision.accept, pushed_label)
    return SampleDecision(None)


def _read_decisions(ds: "fo.Dataset", manifest: Manifest, *, with_tags: bool = False) -> pl.DataFrame:
    """image_id, pushed_label, decision, reviewer_label, problem (and with ``with_tags``, tags and
    filepath) for every sample in the dataset."""
    ds.reload()
    vals = ds.values(["image_id", "tags", "ground_truth.label", "pushed_label", *(["filepath"] if with_tags else [])])
    ids, tags, gt, pushed = vals[:4]
    classes = _class_lookup(manifest)
    rows = []
    for i, t, g, p in zip(ids, tags, gt, pushed):
        d = decide(t, g, p, classes)
        rows.append((i, p, d.decision.value if d.decision else None, d.label, d.problem))
    cols = ["image_id", "pushed_label", "decision", "reviewer_label", "problem"]
    out = pl.DataFrame(rows, schema={c: pl.Utf8 for c in cols}, orient="row")
    if with_tags:
        out = out.with_columns(pl.Series("tags", tags, dtype=pl.List(pl.Utf8)), pl.Series("filepath", vals[4], dtype=pl.Utf8))
    return out


# ---------------------------------------------------------------- push


@dataclass
class PushSummary:
    dataset: str
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    not_pushable: int = 0  # catalog rows without stored bytes (nothing to look at)
    tags_restored: int = 0  # new samples whose catalog decision was written back as tags
    deleted: int = 0  # samples deleted in the App since the last push, recorded as decisions
    seconds: float = 0.0
    views: list[str] = field(default_factory=list)
    forgotten: "ForgetSummary | None" = None  # an abandoned dataset, without decisions, replaced by this push


def _py(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _tags_for(row: dict) -> list[str]:
    d = row.get("review_decision")
    if d == Decision.accept.value:
        return [TAG_ACCEPT]
    if d == Decision.reject.value:
        return [TAG_REJECT]
    if d == Decision.relabel.value and row.get("reviewer_label"):
        return [RELABEL_PREFIX + row["reviewer_label"]]
    return []


def _pushed_path(ws: Workspace) -> Path:
    return ws.stage_dir("review") / "pushed.parquet"


def _record_pushed(ws: Workspace, ds: "fo.Dataset") -> None:
    """The image_ids now in the dataset, under its token: the next push or pull tells deletions apart."""
    ids = ds.values("image_id")
    pl.DataFrame({"image_id": ids, "token": [ds.info["token"]] * len(ids)},
                 schema={"image_id": pl.Utf8, "token": pl.Utf8}).write_parquet(_pushed_path(ws))


def _record_deletions(ds: "fo.Dataset", ws: Workspace) -> int:
    """Samples this workspace pushed into this very dataset that are gone now were deleted in the App:
    record that as the reviewer's decision (rejected, never pushed again). Returns how many."""
    path = _pushed_path(ws)
    if not path.exists():
        return 0
    pushed = pl.read_parquet(path).filter(pl.col("token") == ds.info.get("token"))["image_id"]
    if pushed.is_empty():
        return 0
    gone = set(pushed.to_list()) - set(ds.values("image_id"))
    if not gone:
        return 0
    with catalog.locked(ws):
        df = catalog.ensure_columns(catalog.read(ws), REVIEW_COLUMNS)
        hit = df.filter(pl.col("image_id").is_in(list(gone))
                        & (pl.col("review_decision").is_null() | (pl.col("review_decision") != Decision.deleted.value)))
        if hit.is_empty():
            return 0
        had = pl.col("review_decision").is_not_null()
        upd = hit.select(
            "image_id",
            pl.lit(Status.rejected.value).alias("status"),
            pl.lit(DELETED_REASON).alias("reason"),
            pl.when(had).then("pre_review_label").otherwise("label").alias("label"),
            pl.lit(Decision.deleted.value).alias("review_decision"),
            pl.lit(None, pl.Utf8).alias("reviewer_label"),
            pl.lit(catalog.utcnow()).cast(REVIEW_COLUMNS["reviewed_at"]).alias("reviewed_at"),
            pl.when(had).then("pre_review_status").otherwise("status").alias("pre_review_status"),
            pl.when(had).then("pre_review_reason").otherwise("reason").alias("pre_review_reason"),
            pl.when(had).then("pre_review_label").otherwise("label").alias("pre_review_label"),
        )
        catalog.merge(ws, catalog.changes(df, upd), declare=REVIEW_COLUMNS)
    return upd.height


def push(
    manifest: Manifest, ws: Workspace, *, show_progress: bool = True, batch_size: int = 2000
) -> PushSummary:
    """Create or update the review dataset from the catalog; reviewers' tags and edited labels are kept.

    Raises DatabaseUnreachable (at once) when FIFTYONE_DATABASE_URI does not answer, ReviewError
    when the dataset belongs to another workspace.
    """
    _fo()
    t0 = time.perf_counter()
    forgot = _forget_if_abandoned(manifest, ws)
    ds = _load(manifest, ws, create=True)
    s = PushSummary(dataset=ds.name, forgotten=forgot)
    s.deleted = _record_deletions(ds, ws)
    df = catalog.read(ws)
    prepared = _prepare(manifest, df)
    s.not_pushable = df.height - prepared.height
    _declare_fields(ds, prepared)
    fields = {**{f: c for c, f in _COPIED.items()}, **{f: f for f in _DERIVED}, "filepath": "filepath"}
    prepared = prepared.with_columns(
        pl.col("path").map_elements(lambda p: str(ws.abspath(p)), return_dtype=pl.Utf8).alias("filepath"))

    existing = set(ds.values("image_id")) if len(ds) else set()
    new = prepared.filter(~pl.col("image_id").is_in(list(existing)))
    old = prepared.filter(pl.col("image_id").is_in(list(existing)))

    # New samples: documents built in memory and inserted in batches (the kept private path).
    batch: list[dict] = []
    for row in track(new.iter_rows(named=True), total=new.height, description="review push", show=show_progress):
        tags = _tags_for(row)
        s.tags_restored += bool(tags)
        shown = row["reviewer_label"] if row["review_decision"] in (Decision.relabel.value, Decision.accept.value) else None
        pushed = row["pre_review_label"] or row["label"]
        batch.append(fiftyone_bulk.sample_doc(
            ds, filepath=row["filepath"], tags=tags, ground_truth=shown or pushed,
            fields={"image_id": row["image_id"], "pushed_label": pushed,
                    **{f: _py(row[c]) for f, c in fields.items() if f != "filepath"}},
        ))
        if len(batch) >= batch_size:
            fiftyone_bulk.insert(ds, batch)
            batch = []
    fiftyone_bulk.insert(ds, batch)
    s.added = new.height

    # Existing samples: only changed values are written, field by field (public set_values); never tags.
    if old.height:
        cur_fields = ["image_id", "tags", "ground_truth.label", "pushed_label", *fields]
        cur = dict(zip(cur_fields, ds.values(cur_fields)))
        by_id = {iid: k for k, iid in enumerate(cur["image_id"])}
        ids = old["image_id"].to_list()
        pos = [by_id[i] for i in ids]
        changed: set[str] = set()
        for fld, col in fields.items():
            have_all, sets = cur[fld], {}
            for iid, k, v in zip(ids, pos, old[col].to_list()):
                v, have = _py(v), have_all[k]
                if have != v and not (isinstance(v, float) and isinstance(have, float) and abs(have - v) < 1e-12):
                    sets[iid] = v
            if sets:
                ds.set_values(fld, sets, key_field="image_id")
                changed |= sets.keys()
        # The pipeline's label moved (e.g. a label-issue stage): follow it only where nobody reviewed.
        # The view re-checks in the database, so a reviewer's edit saved since the read above is kept.
        moved = {iid: lab for iid, k, lab, dec in zip(ids, pos, old["label"].to_list(), old["review_decision"].to_list())
                 if dec is None and lab is not None and lab != cur["pushed_label"][k]}
        if moved:
            still = ds.select_by("image_id", list(moved)).match(_not_reviewed_expr()).values("image_id")
            follow = {iid: moved[iid] for iid in still}
            if follow:
                ds.set_values("pushed_label", follow, key_field="image_id")
                ds.set_values("ground_truth.label", follow, key_field="image_id")
                changed |= follow.keys()
        s.updated = len(changed)
        s.unchanged = old.height - s.updated

    ds.info = {**ds.info, "workspace": str(ws.root), "manifest": manifest.name, "classes": manifest.class_names,
               "score": manifest.review.score.value}
    ds.save()
    _record_pushed(ws, ds)
    s.views = _save_views(ds, manifest)
    s.seconds = time.perf_counter() - t0
    return s


def _tags_for_review(tags: Iterable[str]) -> bool:
    return any(t in (TAG_ACCEPT, TAG_REJECT) or t.startswith(RELABEL_PREFIX) for t in tags or ())


def _not_reviewed_expr():
    from fiftyone import ViewField as F

    return (
        ~F("tags").contains([TAG_ACCEPT, TAG_REJECT])
        & (F("tags").filter(F().starts_with(RELABEL_PREFIX)).length() == 0)
        & (F("ground_truth.label") == F("pushed_label"))
    )


def _save_views(ds: "fo.Dataset", manifest: Manifest) -> list[str]:
    """(Re)define the reviewers' saved views; views reviewers saved under other names are untouched.

    An empty view says why in its description (the App shows it beside the name)."""
    from fiftyone import ViewField as F

    score = manifest.review.score.value
    band = manifest.review.borderline_band
    todo = _not_reviewed_expr()
    gap = F("score_gap")
    views = {
        "not-reviewed": ds.match(todo).sort_by(score),
        "lowest-score-per-class": ds.exists(score).sort_by([("pipeline_label", 1), (score, 1)]),
        "suspected-wrong-label": ds.match(F("wrong_class") == True).sort_by("clip_top_prob", reverse=True),  # noqa: E712
        "dup-label-conflicts": ds.match(F("label_conflict") == True).sort_by([("dup_group", 1), ("pipeline_label", 1)]),  # noqa: E712
        # exists(): in MongoDB a missing gap compares below any number, so unscored images would match.
        "borderline": ds.exists("score_gap").match(gap.abs() <= band).sort_by(gap.abs()),
        "rescue-rejected": ds.match((F("status") == Status.rejected.value) & todo).sort_by(score, reverse=True),
        "label-issues": ds.match(F("label_issue") == True).sort_by("oof_self_confidence"),  # noqa: E712
        "unclear-decisions": ds.exists("review_problem").sort_by([("review_problem", 1), ("pipeline_label", 1)]),
        "duplicate-groups": ds.exists("dup_group").sort_by(
            [("dup_group", 1), (F("image_id") == F("dup_group"), -1), ("image_id", 1)]),
    }
    for name, view in views.items():
        if ds.has_saved_view(name):
            ds.delete_saved_view(name)
        desc = VIEWS[name] if len(view) else f"{VIEWS[name]}. Empty: {_EMPTY_BECAUSE[name]}"
        ds.save_view(name, view, description=desc)
    return list(views)


# ---------------------------------------------------------------- pull


@dataclass
class PullSummary:
    dataset: str
    samples: int = 0
    reviewed: int = 0
    accepted: int = 0  # includes relabelled (accepted under the corrected label)
    rejected: int = 0
    relabelled: int = 0
    changed: int = 0  # catalog rows this pull wrote
    cleared: int = 0  # decisions taken back in the App: the pipeline's status restored
    problems: dict[str, int] = field(default_factory=dict)
    deleted: int = 0  # samples deleted in the App since the last push or pull, recorded as decisions
    calibration: Path | None = None


def pull(manifest: Manifest, ws: Workspace, *, calibrate_after: bool = True) -> PullSummary:
    """Read reviewers' decisions into the catalog (idempotent: a second pull writes nothing).

    Unclear samples are left unchanged and listed in the `unclear-decisions` view (field `review_problem`).
    """
    ds = _load(manifest, ws)
    deleted = _record_deletions(ds, ws)
    _record_pushed(ws, ds)
    dec = _read_decisions(ds, manifest)
    s = PullSummary(dataset=ds.name, samples=dec.height, deleted=deleted)
    _mark_problems(ds, dec)
    for p, n in dec.filter(pl.col("problem").is_not_null()).group_by("problem").len().iter_rows():
        s.problems[p] = n
    df, rows = _apply_decisions(ws, dec)
    s.changed = len(rows)
    s.cleared = sum(r["review_decision"] is None for r in rows)
    decided = dec.filter(pl.col("decision").is_not_null())
    s.reviewed = decided.height
    s.rejected = decided.filter(pl.col("decision") == Decision.reject.value).height
    s.relabelled = decided.filter(pl.col("decision") == Decision.relabel.value).height
    s.accepted = s.reviewed - s.rejected
    if rows:
        _mirror(ds, manifest, df, [r["image_id"] for r in rows])
    if calibrate_after and s.reviewed:
        try:
            s.calibration = calibrate(manifest, ws, df=df).png
        except NothingToCalibrate:
            pass  # e.g. scores were skipped offline: `review calibrate` says so when asked
    return s


def _apply_decisions(ws: Workspace, dec: pl.DataFrame, *, only_undecided: bool = False) -> tuple[pl.DataFrame, list[dict]]:
    """Write ``dec`` (``_read_decisions``' frame) into the catalog's rows of the same image_id, as
    ``pull`` does; with ``only_undecided``, only decisions, and only into rows no decision was
    pulled into yet. Returns the catalog as it is now and the rows changed."""
    now = catalog.utcnow()
    with catalog.locked(ws):
        df = catalog.ensure_columns(catalog.read(ws), REVIEW_COLUMNS)
        j = df.join(dec, on="image_id", how="inner")
        if only_undecided:
            j = j.filter(pl.col("decision").is_not_null() & pl.col("review_decision").is_null())
        rows = []
        for r in j.iter_rows(named=True):
            d = r["decision"]
            had = r["review_decision"]
            # Unclear tags (accept and reject, two labels) keep whatever was pulled before.
            if (d is None and had is None) or r["problem"] is not None:
                continue
            pre = {
                "pre_review_status": r["pre_review_status"] if had else r["status"],
                "pre_review_reason": r["pre_review_reason"] if had else r["reason"],
                "pre_review_label": r["pre_review_label"] if had else r["label"],
            }
            if d is None:  # taken back: restore what the pipeline said
                want = {"status": pre["pre_review_status"], "reason": pre["pre_review_reason"],
                        "label": pre["pre_review_label"], "review_decision": None, "reviewer_label": None,
                        "reviewed_at": None, "pre_review_status": None, "pre_review_reason": None,
                        "pre_review_label": None}
            else:
                accepted = d != Decision.reject.value
                want = {
                    "status": Status.accepted.value if accepted else Status.rejected.value,
                    "reason": None if accepted else REJECT_REASON,
                    "label": r["reviewer_label_right"] if accepted else pre["pre_review_label"],
                    "review_decision": d,
                    "reviewer_label": r["reviewer_label_right"] if accepted else None,
                    **pre,
                }
                same = had == d and r["reviewer_label"] == want["reviewer_label"]
                want["reviewed_at"] = r["reviewed_at"] if same and r["reviewed_at"] else now
            if any(r[k] != v for k, v in want.items()):
                rows.append({"image_id": r["image_id"], **want})
        if rows:
            upd = pl.DataFrame(rows, schema={"image_id": pl.Utf8, "status": pl.Utf8, "reason": pl.Utf8, "label": pl.Utf8,
                                             **REVIEW_COLUMNS})
            df = catalog.update(df, upd)
            catalog.merge(ws, catalog.changes(df, upd), declare=REVIEW_COLUMNS)
    return df, rows


def _mark_problems(ds: "fo.Dataset", dec: pl.DataFrame) -> None:
    """Write each sample's unclear-tags problem (or clear it) so the `unclear-decisions` view lists them."""
    have = dict(zip(*ds.values(["image_id", "review_problem"]))) if "review_problem" in ds.get_field_schema() else None
    if have is None:
        return
    sets = {i: p for i, p in zip(dec["image_id"].to_list(), dec["problem"].to_list()) if have.get(i) != p}
    if sets:
        ds.set_values("review_problem", sets, key_field="image_id")
        if ds.has_saved_view("unclear-decisions"):
            empty = not len(ds.exists("review_problem"))
            desc = VIEWS["unclear-decisions"] + (f". Empty: {_EMPTY_BECAUSE['unclear-decisions']}" if empty else "")
            ds.update_saved_view_info("unclear-decisions", {"description": desc})


def _mirror(ds: "fo.Dataset", manifest: Manifest, df: pl.DataFrame, image_ids: list[str]) -> None:
    """Show the pulled status/label/decision in the App (fields only; tags stay the reviewers')."""
    prepared = _prepare(manifest, df.filter(pl.col("image_id").is_in(image_ids)))
    cols = ["status", "reason", "label", "review_decision", "reviewer_label"]
    sub = prepared.filter(pl.col("image_id").is_in(ds.values("image_id")))
    if sub.is_empty():
        return
    ids = sub["image_id"].to_list()
    for c in cols:
        ds.set_values(_COPIED[c], dict(zip(ids, sub[c].to_list())), key_field="image_id")


# ---------------------------------------------------------------- status


def status(manifest: Manifest, ws: Workspace) -> pl.DataFrame:
    """Review progress per class, live from the dataset (decisions not yet pulled included).

    Columns: label, samples, reviewed, accepted, relabelled_away, rejected, unclear, remaining, done_pct, pulled.
    """
    ds = _load(manifest, ws)
    dec = _read_decisions(ds, manifest)
    cat = catalog.ensure_columns(catalog.read(ws), REVIEW_COLUMNS).select("image_id", "review_decision")
    dec = dec.join(cat, on="image_id", how="left").with_columns(pl.col("pushed_label").fill_null("(none)"))
    out = dec.group_by("pushed_label").agg(
        pl.len().alias("samples"),
        pl.col("decision").is_not_null().sum().alias("reviewed"),
        (pl.col("decision") == Decision.accept.value).sum().alias("accepted"),
        (pl.col("decision") == Decision.relabel.value).sum().alias("relabelled_away"),
        (pl.col("decision") == Decision.reject.value).sum().alias("rejected"),
        pl.col("problem").is_not_null().sum().alias("unclear"),
        pl.col("review_decision").is_not_null().sum().alias("pulled"),
    ).rename({"pushed_label": "label"})
    out = out.with_columns(
        (pl.col("samples") - pl.col("reviewed")).alias("remaining"),
        (100.0 * pl.col("reviewed") / pl.col("samples")).round(1).alias("done_pct"),
    ).sort("label")
    return out.select("label", "samples", "reviewed", "accepted", "relabelled_away", "rejected", "unclear",
                      "remaining", "done_pct", "pulled")


# ---------------------------------------------------------------- forget


@dataclass
class ForgetSummary:
    dataset: str
    owner: str | None  # the workspace path the dataset named as its owner
    samples: int = 0
    decisions: int = 0  # samples the reviewers had decided (as pull reads tags and labels)
    applied: int = 0  # of those, pulled into this workspace's rows of the same image (none decided yet)
    saved: Path | None = None


def _alive(owner: str, owner_id: str) -> bool:
    """Whether the workspace that made a dataset still exists at its path (its id file, read only:
    nothing is made in another workspace)."""
    mark = _workspace_id_file(Path(owner))
    return mark.is_file() and mark.read_text(encoding="utf-8").strip() == owner_id


def _forget_if_abandoned(manifest: Manifest, ws: Workspace) -> ForgetSummary | None:
    """Forget (as ``forget`` does, tags saved first) the review dataset of a workspace that no longer
    exists (deleted, or made again at its path: a user starting over) when no sample in it holds a
    reviewer's decision, nor decision tags too unclear to read: nothing of it is lost, and the push
    goes on. One holding decisions is still refused by ``_load``: pulling them in is the user's
    choice (``review forget``)."""
    fo = _fo()
    name = dataset_name(manifest)
    if not fo.dataset_exists(name):
        return None
    ds = fo.load_dataset(name)
    owner, owner_id = ds.info.get("workspace"), ds.info.get("workspace_id")
    if not owner or not owner_id or owner_id == workspace_id(ws) or _alive(owner, owner_id):
        return None
    dec = _read_decisions(ds, manifest, with_tags=True)
    if dec["decision"].is_not_null().any() or dec["problem"].is_not_null().any():  # a reviewer's work, even unclear
        return None
    return _forget(ds, ws, dec)


def forget(manifest: Manifest, ws: Workspace) -> ForgetSummary:
    """Delete the review dataset after saving every sample's tags and decision (as ``pull`` reads
    them) to ``stages/review/forgotten/`` in this workspace, and pulling the decisions on images
    this workspace holds too into rows not decided yet (the next push shows them as tags): the
    way on when the dataset belongs to an earlier workspace at this path (deleted and made again)
    or to one gone from its path. A dataset whose workspace still exists elsewhere is refused."""
    fo = _fo()
    name = dataset_name(manifest)
    if not fo.dataset_exists(name):
        raise ReviewError(f"no FiftyOne dataset {name!r} to forget")
    ds = fo.load_dataset(name)
    owner, owner_id = ds.info.get("workspace"), ds.info.get("workspace_id")
    if owner and owner_id and owner_id != workspace_id(ws) and _alive(owner, owner_id):
        raise ReviewError(f"FiftyOne dataset {name!r} belongs to the workspace at {owner}, which still exists: "
                          f"forget it from there (-w {owner}) if that is meant")
    return _forget(ds, ws, _read_decisions(ds, manifest, with_tags=True))


def _forget(ds: "fo.Dataset", ws: Workspace, dec: pl.DataFrame) -> ForgetSummary:
    """``forget``'s work on the dataset ``ds``, whose ``_read_decisions(..., with_tags=True)`` is ``dec``."""
    s = ForgetSummary(dataset=ds.name, owner=ds.info.get("workspace"))
    dec = dec.with_columns(pl.lit(s.owner, pl.Utf8).alias("owner_workspace"))
    s.samples, s.decisions = dec.height, dec["decision"].is_not_null().sum()
    stamp = catalog.utcnow().strftime("%Y%m%dT%H%M%S%fZ")
    s.saved = ws.stage_dir("review") / "forgotten" / f"{ds.name}-{stamp}.parquet"
    s.saved.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    dec.write_parquet(buf)
    atomic_write_bytes(s.saved, buf.getvalue())  # on disk before the dataset goes
    # Ids are content hashes: a decision on an image this workspace holds too is a decision on it.
    s.applied = len(_apply_decisions(ws, dec, only_undecided=True)[1])
    ds.delete()
    return s


# ---------------------------------------------------------------- calibration


@dataclass
class Calibration:
    table: pl.DataFrame  # per class + ALL: n, agreement, precision, recall of automatic `kept` vs accepted
    curve: pl.DataFrame  # threshold, precision, recall, f1, agreement (all classes)
    current_threshold: float | None
    best_threshold: float | None
    png: Path
    markdown: Path


def _prf(pred: list[bool], truth: list[bool]) -> dict[str, float | int | None]:
    tp = sum(p and t for p, t in zip(pred, truth))
    fp = sum(p and not t for p, t in zip(pred, truth))
    fn = sum(t and not p for p, t in zip(pred, truth))
    n = len(pred)
    prec = tp / (tp + fp) if tp + fp else None
    rec = tp / (tp + fn) if tp + fn else None
    f1 = 2 * prec * rec / (prec + rec) if prec and rec else 0.0 if prec is not None and rec is not None else None
    agree = sum(p == t for p, t in zip(pred, truth)) / n if n else None
    return {"n": n, "tp": tp, "fp": fp, "fn": fn, "precision": prec, "recall": rec, "f1": f1, "agreement": agree}


def calibrate(manifest: Manifest, ws: Workspace, *, df: pl.DataFrame | None = None) -> Calibration:
    """How the automatic CLIP decisions agreed with reviewers, and the threshold that matches them best.

    Truth: the reviewer accepted the image under its original label (reject and relabel are
    negatives). Prediction: the CLIP stage kept it (`clip_decision`), or for the sweep,
    `score >= t`. Writes calibration.{csv,md,json,png} to the review stage folder. Raises
    NothingToCalibrate when no reviewed image has a score, saying which of the two is missing.
    """
    score = manifest.review.score.value
    df = catalog.ensure_columns(df if df is not None else catalog.read(ws), {**UPSTREAM_COLUMNS, **REVIEW_COLUMNS})
    rev = df.filter(pl.col("review_decision").is_not_null() & pl.col(score).is_not_null() & pl.col(score).is_not_nan())
    if rev.is_empty():
        raise NothingToCalibrate(_why_nothing_to_calibrate(df, score))
    rev = rev.with_columns(
        pl.coalesce("pre_review_label", "label").alias("orig_label"),
        (pl.col("review_decision") == Decision.accept.value).alias("truth"),
    )
    thr = thresholds(manifest, df)
    has_decision = rev["clip_decision"].null_count() < rev.height
    if has_decision:
        rev = rev.with_columns(pl.col("clip_decision").str.to_lowercase().is_in(list(_KEPT)).fill_null(False).alias("kept"))
    else:
        rev = rev.with_columns(
            (pl.col(score) >= pl.col("orig_label").replace_strict(thr, default=None, return_dtype=pl.Float64))
            .fill_null(False).alias("kept")
        )
    rows = []
    for lab in sorted(rev["orig_label"].drop_nulls().unique().to_list()) + ["ALL"]:
        part = rev if lab == "ALL" else rev.filter(pl.col("orig_label") == lab)
        m = _prf(part["kept"].to_list(), part["truth"].to_list())
        best_t, best = _best_threshold(part[score].to_numpy(), part["truth"].to_numpy())
        rows.append({"label": lab, **m, "threshold": thr.get(lab) if lab != "ALL" else _common(thr),
                     "best_threshold": best_t, "best_f1": best})
    table = pl.DataFrame(rows)

    curve = pl.DataFrame(sweep(rev[score].to_numpy(), rev["truth"].to_numpy()),
                         schema={c: pl.Float64 for c in ("threshold", "precision", "recall", "f1", "agreement")})
    best_t = table.filter(pl.col("label") == "ALL")["best_threshold"][0]
    current = _common(thr)

    out = ws.stage_dir("review")
    table.write_csv(out / "calibration.csv")
    curve.write_csv(out / "calibration_curve.csv")
    from curation.report import markdown_table

    md = out / "calibration.md"
    md.write_text(
        f"# Calibration of the CLIP filter against reviewers ({score})\n\n"
        f"Reviewed images with a score: {rev.height}. Automatic decision: "
        f"{'clip_decision kept' if has_decision else f'{score} >= threshold'}; truth: reviewer accepted.\n\n"
        + markdown_table(table.with_columns(pl.col(pl.Float64).round(3))) + "\n\n"
        f"Threshold now: {_fmt(current)}; best agreement with reviewers (max F1): {_fmt(best_t)}\n",
        encoding="utf-8",
    )
    (out / "calibration.json").write_text(
        json.dumps({"score": score, "current_threshold": current, "best_threshold": best_t,
                    "reviewed_with_score": rev.height, "per_class": table.to_dicts()}, indent=2, default=str),
        encoding="utf-8",
    )
    png = out / "calibration.png"
    _plot(curve, current, best_t, score, png)
    return Calibration(table=table, curve=curve, current_threshold=current, best_threshold=best_t, png=png, markdown=md)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def _common(thr: dict[str, float | None]) -> float | None:
    vals = {v for v in thr.values() if v is not None}
    return vals.pop() if len(vals) == 1 else None


def _why_nothing_to_calibrate(df: pl.DataFrame, score: str) -> str:
    has_score = pl.col(score).is_not_null() & pl.col(score).is_not_nan()
    skipped = (df["clip_decision"] == "skipped").any()
    redo = ("CLIP scoring was skipped (weights unavailable, e.g. offline); run `jurassiclass score` with the "
            "weights, then calibrate" if skipped else "run `jurassiclass score`, then calibrate")
    if df.filter(has_score).is_empty():
        return f"no image has a {score}: {redo}"
    reviewed = df.filter(pl.col("review_decision").is_not_null()).height
    if not reviewed:
        return "no reviewed image with a CLIP score yet: review some images, then `jurassiclass review pull`"
    return f"none of the {reviewed} reviewed images has a {score}: {redo}"


def sweep(scores: "np.ndarray", truth: "np.ndarray") -> dict[str, list]:
    """Precision, recall, F1 and agreement of `keep if score >= t` for every distinct score t (ascending).

    scores: float (n,); truth: bool (n,). O(n log n): one sort, then running counts of each side.
    Precision/recall/F1 follow `_prf` (None when undefined; F1 0.0 when either is 0).
    """
    s, y = np.asarray(scores, dtype=float), np.asarray(truth, dtype=bool)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    n, pos = len(s), int(y.sum())
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), n - 1] if n else np.array([], int)  # end of each run of one score
    tp, fp = np.cumsum(y)[last][::-1], np.cumsum(~y)[last][::-1]
    prec = tp / (tp + fp)
    rec = tp / pos if pos else np.full(len(tp), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where((prec > 0) & (rec > 0), 2 * prec * rec / (prec + rec), 0.0)
    f1 = np.where(np.isnan(rec), np.nan, f1)
    agree = (tp + (n - pos - fp)) / n if n else np.array([])
    none = lambda a: [None if np.isnan(v) else float(v) for v in a]  # noqa: E731
    return {"threshold": s[last][::-1].tolist(), "precision": none(prec), "recall": none(rec), "f1": none(f1),
            "agreement": none(agree)}


def _best_threshold(scores: "np.ndarray | list[float]", truth: "np.ndarray | list[bool]") -> tuple[float | None, float | None]:
    """The cut-off t (keep if score >= t) with the best F1 against reviewers; ties: the higher t."""
    if not any(truth):
        return None, None
    c = sweep(np.asarray(scores, dtype=float), np.asarray(truth, dtype=bool))
    f1 = np.array([v or 0.0 for v in c["f1"]])
    k = int(np.flatnonzero(f1 == f1.max())[-1])
    return c["threshold"][k], float(f1[k])


def _plot(curve: pl.DataFrame, current: float | None, best: float | None, score: str, path: Path) -> None:
    from curation.report import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    t = curve["threshold"].to_list()
    for col in ("precision", "recall", "f1"):
        ax.plot(t, [v if v is not None else float("nan") for v in curve[col].to_list()], label=col)
    if current is not None:
        ax.axvline(current, color="grey", linestyle="--", label=f"current {current:.3g}")
    if best is not None:
        ax.axvline(best, color="black", linestyle=":", label=f"best F1 {best:.3g}")
    ax.set_xlabel(f"threshold on {score} (keep if score >= threshold)")
    ax.set_ylabel("agreement with reviewers")
    ax.set_ylim(0, 1.02)
    ax.set_title("CLIP filter vs human review")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------- app


def app_url(manifest: Manifest, address: str | None = None, port: int | None = None) -> str:
    return f"http://{address or manifest.review.address}:{port or manifest.review.port}/datasets/{dataset_name(manifest)}"


def launch_app(
    manifest: Manifest, ws: Workspace, *, address: str | None = None, port: int | None = None,
    view: str | None = None, wait: bool = True, echo=print,
):
    """Serve the App for the review dataset on loopback; when ``wait``, block until SIGINT/SIGTERM, then
    stop FiftyOne's server at once (see `stop_app`). Raises AppPortInUse before anything starts."""
    from curation.config import ReviewSettings

    address = ReviewSettings(address=address).address if address else manifest.review.address
    port = port or manifest.review.port
    _check_port(address, port)
    ds = _load(manifest, ws)
    fo = _fo()
    # Listed before the server starts: a push running while the App is up redefines the views.
    views = ds.list_saved_views()
    if view and view not in views:
        raise ReviewError(f"no saved view {view!r} in dataset {ds.name!r}; saved views: {', '.join(views)}")
    target = ds.load_saved_view(view) if view else ds
    session = fo.launch_app(target, remote=True, address=address, port=port, auto=False)
    echo(f"review App: {app_url(manifest, address, port)}")
    echo("saved views: " + ", ".join(views))
    if wait:
        def stop(signum, frame):
            raise KeyboardInterrupt
        previous = signal.signal(signal.SIGTERM, stop)
        try:
            session.wait(-1)
        except KeyboardInterrupt:
            pass
        finally:
            stop_app()
            signal.signal(signal.SIGTERM, previous)
        echo("review App stopped")
    return session


def _check_port(address: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to listen on
        try:
            sock.bind((address, port))
        except OSError:
            raise AppPortInUse(
                f"port {port} on {address} is already in use (another `review app`?): "
                "pick a free one with --port N, or set review.port in the manifest"
            ) from None


def stop_app() -> int:
    """Kill the FiftyOne App servers this process started; returns how many.

    FiftyOne runs its server under a watcher in a process group of its own, which stops the server
    only after this process is gone, gracefully (30-90 s of serving on). The server holds no state
    (the database does): kill the whole group now.
    """
    import psutil

    n = 0
    for child in psutil.Process().children():
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if "--51-service" in cmd and "server" in cmd:
            pgid = os.getpgid(child.pid)
            if pgid == child.pid and pgid != os.getpgid(0):  # its own group, never ours
                os.killpg(pgid, signal.SIGKILL)
            else:
                for p in [*child.children(recursive=True), child]:
                    p.kill()
            n += 1
    return n

