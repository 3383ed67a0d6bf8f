"""Labels and predicted probabilities (numpy) in, classification metrics and report plots out.

Pure array functions: shapes are `y: (n,)` integer labels, `probs: (n, classes)` rows summing to 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def confusion(y: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(classes, classes) counts: row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    return cm


def top_k(y: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Fraction of rows whose true class is among the k most probable (ties: lower index first)."""
    if len(y) == 0:
        return float("nan")
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float((top == np.asarray(y)[:, None]).any(axis=1).mean())


def per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall (= per-class accuracy), F1 and support; 0 where undefined
    (sklearn's zero_division=0)."""
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def ece(y: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top-1 confidence, equal-width bins over (0, 1]."""
    if len(y) == 0:
        return float("nan")
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def summary(y: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict:
    """All metrics of one evaluation as JSON-friendly values."""
    y = np.asarray(y, dtype=np.int64)
    n = len(class_names)
    pred = probs.argmax(axis=1) if len(y) else np.zeros(0, dtype=np.int64)
    cm = confusion(y, pred, n)
    pc = per_class(cm)
    present = pc["support"] > 0
    # Macro over the classes that occur in y or in the predictions (sklearn's label set).
    used = present | (cm.sum(axis=0) > 0)
    macro = {k: float(pc[k][used].mean()) if used.any() else float("nan") for k in ("precision", "recall", "f1")}
    return {
        "n": int(len(y)),
        "top1": float((pred == y).mean()) if len(y) else float("nan"),
        "top5": top_k(y, probs, 5),
        "macro_f1": macro["f1"],
        "macro_precision": macro["precision"],
        "macro_recall": macro["recall"],
        "ece": ece(y, probs),
        "per_class_accuracy": {c: (float(pc["recall"][i]) if present[i] else None) for i, c in enumerate(class_names)},
        "confusion": cm.tolist(),
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for one value)."""
    a = np.asarray([v for v in values if v == v], dtype=np.float64)
    if not len(a):
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


# ---------------------------------------------------------------- plots


def _plt():
    from curation.report import pyplot

    return pyplot()


def plot_curves(history: dict[str, list[dict]], path: Path) -> Path:
    """Loss and accuracy per epoch for each run (``{run: [{"epoch", "train/loss", "val/loss", ...}]}``)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for run, rows in history.items():
        for ax, metric in zip(axes, ("loss", "acc")):
            for split, style in (("train", "--"), ("val", "-")):
                pts = [(r["epoch"], r[f"{split}/{metric}"]) for r in rows if r.get(f"{split}/{metric}") is not None]
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{run} {split}")
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(cm: np.ndarray, class_names: list[str], path: Path, title: str = "confusion matrix") -> Path:
    plt = _plt()
    cm = np.asarray(cm)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * n, 1.0 + 0.55 * n))
    rows = cm.sum(axis=1, keepdims=True)
    ax.imshow(np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0), cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_per_class(acc: dict[str, float | None], path: Path, title: str = "per-class accuracy") -> Path:
    plt = _plt()
    names = list(acc)
    vals = [acc[k] if acc[k] is not None else 0.0 for k in names]
    fig, ax = plt.subplots(figsize=(6, 0.9 + 0.35 * len(names)))
    ax.barh(names, vals, color="tab:blue")
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("accuracy")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
