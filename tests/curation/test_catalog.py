import polars as pl
import pytest

from curation import catalog
from curation.catalog import Status


def row(i: str, **kw):
    base = {"image_id": i, "label": "a", "status": Status.candidate.value, "retrieved_at": catalog.utcnow()}
    base.update(kw)
    return base


def test_add_is_idempotent_and_keyed_by_image_id(workspace):
    df = catalog.read(workspace)
    df, n = catalog.add(df, catalog.rows_frame([row("x"), row("y"), row("x")]))
    assert n == 2
    df, n = catalog.add(df, catalog.rows_frame([row("y"), row("z")]))
    assert n == 1 and df.height == 3
    catalog.write(workspace, df)
    assert catalog.read(workspace)["image_id"].to_list() == ["x", "y", "z"]


def test_write_refuses_to_lose_rows(workspace):
    df, _ = catalog.add(catalog.read(workspace), catalog.rows_frame([row("x"), row("y")]))
    catalog.write(workspace, df)
    with pytest.raises(ValueError, match="loses 1 rows"):
        catalog.write(workspace, df.filter(pl.col("image_id") == "x"))
    assert catalog.read(workspace).height == 2


def test_write_is_atomic_on_failure(workspace, monkeypatch):
    df, _ = catalog.add(catalog.read(workspace), catalog.rows_frame([row("x")]))
    catalog.write(workspace, df)
    before = workspace.catalog_path.read_bytes()
    df2, _ = catalog.add(df, catalog.rows_frame([row("y")]))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", boom)
    with pytest.raises(OSError):
        catalog.write(workspace, df2)
    assert workspace.catalog_path.read_bytes() == before
    assert not list(workspace.root.glob(".catalog.*.parquet"))


def test_update_sets_only_listed_rows_and_adds_columns(workspace):
    df, _ = catalog.add(catalog.read(workspace), catalog.rows_frame([row("x"), row("y")]))
    upd = pl.DataFrame({"image_id": ["y"], "status": ["rejected"], "reason": ["duplicate"], "phash": ["ff"]})
    out = catalog.update(df, upd)
    assert out.filter(pl.col("image_id") == "y").row(0, named=True)["reason"] == "duplicate"
    assert out.filter(pl.col("image_id") == "x").row(0, named=True)["status"] == "candidate"
    assert "phash" in out.columns and out.height == 2


def test_counts_table(workspace):
    df, _ = catalog.add(
        catalog.read(workspace),
        catalog.rows_frame([row("x"), row("y", status="rejected", reason="too_small"), row("z", label="b")]),
    )
    c = catalog.counts(df)
    assert c.filter(pl.col("label") == "a").row(0, named=True) == {
        "label": "a", "candidate": 1, "rejected": 1, "accepted": 0, "total": 2,
    }
    assert catalog.reasons(df).row(0) == ("too_small", 1)
