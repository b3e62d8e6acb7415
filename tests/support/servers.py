"""Servers on loopback for the tests: main() on a thread (`RunningServer`), a real RerankServer over an engine
stand-in (`FakeServer`), and `python server.py` as a process (`spawn_server`, `spawn_ready_server`, `run_server`).
Each waits for its state (/readyz at 200, main() returned) within a deadline, and fails the test saying what it saw
when that does not come."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from openvino_reranker.config import load_api_key, load_config
from openvino_reranker.cpu import apply_tuning, read_cpu
from openvino_reranker.reranker import Reranker
from openvino_reranker.service import RerankService
from openvino_reranker.startup import bind_server, main

from . import ROOT
from .engines import close_reranker, fake_head
from .http import request
from .models import TinyModel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- in this process


class RunningServer:
    """main() on a thread, on a free loopback port; stopped through its stop Event."""

    def __init__(self, args: list[str], core=None, env: dict | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.stop = threading.Event()
        self.exit_code: int | None = None
        argv = ["--host", "127.0.0.1", "--port", str(self.port), *args]

        def run():
            self.exit_code = main(argv, env or {}, core=core, stop=self.stop)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def wait_ready(self, timeout_s: float = 60.0) -> RunningServer:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError(f"server exited with {self.exit_code}")
            try:
                status, _, _ = request(self.port, "GET", "/readyz")
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.close()
        raise RuntimeError("server did not become ready")

    def wait_exit(self, timeout_s: float = 60.0) -> int | None:
        """main()'s exit code once it returns by itself (a startup that fails); stops it and fails otherwise."""
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            self.close()
            pytest.fail(f"main() did not exit within {timeout_s} s")
        return self.exit_code

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FakeServer:
    """A real RerankServer on a loopback port with a FakeEngine; not started until `start(engine)`."""

    def __init__(self, tiny_model, args=(), env=None):
        config = load_config(["--port", str(free_port()), "--device", "CPU", *args], env or {})
        self.config = apply_tuning(config, read_cpu())[0]  # as main() does
        self.service = RerankService(self.config, load_api_key(self.config))
        self.srv = bind_server(self.service)
        self.port = self.srv.server_address[1]
        self.tokenizer_path = tiny_model.path / "tokenizer.json"
        self.engine = None
        self.thread = threading.Thread(target=self.srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def start(self, engine):
        close_reranker(self.service.reranker)  # started again: the previous one must not keep its threads
        self.engine = engine
        self.service.reranker = Reranker(fake_head(self.tokenizer_path, 64), engine, self.config.batch_size,
                                         pad_multiple=self.config.pad_multiple)
        self.service.readiness.started.set()
        return self

    def close(self):
        release = getattr(self.engine, "release", None)
        if release is not None:
            release()  # a held batch must not keep the batcher's worker past release_model()
        self.srv.shutdown()
        self.srv.server_close()
        self.service.release_model()


# ---------------------------------------------------------------------------------------------- server.py processes


def server_env(extra: dict | None = None) -> dict:
    """This environment without OPENVINO_RERANKER_* variables (a developer's own must not leak into tests)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENVINO_RERANKER_")}
    env.update(extra or {})
    return env


def run_server(args, env_extra=None, timeout=60) -> subprocess.CompletedProcess:
    """`python server.py ARGS` to completion (for startup failures)."""
    return subprocess.run([sys.executable, str(ROOT / "server.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=server_env(env_extra))


def spawn_server(args, env_extra=None, ready_within_s: float = 120) -> tuple[subprocess.Popen, int]:
    """`python server.py --port PORT ARGS` on a free port, once /readyz answers 200 (stdout and stderr are pipes,
    as text); the caller stops it. Fails the test with the server's stderr if it exits or is not ready in time."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "server.py"), "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=server_env(env_extra))
    deadline = time.monotonic() + ready_within_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if request(port, "GET", "/readyz")[0] == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.1)  # after a refused connection and after a 503 alike: no busy loop while it compiles
    proc.kill()
    _, stderr = proc.communicate()
    pytest.fail(f"server.py did not become ready (exit {proc.returncode}): {stderr[-2000:]}")


def spawn_ready_server(model: TinyModel, extra=(), env_extra=None) -> tuple[subprocess.Popen, int]:
    """`python server.py` on the CPU with `model` (no compile cache) on a free port, once /readyz answers 200."""
    return spawn_server(["--device", "CPU", "--model-dir", str(model.path), "--cache-dir", "", *extra], env_extra)
