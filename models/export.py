"""Best weights in, a self-contained model folder out (model.pt + model.json + model.onnx);
and `predict`: a model folder and image files/folders in, top-k class names and probabilities out."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from curation.errors import JurassiclassError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class ModelNotFound(JurassiclassError, FileNotFoundError):
    """No exported model where `predict` was pointed."""


def save(out: Path, model: nn.Module, *, arch: str, class_names: list[str], data_config: dict, onnx: bool = True,
         extra: dict | None = None) -> Path:
    """Write the model folder; returns it."""
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval().to("cpu", memory_format=torch.contiguous_format)
    torch.save({"arch": arch, "num_classes": len(class_names), "state_dict": model.state_dict()}, out / "model.pt")
    meta = {"arch": arch, "class_names": class_names, "data_config": data_config, **(extra or {})}
    if onnx:
        export_onnx(model, data_config["input_size"][-1], out / "model.onnx")
        meta["onnx"] = "model.onnx"
    (out / "model.json").write_text(json.dumps(meta, indent=2))
    return out


def export_onnx(model: nn.Module, size: int, path: Path) -> Path:
    """ONNX with a dynamic batch axis; input `image` (N, 3, size, size) normalised, output `logits`."""
    x = torch.zeros(1, 3, size, size)
    # The TorchScript-based exporter: it needs no onnxscript and handles every timm CNN here.
    torch.onnx.export(model, (x,), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


def resolve(path: Path) -> Path:
    """A model folder from itself, its parent (an experiment's model dir), or an experiment (best model)."""
    path = Path(path)
    for cand in (path, path / "model"):
        if (cand / "model.json").is_file():
            return cand
    metrics = path / "metrics.json"
    if metrics.is_file():
        best = json.loads(metrics.read_text()).get("best_model")
        if best and (path / best / "model" / "model.json").is_file():
            return path / best / "model"
    raise ModelNotFound(f"no exported model (model.json) in {path} or {path / 'model'}")


@dataclass
class Predictor:
    folder: Path
    meta: dict
    backend: str
    model: object  # nn.Module or onnxruntime session

    @property
    def class_names(self) -> list[str]:
        return self.meta["class_names"]

    def transform(self):
        from models.data import eval_transform

        cfg = dict(self.meta["data_config"])
        cfg["input_size"] = tuple(cfg["input_size"])
        return eval_transform(cfg)

    def probs(self, batch: torch.Tensor) -> np.ndarray:
        if self.backend == "onnx":
            logits = self.model.run(["logits"], {"image": batch.numpy().astype(np.float32)})[0]
            logits = torch.from_numpy(logits)
        else:
            with torch.inference_mode():
                logits = self.model(batch)
        return torch.softmax(logits.float(), dim=1).numpy()


def load(path: Path, backend: str = "torch") -> Predictor:
    folder = resolve(path)
    meta = json.loads((folder / "model.json").read_text())
    if backend == "onnx":
        import onnxruntime as ort

        if not (folder / "model.onnx").is_file():
            raise ModelNotFound(f"no model.onnx in {folder}")
        sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        return Predictor(folder, meta, backend, sess)
    import timm

    ck = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    model = timm.create_model(ck["arch"], pretrained=False, num_classes=ck["num_classes"])
    model.load_state_dict(ck["state_dict"])
    return Predictor(folder, meta, backend, model.eval())


def image_files(inputs: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out


def predict(path: Path, inputs: list[Path], *, top_k: int = 5, backend: str = "torch", batch_size: int = 32) -> list[dict]:
    """Per image: {"path", "top": [(class, prob), ...]} or {"path", "error"} (unreadable files are data)."""
    from models.data import decode

    pred = load(path, backend)
    tf = pred.transform()
    files = image_files(inputs)
    results: list[dict] = []
    k = min(top_k, len(pred.class_names))
    for start in range(0, len(files), batch_size):
        chunk, tensors, ok = files[start:start + batch_size], [], []
        for f in chunk:
            try:
                tensors.append(tf(decode(f.read_bytes())))
                ok.append(f)
            except Exception as exc:
                results.append({"path": str(f), "error": f"{type(exc).__name__}: {exc}"})
        if not tensors:
            continue
        probs = pred.probs(torch.stack(tensors))
        for f, row in zip(ok, probs):
            order = np.argsort(-row, kind="stable")[:k]
            results.append({"path": str(f), "top": [(pred.class_names[i], float(row[i])) for i in order]})
    return results
