"""Classes against their targets: the top-up rounds and the report, shared by `jurassiclass run` and
the build-dataset flow.

Dedup and CLIP remove images after scrape has counted them, so a class can end short of its target
although its sources still hold more: while a class is short, scrape, dedup and score run again.
"""

from __future__ import annotations

from typing import Callable, Iterable

import polars as pl

from curation import catalog
from curation.catalog import Workspace
from curation.config import Manifest
from curation.scrape import live_counts, shortfall

EXHAUSTED = "sources exhausted"
STALLED = "a round added nothing (failed downloads? see stages/scrape/summary.json; run again later)"


def stored(m: Manifest, ws: Workspace) -> dict[str, int]:
    """Catalog rows per class, any status: what the sources have given so far."""
    df = catalog.read(ws)
    counts = dict(df.group_by("label").len().iter_rows()) if df.height else {}
    return {c: counts.get(c, 0) for c in m.class_names}


def top_up(m: Manifest, ws: Workspace, rounds: int, exhausted: Iterable[str],
           scrape: Callable[[int], Iterable[str]], after: Callable[[int], None]) -> dict[str, str]:
    """Rounds 2..``rounds`` while classes are short of their targets: ``scrape(r)`` runs the scrape
    stage and returns the classes it found exhausted, ``after(r)`` runs dedup and score. A class
    leaves the loop once its sources are exhausted (``exhausted``: those the first scrape found),
    and the loop ends when a round stores nothing new for any short class. Returns why each class
    that stopped early is short."""
    why = {c: EXHAUSTED for c in exhausted}
    for r in range(2, rounds + 1):
        short = {c for c, n in shortfall(m, ws).items() if n} - set(why)
        if not short:
            break
        before = stored(m, ws)
        why.update({c: EXHAUSTED for c in scrape(r)})
        if all(stored(m, ws)[c] == before[c] for c in short):
            why.update({c: STALLED for c in short - set(why)})
            break
        after(r)
    return why


def exhausted_of(scrape_summary: dict) -> list[str]:
    """The classes a scrape summary (as plain data) found exhausted while short."""
    return [c["label"] for c in scrape_summary.get("classes", []) if c["short"] and c["exhausted"]]


def report(m: Manifest, ws: Workspace, why: dict[str, str], default_why: str) -> tuple[pl.DataFrame, str]:
    """Per class: target, images that count (not rejected), shortfall and outcome; plus a one-line summary."""
    have = live_counts(ws)
    rows = []
    for c in m.class_names:
        target, n = m.target_for(c), have[c]
        rows.append({"label": c, "target": target, "images": n, "short": max(0, target - n),
                     "outcome": "met" if n >= target else f"short: {why.get(c, default_why)}"})
    df = pl.DataFrame(rows, schema={"label": pl.Utf8, "target": pl.Int64, "images": pl.Int64, "short": pl.Int64,
                                    "outcome": pl.Utf8})
    short = [r for r in rows if r["short"]]
    line = f"targets: {len(rows) - len(short)} of {len(rows)} classes met"
    if short:
        line += "; " + "; ".join(f"{r['label']} {r['images']}/{r['target']} ({r['outcome']})" for r in short)
    return df, line
