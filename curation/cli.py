"""The `jurassiclass` command: one subcommand per stage, each printing a short summary."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from curation import catalog, report
from curation.catalog import Workspace
from curation.config import FolderSource, Manifest, ManifestError, dump_manifest, load_manifest

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


def resolve_workdir(manifest: Manifest, workdir: Path | None) -> Workspace:
    if workdir is not None:
        return Workspace(workdir)
    if manifest.workdir is not None:
        return Workspace(manifest.workdir)
    return Workspace(Path("workspaces") / manifest.name)


def open_run(manifest_path: Path, workdir: Path | None) -> tuple[Manifest, Workspace]:
    """Load the manifest, pick the workspace, and save the resolved settings beside the outputs."""
    try:
        m = load_manifest(manifest_path)
    except ManifestError as exc:
        fail(str(exc))
    ws = resolve_workdir(m, workdir).ensure()
    catalog.save_resolved_manifest(ws, dump_manifest(m))
    return m, ws


def finish(ws: Workspace, headline: str) -> None:
    typer.secho(headline, bold=True)
    report.print_catalog(catalog.read(ws))
    typer.echo(f"workspace: {ws.root}")


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
    if export:
        df.select([c for c in df.columns if df.schema[c].is_nested() is False]).write_csv(export)
        typer.echo(f"wrote {export}")


@app.command()
def run(manifest: Path = ManifestOpt, workdir: Optional[Path] = WorkdirOpt, quiet: bool = QuietOpt) -> None:
    """Run every stage in order on the manifest."""
    m, ws = open_run(manifest, workdir)
    lines = []
    if m.sources_of(FolderSource):
        lines.append(do_ingest(m, ws, quiet))
    for line in lines:
        typer.echo(line)
    finish(ws, f"run of {m.name} complete")


def main() -> None:  # pragma: no cover - console entry point
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
