"""Catalog commit benchmark, one run: today's whole-file parquet rewrite vs the Delta table.

For catalogs of 10k, 1M (and 10M with --big) rows:
1. commit cost of 50, 5,000 and 50,000 new rows: parquet read + add + atomic rewrite (what every
   commit did before) vs ``catalog.append``;
2. commit cost of a stage updating 50, 5,000 and 50,000 existing rows (one column): parquet
   rewrite vs ``catalog.merge``; and ``catalog.write`` (the compatibility path: diff a whole
   frame) for 50 new rows;
3. a scrape-sized sequence at 1M rows: 200 commits of 50 new rows (scrape commits every 50 rows),
   including the periodic compaction/checkpoint/vacuum every 100 versions; the parquet side is
   timed on 5 commits and multiplied (its cost per commit is flat: the whole file every time);
4. peak memory (max RSS) of each case: every case runs in its own process.

    .venv/bin/python benchmarks/bench_catalog.py [--big] [--sizes 10000,1000000]
    .venv/bin/python benchmarks/bench_catalog.py --sizes 10000000 --rows 50 --commits 1 --no-maintain  # 10M, reduced

Rows look like the catalog's: sha256 ids, label, path, size, source URL, status, timestamps and
two stage columns. Timings are wall-clock on a shared 2-core machine: one run each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from curation import catalog  # noqa: E402
from curation.store import fsync_dir  # noqa: E402


def frame(n: int, start: int) -> pl.DataFrame:
    rng = np.random.default_rng(start)
    idx = pl.int_range(start, start + n, eager=True)
    ids = pl.Series(np.frombuffer(rng.bytes(32 * n), dtype="S32")).bin.encode("hex")  # sha256-like, uniform
    return pl.DataFrame({
        "image_id": ids,
        "label": "species-" + (idx % 8).cast(pl.Utf8),
        "path": "store/" + ids.str.slice(0, 2) + "/" + ids + ".jpg",
        "width": pl.Series(rng.integers(200, 4000, n), dtype=pl.Int32),
        "height": pl.Series(rng.integers(200, 4000, n), dtype=pl.Int32),
        "source_url": "https://example.org/images/" + idx.cast(pl.Utf8) + ".jpg",
        "status": pl.Series(["candidate"] * n),
        "retrieved_at": pl.Series([catalog.utcnow()] * n).cast(pl.Datetime("us", "UTC")),
        "phash": pl.Series(np.frombuffer(rng.bytes(8 * n), dtype="S8")).bin.encode("hex"),
        "clip_score": rng.random(n),
    })


# ---------------------------------------------------------------- today's parquet catalog


def parquet_commit(path: Path, new: pl.DataFrame | None = None, upd: pl.DataFrame | None = None) -> None:
    """What a commit cost before: read the whole file, change it, write it whole, rename, fsync."""
    df = pl.read_parquet(path)
    if new is not None:
        df, _ = catalog.add(df, new)
    if upd is not None:
        df = catalog.update(df, upd)
    tmp = path.with_name(f".catalog.{os.getpid()}.parquet")
    df.write_parquet(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# ---------------------------------------------------------------- one case per process


def setup(size: int, base: Path) -> None:
    """Build both catalogs of ``size`` rows once; cases copy nothing, they commit on top."""
    df = frame(size, 0)
    (base / "pq").mkdir(parents=True)
    df.write_parquet(base / "pq" / "catalog.parquet")
    ws = catalog.Workspace(base / "delta").ensure()
    catalog.write(ws, df)


def case(kind: str, size: int, k: int, base: Path, commits: int) -> dict:
    pq = base / "pq" / "catalog.parquet"
    ws = catalog.Workspace(base / "delta")
    out = {"kind": kind, "size": size, "rows": k, "commits": commits}
    if kind.endswith("merge") or kind.endswith("update"):
        ids = pl.read_parquet(pq, columns=["image_id"])["image_id"].sample(k, seed=k)
    times = []
    for c in range(-1, commits):  # the first (c = -1) warms up imports and caches, untimed
        new = frame(k, size + 10_000_000 * (c + 2) + k)
        t = time.perf_counter()
        if kind == "parquet-append":
            parquet_commit(pq, new=new)
        elif kind == "delta-append":
            catalog.append(ws, new)
        elif kind == "delta-write":
            with catalog.locked(ws):
                df, _ = catalog.add(catalog.read(ws), new)
                catalog.write(ws, df)
        elif kind == "parquet-update":
            parquet_commit(pq, upd=pl.DataFrame({"image_id": ids, "clip_score": [0.5 + c] * k}))
        elif kind == "delta-merge":
            catalog.merge(ws, pl.DataFrame({"image_id": ids, "clip_score": [0.5 + c] * k}))
        elif kind == "delta-maintain":
            catalog.maintain(ws)
        if c >= 0:
            times.append(time.perf_counter() - t)
    out["mean_s"] = sum(times) / len(times)
    out["total_s"] = sum(times)
    out["max_s"] = max(times)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_case(kind: str, size: int, k: int, base: Path, commits: int = 3) -> dict:
    args = [sys.executable, __file__, "--case", kind, str(size), str(k), str(base), str(commits)]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"error: case {kind} {size} {k} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"{kind:15s} catalog {size:>10,d}  {k:>6,d} rows x{commits:<4d} mean {res['mean_s'] * 1000:9.1f} ms"
          f"  max {res['max_s'] * 1000:9.1f} ms  peak RSS {res['peak_rss_mb']:7.0f} MB", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--big", action="store_true", help="also 10M rows (several GB, many minutes)")
    ap.add_argument("--sizes", default="10000,1000000")
    ap.add_argument("--rows", default="50,5000,50000")
    ap.add_argument("--sequence", type=int, default=200, help="commits in the scrape-sized sequence at 1M")
    ap.add_argument("--commits", type=int, default=3, help="timed commits per case (after one untimed warm-up)")
    ap.add_argument("--no-maintain", action="store_true", help="skip timing compaction (minutes at 10M)")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    ap.add_argument("--case", nargs=5)
    a = ap.parse_args()
    if a.case:
        kind, size, k, base, commits = a.case
        print(json.dumps(case(kind, int(size), int(k), Path(base), int(commits))))
        return
    sizes = [int(x) for x in a.sizes.split(",")] + ([10_000_000] if a.big else [])
    rows = [int(x) for x in a.rows.split(",")]
    results = []
    for size in sizes:
        base = Path(tempfile.mkdtemp(prefix=f"bench-catalog-{size}-"))
        try:
            t = time.perf_counter()
            setup_proc = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                                         f"sys.argv=['x']; import benchmarks.bench_catalog as b; from pathlib import Path; "
                                         f"b.setup({size}, Path({str(base)!r}))"], capture_output=True, text=True, cwd=ROOT)
            if setup_proc.returncode:
                raise SystemExit(f"error: setup {size} failed:\n{setup_proc.stderr[-3000:]}")
            print(f"-- catalog of {size:,d} rows built in {time.perf_counter() - t:.1f} s "
                  f"(parquet {(base / 'pq' / 'catalog.parquet').stat().st_size / 2**20:.0f} MB)", flush=True)
            for k in rows:
                for kind in ("parquet-append", "delta-append", "parquet-update", "delta-merge"):
                    results.append(run_case(kind, size, k, base, a.commits))
            if size <= 1_000_000:  # reads and diffs the whole catalog: minutes and many GB at 10M
                results.append(run_case("delta-write", size, 50, base, a.commits))
            if size == 1_000_000 and a.sequence:
                seq_pq = run_case("parquet-append", size, 50, base, commits=5)
                seq_dl = run_case("delta-append", size, 50, base, commits=a.sequence)
                pq_total = seq_pq["mean_s"] * a.sequence
                print(f"== scrape-sized sequence at 1M: {a.sequence} commits of 50 rows: parquet ~{pq_total:.1f} s "
                      f"(5 timed x {a.sequence / 5:.0f}), delta {seq_dl['total_s']:.1f} s (maintenance included): "
                      f"{pq_total / seq_dl['total_s']:.1f}x", flush=True)
                results.append({"kind": "sequence", "size": size, "commits": a.sequence,
                                "parquet_s": pq_total, "delta_s": seq_dl["total_s"]})
            if not a.no_maintain:
                results.append(run_case("delta-maintain", size, 0, base, 1))
        finally:
            shutil.rmtree(base, ignore_errors=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
