"""Manifest YAML in, one validated typed config (pydantic) out; errors name the file and field."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from curation.errors import JurassiclassError


class ManifestError(JurassiclassError, ValueError):
    """A manifest that cannot be used; the message names the file and the offending field."""


class _Strict(BaseModel):
    # Unknown keys are almost always typos; refuse them instead of silently ignoring settings.
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- classes


class ClassSpec(_Strict):
    name: str
    queries: list[str] = Field(default_factory=list, description="search queries; default: the name")
    synonyms: list[str] = Field(default_factory=list, description="other names, used in CLIP prompts")
    taxon_ids: dict[str, int | str] = Field(
        default_factory=dict, description="ids per source, e.g. {inaturalist: 12345, gbif: 67890}"
    )
    folder: str | None = Field(None, description="folder name for `folder` sources; default: the name")
    target: int | None = Field(None, ge=0, description="images wanted for this class (overrides scrape.target_per_class)")

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("class name is empty")
        if "/" in v or "\\" in v:
            raise ValueError(f"class name {v!r} must not contain a path separator")
        return v

    @model_validator(mode="after")
    def _default_queries(self) -> "ClassSpec":
        if not self.queries:
            self.queries = [self.name]
        return self

    @property
    def folder_name(self) -> str:
        return self.folder or self.name


def known_licence_codes(v: list[str]) -> list[str]:
    """Validator body: every entry is a code of curation/licenses.py."""
    from curation.licenses import CODES

    unknown = [c for c in v if c not in CODES]
    if unknown:
        raise ValueError(f"unknown licence code(s) {unknown}; use {sorted(CODES)}")
    return v


_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def hub_repo_id(v: str | None) -> str | None:
    """Validator body: None or a Hub repo id ORG/NAME."""
    if v is not None and not _REPO_RE.match(v):
        raise ValueError(f"{v!r} is not a Hub repo id (ORG/NAME)")
    return v


# ---------------------------------------------------------------- sources


class SourceKind(str, Enum):
    folder = "folder"
    urls = "urls"
    bing = "bing"
    baidu = "baidu"
    google = "google"
    flickr = "flickr"
    wikimedia = "wikimedia"
    inaturalist = "inaturalist"
    gbif = "gbif"


class FolderSource(_Strict):
    """An existing tree ROOT/<class>/**/*.{jpg,png,...}; files elsewhere are recorded, not dropped."""

    type: Literal["folder"] = "folder"
    path: Path
    license: str | None = Field(None, description="licence of every image in the tree, if known (e.g. cc0)")
    author: str | None = None


class UrlListSource(_Strict):
    """A CSV or parquet file with columns url,label[,license,author,page_url,query]."""

    type: Literal["urls"] = "urls"
    path: Path
    license: str | None = Field(None, description="licence of rows whose own license cell is empty")


class SearchEngineSource(_Strict):
    """A search engine crawled through icrawler."""

    type: Literal["bing", "baidu", "google", "flickr"]
    max_per_query: int = Field(100, ge=1)
    # Flickr needs an API key; it is read from this environment variable, never stored here.
    api_key_env: str = "FLICKR_API_KEY"
    filters: dict[str, str] = Field(
        default_factory=dict, description="icrawler search filters, e.g. {license: creativecommons, type: photo}"
    )
    endpoint: str | None = Field(
        None, description="base URL that replaces the engine's scheme://host for its search requests (mirrors, tests)"
    )
    request_interval_s: float = Field(
        1.0, ge=0, description="Flickr: pause between API calls (a key allows 3,600 calls an hour)"
    )


class LicensedApiSource(_Strict):
    """A licence-aware API (Wikimedia Commons, iNaturalist, GBIF)."""

    type: Literal["wikimedia", "inaturalist", "gbif"]
    max_per_class: int | None = Field(None, ge=1)
    licenses: list[str] = Field(
        default_factory=lambda: ["cc0", "pd", "cc-by", "cc-by-sa"],
        description="licence codes to keep (see curation/licenses.py); empty keeps every licence",
    )
    endpoint: str | None = Field(None, description="API base URL override (mirrors, tests)")
    request_interval_s: float = Field(
        1.0, ge=0, description="pause between API pages: iNaturalist asks for <= 60 requests/min"
    )
    image_width: int | None = Field(
        1024, ge=1, description="ask for a resized copy this wide where the API offers one (Wikimedia, iNaturalist)"
    )

    _known_codes = field_validator("licenses")(lambda cls, v: known_licence_codes(v))


Source = Annotated[
    Union[FolderSource, UrlListSource, SearchEngineSource, LicensedApiSource],
    Field(discriminator="type"),
]


# ---------------------------------------------------------------- stage settings


class ImageSettings(_Strict):
    min_side: int = Field(32, ge=1, description="images whose shorter side is smaller are rejected")
    max_pixels: int = Field(
        80_000_000, ge=1, description="declared width*height above this is a decompression bomb"
    )
    max_bytes: int = Field(25_000_000, ge=1, description="downloads larger than this are cut off")


class ScrapeSettings(_Strict):
    target_per_class: int = Field(200, ge=0)
    concurrency: int = Field(16, ge=1)
    per_host_concurrency: int = Field(4, ge=1)
    timeout_s: float = Field(20.0, gt=0, description="seconds for one attempt at one URL, headers and body")
    retries: int = Field(3, ge=0)
    backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles per attempt, with jitter")
    max_backoff_s: float = Field(120.0, ge=0, description="cap on any wait, Retry-After included")
    max_redirects: int = Field(5, ge=0)
    commit_every: int = Field(50, ge=1, description="catalog rows written in batches of this many results")
    commit_interval_s: float = Field(15.0, gt=0, description="... or at least this often")
    allow_private_networks: bool = Field(
        False, description="fetch URLs that resolve to loopback/private/link-local addresses (local mirrors, tests)"
    )
    user_agent: str = "jurassiclass/0.1 (dataset curation; +https://github.com/jurassiclass)"
    host_concurrency: dict[str, Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: {"upload.wikimedia.org": 2},
        description="per-host caps below per_host_concurrency (host name -> concurrent requests); sources "
        "enforce their hosts' published caps (upload.wikimedia.org: 2) whatever is set here",
    )


class HashKind(str, Enum):
    phash = "phash"
    dhash = "dhash"
    whash = "whash"


class DedupSettings(_Strict):
    hash: HashKind = HashKind.phash
    threshold: int = Field(
        10, ge=0, le=32, description="max Hamming distance between 64-bit hashes (see curation/dedup.py for the measurements)"
    )
    min_thumb_corr: float = Field(
        0.8, ge=-1.0, le=1.0,
        description="second signal: a near pair also needs this correlation of 8x8 and 16x16 grey thumbnails (guards low-texture images)",
    )
    strong_bits: int = Field(
        6, ge=0, le=32,
        description="hash pairs within this many bits that pass the thumbnail guard are accepted without geometric verification",
    )
    regions: bool = Field(
        True, description="candidate family: hashes of the central 90%/80% and of the mirrored picture, searched across scales (crops, borders, flips)"
    )
    layout: bool = Field(True, description="candidate family: nearest grey-thumbnail layouts, direct and mirrored (crops, flips)")
    layout_min_corr: float = Field(0.5, ge=-1.0, le=1.0, description="layout family: min correlation of 8x8 thumbnails")
    mirror_min_corr: float = Field(
        0.8, ge=-1.0, le=1.0, description="layout family, mirrored queries (flips): min correlation of 8x8 thumbnails"
    )
    layout_k: int = Field(8, ge=1, le=64, description="layout family: neighbours searched per image (and per mirrored image)")
    keypoints: bool = Field(
        True, description="candidate family: images sharing ORB descriptors (frames, captions, pads over dark or flat pictures)"
    )
    keypoint_max_images: int = Field(
        100_000, ge=0,
        description="keypoint family: runs when at most this many images are hashed (its search costs ~6 ms an image at 10k, growing)",
    )
    embeddings: bool = Field(True, description="candidate family: CLIP embedding neighbours, when the score stage has cached embeddings")
    embedding_min_cos: float = Field(0.9, ge=-1.0, le=1.0, description="embedding family: min cosine similarity")
    embedding_k: int = Field(8, ge=1, le=64, description="embedding family: neighbours searched per image")
    min_inliers: int = Field(
        20, ge=4, description="geometric verification: ORB matches consistent with one similarity transform (RANSAC) to accept a pair"
    )
    leak_check: bool = Field(True, description="flag new images that near-duplicate a published test image (column leak_of)")
    contact_sheet_groups: int = Field(12, ge=0, description="largest groups drawn in stages/dedup/contact_sheet.png (0: none)")


class ThresholdMode(str, Enum):
    absolute = "absolute"
    # Within each class, over every image of it the model scored that no other stage rejected;
    # computed once and kept (stages/score/percentile_cuts.json) until settings change or the class grows >10%.
    percentile = "percentile"


class Threshold(_Strict):
    """A cut-off on one score: a number, or the score at a percentile (0-100) of the class's images.

    YAML accepts `0.2`, `"10%"` (percentile) or `{value: 10, mode: percentile}`.
    """

    value: float
    mode: ThresholdMode = ThresholdMode.absolute

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: object) -> object:
        if isinstance(data, bool):
            raise ValueError("a threshold is a number, 'N%' or {value, mode}")
        if isinstance(data, (int, float)):
            return {"value": data}
        if isinstance(data, str):
            text = data.strip()
            try:
                if text.endswith("%"):
                    return {"value": float(text[:-1]), "mode": "percentile"}
                return {"value": float(text)}
            except ValueError:
                raise ValueError(f"{data!r} is not a threshold (a number, 'N%' or {{value, mode}})") from None
        return data

    @model_validator(mode="after")
    def _range(self) -> "Threshold":
        if self.mode is ThresholdMode.percentile and not 0.0 <= self.value <= 100.0:
            raise ValueError(f"percentile {self.value} is outside 0-100")
        return self


class ClipThresholds(_Strict):
    """When an image is rejected or flagged; `null` turns a check off. Scores below a `min_*` fail it."""

    min_score: Threshold | None = Field(
        None, description="cosine similarity to the image's own class ensemble; below: off_topic"
    )
    min_margin: Threshold | None = Field(
        Threshold(value=0.2), description="subject vs not-the-subject softmax margin (-1..1); below: off_topic"
    )
    min_real_margin: Threshold | None = Field(
        Threshold(value=0.2), description="realistic vs non-realistic softmax margin (-1..1); below: unrealistic"
    )
    wrong_class_prob: Threshold | None = Field(
        Threshold(value=0.5),
        description="zero-shot probability of another class at or above which the image is flagged likely_<class>",
    )


class ClipPrecision(str, Enum):
    auto = "auto"  # bf16 (else fp16) autocast on CUDA, fp32 on CPU
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


# OpenAI's zero-shot ensemble ideas, widened beyond photographs: species are often drawn or mounted.
DEFAULT_TEMPLATES = [
    "a photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a bad photo of a {}.",
    "a cropped photo of a {}.",
    "art of the {}.",
    "a painting of a {}.",
    "an illustration of a {}.",
    "a drawing of a {}.",
    "a 3d rendering of a {}.",
    "a sculpture of a {}.",
]
DEFAULT_NEGATIVE_PROMPTS = [
    "a photo of an unrelated object.",
    "a screenshot of a web page.",
    "a page of text.",
    "a logo.",
    "an icon.",
    "a chart or a diagram.",
    "a map.",
    "a photo of a person.",
    "a photo of a room.",
    "a photo of a landscape.",
    "a blank image.",
    "a product photo.",
]
DEFAULT_REALISTIC_PROMPTS = [
    "a photo of a {}.",
    "a realistic photo of a {}.",
    "a high resolution photograph of a {}.",
    "a realistic painting of a {}.",
    "a detailed realistic illustration of a {}.",
    "a museum specimen of a {}.",
]
DEFAULT_UNREALISTIC_PROMPTS = [
    "a cartoon {}.",
    "a cartoon drawing of a {}.",
    "a plastic toy {}.",
    "a plush toy {}.",
    "pixel art of a {}.",
    "a line drawing of a {}.",
    "a clip art of a {}.",
    "a coloring book page of a {}.",
    "a child's drawing of a {}.",
    "an emoji of a {}.",
    "a low poly 3d model of a {}.",
    "an anime {}.",
]
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class ClipSettings(_Strict):
    model: str = Field("ViT-B-32", description="open_clip architecture, hf-hub:ORG/REPO or local-dir:PATH")
    pretrained: str | None = Field(
        "laion2b_s34b_b79k", description="open_clip tag or a local checkpoint file (ignored for hf-hub:/local-dir:)"
    )
    model_config_path: Path | None = Field(
        None, description="an open_clip model config JSON (or a folder of them) to register: custom architectures"
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    precision: ClipPrecision = ClipPrecision.auto
    batch_size: int | None = Field(None, ge=1, description="default: 256 on CUDA, 32 on CPU")
    workers: int | None = Field(None, ge=0, description="DataLoader decode processes; default: by device and cores")
    threads: int | None = Field(None, ge=1, description="torch CPU threads while encoding; default: all cores")
    skip_if_unavailable: bool = Field(
        False, description="if weights cannot be loaded, mark scoring skipped instead of failing"
    )
    templates: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TEMPLATES),
        min_length=1,
        description="prompt templates ({} = a class name or synonym), averaged into one embedding per class",
    )
    class_prompts: dict[str, list[str]] = Field(
        default_factory=dict, description="extra full prompts per class, added to its ensemble"
    )
    negative_prompts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_NEGATIVE_PROMPTS), min_length=1,
        description="'not the subject' prompts (full sentences) for the subject margin",
    )
    realistic_prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_REALISTIC_PROMPTS), min_length=1)
    unrealistic_prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_UNREALISTIC_PROMPTS), min_length=1)
    thresholds: ClipThresholds = Field(default_factory=ClipThresholds)
    plots: bool = Field(True, description="write a histogram PNG per class (about half a second each)")
    class_thresholds: dict[str, ClipThresholds] = Field(
        default_factory=dict, description="per-class overrides: only the fields given replace the global ones"
    )

    @field_validator("device")
    @classmethod
    def _device_ok(cls, v: str) -> str:
        if not _DEVICE_RE.match(v):
            raise ValueError(f"{v!r} is not a device (auto, cpu, cuda, cuda:N, mps)")
        return v

    def thresholds_for(self, label: str) -> ClipThresholds:
        """Global thresholds with this class's explicitly given fields on top."""
        over = self.class_thresholds.get(label)
        if over is None:
            return self.thresholds
        return self.thresholds.model_copy(update={k: getattr(over, k) for k in over.model_fields_set})


class ReviewScore(str, Enum):
    """The CLIP column reviewers sort by, calibrate, and see the borderline band of."""

    clip_margin = "clip_margin"
    clip_score = "clip_score"
    clip_real_margin = "clip_real_margin"


_LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}


class ReviewSettings(_Strict):
    dataset_name: str | None = Field(None, description="FiftyOne dataset name; default: the manifest name")
    port: int = Field(5151, ge=1, le=65535)
    address: str = Field("127.0.0.1", description="the App binds here: loopback only (tunnel it for a team)")
    include_rejected: bool = Field(True, description="push pipeline-rejected images too, so reviewers can rescue them")
    score: ReviewScore = ReviewScore.clip_margin
    threshold: float | None = Field(
        None, description="cut-off on `score` for the borderline view; default: the CLIP stage's absolute threshold"
    )
    borderline_band: float = Field(0.1, gt=0, description="|score - threshold| at most this is borderline")
    push_in_run: bool = Field(True, description="`jurassiclass run` ends with `review push`")

    @field_validator("address")
    @classmethod
    def _loopback(cls, v: str) -> str:
        # The App has no authentication: anything but loopback would publish the dataset to the network.
        if v not in _LOOPBACK_NAMES and not v.startswith("127."):
            raise ValueError(f"{v!r} is not a loopback address; the review App binds to 127.0.0.1 (use an SSH tunnel)")
        return v


class PublishInclude(str, Enum):
    accepted = "accepted"  # human-accepted images only
    candidates = "candidates"  # accepted plus unreviewed candidates (the `reviewed` column tells them apart)


class SplitSizes(_Strict):
    """Fractions of each class's images per split (groups of duplicates are never divided)."""

    train: float = Field(0.8, gt=0, le=1)
    validation: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _sum_one(self) -> "SplitSizes":
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split sizes must add up to 1 (train + validation + test = {total:g})")
        return self

    def as_dict(self) -> dict[str, float]:
        return {"train": self.train, "validation": self.validation, "test": self.test}


class PublishSettings(_Strict):
    repo_id: str | None = Field(None, description="Hub dataset repo ORG/NAME that `publish --push` uses by default")
    private: bool = Field(True, description="create the Hub repo private")
    revision: str | None = Field(None, description="Hub branch to push to (default: main)")
    include: PublishInclude = PublishInclude.accepted
    licenses: list[str] = Field(
        default_factory=lambda: ["cc0", "pd", "cc-by", "cc-by-sa"],
        description="licence codes that may be published (see curation/licenses.py)",
    )
    non_commercial: bool = Field(
        False, description="the dataset is published for non-commercial use only: NC licences become acceptable"
    )
    splits: SplitSizes = Field(default_factory=SplitSizes)
    folds: int = Field(5, ge=2, le=50, description="k of the `fold` column (train + validation rows) for cross-validation")
    seed: int = Field(0, description="seed of the split and fold assignment")
    shard_size_mb: float = Field(500.0, gt=0, description="parquet shard size (image bytes) in MB")
    pretty_name: str | None = None
    citation: str | None = Field(None, description="BibTeX for the card; default: one generated from the manifest")
    token_secret: str = Field("hf-token", description="Prefect Secret block holding the Hub token (flows; else $HF_TOKEN)")

    _known_codes = field_validator("licenses")(lambda cls, v: known_licence_codes(v))

    _repo_ok = field_validator("repo_id")(lambda cls, v: hub_repo_id(v))


# ---------------------------------------------------------------- training (models/)


class TrainMode(str, Enum):
    head = "head"  # classifier only; the backbone is frozen
    finetune = "finetune"  # classifier + the last stage(s) of the backbone, each with its own lr/wd
    full = "full"  # every parameter (backbone lr = lr / backbone_factor)


class Balance(str, Enum):
    none = "none"
    class_weights = "class_weights"  # loss weights inversely proportional to class frequency
    sampler = "sampler"  # a class-balanced sampler over the training rows


class Scheduler(str, Enum):
    plateau = "plateau"  # ReduceLROnPlateau on val/loss
    cosine = "cosine"  # linear warm-up, then cosine to zero over max_epochs


class Hyper(_Strict):
    """The values a grid search may change; names are what `train.grid` refers to."""

    lr: float = Field(5e-3, gt=0, description="classifier learning rate")
    backbone_factor: float = Field(10.0, gt=0, description="backbone lr = lr / backbone_factor")
    wd_head: float = Field(1e-3, ge=0, description="AdamW weight decay of the classifier (wd1)")
    wd_backbone: float = Field(1e-2, ge=0, description="AdamW weight decay of the fine-tuned backbone (wd2)")
    label_smoothing: float = Field(0.0, ge=0, lt=1)


HYPER_NAMES = tuple(Hyper.model_fields)


class ModelSpec(_Strict):
    """One classifier to train: any timm architecture, a mode, its hyper-parameters."""

    name: str = Field(description="experiment-unique name, e.g. resnet34-finetune")
    arch: str = Field(description="timm model name, e.g. resnet34, tf_efficientnetv2_s, test_resnet")
    mode: TrainMode = TrainMode.finetune
    pretrained: bool = Field(True, description="start from pretrained weights (offline: needs `weights`)")
    weights: Path | None = Field(None, description="local pretrained weights file, loaded through timm's pretrained path")
    finetune_modules: list[str] | None = Field(
        None, description="backbone module names trained in finetune mode; default: the last stage and what follows it"
    )
    last_stages: int = Field(1, ge=1, description="finetune mode without finetune_modules: how many last stages to train")
    hyper: Hyper = Field(default_factory=Hyper)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a valid model name (letters, digits, '.', '_', '-')")
        return v


def _preset(name: str, arch: str, mode: TrainMode, hyper: dict) -> dict:
    return {"name": name, "arch": arch, "mode": mode, "hyper": hyper}


# The seed's four experiments (ARCHITECTURE.md): its groups, learning rates and decays.
_RESNET = {"lr": 5e-3, "backbone_factor": 10.0, "wd_head": 1e-3, "wd_backbone": 1e-2}
_EFFNET = {"lr": 5e-3, "backbone_factor": 10.0, "wd_head": 1e-4, "wd_backbone": 1e-4}
PRESETS: dict[str, dict] = {
    "resnet34-head": _preset("resnet34-head", "resnet34", TrainMode.head, _RESNET),
    "resnet34-finetune": _preset("resnet34-finetune", "resnet34", TrainMode.finetune, _RESNET),
    "efficientnetv2_s-head": _preset("efficientnetv2_s-head", "tf_efficientnetv2_s", TrainMode.head, _EFFNET),
    "efficientnetv2_s-finetune": _preset("efficientnetv2_s-finetune", "tf_efficientnetv2_s", TrainMode.finetune, _EFFNET),
}


class Augment(_Strict):
    hflip: float = Field(0.5, ge=0, le=1)
    random_resized_crop: bool = True
    scale: tuple[float, float] = Field((0.6, 1.0), description="RandomResizedCrop area range (letterbox: long-side range x 0.8)")
    color_jitter: float = Field(0.0, ge=0)
    rotation: float = Field(0.0, ge=0, le=180, description="max degrees")
    auto_augment: str | None = Field(None, description="timm policy, e.g. rand-m9-mstd0.5 or trivialaugment")
    random_erasing: float = Field(0.0, ge=0, le=1)


class NestedSettings(_Strict):
    enabled: bool = False
    outer_folds: int | None = Field(None, ge=1, description="evaluate only this many outer folds (seed: 2)")
    inner_folds: int | None = Field(None, ge=1, description="score each candidate on this many inner folds (seed: 2)")


class TrainSettings(_Strict):
    models: list[ModelSpec] = Field(
        default_factory=lambda: [ModelSpec(**PRESETS["efficientnetv2_s-finetune"]), ModelSpec(**PRESETS["resnet34-finetune"])]
    )
    image_size: int | None = Field(224, ge=16, description="square input side; null: the model's own pretrained size")
    letterbox: bool = Field(False, description="scale the long side to 0.8*size and pad black to a square, never crop")
    batch_size: int = Field(64, ge=1)
    max_epochs: int = Field(40, ge=1)
    min_epochs: int = Field(1, ge=1)
    patience: int = Field(8, ge=1, description="early stopping on val/loss")
    scheduler: Scheduler = Scheduler.plateau
    plateau_factor: float = Field(0.33, gt=0, lt=1)
    plateau_patience: int = Field(4, ge=0)
    warmup_epochs: int = Field(1, ge=0)
    balance: Balance = Balance.none
    freeze_bn_stats: bool = Field(True, description="keep the backbone's BatchNorm statistics frozen (eval mode)")
    augment: Augment = Field(default_factory=Augment)
    cv: bool = Field(True, description="k-fold CV over the published folds before the final fit")
    cv_folds: int | None = Field(None, ge=1, description="run only the first N outer folds (quick looks)")
    nested: NestedSettings = Field(default_factory=NestedSettings)
    grid: list[dict[str, list[float]]] = Field(
        default_factory=lambda: [{"lr": [0.003, 0.005], "backbone_factor": [5, 10]},
                                 {"wd_head": [1e-4, 1e-3], "wd_backbone": [1e-4, 1e-2]}],
        description="nested CV search: stages searched in order, each a grid over Hyper fields, the best kept",
    )
    label_issues: bool = Field(True, description="out-of-fold confident learning -> catalog label_issue columns")
    export_onnx: bool = True
    seed: int = 0
    accelerator: str = Field("auto", description="auto | cpu | gpu")
    devices: int | str = Field(1, description="devices per fold (Lightning), e.g. 1, 4 or 'auto'")
    strategy: str = Field("auto", description="Lightning strategy, e.g. ddp for several GPUs per fold")
    precision: str = Field("auto", description="auto: bf16-mixed (else 16-mixed) on CUDA, 32-true on CPU")
    workers: int | None = Field(None, ge=0, description="DataLoader processes; default: by device and cores")
    limit_batches: float | int | None = Field(None, description="Lightning limit_*_batches (smoke runs)")

    @field_validator("models", mode="before")
    @classmethod
    def _presets(cls, v: object) -> object:
        # A bare string names a preset: `models: [resnet34-finetune]`.
        if isinstance(v, list):
            out = []
            for item in v:
                if isinstance(item, str):
                    if item not in PRESETS:
                        raise ValueError(f"unknown model preset {item!r}; use one of {sorted(PRESETS)} or a mapping")
                    item = PRESETS[item]
                out.append(item)
            return out
        return v

    @model_validator(mode="after")
    def _check(self) -> "TrainSettings":
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique: {', '.join(dup)}")
        for stage in self.grid:
            bad = sorted(set(stage) - set(HYPER_NAMES))
            if bad:
                raise ValueError(f"grid names unknown hyper-parameters {bad}; use {list(HYPER_NAMES)}")
            if not stage or any(not vals for vals in stage.values()):
                raise ValueError("every grid stage needs at least one value per name")
        return self


# ---------------------------------------------------------------- manifest

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class PromotionMetric(str, Enum):
    top1 = "top1"
    macro_f1 = "macro_f1"


class RetrainSettings(_Strict):
    """Scheduled / triggered retraining: which run a new dataset version gets, and what promotes it."""

    kind: str = Field("retrain", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="registry name of the runs (each dataset version is trained once per kind)")
    metric: PromotionMetric = Field(PromotionMetric.top1, description="held-out test metric that decides promotion")
    tolerance: float = Field(0.01, ge=0, le=1, description="promote unless worse than the current model by more than this")
    collect_review: bool = Field(True, description="the retrain flow pulls review decisions before publishing")
    model_repo_id: str | None = Field(None, description="Hub model repo ORG/NAME the promoted model is pushed to, if any")

    _repo_ok = field_validator("model_repo_id")(lambda cls, v: hub_repo_id(v))


class Manifest(_Strict):
    name: str = Field(description="dataset name: letters, digits, . _ -")
    description: str = ""
    workdir: Path | None = Field(None, description="default workspace; relative paths resolve against the manifest")
    classes: list[ClassSpec] = Field(min_length=1)
    sources: list[Source] = Field(default_factory=list)
    images: ImageSettings = Field(default_factory=ImageSettings)
    scrape: ScrapeSettings = Field(default_factory=ScrapeSettings)
    dedup: DedupSettings = Field(default_factory=DedupSettings)
    clip: ClipSettings = Field(default_factory=ClipSettings)
    review: ReviewSettings = Field(default_factory=ReviewSettings)
    publish: PublishSettings = Field(default_factory=PublishSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    retrain: RetrainSettings = Field(default_factory=RetrainSettings)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a valid dataset name (letters, digits, '.', '_', '-')")
        return v

    @model_validator(mode="after")
    def _unique_classes(self) -> "Manifest":
        seen: set[str] = set()
        for c in self.classes:
            key = c.name.lower()
            if key in seen:
                raise ValueError(f"class {c.name!r} is listed twice")
            seen.add(key)
        known = set(self.class_names)
        for field_name in ("class_thresholds", "class_prompts"):
            bad = sorted(set(getattr(self.clip, field_name)) - known)
            if bad:
                raise ValueError(f"clip.{field_name} names classes not in the manifest: {', '.join(bad)}")
        return self

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def target_for(self, name: str) -> int:
        spec = next(c for c in self.classes if c.name == name)
        return spec.target if spec.target is not None else self.scrape.target_per_class

    def sources_of(self, *kinds: type) -> list:
        return [s for s in self.sources if isinstance(s, kinds)]


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def parse_manifest(data: object, *, origin: str = "<manifest>", base_dir: Path | None = None) -> Manifest:
    """Validate already-loaded YAML data; relative paths are resolved against ``base_dir``."""
    if not isinstance(data, dict):
        raise ManifestError(f"{origin}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        m = Manifest.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            # Discriminated unions add the tag to the location; keep the user-facing path.
            loc = tuple(p for p in err["loc"] if p not in {k.value for k in SourceKind} or isinstance(p, int))
            lines.append(f"{origin}: {_format_loc(loc)}: {err['msg']}")
        raise ManifestError("\n".join(lines)) from None
    if base_dir is not None:
        for src in m.sources:
            if hasattr(src, "path") and not src.path.is_absolute():
                src.path = (base_dir / src.path).resolve()
        if m.workdir is not None and not m.workdir.is_absolute():
            m.workdir = (base_dir / m.workdir).resolve()
        if m.clip.model_config_path is not None and not m.clip.model_config_path.is_absolute():
            m.clip.model_config_path = (base_dir / m.clip.model_config_path).resolve()
        for spec in m.train.models:
            if spec.weights is not None and not spec.weights.is_absolute():
                spec.weights = (base_dir / spec.weights).resolve()
        # `pretrained` is a tag or a file: only a relative path naming a real file is rebased.
        if m.clip.pretrained and not Path(m.clip.pretrained).is_absolute() and (base_dir / m.clip.pretrained).is_file():
            m.clip.pretrained = str((base_dir / m.clip.pretrained).resolve())
    return m


def deep_merge(base: dict, over: dict) -> dict:
    """``base`` with ``over`` merged in: mappings merge key by key, anything else (lists too) replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


_SET_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def parse_sets(items: list[str] | None) -> dict:
    """``["scrape.target_per_class=50", "clip.device=cuda"]`` -> nested overrides for `load_manifest`.

    Values are YAML (``50`` an int, ``true`` a bool, ``[a, b]`` a list, ``null``); later items win.
    """
    out: dict = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not _SET_KEY_RE.match(key):
            raise ManifestError(f"--set {item!r}: expected KEY=VALUE with a dotted KEY, e.g. scrape.target_per_class=50")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw  # not YAML: the literal text
        for part in reversed(key.split(".")):
            value = {part: value}
        out = deep_merge(out, value)
    return out


def load_manifest(path: str | Path, overrides: dict | None = None) -> Manifest:
    """Read and validate a manifest file, deep-merging ``overrides`` (e.g. ``{"scrape": {"target_per_class": 50}}``) first."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {exc}") from None
    origin = str(path)
    if overrides:
        if not isinstance(data, dict):
            raise ManifestError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
        data = deep_merge(data, overrides)
        origin = f"{path} (with overrides {overrides})"
    return parse_manifest(data, origin=origin, base_dir=path.resolve().parent)


def dump_manifest(m: Manifest) -> str:
    """The fully resolved config (defaults filled in), saved beside a run's outputs."""
    return yaml.safe_dump(m.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
