"""Catalog in, duplicate groups out: exact (sha256) and perceptual near duplicates across all classes.

Nothing is deleted. Every stored image is hashed once (JPEGs decoded in draft mode, EXIF-upright;
the hash and its kind are cached in the catalog, a guard signature in the stage), near pairs are found
with an exact multi-index Hamming search (numpy, no O(n^2)), each pair is confirmed by the guard,
and each connected group keeps one representative (a human-accepted image, else an image not
rejected for another reason; then highest resolution, the freest licence, earliest
retrieval); the candidates among the others become ``rejected/duplicate`` with ``dup_of``. A group
whose images carry more than one label (catalog label or any sighting, so the same bytes found
under two labels count too) is a label conflict: flagged for review, not resolved; each of its
labels keeps its best image, so dedup never picks one label over another.

Columns added: ``phash`` (hex of the 64-bit hash of kind ``hash_kind``: phash, dhash or whash;
a change of kind re-hashes), ``hash_kind``, ``dup_group`` (representative's image_id, on every
member of a group of two or more: use it as the group key for group-aware folds so duplicates
never straddle train/validation), ``dup_of`` (the image kept for the same label, on the others),
``label_conflict`` (bool). Under ``stages/dedup/``: groups.parquet/csv, label_conflicts.csv,
summary.json, and signatures/ (the guard signatures, a cache keyed by image_id).

Default threshold 10 bits of 64 (imagededup's default too), measured on planted copies of
generated textured images and openclipart drawings: resize 1/2, JPEG q15, greyscale and PNG
copies stay within 4-8 bits (90th percentile) except for near-blank drawings, whose hashes are
unstable; brightness x1.2 within 9; crops are the weak spot of any global hash (4% per side:
median 10 bits, line drawings 12-14; 2% per side: <= 6). At 8 bits recall on 4%-crops fell from
0.60 to 0.42. Larger thresholds merge unrelated low-texture images (openclipart at 10 bits: 105k
candidate pairs among 8k drawings), so every pair must also pass a second signal, the guard:
grey thumbnails correlating >= ``min_thumb_corr`` (0.8) at 8x8 and 16x16, and the same
orientation of fine texture. On the benchmark's planted set (t=10) the 16x16 check raised
group precision from 0.927 to 0.962 at a recall cost of 0.009. Search time grows with the
threshold (1M hashes: 10 bits ~5x the work of 8).
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from math import comb
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import polars as pl

from curation import catalog
from curation.catalog import Status, Workspace
from curation.config import DedupSettings, HashKind, Manifest
from curation.images import open_rgb
from curation.progress import progress_map, track
from curation.store import PartsTable

DUPLICATE = "duplicate"

COLUMNS: dict[str, pl.DataType] = {
    "phash": pl.Utf8,
    "hash_kind": pl.Utf8,
    "dup_group": pl.Utf8,
    "dup_of": pl.Utf8,
    "label_conflict": pl.Boolean,
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
    candidate_pairs: int = 0  # pairs within the Hamming threshold
    guard_rejected_pairs: int = 0  # of those, vetoed by the thumbnail guard
    groups: int = 0  # duplicate groups (2+ images)
    duplicates: int = 0  # group members with dup_of (not kept for their label)
    newly_rejected: int = 0
    released: int = 0  # previously rejected as duplicate, no longer
    label_conflict_groups: int = 0
    label_conflict_images: int = 0
    rows_changed: int = 0
    search_s: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------- hashing


def hash_image(path: str | Path, kind: HashKind = HashKind.phash) -> tuple[str, bytes]:
    """(hex 64-bit perceptual hash, guard signature) of a stored image, EXIF-upright.

    The guard signature is 257 bytes: a 16x16 grey thumbnail (layout) and the share of
    horizontal in all gradient energy at 64x64 (orientation of fine texture such as stripes and
    hatching, which both small thumbnails and a 64-bit hash average away).
    """
    import imagehash
    from PIL import Image

    grey = open_rgb(path, draft=_DRAFT).convert("L")
    fn = {HashKind.phash: imagehash.phash, HashKind.dhash: imagehash.dhash, HashKind.whash: imagehash.whash}[kind]
    h = fn(grey)
    g = np.asarray(grey.resize((64, 64), Image.BOX), dtype=np.float32)
    thumb = g.reshape(16, 4, 16, 4).mean((1, 3))
    gx, gy = float(np.abs(np.diff(g, axis=1)).sum()), float(np.abs(np.diff(g, axis=0)).sum())
    orient = round(255 * gx / (gx + gy)) if gx + gy > 0 else 128
    return str(h), np.rint(thumb).astype(np.uint8).tobytes() + bytes([orient])


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
    with mp.get_context("fork").Pool(workers) as pool:
        yield from track(pool.imap(_hash_one, args, chunksize=32), total=len(args), description=description, show=show)


def hex_to_u64(values: Sequence[str]) -> np.ndarray:
    """Hex strings (16 digits) to uint64."""
    if not len(values):
        return np.empty(0, np.uint64)
    raw = bytes.fromhex("".join(v.rjust(16, "0") for v in values))
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64)


_SIG = 257  # bytes of a guard signature


def thumbs_to_array(values: Sequence[bytes]) -> np.ndarray:
    """Guard signatures to an (n, 257) uint8 array (257 MB at a million images)."""
    if not len(values):
        return np.empty((0, _SIG), np.uint8)
    return np.frombuffer(b"".join(values), dtype=np.uint8).reshape(-1, _SIG)


def _corr(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-wise Pearson correlation, and each side's standard deviation."""
    ac, bc = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    asd, bsd = np.sqrt((ac * ac).mean(1)), np.sqrt((bc * bc).mean(1))
    return (ac * bc).mean(1) / np.maximum(asd * bsd, 1e-6), asd, bsd


def thumb_similar(a: np.ndarray, b: np.ndarray, min_corr: float, max_orient: int = 40) -> np.ndarray:
    """Row-wise guard on (k, 257) signatures: is the pair plausibly the same picture?

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


# ---------------------------------------------------------------- stage


def _signatures(ws: Workspace) -> PartsTable:
    return PartsTable(ws.stage_dir("dedup") / "signatures", {"image_id": pl.Utf8, "sig": pl.Binary})


def _write_signatures(ws: Workspace, ids: list[str], sigs: list[bytes]) -> None:
    _signatures(ws).append(pl.DataFrame({"image_id": ids, "sig": sigs}, schema={"image_id": pl.Utf8, "sig": pl.Binary}))


def read_signatures(ws: Workspace) -> pl.DataFrame:
    """image_id -> guard signature (257 bytes), from the stage's cache.

    Kept out of the catalog (257 bytes an image) so other stages do not carry it; a signature
    depends only on the stored bytes, so duplicates in the cache are identical.
    """
    sigs = _signatures(ws).read()
    return sigs.filter(pl.col("sig").bin.size() == _SIG).unique("image_id", keep="first", maintain_order=True)


def _compact_signatures(ws: Workspace, sigs: pl.DataFrame) -> None:
    """One file instead of one per checkpoint (call under the catalog lock)."""
    table = _signatures(ws)
    if len(table.parts()) > 1:
        table.compact(sigs.sort("image_id"))


def _hash_rows(
    manifest: Manifest, ws: Workspace, todo: pl.DataFrame, summary: DedupSummary, show: bool
) -> None:
    """Hash rows in ``todo`` (image_id, path) and checkpoint results into the catalog."""
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
            with catalog.locked(ws):
                df = catalog.ensure_columns(catalog.read(ws), COLUMNS)
                catalog.write(ws, catalog.update(df, upd))
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


def _rank_frame(members: pl.DataFrame) -> pl.DataFrame:
    """Sort key for choosing representatives: accepted (human-reviewed) first, then images not
    rejected for another reason, then resolution, the freest licence (licenses.openness), earliest retrieval."""
    from curation.licenses import normalise_license, openness

    lic_ok = [openness(normalise_license(x)) for x in members["license"].to_list()]
    status = pl.col("status")
    usable = (status == Status.candidate.value) | ((status == Status.rejected.value) & (pl.col("reason") == DUPLICATE))
    return members.with_columns(
        (status == Status.accepted.value).alias("_accepted"),
        usable.fill_null(False).alias("_usable"),
        (pl.col("width").cast(pl.Int64).fill_null(0) * pl.col("height").cast(pl.Int64).fill_null(0)).alias("_pixels"),
        pl.Series("_lic", lic_ok, dtype=pl.Int16),
    ).sort(
        ["_comp", "_accepted", "_usable", "_pixels", "_lic", "retrieved_at", "image_id"],
        descending=[False, True, True, True, True, False, False],
        nulls_last=True,
    )


def run(manifest: Manifest, ws: Workspace, *, show_progress: bool = True) -> DedupSummary:
    """Hash new images, group duplicates across all classes, and record decisions in the catalog."""
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
        _hash_rows(manifest, ws, todo, summary, show_progress)

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
        pairs = candidate_pairs(h, th, settings.threshold)
        summary.candidate_pairs = len(pairs)
        if len(pairs):
            ok = thumb_similar(th[pairs[:, 0]], th[pairs[:, 1]], settings.min_thumb_corr)
            summary.guard_rejected_pairs = int((~ok).sum())
            pairs = pairs[ok]
        comp = components(hashed.height, pairs)
        summary.search_s = round(time.perf_counter() - t0, 3)

        members = hashed.with_columns(pl.Series("_comp", comp, dtype=pl.Int64))
        size = members.group_by("_comp").len()
        members = members.join(size, on="_comp").filter(pl.col("len") > 1).drop("len")
        labels = _labels_per_image(df, ws)
        review = df if "review_decision" in df.columns else df.with_columns(pl.lit(None, dtype=pl.Utf8).alias("review_decision"))
        decided = _decide(members.drop("sig"), labels, review)
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
            catalog.write(ws, catalog.update(df, updates))
        final = catalog.ensure_columns(catalog.read(ws), COLUMNS)
    conflict = final.filter(pl.col("label_conflict").fill_null(False))
    summary.label_conflict_images = conflict.height
    summary.label_conflict_groups = conflict.select(pl.coalesce("dup_group", "image_id")).n_unique() if conflict.height else 0
    _write_report(ws, settings, summary, final)
    return summary


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
    cols = ["dup_group", "dup_of", "label_conflict", "status", "reason"]
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
    doc = {"settings": settings.model_dump(mode="json"), **asdict(summary)}
    doc.pop("search_s")  # timings vary; keep the summary identical across identical runs
    (out / "summary.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
