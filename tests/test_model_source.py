"""Where the model comes from, through main(): a Hub id fetched from a local stand-in for the Hub (the default
model included, so `server.py` with no model option works on a fresh machine), the Hub cache reused offline, the
fetch's failures as startup exit codes, and SIGTERM during a download."""

import hashlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from fakehub import FakeHub, Fault
from support import ROOT
from support.http import request
from support.models import F32, SCORE_TOLERANCE
from support.servers import RunningServer, free_port, run_server, server_env

from openvino_reranker.config import DEFAULT_MODEL
from openvino_reranker.errors import EXIT_CONFIG, EXIT_DOWNLOAD, EXIT_MODEL

QUERY, DOCS = "solar power", ["energy from the sun", "the cat sat on the mat"]


@pytest.fixture
def hub():
    fake = FakeHub()
    yield fake
    fake.close()


def publish(hub: FakeHub, tiny_model, repo_id: str, ir: str = "openvino/openvino_model_qint8_quantized") -> str:
    """The tiny model as a Hub repo laid out like cross-encoder/*: the IR in openvino/, the rest at the root."""
    files = {f"{ir}.xml": (tiny_model.path / "openvino_model.xml").read_bytes(),
             f"{ir}.bin": (tiny_model.path / "openvino_model.bin").read_bytes()}
    for name in ("tokenizer.json", "config.json"):
        files[name] = (tiny_model.path / name).read_bytes()
    return hub.add_repo(repo_id, files, lfs=(f"{ir}.bin",))


def serve(args, env):
    return RunningServer(["--device", "CPU", *F32, "--cache-dir", "", *args], env=env)


def test_the_default_model_is_fetched_then_served_offline_from_the_hub_cache(hub, tiny_model, tmp_path):
    commit = publish(hub, tiny_model, DEFAULT_MODEL)
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(tmp_path / "hf"), "HOME": str(tmp_path)}
    with serve([], env).wait_ready() as srv:
        ready = request(srv.port, "GET", "/readyz")[1]
        assert ready["model"] == DEFAULT_MODEL and ready["model_file"] == "openvino/openvino_model_qint8_quantized.xml"
        assert ready["source"] == {"repo": DEFAULT_MODEL, "revision": "main", "commit": commit,
                                   "from_cache_only": False}
        results = request(srv.port, "POST", "/rerank", {"query": QUERY, "documents": DOCS})[1]["results"]
        served = np.array([r["score"] for r in sorted(results, key=lambda r: r["index"])])
        assert np.abs(served - tiny_model.reference_scores(QUERY, DOCS)).max() < SCORE_TOLERANCE
    fetched = len(hub.requests)
    hub.close()  # nothing to reach any more
    with serve([], {**env, "HF_HUB_OFFLINE": "1"}).wait_ready() as srv:
        assert request(srv.port, "GET", "/readyz")[1]["source"]["from_cache_only"] is True
    assert len(hub.requests) == fetched


def test_a_revision_and_a_model_file_are_honoured(hub, tiny_model, tmp_path):
    publish(hub, tiny_model, "org/tiny", ir="openvino_model")
    second = publish(hub, tiny_model, "org/other", ir="alt/model")
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(tmp_path / "hf")}
    with serve(["--model", f"org/other@{second}", "--model-file", "alt/model.xml"], env).wait_ready() as srv:
        ready = request(srv.port, "GET", "/readyz")[1]
        assert ready["model_file"] == "alt/model.xml" and ready["source"]["commit"] == second


@pytest.mark.parametrize("args, env_extra, code, needle", [
    (["--model", "org/missing"], {}, EXIT_MODEL, "org/missing"),
    (["--model", "org/tiny", "--model-file", "../x.xml"], {}, EXIT_CONFIG, "model_file"),
    (["--model", "org/tiny"], {"HF_HUB_OFFLINE": "1"}, EXIT_MODEL, "HF_HUB_OFFLINE is set"),
    (["--model", "org/tiny"], {"HF_ENDPOINT": "http://127.0.0.1:9"}, EXIT_DOWNLOAD, "org/tiny"),
    (["--model", "not a model"], {}, EXIT_CONFIG, "neither a directory nor a Hub id"),
])
def test_fetch_failures_stop_startup_with_one_line_and_their_exit_code(hub, tiny_model, tmp_path, capsys, args,
                                                                       env_extra, code, needle):
    publish(hub, tiny_model, "org/tiny", ir="openvino_model")
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(tmp_path / "hf"), **env_extra}
    assert serve(args, env).wait_exit() == code
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("openvino-reranker: error:"))
    assert needle in line and "Traceback" not in err


def test_a_timeout_huggingface_hub_refuses_is_a_configuration_error(tmp_path):
    """huggingface_hub reads HF_HUB_ETAG_TIMEOUT and HF_HUB_DOWNLOAD_TIMEOUT as whole seconds when imported, and
    fails on anything else: one line and exit 2, not a traceback."""
    result = run_server(["--port", "0", "--device", "CPU", "--model", "org/tiny"],
                        {"HF_HUB_DOWNLOAD_TIMEOUT": "1.5", "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == EXIT_CONFIG and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "HF_HUB_DOWNLOAD_TIMEOUT must be whole seconds" in result.stderr


def test_sigterm_stops_a_model_download_at_once_with_exit_0(hub, tmp_path):
    """server.py fetching 25 MB of weights at 1 MB/s: SIGTERM ends the download at once, not at huggingface_hub's
    next 10 MB chunk (when the stop would otherwise be seen), and exits 0 without caching anything half-done."""
    weights = hashlib.shake_256(b"slow weights").digest(25 * 1024 * 1024)
    hub.add_repo("org/slow", {"openvino_model.xml": b"<net/>", "openvino_model.bin": weights,
                              "tokenizer.json": b"{}"}, lfs=("openvino_model.bin",))
    hub.fail("openvino_model.bin", Fault("slow", 1_000_000))
    env = server_env({"HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(tmp_path / "hf"), "HOME": str(tmp_path)})
    proc = subprocess.Popen([sys.executable, str(ROOT / "server.py"), "--port", str(free_port()), "--device", "CPU",
                             "--model", "org/slow", "--cache-dir", ""], stderr=subprocess.PIPE, text=True, env=env)
    lines, downloading = [], threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "downloading openvino_model.bin (" in line:
                downloading.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert downloading.wait(60), "".join(lines)[-2000:]
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, "".join(lines)[-2000:]
        elapsed = time.monotonic() - sent
    finally:
        proc.kill()
        proc.wait()
        reader.join(10)
    assert elapsed < 3.0, f"{elapsed:.1f} s from SIGTERM to exit"
    assert any("stopped by a signal before fetching the model" in line for line in lines), "".join(lines)[-2000:]
    assert not list((tmp_path / "hf").rglob("blobs/" + hashlib.sha256(weights).hexdigest()))
