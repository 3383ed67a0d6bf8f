"""Catalog in, short human summaries out: rich tables for the terminal, markdown for artifacts."""

from __future__ import annotations

import polars as pl
from rich.console import Console
from rich.table import Table

from curation import catalog

console = Console(stderr=False)


def frame_table(df: pl.DataFrame, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for c in df.columns:
        table.add_column(c, justify="right" if df.schema[c].is_numeric() else "left")
    for row in df.iter_rows():
        table.add_row(*["" if v is None else str(v) for v in row])
    return table


def status_tables(df: pl.DataFrame) -> list[Table]:
    counts = catalog.counts(df)
    if counts.height:
        totals = counts.select(pl.lit("TOTAL").alias("label"), pl.all().exclude("label").sum())
        counts = pl.concat([counts, totals.cast(counts.schema)])
    out = [frame_table(counts, "images per class and status")]
    reasons = catalog.reasons(df)
    if reasons.height:
        out.append(frame_table(reasons, "rejected, by reason"))
    return out


def print_catalog(df: pl.DataFrame) -> None:
    for t in status_tables(df):
        console.print(t)


def markdown_table(df: pl.DataFrame) -> str:
    """A frame as a GitHub-style markdown table (for Prefect artifacts and cards)."""
    head = "| " + " | ".join(df.columns) + " |"
    sep = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in df.iter_rows()]
    return "\n".join([head, sep, *body])


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (stages run headless: workers, CI, servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
