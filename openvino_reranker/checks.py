"""Startup checks: the fail-closed startup inference and the compile-configuration parity guard."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .batcher import Reranker
from .batching import MicroBatch, pad_batch
from .config import ENV_PREFIX, Config
from .engine import EngineInfo, NpuBusyCounter
from .errors import EXIT_STARTUP_CHECK, ServiceError, StartupError, first_line
from .scoring import logits_to_scores

SMOKE_QUERY = "what is the capital of france"
SMOKE_DOCUMENTS = (
    "Paris is the capital and largest city of France.",
    "Bread is baked from flour, water, salt and yeast.",
    "The Eiffel Tower in Paris was built for the 1889 World's Fair and is one of the most visited monuments in "
    "the world; it stands on the Champ de Mars beside the river Seine.",
)

@dataclass(frozen=True)
class StartupCheck:
    scores: tuple[float, ...]
    elapsed_ms: float
    npu_busy_delta_us: int | None
    npu_note: str


def check_startup(reranker: Reranker, engine_info: EngineInfo, config: Config) -> StartupCheck:
    """Score a fixed pair set through the full path and once more in every compiled bucket. On NPU, fail closed:
    the busy counter must have grown and EXECUTION_DEVICES must name the NPU."""
    counter = NpuBusyCounter(config.npu_busy_path)
    before = counter.read()
    t0 = time.perf_counter()
    try:
        scored = reranker.score_pairs(SMOKE_QUERY, SMOKE_DOCUMENTS)
        encoded = reranker.encoder.encode(SMOKE_QUERY, SMOKE_DOCUMENTS[:1])
        for shape in engine_info.buckets or ():
            feed = pad_batch(encoded, MicroBatch((0,), shape, True), engine_info.input_names,
                             reranker.encoder.pad_id, reranker.engine.input_dtype)
            logits_to_scores(reranker.engine.infer(feed, shape)[:1])
    except ServiceError as exc:
        raise StartupError(f"startup inference failed: {exc.message}", EXIT_STARTUP_CHECK) from None
    elapsed_ms = (time.perf_counter() - t0) * 1000
    after = counter.read()
    delta = after - before if before is not None and after is not None else None
    if delta is not None:
        note = f"counter {config.npu_busy_path} grew by {delta} us during the startup inference"
    elif "NPU" in config.device:
        note = f"counter {config.npu_busy_path} is not readable"
    else:
        note = f"device is {config.device}"
    if config.is_npu:
        not_npu = [d for d in engine_info.execution_devices if not d.startswith("NPU")]
        if not engine_info.execution_devices or not_npu:
            raise StartupError(f"asked for {config.device} but OpenVINO executes on "
                               f"{', '.join(engine_info.execution_devices) or 'nothing'}", EXIT_STARTUP_CHECK)
        if delta is None:
            raise StartupError(f"cannot read the NPU busy counter {config.npu_busy_path or '(unset)'}, so NPU use "
                               f"cannot be proven (it needs Linux >= 6.10 with the intel_vpu driver; set "
                               f"{ENV_PREFIX}NPU_BUSY_PATH if it lives elsewhere)", EXIT_STARTUP_CHECK)
        if delta <= 0:
            raise StartupError(f"the NPU busy counter {config.npu_busy_path} did not grow during the startup "
                               f"inference (delta {delta} us): the NPU did not run it", EXIT_STARTUP_CHECK)
    return StartupCheck(tuple(float(s) for s in scored.scores), round(elapsed_ms, 1), delta, note)


# ---- the compile-configuration guard: serving scores must match an f32 single-stream CPU reference

PARITY_QUERY = "how do solar panels turn sunlight into electricity"
PARITY_DOCUMENTS = (
    "Solar panels are made of photovoltaic cells that convert sunlight directly into electricity.",
    "The museum is closed on Mondays.",
    "Photovoltaic modules produce direct current; an inverter turns it into the alternating current used at home, "
    "and the output depends on the angle of the panel, the temperature of the cells and the amount of cloud.",
    "Wind turbines generate power from moving air.",
    "A recipe for bread: flour, water, salt and yeast, kneaded and left to rise overnight before baking.",
    "Sunlight is made of photons. When photons strike a semiconductor such as silicon, they can knock electrons "
    "loose; an electric field built into the cell pushes those electrons in one direction, which is a current. "
    "Cells are wired together into modules, modules into arrays, and the array feeds a charge controller or an "
    "inverter. Efficiency of commercial panels is around twenty percent, limited by reflection, heat and the "
    "band gap of the material, and research cells made of several layers reach well above forty percent.",
    "Electricity",
    "The capital of France is Paris.",
)
REFERENCE_PROPERTIES = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_PRECISION_HINT": "f32"}


def serving_properties(config: Config) -> dict[str, str]:
    """Compile properties from the configuration."""
    props = {"PERFORMANCE_HINT": config.performance_hint.upper()}
    if config.num_streams:
        props["NUM_STREAMS"] = str(config.num_streams)
    if config.inference_threads:
        props["INFERENCE_NUM_THREADS"] = str(config.inference_threads)
    if config.inference_precision != "default":
        props["INFERENCE_PRECISION_HINT"] = config.inference_precision
    return props


def safe_properties(device: str) -> dict[str, str]:
    """The fallback: one stream, one request; on the CPU also f32 (the reference configuration itself)."""
    return dict(REFERENCE_PROPERTIES) if device == "CPU" else {"PERFORMANCE_HINT": "LATENCY"}


@dataclass(frozen=True)
class ParityCheck:
    max_abs_diff: float  # of the configuration now serving
    tolerance: float
    fallback: bool  # True: the configured compile disagreed and the safe one serves
    failed_max_abs_diff: float | None = None
    failed_properties: Mapping[str, str] | None = None


def parity_diff(reranker: Reranker, reference: np.ndarray) -> float:
    """Score the parity pairs on every infer request at once (all streams busy), twice each, and return the
    largest score difference from `reference`."""
    runs = max(1, getattr(reranker.engine, "num_requests", 1)) * 2
    results: list[np.ndarray] = []
    errors: list[str] = []

    def run():
        try:
            results.append(reranker.score_pairs(PARITY_QUERY, PARITY_DOCUMENTS).scores)
        except ServiceError as exc:
            errors.append(exc.message)
        except Exception as exc:  # the batcher hands engine surprises to the request; here they stop startup
            errors.append(first_line(exc))

    threads = [threading.Thread(target=run) for _ in range(runs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise StartupError(f"startup inference failed: {errors[0]}", EXIT_STARTUP_CHECK)
    return float(max(np.abs(r - reference).max() for r in results))
