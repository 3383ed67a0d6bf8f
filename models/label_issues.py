"""Out-of-fold probabilities in, confident-learning label-issue candidates out, written to the catalog
(`label_issue`, `oof_top_label`, `oof_self_confidence`, `label_issue_rank`) for review to show."""

from __future__ import annotations

import numpy as np
import polars as pl

from curation import catalog
from curation.catalog import Workspace

COLUMNS: dict[str, pl.DataType] = {
    "label_issue": pl.Boolean,
    "oof_top_label": pl.Utf8,
    "oof_self_confidence": pl.Float64,  # OOF probability of the image's own label: low = suspicious
    "label_issue_rank": pl.Int32,  # 1 = most suspicious
    "oof_model": pl.Utf8,  # experiment/model that produced the probabilities
}


def find(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's `find_label_issues` on (n,) labels and (n, classes) OOF probabilities:
    (boolean mask of issues, issue row indices most suspicious first)."""
    from cleanlab.filter import find_label_issues

    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64)
    ranked = np.asarray(find_label_issues(labels, probs, return_indices_ranked_by="self_confidence"), dtype=np.int64)
    mask = np.zeros(len(labels), dtype=bool)
    mask[ranked] = True
    return mask, ranked


def frame(image_ids: list[str], labels: np.ndarray, probs: np.ndarray, class_names: list[str], source: str) -> pl.DataFrame:
    """Per image: the issue flag, the OOF top label, self-confidence and suspicion rank."""
    mask, ranked = find(labels, probs)
    rank = np.zeros(len(labels), dtype=np.int64)
    rank[ranked] = np.arange(1, len(ranked) + 1)
    labels = np.asarray(labels, dtype=np.int64)
    return pl.DataFrame({
        "image_id": list(image_ids),
        "label_issue": mask,
        "oof_top_label": [class_names[i] for i in probs.argmax(axis=1)],
        "oof_self_confidence": probs[np.arange(len(labels)), labels].astype(np.float64),
        "label_issue_rank": pl.Series([int(r) if r else None for r in rank], dtype=pl.Int32),
        "oof_model": [source] * len(labels),
    }, schema_overrides=COLUMNS)


def write_catalog(ws: Workspace, issues: pl.DataFrame) -> int:
    """Set the columns for the images in ``issues``; earlier results on other images are cleared
    (they came from another dataset version). Returns the number of catalog rows matched."""
    if not ws.catalog_path.exists():
        return 0
    with catalog.locked(ws):
        df = catalog.ensure_columns(catalog.read(ws), COLUMNS)
        matched = df.filter(pl.col("image_id").is_in(issues["image_id"].implode())).height
        stale = df.filter(pl.col("label_issue").is_not_null() & ~pl.col("image_id").is_in(issues["image_id"].implode()))
        clear = stale.select("image_id").with_columns([pl.lit(None, dtype=t).alias(c) for c, t in COLUMNS.items()])
        known = issues.filter(pl.col("image_id").is_in(df["image_id"].implode()))
        catalog.merge(ws, catalog.changes(df, pl.concat([clear, known.select(clear.columns)])), declare=COLUMNS)
    return matched
