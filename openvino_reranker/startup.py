"""Startup: config -> bind -> load + compile -> checks -> ready -> serve until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
from collections.abc import Mapping, Sequence

from .batcher import Reranker
from .checks import check_startup
from .config import ENV_PREFIX, Config, is_loopback, load_api_key, load_config
from .encoding import CrossEncoderHead
from .engine import EngineInfo, NpuBusyCounter, open_core, read_model
from .errors import EXIT_CONFIG, EXIT_PORT, StartupError
from .httpserver import RerankServer
from .modeldir import ModelFiles, load_model_files, static_buckets_for
from .parity import ParityCheck, compile_checked
from .service import RerankService
from .systemd import COMPILE_BUDGET_US, sd_notify

log = logging.getLogger("openvino_reranker")


def bind_server(service: RerankService) -> RerankServer:
    """Claim HOST:PORT before anything slow happens; the bind is the check (no race with a probe)."""
    config = service.config
    try:
        infos = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot resolve host {config.host!r}: {exc.strerror}", EXIT_CONFIG) from None
    RerankServer.address_family = infos[0][0]
    server = RerankServer((config.host, config.port), service)
    try:
        server.server_bind()
        server.server_activate()
    except OSError as exc:
        server.server_close()
        raise StartupError(f"cannot bind {config.host}:{config.port}: {exc.strerror or exc}", EXIT_PORT) from None
    return server


def build_reranker(config: Config, counter: NpuBusyCounter | None,
                   core=None) -> tuple[Reranker, ModelFiles, EngineInfo, ParityCheck]:
    """Model files -> tokenizer -> Core (device, cache) -> the IR and its head -> a compile that passed the parity
    guard. Each step raises StartupError with its own exit code."""
    model_files = load_model_files(config.model_dir, config.max_length)
    buckets = static_buckets_for(config, model_files.max_length)
    tokenizer = CrossEncoderHead.load_tokenizer(model_files.tokenizer)
    core = open_core(config.device, config.cache_dir, core)
    model = read_model(core, model_files.xml)
    head = CrossEncoderHead(tokenizer, model_files.max_length, CrossEncoderHead.check_contract(model))
    log.info("compiling %s on %s (%s)", model_files.xml, config.device,
             f"buckets {','.join(map(str, buckets))}" if buckets else "dynamic shapes")

    def before_compile(shape):
        sd_notify(f"EXTEND_TIMEOUT_USEC={COMPILE_BUDGET_US}\nSTATUS=compiling for {config.device}"
                  + (f" shape {shape}" if shape else ""))

    def before_reference():
        sd_notify(f"EXTEND_TIMEOUT_USEC={COMPILE_BUDGET_US}\nSTATUS=checking scores against the f32 CPU reference")

    reranker, engine, parity = compile_checked(core, model, config, head, buckets, counter, before_compile,
                                               before_reference)
    log.info("serving with %s; parity with the f32 reference: max score difference %.3g%s", engine.properties,
             parity.max_abs_diff, " (after falling back)" if parity.fallback else "")
    return reranker, model_files, engine.info(), parity


def drain(server: RerankServer, service: RerankService) -> None:
    """Stop accepting, let in-flight requests finish for up to drain_timeout_s, then return."""
    log.info("stopping: no new connections; draining for up to %ss", service.config.drain_timeout_s)
    sd_notify("STOPPING=1")
    service.start_draining()
    server.shutdown()
    server.server_close()
    if not service.in_flight.wait_idle(service.config.drain_timeout_s):
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
        counter = NpuBusyCounter(config.npu_busy_path) if config.may_use_npu else None
        service = RerankService(config, api_key, counter)
        server = bind_server(service)
        host, port = server.server_address[:2]
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True,
                         name="http").start()
        log.info("listening on http://%s:%d (not ready until the model is compiled)", host, port)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
        service.readiness.reason = "loading and compiling the model"
        reranker, model_files, engine_info, parity = build_reranker(config, counter, core)
        service.readiness.reason = "running the startup check"
        try:
            check = check_startup(reranker, engine_info, config, counter)
        except BaseException:
            reranker.close()
            raise
        service.mark_ready(reranker, model_files, engine_info, check, parity)
        log.info("ready: model %s on %s (execution devices %s, compile %.0f ms, from cache %s); %s",
                 model_files.name, config.device, ",".join(engine_info.execution_devices), engine_info.compile_ms,
                 engine_info.loaded_from_cache, check.npu_note)
        sd_notify(f"READY=1\nSTATUS=serving on {host}:{port}, device {config.device} "
                  f"({','.join(engine_info.execution_devices)})")
        del reranker
        stop.wait()
        drain(server, service)
        service.release_model()
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
