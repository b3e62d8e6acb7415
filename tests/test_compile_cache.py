"""The compile cache's key (SPEC.md, "Compile cache"): a blob is reused only for the exact configuration that made
it, so every part of that configuration changes the digest, and a directory this service did not key is not used."""

import hashlib
import json
import os

import pytest

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

CONFIGURATION_FILE = "configuration.json"  # SPEC.md, "Compile cache": what each keyed directory holds


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

