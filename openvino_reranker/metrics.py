"""Prometheus text metrics; never holds request text."""

from __future__ import annotations

import threading
from collections.abc import Mapping

from .scoring import ScoredPairs

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self):
        self.buckets = [0] * len(LATENCY_BUCKETS_S)
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.sum += seconds
        for i, bound in enumerate(LATENCY_BUCKETS_S):
            if seconds <= bound:
                self.buckets[i] += 1

    def render(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        lines = [f'{name}_bucket{{{labels}{sep}le="{bound}"}} {n}' for bound, n in zip(LATENCY_BUCKETS_S,
                                                                                      self.buckets, strict=True)]
        lines.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        suffix = f"{{{labels}}}" if labels else ""
        return [*lines, f"{name}_sum{suffix} {self.sum:.6f}", f"{name}_count{suffix} {self.count}"]


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Counters and histograms for GET /metrics (Prometheus text format 0.0.4). Never holds request text."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.durations: dict[str, Histogram] = {}
        self.stages = {stage: Histogram() for stage in ("queue", "tokenize", "infer")}
        self.pairs = 0
        self.tokens = 0
        self.inference_failures = 0

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """`route` is a route label: a known path, or "other" (never the raw path a client sent)."""
        with self.lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
            self.durations.setdefault(route, Histogram()).observe(seconds)

    def observe_scoring(self, scored: ScoredPairs) -> None:
        with self.lock:
            self.pairs += len(scored.scores)
            self.tokens += int(scored.lengths.sum())
            self.stages["queue"].observe(scored.queue_ms / 1000)
            self.stages["tokenize"].observe(scored.tokenize_ms / 1000)
            self.stages["infer"].observe(scored.infer_ms / 1000)

    def observe_failure(self) -> None:
        with self.lock:
            self.inference_failures += 1

    def render(self, gauges: Mapping[str, tuple[str, float]], info: Mapping[str, str],
               npu_busy_us: int | None, counters: Mapping[str, tuple[str, float]] | None = None) -> str:
        p = "openvino_reranker_"
        out = []

        def family(name, kind, help_text):
            out.extend([f"# HELP {p}{name} {help_text}", f"# TYPE {p}{name} {kind}"])

        with self.lock:
            family("requests_total", "counter", "HTTP requests by route and status.")
            for (route, status), n in sorted(self.requests.items()):
                out.append(f'{p}requests_total{{route="{route}",status="{status}"}} {n}')
            family("request_duration_seconds", "histogram", "Time from request start to response, by route.")
            for route, hist in sorted(self.durations.items()):
                out.extend(hist.render(f"{p}request_duration_seconds", f'route="{route}"'))
            family("stage_duration_seconds", "histogram",
                   "Scoring stages: queue (waiting for the device), tokenize, infer.")
            for stage, hist in self.stages.items():
                out.extend(hist.render(f"{p}stage_duration_seconds", f'stage="{stage}"'))
            for name, value, help_text in (
                    ("pairs_scored_total", self.pairs, "(query, document) pairs scored."),
                    ("tokens_scored_total", self.tokens, "Tokens scored, padding excluded."),
                    ("inference_failures_total", self.inference_failures, "Failed inferences.")):
                family(name, "counter", help_text)
                out.append(f"{p}{name} {value}")
        for name, (help_text, value) in gauges.items():
            family(name, "gauge", help_text)
            out.append(f"{p}{name} {value}")
        for name, (help_text, value) in (counters or {}).items():
            family(name, "counter", help_text)
            out.append(f"{p}{name} {value}")
        family("info", "gauge", "Device, model and versions; the value is always 1.")
        labels = ",".join(f'{k}="{_label(v)}"' for k, v in info.items())
        out.append(f"{p}info{{{labels}}} 1")
        if npu_busy_us is not None:
            family("npu_busy_time_microseconds", "counter", "The NPU's busy-time counter (device-global, sysfs).")
            out.append(f"{p}npu_busy_time_microseconds {npu_busy_us}")
        return "\n".join(out) + "\n"
