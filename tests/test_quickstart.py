"""README's offline quick start, as a new user runs it: `demo-model DIR` builds the demo model with no network, and
a real server started on it with `--model DIR` answers /rerank (issue 19.1)."""

import json
import signal
import subprocess
import sys

from support import ROOT
from support.http import request
from support.servers import run_server, spawn_server

from openvino_reranker.demomodel import DEMO_MODEL_NAME
from openvino_reranker.errors import EXIT_CONFIG

# No route to any Hub: an endpoint nobody listens on, and offline besides.
NO_NETWORK = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}


def write_demo(directory) -> subprocess.CompletedProcess:
    return run_server(["demo-model", str(directory)], NO_NETWORK)


def test_demo_model_is_written_offline_and_says_how_to_serve_it(tmp_path):
    result = write_demo(tmp_path / "demo")
    assert result.returncode == 0, result.stderr
    assert {"openvino_model.xml", "openvino_model.bin", "tokenizer.json", "config.json"} <= \
        {p.name for p in (tmp_path / "demo").iterdir()}
    assert json.loads((tmp_path / "demo" / "config.json").read_text())["_name_or_path"] == DEMO_MODEL_NAME
    assert "meaningless" in result.stdout
    assert f"server.py --device CPU --model {tmp_path / 'demo'}" in result.stdout  # the program as invoked


def test_the_demo_model_is_the_tests_tiny_model(tmp_path, tiny_model):
    """Same builder, seed and shape: the numpy reference and tests/fixtures/smoke-tiny.json hold for it."""
    assert write_demo(tmp_path / "demo").returncode == 0
    for name in ("openvino_model.bin", "tokenizer.json"):
        assert (tmp_path / "demo" / name).read_bytes() == (tiny_model.path / name).read_bytes(), name


def test_a_server_on_the_demo_model_answers_rerank_without_network(tmp_path):
    assert write_demo(tmp_path / "demo").returncode == 0
    proc, port = spawn_server(["--device", "CPU", "--model", str(tmp_path / "demo"), "--cache-dir", ""], NO_NETWORK)
    try:
        status, body, _ = request(port, "POST", "/rerank", {
            "query": "how does solar power work",
            "documents": ["solar power is energy from the sun", "the cat and the dog"]})
        assert status == 200 and body["model"] == DEMO_MODEL_NAME and len(body["results"]) == 2
        assert request(port, "GET", "/readyz")[1]["source"] is None  # a directory: no Hub involved
        smoke = subprocess.run([sys.executable, str(ROOT / "smoke.py"), "--url", f"http://127.0.0.1:{port}",
                                "--expect-device", "CPU", "--json"], capture_output=True, text=True, timeout=120)
        assert smoke.returncode == 0, smoke.stdout  # as README says: smoke.py picks the tiny set for the demo model
        assert json.loads(smoke.stdout.splitlines()[-1])["fixtures"] == "tests/fixtures/smoke-tiny.json"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "demo model" in stderr and "meaningless" in stderr  # the log says so too


def test_demo_model_refuses_a_directory_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = write_demo(tmp_path)
    assert result.returncode == EXIT_CONFIG and "not empty" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "config.json").exists()
    assert write_demo(tmp_path / "demo").returncode == 0
    assert write_demo(tmp_path / "demo").returncode == 0  # an earlier demo model is rewritten


def test_readme_quick_start_serves_the_demo_model():
    setup = (ROOT / "README.md").read_text().split("## Setup", 1)[1].split("\n## ", 1)[0]
    assert "openvino-reranker demo-model" in setup and "--model" in setup and "meaningless" in setup
