"""Integration: catalog (ingested folder) -> publish (the real stage) -> `jurassiclass train`."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from tests.models.conftest import CLASSES, learnable_image


@pytest.mark.slow
def test_catalog_publish_train(tmp_path):
    from curation import catalog, ingest, publish
    from curation.catalog import Workspace
    from curation.cli import app
    from curation.config import load_manifest

    tree = tmp_path / "tree"
    for c, name in enumerate(CLASSES):
        (tree / name).mkdir(parents=True)
        for i in range(16):
            (tree / name / f"{i}.png").write_bytes(learnable_image(c, 1000 * c + i))
    mf = tmp_path / "toy.yaml"
    mf.write_text(yaml.safe_dump({
        "name": "toy", "workdir": str(tmp_path / "ws"), "classes": [{"name": c} for c in CLASSES],
        "sources": [{"type": "folder", "path": str(tree), "license": "cc0"}],
        "publish": {"include": "candidates", "folds": 3, "splits": {"train": 0.7, "validation": 0.1, "test": 0.2}},
        "train": {"models": [{"name": "tiny", "arch": "test_resnet", "mode": "full", "pretrained": False,
                              "hyper": {"lr": 0.01, "backbone_factor": 2}}],
                  "image_size": 32, "batch_size": 16, "max_epochs": 2, "workers": 0, "freeze_bn_stats": False,
                  "export_onnx": False},
    }))
    m = load_manifest(mf)
    ws = Workspace(tmp_path / "ws")
    ingest.run(m, ws, show_progress=False)
    pub = publish.publish(m, ws, show_progress=False)
    assert pub.changed and pub.folder
    res = CliRunner().invoke(app, ["train", "--manifest", str(mf), "--experiment", "it"])
    assert res.exit_code == 0, res.output
    doc = json.loads((ws.root / "models" / "it" / "metrics.json").read_text())
    assert doc["dataset"] == pub.folder and len(doc["models"]["tiny"]["fold_top1"]) == 3
    assert doc["models"]["tiny"]["test"]["top1"] is not None
    # OOF columns reached the catalog the dataset was published from
    df = catalog.read(ws)
    assert df["oof_self_confidence"].drop_nulls().len() == pub.per_split["train"] + pub.per_split["validation"]
