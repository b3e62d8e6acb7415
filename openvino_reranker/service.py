"""Service state: readiness, admission, in-flight requests for the drain, and what /readyz reports."""

from __future__ import annotations

import gc
import sys
import threading
from typing import Any

import numpy as np

from . import __version__
from .api import RequestLimits
from .batcher import Reranker
from .checks import REFERENCE_PROPERTIES, ParityCheck, StartupCheck
from .config import Config
from .engine import EngineInfo, NpuBusyCounter
from .metrics import Metrics
from .modeldir import ModelFiles


class ServiceState:
    """What the routes read: whether startup passed (`started`), inference health, admission, drain state, the
    reranker once compiled, metrics, and what /readyz reports."""

    def __init__(self, config: Config, api_key: str = ""):
        self.config = config
        self.api_key = api_key
        self.limits = RequestLimits.from_config(config)
        self.started = threading.Event()
        self.reason = "starting"
        self.reranker: Reranker | None = None
        self.model_name = ""
        self.device = config.device
        self.details: dict[str, Any] = {}
        self.metrics = Metrics()
        self.draining = False
        self._lock = threading.Lock()
        self._in_flight = 0
        self._idle = threading.Condition(self._lock)
        self._consecutive_failures = 0
        self._last_failure = ""
        self._admitted = 0

    def mark_ready(self, reranker: Reranker, model: ModelFiles, engine_info: EngineInfo, check: StartupCheck,
                   parity: ParityCheck):
        import openvino
        import tokenizers

        self.reranker = reranker
        self.model_name = model.name
        self.device = self.config.device
        self.details = {
            "device": self.config.device,
            "execution_devices": list(engine_info.execution_devices),
            "model": model.name,
            "model_dir": str(model.model_dir),
            "max_length": model.max_length,
            "num_labels": engine_info.num_labels,
            "inputs": list(engine_info.input_names),
            "shape_mode": "static" if engine_info.buckets is not None else "dynamic",
            "buckets": [str(b) for b in engine_info.buckets] if engine_info.buckets is not None else None,
            "batch_size": self.config.batch_size,
            "compile": {"ms": engine_info.compile_ms, "cache_dir": self.config.cache_dir or None,
                        "loaded_from_cache": list(engine_info.loaded_from_cache),
                        "properties": dict(engine_info.properties), "infer_requests": engine_info.infer_requests},
            "parity": {"max_abs_diff": parity.max_abs_diff, "tolerance": parity.tolerance,
                       "fallback": parity.fallback, "failed_max_abs_diff": parity.failed_max_abs_diff,
                       "failed_properties": dict(parity.failed_properties) if parity.failed_properties else None,
                       "reference": "CPU, " + ", ".join(f"{k}={v}" for k, v in REFERENCE_PROPERTIES.items())},
            "startup_check": {"ms": check.elapsed_ms, "npu_busy_delta_us": check.npu_busy_delta_us,
                              "npu_note": check.npu_note},
            "versions": {"server": __version__, "openvino": openvino.get_version(),
                         "tokenizers": tokenizers.__version__, "numpy": np.__version__,
                         "python": sys.version.split()[0]},
        }
        self.reason = "ready"
        self.started.set()

    def release_model(self) -> None:
        """Free the compiled models while the process is still whole: OpenVINO objects destroyed during
        interpreter teardown have aborted the process ("terminate called without an active exception")."""
        self.started.clear()
        if self.reranker is not None:
            self.reranker.close()
        self.reranker = None
        gc.collect()

    # ---- readiness: started, inference healthy, not draining

    def record_inference(self, ok: bool, message: str = "") -> None:
        with self._lock:
            if ok:
                self._consecutive_failures = 0
                return
            self._consecutive_failures += 1
            self._last_failure = message
        self.metrics.observe_failure()

    def is_ready(self) -> bool:
        return self.started.is_set() and not self.draining and \
            self._consecutive_failures < self.config.failures_before_unready

    def describe(self) -> dict:
        reason = self.reason
        if self.draining:
            reason = "draining: shutting down"
        elif self.started.is_set() and self._consecutive_failures >= self.config.failures_before_unready:
            reason = f"{self._consecutive_failures} consecutive inference failures; last: {self._last_failure}"
        return {"ready": self.is_ready(), "reason": reason, **self.details}

    # ---- admission: a bounded number of scoring requests, refused at once beyond it

    def try_admit(self) -> bool:
        with self._lock:
            if self._admitted >= self.config.max_queued_requests:
                return False
            self._admitted += 1
            return True

    def release_admission(self) -> None:
        with self._lock:
            self._admitted -= 1

    # ---- in-flight requests, for the drain on shutdown

    def enter(self) -> None:
        with self._lock:
            self._in_flight += 1

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        with self._lock:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout_s)

    def render_metrics(self) -> str:
        gauges = {
            "queue_depth": ("Scoring requests admitted (running or waiting for the device).", self._admitted),
            "in_flight_requests": ("HTTP requests being handled.", self._in_flight),
            "ready": ("1 when /readyz answers 200.", int(self.is_ready())),
        }
        info = {"device": self.device, "execution_devices": ",".join(self.details.get("execution_devices", [])),
                "model": self.model_name, "version": __version__,
                "openvino": self.details.get("versions", {}).get("openvino", "")}
        busy = NpuBusyCounter(self.config.npu_busy_path).read() if "NPU" in self.config.device else None
        return self.metrics.render(gauges, info, busy)
