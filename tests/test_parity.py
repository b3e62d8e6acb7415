"""The startup guard: a compile configuration that scores differently from the f32 single-stream CPU reference is
replaced by the next step of the fallback ladder that scores right (the requested precision on one stream, then
f32 on one stream), or refused (SPEC.md, "Startup parity guard"). Most wrong scores are injected by a Core stand-in;
the real OpenVINO bug (INT8 weights, bf16, several streams) is served where the CPU computes in bf16."""

from pathlib import Path

import numpy as np
import openvino as ov
import pytest
from support.engines import FakeCore
from support.http import request
from support.models import F32, F32_LATENCY
from support.servers import RunningServer

from openvino_reranker.config import load_config
from openvino_reranker.cpu import CpuInfo, read_cpu
from openvino_reranker.errors import EXIT_STARTUP_CHECK
from openvino_reranker.parity import (
    EXACT_F32_CPU,
    REFERENCE_PROPERTIES,
    fallback_ladder,
    replicas_for,
    safe_properties,
    serving_properties,
)

ONE_STREAM = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}  # the ladder's first step at the default precision
DOCS = ["solar power is energy from the sun", "the cat", "bread and wine", "a train " * 20]


def args(model):
    return ["--device", "CPU", *F32, "--model-dir", str(model.path), "--cache-dir", ""]


def default_precision_args(model):
    return ["--device", "CPU", "--model-dir", str(model.path), "--cache-dir", ""]


def served_scores(port: int, docs=DOCS) -> np.ndarray:
    results = request(port, "POST", "/rerank", {"query": "solar power", "documents": docs})[1]["results"]
    return np.array([r["score"] for r in sorted(results, key=lambda r: r["index"])])


def test_the_configured_compile_serves_when_it_agrees(tiny_model):
    srv = RunningServer([*args(tiny_model), "--infer-requests", "2", "--replicas", "1"]).wait_ready()
    try:
        body = request(srv.port, "GET", "/readyz")[1]
        assert body["parity"]["fallback"] is False and body["parity"]["max_abs_diff"] < 1e-4
        assert body["compile"]["properties"] == F32_LATENCY
        assert body["compile"]["infer_requests"] == 2 and body["compile"]["replicas"] == 1
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
    (["--num-streams", "2"], True, "no step of the fallback ladder"),
])
def test_refusal(tiny_model, capsys, extra, always, needle):
    # main() on its own thread: it must refuse to start (were it to serve, wait_exit stops it and fails)
    core = FakeCore(corrupt="always" if always else "multi")
    code = RunningServer([*args(tiny_model), *extra], core=core).wait_exit()
    assert code == EXIT_STARTUP_CHECK
    assert needle in capsys.readouterr().err


def test_a_wrong_multi_stream_compile_falls_back_to_one_stream_at_the_requested_precision(tiny_model):
    """Step 1 of the ladder: THROUGHPUT at the default precision scores wrongly, the same precision on one stream
    scores right, so that serves (not f32, which is about 3x slower on an AMX CPU)."""
    core = FakeCore(corrupt="multi", f32_compute=True)
    with RunningServer([*default_precision_args(tiny_model), "--performance-hint", "throughput"],
                       core=core).wait_ready() as srv:
        body = request(srv.port, "GET", "/readyz")[1]
        scores = served_scores(srv.port)
    parity = body["parity"]
    assert body["compile"]["properties"] == ONE_STREAM and body["compile"]["infer_requests"] == 1
    assert parity["step"] == "one_stream" and parity["fallback"] is True and parity["max_abs_diff"] < 1e-4
    assert [(s["step"], s["properties"], s["passed"]) for s in parity["steps"]] == [
        ("configured", {"PERFORMANCE_HINT": "THROUGHPUT"}, False), ("one_stream", ONE_STREAM, True)]
    assert parity["steps"][0]["max_abs_diff"] > 0.02 and parity["steps"][1]["max_abs_diff"] < 1e-4
    assert parity["failed_properties"] == {"PERFORMANCE_HINT": "THROUGHPUT"}
    assert parity["failed_max_abs_diff"] == parity["steps"][0]["max_abs_diff"]
    assert core.compiles == [{"PERFORMANCE_HINT": "THROUGHPUT"}, REFERENCE_PROPERTIES, ONE_STREAM]
    assert np.abs(scores - tiny_model.reference_scores("solar power", DOCS)).max() < 1e-4


def test_when_one_stream_is_wrong_too_f32_on_one_stream_serves(tiny_model):
    core = FakeCore(corrupt="not_f32", f32_compute=True)
    with RunningServer([*default_precision_args(tiny_model), "--num-streams", "2"], core=core).wait_ready() as srv:
        body = request(srv.port, "GET", "/readyz")[1]
        scores = served_scores(srv.port)
    parity = body["parity"]
    assert body["compile"]["properties"] == REFERENCE_PROPERTIES and parity["step"] == "safe"
    assert [(s["step"], s["passed"]) for s in parity["steps"]] == [
        ("configured", False), ("one_stream", False), ("safe", True)]
    assert [s["properties"] for s in parity["steps"]] == [
        {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "2"}, ONE_STREAM, REFERENCE_PROPERTIES]
    assert all(s["max_abs_diff"] > 0.02 for s in parity["steps"][:2]) and parity["max_abs_diff"] < 1e-4
    assert np.abs(scores - tiny_model.reference_scores("solar power", DOCS)).max() < 1e-4


def test_every_step_wrong_exits_6_naming_each_step(tiny_model, capsys):
    core = FakeCore(corrupt="always", f32_compute=True)
    code = RunningServer([*default_precision_args(tiny_model), "--performance-hint", "throughput"],
                         core=core).wait_exit()
    assert code == EXIT_STARTUP_CHECK
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "configured" in err and "one_stream" in err and "safe" in err and "no step" in err
    assert core.compiles[1:] == [REFERENCE_PROPERTIES, ONE_STREAM, REFERENCE_PROPERTIES]


def test_refuse_stops_at_the_first_wrong_step_even_when_one_stream_would_be_right(tiny_model, capsys):
    core = FakeCore(corrupt="multi", f32_compute=True)
    code = RunningServer([*default_precision_args(tiny_model), "--performance-hint", "throughput",
                          "--on-parity-failure", "refuse"], core=core).wait_exit()
    assert code == EXIT_STARTUP_CHECK and "differ from the f32" in capsys.readouterr().err
    assert core.compiles == [{"PERFORMANCE_HINT": "THROUGHPUT"}, REFERENCE_PROPERTIES]


@pytest.mark.parametrize("argv, device, expected", [
    # the default (LATENCY, one stream already): straight to f32, no second compile of the same thing
    ([], "CPU", [("configured", {"PERFORMANCE_HINT": "LATENCY"}), ("safe", REFERENCE_PROPERTIES)]),
    (["--performance-hint", "throughput"], "CPU",
     [("configured", {"PERFORMANCE_HINT": "THROUGHPUT"}), ("one_stream", ONE_STREAM), ("safe", REFERENCE_PROPERTIES)]),
    (["--performance-hint", "throughput", "--inference-precision", "bf16", "--inference-threads", "2"], "CPU",
     [("configured", {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_NUM_THREADS": "2",
                      "INFERENCE_PRECISION_HINT": "bf16"}),
      ("one_stream", {**ONE_STREAM, "INFERENCE_NUM_THREADS": "2", "INFERENCE_PRECISION_HINT": "bf16"}),
      ("safe", REFERENCE_PROPERTIES)]),
    # f32 asked for: its one-stream step is the reference configuration itself, so there is no third step
    (["--num-streams", "2", *F32], "CPU",
     [("configured", {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "2", **EXACT_F32_CPU}),
      ("one_stream", REFERENCE_PROPERTIES)]),
    (["--num-streams", "1", *F32], "CPU", [("configured", REFERENCE_PROPERTIES)]),
    (["--performance-hint", "throughput"], "NPU",
     [("configured", {"PERFORMANCE_HINT": "THROUGHPUT"}), ("one_stream", {"PERFORMANCE_HINT": "LATENCY"})]),
])
def test_the_fallback_ladder(argv, device, expected):
    config = load_config(["--device", device, *argv], {})
    ladder = fallback_ladder(config)
    assert [(step.name, dict(step.properties)) for step in ladder] == expected
    assert ladder[0].infer_requests == config.infer_requests and all(s.infer_requests == 1 for s in ladder[1:])


def cpu_computes_in_bf16() -> bool:
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.mark.skipif(not cpu_computes_in_bf16(), reason="the CPU has neither AMX nor AVX512-BF16: OpenVINO computes "
                    "in f32 by default here, and the INT8 multi-stream bug is a bf16 one")
def test_the_real_int8_multi_stream_bug_falls_back_to_one_stream(tiny_model):
    """The real OpenVINO 2026.4.1 bug on a CPU with AMX (and, reportedly, AVX512-BF16): an IR with INT8 weights
    compiled with several streams at the default (bf16) precision scores garbage (|logit| off by about 250 on this
    tiny model, on every compile here), while one stream at bf16 scores within bf16 rounding. The guard must serve
    the bf16 one-stream step, not fall back all the way to f32. The tolerance is 0.05 so that the test is about
    the bug (score differences of about 0.97), not the tiny random model's bf16 rounding (1.3e-2 on the AMX Xeon,
    2.4e-2 from numpy on an AVX512-BF16 EPYC)."""
    tolerance = 0.05
    if not multi_stream_compile_is_wrong(tiny_model, tolerance):
        pytest.skip("the INT8 multi-stream bug does not show on this CPU (its THROUGHPUT compile scores right)")
    with RunningServer([*default_precision_args(tiny_model), "--performance-hint", "throughput",
                        "--parity-tolerance", str(tolerance)]).wait_ready() as srv:
        body = request(srv.port, "GET", "/readyz")[1]
        scores = served_scores(srv.port)
    parity = body["parity"]
    assert parity["step"] == "one_stream" and body["compile"]["properties"] == ONE_STREAM, parity
    assert parity["steps"][0]["max_abs_diff"] > 0.5 and parity["max_abs_diff"] <= tolerance
    assert np.abs(scores - tiny_model.reference_scores("solar power", DOCS)).max() <= tolerance


def test_int8_weights_score_right_on_two_replicas_at_the_default_precision(tiny_model):
    """What two streams of one compile get wrong on AMX (the test above), two one-thread compiles of the same INT8
    weight-only IR get right, run at once: the guard serves them as configured, within bf16 rounding (0.05, as
    above) of the numpy reference, on a CPU that computes in bf16 as on one that does not."""
    tolerance = 0.05
    with RunningServer([*default_precision_args(tiny_model), "--replicas", "2",
                        "--parity-tolerance", str(tolerance)]).wait_ready() as srv:
        body = request(srv.port, "GET", "/readyz")[1]
        scores = [served_scores(srv.port, DOCS * 4) for _ in range(3)]
    assert body["compile"]["replicas"] == 2 and body["parity"]["step"] == "configured", body["parity"]
    assert body["parity"]["max_abs_diff"] <= tolerance
    expected = tiny_model.reference_scores("solar power", DOCS * 4)
    assert max(np.abs(s - expected).max() for s in scores) <= tolerance


def multi_stream_compile_is_wrong(model, tolerance: float) -> bool:
    """OpenVINO alone: does a THROUGHPUT compile at the default precision score the pairs differently from an f32
    one-stream compile by more than `tolerance`?"""
    from tokenizers import Tokenizer

    core = ov.Core()
    ir = core.read_model(str(model.path / "openvino_model.xml"))
    tokenizer = Tokenizer.from_file(str(model.path / "tokenizer.json"))
    tokenizer.enable_truncation(model.shape.max_positions, strategy="longest_first")

    def scores(properties) -> np.ndarray:
        compiled = core.compile_model(ir, "CPU", {**properties, "CACHE_DIR": ""})
        out = []
        for doc in DOCS:
            enc = tokenizer.encode("solar power", doc)
            feed = {"input_ids": np.array([enc.ids]), "attention_mask": np.array([enc.attention_mask]),
                    "token_type_ids": np.array([enc.type_ids])}
            out.append(float(compiled(feed)[0][0, 0]))
        return 1 / (1 + np.exp(-np.array(out)))

    return bool(np.abs(scores({"PERFORMANCE_HINT": "THROUGHPUT"}) - scores(REFERENCE_PROPERTIES)).max() > tolerance)


FIXTURES = Path(__file__).parent / "fixtures" / "models"
REPLICA = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "ENABLE_CPU_PINNING": "NO"}


def replica_threads(replicas: int) -> str:
    info = read_cpu()
    return str(max(1, (info.cores if info is not None else replicas) // replicas))


def test_two_replicas_serve_side_by_side_and_score_right(tiny_model):
    """Two one-stream compiles with a share of the cores each (and no pinning, which would put both on the same
    cores), both checked against the reference: the scores are the reference's."""
    with RunningServer([*args(tiny_model), "--replicas", "2"]).wait_ready() as srv:
        body = request(srv.port, "GET", "/readyz")[1]
        scores = [served_scores(srv.port, DOCS * 8) for _ in range(3)]
    compile_ = body["compile"]
    assert compile_["replicas"] == 2 and compile_["infer_requests"] == 2 and compile_["replicas_note"] is None
    assert compile_["properties"] == {**EXACT_F32_CPU, **REPLICA, "INFERENCE_NUM_THREADS": replica_threads(2)}
    assert len(compile_["loaded_from_cache"]) == 2
    assert body["parity"]["step"] == "configured" and body["parity"]["steps"][0]["replicas"] == 2
    expected = tiny_model.reference_scores("solar power", DOCS * 8)
    assert all(np.abs(s - expected).max() < 1e-4 for s in scores)


def test_a_wrong_replica_is_caught_though_the_other_is_right(tiny_model):
    """Each replica is its own compile: the guard checks each alone, so a second replica that scores wrongly
    (FakeCore corrupts a compile whose properties came before) is caught and one compile serves."""
    core = FakeCore(corrupt="second_replica")
    with RunningServer([*args(tiny_model), "--replicas", "2"], core=core).wait_ready() as srv:
        body = request(srv.port, "GET", "/readyz")[1]
        scores = served_scores(srv.port)
    parity = body["parity"]
    assert [(s["step"], s["replicas"], s["passed"]) for s in parity["steps"]] == [
        ("configured", 2, False), ("one_stream", 1, True)]
    assert parity["steps"][0]["max_abs_diff"] > 0.02 and body["compile"]["replicas"] == 1
    assert np.abs(scores - tiny_model.reference_scores("solar power", DOCS)).max() < 1e-4


def test_a_decoder_reranker_is_served_by_one_compile_whatever_replicas_say():
    """One-thread compiles of the decoder fixtures kill OpenVINO 2026.4.1's CPU plugin (SIGFPE), so replicas are
    for CLS-pooled encoders only; a decoder says why it got one compile."""
    model_dir = FIXTURES / "tiny-qwen3"
    with RunningServer(["--device", "CPU", *F32, "--model-dir", str(model_dir), "--cache-dir", "",
                        "--replicas", "2"]).wait_ready() as srv:
        body = request(srv.port, "GET", "/readyz")[1]
    assert body["compile"]["replicas"] == 1 and "not a CLS-pooled encoder" in body["compile"]["replicas_note"]
    assert "INFERENCE_NUM_THREADS" not in body["compile"]["properties"]


@pytest.mark.parametrize("model, auto, replicas, note", [
    ("tiny-xlmr", True, 2, None),  # a CLS-pooled encoder with f32 weights
    ("tiny-bert-qint8", True, 2, None),  # calibrated full INT8 (FakeQuantize): replicas were faster
    ("tiny-int8", True, 1, "weight-only compressed"),  # INT8 weight-only: slower on replicas, so not by default
    ("tiny-int8", False, 2, None),  # ... unless asked for
    ("tiny-qwen3", False, 1, "not a CLS-pooled encoder"),  # decoders never: one-thread compiles crash
    ("tiny-llama", True, 1, "not a CLS-pooled encoder"),
])
def test_which_models_get_replicas(tiny_model, model, auto, replicas, note):
    path = tiny_model.path if model == "tiny-int8" else FIXTURES / model
    ir = ov.Core().read_model(str(next(path.glob("**/openvino_model*.xml"))))
    got, why = replicas_for(load_config(["--device", "CPU", "--replicas", "2"], {}), ir, auto)
    assert got == replicas and (why == "" if note is None else note in why)
    assert replicas_for(load_config(["--device", "CPU", "--replicas", "1"], {}), ir, auto) == (1, "")


@pytest.mark.parametrize("argv, expected", [
    (["--replicas", "2"], [("configured", 2, {**REPLICA, "INFERENCE_NUM_THREADS": "1"}),
                           ("one_stream", 1, ONE_STREAM), ("safe", 1, REFERENCE_PROPERTIES)]),
    (["--replicas", "2", "--inference-threads", "3", *F32],
     [("configured", 2, {**REPLICA, "INFERENCE_NUM_THREADS": "3", **EXACT_F32_CPU}),
      ("one_stream", 1, {**ONE_STREAM, "INFERENCE_NUM_THREADS": "3", **EXACT_F32_CPU}),
      ("safe", 1, REFERENCE_PROPERTIES)]),
])
def test_the_fallback_ladder_with_replicas(argv, expected):
    two_cores = CpuInfo("test", frozenset(), 2, 2000.0)
    ladder = fallback_ladder(load_config(["--device", "CPU", *argv], {}), 2, two_cores)
    assert [(step.name, step.replicas, dict(step.properties)) for step in ladder] == expected


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
