"""Startup: config -> bind -> load + compile -> checks -> ready -> serve until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import sys
import threading
from collections.abc import Callable, Mapping, Sequence

from .cache import ScoreCache
from .checks import check_startup
from .compilecache import open_compile_cache
from .config import (
    DEMO_MODEL_COMMAND,
    ENV_PREFIX,
    EVAL_COMMAND,
    QUANTIZE_COMMAND,
    Config,
    describe_unknown_variable,
    invoked_as,
    is_loopback,
    load_api_key,
    load_config,
    parse_demo_model_args,
    unknown_variables,
)
from .cpu import apply_tuning, read_cpu
from .demomodel import DEMO_MODEL_NAME, DEMO_NOTE, write_demo_model
from .encoding import load_tokenizer
from .engine import EngineInfo, NpuBusyCounter, VisionIR, open_core, read_model
from .errors import EXIT_CONFIG, EXIT_PORT, EXIT_SCORING_STOPPED, StartupCancelled, StartupError
from .evaluate import main as evaluate_main
from .httpserver import RerankServer
from .hub import interrupt_download
from .modeldir import ModelFiles, load_model_files, locate_model, make_head, static_buckets_for
from .parity import ParityCheck, compile_checked
from .quantize import main as quantize_main
from .reranker import Reranker
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


def build_reranker(config: Config, counter: NpuBusyCounter | None, core=None, stop: threading.Event | None = None,
                   environ: Mapping[str, str] | None = None, on_status: Callable[[str], None] | None = None,
                   replicas_auto: bool | None = None) -> tuple[Reranker, ModelFiles, EngineInfo, ParityCheck]:
    """Model (fetched from the Hub when it is a Hub id) -> its files -> tokenizer -> Core (device) -> the IR, its
    head and the compile cache keyed to its bytes -> a compile that passed the parity guard. Each step raises
    StartupError with its own exit code; a set `stop` cancels the download or before the next compile. `on_status`
    hears what it is doing (/readyz). `replicas_auto`: whether the CPU's row chose `config.replicas`
    (`parity.compile_checked`)."""

    def on_progress(line: str) -> None:
        if stop is not None and stop.is_set():
            raise StartupCancelled("fetching the model")
        log.info("%s", line)
        if on_status is not None:
            on_status(f"fetching the model: {line}")
        sd_notify(f"EXTEND_TIMEOUT_USEC={COMPILE_BUDGET_US}\nSTATUS={line}")

    model_dir, model_file, source = locate_model(config, os.environ if environ is None else environ, on_progress)
    if on_status is not None:
        on_status("loading and compiling the model")
    model_files = load_model_files(model_dir, config.max_length, model_file, config.prompt_template, source)
    if source:
        log.info("model %s@%s, commit %s, from %s", source["repo"], source["revision"], source["commit"], model_dir)
    if model_files.name == DEMO_MODEL_NAME:
        log.warning("serving the demo model from %s: its weights are random, so its scores are meaningless",
                    model_dir)
    tokenizer = load_tokenizer(model_files.tokenizer)
    core = open_core(config.device, core)
    model = read_model(core, model_files.xml)
    compile_cache = open_compile_cache(config.cache_dir, model_files.xml)
    head = make_head(model_files, tokenizer, model, config.instruction, config.max_image_pixels)
    vision = None
    if model_files.vision is not None:  # its own IR, compiled beside the language model's, keyed to its own bytes
        vision = VisionIR(read_model(core, model_files.vision.xml),
                          open_compile_cache(config.cache_dir, model_files.vision.xml),
                          model_files.vision.tiling.max_tiles)
    buckets = static_buckets_for(config, model_files.max_length, head.min_pair_tokens, log.warning)
    log.info("compiling %s on %s (%s)", model_files.xml, config.device,
             f"buckets {','.join(map(str, buckets))}" if buckets else "dynamic shapes")

    def before_compile(shape):
        if stop is not None and stop.is_set():
            raise StartupCancelled("compiling" + (f" shape {shape}" if shape else ""))
        sd_notify(f"EXTEND_TIMEOUT_USEC={COMPILE_BUDGET_US}\nSTATUS=compiling for {config.device}"
                  + (f" shape {shape}" if shape else ""))

    def before_reference():
        if stop is not None and stop.is_set():
            raise StartupCancelled("the parity check")
        sd_notify(f"EXTEND_TIMEOUT_USEC={COMPILE_BUDGET_US}\nSTATUS=checking scores against the f32 CPU reference")

    reranker, engine, parity = compile_checked(core, model, config, head, buckets, counter, before_compile,
                                               before_reference, compile_cache, model_files.reference_scores, vision,
                                               replicas_auto)
    if parity.graph is not None:
        log.info("%s", parity.graph.log_line())
    reranker.cache = ScoreCache(config.score_cache_size) if config.score_cache_size else None
    log.info("serving with %s (compile cache %s); parity with the f32 reference: max score difference %.3g%s",
             engine.properties, engine.cache_dir or "off", parity.max_abs_diff,
             f" (after falling back to the ladder's {parity.step} step)" if parity.fallback else "")
    checked = parity.reference_scores
    if checked is not None and checked.passed:
        log.info("the model's reference scores %s: %d of %d pairs compared, max difference %.3g exact (f32) and "
                 "%.3g served", checked.source, checked.compared, checked.pairs, checked.exact_max_abs_diff,
                 checked.max_abs_diff)
    return reranker, model_files, engine.info(), parity


def drain(server: RerankServer, service: RerankService, end_grace: threading.Event | None = None) -> None:
    """/readyz turns 503 and every answer says Connection: close; after drain_grace_s of serving so (or once
    `end_grace` is set), stop accepting, let in-flight requests finish for up to drain_timeout_s, then return.

    The grace is for a load balancer: closing the listening socket resets the connections still waiting in its
    accept backlog, whose requests were already sent, and HAProxy can retry such a request only if it held it
    whole. Once its health checks have seen /readyz at 503 it opens no more connections here."""
    config = service.config
    sd_notify("STOPPING=1")
    service.start_draining()
    if config.drain_grace_s:
        log.info("stopping: /readyz answers 503; still serving for %ss so that load balancers stop sending "
                 "requests here", config.drain_grace_s)
        (end_grace or threading.Event()).wait(config.drain_grace_s)
    log.info("stopping: no new connections; draining for up to %ss", config.drain_timeout_s)
    server.shutdown()
    server.server_close()
    if not service.in_flight.wait_idle(config.drain_timeout_s):
        log.warning("drain time over with requests still in flight; exiting anyway")


def describe_cache_use(loaded_from_cache: Sequence[bool]) -> str:
    """How the compiled models came to be, for the ready line: one per compile (one, or one per static bucket)."""
    hits = sum(bool(x) for x in loaded_from_cache)
    if len(loaded_from_cache) <= 1:
        return "loaded from the compile cache" if hits else "compiled anew"
    if hits in (0, len(loaded_from_cache)):
        return f"all {len(loaded_from_cache)} {'loaded from the compile cache' if hits else 'compiled anew'}"
    return f"{hits} of {len(loaded_from_cache)} loaded from the compile cache"


WATCH_INTERVAL_S = 0.5  # how often the main thread looks for a scoring thread that ended


def install_signal_handlers(stop: threading.Event, end_grace: threading.Event) -> None:
    """SIGTERM and SIGINT drain and exit 0 (also during startup, before READY=1, when they stop a model download at
    once); a second one ends the drain's grace period at once. SIGHUP is ignored with a log line: the configuration
    is read only at startup, and exiting on a hangup would stop a service that systemd does not restart after a
    clean exit."""

    def on_stop(signum, frame):
        if stop.is_set():
            end_grace.set()
        stop.set()
        interrupt_download()  # raises into a Hub download this (the main) thread is waiting on

    def on_hangup(signum, frame):
        log.warning("SIGHUP ignored: the configuration is read only at startup; restart the service to change it")

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hangup)


def demo_model_main(argv: Sequence[str]) -> int:
    """`openvino-reranker demo-model DIR`: build the demo model into DIR and say how to serve it."""
    try:
        out_dir = parse_demo_model_args(argv)
        path = write_demo_model(out_dir)
    except StartupError as exc:
        print(f"openvino-reranker: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    print(f"wrote the demo model to {path}. {DEMO_NOTE}")
    print(f"serve it (no network needed): {invoked_as(sys.argv[0])} --device CPU --model {shlex.quote(out_dir)}")
    return 0


# the commands besides serving: `openvino-reranker NAME ARGS...` runs one and returns its exit code
SUBCOMMANDS: dict[str, Callable[[list[str], Mapping[str, str] | None], int]] = {
    DEMO_MODEL_COMMAND: lambda args, environ: demo_model_main(args),
    EVAL_COMMAND: lambda args, environ: evaluate_main(args, environ),
    QUANTIZE_COMMAND: lambda args, environ: quantize_main(args, environ),
}


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None, core=None,
         stop: threading.Event | None = None) -> int:
    """config -> bind -> load + compile -> startup check (fail closed) -> ready -> serve until SIGTERM/SIGINT;
    `demo-model DIR` writes the demo model instead.

    `core` and `stop` let tests inject an OpenVINO Core stand-in and stop the server without a signal. With `eval`
    first it runs `openvino-reranker eval` instead (evaluate.py), with `quantize` `openvino-reranker quantize`
    (quantize.py, which imports NNCF only then), and returns its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:], environ)
    stop = stop or threading.Event()
    end_grace = threading.Event()  # a second SIGTERM/SIGINT
    server = None
    try:
        config = load_config(argv, environ)
        logging.basicConfig(level=config.log_level, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        log.setLevel(config.log_level)
        config, tuned = apply_tuning(config, read_cpu() if config.device == "CPU" else None)
        log.info("micro-batches of %d padded to a multiple of %d, PERFORMANCE_HINT %s, %d replicas (%s)",
                 config.batch_size, config.pad_multiple, config.performance_hint, config.replicas,
                 f"{tuned.isa} row of cpu.py's TUNED for {tuned.cpu}" if tuned.row != "untuned"
                 else "the untuned defaults" + (f"; no row for {tuned.isa} CPUs" if tuned.isa else ""))
        for name in unknown_variables(os.environ if environ is None else environ):
            log.warning("%s; ignored", describe_unknown_variable(name))
        api_key = load_api_key(config)
        if not api_key and not config.allow_remote_without_key and not is_loopback(config.host):
            raise StartupError(f"refusing to serve on {config.host}, which is not a loopback address, without an API "
                               f"key: set {ENV_PREFIX}API_KEY or {ENV_PREFIX}API_KEY_FILE, or pass "
                               f"--allow-remote-without-key", EXIT_CONFIG)
        counter = NpuBusyCounter(config.npu_busy_path) if config.may_use_npu else None
        service = RerankService(config, api_key, counter)
        service.tuning = tuned.describe()
        server = bind_server(service)
        host, port = server.server_address[:2]
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True,
                         name="http").start()
        log.info("port claimed: http://%s:%d; loading the model (/readyz answers 503 until it is compiled and checked)",
                 host, port)
        if threading.current_thread() is threading.main_thread():
            install_signal_handlers(stop, end_grace)
        service.readiness.reason = "loading the model"

        def on_status(reason: str) -> None:
            service.readiness.reason = reason

        reranker, model_files, engine_info, parity = build_reranker(config, counter, core, stop, environ, on_status,
                                                                    replicas_auto="replicas" not in tuned.given)
        service.readiness.reason = "running the startup check"
        try:
            if stop.is_set():
                raise StartupCancelled("the startup check")
            check = check_startup(reranker, engine_info, config, counter)
            if stop.is_set():
                raise StartupCancelled("becoming ready")
        except BaseException:
            reranker.close()
            raise
        service.mark_ready(reranker, model_files, engine_info, check, parity)
        log.info("ready: model %s on %s (execution devices %s, compile %.0f ms, %s); %s",
                 model_files.name, config.device, ",".join(engine_info.execution_devices), engine_info.compile_ms,
                 describe_cache_use(engine_info.loaded_from_cache), check.npu_note)
        sd_notify(f"READY=1\nSTATUS=serving on {host}:{port}, device {config.device} "
                  f"({','.join(engine_info.execution_devices)})")
        del reranker
        exit_code = 0
        while not stop.wait(WATCH_INTERVAL_S):
            if service.scoring_stopped():
                log.critical("exiting with status %d so that the service is restarted: %s", EXIT_SCORING_STOPPED,
                             service.scoring_stopped())
                exit_code = EXIT_SCORING_STOPPED
                break
        drain(server, service, end_grace)
        service.release_model()
        log.info("stopped; exit status %d", exit_code)
        return exit_code
    except StartupCancelled as exc:
        log.info("%s; exiting; exit status 0", exc)
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
