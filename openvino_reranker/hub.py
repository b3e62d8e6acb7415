"""Fetching a ready OpenVINO IR from the Hugging Face Hub, standard library only, into huggingface_hub's cache.

The protocol and the cache layout are huggingface_hub's (ARCHITECTURE.md, "Fetching from the Hub"): a model that
`hf download` or transformers fetched is used from that cache, and what this module fetches is used by them. Unlike
huggingface_hub, every downloaded file is checked against its ETag (the sha256 of an LFS file, the git blob sha1 of
a regular one) before it enters the cache.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import http.client
import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import EXIT_CONFIG, EXIT_DOWNLOAD, EXIT_MODEL, StartupError

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_REVISION = "main"
DEFAULT_TIMEOUT_S = 10.0  # huggingface_hub's default for HF_HUB_ETAG_TIMEOUT and HF_HUB_DOWNLOAD_TIMEOUT
USER_AGENT = f"openvino-reranker/{__version__}"
TRUE_VALUES = ("1", "ON", "YES", "TRUE")  # what huggingface_hub accepts as "on" in HF_HUB_OFFLINE
MAX_REDIRECTS = 10
MAX_ATTEMPTS_PER_FILE = 5  # a download cut off after it received bytes is resumed at once, this many times at most
CHUNK_BYTES = 1 << 16
# The CACHEDIR.TAG standard (https://bford.info/cachedir/): backup tools skip the directory. huggingface_hub writes
# one with the same signature line into the cache directory.
CACHEDIR_TAG = ("Signature: 8a477f597d28d172789f06886806bc55\n"
                "# This file is a cache directory tag: the Hugging Face Hub cache.\n"
                "# For information about cache directory tags, see:\n"
                "#\thttps://bford.info/cachedir/\n")

_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ETAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")  # a blob's file name: no '/', no leading '.'
# One part of a repo id, as huggingface_hub's validate_repo_id: 1-96 ASCII letters, digits, '_', '-', '.', starting
# and ending with a letter, digit or '_'.
_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")
_REVISION = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_./-]{0,253}[A-Za-z0-9_])?")
_REDIRECTS = (301, 302, 303, 307, 308)


# ---------------------------------------------------------------------------------------------- settings and names


@dataclass(frozen=True)
class HubSettings:
    """Where the Hub is, how to reach it and where its cache is: the variables huggingface_hub reads."""

    endpoint: str  # HF_ENDPOINT, default https://huggingface.co, trailing slash stripped
    token: str | None  # HF_TOKEN, else the file HF_TOKEN_PATH, else $HF_HOME/token
    offline: bool  # HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is 1, ON, YES or TRUE, in any case
    cache_dir: Path  # HF_HUB_CACHE, else $HF_HOME/hub; HF_HOME defaults to $XDG_CACHE_HOME/huggingface, ~/.cache/...
    token_source: str = ""  # where the token came from, for messages: "HF_TOKEN" or the token file's path
    metadata_timeout_s: float = DEFAULT_TIMEOUT_S  # HF_HUB_ETAG_TIMEOUT: each socket operation of a metadata request
    download_timeout_s: float = DEFAULT_TIMEOUT_S  # HF_HUB_DOWNLOAD_TIMEOUT: each socket operation of a download
    proxies: tuple[tuple[str, str], ...] = ()  # (scheme, proxy URL) from *_proxy variables; ("no", hosts) too
    progress_interval_s: float = 1.0  # least time between two progress lines of one download

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> HubSettings:
        hf_home = _expand(environ.get("HF_HOME") or
                          os.path.join(environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface"))
        cache_dir = _expand(environ.get("HF_HUB_CACHE") or environ.get("HUGGINGFACE_HUB_CACHE") or
                            str(hf_home / "hub"))
        token, token_source = _clean_token(environ.get("HF_TOKEN")), "HF_TOKEN"
        if token is None:
            token, token_source = _clean_token(environ.get("HUGGING_FACE_HUB_TOKEN")), "HUGGING_FACE_HUB_TOKEN"
        if token is None:
            token_path = _expand(environ.get("HF_TOKEN_PATH") or str(hf_home / "token"))
            try:
                token, token_source = _clean_token(token_path.read_text(encoding="utf-8")), str(token_path)
            except (OSError, UnicodeDecodeError):
                token = None
        offline = (environ.get("HF_HUB_OFFLINE") or environ.get("TRANSFORMERS_OFFLINE") or "").strip().upper()
        proxies: dict[str, str] = {}
        for name in sorted(environ, key=lambda n: n.islower()):  # a lower-case variable wins, as in urllib
            if name.lower().endswith("_proxy") and environ[name].strip():
                proxies[name.lower()[:-len("_proxy")]] = environ[name].strip()
        return cls(endpoint=(environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).strip().rstrip("/"),
                   token=token, offline=offline in TRUE_VALUES, cache_dir=cache_dir,
                   token_source=token_source if token else "",
                   metadata_timeout_s=_seconds(environ.get("HF_HUB_ETAG_TIMEOUT")),
                   download_timeout_s=_seconds(environ.get("HF_HUB_DOWNLOAD_TIMEOUT")),
                   proxies=tuple(sorted(proxies.items())))


def _expand(path: str) -> Path:
    return Path(os.path.expanduser(path.strip()))


def _clean_token(text: str | None) -> str | None:
    """As huggingface_hub reads a token: line breaks anywhere removed, then spaces at the ends."""
    return (text or "").replace("\r", "").replace("\n", "").strip() or None


def _seconds(text: str | None) -> float:
    """huggingface_hub ignores a timeout variable that is not a whole number; so does this."""
    try:
        value = int((text or "").strip())
    except ValueError:
        return DEFAULT_TIMEOUT_S
    return float(value) if value > 0 else DEFAULT_TIMEOUT_S


def parse_repo_id(text: str) -> tuple[str, str] | None:
    """'org/name' or 'org/name@revision' -> (repo_id, revision), revision 'main' by default; None when `text` is not
    shaped like a Hub id, as a local path is not ('/x', './x', '~/x', 'a/b/c', a name without '/'). The characters
    are checked as huggingface_hub checks them: each part 1-96 letters, digits, '-', '_', '.', starting and ending
    with a letter, digit or '_', no '--' or '..', not ending in '.git'. A revision is a branch, tag or commit:
    letters, digits, '-', '_', '.', '/', no '..' or '//'. A relative directory shaped like an id ('models/x') is the
    caller's to tell apart (an existing directory wins, say)."""
    repo_id, at, revision = text.partition("@")
    if at and not revision:
        return None
    revision = revision or DEFAULT_REVISION
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(_REPO_PART.fullmatch(part) for part in parts):
        return None
    if "--" in repo_id or ".." in repo_id or repo_id.endswith(".git"):
        return None
    if not _REVISION.fullmatch(revision) or ".." in revision or "//" in revision:
        return None
    return repo_id, revision


def check_repo_file(path: str) -> str:
    """A file path inside a repo ('openvino/openvino_model.xml'), or ValueError saying what is wrong with it."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{path!r} is not a relative path inside a repo (like openvino/openvino_model.xml)")
    if any(ch == "\\" or ord(ch) < 32 or ord(ch) == 127 for ch in path):
        raise ValueError(f"{path!r} has a backslash or a control character")
    return path


def repo_folder_name(repo_id: str) -> str:
    """The cache folder of a model repo, as huggingface_hub names it: 'org/name' -> 'models--org--name'."""
    return "--".join(["models", *repo_id.split("/")])


def weights_file(ir_file: str) -> str:
    """The weights of an IR: 'openvino/openvino_model.xml' -> 'openvino/openvino_model.bin'."""
    return ir_file[:-len(".xml")] + ".bin"


# ---------------------------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class FetchedModel:
    repo_id: str
    revision: str  # as asked: 'main', a tag, or a commit
    commit: str  # the 40-hex commit served
    snapshot: Path  # cache_dir/models--org--name/snapshots/<commit>
    ir_file: str  # the chosen IR's path inside the repo (e.g. 'openvino/openvino_model_qint8_quantized.xml')
    from_cache_only: bool  # True when nothing was contacted (offline, Hub unreachable, or a pinned commit cached)
    cache_note: str = ""  # when from_cache_only: why, in one line (also passed to on_progress)


def fetch_model(repo_id: str, revision: str, ir_candidates: Sequence[str], required: Sequence[str],
                optional: Sequence[str], settings: HubSettings,
                on_progress: Callable[[str], None] | None = None) -> FetchedModel:
    """Pick the first of `ir_candidates` (.xml paths) that the repo has and fetch it, its .bin, every `required` file
    (one missing is an error) and every `optional` file that exists (one missing is remembered in
    `.no_exist/<commit>/<path>`, as huggingface_hub does, and not asked for again). Files already cached are not
    downloaded again. `on_progress(line)` gets one line per download started, then at most one line per
    `settings.progress_interval_s` while it runs, and a line saying why when the cache is used without asking the
    Hub; this function prints nothing. Every failure is a StartupError with one line and an exit code (SPEC.md).
    `on_progress` may raise (StartupCancelled, say, when a signal asks startup to stop): the exception ends the fetch
    at once, a partial download is kept for the next start and its lock is released."""
    for path in (*ir_candidates, *required, *optional):
        try:
            check_repo_file(path)
        except ValueError as exc:
            raise StartupError(f"bad file name for {repo_id}: {exc}", EXIT_CONFIG) from None
    if not ir_candidates or not all(path.endswith(".xml") for path in ir_candidates):
        raise StartupError(f"the IR files to look for in {repo_id} must be .xml paths: {list(ir_candidates)}",
                           EXIT_CONFIG)
    endpoint = urllib.parse.urlsplit(settings.endpoint)
    if endpoint.scheme not in ("http", "https") or not endpoint.hostname:
        raise StartupError(f"HF_ENDPOINT {settings.endpoint!r} is not an http(s) URL (like https://huggingface.co)",
                           EXIT_CONFIG)
    return _Fetch(repo_id, revision, settings, on_progress).run(ir_candidates, required, optional)


# ---------------------------------------------------------------------------------------------- the fetch


PRESENT, ABSENT, UNKNOWN = "present", "absent", "unknown"


@dataclass(frozen=True)
class _Metadata:
    """What a HEAD of `resolve/<revision>/<path>` said: huggingface_hub's HfFileMetadata."""

    commit: str
    etag: str
    size: int | None
    location: str  # where to GET it: the resolve URL, or the CDN URL it redirected to


class _Unreachable(Exception):
    """The Hub (or its CDN) could not be reached or answered 429/5xx: something that may pass by itself."""


class _Cut(Exception):
    """A download ended before its last byte; the partial file is kept. Worth retrying at once when the attempt
    got somewhere (bytes arrived, or the partial file was found unusable and truncated)."""

    def __init__(self, message: str, worth_retrying: bool):
        super().__init__(message)
        self.worth_retrying = worth_retrying


class _KeepAll(urllib.request.HTTPErrorProcessor):
    """Hand every response back as it is: redirects are followed by `_Fetch._request`, whose rules (which hosts,
    which headers) urllib's redirect handler does not know."""

    def http_response(self, request, response):
        return response

    https_response = http_response


class _Fetch:
    def __init__(self, repo_id: str, revision: str, settings: HubSettings,
                 on_progress: Callable[[str], None] | None):
        self.repo_id, self.revision, self.settings = repo_id, revision, settings
        self.progress = on_progress or (lambda line: None)
        self.name = f"{repo_id}@{revision}"
        self.repo_dir = settings.cache_dir / repo_folder_name(repo_id)
        self.lock_dir = settings.cache_dir / ".locks" / repo_folder_name(repo_id)
        self.commit: str | None = _COMMIT.fullmatch(revision) and revision or None
        self.hub_answered = False  # once the Hub has answered, a network failure no longer falls back to the cache

    # ---- the three ways: offline, online, and the cache when the Hub cannot be reached

    def run(self, ir_candidates, required, optional) -> FetchedModel:
        if self.settings.offline:
            return self._from_cache(ir_candidates, required, None)
        if self.commit is not None:  # a pinned commit never changes: a complete snapshot needs no request
            ir, _ = self._cached_ir(self.commit, ir_candidates, required, optional, strict=True)
            if ir is not None:
                return self._cached_result(self.commit, ir, f"commit {self.commit} is pinned and completely cached: "
                                                            f"the Hub was not contacted")
        try:
            return self._fetch_online(ir_candidates, required, optional)
        except _Unreachable as exc:
            if self.hub_answered:
                raise StartupError(f"{exc}; the next start tries again", EXIT_DOWNLOAD) from None
            return self._from_cache(ir_candidates, required, str(exc))

    def _from_cache(self, ir_candidates, required, unreachable: str | None) -> FetchedModel:
        commit = self._cached_commit()
        ir, missing = (None, "no snapshot of it") if commit is None else \
            self._cached_ir(commit, ir_candidates, required, (), strict=False)
        if unreachable is None:
            if ir is None:
                raise StartupError(f"HF_HUB_OFFLINE is set and {self.name} is not in the Hub cache "
                                   f"{self.settings.cache_dir} ({missing}). To go on: unset HF_HUB_OFFLINE and start "
                                   f"once with network access (HF_ENDPOINT for a mirror); or "
                                   f"{self._bring_it_here()}", EXIT_MODEL)
            note = f"HF_HUB_OFFLINE is set: {self.name} (commit {commit}) is served from the cache"
        else:
            if ir is None:
                raise StartupError(f"{unreachable}, and {self.name} is not in the Hub cache {self.settings.cache_dir}"
                                   f" ({missing}). To go on: check the network and the proxy ({self._proxy_note()}); "
                                   f"or set HF_ENDPOINT to a mirror (now {self.settings.endpoint}); or "
                                   f"{self._bring_it_here()}; under systemd the next start tries again",
                                   EXIT_DOWNLOAD)
            note = f"{unreachable}: {self.name} (commit {commit}) is served from the cache"
        return self._cached_result(commit, ir, note)

    def _bring_it_here(self) -> str:
        """The ways to a model that is not cached without this process reaching the Hub: fetched on another machine
        and copied (the cache's links are relative, so the folder moves as it is), or a local export."""
        revision = "" if self.revision == DEFAULT_REVISION else f" --revision {self.revision}"
        return (f"run `hf download {self.repo_id}{revision}` where the Hub is reachable and copy its folder "
                f"{repo_folder_name(self.repo_id)} into {self.settings.cache_dir} here (from that machine's Hub cache; "
                f"cp -a keeps the links); or serve a local export with --model DIR (to try the service only: the demo "
                f"model, README \"Setup\")")

    def _proxy_note(self) -> str:
        """Whether a proxy is set for the endpoint's scheme; never its URL, which may hold credentials."""
        scheme = urllib.parse.urlsplit(self.settings.endpoint).scheme
        return f"{scheme}_proxy is set" if dict(self.settings.proxies).get(scheme) else f"no {scheme}_proxy is set"

    def _cached_result(self, commit: str, ir: str, note: str) -> FetchedModel:
        self.progress(note)
        return FetchedModel(self.repo_id, self.revision, commit, self.repo_dir / "snapshots" / commit, ir, True, note)

    def _fetch_online(self, ir_candidates, required, optional) -> FetchedModel:
        ir = next((path for path in ir_candidates if self._ensure(path)), None)
        if ir is None:
            raise StartupError(f"{self._described()} has none of the IR files tried ({', '.join(ir_candidates)}): "
                               f"export one with `optimum-cli export openvino --model {self.repo_id} --task "
                               f"text-classification DIR` and start with --model DIR, or name the IR inside the repo "
                               f"with --model-file", EXIT_MODEL)
        if not self._ensure(weights_file(ir)):
            raise StartupError(f"{self._described()} has {ir} but not its weights {weights_file(ir)}", EXIT_MODEL)
        for path in required:
            if not self._ensure(path):
                raise StartupError(f"{self._described()} has no {path}, which the model needs", EXIT_MODEL)
        for path in optional:
            self._ensure(path)
        assert self.commit is not None  # every file found came with its commit
        self._write_ref(self.commit)
        return FetchedModel(self.repo_id, self.revision, self.commit, self.repo_dir / "snapshots" / self.commit,
                            ir, False)

    def _described(self) -> str:
        if self.commit is None or self.commit == self.revision:
            return self.name
        return f"{self.name} (commit {self.commit[:12]})"

    # ---- one file

    def _ensure(self, path: str) -> bool:
        """True when `path` is in the snapshot (it was, or it is now), False when the repo has no such file."""
        if self.commit is not None:
            state = self._cached_state(self.commit, path)
            if state != UNKNOWN:
                return state == PRESENT
        metadata = self._head(path)
        if metadata is None:
            return False
        self._store(path, metadata)
        return True

    def _head(self, path: str) -> _Metadata | None:
        """The file's metadata (huggingface_hub's get_hf_file_metadata), or None when the repo has no such file.
        Asked at the commit once it is known, so that every file comes from one commit even if the branch moves."""
        revision = self.commit or self.revision
        url = (f"{self.settings.endpoint}/{self.repo_id}/resolve/{urllib.parse.quote(revision, safe='')}/"
               f"{urllib.parse.quote(path)}")
        url, response = self._request("HEAD", url, self.settings.metadata_timeout_s, follow_other_hosts=False)
        response.close()
        status, headers = response.status, response.headers
        code, message = headers.get("X-Error-Code"), headers.get("X-Error-Message") or ""
        if status == 429 or status >= 500:
            raise _Unreachable(f"the Hub at {self.settings.endpoint} answered {status} {response.reason} for "
                               f"{path} of {self.repo_id}")
        self.hub_answered = True
        if 200 <= status < 300 or status in _REDIRECTS:
            return self._metadata(url, response, path)
        if code == "EntryNotFound" or (status == 404 and code is None):
            commit = headers.get("X-Repo-Commit", "")
            if _COMMIT.fullmatch(commit):
                self.commit = self.commit or commit
                if code is not None:  # a plain 404 (some mirrors) is not proof enough to remember
                    self._mark_absent(self.commit, path)
            return None
        raise self._refusal(status, code, message)

    def _metadata(self, url: str, response, path: str) -> _Metadata:
        headers = response.headers
        commit = headers.get("X-Repo-Commit", "")
        etag = (headers.get("X-Linked-Etag") or headers.get("ETag") or "").strip()
        etag = etag[2:] if etag.startswith("W/") else etag
        etag = etag.strip('"')
        if not _COMMIT.fullmatch(commit) or not _ETAG.fullmatch(etag):
            what = "X-Repo-Commit" if not _COMMIT.fullmatch(commit) else "ETag"
            raise StartupError(f"{url} answered {response.status} without a usable {what} header, so "
                               f"{self.settings.endpoint} does not serve like the Hugging Face Hub: check HF_ENDPOINT "
                               f"and any proxy in between", EXIT_MODEL)
        redirected = response.status in _REDIRECTS and bool(headers.get("Location"))
        size = _integer(headers.get("X-Linked-Size"))
        if size is None and not redirected:
            size = _integer(headers.get("Content-Length"))
        location = urllib.parse.urljoin(url, headers["Location"]) if redirected else url
        self.commit = self.commit or commit
        return _Metadata(self.commit, etag, size, location)

    def _refusal(self, status: int, code: str | None, message: str) -> StartupError:
        page = f"{self.settings.endpoint}/{self.repo_id}"
        token = f"the token from {self.settings.token_source}" if self.settings.token else None
        said = f"{status}" + (f": {message}" if message else "")
        if code == "RevisionNotFound":
            return StartupError(f"{self.repo_id} has no revision {self.revision!r} (a branch, tag or commit; the Hub "
                                f"answered {said})", EXIT_MODEL)
        if code == "GatedRepo":
            if token:
                return StartupError(f"{self.repo_id} is gated and {token} has no access to it: accept its terms at "
                                    f"{page} with that token's account (the Hub answered {said})", EXIT_MODEL)
            return StartupError(f"{self.repo_id} is gated: accept its terms at {page} and set HF_TOKEN to an access "
                                f"token of that account (the Hub answered {said})", EXIT_MODEL)
        if status == 401 and token and (code is None or "credentials" in message.lower()):
            return StartupError(f"the Hub refused {token} (it answered {said}): check the token, or unset it for a "
                                f"public repo", EXIT_MODEL)
        if code == "RepoNotFound" or status in (401, 404):
            sent = f" ({token} was sent)" if token else \
                "; a private repo needs HF_TOKEN set to a token that can read it"
            return StartupError(f"no repository {self.repo_id} on {self.settings.endpoint}, or no access to it"
                                f"{sent} (the Hub answered {said})", EXIT_MODEL)
        if status == 403:
            fix = f"check what {token} may read" if token else "set HF_TOKEN to a token that may read it"
            return StartupError(f"the Hub refused access to {self.repo_id} ({said}): {fix}", EXIT_MODEL)
        return StartupError(f"the Hub at {self.settings.endpoint} answered {said} for {self.repo_id}; the next start "
                            f"tries again", EXIT_DOWNLOAD)

    # ---- storing a file in the cache

    def _store(self, path: str, metadata: _Metadata) -> None:
        pointer = self.repo_dir / "snapshots" / metadata.commit / path
        blob = self.repo_dir / "blobs" / metadata.etag
        if pointer.is_file():
            return
        try:
            for directory in (blob.parent, pointer.parent, self.lock_dir):
                directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._cache_error(exc) from None
        _write_cachedir_tag(self.settings.cache_dir)
        with self._lock(metadata.etag, path):
            if not blob.is_file():
                self._download(path, metadata, blob)
            self._link(blob, pointer)

    def _download(self, path: str, metadata: _Metadata, blob: Path) -> None:
        partial = blob.with_name(blob.name + ".incomplete")
        for attempt in range(1, MAX_ATTEMPTS_PER_FILE + 1):
            try:
                self._transfer(path, metadata, partial)
                break
            except _Cut as cut:
                if not cut.worth_retrying or attempt == MAX_ATTEMPTS_PER_FILE:
                    raise StartupError(f"{cut}; the partial download is kept and the next start resumes it",
                                       EXIT_DOWNLOAD) from None
                self.progress(f"{cut}; resuming")
        try:
            mismatch = _verify(partial, metadata.etag, metadata.size)
        except OSError as exc:
            raise self._cache_error(exc) from None
        if mismatch:
            partial.unlink(missing_ok=True)
            raise StartupError(f"{path} of {self.repo_id} does not match its checksum ({mismatch}); the bad download "
                               f"was deleted and the next start fetches it again", EXIT_DOWNLOAD)
        if not (_SHA256.fullmatch(metadata.etag) or _COMMIT.fullmatch(metadata.etag)):
            self.progress(f"{path}: its ETag {metadata.etag} is neither a sha256 nor a git sha1, so only its size "
                          f"could be checked")
        try:
            os.replace(partial, blob)
        except OSError as exc:
            raise self._cache_error(exc) from None

    def _transfer(self, path: str, metadata: _Metadata, partial: Path) -> None:
        """One GET into `partial`, from where it ends (Range) when it has bytes already. Raises _Cut when the body
        ends early; starts over when the server ignores the Range (200) or cannot satisfy it (416)."""
        try:
            offset = partial.stat().st_size if partial.exists() else 0
        except OSError as exc:
            raise self._cache_error(exc) from None
        if metadata.size is not None and offset > metadata.size:
            offset = self._truncate(partial)
        if metadata.size is not None and offset == metadata.size:
            return
        self._check_free_space(partial, metadata.size, offset)
        host = urllib.parse.urlsplit(metadata.location).hostname
        extra = {"Range": f"bytes={offset}-"} if offset else {}
        url, response = self._request("GET", metadata.location, self.settings.download_timeout_s, extra,
                                      follow_other_hosts=True)
        with response:
            status = response.status
            if status == 416 and offset:  # the partial file is longer than the file: it cannot be ours
                self._truncate(partial)
                raise _Cut(f"the server could not resume {path} at byte {offset}", True)
            if status not in (200, 206):
                if status == 429 or status >= 500:
                    raise _Unreachable(f"{host} answered {status} {response.reason} for {path} of {self.repo_id}")
                raise StartupError(f"{host} refused the download of {path} of {self.repo_id} ({status} "
                                   f"{response.reason}); the next start asks the Hub again", EXIT_DOWNLOAD)
            if status == 206 and _content_range_start(response.headers.get("Content-Range")) != offset:
                self._truncate(partial)
                raise _Cut(f"the server answered the resumption of {path} at byte {offset} with another range",
                           True)
            if status == 200 and offset:  # the server ignored the Range header: start over with this answer
                offset = self._truncate(partial)
            length = _integer(response.headers.get("Content-Length"))
            total = metadata.size if metadata.size is not None else (None if length is None else offset + length)
            if offset:
                self.progress(f"resuming {path} at {_of(offset, total)} from {host}")
            else:
                self.progress(f"downloading {path} ({_of(None, total)}) from {host}")
            received = self._receive(path, response, partial, offset, total)
        if total is not None and offset + received < total:
            raise _Cut(f"the download of {path} from {host} ended at {_of(offset + received, total)}", received > 0)

    def _receive(self, path: str, response, partial: Path, offset: int, total: int | None) -> int:
        received, last_line = 0, time.monotonic()
        try:
            out = open(partial, "ab")
        except OSError as exc:
            raise self._cache_error(exc) from None
        with out:
            while True:
                try:
                    chunk = response.read(CHUNK_BYTES)
                except (OSError, http.client.HTTPException) as exc:
                    raise _Cut(f"the download of {path} was cut at {_of(offset + received, total)} "
                               f"({_reason(exc, self.settings.download_timeout_s)})", received > 0) from None
                if not chunk:
                    return received
                try:
                    _append(out, chunk)
                except OSError as exc:
                    needed = None if total is None else total - offset - received
                    raise self._cache_error(exc, needed) from None
                received += len(chunk)
                now = time.monotonic()
                if now - last_line >= self.settings.progress_interval_s:
                    self.progress(f"downloading {path}: {_of(offset + received, total)}")
                    last_line = now

    def _truncate(self, partial: Path) -> int:
        try:
            with open(partial, "r+b") as f:
                f.truncate(0)
        except OSError as exc:
            raise self._cache_error(exc) from None
        return 0

    def _check_free_space(self, partial: Path, size: int | None, offset: int) -> None:
        if size is None:
            return
        try:
            free = shutil.disk_usage(partial.parent).free
        except OSError:
            return
        if free < size - offset:
            raise self._cache_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(partial)), size - offset)

    def _link(self, blob: Path, pointer: Path) -> None:
        """snapshots/<commit>/<path> -> ../../blobs/<etag> (one more '..' per directory in <path>), relative as
        huggingface_hub's _create_symlink makes it, so that the cache can be moved."""
        target = os.path.relpath(blob, pointer.parent)
        try:
            pointer.unlink(missing_ok=True)
            os.symlink(target, pointer)
        except FileExistsError:  # made by another process between the two calls
            if os.path.realpath(pointer) != os.path.realpath(blob):
                raise StartupError(f"{pointer} appeared while it was written and is not a link to {blob}",
                                   EXIT_DOWNLOAD) from None
        except OSError as exc:
            raise self._cache_error(exc) from None

    @contextmanager
    def _lock(self, etag: str, path: str) -> Iterator[None]:
        """`.locks/models--org--name/<etag>.lock`, locked with flock as huggingface_hub's filelock does, so that one
        process at a time writes a blob (this service or huggingface_hub)."""
        lock_path = self.lock_dir / f"{etag}.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o664)
        except OSError as exc:
            raise self._cache_error(exc) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.progress(f"waiting for another process that is downloading {path} (it holds {lock_path})")
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                # A filesystem without flock (some network mounts): go on unlocked, as huggingface_hub does; a
                # download mixed up by two writers fails its checksum and is deleted.
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise self._cache_error(exc) from None
            yield
        finally:
            os.close(fd)

    def _write_ref(self, commit: str) -> None:
        """refs/<revision> holds the commit (no newline), written only when it changes and never for a commit."""
        if self.revision == commit:
            return
        ref = self.repo_dir / "refs" / self.revision
        try:
            if ref.is_file() and ref.read_text(encoding="utf-8") == commit:
                return
            ref.parent.mkdir(parents=True, exist_ok=True)
            temporary = ref.with_name(f"{ref.name}.{os.getpid()}.tmp")
            temporary.write_text(commit, encoding="utf-8")
            os.replace(temporary, ref)
        except OSError as exc:
            raise self._cache_error(exc) from None

    def _mark_absent(self, commit: str, path: str) -> None:
        """`.no_exist/<commit>/<path>`, huggingface_hub's record that the repo has no such file at that commit.
        Best effort, as there: a cache that cannot take it only costs a request next time."""
        marker = self.repo_dir / ".no_exist" / commit / path
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError:
            pass

    def _cache_error(self, exc: OSError, needed: int | None = None) -> StartupError:
        where = self.settings.cache_dir
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            need = "" if needed is None else f": {needed} more bytes ({_of(None, needed)}) are needed"
            return StartupError(f"no space left for the Hub cache {where}{need}; free some, or set HF_HUB_CACHE to a "
                                f"larger disk (a partial download is kept and resumed)", EXIT_DOWNLOAD)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST):
            return StartupError(f"cannot write the Hub cache {where} ({exc.strerror}: {exc.filename}): make it "
                                f"writable for this user, or set HF_HUB_CACHE to a directory that is", EXIT_MODEL)
        return StartupError(f"cannot write the Hub cache {where} ({exc.strerror or exc}: {exc.filename}); the next "
                            f"start tries again", EXIT_DOWNLOAD)

    # ---- reading the cache

    def _cached_commit(self) -> str | None:
        if _COMMIT.fullmatch(self.revision):
            return self.revision
        try:
            commit = (self.repo_dir / "refs" / self.revision).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return commit if _COMMIT.fullmatch(commit) else None

    def _cached_state(self, commit: str, path: str) -> str:
        try:
            if (self.repo_dir / "snapshots" / commit / path).is_file():  # a link to a blob that exists
                return PRESENT
            if (self.repo_dir / ".no_exist" / commit / path).is_file():
                return ABSENT
        except OSError as exc:
            raise StartupError(f"cannot read the Hub cache {self.settings.cache_dir} ({exc.strerror}: "
                               f"{exc.filename}): make it readable for this user, or set HF_HUB_CACHE to another "
                               f"directory", EXIT_MODEL) from None
        return UNKNOWN

    def _cached_ir(self, commit: str, ir_candidates, required, optional, strict: bool) -> tuple[str | None, str]:
        """The IR to serve from snapshot `commit` and '', or None and what is missing. Strict (no request at all
        for a pinned commit): the IR is the one the Hub would give, so every candidate before it must be known to be
        absent, and every optional file known one way or the other. Otherwise the first cached candidate serves."""
        ir = None
        for path in ir_candidates:
            state = self._cached_state(commit, path)
            if state == PRESENT:
                ir = path
                break
            if state == UNKNOWN and strict:
                return None, f"{path} is not known"
        if ir is None:
            return None, f"commit {commit} has none of {', '.join(ir_candidates)}"
        for path in (weights_file(ir), *required):
            if self._cached_state(commit, path) != PRESENT:
                return None, f"commit {commit} lacks {path}"
        if any(self._cached_state(commit, path) == UNKNOWN for path in optional):
            return None, "an optional file is not known"
        return ir, ""

    # ---- HTTP

    def _request(self, method: str, url: str, timeout: float, extra: Mapping[str, str] | None = None,
                 follow_other_hosts: bool = False):
        """Send `method` and follow redirects: within one host always (the Hub's relative redirects of renamed
        repos), to other hosts only when `follow_other_hosts` (a download; a HEAD stops at the CDN's redirect, which
        carries the metadata). The token goes only to the endpoint's own host, never to a CDN. Returns the final
        URL and the response, whatever its status; network failures raise _Unreachable."""
        endpoint = _origin(self.settings.endpoint)
        for _ in range(MAX_REDIRECTS + 1):
            headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **(extra or {})}
            if self.settings.token and _origin(url) == endpoint:
                headers["Authorization"] = f"Bearer {self.settings.token}"
            request = urllib.request.Request(url, method=method, headers=headers)
            try:
                response = self._opener(url).open(request, timeout=timeout)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                host = urllib.parse.urlsplit(url).netloc
                where = "the Hub" if _origin(url) == endpoint else "the download host"
                raise _Unreachable(f"cannot reach {where} {host} ({_reason(exc, timeout)})") from None
            location = response.headers.get("Location")
            if response.status not in _REDIRECTS or not location:
                return url, response
            target = urllib.parse.urljoin(url, location)
            if not follow_other_hosts and _origin(target) != _origin(url):
                return url, response
            response.close()
            url = target
        raise _Unreachable(f"more than {MAX_REDIRECTS} redirects from {url}")

    def _opener(self, url: str) -> urllib.request.OpenerDirector:
        proxies = dict(self.settings.proxies)
        host = urllib.parse.urlsplit(url).netloc
        if proxies.get("no") and urllib.request.proxy_bypass_environment(host, proxies):
            proxies = {}
        proxies.pop("no", None)
        return urllib.request.build_opener(urllib.request.ProxyHandler(proxies), _KeepAll)


# ---------------------------------------------------------------------------------------------- helpers


def _append(out, chunk: bytes) -> None:
    """Write one chunk of a download (tests replace it to simulate a full disk)."""
    out.write(chunk)


def _verify(path: Path, etag: str, size: int | None) -> str:
    """'' when the file is what the ETag says, else what differs. A 64-hex ETag is the sha256 of an LFS file, a
    40-hex one the git blob sha1 of a regular file; any other ETag (some mirrors) can only be checked by size."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return f"{actual_size} bytes where the Hub announced {size}"
    if _SHA256.fullmatch(etag):
        digest, kind = hashlib.sha256(), "sha256"
    elif _COMMIT.fullmatch(etag):
        digest, kind = hashlib.sha1(b"blob %d\0" % actual_size), "git sha1"
    else:
        return ""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    got = digest.hexdigest()
    return "" if got == etag else f"{kind} {got} where the Hub's ETag is {etag}"


def _write_cachedir_tag(cache_dir: Path) -> None:
    tag = cache_dir / "CACHEDIR.TAG"
    if not tag.exists():
        try:
            tag.write_text(CACHEDIR_TAG, encoding="utf-8")
        except OSError:
            pass


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    try:
        port = parts.port or default
    except ValueError:
        port = None
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def _integer(text: str | None) -> int | None:
    text = (text or "").strip()
    return int(text) if text.isdigit() and text.isascii() else None


def _content_range_start(text: str | None) -> int | None:
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", text or "")
    return int(match.group(1)) if match else None


def _reason(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host: {exc.strerror}"
    if isinstance(exc, http.client.IncompleteRead):
        return "the connection closed early"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _of(done: int | None, total: int | None) -> str:
    """'12.3 of 22.7 MB', '12.3 MB' (total unknown), '22.7 MB' (no `done`), 'size unknown'; kB or bytes when the
    size is smaller."""
    scale = max(n for n in (done, total, 0) if n is not None)
    unit, div, digits = ("MB", 1e6, 1) if scale >= 1e6 else ("kB", 1e3, 1) if scale >= 1e4 else ("bytes", 1, 0)

    def num(n: int) -> str:
        return f"{n / div:.{digits}f}"

    if total is None:
        return "size unknown" if done is None else f"{num(done)} {unit}"
    return f"{num(total)} {unit}" if done is None else f"{num(done)} of {num(total)} {unit}"
