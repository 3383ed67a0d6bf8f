"""Append-only parts tables: compaction shares the appenders' lock and never loses a concurrent append."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import polars as pl

from curation.store import PartsTable

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
