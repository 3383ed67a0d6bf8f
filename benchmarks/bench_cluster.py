"""Dedup hashing in this process vs per catalog partition on a Dask LocalCluster, same images.

Builds one workspace of N generated JPEGs (tests/support.py textures, 640-1280 px), copies it, then
times the hashing step of the dedup stage (`dedup._hash_rows`: hash + signatures + catalog commit)
in-process on one copy and through `dask_address` on the other, and checks both catalogs hold the
same hashes. The cluster time includes starting it (``--address local``) unless ``--warm`` starts
one first and passes its address (then only the map and the commit are timed).

    .venv/bin/python benchmarks/bench_cluster.py [--n 3000] [--workers 2] [--warm]

What to expect: on one machine the in-process path already uses every core (forked processes),
so a LocalCluster can only add overhead (start-up, one catalog read per partition, pickling);
the gain is on several machines sharing the workspace, where hashing scales with the workers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl

from curation import catalog, dedup, ingest
from curation.catalog import Workspace
from curation.config import parse_manifest
from tests import support


def build(root: Path, n: int) -> None:
    sizes = [(640, 480), (800, 600), (1024, 768), (1280, 960), (600, 800)]
    for i in range(n):
        label = ("cat", "dog", "owl")[i % 3]
        support.write(root / label / f"{i:05d}.jpg",
                      support.encode(support.textured(i, sizes[i % len(sizes)]), "JPEG", quality=90))


def hash_step(m, ws: Workspace, address: str | None) -> float:
    df = catalog.ensure_columns(catalog.read(ws), dedup.COLUMNS)
    todo = df.filter(pl.col("path").is_not_null())
    t0 = time.perf_counter()
    dedup._hash_rows(m, ws, todo, dedup.DedupSummary(), False, address)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (--warm)")
    ap.add_argument("--warm", action="store_true", help="start the cluster before the clock")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_cluster_"))
    try:
        root = tmp / "tree"
        t = time.perf_counter()
        build(root, args.n)
        m = parse_manifest({"name": "b", "classes": [{"name": c} for c in ("cat", "dog", "owl")],
                            "sources": [{"type": "folder", "path": str(root), "license": "cc0"}]})
        a = Workspace(tmp / "a").ensure()
        ingest.run(m, a, show_progress=False)
        shutil.copytree(a.root, tmp / "b", symlinks=True)
        b = Workspace(tmp / "b")
        print(f"{args.n} images built and ingested in {time.perf_counter() - t:.1f} s; "
              f"{os.cpu_count()} cores, {len(catalog.partitions(a))} partitions")

        local = hash_step(m, a, None)
        if args.warm:
            from distributed import LocalCluster

            with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                              dashboard_address=None) as lc:
                dist = hash_step(m, b, lc.scheduler_address)
            how = f"warm LocalCluster of {args.workers}"
        else:
            dist = hash_step(m, b, "local")
            how = "dask_address=local (cluster start included)"
        cols = ["image_id", "phash", "hash_kind"]
        same = catalog.read(a).select(cols).sort("image_id").equals(catalog.read(b).select(cols).sort("image_id"))
        print(f"in-process: {local:.2f} s ({args.n / local:.0f} img/s)")
        print(f"{how}: {dist:.2f} s ({args.n / dist:.0f} img/s), ratio {local / dist:.2f}x; same hashes: {same}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
