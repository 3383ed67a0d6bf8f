"""Sources against loopback services that behave like the real ones, in their published shapes
(tests/assets/sources/README.md): Flickr's REST API (licence list, paging, error codes, 429 +
Retry-After), iNaturalist's 10,000-result window, MediaWiki continuation, and saved Google and
Baidu result pages read by icrawler's own parsers."""

from __future__ import annotations

import json
import re
import threading
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import polars as pl
import pytest

from curation import catalog, scrape, sources
from curation.config import ClassSpec, ImageSettings, LicensedApiSource, ScrapeSettings, SearchEngineSource, parse_manifest
from curation.download import Downloader
from tests import support

ASSETS = Path(__file__).parents[1] / "assets" / "sources"
FLICKR_KEY = "k-2025"
INAT_WINDOW = 10_000  # Elasticsearch max_result_window behind API v1: page * per_page beyond it is refused


def asset(name: str, base: str) -> str:
    return (ASSETS / name).read_text(encoding="utf-8").replace("{base}", base)


# Baidu obfuscates objURL; this is the inverse of icrawler's BaiduParser._decode_url tables.
_B1 = {":": "_z2C$q", ".": "_z&e3B", "/": "AzdH3F"}
_B2 = dict(zip("abcdefghijklmnopqrstuvw1234567890", "wkv1ju2it3hs4g5rq6fp7eo8dn9cm0bla"))


def baidu_encode(url: str) -> str:
    out = "".join(_B2.get(ch, ch) for ch in url)
    for plain, cipher in _B1.items():
        out = out.replace(plain, cipher)
    return out


class Service:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[str, list[dict]] = defaultdict(list)  # path -> query dicts, in order
        self.times: dict[str, list[float]] = defaultdict(list)
        self.agents: dict[str, set] = defaultdict(set)
        self.hits: Counter = Counter()
        self.inat_total = 450
        self.google_page = "google_isch_legacy.html"
        self.flickr_throttle_once = False
        self.gbif_calls = 0
        self.inflight = 0
        self.max_inflight = 0
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- Flickr REST: errors come back as HTTP 200 {"stat": "fail", "code": N, "message": ...}
    def flickr(self, q: dict):
        if q.get("api_key") != FLICKR_KEY:
            return 200, {"stat": "fail", "code": 100, "message": "Invalid API Key (Key has invalid format)"}, {}
        method = q.get("method")
        if method == "flickr.photos.licenses.getInfo":
            return 200, json.loads(asset("flickr_licenses_getInfo.json", self.base)), {}
        if method == "flickr.photos.search":
            if self.flickr_throttle_once:
                self.flickr_throttle_once = False
                return 429, {"stat": "fail", "code": 429, "message": "Too Many Requests"}, {"Retry-After": "1"}
            data = json.loads(asset("flickr_photos_search.json", self.base))
            photos = data["photos"]["photo"]
            per, page = min(int(q.get("per_page", 100)), 500), int(q.get("page", 1))
            data["photos"].update(page=page, perpage=per, total=len(photos), pages=-(-len(photos) // per),
                                  photo=photos[(page - 1) * per:page * per])
            wanted = {x for x in q.get("license", "").split(",") if x}
            if wanted:
                data["photos"]["photo"] = [p for p in data["photos"]["photo"] if p["license"] in wanted]
            return 200, data, {}
        if method == "flickr.photos.getSizes":
            return 200, json.loads(asset("flickr_getSizes.json", self.base).replace("{id}", q["photo_id"])), {}
        return 200, {"stat": "fail", "code": 112, "message": f'Method "{method}" not found'}, {}

    # -- iNaturalist API v1 /observations: order_by=id, id_above, per_page <= 200, 10,000-result window
    def inat(self, q: dict):
        per, page = min(int(q.get("per_page", 30)), 200), int(q.get("page", 1))
        if page * per > INAT_WINDOW:
            return 403, {"error": "Forbidden", "status": 403}, {}
        assert q.get("order_by") == "id", "without order_by=id, id_above paging skips or repeats"
        above = int(q.get("id_above", 0))
        ids = [i for i in range(1, self.inat_total + 1) if i > above]
        ids = ids if q.get("order") == "asc" else ids[::-1]
        template = json.loads(asset("inaturalist_observation.json", self.base))
        results = []
        for i in ids[(page - 1) * per:page * per]:
            o = json.loads(json.dumps(template).replace('"id": 0', f'"id": {i}').replace("/0", f"/{i}"))
            o["photos"][0]["id"] = 10_000 + i
            if i % 7 == 0:  # the schema allows a null licence: the photographer kept all rights
                o["photos"][0].update(license_code=None, attribution="(c) Observer, all rights reserved")
            results.append(o)
        return 200, {"total_results": len(ids), "page": page, "per_page": per, "results": results}, {}

    # -- GBIF occurrence/search: offset/limit paging, endOfRecords, 420 (its "slow down") with Retry-After
    def gbif(self, q: dict):
        self.gbif_calls += 1
        if self.gbif_calls == 1:
            return 420, {"message": "Enhance Your Calm"}, {"Retry-After": "1"}
        off, limit = int(q.get("offset", 0)), min(int(q.get("limit", 20)), 300)
        keys = list(range(off, min(off + limit, 350)))
        results = [{"key": 4000 + k, "license": "http://creativecommons.org/licenses/by/4.0/legalcode",
                    "media": [{"type": "StillImage", "format": "image/jpeg", "identifier": f"{self.base}/img/gbif-{k}.jpg",
                               "license": None if k % 5 == 0 else "http://creativecommons.org/publicdomain/zero/1.0/",
                               "rightsHolder": f"Holder {k}", "creator": None}]} for k in keys]
        return 200, {"offset": off, "limit": limit, "endOfRecords": off + limit >= 350, "count": 350, "results": results}, {}

    # -- MediaWiki action=query, generator=search + prop=imageinfo, with API:Continue
    def wiki(self, q: dict):
        term = q["gsrsearch"].replace(" filetype:bitmap", "").replace(" ", "_")
        off = int(q.get("gsroffset", 0))
        batch = list(range(off, min(off + 3, 6)))
        names = {i: f"wm_{term}_{i}.jpg" for i in batch}
        ii = q.get("iicontinue")
        if ii is not None and ii.split("|")[0] not in names.values():
            return 200, {"error": {"code": "badcontinue", "info": "Invalid continue param. You should pass the "
                                   "original value returned by the previous query."}}, {}
        # imageinfo for the batch's last file does not fit in the first answer: iicontinue, then the generator
        with_info = batch[:-1] if ii is None else batch[-1:]
        pages = []
        for k, i in enumerate(batch):
            page = {"pageid": 1000 + i, "ns": 6, "title": f"File:{names[i]}", "index": k + 1}
            if i in with_info:
                width = q.get("iiurlwidth")
                page["imageinfo"] = [{
                    "url": f"{self.base}/img/{names[i]}?orig", "descriptionurl": f"https://commons.wikimedia.org/wiki/File:{names[i]}",
                    "thumburl": f"{self.base}/img/{width}px-{names[i]}", "thumbwidth": int(width or 0), "mime": "image/jpeg",
                    "extmetadata": {"LicenseShortName": {"value": "CC BY-SA 4.0", "source": "commons-desc-page"},
                                    "Artist": {"value": f"<a href=\"//commons.wikimedia.org/wiki/User:A{i}\">A{i}</a>"}}}]
            pages.append(page)
        out: dict = {"batchcomplete": ii is not None, "query": {"pages": pages}}
        if ii is None:
            # MediaWiki repeats the generator's own position, so that merged into the original request
            # the same batch is generated again ("continue": "gsroffset||" holds the generator still)
            out["continue"] = {"iicontinue": f"{names[batch[-1]]}|20240101000000", "continue": "gsroffset||",
                               **({"gsroffset": off} if off else {})}
        elif off + 3 < 6:
            out["continue"] = {"gsroffset": off + 3, "continue": "gsroffset||"}
        return 200, out, {}


def _handler(svc: Service):
    class H(support.QuietHandler):

        def do_GET(self):
            u = urlsplit(self.path)
            q = {k: v[0] for k, v in parse_qs(u.query).items()}
            p = u.path
            with svc.lock:
                svc.requests[p].append(q)
                svc.times[p].append(time.monotonic())
                svc.agents[p].add(self.headers.get("User-Agent"))
                svc.hits[p] += 1
            try:
                route = {"/flickr/services/rest/": svc.flickr, "/inat/v1/observations": svc.inat, "/w/api.php": svc.wiki,
                         "/gbif/v1/occurrence/search": svc.gbif}.get(p)
                if route:
                    code, obj, headers = route(q)
                    return self.send(code, json.dumps(obj).encode(), "application/json", headers)
                if p == "/google/search":
                    return self.send(200, asset(svc.google_page, svc.base).encode(), "text/html; charset=UTF-8")
                if p == "/baidu/search/acjson":
                    text = re.sub(r"\{obj:([^}]+)\}", lambda m: baidu_encode(svc.base + m.group(1)),
                                  asset("baidu_acjson.json", svc.base))
                    return self.send(200, text.encode(), "text/html; charset=utf-8")  # Baidu labels its JSON so
                if p.startswith("/slow/"):
                    with svc.lock:
                        svc.inflight += 1
                        svc.max_inflight = max(svc.max_inflight, svc.inflight)
                    time.sleep(0.3)
                    with svc.lock:
                        svc.inflight -= 1
                    return self.send(200, support.jpeg(5), "image/jpeg")
                if p.startswith("/img/"):
                    return self.send(200, support.jpeg(zlib.crc32(p.encode())), "image/jpeg")
                return self.send(404, b"no route", "text/plain")
            except (BrokenPipeError, ConnectionResetError):
                return None

    return H


@pytest.fixture(scope="module")
def svc():
    s = Service()
    srv = support.LoopbackServer(_handler(s))
    s.port = srv.port
    yield s
    srv.close()


def dl() -> Downloader:
    return Downloader(timeout_s=5, retries=2, backoff_s=0.05, max_backoff_s=3, allow_private=True)


SPEC = ClassSpec(name="Stegosaurus", queries=["Stegosaurus fossil", "Stegosaurus art"])
FAST = {"timeout_s": 5.0, "retries": 2, "backoff_s": 0.05, "max_backoff_s": 3, "concurrency": 4,
        "per_host_concurrency": 4, "allow_private_networks": True}


def manifest(srcs: list, target: int = 20):
    return parse_manifest({"name": "t", "classes": [{"name": "Stegosaurus", "queries": SPEC.queries}],
                           "sources": srcs, "scrape": {**FAST, "target_per_class": target}})


# ---------------------------------------------------------------- Flickr


def test_flickr_licences_from_getinfo_filters_reach_the_search_and_calls_are_paced_and_counted(svc, workspace, monkeypatch):
    monkeypatch.setenv("FLICKR_API_KEY", FLICKR_KEY)
    src = {"type": "flickr", "endpoint": f"{svc.base}/flickr", "max_per_query": 10, "request_interval_s": 0.25,
           "filters": {"license": "0,4,9,12,16", "sort": "relevance"}}
    s = scrape.run(manifest([src]), workspace, show_progress=False)
    df = catalog.read(workspace)
    lic = {r["source_url"].rsplit("/", 1)[1]: r["license"] for r in df.iter_rows(named=True)}
    # ids 12 and 16 are CC 4.0 licences (added 2025): mapped from getInfo's URL, not a table that stops at 10
    assert lic == {"flickr-54011_b.jpg": "cc-by", "flickr-54012_c.jpg": "cc-by-sa", "flickr-54013_b.jpg": "all-rights-reserved",
                   "flickr-54014_z.jpg": "cc0", "flickr-54015_z.jpg": "cc-by-nc-nd"}
    assert df.filter(pl.col("source_url").str.contains("54012"))["author"].to_list() == ["Ben Owner"]
    raw = {r["source_url"].rsplit("/", 1)[1]: r["license_raw"] for r in df.iter_rows(named=True)}
    arr = raw["flickr-54013_b.jpg"]
    assert arr.startswith("All Rights Reserved https://") and arr.endswith("(flickr license id 0)")
    assert raw["flickr-54011_b.jpg"] == "Attribution License https://creativecommons.org/licenses/by/2.0/ (flickr license id 4)"
    searches = [q for q in svc.requests["/flickr/services/rest/"] if q["method"] == "flickr.photos.search"]
    assert {(q["license"], q["sort"]) for q in searches} == {("0,4,9,12,16", "relevance")}  # the manifest's filters
    methods = Counter(q["method"] for q in svc.requests["/flickr/services/rest/"])
    # one getInfo, one search per query, getSizes only for the photo whose search row had no size URL
    assert methods == {"flickr.photos.licenses.getInfo": 1, "flickr.photos.search": 2, "flickr.photos.getSizes": 2}
    assert s.api_calls == {"127.0.0.1": 5}
    t = svc.times["/flickr/services/rest/"]
    # paced (3,600 calls an hour at the default 1 s); the stub stamps arrivals, which jitter by a few ms
    # against the pacer's send clock (CI once saw 0.2398), while unpaced calls arrive about 1 ms apart
    assert min(b - a for a, b in zip(t, t[1:])) >= 0.2
    assert FLICKR_KEY not in (workspace.root / "stages" / "scrape" / "journal.jsonl").read_text()
    assert FLICKR_KEY not in json.dumps(json.loads((workspace.root / "stages" / "scrape" / "summary.json").read_text()))


def test_flickr_429_waits_for_retry_after_and_a_bad_key_is_a_reported_error(svc, workspace, monkeypatch):
    svc.requests.clear(), svc.times.clear()
    svc.flickr_throttle_once = True
    monkeypatch.setenv("FLICKR_API_KEY", FLICKR_KEY)
    src = SearchEngineSource(type="flickr", endpoint=f"{svc.base}/flickr", max_per_query=2, request_interval_s=0)
    got = list(sources.flickr(src, ClassSpec(name="Stegosaurus", queries=["x"]), dl()))
    assert len(got) == 2
    t = svc.times["/flickr/services/rest/"]  # getInfo, search (429, Retry-After: 1), search again
    assert t[2] - t[1] >= 0.95
    monkeypatch.setenv("FLICKR_API_KEY", "wrong-key")
    s = scrape.run(manifest([{"type": "flickr", "endpoint": f"{svc.base}/flickr", "request_interval_s": 0}]),
                   workspace, show_progress=False)
    assert len(s.source_errors) == 1 and "API error 100: Invalid API Key" in s.source_errors[0]
    assert any("licenses.getInfo failed" in w for w in s.warnings) and "wrong-key" not in json.dumps(s.warnings)


def test_flickr_filters_that_are_not_search_arguments_are_refused(monkeypatch):
    monkeypatch.setenv("FLICKR_API_KEY", FLICKR_KEY)
    with pytest.raises(sources.SourceError, match="bad filters: licence"):
        sources.check_engine(SearchEngineSource(type="flickr", filters={"licence": "4"}))


# ---------------------------------------------------------------- iNaturalist


def test_inaturalist_pages_by_id_past_the_10000_result_window(svc):
    svc.requests.clear()
    svc.inat_total = INAT_WINDOW + 250
    src = LicensedApiSource(type="inaturalist", endpoint=f"{svc.base}/inat/v1", request_interval_s=0, licenses=[])
    try:
        got = list(sources.inaturalist(src, ClassSpec(name="Stegosaurus", taxon_ids={"inaturalist": 85529}), dl()))
    finally:
        svc.inat_total = 450
    assert len(got) == INAT_WINDOW + 250 and len({c["url"] for c in got}) == len(got)
    reqs = svc.requests["/inat/v1/observations"]
    assert len(reqs) == 52 and all(int(q.get("page", 1)) == 1 and q["per_page"] == "200" for q in reqs)
    assert [int(q["id_above"]) for q in reqs[:3]] == [0, 200, 400]
    assert {q["order"] for q in reqs} == {"asc"} and reqs[0]["taxon_id"] == "85529"
    by_url = {c["url"]: c for c in got}
    seventh = by_url[f"{svc.base}/img/inat/photos/7/large.jpg"]
    assert seventh["license"] == "all-rights-reserved" and by_url[f"{svc.base}/img/inat/photos/8/large.jpg"]["license"] == "cc-by"


# ---------------------------------------------------------------- GBIF


def test_gbif_420_waits_for_retry_after_then_pages_by_offset(svc):
    src = LicensedApiSource(type="gbif", endpoint=f"{svc.base}/gbif/v1", request_interval_s=0)
    got = list(sources.gbif(src, ClassSpec(name="Stegosaurus", taxon_ids={"gbif": 2454}), dl()))
    reqs, t = svc.requests["/gbif/v1/occurrence/search"], svc.times["/gbif/v1/occurrence/search"]
    assert len(got) == 350 and [q["offset"] for q in reqs] == ["0", "0", "300"] and t[1] - t[0] >= 0.95
    assert sum(c["license"] is None for c in got) == 70  # a photo without its own licence stays unlicensed


# ---------------------------------------------------------------- Wikimedia


def test_wikimedia_continuation_merges_into_the_original_request_and_asks_for_a_standard_width(svc):
    svc.requests.clear()
    src = LicensedApiSource(type="wikimedia", endpoint=f"{svc.base}/w/api.php", request_interval_s=0)  # image_width 1024
    got = list(sources.wikimedia(src, SPEC, dl()))
    assert len(got) == 12 and len({c["url"] for c in got}) == 12  # 2 queries x 6 files, each once
    reqs = svc.requests["/w/api.php"]
    assert len(reqs) == 8  # per query: batch 1, its iicontinue, batch 2, its iicontinue
    assert [(q.get("gsroffset"), "iicontinue" in q) for q in reqs[:4]] == [(None, False), (None, True), ("3", False), ("3", True)]
    assert {q["iiurlwidth"] for q in reqs} == {"960"} and all("/960px-" in c["url"] for c in got)
    assert got[0]["license"] == "CC BY-SA 4.0" and got[0]["author"].startswith("A")


@pytest.mark.parametrize("asked,width", [(1024, 960), (1280, 1280), (2000, 1920), (10, 20), (960, 960)])
def test_wikimedia_thumbnail_widths_are_standard_steps(asked, width):
    assert sources.wikimedia_thumb_width(asked) == width


def test_upload_wikimedia_concurrency_is_capped_at_two_and_the_manifest_may_only_lower_it(svc):
    def limits(host_concurrency):
        st = ScrapeSettings(per_host_concurrency=8, host_concurrency=host_concurrency)
        return Downloader.from_settings(st, ImageSettings(), enforced=sources.ENFORCED_HOST_LIMITS).host_limits
    assert ScrapeSettings().host_concurrency == {"upload.wikimedia.org": 2}
    assert limits({"upload.wikimedia.org": 6})["upload.wikimedia.org"] == 2
    assert limits({"upload.wikimedia.org": 1})["upload.wikimedia.org"] == 1
    assert limits({})["upload.wikimedia.org"] == 2
    # the cap holds on the wire: 8 threads, 8 URLs on one capped host, never more than 2 at once
    d = Downloader(per_host_concurrency=8, host_limits={"127.0.0.1": 2}, allow_private=True)
    threads = [threading.Thread(target=d.fetch, args=(f"{svc.base}/slow/{i}.jpg",)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert svc.max_inflight == 2


# ---------------------------------------------------------------- search engines (icrawler's parsers on saved pages)


def test_google_legacy_page_parses_with_the_manifest_user_agent(svc):
    svc.google_page = "google_isch_legacy.html"
    src = SearchEngineSource(type="google", endpoint=f"{svc.base}/google", max_per_query=3)
    got = list(sources.search_engine(src, ClassSpec(name="Stegosaurus", queries=["Stegosaurus"]), user_agent="jc-test/1.0"))
    assert [c["url"].rsplit("/", 1)[1] for c in got] == ["google-1.jpg", "google-2.png", "google-3.jpg"]
    assert svc.agents["/google/search"] == {"jc-test/1.0"}  # not icrawler's built-in browser string


def test_google_page_the_parser_cannot_read_is_a_warning_in_the_summary(svc, workspace):
    svc.google_page = "google_isch_basic.html"
    try:
        s = scrape.run(manifest([{"type": "google", "endpoint": f"{svc.base}/google", "max_per_query": 5}]),
                       workspace, show_progress=False)
    finally:
        svc.google_page = "google_isch_legacy.html"
    assert s.requested == 0 and s.warnings == [
        "google for Stegosaurus: no candidates for any query (its result pages could not be fetched, or changed "
        "beyond what icrawler's parser reads)"]
    assert "1 warning(s): google for Stegosaurus" in s.line()
    assert s.classes[0]["exhausted"] is True and s.exhausted == ["Stegosaurus"]


def test_baidu_acjson_page_decodes_obfuscated_urls(svc):
    src = SearchEngineSource(type="baidu", endpoint=f"{svc.base}/baidu", max_per_query=3)
    got = list(sources.search_engine(src, ClassSpec(name="Stegosaurus", queries=["Stegosaurus"]), user_agent="jc-test/1.0"))
    assert [c["url"] for c in got] == [f"{svc.base}/img/baidu-1.jpg", f"{svc.base}/img/baidu-2.png",
                                       f"{svc.base}/img/baidu-hover-3.jpg"]
    assert svc.agents["/baidu/search/acjson"] == {"jc-test/1.0"}
