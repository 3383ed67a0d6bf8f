import json
import os

import polars as pl
import pytest

from curation import catalog
from curation.catalog import Status
from tests import support


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
    before = catalog.version(workspace), workspace.catalog_path.read_bytes()
    df2, _ = catalog.add(df, catalog.rows_frame([row("y")]))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_delta", boom)
    with pytest.raises(OSError):
        catalog.write(workspace, df2)
    assert (catalog.version(workspace), workspace.catalog_path.read_bytes()) == before
    assert catalog.read(workspace)["image_id"].to_list() == ["x"]


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


_KILLED_WRITER = r"""
import sys

import polars as pl
from curation import catalog

ws = catalog.Workspace(sys.argv[1])
n = int(sys.argv[2])

def frame(rows):
    return pl.DataFrame({
        "image_id": [f"{i * 7919 % 65536:04x}{i:060x}" for i in range(rows)],
        "label": [f"class-{i % 97}" for i in range(rows)],
        "note": [f"a note long enough to take some writing {i}" for i in range(rows)],
    })

catalog.write(ws, frame(n))
big = frame(n * 4).with_columns(pl.lit("changed").alias("label"))  # new rows and every old row changed
print("go", flush=True)
catalog.write(ws, big)
print("done", flush=True)
"""


def _data_files(ws):
    found = set()
    for d, _, names in os.walk(ws.table_path):  # tolerates directories vanishing mid-walk
        if "_delta_log" not in d:
            found |= {os.path.join(d, n) for n in names if n.endswith(".parquet")}
    return found


def test_writer_killed_mid_write_leaves_the_previous_version(workspace, tmp_path):
    """SIGKILL skips every finally: only commits that never touch the files of the last version
    keep it readable. Rewriting files in place fails here (a torn or empty catalog); the dead
    writer's files stay unnamed by the log until vacuum removes them."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = tmp_path / "writer.py"
    script.write_text(_KILLED_WRITER)
    n = 6_000
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, str(script), str(workspace.root), str(n)], cwd=root,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(root)})
    try:
        assert proc.stdout.readline() == "go\n"
        before = _data_files(workspace)
        deadline = time.monotonic() + 60
        # Kill as soon as the new version's bytes start to land, wherever the writer puts them.
        while _data_files(workspace) <= before:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        rest = proc.stdout.read()
        proc.wait()
    assert "done" not in rest, "the writer finished before the kill: make the frame bigger"
    assert catalog.version(workspace) == 0
    got = catalog.read(workspace)  # the previous version, whole
    assert got.height == n and set(got["label"].unique()) != {"changed"}
    orphans = _data_files(workspace) - before
    assert orphans, "no new file left: the kill did not land mid-write"

    df, _ = catalog.add(got, catalog.rows_frame([row("new")]))
    catalog.write(workspace, df)
    assert catalog.read(workspace).height == n + 1
    catalog.maintain(workspace, retention_hours=0)
    assert not any(os.path.exists(p) for p in orphans)
    assert catalog.read(workspace).height == n + 1


def test_commit_is_fsynced(workspace, monkeypatch):
    """delta-rs renames the log entry into place without syncing: without an fsync of the entry
    and its directory, a power cut can take back a commit the caller was told succeeded."""
    catalog.write(workspace, catalog.rows_frame([row("x")]))
    synced = support.record_fsyncs(monkeypatch)
    catalog.append(workspace, catalog.rows_frame([row("y")]))
    log = workspace.table_path / "_delta_log"
    assert str(log / f"{1:020d}.json") in synced and str(log) in synced
    assert any(p.endswith(".parquet") and f"_bucket={catalog.INBOX}" in p for p in synced)


# ---------------------------------------------------------------- Delta: append, merge, versions


def _ids(k, prefix=""):
    return [f"{prefix}{i:02x}{'0' * 60}{i:02x}" for i in range(k)]


def _remove_paths(ws, v):
    import json

    log = ws.table_path / "_delta_log" / f"{v:020d}.json"
    return [json.loads(x)["remove"]["path"] for x in log.read_text().splitlines() if "remove" in json.loads(x)]


def test_appends_and_merges_keep_every_row_and_decision(workspace):
    catalog.append(workspace, catalog.rows_frame([row(i) for i in _ids(40)]))
    ids = _ids(40)
    reviewed = pl.DataFrame({"image_id": ids[:10], "review_decision": ["accept"] * 5 + ["reject"] * 5})
    assert catalog.merge(workspace, reviewed) == 10
    # A later stage's columns for other rows, plus ids the catalog does not have (ignored).
    scores = pl.DataFrame({"image_id": ids[5:20] + ["ff" * 32], "clip_score": [0.5] * 15 + [0.9]})
    assert catalog.merge(workspace, scores) == 15
    assert catalog.append(workspace, catalog.rows_frame([row(i, label="b") for i in _ids(5, "f")])) == 5
    v = catalog.version(workspace)
    # a stale full-frame write from a stage that never saw review_decision keeps the decisions
    df = catalog.read(workspace).drop("review_decision").with_columns(pl.lit("checked").alias("note"))
    catalog.write(workspace, df)

    got = catalog.read(workspace)
    assert got.height == 45 and got["image_id"].to_list() == ids + _ids(5, "f")
    assert got["review_decision"].to_list() == ["accept"] * 5 + ["reject"] * 5 + [None] * 35
    assert got["clip_score"].to_list() == [None] * 5 + [0.5] * 15 + [None] * 25
    assert got["note"].to_list() == ["checked"] * 45
    assert catalog.read(workspace, version=v)["note"].to_list() == [None] * 45
    assert catalog.version(workspace) == v + 1


def test_merge_rewrites_only_the_buckets_it_changes(workspace):
    ids = [f"{b:02x}{i:062x}" for b in range(16) for i in range(4)]
    catalog.write(workspace, catalog.rows_frame([row(i) for i in ids[:32]]))
    catalog.append(workspace, catalog.rows_frame([row(i) for i in ids[32:]]))  # into the inbox
    catalog.merge(workspace, pl.DataFrame({"image_id": [ids[0], ids[5]], "status": ["rejected", "accepted"]}))
    removed = _remove_paths(workspace, catalog.version(workspace))
    assert removed and {p.split("/")[0] for p in removed} == {"_bucket=00", "_bucket=01"}
    # a row still in the inbox: the inbox is rewritten with it, the other buckets are not
    catalog.merge(workspace, pl.DataFrame({"image_id": [ids[40]], "status": ["accepted"]}))
    removed = _remove_paths(workspace, catalog.version(workspace))
    assert {p.split("/")[0] for p in removed} == {"_bucket=in"}
    # maintenance moves the inbox's rows to their buckets, keeping every row and value
    assert catalog.maintain(workspace, drain=False)["inbox_rows_moved"] == 0  # not full yet
    assert catalog.maintain(workspace)["inbox_rows_moved"] == 32
    assert not any("_bucket=in" in u for u in catalog._open(workspace).file_uris())
    got = catalog.read(workspace)
    assert got["image_id"].to_list() == ids
    assert got["status"].to_list().count("accepted") == 2 and got["status"][0] == "rejected"


def test_merge_adds_columns_and_keeps_types(workspace):
    catalog.append(workspace, catalog.rows_frame([row(i) for i in _ids(3)]))
    catalog.merge(workspace, pl.DataFrame({"image_id": _ids(1), "fold": pl.Series([2], dtype=pl.Int8),
                                           "seen": [catalog.utcnow()]}))
    got = catalog.read(workspace)
    assert got.schema["fold"] == pl.Int8 and got.schema["retrieved_at"] == pl.Datetime("us", "UTC")
    assert got["fold"].to_list() == [2, None, None]
    # a later frame with the column as a wider type is stored in the table's type
    catalog.merge(workspace, pl.DataFrame({"image_id": _ids(3)[1:], "fold": [1, 0]}))
    assert catalog.read(workspace)["fold"].to_list() == [2, 1, 0]


def test_versions_are_readable_and_bounded(workspace):
    assert catalog.version(workspace) is None and catalog.read(workspace).height == 0
    catalog.append(workspace, catalog.rows_frame([row("x")]))
    catalog.append(workspace, catalog.rows_frame([row("y")]))
    assert catalog.version(workspace) == 1
    assert catalog.read(workspace, version=0)["image_id"].to_list() == ["x"]
    with pytest.raises(catalog.CatalogVersionError, match="version 7 does not exist"):
        catalog.read(workspace, version=7)


def test_periodic_compaction_and_vacuum_keep_rows(workspace, monkeypatch):
    monkeypatch.setattr(catalog, "COMPACT_EVERY", 4)
    monkeypatch.setattr(catalog, "INBOX_MAX_ROWS", 3)  # the inbox is drained once it holds 3 rows
    ids = [f"aa{i:062x}" for i in range(6)]
    for i in ids:
        catalog.append(workspace, catalog.rows_frame([row(i)]))
    live = catalog._open(workspace).file_uris()
    assert len(live) < 6, "the inbox should have been drained and its bucket compacted"
    assert catalog._inbox_size(catalog._open(workspace)) < 3
    assert catalog.read(workspace)["image_id"].to_list() == ids
    assert catalog.read(workspace, version=2).height == 3  # inside the retention: still readable
    catalog.maintain(workspace, retention_hours=0)
    with pytest.raises(catalog.CatalogVersionError):
        catalog.read(workspace, version=2)
    assert catalog.read(workspace)["image_id"].to_list() == ids


def test_pinned_versions_outlive_vacuum_and_log_cleanup(workspace):
    a, b, c = (f"{k}{i:063x}" for k, i in (("a", 1), ("b", 2), ("c", 3)))
    catalog.write(workspace, catalog.rows_frame([row(a), row(b)]))  # v0
    catalog.merge(workspace, pl.DataFrame({"image_id": [a], "label": ["v1"]}))  # v1: a's leaf rewritten
    catalog.merge(workspace, pl.DataFrame({"image_id": [a], "label": ["v2"]}))  # v2
    catalog.pin(workspace, 1, "published v1")
    catalog.pin(workspace, 1, "published v1")  # idempotent
    catalog.append(workspace, catalog.rows_frame([row(c)]))  # v3
    catalog.merge(workspace, pl.DataFrame({"image_id": [a, b], "label": ["v4", "v4"]}))  # v4
    assert catalog.pins(workspace) == {1: ["published v1"]}
    catalog.maintain(workspace, retention_hours=0, log_retention_hours=0)
    log = sorted(p.name for p in (workspace.table_path / "_delta_log").glob("0*"))
    assert f"{0:020d}.json" not in log and f"{2:020d}.json" not in log  # cleaned up, as Delta does
    assert f"{1:020d}.checkpoint.parquet" in log
    assert dict(catalog.read(workspace, version=1).select("image_id", "label").iter_rows()) == {a: "v1", b: "a"}
    for gone in (0, 2):
        with pytest.raises(catalog.CatalogVersionError, match="older than the kept history"):
            catalog.read(workspace, version=gone)
    assert dict(catalog.read(workspace).select("image_id", "label").iter_rows()) == {a: "v4", b: "v4", c: "a"}
    catalog.append(workspace, catalog.rows_frame([row(f"d{4:063x}")]))  # the table goes on from there
    assert catalog.read(workspace).height == 4

    assert catalog.unpin(workspace, 1) == ["published v1"]
    with pytest.raises(catalog.CatalogVersionError, match="not pinned"):
        catalog.unpin(workspace, 1)
    catalog.maintain(workspace, retention_hours=0, log_retention_hours=0)
    with pytest.raises(catalog.CatalogVersionError, match="older than the kept history"):
        catalog.read(workspace, version=1)
    assert catalog.read(workspace).height == 4


def test_pin_costs_count_what_only_the_pinned_versions_read(workspace):
    a, e, f, g = f"a{1:063x}", f"e{2:063x}", f"f{3:063x}", f"9{4:063x}"
    catalog.write(workspace, catalog.rows_frame([row(a), row(e), row(f), row(g)]))  # v0: four leaves
    catalog.pin(workspace, 0, "published v1")
    catalog.merge(workspace, pl.DataFrame({"image_id": [a, f], "label": ["x", "x"]}))  # v1
    catalog.pin(workspace, 1, "published v2")
    catalog.merge(workspace, pl.DataFrame({"image_id": [f, g], "label": ["y", "y"]}))  # v2, the latest
    at = {v: catalog._files_of(workspace.table_path, [v]) for v in range(3)}
    only0, only1 = at[0] - at[1] - at[2], at[1] - at[0] - at[2]
    # e's leaf is everyone's, g's first one both pins', a's second one v1's and the latest's
    assert (len(only0), len(only1)) == (2, 1)  # v0: a's and f's first leaves; v1: f's second
    size = lambda fs: sum((workspace.table_path / p).stat().st_size for p in fs)  # noqa: E731
    assert catalog.pin_costs(workspace) == [
        {"version": 0, "why": ["published v1"], "files": 2, "bytes": size(only0)},
        {"version": 1, "why": ["published v2"], "files": 1, "bytes": size(only1)},
    ]


def test_pinning_an_older_version_keeps_the_latest_checkpoint_pointer(workspace):
    for i in range(3):
        catalog.append(workspace, catalog.rows_frame([row(f"{i:064x}")]))
    catalog._checkpoint(workspace.table_path, catalog._open(workspace))  # the newest checkpoint: v2
    catalog.pin(workspace, 0, "published v1")
    hint = json.loads((workspace.table_path / "_delta_log" / "_last_checkpoint").read_text())
    assert hint["version"] == 2
    catalog.maintain(workspace, retention_hours=0, log_retention_hours=0)
    assert catalog.read(workspace, version=0).height == 1 and catalog.read(workspace).height == 3
    with pytest.raises(catalog.CatalogVersionError, match="does not exist"):
        catalog.pin(workspace, 9, "x")


def test_vacuum_deletes_nothing_while_a_pinned_version_cannot_be_read(workspace, caplog):
    a = f"a{1:063x}"
    catalog.write(workspace, catalog.rows_frame([row(a)]))
    catalog.pin(workspace, 0, "published v1")
    catalog.merge(workspace, pl.DataFrame({"image_id": [a], "label": ["b"]}))
    catalog._checkpoint(workspace.table_path, catalog._open(workspace))  # the latest reads from this one
    (workspace.table_path / "_delta_log" / f"{0:020d}.checkpoint.parquet").write_bytes(b"torn")
    before = {p for p in workspace.table_path.rglob("*.parquet") if "_delta_log" not in p.parts}
    assert catalog.maintain(workspace, retention_hours=0, log_retention_hours=0)["vacuumed_files"] == 0
    assert all(p.exists() for p in before) and "a pinned version could not be read" in caplog.text
    assert catalog.read(workspace)["label"].to_list() == ["b"]


_CONCURRENT = r"""
import sys
import time
from pathlib import Path

import polars as pl
from curation import catalog

ws, col, rounds = catalog.Workspace(sys.argv[1]), sys.argv[2], int(sys.argv[3])
other = {"a": "b", "b": "a"}[col]
for r in range(rounds):  # a stage counting in its own column: each round adds one
    with catalog.locked(ws):
        df = catalog.ensure_columns(catalog.read(ws), {col: pl.Int64})
        # The stage's work between reading and committing, long enough for the other stage to
        # read too when nothing keeps it out (the other's marker shows it has).
        (ws.root / f"read-{col}-{r}").touch()
        deadline = time.monotonic() + 0.3
        while not (ws.root / f"read-{other}-{r}").exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        df = df.with_columns(pl.col(col).fill_null(0) + 1)
        if r % 2:
            catalog.merge(ws, df.select("image_id", col))
        else:  # the whole frame back, as most stages do
            catalog.write(ws, df)
"""


def test_two_processes_committing_at_once_lose_no_update(workspace, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    ids = [f"{b}{i:062x}" for b in ("00", "01") for i in range(16)]  # two buckets: every commit collides
    catalog.write(workspace, catalog.rows_frame([row(i) for i in ids]))
    script = tmp_path / "stage.py"
    script.write_text(_CONCURRENT)
    root = Path(__file__).resolve().parents[2]
    rounds = 4
    env = {**os.environ, "PYTHONPATH": str(root)}  # this checkout's code, not whatever is installed
    procs = [subprocess.Popen([sys.executable, str(script), str(workspace.root), col, str(rounds)], cwd=root, env=env)
             for col in ("a", "b")]
    assert [p.wait(120) for p in procs] == [0, 0]
    got = catalog.read(workspace)
    assert got.height == 32
    assert got["a"].to_list() == [rounds] * 32 and got["b"].to_list() == [rounds] * 32


def test_parquet_workspace_is_migrated_on_first_use(workspace):
    legacy = catalog.rows_frame([row("x", review_decision="accept"), row("y", status="rejected", reason="dup")])
    legacy.write_parquet(workspace.legacy_catalog_path)
    got = catalog.read(workspace)
    assert got.select(legacy.columns).equals(legacy)
    assert catalog.version(workspace) == 0 and not workspace.legacy_catalog_path.exists()
    kept = workspace.root / "catalog.parquet.migrated"
    assert pl.read_parquet(kept).equals(legacy)
    catalog.append(workspace, catalog.rows_frame([row("z")]))
    assert catalog.read(workspace)["image_id"].to_list() == ["x", "y", "z"]
    # a crash after the table was written but before the rename: the rename happens, nothing is doubled
    legacy.write_parquet(workspace.legacy_catalog_path)
    assert catalog.read(workspace).height == 3 and catalog.version(workspace) == 1
    assert not workspace.legacy_catalog_path.exists()


def test_catalog_path_marks_each_commit(workspace):
    assert not workspace.catalog_path.exists()
    catalog.append(workspace, catalog.rows_frame([row("x")]))
    first = workspace.catalog_path.read_bytes()
    catalog.write(workspace, catalog.read(workspace))  # nothing changed: no commit
    assert workspace.catalog_path.read_bytes() == first
    catalog.merge(workspace, pl.DataFrame({"image_id": ["x"], "status": ["accepted"]}))
    assert workspace.catalog_path.read_bytes() != first


# ---------------------------------------------------------------- layout: leaves of bounded size


def _hex_ids(n, seed=0):
    import hashlib

    # two buckets only, so that leaves fill and split with a few rows
    return [("0a", "0b")[i % 2] + hashlib.sha256(f"{seed}-{i}".encode()).hexdigest()[2:] for i in range(n)]


def _leaf_sizes(ws):
    return dict(catalog._leaves(catalog._open(ws)).select(catalog._BUCKET, "rows").iter_rows())


def test_merge_rewrites_only_the_leaves_holding_its_rows(workspace, monkeypatch):
    monkeypatch.setattr(catalog, "LEAF_MAX_ROWS", 8)
    ids = [f"{b}{i:062x}" for b in ("00", "01") for i in range(0, 400, 10)]  # 40 rows a bucket
    catalog.write(workspace, catalog.rows_frame([row(i) for i in ids]))
    sizes = _leaf_sizes(workspace)
    assert len(sizes) >= 10 and max(sizes.values()) <= 8, sizes  # split at the first write
    before = catalog.read(workspace)
    upd = pl.DataFrame({"image_id": [ids[3], ids[4], ids[45]], "status": ["rejected", "accepted", "accepted"]})
    assert catalog.merge(workspace, upd) == 3
    stats = catalog.commit_stats(workspace)
    holding = {catalog._leaf_of(pl.Series([i]), sorted(sizes))[0] for i in upd["image_id"]}
    assert set(stats["leaves_removed"]) == holding and stats["files_removed"] == len(holding)
    assert stats["rows_added"] == sum(sizes[k] for k in holding) <= 3 * 8
    assert catalog.read(workspace).equals(catalog.update(before, upd))


def test_reads_equal_the_expected_frame_through_appends_merges_and_maintenance(workspace, monkeypatch):
    import random

    monkeypatch.setattr(catalog, "LEAF_MAX_ROWS", 6)
    monkeypatch.setattr(catalog, "INBOX_MAX_ROWS", 10)  # appends past 10 rows go to the leaves
    rnd = random.Random(7)
    ids = _hex_ids(150)
    expected = catalog.read(workspace)
    for step, (lo, hi) in enumerate(((0, 30), (30, 34), (34, 60), (60, 63), (63, 100), (100, 150))):
        new = catalog.rows_frame([row(i, label=f"c{j % 3}") for j, i in enumerate(ids[lo:hi])])
        catalog.append(workspace, new)
        expected, _ = catalog.add(expected, new)
        pick = rnd.sample(ids[:hi], 5)
        upd = pl.DataFrame({"image_id": pick, "clip_score": [float(step + j) for j in range(5)]})
        catalog.merge(workspace, upd)
        expected = catalog.update(catalog.ensure_columns(expected, {"clip_score": pl.Float64}), upd)
        got = catalog.read(workspace)
        assert got.equals(expected.select(got.columns)), f"after step {step}"
    monkeypatch.setattr(catalog, "SPLIT_BATCH_ROWS", 12)  # the inbox moves in commits of ~12 leaf rows
    v = catalog.version(workspace)
    assert catalog.maintain(workspace)["inbox_rows_moved"] > 0
    assert catalog.version(workspace) >= v + 2
    assert max(_leaf_sizes(workspace).values()) <= 6 and catalog.INBOX not in _leaf_sizes(workspace)
    got = catalog.read(workspace)
    assert got.equals(expected.select(got.columns))
    # partition-wise reads cover every row exactly once, whatever leaves hold them
    parts = pl.concat([catalog.read_partition(workspace, k) for k in catalog.partitions(workspace)])
    assert parts.sort("image_id").equals(got.sort("image_id"))


def test_inbox_is_shelved_once_per_inbox_max_rows_and_merges_of_its_rows_leave_the_leaves(workspace, monkeypatch):
    """Appends up to INBOX_MAX_ROWS go to the inbox and only a full inbox is shelved (what amortises
    moving rows to their leaves); a merge of rows still in the inbox rewrites the inbox only, not
    the leaves they will move to, unless a leaf holds an earlier copy of one (that copy is the row)."""
    monkeypatch.setattr(catalog, "INBOX_MAX_ROWS", 12)
    ids = _hex_ids(60)
    catalog.write(workspace, catalog.rows_frame([row(i) for i in ids[:30]]))
    leaves = _leaf_sizes(workspace)
    v = catalog.version(workspace)
    for lo in (30, 35):  # 10 rows: below the cap, no shelving
        catalog.append(workspace, catalog.rows_frame([row(i) for i in ids[lo:lo + 5]]))
    assert catalog.version(workspace) == v + 2 and _leaf_sizes(workspace) == {**leaves, catalog.INBOX: 10}
    # rows in the inbox whose leaves exist: only the inbox is rewritten
    upd = pl.DataFrame({"image_id": [ids[30], ids[31]], "clip_score": [0.25, 0.5]})
    assert catalog.merge(workspace, upd) == 2
    assert {p.split("/")[0] for p in _remove_paths(workspace, catalog.version(workspace))} == {f"_bucket={catalog.INBOX}"}
    assert _leaf_sizes(workspace) == {**leaves, catalog.INBOX: 10}
    # an id in a leaf and raced into the inbox: the leaf's (first) row is the one updated
    catalog.append(workspace, catalog.rows_frame([row(ids[0], label="raced")]))
    catalog.merge(workspace, pl.DataFrame({"image_id": [ids[0]], "clip_score": [0.75]}))
    got = catalog.read(workspace).filter(pl.col("image_id") == ids[0]).row(0, named=True)
    assert (got["label"], got["clip_score"]) == ("a", 0.75)
    # the append that fills the inbox shelves it: every row moves to its bucket's shelf, none lost
    catalog.append(workspace, catalog.rows_frame([row(i) for i in ids[40:45]]))
    sizes = _leaf_sizes(workspace)
    assert catalog.INBOX not in sizes and sizes["in0a"] + sizes["in0b"] == 15  # the merge dropped the raced copy
    got = catalog.read(workspace)
    assert got["image_id"].to_list() == ids[:40] + ids[40:45] and got.height == 45
    assert got.filter(pl.col("image_id").is_in([ids[30], ids[31]]))["clip_score"].to_list() == [0.25, 0.5]
    assert got.filter(pl.col("image_id") == ids[0]).row(0, named=True)["clip_score"] == 0.75


def _note(ws, v):
    return next((a["commitInfo"].get("jurassiclass", "") for a in catalog._log_actions(ws.table_path, v) if "commitInfo" in a), "")


def _shelf_rows(ws):
    return {k: n for k, n in _leaf_sizes(ws).items() if k.startswith(catalog.INBOX) and k != catalog.INBOX}


def test_shelving_rewrites_no_shelf_and_full_shelves_drain_to_their_leaves_only(workspace, monkeypatch):
    """A full inbox moves to the shelves of its rows' buckets in one commit that removes the inbox's
    files only (shelved rows are never rewritten by it); a merge of a shelved row rewrites its shelf
    only; a shelf that reaches SHELF_MAX_ROWS moves to its bucket's leaves, the other buckets untouched."""
    monkeypatch.setattr(catalog, "INBOX_MAX_ROWS", 6)
    monkeypatch.setattr(catalog, "SHELF_MAX_ROWS", 8)
    monkeypatch.setattr(catalog, "LEAF_MAX_ROWS", 6)
    ids = [f"{b}{i:062x}" for i in range(40) for b in ("0a", "0b", "0c")]
    base = catalog.rows_frame([row(i) for i in ids[:30]])
    catalog.write(workspace, base)
    leaves = {k: n for k, n in _leaf_sizes(workspace).items() if not k.startswith(catalog.INBOX)}
    expected = catalog.read(workspace)
    nxt = 30
    for _ in range(2):  # two shelvings: 6 rows each, two per bucket
        for _ in range(3):
            new = catalog.rows_frame([row(i) for i in ids[nxt:nxt + 2]])
            catalog.append(workspace, new)
            expected, _ = catalog.add(expected, new)
            nxt += 2
        st = catalog.commit_stats(workspace)
        assert st["leaves_removed"] == [catalog.INBOX] and st["files_added"] == 3 and st["rows_added"] == 6
    assert _shelf_rows(workspace) == {"in0a": 4, "in0b": 4, "in0c": 4}
    assert {k: n for k, n in _leaf_sizes(workspace).items() if not k.startswith(catalog.INBOX)} == leaves
    # compaction leaves the shelves' files alone (a shelf drains whole; compacting each shelving's
    # file into it would rewrite every shelf every time)
    assert catalog.maintain(workspace, drain=False)["inbox_rows_moved"] == 0
    files = catalog._leaves(catalog._open(workspace))
    assert files.filter(pl.col(catalog._BUCKET).str.starts_with("in0"))["files"].to_list() == [2, 2, 2]
    # a merge of a shelved row: its shelf is rewritten, no leaf, no other shelf
    upd = pl.DataFrame({"image_id": [ids[31]], "status": ["accepted"]})
    assert catalog.merge(workspace, upd) == 1
    expected = catalog.update(expected, upd)
    assert catalog.commit_stats(workspace)["leaves_removed"] == ["in0b"]
    # every row is read once, whole and by partition, shelved or not
    got = catalog.read(workspace)
    assert got.equals(expected.select(got.columns))
    parts = pl.concat([catalog.read_partition(workspace, k) for k in catalog.partitions(workspace)])
    assert parts.sort("image_id").equals(got.sort("image_id"))
    # two more shelvings fill every shelf to 8: they drain, each into its own bucket's leaves
    monkeypatch.setattr(catalog, "SPLIT_BATCH_ROWS", 1)
    v0 = catalog.version(workspace)
    for _ in range(4):
        new = catalog.rows_frame([row(i) for i in ids[nxt:nxt + 3]])
        catalog.append(workspace, new)
        expected, _ = catalog.add(expected, new)
        nxt += 3
    assert _shelf_rows(workspace) == {} and catalog.INBOX not in _leaf_sizes(workspace)
    assert max(_leaf_sizes(workspace).values()) <= 6
    notes = {v: _note(workspace, v) for v in range(v0 + 1, catalog.version(workspace) + 1)}
    drains = [catalog.commit_stats(workspace, v) for v, n in notes.items() if n.startswith("drain")]
    assert len(drains) == 3  # a commit per shelf (SPLIT_BATCH_ROWS = 1)
    for st in drains:
        shelf = [k for k in st["leaves_removed"] if k.startswith(catalog.INBOX)]
        assert len(shelf) == 1 and all(k == shelf[0] or k.startswith(shelf[0][2:]) for k in st["leaves_removed"])
        assert len(st["leaves_removed"]) > 1  # the bucket's leaves with it
    got = catalog.read(workspace)
    assert got.equals(expected.select(got.columns)) and got.height == nxt


def test_a_shelf_the_statistics_cannot_vouch_for_is_rewritten_not_lost(workspace, monkeypatch):
    """Shelving's predicate spares shelved rows older than the inbox's; a clock set back (shelved
    rows with a later _seq than the inbox's) makes it rewrite those shelves with the rows moved to
    them, so no shelved row is deleted."""
    monkeypatch.setattr(catalog, "INBOX_MAX_ROWS", 4)
    ids = [f"{b}{i:062x}" for i in range(8) for b in ("0a", "0b")]
    catalog.append(workspace, catalog.rows_frame([row(i) for i in ids[:4]]))  # shelved at once
    assert _shelf_rows(workspace) == {"in0a": 2, "in0b": 2}
    late = catalog._next_seq(workspace)
    monkeypatch.setattr(catalog, "_next_seq", lambda ws: late - 10**12)  # the clock set back
    catalog.append(workspace, catalog.rows_frame([row(i) for i in ids[4:8]]))
    assert _shelf_rows(workspace) == {"in0a": 4, "in0b": 4}
    assert sorted(catalog.commit_stats(workspace)["leaves_removed"]) == ["in", "in0a", "in0b"]
    got = catalog.read(workspace)
    assert sorted(got["image_id"].to_list()) == sorted(ids[:8])


def test_first_layout_table_is_split_by_use_and_maintenance(workspace, monkeypatch):
    """A table written by the first layout (one partition per two-character bucket, no leaves)
    keeps reading the same; a merge splits only the bucket it touches, maintain the rest."""
    ids = [f"{b}{i:062x}" for b in ("0a", "0b", "0c") for i in range(20)]
    old = catalog._with_hidden(catalog.ensure_columns(catalog.rows_frame([row(i) for i in ids]), catalog.SCHEMA), 1)
    assert set(old[catalog._BUCKET]) == {"0a", "0b", "0c"}
    old.write_delta(str(workspace.table_path), delta_write_options={"partition_by": [catalog._BUCKET]})
    before = catalog.read(workspace)
    assert before["image_id"].to_list() == ids
    monkeypatch.setattr(catalog, "LEAF_MAX_ROWS", 8)
    upd = pl.DataFrame({"image_id": [ids[25]], "status": ["accepted"]})
    catalog.merge(workspace, upd)
    stats = catalog.commit_stats(workspace)
    assert stats["leaves_removed"] == ["0b"] and stats["files_added"] >= 3
    assert catalog.read(workspace).equals(catalog.update(before, upd))
    monkeypatch.setattr(catalog, "SPLIT_BATCH_ROWS", 20)  # one leaf a commit: memory stays bounded
    v = catalog.version(workspace)
    assert catalog.maintain(workspace)["leaves_split"] == 2
    assert catalog.version(workspace) == v + 3  # the table's properties, then a commit per batch
    assert max(_leaf_sizes(workspace).values()) <= 8 and len(_leaf_sizes(workspace)) >= 9
    assert catalog.read(workspace).equals(catalog.update(before, upd))
    catalog.merge(workspace, pl.DataFrame({"image_id": [ids[0]], "status": ["rejected"]}))
    assert catalog.commit_stats(workspace)["rows_added"] <= 8


def _stats_columns(workspace, version: int) -> set[str]:
    import json

    acts = catalog._log_actions(workspace.table_path, version)
    return {c for a in acts if "add" in a for c in json.loads(a["add"]["stats"])["minValues"]}


def test_file_statistics_cover_image_id_and_seq_only_also_on_tables_made_before(workspace):
    """Statistics of image_id and _seq only (the log stays small as stages add columns), for new tables and,
    once maintenance has run, for the files later commits write into a table made before the setting."""
    ids = [f"{i:064x}" for i in range(6)]
    old = catalog._with_hidden(catalog.ensure_columns(catalog.rows_frame([row(i) for i in ids[:3]]), catalog.SCHEMA), 1)
    old.write_delta(str(workspace.table_path), delta_write_options={"partition_by": [catalog._BUCKET]})
    catalog.append(workspace, catalog.rows_frame([row(ids[3])]))
    assert {"image_id", "label", "status"} <= _stats_columns(workspace, catalog.version(workspace))
    catalog.maintain(workspace)
    catalog.append(workspace, catalog.rows_frame([row(ids[4])]))
    assert _stats_columns(workspace, catalog.version(workspace)) == {"image_id", "_seq"}
    catalog.merge(workspace, pl.DataFrame({"image_id": [ids[1]], "clip_score": [0.5]}))
    assert _stats_columns(workspace, catalog.version(workspace)) == {"image_id", "_seq"}
    assert catalog.read(workspace)["image_id"].to_list() == ids[:5]


def test_new_tables_keep_statistics_of_image_id_and_seq_only(workspace):
    catalog.append(workspace, catalog.rows_frame([row(f"{i:064x}") for i in range(3)]))
    assert _stats_columns(workspace, catalog.version(workspace)) == {"image_id", "_seq"}


def test_data_files_are_zstd_without_dictionaries_for_per_image_columns(workspace):
    """Appends, merges, compaction and sightings all write through ``_writer_properties``."""
    import pyarrow.parquet as pq

    ids = [f"{i:064x}" for i in range(4)]
    catalog.append(workspace, catalog.rows_frame([row(i) for i in ids[:2]]))
    catalog.merge(workspace, pl.DataFrame({"image_id": ids[:1], "clip_score": [0.5]}))
    catalog.append(workspace, catalog.rows_frame([row(i) for i in ids[2:]]))
    assert catalog.maintain(workspace, drain=False)["compacted_files"] == 2  # the inbox's two files
    catalog.record_sightings(workspace, catalog.rows_frame([row(ids[0])], {c: catalog.SCHEMA[c] for c in catalog.SIGHTING_COLUMNS}))
    files = [*workspace.table_path.rglob("*.parquet"), *workspace.sightings_dir.rglob("*.parquet")]
    data = [f for f in files if "_delta_log" not in f.parts]
    assert data and any(f.is_relative_to(workspace.sightings_dir) for f in data)
    for f in data:
        meta = pq.ParquetFile(f).metadata.row_group(0)
        chunks = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
        assert {c.compression for c in chunks.values()} == {"ZSTD"}, f
        assert not chunks["image_id"].has_dictionary_page and chunks["label"].has_dictionary_page, f


def test_a_table_made_again_at_the_same_path_is_not_caught_up_from_the_old_one(workspace):
    """Commits keep the table open between calls; a catalog deleted and made again by someone else
    (up to the same version) is opened afresh, so a merge sees the new table's rows."""
    import shutil

    old = [f"{i:064x}" for i in range(3)]
    catalog.append(workspace, catalog.rows_frame([row(i) for i in old[:2]]))
    catalog.append(workspace, catalog.rows_frame([row(old[2])]))
    assert catalog.version(workspace) == 1
    shutil.rmtree(workspace.table_path)
    new = [f"{i + 100:064x}" for i in range(2)]
    for k, i in enumerate(new):  # versions 0 and 1 of another table, written outside this process's commits
        frame = catalog._with_hidden(catalog.ensure_columns(catalog.rows_frame([row(i)]), catalog.SCHEMA), k + 1, inbox=True)
        frame.write_delta(str(workspace.table_path), mode="append", delta_write_options={"partition_by": [catalog._BUCKET]})
    assert catalog.merge(workspace, pl.DataFrame({"image_id": [new[1]], "status": ["accepted"]})) == 1
    got = catalog.read(workspace)
    assert got["image_id"].to_list() == new and got["status"].to_list() == ["candidate", "accepted"]


# ---------------------------------------------------------------- sightings


def test_sightings_are_an_append_only_delta_table(workspace):
    assert catalog.read_sightings(workspace).columns == catalog.SIGHTING_COLUMNS
    catalog.record_sightings(workspace, catalog.rows_frame([row("x", source="web", source_url="u1")]))
    catalog.record_sightings(workspace, catalog.rows_frame([row("x", label="b", source_url="u2"), row("y")]))
    got = catalog.read_sightings(workspace)
    assert got.columns == catalog.SIGHTING_COLUMNS and got.schema["retrieved_at"] == pl.Datetime("us", "UTC")
    assert got.select("image_id", "label", "source_url").rows() == [("x", "a", "u1"), ("x", "b", "u2"), ("y", "a", None)]
    from deltalake import DeltaTable

    assert DeltaTable(str(workspace.sightings_dir)).version() == 1  # one commit per record


def test_sighting_parts_are_migrated_once_and_kept(workspace):
    from curation.store import PartsTable

    schema = {c: catalog.SCHEMA[c] for c in catalog.SIGHTING_COLUMNS}
    parts = PartsTable(workspace.sightings_dir, schema)
    for i, url in (("x", "u1"), ("y", "u2")):
        parts.append(catalog.ensure_columns(catalog.rows_frame([row(i, source_url=url)]), schema).select(list(schema)))
    catalog.record_sightings(workspace, catalog.rows_frame([row("z", source_url="u3")]))
    assert catalog.read_sightings(workspace)["source_url"].to_list() == ["u1", "u2", "u3"]
    kept = workspace.root / "sightings.parts.migrated"
    assert len(list(kept.glob("part-*.parquet"))) == 2 and not catalog._old_parts(workspace.sightings_dir)
    assert catalog.read_sightings(workspace).height == 3  # not converted twice
    # a crash after the parts were moved aside but before their rows were committed
    import shutil

    shutil.rmtree(workspace.sightings_dir)
    assert catalog.read_sightings(workspace)["source_url"].to_list() == ["u1", "u2"]


def test_a_stage_commits_only_the_rows_and_columns_it_changed(workspace):
    ids = [f"{b}{i:062x}" for b in ("0a", "0b") for i in range(3)]
    catalog.write(workspace, catalog.rows_frame([row(i) for i in ids]))
    declared = {"clip_score": pl.Float32, "clip_decision": pl.Utf8, "clip_model": pl.Utf8}
    df = catalog.ensure_columns(catalog.read(workspace), declared)
    upd = pl.DataFrame({"image_id": [ids[1]], "clip_score": [0.25]})  # a wider type than declared
    bad = pl.DataFrame({"image_id": [ids[2]], "clip_decision": ["error"], "status": ["rejected"]})
    change = catalog.changes(df, upd, bad)
    assert change.columns == ["image_id", "clip_score", "clip_decision", "status"]
    assert change.schema["clip_score"] == pl.Float32 and change.height == 2
    assert change.filter(pl.col("image_id") == ids[1])["status"].to_list() == ["candidate"]  # kept, not nulled
    catalog.merge(workspace, change, declare=declared)
    assert catalog.commit_stats(workspace)["leaves_removed"] == ["0a"]
    got = catalog.read(workspace)
    assert {c: got.schema[c] for c in declared} == declared  # declared columns exist, typed, null elsewhere
    assert got.equals(catalog.update(df, change).select(got.columns))


def test_periodic_checkpoints_are_flushed(workspace, monkeypatch):
    monkeypatch.setattr(catalog, "CHECKPOINT_EVERY", 2)
    synced = support.record_fsyncs(monkeypatch)
    for i in ("x", "y", "z"):
        catalog.append(workspace, catalog.rows_frame([row(i)]))
    log = workspace.table_path / "_delta_log"
    assert str(log / f"{2:020d}.checkpoint.parquet") in synced and str(log / "_last_checkpoint") in synced
    assert catalog.read(workspace)["image_id"].to_list() == ["x", "y", "z"]
