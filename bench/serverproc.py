"""server.py as a child process, for the bench/ scripts: the one way they start and stop it.

    from serverproc import ServerError, start_server      # bench/ is on sys.path when a bench script runs

    with start_server(["--device", "CPU", "--model-dir", DIR, "--log-level", "WARNING"]) as server:
        ... server.url, server.port, server.pid, server.ready_s ...

`start_server` runs `python server.py --host 127.0.0.1 --port PORT ARGS` on a free loopback port and returns once
/readyz answers 200. If the server exits first, or is not ready within `ready_within_s`, it is stopped and
`ServerError` is raised with the tail of what it printed. `stop()` (also on leaving the `with`) sends SIGTERM, the
service's drain, and waits; a server that does not exit in time is killed.

The server's stdout and stderr go to a log file, not to a pipe: a pipe nobody reads fills up (a soak's warnings,
a long run's log lines) and then the server blocks on its next log line. The file is a temporary one, removed on
stop, unless `log_path` names one to keep. Standard library only.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POLL_S = 0.05  # how often readiness is polled (bench.py reports the time to ready, so not much coarser)


class ServerError(RuntimeError):
    """server.py exited before it was ready or was not ready in time; the message ends with its log's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_ready(port: int, timeout_s: float = 5.0) -> bool:
    """GET /readyz answers 200 (False while the port is closed, or on a 503 while the model compiles)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", "/readyz")
        response = conn.getresponse()
        response.read()
        return response.status == 200
    except OSError:
        return False
    finally:
        conn.close()


class ServerProcess:
    """A started server.py: `port`, `url`, `pid`, `ready_s` (seconds from the start to /readyz at 200)."""

    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path, keep_log: bool):
        self.proc, self.port, self.log_path, self.keep_log = proc, port, log_path, keep_log
        self.url = f"http://127.0.0.1:{port}"
        self.ready_s = float("nan")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 3000) -> str:
        """The end of what the server printed so far."""
        try:
            return self.log_path.read_bytes()[-chars:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, then wait up to `timeout_s` for the drain; kill it if it has not exited by then. Returns its exit
        status after SIGTERM (0 is a clean drain), or None when it had to be killed. Safe to call twice."""
        status: int | None = self.proc.poll()
        if status is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                status = self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                status = None
        if not self.keep_log:
            self.log_path.unlink(missing_ok=True)
        return status

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(args: list[str], *, python: str = sys.executable, ready_within_s: float = 300.0,
                 log_path: Path | None = None) -> ServerProcess:
    """server.py ARGS on a free loopback port, returned once /readyz is 200; raises ServerError otherwise."""
    port = free_port()
    keep_log = log_path is not None
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="openvino-reranker-bench-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    command = [python, str(ROOT / "server.py"), "--host", "127.0.0.1", "--port", str(port), *args]
    started = time.monotonic()
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=str(ROOT))
    server = ServerProcess(proc, port, log_path, keep_log)
    deadline = started + ready_within_s
    while True:
        if proc.poll() is not None:
            tail = server.log_tail()
            server.stop()
            raise ServerError(f"server.py exited with {proc.returncode} before it was ready:\n{tail}")
        if is_ready(port):
            server.ready_s = time.monotonic() - started
            return server
        if time.monotonic() >= deadline:
            tail = server.log_tail()
            server.stop()
            raise ServerError(f"server.py was not ready within {ready_within_s:g} s:\n{tail}")
        time.sleep(POLL_S)
