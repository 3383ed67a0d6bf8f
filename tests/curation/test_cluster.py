"""Stages as partition-wise work on a real Dask `LocalCluster` (two worker processes on loopback):
the same catalog as the in-process run, per-image failures recorded the same way."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from curation import catalog, clip_score, cluster, dedup, ingest
from curation.catalog import Workspace
from tests import support
from tests.curation.test_clip_score import make_manifest, make_tree, tiny_clip  # noqa: F401 - the session fixture
from tests.curation.test_dedup import manifest_for, variants

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dask_address():
    """A scheduler and two single-threaded worker processes, started once for this module."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as lc:
        yield lc.scheduler_address


def ran_on_cluster(address: str) -> dict[str, int]:
    """Tasks the scheduler has seen, per function name (task key prefix)."""
    from distributed import Client

    with Client(address) as c:
        return c.run_on_scheduler(lambda dask_scheduler: {
            name: p.state_counts["memory"] for name, p in dask_scheduler.task_prefixes.items()
        })


def twin_workspaces(tmp_path: Path, m, bad: str | None = None) -> tuple[Workspace, Workspace]:
    """Two identical workspaces (one ingest, copied: retrieved_at, a ranking tie-break, is the same
    in both); ``bad``: a stored file (by source name) broken after ingest."""
    a = Workspace(tmp_path / "inproc").ensure()
    ingest.run(m, a, show_progress=False)
    if bad:
        row = catalog.read(a).filter(pl.col("source_url").str.ends_with(bad)).row(0, named=True)
        stored = a.abspath(row["path"])
        stored.chmod(0o644)
        stored.write_bytes(support.truncated_jpeg())
    shutil.copytree(a.root, tmp_path / "dask", symlinks=True)
    return a, Workspace(tmp_path / "dask")


@pytest.mark.slow
def test_dedup_hashing_on_the_cluster_gives_the_in_process_catalog(tmp_path, dask_address):
    root = tmp_path / "tree"
    for k in range(2):
        im = support.textured(k, (320, 240))
        label = "cat" if k % 2 == 0 else "dog"
        support.write(root / label / f"orig{k}.jpg", support.encode(im, "JPEG", quality=92))
        for v, data in variants(im).items():
            support.write(root / label / f"orig{k}_{v}.{'png' if v == 'png' else 'jpg'}", data)
    for s in range(100, 108):
        support.write(root / ("cat" if s % 2 else "dog") / f"distinct{s}.jpg", support.jpeg(s, (200, 150)))
    m = manifest_for(root)
    a, b = twin_workspaces(tmp_path, m, bad="distinct101.jpg")
    before = ran_on_cluster(dask_address).get("hash_partition", 0)

    sa = dedup.run(m, a, show_progress=False)
    sb = dedup.run(m, b, show_progress=False, dask_address=dask_address)
    held = cluster.partitions_holding(b, catalog.read(b).filter(pl.col("path").is_not_null())["image_id"])
    assert 10 < len(held) < len(catalog.partitions(b))  # only partitions with work are mapped
    assert ran_on_cluster(dask_address).get("hash_partition", 0) - before == len(held)

    cols = ["image_id", "phash", "hash_kind", "dup_group", "dup_of", "label_conflict", "status", "reason"]
    ca, cb = (catalog.read(w).select(cols).sort("image_id") for w in (a, b))
    assert ca.filter(pl.col("dup_group").is_not_null()).height == 2 * 7  # the comparison is not vacuous
    assert ca["phash"].null_count() == 1  # the broken file
    assert cb.equals(ca)
    sig_a, sig_b = (dedup.read_signatures(w).sort("image_id") for w in (a, b))
    assert sig_b.height == ca.height - 1 and sig_b.equals(sig_a)
    for f in ("images", "hashed", "hash_failed", "failures", "groups", "duplicates", "newly_rejected", "accepted_pairs"):
        assert getattr(sb, f) == getattr(sa, f), f
    assert (sb.hashed, sb.hash_failed) == (ca.height - 1, 1)

    # A re-run on the cluster finds nothing to hash and changes nothing.
    tip = b.catalog_path.read_bytes()
    again = dedup.run(m, b, show_progress=False, dask_address=dask_address)
    assert (again.hashed, again.rows_changed) == (0, 0) and b.catalog_path.read_bytes() == tip


@pytest.mark.slow
def test_clip_encoding_on_the_cluster_gives_the_in_process_cache_and_scores(tmp_path, dask_address, tiny_clip):
    root = tmp_path / "tree"
    make_tree(root, per_class=3)
    m = make_manifest(root, tiny_clip)
    a, b = twin_workspaces(tmp_path, m, bad="dog2.jpg")
    before = ran_on_cluster(dask_address).get("encode_partition", 0)

    sa = clip_score.run(m, a, show_progress=False)
    sb = clip_score.run(m, b, show_progress=False, dask_address=dask_address)
    held = cluster.partitions_holding(b, catalog.read(b)["image_id"])
    assert ran_on_cluster(dask_address).get("encode_partition", 0) - before == len(held)
    assert (sb.eligible, sb.encoded, sb.cached, sb.failed) == (sa.eligible, sa.encoded, sa.cached, sa.failed) == (9, 8, 0, 1)
    assert sb.decisions == sa.decisions and sb.device == "cpu on dask"

    # The same cache (same key: device class and precision), the same vectors.
    (ka,), (kb,) = ([p.name for p in (w.root / "stages/score/embeddings").iterdir()] for w in (a, b))
    assert ka == kb
    ea, eb = (clip_score.EmbeddingCache(w.root / "stages/score/embeddings" / ka).table.read().sort("image_id") for w in (a, b))
    assert eb["image_id"].to_list() == ea["image_id"].to_list() and ea.height == 8
    assert np.allclose(np.stack(eb["embedding"].to_list()), np.stack(ea["embedding"].to_list()), atol=1e-5)

    cols = ["image_id", "status", "reason", "clip_decision", "clip_top_label", "clip_model", "note"]
    ca, cb = (catalog.read(w).sort("image_id") for w in (a, b))
    assert cb.select(cols).equals(ca.select(cols))
    for c in clip_score.SCORE_COLUMNS[:3]:
        assert np.allclose(cb[c].fill_null(9).to_numpy(), ca[c].fill_null(9).to_numpy(), atol=1e-5), c
    broken = cb.filter(pl.col("source_url").str.ends_with("dog2.jpg")).row(0, named=True)
    assert (broken["status"], broken["reason"], broken["clip_decision"]) == ("rejected", "unreadable", "error")

    # Re-run: everything comes from the cache the workers wrote.
    again = clip_score.run(m, b, show_progress=False, dask_address=dask_address)
    assert (again.encoded, again.cached, again.failed) == (0, 8, 0)  # the broken file is decided: rejected


def test_a_setup_error_on_a_worker_reaches_the_caller(tmp_path, dask_address, tiny_clip):
    """Per-image failures are data; a worker that cannot load the model is the run's error."""
    root = tmp_path / "tree"
    make_tree(root, per_class=1)
    m = make_manifest(root, tiny_clip)
    ws = Workspace(tmp_path / "ws").ensure()
    ingest.run(m, ws, show_progress=False)
    gone = m.model_copy(deep=True)
    gone.clip.pretrained = str(tmp_path / "missing.pt")
    from distributed import Client

    keys = cluster.partitions_holding(ws, catalog.read(ws)["image_id"])
    with Client(dask_address) as client, pytest.raises(clip_score.WeightsUnavailable, match="missing.pt"):
        for _ in cluster.map_partitions(client, clip_score.encode_partition, keys, str(ws.root), gone.clip,
                                        gone.class_names, catalog.version(ws)):
            pass


def _models_loaded() -> list[str]:
    from curation import clip_score as cs

    return sorted(key[3] for key in cs._WORKER_MODELS)  # the device setting of each loaded model


@pytest.mark.slow
def test_encoding_runs_only_on_gpu_workers_when_the_cluster_has_some(tmp_path, dask_address, tiny_clip):
    """A third worker joins advertising GPU=1 (as `dask worker --resources GPU=1` does): encoding tasks
    ask for it and run there only. No CUDA here, so device "auto" resolves to its CPU."""
    from distributed import Client

    root = tmp_path / "tree"
    make_tree(root, per_class=2)
    m = make_manifest(root, tiny_clip, device="auto")
    ws = Workspace(tmp_path / "ws").ensure()
    ingest.run(m, ws, show_progress=False)
    gpu = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", dask_address, "--nworkers", "1",
                            "--nthreads", "1", "--resources", "GPU=1", "--host", "127.0.0.1", "--no-dashboard", "--no-nanny"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with Client(dask_address) as c:
            c.wait_for_workers(3, timeout=90)
            assert cluster.gpu_workers(c) == 1
            s = clip_score.run(m, ws, show_progress=False, dask_address=dask_address)
            assert (s.encoded, s.failed) == (6, 0)
            info = c.scheduler_info(n_workers=-1)["workers"]
            on_gpu = [a for a, w in info.items() if (w.get("resources") or {}).get("GPU")]
            loaded = c.run(_models_loaded)
        assert [a for a, devices in loaded.items() if "auto" in devices] == on_gpu
    finally:
        gpu.kill()  # its tasks are done; a graceful close of a process holding torch takes seconds here
        gpu.wait(60)


def test_compose_runs_a_dask_scheduler_and_cpu_and_gpu_workers():
    spec = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    svc = spec["services"]
    sched, cpu, gpu = svc["dask-scheduler"], svc["dask-worker"], svc["dask-gpu-worker"]
    assert sched["ports"] and all(str(p).startswith("127.0.0.1:") for p in sched["ports"])
    assert any(str(p).endswith(":8787") for p in sched["ports"])  # the dashboard, on loopback too
    for w in (cpu, gpu):
        assert "tcp://dask-scheduler:8786" in w["command"] and "dask-scheduler" in w["depends_on"]
        assert any(str(v).startswith("workspaces:/opt/jurassiclass/workspaces") for v in w["volumes"])
    cmd = gpu["command"]
    assert cmd[cmd.index("--resources") + 1] == "GPU=1" and cmd[cmd.index("--nthreads") + 1] == "1"
    assert "--resources" not in cpu["command"]
    assert gpu["environment"]["DASK_DISTRIBUTED__WORKER__DAEMON"] == "False"  # decode processes feed the GPU
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for name in ("prefect-worker", "gpu-worker"):
        assert svc[name]["environment"]["DASK_ADDRESS"] == "tcp://dask-scheduler:8786"

    def deps(name: str, seen: tuple = ()) -> None:  # compose refuses a cycle in depends_on
        assert name not in seen, f"depends_on cycle: {' -> '.join((*seen, name))}"
        for d in svc[name].get("depends_on", []):
            deps(d, (*seen, name))

    for name in svc:
        deps(name)


def test_connect_errors_are_one_sentence():
    with pytest.raises(cluster.ClusterError, match="dask_address"), cluster.connect(""):
        pass
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    unreachable = f"tcp://127.0.0.1:{port}"
    with pytest.raises(cluster.ClusterError, match=f"cannot reach the Dask scheduler at {unreachable}"), \
            cluster.connect(unreachable, timeout=1):
        pass


def small_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    im = support.textured(6, (200, 150))
    support.write(root / "cat" / "a.jpg", support.encode(im, "JPEG", quality=92))
    support.write(root / "cat" / "b.png", support.encode(im, "PNG"))
    support.write(root / "cat" / "c.jpg", support.jpeg(7, (200, 150)))
    return root


@pytest.mark.slow
def test_cli_run_and_the_flows_stage_pass_the_address_to_ingest_and_dedup(tmp_path, dask_address, monkeypatch):
    from typer.testing import CliRunner

    from curation.cli import app
    from flows.runners import resolve_address
    from flows.stages import BY_NAME

    root = small_tree(tmp_path)
    mpath = tmp_path / "m.yaml"
    mpath.write_text(f"name: t\nclasses: [{{name: cat}}]\nsources: [{{type: folder, path: {root}}}]\n")
    before, before_ingest = (ran_on_cluster(dask_address).get(f, 0) for f in ("hash_partition", "validate_chunk"))
    r = CliRunner().invoke(app, ["run", "-m", str(mpath), "-w", str(tmp_path / "ws"), "-q", "--only", "ingest",
                                 "--only", "dedup", "--dask-address", dask_address])
    assert r.exit_code == 0, r.output
    assert "3 hashed" in r.output and "1 duplicate groups, 1 duplicates" in r.output
    assert ran_on_cluster(dask_address).get("hash_partition", 0) > before
    assert "ingest: 3 files seen, 3 added" in r.output and ran_on_cluster(dask_address).get("validate_chunk", 0) > before_ingest

    # The flows' dedup stage hands the address to the curation function (re-hashing: another kind).
    m = manifest_for(root, hash="dhash")
    ws = Workspace(tmp_path / "ws")
    before = ran_on_cluster(dask_address).get("hash_partition", 0)
    s = BY_NAME["dedup"].call(m, ws, dask_address=dask_address)
    assert s.hashed == 3 and ran_on_cluster(dask_address).get("hash_partition", 0) > before
    assert set(catalog.read(ws)["hash_kind"]) == {"dhash"}

    monkeypatch.setenv("DASK_ADDRESS", "tcp://dask-scheduler:8786")
    assert resolve_address(None) == "tcp://dask-scheduler:8786" and resolve_address("local") == "local"
    assert resolve_address("none") is None
    monkeypatch.delenv("DASK_ADDRESS")
    assert resolve_address(None) is None


def _stored(ws: Workspace) -> dict[str, bytes]:
    return {str(p.relative_to(ws.root)): p.read_bytes() for p in sorted((ws.root / "store").rglob("*")) if p.is_file()}


def test_ingest_validation_on_the_cluster_gives_the_in_process_catalog_and_store(tmp_path, dask_address):
    """Chunks of files validated and stored by the workers; rows (never bytes) back; one commit here."""
    root = tmp_path / "tree"
    for s in range(6):
        support.write(root / ("cat" if s % 2 else "dog") / f"good{s}.jpg", support.jpeg(s, (120, 90)))
    support.write(root / "cat" / "good1.png", support.png(1, (120, 90)))
    support.write(root / "dog" / "zz_copy_of_cat_good1.jpg", support.jpeg(1, (120, 90)))  # same bytes, other label
    support.write(root / "dog" / "broken.jpg", support.truncated_jpeg())
    support.write(root / "dog" / "broken_again.jpg", support.truncated_jpeg())
    support.write(root / "cat" / "tiny.jpg", support.jpeg(9, (20, 16)))
    support.write(root / "cat" / "page.jpg", support.HTML)
    support.write(root / "cat" / "bomb.png", support.bomb_png())
    support.write(root / "bird" / "x.jpg", support.jpeg(10, (120, 90)))  # class not in the manifest
    support.write(root / "loose.jpg", support.jpeg(11, (120, 90)))
    support.write(root / "cat" / "notes.txt", b"not an image")
    m = manifest_for(root)
    a, b = (Workspace(tmp_path / w).ensure() for w in ("inproc", "dask"))
    before = ran_on_cluster(dask_address).get("validate_chunk", 0)

    sa = ingest.run(m, a, show_progress=False)
    sb = ingest.run(m, b, show_progress=False, dask_address=dask_address)
    assert ran_on_cluster(dask_address).get("validate_chunk", 0) - before >= 4  # several chunks, on the workers
    assert sb == sa
    assert (sa.seen, sa.added, sa.not_image_extension) == (15, 13, 1)  # two duplicates
    assert sa.rejected == {"class_not_in_manifest": 1, "decompression_bomb": 1, "not_an_image": 1, "too_small": 1,
                           "truncated": 2, "no_class_folder": 1}  # both broken copies counted, as in-process

    cols = ["image_id", "label", "status", "reason", "note", "path", "source", "source_url", "source_sha256", "license",
            "width", "height", "format"]
    ca, cb = (catalog.read(w).select(cols).sort("image_id") for w in (a, b))
    assert cb.equals(ca)
    twin = ca.filter(pl.col("source_url").str.contains("good1.jpg|zz_copy", literal=False))
    assert twin.height == 1 and twin.row(0, named=True)["label"] == "cat"  # the first in file order is kept
    assert _stored(b) == _stored(a) and len(_stored(a)) == 9
    sight = ["image_id", "source_url", "source_sha256", "label"]
    assert catalog.read_sightings(b).select(sight).sort(sight).equals(catalog.read_sightings(a).select(sight).sort(sight))

    # A re-run on the cluster finds every file known and commits nothing.
    tip = b.catalog_path.read_bytes()
    again = ingest.run(m, b, show_progress=False, dask_address=dask_address)
    assert (again.added, again.already_known) == (0, 15) and b.catalog_path.read_bytes() == tip


def test_fiftyone_imports_in_a_process_that_used_dask_first():
    # `run --dask-address` then `review push` in one process: Dask's importlib_metadata must not
    # break FiftyOne's import (eta reads package metadata fields that importlib_metadata>=8 refuses).
    code = "import distributed, curation.review as r; r._fo(); print('imported')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "FIFTYONE_DATABASE_URI": ""})
    assert out.returncode == 0 and "imported" in out.stdout, out.stderr[-2000:]
