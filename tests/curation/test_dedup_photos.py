"""Dedup on real photographs (tests/assets/dedup/photos, from Debian packages): every transform of
the real-photo benchmark is found at its goal rate, and look-alike pictures stay apart.

The photos come from the benchmark's tune split only (benchmarks/realphotos.py); the rates below
are the issue's goals and the held-out rates the benchmark measured, so a regression on real
photographs fails here without the benchmark's data.
"""

import random
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image, ImageOps

from benchmarks import realphotos
from curation import catalog, dedup, ingest
from curation.config import DedupSettings, parse_manifest
from tests import support

PHOTOS = Path(__file__).resolve().parents[1] / "assets" / "dedup" / "photos"

# Share of the photos whose copy must land in its original's dup_group. 0.95: the goal
# for the transforms it names; the others ("more": rotation, padding, screenshot border, 10%
# crops) at the rate `benchmarks/realphotos.py eval --split heldout` measured (2026-12, content
# check + centre/flat/ECC: rotate 0.889, pad 0.958, border 0.976, crop10_side 1.0, crop10_all 0.972).
GOALS = {
    "resize_half": 0.95, "resize_small": 0.95, "jpeg_q25": 0.95, "crop5_side": 0.95, "crop5_all": 0.95,
    "bright_1.3": 0.95, "grey": 0.95, "text": 0.95, "hflip": 0.95, "hue": 0.95,
    "rotate": 0.889, "pad": 0.958, "border": 0.976, "crop10_side": 1.0, "crop10_all": 0.972,
}


def _photos(prefix: str) -> list[tuple[str, Image.Image]]:
    return [(p.stem, Image.open(p).convert("RGB")) for p in sorted(PHOTOS.glob(f"{prefix}_*.jpg"))]


@pytest.fixture(scope="module")
def photo_catalog(tmp_path_factory):
    """One run of the real stage (ingest + dedup, default settings) over every photo with every
    transform, plus the look-alikes; returns the catalog with each row's file name."""
    from curation.catalog import Workspace

    tmp = tmp_path_factory.mktemp("photos")
    root = tmp / "tree"
    photos, lookalikes = _photos("photo"), _photos("lookalike")
    assert len(photos) >= 10 and len(lookalikes) >= 6, "committed photo fixtures missing"
    for k, (name, im) in enumerate(photos):
        label = ("cat", "dog")[k % 2]
        support.write(root / label / f"{name}__orig.jpg", support.encode(im, "JPEG", quality=92))
        for kind in GOALS:
            rng = random.Random(f"{name}-{kind}")
            copy, _ = realphotos.apply(kind, im, rng)
            # a copy sometimes lands under the other label, as scraped duplicates do
            where = label if rng.random() < 0.8 else ("dog" if label == "cat" else "cat")
            support.write(root / where / f"{name}__{kind}.jpg",
                          support.encode(copy, "JPEG", quality=25 if kind == "jpeg_q25" else 90))
    for k, (name, im) in enumerate(lookalikes):
        support.write(root / ("cat", "dog")[k % 2] / f"{name}__orig.jpg", support.encode(im, "JPEG", quality=92))
    m = parse_manifest({
        "name": "photos", "classes": [{"name": "cat"}, {"name": "dog"}],
        "sources": [{"type": "folder", "path": str(root), "license": "cc-by"}],
    })
    ws = Workspace(tmp / "ws").ensure()
    ingest.run(m, ws, show_progress=False)
    dedup.run(m, ws, show_progress=False)
    return catalog.read(ws).with_columns(pl.col("source_url").str.split("/").list.last().alias("file"))


@pytest.fixture(scope="module")
def photo_run(photo_catalog):
    """file name -> dup_group (None: no group)."""
    return dict(photo_catalog.select("file", "dup_group").iter_rows())


@pytest.mark.parametrize("kind", sorted(GOALS))
def test_each_transform_found_at_its_goal_rate(photo_run, kind):
    names = [n for n, _ in _photos("photo")]
    found = [n for n in names if photo_run[f"{n}__{kind}.jpg"] is not None
             and photo_run[f"{n}__{kind}.jpg"] == photo_run[f"{n}__orig.jpg"]]
    need = int(GOALS[kind] * len(names))  # e.g. 0.95 of 14 photos: 13
    missed = sorted(set(names) - set(found))
    assert len(found) >= need, f"{kind}: {len(found)}/{len(names)} found, goal {need}; missed {missed}"


def test_the_original_is_the_image_kept(photo_catalog):
    """Each photo with every copy (captioned, framed and padded ones larger than it, rotated,
    brightened, JPEG q25, greyed, cropped): the group keeps a typical image, one whose thumbnail is
    about the closest to all the others' (each copy is one change from the original, two from
    another copy), then the largest, then the least compressed: the original, in most groups
    (the largest first, as before, kept none: 0 of 14)."""
    kept = photo_catalog.filter(pl.col("image_id") == pl.col("dup_group"))["file"].to_list()
    originals = [f for f in kept if f.endswith("__orig.jpg")]
    assert len(kept) >= 10 and len(originals) >= 0.75 * len(kept), sorted(kept)


def test_no_group_mixes_two_pictures(photo_run):
    groups: dict[str, set[str]] = {}
    for f, g in photo_run.items():
        if g is not None:
            groups.setdefault(g, set()).add(f.split("__")[0])
    mixed = [sorted(s) for s in groups.values() if len(s) > 1]
    assert not mixed, f"groups mixing distinct pictures: {mixed}"


def test_lookalike_low_texture_pictures_are_not_grouped(photo_run):
    # gradients, paper scans and two photos of pliers: thumbnails alike, pictures distinct
    grouped = {f: g for f, g in photo_run.items() if f.startswith("lookalike_") and g is not None}
    assert not grouped, f"distinct look-alike pictures grouped: {grouped}"


def _verify(tmp_path, a: Image.Image, b: Image.Image, *, mirror: bool = False) -> tuple[bool, "dedup.Match"]:
    """The stage's verification of one pair (JPEG q90 files, as stored), and its measurements."""
    pa, pb = tmp_path / "a.jpg", tmp_path / "b.jpg"
    pa.write_bytes(support.encode(a, "JPEG", quality=90))
    pb.write_bytes(support.encode(b, "JPEG", quality=90))
    v = dedup.Verifier([pa, pb], DedupSettings().min_inliers, record=True)
    ok = v.verify(np.array([[0, 1]]), np.array([mirror]))
    return bool(ok[0]), v.matches[(0, 1, mirror)]


def test_a_shared_login_overlay_does_not_make_two_pictures_duplicates(tmp_path):
    """Two different gradient wallpapers under the same login screen (like two desktop themes'
    login previews): every keypoint match sits on the overlay, so keypoints alone accept the pair;
    the warped pictures do not correlate, so verification rejects it."""
    (_, blue), (_, focal) = (_photo(n) for n in ("lookalike_blue", "lookalike_focal_ubuntukylin"))
    a = realphotos.login_overlay(blue.resize((960, 540)))
    b = realphotos.login_overlay(focal.resize((960, 540)))
    ok, m = _verify(tmp_path, a, b)
    assert m.inliers >= DedupSettings().min_inliers, f"the trap is not real: {m}"
    assert not ok, f"shared overlay accepted as a duplicate: {m}"
    # while the same wallpaper under the overlay, resized and re-encoded, is one
    ok, m = _verify(tmp_path, a, realphotos.login_overlay(blue.resize((960, 540))).resize((640, 360)))
    assert ok, m


def test_near_flat_pictures_under_one_login_screen_are_told_apart_cell_by_cell(tmp_path):
    """Two paper textures under the same login screen: the overlay is nearly all the contrast, so
    the whole overlap correlates like a copy's (>= min_ncc with >= min_inliers) and only the soft
    grain of the papers differs. Cell by cell that grain counts: most textured cells disagree, and
    the pair is rejected, while the same paper under the overlay, resized, agrees everywhere."""
    (_, cork), (_, paper) = (_photo(n) for n in ("lookalike_ramon_hr_cork", "lookalike_ramon_hr_pastelpaper_02"))
    a = realphotos.login_overlay(cork.resize((960, 540)))
    ok, m = _verify(tmp_path, a, realphotos.login_overlay(paper.resize((960, 540))))
    assert m.inliers >= DedupSettings().min_inliers and m.ncc >= 0.6, f"the trap is not real: {m}"
    assert m.cells < 0.5 and not ok, f"near-flat pictures under one overlay accepted: {m}"
    ok, m = _verify(tmp_path, a, realphotos.login_overlay(cork.resize((960, 540))).resize((640, 360)))
    assert ok and m.cells >= 0.9, m


def test_a_low_texture_crop_with_few_keypoints_is_accepted_on_its_content(tmp_path):
    """A paper texture cropped by 10% on one side keeps fewer than min_inliers ORB inliers, but
    the warped overlap correlates like a copy's."""
    name, im = _photo("lookalike_mrmamurk_mamurk_b_1")
    crop, _ = realphotos.apply("crop10_side", im, random.Random(f"{name}-crop10_side"))
    ok, m = _verify(tmp_path, im, crop)
    assert m.inliers < DedupSettings().min_inliers, f"not a few-keypoint case: {m}"
    assert ok, f"low-texture crop rejected: {m}"


def test_stripes_without_keypoint_matches_are_aligned_by_intensity(tmp_path):
    """Regular stripes defeat ORB's ratio test (every stripe looks alike): no geometry. Their
    flipped and resized copies are aligned by ECC and accepted; a different stripe picture is not."""
    name, im = _photo("lookalike_desktop_stripes")
    ok, m = _verify(tmp_path, im, ImageOps.mirror(im), mirror=True)
    assert m.inliers == 0 and m.ecc and ok, m
    small, _ = realphotos.apply("resize_small", im, random.Random(f"{name}-resize_small"))
    ok, m = _verify(tmp_path, im, small)
    assert m.ecc and ok, m
    other = im.rotate(90, expand=True).resize(im.size)  # vertical stripes: a different picture
    ok, m = _verify(tmp_path, im, other)
    assert not ok, m


def test_an_ecc_warp_must_keep_the_scale_and_stay_near_a_similarity(tmp_path):
    """A copy cut 10% on one side changes the aspect: ECC fits an affine warp, near a similarity
    (stripes drift to 1.21) at about the same scale, and it is accepted. A warp that zooms 1.8x
    into one smooth picture, or stretches it 1.4x one way, matched other pictures (a sky over a
    hillside to a sky over mountains, correlating 0.97): refused whatever the correlation."""
    from dataclasses import replace

    name, im = _photo("lookalike_desktop_stripes")
    crop, _ = realphotos.apply("crop10_side", im, random.Random(f"{name}-crop10_side"))
    ok, m = _verify(tmp_path, im, crop)
    assert m.ecc and ok and 1.05 < m.aniso < 1.3 and 1.0 < m.scale < 1.25, m
    v = dedup.Verifier([], 20)
    good = dedup.Match(0, ncc=0.97, overlap=1.0, ecc=True, cells=0.9)
    assert v.accept(good) and v.accept(replace(good, aniso=1.2, scale=0.8))
    assert not v.accept(replace(good, scale=0.55)) and not v.accept(replace(good, scale=1.5))
    assert not v.accept(replace(good, aniso=1.43))


def _photo(stem: str) -> tuple[str, Image.Image]:
    return stem, Image.open(PHOTOS / f"{stem}.jpg").convert("RGB")


def _pairs(tmp_path, pics: list[Image.Image], **settings) -> tuple[set[tuple[int, int]], dict]:
    """find_pairs over the pictures (JPEG q90), embeddings off: accepted pairs and families."""
    paths = []
    for k, pic in enumerate(pics):
        paths.append(tmp_path / f"{k}.jpg")
        paths[-1].write_bytes(support.encode(pic, "JPEG", quality=90))
    hx, sigs = zip(*(dedup.hash_image(p) for p in paths))
    h, th = dedup.hex_to_u64(list(hx)), dedup.thumbs_to_array(list(sigs))
    pairs, fam = dedup.find_pairs(h, th, paths, DedupSettings(embeddings=False, **settings))
    return {tuple(map(int, q)) for q in pairs}, fam


def test_flat_pictures_are_proposed_by_their_flat_neighbours(tmp_path):
    """A paper texture has no 8x8 layout (the layout family skips it) and a hash of noise: its
    10%-cropped copy is found through the flat family, and verified."""
    name, paper = _photo("lookalike_mrmamurk_mamurk_b_1")
    crop, _ = realphotos.apply("crop10_side", paper, random.Random(f"{name}-crop10_side"))
    others = [im for _, im in _photos("photo")[:4]]
    pairs, fam = _pairs(tmp_path, [paper, crop, *others])
    sigs = dedup.thumbs_to_array([dedup.hash_image(tmp_path / f"{k}.jpg")[1] for k in (0, 1)])
    assert not dedup.layout_vectors(sigs)[2].any(), "not flat: the layout family would propose it"
    assert (0, 1) in pairs and fam["flat"]["accepted"] >= 1, fam
    assert not any(0 in p or 1 in p for p in pairs - {(0, 1)})


def test_a_framed_rotated_copy_is_proposed_by_the_centre_layout(tmp_path):
    """Rotated by 4 degrees (black corners) inside a wide light frame: the whole 8x8 layout no
    longer correlates, its centre does."""
    _, im = _photo("photo_bridge_by_sander_klootwijk")
    copy = ImageOps.expand(im.rotate(4, resample=Image.BICUBIC, fillcolor=(0, 0, 0)), border=(30, 60, 30, 30), fill=(230, 230, 230))
    others = [im for n, im in _photos("photo") if "bridge" not in n][:4]
    pairs, fam = _pairs(tmp_path, [im, copy, *others], regions=False)
    sigs = dedup.thumbs_to_array([dedup.hash_image(tmp_path / f"{k}.jpg")[1] for k in (0, 1)])
    v, _, _ = dedup.layout_vectors(sigs)
    assert float(v[0] @ v[1]) < DedupSettings().layout_min_corr, "the whole layout would find it"
    assert (0, 1) in pairs and fam["centre"]["accepted"] >= 1, fam


def test_padding_bars_are_not_compared_as_content(tmp_path):
    """A letterboxed copy against a screenshot-framed copy of the same photo: the black bars lie
    over the frame and the picture, but margins are left out of the correlation."""
    name, im = _photo("photo_explore_world_animals_002")
    pad, how = realphotos.apply("pad", im, random.Random(f"{name}-pad"))
    border, _ = realphotos.apply("border", im, random.Random(f"{name}-border"))
    assert "letterbox black" in how
    ok, m = _verify(tmp_path, border, pad)
    assert ok and m.ncc >= 0.9, m


def test_verification_holds_at_most_max_features_and_decides_the_same(tmp_path):
    """A feature cache smaller than the pairs' images (a catalog too big to keep every image's
    features) recomputes what it dropped and accepts exactly the pairs an unbounded one does."""
    photos = _photos("photo")[:4]
    paths = []
    for k, (_, im) in enumerate(photos):
        for kind in ("orig", "hflip", "crop5_all"):
            copy = im if kind == "orig" else realphotos.apply(kind, im, random.Random(k))[0]
            paths.append(tmp_path / f"{k}_{kind}.jpg")
            paths[-1].write_bytes(support.encode(copy, "JPEG", quality=90))
    pairs = np.array([(i, j) for i in range(len(paths)) for j in range(i + 1, len(paths))], np.int64)
    mirror = np.array([("hflip" in paths[i].name) != ("hflip" in paths[j].name) for i, j in pairs])
    seen = []

    class Watched(dedup.Verifier):
        def _one(self, pairs, mirror, k):
            seen.append(len(self.features))
            return super()._one(pairs, mirror, k)

    full = dedup.Verifier(paths, 20).verify(pairs, mirror)
    small = Watched(paths, 20, max_features=4)
    assert np.array_equal(small.verify(pairs, mirror), full)
    assert max(seen) <= 4 and len(seen) == len(pairs)
    same = [paths[i].name.split("_")[0] == paths[j].name.split("_")[0] for i, j in pairs]
    assert full[np.array(same)].all() and not full[~np.array(same)].any()


def _dark(im: Image.Image) -> Image.Image:
    """The photo as a night-sky picture: mostly black, its structure faint."""
    g = np.asarray(im.convert("L"), np.float32)
    return Image.fromarray(np.clip((g - 90) * 0.35, 0, 255).astype(np.uint8)).convert("RGB")


@pytest.mark.parametrize("exact", [True, False])
def test_keypoint_family_pairs_framed_and_captioned_copies_of_dark_pictures(tmp_path, monkeypatch, exact):
    """A screenshot frame or a caption over a near-black picture is most of what its hash and
    layout see; its keypoints are still the picture's. The family pairs copies (through exact and
    HNSW search alike); what it proposes is verified like any candidate. Off with keypoints: false."""
    if not exact:
        monkeypatch.setattr(dedup, "_KP_EXACT", 0)
    photos = [_dark(im) for _, im in _photos("photo")[:3]]
    pics = []
    for k, im in enumerate(photos):
        pics += [im, realphotos.apply("border", im, random.Random(k))[0], realphotos.apply("text", im, random.Random(k))[0]]
    paths = []
    for k, pic in enumerate(pics):
        paths.append(tmp_path / f"{k}.jpg")
        paths[-1].write_bytes(support.encode(pic, "JPEG", quality=90))
    v = dedup.Verifier(paths, 20)
    found = {tuple(map(int, q)) for q in dedup.keypoint_pairs(v.descriptors(range(len(paths))))}
    copies = {(3 * k + a, 3 * k + b) for k in range(3) for a, b in ((0, 1), (0, 2), (1, 2))}
    assert len(found & copies) >= 5 and all({(3 * k, 3 * k + 1), (3 * k, 3 * k + 2)} & found for k in range(3))
    hx, sigs = zip(*(dedup.hash_image(p) for p in paths))
    on, fam = dedup.find_pairs(dedup.hex_to_u64(list(hx)), dedup.thumbs_to_array(list(sigs)), paths,
                               DedupSettings(embeddings=False))
    # candidates may join two captions (same words); verification keeps only copies
    assert fam["keypoints"]["candidates"] >= 1 and all(i // 3 == j // 3 for i, j in on)
    _, off = dedup.find_pairs(dedup.hex_to_u64(list(hx)), dedup.thumbs_to_array(list(sigs)), paths,
                              DedupSettings(embeddings=False, keypoints=False))
    assert "keypoints" not in off
