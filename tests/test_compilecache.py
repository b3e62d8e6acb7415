"""The compile cache is keyed by this service (SPEC.md, "Compile cache"): a blob is reused only for the exact
configuration that made it, so every part of that configuration changes the digest, and a directory this service
did not key is not used. Issue 17: OpenVINO 2026.4's own cache key leaves out INFERENCE_PRECISION_HINT, so a start
with `--inference-precision f32` after a default start (bf16 on a CPU with AMX or AVX512-BF16) loaded the bf16 blob,
and a default start after an f32 start loaded the f32 blob and scored NaN or crashed."""

import hashlib
import json
import os

import numpy as np
import openvino as ov
import pytest
from support.http import request
from support.servers import RunningServer
from test_model_families import FIXTURES, all_cases_in_one_request, reference

from openvino_reranker.compilecache import (
    DIGEST_CHARS,
    HASH_CHUNK_BYTES,
    CompileCache,
    IrBytes,
    compile_key,
    key_digest,
    open_compile_cache,
)
from openvino_reranker.config import ShapeBucket

QWEN3 = FIXTURES / "tiny-qwen3"
CONFIGURATION_FILE = "configuration.json"  # SPEC.md, "Compile cache": what each keyed directory holds
DEFAULT_PRECISION = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
NOT_F32_BY_DEFAULT = pytest.mark.skipif(
    DEFAULT_PRECISION == ov.Type.f32,
    reason=f"this CPU's default inference precision is {DEFAULT_PRECISION} (no AMX/AVX512-BF16): a default compile "
           f"and an f32 compile give the same scores, so a wrong blob would not show in them")


def serve_once(cache_dir, *extra: str) -> tuple[dict, np.ndarray]:
    """Start the real server on the Qwen3 decoder fixture, take /readyz and score every case, stop it."""
    args = ["--device", "CPU", "--model", str(QWEN3), "--cache-dir", str(cache_dir), *extra]
    with RunningServer(args).wait_ready() as srv:
        ready = request(srv.port, "GET", "/readyz")[1]
        scores, _ = all_cases_in_one_request(srv.port, reference("tiny-qwen3"))
    return ready, scores


def keyed_dirs(root) -> set[str]:
    return {str(p) for p in root.iterdir() if p.is_dir()}


@pytest.fixture(scope="module")
def default_then_f32_then_default(tmp_path_factory):
    """Issue 17's steps with one shared --cache-dir: a default start, an f32 start, the default start again."""
    root = tmp_path_factory.mktemp("shared-compile-cache")
    first = serve_once(root)
    dirs_after_first = keyed_dirs(root)
    second = serve_once(root, "--inference-precision", "f32")
    dirs_after_second = keyed_dirs(root)
    third = serve_once(root)
    return root, (first, second, third), (dirs_after_first, dirs_after_second, keyed_dirs(root))


def test_each_configuration_has_its_own_keyed_directory(default_then_f32_then_default):
    root, (first, second, third), (after_first, after_second, after_third) = default_then_f32_then_default
    assert len(after_first) == 1, "the first start compiles one configuration into one keyed directory"
    assert len(after_second) == 2 and after_first < after_second, "the f32 start must get a directory of its own"
    assert after_third == after_second, "the third start has the first one's settings: no new directory"
    first_dir, = after_first
    second_dir, = after_second - after_first
    assert first[0]["compile"]["cache_dir"] == first_dir and third[0]["compile"]["cache_dir"] == first_dir
    assert second[0]["compile"]["cache_dir"] == second_dir
    assert first[0]["compile"]["loaded_from_cache"] == [False]
    assert second[0]["compile"]["loaded_from_cache"] == [False], "the f32 start loaded a blob it did not make"
    assert third[0]["compile"]["loaded_from_cache"] == [True], "the same settings again must load from the cache"
    for directory, ready in ((first_dir, first[0]), (second_dir, second[0])):
        written = json.loads((root / directory / CONFIGURATION_FILE).read_text())
        assert written["device"] == "CPU" and written["properties"] == ready["compile"]["properties"]
        assert written["openvino"] == ov.get_version() and written["shapes"] == "dynamic"
    assert np.abs(third[1] - first[1]).max() <= 1e-6, "the cached default compile scores as the first one did"


@NOT_F32_BY_DEFAULT
def test_the_f32_start_scores_as_an_uncached_f32_compile(default_then_f32_then_default):
    _, (first, second, _), _ = default_then_f32_then_default
    uncached = serve_once("", "--inference-precision", "f32")
    assert second[0]["compile"]["properties"] == uncached[0]["compile"]["properties"]
    assert np.abs(second[1] - uncached[1]).max() <= 1e-6
    assert np.abs(first[1] - uncached[1]).max() > 1e-6, "on this CPU the default precision changes the scores"


def test_a_default_start_after_an_f32_start_compiles_its_own(tmp_path):
    """The other order: OpenVINO's cache gave the default compile the f32 blob, which then scored NaN here."""
    f32 = serve_once(tmp_path, "--inference-precision", "f32")
    default = serve_once(tmp_path)
    assert f32[0]["compile"]["cache_dir"] != default[0]["compile"]["cache_dir"]
    assert default[0]["compile"]["loaded_from_cache"] == [False] and default[0]["parity"]["fallback"] is False
    assert len(keyed_dirs(tmp_path)) == 2
    assert np.isfinite(default[1]).all()
    if DEFAULT_PRECISION != ov.Type.f32:
        uncached = serve_once("")
        assert np.abs(default[1] - uncached[1]).max() <= 1e-6


# ---------------------------------------------------------------------------------------------- the key


IR = IrBytes("a" * 64, "b" * 64)
BASE = dict(device="CPU", properties={"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}, openvino_version="2026.4.1",
            ir=IR, buckets=None)


def digest(**changes) -> str:
    return key_digest(compile_key(**{**BASE, **changes}))


@pytest.mark.parametrize("changes", [
    {"device": "NPU"},
    {"device": "AUTO:NPU,CPU"},
    {"properties": {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": "1"}},
    {"properties": {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "2"}},
    {"properties": {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_PRECISION_HINT": "f32"}},
    {"properties": {"PERFORMANCE_HINT": "LATENCY"}},
    {"openvino_version": "2026.4.0"},
    {"ir": IrBytes("c" * 64, "b" * 64)},
    {"ir": IrBytes("a" * 64, "c" * 64)},
    {"buckets": (ShapeBucket(8, 64),)},
    {"buckets": (ShapeBucket(8, 64), ShapeBucket(8, 128))},
    {"buckets": (ShapeBucket(4, 64),)},
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_every_part_of_the_configuration_changes_the_digest(changes):
    assert digest(**changes) != digest()


def test_the_same_configuration_gives_the_same_digest():
    reordered = {"NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY"}
    assert digest() == digest(properties=reordered) == key_digest(compile_key(**BASE))
    assert len(digest()) == 64 and digest(buckets=(ShapeBucket(8, 64),)) == digest(buckets=[ShapeBucket(8, 64)])


def test_the_ir_bytes_are_its_files_hashes(tmp_path):
    """A byte changed anywhere in the .xml or the .bin changes the IR's identity; the files are read in chunks,
    so the .bin here spans several."""
    xml, weights = tmp_path / "m.xml", tmp_path / "m.bin"
    xml.write_bytes(b"<net/>")
    data = bytearray(os.urandom(2 * HASH_CHUNK_BYTES + 123))
    weights.write_bytes(data)
    first = IrBytes.of(xml)
    assert first == IrBytes(hashlib.sha256(b"<net/>").hexdigest(), hashlib.sha256(data).hexdigest())
    data[-1] ^= 1
    weights.write_bytes(data)
    assert IrBytes.of(xml).bin_sha256 != first.bin_sha256 and IrBytes.of(xml).xml_sha256 == first.xml_sha256
    xml.write_bytes(b"<net />")
    assert IrBytes.of(xml).xml_sha256 != first.xml_sha256


def cache_in(root) -> CompileCache:
    return CompileCache(root, IR, "2026.4.1", "/models/m.xml")


def test_a_keyed_directory_says_what_it_holds(tmp_path):
    directory = cache_in(tmp_path).directory_for("CPU", {"PERFORMANCE_HINT": "LATENCY"}, (ShapeBucket(8, 64),))
    written = json.loads((directory / CONFIGURATION_FILE).read_text())
    assert directory.parent == tmp_path and directory.name == written["digest"][:DIGEST_CHARS]
    assert written["digest"] == key_digest(compile_key("CPU", {"PERFORMANCE_HINT": "LATENCY"}, "2026.4.1", IR,
                                                       (ShapeBucket(8, 64),)))
    assert written["shapes"] == "8x64" and written["ir_path"] == "/models/m.xml"
    assert cache_in(tmp_path).directory_for("CPU", {"PERFORMANCE_HINT": "LATENCY"}, (ShapeBucket(8, 64),)) == directory


def test_a_directory_it_did_not_key_is_never_used(tmp_path, caplog):
    """The name is only a prefix of the digest: configuration.json must record the whole of it. A directory with the
    right name holding another digest, or blobs and no configuration.json, compiles without the cache."""
    cache = cache_in(tmp_path)
    directory = tmp_path / digest()[:DIGEST_CHARS]
    directory.mkdir()
    (directory / "1234.blob").write_bytes(b"someone else's")
    assert cache.directory_for("CPU", BASE["properties"], None) is None
    (directory / CONFIGURATION_FILE).write_text(json.dumps({"digest": "0" * 64}))
    assert cache.directory_for("CPU", BASE["properties"], None) is None
    assert "holds blobs of another configuration" in caplog.text


def test_an_unusable_cache_directory_means_no_cache_not_no_service(tmp_path, caplog):
    (tmp_path / "root").write_text("a file where the cache should be")
    assert cache_in(tmp_path / "root").directory_for("CPU", {}, None) is None
    assert "compiling without the cache" in caplog.text


def test_no_cache_dir_means_no_cache_and_no_hashing(tmp_path):
    assert open_compile_cache("", tmp_path / "missing.xml") is None

