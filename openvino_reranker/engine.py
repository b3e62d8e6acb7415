"""The OpenVINO engine: device checks, the NPU busy counter, compiled models and their infer requests."""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .compilecache import CompileCache
from .config import ENV_PREFIX, ShapeBucket
from .encoding import ModelContract
from .errors import (
    EXIT_DEVICE,
    EXIT_MODEL,
    DeadlineExceededError,
    InferenceError,
    StartupError,
    error_reason,
)
from .vision import pixel_values
from .visionhead import IMAGE_EMBEDS, IMAGE_ROWS


def check_device_available(device: str, available: Sequence[str]) -> None:
    """Raise StartupError unless `device` can run here; the message names what is available."""
    base_names = {d.split(".")[0] for d in available}
    if ":" in device:
        candidates = device.split(":", 1)[1].split(",")
        ok = any(c in available or c in base_names for c in candidates)
    elif device in ("AUTO", "MULTI", "HETERO"):
        ok = bool(available)
    else:
        ok = device in available or device in base_names
    if not ok:
        choices = ", ".join(available) or "none"
        raise StartupError(
            f"device {device} is not available on this machine (OpenVINO sees: {choices}); choose one with "
            f"--device {available[0] if available else 'CPU'} or {ENV_PREFIX}DEVICE", EXIT_DEVICE)


class NpuBusyCounter:
    """The ivpu driver's device-global NPU busy time in microseconds (sysfs `npu_busy_time_us`)."""

    def __init__(self, path: str):
        self.path = path

    def read(self) -> int | None:
        """The counter, or None when it cannot be read (no NPU, or a kernel older than 6.10)."""
        if not self.path:
            return None
        try:
            with open(self.path, "rb") as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None


@dataclass(frozen=True)
class EngineInfo:
    device: str
    execution_devices: tuple[str, ...]
    buckets: tuple[ShapeBucket, ...] | None  # None: dynamic shapes
    loaded_from_cache: tuple[bool, ...]  # one per compiled model
    cache_dir: str | None  # the keyed compile cache directory its models were compiled with; None: no cache
    compile_ms: float
    input_names: tuple[str, ...]
    num_labels: int
    properties: Mapping[str, str]
    infer_requests: int
    replicas: int = 1  # independent compiles side by side (ReplicaSet); each has its share of infer_requests


@runtime_checkable
class InferenceEngine(Protocol):
    """What the batcher, the startup check and the parity guard use of an engine: `Engine`, or a test's stand-in."""

    buckets: tuple[ShapeBucket, ...] | None  # the compiled static shapes; None: dynamic shapes
    num_requests: int  # infer requests per compiled model (at least 1): how many batches may run at once

    def infer(self, feed: Mapping[str, np.ndarray], shape: ShapeBucket | None,
              deadline: float | None = None) -> np.ndarray:
        """One batch's logits as float32 [rows, num_labels]; waiting for the device past `deadline`
        (time.monotonic()) is a DeadlineExceededError, a failure an InferenceError."""
        ...


class Engine:
    """Compiled OpenVINO model(s) and a pool of infer requests per compiled model. `infer(feed, shape)` returns the
    contract's logits output as float32 [rows, num_labels]. Knows nothing about HTTP, JSON, tokens or scores.

    Every compile names its CACHE_DIR: the directory `cache` keys to this device, these properties and these shapes,
    or "" (no cache) without one, so that no CACHE_DIR set on the Core can be used instead. An `InferenceEngine`."""

    def __init__(self, core, model, device: str, buckets: Sequence[ShapeBucket] | None, properties: Mapping,
                 contract: ModelContract, before_compile: Callable[[ShapeBucket | None], None] = lambda shape: None,
                 infer_requests: int = 0, cache: CompileCache | None = None):
        self.contract = contract
        self.device = device
        self.buckets = tuple(buckets) if buckets is not None else None
        self._compiled: dict[ShapeBucket | None, Any] = {}
        self._pools: dict[ShapeBucket | None, queue.Queue] = {}
        started = time.perf_counter()
        self.cache_dir = cache.directory_for(device, properties, self.buckets) if cache is not None else None
        compile_properties = {**properties, "CACHE_DIR": str(self.cache_dir) if self.cache_dir else ""}
        for shape in (self.buckets or (None,)):
            before_compile(shape)
            variant = model
            if shape is not None:
                variant = model.clone()
                variant.reshape({name: [shape.rows, shape.length, *_fixed_tail(model, name)]
                                 for name in contract.input_names})
            try:
                compiled = core.compile_model(variant, device, compile_properties)
            except RuntimeError as exc:
                where = f" for shape {shape}" if shape else ""
                raise StartupError(f"compiling the model on {device}{where} failed: {error_reason(exc)}",
                                   EXIT_DEVICE) from None
            self._compiled[shape] = compiled
            pool: queue.Queue = queue.Queue()
            self.num_requests = infer_requests or max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
            for _ in range(self.num_requests):
                pool.put(compiled.create_infer_request())
            self._pools[shape] = pool
        self.compile_ms = (time.perf_counter() - started) * 1000
        self.properties = dict(properties)

    def info(self) -> EngineInfo:
        devices: list[str] = []
        cached = []
        for compiled in self._compiled.values():
            for d in compiled.get_property("EXECUTION_DEVICES"):
                if d not in devices:
                    devices.append(d)
            try:
                cached.append(bool(compiled.get_property("LOADED_FROM_CACHE")))
            except RuntimeError:
                cached.append(False)
        return EngineInfo(self.device, tuple(devices), self.buckets, tuple(cached),
                          str(self.cache_dir) if self.cache_dir else None, round(self.compile_ms, 1),
                          self.contract.input_names, self.contract.num_labels, self.properties, self.num_requests)

    def infer(self, feed: Mapping[str, np.ndarray], shape: ShapeBucket | None,
              deadline: float | None = None) -> np.ndarray:
        """Run one batch on a free infer request and return its logits. Waiting for a request past `deadline`
        (time.monotonic()) is a 504."""
        pool = self._pools[shape if self.buckets is not None else None]
        try:
            request = pool.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise DeadlineExceededError("the request's deadline passed while it waited for the device") from None
        try:
            result = request.infer(feed)
            return np.array(result[self.contract.output_index], dtype=np.float32, copy=True)
        except RuntimeError as exc:
            raise InferenceError(f"inference failed: {error_reason(exc)}") from None
        finally:
            pool.put(request)


class ReplicaSet:
    """Independent compiles of one model (`Engine`s of one stream each, with a share of the cores), run side by
    side: `infer` runs a batch on whichever replica is free. On a CPU where one compile's threads spend much of a
    small model's call waiting for each other, two one-thread compiles score more pairs per second than one
    two-thread compile, and unlike two streams of one compile they share no weights (a two-stream compile of an
    INT8 weight-only IR scores garbage on AMX; docs/performance.md). Each replica holds its own compiled weights.
    The parity guard checks every replica (`replicas`). An `InferenceEngine`."""

    def __init__(self, engines: Sequence[Engine]):
        if not engines:
            raise ValueError("a ReplicaSet needs at least one engine")
        self.replicas = tuple(engines)
        first = self.replicas[0]
        self.buckets, self.contract, self.device = first.buckets, first.contract, first.device
        self.properties, self.cache_dir = first.properties, first.cache_dir
        self.num_requests = sum(engine.num_requests for engine in self.replicas)
        self._free: queue.Queue = queue.Queue()
        for engine in self.replicas:
            for _ in range(engine.num_requests):
                self._free.put(engine)

    @property
    def compile_ms(self) -> float:
        return sum(engine.compile_ms for engine in self.replicas)

    def info(self) -> EngineInfo:
        infos = [engine.info() for engine in self.replicas]
        return replace(infos[0], loaded_from_cache=tuple(c for info in infos for c in info.loaded_from_cache),
                       compile_ms=round(self.compile_ms, 1), infer_requests=self.num_requests,
                       replicas=len(self.replicas))

    def infer(self, feed: Mapping[str, np.ndarray], shape: ShapeBucket | None,
              deadline: float | None = None) -> np.ndarray:
        """Run one batch on a free replica (`Engine.infer`)."""
        try:
            engine = self._free.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise DeadlineExceededError("the request's deadline passed while it waited for the device") from None
        try:
            return engine.infer(feed, shape, deadline)
        finally:
            self._free.put(engine)


def _fixed_tail(model, name: str) -> list[int]:
    """The static dimensions after [batch, sequence] of an input (image_embeds' hidden size), for a reshape."""
    shape = model.input(name).get_partial_shape()
    return [shape[i].get_length() for i in range(2, shape.rank.get_length())]


# ---- the vision encoder of a vision-language reranker

VISION_INPUT = "pixel_values"
VISION_OUTPUT = IMAGE_EMBEDS
VISION_CACHE_BYTES = 256 << 20  # image embeddings kept by digest: about 40 images of 3 tiles of the real model
DYNAMIC_TILES_PER_CALL = 16  # with dynamic shapes, tiles per vision call at most (bounds its memory)


@dataclass(frozen=True)
class VisionIR:
    """A vision-language model's vision encoder + projector IR (pixel_values [tiles, 3, size, size] -> image_embeds
    [tiles, tokens per tile, hidden]), the compile cache keyed to its own bytes, and the tiles of one call with
    static shapes (one image's most: the grid's maximum plus the thumbnail)."""

    model: Any
    cache: CompileCache | None
    tiles: int


class VisionEncoder:
    """The compiled vision IR and its infer requests: `embed(pixel_values)` -> [tiles, tokens, hidden] float32. With
    static shapes (whenever the language model has buckets, which the NPU needs) it is compiled for `tiles` tiles
    per call and a call's spare tiles are zeros whose output is dropped; else the tiles dimension is dynamic."""

    def __init__(self, core, model, device: str, tiles: int | None, properties: Mapping, infer_requests: int,
                 cache: CompileCache | None = None):
        self.tiles = tiles
        started = time.perf_counter()
        shape = model.input(VISION_INPUT).get_partial_shape()
        self.size = shape[2].get_length()
        bucket = None if tiles is None else (ShapeBucket(tiles, self.size),)
        self.cache_dir = cache.directory_for(device, properties, bucket) if cache is not None else None
        variant = model
        if tiles is not None:
            variant = model.clone()
            variant.reshape({VISION_INPUT: [tiles, 3, self.size, self.size]})
        try:
            self.compiled = core.compile_model(variant, device, {**properties, "CACHE_DIR": str(self.cache_dir or "")})
        except RuntimeError as exc:
            raise StartupError(f"compiling the vision encoder on {device} failed: {error_reason(exc)}",
                               EXIT_DEVICE) from None
        self.pool: queue.Queue = queue.Queue()
        for _ in range(max(1, infer_requests)):
            self.pool.put(self.compiled.create_infer_request())
        self.compile_ms = (time.perf_counter() - started) * 1000

    def embed(self, pixels: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """The embeddings of float32 pixel_values [n, 3, size, size], in calls of `tiles` (static) or at most
        DYNAMIC_TILES_PER_CALL tiles."""
        step = self.tiles or DYNAMIC_TILES_PER_CALL
        out = []
        for start in range(0, len(pixels), step):
            chunk = pixels[start:start + step]
            n = len(chunk)
            if self.tiles is not None and n < self.tiles:
                chunk = np.concatenate([chunk, np.zeros((self.tiles - n, *chunk.shape[1:]), np.float32)])
            try:
                request = self.pool.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise DeadlineExceededError("the request's deadline passed while it waited for the device") from None
            try:
                result = request.infer({VISION_INPUT: chunk})
                out.append(np.array(result[0][:n], dtype=np.float32, copy=True))
            except RuntimeError as exc:
                raise InferenceError(f"the vision encoder failed: {error_reason(exc)}") from None
            finally:
                self.pool.put(request)
        return np.concatenate(out)


class EmbeddingCache:
    """Image embeddings by the image's digest, least recently used out once over `max_bytes`: an image seen again
    (another query, another request, the other rows of a batch) is not encoded again."""

    def __init__(self, max_bytes: int = VISION_CACHE_BYTES):
        self.max_bytes, self.bytes = max_bytes, 0
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.encoded = 0  # images run through the vision encoder (a test's and a benchmark's counter)

    def get(self, digest: str) -> np.ndarray | None:
        with self._lock:
            value = self._entries.get(digest)
            if value is not None:
                self._entries.move_to_end(digest)
            return value

    def put(self, digest: str, value: np.ndarray) -> None:
        with self._lock:
            if digest in self._entries or value.nbytes > self.max_bytes:
                return
            self._entries[digest] = value
            self.bytes += value.nbytes
            while self.bytes > self.max_bytes:
                self.bytes -= self._entries.popitem(last=False)[1].nbytes


class VisionLanguageEngine:
    """A vision-language reranker's two compiled IRs as one `InferenceEngine`: `infer` takes a VisionLanguageHead's
    feed, runs the vision encoder once for the batch's distinct images that the embedding cache does not hold (the
    images of every request whose pairs share the batch, in one call), writes their embeddings into `image_embeds`
    at each row's <IMG_CONTEXT> columns (zeros elsewhere) and runs the language model. Both IRs run on the same
    device; the language model's infer requests bound how many batches run at once."""

    def __init__(self, lm: Engine, vision: VisionEncoder, hidden_size: int, cache: EmbeddingCache | None = None):
        self.lm, self.vision, self.hidden_size = lm, vision, hidden_size
        self.cache = cache or EmbeddingCache()
        self.buckets, self.num_requests, self.contract = lm.buckets, lm.num_requests, lm.contract
        self.device, self.properties, self.cache_dir = lm.device, lm.properties, lm.cache_dir
        self.compile_ms = lm.compile_ms + vision.compile_ms

    @property
    def images_encoded(self) -> int:
        """Images run through the vision encoder so far (GET /metrics: `images_encoded_total`)."""
        return self.cache.encoded

    def info(self) -> EngineInfo:
        info = self.lm.info()
        devices = list(info.execution_devices)
        devices += [d for d in self.vision.compiled.get_property("EXECUTION_DEVICES") if d not in devices]
        try:
            cached = bool(self.vision.compiled.get_property("LOADED_FROM_CACHE"))
        except RuntimeError:
            cached = False
        return EngineInfo(info.device, tuple(devices), info.buckets, (*info.loaded_from_cache, cached),
                          info.cache_dir, round(self.compile_ms, 1), info.input_names, info.num_labels,
                          info.properties, info.infer_requests)

    def image_embeddings(self, pictures, deadline: float | None = None) -> dict[str, np.ndarray]:
        """[tokens, hidden] per distinct image digest: from the cache, or all missing ones in one vision run."""
        found, missing = {}, {}
        for picture in pictures:
            if picture.digest in found or picture.digest in missing:
                continue
            cached = self.cache.get(picture.digest)
            if cached is None:
                missing[picture.digest] = picture
            else:
                found[picture.digest] = cached
        if missing:
            order = list(missing.values())
            embeds = self.vision.embed(pixel_values(np.concatenate([p.tiles for p in order])), deadline)
            start = 0
            for picture in order:
                value = embeds[start:start + picture.count].reshape(-1, self.hidden_size)
                start += picture.count
                found[picture.digest] = value
                self.cache.put(picture.digest, value)
            self.cache.encoded += len(order)
        return found

    def infer(self, feed: Mapping[str, np.ndarray], shape: ShapeBucket | None,
              deadline: float | None = None) -> np.ndarray:
        feed = dict(feed)
        image_rows = feed.pop(IMAGE_ROWS, ())
        ids = feed["input_ids"]
        embeds = np.zeros((*ids.shape, self.hidden_size), dtype=np.float32)
        if image_rows:
            found = self.image_embeddings([picture for _, picture, _ in image_rows], deadline)
            for row, picture, column in image_rows:
                embeds[row, column:column + picture.tokens] = found[picture.digest]
        feed[IMAGE_EMBEDS] = embeds
        return self.lm.infer(feed, shape, deadline)


def make_engine(core, model, device: str, buckets: Sequence[ShapeBucket] | None, properties: Mapping,
                contract: ModelContract, before_compile: Callable[[ShapeBucket | None], None] = lambda shape: None,
                infer_requests: int = 0, cache: CompileCache | None = None, vision: VisionIR | None = None,
                replicas: int = 1):
    """An `Engine`; with `replicas` above 1 a `ReplicaSet` of that many (text models only); or for a
    vision-language model (`vision`) a `VisionLanguageEngine` whose vision encoder is compiled with the same device
    and properties (static `vision.tiles` per call when `buckets` are static)."""
    if replicas > 1:
        if vision is not None:
            raise ValueError("replicas are for text models")
        return ReplicaSet([Engine(core, model, device, buckets, properties, contract, before_compile, infer_requests,
                                  cache) for _ in range(replicas)])
    lm = Engine(core, model, device, buckets, properties, contract, before_compile, infer_requests, cache)
    if vision is None:
        return lm
    hidden = model.input(IMAGE_EMBEDS).get_partial_shape()[2].get_length()
    if vision.model.output(0).get_partial_shape()[2].get_length() != hidden:
        raise StartupError(f"the vision IR's {VISION_OUTPUT} and the language model's {IMAGE_EMBEDS} differ in "
                           f"hidden size", EXIT_MODEL)
    before_compile(None)
    encoder = VisionEncoder(core, vision.model, device, vision.tiles if buckets is not None else None, properties,
                            lm.num_requests, vision.cache)
    return VisionLanguageEngine(lm, encoder, hidden)


def open_core(device: str, core=None):
    """An OpenVINO Core (or the stand-in tests inject) that can run `device`. It gets no CACHE_DIR: a Core's
    CACHE_DIR would serve every compile of the process, whatever its configuration (see `Engine`)."""
    if core is None:
        import openvino as ov

        core = ov.Core()
    check_device_available(device, list(core.available_devices))
    return core


def read_model(core, xml_path):
    try:
        return core.read_model(str(xml_path))
    except RuntimeError as exc:
        raise StartupError(f"cannot read {xml_path}: {error_reason(exc)}", EXIT_MODEL) from None
