"""smoke.py against the real server, and against servers that break the contract on purpose."""

import io
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image
from support import ROOT
from support.models import TinyModel

import smoke

TINY_FIXTURES = ROOT / "tests" / "fixtures" / "smoke-tiny.json"


def test_tiny_fixture_expectations_match_the_reference(tiny_model: TinyModel):
    for f in smoke.load_fixtures(TINY_FIXTURES):
        scores = tiny_model.reference_scores(f["query"], [d["text"] for d in f["documents"]])
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        assert f["documents"][best]["id"] == f["expected_top"], f["name"]


def test_default_fixtures_are_well_formed():
    fixtures = smoke.load_fixtures(smoke.DEFAULT_FIXTURES)
    assert len(fixtures) >= 3 and all(len(f["documents"]) >= 3 for f in fixtures)


def test_smoke_passes_against_the_real_server(cpu_server):
    result = subprocess.run([sys.executable, str(ROOT / "smoke.py"), "--url", cpu_server.base, "--fixtures",
                             str(TINY_FIXTURES), "--expect-device", "CPU", "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True and summary["device"] == "CPU"
    names = {c["name"]: c["status"] for c in summary["checks"]}
    assert names["healthz"] == names["readyz"] == names["device"] == "pass"
    assert names["cohere: same scores as /rerank"] == "pass" and names["error: empty documents"] == "pass"
    assert names["npu proof"] == "skip"
    assert sum(1 for n in names if n.startswith("fixture ")) == 3 * 4  # status, complete, sorted, top


def run_smoke_json(url: str, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    result = subprocess.run([sys.executable, str(ROOT / "smoke.py"), "--url", url, "--json", *args],
                            capture_output=True, text=True, timeout=120)
    return result, json.loads(result.stdout.strip().splitlines()[-1])


def test_without_fixtures_smoke_picks_the_set_written_for_the_model_it_finds(cpu_server):
    """The CPU form README documents, with no --fixtures: /readyz names the tiny model, so its set is used."""
    result, summary = run_smoke_json(cpu_server.base, "--expect-device", "CPU")
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary["model"] == "tiny-cross-encoder" and summary["fixtures"] == "tests/fixtures/smoke-tiny.json"
    tops = [c for c in summary["checks"] if c["name"].endswith(": top result")]
    assert len(tops) == 3 and all(c["status"] == "pass" for c in tops)
    assert "fixtures tests/fixtures/smoke-tiny.json (written for tiny-cross-encoder" in result.stdout


def test_a_passed_check_carries_no_failure_message(cpu_server):
    _, summary = run_smoke_json(cpu_server.base, "--expect-device", "CPU")
    passed = [c for c in summary["checks"] if c["status"] == "pass"]
    assert len(passed) > 20 and [c for c in passed if c["detail"]] == []
    skipped = [c for c in summary["checks"] if c["status"] == "skip"]
    assert [c["detail"] for c in skipped] == ["skipped: device is CPU"]  # a skip says why


def test_a_text_only_model_refusing_images_passes(cpu_server):
    report = smoke.run(cpu_server.base, smoke.load_fixtures(TINY_FIXTURES), "CPU", False, "", 30)
    assert {c.name: c.status for c in report.checks}["images: a text-only model refuses them"] == "pass"


def test_smoke_scores_images_on_a_vision_language_model():
    """Against server.py serving the tiny vision-language fixture: the image is scored in both shapes alike."""
    from support.models import F32
    from support.servers import spawn_server

    fixture = ROOT / "tests" / "fixtures" / "models" / "tiny-nemotron-vl"
    proc, port = spawn_server(["--device", "CPU", *F32, "--model-dir", str(fixture), "--cache-dir", ""])
    try:
        result, summary = run_smoke_json(f"http://127.0.0.1:{port}", "--expect-device", "CPU")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    statuses = {c["name"]: c["status"] for c in summary["checks"]}
    assert statuses["images: scored"] == "pass" and statuses["images: the same image in both shapes"] == "pass"
    assert "images: a text-only model refuses them" not in statuses
    assert result.returncode == 0, result.stdout


def test_the_smoke_page_is_a_png_pillow_reads():
    image = Image.open(io.BytesIO(smoke.png_page(40, 24)))
    image.load()
    colors = {image.getpixel((x, y)) for x in range(40) for y in range(24)}
    assert image.size == (40, 24) and image.mode == "RGB" and len(colors) > 10


def test_wrong_device_and_require_npu_fail(cpu_server):
    report = smoke.run(cpu_server.base, smoke.load_fixtures(TINY_FIXTURES), "NPU", True, "/nonexistent", 30)
    failed = {c.name for c in report.checks if c.status == "fail"}
    assert not report.ok and {"device", "npu"} <= failed
    assert "fixture solar: npu_busy_delta_us" in failed  # null off the NPU


def test_default_fixtures_fail_on_a_model_that_ranks_differently(cpu_server):
    report = smoke.run(cpu_server.base, smoke.load_fixtures(smoke.DEFAULT_FIXTURES), None, False, "", 30)
    # the tiny random model is not ms-marco: at least one expected top result must miss
    assert any(c.name.endswith("top result") and c.status == "fail" for c in report.checks)


class LyingHandler(BaseHTTPRequestHandler):
    """Ready and well-formed on the surface, but ranks in input order and accepts everything."""

    protocol_version = "HTTP/1.1"
    model = None  # what /readyz says it serves

    def _send(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200, {"ok": True, "ready": True, "device": "NPU", "execution_devices": ["NPU.4000"],
                         "model": self.model})

    def do_POST(self):
        data = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        docs = data.get("documents") or []
        results = [{"index": i, "score": 0.5 - i * 0.1, "id": d.get("id") if isinstance(d, dict) else None}
                   for i, d in enumerate(docs)]
        self._send(200, {"ok": True, "results": results, "npu_busy_delta_us": 0})

    def log_message(self, *args):
        pass


@pytest.fixture
def lying_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), LyingHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_a_model_no_fixture_set_is_written_for_skips_the_top_result_checks_saying_why(lying_server):
    """Without --fixtures, on a model none of the shipped sets names: the default set still checks status, order
    and shape, but not which document must come first, and one line per fixture says why."""
    LyingHandler.model = "org/some-other-reranker"
    try:
        result, summary = run_smoke_json(lying_server)
    finally:
        LyingHandler.model = None
    assert summary["model"] == "org/some-other-reranker"
    assert summary["fixtures"] == "tests/fixtures/smoke-ms-marco.json"
    tops = [c for c in summary["checks"] if c["name"].endswith(": top result")]
    assert tops and all(c["status"] == "skip" for c in tops)
    reason = tops[0]["detail"]
    assert reason.startswith("skipped: no fixture set is written for org/some-other-reranker")
    assert "--fixtures" in reason
    skip_lines = [line for line in result.stdout.splitlines() if line.startswith("SKIP ") and "top result" in line]
    assert len(skip_lines) == len(tops) and all(len(line) < 300 for line in skip_lines)
    assert not [line for line in result.stdout.splitlines() if line.startswith("FAIL ") and "top result" in line]


def test_smoke_catches_a_server_that_breaks_the_contract(lying_server):
    result = subprocess.run([sys.executable, str(ROOT / "smoke.py"), "--url", lying_server, "--fixtures",
                             str(TINY_FIXTURES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    fails = [line for line in result.stdout.splitlines() if line.startswith("FAIL ")]
    text = "\n".join(fails)
    assert "npu_busy_delta_us" in text  # device says NPU, the delta is 0
    assert "top result" in text  # input order is not the expected ranking
    assert "FAIL error: empty documents" in text and "FAIL error: wrong method" in text  # it accepts everything
    assert "cohere: shape" in text
    assert "FAIL images: a text-only model refuses them" in text  # no vision head in /readyz, yet it scored images
    assert all(len(line) < 400 for line in fails)


def test_unreachable_server_is_one_failure_line():
    from support.servers import free_port

    result = subprocess.run([sys.executable, str(ROOT / "smoke.py"), "--url", f"http://127.0.0.1:{free_port()}",
                             "--fixtures", str(TINY_FIXTURES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert [line for line in result.stdout.splitlines() if line.startswith("FAIL")] == [
        line for line in result.stdout.splitlines() if line.startswith("FAIL connection")]


def test_bad_arguments_exit_2(tmp_path):
    bad = tmp_path / "f.json"
    bad.write_text(json.dumps({"fixtures": [{"name": "x", "query": "q", "documents": [{"id": "a", "text": "t"}],
                                             "expected_top": "zzz"}]}))
    result = subprocess.run([sys.executable, str(ROOT / "smoke.py"), "--fixtures", str(bad)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "expected_top" in result.stderr
