"""A timm model + its parameter groups in, a LightningModule out: one shared `model_step`,
torchmetrics per split logged as `split/metric`, AdamW per group, plateau or warm-up+cosine schedule."""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from curation.config import Scheduler, TrainSettings
from models.factory import Groups, norm_layers


class Classifier(L.LightningModule):
    def __init__(self, model: nn.Module, groups: Groups, settings: TrainSettings, num_classes: int, *,
                 label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None, channels_last: bool = False):
        super().__init__()
        self.model = model
        self.groups = groups
        self.settings = settings
        self.label_smoothing = label_smoothing
        self.register_buffer("class_weights", class_weights if class_weights is not None else torch.ones(0), persistent=False)
        self.channels_last = channels_last
        # Frozen-statistics norm layers stay in eval mode whatever Lightning toggles.
        self.frozen_norms = norm_layers(model, groups.frozen_modules) if settings.freeze_bn_stats else []
        k = min(5, num_classes)
        # ModuleDict keys may not shadow nn.Module attributes (`train`): keyed "<split>_".
        self.acc = nn.ModuleDict({f"{s}_": MulticlassAccuracy(num_classes, average="micro") for s in ("train", "val", "test")})
        self.top5 = nn.ModuleDict({f"{s}_": MulticlassAccuracy(num_classes, top_k=k, average="micro") for s in ("val", "test")})
        self.loss_mean = nn.ModuleDict({f"{s}_": MeanMetric() for s in ("train", "val", "test")})
        self.num_classes = num_classes

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.frozen_norms:
            m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def model_step(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch[0], batch[1]
        logits = self(x)
        w = self.class_weights if self.class_weights.numel() else None
        loss = F.cross_entropy(logits.float(), y, weight=w, label_smoothing=self.label_smoothing)
        return loss, logits, y

    def _log_step(self, split: str, batch) -> torch.Tensor:
        loss, logits, y = self.model_step(batch)
        key = f"{split}_"
        self.loss_mean[key](loss.detach(), weight=y.numel())
        self.acc[key](logits.detach(), y)
        on_step = split == "train"
        self.log(f"{split}/loss", self.loss_mean[key], on_step=False, on_epoch=True, prog_bar=True, batch_size=y.numel())
        self.log(f"{split}/acc", self.acc[key], on_step=False, on_epoch=True, prog_bar=True, batch_size=y.numel())
        if key in self.top5:
            self.top5[key](logits.detach(), y)
            self.log(f"{split}/top5", self.top5[key], on_step=False, on_epoch=True, batch_size=y.numel())
        if on_step:
            self.log("train/step_loss", loss.detach(), on_step=True, on_epoch=False, batch_size=y.numel())
        return loss

    def training_step(self, batch, batch_idx):
        return self._log_step("train", batch)

    def validation_step(self, batch, batch_idx):
        self._log_step("val", batch)

    def test_step(self, batch, batch_idx):
        self._log_step("test", batch)

    def predict_step(self, batch, batch_idx):
        return torch.softmax(self(batch[0]).float(), dim=1)

    def configure_optimizers(self):
        groups = [{k: v for k, v in g.items() if k != "names"} for g in self.groups.optim]
        opt = torch.optim.AdamW(groups)
        s = self.settings
        if s.scheduler is Scheduler.plateau:
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=s.plateau_factor,
                                                               patience=s.plateau_patience)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val/loss", "interval": "epoch"}}
        warm, total = s.warmup_epochs, max(s.max_epochs, 1)

        def factor(epoch: int) -> float:
            if epoch < warm:
                return (epoch + 1) / (warm + 1)
            t = (epoch - warm) / max(total - warm, 1)
            return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
