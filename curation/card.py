"""Published rows + the workspace's stage reports in, a dataset folder's human side out:
README.md (the Hub dataset card), attribution.csv, plots/*.png and publish.json.

The card states what was actually run: counts per class and split, sources and licences, what
was left out and why, every curation stage with its settings and what it removed, reviewer
agreement with CLIP, the changes since the previous version, known limitations, how to load it.
Nothing secret goes in: no token, no local paths but the dataset's own relative files.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from curation import splits
from curation.catalog import Workspace
from curation.config import Manifest
from curation.licenses import terms
from curation.report import markdown_table, pyplot

# Hub licence identifiers for the codes that map to exactly one; anything else is `other`.
_HUB_LICENSE = {"cc0": "cc0-1.0"}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _license_meta(codes: list[str]) -> dict:
    uniq = sorted(set(codes))
    if len(uniq) == 1 and uniq[0] in _HUB_LICENSE:
        return {"license": _HUB_LICENSE[uniq[0]]}
    return {"license": "other", "license_name": "mixed" if len(uniq) > 1 else uniq[0],
            "license_details": "Each image keeps its own licence (column `license`); see the Licences section."}


def _yaml_header(m: Manifest, rows: pl.DataFrame, shards: dict[str, list[Path]], features) -> dict:
    from curation.publish import _size_category

    split_info = []
    for s in splits.SPLITS:
        if s in shards:
            split_info.append({"name": s, "num_bytes": sum(p.stat().st_size for p in shards[s]),
                               "num_examples": rows.filter(pl.col("split") == s).height})
    size = sum(x["num_bytes"] for x in split_info)
    return {
        **_license_meta(rows["license"].to_list()),
        "task_categories": ["image-classification"],
        "size_categories": [_size_category(rows.height)],
        "pretty_name": m.publish.pretty_name or m.name,
        "tags": ["jurassiclass", "curated", "image-classification"],
        "configs": [{"config_name": "default", "data_files": [
            {"split": s, "path": f"data/{s}-*"} for s in splits.SPLITS if s in shards]}],
        "dataset_info": {"features": features._to_yaml_list(), "splits": split_info,
                         "download_size": size, "dataset_size": size},
    }


def _plot_balance(table: pl.DataFrame, path: Path) -> None:
    plt = pyplot()
    import numpy as np

    labels = table["label"].to_list()
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(labels) + 2), 3.6))
    x = np.arange(len(labels))
    cols = [s for s in splits.SPLITS if s in table.columns]
    width = 0.8 / max(1, len(cols))
    for i, s in enumerate(cols):
        ax.bar(x + i * width - 0.4 + width / 2, table[s].to_list(), width, label=s)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel("images")
    ax.set_title("images per class and split")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_scores(rows: pl.DataFrame, column: str, path: Path) -> bool:
    scored = rows.filter(pl.col(column).is_not_null() & pl.col(column).is_not_nan())
    if scored.is_empty():
        return False
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for label in sorted(scored["label"].unique().to_list()):
        ax.hist(scored.filter(pl.col("label") == label)[column].to_list(), bins=30, histtype="step", label=label)
    ax.set_xlabel(column)
    ax.set_ylabel("images")
    ax.set_title(f"{column} of the published images, per class")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def per_class_split(m: Manifest, rows: pl.DataFrame) -> pl.DataFrame:
    """label x split counts in manifest class order, with a total column."""
    base = pl.DataFrame({"label": m.class_names})
    piv = rows.group_by("label", "split").len().pivot(on="split", index="label", values="len")
    out = base.join(piv, on="label", how="left").fill_null(0)
    for s in splits.SPLITS:
        if s not in out.columns:
            out = out.with_columns(pl.lit(0, dtype=pl.UInt32).alias(s))
    out = out.select("label", *splits.SPLITS)
    return out.with_columns(pl.sum_horizontal(*splits.SPLITS).alias("total"))


def _counts(rows: pl.DataFrame, col: str) -> pl.DataFrame:
    return rows.with_columns(pl.col(col).fill_null("(unknown)")).group_by(col).len().rename({"len": "images"}).sort(
        ["images", col], descending=[True, False])


def _curation_section(m: Manifest, ws: Workspace, rows: pl.DataFrame) -> list[str]:
    out = ["## How it was curated", ""]
    src = ", ".join(sorted({s.type for s in m.sources})) or "(none)"
    out.append(f"1. **Collected** from: {src}. Every image keeps its source, query, URL, page, licence, author and "
               "retrieval time; the stored bytes are validated (corrupt, truncated, non-image, too small and "
               f"decompression-bomb files are rejected; shorter side >= {m.images.min_side} px).")
    d = _read_json(ws.root / "stages" / "dedup" / "summary.json")
    if d:
        out.append(f"2. **Deduplicated** across all classes: exact (sha256) and perceptual ({m.dedup.hash.value}, "
                   f"Hamming distance <= {m.dedup.threshold}, thumbnail correlation >= {m.dedup.min_thumb_corr}); "
                   f"{d.get('groups', 0)} duplicate groups, {d.get('duplicates', 0)} duplicates removed, "
                   f"{d.get('label_conflict_groups', 0)} groups spanning labels sent to review. Duplicate groups are "
                   "never split across train/validation/test or folds (column `group`).")
    else:
        out.append("2. **Deduplication** was not run on this workspace.")
    c = m.clip
    thr = c.thresholds.model_dump(mode="json")
    decided = rows["clip_decision"].drop_nulls()
    skipped = (ws.root / "stages" / "score" / "skipped.txt").exists()
    if decided.len() and not (decided == "skipped").all():
        out.append(f"3. **CLIP-scored** with open_clip `{c.model}` (`{c.pretrained}`), prompt ensembles of "
                   f"{len(c.templates)} templates over each class name and synonyms, {len(c.negative_prompts)} "
                   f"negative and {len(c.realistic_prompts)}/{len(c.unrealistic_prompts)} realistic/unrealistic prompts. "
                   f"Thresholds: `{json.dumps(thr)}`"
                   + (f", per class: `{json.dumps({k: v.model_dump(mode='json', exclude_unset=True) for k, v in c.class_thresholds.items()})}`"
                      if c.class_thresholds else "") + ".")
        rep = ws.root / "stages" / "score" / "report.csv"
        if rep.exists():
            try:
                out += ["", "   Decisions over every scored image (before review):", "",
                        "   " + markdown_table(pl.read_csv(rep)).replace("\n", "\n   ")]
            except Exception:  # a report from another version of the stage: the line above still says what ran
                pass
    else:
        out.append("3. **CLIP scoring** was " + ("skipped (weights unavailable)" if skipped else "not run")
                   + ": no image was filtered by relevance or realism.")
    reviewed = rows.filter(pl.col("reviewed"))
    line = f"4. **Human review** in FiftyOne: {reviewed.height} of the {rows.height} published images were reviewed"
    if reviewed.height:
        dec = _counts(reviewed, "review_decision")
        line += " (" + ", ".join(f"{a} {b}" for a, b in dec.iter_rows()) + ")"
    out.append(line + ".")
    cal = _read_json(ws.root / "stages" / "review" / "calibration.json")
    if cal:
        all_row = next((r for r in cal.get("per_class", []) if r.get("label") == "ALL"), None)
        if all_row and all_row.get("agreement") is not None:
            out.append(f"   Reviewer agreement with CLIP's automatic decision: {all_row['agreement']:.1%} over "
                       f"{all_row.get('n')} reviewed images (precision {all_row.get('precision') or 0:.3f}, "
                       f"recall {all_row.get('recall') or 0:.3f}); best threshold on `{cal.get('score')}`: "
                       f"{cal.get('best_threshold')}.")
    inc = m.publish.include.value
    out.append(f"5. **Published** ({'human-accepted images only' if inc == 'accepted' else 'accepted and unreviewed candidate images'}; "
               f"licences allowed: {', '.join(m.publish.licenses)}"
               + ("; non-commercial dataset" if m.publish.non_commercial else "")
               + f"). Splits {json.dumps(m.publish.splits.as_dict())} stratified by class, {m.publish.folds} "
               f"cross-validation folds over train+validation (column `fold`, -1 on test), seed {m.publish.seed}.")
    return out + [""]


def write(m: Manifest, ws: Workspace, rows: pl.DataFrame, folder: Path, *, version: int, digest: str,
          shards: dict[str, list[Path]], features, left_out: dict[str, int], warnings: list[str],
          diff_counts: dict[str, int], catalog_version: int | None = None) -> None:
    plots = folder / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    table = per_class_split(m, rows)
    _plot_balance(table, plots / "class_balance.png")
    score_col = m.review.score.value
    has_scores = _plot_scores(rows, score_col, plots / "clip_scores.png")

    attrib = rows.filter(pl.col("license").map_elements(lambda c: terms(c).attribution_required, return_dtype=pl.Boolean))
    attrib.select("image_id", "label", "split", "author", "license", "source", "source_url", "page_url").sort(
        "label", "image_id").write_csv(folder / "attribution.csv")

    created = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    meta = {
        "dataset": m.name, "version": version, "hash": digest, "created_at": created, "class_names": m.class_names,
        "catalog_version": catalog_version,  # the catalog table version the rows were read from
        "folds": m.publish.folds, "splits": m.publish.splits.as_dict(), "seed": m.publish.seed,
        "include": m.publish.include.value, "licenses_allowed": m.publish.licenses,
        "non_commercial": m.publish.non_commercial, "images": rows.height,
        "counts": {s: rows.filter(pl.col("split") == s).height for s in splits.SPLITS},
        "per_class": table.to_dicts(), "left_out": left_out, "diff": diff_counts, "warnings": warnings,
        "shards": {s: [p.name for p in ps] for s, ps in shards.items()},
    }
    (folder / "publish.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    header = yaml.safe_dump(_yaml_header(m, rows, shards, features), sort_keys=False, allow_unicode=True)
    title = m.publish.pretty_name or m.name
    lic = _counts(rows, "license")
    src = _counts(rows, "source")
    total = table.select(pl.lit("TOTAL").alias("label"), pl.all().exclude("label").sum())
    body = [
        f"# {title}", "",
        m.description or f"An image-classification dataset of {len(m.class_names)} classes.", "",
        f"Version **v{version}** (content hash `{digest[:16]}`), {rows.height} images, {len(m.class_names)} classes, "
        f"built {created} by jurassiclass from the manifest `{m.name}`.", "",
        "## Load it", "",
        "```python", "from datasets import load_dataset", "",
        f'ds = load_dataset("{m.publish.repo_id or "ORG/" + m.name}", revision="v{version}")  # or a local copy of this folder',
        'print(ds["train"].features["label"].names)',
        "# cross-validation: fold k holds out ds['train'] + ds['validation'] rows with fold == k",
        "```", "",
        "Columns: `image`, `label` (class index; names above), `image_id` (sha256 of the image bytes), `fold`, "
        "`group` (duplicate group: images that share it are near-duplicates), `reviewed`, `review_decision`, "
        "provenance (`source`, `query`, `source_url`, `page_url`, `license`, `author`, `retrieved_at`), "
        "`width`, `height`, `format`, `dup_group` and the CLIP scores (`clip_score`, `clip_margin`, "
        "`clip_real_margin`, `clip_top_label`, `clip_decision`).", "",
        "## Classes and splits", "",
        markdown_table(pl.concat([table, total.cast(table.schema)])), "",
        "![images per class and split](plots/class_balance.png)", "",
    ]
    if has_scores:
        body += [f"![{score_col} per class](plots/clip_scores.png)", ""]
    body += ["## Sources", "", markdown_table(src), "",
             "## Licences", "",
             "Every image keeps its own licence (`license`, with `author` and `page_url`). Images that require "
             f"attribution ({attrib.height}) are credited in [attribution.csv](attribution.csv); "
             "share-alike images must be shared under the same licence.", "",
             markdown_table(lic), ""]
    if left_out:
        body += ["### Left out", "",
                 markdown_table(pl.DataFrame({"reason": list(left_out), "images": list(left_out.values())})), ""]
    body += _curation_section(m, ws, rows)
    body += ["## Changes since the previous version", ""]
    body += ([f"- {k}: {v}" for k, v in diff_counts.items()] if version > 1 else ["First version."]) + [""]
    unreviewed = rows.filter(~pl.col("reviewed")).height
    limits = list(warnings)
    if unreviewed:
        limits.append(f"{unreviewed} of {rows.height} images were not reviewed by a person (`reviewed` is false).")
    if not has_scores:
        limits.append("No CLIP relevance filter ran: off-topic images may remain where no person reviewed.")
    limits.append("Images come from web searches and public APIs; labels reflect search queries and review, "
                  "not expert identification, and the class balance reflects what the sources hold.")
    body += ["## Known limitations", "", *[f"- {x}" for x in limits], ""]
    cite = m.publish.citation or (
        f"@misc{{{m.name}_v{version},\n  title = {{{title}}},\n  note = {{Version v{version}, built with jurassiclass}},\n"
        f"  year = {{{created[:4]}}}\n}}")
    body += ["## Citation", "", "```bibtex", cite, "```", ""]
    (folder / "README.md").write_text(f"---\n{header}---\n\n" + "\n".join(body), encoding="utf-8")
