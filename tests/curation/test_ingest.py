import subprocess
import sys
from pathlib import Path

import polars as pl

from curation import catalog, ingest
from curation.config import parse_manifest
from tests import support


def manifest_for(root: Path, classes=("cat", "dog")):
    return parse_manifest(
        {"name": "t", "classes": [{"name": c} for c in classes], "sources": [{"type": "folder", "path": str(root), "license": "cc0"}]}
    )


def make_tree(root: Path) -> None:
    for i in range(3):
        support.write(root / "cat" / f"c{i}.jpg", support.jpeg(i))
        support.write(root / "dog" / "sub" / f"d{i}.png", support.png(100 + i))
    for name, (data, _) in support.bad_inputs().items():
        support.write(root / "dog" / "bad" / name, data)
    support.write(root / "horse" / "h.jpg", support.jpeg(50))  # class not in manifest
    support.write(root / "loose.jpg", support.jpeg(51))  # no class folder
    support.write(root / "cat" / "notes.txt", b"hello")


def test_ingest_records_everything_and_is_idempotent(tmp_path, workspace):
    root = tmp_path / "tree"
    make_tree(root)
    m = manifest_for(root)
    s = ingest.run(m, workspace, show_progress=False)
    assert s.seen == 3 + 3 + len(support.bad_inputs()) + 2
    assert s.not_image_extension == 1
    df = catalog.read(workspace)
    assert df.height == s.seen  # all bytes distinct: one row each
    bad = df.filter(pl.col("source_url").str.contains("/bad/"))
    for name, (_, reason) in support.bad_inputs().items():
        r = bad.filter(pl.col("source_url").str.ends_with("/" + name)).row(0, named=True)
        if reason is None:
            assert r["status"] == "candidate" and r["path"] and (workspace.root / r["path"]).exists()
        else:
            assert (r["status"], r["reason"]) == ("rejected", reason) and r["path"] is None
    assert df.filter(pl.col("label") == "horse")["reason"].to_list() == ["class_not_in_manifest"]
    assert df.filter(pl.col("label").is_null())["reason"].to_list() == ["no_class_folder"]
    ok = df.filter(pl.col("status") == "candidate")
    assert set(ok["source"]) == {"folder"} and set(ok["license"]) == {"cc0"}
    assert ok["retrieved_at"].null_count() == 0 and ok["width"].min() >= 32

    store_before = sorted(p.name for p in (workspace.root / "store").rglob("*"))
    cat_before = workspace.catalog_path.read_bytes()
    s2 = ingest.run(m, workspace, show_progress=False)
    assert s2.added == 0 and s2.already_known == s.seen
    assert workspace.catalog_path.read_bytes() == cat_before
    assert sorted(p.name for p in (workspace.root / "store").rglob("*")) == store_before


def test_same_bytes_in_two_folders_is_one_row_two_sightings(tmp_path, workspace):
    root = tmp_path / "tree"
    data = support.jpeg(7)
    support.write(root / "cat" / "a.jpg", data)
    support.write(root / "dog" / "a.jpg", data)
    ingest.run(manifest_for(root), workspace, show_progress=False)
    assert catalog.read(workspace).height == 1
    assert sorted(catalog.read_sightings(workspace)["label"].to_list()) == ["cat", "dog"]


def test_missing_folder_is_a_clear_error(tmp_path, workspace):
    import pytest

    with pytest.raises(FileNotFoundError, match="does not exist"):
        ingest.run(manifest_for(tmp_path / "nope"), workspace, show_progress=False)


def test_cli_ingest_and_catalog(tmp_path):
    root = tmp_path / "tree"
    make_tree(root)
    mpath = tmp_path / "m.yaml"
    mpath.write_text(f"name: t\nclasses: [{{name: cat}}, {{name: dog}}]\nsources: [{{type: folder, path: {root}}}]\n")
    ws = tmp_path / "ws"
    exe = Path(sys.executable).parent / "jurassiclass"
    out = subprocess.run([str(exe), "ingest", "-m", str(mpath), "-w", str(ws), "-q"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "added" in out.stdout and "cat" in out.stdout and "candidate" in out.stdout
    assert (ws / "manifest.resolved.yaml").exists()
    out = subprocess.run([str(exe), "catalog", "-w", str(ws)], capture_output=True, text=True)
    assert out.returncode == 0 and "decompression_bomb" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nclasses: [{name: cat}]\nsourcez: []\n")
    out = subprocess.run([str(exe), "ingest", "-m", str(bad), "-w", str(ws)], capture_output=True, text=True)
    assert out.returncode == 2 and "sourcez" in out.stderr and "Traceback" not in out.stderr
    missing = tmp_path / "missing.yaml"
    missing.write_text(f"name: t\nclasses: [{{name: cat}}]\nsources: [{{type: folder, path: {tmp_path/'nope'}}}]\n")
    out = subprocess.run([str(exe), "ingest", "-m", str(missing), "-w", str(ws)], capture_output=True, text=True)
    assert out.returncode == 2 and "does not exist" in out.stderr
