"""The startup guard: a compile configuration that scores differently from the f32 single-stream CPU reference is
replaced by the safe configuration, or refused (SPEC.md, "Startup parity guard"). The wrong scores are injected by
a Core stand-in, since whether OpenVINO itself misbehaves depends on the CPU (AMX/bf16) and on chance."""

import pytest
from conftest import F32, F32_LATENCY, FakeCore, RunningServer, request

from openvino_reranker.config import load_config
from openvino_reranker.errors import EXIT_STARTUP_CHECK
from openvino_reranker.parity import EXACT_F32_CPU, REFERENCE_PROPERTIES, safe_properties, serving_properties


def args(model):
    return ["--device", "CPU", *F32, "--model-dir", str(model.path), "--cache-dir", ""]


def test_the_configured_compile_serves_when_it_agrees(tiny_model):
    srv = RunningServer([*args(tiny_model), "--infer-requests", "2"]).wait_ready()
    try:
        body = request(srv.port, "GET", "/readyz")[1]
        assert body["parity"]["fallback"] is False and body["parity"]["max_abs_diff"] < 1e-4
        assert body["compile"]["properties"] == F32_LATENCY
        assert body["compile"]["infer_requests"] == 2
    finally:
        srv.close()


def test_real_multi_stream_compile_serves_right_scores_either_way(tiny_model):
    """THROUGHPUT with 2 streams on the real CPU plugin: in full test runs it has now and then scored wrongly
    (differences of about 0.5, never in isolation). Whichever way the guard decides, what serves must be right
    and /readyz must say which configuration it is."""
    srv = RunningServer([*args(tiny_model), "--performance-hint", "throughput", "--num-streams", "2"]).wait_ready()
    try:
        body = request(srv.port, "GET", "/readyz")[1]
        parity = body["parity"]
        assert parity["max_abs_diff"] < 1e-4
        if parity["fallback"]:
            assert body["compile"]["properties"] == REFERENCE_PROPERTIES and parity["failed_max_abs_diff"] > 0.02
        else:
            assert body["compile"]["properties"] == {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": "2",
                                                     **EXACT_F32_CPU}
        docs = ["solar power is energy from the sun", "the cat", "bread and wine", "a train " * 20]
        got = {r["index"]: r["score"] for r in
               request(srv.port, "POST", "/rerank", {"query": "solar power", "documents": docs})[1]["results"]}
        expected = tiny_model.reference_scores("solar power", docs)
        assert max(abs(got[i] - expected[i]) for i in range(len(docs))) < 1e-4
    finally:
        srv.close()


def test_wrong_scores_fall_back_to_the_safe_configuration(tiny_model):
    core = FakeCore(corrupt="multi")
    srv = RunningServer([*args(tiny_model), "--performance-hint", "throughput"], core=core).wait_ready()
    try:
        body = request(srv.port, "GET", "/readyz")[1]
        parity = body["parity"]
        assert parity["fallback"] is True and parity["failed_max_abs_diff"] > 0.02
        assert parity["failed_properties"] == {"PERFORMANCE_HINT": "THROUGHPUT", **EXACT_F32_CPU}
        assert body["compile"]["properties"] == REFERENCE_PROPERTIES and parity["max_abs_diff"] < 1e-4
        docs = ["solar power is energy from the sun", "the cat", "bread and wine"]
        scores = {r["index"]: r["score"] for r in
                  request(srv.port, "POST", "/rerank", {"query": "solar power", "documents": docs})[1]["results"]}
        expected = tiny_model.reference_scores("solar power", docs)
        assert max(abs(scores[i] - expected[i]) for i in range(3)) < 1e-4  # served by the safe compile
    finally:
        srv.close()


@pytest.mark.parametrize("extra, always, needle", [
    (["--performance-hint", "throughput", "--on-parity-failure", "refuse"], False, "differ from the f32"),
    (["--num-streams", "2"], True, "the safe configuration"),
])
def test_refusal(tiny_model, capsys, extra, always, needle):
    # main() on its own thread: it must refuse to start (were it to serve, wait_exit stops it and fails)
    core = FakeCore(corrupt="always" if always else "multi")
    code = RunningServer([*args(tiny_model), *extra], core=core).wait_exit()
    assert code == EXIT_STARTUP_CHECK
    assert needle in capsys.readouterr().err


def test_serving_properties_from_config():
    c = load_config(["--performance-hint", "throughput", "--num-streams", "3", "--inference-threads", "2",
                            "--inference-precision", "bf16"], {})
    assert serving_properties(c) == {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": "3",
                                            "INFERENCE_NUM_THREADS": "2", "INFERENCE_PRECISION_HINT": "bf16"}
    assert serving_properties(load_config([], {})) == {"PERFORMANCE_HINT": "LATENCY"}
    assert safe_properties("NPU") == {"PERFORMANCE_HINT": "LATENCY"}


def test_the_reference_is_compiled_fresh_and_never_through_the_compile_cache(tiny_model, tmp_path):
    """The reference compile names CACHE_DIR "" on every start: a blob could be the very wrong compile it is there
    to catch, and then agree with it (issue 17). The serving compile and the fallback name keyed directories of their
    own, and nothing sets CACHE_DIR on the Core, where it would serve every compile of the process."""
    for start in ("first", "second"):
        core = FakeCore(corrupt="multi")  # serving (THROUGHPUT) scores wrongly: reference, then fallback compile
        with RunningServer([*args(tiny_model), "--cache-dir", str(tmp_path), "--performance-hint", "throughput"],
                           core=core).wait_ready() as srv:
            body = request(srv.port, "GET", "/readyz")[1]
        assert core.compiles[1:] == [REFERENCE_PROPERTIES, REFERENCE_PROPERTIES]  # the reference, the fallback
        serving, reference, fallback = core.cache_dirs
        assert reference == "" and "CACHE_DIR" not in core.core_properties
        assert serving != fallback and {serving, fallback} == {str(p) for p in tmp_path.iterdir()}
        assert body["parity"]["fallback"] is True and body["compile"]["cache_dir"] == fallback
        assert body["compile"]["loaded_from_cache"] == [start == "second"]
