"""The command line as users meet it: one error line and exit 2 for expected errors, `--set`, stage
selection, the run history, read-only commands, and `run` topping classes up after dedup.

Real components only: images served by a loopback HTTP server, folder trees on disk, the real
stages; commands that need FiftyOne run in a subprocess so its import-time config is their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from curation import catalog
from curation.catalog import Workspace
from curation.cli import app
from tests import support

REPO = Path(__file__).resolve().parents[2]
QUIET = ["-q", "--set", "review.push_in_run=false"]


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def cli_process(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The command in its own process (`python -m curation.cli`), as a user's shell runs it."""
    return subprocess.run([sys.executable, "-m", "curation.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def history(ws: Path) -> list[dict]:
    return [json.loads(line) for line in (ws / "runs.jsonl").read_text().splitlines()]


def surviving(ws: Path) -> Counter:
    df = catalog.read(Workspace(ws)).filter(pl.col("status") != "rejected")
    return Counter(df["label"].to_list())


@pytest.fixture
def folder_manifest(tmp_path) -> Path:
    """cat: 3 distinct images; dog: 3 distinct + a resized copy of one (a duplicate dedup removes)."""
    tree = tmp_path / "tree"
    for i in range(3):
        support.write(tree / "cat" / f"c{i}.jpg", support.jpeg(i))
        support.write(tree / "dog" / f"d{i}.jpg", support.jpeg(10 + i))
    support.write(tree / "dog" / "d0-small.jpg", support.planted_copies(support.textured(10))["resized"])
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump({"name": "clitest", "classes": [{"name": "cat", "target": 3}, {"name": "dog", "target": 4}],
                                 "sources": [{"type": "folder", "path": "tree"}], "clip": {"skip_if_unavailable": True}}))
    return m


# ---------------------------------------------------------------- errors


def test_expected_errors_are_one_line_and_exit_2(folder_manifest, tmp_path):
    ws = str(tmp_path / "ws")
    cases = [
        (["ingest", "-m", str(tmp_path / "missing.yaml"), "-w", ws], "manifest file not found"),
        (["ingest", "-m", str(folder_manifest), "-w", ws, "--set", "dedup.nope=1"], "dedup.nope: Extra inputs are not permitted"),
        (["ingest", "-m", str(folder_manifest), "-w", ws, "--set", "no-equals-sign"], "expected KEY=VALUE"),
        (["ingest", "-m", str(folder_manifest), "-w", ws, "--set", f"sources=[{{type: folder, path: {tmp_path / 'none'}}}]"],
         "does not exist"),  # an OSError from the stage
        (["publish", "-m", str(folder_manifest), "-w", ws, "-q"], "nothing to publish"),  # a stage's typed error
        (["run", "-m", str(folder_manifest), "-w", ws, "--only", "bogus"], "unknown stage(s) bogus"),
        (["run", "-m", str(folder_manifest), "-w", ws, "--only", "dedup", "--from", "score"], "--only cannot be combined"),
        (["catalog", "-w", str(tmp_path / "nothing-here")], "no catalog in"),
    ]
    for args, msg in cases:
        r = cli(*args)
        assert r.exit_code == 2, (args, r.output)
        assert "Traceback" not in r.output and r.exception is not None and isinstance(r.exception, SystemExit)
        assert r.stderr.startswith("error: ") and msg in r.stderr, (args, r.stderr)


def test_a_bug_prints_one_line_and_keeps_its_traceback(tmp_path):
    ws = Workspace(tmp_path / "ws").ensure()
    ws.catalog_path.write_bytes(b"PAR1 this is not a parquet file")
    r = cli("catalog", "-w", str(ws.root))
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    assert "Traceback" not in r.output
    assert r.stderr.startswith("error: unexpected ") and "a bug; traceback in " in r.stderr
    saved = Path(r.stderr.split("traceback in ", 1)[1].split(",", 1)[0])
    assert "Traceback (most recent call last)" in saved.read_text()
    saved.unlink()


# ---------------------------------------------------------------- --set, history, read-only commands


def test_set_overrides_are_resolved_and_every_write_is_in_the_history(folder_manifest, tmp_path):
    ws = tmp_path / "ws"
    r = cli("ingest", "-m", str(folder_manifest), "-w", str(ws), "-q", "--set", "dedup.threshold=6",
            "--set", "scrape.target_per_class=7", "--set", "clip.class_thresholds={}")
    assert r.exit_code == 0, r.output
    resolved = yaml.safe_load((ws / "manifest.resolved.yaml").read_text())
    assert resolved["dedup"]["threshold"] == 6 and resolved["scrape"]["target_per_class"] == 7
    assert resolved["dedup"]["min_thumb_corr"] == 0.8  # deep merge: the rest of the section is kept
    r = cli("dedup", "-m", str(folder_manifest), "-w", str(ws), "-q")
    assert r.exit_code == 0, r.output
    first, second = history(ws)
    assert first["argv"][0] == "ingest" and first["overrides"] == {"dedup": {"threshold": 6}, "scrape": {"target_per_class": 7},
                                                                   "clip": {"class_thresholds": {}}}
    assert first["outcome"] == "ok" and first["summary"][0].startswith("ingest: 7 files seen, 7 added")
    assert second["overrides"] == {} and second["summary"][0].startswith("dedup: 7 images")
    # each distinct resolved manifest is kept once, and the history names the one each run used
    assert first["resolved_manifest"] != second["resolved_manifest"]
    assert yaml.safe_load((ws / second["resolved_manifest"]).read_text())["dedup"]["threshold"] == 10
    assert (ws / second["resolved_manifest"]).read_text() == (ws / "manifest.resolved.yaml").read_text()


def test_catalog_versions_published_ones_kept_and_unpinned(folder_manifest, tmp_path):
    ws = tmp_path / "ws"
    assert cli("ingest", "-m", str(folder_manifest), "-w", str(ws), "-q").exit_code == 0
    catalog.pin(Workspace(ws), 0, "published v1")  # what publish does with the version it read
    r = cli("catalog", "-w", str(ws), "--version", "0")
    assert r.exit_code == 0 and "catalog version 0 (latest 0)" in r.output
    assert "kept past the retention: version 0 (published v1; 0.0 MB in 0 files only it reads)" in r.output
    r = cli("catalog", "-w", str(ws), "--unpin", "0")
    assert r.exit_code == 0 and "catalog version 0 unpinned (kept for: published v1)" in r.output
    assert catalog.pins(Workspace(ws)) == {}
    r = cli("catalog", "-w", str(ws), "--unpin", "0")
    assert r.exit_code == 2 and "catalog version 0 is not pinned" in r.stderr
    r = cli("catalog", "-w", str(ws), "--version", "7")
    assert r.exit_code == 2 and "catalog version 7 does not exist (latest is 0)" in r.stderr


@pytest.mark.slow
def test_read_only_commands_leave_the_resolved_manifest(folder_manifest, tmp_path):
    ws = tmp_path / "ws"
    assert cli("ingest", "-m", str(folder_manifest), "-w", str(ws), "-q").exit_code == 0
    before = (ws / "manifest.resolved.yaml").read_bytes()
    assert cli("catalog", "-w", str(ws)).exit_code == 0
    r = cli("models", "list", "-m", str(folder_manifest), "-w", str(ws), "--set", "dedup.threshold=3")
    assert r.exit_code == 0 and "no models" in r.output
    # review status reads the live review dataset: an unreachable database is one error line
    r = cli_process("review", "status", "-m", str(folder_manifest), "-w", str(ws), "--set", "dedup.threshold=3",
                    env={"FIFTYONE_DATABASE_URI": f"mongodb://127.0.0.1:{_closed_port()}"})
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert (ws / "manifest.resolved.yaml").read_bytes() == before
    assert len(history(ws)) == 1  # only the ingest wrote


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- run: stage selection, failures, top-up


def test_run_only_skip_from(folder_manifest, tmp_path):
    ws = tmp_path / "ws"
    r = cli("run", "-m", str(folder_manifest), "-w", str(ws), *QUIET, "--only", "ingest")
    assert r.exit_code == 0, r.output
    assert "ingest: 7 files seen" in r.output and "dedup:" not in r.output and "publish:" not in r.output
    r = cli("run", "-m", str(folder_manifest), "-w", str(ws), *QUIET, "--from", "dedup", "--skip", "score,publish")
    assert r.exit_code == 0, r.output
    assert "ingest:" not in r.output and "dedup: 7 images" in r.output and "score:" not in r.output and "publish:" not in r.output
    assert "run of clitest complete (dedup)" in r.output
    r = cli("run", "-m", str(folder_manifest), "-w", str(ws), *QUIET, "--only", "score", "--device", "cpu")
    assert r.exit_code == 0 and "score: skipped" in r.output and "dedup:" not in r.output, r.output
    assert [h["summary"][0].split(":")[0] for h in history(ws)] == ["ingest", "dedup", "score"]


@pytest.mark.slow
def test_run_prints_finished_stages_then_one_error_line_when_the_push_fails(folder_manifest, tmp_path):
    ws = tmp_path / "ws"
    r = cli_process("run", "-m", str(folder_manifest), "-w", str(ws), "-q",
                    env={"FIFTYONE_DATABASE_URI": f"mongodb://127.0.0.1:{_closed_port()}"})
    assert r.returncode == 2, r.stdout + r.stderr
    out = r.stdout
    order = [out.index(s) for s in ("ingest: 7 files seen", "dedup: 7 images", "score: skipped", "targets: ")]
    assert order == sorted(order) and "publish:" not in out
    assert r.stderr.strip().splitlines()[-1].startswith("error: cannot reach the FiftyOne database")
    assert "Traceback" not in r.stderr
    (entry,) = history(ws)
    assert entry["outcome"] == "error" and entry["exit_code"] == 2 and len(entry["summary"]) == 4


class ImageServer:
    """Loopback /img/<name>.jpg from a dict of bodies (None: 503, a transient failure); counts requests."""

    def __init__(self, bodies: dict[str, bytes]):
        self.hits: Counter = Counter()
        fx = self

        class Handler(support.QuietHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                fx.hits[name] += 1
                if name not in bodies:
                    self.send_error(404)
                    return
                body = bodies[name]
                if body is None:
                    self.send_error(503)
                    return
                self.send(200, body, "image/jpeg")

        self.server = support.LoopbackServer(Handler)
        self.base = f"http://127.0.0.1:{self.server.port}/img"

    def close(self):
        self.server.close()


def test_run_tops_classes_up_after_dedup_and_reports_exhausted_ones(folder_manifest, tmp_path):
    # cat (target 4) comes from a URL list whose first four URLs hold two pairs of near duplicates:
    # round 1 stores 4, dedup leaves 2, round 2 fetches the next 2. dog (target 4) comes only from
    # the folder tree: 4 files, one a copy, and no URL gives more, so it ends 3/4, exhausted.
    pics = {i: support.textured(100 + i) for i in range(6)}
    bodies = {"c0.jpg": support.encode(pics[0], "JPEG", quality=90), "c0-copy.jpg": support.planted_copies(pics[0])["resized"],
              "c1.jpg": support.encode(pics[1], "JPEG", quality=90), "c1-copy.jpg": support.planted_copies(pics[1])["lowq"],
              **{f"c{i}.jpg": support.encode(pics[i], "JPEG", quality=90) for i in range(2, 6)}}
    order = ["c0.jpg", "c0-copy.jpg", "c1.jpg", "c1-copy.jpg", "c2.jpg", "c3.jpg", "c4.jpg", "c5.jpg"]
    srv = ImageServer(bodies)
    try:
        urls = tmp_path / "urls.csv"
        urls.write_text("url,label,license\n" + "".join(f"{srv.base}/{n},cat,cc0\n" for n in order))
        data = yaml.safe_load(folder_manifest.read_text())
        (tmp_path / "tree" / "cat").rename(tmp_path / "cat-unused")  # cat only from the web
        data["sources"].append({"type": "urls", "path": str(urls)})
        data["classes"] = [{"name": "cat", "target": 4}, {"name": "dog", "target": 4}]
        data["scrape"] = {"allow_private_networks": True, "concurrency": 1}
        folder_manifest.write_text(yaml.safe_dump(data))
        ws = tmp_path / "ws"
        r = cli("run", "-m", str(folder_manifest), "-w", str(ws), *QUIET)
        assert r.exit_code == 0, r.output
    finally:
        srv.close()
    assert "round 2: scrape:" in r.output and "round 2: dedup:" in r.output and "round 2: score:" in r.output
    assert "targets: 1 of 2 classes met; dog 3/4 (short: sources exhausted)" in r.output
    assert "round 3" not in r.output  # nothing short that a source could still fill: no third round
    assert surviving(ws) == Counter({"cat": 4, "dog": 3})
    assert set(srv.hits) == set(order[:6]) and max(srv.hits.values()) == 1  # no overshoot, nothing fetched twice


def _cat_from_urls(manifest: Path, tmp_path: Path, srv: ImageServer, names, target: int, **scrape_kw) -> None:
    """Rewrite the manifest: one class `cat` (target), fed only by a URL list of these server files."""
    urls = tmp_path / "urls.csv"
    urls.write_text("url,label,license\n" + "".join(f"{srv.base}/{n},cat,cc0\n" for n in names))
    data = yaml.safe_load(manifest.read_text())
    data["sources"] = [{"type": "urls", "path": str(urls)}]
    data["classes"] = [{"name": "cat", "target": target}]
    data["scrape"] = {"allow_private_networks": True, **scrape_kw}
    manifest.write_text(yaml.safe_dump(data))


def test_run_stops_at_the_round_limit_and_says_so(folder_manifest, tmp_path):
    # Every URL is a copy of the first image: each round stores new bytes that dedup removes.
    base = support.textured(200)
    copies = support.planted_copies(base)
    bodies = {"c0.jpg": support.encode(base, "JPEG", quality=90), **{f"{k}.jpg": v for k, v in copies.items() if k != "png"}}
    srv = ImageServer(bodies)
    try:
        _cat_from_urls(folder_manifest, tmp_path, srv, bodies, 2, concurrency=1)
        r = cli("run", "-m", str(folder_manifest), "-w", str(tmp_path / "ws"), *QUIET, "--rounds", "2")
    finally:
        srv.close()
    assert r.exit_code == 0, r.output
    assert "round 2: scrape:" in r.output and "round 3" not in r.output
    assert "targets: 0 of 1 classes met; cat 1/2 (short: stopped after 2 round(s))" in r.output


def test_run_stops_when_a_round_adds_nothing(folder_manifest, tmp_path):
    # Two URLs answer 503 (transient: not exhausted, worth a later run); round 2 gets nothing new
    # from them, so the loop stops there although --rounds allows a third.
    bodies = {"c0.jpg": support.jpeg(300), "c1.jpg": support.jpeg(301), "x0.jpg": None, "x1.jpg": None}
    srv = ImageServer(bodies)
    try:
        _cat_from_urls(folder_manifest, tmp_path, srv, bodies, 3, concurrency=1, retries=0, backoff_s=0)
        r = cli("run", "-m", str(folder_manifest), "-w", str(tmp_path / "ws"), *QUIET, "--rounds", "3")
    finally:
        srv.close()
    assert r.exit_code == 0, r.output
    assert "round 2: scrape:" in r.output and "round 2: dedup" not in r.output and "round 3" not in r.output
    assert "targets: 0 of 1 classes met; cat 2/3 (short: a round added nothing" in r.output
    assert srv.hits["x0.jpg"] == srv.hits["x1.jpg"] == 2 and srv.hits["c0.jpg"] == 1


def test_run_does_not_top_up_a_class_its_first_scrape_found_exhausted(folder_manifest, tmp_path):
    srv = ImageServer({"c0.jpg": support.jpeg(400)})
    try:
        _cat_from_urls(folder_manifest, tmp_path, srv, ["c0.jpg"], 2)
        r = cli("run", "-m", str(folder_manifest), "-w", str(tmp_path / "ws"), *QUIET)
    finally:
        srv.close()
    assert r.exit_code == 0, r.output
    assert "round 2" not in r.output and "targets: 0 of 1 classes met; cat 1/2 (short: sources exhausted)" in r.output
