"""A registered model folder in, a Hub model repo out: the weights (model.pt, model.onnx, model.json),
metrics, and a model card that names the dataset version it was trained and evaluated on."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from curation.catalog import Workspace
from curation.config import Manifest
from models import registry


def model_card(m: Manifest, entry: dict, dataset_repo: str | None) -> str:
    ev = entry.get("evaluation") or {}
    test = (ev.get("metrics") or entry["metrics"].get("test") or {})
    meta = {"library_name": "timm", "pipeline_tag": "image-classification", "tags": ["jurassiclass", "image-classification"],
            "license": "other"}
    if dataset_repo:
        meta["datasets"] = [dataset_repo]
    lines = [
        f"# {m.name} classifier ({entry['id']})", "",
        f"Trained by jurassiclass on dataset **{dataset_repo or m.name} v{entry['dataset_version']}** "
        f"(content hash `{(entry['dataset_hash'] or '')[:16]}`); model `{entry['metrics'].get('model')}`.", "",
        f"Classes ({len(m.class_names)}): {', '.join(m.class_names)}.", "",
        "## Evaluation (the dataset version's untouched test split)", "",
        "| metric | value |", "| --- | --- |",
        *[f"| {k} | {test[k]:.4f} |" for k in ("top1", "top5", "macro_f1", "ece") if isinstance(test.get(k), (int, float))],
    ]
    cv = entry["metrics"].get("cv_top1_mean")
    if cv is not None:
        lines += ["", f"Cross-validated top-1 on train+validation folds: {cv:.4f} ± {entry['metrics'].get('cv_top1_std') or 0:.4f}."]
    lines += ["", "## Use", "", "```bash", "jurassiclass predict --model . IMAGE...", "```", "",
              "`model.onnx` takes `image` (N, 3, H, W), normalised as in `model.json`'s `data_config`, and returns `logits`.", ""]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + "\n".join(lines)


def push(m: Manifest, ws: Workspace, entry_id: str | None = None, *, repo_id: str | None = None,
         token: str | None = None, private: bool = True) -> dict:
    """Upload a model (default: the promoted one) to ``repo_id`` (default: retrain.model_repo_id),
    tagged ``data-v<N>`` after the dataset version it was trained on."""
    from huggingface_hub import HfApi

    from curation.publish import with_retries

    reg = registry.read(ws)
    entry_id = entry_id or reg["promoted"]
    if not entry_id:
        raise registry.RegistryError("no promoted model to push: train one first (or name one)")
    entry = registry.get(reg, entry_id)
    if entry["status"] != "trained":
        raise registry.RegistryError(f"{entry_id} is {entry['status']}: only a trained model can be pushed")
    repo_id = repo_id or m.retrain.model_repo_id
    if not repo_id:
        raise registry.RegistryError("no Hub model repo: pass --repo ORG/NAME or set retrain.model_repo_id")
    api = HfApi(token=token or os.environ.get("HF_TOKEN") or None)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for f in ("model.pt", "model.onnx", "model.json"):
            if (Path(entry["model_dir"]) / f).exists():
                shutil.copy2(Path(entry["model_dir"]) / f, out / f)
        (out / "metrics.json").write_text(json.dumps({k: v for k, v in entry.items() if k not in ("pid", "host")},
                                                     indent=2, default=str))
        (out / "README.md").write_text(model_card(m, entry, m.publish.repo_id), encoding="utf-8")
        with_retries(lambda: api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True))
        commit = with_retries(lambda: api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(out),
                                                     commit_message=f"{entry_id} (dataset v{entry['dataset_version']})"))
    tag = f"data-v{entry['dataset_version']}"
    with_retries(lambda: api.create_tag(repo_id, tag=tag, repo_type="model", revision=commit.oid, exist_ok=True))
    return {"repo_id": repo_id, "entry": entry_id, "tag": tag, "commit": commit.oid}
