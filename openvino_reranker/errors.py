"""Errors a client sees (one status and `error_type` each) and errors that stop startup (one exit code each)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass


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


class HttpProtocolError(ServiceError):
    """The request line or headers were refused (by framing and connection: 400, 414, 431, 501, 505)."""

    error_type = "http_error"

    def __init__(self, status: int, message: str):
        super().__init__(message, headers={"Connection": "close"})
        self.status = status


class ClientGoneError(ServiceError):
    """The client closed its connection: the work is dropped and nothing is sent (logged as status 499)."""

    status, error_type = 499, "client_closed_request"


@dataclass(frozen=True)
class DocumentNames:
    """How a request body names its documents, so that an error found after parsing (the token budget, a pair too
    long to score untruncated) names the field the client sent: `documents` and `documents[3]` in a native, Cohere
    or infinity body, `texts` and `texts[3]` in a TEI body, `pairs` and `[3]` for a bare array of pairs."""

    array: str = "documents"  # the whole list
    entry_prefix: str = "documents"  # what precedes one entry's [index]

    def entry(self, index: int) -> str:
        return f"{self.entry_prefix}[{index}]"


DOCUMENTS = DocumentNames()


class StartupError(Exception):
    """Stops the process before it serves: one line on stderr and a distinct exit code (SPEC.md, "Startup and exit
    codes")."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StartupCancelled(StartupError):
    """SIGTERM or SIGINT arrived while starting: stop before the next slow step, without READY=1, exit 0."""

    def __init__(self, step: str):
        super().__init__(f"stopped by a signal before {step}", 0)


EXIT_CONFIG, EXIT_PORT, EXIT_MODEL, EXIT_DEVICE, EXIT_STARTUP_CHECK = 2, 3, 4, 5, 6
EXIT_SCORING_STOPPED = 7  # a scoring thread ended while serving: exit so that systemd restarts the service
EXIT_DOWNLOAD = 8  # fetching the model from the Hub failed in a way that may pass (network, server, disk): restartable
# the model's reference_scores.json disagrees with its own IR computed exactly (f32): the tokenizer, template, pad id or
# IR is not what the scores were made with, which no compile configuration and no restart fixes
EXIT_REFERENCE_SCORES = 9

# Every exit code and what it means, in a few words: the end of --help (SPEC.md, "Startup and exit codes", has more).
EXIT_CODES = (
    (0, "stopped by SIGTERM or SIGINT (after the drain, or before it was ready)"),
    (EXIT_CONFIG, "bad configuration: a flag or variable, the API key, a non-loopback host without a key"),
    (EXIT_PORT, "HOST:PORT cannot be bound; nothing was loaded"),
    (EXIT_MODEL, "the model cannot be had as asked: a directory missing or malformed, a Hub repo missing or gated, "
                 "offline and not cached"),
    (EXIT_DEVICE, "the device is not available, or the compile failed"),
    (EXIT_STARTUP_CHECK, "the startup check failed: an inference error, or no proof that the NPU ran it"),
    (EXIT_SCORING_STOPPED, "a scoring thread ended while serving (a bug); exits so that systemd restarts it"),
    (EXIT_DOWNLOAD, "fetching from the Hub failed in a way that may pass (unreachable, cut off, disk full); the next "
                    "start tries again"),
    (EXIT_REFERENCE_SCORES, "the model's reference_scores.json disagrees with its own IR computed exactly: a wrong "
                            "tokenizer, template or IR, which no restart fixes"),
)


_SOURCE_LOCATION = re.compile(r"(Exception from \S+:\d+:|Check '.*' failed at \S+:\d+:)")


def error_reason(exc: BaseException) -> str:
    """One line saying why: OpenVINO's messages start with source locations ("Exception from
    src/inference/src/cpp/core.cpp:84:", "Check '...' failed at ...:900:") and put the reason after them
    ("Incorrect weights in bin file!"), so those lines are skipped."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = [line for line in lines if not _SOURCE_LOCATION.fullmatch(line)]
    text = " ".join(reasons or lines[:1]) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
