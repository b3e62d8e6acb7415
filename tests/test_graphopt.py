"""graphopt.py's pooled-row rewrite on real compiled models: where it applies, the rewritten IR's f32 CPU logits equal
the original's (max |diff| <= 1e-6 on random padded batches, left and right padding, batch 1 and 5, several lengths;
measured 0.0 on this machine) and its last feed-forward MatMul really runs on one row; where it does not apply
(mean pooling, a pooling index computed from the input), the model is left as it was and the report says why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest
from support.http import request
from support.models import F32
from support.servers import RunningServer

from openvino_reranker.graphopt import pool_row_only, row_only_copy

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "models"
EXACT = 1e-6
F32_ONE_STREAM = {"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY",
                  "CACHE_DIR": ""}

# fixture -> (IR, the row it pools or the reason it is left alone)
CASES = {
    "tiny-xlmr": ("openvino_model.xml", "CLS"),
    "tiny-bert-qint8": ("openvino/openvino_model_qint8_quantized.xml", "CLS"),  # FakeQuantize in the FFN
    "tiny-qwen3": ("openvino_model.xml", "index computed from the input"),  # optimum's last-token pooling
    "tiny-llama": ("openvino_model.xml", "index computed from the input"),
    "tiny-nemotron": ("openvino_model.xml", "mean pooling"),
    "tiny-nemotron-vl": ("openvino_model.xml", "mean pooling"),
}


def feeds(model, vocab: int = 100, seed: int = 0):
    """Random batches of 1 and 5 rows at several lengths, right- and left-padded (rows of different lengths)."""
    rng = np.random.default_rng(seed)
    names = [i.get_any_name() for i in model.inputs]
    for rows in (1, 5):
        for length in (1, 7, 33):
            for left in (False, True):
                ids = rng.integers(3, vocab, (rows, length)).astype(np.int64)
                mask = np.ones((rows, length), np.int64)
                for n in range(1, rows):
                    keep = int(rng.integers(1, length + 1))
                    if left:
                        mask[n, :length - keep] = 0
                    else:
                        mask[n, keep:] = 0
                feed = {}
                for name in names:
                    if name == "input_ids":
                        feed[name] = ids
                    elif name == "attention_mask":
                        feed[name] = mask
                    elif name == "position_ids":
                        feed[name] = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
                    elif name == "image_embeds":
                        shape = model.input(name).get_partial_shape()
                        feed[name] = np.zeros((rows, 0, shape[2].get_length()), np.float32)
                    else:
                        feed[name] = np.zeros_like(ids)
                yield feed


def max_logit_diff(original, rewritten) -> float:
    core = ov.Core()
    a = core.compile_model(original, "CPU", F32_ONE_STREAM)
    b = core.compile_model(rewritten, "CPU", F32_ONE_STREAM)
    worst = 0.0
    for feed in feeds(original):
        x, y = a(feed)[0], b(feed)[0]
        assert x.shape == y.shape
        worst = max(worst, float(np.abs(x - y).max()))
    return worst


def describe(model) -> list[tuple]:
    """Every operation with its type, name, inputs' sources and output shapes: equal when nothing was changed."""
    return [(n.get_type_name(), n.get_friendly_name(),
             tuple((v.get_node().get_friendly_name(), v.get_index()) for v in n.input_values()),
             tuple(str(o.get_partial_shape()) for o in n.outputs())) for n in model.get_ordered_ops()]


def row_matmuls(model, rows: int = 1) -> int:
    """MatMuls whose activation has `rows` sequence rows (a static [batch, sequence, hidden] input)."""
    count = 0
    for node in model.get_ordered_ops():
        if node.get_type_name() == "MatMul":
            shape, weight = node.input_value(0).get_partial_shape(), node.input_value(1).get_partial_shape()
            if (shape.rank.is_static and shape.rank.get_length() == 3 and shape[1].is_static
                    and shape[1].get_length() == rows and weight.rank.get_length() == 2):
                count += 1
    return count


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_fixture_is_rewritten_exactly_or_left_alone(name):
    xml, expected = CASES[name]
    model = ov.Core().read_model(str(FIXTURES / name / xml))
    before = describe(model)
    served, report = row_only_copy(model)
    if expected in ("CLS", "last"):
        assert report.applied and report.rows == expected and report.nodes > 0 and report.gathers > 0
        assert served is not model
        assert max_logit_diff(model, served) <= EXACT
    else:
        assert not report.applied and served is model
        assert "mean pooling" in report.reason and "computed from the input" in report.reason
    assert describe(model) == before  # the IR as read (the parity reference compiles it) is never changed


def test_the_tiny_bert_is_rewritten_exactly(tiny_model):
    model = ov.Core().read_model(str(tiny_model.path / "openvino_model.xml"))
    served, report = row_only_copy(model)
    assert report.applied and report.rows == "CLS"
    assert report.describe() == {"pooled_row_only": True, "rows": "CLS", "nodes": report.nodes,
                                 "gathers": report.gathers}
    assert max_logit_diff(model, served) <= EXACT
    # its attention is spelled out (MatMul, Softmax, Transpose, Reshape): the last layer's runs for one query row
    served = served.clone()
    served.reshape({i.get_any_name(): [2, 16] for i in served.inputs})
    softmaxes = [n.output(0).get_partial_shape() for n in served.get_ordered_ops() if n.get_type_name() == "Softmax"]
    assert [s[2].get_length() for s in softmaxes] == [16] * (len(softmaxes) - 1) + [1]


@pytest.mark.parametrize("name", ["tiny-xlmr", "tiny-bert-qint8"])
def test_the_last_layer_runs_on_one_row_of_a_static_shape(name):
    """Reshaped to [4, 24] (as the static buckets are), the rewritten IR's output projection and FFN MatMuls of the
    last layer take [4, 1, hidden]; the original's none. The reshaped rewritten model is still exact."""
    xml = CASES[name][0]
    model = ov.Core().read_model(str(FIXTURES / name / xml))
    served, _ = row_only_copy(model)
    static = {i.get_any_name(): [4, 24] for i in model.inputs}
    original, rewritten = model.clone(), served.clone()
    original.reshape(static)
    rewritten.reshape(static)
    assert row_matmuls(original) == 0
    assert row_matmuls(rewritten) >= 4  # the query, attention output dense, FFN in, FFN out
    queries = [n.input_value(0).get_partial_shape() for n in rewritten.get_ordered_ops()
               if n.get_type_name() == "ScaledDotProductAttention"]
    assert [q[2].get_length() for q in queries] == [24] * (len(queries) - 1) + [1]  # the last layer's one query row
    core = ov.Core()
    a = core.compile_model(original, "CPU", F32_ONE_STREAM)
    b = core.compile_model(rewritten, "CPU", F32_ONE_STREAM)
    feed = {name: np.random.default_rng(1).integers(3, 100, (4, 24)).astype(np.int64) for name in static}
    feed = {k: (np.ones_like(v) if k == "attention_mask" else np.zeros_like(v) if k == "token_type_ids" else v)
            for k, v in feed.items()}
    assert float(np.abs(a(feed)[0] - b(feed)[0]).max()) <= EXACT


def test_a_static_model_can_be_rewritten_before_reshaping_or_after():
    model = ov.Core().read_model(str(FIXTURES / "tiny-xlmr" / "openvino_model.xml"))
    model.reshape({i.get_any_name(): [2, 16] for i in model.inputs})
    served, report = row_only_copy(model)
    assert report.applied and row_matmuls(served) >= 3
    assert max_logit_diff_static(model, served, (2, 16)) <= EXACT


def max_logit_diff_static(original, rewritten, shape) -> float:
    core = ov.Core()
    a = core.compile_model(original, "CPU", F32_ONE_STREAM)
    b = core.compile_model(rewritten, "CPU", F32_ONE_STREAM)
    rng = np.random.default_rng(2)
    mask = np.ones(shape, np.int64)
    mask[1, shape[1] // 2:] = 0
    feed = {"input_ids": rng.integers(3, 100, shape).astype(np.int64), "attention_mask": mask}
    return float(np.abs(a(feed)[0] - b(feed)[0]).max())


def test_off_leaves_the_model_untouched():
    model = ov.Core().read_model(str(FIXTURES / "tiny-xlmr" / "openvino_model.xml"))
    served, report = row_only_copy(model, enabled=False)
    assert served is model and not report.applied and "off" in report.reason
    assert report.describe() == {"pooled_row_only": False, "reason": report.reason}


def last_token_model():
    """[B, L, 8] -> per-token MatMul, residual Add, MVN, FFN with Gelu, residual Add, MVN -> Gather(-1, axis 1)
    -> classifier: a decoder-style last-token pooling with a constant index. The hidden states first mix the
    sequence (a cumulative sum), so a wrong row would show."""
    rng = np.random.default_rng(3)
    x = ops.parameter([-1, -1, 8], np.float32, name="hidden")
    mixed = ops.cumsum(x, ops.constant(np.array(1, np.int64)))

    def dense(v, n_in, n_out):
        return ops.add(ops.matmul(v, ops.constant(rng.normal(size=(n_in, n_out)).astype(np.float32)), False, False),
                       ops.constant(rng.normal(size=(n_out,)).astype(np.float32)))

    def norm(v):
        return ops.mvn(v, ops.constant(np.array([-1], np.int64)), True, 1e-5, "inside_sqrt")

    h = norm(ops.add(dense(mixed, 8, 8), mixed))
    h = norm(ops.add(dense(ops.gelu(dense(h, 8, 16), "erf"), 16, 8), h))
    pooled = ops.gather(h, ops.constant(np.array([-1], np.int64)), ops.constant(np.array(1, np.int64)))
    logits = ops.matmul(ops.reshape(pooled, ops.constant(np.array([0, 8], np.int64)), True),
                        ops.constant(rng.normal(size=(8, 1)).astype(np.float32)), False, False)
    return ov.Model([logits], [x], "last-token")


def test_a_last_token_pooling_is_rewritten_exactly():
    model = last_token_model()
    served, report = row_only_copy(model)
    assert report.applied and report.rows == "last"
    core = ov.Core()
    a = core.compile_model(model, "CPU", F32_ONE_STREAM)
    b = core.compile_model(served, "CPU", F32_ONE_STREAM)
    for rows, length in ((1, 1), (1, 9), (5, 13)):
        feed = np.random.default_rng(rows * length).normal(size=(rows, length, 8)).astype(np.float32)
        assert float(np.abs(a(feed)[0] - b(feed)[0]).max()) <= EXACT


def test_a_tensor_with_another_consumer_is_gathered_not_changed():
    """The layer's input also feeds a consumer outside the pooled path (a model output here, as K/V projections in
    an encoder): that consumer still sees every row."""
    model = last_token_model()
    norm = next(n for n in model.get_ordered_ops() if n.get_type_name() == "MVN")
    extra = ov.Model([model.output(0).get_node().input_value(0), norm.output(0)], model.get_parameters(), "shared")
    report = pool_row_only(extra)
    assert report.applied
    feed = np.random.default_rng(4).normal(size=(2, 6, 8)).astype(np.float32)
    out = ov.Core().compile_model(extra, "CPU", F32_ONE_STREAM)(feed)
    assert out[1].shape == (2, 6, 8)


def test_readyz_shows_the_rewrite(cpu_server):
    status, ready, _ = request(cpu_server.port, "GET", "/readyz")
    assert status == 200
    graph = ready["graph"]
    assert graph["pooled_row_only"] is True and graph["rows"] == "CLS" and graph["nodes"] > 0
    assert ready["parity"]["max_abs_diff"] <= EXACT  # f32 serving compile of the rewritten IR vs the original


def test_readyz_says_when_it_is_off(tiny_model, tmp_path):
    srv = RunningServer(["--device", "CPU", *F32, "--model-dir", str(tiny_model.path), "--pooled-row-only", "off",
                         "--cache-dir", str(tmp_path / "cache")]).wait_ready()
    try:
        status, ready, _ = request(srv.port, "GET", "/readyz")
        assert status == 200 and ready["graph"]["pooled_row_only"] is False and "off" in ready["graph"]["reason"]
    finally:
        srv.close()


def test_the_rewritten_ir_has_its_own_compile_cache_directory(tmp_path):
    from dataclasses import replace

    from openvino_reranker.compilecache import open_compile_cache

    cache = open_compile_cache(str(tmp_path / "cache"), FIXTURES / "tiny-xlmr" / "openvino_model.xml")
    as_read = cache.directory_for("CPU", {"PERFORMANCE_HINT": "LATENCY"}, None)
    rewritten = replace(cache, graph="pooled_row_only").directory_for("CPU", {"PERFORMANCE_HINT": "LATENCY"}, None)
    assert as_read is not None and rewritten is not None and as_read != rewritten


class RefusesRewrittenIRs:
    """An OpenVINO Core whose compiles of any graph but the IR as read fail, as an NPU compiler may refuse the
    rewritten graph that the CPU takes."""

    def __init__(self, as_read_ops: int):
        self.core, self.as_read_ops, self.refused = ov.Core(), as_read_ops, 0

    def __getattr__(self, name):
        return getattr(self.core, name)

    def compile_model(self, model, device, properties=None):
        if isinstance(model, ov.Model) and len(model.get_ordered_ops()) != self.as_read_ops:
            self.refused += 1
            raise RuntimeError("[ NPU ] the compiler does not support this graph")
        return self.core.compile_model(model, device, properties or {})


def test_a_rewrite_the_device_cannot_compile_is_served_as_read(tiny_model, caplog):
    """The serving compile of the rewritten IR fails: startup serves the IR as read, /readyz's graph says why, and the
    scores are the original IR's."""
    from openvino_reranker.config import load_config
    from openvino_reranker.startup import build_reranker

    as_read = ov.Core().read_model(tiny_model.path / "openvino_model.xml")
    core = RefusesRewrittenIRs(len(as_read.get_ordered_ops()))
    config = load_config(["--device", "CPU", *F32, "--model-dir", str(tiny_model.path), "--cache-dir", ""])
    with caplog.at_level("WARNING"):
        reranker, _, _, parity = build_reranker(config, None, core=core)
    try:
        assert core.refused == 1 and parity.graph.applied is False
        assert "did not compile on CPU" in parity.graph.reason and "compiler does not support" in parity.graph.reason
        assert any("pooled-row rewrite does not compile" in r.getMessage() for r in caplog.records)
        assert parity.max_abs_diff <= EXACT
        scored = reranker.score_pairs("what is the capital of france", ["paris is the capital", "a river"])
        assert np.isfinite(scored.scores).all()
    finally:
        reranker.close()


def test_a_model_deeper_than_the_recursion_limit():
    """The walk down to the model's inputs is iterative: 1,500 row-wise operations above a parameter (a deep model's
    path from its last layer to its inputs is longer than Python's recursion limit) are rewritten, and stay exact."""
    x = ops.parameter([-1, -1, 8], ov.Type.f32, name="x")
    h = x
    for _ in range(1500):
        h = ops.add(h, ops.constant(np.full((8,), 0.001, np.float32)))
    h = ops.matmul(h, ops.constant(np.eye(8, dtype=np.float32) * 0.5), False, False)
    pooled = ops.gather(h, ops.constant(np.array(0, np.int64)), ops.constant(np.array(1, np.int64)))
    model = ov.Model([pooled], [x])
    feed = np.random.default_rng(5).normal(size=(3, 7, 8)).astype(np.float32)
    before = ov.Core().compile_model(model, "CPU", F32_ONE_STREAM)(feed)[0]
    report = pool_row_only(model)
    assert report.applied and report.nodes == 1501 and report.gathers == 1
    after = ov.Core().compile_model(model, "CPU", F32_ONE_STREAM)(feed)[0]
    assert np.abs(after - before).max() <= EXACT
