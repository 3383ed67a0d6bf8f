"""CLIP scoring on a tiny open_clip model built from a config and loaded through `pretrained=<path>`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curation import catalog, clip_score, ingest
from curation.config import ManifestError, parse_manifest
from tests import support

TINY = "jc-tiny-test"
TINY_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CLASSES = ("cat", "dog", "owl")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> tuple[Path, Path]:
    """(config dir, checkpoint file) of a random tiny CLIP saved to disk like real weights."""
    import open_clip
    import torch

    d = tmp_path_factory.mktemp("tiny_clip")
    (d / "configs").mkdir()
    (d / "configs" / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(d / "configs")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY, pretrained=None)
    torch.save(model.state_dict(), d / "tiny.pt")
    return d / "configs", d / "tiny.pt"


def make_manifest(root: Path, tiny: tuple[Path, Path] | None, **clip):
    # Plots cost ~1 s per class on a busy 2-core machine: only the test that checks them draws them.
    cfg = {"workers": 0, "batch_size": 4, "device": "cpu", "plots": False, **clip}
    if tiny is not None:
        cfg = {"model": TINY, "pretrained": str(tiny[1]), "model_config_path": str(tiny[0]), **cfg}
    return parse_manifest(
        {
            "name": "t",
            "classes": [{"name": "cat", "synonyms": ["kitten"]}, {"name": "dog"}, {"name": "owl"}],
            "sources": [{"type": "folder", "path": str(root), "license": "cc0"}],
            "clip": cfg,
        }
    )


def make_tree(root: Path, per_class: int = 3, offset: int = 0) -> None:
    for ci, c in enumerate(CLASSES):
        for i in range(per_class):
            seed = 1000 * ci + i + offset
            data = support.png(seed, (90, 70)) if i == 1 else support.jpeg(seed, (200, 150))
            support.write(root / c / f"{c}{i + offset}.{'png' if i == 1 else 'jpg'}", data)


@pytest.fixture
def scored_ws(tmp_path, workspace, tiny_clip):
    root = tmp_path / "tree"
    make_tree(root)
    m = make_manifest(root, tiny_clip)
    ingest.run(m, workspace, show_progress=False)
    return m, workspace, root


def with_plots(m):
    m = m.model_copy(deep=True)
    m.clip.plots = True
    return m


def decisions_of(ws) -> dict[str, str]:
    df = catalog.read(ws)
    return dict(zip(df["image_id"], df["clip_decision"]))


@pytest.mark.slow
def test_scores_every_candidate_then_reuses_the_cache(scored_ws, tiny_clip):
    m, ws, root = scored_ws
    s = clip_score.run(with_plots(m), ws, show_progress=False)
    assert (s.eligible, s.encoded, s.cached, s.failed, s.skipped) == (9, 9, 0, 0, False)
    df = catalog.read(ws)
    assert df.filter(pl.col("clip_score").is_null()).height == 0
    assert set(df["clip_model"]) == {f"{TINY}/file:tiny.pt"}
    assert df["clip_margin"].is_between(-1, 1).all() and df["clip_real_margin"].is_between(-1, 1).all()
    assert df["clip_top_prob"].is_between(1 / 3, 1).all() and set(df["clip_top_label"]) <= set(CLASSES)
    # Scores are really the model's: the catalog's cosine equals a direct open_clip computation.
    clip = clip_score.load_model(m.clip)
    bank = clip_score.build_text_bank(clip, m)
    row = df.filter(pl.col("label") == "cat").row(0, named=True)
    emb, errs = clip_score.encode_images(clip, [str(ws.abspath(row["path"]))], workers=0)
    assert errs == [""]
    assert row["clip_score"] == pytest.approx(float(emb[0] @ bank.classes[0]), abs=1e-5)
    # Report: counts per class, thresholds used, one histogram per class.
    out = ws.stage_dir("score")
    report = pl.read_csv(out / "report.csv")
    assert report["total"].to_list() == [3, 3, 3]
    assert {p.name for p in (out / "hist").glob("*.png")} == {"cat.png", "dog.png", "owl.png"}
    assert (out / "hist" / "cat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(json.loads((out / "thresholds.json").read_text())) == set(CLASSES)

    # Second run: nothing is encoded, the same scores come back from the cache.
    before = df.sort("image_id").select("image_id", "clip_score", "clip_decision")
    s2 = clip_score.run(m, ws, show_progress=False)
    assert (s2.encoded, s2.cached) == (0, 9)
    after = catalog.read(ws).sort("image_id").select("image_id", "clip_score", "clip_decision")
    assert after.equals(before)

    # New images: only those are encoded.
    make_tree(root, per_class=1, offset=50)
    ingest.run(m, ws, show_progress=False)
    s3 = clip_score.run(m, ws, show_progress=False)
    assert (s3.encoded, s3.cached) == (3, 9)


OFF = {"min_score": None, "min_margin": None, "min_real_margin": None, "wrong_class_prob": None}


def test_thresholds_change_decisions_without_reencoding(scored_ws, tiny_clip, monkeypatch):
    m, ws, root = scored_ws
    clip_score.run(make_manifest(root, tiny_clip, thresholds={"min_score": 2.0}), ws, show_progress=False)
    df = catalog.read(ws)
    assert set(df["clip_decision"]) == {"off_topic"}
    assert set(zip(df["status"], df["reason"])) == {("rejected", "off_topic")}

    # Every check off: the stage's own rejections are undone, without encoding anything again.
    monkeypatch.setattr(clip_score, "encode_images", lambda *a, **k: pytest.fail("re-encoded"))
    s = clip_score.run(make_manifest(root, tiny_clip, thresholds=OFF), ws, show_progress=False)
    assert s.encoded == 0 and s.decisions == {"kept": 9}
    df = catalog.read(ws)
    assert set(df["status"]) == {"candidate"} and df["reason"].null_count() == df.height

    # Wrong-class flag at probability 0 flags exactly the images whose top class is another one.
    clip_score.run(make_manifest(root, tiny_clip, thresholds={**OFF, "wrong_class_prob": 0.0}), ws, show_progress=False)
    df = catalog.read(ws)
    for r in df.iter_rows(named=True):
        want = "kept" if r["clip_top_label"] == r["label"] else f"likely_{r['clip_top_label']}"
        assert r["clip_decision"] == want
        assert (r["status"], r["reason"]) == ("candidate", None)  # flagged for review, not dropped

    # The stored decisions equal decide() applied to the stored scores with the manifest's thresholds.
    dec, _ = clip_score.decide(df, m.clip)
    clip_score.run(m, ws, show_progress=False)
    assert decisions_of(ws) == dict(zip(dec["image_id"], dec["clip_decision"]))


def _frame(rows):
    return pl.DataFrame(
        rows,
        schema={"image_id": pl.Utf8, "label": pl.Utf8, "clip_score": pl.Float64, "clip_margin": pl.Float64,
                "clip_real_margin": pl.Float64, "clip_top_label": pl.Utf8, "clip_top_prob": pl.Float64},
        orient="row",
    )


def test_decide_follows_thresholds_exactly(tmp_path):
    m = make_manifest(tmp_path, None, thresholds={"min_score": 0.25, "min_margin": 0.2, "min_real_margin": 0.2,
                                                  "wrong_class_prob": 0.5})
    f = _frame([
        ("a", "cat", 0.25, 0.2, 0.2, "cat", 0.9),  # every value exactly at its threshold: kept
        ("b", "cat", 0.2499, 0.9, 0.9, "cat", 0.9),  # score just below
        ("c", "cat", 0.30, 0.1999, 0.9, "cat", 0.9),  # subject margin just below
        ("d", "cat", 0.30, 0.5, 0.1999, "cat", 0.9),  # realism just below
        ("e", "cat", 0.30, 0.5, 0.5, "dog", 0.5),  # another class at the threshold: flagged
        ("f", "cat", 0.30, 0.5, 0.5, "dog", 0.4999),  # another class below it: kept
        ("g", "cat", 0.10, 0.1, 0.1, "dog", 0.9),  # fails everything: off_topic comes first
        ("h", "cat", 0.30, 0.5, 0.1, "dog", 0.9),  # unrealistic before likely_
    ])
    dec, used = clip_score.decide(f, m.clip)
    assert dict(dec.iter_rows()) == {
        "a": "kept", "b": "off_topic", "c": "off_topic", "d": "unrealistic",
        "e": "likely_dog", "f": "kept", "g": "off_topic", "h": "unrealistic",
    }
    assert used["cat"] == {"min_score": 0.25, "min_margin": 0.2, "min_real_margin": 0.2, "wrong_class_prob": 0.5}


def test_percentile_and_per_class_thresholds(tmp_path):
    m = make_manifest(
        tmp_path, None,
        thresholds={"min_score": None, "min_margin": "30%", "min_real_margin": None, "wrong_class_prob": None},
        class_thresholds={"dog": {"min_margin": {"value": 0.55, "mode": "absolute"}}, "owl": {"min_margin": None}},
    )
    rows = []
    for label in CLASSES:
        rows += [(f"{label}{i}", label, 0.3, i / 10, 0.9, label, 0.9) for i in range(10)]
    dec, used = clip_score.decide(_frame(rows), m.clip)
    d = dict(dec.iter_rows())
    # cat: the 30th percentile of 0.0..0.9 is 0.27, so 0.0, 0.1, 0.2 fall below it.
    assert used["cat"]["min_margin"] == pytest.approx(0.27)
    assert sorted(k for k, v in d.items() if k.startswith("cat") and v == "off_topic") == ["cat0", "cat1", "cat2"]
    # dog: its own absolute threshold replaces the global percentile; other global fields stay.
    assert sorted(k for k, v in d.items() if k.startswith("dog") and v == "off_topic") == [f"dog{i}" for i in range(6)]
    # owl: the check is switched off for this class only.
    assert all(v == "kept" for k, v in d.items() if k.startswith("owl"))
    assert m.clip.thresholds_for("dog").min_real_margin is None


def test_threshold_syntax_is_validated(tmp_path):
    with pytest.raises(ManifestError, match="outside 0-100"):
        make_manifest(tmp_path, None, thresholds={"min_margin": "150%"})
    with pytest.raises(ManifestError, match="not a threshold"):
        make_manifest(tmp_path, None, thresholds={"min_margin": "high"})
    with pytest.raises(ManifestError, match="device"):
        make_manifest(tmp_path, None, device="gpu0")


def test_unavailable_weights_stop_with_one_sentence(scored_ws):
    m, ws, _ = scored_ws
    offline = make_manifest(ws.root, None, model="ViT-B-32", pretrained="laion2b_s34b_b79k")
    offline.sources = m.sources
    with pytest.raises(clip_score.WeightsUnavailable) as err:
        clip_score.run(offline, ws, show_progress=False)
    msg = str(err.value)
    assert "ViT-B-32 'laion2b_s34b_b79k'" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "local checkpoint file" in msg and "\n" not in msg and msg.count(". ") == 0
    assert "clip_decision" not in catalog.read(ws).columns  # nothing written

    missing = make_manifest(ws.root, None, model="ViT-B-32", pretrained=str(ws.root / "nope.pt"))
    with pytest.raises(clip_score.WeightsUnavailable, match="nope.pt .*was not found"):
        clip_score.run(missing, ws, show_progress=False)
    with pytest.raises(clip_score.ClipSetupError, match="unknown open_clip model"):
        clip_score.run(make_manifest(ws.root, None, model="ViT-Nope"), ws, show_progress=False)
    with pytest.raises(clip_score.ClipSetupError, match="neither an open_clip tag"):
        clip_score.run(make_manifest(ws.root, None, pretrained="laion_typo"), ws, show_progress=False)
    with pytest.raises(clip_score.ClipSetupError, match="random weights"):
        clip_score.run(make_manifest(ws.root, None, pretrained=None), ws, show_progress=False)


def test_skip_switch_marks_skipped_without_scores(scored_ws):
    m, ws, _ = scored_ws
    skip = make_manifest(ws.root, None, model="ViT-B-32", pretrained="laion2b_s34b_b79k", skip_if_unavailable=True)
    s = clip_score.run(skip, ws, show_progress=False)
    assert s.skipped and "cannot be loaded" in s.skip_reason and s.decisions == {"skipped": 9}
    assert s.line().startswith("score: skipped, 9 images marked skipped")
    df = catalog.read(ws)
    assert set(df["clip_decision"]) == {"skipped"} and set(df["status"]) == {"candidate"}
    assert all(df[c].null_count() == df.height for c in clip_score.SCORE_COLUMNS)
    assert (ws.stage_dir("score") / "skipped.txt").exists()


def test_cli_error_and_exit_code(scored_ws, tmp_path):
    from typer.testing import CliRunner

    from curation.cli import app

    _, ws, root = scored_ws
    mf = tmp_path / "m.yaml"
    mf.write_text(json.dumps({
        "name": "t", "classes": [{"name": c} for c in CLASSES],
        "sources": [{"type": "folder", "path": str(root)}], "clip": {"pretrained": "laion2b_s34b_b79k"},
    }))
    r = CliRunner().invoke(app, ["score", "--manifest", str(mf), "--workdir", str(ws.root), "-q"])
    assert r.exit_code == 2
    err = r.stderr if hasattr(r, "stderr") else r.output
    assert err.startswith("error: CLIP weights ViT-B-32 'laion2b_s34b_b79k'") and err.count("\n") == 1


@pytest.mark.slow
def test_cli_scores_with_dataloader_workers_and_respects_humans(scored_ws, tiny_clip, tmp_path):
    from typer.testing import CliRunner

    from curation.cli import app

    _, ws, root = scored_ws
    df = catalog.read(ws)
    human = df["image_id"][0]
    reviewed = df["image_id"][1]
    broken = df.filter(pl.col("path").str.ends_with(".jpg"))["image_id"][-1]
    df = catalog.update(df, pl.DataFrame({"image_id": [human], "status": ["accepted"]}))
    df = catalog.update(df, pl.DataFrame({"image_id": [reviewed], "review_decision": ["keep"]}))
    catalog.write(ws, df)
    bpath = ws.abspath(df.filter(pl.col("image_id") == broken)["path"][0])
    bpath.chmod(0o644)
    bpath.write_bytes(support.truncated_jpeg())  # the stored file went bad after ingest

    mf = tmp_path / "m.yaml"
    mf.write_text(json.dumps({
        "name": "t", "classes": [{"name": c} for c in CLASSES], "sources": [{"type": "folder", "path": str(root)}],
        "clip": {"model": TINY, "pretrained": str(tiny_clip[1]), "model_config_path": str(tiny_clip[0]),
                 "workers": 2, "batch_size": 3},
    }))
    r = CliRunner().invoke(app, ["score", "--manifest", str(mf), "--workdir", str(ws.root), "-q", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "score: 7 images with jc-tiny-test/file:tiny.pt on cpu: 6 encoded" in r.output
    out = catalog.read(ws)
    row = {r["image_id"]: r for r in out.iter_rows(named=True)}
    assert row[human]["status"] == "accepted" and row[human]["clip_decision"] is None
    assert row[reviewed]["clip_decision"] is None
    assert (row[broken]["status"], row[broken]["reason"], row[broken]["clip_decision"]) == ("rejected", "unreadable", "error")
    assert row[broken]["note"]
    assert out.filter(pl.col("clip_decision").is_not_null()).height == 7


def test_compute_scores_margins_are_the_seed_softmax():
    bank = clip_score.TextBank(
        labels=["a", "b"],
        classes=np.eye(3, dtype=np.float32)[:2],
        negatives=np.eye(3, dtype=np.float32)[2:],
        realistic=np.stack([np.eye(3, dtype=np.float32)[[0]]] * 2),
        unrealistic=np.stack([np.eye(3, dtype=np.float32)[[1]]] * 2),
    )
    emb = np.array([[0.8, 0.6, 0.0]], np.float32)
    s = clip_score.compute_scores(emb, np.array([0]), bank, 100.0)
    p = np.exp([80.0, 0.0]) / np.exp([80.0, 0.0]).sum()
    assert s["clip_margin"][0] == pytest.approx(p[0] - p[1])
    q = np.exp([80.0, 60.0]) / np.exp([80.0, 60.0]).sum()
    assert s["clip_real_margin"][0] == pytest.approx(q[0] - q[1])
    assert s["clip_top_label"][0] == "a" and s["clip_top_prob"][0] == pytest.approx(q[0])
    assert s["clip_score"][0] == pytest.approx(0.8)


def test_local_dir_model_loads_and_needs_weights(tmp_path, tiny_clip):
    folder = tmp_path / "tiny_dir"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {}}))
    m = make_manifest(tmp_path, None, model=f"local-dir:{folder}")
    with pytest.raises(clip_score.WeightsUnavailable, match="no weights file"):
        clip_score.load_model(m.clip)
    (folder / "open_clip_pytorch_model.bin").write_bytes(tiny_clip[1].read_bytes())
    clip = clip_score.load_model(m.clip)
    assert clip.model_id == f"local-dir:{folder}" and clip.image_size == (64, 64)
    # The weights really are the checkpoint's, not a fresh random init.
    import torch

    saved = torch.load(tiny_clip[1], weights_only=True)
    assert torch.equal(clip.model.state_dict()["text_projection"], saved["text_projection"])


def test_embedding_cache_shards_compact_and_keep_latest(tmp_path, monkeypatch):
    cache = clip_score.EmbeddingCache(tmp_path / "emb")
    assert cache.load(["a"]) == {}
    cache.append(["a", "b"], np.ones((2, 4), np.float32))
    cache.append(["b", "c"], np.full((2, 4), 2.0, np.float32))
    monkeypatch.setattr(clip_score.EmbeddingCache, "MAX_SHARDS", 1)
    cache.compact()
    assert len(list((tmp_path / "emb").glob("part-*.parquet"))) == 1
    got = cache.load(["a", "b", "c", "zz"])
    assert sorted(got) == ["a", "b", "c"]
    assert got["a"].tolist() == [1.0] * 4 and got["b"].tolist() == [2.0] * 4
    assert not list((tmp_path / "emb").glob(".*"))  # no temporary files left behind


def test_batched_normalisation_equals_the_models_own_preprocessing(tmp_path, tiny_clip):
    import torch

    m = make_manifest(tmp_path, tiny_clip)
    clip = clip_score.load_model(m.clip)
    pil_steps, norm = clip_score.split_preprocess(clip.preprocess)
    assert norm is not None
    paths = []
    for i, data in enumerate([support.jpeg(1, (640, 480)), support.png(2, (90, 70)), support.exif_rotated_jpeg()]):
        paths.append(tmp_path / f"{i}.img")
        paths[-1].write_bytes(data)
    emb, errs = clip_score.encode_images(clip, [str(p) for p in paths], workers=0)
    assert errs == ["", "", ""]
    from curation.images import open_rgb

    x = torch.stack([clip.preprocess(open_rgb(p, draft=(64, 64))) for p in paths])
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(clip.model.encode_image(x), dim=-1).numpy()
    np.testing.assert_allclose(emb, ref, rtol=0, atol=1e-6)


def test_unreachable_hub_fails_fast_with_the_whole_sentence(tmp_path):
    """HF_HUB_OFFLINE unset and the hub down: one short probe instead of ~50 s of retries, and the
    message whole (it used to be cut mid-word at 200 characters)."""
    from tests.unreachable_hub import load_in_fresh_process

    (got,) = load_in_fresh_process("clip", tmp_path / "hf")
    assert got["error"] == "WeightsUnavailable" and got["seconds"] < 5, got
    msg = got["message"]
    assert msg.startswith("CLIP weights ViT-B-32 'laion2b_s34b_b79k'") and "\n" not in msg
    assert "not in the local Hugging Face cache and the Hugging Face hub at http://127.0.0.1:" in msg
    assert "cannot be reached (ConnectError: [Errno 111] Connection refused)" in msg
    assert msg.endswith("(clip.skip_if_unavailable: true continues without scores, marking images skipped)"), msg


def test_embedding_cache_is_per_device_class_and_precision(tiny_clip, tmp_path):
    import torch

    m = make_manifest(tmp_path, tiny_clip)
    fp32 = clip_score.load_model(m.clip)
    bf16 = clip_score.load_model(make_manifest(tmp_path, tiny_clip, precision="bf16").clip)
    assert fp32.autocast_dtype is None and bf16.autocast_dtype is torch.bfloat16
    assert fp32.cache_key != bf16.cache_key and "-cpu-fp32-" in fp32.cache_key and "-cpu-bfloat16-" in bf16.cache_key
    # fp32 on a GPU is still not fp32 on a CPU (different kernels): the device class is in the key too.
    key = clip_score.embedding_cache_key
    assert key("m", "id", "cuda", None) != key("m", "id", "cpu", None)
    assert key("m", "id", "cuda", torch.bfloat16) != key("m", "id", "cuda", torch.float16)
    assert key("m", "x", "cpu", None) != key("m", "y", "cpu", None)  # other weights, other cache


def test_clip_error_keeps_the_normalisation_note(tmp_path, workspace, tiny_clip):
    root = tmp_path / "tree"
    make_tree(root, per_class=1)
    support.write(root / "cat" / "rotated.jpg", support.exif_rotated_jpeg(seed=5, orientation=6))
    m = make_manifest(root, tiny_clip)
    ingest.run(m, workspace, show_progress=False)
    df = catalog.read(workspace)
    row = df.filter(pl.col("note").str.contains("exif-orientation:6")).row(0, named=True)
    stored = workspace.abspath(row["path"])
    stored.chmod(0o644)
    stored.write_bytes(support.truncated_jpeg())  # the stored file went bad after ingest
    clip_score.run(m, workspace, show_progress=False)
    got = catalog.read(workspace).filter(pl.col("image_id") == row["image_id"]).row(0, named=True)
    assert (got["clip_decision"], got["reason"]) == ("error", "unreadable")
    assert got["note"].startswith(row["note"] + "; clip: "), got["note"]


def test_percentile_cuts_are_kept_across_runs_and_reviews(tmp_path, workspace, tiny_clip):
    """A percentile cut is computed once over the class's stable population and stored: re-running
    after a reviewer confirmed the rejections rejects nothing new (it used to reject the next slice
    of what was left), and a few new images are judged against the same cut."""
    root = tmp_path / "tree"
    make_tree(root, per_class=10)
    m = make_manifest(root, tiny_clip, thresholds={**OFF, "min_margin": "20%"})
    ingest.run(m, workspace, show_progress=False)
    clip_score.run(m, workspace, show_progress=False)
    df = catalog.read(workspace)
    rejected = set(df.filter(pl.col("reason") == "off_topic")["image_id"])
    assert len(rejected) == 6  # 2 of 10 per class
    cuts_file = workspace.stage_dir("score") / clip_score.CUTS_FILE
    first = json.loads(cuts_file.read_text())
    assert {c: first[c]["n"] for c in CLASSES} == {c: 10 for c in CLASSES}

    # A reviewer confirms the rejections: those images leave what this stage decides.
    df = catalog.update(df, pl.DataFrame({"image_id": sorted(rejected), "review_decision": "reject",
                                          "reason": "reviewer_rejected"}))
    catalog.write(workspace, df)
    clip_score.run(m, workspace, show_progress=False)
    clip_score.run(m, workspace, show_progress=False)
    df = catalog.read(workspace)
    assert df.filter(pl.col("reason") == "off_topic").height == 0, "a new slice was rejected"
    assert json.loads(cuts_file.read_text()) == first

    # One new image per class (10%): the stored cut decides it; the others keep their decisions.
    make_tree(root, per_class=1, offset=50)
    ingest.run(m, workspace, show_progress=False)
    before = dict(zip(df["image_id"], df["clip_decision"]))
    clip_score.run(m, workspace, show_progress=False)
    after = catalog.read(workspace)
    assert json.loads(cuts_file.read_text()) == first
    assert {i: d for i, d in zip(after["image_id"], after["clip_decision"]) if i in before} == before
    new = after.filter(~pl.col("image_id").is_in(list(before)))
    for r in new.iter_rows(named=True):
        want = "off_topic" if r["clip_margin"] < first[r["label"]]["cuts"]["min_margin"] else "kept"
        assert r["clip_decision"] == want


def test_percentile_cuts_are_recomputed_on_new_settings_or_a_grown_population():
    m = make_manifest(Path("."), None, thresholds={**OFF, "min_margin": "50%"})
    pop = _frame([(f"c{i}", "cat", 0.3, i / 10, 0.9, "cat", 0.9) for i in range(10)])
    cuts, kept = clip_score.percentile_cuts(pop, m.clip, {"cat": "k1"}, {})
    assert cuts["cat"]["min_margin"] == pytest.approx(0.45) and kept["cat"]["n"] == 10
    grown = pl.concat([pop, _frame([("x", "cat", 0.3, 0.95, 0.9, "cat", 0.9)])])
    assert clip_score.percentile_cuts(grown, m.clip, {"cat": "k1"}, kept)[0] == cuts  # +10%: kept
    doubled = pl.concat([pop, _frame([(f"y{i}", "cat", 0.3, 0.95, 0.9, "cat", 0.9) for i in range(10)])])
    again, kept2 = clip_score.percentile_cuts(doubled, m.clip, {"cat": "k1"}, kept)
    assert again["cat"]["min_margin"] == pytest.approx(0.925) and kept2["cat"]["n"] == 20
    other, _ = clip_score.percentile_cuts(pop.head(5), m.clip, {"cat": "k2"}, kept)  # new settings key
    assert other["cat"]["min_margin"] == pytest.approx(0.2)
