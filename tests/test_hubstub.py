"""The stub Hub (tests/hubstub.py) against the real clients: huggingface_hub pushes (create_repo,
upload_folder through preupload/LFS/commit, tags, branches, deletes) and reads back (refs, tree,
paths-info, hf_hub_download, HfFileSystem ranges), and datasets.load_dataset at a tag."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.hubstub import HubStub, hub, point_clients_at  # noqa: F401  (hub: the fixture)

REPO = "stub-user/birds"
CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
  - split: test
    path: data/test-*.parquet
---
# birds
"""
CARD_V2 = CARD.replace("  - split: test\n    path: data/test-*.parquet\n", "")


def folder(root: Path, splits: dict[str, list[list[int]]], card: str = CARD) -> Path:
    """A HF dataset folder: README.md plus data/{split}-{i:05d}-of-{n:05d}.parquet, one per shard."""
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text(card)
    for split, shards in splits.items():
        for i, ids in enumerate(shards):
            table = pa.table({"image_id": ids, "label": [f"c{x % 3}" for x in ids]})
            pq.write_table(table, root / "data" / f"{split}-{i:05d}-of-{len(shards):05d}.parquet")
    return root


def publish_two_versions(tmp_path: Path):
    """v1: train 0..9, test 100..103 in one shard each; v2 replaces data/ with train 0..14 in 2 shards
    (and its card drops the test split: a config whose pattern matches nothing fails to load)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(REPO, repo_type="dataset", private=True)
    v1 = folder(tmp_path / "v1", {"train": [list(range(10))], "test": [[100, 101, 102, 103]]})
    api.upload_folder(folder_path=v1, repo_id=REPO, repo_type="dataset", commit_message="v1")
    api.create_tag(REPO, tag="v1", repo_type="dataset")
    v2 = folder(tmp_path / "v2", {"train": [list(range(8)), list(range(8, 15))]}, CARD_V2)
    api.upload_folder(folder_path=v2, repo_id=REPO, repo_type="dataset", commit_message="v2",
                      delete_patterns=["data/*"])
    api.create_tag(REPO, tag="v2", repo_type="dataset")
    return api


def test_push_tags_and_load_dataset_at_each_tag(hub, tmp_path):
    import datasets

    publish_two_versions(tmp_path)

    repo = hub.repo(REPO)
    assert repo.private and set(repo.tags) == {"v1", "v2"}
    v1, v2 = (repo.commits[repo.tags[t]] for t in ("v1", "v2"))
    assert sorted(v1.files) == [".gitattributes", "README.md", "data/test-00000-of-00001.parquet",
                                "data/train-00000-of-00001.parquet"]
    assert sorted(v2.files) == [".gitattributes", "README.md", "data/train-00000-of-00002.parquet",
                                "data/train-00001-of-00002.parquet"]
    # parquet went through preupload -> LFS batch -> PUT -> verify -> lfsFile; the card inline
    assert all(b.lfs for p, b in v2.files.items() if p.endswith(".parquet"))
    assert not v2.files["README.md"].lfs
    assert v2.files["data/train-00000-of-00002.parquet"].sha256 in hub.lfs_objects
    assert sum(r.path.endswith("/info/lfs/objects/verify") for r in hub.requests) == 4
    assert v2.changed == ["README.md", "data/test-00000-of-00001.parquet", "data/train-00000-of-00001.parquet",
                          "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    assert [c.title for c in repo.history()] == ["v2", "v1", "initial commit"]

    ds1 = datasets.load_dataset(REPO, revision="v1")
    assert sorted(ds1) == ["test", "train"]
    assert sorted(ds1["train"]["image_id"]) == list(range(10))
    assert sorted(ds1["test"]["image_id"]) == [100, 101, 102, 103]
    ds2 = datasets.load_dataset(REPO, revision="v2")
    assert list(ds2) == ["train"] and sorted(ds2["train"]["image_id"]) == list(range(15))

    # The token travels in a header, never in a URL, and never to the "CDN" host serving LFS blobs.
    assert all(hub.token not in r.path for r in hub.requests)
    cdn = [r for r in hub.requests if r.path.startswith("/_cdn/")]
    assert cdn and all("authorization" not in r.headers for r in cdn)
    puts = [r for r in hub.requests if r.method == "PUT"]
    assert puts and all("authorization" not in r.headers for r in puts)


def test_refs_files_commits_and_downloads(hub, tmp_path):
    from huggingface_hub import HfFileSystem, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    api = publish_two_versions(tmp_path)

    refs = api.list_repo_refs(REPO, repo_type="dataset")
    assert [b.name for b in refs.branches] == ["main"]
    assert {t.name: t.target_commit for t in refs.tags} == hub.repo(REPO).tags
    assert api.list_repo_files(REPO, repo_type="dataset", revision="v1") == [
        ".gitattributes", "README.md", "data/test-00000-of-00001.parquet", "data/train-00000-of-00001.parquet"]
    assert [c.title for c in api.list_repo_commits(REPO, repo_type="dataset", revision="v1")] == [
        "v1", "initial commit"]
    info = api.dataset_info(REPO, revision="v1", files_metadata=True)
    assert info.sha == hub.repo(REPO).tags["v1"] and info.private
    assert {s.rfilename: bool(s.lfs) for s in info.siblings}["data/test-00000-of-00001.parquet"]

    # hf_hub_download at a tag: an LFS file (302 to the CDN) and a regular one
    local = hf_hub_download(REPO, "data/test-00000-of-00001.parquet", repo_type="dataset", revision="v1")
    assert pq.read_table(local).column("image_id").to_pylist() == [100, 101, 102, 103]
    card = hf_hub_download(REPO, "README.md", repo_type="dataset", revision=hub.repo(REPO).tags["v2"])
    assert Path(card).read_text() == CARD_V2

    # tree and paths-info, plain and expanded
    top = {e.path: type(e).__name__ for e in api.list_repo_tree(REPO, repo_type="dataset", revision="v2")}
    assert top == {".gitattributes": "RepoFile", "README.md": "RepoFile", "data": "RepoFolder"}
    deep = api.list_repo_tree(REPO, "data", repo_type="dataset", revision="v1", recursive=True, expand=True)
    assert {e.path: e.last_commit.title for e in deep} == {
        "data/test-00000-of-00001.parquet": "v1", "data/train-00000-of-00001.parquet": "v1"}
    entry = next(iter(api.get_paths_info(REPO, ["README.md", "missing.txt"], repo_type="dataset")))
    assert entry.path == "README.md" and entry.lfs is None and entry.size == len(CARD_V2)

    # HfFileSystem: ranged reads through the resolve URL (and the CDN redirect for LFS files)
    fs = HfFileSystem()
    with fs.open(f"datasets/{REPO}@v1/README.md", "rb", block_size=8) as f:
        f.seek(4)
        assert f.read(7) == CARD.encode()[4:11]
    assert fs.cat(f"datasets/{REPO}@v2/data/train-00001-of-00002.parquet")[:4] == b"PAR1"

    # branches, and tags must be new
    api.create_branch(REPO, branch="dev", revision="v1", repo_type="dataset")
    api.upload_file(path_or_fileobj=b"notes\n", path_in_repo="NOTES.md", repo_id=REPO, repo_type="dataset",
                    revision="dev")
    assert "NOTES.md" in hub.repo(REPO).files("dev") and "NOTES.md" not in hub.repo(REPO).files("main")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_tag(REPO, tag="v1", repo_type="dataset")
    assert err.value.response.status_code == 409


def test_auth_wrong_token_and_private_reads(hub, tmp_path):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_wrong").create_repo("stub-user/nope", repo_type="dataset")
    assert err.value.response.status_code == 401 and not hub.repos

    HfApi().create_repo(REPO, repo_type="dataset", private=True)
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_wrong").upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO,
                                            repo_type="dataset")
    assert err.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):  # private: looks missing without a token
        HfApi(token=False).dataset_info(REPO)
    assert len(hub.repo(REPO).commits) == 1  # only the initial commit
    assert [r.headers.get("authorization") for r in hub.requests if r.path == "/api/repos/create"] == [
        "Bearer hf_wrong", f"Bearer {hub.token}"]


def test_fail_next_injects_errors(hub, tmp_path):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    api.create_repo("stub-user/m")  # a model repo this time
    hub.fail_next(1, 503, path_contains="/preupload/")  # the client retries preupload (after 1 s)
    api.upload_file(path_or_fileobj=b'{"a": 1}', path_in_repo="config.json", repo_id="stub-user/m")
    statuses = [r.status for r in hub.requests if "/preupload/" in r.path]
    assert statuses == [503, 200]
    hub.fail_next(1, 500, path_contains="/commit/")  # /commit is not retried: the push fails
    with pytest.raises(HfHubHTTPError):
        api.upload_file(path_or_fileobj=b"{}", path_in_repo="other.json", repo_id="stub-user/m")
    assert hub.repo("stub-user/m", "model").files() == {
        ".gitattributes": hub.repo("stub-user/m", "model").files()[".gitattributes"], "config.json": b'{"a": 1}'}


def test_more_client_calls(hub, tmp_path):
    """What a publish stage may also lean on: exist_ok, existence checks, folder deletes, tag deletes,
    settings, and datasets' own push_to_hub/load_dataset on the default branch."""
    import datasets
    from huggingface_hub import CommitOperationDelete

    api = publish_two_versions(tmp_path)
    api.create_repo(REPO, repo_type="dataset", exist_ok=True)  # the 409 answer carries the repo url
    assert api.file_exists(REPO, "README.md", repo_type="dataset")
    assert not api.file_exists(REPO, "nope.md", repo_type="dataset")
    assert api.revision_exists(REPO, "v1", repo_type="dataset")
    assert not api.revision_exists(REPO, "v9", repo_type="dataset")
    assert not api.repo_exists("stub-user/other", repo_type="dataset")
    api.create_commit(REPO, repo_type="dataset", commit_message="rm data",
                      operations=[CommitOperationDelete("data/", is_folder=True)])
    assert sorted(hub.repo(REPO).files()) == [".gitattributes", "README.md"]
    api.delete_tag(REPO, tag="v1", repo_type="dataset")
    api.update_repo_settings(REPO, repo_type="dataset", private=False)
    assert list(hub.repo(REPO).tags) == ["v2"] and not hub.repo(REPO).private

    datasets.Dataset.from_dict({"a": [1, 2, 3]}).push_to_hub("stub-user/pushed", private=True)
    assert datasets.load_dataset("stub-user/pushed")["train"]["a"] == [1, 2, 3]


def test_card_with_broken_front_matter_is_refused(hub):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(REPO, repo_type="dataset")
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        api.upload_file(path_or_fileobj=b"---\nlicense: mit\n", path_in_repo="README.md", repo_id=REPO,
                        repo_type="dataset")


def test_point_clients_at_is_undone_afterwards(tmp_path):
    import os

    import datasets.config as dc
    from huggingface_hub import constants, hf_api

    def state():
        return (constants.ENDPOINT, constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE, hf_api.api.endpoint,
                dc.HF_ENDPOINT, dc.HF_HUB_OFFLINE, dc.HF_DATASETS_CACHE, os.environ.get("HF_ENDPOINT"))

    before = state()
    with HubStub() as stub, pytest.MonkeyPatch.context() as mp:
        point_clients_at(stub, mp, tmp_path)
        assert constants.ENDPOINT == dc.HF_ENDPOINT == hf_api.api.endpoint == stub.base_url
        assert not constants.HF_HUB_OFFLINE and not dc.HF_HUB_OFFLINE
    assert state() == before


def test_stub_runs_standalone_without_fixture():
    import json
    import urllib.request

    with HubStub(token="t") as stub:
        stub.create_repo("a/b", "model")
        with urllib.request.urlopen(f"{stub.base_url}/api/models/a/b/refs") as r:
            assert json.load(r)["branches"][0]["name"] == "main"
    assert stub.requests[0].method == "GET"
