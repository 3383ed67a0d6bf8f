"""The training stage: a manifest, its workspace and a published dataset in; per model the k-fold
CV estimate (or nested CV), a final fit evaluated once on the test split, out-of-fold label issues,
metrics, plots, a model card and an exported model out, under WORKDIR/models/<experiment>/.

The work is split into independent plain functions so a flow can map them:
`prepare` -> `run_fold` (one per model x outer fold, any order, any machine) -> `run_final`
(one per model) -> `finish`. `run` does the four in order, in this process.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import yaml

from curation.catalog import Workspace
from curation.config import Hyper, Manifest, ModelSpec, TrainSettings, dump_manifest
from curation.errors import JurassiclassError
from models import cv, export, label_issues, metrics
from models.data import DatasetUnavailable, Published, latest_published, load_published
from models.fit import fit

CONFIG = "config.json"


class TrainSetupError(JurassiclassError, ValueError):
    """The training settings do not fit the dataset (too few folds, leaking groups, unknown model)."""


@dataclass(frozen=True)
class Job:
    """One unit of work: plain data so it can travel to a task/worker."""

    experiment_dir: str
    model: str
    fold: int | None = None  # None: the final fit


@dataclass
class Plan:
    experiment: str
    experiment_dir: Path
    dataset: str
    folds: int
    fold_jobs: list[Job]
    final_jobs: list[Job]


@dataclass
class ModelSummary:
    name: str
    arch: str
    mode: str
    fold_top1: list[float] = field(default_factory=list)
    cv_top1_mean: float | None = None
    cv_top1_std: float | None = None
    cv: dict = field(default_factory=dict)  # metric -> [mean, std] over folds
    nested: bool = False
    chosen: dict = field(default_factory=dict)  # hyper-parameters of the final fit
    test: dict = field(default_factory=dict)  # final model on the test split: top1, top5, macro_f1, ece
    epochs: int = 0
    model_dir: str = ""


@dataclass
class TrainSummary:
    experiment: str
    out_dir: Path
    dataset: str
    folds: int
    models: list[ModelSummary] = field(default_factory=list)
    best_model: str | None = None
    label_issues: int = 0
    label_issue_rows: int = 0  # catalog rows that received OOF columns
    seconds: float = 0.0

    def line(self) -> str:
        parts = []
        for m in self.models:
            cvtxt = f"CV top-1 {m.cv_top1_mean:.4f}±{m.cv_top1_std:.4f}" if m.cv_top1_mean is not None else "no CV"
            test = f", test top-1 {m.test['top1']:.4f}" if m.test else ""
            parts.append(f"{m.name}: {cvtxt}{test}")
        return (f"train {self.experiment}: {'; '.join(parts)}; {self.label_issues} label-issue candidates "
                f"({self.seconds:.0f}s) -> {self.out_dir}")


# ---------------------------------------------------------------- context


def _ctx(exp_dir: Path) -> tuple[dict, TrainSettings]:
    cfg = json.loads((Path(exp_dir) / CONFIG).read_text())
    return cfg, TrainSettings.model_validate(cfg["train"])


def _spec(settings: TrainSettings, name: str) -> ModelSpec:
    return next(m for m in settings.models if m.name == name)


def resolve_dataset(ws: Workspace, dataset: str | Path | None) -> str:
    """The dataset to train on: as given, else the workspace's latest published version."""
    if dataset:
        return str(dataset)
    from curation import publish

    entry = publish.latest(ws)
    if entry and Path(entry["folder"]).is_dir():
        return entry["folder"]  # the history knows versions written with --out elsewhere too
    latest = latest_published(ws.root)
    if latest is None:
        raise DatasetUnavailable(f"no published dataset in {ws.root / 'published'}: run the publish stage first, or pass --dataset")
    return str(latest)


def prepare(manifest: Manifest, ws: Workspace, *, dataset: str | Path | None = None, experiment: str | None = None,
            models: list[str] | None = None) -> Plan:
    """Resolve the dataset, check it, save the resolved config beside the outputs, list the jobs."""
    s = manifest.train
    if models:
        unknown = sorted(set(models) - {m.name for m in s.models})
        if unknown:
            raise TrainSetupError(f"unknown model(s) {unknown}; the manifest has {[m.name for m in s.models]}")
        s = s.model_copy(update={"models": [m for m in s.models if m.name in models]})
    ref = resolve_dataset(ws, dataset)
    pub = load_published(ref)
    if pub.class_names != manifest.class_names:
        raise DatasetUnavailable(f"dataset {ref} classes {pub.class_names} differ from the manifest's {manifest.class_names}")
    groups, folds = pub.pool_groups, pub.pool_folds
    if s.nested.enabled and pub.folds < 4:
        raise TrainSetupError(f"nested CV needs >= 4 folds (outer + inner held-out + early stopping + train); {ref} has {pub.folds}")
    if (s.cv or s.nested.enabled) and pub.folds < 3:
        raise TrainSetupError(f"CV needs >= 3 folds (held-out, early stopping, train); {ref} has {pub.folds}")
    for i in range(pub.folds) if s.cv or s.nested.enabled else []:
        try:
            cv.check_no_leak(groups, cv.outer_split(folds, pub.folds, i))
        except ValueError as exc:
            raise TrainSetupError(f"{ref}: {exc}") from None
    name = experiment or datetime.now(timezone.utc).strftime(f"v{pub.version or 0}-%Y%m%d-%H%M%S")
    exp = ws.root / "models" / name
    exp.mkdir(parents=True, exist_ok=True)
    cfg = {"experiment": name, "dataset": ref, "dataset_version": pub.version, "dataset_hash": pub.hash,
           "class_names": pub.class_names, "folds": pub.folds, "workspace": str(ws.root), "manifest": manifest.name,
           "train": s.model_dump(mode="json")}
    (exp / CONFIG).write_text(json.dumps(cfg, indent=2))
    resolved = yaml.safe_load(dump_manifest(manifest))
    resolved["train"] = cfg["train"]
    (exp / "config.yaml").write_text(yaml.safe_dump({"dataset": {k: cfg[k] for k in ("dataset", "dataset_version",
                                                     "dataset_hash", "folds")}, **resolved}, sort_keys=False))
    n_outer = 0
    if s.nested.enabled:
        n_outer = min(pub.folds, s.nested.outer_folds or pub.folds)
    elif s.cv:
        n_outer = min(pub.folds, s.cv_folds or pub.folds)
    fold_jobs = [Job(str(exp), m.name, i) for m in s.models for i in range(n_outer)]
    return Plan(name, exp, ref, pub.folds, fold_jobs, [Job(str(exp), m.name) for m in s.models])


# ---------------------------------------------------------------- jobs


def _objective(pub: Published, spec: ModelSpec, settings: TrainSettings, out: Path, seed: int):
    calls = [0]

    def score(hp: Hyper, split: cv.Split) -> float:
        calls[0] += 1
        r = fit(pub, spec, hp, settings, train=split.train, val=split.val, evaluate={"held_out": (pub.pool, split.test)},
                out_dir=out / f"trial-{calls[0]:03d}", seed=seed + split.held_out)
        return metrics.top_k(pub.pool_labels[split.test], r.probs["held_out"], 1)

    return score


def run_fold(job: Job) -> dict:
    """Outer fold ``job.fold`` of ``job.model``: (nested: choose hyper-parameters on its inner folds)
    train, stop early on fold i+1, predict held-out fold i. Writes fold-i/result.json + oof.npz."""
    cfg, s = _ctx(Path(job.experiment_dir))
    spec = _spec(s, job.model)
    pub = load_published(cfg["dataset"])
    out = Path(job.experiment_dir) / spec.name / f"fold-{job.fold}"
    split = cv.outer_split(pub.pool_folds, pub.folds, job.fold)
    hyper, table = spec.hyper, []
    if s.nested.enabled:
        inner = cv.inner_splits(pub.pool_folds, pub.folds, job.fold, s.nested.inner_folds)
        sel = cv.select(_objective(pub, spec, s, out / "inner", s.seed), spec.hyper, s.grid, inner)
        hyper, table = sel.best, sel.table
    r = fit(pub, spec, hyper, s, train=split.train, val=split.val, evaluate={"held_out": (pub.pool, split.test)},
            out_dir=out, seed=s.seed + job.fold)
    y = pub.pool_labels[split.test]
    m = metrics.summary(y, r.probs["held_out"], pub.class_names)
    np.savez_compressed(out / "oof.npz", index=split.test, probs=r.probs["held_out"])
    result = {"fold": job.fold, "val_fold": split.val_fold, "n_train": len(split.train), "n_val": len(split.val),
              "n_held_out": len(split.test), "hyper": hyper.model_dump(), "inner_search": table, "metrics": m,
              "epochs": r.epochs, "best_val_loss": r.best_val_loss, "seconds": r.seconds, "history": r.history}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return {k: result[k] for k in ("fold", "epochs", "seconds")} | {"top1": m["top1"]}


def run_final(job: Job) -> dict:
    """The final model of ``job.model``: hyper-parameters (nested: chosen by the same search on
    the whole pool), fit on `train`, early stopping on `validation`, ONE evaluation on `test`."""
    cfg, s = _ctx(Path(job.experiment_dir))
    spec = _spec(s, job.model)
    pub = load_published(cfg["dataset"])
    out = Path(job.experiment_dir) / spec.name / "final"
    hyper, table = spec.hyper, []
    if s.nested.enabled:
        splits = [cv.outer_split(pub.pool_folds, pub.folds, i) for i in range(pub.folds)][: s.nested.inner_folds or None]
        sel = cv.select(_objective(pub, spec, s, out / "search", s.seed), spec.hyper, s.grid, splits)
        hyper, table = sel.best, sel.table
    r = fit(pub, spec, hyper, s, train=pub.final_train, val=pub.final_val,
            evaluate={"test": (pub.test, np.arange(len(pub.test)))}, out_dir=out, seed=s.seed, keep_checkpoint=True)
    y = np.asarray(pub.test["label"], dtype=np.int64)
    m = metrics.summary(y, r.probs["test"], pub.class_names)
    # The exported model is the checkpoint's weights, rebuilt from scratch: what predict will load.
    from models.fit import build
    import torch

    module = build(spec.model_copy(update={"pretrained": False, "weights": None}), hyper, s, len(pub.class_names))
    module.load_state_dict(torch.load(r.checkpoint, map_location="cpu", weights_only=False)["state_dict"])
    export.save(Path(job.experiment_dir) / spec.name / "model", module.model, arch=spec.arch,
                class_names=pub.class_names, data_config=r.data_config, onnx=s.export_onnx,
                extra={"model": spec.name, "experiment": cfg["experiment"], "dataset": cfg["dataset"],
                       "hyper": hyper.model_dump()})
    np.savez_compressed(out / "test_probs.npz", probs=r.probs["test"])
    result = {"hyper": hyper.model_dump(), "search": table, "metrics": m, "epochs": r.epochs,
              "best_val_loss": r.best_val_loss, "seconds": r.seconds, "history": r.history,
              "n_train": len(pub.final_train), "n_val": len(pub.final_val), "n_test": len(pub.test)}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return {"model": spec.name, "test_top1": m["top1"], "epochs": r.epochs}


# ---------------------------------------------------------------- report


_CV_KEYS = ("top1", "top5", "macro_f1", "macro_precision", "macro_recall", "ece")


def _model_report(exp: Path, spec: ModelSpec, pub: Published, s: TrainSettings) -> tuple[ModelSummary, np.ndarray | None]:
    base = exp / spec.name
    folds = sorted((json.loads(p.read_text()) for p in base.glob("fold-*/result.json")), key=lambda r: r["fold"])
    final = json.loads((base / "final" / "result.json").read_text())
    ms = ModelSummary(spec.name, spec.arch, spec.mode.value, nested=s.nested.enabled, chosen=final["hyper"],
                      epochs=final["epochs"], model_dir=str(base / "model"))
    ms.fold_top1 = [r["metrics"]["top1"] for r in folds]
    if folds:
        ms.cv_top1_mean, ms.cv_top1_std = metrics.mean_std(ms.fold_top1)
        ms.cv = {k: list(metrics.mean_std([r["metrics"][k] for r in folds])) for k in _CV_KEYS}
    ms.test = {k: final["metrics"][k] for k in _CV_KEYS}
    oof = None
    if folds:
        oof = np.full((len(pub.pool), len(pub.class_names)), np.nan, dtype=np.float32)
        for p in base.glob("fold-*/oof.npz"):
            z = np.load(p)
            oof[z["index"]] = z["probs"]
    plots = base / "plots"
    plots.mkdir(exist_ok=True)
    metrics.plot_curves({**{f"fold {r['fold']}": r["history"] for r in folds}, "final": final["history"]},
                        plots / "curves.png")
    metrics.plot_confusion(np.asarray(final["metrics"]["confusion"]), pub.class_names, plots / "confusion_matrix.png",
                           title=f"{spec.name}: test split")
    metrics.plot_per_class(final["metrics"]["per_class_accuracy"], plots / "per_class_accuracy.png",
                           title=f"{spec.name}: test per-class accuracy")
    if oof is not None:
        have = ~np.isnan(oof).any(axis=1)
        cvm = metrics.summary(pub.pool_labels[have], oof[have], pub.class_names)
        metrics.plot_confusion(np.asarray(cvm["confusion"]), pub.class_names, plots / "confusion_matrix_oof.png",
                               title=f"{spec.name}: out-of-fold")
    doc = {"model": spec.name, "arch": spec.arch, "mode": spec.mode.value, "nested": s.nested.enabled,
           "folds": [{k: r[k] for k in ("fold", "val_fold", "n_train", "n_val", "n_held_out", "hyper", "epochs",
                                         "best_val_loss", "inner_search")} | {"metrics": r["metrics"]} for r in folds],
           "cv": ms.cv, "final": {k: final[k] for k in ("hyper", "search", "epochs", "best_val_loss", "n_train", "n_val",
                                                         "n_test", "metrics")}}
    (base / "metrics.json").write_text(json.dumps(doc, indent=2))
    (base / "MODEL_CARD.md").write_text(_card(ms, spec, pub, s, final))
    return ms, oof


def _fmt(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.4f}"


def _card(ms: ModelSummary, spec: ModelSpec, pub: Published, s: TrainSettings, final: dict) -> str:
    lines = [
        f"# {spec.name}", "",
        f"timm `{spec.arch}`, mode `{spec.mode.value}`, classes: {', '.join(pub.class_names)}.",
        f"Dataset: `{pub.ref}` (version {pub.version}, hash {pub.hash}), {pub.folds} published group-aware folds.", "",
        "## Estimate of generalisation", "",
    ]
    if ms.fold_top1:
        how = ("nested CV: hyper-parameters chosen on inner folds of each outer fold" if ms.nested
               else "k-fold CV with the configured hyper-parameters")
        lines += [f"{how}; held-out fold i, early stopping on fold i+1, train on the rest.", "",
                  "| metric | mean | std |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(v[0])} | {_fmt(v[1])} |" for k, v in ms.cv.items()]
        lines += ["", "Held-out top-1 per fold: " + ", ".join(f"{v:.4f}" for v in ms.fold_top1), ""]
    else:
        lines += ["No cross-validation was run (train.cv: false).", ""]
    lines += ["## Final model", "",
              f"Trained on `train` ({final['n_train']} images), early stopping on `validation` ({final['n_val']}), "
              f"{final['epochs']} epochs; evaluated once on `test` ({final['n_test']} images).", "",
              "| test metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in ms.test.items()]
    lines += ["", f"Hyper-parameters: `{json.dumps(ms.chosen)}`", "",
              "Plots: plots/curves.png, plots/confusion_matrix.png, plots/per_class_accuracy.png.",
              "Intended use: research / curation feedback; predictions outside these classes are meaningless.", ""]
    return "\n".join(lines)


def finish(manifest: Manifest, ws: Workspace, experiment_dir: Path, *, started: float | None = None) -> TrainSummary:
    """Aggregate fold and final results, write reports, feed OOF label issues back to the catalog."""
    exp = Path(experiment_dir)
    cfg, s = _ctx(exp)
    pub = load_published(cfg["dataset"])
    summary = TrainSummary(cfg["experiment"], exp, cfg["dataset"], pub.folds)
    oofs = {}
    for spec in s.models:
        ms, oof = _model_report(exp, spec, pub, s)
        summary.models.append(ms)
        if oof is not None:
            oofs[spec.name] = oof
    ranked = sorted(summary.models, key=lambda m: -(m.cv_top1_mean if m.cv_top1_mean is not None else -1))
    summary.best_model = ranked[0].name if ranked else None
    if s.label_issues and summary.best_model in oofs:
        oof = oofs[summary.best_model]
        have = np.flatnonzero(~np.isnan(oof).any(axis=1))
        if len(have):
            ids = [pub.pool[int(i)]["image_id"] for i in have] if "image_id" in pub.pool.column_names else []
            if ids:
                issues = label_issues.frame(ids, pub.pool_labels[have], oof[have], pub.class_names,
                                            f"{cfg['experiment']}/{summary.best_model}")
                issues.write_parquet(exp / "label_issues.parquet")
                summary.label_issues = int(issues["label_issue"].sum())
                summary.label_issue_rows = label_issues.write_catalog(ws, issues)
    summary.seconds = time.perf_counter() - started if started else 0.0
    doc = {"experiment": summary.experiment, "dataset": summary.dataset, "folds": summary.folds,
           "best_model": summary.best_model, "label_issues": summary.label_issues,
           "models": {m.name: {"cv_top1_mean": m.cv_top1_mean, "cv_top1_std": m.cv_top1_std, "fold_top1": m.fold_top1,
                               "cv": m.cv, "test": m.test, "chosen": m.chosen, "nested": m.nested} for m in summary.models}}
    (exp / "metrics.json").write_text(json.dumps(doc, indent=2))
    return summary


def table(summary: TrainSummary) -> pl.DataFrame:
    """One row per model: fold accuracies, CV mean ± std, test metrics (for the CLI and artifacts)."""
    return pl.DataFrame([{
        "model": m.name, "folds top-1": ", ".join(f"{v:.3f}" for v in m.fold_top1) or "-",
        "CV top-1": f"{m.cv_top1_mean:.4f} ± {m.cv_top1_std:.4f}" if m.cv_top1_mean is not None else "-",
        "test top-1": _fmt(m.test.get("top1")), "test top-5": _fmt(m.test.get("top5")),
        "test macro-F1": _fmt(m.test.get("macro_f1")), "test ECE": _fmt(m.test.get("ece")),
    } for m in summary.models])


def run(manifest: Manifest, ws: Workspace, *, dataset: str | Path | None = None, experiment: str | None = None,
        models: list[str] | None = None) -> TrainSummary:
    """The whole stage in this process (the flow maps the same jobs as tasks)."""
    t0 = time.perf_counter()
    plan = prepare(manifest, ws, dataset=dataset, experiment=experiment, models=models)
    for job in plan.fold_jobs:
        run_fold(job)
    for job in plan.final_jobs:
        run_final(job)
    return finish(manifest, ws, plan.experiment_dir, started=t0)
