"""Review push/pull speed on a 10,000-image catalog vs the per-sample FiftyOne loop (`add_sample`).

Run: .venv/bin/python benchmarks/bench_review.py [--images 10000] [--peer 2000]
Starts its own mongod on a free loopback port in a temp dir; push never opens the images, so
the catalog rows point at paths that need not exist.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mongod(tmp: Path) -> tuple[subprocess.Popen, str]:
    binary = Path(importlib.util.find_spec("fiftyone").submodule_search_locations[0]) / "db" / "bin" / "mongod"
    port = free_port()
    proc = subprocess.Popen([str(binary), "--dbpath", str(tmp), "--port", str(port), "--bind_ip", "127.0.0.1",
                             "--nounixsocket"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"mongodb://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("mongod did not start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--peer", type=int, default=2_000, help="images for the per-sample peer loop")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        (tmp / "db").mkdir()
        proc, uri = start_mongod(tmp / "db")
        os.environ.update(FIFTYONE_DATABASE_URI=uri, FIFTYONE_DATABASE_VALIDATION="false", FIFTYONE_DO_NOT_TRACK="true")
        try:
            run(tmp, args.images, args.peer)
        finally:
            proc.terminate()
            proc.wait(30)


def run(tmp: Path, n: int, n_peer: int) -> None:
    import polars as pl

    from curation import catalog, review
    from curation.catalog import Workspace
    from curation.config import parse_manifest

    classes = [f"class{i}" for i in range(8)]
    m = parse_manifest({"name": "bench", "classes": [{"name": c} for c in classes]})
    ws = Workspace(tmp / "ws").ensure()
    rows = [{
        "image_id": f"{i:064x}", "label": classes[i % 8], "path": f"store/{i % 256:02x}/{i:064x}.jpg",
        "width": 640, "height": 480, "source": "bing", "license": "cc-by", "status": "candidate",
        "retrieved_at": catalog.utcnow(), "clip_margin": (i % 100) / 100 - 0.3, "clip_score": 0.25,
        "clip_top_label": classes[(i + (i % 13 == 0)) % 8], "clip_top_prob": 0.7, "clip_decision": "kept",
        "dup_group": str(i // 4) if i % 50 == 0 else None, "label_conflict": False,
    } for i in range(n)]
    catalog.write(ws, catalog.rows_frame(rows, {**catalog.SCHEMA, **review.UPSTREAM_COLUMNS}))

    t = time.perf_counter()
    import fiftyone as fo
    t_import = time.perf_counter() - t
    print(f"import fiftyone: {t_import:.2f} s")

    s = review.push(m, ws, show_progress=False)
    print(f"push, {n} new images (bulk insert + indexes + 6 saved views): {s.seconds:.2f} s "
          f"({n / s.seconds:,.0f} images/s)")
    s2 = review.push(m, ws, show_progress=False)
    print(f"re-push, nothing changed: {s2.seconds:.2f} s ({s2.unchanged} unchanged)")
    df = catalog.read(ws).with_columns((pl.col("clip_margin") + 0.01).alias("clip_margin"))
    catalog.write(ws, df)
    s3 = review.push(m, ws, show_progress=False)
    print(f"re-push, every CLIP margin changed: {s3.seconds:.2f} s ({s3.updated} updated)")

    ds = fo.load_dataset("bench")
    k = n // 10
    ds.take(k, seed=0).tag_samples("accept")
    t = time.perf_counter()
    p = review.pull(m, ws, calibrate_after=False)
    t_pull = time.perf_counter() - t
    print(f"pull, {n} samples with {p.reviewed} decisions: {t_pull:.2f} s ({p.changed} catalog rows written)")
    t = time.perf_counter()
    p2 = review.pull(m, ws, calibrate_after=False)
    print(f"pull again (idempotent, {p2.changed} rows written): {time.perf_counter() - t:.2f} s")
    t = time.perf_counter()
    st = review.status(m, ws)
    print(f"status over {int(st['samples'].sum())} samples: {time.perf_counter() - t:.2f} s")

    # Peer: the per-sample loop a quick script would write (one insert round trip per image).
    peer = fo.Dataset("bench-peer")
    t = time.perf_counter()
    for r in rows[:n_peer]:
        peer.add_sample(fo.Sample(filepath=str(ws.abspath(r["path"])), image_id=r["image_id"],
                                  ground_truth=fo.Classification(label=r["label"]), clip_margin=r["clip_margin"],
                                  status=r["status"], source=r["source"], license=r["license"]))
    t_peer = time.perf_counter() - t
    peer_rate, our_rate = n_peer / t_peer, n / s.seconds
    print(f"peer: per-sample add_sample, {n_peer} images: {t_peer:.2f} s ({peer_rate:,.0f} images/s; "
          f"{n / peer_rate:.0f} s projected for {n})")
    print(f"ratio: push is {our_rate / peer_rate:.1f}x faster per image than the per-sample loop")
    fo.delete_dataset("bench")
    fo.delete_dataset("bench-peer")


if __name__ == "__main__":
    main()
