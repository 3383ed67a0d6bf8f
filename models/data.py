"""A published dataset (folder or Hub repo) in, tensors out: the pool of CV rows, folds, test split,
preprocessing from the model's own pretrained data config, and a LightningDataModule per fold.

Never re-splits: the group-aware folds are the publish stage's. The pool for cross-validation is
`train` + `validation` (every row there has a fold); `test` is touched once, by the final fit.
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from curation.config import Balance, TrainSettings
from curation.errors import JurassiclassError
from curation.workers import die_with_parent, usable_cores, worker_context  # shared with dedup's hashing pool

LETTERBOX_FILL = 0.8  # the seed's long side / canvas side


class DatasetUnavailable(JurassiclassError, RuntimeError):
    """The published dataset cannot be found or read; the message says which and why."""


# ---------------------------------------------------------------- the published dataset


@dataclass
class Published:
    """The splits as HF datasets (images not decoded), plus what training needs to know."""

    ref: str  # the folder or repo id[@rev] it came from
    class_names: list[str]
    folds: int
    pool: "object"  # datasets.Dataset: train + validation rows, each with a fold
    test: "object"  # datasets.Dataset
    final_train: np.ndarray  # pool indices of the `train` split
    final_val: np.ndarray  # pool indices of the `validation` split
    version: int | None = None
    hash: str | None = None

    @property
    def pool_labels(self) -> np.ndarray:
        return np.asarray(self.pool["label"], dtype=np.int64)

    @property
    def pool_folds(self) -> np.ndarray:
        return np.asarray(self.pool["fold"], dtype=np.int64)

    @property
    def pool_groups(self) -> np.ndarray:
        return np.asarray(self.pool["group"], dtype=object)


def latest_published(root: Path) -> Path | None:
    """WORKDIR/published/v<N> with the highest N, or None."""
    base = Path(root) / "published"
    versions = [(int(p.name[1:]), p) for p in base.glob("v*") if p.is_dir() and p.name[1:].isdigit()] if base.exists() else []
    return max(versions)[1] if versions else None


def _cache_dir(folder: Path) -> Path:
    """A datasets cache directory keyed by the folder's files (absolute path, size, mtime).

    `load_dataset(folder)` keys its Arrow cache by the folder *name* and relative file patterns:
    two workspaces' `published/v1` would share (and silently swap) their cached tables.
    """
    import hashlib

    import datasets

    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return Path(datasets.config.HF_DATASETS_CACHE) / "jurassiclass" / h.hexdigest()[:24]


def _hub_meta(repo: str, rev: str | None) -> dict:
    """publish.json of a Hub dataset revision, or {} (a dataset published by other means has none)."""
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(repo, "publish.json", repo_type="dataset", revision=rev)).read_text())
    except Exception:
        return {}


def load_published(ref: str | Path) -> Published:
    """Open a published folder (`WORKDIR/published/vN`) or a Hub dataset `ORG/NAME[@REV]`."""
    import datasets

    datasets.disable_progress_bars()
    meta: dict = {}
    path = Path(ref).expanduser()
    try:
        if path.is_dir():
            dd = datasets.load_dataset(str(path), cache_dir=str(_cache_dir(path)))
            if (path / "publish.json").is_file():
                meta = json.loads((path / "publish.json").read_text())
        else:
            if str(ref).startswith((".", "/", "~")) or str(ref).count("/") != 1:
                raise DatasetUnavailable(f"no published dataset folder at {ref}")
            repo, _, rev = str(ref).partition("@")
            dd = datasets.load_dataset(repo, revision=rev or None)
            meta = _hub_meta(repo, rev or None)
    except DatasetUnavailable:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DatasetUnavailable(f"cannot load the published dataset {ref}: {first}") from exc
    missing = [s for s in ("train", "validation", "test") if s not in dd]
    if missing:
        raise DatasetUnavailable(f"published dataset {ref} lacks split(s) {missing}")
    feats = dd["train"].features
    for col in ("image", "label", "fold", "group"):
        if col not in feats:
            raise DatasetUnavailable(f"published dataset {ref} lacks the {col!r} column")
    names = list(feats["label"].names)
    if meta.get("class_names") and list(meta["class_names"]) != names:
        raise DatasetUnavailable(f"{ref}: publish.json class_names differ from the label feature's names")
    keep = ["image", "label", "fold", "group", "image_id"]
    # Bytes stay bytes: decoding happens in the loader workers, with JPEG draft mode.
    parts = {s: dd[s].select_columns([c for c in keep if c in dd[s].column_names])
             .cast_column("image", datasets.Image(decode=False)) for s in ("train", "validation", "test")}
    pool = datasets.concatenate_datasets([parts["train"], parts["validation"]])
    n_train = len(parts["train"])
    folds_col = np.asarray(pool["fold"])
    if len(folds_col) and folds_col.min() < 0:
        raise DatasetUnavailable(f"{ref}: train/validation rows without a fold (fold < 0)")
    k = int(meta.get("folds") or (folds_col.max() + 1 if len(folds_col) else 0))
    return Published(
        ref=str(ref), class_names=names, folds=k, pool=pool, test=parts["test"],
        final_train=np.arange(n_train), final_val=np.arange(n_train, len(pool)),
        version=meta.get("version"), hash=meta.get("hash"),
    )


# ---------------------------------------------------------------- preprocessing


def data_config(model: torch.nn.Module, settings: TrainSettings) -> dict:
    """The model's own pretrained data config (mean, std, interpolation, crop_pct), at
    ``settings.image_size`` when given: one resize from the source image to the input, never two."""
    from timm.data import resolve_model_data_config

    args = {"input_size": (3, settings.image_size, settings.image_size)} if settings.image_size else None
    cfg = dict(resolve_model_data_config(model, args=args))
    cfg["letterbox"] = settings.letterbox
    return cfg


class Letterbox:
    """Scale the long side to ``fill`` x size (one resample), centre, pad black to size x size, never crop.

    With ``scale=(lo, hi)`` (training) the fill is drawn from [lo, hi] x ``fill`` and the position
    is random: the letterbox analogue of RandomResizedCrop.
    """

    def __init__(self, size: int, fill: float = LETTERBOX_FILL, scale: tuple[float, float] | None = None,
                 interpolation: str = "bicubic"):
        self.size, self.fill, self.scale = size, fill, scale
        self.resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}.get(
            interpolation, Image.BICUBIC)

    def __call__(self, im: Image.Image) -> Image.Image:
        fill = self.fill
        if self.scale is not None:
            fill *= math.sqrt(random.uniform(*self.scale))
        w, h = im.size
        r = fill * self.size / max(w, h)
        nw, nh = max(1, round(w * r)), max(1, round(h * r))
        canvas = Image.new("RGB", (self.size, self.size))
        if self.scale is None:
            x, y = (self.size - nw) // 2, (self.size - nh) // 2
        else:
            x, y = random.randint(0, self.size - nw), random.randint(0, self.size - nh)
        canvas.paste(im.resize((nw, nh), self.resample), (x, y))
        return canvas

    def __repr__(self) -> str:
        return f"Letterbox(size={self.size}, fill={self.fill}, scale={self.scale})"


def eval_transform(cfg: dict):
    """Evaluation preprocessing: timm's own (resize + centre crop) or the letterbox, then normalise."""
    from timm.data import create_transform
    from torchvision import transforms as T

    size = cfg["input_size"][-1]
    if cfg.get("letterbox"):
        return T.Compose([Letterbox(size, interpolation=cfg["interpolation"]), T.ToTensor(),
                          T.Normalize(cfg["mean"], cfg["std"])])
    return create_transform(input_size=cfg["input_size"], interpolation=cfg["interpolation"], mean=cfg["mean"],
                            std=cfg["std"], crop_pct=cfg["crop_pct"], crop_mode=cfg.get("crop_mode"))


def train_transform(cfg: dict, settings: TrainSettings):
    """Training preprocessing: timm's RandomResizedCrop/flip + auto-augment/colour jitter + erasing;
    with letterbox or without RandomResizedCrop the geometry is the eval one (still one resample)."""
    from timm.data import create_transform
    from torchvision import transforms as T

    a = settings.augment
    size = cfg["input_size"][-1]
    primary, secondary, final = create_transform(
        input_size=cfg["input_size"], is_training=True, scale=a.scale, hflip=a.hflip,
        color_jitter=a.color_jitter or None, auto_augment=a.auto_augment, interpolation=cfg["interpolation"],
        mean=cfg["mean"], std=cfg["std"], re_prob=a.random_erasing, separate=True,
    )
    steps = list(primary.transforms)
    if cfg.get("letterbox") or not a.random_resized_crop:
        flips = [t for t in steps if "Flip" in type(t).__name__]
        if cfg.get("letterbox"):
            geo = Letterbox(size, scale=a.scale if a.random_resized_crop else None, interpolation=cfg["interpolation"])
            steps = [geo, *flips]
        else:
            steps = [*eval_transform({**cfg, "letterbox": False}).transforms[:-2], *flips]
    if a.rotation:
        steps.append(T.RandomRotation(a.rotation))
    return T.Compose([*steps, *secondary.transforms, *final.transforms])


def decode(data: bytes, size: int | None = None) -> Image.Image:
    """Image bytes to RGB; JPEGs decode at the smallest DCT scale still >= 2x the input size."""
    im = Image.open(io.BytesIO(data))
    if size and im.format == "JPEG":
        im.draft("RGB", (2 * size, 2 * size))
    from PIL import ImageOps

    im = ImageOps.exif_transpose(im)
    return im.convert("RGB")


class Rows(Dataset):
    """Rows of a published split (image bytes, label) through a transform; yields (x, y, row)."""

    def __init__(self, table, indices: np.ndarray, transform, size: int | None = None):
        self.table, self.indices, self.transform, self.size = table, np.asarray(indices, dtype=np.int64), transform, size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        row = self.table[int(self.indices[i])]
        img = row["image"]
        im = decode(img["bytes"] if img.get("bytes") is not None else Path(img["path"]).read_bytes(), self.size)
        return self.transform(im), int(row["label"]), int(self.indices[i])


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, mean 1 over present classes (absent classes: 0)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max((counts > 0).sum(), 1), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def default_workers(accelerator_is_cuda: bool) -> int:
    cores = usable_cores()
    # On CPU the model step wants the cores: one decoder process overlaps decoding with compute.
    return min(8, cores) if accelerator_is_cuda else min(1, cores - 1)


class FoldData(L.LightningDataModule):
    """Train / val / test (held-out) rows of one fold of the pool (or the final split), as loaders."""

    def __init__(self, table, *, train: np.ndarray, val: np.ndarray, test: np.ndarray | None = None,
                 test_table=None, cfg: dict, settings: TrainSettings, num_classes: int, cuda: bool = False, seed: int = 0):
        super().__init__()
        self.table, self.test_table = table, test_table if test_table is not None else table
        self.idx = {"train": np.asarray(train), "val": np.asarray(val),
                    "test": np.asarray(test) if test is not None else np.zeros(0, dtype=np.int64)}
        self.cfg, self.settings, self.num_classes, self.seed = cfg, settings, num_classes, seed
        self.cuda = cuda
        self.workers = settings.workers if settings.workers is not None else default_workers(cuda)
        self.mp_context = worker_context(self.workers)
        size = cfg["input_size"][-1]
        self.train_tf, self.eval_tf, self.size = train_transform(cfg, settings), eval_transform(cfg), size
        labels = np.asarray(table["label"], dtype=np.int64)
        self.train_labels = labels[self.idx["train"]]

    def loss_weights(self) -> torch.Tensor | None:
        if self.settings.balance is Balance.class_weights:
            return class_weights(self.train_labels, self.num_classes)
        return None

    def _loader(self, ds: Dataset, *, shuffle: bool = False, sampler=None, drop_last: bool = False) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            ds, batch_size=self.settings.batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
            num_workers=self.workers, pin_memory=self.cuda, persistent_workers=self.workers > 0,
            prefetch_factor=4 if self.workers > 0 else None, generator=g, drop_last=drop_last,
            multiprocessing_context=self.mp_context, worker_init_fn=die_with_parent if self.workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        ds = Rows(self.table, self.idx["train"], self.train_tf, self.size)
        sampler = None
        if self.settings.balance is Balance.sampler:
            w = class_weights(self.train_labels, self.num_classes).numpy()[self.train_labels]
            sampler = WeightedRandomSampler(torch.as_tensor(w, dtype=torch.double), len(w), replacement=True,
                                            generator=torch.Generator().manual_seed(self.seed))
        # A last training batch of one image breaks BatchNorm (and is noise): shuffled rows, so
        # each epoch leaves out different ones.
        return self._loader(ds, shuffle=True, sampler=sampler, drop_last=len(ds) > self.settings.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(Rows(self.table, self.idx["val"], self.eval_tf, self.size))

    def test_dataloader(self) -> DataLoader:
        return self._loader(Rows(self.test_table, self.idx["test"], self.eval_tf, self.size))

    def eval_loader(self, table, indices: np.ndarray) -> DataLoader:
        return DataLoader(Rows(table, indices, self.eval_tf, self.size), batch_size=self.settings.batch_size,
                          num_workers=0 if len(indices) < 256 else self.workers, pin_memory=self.cuda,
                          multiprocessing_context=self.mp_context if len(indices) >= 256 else None,
                          worker_init_fn=die_with_parent if len(indices) >= 256 and self.workers > 0 else None)
