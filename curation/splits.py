"""Rows (label, group key, prior assignment) in, a stable group-aware stratified split and fold out.

Plain functions on plain lists, shared by publish (which writes `split`/`fold`) and anything that
needs the same guarantees:

- **Group-aware**: every image of a group (a duplicate group, or one image) gets one split and
  one fold, so no near-duplicate straddles train and test, nor two CV folds.
- **Stratified**: within each class, groups are dealt to the split (then the fold) furthest below
  its target share, measured in images, so every class is split in the requested proportions
  as closely as its group sizes allow.
- **Stable**: a group that was assigned before keeps its split and fold; only new groups are
  dealt. A growing dataset never moves a test image into train, so models trained on different
  versions are evaluated on comparable held-out images. A group that now joins members from
  two prior splits takes the most held-out one (test > validation > train): the copy of a test
  image never trains.
- **Deterministic**: groups are dealt in the order of a seeded hash of their key.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field

SPLITS = ("train", "validation", "test")
# Most held-out first: when members of one group disagree, the first of these wins.
_PRIORITY = {"test": 0, "validation": 1, "train": 2}


@dataclass
class Assignment:
    split: dict[str, str]  # group -> split
    fold: dict[str, int]  # group -> fold (-1 for test groups)
    group_label: dict[str, str]  # group -> the class it was stratified under
    warnings: list[str] = field(default_factory=list)
    kept: int = 0  # groups that kept a prior assignment
    dealt: int = 0  # groups assigned now


def _order(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def _deal(groups: list[str], sizes: dict[str, int], targets: dict, current: Counter, seed: int) -> dict[str, object]:
    """Give each group (in seeded-hash order) to the bucket with the largest deficit against its target."""
    out: dict[str, object] = {}
    buckets = list(targets)
    for g in sorted(groups, key=lambda g: _order(seed, g)):
        best = max(buckets, key=lambda b: (targets[b] - current[b], -buckets.index(b)))
        out[g] = best
        current[best] += sizes[g]
    return out


def assign(
    labels: list[str],
    groups: list[str],
    *,
    sizes: dict[str, float],
    folds: int,
    seed: int = 0,
    prior_split: list[str | None] | None = None,
    prior_fold: list[int | None] | None = None,
    class_order: list[str] | None = None,
) -> Assignment:
    """Assign one split and fold to every group of the rows given.

    labels, groups: per row (same length); a group's class is its members' most common label.
    sizes: {"train": 0.8, "validation": 0.1, "test": 0.1}. folds: k, for non-test groups.
    prior_split/prior_fold: per row, a previous assignment to keep (None: not assigned yet).
    """
    n = len(labels)
    if len(groups) != n:
        raise ValueError("labels and groups must have the same length")
    prior_split = prior_split or [None] * n
    prior_fold = prior_fold or [None] * n
    order = {c: i for i, c in enumerate(class_order or sorted(set(labels)))}

    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    size = {g: len(ix) for g, ix in members.items()}
    group_label = {}
    for g, ix in members.items():
        votes = Counter(labels[i] for i in ix)
        group_label[g] = min(votes, key=lambda c: (-votes[c], order.get(c, len(order)), c))

    split: dict[str, str] = {}
    fold: dict[str, int] = {}
    for g, ix in members.items():
        known = [prior_split[i] for i in ix if prior_split[i] in _PRIORITY]
        if known:
            split[g] = min(known, key=_PRIORITY.__getitem__)
            fs = [prior_fold[i] for i in ix if prior_split[i] == split[g] and prior_fold[i] is not None and 0 <= prior_fold[i] < folds]
            if split[g] == "test":
                fold[g] = -1
            elif fs:
                fold[g] = min(fs)
    kept = len(split)

    result = Assignment(split=split, fold=fold, group_label=group_label, kept=kept)
    by_class: dict[str, list[str]] = defaultdict(list)
    for g in members:
        by_class[group_label[g]].append(g)
    active = {s: f for s, f in sizes.items() if f > 0}
    for cls in sorted(by_class, key=lambda c: (order.get(c, len(order)), c)):
        gs = by_class[cls]
        total = sum(size[g] for g in gs)
        current = Counter({s: 0 for s in active})
        for g in gs:
            if g in split:
                current[split[g]] += size[g]
        new = [g for g in gs if g not in split]
        split.update(_deal(new, size, {s: f * total for s, f in active.items()}, current, seed))
        missing = [s for s in active if not any(split[g] == s for g in gs)]
        if missing:
            result.warnings.append(
                f"class {cls!r}: {len(gs)} group(s), {total} image(s): too few for the {'/'.join(missing)} split(s)"
            )
        # Folds over the class's non-test groups, dealt the same way (equal shares).
        pool = [g for g in gs if split[g] != "test"]
        fcur = Counter({f: 0 for f in range(folds)})
        for g in pool:
            if g in fold:
                fcur[fold[g]] += size[g]
        share = sum(size[g] for g in pool) / folds
        fold.update(_deal([g for g in pool if g not in fold], size, {f: share for f in range(folds)}, fcur, seed + 1))
        for g in gs:
            if split[g] == "test":
                fold[g] = -1
        if 0 < len(pool) < folds:
            result.warnings.append(f"class {cls!r}: {len(pool)} train/validation group(s) for {folds} folds: some folds have none")
    result.dealt = len(members) - kept
    return result
