"""Training throughput: the model-only step rate (synthetic tensors already on the device) vs this
stage's rate reading a published dataset (parquet bytes -> decode -> augment -> loader -> step),
through the same Lightning module, optimizer groups and Trainer. Goal: ratio >= 0.90.

    python benchmarks/bench_train.py                      # small model, CPU-friendly (~2-3 min)
    python benchmarks/bench_train.py --real               # resnet34 @ 224, batch 64 (the seed's setting)
    python benchmarks/bench_train.py --model tf_efficientnetv2_s --image-size 224 --batch-size 64
    python benchmarks/bench_train.py --dataset WORKDIR/published/v3   # a real published folder

On CUDA the stage uses AMP (bf16, else fp16) and channels_last, exactly as `jurassiclass train`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from curation.config import ModelSpec, TrainMode, TrainSettings  # noqa: E402
from models.data import FoldData, data_config, load_published  # noqa: E402
from models.fit import build, precision, use_cuda  # noqa: E402


class Timer(L.Callback):
    """Images per second over the steps after ``warmup`` (first steps pay for allocation, workers start)."""

    def __init__(self, warmup: int):
        self.warmup, self.t0, self.images, self.steps = warmup, None, 0, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.images += len(batch[1])
            self.steps += 1

    def rate(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return self.images / (time.perf_counter() - self.t0)


class Synthetic(Dataset):
    """The same tensor every time: what a model-only benchmark feeds (no decode, no augmentation)."""

    def __init__(self, n: int, size: int, classes: int):
        self.x, self.n, self.classes = torch.randn(3, size, size), n, classes

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.x, i % self.classes, i


def synthetic_published(root: Path, n: int, classes: int, size: tuple[int, int]) -> Path:
    """A published folder of ``n`` JPEGs (photo-like sizes) in the publish layout."""
    import io

    import datasets
    from PIL import Image

    out = root / "published" / "v1"
    (out / "data").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"c{i}" for i in range(classes)]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names),
                               "image_id": datasets.Value("string"), "fold": datasets.Value("int32"),
                               "group": datasets.Value("string")})
    rows = {"train": [], "validation": [], "test": []}
    low = rng.integers(0, 256, size=(n, 12, 16, 3), dtype=np.uint8)
    for i in range(n):
        im = Image.fromarray(low[i]).resize(size, Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        split = "test" if i % 10 == 9 else "validation" if i % 10 == 8 else "train"
        rows[split].append({"image": {"bytes": buf.getvalue(), "path": None}, "label": i % classes,
                            "image_id": str(i), "fold": -1 if split == "test" else i % 5, "group": str(i)})
    for split, r in rows.items():
        datasets.Dataset.from_list(r, features=feats).to_parquet(str(out / "data" / f"{split}-00000-of-00001.parquet"))
    (out / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n"
                                   + "".join(f"  - split: {s}\n    path: data/{s}-*.parquet\n" for s in rows) + "---\n")
    return out


def measure(module, loader, settings: TrainSettings, steps: int, warmup: int, cuda: bool) -> float:
    timer = Timer(warmup)
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision=precision(settings, cuda),
                        max_epochs=1, limit_train_batches=steps + warmup, limit_val_batches=0, logger=False,
                        callbacks=[timer], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=loader)
    return timer.rate()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--mode", default="finetune", choices=[m.value for m in TrainMode])
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--images", type=int, default=600, help="synthetic published images (without --dataset)")
    ap.add_argument("--source-size", default="400x300", help="synthetic JPEG size WxH")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the stage's default)")
    ap.add_argument("--repeat", type=int, default=2, help="alternating measurements; the best of each is reported")
    ap.add_argument("--dataset", default=None, help="a published folder instead of synthetic data")
    ap.add_argument("--real", action="store_true", help="resnet34 @ 224, batch 64")
    a = ap.parse_args()
    if a.real:
        a.model, a.image_size, a.batch_size = "resnet34", 224, 64
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        w, h = map(int, a.source_size.split("x"))
        folder = Path(a.dataset) if a.dataset else synthetic_published(Path(tmp), a.images, 8, (w, h))
        pub = load_published(folder)
        n = len(pub.class_names)
        # Cosine: the plateau schedule needs val/loss, and there is no validation here.
        settings = TrainSettings(models=[], image_size=a.image_size, batch_size=a.batch_size, workers=a.workers,
                                 scheduler="cosine")
        spec = ModelSpec(name="bench", arch=a.model, mode=a.mode, pretrained=False)
        cuda = use_cuda(settings)
        need = (a.steps + a.warmup) * a.batch_size
        train = np.resize(pub.final_train, need)  # repeat rows when the dataset is small

        rates: dict[str, list[float]] = {"model": [], "stage": []}
        for _ in range(a.repeat):  # alternating, best of each: machine noise hits both alike
            module = build(spec, spec.hyper, settings, n, cuda=cuda)
            synth = DataLoader(Synthetic(need, a.image_size, n), batch_size=a.batch_size, pin_memory=cuda)
            rates["model"].append(measure(module, synth, settings, a.steps, a.warmup, cuda))

            module = build(spec, spec.hyper, settings, n, cuda=cuda)
            cfg = data_config(module.model, settings)
            dm = FoldData(pub.pool, train=train, val=pub.final_val, cfg=cfg, settings=settings, num_classes=n, cuda=cuda)
            rates["stage"].append(measure(module, dm.train_dataloader(), settings, a.steps, a.warmup, cuda))
        model_only, stage = max(rates["model"]), max(rates["stage"])

    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device}; model {a.model} ({a.mode}), {a.image_size}px, batch {a.batch_size}, "
          f"precision {precision(settings, cuda)}, channels_last {cuda}, loader workers {dm.workers}")
    print(f"data: {folder if a.dataset else f'{a.images} synthetic {a.source_size} JPEGs'}; "
          f"{a.steps} timed steps after {a.warmup} warm-up")
    fmt = lambda v: ", ".join(f"{x:.1f}" for x in v)  # noqa: E731
    print(f"model-only (synthetic tensors): {model_only:8.1f} img/s  (runs: {fmt(rates['model'])})")
    print(f"stage (published dataset):      {stage:8.1f} img/s  (runs: {fmt(rates['stage'])})")
    print(f"ratio stage / model-only:       {stage / model_only:8.3f}  (goal >= 0.90)")


if __name__ == "__main__":
    main()
