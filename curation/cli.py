"""The `jurassiclass` command: one subcommand per stage, each printing a short summary.

Every command runs inside one handler (`_Handled`): an expected error (`JurassiclassError`, an OS
error such as a missing file or a full disk) prints `error: <message>` and exits 2; anything else
is a bug and prints one line naming a file that holds its traceback (JURASSICLASS_DEBUG=1 raises
it instead). Commands that write to a workspace save the resolved manifest there and append one
line per invocation to `runs.jsonl` beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
import traceback
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, Optional

import polars as pl
import typer
from typer.core import TyperGroup

from curation import catalog, report
from curation.catalog import Workspace
from curation.config import FolderSource, Manifest, load_manifest, parse_sets
from curation.errors import JurassiclassError

if TYPE_CHECKING:
    from curation.scrape import ScrapeSummary


class CliError(JurassiclassError):
    """A command refusing its arguments or finding nothing to do."""


# Errors a user can fix; everything else is a bug in this project.
EXPECTED = (JurassiclassError, OSError)
# This invocation: its arguments, and once a command opens a workspace, the history entry's parts.
_invocation: ContextVar[dict | None] = ContextVar("jurassiclass_invocation", default=None)


class _Handled(TyperGroup):
    """The root group: every subcommand (nested groups too) runs inside its `invoke`, so errors are
    turned into one line here, once, and the invocation is recorded in the workspace's history."""

    def main(self, args=None, *a, **kw):
        token = _invocation.set({"argv": list(sys.argv[1:] if args is None else args)})
        try:
            return super().main(args, *a, **kw)
        finally:
            _invocation.reset(token)

    def invoke(self, ctx):
        if ctx.parent is not None:  # `review`, `models`: the root already wraps them
            return super().invoke(ctx)
        outcome, message, code = "ok", None, 0
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException) as exc:  # usage errors print themselves
            code = getattr(exc, "exit_code", 1)
            outcome = "ok" if code == 0 else "error"
            raise
        except EXPECTED as exc:
            outcome, message, code = "error", str(exc) or type(exc).__name__, 2
            typer.secho(f"error: {message}", fg="red", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            outcome, code = "interrupted", 130
            raise
        except Exception as exc:
            outcome, message, code = "bug", f"{type(exc).__name__}: {exc}", 1
            if os.environ.get("JURASSICLASS_DEBUG"):
                raise
            saved = _save_traceback(exc)
            typer.secho(f"error: unexpected {message} (a bug; traceback in {saved}, or rerun with JURASSICLASS_DEBUG=1)",
                        fg="red", err=True)
            raise typer.Exit(1) from None
        finally:
            _record(outcome, message, code)


def _save_traceback(exc: BaseException) -> Path:
    fd, name = tempfile.mkstemp(prefix="jurassiclass-", suffix=".traceback.txt")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("".join(traceback.format_exception(exc)))
    return Path(name)


app = typer.Typer(
    cls=_Handled,
    help="Turn a list of class names into a clean, reviewed, published image dataset.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ManifestOpt = typer.Option(..., "--manifest", "-m", help="dataset manifest (YAML)", exists=False)
WorkdirOpt = typer.Option(None, "--workdir", "-w", help="workspace directory (default: the manifest's, else workspaces/<name>)")
QuietOpt = typer.Option(False, "--quiet", "-q", help="no progress bars")
SetOpt = typer.Option(None, "--set", metavar="KEY=VALUE",
                      help="override a manifest setting, e.g. --set scrape.target_per_class=50 (repeatable; VALUE is YAML)")


def fail(msg: str) -> NoReturn:
    """Stop the command: the handler prints `error: msg` and exits 2."""
    raise CliError(msg)


def load(manifest_path: Path, sets: list[str] | None) -> tuple[Manifest, dict]:
    overrides = parse_sets(sets)
    return load_manifest(manifest_path, overrides or None), overrides


def open_run(manifest_path: Path, workdir: Path | None, sets: list[str] | None = None) -> tuple[Manifest, Workspace]:
    """Load the manifest (+ --set overrides), pick the workspace, save the resolved settings beside
    the outputs and start this invocation's history entry."""
    m, overrides = load(manifest_path, sets)
    ws = catalog.start_run(m, workdir)
    _begin(ws, manifest_path, overrides)
    return m, ws


def open_readonly(manifest_path: Path, workdir: Path | None, sets: list[str] | None = None) -> tuple[Manifest, Workspace]:
    """Like `open_run` for commands that only look: the workspace's resolved manifest is the last
    run's settings and stays untouched."""
    m, _ = load(manifest_path, sets)
    root = workdir or m.workdir or Path("workspaces") / m.name
    return m, Workspace(root)


# ---------------------------------------------------------------- run history


def _begin(ws: Workspace, manifest_path: Path, overrides: dict) -> None:
    inv = _invocation.get()
    if inv is None:  # called outside the command line (a library use of open_run)
        return
    resolved = ws.root / "manifest.resolved.yaml"
    text = resolved.read_bytes() if resolved.exists() else b""
    digest = hashlib.sha256(text).hexdigest()[:12]
    # Each distinct resolved manifest is kept once, so every history line traces to its exact settings.
    keep = ws.root / "runs" / f"manifest-{digest}.yaml"
    if text and not keep.exists():
        keep.parent.mkdir(parents=True, exist_ok=True)
        keep.write_bytes(text)
    inv.update(ws=ws, lines=[], t0=time.monotonic(), entry={
        "started_at": catalog.utcnow().isoformat(), "argv": inv["argv"], "manifest": str(Path(manifest_path).resolve()),
        "overrides": overrides, "resolved_manifest": str(keep.relative_to(ws.root)) if text else None,
    })


def note(line: str) -> None:
    """Keep a summary line for this invocation's history entry."""
    inv = _invocation.get()
    if inv is not None and "lines" in inv:
        inv["lines"].append(line)


def say(line: str) -> None:
    """Print a summary line and keep it for the history entry."""
    typer.echo(line)
    note(line)


def _record(outcome: str, message: str | None, code: int) -> None:
    """Append this invocation to WORKDIR/runs.jsonl (only commands that opened a workspace to write)."""
    inv = _invocation.get()
    if inv is None or "ws" not in inv:
        return
    path = inv["ws"].root / "runs.jsonl"
    entry = {**inv["entry"], "finished_at": catalog.utcnow().isoformat(),
             "seconds": round(time.monotonic() - inv["t0"], 2), "outcome": outcome, "exit_code": code,
             "error": message, "summary": inv["lines"]}
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, default=str) + "\n")
    except OSError as exc:  # the history must never hide the command's own outcome
        typer.secho(f"warning: could not append to {path}: {exc}", fg="yellow", err=True)


def workspace_line(ws: Workspace) -> str:
    stages = sorted(p.name for p in (ws.root / "stages").glob("*")) if (ws.root / "stages").exists() else []
    return f"workspace: {ws.root}  (catalog/, store/, stages/: {', '.join(stages) or 'none yet'})"


def finish(ws: Workspace, headline: str) -> None:
    typer.secho(headline, bold=True)
    note(headline)
    report.print_catalog(catalog.read(ws))
    typer.echo(workspace_line(ws))


def do_ingest(m: Manifest, ws: Workspace, quiet: bool, dask_address: str | None = None) -> str:
    from curation import ingest

    s = ingest.run(m, ws, show_progress=not quiet, dask_address=dask_address)
    rejected = sum(s.rejected.values())
    extra = f", {s.not_image_extension} non-image files skipped" if s.not_image_extension else ""
    return f"ingest: {s.seen} files seen, {s.added} added, {s.already_known} already known, {rejected} rejected{extra}"


@app.command()
def ingest(manifest: Path = ManifestOpt, workdir: Optional[Path] = WorkdirOpt, quiet: bool = QuietOpt,
           set_: Optional[list[str]] = SetOpt,
           dask_address: Optional[str] = typer.Option(None, "--dask-address", metavar="ADDRESS",
                                                      help="validate the files in chunks on Dask: 'local' or tcp://HOST:8786")) -> None:
    """Ingest the manifest's `folder` sources (ROOT/<class>/...) into the store and catalog."""
    m, ws = open_run(manifest, workdir, set_)
    finish(ws, do_ingest(m, ws, quiet, dask_address))


@app.command("catalog")
def show_catalog(
    workdir: Path = typer.Option(..., "--workdir", "-w", help="workspace directory"),
    export: Optional[Path] = typer.Option(None, help="also write the catalog to this CSV file"),
    version: Optional[int] = typer.Option(None, "--version", min=0, help="the catalog as of this version (default: latest)"),
    unpin: Optional[int] = typer.Option(None, "--unpin", min=0, metavar="N",
                                        help="stop keeping version N (a published dataset read it) past the retention"),
) -> None:
    """Print images per class and status (and rejection reasons) for a workspace."""
    ws = Workspace(workdir)
    if not ws.catalog_path.exists():
        fail(f"no catalog in {ws.root}: run a stage first (e.g. `jurassiclass ingest`)")
    try:
        if unpin is not None:
            why = catalog.unpin(ws, unpin)
            typer.echo(f"catalog version {unpin} unpinned (kept for: {', '.join(why)}); vacuum deletes its files once "
                       f"no version younger than {catalog.RETENTION_HOURS} h reads them")
            return
        df = catalog.read(ws, version=version)
    except catalog.CatalogVersionError as exc:
        fail(str(exc))
    report.print_catalog(df)
    typer.echo(f"catalog version {version if version is not None else catalog.version(ws)} (latest {catalog.version(ws)})")
    if costs := catalog.pin_costs(ws):
        typer.echo("kept past the retention: " + ", ".join(
            f"version {c['version']} ({', '.join(c['why'])}; " + (
                f"{c['bytes'] / 2**20:.1f} MB in {c['files']} files only it reads)" if c["files"] is not None
                else "no longer readable)") for c in costs))
    typer.echo(workspace_line(ws))
    if export:
        df.select([c for c in df.columns if df.schema[c].is_nested() is False]).write_csv(export)
        typer.echo(f"wrote {export}")


def do_score(m: Manifest, ws: Workspace, quiet: bool, device: str | None = None, dask_address: str | None = None) -> str:
    from curation import clip_score

    return clip_score.run(m, ws, show_progress=not quiet, device=device, dask_address=dask_address).line()


DeviceOpt = typer.Option(None, help="override clip.device: cpu, cuda, cuda:N, mps")
DaskOpt = typer.Option(None, "--dask-address", metavar="ADDRESS",
                       help="run ingest's file validation, dedup hashing and CLIP encoding on Dask: 'local' or tcp://HOST:8786")


@app.command()
def score(manifest: Path = ManifestOpt, workdir: Optional[Path] = WorkdirOpt, quiet: bool = QuietOpt,
          device: Optional[str] = DeviceOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Score candidates with CLIP; reject off-topic / unrealistic images, flag likely wrong labels."""
    m, ws = open_run(manifest, workdir, set_)
    finish(ws, do_score(m, ws, quiet, device))


def scrape_summary(m: Manifest, ws: Workspace, quiet: bool) -> ScrapeSummary:
    from curation import scrape

    s = scrape.run(m, ws, show_progress=not quiet)
    report.console.print(report.frame_table(s.sources_frame(), "scrape: this run, per class and source"))
    report.console.print(report.frame_table(s.classes_frame(), "scrape: images per class vs target"))
    return s


def do_scrape(m: Manifest, ws: Workspace, quiet: bool) -> str:
    return scrape_summary(m, ws, quiet).line()


@app.command()
def scrape(manifest: Path = ManifestOpt, workdir: Optional[Path] = WorkdirOpt, quiet: bool = QuietOpt,
           set_: Optional[list[str]] = SetOpt) -> None:
    """Download up to each class's target from the manifest's search-engine, API and URL-list sources."""
    m, ws = open_run(manifest, workdir, set_)
    finish(ws, do_scrape(m, ws, quiet))


# ---------------------------------------------------------------- review (FiftyOne)

review_app = typer.Typer(help="Human review in FiftyOne: push candidates, review in the App, pull decisions.",
                         no_args_is_help=True)
app.add_typer(review_app, name="review")


def do_review_push(m: Manifest, ws: Workspace, quiet: bool) -> str:
    from curation import review

    s = review.push(m, ws, show_progress=not quiet)
    restored = f", {s.tags_restored} decisions restored as tags" if s.tags_restored else ""
    restored += f", {s.deleted} deleted in the App (recorded as decisions)" if s.deleted else ""
    if f := s.forgotten:
        restored += (f"; replaced the dataset of the workspace that was at {f.owner} (no decisions in it; "
                     f"its {f.samples} samples' tags saved to {ws.relpath(f.saved)})")
    return (f"review push: dataset {s.dataset!r}: {s.added} added, {s.updated} updated, {s.unchanged} unchanged, "
            f"{s.not_pushable} without image{restored} ({s.seconds:.1f}s); views: {', '.join(s.views)}")


@review_app.command("push")
def review_push(manifest: Path = ManifestOpt, workdir: Optional[Path] = WorkdirOpt, quiet: bool = QuietOpt,
                set_: Optional[list[str]] = SetOpt) -> None:
    """Create or update the FiftyOne review dataset; reviewers' tags and corrected labels are never overwritten."""
    m, ws = open_run(manifest, workdir, set_)
    say(do_review_push(m, ws, quiet))


@review_app.command("pull")
def review_pull(manifest: Path = ManifestOpt, workdir: Optional[Path] = WorkdirOpt,
                set_: Optional[list[str]] = SetOpt) -> None:
    """Read reviewers' accept / reject / relabel decisions into the catalog (idempotent)."""
    from curation import review

    m, ws = open_run(manifest, workdir, set_)
    s = review.pull(m, ws)
    problems = "".join(f", {n} {k.replace('_', ' ')}" for k, n in sorted(s.problems.items()))
    cleared = f", {s.cleared} taken back" if s.cleared else ""
    cleared += f", {s.deleted} deleted in the App" if s.deleted else ""
    headline = (f"review pull: {s.reviewed} reviewed of {s.samples}: {s.accepted} accepted ({s.relabelled} relabelled), "
                f"{s.rejected} rejected{cleared}{problems}; {s.changed} catalog rows changed")
    if s.calibration:
        headline += f"\ncalibration: {s.calibration.with_suffix('.md')}"
    finish(ws, headline)


@review_app.command("status")
def review_status(manifest: Path = ManifestOpt, workdir: Optional[Path] = WorkdirOpt,
                  set_: Optional[list[str]] = SetOpt) -> None:
    """Review progress per class (live from the dataset, decisions not yet pulled included)."""
    from curation import review

    m, ws = open_readonly(manifest, workdir, set_)
    df = review.status(m, ws)
    table = report.frame_table(df, f"review progress: {review.dataset_name(m)}")
    # Ten columns: on a narrow terminal squeeze the headers, never the class names.
    table.columns[0].no_wrap = True
    table.columns[0].min_width = max([5, *(len(str(v)) for v in df["label"])])
    report.console.print(table)


@review_app.command("calibrate")
def review_calibrate(manifest: Path = ManifestOpt, workdir: Optional[Path] = WorkdirOpt,
                     set_: Optional[list[str]] = SetOpt) -> None:
    """Compare the automatic CLIP decisions with reviewers' and find the threshold that matches them best."""
    from curation import review

    m, ws = open_run(manifest, workdir, set_)
    c = review.calibrate(m, ws)  # raises NothingToCalibrate saying why (nothing reviewed, or scores skipped)
    report.console.print(report.frame_table(c.table.with_columns(pl.col(pl.Float64).round(3)), "CLIP vs reviewers"))
    fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
    say(f"threshold now: {fmt(c.current_threshold)}; best F1 against reviewers: {fmt(c.best_threshold)}")
    say(f"wrote {c.markdown} and {c.png}")


@review_app.command("forget")
def review_forget(manifest: Path = ManifestOpt, workdir: Optional[Path] = WorkdirOpt,
                  set_: Optional[list[str]] = SetOpt) -> None:
    """Save the review dataset's decisions in this workspace (pulling those on its images), then delete it."""
    from curation import review

    m, ws = open_run(manifest, workdir, set_)
    s = review.forget(m, ws)
    say(f"review forget: dataset {s.dataset!r} (workspace {s.owner}) deleted; its {s.samples} samples, "
        f"{s.decisions} decided, saved to {s.saved}; {s.applied} of those decisions pulled into this workspace's images")


@review_app.command("app")
def review_launch(
    manifest: Path = ManifestOpt,
    workdir: Optional[Path] = WorkdirOpt,
    port: Optional[int] = typer.Option(None, help="port (default: review.port, 5151)"),
    address: Optional[str] = typer.Option(None, help="loopback address to bind (default: review.address)"),
    view: Optional[str] = typer.Option(None, help="open this saved view, e.g. not-reviewed"),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Serve the FiftyOne App on 127.0.0.1 with the review dataset and its saved views; Ctrl-C stops it."""
    from curation import review

    m, ws = open_readonly(manifest, workdir, set_)
    try:
        review.launch_app(m, ws, port=port, address=address, view=view, echo=typer.echo)
    except ValueError as exc:  # a non-loopback address or an unknown view
        fail(str(exc))


def do_dedup(m: Manifest, ws: Workspace, quiet: bool, dask_address: str | None = None) -> str:
    from curation import dedup

    s = dedup.run(m, ws, show_progress=not quiet, dask_address=dask_address)
    failed = f", {s.hash_failed} unreadable" if s.hash_failed else ""
    return (
        f"dedup: {s.images} images ({s.hashed} hashed{failed}), {s.groups} duplicate groups, "
        f"{s.duplicates} duplicates ({s.newly_rejected} newly rejected, {s.released} released), "
        f"{s.label_conflict_groups} label conflicts"
    )


@app.command()
def dedup(manifest: Path = ManifestOpt, workdir: Optional[Path] = WorkdirOpt, quiet: bool = QuietOpt,
          set_: Optional[list[str]] = SetOpt) -> None:
    """Mark exact and perceptual duplicates across all classes (nothing is deleted)."""
    m, ws = open_run(manifest, workdir, set_)
    finish(ws, do_dedup(m, ws, quiet))


def do_publish(m: Manifest, ws: Workspace, quiet: bool, *, out: Path | None = None, push: str | None = None,
               revision: str | None = None, dry_run: bool = False, soft: bool = False) -> str:
    """Publish (and push); ``soft``: nothing to publish yet is a summary line, not an error (for `run`)."""
    from curation import publish as pub

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
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Publish accepted images as a versioned Hugging Face dataset (parquet + card), optionally pushed to the Hub."""
    m, ws = open_run(manifest, workdir, set_)
    say(do_publish(m, ws, quiet, out=out, push=push or None, revision=revision, dry_run=dry_run))
    typer.echo(workspace_line(ws))


# ---------------------------------------------------------------- run: every stage, topping classes up

RUN_STAGES = ("ingest", "scrape", "dedup", "score", "review-push", "publish")  # flows.stages.BUILD's names
TOP_UP_STAGES = ("scrape", "dedup", "score")  # a round: fetch more, then drop what duplicates or CLIP remove


def select_stages(only: list[str] | None, skip: list[str] | None, start: str | None) -> list[str]:
    """The stages `run` runs, in pipeline order; names may also be given comma-separated."""
    split = lambda vals: [n.strip() for v in vals or () for n in v.split(",") if n.strip()]  # noqa: E731
    only_, skip_ = split(only), split(skip)
    unknown = sorted(set(only_ + skip_ + ([start] if start else [])) - set(RUN_STAGES))
    if unknown:
        fail(f"unknown stage(s) {', '.join(unknown)}: stages are {', '.join(RUN_STAGES)}")
    if only_ and (skip_ or start):
        fail("--only cannot be combined with --skip or --from")
    chosen = set(only_) if only_ else set(RUN_STAGES[RUN_STAGES.index(start):] if start else RUN_STAGES)
    steps = [s for s in RUN_STAGES if s in chosen and s not in skip_]
    if not steps:
        fail("no stage left to run")
    return steps


@app.command()
def run(
    manifest: Path = ManifestOpt,
    workdir: Optional[Path] = WorkdirOpt,
    quiet: bool = QuietOpt,
    only: Optional[list[str]] = typer.Option(None, "--only", metavar="STAGE", help=f"run only these stages (repeatable): {', '.join(RUN_STAGES)}"),
    skip: Optional[list[str]] = typer.Option(None, "--skip", metavar="STAGE", help="leave these stages out (repeatable)"),
    start: Optional[str] = typer.Option(None, "--from", metavar="STAGE", help="start at this stage"),
    device: Optional[str] = DeviceOpt,
    dask_address: Optional[str] = DaskOpt,
    rounds: int = typer.Option(3, "--rounds", min=1, help="at most this many scrape -> dedup -> score rounds to reach the targets"),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Run every stage in order on the manifest, topping classes up until their targets are met or the sources run dry.

    Dedup and CLIP remove images after scrape has counted them, so classes can end short: while a
    class is short, `run` scrapes, dedups and scores again (at most --rounds rounds, and no further
    once a round brings nothing new); the report says per class: met, or short and why.
    """
    from curation import targets
    from curation.scrape import has_web_sources

    steps = select_stages(only, skip, start)
    m, ws = open_run(manifest, workdir, set_)
    applies = {"ingest": bool(m.sources_of(FolderSource)), "scrape": has_web_sources(m),
               # --only review-push asks for it by name; otherwise the manifest decides
               "review-push": m.review.push_in_run or bool(only)}
    steps = [s for s in steps if applies.get(s, True)]

    call = {  # scrape returns its summary: the top-up loop reads which classes it found exhausted
        "ingest": lambda: do_ingest(m, ws, quiet, dask_address), "scrape": lambda: scrape_summary(m, ws, quiet),
        "dedup": lambda: do_dedup(m, ws, quiet, dask_address), "score": lambda: do_score(m, ws, quiet, device, dask_address),
        "review-push": lambda: do_review_push(m, ws, quiet), "publish": lambda: do_publish(m, ws, quiet, soft=True),
    }
    lines: list[str] = []
    try:
        first = None
        for st in [s for s in steps if s in ("ingest", *TOP_UP_STAGES)]:
            out = call[st]()
            if st == "scrape":
                first, out = out, out.line()
            lines.append(out)
        if first is not None:
            def scrape_round(r: int) -> list[str]:
                s = call["scrape"]()
                lines.append(f"round {r}: {s.line()}")
                return s.exhausted

            def after(r: int) -> None:
                lines.extend(f"round {r}: {call[st]()}" for st in ("dedup", "score") if st in steps)

            why = targets.top_up(m, ws, rounds, first.exhausted, scrape_round, after)
            default_why = f"stopped after {rounds} round(s)"
        elif not has_web_sources(m):  # folder trees are ingested whole: nothing more to fetch
            why, default_why = {}, targets.EXHAUSTED
        else:
            why, default_why = {}, "scrape not run"
        if any(s in steps for s in ("ingest", *TOP_UP_STAGES)):
            table, line = targets.report(m, ws, why, default_why)
            if not quiet:
                report.console.print(report.frame_table(table, "run: images per class vs target"))
            lines.append(line)
        for st in [s for s in steps if s in ("review-push", "publish")]:
            lines.append(call[st]())
    finally:
        # On failure too: the finished stages' summaries, then the handler's one error line.
        for line in lines:
            say(line)
    finish(ws, f"run of {m.name} complete ({', '.join(steps)})")


# ---------------------------------------------------------------- train / predict (models/)


def do_train(m: Manifest, ws: Workspace, dataset: str | None, experiment: str | None,
             models: list[str] | None = None) -> str:
    from models import run as train_run

    s = train_run.run(m, ws, dataset=dataset, experiment=experiment, models=models or None)
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
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Cross-validate and train the manifest's models on the published dataset; evaluate once on its test split."""
    m, ws = open_run(manifest, workdir, set_)
    say(do_train(m, ws, dataset, experiment, model))


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
    results = export.predict(model, images, top_k=top_k, backend=backend)
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


@models_app.command("list")
def models_list(manifest: Path = ManifestOpt, workdir: Optional[Path] = WorkdirOpt,
                set_: Optional[list[str]] = SetOpt) -> None:
    """Every trained model: dataset version, status, held-out metric, which one is promoted."""
    from models import registry

    m, ws = open_readonly(manifest, workdir, set_)
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
                workdir: Optional[Path] = WorkdirOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """One model's registry entry: dataset, metrics, folders, decisions."""
    from models import registry

    _, ws = open_readonly(manifest, workdir, set_)
    reg = registry.read(ws)
    e = registry.get(reg, entry)
    typer.echo(json.dumps({**e, "promoted": reg["promoted"] == e["id"],
                            "decisions": [d for d in reg["events"] if d["entry"] == entry]}, indent=2, default=str))


@models_app.command("promote")
def models_promote(entry: str = typer.Argument(..., help="model id to promote"), manifest: Path = ManifestOpt,
                   workdir: Optional[Path] = WorkdirOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Promote a trained model by hand (recorded as a person's decision)."""
    from models import registry

    _, ws = open_readonly(manifest, workdir, set_)
    registry.promote(ws, entry)
    typer.echo(f"{entry} is now the promoted model")


@models_app.command("push")
def models_push(entry: Optional[str] = typer.Argument(None, help="model id (default: the promoted one)"),
                manifest: Path = ManifestOpt, workdir: Optional[Path] = WorkdirOpt,
                repo: Optional[str] = typer.Option(None, "--repo", help="Hub model repo ORG/NAME (default: retrain.model_repo_id)"),
                set_: Optional[list[str]] = SetOpt) -> None:
    """Upload a model with a model card naming its dataset version; token from $HF_TOKEN."""
    from models import hub

    m, ws = open_readonly(manifest, workdir, set_)
    r = hub.push(m, ws, entry, repo_id=repo)
    typer.echo(f"pushed {r['entry']} to {r['repo_id']} (tag {r['tag']}, commit {r['commit']})")


def main() -> None:  # pragma: no cover - `python -m curation.cli`
    try:
        app(prog_name="jurassiclass")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
