"""The service: readiness and what /readyz reports (`render_readyz`), admission, deadlines, in-flight requests for the
drain, and the one scoring call the HTTP layer makes (`RerankService.score`). Knows nothing of sockets or of the
API dialects."""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import __version__
from .api import RequestLimits, RerankRequest
from .batcher import WorkLimits
from .checks import StartupCheck
from .config import Config
from .engine import EngineInfo, NpuBusyCounter
from .errors import BadRequestError, InferenceError, NotReadyError, OverloadedError
from .metrics import Metrics
from .modeldir import ModelFiles
from .parity import REFERENCE_PROPERTIES, ParityCheck, ReferenceScoresCheck
from .remoteimages import ImageFetcher
from .reranker import Reranker
from .scoring import ImageDocument, ScoredPairs

# ---- readiness and /readyz


@dataclass(frozen=True)
class ServedModel:
    """What serves, as /readyz reports it: fixed once the startup check passed."""

    model: ModelFiles
    head: Mapping[str, Any]  # the model head's description (kind, template, padding)
    engine: EngineInfo
    check: StartupCheck
    parity: ParityCheck
    config: Config
    versions: Mapping[str, str]
    tuning: Mapping[str, Any] | None = None  # cpu.Tuned.describe(): where the micro-batch defaults came from


def render_reference_scores(checked: ReferenceScoresCheck | None) -> dict | None:
    """/readyz's `reference_scores`: the model's own scores checked at startup; None when it has none."""
    if checked is None:
        return None
    return {"file": checked.source, "pairs": checked.pairs, "compared": checked.compared,
            "max_abs_diff": checked.max_abs_diff, "tolerance": checked.tolerance,
            "exact_max_abs_diff": checked.exact_max_abs_diff, "file_tolerance": checked.file_tolerance,
            "passed": checked.passed}


def render_readyz(ready: bool, reason: str, served: ServedModel | None) -> dict:
    body: dict[str, Any] = {"ready": ready, "reason": reason}
    if served is None:
        return body
    engine, parity, config = served.engine, served.parity, served.config
    body.update({
        "device": config.device,
        "execution_devices": list(engine.execution_devices),
        "model": served.model.name,
        "model_dir": str(served.model.model_dir),
        "model_file": str(served.model.xml.relative_to(served.model.model_dir)),
        "source": dict(served.model.source) or None,
        "head": dict(served.head),
        "max_length": served.model.max_length,
        "num_labels": engine.num_labels,
        "inputs": list(engine.input_names),
        "shape_mode": "static" if engine.buckets is not None else "dynamic",
        "buckets": [str(b) for b in engine.buckets] if engine.buckets is not None else None,
        "batch_size": config.batch_size,
        "pad_multiple": config.pad_multiple,
        "tuning": dict(served.tuning) if served.tuning is not None else None,
        "compile": {"ms": engine.compile_ms, "cache_dir": engine.cache_dir,
                    "loaded_from_cache": list(engine.loaded_from_cache),
                    "properties": dict(engine.properties), "infer_requests": engine.infer_requests,
                    "replicas": engine.replicas, "replicas_note": parity.replicas_note or None},
        "parity": {"max_abs_diff": parity.max_abs_diff, "tolerance": parity.tolerance,
                   "fallback": parity.fallback, "step": parity.step,
                   "failed_max_abs_diff": parity.failed_max_abs_diff,
                   "failed_properties": dict(parity.failed_properties) if parity.failed_properties else None,
                   "steps": [{"step": r.step.name, "properties": dict(r.step.properties),
                              "replicas": r.step.replicas, "infer_requests": r.infer_requests,
                              "max_abs_diff": r.max_abs_diff,
                              "reference_scores_max_abs_diff": r.reference_scores_max_abs_diff,
                              "passed": r.passed} for r in parity.steps],
                   "reference": "CPU, " + ", ".join(f"{k}={v}" for k, v in REFERENCE_PROPERTIES.items())},
        "reference_scores": render_reference_scores(parity.reference_scores),
        "graph": parity.graph.describe() if parity.graph is not None else None,
        "startup_check": {"ms": served.check.elapsed_ms, "npu_busy_delta_us": served.check.npu_busy_delta_us,
                          "npu_note": served.check.npu_note},
        "versions": dict(served.versions),
    })
    return body


class Readiness:
    """/readyz: started (the startup check passed), fewer than `failures_before_unready` inference failures in a
    row, and not draining. `reason` says which, or what startup is doing."""

    def __init__(self, failures_before_unready: int):
        self.failures_before_unready = failures_before_unready
        self.started = threading.Event()
        self.reason = "starting"
        self.draining = False
        self._lock = threading.Lock()
        self._consecutive_failures = 0
        self._last_failure = ""

    def record_inference(self, ok: bool, message: str = "") -> None:
        with self._lock:
            if ok:
                self._consecutive_failures = 0
            else:
                self._consecutive_failures += 1
                self._last_failure = message

    def is_ready(self) -> bool:
        return self.started.is_set() and not self.draining and \
            self._consecutive_failures < self.failures_before_unready

    def current_reason(self) -> str:
        if self.draining:
            return "draining: shutting down"
        if self.started.is_set() and self._consecutive_failures >= self.failures_before_unready:
            return f"{self._consecutive_failures} consecutive inference failures; last: {self._last_failure}"
        return self.reason


class Admission:
    """A bounded number of scoring requests (running or waiting for the device); beyond it, refused at once."""

    def __init__(self, limit: int):
        self.limit = limit
        self.admitted = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        with self._lock:
            if self.admitted >= self.limit:
                raise OverloadedError(f"{self.limit} scoring requests are already admitted (max_queued_requests); "
                                      f"retry shortly", headers={"Retry-After": "1"})
            self.admitted += 1
        try:
            yield
        finally:
            with self._lock:
                self.admitted -= 1


class InFlight:
    """HTTP requests being handled, so that a drain can wait for them."""

    def __init__(self):
        self.count = 0
        self._idle = threading.Condition()

    def enter(self) -> None:
        with self._idle:
            self.count += 1

    def leave(self) -> None:
        with self._idle:
            self.count -= 1
            if self.count == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self.count == 0, timeout_s)


class RerankService:
    """What the routes call. `score` is the whole scoring call: readiness, admission, deadline, the reranker,
    failure bookkeeping and metrics."""

    def __init__(self, config: Config, api_key: str = "", busy_counter: NpuBusyCounter | None = None):
        self.config = config
        self.api_key = api_key
        self.busy_counter = busy_counter
        self.limits = RequestLimits.from_config(config)
        self.fetcher = ImageFetcher(config.image_url_hosts, config.image_fetch_timeout_s, config.max_image_bytes)
        self.readiness = Readiness(config.failures_before_unready)
        self.admission = Admission(config.max_queued_requests)
        self.in_flight = InFlight()
        self.metrics = Metrics()
        self.reranker: Reranker | None = None
        self.served: ServedModel | None = None
        self.tuning: Mapping[str, Any] | None = None  # set by startup: cpu.Tuned.describe()

    # ---- lifecycle

    def mark_ready(self, reranker: Reranker, model: ModelFiles, engine_info: EngineInfo, check: StartupCheck,
                   parity: ParityCheck) -> None:
        import openvino
        import tokenizers

        self.reranker = reranker
        self.served = ServedModel(model, reranker.head.describe(), engine_info, check, parity, self.config, {
            "server": __version__, "openvino": openvino.get_version(), "tokenizers": tokenizers.__version__,
            "numpy": np.__version__, "python": sys.version.split()[0]}, self.tuning)
        self.readiness.reason = "ready"
        self.readiness.started.set()

    def start_draining(self) -> None:
        self.readiness.draining = True

    @property
    def draining(self) -> bool:
        return self.readiness.draining

    def release_model(self) -> None:
        """Free the compiled models while the process is still whole: OpenVINO objects destroyed during
        interpreter teardown have aborted the process ("terminate called without an active exception")."""
        self.readiness.reason = "shutting down: the model has been released"
        self.readiness.started.clear()
        if self.reranker is not None:
            self.reranker.close()
        self.reranker = None
        gc.collect()

    # ---- scoring

    @property
    def model_name(self) -> str:
        return self.served.model.name if self.served else ""

    def deadline(self, arrived: float, body_timeout_ms: int | None, header_timeout_ms: int | None) -> float:
        """time.monotonic() by which the request must be answered: the body's timeout_ms, else the header's, else
        request_timeout_ms, counted from the request's arrival."""
        timeout_ms = body_timeout_ms or header_timeout_ms or self.config.request_timeout_ms
        return arrived + timeout_ms / 1000

    def _require_ready(self) -> Reranker:
        if not self.readiness.started.is_set() or self.reranker is None:
            raise NotReadyError(f"not ready: {self.readiness.current_reason()}", headers={"Retry-After": "1"})
        return self.reranker

    def _check_images(self, request: RerankRequest, reranker: Reranker) -> None:
        """Image documents only for a model whose head takes them: else a 400 naming the model (the first image
        document named as the field)."""
        first = next((d for d in request.documents if d.is_image), None)
        if first is not None and not reranker.head.takes_images:
            raise BadRequestError(f"{first.image_field} is an image, but the model ({self.model_name}, a "
                                  f"{reranker.head.kind}) takes text only: image documents need a "
                                  f"vision-language model", request.names.entry(first.index))

    def fetch_images(self, request: RerankRequest, deadline: float,
                     client_gone: Callable[[], bool] | None = None) -> RerankRequest:
        """The request with its image URLs fetched (remoteimages: allowed hosts only, within limits), after the
        checks that would refuse it anyway (readiness, a text-only model) and within an admission slot. A request
        without image URLs is returned as it is."""
        if not any(d.image_url is not None and d.image is None for d in request.documents):
            return request
        self._check_images(request, self._require_ready())
        urls = [(d.image_url, d.image_field) for d in request.documents if d.image_url is not None and d.image is None]
        with self.admission.slot():
            fetched = self.fetcher.fetch_all(urls, deadline, client_gone)
        return replace(request, documents=tuple(
            replace(d, image=ImageDocument(fetched[d.image_url], d.text)) if d.image_url is not None and
            d.image is None else d for d in request.documents))

    def score(self, request: RerankRequest, deadline: float, client_gone: Callable[[], bool],
              use_cache: bool = True) -> ScoredPairs:
        """Scores of a request whose image URLs were fetched (`fetch_images`)."""
        reranker = self._require_ready()
        if request.instruction is not None and not reranker.head.takes_instruction:
            raise BadRequestError(f"instruction is not supported: the model ({self.model_name}, a "
                                  f"{reranker.head.kind}) takes no instruction", "instruction")
        self._check_images(request, reranker)
        limits = WorkLimits(deadline, self.config.max_total_tokens, client_gone, request.names)
        documents = [d.content for d in request.documents]
        with self.admission.slot():
            try:
                queries = [d.query or request.query for d in request.documents]
                scored = reranker.score_pairs(queries, documents, limits, request.truncation, use_cache,
                                              request.instruction)
            except InferenceError as exc:
                self.readiness.record_inference(False, exc.message)
                self.metrics.observe_failure()
                raise
        self.readiness.record_inference(True)
        self.metrics.observe_scoring(scored)
        return scored

    # ---- what the probes and /metrics read

    def scoring_stopped(self) -> str | None:
        """Why scoring has stopped for good (a batcher thread ended), or None."""
        return self.reranker.stopped_reason if self.reranker is not None else None

    def is_ready(self) -> bool:
        return self.readiness.is_ready() and not self.scoring_stopped()

    def readyz(self) -> tuple[bool, dict]:
        stopped = self.scoring_stopped()
        ready = self.is_ready()
        reason = f"scoring stopped: {stopped}" if stopped else self.readiness.current_reason()
        return ready, render_readyz(ready, reason, self.served)

    def render_metrics(self) -> str:
        gauges = {
            "queue_depth": ("Scoring requests admitted (running or waiting for the device).", self.admission.admitted),
            "in_flight_requests": ("HTTP requests being handled.", self.in_flight.count),
            "ready": ("1 when /readyz answers 200.", int(self.is_ready())),
        }
        served = self.served
        info = {"device": self.config.device,
                "execution_devices": ",".join(served.engine.execution_devices) if served else "",
                "model": self.model_name, "version": __version__,
                "openvino": served.versions.get("openvino", "") if served else ""}
        busy = self.busy_counter.read() if self.busy_counter else None
        cache = self.reranker.cache if self.reranker is not None else None
        counters = {} if cache is None else {
            "score_cache_hits_total": ("Pairs answered from the score cache.", cache.hits),
            "score_cache_misses_total": ("Pairs looked up in the score cache and scored by the model.", cache.misses)}
        if cache is not None:
            gauges["score_cache_entries"] = ("Pairs held in the score cache.", len(cache))
        images = getattr(self.reranker.engine, "images_encoded", None) if self.reranker is not None else None
        if images is not None:  # a vision-language model: how often its vision encoder ran, image by image
            counters["images_encoded_total"] = ("Images run through the vision encoder (not found by digest).", images)
        return self.metrics.render(gauges, info, busy, counters)
