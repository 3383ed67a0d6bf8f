"""The model registry: claims (once per dataset version), a killed training leaves it consistent,
promotion only when the new model is not worse on the same held-out split, the Hub model push."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from curation.catalog import Workspace
from models import registry
from models import run as train_run
from tests.hubstub import hub  # noqa: F401  (the fixture)
from tests.models.conftest import tiny_manifest, write_published


def test_decide():
    assert registry.decide(0.80, None, 0.01) == (True, "no model promoted yet")
    assert registry.decide(0.80, 0.805, 0.01)[0] is True  # within tolerance
    assert registry.decide(0.90, 0.80, 0.0)[0] is True
    ok, why = registry.decide(0.70, 0.80, 0.05)
    assert ok is False and "worse" in why


def test_claim_once_per_dataset_and_force(tmp_path):
    ws = Workspace(tmp_path / "ws")
    a = registry.claim(ws, kind="retrain", dataset_version=1, dataset_hash="h1", dataset_ref="x")
    assert a["id"] == "retrain-001" and a["status"] == "training"
    assert registry.claim(ws, kind="retrain", dataset_version=1, dataset_hash="h1", dataset_ref="x") is None
    assert registry.claim(ws, kind="other", dataset_version=1, dataset_hash="h1", dataset_ref="x")["id"] == "other-001"
    b = registry.claim(ws, kind="retrain", dataset_version=2, dataset_hash="h2", dataset_ref="y")
    registry.fail(ws, b["id"], "boom")
    # a failed run does not block the version: it is claimed again
    assert registry.claim(ws, kind="retrain", dataset_version=2, dataset_hash="h2", dataset_ref="y")["id"] == "retrain-003"
    assert registry.claim(ws, kind="retrain", dataset_version=1, dataset_hash="h1", dataset_ref="x", force=True)["id"] == "retrain-004"
    with pytest.raises(registry.RegistryError, match="only a trained model"):
        registry.promote(ws, "retrain-001")


def test_a_killed_training_leaves_the_registry_consistent(tmp_path):
    ws = Workspace(tmp_path / "ws")
    # A promoted model exists; a new training claims its version and is SIGKILLed mid-way.
    first = registry.claim(ws, kind="retrain", dataset_version=1, dataset_hash="h1", dataset_ref="x")
    registry.complete(ws, first["id"], experiment_dir=tmp_path, model_dir=tmp_path, metrics={})
    registry.promote(ws, first["id"])
    code = ("import sys, time; from curation.catalog import Workspace; from models import registry; "
            f"registry.claim(Workspace({str(ws.root)!r}), kind='retrain', dataset_version=2, dataset_hash='h2', dataset_ref='y'); "
            "print('claimed', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    assert proc.stdout.readline().strip() == "claimed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    reg = json.loads((ws.root / "models" / "registry.json").read_text())  # readable: written atomically
    assert reg["promoted"] == first["id"]
    stuck = reg["entries"][-1]
    assert (stuck["status"], stuck["dataset_version"]) == ("training", 2)
    # The next run for that version sees the dead process, records it, and trains again.
    again = registry.claim(ws, kind="retrain", dataset_version=2, dataset_hash="h2", dataset_ref="y")
    assert again is not None and again["id"] != stuck["id"]
    after = registry.read(ws)
    assert registry.get(after, stuck["id"])["status"] == "failed" and "interrupted" in registry.get(after, stuck["id"])["error"]
    assert after["promoted"] == first["id"]


def _train(ws: Workspace, folder, name: str, **train) -> dict:
    m = tiny_manifest(ws.root, **train)
    entry = registry.claim(ws, kind=name, dataset_version=1, dataset_hash=f"h-{name}", dataset_ref=str(folder))
    s = train_run.run(m, ws, dataset=str(folder), experiment=name)
    from models import export

    model_dir = export.resolve(s.out_dir / s.best_model)
    return registry.complete(ws, entry["id"], experiment_dir=s.out_dir, model_dir=model_dir,
                             metrics={"test": s.models[0].test, "model": s.best_model})


@pytest.mark.slow
def test_a_worse_model_is_not_promoted_a_better_one_is_and_the_promoted_one_goes_to_the_hub(tmp_path, hub):
    ws = Workspace(tmp_path / "ws")
    folder, _ = write_published(ws.root, per_class=24, test_per_class=8)
    fast = dict(cv=False, label_issues=False, max_epochs=6, patience=6)
    good = _train(ws, folder, "good", **fast)
    d1 = registry.promote_if_better(ws, good["id"], metric="top1", tolerance=0.02)
    assert d1.promoted and d1.current is None and d1.new > 0.6
    # Barely trained: one batch at a tiny learning rate, so about chance on the same test split.
    bad = _train(ws, folder, "bad", cv=False, label_issues=False, max_epochs=1, limit_batches=1,
                 models=[{"name": "test_resnet-finetune", "arch": "test_resnet", "mode": "finetune", "pretrained": False,
                          "hyper": {"lr": 1e-7, "backbone_factor": 1, "wd_head": 0, "wd_backbone": 0}}])
    d2 = registry.promote_if_better(ws, bad["id"], metric="top1", tolerance=0.02)
    assert not d2.promoted and d2.current == pytest.approx(d1.new) and d2.new < d1.new - 0.02
    assert registry.read(ws)["promoted"] == good["id"]
    better = _train(ws, folder, "again", **{**fast, "max_epochs": 8, "patience": 8})
    d3 = registry.promote_if_better(ws, better["id"], metric="top1", tolerance=0.02)
    assert d3.promoted == (d3.new >= d1.new - 0.02)  # the rule, on the evaluation both got
    reg = registry.read(ws)
    assert [e["promoted"] for e in reg["events"]] == [True, False, d3.promoted]
    assert registry.history_plot(ws, "top1", tmp_path / "h.png").stat().st_size > 1000

    # The promoted model goes to the Hub beside its dataset, its card naming the dataset version.
    from curation.config import PublishSettings, RetrainSettings
    from models import hub as model_hub

    m = tiny_manifest(ws.root)
    m = m.model_copy(update={"publish": PublishSettings(repo_id="stub-user/toy"),
                             "retrain": RetrainSettings(model_repo_id="stub-user/toy-classifier")})
    r = model_hub.push(m, ws)
    assert r["entry"] == reg["promoted"] and r["tag"] == "data-v1"
    repo = hub.repo("stub-user/toy-classifier", "model")
    files = repo.files("data-v1")
    assert {"model.pt", "model.json", "README.md", "metrics.json"} <= set(files)
    card = files["README.md"].decode()
    assert "datasets:\n- stub-user/toy" in card and "stub-user/toy v1" in card and "| top1 |" in card
    assert hub.token.encode() not in files["metrics.json"]
