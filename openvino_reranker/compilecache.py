"""The compile cache: OpenVINO's compiled blobs, one directory per compile configuration.

OpenVINO keys its own cache on the model and on some compile properties only: 2026.4 on the CPU leaves out
INFERENCE_PRECISION_HINT, so an f32 compile loaded the blob of an earlier bf16 compile (and the other way round,
which scored NaN or crashed). So no two configurations ever share a CACHE_DIR here: every compile is handed
`<cache dir>/<digest>/`, the digest of everything that makes its blob (the device, every compile property, OpenVINO's
version, the bytes of the IR's .xml and .bin, the shapes), and `configuration.json` beside the blobs says which
configuration they are. SPEC.md, "Compile cache", is the contract.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .config import ShapeBucket
from .errors import EXIT_CONFIG, EXIT_MODEL, StartupError

log = logging.getLogger("openvino_reranker")

CONFIGURATION_FILE = "configuration.json"
KEY_FORMAT = 1  # changes whenever what the digest covers changes, so that older directories are never read again
DIGEST_CHARS = 16  # of the sha256's hex digits in a directory name; configuration.json holds all 64
HASH_CHUNK_BYTES = 1 << 20


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks into one reused buffer (about 1 GB/s on a CPU with SHA
    instructions; the whole file is read: a weight changed anywhere must change the digest)."""
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


@dataclass(frozen=True)
class IrBytes:
    """The IR's identity for the cache: the sha256 of its .xml and of its .bin."""

    xml_sha256: str
    bin_sha256: str

    @classmethod
    def of(cls, xml_path: str | Path) -> IrBytes:
        xml = Path(xml_path)
        return cls(file_sha256(xml), file_sha256(xml.with_suffix(".bin")))


def shapes_label(buckets: Sequence[ShapeBucket] | None) -> str:
    """How the model is reshaped before it is compiled: `dynamic`, or its static buckets in compile order."""
    return "dynamic" if buckets is None else ",".join(map(str, buckets))


def compile_key(device: str, properties: Mapping[str, str], openvino_version: str, ir: IrBytes,
                buckets: Sequence[ShapeBucket] | None, graph: str = "") -> dict:
    """Everything that makes a compiled blob, as JSON values: what the digest covers. `graph` names a rewrite of the
    IR before compiling (graphopt.py), '' none."""
    key = {"format": KEY_FORMAT, "device": device, "properties": {str(k): str(v) for k, v in properties.items()},
           "openvino": openvino_version, "xml_sha256": ir.xml_sha256, "bin_sha256": ir.bin_sha256,
           "shapes": shapes_label(buckets)}
    if graph:
        key["graph"] = graph
    return key


def key_digest(key: Mapping) -> str:
    """The sha256 of the key's canonical JSON (sorted keys, no spaces): equal keys, equal digests."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read_digest(path: Path) -> str | None:
    """The digest a configuration.json records, or None when it is absent or unreadable."""
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return recorded.get("digest") if isinstance(recorded, dict) else None


def _write_atomically(path: Path, text: str) -> None:
    """Write beside `path` and rename over it, so that nobody ever reads half a file."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def claim_directory(directory: Path, digest: str, description: Mapping) -> bool:
    """Make `directory` the one for `digest`: create it and its configuration.json, or find them made by an earlier
    start. False when it holds something else (another digest, or files without a configuration.json): its
    blobs are not this configuration's and must not be read."""
    directory.mkdir(exist_ok=True)
    configuration = directory / CONFIGURATION_FILE
    if not configuration.exists():
        if any(not entry.name.startswith(f".{CONFIGURATION_FILE}.") for entry in directory.iterdir()):
            return False
        _write_atomically(configuration, json.dumps(description, indent=2) + "\n")
    return _read_digest(configuration) == digest


@dataclass(frozen=True)
class CompileCache:
    """The --cache-dir root and what every compile of this start shares: the IR's bytes and OpenVINO's version.
    `directory_for` gives each compile configuration its own directory under the root."""

    root: Path
    ir: IrBytes
    openvino_version: str
    ir_path: str = ""  # recorded in configuration.json for people; the key holds the IR's bytes, not its path
    graph: str = ""  # the rewrite the compiled IR went through (graphopt.py), '' none: in the key

    def directory_for(self, device: str, properties: Mapping[str, str],
                      buckets: Sequence[ShapeBucket] | None) -> Path | None:
        """The keyed directory to hand OpenVINO as CACHE_DIR for this compile, or None (no cache) when it cannot be
        made or holds something else; either is logged."""
        key = compile_key(device, properties, self.openvino_version, self.ir, buckets, self.graph)
        digest = key_digest(key)
        directory = self.root / digest[:DIGEST_CHARS]
        description = {"digest": digest, **key, "ir_path": self.ir_path,
                       "written_by": f"openvino-reranker {__version__}",
                       "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            claimed = claim_directory(directory, digest, description)
        except OSError as exc:
            log.warning("compiling without the cache: cannot use %s (%s)", directory, exc.strerror or exc)
            return None
        if not claimed:
            log.warning("compiling without the cache: %s holds blobs of another configuration (its %s does not "
                        "record digest %s); delete the directory", directory, CONFIGURATION_FILE, digest)
            return None
        return directory


def open_compile_cache(cache_dir: str, xml_path: str | Path, openvino_version: str | None = None
                       ) -> CompileCache | None:
    """The compile cache under `cache_dir` (created) for the IR at `xml_path` (hashed), or None when `cache_dir` is
    empty (the cache is off)."""
    if not cache_dir:
        return None
    root = Path(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create cache dir {cache_dir}: {exc.strerror}", EXIT_CONFIG) from None
    if openvino_version is None:
        import openvino

        openvino_version = openvino.get_version()
    started = time.perf_counter()
    try:
        ir = IrBytes.of(xml_path)
    except OSError as exc:
        raise StartupError(f"cannot read {exc.filename or xml_path}: {exc.strerror or exc}", EXIT_MODEL) from None
    size = Path(xml_path).stat().st_size + Path(xml_path).with_suffix(".bin").stat().st_size
    log.info("compile cache under %s: the IR's %.1f MB hashed in %.0f ms", root, size / 1e6,
             (time.perf_counter() - started) * 1000)
    return CompileCache(root, ir, openvino_version, str(xml_path))
