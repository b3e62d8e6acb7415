"""The startup check: a fixed pair set through the full path and every compiled bucket; fails closed on the NPU."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .config import ENV_PREFIX, Config
from .engine import EngineInfo, NpuBusyCounter
from .errors import EXIT_STARTUP_CHECK, ServiceError, StartupError
from .reranker import Reranker
from .scoring import ImageDocument

SMOKE_QUERY = "what is the capital of france"
SMOKE_DOCUMENTS = (
    "Paris is the capital and largest city of France.",
    "Bread is baked from flour, water, salt and yeast.",
    "The Eiffel Tower in Paris was built for the 1889 World's Fair and is one of the most visited monuments in "
    "the world; it stands on the Champ de Mars beside the river Seine.",
)
BUCKET_PAIR = ("capital of france", ["Paris"])  # run once in every compiled bucket
SMOKE_IMAGE = (80, 56, 5)  # a vision-language model also scores a made-up page of this size (vision.synthetic_page)


@dataclass(frozen=True)
class StartupCheck:
    scores: tuple[float, ...]
    elapsed_ms: float
    npu_busy_delta_us: int | None
    npu_note: str


def check_startup(reranker: Reranker, engine_info: EngineInfo, config: Config,
                  counter: NpuBusyCounter | None) -> StartupCheck:
    """Score a fixed pair set through the full path and once more in every compiled bucket. On NPU, fail closed:
    the busy counter must have grown and EXECUTION_DEVICES must name the NPU."""
    before = counter.read() if counter else None
    t0 = time.perf_counter()
    try:
        head = reranker.head
        documents = SMOKE_DOCUMENTS
        if head.takes_images:  # the vision encoder runs too (on the NPU: its static tiles-per-call shape)
            from .vision import synthetic_page

            documents += (ImageDocument(synthetic_page(*SMOKE_IMAGE), SMOKE_DOCUMENTS[0]),)
        scored = reranker.score_pairs(SMOKE_QUERY, documents)
        encoded = head.encode(*BUCKET_PAIR)  # short: it must fit the shortest bucket
        for shape in engine_info.buckets or ():
            head.scores(reranker.engine.infer(head.feed(encoded, [0], shape), shape)[:1])
    except ServiceError as exc:
        raise StartupError(f"startup inference failed: {exc.message}", EXIT_STARTUP_CHECK) from None
    elapsed_ms = (time.perf_counter() - t0) * 1000
    after = counter.read() if counter else None
    delta = after - before if before is not None and after is not None else None
    if delta is not None:
        note = f"counter {config.npu_busy_path} grew by {delta} us during the startup inference"
    elif config.may_use_npu:
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
