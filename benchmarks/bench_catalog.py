"""Catalog commit benchmark, one run: today's whole-file parquet rewrite vs the Delta table.

For catalogs of 10k, 1M (and 10M with --big) rows:
1. commit cost of 50, 5,000 and 50,000 new rows: parquet read + add + atomic rewrite (what every
   commit did before) vs ``catalog.append``;
2. commit cost of a stage updating 50, 5,000 and 50,000 existing rows (one column, random ids):
   parquet rewrite vs ``catalog.merge``, with the rows and bytes each merge rewrote (read from
   the Delta log: the files its commit added), so proportionality shows: a merge of k rows
   rewrites at most k leaves of at most ``catalog.LEAF_MAX_ROWS`` rows, the whole table once k
   random rows hit every leaf; and ``catalog.write`` (the compatibility path: diff a whole frame)
   for 50 new rows;
3. a scrape-sized sequence at 1M rows: 200 commits of 50 new rows (scrape commits every 50 rows),
   including the periodic compaction/checkpoint/vacuum every 100 versions, run first on the
   catalog as built; the parquet side is timed on 5 commits and multiplied (its cost per commit
   is flat: the whole file every time);
4. the drain, in its two steps: a full inbox (``catalog.INBOX_MAX_ROWS`` rows) shelved (what one
   append in every INBOX_MAX_ROWS appended rows pays), then full shelves (``SHELF_MAX_ROWS`` rows
   each, all 256: ids are uniform, so they fill together) moved to the leaves (what one append in
   every 256 x SHELF_MAX_ROWS pays). A sequence shorter than the inbox holds no drain, and an
   append cell has one or none, so appends are reported twice: raw (the mean of the commits that
   did not drain) and amortised (raw + rows x (shelving / INBOX_MAX_ROWS + shelf drain / rows it
   moved), the share of both its rows cause); the sequence's figure and the goals use the amortised one;
5. peak memory (max RSS) of each case: every case runs in its own process.

    .venv/bin/python benchmarks/bench_catalog.py [--big] [--sizes 10000,1000000]
    .venv/bin/python benchmarks/bench_catalog.py --sizes 10000,10000000 --rows 50,5000 --commits 1 \
        --no-maintain --sequence 0  # 10M, reduced (~20 min, ~6 GB; the 10k beside it for the goals)

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
    rewritten = []
    if kind.endswith("merge") or kind.endswith("update"):
        ids = pl.read_parquet(pq, columns=["image_id"])["image_id"].sample(k, seed=k)
    if kind == "delta-drain":  # on a copy: the rows it fills the inbox with must not grow the catalog the cells use
        copy = base / "drain-copy"
        shutil.copytree(ws.root, copy)
        try:
            return drain_case(catalog.Workspace(copy), out)
        finally:
            shutil.rmtree(copy, ignore_errors=True)
    times, drained = [], []
    for c in range(-1, commits):  # the first (c = -1) warms up imports and caches, untimed
        # Fresh ids per case: a case must not re-send ids an earlier one already committed.
        new = frame(k, size + 10_000_000 * (c + 2) + k + 1_000 * commits + (7 if kind == "delta-write" else 0))
        v0 = catalog.version(ws)
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
            if kind.startswith("delta"):  # every commit the call made (an append may also drain the inbox)
                vs = range(v0 + 1, catalog.version(ws) + 1)
                drained.append(any(a.get("commitInfo", {}).get("jurassiclass", "").startswith(("shelve", "drain"))
                                   for v in vs for a in catalog._log_actions(ws.table_path, v)))
                sts = [catalog.commit_stats(ws, v) for v in vs]
                rewritten.append(tuple(sum(st[f] for st in sts) for f in ("rows_added", "bytes_added", "files_added")))
    out["mean_s"] = sum(times) / len(times)
    out["total_s"] = sum(times)
    out["max_s"] = max(times)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if kind == "delta-append":
        plain = [t for t, d in zip(times, drained) if not d]
        out["drains"] = sum(drained)
        # Raw: a commit that paid no drain (all did: the mean, drains included, and say so).
        out["raw_s"] = sum(plain) / len(plain) if plain else out["mean_s"]
        out["raw_total_s"] = sum(plain) * len(times) / len(plain) if plain else out["total_s"]
    if rewritten:  # per commit, from the Delta log
        out["rows_written"] = sum(r[0] for r in rewritten) / len(rewritten)
        out["mb_written"] = sum(r[1] for r in rewritten) / len(rewritten) / 2**20
        out["files_written"] = sum(r[2] for r in rewritten) / len(rewritten)
    if kind.startswith("delta"):
        out["leaves"] = catalog._leaves(catalog._open(ws)).height
    return out


def drain_case(ws: catalog.Workspace, out: dict) -> dict:
    """Fill the shelves to SHELF_MAX_ROWS (less an inbox's worth) and the inbox to INBOX_MAX_ROWS,
    untimed; then time shelving the inbox, and moving every shelf to the leaves."""
    cap, start = catalog.INBOX_MAX_ROWS, 500_000_000
    catalog.INBOX_MAX_ROWS = 10**12  # no shelving while filling

    def fill(rows: int) -> None:
        nonlocal start
        while (held := catalog._inbox_size(catalog._open(ws))) < rows:
            n = min(10_000, rows - held)
            catalog.append(ws, frame(n, start))
            start += n

    with catalog.locked(ws):
        fill(256 * catalog.SHELF_MAX_ROWS - cap)
        catalog._shelve(ws)
        fill(cap)
        catalog.INBOX_MAX_ROWS = cap
        v0 = catalog.version(ws)
        t = time.perf_counter()
        out["inbox_rows"] = catalog._shelve(ws)
        out["shelve_s"] = time.perf_counter() - t
        v1 = catalog.version(ws)
        t = time.perf_counter()
        out["shelf_rows"] = catalog._drain_shelves(ws, at_least=1)
        out["drain_s"] = time.perf_counter() - t
    out["per_row_s"] = out["shelve_s"] / out["inbox_rows"] + out["drain_s"] / out["shelf_rows"]
    out["mean_s"] = out["total_s"] = out["max_s"] = out["shelve_s"] + out["drain_s"]
    for name, vs in (("shelve", range(v0 + 1, v1 + 1)), ("drain", range(v1 + 1, catalog.version(ws) + 1))):
        sts = [catalog.commit_stats(ws, v) for v in vs]
        out[f"{name}_rows_written"] = sum(st["rows_added"] for st in sts)
        out[f"{name}_files_written"] = sum(st["files_added"] for st in sts)
        out[f"{name}_mb_written"] = sum(st["bytes_added"] for st in sts) / 2**20
    for f in ("rows", "files", "mb"):
        out[f"{f}_written"] = out[f"shelve_{f}_written"] + out[f"drain_{f}_written"]
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["leaves"] = catalog._leaves(catalog._open(ws)).height
    return out


def amortised(append: dict, per_row_s: float) -> float:
    """An append's cost with its share of shelving and draining: its rows times the cost of both
    per row moved (an append bigger than the inbox goes to the leaves and causes none)."""
    k = append["rows"]
    return append["raw_s"] + (per_row_s * k if k <= catalog.INBOX_MAX_ROWS else 0.0)


def run_case(kind: str, size: int, k: int, base: Path, commits: int = 3) -> dict:
    args = [sys.executable, __file__, "--case", kind, str(size), str(k), str(base), str(commits)]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"error: case {kind} {size} {k} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    wrote = (f"  wrote {res['rows_written']:>10,.0f} rows {res['mb_written']:7.1f} MB {res['files_written']:6.0f} files"
             if "rows_written" in res else "")
    raw = f"  raw {res['raw_s'] * 1000:9.1f} ms ({res['drains']} drained)" if "raw_s" in res else ""
    print(f"{kind:15s} catalog {size:>10,d}  {k:>6,d} rows x{commits:<4d} mean {res['mean_s'] * 1000:9.1f} ms"
          f"  max {res['max_s'] * 1000:9.1f} ms  peak RSS {res['peak_rss_mb']:7.0f} MB{wrote}{raw}", flush=True)
    return res


def goals(results: list[dict]) -> None:
    """The issue's goals, cell by cell, from this run's figures."""
    by = {(r["kind"], r["size"], r.get("rows")): r for r in results}
    sizes = sorted({r["size"] for r in results})
    drains = {r["size"]: r for r in results if r["kind"] == "delta-drain"}
    drain = {size: r["per_row_s"] for size, r in drains.items()}
    print(f"== goals (inbox of {catalog.INBOX_MAX_ROWS:,d} rows, shelves of {catalog.SHELF_MAX_ROWS:,d}; "
          f"appends amortised: raw + rows x (shelving + shelf drain) per row)")
    small = min(sizes)
    for size in sizes:
        if size in drain:
            d = drains[size]
            print(f"drain at {size:>10,d}: shelving {d['shelve_s']:6.2f} s per {d['inbox_rows']:,d} rows (wrote "
                  f"{d['shelve_rows_written']:,d}), shelf drain {d['drain_s']:6.2f} s per {d['shelf_rows']:,d} rows "
                  f"(wrote {d['drain_rows_written']:,d}): {drain[size] * 1e6:.1f} us a row")
        for (kind, sz, k), r in sorted(by.items(), key=lambda x: (x[0][0], x[0][1], x[0][2] or 0)):
            if sz != size:
                continue
            if kind == "delta-append" and r["commits"] < 10 and size in drain:
                am = amortised(r, drain[size])
                line = f"append {k:>6,d} rows at {size:>10,d}: amortised {am * 1000:8.1f} ms (raw {r['raw_s'] * 1000:8.1f} ms)"
                if size != small and (kind, small, k) in by and small in drain:
                    am0 = amortised(by[(kind, small, k)], drain[small])
                    ratio, raw_ratio = am / am0, r["raw_s"] / by[(kind, small, k)]["raw_s"]
                    line += (f"; {ratio:4.1f}x the {small:,d}-row cost (raw {raw_ratio:4.1f}x): "
                             f"{'ok' if ratio <= 2 else 'MISSES'} flat (within 2x)")
                print(line)
            if kind == "delta-merge":
                pq = by.get(("parquet-update", size, k))
                per_row = r.get("rows_written", 0) / k
                bound = k * catalog.LEAF_MAX_ROWS
                prop = r.get("rows_written", 0) <= bound and r.get("rows_written", 0) < size
                speed = f"{pq['mean_s'] / r['mean_s']:5.1f}x faster than the parquet rewrite" if pq else ""
                print(f"merge  {k:>6,d} rows at {size:>10,d}: wrote {per_row:8.1f} rows per changed row; "
                      f"{'proportional (<= k x LEAF_MAX_ROWS, < catalog)' if prop else 'MISSES proportional: rewrote the whole table'}"
                      f"; {speed}")
    for r in results:
        if r["kind"] == "sequence":
            x = r["parquet_s"] / r["delta_s"]
            print(f"scrape sequence at {r['size']:,d}: {x:.1f}x, drains amortised ({'ok' if x >= 20 else 'MISSES'}: goal 20x;"
                  f" {r['parquet_s'] / r['delta_raw_s']:.1f}x as run, with the {r['drains']} drains it held)")
    print(f"peak RSS: {max(r.get('peak_rss_mb', 0) for r in results):.0f} MB (largest case)")


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
            # The scrape's sequence first, on the catalog as built: the big appends below leave a
            # file in every leaf, which the sequence's periodic compaction would then rewrite.
            seq = None
            if size == 1_000_000 and a.sequence:
                seq_pq = run_case("parquet-append", size, 50, base, commits=5)
                seq = run_case("delta-append", size, 50, base, commits=a.sequence)
            # The drain next, on a copy of the catalog as built.
            dr = run_case("delta-drain", size, 0, base, 1)
            results.append(dr)
            if seq is not None:
                pq_total = seq_pq["mean_s"] * a.sequence
                share = dr["per_row_s"] * 50 * a.sequence
                delta_s = seq["raw_total_s"] + share
                print(f"== scrape-sized sequence at 1M: {a.sequence} commits of 50 rows: parquet ~{pq_total:.1f} s "
                      f"(5 timed x {a.sequence / 5:.0f}); delta {seq['raw_total_s']:.1f} s of appends (compaction "
                      f"included) + {share:.2f} s, its rows' share of shelving and draining ({50 * a.sequence:,d} x "
                      f"{dr['per_row_s'] * 1e6:.1f} us) = {delta_s:.1f} s: {pq_total / delta_s:.1f}x "
                      f"amortised ({pq_total / seq['total_s']:.1f}x as run: {seq['total_s']:.1f} s, {seq['drains']} drains)",
                      flush=True)
                results.append({"kind": "sequence", "size": size, "commits": a.sequence, "parquet_s": pq_total,
                                "delta_s": delta_s, "delta_raw_s": seq["total_s"], "drains": seq["drains"]})
            for k in rows:
                for kind in ("parquet-append", "delta-append", "parquet-update", "delta-merge"):
                    results.append(run_case(kind, size, k, base, a.commits))
            if size <= 1_000_000:  # reads and diffs the whole catalog: minutes and many GB at 10M
                results.append(run_case("delta-write", size, 50, base, a.commits))
            if not a.no_maintain:
                results.append(run_case("delta-maintain", size, 0, base, 1))
        finally:
            shutil.rmtree(base, ignore_errors=True)
    goals(results)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
