"""A URL and limits in, the response bytes or a failure reason out: a polite, bounded HTTP fetcher.

Thread-safe; call `fetch` from as many threads as you like. Per host it caps concurrent
requests (`per_host_concurrency`, lower for hosts named in `host_limits`) and, after a
429/420/503 (Retry-After honoured) or other transient failure, pauses that host for everyone. Bodies are streamed and cut off at `max_bytes`; each attempt has a
wall-clock deadline (a server trickling bytes cannot hold a thread forever). Only http and
https, a bounded number of redirects. What the bytes are is decided later by sniffing them
(`curation.images.normalise`), never from the URL or Content-Type.
"""

from __future__ import annotations

import email.utils
import ipaddress
import json
import random
import socket
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlencode, urljoin, urlsplit

import urllib3

# Failures a later attempt (a re-run) may fix; everything else is permanent for that URL.
TRANSIENT = {"cancelled", "timeout", "connection_error", "http_408", "http_420", "http_425", "http_429", "http_5xx"}
_RETRY_STATUS = {408, 420, 425, 429}
_PAUSE_STATUS = {420, 429, 503}  # the host asked us to slow down: pause the whole host


@dataclass(frozen=True)
class Fetched:
    """The outcome of one URL: ``data`` on success, else a short ``reason`` code and a detail."""

    url: str
    data: bytes | None = None
    reason: str | None = None
    detail: str = ""
    status: int | None = None
    attempts: int = 0
    content_type: str | None = None

    @property
    def ok(self) -> bool:
        return self.data is not None

    @property
    def transient(self) -> bool:
        return self.reason in TRANSIENT


class PauseBoard:
    """Host pauses shared by the processes of one scrape (shared memory, made before they start): a
    429 one process gets pauses the host for all of them. Hosts hash into a fixed number of slots;
    a collision only pauses another host as well. Times are time.monotonic(), one clock machine-wide
    on Linux."""

    SLOTS = 4096

    def __init__(self):
        import multiprocessing as mp

        # A spawn context's lock: it may go to forked and to spawned processes alike.
        self.until = mp.get_context("spawn").Array("d", self.SLOTS)

    def slot(self, host: str) -> int:
        return zlib.crc32(host.encode()) % self.SLOTS

    def pause_until(self, slot: int, t: float) -> None:
        with self.until.get_lock():
            self.until[slot] = max(self.until[slot], t)

    def not_before(self, slot: int) -> float:
        return self.until.get_obj()[slot]  # one aligned double: a read needs no lock


class _Host:
    def __init__(self, limit: int, board: PauseBoard | None = None, key: str = ""):
        self.slots = threading.BoundedSemaphore(limit)
        self.lock = threading.Lock()
        self.not_before = 0.0  # monotonic time before which no request may start
        self.board = board
        self.slot = board.slot(key) if board is not None else 0

    def pause(self, seconds: float) -> None:
        with self.lock:
            self.not_before = max(self.not_before, time.monotonic() + seconds)
            if self.board is not None:
                self.board.pause_until(self.slot, self.not_before)

    def wait(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self.lock:
                not_before = self.not_before
            if self.board is not None:
                not_before = max(not_before, self.board.not_before(self.slot))
            delay = not_before - time.monotonic()
            if delay <= 0:
                return
            stop.wait(min(delay, 1.0))


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds (it may be a number or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Downloader:
    """Fetches URLs politely with hard limits; see the module docstring."""

    def __init__(
        self,
        *,
        timeout_s: float = 20.0,
        max_bytes: int = 25_000_000,
        retries: int = 3,
        per_host_concurrency: int = 4,
        backoff_s: float = 1.0,
        max_backoff_s: float = 120.0,
        max_redirects: int = 5,
        user_agent: str = "jurassiclass",
        pool_size: int = 16,
        allow_private: bool = False,
        host_limits: dict[str, int] | None = None,
        pause_board: PauseBoard | None = None,
    ):
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.retries = retries
        self.per_host_concurrency = per_host_concurrency
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_redirects = max_redirects
        self.user_agent = user_agent
        self.pool_size = pool_size
        self._hosts: dict[str, _Host] = {}
        self._hosts_lock = threading.Lock()
        self._pm: urllib3.PoolManager | None = None
        self.allow_private = allow_private
        self._verdicts: dict[str, str | None] = {}
        self._stop = threading.Event()
        # host name -> concurrent requests, for hosts that publish a cap below per_host_concurrency
        self.host_limits = {h.lower(): max(1, int(n)) for h, n in (host_limits or {}).items()}
        self.pause_board = pause_board  # pauses shared with other processes' downloaders
        self.api_calls: Counter = Counter()  # host name -> JSON API requests made (get_json), for budgets

    def stop(self) -> None:
        """Make in-flight and later fetches return "cancelled" at their next wait (Ctrl-C, shutdown)."""
        self._stop.set()

    @property
    def min_cap(self) -> int:
        """The lowest per-host cap: how many processes may split every cap with at least one request each."""
        return min([self.per_host_concurrency, *self.host_limits.values()])

    def share(self, index: int, count: int) -> None:
        """Keep process ``index`` of ``count`` (count <= min_cap) to its share of every per-host cap:
        the shares of all ``count`` processes add up to the cap, never more."""
        if not 0 <= index < count <= self.min_cap:
            raise ValueError(f"share {index} of {count}: caps as low as {self.min_cap} cannot be split {count} ways")

        def part(cap: int) -> int:
            return cap // count + (1 if index < cap % count else 0)

        self.per_host_concurrency = part(self.per_host_concurrency)
        self.host_limits = {h: part(n) for h, n in self.host_limits.items()}

    @classmethod
    def from_settings(cls, scrape, images, enforced: dict[str, int] | None = None,
                      pause_board: PauseBoard | None = None) -> "Downloader":
        """From a manifest's ScrapeSettings and ImageSettings; ``enforced``: hosts' own caps, which the
        manifest may lower but not raise."""
        limits = dict(scrape.host_concurrency)
        for host, cap in (enforced or {}).items():
            limits[host] = min(cap, limits.get(host, cap))
        return cls(
            timeout_s=scrape.timeout_s, max_bytes=images.max_bytes, retries=scrape.retries,
            per_host_concurrency=scrape.per_host_concurrency, backoff_s=scrape.backoff_s,
            max_backoff_s=scrape.max_backoff_s, max_redirects=scrape.max_redirects,
            user_agent=scrape.user_agent, pool_size=max(scrape.concurrency, scrape.per_host_concurrency),
            allow_private=scrape.allow_private_networks, host_limits=limits, pause_board=pause_board,
        )

    @property
    def _pool(self) -> urllib3.PoolManager:
        # urllib3 directly (thread-safe, pooled): requests costs about twice the CPU per fetch.
        if self._pm is None:
            with self._hosts_lock:
                if self._pm is None:
                    self._pm = urllib3.PoolManager(
                        num_pools=max(10, self.pool_size), maxsize=self.pool_size, block=False,
                        headers={"User-Agent": self.user_agent, "Accept": "image/*,*/*;q=0.8",
                                 "Accept-Encoding": "gzip, deflate"},
                    )
        return self._pm

    def _host(self, netloc: str, hostname: str) -> _Host:
        with self._hosts_lock:
            h = self._hosts.get(netloc)
            if h is None:
                limit = min(self.per_host_concurrency, self.host_limits.get(hostname.lower(), self.per_host_concurrency))
                h = self._hosts[netloc] = _Host(limit, self.pause_board, netloc)
            return h

    def _backoff(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.backoff_s * (2 ** attempt))
        return base * random.uniform(0.5, 1.5)

    def fetch(self, url: str, *, params: dict | None = None, max_bytes: int | None = None,
              headers: dict | None = None) -> Fetched:
        """GET ``url``; never raises for network or server trouble."""
        try:
            parts = urlsplit(url)
            hostname = parts.hostname
        except ValueError as exc:  # e.g. a malformed IPv6 literal
            return Fetched(url, reason="bad_url", detail=str(exc)[:200])
        if parts.scheme not in ("http", "https"):
            return Fetched(url, reason="bad_scheme", detail=f"scheme {parts.scheme!r} is not http(s)")
        if not hostname:
            return Fetched(url, reason="bad_url", detail="no host")
        host = self._host(parts.netloc.lower(), hostname)
        limit = max_bytes or self.max_bytes
        last = Fetched(url, reason="connection_error")
        for attempt in range(self.retries + 1):
            host.wait(self._stop)
            with host.slots:
                host.wait(self._stop)  # another thread may have paused the host while we queued
                if self._stop.is_set():
                    return Fetched(url, reason="cancelled", attempts=attempt)
                last = self._attempt(url, params, limit, headers, attempt + 1)
            if last.ok or not last.transient:
                return last
            if attempt == self.retries:
                break
            delay = self._backoff(attempt)
            if last.status in _PAUSE_STATUS:
                asked = retry_after_seconds(last.detail) if last.detail else None
                delay = min(self.max_backoff_s, asked if asked is not None else delay)
                host.pause(delay)
            else:
                self._stop.wait(delay)
        return last

    def _refuse(self, host: str) -> str | None:
        """Why ``host`` may not be fetched (it resolves to a loopback/private/link-local address), else None.

        Scraped URLs are chosen by strangers: without this a result page could point the
        scraper at a cloud metadata endpoint or an internal service. Cached per host.
        """
        if self.allow_private:
            return None
        with self._hosts_lock:
            if host in self._verdicts:
                return self._verdicts[host]
        why = None
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except OSError:
            infos = []  # unresolvable: the connect itself will fail as a connection_error
        for info in infos:
            ip = ipaddress.ip_address(str(info[4][0]).split("%")[0])
            if not ip.is_global:
                why = f"{host} resolves to non-public address {ip}"
                break
        with self._hosts_lock:
            self._verdicts[host] = why
        return why

    def _attempt(self, url: str, params, limit: int, headers, attempt: int) -> Fetched:
        deadline = time.monotonic() + self.timeout_s
        orig = url
        if params:
            url = url + ("&" if "?" in url else "?") + urlencode(params)
        # Redirects are followed here, not by urllib3, so every hop gets the scheme and address checks.
        for hop in range(self.max_redirects + 2):
            if hop > self.max_redirects:
                return Fetched(orig, reason="too_many_redirects", detail=f"more than {self.max_redirects}", attempts=attempt)
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https"):
                return Fetched(orig, reason="bad_scheme", detail=f"redirect to {parts.scheme!r}", attempts=attempt)
            why = self._refuse(parts.hostname or "")
            if why:
                return Fetched(orig, reason="private_address", detail=why, attempts=attempt)
            try:
                resp = self._pool.request(
                    "GET", url, headers=headers and {**self._pool.headers, **headers}, preload_content=False,
                    redirect=False, retries=False, timeout=urllib3.Timeout(connect=self.timeout_s, read=self.timeout_s),
                )
            except urllib3.exceptions.LocationValueError as exc:
                return Fetched(orig, reason="bad_url", detail=str(exc)[:200], attempts=attempt)
            except urllib3.exceptions.TimeoutError as exc:
                return Fetched(orig, reason="timeout", detail=str(exc)[:200], attempts=attempt)
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                return Fetched(orig, reason="connection_error", detail=str(exc)[:200], attempts=attempt)
            location = resp.headers.get("Location") if resp.status in (301, 302, 303, 307, 308) else None
            if not location:
                break
            resp.close()  # never drain an unbounded redirect body
            url = urljoin(url, location)
        url = orig
        keep = False
        try:
            status = resp.status
            ctype = resp.headers.get("Content-Type")
            if status != 200:
                if status in _RETRY_STATUS or status >= 500:
                    reason = f"http_{status}" if status < 500 else "http_5xx"
                    # Retry-After travels in `detail` so fetch() can honour it.
                    detail = resp.headers.get("Retry-After", "") if status in _PAUSE_STATUS else str(status)
                    return Fetched(url, reason=reason, detail=detail, status=status, attempts=attempt)
                return Fetched(url, reason=f"http_{status}", status=status, attempts=attempt)
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limit:
                return Fetched(url, reason="too_large", detail=f"Content-Length {declared} > {limit}",
                               status=status, attempts=attempt)
            chunks: list[bytes] = []
            size = 0
            try:
                while True:
                    # read1 returns what one recv gives: a server trickling bytes still meets the
                    # deadline check, where read(n) would wait for n bytes.
                    chunk = resp.read1(65536)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > limit:
                        return Fetched(url, reason="too_large", detail=f"body exceeds {limit} bytes",
                                       status=status, attempts=attempt)
                    if time.monotonic() > deadline:
                        return Fetched(url, reason="timeout", detail=f"body not done in {self.timeout_s}s",
                                       status=status, attempts=attempt)
                    chunks.append(chunk)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                reason = "timeout" if "timed out" in str(exc).lower() else "connection_error"
                return Fetched(url, reason=reason, detail=str(exc)[:200], status=status, attempts=attempt)
            keep = True
            return Fetched(url, data=b"".join(chunks), status=status, attempts=attempt, content_type=ctype)
        finally:
            if keep:
                resp.release_conn()  # body fully read: the connection can be reused
            else:
                resp.close()  # unread body: never hand this connection to the next request

    def get_json(self, url: str, params: dict | None = None, *, max_bytes: int = 50_000_000) -> tuple[object | None, Fetched]:
        """(parsed JSON or None, the fetch outcome) for API pages."""
        res = self.fetch(url, params=params, max_bytes=max_bytes, headers={"Accept": "application/json"})
        with self._hosts_lock:  # every attempt counts against an API's budget, retries too
            self.api_calls[(urlsplit(url).hostname or "").lower()] += res.attempts
        if not res.ok:
            return None, res
        try:
            return json.loads(res.data), res
        except ValueError as exc:
            return None, Fetched(url, reason="bad_json", detail=str(exc)[:200], status=res.status, attempts=res.attempts)
