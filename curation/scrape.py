"""Manifest sources in, up to each class's target of stored images and catalog rows out, every row
with its provenance (source, query, source_url, page_url, license, author, retrieved_at).

Resumable by construction: each URL outcome is appended (and flushed) to a journal
(stages/scrape/journal.jsonl) the moment its bytes are stored; catalog rows are written in
batches. A re-run first adds journal rows the catalog lacks, then skips every URL the journal
has settled (stored, rejected, or failed for good; timeouts and 5xx are tried again), and
counts the catalog's non-rejected images per class toward the target (folder-ingested ones too).

Outputs: catalog rows (plus columns license_raw, redistributable), sightings, and under
stages/scrape/: journal.jsonl, summary.json (this run, per class and per class+source:
requested, downloaded, duplicates, rejected and failed by reason) and history.jsonl (every run).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterator

import polars as pl

from curation import catalog, sources
from curation.catalog import Status, Workspace
from curation.config import (
    ClassSpec, FolderSource, LicensedApiSource, Manifest, SearchEngineSource, UrlListSource,
)
from curation.download import Downloader
from curation.ingest import build_row
from curation.licenses import normalise_license, redistributable
from curation.progress import track
from curation.store import atomic_write_bytes

log = logging.getLogger(__name__)

# Columns this stage adds to the catalog.
COLUMNS: dict[str, pl.DataType] = {"license_raw": pl.Utf8, "redistributable": pl.Boolean}
ScrapeError = sources.SourceError


@dataclass
class ScrapeSummary:
    """Per class (target, images before/after) and per class+source counts for this run."""

    classes: list[dict] = field(default_factory=list)  # label, target, before, after, short
    sources: list[dict] = field(default_factory=list)  # label, source, requested, downloaded, duplicates, rejected, failed, reasons
    recovered: int = 0  # journal rows a previous, interrupted run had not cataloged yet
    skipped_known: int = 0  # candidate URLs settled by an earlier run, not fetched again
    source_errors: list[str] = field(default_factory=list)  # sources that broke mid-way (the run went on)
    elapsed_s: float = 0.0

    @property
    def requested(self) -> int:
        return sum(r["requested"] for r in self.sources)

    @property
    def downloaded(self) -> int:
        return sum(r["downloaded"] for r in self.sources)

    @property
    def failed(self) -> int:
        return sum(r["failed"] for r in self.sources)

    @property
    def rejected(self) -> int:
        return sum(r["rejected"] for r in self.sources)

    def line(self) -> str:
        """A one-line summary for the CLI and orchestration artifacts."""
        extra = f", {self.recovered} recovered from an interrupted run" if self.recovered else ""
        broken = f", {len(self.source_errors)} source(s) broke: see summary.json" if self.source_errors else ""
        short = sum(c["short"] for c in self.classes)
        return (f"scrape: {self.requested} URLs fetched, {self.downloaded} new images, {self.rejected} rejected, "
                f"{self.failed} failed, {self.skipped_known} already settled{extra}{broken}; "
                f"{short} images short of target ({self.elapsed_s:.0f}s)")

    def sources_frame(self) -> pl.DataFrame:
        cols = ["label", "source", "requested", "downloaded", "duplicates", "rejected", "failed", "reasons"]
        if not self.sources:
            return pl.DataFrame(schema={c: (pl.Utf8 if c in ("label", "source", "reasons") else pl.Int64) for c in cols})
        return pl.DataFrame(self.sources).select(cols)

    def classes_frame(self) -> pl.DataFrame:
        cols = ["label", "target", "before", "after", "short"]
        if not self.classes:
            return pl.DataFrame(schema={"label": pl.Utf8, **{c: pl.Int64 for c in cols[1:]}})
        return pl.DataFrame(self.classes).select(cols)


class Journal:
    """Append-only JSON lines, flushed per line: a kill loses at most the line being written."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        torn = False
        if path.exists() and path.stat().st_size:
            with open(path, "rb") as fh:
                fh.seek(-1, 2)
                torn = fh.read(1) != b"\n"
        self.fh = open(path, "a", encoding="utf-8")
        if torn:  # a kill mid-line: start a fresh line so the next record parses
            self.fh.write("\n")

    @staticmethod
    def read(path: Path) -> list[dict]:
        if not path.exists():
            return []
        out = []
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def write(self, rec: dict) -> None:
        line = json.dumps(rec, default=str, ensure_ascii=False)
        with self.lock:
            if not self.fh.closed:  # a download finishing after an interrupted run closed the journal
                self.fh.write(line + "\n")
                self.fh.flush()

    def close(self) -> None:
        with self.lock:
            self.fh.close()


def _revive(row: dict) -> dict:
    row = dict(row)
    if isinstance(row.get("retrieved_at"), str):
        row["retrieved_at"] = datetime.fromisoformat(row["retrieved_at"])
    return row


def _commit(ws: Workspace, rows: list[dict]) -> int:
    """Add rows to the catalog (new image_ids only) and record every one as a sighting."""
    if not rows:
        return 0
    new = catalog.rows_frame(rows, {**catalog.SCHEMA, **COLUMNS})
    with catalog.locked(ws):
        df = catalog.read(ws)
        df, added = catalog.add(df, new)
        catalog.write(ws, df)
        # Sightings after the catalog: a crash in between is repaired from the journal next time.
        catalog.record_sightings(ws, new)
    return added


def _recover(ws: Workspace, records: list[dict]) -> tuple[int, set[str]]:
    """Catalog the journal rows an interrupted run stored but never committed.

    Returns (rows recovered, every URL the sightings already hold: settled even without a journal).
    """
    s = catalog.read_sightings(ws)
    urls = set(s["source_url"].drop_nulls().to_list())
    rows = [r["row"] for r in records if r.get("row")]
    if not rows:
        return 0, urls
    seen = set(zip(s["source_url"].to_list(), s["image_id"].to_list(), s["label"].to_list()))
    missing = [_revive(r) for r in rows if (r.get("source_url"), r.get("image_id"), r.get("label")) not in seen]
    _commit(ws, missing)
    return len(missing), urls


def effective_sources(m: Manifest) -> list:
    """The manifest's sources; a manifest that names none is scraped from Bing (the design's default)."""
    return list(m.sources) if m.sources else [SearchEngineSource(type="bing")]


def has_web_sources(m: Manifest) -> bool:
    """Whether this stage has anything to fetch (folder sources are the ingest stage's)."""
    return any(not isinstance(s, FolderSource) for s in effective_sources(m))


def _candidates(m: Manifest, spec: ClassSpec, dl: Downloader, url_lists: dict[int, pl.DataFrame], excluded: Counter,
                errors: list[str]):
    """Every source's candidates for one class, in manifest order, lazily."""
    for src in effective_sources(m):
        if isinstance(src, FolderSource):
            continue  # the ingest stage reads folders; their images still count toward targets
        try:
            if isinstance(src, UrlListSource):
                yield from sources.url_list(url_lists[id(src)], spec.name)
            elif isinstance(src, SearchEngineSource):
                yield from sources.search_engine(src, spec)
            elif isinstance(src, LicensedApiSource):
                wanted = set(src.licenses)
                n = 0
                for c in sources.API_SOURCES[src.type](src, spec, dl):
                    if wanted and normalise_license(c["license"]) not in wanted:
                        excluded[(spec.name, src.type)] += 1
                        continue
                    yield c
                    n += 1
                    if src.max_per_class and n >= src.max_per_class:
                        break
        except sources.SourceError:
            raise
        except Exception as exc:  # noqa: BLE001 - an API that changed shape must not stop the other sources
            msg = f"{src.type} for {spec.name}: {type(exc).__name__}: {exc}"[:300]
            log.warning("source failed, moving on: %s", msg)
            errors.append(msg)


def run(manifest: Manifest, ws: Workspace, *, show_progress: bool = True) -> ScrapeSummary:
    """Fill each class up to its target from the manifest's sources; see the module docstring."""
    t0 = time.monotonic()
    ws.ensure()
    sdir = ws.stage_dir("scrape")
    st = manifest.scrape
    # Sources that cannot work at all fail before anything is fetched.
    url_lists = {id(s): sources.read_url_list(s) for s in manifest.sources_of(UrlListSource)}
    for s in effective_sources(manifest):
        if isinstance(s, SearchEngineSource):
            sources.check_engine(s)

    journal_path = sdir / "journal.jsonl"
    records = Journal.read(journal_path)
    recovered, sighted = _recover(ws, records)
    summary = ScrapeSummary(recovered=recovered)
    settled: dict[str, dict] = {u: {"url": u} for u in sighted}
    for r in records:
        if not r.get("transient"):
            settled[r["url"]] = r
    del records

    df = catalog.read(ws)
    known_ids = set(df["image_id"].to_list())
    live = df.filter(pl.col("status") != Status.rejected.value)
    have = Counter(dict(live.group_by("label").len().iter_rows())) if live.height else Counter()
    before = dict(have)
    del df, live

    dl = Downloader.from_settings(st, manifest.images)
    stats: dict[tuple[str, str], Counter] = defaultdict(Counter)
    excluded: Counter = Counter()
    pending: list[dict] = []
    last_commit = time.monotonic()
    journal = Journal(journal_path)

    def work(c: dict) -> dict:
        res = dl.fetch(c["url"])
        rec = {"url": c["url"], "label": c["label"], "source": c["source"], "query": c["query"]}
        if not res.ok:
            rec.update(outcome="failed", reason=res.reason, detail=res.detail, transient=res.transient)
        else:
            code = normalise_license(c["license"])
            prov = {"source": c["source"], "query": c["query"], "source_url": c["url"], "page_url": c["page_url"],
                    "license": code, "license_raw": c.get("license_raw", c["license"]), "author": c["author"],
                    "redistributable": redistributable(code)}
            row = build_row(ws, res.data, label=c["label"], settings=manifest.images, provenance=prov)
            rec.update(outcome="image" if row["status"] == Status.candidate.value else "rejected",
                       reason=row.get("reason"), transient=False, row=row)
        journal.write(rec)  # right after the store write: a kill now loses no stored image
        return rec

    def flush(force: bool = False) -> None:
        nonlocal pending, last_commit
        if pending and (force or len(pending) >= st.commit_every or time.monotonic() - last_commit >= st.commit_interval_s):
            _commit(ws, pending)
            pending = []
            last_commit = time.monotonic()

    def handle(rec: dict) -> bool:
        """Account for one outcome; True when it is a new image for its class."""
        key = (rec["label"], rec["source"])
        if rec["outcome"] == "failed":
            stats[key]["failed"] += 1
            stats[key][rec["reason"]] += 1
            return False
        row = rec["row"]
        pending.append(row)
        settled[rec["url"]] = {**rec, "this_run": True}
        if rec["outcome"] == "rejected":
            stats[key]["rejected"] += 1
            stats[key][row["reason"]] += 1
            known_ids.add(row["image_id"])
            return False
        if row["image_id"] in known_ids:
            stats[key]["duplicates"] += 1
            return False
        known_ids.add(row["image_id"])
        stats[key]["downloaded"] += 1
        have[rec["label"]] += 1
        return True

    def fill(spec: ClassSpec, need: int, pool: ThreadPoolExecutor) -> Iterator[None]:
        """Yields once per new image; keeps at most `need - got` downloads in flight so it never overshoots."""
        it = _candidates(manifest, spec, dl, url_lists, excluded, summary.source_errors)
        inflight: set[Future] = set()
        queued: set[str] = set()
        got, exhausted = 0, False
        try:
            while True:
                while not exhausted and len(inflight) < st.concurrency and got + len(inflight) < need:
                    c = next(it, None)
                    if c is None:
                        exhausted = True
                        break
                    if not c.get("url") or c["url"] in queued:
                        continue
                    queued.add(c["url"])
                    prev = settled.get(c["url"])
                    if prev is not None:
                        summary.skipped_known += 1
                        _resight(prev, c)
                        continue
                    stats[(spec.name, c["source"])]["requested"] += 1
                    inflight.add(pool.submit(work, c))
                if not inflight:
                    return
                done, inflight = wait(inflight, timeout=st.commit_interval_s, return_when=FIRST_COMPLETED)
                for f in done:
                    if handle(f.result()):
                        got += 1
                        yield None
                flush()
        finally:
            it.close()  # stops crawler threads and API paging
            for f in inflight:
                f.cancel()

    def _resight(prev: dict, c: dict) -> None:
        # The same URL found for another class: a sighting under that label, without a download.
        row = prev.get("row")
        # Only for this run's finds: a re-run would otherwise record the same sighting again.
        if row and prev.get("this_run") and row.get("label") != c["label"]:
            pending.append({**_revive(row), "label": c["label"], "source": c["source"], "query": c["query"],
                            "retrieved_at": catalog.utcnow()})

    pool = ThreadPoolExecutor(max_workers=st.concurrency, thread_name_prefix="scrape")
    try:
        for spec in manifest.classes:
            need = manifest.target_for(spec.name) - have[spec.name]
            if need <= 0:
                continue
            for _ in track(fill(spec, need, pool), total=need, description=f"scrape {spec.name}", show=show_progress):
                pass
        pool.shutdown(wait=True)
    except BaseException:
        # Ctrl-C or a real error: stop at once; what finished is committed below, and
        # downloads cut short are simply fetched again next time.
        dl.stop()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        journal.close()
        flush(force=True)
    _fill_redistributable(ws)

    names = set(manifest.class_names)
    for frame in url_lists.values():
        for label, n in frame.filter(~pl.col("label").is_in(list(names)) | pl.col("label").is_null()).group_by("label").len().iter_rows():
            stats[(label or "(none)", "urls")]["class_not_in_manifest"] += n
    for key, n in excluded.items():
        stats[key]["license_excluded"] += n
    for (label, source), c in sorted(stats.items()):
        reasons = {k: v for k, v in c.items() if k not in ("requested", "downloaded", "duplicates", "rejected", "failed")}
        summary.sources.append({
            "label": label, "source": source, **{k: c[k] for k in ("requested", "downloaded", "duplicates", "rejected", "failed")},
            "reasons": ", ".join(f"{k}:{v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])),
        })
    for spec in manifest.classes:
        target = manifest.target_for(spec.name)
        summary.classes.append({"label": spec.name, "target": target, "before": before.get(spec.name, 0),
                                "after": have[spec.name], "short": max(0, target - have[spec.name])})
    summary.elapsed_s = round(time.monotonic() - t0, 2)
    atomic_write_bytes(sdir / "summary.json", json.dumps(asdict(summary), indent=2).encode())
    with open(sdir / "history.jsonl", "a", encoding="utf-8") as fh:  # one line per run, for trends
        fh.write(json.dumps({"finished_at": catalog.utcnow().isoformat(), **asdict(summary)}) + "\n")
    return summary


def _fill_redistributable(ws: Workspace) -> None:
    """Licence code and flag for rows other stages added (e.g. folder ingest) that lack them."""
    with catalog.locked(ws):
        df = catalog.ensure_columns(catalog.read(ws), COLUMNS)
        todo = df.filter(pl.col("redistributable").is_null())
        if todo.is_empty():
            return
        codes = [normalise_license(x) for x in todo["license"].to_list()]
        upd = pl.DataFrame({
            "image_id": todo["image_id"], "license": codes,
            "license_raw": todo["license_raw"].fill_null(todo["license"]),
            "redistributable": [redistributable(c) for c in codes],
        })
        catalog.write(ws, catalog.update(df, upd))
