"""The compile-configuration guard: before serving, scores from the serving compile must match an f32
single-stream CPU compile of the same IR (and, when the model carries them, its own reference scores); a compile
that disagrees is replaced by the next step of the fallback ladder that scores right, or refused.

Why: some OpenVINO CPU configurations return wrong scores. On an AMX Xeon (OpenVINO 2026.4.1) every compile of an
IR with INT8 weights on several streams at the default bf16 precision scored garbage (logits off by 14-260), while
bf16 on one stream was right; upstream issue openvinotoolkit/openvino#38256 reports corrupted bf16 MatMul results on
CPUs with AVX512-BF16 but no AMX. And comparing two compiles of one IR cannot see a wrong prompt template, pad id or
tokenizer: the model's reference scores (referencescores.py) can. SPEC.md, "Startup parity guard" and "Reference
scores", is the contract.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from .compilecache import CompileCache
from .config import Config, ShapeBucket
from .cpu import UNTUNED, CpuInfo, apply_tuning, needs_tuning, read_cpu
from .encoding import ModelHead
from .engine import Engine, NpuBusyCounter, VisionIR, make_engine
from .errors import EXIT_DEVICE, EXIT_REFERENCE_SCORES, EXIT_STARTUP_CHECK, ServiceError, StartupError, error_reason
from .graphfacts import weights_only_compressed
from .graphopt import RowOnlyReport, pools_first_row, row_only_copy
from .referencescores import ReferencePair, ReferenceScores
from .reranker import Reranker
from .scoring import Document, ImageDocument

log = logging.getLogger("openvino_reranker")

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
# A vision-language model's parity documents add made-up page images (vision.synthetic_page: wide, tall and small,
# with and without text), so that the vision encoder's compile is compared with the f32 reference too.
PARITY_IMAGES = ((96, 64, 1, ""), (40, 90, 2, "Photovoltaic cells on a roof."), (30, 30, 3, ""))


def parity_documents(head: ModelHead) -> tuple[Document, ...]:
    """PARITY_DOCUMENTS, and for a head that takes images PARITY_IMAGES as image documents."""
    if not head.takes_images:
        return PARITY_DOCUMENTS
    from .vision import synthetic_page

    return PARITY_DOCUMENTS + tuple(ImageDocument(synthetic_page(w, h, seed), text)
                                    for w, h, seed, text in PARITY_IMAGES)


def reference_document(pair: ReferencePair) -> Document:
    """A reference pair's document: its text, or its image with that text."""
    return pair.document if pair.image is None else ImageDocument(pair.image, pair.document)


# f32 everywhere: on CPUs with AVX-512 or AMX the plugin otherwise quantizes the activations of INT8-weight
# MatMuls to int8 in groups of 32 (DYNAMIC_QUANTIZATION_GROUP_SIZE), which moved a tiny test model's scores by 1e-2.
EXACT_F32_CPU = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
REFERENCE_PROPERTIES = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", **EXACT_F32_CPU}


def serving_properties(config: Config) -> dict[str, str]:
    """Compile properties from the configuration. `f32` on the CPU means f32 arithmetic throughout, so it also turns
    off the dynamic quantization of activations."""
    hint = config.performance_hint if config.performance_hint != "auto" else UNTUNED.performance_hint
    props = {"PERFORMANCE_HINT": hint.upper()}
    if config.num_streams:
        props["NUM_STREAMS"] = str(config.num_streams)
    if config.inference_threads:
        props["INFERENCE_NUM_THREADS"] = str(config.inference_threads)
    if config.inference_precision == "f32" and config.device == "CPU":
        props.update(EXACT_F32_CPU)
    elif config.inference_precision != "default":
        props["INFERENCE_PRECISION_HINT"] = config.inference_precision
    return props


def replica_properties(config: Config, replicas: int, cpu: CpuInfo | None) -> dict[str, str]:
    """Compile properties of each of `replicas` side-by-side CPU compiles: one stream, its share of the cores as
    threads (`inference_threads` when given) and no pinning, which would put every replica's threads on the same
    cores (two replicas then ran at 0.65x one compile)."""
    props = serving_properties(config)
    if replicas <= 1:
        return props
    cores = cpu.cores if cpu is not None else replicas
    props.update({"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "ENABLE_CPU_PINNING": "NO",
                  "INFERENCE_NUM_THREADS": str(config.inference_threads or max(1, cores // replicas))})
    return props


def replicas_for(config: Config, model, auto: bool = True) -> tuple[int, str]:
    """How many replicas serve `model` (ReplicaSet), and why fewer than configured when so. More than one only for
    a CLS-pooled encoder, because one-thread compiles of the decoder test models (Qwen3, Llama, Nemotron) kill the
    process in OpenVINO 2026.4.1 (SIGFPE), which no guard can catch. And when the CPU's row chose them (`auto`),
    not for an INT8 weight-only IR, which two replicas scored slower than one compile (docs/performance.md)."""
    if config.replicas <= 1:
        return 1, ""
    if not pools_first_row(model):
        return 1, (f"{config.replicas} replicas configured, 1 serves: the model is not a CLS-pooled encoder, and "
                   f"one-thread bf16 compiles of decoder rerankers have crashed OpenVINO's CPU plugin (SIGFPE)")
    if auto and weights_only_compressed(model):
        return 1, (f"the CPU's default of {config.replicas} replicas is not applied: the IR has weight-only "
                   f"compressed (INT8/INT4) weights, which two replicas scored slower than one compile; "
                   f"--replicas {config.replicas} asks for them anyway")
    return config.replicas, ""


def safe_properties(device: str) -> dict[str, str]:
    """The ladder's last step: one stream, one request; on the CPU also f32 (the reference configuration itself)."""
    return dict(REFERENCE_PROPERTIES) if device == "CPU" else {"PERFORMANCE_HINT": "LATENCY"}


def one_stream_properties(config: Config) -> dict[str, str]:
    """The ladder's first fallback: what was asked for (precision, threads) on one stream: PERFORMANCE_HINT=LATENCY
    and, on the CPU, NUM_STREAMS=1."""
    asked = {k: v for k, v in serving_properties(config).items() if k not in ("PERFORMANCE_HINT", "NUM_STREAMS")}
    one_stream = {"PERFORMANCE_HINT": "LATENCY", **({"NUM_STREAMS": "1"} if config.device == "CPU" else {})}
    return {**one_stream, **asked}


def is_one_stream(properties: Mapping[str, str]) -> bool:
    """A configuration that already runs one stream: the LATENCY hint and no NUM_STREAMS above 1."""
    return properties.get("PERFORMANCE_HINT") == "LATENCY" and properties.get("NUM_STREAMS", "1") == "1"


@dataclass(frozen=True)
class LadderStep:
    """One compile configuration the guard may serve: `configured` (as asked), `one_stream` (the requested precision
    on one stream) or `safe` (`safe_properties`)."""

    name: str
    properties: Mapping[str, str]
    infer_requests: int  # 0: OpenVINO's OPTIMAL_NUMBER_OF_INFER_REQUESTS
    replicas: int = 1  # compiles side by side, each with `properties` (ReplicaSet)


def fallback_ladder(config: Config, replicas: int = 1, cpu: CpuInfo | None = None) -> tuple[LadderStep, ...]:
    """The configurations tried in order until one scores right: as configured (`replicas` compiles side by side
    when above 1); one compile on one stream (unless the first step already is exactly that); the safe
    configuration (unless a step before is exactly it). Each step after the first runs one infer request."""
    steps = [LadderStep("configured", replica_properties(config, replicas, cpu), config.infer_requests, replicas)]
    if not is_one_stream(steps[0].properties) or replicas > 1:
        steps.append(LadderStep("one_stream", one_stream_properties(config), 1))
    safe = safe_properties(config.device)
    if all(dict(step.properties) != safe for step in steps):
        steps.append(LadderStep("safe", safe, 1))
    return tuple(steps)


@dataclass(frozen=True)
class StepResult:
    """What one ladder step's compile scored: its largest difference from the f32 reference on the parity pairs and
    from the model's reference scores (None without them), and whether it passed both."""

    step: LadderStep
    max_abs_diff: float
    passed: bool
    infer_requests: int  # how many its compile ran (the step's own number, or OpenVINO's choice for 0)
    reference_scores_max_abs_diff: float | None = None


@dataclass(frozen=True)
class ReferenceScoresCheck:
    """The model's reference scores against the exact f32 CPU compile and against the compile that serves."""

    source: str
    pairs: int
    compared: int  # pairs truncated alike here and when the scores were made (see `same_truncation`)
    exact_max_abs_diff: float | None  # the f32 CPU reference compile; must be within file_tolerance
    max_abs_diff: float | None  # the compile that serves; must be within tolerance
    file_tolerance: float
    tolerance: float  # parity_tolerance + file_tolerance
    passed: bool | None  # None: no pair could be compared at this max_length


@dataclass(frozen=True)
class ParityCheck:
    max_abs_diff: float  # of the configuration now serving
    tolerance: float
    fallback: bool  # True: the configured compile disagreed and a later step of the ladder serves
    failed_max_abs_diff: float | None = None  # of the configured compile, when it was rejected
    failed_properties: Mapping[str, str] | None = None
    steps: tuple[StepResult, ...] = ()  # every step tried, in order; the last one serves
    reference_scores: ReferenceScoresCheck | None = None  # None: the model has no reference scores
    graph: RowOnlyReport | None = None  # what the pooled-row rewrite did to the served IR (never to the reference)
    replicas_note: str = ""  # why fewer replicas were compiled than configured (`replicas_for`), '' when not

    @property
    def step(self) -> str:
        return self.steps[-1].step.name if self.steps else "configured"


@dataclass(frozen=True)
class Reference:
    """What the exact f32 CPU compile scored: the parity pairs, and the model's reference pairs when it has them,
    with which of those can be compared (`same_truncation`)."""

    parity_scores: np.ndarray
    pair_scores: np.ndarray | None = None
    comparable: np.ndarray | None = None


def parity_diff(reranker: Reranker, reference: np.ndarray) -> float:
    """Score the parity pairs on every infer request at once (all streams busy), twice each, and return the
    largest score difference from `reference`."""
    runs = reranker.engine.num_requests * 2
    results: list[np.ndarray] = []
    errors: list[str] = []

    def run():
        try:
            results.append(reranker.score_pairs(PARITY_QUERY, parity_documents(reranker.head)).scores)
        except ServiceError as exc:
            errors.append(exc.message)
        except Exception as exc:  # the batcher hands engine surprises to the request; here they stop startup
            errors.append(error_reason(exc))

    threads = [threading.Thread(target=run) for _ in range(runs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise StartupError(f"startup inference failed: {errors[0]}", EXIT_STARTUP_CHECK)
    return float(max(np.abs(r - reference).max() for r in results))


def same_truncation(lengths: np.ndarray, truncated: np.ndarray, max_length: int, made_at: int | None) -> np.ndarray:
    """Which pairs were cut alike here (at `max_length`) and when the reference scores were made (at `made_at`, None:
    nothing was cut): pairs cut in neither, or cut in both at the same length."""
    if made_at is None:
        return ~truncated
    return np.where(truncated, max_length == made_at, lengths <= made_at)


def score_reference_pairs(reranker: Reranker, reference: ReferenceScores) -> tuple[np.ndarray, np.ndarray]:
    """The reference pairs' scores through the model head (template, truncation, padding) and this compile, one
    call per instruction, and which of them can be compared with the file's."""
    pairs = reference.pairs
    if not reranker.head.takes_images and any(pair.image is not None for pair in pairs):
        raise StartupError(f"the model's reference scores {reference.source} hold image documents but the model "
                           f"takes text only", EXIT_REFERENCE_SCORES)
    scores, comparable = np.empty(len(pairs)), np.zeros(len(pairs), dtype=bool)
    rows_by_instruction: dict[str | None, list[int]] = {}
    for n, pair in enumerate(pairs):
        rows_by_instruction.setdefault(pair.instruction, []).append(n)
    for instruction, rows in rows_by_instruction.items():
        try:
            scored = reranker.score_pairs([pairs[n].query for n in rows], [reference_document(pairs[n]) for n in rows],
                                          instruction=instruction)
        except ServiceError as exc:
            raise StartupError(f"scoring the reference pairs of {reference.source} failed: {exc.message}",
                               EXIT_STARTUP_CHECK) from None
        scores[rows] = scored.scores
        comparable[rows] = same_truncation(scored.lengths, scored.truncated, reranker.head.max_length,
                                           reference.max_length)
    return scores, comparable


def largest_diff(scores: np.ndarray, expected: np.ndarray, comparable: np.ndarray) -> float | None:
    """The largest |scores - expected| over the comparable pairs; None when there are none."""
    return float(np.abs(scores - expected)[comparable].max()) if comparable.any() else None


def expected_scores(reference: ReferenceScores) -> np.ndarray:
    return np.array([pair.score for pair in reference.pairs])


def check_exact(reference: Reference, scores: ReferenceScores, head: ModelHead) -> float | None:
    """The reference pairs on the exact f32 CPU compile must be within the file's tolerance of its scores: else the
    head (tokenizer, template, pad id) or the IR is not what the scores were made with, and no compile
    configuration can fix that (exit 9). Returns the largest difference (None: no pair comparable)."""
    diff = largest_diff(reference.pair_scores, expected_scores(scores), reference.comparable)
    if diff is None:
        log.warning("reference scores %s: none of its %d pairs can be compared at max_length %d (they were made at "
                    "%s); not checked", scores.source, len(scores.pairs), head.max_length, scores.max_length)
    elif diff > scores.tolerance:
        head_description = ", ".join(f"{k} {v}" for k, v in head.describe().items() if k in
                                     ("kind", "template", "pad_token_id"))
        raise StartupError(f"the model's reference scores {scores.source} disagree with its IR computed exactly: "
                           f"the f32 CPU compile, fed by the model head ({head_description}), scores its pairs up to "
                           f"{diff:.4g} away (tolerance {scores.tolerance}): the tokenizer, prompt template, pad id "
                           f"or IR is not what the scores were made with, which no compile configuration fixes",
                           EXIT_REFERENCE_SCORES)
    return diff


def describe_step(result: StepResult) -> str:
    text = f"{result.step.name} {dict(result.step.properties)} by {result.max_abs_diff:.4g}"
    if result.reference_scores_max_abs_diff is not None:
        text += f" (reference scores {result.reference_scores_max_abs_diff:.4g})"
    return text


def compile_checked(core, model, config: Config, head: ModelHead, buckets: tuple[ShapeBucket, ...] | None,
                    counter: NpuBusyCounter | None, before_compile: Callable[[ShapeBucket | None], None],
                    before_reference: Callable[[], None] = lambda: None, cache: CompileCache | None = None,
                    reference_scores: ReferenceScores | None = None, vision: VisionIR | None = None,
                    replicas_auto: bool | None = None) -> tuple[Reranker, Engine, ParityCheck]:
    """Compile for serving (through `cache`, each configuration in its own keyed directory), compare with the f32
    single-stream CPU reference on the parity pairs and, with `reference_scores`, with the model's own scores, and
    apply `on_parity_failure`: go down `fallback_ladder` until a step passes both (each compiled and checked), or
    refuse. Reference scores that the f32 reference compile itself misses stop startup (exit 9) whatever the policy.
    Returns what serves; on any failure (including a cancelled startup) nothing is left running. `replicas_auto`:
    whether `config.replicas` came from the CPU's row rather than the command line (None: it is still 0, auto,
    in `config`; `replicas_for`)."""
    cpu = read_cpu() if config.device == "CPU" else None
    if replicas_auto is None:
        replicas_auto = config.replicas == 0
    if needs_tuning(config):  # main() has applied the CPU's row; a caller that has not gets it here
        config = apply_tuning(config, cpu)[0]
    replicas, replicas_note = replicas_for(config, model, replicas_auto)
    if replicas_note:
        log.info("%s", replicas_note)
    reference: Reference | None = None
    exact_diff = None
    tolerance = config.parity_tolerance
    pairs_tolerance = tolerance + (reference_scores.tolerance if reference_scores is not None else 0.0)

    # the serving compiles get the pooled-row rewrite; the reference compiles `model` as read, so the parity check
    # compares the rewritten IR with the original on every start
    served_model, graph = row_only_copy(model, config.pooled_row_only == "on")

    original_cache = cache
    if cache is not None and graph.applied:  # the rewritten IR's blobs are keyed apart from the IR's as read
        cache = replace(cache, graph="pooled_row_only")

    def compile_served(step: LadderStep) -> Engine:
        """The serving compile of `step`; a rewritten IR that the device cannot compile (an NPU compiler may refuse
        a graph that the CPU takes) is served as read instead, saying why, rather than stopping startup."""
        nonlocal served_model, graph, cache
        try:
            return make_engine(core, served_model, config.device, buckets, step.properties, head.contract,
                               before_compile, step.infer_requests, cache, vision, step.replicas)
        except StartupError as exc:
            if served_model is model or exc.exit_code != EXIT_DEVICE:
                raise
            log.warning("the pooled-row rewrite does not compile on %s (%s): serving the IR as read", config.device,
                        exc)
            served_model, cache = model, original_cache
            graph = RowOnlyReport(False, reason=f"the rewritten IR did not compile on {config.device}: {exc}")
            return make_engine(core, model, config.device, buckets, step.properties, head.contract, before_compile,
                               step.infer_requests, cache, vision, step.replicas)

    def serve(step: LadderStep) -> tuple[Reranker, Engine, StepResult]:
        nonlocal reference, exact_diff
        engine = compile_served(step)
        reranker = Reranker(head, engine, config.batch_size, counter, pad_multiple=config.pad_multiple)
        try:
            if reference is None:
                before_reference()
                reference = _reference_scores(core, model, head, config.batch_size, reference_scores, vision)
                if reference_scores is not None:
                    exact_diff = check_exact(reference, reference_scores, head)
            diff = parity_diff(reranker, reference.parity_scores)
            for replica in getattr(engine, "replicas", ()):  # each replica is its own compile: check each alone
                alone = Reranker(head, replica, config.batch_size, pad_multiple=config.pad_multiple)
                try:
                    diff = max(diff, parity_diff(alone, reference.parity_scores))
                finally:
                    alone.close()
            pairs_diff = None
            if reference_scores is not None:
                scores, _ = score_reference_pairs(reranker, reference_scores)
                pairs_diff = largest_diff(scores, expected_scores(reference_scores), reference.comparable)
            passed = diff <= tolerance and (pairs_diff is None or pairs_diff <= pairs_tolerance)
            return reranker, engine, StepResult(step, diff, passed, engine.num_requests, pairs_diff)
        except BaseException:
            reranker.close()  # startup stops: nothing may keep the batcher's threads or the compiled model
            raise

    ladder = fallback_ladder(config, replicas, cpu)
    tried: list[StepResult] = []
    for n, step in enumerate(ladder):
        reranker, engine, result = serve(step)
        tried.append(result)
        if result.passed:
            first = tried[0]
            checked = None if reference_scores is None else ReferenceScoresCheck(
                reference_scores.source, len(reference_scores.pairs), int(reference.comparable.sum()), exact_diff,
                result.reference_scores_max_abs_diff, reference_scores.tolerance, pairs_tolerance,
                None if exact_diff is None else True)
            return reranker, engine, ParityCheck(
                result.max_abs_diff, tolerance, n > 0, None if n == 0 else first.max_abs_diff,
                None if n == 0 else dict(first.step.properties), tuple(tried), checked, graph, replicas_note)
        reranker.close()
        message = f"scores on {config.device} with {dict(step.properties)} differ"
        if result.max_abs_diff > tolerance:
            message += f" from the f32 single-stream CPU reference by {result.max_abs_diff:.4g} (tolerance {tolerance})"
        else:
            message += (f" from the model's reference scores {reference_scores.source} by "
                        f"{result.reference_scores_max_abs_diff:.4g} (tolerance {pairs_tolerance:.4g})")
        if config.on_parity_failure == "refuse":
            raise StartupError(message, EXIT_STARTUP_CHECK)
        if n + 1 < len(ladder):
            log.warning("%s; falling back to the next step of the ladder, %s %s", message, ladder[n + 1].name,
                        dict(ladder[n + 1].properties))
    raise StartupError(f"scores on {config.device} differ from the f32 single-stream CPU reference or the model's "
                       f"reference scores at every step: {'; '.join(map(describe_step, tried))} (tolerance "
                       f"{tolerance}{'' if reference_scores is None else f', reference scores {pairs_tolerance:.4g}'}"
                       f"): no step of the fallback ladder scores right", EXIT_STARTUP_CHECK)


def _reference_scores(core, model, head: ModelHead, batch_size: int,
                      reference_scores: ReferenceScores | None = None, vision: VisionIR | None = None) -> Reference:
    """The parity pairs' scores (and the model's reference pairs', when it has them) from a fresh compile of the
    reference configuration. It never reads or writes the compile cache (`cache=None` compiles with CACHE_DIR ""):
    a reference loaded from a blob could be the very blob that is wrong, and then agree with it."""
    vision = None if vision is None else VisionIR(vision.model, None, vision.tiles)
    reference = Reranker(head, make_engine(core, model, "CPU", None, REFERENCE_PROPERTIES, head.contract,
                                           infer_requests=1, cache=None, vision=vision), batch_size)
    try:
        parity_scores = reference.score_pairs(PARITY_QUERY, parity_documents(head)).scores
        if reference_scores is None:
            return Reference(parity_scores)
        return Reference(parity_scores, *score_reference_pairs(reference, reference_scores))
    except ServiceError as exc:  # e.g. weights that give NaN: no compile of this IR can be trusted
        raise StartupError(f"startup inference failed on the f32 CPU reference: {exc.message}",
                           EXIT_STARTUP_CHECK) from None
    finally:
        reference.close()
