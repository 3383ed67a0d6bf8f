"""Published datasets for the training tests, written exactly as the publish stage lays them out:
WORKDIR/published/v<N>/{README.md (configs), data/<split>-*.parquet, publish.json}."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ["red", "green", "blue"]


def learnable_image(label: int, seed: int, size: tuple[int, int] = (40, 32)) -> bytes:
    """A noisy image whose dominant colour channel is its class: learnable by a tiny CNN in a few epochs."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = rng.integers(0, 70, size=(h, w, 3)).astype(np.int16)
    arr[..., label % 3] += 140 + rng.integers(0, 40)
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    arr[y0:y0 + h // 4, x0:x0 + w // 4] = rng.integers(0, 255, size=3)  # a distractor patch
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").save(buf, "PNG")
    return buf.getvalue()


def write_published(root: Path, *, classes: list[str] = CLASSES, per_class: int = 18, folds: int = 3,
                    group_size: int = 2, test_per_class: int = 4, version: int = 1, seed: int = 0,
                    flip_labels: dict[int, int] | None = None) -> tuple[Path, list[dict]]:
    """Write WORKDIR-like ``root/published/v<version>``; returns (folder, rows of the pool).

    Rows come in duplicate groups of ``group_size`` (same class, same split, same fold); folds are
    assigned to groups round-robin per class; one group in five of each class goes to `validation`.
    ``flip_labels`` {pool row number: new label} plants label errors (the image keeps its colour).
    """
    import datasets

    out = Path(root) / "published" / f"v{version}"
    (out / "data").mkdir(parents=True, exist_ok=True)
    feats = datasets.Features({
        "image": datasets.Image(), "label": datasets.ClassLabel(names=classes), "image_id": datasets.Value("string"),
        "fold": datasets.Value("int32"), "group": datasets.Value("string"), "source": datasets.Value("string"),
    })
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    n = 0
    for c in range(len(classes)):
        for g in range(per_class // group_size):
            fold = (g + c) % folds
            split = "validation" if g % 5 == 4 else "train"
            for _ in range(group_size):
                data = learnable_image(c, seed * 100_000 + n)
                splits[split].append({"image": {"bytes": data, "path": None}, "label": c,
                                      "image_id": hashlib.sha256(data).hexdigest(), "fold": fold,
                                      "group": f"g{c}-{g}", "source": "synthetic"})
                n += 1
        for t in range(test_per_class):
            data = learnable_image(c, seed * 100_000 + 50_000 + c * 100 + t)
            splits["test"].append({"image": {"bytes": data, "path": None}, "label": c,
                                   "image_id": hashlib.sha256(data).hexdigest(), "fold": -1,
                                   "group": f"t{c}-{t}", "source": "synthetic"})
    pool = splits["train"] + splits["validation"]
    for i, lab in (flip_labels or {}).items():
        pool[i]["label"] = lab
    for name, rows in splits.items():
        ds = datasets.Dataset.from_list(rows, features=feats)
        ds.to_parquet(str(out / "data" / f"{name}-00000-of-00001.parquet"))
    (out / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n"
        + "".join(f"  - split: {s}\n    path: data/{s}-*.parquet\n" for s in splits)
        + "---\n# test dataset\n"
    )
    counts = {s: len(r) for s, r in splits.items()}
    (out / "publish.json").write_text(json.dumps({"version": version, "hash": f"test{seed}", "dataset": "toy",
                                                  "class_names": classes, "folds": folds, "counts": counts}))
    return out, pool


def tiny_manifest(workdir: Path, *, arch: str = "test_resnet", mode: str = "finetune", classes: list[str] = CLASSES,
                  **train) -> "object":
    """A manifest whose `train` section is shrunk for CPU tests (tiny timm model, 32 px, few epochs)."""
    from curation.config import parse_manifest

    t = {"models": [{"name": f"{arch}-{mode}", "arch": arch, "mode": mode, "pretrained": False,
                     "hyper": {"lr": 0.01, "backbone_factor": 2, "wd_head": 1e-4, "wd_backbone": 1e-4}}],
         "image_size": 32, "freeze_bn_stats": mode != "full", "batch_size": 16, "max_epochs": 3, "patience": 3, "workers": 0,
         "augment": {"random_resized_crop": False, "hflip": 0.5}, "export_onnx": False}
    t.update(train)
    return parse_manifest({"name": "toy", "workdir": str(workdir), "classes": [{"name": c} for c in classes],
                           "train": t})


@pytest.fixture
def published(tmp_path):
    folder, pool = write_published(tmp_path / "ws")
    return folder, pool
