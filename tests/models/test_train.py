"""The training stage end to end on small generated published datasets (tiny timm models, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from curation import catalog
from curation.catalog import Workspace
from models import cv, export, metrics, run
from models.data import load_published
from models.fit import fit

from tests.models.conftest import CLASSES, tiny_manifest, write_published

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_one_fold_beats_chance(tmp_path, published):
    folder, _ = published
    pub = load_published(folder)
    m = tiny_manifest(tmp_path, mode="full", max_epochs=4)
    spec = m.train.models[0]
    sp = cv.outer_split(pub.pool_folds, pub.folds, 0)
    r = fit(pub, spec, spec.hyper, m.train, train=sp.train, val=sp.val, evaluate={"held_out": (pub.pool, sp.test)},
            out_dir=tmp_path / "fold", seed=0)
    acc = metrics.top_k(pub.pool_labels[sp.test], r.probs["held_out"], 1)
    assert acc >= 0.7, f"held-out top-1 {acc:.3f} vs chance 0.33"
    assert r.probs["held_out"].shape == (len(sp.test), 3)
    assert r.history and {"train/loss", "val/loss", "val/acc"} <= set(r.history[-1])
    assert r.data_config["input_size"] == [3, 32, 32]  # the configured size, not the model's 160


def _manifest_file(tmp_path: Path, **train) -> Path:
    m = tiny_manifest(tmp_path / "ws", **train)
    data = {"name": m.name, "classes": [{"name": c} for c in CLASSES], "train": m.train.model_dump(mode="json")}
    p = tmp_path / "toy.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.slow
def test_cli_train_then_predict_torch_and_onnx_agree(tmp_path):
    from curation.cli import app

    folder, _ = write_published(tmp_path / "ws")
    mf = _manifest_file(tmp_path, mode="full", max_epochs=2, export_onnx=True, letterbox=True)
    res = CliRunner().invoke(app, ["train", "--manifest", str(mf), "--workdir", str(tmp_path / "ws"), "--experiment", "e1"])
    assert res.exit_code == 0, res.output
    assert "CV top-1" in res.output and "test top-1" in res.output
    exp = tmp_path / "ws" / "models" / "e1"
    name = "test_resnet-full"
    doc = json.loads((exp / "metrics.json").read_text())
    assert doc["best_model"] == name and len(doc["models"][name]["fold_top1"]) == 3
    final = json.loads((exp / name / "metrics.json").read_text())["final"]
    assert final["metrics"]["n"] == final["n_test"] == 12  # evaluated on the test split, nothing else
    for f in ("config.yaml", "config.json", f"{name}/MODEL_CARD.md", f"{name}/plots/confusion_matrix.png",
              f"{name}/plots/curves.png", f"{name}/plots/per_class_accuracy.png", f"{name}/model/model.onnx",
              f"{name}/fold-0/logs/metrics.csv", f"{name}/final/best.ckpt"):
        assert (exp / f).is_file(), f
    assert yaml.safe_load((exp / "config.yaml").read_text())["train"]["letterbox"] is True

    pub = load_published(folder)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(len(pub.test)):
        (imgs / f"{i:02d}.png").write_bytes(pub.test[i]["image"]["bytes"])
    (imgs / "broken.png").write_bytes(b"not an image")
    torch_out = export.predict(exp, [imgs], top_k=2)
    onnx_out = export.predict(exp / name / "model", [imgs], top_k=2, backend="onnx")
    good = [r for r in torch_out if "top" in r]
    assert len(good) == len(pub.test) and [r for r in torch_out if "error" in r][0]["path"].endswith("broken.png")
    assert [r["top"][0][0] for r in good] == [r["top"][0][0] for r in onnx_out if "top" in r]
    assert np.allclose([r["top"][0][1] for r in good], [r["top"][0][1] for r in onnx_out if "top" in r], atol=1e-4)
    # The exported model reproduces the final fit's own test predictions (same weights, same preprocessing).
    probs = np.load(exp / name / "final" / "test_probs.npz")["probs"]
    assert [r["top"][0][0] for r in good] == [CLASSES[i] for i in probs.argmax(1)]
    res = CliRunner().invoke(app, ["predict", "--model", str(exp), str(imgs / "00.png"), "-k", "2"])
    assert res.exit_code == 0 and res.output.split("\t")[1].split()[0] in CLASSES, res.output


@pytest.mark.slow
def test_planted_label_errors_reach_the_catalog_and_the_review_view(tmp_path):
    ws = Workspace(tmp_path / "ws").ensure()
    flips = {0: 1, 7: 2, 20: 0}  # pool rows whose published label is wrong
    folder, pool = write_published(ws.root, per_class=24, flip_labels=flips)
    # The catalog the dataset was published from (review pushes rows with a stored image).
    rows = []
    for i, r in enumerate(pool):
        rel = f"img/{r['image_id']}.png"
        (ws.root / "img").mkdir(exist_ok=True)
        (ws.root / rel).write_bytes(r["image"]["bytes"])
        rows.append({"image_id": r["image_id"], "label": CLASSES[r["label"]], "path": rel, "status": "accepted"})
    catalog.write(ws, catalog.rows_frame(rows))

    m = tiny_manifest(ws.root, mode="full", max_epochs=5, patience=5)
    s = run.run(m, ws, experiment="li")
    df = catalog.read(ws)
    flagged = set(df.filter(pl.col("label_issue"))["image_id"])
    planted = {pool[i]["image_id"] for i in flips}
    assert planted <= flagged, f"{len(planted - flagged)} planted errors missed"
    assert len(flagged) <= len(pool) // 4 and s.label_issues == len(flagged)
    got = df.filter(pl.col("image_id").is_in(list(planted)))
    truth = {pool[i]["image_id"]: CLASSES[pool_true(pool[i])] for i in flips}
    assert dict(zip(got["image_id"], got["oof_top_label"])) == truth
    assert (got["oof_self_confidence"] < 0.5).all() and got["label_issue_rank"].max() <= 2 * len(flips) + 2

    # ... and FiftyOne's `label-issues` view lists them, most suspicious first (own mongod, own process).
    order = _review_view(tmp_path, ws)
    assert set(order[: len(flagged)]) == flagged and planted <= set(order)
    conf = dict(zip(df["image_id"], df["oof_self_confidence"]))
    assert [conf[i] for i in order] == sorted(conf[i] for i in order)


def pool_true(row: dict) -> int:
    """The colour a generated image really shows (its dominant channel), whatever its label says."""
    import io

    from PIL import Image

    arr = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"), dtype=np.float64)
    return int(arr.reshape(-1, 3).mean(0).argmax())


def _review_view(tmp_path: Path, ws: Workspace) -> list[str]:
    from tests.curation.test_review import free_port, mongod_binary, wait_port

    port = free_port()
    (tmp_path / "db").mkdir()
    mongod = subprocess.Popen([str(mongod_binary()), "--dbpath", str(tmp_path / "db"), "--port", str(port),
                               "--bind_ip", "127.0.0.1", "--nounixsocket"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT)
    try:
        wait_port(port, 60, mongod)
        script = textwrap.dedent(f"""
            import json
            from curation import review
            from curation.catalog import Workspace
            from curation.config import parse_manifest
            m = parse_manifest({{"name": "toy", "classes": [{{"name": c}} for c in {CLASSES!r}],
                                 "review": {{"dataset_name": "toy-label-issues"}}}})
            s = review.push(m, Workspace({str(ws.root)!r}), show_progress=False)
            assert "label-issues" in s.views, s.views
            ds = review._load(m, Workspace({str(ws.root)!r}))
            print(json.dumps(ds.load_saved_view("label-issues").values("image_id")))
        """)
        env = {**os.environ, "FIFTYONE_DATABASE_URI": f"mongodb://127.0.0.1:{port}", "HOME": str(tmp_path)}
        out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        mongod.terminate()
        mongod.wait(20)


def test_no_published_dataset_is_one_sentence_and_exit_2(tmp_path):
    from curation.cli import app

    mf = _manifest_file(tmp_path)
    res = CliRunner().invoke(app, ["train", "--manifest", str(mf), "--workdir", str(tmp_path / "ws")])
    assert res.exit_code == 2 and res.output.strip().startswith("error: no published dataset in"), res.output
    res = CliRunner().invoke(app, ["train", "--manifest", str(mf), "--workdir", str(tmp_path / "ws"),
                                   "--dataset", "nobody/nothing@v9"])
    assert res.exit_code == 2 and "cannot load the published dataset nobody/nothing@v9" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_nested_run_chooses_per_outer_fold_on_inner_folds(tmp_path):
    ws = Workspace(tmp_path / "ws").ensure()
    write_published(ws.root, folds=4, per_class=16)
    m = tiny_manifest(ws.root, mode="full", max_epochs=1, nested={"enabled": True, "outer_folds": 2, "inner_folds": 1},
                      grid=[{"lr": [0.01, 0.02]}], label_issues=False)
    s = run.run(m, ws, experiment="nested")
    (ms,) = s.models
    assert ms.nested and len(ms.fold_top1) == 2
    base = tmp_path / "ws" / "models" / "nested" / ms.name
    for i in (0, 1):
        r = json.loads((base / f"fold-{i}" / "result.json").read_text())
        assert len(r["inner_search"]) == 2 and all(i not in row["held_out"] for row in r["inner_search"])
        assert r["hyper"]["lr"] in (0.01, 0.02)
    final = json.loads((base / "metrics.json").read_text())["final"]
    assert len(final["search"]) == 2 and final["hyper"]["lr"] == ms.chosen["lr"]
