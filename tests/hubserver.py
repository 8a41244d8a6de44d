"""A fake Hugging Face Hub on 127.0.0.1 for tests (`from hubserver import FakeHub`).

It serves the Hub's URL layout to the real `huggingface_hub` client:
`HEAD/GET /{org}/{name}/resolve/{rev}/{file}` (with `X-Repo-Commit`, `ETag`, and
`Range` -> 206/416), `GET /api/models/{org}/{name}[/revision/{rev}]` and
`GET /api/models/{org}/{name}/tree/{rev}[/{path}][?recursive=true]` (files and folders, as the
Hub lists them), `GET /api/models/{org}/{name}/refs` (branches, tags, pull requests); errors carry the `X-Error-Code` header the
client maps to its exceptions (RepoNotFound, RevisionNotFound, EntryNotFound,
GatedRepo). With `redirect=True`, .safetensors files are answered like the real Hub
answers LFS files: a 302 (with `X-Linked-Etag`, `X-Linked-Size`) to a storage URL
`/cdn/{org}/{name}/{commit}/{file}` that serves the bytes without a token. Every request is logged and every body byte of a file counted, so tests
can assert what a command fetched. `quirks` make a repo answer like a broken server or proxy:
"no-rfilename" (model info siblings without `rfilename`), "size-unknown" (`Content-Range: bytes a-b/*`),
"no-ranges" (a Range header is ignored: 200 and the whole file). With `tree_page_size`, the tree
endpoint answers that many entries per page, the next page named by a `Link: <url>; rel="next"` header.

    with FakeHub() as hub:
        hub.add_repo("org/a", {"main": {"model.safetensors": data}, "v2": {...}})
        hub.endpoint                               # "http://127.0.0.1:PORT"
        hub.bytes_served[("org/a", "model.safetensors")]
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import parse_qs, quote, unquote, urlsplit


def commit_of(repo_id: str, revision: str) -> str:
    """The fake 40-hex commit sha of a revision."""
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


@dataclass
class FakeRepo:
    revisions: dict[str, dict[str, bytes]]  # revision name -> {path: content}
    commits: dict[str, str]  # revision name -> commit sha
    token: str | None = None  # gated: files need `Authorization: Bearer <token>`
    tags: tuple[str, ...] = ()  # revisions listed as tags; refs/pr/N as pull requests; the rest as branches
    quirks: tuple[str, ...] = ()

    def find(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        """(commit, files) of a revision given by name or by commit sha."""
        for name, files in self.revisions.items():
            if revision in (name, self.commits[name]):
                return self.commits[name], files
        return None


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None


class FakeHub:
    """A threaded HTTP server holding fake repos. Use as a context manager, or start()/stop()."""

    def __init__(self, redirect: bool = False) -> None:
        self.redirect = redirect  # answer .safetensors files with a 302 to /cdn/..., as the real Hub does
        self.tree_page_size: int | None = None  # paginate tree listings, as the real Hub does (by 1000)
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[Request] = []
        self.bytes_served: Counter = Counter()  # (repo_id, path) -> file bytes sent in GET bodies
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def add_repo(self, repo_id: str, revisions: dict[str, dict[str, bytes]], token: str | None = None,
                 tags: tuple[str, ...] = (), quirks: tuple[str, ...] = ()) -> None:
        self.repos[repo_id] = FakeRepo(revisions, {name: commit_of(repo_id, name) for name in revisions}, token,
                                       tuple(tags), tuple(quirks))

    def reset(self) -> None:
        """Forget the requests and byte counts seen so far."""
        with self._lock:
            self.requests.clear()
            self.bytes_served.clear()

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _record(self, request: Request, key: tuple[str, str] | None = None, nbytes: int = 0) -> None:
        with self._lock:
            self.requests.append(request)
            if key is not None:
                self.bytes_served[key] += nbytes


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:  # quiet: tests read the request log instead
        pass

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def do_GET(self) -> None:
        self._handle(head=False)

    # -- routing ---------------------------------------------------------------------------

    def _handle(self, head: bool) -> None:
        self.close_connection = True
        request = Request(self.command, self.path, self.headers.get("Range"), self.headers.get("Authorization"))
        # Split first, then unquote: a revision like refs/pr/1 arrives as refs%2Fpr%2F1.
        parts = [unquote(p) for p in urlsplit(self.path).path.split("/")[1:]]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            self.fake._record(request)
            return self._api(parts[2] + "/" + parts[3], parts[4:])
        if parts[0] == "cdn" and len(parts) >= 5:
            return self._cdn(request, parts[1] + "/" + parts[2], parts[3], "/".join(parts[4:]), head)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(request, parts[0] + "/" + parts[1], parts[3], "/".join(parts[4:]), head)
        self.fake._record(request)
        self._send(404, b"not found")

    def _api(self, repo_id: str, rest: list[str]) -> None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound")
        if rest == ["refs"]:
            return self._json(self._refs(repo))
        if rest and rest[0] in ("revision", "tree") and len(rest) >= 2:
            # the client sends the revision quoted (one path segment) and, for tree, the folder after it
            revision, folder = (rest[1], "/".join(rest[2:])) if rest[0] == "tree" else ("/".join(rest[1:]), "")
        elif not rest:
            revision, folder = "main", ""
        else:
            return self._send(404, b"not found")
        found = repo.find(revision)
        if found is None:
            return self._error(404, "RevisionNotFound")
        commit, files = found
        if rest and rest[0] == "tree":
            recursive = parse_qs(urlsplit(self.path).query).get("recursive", ["false"])[0].lower() in ("true", "1")
            return self._tree_page(_tree(files, folder.strip("/"), recursive))
        siblings = [{"rfilename": p, "size": len(d), "blobId": _git_oid(d),
                     **({"lfs": _lfs(d)} if p.endswith(".safetensors") else {})} for p, d in sorted(files.items())]
        if "no-rfilename" in repo.quirks:
            siblings = [{k: v for k, v in sib.items() if k != "rfilename"} for sib in siblings]
        self._json({"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                    "gated": "manual" if repo.token else False, "siblings": siblings})

    def _tree_page(self, entries: list[dict]) -> None:
        """`entries`, or one page of them (`tree_page_size`) from `?cursor=N`, with a Link to the next page."""
        size = self.fake.tree_page_size
        if not size:
            return self._json(entries)
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        start = int(query.pop("cursor", ["0"])[0])
        headers = {}
        if start + size < len(entries):
            rest = "".join(f"{k}={v[0]}&" for k, v in query.items())
            headers["Link"] = f'<{self.fake.endpoint}{url.path}?{rest}cursor={start + size}>; rel="next"'
        self._json(entries[start:start + size], headers)

    @staticmethod
    def _refs(repo: FakeRepo) -> dict:
        out = {"branches": [], "tags": [], "converts": [], "pullRequests": []}
        for name, commit in repo.commits.items():
            if name.startswith("refs/pr/"):
                out["pullRequests"].append({"name": name, "ref": name, "targetCommit": commit})
            elif name in repo.tags:
                out["tags"].append({"name": name, "ref": f"refs/tags/{name}", "targetCommit": commit})
            else:
                out["branches"].append({"name": name, "ref": f"refs/heads/{name}", "targetCommit": commit})
        return out

    def _resolve(self, request: Request, repo_id: str, revision: str, path: str, head: bool) -> None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self.fake._record(request)
            return self._error(404, "RepoNotFound")
        if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
            self.fake._record(request)
            return self._error(401, "GatedRepo")
        found = repo.find(revision)
        if found is None:
            self.fake._record(request)
            return self._error(404, "RevisionNotFound")
        commit, files = found
        if path not in files:
            self.fake._record(request)
            return self._error(404, "EntryNotFound", {"X-Repo-Commit": commit})
        data = files[path]
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        if self.fake.redirect and path.endswith(".safetensors"):
            # Like the real Hub's LFS files: a redirect to a storage URL that needs no token.
            self.fake._record(request)
            # Another origin (localhost, not 127.0.0.1), as the real storage host is: the client
            # follows it for GET only, without the Authorization header.
            port = self.server.server_address[1]
            location = f"http://localhost:{port}/cdn/{repo_id}/{commit}/{quote(path)}"
            return self._send(302, b"", {"Location": location, "X-Repo-Commit": commit,
                                         "ETag": f'"{_git_oid(data)}"', "X-Linked-Etag": etag,
                                         "X-Linked-Size": str(len(data))}, head)
        self._serve(request, (repo_id, path), data, {"X-Repo-Commit": commit, "ETag": etag}, head,
                    size_unknown="size-unknown" in repo.quirks, ignore_range="no-ranges" in repo.quirks)

    def _cdn(self, request: Request, repo_id: str, commit: str, path: str, head: bool) -> None:
        repo = self.fake.repos.get(repo_id)
        found = repo.find(commit) if repo else None
        if found is None or path not in found[1]:
            self.fake._record(request)
            return self._send(404, b"no such object")
        self._serve(request, (repo_id, path), found[1][path], {"ETag": f'"{hashlib.sha256(found[1][path]).hexdigest()}"'},
                    head)

    def _serve(self, request: Request, key: tuple[str, str], data: bytes, headers: dict, head: bool,
               size_unknown: bool = False, ignore_range: bool = False) -> None:
        """A file's bytes, or the byte range asked for (206), counted under `key`."""
        headers = {**headers, "Accept-Ranges": "bytes"}
        status, body = 200, data
        if request.range and not ignore_range:
            span = _parse_range(request.range, len(data))
            if span is None:
                self.fake._record(request)
                return self._send(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
            a, b = span
            status, body = 206, data[a:b + 1]
            headers["Content-Range"] = f"bytes {a}-{b}/{'*' if size_unknown else len(data)}"
        self.fake._record(request, key, 0 if head else len(body))
        self._send(status, body, headers, head)

    # -- replies ---------------------------------------------------------------------------

    def _error(self, status: int, code: str, headers: dict | None = None) -> None:
        self._send(status, json.dumps({"error": code}).encode(), {"X-Error-Code": code, **(headers or {})})

    def _json(self, obj, headers: dict | None = None) -> None:
        self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _send(self, status: int, body: bytes, headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if not head:
            self.wfile.write(body)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Inclusive byte span of `bytes=a-b`, `bytes=a-` or `bytes=-n`; None when unsatisfiable."""
    m = _RANGE.match(header.strip())
    if not m or (m[1] == "" and m[2] == ""):
        return None
    if m[1] == "":
        a, b = max(size - int(m[2]), 0), size - 1
    else:
        a, b = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
    return (a, b) if a < size and a <= b else None


def _tree(files: dict[str, bytes], folder: str, recursive: bool) -> list[dict]:
    """The tree endpoint's entries under `folder` ("" = root): direct children, or every descendant."""
    prefix = folder + "/" if folder else ""
    entries: dict[str, dict] = {}
    for path, data in sorted(files.items()):
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix):].split("/")
        for depth in range(1, len(parts)):  # the folders on the way
            sub = prefix + "/".join(parts[:depth])
            if recursive or depth == 1:
                entries.setdefault(sub, {"type": "directory", "path": sub, "oid": _git_oid(sub.encode())})
        if recursive or len(parts) == 1:
            entries[path] = {"type": "file", "path": path, "size": len(data), "oid": _git_oid(data),
                             **({"lfs": _lfs(data, "oid")} if path.endswith(".safetensors") else {})}
    return [entries[k] for k in sorted(entries)]


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs(data: bytes, sha_key: str = "sha256") -> dict:
    """LFS pointer info: the tree endpoint names the sha256 `oid`, the info endpoint `sha256`."""
    return {"size": len(data), sha_key: hashlib.sha256(data).hexdigest(), "pointerSize": 134}


def files_of(path) -> dict[str, bytes]:
    """A local checkpoint as repo files: a single file becomes model.safetensors, a folder keeps its names."""
    if path.is_file():
        return {"model.safetensors": path.read_bytes()}
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def use_fake_hub(hub: FakeHub, tmp_path, monkeypatch) -> FakeHub:
    """Point the in-process `huggingface_hub` client at `hub`, with an empty cache under `tmp_path`
    and no token anywhere; forget the requests seen so far."""
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.setattr(c, "HF_STORED_TOKENS_PATH", str(tmp_path / "stored_tokens"))
    monkeypatch.setattr(c, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    hub.reset()
    return hub


@contextmanager
def silent_endpoint(monkeypatch, timeout: float = 0.3) -> Iterator[str]:
    """An endpoint that accepts connections (the kernel's backlog) and never answers, set as the client's
    with `timeout` as HF_HUB_DOWNLOAD_TIMEOUT; yields its URL."""
    import huggingface_hub.constants as c

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        monkeypatch.setattr(c, "ENDPOINT", url)
        monkeypatch.setattr(c, "HF_HUB_DOWNLOAD_TIMEOUT", timeout)
        yield url
