"""Append-only parts tables: compaction shares the appenders' lock and never loses a concurrent append.
The image store: durable puts, deferred ones made durable by one sync before anything refers to them."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from curation import store
from curation.store import ImageStore, PartsTable, deferred_sync
from tests import support

SCHEMA = {"image_id": pl.Utf8, "v": pl.Int64}
ROOT = Path(__file__).resolve().parents[2]


def frame(ids, v=0):
    return pl.DataFrame({"image_id": list(ids), "v": [v] * len(ids)}, schema=SCHEMA)


def test_compact_keeps_rows_appended_after_the_frame_was_read(tmp_path):
    """Callers read, then compact with what they read (dedup, the CLIP cache): a part another
    worker appended in between must survive the compaction."""
    t = PartsTable(tmp_path / "t", SCHEMA)
    t.append(frame(["a", "b"]))
    t.append(frame(["b"], 1))
    seen = t.read().unique("image_id", keep="last", maintain_order=True)
    t.append(frame(["c"], 2))  # a concurrent worker's append
    t.compact(seen)
    assert len(t.parts()) == 1
    got = dict(t.read().sort("image_id").iter_rows())
    assert got == {"a": 0, "b": 1, "c": 2}


def test_compaction_waits_for_an_append_in_progress(tmp_path):
    """A writer holds the table's shared lock for as long as its append takes; compaction takes the
    lock exclusively, so it cannot list, merge and delete parts in the middle of that append."""
    t = PartsTable(tmp_path / "t", SCHEMA)
    t.append(frame(["a"]))
    t.append(frame(["b"]))
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time, polars as pl\n"
         "from curation.store import PartsTable\n"
         f"t = PartsTable({str(tmp_path / 't')!r}, {{'image_id': pl.Utf8, 'v': pl.Int64}})\n"
         "with t.locked(exclusive=False):\n"
         "    print('held', flush=True)\n"
         "    time.sleep(1.5)\n"
         "    t._write_part(pl.DataFrame({'image_id': ['late'], 'v': [3]}))\n"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        start = time.monotonic()
        t.compact()
        waited = time.monotonic() - start
    finally:
        holder.wait(timeout=30)
    assert waited > 0.5
    assert sorted(t.read()["image_id"]) == ["a", "b", "late"] and len(t.parts()) == 1


# ---------------------------------------------------------------- image store durability


def test_put_fsyncs_unless_deferred_and_rewrites_a_file_a_power_cut_emptied(tmp_path, monkeypatch):
    fsyncs = support.record_fsyncs(monkeypatch)
    st = ImageStore(tmp_path / "store")
    _, a = st.put(b"a" * 100, "jpg")
    assert len(fsyncs) == 1 and fsyncs[0].startswith(str(a.parent / f".{a.name}."))  # its temp file, before the rename
    assert a.read_bytes() == b"a" * 100
    fsyncs.clear()
    with deferred_sync():
        _, b = st.put(b"b" * 100, "jpg")
    assert fsyncs == [] and b.read_bytes() == b"b" * 100
    b.write_bytes(b"")  # an unsynced write the power cut left empty: the next put writes it again
    st.put(b"b" * 100, "jpg")
    assert b.read_bytes() == b"b" * 100 and st.intact(b.stem, b) and not st.intact(b.stem, a)


def test_sync_files_without_syncfs_fsyncs_each_file_and_directory(tmp_path, monkeypatch):
    st = ImageStore(tmp_path / "store")
    with deferred_sync():
        paths = [st.put(bytes([i]) * 50, "png")[1] for i in range(3)]
    monkeypatch.setattr(store, "_syncfs", lambda fd: False)  # an OS without syncfs(2)
    fsyncs = support.record_fsyncs(monkeypatch)
    st.sync(paths)
    dirs = {str(p.parent) for p in paths}
    assert set(fsyncs) == {*map(str, paths), *dirs, str(st.root)}
    assert fsyncs.index(str(st.root)) == len(fsyncs) - 1  # the directories after the files they hold


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="syncfs(2) is Linux's")
def test_sync_files_uses_one_syncfs_on_linux(tmp_path, monkeypatch):
    calls = []
    real = store._syncfs
    monkeypatch.setattr(store, "_syncfs", lambda fd: calls.append(fd) or real(fd))
    fsyncs = support.record_fsyncs(monkeypatch)
    st = ImageStore(tmp_path / "store")
    with deferred_sync():
        paths = [st.put(bytes([i]) * 50, "png")[1] for i in range(3)]
    st.sync(paths)
    assert len(calls) == 1 and fsyncs == []
