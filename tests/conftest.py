"""Shared fixtures: the tiny INT8 model, an independent reference scorer, real servers on loopback, the stand-ins
for the engine and for OpenVINO's Core, HTTP helpers, and a check that every test closes the Reranker it starts."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import openvino as ov
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import tinymodel  # noqa: E402

from openvino_reranker.config import load_api_key, load_config
from openvino_reranker.encoding import CrossEncoderHead, ModelContract
from openvino_reranker.errors import InferenceError
from openvino_reranker.parity import REFERENCE_PROPERTIES
from openvino_reranker.reranker import Reranker
from openvino_reranker.service import RerankService
from openvino_reranker.startup import bind_server, main

SCORE_TOLERANCE = 1e-4  # served score vs the float64 numpy reference (SPEC.md, "Scores")
# Comparisons with the numpy reference run at f32 (`--inference-precision f32`): where the CPU has AVX-512 or AMX,
# OpenVINO's defaults (bf16, and int8 activations for INT8-weight MatMuls) move scores by up to about 2e-2, which is
# OpenVINO's choice, not this service's error (SPEC.md, "Scores").
F32 = ["--inference-precision", "f32"]
F32_LATENCY = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
F32_EXACT = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}


@dataclass
class TinyModel:
    path: Path
    weights: dict
    shape: tinymodel.BertShape
    with_token_types: bool

    def reference_scores(self, query: str, texts: list[str], max_length: int | None = None) -> np.ndarray:
        """Independent of server.py: each pair alone, unpadded, through the numpy forward pass."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        tok.enable_truncation(max_length or self.shape.max_positions, strategy="longest_first")
        scores = []
        for text in texts:
            enc = tok.encode(query, text)
            ids = np.array([enc.ids])
            types = np.array([enc.type_ids]) if self.with_token_types else None
            logits = tinymodel.numpy_forward(self.weights, self.shape, ids, np.ones_like(ids), types)[0]
            z = logits[0] if len(logits) == 1 else logits[1] - logits[0]
            scores.append(1.0 / (1.0 + np.exp(-z)))
        return np.array(scores)


def _make(tmp_path_factory, name, **kwargs) -> TinyModel:
    path, weights, shape, _ = tinymodel.make_tiny_model(tmp_path_factory.mktemp(name), **kwargs)
    return TinyModel(path, weights, shape, kwargs.get("with_token_types", True))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> TinyModel:
    return _make(tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def tiny_model_2labels(tmp_path_factory) -> TinyModel:
    return _make(tmp_path_factory, "tiny2", num_labels=2, seed=1)


@pytest.fixture(scope="session")
def tiny_model_no_types(tmp_path_factory) -> TinyModel:
    return _make(tmp_path_factory, "tiny_nt", with_token_types=False, seed=2)


# ---------------------------------------------------------------------------------------------- closing what starts

THREAD_JOIN_S = 5.0  # how long a started-and-closed Batcher's threads get to end before they count as leaked


def batcher_threads() -> set[threading.Thread]:
    """The live threads of every Batcher: its owner ("batcher") and its workers ("infer-<n>")."""
    return {t for t in threading.enumerate() if t.name == "batcher" or t.name.startswith("infer-")}


def assert_batcher_threads_stopped(before: set[threading.Thread], what: str, timeout_s: float = THREAD_JOIN_S):
    """Fail unless every Batcher thread started since `before` was taken has ended (each is joined first, within
    one shared `timeout_s`, since close() joins them and may still be at it)."""
    started = batcher_threads() - before
    deadline = time.monotonic() + timeout_s
    for thread in started:
        thread.join(max(0.0, deadline - time.monotonic()))
    alive = sorted(t.name for t in started if t.is_alive())
    if alive:
        pytest.fail(f"{what} left {len(alive)} Batcher thread(s) running ({', '.join(alive)}): close every Reranker "
                    f"it starts (reranker.close(), FakeServer.close(), RunningServer.close())", pytrace=False)


@pytest.fixture(autouse=True)
def batcher_threads_are_closed():
    """After each test: no "batcher" or "infer-<n>" thread that the test started may still run. Threads alive
    before it (a module-scoped server's) are not its business; those fixtures check their own on teardown."""
    before = batcher_threads()
    yield
    assert_batcher_threads_stopped(before, "this test")


def wait_until(condition, timeout_s: float = 10.0, what: str = "the condition") -> None:
    """Poll `condition()` until it is true; fail the test if it is not within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            pytest.fail(f"{what} did not happen within {timeout_s} s")
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------- HTTP helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, body=None, headers: dict | None = None, conn=None):
    """One HTTP request; returns (status, parsed JSON body or None, headers)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        hdrs = dict(headers or {})
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
        is_json = (resp.getheader("Content-Type") or "").startswith("application/json")
        payload = (json.loads(raw) if is_json else raw.decode()) if raw else None
        return resp.status, payload, resp
    finally:
        if own:
            conn.close()


class RawResponse(NamedTuple):
    """One response as it came off the socket: status, headers (names lower-cased), the body's raw bytes."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body) if self.body else None

    def text(self) -> str:
        return self.body.decode()


def http_bytes(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    """A request as raw bytes: HTTP/1.1, a Host header, Content-Length when there is a body, then `headers`."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def send_raw(port: int, data: bytes, timeout_s: float = 30.0, method: str = "GET") -> RawResponse:
    """Send `data` as is on a new connection and read one response (`method`: the one sent, for HEAD's sake)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(data)
        resp = http.client.HTTPResponse(s, method=method)
        resp.begin()
        body = resp.read()
        return RawResponse(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)


# ---------------------------------------------------------------------------------------------- real servers


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


@pytest.fixture(scope="module")
def cpu_server(tiny_model, tmp_path_factory):
    before = batcher_threads()
    srv = RunningServer(["--device", "CPU", *F32, "--model-dir", str(tiny_model.path),
                         "--cache-dir", str(tmp_path_factory.mktemp("cache"))]).wait_ready()
    yield srv
    srv.close()
    assert_batcher_threads_stopped(before, "the cpu_server fixture")


# ---------------------------------------------------------------------------------------------- engine stand-ins


FAKE_CONTRACT = ModelContract(("input_ids", "attention_mask", "token_type_ids"), num_labels=1)
GATE_TIMEOUT_S = 30.0  # a gated inference that nobody opens fails instead of holding its worker for ever


def fake_head(tokenizer_path, max_length: int) -> CrossEncoderHead:
    """The cross-encoder head on a real tokenizer, for an engine stand-in that takes all three inputs."""
    return CrossEncoderHead.from_file(tokenizer_path, max_length, FAKE_CONTRACT)


class FakeEngine:
    """Same interface as Engine, with behaviour chosen by the test: "ok" (logit = number of tokens / 10),
    "nan", "fails" (InferenceError), "bug" (ZeroDivisionError), "slow" (sleeps `delay_s` per batch), "gated" ("ok"
    behind a gate of its own), or a list of those consumed one per batch.

    With a `gate` (or mode "gated") every inference, once begun, waits until the gate is open (`release()`), so a
    test can hold a batch "on the device" for exactly as long as it needs. `entered` is released once per inference
    that begins: `wait_entered()` returns when one really is on the device. `num_requests` sets how many batches the
    Batcher runs at once (one worker each)."""

    buckets = None
    num_requests = 1

    def __init__(self, mode="ok", delay_s=0.0, gate: threading.Event | None = None, num_requests: int | None = None):
        self.mode, self.delay_s = mode, delay_s
        self.gate = gate if gate is not None or mode != "gated" else threading.Event()
        if num_requests is not None:
            self.num_requests = num_requests
        self.calls = 0
        self.lock = threading.Lock()
        self.entered = threading.Semaphore(0)

    def wait_entered(self, count: int = 1, timeout_s: float = 10.0) -> None:
        """Return once `count` more inferences have begun; fail the test if they do not within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        for n in range(count):
            if not self.entered.acquire(timeout=max(0.0, deadline - time.monotonic())):
                pytest.fail(f"only {n} of {count} inferences began within {timeout_s} s")

    def release(self) -> None:
        """Open the gate: held and later inferences go on."""
        if self.gate is not None:
            self.gate.set()

    def infer(self, feed, shape, deadline=None):
        with self.lock:
            self.calls += 1
            mode = self.mode.pop(0) if isinstance(self.mode, list) and self.mode else self.mode
        mode = "ok" if isinstance(mode, list) else mode
        self.entered.release()
        if self.gate is not None and not self.gate.wait(GATE_TIMEOUT_S):
            raise InferenceError(f"the test did not open the fake engine's gate within {GATE_TIMEOUT_S} s")
        rows = feed["input_ids"].shape[0]
        if mode == "slow":
            time.sleep(self.delay_s)
        if mode == "nan":
            return np.full((rows, 1), np.nan, np.float32)
        if mode == "fails":
            raise InferenceError("inference failed: device lost")
        if mode == "bug":
            raise ZeroDivisionError("a bug")
        return feed["attention_mask"].sum(axis=1, keepdims=True).astype(np.float32) / 10


def close_reranker(reranker: Reranker | None) -> None:
    """Open a fake engine's gate (so no worker stays held) and close the reranker, which joins its threads. Once it
    returns, every batch the Batcher had queued has run or been dropped."""
    if reranker is None:
        return
    release = getattr(reranker.engine, "release", None)
    if release is not None:
        release()
    reranker.close()


def real_reranker(model: TinyModel, buckets=None, max_length: int = 0, batch_size: int = 2, core=None,
                  infer_requests: int = 0, properties=F32_LATENCY, cache=None) -> Reranker:
    """The real scoring path on the CPU: model files, head, a compiled engine (through the compile cache `cache`, a
    compilecache.CompileCache, when given); the caller closes it."""
    from openvino_reranker.engine import Engine
    from openvino_reranker.modeldir import load_model_files

    files = load_model_files(str(model.path), max_length)
    core = core or ov.Core()
    ir = core.read_model(str(files.xml))
    head = CrossEncoderHead.from_file(files.tokenizer, files.max_length, CrossEncoderHead.check_contract(ir))
    engine = Engine(core, ir, "CPU", buckets, properties, head.contract, infer_requests=infer_requests, cache=cache)
    return Reranker(head, engine, batch_size)


class FakeServer:
    """A real RerankServer on a loopback port with a FakeEngine; not started until `start(engine)`."""

    def __init__(self, tiny_model, args=(), env=None):
        self.config = load_config(["--port", str(free_port()), "--device", "CPU", *args], env or {})
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
        self.service.reranker = Reranker(fake_head(self.tokenizer_path, 64), engine, self.config.batch_size)
        self.service.readiness.started.set()
        return self

    def close(self):
        release = getattr(self.engine, "release", None)
        if release is not None:
            release()  # a held batch must not keep the batcher's worker past release_model()
        self.srv.shutdown()
        self.srv.server_close()
        self.service.release_model()


@pytest.fixture
def fake_server(tiny_model):
    made = []

    def make(*args, env=None):
        made.append(FakeServer(tiny_model, args, env))
        return made[-1]

    yield make
    for s in made:
        s.close()


# ---------------------------------------------------------------------------------------------- a Core stand-in


class InferenceCrash(BaseException):
    pass


class FakeCore:
    """A real `ov.Core()` that can pretend, for startup tests:

    - `claim`: devices it says it has besides the real ones (e.g. ("NPU",)). A model compiled for one of them is
      compiled on the CPU (every input must have a static shape, or the compile fails), reports
      `execution_devices` as EXECUTION_DEVICES, and, when `bump`, adds 250 to the fake sysfs busy counter file
      `counter` on every inference, as the ivpu driver does on a real NPU.
    - `corrupt`: "multi" - models compiled with several streams or the THROUGHPUT hint return logits * 40 + 7 (the
      shape of the bug seen on AMX CPUs), so the fallback ladder's one-stream step is right; "not_f32" - those and
      every compile whose INFERENCE_PRECISION_HINT is not f32, so that only its f32 step is right; "always" - every
      compile except the first with the reference properties (the parity reference itself), so that every step of
      the ladder is wrong.
    - `corrupt_rows_with`: a corrupting compile corrupts only the rows whose input ids hold this token id (None:
      every row), as a kernel bug that shows on some inputs only: the parity pairs can pass while others fail.
    - `f32_compute`: every compile computes at exact f32 (INFERENCE_PRECISION_HINT=f32,
      DYNAMIC_QUANTIZATION_GROUP_SIZE=0 handed to OpenVINO) whatever it asks for, so that `corrupt` alone decides
      which compile scores wrongly, not the CPU's bf16 rounding. `compiles` still records what was asked.
    - `crash`: once this Event is set, every inference raises `InferenceCrash`, a BaseException that no
      `except Exception` catches: what a scoring thread cannot survive.

    `compiles` has every compile's properties but CACHE_DIR, `cache_dirs` every compile's CACHE_DIR (None when it
    named none), `core_properties` what was set on the Core itself, `compiled_for` and `shapes` the claimed-device
    compiles' device and input shapes."""

    def __init__(self, claim=(), counter: Path | None = None, bump: bool = True, execution_devices=("NPU.4000",),
                 corrupt: str | None = None, crash: threading.Event | None = None, f32_compute: bool = False,
                 corrupt_rows_with: int | None = None):
        assert corrupt in (None, "multi", "not_f32", "always")
        self.crash, self.f32_compute, self.corrupt_rows_with = crash, f32_compute, corrupt_rows_with
        self.core = ov.Core()
        self.claim, self.counter, self.bump = tuple(claim), counter, bump
        self.execution_devices, self.corrupt = tuple(execution_devices), corrupt
        self.compiles: list[dict] = []
        self.cache_dirs: list[str | None] = []
        self.core_properties: dict = {}
        self.compiled_for: list[str] = []
        self.shapes: list[list] = []

    @property
    def available_devices(self):
        real = list(self.core.available_devices)
        return real + [d for d in self.claim if d not in real]

    def set_property(self, props):
        self.core_properties.update(props)
        self.core.set_property(props)

    def read_model(self, path):
        return self.core.read_model(path)

    def compile_model(self, model, device, props):
        props = dict(props)
        cache_dir = props.pop("CACHE_DIR", None)
        multi = props.get("PERFORMANCE_HINT") == "THROUGHPUT" or props.get("NUM_STREAMS", "1") != "1"
        first_reference = props == REFERENCE_PROPERTIES and REFERENCE_PROPERTIES not in self.compiles
        not_f32 = props.get("INFERENCE_PRECISION_HINT") != "f32"
        corrupt = (self.corrupt is not None and multi) or (self.corrupt == "not_f32" and not_f32) or \
            (self.corrupt == "always" and not first_reference)
        self.compiles.append(props)
        self.cache_dirs.append(cache_dir)
        claimed = device in self.claim
        if claimed:
            self.compiled_for.append(device)
            self.shapes.append([list(p.get_partial_shape().to_shape()) for p in model.inputs])  # static or it raises
            device = "CPU"
        compile_props = {**props, **(F32_EXACT if self.f32_compute else {})}
        compile_props = compile_props if cache_dir is None else {**compile_props, "CACHE_DIR": cache_dir}
        return _FakeCompiled(self.core.compile_model(model, device, compile_props), self, claimed, corrupt)


class _FakeCompiled:
    def __init__(self, compiled, fake: FakeCore, claimed: bool, corrupt: bool):
        self.compiled, self.fake, self.claimed, self.corrupt = compiled, fake, claimed, corrupt

    def get_property(self, name):
        if name == "EXECUTION_DEVICES" and self.claimed:
            return list(self.fake.execution_devices)
        return self.compiled.get_property(name)

    def create_infer_request(self):
        return _FakeRequest(self.compiled.create_infer_request(), self)


class _FakeRequest:
    def __init__(self, request, compiled: _FakeCompiled):
        self.request, self.compiled = request, compiled

    def infer(self, feed):
        """The wrapped request's own result (an OVDict, indexed by output as the engine does), its arrays shifted
        in place when this compile corrupts."""
        if self.compiled.fake.crash is not None and self.compiled.fake.crash.is_set():
            raise InferenceCrash("the device went away mid-call")
        result = self.request.infer(feed)
        if self.compiled.corrupt:
            token = self.compiled.fake.corrupt_rows_with
            rows = slice(None) if token is None else (feed["input_ids"] == token).any(axis=1)
            for key in result:
                values = result[key]
                values[rows] = values[rows] * 40 + 7
        fake = self.compiled.fake
        if self.compiled.claimed and fake.bump and fake.counter is not None and fake.counter.exists():
            fake.counter.write_text(str(int(fake.counter.read_text()) + 250) + "\n")
        return result


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


def spawn_ready_server(model: TinyModel, extra=(), env_extra=None) -> tuple[subprocess.Popen, int]:
    """`python server.py` on the CPU with `model` on a free port, once /readyz answers 200; the caller stops it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "server.py"), "--port", str(port), "--device", "CPU",
                             "--model-dir", str(model.path), "--cache-dir", "", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=server_env(env_extra))
    deadline = time.monotonic() + 120
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
