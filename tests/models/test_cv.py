"""Cross-validation over the published folds: no duplicate group ever straddles train / early
stopping / held-out, the held-out fold is never chosen on, and nested CV selects on inner folds only."""

from __future__ import annotations

import numpy as np
import pytest

from curation.config import Hyper
from models import cv
from models.data import load_published

from tests.hubstub import hub  # noqa: F401
from tests.models.conftest import write_published


def test_published_folds_never_leak_a_group(tmp_path):
    folder, _ = write_published(tmp_path, per_class=20, folds=4, group_size=3)
    pub = load_published(folder)
    assert pub.folds == 4 and len(pub.pool) == len(pub.final_train) + len(pub.final_val)
    folds, groups = pub.pool_folds, pub.pool_groups
    for i in range(4):
        sp = cv.outer_split(folds, 4, i)
        cv.check_no_leak(groups, sp)
        assert set(folds[sp.test]) == {i} and set(folds[sp.val]) == {(i + 1) % 4}
        assert len(sp.train) + len(sp.val) + len(sp.test) == len(pub.pool)
        for inner in cv.inner_splits(folds, 4, i):
            cv.check_no_leak(groups, inner)
            assert i not in set(folds[np.concatenate([inner.train, inner.val, inner.test])])
    # test rows are not in the pool at all
    assert not set(pub.test["group"]) & set(groups)


def test_check_no_leak_catches_a_straddling_group():
    folds = np.array([0, 0, 1, 1, 2, 2])
    groups = np.array(["a", "b", "c", "a", "d", "e"], dtype=object)  # group a in folds 0 and 1
    with pytest.raises(ValueError, match="duplicate group"):
        cv.check_no_leak(groups, cv.outer_split(folds, 3, 0))


def test_nested_selects_on_inner_folds_only():
    """A stub objective that scores lr=0.003 best when fold 0 is in the scored rows and 0.005 best
    otherwise: choosing on the outer fold (the seed's mistake) would pick 0.003 for outer fold 0."""
    k = 5
    folds = np.repeat(np.arange(k), 4)
    calls = []

    def objective(hp: Hyper, sp: cv.Split) -> float:
        scored = set(folds[sp.test])
        calls.append((hp, sp))
        good = 0.003 if 0 in scored else 0.005
        return 1.0 if hp.lr == good else 0.5

    grid = [{"lr": [0.003, 0.005], "backbone_factor": [5, 10]}, {"wd_head": [1e-4, 1e-3]}]
    res = cv.nested(objective, folds, k, Hyper(), grid, outer_limit=2, inner_limit=2)
    assert [r.outer for r in res] == [0, 1]
    assert res[0].selection.best.lr == 0.005, "selection saw the outer fold"
    assert res[0].score == 0.5  # the outer fold honestly reports that the choice is bad there
    n_selection = 2 * (4 + 2)  # inner splits x (stage 1 + stage 2 candidates)
    outer0 = calls[:n_selection]
    for _, sp in outer0:
        used = set(folds[np.concatenate([sp.train, sp.val, sp.test])])
        assert 0 not in used
    # the (n_selection+1)-th call is the outer evaluation of fold 0 with the chosen values
    hp, sp = calls[n_selection]
    assert set(folds[sp.test]) == {0} and hp == res[0].selection.best
    assert len(res[0].selection.table) == 6 and {r["stage"] for r in res[0].selection.table} == {0, 1}


def test_select_is_stagewise():
    seen = []

    def objective(hp, sp):
        seen.append((hp.lr, hp.backbone_factor, hp.wd_head))
        return -abs(hp.lr - 0.005) - abs(hp.backbone_factor - 5) - abs(hp.wd_head - 1e-3)

    sp = cv.Split(np.arange(2), np.arange(2, 3), np.arange(3, 4), 0, 1)
    sel = cv.select(objective, Hyper(), [{"lr": [0.003, 0.005], "backbone_factor": [5, 10]}, {"wd_head": [1e-4, 1e-3]}], [sp])
    assert (sel.best.lr, sel.best.backbone_factor, sel.best.wd_head) == (0.005, 5, 1e-3)
    assert seen[4:] == [(0.005, 5, 1e-4), (0.005, 5, 1e-3)]  # stage 2 starts from stage 1's best


def test_reads_a_hub_revision(tmp_path, hub):
    """`--dataset ORG/NAME@REV`: the same published layout, read through load_dataset from a (stub) Hub."""
    from huggingface_hub import HfApi

    folder, _ = write_published(tmp_path / "ws", folds=3)
    api = HfApi()
    api.create_repo("stub-user/toy", repo_type="dataset", private=True)
    api.upload_folder(repo_id="stub-user/toy", repo_type="dataset", folder_path=str(folder))
    api.create_tag("stub-user/toy", tag="v1", repo_type="dataset")
    write_published(tmp_path / "ws2", folds=3, per_class=12, seed=1)  # a later, different version on main
    api.upload_folder(repo_id="stub-user/toy", repo_type="dataset", folder_path=str(tmp_path / "ws2" / "published" / "v1"))
    local = load_published(folder)
    pub = load_published("stub-user/toy@v1")
    assert pub.ref == "stub-user/toy@v1" and pub.version == 1 and pub.folds == 3
    assert list(pub.pool["image_id"]) == list(local.pool["image_id"])
    assert len(load_published("stub-user/toy").pool) == 3 * 12
