"""Publish: catalog -> a versioned HF dataset folder (load_dataset round trip, group-aware splits,
licences, versions and diffs), and the group-aware stratified split assignment on plain lists."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import polars as pl
import pytest

from curation import catalog, ingest, publish, splits
from curation.config import parse_manifest
from curation.licenses import publish_refusal, terms
from tests import support

CLASSES = ["cat", "dog", "emu"]


def manifest(root: Path, **publish_settings):
    return parse_manifest({
        "name": "pub", "classes": [{"name": c} for c in CLASSES],
        "sources": [{"type": "folder", "path": str(root), "license": "cc-by", "author": "A. Painter"}],
        "publish": {"include": "candidates", **publish_settings},
    })


def tree(root: Path, n: int = 20, offset: int = 0) -> Path:
    for k, c in enumerate(CLASSES):
        for i in range(n):
            support.write(root / c / f"{offset + i}.jpg", support.jpeg(1000 * k + offset + i))
    return root


@pytest.fixture
def ingested(tmp_path, workspace):
    root = tree(tmp_path / "tree")
    m = manifest(root)
    ingest.run(m, workspace, show_progress=False)
    return m, workspace, root


def with_publish(m, **settings):
    """The manifest with publish settings changed (validated, as a manifest file would be)."""
    from curation.config import PublishSettings

    return m.model_copy(update={"publish": PublishSettings.model_validate({**m.publish.model_dump(), **settings})})


def set_rows(ws, frame: pl.DataFrame) -> None:
    with catalog.locked(ws):
        catalog.write(ws, catalog.update(catalog.read(ws), frame))


def load(folder: str):
    import datasets

    return datasets.load_dataset(folder)


# ---------------------------------------------------------------- licences


def test_licence_terms_and_refusals():
    assert terms("cc0").commercial_use and terms("cc0").derivatives and not terms("cc0").attribution_required
    assert terms("cc-by-sa").share_alike and terms("cc-by-sa").attribution_required
    nc_nd = terms("cc-by-nc-nd")
    assert nc_nd.redistribute and not nc_nd.commercial_use and not nc_nd.derivatives
    assert not terms("all-rights-reserved").redistribute and not terms("unknown").redistribute
    allowed = frozenset({"cc0", "cc-by", "cc-by-nc", "cc-by-nd"})
    assert publish_refusal("cc-by", allowed=allowed, non_commercial=False, re_encoded=True) is None
    assert publish_refusal("cc-by-sa", allowed=allowed, non_commercial=False, re_encoded=False).startswith("license_not_allowed")
    assert publish_refusal("cc-by-nc", allowed=allowed, non_commercial=False, re_encoded=False).startswith("license_non_commercial")
    assert publish_refusal("cc-by-nc", allowed=frozenset({"cc0"}), non_commercial=True, re_encoded=False).startswith("license_not_allowed")
    assert publish_refusal("cc-by-nc", allowed=allowed, non_commercial=True, re_encoded=False) is None
    assert publish_refusal("cc-by-nd", allowed=allowed, non_commercial=False, re_encoded=False) is None
    assert publish_refusal("cc-by-nd", allowed=allowed, non_commercial=True, re_encoded=True).startswith("license_no_derivatives")
    assert publish_refusal("unknown", allowed=allowed | {"unknown"}, non_commercial=True, re_encoded=False).startswith(
        "license_not_redistributable")


# ---------------------------------------------------------------- splits on plain lists


def test_assign_is_stratified_group_aware_and_deterministic():
    labels, groups = [], []
    for c in CLASSES:
        for i in range(40):
            labels.append(c)
            groups.append(f"{c}-{i // 4}" if i < 20 else f"{c}-solo-{i}")  # 5 groups of 4, 20 singletons
    a = splits.assign(labels, groups, sizes={"train": 0.6, "validation": 0.2, "test": 0.2}, folds=4, seed=3)
    per = defaultdict(Counter)
    for lab, g in zip(labels, groups):
        per[lab][a.split[g]] += 1
    for c in CLASSES:
        assert abs(per[c]["train"] - 24) <= 3 and abs(per[c]["validation"] - 8) <= 3 and abs(per[c]["test"] - 8) <= 3
    assert all((a.fold[g] == -1) == (a.split[g] == "test") for g in set(groups))
    folds = Counter(a.fold[g] for g in groups if a.split[g] != "test")
    assert set(folds) == {0, 1, 2, 3} and max(folds.values()) - min(folds.values()) <= 6
    again = splits.assign(labels, groups, sizes={"train": 0.6, "validation": 0.2, "test": 0.2}, folds=4, seed=3)
    assert again.split == a.split and again.fold == a.fold
    other = splits.assign(labels, groups, sizes={"train": 0.6, "validation": 0.2, "test": 0.2}, folds=4, seed=4)
    assert other.split != a.split


def test_assign_keeps_prior_and_a_merged_group_takes_the_most_held_out_split():
    labels = ["a"] * 30
    groups = [f"g{i}" for i in range(30)]
    first = splits.assign(labels, groups, sizes={"train": 0.8, "validation": 0.1, "test": 0.1}, folds=3)
    prior_s = [first.split[g] for g in groups]
    prior_f = [first.fold[g] for g in groups]
    # Ten new images arrive; one train image and one test image are found to be duplicates (one group).
    t_idx = prior_s.index("train")
    x_idx = prior_s.index("test")
    groups2 = list(groups)
    groups2[t_idx] = groups2[x_idx] = "merged"
    labels2 = labels + ["a"] * 10
    groups2 += [f"new{i}" for i in range(10)]
    second = splits.assign(labels2, groups2, sizes={"train": 0.8, "validation": 0.1, "test": 0.1}, folds=3,
                           prior_split=prior_s + [None] * 10, prior_fold=prior_f + [None] * 10)
    assert second.split["merged"] == "test" and second.fold["merged"] == -1
    for i, g in enumerate(groups):
        if g not in (groups[t_idx], groups[x_idx]):
            assert (second.split[g], second.fold[g]) == (prior_s[i], prior_f[i])  # nobody else moved
    assert second.kept == 29 and second.dealt == 10


def test_assign_warns_about_classes_too_small():
    a = splits.assign(["a"] * 20 + ["tiny"] * 2, [f"g{i}" for i in range(22)],
                      sizes={"train": 0.8, "validation": 0.1, "test": 0.1}, folds=5)
    assert any("'tiny'" in w and "validation" in w for w in a.warnings)
    assert not any("'a'" in w for w in a.warnings)


# ---------------------------------------------------------------- the stage


def test_round_trip_through_load_dataset(ingested):
    m, ws, _ = ingested
    df = catalog.read(ws)
    # A reviewer accepted some, a few are still candidates, one was rejected.
    set_rows(ws, df.head(5).select("image_id", pl.lit("accepted").alias("status"), pl.lit("accept").alias("review_decision")))
    rej = df["image_id"][7]
    set_rows(ws, pl.DataFrame({"image_id": [rej], "status": ["rejected"], "reason": ["off_topic"]}))
    s = publish.publish(m, ws, show_progress=False)
    assert s.changed and s.version == 1 and s.images == df.height - 1 and s.left_out == {"rejected:off_topic": 1}
    ds = load(s.folder)
    assert set(ds) == {"train", "validation", "test"}
    assert ds["train"].features["label"].names == CLASSES
    assert sum(ds[k].num_rows for k in ds) == s.images
    cat = catalog.read(ws)
    by_id = {r["image_id"]: r for r in cat.to_dicts()}
    raw = ds["train"].cast_column("image", __import__("datasets").Image(decode=False))
    for row in raw.select(range(10)):
        src = by_id[row["image_id"]]
        assert row["image"]["bytes"] == (ws.root / src["path"]).read_bytes()  # the stored bytes, byte for byte
        assert CLASSES[row["label"]] == src["label"]
        assert (row["source"], row["license"], row["author"]) == ("folder", "cc-by", "A. Painter")
        assert row["source_url"] == src["source_url"] and row["retrieved_at"].startswith(str(src["retrieved_at"].date()))
        assert row["fold"] in range(5) and row["group"] == row["image_id"]
    reviewed = [r for k in ds for r in ds[k].select_columns(["image_id", "reviewed", "review_decision"])]
    assert sum(r["reviewed"] for r in reviewed) == 5 and rej not in {r["image_id"] for r in reviewed}
    assert all(f == -1 for f in ds["test"]["fold"])
    # The catalog remembers where each image went.
    pub = cat.filter(pl.col("published_version") == 1)
    assert pub.height == s.images and pub["split"].null_count() == 0
    meta = json.loads((Path(s.folder) / "publish.json").read_text())
    assert meta["class_names"] == CLASSES and meta["folds"] == 5 and meta["hash"] == s.hash
    assert meta["catalog_version"] == s.catalog_version is not None  # the catalog version the rows came from
    # ... and stays readable past the retention, with the rows as publish read them.
    assert catalog.pins(ws) == {s.catalog_version: ["published v1"]}
    set_rows(ws, pl.DataFrame({"image_id": [rej], "status": ["candidate"], "reason": [None]}))
    catalog.maintain(ws, retention_hours=0, log_retention_hours=0)
    then = catalog.read(ws, version=s.catalog_version)
    assert then.filter(pl.col("image_id") == rej)["status"].to_list() == ["rejected"] and then.height == df.height
    card = (Path(s.folder) / "README.md").read_text()
    assert "task_categories:" in card and "- image-classification" in card and "configs:" in card
    assert "## Known limitations" in card and "not reviewed by a person" in card and "rejected:off_topic" in card
    assert (Path(s.folder) / "plots" / "class_balance.png").stat().st_size > 1000
    att = pl.read_csv(Path(s.folder) / "attribution.csv")
    assert att.height == s.images and set(att["author"]) == {"A. Painter"}  # cc-by: everyone is credited


def test_splits_are_group_aware_with_planted_duplicate_groups(ingested):
    m, ws, _ = ingested
    df = catalog.read(ws).sort("image_id")
    # Plant duplicate groups of 3 per class (as dedup marks them: dup_group = the representative's
    # id), and one group spanning two labels (a label conflict both reviewers kept).
    groups = {}
    for c in CLASSES:
        ids = df.filter(pl.col("label") == c)["image_id"].to_list()
        for k in range(0, 12, 3):
            for iid in ids[k:k + 3]:
                groups[iid] = ids[k]
    cat, dog = (df.filter(pl.col("label") == c)["image_id"][-1] for c in ("cat", "dog"))
    groups[cat] = groups[dog] = cat
    set_rows(ws, pl.DataFrame({"image_id": list(groups), "dup_group": list(groups.values())}))
    s = publish.publish(m, ws, show_progress=False)
    ds = load(s.folder)
    where = {}
    for split in ds:
        for r in ds[split].select_columns(["image_id", "group", "fold", "label"]):
            where[r["image_id"]] = (split, r["fold"], r["group"])
    by_group = defaultdict(set)
    for iid, (split, fold, group) in where.items():
        assert group == groups.get(iid, iid)
        by_group[group].add((split, fold))
    assert all(len(v) == 1 for v in by_group.values()), "a duplicate group straddles splits or folds"
    # Still stratified: every class has images in every split.
    for split in ds:
        assert set(ds[split]["label"]) == {0, 1, 2}


def test_unchanged_is_a_no_op_and_a_change_makes_v2_with_a_diff(ingested, tmp_path):
    m, ws, root = ingested
    s1 = publish.publish(m, ws, show_progress=False)
    folder_files = sorted(p.name for p in Path(s1.folder).rglob("*"))
    s_again = publish.publish(m, ws, show_progress=False)
    assert not s_again.changed and s_again.version == 1 and s_again.hash == s1.hash
    assert len(publish.history(ws)) == 1 and sorted(p.name for p in Path(s1.folder).rglob("*")) == folder_files

    # New images, one relabelled, one rejected.
    tree(root, n=3, offset=500)
    ingest.run(m, ws, show_progress=False)
    old = catalog.read(ws).filter(pl.col("published_version") == 1).sort("image_id")
    relabel, gone = old.row(0, named=True), old.row(1, named=True)
    new_label = next(c for c in CLASSES if c != relabel["label"])
    set_rows(ws, pl.DataFrame({"image_id": [relabel["image_id"], gone["image_id"]], "label": [new_label, gone["label"]],
                               "status": ["accepted", "rejected"], "reason": [None, "reviewer_rejected"]}))
    s2 = publish.publish(m, ws, show_progress=False)
    assert s2.changed and s2.version == 2 and s2.folder.endswith("v2")
    assert s2.diff == {"added": 9, "removed": 1, "relabelled": 1, "moved": 0}
    assert Path(s1.folder).exists()  # v1 stays as it was
    idx1 = pl.read_parquet(ws.root / "published" / "index" / "v1.parquet")
    idx2 = pl.read_parquet(ws.root / "published" / "index" / "v2.parquet")
    both = idx1.join(idx2, on="image_id", suffix="_2")
    assert both.height == idx1.height - 1 and (both["split"] == both["split_2"]).all()  # stable splits
    h = publish.history(ws)
    assert [e["version"] for e in h] == [1, 2] and h[1]["diff"]["added"] == 9
    assert "relabelled: 1" in (Path(s2.folder) / "README.md").read_text()


def test_licences_decide_what_is_published(ingested):
    m, ws, _ = ingested
    ids = catalog.read(ws).sort("image_id")["image_id"].to_list()
    lic = {ids[0]: "cc-by-nc", ids[1]: "cc-by-nd", ids[2]: "all-rights-reserved", ids[3]: "unknown", ids[4]: "gfdl",
           ids[5]: "cc-by-nd", ids[6]: "cc0"}
    set_rows(ws, pl.DataFrame({"image_id": list(lic), "license": list(lic.values())}))
    # ids[5]'s stored bytes were re-encoded from what was received: an adaptation an ND licence forbids.
    set_rows(ws, pl.DataFrame({"image_id": [ids[1], ids[5]], "source_sha256": [ids[1], "f" * 64]}))
    m2 = with_publish(m, licenses=["cc0", "pd", "cc-by", "cc-by-sa", "cc-by-nd"])
    s = publish.publish(m2, ws, show_progress=False)
    ds = load(s.folder)
    published = {i for k in ds for i in ds[k]["image_id"]}
    assert ids[1] in published and ids[6] in published  # ND stored byte for byte, CC0
    notes = dict(catalog.read(ws).select("image_id", "publish_note").iter_rows())
    assert notes[ids[0]] == "license_non_commercial:cc-by-nc" and notes[ids[6]] is None  # each image says why
    for i in (ids[0], ids[2], ids[3], ids[4], ids[5]):
        assert i not in published
    assert s.left_out == {"license_non_commercial:cc-by-nc": 1, "license_no_derivatives_re_encoded:cc-by-nd": 1,
                          "license_not_allowed:gfdl": 1, "license_not_redistributable:all-rights-reserved": 1,
                          "license_not_redistributable:unknown": 1}
    card = (Path(s.folder) / "README.md").read_text()
    assert "license_non_commercial:cc-by-nc" in card and "license: other" in card
    # A non-commercial dataset may carry NC images.
    m3 = with_publish(m2, non_commercial=True, licenses=m2.publish.licenses + ["cc-by-nc"])
    s3 = publish.publish(m3, ws, show_progress=False)
    assert s3.version == 2 and s3.diff["added"] == 1 and "license_non_commercial:cc-by-nc" not in s3.left_out


def test_accepted_only_and_empty_splits_are_clear_errors(ingested):
    m, ws, _ = ingested
    acc = with_publish(m, include="accepted")
    with pytest.raises(publish.NothingToPublish, match="nothing to publish.*review images first"):
        publish.publish(acc, ws, show_progress=False)
    assert publish.run(acc, ws, show_progress=False).skipped  # a pipeline step: a state, not a failure
    ids = catalog.read(ws)["image_id"].head(2).to_list()
    set_rows(ws, pl.DataFrame({"image_id": ids, "status": ["accepted"] * 2}))
    with pytest.raises(publish.PublishError, match="split would be empty"):
        publish.publish(acc, ws, show_progress=False)
    assert not (ws.root / "published").exists() or not list((ws.root / "published").glob("v*"))


def test_dry_run_writes_nothing_and_shards_roll_over(ingested):
    m, ws, _ = ingested
    before = ws.catalog_path.read_bytes()
    s = publish.publish(m, ws, dry_run=True, show_progress=False)
    assert s.dry_run and s.changed and s.version == 1 and any(f["path"].startswith("data/train-") for f in s.files)
    assert ws.catalog_path.read_bytes() == before and not (ws.root / "published").exists()
    small = with_publish(m, shard_size_mb=0.05)
    s = publish.publish(small, ws, show_progress=False)
    shards = sorted(p.name for p in (Path(s.folder) / "data").glob("train-*.parquet"))
    assert len(shards) > 1 and shards[0] == f"train-00000-of-{len(shards):05d}.parquet"
    assert sum(load(s.folder)[k].num_rows for k in ("train", "validation", "test")) == s.images


def test_cli_publish_prints_a_summary(ingested, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from curation.cli import app

    m, ws, root = ingested
    mf = tmp_path / "m.yaml"
    mf.write_text(yaml.safe_dump({"name": "pub", "classes": [{"name": c} for c in CLASSES],
                                  "sources": [{"type": "folder", "path": str(root), "license": "cc-by"}],
                                  "publish": {"include": "candidates"}}))
    r = CliRunner().invoke(app, ["publish", "-m", str(mf), "-w", str(ws.root), "-q"])
    assert r.exit_code == 0, r.output
    assert "publish: v1 published: 60 images (train 48, validation 6, test 6)" in r.output
    r = CliRunner().invoke(app, ["publish", "-m", str(mf), "-w", str(ws.root), "-q"])
    assert "unchanged, still v1" in r.output
    r = CliRunner().invoke(app, ["publish", "-m", str(mf), "-w", str(tmp_path / "empty"), "-q"])
    assert r.exit_code == 2 and "nothing to publish" in r.output


# ---------------------------------------------------------------- the Hub (a stub Hub on loopback)

from tests.hubstub import hub  # noqa: E402,F401  (the fixture)


def _cli(*args):
    from typer.testing import CliRunner

    from curation.cli import app

    return CliRunner().invoke(app, list(args))


def _manifest_file(tmp_path, root, **publish_settings):
    import yaml

    mf = tmp_path / "m.yaml"
    mf.write_text(yaml.safe_dump({"name": "pub", "classes": [{"name": c} for c in CLASSES],
                                  "sources": [{"type": "folder", "path": str(root), "license": "cc-by"}],
                                  "publish": {"include": "candidates", **publish_settings}}))
    return mf


def test_push_to_the_hub_versions_tags_and_reads_back(ingested, hub, tmp_path):
    import datasets

    m, ws, root = ingested
    mf = _manifest_file(tmp_path, root)
    repo = "stub-user/pub"
    r = _cli("publish", "-m", str(mf), "-w", str(ws.root), "-q", "--push", repo, "--dry-run")
    assert r.exit_code == 0 and "would push v1 to stub-user/pub" in r.output and not (ws.root / "published").exists()
    assert not any(q.method == "POST" for q in hub.requests)  # a dry run sends nothing
    r = _cli("publish", "-m", str(mf), "-w", str(ws.root), "-q", "--push", repo)
    assert r.exit_code == 0, r.output
    assert "pushed v1 to stub-user/pub@main" in r.output
    stub_repo = hub.repo(repo, "dataset")
    assert "v1" in stub_repo.tags and stub_repo.private
    files = stub_repo.files("v1")
    assert {"README.md", "publish.json", "attribution.csv", "plots/class_balance.png"} <= set(files)
    assert any(f.startswith("data/train-") for f in files)
    # Pushing again with nothing new is a no-op (no second commit).
    commits = len(stub_repo.history("main"))
    r = _cli("publish", "-m", str(mf), "-w", str(ws.root), "-q", "--push", repo)
    assert "unchanged, still v1" in r.output and "already on stub-user/pub@main" in r.output
    assert len(stub_repo.history("main")) == commits

    # v2: more images and smaller shards; the old shard files are removed in the same commit.
    tree(root, n=4, offset=700)
    ingest.run(m, ws, show_progress=False)
    mf = _manifest_file(tmp_path, root, shard_size_mb=0.1)
    r = _cli("publish", "-m", str(mf), "-w", str(ws.root), "-q", "--push", repo)
    assert r.exit_code == 0 and "pushed v2" in r.output, r.output
    v2_files = stub_repo.files("v2")
    local = sorted(p.name for p in (ws.root / "published" / "v2" / "data").iterdir())
    assert sorted(f.split("/", 1)[1] for f in v2_files if f.startswith("data/")) == local
    ds1 = datasets.load_dataset(repo, revision="v1")
    ds2 = datasets.load_dataset(repo, revision="v2")
    assert sum(ds1[k].num_rows for k in ds1) == 60 and sum(ds2[k].num_rows for k in ds2) == 72
    assert ds2["train"].features["label"].names == CLASSES
    raw = ds2["test"].cast_column("image", datasets.Image(decode=False))[0]
    assert raw["image"]["bytes"] == (ws.root / catalog.read(ws).filter(pl.col("image_id") == raw["image_id"])["path"][0]).read_bytes()
    # The token never leaves the Authorization header: not in URLs, output, the workspace or the history.
    assert all(hub.token not in q.path for q in hub.requests)
    assert hub.token not in r.output
    for p in ws.root.rglob("*"):
        if p.is_file() and p.stat().st_size < 5_000_000:
            assert hub.token.encode() not in p.read_bytes(), p
    pushes = [p for e in publish.history(ws) for p in e["pushes"]]
    assert [p["tag"] for p in pushes] == ["v1", "v2"] and all(p["commit"] for p in pushes)


def test_a_failed_push_keeps_the_local_version_and_a_rerun_finishes_it(ingested, hub):
    m, ws, _ = ingested
    repo = "stub-user/flaky"
    s = publish.publish(m, ws, show_progress=False)
    hub.fail_next(2, status=503, path_contains="/commit/")  # two transient failures: retried
    r = publish.push(m, ws, repo_id=repo, retry_delay=0.05)
    assert r["tag"] == "v1" and "v1" in hub.repo(repo, "dataset").tags
    # The Hub keeps failing: the error surfaces, the local version stays, nothing is recorded as pushed.
    one = catalog.read(ws).row(0, named=True)
    set_rows(ws, pl.DataFrame({"image_id": [one["image_id"]], "label": [next(c for c in CLASSES if c != one["label"])]}))
    s2 = publish.publish(m, ws, show_progress=False)
    assert s2.version == 2 and s2.diff["relabelled"] == 1
    hub.fail_next(10, status=503, path_contains="/commit/")
    with pytest.raises(publish.PublishError, match="503.*the local version is kept, run the same command again"):
        publish.push(m, ws, repo_id=repo, retry_delay=0.01)
    assert Path(s2.folder).is_dir() and not publish.history(ws)[-1]["pushes"]
    hub.clear_faults()
    r = publish.push(m, ws, repo_id=repo, retry_delay=0.01)  # re-run: finishes the job
    assert r["tag"] == "v2" and "v2" in hub.repo(repo, "dataset").tags and s.version == 1


def test_out_writes_elsewhere_and_never_deletes_a_users_folder(ingested, tmp_path):
    m, ws, _ = ingested
    keep = tmp_path / "mine"
    (keep / "notes.txt").parent.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(publish.PublishError, match="not empty"):
        publish.publish(m, ws, out=keep, show_progress=False)
    assert (keep / "notes.txt").read_text() == "mine"
    s = publish.publish(m, ws, out=tmp_path / "release", show_progress=False)
    assert s.folder == str(tmp_path / "release") and publish.latest(ws)["folder"] == s.folder
    from models.run import resolve_dataset

    assert resolve_dataset(ws, None) == s.folder  # train finds it through the history


def test_a_rejected_token_is_one_clear_line(ingested, hub, tmp_path, monkeypatch):
    m, ws, root = ingested
    monkeypatch.setenv("HF_TOKEN", "hf_not_the_right_one")
    r = _cli("publish", "-m", str(_manifest_file(tmp_path, root)), "-w", str(ws.root), "-q", "--push", "stub-user/x")
    assert r.exit_code == 2, r.output
    err = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "401" in err[0] and "run the same command again" in err[0]
    assert "hf_not_the_right_one" not in r.output and "Traceback" not in r.output
    assert (ws.root / "published" / "v1").is_dir()  # published locally all the same
