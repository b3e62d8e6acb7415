"""The OpenVINO engine: device checks, the NPU busy counter, compiled models and their infer requests."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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
                variant.reshape({name: [shape.rows, shape.length] for name in contract.input_names})
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
