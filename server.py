"""openvino-reranker: a local cross-encoder reranking service on the Intel NPU, with a CPU fallback.

Run `python server.py` (see `--help`); SPEC.md is the contract for routes, fields, errors and exit codes.

The module reads top to bottom along a request's path:
errors -> config -> request validation -> tokenization -> batching and shapes -> engine (OpenVINO) ->
scoring, ranking and the cross-request batcher -> startup checks -> responses -> metrics -> HTTP -> server state ->
startup. Each section uses only what stands above it. The HTTP layer scores through one call,
`Reranker.score_pairs(query, texts, limits)`, and never touches OpenVINO.
"""

from __future__ import annotations

import argparse
import gc
import hmac
import ipaddress
import json
import logging
import os
import queue
import re
import select
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

__version__ = "0.1.0"
log = logging.getLogger("openvino_reranker")


# ============================================================================================== errors


class ServiceError(Exception):
    """An error a client sees: one status and one stable `error_type` per subclass (SPEC.md, "Errors")."""

    status = 500
    error_type = "internal"

    def __init__(self, message: str, field: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.headers = dict(headers or {})


class BadRequestError(ServiceError):
    status, error_type = 400, "invalid_request"


class UnauthorizedError(ServiceError):
    status, error_type = 401, "unauthorized"


class NotFoundError(ServiceError):
    status, error_type = 404, "not_found"


class MethodNotAllowedError(ServiceError):
    status, error_type = 405, "method_not_allowed"


class RequestTimeoutError(ServiceError):
    status, error_type = 408, "request_timeout"


class LengthRequiredError(ServiceError):
    status, error_type = 411, "length_required"


class PayloadTooLargeError(ServiceError):
    status, error_type = 413, "too_large"


class UnsupportedMediaTypeError(ServiceError):
    status, error_type = 415, "unsupported_media_type"


class InferenceError(ServiceError):
    status, error_type = 500, "inference_failed"


class NotReadyError(ServiceError):
    status, error_type = 503, "not_ready"


class OverloadedError(ServiceError):
    status, error_type = 503, "overloaded"


class DeadlineExceededError(ServiceError):
    status, error_type = 504, "deadline_exceeded"


class ClientGoneError(ServiceError):
    """The client closed its connection: the work is dropped and nothing is sent (logged as status 499)."""

    status, error_type = 499, "client_closed_request"


class StartupError(Exception):
    """Stops the process before it serves: one line on stderr and a distinct exit code (SPEC.md, "Exit codes")."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


EXIT_CONFIG, EXIT_PORT, EXIT_MODEL, EXIT_DEVICE, EXIT_STARTUP_CHECK = 2, 3, 4, 5, 6


# ============================================================================================== config

DEFAULT_MODEL_DIR = "~/.cache/openvino-models/rerankers/ms-marco-MiniLM-L6-v2-int8-ov"
DEFAULT_NPU_BUSY_PATH = "/sys/class/accel/accel0/device/npu_busy_time_us"
MAX_SUPPORTED_LENGTH = 512
ENV_PREFIX = "OPENVINO_RERANKER_"


@dataclass(frozen=True, order=True)
class ShapeBucket:
    """One static input shape `[rows, length]` compiled for the NPU (or for CPU in static mode)."""

    rows: int
    length: int

    def __str__(self) -> str:
        return f"{self.rows}x{self.length}"


def _parse_int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"{text!r} is not an integer") from None
        if not lo <= value <= hi:
            raise ValueError(f"{value} is outside {lo}..{hi}")
        return value

    return parse


_DEVICE_RE = re.compile(r"^(CPU|GPU(\.\d+)?|NPU(\.\d+)?|(AUTO|MULTI|HETERO)(:[A-Z0-9.]+(,[A-Z0-9.]+)*)?)$")


def _parse_device(text: str) -> str:
    device = text.strip().upper()
    if not _DEVICE_RE.match(device):
        raise ValueError(f"{text!r} is not a device (use NPU, CPU, GPU, GPU.1, AUTO or AUTO:NPU,CPU)")
    return device


def _parse_buckets(text: str) -> tuple[ShapeBucket, ...]:
    buckets = set()
    for part in text.replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)x(\d+)", part)
        if not m:
            raise ValueError(f"{part!r} is not ROWSxLENGTH (example: 8x128)")
        rows, length = int(m.group(1)), int(m.group(2))
        if not (1 <= rows <= 256 and 8 <= length <= MAX_SUPPORTED_LENGTH):
            raise ValueError(f"{part}: rows must be 1..256 and length 8..{MAX_SUPPORTED_LENGTH}")
        buckets.add(ShapeBucket(rows, length))
    return tuple(sorted(buckets, key=lambda b: (b.length, b.rows)))


def _parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return value

    return parse


def _parse_path(text: str) -> str:
    return os.path.expanduser(text.strip()) if text.strip() else ""


def _parse_bool_option(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"{text!r} is not true or false")
    return value in ("true", "1", "yes")


def _parse_fraction(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise ValueError(f"{value} is outside (0, 1)")
    return value


def _parse_log_level(text: str) -> str:
    value = text.strip().upper()
    if value not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"{text!r} is not one of DEBUG, INFO, WARNING, ERROR")
    return value


@dataclass(frozen=True)
class Option:
    name: str  # config field; the flag is --name-with-dashes, the env var OPENVINO_RERANKER_NAME
    parse: Callable[[str], Any]
    default: str
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


OPTIONS = (
    Option("host", lambda s: s.strip(), "127.0.0.1", "address to bind"),
    Option("port", _parse_int(0, 65535), "18818", "TCP port to bind (0 = any free port)"),
    Option("device", _parse_device, "NPU", "OpenVINO device: NPU, CPU, GPU[.N], AUTO[:list]"),
    Option("model_dir", _parse_path, DEFAULT_MODEL_DIR, "directory with openvino_model.xml and tokenizer.json"),
    Option("max_length", _parse_int(0, MAX_SUPPORTED_LENGTH), "0",
           "tokens per (query, document) pair; 0 = the model's limit (at most 512)"),
    Option("shape_mode", _parse_choice("auto", "static", "dynamic"), "auto",
           "static shape buckets or dynamic shapes; auto = static on NPU, dynamic elsewhere"),
    Option("buckets", _parse_buckets, "8x64,8x128,8x256,8x512",
           "static shapes ROWSxLENGTH, comma-separated (lengths above max_length are dropped)"),
    Option("batch_size", _parse_int(1, 256), "8", "pairs per micro-batch with dynamic shapes"),
    Option("performance_hint", _parse_choice("latency", "throughput"), "latency",
           "OpenVINO PERFORMANCE_HINT; throughput was faster on the CPU but has scored wrongly now and then (see "
           "README). Every compile is checked against an f32 single-stream reference"),
    Option("num_streams", _parse_int(0, 64), "0", "NUM_STREAMS; 0 = what the hint decides"),
    Option("inference_threads", _parse_int(0, 1024), "0", "INFERENCE_NUM_THREADS; 0 = the plugin's default"),
    Option("infer_requests", _parse_int(0, 64), "0",
           "infer requests per compiled model; 0 = the device's OPTIMAL_NUMBER_OF_INFER_REQUESTS"),
    Option("inference_precision", _parse_choice("default", "f32", "bf16", "f16"), "default",
           "INFERENCE_PRECISION_HINT; default = the device's choice"),
    Option("parity_tolerance", _parse_fraction, "0.02",
           "largest score difference from the f32 single-stream CPU reference accepted at startup"),
    Option("on_parity_failure", _parse_choice("fallback", "refuse"), "fallback",
           "when the serving compile disagrees with the reference: recompile safely, or refuse to start"),
    Option("cache_dir", _parse_path, "~/.cache/openvino-reranker", "OpenVINO compile cache ('' disables)"),
    Option("npu_busy_path", _parse_path, DEFAULT_NPU_BUSY_PATH, "sysfs NPU busy-time counter (microseconds)"),
    Option("max_body_bytes", _parse_int(1024, 1 << 30), str(2 * 1024 * 1024), "largest request body accepted"),
    Option("max_documents", _parse_int(1, 100_000), "1000", "most documents in one request"),
    Option("max_query_chars", _parse_int(1, 10_000_000), "8192", "longest query, in characters"),
    Option("max_document_chars", _parse_int(1, 10_000_000), "100000", "longest document text, in characters"),
    Option("max_total_tokens", _parse_int(1, 100_000_000), "131072",
           "most tokens per request, all (query, document) pairs after truncation"),
    Option("max_queued_requests", _parse_int(1, 100_000), "32",
           "scoring requests admitted at once (running + waiting); beyond it 503 overloaded"),
    Option("request_timeout_ms", _parse_int(1, 3_600_000), "30000",
           "default per-request deadline; a request may ask for less or more (X-Request-Timeout-Ms, timeout_ms)"),
    Option("read_timeout_s", _parse_int(1, 3600), "10", "seconds to receive a whole request once it has begun"),
    Option("idle_timeout_s", _parse_int(1, 3600), "30", "seconds a keep-alive connection may sit idle"),
    Option("max_connections", _parse_int(1, 100_000), "128", "open client connections; beyond it 503 at once"),
    Option("drain_timeout_s", _parse_int(0, 3600), "10", "on SIGTERM, seconds to let in-flight requests finish"),
    Option("failures_before_unready", _parse_int(1, 1000), "3",
           "consecutive inference failures that flip /readyz to 503 (a success flips it back)"),
    Option("api_key", lambda s: s.strip(), "", "require 'Authorization: Bearer KEY' on scoring routes and /metrics"),
    Option("api_key_file", _parse_path, "", "file holding the API key (first line); instead of api_key"),
    Option("allow_remote_without_key", _parse_bool_option, "false",
           "allow binding a non-loopback address with no API key"),
    Option("log_level", _parse_log_level, "INFO", "DEBUG, INFO, WARNING or ERROR"),
)


@dataclass(frozen=True)
class Config:
    host: str
    port: int
    device: str
    model_dir: str
    max_length: int
    shape_mode: str
    buckets: tuple[ShapeBucket, ...]
    batch_size: int
    performance_hint: str
    num_streams: int
    inference_threads: int
    infer_requests: int
    inference_precision: str
    parity_tolerance: float
    on_parity_failure: str
    cache_dir: str
    npu_busy_path: str
    max_body_bytes: int
    max_documents: int
    max_query_chars: int
    max_document_chars: int
    max_total_tokens: int
    max_queued_requests: int
    request_timeout_ms: int
    read_timeout_s: int
    idle_timeout_s: int
    max_connections: int
    drain_timeout_s: int
    failures_before_unready: int
    api_key: str
    api_key_file: str
    allow_remote_without_key: bool
    log_level: str

    @property
    def is_npu(self) -> bool:
        """True when the NPU is asked for by name: the fail-closed proof applies (AUTO/MULTI only report)."""
        return self.device.split(".")[0] == "NPU"

    @property
    def static_shapes(self) -> bool:
        return self.shape_mode == "static" or (self.shape_mode == "auto" and "NPU" in self.device)


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise StartupError(f"bad command line: {message}", EXIT_CONFIG)


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Flags beat OPENVINO_RERANKER_* variables, which beat defaults. A bad value raises StartupError."""
    environ = os.environ if environ is None else environ
    parser = _ArgumentParser(prog="server.py", description="Local cross-encoder reranker (OpenVINO).")
    for opt in OPTIONS:
        parser.add_argument(opt.flag, dest=opt.name, default=None, metavar=opt.name.upper(),
                            help=f"{opt.help} (env {opt.env}, default {opt.default!r})")
    parser.add_argument("--version", action="version", version=f"openvino-reranker {__version__}")
    args = parser.parse_args(argv)
    values = {}
    for opt in OPTIONS:
        raw, source = getattr(args, opt.name), opt.flag
        if raw is None and opt.env in environ:
            raw, source = environ[opt.env], opt.env
        if raw is None:
            raw, source = opt.default, "default"
        try:
            values[opt.name] = opt.parse(raw)
        except ValueError as exc:
            raise StartupError(f"bad value for {source}: {exc}", EXIT_CONFIG) from None
    if not values["host"]:
        raise StartupError("bad value for host: empty", EXIT_CONFIG)
    if values["api_key"] and values["api_key_file"]:
        raise StartupError("set either api_key or api_key_file, not both", EXIT_CONFIG)
    return Config(**values)


def load_api_key(config: Config) -> str:
    """The API key from api_key or the first line of api_key_file; '' when none is set."""
    if not config.api_key_file:
        return config.api_key
    try:
        with open(config.api_key_file, encoding="utf-8") as f:
            key = f.readline().strip()
    except OSError as exc:
        raise StartupError(f"cannot read api_key_file {config.api_key_file}: {exc.strerror}", EXIT_CONFIG) from None
    if not key:
        raise StartupError(f"api_key_file {config.api_key_file} is empty", EXIT_CONFIG)
    return key


def is_loopback(host: str) -> bool:
    """True when every address `host` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


# ============================================================================================== requests


@dataclass(frozen=True)
class Document:
    index: int
    text: str
    id: str | int | None = None
    original: Any = None  # the object as sent (echoed on the Cohere route with return_documents)


@dataclass(frozen=True)
class RerankRequest:
    query: str
    documents: tuple[Document, ...]
    top_k: int | None
    return_documents: bool
    model: str | None = None
    timeout_ms: int | None = None


@dataclass(frozen=True)
class RequestLimits:
    """Checked while parsing, before anything is tokenized (a 50 MB string costs a length check)."""

    max_documents: int
    max_query_chars: int
    max_document_chars: int

    @classmethod
    def from_config(cls, config: Config) -> RequestLimits:
        return cls(config.max_documents, config.max_query_chars, config.max_document_chars)


NATIVE_FIELDS = {"query", "documents", "top_k", "return_documents", "timeout_ms"}
COHERE_UNSUPPORTED = {
    "rank_fields": "rank_fields is not supported: send each document as a string or as {\"text\": ...}",
    "max_chunks_per_doc": "max_chunks_per_doc is not supported: documents are truncated, not chunked",
    "max_tokens_per_doc": "max_tokens_per_doc is not supported: each (query, document) pair is truncated to "
                          "the server's max_length (see GET /readyz)",
}


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _require_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise BadRequestError(f"the request body must be a JSON object, not {_type_name(body)}")
    return body


def _check_encodable(value: str, path: str) -> None:
    """JSON may carry lone surrogates (\\ud800); they are not text the tokenizer can take."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequestError(f"{path} contains an unpaired surrogate at character {exc.start}", path) from None


def _parse_query(body: dict, limits: RequestLimits) -> str:
    if "query" not in body:
        raise BadRequestError("query is required", "query")
    query = body["query"]
    if not isinstance(query, str):
        raise BadRequestError(f"query must be a string, not {_type_name(query)}", "query")
    if len(query) > limits.max_query_chars:
        raise PayloadTooLargeError(f"query has {len(query)} characters; the limit (max_query_chars) is "
                                   f"{limits.max_query_chars}", "query")
    if not query.strip():
        raise BadRequestError("query must not be empty or whitespace only", "query")
    _check_encodable(query, "query")
    return query


def _parse_positive_int(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequestError(f"{name} must be an integer >= 1, not {_type_name(value)}", name)
    if value < 1:
        raise BadRequestError(f"{name} must be >= 1, got {value}", name)
    return value


def _parse_bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise BadRequestError(f"{name} must be true or false, not {_type_name(value)}", name)
    return value


def _parse_text(value: Any, path: str, limits: RequestLimits) -> str:
    if not isinstance(value, str):
        raise BadRequestError(f"{path} must be a string, not {_type_name(value)}", path)
    if len(value) > limits.max_document_chars:
        raise PayloadTooLargeError(f"{path} has {len(value)} characters; the limit (max_document_chars) is "
                                   f"{limits.max_document_chars}", path)
    if not value.strip():
        raise BadRequestError(f"{path} must not be empty or whitespace only", path)
    _check_encodable(value, path)
    return value


def _parse_documents(body: dict, limits: RequestLimits, parse_one: Callable[[int, Any], Document]) -> tuple:
    if "documents" not in body:
        raise BadRequestError("documents is required", "documents")
    docs = body["documents"]
    if not isinstance(docs, list):
        raise BadRequestError(f"documents must be an array, not {_type_name(docs)}", "documents")
    if not docs:
        raise BadRequestError("documents must not be empty", "documents")
    if len(docs) > limits.max_documents:
        raise PayloadTooLargeError(f"documents has {len(docs)} entries; the limit (max_documents) is "
                                   f"{limits.max_documents}", "documents")
    return tuple(parse_one(i, d) for i, d in enumerate(docs))


def parse_native(body: Any, limits: RequestLimits) -> RerankRequest:
    """POST /rerank: strict; an unknown field is a 400 so that typos such as `topk` do not pass unnoticed."""
    body = _require_object(body)
    for name in sorted(body.keys() - NATIVE_FIELDS):
        raise BadRequestError(f"unknown field {name!r} (allowed: {', '.join(sorted(NATIVE_FIELDS))})", name)
    query = _parse_query(body, limits)

    def parse_one(i: int, doc: Any) -> Document:
        path = f"documents[{i}]"
        if isinstance(doc, str):
            return Document(i, _parse_text(doc, path, limits))
        if not isinstance(doc, dict):
            raise BadRequestError(f"{path} must be a string or an object with text, not {_type_name(doc)}", path)
        for name in sorted(doc.keys() - {"id", "text"}):
            raise BadRequestError(f"unknown field {name!r} in {path} (allowed: id, text)", f"{path}.{name}")
        if "text" not in doc:
            raise BadRequestError(f"{path}.text is required", f"{path}.text")
        doc_id = doc.get("id")
        if doc_id is not None and (isinstance(doc_id, bool) or not isinstance(doc_id, (str, int))):
            raise BadRequestError(f"{path}.id must be a string or an integer, not {_type_name(doc_id)}",
                                  f"{path}.id")
        return Document(i, _parse_text(doc["text"], f"{path}.text", limits), doc_id)

    documents = _parse_documents(body, limits, parse_one)
    first_seen: dict[Any, int] = {}
    for doc in documents:
        if doc.id is None:
            continue
        key = (type(doc.id), doc.id)
        if key in first_seen:
            raise BadRequestError(f"documents[{doc.index}].id {doc.id!r} repeats documents[{first_seen[key]}].id",
                                  f"documents[{doc.index}].id")
        first_seen[key] = doc.index
    return RerankRequest(query, documents, _parse_positive_int(body, "top_k"), _parse_bool(body, "return_documents"),
                         timeout_ms=_parse_positive_int(body, "timeout_ms"))


def parse_cohere(body: Any, limits: RequestLimits) -> RerankRequest:
    """POST /v1/rerank: Cohere's fields. Fields Cohere has but we do not support are a 400; other unknown
    fields (which gateways add) are ignored."""
    body = _require_object(body)
    for name, message in COHERE_UNSUPPORTED.items():
        if name in body:
            raise BadRequestError(message, name)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequestError(f"model must be a string, not {_type_name(model)}", "model")
    query = _parse_query(body, limits)

    def parse_one(i: int, doc: Any) -> Document:
        path = f"documents[{i}]"
        if isinstance(doc, str):
            return Document(i, _parse_text(doc, path, limits), original={"text": doc})
        if not isinstance(doc, dict):
            raise BadRequestError(f"{path} must be a string or an object with text, not {_type_name(doc)}", path)
        if "text" not in doc:
            raise BadRequestError(f"{path}.text is required", f"{path}.text")
        return Document(i, _parse_text(doc["text"], f"{path}.text", limits), original=doc)

    documents = _parse_documents(body, limits, parse_one)
    return RerankRequest(query, documents, _parse_positive_int(body, "top_n"), _parse_bool(body, "return_documents"),
                         model)


# ============================================================================================== tokenization


@dataclass(frozen=True)
class EncodedPairs:
    """Token ids of (query, document) pairs, unpadded, in request order."""

    ids: list[np.ndarray]
    type_ids: list[np.ndarray]
    lengths: np.ndarray  # tokens per pair, special tokens included
    truncated: np.ndarray  # bool per pair: longest-first truncation removed tokens


class PairEncoder:
    """The model's own tokenizer.json through `tokenizers`: its pair template supplies the special tokens and
    the type ids; truncation is longest-first at max_length (sentence-transformers' CrossEncoder behaviour)."""

    def __init__(self, tokenizer, max_length: int):
        self.max_length = max_length
        self.tokenizer = tokenizer
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length, strategy="longest_first")
        self.pad_id = self._pad_id(tokenizer)

    @staticmethod
    def _pad_id(tokenizer) -> int:
        if tokenizer.padding and tokenizer.padding.get("pad_id") is not None:
            return int(tokenizer.padding["pad_id"])
        for token in ("[PAD]", "<pad>", "<|pad|>"):
            token_id = tokenizer.token_to_id(token)
            if token_id is not None:
                return token_id
        return 0

    @classmethod
    def from_file(cls, path: Path, max_length: int) -> "PairEncoder":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)), max_length)

    def encode(self, query: str, texts: Sequence[str]) -> EncodedPairs:
        encodings = self.tokenizer.encode_batch([(query, text) for text in texts])
        ids = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        return EncodedPairs(
            ids=ids,
            type_ids=[np.asarray(e.type_ids, dtype=np.int64) for e in encodings],
            lengths=np.array([len(x) for x in ids], dtype=np.int64),
            truncated=np.array([bool(e.overflowing) for e in encodings], dtype=bool),
        )


# ============================================================================================== batching and shapes


@dataclass(frozen=True)
class MicroBatch:
    indices: tuple[int, ...]  # positions in the request, longest first
    shape: ShapeBucket  # rows >= len(indices); spare rows are filled and their scores dropped
    static: bool  # True: shape is a compiled bucket; False: a dynamic shape


def length_order(lengths: Sequence[int]) -> list[int]:
    """Indices by descending length, ties by ascending index (a stable order, so plans are reproducible)."""
    return sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def pick_length(length: int, bucket_lengths: Sequence[int]) -> int:
    """The smallest bucket length that holds `length` tokens."""
    for candidate in bucket_lengths:
        if candidate >= length:
            return candidate
    raise ValueError(f"{length} tokens fit no bucket (largest {max(bucket_lengths)})")


def plan_batches(lengths: Sequence[int], buckets: Sequence[ShapeBucket] | None, batch_size: int,
                 max_length: int, pad_multiple: int = 8) -> list[MicroBatch]:
    """Group pairs sorted by length into micro-batches so that little padding is computed.

    Dynamic shapes: chunks of `batch_size`, each padded to its longest pair rounded up to `pad_multiple`
    (fewer distinct shapes for the CPU plugin), never beyond `max_length`.
    Static buckets: each pair goes to the smallest bucket length that holds it; within a length, full batches use
    the bucket with the most rows and the remainder the smallest bucket whose rows hold it.
    """
    order = length_order(lengths)
    plan = []
    if buckets is None:
        for start in range(0, len(order), batch_size):
            chunk = tuple(order[start:start + batch_size])
            longest = int(lengths[chunk[0]])
            plan.append(MicroBatch(chunk, ShapeBucket(len(chunk), min(_round_up(longest, pad_multiple), max_length)),
                                   static=False))
        return plan
    bucket_lengths = sorted({b.length for b in buckets})
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(pick_length(int(lengths[i]), bucket_lengths), []).append(i)
    for length in sorted(groups, reverse=True):
        members = groups[length]
        shapes = sorted((b for b in buckets if b.length == length), key=lambda b: b.rows)
        largest = shapes[-1]
        while members:
            if len(members) >= largest.rows:
                shape = largest
            else:
                shape = next(b for b in shapes if b.rows >= len(members))
            take, members = members[:shape.rows], members[shape.rows:]
            plan.append(MicroBatch(tuple(take), shape, static=True))
    return plan


def pad_batch(encoded: EncodedPairs, batch: MicroBatch, input_names: Sequence[str], pad_id: int,
              dtype=np.int64) -> dict[str, np.ndarray]:
    """Inputs for one micro-batch: right-padded with pad_id and a zero attention mask. Spare rows (static
    buckets) repeat the batch's shortest real row; their scores are dropped."""
    rows, length = batch.shape.rows, batch.shape.length
    ids = np.full((rows, length), pad_id, dtype=dtype)
    mask = np.zeros((rows, length), dtype=dtype)
    types = np.zeros((rows, length), dtype=dtype)
    sources = list(batch.indices) + [batch.indices[-1]] * (rows - len(batch.indices))
    for row, i in enumerate(sources):
        n = int(encoded.lengths[i])
        ids[row, :n] = encoded.ids[i]
        mask[row, :n] = 1
        types[row, :n] = encoded.type_ids[i]
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {name: feed[name] for name in input_names}


# ============================================================================================== engine (OpenVINO)

REQUIRED_INPUTS = ("input_ids", "attention_mask")
OPTIONAL_INPUTS = ("token_type_ids",)


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
    compile_ms: float
    input_names: tuple[str, ...]
    num_labels: int
    properties: Mapping[str, str]
    infer_requests: int


class Engine:
    """Compiled OpenVINO model(s) and a pool of infer requests per compiled model. `infer(feed, shape)` returns
    logits as float32 [rows, num_labels]. Knows nothing about HTTP, JSON or tokenization."""

    def __init__(self, core, model, device: str, buckets: Sequence[ShapeBucket] | None, properties: Mapping,
                 before_compile: Callable[[ShapeBucket | None], None] = lambda shape: None, infer_requests: int = 0):
        self.input_names, self.num_labels = self.check_model_contract(model)
        self.input_dtype = model.input("input_ids").get_element_type().to_dtype()
        self.device = device
        self.buckets = tuple(buckets) if buckets is not None else None
        self._compiled: dict[ShapeBucket | None, Any] = {}
        self._pools: dict[ShapeBucket | None, queue.Queue] = {}
        started = time.perf_counter()
        for shape in (self.buckets or (None,)):
            before_compile(shape)
            variant = model
            if shape is not None:
                variant = model.clone()
                variant.reshape({name: [shape.rows, shape.length] for name in self.input_names})
            try:
                compiled = core.compile_model(variant, device, dict(properties))
            except RuntimeError as exc:
                where = f" for shape {shape}" if shape else ""
                raise StartupError(f"compiling the model on {device}{where} failed: {_first_line(exc)}",
                                   EXIT_DEVICE) from None
            self._compiled[shape] = compiled
            pool: queue.Queue = queue.Queue()
            self.num_requests = infer_requests or max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
            for _ in range(self.num_requests):
                pool.put(compiled.create_infer_request())
            self._pools[shape] = pool
        self.compile_ms = (time.perf_counter() - started) * 1000
        self.properties = dict(properties)

    @staticmethod
    def check_model_contract(model) -> tuple[tuple[str, ...], int]:
        """Inputs input_ids + attention_mask (+ token_type_ids); output `logits` [?, 1 or 2]."""
        names = [p.get_any_name() for p in model.inputs]
        missing = [n for n in REQUIRED_INPUTS if n not in names]
        extra = [n for n in names if n not in REQUIRED_INPUTS + OPTIONAL_INPUTS]
        if missing or extra:
            raise StartupError(f"the model's inputs are {names}: it needs {list(REQUIRED_INPUTS)} (plus optional "
                               f"token_type_ids) and nothing else", EXIT_MODEL)
        outputs = [o for o in model.outputs if "logits" in o.get_names()] or list(model.outputs)
        if len(outputs) != 1:
            raise StartupError("the model has no output named 'logits'", EXIT_MODEL)
        shape = outputs[0].get_partial_shape()
        if shape.rank.is_dynamic or shape.rank.get_length() != 2 or shape[1].is_dynamic or \
                shape[1].get_length() not in (1, 2):
            raise StartupError(f"the model's logits have shape {shape}: a cross-encoder gives [batch, 1] or "
                               f"[batch, 2]", EXIT_MODEL)
        ordered = tuple(n for n in REQUIRED_INPUTS + OPTIONAL_INPUTS if n in names)
        return ordered, shape[1].get_length()

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
        return EngineInfo(self.device, tuple(devices), self.buckets, tuple(cached), round(self.compile_ms, 1),
                          self.input_names, self.num_labels, self.properties, self.num_requests)

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
            return np.array(result[0], dtype=np.float32, copy=True)
        except RuntimeError as exc:
            raise InferenceError(f"inference failed: {_first_line(exc)}") from None
        finally:
            pool.put(request)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# ============================================================================================== scoring and ranking


def logits_to_scores(logits: np.ndarray) -> np.ndarray:
    """Scores in float64: sigmoid of one logit, or the positive-class softmax probability of two
    (softmax(l)[1] == sigmoid(l1 - l0)). A non-finite logit is an InferenceError."""
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] not in (1, 2):
        raise InferenceError(f"the model returned logits of shape {list(x.shape)}")
    if not np.isfinite(x).all():
        raise InferenceError("the model returned a non-finite score")
    z = x[:, 0] if x.shape[1] == 1 else x[:, 1] - x[:, 0]
    e = np.exp(-np.abs(z))  # stable for any magnitude
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def rank(scores: Sequence[float], top_k: int | None = None) -> list[int]:
    """Indices by descending score; equal scores keep ascending input index."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return order if top_k is None else order[:top_k]


@dataclass(frozen=True)
class ScoredPairs:
    scores: np.ndarray  # float64, request order
    lengths: np.ndarray  # tokens per pair
    truncated: np.ndarray  # bool per pair
    tokenize_ms: float
    infer_ms: float  # on the device
    batches: int
    npu_busy_delta_us: int | None
    queue_ms: float = 0.0  # waiting for a free infer request


@dataclass(frozen=True)
class WorkLimits:
    """Per-request bounds checked by the scoring path: a deadline (time.monotonic()), a token budget, and a probe
    that says whether the client is still there."""

    deadline: float | None = None
    max_total_tokens: int | None = None
    client_gone: Callable[[], bool] = lambda: False

    def check(self) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise DeadlineExceededError("the request's deadline passed before its work ran")
        if self.client_gone():
            raise ClientGoneError("the client closed the connection")


class _Job:
    """One request's pairs inside the Batcher: scores arrive batch by batch; the future completes at the last."""

    def __init__(self, encoded: EncodedPairs, limits: WorkLimits):
        self.encoded = encoded
        self.limits = limits
        self.future: Future = Future()
        self.scores = np.full(len(encoded.lengths), np.nan)
        self.todo = length_order(encoded.lengths)  # indices not yet planned, longest first
        self.remaining = len(self.todo)  # indices not yet scored
        self.submitted = time.perf_counter()
        self.first_started: float | None = None
        self.batches = 0

    def dead(self) -> ServiceError | None:
        """Why this job should not run any more, or None."""
        if self.future.done():
            return DeadlineExceededError("cancelled")
        try:
            self.limits.check()
        except ServiceError as exc:
            return exc
        return None


class Batcher:
    """Cross-request dynamic batching. One owner thread takes the waiting requests in arrival order, gives each a
    slice of at most `round_pairs` pairs per round (round-robin, so a small request never waits behind the whole of a
    large one), sorts the round's pairs by length, plans micro-batches (per static bucket when the engine has them)
    and hands them to one worker thread per infer request. Workers call the engine's blocking `infer`, which
    releases the GIL, so the device runs `workers` batches at once while the owner prepares the next. Each request
    waits on its own Future."""

    def __init__(self, engine, pad_id: int, max_length: int, batch_size: int, round_pairs: int = 64):
        self.engine, self.pad_id, self.max_length = engine, pad_id, max_length
        self.batch_size, self.round_pairs = batch_size, max(round_pairs, batch_size)
        self.workers = max(1, getattr(engine, "num_requests", 1))
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle_changed = threading.Condition()
        self._idle_workers = 0
        self._closed = False
        self._threads = [threading.Thread(target=self._own, daemon=True, name="batcher")]
        self._threads += [threading.Thread(target=self._work_loop, daemon=True, name=f"infer-{i}")
                          for i in range(self.workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, encoded: EncodedPairs, limits: WorkLimits) -> _Job:
        job = _Job(encoded, limits)
        if self._closed:
            job.future.set_exception(NotReadyError("the server is shutting down"))
        else:
            self._inbox.put(job)
        return job

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the owner and the workers and wait for them, so that nothing holds the engine afterwards."""
        self._closed = True
        self._inbox.put(None)
        for _ in range(self.workers):
            self._work.put(None)
        with self._idle_changed:
            self._idle_changed.notify_all()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # ---- owner: rounds of micro-batches

    def _own(self) -> None:
        waiting: deque[_Job] = deque()
        while True:
            if not waiting:
                item = self._inbox.get()
                if item is None:
                    return
                waiting.append(item)
            # plan only when a worker is idle and nothing is queued: requests that arrive while the device is
            # busy join the next round, and so share its batches
            with self._idle_changed:
                self._idle_changed.wait_for(lambda: self._closed or (self._idle_workers > 0 and self._work.empty()))
            if not self._take_arrivals(waiting):
                return
            for batch in self._plan_round(waiting):
                self._work.put(batch)

    def _take_arrivals(self, waiting: deque) -> bool:
        """Move every submitted job into `waiting`; False once the batcher is closed."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if item is None:
                return False
            waiting.append(item)

    def _plan_round(self, waiting: deque) -> list:
        """Take slices round-robin up to round_pairs; return [(feed, shape, [(job, index, ...)])]."""
        taken: list[tuple[_Job, list[int]]] = []
        budget = self.round_pairs
        for _ in range(len(waiting)):
            if budget <= 0:
                break
            job = waiting.popleft()
            problem = job.dead()
            if problem is not None:
                self._fail([job], problem)
                continue
            part, job.todo = job.todo[:budget], job.todo[budget:]
            budget -= len(part)
            taken.append((job, part))
            if job.todo:
                waiting.append(job)  # the rest of a large request goes behind the others
        if not taken:
            return []
        owners = [(job, i) for job, part in taken for i in part]
        merged = EncodedPairs(ids=[job.encoded.ids[i] for job, i in owners],
                              type_ids=[job.encoded.type_ids[i] for job, i in owners],
                              lengths=np.array([job.encoded.lengths[i] for job, i in owners]),
                              truncated=np.zeros(len(owners), bool))
        batches = []
        for batch in plan_batches(merged.lengths, self.engine.buckets, self.batch_size, self.max_length):
            feed = pad_batch(merged, batch, self.engine.input_names, self.pad_id, self.engine.input_dtype)
            batches.append((feed, batch.shape, [owners[k] for k in batch.indices]))
        return batches

    # ---- workers: run batches, hand out scores

    def _work_loop(self) -> None:
        while True:
            with self._idle_changed:
                self._idle_workers += 1
                self._idle_changed.notify_all()
            item = self._work.get()
            with self._idle_changed:
                self._idle_workers -= 1
            if item is None:
                return
            feed, shape, rows = item
            live = []
            for job in {id(job): job for job, _ in rows}.values():
                problem = job.dead()
                if problem is None:
                    live.append(job)
                else:
                    self._fail([job], problem)
            if not live:
                continue
            started = time.perf_counter()
            for job in live:
                job.first_started = job.first_started or started
            try:
                logits = self.engine.infer(feed, shape, min((j.limits.deadline for j in live
                                                                if j.limits.deadline is not None), default=None))
                if logits.shape[0] != shape.rows:
                    raise InferenceError(f"the model returned {logits.shape[0]} rows for a batch of {shape.rows}")
                scores = logits_to_scores(logits[:len(rows)])
            except Exception as exc:  # handed to the waiting requests (a bug there becomes a logged 500)
                self._fail(live, exc)
                continue
            with self._lock:
                for (job, i), score in zip(rows, scores, strict=True):
                    if job.future.done():
                        continue
                    job.scores[i] = score
                    job.remaining -= 1
                for job in live:
                    job.batches += 1
                    if job.remaining == 0 and not job.future.done():
                        job.future.set_result(job.scores)

    def cancel(self, job: _Job) -> None:
        with self._lock:
            job.future.cancel()

    def _fail(self, jobs: Sequence[_Job], error: BaseException) -> None:
        with self._lock:
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)


class Reranker:
    """Pairs in, scores out: tokenize (on the caller's thread), then the Batcher plans micro-batches across
    concurrent requests, infers and scores. `score_pairs` is the one API the HTTP layer calls."""

    def __init__(self, encoder: PairEncoder, engine, batch_size: int, busy_counter: NpuBusyCounter | None = None,
                 round_pairs: int = 64):
        self.encoder = encoder
        self.engine = engine
        self.busy_counter = busy_counter
        self.batcher = Batcher(engine, encoder.pad_id, encoder.max_length, batch_size, round_pairs)

    def score_pairs(self, query: str, texts: Sequence[str], limits: WorkLimits = WorkLimits()) -> ScoredPairs:
        limits.check()
        t0 = time.perf_counter()
        encoded = self.encoder.encode(query, texts)
        t1 = time.perf_counter()
        total = int(encoded.lengths.sum())
        if limits.max_total_tokens is not None and total > limits.max_total_tokens:
            raise PayloadTooLargeError(f"the request has {total} tokens after truncation; the limit "
                                       f"(max_total_tokens) is {limits.max_total_tokens}", "documents")
        busy_before = self.busy_counter.read() if self.busy_counter else None
        job = self.batcher.submit(encoded, limits)
        timeout = None if limits.deadline is None else max(0.0, limits.deadline - time.monotonic())
        try:
            scores = job.future.result(timeout)
        except FutureTimeoutError:
            self.batcher.cancel(job)  # its remaining batches are dropped
            raise DeadlineExceededError("the request's deadline passed before its work finished") from None
        t2 = time.perf_counter()
        busy_after = self.busy_counter.read() if self.busy_counter else None
        delta = busy_after - busy_before if busy_before is not None and busy_after is not None else None
        queued = (job.first_started or t2) - job.submitted
        return ScoredPairs(scores, encoded.lengths, encoded.truncated, (t1 - t0) * 1000, (t2 - t1 - queued) * 1000,
                           job.batches, delta, queued * 1000)

    def close(self) -> None:
        self.batcher.close()


# ==================================================================================== model directory + startup check

SMOKE_QUERY = "what is the capital of france"
SMOKE_DOCUMENTS = (
    "Paris is the capital and largest city of France.",
    "Bread is baked from flour, water, salt and yeast.",
    "The Eiffel Tower in Paris was built for the 1889 World's Fair and is one of the most visited monuments in "
    "the world; it stands on the Champ de Mars beside the river Seine.",
)


@dataclass(frozen=True)
class ModelFiles:
    model_dir: Path
    name: str
    xml: Path
    tokenizer: Path
    max_length: int  # effective, after the model's limit and the config


def load_model_files(model_dir: str, requested_max_length: int) -> ModelFiles:
    """Check the optimum export layout and work out the max length; every problem is one StartupError line."""
    root = Path(model_dir)
    hint = "export one with: optimum-cli export openvino --model cross-encoder/ms-marco-MiniLM-L6-v2 " \
           "--task text-classification --weight-format int8 DIR (see README)"
    if not root.is_dir():
        raise StartupError(f"model dir {root} does not exist; {hint}", EXIT_MODEL)
    xml, tok = root / "openvino_model.xml", root / "tokenizer.json"
    for path in (xml, xml.with_suffix(".bin"), tok):
        if not path.is_file():
            raise StartupError(f"model dir {root} has no {path.name}; {hint}", EXIT_MODEL)
    limits, name = [MAX_SUPPORTED_LENGTH], root.name
    for filename, key in (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length")):
        path = root / filename
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StartupError(f"{path} is not valid JSON: {exc}", EXIT_MODEL) from None
        if not isinstance(data, dict):
            raise StartupError(f"{path} is not a JSON object", EXIT_MODEL)
        value = data.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 8 <= value < 1_000_000:
            limits.append(value)
        if filename == "config.json" and isinstance(data.get("_name_or_path"), str) and data["_name_or_path"]:
            name = data["_name_or_path"]
    model_limit = min(limits)
    if requested_max_length > model_limit:
        raise StartupError(f"max_length {requested_max_length} exceeds the model's limit of {model_limit} tokens",
                           EXIT_CONFIG)
    return ModelFiles(root, name, xml, tok, requested_max_length or model_limit)


def static_buckets_for(config: Config, max_length: int) -> tuple[ShapeBucket, ...] | None:
    """The buckets to compile, or None for dynamic shapes. Buckets longer than max_length are dropped, and the
    largest remaining must reach max_length so that every truncated pair fits."""
    if not config.static_shapes:
        return None
    kept = tuple(b for b in config.buckets if b.length <= max_length)
    if not kept or max(b.length for b in kept) < max_length:
        raise StartupError(f"buckets {','.join(map(str, config.buckets))} do not cover max_length {max_length}: "
                           f"add a bucket of length {max_length} or lower --max-length", EXIT_CONFIG)
    return kept


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
            errors.append(_first_line(exc))

    threads = [threading.Thread(target=run) for _ in range(runs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise StartupError(f"startup inference failed: {errors[0]}", EXIT_STARTUP_CHECK)
    return float(max(np.abs(r - reference).max() for r in results))


# ============================================================================================== responses


def render_native(request: RerankRequest, scored: ScoredPairs, model_name: str, device: str,
                  total_ms: float) -> dict:
    results = []
    for i in rank(scored.scores, request.top_k):
        doc = request.documents[i]
        item: dict[str, Any] = {"index": i}
        if doc.id is not None:
            item["id"] = doc.id
        item["score"] = float(scored.scores[i])
        item["truncated"] = bool(scored.truncated[i])
        if request.return_documents:
            item["text"] = doc.text
        results.append(item)
    return {
        "ok": True,
        "results": results,
        "model": model_name,
        "device": device,
        "usage": {"documents": len(request.documents), "tokens": int(scored.lengths.sum())},
        "timings_ms": {"tokenize": round(scored.tokenize_ms, 3), "infer": round(scored.infer_ms, 3),
                       "total": round(total_ms, 3)},
        "npu_busy_delta_us": scored.npu_busy_delta_us,
    }


def render_cohere(request: RerankRequest, scored: ScoredPairs, request_id: str, model_name: str) -> dict:
    results = []
    for i in rank(scored.scores, request.top_k):
        item: dict[str, Any] = {"index": i, "relevance_score": float(scored.scores[i])}
        if request.return_documents:
            item["document"] = request.documents[i].original
        results.append(item)
    return {
        "id": request_id,
        "results": results,
        "meta": {"api_version": {"version": "1"}, "model": model_name,
                 "tokens": {"input_tokens": int(scored.lengths.sum()), "output_tokens": 0}},
    }


def render_error(error: ServiceError, dialect: str) -> dict:
    detail = {"type": error.error_type, "message": error.message, "field": error.field}
    if dialect == "cohere":  # Cohere's SDKs read `message`
        return {"message": error.message, **{k: v for k, v in detail.items() if k != "message"}}
    return {"ok": False, "error": detail}


# ============================================================================================== metrics

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
METRIC_ROUTES = ("/healthz", "/readyz", "/rerank", "/v1/rerank", "/metrics")


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
        route = route if route in METRIC_ROUTES else "other"
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
               npu_busy_us: int | None) -> str:
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
        family("info", "gauge", "Device, model and versions; the value is always 1.")
        labels = ",".join(f'{k}="{_label(v)}"' for k, v in info.items())
        out.append(f"{p}info{{{labels}}} 1")
        if npu_busy_us is not None:
            family("npu_busy_time_microseconds", "counter", "The NPU's busy-time counter (device-global, sysfs).")
            out.append(f"{p}npu_busy_time_microseconds {npu_busy_us}")
        return "\n".join(out) + "\n"


# ============================================================================================== HTTP

JSON_TYPES = ("application/json",)
AUTH_ROUTES = ("/rerank", "/v1/rerank", "/metrics")


class RerankHandler(BaseHTTPRequestHandler):
    """Routes: see ROUTES. Every answer, errors included, is JSON (Prometheus text on /metrics) with an exact
    Content-Length, over HTTP/1.1 keep-alive."""

    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # a garbled request line still gets a status line and headers, not 0.9
    server_version = f"openvino-reranker/{__version__}"
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid the 40 ms delayed-ACK stall
    server: RerankServer

    ROUTES = {
        "/healthz": {"GET": "route_healthz"},
        "/readyz": {"GET": "route_readyz"},
        "/metrics": {"GET": "route_metrics"},
        "/rerank": {"POST": "route_rerank"},
        "/v1/rerank": {"POST": "route_cohere_rerank"},
    }

    # ---- connection: idle and slow-client timeouts

    def handle_one_request(self):
        """Wait for a request's first byte for up to idle_timeout_s, then give the whole request (line, headers,
        body) read_timeout_s: past it the server's reaper shuts the socket, so a slow client cannot hold a thread."""
        config = self.server.config
        self.connection.settimeout(config.idle_timeout_s)
        try:
            if not self.rfile.peek(1):
                self.close_connection = True
                return
        except OSError:  # idle timeout, reset
            self.close_connection = True
            return
        self.connection.settimeout(config.read_timeout_s)
        self.server.watch_read(self, time.monotonic() + config.read_timeout_s)
        try:
            super().handle_one_request()
        finally:
            self.server.unwatch_read(self)

    # ---- dispatch

    def do_GET(self):
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    def _dispatch(self) -> None:
        state = self.server.state
        started = self._started = time.perf_counter()
        self._arrived = time.monotonic()  # deadlines count from here
        self._body_read = False
        self._status = 0
        self._log: dict[str, Any] = {}
        self.request_id = self._request_id()
        path = self.path.split("?", 1)[0]
        dialect = "cohere" if path == "/v1/rerank" else "native"
        state.enter()
        try:
            methods = self.ROUTES.get(path)
            if methods is None:
                raise NotFoundError(f"no route {path}; routes: {', '.join(self.ROUTES)}")
            if self.command not in methods:
                allowed = ", ".join(methods)
                raise MethodNotAllowedError(f"{self.command} is not allowed on {path}; use {allowed}",
                                            headers={"Allow": allowed})
            if path in AUTH_ROUTES:
                self._check_auth()
            if self.command != "POST":
                self.server.unwatch_read(self)  # the whole request has arrived
            getattr(self, methods[self.command])()
        except ClientGoneError:
            self._status = 499
            self.close_connection = True
        except ServiceError as exc:
            self._send_error_json(exc, dialect)
        except Exception:  # a bug: log it, answer 500, keep serving
            log.exception("unhandled error on %s %s (request %s)", self.command, path, self.request_id)
            self._send_error_json(ServiceError("internal error; the server log has the details"), dialect)
        finally:
            state.leave()
            elapsed = time.perf_counter() - started
            state.metrics.observe_request(path, self._status, elapsed)
            extra = "".join(f" {k}={v}" for k, v in self._log.items())
            log.info("request id=%s method=%s route=%s status=%s ms=%.1f%s", self.request_id, self.command, path,
                     self._status, elapsed * 1000, extra)

    def _request_id(self) -> str:
        given = self.headers.get("X-Request-ID", "")
        return given if re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", given) else uuid.uuid4().hex

    def _check_auth(self) -> None:
        key = self.server.state.api_key
        if not key:
            return
        scheme, _, given = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise UnauthorizedError("a valid 'Authorization: Bearer <key>' header is required",
                                    headers={"WWW-Authenticate": 'Bearer realm="openvino-reranker"'})

    # ---- reading

    def _read_json(self) -> Any:
        if self.headers.get("Transfer-Encoding"):
            raise LengthRequiredError("chunked request bodies are not supported: send Content-Length",
                                      headers={"Connection": "close"})
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            raise LengthRequiredError("Content-Length is required", headers={"Connection": "close"})
        if not raw_length.strip().isdigit():
            raise BadRequestError(f"Content-Length {raw_length!r} is not a number", headers={"Connection": "close"})
        length = int(raw_length)
        limit = self.server.config.max_body_bytes
        if length > limit:
            raise PayloadTooLargeError(f"the body has {length} bytes; the limit (max_body_bytes) is {limit}",
                                       headers={"Connection": "close"})
        content_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise RequestTimeoutError("timed out reading the request body",
                                      headers={"Connection": "close"}) from None
        except OSError:
            raise ClientGoneError("the connection closed while the body was read") from None
        if len(body) != length:
            raise RequestTimeoutError(f"the body ended after {len(body)} of {length} bytes (read_timeout_s is "
                                      f"{self.server.config.read_timeout_s})", headers={"Connection": "close"})
        self._body_read = True
        self.server.unwatch_read(self)
        if content_type not in JSON_TYPES:
            raise UnsupportedMediaTypeError(
                f"Content-Type must be application/json, not {content_type or 'missing'}")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRequestError(f"the body is not valid UTF-8 (byte {exc.start})") from None
        try:
            return json.loads(text, parse_constant=_reject_constant)
        except ValueError as exc:
            raise BadRequestError(f"the body is not valid JSON: {exc}") from None

    def _deadline(self, request: RerankRequest) -> float:
        """Seconds from the request's start: the body's timeout_ms, else X-Request-Timeout-Ms, else the default."""
        timeout_ms = request.timeout_ms
        if timeout_ms is None and "X-Request-Timeout-Ms" in self.headers:
            raw = self.headers["X-Request-Timeout-Ms"].strip()
            if not raw.isdigit() or not 1 <= int(raw) <= 3_600_000:
                raise BadRequestError(f"X-Request-Timeout-Ms must be an integer 1..3600000, not {raw!r}",
                                      "X-Request-Timeout-Ms")
            timeout_ms = int(raw)
        if timeout_ms is None:
            timeout_ms = self.server.config.request_timeout_ms
        return self._arrived + timeout_ms / 1000

    def _client_gone(self) -> bool:
        """True when the peer has closed: the socket is readable but holds no data."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    # ---- writing

    def _send(self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> None:
        headers = dict(headers or {})
        if self._body_pending() or self.server.state.draining:
            headers["Connection"] = "close"  # an unread body would be parsed as the next request
        self._status = status
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Request-ID", self.request_id)
            for name, value in headers.items():
                self.send_header(name, value)
            if headers.get("Connection", "").lower() == "close":
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:  # the client went away while we answered
            self.close_connection = True

    def _send_json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps(payload, ensure_ascii=False, allow_nan=False).encode("utf-8")
        self._send(status, body, "application/json", headers)

    def _body_pending(self) -> bool:
        if self._body_read:
            return False
        length = (self.headers.get("Content-Length") or "0").strip()
        return bool(self.headers.get("Transfer-Encoding")) or not length.isdigit() or int(length) > 0

    def _send_error_json(self, error: ServiceError, dialect: str) -> None:
        self._send_json(error.status, render_error(error, dialect), error.headers)

    def send_error(self, code, message=None, explain=None):
        """Errors raised by http.server before a route runs (bad request line, header limits, ...) as JSON."""
        self.request_id = getattr(self, "request_id", None) or uuid.uuid4().hex
        self._body_read = True  # nothing more is read: the connection closes after this answer
        text = message or HTTPStatus(code).phrase
        error = ServiceError(text, headers={"Connection": "close"})
        error.status, error.error_type = code, "http_error"
        self.close_connection = True
        self._send_error_json(error, "native")

    def log_request(self, code="-", size="-"):
        pass  # one line per request is written by _dispatch

    def log_message(self, format, *args):
        log.debug("http: %s", (format % args).translate({c: None for c in range(32)}))

    # ---- routes

    def route_healthz(self) -> None:
        self._send_json(200, {"ok": True, "status": "alive", "version": __version__})

    def route_readyz(self) -> None:
        state = self.server.state
        ready = state.is_ready()
        self._send_json(200 if ready else 503, state.describe(), {} if ready else {"Retry-After": "1"})

    def route_metrics(self) -> None:
        body = self.server.state.render_metrics().encode("utf-8")
        self._send(200, body, "text/plain; version=0.0.4; charset=utf-8")

    def route_rerank(self) -> None:
        request = parse_native(self._read_json(), self.server.state.limits)
        scored = self._score(request)
        info = self.server.state
        self._send_json(200, render_native(request, scored, info.model_name, info.device,
                                           (time.perf_counter() - self._started) * 1000))

    def route_cohere_rerank(self) -> None:
        request = parse_cohere(self._read_json(), self.server.state.limits)
        scored = self._score(request)
        self._send_json(200, render_cohere(request, scored, self.request_id, self.server.state.model_name))

    def _score(self, request: RerankRequest) -> ScoredPairs:
        """Admission (bounded, never waits) -> deadline -> score -> readiness bookkeeping."""
        state = self.server.state
        self._log["documents"] = len(request.documents)
        if not state.started.is_set():
            raise NotReadyError(f"not ready: {state.reason}", headers={"Retry-After": "1"})
        limits = WorkLimits(self._deadline(request), state.config.max_total_tokens, self._client_gone)
        if not state.try_admit():
            raise OverloadedError(f"{state.config.max_queued_requests} scoring requests are already admitted "
                                  f"(max_queued_requests); retry shortly", headers={"Retry-After": "1"})
        try:
            scored = state.reranker.score_pairs(request.query, [d.text for d in request.documents], limits)
        except InferenceError as exc:
            state.record_inference(False, exc.message)
            raise
        finally:
            state.release_admission()
        state.record_inference(True)
        state.metrics.observe_scoring(scored)
        self._log.update(tokens=int(scored.lengths.sum()), queue_ms=f"{scored.queue_ms:.1f}",
                         tokenize_ms=f"{scored.tokenize_ms:.1f}", infer_ms=f"{scored.infer_ms:.1f}")
        return scored


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in JSON")


# ============================================================================================== server state


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


class RerankServer(ThreadingHTTPServer):
    """The HTTP server plus two guards: a bound on open connections (beyond it: an immediate 503, no thread) and a
    reaper that shuts the socket of a request still being received after read_timeout_s (slow clients)."""

    daemon_threads = True  # idle keep-alive connections must not block shutdown
    request_queue_size = 128

    def __init__(self, address, state: ServiceState):
        self.state = state
        self.config = state.config
        super().__init__(address, RerankHandler, bind_and_activate=False)
        self._slots = threading.BoundedSemaphore(state.config.max_connections)
        self._reading: dict[RerankHandler, float] = {}
        self._reading_lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._reap_slow_reads, daemon=True, name="slow-client-reaper").start()

    # ---- connection bound

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            _refuse_connection(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    # ---- slow clients

    def watch_read(self, handler: RerankHandler, deadline: float) -> None:
        with self._reading_lock:
            self._reading[handler] = deadline

    def unwatch_read(self, handler: RerankHandler) -> None:
        with self._reading_lock:
            self._reading.pop(handler, None)

    def _reap_slow_reads(self) -> None:
        while not self._closed.wait(0.25):
            now = time.monotonic()
            with self._reading_lock:
                expired = [h for h, deadline in self._reading.items() if deadline <= now]
                for handler in expired:
                    del self._reading[handler]
            for handler in expired:
                log.info("closing a connection from %s: request not received within %ss",
                         handler.client_address[0], self.config.read_timeout_s)
                try:
                    handler.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def server_close(self):
        self._closed.set()
        super().server_close()

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], OSError):  # resets, broken pipes, reaped slow clients
            log.debug("connection from %s ended: %s", client_address[0] if client_address else "?",
                      sys.exc_info()[1])
            return
        log.exception("connection error from %s", client_address[0] if client_address else "?")


_REFUSAL = json.dumps(render_error(OverloadedError("too many open connections (max_connections); retry shortly"),
                                   "native")).encode()


def _refuse_connection(sock: socket.socket) -> None:
    """Answer a connection over max_connections without reading it or giving it a thread."""
    try:
        sock.settimeout(1.0)
        sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                     b"Connection: close\r\nContent-Length: " + str(len(_REFUSAL)).encode() + b"\r\n\r\n" + _REFUSAL)
    except OSError:
        pass


# ============================================================================================== systemd readiness

COMPILE_BUDGET_US = 300_000_000  # start-timeout extension granted per compile (a first NPU compile is slow)


def sd_notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send one sd_notify(3) datagram to $NOTIFY_SOCKET (a path, or '@name' for the abstract namespace).
    Without the variable nothing happens; a failure is logged, never raised: readiness is advisory."""
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET %r is not a unix socket path; systemd notification skipped", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
        return True
    except OSError as exc:
        log.warning("systemd notification failed: %s", exc)
        return False


# ============================================================================================== startup


def bind_server(state: ServiceState) -> RerankServer:
    """Claim HOST:PORT before anything slow happens; the bind is the check (no race with a probe)."""
    config = state.config
    try:
        infos = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot resolve host {config.host!r}: {exc.strerror}", EXIT_CONFIG) from None
    RerankServer.address_family = infos[0][0]
    server = RerankServer((config.host, config.port), state)
    try:
        server.server_bind()
        server.server_activate()
    except OSError as exc:
        server.server_close()
        raise StartupError(f"cannot bind {config.host}:{config.port}: {exc.strerror or exc}", EXIT_PORT) from None
    return server


def build_reranker(config: Config, core=None) -> tuple[Reranker, ModelFiles, EngineInfo, ParityCheck]:
    """Load the model dir, compile on the device, check the compile against the f32 reference (falling back to
    a safe configuration or refusing), and assemble the scoring path."""
    model_files = load_model_files(config.model_dir, config.max_length)
    buckets = static_buckets_for(config, model_files.max_length)
    try:
        encoder = PairEncoder.from_file(model_files.tokenizer, model_files.max_length)
    except Exception as exc:  # tokenizers raises its own exception type for a malformed file
        raise StartupError(f"cannot load {model_files.tokenizer}: {_first_line(exc)}", EXIT_MODEL) from None
    import openvino as ov

    core = core if core is not None else ov.Core()
    check_device_available(config.device, list(core.available_devices))
    if config.cache_dir:
        try:
            os.makedirs(config.cache_dir, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"cannot create cache dir {config.cache_dir}: {exc.strerror}", EXIT_CONFIG) from None
        core.set_property({"CACHE_DIR": config.cache_dir})
    try:
        model = core.read_model(str(model_files.xml))
    except RuntimeError as exc:
        raise StartupError(f"cannot read {model_files.xml}: {_first_line(exc)}", EXIT_MODEL) from None
    properties = serving_properties(config)
    log.info("compiling %s on %s with %s (%s)", model_files.xml, config.device, properties,
             f"buckets {','.join(map(str, buckets))}" if buckets else "dynamic shapes")

    def before_compile(shape):
        sd_notify(f"EXTEND_TIMEOUT_USEC={COMPILE_BUDGET_US}\nSTATUS=compiling for {config.device}"
                  + (f" shape {shape}" if shape else ""))

    counter = NpuBusyCounter(config.npu_busy_path) if "NPU" in config.device else None
    engine = Engine(core, model, config.device, buckets, properties, before_compile, config.infer_requests)
    reranker = Reranker(encoder, engine, config.batch_size, counter)

    # Some compile configurations return wrong scores (hazards.md #1: INT8 weight-only IRs with several CPU
    # streams at bf16). Compare with an f32 single-stream CPU compile of the same IR before serving.
    sd_notify(f"EXTEND_TIMEOUT_USEC={COMPILE_BUDGET_US}\nSTATUS=checking scores against the f32 CPU reference")
    reference_engine = Engine(core, model, "CPU", None, REFERENCE_PROPERTIES, infer_requests=1)
    reference_reranker = Reranker(encoder, reference_engine, config.batch_size)
    reference = reference_reranker.score_pairs(PARITY_QUERY, PARITY_DOCUMENTS)
    reference_reranker.close()
    diff = parity_diff(reranker, reference.scores)
    parity = ParityCheck(diff, config.parity_tolerance, False)
    if diff > config.parity_tolerance:
        message = (f"scores on {config.device} with {properties} differ from the f32 single-stream CPU reference "
                   f"by {diff:.4g} (tolerance {config.parity_tolerance})")
        if config.on_parity_failure == "refuse":
            raise StartupError(message, EXIT_STARTUP_CHECK)
        safe = safe_properties(config.device)
        log.warning("%s; falling back to %s", message, safe)
        reranker.close()
        engine = Engine(core, model, config.device, buckets, safe, before_compile, infer_requests=1)
        reranker = Reranker(encoder, engine, config.batch_size, counter)
        safe_diff = parity_diff(reranker, reference.scores)
        if safe_diff > config.parity_tolerance:
            raise StartupError(f"{message}, and the safe configuration {safe} still differs by {safe_diff:.4g}",
                               EXIT_STARTUP_CHECK)
        parity = ParityCheck(safe_diff, config.parity_tolerance, True, diff, properties)
    log.info("parity with the f32 reference: max score difference %.3g%s", parity.max_abs_diff,
             " (after falling back)" if parity.fallback else "")
    return reranker, model_files, engine.info(), parity


def drain(server: RerankServer, state: ServiceState) -> None:
    """Stop accepting, let in-flight requests finish for up to drain_timeout_s, then return."""
    log.info("stopping: no new connections; draining for up to %ss", state.config.drain_timeout_s)
    sd_notify("STOPPING=1")
    state.draining = True
    server.shutdown()
    server.server_close()
    if not state.wait_idle(state.config.drain_timeout_s):
        log.warning("drain time over with requests still in flight; exiting anyway")


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None, core=None,
         stop: threading.Event | None = None) -> int:
    """config -> bind -> load + compile -> startup check (fail closed) -> ready -> serve until SIGTERM/SIGINT.

    `core` and `stop` let tests inject an OpenVINO Core stand-in and stop the server without a signal."""
    stop = stop or threading.Event()
    server = None
    try:
        config = load_config(argv, environ)
        logging.basicConfig(level=config.log_level, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        log.setLevel(config.log_level)
        api_key = load_api_key(config)
        if not api_key and not config.allow_remote_without_key and not is_loopback(config.host):
            raise StartupError(f"refusing to serve on {config.host}, which is not a loopback address, without an API "
                               f"key: set {ENV_PREFIX}API_KEY or {ENV_PREFIX}API_KEY_FILE, or pass "
                               f"--allow-remote-without-key true", EXIT_CONFIG)
        state = ServiceState(config, api_key)
        server = bind_server(state)
        host, port = server.server_address[:2]
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True,
                         name="http").start()
        log.info("listening on http://%s:%d (not ready until the model is compiled)", host, port)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
        state.reason = "loading and compiling the model"
        reranker, model_files, engine_info, parity = build_reranker(config, core)
        state.reason = "running the startup check"
        check = check_startup(reranker, engine_info, config)
        state.mark_ready(reranker, model_files, engine_info, check, parity)
        log.info("ready: model %s on %s (execution devices %s, compile %.0f ms, from cache %s); %s",
                 model_files.name, config.device, ",".join(engine_info.execution_devices), engine_info.compile_ms,
                 engine_info.loaded_from_cache, check.npu_note)
        sd_notify(f"READY=1\nSTATUS=serving on {host}:{port}, device {config.device} "
                  f"({','.join(engine_info.execution_devices)})")
        del reranker
        stop.wait()
        drain(server, state)
        state.release_model()
        return 0
    except StartupError as exc:
        print(f"openvino-reranker: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()


if __name__ == "__main__":
    sys.exit(main())
