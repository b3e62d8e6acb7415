"""Stand-ins for what scores: `FakeEngine` (the Engine's interface, behaviour chosen by the test) with `fake_head`,
`FakeCore` (a real `ov.Core()` that pretends: devices it lacks, wrong scores, crashes), the real scoring path on the
CPU (`real_reranker`), and `close_reranker`, which every test that starts a Reranker calls."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import openvino as ov
import pytest

from openvino_reranker.encoding import CrossEncoderHead, ModelContract
from openvino_reranker.errors import InferenceError
from openvino_reranker.parity import REFERENCE_PROPERTIES
from openvino_reranker.reranker import Reranker

from .models import F32_EXACT, F32_LATENCY, TinyModel

# ---------------------------------------------------------------------------------------------- the engine


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


# ---------------------------------------------------------------------------------------------- OpenVINO's Core


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
      the ladder is wrong; "second_replica" - a compile whose properties an earlier compile already had (the second
      replica of a ReplicaSet), so that one replica of two scores wrongly.
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
        assert corrupt in (None, "multi", "not_f32", "always", "second_replica")
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
        if self.corrupt == "second_replica":
            corrupt = props != REFERENCE_PROPERTIES and props in self.compiles
        else:
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


