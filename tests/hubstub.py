"""A stub Hugging Face Hub on 127.0.0.1 for tests (stdlib only): the real `huggingface_hub` and
`datasets` clients push to it and read back from it. In: HTTP requests shaped like the Hub's API;
out: an in-memory git-like store (repos -> branches/tags -> commits -> {path: bytes}, LFS objects
by sha256) plus a log of every request (`HubStub.requests`). The `hub` fixture (bottom) starts one
and points both clients at it; `HubStub.fail_next` injects errors for retry tests.

Like the Hub: writes need `Authorization: Bearer <token>` (401 otherwise, and any wrong token is a 401
everywhere); a private repo read without the token is a 401 `RepoNotFound`; preupload answers "lfs"
for a file matching an LFS rule of the repo's .gitattributes (every new repo starts with the Hub's
initial commit holding one, *.parquet included), any file >= 10 MB, or one whose 512-byte sample is
binary; LFS files resolve with a 302 to a signed "CDN" URL on another origin (host `localhost`), so
the client drops the token there, and uploads go to a signed PUT URL that needs no token.

Served (`{type}` model|dataset|space; `{rev}` a branch, a tag or a commit sha, URL-quoted):
  GET  /api/whoami-v2                        POST /api/repos/create, /api/repos/delete
  POST /api/validate-yaml                    GET  /api/{type}s/{repo}[/revision/{rev}]
  GET  /api/{type}s/{repo}/tree/{rev}[/{path}]?recursive=&expand=
  POST /api/{type}s/{repo}/paths-info/{rev}  GET  /api/{type}s/{repo}/refs, /commits/{rev}
  POST /api/{type}s/{repo}/preupload/{rev}   POST /api/{type}s/{repo}/commit/{rev} (NDJSON)
  POST|DELETE /api/{type}s/{repo}/branch/{name}, POST /tag/{rev}, DELETE /tag/{name}
  PUT  /api/{type}s/{repo}/settings          POST /{prefix}{repo}.git/info/lfs/objects/batch|verify
  HEAD|GET /{prefix}{repo}/resolve/{rev}/{path} (Range)  PUT /_lfs/{sha256}  HEAD|GET /_cdn/{sha256}
Not served: pull requests (create_pr), Xet, multipart LFS, pagination, cardData in repo info.
"""
from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import re
import secrets
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files >= 10 MB in LFS whatever their type
LFS_PATTERNS = ["*.7z", "*.arrow", "*.bin", "*.bz2", "*.gz", "*.h5", "*.jpg", "*.jpeg", "*.npy", "*.npz",
                "*.onnx", "*.parquet", "*.pickle", "*.pkl", "*.png", "*.pt", "*.pth", "*.safetensors",
                "*.tar", "*.tflite", "*.webp", "*.zip", "*.zst"]
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _flag(value) -> bool:  # a boolean sent as a query or form value ("true", "True", "1") or JSON
    value = value[0] if isinstance(value, list) else value
    return str(value).lower() in ("1", "true")


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:  # what git stores for an LFS file
        return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                f"size {len(self.data)}\n").encode()

    @property
    def oid(self) -> str:  # the git blob id, of the pointer for LFS files, as the Hub reports it
        return git_blob_oid(self.pointer if self.lfs else self.data)


@dataclass
class Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    files: dict[str, Blob]
    changed: list[str]  # paths added, modified or deleted by this commit
    date: str
    author: str


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool = False
    created_at: str = field(default_factory=_now)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, rev: str) -> str | None:
        """Commit sha of a branch, a tag (also as refs/heads/.., refs/tags/..) or a (>= 7 char) sha."""
        for prefix, refs in (("refs/heads/", self.branches), ("refs/tags/", self.tags)):
            if rev.startswith(prefix) and rev[len(prefix):] in refs:
                return refs[rev[len(prefix):]]
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        if re.fullmatch(r"[0-9a-f]{7,40}", rev):
            hits = [sha for sha in self.commits if sha.startswith(rev)]
            return hits[0] if len(hits) == 1 else None
        return None

    def files(self, rev: str = "main") -> dict[str, bytes]:
        return {p: b.data for p, b in self.commits[self.resolve(rev)].files.items()}

    def history(self, rev: str = "main") -> list[Commit]:
        """Commits reachable from `rev`, newest first."""
        out, sha = [], self.resolve(rev)
        while sha is not None:
            out.append(self.commits[sha])
            sha = self.commits[sha].parent
        return out


@dataclass
class RecordedRequest:
    method: str
    path: str  # as sent, query string included
    headers: dict[str, str]  # names lower-cased
    status: int = 0


class HubError(Exception):
    """An error answer: `{"error": message, **body}` with the Hub's X-Error-Code/-Message headers."""

    def __init__(self, status: int, message: str, code: str | None = None, *, body: dict | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.body, self.headers = body or {}, headers or {}


class HubStub:
    """In-memory Hub. `start()` returns the base URL; writes need `Authorization: Bearer <token>`."""

    def __init__(self, token: str = "hf_stubtoken", *, username: str = "stub-user", lfs_verify: bool = True,
                 lfs_redirect: bool = True):
        self.token, self.username = token, username
        self.lfs_verify = lfs_verify  # ask the client to call the LFS verify action after each upload
        self.lfs_redirect = lfs_redirect  # resolve LFS files with a 302 to a CDN URL, as the Hub does
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[RecordedRequest] = []
        self.errors: list[str] = []  # tracebacks of requests the stub itself failed on (answered 500)
        self.lock = threading.RLock()
        self._faults: list[dict] = []
        self._secret = secrets.token_bytes(16)
        self._server: ThreadingHTTPServer | None = None
        self._conns: set[socket.socket] = set()
        self.base_url = ""

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> str:
        stub = self

        class Handler(_Handler):
            hub = stub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), name="hubstub", daemon=True).start()
        return self.base_url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            with self.lock:  # close idle keep-alive connections so no handler thread lingers
                for conn in list(self._conns):
                    try:
                        conn.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            self._server = None

    def __enter__(self) -> "HubStub":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- test helpers ----------------------------------------------------------------------
    def fail_next(self, n: int = 1, status: int = 503, *, path_contains: str | None = None,
                  method: str | None = None, headers: dict[str, str] | None = None) -> None:
        """Answer the next `n` matching requests with `status` (for retry tests). Note that the client
        retries 5xx/429 only on some calls (preupload, LFS batch/upload, downloads), not on /commit."""
        with self.lock:
            self._faults.append({"n": n, "status": status, "path": path_contains, "method": method,
                                 "headers": headers or {}})

    def clear_faults(self) -> None:
        """Drop every pending injected failure: the Hub is healthy again."""
        with self.lock:
            self._faults.clear()

    def repo(self, repo_id: str, repo_type: str = "dataset") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def create_repo(self, repo_id: str, repo_type: str = "dataset", private: bool = False) -> Repo:
        """Server-side seeding (no HTTP): a repo with the Hub's initial .gitattributes commit."""
        with self.lock:
            repo = self.repos[(repo_type, repo_id)] = Repo(repo_id, repo_type, private)
            self.commit(repo, "main", {".gitattributes": Blob(GITATTRIBUTES, False)}, [], "initial commit")
            return repo

    def commit(self, repo: Repo, branch: str, add: dict[str, Blob], delete: list[str], title: str,
               message: str = "", author: str | None = None) -> Commit:
        with self.lock:
            parent = repo.branches.get(branch)
            files = dict(repo.commits[parent].files) if parent else {}
            changed = []
            for path in delete:
                if path.endswith("/"):  # a folder
                    gone = [p for p in files if p.startswith(path)]
                else:
                    gone = [path] if path in files else []
                for p in gone:
                    del files[p]
                changed += gone
            for path, blob in add.items():
                if files.get(path) != blob:
                    changed.append(path)
                files[path] = blob
            sha = hashlib.sha1(f"{parent}{sorted((p, b.oid) for p, b in files.items())}{title}{time.time_ns()}"
                               .encode()).hexdigest()
            c = Commit(sha, parent, title, message, files, sorted(set(changed)), _now(), author or self.username)
            repo.commits[sha] = c
            repo.branches[branch] = sha
            return c

    # ---- internals used by the handler -----------------------------------------------------
    def sign(self, sha256: str) -> str:
        return hmac.new(self._secret, sha256.encode(), "sha256").hexdigest()[:32]

    def take_fault(self, method: str, path: str) -> dict | None:
        with self.lock:
            for f in self._faults:
                if f["n"] > 0 and (f["path"] is None or f["path"] in path) and f["method"] in (None, method):
                    f["n"] -= 1
                    return f
        return None


class _Handler(BaseHTTPRequestHandler):
    hub: HubStub
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer carries Content-Length
    timeout = 30

    def log_message(self, *args) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.hub.lock:
            self.hub._conns.add(self.connection)

    def finish(self) -> None:
        with self.hub.lock:
            self.hub._conns.discard(self.connection)
        super().finish()

    def do_GET(self): self._handle()
    def do_HEAD(self): self._handle()
    def do_POST(self): self._handle()
    def do_PUT(self): self._handle()
    def do_DELETE(self): self._handle()

    # ---- plumbing --------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json") -> None:
        self.record.status = status
        self.send_response(status)
        headers = {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _handle(self) -> None:
        hub = self.hub
        self.record = RecordedRequest(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
        with hub.lock:
            hub.requests.append(self.record)
        self.body = self._read_body()  # always drain the body: the connection is reused
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        auth = self.headers.get("Authorization", "")
        self.authorized = hmac.compare_digest(auth.encode(), f"Bearer {hub.token}".encode())
        fault = hub.take_fault(self.command, self.path)
        try:
            if fault is not None:
                raise HubError(fault["status"], f"injected failure {fault['status']}", headers=fault["headers"])
            if auth and not self.authorized and not url.path.startswith(("/_lfs/", "/_cdn/")):
                raise HubError(401, "Invalid credentials in Authorization header")
            self._route(url.path)
        except HubError as e:
            message = e.message.encode("ascii", "backslashreplace").decode()  # header values are latin-1
            headers = {"X-Error-Message": message, **({"X-Error-Code": e.code} if e.code else {}), **e.headers}
            self._json({"error": e.message, **e.body}, e.status, headers)
        except Exception:  # a bug in the stub (or a request it cannot parse): say so, loudly
            with hub.lock:
                hub.errors.append(f"{self.command} {self.path}\n{traceback.format_exc()}")
            self._json({"error": "stub hub internal error"}, 500)

    def _route(self, path: str) -> None:
        m_api = re.fullmatch(r"/api/(model|dataset|space)s/([^/]+)/([^/]+)(?:/(.*))?", path)
        m_lfs = re.fullmatch(r"/(?:(dataset|space)s/)?([^/]+)/([^/]+)\.git/info/lfs/objects/(batch|verify)", path)
        m_resolve = re.fullmatch(r"/(?:(dataset|space)s/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)", path)
        c = self.command
        if path == "/api/whoami-v2" and c == "GET":
            self._need_auth()
            return self._json({"type": "user", "name": self.hub.username, "fullname": self.hub.username,
                               "orgs": [], "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
        if path in ("/api/repos/create", "/api/repos/delete") and c in ("POST", "DELETE"):
            return self._repos_create() if path.endswith("create") else self._repos_delete()
        if path == "/api/validate-yaml" and c == "POST":  # only checks the front matter is closed
            text = self._payload().get("content", "")
            if text.startswith("---") and "\n---" not in text[3:]:
                return self._json({"errors": [{"message": "unclosed YAML front matter"}], "warnings": []}, 400)
            return self._json({"errors": [], "warnings": []})
        if m_api:
            repo_type, ns, name, rest = m_api.groups()
            return self._api(repo_type, f"{ns}/{name}", rest or "")
        if m_lfs and c == "POST":
            repo = self._repo(m_lfs[1] or "model", f"{m_lfs[2]}/{m_lfs[3]}", write=True)
            return self._lfs_batch(repo) if m_lfs[4] == "batch" else self._lfs_verify()
        if m_resolve and c in ("GET", "HEAD"):
            repo = self._repo(m_resolve[1] or "model", f"{m_resolve[2]}/{m_resolve[3]}")
            return self._resolve(repo, unquote(m_resolve[4]), unquote(m_resolve[5]))
        if m := re.fullmatch(r"/_(lfs|cdn)/([0-9a-f]{64})", path):
            if self.query.get("sig", [""])[0] != self.hub.sign(m[2]):
                raise HubError(403, "Bad signature")
            return self._lfs_put(m[2]) if m[1] == "lfs" and c == "PUT" else self._cdn(m[2])
        raise HubError(404, f"Not found: {c} {path}")

    # ---- auth and lookups ------------------------------------------------------------------
    def _need_auth(self) -> None:
        if not self.authorized:
            raise HubError(401, "Unauthorized: a valid token is required")

    def _repo(self, repo_type: str, repo_id: str, *, write: bool = False) -> Repo:
        if write:
            self._need_auth()
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self.authorized):
            # Like the Hub: a private repo and a missing one look the same without a token.
            raise HubError(401 if repo is not None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _commit_at(self, repo: Repo, rev: str) -> Commit:
        sha = repo.resolve(rev)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.commits[sha]

    def _payload(self) -> dict:
        if self.headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
            return parse_qs(self.body.decode())
        return json.loads(self.body or b"{}")

    # ---- repos ------------------------------------------------------------------------------
    def _repos_create(self) -> None:
        self._need_auth()
        p = self._payload()
        repo_type = p.get("type") or "model"
        repo_id = f"{p.get('organization') or self.hub.username}/{p['name']}"
        url = f"{self.hub.base_url}/{_PREFIX[repo_type]}{repo_id}"
        with self.hub.lock:
            if (repo_type, repo_id) in self.hub.repos:  # the Hub's 409 carries the url (exist_ok reads it)
                raise HubError(409, f"You already created this {repo_type} repo", body={"url": url})
            private = p.get("visibility", "private" if p.get("private") else "public") == "private"
            self.hub.create_repo(repo_id, repo_type, private)
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _repos_delete(self) -> None:
        self._need_auth()
        p = self._payload()
        key = (p.get("type") or "model", f"{p.get('organization') or self.hub.username}/{p['name']}")
        with self.hub.lock:
            if self.hub.repos.pop(key, None) is None:
                raise HubError(404, "Repository not found", "RepoNotFound")
        self._json({})

    def _api(self, repo_type: str, repo_id: str, rest: str) -> None:
        action, _, arg = rest.partition("/")
        c = self.command
        writes = {("POST", "preupload"), ("POST", "commit"), ("POST", "branch"), ("DELETE", "branch"),
                  ("POST", "tag"), ("DELETE", "tag"), ("PUT", "settings")}
        repo = self._repo(repo_type, repo_id, write=(c, action) in writes)
        rev, _, sub = arg.partition("/")  # the revision is quoted into one path segment
        rev = unquote(rev)
        if c == "GET" and action in ("", "revision"):
            return self._info(repo, rev or "main")
        if c == "GET" and action == "tree":
            return self._tree(repo, rev, unquote(sub))
        if c == "POST" and action == "paths-info":
            return self._paths_info(repo, rev)
        if c == "GET" and action == "refs":
            def ref(kind, name, sha):
                return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}
            return self._json({"branches": [ref("heads", n, s) for n, s in repo.branches.items()],
                               "converts": [], "tags": [ref("tags", n, s) for n, s in repo.tags.items()],
                               **({"pullRequests": []} if "include_prs" in self.query else {})})
        if c == "GET" and action == "commits":
            self._commit_at(repo, rev)
            return self._json([{"id": x.sha, "title": x.title, "message": x.message, "date": x.date,
                                "authors": [{"user": x.author}]} for x in repo.history(rev)])
        if c == "POST" and action == "preupload":
            return self._preupload(repo, rev)
        if c == "POST" and action == "commit":
            return self._commit(repo, rev)
        if action in ("branch", "tag") and c in ("POST", "DELETE"):
            return self._ref(repo, action, rev)
        if c == "PUT" and action == "settings":
            p = self._payload()
            if "private" in p or "visibility" in p:
                repo.private = p.get("visibility", "private" if p.get("private") else "public") == "private"
            return self._json({})
        raise HubError(404, f"Not found: {c} {self.path}")

    def _info(self, repo: Repo, rev: str) -> None:
        commit = self._commit_at(repo, rev)
        siblings = []
        for path, b in sorted(commit.files.items()):
            siblings.append({"rfilename": path})
            if "blobs" in self.query:  # files_metadata=True
                siblings[-1].update(size=len(b.data), blobId=b.oid)
                if b.lfs:
                    siblings[-1]["lfs"] = {"sha256": b.sha256, "size": len(b.data), "pointerSize": len(b.pointer)}
        ns = repo.repo_id.split("/")[0]
        info = {"_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id, "author": ns,
                "sha": commit.sha, "lastModified": commit.date, "createdAt": repo.created_at,
                "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
                "tags": [], "siblings": siblings,
                "usedStorage": sum(len(b.data) for b in commit.files.values())}
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        expand = self.query.get("expand", []) + self.query.get("expand[]", [])
        if expand:
            info = {k: v for k, v in info.items() if k in {"_id", "id", *expand}}
        self._json(info)

    def _entry(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict:
        blob = commit.files.get(path)
        if blob is not None:
            entry = {"type": "file", "oid": blob.oid, "size": len(blob.data), "path": path}
            if blob.lfs:
                entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
        else:
            inside = sorted((p, b.oid) for p, b in commit.files.items() if p.startswith(path + "/"))
            entry = {"type": "directory", "oid": hashlib.sha1(repr(inside).encode()).hexdigest(), "size": 0,
                     "path": path}
        if expand:  # the last commit that touched the path (or anything under it)
            last = next(c for c in repo.history(commit.sha)
                        if any(p == path or p.startswith(path + "/") for p in c.changed))
            entry["lastCommit"] = {"id": last.sha, "title": last.title, "date": last.date}
        return entry

    def _tree(self, repo: Repo, rev: str, path: str) -> None:
        commit = self._commit_at(repo, rev)
        path = path.strip("/")
        recursive, expand = _flag(self.query.get("recursive")), _flag(self.query.get("expand"))
        prefix = path + "/" if path else ""
        below = [p[len(prefix):] for p in commit.files if p.startswith(prefix)]
        if path and not below:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        names = set()
        for rel in below:
            parts = rel.split("/")
            depth = len(parts) if recursive else 1
            names.update(prefix + "/".join(parts[:i]) for i in range(1, min(depth, len(parts)) + 1))
        self._json([self._entry(repo, commit, p, expand) for p in sorted(names)])

    def _paths_info(self, repo: Repo, rev: str) -> None:
        commit = self._commit_at(repo, rev)
        p = self._payload()  # form-encoded by huggingface_hub (paths=a&paths=b&expand=False), or JSON
        out = []
        for path in (p.get("paths") or []):
            path = path.strip("/")
            if path in commit.files or any(f.startswith(path + "/") for f in commit.files):
                out.append(self._entry(repo, commit, path, _flag(p.get("expand"))))
        self._json(out)

    def _ref(self, repo: Repo, kind: str, name: str) -> None:
        refs = repo.branches if kind == "branch" else repo.tags
        with self.hub.lock:
            if self.command == "DELETE":
                if refs.pop(name, None) is None:
                    raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
                return self._json({})
            p = self._payload()
            if kind == "branch":  # POST /branch/{branch} {startingPoint?}
                target = self._commit_at(repo, p.get("startingPoint") or "main").sha
            else:  # POST /tag/{revision} {tag, message?}
                target, name = self._commit_at(repo, name).sha, p["tag"]
            if name in refs:
                raise HubError(409, f"{kind.capitalize()} {name} already exists")
            refs[name] = target
        self._json({})

    # ---- upload -----------------------------------------------------------------------------
    def _branch_head(self, repo: Repo, rev: str) -> str:
        if "create_pr" in self.query:
            raise HubError(400, "Pull requests are not supported by the stub hub")
        if rev not in repo.branches:
            if repo.resolve(rev) is not None:
                raise HubError(400, f"Invalid rev id: {rev} is not a branch")
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.branches[rev]

    def _preupload(self, repo: Repo, rev: str) -> None:
        files = repo.commits[self._branch_head(repo, rev)].files
        attrs = files.get(".gitattributes")
        patterns = [ln.split()[0] for ln in (attrs.data.decode() if attrs else "").splitlines()
                    if "filter=lfs" in ln]
        out = []
        for f in self._payload()["files"]:
            path, sample = f["path"], base64.b64decode(f["sample"])
            lfs = (f["size"] >= LFS_THRESHOLD or b"\0" in sample
                   or any(fnmatch.fnmatch(path if "/" in pat else path.rsplit("/", 1)[-1], pat) for pat in patterns))
            old = files.get(path)
            out.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": None if old is None else (old.sha256 if old.lfs else git_blob_oid(old.data))})
        self._json({"files": out, "commitOid": repo.branches[rev]})

    def _lfs_batch(self, repo: Repo) -> None:
        p = self._payload()
        if p.get("operation") != "upload":
            raise HubError(400, "the stub only serves LFS uploads (downloads go through /resolve)")
        base = f"{self.hub.base_url}/{_PREFIX[repo.repo_type]}{repo.repo_id}.git/info/lfs/objects"
        objects = []
        for o in p["objects"]:
            oid, size, sig = o["oid"], o["size"], self.hub.sign(o["oid"])
            obj = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.hub.lfs_objects:  # no actions: already uploaded
                obj["actions"] = {"upload": {"href": f"{self.hub.base_url}/_lfs/{oid}?sig={sig}&size={size}"}}
                if self.hub.lfs_verify:
                    obj["actions"]["verify"] = {"href": f"{base}/verify"}
            objects.append(obj)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str) -> None:
        if hashlib.sha256(self.body).hexdigest() != oid or str(len(self.body)) != self.query["size"][0]:
            raise HubError(400, "Uploaded content does not match its sha256/size")
        with self.hub.lock:
            self.hub.lfs_objects[oid] = self.body
        self._send(200, headers={"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'})

    def _lfs_verify(self) -> None:
        p = self._payload()
        data = self.hub.lfs_objects.get(p["oid"])
        if data is None or len(data) != p["size"]:
            raise HubError(404, f"LFS object {p['oid']} not found")
        self._json({})

    def _commit(self, repo: Repo, rev: str) -> None:
        if not self.headers.get("Content-Type", "").startswith("application/x-ndjson"):
            raise HubError(400, "Expected an application/x-ndjson body")
        lines = [json.loads(ln) for ln in self.body.splitlines() if ln.strip()]
        header = next((ln["value"] for ln in lines if ln["key"] == "header"), None)
        if header is None:
            raise HubError(400, "Missing commit header")
        with self.hub.lock:
            head = self._branch_head(repo, rev)
            if header.get("parentCommit") not in (None, head):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = repo.commits[head].files
            add, delete = {}, []
            for ln in lines:
                key, v = ln["key"], ln["value"]
                if key == "file":
                    add[v["path"]] = Blob(base64.b64decode(v["content"]) if v.get("encoding") == "base64"
                                          else v["content"].encode(), False)
                elif key == "lfsFile":
                    data = self.hub.lfs_objects.get(v["oid"])
                    if data is None or v.get("size", len(data)) != len(data):
                        raise HubError(400, f"LFS object {v['oid']} for {v['path']} was never uploaded")
                    add[v["path"]] = Blob(data, True)
                elif key == "deletedFile":
                    if v["path"] not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {v['path']}", "EntryNotFound")
                    delete.append(v["path"])
                elif key == "deletedFolder":
                    delete.append(v["path"].rstrip("/") + "/")
                elif key != "header":
                    raise HubError(400, f"Unknown commit operation {key!r}")
            new = self.hub.commit(repo, rev, add, delete, header.get("summary") or "Commit",
                                  header.get("description") or "")
        url = f"{self.hub.base_url}/{_PREFIX[repo.repo_type]}{repo.repo_id}/commit/{new.sha}"
        self._json({"success": True, "commitOid": new.sha, "commitUrl": url, "hookOutput": ""})

    # ---- download ---------------------------------------------------------------------------
    def _resolve(self, repo: Repo, rev: str, path: str) -> None:
        commit = self._commit_at(repo, rev)
        blob = commit.files.get(path)
        if blob is None:
            # X-Repo-Commit lets the client cache the file's absence for that commit
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": commit.sha})
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{blob.oid}"', "Accept-Ranges": "bytes"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))})
            if self.hub.lfs_redirect:  # another origin, as the Hub's CDN: the client drops the token
                cdn = f"http://localhost:{self.hub.port}/_cdn/{blob.sha256}?sig={self.hub.sign(blob.sha256)}"
                return self._send(302, b"", {**headers, "Location": cdn}, content_type="text/plain")
        self._ranged(blob.data, headers)

    def _cdn(self, oid: str) -> None:
        data = self.hub.lfs_objects.get(oid)
        if data is None or self.command not in ("GET", "HEAD"):
            raise HubError(404, "Not found")
        self._ranged(data, {"ETag": f'"{oid}"', "Accept-Ranges": "bytes"})

    def _ranged(self, data: bytes, headers: dict) -> None:
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if not m or (not m[1] and not m[2]):
            return self._send(200, data, headers, "application/octet-stream")
        size = len(data)
        start, end = (int(m[1]), int(m[2]) if m[2] else size - 1) if m[1] else (max(size - int(m[2]), 0), size - 1)
        if start >= size:
            return self._send(416, b"", {**headers, "Content-Range": f"bytes */{size}"})
        end = min(end, size - 1)
        self._send(206, data[start:end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{size}"},
                   "application/octet-stream")


def point_clients_at(stub: HubStub, monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """Point huggingface_hub and datasets at a started `stub` until `monkeypatch` is undone.

    Both libraries copy their settings (HF_ENDPOINT, HF_HUB_OFFLINE, caches...) into module constants
    when first imported, and the suite imports them offline (tests/conftest.py), so env vars alone
    do nothing here. So: import both FIRST (then monkeypatch restores their import-time values, not
    the stub's), patch the constants where they are read at call time, and set the env vars too (for
    subprocesses and code imported later). Patched: huggingface_hub.constants (ENDPOINT,
    HUGGINGFACE_CO_URL_TEMPLATE, HF_URL_HOSTS, HF_HUB_OFFLINE, HF_HUB_DISABLE_XET, cache and token
    paths); `huggingface_hub.hf_api.api`, whose endpoint is frozen at import (the top-level
    `huggingface_hub.upload_folder`, `create_repo`... are its bound methods); `utils._http._HUB_ORIGINS`;
    datasets.config (HF_ENDPOINT, HUB_DATASETS_URL, HF_HUB_OFFLINE, caches, and HF_UPDATE_DOWNLOAD_COUNTS
    and USE_PARQUET_EXPORT off: both call hosts other than the endpoint, s3 and datasets-server).
    Xet is off: with hf_xet installed the client uploads through Xet without asking the server.
    """
    import huggingface_hub  # noqa: F401  (import before patching, see above)
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    try:
        import datasets.config as ds_config
    except ImportError:
        ds_config = None

    url = stub.base_url
    for k, v in {"HF_ENDPOINT": url, "HF_TOKEN": stub.token, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
                 "HF_DATASETS_OFFLINE": "0", "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_HUB_CACHE", "HF_DATASETS_CACHE", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE",
              "TRANSFORMERS_OFFLINE", "HF_TOKEN_PATH", "HF_XET_CACHE"):
        monkeypatch.delenv(k, raising=False)
    for name, value in {
        "ENDPOINT": url, "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"}, "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True, "HF_HUB_DISABLE_TELEMETRY": True, "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HUGGINGFACE_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"), "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
    }.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", url)
    monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(url)})
    if ds_config is not None:
        downloads = home / "datasets" / ds_config.DOWNLOADED_DATASETS_DIR
        for name, value in {
            "HF_ENDPOINT": url, "HUB_DATASETS_URL": url + "/datasets/{repo_id}/resolve/{revision}/{path}",
            "HF_HUB_OFFLINE": False, "HF_DATASETS_OFFLINE": False, "HF_UPDATE_DOWNLOAD_COUNTS": False,
            "USE_PARQUET_EXPORT": False, "HF_CACHE_HOME": str(home), "HF_DATASETS_CACHE": home / "datasets",
            "HF_MODULES_CACHE": home / "modules", "DOWNLOADED_DATASETS_PATH": downloads,
            "EXTRACTED_DATASETS_PATH": downloads / ds_config.EXTRACTED_DATASETS_DIR,
        }.items():
            monkeypatch.setattr(ds_config, name, value)


def _drop_client_state() -> None:
    """fsspec caches HfFileSystem instances (with their listings) per endpoint, and ports get reused;
    the shared httpx client pools keep-alive connections to servers that are gone."""
    from huggingface_hub import HfFileSystem
    from huggingface_hub.utils import _http

    HfFileSystem.clear_instance_cache()
    _http.close_session()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running `HubStub` (token `hub.token`, user `hub.username`) with huggingface_hub and datasets
    pointed at it for this test only, HF_HOME=tmp_path/"hf". See `point_clients_at` for what is patched
    and why. `HfApi()`, `HfFileSystem()` and `datasets.load_dataset` called inside the test reach the
    stub; objects built before the test keep their old endpoint. Fails the test if the stub itself
    crashed on a request (`hub.errors`).

        from tests.hubstub import hub  # noqa: F401   (in a conftest.py or a test module)

        def test_push(hub, tmp_path):
            HfApi().create_repo("stub-user/ds", repo_type="dataset", private=True)
            ...
    """
    stub = HubStub()
    stub.start()
    point_clients_at(stub, monkeypatch, tmp_path / "hf")
    _drop_client_state()
    try:
        yield stub
    finally:
        stub.stop()
        _drop_client_state()
    assert not stub.errors, f"the stub hub crashed on requests: {stub.errors}"
