"""A manifest source and a class in, candidate images out (dicts: url, label, query, page_url,
license, author, source), lazily, so a scrape stops asking once its target is met.

Search engines (Bing, Baidu, Google) go through icrawler's own feeders and parsers, with the
manifest's User-Agent; its downloader is replaced by a collector that hands each parsed task to
`curation.download` (byte caps, politeness); the `endpoint` setting re-targets an engine's requests
(mirrors, tests). Flickr and the licence-aware APIs (Wikimedia Commons, iNaturalist, GBIF) are paged
through the same polite Downloader, serially and paced, each the way its service documents:
Flickr's licence ids through licenses.getInfo, iNaturalist by id_above (page numbers end at its
10,000-result window), MediaWiki continuation merged into the original request.
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
from curation.errors import JurassiclassError
from curation.licenses import FLICKR, normalise_license

log = logging.getLogger(__name__)

Candidate = dict


class SourceError(JurassiclassError, RuntimeError):
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

    safe = {"baidu": (BaiduFeeder, BaiduParser), "google": (GoogleFeeder, GoogleParser)}
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
    if src.type == "flickr":
        if not os.environ.get(src.api_key_env):
            raise SourceError(f"flickr source: set the API key in the environment variable {src.api_key_env}")
        bad = sorted(set(src.filters) - FLICKR_SEARCH_FILTERS)
        if bad:
            raise SourceError(f"flickr source: bad filters: {', '.join(bad)} are not flickr.photos.search "
                              f"arguments (use {', '.join(sorted(FLICKR_SEARCH_FILTERS))})")
        return
    if src.filters:
        _, feeder_cls, _, _ = _icrawler_classes(src.type)
        try:
            feeder_cls.get_filter(None).apply(dict(src.filters))
        except (KeyError, ValueError, TypeError, AssertionError) as exc:
            raise SourceError(f"{src.type} source: bad filters: {exc}") from None


def search_engine(src: SearchEngineSource, spec: ClassSpec, *, user_agent: str,
                  max_wait_s: float = 120.0) -> Iterator[Candidate]:
    """Candidates from one engine (bing, baidu, google), query after query of the class, up to max_per_query each.

    ``user_agent`` replaces icrawler's built-in browser string on the result-page requests.
    """
    check_engine(src)
    for query in spec.queries:
        yield from _crawl_query(src, spec.name, query, user_agent, max_wait_s)


def _crawl_query(src: SearchEngineSource, label: str, query: str, user_agent: str, max_wait_s: float):
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
    # icrawler sends a fixed 2017 browser User-Agent; the manifest's identifies us, as the engines ask.
    crawler.session.headers["User-Agent"] = user_agent
    if src.endpoint:
        crawler.session.mount(_ENGINE_HOSTS[kind], _Rebase(src.endpoint))
    n = min(src.max_per_query, 1000)
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


class Pace:
    """At least ``interval_s`` between the starts of successive calls (an API's hourly or per-minute budget)."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.last = 0.0  # monotonic start of the previous call

    def __call__(self) -> None:
        delay = self.last + self.interval_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self.last = time.monotonic()


def _api_pages(
    dl: Downloader, url: str, params: dict, src, what: str,
    next_params: Callable[[dict, dict], dict | None], pace: Pace | None = None,
) -> Iterator[dict]:
    """JSON pages of one API listing; ``next_params(page, params)`` gives the next page's params, or None at the end."""
    pace = pace or Pace(src.request_interval_s)
    lagged = 0
    while params is not None:
        pace()
        data, res = dl.get_json(url, dict(params))
        if data is None:
            raise ApiPageError(_REDACT._KEY.sub(r"\1***", f"{what}: API page failed ({res.reason} {res.detail})".strip()))
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            # Wikimedia's maxlag: the servers ask bots to wait while replication catches up.
            if data["error"].get("code") == "maxlag" and lagged < 5:
                lagged += 1
                time.sleep(max(src.request_interval_s, 5.0))
                continue
            raise ApiPageError(f"{what}: API error {data['error'].get('code')}: {data['error'].get('info', '')}"[:300])
        if isinstance(data, dict) and data.get("stat") == "fail":  # Flickr answers errors with HTTP 200
            raise ApiPageError(f"{what}: API error {data.get('code')}: {data.get('message', '')}"[:300])
        yield data
        params = next_params(data, params)


# Wikimedia serves (and caches) thumbnails only at these widths; any other width is rendered on demand,
# which its media servers refuse to do for bots (mediawiki.org "Common thumbnail sizes", T414805).
WIKIMEDIA_THUMB_WIDTHS = (20, 40, 60, 120, 250, 330, 500, 960, 1280, 1920, 3840)
# upload.wikimedia.org's robot policy: a total concurrency of at most 2. The manifest may go lower, never higher.
ENFORCED_HOST_LIMITS = {"upload.wikimedia.org": 2}


def wikimedia_thumb_width(width: int) -> int:
    """The largest standard thumbnail width not above ``width`` (the smallest standard one below that)."""
    fits = [w for w in WIKIMEDIA_THUMB_WIDTHS if w <= width]
    return fits[-1] if fits else WIKIMEDIA_THUMB_WIDTHS[0]


def wikimedia(src: LicensedApiSource, spec: ClassSpec, dl: Downloader) -> Iterator[Candidate]:
    """Wikimedia Commons file search per query; licence, author and file page from extmetadata."""
    url = src.endpoint or "https://commons.wikimedia.org/w/api.php"

    for query in spec.queries:
        params = {
            "action": "query", "format": "json", "formatversion": "2", "maxlag": "5",
            "generator": "search", "gsrsearch": f"{query} filetype:bitmap", "gsrnamespace": "6", "gsrlimit": "50",
            "prop": "imageinfo", "iiprop": "url|mime|extmetadata",
            "iiextmetadatafilter": "LicenseShortName|LicenseUrl|License|Artist|Credit",
        }
        if src.image_width:
            params["iiurlwidth"] = str(wikimedia_thumb_width(src.image_width))

        def next_params(data: dict, _prev: dict, first: dict = params) -> dict | None:
            # API:Continue: merge `continue` into the ORIGINAL request; merged into the previous one, a
            # finished module's key (iicontinue) would ride along into the next generator batch.
            cont = data.get("continue")
            return {**first, **cont} if cont else None

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
    """Research-grade observation photos of the class's taxon (taxon_ids.inaturalist, else its name).

    Paged by ``id_above`` in ascending id order: page numbers stop at the API's 10,000-result
    window (page * per_page > 10,000 is refused), ids never do.
    """
    base = (src.endpoint or "https://api.inaturalist.org/v1").rstrip("/")
    params = {"quality_grade": "research", "photos": "true", "per_page": "200",
              "order": "asc", "order_by": "id", "id_above": "0"}
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
        results = data.get("results") or []
        if len(results) < int(params["per_page"]) or int(data.get("total_results") or 0) <= len(results):
            return None  # total_results counts what is left above id_above: this page held it all
        return {**params, "id_above": str(max(int(o["id"]) for o in results))}

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


# ---------------------------------------------------------------- Flickr (its REST API, paced)

# flickr.photos.search arguments a manifest may pass as `filters` (the rest are ours to set).
FLICKR_SEARCH_FILTERS = frozenset({
    "license", "sort", "content_types", "content_type", "media", "safe_search", "tags", "tag_mode",
    "min_upload_date", "max_upload_date", "min_taken_date", "max_taken_date", "is_commons", "in_gallery",
    "orientation", "group_id", "user_id", "privacy_filter", "geo_context", "has_geo",
})
# Size URLs asked for in the search itself, largest first up to 1024 px: no getSizes call per photo.
_FLICKR_SIZES = ("url_l", "url_c", "url_z", "url_o")


def flickr_license_code(name: str | None, url: str | None) -> str:
    """A licence code for one entry of flickr.photos.licenses.getInfo, from its URL or name (not its id)."""
    url, low = (url or "").strip(), (name or "").lower()
    if "creativecommons.org" in url:
        return normalise_license(url)
    if "government work" in low or "no known copyright" in low or "public domain" in low:
        return "pd"
    return normalise_license(name)


def flickr_licenses(dl: Downloader, rest: str, key: str, pace: Pace) -> tuple[dict[str, tuple[str, str]], str | None]:
    """(licence id -> (code, the licence as getInfo names it), a warning if getInfo failed and the
    ids 0-10 table stood in)."""
    pace()
    data, res = dl.get_json(rest, {"method": "flickr.photos.licenses.getInfo", "api_key": key,
                                   "format": "json", "nojsoncallback": "1"})
    items = ((data or {}).get("licenses") or {}).get("license") if isinstance(data, dict) else None
    if not items:
        why = data.get("message") if isinstance(data, dict) else f"{res.reason} {res.detail}".strip()
        warn = f"flickr: licenses.getInfo failed ({why}); licence ids above 10 are recorded as unknown"
        return {k: (v, f"flickr license id {k}") for k, v in FLICKR.items()}, _REDACT._KEY.sub(r"\1***", warn)
    return {str(i.get("id")): (flickr_license_code(i.get("name"), i.get("url")),
                               " ".join(x for x in (i.get("name"), i.get("url")) if x) + f" (flickr license id {i.get('id')})")
            for i in items}, None


def flickr(src: SearchEngineSource, spec: ClassSpec, dl: Downloader, warnings: list[str] | None = None) -> Iterator[Candidate]:
    """Photos from flickr.photos.search, query after query, up to max_per_query each.

    Every call is paced (``request_interval_s``: a key allows 3,600 calls an hour) and counted by the
    downloader; size URLs come with the search, so getSizes is called only for a photo without any.
    """
    check_engine(src)
    key = os.environ[src.api_key_env]
    rest = (src.endpoint or "https://api.flickr.com").rstrip("/") + "/services/rest/"
    pace = Pace(src.request_interval_s)
    codes, warn = flickr_licenses(dl, rest, key, pace)
    if warn and warnings is not None:
        warnings.append(warn)
    per_page = min(src.max_per_query, 500)  # the API's page-size cap
    for query in spec.queries:
        params = {"method": "flickr.photos.search", "api_key": key, "format": "json", "nojsoncallback": "1",
                  "text": query, "media": "photos", "extras": ",".join(("license", "owner_name") + _FLICKR_SIZES),
                  "per_page": str(per_page), "page": "1", **{k: str(v) for k, v in src.filters.items()}}
        got = 0

        def next_params(data: dict, params: dict) -> dict | None:
            photos = data.get("photos") or {}
            page = int(params["page"])
            # Flickr serves at most the first 4,000 results of a search; past them pages repeat
            if (got >= src.max_per_query or not photos.get("photo") or page >= int(photos.get("pages") or 0)
                    or page * per_page >= 4000):
                return None
            return {**params, "page": str(page + 1)}

        for data in _api_pages(dl, rest, params, src, f"flickr {query!r}", next_params, pace):
            for photo in (data.get("photos") or {}).get("photo") or []:
                if got >= src.max_per_query:
                    break
                url = next((photo[k] for k in _FLICKR_SIZES if photo.get(k)), None) or _flickr_size(dl, rest, key, photo, pace)
                if not url:
                    continue
                got += 1
                lic = str(photo.get("license"))
                code, raw = codes.get(lic, ("unknown", f"flickr license id {lic}"))
                yield candidate(url, spec.name, "flickr", query=query,
                                page_url=f"https://www.flickr.com/photos/{photo.get('owner')}/{photo.get('id')}",
                                license=code, license_raw=raw, author=photo.get("ownername"))


def _flickr_size(dl: Downloader, rest: str, key: str, photo: dict, pace: Pace) -> str | None:
    """The best size up to 1024 px from flickr.photos.getSizes (one paced call), or None."""
    pace()
    data, _ = dl.get_json(rest, {"method": "flickr.photos.getSizes", "api_key": key, "photo_id": str(photo.get("id")),
                                 "format": "json", "nojsoncallback": "1"})
    if not isinstance(data, dict) or data.get("stat") != "ok":
        return None
    sizes = {str(s.get("label")).lower(): s.get("source") for s in (data.get("sizes") or {}).get("size") or []}
    return next((sizes[k] for k in ("large", "medium 800", "medium 640", "medium", "original") if sizes.get(k)), None)


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
