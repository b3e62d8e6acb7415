"""Bounded waits: a test waits for a state (a condition it can poll), never for a guessed time, and fails saying
what did not happen. The Batcher threads a test starts must have ended when it does."""

from __future__ import annotations

import threading
import time

import pytest


def wait_until(condition, timeout_s: float = 10.0, what: str = "the condition") -> None:
    """Poll `condition()` until it is true; fail the test if it is not within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            pytest.fail(f"{what} did not happen within {timeout_s} s")
        time.sleep(0.01)


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
