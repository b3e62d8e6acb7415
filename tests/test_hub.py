"""The Hub fetcher (`openvino_reranker.hub`, over huggingface_hub) against a local fake Hub and CDN
(tests/fakehub.py): which requests are made, the huggingface_hub cache layout, verification, resume, locking,
cancelling, offline use and every error's exit code. No network."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
from fakehub import FakeHub, Fault, git_blob_sha1, refused_endpoint, sha256, silent_endpoint
from huggingface_hub import constants as hub_constants
from support import ROOT
from support.http import request as http_request
from support.models import F32, SCORE_TOLERANCE
from support.servers import RunningServer

from openvino_reranker import hub as hubmodule
from openvino_reranker import modeldir
from openvino_reranker.errors import EXIT_CONFIG, EXIT_DOWNLOAD, EXIT_MODEL, StartupError
from openvino_reranker.hub import FetchedModel, HubSettings, fetch_model, parse_repo_id

REPO = "cross-encoder/tiny-reranker"
INT8_XML, INT8_BIN = "openvino/openvino_model_qint8_quantized.xml", "openvino/openvino_model_qint8_quantized.bin"
FP32_XML, FP32_BIN = "openvino/openvino_model.xml", "openvino/openvino_model.bin"
IR_CANDIDATES = (INT8_XML, FP32_XML, "openvino_model.xml")
REQUIRED = ("tokenizer.json",)
OPTIONAL = ("config.json", "tokenizer_config.json")  # the repo has no tokenizer_config.json


def repo_files(seed: int = 0) -> dict[str, bytes]:
    weights = hashlib.shake_256(b"weights %d" % seed).digest(300_000)  # several download chunks
    return {INT8_XML: b"<net name='int8'>%d</net>" % seed, INT8_BIN: weights,
            FP32_XML: b"<net name='fp32'/>", FP32_BIN: weights[:1000],
            "tokenizer.json": b'{"model": {"type": "WordPiece"}, "seed": %d}' % seed,
            "config.json": b'{"num_labels": 1}', "README.md": b"# tiny"}


LFS = {INT8_BIN, FP32_BIN}
CHUNK = hub_constants.DOWNLOAD_CHUNK_SIZE  # huggingface_hub writes a plain-HTTP download in pieces of this size


def big_files() -> dict[str, bytes]:
    """repo_files() with weights of two and a half download chunks (25 MB)."""
    return {**repo_files(), INT8_BIN: hashlib.shake_256(b"big weights").digest(CHUNK * 5 // 2)}


@pytest.fixture
def hub():
    fake = FakeHub()
    yield fake
    fake.close()


@pytest.fixture
def repo(hub) -> str:
    """The standard repo's commit."""
    return hub.add_repo(REPO, repo_files(), lfs=LFS)


@pytest.fixture
def big_repo(hub) -> str:
    """The standard repo with big_files(): its commit."""
    return hub.add_repo(REPO, big_files(), lfs=LFS)


def settings(endpoint: str, cache: Path, token: str | None = None, offline: bool = False,
             timeout_s: float = 5.0) -> HubSettings:
    return HubSettings(endpoint=endpoint, token=token, offline=offline, cache_dir=cache,
                       token_source="HF_TOKEN" if token else "", metadata_timeout_s=timeout_s, progress_interval_s=0.0)


def fetch(hub_or_endpoint, cache: Path, repo_id: str = REPO, revision: str = "main", progress=None,
          candidates=IR_CANDIDATES, required=REQUIRED, **kwargs) -> FetchedModel:
    endpoint = hub_or_endpoint if isinstance(hub_or_endpoint, str) else hub_or_endpoint.endpoint
    return fetch_model(repo_id, revision, candidates, required, OPTIONAL, settings(endpoint, cache, **kwargs),
                       progress)


def fails(exit_code: int, *args, **kwargs) -> str:
    with pytest.raises(StartupError) as info:
        fetch(*args, **kwargs)
    assert info.value.exit_code == exit_code, str(info.value)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def repo_dir(cache: Path, repo_id: str = REPO) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


# ---------------------------------------------------------------------------------------------- names and settings


@pytest.mark.parametrize("text, expected", [
    ("cross-encoder/ms-marco-MiniLM-L6-v2", ("cross-encoder/ms-marco-MiniLM-L6-v2", "main")),
    ("OpenVINO/bge-reranker-base-fp16-ov@v1.0", ("OpenVINO/bge-reranker-base-fp16-ov", "v1.0")),
    ("org/name@refs/pr/3", ("org/name", "refs/pr/3")),
    ("org/name@" + "a" * 40, ("org/name", "a" * 40)),
    ("a/b", ("a/b", "main")),
])
def test_parse_repo_id_accepts_hub_ids(text, expected):
    assert parse_repo_id(text) == expected


@pytest.mark.parametrize("text", [
    "/abs/dir", "./dir/x", "../x/y", "~/models/x", "~user/x", "a/b/c", "single", "org/", "/name", "org/name@",
    "org/-name", "org/name-", "org/.name", "org/na--me", "org/na..me", "org/name.git", "org/na me", "org/nämé",
    "org/" + "x" * 97, "org/name@../x", "org/name@a//b", "org/name@-x", "org/name@x/", "",
])
def test_parse_repo_id_refuses_what_is_not_a_hub_id(text):
    assert parse_repo_id(text) is None


def test_settings_from_the_environment(tmp_path):
    home = tmp_path / "hf-home"
    home.mkdir()
    (home / "token").write_text("hf_from_file\n")
    s = HubSettings.from_environ({"HF_HOME": str(home), "HF_ENDPOINT": "https://mirror.example/",
                                  "HF_HUB_OFFLINE": "yes", "HF_HUB_ETAG_TIMEOUT": "3", "https_proxy": "http://p:1"})
    assert s.endpoint == "https://mirror.example" and s.offline is True
    assert s.cache_dir == home / "hub" and s.token == "hf_from_file" and s.token_source == str(home / "token")
    assert s.metadata_timeout_s == 3 and s.proxied_schemes == ("https",)

    s = HubSettings.from_environ({"HF_HOME": str(home), "HF_TOKEN": " hf_env ", "HF_HUB_CACHE": str(tmp_path / "c"),
                                  "HF_HUB_OFFLINE": "0"})
    assert (s.token, s.token_source, s.cache_dir, s.offline) == ("hf_env", "HF_TOKEN", tmp_path / "c", False)

    s = HubSettings.from_environ({"HOME": "/nonexistent", "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert s.endpoint == "https://huggingface.co" and s.cache_dir == tmp_path / "xdg" / "huggingface" / "hub"
    assert s.token is None and s.offline is False
    for value in ("1", "ON", "true", "True", "YES"):
        assert HubSettings.from_environ({"HF_HUB_OFFLINE": value}).offline


# ---------------------------------------------------------------------------------------------- fetching


def test_fetch_fills_the_huggingface_hub_cache_layout(hub, repo, tmp_path):
    files = repo_files()
    result = fetch(hub, tmp_path)
    root = repo_dir(tmp_path)
    assert result == FetchedModel(REPO, "main", repo, root / "snapshots" / repo, INT8_XML, False)
    assert (root / "refs" / "main").read_bytes() == repo.encode()  # no newline, as huggingface_hub writes it
    expected_links = {
        INT8_XML: f"../../../blobs/{git_blob_sha1(files[INT8_XML])}",  # a regular file: its git blob sha1
        INT8_BIN: f"../../../blobs/{sha256(files[INT8_BIN])}",  # an LFS file: its sha256
        "tokenizer.json": f"../../blobs/{git_blob_sha1(files['tokenizer.json'])}",
        "config.json": f"../../blobs/{git_blob_sha1(files['config.json'])}",
    }
    snapshot = root / "snapshots" / repo
    links = {str(p.relative_to(snapshot)): os.readlink(p) for p in snapshot.rglob("*") if p.is_symlink()}
    assert links == expected_links
    for path, target in links.items():
        assert (snapshot / path).read_bytes() == files[path]
        assert (snapshot / path).resolve() == (root / "blobs" / Path(target).name).resolve()
    assert sorted(p.name for p in (root / "blobs").iterdir()) == sorted(Path(t).name for t in expected_links.values())
    # the optional file the repo lacks is remembered as huggingface_hub remembers it
    marker = root / ".no_exist" / repo / "tokenizer_config.json"
    assert marker.is_file() and marker.read_bytes() == b""
    locks = tmp_path / ".locks" / root.name
    assert sorted(p.name for p in locks.iterdir()) == sorted(Path(t).name + ".lock" for t in expected_links.values())
    assert (tmp_path / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55\n")


def test_requests_speak_the_hub_protocol(hub, repo, tmp_path):
    hub.known_tokens.add("hf_user")
    fetch(hub, tmp_path, token="hf_user")
    # one listing resolves the revision to its commit and names the files; each wanted file is then asked for at
    # that commit (huggingface_hub's HEAD, then a GET), so that all come from one commit
    listing = [r for r in hub.requests_to("hub", "GET") if r.path.startswith("/api/models/")]
    assert [r.path for r in listing] == [f"/api/models/{REPO}/revision/main?blobs=true"]
    heads = [r.path for r in hub.requests_to("hub", "HEAD") if "/resolve/" in r.path]
    assert heads and all(f"/resolve/{repo}/" in path for path in heads)
    asked = {r.path.rsplit("/", 1)[-1] for r in hub.requests_to("hub", "HEAD")}
    assert asked == {"openvino_model_qint8_quantized.xml", "openvino_model_qint8_quantized.bin", "tokenizer.json",
                     "config.json"}  # only what the service serves: not the fp32 IR, not README.md
    for request in hub.requests:
        assert request.header("User-Agent").startswith(f"openvino-reranker/{hubmodule.__version__}; hf_hub/")
    assert all(r.header("Accept-Encoding") == "identity" for r in hub.requests_to("hub", "HEAD"))
    assert all(r.header("Authorization") == "Bearer hf_user" for r in hub.requests_to("hub"))
    cdn = hub.requests_to("cdn")
    assert [r.method for r in cdn] == ["GET"]  # the LFS weights came from the CDN, the HEAD stopped at its redirect
    assert cdn[0].header("Authorization") is None  # never the token to another host


def test_a_second_fetch_downloads_nothing(hub, repo, tmp_path):
    fetch(hub, tmp_path)
    before = len(hub.requests)
    result = fetch(hub, tmp_path)
    again = hub.requests[before:]
    # one request, the listing, to learn the branch's commit; every file and every absence is in the cache
    assert [(r.method, r.path) for r in again] == [("GET", f"/api/models/{REPO}/revision/main?blobs=true")]
    assert result.commit == repo and not result.from_cache_only


def test_a_pinned_commit_in_the_cache_needs_no_request(hub, repo, tmp_path):
    fetch(hub, tmp_path, revision=repo)
    assert not (repo_dir(tmp_path) / "refs").exists()  # a commit needs no ref
    before = len(hub.requests)
    lines = []
    result = fetch(hub, tmp_path, revision=repo, progress=lines.append)
    assert len(hub.requests) == before
    assert result.from_cache_only and result.commit == repo and "not contacted" in lines[-1]


def test_the_first_ir_candidate_the_repo_has_is_chosen(hub, tmp_path):
    files = {k: v for k, v in repo_files().items() if k not in (INT8_XML, INT8_BIN)}
    commit = hub.add_repo(REPO, files, lfs=LFS)
    result = fetch(hub, tmp_path)
    assert result.ir_file == FP32_XML
    assert (result.snapshot / FP32_BIN).read_bytes() == files[FP32_BIN]
    assert (repo_dir(tmp_path) / ".no_exist" / commit / INT8_XML).is_file()


def test_files_beside_the_ir_are_fetched_from_its_folder_when_the_repo_has_them(hub, tmp_path):
    def fetch_with_scores(repo_id: str, revision: str = "main") -> FetchedModel:
        return fetch_model(repo_id, revision, IR_CANDIDATES, REQUIRED, OPTIONAL, settings(hub.endpoint, tmp_path),
                           None, ("reference_scores.json",))

    scores = b'{"format": "openvino-reranker reference scores"}'
    hub.add_repo(REPO, {**repo_files(), "openvino/reference_scores.json": scores, "reference_scores.json": b"no"},
                 lfs=LFS)
    result = fetch_with_scores(REPO)
    assert (result.snapshot / "openvino/reference_scores.json").read_bytes() == scores
    assert not (result.snapshot / "reference_scores.json").exists()  # another folder's
    commit = hub.add_repo("org/plain", repo_files(), lfs=LFS)  # none beside its IR: remembered as absent
    fetch_with_scores("org/plain", commit)
    assert (repo_dir(tmp_path, "org/plain") / ".no_exist" / commit / "openvino/reference_scores.json").is_file()
    before = len(hub.requests)  # so that a pinned commit completely cached needs no request, its absence included
    assert fetch_with_scores("org/plain", commit).from_cache_only and len(hub.requests) == before


def test_a_tag_maps_to_its_commit(hub, tmp_path):
    first = hub.add_repo(REPO, repo_files(0), lfs=LFS, refs=("main", "v1"))
    second = hub.add_commit(REPO, repo_files(1))  # main moves on, v1 stays
    tagged = fetch(hub, tmp_path, revision="v1")
    latest = fetch(hub, tmp_path)
    assert (tagged.commit, latest.commit) == (first, second) and first != second
    root = repo_dir(tmp_path)
    assert (root / "refs" / "v1").read_text() == first and (root / "refs" / "main").read_text() == second
    assert (tagged.snapshot / INT8_BIN).read_bytes() == repo_files(0)[INT8_BIN]
    assert (latest.snapshot / "tokenizer.json").read_bytes() == repo_files(1)["tokenizer.json"]


def test_a_renamed_repo_is_followed_by_its_relative_redirect(hub, tmp_path):
    commit = hub.add_repo("new-org/tiny-reranker", repo_files(), lfs=LFS)
    hub.renamed[REPO] = "new-org/tiny-reranker"
    result = fetch(hub, tmp_path)
    assert result.commit == commit and result.snapshot == repo_dir(tmp_path) / "snapshots" / commit
    listings = [r.path for r in hub.requests_to("hub", "GET") if r.path.startswith("/api/models/")]
    assert listings == [f"/api/models/{REPO}/revision/main?blobs=true",
                        "/api/models/new-org/tiny-reranker/revision/main?blobs=true"]
    heads = [r.path for r in hub.requests_to("hub", "HEAD")]
    assert heads[:2] == [f"/{REPO}/resolve/{commit}/{INT8_XML}", f"/new-org/tiny-reranker/resolve/{commit}/{INT8_XML}"]


def test_a_gated_repo_needs_a_granted_token(hub, repo, tmp_path):
    hub.gate(REPO, "hf_granted")
    hub.known_tokens.add("hf_other_account")
    message = fails(EXIT_MODEL, hub, tmp_path)
    assert "gated" in message and "HF_TOKEN" in message and f"{hub.endpoint}/{REPO}" in message and "401" in message
    message = fails(EXIT_MODEL, hub, tmp_path, token="hf_other_account")
    assert "gated" in message and "token from HF_TOKEN has no access" in message and "403" in message
    assert fetch(hub, tmp_path, token="hf_granted").commit == repo
    assert all(r.header("Authorization") is None for r in hub.requests_to("cdn"))


def test_a_token_the_hub_does_not_know_is_refused(hub, repo, tmp_path):
    message = fails(EXIT_MODEL, hub, tmp_path, token="hf_revoked")
    assert "refused the token from HF_TOKEN" in message and "401" in message


def test_a_missing_repo(hub, tmp_path):
    message = fails(EXIT_MODEL, hub, tmp_path, repo_id="nobody/nothing")
    assert "no repository nobody/nothing" in message and "HF_TOKEN" in message


def test_a_missing_revision(hub, repo, tmp_path):
    message = fails(EXIT_MODEL, hub, tmp_path, revision="v9")
    assert "has no revision 'v9'" in message


def test_a_repo_without_any_ir_says_how_to_export_one(hub, tmp_path):
    hub.add_repo(REPO, {"tokenizer.json": b"{}", "model.safetensors": b"x"}, lfs={"model.safetensors"})
    message = fails(EXIT_MODEL, hub, tmp_path)
    assert all(path in message for path in IR_CANDIDATES)
    assert f"optimum-cli export openvino --model {REPO} --task text-classification DIR" in message
    assert "--model DIR" in message and "--model-file" in message


def test_an_ir_without_its_weights(hub, tmp_path):
    hub.add_repo(REPO, {k: v for k, v in repo_files().items() if k != INT8_BIN}, lfs=LFS)
    assert f"but not its weights {INT8_BIN}" in fails(EXIT_MODEL, hub, tmp_path)


def test_a_missing_required_file(hub, tmp_path):
    hub.add_repo(REPO, {k: v for k, v in repo_files().items() if k != "tokenizer.json"}, lfs=LFS)
    assert "has no tokenizer.json, which the model needs" in fails(EXIT_MODEL, hub, tmp_path)


@pytest.mark.parametrize("path", [INT8_BIN, "tokenizer.json"])  # an LFS file (sha256), a regular one (git sha1)
def test_a_corrupt_download_is_deleted_and_refetched(hub, repo, tmp_path, path):
    hub.fail(path, Fault("corrupt"))
    message = fails(EXIT_DOWNLOAD, hub, tmp_path)
    assert path in message and "checksum" in message and "deleted" in message
    blobs = repo_dir(tmp_path) / "blobs"
    expected_etag = sha256(repo_files()[path]) if path in LFS else git_blob_sha1(repo_files()[path])
    assert not (blobs / expected_etag).exists() and not list(blobs.glob("*.incomplete"))
    result = fetch(hub, tmp_path)  # the fault is spent: the next start fetches it again
    assert (result.snapshot / path).read_bytes() == repo_files()[path]


def test_a_cut_download_resumes_with_a_range_request_from_the_last_whole_chunk(hub, big_repo, tmp_path):
    """The library writes a download in chunks of CHUNK bytes, so a cut resumes from the last whole chunk written,
    not from the last byte received."""
    hub.fail(INT8_BIN, Fault("cut", CHUNK * 3 // 2))
    result = fetch(hub, tmp_path)  # within the same start
    gets = hub.requests_to("cdn", "GET")
    assert [g.header("Range") for g in gets] == [None, f"bytes={CHUNK}-"]
    assert (result.snapshot / INT8_BIN).read_bytes() == big_files()[INT8_BIN]
    assert not list((repo_dir(tmp_path) / "blobs").glob("*.incomplete"))


def test_a_cut_before_the_first_chunk_starts_over(hub, repo, tmp_path):
    hub.fail(INT8_BIN, Fault("cut", 100_000))
    result = fetch(hub, tmp_path)
    assert [g.header("Range") for g in hub.requests_to("cdn", "GET")] == [None, None]
    assert (result.snapshot / INT8_BIN).read_bytes() == repo_files()[INT8_BIN]


def test_a_download_that_keeps_failing_stops_the_start_and_the_next_start_fetches_it(hub, repo, tmp_path):
    hub.fail(INT8_BIN, *[Fault("cut", 0)] * 6)  # more than huggingface_hub's 5 retries without progress
    message = fails(EXIT_DOWNLOAD, hub, tmp_path)
    assert INT8_BIN in message and "the next start tries again" in message
    blobs = repo_dir(tmp_path) / "blobs"
    assert not (blobs / sha256(repo_files()[INT8_BIN])).exists() and not list(blobs.glob("*.incomplete"))
    hub.clear_faults()
    result = fetch(hub, tmp_path)
    assert (result.snapshot / INT8_BIN).read_bytes() == repo_files()[INT8_BIN]
    assert not list((repo_dir(tmp_path) / "blobs").glob("*.incomplete"))


def test_a_server_that_ignores_range_is_read_from_the_start(hub, big_repo, tmp_path):
    hub.fail(INT8_BIN, Fault("cut", CHUNK * 3 // 2), Fault("ignore_range"))
    result = fetch(hub, tmp_path)
    assert [g.header("Range") for g in hub.requests_to("cdn", "GET")] == [None, f"bytes={CHUNK}-"]
    assert (result.snapshot / INT8_BIN).read_bytes() == big_files()[INT8_BIN]


def test_a_download_refused_by_the_cdn_or_a_hub_error_is_restartable(hub, repo, tmp_path):
    hub.fail(INT8_BIN, Fault("status", 503))
    assert "503" in fails(EXIT_DOWNLOAD, hub, tmp_path)
    hub.fail(INT8_BIN, Fault("status", 403))
    assert "403" in fails(EXIT_DOWNLOAD, hub, tmp_path)


def test_progress_lines(hub, big_repo, tmp_path):
    lines = []
    fetch(hub, tmp_path, progress=lines.append)
    size = f"{len(big_files()[INT8_BIN]) / 1e6:.1f}"
    assert f"downloading {INT8_BIN} ({size} MB) from 127.0.0.1" in lines
    steps = [line for line in lines if line.startswith(f"downloading {INT8_BIN}: ")]
    assert len(steps) == 3 and steps[-1] == f"downloading {INT8_BIN}: {size} of {size} MB"  # one a chunk
    assert any(line.startswith("downloading tokenizer.json (") for line in lines)


def test_a_fetch_leaves_no_thread_behind(hub, big_repo, tmp_path):
    """tqdm starts a monitor thread for each bar class, and each download's progress class is its own: without
    monitor_interval 0 every file fetched left a sleeping thread for the life of the process."""
    before = set(threading.enumerate())
    fetch(hub, tmp_path, progress=lambda line: None)
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert [type(t).__name__ for t in left if type(t).__name__ == "TMonitor"] == []


def test_an_exception_from_on_progress_stops_the_download_and_the_next_fetch_completes_it(hub, big_repo, tmp_path):
    class Stop(Exception):
        pass

    def progress(line):
        if line.startswith(f"downloading {INT8_BIN}: "):
            raise Stop(line)

    with pytest.raises(Stop):
        fetch(hub, tmp_path, progress=progress)
    assert not (repo_dir(tmp_path) / "blobs" / sha256(big_files()[INT8_BIN])).exists()  # nothing half-done is cached
    result = fetch(hub, tmp_path)  # the lock was released
    assert (result.snapshot / INT8_BIN).read_bytes() == big_files()[INT8_BIN]


SIGNAL_STOP_SCRIPT = r"""
import json, signal, sys, time
from pathlib import Path
sys.path[:0] = sys.argv[3:]
import test_hub
from openvino_reranker import hub as hubmodule
from openvino_reranker.errors import StartupCancelled

hubmodule.interrupt_download()  # no download in progress: nothing happens
signal.signal(signal.SIGALRM, lambda signum, frame: hubmodule.interrupt_download())
stopped = []

def progress(line):
    if line.startswith(f"downloading {test_hub.INT8_BIN} ("):
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        stopped.append(time.monotonic() + 0.5)

try:
    test_hub.fetch(sys.argv[1], Path(sys.argv[2]), progress=progress)
    outcome = "completed"
except StartupCancelled:
    outcome = "cancelled"
print(json.dumps({"outcome": outcome, "late_s": time.monotonic() - stopped[0] if stopped else None}))
"""


def test_interrupt_download_from_a_signal_handler_stops_a_download_at_once(hub, big_repo, tmp_path):
    """What SIGTERM does during startup (startup.install_signal_handlers): without it, a stop is seen only at the
    next progress line, which huggingface_hub gives once a chunk (10 s apart here). In a process of its own, as in
    the service, where the signal comes before any model is compiled: a Python signal handler run on a thread that
    has used AMX tiles can find no room for its signal frame on the alternate signal stack, and this test process
    has run OpenVINO by now (a SIGSEGV from the kernel, seen after tests/test_engine.py)."""
    hub.fail(INT8_BIN, Fault("slow", CHUNK // 10))
    tests = Path(__file__).resolve().parent
    done = subprocess.run([sys.executable, "-c", SIGNAL_STOP_SCRIPT, hub.endpoint, str(tmp_path), str(tests),
                           str(tests.parent)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["outcome"] == "cancelled" and result["late_s"] is not None and result["late_s"] < 1.0
    assert not (repo_dir(tmp_path) / "blobs" / sha256(big_files()[INT8_BIN])).exists()


def test_progress_lines_are_spaced_by_the_interval(hub, repo, tmp_path):
    lines = []
    s = settings(hub.endpoint, tmp_path)
    fetch_model(REPO, "main", IR_CANDIDATES, REQUIRED, OPTIONAL,
                HubSettings(**{**s.__dict__, "progress_interval_s": 3600.0}), lines.append)
    assert not [line for line in lines if ": " in line and " of " in line]  # only the one line per file started
    assert f"downloading {INT8_BIN} (300.0 kB) from 127.0.0.1" in lines


# ---------------------------------------------------------------------------------------------- without the Hub


def test_offline_serves_a_warm_cache_without_any_request(hub, repo, tmp_path):
    fetch(hub, tmp_path)
    before = len(hub.requests)
    lines = []
    result = fetch(hub, tmp_path, offline=True, progress=lines.append)
    assert len(hub.requests) == before
    assert result == FetchedModel(REPO, "main", repo, repo_dir(tmp_path) / "snapshots" / repo, INT8_XML, True,
                                  lines[-1])
    assert "HF_HUB_OFFLINE" in lines[-1]


def test_offline_with_a_cold_cache_says_how_to_fetch(hub, repo, tmp_path):
    message = fails(EXIT_MODEL, hub, tmp_path, offline=True)
    assert "HF_HUB_OFFLINE is set" in message and str(tmp_path) in message and f"hf download {REPO}" in message
    assert hub.requests == []
    message = fails(EXIT_MODEL, hub, tmp_path, revision="v1", offline=True)
    assert f"hf download {REPO} --revision v1" in message


def test_offline_with_a_cold_cache_says_what_a_person_can_do(hub, repo, tmp_path):
    message = fails(EXIT_MODEL, hub, tmp_path, offline=True)
    assert "unset HF_HUB_OFFLINE" in message and "HF_ENDPOINT" in message  # go online, perhaps through a mirror
    assert f"hf download {REPO}" in message and "copy its folder models--cross-encoder--tiny-reranker" in message \
        and f"into {tmp_path}" in message  # fetch it elsewhere and bring the cache
    assert "--model DIR" in message  # or serve a local export
    assert "next start" not in message  # exit 4: restarting changes nothing


def test_offline_with_a_partial_snapshot_names_what_is_missing(hub, repo, tmp_path):
    fetch(hub, tmp_path)
    (repo_dir(tmp_path) / "snapshots" / repo / "tokenizer.json").unlink()
    message = fails(EXIT_MODEL, hub, tmp_path, offline=True)
    assert "lacks tokenizer.json" in message


def test_an_unreachable_hub_falls_back_to_a_complete_cache(hub, repo, tmp_path):
    fetch(hub, tmp_path)
    endpoint, sock = refused_endpoint()
    try:
        lines = []
        result = fetch(endpoint, tmp_path, progress=lines.append)
        assert result.from_cache_only and result.commit == repo and result.ir_file == INT8_XML
        assert "cannot reach the Hub" in lines[-1] and "served from the cache" in lines[-1]
        message = fails(EXIT_DOWNLOAD, endpoint, tmp_path / "cold")
        assert "cannot reach the Hub" in message and "not in the Hub cache" in message
    finally:
        sock.close()


def test_an_unreachable_hub_with_a_cold_cache_says_what_a_person_can_do(tmp_path):
    endpoint, sock = refused_endpoint()
    try:
        message = fails(EXIT_DOWNLOAD, endpoint, tmp_path)
        assert "check the network and the proxy (no http_proxy is set)" in message
        assert f"set HF_ENDPOINT to a mirror (now {endpoint})" in message
        assert f"hf download {REPO}" in message and f"copy its folder models--cross-encoder--tiny-reranker into " \
            f"{tmp_path}" in message
        assert "--model DIR" in message
        assert message.endswith("under systemd the next start tries again")  # exit 8 is restarted
        # through a proxy: said, without the proxy's credentials
        proxied = HubSettings.from_environ({"HF_ENDPOINT": endpoint, "HF_HUB_CACHE": str(tmp_path),
                                            "http_proxy": f"http://user:secret@{endpoint[7:]}"})
        with pytest.raises(StartupError) as info:
            fetch_model(REPO, "main", IR_CANDIDATES, REQUIRED, OPTIONAL, proxied)
        assert info.value.exit_code == EXIT_DOWNLOAD
        assert "http_proxy is set" in str(info.value) and "secret" not in str(info.value)
    finally:
        sock.close()


def test_a_hub_that_does_not_answer_times_out(tmp_path):
    endpoint, sock = silent_endpoint()
    try:
        message = fails(EXIT_DOWNLOAD, endpoint, tmp_path, timeout_s=0.2)
        assert "no answer within 0.2 s" in message
    finally:
        sock.close()


def test_a_hub_answering_5xx_falls_back_to_the_cache(hub, repo, tmp_path):
    fetch(hub, tmp_path)
    hub.down_status = 503
    assert fetch(hub, tmp_path).from_cache_only
    message = fails(EXIT_DOWNLOAD, hub, tmp_path / "cold")
    assert "503" in message


# ---------------------------------------------------------------------------------------------- the cache's disk


class NoSpaceLeft:
    """A file that cannot take a byte, as on a full disk."""

    def __init__(self, file):
        self.file = file

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_a_full_disk_while_writing(hub, repo, tmp_path, monkeypatch):
    real_open = Path.open

    def open_full(path, *args, **kwargs):  # huggingface_hub writes a download into blobs/<etag>[.<id>].incomplete
        file = real_open(path, *args, **kwargs)
        return NoSpaceLeft(file) if path.name.endswith(".incomplete") else file

    monkeypatch.setattr(Path, "open", open_full)
    message = fails(EXIT_DOWNLOAD, hub, tmp_path)
    assert "no space left" in message and str(tmp_path) in message and "HF_HUB_CACHE" in message


def test_free_space_is_checked_before_downloading(hub, repo, tmp_path, monkeypatch):
    fetch(hub, tmp_path, candidates=(FP32_XML,))  # the small files are cached
    monkeypatch.setattr(hubmodule.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=1000))
    before = len(hub.requests_to("cdn"))
    message = fails(EXIT_DOWNLOAD, hub, tmp_path)
    assert f"{300_000} bytes (300.0 kB) are needed" in message and len(hub.requests_to("cdn")) == before


def test_a_cache_that_cannot_be_written(hub, repo, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    message = fails(EXIT_MODEL, hub, not_a_dir / "hub")
    assert "cannot write the Hub cache" in message and "HF_HUB_CACHE" in message


def test_a_blob_another_process_is_writing_is_waited_for_not_downloaded_twice(hub, repo, tmp_path):
    """The other process holds the blob's lock (flock, as huggingface_hub's filelock takes it) and finishes the
    blob while this fetch waits; the fetch then links it and downloads nothing."""
    data = repo_files()[INT8_BIN]
    locks = tmp_path / ".locks" / repo_dir(tmp_path).name
    locks.mkdir(parents=True)
    other = os.open(locks / f"{sha256(data)}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX)
    outcome = {}

    def run():
        try:
            outcome["result"] = fetch(hub, tmp_path)
        except BaseException as exc:  # reported below
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not any(r.path.endswith(INT8_BIN) for r in hub.requests_to("hub", "HEAD")) and thread.is_alive():
            assert time.monotonic() < deadline, "the fetch never asked for the weights"
            time.sleep(0.02)
        thread.join(0.5)  # a fetch that did not wait would have downloaded the weights by now, and ended
        assert thread.is_alive() and "error" not in outcome and hub.requests_to("cdn") == []
        blobs = repo_dir(tmp_path) / "blobs"
        (blobs / sha256(data)).write_bytes(data)  # what the other process leaves behind
    finally:
        os.close(other)  # releases the lock
        thread.join(30)
    assert "error" not in outcome, outcome.get("error")
    assert hub.requests_to("cdn") == [] and (outcome["result"].snapshot / INT8_BIN).read_bytes() == data


# ---------------------------------------------------------------------------------------------- arguments


def test_bad_file_names_and_endpoints_are_configuration_errors(hub, tmp_path):
    for candidates in (("../escape.xml",), ("/abs.xml",), ("openvino/model.onnx",), ()):
        assert fails(EXIT_CONFIG, hub, tmp_path, candidates=candidates)
    assert "HF_ENDPOINT" in fails(EXIT_CONFIG, "huggingface.co", tmp_path)


# ---------------------------------------------------------------------------------------------- huggingface_hub itself


INTEROP_SCRIPT = f"""
import json, sys
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
paths = {{}}
for name in json.loads(sys.argv[1]):
    try:
        paths[name] = hf_hub_download("{REPO}", name, revision="main")
    except EntryNotFoundError:
        paths[name] = None
print(json.dumps(paths))
"""


def _tree(cache: Path) -> dict[str, str]:
    """What a cache holds, by relative path: a link's target or a file's bytes' digest (lock files: only that they
    exist; their content is the lock library's)."""
    found = {}
    for path in sorted(cache.rglob("*")):
        rel = str(path.relative_to(cache))
        if path.is_symlink():
            found[rel] = "-> " + os.readlink(path)
        elif path.is_file() and rel != "CACHEDIR.TAG":
            found[rel] = "lock" if rel.startswith(".locks/") else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def test_huggingface_hub_and_this_fetcher_share_one_cache(hub, repo, tmp_path):
    """hf_hub_download alone (in a process of its own, by branch, as transformers asks; HUB_INTEROP_PYTHON may name
    a Python with another huggingface_hub) against the fake Hub fills a cache this fetcher serves offline, this
    fetcher's cache is served by huggingface_hub offline, and both caches hold the same tree: what this fetcher
    writes itself (the ref, and the absence markers from the listing) is what the library would write."""
    python = os.environ.get("HUB_INTEROP_PYTHON") or sys.executable
    import json

    names = [INT8_XML, INT8_BIN, "tokenizer.json", "config.json"]
    absent = "tokenizer_config.json"  # remembered as absent by both
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}

    def hf(cache: Path, offline: bool) -> dict[str, str]:
        run_env = {**env, "HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(cache),
                   "HF_HUB_OFFLINE": "1" if offline else "0", "HF_HUB_DISABLE_TELEMETRY": "1",
                   "HF_HUB_DISABLE_XET": "1"}
        done = subprocess.run([python, "-c", INTEROP_SCRIPT, json.dumps([*names, absent])], capture_output=True,
                              text=True, env=run_env, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        paths = json.loads(done.stdout.strip().splitlines()[-1])
        assert paths.pop(absent) is None
        return paths

    # huggingface_hub fills a cache; this fetcher serves it offline, the same files
    by_hf = tmp_path / "by-huggingface-hub"
    paths = hf(by_hf, offline=False)
    ours = fetch(hub, by_hf, offline=True, candidates=(INT8_XML,), required=("tokenizer.json", "config.json"))
    assert ours.commit == repo
    for name in names:
        assert Path(paths[name]) == ours.snapshot / name and Path(paths[name]).read_bytes() == repo_files()[name]

    # this fetcher fills a cache; huggingface_hub serves it offline
    by_us = tmp_path / "by-openvino-reranker"
    fetch(hub, by_us, candidates=(INT8_XML,), required=("tokenizer.json", "config.json"))
    paths = hf(by_us, offline=True)
    for name in names:
        assert Path(paths[name]).read_bytes() == repo_files()[name]

    # the same tree: blobs, links, refs, absence markers, lock files
    assert _tree(by_us) == _tree(by_hf)
    assert any("/.no_exist/" in k for k in _tree(by_hf)) and any(k.startswith(".locks/") for k in _tree(by_hf))


# ---------------------------------------------------------------------------------------------- a vision-language model


VL_FIXTURE = ROOT / "tests" / "fixtures" / "models" / "tiny-nemotron-vl"
VISION = ("openvino_vision.xml", "openvino_vision.bin")


def vl_files() -> dict[str, bytes]:
    """The VL fixture as a Hub repo: its files at the repo's root, its IRs' weights in LFS."""
    return {path.name: path.read_bytes() for path in sorted(VL_FIXTURE.iterdir())
            if path.is_file() and path.name != "reference.json"}


def fetch_as_served(hub_or_endpoint, cache: Path, repo_id: str, revision: str = "main", **kwargs) -> FetchedModel:
    """fetch_model with the files, and what they call for, that modeldir.locate_model asks for."""
    endpoint = hub_or_endpoint if isinstance(hub_or_endpoint, str) else hub_or_endpoint.endpoint
    return fetch_model(repo_id, revision, modeldir.IR_CANDIDATES, modeldir.REQUIRED_FILES, modeldir.OPTIONAL_FILES,
                       settings(endpoint, cache, **kwargs), None, modeldir.OPTIONAL_BESIDE_IR,
                       modeldir.files_called_for)


def test_a_vision_language_model_gets_its_vision_ir_and_no_other_model_asks_for_it(hub, tmp_path):
    commit = hub.add_repo("org/vl", vl_files(), lfs=("openvino_model.bin", "openvino_vision.bin"))
    fetched = fetch_as_served(hub, tmp_path, "org/vl")
    for name in VISION:
        assert (fetched.snapshot / name).read_bytes() == (VL_FIXTURE / name).read_bytes()
    # a text model's repo: the vision IR is neither asked for nor remembered as absent
    plain = hub.add_repo("org/plain", repo_files(), lfs=LFS)
    before = len(hub.requests)
    fetch_as_served(hub, tmp_path, "org/plain")
    asked = [r.path for r in hub.requests[before:]]
    assert not any("openvino_vision" in path for path in asked), asked
    no_exist = repo_dir(tmp_path, "org/plain") / ".no_exist" / plain
    assert not any("openvino_vision" in p.name for p in no_exist.rglob("*")), sorted(no_exist.rglob("*"))
    # and a pinned commit of either, completely cached, needs no request
    before = len(hub.requests)
    assert fetch_as_served(hub, tmp_path, "org/vl", commit).from_cache_only
    assert fetch_as_served(hub, tmp_path, "org/plain", plain).from_cache_only
    assert len(hub.requests) == before


def test_a_vision_language_snapshot_without_its_vision_ir_is_not_complete(hub, tmp_path):
    commit = hub.add_repo("org/vl", vl_files(), lfs=("openvino_model.bin", "openvino_vision.bin"))
    fetched = fetch_as_served(hub, tmp_path, "org/vl")
    link = fetched.snapshot / "openvino_vision.bin"
    link.unlink()  # as if the start stopped before the vision IR's weights came
    with pytest.raises(StartupError, match="lacks openvino_vision.bin") as caught:
        fetch_as_served(hub, tmp_path, "org/vl", offline=True)
    assert caught.value.exit_code == 4
    before = len(hub.requests)
    fetched = fetch_as_served(hub, tmp_path, "org/vl", commit)  # pinned, but not complete: the Hub is asked
    assert not fetched.from_cache_only and len(hub.requests) > before and link.is_file()


def test_a_vision_language_repo_without_its_vision_ir(hub, tmp_path):
    files = {name: data for name, data in vl_files().items() if name != "openvino_vision.bin"}
    hub.add_repo("org/vl", files, lfs=("openvino_model.bin",))
    with pytest.raises(StartupError, match="has no openvino_vision.bin, which the model needs") as caught:
        fetch_as_served(hub, tmp_path, "org/vl")
    assert caught.value.exit_code == 4 and "\n" not in str(caught.value)


def test_the_vl_fixture_is_served_from_the_fake_hub(hub, tmp_path):
    """main() with --model org/tiny-nemotron-vl: fetched with its vision IR, ready, an image document scored as
    torch scored it."""
    import json

    hub.add_repo("org/tiny-nemotron-vl", vl_files(), lfs=("openvino_model.bin", "openvino_vision.bin"))
    reference = json.loads((VL_FIXTURE / "reference.json").read_text())
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(tmp_path / "hf"), "HOME": str(tmp_path)}
    args = ["--device", "CPU", *F32, "--model", "org/tiny-nemotron-vl", "--cache-dir", "",
            "--max-length", str(reference["max_length"])]
    case = next(c for c in reference["cases"] if "image" in c and c["document"])
    with RunningServer(args, env=env).wait_ready() as srv:
        ready = http_request(srv.port, "GET", "/readyz")[1]
        assert ready["head"]["kind"] == "vision-language" and ready["model"] == "org/tiny-nemotron-vl"
        status, body, _ = http_request(srv.port, "POST", "/rerank", {"query": case["query"], "documents": [
            {"image": case["image"], "text": case["document"]}]})
        assert status == 200, body
        assert abs(body["results"][0]["score"] - case["score"]) < SCORE_TOLERANCE
