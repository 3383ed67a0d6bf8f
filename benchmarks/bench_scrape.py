"""Scrape throughput: this project's downloader+validation+store vs img2dataset, same server, same URLs.

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/bench_scrape.py [--n 2000] [--threads 16]

A loopback HTTP server (its own process, so it does not share our GIL) serves N distinct
640x480 JPEGs. img2dataset downloads them (output_format=files, resize_mode=no, skip_reencode,
sha256, processes_count=2, thread_count=T); then `curation.scrape.run` fetches the same URL
list (a `urls` source, concurrency T, per-host cap T) and decodes, validates, hashes and stores
each image and writes its catalog row. Prints images/s for each and the ratio (ours / theirs).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_images(n: int, folder: Path) -> None:
    """N distinct 640x480 JPEGs (a shared textured base, a unique noise patch each)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    low = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(low, "RGB").resize((640, 480), Image.BICUBIC)).astype(np.int16)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = base.copy()
        arr[:64, :64] += np.random.default_rng(i + 1).integers(-40, 40, size=(64, 64, 3), dtype=np.int16)
        arr += np.random.default_rng(10_000 + i).integers(-6, 6, size=arr.shape, dtype=np.int16)
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").save(buf, "JPEG", quality=90)
        (folder / f"{i:05d}.jpg").write_bytes(buf.getvalue())


def serve(folder: str, port_q) -> None:
    files = {f"/img/{p.name}": p.read_bytes() for p in Path(folder).glob("*.jpg")}

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # TCP_NODELAY, as production servers set it: without it a keep-alive client (ours) waits
        # ~40 ms per response on Nagle + delayed ACK, while img2dataset's one-connection-per-URL does not.
        disable_nagle_algorithm = True

        def log_message(self, *a):
            pass

        def do_GET(self):
            body = files.get(self.path.split("?")[0])
            if body is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    ThreadingHTTPServer.request_queue_size = 512
    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    port_q.put(srv.server_address[1])
    srv.serve_forever()


def bench_img2dataset(csv: Path, out: Path, threads: int) -> tuple[float, float, int]:
    from img2dataset import download

    t0 = time.perf_counter()
    download(
        url_list=str(csv), input_format="csv", url_col="url", output_folder=str(out), output_format="files",
        resize_mode="no", skip_reencode=True, extract_exif=False, compute_hash="sha256",
        processes_count=2, thread_count=threads, number_sample_per_shard=1000, timeout=10, retries=0,
        distributor="multiprocessing", enable_wandb=False,
    )
    dt = time.perf_counter() - t0
    stats = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
    ok = sum(st["successes"] for st in stats)
    # img2dataset's own clock: first shard start to last shard end, without its start-up.
    inner = max(st["end_time"] for st in stats) - min(st["start_time"] for st in stats)
    return dt, inner, ok


def bench_ours(csv: Path, ws_dir: Path, threads: int, n: int) -> tuple[float, int]:
    from curation import catalog, scrape
    from curation.config import parse_manifest

    m = parse_manifest({
        "name": "bench", "classes": [{"name": "a"}],
        "sources": [{"type": "urls", "path": str(csv)}],
        "scrape": {"target_per_class": n, "concurrency": threads, "per_host_concurrency": threads,
                   "timeout_s": 10, "retries": 0, "commit_every": 500,
                   "allow_private_networks": True},
    })
    ws = catalog.Workspace(ws_dir)
    t0 = time.perf_counter()
    s = scrape.run(m, ws, show_progress=False)
    dt = time.perf_counter() - t0
    stored = catalog.read(ws).filter(catalog.pl.col("status") == "candidate").height
    assert stored == s.downloaded, (stored, s.downloaded)
    return dt, stored


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir, removed)")
    args = ap.parse_args()

    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="bench_scrape_"))
    try:
        imgs = tmp / "images"
        t0 = time.perf_counter()
        make_images(args.n, imgs)
        print(f"generated {args.n} JPEGs 640x480 ({sum(p.stat().st_size for p in imgs.glob('*.jpg')) / args.n / 1e3:.0f} kB avg) "
              f"in {time.perf_counter() - t0:.1f}s", flush=True)
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        server = ctx.Process(target=serve, args=(str(imgs), q), daemon=True)
        server.start()
        port = q.get(timeout=60)
        csv = tmp / "urls.csv"
        csv.write_text("url,label\n" + "".join(f"http://127.0.0.1:{port}/img/{i:05d}.jpg,a\n" for i in range(args.n)))

        dt_i, inner_i, ok_i = bench_img2dataset(csv, tmp / "img2dataset_out", args.threads)
        dt_o, ok_o = bench_ours(csv, tmp / "ws", args.threads, args.n)
        rate_i, rate_inner, rate_o = ok_i / dt_i, ok_i / inner_i, ok_o / dt_o
        print(f"img2dataset (2 processes x {args.threads} threads): {ok_i}/{args.n} images in {dt_i:.2f}s wall = "
              f"{rate_i:.0f} images/s; {inner_i:.2f}s by its own shard clock (no start-up) = {rate_inner:.0f} images/s")
        print(f"jurassiclass scrape ({args.threads} threads, 1 process): {ok_o}/{args.n} images in {dt_o:.2f}s wall = "
              f"{rate_o:.0f} images/s (catalog, journal and summary included)")
        print(f"ratio jurassiclass / img2dataset: {rate_o / rate_i:.2f} wall-clock, {rate_o / rate_inner:.2f} vs its shard clock")
        server.terminate()
    finally:
        if args.workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
