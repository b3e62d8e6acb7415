"""A local stand-in for the Hugging Face Hub and its CDN, for tests: two stdlib HTTP servers on loopback ports.

It answers `HEAD`/`GET {endpoint}/{org}/{name}/resolve/{revision}/{path}` as the real Hub does (as read in
huggingface_hub's file_download.py and utils/_http.py, and the Hub's answers they handle):

- a regular file: `307` to the relative `/api/resolve-cache/models/{repo}/{commit}/{path}`, which answers `200` with
  `ETag` = the git blob sha1, `X-Repo-Commit` and `Content-Length`;
- an LFS file: `302` to the CDN server (another port, so another origin), with `X-Repo-Commit`, `X-Linked-Etag` =
  the sha256, `X-Linked-Size` and an `ETag` of its own that is neither; the CDN serves the bytes, with `Range`;
- errors with `X-Error-Code`: `RepoNotFound` (401 without a token, 404 with one), `GatedRepo` (401 without a
  token, 403 with a token that was not granted access), `RevisionNotFound` (404), `EntryNotFound` (404, with
  `X-Repo-Commit`); an unknown token gets 401 "Invalid credentials in Authorization header" on any repo;
- a renamed repo: `307` to the relative resolve URL of its new name.

And `GET {endpoint}/api/models/{org}/{name}/revision/{revision}` (huggingface_hub's `HfApi.model_info`, which the
service calls once to resolve the revision to a commit and list its files) as the real Hub answers it: a JSON object
with `id`, `sha` (the commit), `gated` and `siblings` (`[{"rfilename": path}]`; with `?blobs=true` also `size`,
`blobId` and, for an LFS file, `lfs` with its `sha256`), the same error codes as above except that a gated repo's
metadata is public (only its files are gated), and for a renamed repo a `307` to the new name's API URL. Also
`GET {endpoint}/api/agent-harnesses`, which huggingface_hub 2.x asks for once a day to fill its User-Agent: an empty
registry.

Faults, each consumed by the next request it applies to: `cut` (send the headers and only part of the body, then
close the connection), `ignore_range` (answer 200 with the whole file to a Range request), `corrupt` (flip bytes,
same length), `status` (answer that status), `slow` (send the body at `value` bytes a second, to stop a download in
the middle). Every request is recorded (server, method, path, headers).
"""

from __future__ import annotations

import collections
import hashlib
import json
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Recorded:
    server: str  # "hub" or "cdn"
    method: str
    path: str
    headers: dict[str, str]

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)


@dataclass
class FakeRepo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> {path: content}
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    lfs: set[str] = field(default_factory=set)  # paths stored in LFS (served through the CDN)
    granted_tokens: set[str] | None = None  # gated: only these tokens may read; None = public


@dataclass
class Fault:
    kind: str  # "cut", "ignore_range", "corrupt", "status", "slow"
    value: int = 0  # bytes sent before the cut; the status; bytes a second


class FakeHub:
    """The Hub on one loopback port and its CDN on another; `close()` stops both."""

    def __init__(self):
        self.repos: dict[str, FakeRepo] = {}
        self.renamed: dict[str, str] = {}
        self.known_tokens: set[str] = set()
        self.requests: list[Recorded] = []
        self.down_status: int | None = None  # every Hub request gets this status (the Hub is down)
        self._faults: dict[str, collections.deque[Fault]] = collections.defaultdict(collections.deque)
        self._blobs: dict[str, tuple[str, bytes]] = {}  # sha256 -> (path, content): what the CDN serves
        self._lock = threading.Lock()
        self._servers = [self._serve("hub"), self._serve("cdn")]
        self.endpoint = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.cdn = f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    # ---- setting it up

    def add_repo(self, repo_id: str, files: dict[str, bytes], lfs=(), refs=("main",)) -> str:
        """A repo whose first commit holds `files`; returns that commit."""
        self.repos[repo_id] = FakeRepo(lfs=set(lfs))
        return self.add_commit(repo_id, files, refs)

    def add_commit(self, repo_id: str, files: dict[str, bytes], refs=("main",)) -> str:
        repo = self.repos[repo_id]
        commit = hashlib.sha1(repr((repo_id, len(repo.commits), sorted(files.items()))).encode()).hexdigest()
        repo.commits[commit] = dict(files)
        for ref in refs:
            repo.refs[ref] = commit
        for path, data in files.items():
            if path in repo.lfs:
                self._blobs[sha256(data)] = (path, data)
        return commit

    def gate(self, repo_id: str, *granted_tokens: str) -> None:
        self.repos[repo_id].granted_tokens = set(granted_tokens)
        self.known_tokens |= set(granted_tokens)

    def fail(self, path: str, *faults: Fault) -> None:
        """Queue faults for the next requests of `path` (a repo file) that send its content."""
        self._faults[path].extend(faults)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def requests_to(self, server: str, method: str | None = None) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.server == server and method in (None, r.method)]

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    # ---- serving

    def _serve(self, name: str) -> ThreadingHTTPServer:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                hub._handle(name, self)

            def do_GET(self):
                hub._handle(name, self)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                         name=f"fake-{name}").start()
        return server

    def _handle(self, server: str, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests.append(Recorded(server, handler.command, handler.path, dict(handler.headers.items())))
        if server == "cdn":
            sha = urllib.parse.urlsplit(handler.path).path.rsplit("/", 1)[-1]
            if sha not in self._blobs:
                return _answer(handler, 404, {})
            file, data = self._blobs[sha]
            return self._content(handler, file, data, {})
        if self.down_status is not None:
            return _answer(handler, self.down_status, {})
        parts = urllib.parse.urlsplit(handler.path).path.lstrip("/").split("/")
        if parts == ["api", "agent-harnesses"]:
            return _answer(handler, 200, {"Content-Type": "application/json"},
                           body=b'{"standardEnvVars": [], "harnesses": {}}')
        if parts[:2] == ["api", "models"] and len(parts) == 6 and parts[4] == "revision":
            return self._model_info(handler, "/".join(parts[2:4]), urllib.parse.unquote(parts[5]))
        self._resolve(handler)

    def _refusal(self, repo_id: str, token: str | None, files_gated: bool = True) -> tuple[int, dict] | None:
        """The Hub's refusal of a request for `repo_id`, or None when it is served."""
        if token is not None and token not in self.known_tokens:
            return 401, {"X-Error-Message": "Invalid credentials in Authorization header"}
        repo = self.repos.get(repo_id)
        if repo is None:
            return (404 if token else 401), {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}
        if files_gated and repo.granted_tokens is not None and token not in repo.granted_tokens:
            return (403 if token else 401), {
                "X-Error-Code": "GatedRepo",
                "X-Error-Message": f"Access to model {repo_id} is restricted and you are not in the authorized list. "
                                   f"Visit its page to ask for access."}
        return None

    def _model_info(self, handler: BaseHTTPRequestHandler, repo_id: str, revision: str) -> None:
        token = _bearer(handler)
        if repo_id in self.renamed and (token is None or token in self.known_tokens):
            quoted = urllib.parse.quote(revision, safe="")
            query = urllib.parse.urlsplit(handler.path).query
            return _answer(handler, 307, {"Location": f"/api/models/{self.renamed[repo_id]}/revision/{quoted}"
                                                      + (f"?{query}" if query else "")})
        refusal = self._refusal(repo_id, token, files_gated=False)
        if refusal is not None:
            return _answer(handler, *refusal, body=b'{"error": "%s"}' % refusal[1]["X-Error-Message"].encode())
        repo = self.repos[repo_id]
        commit = repo.refs.get(revision) or (revision if revision in repo.commits else None)
        if commit is None:
            return _answer(handler, 404, {"X-Error-Code": "RevisionNotFound",
                                          "X-Error-Message": "Invalid rev id: " + revision})
        blobs = "blobs=true" in urllib.parse.urlsplit(handler.path).query.lower()
        siblings = []
        for path, data in sorted(repo.commits[commit].items()):
            sibling: dict = {"rfilename": path}
            if blobs and path in repo.lfs:
                pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256(data)}\n"
                           f"size {len(data)}\n").encode()
                sibling.update(blobId=git_blob_sha1(pointer), size=len(data),
                               lfs={"sha256": sha256(data), "size": len(data), "pointerSize": len(pointer)})
            elif blobs:
                sibling.update(blobId=git_blob_sha1(data), size=len(data))
            siblings.append(sibling)
        org = repo_id.split("/")[0]
        info = {"_id": commit[:24], "id": repo_id, "modelId": repo_id, "author": org, "sha": commit,
                "private": False, "disabled": False, "gated": "manual" if repo.granted_tokens is not None else False,
                "tags": [], "siblings": siblings}
        _answer(handler, 200, {"Content-Type": "application/json"}, body=json.dumps(info).encode())

    def _resolve(self, handler: BaseHTTPRequestHandler) -> None:
        path = urllib.parse.urlsplit(handler.path).path
        parts = path.lstrip("/").split("/")
        cached = parts[:3] == ["api", "resolve-cache", "models"] and len(parts) >= 7
        if cached:
            repo_id, revision, file = "/".join(parts[3:5]), parts[5], "/".join(parts[6:])
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo_id, revision, file = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        else:
            return _answer(handler, 404, {})
        revision, file = urllib.parse.unquote(revision), urllib.parse.unquote(file)
        token = _bearer(handler)
        if token is not None and token not in self.known_tokens:
            return _answer(handler, *self._refusal(repo_id, token))
        if repo_id in self.renamed:
            new = self.renamed[repo_id]
            quoted = urllib.parse.quote(revision, safe="")
            return _answer(handler, 307, {"Location": f"/{new}/resolve/{quoted}/{urllib.parse.quote(file)}"})
        refusal = self._refusal(repo_id, token)
        if refusal is not None:
            return _answer(handler, *refusal)
        repo = self.repos[repo_id]
        commit = repo.refs.get(revision) or (revision if revision in repo.commits else None)
        if commit is None:
            return _answer(handler, 404, {"X-Error-Code": "RevisionNotFound",
                                          "X-Error-Message": "Invalid rev id: " + revision})
        files = repo.commits[commit]
        if file not in files:
            return _answer(handler, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit,
                                          "X-Error-Message": "Entry not found"})
        data = files[file]
        if file in repo.lfs:
            return _answer(handler, 302, {
                "Location": f"{self.cdn}/blobs/{sha256(data)}?expires=1700000000&signature=abc",
                "X-Repo-Commit": commit, "X-Linked-Etag": f'"{sha256(data)}"', "X-Linked-Size": str(len(data)),
                "ETag": f'W/"{hashlib.md5(data).hexdigest()}-1"'}, body=b"Found. Redirecting")
        if not cached:
            target = f"/api/resolve-cache/models/{repo_id}/{commit}/{urllib.parse.quote(file)}"
            return _answer(handler, 307, {"Location": target, "X-Repo-Commit": commit},
                           body=b"Temporary Redirect")
        self._content(handler, file, data, {"X-Repo-Commit": commit, "ETag": f'"{git_blob_sha1(data)}"'})

    def _content(self, handler: BaseHTTPRequestHandler, file: str, data: bytes, headers: dict) -> None:
        """The file's bytes, honouring `Range: bytes=N-`, unless a fault for `file` says otherwise."""
        fault = None
        if handler.command == "GET":
            with self._lock:
                if self._faults[file]:
                    fault = self._faults[file].popleft()
        if fault is not None and fault.kind == "status":
            return _answer(handler, fault.value, {})
        if fault is not None and fault.kind == "corrupt":
            data = bytes(b ^ 0x5A for b in data[:16]) + data[16:]
        status, start = 200, 0
        requested = handler.headers.get("Range", "")
        if requested.startswith("bytes=") and requested.endswith("-") and not (fault and fault.kind == "ignore_range"):
            start = int(requested[len("bytes="):-1])
            if start >= len(data):
                return _answer(handler, 416, {"Content-Range": f"bytes */{len(data)}"})
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        body = data[start:]
        if fault is not None and fault.kind == "slow":
            _answer(handler, status, {**headers, "Content-Length": str(len(body))}, content_length=False)
            step = max(1, fault.value // 20)  # twenty writes a second
            try:
                for offset in range(0, len(body), step):
                    handler.wfile.write(body[offset:offset + step])
                    handler.wfile.flush()
                    time.sleep(step / fault.value)
            except OSError:  # the client went away
                handler.close_connection = True
            return
        if fault is not None and fault.kind == "cut":
            _answer(handler, status, {**headers, "Content-Length": str(len(body))}, body=body[:fault.value],
                    content_length=False)
            handler.wfile.flush()
            handler.connection.shutdown(socket.SHUT_RDWR)
            handler.close_connection = True
            return
        _answer(handler, status, headers, body=body)


def _answer(handler: BaseHTTPRequestHandler, status: int, headers: dict, body: bytes = b"",
            content_length: bool = True) -> None:
    handler.send_response(status)
    for name, value in headers.items():
        handler.send_header(name, value)
    if content_length:
        handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)


def _bearer(handler: BaseHTTPRequestHandler) -> str | None:
    auth = handler.headers.get("Authorization", "")
    return auth[len("Bearer "):] if auth.startswith("Bearer ") else None


def refused_endpoint() -> tuple[str, socket.socket]:
    """An endpoint on a loopback port that refuses connections: bound, not listening. Keep the socket open (it
    holds the port) and close it afterwards."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return f"http://127.0.0.1:{sock.getsockname()[1]}", sock


def silent_endpoint() -> tuple[str, socket.socket]:
    """An endpoint that accepts the connection (the kernel's backlog does) but never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", sock
