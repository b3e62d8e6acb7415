"""The fixtures: the tiny models, real servers on loopback, and a check that every test closes the Reranker it
starts. What they are built from, and every other helper the tests share, is in tests/support/."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's package, ahead of any installed copy
sys.path.insert(0, str(ROOT / "tests"))  # support/, tinymodel.py, fakehub.py, evaldata.py

from support.models import F32, TinyModel, build_tiny_model
from support.servers import FakeServer, RunningServer
from support.waiting import assert_batcher_threads_stopped, batcher_threads


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> TinyModel:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_model_2labels(tmp_path_factory) -> TinyModel:
    return build_tiny_model(tmp_path_factory.mktemp("tiny2"), num_labels=2, seed=1)


@pytest.fixture(scope="session")
def tiny_model_no_types(tmp_path_factory) -> TinyModel:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_nt"), with_token_types=False, seed=2)


@pytest.fixture(autouse=True)
def batcher_threads_are_closed():
    """After each test: no "batcher" or "infer-<n>" thread that the test started may still run. Threads alive
    before it (a module-scoped server's) are not its business; those fixtures check their own on teardown."""
    before = batcher_threads()
    yield
    assert_batcher_threads_stopped(before, "this test")


@pytest.fixture(scope="module")
def cpu_server(tiny_model, tmp_path_factory):
    """main() on the CPU at f32 with the tiny model, shared by a module's tests."""
    before = batcher_threads()
    srv = RunningServer(["--device", "CPU", *F32, "--model-dir", str(tiny_model.path),
                         "--cache-dir", str(tmp_path_factory.mktemp("cache"))]).wait_ready()
    yield srv
    srv.close()
    assert_batcher_threads_stopped(before, "the cpu_server fixture")


@pytest.fixture
def fake_server(tiny_model):
    """`fake_server(*args, env=None)`: a FakeServer (not started: call `.start(engine)`), closed after the test."""
    made = []

    def make(*args, env=None):
        made.append(FakeServer(tiny_model, args, env))
        return made[-1]

    yield make
    for s in made:
        s.close()
