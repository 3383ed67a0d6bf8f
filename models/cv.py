"""Published fold numbers in, train/early-stopping/held-out row indices out; plus the grid search
and the nested CV that estimates it. Pure functions over index arrays and an objective callable.

Outer fold i: held-out = fold i, early stopping = fold (i+1) % k, train = the rest. The held-out
fold is never used for any choice (epochs, checkpoint, hyper-parameters).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from curation.config import Hyper


@dataclass(frozen=True)
class Split:
    train: np.ndarray
    val: np.ndarray  # early stopping and best checkpoint
    test: np.ndarray  # held out: scored, never chosen on
    held_out: int
    val_fold: int


def _rows(folds: np.ndarray, which: list[int]) -> np.ndarray:
    return np.flatnonzero(np.isin(folds, which))


def split_within(folds: np.ndarray, available: list[int], held_out: int) -> Split:
    """Among ``available`` folds: held-out, the next available one (cyclic) for early stopping, rest train."""
    if held_out not in available or len(available) < 3:
        raise ValueError(f"need >= 3 folds to hold one out and stop early on another, have {available}")
    order = sorted(available)
    val_fold = order[(order.index(held_out) + 1) % len(order)]
    rest = [f for f in order if f not in (held_out, val_fold)]
    return Split(train=_rows(folds, rest), val=_rows(folds, [val_fold]), test=_rows(folds, [held_out]),
                 held_out=held_out, val_fold=val_fold)


def outer_split(folds: np.ndarray, k: int, i: int) -> Split:
    return split_within(folds, list(range(k)), i)


def inner_splits(folds: np.ndarray, k: int, outer: int, limit: int | None = None) -> list[Split]:
    """Splits of the k-1 folds left once outer fold ``outer`` is removed (never touching it)."""
    avail = [f for f in range(k) if f != outer]
    # Start after the outer fold so different outer folds use different inner folds first.
    start = [f for f in avail if f > outer] + [f for f in avail if f < outer]
    chosen = start[:limit] if limit else start
    return [split_within(folds, avail, j) for j in chosen]


def candidates(base: Hyper, stage: dict[str, list[float]]) -> list[Hyper]:
    names = list(stage)
    return [base.model_copy(update=dict(zip(names, vals))) for vals in itertools.product(*(stage[n] for n in names))]


Objective = Callable[[Hyper, Split], float]  # higher is better (held-out top-1)


@dataclass
class Selection:
    best: Hyper
    table: list[dict] = field(default_factory=list)  # stage, hyper values, mean score, scores per split


def select(objective: Objective, base: Hyper, grid: list[dict[str, list[float]]], splits: list[Split]) -> Selection:
    """Stage-wise grid search: each stage's candidates scored as the mean over ``splits``; the best
    (first on ties) is the base of the next stage."""
    table: list[dict] = []
    best = base
    for s, stage in enumerate(grid):
        scored = []
        for hp in candidates(best, stage):
            scores = [float(objective(hp, sp)) for sp in splits]
            mean = float(np.mean(scores))
            scored.append((mean, hp))
            table.append({"stage": s, **{n: getattr(hp, n) for n in stage}, "mean": mean,
                          "scores": scores, "held_out": [sp.held_out for sp in splits]})
        best = max(scored, key=lambda t: t[0])[1]  # max keeps the first of equal scores
    return Selection(best=best, table=table)


@dataclass
class NestedFold:
    outer: int
    selection: Selection
    score: float


def nested(objective: Objective, folds: np.ndarray, k: int, base: Hyper, grid: list[dict[str, list[float]]], *,
           outer_limit: int | None = None, inner_limit: int | None = None) -> list[NestedFold]:
    """True nested CV: per outer fold, hyper-parameters chosen on its inner folds only, then the
    chosen values trained and scored once on the outer split."""
    out = []
    for i in range(k)[: outer_limit or k]:
        sel = select(objective, base, grid, inner_splits(folds, k, i, inner_limit))
        out.append(NestedFold(outer=i, selection=sel, score=float(objective(sel.best, outer_split(folds, k, i)))))
    return out


def check_no_leak(groups: np.ndarray, split: Split) -> None:
    """Raise if a duplicate group spans train/val/held-out (publish keeps groups within one fold)."""
    parts = [set(groups[split.train]), set(groups[split.val]), set(groups[split.test])]
    for a, b in itertools.combinations(range(3), 2):
        both = parts[a] & parts[b]
        if both:
            raise ValueError(f"duplicate group(s) {sorted(both)[:3]} in two parts of fold {split.held_out}")
