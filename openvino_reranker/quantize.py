"""`openvino-reranker quantize`: a fully quantized INT8 IR (weights and activations) of a model the server serves,
calibrated with NNCF's post-training quantization on (query, document) pairs fed through the model's own head, and
a report of how far its scores and rankings moved.

The model is found as the server finds it (a directory or a Hub id, `modeldir`), its head writes each calibration
pair exactly as the server writes a request's pairs (template, truncation, input dtype), and `nncf.quantize` runs
on the OpenVINO model itself: no torch. The output directory is served as is. Agreement is measured in this process
through the real head, engine and `Reranker.score_pairs`, the original and the quantized IR both compiled on the CPU
at f32, on held-out pairs that calibration never saw; with a BEIR dataset and a run, `evaluate`'s metrics too. NNCF
is imported only here, and only when the command runs: the server needs openvino, tokenizers and numpy alone.
docs/models.md, "openvino-reranker quantize", is the contract.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from . import __version__, referencescores
from .config import QUANTIZE_COMMAND, OneLineArgumentParser, ShapeBucket, int_argument, invoked_as, load_config
from .encoding import ModelHead, load_tokenizer
from .engine import Engine, open_core, read_model
from .errors import EXIT_CONFIG, EXIT_MODEL, ServiceError, StartupError, error_reason
from .graphfacts import QUANTIZED_OPS, is_quantized, matmul_summary
from .modeldir import TEMPLATE_FILE, ModelFiles, load_model_files, locate_model, make_head
from .parity import REFERENCE_PROPERTIES
from .ranking import ServiceRun, agreement, build_report, load_evalset
from .reranker import Reranker

EXIT_BAD_INPUT = EXIT_CONFIG  # 2: a bad argument, calibration file, eval file or output directory
EXIT_NO_NNCF = 3  # NNCF is not installed
EXIT_QUANTIZE_FAILED = 6  # NNCF failed, or the quantized IR does not score (an inference error, a non-finite score)
EXIT_INTERRUPTED = 130

INSTALL_HINT = "pip install '.[quantize]' in a checkout, or pip install 'openvino-reranker[quantize]'"
OUTPUT_IR = "openvino_model.xml"  # the server's default IR search finds it at the root of the output
REPORT_FILE = "quantization_report.json"
PRODUCED_BY = "openvino-reranker quantize"  # the report's marker: a directory holding it may be overwritten
BUILTIN_CALIBRATION = "calibration_pairs.jsonl"  # package data: tools/make_calibration_pairs.py writes it
# Files that hold weights: never copied into the output (the quantized IR replaces the model's weights)
WEIGHT_SUFFIXES = (".xml", ".bin", ".onnx", ".onnx_data", ".safetensors", ".pt", ".pth", ".ckpt", ".h5", ".msgpack",
                   ".gguf", ".tflite")
# Issue 17.2's reference scores beside the IR: the original model's scores of a few pairs, checked at startup within
# the file's tolerance of an exact f32 run of the IR. The quantized IR is further from them than the export was, so
# the copy gets a tolerance that covers the quantization (reference_scores_for_quantized).
REFERENCE_SCORES_FILE = referencescores.FILE_NAME
REFERENCE_SCORES_FORMAT = referencescores.FORMAT
REFERENCE_SCORES_BATCH = 8  # the server's default batch size: the startup check scores the pairs in such batches
MAX_REFERENCE_TOLERANCE = 0.5  # the file's tolerance must stay below 1
HELD_OUT_SHARE = 5  # one query in five (by the digest of its text) is held out of calibration
MAX_HELD_OUT_PAIRS = 400  # the report's agreement is measured on at most this many pairs
# The report scores each pair alone (a batch of one, padded to a multiple of 8 tokens as the server pads): a
# quantized decoder's score moves a little with its padding (see ignored_types), so a pair that shared a batch with
# pairs 400 tokens longer could move by 0.015 in score, which is the batching's doing, not the quantization's.
SCORING_BATCH = 1
# NNCF's settings and why (SPEC.md): the transformer model type adds NNCF's transformer patterns (no quantizers where
# transformers are known to lose accuracy) and turns on SmoothQuant; the mixed preset is NNCF's default for
# transformers and what the published qint8 IRs were made with; target ANY keeps the graph loadable on the CPU, GPU
# and NPU.
NNCF_SETTINGS = {"model_type": "transformer", "preset": "mixed", "target_device": "ANY", "fast_bias_correction": True}


class QuantizeError(StartupError):
    """Stops the command: one line on stderr and its exit code, as a StartupError stops the server."""


def bad_input(message: str) -> QuantizeError:
    return QuantizeError(message, EXIT_BAD_INPUT)


# ---------------------------------------------------------------------------------------------- calibration pairs


@dataclass(frozen=True)
class Pair:
    query: str
    document: str


def read_pairs(lines: Sequence[str], source: str) -> list[Pair]:
    """JSON lines `{"query": ..., "document": ...}` (other keys are ignored), both non-empty strings; blank lines are
    skipped. ValueError naming `source` and the line."""
    pairs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ValueError(f"{source} line {number}: not JSON") from None
        if not isinstance(record, dict):
            raise ValueError(f"{source} line {number}: not a JSON object")
        for key in ("query", "document"):
            value = record.get(key)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{source} line {number}: \"{key}\" must be a non-empty string")
        pairs.append(Pair(record["query"], record["document"]))
    if not pairs:
        raise ValueError(f"{source} holds no pairs")
    return pairs


def builtin_pairs() -> list[Pair]:
    """The built-in calibration set shipped with the package (general-knowledge questions and passages written for
    this project; tools/make_calibration_pairs.py)."""
    text = resources.files(__package__).joinpath(BUILTIN_CALIBRATION).read_text(encoding="utf-8")
    return read_pairs(text.splitlines(), f"the built-in {BUILTIN_CALIBRATION}")


def load_pairs(path: Path | None) -> tuple[list[Pair], str]:
    """The calibration pairs and where they came from: the file, else the built-in set."""
    if path is None:
        return builtin_pairs(), "built-in"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise bad_input(f"calibration file {path} does not exist") from None
    except OSError as exc:
        raise bad_input(f"cannot read calibration file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise bad_input(f"calibration file {path} is not UTF-8 text") from None
    try:
        return read_pairs(text.splitlines(), str(path)), str(path)
    except ValueError as exc:
        raise bad_input(str(exc)) from None


def query_digest(query: str) -> int:
    return int.from_bytes(hashlib.sha256(query.encode("utf-8")).digest()[:8], "big")


def split_pairs(pairs: Sequence[Pair]) -> tuple[list[Pair], list[Pair]]:
    """(calibration, held out), deterministically and by query, so that no held-out query was seen in calibration:
    the queries whose text's sha256 is 0 modulo HELD_OUT_SHARE are held out, in the order of those digests, up to
    MAX_HELD_OUT_PAIRS pairs (the queries past that go back to calibration); each part keeps the file's order. A
    set whose digests hold none out holds out the query with the smallest digest, and one whose digests would hold
    out every query keeps the last of them for calibration."""
    queries = sorted({p.query for p in pairs}, key=lambda q: (query_digest(q), q))
    if len(queries) < 2:
        raise bad_input("the calibration pairs need at least 2 distinct queries (one is held out to measure the "
                        "quantized model's agreement)")
    candidates = [q for q in queries if query_digest(q) % HELD_OUT_SHARE == 0] or queries[:1]
    per_query = Counter(p.query for p in pairs)
    held: set[str] = set()
    total = 0
    for query in candidates:
        if held and total + per_query[query] > MAX_HELD_OUT_PAIRS:
            break
        held.add(query)
        total += per_query[query]
    if len(held) == len(queries):
        held.discard(candidates[-1])
    return [p for p in pairs if p.query not in held], [p for p in pairs if p.query in held]


def spread(items: Sequence, n: int) -> list:
    """At most n of `items`, evenly spaced over the whole sequence (every part of a file is represented)."""
    if len(items) <= n:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


# ---------------------------------------------------------------------------------------------- the model


@dataclass
class LoadedModel:
    """A model as the server loads it: its files, the IR and the head that feeds it."""

    files: ModelFiles
    model: Any  # openvino.Model
    head: ModelHead


def server_config(args: argparse.Namespace):
    """The server's Config for this model: the same flags, read as the server reads them (its variables are not:
    only the command line says what is quantized)."""
    argv = ["--device", "CPU", "--model", args.model, "--max-length", str(args.max_length)]
    for flag, value in (("--model-file", args.model_file), ("--prompt-template", args.prompt_template),
                        ("--instruction", args.instruction)):
        if value:
            argv += [flag, value]
    return load_config(argv, {})


def load_model(core, files: ModelFiles, instruction: str) -> LoadedModel:
    model = read_model(core, files.xml)
    tokenizer = load_tokenizer(files.tokenizer)
    return LoadedModel(files, model, make_head(files, tokenizer, model, instruction))


def op_counts(model) -> dict[str, int]:
    return dict(Counter(op.get_type_name() for op in model.get_ops()))


COMPRESSED_TYPES = ("i8", "u8", "f16")  # weight-only compression that decompress_weights undoes
DECOMPRESSION_OPS = ("Convert", "Subtract", "Multiply")


def folded_value(node) -> np.ndarray | None:
    """The float32 value of a weight's decompression subgraph (Constants, Convert, Subtract of a zero point,
    Multiply by a scale), or None when `node` is computed from the model's inputs."""
    kind = node.get_type_name()
    if kind == "Constant":
        return node.get_data().astype(np.float32)
    if kind not in DECOMPRESSION_OPS:
        return None
    values = [folded_value(node.input_value(i).get_node()) for i in range(node.get_input_size())]
    if any(v is None for v in values):
        return None
    if kind == "Convert":
        return values[0]
    return values[0] - values[1] if kind == "Subtract" else values[0] * values[1]


def is_compressed(node) -> bool:
    """Whether a decompression subgraph starts from a compressed Constant (int8, uint8 or f16 behind a Convert)."""
    if node.get_type_name() == "Convert":
        source = node.input_value(0).get_node()
        if source.get_type_name() == "Constant" and source.get_element_type().get_type_name() in COMPRESSED_TYPES:
            return True
    return node.get_type_name() in DECOMPRESSION_OPS and any(
        is_compressed(node.input_value(i).get_node()) for i in range(node.get_input_size()))


def decompress_weights(model) -> int:
    """Replace, in place, every MatMul weight stored weight-only compressed (int8, uint8 or f16 Constant -> Convert
    [-> Subtract] -> Multiply) by a float32 Constant of the same values, and return how many. NNCF quantizes the
    weights again, per output channel, but only float weights let its SmoothQuant move activation outliers into
    them: on the MiniLM-shaped stand-in (INT8 weights) that halved the held-out score error (mean 0.0063 -> 0.0023)
    and raised top-1 agreement from 0.79 to 1.0. Embedding tables (Gather) stay as they are."""
    import openvino.opset13 as ops

    count = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        for i in range(2):
            weight = op.input_value(i).get_node()
            if weight.get_type_name() == "Constant" or not is_compressed(weight):
                continue
            value = folded_value(weight)
            if value is None or weight.get_output_element_type(0).get_type_name() != "f32":
                continue
            constant = ops.constant(value)
            constant.set_friendly_name(weight.get_friendly_name())
            weight.output(0).replace(constant.output(0))
            count += 1
    return count


def input_shape(model, head: ModelHead) -> ShapeBucket | None:
    """The IR's static input shape, or None when its inputs are dynamic."""
    shape = model.input(head.contract.input_names[0]).get_partial_shape()
    return ShapeBucket(shape[0].get_length(), shape[1].get_length()) if shape.is_static else None


def calibration_feeds(head: ModelHead, pairs: Sequence[Pair], shape: ShapeBucket | None) -> list[dict[str, np.ndarray]]:
    """Model inputs for calibration, written by the server's head (template, truncation at max_length, pad id,
    input dtype): each pair alone, unpadded (a static IR: padded to its shape, as the server pads). Padded positions
    would feed NNCF activations no real token has and widen its ranges for nothing."""
    encoded = head.encode([p.query for p in pairs], [p.document for p in pairs])
    feeds = []
    for i, length in enumerate(encoded.lengths):
        feeds.append(head.feed(encoded, [i], shape or ShapeBucket(1, int(length))))
    return feeds


def import_nncf():
    """NNCF, without its usage telemetry (openvino-telemetry sends events to Google Analytics unless the user opted
    out: a local service sends nothing): NNCF falls back to a stub when openvino_telemetry cannot be imported."""
    if sys.modules.get("nncf") is not None:
        return sys.modules["nncf"]
    saved = sys.modules.get("openvino_telemetry")
    sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # makes the import raise ImportError
    try:
        import nncf
    except ImportError as exc:
        raise QuantizeError(f"quantize needs NNCF, which is not installed ({exc}): {INSTALL_HINT}",
                            EXIT_NO_NNCF) from None
    finally:
        if saved is None:
            del sys.modules["openvino_telemetry"]
        else:
            sys.modules["openvino_telemetry"] = saved
    return nncf


@contextlib.contextmanager
def nncf_log_to(stream: TextIO):
    """NNCF's log lines go to `stream` meanwhile (its logger writes to the stdout it found at import)."""
    handlers = [h for h in logging.getLogger("nncf").handlers if isinstance(h, logging.StreamHandler)]
    saved = [h.setStream(stream) for h in handlers]
    try:
        yield
    finally:
        for handler, old in zip(handlers, saved, strict=True):
            handler.setStream(old)


def ignored_types(head: ModelHead) -> list[str]:
    """Operations whose inputs NNCF must leave in float. A left-padded head (decoders) feeds rotary position
    embeddings at absolute positions that move with the padding; attention scores depend only on the relative ones,
    so a pair scores the same however it is padded, unless the rotated queries and keys are quantized on a grid that
    does not rotate with them. Measured on the tiny Qwen3 model (144 held-out pairs, 3 to 64 pad tokens, f32): with
    them quantized every pair's logit moved, by up to 0.32; with attention's inputs in float 21 of 144 moved, by up
    to 0.06 (float noise of the shifted positions that crosses a later quantizer's rounding boundary)."""
    return ["ScaledDotProductAttention"] if head.padding_side == "left" else []


def quantize_model(nncf, model, feeds: Sequence[Mapping[str, np.ndarray]], subset_size: int, ignored: list[str],
                   log: TextIO):
    """nncf.quantize with NNCF_SETTINGS on the OpenVINO model, the inputs of `ignored` operation types left in float;
    QuantizeError (exit 6) when NNCF fails. NNCF's progress bars go to `log` (stderr): stdout is the summary's."""
    scope = nncf.IgnoredScope(types=ignored, validate=False) if ignored else None
    try:
        with contextlib.redirect_stdout(log), nncf_log_to(log):
            return nncf.quantize(model, nncf.Dataset(list(feeds)), preset=nncf.QuantizationPreset.MIXED,
                                 target_device=nncf.TargetDevice.ANY, subset_size=subset_size,
                                 fast_bias_correction=NNCF_SETTINGS["fast_bias_correction"],
                                 model_type=nncf.ModelType.TRANSFORMER, ignored_scope=scope)
    except Exception as exc:  # NNCF raises its own and OpenVINO's errors
        raise QuantizeError(f"NNCF could not quantize the model: {error_reason(exc)}", EXIT_QUANTIZE_FAILED) from None


# ---------------------------------------------------------------------------------------------- the output directory


def is_quantize_output(directory: Path) -> bool:
    """Whether `directory` holds what this command wrote (its report says so)."""
    try:
        report = json.loads((directory / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("produced_by") == PRODUCED_BY


def check_output(output: Path, model_dir: Path) -> None:
    """The output must be new, empty, or an earlier output of this command (then it is replaced whole), and not the
    model's own directory."""
    if output.exists() and not output.is_dir():
        raise bad_input(f"--output {output} exists and is not a directory")
    if output.is_dir() and output.resolve() == model_dir.resolve():
        raise bad_input(f"--output {output} is the model's own directory: name a new one")
    if output.is_dir() and any(output.iterdir()) and not is_quantize_output(output):
        raise bad_input(f"--output {output} is not empty and holds no earlier {REPORT_FILE}: name a new or empty "
                        f"directory (an earlier quantize output is replaced)")


def files_to_copy(files: ModelFiles) -> tuple[dict[str, Path], list[str]]:
    """The model's files that go with the quantized IR: every regular file at the top of the model directory and
    beside the IR (for an IR in openvino/, its non-IR files, such as reference scores, come to the root beside the
    new IR and win over a root file of the same name), except weights (WEIGHT_SUFFIXES) and an earlier report. Returns
    (name -> source, names left out)."""
    chosen: dict[str, Path] = {}
    left_out = []
    for directory in dict.fromkeys([files.model_dir, files.xml.parent]):
        for path in sorted(directory.iterdir()):
            if not path.is_file() or path.name == REPORT_FILE:
                continue
            if path.name.lower().endswith(WEIGHT_SUFFIXES):
                left_out.append(str(path.relative_to(files.model_dir)))
                continue
            chosen[path.name] = path
    return chosen, left_out


def write_directory(directory: Path, quantized, copies: Mapping[str, Path], template_path: str) -> None:
    """Into the (existing, empty) staging directory: the quantized IR at the root, the copied files and, for
    --prompt-template, that template as the template file beside the IR (so that the server serves the directory
    with the template it was calibrated with)."""
    import openvino as ov

    ov.save_model(quantized, str(directory / OUTPUT_IR), compress_to_fp16=False)
    for name, source in copies.items():
        shutil.copyfile(source, directory / name)  # follows symlinks: a Hub snapshot links into its blobs
    if template_path:
        shutil.copyfile(template_path, directory / TEMPLATE_FILE)


def replace_directory(staged: Path, output: Path) -> None:
    """Move the staged directory to `output`; an earlier output there is removed only once the new one is whole."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
    staged.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- scoring and the report


def exact_reranker(core, loaded: LoadedModel) -> Reranker:
    """The model's head on a CPU compile at f32 throughout (the parity guard's reference configuration), one infer
    request, no compile cache: the scores the report compares are the IRs' own, not a precision's. A static IR is
    compiled as its one bucket."""
    shape = input_shape(loaded.model, loaded.head)
    engine = Engine(core, loaded.model, "CPU", None if shape is None else (shape,), REFERENCE_PROPERTIES,
                    loaded.head.contract, infer_requests=1)
    return Reranker(loaded.head, engine, SCORING_BATCH if shape is None else shape.rows)


def score(reranker: Reranker, pairs: Sequence[Pair]) -> np.ndarray:
    """Each pair's score, grouped by query into one scoring call each (as a request would), in the pairs' order."""
    scores = np.empty(len(pairs))
    by_query: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        by_query.setdefault(pair.query, []).append(i)
    for query, rows in by_query.items():
        try:
            scores[rows] = reranker.score_pairs(query, [pairs[i].document for i in rows], use_cache=False).scores
        except ServiceError as exc:
            raise QuantizeError(f"scoring failed: {exc.message}", EXIT_QUANTIZE_FAILED) from None
    return scores


def per_query(pairs: Sequence[Pair], scores: Sequence[float]) -> dict[str, dict[str, float]]:
    """query -> {document id: score}, the ids numbering each query's pairs in order (`evaluate.agreement`'s input;
    equal scores fall back to the id order, as there)."""
    out: dict[str, dict[str, float]] = {}
    for pair, value in zip(pairs, scores, strict=True):
        documents = out.setdefault(pair.query, {})
        documents[f"{len(documents):06d}"] = float(value)
    return out


def agreement_report(pairs: Sequence[Pair], original: np.ndarray, quantized: np.ndarray) -> dict[str, Any]:
    """How far the quantized model's scores and per-query orders are from the original's on the same pairs:
    max and mean |score difference|, and `evaluate.agreement` (Spearman, top-1, top-10 overlap: mean and min)."""
    diff = np.abs(np.asarray(quantized, dtype=np.float64) - np.asarray(original, dtype=np.float64))
    ranks = agreement(per_query(pairs, original), per_query(pairs, quantized))
    return {"pairs": len(pairs), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), **ranks}


def two_digits_up(value: float) -> float:
    """`value` rounded up to two significant digits (0.07854 -> 0.079)."""
    exponent = math.floor(math.log10(value)) - 1
    return float(f"{math.ceil(round(value / 10 ** exponent, 9))}e{exponent}")


def read_reference_scores(path: Path) -> dict | None:
    """The reference scores file's JSON when it is one (its `format` says so, with `tolerance` and `pairs`), else
    None: a file this command does not know is copied as it is."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != REFERENCE_SCORES_FORMAT:
        return None
    pairs = data.get("pairs")
    if not isinstance(data.get("tolerance"), (int, float)) or not isinstance(pairs, list) or not pairs or \
            not all(isinstance(p, dict) and isinstance(p.get("query"), str) and isinstance(p.get("document"), str)
                    and isinstance(p.get("score"), (int, float)) for p in pairs):
        return None
    return data


def comparable_pairs(lengths: np.ndarray, truncated: np.ndarray, max_length: int, made_at: Any) -> np.ndarray:
    """Which reference pairs were cut alike here and when their scores were made (the file's `max_length`; null:
    none was cut), as the startup check decides: cut in neither, or in both at the same length."""
    if not isinstance(made_at, int):
        return ~truncated
    return np.where(truncated, max_length == made_at, lengths <= made_at)


def score_reference_pairs(reranker: Reranker, pairs: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray,
                                                                                             np.ndarray]:
    """The reference pairs' scores, token counts and truncation, one call per instruction, as the server's startup
    check scores them."""
    scores, lengths, truncated = np.empty(len(pairs)), np.zeros(len(pairs), dtype=np.int64), np.zeros(len(pairs), bool)
    by_instruction: dict[str | None, list[int]] = {}
    for n, pair in enumerate(pairs):
        by_instruction.setdefault(pair.get("instruction"), []).append(n)
    for instruction, rows in by_instruction.items():
        try:
            scored = reranker.score_pairs([pairs[n]["query"] for n in rows], [pairs[n]["document"] for n in rows],
                                          use_cache=False, instruction=instruction)
        except ServiceError as exc:
            raise QuantizeError(f"scoring the reference pairs failed: {exc.message}", EXIT_QUANTIZE_FAILED) from None
        scores[rows], lengths[rows], truncated[rows] = scored.scores, scored.lengths, scored.truncated
    return scores, lengths, truncated


def reference_scores_for_quantized(data: dict, measured: float) -> dict:
    """The reference scores file of the quantized model: the original model's scores unchanged (they still catch a
    wrong tokenizer, template or pad id), the tolerance widened to 1.5 times the quantized IR's measured distance
    from them, rounded up to two significant digits, and never narrower than before; `produced_by.quantized` says
    so. The margin: a quantized decoder's score also moves a little with the batch it is scored in. At most
    MAX_REFERENCE_TOLERANCE: a quantized model that far off fails the startup check, as it should."""
    before = float(data["tolerance"])
    wanted = min(MAX_REFERENCE_TOLERANCE, two_digits_up(1.5 * measured)) if measured > 0 else before
    widened = dict(data, tolerance=max(before, wanted))
    produced_by = data.get("produced_by") if isinstance(data.get("produced_by"), dict) else {}
    widened["produced_by"] = {**produced_by, "quantized": {
        "by": PRODUCED_BY, "tolerance_before": before, "quantized_ir_f32_max_abs_diff": measured}}
    return widened


def score_evalset(reranker: Reranker, evalset, label: str) -> ServiceRun:
    """Every evaluated query's candidates (those with a text) scored in this process: `evaluate`'s ServiceRun."""
    run = ServiceRun(label, "")
    started = time.monotonic()
    for query_id, query in evalset.queries.items():
        documents = [d for d in evalset.candidates(query_id) if evalset.documents[d]]
        if not documents:
            continue
        scores = score(reranker, [Pair(query, evalset.documents[d]) for d in documents])
        run.scores[query_id] = dict(zip(documents, scores.tolist(), strict=True))
        run.pairs += len(documents)
    run.seconds = time.monotonic() - started
    return run


def eval_report(evalset, original: ServiceRun, quantized: ServiceRun) -> dict[str, Any]:
    """`evaluate.build_report` of the original (`reranked`) against the quantized model (`compare`), without the
    speed fields: both ran in this process at f32, which says nothing of serving speed."""
    report = build_report(evalset, original, quantized)
    compare = report.pop("compare")
    return {"queries": report["queries"], "pairs": report["pairs"], "depth": evalset.depth,
            "metrics": {name: {"first_stage": values["first_stage"], "original": values["reranked"],
                               "quantized": compare["metrics"][name]["reranked"],
                               "delta": compare["metrics"][name]["delta"]}
                        for name, values in report["metrics"].items()},
            "agreement": compare["agreement"]}


# ---------------------------------------------------------------------------------------------- the command


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = OneLineArgumentParser(
        prog=f"{os.path.basename(sys.argv[0]) or 'openvino-reranker'} {QUANTIZE_COMMAND}",
        description="Write a fully quantized INT8 copy of a model (weights and activations, NNCF post-training "
                    "quantization calibrated on query/document pairs through the model's own head) that the server "
                    f"serves as is, and {REPORT_FILE}: its agreement with the original on held-out pairs. Needs "
                    f"NNCF ({INSTALL_HINT}). Exit 0; 2 bad arguments, files or output directory; 3 NNCF missing; "
                    "4 the model cannot be had or is quantized already; 5 a compile failed; 6 quantizing or scoring "
                    "failed; 8 the Hub failed in a way that may pass.")
    parser.add_argument("--model", required=True, help="a model directory or a Hugging Face Hub id, as the server "
                                                       "takes it")
    parser.add_argument("--output", required=True, type=Path, metavar="DIR",
                        help="a new or empty directory (an earlier quantize output is replaced)")
    parser.add_argument("--calibration", type=Path, default=None, metavar="FILE.jsonl",
                        help='{"query": ..., "document": ...} lines, your own traffic (default: the built-in set)')
    parser.add_argument("--samples", type=int_argument(1, 100_000), default=300, metavar="N",
                        help="calibration pairs NNCF sees (default 300)")
    parser.add_argument("--model-file", default="", help="the IR inside the model, as the server's --model-file")
    parser.add_argument("--prompt-template", default="", metavar="FILE",
                        help="a decoder's prompt template, as the server's (copied into the output)")
    parser.add_argument("--instruction", default="", help="a decoder's instruction for calibration, as the server's")
    parser.add_argument("--max-length", type=int_argument(0, 8192), default=0, metavar="N",
                        help="tokens per pair, as the server's (default 0: the model's limit, at most 512)")
    parser.add_argument("--eval-dataset", type=Path, default=None, metavar="DIR",
                        help="a BEIR dataset: report the metric changes of eval (with --eval-run)")
    parser.add_argument("--eval-run", type=Path, default=None, metavar="RUN", help="a TREC run of the first stage")
    parser.add_argument("--eval-split", default="test", metavar="SPLIT", help="qrels/SPLIT.tsv (default test)")
    parser.add_argument("--eval-depth", type=int_argument(1, 1000), default=100, metavar="N",
                        help="candidates per query reranked (default 100)")
    args = parser.parse_args(argv)
    if (args.eval_dataset is None) != (args.eval_run is None):
        raise bad_input("bad command line: --eval-dataset and --eval-run go together")
    return args


def human_size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def ir_size(xml: Path) -> int:
    return xml.stat().st_size + xml.with_suffix(".bin").stat().st_size


def summary_lines(report: Mapping[str, Any], output: Path) -> list[str]:
    """The short human summary printed when the directory is written."""
    ops, matmuls, a = report["quantized_ir"]["ops"], report["quantized_ir"]["matmuls"], report["agreement"]
    calibration = report["calibration"]
    lines = [
        f"quantized {report['model']} ({report['head']}) with NNCF {report['nncf']['version']} on "
        f"{calibration['samples']} calibration pairs ({calibration['source']}): "
        f"{sum(ops.get(k, 0) for k in QUANTIZED_OPS)} activation quantizers, "
        f"{matmuls['weights_low_precision']} of {matmuls['weights_low_precision'] + matmuls['weights_float']} MatMul "
        f"weights in INT8; IR {human_size(report['quantized_ir']['bytes'])} (was "
        f"{human_size(report['source_ir']['bytes'])})",
        f"agreement with the original on {a['pairs']} held-out pairs of {a['queries']} queries (CPU, f32): "
        f"max |score diff| {a['max_abs_diff']:.4f}, mean {a['mean_abs_diff']:.4f}; Spearman mean / min "
        f"{fmt(a['spearman']['mean'])} / {fmt(a['spearman']['min'])}; top-1 {fmt(a['top1']['mean'])} / "
        f"{fmt(a['top1']['min'])}",
    ]
    evaluation = report.get("eval")
    if evaluation:
        lines.append(f"eval on {evaluation['queries']} queries, {evaluation['pairs']} pairs (original -> quantized): "
                     + ", ".join(f"{name} {m['original']:.4f} -> {m['quantized']:.4f} ({m['delta']:+.4f})"
                                 for name, m in evaluation["metrics"].items()))
    lines.append(f"wrote {output} ({REPORT_FILE} has the details); serve it with: "
                 f"{invoked_as(sys.argv[0])} --model {output}")
    return lines


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def run_quantize(args: argparse.Namespace, environ: Mapping[str, str], stderr: TextIO) -> tuple[dict, Path]:
    """Everything but printing: returns the report and the directory written."""
    started = time.monotonic()
    nncf = import_nncf()
    pairs, source = load_pairs(args.calibration)
    calibration, held_out = split_pairs(pairs)
    evalset = load_evalset(args.eval_dataset, args.eval_run, args.eval_split, args.eval_depth) \
        if args.eval_dataset is not None else None
    config = server_config(args)

    def progress(line: str) -> None:
        stderr.write(f"quantize: {line}\n")
        stderr.flush()

    model_dir, model_file, hub_source = locate_model(config, environ, progress)
    files = load_model_files(model_dir, config.max_length, model_file, config.prompt_template, hub_source)
    output = args.output.expanduser()
    check_output(output, files.model_dir)
    core = open_core("CPU")
    original = load_model(core, files, config.instruction)
    if is_quantized(original.model):
        raise QuantizeError(f"{files.xml} is quantized already (it holds FakeQuantize or FakeConvert operations): "
                            f"name the unquantized IR with --model-file (for a sentence-transformers repo, "
                            f"openvino/openvino_model.xml)", EXIT_MODEL)
    shape = input_shape(original.model, original.head)
    if shape is not None and shape.length < files.max_length:
        raise bad_input(f"{files.xml} has the static shape {shape}, shorter than max_length {files.max_length}: pass "
                        f"--max-length {shape.length}")
    samples = spread(calibration, args.samples)
    staged = output.with_name(f".{output.name}.quantize-{os.getpid()}")
    shutil.rmtree(staged, ignore_errors=True)
    try:
        staged.mkdir(parents=True)  # before the slow part: an output that cannot be written fails at once
    except OSError as exc:
        raise bad_input(f"cannot write {staged}: {exc.strerror or exc}") from None
    try:
        progress(f"calibrating {files.xml.name} ({files.head_kind}) on {len(samples)} pairs ({source})")
        feeds = calibration_feeds(original.head, samples, shape)
        float_model = original.model.clone()
        decompressed = decompress_weights(float_model)
        quantized_model = quantize_model(nncf, float_model, feeds, len(feeds), ignored_types(original.head), stderr)
        del float_model
        copies, left_out = files_to_copy(files)
        try:
            write_directory(staged, quantized_model, copies, config.prompt_template)
        except OSError as exc:
            raise bad_input(f"cannot write {staged}: {exc.strerror or exc}") from None
        staged_files = load_model_files(staged, config.max_length, "", "", None)
        quantized = load_model(core, staged_files, config.instruction)
        reference_scores = update_reference_scores(core, staged / REFERENCE_SCORES_FILE, quantized)
        progress(f"scoring {len(held_out)} held-out pairs with both IRs (CPU, f32)")
        report = build_quantize_report(args, files, source, pairs, calibration, samples, held_out, original,
                                       quantized, core, nncf, sorted(copies), left_out, evalset, progress)
        report["nncf"]["weights_decompressed"] = decompressed
        report["reference_scores"] = reference_scores
        report["seconds"] = round(time.monotonic() - started, 1)
        try:
            (staged / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
            replace_directory(staged, output)
        except OSError as exc:
            raise bad_input(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return report, output


def update_reference_scores(core, path: Path, quantized: LoadedModel) -> dict | None:
    """Widen the copied reference scores file's tolerance to cover the quantization (reference_scores_for_quantized),
    measured as the server's startup check measures it: the quantized IR on the CPU at f32, through the model head in
    batches of the default size. Returns what the report says of it, or None without such a file."""
    data = read_reference_scores(path) if path.is_file() else None
    if data is None:
        return None
    shape = input_shape(quantized.model, quantized.head)
    engine = Engine(core, quantized.model, "CPU", None if shape is None else (shape,), REFERENCE_PROPERTIES,
                    quantized.head.contract, infer_requests=1)
    reranker = Reranker(quantized.head, engine, REFERENCE_SCORES_BATCH if shape is None else shape.rows)
    try:
        scores, lengths, truncated = score_reference_pairs(reranker, data["pairs"])
    finally:
        reranker.close()
    comparable = comparable_pairs(lengths, truncated, quantized.head.max_length, data.get("max_length"))
    expected = np.array([float(p["score"]) for p in data["pairs"]])
    measured = float(np.abs(scores - expected)[comparable].max()) if comparable.any() else 0.0
    widened = reference_scores_for_quantized(data, measured)
    path.write_text(json.dumps(widened, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"file": REFERENCE_SCORES_FILE, "pairs": len(data["pairs"]), "compared": int(comparable.sum()),
            "quantized_ir_f32_max_abs_diff": measured, "tolerance_before": float(data["tolerance"]),
            "tolerance": widened["tolerance"]}


def build_quantize_report(args, files: ModelFiles, source: str, pairs, calibration, samples, held_out,
                          original: LoadedModel, quantized: LoadedModel, core, nncf, copied: list[str],
                          left_out: list[str], evalset, progress: Callable[[str], None]) -> dict[str, Any]:
    """quantization_report.json: what was quantized and how, the quantized IR's operations, the agreement on the
    held-out pairs and, with an eval dataset, the metric changes."""
    rerankers = [exact_reranker(core, original), exact_reranker(core, quantized)]
    try:
        original_scores, quantized_scores = (score(r, held_out) for r in rerankers)
        report: dict[str, Any] = {
            "produced_by": PRODUCED_BY, "version": __version__,
            "model": files.name, "source": dict(files.source) or {"directory": str(files.model_dir)},
            "head": files.head_kind, "max_length": files.max_length,
            "source_ir": {"file": str(files.xml.relative_to(files.model_dir)), "bytes": ir_size(files.xml)},
            "quantized_ir": {"file": OUTPUT_IR, "bytes": ir_size(quantized.files.xml),
                             "ops": {k: v for k, v in op_counts(quantized.model).items() if k in QUANTIZED_OPS},
                             "matmuls": matmul_summary(quantized.model)},
            "calibration": {"source": source, "pairs": len(pairs), "queries": len({p.query for p in pairs}),
                            "calibration_pairs": len(calibration), "samples": len(samples),
                            "held_out_pairs": len(held_out), "held_out_queries": len({p.query for p in held_out}),
                            "instruction": args.instruction or None},
            "nncf": {"version": nncf.__version__, **NNCF_SETTINGS, "subset_size": len(samples),
                     "ignored_types": ignored_types(original.head)},
            "scored_with": {"device": "CPU", "properties": dict(REFERENCE_PROPERTIES)},
            "agreement": agreement_report(held_out, original_scores, quantized_scores),
            "files": {"copied": copied, "left_out": left_out},
            "eval": None,
        }
        if evalset is not None:
            progress(f"scoring the eval candidates of {len(evalset.queries)} queries with both IRs (CPU, f32)")
            runs = [score_evalset(r, evalset, label) for r, label in zip(rerankers, ("original", "quantized"),
                                                                            strict=True)]
            report["eval"] = eval_report(evalset, *runs)
        return report
    finally:
        for reranker in rerankers:
            reranker.close()


def main(argv: Sequence[str], environ: Mapping[str, str] | None = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """`openvino-reranker quantize ...`: returns the exit code (docs/models.md, "openvino-reranker quantize")."""
    environ = os.environ if environ is None else environ
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    try:
        args = parse_args(argv)
        report, output = run_quantize(args, environ, stderr)
        stdout.write("\n".join(summary_lines(report, output)) + "\n")
        stdout.flush()
        return 0
    except StartupError as exc:  # QuantizeError and EvalError too
        stderr.write(f"openvino-reranker quantize: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        stderr.write("openvino-reranker quantize: interrupted\n")
        return EXIT_INTERRUPTED
