"""One training run: a model spec, hyper-parameters and row indices in; the best-by-val-loss
weights, their predicted probabilities on the rows asked for, and the epoch history out."""

from __future__ import annotations

import csv
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch

from curation.config import Hyper, ModelSpec, TrainSettings
from models import factory
from models.data import FoldData, Published, data_config
from models.module import Classifier


@dataclass
class FitResult:
    probs: dict[str, np.ndarray]  # eval name -> (n, classes) probabilities of the best weights
    best_val_loss: float
    epochs: int
    history: list[dict] = field(default_factory=list)  # one row per epoch: epoch, train/loss, val/loss, ...
    checkpoint: Path | None = None
    seconds: float = 0.0
    data_config: dict = field(default_factory=dict)


def use_cuda(settings: TrainSettings) -> bool:
    return settings.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def precision(settings: TrainSettings, cuda: bool) -> str:
    if settings.precision != "auto":
        return settings.precision
    if not cuda:
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def build(spec: ModelSpec, hyper: Hyper, settings: TrainSettings, num_classes: int, *, cuda: bool = False,
          class_weights: torch.Tensor | None = None) -> Classifier:
    """The LightningModule for a spec: timm model, frozen part, parameter groups."""
    model = factory.create(spec, num_classes)
    groups = factory.param_groups(model, spec, hyper)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    return Classifier(model, groups, settings, num_classes, label_smoothing=hyper.label_smoothing,
                      class_weights=class_weights, channels_last=cuda)


def _history(metrics_csv: Path) -> list[dict]:
    """Lightning's CSV rows merged per epoch (train and val metrics arrive on separate rows)."""
    if not metrics_csv.is_file():
        return []
    by_epoch: dict[int, dict] = {}
    with open(metrics_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            if not row.get("epoch"):
                continue
            e = int(float(row["epoch"]))
            slot = by_epoch.setdefault(e, {"epoch": e})
            for k, v in row.items():
                if v not in ("", None) and k not in ("epoch", "step") and "step_loss" not in k:
                    slot[k] = float(v)
    return [by_epoch[e] for e in sorted(by_epoch)]


@torch.inference_mode()
def predict(module: Classifier, loader, cuda: bool) -> np.ndarray:
    module.eval()
    device = torch.device("cuda" if cuda else "cpu")
    module.to(device)
    out = []
    for x, *_ in loader:
        x = x.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=cuda, dtype=torch.bfloat16 if cuda else torch.float32):
            out.append(torch.softmax(module(x).float(), dim=1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, module.num_classes), dtype=np.float32)


def fit(pub: Published, spec: ModelSpec, hyper: Hyper, settings: TrainSettings, *, train: np.ndarray,
        val: np.ndarray, evaluate: dict[str, tuple[object, np.ndarray]] | None = None, out_dir: Path,
        seed: int = 0, keep_checkpoint: bool = False) -> FitResult:
    """Train on pool rows ``train`` with early stopping / checkpointing on ``val``; predict every
    ``evaluate`` entry (name -> (table, indices)) with the best weights. Nothing else is touched."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    t0 = time.perf_counter()
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)  # "GPU available", tips: once per fit is noise
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(seed, workers=True, verbose=False)
    cuda = use_cuda(settings)
    n = len(pub.class_names)
    module = build(spec, hyper, settings, n, cuda=cuda)
    cfg = data_config(module.model, settings)
    dm = FoldData(pub.pool, train=train, val=val, cfg=cfg, settings=settings, num_classes=n, cuda=cuda, seed=seed)
    weights = dm.loss_weights()
    if weights is not None:
        module.class_weights = weights
    ckpt = ModelCheckpoint(dirpath=out_dir / "checkpoints", filename="best", monitor="val/loss", mode="min",
                           save_top_k=1, save_weights_only=True, enable_version_counter=False)
    stop = EarlyStopping(monitor="val/loss", mode="min", patience=settings.patience)
    loggers = [CSVLogger(out_dir, name="logs", version="")]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(out_dir, name="tensorboard", version="", default_hp_metric=False))
    except Exception:  # pragma: no cover - tensorboard not installed: the CSV log is enough
        pass
    limit = settings.limit_batches
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=settings.devices if cuda else 1,
        strategy=settings.strategy if cuda else "auto", precision=precision(settings, cuda),
        max_epochs=settings.max_epochs, min_epochs=min(settings.min_epochs, settings.max_epochs),
        callbacks=[ckpt, stop], logger=loggers, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=1, default_root_dir=out_dir,
        limit_train_batches=limit, limit_val_batches=limit,
    )
    trainer.fit(module, datamodule=dm)
    best = ckpt.best_model_path
    if best:
        state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
    probs = {}
    if trainer.is_global_zero:
        for name, (table, idx) in (evaluate or {}).items():
            probs[name] = predict(module, dm.eval_loader(table, idx), cuda)
    kept = None
    if best and keep_checkpoint:
        kept = out_dir / "best.ckpt"
        shutil.copyfile(best, kept)
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    score = ckpt.best_model_score
    return FitResult(
        probs=probs, best_val_loss=float(score) if score is not None else float("nan"),
        epochs=trainer.current_epoch, history=_history(out_dir / "logs" / "metrics.csv"), checkpoint=kept,
        seconds=time.perf_counter() - t0, data_config={k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
    )
