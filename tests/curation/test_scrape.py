"""Scrape stage against a loopback fixture: a Bing-like engine, Wikimedia/iNaturalist/GBIF-shaped
APIs and an image host that also serves every bad case. The real icrawler feeder/parser run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter, defaultdict
from html import escape
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import polars as pl
import pytest

from curation import catalog, scrape
from curation.config import parse_manifest
from curation.download import Downloader
from curation.licenses import normalise_license, redistributable
from tests import support

BIG = 3_000_000  # served bodies; the tests cap downloads at 1 MB


class Fixture:
    def __init__(self):
        self.hits: Counter = Counter()
        self.times: dict[str, list[float]] = defaultdict(list)
        self.lock = threading.Lock()
        self.delay = 0.0  # seconds added to every /img/ response (the kill test slows the host down)
        self.agents: dict[str, set] = defaultdict(set)  # path -> User-Agent headers seen
        self.active = 0  # /img/ requests being answered now, and the most at once
        self.peak = 0
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def img_url(self, name: str) -> str:
        return f"{self.base}/img/{name}"

    def bing_results(self, q: str) -> list[tuple[str, str]]:
        """30 results per query: images of several extensions (and none), plus the bad cases."""
        slug = q.replace(" ", "_")
        out = []
        for i in range(26):
            ext = [".jpg", ".png", "", ".jpeg?w=640"][i % 4]
            out.append((self.img_url(f"{slug}-{i}{ext}"), f"{self.base}/page/{slug}/{i}"))
        out += [(f"{self.base}/bad/404-{slug}", None), (f"{self.base}/bad/html-{slug}.jpg", None),
                (f"{self.base}/bad/truncated-{slug}.jpg", None), (f"{self.base}/bad/bomb-{slug}.png", None)]
        # bad cases first, so a small target still meets them
        return out[26:] + out[:26]


def _image_for(name: str) -> tuple[bytes, str]:
    seed = zlib.crc32(name.encode())
    stem = name.split("?")[0]
    if stem.endswith(".png"):
        return support.png(seed), "image/png"
    return support.jpeg(seed), "image/jpeg"


def _handler(fx: Fixture):
    class H(support.QuietHandler):

        def json(self, obj):
            self.send(200, json.dumps(obj).encode(), "application/json")

        def do_GET(self):  # noqa: C901 - a router
            u = urlsplit(self.path)
            q = {k: v[0] for k, v in parse_qs(u.query).items()}
            with fx.lock:
                fx.hits[u.path] += 1
                fx.times[u.path].append(time.monotonic())
                fx.agents[u.path].add(self.headers.get("User-Agent"))
                n = fx.hits[u.path]
            p = u.path
            try:
                if p == "/bing/images/async":
                    first = int(q.get("first", 0))
                    rows = fx.bing_results(q["q"])[first:first + 20]
                    divs = "".join(
                        f'<div class="imgpt"><a class="iusc" m="{escape(json.dumps({"murl": m, "purl": pu, "t": "x"}))}" href="#">'
                        f"<img/></a></div>" for m, pu in rows
                    )
                    return self.send(200, f"<html><body>{divs}</body></html>".encode(), "text/html")
                if p == "/w/api.php":
                    return self.json(_wikimedia(fx, q))
                if p == "/inat/v1/observations":
                    return self.json(_inat(fx, q))
                if p == "/gbif/v1/occurrence/search":
                    return self.json(_gbif(fx, q))
                if p == "/changed/occurrence/search":  # an API that changed shape
                    return self.json([{"unexpected": True}])
                if p.startswith("/img/"):
                    with fx.lock:
                        fx.active += 1
                        fx.peak = max(fx.peak, fx.active)
                    try:
                        if fx.delay:
                            time.sleep(fx.delay)
                        body, ctype = _image_for(p[5:] + (f"?{u.query}" if u.query else ""))
                    finally:
                        with fx.lock:
                            fx.active -= 1
                    return self.send(200, body, ctype)
                if p.startswith("/bad/"):
                    kind = p[5:].split("-")[0]
                    if kind == "404":
                        return self.send(404, b"not found", "text/plain")
                    if kind == "flaky500":
                        return self.send(500, b"oops", "text/plain") if n == 1 else self.send(200, support.jpeg(900), "image/jpeg")
                    if kind == "429":
                        if n == 1:
                            return self.send(429, b"slow down", "text/plain", {"Retry-After": "1"})
                        return self.send(200, support.jpeg(901), "image/jpeg")
                    if kind == "slow":
                        time.sleep(2.5)
                        return self.send(200, support.jpeg(902), "image/jpeg")
                    if kind == "trickle":
                        self.send_response(200)
                        self.send_header("Content-Type", "image/jpeg")
                        self.send_header("Content-Length", "100000")
                        self.end_headers()
                        for _ in range(20):
                            self.wfile.write(b"\xff" * 10)
                            self.wfile.flush()
                            time.sleep(0.2)
                        return None
                    if kind == "big":  # no Content-Length: only the streaming cap can stop it
                        self.send_response(200)
                        self.send_header("Content-Type", "image/jpeg")
                        self.send_header("Connection", "close")
                        self.end_headers()
                        self.close_connection = True
                        chunk = b"\xff\xd8\xff" + b"\x00" * 65533
                        for _ in range(BIG // len(chunk)):
                            self.wfile.write(chunk)
                        return None
                    if kind == "bigdeclared":
                        return self.send(200, b"\xff\xd8\xff" + b"\x00" * BIG, "image/jpeg")
                    if kind == "html":
                        return self.send(200, support.HTML, "image/jpeg")
                    if kind == "truncated":
                        return self.send(200, support.truncated_jpeg(), "image/jpeg")
                    if kind == "bomb":
                        return self.send(200, support.bomb_png(), "image/png")
                    if kind == "tofile":
                        self.send_response(302)
                        self.send_header("Location", "file:///etc/passwd")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return None
                    if kind == "loop":
                        self.send_response(302)
                        self.send_header("Location", p)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return None
                return self.send(404, b"no route", "text/plain")
            except (BrokenPipeError, ConnectionResetError):
                return None

    return H


def _wikimedia(fx: Fixture, q: dict) -> dict:
    """Recorded shape of action=query&generator=search&prop=imageinfo&formatversion=2, 2 pages of 3."""
    assert q["generator"] == "search" and "extmetadata" in q["iiprop"] and q["maxlag"]
    term = q["gsrsearch"].replace(" filetype:bitmap", "").replace(" ", "_")
    off = int(q.get("gsroffset", 0))
    lic = [("CC BY-SA 4.0", "https://creativecommons.org/licenses/by-sa/4.0"), ("Public domain", None),
           ("CC BY 2.0", "https://creativecommons.org/licenses/by/2.0")]
    pages = []
    for i in range(off, min(off + 3, 6)):
        name = f"wm_{term}_{i}.jpg"
        meta = {"LicenseShortName": {"value": lic[i % 3][0], "source": "commons-desc-page"},
                "Artist": {"value": f'<a href="//commons.wikimedia.org/wiki/User:A{i}" title="User:A{i}">Artist &amp; {i}</a>'}}
        if lic[i % 3][1]:
            meta["LicenseUrl"] = {"value": lic[i % 3][1]}
        pages.append({"pageid": 1000 + i, "ns": 6, "title": f"File:{name}", "index": i - off + 1,
                      "imagerepository": "local",
                      "imageinfo": [{"url": fx.img_url(name + "?orig"), "thumburl": fx.img_url(name),
                                     "descriptionurl": f"https://commons.wikimedia.org/wiki/File:{name}",
                                     "mime": "image/jpeg", "extmetadata": meta}]})
    out = {"batchcomplete": True, "query": {"pages": pages}}
    if off + 3 < 6:
        out["continue"] = {"gsroffset": off + 3, "continue": "gsroffset||"}
    return out


def _inat(fx: Fixture, q: dict) -> dict:
    """API v1 /observations in id order from id_above (tests/curation/test_sources.py has the 10,000 window)."""
    assert q["quality_grade"] == "research" and q["photos"] == "true" and q["order_by"] == "id"
    per, above = int(q["per_page"]), int(q.get("id_above", 0))
    ids = [i for i in range(4) if 500 + i > above][:per]
    results = []
    for i in ids:
        results.append({
            "id": 500 + i, "uri": f"https://www.inaturalist.org/observations/{500 + i}", "quality_grade": "research",
            "user": {"login": f"obs{i}", "name": f"Observer {i}"},
            "photos": [{"id": 9000 + i, "license_code": "cc-by-nc" if i == 0 else "cc-by",
                        "attribution": f"(c) Observer {i}, some rights reserved (CC BY)",
                        "url": fx.img_url(f"photos/{9000 + i}/square.jpg")}],
        })
    return {"total_results": len([i for i in range(4) if 500 + i > above]), "page": 1, "per_page": per, "results": results}


def _gbif(fx: Fixture, q: dict) -> dict:
    assert q["mediaType"] == "StillImage"
    off = int(q.get("offset", 0))
    results = [
        {"key": 77, "license": "http://creativecommons.org/licenses/by/4.0/legalcode", "recordedBy": "R",
         "media": [{"type": "StillImage", "identifier": fx.img_url("gbif-77.jpg"), "references": "https://x.org/77",
                    "license": "http://creativecommons.org/publicdomain/zero/1.0/", "creator": "Creator 77"}]},
        {"key": 78, "license": "CC_BY_NC_4_0",
         "media": [{"type": "StillImage", "identifier": fx.img_url("gbif-78.jpg"), "rightsHolder": "Museum",
                    "license": "All rights reserved"}]},
        # GBIF's schema: a media item's licence may be absent (null); the record's licence is the data's.
        {"key": 79, "license": "http://creativecommons.org/publicdomain/zero/1.0/legalcode",
         "media": [{"type": "StillImage", "identifier": fx.img_url("gbif-79.jpg"), "license": None, "creator": None}]},
    ] if off == 0 else []
    return {"offset": off, "limit": 300, "endOfRecords": True, "count": 3, "results": results}


@pytest.fixture(scope="module")
def fx():
    f = Fixture()
    srv = support.LoopbackServer(_handler(f))
    f.port = srv.port
    yield f
    srv.close()


FAST = {"timeout_s": 1.0, "retries": 1, "backoff_s": 0.05, "max_backoff_s": 3, "concurrency": 8,
        "per_host_concurrency": 8, "commit_every": 5, "allow_private_networks": True}


def make_manifest(sources: list, *, target: int = 6, classes=("Stegosaurus", "Triceratops"), scrape_kw=None, **extra):
    data = {
        "name": "t",
        "classes": [{"name": c, "queries": [f"{c} fossil", f"{c} art"]} for c in classes],
        "sources": sources,
        "images": {"max_bytes": 1_000_000},
        "scrape": {**FAST, "target_per_class": target, **(scrape_kw or {})},
        **extra,
    }
    return parse_manifest(data)


def bing(fx, **kw):
    return {"type": "bing", "endpoint": f"{fx.base}/bing", "max_per_query": 30, **kw}


# ---------------------------------------------------------------- licences


@pytest.mark.parametrize("text,code,redis", [
    ("CC BY-SA 4.0", "cc-by-sa", True), ("http://creativecommons.org/licenses/by-nc/4.0/legalcode", "cc-by-nc", True),
    ("CC0_1_0", "cc0", True), ("https://creativecommons.org/publicdomain/zero/1.0/", "cc0", True),
    ("Public domain", "pd", True), ("cc-by-nc-nd", "cc-by-nc-nd", True), ("GFDL", "gfdl", True),
    ("Attribution-NonCommercial-ShareAlike License", "cc-by-nc-sa", True),
    ("(c) Jane, some rights reserved (CC BY-NC)", "cc-by-nc", True),
    ("(c) Jane, all rights reserved", "all-rights-reserved", False), ("", "unknown", False), (None, "unknown", False),
    ("by the way", "unknown", False),
])
def test_license_normalisation(text, code, redis):
    assert normalise_license(text) == code
    assert redistributable(code) is redis


# ---------------------------------------------------------------- downloader


def test_downloader_failures_are_values(fx):
    b = fx.base
    r = Downloader().fetch(f"{b}/img/private.jpg")  # by default, loopback/private/link-local hosts are refused
    assert r.reason == "private_address" and fx.hits["/img/private.jpg"] == 0
    dl = Downloader(timeout_s=1.0, max_bytes=1_000_000, retries=2, backoff_s=0.05, max_backoff_s=3, max_redirects=3,
                    allow_private=True)
    r = dl.fetch(f"{b}/bad/404-dl")
    assert (r.ok, r.reason, r.transient, r.attempts) == (False, "http_404", False, 1)
    r = dl.fetch(f"{b}/bad/flaky500-dl")
    assert r.ok and r.attempts == 2 and fx.hits["/bad/flaky500-dl"] == 2
    r = dl.fetch(f"{b}/bad/429-dl")
    t = fx.times["/bad/429-dl"]
    assert r.ok and r.attempts == 2 and t[1] - t[0] >= 0.95  # Retry-After: 1 honoured
    assert dl.fetch(f"{b}/bad/big-dl").reason == "too_large"
    assert dl.fetch(f"{b}/bad/bigdeclared-dl").reason == "too_large"
    r = dl.fetch(f"{b}/bad/loop-dl")
    assert r.reason == "too_many_redirects" and fx.hits["/bad/loop-dl"] <= 5
    assert dl.fetch("ftp://127.0.0.1/x.jpg").reason == "bad_scheme"
    assert dl.fetch("file:///etc/passwd").reason == "bad_scheme"
    assert dl.fetch(f"{b}/bad/tofile-dl").reason == "bad_scheme"  # checked on every redirect hop too
    quick = Downloader(timeout_s=1.0, retries=0, allow_private=True)
    t0 = time.monotonic()
    assert quick.fetch(f"{b}/bad/slow-dl").reason == "timeout"
    r = quick.fetch(f"{b}/bad/trickle-dl")  # bytes keep coming, but not within the deadline
    assert r.reason == "timeout" and r.transient
    assert time.monotonic() - t0 < 4.0
    r = dl.fetch(f"{b}/bad/html-dl.jpg")  # the downloader does not judge content; normalise does
    assert r.ok and r.content_type == "image/jpeg"


# ---------------------------------------------------------------- search engine (icrawler)


def test_bing_scrape_end_to_end_and_rerun_downloads_nothing(fx, workspace, monkeypatch):
    import logging

    configured = []
    monkeypatch.setattr(logging, "basicConfig", lambda *a, **k: configured.append(k))
    # "Never requested twice" is about settled URLs: a generous per-attempt timeout keeps a loaded
    # machine's slow answer from becoming a (legitimate) retry.
    patient = {"timeout_s": 20.0}
    m = make_manifest([bing(fx)], target=12, scrape_kw=patient)
    s = scrape.run(m, workspace, show_progress=False)
    assert configured == []  # icrawler's Crawler would call logging.basicConfig on the host program
    assert fx.agents["/bing/images/async"] == {m.scrape.user_agent}  # result pages too, not icrawler's browser string

    df = catalog.read(workspace)
    ok = df.filter(pl.col("status") == "candidate")
    assert ok.group_by("label").len().sort("label")["len"].to_list() == [12, 12]
    assert [c["after"] for c in s.classes] == [12, 12] and all(c["short"] == 0 for c in s.classes)
    # provenance on every row
    for col in ("source", "query", "source_url", "page_url", "license", "retrieved_at", "path"):
        assert ok[col].null_count() == 0, col
    assert set(ok["source"]) == {"bing"} and set(ok["license"]) == {"unknown"}
    assert not ok["redistributable"].any()
    assert set(ok["query"]) <= {"Stegosaurus fossil", "Triceratops fossil", "Stegosaurus art", "Triceratops art"}
    # not only .jpg URLs: png and extension-less ones too
    urls = ok["source_url"].to_list()
    assert any(u.endswith(".png") for u in urls) and any(u.rsplit("/", 1)[1].count(".") == 0 for u in urls)
    # bad cases: rejected rows for bytes that are not usable images, failures only in the summary
    rej = df.filter(pl.col("status") == "rejected")
    assert set(rej["reason"]) == {"not_an_image", "truncated", "decompression_bomb"}
    rows = {r["label"]: r for r in s.sources}
    assert rows["Stegosaurus"]["failed"] == 1 and "http_404:1" in rows["Stegosaurus"]["reasons"]
    assert rows["Stegosaurus"]["requested"] == 16 and rows["Stegosaurus"]["downloaded"] == 12
    saved = json.loads((workspace.root / "stages" / "scrape" / "summary.json").read_text())
    assert saved["classes"][0]["after"] == 12
    assert all((workspace.root / p).exists() for p in ok["path"])

    # a re-run with the same target fetches nothing at all
    hits = sum(fx.hits.values())
    s2 = scrape.run(m, workspace, show_progress=False)
    assert s2.requested == 0 and sum(fx.hits.values()) == hits and catalog.read(workspace).height == df.height
    # a higher target fetches only new URLs: no image path is ever requested twice
    m3 = make_manifest([bing(fx)], target=20, scrape_kw=patient)
    s3 = scrape.run(m3, workspace, show_progress=False)
    assert [c["after"] for c in s3.classes] == [20, 20]
    assert s3.skipped_known == 2 * 16 and s3.requested == 16  # the 404 is settled, never asked again
    assert max(v for k, v in fx.hits.items() if k.startswith("/img/")) == 1
    assert fx.hits["/bad/404-Stegosaurus_fossil"] == 1


# ---------------------------------------------------------------- licence-aware APIs and URL lists


def test_licensed_apis_record_licence_author_and_page(fx, workspace):
    srcs = [
        {"type": "wikimedia", "endpoint": f"{fx.base}/w/api.php", "request_interval_s": 0},
        {"type": "inaturalist", "endpoint": f"{fx.base}/inat/v1", "request_interval_s": 0, "licenses": []},
        {"type": "gbif", "endpoint": f"{fx.base}/gbif/v1", "request_interval_s": 0, "licenses": []},
    ]
    m = make_manifest(srcs, target=100, classes=("Stegosaurus",))
    m.classes[0].taxon_ids = {"inaturalist": 123}
    s = scrape.run(m, workspace, show_progress=False)
    df = catalog.read(workspace).filter(pl.col("status") == "candidate")
    by = {src: df.filter(pl.col("source") == src) for src in ("wikimedia", "inaturalist", "gbif")}
    assert by["wikimedia"].height == 12  # 2 queries x 2 API pages x 3 files
    w = by["wikimedia"].sort("source_url").row(0, named=True)
    assert w["page_url"].startswith("https://commons.wikimedia.org/wiki/File:wm_")
    assert w["author"].startswith("Artist & ") and "<" not in w["author"]
    assert set(by["wikimedia"]["license"]) == {"cc-by-sa", "pd", "cc-by"} and by["wikimedia"]["redistributable"].all()
    assert "/orig" not in w["source_url"] and "?orig" not in w["source_url"]  # the resized copy was asked for
    i = by["inaturalist"].sort("source_url")
    assert i.height == 4 and all("/large.jpg" in u for u in i["source_url"])
    assert set(i["license"]) == {"cc-by", "cc-by-nc"} and i["page_url"][0].startswith("https://www.inaturalist.org/observations/")
    assert set(i["author"]) == {f"Observer {k}" for k in range(4)} and set(i["query"]) == {"taxon:123"}
    g = {r["source_url"].rsplit("/", 1)[1]: r for r in by["gbif"].iter_rows(named=True)}
    assert (g["gbif-77.jpg"]["license"], g["gbif-77.jpg"]["author"], g["gbif-77.jpg"]["redistributable"]) == ("cc0", "Creator 77", True)
    assert (g["gbif-78.jpg"]["license"], g["gbif-78.jpg"]["redistributable"]) == ("all-rights-reserved", False)
    assert g["gbif-78.jpg"]["license_raw"] == "All rights reserved"
    # no licence on the photo: unknown (never the record's CC0), the record's kept aside
    assert (g["gbif-79.jpg"]["license"], g["gbif-79.jpg"]["redistributable"]) == ("unknown", False)
    assert "occurrence record: http://creativecommons.org/publicdomain/zero" in g["gbif-79.jpg"]["license_raw"]
    assert s.classes[0]["short"] == 100 - 19

    # the default licence filter skips what cannot be redistributed, without fetching it
    ws2 = catalog.Workspace(workspace.root.parent / "ws2")
    hits = fx.hits["/img/gbif-78.jpg"]
    m2 = make_manifest([{"type": "gbif", "endpoint": f"{fx.base}/gbif/v1", "request_interval_s": 0}],
                       target=10, classes=("Stegosaurus",))
    s2 = scrape.run(m2, ws2, show_progress=False)
    assert fx.hits["/img/gbif-78.jpg"] == hits and "license_excluded:2" in s2.sources[0]["reasons"]


def test_url_list_source(fx, workspace, tmp_path):
    csv = tmp_path / "urls.csv"
    lines = ["url,label,license,author"]
    lines += [f"{fx.img_url(f'list-{i}.jpg')},Stegosaurus,CC BY 4.0,Ann" for i in range(3)]
    lines += [f"{fx.img_url('list-9.png')},Triceratops,,", f"{fx.img_url('list-8.jpg')},Unicorn,cc0,",
              "ftp://127.0.0.1/x.jpg,Triceratops,,", f"{fx.base}/bad/slow-list,Triceratops,,"]
    csv.write_text("\n".join(lines) + "\n")
    m = make_manifest([{"type": "urls", "path": str(csv), "license": "cc0"}], target=10)
    s = scrape.run(m, workspace, show_progress=False)
    df = catalog.read(workspace)
    assert df.height == 4 and set(df["label"]) == {"Stegosaurus", "Triceratops"}  # Unicorn is not a class
    st = df.filter(pl.col("label") == "Stegosaurus")
    assert set(st["license"]) == {"cc-by"} and set(st["author"]) == {"Ann"} and set(st["source"]) == {"urls"}
    assert df.filter(pl.col("label") == "Triceratops")["license"].to_list() == ["cc0"]  # the source's default
    assert next(r for r in s.sources if r["label"] == "Unicorn")["reasons"] == "class_not_in_manifest:1"
    tri = next(r for r in s.sources if r["label"] == "Triceratops")
    assert tri["failed"] == 2 and "bad_scheme:1" in tri["reasons"] and "timeout:1" in tri["reasons"]
    # both classes ran out of URLs, but a timeout may succeed next time: only Stegosaurus is exhausted
    assert [(c["label"], c["exhausted"]) for c in s.classes] == [("Stegosaurus", True), ("Triceratops", False)]
    # the timeout is transient: a re-run tries it again; the bad scheme is settled
    slow_hits = fx.hits["/bad/slow-list"]
    s2 = scrape.run(m, workspace, show_progress=False)
    assert s2.requested == 1 and fx.hits["/bad/slow-list"] > slow_hits
    # without the journal, the catalog's sightings still keep stored images from being fetched again
    (workspace.root / "stages" / "scrape" / "journal.jsonl").unlink()
    img_hits = {k: v for k, v in fx.hits.items() if k.startswith("/img/list-")}
    s3 = scrape.run(m, workspace, show_progress=False)
    assert s3.skipped_known == 4 and {k: v for k, v in fx.hits.items() if k.startswith("/img/list-")} == img_hits


def test_a_broken_source_is_reported_and_the_others_go_on(fx, workspace):
    srcs = [{"type": "gbif", "endpoint": f"{fx.base}/changed", "request_interval_s": 0},
            {"type": "inaturalist", "endpoint": f"{fx.base}/gone", "request_interval_s": 0},
            {"type": "gbif", "endpoint": f"{fx.base}/gbif/v1", "request_interval_s": 0, "licenses": []}]
    s = scrape.run(make_manifest(srcs, target=5, classes=("Stegosaurus",)), workspace, show_progress=False)
    assert len(s.source_errors) == 2 and "gbif for Stegosaurus" in s.source_errors[0]
    assert "API page failed (http_404" in s.source_errors[1]
    assert "2 source(s) broke" in s.line()
    assert s.downloaded == 3  # the working GBIF source's three photos
    assert s.classes[0]["short"] == 2 and not s.classes[0]["exhausted"]  # a broken source is not an empty one


def test_url_list_reads_parquet_with_optional_columns(tmp_path):
    from curation import sources
    from curation.config import UrlListSource

    path = tmp_path / "urls.parquet"
    pl.DataFrame({"url": ["http://h/a.jpg", None], "label": ["A", "B"], "page_url": ["http://h/a", None]}).write_parquet(path)
    df = sources.read_url_list(UrlListSource(path=path, license="cc-by"))
    assert df.columns == ["url", "label", "license", "author", "page_url", "query"]
    assert df.rows() == [("http://h/a.jpg", "A", "cc-by", None, "http://h/a", None)]  # null URLs dropped
    bad = tmp_path / "bad.csv"
    bad.write_text("link,class\nhttp://h/a.jpg,A\n")
    with pytest.raises(sources.SourceError, match="missing column"):
        sources.read_url_list(UrlListSource(path=bad))


def test_a_manifest_without_sources_is_an_error_not_a_silent_bing_scrape(workspace):
    m = parse_manifest({"name": "t", "classes": [{"name": "Stegosaurus"}]})
    assert scrape.has_web_sources(m)  # so that `run` reaches the stage, which says what is missing
    with pytest.raises(scrape.ScrapeError, match="lists no sources"):
        scrape.run(m, workspace, show_progress=False)
    assert catalog.read(workspace).is_empty()


def test_missing_flickr_key_and_url_list_are_clear_errors(tmp_path, workspace, monkeypatch):
    monkeypatch.delenv("FLICKR_API_KEY", raising=False)
    with pytest.raises(scrape.ScrapeError, match="FLICKR_API_KEY"):
        scrape.run(make_manifest([{"type": "flickr"}]), workspace, show_progress=False)
    with pytest.raises(scrape.ScrapeError, match="bad filters.*licence"):
        scrape.run(make_manifest([{"type": "bing", "filters": {"licence": "creativecommons"}}]), workspace, show_progress=False)
    with pytest.raises(scrape.ScrapeError, match="does not exist"):
        scrape.run(make_manifest([{"type": "urls", "path": str(tmp_path / "nope.csv")}]), workspace, show_progress=False)


# ---------------------------------------------------------------- kill and resume (CLI)


def test_kill_mid_scrape_then_resume_loses_nothing_and_fetches_nothing_twice(fx, tmp_path):
    n = 60
    csv = tmp_path / "urls.csv"
    csv.write_text("url,label\n" + "".join(f"{fx.img_url(f'kill-{i}.jpg')},{('Stegosaurus', 'Triceratops')[i % 2]}\n" for i in range(n)))
    mpath = tmp_path / "m.yaml"
    mpath.write_text(
        "name: t\nclasses: [{name: Stegosaurus}, {name: Triceratops}]\n"
        f"sources: [{{type: urls, path: {csv}}}]\n"
        "scrape: {target_per_class: 1000, concurrency: 2, per_host_concurrency: 2, commit_every: 1000, commit_interval_s: 600,"
        " allow_private_networks: true}\n"
    )
    ws = tmp_path / "ws"
    exe = Path(sys.executable).parent / "jurassiclass"
    journal = ws / "stages" / "scrape" / "journal.jsonl"
    fx.delay = 0.1
    try:
        proc = subprocess.Popen([str(exe), "scrape", "-m", str(mpath), "-w", str(ws), "-q"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if journal.exists() and journal.read_text().count("\n") >= 15:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        fx.delay = 0.0
    done_before = journal.read_text().count("\n")
    assert 15 <= done_before < n, "the kill must land mid-scrape"
    stored = {p.name.split(".")[0] for p in (ws / "store").rglob("*.jpg")}
    assert catalog.version(catalog.Workspace(ws)) is None  # nothing was committed yet: recovery must come from the journal

    out = subprocess.run([str(exe), "scrape", "-m", str(mpath), "-w", str(ws), "-q"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "recovered" in out.stdout and "per class and source" in out.stdout
    df = catalog.read(catalog.Workspace(ws))
    assert df.height == n and df["image_id"].n_unique() == n and set(df["status"]) == {"candidate"}
    assert stored <= set(df["image_id"])  # everything stored before the kill is in the catalog
    hits = [fx.hits[f"/img/kill-{i}.jpg"] for i in range(n)]
    # at most the requests in flight at the kill (concurrency 2) are repeated
    assert sum(hits) <= n + 2 and max(hits) <= 2
    assert catalog.read_sightings(catalog.Workspace(ws)).height == n


def test_ctrl_c_stops_promptly_and_commits_what_finished(fx, tmp_path):
    csv = tmp_path / "urls.csv"
    csv.write_text("url,label\n" + "".join(f"{fx.img_url(f'intr-{i}.jpg')},Stegosaurus\n" for i in range(40)))
    mpath = tmp_path / "m.yaml"
    mpath.write_text(
        "name: t\nclasses: [{name: Stegosaurus}]\n"
        f"sources: [{{type: urls, path: {csv}}}]\n"
        "scrape: {concurrency: 2, per_host_concurrency: 2, commit_every: 1000, commit_interval_s: 600,"
        " allow_private_networks: true}\n"
    )
    ws = tmp_path / "ws"
    journal = ws / "stages" / "scrape" / "journal.jsonl"
    fx.delay = 0.3
    try:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "jurassiclass"), "scrape", "-m", str(mpath),
                                 "-w", str(ws), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (journal.exists() and journal.read_text().count("\n") >= 4):
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        proc.wait(20)
        stopped_in = time.monotonic() - t0
    finally:
        fx.delay = 0.0
    assert proc.returncode != 0 and stopped_in < 3.0
    journaled = {json.loads(line)["url"] for line in journal.read_text().splitlines() if line.strip()}
    df = catalog.read(catalog.Workspace(ws))
    # committed on the way out; at most the 2 downloads in flight at the signal are journaled but not
    # yet cataloged (the next run recovers those from the journal)
    assert 2 <= df.height < 40 and set(df["source_url"]) <= journaled and len(journaled) - df.height <= 2


# ---------------------------------------------------------------- targets, exhaustion and recovery (what `run` relies on)


def _url_list(tmp_path, fx, stem: str, n: int):
    csv = tmp_path / f"{stem}.csv"
    csv.write_text("url,label\n" + "".join(f"{fx.img_url(f'{stem}-{i}.jpg')},Stegosaurus\n" for i in range(n)))
    return {"type": "urls", "path": str(csv)}


def test_targets_count_images_dedup_and_clip_kept_and_exhaustion_is_reported(fx, workspace, tmp_path):
    m = make_manifest([_url_list(tmp_path, fx, "top", 6)], target=4, classes=("Stegosaurus",))
    s = scrape.run(m, workspace, show_progress=False)
    assert (s.classes[0]["after"], s.classes[0]["exhausted"], s.exhausted) == (4, False, [])

    def reject(n: int, reason: str) -> None:
        df = catalog.read(workspace)
        ids = df.filter(pl.col("status") == "candidate")["image_id"].head(n)
        upd = pl.DataFrame({"image_id": ids, "status": ["rejected"] * n, "reason": [reason] * n})
        catalog.write(workspace, catalog.update(df, upd))

    reject(2, "duplicate")  # dedup and CLIP reject rows; they no longer count toward the target
    assert scrape.shortfall(m, workspace) == {"Stegosaurus": 2} and scrape.live_counts(workspace)["Stegosaurus"] == 2
    s2 = scrape.run(m, workspace, show_progress=False)
    assert (s2.classes[0]["before"], s2.classes[0]["after"], s2.requested) == (2, 4, 2)
    reject(1, "off_topic")
    s3 = scrape.run(m, workspace, show_progress=False)  # nothing left to try: short, and says so
    assert (s3.classes[0]["after"], s3.classes[0]["short"], s3.classes[0]["exhausted"]) == (3, 1, True)
    assert s3.exhausted == ["Stegosaurus"] and s3.classes_frame()["exhausted"].to_list() == [True]
    assert json.loads((workspace.root / "stages" / "scrape" / "summary.json").read_text())["classes"][0]["exhausted"]


def test_recovery_trusts_the_catalog_not_the_sightings(fx, workspace, tmp_path):
    m = make_manifest([_url_list(tmp_path, fx, "rec", 5)], target=10, classes=("Stegosaurus",))
    scrape.run(m, workspace, show_progress=False)
    hits = {k: v for k, v in fx.hits.items() if k.startswith("/img/rec-")}
    assert len(hits) == 5 and catalog.read_sightings(workspace).height == 5
    # the catalog's commit is lost after its sightings were written: the journal still has every row
    shutil.rmtree(workspace.table_path)
    s = scrape.run(m, workspace, show_progress=False)
    df = catalog.read(workspace)
    assert s.recovered == 5 and df.height == 5 and s.requested == 0
    assert {k: v for k, v in fx.hits.items() if k.startswith("/img/rec-")} == hits  # nothing fetched again
    assert catalog.read_sightings(workspace).height == 5  # no duplicate sightings either
    # journal and catalog both gone: a sighting alone does not settle a URL whose image the catalog lacks
    shutil.rmtree(workspace.table_path)
    (workspace.root / "stages" / "scrape" / "journal.jsonl").unlink()
    s2 = scrape.run(m, workspace, show_progress=False)
    assert s2.requested == 5 and catalog.read(workspace).height == 5


# ---------------------------------------------------------------- fetch workers and the committer thread


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (Linux /proc), without the multiprocessing resource tracker."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and b"resource_tracker" not in cmd:
            out.append(int(stat.parent.name))
    return out


def test_dead_fetch_workers_are_recorded_failures_and_a_rerun_stores_the_images(fx, workspace, tmp_path):
    m = make_manifest([_url_list(tmp_path, fx, "oom", 6)], target=10, classes=("Stegosaurus",),
                      scrape_kw={"concurrency": 2, "per_host_concurrency": 2})
    stop = threading.Event()
    # only processes this run starts: the session's own children (mongod, servers) must live on
    others = set(_children(os.getpid()))

    def killer() -> None:  # the OOM killer, or a decoder segfault, on every fetch worker
        while not stop.is_set():
            for pid in set(_children(os.getpid())) - others:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            stop.wait(0.005)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    fx.delay = 0.2  # each image takes longer than the killer's sweep: no worker finishes one
    try:
        s = scrape.run(m, workspace, show_progress=False, workers=2)
    finally:
        fx.delay = 0.0
        stop.set()
        t.join()
    assert (s.requested, s.downloaded, s.failed) == (6, 0, 6)
    assert s.sources[0]["reasons"] == "validator_crashed:6" and not s.classes[0]["exhausted"]
    # transient: the next run fetches them again, and with live workers stores them
    s2 = scrape.run(m, workspace, show_progress=False, workers=2)
    assert (s2.requested, s2.downloaded) == (6, 6) and catalog.read(workspace).height == 6


def test_a_failed_catalog_commit_is_the_runs_error_and_the_journal_keeps_the_rows(fx, workspace, tmp_path):
    # Another stage left a column the scrape writes with an incompatible type: every commit fails.
    catalog.write(workspace, catalog.rows_frame([{"image_id": "0" * 64, "label": "Triceratops", "status": "candidate",
                                                  "source": 7}], {**catalog.SCHEMA, "source": pl.Int64}))
    m = make_manifest([_url_list(tmp_path, fx, "cfail", 200)], target=200, classes=("Stegosaurus",),
                      scrape_kw={"concurrency": 1, "per_host_concurrency": 1, "commit_every": 1})
    fx.delay = 0.05
    try:
        with pytest.raises(Exception) as err:
            scrape.run(m, workspace, show_progress=False)
    finally:
        fx.delay = 0.0
    assert "urls" in str(err.value)  # the value the table's column could not take
    fetched = sum(v for k, v in fx.hits.items() if k.startswith("/img/cfail-"))
    assert 1 <= fetched < 100  # the run stopped at the failure (a commit takes < 5 s), not after the last download
    journal = [json.loads(x) for x in (workspace.root / "stages" / "scrape" / "journal.jsonl").read_text().splitlines()]
    assert len(journal) == fetched and all(r["row"]["status"] == "candidate" for r in journal)
    assert catalog.read(workspace).height == 1  # nothing committed; the journal holds every row for recovery


# ---------------------------------------------------------------- durability without a fsync per image


def test_stored_files_are_synced_before_the_catalog_commit_that_refers_to_them(fx, workspace, tmp_path, monkeypatch):
    """Validation writes files without fsync; each commit makes its batch durable first (syncfs on
    Linux), so a power cut never leaves a catalog row whose file was lost."""
    from curation import store

    events: list[tuple[str, object]] = []
    real_fsync, real_syncfs, real_append = os.fsync, store._syncfs, catalog.append

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def syncfs(fd):
        events.append(("sync", None))
        return real_syncfs(fd)

    def append(ws, rows):
        events.append(("append", sorted(rows["path"].drop_nulls().to_list())))
        return real_append(ws, rows)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(store, "_syncfs", syncfs)
    monkeypatch.setattr(catalog, "append", append)
    m = make_manifest([_url_list(tmp_path, fx, "dur", 7)], target=7, classes=("Stegosaurus",),
                      scrape_kw={"commit_every": 3})
    s = scrape.run(m, workspace, show_progress=False, workers=0)  # in this process, where the calls are seen
    assert s.downloaded == 7
    store_root = str(workspace.store.root)
    assert not [p for kind, p in events if kind == "fsync" and p.startswith(store_root)]  # no fsync per image
    appends = [i for i, (kind, _) in enumerate(events) if kind == "append"]
    assert appends and sum(len(events[i][1]) for i in appends) == 7
    prev = -1
    for i in appends:  # every batch: a sync after the previous commit, before this one
        assert ("sync", None) in events[prev + 1:i], events
        prev = i
    assert all(workspace.store.intact(Path(p).stem, workspace.abspath(p)) for i in appends for p in events[i][1])


def test_recovery_skips_journal_rows_whose_file_a_power_cut_lost_and_fetches_them_again(fx, workspace, tmp_path):
    m = make_manifest([_url_list(tmp_path, fx, "lost", 5)], target=10, classes=("Stegosaurus",))
    scrape.run(m, workspace, show_progress=False)
    df = catalog.read(workspace).sort("source_url")
    assert df.height == 5
    # the power cut: the last commit never reached the disk, nor the unsynced files of two images
    shutil.rmtree(workspace.table_path)
    empty, gone = (workspace.abspath(p) for p in df["path"].head(2))
    empty.write_bytes(b"")
    gone.unlink()
    hits = {k: v for k, v in fx.hits.items() if k.startswith("/img/lost-")}
    s = scrape.run(m, workspace, show_progress=False)
    assert s.recovered == 3 and s.requested == 2 and s.downloaded == 2
    after = {k: v for k, v in fx.hits.items() if k.startswith("/img/lost-")}
    assert sum(after.values()) - sum(hits.values()) == 2  # only the two lost images fetched again
    df2 = catalog.read(workspace)
    assert df2.height == 5 and all(workspace.store.intact(i, workspace.abspath(p)) for i, p in df2.select("image_id", "path").iter_rows())


# ---------------------------------------------------------------- per-host limits across fetch processes


def test_host_caps_are_split_across_fetch_processes_never_exceeded_in_total():
    dls = [Downloader(per_host_concurrency=5, host_limits={"upload.wikimedia.org": 2}) for _ in range(2)]
    for i, dl in enumerate(dls):
        dl.share(i, 2)
    assert sum(d.per_host_concurrency for d in dls) == 5 and [d.host_limits["upload.wikimedia.org"] for d in dls] == [1, 1]
    with pytest.raises(ValueError, match="cannot be split 3 ways"):
        Downloader(per_host_concurrency=5, host_limits={"upload.wikimedia.org": 2}).share(0, 3)


def test_two_fetch_processes_keep_a_hosts_cap_in_total(fx, workspace, tmp_path):
    m = make_manifest([_url_list(tmp_path, fx, "cap", 16)], target=16, classes=("Stegosaurus",),
                      scrape_kw={"concurrency": 8, "host_concurrency": {"127.0.0.1": 3}})
    fx.delay, fx.peak = 0.1, 0
    try:
        s = scrape.run(m, workspace, show_progress=False, workers=2)
    finally:
        fx.delay = 0.0
    assert s.downloaded == 16
    assert 2 <= fx.peak <= 3  # both processes fetched at once (shares 2 + 1), never above the cap


def test_a_429_in_one_fetch_process_pauses_the_host_in_the_other(fx, workspace, tmp_path):
    csv = tmp_path / "pace.csv"
    csv.write_text("url,label\n" + f"{fx.base}/bad/429-pace,Stegosaurus\n"
                   + "".join(f"{fx.img_url(f'pace-{i}.jpg')},Stegosaurus\n" for i in range(30)))
    m = make_manifest([{"type": "urls", "path": str(csv)}], target=31, classes=("Stegosaurus",),
                      scrape_kw={"concurrency": 4, "per_host_concurrency": 4})
    fx.delay = 0.05
    try:
        s = scrape.run(m, workspace, show_progress=False, workers=2)
    finally:
        fx.delay = 0.0
    assert s.downloaded == 31
    t429 = fx.times["/bad/429-pace"][0]
    started = [t for k, ts in fx.times.items() if k.startswith("/img/pace-") for t in ts]
    # Retry-After: 1 paused the host for both processes (a request already on its way may land just after)
    assert not [t for t in started if t429 + 0.2 < t < t429 + 0.9], sorted(t - t429 for t in started)
