"""Model families against torch: tiny random Qwen3 and Llama seq-cls rerankers and an XLM-R cross-encoder exported
with optimum-cli, and a nemotron-style bidirectional Llama exported by tools/export_nemotron.py, each committed
with the torch reference scores of its cases (tests/fixtures/models/generate.py makes them all). The head must
feed exactly the ids torch was fed, and the served scores must match torch's within SCORE_TOLERANCE, on dynamic
shapes and on static buckets, one pair alone and in padded batches."""

import json
from pathlib import Path

import numpy as np
import pytest
from support import ROOT
from support.http import request
from support.models import F32, SCORE_TOLERANCE
from support.servers import RunningServer

from openvino_reranker.encoding import load_tokenizer
from openvino_reranker.modeldir import load_model_files, make_head

FIXTURES = ROOT / "tests" / "fixtures" / "models"
FAMILIES = {"tiny-qwen3": "decoder", "tiny-llama": "decoder", "tiny-nemotron": "decoder",
            "tiny-xlmr": "cross-encoder"}


def reference(name: str) -> dict:
    return json.loads((FIXTURES / name / "reference.json").read_text())


def head_for(name: str):
    import openvino as ov

    ref = reference(name)
    files = load_model_files(FIXTURES / name, ref["max_length"])
    model = ov.Core().read_model(str(files.xml))
    return make_head(files, load_tokenizer(files.tokenizer), model), ref


@pytest.mark.parametrize("name", FAMILIES)
def test_the_head_feeds_exactly_what_torch_was_fed(name):
    head, ref = head_for(name)
    assert head.kind == FAMILIES[name]
    for case in ref["cases"]:
        encoded = head.encode(case["query"], [case["document"]], instruction=case.get("instruction"))
        assert encoded.ids[0].tolist() == case["input_ids"], (case["query"], case["document"][:40])


def groups(ref: dict):
    """Cases by (query, instruction): one request each, all its documents together (so batches pad)."""
    out: dict[tuple, list] = {}
    for case in ref["cases"]:
        out.setdefault((case["query"], case.get("instruction")), []).append(case)
    return out.items()


def served_scores(port: int, query: str, instruction: str | None, cases: list) -> np.ndarray:
    body = {"query": query, "documents": [c["document"] for c in cases]}
    if instruction is not None:
        body["instruction"] = instruction
    status, answer = request(port, "POST", "/rerank", body)[:2]
    assert status == 200, answer
    return np.array([r["score"] for r in sorted(answer["results"], key=lambda r: r["index"])])


def all_cases_in_one_request(port: int, ref: dict) -> tuple[np.ndarray, np.ndarray]:
    """Every case without an instruction in one request (pairs of many lengths padded together), through the pairs
    dialect (a query per document)."""
    cases = [c for c in ref["cases"] if c.get("instruction") is None]
    pairs = [{"query": c["query"], "passage": c["document"]} for c in cases]
    status, answer = request(port, "POST", "/rerank", pairs)[:2]
    assert status == 200, answer
    return np.array(answer["scores"]), np.array([c["score"] for c in cases])


@pytest.mark.parametrize("shapes", ["dynamic", "static"])
@pytest.mark.parametrize("name", FAMILIES)
def test_served_scores_match_torch(name, shapes, tmp_path):
    ref = reference(name)
    length = ref["max_length"]
    args = ["--device", "CPU", *F32, "--model", str(FIXTURES / name), "--max-length", str(length),
            "--cache-dir", ""]
    if shapes == "static":
        args += ["--shape-mode", "static", "--buckets", f"3x{length},8x{length}"]
    with RunningServer(args).wait_ready() as srv:
        ready = request(srv.port, "GET", "/readyz")[1]
        assert ready["head"]["kind"] == FAMILIES[name] and ready["max_length"] == length
        worst = 0.0
        for (query, instruction), cases in groups(ref):
            got = served_scores(srv.port, query, instruction, cases)
            worst = max(worst, float(np.abs(got - np.array([c["score"] for c in cases])).max()))
            alone = served_scores(srv.port, query, instruction, cases[:1])  # one pair, no padding
            worst = max(worst, abs(float(alone[0]) - cases[0]["score"]))
        got, expected = all_cases_in_one_request(srv.port, ref)
        worst = max(worst, float(np.abs(got - expected).max()))
    assert worst < SCORE_TOLERANCE, f"{name} {shapes}: served scores differ from torch by {worst:.3g}"


def test_a_qwen3_reranker_is_served_with_its_built_in_template_and_no_flag():
    files = load_model_files(FIXTURES / "tiny-qwen3", 0)
    assert files.template is not None and files.template.source.startswith("built-in")
    assert not (Path(files.model_dir) / "rerank_template.json").exists()


def test_chunking_and_instructions_work_with_a_decoder_head():
    ref = reference("tiny-qwen3")
    long_case = max(ref["cases"], key=lambda c: len(c["document"]))
    args = ["--device", "CPU", *F32, "--model", str(FIXTURES / "tiny-qwen3"), "--max-length", "160",
            "--cache-dir", "", "--instruction", "Judge whether the passage is relevant to the question"]
    with RunningServer(args).wait_ready() as srv:
        status, body = request(srv.port, "POST", "/rerank", {"query": long_case["query"], "max_chunks_per_doc": 50,
                                                              "documents": [long_case["document"]]})[:2]
        assert status == 200 and body["results"][0]["chunks"] > 1 and not body["results"][0]["truncated"]
        ready = request(srv.port, "GET", "/readyz")[1]
        assert ready["head"]["default_instruction"] == "Judge whether the passage is relevant to the question"
        # the configured instruction is the default; a request's own wins; the reference case with that
        # instruction scores the same either way
        case = next(c for c in ref["cases"] if (c.get("instruction") or "").startswith("Judge"))
        by_default = served_scores(srv.port, case["query"], None, [case])[0]
        named = served_scores(srv.port, case["query"], case["instruction"], [case])[0]
        assert abs(by_default - case["score"]) < SCORE_TOLERANCE and by_default == named
        other = served_scores(srv.port, case["query"], "Find recipes", [case])[0]
        assert abs(other - case["score"]) > SCORE_TOLERANCE  # the instruction does reach the model
