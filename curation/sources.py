"""A manifest source and a class in, candidate images out (dicts: url, label, query, page_url,
license, author, source), lazily, so a scrape stops asking once its target is met.

Search engines go through icrawler's own feeders and parsers; its downloader is replaced by a
collector that hands each parsed task to `curation.download` (byte caps, politeness); the
`endpoint` setting re-targets an engine's requests (mirrors, tests). The licence-aware APIs
(Wikimedia Commons, iNaturalist, GBIF) are paged through the same polite Downloader, serially.
"""

from __future__ import annotations

import functools
import html
import json
import logging
import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import polars as pl
from requests.adapters import HTTPAdapter

from curation.config import ClassSpec, LicensedApiSource, SearchEngineSource, UrlListSource
from curation.download import Downloader
from curation.licenses import FLICKR

log = logging.getLogger(__name__)

Candidate = dict


class SourceError(RuntimeError):
    """A source that cannot be used at all (missing API key, unreadable URL list)."""


def candidate(url, label, source, *, query=None, page_url=None, license=None, author=None,
              license_raw=None) -> Candidate:
    """license: the image's own licence text; license_raw: what to keep as the raw text (default: license)."""
    return {"url": url, "label": label, "source": source, "query": query, "page_url": page_url,
            "license": license, "author": author, "license_raw": license_raw if license_raw is not None else license}


# ---------------------------------------------------------------- search engines (icrawler)

_ENGINE_HOSTS = {
    "bing": "https://www.bing.com/",
    "baidu": "http://image.baidu.com/",
    "google": "https://www.google.com/",
    "flickr": "https://api.flickr.com/",
}


class _Rebase(HTTPAdapter):
    """Sends requests meant for an engine's host to another base URL (a mirror or a test server)."""

    def __init__(self, base: str):
        super().__init__()
        self.base = urlsplit(base.rstrip("/"))

    def send(self, request, **kwargs):
        u = urlsplit(request.url)
        request.url = urlunsplit((self.base.scheme, self.base.netloc, self.base.path + u.path, u.query, ""))
        return super().send(request, **kwargs)


@functools.lru_cache(maxsize=None)
def _icrawler_classes(kind: str):
    # Imported here: icrawler pulls in bs4/lxml, which URL-list-only runs do not need.
    from icrawler import Crawler, Downloader as _IcDownloader
    from icrawler.builtin.baidu import BaiduFeeder, BaiduParser
    from icrawler.builtin.bing import BingFeeder, BingParser
    from icrawler.builtin.flickr import FlickrFeeder, FlickrParser
    from icrawler.builtin.google import GoogleFeeder, GoogleParser

    class SafeParse:
        # Engine pages change often (icrawler's Google parser returns None on a miss): a page
        # that cannot be parsed yields nothing instead of killing the parser thread.
        def parse(self, response, **kwargs):
            try:
                yield from super().parse(response, **kwargs) or []
            except Exception as exc:  # noqa: BLE001
                log.warning("%s: unparsable result page (%s)", kind, type(exc).__name__)

    class BingJson(BingParser):
        # icrawler's own regex keeps only `.jpg` URLs and drops the page URL; the `m` attribute is JSON.
        def parse(self, response, **kwargs):
            from bs4 import BeautifulSoup

            soup = BeautifulSoup(response.content.decode("utf-8", "ignore"), "lxml")
            for div in soup.find_all("div", class_="imgpt"):
                a = div.find("a", attrs={"m": True})
                if a is None:
                    continue
                try:
                    meta = json.loads(html.unescape(a["m"]))
                except ValueError:
                    continue
                if meta.get("murl"):
                    yield {"file_url": meta["murl"], "page_url": meta.get("purl"), "title": meta.get("t")}

    class Bing(SafeParse, BingJson):
        pass

    class Collector(_IcDownloader):
        """Takes parsed tasks instead of downloading them: curation.download fetches them."""

        def __init__(self, thread_num, signal, session, storage, sink=None):
            super().__init__(thread_num, signal, session, storage)
            self.sink = sink

        def worker_exec(self, max_num, queue_timeout=0.2, **kwargs):
            # icrawler's loop exits when the queue is briefly empty and can spin forever when
            # fewer results exist than max_num; this one ends when the parser has finished.
            while not self.signal.get("reach_max_num"):
                try:
                    task = self.in_queue.get(timeout=queue_timeout)
                except queue.Empty:
                    if self.signal.get("parser_exited"):
                        break
                    continue
                while not self.signal.get("reach_max_num"):
                    try:
                        self.sink.put(task, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                self.in_queue.task_done()
                with self.lock:
                    self.fetched_num += 1
                    if max_num and self.fetched_num >= max_num:
                        self.signal.set(reach_max_num=True)

    class Quiet(Crawler):
        def set_logger(self, log_level=logging.INFO):
            # icrawler's own set_logger calls logging.basicConfig, reconfiguring the host program's logging.
            self.logger = logging.getLogger("icrawler")

        def crawl(self, feeder_kwargs=None, parser_kwargs=None, downloader_kwargs=None):
            # Crawler.crawl with a 0.1 s poll instead of 1 s: a query costs ~0.3 s of overhead, not ~3 s.
            self.signal.reset()
            self.feeder.start(**(feeder_kwargs or {}))
            self.parser.start(**(parser_kwargs or {}))
            self.downloader.start(**(downloader_kwargs or {}))
            while self.downloader.is_alive():
                if not self.feeder.is_alive():
                    self.signal.set(feeder_exited=True)
                if not self.parser.is_alive():
                    self.signal.set(parser_exited=True)
                time.sleep(0.1)

    safe = {"baidu": (BaiduFeeder, BaiduParser), "google": (GoogleFeeder, GoogleParser),
            "flickr": (FlickrFeeder, FlickrParser)}
    if kind == "bing":
        return Quiet, BingFeeder, Bing, Collector
    feeder, parser = safe[kind]
    return Quiet, feeder, type(f"Safe{parser.__name__}", (SafeParse, parser), {}), Collector


class _Redact(logging.Filter):
    """icrawler logs page URLs on errors; Flickr's carry the API key."""

    _KEY = re.compile(r"(api_?key=)[^&\s'\"]+", re.I)

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if self._KEY.search(msg):
            record.msg, record.args = self._KEY.sub(r"\1***", msg), ()
        return True


_REDACT = _Redact()


def check_engine(src: SearchEngineSource) -> None:
    """Refuse an unusable engine source before anything is fetched (icrawler would fail in a thread)."""
    if src.type == "flickr" and not os.environ.get(src.api_key_env):
        raise SourceError(f"flickr source: set the API key in the environment variable {src.api_key_env}")
    if src.filters and src.type != "flickr":
        _, feeder_cls, _, _ = _icrawler_classes(src.type)
        try:
            feeder_cls.get_filter(None).apply(dict(src.filters))
        except (KeyError, ValueError, TypeError, AssertionError) as exc:
            raise SourceError(f"{src.type} source: bad filters: {exc}") from None


def search_engine(src: SearchEngineSource, spec: ClassSpec, *, max_wait_s: float = 120.0) -> Iterator[Candidate]:
    """Candidates from one engine, query after query of the class, up to max_per_query each."""
    kind = src.type
    check_engine(src)
    apikey = os.environ.get(src.api_key_env) if kind == "flickr" else None
    for query in spec.queries:
        yield from _crawl_query(src, spec.name, query, apikey, max_wait_s)


def _crawl_query(src: SearchEngineSource, label: str, query: str, apikey: str | None, max_wait_s: float):
    from icrawler.utils import CachedQueue

    kind = src.type
    Crawler, feeder_cls, parser_cls, collector_cls = _icrawler_classes(kind)
    for name in ("icrawler", "feeder", "parser", "downloader"):
        lg = logging.getLogger(name)
        lg.setLevel(logging.WARNING)
        if _REDACT not in lg.filters:
            lg.addFilter(_REDACT)
    sink: queue.Queue = queue.Queue(maxsize=256)
    crawler = Crawler(feeder_cls, parser_cls, collector_cls, extra_downloader_args={"sink": sink})
    # Unbounded page-URL queue: icrawler's feeders block forever on a full one once we stop early.
    crawler.feeder.out_queue = crawler.parser.in_queue = CachedQueue()
    if src.endpoint:
        crawler.session.mount(_ENGINE_HOSTS[kind], _Rebase(src.endpoint))
    n = min(src.max_per_query, 1000) if kind in ("bing", "google", "baidu") else src.max_per_query
    if kind == "flickr":
        feeder_kwargs = dict(apikey=apikey, max_num=n, text=query, extras="license,owner_name", per_page=100)
        parser_kwargs = dict(apikey=apikey, size_preference=["large", "medium 800", "medium 640", "medium", "original"],
                             queue_timeout=0.2)
    else:
        feeder_kwargs = dict(keyword=query, offset=0, max_num=n, filters=src.filters or None)
        parser_kwargs = dict(queue_timeout=0.2)
    worker = threading.Thread(
        target=crawler.crawl, name=f"icrawler-{kind}",
        kwargs=dict(feeder_kwargs=feeder_kwargs, parser_kwargs=parser_kwargs, downloader_kwargs=dict(max_num=n)),
        daemon=True,
    )
    worker.start()
    idle_since = time.monotonic()
    try:
        while True:
            try:
                task = sink.get(timeout=0.1)
            except queue.Empty:
                if not worker.is_alive() and sink.empty():
                    return
                if time.monotonic() - idle_since > max_wait_s:
                    log.warning("%s %r: no results for %.0fs, giving up", kind, query, max_wait_s)
                    return
                continue
            idle_since = time.monotonic()
            meta = task.get("meta") or {}
            if kind == "flickr" and meta:
                page = f"https://www.flickr.com/photos/{meta.get('owner')}/{meta.get('id')}"
                yield candidate(task["file_url"], label, kind, query=query, page_url=page,
                                license=FLICKR.get(str(meta.get("license")), "unknown"), author=meta.get("ownername"))
            else:
                yield candidate(task["file_url"], label, kind, query=query, page_url=task.get("page_url"))
    finally:
        crawler.signal.set(reach_max_num=True)


# ---------------------------------------------------------------- licence-aware APIs

_TAGS = re.compile(r"<[^>]+>")


def _text(value) -> str | None:
    """Plain text from an API field that may hold HTML (Wikimedia's Artist)."""
    if value is None:
        return None
    t = html.unescape(_TAGS.sub("", str(value))).strip()
    return re.sub(r"\s+", " ", t) or None


class ApiPageError(RuntimeError):
    """An API page that could not be had after the downloader's retries: the source stops for this class."""


def _api_pages(
    dl: Downloader, url: str, params: dict, src: LicensedApiSource, what: str,
    next_params: Callable[[dict, dict], dict | None],
) -> Iterator[dict]:
    """JSON pages of one API listing; ``next_params(page, params)`` gives the next page's params, or None at the end."""
    lagged = 0
    while params is not None:
        data, res = dl.get_json(url, dict(params))
        if data is None:
            raise ApiPageError(f"{what}: API page failed ({res.reason} {res.detail})".strip())
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            # Wikimedia's maxlag: the servers ask bots to wait while replication catches up.
            if data["error"].get("code") == "maxlag" and lagged < 5:
                lagged += 1
                time.sleep(max(src.request_interval_s, 5.0))
                continue
            raise ApiPageError(f"{what}: API error {data['error'].get('code')}: {data['error'].get('info', '')}"[:300])
        yield data
        params = next_params(data, params)
        if params is not None and src.request_interval_s:
            time.sleep(src.request_interval_s)


def wikimedia(src: LicensedApiSource, spec: ClassSpec, dl: Downloader) -> Iterator[Candidate]:
    """Wikimedia Commons file search per query; licence, author and file page from extmetadata."""
    url = src.endpoint or "https://commons.wikimedia.org/w/api.php"

    def next_params(data: dict, params: dict) -> dict | None:
        cont = data.get("continue")
        return {**params, **cont} if cont else None

    for query in spec.queries:
        params = {
            "action": "query", "format": "json", "formatversion": "2", "maxlag": "5",
            "generator": "search", "gsrsearch": f"{query} filetype:bitmap", "gsrnamespace": "6", "gsrlimit": "50",
            "prop": "imageinfo", "iiprop": "url|mime|extmetadata",
            "iiextmetadatafilter": "LicenseShortName|LicenseUrl|License|Artist|Credit",
        }
        if src.image_width:
            params["iiurlwidth"] = str(src.image_width)
        for data in _api_pages(dl, url, params, src, f"wikimedia {query!r}", next_params):
            items = (data.get("query") or {}).get("pages") or []
            if isinstance(items, dict):  # formatversion=1 shape
                items = list(items.values())
            for page in sorted(items, key=lambda p: p.get("index", 0)):
                for info in page.get("imageinfo") or []:
                    if not str(info.get("mime", "image/")).startswith("image/"):
                        continue
                    meta = info.get("extmetadata") or {}
                    lic = (meta.get("LicenseShortName") or {}).get("value") or (meta.get("LicenseUrl") or {}).get("value")
                    yield candidate(
                        info.get("thumburl") or info.get("url"), spec.name, "wikimedia", query=query,
                        page_url=info.get("descriptionurl"), license=_text(lic),
                        author=_text((meta.get("Artist") or {}).get("value")),
                    )


def inaturalist(src: LicensedApiSource, spec: ClassSpec, dl: Downloader) -> Iterator[Candidate]:
    """Research-grade observation photos of the class's taxon (taxon_ids.inaturalist, else its name)."""
    base = (src.endpoint or "https://api.inaturalist.org/v1").rstrip("/")
    params = {"quality_grade": "research", "photos": "true", "per_page": "200", "page": "1",
              "order": "desc", "order_by": "created_at"}
    taxon = spec.taxon_ids.get("inaturalist")
    if taxon is not None:
        params["taxon_id"] = str(taxon)
    else:
        params["taxon_name"] = spec.name
    codes = [c for c in src.licenses if c.startswith("cc")]
    if codes:
        params["photo_license"] = ",".join(codes)
    size = "large" if (src.image_width or 1024) <= 1024 else "original"

    def next_params(data: dict, params: dict) -> dict | None:
        page_no = int(params["page"])
        if not data.get("results") or page_no * int(params["per_page"]) >= int(data.get("total_results") or 0):
            return None
        return {**params, "page": str(page_no + 1)}

    query = params.get("taxon_name") or f"taxon:{taxon}"
    for data in _api_pages(dl, f"{base}/observations", params, src, f"inaturalist {spec.name!r}", next_params):
        for obs in data.get("results") or []:
            user = obs.get("user") or {}
            page = obs.get("uri") or f"https://www.inaturalist.org/observations/{obs.get('id')}"
            for photo in obs.get("photos") or []:
                if not photo.get("url"):
                    continue
                yield candidate(
                    re.sub(r"/square\.", f"/{size}.", photo["url"]), spec.name, "inaturalist",
                    query=query, page_url=page,
                    license=photo.get("license_code") or "all-rights-reserved",
                    author=user.get("name") or user.get("login") or _text(photo.get("attribution")),
                )


def gbif(src: LicensedApiSource, spec: ClassSpec, dl: Downloader) -> Iterator[Candidate]:
    """Still images attached to GBIF occurrences (taxon_ids.gbif, else the scientific name)."""
    base = (src.endpoint or "https://api.gbif.org/v1").rstrip("/")
    params = {"mediaType": "StillImage", "limit": "300", "offset": "0"}
    taxon = spec.taxon_ids.get("gbif")
    if taxon is not None:
        params["taxonKey"] = str(taxon)
    else:
        params["scientificName"] = spec.name

    def next_params(data: dict, params: dict) -> dict | None:
        results = data.get("results") or []
        if data.get("endOfRecords", True) or not results:
            return None
        return {**params, "offset": str(int(params["offset"]) + len(results))}

    query = params.get("scientificName") or f"taxon:{taxon}"
    for data in _api_pages(dl, f"{base}/occurrence/search", params, src, f"gbif {spec.name!r}", next_params):
        for occ in data.get("results") or []:
            for media in occ.get("media") or []:
                if media.get("type", "StillImage") != "StillImage" or not media.get("identifier"):
                    continue
                yield candidate(
                    media["identifier"], spec.name, "gbif", query=query,
                    page_url=media.get("references") or f"https://www.gbif.org/occurrence/{occ.get('key')}",
                    # The occurrence record's licence covers the record's data, not the photo: a photo
                    # without its own licence is `unknown`; the record's is kept aside in license_raw.
                    license=media.get("license"),
                    license_raw=media.get("license") or (f"(none on the image; occurrence record: {occ['license']})"
                                                         if occ.get("license") else None),
                    author=media.get("creator") or media.get("rightsHolder") or occ.get("recordedBy"),
                )


API_SOURCES = {"wikimedia": wikimedia, "inaturalist": inaturalist, "gbif": gbif}


# ---------------------------------------------------------------- URL lists

def read_url_list(src: UrlListSource) -> pl.DataFrame:
    """The list as a frame with columns url, label, license, author, page_url, query (strings)."""
    path = Path(src.path)
    if not path.is_file():
        raise SourceError(f"url list {path} does not exist")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            df = pl.read_parquet(path)
        else:
            df = pl.read_csv(path, infer_schema_length=0, separator="\t" if path.suffix.lower() == ".tsv" else ",")
    except Exception as exc:  # noqa: BLE001 - any reader error means the same to the user
        raise SourceError(f"url list {path}: cannot read it ({type(exc).__name__}: {exc})") from None
    missing = {"url", "label"} - set(df.columns)
    if missing:
        raise SourceError(f"url list {path}: missing column(s) {sorted(missing)} (need url,label)")
    for c in ("license", "author", "page_url", "query"):
        if c not in df.columns:
            df = df.with_columns(pl.lit(None, dtype=pl.Utf8).alias(c))
    df = df.select([pl.col(c).cast(pl.Utf8) for c in ("url", "label", "license", "author", "page_url", "query")])
    if src.license:
        df = df.with_columns(pl.col("license").fill_null(src.license))
    return df.filter(pl.col("url").is_not_null())


def url_list(df: pl.DataFrame, label: str) -> Iterator[Candidate]:
    for r in df.filter(pl.col("label") == label).iter_rows(named=True):
        yield candidate(r["url"].strip(), label, "urls", query=r["query"], page_url=r["page_url"],
                        license=r["license"], author=r["author"])
