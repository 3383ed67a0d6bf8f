"""Manifest YAML in, one validated typed config (pydantic) out; errors name the file and field."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ManifestError(ValueError):
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
    """A CSV or parquet file with columns url,label[,license,author,page_url]."""

    type: Literal["urls"] = "urls"
    path: Path


class SearchEngineSource(_Strict):
    """A search engine crawled through icrawler."""

    type: Literal["bing", "baidu", "google", "flickr"]
    max_per_query: int = Field(100, ge=1)
    # Flickr needs an API key; it is read from this environment variable, never stored here.
    api_key_env: str = "FLICKR_API_KEY"


class LicensedApiSource(_Strict):
    """A licence-aware API (Wikimedia Commons, iNaturalist, GBIF)."""

    type: Literal["wikimedia", "inaturalist", "gbif"]
    max_per_class: int | None = Field(None, ge=1)
    licenses: list[str] = Field(
        default_factory=lambda: ["cc0", "cc-by", "cc-by-sa"],
        description="licence codes to ask for where the API can filter by licence",
    )
    endpoint: str | None = Field(None, description="API base URL override (mirrors, tests)")


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
    timeout_s: float = Field(20.0, gt=0)
    retries: int = Field(3, ge=0)
    user_agent: str = "jurassiclass/0.1 (dataset curation; +https://github.com/jurassiclass)"


class HashKind(str, Enum):
    phash = "phash"
    dhash = "dhash"
    whash = "whash"


class DedupSettings(_Strict):
    hash: HashKind = HashKind.phash
    threshold: int = Field(8, ge=0, le=64, description="max Hamming distance between 64-bit hashes")


class ClipSettings(_Strict):
    model: str = "ViT-B-32"
    pretrained: str | None = Field("laion2b_s34b_b79k", description="open_clip tag, hf-hub:..., or a local file")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    batch_size: int = Field(64, ge=1)
    skip_if_unavailable: bool = Field(
        False, description="if weights cannot be loaded, mark scoring skipped instead of failing"
    )


class ReviewSettings(_Strict):
    dataset_name: str | None = Field(None, description="FiftyOne dataset name; default: the manifest name")
    port: int = Field(5151, ge=1, le=65535)
    address: str = "127.0.0.1"


class PublishSettings(_Strict):
    repo_id: str | None = None
    private: bool = True
    redistributable_only: bool = Field(True, description="leave out images whose licence forbids redistribution")


class TrainingSettings(_Strict):
    models: list[str] = Field(default_factory=lambda: ["efficientnetv2_s", "resnet34"])
    folds: int = Field(5, ge=2)
    image_size: int = Field(224, ge=16)
    batch_size: int = Field(64, ge=1)
    max_epochs: int = Field(40, ge=1)
    seed: int = 0


# ---------------------------------------------------------------- manifest

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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
    training: TrainingSettings = Field(default_factory=TrainingSettings)

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
    return m


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest file."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {exc}") from None
    return parse_manifest(data, origin=str(path), base_dir=path.resolve().parent)


def dump_manifest(m: Manifest) -> str:
    """The fully resolved config (defaults filled in), saved beside a run's outputs."""
    return yaml.safe_dump(m.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
