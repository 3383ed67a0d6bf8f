"""Publish stage vs `datasets`' own way of writing the same images as parquet, one run, side by side.

    .venv/bin/python benchmarks/bench_publish.py [--n 2000] [--n-large 8000] [--size 640x480]

Both sides write parquet with the image bytes embedded, from the same stored JPEGs:
- ours: `curation.publish.publish` (selection, group-aware splits, shards, card, plots, catalog update);
- peer: `Dataset.from_dict({"image": paths, "label": ...}, features)` then the batched
  `embed_table_storage` map that `push_to_hub` itself uses to embed files, then `to_parquet`
  (the datasets-native path; `to_parquet` alone would store only the file paths).
Each side runs in a fresh process so its peak RSS (ru_maxrss) is its own, with its libraries
imported before the clock starts; the first timing of each is a warm-up of the OS page cache
(both read the same files), the figure is the second.
Memory: ours is measured at N and at a larger N; it should not grow with N (streamed row groups).
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

CLASSES = ["a", "b", "c", "d"]


def manifest(tree: Path):
    from curation.config import parse_manifest

    return parse_manifest({"name": "bench", "classes": [{"name": c} for c in CLASSES],
                           "sources": [{"type": "folder", "path": str(tree), "license": "cc0"}],
                           "publish": {"include": "candidates"}})


def setup(tmp: Path, n: int, size: tuple[int, int]) -> Path:
    """n distinct JPEGs in a class tree, ingested into a workspace (not timed)."""
    from curation import ingest
    from curation.catalog import Workspace
    from tests import support

    tree = tmp / f"tree-{n}"
    for i in range(n):
        support.write(tree / CLASSES[i % len(CLASSES)] / f"{i}.jpg", support.jpeg(i, size, quality=85))
    ws = Workspace(tmp / f"ws-{n}").ensure()
    ingest.run(manifest(tree), ws, show_progress=False)
    return ws.root


def child(mode: str, ws_root: Path, out: Path) -> None:
    import polars as pl

    from curation import catalog, publish
    from curation.catalog import Workspace

    ws = Workspace(ws_root)
    # Library imports (datasets ~1.3 s, matplotlib ~0.6 s here) are start-up, not throughput: both
    # sides import before the clock starts.
    import datasets  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    from datasets.table import embed_table_storage  # noqa: F401

    t0 = time.perf_counter()
    if mode == "ours":
        tree = Path(catalog.read(ws)["source_url"][0].removeprefix("file://")).parent.parent
        shutil.rmtree(ws.root / "published", ignore_errors=True)
        s = publish.publish(manifest(tree), ws, out=out, show_progress=False)
        n = s.images
        # Forget the version so a repeat writes again rather than finding "unchanged".
        shutil.rmtree(ws.root / "published", ignore_errors=True)
    else:
        import datasets
        from datasets.table import embed_table_storage

        df = catalog.read(ws).filter(pl.col("path").is_not_null())
        feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES),
                                   "image_id": datasets.Value("string")})
        ds = datasets.Dataset.from_dict(
            {"image": [str(ws.abspath(p)) for p in df["path"]], "label": [CLASSES.index(x) for x in df["label"]],
             "image_id": df["image_id"].to_list()}, features=feats)
        ds = ds.with_format("arrow").map(embed_table_storage, batched=True, batch_size=1000).with_format(None)
        out.mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(out / "train.parquet"))
        n = len(ds)
    secs = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB (Linux: KB)
    print(json.dumps({"mode": mode, "images": n, "seconds": secs, "peak_rss_mb": rss}))


def run_child(mode: str, ws_root: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    p = subprocess.run([sys.executable, __file__, "--child", mode, "--ws", str(ws_root), "--out", str(out)],
                       capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--n-large", type=int, default=8000)
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--child")
    ap.add_argument("--ws")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.child:
        child(a.child, Path(a.ws), Path(a.out))
        return
    size = tuple(int(x) for x in a.size.split("x"))
    tmp = Path(tempfile.mkdtemp(prefix="bench-publish-"))
    try:
        print(f"setting up {a.n} and {a.n_large} JPEGs ({a.size}) ...", flush=True)
        ws_n, ws_large = setup(tmp, a.n, size), setup(tmp, a.n_large, size)
        mb = sum(p.stat().st_size for p in (ws_n / "store").rglob("*") if p.is_file()) / 1e6
        res = {}
        for mode in ("peer", "ours"):
            run_child(mode, ws_n, tmp / f"out-{mode}")  # warm-up
            res[mode] = run_child(mode, ws_n, tmp / f"out-{mode}")
        big = run_child("ours", ws_large, tmp / "out-large")
        peer_big = run_child("peer", ws_large, tmp / "out-peer-large")
        print(f"\n{a.n} images, {mb:.0f} MB of JPEG bytes")
        print(f"{'':28s}{'images/s':>10s}{'seconds':>10s}{'peak RSS MB':>14s}")
        for mode, label in (("peer", "datasets embed+to_parquet"), ("ours", "jurassiclass publish")):
            r = res[mode]
            print(f"{label:28s}{r['images'] / r['seconds']:10.0f}{r['seconds']:10.2f}{r['peak_rss_mb']:14.0f}")
        ratio = (res["ours"]["images"] / res["ours"]["seconds"]) / (res["peer"]["images"] / res["peer"]["seconds"])
        print(f"ratio (ours/peer images/s): {ratio:.2f}  (goal >= 1.0)")
        print(f"peak RSS at {a.n} vs {a.n_large} images: ours {res['ours']['peak_rss_mb']:.0f} -> {big['peak_rss_mb']:.0f} MB, "
              f"peer {res['peer']['peak_rss_mb']:.0f} -> {peer_big['peak_rss_mb']:.0f} MB")
        print(f"at {a.n_large}: ours {big['images'] / big['seconds']:.0f} img/s, "
              f"peer {peer_big['images'] / peer_big['seconds']:.0f} img/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
