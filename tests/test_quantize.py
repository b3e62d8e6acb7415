"""`openvino-reranker quantize` on the tests' models: the tiny BERT cross-encoder (INT8 weights, built in code) and the
tiny Qwen3 decoder reranker (fp32, exported by optimum-cli). The output IR must quantize activations (FakeQuantize)
and hold INT8 weights, the directory must serve on the CPU with dynamic shapes and static buckets, and the report's
agreement must equal one recomputed here from scores the test computes itself (the numpy forward pass for the tiny
model's original, raw OpenVINO f32 compiles fed one pair at a time otherwise). Small --samples keep it quick."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
from evaldata import write_dataset
from support import ROOT
from support.http import request
from support.models import F32, F32_LATENCY
from support.servers import RunningServer, server_env

from openvino_reranker import quantize
from openvino_reranker.config import ShapeBucket
from openvino_reranker.encoding import DecoderRerankerHead, load_tokenizer
from openvino_reranker.modeldir import load_model_files, make_head
from openvino_reranker.quantize import (
    MAX_HELD_OUT_PAIRS,
    Pair,
    builtin_pairs,
    check_output,
    files_to_copy,
    read_pairs,
    split_pairs,
    spread,
)
from openvino_reranker.ranking import load_evalset, mean_metrics, reranked_order

QWEN3 = ROOT / "tests" / "fixtures" / "models" / "tiny-qwen3"
BERT_QINT8 = ROOT / "tests" / "fixtures" / "models" / "tiny-bert-qint8"
SAMPLES = 24
QUERY = "how does solar power work"
DOCUMENTS = ["solar power is energy from the sun", "the cat and the dog", "paris is the capital of france",
             "water boils at one hundred degrees celsius at sea level"]


def run_quantize(*args, env: dict | None = None) -> tuple[int, str, str]:
    """quantize.main in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = quantize.main([str(a) for a in args], env or {}, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("openvino-reranker quantize: error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------- independent scoring


def exact_compile(xml: Path):
    core = ov.Core()
    return core.compile_model(core.read_model(str(xml)), "CPU", F32_LATENCY)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + np.exp(-x))


def bert_scores(xml: Path, tokenizer_path: Path, pairs: list[Pair], max_length: int) -> np.ndarray:
    """Each pair alone, unpadded, through an f32 compile of the IR, tokenized by tokenizers directly."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.enable_truncation(max_length, strategy="longest_first")
    compiled = exact_compile(xml)
    out = []
    for pair in pairs:
        enc = tokenizer.encode(pair.query, pair.document)
        ids = np.array([enc.ids], dtype=np.int64)
        logits = compiled({"input_ids": ids, "attention_mask": np.ones_like(ids),
                           "token_type_ids": np.array([enc.type_ids], dtype=np.int64)})[0]
        out.append(sigmoid(float(logits[0, 0])))
    return np.array(out)


def decoder_scores(model_dir: Path, pairs: list[Pair]) -> np.ndarray:
    """Each pair alone through an f32 compile of the IR, written by the decoder head's template and left-padded to a
    multiple of 8 tokens as the server pads it (a quantized decoder's score moves a little with its padding)."""
    files = load_model_files(model_dir, 0)
    ir = ov.Core().read_model(str(files.xml))
    head = make_head(files, load_tokenizer(files.tokenizer), ir)
    assert isinstance(head, DecoderRerankerHead)
    compiled = exact_compile(files.xml)
    out = []
    for pair in pairs:
        ids = head.encode(pair.query, [pair.document]).ids[0]
        length = -(-len(ids) // 8) * 8
        feed = {"input_ids": np.full((1, length), head.pad_id, dtype=np.int64),
                "attention_mask": np.zeros((1, length), dtype=np.int64)}
        feed["input_ids"][0, length - len(ids):] = ids
        feed["attention_mask"][0, length - len(ids):] = 1
        logits = compiled(feed)[0]
        out.append(sigmoid(float(logits[0, 0])))
    return np.array(out)


def spearman_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    rank_a, rank_b = np.argsort(np.argsort(-a)), np.argsort(np.argsort(-b))
    n = len(a)
    return 1 - 6 * float(((rank_a - rank_b) ** 2).sum()) / (n * (n * n - 1))


def agreement_by_hand(pairs: list[Pair], original: np.ndarray, quantized: np.ndarray) -> dict:
    queries = list(dict.fromkeys(p.query for p in pairs))
    rho, top1 = [], []
    for query in queries:
        rows = [i for i, p in enumerate(pairs) if p.query == query]
        rho.append(spearman_by_hand(original[rows], quantized[rows]))
        top1.append(float(np.argmax(original[rows]) == np.argmax(quantized[rows])))
    diff = np.abs(original - quantized)
    return {"pairs": len(pairs), "queries": len(queries), "max_abs_diff": diff.max(), "mean_abs_diff": diff.mean(),
            "spearman_mean": np.mean(rho), "spearman_min": min(rho), "top1_mean": np.mean(top1),
            "top1_min": min(top1)}


def assert_report_agrees(report: dict, expected: dict, score_tolerance: float) -> None:
    got = report["agreement"]
    assert got["pairs"] == expected["pairs"] and got["queries"] == expected["queries"]
    assert got["max_abs_diff"] == pytest.approx(expected["max_abs_diff"], abs=score_tolerance)
    assert got["mean_abs_diff"] == pytest.approx(expected["mean_abs_diff"], abs=score_tolerance)
    assert got["spearman"]["mean"] == pytest.approx(expected["spearman_mean"], abs=1e-9)
    assert got["spearman"]["min"] == pytest.approx(expected["spearman_min"], abs=1e-9)
    assert got["top1"]["mean"] == pytest.approx(expected["top1_mean"], abs=1e-9)
    assert got["top1"]["min"] == expected["top1_min"]


# ---------------------------------------------------------------------------------------------- what the IR holds


def low_precision_constant(node) -> str | None:
    """The element type of the Constant a weight input comes from through its decompression, or None (computed)."""
    for _ in range(8):
        kind = node.get_type_name()
        if kind == "Constant":
            return node.get_element_type().get_type_name()
        if kind not in ("Convert", "Multiply", "Subtract", "Reshape", "Transpose", "FakeQuantize"):
            return None
        inputs = [node.input_value(i).get_node() for i in range(node.get_input_size())]
        computed = [n for n in inputs if n.get_type_name() != "Constant"]
        node = computed[0] if len(computed) == 1 else inputs[0] if not computed else None
        if node is None:
            return None
    return None


def weight_types(xml: Path) -> list[str]:
    """The stored type of every MatMul weight (a constant input) in the IR."""
    return weight_types_of(ov.Core().read_model(str(xml)))


def weight_types_of(model) -> list[str]:
    found = []
    for op in model.get_ops():
        if op.get_type_name() == "MatMul":
            found += [t for i in range(2) if (t := low_precision_constant(op.input_value(i).get_node()))]
    return found


def count_ops(xml: Path, kind: str) -> int:
    return sum(op.get_type_name() == kind for op in ov.Core().read_model(str(xml)).get_ops())


# ---------------------------------------------------------------------------------------------- the outputs


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("quantize-eval"), queries=6, documents=40, run_depth=10, seed=5)


@pytest.fixture(scope="module")
def bert_output(tiny_model, eval_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized") / "tiny-int8"
    code, stdout, stderr = run_quantize("--model", tiny_model.path, "--output", out, "--samples", SAMPLES,
                                        "--eval-dataset", eval_data.dataset, "--eval-run", eval_data.run,
                                        "--eval-depth", 10)
    assert code == 0, stderr
    return out, stdout, json.loads((out / "quantization_report.json").read_text())


# Issue 17.2's reference scores file, as the server that checks it at startup reads it: the original model's scores of
# a few pairs and the export's tolerance. The tiny Qwen3 model's are its own f32 scores here, with the fp32 export's
# tolerance, 1e-4, far below what quantizing costs.
REFERENCE_PAIRS = [Pair(QUERY, d) for d in DOCUMENTS] + [Pair("capital of france", "paris is the capital of france")]


def reference_scores_file(scores: np.ndarray) -> dict:
    return {"format": "openvino-reranker reference scores", "version": 1, "score": "sigmoid", "max_length": None,
            "tolerance": 1e-4, "produced_by": {"tool": "tests/test_quantize.py"},
            "pairs": [{"query": p.query, "document": p.document, "score": float(s)}
                      for p, s in zip(REFERENCE_PAIRS, scores, strict=True)]}


@pytest.fixture(scope="module")
def qwen3_source(tmp_path_factory):
    """The tiny Qwen3 fixture with a reference scores file beside its IR and an unknown file of the same kind."""
    import shutil

    source = tmp_path_factory.mktemp("qwen3") / "tiny-qwen3"
    shutil.copytree(QWEN3, source)
    reference = reference_scores_file(decoder_scores(QWEN3, REFERENCE_PAIRS))
    (source / "reference_scores.json").write_text(json.dumps(reference))
    (source / "notes.json").write_text('{"format": "something else", "tolerance": 0.001, "pairs": []}')
    return source


@pytest.fixture(scope="module")
def qwen3_output(qwen3_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized") / "qwen3-int8"
    code, stdout, stderr = run_quantize("--model", qwen3_source, "--output", out, "--samples", SAMPLES)
    assert code == 0, stderr
    return out, stdout, json.loads((out / "quantization_report.json").read_text())


def test_bert_output_quantizes_activations_and_holds_int8_weights(tiny_model, bert_output):
    out, stdout, report = bert_output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "openvino_model.bin", "openvino_model.xml",
                                                     "quantization_report.json", "tokenizer.json"]
    assert count_ops(tiny_model.path / "openvino_model.xml", "FakeQuantize") == 0
    fake_quantize = count_ops(out / "openvino_model.xml", "FakeQuantize")
    assert fake_quantize >= 10  # every linear layer's input but the pooler's, and the attention's
    weights = weight_types(out / "openvino_model.xml")
    assert len(weights) == 14 and set(weights) == {"i8"}, weights  # 2 layers x 6, pooler, classifier
    assert report["quantized_ir"]["ops"] == {"FakeQuantize": fake_quantize}
    assert report["quantized_ir"]["matmuls"]["weights_low_precision"] == 14
    assert report["head"] == "cross-encoder" and report["nncf"]["subset_size"] == SAMPLES
    assert report["nncf"]["weights_decompressed"] == 14
    assert report["calibration"]["samples"] == SAMPLES and report["calibration"]["source"] == "built-in"
    assert f"on {SAMPLES} calibration pairs (built-in)" in stdout and "serve it with" in stdout


def test_decompressed_weights_compute_the_same_function(tiny_model):
    """quantize hands NNCF float weights (so that SmoothQuant can rescale them): the same values as the INT8 ones."""
    core = ov.Core()
    model = core.read_model(str(tiny_model.path / "openvino_model.xml"))
    assert quantize.decompress_weights(model) == 14  # every linear layer: 2 x 6, the pooler, the classifier
    assert weight_types_of(model) == ["f32"] * 14
    assert quantize.decompress_weights(model) == 0
    compiled = core.compile_model(model, "CPU", F32_LATENCY)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_model.path / "tokenizer.json"))
    for document in DOCUMENTS:
        enc = tokenizer.encode(QUERY, document)
        ids = np.array([enc.ids])
        logit = compiled({"input_ids": ids, "attention_mask": np.ones_like(ids),
                          "token_type_ids": np.array([enc.type_ids])})[0][0, 0]
        assert sigmoid(float(logit)) == pytest.approx(tiny_model.reference_scores(QUERY, [document])[0], abs=1e-5)


def test_decoder_output_quantizes_the_fp32_weights_and_activations(qwen3_output):
    out, _, report = qwen3_output
    assert set(weight_types(QWEN3 / "openvino_model.xml")) == {"f32"}  # so the INT8 below is quantize's doing
    weights = weight_types(out / "openvino_model.xml")
    assert weights.count("i8") >= len(weights) - 1, weights  # NNCF may keep the last (score) projection in float
    assert count_ops(out / "openvino_model.xml", "FakeQuantize") >= 8
    assert report["head"] == "decoder" and report["nncf"]["weights_decompressed"] == 0
    files = load_model_files(out, 0)
    assert files.head_kind == "decoder" and files.model_type == "qwen3"  # config.json came along: built-in template
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "reference.json"):
        assert (out / name).read_bytes() == (QWEN3 / name).read_bytes()
    assert sorted(report["files"]["copied"]) == ["config.json", "notes.json", "reference.json",
                                                 "reference_scores.json", "tokenizer.json", "tokenizer_config.json"]


def test_copied_reference_scores_get_a_tolerance_that_covers_the_quantization(qwen3_source, qwen3_output):
    """The server checks reference_scores.json against an exact f32 run of the IR it serves: copied unchanged, the
    fp32 export's 1e-4 would stop the quantized model's start. The scores stay the original model's."""
    out, _, report = qwen3_output
    before = json.loads((qwen3_source / "reference_scores.json").read_text())
    after = json.loads((out / "reference_scores.json").read_text())
    quantized = decoder_scores(out, REFERENCE_PAIRS)
    distance = float(np.abs(quantized - [p["score"] for p in before["pairs"]]).max())
    assert distance > 10 * before["tolerance"]  # the copy as it was would fail the server's check
    assert distance <= after["tolerance"] <= 2 * distance
    assert after["pairs"] == before["pairs"]
    assert {k: v for k, v in after.items() if k not in ("tolerance", "produced_by")} == \
        {k: v for k, v in before.items() if k not in ("tolerance", "produced_by")}
    assert after["produced_by"]["tool"] == "tests/test_quantize.py"
    assert after["produced_by"]["quantized"]["tolerance_before"] == 1e-4
    assert report["reference_scores"]["compared"] == len(REFERENCE_PAIRS)
    assert report["reference_scores"]["tolerance"] == after["tolerance"]
    assert (out / "notes.json").read_bytes() == (qwen3_source / "notes.json").read_bytes()  # not ours: as it was


def test_padding_does_not_move_a_quantized_decoder_score(qwen3_output):
    """Left padding moves a decoder's rotary positions; with the rotated queries and keys quantized, that moved
    scores (7e-3 in the logit here), so quantize leaves attention's inputs in float for left-padded heads."""
    out, _, report = qwen3_output
    assert report["nncf"]["ignored_types"] == ["ScaledDotProductAttention"]
    files = load_model_files(out, 0)
    ir = ov.Core().read_model(str(files.xml))
    head = make_head(files, load_tokenizer(files.tokenizer), ir)
    compiled = exact_compile(files.xml)
    encoded = head.encode(QUERY, DOCUMENTS)
    longest = int(encoded.lengths.max())
    alone = [float(compiled(head.feed(encoded, [i], ShapeBucket(1, int(encoded.lengths[i]))))[0][0, 0])
             for i in range(len(DOCUMENTS))]
    padded = compiled(head.feed(encoded, list(range(len(DOCUMENTS))), ShapeBucket(len(DOCUMENTS), longest + 8)))[0]
    assert np.abs(np.array(alone) - padded[:, 0]).max() < 1e-5


def test_bert_report_matches_a_recomputation(tiny_model, bert_output):
    out, _, report = bert_output
    _, held_out = split_pairs(builtin_pairs())
    original = np.concatenate([tiny_model.reference_scores(q, [p.document for p in held_out if p.query == q])
                               for q in dict.fromkeys(p.query for p in held_out)])
    ordered = [p for q in dict.fromkeys(p.query for p in held_out) for p in held_out if p.query == q]
    quantized = bert_scores(out / "openvino_model.xml", out / "tokenizer.json", ordered, 128)
    expected = agreement_by_hand(ordered, original, quantized)
    assert expected["max_abs_diff"] > 1e-3  # the quantized model does score differently: the comparison means something
    assert_report_agrees(report, expected, 1e-4)


def test_decoder_report_matches_a_recomputation(qwen3_output):
    out, _, report = qwen3_output
    _, held_out = split_pairs(builtin_pairs())
    original, quantized = decoder_scores(QWEN3, held_out), decoder_scores(out, held_out)
    expected = agreement_by_hand(held_out, original, quantized)
    assert expected["max_abs_diff"] > 1e-3
    assert_report_agrees(report, expected, 1e-4)


def test_eval_deltas_match_a_recomputation(tiny_model, bert_output, eval_data):
    out, stdout, report = bert_output
    evalset = load_evalset(eval_data.dataset, eval_data.run, "test", 10)
    original, quantized = {}, {}
    for query_id, query in evalset.queries.items():
        docs = [d for d in evalset.candidates(query_id) if evalset.documents[d]]
        texts = [evalset.documents[d] for d in docs]
        original[query_id] = dict(zip(docs, tiny_model.reference_scores(query, texts), strict=True))
        quantized[query_id] = dict(zip(docs, bert_scores(out / "openvino_model.xml", out / "tokenizer.json",
                                                         [Pair(query, t) for t in texts], 128), strict=True))

    def metrics(scores):
        return mean_metrics({q: reranked_order(evalset.first_stage[q], scores[q]) for q in evalset.queries},
                            evalset.qrels)

    before, after = metrics(original), metrics(quantized)
    assert report["eval"]["queries"] == len(evalset.queries)
    for name, values in report["eval"]["metrics"].items():
        assert values["original"] == pytest.approx(before[name], abs=1e-9), name
        assert values["quantized"] == pytest.approx(after[name], abs=1e-9), name
        assert values["delta"] == pytest.approx(after[name] - before[name], abs=1e-9), name
    assert "eval on 6 queries" in stdout


@pytest.mark.parametrize("shape_mode", ["dynamic", "static"])
@pytest.mark.parametrize("which", ["bert", "qwen3"])
def test_the_output_serves(which, shape_mode, request_fixture):
    out, _, _ = request_fixture(f"{which}_output")
    with RunningServer(["--device", "CPU", *F32, "--model", str(out), "--cache-dir", "", "--shape-mode",
                        shape_mode]) as server:
        server.wait_ready()
        status, body, _ = request(server.port, "POST", "/rerank", {"query": QUERY, "documents": DOCUMENTS})
        assert status == 200, body
        served = np.array([r["score"] for r in sorted(body["results"], key=lambda r: r["index"])])
        _, readyz, _ = request(server.port, "GET", "/readyz")
    pairs = [Pair(QUERY, d) for d in DOCUMENTS]
    expected = bert_scores(out / "openvino_model.xml", out / "tokenizer.json", pairs, 128) if which == "bert" \
        else decoder_scores(out, pairs)
    assert np.abs(served - expected).max() < 1e-4
    assert readyz["shape_mode"] == shape_mode and (readyz["buckets"] is not None) == (shape_mode == "static")
    assert readyz["model_file"].endswith("openvino_model.xml") and readyz["parity"]["fallback"] is False


@pytest.fixture
def request_fixture(request):
    return request.getfixturevalue


def test_a_hub_model_is_fetched_as_the_server_fetches_it(tiny_model, tmp_path):
    from fakehub import FakeHub

    hub = FakeHub()
    try:
        files = {p.name: p.read_bytes() for p in tiny_model.path.iterdir() if p.is_file()}
        commit = hub.add_repo("org/tiny-reranker", files, lfs=("openvino_model.bin",))
        published = {p.relative_to(BERT_QINT8).as_posix(): p.read_bytes() for p in BERT_QINT8.rglob("*")
                     if p.is_file()}
        hub.add_repo("cross-encoder/ms-marco-MiniLM-L6-v2", published)
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(tmp_path / "hf"), "HOME": str(tmp_path)}
        code, _, stderr = run_quantize("--model", "org/tiny-reranker", "--output", tmp_path / "out", "--samples", 4,
                                       env=env)
        assert code == 0, stderr
        report = json.loads((tmp_path / "out" / "quantization_report.json").read_text())
        assert report["source"]["repo"] == "org/tiny-reranker" and report["source"]["commit"] == commit
        assert (tmp_path / "out" / "tokenizer.json").read_bytes() == files["tokenizer.json"]
        # the default model's repo: the server picks its fully quantized IR first, which is no source for quantize
        code, _, stderr = run_quantize("--model", "cross-encoder/ms-marco-MiniLM-L6-v2", "--output",
                                       tmp_path / "out2", env=env)
        assert code == 4 and "--model-file" in error_line(stderr)
    finally:
        hub.close()


# ---------------------------------------------------------------------------------------------- refusals


def test_an_ir_that_is_quantized_already_is_refused(tmp_path):
    code, _, stderr = run_quantize("--model", BERT_QINT8, "--output", tmp_path / "out")
    assert code == 4
    line = error_line(stderr)
    assert "quantized already" in line and "--model-file" in line and "openvino/openvino_model.xml" in line
    assert not (tmp_path / "out").exists()


def test_a_bad_calibration_line_is_named(tiny_model, tmp_path):
    calibration = tmp_path / "pairs.jsonl"
    calibration.write_text('{"query": "a", "document": "b"}\n\n{"query": "c", "document": ""}\n')
    code, stdout, stderr = run_quantize("--model", tiny_model.path, "--output", tmp_path / "out", "--calibration",
                                        calibration)
    assert code == 2 and not stdout
    assert error_line(stderr).endswith(f'{calibration} line 3: "document" must be a non-empty string')


@pytest.mark.parametrize("args, message", [
    (["--samples", "0"], "--samples"),
    (["--eval-dataset", "x"], "--eval-dataset and --eval-run go together"),
    (["--calibration", "/nonexistent/pairs.jsonl"], "does not exist"),
])
def test_bad_arguments_exit_2(tiny_model, tmp_path, args, message):
    code, _, stderr = run_quantize("--model", tiny_model.path, "--output", tmp_path / "out", *args)
    assert code == 2 and message in error_line(stderr)


def test_a_non_empty_output_is_refused_unless_an_earlier_output(tiny_model, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    code, _, stderr = run_quantize("--model", tiny_model.path, "--output", taken)
    assert code == 2 and "not empty" in error_line(stderr)
    assert (taken / "notes.txt").read_text() == "mine"
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "quantization_report.json").write_text(json.dumps({"produced_by": "openvino-reranker quantize"}))
    check_output(earlier, tiny_model.path)  # no exception: it is replaced
    with pytest.raises(quantize.QuantizeError):
        check_output(tiny_model.path, tiny_model.path)


def test_an_earlier_output_is_replaced_whole(tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "quantization_report.json").write_text(json.dumps({"produced_by": "openvino-reranker quantize"}))
    (out / "rerank_template.json").write_text("{}")  # from another model: must not survive
    code, _, stderr = run_quantize("--model", tiny_model.path, "--output", out, "--samples", 4)
    assert code == 0, stderr
    assert not (out / "rerank_template.json").exists()
    assert json.loads((out / "quantization_report.json").read_text())["calibration"]["samples"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left


def test_an_output_that_cannot_be_written_fails_before_calibrating(tiny_model, tmp_path):
    (tmp_path / "a-file").write_text("")
    code, _, stderr = run_quantize("--model", tiny_model.path, "--output", tmp_path / "a-file" / "out")
    assert code == 2 and "cannot write" in error_line(stderr) and "calibrating" not in stderr


def test_missing_nncf_is_one_line_naming_the_extra(tiny_model, tmp_path):
    script = ("import sys; sys.modules['nncf'] = None; from openvino_reranker.startup import main; "
              f"sys.exit(main(['quantize', '--model', {str(tiny_model.path)!r}, '--output', "
              f"{str(tmp_path / 'out')!r}]))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=server_env())
    assert done.returncode == 3
    assert "pip install '.[quantize]'" in error_line(done.stderr) and not done.stdout


def test_the_server_does_not_import_nncf_and_quantize_sends_no_telemetry():
    script = ("import sys; import openvino_reranker.startup; assert 'nncf' not in sys.modules, 'nncf imported'; "
              "from unittest.mock import MagicMock; from openvino_reranker.quantize import import_nncf; "
              "import_nncf(); from nncf.telemetry.wrapper import telemetry; "
              "assert isinstance(telemetry, MagicMock), type(telemetry); "
              "assert 'openvino_telemetry' not in sys.modules or sys.modules['openvino_telemetry'] is not None")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=server_env())
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------------- pure pieces


def test_read_pairs():
    assert read_pairs(['{"query": "q", "document": "d", "id": 7}', "  "], "f") == [Pair("q", "d")]
    for line, message in (("[1]", "not a JSON object"), ("{", "not JSON"), ('{"query": "q"}', '"document"'),
                          ('{"query": 1, "document": "d"}', '"query"')):
        with pytest.raises(ValueError, match=message):
            read_pairs([line], "f")
    with pytest.raises(ValueError, match="holds no pairs"):
        read_pairs([""], "f")


def test_split_is_deterministic_by_query_and_bounded():
    pairs = builtin_pairs()
    calibration, held_out = split_pairs(pairs)
    assert (calibration, held_out) == split_pairs(list(pairs))
    assert not {p.query for p in calibration} & {p.query for p in held_out}
    assert len(calibration) + len(held_out) == len(pairs) and 0 < len(held_out) <= MAX_HELD_OUT_PAIRS
    assert split_pairs(list(reversed(pairs)))[1] == list(reversed(held_out))  # by query text, not by position
    many = [Pair(f"query {i}", f"document {j}") for i in range(4000) for j in range(5)]
    assert len(split_pairs(many)[1]) == MAX_HELD_OUT_PAIRS
    two = [Pair("a", "x"), Pair("b", "y")]
    calibration, held_out = split_pairs(two)
    assert len(calibration) == len(held_out) == 1
    with pytest.raises(quantize.QuantizeError, match="at least 2 distinct queries"):
        split_pairs([Pair("a", "x"), Pair("a", "y")])


def test_spread_takes_evenly_from_the_whole_sequence():
    assert spread(list(range(10)), 3) == [0, 4, 9] or spread(list(range(10)), 3) == [0, 5, 9]
    assert spread(list(range(3)), 5) == [0, 1, 2]


def test_files_beside_an_ir_in_openvino_come_to_the_root(tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(BERT_QINT8, model)
    from openvino_reranker.referencescores import reference_scores_json

    (model / "openvino" / "reference_scores.json").write_text(
        reference_scores_json([("q", "d", None, 0.5)], 0.5, None, {"by": "this test"}))
    (model / "reference_scores.json").write_text('{"stale": true}')
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "onnx").mkdir()
    (model / "onnx" / "model.onnx").write_bytes(b"onnx")
    files = load_model_files(model, 0)
    copies, left_out = files_to_copy(files)
    assert sorted(copies) == ["config.json", "reference.json", "reference_scores.json", "tokenizer.json",
                              "tokenizer_config.json"]
    assert copies["reference_scores.json"] == model / "openvino" / "reference_scores.json"
    assert "model.safetensors" in left_out and "openvino/openvino_model_qint8_quantized.bin" in left_out


def test_the_builtin_set_ships_with_the_package_and_is_what_the_tool_writes(tmp_path):
    pairs = builtin_pairs()
    assert len(pairs) >= 300 and len({p.query for p in pairs}) >= 100
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'openvino_reranker = ["calibration_pairs.jsonl"]' in pyproject
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_calibration_pairs.py"), str(tmp_path / "p.jsonl")],
                   check=True, capture_output=True)
    assert (tmp_path / "p.jsonl").read_bytes() == (ROOT / "openvino_reranker" / "calibration_pairs.jsonl").read_bytes()


def test_a_static_ir_is_calibrated_at_its_own_shape(tiny_model, tmp_path):
    import shutil

    static = tmp_path / "static"
    shutil.copytree(tiny_model.path, static, ignore=shutil.ignore_patterns("openvino_model.*"))
    core = ov.Core()
    model = core.read_model(str(tiny_model.path / "openvino_model.xml"))
    model.reshape({name: [2, 64] for name in ("input_ids", "attention_mask", "token_type_ids")})
    ov.save_model(model, str(static / "openvino_model.xml"), compress_to_fp16=False)
    code, _, stderr = run_quantize("--model", static, "--output", tmp_path / "out", "--samples", 4)
    assert code == 2 and error_line(stderr).endswith("static shape 2x64, shorter than max_length 128: pass "
                                                     "--max-length 64")
    code, _, stderr = run_quantize("--model", static, "--output", tmp_path / "out", "--samples", 4, "--max-length", 64)
    assert code == 0, stderr
    quantized = core.read_model(str(tmp_path / "out" / "openvino_model.xml"))
    assert quantized.input("input_ids").get_partial_shape().to_shape() == [2, 64]
    assert count_ops(tmp_path / "out" / "openvino_model.xml", "FakeQuantize") > 0
