"""Scrape throughput: this project's downloader+validation+store vs img2dataset, same server, same URLs.

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/bench_scrape.py [--n 2000] [--threads 16] \
        [--img2dataset-python /path/to/venv/bin/python] [--rounds 3]

A loopback HTTP server (its own process, so it does not share our GIL) serves N distinct
640x480 JPEGs. img2dataset downloads them in its own interpreter (output_format=files,
resize_mode=no, skip_reencode, sha256, processes_count=2, thread_count=T, 1,000 per shard so
both processes stay busy); then `curation.scrape.run` fetches the same URL list (a `urls`
source, concurrency T in total, per-host cap T) and decodes, validates, hashes and stores each
image (in its fetch worker processes, one per CPU) and commits its catalog rows. Prints images/s for each,
the ratios (ours / theirs: wall-clock, and against img2dataset's steady-state shard clock from
its own per-shard stats) and each side's peak memory (PSS of the whole process tree).
With --rounds R, R rounds in fresh folders, each side first in every other one, and the median
and worst ratio: this machine's load drifts more between runs than the two sides differ.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import resource
import tempfile
import threading
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


_I2D_CHILD = """
import json, sys, time
from img2dataset import download
csv, out, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.time()
download(url_list=csv, input_format="csv", url_col="url", output_folder=out, output_format="files",
         resize_mode="no", skip_reencode=True, extract_exif=False, compute_hash="sha256",
         processes_count=2, thread_count=threads, number_sample_per_shard=1000, timeout=10, retries=0,
         distributor="multiprocessing", enable_wandb=False)
print(json.dumps({"wall": time.time() - t0}))
"""


class PeakRss:
    """Peak memory (PSS) of this process tree (workers included), sampled every 250 ms."""

    def __init__(self, pid: int, exclude: tuple[int, ...] = ()):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self.exclude = set(exclude)  # e.g. the image server, a child of the bench process
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.25):
            try:
                tree = [self.proc, *(c for c in self.proc.children(recursive=True) if c.pid not in self.exclude)]
                total = 0
                for p in tree:
                    try:  # PSS: forked workers share their parent's pages; RSS would count them twice
                        total += p.memory_full_info().pss
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def bench_img2dataset(csv: Path, out: Path, threads: int, python: str) -> tuple[float, float, int, int, float]:
    """img2dataset in its own interpreter (it may live in another venv: it pins pandas<3). Wall-clock
    is timed inside the child around `download()` (imports excluded, as for ours)."""
    import subprocess

    proc = subprocess.Popen([python, "-c", _I2D_CHILD, str(csv), str(out), str(threads)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"})
    rss = PeakRss(proc.pid)
    cpu0 = _cpu(resource.RUSAGE_CHILDREN)
    stdout, stderr = proc.communicate()
    cpu = _cpu(resource.RUSAGE_CHILDREN) - cpu0  # its processes' CPU seconds, start-up included
    peak = rss.stop()
    if proc.returncode != 0:
        raise SystemExit(f"error: img2dataset run failed ({python}): {stderr.strip().splitlines()[-1:]}")
    dt = json.loads(stdout.strip().splitlines()[-1])["wall"]
    stats = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
    ok = sum(st["successes"] for st in stats)
    # img2dataset's own clock, as its final "total" log line computes it: first shard start to last
    # shard end over all its processes (spawn-up, input sharding and teardown excluded).
    span = max(st["end_time"] for st in stats) - min(st["start_time"] for st in stats)
    # Its steady state from the per-shard stats: 2 processes each at the median shard's rate. Higher
    # than the span's rate when the last shard runs alone (e.g. 3 shards on 2 processes).
    rates = sorted(st["successes"] / st["duration"] for st in stats)
    steady = 2 * rates[len(rates) // 2]
    inner = min(span, ok / steady)  # whichever is kinder to img2dataset
    return dt, inner, ok, peak, cpu


def bench_ours(csv: Path, ws_dir: Path, threads: int, n: int, server_pid: int) -> tuple[float, int, int, float]:
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
    rss = PeakRss(os.getpid(), exclude=(server_pid,))
    cpu0 = _cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    s = scrape.run(m, ws, show_progress=False)
    dt = time.perf_counter() - t0
    # this process and its validation workers (reaped when the run ends; the server is still running)
    cpu = _cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN) - cpu0
    peak = rss.stop()
    stored = catalog.read(ws).filter(catalog.pl.col("status") == "candidate").height
    assert stored == s.downloaded, (stored, s.downloaded)
    return dt, stored, peak, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=16, help="our concurrency")
    ap.add_argument("--i2d-threads", type=int, default=None, help="img2dataset's thread_count per process (default: --threads)")
    ap.add_argument("--img2dataset-python", default=sys.executable,
                    help="an interpreter with img2dataset installed (e.g. a venv of its own: it pins pandas<3)")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir, removed)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds, each side first in every other one (the load drifts)")
    args = ap.parse_args()

    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="bench_scrape_"))
    try:
        imgs = tmp / "images"
        t0 = time.perf_counter()
        if len(list(imgs.glob("*.jpg"))) != args.n:  # a reused --workdir keeps its (deterministic) images
            shutil.rmtree(imgs, ignore_errors=True)
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

        i2d_threads = args.i2d_threads or args.threads
        wall, shard = [], []
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds} (load average {os.getloadavg()[0]:.1f})", flush=True)
            # Fresh folders each round, deleted at the end: a deletion's background work (10k files)
            # would land on whichever side ran next.
            out_i, out_o = tmp / f"img2dataset_out{r}", tmp / f"ws{r}"
            for old in (out_i, out_o):  # a reused --workdir
                shutil.rmtree(old, ignore_errors=True)
            # Each side goes first in every other round: a load that drifts within a round favours neither.
            # Each side starts with nothing dirty in the page cache: our commits sync the filesystem,
            # and must not pay for writes the run before left (img2dataset never syncs).
            def theirs():
                os.sync()
                return bench_img2dataset(csv, out_i, i2d_threads, args.img2dataset_python)

            def ours():
                os.sync()
                return bench_ours(csv, out_o, args.threads, args.n, server.pid)

            if r % 2 == 0:
                (dt_i, inner_i, ok_i, rss_i, cpu_i), (dt_o, ok_o, rss_o, cpu_o) = theirs(), ours()
            else:
                (dt_o, ok_o, rss_o, cpu_o), (dt_i, inner_i, ok_i, rss_i, cpu_i) = ours(), theirs()
            rate_i, rate_inner, rate_o = ok_i / dt_i, ok_i / inner_i, ok_o / dt_o
            print(f"img2dataset (2 processes x {i2d_threads} threads): {ok_i}/{args.n} images in {dt_i:.2f}s wall = "
                  f"{rate_i:.0f} images/s; {inner_i:.2f}s by its own shard clock (steady state, no start-up) = {rate_inner:.0f} images/s; "
                  f"peak PSS {rss_i / 2**20:.0f} MiB (all its processes); {cpu_i / ok_i * 1e3:.1f} ms CPU per image")
            print(f"jurassiclass scrape ({args.threads} threads): {ok_o}/{args.n} images in {dt_o:.2f}s wall = "
                  f"{rate_o:.0f} images/s (catalog, journal and summary included); peak PSS {rss_o / 2**20:.0f} MiB "
                  f"(bench process + workers); {cpu_o / ok_o * 1e3:.1f} ms CPU per image")
            print(f"ratio jurassiclass / img2dataset: {rate_o / rate_i:.2f} wall-clock, {rate_o / rate_inner:.2f} vs its shard clock",
                  flush=True)
            wall.append(rate_o / rate_i)
            shard.append(rate_o / rate_inner)
        if args.rounds > 1:
            print(f"{args.rounds} rounds, alternating who goes first: vs its shard clock "
                  f"{', '.join(f'{x:.2f}' for x in shard)} (median {statistics.median(shard):.2f}, worst {min(shard):.2f}); "
                  f"wall-clock median {statistics.median(wall):.2f}")
        server.terminate()
    finally:
        if args.workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
