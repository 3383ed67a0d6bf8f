"""Catalog in, a persistent FiftyOne review dataset out (push); reviewers' tags and label edits back in (pull).

Review vocabulary (sample tags in the App, or any FiftyOne client):
  `accept`            the image is a good example of its label
  `reject`            the image must not be used (wins over a label correction)
  `relabel:<class>`   the image shows <class>; editing the `ground_truth` label does the same
A sample with none of these is not reviewed yet.

The human decision lives in the catalog columns `review_decision` (accept|reject|relabel),
`reviewer_label` and `reviewed_at`; `pull` sets `status` (accepted, or rejected with reason
`reviewer_rejected`) and `label` from them, and keeps what the pipeline had said in
`pre_review_status/_reason/_label` so that a decision taken back in the App restores it.
`push` never writes tags and never overwrites a `ground_truth` a reviewer has edited, so
re-pushing after any upstream stage re-ran loses nothing; a dataset created afresh (new
database) gets its tags back from the catalog.

FiftyOne is imported lazily: it is heavy and reads its database settings at import time
(`FIFTYONE_DATABASE_URI` for a shared MongoDB; unset: the bundled mongod, one user).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import polars as pl

from curation import catalog
from curation.catalog import Status, Workspace
from curation.config import Manifest, ThresholdMode
from curation.progress import track

if TYPE_CHECKING:  # pragma: no cover
    import fiftyone as fo

TAG_ACCEPT = "accept"
TAG_REJECT = "reject"
RELABEL_PREFIX = "relabel:"
_REVIEW_TAG_PATTERNS = [TAG_ACCEPT, TAG_REJECT, re.compile("^" + RELABEL_PREFIX)]
REJECT_REASON = "reviewer_rejected"


class Decision(str, Enum):
    accept = "accept"
    reject = "reject"
    relabel = "relabel"


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
}


class ReviewError(RuntimeError):
    """A review operation that cannot proceed; the message says what to do."""


# ---------------------------------------------------------------- fiftyone access


def _fo():
    """Import FiftyOne with quiet, offline-friendly settings (it reads env at import)."""
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    import fiftyone as fo

    return fo


def dataset_name(manifest: Manifest) -> str:
    return manifest.review.dataset_name or manifest.name


def _load(manifest: Manifest, ws: Workspace, *, create: bool = False) -> "fo.Dataset":
    fo = _fo()
    name = dataset_name(manifest)
    if fo.dataset_exists(name):
        ds = fo.load_dataset(name)
        owner = ds.info.get("workspace")
        if owner and owner != str(ws.root):
            raise ReviewError(
                f"FiftyOne dataset {name!r} belongs to workspace {owner}, not {ws.root}: "
                "set review.dataset_name in the manifest to review this workspace separately"
            )
        return ds
    if not create:
        raise ReviewError(f"no FiftyOne dataset {name!r}: run `jurassiclass review push` first")
    ds = fo.Dataset(name, persistent=True)
    ds.info = {"workspace": str(ws.root), "manifest": manifest.name}
    ds.save()
    return ds


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
    missing = {fld: ftype() for fld, ftype in wanted.items() if fld not in schema}
    if missing:
        try:
            # One schema merge instead of ~30 add_sample_field calls (each reloads the dataset: ~0.15 s).
            ds._sample_doc_cls.merge_field_schema(missing)
            ds._reload()
        except Exception:  # pragma: no cover - a FiftyOne without the bulk path
            for fld, f in missing.items():
                if fld not in ds.get_field_schema():
                    ds.add_sample_field(fld, type(f))
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


def _read_decisions(ds: "fo.Dataset", manifest: Manifest) -> pl.DataFrame:
    """image_id, pushed_label, decision, reviewer_label, problem for every sample in the dataset."""
    ds.reload()
    ids, tags, gt, pushed = ds.values(["image_id", "tags", "ground_truth.label", "pushed_label"])
    classes = _class_lookup(manifest)
    rows = []
    for i, t, g, p in zip(ids, tags, gt, pushed):
        d = decide(t, g, p, classes)
        rows.append((i, p, d.decision.value if d.decision else None, d.label, d.problem))
    cols = ["image_id", "pushed_label", "decision", "reviewer_label", "problem"]
    return pl.DataFrame(rows, schema={c: pl.Utf8 for c in cols}, orient="row")


# ---------------------------------------------------------------- push


@dataclass
class PushSummary:
    dataset: str
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    not_pushable: int = 0  # catalog rows without stored bytes (nothing to look at)
    tags_restored: int = 0  # new samples whose catalog decision was written back as tags
    seconds: float = 0.0
    views: list[str] = field(default_factory=list)


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


def _sample_doc(ds: "fo.Dataset", *, filepath: str, tags: list[str], image_id: str, pushed_label: str | None,
                ground_truth: str | None, fields: dict[str, Any]) -> dict:
    """A sample document laid out as FiftyOne 1.x stores it (what ``Dataset.add_samples`` writes).

    Built directly because ``add_samples`` spends ~2 ms per sample on Sample objects, schema
    checks and re-reading every inserted document; every field here was declared beforehand.
    """
    from bson import ObjectId
    from fiftyone.core.odm.sample import _generate_rand

    now = _utcnow_naive()
    doc = {"filepath": filepath, "tags": tags, "_media_type": "image", "_rand": _generate_rand(),
           "image_id": image_id, "pushed_label": pushed_label}
    if ground_truth is not None:
        doc["ground_truth"] = {"_id": ObjectId(), "_cls": "Classification", "tags": [], "label": ground_truth}
    doc.update((k, v) for k, v in fields.items() if v is not None)
    doc.update(_dataset_id=ds._doc.id, created_at=now, last_modified_at=now)
    return {k: v for k, v in doc.items() if v is not None}


def _insert(ds: "fo.Dataset", docs: list[dict]) -> None:
    ds._sample_collection.insert_many(docs, ordered=True)


def _utcnow_naive():
    # FiftyOne stores naive UTC datetimes (datetime.utcnow()).
    return catalog.utcnow().replace(tzinfo=None)


def _oid(sample_id: str):
    from bson import ObjectId

    return ObjectId(sample_id)


def _set_ops(sets: dict[str, dict]) -> list:
    """UpdateOne per sample: $set the changed fields (None unsets, as FiftyOne stores missing values)."""
    from pymongo import UpdateOne

    now = _utcnow_naive()
    ops = []
    for sid, vals in sets.items():
        upd: dict = {"$set": {"last_modified_at": now, **{k: v for k, v in vals.items() if v is not None}}}
        unset = {k: "" for k, v in vals.items() if v is None}
        if unset:
            upd["$unset"] = unset
        ops.append(UpdateOne({"_id": _oid(sid)}, upd))
    return ops


def push(
    manifest: Manifest, ws: Workspace, *, show_progress: bool = True, batch_size: int = 2000
) -> PushSummary:
    """Create or update the review dataset from the catalog; reviewers' tags and edited labels are kept."""
    _fo()
    t0 = time.perf_counter()
    df = catalog.read(ws)
    prepared = _prepare(manifest, df)
    ds = _load(manifest, ws, create=True)
    s = PushSummary(dataset=ds.name, not_pushable=df.height - df.filter(pl.col("path").is_not_null()).height)
    if not manifest.review.include_rejected:
        s.not_pushable = df.height - prepared.height
    _declare_fields(ds, prepared)
    fields = {**{f: c for c, f in _COPIED.items()}, **{f: f for f in _DERIVED}}

    existing = dict(zip(*ds.values(["image_id", "id"]))) if len(ds) else {}
    new = prepared.filter(~pl.col("image_id").is_in(list(existing)))
    old = prepared.filter(pl.col("image_id").is_in(list(existing)))

    # New samples: plain documents built in memory, inserted in batches.
    if ds.media_type is None:
        ds.media_type = "image"
    batch: list[dict] = []
    for row in track(new.iter_rows(named=True), total=new.height, description="review push", show=show_progress):
        tags = _tags_for(row)
        s.tags_restored += bool(tags)
        shown = row["reviewer_label"] if row["review_decision"] in (Decision.relabel.value, Decision.accept.value) else None
        pushed = row["pre_review_label"] or row["label"]
        batch.append(_sample_doc(
            ds, filepath=str(ws.abspath(row["path"])), tags=tags, image_id=row["image_id"], pushed_label=pushed,
            ground_truth=shown or pushed, fields={f: _py(row[c]) for f, c in fields.items()},
        ))
        if len(batch) >= batch_size:
            _insert(ds, batch)
            batch = []
    if batch:
        _insert(ds, batch)
    s.added = new.height

    # Existing samples: only changed values are written, in one bulk write; never tags.
    if old.height:
        cur_fields = ["image_id", "id", "tags", "ground_truth.label", "pushed_label", *fields]
        cur = dict(zip(cur_fields, ds.values(cur_fields)))
        by_id = {iid: k for k, iid in enumerate(cur["image_id"])}
        pos = [by_id[i] for i in old["image_id"].to_list()]
        sets: dict[str, dict] = {}
        for fld, col in fields.items():
            have_all = cur[fld]
            for k, v in zip(pos, old[col].to_list()):
                v, have = _py(v), have_all[k]
                if have != v and not (isinstance(v, float) and isinstance(have, float) and abs(have - v) < 1e-12):
                    sets.setdefault(cur["id"][k], {})[fld] = v
        ops = _set_ops(sets)
        # The pipeline's label moved (e.g. a label-issue stage): follow it only where nobody reviewed.
        # The filter re-checks in the database, so a reviewer's edit made meanwhile is never overwritten.
        relabelled: set[str] = set()
        for k, lab, dec in zip(pos, old["label"].to_list(), old["review_decision"].to_list()):
            was = cur["pushed_label"][k]
            untouched = cur["ground_truth.label"][k] == was and not _tags_for_review(cur["tags"][k])
            if dec is None and untouched and lab != was and lab is not None:
                from pymongo import UpdateOne

                relabelled.add(cur["id"][k])
                ops.append(UpdateOne(
                    {"_id": _oid(cur["id"][k]), "ground_truth.label": was, "tags": {"$nin": _REVIEW_TAG_PATTERNS}},
                    {"$set": {"pushed_label": lab, "ground_truth.label": lab, "last_modified_at": _utcnow_naive()}},
                ))
        if ops:
            ds._sample_collection.bulk_write(ops, ordered=False)
            ds.reload()  # raw writes: refresh any in-memory samples of this process
        s.updated = len(set(sets) | relabelled)
        s.unchanged = old.height - s.updated

    ds.info = {**ds.info, "workspace": str(ws.root), "manifest": manifest.name, "classes": manifest.class_names,
               "score": manifest.review.score.value}
    ds.save()
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
    """(Re)define the reviewers' saved views; views reviewers saved under other names are untouched."""
    from fiftyone import ViewField as F

    score = manifest.review.score.value
    band = manifest.review.borderline_band
    todo = _not_reviewed_expr()
    views = {
        "not-reviewed": ds.match(todo).sort_by(score),
        "lowest-score-per-class": ds.exists(score).sort_by([("pipeline_label", 1), (score, 1)]),
        "suspected-wrong-label": ds.match(F("wrong_class") == True).sort_by("clip_top_prob", reverse=True),  # noqa: E712
        "dup-label-conflicts": ds.match(F("label_conflict") == True).sort_by([("dup_group", 1), ("pipeline_label", 1)]),  # noqa: E712
        "borderline": ds.match(F("score_gap").abs() <= band).sort_by(F("score_gap").abs()),
        "rescue-rejected": ds.match((F("status") == Status.rejected.value) & todo).sort_by(score, reverse=True),
        "label-issues": ds.match(F("label_issue") == True).sort_by("oof_self_confidence"),  # noqa: E712
    }
    for name, view in views.items():
        if ds.has_saved_view(name):
            ds.delete_saved_view(name)
        ds.save_view(name, view, description=VIEWS[name])
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
    calibration: Path | None = None


def pull(manifest: Manifest, ws: Workspace, *, calibrate_after: bool = True) -> PullSummary:
    """Read reviewers' decisions into the catalog (idempotent: a second pull writes nothing)."""
    ds = _load(manifest, ws)
    dec = _read_decisions(ds, manifest)
    s = PullSummary(dataset=ds.name, samples=dec.height)
    for p, n in dec.filter(pl.col("problem").is_not_null()).group_by("problem").len().iter_rows():
        s.problems[p] = n
    now = catalog.utcnow()
    with catalog.locked(ws):
        df = catalog.ensure_columns(catalog.read(ws), REVIEW_COLUMNS)
        j = df.join(dec, on="image_id", how="inner")
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
                s.cleared += d is None
        if rows:
            upd = pl.DataFrame(rows, schema={"image_id": pl.Utf8, "status": pl.Utf8, "reason": pl.Utf8, "label": pl.Utf8,
                                             **REVIEW_COLUMNS})
            df = catalog.update(df, upd)
            catalog.write(ws, df)
        s.changed = len(rows)
    decided = dec.filter(pl.col("decision").is_not_null())
    s.reviewed = decided.height
    s.rejected = decided.filter(pl.col("decision") == Decision.reject.value).height
    s.relabelled = decided.filter(pl.col("decision") == Decision.relabel.value).height
    s.accepted = s.reviewed - s.rejected
    if rows:
        _mirror(ds, manifest, df, [r["image_id"] for r in rows])
    if calibrate_after and s.reviewed:
        res = calibrate(manifest, ws, df=df)
        s.calibration = res.png if res else None
    return s


def _mirror(ds: "fo.Dataset", manifest: Manifest, df: pl.DataFrame, image_ids: list[str]) -> None:
    """Show the pulled status/label/decision in the App (fields only; tags stay the reviewers')."""
    prepared = _prepare(manifest, df.filter(pl.col("image_id").is_in(image_ids)))
    cols = ["status", "reason", "label", "review_decision", "reviewer_label"]
    cur = dict(zip(["image_id", "id"], ds.values(["image_id", "id"])))
    pos = {iid: k for k, iid in enumerate(cur["image_id"])}
    sub = prepared.filter(pl.col("image_id").is_in(list(pos)))
    sets = {cur["id"][pos[r["image_id"]]]: {_COPIED[c]: _py(r[c]) for c in cols} for r in sub.iter_rows(named=True)}
    if sets:
        ds._sample_collection.bulk_write(_set_ops(sets), ordered=False)
        ds.reload()


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


def calibrate(manifest: Manifest, ws: Workspace, *, df: pl.DataFrame | None = None) -> Calibration | None:
    """How the automatic CLIP decisions agreed with reviewers, and the threshold that matches them best.

    Truth: the reviewer accepted the image under its original label (reject and relabel are
    negatives). Prediction: the CLIP stage kept it (`clip_decision`), or for the sweep,
    `score >= t`. Writes calibration.{csv,md,json,png} to the review stage folder; None when no
    reviewed image has a score.
    """
    score = manifest.review.score.value
    df = catalog.ensure_columns(df if df is not None else catalog.read(ws), {**UPSTREAM_COLUMNS, **REVIEW_COLUMNS})
    rev = df.filter(pl.col("review_decision").is_not_null() & pl.col(score).is_not_null() & pl.col(score).is_not_nan())
    if rev.is_empty():
        return None
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
        best_t, best = _best_threshold(part[score].to_list(), part["truth"].to_list())
        rows.append({"label": lab, **m, "threshold": thr.get(lab) if lab != "ALL" else _common(thr),
                     "best_threshold": best_t, "best_f1": best})
    table = pl.DataFrame(rows)

    scores, truth = rev[score].to_list(), rev["truth"].to_list()
    grid = sorted(set(scores))
    curve = pl.DataFrame(
        [{"threshold": t, **_prf([s >= t for s in scores], truth)} for t in grid]
    ).select("threshold", "precision", "recall", "f1", "agreement")
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


def _best_threshold(scores: list[float], truth: list[bool]) -> tuple[float | None, float | None]:
    """The cut-off t (keep if score >= t) with the best F1 against reviewers; ties: the higher t."""
    if not any(truth):
        return None, None
    best_t, best = None, -1.0
    for t in sorted(set(scores)):
        f1 = _prf([s >= t for s in scores], truth)["f1"] or 0.0
        if f1 >= best:
            best_t, best = t, f1
    return best_t, best


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
    """Serve the App for the review dataset on loopback; blocks until interrupted when ``wait``."""
    from curation.config import ReviewSettings

    address = ReviewSettings(address=address).address if address else manifest.review.address
    port = port or manifest.review.port
    ds = _load(manifest, ws)
    fo = _fo()
    target = ds.load_saved_view(view) if view else ds
    # Listed before the server starts: a push running while the App is up redefines the views.
    views = ds.list_saved_views()
    session = fo.launch_app(target, remote=True, address=address, port=port, auto=False)
    echo(f"review App: {app_url(manifest, address, port)}")
    echo("saved views: " + ", ".join(views))
    if wait:
        session.wait(-1)
    return session

