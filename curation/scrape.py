"""Manifest sources in, up to each class's target of stored images and catalog rows out, every row
with its provenance (source, query, source_url, page_url, license, author, retrieved_at).

Downloads, decoding, validation, hashing and the store write run in a few processes
(`Fetchers`), each with its own threads and its share of every per-host cap; this process hands
out candidate URLs, journals the outcomes and commits. Store files are written without a fsync
each: the committer makes a batch durable at once (`_sync_stored`) before the catalog refers to it.

Resumable by construction: each URL outcome is appended (and flushed) to a journal
(stages/scrape/journal.jsonl) as soon as its bytes are stored; catalog rows are written in
batches by a committer thread, off the download path. A re-run first adds the journal rows whose
images the catalog lacks (judged by the catalog itself, not by the sightings; a file a power cut
lost is fetched again instead), then skips every URL the journal has settled (stored,
rejected, or failed for good; timeouts and 5xx are tried again), and counts the catalog's
non-rejected images per class toward the target (folder-ingested ones too; images dedup or CLIP
rejected no longer count, so a re-run tops the class up: `live_counts`, `shortfall`).

Outputs: catalog rows (plus columns license_raw, redistributable), sightings, and under
stages/scrape/: journal.jsonl, summary.json (this run, per class: target, before, after, short,
exhausted; per class+source: requested, downloaded, duplicates, rejected and failed by reason;
warnings such as a source that gave nothing; API calls per host) and history.jsonl (every run).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import queue
import signal
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterator

import polars as pl

from curation import catalog, sources
from curation.catalog import Status, Workspace
from curation.config import (
    ClassSpec, FolderSource, ImageSettings, LicensedApiSource, Manifest, SearchEngineSource, SourceKind, UrlListSource,
)
from curation.download import Downloader, PauseBoard
from curation.ingest import build_row
from curation.licenses import normalise_license, redistributable
from curation.progress import track
from curation.store import atomic_write_bytes, deferred_sync
from curation.workers import die_with_parent, usable_cores, worker_context

log = logging.getLogger(__name__)

# Columns this stage adds to the catalog.
COLUMNS: dict[str, pl.DataType] = {"license_raw": pl.Utf8, "redistributable": pl.Boolean}
ScrapeError = sources.SourceError
# Catalog rows gathered while a commit runs, in multiples of commit_every, before downloads wait for it.
_MAX_GATHER = 10


@dataclass
class ScrapeSummary:
    """Per class (target, images before/after) and per class+source counts for this run."""

    # label, target, before, after, short, exhausted (every source ran out of candidates while short)
    classes: list[dict] = field(default_factory=list)
    sources: list[dict] = field(default_factory=list)  # label, source, requested, downloaded, duplicates, rejected, failed, reasons
    recovered: int = 0  # journal rows a previous, interrupted run had not cataloged yet
    skipped_known: int = 0  # candidate URLs settled by an earlier run, not fetched again
    source_errors: list[str] = field(default_factory=list)  # sources that broke mid-way (the run went on)
    # sources that ran to their end for a class without one candidate (e.g. an engine whose result
    # pages icrawler can no longer parse), and other things the user should look at
    warnings: list[str] = field(default_factory=list)
    api_calls: dict[str, int] = field(default_factory=dict)  # API host -> requests made (attempts), for key budgets
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
        if self.warnings:
            broken += f", {len(self.warnings)} warning(s): " + "; ".join(self.warnings[:3]) + ("; ..." if len(self.warnings) > 3 else "")
        short = sum(c["short"] for c in self.classes)
        return (f"scrape: {self.requested} URLs fetched, {self.downloaded} new images, {self.rejected} rejected, "
                f"{self.failed} failed, {self.skipped_known} already settled{extra}{broken}; "
                f"{short} images short of target ({self.elapsed_s:.0f}s)")

    def sources_frame(self) -> pl.DataFrame:
        cols = ["label", "source", "requested", "downloaded", "duplicates", "rejected", "failed", "reasons"]
        if not self.sources:
            return pl.DataFrame(schema={c: (pl.Utf8 if c in ("label", "source", "reasons") else pl.Int64) for c in cols})
        return pl.DataFrame(self.sources).select(cols)

    @property
    def exhausted(self) -> list[str]:
        """Classes still short whose sources had nothing more to offer: another scrape will not fill them."""
        return [c["label"] for c in self.classes if c["short"] and c["exhausted"]]

    def classes_frame(self) -> pl.DataFrame:
        cols = ["label", "target", "before", "after", "short", "exhausted"]
        if not self.classes:
            return pl.DataFrame(schema={"label": pl.Utf8, **{c: pl.Int64 for c in cols[1:-1]}, "exhausted": pl.Boolean})
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


def validate_and_store(root: str, raw: bytes, label: str, settings: ImageSettings, provenance: dict) -> dict:
    """Decode, validate and store one download; its catalog row.

    The file is not fsynced here (one fsync per image was half a scrape's time): `_commit` makes
    each batch durable at once before the catalog refers to it."""
    with deferred_sync():
        return build_row(Workspace(root), raw, label=label, settings=settings, provenance=provenance)


def fetch_one(dl: Downloader, root: str, images: ImageSettings, c: dict) -> dict:
    """One candidate fetched, validated and stored: its journal record (with the catalog row when
    bytes came back)."""
    res = dl.fetch(c["url"])
    rec = {"url": c["url"], "label": c["label"], "source": c["source"], "query": c["query"]}
    if not res.ok:
        rec.update(outcome="failed", reason=res.reason, detail=res.detail, transient=res.transient)
        return rec
    code = normalise_license(c["license"])
    prov = {"source": c["source"], "query": c["query"], "source_url": c["url"], "page_url": c["page_url"],
            "license": code, "license_raw": c.get("license_raw", c["license"]), "author": c["author"],
            "redistributable": redistributable(code)}
    row = validate_and_store(root, res.data, c["label"], images, prov)
    rec.update(outcome="image" if row["status"] == Status.candidate.value else "rejected",
               reason=row.get("reason"), transient=False, row=row)
    return rec


def _crashed(c: dict) -> dict:
    return {"url": c["url"], "label": c["label"], "source": c["source"], "query": c["query"], "outcome": "failed",
            "reason": "validator_crashed", "transient": True,
            "detail": "the worker process died twice with this URL in hand (a decoder crash, or the OOM killer)"}


def _fetch_worker(conn, index: int, count: int, threads: int, scrape_settings, images: ImageSettings, root: str,
                  board: PauseBoard) -> None:
    """A fetch process: `threads` threads that fetch, validate and store the candidates it is sent,
    with its share of every per-host cap; each record goes back as soon as it is done."""
    # Die with the scrape; leave Ctrl-C (sent to the whole process group) to it: it stops us.
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    dl = Downloader.from_settings(scrape_settings, images, enforced=sources.ENFORCED_HOST_LIMITS, pause_board=board)
    dl.share(index, count)
    tasks: queue.SimpleQueue = queue.SimpleQueue()
    send = threading.Lock()

    def loop() -> None:
        while (item := tasks.get()) is not None:
            tid, c = item
            try:
                out = (tid, fetch_one(dl, root, images, c), None)
            except Exception as exc:  # noqa: BLE001 - e.g. a full disk: the scrape's error, raised there
                out = (tid, None, RuntimeError(f"{type(exc).__name__}: {exc}"))
            try:
                with send:
                    conn.send(out)
            except OSError:
                return  # the scrape is gone (this process dies with it)

    pool = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            dl.stop()  # the scrape is gone
            break
        if msg is None:
            break
        if msg == "stop":
            dl.stop()  # in-flight and queued fetches end as "cancelled" (tried again next run)
            continue
        tasks.put(msg)
    for _ in pool:
        tasks.put(None)
    for t in pool:
        t.join()


class _Slot:
    """One fetch process and what it has in hand: task id -> (candidate, tries)."""

    def __init__(self, index: int):
        self.index = index
        self.proc = None
        self.conn = None
        self.inflight: dict[int, tuple[dict, int]] = {}
        self.send = threading.Lock()


class Fetchers:
    """Fetch, validate and store in `count` processes (`_fetch_worker`), each with its own
    downloader and threads, so neither downloads nor decoding share one GIL and image bytes never
    cross a pipe; this process only hands out candidates and gets records back.

    Every per-host cap is split across the processes (`Downloader.share`: in total never above
    it, so there are at most as many processes as the lowest cap), and a host's pause (429,
    Retry-After) is shared through a `PauseBoard`. ``on_result`` runs for each record as it arrives
    (the journal), before its future completes. A process that dies (a decoder crash on hostile
    bytes, the OOM killer) is replaced and each URL it held is tried once more; dying twice with a
    URL is a recorded failure ("validator_crashed", tried again next run), never the run's end.
    """

    def __init__(self, count: int, threads: int, manifest: Manifest, root: str, on_result, ctx=None):
        self.count, self.threads = count, threads
        self.args = (manifest.scrape, manifest.images, root)
        self.on_result = on_result
        # Forked (fast) now, while no download thread runs; `worker_context` picks spawn under an
        # orchestrator that handles SIGTERM itself. Replacements are spawned: threads run by then.
        self.ctx = ctx or mp.get_context()
        self.board = PauseBoard()
        self.lock = threading.Lock()
        self.futures: dict[int, Future] = {}
        self.next_id = 0
        self.closing = False
        self.slots = [_Slot(i) for i in range(count)]
        for s in self.slots:
            self._restart(s)  # one that cannot start now is tried again by `submit`
        self.ctx = mp.get_context("spawn")
        self.collector = threading.Thread(target=self._collect, name="scrape-fetchers", daemon=True)
        self.collector.start()

    def _start(self, slot: _Slot) -> None:
        mine, theirs = self.ctx.Pipe()
        st, images, root = self.args
        proc = self.ctx.Process(target=_fetch_worker, daemon=True,
                                args=(theirs, slot.index, self.count, self.threads, st, images, root, self.board))
        proc.start()
        theirs.close()
        slot.proc, slot.conn = proc, mine

    def _send(self, slot: _Slot, tid: int, c: dict, tries: int) -> None:
        """Hand a candidate to a process (called with self.lock held)."""
        slot.inflight[tid] = (c, tries)
        try:
            with slot.send:
                slot.conn.send((tid, c))
        except (OSError, ValueError):
            pass  # it died: the collector sees its end and hands the URL on

    def _restart(self, slot: _Slot) -> bool:
        """A new process in a dead slot (called with self.lock held); False if it cannot start."""
        try:
            self._start(slot)
            return True
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory for a new process: its URLs fail
            log.warning("could not start a fetch worker: %s", exc)
            return False

    def submit(self, c: dict) -> Future:
        f: Future = Future()
        with self.lock:
            tid = self.next_id
            self.next_id += 1
            self.futures[tid] = f
            live = [s for s in self.slots if s.conn is not None] or [s for s in self.slots[:1] if self._restart(s)]
            if live:
                self._send(min(live, key=lambda s: len(s.inflight)), tid, c, 1)
        if not live:
            self._resolve(tid, _crashed(c), None)
        return f

    def _resolve(self, tid: int, rec: dict | None, exc: BaseException | None) -> None:
        with self.lock:
            f = self.futures.pop(tid, None)
        if f is None:
            return
        if exc is None:
            try:
                self.on_result(rec)
            except BaseException as e:  # noqa: BLE001 - the journal failing is the run's error
                exc = e
        if not f.set_running_or_notify_cancel():
            return  # the run stopped waiting for it (Ctrl-C, an error)
        if exc is not None:
            f.set_exception(exc)
        else:
            f.set_result(rec)

    def _collect(self) -> None:
        from multiprocessing.connection import wait

        while True:
            with self.lock:
                if self.closing and not any(s.inflight for s in self.slots):
                    return
                live = {s.conn: s for s in self.slots if s.conn is not None}
                ends = {s.proc.sentinel: s for s in self.slots if s.conn is not None}
            for ready in wait([*live, *ends], timeout=0.2):
                if ready in live:
                    slot = live[ready]
                    try:
                        tid, rec, exc = ready.recv()
                    except (EOFError, OSError):
                        continue  # its end: seen through the sentinel
                    with self.lock:
                        slot.inflight.pop(tid, None)
                    self._resolve(tid, rec, exc)
                elif ready in ends:
                    self._replace(ends[ready])

    def _replace(self, slot: _Slot) -> None:
        # Results it sent before dying are read first: only URLs it really lost are handed on.
        while True:
            try:
                if not slot.conn.poll():
                    break
                tid, rec, exc = slot.conn.recv()
            except (EOFError, OSError):
                break
            with self.lock:
                slot.inflight.pop(tid, None)
            self._resolve(tid, rec, exc)
        slot.proc.join()
        slot.conn.close()
        with self.lock:
            slot.conn = None
            lost, slot.inflight = slot.inflight, {}
            if self.closing:
                failed = list(lost.items())
            else:
                log.warning("a fetch worker died (exit code %s); starting a new one", slot.proc.exitcode)
                again = self._restart(slot)
                failed = [(tid, ct) for tid, ct in lost.items() if ct[1] >= 2 or not again]
                for tid, (c, tries) in lost.items():
                    if tries < 2 and again:
                        self._send(slot, tid, c, tries + 1)
        for tid, (c, _) in failed:
            self._resolve(tid, _crashed(c), None)

    def stop(self) -> None:
        """Cancel what is in flight (Ctrl-C): fetches end as "cancelled" at their next wait."""
        for s in self.slots:
            if s.conn is None:
                continue
            try:
                with s.send:
                    s.conn.send("stop")
            except (OSError, ValueError):
                pass

    def close(self, *, cancel: bool = False) -> None:
        """Let the processes finish what they hold, then end them. ``cancel`` (Ctrl-C, an error):
        `stop` them first and wait at most a moment; what has not come back by then is fetched
        again next run (nothing of it was journaled)."""
        if cancel:
            self.stop()
        with self.lock:
            self.closing = True
        for s in self.slots:
            if s.conn is None:
                continue
            try:
                with s.send:
                    s.conn.send(None)
            except (OSError, ValueError):
                pass
        self.collector.join(timeout=2.0 if cancel else None)
        for s in self.slots:
            if s.proc is None:
                continue
            s.proc.join(timeout=0.5 if cancel else 5)
            if s.proc.is_alive():
                s.proc.kill()
                s.proc.join()


class Committer:
    """Catalog commits off the download path: one thread commits the batches of rows handed to it.

    While a commit runs, the caller keeps gathering rows (`offer` declines) and they go in together
    next: a commit's cost hardly grows with its rows, so a slow catalog gets fewer, larger commits
    rather than a backlog. `put` waits (the caller bounds what it gathers). The journal is the
    durable record: a failed commit loses nothing (the next run recovers it), but it ends this run
    with its error."""

    def __init__(self, ws: Workspace, cataloged: set[str], *, depth: int = 1):
        self.ws = ws
        self.cataloged = set(cataloged)  # this thread's own copy: the image_ids the catalog holds
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="scrape-commit", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        done = False
        while not done:
            rows = self.q.get()
            if rows is None:
                break
            while True:  # everything queued meanwhile joins this commit
                try:
                    more = self.q.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    done = True
                    break
                rows = rows + more
            if self.error is None:  # after a failure, drain: the producer must never block on a dead consumer
                try:
                    _commit(self.ws, rows, self.cataloged)
                except BaseException as exc:  # noqa: BLE001 - handed to the run's thread by check()
                    self.error = exc

    def offer(self, rows: list[dict]) -> bool:
        """Hand rows over if the committer can take them now; False: keep them and offer more later."""
        try:
            self.q.put_nowait(rows)
        except queue.Full:
            return False
        return True

    def put(self, rows: list[dict]) -> None:
        self.q.put(rows)

    def check(self) -> None:
        """Raise a commit's failure in the caller's thread."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Wait for every queued batch to be committed (or dropped after a failure)."""
        self.q.put(None)
        self.thread.join()


def _revive(row: dict) -> dict:
    row = dict(row)
    if isinstance(row.get("retrieved_at"), str):
        row["retrieved_at"] = datetime.fromisoformat(row["retrieved_at"])
    return row


def _sync_stored(ws: Workspace, rows: list[dict]) -> None:
    """Make the stored files of ``rows`` durable (written unsynced by `validate_and_store`): before
    any catalog row or sighting refers to them, so a power cut never leaves a row without its file."""
    ws.store.sync(ws.abspath(r["path"]) for r in rows if r.get("path"))


def _commit(ws: Workspace, rows: list[dict], cataloged: set[str]) -> int:
    """Add rows to the catalog (image_ids not in ``cataloged``, which it then includes) and record
    every one as a sighting. An append, not a read-modify-write: its cost does not grow with the catalog."""
    if not rows:
        return 0
    schema = {**catalog.SCHEMA, **COLUMNS}
    fresh = [r for r in rows if r["image_id"] not in cataloged]
    _sync_stored(ws, rows)
    with catalog.locked(ws):
        added = catalog.append(ws, catalog.rows_frame(fresh, schema)) if fresh else 0
        # Sightings after the catalog: a crash in between is repaired from the journal next time.
        catalog.record_sightings(ws, catalog.rows_frame(rows, schema))
    cataloged.update(r["image_id"] for r in fresh)
    return added


def _recover(ws: Workspace, records: list[dict]) -> tuple[int, set[str], pl.DataFrame, set[str]]:
    """Repair the catalog and sightings from the journal, judged by what the catalog actually holds.

    A journal row whose image the catalog lacks is cataloged again, even when its sighting exists (the
    catalog's rename can be lost while the sightings' write survived); a missing sighting is recorded.
    Its file was never synced: one a power cut lost (or left torn) is not cataloged, and its URL is
    fetched again. Returns (journal rows repaired, the URLs the sightings hold for images the catalog
    has: settled even without a journal, the catalog as repaired, the journal's URLs whose file was lost).
    """
    rows = [r["row"] for r in records if r.get("row")]
    with catalog.locked(ws):
        df = catalog.read(ws)
        s = catalog.read_sightings(ws)
        ids = set(df["image_id"].to_list())
        seen = set(zip(s["source_url"].to_list(), s["image_id"].to_list(), s["label"].to_list()))
        uncataloged, lost = [], set()
        checked: dict[str, bool] = {}
        for r in rows:
            if r.get("image_id") in ids:
                continue
            iid = r["image_id"]
            if r.get("path") and iid not in checked:
                checked[iid] = ws.store.intact(iid, ws.abspath(r["path"]))
            if r.get("path") and not checked[iid]:
                lost.add(r.get("source_url"))
                continue
            uncataloged.append(_revive(r))
        unsighted = [_revive(r) for r in rows if (r.get("source_url"), r.get("image_id"), r.get("label")) not in seen
                     and r.get("source_url") not in lost]
        _sync_stored(ws, uncataloged)
        if uncataloged:
            frame = catalog.rows_frame(uncataloged, {**catalog.SCHEMA, **COLUMNS})
            catalog.append(ws, frame)  # ids the catalog lacks: an append, not a rewrite of it all
            df, _ = catalog.add(df, frame)
        if unsighted:
            catalog.record_sightings(ws, catalog.rows_frame(unsighted, {**catalog.SCHEMA, **COLUMNS}))
        ids = set(df["image_id"].to_list())
    urls = set(s.filter(pl.col("image_id").is_in(list(ids)))["source_url"].drop_nulls().to_list())
    repaired = {(r.get("source_url"), r.get("image_id"), r.get("label")) for r in uncataloged + unsighted}
    return len(repaired), urls, df, lost


def effective_sources(m: Manifest) -> list:
    """The manifest's sources; a manifest that names none is an error (never a silent default engine)."""
    if not m.sources:
        raise ScrapeError(f"manifest {m.name!r} lists no sources: add e.g. `sources: [{{type: wikimedia}}]` "
                          f"(types: {', '.join(k.value for k in SourceKind)})")
    return list(m.sources)


def has_web_sources(m: Manifest) -> bool:
    """Whether this stage has anything to do (folder sources are the ingest stage's). A manifest with no
    sources at all answers True, so that the stage runs and says what is missing."""
    return not m.sources or any(not isinstance(s, FolderSource) for s in m.sources)


def live_counts(ws: Workspace) -> Counter:
    """Images per label that count toward a class's target: catalog rows not rejected (by validation,
    dedup or CLIP). What `run`'s top-up loop compares with the targets."""
    return _live_counts(catalog.read(ws))


def _live_counts(df: pl.DataFrame) -> Counter:
    live = df.filter(pl.col("status").is_not_null() & (pl.col("status") != Status.rejected.value))
    return Counter(dict(live.group_by("label").len().iter_rows())) if live.height else Counter()


def shortfall(manifest: Manifest, ws: Workspace) -> dict[str, int]:
    """Images each class still lacks to reach its target (0 when met), counted as `live_counts` does."""
    have = live_counts(ws)
    return {c.name: max(0, manifest.target_for(c.name) - have[c.name]) for c in manifest.classes}


def _candidates(m: Manifest, spec: ClassSpec, dl: Downloader, url_lists: dict[int, pl.DataFrame], excluded: Counter,
                errors: list[str], warnings: list[str]):
    """Every source's candidates for one class, in manifest order, lazily.

    A source that runs to its end without one candidate is a warning: an engine whose result pages
    the parser no longer understands looks exactly like that, and must not pass for "no images".
    """
    for src in effective_sources(m):
        if isinstance(src, FolderSource):
            continue  # the ingest stage reads folders; their images still count toward targets
        n = 0
        try:
            if isinstance(src, UrlListSource):
                it = sources.url_list(url_lists[id(src)], spec.name)
            elif isinstance(src, SearchEngineSource) and src.type == "flickr":
                it = sources.flickr(src, spec, dl, warnings)
            elif isinstance(src, SearchEngineSource):
                it = sources.search_engine(src, spec, user_agent=m.scrape.user_agent)
            else:
                it = sources.API_SOURCES[src.type](src, spec, dl)
            wanted = set(src.licenses) if isinstance(src, LicensedApiSource) else set()
            kept = 0
            for c in it:
                n += 1
                if wanted and normalise_license(c["license"]) not in wanted:
                    excluded[(spec.name, src.type)] += 1
                    continue
                yield c
                kept += 1
                if isinstance(src, LicensedApiSource) and src.max_per_class and kept >= src.max_per_class:
                    break
        except sources.SourceError:
            raise
        except Exception as exc:  # noqa: BLE001 - an API that changed shape must not stop the other sources
            msg = f"{src.type} for {spec.name}: {type(exc).__name__}: {exc}"[:300]
            log.warning("source failed, moving on: %s", msg)
            errors.append(msg)
            continue
        if n == 0 and not isinstance(src, UrlListSource):
            hint = " (its result pages could not be fetched, or changed beyond what icrawler's parser reads)" \
                if isinstance(src, SearchEngineSource) and src.type != "flickr" else ""
            msg = f"{src.type} for {spec.name}: no candidates for any query{hint}"
            log.warning("%s", msg)
            warnings.append(msg)


def run(manifest: Manifest, ws: Workspace, *, show_progress: bool = True, workers: int | None = None) -> ScrapeSummary:
    """Fill each class up to its target from the manifest's sources; see the module docstring.

    ``workers``: processes that download, decode, validate and store (default: one per CPU this
    process may use; never more than the lowest per-host cap, which each gets a share of; 0: in
    threads of this process).
    """
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
    recovered, sighted, df, lost = _recover(ws, records)
    summary = ScrapeSummary(recovered=recovered)
    settled: dict[str, dict] = {u: {"url": u} for u in sighted}
    for r in records:
        if not r.get("transient") and r["url"] not in lost:
            settled[r["url"]] = r
    del records

    known_ids = set(df["image_id"].to_list())
    have = _live_counts(df)
    before = dict(have)
    # Rows other stages added without licence flags (folder ingest): fixed at the end, without reading
    # the catalog again (this run's rows carry their flags).
    unflagged = df.filter(pl.col("redistributable").is_null())["image_id"] if "redistributable" in df.columns else df["image_id"]
    del df

    dl = Downloader.from_settings(st, manifest.images, enforced=sources.ENFORCED_HOST_LIMITS)
    stats: dict[tuple[str, str], Counter] = defaultdict(Counter)
    excluded: Counter = Counter()
    exhausted: dict[str, bool] = {}
    retry_later: set[str] = set()  # classes with a URL that failed for now (timeout, 5xx): worth another run
    pending: list[dict] = []
    last_commit = time.monotonic()
    journal = Journal(journal_path)

    def finish(rec: dict) -> dict:
        # As each record arrives: a kill loses at most the URLs in flight, fetched again next run
        # (their files, if stored, are simply found again: the store is content-addressed).
        journal.write(rec)
        return rec

    # As many fetch processes as asked for (default: one per CPU), but no more than the lowest
    # per-host cap: each process gets a share of every cap. None: fetch in this process's threads.
    n_proc = min(usable_cores() if workers is None else workers, dl.min_cap)
    fetchers = None
    if n_proc:
        fetchers = Fetchers(n_proc, -(-st.concurrency // n_proc), manifest, str(ws.root), finish,
                            ctx=worker_context(n_proc))
    committer = Committer(ws, known_ids)
    pool = ThreadPoolExecutor(max_workers=st.concurrency, thread_name_prefix="scrape")

    def submit(c: dict) -> Future:
        if fetchers is not None:
            return fetchers.submit(c)
        return pool.submit(lambda: finish(fetch_one(dl, str(ws.root), manifest.images, c)))

    def flush(force: bool = False) -> None:
        nonlocal pending, last_commit
        if not force:
            committer.check()  # a failed commit ends the run now, not after the last download
        if pending and (force or len(pending) >= st.commit_every or time.monotonic() - last_commit >= st.commit_interval_s):
            # Rows (not image bytes) gather while the committer is busy, up to a bound; then we wait.
            if force or len(pending) >= _MAX_GATHER * st.commit_every:
                committer.put(pending)
            elif not committer.offer(pending):
                return
            pending = []
            last_commit = time.monotonic()

    def handle(rec: dict) -> bool:
        """Account for one outcome; True when it is a new image for its class."""
        key = (rec["label"], rec["source"])
        if rec["outcome"] == "failed":
            stats[key]["failed"] += 1
            stats[key][rec["reason"]] += 1
            if rec.get("transient"):
                retry_later.add(rec["label"])
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

    def fill(spec: ClassSpec, need: int) -> Iterator[None]:
        """Yields once per new image; keeps at most `need - got` downloads in flight so it never overshoots."""
        it = _candidates(manifest, spec, dl, url_lists, excluded, summary.source_errors, summary.warnings)
        inflight: set[Future] = set()
        # Finished downloads arrive here (a done-callback), one at a time: `wait()` on every in-flight
        # future per result would cost the GIL-holding loop O(concurrency) lock round-trips an image.
        finished: queue.SimpleQueue = queue.SimpleQueue()
        queued: set[str] = set()
        errors_before = len(summary.source_errors)
        got, exhausted_now = 0, False
        try:
            while True:
                while not exhausted_now and len(inflight) < st.concurrency and got + len(inflight) < need:
                    c = next(it, None)
                    if c is None:
                        exhausted_now = True
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
                    f = submit(c)
                    inflight.add(f)
                    f.add_done_callback(finished.put)
                if not inflight:
                    # Exhausted: every source ran to its end, none broke, and no URL failed in a way a
                    # later run could fix; only then will another scrape not fill the class.
                    exhausted[spec.name] = (exhausted_now and len(summary.source_errors) == errors_before
                                            and spec.name not in retry_later)
                    return
                try:
                    done = [finished.get(timeout=st.commit_interval_s)]
                except queue.Empty:
                    done = []
                while True:
                    try:
                        done.append(finished.get_nowait())
                    except queue.Empty:
                        break
                inflight.difference_update(done)
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

    try:
        for spec in manifest.classes:
            need = manifest.target_for(spec.name) - have[spec.name]
            if need <= 0:
                continue
            for _ in track(fill(spec, need), total=need, description=f"scrape {spec.name}", show=show_progress):
                pass
        pool.shutdown(wait=True)
    except BaseException:
        # Ctrl-C or a real error: stop at once; what finished is committed below, and
        # downloads cut short are simply fetched again next time.
        dl.stop()
        if fetchers is not None:
            fetchers.close(cancel=True)
            fetchers = None
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        if fetchers is not None:
            fetchers.close()
        journal.close()
        flush(force=True)
        committer.close()
    committer.check()
    if unflagged.len():
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
                                "after": have[spec.name], "short": max(0, target - have[spec.name]),
                                "exhausted": exhausted.get(spec.name, False)})
    summary.api_calls = dict(sorted(dl.api_calls.items()))
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
        catalog.merge(ws, upd)
