"""Dedup benchmark, one run: this project vs imagededup's PHash.

1. hashing throughput on the same 1,000 JPEGs (goal >= 3x imagededup);
2. precision/recall on one planted-duplicate set at each tool's default threshold;
3. all-pairs search time on 100k and 1M synthetic 64-bit hashes (goal: 1M under 60 s).

    .venv/bin/python benchmarks/bench_dedup.py [--quick]

Planted set: generated textured images (tests/support.py) plus openclipart drawings when the
Debian package openclipart-png is installed (its shapes/ folder of parametric stars left out,
and drawings shipped twice kept once), each with six planted copies (resize 1/2, JPEG q15,
4% crop per side, brightness x1.2, greyscale, PNG), among distinct images. Timings are the best
of three runs (the machine is shared).
"""

from __future__ import annotations

import argparse
import glob
import itertools
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from curation import dedup  # noqa: E402
from curation.config import DedupSettings  # noqa: E402
from tests import support  # noqa: E402

CLIPART = "/usr/share/openclipart/png"
SOURCES: list[str] = []  # clipart files used, in order (originals first, then distractors)


def make_jpegs(d: Path, n: int) -> list[Path]:
    sizes = [(640, 480), (800, 600), (1024, 768), (1280, 960), (600, 800)]
    paths = []
    for i in range(n):
        p = d / f"{i:05d}.jpg"
        p.write_bytes(support.encode(support.textured(i, sizes[i % len(sizes)]), "JPEG", quality=90))
        paths.append(p)
    return paths


def our_hashes(paths: list[Path]) -> list[tuple[str, bytes]]:
    """The stage's own hashing path (dedup.hash_files), hash and guard signature per file."""
    out = list(dedup.hash_files(paths))
    assert all(h is not None for h, _, _ in out)
    return [(h, sig) for h, sig, _ in out]


def bench_throughput(n: int) -> None:
    from imagededup.methods import PHash

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        paths = make_jpegs(d, n)
        our_hashes(paths[:20])  # warm imports
        t_ours = t_theirs = float("inf")
        for _ in range(3):  # alternate, best of three: the machine is shared
            t0 = time.perf_counter()
            ours = our_hashes(paths)
            t_ours = min(t_ours, time.perf_counter() - t0)
            t0 = time.perf_counter()
            theirs = PHash(verbose=False).encode_images(image_dir=str(d))
            t_theirs = min(t_theirs, time.perf_counter() - t0)
    assert len(ours) == len(theirs) == n
    print(f"[1] hashing {n} JPEGs (640-1280 px), {os.cpu_count()} cores:")
    print(f"    jurassiclass phash (draft decode, processes): {n / t_ours:8.1f} img/s ({t_ours:.2f} s)")
    print(f"    imagededup PHash (full decode, processes):    {n / t_theirs:8.1f} img/s ({t_theirs:.2f} s)")
    print(f"    ratio: {t_theirs / t_ours:.2f}x (goal >= 3x)")


def planted_set(d: Path, n_tex: int, n_clip: int, n_distinct: int) -> dict[str, int]:
    """Write originals, 6 copies each, and distinct images; returns file name -> original id."""
    originals: list[Image.Image] = []
    rng = random.Random(0)
    for s in range(n_tex):
        originals.append(support.textured(s, rng.choice([(320, 240), (640, 480), (400, 400)])))
    # shapes/ holds ~800 parametric stars and polygons (star_88pt21step vs star_91pt20step):
    # near-identical pictures that a "distinct" ground truth would wrongly call different.
    clip_files = sorted(f for f in glob.glob(f"{CLIPART}/**/*.png", recursive=True) if "/shapes/" not in f)
    rng.shuffle(clip_files)
    clip: list[Image.Image] = []
    seen_hashes: list[int] = []
    for f in clip_files:
        # openclipart ships some drawings twice (same file in two categories): keep one of each,
        # else the "distinct" ground truth would be wrong.
        if len(clip) >= n_clip + n_distinct // 2:
            break
        try:
            im = Image.open(f).convert("RGBA")
        except Exception:  # noqa: BLE001
            continue
        if min(im.size) < 96:
            continue
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
        h = int(str(__import__("imagehash").phash(im)), 16)
        if any(bin(h ^ o).count("1") <= 2 for o in seen_hashes):
            continue
        seen_hashes.append(h)
        clip.append(im)
        SOURCES.append(f)
    originals += clip[:n_clip]
    truth: dict[str, int] = {}
    for k, im in enumerate(originals):
        copies = {"orig.jpg": support.encode(im, "JPEG", quality=92)}
        for kind, data in support.planted_copies(im, crop=0.04).items():
            copies[f"{kind}.png" if kind == "png" else f"{kind}.jpg"] = data
        for name, data in copies.items():
            (d / f"o{k:04d}_{name}").write_bytes(data)
            truth[f"o{k:04d}_{name}"] = k
    distinct = [support.textured(10_000 + s, (320, 240)) for s in range(n_distinct - len(clip[n_clip:]))]
    distinct += clip[n_clip:]
    for k, im in enumerate(distinct):
        (d / f"d{k:04d}.jpg").write_bytes(support.encode(im, "JPEG", quality=90))
        truth[f"d{k:04d}.jpg"] = -1 - k
    return truth


def pr(pred: set[tuple[str, str]], truth: dict[str, int]) -> tuple[float, float, int, int]:
    by: dict[int, list[str]] = {}
    for f, k in truth.items():
        by.setdefault(k, []).append(f)
    true = {tuple(sorted(p)) for fs in by.values() for p in itertools.combinations(fs, 2)}
    tp = len(pred & true)
    return tp / max(1, len(pred)), tp / max(1, len(true)), len(pred), len(true)


def bench_quality(n_tex: int, n_clip: int, n_distinct: int) -> None:
    from imagededup.methods import PHash

    settings = DedupSettings()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        truth = planted_set(d, n_tex, n_clip, n_distinct)
        files = sorted(truth)
        res = our_hashes([d / f for f in files])
        h = dedup.hex_to_u64([r[0] for r in res])
        th = dedup.thumbs_to_array([r[1] for r in res])
        pairs = dedup.candidate_pairs(h, th, settings.threshold)
        raw_pairs = pairs
        pairs = pairs[dedup.thumb_similar(th[pairs[:, 0]], th[pairs[:, 1]], settings.min_thumb_corr)]
        comp = dedup.components(len(files), pairs)
        groups: dict[int, list[str]] = {}
        for f, c in zip(files, comp):
            groups.setdefault(int(c), []).append(f)
        ours = {tuple(sorted(p)) for fs in groups.values() for p in itertools.combinations(fs, 2)}
        ours_direct = {tuple(sorted((files[i], files[j]))) for i, j in pairs}
        ours_noguard = {tuple(sorted((files[i], files[j]))) for i, j in raw_pairs}
        dup_map = PHash(verbose=False).find_duplicates(image_dir=str(d))  # default max_distance_threshold=10
        theirs = {tuple(sorted((a, b))) for a, bs in dup_map.items() for b in bs}
    n_orig = len({k for k in truth.values() if k >= 0})
    print(f"[2] planted set: {n_orig} originals x 7 copies + {sum(k < 0 for k in truth.values())} distinct images "
          f"({len(files)} files); pairwise precision/recall over same-original pairs:")
    for name, pred in [
        (f"jurassiclass groups (t={settings.threshold}, guard {settings.min_thumb_corr})", ours),
        ("jurassiclass direct pairs (same settings)", ours_direct),
        (f"jurassiclass without guard (t={settings.threshold})", ours_noguard),
        ("imagededup PHash (t=10, default)", theirs),
    ]:
        p, r, npred, ntrue = pr(pred, truth)
        print(f"    {name:52s} precision {p:.4f}  recall {r:.4f}  ({npred} pairs predicted, {ntrue} true)")
    print("    recall of original-copy pairs by kind of copy (jurassiclass groups / imagededup):")
    for kind in ["resized", "lowq", "cropped", "bright", "grey", "png"]:
        want = {tuple(sorted((f, f.split("_")[0] + "_orig.jpg"))) for f in files if f.split("_", 1)[-1].startswith(kind)}
        print(f"      {kind:8s} {len(want & ours) / len(want):.3f} / {len(want & theirs) / len(want):.3f}")
    p0, r0, *_ = pr(ours, truth)
    p1, r1, *_ = pr(theirs, truth)
    print(f"    ratio vs imagededup: precision {p0 / max(p1, 1e-9):.3f}x, recall {r0 / max(r1, 1e-9):.3f}x (goal >= 1 each)")


def bench_search(sizes: list[int], thresholds: list[int]) -> None:
    import faiss

    rng = np.random.default_rng(0)
    print("[3] all-pairs search on synthetic 64-bit hashes (uniform, 1% planted near copies), exact:")
    for n in sizes:
        base = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
        k = n // 100
        flips = np.zeros(k, np.uint64)
        for _ in range(4):
            flips |= np.uint64(1) << rng.integers(0, 64, size=k).astype(np.uint64)
        base[n - k:] = base[:k] ^ flips  # near copies within 4 bits
        for t in thresholds:
            el = float("inf")
            for _ in range(3 if n <= 100_000 else 1):
                t0 = time.perf_counter()
                p = dedup.near_pairs(base, t)
                el = min(el, time.perf_counter() - t0)
            print(f"    jurassiclass near_pairs n={n:>9,} t={t:2d}: {el:7.2f} s, {len(p):,} pairs")
        if n <= 100_000:
            idx = faiss.IndexBinaryFlat(64)
            idx.add(base.view(np.uint8).reshape(n, 8))
            t0 = time.perf_counter()
            lims, _, _ = idx.range_search(base.view(np.uint8).reshape(n, 8), thresholds[0] + 1)
            el = time.perf_counter() - t0
            npairs = (int(lims[-1]) - n) // 2
            print(f"    faiss IndexBinaryFlat range_search n={n:>9,} t={thresholds[0]:2d}: {el:7.2f} s, {npairs:,} pairs (reference)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    ap.add_argument("--also-t8", action="store_true", help="also time the search at threshold 8")
    a = ap.parse_args()
    t = DedupSettings().threshold
    if a.quick:
        bench_throughput(100)
        bench_quality(20, 20, 40)
        bench_search([100_000], [t])
        return
    bench_throughput(1000)
    bench_quality(150, 150, 300)
    bench_search([100_000, 1_000_000], [t, 8] if a.also_t8 else [t])


if __name__ == "__main__":
    main()
