from pathlib import Path

import cv2
import numpy as np
import polars as pl
import pytest
from PIL import Image, ImageEnhance

from curation import catalog, dedup, ingest
from curation.config import parse_manifest
from tests import support
from tests.curation.test_clip_score import tiny_clip  # noqa: F401 - the session fixture

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "dedup"


# ---------------------------------------------------------------- search


def _planted_hashes(rng, n, flips_max):
    base = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    near = base.copy()
    for k in range(n):
        for b in rng.choice(64, size=rng.integers(0, flips_max + 1), replace=False):
            near[k] ^= np.uint64(1) << np.uint64(b)
    return np.concatenate([base, near, base[:20]])  # + exact copies


@pytest.mark.parametrize("threshold", [0, 3, 8, 10, 14])
def test_near_pairs_is_exact(threshold):
    rng = np.random.default_rng(threshold)
    h = _planted_hashes(rng, 1500, 12)  # 3020 hashes: the multi-index path, not the dense one
    got = dedup.near_pairs(h, threshold)
    d = np.bitwise_count(h[:, None] ^ h[None, :])
    i, j = np.nonzero(np.triu(d <= threshold, 1))
    want = np.stack([i, j], 1)
    assert got.shape == want.shape and np.array_equal(got, want)


@pytest.mark.parametrize("n,t", [(5_000, 0), (100_000, 8), (1_000_000, 8), (1_000_000, 10), (1_000_000, 20)])
def test_layout_is_a_valid_pigeonhole_cover(n, t):
    layout = dedup._layout(n, t)
    assert sum(b for b, _ in layout) <= 64 and max(b for b, _ in layout) <= dedup._MAX_CHUNK_BITS
    assert sum(r + 1 for _, r in layout) >= t + 1


def test_candidate_pairs_is_exact_for_small_identical_hash_groups():
    rng = np.random.default_rng(7)
    h = _planted_hashes(rng, 1200, 10)
    h = np.concatenate([h, h[:300], h[:40]])  # identical hashes: groups of 2-4
    thumbs = rng.integers(0, 255, size=(len(h), dedup._SIG)).astype(np.uint8)
    got = dedup.candidate_pairs(h, thumbs, 10)
    d = np.bitwise_count(h[:, None] ^ h[None, :])
    i, j = np.nonzero(np.triu(d <= 10, 1))
    assert np.array_equal(got, np.stack([i, j], 1))


def test_candidate_pairs_bounds_identical_hash_groups():
    h = np.zeros(500, np.uint64)  # 500 blank images with one hash: no 125k-pair blow-up
    thumbs = np.tile(np.arange(500, dtype=np.float32)[:, None], (1, dedup._SIG))
    p = dedup.candidate_pairs(h, thumbs, 8)
    assert len(p) <= 500 * dedup._SAME_HASH_WINDOW
    assert dedup.components(500, p).max() == 0  # still one connected group


def _sig(thumb8, orient=128):
    """A guard signature from an 8x8 thumbnail (upsampled to the stored 16x16) and an orientation."""
    t16 = np.kron(np.asarray(thumb8, np.float32).reshape(8, 8), np.ones((2, 2), np.float32)).ravel()
    return np.concatenate([t16, [orient]])


def test_guard_vetoes_structurally_different_thumbnails():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 255, size=(3, 64)).astype(np.float32)
    a = np.stack([_sig(x) for x in t])
    b = np.stack([_sig(t[0] * 0.7 + 40), _sig(rng.integers(0, 255, size=64)), _sig(np.full(64, 128.0))])
    assert dedup.thumb_similar(a, b, 0.8).tolist() == [True, False, False]
    flat = np.stack([_sig(np.full(64, 100.0))] * 3)
    other = np.stack([_sig(np.full(64, 103.0)), _sig(np.full(64, 140.0)), _sig(np.full(64, 100.0), orient=250)])
    assert dedup.thumb_similar(flat, other, 0.8).tolist() == [True, False, False]
    # same 8x8 layout, different detail at 16x16: vetoed
    fine = a[:1].copy()
    fine[0, :256] = rng.integers(0, 255, size=256)
    coarse = fine.copy()
    coarse[0, :256] = np.kron(fine[0, :256].reshape(16, 16).reshape(8, 2, 8, 2).mean((1, 3)), np.ones((2, 2))).ravel()
    assert dedup.thumb_similar(fine, coarse, 0.8).tolist() == [False]


def _stripes(horizontal: bool, size=256, period=16) -> Image.Image:
    arr = np.full((size, size), 255, np.uint8)
    if horizontal:
        arr[period // 2 :: period, :] = 0
    else:
        arr[:, period // 2 :: period] = 0
    return Image.fromarray(arr).convert("RGB")


def test_low_texture_images_with_close_hashes_are_not_merged(tmp_path, workspace):
    """Fine stripes average away in both a 64-bit hash and an 8x8 thumbnail (pHash distance 8 here);
    the orientation part of the guard keeps them apart, while their real copies still match."""
    root = tmp_path / "tree"
    h, v = _stripes(True), _stripes(False)
    support.write(root / "cat" / "h.png", support.encode(h, "PNG"))
    support.write(root / "cat" / "v.png", support.encode(v, "PNG"))
    support.write(root / "cat" / "h_copy.jpg", support.encode(h.resize((200, 200)), "JPEG", quality=80))
    m = manifest_for(root)
    ingest.run(m, workspace, show_progress=False)
    s = dedup.run(m, workspace, show_progress=False)
    df = _by_file(catalog.read(workspace))
    hashes = dict(zip(df["file"], dedup.hex_to_u64(df["phash"].to_list())))
    assert int(np.bitwise_count(hashes["h.png"] ^ hashes["v.png"])) <= m.dedup.threshold  # the trap is real
    groups = dict(zip(df["file"], df["dup_group"]))
    assert groups["h.png"] is not None and groups["h.png"] == groups["h_copy.jpg"]
    assert groups["v.png"] is None
    assert s.guard_rejected_pairs >= 1


# ---------------------------------------------------------------- stage, end to end


def variants(im: Image.Image) -> dict[str, bytes]:
    """Planted near duplicates of one image, each as the bytes a scraper could have found."""
    # 2% per side: a slight crop. Global perceptual hashes lose crops quickly (4% per side moves
    # line drawings 12-14 bits); the benchmark measures the harder 4% crop for both tools.
    return support.planted_copies(im, crop=0.02)


def committed_images() -> list[tuple[str, Image.Image]]:
    out = []
    for p in sorted(ASSETS.glob("*.png")):
        im = Image.open(p).convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        out.append((p.stem, Image.alpha_composite(bg, im).convert("RGB")))
    return out


def manifest_for(root: Path, **dedup_settings):
    return parse_manifest(
        {
            "name": "t",
            "classes": [{"name": "cat"}, {"name": "dog"}],
            "sources": [{"type": "folder", "path": str(root), "license": "cc-by"}],
            "dedup": dedup_settings,
        }
    )


@pytest.fixture
def planted(tmp_path):
    """A tree with originals (generated and committed), their planted copies, and distinct images."""
    root = tmp_path / "tree"
    originals = [(f"tex{s}", support.textured(s, (320, 240))) for s in range(6)] + committed_images()
    assert len(originals) >= 9, "committed assets missing"
    truth: dict[str, str] = {}  # file name -> original name
    for k, (name, im) in enumerate(originals):
        label = "cat" if k % 2 == 0 else "dog"
        support.write(root / label / f"{name}.jpg", support.encode(im, "JPEG", quality=92))
        truth[f"{name}.jpg"] = name
        for v, data in variants(im).items():
            ext = "png" if v == "png" else "jpg"
            support.write(root / label / f"{name}_{v}.{ext}", data)
            truth[f"{name}_{v}.{ext}"] = name
    for s in range(100, 130):  # distinct images: must stay singletons
        support.write(root / ("cat" if s % 2 else "dog") / f"distinct{s}.jpg", support.jpeg(s, (200, 150)))
        truth[f"distinct{s}.jpg"] = f"distinct{s}"
    return root, truth


def _by_file(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(pl.col("source_url").str.split("/").list.last().alias("file"))


def test_planted_duplicates_found_distinct_kept_and_rerun_is_a_no_op(planted, workspace):
    root, truth = planted
    m = manifest_for(root)
    ingest.run(m, workspace, show_progress=False)
    s = dedup.run(m, workspace, show_progress=False)
    df = _by_file(catalog.read(workspace))
    assert df.height == len(truth) and s.hashed == len(truth) and s.hash_failed == 0

    df = df.with_columns(pl.col("file").replace_strict(truth).alias("truth"))
    # every planted copy is in its original's group, and no group mixes two originals
    per_truth = df.group_by("truth").agg(pl.col("dup_group").n_unique().alias("groups"), pl.col("dup_group").first())
    originals = per_truth.filter(~pl.col("truth").str.starts_with("distinct"))
    missed = df.filter(~pl.col("truth").str.starts_with("distinct") & pl.col("dup_group").is_null())["file"].to_list()
    assert missed == []
    assert originals["groups"].to_list() == [1] * originals.height
    grouped = df.filter(pl.col("dup_group").is_not_null())
    assert grouped.group_by("dup_group").agg(pl.col("truth").n_unique()).filter(pl.col("truth") > 1).height == 0
    distinct = df.filter(pl.col("truth").str.starts_with("distinct"))
    assert distinct["dup_group"].null_count() == distinct.height
    assert set(distinct["status"]) == {"candidate"}

    # one representative per group, the largest image, kept as candidate; the rest rejected
    for _, g in df.filter(pl.col("dup_group").is_not_null()).group_by("dup_group"):
        rep = g.filter(pl.col("image_id") == pl.col("dup_group"))
        assert rep.height == 1 and rep["status"][0] == "candidate" and rep["dup_of"][0] is None
        assert (rep["width"][0] * rep["height"][0]) == (g["width"] * g["height"]).max()
        rest = g.filter(pl.col("image_id") != pl.col("dup_group"))
        assert set(rest["status"]) == {"rejected"} and set(rest["reason"]) == {"duplicate"}
        assert set(rest["dup_of"]) == {rep["image_id"][0]}
    assert s.groups == originals.height and s.duplicates == originals.height * 6
    assert s.label_conflict_groups == 0 and not df["label_conflict"].any()

    report = workspace.root / "stages" / "dedup"
    assert (report / "groups.parquet").exists() and (report / "summary.json").exists()
    assert pl.read_parquet(report / "groups.parquet").height == originals.height * 7

    before = workspace.catalog_path.read_bytes()
    s2 = dedup.run(m, workspace, show_progress=False)
    assert s2.hashed == 0 and s2.rows_changed == 0
    assert workspace.catalog_path.read_bytes() == before


def test_cross_label_duplicates_are_conflicts_not_resolved(tmp_path, workspace):
    root = tmp_path / "tree"
    im = support.textured(1, (320, 240))
    support.write(root / "cat" / "a.jpg", support.encode(im, "JPEG", quality=92))
    support.write(root / "dog" / "a_small.jpg", support.encode(im.resize((160, 120)), "JPEG", quality=90))
    exact = support.jpeg(2, (200, 150))
    support.write(root / "cat" / "b.jpg", exact)
    support.write(root / "dog" / "b.jpg", exact)  # same bytes, other label: one row, two sightings
    support.write(root / "cat" / "c.jpg", support.jpeg(3, (200, 150)))
    m = manifest_for(root)
    ingest.run(m, workspace, show_progress=False)
    s = dedup.run(m, workspace, show_progress=False)
    df = _by_file(catalog.read(workspace))
    a = df.filter(pl.col("file").is_in(["a.jpg", "a_small.jpg"]))
    assert a["label_conflict"].to_list() == [True, True] and a["dup_group"].n_unique() == 1
    # not resolved: each label keeps its image for the reviewer
    assert a["status"].to_list() == ["candidate", "candidate"] and a["dup_of"].null_count() == 2
    assert df.filter(pl.col("file") == "b.jpg")["label_conflict"].to_list() == [True]
    assert df.filter(pl.col("file") == "c.jpg")["label_conflict"].to_list() == [False]
    assert s.label_conflict_groups == 2 and s.exact_duplicate_sightings == 1
    conflicts = pl.read_csv(workspace.root / "stages" / "dedup" / "label_conflicts.csv")
    assert conflicts.height == 3


def test_equal_copies_keep_the_same_image_whatever_the_order_files_were_read_in(tmp_path, workspace):
    """Two files of the same pixels and size, differing only in a JPEG comment, tie on every
    quality: the kept one must not depend on which thread read its file first. One ingest stamps
    its rows with one time, so the tie falls to the image id."""
    import hashlib
    import io

    im = support.textured(7, (320, 240))

    def enc(comment: bytes) -> bytes:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=92, comment=comment)
        return buf.getvalue()

    small, big = sorted((enc(b"copy-A"), enc(b"copy-B")), key=lambda b: hashlib.sha256(b).hexdigest())
    root = tmp_path / "tree"
    support.write(root / "cat" / "a.jpg", big)  # read first
    support.write(root / "cat" / "b.jpg", small)
    m = manifest_for(root)
    ingest.run(m, workspace, show_progress=False)
    dedup.run(m, workspace, show_progress=False)
    df = _by_file(catalog.read(workspace))
    assert df["retrieved_at"].n_unique() == 1
    kept = df.filter(pl.col("status") == "candidate")
    assert kept["file"].to_list() == ["b.jpg"] and kept["image_id"].to_list() == [hashlib.sha256(small).hexdigest()]
    assert df.filter(pl.col("file") == "a.jpg")["reason"].to_list() == ["duplicate"]


def test_new_images_only_are_hashed_and_kind_change_rehashes(tmp_path, workspace, monkeypatch):
    root = tmp_path / "tree"
    for s in range(4):
        support.write(root / "cat" / f"{s}.jpg", support.jpeg(s, (200, 150)))
    m = manifest_for(root)
    ingest.run(m, workspace, show_progress=False)
    assert dedup.run(m, workspace, show_progress=False).hashed == 4

    calls = []
    real = dedup.hash_files
    monkeypatch.setattr(dedup, "hash_files", lambda ps, k, **kw: calls.extend(ps) or real(ps, k, **kw))
    im = support.textured(0, (200, 150))
    support.write(root / "dog" / "new.jpg", support.jpeg(9, (200, 150)))
    support.write(root / "dog" / "copy.jpg", support.encode(im.resize((100, 75)), "JPEG", quality=60))
    ingest.run(m, workspace, show_progress=False)
    s = dedup.run(m, workspace, show_progress=False)
    assert s.hashed == 2 and len(calls) == 2
    df = _by_file(catalog.read(workspace))
    copy = df.filter(pl.col("file") == "copy.jpg").row(0, named=True)
    assert copy["dup_group"] == df.filter(pl.col("file") == "0.jpg")["image_id"][0] and copy["label_conflict"]

    calls.clear()
    s = dedup.run(manifest_for(root, hash="dhash"), workspace, show_progress=False)
    assert s.hashed == 6 and set(catalog.read(workspace)["hash_kind"]) == {"dhash"}


def test_review_decisions_and_other_rejections_are_never_overwritten(tmp_path, workspace):
    root = tmp_path / "tree"
    im = support.textured(4, (320, 240))
    support.write(root / "cat" / "orig.jpg", support.encode(im.resize((160, 120)), "JPEG", quality=92))
    support.write(root / "cat" / "accepted_copy.jpg", support.encode(im.resize((120, 90)), "JPEG", quality=80))
    # the largest copy, but rejected for another reason: must not become the representative
    support.write(root / "horse" / "big.jpg", support.encode(im, "JPEG", quality=92))
    support.write(root / "cat" / "lonely.jpg", support.jpeg(5, (200, 150)))
    m = manifest_for(root)
    ingest.run(m, workspace, show_progress=False)
    df = _by_file(catalog.read(workspace))
    ids = dict(zip(df["file"], df["image_id"]))
    upd = pl.DataFrame({
        "image_id": [ids["accepted_copy.jpg"], ids["lonely.jpg"]],
        "status": ["accepted", "rejected"], "reason": [None, "duplicate"],  # lonely: a stale decision
    })
    catalog.write(workspace, catalog.update(catalog.read(workspace), upd))

    s = dedup.run(m, workspace, show_progress=False)
    df = _by_file(catalog.read(workspace)).sort("file")
    row = {r["file"]: r for r in df.iter_rows(named=True)}
    # accepted wins representative over larger candidates (a human chose it); it is never rejected
    assert row["accepted_copy.jpg"]["status"] == "accepted" and row["accepted_copy.jpg"]["dup_of"] is None
    assert row["orig.jpg"]["reason"] == "duplicate" and row["orig.jpg"]["dup_of"] == ids["accepted_copy.jpg"]
    assert (row["big.jpg"]["status"], row["big.jpg"]["reason"]) == ("rejected", "class_not_in_manifest")
    assert row["big.jpg"]["dup_of"] == ids["accepted_copy.jpg"]
    assert (row["lonely.jpg"]["status"], row["lonely.jpg"]["reason"]) == ("candidate", None)
    assert s.released == 1


def test_hash_files_in_worker_processes_matches_direct_hashing(tmp_path):
    paths = []
    for i in range(300):  # above the size where worker processes take over from threads
        p = tmp_path / f"{i}.jpg"
        p.write_bytes(support.jpeg(i % 7, (64, 48), quality=80))
        paths.append(p)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    paths.insert(5, broken)
    got = list(dedup.hash_files(paths))
    assert len(got) == 301 and got[5][0] is None and got[5][2]
    for p, (h, sig, err) in list(zip(paths, got))[:12]:
        if p != broken:
            assert (h, sig, err) == (*dedup.hash_image(p), None)


def test_unreadable_stored_file_is_counted_not_fatal(tmp_path, workspace):
    root = tmp_path / "tree"
    for s in range(3):
        support.write(root / "cat" / f"{s}.jpg", support.jpeg(s, (200, 150)))
    m = manifest_for(root)
    ingest.run(m, workspace, show_progress=False)
    victim = catalog.read(workspace)["path"][0]
    (workspace.root / victim).write_bytes(b"gone")
    s = dedup.run(m, workspace, show_progress=False)
    assert (s.hashed, s.hash_failed) == (2, 1)


def test_cli_dedup(tmp_path):
    from typer.testing import CliRunner

    from curation.cli import app

    root = tmp_path / "tree"
    im = support.textured(6, (200, 150))
    support.write(root / "cat" / "a.jpg", support.encode(im, "JPEG", quality=92))
    support.write(root / "cat" / "b.png", support.encode(im, "PNG"))
    mpath = tmp_path / "m.yaml"
    mpath.write_text(f"name: t\nclasses: [{{name: cat}}]\nsources: [{{type: folder, path: {root}}}]\n")
    ws = tmp_path / "ws"
    r = CliRunner().invoke(app, ["ingest", "-m", str(mpath), "-w", str(ws), "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["dedup", "-m", str(mpath), "-w", str(ws), "-q"])
    assert r.exit_code == 0, r.output
    assert "1 duplicate groups, 1 duplicates" in r.output


# ---------------------------------------------------------------- grouping, families, leaks


def test_a_chain_of_matches_does_not_form_one_group():
    """A~B and B~C but not A~C: connected components would make one group of three; grouping
    by representative keeps C out of A's group, since C never matched A."""
    a, b, c, d, e = range(5)
    pairs = np.array([[a, b], [b, c], [d, e]])
    order = np.array([a, b, c, d, e])  # A ranks first (e.g. the largest): A is the representative
    g = dedup.star_groups(order, 5, pairs)
    assert g[a] == g[b] >= 0 and g[c] == -1  # C: no unassigned neighbour left, no group
    assert g[d] == g[e] >= 0 and g[d] != g[a]
    assert dedup.components(5, pairs)[c] == dedup.components(5, pairs)[a]  # what chaining did


def _ranked(rows: list[tuple], pairs: np.ndarray, **kw) -> list[str]:
    """Image ids in `_rank_frame` order; rows: (image_id, width, height, share inside margins,
    medoid score, file bytes)."""
    deg = np.bincount(pairs.ravel(), minlength=len(rows)) if len(pairs) else np.zeros(len(rows), np.int64)
    f = pl.DataFrame({
        "image_id": [r[0] for r in rows], "width": [r[1] for r in rows], "height": [r[2] for r in rows],
        "_content": [r[3] for r in rows], "_medoid": [float(r[4]) for r in rows], "_bytes": [r[5] for r in rows],
        "_degree": deg, "_comp": [0] * len(rows), "status": "candidate", "reason": None, "license": "cc-by",
        "retrieved_at": [f"2026-01-0{k + 1}" for k in range(len(rows))],
    }, schema_overrides={"reason": pl.Utf8})
    return dedup._rank_frame(f, **kw)["image_id"].to_list()


def test_the_most_matched_image_is_the_centre_so_a_large_framed_copy_does_not_split_a_group():
    """A framed copy is the largest image; the rotated copy matches the original and its q25
    copy but not the frame. Largest-first made the frame a centre and left the rotated copy out;
    the most-matched image (the original) as centre takes them all."""
    rows = [("framed", 1600, 1100, 1.0, 0, 0), ("orig", 1280, 900, 1.0, 0, 0), ("q25", 1280, 900, 1.0, 0, 0),
            ("rotated", 1280, 900, 1.0, 0, 0), ("half", 640, 450, 1.0, 0, 0)]
    framed, orig, q25, rot, half = range(5)
    pairs = np.array([[framed, orig], [framed, q25], [framed, half], [orig, q25], [orig, rot], [orig, half],
                      [q25, rot], [q25, half]])
    idx = {r[0]: k for k, r in enumerate(rows)}
    centres = np.array([idx[i] for i in _ranked(rows, pairs, centres=True)])
    assert centres[0] == orig
    g = dedup.star_groups(centres, 5, pairs)
    assert (g == g[orig]).all()
    largest_first = np.array([idx[i] for i in _ranked(rows, pairs)])
    assert largest_first[0] == framed and dedup.star_groups(largest_first, 5, pairs)[rot] == -1  # what it did


def test_the_image_kept_is_typical_then_largest_then_least_compressed():
    """The medoid's neighbourhood first (a frame makes a copy larger and atypical), then the
    largest (the half-size copy is typical too), then the most bytes per pixel (not the q25 copy),
    then the unpadded copy."""
    thumbs = np.array([[100.0] * 4, [100, 100, 101, 100], [90, 95, 100, 100], [100, 100, 100, 102], [160, 40, 100, 100]])
    medoid = dedup.medoid_scores(thumbs, np.array([0, 0, 0, 0, 0]))
    assert medoid.argmax() == 0 and medoid.argmin() == 4 and (dedup.medoid_scores(thumbs, np.full(5, -1)) == 0).all()
    x = np.random.default_rng(0).normal(128, 30, (300, 16)) + np.linspace(0, 60, 300)[:, None]  # the middle is typical
    exact = -np.sqrt(((x[:, None] - x[None]) ** 2).mean(2)).sum(1) / 299
    assert np.allclose(dedup.medoid_scores(x, np.zeros(300, int)), exact, atol=1e-3)
    sampled = dedup.medoid_scores(x, np.zeros(300, int), max_ref=40)  # a big group: against 40 of its members
    assert np.corrcoef(sampled, exact)[0, 1] > 0.95
    rows = [("framed", 1600, 1100, 1.0, -9.0, 900_000), ("q25", 1280, 900, 1.0, -1.2, 90_000),  # q25 retrieved first
            ("orig", 1280, 900, 1.0, -1.0, 400_000), ("half", 640, 450, 1.0, -1.1, 110_000)]
    assert _ranked(rows, np.empty((0, 2), np.int64)) == ["orig", "q25", "half", "framed"]
    # of the same picture size and compression, the unpadded copy over the padded one
    same = [("padded", 1400, 1000, 0.82, -1.0, 1_400_000), ("plain", 1280, 900, 1.0, -1.0, 1_152_000)]  # 1 byte a pixel
    assert _ranked(same, np.empty((0, 2), np.int64))[0] == "plain"


def _scene(seed: int, size=(480, 360)) -> Image.Image:
    """A picture with corners (shapes on a textured ground): what ORB needs, as real photos have.
    Pure smooth-plus-noise images give ORB almost nothing that survives a JPEG round trip."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    im = support.textured(seed, size)
    d = ImageDraw.Draw(im)
    w, h = size
    for _ in range(40):
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(8, 40))
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            d.rectangle((x, y, x + r, y + int(rng.integers(8, 40))), fill=col)
        else:
            d.polygon([(x, y), (x + r, y + int(rng.integers(-20, 20))), (x + int(rng.integers(-20, 20)), y + r)], fill=col)
    return im


def test_flipped_and_cropped_copies_are_found(tmp_path, workspace):
    root = tmp_path / "tree"
    im = _scene(31)
    support.write(root / "cat" / "orig.jpg", support.encode(im, "JPEG", quality=92))
    flipped = im.transpose(Image.FLIP_LEFT_RIGHT)
    support.write(root / "cat" / "flip.jpg", support.encode(flipped, "JPEG", quality=85))
    support.write(root / "cat" / "crop.jpg", support.encode(im.crop((48, 36, 432, 324)), "JPEG", quality=85))
    for s in range(40, 46):
        support.write(root / "dog" / f"other{s}.jpg", support.encode(_scene(s), "JPEG", quality=90))
    m = manifest_for(root, regions=False)  # the region family would find the flip first
    ingest.run(m, workspace, show_progress=False)
    s = dedup.run(m, workspace, show_progress=False)
    df = _by_file(catalog.read(workspace))
    g = dict(zip(df["file"], df["dup_group"]))
    ids = dict(zip(df["file"], df["image_id"]))
    # one group; the representative is one of the two full-size pictures (the crop is smaller)
    assert g["orig.jpg"] == g["flip.jpg"] == g["crop.jpg"] in (ids["orig.jpg"], ids["flip.jpg"])
    assert all(g[f"other{k}.jpg"] is None for k in range(40, 46))
    h = dict(zip(df["file"], dedup.hex_to_u64(df["phash"].to_list())))
    assert int(np.bitwise_count(h["orig.jpg"] ^ h["flip.jpg"])) > m.dedup.threshold  # the hash alone misses it
    assert s.families["mirror"]["accepted"] >= 1
    summary = (workspace.root / "stages" / "dedup" / "summary.json").read_text()
    assert '"mirror"' in summary and '"layout"' in summary
    sheet = workspace.root / "stages" / "dedup" / "contact_sheet.png"
    with Image.open(sheet) as im_sheet:
        assert im_sheet.width > 3 * dedup._TILE and im_sheet.height >= dedup._TILE


def test_region_hashes_find_crops_borders_and_flips(tmp_path):
    """Central-region hashes, searched across scales, propose what whole-picture hashes miss:
    a 10% crop of every side (the original's centre), a framed copy (its centre is the
    original) and a flip (through the mirrored hash, verified mirrored)."""
    from PIL import ImageOps

    im = _scene(81)
    pics = {
        "orig": im,
        "crop": im.crop((48, 36, 432, 324)),
        "frame": ImageOps.expand(im, border=(24, 36, 24, 24), fill=(60, 90, 140)),
        "flip": im.transpose(Image.FLIP_LEFT_RIGHT),
        "other": _scene(82),
    }
    paths = []
    for name, pic in pics.items():
        paths.append(tmp_path / f"{name}.jpg")
        paths[-1].write_bytes(support.encode(pic, "JPEG", quality=88))
    hx, sigs = zip(*(dedup.hash_image(p) for p in paths))
    h, th = dedup.hex_to_u64(list(hx)), dedup.thumbs_to_array(list(sigs))
    t = 10
    assert all(int(np.bitwise_count(h[0] ^ h[k])) > t for k in (1, 2, 3))  # the whole-picture hash misses all three
    direct, mirrored = dedup.region_pairs(h, th, t)
    assert {(0, 1), (0, 2)} <= {tuple(sorted(map(int, q))) for q in direct}
    assert (0, 3) in {tuple(sorted(map(int, q))) for q in mirrored}
    assert 4 not in direct and 4 not in mirrored

    def found(**kw):
        s = manifest_for(tmp_path, layout=False, embeddings=False, keypoints=False, **kw).dedup
        pairs, fam = dedup.find_pairs(h, th, paths, s)
        return {tuple(map(int, q)) for q in pairs}, fam

    on, fam = found()
    assert {(0, 1), (0, 2), (0, 3)} <= on and not any(4 in q for q in on)
    assert fam["region"]["accepted"] >= 2 and fam["region_mirror"]["accepted"] >= 1
    off, _ = found(regions=False)
    assert not {(0, 1), (0, 2), (0, 3)} & off


def test_a_portrait_letterboxed_into_a_wide_frame_hashes_like_the_original(tmp_path):
    """White bars take 62% of the width (a 9:16 picture shown 16:9): the margins are cut."""
    im = _scene(83, (216, 384))
    wide = Image.new("RGB", (683, 384), (255, 255, 255))
    wide.paste(im, (233, 0))
    pa, pb = tmp_path / "a.jpg", tmp_path / "b.jpg"
    pa.write_bytes(support.encode(im, "JPEG", quality=90))
    pb.write_bytes(support.encode(wide, "JPEG", quality=90))
    (ha, _), (hb, _) = dedup.hash_image(pa), dedup.hash_image(pb)
    assert int(np.bitwise_count(dedup.hex_to_u64([ha])[0] ^ dedup.hex_to_u64([hb])[0])) <= 6


def test_margins_are_trimmed_evenly_so_a_padded_copy_and_its_original_keep_the_same_picture():
    """Black reaching the edges unevenly (a night sky) is cut by the same width from both sides:
    padding the picture by 20 px a side then cuts exactly 20 px more."""
    rng = np.random.default_rng(3)
    pic = np.zeros((120, 100), np.float32)
    pic[10:90, :] = rng.uniform(40, 200, (80, 100))  # black: 10 rows above, 30 below
    assert dedup.margin_box(pic) == (0, 10, 100, 110)
    padded = np.zeros((160, 100), np.float32)
    padded[20:140] = pic
    assert dedup.margin_box(padded) == (0, 30, 100, 130)
    assert np.array_equal(padded[30:130], pic[10:110])


def test_geometry_vetoes_unrelated_pictures_with_alike_layouts(tmp_path):
    """Same coarse layout (one smooth low-frequency field), different fine content: the layout
    family proposes the pair, ORB + RANSAC finds no common geometry."""
    base = np.asarray(support.textured(50, (320, 240)).resize((8, 6)).resize((320, 240), Image.BICUBIC), np.int16)
    rng = np.random.default_rng(1)
    a = Image.fromarray(np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8))
    b = Image.fromarray(np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8))
    pa, pb, pc = tmp_path / "a.jpg", tmp_path / "b.jpg", tmp_path / "c.jpg"
    pa.write_bytes(support.encode(a, "JPEG", quality=90))
    pb.write_bytes(support.encode(b, "JPEG", quality=90))
    pc.write_bytes(support.encode(a.resize((240, 180)), "JPEG", quality=60))
    fa, fb, fc = (dedup.orb_features(p) for p in (pa, pb, pc))
    assert dedup.geometric_inliers(fa, fc) >= 20  # its own copy verifies
    assert dedup.geometric_inliers(fa, fb) < 20
    sigs = dedup.thumbs_to_array([dedup.hash_image(p)[1] for p in (pa, pb)])
    v, _, _ = dedup.layout_vectors(sigs)
    assert float(v[0] @ v[1]) > 0.9  # the trap is real: the thumbnails alone would merge them


def test_embedding_candidates_are_used_when_a_clip_cache_exists(tmp_path, workspace, tiny_clip):
    from curation import clip_score
    from tests.curation.test_clip_score import TINY

    root = tmp_path / "tree"
    im = _scene(61, (400, 300))
    support.write(root / "cat" / "orig.jpg", support.encode(im, "JPEG", quality=92))
    # cropped and brightened: far in pHash; layouts and keypoints off below, so only embeddings can propose it
    copy = ImageEnhance.Brightness(im.crop((40, 30, 360, 270))).enhance(1.3)
    support.write(root / "cat" / "copy.jpg", support.encode(copy, "JPEG", quality=85))
    for s in range(70, 74):
        support.write(root / "dog" / f"other{s}.jpg", support.encode(_scene(s, (400, 300)), "JPEG", quality=90))

    def manifest(**dd):
        return parse_manifest({
            "name": "t", "classes": [{"name": "cat"}, {"name": "dog"}],
            "sources": [{"type": "folder", "path": str(root), "license": "cc-by"}],
            "clip": {"model": TINY, "pretrained": str(tiny_clip[1]), "model_config_path": str(tiny_clip[0]),
                     "workers": 0, "batch_size": 4, "device": "cpu", "plots": False},
            "dedup": {"threshold": 0, "layout": False, "keypoints": False, "embedding_min_cos": -1.0, **dd},
        })

    m = manifest()
    ingest.run(m, workspace, show_progress=False)
    s = dedup.run(m, workspace, show_progress=False)  # no cache yet: the family does not run
    assert "embedding" not in s.families and s.embedding_cache is None and s.groups == 0
    clip_score.run(m, workspace, show_progress=False)
    s = dedup.run(m, workspace, show_progress=False)
    assert s.embedding_cache is not None and s.families["embedding"]["accepted"] >= 1
    df = _by_file(catalog.read(workspace))
    g = dict(zip(df["file"], df["dup_group"]))
    assert g["orig.jpg"] is not None and g["orig.jpg"] == g["copy.jpg"]
    assert all(g[f"other{k}.jpg"] is None for k in range(70, 74))
    off = dedup.run(manifest(embeddings=False), workspace, show_progress=False)
    assert "embedding" not in off.families and off.groups == 0


def test_copy_of_a_published_test_image_is_flagged_and_kept_out_of_train(tmp_path, workspace):
    from curation import publish

    root = tmp_path / "tree"
    test_im = _scene(81, (400, 300))
    support.write(root / "cat" / "test_img.jpg", support.encode(test_im, "JPEG", quality=92))
    for s in range(82, 92):
        support.write(root / "cat" / f"c{s}.jpg", support.encode(_scene(s, (400, 300)), "JPEG", quality=90))
    m = parse_manifest({
        "name": "t", "classes": [{"name": "cat"}],
        "sources": [{"type": "folder", "path": str(root), "license": "cc-by"}],
        "publish": {"include": "candidates"},
    })
    ingest.run(m, workspace, show_progress=False)
    dedup.run(m, workspace, show_progress=False)
    df = _by_file(catalog.read(workspace))
    ids = dict(zip(df["file"], df["image_id"]))
    # what publish wrote for version 1 (test_img in test); a reviewer then rejected the original
    upd = df.select(
        "image_id",
        pl.when(pl.col("file") == "test_img.jpg").then(pl.lit("test")).otherwise(pl.lit("train")).alias("split"),
        pl.lit(1, dtype=pl.Int32).alias("published_version"),
        pl.when(pl.col("file") == "test_img.jpg").then(pl.lit("rejected")).otherwise(pl.col("status")).alias("status"),
        pl.when(pl.col("file") == "test_img.jpg").then(pl.lit("off_topic")).otherwise(pl.col("reason")).alias("reason"),
    )
    catalog.write(workspace, catalog.update(catalog.ensure_columns(catalog.read(workspace), publish.COLUMNS), upd))
    # newly scraped: a larger, cropped copy of the test image
    support.write(root / "cat" / "new_copy.jpg", support.encode(test_im.resize((800, 600)).crop((30, 20, 780, 580)), "JPEG", quality=90))
    ingest.run(m, workspace, show_progress=False)
    s = dedup.run(m, workspace, show_progress=False)
    df = _by_file(catalog.read(workspace))
    leak = dict(zip(df["file"], df["leak_of"]))
    assert leak["new_copy.jpg"] == ids["test_img.jpg"] and s.leaks == 1
    assert all(leak[f"c{k}.jpg"] is None for k in range(82, 92))
    copy_id = df.filter(pl.col("file") == "new_copy.jpg")["image_id"][0]
    for seed in range(6):  # whatever the deal would have done (train is 80% of it), the copy is in test
        ms = m.model_copy(update={"publish": m.publish.model_copy(update={"seed": seed})})
        rows, _ = publish.select(ms, df)
        rows, _ = publish.assign_splits(ms, rows, None)
        assert dict(zip(rows["image_id"], rows["split"]))[copy_id] == "test"


def test_hashing_pool_spawns_clean_workers_under_a_sigterm_handler(tmp_path, capfd):
    """Under Prefect the process handles SIGTERM; forked workers would inherit the handler and
    print its exception when the pool terminates them."""
    import signal

    paths = []
    for i in range(300):
        p = tmp_path / f"{i}.jpg"
        p.write_bytes(support.jpeg(i % 5, (64, 48), quality=80))
        paths.append(p)

    class TerminationSignal(Exception):
        pass

    def handler(*_):
        raise TerminationSignal("SIGTERM")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        got = list(dedup.hash_files(paths))
    finally:
        signal.signal(signal.SIGTERM, old)
    assert len(got) == 300 and all(h is not None for h, _, _ in got)
    assert "TerminationSignal" not in capfd.readouterr().err


def test_batched_phashes_are_imagehash_phashes(tmp_path):
    """`hash_image`'s one-product pHashes of the picture, its central regions and its mirror are
    the bits imagehash.phash gives each of them (so hashes stay comparable with imagededup's and
    with catalogs hashed before)."""
    import imagehash

    pictures = [support.textured(seed, size) for seed, size in ((1, (640, 480)), (2, (300, 500)), (3, (1024, 200)))]
    for grey in (p.convert("L") for p in [*pictures, _stripes(True), _stripes(False)]):  # stripes: exact-zero DCT terms
        h, regions = dedup._phashes(grey)
        assert h == str(imagehash.phash(grey))
        assert regions == b"".join(bytes.fromhex(str(imagehash.phash(r))) for r in dedup._regions(grey))


def test_cell_agreement_counts_structure_present_in_one_picture_only():
    """Cells of the overlap agree when their greys correlate; a cell textured in one picture and
    flat in the other disagrees (a shared overlay over two flat pictures is not a copy), while
    brightness and contrast changes agree everywhere. Pairs whose whole overlap correlates below
    sure_ncc need doubt_cells of their cells to agree, not min_cells; with min_inliers inliers,
    agree_cells of agreeing cells stand for the whole correlation."""
    rng = np.random.default_rng(0)
    a = cv2.GaussianBlur(rng.normal(128, 30, (100, 150)).astype(np.float32), (5, 5), 0)
    eye = np.array([[1.0, 0, 0], [0, 1.0, 0]])  # b is aligned with a
    assert dedup.cell_agreement(a, a * 0.5 + 30, eye) == 1.0
    flat_cell = a.copy()
    flat_cell[:20, :30] = 128.0  # one of the 25 cells loses its texture
    assert dedup.cell_agreement(a, flat_cell, eye) == pytest.approx(24 / 25)
    other = cv2.GaussianBlur(rng.normal(128, 30, (100, 150)).astype(np.float32), (5, 5), 0)
    assert dedup.cell_agreement(a, other, eye) < 0.3
    assert dedup.cell_agreement(np.full((100, 150), 90, np.float32), np.full((100, 150), 200, np.float32), eye) == 1.0
    v = dedup.Verifier([], 20)
    assert v.accept(dedup.Match(50, 0.97, 1.0, cells=0.6))
    assert not v.accept(dedup.Match(50, 0.95, 1.0, cells=0.6))  # two dark pictures in one window frame
    assert not v.accept(dedup.Match(50, 0.85, 1.0, cells=0.6))
    assert v.accept(dedup.Match(50, 0.85, 1.0, cells=0.8))
    # a caption over a near-black picture: the whole overlap hardly correlates, its cells agree
    assert v.accept(dedup.Match(50, 0.4, 1.0, cells=0.88))
    assert not v.accept(dedup.Match(50, 0.4, 1.0, cells=0.8))
    assert not v.accept(dedup.Match(12, 0.4, 1.0, cells=0.95))  # few inliers: the whole must correlate
