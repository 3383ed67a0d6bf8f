"""Settings and preprocessing: the manifest's train section, the model's own data config at the
configured size with exactly one resize, the seed's letterbox, class balancing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from curation.config import ManifestError, TrainSettings, load_manifest, parse_manifest
from models import data

ROOT = Path(__file__).resolve().parents[2]


def test_dinosaurs_manifest_has_the_seeds_models_and_grid():
    m = load_manifest(ROOT / "manifests" / "dinosaurs.yaml")
    by = {s.name: s for s in m.train.models}
    assert set(by) == {"efficientnetv2_s-finetune", "resnet34-finetune"}
    r, e = by["resnet34-finetune"], by["efficientnetv2_s-finetune"]
    assert (r.arch, r.hyper.lr, r.hyper.lr / r.hyper.backbone_factor, r.hyper.wd_head, r.hyper.wd_backbone) == \
        ("resnet34", 5e-3, 5e-4, 1e-3, 1e-2)
    assert (e.arch, e.hyper.wd_head, e.hyper.wd_backbone) == ("tf_efficientnetv2_s", 1e-4, 1e-4)
    assert m.train.grid[0] == {"lr": [0.003, 0.005], "backbone_factor": [5, 10]}
    assert m.train.letterbox and m.train.image_size == 224


def test_train_section_is_validated(tmp_path):
    base = {"name": "x", "classes": [{"name": "a"}, {"name": "b"}]}
    with pytest.raises(ManifestError, match="grid"):
        parse_manifest({**base, "train": {"grid": [{"learning_rate": [0.1]}]}})
    with pytest.raises(ManifestError, match="unknown model preset"):
        parse_manifest({**base, "train": {"models": ["resnet9000"]}})
    with pytest.raises(ManifestError, match="train.typo"):
        parse_manifest({**base, "train": {"typo": 1}})
    m = parse_manifest({**base, "train": {"models": [{"name": "a", "arch": "resnet34", "weights": "w.pth"}]}},
                       base_dir=tmp_path)
    assert m.train.models[0].weights == (tmp_path / "w.pth").resolve()


def _resizes(tf) -> list:
    return [t for t in tf.transforms if "Resize" in type(t).__name__ or isinstance(t, data.Letterbox)]


@pytest.mark.parametrize("letterbox", [False, True])
def test_preprocessing_is_the_models_own_with_one_resize(letterbox):
    import timm

    model = timm.create_model("tf_efficientnetv2_s", pretrained=False, num_classes=2)
    cfg = data.data_config(model, TrainSettings(models=[], image_size=224, letterbox=letterbox))
    assert cfg["input_size"] == (3, 224, 224)  # not the weights' 300/384
    assert cfg["mean"] == model.pretrained_cfg["mean"] and cfg["interpolation"] == model.pretrained_cfg["interpolation"]
    im = Image.new("RGB", (500, 250), (255, 255, 255))
    ev = data.eval_transform(cfg)
    assert len(_resizes(ev)) == 1 and ev(im).shape == (3, 224, 224)
    tr = data.train_transform(cfg, TrainSettings(models=[], image_size=224, letterbox=letterbox))
    assert len(_resizes(tr)) == 1 and tr(im).shape == (3, 224, 224)


def test_letterbox_is_the_seeds():
    out = np.asarray(data.Letterbox(100)(Image.new("RGB", (400, 200), (255, 255, 255))))
    rows, cols = np.nonzero(out[..., 0])
    assert (cols.min(), cols.max() + 1) == (10, 90)  # long side 0.8 x 100, centred
    assert (rows.min(), rows.max() + 1) == (30, 70)  # aspect kept, black padding, nothing cropped


def test_class_weights_inverse_frequency():
    w = data.class_weights(np.array([0, 0, 0, 1]), 3)
    assert torch.allclose(w, torch.tensor([2 / 3, 2.0, 0.0]))


def test_loader_workers_start_clean_under_a_process_that_handles_sigterm():
    """A flow-run process (Prefect's) handles SIGTERM itself: its forked loader workers would turn
    the SIGTERM that ends them into its termination exception. Then they are spawned."""
    import signal

    from models.data import worker_context

    assert worker_context(0) is None
    old = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        assert worker_context(2) is None  # a plain process: fork, the fast way
        signal.signal(signal.SIGTERM, lambda *a: None)
        assert worker_context(2).get_start_method() == "spawn"
    finally:
        signal.signal(signal.SIGTERM, old)
