"""Fetching a ready OpenVINO IR from the Hugging Face Hub into its cache, with huggingface_hub.

huggingface_hub resolves, downloads, resumes, locks and lays out the cache (SPEC.md, "Fetching a model from the
Hub"): a model that `hf download` or transformers fetched is used from there, and the other way round. This module
adds what the library does not do: it fetches only the IR the service will serve, never the repo's other weights;
checks every download against the Hub's checksum (the library does not hash plain-HTTP downloads); turns progress
into lines; lets a signal stop a download at once; serves the cache when the Hub cannot be reached; and says every
failure in one line with its exit code. huggingface_hub is imported only when a model is fetched.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import EXIT_CONFIG, EXIT_DOWNLOAD, EXIT_MODEL, StartupCancelled, StartupError

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_REVISION = "main"
DEFAULT_TIMEOUT_S = 10.0  # huggingface_hub's default for HF_HUB_ETAG_TIMEOUT
TRUE_VALUES = ("1", "ON", "YES", "TRUE")  # what huggingface_hub accepts as "on" in HF_HUB_OFFLINE
LIBRARY = {"library_name": "openvino-reranker", "library_version": __version__}  # the User-Agent's first part

_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# One part of a repo id, as huggingface_hub's validate_repo_id but ASCII only: 1-96 letters, digits, '_', '-', '.',
# starting and ending with a letter, digit or '_'.
_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")
_REVISION = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_./-]{0,253}[A-Za-z0-9_])?")


# ---------------------------------------------------------------------------------------------- settings and names


@dataclass(frozen=True)
class HubSettings:
    """Where the Hub is, the token and the cache: the variables huggingface_hub reads, read from the environment
    main() was given and passed to the library explicitly. HF_HUB_DOWNLOAD_TIMEOUT the library reads itself."""

    endpoint: str  # HF_ENDPOINT, default https://huggingface.co, trailing slash stripped
    token: str | None  # HF_TOKEN, else the file HF_TOKEN_PATH, else $HF_HOME/token
    offline: bool  # HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is 1, ON, YES or TRUE, in any case
    cache_dir: Path  # HF_HUB_CACHE, else $HF_HOME/hub; HF_HOME defaults to $XDG_CACHE_HOME/huggingface, ~/.cache/...
    token_source: str = ""  # where the token came from, for messages: "HF_TOKEN" or the token file's path
    metadata_timeout_s: float = DEFAULT_TIMEOUT_S  # HF_HUB_ETAG_TIMEOUT: the listing and each file's metadata
    proxied_schemes: tuple[str, ...] = ()  # schemes an *_proxy variable is set for (for messages; never its URL)
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
        timeout = (environ.get("HF_HUB_ETAG_TIMEOUT") or "").strip()
        proxied = {name.lower()[:-len("_proxy")] for name, value in environ.items()
                   if name.lower().endswith("_proxy") and value.strip()} - {"no"}
        return cls(endpoint=(environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).strip().rstrip("/"),
                   token=token, offline=offline in TRUE_VALUES, cache_dir=cache_dir,
                   token_source=token_source if token else "",
                   metadata_timeout_s=float(timeout) if timeout.isdigit() and int(timeout) else DEFAULT_TIMEOUT_S,
                   proxied_schemes=tuple(sorted(proxied)))


def _expand(path: str) -> Path:
    return Path(os.path.expanduser(path.strip()))


def _clean_token(text: str | None) -> str | None:
    """As huggingface_hub reads a token: line breaks anywhere removed, then spaces at the ends."""
    return (text or "").replace("\r", "").replace("\n", "").strip() or None


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


def beside(ir_file: str, names: Sequence[str]) -> tuple[str, ...]:
    """Files in the IR's folder: ('openvino/openvino_model.xml', ['a.json']) -> ('openvino/a.json',)."""
    folder = ir_file.rpartition("/")[0]
    return tuple(f"{folder}/{name}" if folder else name for name in names)


# ---------------------------------------------------------------------------------------------- the fetch


@dataclass(frozen=True)
class FetchedModel:
    repo_id: str
    revision: str  # as asked: 'main', a tag, or a commit
    commit: str  # the 40-hex commit served
    snapshot: Path  # cache_dir/models--org--name/snapshots/<commit>
    ir_file: str  # the chosen IR's path inside the repo (e.g. 'openvino/openvino_model_qint8_quantized.xml')
    from_cache_only: bool  # True when nothing was contacted (offline, Hub unreachable, or a pinned commit cached)
    cache_note: str = ""  # when from_cache_only: why, in one line (also passed to on_progress)


@dataclass(frozen=True)
class _Job:
    repo_id: str
    revision: str
    settings: HubSettings
    report: Callable[[str], None]

    @property
    def name(self) -> str:
        return f"{self.repo_id}@{self.revision}"

    @property
    def repo_dir(self) -> Path:
        return self.settings.cache_dir / repo_folder_name(self.repo_id)


class _Unreachable(Exception):
    """The Hub could not be reached or answered 429/5xx: something that may pass by itself."""


def fetch_model(repo_id: str, revision: str, ir_candidates: Sequence[str], required: Sequence[str],
                optional: Sequence[str], settings: HubSettings,
                on_progress: Callable[[str], None] | None = None, optional_beside_ir: Sequence[str] = (),
                called_for_beside_ir: Callable[[Path], Sequence[str]] = lambda snapshot: ()) -> FetchedModel:
    """Pick the first of `ir_candidates` (.xml paths) that the repo has and fetch it, its .bin, every `required` file
    (one missing is an error) and every `optional` file that exists (and those of `optional_beside_ir` in the IR's
    folder), all at the one commit the revision points to (one request lists them). Then the files in the IR's folder
    that those call for, `called_for_beside_ir(snapshot directory)` (a vision-language model's config.json calls
    for its vision IR), each required: asked of the snapshot once the others are in it, so that no other model
    fetches, or remembers as absent, a file only one kind of model has. Files already cached are not
    downloaded again; absent ones are remembered in `.no_exist/<commit>/` as huggingface_hub remembers them.
    `on_progress(line)` gets one line per download started, then at most one per `settings.progress_interval_s`,
    and a line saying why when the cache is used without asking the Hub; this function prints nothing. Every
    failure is a StartupError with one line and an exit code (SPEC.md). `on_progress` may raise (StartupCancelled,
    say, when a signal asks startup to stop): the exception ends the fetch at once, and so does
    `interrupt_download()` from a signal handler."""
    for path in (*ir_candidates, *required, *optional, *optional_beside_ir):
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
    try:
        from huggingface_hub import constants  # noqa: F401 (read from the process's environment when imported)
    except ValueError as exc:
        raise StartupError(f"huggingface_hub refuses the environment ({exc}): HF_HUB_ETAG_TIMEOUT and "
                           f"HF_HUB_DOWNLOAD_TIMEOUT must be whole seconds", EXIT_CONFIG) from None
    job = _Job(repo_id, revision, settings, on_progress or (lambda line: None))
    if settings.offline:
        return _from_cache(job, ir_candidates, required, None, called_for_beside_ir)
    if _COMMIT.fullmatch(revision):  # a pinned commit never changes: a complete snapshot needs no request
        ir, _ = _cached_ir(job, revision, ir_candidates, required, optional, optional_beside_ir, strict=True,
                           called_for_beside_ir=called_for_beside_ir)
        if ir is not None:
            return _cached_result(job, revision, ir, f"commit {revision} is pinned and completely cached: the Hub "
                                                     f"was not contacted")
    try:
        try:
            commit, files = _list_files(job)
        except _Unreachable as exc:
            return _from_cache(job, ir_candidates, required, str(exc), called_for_beside_ir)
        ir = _choose_ir(job, commit, files, ir_candidates, required)
        optional = (*optional, *beside(ir, optional_beside_ir))
        earlier = ir_candidates[:list(ir_candidates).index(ir)]
        _remember_absent(job, commit, [path for path in (*earlier, *optional) if path not in files])
        for path in (ir, weights_file(ir), *required, *(path for path in optional if path in files)):
            _fetch_file(job, commit, path, files[path])
        for path in _called_for(job, commit, ir, called_for_beside_ir):
            if path not in files:
                raise StartupError(f"{_described(job, commit)} has no {path}, which the model needs", EXIT_MODEL)
            _fetch_file(job, commit, path, files[path])
    except DownloadInterrupted:
        raise StartupCancelled("fetching the model") from None
    _write_ref(job, commit)
    return FetchedModel(repo_id, revision, commit, job.repo_dir / "snapshots" / commit, ir, False)


def _list_files(job: _Job) -> tuple[str, dict[str, int | None]]:
    """The commit the revision points to, and the files there with their sizes: one request, HfApi.model_info."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=job.settings.endpoint, token=job.settings.token or False, **LIBRARY)
    try:
        with _interruptible(object()):
            info = api.model_info(job.repo_id, revision=job.revision, files_metadata=True,
                                  timeout=job.settings.metadata_timeout_s)
    except Exception as exc:
        failure = _failure(job, exc)
        if failure is None:
            raise
        raise failure from None
    if not isinstance(info.sha, str) or not _COMMIT.fullmatch(info.sha) or info.siblings is None:
        raise StartupError(f"{job.settings.endpoint} listed {job.name} without a commit or its files, so it does not "
                           f"serve like the Hugging Face Hub: check HF_ENDPOINT and any proxy in between", EXIT_MODEL)
    return info.sha, {sibling.rfilename: sibling.size for sibling in info.siblings}


def _described(job: _Job, commit: str) -> str:
    return job.name if commit == job.revision else f"{job.name} (commit {commit[:12]})"


def _called_for(job: _Job, commit: str, ir: str, called_for_beside_ir: Callable[[Path], Sequence[str]]
                ) -> tuple[str, ...]:
    """The files in the IR's folder that the snapshot's files call for (`fetch_model`), checked as repo paths."""
    paths = beside(ir, called_for_beside_ir(job.repo_dir / "snapshots" / commit))
    for path in paths:
        try:
            check_repo_file(path)
        except ValueError as exc:
            raise StartupError(f"bad file name for {job.repo_id}: {exc}", EXIT_CONFIG) from None
    return paths


def _choose_ir(job: _Job, commit: str, files: Mapping[str, int | None], ir_candidates: Sequence[str],
               required: Sequence[str]) -> str:
    described = _described(job, commit)
    ir = next((path for path in ir_candidates if path in files), None)
    if ir is None:
        raise StartupError(f"{described} has none of the IR files tried ({', '.join(ir_candidates)}): export one "
                           f"with `optimum-cli export openvino --model {job.repo_id} --task text-classification DIR` "
                           f"and start with --model DIR, or name the IR inside the repo with --model-file", EXIT_MODEL)
    if weights_file(ir) not in files:
        raise StartupError(f"{described} has {ir} but not its weights {weights_file(ir)}", EXIT_MODEL)
    for path in required:
        if path not in files:
            raise StartupError(f"{described} has no {path}, which the model needs", EXIT_MODEL)
    return ir


def _fetch_file(job: _Job, commit: str, path: str, size: int | None) -> None:
    """One file into the cache at `commit` (hf_hub_download), then checked against its checksum."""
    from huggingface_hub import hf_hub_download

    if _cached_state(job, commit, path) == PRESENT:
        return
    _check_free_space(job, size)
    transfer = object()
    try:
        with _interruptible(transfer):
            local = hf_hub_download(job.repo_id, path, revision=commit, cache_dir=job.settings.cache_dir,
                                    endpoint=job.settings.endpoint, token=job.settings.token or False,
                                    etag_timeout=job.settings.metadata_timeout_s,
                                    tqdm_class=_progress_lines(job, path, size, transfer), **LIBRARY)
    except Exception as exc:
        failure = _failure(job, exc, path)
        if failure is None:
            raise
        if isinstance(failure, _Unreachable):  # the Hub answered the listing: the cache is not the way out
            failure = StartupError(f"{failure}; the next start tries again", EXIT_DOWNLOAD)
        raise failure from None
    _check_checksum(job, path, Path(local))


# ---------------------------------------------------------------------------------------------- without the Hub


PRESENT, ABSENT, UNKNOWN = "present", "absent", "unknown"


def _from_cache(job: _Job, ir_candidates, required, unreachable: str | None,
                called_for_beside_ir: Callable[[Path], Sequence[str]] = lambda snapshot: ()) -> FetchedModel:
    commit = _cached_commit(job)
    ir, missing = (None, "no snapshot of it") if commit is None else \
        _cached_ir(job, commit, ir_candidates, required, (), (), strict=False,
                   called_for_beside_ir=called_for_beside_ir)
    where = job.settings.cache_dir
    if ir is None and unreachable is None:
        raise StartupError(f"HF_HUB_OFFLINE is set and {job.name} is not in the Hub cache {where} ({missing}). To "
                           f"go on: unset HF_HUB_OFFLINE and start once with network access (HF_ENDPOINT for a "
                           f"mirror); or {_bring_it_here(job)}", EXIT_MODEL)
    if ir is None:
        raise StartupError(f"{unreachable}, and {job.name} is not in the Hub cache {where} ({missing}). To go on: "
                           f"check the network and the proxy ({_proxy_note(job.settings)}); or set HF_ENDPOINT to a "
                           f"mirror (now {job.settings.endpoint}); or {_bring_it_here(job)}; under systemd the next "
                           f"start tries again", EXIT_DOWNLOAD)
    why = "HF_HUB_OFFLINE is set" if unreachable is None else unreachable
    return _cached_result(job, commit, ir, f"{why}: {job.name} (commit {commit}) is served from the cache")


def _bring_it_here(job: _Job) -> str:
    """The ways to a model that is not cached without this process reaching the Hub: fetched on another machine
    and copied (the cache's links are relative, so the folder moves as it is), or a local export."""
    revision = "" if job.revision == DEFAULT_REVISION else f" --revision {job.revision}"
    return (f"run `hf download {job.repo_id}{revision}` where the Hub is reachable and copy its folder "
            f"{repo_folder_name(job.repo_id)} into {job.settings.cache_dir} here (from that machine's Hub cache; "
            f"cp -a keeps the links); or serve a local export with --model DIR (to try the service only: the demo "
            f"model, README \"Setup\")")


def _proxy_note(settings: HubSettings) -> str:
    """Whether a proxy is set for the endpoint's scheme; never its URL, which may hold credentials."""
    scheme = urllib.parse.urlsplit(settings.endpoint).scheme
    return f"{scheme}_proxy is set" if scheme in settings.proxied_schemes else f"no {scheme}_proxy is set"


def _cached_result(job: _Job, commit: str, ir: str, note: str) -> FetchedModel:
    job.report(note)
    return FetchedModel(job.repo_id, job.revision, commit, job.repo_dir / "snapshots" / commit, ir, True, note)


def _cached_commit(job: _Job) -> str | None:
    if _COMMIT.fullmatch(job.revision):
        return job.revision
    try:
        commit = (job.repo_dir / "refs" / job.revision).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return commit if _COMMIT.fullmatch(commit) else None


def _cached_state(job: _Job, commit: str, path: str) -> str:
    """What huggingface_hub's cache knows of `path` at `commit` (try_to_load_from_cache)."""
    from huggingface_hub import _CACHED_NO_EXIST, try_to_load_from_cache

    try:
        found = try_to_load_from_cache(job.repo_id, path, cache_dir=job.settings.cache_dir, revision=commit)
    except OSError as exc:
        raise StartupError(f"cannot read the Hub cache {job.settings.cache_dir} ({exc.strerror}: {exc.filename}): "
                           f"make it readable for this user, or set HF_HUB_CACHE to another directory",
                           EXIT_MODEL) from None
    return ABSENT if found is _CACHED_NO_EXIST else PRESENT if isinstance(found, str) else UNKNOWN


def _cached_ir(job: _Job, commit: str, ir_candidates, required, optional, optional_beside_ir,
               strict: bool, called_for_beside_ir: Callable[[Path], Sequence[str]] = lambda snapshot: ()
               ) -> tuple[str | None, str]:
    """The IR to serve from snapshot `commit` and '', or None and what is missing. Strict (no request at all
    for a pinned commit): the IR is the one the Hub would give, so every candidate before it must be known to be
    absent, and every optional file known one way or the other. Otherwise the first cached candidate serves."""
    ir = None
    for path in ir_candidates:
        state = _cached_state(job, commit, path)
        if state == PRESENT:
            ir = path
            break
        if state == UNKNOWN and strict:
            return None, f"{path} is not known"
    if ir is None:
        return None, f"commit {commit} has none of {', '.join(ir_candidates)}"
    for path in (weights_file(ir), *required):
        if _cached_state(job, commit, path) != PRESENT:
            return None, f"commit {commit} lacks {path}"
    if any(_cached_state(job, commit, path) == UNKNOWN for path in (*optional, *beside(ir, optional_beside_ir))):
        return None, "an optional file is not known"
    for path in _called_for(job, commit, ir, called_for_beside_ir):  # read from the cached files, as fetched
        if _cached_state(job, commit, path) != PRESENT:
            return None, f"commit {commit} lacks {path}"
    return ir, ""


# ---------------------------------------------------------------------------------------------- what the library leaves


def _remember_absent(job: _Job, commit: str, paths: Sequence[str]) -> None:
    """`.no_exist/<commit>/<path>`: huggingface_hub's record that the repo has no such file at that commit, which it
    writes when asked for one; the listing already says so. Best effort, as there."""
    for path in paths:
        marker = job.repo_dir / ".no_exist" / commit / path
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError:
            pass


def _write_ref(job: _Job, commit: str) -> None:
    """refs/<revision> holds the commit (no newline), as huggingface_hub writes it once it resolved a branch or tag;
    files are fetched at the commit itself, so the library does not write it. Written when the snapshot is complete
    and only when it changes."""
    ref = job.repo_dir / "refs" / job.revision
    try:
        if job.revision == commit or (ref.is_file() and ref.read_text(encoding="utf-8") == commit):
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        temporary = ref.with_name(f"{ref.name}.{os.getpid()}.tmp")
        temporary.write_text(commit, encoding="utf-8")
        os.replace(temporary, ref)
    except OSError as exc:
        raise _cache_error(job, exc) from None


def _check_free_space(job: _Job, size: int | None) -> None:
    """huggingface_hub only warns when the disk is too small for a download; this stops before it starts."""
    where = job.settings.cache_dir
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return
    if size is not None and free < size:
        raise _cache_error(job, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), size)


def _check_checksum(job: _Job, path: str, pointer: Path) -> None:
    """The blob is named by the Hub's ETag for the file: a 64-hex one is the sha256 of an LFS file, a 40-hex one the
    git blob sha1 of a regular file. A blob that does not match is deleted with its link."""
    blob = Path(os.path.realpath(pointer))
    if not (_SHA256.fullmatch(blob.name) or _COMMIT.fullmatch(blob.name)):
        job.report(f"{path}: its ETag {blob.name} is neither a sha256 nor a git sha1, so only its size was checked")
        return
    try:
        if _SHA256.fullmatch(blob.name):
            digest, kind = hashlib.sha256(), "sha256"
        else:
            digest, kind = hashlib.sha1(b"blob %d\0" % blob.stat().st_size), "git sha1"
        with open(blob, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise _cache_error(job, exc) from None
    if digest.hexdigest() != blob.name:
        for file in (pointer, blob):
            file.unlink(missing_ok=True)
        raise StartupError(f"{path} of {job.repo_id} does not match its checksum ({kind} {digest.hexdigest()} where "
                           f"the Hub's ETag is {blob.name}); the bad download was deleted and the next start fetches "
                           f"it again", EXIT_DOWNLOAD)


# ---------------------------------------------------------------------------------------------- progress and signals


_transfers: dict[int, object] = {}  # thread -> the transfer it is waiting on, while nothing is written to the cache


class DownloadInterrupted(KeyboardInterrupt):
    """Raised into a download by `interrupt_download`: huggingface_hub handles it as it handles Ctrl-C (it removes or
    keeps its partial file, and aborts a Xet transfer); fetch_model turns it into StartupCancelled."""


def interrupt_download() -> None:
    """For a signal handler: stop at once the listing or download this thread is waiting on. From the moment the
    last byte arrived (the file is then moved into the cache, linked and checked) it does nothing, so the cache stays
    whole; the next progress line or step sees the stop instead."""
    if threading.get_ident() in _transfers:
        raise DownloadInterrupted


@contextmanager
def _interruptible(transfer: object) -> Iterator[None]:
    thread = threading.get_ident()
    try:
        _transfers[thread] = transfer
        yield
    finally:
        if _transfers.get(thread) is transfer:
            del _transfers[thread]


def _progress_lines(job: _Job, path: str, size: int | None, transfer: object) -> type:
    """A tqdm class for hf_hub_download that draws nothing and says the download's progress in lines. The library
    makes one bar per file (two for a Xet download; the first counts the bytes written): the first one speaks."""
    from huggingface_hub.utils import tqdm

    host = urllib.parse.urlsplit(job.settings.endpoint).hostname
    first: list[object] = []
    last_line = [time.monotonic()]

    class ProgressLines(tqdm):
        monitor_interval = 0  # tqdm starts a monitor thread per bar class, never ended: one per file was left behind

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})
            self.done, self.size = self.n, self.total or size
            if not first:
                first.append(self)
                job.report(f"downloading {path} ({_of(None, self.size)}) from {host}")

        def update(self, n=1):
            self.done += n or 0
            now = time.monotonic()
            if first[0] is self and now - last_line[0] >= job.settings.progress_interval_s:
                last_line[0] = now
                job.report(f"downloading {path}: {_of(self.done, self.size)}")
            return super().update(n)

        def close(self):
            thread = threading.get_ident()
            if _transfers.get(thread) is transfer:  # every byte is in: what follows is not to be interrupted
                del _transfers[thread]
            super().close()

    return ProgressLines


# ---------------------------------------------------------------------------------------------- failures


def _failure(job: _Job, exc: BaseException, path: str | None = None) -> Exception | None:
    """What an exception from huggingface_hub means here: a StartupError with its exit code and what to do next, or
    _Unreachable (the Hub cannot be reached or answers 429/5xx: the cache may serve). None for one that is not the
    library's, the network's or the disk's: a bug, raised as it is. `path`: the file asked for, None for the listing."""
    from huggingface_hub import errors as hub_errors

    if isinstance(exc, hub_errors.LocalEntryNotFoundError) and exc.__cause__ is not None:
        exc = exc.__cause__  # the file's metadata request failed and it is not cached: why it failed
    what = job.repo_id if path is None else f"{path} of {job.repo_id}"
    settings, page = job.settings, f"{job.settings.endpoint}/{job.repo_id}"
    token = f"the token from {settings.token_source}" if settings.token else None
    if isinstance(exc, hub_errors.OfflineModeIsEnabled):
        return _Unreachable("huggingface_hub is in offline mode (HF_HUB_OFFLINE in this process's environment)")
    not_a_hub = isinstance(exc, hub_errors.FileMetadataError) or \
        (path is None and isinstance(exc, (ValueError, KeyError, TypeError)))  # a listing that is not the Hub's JSON
    if not_a_hub:
        return StartupError(f"{settings.endpoint} does not answer for {what} as the Hugging Face Hub does ({exc}): "
                            f"check HF_ENDPOINT and any proxy in between", EXIT_MODEL)
    if _is_http(exc, "TransportError") and path is None:
        host = urllib.parse.urlsplit(settings.endpoint).netloc
        return _Unreachable(f"cannot reach the Hub {host} ({_reason(exc, settings.metadata_timeout_s)})")
    if _is_http(exc, "TransportError"):
        return _Unreachable(f"fetching {what} failed ({_reason(exc, None)})")
    if isinstance(exc, hub_errors.HfHubHTTPError):
        status = exc.response.status_code
        said = f"{status}" + (f": {exc.response.headers.get('X-Error-Message')}"
                              if exc.response.headers.get("X-Error-Message") else "")
        if isinstance(exc, hub_errors.GatedRepoError) and token:
            return StartupError(f"{job.repo_id} is gated and {token} has no access to it: accept its terms at {page} "
                                f"with that token's account (the Hub answered {said})", EXIT_MODEL)
        if isinstance(exc, hub_errors.GatedRepoError):
            return StartupError(f"{job.repo_id} is gated: accept its terms at {page} and set HF_TOKEN to an access "
                                f"token of that account (the Hub answered {said})", EXIT_MODEL)
        if isinstance(exc, hub_errors.RepositoryNotFoundError):
            sent = f" ({token} was sent)" if token else \
                "; a private repo needs HF_TOKEN set to a token that can read it"
            return StartupError(f"no repository {job.repo_id} on {settings.endpoint}, or no access to it{sent} (the "
                                f"Hub answered {said})", EXIT_MODEL)
        if isinstance(exc, hub_errors.RevisionNotFoundError):
            return StartupError(f"{job.repo_id} has no revision {job.revision!r} (a branch, tag or commit; the Hub "
                                f"answered {said})", EXIT_MODEL)
        if isinstance(exc, hub_errors.EntryNotFoundError):
            return StartupError(f"{job.name} has no {path}, though the Hub listed it (it answered {said})", EXIT_MODEL)
        if path is not None and exc.response.request.method == "GET":  # the download itself, not the Hub's answer
            host = urllib.parse.urlsplit(str(exc.response.request.url)).hostname
            return StartupError(f"{host} refused the download of {what} ({said}); the next start asks the Hub again",
                                EXIT_DOWNLOAD)
        if status == 429 or status >= 500:
            return _Unreachable(f"the Hub at {settings.endpoint} answered {said} for {what}")
        if status == 401 and token:
            return StartupError(f"the Hub refused {token} (it answered {said}): check the token, or unset it for a "
                                f"public repo", EXIT_MODEL)
        if status in (401, 403):
            fix = f"check what {token} may read" if token else "set HF_TOKEN to a token that may read it"
            return StartupError(f"the Hub refused access to {job.repo_id} ({said}): {fix}", EXIT_MODEL)
        return StartupError(f"the Hub at {settings.endpoint} answered {said} for {what}; the next start tries again",
                            EXIT_DOWNLOAD)
    if isinstance(exc, OSError) and exc.errno is not None:
        return _cache_error(job, exc)
    if isinstance(exc, OSError):  # huggingface_hub's own: a download whose size is not the announced one, say
        return StartupError(f"fetching {what} failed ({str(exc).splitlines()[0]}); the next start tries again",
                            EXIT_DOWNLOAD)
    return None


def _cache_error(job: _Job, exc: OSError, needed: int | None = None) -> StartupError:
    where = job.settings.cache_dir
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        need = "" if needed is None else f": {needed} bytes ({_of(None, needed)}) are needed"
        return StartupError(f"no space left for the Hub cache {where}{need}; free some, or set HF_HUB_CACHE to a "
                            f"larger disk", EXIT_DOWNLOAD)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST):
        return StartupError(f"cannot write the Hub cache {where} ({exc.strerror}: {exc.filename}): make it "
                            f"writable for this user, or set HF_HUB_CACHE to a directory that is", EXIT_MODEL)
    return StartupError(f"cannot write the Hub cache {where} ({exc.strerror or exc}: {exc.filename}); the next "
                        f"start tries again", EXIT_DOWNLOAD)


def _is_http(exc: BaseException, name: str) -> bool:
    """Whether `exc` is a `name` (TransportError, TimeoutException) of the HTTP library huggingface_hub speaks:
    httpx2 from its 2.0 on, httpx in 1.x."""
    return any(kind.__name__ == name and kind.__module__.partition(".")[0] in ("httpx", "httpx2")
               for kind in type(exc).__mro__)


def _reason(exc: BaseException, timeout_s: float | None) -> str:
    """Why a request failed, from the OS error under the HTTP library's."""
    if _is_http(exc, "TimeoutException"):
        return "no answer in time" if timeout_s is None else f"no answer within {timeout_s:g} s"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, socket.gaierror):
            return f"cannot resolve the host: {cause.strerror}"
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
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
