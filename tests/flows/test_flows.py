"""Orchestration end to end: a real Prefect server + process worker on loopback, `prefect.yaml` deployed,
runs started the way users start them (`prefect deployment run ... --watch`)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import polars as pl
import pytest
import yaml
from prefect.states import Failed

from curation import catalog
from curation.catalog import Workspace
from curation.config import load_manifest
from flows import common, stages
from flows.stack import REPO_ROOT, Stack, free_port
from tests import support

# A training run small enough for CPU tests: timm's tiny test_resnet, 32 px, 2 epochs, no CV, and one
# DataLoader worker process: the way loaders start inside a flow-run process is part of what runs.
LOOP_TRAIN = {"models": [{"name": "tiny", "arch": "test_resnet", "mode": "full", "pretrained": False,
                          "hyper": {"lr": 0.01, "backbone_factor": 1}}],
              "image_size": 32, "batch_size": 8, "max_epochs": 2, "workers": 1, "cv": False, "label_issues": False,
              "export_onnx": False, "freeze_bn_stats": False}
N_URLS = 12
GATE_AT = 6  # image requests from this index on wait for the test to open the gate
CLASSES = ("cat", "dog")


# ---------------------------------------------------------------- fixtures


class ImageServer:
    """Loopback images /img/<i>.jpg; requests for i >= GATE_AT block while the gate is closed."""

    def __init__(self):
        self.hits: Counter = Counter()
        self.gate = threading.Event()
        self.files: dict[str, bytes] = {}  # /t/<name>: bodies a test sets
        fx = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                fx.hits[self.path] += 1
                name = self.path.rsplit("/", 1)[-1]
                if self.path.startswith("/t/") and name in fx.files:
                    body = fx.files[name]
                elif self.path.startswith("/img/") and name.endswith(".jpg"):
                    i = int(name[:-4])
                    if i >= GATE_AT:
                        fx.gate.wait(120)
                    body = support.jpeg(1000 + i)
                else:
                    self.send_error(404)
                    return
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client was killed while waiting
                    pass

        self.server = support.LoopbackServer(Handler)
        self.base = f"http://127.0.0.1:{self.server.port}"

    def close(self):
        self.gate.set()
        self.server.close()


def _mongod(tmp: Path):
    spec = importlib.util.find_spec("fiftyone")
    exe = Path(spec.submodule_search_locations[0]) / "db" / "bin" / "mongod"
    port = free_port()
    log = open(tmp / "mongod.log", "w")
    proc = subprocess.Popen([str(exe), "--dbpath", str(tmp), "--port", str(port), "--bind_ip", "127.0.0.1", "--nounixsocket"],
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc, f"mongodb://127.0.0.1:{port}"


def write_manifest(path: Path, name: str, sources: list[dict], **extra) -> Path:
    data = {"name": name, "classes": [{"name": c} for c in CLASSES], "sources": sources,
            "clip": {"skip_if_unavailable": True}, **extra}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def folder_tree(root: Path, offset: int = 0, n: int = 4) -> Path:
    for i in range(n):
        support.write(root / "cat" / f"c{i}.jpg", support.jpeg(offset + i))
        support.write(root / "dog" / f"d{i}.png", support.png(offset + 100 + i))
    support.write(root / "horse" / "h.jpg", support.jpeg(offset + 50))  # not a class: recorded, rejected
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Server + worker + deployments of prefect.yaml (plus `build-dataset/e2e`), an image server, a mongod."""
    tmp = tmp_path_factory.mktemp("flows")
    images = ImageServer()
    csv = tmp / "urls.csv"
    csv.write_text("url,label,license\n" + "".join(
        f"{images.base}/img/{i}.jpg,{CLASSES[i % 2]},cc0\n" for i in range(N_URLS)))
    manifest = write_manifest(
        tmp / "e2e.yaml", "e2e",
        [{"type": "folder", "path": str(folder_tree(tmp / "tree")), "license": "cc0"}, {"type": "urls", "path": str(csv)}],
        # Catalog commits only at the end: a kill mid-scrape must be repaired from the scrape journal.
        scrape={"target_per_class": 100, "concurrency": 2, "per_host_concurrency": 2,
                "commit_every": 1000, "commit_interval_s": 600, "timeout_s": 120,
                "allow_private_networks": True},
        workdir=str(tmp / "ws"),
    )
    # The retraining loop's own dataset: published without review, a tiny CPU model.
    loop = write_manifest(
        tmp / "loop.yaml", "loop", [{"type": "folder", "path": str(folder_tree(tmp / "loop-tree", 700, n=10)), "license": "cc0"}],
        workdir=str(tmp / "ws-loop"),
        publish={"include": "candidates", "folds": 3, "splits": {"train": 0.6, "validation": 0.2, "test": 0.2}},
        train=LOOP_TRAIN,
    )
    # The repository's prefect.yaml, plus deployments of the same flows on the test manifests.
    spec = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())

    def like(entrypoint: str, name: str, manifest_path: Path, **extra) -> dict:
        base = next(d for d in spec["deployments"] if d["entrypoint"].endswith(entrypoint) and d["name"] == "demo")
        return {**base, "name": name, "schedules": [], "triggers": [], "parameters": {"manifest": str(manifest_path)}, **extra}

    spec["deployments"].append(like(":build_dataset", "e2e", manifest))
    spec["deployments"].append(like(":publish_flow", "loop", loop))
    trigger = json.loads(json.dumps(next(d for d in spec["deployments"] if d["entrypoint"].endswith(":train_flow"))["triggers"]))
    trigger[0]["match"]["prefect.resource.id"] = "jurassiclass.dataset.loop"
    trigger[0]["parameters"]["manifest"] = str(loop)
    spec["deployments"].append(like(":train_flow", "loop", loop, triggers=trigger))
    spec["deployments"].append(like(":retrain", "loop", loop))
    pfile = tmp / "prefect.yaml"
    pfile.write_text(yaml.safe_dump(spec, sort_keys=False))

    (tmp / "mongo").mkdir()
    mongod, uri = _mongod(tmp / "mongo")
    stack = Stack(home=tmp / "prefect-home", port=free_port(), pool="jurassiclass-test", prefect_file=pfile,
                  worker_query_seconds=1, extra_env={"FIFTYONE_DATABASE_URI": uri, "HF_HUB_OFFLINE": "1",
                                                     # the scheduler lays out runs of active schedules at once
                                                     "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"})
    # The pool name is the repository's; the test pool keeps a developer's own stack untouched.
    spec_text = pfile.read_text().replace("jurassiclass-process", "jurassiclass-test")
    pfile.write_text(spec_text)
    try:
        stack.up()
        yield {"stack": stack, "tmp": tmp, "manifest": manifest, "images": images, "ws": Workspace(tmp / "ws"),
               "loop": loop, "loop_ws": Workspace(tmp / "ws-loop")}
    finally:
        stack.down()
        images.close()
        mongod.terminate()
        try:
            mongod.wait(20)
        except subprocess.TimeoutExpired:
            mongod.kill()


def prefect_cli(stack: Stack, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("prefect")), *args], cwd=REPO_ROOT, env=stack.env(),
                          capture_output=True, text=True, timeout=timeout)


def client(stack: Stack):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api=stack.api_url)


def flow_runs(stack: Stack, deployment: str):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowFilter, FlowFilterName

    flow_name, dep_name = deployment.split("/")
    with client(stack) as c:
        return c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[dep_name])))


def wait_for(pred, timeout: float, what: str, every: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# ---------------------------------------------------------------- unit


def test_overrides_and_parts(tmp_path):
    m = write_manifest(tmp_path / "m.yaml", "u", [{"type": "folder", "path": "a"}, {"type": "folder", "path": "b"},
                                                  {"type": "urls", "path": "u.csv"}])
    got = load_manifest(m, {"scrape": {"target_per_class": 7}, "images": {"min_side": 64}})
    assert got.scrape.target_per_class == 7 and got.images.min_side == 64 and got.scrape.concurrency == 16
    assert got.sources[0].path == (tmp_path / "a").resolve()  # relative to the manifest, as with the CLI
    with pytest.raises(Exception, match="target_per_class"):
        load_manifest(m, {"scrape": {"target_per_class": -1}})
    parts = stages.parts_of(stages.INGEST, got)
    assert parts == [{"sources": [0]}, {"sources": [1]}]
    assert [s.path.name for s in stages.restrict(got, parts[1]).sources] == ["b"]
    assert stages.parts_of(stages.SCRAPE, got) is None
    failed = Failed(data=FileNotFoundError("x"))
    assert not stages._transient(None, None, failed) and stages._transient(None, None, Failed(data=ConnectionError("x")))
    assert common.combine([{"added": 2, "rejected": {"x": 1}, "seen": 3}, {"added": 1, "rejected": {"x": 2, "y": 1}, "seen": 1}]) \
        == {"added": 3, "rejected": {"x": 3, "y": 1}, "seen": 4}
    assert common.artifact_key("Dino_set", "review-push", "Summary") == "dino-set-review-push-summary"


def test_progress_listener_sees_stage_loops():
    from curation.progress import listening, progress_map, track

    seen = []
    with listening(lambda *a: seen.append(a)):
        assert list(progress_map(lambda x: x * 2, [1, 2, 3], description="double", show=False)) == [2, 4, 6]
    list(track([1, 2], description="unobserved", show=False))
    assert seen[0] == ("double", 0, 3) and seen[-1] == ("double", 3, 3)
    assert all(d == "double" for d, _, _ in seen)


def test_docker_compose_is_a_localhost_team_stack():
    spec = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    services = spec["services"]
    assert {"postgres", "prefect-server", "prefect-worker", "mongo", "fiftyone-app"} <= set(services)
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
        for vol in svc.get("volumes", []):
            src = str(vol).split(":")[0]
            if not src.startswith((".", "/")):
                assert src in spec["volumes"], f"{name} uses undeclared volume {src}"
    server_env = services["prefect-server"]["environment"]
    assert "postgresql+asyncpg://" in server_env["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "postgres" in services["prefect-server"]["depends_on"]
    gpu = services["gpu-worker"]  # training runs on the GPU worker's queue, the NVIDIA runtime declared
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "--work-queue" in gpu["command"] and gpu["command"][gpu["command"].index("--work-queue") + 1] == "gpu"
    assert any(str(v).startswith("workspaces:") for v in gpu["volumes"]) and "hf-cache" in spec["volumes"]
    pfile = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    assert {d["work_pool"]["work_queue_name"] for d in pfile["deployments"] if d["entrypoint"].startswith(("flows/train.py",
                                                                                                         "flows/retrain.py"))} == {"gpu"}
    worker = services["prefect-worker"]
    assert worker["build"]["context"] == "." and (REPO_ROOT / worker["build"].get("dockerfile", "Dockerfile")).is_file()
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert services["fiftyone-app"]["environment"]["FIFTYONE_DATABASE_URI"] == "mongodb://mongo:27017"
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "pip install" in dockerfile and "COPY" in dockerfile


# ---------------------------------------------------------------- the stack


@pytest.mark.slow
def test_up_is_idempotent_and_deploys_prefect_yaml(env):
    stack = env["stack"]
    pids = (stack.pid("server"), stack.pid("worker"))
    stack.up()  # again: nothing new is started, deployments are updated in place
    assert (stack.pid("server"), stack.pid("worker")) == pids and all(pids)
    out = prefect_cli(stack, "deployment", "ls").stdout
    for name in ("build-dataset/demo", "build-dataset/dinosaurs", "collect-review/demo", "collect-review/dinosaurs",
                 "publish/demo", "publish/dinosaurs", "train/demo", "train/dinosaurs", "retrain/demo", "retrain/dinosaurs"):
        assert name in out
    with client(stack) as c:
        dep = c.read_deployment_by_name("build-dataset/dinosaurs")
        assert dep.work_pool_name == "jurassiclass-test"
        assert dep.parameters == {"manifest": "manifests/dinosaurs.yaml"}
        assert [s.active for s in dep.schedules] == [False]  # periodic re-scrape exists, off by default
        assert Path(dep.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"]) == REPO_ROOT


@pytest.mark.slow
def test_build_dataset_killed_then_resumed_without_redoing_work(env):
    stack, ws, images = env["stack"], env["ws"], env["images"]
    images.gate.clear()
    run = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "deployment", "run", "build-dataset/e2e"],
                           cwd=REPO_ROOT, env=stack.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = run.communicate(timeout=120)
    assert run.returncode == 0, out
    journal = ws.root / "stages" / "scrape" / "journal.jsonl"
    # Ingest has committed; scrape (class by class) has stored cat's ungated images 0, 2, 4 and waits
    # on the gate for the next: kill it there.
    gated = [f"/img/{i}.jpg" for i in range(GATE_AT, N_URLS)]
    wait_for(lambda: journal.exists() and journal.read_text().count("\n") >= GATE_AT // 2
             and any(images.hits[g] for g in gated), 180, "scrape to store the first images")
    (fr,) = flow_runs(stack, "build-dataset/e2e")
    assert fr.infrastructure_pid, "the worker records the flow run's process"
    pid = int(str(fr.infrastructure_pid).rsplit(":", 1)[-1])
    os.kill(pid, signal.SIGKILL)
    state = wait_for(lambda: (s := flow_runs(stack, "build-dataset/e2e")[0].state) and s.is_final() and s, 60, "crash state")
    assert state.type.value == "CRASHED", state
    ingested = catalog.read(ws)
    assert ingested.height == 9 and set(ingested["source"]) == {"folder"}
    stored_before = {p.name.split(".")[0] for p in (ws.root / "store").rglob("*.*")}

    images.gate.set()
    t0 = time.monotonic()
    done = prefect_cli(stack, "deployment", "run", "build-dataset/e2e", "--watch", "--watch-timeout", "300", timeout=330)
    assert done.returncode == 0 and "Completed" in done.stdout, done.stdout[-4000:] + done.stderr[-2000:]

    print(f"resumed run took {time.monotonic() - t0:.1f} s")
    df = catalog.read(ws)
    assert df["image_id"].n_unique() == df.height == 9 + N_URLS
    web = df.filter(pl.col("source") == "urls")
    assert web["source_url"].n_unique() == N_URLS and set(web["status"]) <= {"candidate", "accepted", "rejected"}
    assert stored_before <= set(df["image_id"])  # what the killed run stored is cataloged, not lost
    hits = [images.hits[f"/img/{i}.jpg"] for i in range(N_URLS)]
    assert max(hits[:GATE_AT]) == 1  # finished downloads were not redone
    assert sum(hits) <= N_URLS + 2  # at most the requests in flight at the kill (concurrency 2)
    sightings = catalog.read_sightings(ws)
    assert (sightings["source"] == "folder").sum() == 9  # ingest was not redone either
    # scoring ran on the resumed run and, with no CLIP weights offline, recorded why it skipped
    assert (ws.root / "stages" / "score" / "skipped.txt").is_file()

    # artifacts of the completed run (parent flow run and its stage subflows)
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterParentFlowRunId

    runs = [r for r in flow_runs(stack, "build-dataset/e2e") if r.state.is_completed()]
    assert len(runs) == 1
    with client(stack) as c:
        subs = c.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[runs[0].id])))
        ids = [runs[0].id, *[s.id for s in subs]]
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))
        sub_flows = {c.read_flow(s.flow_id).name for s in subs}
    # publish runs too, and says why it skipped: nothing is reviewed (the manifest publishes accepted images)
    assert sub_flows == {"ingest", "scrape", "dedup", "score", "review-push", "publish"}
    keys = {a.key for a in arts if a.key}
    assert {"e2e-build-dataset-summary", "e2e-per-class", "e2e-per-source", "e2e-per-reason", "e2e-workspace",
            "e2e-ingest-summary", "e2e-scrape-sources"} <= keys, keys
    md = next(a for a in arts if a.key == "e2e-build-dataset-summary").data
    assert "Images per class and status" in md and "| cat |" in md and str(ws.root) in md
    progress = {a.description: a.data for a in arts if a.type == "progress"}
    assert progress["build-dataset: 6/6 stages, last finished: publish"] == 100
    assert not (ws.root / "published").exists() or not list((ws.root / "published").glob("v*"))
    # the stages' own loops (ingest's file map) report through curation.progress listeners
    assert any(d.startswith("ingest: ingest tree") and v == 100 for d, v in progress.items()), progress
    # link artifacts are stored as markdown links
    assert ws.root.as_uri() in next(a for a in arts if a.key == "e2e-workspace").data
    per_source = next(a for a in arts if a.key == "e2e-per-source").data
    assert "urls" in str(per_source) and "folder" in str(per_source)


@pytest.mark.slow
def test_collect_review_pulls_and_reports_status(env):
    stack, ws = env["stack"], env["ws"]
    if not ws.catalog_path.exists():
        pytest.fail("runs after the build-dataset test, on its workspace")
    out = prefect_cli(stack, "deployment", "run", "collect-review/demo", "--param", f"manifest={env['manifest']}",
                      "--watch", "--watch-timeout", "200", timeout=230)
    assert out.returncode == 0, out.stdout[-4000:]
    # the subflows' results reach the parent's log, which is what `--watch` shows: the pull's problems too
    flat = re.sub(r"\s+", "", out.stdout)
    assert "review-pull:dataset=e2e;samples=" in flat and "problems:none" in flat, out.stdout[-4000:]
    assert re.search(r"review-status:\d+rows", flat), out.stdout[-3000:]
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with client(stack) as c:
        (status,) = c.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["e2e-review-status"])))
        (pull,) = c.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["e2e-review-pull-summary"])))
        (parent,) = c.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["e2e-collect-review-summary"])))
    assert "**review-pull**: dataset=e2e; samples=" in parent.data and "problems: none" in parent.data
    rows = status.data if isinstance(status.data, list) else json.loads(status.data)
    assert {r["label"] for r in rows} >= set(CLASSES)  # one row per class, nothing reviewed yet
    assert "samples" in str(pull.data)


@pytest.mark.slow
def test_failed_stage_message_shows_in_watch_output(env):
    stack, tmp = env["stack"], env["tmp"]
    bad = write_manifest(tmp / "bad.yaml", "bad", [{"type": "folder", "path": str(tmp / "no-such-tree")}], workdir=str(tmp / "ws-bad"))
    out = prefect_cli(stack, "deployment", "run", "build-dataset/demo", "--param", f"manifest={bad}", "--watch",
                      "--watch-timeout", "120", timeout=150)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "Failed" in text
    # the CLI wraps long lines: compare without whitespace
    flat = re.sub(r"\s+", "", text)
    cause = re.sub(r"\s+", "", f"stage ingest failed: FileNotFoundError: folder source {tmp / 'no-such-tree'} does not exist")
    assert cause in flat
    # the cause comes first, the traceback once under it (not again from the engine's own reports)
    assert flat.count("Traceback(mostrecentcalllast)") == 1, text[-6000:]
    assert flat.index(cause) < flat.index("Traceback(mostrecentcalllast)") < flat.index("Finishedinstate")
    assert flat.count("stageingestfailed") == 1
    assert not (tmp / "ws-bad" / "published").exists()  # a failed curation stage publishes nothing: nothing trains
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with client(stack) as c:
        (summary,) = c.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["bad-build-dataset-summary"])))
    assert summary.data.startswith("# build-dataset (failed in ingest): `bad`")  # what the finished stages left


@pytest.mark.slow
def test_mapped_ingest_on_a_local_dask_cluster(env):
    stack, tmp = env["stack"], env["tmp"]
    a, b = folder_tree(tmp / "dask-a", 300), folder_tree(tmp / "dask-b", 400, n=2)
    m = write_manifest(tmp / "dask.yaml", "dask", [{"type": "folder", "path": str(a)}, {"type": "folder", "path": str(b)}],
                       workdir=str(tmp / "ws-dask"))
    out = prefect_cli(stack, "deployment", "run", "build-dataset/demo", "--param", f"manifest={m}",
                      "--param", "dask_address=local", "--params", '{"skip": ["dedup", "score", "review-push"]}',
                      "--watch", "--watch-timeout", "240", timeout=270)
    assert out.returncode == 0, out.stdout[-4000:]
    df = catalog.read(Workspace(tmp / "ws-dask"))
    assert df.height == 9 + 5 and df["image_id"].n_unique() == df.height
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with client(stack) as c:
        names = {t.name for t in c.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="ingest[")))}
    assert {"ingest[source 0]", "ingest[source 1]"} <= names


@pytest.mark.slow
def test_build_dataset_tops_classes_up_like_run(env):
    # cat (target 3) comes from a URL list whose first two URLs are an image and its resized copy:
    # round 1 stores 3, dedup leaves 2, round 2 fetches the next one, and round 3 does not run.
    stack, tmp, images = env["stack"], env["tmp"], env["images"]
    pics = [support.textured(500 + i) for i in range(4)]
    images.files.update({"u0.jpg": support.encode(pics[0], "JPEG", quality=90),
                         "u0-copy.jpg": support.planted_copies(pics[0])["resized"],
                         **{f"u{i}.jpg": support.encode(pics[i], "JPEG", quality=90) for i in range(1, 4)}})
    order = ["u0.jpg", "u0-copy.jpg", "u1.jpg", "u2.jpg", "u3.jpg"]
    urls = tmp / "topup.csv"
    urls.write_text("url,label,license\n" + "".join(f"{images.base}/t/{n},cat,cc0\n" for n in order))
    m = write_manifest(tmp / "topup.yaml", "topup", [{"type": "urls", "path": str(urls)}], workdir=str(tmp / "ws-topup"),
                       classes=[{"name": "cat", "target": 3}], scrape={"allow_private_networks": True, "concurrency": 1})
    out = prefect_cli(stack, "deployment", "run", "build-dataset/demo", "--param", f"manifest={m}",
                      "--params", '{"skip": ["review-push", "publish"]}', "--watch", "--watch-timeout", "240", timeout=270)
    assert out.returncode == 0, out.stdout[-4000:]
    flat = re.sub(r"\s+", "", out.stdout)
    assert "scrape(round2):" in flat and "dedup(round2):" in flat and "round3" not in flat, out.stdout[-4000:]
    assert "targets:1of1classesmet" in flat, out.stdout[-4000:]
    assert {n: images.hits[f"/t/{n}"] for n in order} == {**{n: 1 for n in order[:4]}, "u3.jpg": 0}  # no overshoot
    df = catalog.read(Workspace(tmp / "ws-topup"))
    assert df.filter(pl.col("status") != "rejected").height == 3 and df.height == 4
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with client(stack) as c:
        (art,) = c.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["topup-targets"])))
        (summary,) = c.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["topup-build-dataset-summary"])))
    rows = art.data if isinstance(art.data, list) else json.loads(art.data)
    assert rows == [{"label": "cat", "target": 3, "images": 3, "short": 0, "outcome": "met"}]
    assert "**scrape (round 2)**" in summary.data and "**dedup (round 2)**" in summary.data


# ---------------------------------------------------------------- the retraining loop


def _registry(ws: Workspace) -> dict:
    from models import registry

    return registry.read(ws)


@pytest.mark.slow
def test_a_new_dataset_version_triggers_one_training_and_unchanged_data_none(env):
    from curation import ingest

    stack, ws = env["stack"], env["loop_ws"]
    ingest.run(load_manifest(env["loop"]), ws.ensure(), show_progress=False)  # the curated catalog to publish
    out = prefect_cli(stack, "deployment", "run", "publish/loop", "--watch", "--watch-timeout", "200", timeout=230)
    assert out.returncode == 0 and "Completed" in out.stdout, out.stdout[-3000:]
    from curation import publish

    assert [e["version"] for e in publish.history(ws)] == [1]
    # The published event starts train/loop through the deployment's trigger, once.
    run = wait_for(lambda: (r := flow_runs(stack, "train/loop")) and r[0].state.is_final() and r[0], 300,
                   "the triggered training to finish")
    assert run.state.is_completed(), run.state
    assert run.parameters["dataset"] == str(ws.root / "published" / "v1")
    reg = _registry(ws)
    (entry,) = reg["entries"]
    assert entry["status"] == "trained" and entry["dataset_version"] == 1 and reg["promoted"] == entry["id"]
    assert Path(entry["model_dir"], "model.pt").is_file()
    # Publishing unchanged data emits nothing: no second training.
    again = prefect_cli(stack, "deployment", "run", "publish/loop", "--watch", "--watch-timeout", "200", timeout=230)
    assert again.returncode == 0 and "Completed" in again.stdout
    time.sleep(8)  # what a trigger would need to fire
    assert len(flow_runs(stack, "train/loop")) == 1
    with client(stack) as c:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        (cmp,) = c.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["loop-model-comparison"])))
    assert f"{entry['id']}: promoted" in cmp.data and "no model promoted yet" in cmp.data


@pytest.mark.slow
def test_a_failed_training_shows_its_error_and_leaves_the_promoted_model(env):
    stack, ws = env["stack"], env["loop_ws"]
    before = _registry(ws)
    if not before["promoted"]:
        pytest.fail("runs after the trigger test, which promotes a first model")
    bad = {"train": {"models": [{"name": "broken", "arch": "no_such_timm_model", "pretrained": False}]}}
    out = prefect_cli(stack, "deployment", "run", "train/loop", "--params", json.dumps({"overrides": bad, "force": True}),
                      "--watch", "--watch-timeout", "200", timeout=230)
    text = re.sub(r"\s+", "", out.stdout + out.stderr)
    assert out.returncode != 0 and "Failed" in out.stdout
    assert "trainingfailed:" in text and "no_such_timm_model" in text
    after = _registry(ws)
    assert after["promoted"] == before["promoted"]
    assert after["entries"][-1]["status"] == "failed" and "no_such_timm_model" in after["entries"][-1]["error"]


@pytest.mark.slow
def test_retrain_closes_the_loop_from_new_images_to_a_registered_model(env):
    stack, ws, tmp = env["stack"], env["loop_ws"], env["tmp"]
    before = _registry(ws)
    if not before["promoted"]:
        pytest.fail("runs after the trigger test, which publishes v1 and promotes a first model")
    folder_tree(tmp / "loop-tree", 900, n=4)  # new images arrive in the source
    triggered_before = {r.id for r in flow_runs(stack, "train/loop")}
    out = prefect_cli(stack, "deployment", "run", "retrain/loop", "--param", "rescrape=true", "--watch",
                      "--watch-timeout", "300", timeout=330)
    assert out.returncode == 0 and "Completed" in out.stdout, out.stdout[-4000:]
    from curation import publish

    assert [e["version"] for e in publish.history(ws)][-1] == 2
    reg = _registry(ws)
    v2 = [e for e in reg["entries"] if e["dataset_version"] == 2]
    assert len(v2) == 1 and v2[0]["status"] == "trained"  # trained once, by the retrain run
    assert reg["events"][-1]["entry"] == v2[0]["id"]  # a promotion decision was made and recorded
    # build-dataset's publish emitted the v2 event; the triggered train waited for the workspace and
    # then found v2 trained: it trained nothing.
    new = wait_for(lambda: [r for r in flow_runs(stack, "train/loop") if r.id not in triggered_before and r.state.is_final()],
                   120, "the triggered train run")
    assert len(new) == 1 and new[0].state.is_completed()
    assert len([e for e in _registry(ws)["entries"] if e["dataset_version"] == 2]) == 1


@pytest.mark.slow
def test_a_killed_training_leaves_the_registry_consistent_and_runs_are_serialised(env):
    stack, ws = env["stack"], env["loop_ws"]
    before = _registry(ws)
    # A training that would run for hours: it is certainly still running when it is killed.
    slow = {"train": {**LOOP_TRAIN, "max_epochs": 100_000, "patience": 100_000}}
    started = prefect_cli(stack, "deployment", "run", "train/loop", "--params", json.dumps({"overrides": slow, "force": True}))
    assert started.returncode == 0, started.stdout
    wait_for(lambda: len(_registry(ws)["entries"]) > len(before["entries"]), 120, "the training to claim its entry")
    # A second run on the same workspace waits for the first (one writer per dataset).
    earlier = {r.id for r in flow_runs(stack, "publish/loop")}
    publish_run = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "deployment", "run", "publish/loop"],
                                   cwd=REPO_ROOT, env=stack.env(), stdout=subprocess.PIPE, text=True)
    publish_run.communicate(timeout=60)
    time.sleep(6)
    (pub_run,) = [r for r in flow_runs(stack, "publish/loop") if r.id not in earlier]
    assert not pub_run.state.is_final(), "publish ran while a training held the workspace"
    runs = [r for r in flow_runs(stack, "train/loop") if r.state.is_running()]
    assert len(runs) == 1 and runs[0].infrastructure_pid
    os.kill(int(str(runs[0].infrastructure_pid).rsplit(":", 1)[-1]), signal.SIGKILL)
    state = wait_for(lambda: (s := [r for r in flow_runs(stack, "train/loop") if r.id == runs[0].id][0].state).is_final()
                     and s, 60, "crash state")
    assert state.type.value == "CRASHED", state
    reg = _registry(ws)  # a valid file, the promoted model untouched, the run visible as in training
    assert reg["promoted"] == before["promoted"] and reg["entries"][-1]["status"] == "training"
    # The slot's lease expires; the waiting publish then runs (unchanged data: no new version).
    wait_for(lambda: [r for r in flow_runs(stack, "publish/loop") if r.id == pub_run.id][0].state.is_final(), 150,
             "the queued publish run")
    # The next training of that version sees the dead process and records it.
    out = prefect_cli(stack, "deployment", "run", "train/loop", "--params", '{"force": true}', "--watch",
                      "--watch-timeout", "240", timeout=270)
    assert out.returncode == 0, out.stdout[-3000:]
    reg = _registry(ws)
    killed = [e for e in reg["entries"] if e.get("error") and "interrupted" in e["error"]]
    assert len(killed) == 1 and reg["entries"][-1]["status"] == "trained"


def test_schedules_exist_with_next_runs_and_a_user_state_survives_up(env):
    from datetime import datetime, timedelta, timezone

    stack = env["stack"]
    with client(stack) as c:
        dep = c.read_deployment_by_name("retrain/demo")
        (sch,) = dep.schedules
        assert sch.active and sch.slug == "daily-retrain" and sch.schedule.cron == "0 4 * * *"
        weekly = {d: [(s.slug, s.active) for s in c.read_deployment_by_name(d).schedules]
                  for d in ("build-dataset/dinosaurs", "retrain/dinosaurs")}
    assert weekly == {"build-dataset/dinosaurs": [("weekly-rescrape", False)], "retrain/dinosaurs": [("weekly-retrain", False)]}
    # The server lays out the next runs of the active schedule: tomorrow's (or today's) 04:00 UTC first.
    now = datetime.now(timezone.utc)
    nxt = now.replace(hour=4, minute=0, second=0, microsecond=0)
    if nxt <= now:
        nxt += timedelta(days=1)
    runs = wait_for(lambda: [r for r in flow_runs(stack, "retrain/demo") if r.state.is_scheduled()], 60, "scheduled runs")
    assert min(r.expected_start_time for r in runs) == nxt
    # A user pauses the demo schedule and resumes the dinosaurs re-scrape: `make up` keeps both.
    with client(stack) as c:
        c.update_deployment_schedule(dep.id, sch.id, active=False)
        dino = c.read_deployment_by_name("build-dataset/dinosaurs")
        c.update_deployment_schedule(dino.id, dino.schedules[0].id, active=True)
    stack.up()
    with client(stack) as c:
        assert [s.active for s in c.read_deployment_by_name("retrain/demo").schedules] == [False]
        assert [s.active for s in c.read_deployment_by_name("build-dataset/dinosaurs").schedules] == [True]
        # back as shipped, for the other tests
        c.update_deployment_schedule(dep.id, sch.id, active=True)
        dino = c.read_deployment_by_name("build-dataset/dinosaurs")
        c.update_deployment_schedule(dino.id, dino.schedules[0].id, active=False)
    assert sorted(stack.restored) == ["build-dataset/dinosaurs [weekly-rescrape] active", "retrain/demo [daily-retrain] paused"]
