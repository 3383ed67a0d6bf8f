"""Catalog candidates in, CLIP scores and a decision per image out (kept, off_topic, unrealistic, likely_<class>).

Per image (columns of the catalog):
    clip_score        cosine similarity to the image's own class ensemble (templates x names, averaged)
    clip_margin       softmax margin, own class ensemble vs the best "not the subject" prompt (-1..1)
    clip_real_margin  softmax margin, best "realistic" vs best "non-realistic" prompt of the class (-1..1)
    clip_top_label / clip_top_prob / clip_own_prob   zero-shot softmax over every class's ensemble
    clip_model        which weights produced the scores
    clip_decision     kept | off_topic | unrealistic | likely_<class> | error | skipped

Decisions: off_topic and unrealistic set status=rejected with that reason; likely_<class> leaves the
image a candidate (reason null) so review sees a suspected wrong label instead of losing it; error
(the stored file cannot be decoded) rejects with reason `unreadable`. Images rejected earlier by this
stage are decided again on every run, so thresholds can change without re-encoding; accepted
images, images with a human `review_decision`, and images rejected by other stages are never touched.
Percentile thresholds are computed once per class over a stable population and kept in
stages/score/percentile_cuts.json (see percentile_cuts), so re-running never rejects a new slice.

Image embeddings are cached per (image_id, model, device class, precision) under
stages/score/embeddings/, so a re-run encodes only new images and costs only the text side.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import polars as pl

from curation import catalog
from curation.catalog import Status, Workspace
from curation.config import ClipPrecision, ClipSettings, ClipThresholds, Manifest, Threshold, ThresholdMode
from curation.errors import JurassiclassError
from curation import hub
from curation.images import open_rgb
from curation.store import PartsTable, atomic_write_bytes
from curation.workers import usable_cores

STAGE = "score"
CLIP_COLUMNS: dict[str, pl.DataType] = {
    "clip_score": pl.Float64,
    "clip_margin": pl.Float64,
    "clip_real_margin": pl.Float64,
    "clip_top_label": pl.Utf8,
    "clip_top_prob": pl.Float64,
    "clip_own_prob": pl.Float64,
    "clip_model": pl.Utf8,
    "clip_decision": pl.Utf8,
}
SCORE_COLUMNS = ["clip_score", "clip_margin", "clip_real_margin", "clip_top_label", "clip_top_prob", "clip_own_prob"]
# Reasons this stage gives; rows rejected for them are re-decided on every run.
REJECT_REASONS = ("off_topic", "unrealistic")
KEPT, SKIPPED, ERROR = "kept", "skipped", "error"
LIKELY_PREFIX = "likely_"
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


class ClipSetupError(JurassiclassError, RuntimeError):
    """The CLIP settings cannot work (unknown model or tag, bad checkpoint): always an error."""


class WeightsUnavailable(ClipSetupError):
    """The weights exist in principle but cannot be obtained here (offline, no cache, missing file)."""


@dataclass
class ScoreSummary:
    model: str
    device: str = ""
    eligible: int = 0  # images this run decided (candidates plus earlier CLIP rejections)
    encoded: int = 0  # images run through the image tower this time
    cached: int = 0  # embeddings reused from the cache
    failed: int = 0  # stored files that could not be decoded
    unknown_label: int = 0  # candidates whose label is not a manifest class (left untouched)
    skipped: bool = False
    skip_reason: str | None = None
    decisions: dict[str, int] = field(default_factory=dict)
    encode_seconds: float = 0.0
    report_dir: Path | None = None

    def line(self) -> str:
        """One-line summary for the CLI."""
        if self.skipped:
            return f"score: skipped, {self.decisions.get(SKIPPED, 0)} images marked skipped ({self.skip_reason})"
        rate = f", {self.encoded / self.encode_seconds:.1f} img/s" if self.encoded and self.encode_seconds else ""
        dec = ", ".join(f"{k} {v}" for k, v in sorted(self.decisions.items())) or "nothing to score"
        return (
            f"score: {self.eligible} images with {self.model} on {self.device}: {self.encoded} encoded{rate}, "
            f"{self.cached} from cache; {dec}"
        )


# ---------------------------------------------------------------- model


@dataclass
class ClipModel:
    """An open_clip model ready for inference, with what the stage needs to know about it."""

    model: Any
    preprocess: Callable
    tokenizer: Callable
    device: Any  # torch.device
    model_id: str  # recorded in the catalog: "ARCH/TAG" or "ARCH/file:NAME"
    cache_key: str  # folder name of this model's embedding cache
    image_size: tuple[int, int]
    autocast_dtype: Any = None  # torch dtype under autocast, None for plain fp32
    logit_scale: float = 100.0

    @classmethod
    def wrap(
        cls, model, preprocess, tokenizer, *, model_id: str, identity: str, device: Any, precision: ClipPrecision
    ) -> "ClipModel":
        """Prepare a created open_clip model (eval, device, precision); ``identity`` keys the cache."""
        import torch

        device = torch.device(device)
        model = model.to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        # open_clip records the input size in preprocess_cfg for every tower type (timm ones too).
        size = getattr(model.visual, "preprocess_cfg", {}).get("size") or getattr(model.visual, "image_size", 224)
        size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        scale = float(model.logit_scale.exp().item()) if hasattr(model, "logit_scale") else 100.0
        dtype = _autocast_dtype(precision, device)
        key = embedding_cache_key(model_id, identity, device.type, dtype)
        return cls(model, preprocess, tokenizer, device, model_id, key, size, dtype, min(scale, 100.0))


def embedding_cache_key(model_id: str, identity: str, device_type: str, autocast_dtype: Any) -> str:
    """Folder name of a model's embedding cache: the weights, the device class and the precision.

    bf16 (8-bit mantissa) on a GPU and fp32 on a CPU give different embeddings for the same image:
    mixed in one cache, an image's score would depend on which machine happened to encode it first.
    """
    precision = "fp32" if autocast_dtype is None else str(autocast_dtype).replace("torch.", "")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("_")[:80]
    digest = hashlib.sha1(f"{identity}|{device_type}|{precision}".encode()).hexdigest()[:10]
    return f"{slug}-{device_type}-{precision}-{digest}"


def resolve_device(setting: str) -> str:
    import torch

    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _autocast_dtype(precision: ClipPrecision, device) -> Any:
    import torch

    if precision is ClipPrecision.fp32:
        return None
    if precision is ClipPrecision.fp16:
        return torch.float16
    if precision is ClipPrecision.bf16:
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None  # CPU: fp32 keeps scores comparable across machines


def _first_line(exc: BaseException) -> str:
    # The whole first line: a message cut mid-word hides the part that says what to do.
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0].rstrip('.')}" if text else type(exc).__name__


def _unavailable(what: str, exc: BaseException | None, unreachable: str | None = None) -> WeightsUnavailable:
    if unreachable:
        why = f"they are not in the local Hugging Face cache and {unreachable}"
    elif hub.offline_mode():
        why = "they are not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading"
    else:
        why = f"downloading them failed ({_first_line(exc) if exc else 'unknown error'})"
    return WeightsUnavailable(
        f"CLIP weights {what} cannot be loaded: {why}; provide them by filling the Hugging Face cache "
        "(run once with network, or copy a cache into HF_HOME), by pointing clip.pretrained at a local "
        "checkpoint file, or by setting HF_HUB_OFFLINE=0 with network access "
        "(clip.skip_if_unavailable: true continues without scores, marking images skipped)"
    )


def _register_configs(path: Path) -> None:
    import open_clip

    if not path.exists():
        raise ClipSetupError(f"clip.model_config_path {path} does not exist")
    open_clip.add_model_config(path)


def _local_dir_weights(path: Path) -> Path | None:
    try:
        from open_clip.factory import _find_checkpoint_in_dir

        found = _find_checkpoint_in_dir(path)
        return Path(found) if found else None
    except ImportError:  # private helper gone in a later open_clip: fall back to any weights file
        return next((p for p in sorted(path.iterdir()) if p.suffix in _WEIGHT_SUFFIXES), None)


def _file_identity(p: Path) -> str:
    # Path, size and mtime: a replaced checkpoint gets a fresh embedding cache without hashing GBs.
    st = p.stat()
    return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"


class _DropOpenClipRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return f"{os.sep}open_clip{os.sep}" not in record.pathname


def load_model(settings: ClipSettings, *, device: str | None = None) -> ClipModel:
    """Create the manifest's open_clip model with real weights, never random ones.

    Raises WeightsUnavailable (weights cannot be obtained here) or ClipSetupError (settings wrong).
    """
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    if settings.model_config_path is not None:
        _register_configs(Path(settings.model_config_path))
    dev = resolve_device(device or settings.device)
    name = settings.model
    pretrained = settings.pretrained
    is_tag = False
    tag_cfg: dict = {}
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):])
        if not folder.is_dir() or not (folder / "open_clip_config.json").is_file():
            raise WeightsUnavailable(
                f"CLIP model folder {folder} has no open_clip_config.json: put the config and weights there "
                "(clip.skip_if_unavailable: true continues without scores)"
            )
        weights = _local_dir_weights(folder)
        if weights is None:
            raise WeightsUnavailable(
                f"CLIP model folder {folder} holds a config but no weights file "
                "(open_clip_model.safetensors or open_clip_pytorch_model.bin): copy the weights there"
            )
        pretrained, model_id, identity = None, name, f"{name}|{_file_identity(weights)}"
        what = f"from {folder}"
    elif name.startswith("hf-hub:"):
        pretrained, model_id, identity, what = None, name, name, f"{name}"
    else:
        if open_clip.get_model_config(name) is None:
            raise ClipSetupError(
                f"unknown open_clip model {name!r}: use an architecture from open_clip.list_models() "
                "(e.g. ViT-B-32), hf-hub:ORG/REPO, local-dir:PATH, or register a config with clip.model_config_path"
            )
        if not pretrained:
            raise ClipSetupError(
                f"clip.pretrained is empty for {name}: random weights would give meaningless scores; "
                "name an open_clip tag (e.g. laion2b_s34b_b79k) or a local checkpoint file"
            )
        tag_cfg = get_pretrained_cfg(name, pretrained)
        if tag_cfg:
            is_tag = True
            src = tag_cfg.get("hf_hub") or tag_cfg.get("url") or "?"
            model_id, identity, what = f"{name}/{pretrained}", f"{name}|{pretrained}", f"{name} '{pretrained}' ({src.rstrip('/')})"
        else:
            p = Path(pretrained).expanduser()
            if not p.is_file():
                if os.sep in pretrained or p.suffix in _WEIGHT_SUFFIXES:
                    raise WeightsUnavailable(
                        f"CLIP weights file {p} for {name} was not found: copy the checkpoint there or point "
                        "clip.pretrained at it (clip.skip_if_unavailable: true continues without scores)"
                    )
                tags = ", ".join(list_pretrained_tags_by_model(name)) or "none"
                raise ClipSetupError(
                    f"{pretrained!r} is neither an open_clip tag for {name} (known: {tags}) nor an existing checkpoint file"
                )
            p = p.resolve()
            pretrained = str(p)
            model_id = f"{name}/file:{p.name}"
            identity = f"{name}|{_file_identity(p)}"
            what = f"{name} from {p}"
    # open_clip logs its failures on the root logger; our exception already says it in one sentence.
    quiet = _DropOpenClipRecords()
    logging.getLogger().addFilter(quiet)
    # Only hub-hosted weights need the probe; a local file never touches the network.
    remote = (is_tag and bool(tag_cfg.get("hf_hub"))) or name.startswith("hf-hub:")
    unreachable = None
    try:
        with hub.fail_fast() if remote else contextlib.nullcontext() as unreachable:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device="cpu")
            tokenizer = open_clip.get_tokenizer(name)
    except Exception as exc:  # noqa: BLE001 - classified below into one clear sentence
        if is_tag or name.startswith("hf-hub:"):
            raise _unavailable(what, exc, unreachable) from exc
        raise ClipSetupError(f"could not load CLIP model {what}: {_first_line(exc)}") from exc
    finally:
        logging.getLogger().removeFilter(quiet)
    return ClipModel.wrap(
        model, preprocess, tokenizer, model_id=model_id, identity=identity, device=dev, precision=settings.precision
    )


# ---------------------------------------------------------------- encoding


def split_preprocess(preprocess: Callable) -> tuple[Callable, tuple[tuple[float, ...], tuple[float, ...]] | None]:
    """(PIL steps, (mean, std)) when the model's transform ends in ToTensor + Normalize, else (preprocess, None).

    The PIL steps (resize, crop, mode) run in the decode workers and yield uint8; the last two steps
    (/255, then (x - mean) / std: the same float32 arithmetic) run once per batch on the device.
    Four times less shared memory and host-to-device traffic, and no per-image tensor ops.
    """
    from torchvision import transforms as T

    steps = list(getattr(preprocess, "transforms", []))
    if len(steps) >= 2 and isinstance(steps[-1], T.Normalize) and isinstance(steps[-2], T.ToTensor):
        norm = steps[-1]
        return T.Compose(steps[:-2]), (tuple(map(float, norm.mean)), tuple(map(float, norm.std)))
    return preprocess, None


class _ImageFiles:
    """Decode (JPEG draft-scaled to the model's input size) + the model's own preprocessing, per item."""

    def __init__(self, paths: Sequence[str], preprocess: Callable, size: tuple[int, int], *, as_uint8: bool):
        self.paths = list(paths)
        self.preprocess = preprocess
        self.as_uint8 = as_uint8
        # draft() keeps both sides >= the request, so the model's resize still only ever shrinks.
        self.draft = (max(size), max(size))
        self.shape = (3, size[0], size[1])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import torch

        try:
            out = self.preprocess(open_rgb(self.paths[i], draft=self.draft))
            if self.as_uint8:
                arr = np.asarray(out.convert("RGB") if out.mode != "RGB" else out, dtype=np.uint8)
                out = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
            return out, i, ""
        except Exception as exc:  # noqa: BLE001 - a bad file is data, not a crash
            return torch.zeros(self.shape, dtype=torch.uint8 if self.as_uint8 else torch.float32), i, _first_line(exc)


def default_workers(device_type: str) -> int:
    cores = usable_cores()
    if device_type == "cuda":
        # Decoding is the bottleneck in front of a GPU: every core but the feeding one decodes.
        return max(1, min(32, cores - 1))
    # CPU: the model needs the cores; one decode process overlaps decoding with compute
    # (benchmarks/bench_score.py measures the trade-off).
    return 1 if cores <= 4 else min(4, cores // 4)


def encode_images(
    clip: ClipModel,
    paths: Sequence[str],
    *,
    batch_size: int | None = None,
    workers: int | None = None,
    threads: int | None = None,
    show_progress: bool = False,
    on_batch: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Encode image files: (N, D) float32 L2-normalised embeddings and one error string per file ('' = ok).

    Rows of undecodable files are zeros. ``on_batch(indices, embeddings)`` receives results as they
    arrive (used to persist the cache incrementally).
    """
    import torch
    from torch.utils.data import DataLoader

    from curation.progress import track

    n = len(paths)
    dev = clip.device
    on_cuda = dev.type == "cuda"
    batch_size = batch_size or (256 if on_cuda else 32)
    workers = default_workers(dev.type) if workers is None else workers
    errors = [""] * n
    out: np.ndarray | None = None
    if n == 0:
        return np.zeros((0, 0), np.float32), errors
    pil_steps, norm = split_preprocess(clip.preprocess)
    if norm is not None:
        mean = torch.tensor(norm[0], dtype=torch.float32, device=dev).view(1, -1, 1, 1)
        std = torch.tensor(norm[1], dtype=torch.float32, device=dev).view(1, -1, 1, 1)
    loader = DataLoader(
        _ImageFiles(paths, pil_steps, clip.image_size, as_uint8=norm is not None),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=on_cuda,
        # Two batches in flight per worker: with 256-image batches that is already ~150 MB of shared memory each.
        prefetch_factor=2 if workers else None,
        persistent_workers=False,
    )
    prev_threads = torch.get_num_threads()
    if not on_cuda:
        torch.set_num_threads(threads or usable_cores())
    pending: list[tuple[Any, Any]] = []

    def drain() -> None:
        # GPU results are copied back in groups, so the device is not synchronised every batch.
        nonlocal out
        for idx, feats in pending:
            f = feats.float().cpu().numpy()
            if out is None:
                out = np.zeros((n, f.shape[1]), np.float32)
            out[idx] = f
            if on_batch is not None:
                ok = np.array([errors[i] == "" for i in idx], bool)
                on_batch(idx[ok], f[ok])
        pending.clear()

    batches = track(loader, total=len(loader), description=f"score: encode {n} images ({batch_size}/batch)", show=show_progress)
    try:
        with torch.inference_mode():
            for x, idx, errs in batches:
                idx = idx.numpy()
                for i, e in zip(idx, errs):
                    errors[i] = e
                x = x.to(dev, non_blocking=on_cuda)
                if norm is not None:
                    x = x.float().div_(255).sub_(mean).div_(std)
                with torch.autocast(dev.type, dtype=clip.autocast_dtype, enabled=clip.autocast_dtype is not None):
                    feats = clip.model.encode_image(x)
                feats = torch.nn.functional.normalize(feats.float(), dim=-1)
                pending.append((idx, feats))
                if not on_cuda or len(pending) * batch_size >= 4096:
                    drain()
            drain()
    finally:
        if not on_cuda:
            torch.set_num_threads(prev_threads)
    assert out is not None
    return out, errors


def encode_texts(clip: ClipModel, texts: Sequence[str], *, batch_size: int = 256) -> np.ndarray:
    """(len(texts), D) float32 L2-normalised text embeddings."""
    import torch

    chunks = []
    with torch.inference_mode():
        for s in range(0, len(texts), batch_size):
            tokens = clip.tokenizer(list(texts[s : s + batch_size])).to(clip.device)
            with torch.autocast(clip.device.type, dtype=clip.autocast_dtype, enabled=clip.autocast_dtype is not None):
                f = clip.model.encode_text(tokens)
            chunks.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy())
    return np.concatenate(chunks).astype(np.float32)


# ---------------------------------------------------------------- prompts and scores


def _fill(template: str, name: str) -> str:
    # str.format would choke on other braces in a user's template.
    return template.replace("{}", name)


def class_prompts(manifest: Manifest, label: str) -> list[str]:
    """The prompts averaged into one embedding for a class: templates x (name + synonyms) + extras."""
    spec = next(c for c in manifest.classes if c.name == label)
    names = list(dict.fromkeys([spec.name, *spec.synonyms]))
    prompts = [_fill(t, n) for t in manifest.clip.templates for n in names]
    prompts += manifest.clip.class_prompts.get(label, [])
    return list(dict.fromkeys(prompts))


@dataclass
class TextBank:
    """Every text embedding the scores need, for the manifest's classes in order."""

    labels: list[str]
    classes: np.ndarray  # (C, D) ensembles, renormalised
    negatives: np.ndarray  # (K, D)
    realistic: np.ndarray  # (C, P, D)
    unrealistic: np.ndarray  # (C, Q, D)


def build_text_bank(clip: ClipModel, manifest: Manifest) -> TextBank:
    s = manifest.clip
    labels = manifest.class_names
    per_class = [class_prompts(manifest, c) for c in labels]
    real = [[_fill(t, c) for t in s.realistic_prompts] for c in labels]
    unreal = [[_fill(t, c) for t in s.unrealistic_prompts] for c in labels]
    texts = list(dict.fromkeys([*sum(per_class, []), *s.negative_prompts, *sum(real, []), *sum(unreal, [])]))
    emb = encode_texts(clip, texts)
    row = {t: i for i, t in enumerate(texts)}

    def rows(ts: list[str]) -> np.ndarray:
        return emb[[row[t] for t in ts]]

    ens = np.stack([rows(ts).mean(0) for ts in per_class])
    ens /= np.linalg.norm(ens, axis=1, keepdims=True).clip(1e-12)
    return TextBank(
        labels=labels,
        classes=ens.astype(np.float32),
        negatives=rows(list(s.negative_prompts)),
        realistic=np.stack([rows(ts) for ts in real]),
        unrealistic=np.stack([rows(ts) for ts in unreal]),
    )


def _softmax_margin(pos: np.ndarray, neg: np.ndarray, scale: float) -> np.ndarray:
    # softmax([a, b])[0] - softmax([a, b])[1] == tanh((a - b) / 2): stable for any scale.
    return np.tanh(scale * (pos - neg) / 2.0)


def compute_scores(emb: np.ndarray, label_idx: np.ndarray, bank: TextBank, logit_scale: float) -> dict[str, np.ndarray]:
    """Scores for N normalised image embeddings (N, D) whose own classes are ``label_idx`` (N,)."""
    sims = emb @ bank.classes.T  # (N, C)
    own = sims[np.arange(len(emb)), label_idx]
    neg = (emb @ bank.negatives.T).max(axis=1)
    # Seed behaviour, generalised: best positive vs best negative prompt, softmax margin.
    # Class by class, so memory stays O(N) whatever the number of prompts.
    real_pos = np.empty(len(emb), np.float32)
    real_neg = np.empty(len(emb), np.float32)
    for c in np.unique(label_idx):
        rows = label_idx == c
        real_pos[rows] = (emb[rows] @ bank.realistic[c].T).max(axis=1)
        real_neg[rows] = (emb[rows] @ bank.unrealistic[c].T).max(axis=1)
    logits = logit_scale * sims
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    top = probs.argmax(axis=1)
    return {
        "clip_score": own.astype(np.float64),
        "clip_margin": _softmax_margin(own, neg, logit_scale).astype(np.float64),
        "clip_real_margin": _softmax_margin(real_pos, real_neg, logit_scale).astype(np.float64),
        "clip_top_label": np.array(bank.labels, dtype=object)[top],
        "clip_top_prob": probs[np.arange(len(emb)), top].astype(np.float64),
        "clip_own_prob": probs[np.arange(len(emb)), label_idx].astype(np.float64),
    }


# ---------------------------------------------------------------- decisions

_CHECKS = ("min_score", "min_margin", "min_real_margin", "wrong_class_prob")
_CHECK_COLUMN = {
    "min_score": "clip_score",
    "min_margin": "clip_margin",
    "min_real_margin": "clip_real_margin",
    "wrong_class_prob": "clip_top_prob",
}


def resolve_threshold(t: Threshold | None, values: np.ndarray) -> float | None:
    """Absolute value, or the given percentile (linear interpolation) of ``values``; None = check off."""
    if t is None:
        return None
    if t.mode is ThresholdMode.absolute:
        return float(t.value)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return None
    return float(np.percentile(values, t.value))


def decide(
    scores: pl.DataFrame, settings: ClipSettings, *, cuts: dict[str, dict[str, float | None]] | None = None
) -> tuple[pl.DataFrame, dict[str, dict[str, float | None]]]:
    """Decisions for scored images; percentiles are taken within each class.

    ``cuts`` gives the absolute value of percentile thresholds per class and check (the stage passes
    the stored ones, see percentile_cuts); a percentile not in it is taken over ``scores`` itself.

    ``scores`` needs image_id, label, clip_score, clip_margin, clip_real_margin, clip_top_label,
    clip_top_prob. Returns (image_id, clip_decision) and the absolute thresholds used per class.
    Order: off_topic (score or subject margin below its minimum), then unrealistic, then
    likely_<class> (another class's probability at or above the threshold), else kept.
    A score equal to a minimum passes.
    """
    out_ids: list[str] = []
    out_dec: list[str] = []
    used: dict[str, dict[str, float | None]] = {}
    for (label,), part in scores.group_by(["label"], maintain_order=True):
        th: ClipThresholds = settings.thresholds_for(label)
        cols = {c: part[c].cast(pl.Float64).fill_null(np.nan).to_numpy() for c in set(_CHECK_COLUMN.values())}
        given = (cuts or {}).get(label, {})
        cut = {k: given[k] if k in given else resolve_threshold(getattr(th, k), cols[_CHECK_COLUMN[k]]) for k in _CHECKS}
        used[label] = cut
        n = part.height
        off = np.zeros(n, bool)
        for k in ("min_score", "min_margin"):
            if cut[k] is not None:
                off |= cols[_CHECK_COLUMN[k]] < cut[k]
        unreal = cols["clip_real_margin"] < cut["min_real_margin"] if cut["min_real_margin"] is not None else np.zeros(n, bool)
        top = part["clip_top_label"].to_numpy()
        if cut["wrong_class_prob"] is not None:
            wrong = (top != label) & (cols["clip_top_prob"] >= cut["wrong_class_prob"])
        else:
            wrong = np.zeros(n, bool)
        likely = np.array([LIKELY_PREFIX + str(t) for t in top], dtype=object)
        dec = np.where(off, "off_topic", np.where(unreal, "unrealistic", np.where(wrong, likely, KEPT)))
        out_ids += part["image_id"].to_list()
        out_dec += dec.tolist()
    return pl.DataFrame({"image_id": out_ids, "clip_decision": out_dec}, schema={"image_id": pl.Utf8, "clip_decision": pl.Utf8}), used


def _status_updates(decisions: pl.DataFrame) -> pl.DataFrame:
    rejected = pl.col("clip_decision").is_in(list(REJECT_REASONS))
    return decisions.with_columns(
        pl.when(rejected).then(pl.lit(Status.rejected.value)).otherwise(pl.lit(Status.candidate.value)).alias("status"),
        pl.when(rejected).then(pl.col("clip_decision")).otherwise(pl.lit(None, pl.Utf8)).alias("reason"),
    )


# ---------------------------------------------------------------- percentile thresholds

CUTS_FILE = "percentile_cuts.json"
# Recompute a class's cuts once its population differs from the one they were computed on by more
# than this fraction of it: a few new images leave them as they are, a doubling does not.
CUTS_REFRESH = 0.10


def percentile_settings_key(manifest: Manifest, label: str, cache_key: str) -> str:
    """Everything a class's percentile cuts depend on: the weights (and device class/precision),
    every prompt (the zero-shot probability involves all classes) and the class's percentile settings."""
    s = manifest.clip
    th = s.thresholds_for(label)
    spec = {
        "model": cache_key,
        "classes": {c: class_prompts(manifest, c) for c in manifest.class_names},
        "negative": s.negative_prompts, "realistic": s.realistic_prompts, "unrealistic": s.unrealistic_prompts,
        "percentiles": {k: getattr(th, k).value for k in _CHECKS
                        if getattr(th, k) is not None and getattr(th, k).mode is ThresholdMode.percentile},
    }
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def percentile_cuts(
    population: pl.DataFrame, settings: ClipSettings, keys: dict[str, str], stored: dict
) -> tuple[dict[str, dict[str, float | None]], dict]:
    """Absolute values of the percentile thresholds per class, computed once and kept.

    ``population`` holds the scores of every image of the class this model has scored that no other
    stage rejected: candidates, accepted and reviewed images and this stage's own rejections alike,
    so deciding, reviewing or accepting images never moves the cut. ``keys`` is
    percentile_settings_key per class; ``stored`` what the last run kept. A class's stored cuts are
    reused while its key is the same and its population size is within CUTS_REFRESH of the size
    they were computed on; otherwise they are computed again over the whole population.
    Returns (cuts per class, the store to keep).
    """
    out: dict[str, dict[str, float | None]] = {}
    keep = dict(stored)
    for label, key in keys.items():
        th = settings.thresholds_for(label)
        checks = {k: t for k in _CHECKS if (t := getattr(th, k)) is not None and t.mode is ThresholdMode.percentile}
        if not checks:
            keep.pop(label, None)
            continue
        part = population.filter(pl.col("label") == label)
        n = part.height
        old = stored.get(label)
        fresh = isinstance(old, dict) and old.get("key") == key and isinstance(old.get("cuts"), dict)
        if fresh and old.get("n", 0) > 0 and abs(n - old["n"]) <= CUTS_REFRESH * old["n"]:
            out[label] = {k: old["cuts"].get(k) for k in checks}
            continue
        cuts = {
            k: resolve_threshold(t, part[_CHECK_COLUMN[k]].cast(pl.Float64).fill_null(np.nan).to_numpy())
            for k, t in checks.items()
        }
        keep[label] = {"key": key, "n": n, "cuts": cuts, "computed_at": catalog.utcnow().isoformat()}
        out[label] = cuts
    return out, keep


def _population(df: pl.DataFrame, labels: list[str]) -> pl.Expr:
    """Images whose scores make up their class's percentile population: stored, of a manifest class,
    and not rejected by another automatic stage (duplicates and unreadable files are not the class)."""
    mine = (pl.col("status") != Status.rejected.value) | pl.col("reason").is_in(list(REJECT_REASONS))
    if "review_decision" in df.columns:
        mine = mine | pl.col("review_decision").is_not_null()
    return mine & pl.col("path").is_not_null() & pl.col("label").is_in(labels)


def _load_cuts(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):  # none yet, or unreadable: compute again
        return {}
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------- embedding cache


class EmbeddingCache:
    """Append-only parquet shards of (image_id, embedding) for one model; safe to interrupt."""

    MAX_SHARDS = 32

    def __init__(self, root: Path):
        self.root = root
        # The embedding width is only known from the first batch; reads never need the schema.
        self.table = PartsTable(root, {"image_id": pl.Utf8, "embedding": pl.List(pl.Float32)})

    def _shards(self) -> list[Path]:
        return self.table.parts()

    def load(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        if not ids or not self._shards():
            return {}
        frame = self.table.read().filter(pl.col("image_id").is_in(list(ids))).unique("image_id", keep="last")
        if frame.is_empty():
            return {}
        emb = frame["embedding"].to_numpy().astype(np.float32)
        return dict(zip(frame["image_id"].to_list(), emb))

    def known(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` the cache holds, reading only its id column (cluster tasks ask per partition)."""
        if not ids:
            return set()
        with self.table.locked(exclusive=False):
            parts = self.table.parts()
            if not parts:
                return set()
            found = pl.scan_parquet(parts).select("image_id").filter(pl.col("image_id").is_in(list(ids))).collect()
        return set(found["image_id"].to_list())

    def append(self, ids: Sequence[str], emb: np.ndarray) -> None:
        if len(ids) == 0:
            return
        self.table.append(pl.DataFrame(
            {"image_id": list(ids), "embedding": np.asarray(emb, np.float32)},
            schema={"image_id": pl.Utf8, "embedding": pl.Array(pl.Float32, emb.shape[1])},
        ))

    def compact(self) -> None:
        """Merge shards once there are many (the merged one is written before any is removed)."""
        if len(self._shards()) > self.MAX_SHARDS:
            self.table.compact(self.table.read().unique("image_id", keep="last", maintain_order=True))


# ---------------------------------------------------------------- report


def _histograms(path: Path, label: str, part: pl.DataFrame, cut: dict[str, float | None]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.4))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.17, top=0.82, wspace=0.22)
    panels = [
        ("clip_score", "similarity to own class", "min_score"),
        ("clip_margin", "subject margin", "min_margin"),
        ("clip_real_margin", "realism margin", "min_real_margin"),
    ]
    groups = {
        "kept": (pl.col("clip_decision") == KEPT, "#4c9a2a"),
        "likely other class": (pl.col("clip_decision").str.starts_with(LIKELY_PREFIX), "#e0a526"),
        "rejected": (pl.col("clip_decision").is_in(list(REJECT_REASONS)), "#c0392b"),
    }
    for ax_i, (col, title, key) in enumerate(panels):
        ax = fig.add_subplot(1, 3, ax_i + 1)
        values = part[col].drop_nulls().to_numpy()
        if values.size:
            lo, hi = float(values.min()), float(values.max())
            edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, 31)
            # Stacked stairs: three artists per panel, not one patch per bar (hist() is ~100x slower).
            base = np.zeros(len(edges) - 1)
            for name, (expr, color) in groups.items():
                counts, _ = np.histogram(part.filter(expr)[col].drop_nulls().to_numpy(), bins=edges)
                if counts.any():
                    ax.stairs(base + counts, edges, baseline=base.copy(), fill=True, color=color, label=name)
                base = base + counts
        if cut.get(key) is not None:
            ax.axvline(cut[key], color="black", linestyle="--", linewidth=1, label="threshold")
        ax.set_title(title)
        ax.set_xlabel(col)
    fig.axes[0].set_ylabel("images")
    fig.axes[-1].legend(fontsize="small")
    fig.suptitle(f"{label}: {part.height} scored")
    fig.savefig(path, dpi=80)


def _safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label) or "_"


def write_report(
    ws: Workspace, df: pl.DataFrame, labels: list[str], used: dict[str, dict[str, float | None]], *, plots: bool = True
) -> Path:
    """Per-class decision counts (report.md, report.csv), thresholds.json and hist/<class>.png."""
    out = ws.stage_dir(STAGE)
    scored = df.filter(pl.col("label").is_in(labels) & pl.col("clip_decision").is_not_null())
    dec = scored.with_columns(
        pl.when(pl.col("clip_decision").str.starts_with(LIKELY_PREFIX))
        .then(pl.lit("likely_other"))
        .otherwise(pl.col("clip_decision"))
        .alias("d")
    )
    order = [KEPT, "off_topic", "unrealistic", "likely_other", ERROR, SKIPPED]
    table = pl.DataFrame({"label": labels})
    if dec.height:
        piv = dec.group_by("label", "d").len().pivot(on="d", index="label", values="len")
        table = table.join(piv, on="label", how="left")
    for c in order:
        if c not in table.columns:
            table = table.with_columns(pl.lit(0, pl.UInt32).alias(c))
    table = table.select("label", *order).fill_null(0)
    table = table.with_columns(pl.sum_horizontal(*order).alias("total"))
    table.write_csv(out / "report.csv")
    from curation.report import markdown_table

    lines = ["# CLIP scoring", "", markdown_table(table), "", "## Thresholds used (absolute values)", ""]
    th = pl.DataFrame([{"label": k, **{c: (None if v is None else round(v, 4)) for c, v in d.items()}} for k, d in used.items()])
    if th.height:
        lines.append(markdown_table(th))
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "thresholds.json").write_text(json.dumps(used, indent=2), encoding="utf-8")
    if not plots:
        return out
    hist = out / "hist"
    hist.mkdir(exist_ok=True)
    real = scored.filter(pl.col("clip_score").is_not_null())
    for label in labels:
        part = real.filter(pl.col("label") == label)
        if part.height:
            _histograms(hist / f"{_safe_name(label)}.png", label, part, used.get(label, {}))
    return out


# ---------------------------------------------------------------- on a Dask cluster

# One model per worker process, loaded by its first task: (settings that shape it, device) -> model.
_WORKER_MODELS: dict[tuple, ClipModel] = {}


def _worker_model(settings: ClipSettings) -> ClipModel:
    key = (settings.model, settings.pretrained, str(settings.model_config_path), settings.device, settings.precision.value)
    if key not in _WORKER_MODELS:
        _WORKER_MODELS[key] = load_model(settings)
    return _WORKER_MODELS[key]


def encode_partition(root: str, settings: ClipSettings, labels: list[str], version: int, key: str) -> dict:
    """Worker side of a cluster run: encode the rows of catalog partition ``key`` (at ``version``)
    that the stage decides and the cache lacks, append them to the embedding cache, and return
    {cache_key, device, encoded, errors: {image_id: message}, seconds} (cache_key None: nothing eligible)."""
    import multiprocessing as mp

    ws = Workspace(root)
    part = catalog.ensure_columns(catalog.read_partition(ws, key, version), CLIP_COLUMNS)
    todo = part.filter(_eligible(part, labels)).select("image_id", "path")
    out: dict[str, Any] = {"cache_key": None, "device": None, "encoded": 0, "errors": {}, "seconds": 0.0}
    if todo.is_empty():
        return out
    clip = _worker_model(settings)
    out.update(cache_key=clip.cache_key, device=str(clip.device))
    cache = EmbeddingCache(ws.stage_dir(STAGE) / "embeddings" / clip.cache_key)
    todo = todo.filter(~pl.col("image_id").is_in(list(cache.known(todo["image_id"].to_list()))))
    if todo.is_empty():
        return out
    ids = todo["image_id"].to_list()
    t0 = time.perf_counter()
    # Dask's nanny sets OMP_NUM_THREADS to the worker's share of the cores; a daemonic worker
    # process (the default) may not start DataLoader processes.
    threads = settings.threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or None
    workers = 0 if mp.current_process().daemon else settings.workers
    emb, errs = encode_images(clip, [str(ws.abspath(p)) for p in todo["path"].to_list()], batch_size=settings.batch_size,
                              workers=workers, threads=threads)
    ok = [i for i, e in enumerate(errs) if not e]
    cache.append([ids[i] for i in ok], emb[ok])
    out.update(encoded=len(ok), errors={ids[i]: e for i, e in enumerate(errs) if e}, seconds=time.perf_counter() - t0)
    return out


def _probe_cache_key(settings: ClipSettings) -> tuple[str, str]:
    clip = _worker_model(settings)
    return clip.cache_key, str(clip.device)


def _encode_on_cluster(manifest: Manifest, ws: Workspace, address: str, fallback_key: str,
                       ids: Sequence[str]) -> tuple[str, str, int, dict, float]:
    """Run `encode_partition` over the catalog partitions holding ``ids`` (the rows to decide):
    (cache_key, device, encoded, errors, seconds).

    Tasks ask for a GPU (`--resources GPU=1` workers) when the cluster has such workers and the
    manifest does not pin the CPU; otherwise they run on any worker's CPU."""
    from curation import cluster

    s = manifest.clip
    version = catalog.version(ws)
    results: list[dict] = []
    t0 = time.perf_counter()
    with cluster.connect(address) as client:
        gpu = cluster.gpu_workers(client) > 0 and not s.device.startswith(("cpu", "mps"))
        resources = {cluster.GPU: 1} if gpu else None
        if version is not None:
            results = [r for _, r in cluster.map_partitions(
                client, encode_partition, cluster.partitions_holding(ws, ids), str(ws.root), s, manifest.class_names, version,
                resources=resources,
            )]
        used = {(r["cache_key"], r["device"]) for r in results if r["cache_key"]}
        if not used and version is not None:
            # Nothing eligible: scores of the population still come from the workers' cache.
            used = {client.submit(_probe_cache_key, s, resources=resources, pure=False).result()}
    keys = {k for k, _ in used}
    if len(keys) > 1:
        raise ClipSetupError(
            f"the Dask workers encode with different devices or precisions ({', '.join(sorted(keys))}): one cache "
            "would mix them; give GPU workers --resources GPU=1, or pin clip.device and clip.precision"
        )
    key, device = next(iter(used)) if used else (fallback_key, "")
    errors = {i: e for r in results for i, e in r["errors"].items()}
    # Wall time of the whole map (model loading on each worker included), for the summary's rate.
    return key, f"{device} on dask", sum(r["encoded"] for r in results), errors, time.perf_counter() - t0


# ---------------------------------------------------------------- the stage


def _eligible(df: pl.DataFrame, labels: list[str]) -> pl.Expr:
    """Rows this stage may decide: candidates, and its own earlier rejections; never human decisions."""
    mine = (pl.col("status") == Status.candidate.value) | (
        (pl.col("status") == Status.rejected.value) & pl.col("reason").is_in(list(REJECT_REASONS))
    )
    expr = mine & pl.col("path").is_not_null() & pl.col("label").is_in(labels)
    if "review_decision" in df.columns:
        expr = expr & pl.col("review_decision").is_null()
    return expr


def _mark_skipped(manifest: Manifest, ws: Workspace, reason: str, summary: ScoreSummary) -> ScoreSummary:
    labels = manifest.class_names
    with catalog.locked(ws):
        df = catalog.ensure_columns(catalog.read(ws), CLIP_COLUMNS)
        # Real scores from an earlier run are kept: skipping never replaces a measurement with nothing.
        todo = df.filter(_eligible(df, labels) & pl.col("clip_score").is_null())
        upd = todo.select(
            "image_id",
            pl.lit(SKIPPED).alias("clip_decision"),
            pl.lit(manifest.clip.model if not manifest.clip.pretrained else f"{manifest.clip.model}/{manifest.clip.pretrained}").alias("clip_model"),
        )
        catalog.merge(ws, catalog.changes(df, upd), declare=CLIP_COLUMNS)
    summary.skipped = True
    summary.skip_reason = reason
    summary.eligible = todo.height
    summary.decisions = {SKIPPED: todo.height}
    (ws.stage_dir(STAGE) / "skipped.txt").write_text(reason + "\n", encoding="utf-8")
    return summary


def run(manifest: Manifest, ws: Workspace, *, show_progress: bool = True, device: str | None = None,
        dask_address: str | None = None) -> ScoreSummary:
    """Score every candidate with the manifest's CLIP model and record scores and decisions.

    ``dask_address`` ("local" or a scheduler address): images are encoded per catalog partition on
    that Dask cluster (`encode_partition`); this process encodes only the prompts and decides.

    Raises WeightsUnavailable when the weights cannot be obtained (unless clip.skip_if_unavailable,
    which marks images skipped instead) and ClipSetupError for settings that cannot work.
    """
    if dask_address and device:  # the override is for the workers that encode too
        manifest = manifest.model_copy(update={"clip": manifest.clip.model_copy(update={"device": device})})
    try:
        clip = load_model(manifest.clip, device=device)
    except WeightsUnavailable as exc:
        if not manifest.clip.skip_if_unavailable:
            raise
        return _mark_skipped(manifest, ws, str(exc), ScoreSummary(model=manifest.clip.model))
    return score_workspace(manifest, ws, clip, show_progress=show_progress, dask_address=dask_address)


def score_workspace(manifest: Manifest, ws: Workspace, clip: ClipModel, *, show_progress: bool = True,
                    dask_address: str | None = None) -> ScoreSummary:
    """The stage with an already loaded model (flows and benchmarks load it once)."""
    s = manifest.clip
    labels = manifest.class_names
    summary = ScoreSummary(model=clip.model_id, device=str(clip.device))
    df = catalog.ensure_columns(catalog.read(ws), CLIP_COLUMNS)
    summary.unknown_label = df.filter(
        (pl.col("status") == Status.candidate.value) & pl.col("path").is_not_null() & ~pl.col("label").is_in(labels)
    ).height
    todo = df.filter(_eligible(df, labels)).select("image_id", "label", "path")
    ids = todo["image_id"].to_list()
    pop = df.filter(_population(df, labels)).select("image_id", "label")

    cache_key = clip.cache_key
    errors: dict[str, str] = {}
    if dask_address:
        # Workers fill the cache of THEIR device and precision; the scores read it from there.
        cache_key, summary.device, summary.encoded, errors, summary.encode_seconds = _encode_on_cluster(
            manifest, ws, dask_address, cache_key, ids
        )
    cache = EmbeddingCache(ws.stage_dir(STAGE) / "embeddings" / cache_key)
    # Images this stage no longer decides (accepted, reviewed) still count in the percentile population.
    id_set = set(ids)
    have = cache.load(ids + [i for i in pop["image_id"].to_list() if i not in id_set])
    summary.cached = sum(i in have for i in ids) - summary.encoded
    # On a cluster, rows committed after the workers' snapshot wait for the next run.
    missing = [] if dask_address else [i for i in ids if i not in have]
    path_of = dict(zip(ids, todo["path"].to_list()))
    if missing:
        buffer: list[tuple[list[str], np.ndarray]] = []

        def keep(idx: np.ndarray, f: np.ndarray, *, final: bool = False) -> None:
            # Persist in shards of a few thousand rows: an interruption loses at most one shard.
            if len(idx):
                buffer.append(([missing[i] for i in idx], f))
            if buffer and (final or sum(len(b[0]) for b in buffer) >= 2048):
                cache.append(sum((b[0] for b in buffer), []), np.concatenate([b[1] for b in buffer]))
                buffer.clear()

        t0 = time.perf_counter()
        emb, errs = encode_images(
            clip, [str(ws.abspath(path_of[i])) for i in missing], batch_size=s.batch_size, workers=s.workers,
            threads=s.threads, show_progress=show_progress, on_batch=keep,
        )
        keep(np.zeros(0, int), np.zeros((0, 0), np.float32), final=True)
        summary.encode_seconds = time.perf_counter() - t0
        for i, image_id in enumerate(missing):
            if errs[i]:
                errors[image_id] = errs[i]
            else:
                have[image_id] = emb[i]
        summary.encoded = len(missing) - len(errors)
        cache.compact()
    elif dask_address:
        cache.compact()
    summary.failed = len(errors)

    label_of = dict(zip(pop["image_id"].to_list(), pop["label"].to_list())) | dict(zip(ids, todo["label"].to_list()))
    scored_ids = [i for i in dict.fromkeys([*ids, *pop["image_id"].to_list()]) if i in have]
    bank = build_text_bank(clip, manifest)
    if scored_ids:
        emb = np.stack([have[i] for i in scored_ids])
        lab = np.array([labels.index(label_of[i]) for i in scored_ids])
        cols = compute_scores(emb, lab, bank, clip.logit_scale)
        scores = pl.DataFrame(
            {"image_id": scored_ids, "label": [label_of[i] for i in scored_ids], **{k: list(v) for k, v in cols.items()}},
            schema_overrides={k: CLIP_COLUMNS[k] for k in SCORE_COLUMNS},
        )
    else:
        scores = pl.DataFrame(schema={"image_id": pl.Utf8, "label": pl.Utf8, **{k: CLIP_COLUMNS[k] for k in SCORE_COLUMNS}})

    with catalog.locked(ws):
        df = catalog.ensure_columns(catalog.read(ws), CLIP_COLUMNS)
        population = scores.filter(pl.col("image_id").is_in(df.filter(_population(df, labels))["image_id"].implode()))
        cuts_path = ws.stage_dir(STAGE) / CUTS_FILE
        keys = {c: percentile_settings_key(manifest, c, cache_key) for c in labels}
        cuts, kept = percentile_cuts(population, s, keys, _load_cuts(cuts_path))
        atomic_write_bytes(cuts_path, json.dumps(kept, indent=2, sort_keys=True).encode())
        # Re-check eligibility on the fresh catalog: a reviewer may have decided meanwhile.
        still = df.filter(_eligible(df, labels))["image_id"].implode()
        scores = scores.filter(pl.col("image_id").is_in(still))
        decisions, used = decide(scores, s, cuts=cuts)
        upd = scores.drop("label").join(_status_updates(decisions), on="image_id").with_columns(
            pl.lit(clip.model_id).alias("clip_model")
        )
        bad = pl.DataFrame(
            {"image_id": list(errors), "note": list(errors.values())}, schema={"image_id": pl.Utf8, "note": pl.Utf8}
        ).filter(pl.col("image_id").is_in(still))
        # Keep what normalisation noted (exif-rotated, cmyk->rgb): it may be why the file fails now.
        prior = df.select("image_id", pl.col("note").alias("_prior"))
        bad = bad.join(prior, on="image_id", how="left").with_columns(
            pl.concat_str([pl.col("_prior"), pl.lit("clip: ") + pl.col("note")], separator="; ", ignore_nulls=True).alias("note")
        ).drop("_prior")
        bad = bad.with_columns(
            pl.lit(ERROR).alias("clip_decision"), pl.lit(clip.model_id).alias("clip_model"),
            pl.lit(Status.rejected.value).alias("status"), pl.lit("unreadable").alias("reason"),
            *[pl.lit(None, CLIP_COLUMNS[c]).alias(c) for c in SCORE_COLUMNS],
        )
        change = catalog.changes(df, upd, bad)
        df = catalog.update(df, change)  # the report reads it
        catalog.merge(ws, change, declare=CLIP_COLUMNS)
    summary.eligible = upd.height + bad.height
    counts: dict[str, int] = {}
    for d in [*decisions["clip_decision"].to_list(), *[ERROR] * bad.height]:
        key = "likely_other" if d.startswith(LIKELY_PREFIX) else d
        counts[key] = counts.get(key, 0) + 1
    summary.decisions = counts
    summary.report_dir = write_report(ws, df, labels, used, plots=s.plots)
    (ws.stage_dir(STAGE) / "skipped.txt").unlink(missing_ok=True)
    return summary
