"""The `jurassiclass` command: one subcommand per stage, each printing a short summary."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import polars as pl
import typer

from curation import catalog, report
from curation.catalog import Workspace
from curation.config import FolderSource, Manifest, ManifestError, load_manifest

app = typer.Typer(
    help="Turn a list of class names into a clean, reviewed, published image dataset.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ManifestOpt = typer.Option(..., "--manifest", "-m", help="dataset manifest (YAML)", exists=False)
WorkdirOpt = typer.Option(None, "--workdir", "-w", help="workspace directory (default: the manifest's, else workspaces/<name>)")
QuietOpt = typer.Option(False, "--quiet", "-q", help="no progress bars")


def fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(2)


def open_run(manifest_path: Path, workdir: Path | None) -> tuple[Manifest, Workspace]:
    """Load the manifest, pick the workspace, and save the resolved settings beside the outputs."""
    try:
        m = load_manifest(manifest_path)
    except ManifestError as exc:
        fail(str(exc))
    return m, catalog.start_run(m, workdir)


def workspace_line(ws: Workspace) -> str:
    stages = sorted(p.name for p in (ws.root / "stages").glob("*")) if (ws.root / "stages").exists() else []
    return f"workspace: {ws.root}  (catalog.parquet, store/, stages/: {', '.join(stages) or 'none yet'})"


def finish(ws: Workspace, headline: str) -> None:
    typer.secho(headline, bold=True)
    report.print_catalog(catalog.read(ws))
    typer.echo(workspace_line(ws))


def do_ingest(m: Manifest, ws: Workspace, quiet: bool) -> str:
    from curation import ingest

    try:
        s = ingest.run(m, ws, show_progress=not quiet)
    except FileNotFoundError as exc:
        fail(str(exc))
    rejected = sum(s.rejected.values())
    extra = f", {s.not_image_extension} non-image files skipped" if s.not_image_extension else ""
    return f"ingest: {s.seen} files seen, {s.added} added, {s.already_known} already known, {rejected} rejected{extra}"


@app.command()
def ingest(manifest: Path = ManifestOpt, workdir: Optional[Path] = WorkdirOpt, quiet: bool = QuietOpt) -> None:
    """Ingest the manifest's `folder` sources (ROOT/<class>/...) into the store and catalog."""
    m, ws = open_run(manifest, workdir)
    finish(ws, do_ingest(m, ws, quiet))


@app.command("catalog")
def show_catalog(
    workdir: Path = typer.Option(..., "--workdir", "-w", help="workspace directory"),
    export: Optional[Path] = typer.Option(None, help="also write the catalog to this CSV file"),
) -> None:
    """Print images per class and status (and rejection reasons) for a workspace."""
    ws = Workspace(workdir)
    if not ws.catalog_path.exists():
        fail(f"no catalog in {ws.root}: run a stage first (e.g. `jurassiclass ingest`)")
    df = catalog.read(ws)
    report.print_catalog(df)
    typer.echo(workspace_line(ws))
    if export:
        df.select([c for c in df.columns if df.schema[c].is_nested() is False]).write_csv(export)
        typer.echo(f"wrote {export}")


def do_score(m: Manifest, ws: Workspace, quiet: bool, device: str | None = None) -> str:
    from curation import clip_score

    try:
        s = clip_score.run(m, ws, show_progress=not quiet, device=device)
    except clip_score.ClipSetupError as exc:
        fail(str(exc))
    return s.line()


@app.command()
def score(
    manifest: Path = ManifestOpt,
    workdir: Optional[Path] = WorkdirOpt,
    quiet: bool = QuietOpt,
    device: Optional[str] = typer.Option(None, help="override clip.device: cpu, cuda, cuda:N, mps"),
) -> None:
    """Score candidates with CLIP; reject off-topic / unrealistic images, flag likely wrong labels."""
    m, ws = open_run(manifest, workdir)
    finish(ws, do_score(m, ws, quiet, device))


def do_scrape(m: Manifest, ws: Workspace, quiet: bool) -> str:
    from curation import scrape

    try:
        s = scrape.run(m, ws, show_progress=not quiet)
    except scrape.ScrapeError as exc:
        fail(str(exc))
    report.console.print(report.frame_table(s.sources_frame(), "scrape: this run, per class and source"))
    report.console.print(report.frame_table(s.classes_frame(), "scrape: images per class vs target"))
    return s.line()


@app.command()
def scrape(manifest: Path = ManifestOpt, workdir: Optional[Path] = WorkdirOpt, quiet: bool = QuietOpt) -> None:
    """Download up to each class's target from the manifest's search-engine, API and URL-list sources."""
    m, ws = open_run(manifest, workdir)
    finish(ws, do_scrape(m, ws, quiet))


# ---------------------------------------------------------------- review (FiftyOne)

review_app = typer.Typer(help="Human review in FiftyOne: push candidates, review in the App, pull decisions.",
                         no_args_is_help=True)
app.add_typer(review_app, name="review")


def do_review_push(m: Manifest, ws: Workspace, quiet: bool) -> str:
    from curation import review

    try:
        s = review.push(m, ws, show_progress=not quiet)
    except review.ReviewError as exc:
        fail(str(exc))
    restored = f", {s.tags_restored} decisions restored as tags" if s.tags_restored else ""
    return (f"review push: dataset {s.dataset!r}: {s.added} added, {s.updated} updated, {s.unchanged} unchanged, "
            f"{s.not_pushable} without image{restored} ({s.seconds:.1f}s); views: {', '.join(s.views)}")


@review_app.command("push")
def review_push(manifest: Path = ManifestOpt, workdir: Optional[Path] = WorkdirOpt, quiet: bool = QuietOpt) -> None:
    """Create or update the FiftyOne review dataset; reviewers' tags and corrected labels are never overwritten."""
    m, ws = open_run(manifest, workdir)
    typer.echo(do_review_push(m, ws, quiet))


@review_app.command("pull")
def review_pull(manifest: Path = ManifestOpt, workdir: Optional[Path] = WorkdirOpt) -> None:
    """Read reviewers' accept / reject / relabel decisions into the catalog (idempotent)."""
    from curation import review

    m, ws = open_run(manifest, workdir)
    try:
        s = review.pull(m, ws)
    except review.ReviewError as exc:
        fail(str(exc))
    problems = "".join(f", {n} {k.replace('_', ' ')}" for k, n in sorted(s.problems.items()))
    cleared = f", {s.cleared} taken back" if s.cleared else ""
    headline = (f"review pull: {s.reviewed} reviewed of {s.samples}: {s.accepted} accepted ({s.relabelled} relabelled), "
                f"{s.rejected} rejected{cleared}{problems}; {s.changed} catalog rows changed")
    if s.calibration:
        headline += f"\ncalibration: {s.calibration.with_suffix('.md')}"
    finish(ws, headline)


@review_app.command("status")
def review_status(manifest: Path = ManifestOpt, workdir: Optional[Path] = WorkdirOpt) -> None:
    """Review progress per class (live from the dataset, decisions not yet pulled included)."""
    from curation import review

    m, ws = open_run(manifest, workdir)
    try:
        df = review.status(m, ws)
    except review.ReviewError as exc:
        fail(str(exc))
    table = report.frame_table(df, f"review progress: {review.dataset_name(m)}")
    # Ten columns: on a narrow terminal squeeze the headers, never the class names.
    table.columns[0].no_wrap = True
    table.columns[0].min_width = max([5, *(len(str(v)) for v in df["label"])])
    report.console.print(table)


@review_app.command("calibrate")
def review_calibrate(manifest: Path = ManifestOpt, workdir: Optional[Path] = WorkdirOpt) -> None:
    """Compare the automatic CLIP decisions with reviewers' and find the threshold that matches them best."""
    from curation import review

    m, ws = open_run(manifest, workdir)
    c = review.calibrate(m, ws)
    if c is None:
        fail("no reviewed image with a CLIP score yet: review some images, then `jurassiclass review pull`")
    report.console.print(report.frame_table(c.table.with_columns(pl.col(pl.Float64).round(3)), "CLIP vs reviewers"))
    fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
    typer.echo(f"threshold now: {fmt(c.current_threshold)}; best F1 against reviewers: {fmt(c.best_threshold)}")
    typer.echo(f"wrote {c.markdown} and {c.png}")


@review_app.command("app")
def review_launch(
    manifest: Path = ManifestOpt,
    workdir: Optional[Path] = WorkdirOpt,
    port: Optional[int] = typer.Option(None, help="port (default: review.port, 5151)"),
    address: Optional[str] = typer.Option(None, help="loopback address to bind (default: review.address)"),
    view: Optional[str] = typer.Option(None, help="open this saved view, e.g. not-reviewed"),
) -> None:
    """Serve the FiftyOne App on 127.0.0.1 with the review dataset and its saved views; Ctrl-C stops it."""
    from curation import review

    m, ws = open_run(manifest, workdir)
    try:
        review.launch_app(m, ws, port=port, address=address, view=view, echo=typer.echo)
    except (review.ReviewError, ValueError) as exc:
        fail(str(exc))


def do_dedup(m: Manifest, ws: Workspace, quiet: bool) -> str:
    from curation import dedup

    s = dedup.run(m, ws, show_progress=not quiet)
    failed = f", {s.hash_failed} unreadable" if s.hash_failed else ""
    return (
        f"dedup: {s.images} images ({s.hashed} hashed{failed}), {s.groups} duplicate groups, "
        f"{s.duplicates} duplicates ({s.newly_rejected} newly rejected, {s.released} released), "
        f"{s.label_conflict_groups} label conflicts"
    )


@app.command()
def dedup(manifest: Path = ManifestOpt, workdir: Optional[Path] = WorkdirOpt, quiet: bool = QuietOpt) -> None:
    """Mark exact and perceptual duplicates across all classes (nothing is deleted)."""
    m, ws = open_run(manifest, workdir)
    finish(ws, do_dedup(m, ws, quiet))


def do_publish(m: Manifest, ws: Workspace, quiet: bool, *, out: Path | None = None, push: str | None = None,
               revision: str | None = None, dry_run: bool = False, soft: bool = False) -> str:
    """Publish (and push); ``soft``: nothing to publish yet is a summary line, not an error (for `run`)."""
    from curation import publish as pub

    try:
        s = pub.run(m, ws, show_progress=not quiet) if soft else pub.publish(m, ws, out=out, dry_run=dry_run, show_progress=not quiet)
        if s.skipped:
            return s.line()
        if not quiet:
            report.console.print(report.frame_table(pl.DataFrame(s.per_class), "published images per class and split"))
        for w in s.warnings:
            typer.secho(f"warning: {w}", fg="yellow", err=True)
        line = s.line()
        if dry_run and s.changed:
            line += "\nwould write: " + ", ".join(f"{f['path']} ({f['bytes']:,} B)" for f in s.files)
        if push:
            if dry_run and s.changed:
                line += f"\nwould push v{s.version} to {push} ({sum(f['bytes'] for f in s.files):,} bytes)"
            else:
                r = pub.push(m, ws, repo_id=push, revision=revision, dry_run=dry_run)
                if r.get("dry_run"):
                    line += f"\nwould push {r['tag']} to {r['repo_id']}@{r['revision']}: {r['files']} files, {r['bytes']:,} bytes"
                elif r.get("already"):
                    line += f"\n{r['tag']} is already on {r['repo_id']}@{r['revision']} (commit {r.get('commit')})"
                else:
                    line += f"\npushed {r['tag']} to {r['repo_id']}@{r['revision']}: {r['files']} files, commit {r['commit']}"
    except pub.PublishError as exc:
        fail(str(exc))
    return line


@app.command()
def publish(
    manifest: Path = ManifestOpt,
    workdir: Optional[Path] = WorkdirOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="write the version folder here (default: WORKDIR/published/v<N>/)"),
    push: Optional[str] = typer.Option(None, "--push", help="also upload it to this Hub dataset repo (ORG/NAME); token from $HF_TOKEN"),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub branch to push to (default: publish.revision, else main)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="show what would be published and uploaded; write nothing"),
    quiet: bool = QuietOpt,
) -> None:
    """Publish accepted images as a versioned Hugging Face dataset (parquet + card), optionally pushed to the Hub."""
    m, ws = open_run(manifest, workdir)
    typer.echo(do_publish(m, ws, quiet, out=out, push=push or None, revision=revision, dry_run=dry_run))
    typer.echo(workspace_line(ws))


@app.command()
def run(manifest: Path = ManifestOpt, workdir: Optional[Path] = WorkdirOpt, quiet: bool = QuietOpt) -> None:
    """Run every stage in order on the manifest."""
    m, ws = open_run(manifest, workdir)
    lines = []
    if m.sources_of(FolderSource):
        lines.append(do_ingest(m, ws, quiet))
    from curation.scrape import has_web_sources

    if has_web_sources(m):
        lines.append(do_scrape(m, ws, quiet))
    lines.append(do_dedup(m, ws, quiet))
    lines.append(do_score(m, ws, quiet))
    if m.review.push_in_run:
        lines.append(do_review_push(m, ws, quiet))
    lines.append(do_publish(m, ws, quiet, soft=True))
    for line in lines:
        typer.echo(line)
    finish(ws, f"run of {m.name} complete")


# ---------------------------------------------------------------- train / predict (models/)


def do_train(m: Manifest, ws: Workspace, dataset: str | None, experiment: str | None,
             models: list[str] | None = None) -> str:
    from models import run as train_run
    from models.data import DatasetUnavailable
    from models.factory import WeightsUnavailable

    try:
        s = train_run.run(m, ws, dataset=dataset, experiment=experiment, models=models or None)
    except (WeightsUnavailable, DatasetUnavailable, train_run.TrainSetupError) as exc:
        fail(str(exc))
    report.console.print(report.frame_table(train_run.table(s), f"train {s.experiment}: {s.folds} published folds"))
    if s.label_issues:
        typer.echo(f"{s.label_issues} label-issue candidates in the catalog (label_issue, oof_*): "
                   "`jurassiclass review push` shows them in the `label-issues` view")
    return s.line()


@app.command()
def train(
    manifest: Path = ManifestOpt,
    workdir: Optional[Path] = WorkdirOpt,
    experiment: Optional[str] = typer.Option(None, help="output folder name under WORKDIR/models (default: v<N>-<time>)"),
    dataset: Optional[str] = typer.Option(None, help="published folder or Hub ORG/NAME[@REV] (default: the latest WORKDIR/published/v<N>)"),
    model: Optional[list[str]] = typer.Option(None, "--model", help="train only these train.models names (repeatable)"),
) -> None:
    """Cross-validate and train the manifest's models on the published dataset; evaluate once on its test split."""
    m, ws = open_run(manifest, workdir)
    typer.echo(do_train(m, ws, dataset, experiment, model))


@app.command()
def predict(
    model: Path = typer.Option(..., "--model", help="a model folder (model.json), its parent, or an experiment folder (best model)"),
    images: list[Path] = typer.Argument(..., help="image files or folders"),
    top_k: int = typer.Option(3, "--top-k", "-k", min=1),
    backend: str = typer.Option("torch", help="torch (model.pt) or onnx (model.onnx via onnxruntime)"),
) -> None:
    """Top-k classes with probabilities for image files or folders."""
    from models import export

    if backend not in ("torch", "onnx"):
        fail(f"--backend must be torch or onnx, not {backend!r}")
    try:
        results = export.predict(model, images, top_k=top_k, backend=backend)
    except export.ModelNotFound as exc:
        fail(str(exc))
    if not results:
        fail("no image files given")
    for r in results:
        if "error" in r:
            typer.echo(f"{r['path']}\terror: {r['error']}")
        else:
            typer.echo(f"{r['path']}\t" + "  ".join(f"{c} {p:.3f}" for c, p in r["top"]))


# ---------------------------------------------------------------- the model registry

models_app = typer.Typer(help="The workspace's model registry: trained models, the promoted one, the Hub.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")


def _registry_ws(manifest: Path, workdir: Path | None) -> tuple[Manifest, Workspace]:
    # Read-only views need the workspace, not a new resolved-manifest file.
    try:
        m = load_manifest(manifest)
    except ManifestError as exc:
        fail(str(exc))
    root = workdir or m.workdir or Path("workspaces") / m.name
    return m, Workspace(root)


@models_app.command("list")
def models_list(manifest: Path = ManifestOpt, workdir: Optional[Path] = WorkdirOpt) -> None:
    """Every trained model: dataset version, status, held-out metric, which one is promoted."""
    from models import registry

    m, ws = _registry_ws(manifest, workdir)
    reg = registry.read(ws)
    metric = m.retrain.metric.value
    rows = [{"id": e["id"], "dataset": f"v{e['dataset_version']}", "status": e["status"],
             f"test {metric}": (f"{(e.get('evaluation') or {})[metric]:.4f}" if (e.get("evaluation") or {}).get(metric) is not None
                                else ""),
             "promoted": "*" if reg["promoted"] == e["id"] else "", "created": e["created_at"], "error": e.get("error") or ""}
            for e in reg["entries"]]
    if not rows:
        typer.echo(f"no models in {ws.root / 'models'} yet: `jurassiclass train` or the retrain flow makes them")
        return
    report.console.print(report.frame_table(pl.DataFrame(rows), f"models of {m.name}"))
    last = reg["events"][-1] if reg["events"] else None
    if last:
        typer.echo(f"last decision: {last['entry']} {'promoted' if last['promoted'] else 'not promoted'}: {last['reason']}")


@models_app.command("show")
def models_show(entry: str = typer.Argument(..., help="model id, e.g. retrain-002"), manifest: Path = ManifestOpt,
                workdir: Optional[Path] = WorkdirOpt) -> None:
    """One model's registry entry: dataset, metrics, folders, decisions."""
    import json as _json

    from models import registry

    _, ws = _registry_ws(manifest, workdir)
    reg = registry.read(ws)
    try:
        e = registry.get(reg, entry)
    except registry.RegistryError as exc:
        fail(str(exc))
    typer.echo(_json.dumps({**e, "promoted": reg["promoted"] == e["id"],
                            "decisions": [d for d in reg["events"] if d["entry"] == entry]}, indent=2, default=str))


@models_app.command("promote")
def models_promote(entry: str = typer.Argument(..., help="model id to promote"), manifest: Path = ManifestOpt,
                   workdir: Optional[Path] = WorkdirOpt) -> None:
    """Promote a trained model by hand (recorded as a person's decision)."""
    from models import registry

    _, ws = _registry_ws(manifest, workdir)
    try:
        registry.promote(ws, entry)
    except registry.RegistryError as exc:
        fail(str(exc))
    typer.echo(f"{entry} is now the promoted model")


@models_app.command("push")
def models_push(entry: Optional[str] = typer.Argument(None, help="model id (default: the promoted one)"),
                manifest: Path = ManifestOpt, workdir: Optional[Path] = WorkdirOpt,
                repo: Optional[str] = typer.Option(None, "--repo", help="Hub model repo ORG/NAME (default: retrain.model_repo_id)")) -> None:
    """Upload a model with a model card naming its dataset version; token from $HF_TOKEN."""
    from models import hub, registry

    m, ws = _registry_ws(manifest, workdir)
    try:
        r = hub.push(m, ws, entry, repo_id=repo)
    except registry.RegistryError as exc:
        fail(str(exc))
    typer.echo(f"pushed {r['entry']} to {r['repo_id']} (tag {r['tag']}, commit {r['commit']})")


def main() -> None:  # pragma: no cover - console entry point
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
