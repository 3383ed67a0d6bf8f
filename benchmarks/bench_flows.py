"""Orchestration overhead benchmark, one run: the same stages called directly vs through Prefect.

The peer is the plain library: `ingest.run` + `dedup.run` on the same folder tree. Through
Prefect the same work runs (a) in-process as the `build-dataset` flow (subflows, tasks,
artifacts), (b) as a deployment run on a local stack (`prefect deployment run --watch`: worker
poll, a new process, imports, pull step), (c) the same with the mapped ingest on a local Dask
cluster, and (d) a re-run of (b) on the finished workspace (all work skipped). Scoring and review
are left out (`skip`) so the figures measure orchestration, not CLIP or MongoDB.

    .venv/bin/python benchmarks/bench_flows.py [--images 600]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from flows.stack import Stack, free_port  # noqa: E402
from tests import support  # noqa: E402

SKIP = ["score", "review-push"]


def make_data(tmp: Path, n: int) -> Path:
    """n distinct JPEGs in 3 class folders, split over two folder sources (so ingest maps)."""
    classes = ["a", "b", "c"]
    for i in range(n):
        root = tmp / ("src1" if i % 2 else "src2")
        support.write(root / classes[i % 3] / f"{i}.jpg", support.jpeg(10_000 + i, (320, 240)))
    m = {"name": "bench", "classes": [{"name": c} for c in classes],
         "sources": [{"type": "folder", "path": str(tmp / "src1")}, {"type": "folder", "path": str(tmp / "src2")}]}
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(m))
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=600)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-flows-") as t:
        tmp = Path(t)
        manifest = make_data(tmp, args.images)
        print(f"{args.images} JPEGs (320x240), 3 classes, 2 folder sources; stages ingest + dedup")

        from curation import dedup, ingest
        from curation.catalog import Workspace
        from curation.config import load_manifest

        m = load_manifest(manifest)
        ws = Workspace(tmp / "ws-direct").ensure()
        t0 = time.perf_counter()
        ingest.run(m, ws, show_progress=False)
        dedup.run(m, ws, show_progress=False)
        direct = time.perf_counter() - t0
        print(f"direct library calls:                 {direct:7.2f} s")

        spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
        spec["deployments"] = [{"name": "bench", "entrypoint": "flows/build_dataset.py:build_dataset",
                                "parameters": {"manifest": str(manifest), "skip": SKIP},
                                "work_pool": {"name": "bench-pool"}}]
        pfile = tmp / "prefect.yaml"
        pfile.write_text(yaml.safe_dump(spec))
        stack = Stack(home=tmp / "home", port=free_port(), pool="bench-pool", prefect_file=pfile, worker_query_seconds=1)
        t0 = time.perf_counter()
        try:
            stack.up()
            print(f"local stack up (server, pool, worker, deploy): {time.perf_counter() - t0:7.2f} s")
            env = stack.env()
            os.environ.update({k: env[k] for k in ("PREFECT_API_URL", "PREFECT_HOME")})

            from flows.build_dataset import build_dataset

            t0 = time.perf_counter()
            build_dataset(str(manifest), workdir=str(tmp / "ws-flow"), skip=SKIP)
            flow = time.perf_counter() - t0
            print(f"in-process build-dataset flow:        {flow:7.2f} s  ({flow / direct:.2f}x direct)")

            def deployment(workdir: str, *extra: str) -> float:
                t0 = time.perf_counter()
                out = subprocess.run([str(Path(sys.executable).with_name("prefect")), "deployment", "run",
                                      "build-dataset/bench", "--param", f"workdir={workdir}", *extra, "--watch"],
                                     cwd=ROOT, env=env, capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(out.stdout[-3000:] + out.stderr[-2000:])
                return time.perf_counter() - t0

            dep = deployment(str(tmp / "ws-dep"))
            print(f"deployment run --watch (threads):     {dep:7.2f} s  ({dep / direct:.2f}x direct)")
            dask = deployment(str(tmp / "ws-dask"), "--param", "dask_address=local")
            print(f"deployment run --watch (Dask local):  {dask:7.2f} s  ({dask / direct:.2f}x direct)")
            rerun = deployment(str(tmp / "ws-dep"))
            print(f"re-run on the finished workspace:     {rerun:7.2f} s  ({rerun / dep:.2f}x the first run)")
            print(f"fixed cost of a deployment run vs in-process: {dep - flow:+.2f} s")
        finally:
            stack.down()


if __name__ == "__main__":
    main()
