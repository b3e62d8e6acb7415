"""Several instances behind a real HAProxy, started with the shipped deploy/haproxy.cfg (only its ports and the
stats socket's path changed): an instance stopped with SIGTERM in the middle of a steady stream of requests loses
none of them, and an instance whose /readyz is 503 gets no scoring traffic (SPEC.md, "Behind a load balancer")."""

from __future__ import annotations

import http.client
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from support import ROOT
from support.http import request
from support.servers import free_port, spawn_ready_server
from support.waiting import wait_until

HAPROXY = shutil.which("haproxy")
SHIPPED_CONFIG = ROOT / "deploy" / "haproxy.cfg"
GRACE_S = "3"  # what deploy/haproxy.cfg tells every instance to use


def skip_reason() -> str | None:
    if HAPROXY is None:
        return "haproxy is not installed (CI installs Debian's package: see .ci/run)"
    if os.geteuid() != 0:
        return "deploy/haproxy.cfg has HAProxy drop to user haproxy, which only root can do (CI runs as root)"
    try:
        pwd.getpwnam("haproxy")
    except KeyError:
        return "there is no user haproxy (Debian's haproxy package creates it)"
    return None


pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

BODY = json.dumps({"query": "solar power", "documents": ["panels on a roof", "a cat asleep", "the sun"]})


# ---------------------------------------------------------------------------------------------- HAProxy


class Balancer:
    """HAProxy in the foreground with the shipped config, its frontend and servers on the given ports."""

    def __init__(self, tmp_path: Path, instance_ports: tuple[int, int]):
        self.port = free_port()
        self.stats_socket = tmp_path / "haproxy.sock"
        text = SHIPPED_CONFIG.read_text()
        for directive, rendered in (
                ("bind 127.0.0.1:18800", f"bind 127.0.0.1:{self.port}"),
                ("server r1 127.0.0.1:18818", f"server r1 127.0.0.1:{instance_ports[0]}"),
                ("server r2 127.0.0.1:18819", f"server r2 127.0.0.1:{instance_ports[1]}"),
                ("stats socket /run/haproxy/admin.sock", f"stats socket {self.stats_socket}")):
            lines = [line for line in text.splitlines() if line.strip().startswith(directive)]
            assert len(lines) == 1, f"deploy/haproxy.cfg: expected one line starting with {directive!r}"
            text = text.replace(directive, rendered)
        config = tmp_path / "haproxy.cfg"
        config.write_text(text)
        self.log = tmp_path / "haproxy.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self.stats_socket.exists() or self.proc.poll() is not None, 10, "HAProxy's stats socket")
        if self.proc.poll() is not None:
            pytest.fail(f"haproxy exited with {self.proc.returncode}: {self.log.read_text()}")

    def stats(self) -> dict[str, dict[str, str]]:
        """`show stat` of the backend: server name -> its CSV fields (status, retries, redispatches, ...)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.stats_socket))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:] if line]
        return {row["svname"]: row for row in rows if row["pxname"] == "rerankers"}

    def wait_status(self, wanted: dict[str, str]) -> None:
        wait_until(lambda: all(self.stats()[name]["status"] == status for name, status in wanted.items()), 15,
                   f"HAProxy seeing {wanted}")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def balancer(tmp_path):
    made = []

    def start(instance_ports):
        made.append(Balancer(tmp_path, instance_ports))
        return made[-1]

    yield start
    for b in made:
        b.close()


@pytest.fixture
def instances(tiny_model):
    """Start `count` instances with the documented drain grace at once (their compiles overlap)."""
    started = []

    def start(count):
        with ThreadPoolExecutor(count) as pool:
            futures = [pool.submit(spawn_ready_server, tiny_model, ("--drain-grace-s", GRACE_S, "--log-level",
                                                                    "WARNING")) for _ in range(count)]
            started.extend(f.result() for f in futures)
        return started[-count:]

    yield start
    for proc, _ in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def scored_requests(port: int) -> int:
    """requests_total for /rerank with status 200, from the instance's /metrics."""
    status, text, _ = request(port, "GET", "/metrics")
    assert status == 200
    m = re.search(r'^openvino_reranker_requests_total\{route="/rerank",status="200"\} (\d+)', text, re.M)
    return int(m.group(1)) if m else 0


class Clients:
    """Keep-alive clients posting to the balancer until stopped; a request that fails is counted, never
    retried (the balancer must not lose any)."""

    def __init__(self, port: int, count: int, requests_each: int | None = None):
        self.port = port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(requests_each,), daemon=True)
                        for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def _run(self, requests_each: int | None) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        sent = 0
        while not self.stop.is_set() and (requests_each is None or sent < requests_each):
            sent += 1
            try:
                conn.request("POST", "/rerank", BODY, {"Content-Type": "application/json"})
                response = conn.getresponse()
                payload = response.read()
                outcome = None
                if response.status != 200:
                    outcome = f"HTTP {response.status}: {payload[:200]!r}"
                elif len(json.loads(payload)["results"]) != 3:
                    outcome = f"wrong answer: {payload[:200]!r}"
            except (OSError, http.client.HTTPException) as exc:
                outcome = f"{type(exc).__name__}: {exc}"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            with self.lock:
                if outcome is None:
                    self.ok += 1
                else:
                    self.failures.append(outcome)
        conn.close()

    def join(self, stop: bool = False) -> None:
        """Wait for the clients to end; with `stop`, tell them to end after the request each is sending."""
        if stop:
            self.stop.set()
        for thread in self.threads:
            thread.join(60)
            assert not thread.is_alive(), "a client is stuck"


# ---------------------------------------------------------------------------------------------- the tests


def test_sigterm_to_one_instance_mid_stream_loses_no_request(instances, balancer):
    (stopped, stopped_port), (kept, kept_port) = instances(2)
    haproxy = balancer((stopped_port, kept_port))
    haproxy.wait_status({"r1": "UP", "r2": "UP"})
    clients = Clients(haproxy.port, 3)
    try:
        wait_until(lambda: scored_requests(stopped_port) > 0 and scored_requests(kept_port) > 0, 20,
                   "both instances serving requests from the balancer")
        before_kill = {"stopped": scored_requests(stopped_port), "kept": scored_requests(kept_port)}
        stopped.send_signal(signal.SIGTERM)
        exit_code = stopped.wait(30)  # the grace (3 s) and the drain; the clients keep sending all along
        status_at_exit = haproxy.stats()["r1"]["status"]  # HAProxy took it out during the grace
        with clients.lock:
            ok_at_exit = clients.ok
        wait_until(lambda: clients.ok >= ok_at_exit + 100, 20, "100 more requests after the instance exited")
    finally:
        clients.join(stop=True)
    backend = haproxy.stats()["BACKEND"]
    print(f"\nrequests: {clients.ok} ok, {len(clients.failures)} failed; before the SIGTERM the stopped instance "
          f"had scored {before_kill['stopped']} and the other {before_kill['kept']}; HAProxy retries "
          f"{backend['wretr']}, redispatches {backend['wredis']}")
    assert exit_code == 0, stopped.communicate()[1]
    assert before_kill["stopped"] > 0 and before_kill["kept"] > 0
    assert clients.failures == []
    assert clients.ok > ok_at_exit > sum(before_kill.values())
    # the grace did it, not HAProxy's retries (which can hide a lost request only when it held the request whole)
    assert status_at_exit == "DOWN"
    assert (backend["wretr"], backend["wredis"]) == ("0", "0")
    assert kept.poll() is None


class StubInstance(BaseHTTPRequestHandler):
    """An instance that is not ready: /readyz answers `server.readyz_status`; a scoring request is counted and
    answered 503 not_ready with Retry-After, as a real instance that is still compiling answers it."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self._answer(self.server.readyz_status, {"ready": self.server.readyz_status == 200})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.server.lock:
            self.server.scoring_requests += 1
        self._answer(503, {"ok": False, "error": {"type": "not_ready", "message": "not ready: compiling"}})

    def _answer(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == 503:
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


class StubServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # HAProxy resets its health-check connections once it has the status line


@pytest.fixture
def stub_instance():
    server = StubServer(("127.0.0.1", 0), StubInstance)
    server.readyz_status = 503
    server.scoring_requests = 0
    server.lock = threading.Lock()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_an_instance_that_is_not_ready_gets_no_scoring_traffic(instances, balancer, stub_instance):
    [(_, ready_port)] = instances(1)
    haproxy = balancer((ready_port, stub_instance.server_address[1]))
    haproxy.wait_status({"r1": "UP", "r2": "DOWN"})  # HAProxy 2.6 counts a server up until its checks fail
    clients = Clients(haproxy.port, 4, requests_each=20)
    clients.join()
    assert clients.failures == [] and clients.ok == 80
    assert stub_instance.scoring_requests == 0
    # an instance counts a request once it has sent the answer
    wait_until(lambda: scored_requests(ready_port) >= 80, 10, "the ready instance counting 80 requests")
    assert scored_requests(ready_port) == 80

    # the same stub once its /readyz is 200: it is sent requests, and its 503s are retried on the ready instance
    stub_instance.readyz_status = 200
    haproxy.wait_status({"r1": "UP", "r2": "UP"})
    clients = Clients(haproxy.port, 4, requests_each=20)
    clients.join()
    assert clients.failures == [] and clients.ok == 80
    assert stub_instance.scoring_requests > 0
    wait_until(lambda: scored_requests(ready_port) >= 160, 10, "the ready instance counting 160 requests")
    assert scored_requests(ready_port) == 160
    assert int(haproxy.stats()["BACKEND"]["wretr"]) + int(haproxy.stats()["BACKEND"]["wredis"]) > 0
