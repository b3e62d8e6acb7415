"""Startup: config -> bind -> load + compile -> checks -> ready -> serve until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Mapping, Sequence

from .batcher import Reranker
from .checks import (
    PARITY_DOCUMENTS,
    PARITY_QUERY,
    REFERENCE_PROPERTIES,
    ParityCheck,
    check_startup,
    parity_diff,
    safe_properties,
    serving_properties,
)
from .config import ENV_PREFIX, Config, is_loopback, load_api_key, load_config
from .encoding import PairEncoder
from .engine import Engine, EngineInfo, NpuBusyCounter, check_device_available
from .errors import EXIT_CONFIG, EXIT_MODEL, EXIT_PORT, EXIT_STARTUP_CHECK, StartupError, first_line
from .httpserver import RerankServer
from .modeldir import ModelFiles, load_model_files, static_buckets_for
from .service import ServiceState
from .systemd import COMPILE_BUDGET_US, sd_notify

log = logging.getLogger("openvino_reranker")



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
        raise StartupError(f"cannot load {model_files.tokenizer}: {first_line(exc)}", EXIT_MODEL) from None
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
        raise StartupError(f"cannot read {model_files.xml}: {first_line(exc)}", EXIT_MODEL) from None
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
