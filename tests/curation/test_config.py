from pathlib import Path

import pytest

from curation.config import FolderSource, ManifestError, load_manifest, parse_manifest

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "m.yaml"
    p.write_text(text)
    return p


def test_shipped_manifests_parse():
    dino = load_manifest(ROOT / "manifests" / "dinosaurs.yaml")
    assert dino.class_names == [
        "Microceratus", "Pachycephalosaurus", "Parasaurolophus", "Spinosaurus",
        "Stegosaurus", "Triceratops", "Tyrannosaurus", "Velociraptor",
    ]
    assert all(len(c.queries) >= 3 for c in dino.classes)
    demo = load_manifest(ROOT / "manifests" / "demo.yaml")
    assert demo.sources_of(FolderSource)


def test_unknown_key_names_file_and_field(tmp_path):
    p = write(tmp_path, "name: x\nclasses: [{name: a}]\ndedup: {treshold: 3}\n")
    with pytest.raises(ManifestError) as e:
        load_manifest(p)
    msg = str(e.value)
    assert str(p) in msg and "dedup.treshold" in msg


def test_missing_classes(tmp_path):
    with pytest.raises(ManifestError, match="classes"):
        load_manifest(write(tmp_path, "name: x\n"))


def test_empty_class_list(tmp_path):
    with pytest.raises(ManifestError, match="classes"):
        load_manifest(write(tmp_path, "name: x\nclasses: []\n"))


def test_duplicate_class(tmp_path):
    with pytest.raises(ManifestError, match="listed twice"):
        load_manifest(write(tmp_path, "name: x\nclasses: [{name: a}, {name: A}]\n"))


def test_bad_source_type_and_field(tmp_path):
    with pytest.raises(ManifestError, match=r"sources\[0\]"):
        load_manifest(write(tmp_path, "name: x\nclasses: [{name: a}]\nsources: [{type: altavista}]\n"))
    with pytest.raises(ManifestError, match=r"sources\[0\]\.max_per_query"):
        load_manifest(write(tmp_path, "name: x\nclasses: [{name: a}]\nsources: [{type: bing, max_per_query: 0}]\n"))


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "nope.yaml")
    with pytest.raises(ManifestError, match="mapping"):
        load_manifest(write(tmp_path, "- a\n- b\n"))


def test_defaults_and_relative_paths(tmp_path):
    m = parse_manifest(
        {"name": "x", "classes": [{"name": "Cat"}], "sources": [{"type": "folder", "path": "imgs"}]},
        base_dir=tmp_path,
    )
    assert m.classes[0].queries == ["Cat"]
    assert m.sources[0].path == (tmp_path / "imgs").resolve()
    assert m.dedup.threshold == 10 and m.target_for("Cat") == m.scrape.target_per_class


def test_clip_class_overrides_must_name_manifest_classes(tmp_path):
    p = write(tmp_path, "name: x\nclasses: [{name: a}]\nclip: {class_thresholds: {b: {min_margin: 0.1}}}\n")
    with pytest.raises(ManifestError, match="class_thresholds names classes not in the manifest: b"):
        load_manifest(p)


def test_overrides_are_merged_before_validation(tmp_path):
    p = write(tmp_path, "name: x\nclasses: [{name: a}]\nscrape: {concurrency: 3}\n")
    m = load_manifest(p, {"scrape": {"target_per_class": 7}})
    assert (m.scrape.target_per_class, m.scrape.concurrency) == (7, 3)
    with pytest.raises(ManifestError, match="with overrides"):
        load_manifest(p, {"scrape": {"target_per_class": -1}})


def test_relative_clip_checkpoint_resolves_against_manifest(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"x")
    p = write(tmp_path, "name: x\nclasses: [{name: a}]\nclip: {pretrained: w.pt}\n")
    assert load_manifest(p).clip.pretrained == str((tmp_path / "w.pt").resolve())
    p = write(tmp_path, "name: x\nclasses: [{name: a}]\nclip: {pretrained: openai}\n")
    assert load_manifest(p).clip.pretrained == "openai"
