"""Catalog in, duplicate groups out: exact (sha256) and near duplicates (resized, re-encoded, cropped, flipped, recaptioned) across all classes.

Nothing is deleted. Every stored image is hashed once (JPEGs decoded in draft mode, EXIF-upright,
black/white margins trimmed; the hash and its kind are cached in the catalog, a guard signature in
the stage). Candidate pairs come from several families, and every pair is verified before it counts:

- ``hash``: pHash within ``threshold`` bits, by an exact multi-index Hamming search (numpy, no
  O(n^2)). Within ``strong_bits`` a pair passing the thumbnail guard is accepted as is; the rest
  need geometric verification.
- ``region`` / ``region_mirror``: the same pHash of the picture's central 90% and 80% and of the
  picture mirrored, all 4n hashes in one multi-index search within ``_REGION_BITS`` (4) bits,
  pairs taken across scales: a copy cropped by 5% (10%) a side hashes like the original's central
  90% (80%), a framed or bordered copy's centre like the original, a flip's mirror like the
  original. Pairs through a mirrored hash are verified mirrored. Off with ``regions: false``.
- ``layout`` / ``mirror``: the ``layout_k`` nearest 8x8 grey layouts (faiss inner product on
  mean-centred thumbnails: brightness, contrast, greyscale drop out), queried as is and mirrored
  (horizontal flips), correlation >= ``layout_min_corr`` (mirrored: ``mirror_min_corr``). Crops of
  5-10%, borders and text change a 64-bit hash by 15-30 bits but an 8x8 layout far less.
  ``centre`` / ``centre_mirror``: the same on the central 10x10 of the 16x16 thumbnail (rotations
  of a few degrees blacken the corners, frames and title bars change the edges). ``flat`` /
  ``flat_mirror``: images too flat to have a layout (paper, fabric, soft gradients; their hash is
  noise) get their ``layout_k`` nearest flat neighbours, whatever the correlation. All with
  ``layout: true``.
- ``keypoints``: images sharing ORB descriptors: each image's first 64, their 5 nearest among all
  images' (faiss binary search, exact to 2,000 images, HNSW above), 5 of them voting for a pair.
  A frame, a caption or padding over a near-black or flat picture is most of what its hash and
  layout see, not of its keypoints. Up to ``keypoint_max_images`` hashed images (default 100k;
  ~6 ms an image at 10k). ORB features are then computed for every image, not only candidates'.
- ``embedding``: when the score stage has cached CLIP embeddings for these images (the cache under
  stages/score/embeddings/ covering most of them), the ``embedding_k`` nearest by cosine
  >= ``embedding_min_cos``, verified directly, else mirrored. On by default; it runs on re-runs
  (scrape -> dedup -> score rounds), since the first dedup precedes scoring.
- Verification (`Verifier`): ORB keypoints on 480-px greys, ratio-tested matches, a RANSAC
  similarity transform (scale 0.5-2, rotation <= 20 deg); then the CONTENT: the second picture is
  warped onto the first with that transform (120-px greys) and the overlap must correlate.
  Accepted: ``min_inliers`` (20) inliers and correlation >= 0.6 (or 84% of the cells below
  agreeing), or 8-19 inliers (flat pictures keep few keypoints) and >= 0.9; the overlap covers
  >= 50% of the smaller picture, and its 5x5 cells agree (`cell_agreement`: half of them at a
  whole correlation >= 0.96, 80% below). Pairs with no keypoint geometry at all (regular stripes
  defeat the ratio test) whose 8x8 layouts correlate >= 0.8 are aligned by intensity (OpenCV ECC)
  and need >= 0.955. Black or white margins (padding,
  letterbox bars) are left out of the overlap. Why the content: keypoints alone accept two
  different pictures under one overlay (login previews of two themes, a logo, a caption block),
  all inliers on the overlay, while the rest of the overlap disagrees; only where the pictures
  are near-flat is the overlay most of what is compared (see the held-out figures below).
  Features are computed once per image per run, only for images in candidate pairs, and at most
  20,000 images' are kept (~2.6 GB): beyond that, pairs are verified in chunks by first image and
  dropped features recomputed (~5 ms an image) when a later pair needs them again.

Grouping has no chaining; it is star clustering. Images are ranked as centres (a human-accepted
image, else one not rejected for another reason; then the most verified matches, then resolution
of the picture inside its margins). The best-ranked image with unassigned matches becomes a
group's centre and takes exactly the images that matched IT (`star_groups`): A~B and B~C put C in
A's group only if A~C was verified too. The most-matched image first, not the largest: a framed or
padded copy is often the largest, and a rotated or captioned copy that matches the original may
not match it (on the tune splits, largest-first left such copies out: fresh-tune recall 0.940,
most-matched first 0.991). A copy that matched a member but not the centre is verified against the
centre directly (`group_by_representative`), and joins only if that passes. In each group, the
image kept is ranked apart (`_rank_frame`): the typical images first, those whose grey thumbnail
is closest to all the others' (`medoid_scores`: each copy is one change from the original and two
from another copy), then the largest, the least compressed, the unpadded, the freest licence, the
earliest retrieved. On the tune split that keeps the original in 142 of 148 groups (28 when the
largest came first: frames and pads are larger); held out, 36 of 40 (fresh3), 65 of 71 (fresh2).
``dup_group`` is the kept image's image_id. The candidates among the others become
``rejected/duplicate`` with ``dup_of``. A group whose images carry more than one label (catalog
label or any sighting, so the same bytes found under two labels count too) is a label conflict:
flagged for review, not resolved; each of its labels keeps its best image.

Leak check: an image never published that matches (verified, any family) an image of the latest
published test split (catalog ``split``/``published_version``) gets ``leak_of`` = that test image;
publish then puts it in test, never train (see curation/publish.py assign_splits).

Columns added: ``phash`` (hex of the 64-bit hash of kind ``hash_kind``: phash, dhash or whash;
a change of kind re-hashes), ``hash_kind``, ``dup_group`` (image_id of the group's best image, on every
member of a group of two or more: use it as the group key for group-aware folds so duplicates
never straddle train/validation), ``dup_of`` (the image kept for the same label, on the others),
``label_conflict`` (bool), ``leak_of``. Under ``stages/dedup/``: groups.parquet/csv,
label_conflicts.csv, summary.json (settings; per family: candidates and accepted pairs),
contact_sheet.png (the largest groups, representative first, captions label and status), and
signatures/ (the guard signatures, a cache keyed by image_id).

Measured (2026-12) on the real-photo benchmark's TUNE split (`benchmarks/realphotos.py eval --split
tune`: 864 wallpapers and photos from Debian packages, 1280 px, 17 kinds of copies; thresholds tuned
there only): pairwise precision 1.000, recall 0.961 (0.952 with the largest image as group centre;
before the content check, centre, flat and ECC: 0.996 / 0.918; the old stage, hash + guard +
connected components: ~0.95 / 0.61). Held-out splits, from packages nothing was tuned on, reported
only: ``fresh3`` (Tux Paint's templates, OpenCV's sample photos, Palapeli, scikit-learn, Scribus;
textured photos, the easiest) 1.000 / 1.000 at its first look (imagededup PHash 1.000 / 0.488).
``fresh2`` (Enlightenment's photo backgrounds, LXQt's wallpapers, Tux Paint's cut-out photo
stamps): at first look, 0.968 / 0.940. An affine ECC warp zoomed into one smooth photo (a sky over
a hillside) and matched it to others; ECC warps now keep the scale (`_ECC_SCALE`) and stay near a
similarity (`_ECC_MAX_ANISO`), bounds read off the tune splits and the committed stripes. Since
then, 1.000 / 0.958. ``fresh`` (Stellarium's telescope photos and panoramas, scikit-image's photos,
Krita's paper, Xfce/LXDE/GRUB backgrounds): 1.000 / 0.904 at first look, 1.000 / 0.969 now (5th
look; misses: frames, pads and captions over near-black skies). The first held-out split, looked
at too often to stay unbiased, stands at 0.979 / 0.969. All of its false pairs are login previews
of different desktop-base themes, one login screen over smooth vignettes: 21 with the largest image
as centre, 41 with the most-matched, since a preview that matches several others falsely now
gathers them.
On ORB-verified candidates of the tune split, copies with >= 20 inliers correlate >= 0.87 after
warping (95%; the lowest: hue shifts, large captions), the look-alike scene it used to accept (two
photos of the same toy blocks, other letters) 0.52-0.65, 8-19-inlier copies mostly >= 0.9 and no
false pair there above 0.65; of ~1,000 unrelated ECC-aligned candidates none reaches 0.935 (an
earlier layout saw 0.95), copies of stripes and smooth shapes 0.958-1.0.
Login screens over 55 pictures (`benchmarks/realphotos.py login-probe`: Debian's emerald, futureprototype,
homeworld and moonlight login backgrounds, two SDDM themes' backgrounds, the tune split's
wallpapers and papers), each also cropped 5% and greyed: the whole-overlap correlation accepts
279 of the 13,356 pairs of different pictures (up to 0.985 on paper textures), the cell check
(`cell_agreement`, 5x5 cells, half of them agreeing at a whole-overlap correlation >= 0.96, 80%
below) none, and keeps every copy; on the tune split's verified copies it loses 1 of 1,082.
Whole correlation on near-black pictures (``fresh-tune``): a caption makes a copy's overlap
correlate 0.26-0.6 with 84-88% of its cells agreeing (no negative with >= 20 inliers on any tune
split above 76%); two telescope photos in one screenshot frame correlate 0.92-0.95 with 52-64%.
Still missed on tune: copies of paper
textures with frames, rotations or captions that no family proposes, recolourings, hue shifts
(grey correlation 0.2), padded copies the margin trim leaves framed.
Cost: ORB features ~30 ms per image (one thread) and a match a few ms per pair, on candidates only
(~6-7 per image with the defaults); the warp and correlation add ~0.6 ms a pair, ECC ~10 ms on the
few pairs without geometry whose layouts agree. Search at 1M images (synthetic hashes, 2 busy
cores, `benchmarks/bench_dedup.py --only 3`): the hash family 22-29 s at t=10, the region family's
4M hashes 14 s at its radius of 4 bits (at 10 bits: ~145 s): ~44 s together. faiss kNN on the
layouts is exact to 20k images, HNSW above (random vectors, the worst case: ~0.45 ms CPU per image
at 40k, per query set); at millions of images lower ``layout_k`` or turn ``layout`` off.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from math import comb
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np
import polars as pl

from curation import catalog
from curation.catalog import Status, Workspace
from curation.config import DedupSettings, HashKind, Manifest
from curation.images import open_grey, open_rgb
from curation.progress import progress_map, track
from curation.store import PartsTable
from curation.workers import die_with_parent, worker_context

if TYPE_CHECKING:
    from PIL import Image

DUPLICATE = "duplicate"

COLUMNS: dict[str, pl.DataType] = {
    "phash": pl.Utf8,
    "hash_kind": pl.Utf8,
    "dup_group": pl.Utf8,
    "dup_of": pl.Utf8,
    "label_conflict": pl.Boolean,
    "leak_of": pl.Utf8,
}

# Decode JPEGs at 1/2..1/8 scale, never below this: hashing needs 32x32 (pHash) at most.
_DRAFT = (64, 64)
# Hashes are written to the catalog in batches, so a crash during a long hashing run loses little.
_CHECKPOINT = 50_000
# Identical hashes are compared by the guard within a window of this many neighbours.
_SAME_HASH_WINDOW = 16


@dataclass
class DedupSummary:
    images: int = 0  # stored images considered
    hashed: int = 0  # hashed in this run (new, or hash kind changed)
    hash_failed: int = 0
    exact_duplicate_sightings: int = 0  # extra sightings of bytes already stored (same sha256)
    candidate_pairs: int = 0  # pairs within the Hamming threshold (the hash family)
    guard_rejected_pairs: int = 0  # of those, accepted neither by the guard nor by geometric verification
    groups: int = 0  # duplicate groups (2+ images)
    duplicates: int = 0  # group members with dup_of (not kept for their label)
    newly_rejected: int = 0
    released: int = 0  # previously rejected as duplicate, no longer
    label_conflict_groups: int = 0
    label_conflict_images: int = 0
    rows_changed: int = 0
    search_s: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)
    # per candidate family that ran (hash, layout, mirror, embedding): candidates, accepted pairs
    families: dict[str, dict[str, int]] = field(default_factory=dict)
    accepted_pairs: int = 0  # pairs accepted by any family (each member matched its representative)
    embedding_cache: str | None = None  # the CLIP cache the embedding family used
    leaks: int = 0  # images flagged leak_of: near copies of a published test image


# ---------------------------------------------------------------- hashing


def hash_image(path: str | Path, kind: HashKind = HashKind.phash) -> tuple[str, bytes]:
    """(hex 64-bit perceptual hash, guard signature) of a stored image, EXIF-upright.

    The guard signature is 283 bytes: a 16x16 grey thumbnail (layout), the share of
    horizontal in all gradient energy at 64x64 (orientation of fine texture such as stripes and
    hatching, which both small thumbnails and a 64-bit hash average away), the region hashes
    (`region_hashes`), the share of the image inside uniform margins (/255), and the signature's
    format version. All describe the picture inside any uniform margin (letterbox, padding).
    """
    import imagehash
    from PIL import Image

    grey = open_grey(path, draft=_DRAFT)
    w0, h0 = grey.size
    grey = trim_margins(grey)
    if kind is HashKind.phash:
        h, regions = _phashes(grey)
    else:
        fn = {HashKind.dhash: imagehash.dhash, HashKind.whash: imagehash.whash}[kind]
        h = str(fn(grey))
        regions = b"".join(bytes.fromhex(str(fn(r))) for r in _regions(grey))
    g = np.asarray(grey.resize((64, 64), Image.BOX), dtype=np.float32)
    thumb = g.reshape(16, 4, 16, 4).mean((1, 3))
    gx, gy = float(np.abs(np.diff(g, axis=1)).sum()), float(np.abs(np.diff(g, axis=0)).sum())
    orient = round(255 * gx / (gx + gy)) if gx + gy > 0 else 128
    content = round(255 * grey.width * grey.height / (w0 * h0))
    return h, np.rint(thumb).astype(np.uint8).tobytes() + bytes([orient]) + regions + bytes([content, _SIG_VERSION])


# Central regions hashed besides the whole picture (share of each side kept, centred).
_REGION_SCALES = (0.9, 0.8)


def _regions(grey: Image.Image) -> list[Image.Image]:
    """The central 90% and 80% of the (trimmed) picture, then the picture mirrored.

    A copy cropped by 5% (10%) on every side is the original's central 90% (80%), and an
    original framed by a border is the copy's centre: their hashes then match across scales
    where whole-picture hashes differ by 15-30 bits. The mirrored hash finds horizontal flips."""
    from PIL import Image

    return [*_central(grey), grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]


def _central(grey: Image.Image) -> list[Image.Image]:
    """The central _REGION_SCALES of the picture (share of each side kept, centred)."""
    w, h = grey.size
    out = []
    for f in _REGION_SCALES:
        dx, dy = w * (1 - f) / 2, h * (1 - f) / 2
        box = (round(dx), round(dy), max(round(dx) + 1, round(w - dx)), max(round(dy) + 1, round(h - dy)))
        out.append(grey.crop(box))
    return out


@lru_cache(maxsize=1)
def _dct_matrix() -> np.ndarray:
    """32x32 DCT-II matrix, unnormalised as scipy's default (what imagehash.phash applies)."""
    n = np.arange(32)
    return 2 * np.cos(np.pi * np.outer(n, 2 * n + 1) / 64)


def _phashes(grey: Image.Image) -> tuple[str, bytes]:
    """imagehash.phash of the picture (hex), and of `_regions` (8 bytes each), in one batched DCT.

    The same bits as imagehash (32x32 Lanczos grey, 2-D DCT-II, the 8x8 low frequencies against
    their median) for a fifth less: the three resized greys share one matrix product, and the
    mirrored picture's DCT is the direct one with odd horizontal frequencies negated (a reversed
    sequence's DCT-II coefficient k is (-1)^k times the original's), so it needs no resize of its own."""
    from PIL import Image

    x = np.stack([np.asarray(g.resize((32, 32), Image.LANCZOS), np.float64) for g in (grey, *_central(grey))])
    c = _dct_matrix()
    low = (c @ x @ c.T)[:, :8, :8]
    # exact zeros (symmetric patterns such as stripes) stay zeros, as scipy's DCT leaves them:
    # the product's ~1e-13 residue would otherwise flip their bits against the median
    low[np.abs(low) < 1e-6] = 0.0
    low = np.concatenate([low, low[:1] * np.where(np.arange(8) % 2, -1.0, 1.0)])  # + the mirror's
    bits = low.reshape(len(low), 64) > np.median(low.reshape(len(low), 64), axis=1, keepdims=True)
    packed = np.packbits(bits, axis=1)
    return packed[0].tobytes().hex(), packed[1:].tobytes()


def trim_margins(grey: Image.Image, *, max_std: float = 3.0, keep: float = 0.3) -> Image.Image:
    """The picture inside black or white margins: edge rows/columns whose grey levels vary by at
    most ``max_std`` (letterbox bars, padding) are cut, as many from each of two opposite sides
    (tune split: recall 0.936 -> 0.950; telescope photos of fresh-tune 0.911 -> 0.894), never
    below ``keep`` of a side (0.5 missed a portrait picture letterboxed into 16:9: 38% of the
    width; 0.3 found it).
    A padded copy then hashes like its original; a flat image is returned whole."""
    box = margin_box(np.asarray(grey, dtype=np.float32), max_std=max_std, keep=keep)
    return grey if box is None else grey.crop(box)


def margin_box(g: np.ndarray, *, max_std: float = 3.0, keep: float = 0.3) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the picture inside black or white margins of a grey array
    (see `trim_margins`), or None when there are none."""
    if g.ndim != 2 or min(g.shape) < 8:
        return None

    def run(flat: np.ndarray) -> tuple[int, int]:
        n = len(flat)
        lead = int(np.argmin(flat)) if not flat.all() else n
        tail = int(np.argmin(flat[::-1])) if not flat.all() else n
        if lead + tail > n * (1 - keep):
            return 0, 0
        # The same width from both sides: padding and letterboxing centre the picture, while a
        # dark sky or a white studio background reaches the edges unevenly, and trimming that
        # would trim a copy differently once a caption or a frame covers one edge.
        return min(lead, tail), min(lead, tail)

    # Only black or white bands: a flat sky or wall at an edge is part of the picture, and
    # cutting it would depend on the resolution and JPEG noise of each copy.
    def flat(axis: int) -> np.ndarray:
        m = g.mean(axis)
        return (g.std(axis) <= max_std) & ((m <= 16) | (m >= 239))

    top, bottom = run(flat(1))
    left, right = run(flat(0))
    if top + bottom + left + right == 0:
        return None
    return left, top, g.shape[1] - right, g.shape[0] - bottom


def _hash_one(args: tuple[str, str]) -> tuple[str | None, bytes | None, str | None]:
    path, kind = args
    try:
        h, sig = hash_image(path, HashKind(kind))
        return h, sig, None
    except Exception as exc:  # noqa: BLE001 - one unreadable file must not stop the stage
        return None, None, type(exc).__name__


def hash_files(
    paths: Sequence[str | Path], kind: HashKind = HashKind.phash, *, show: bool = False
) -> Iterator[tuple[str | None, bytes | None, str | None]]:
    """(hash, signature, error name) per path, in order, using every core.

    JPEG decoding releases the GIL but the hashing around it does not, so threads stall at ~70%
    of two cores; forked worker processes (nothing re-imported) scale. Small batches use threads.
    """
    args = [(str(p), kind.value) for p in paths]
    workers = os.cpu_count() or 1
    description = f"dedup: {kind.value}"
    # Daemonic processes (e.g. Dask workers) may not have children: threads there.
    if (
        len(args) < 256 or workers == 1 or mp.current_process().daemon
        or "fork" not in mp.get_all_start_methods()
    ):
        yield from progress_map(_hash_one, args, description=description, show=show)
        return
    # Under an orchestrator that handles SIGTERM (Prefect), forked workers would inherit its
    # handler and print its termination traceback when the pool ends them: spawn there instead.
    ctx = worker_context(workers) or mp.get_context("fork")
    with ctx.Pool(workers, initializer=die_with_parent) as pool:
        yield from track(pool.imap(_hash_one, args, chunksize=32), total=len(args), description=description, show=show)


def hex_to_u64(values: Sequence[str]) -> np.ndarray:
    """Hex strings (16 digits) to uint64."""
    if not len(values):
        return np.empty(0, np.uint64)
    raw = bytes.fromhex("".join(v.rjust(16, "0") for v in values))
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64)


_SIG = 259 + 8 * (len(_REGION_SCALES) + 1)  # bytes of a guard signature (283)
_SIG_VERSION = 5  # last byte: a new layout or decode bumps it, and old signatures and hashes are recomputed


def thumbs_to_array(values: Sequence[bytes]) -> np.ndarray:
    """Guard signatures to an (n, 283) uint8 array (283 MB at a million images)."""
    if not len(values):
        return np.empty((0, _SIG), np.uint8)
    return np.frombuffer(b"".join(values), dtype=np.uint8).reshape(-1, _SIG)


def _corr(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-wise Pearson correlation, and each side's standard deviation."""
    ac, bc = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    asd, bsd = np.sqrt((ac * ac).mean(1)), np.sqrt((bc * bc).mean(1))
    return (ac * bc).mean(1) / np.maximum(asd * bsd, 1e-6), asd, bsd


def thumb_similar(a: np.ndarray, b: np.ndarray, min_corr: float, max_orient: int = 40) -> np.ndarray:
    """Row-wise guard on (k, 283) signatures: is the pair plausibly the same picture?

    The grey thumbnails must correlate >= min_corr at both 8x8 and 16x16 (Pearson: invariant to
    brightness, contrast and greyscale); two nearly flat 8x8 thumbnails (no layout to correlate)
    must have close means instead, and a flat one never matches a structured one. The fine-texture orientation must agree within
    ``max_orient``/255 (horizontal vs vertical stripes).
    """
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    orient_ok = np.abs(a[:, 256] - b[:, 256]) <= max_orient
    a16, b16 = a[:, :256], b[:, :256]
    a8 = a16.reshape(-1, 8, 2, 8, 2).mean((2, 4)).reshape(-1, 64)
    b8 = b16.reshape(-1, 8, 2, 8, 2).mean((2, 4)).reshape(-1, 64)
    c8, asd, bsd = _corr(a8, b8)
    c16, _, _ = _corr(a16, b16)
    # Below ~6 grey levels of spread, a thumbnail's "layout" is resampling and JPEG noise.
    flat_a, flat_b = asd < 6.0, bsd < 6.0
    close_means = np.abs(a8.mean(1) - b8.mean(1)) <= 8.0
    structured = (c8 >= min_corr) & (c16 >= min_corr)
    return orient_ok & np.where(flat_a & flat_b, close_means, ~(flat_a ^ flat_b) & structured)


# ---------------------------------------------------------------- all-pairs Hamming search

_MAX_CHUNK_BITS = 24


@lru_cache(maxsize=64)
def _layout(n: int, t: int) -> tuple[tuple[int, int], ...]:
    """(width, radius) per chunk for multi-index hashing, minimising a simple cost model.

    Pigeonhole, generalised: cut 64-bit hashes into chunks with radii r_i where sum(r_i + 1) > t;
    two hashes within t bits then differ in <= r_i bits in at least one chunk i (else the total
    would be >= sum(r_i + 1)). Probing every bucket within r_i of each chunk finds every pair.
    A chunk of b bits and radius r costs ~ ball(b, r) * n/2 probes plus as many * n/2^b candidate
    verifications; a dynamic programme over (bits used, radius budget used) picks the layout.
    """
    budget = t + 1
    inf = float("inf")
    best = [[(inf, ())] * (budget + 1) for _ in range(65)]
    best[0][0] = (0.0, ())
    for bits in range(65):
        for used in range(budget + 1):
            cost, chunks = best[bits][used]
            if cost == inf:
                continue
            for b in range(1, min(_MAX_CHUNK_BITS, 64 - bits) + 1):
                for r in range(0, max(1, budget - used)):
                    ball = sum(comb(b, k) for k in range(r + 1))
                    c = cost + ball * (n / 2) * (1 + n / 2**b) + 2**b / 16
                    nb, nu = bits + b, min(budget, used + r + 1)
                    if c < best[nb][nu][0]:
                        best[nb][nu] = (c, chunks + ((b, r),))
    # Chunks need not cover every bit: a pair within t bits is within t on any subset of bits.
    return min((best[bits][budget] for bits in range(1, 65)), key=lambda x: x[0])[1]


@dataclass
class _Chunk:
    """One chunk's dense table: items sorted by chunk value, bucket starts/counts, occupancy."""

    order: np.ndarray  # sorted position -> item index
    cs: np.ndarray  # sorted chunk values
    hs: np.ndarray  # full hashes in sorted order (verification reads them almost sequentially)
    cnt: np.ndarray
    start: np.ndarray
    occ: np.ndarray
    bits: int
    radius: int


def _build_chunk(h: np.ndarray, shift: int, b: int, r: int) -> _Chunk:
    c = ((h >> np.uint64(shift)) & np.uint64((1 << b) - 1)).astype(np.int32)
    order = np.argsort(c, kind="stable")
    cs = c[order]
    cnt = np.bincount(cs, minlength=1 << b).astype(np.int32)
    start = (np.cumsum(cnt, dtype=np.int64) - cnt).astype(np.int32 if len(h) < 2**31 else np.int64)
    return _Chunk(order, cs, h[order], cnt, start, (cnt > 0).astype(np.uint8), b, r)


def _verified(ch: _Chunk, pi: np.ndarray, pj: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
    keep = np.bitwise_count(ch.hs[pi] ^ ch.hs[pj]) <= t
    return ch.order[pi[keep]], ch.order[pj[keep]]


def _same_bucket_pairs(ch: _Chunk, t: int) -> list[tuple[np.ndarray, np.ndarray]]:
    n = len(ch.cs)
    pos = np.arange(n, dtype=np.int64)
    later = ch.start[ch.cs] + ch.cnt[ch.cs] - pos - 1
    nz = np.flatnonzero(later)
    if not nz.size:
        return []
    k = later[nz]
    pi = np.repeat(nz, k)
    pj = np.repeat(nz + 1 - (np.cumsum(k) - k), k) + np.arange(int(k.sum()))
    return [_verified(ch, pi, pj, t)]


def _flip_pairs(ch: _Chunk, hb: int, t: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pairs whose chunk values differ by a flip mask with highest bit ``hb`` (and <= radius bits).

    A pair whose chunks differ by f is probed once, from the side where bit hb is 0.
    """
    out = []
    sel = np.flatnonzero(((ch.cs >> hb) & 1) == 0).astype(ch.start.dtype)
    csel = ch.cs[sel]
    q_all = np.empty(sel.size, dtype=csel.dtype)
    hit = np.empty(sel.size, dtype=np.uint8)
    for w in range(ch.radius):
        for low in itertools.combinations(range(hb), w):
            f = (1 << hb) | sum(1 << x for x in low)
            np.bitwise_xor(csel, f, out=q_all)
            np.take(ch.occ, q_all, out=hit)
            nz = np.flatnonzero(hit)
            if not nz.size:
                continue
            q = q_all[nz]
            pi = sel[nz]
            pj = ch.start[q]
            i, j = _verified(ch, pi, pj, t)
            if i.size:
                out.append((i, j))
            # Buckets with several members (rare at the chosen chunk widths): the others.
            k = ch.cnt[q]
            multi = np.flatnonzero(k > 1)
            if multi.size:
                km = k[multi] - 1
                pi = np.repeat(pi[multi], km)
                pj = np.repeat(pj[multi] + 1 - (np.cumsum(km) - km), km) + np.arange(int(km.sum()))
                i, j = _verified(ch, pi, pj, t)
                if i.size:
                    out.append((i, j))
    return out


def near_pairs(hashes: np.ndarray, threshold: int, *, workers: int | None = None) -> np.ndarray:
    """All pairs of 64-bit hashes within ``threshold`` bits: an (k, 2) int64 array of i < j, sorted.

    Exact (no pair is missed), by multi-index hashing (see `_layout`): each chunk is indexed in a
    dense table and every bucket within the chunk's radius is probed, in numpy. Memory is
    O(n + 2^chunk_bits) per chunk; the probes run on ``workers`` threads (numpy releases the GIL).
    """
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(h)
    if n < 2:
        return np.empty((0, 2), np.int64)
    if n <= 2048:  # small: a dense popcount is simpler and just as fast
        d = np.bitwise_count(h[:, None] ^ h[None, :])
        i, j = np.nonzero(np.triu(d <= threshold, 1))
        return np.stack([i, j], 1).astype(np.int64)
    layout = _layout(n, threshold)
    shifts = np.cumsum([0, *[b for b, _ in layout[:-1]]])
    chunks = [_build_chunk(h, int(s), b, r) for s, (b, r) in zip(shifts, layout)]
    # Jobs, largest first so threads finish together: a chunk's probes for one top flip bit.
    jobs = [(k, hb) for k, ch in enumerate(chunks) for hb in range(ch.bits) if ch.radius > 0]
    jobs.sort(key=lambda kh: -sum(comb(kh[1], w) for w in range(chunks[kh[0]].radius)))
    jobs += [(k, -1) for k in range(len(chunks))]

    def job(kh: tuple[int, int]) -> list[tuple[np.ndarray, np.ndarray]]:
        k, hb = kh
        return _same_bucket_pairs(chunks[k], threshold) if hb < 0 else _flip_pairs(chunks[k], hb, threshold)

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as ex:
        parts = [p for ps in ex.map(job, jobs) for p in ps]
    if not parts:
        return np.empty((0, 2), np.int64)
    i = np.concatenate([p[0] for p in parts]).astype(np.int64)
    j = np.concatenate([p[1] for p in parts]).astype(np.int64)
    # A pair close in several chunks is found once per chunk.
    code = np.unique(np.minimum(i, j) * n + np.maximum(i, j))
    return np.stack([code // n, code % n], 1)


def candidate_pairs(hashes: np.ndarray, thumbs: np.ndarray, threshold: int) -> np.ndarray:
    """Pairs of images within ``threshold`` bits, with identical hashes collapsed first.

    Many images can share one hash (blank or low-texture images); comparing all of them pairwise
    is quadratic, so images with the same hash are ordered by thumbnail and compared with their
    next ``_SAME_HASH_WINDOW`` neighbours, and pairs of distinct hashes compare at most that many
    members of each side. Below those sizes (real duplicate groups) this is exact.
    """
    n = len(hashes)
    if n < 2:
        return np.empty((0, 2), np.int64)
    uniq, inverse = np.unique(hashes, return_inverse=True)
    key = thumbs.mean(1) if len(thumbs) else np.zeros(n)
    order = np.lexsort((np.arange(n), key, inverse))  # by hash, then thumbnail brightness
    inv_sorted = inverse[order]
    first = np.searchsorted(inv_sorted, np.arange(len(uniq)))
    size = np.bincount(inverse, minlength=len(uniq))
    out = []
    # same hash: each member with its next W neighbours in the group
    pos = np.arange(n)
    for d in range(1, _SAME_HASH_WINDOW + 1):
        ok = pos + d < first[inv_sorted] + size[inv_sorted]
        if not ok.any():
            break
        out.append(np.stack([order[pos[ok]], order[pos[ok] + d]], 1))
    up = near_pairs(uniq, threshold)
    if len(up):
        a, b = up[:, 0], up[:, 1]
        single = (size[a] == 1) & (size[b] == 1)
        out.append(np.stack([order[first[a[single]]], order[first[b[single]]]], 1))
        for ua, ub in up[~single]:
            ma = order[first[ua] : first[ua] + min(size[ua], _SAME_HASH_WINDOW)]
            mb = order[first[ub] : first[ub] + min(size[ub], _SAME_HASH_WINDOW)]
            out.append(np.stack(np.meshgrid(ma, mb, indexing="ij"), -1).reshape(-1, 2))
    if not out:
        return np.empty((0, 2), np.int64)
    p = np.concatenate(out).astype(np.int64)
    code = np.unique(p.min(1) * n + p.max(1))
    return np.stack([code // n, code % n], 1)


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected-component label per node (0..n-1) for an edge list."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    g = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(g, directed=False)[1]


def star_groups(order: np.ndarray, n: int, pairs: np.ndarray) -> np.ndarray:
    """Group id per node (-1: no group) without chaining: nodes are visited best first (``order``,
    a permutation of 0..n-1); an unassigned node with unassigned neighbours becomes a
    representative and takes exactly those neighbours. So every member matched its representative
    directly: A~B and B~C never pull C into A's group unless A~C."""
    group = np.full(n, -1, np.int64)
    if not len(pairs):
        return group
    from scipy.sparse import coo_matrix

    both = np.concatenate([pairs, pairs[:, ::-1]])
    adj = coo_matrix((np.ones(len(both), np.int8), (both[:, 0], both[:, 1])), shape=(n, n)).tocsr()
    indptr, indices = adj.indptr, adj.indices
    has_edge = np.diff(indptr) > 0
    gid = 0
    for i in order[has_edge[order]]:
        if group[i] >= 0:
            continue
        nb = indices[indptr[i] : indptr[i + 1]]
        nb = nb[group[nb] < 0]
        if nb.size:
            group[i] = gid
            group[nb] = gid
            gid += 1
    return group


# ---------------------------------------------------------------- more candidate families


def layout_vectors(thumbs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, mirrored vectors, has-layout mask) from (n, 283) guard signatures.

    A vector is the 8x8 grey thumbnail, mean-centred and L2-normalised, so an inner product is
    the thumbnails' Pearson correlation (brightness, contrast and greyscale drop out). An 8x8
    layout moves little under crops of 5-10% or a new border, unlike a 64-bit hash; mirroring
    the 8x8 grid gives the query that finds horizontal flips. Flat thumbnails have no layout.
    """
    t = np.asarray(thumbs[:, :256], np.float32).reshape(-1, 8, 2, 8, 2).mean((2, 4))
    t -= t.mean((1, 2), keepdims=True)
    sd = np.sqrt((t * t).mean((1, 2)))
    ok = sd >= 6.0  # the guard's flatness bound
    v = (t / np.maximum(sd, 1e-6)[:, None, None] / 8.0).reshape(-1, 64)
    m = (t[:, :, ::-1] / np.maximum(sd, 1e-6)[:, None, None] / 8.0).reshape(-1, 64)
    return np.ascontiguousarray(v, np.float32), np.ascontiguousarray(m, np.float32), ok


def centre_vectors(thumbs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like `layout_vectors`, from the central 10x10 of the 16x16 thumbnail: rotations of a few
    degrees (black corners), frames and title bars change the whole layout, not its centre."""
    t = np.asarray(thumbs[:, :256], np.float32).reshape(-1, 16, 16)[:, 3:13, 3:13].copy()
    t -= t.mean((1, 2), keepdims=True)
    sd = np.sqrt((t * t).mean((1, 2)))
    ok = sd >= 6.0
    v = (t / np.maximum(sd, 1e-6)[:, None, None] / 10.0).reshape(-1, 100)
    m = (t[:, :, ::-1] / np.maximum(sd, 1e-6)[:, None, None] / 10.0).reshape(-1, 100)
    return np.ascontiguousarray(v, np.float32), np.ascontiguousarray(m, np.float32), ok


# Exact search below this many vectors; an approximate index above (see the module docstring).
_EXACT_KNN = 20_000


def knn_pairs(x: np.ndarray, queries: list[np.ndarray], k: int, min_sim: float) -> list[np.ndarray]:
    """Per query set: (m, 2) int64 pairs (query row i, indexed row j), i != j, with inner product
    >= min_sim among each query's k nearest rows of ``x`` (faiss; rows L2-normalised)."""
    import faiss

    n, d = x.shape
    if n < 2:
        return [np.empty((0, 2), np.int64) for _ in queries]
    if n <= _EXACT_KNN:
        index = faiss.IndexFlatIP(d)
    else:
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = max(64, 2 * k)
    index.add(np.ascontiguousarray(x, np.float32))
    out = []
    kk = min(k + 1, n)
    for q in queries:
        sim, nb = index.search(np.ascontiguousarray(q, np.float32), kk)
        i = np.repeat(np.arange(len(q)), kk)
        j, s = nb.ravel(), sim.ravel()
        keep = (j >= 0) & (j != i) & (s >= min_sim)
        out.append(np.stack([i[keep], j[keep]], 1).astype(np.int64))
    return out


# Hamming radius of the region family's search (at most ``threshold``). Its 4n hashes make the
# search 4x larger than the hash family's, and multi-index cost grows steeply with the radius
# (4M random hashes, 2 busy cores: t=10 ~145 s, 8: 30 s, 6: 22 s, 4: 17 s); on the tune split 4 and
# 10 find the same copies (recall 0.934 either way, before the cell check: the layout, centre and flat families propose
# the rest), so the cheap radius keeps 1M images within the search budget.
_REGION_BITS = 4


def region_pairs(hashes: np.ndarray, thumbs: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """(direct pairs, mirrored pairs) of images whose hashes of the whole picture, its central
    90% and 80% (and, mirrored, the whole picture flipped) lie within ``threshold`` bits of each
    other, across scales: one search over 4n hashes (see `_regions`). A pair found through one
    image's mirrored hash is verified mirrored."""
    n = len(hashes)
    if n < 2:
        return np.empty((0, 2), np.int64), np.empty((0, 2), np.int64)
    r = thumbs[:, 257:257 + 8 * (len(_REGION_SCALES) + 1)].copy().view(">u8").astype(np.uint64)
    allh = np.concatenate([hashes, *r.T])
    # candidate_pairs orders identical hashes by the thumbnail mean: tile that, not the signatures
    p = candidate_pairs(allh, np.tile(thumbs.mean(1, keepdims=True), (len(_REGION_SCALES) + 2, 1)), threshold)
    m = len(_REGION_SCALES) + 1  # block of the mirrored hashes
    kind = p // n
    p = p % n
    flipped = (kind == m).sum(1) == 1
    keep = p[:, 0] != p[:, 1]
    return p[keep & ~flipped], p[keep & flipped]


# Keypoint family: each image's first _KP_DESCRIPTORS ORB descriptors, their _KP_NEIGHBOURS nearest
# (Hamming <= _KP_MAX_BITS of 256) among all images'; a pair needs _KP_VOTES descriptors voting
# for it. On fresh-tune (telescope photos), 64 / 48 bits / 5 votes propose 14 of the 16 framed,
# padded and captioned copies the hash and layout families miss (their hashes and layouts are the
# overlay's), with ~5 candidates an image.
_KP_DESCRIPTORS = 64
_KP_NEIGHBOURS = 5
_KP_MAX_BITS = 48
_KP_VOTES = 5
# Exact binary search up to this many descriptors (2,000 images: ~11 s on 2 cores, quadratic: 10k
# images ~250 s); HNSW above (10k images: ~65 s with random descriptors, the worst case).
_KP_EXACT = 128_000


def keypoint_pairs(descriptors: Sequence[np.ndarray], *, votes: int = _KP_VOTES) -> np.ndarray:
    """(m, 2) pairs i < j of images of which at least ``votes`` descriptors (of each image's first
    _KP_DESCRIPTORS) have one of the other's among their _KP_NEIGHBOURS nearest (faiss binary
    search, exact up to _KP_EXACT descriptors, HNSW above; Hamming <= _KP_MAX_BITS): a copy keeps
    the keypoints of its picture under a frame, a caption or padding that change its hash and layout."""
    import faiss

    descs = [np.asarray(d[:_KP_DESCRIPTORS], np.uint8) for d in descriptors]
    owner = np.concatenate([np.full(len(d), i, np.int64) for i, d in enumerate(descs)]) if descs else np.empty(0, np.int64)
    if len(np.unique(owner)) < 2:
        return np.empty((0, 2), np.int64)
    x = np.ascontiguousarray(np.concatenate(descs))
    if len(x) <= _KP_EXACT:
        index = faiss.IndexBinaryFlat(256)
    else:
        index = faiss.IndexBinaryHNSW(256, 16)
        index.hnsw.efSearch = 32
    index.add(x)
    dist, nb = index.search(x, _KP_NEIGHBOURS + 1)
    q = np.repeat(np.arange(len(x)), nb.shape[1])
    nb, dist = nb.ravel(), dist.ravel()
    keep = (nb >= 0) & (dist <= _KP_MAX_BITS)
    q, j = q[keep], owner[nb[keep]]
    i = owner[q]
    keep = i != j
    # one vote per descriptor and other image, then per pair of images (both directions count)
    qv = np.unique(np.stack([q[keep], j[keep]], 1), axis=0)
    a, b = owner[qv[:, 0]], qv[:, 1]
    pair, count = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], 1), axis=0, return_counts=True)
    return pair[count >= votes].astype(np.int64)


def _unique_pairs(p: np.ndarray, n: int) -> np.ndarray:
    if not len(p):
        return np.empty((0, 2), np.int64)
    code = np.unique(np.minimum(p[:, 0], p[:, 1]) * n + np.maximum(p[:, 0], p[:, 1]))
    return np.stack([code // n, code % n], 1)


def cached_embeddings(ws: Workspace, ids: Sequence[str]) -> tuple[str | None, np.ndarray, np.ndarray]:
    """(cache name, row indices into ``ids``, (m, D) embeddings) from the score stage's CLIP cache
    that covers most of ``ids`` (the cache folder per model is under stages/score/embeddings/)."""
    root = ws.root / "stages" / "score" / "embeddings"
    best: tuple[str | None, np.ndarray, np.ndarray] = (None, np.empty(0, np.int64), np.empty((0, 0), np.float32))
    if not root.is_dir():
        return best
    pos = {x: i for i, x in enumerate(ids)}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            frame = PartsTable(d, {"image_id": pl.Utf8, "embedding": pl.List(pl.Float32)}).read()
        except Exception:  # noqa: BLE001 - an unreadable cache is skipped, never fatal for dedup
            continue
        frame = frame.filter(pl.col("image_id").is_in(list(pos))).unique("image_id", keep="last", maintain_order=True)
        if frame.height > len(best[1]):
            rows = np.array([pos[x] for x in frame["image_id"].to_list()], np.int64)
            emb = np.asarray(frame["embedding"].to_list(), np.float32)
            emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            best = (d.name, rows, emb)
    return best


# ---------------------------------------------------------------- geometric verification

_ORB_SIDE = 480  # long side of the grey image ORB runs on
_ORB_FEATURES = 500


def _orb_grey(path: str | Path, mirror: bool) -> np.ndarray:
    """The grey image ORB runs on: 480 px on the long side, EXIF-upright, optionally mirrored."""
    from PIL import Image

    im = open_grey(path, draft=(_ORB_SIDE, _ORB_SIDE))
    scale = _ORB_SIDE / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
    if mirror:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(im)


def _keypoints(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    orb = cv2.ORB_create(nfeatures=_ORB_FEATURES, fastThreshold=10)
    kp, des = orb.detectAndCompute(grey, None)
    if des is None or not kp:
        return np.empty((0, 2), np.float32), np.empty((0, 32), np.uint8)
    return np.array([p.pt for p in kp], np.float32), des


def orb_features(path: str | Path, *, mirror: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(keypoints (k, 2) float32 in a 480-px long-side frame, descriptors (k, 32) uint8)."""
    return _keypoints(_orb_grey(path, mirror))


# Content check: the pair's greys at 1/_CONTENT_DIV of the ORB frame (120 px), blurred a little so
# RANSAC's few-pixel misalignment and JPEG noise do not decide the correlation.
_CONTENT_DIV = 4
# Local check: the pair's greys at 1/_DETAIL_DIV of the ORB frame (240 px), in _CELLS x _CELLS cells.
_DETAIL_DIV = 2
_CELLS = 5


def content_grey(grey: np.ndarray, box: tuple[int, int, int, int] | None, div: int) -> np.ndarray:
    """The small float32 grey the content checks compare (from the 480-px ORB grey, 1/``div``),
    NaN on black or white margins (``box``: `margin_box` of ``grey``): padding and letterbox bars
    are no content, and a padded copy compared with a framed one would otherwise disagree on them."""
    import cv2

    h, w = grey.shape
    small = cv2.resize(grey, (max(1, round(w / div)), max(1, round(h / div))), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small.astype(np.float32), (3, 3), 0)
    if box is not None:
        left, top, right, bottom = (round(x / div) for x in box)
        keep = np.zeros(small.shape, bool)
        keep[top:bottom, left:right] = True
        small[~keep] = np.nan
    return small


def _filled(g: np.ndarray) -> np.ndarray:
    """``g`` with its margins (NaN) at the picture's mean, for methods that take no mask."""
    ok = np.isfinite(g)
    return g if ok.all() else np.where(ok, g, np.float32(g[ok].mean() if ok.any() else 0.0))


@dataclass
class Match:
    """One verified pair: ORB inliers of the RANSAC similarity (0: no transform within scale
    0.5-2 and 20 degrees) and, when there is one, the grey correlation of the overlap after
    warping (``ncc``), the overlap's share of the smaller picture (``overlap``) and the share of
    its cells that agree (``cells``)."""

    inliers: int = 0
    ncc: float = -1.0
    overlap: float = 0.0
    ecc: bool = False  # aligned by intensity (`ecc_alignment`), no keypoint geometry
    cells: float = 0.0  # share of the overlap's textured cells that agree (`cell_agreement`)
    aniso: float = 1.0  # ECC's affine warp: its larger scale over its smaller (1: a similarity)
    scale: float = 1.0  # ECC's warp: geometric mean of its scales (both pictures' content at one width)


def _similarity(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[int, np.ndarray | None]:
    """(inliers, 2x3 transform a -> b) of ratio-tested ORB matches under one RANSAC similarity of
    scale 0.5-2 and rotation within 20 degrees, or (0, None)."""
    import cv2

    none = (0, None)
    (pa, da), (pb, db) = a, b
    if len(da) < 8 or len(db) < 8:
        return none
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
    good = [m[0] for m in matcher.knnMatch(da, db, k=2) if len(m) == 2 and m[0].distance < 0.8 * m[1].distance]
    if len(good) < 8:
        return none
    src = pa[[m.queryIdx for m in good]]
    dst = pb[[m.trainIdx for m in good]]
    M, inl = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=5.0, maxIters=2000)
    if M is None or inl is None:
        return none
    scale = float(np.hypot(M[0, 0], M[1, 0]))
    angle = abs(float(np.degrees(np.arctan2(M[1, 0], M[0, 0]))))
    if not (0.5 <= scale <= 2.0) or angle > 20.0:
        return none
    return int(inl.sum()), M


def geometric_inliers(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> int:
    """ORB matches (ratio test) consistent with one similarity transform (RANSAC) of scale
    0.5-2 and rotation within 20 degrees: copies, resizes, crops, borders and small rotations
    keep tens to hundreds; unrelated pictures, and low-texture ones with few corners, a handful."""
    return _similarity(a, b)[0]


def _warp_onto(ga: np.ndarray, gb: np.ndarray, M: np.ndarray, div: int) -> np.ndarray:
    """``gb`` warped onto ``ga``'s frame by ``M`` (a -> b in the ORB frame; greys at 1/``div``), NaN outside."""
    import cv2

    m = M.astype(np.float64).copy()
    m[:, 2] /= div  # same linear part, translation in the small frame
    h, w = ga.shape
    return cv2.warpAffine(gb, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=float("nan"))


def warped_content(ga: np.ndarray, gb: np.ndarray, M: np.ndarray) -> tuple[float, float]:
    """(grey correlation over the overlap, the overlap's share of the smaller picture) of ``gb``
    warped onto ``ga`` by ``M`` (the a -> b similarity in the ORB frame; ``ga``, ``gb`` from
    `content_grey`).

    Keypoints alone accept two different pictures that share an overlay (a login dialog, a
    logo, a caption block): their inliers all sit on it, and the rest of the picture does not
    agree. A copy's pixels agree everywhere (brightness, contrast and greyscale drop out of a
    correlation), also when it is so flat that it keeps few keypoints."""
    # margins are NaN and stay NaN through the warp; outside b is NaN too
    wb = _warp_onto(ga, gb, M, _CONTENT_DIV)
    m = M.astype(np.float64)
    mask = np.isfinite(ga) & np.isfinite(wb)
    area = int(mask.sum())
    scale2 = float(m[0, 0] ** 2 + m[1, 0] ** 2)  # area factor a -> b
    na, nb = max(1, int(np.isfinite(ga).sum())), max(1, int(np.isfinite(gb).sum()))
    overlap = max(area / na, min(1.0, area * scale2 / nb))
    if area < 64:
        return -1.0, overlap
    x, y = ga[mask], wb[mask]
    xc, yc = x - x.mean(), y - y.mean()
    den = float(np.sqrt((xc * xc).sum() * (yc * yc).sum()))
    return (float((xc * yc).sum() / den) if den > 1e-6 else -1.0), overlap


# A cell counts when either picture varies in it by >= _CELL_STD grey levels (below: JPEG noise,
# flat paper), and agrees when its correlation is >= _CELL_NCC: structure in one picture and not
# in the other is a disagreement.
_CELL_STD = 1.0
_CELL_NCC = 0.5


def cell_agreement(da: np.ndarray, db: np.ndarray, M: np.ndarray) -> float:
    """Share of the overlap's textured cells (a _CELLS x _CELLS grid over ``da``, cells at least
    half covered, either picture varying by >= _CELL_STD) whose greys correlate >= _CELL_NCC after
    warping ``db`` by ``M``; 1.0 when no cell is textured (``da``, ``db``: `content_grey` at
    1/_DETAIL_DIV).

    One correlation over the whole overlap is decided by its strongest structure: two different
    near-flat pictures under one login screen correlate like copies (0.7-0.98), the overlay being
    all the contrast there is. Cell by cell, the backgrounds count as much as the overlay (tune
    split and its login-screen probe, see the module docstring: such pairs <= 0.72 of cells at a
    whole-overlap correlation < 0.9, paper textures <= 0.16 above; copies mostly 1.0)."""
    wb = _warp_onto(da, db, M, _DETAIL_DIV)
    h, w = da.shape
    rows = np.minimum(np.arange(h) * _CELLS // h, _CELLS - 1)
    cols = np.minimum(np.arange(w) * _CELLS // w, _CELLS - 1)
    cell = (rows[:, None] * _CELLS + cols[None, :]).ravel()
    ok = (np.isfinite(da) & np.isfinite(wb)).ravel()
    c, x, y = cell[ok], da.ravel()[ok].astype(np.float64), wb.ravel()[ok].astype(np.float64)
    k = _CELLS * _CELLS
    n = np.bincount(c, minlength=k).astype(np.float64)
    size = np.bincount(cell, minlength=k)

    def s(v: np.ndarray) -> np.ndarray:
        return np.bincount(c, weights=v, minlength=k)

    with np.errstate(invalid="ignore", divide="ignore"):
        mx, my = s(x) / n, s(y) / n
        vx, vy = np.maximum(s(x * x) / n - mx * mx, 0), np.maximum(s(y * y) / n - my * my, 0)
        cov = s(x * y) / n - mx * my
        textured = (n >= 0.5 * size) & (n > 1) & (np.maximum(vx, vy) >= _CELL_STD**2)
        if not textured.any():
            return 1.0
        r = cov[textured] / np.sqrt(vx[textured] * vy[textured])  # NaN (no agreement) where one is flat
    return float((r >= _CELL_NCC).mean())


# Verification keeps at most this many images' features (~130 kB each: ~2.6 GB).
_MAX_FEATURES = 20_000

# Intensity alignment is tried on pairs without keypoint geometry whose 8x8 layouts correlate
# this much, and accepted when the aligned overlap correlates >= _ECC_NCC (tune split: unrelated
# candidates <= 0.933, copies of stripes and smooth shapes 0.958-1.0).
_ECC_MIN_LAYOUT = 0.8
_ECC_NCC = 0.955
# ECC fits an affine warp when the aspects differ; a copy's is near a similarity (a one-sided 10%
# crop changes the aspect by 1.11; stripes, periodic across, drift to 1.21), while an affine warp
# can stretch one smooth picture onto another (a sky over a hillside onto a sky over mountains).
# Tune splits: copies accepted by ECC <= 1.155, different pictures aligned to >= 0.955 from 1.30.
_ECC_MAX_ANISO = 1.3
# Both pictures' content is compared at one width, so a copy's warp keeps the scale but for crops
# (10% a side: 0.8-1.25) and frames; a warp that zooms in 1.5-2x matches a detail of one smooth
# picture to the whole of another. Tune splits: every ECC alignment of two copies 0.76-1.29.
_ECC_SCALE = (0.75, 1 / 0.75)


def _area_resize(g: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    return cv2.resize(g, size, interpolation=cv2.INTER_AREA)


def ecc_alignment(ga: np.ndarray, gb: np.ndarray) -> np.ndarray | None:
    """2x3 warp a -> b in the ORB frame found by intensity alignment (OpenCV's ECC: rigid for
    equal sizes, affine otherwise), started from the two pictures' centres at equal area: for pairs
    without keypoints to match (stripes, smooth shapes); None when it does not converge."""
    import cv2

    s = float(np.sqrt(gb.size / ga.size))
    m = np.array([[s, 0, (gb.shape[1] - s * ga.shape[1]) / 2], [0, s, (gb.shape[0] - s * ga.shape[0]) / 2]], np.float32)
    try:
        _, m = cv2.findTransformECC(ga, gb, m, cv2.MOTION_EUCLIDEAN if abs(s - 1) < 0.02 else cv2.MOTION_AFFINE,
                                    (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 50, 1e-4), None, 3)
    except cv2.error:
        return None
    m = m.astype(np.float64)
    m[:, 2] *= _CONTENT_DIV
    return m


Features = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def match_pair(a: Features, b: Features) -> Match:
    """`Match` of two (keypoints, descriptors, content grey, detail grey) features (see `Verifier`)."""
    inl, M = _similarity(a[:2], b[:2])
    ca, cb = a[2].astype(np.float32), b[2].astype(np.float32)
    ecc = M is None
    if ecc:
        # No keypoint geometry: align by intensity, only pairs whose coarse layouts already agree
        # (ECC costs ~10 ms a pair; most candidates are unrelated).
        la, lb = (_area_resize(_filled(g), (8, 8)).ravel() for g in (ca, cb))
        if la.std() < 1.0 or lb.std() < 1.0 or np.corrcoef(la, lb)[0, 1] < _ECC_MIN_LAYOUT:
            return Match()
        M = ecc_alignment(_filled(ca), _filled(cb))
        if M is None:
            return Match()
    ncc, overlap = warped_content(ca, cb, M)
    cells = cell_agreement(a[3].astype(np.float32), b[3].astype(np.float32), M)
    sv = np.linalg.svd(M[:, :2], compute_uv=False)
    return Match(inl, ncc, overlap, ecc=ecc, cells=cells, aniso=float(sv[0] / max(sv[1], 1e-9)), scale=float(np.sqrt(sv[0] * sv[1])))


class Verifier:
    """Verification of candidate pairs: ORB + RANSAC geometry, then the content of the overlap
    (`warped_content`). Features are computed once per image (and per mirrored image) in this
    run, on threads (OpenCV and JPEG decoding release the GIL).

    A pair is accepted with ``min_inliers`` inliers and an overlap correlating >= ``min_ncc``, or
    with ``few_inliers`` (a flat picture keeps few keypoints) and >= ``flat_ncc``; the overlap
    must cover ``min_overlap`` of the smaller picture, and ``min_cells`` of its textured cells
    must agree (`cell_agreement`), ``doubt_cells`` when the whole overlap correlates below
    ``sure_ncc``. With ``min_inliers`` inliers and ``agree_cells`` of the cells agreeing, the whole
    correlation is not needed: on a near-black picture (a telescope photo) a caption or a window
    frame is most of the contrast, so a copy's overlap correlates 0.3-0.6 as a whole while its cells
    agree; and two different dark pictures in one window frame correlate 0.92-0.95 as a whole on the
    frame, their cells 0.52-0.64 (hence ``sure_ncc`` 0.96). Pairs without keypoint geometry are
    aligned by ECC (`match_pair`) and need ``_ECC_NCC``. Tuned on the real-photo benchmark's tune
    split (see the module docstring): copies with >= 20 inliers correlate >= 0.87 (95%; the lowest
    are hue shifts and large captions), the look-alike scene it kept (the same toy blocks, other
    letters) <= 0.65, and copies with 8-19 inliers that correlate >= 0.9 are all true."""

    def __init__(self, paths: Sequence[Path], min_inliers: int, *, min_ncc: float = 0.6, few_inliers: int = 8,
                 flat_ncc: float = 0.9, min_overlap: float = 0.5, min_cells: float = 0.5, doubt_cells: float = 0.8,
                 sure_ncc: float = 0.96, agree_cells: float = 0.84, record: bool = False,
                 max_features: int = _MAX_FEATURES):
        self.paths = paths
        self.min_cells, self.doubt_cells, self.sure_ncc, self.agree_cells = min_cells, doubt_cells, sure_ncc, agree_cells
        self.min_inliers = min_inliers
        self.min_ncc, self.few_inliers, self.flat_ncc = min_ncc, few_inliers, flat_ncc
        self.min_overlap = min_overlap
        # Features of the images of recent pairs, least recently used first; at most max_features
        # (~130 kB each), so memory stays bounded at any catalog size (`verify`).
        self.features: OrderedDict[tuple[int, bool], Features] = OrderedDict()
        self.max_features = max(2, max_features)
        # with ``record``: every pair verified -> its Match (for diagnostics; off at scale)
        self.record = record
        self.matches: dict[tuple[int, int, bool], Match] = {}

    def _feat(self, key: tuple[int, bool]) -> Features:
        try:
            g = _orb_grey(self.paths[key[0]], key[1])
            box = margin_box(g.astype(np.float32))
            # greys kept as float16 (NaN margins survive): ~80 kB of features an image
            return (*_keypoints(g), *(content_grey(g, box, d).astype(np.float16) for d in (_CONTENT_DIV, _DETAIL_DIV)))
        except Exception:  # noqa: BLE001 - an unreadable file verifies nothing
            flat = np.zeros((1, 1), np.float16)
            return np.empty((0, 2), np.float32), np.empty((0, 32), np.uint8), flat, flat

    def accept(self, m: Match) -> bool:
        if m.overlap < self.min_overlap or m.cells < (self.min_cells if m.ncc >= self.sure_ncc else self.doubt_cells):
            return False
        if m.ecc:
            return m.ncc >= _ECC_NCC and m.aniso <= _ECC_MAX_ANISO and _ECC_SCALE[0] <= m.scale <= _ECC_SCALE[1]
        if m.inliers < self.few_inliers:
            return False
        if m.inliers >= self.min_inliers and m.cells >= self.agree_cells:
            return True
        return m.ncc >= (self.min_ncc if m.inliers >= self.min_inliers else self.flat_ncc)

    def verify(self, pairs: np.ndarray, mirror: np.ndarray, *, show: bool = False) -> np.ndarray:
        """Bool per pair: accepted (see the class); ``mirror`` (bool per pair): match i against j mirrored.

        Pairs are taken in order of their first image, in chunks whose images' features fit in
        ``max_features``: features of a chunk are computed (on threads) or reused, then the oldest
        others are dropped. A catalog bigger than that recomputes some features (~5 ms an image)
        rather than holding all of them (~130 GB at 1M images)."""
        out = np.zeros(len(pairs), bool)
        order = np.lexsort((pairs[:, 1], pairs[:, 0])) if len(pairs) else np.empty(0, np.int64)
        start = 0
        while start < len(order):
            chunk_keys: set[tuple[int, bool]] = set()
            stop = start
            while stop < len(order):
                k = order[stop]
                new = {(int(pairs[k, 0]), False), (int(pairs[k, 1]), bool(mirror[k]))} - chunk_keys
                if chunk_keys and len(chunk_keys) + len(new) > self.max_features:
                    break
                chunk_keys |= new
                stop += 1
            idx = order[start:stop]
            self._load(chunk_keys, show)
            out[idx] = list(progress_map(lambda k: self._one(pairs, mirror, int(k)), idx, description="dedup: match", show=False))
            start = stop
        return out

    def descriptors(self, rows: Iterable[int], *, show: bool = False) -> list[np.ndarray]:
        """The ORB descriptors of each row's image, through the feature cache (in chunks of
        ``max_features``, so what fits stays cached for the pairs verified next)."""
        rows = list(rows)
        out: list[np.ndarray] = []
        step = self.max_features
        for start in range(0, len(rows), step):
            keys = [(int(r), False) for r in rows[start:start + step]]
            self._load(set(keys), show)
            out += [self.features[k][1] for k in keys]
        return out

    def _load(self, keys: set[tuple[int, bool]], show: bool) -> None:
        """Features of ``keys`` in the cache, most recently used; the oldest others dropped."""
        todo = sorted(keys - self.features.keys())
        for key in keys & self.features.keys():
            self.features.move_to_end(key)
        while self.features and len(self.features) + len(todo) > self.max_features:
            self.features.popitem(last=False)
        for key, f in zip(todo, progress_map(self._feat, todo, description="dedup: verify", show=show)):
            self.features[key] = f

    def _one(self, pairs: np.ndarray, mirror: np.ndarray, k: int) -> bool:
        i, j, mi = int(pairs[k, 0]), int(pairs[k, 1]), bool(mirror[k])
        m = match_pair(self.features[(i, False)], self.features[(j, mi)])
        if self.record:
            self.matches[(i, j, mi)] = m
        return self.accept(m)


def group_by_representative(
    order: np.ndarray, n: int, pairs: np.ndarray, verifier: "Verifier", *, rounds: int = 2, show: bool = False
) -> tuple[np.ndarray, np.ndarray, int]:
    """(group id per node, -1 for none; the accepted pairs, grown; (pairs proposed, accepted)) by `star_groups`.

    A copy whose match is a member but not the representative (the representative is, say, a
    padded or larger copy the candidate families did not pair it with) gets a second chance:
    each accepted pair (i, j) across groups proposes (i, representative of j's group), verified
    directly (then mirrored) like any candidate. Membership still needs a direct match with the
    representative, so this never chains.
    """
    added = proposed = 0
    for _ in range(rounds + 1):
        group = star_groups(order, n, pairs)
        if not len(pairs) or _ == rounds:
            break
        rep_of = np.full(n, -1, np.int64)
        pos = np.empty(n, np.int64)
        pos[order] = np.arange(n)
        g_nodes = np.flatnonzero(group >= 0)
        # the representative of a group is its best-ranked node
        best = {}
        for i in g_nodes[np.argsort(pos[g_nodes])]:
            best.setdefault(int(group[i]), int(i))
        rep_of[g_nodes] = [best[int(group[i])] for i in g_nodes]
        both = np.concatenate([pairs, pairs[:, ::-1]])
        i, j = both[:, 0], both[:, 1]
        cross = (rep_of[j] >= 0) & (group[i] != group[j])
        prop = _unique_pairs(np.stack([i[cross], rep_of[j[cross]]], 1), n)
        prop = prop[prop[:, 0] != prop[:, 1]]
        prop = prop[~np.isin(_codes(prop, n), _codes(pairs, n))] if len(prop) else prop
        if not len(prop):
            break
        proposed += len(prop)
        ok = verifier.verify(prop, np.zeros(len(prop), bool), show=show)
        if (~ok).any():
            ok[~ok] = verifier.verify(prop[~ok], np.ones(int((~ok).sum()), bool), show=show)
        if not ok.any():
            break
        added += int(ok.sum())
        pairs = _unique_pairs(np.concatenate([pairs, prop[ok]]), n)
    return group, pairs, (proposed, added)


def _codes(p: np.ndarray, n: int) -> np.ndarray:
    return np.minimum(p[:, 0], p[:, 1]) * n + np.maximum(p[:, 0], p[:, 1])


def find_pairs(
    hashes: np.ndarray,
    thumbs: np.ndarray,
    paths: Sequence[Path],
    settings: DedupSettings,
    *,
    embeddings: tuple[np.ndarray, np.ndarray] | None = None,
    verifier: "Verifier | None" = None,
    show: bool = False,
) -> tuple[np.ndarray, dict[str, dict[str, int]]]:
    """Accepted near-duplicate pairs (k, 2) of i < j, and per family {candidates, accepted}.

    Families, each verified (`Verifier`: geometry, then the warped content) before a pair is accepted:
    - ``hash``: pHash within ``threshold`` bits; accepted on the thumbnail guard alone within
      ``strong_bits``, else by geometric verification (ORB + RANSAC).
    - ``region`` / ``region_mirror``: hashes of the central 90%/80% and of the mirrored picture
      within ``threshold`` bits across scales (`region_pairs`); geometric verification.
    - ``layout`` / ``mirror``: the ``layout_k`` nearest 8x8 thumbnail layouts (and mirrored
      layouts) correlating >= ``layout_min_corr``; geometric verification (mirrored for flips).
      ``centre`` / ``centre_mirror`` likewise on the thumbnail's centre (`centre_vectors`), and
      ``flat`` / ``flat_mirror``: the nearest among images without a layout (`layout_vectors`).
    - ``embedding``: ``embeddings`` = (row indices, L2-normalised vectors): the ``embedding_k``
      nearest with cosine >= ``embedding_min_cos``; verified directly, else mirrored.
    """
    n = len(hashes)
    fam: dict[str, dict[str, int]] = {}
    if n < 2:
        return np.empty((0, 2), np.int64), fam
    verifier = verifier or Verifier(paths, settings.min_inliers)
    accepted: list[np.ndarray] = []
    tried = np.empty(0, np.int64)  # codes of pairs already verified (directly / mirrored)
    tried_m = np.empty(0, np.int64)

    def acc_codes() -> np.ndarray:
        return np.concatenate([_codes(a, n) for a in accepted]) if accepted else np.empty(0, np.int64)

    def verify(name: str, p: np.ndarray, mirror: bool) -> np.ndarray:
        nonlocal tried, tried_m
        p = _unique_pairs(p, n)
        c = _codes(p, n)
        fresh = ~np.isin(c, acc_codes()) & ~np.isin(c, tried_m if mirror else tried)
        p, c = p[fresh], c[fresh]
        if mirror:
            tried_m = np.concatenate([tried_m, c])
        else:
            tried = np.concatenate([tried, c])
        ok = verifier.verify(p, np.full(len(p), mirror), show=show) if len(p) else np.zeros(0, bool)
        f = fam.setdefault(name, {"candidates": 0, "accepted": 0})
        f["candidates"] += len(p)
        f["accepted"] += int(ok.sum())
        accepted.append(p[ok])
        return p[~ok]

    # hash family: the guard decides close pairs; the rest need geometry
    p = candidate_pairs(hashes, thumbs, settings.threshold)
    fam["hash"] = {"candidates": len(p), "accepted": 0, "guard": 0}
    if len(p):
        d = np.bitwise_count(hashes[p[:, 0]] ^ hashes[p[:, 1]])
        guard = thumb_similar(thumbs[p[:, 0]], thumbs[p[:, 1]], settings.min_thumb_corr)
        strong = guard & (d <= settings.strong_bits)
        accepted.append(p[strong])
        fam["hash"]["guard"] = int(strong.sum())
        verify("hash", p[~strong], False)
        fam["hash"]["candidates"] = len(p)  # verify() counted the rest again
        fam["hash"]["accepted"] += int(strong.sum())
    if settings.regions:
        direct, mirrored = region_pairs(hashes, thumbs, min(settings.threshold, _REGION_BITS))
        verify("region", direct, False)
        verify("region_mirror", mirrored, True)
    if settings.layout:
        v, m, ok = layout_vectors(thumbs)
        rows = np.flatnonzero(ok)
        low = min(settings.layout_min_corr, settings.mirror_min_corr)
        direct, mirrored = knn_pairs(v[rows], [v[rows], m[rows]], settings.layout_k, low)
        # kNN pairs carry no scores: re-check each family's own threshold on the vectors
        direct = direct[np.einsum("ij,ij->i", v[rows[direct[:, 0]]], v[rows[direct[:, 1]]]) >= settings.layout_min_corr]
        mirrored = mirrored[np.einsum("ij,ij->i", m[rows[mirrored[:, 0]]], v[rows[mirrored[:, 1]]]) >= settings.mirror_min_corr]
        verify("layout", rows[direct], False)
        verify("mirror", rows[mirrored], True)
        c, cm, cok = centre_vectors(thumbs)
        rows = np.flatnonzero(cok)
        direct, mirrored = knn_pairs(c[rows], [c[rows], cm[rows]], settings.layout_k, low)
        direct = direct[np.einsum("ij,ij->i", c[rows[direct[:, 0]]], c[rows[direct[:, 1]]]) >= settings.layout_min_corr]
        mirrored = mirrored[np.einsum("ij,ij->i", cm[rows[mirrored[:, 0]]], c[rows[mirrored[:, 1]]]) >= settings.mirror_min_corr]
        verify("centre", rows[direct], False)
        verify("centre_mirror", rows[mirrored], True)
        # Flat layouts (paper, fabric, soft gradients) have no layout to correlate and a hash of
        # noise: their nearest flat neighbours, whatever the correlation, go to verification.
        flat = np.flatnonzero(~ok)
        direct, mirrored = knn_pairs(v[flat], [v[flat], m[flat]], settings.layout_k, -1.0)
        verify("flat", flat[direct], False)
        verify("flat_mirror", flat[mirrored], True)
    if settings.keypoints and n <= settings.keypoint_max_images:
        verify("keypoints", keypoint_pairs(verifier.descriptors(range(n), show=show)), False)
    if embeddings is not None and len(embeddings[0]) >= 2:
        rows, emb = embeddings
        (cand,) = knn_pairs(emb, [emb], settings.embedding_k, settings.embedding_min_cos)
        left = verify("embedding", rows[cand], False)
        if len(left):
            before = fam["embedding"]["accepted"]
            verify("embedding_mirror", left, True)
            fam["embedding"]["accepted"] = before + fam.pop("embedding_mirror")["accepted"]
    out = _unique_pairs(np.concatenate(accepted), n) if accepted else np.empty((0, 2), np.int64)
    return out, fam


# ---------------------------------------------------------------- stage


def _signatures(ws: Workspace) -> PartsTable:
    return PartsTable(ws.stage_dir("dedup") / "signatures", {"image_id": pl.Utf8, "sig": pl.Binary})


def _write_signatures(ws: Workspace, ids: list[str], sigs: list[bytes]) -> None:
    _signatures(ws).append(pl.DataFrame({"image_id": ids, "sig": sigs}, schema={"image_id": pl.Utf8, "sig": pl.Binary}))


def read_signatures(ws: Workspace) -> pl.DataFrame:
    """image_id -> guard signature (283 bytes), from the stage's cache.

    Kept out of the catalog (283 bytes an image) so other stages do not carry it; a signature
    depends only on the stored bytes, so duplicates in the cache are identical.
    """
    sigs = _signatures(ws).read()
    current = pl.col("sig").bin.slice(_SIG - 1, 1) == bytes([_SIG_VERSION])
    return sigs.filter((pl.col("sig").bin.size() == _SIG) & current).unique("image_id", keep="first", maintain_order=True)


def _compact_signatures(ws: Workspace, sigs: pl.DataFrame) -> None:
    """One file instead of one per checkpoint (call under the catalog lock)."""
    table = _signatures(ws)
    if len(table.parts()) > 1:
        table.compact(sigs.sort("image_id"))


def hash_partition(root: str, kind: str, version: int, redo: list[str], key: str) -> pl.DataFrame:
    """Worker side of a cluster run: hash the stored rows of catalog partition ``key`` (at
    ``version``) that lack a hash of ``kind`` or are in ``redo`` (hashed, signature missing), write
    their signatures, and return image_id, phash, hash_kind, error (null when hashed)."""
    ws = Workspace(root)
    part = catalog.ensure_columns(catalog.read_partition(ws, key, version), COLUMNS)
    rows = part.filter(
        pl.col("path").is_not_null()
        & (pl.col("phash").is_null() | pl.col("hash_kind").ne_missing(kind) | pl.col("image_id").is_in(redo))
    ).select("image_id", "path")
    got = list(hash_files([ws.abspath(p) for p in rows["path"].to_list()], HashKind(kind)))
    ok = [(i, sig) for i, (_, sig, _) in zip(rows["image_id"].to_list(), got) if sig is not None]
    # Concurrent tasks append their own part files (unique names): no two writers share one.
    _write_signatures(ws, [i for i, _ in ok], [sig for _, sig in ok])
    return pl.DataFrame(
        {"image_id": rows["image_id"].to_list(), "phash": [h for h, _, _ in got],
         "hash_kind": [kind if h is not None else None for h, _, _ in got], "error": [e for _, _, e in got]},
        schema={"image_id": pl.Utf8, "phash": pl.Utf8, "hash_kind": pl.Utf8, "error": pl.Utf8},
    )


def _hash_on_cluster(manifest: Manifest, ws: Workspace, todo: pl.DataFrame, summary: DedupSummary, address: str) -> None:
    """``_hash_rows`` partition-wise on Dask: every task reads one snapshot of the catalog and
    selects what ``todo`` holds in its partition; hashes are committed here, in checkpoints."""
    from curation import cluster

    kind = manifest.dedup.hash.value
    version = catalog.version(ws)
    # What a worker cannot see in its partition: rows hashed already whose signature is missing.
    redo = todo.filter(pl.col("phash").is_not_null() & (pl.col("hash_kind") == kind))["image_id"].to_list()
    done: list[pl.DataFrame] = []

    def flush() -> None:
        ok = pl.concat(done).filter(pl.col("phash").is_not_null()).drop("error") if done else None
        if ok is not None and ok.height:
            catalog.merge(ws, ok, declare=COLUMNS)  # as in-process: only these rows' hash columns
        done.clear()

    with cluster.connect(address) as client:
        keys = cluster.partitions_holding(ws, todo["image_id"].to_list())
        for _, got in cluster.map_partitions(client, hash_partition, keys, str(ws.root), kind, version, redo):
            for err in got.filter(pl.col("phash").is_null())["error"].to_list():
                summary.hash_failed += 1
                summary.failures[err] = summary.failures.get(err, 0) + 1
            summary.hashed += int(got["phash"].is_not_null().sum())
            done.append(got)
            if sum(f.height for f in done) >= _CHECKPOINT:
                flush()
    flush()


def _hash_rows(
    manifest: Manifest, ws: Workspace, todo: pl.DataFrame, summary: DedupSummary, show: bool,
    dask_address: str | None = None,
) -> None:
    """Hash rows in ``todo`` (image_id, path) and checkpoint results into the catalog."""
    if dask_address:
        return _hash_on_cluster(manifest, ws, todo, summary, dask_address)
    kind = manifest.dedup.hash
    rows = list(todo.select("image_id", "path").iter_rows())
    done: list[tuple] = []

    def flush() -> None:
        ok = [r for r in done if r[1] is not None]
        if ok:
            # Signatures first: a crash before the catalog write only means hashing these again.
            _write_signatures(ws, [r[0] for r in ok], [r[2] for r in ok])
            upd = pl.DataFrame(
                {"image_id": [r[0] for r in ok], "phash": [r[1] for r in ok], "hash_kind": [kind.value] * len(ok)},
                schema={"image_id": pl.Utf8, "phash": pl.Utf8, "hash_kind": pl.Utf8},
            )
            catalog.merge(ws, upd, declare=COLUMNS)  # only these rows' hash columns: no read, no diff
        done.clear()

    paths = [ws.abspath(rel) for _, rel in rows]
    for (image_id, _), (h, sig, err) in zip(rows, hash_files(paths, kind, show=show)):
        if h is None:
            summary.hash_failed += 1
            summary.failures[err] = summary.failures.get(err, 0) + 1
        else:
            summary.hashed += 1
        done.append((image_id, h, sig, err))
        if len(done) >= _CHECKPOINT:
            flush()
    flush()


def _labels_per_image(df: pl.DataFrame, ws: Workspace) -> pl.DataFrame:
    """image_id -> every distinct label it was found under (catalog label plus sightings)."""
    s = catalog.read_sightings(ws).select("image_id", "label")
    both = pl.concat([df.select("image_id", "label"), s], how="vertical_relaxed").drop_nulls()
    return both.unique().group_by("image_id").agg(pl.col("label").sort().alias("labels"))


# Among a group's typical images, resolutions within this factor of the best count as the best
# (then the least compressed is kept).
_RESOLUTION_STEP = 1.25
# Images whose thumbnails are within this many grey levels (mean RMS) of the group's medoid count
# as typical of it: a resized or JPEG copy of the original ties with it, and resolution decides.
# Tune split: the image kept is the original in 142 of 148 groups (28 by resolution, then matches).
_MEDOID_SLACK = 2.0


def medoid_scores(thumbs: np.ndarray, group: np.ndarray, *, max_ref: int = 1024) -> np.ndarray:
    """Per image of a group (``group`` >= 0): minus the mean RMS difference (grey levels) of its
    grey thumbnail from the other members'. Each copy is one change (a frame, a caption, a crop,
    brighter) away from the original and two from another copy, so the original scores highest:
    the group's medoid. A group bigger than ``max_ref`` is compared with ``max_ref`` of its members
    spread through it, in chunks (memory and time linear in its size)."""
    out = np.zeros(len(group))
    x = thumbs.astype(np.float32)
    rows = np.flatnonzero(group >= 0)
    rows = rows[np.argsort(group[rows], kind="stable")]
    for idx in np.split(rows, np.flatnonzero(np.diff(group[rows])) + 1):
        if len(idx) < 2:
            continue
        ref = idx if len(idx) <= max_ref else idx[np.linspace(0, len(idx) - 1, max_ref).astype(np.int64)]
        others = len(ref) - np.isin(idx, ref)  # a member among the references does not count itself
        sq_ref = (x[ref] ** 2).sum(1)
        for at in range(0, len(idx), 4096):
            part = idx[at:at + 4096]
            d2 = (x[part] ** 2).sum(1)[:, None] + sq_ref[None, :] - 2 * x[part] @ x[ref].T
            out[part] = -np.sqrt(np.maximum(d2, 0) / x.shape[1]).sum(1) / others[at:at + 4096]
    return out


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _rank_frame(members: pl.DataFrame, *, centres: bool = False) -> pl.DataFrame:
    """Sort key, per ``_comp``, for the image kept: accepted (human-reviewed) first, then images not
    rejected for another reason, then the typical ones (``_medoid`` within _MEDOID_SLACK of the
    group's best: not the framed, captioned, cropped or brightened copy), then resolution of the
    picture inside uniform margins (in steps of 25% down from the best in the group), then the
    least compressed (bytes per pixel: not the JPEG q25 or greyed copy), then the share of the
    image inside its margins (the unpadded copy), pixels, the freest licence
    (licenses.openness), earliest retrieval, then the smallest image id (a fixed choice).

    ``centres``: the order in which `star_groups` picks group centres: the most verified matches
    (``_degree``), then resolution (star clustering's centre). A framed or padded copy is often the
    largest image, yet a rotated or captioned copy that matches the original may not match it;
    taken first, it would split the group."""
    from curation.licenses import normalise_license, openness

    lic_ok = [openness(normalise_license(x)) for x in members["license"].to_list()]
    status = pl.col("status")
    usable = (status == Status.candidate.value) | ((status == Status.rejected.value) & (pl.col("reason") == DUPLICATE))
    pixels = pl.col("width").cast(pl.Int64).fill_null(0) * pl.col("height").cast(pl.Int64).fill_null(0)
    if "_content" not in members.columns:
        members = members.with_columns(pl.lit(1.0).alias("_content"))
    if "_degree" not in members.columns:
        members = members.with_columns(pl.lit(0).alias("_degree"))
    if "_medoid" not in members.columns:
        members = members.with_columns(pl.lit(0.0).alias("_medoid"))
    if "_bytes" not in members.columns:
        members = members.with_columns(pl.lit(0).alias("_bytes"))
    content = (pixels.cast(pl.Float64) * pl.col("_content")).clip(1.0, None)
    typical = pl.col("_medoid") >= pl.col("_medoid").max().over("_comp") - _MEDOID_SLACK
    best = pl.when(typical).then(content).max().over("_comp")  # resolution steps down from the best typical image
    return members.with_columns(
        (status == Status.accepted.value).alias("_accepted"),
        usable.fill_null(False).alias("_usable"),
        ((content / best).log() / np.log(_RESOLUTION_STEP)).ceil().cast(pl.Int64).alias("_res"),
        pixels.alias("_pixels"),
        typical.alias("_typical"),
        (pl.col("_bytes") / pixels.clip(1, None)).alias("_bpp"),
        pl.Series("_lic", lic_ok, dtype=pl.Int16),
    ).sort(
        ["_comp", "_accepted", "_usable", *(["_degree", "_res"] if centres else ["_typical", "_res", "_bpp"]),
         "_content", "_pixels", "_lic", "retrieved_at", "image_id"],
        descending=[False, True, True, True, True, *([] if centres else [True]), True, True, True, False, False],
        nulls_last=True,
    )


def run(manifest: Manifest, ws: Workspace, *, show_progress: bool = True, dask_address: str | None = None) -> DedupSummary:
    """Hash new images, group duplicates across all classes, and record decisions in the catalog.

    ``dask_address`` ("local" or a scheduler address): hashing runs per catalog partition on that
    Dask cluster (curation/cluster.py); the search and grouping, global by nature, run here."""
    import time

    settings: DedupSettings = manifest.dedup
    summary = DedupSummary()
    df = catalog.ensure_columns(catalog.read(ws), COLUMNS)
    have_sig = read_signatures(ws).select("image_id", pl.lit(True).alias("_sig"))
    stored = df.filter(pl.col("path").is_not_null()).join(have_sig, on="image_id", how="left")
    todo = stored.filter(
        pl.col("phash").is_null() | pl.col("hash_kind").ne_missing(settings.hash.value) | pl.col("_sig").is_null()
    )
    if todo.height:
        _hash_rows(manifest, ws, todo, summary, show_progress, dask_address)

    with catalog.locked(ws):
        df = catalog.ensure_columns(catalog.read(ws), COLUMNS)
        sigs = read_signatures(ws)
        _compact_signatures(ws, sigs)
        hashed = df.filter(
            pl.col("path").is_not_null() & pl.col("phash").is_not_null() & (pl.col("hash_kind") == settings.hash.value)
        ).join(sigs, on="image_id", how="inner", maintain_order="left")
        summary.images = hashed.height
        sightings = catalog.read_sightings(ws)
        summary.exact_duplicate_sightings = max(0, sightings.height - sightings["image_id"].n_unique()) if sightings.height else 0

        t0 = time.perf_counter()
        h = hex_to_u64(hashed["phash"].to_list())
        th = thumbs_to_array(hashed["sig"].to_list())
        ids = hashed["image_id"].to_list()
        emb = None
        if settings.embeddings:
            cache, rows, vectors = cached_embeddings(ws, ids)
            if cache is not None and len(rows) >= 2:
                emb, summary.embedding_cache = (rows, vectors), cache
        verifier = Verifier([ws.abspath(x) for x in hashed["path"].to_list()], settings.min_inliers)
        pairs, summary.families = find_pairs(
            h, th, verifier.paths, settings, embeddings=emb, verifier=verifier, show=show_progress
        )
        hf = summary.families.get("hash", {})
        summary.candidate_pairs = hf.get("candidates", 0)
        summary.guard_rejected_pairs = summary.candidate_pairs - hf.get("accepted", 0)
        # Representatives first, then members that match one directly (no chaining).
        degree = np.bincount(pairs.ravel(), minlength=hashed.height) if len(pairs) else np.zeros(hashed.height, np.int64)
        hashed = hashed.with_columns(
            pl.Series("_content", th[:, _SIG - 2].astype(np.float64) / 255.0), pl.Series("_degree", degree.astype(np.int64))
        )
        order = _rank_frame(hashed.with_row_index("_idx").with_columns(pl.lit(0).alias("_comp")), centres=True)["_idx"].to_numpy()
        comp, pairs, (proposed, added) = group_by_representative(order.astype(np.int64), hashed.height, pairs, verifier)
        if proposed:
            summary.families["representative"] = {"candidates": proposed, "accepted": added}
        summary.accepted_pairs = len(pairs)
        summary.search_s = round(time.perf_counter() - t0, 3)

        members = hashed.with_columns(
            pl.Series("_comp", comp, dtype=pl.Int64), pl.Series("_medoid", medoid_scores(th[:, :256], comp))
        ).filter(pl.col("_comp") >= 0)
        members = members.with_columns(pl.Series("_bytes", [_file_size(ws.abspath(p)) for p in members["path"].to_list()]))
        labels = _labels_per_image(df, ws)
        review = df if "review_decision" in df.columns else df.with_columns(pl.lit(None, dtype=pl.Utf8).alias("review_decision"))
        decided = _decide(members.drop("sig"), labels, review)
        leaks = _leaks(df, ids, pairs) if settings.leak_check else pl.DataFrame(schema={"image_id": pl.Utf8, "leak_of": pl.Utf8})
        summary.leaks = leaks.height
        # A flag stays once set (publishing the image later does not make it less of a copy).
        decided = decided.join(leaks, on="image_id", how="left").join(
            df.select("image_id", pl.col("leak_of").alias("_old_leak")), on="image_id", how="left"
        ).with_columns(pl.coalesce("leak_of", "_old_leak").alias("leak_of")).drop("_old_leak")
        updates = _changed_rows(df, decided)
        summary.rows_changed = updates.height
        summary.groups = int(members["_comp"].n_unique()) if members.height else 0
        summary.duplicates = int(decided["dup_of"].is_not_null().sum())
        summary.newly_rejected = int(
            updates.filter((pl.col("status") == Status.rejected.value) & (pl.col("reason") == DUPLICATE))
            .join(df.select("image_id", pl.col("reason").alias("_old")), on="image_id")
            .filter(pl.col("_old").fill_null("") != DUPLICATE).height
        ) if updates.height else 0
        summary.released = int(
            updates.filter(pl.col("status") == Status.candidate.value)
            .join(df.select("image_id", pl.col("reason").alias("_old")), on="image_id")
            .filter(pl.col("_old") == DUPLICATE).height
        ) if updates.height else 0
        if updates.height:
            catalog.merge(ws, catalog.changes(df, updates), declare=COLUMNS)
        final = catalog.update(df, updates)  # what the catalog now holds: the lock is still ours
    conflict = final.filter(pl.col("label_conflict").fill_null(False))
    summary.label_conflict_images = conflict.height
    summary.label_conflict_groups = conflict.select(pl.coalesce("dup_group", "image_id")).n_unique() if conflict.height else 0
    _write_report(ws, settings, summary, final)
    return summary


def _leaks(df: pl.DataFrame, ids: list[str], pairs: np.ndarray) -> pl.DataFrame:
    """image_id -> leak_of: never-published images that match an image of the latest published
    test split directly (publish's catalog columns ``split``/``published_version``)."""
    empty = pl.DataFrame(schema={"image_id": pl.Utf8, "leak_of": pl.Utf8})
    if not len(pairs) or "split" not in df.columns or "published_version" not in df.columns:
        return empty
    latest = df["published_version"].max()
    if latest is None:
        return empty
    test = set(df.filter((pl.col("published_version") == latest) & (pl.col("split") == "test"))["image_id"].to_list())
    published = set(df.filter(pl.col("published_version").is_not_null())["image_id"].to_list())
    out: dict[str, str] = {}
    for a, b in ((ids[i], ids[j]) for i, j in pairs):
        for new, old in ((a, b), (b, a)):
            if old in test and new not in published:
                out[new] = min(out.get(new, old), old)  # deterministic when it copies two
    return pl.DataFrame({"image_id": list(out), "leak_of": list(out.values())}, schema=empty.schema)


def _decide(members: pl.DataFrame, labels: pl.DataFrame, df: pl.DataFrame) -> pl.DataFrame:
    """Target dup_group/dup_of/label_conflict/status/reason for every image_id in the catalog."""
    ranked = _rank_frame(members).with_columns(pl.col("label").fill_null("").alias("_lab"))
    reps = ranked.group_by("_comp", maintain_order=True).first().select("_comp", pl.col("image_id").alias("_rep"))
    # A group spanning labels is not resolved here: each label keeps its best image (all flagged
    # as a label conflict), so no label is silently chosen over another before review.
    keepers = ranked.group_by("_comp", "_lab", maintain_order=True).first().select(
        "_comp", "_lab", pl.col("image_id").alias("_keep")
    )
    ranked = ranked.join(reps, on="_comp").join(keepers, on=["_comp", "_lab"])
    lab = ranked.select("image_id", "_comp").join(labels, on="image_id", how="left").explode("labels")
    comp_conflict = lab.group_by("_comp").agg((pl.col("labels").drop_nulls().n_unique() > 1).alias("_conflict"))
    ranked = ranked.join(comp_conflict, on="_comp")
    in_group = ranked.select(
        "image_id",
        pl.col("_rep").alias("dup_group"),
        pl.when(pl.col("image_id") == pl.col("_rep")).then(None)
        # rejected for another reason: not in play, only record what it duplicates
        .when(~(pl.col("_usable") | pl.col("_accepted"))).then(pl.col("_rep"))
        .when(pl.col("image_id") != pl.col("_keep")).then(pl.col("_keep"))
        .otherwise(None).alias("dup_of"),
        pl.col("_conflict").alias("label_conflict"),
    )
    # Singletons: a conflict only if the same bytes were found under two labels.
    single_conflict = labels.select("image_id", (pl.col("labels").list.len() > 1).alias("_multi"))
    out = (
        df.select("image_id", "status", "reason", "review_decision")
        .join(in_group, on="image_id", how="left")
        .join(single_conflict, on="image_id", how="left")
        .with_columns(
            pl.coalesce(pl.col("label_conflict") | pl.col("_multi").fill_null(False), pl.col("_multi"), pl.lit(False))
            .alias("label_conflict")
        )
    )
    reviewed = (pl.col("status") == Status.accepted.value) | pl.col("review_decision").is_not_null()
    is_dup = pl.col("dup_of").is_not_null()
    was_dup = (pl.col("status") == Status.rejected.value) & (pl.col("reason") == DUPLICATE)
    new_status = (
        pl.when(reviewed).then(pl.col("status"))
        .when(is_dup & (pl.col("status") == Status.candidate.value)).then(pl.lit(Status.rejected.value))
        .when(~is_dup & was_dup).then(pl.lit(Status.candidate.value))
        .otherwise(pl.col("status"))
    )
    new_reason = (
        pl.when(reviewed).then(pl.col("reason"))
        .when(is_dup & (pl.col("status") == Status.candidate.value)).then(pl.lit(DUPLICATE))
        .when(~is_dup & was_dup).then(pl.lit(None, dtype=pl.Utf8))
        .otherwise(pl.col("reason"))
    )
    return out.select("image_id", "dup_group", "dup_of", "label_conflict", new_status.alias("status"), new_reason.alias("reason"))


def _changed_rows(df: pl.DataFrame, decided: pl.DataFrame) -> pl.DataFrame:
    """Only rows whose decision differs from the catalog (so an unchanged catalog is not rewritten)."""
    cols = ["dup_group", "dup_of", "label_conflict", "status", "reason", "leak_of"]
    cur = df.select("image_id", *cols).rename({c: f"_old_{c}" for c in cols})
    j = decided.join(cur, on="image_id")
    diff = pl.any_horizontal([pl.col(c).ne_missing(pl.col(f"_old_{c}")) for c in cols])
    return j.filter(diff).select("image_id", *cols)


def _write_report(ws: Workspace, settings: DedupSettings, summary: DedupSummary, df: pl.DataFrame) -> None:
    out = ws.stage_dir("dedup")
    groups = (
        df.filter(pl.col("dup_group").is_not_null())
        .select(
            "dup_group", "image_id", (pl.col("image_id") == pl.col("dup_group")).alias("representative"),
            "label", "status", "reason", "label_conflict", "width", "height", "license", "source_url", "path", "phash",
        )
        .sort("dup_group", "representative", "image_id", descending=[False, True, False])
    )
    groups.write_parquet(out / "groups.parquet")
    groups.write_csv(out / "groups.csv")
    df.filter(pl.col("label_conflict").fill_null(False)).select(
        pl.coalesce("dup_group", "image_id").alias("group"), "image_id", "label", "status", "path", "source_url"
    ).sort("group", "image_id").write_csv(out / "label_conflicts.csv")
    sheet = out / "contact_sheet.png"
    sheet.unlink(missing_ok=True)
    if settings.contact_sheet_groups and groups.height:
        contact_sheet(ws, groups, sheet, max_groups=settings.contact_sheet_groups)
    doc = {"settings": settings.model_dump(mode="json"), **asdict(summary)}
    doc.pop("search_s")  # timings vary; keep the summary identical across identical runs
    (out / "summary.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


_TILE = 160  # px per thumbnail on the contact sheet
_PER_ROW = 8  # thumbnails per group row (larger groups say "+N more")


def contact_sheet(ws: Workspace, groups: pl.DataFrame, out: Path, *, max_groups: int = 12) -> Path:
    """A PNG of the largest groups, one row each: the representative first (green frame), then
    members, each captioned with its label and status/reason, so a person can check the groups."""
    from PIL import Image, ImageDraw

    sizes = groups.group_by("dup_group").len().sort(["len", "dup_group"], descending=[True, False]).head(max_groups)
    cap = 28
    sheet = Image.new("RGB", (_PER_ROW * (_TILE + 4) + 4, max(1, sizes.height) * (_TILE + cap + 6) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (gid, size) in enumerate(sizes.iter_rows()):
        rows = groups.filter(pl.col("dup_group") == gid).sort("representative", "image_id", descending=[True, False])
        y = 4 + r * (_TILE + cap + 6)
        for c, row in enumerate(rows.head(_PER_ROW).iter_rows(named=True)):
            x = 4 + c * (_TILE + 4)
            try:
                im = open_rgb(ws.abspath(row["path"]), draft=(_TILE, _TILE))
                im.thumbnail((_TILE - 4, _TILE - 4))
                sheet.paste(im, (x + 2 + (_TILE - 4 - im.width) // 2, y + 2 + (_TILE - 4 - im.height) // 2))
            except Exception:  # noqa: BLE001 - a missing file is drawn as an empty tile
                draw.text((x + 8, y + _TILE // 2), "unreadable", fill="red")
            draw.rectangle((x, y, x + _TILE - 1, y + _TILE - 1), outline="green" if row["representative"] else "grey",
                           width=3 if row["representative"] else 1)
            status = row["status"] if row["reason"] is None else f"{row['status']}:{row['reason']}"
            draw.text((x + 2, y + _TILE + 2), f"{row['label'] or '?'}"[:24], fill="black")
            draw.text((x + 2, y + _TILE + 14), status[:26], fill="black")
        if size > _PER_ROW:
            draw.text((sheet.width - 70, y + _TILE + 14), f"+{size - _PER_ROW} more", fill="blue")
    sheet.save(out)
    return out
