"""The default model's published IR format, served for real. cross-encoder/ms-marco-MiniLM-L6-v2 publishes in its
`openvino/` folder `openvino_model_qint8_quantized.xml`, made by sentence-transformers'
`export_static_quantized_openvino_model` (NNCF post-training static quantization through optimum-intel's
OVQuantizer), and the service picks that IR first. tests/fixtures/models/tiny-bert-qint8 is a tiny random BERT
cross-encoder exported by that very function (generate.py there), with torch's fp32 logits of its cases and the
logits OpenVINO itself gives the INT8 IR at f32 (`ov_logit`). Published on a local stand-in for the Hub under the
default model's name, it is fetched and served with no --model option, on dynamic shapes and on static buckets."""

import json

import numpy as np
import openvino as ov
import pytest
from fakehub import FakeHub
from support import ROOT
from support.http import request
from support.models import F32
from support.servers import RunningServer

from openvino_reranker.config import DEFAULT_MODEL
from openvino_reranker.encoding import load_tokenizer
from openvino_reranker.modeldir import load_model_files, make_head

FIXTURE = ROOT / "tests" / "fixtures" / "models" / "tiny-bert-qint8"
IR = "openvino/openvino_model_qint8_quantized"
# Served score vs OpenVINO's own f32 run of the same IR, pair by pair: only the batching may differ
OV_TOLERANCE = 1e-4
# Served score vs torch's fp32 score. Measured on this fixture: logits up to 0.22 apart (mean 0.12, on logits of
# std 0.67), scores up to 0.046 apart, the same on dynamic shapes and static buckets. That is the INT8 IR's own error,
# not the service's: OpenVINO's f32 run of the IR is exactly as far from torch. It is large because the model is tiny
# and random: its [CLS] vectors differ little between inputs, and the exporter quantizes activations to 8 bits per
# tensor (calibrated, as it does, on single sentences padded to 384 tokens, not on pairs). With each FakeQuantize
# removed in turn: the int8 weights alone move logits by 0.03, the [CLS] vector's quantizer before the pooler alone
# by 0.23, layer 1's attention input alone by 0.14. A trained MiniLM's logits span about 20, on which such an error
# moves little; here the bound says the INT8 IR scores near torch, and WELL_APART that its ranking holds.
INT8_TOLERANCE = 0.06
# Torch scores further apart than the largest INT8 error keep their order (measured: 4 of the 45 pairs swap, each
# within 0.016 of each other by torch)
WELL_APART = 0.05


def reference() -> dict:
    return json.loads((FIXTURE / "reference.json").read_text(encoding="utf-8"))


def sigmoid(x) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


@pytest.fixture
def hub():
    fake = FakeHub()
    yield fake
    fake.close()


def publish(hub: FakeHub) -> str:
    """The fixture as the default model's Hub repo: its files at the same paths, the IR's weights in LFS."""
    files = {path.relative_to(FIXTURE).as_posix(): path.read_bytes()
             for path in sorted(FIXTURE.rglob("*")) if path.is_file() and path.name != "reference.json"}
    assert f"{IR}.xml" in files and "tokenizer.json" in files
    return hub.add_repo(DEFAULT_MODEL, files, lfs=(f"{IR}.bin",))


def scores_of(port: int, cases: list[dict]) -> np.ndarray:
    """Scores of `cases` in one request through the pairs dialect (a query per document), in the cases' order."""
    pairs = [{"query": c["query"], "passage": c["document"]} for c in cases]
    status, answer = request(port, "POST", "/rerank", pairs)[:2]
    assert status == 200, answer
    return np.array(answer["scores"])


def openvino_scores(cases: list[dict], length: int) -> np.ndarray:
    """The IR run by OpenVINO itself on this machine, each pair alone and unpadded, at the parity reference's f32
    settings. Not the stored `ov_logit`: int8 kernels differ between CPUs (VNNI, AVX2, AMX), so only a run on the
    same CPU is a 1e-4 reference."""
    from openvino_reranker.config import ShapeBucket
    from openvino_reranker.parity import REFERENCE_PROPERTIES

    files = load_model_files(FIXTURE, length)
    model = ov.Core().read_model(str(files.xml))
    head = make_head(files, load_tokenizer(files.tokenizer), model)
    compiled = ov.Core().compile_model(model, "CPU", REFERENCE_PROPERTIES)
    logits = []
    for case in cases:
        encoded = head.encode(case["query"], [case["document"]])
        feed = head.feed(encoded, [0], ShapeBucket(1, int(encoded.lengths[0])))
        logits.append(float(compiled(feed)[compiled.outputs[head.contract.output_index]][0, 0]))
    return sigmoid(logits)


@pytest.mark.parametrize("shapes", ["dynamic", "static"])
def test_the_default_models_int8_ir_is_fetched_and_served_as_openvino_scores_it(hub, tmp_path, shapes):
    ref = reference()
    length, cases = ref["max_length"], ref["cases"]
    commit = publish(hub)
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(tmp_path / "hf"), "HOME": str(tmp_path)}
    args = ["--device", "CPU", *F32, "--cache-dir", "", "--max-length", str(length)]
    if shapes == "static":
        args += ["--shape-mode", "static", "--buckets", f"4x{length},8x{length}"]
    with RunningServer(args, env=env).wait_ready() as srv:
        ready = request(srv.port, "GET", "/readyz")[1]
        assert ready["model"] == DEFAULT_MODEL and ready["model_file"] == f"{IR}.xml"
        assert ready["source"]["commit"] == commit and ready["max_length"] == length
        assert ready["head"]["kind"] == "cross-encoder" and not ready["parity"]["fallback"]
        # the model's reference scores, beside its IR in the repo, were fetched and checked at startup
        assert ready["reference_scores"]["passed"] is True
        assert ready["reference_scores"]["file"].endswith("openvino/reference_scores.json")
        alone = np.array([scores_of(srv.port, [case])[0] for case in cases])  # one pair a batch, no padding
        together = scores_of(srv.port, cases)  # pairs of many lengths padded together
    assert any(r.path.startswith("/blobs/") for r in hub.requests_to("cdn", "GET")), "the IR's .bin came from LFS"

    by_openvino = openvino_scores(cases, length)
    worst = float(max(np.abs(alone - by_openvino).max(), np.abs(together - by_openvino).max()))
    assert worst < OV_TOLERANCE, f"{shapes}: served scores differ from OpenVINO's run of the IR by {worst:.3g}"

    by_torch = np.array([c["score"] for c in cases])
    int8_gap = float(np.abs(together - by_torch).max())
    assert int8_gap < INT8_TOLERANCE, f"{shapes}: served INT8 scores differ from torch fp32 by {int8_gap:.3g}"
    assert int8_gap > 10 * OV_TOLERANCE, "the served scores are torch's: the IR served is not the INT8 one"
    for i, j in zip(*np.triu_indices(len(cases), 1), strict=True):
        if abs(by_torch[i] - by_torch[j]) > WELL_APART:
            assert (together[i] > together[j]) == (by_torch[i] > by_torch[j]), (cases[i]["query"], cases[j]["query"])


def test_the_head_feeds_the_int8_ir_exactly_what_torch_was_fed():
    ref = reference()
    files = load_model_files(FIXTURE, ref["max_length"])
    assert files.xml == FIXTURE / f"{IR}.xml"
    model = ov.Core().read_model(str(files.xml))
    head = make_head(files, load_tokenizer(files.tokenizer), model)
    assert head.kind == "cross-encoder"
    assert sum(len(c["input_ids"]) == ref["max_length"] for c in ref["cases"]) >= 2  # truncated pairs are in
    for case in ref["cases"]:
        encoded = head.encode(case["query"], [case["document"]])
        assert encoded.ids[0].tolist() == case["input_ids"], (case["query"], case["document"][:40])


def test_the_fixture_is_the_exporters_static_int8_format():
    """What sets the published IR apart from an optimum-cli `--weight-format int8` one: activations quantized too
    (FakeQuantize layers calibrated by NNCF), the MatMul weights stored as int8."""
    model = ov.Core().read_model(str(FIXTURE / f"{IR}.xml"))
    ops = [op.get_type_name() for op in model.get_ops()]
    int8_weights = [op for op in model.get_ops() if op.get_type_name() == "Constant"
                    and op.get_element_type() == ov.Type.i8 and len(op.get_shape()) == 2]
    assert ops.count("FakeQuantize") >= 2 * ops.count("ScaledDotProductAttention") > 0
    assert len(int8_weights) >= ops.count("MatMul") > 0
    assert model.get_rt_info(["nncf", "quantization", "preset"]).astype(str) == "mixed"
