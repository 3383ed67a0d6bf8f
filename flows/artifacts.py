"""Catalog and stage summaries in, Prefect artifacts out (markdown, tables, links, progress).

Artifacts are published best-effort: a failing artifact call is logged, never fails the stage.
"""

from __future__ import annotations

import time
from pathlib import Path
from uuid import UUID

import polars as pl
from prefect import get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from curation import catalog, report
from curation.catalog import Workspace
from curation.config import Manifest
from flows.common import artifact_key, brief

# Files under a workspace worth linking from a run: plots, cards, metrics, reports.
OUTPUT_SUFFIXES = {".png", ".svg", ".html", ".md", ".json", ".csv", ".yaml"}
MAX_LINKS = 25


def _safe(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # artifacts are a view; the pipeline must not fail on them
        try:
            get_run_logger().warning("artifact not published: %s", exc)
        except Exception:
            pass
        return None


def per_source(df: pl.DataFrame) -> pl.DataFrame:
    """Images per source and status."""
    if df.is_empty():
        return pl.DataFrame(schema={"source": pl.Utf8, "total": pl.UInt32})
    piv = (
        df.with_columns(pl.col("source").fill_null("(none)"))
        .group_by("source", "status").len()
        .pivot(on="status", index="source", values="len")
        .fill_null(0)
    )
    statuses = [s.value for s in catalog.Status if s.value in piv.columns]
    return piv.select("source", *statuses).with_columns(pl.sum_horizontal(*statuses).alias("total")).sort("source")


def _records(df: pl.DataFrame) -> list[dict]:
    return [{k: ("" if v is None else v) for k, v in r.items()} for r in df.to_dicts()]


def stage_summary(m: Manifest, stage: str, summary: dict | list) -> None:
    """A stage's summary as tables: its scalar fields as field/value rows, each list of records
    (e.g. scrape's per class+source counts) as a table of its own, a returned frame as is."""
    if isinstance(summary, list):
        _safe(create_table_artifact, summary or [{"(no rows)": ""}], key=artifact_key(m.name, stage),
              description=f"**{stage}** for `{m.name}`")
        return
    rows = []
    for k, v in summary.items():
        if isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
            _safe(create_table_artifact, [{kk: ("" if vv is None else vv) for kk, vv in r.items()} for r in v],
                  key=artifact_key(m.name, stage, k), description=f"**{stage}**: {k}")
        elif isinstance(v, dict):
            rows += [{"field": f"{k}.{kk}", "value": str(vv)} for kk, vv in v.items()]
        else:
            rows.append({"field": k, "value": str(v)})
    _safe(create_table_artifact, rows or [{"field": "(nothing to do)", "value": ""}],
          key=artifact_key(m.name, stage, "summary"), description=f"**{stage}** summary for `{m.name}`")


def outputs(ws: Workspace) -> list[Path]:
    """Report-like files the stages wrote (newest first), plus the resolved manifest."""
    files = [p for p in (ws.root / "stages").rglob("*") if p.is_file() and p.suffix.lower() in OUTPUT_SUFFIXES] \
        if (ws.root / "stages").exists() else []
    # Caches (embeddings, hashes) live beside reports; only small human-facing files are linked.
    files = [p for p in files if p.stat().st_size < 20_000_000 and "cache" not in p.name.lower()]
    files.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    extra = [ws.root / n for n in ("README.md", "manifest.resolved.yaml") if (ws.root / n).exists()]
    return extra + files


def catalog_report(m: Manifest, ws: Workspace, stages: dict[str, dict | list], *, title: str) -> str:
    """Markdown summary + per-class/source/reason tables + links for the run; returns the markdown."""
    df = catalog.read(ws)
    counts = catalog.counts(df)
    reasons = catalog.reasons(df)
    sources = per_source(df)
    files = outputs(ws)
    lines = [f"# {title}: `{m.name}`", "", f"Workspace: `{ws.root}` ({df.height} images in the catalog)", ""]
    if stages:
        lines += ["## Stages", ""]
        for name, s in stages.items():
            # the same line the parent flow logs: scalars and small mappings (e.g. the pull's problems)
            lines.append(f"- **{name}**: {brief(s)}" + (" (table artifact)" if isinstance(s, list) else ""))
        lines.append("")
    lines += ["## Images per class and status", "", report.markdown_table(counts) if counts.height else "_empty catalog_", ""]
    if sources.height:
        lines += ["## Per source", "", report.markdown_table(sources), ""]
    if reasons.height:
        lines += ["## Rejected, by reason", "", report.markdown_table(reasons), ""]
    if files:
        lines += ["## Outputs", ""] + [f"- [{ws.relpath(p)}]({p.as_uri()})" for p in files[:MAX_LINKS]] + [""]
    md = "\n".join(lines)
    flow = title.split(" ")[0]  # one summary key per flow: build-dataset and collect-review do not overwrite each other
    _safe(create_markdown_artifact, md, key=artifact_key(m.name, flow, "summary"), description=f"{title} of {m.name}")
    if counts.height:
        _safe(create_table_artifact, _records(counts), key=artifact_key(m.name, "per-class"),
              description="images per class and status")
    if sources.height:
        _safe(create_table_artifact, _records(sources), key=artifact_key(m.name, "per-source"),
              description="images per source and status")
    if reasons.height:
        _safe(create_table_artifact, _records(reasons), key=artifact_key(m.name, "per-reason"),
              description="rejected images per reason")
    _safe(create_link_artifact, ws.root.as_uri(), link_text=str(ws.root), key=artifact_key(m.name, "workspace"),
          description="the run's workspace (catalog, store, stage outputs)")
    for p in files[:MAX_LINKS]:
        if p.suffix.lower() in {".png", ".svg", ".html", ".md", ".json"}:
            _safe(create_link_artifact, p.as_uri(), link_text=ws.relpath(p),
                  key=artifact_key(m.name, "out", ws.relpath(p)), description=f"output of {p.parent.name}")
    return md


def targets(m: Manifest, table: pl.DataFrame, line: str) -> None:
    """Classes against their targets after the top-up rounds (the one-line summary as its description)."""
    _safe(create_table_artifact, _records(table), key=artifact_key(m.name, "targets"), description=line)


class Progress:
    """A progress artifact per long loop of a stage (fed by `curation.progress.listening`)."""

    def __init__(self, stage: str, min_interval_s: float = 2.0):
        self.stage = stage
        self.ids: dict[str, UUID | None] = {}
        self.min_interval_s = min_interval_s
        self._last: dict[str, float] = {}

    def __call__(self, description: str, done: int, total: int) -> None:
        pct = 100.0 * done / total if total else 100.0
        text = f"{self.stage}: {description} {done}/{total}"
        if description not in self.ids:
            self.ids[description] = _safe(create_progress_artifact, pct, description=text)
            self._last[description] = time.monotonic()
            return
        art = self.ids[description]
        now = time.monotonic()
        if art is not None and (done >= total or now - self._last[description] >= self.min_interval_s):
            self._last[description] = now
            _safe(update_progress_artifact, art, pct, description=text)


class StepProgress:
    """A flow's progress over its list of stages (one progress artifact, updated per stage)."""

    def __init__(self, flow: str, steps: list[str]):
        self.steps = steps
        self.flow = flow
        self.id = _safe(create_progress_artifact, 0.0, description=f"{flow}: 0/{len(steps)} stages ({', '.join(steps)})")

    def done(self, n: int, last: str) -> None:
        if self.id is not None and self.steps:
            _safe(update_progress_artifact, self.id, 100.0 * n / len(self.steps),
                  description=f"{self.flow}: {n}/{len(self.steps)} stages, last finished: {last}")
