"""The model's own reference scores (`reference_scores.json` beside the IR; SPEC.md, "Reference scores"): the file
format, the fixtures' files (converted from the torch scores in their reference.json), and the startup check that
serves them: a wrong prompt template, tokenizer normalizer or padding stops startup with exit 9, a compile whose
served scores miss them falls back down the ladder, and a model without the file costs nothing more."""

import json
import shutil

import numpy as np
import pytest
from support import ROOT
from support.engines import FakeCore
from support.http import request
from support.models import F32
from support.servers import RunningServer

from openvino_reranker import parity
from openvino_reranker.encoding import QWEN3_RERANKER, DecoderRerankerHead, load_tokenizer
from openvino_reranker.errors import EXIT_MODEL, EXIT_REFERENCE_SCORES, EXIT_STARTUP_CHECK
from openvino_reranker.modeldir import load_model_files, make_head
from openvino_reranker.referencescores import (
    FILE_NAME,
    parse_reference_scores,
    reference_scores_json,
    tolerance_for,
)

FIXTURES = ROOT / "tests" / "fixtures" / "models"
# where each fixture's IR, and so its reference_scores.json, is
IR_DIRS = {"tiny-qwen3": "", "tiny-llama": "", "tiny-nemotron": "", "tiny-xlmr": "", "tiny-bert-qint8": "openvino"}
DEFAULT_INSTRUCTIONS = {"tiny-qwen3": QWEN3_RERANKER.default_instruction,
                        "tiny-llama": "Given a question, find passages that answer it"}


def scores_file(name: str):
    return FIXTURES / name / IR_DIRS[name] / FILE_NAME


def serve_args(model, *extra):
    return ["--device", "CPU", "--model", str(model), "--cache-dir", "", *extra]


def readyz(args, core=None) -> dict:
    with RunningServer(args, core=core).wait_ready() as srv:
        return request(srv.port, "GET", "/readyz")[1]


def broken_copy(tmp_path, name: str):
    """A copy of a fixture to break one file of."""
    return shutil.copytree(FIXTURES / name, tmp_path / name)


# ---------------------------------------------------------------------------------------------- the file


def test_the_writer_and_the_reader_agree():
    text = reference_scores_json([("q", "d", None, 0.25), ("q", "e", "judge it", 0.75)], 1e-4, 128,
                                 {"tool": "test"})
    read = parse_reference_scores(text, "x.json")
    assert [(p.query, p.document, p.instruction, p.score) for p in read.pairs] == [
        ("q", "d", None, 0.25), ("q", "e", "judge it", 0.75)]
    assert (read.tolerance, read.max_length, dict(read.produced_by), read.source) == (1e-4, 128, {"tool": "test"},
                                                                                      "x.json")
    assert "instruction" not in json.loads(text)["pairs"][0]


GOOD = json.loads(reference_scores_json([("q", "d", None, 0.5)], 1e-4, None, {"tool": "test"}))


@pytest.mark.parametrize("change, needle", [
    ({"extra": 1}, "unknown field 'extra'"),
    ({"format": "something else"}, "format must be"),
    ({"version": 2}, "version 2 is not supported"),
    ({"score": "logit"}, "score must be 'sigmoid'"),
    ({"tolerance": 0}, "tolerance must be"),
    ({"tolerance": True}, "tolerance must be"),
    ({"max_length": 0}, "max_length must be"),
    ({"produced_by": "me"}, "produced_by must be"),
    ({"pairs": []}, "pairs must be a list of 1 to"),
    ({"pairs": [{"query": "q", "document": "d", "score": 1.5}]}, "pairs[0].score must be"),
    ({"pairs": [{"query": "q", "document": "d", "score": float("nan")}]}, "pairs[0].score must be"),
    ({"pairs": [{"query": " ", "document": "d", "score": 0.5}]}, "pairs[0].query must be"),
    ({"pairs": [{"query": "q", "document": "d", "instruction": "", "score": 0.5}]}, "pairs[0].instruction"),
    ({"pairs": [{"query": "q", "document": "d", "score": 0.5, "logit": 0}]}, "unknown field 'logit' in pairs[0]"),
])
def test_a_malformed_file_is_refused_naming_what_is_wrong(change, needle):
    with pytest.raises(ValueError) as raised:
        parse_reference_scores(json.dumps({**GOOD, **change}))
    assert needle in str(raised.value)


def test_a_malformed_file_beside_the_ir_stops_startup_with_exit_4(tmp_path, capsys):
    model = broken_copy(tmp_path, "tiny-xlmr")
    (model / FILE_NAME).write_text(json.dumps({**GOOD, "version": 7}))
    assert RunningServer(serve_args(model)).wait_exit() == EXIT_MODEL
    assert "version 7 is not supported" in capsys.readouterr().err


@pytest.mark.parametrize("measured, tolerance", [(0.0, 1e-4), (5.6e-7, 1e-4), (1e-4, 2e-4), (3.7e-3, 5e-3),
                                                 (0.0456, 0.06), (0.075, 0.1), (0.08, 0.1)])
def test_tolerance_for_an_export_is_a_quarter_above_what_was_measured_rounded_up(measured, tolerance):
    assert tolerance_for(measured) == tolerance


def test_pairs_are_compared_only_when_truncated_alike():
    lengths, truncated = np.array([10, 60, 64, 64]), np.array([False, False, True, True])
    same = parity.same_truncation
    assert same(lengths, truncated, 64, 64).tolist() == [True, True, True, True]
    assert same(lengths, truncated, 64, 50).tolist() == [True, False, False, False]  # made at 50: 60 was cut there
    assert same(lengths, truncated, 64, 128).tolist() == [True, True, False, False]  # cut here, not there
    assert same(lengths, truncated, 64, None).tolist() == [True, True, False, False]


# ---------------------------------------------------------------------------------------------- the fixtures' files


@pytest.mark.parametrize("name", IR_DIRS)
def test_each_fixtures_file_holds_the_torch_scores_of_its_reference_cases(name):
    """reference_scores.json beside each fixture's IR holds exactly reference.json's cases and torch scores, with
    the instruction a template that takes one was filled with, and the max_length they were made at."""
    reference = json.loads((FIXTURES / name / "reference.json").read_text())
    scores = parse_reference_scores(scores_file(name).read_text())
    assert scores.max_length == reference["max_length"]
    assert [(p.query, p.document, p.instruction, p.score) for p in scores.pairs] == [
        (c["query"], c["document"], c["instruction"] or DEFAULT_INSTRUCTIONS.get(name), c["score"])
        for c in reference["cases"]]
    assert scores.produced_by["tool"] == "tests/fixtures/models/generate.py"
    assert scores.tolerance == tolerance_for(scores.produced_by["ir_f32_max_abs_diff"])
    assert load_model_files(FIXTURES / name, 0).reference_scores.pairs == scores.pairs


@pytest.mark.parametrize("name", IR_DIRS)
def test_every_fixture_passes_its_reference_scores_at_the_default_precision(name):
    """Served as configured (the CPU's default precision, bf16 where it can) at the max_length the scores were
    made at: every pair compared, the exact f32 compile within the file's tolerance, the served one within the
    parity tolerance plus it."""
    scores = parse_reference_scores(scores_file(name).read_text())
    body = readyz(serve_args(FIXTURES / name, "--max-length", str(scores.max_length)))
    checked = body["reference_scores"]
    assert checked["file"] == str(scores_file(name)) and checked["passed"] is True
    assert checked["pairs"] == checked["compared"] == len(scores.pairs)
    assert checked["exact_max_abs_diff"] <= scores.tolerance == checked["file_tolerance"]
    assert checked["max_abs_diff"] <= checked["tolerance"] == pytest.approx(0.02 + scores.tolerance)
    assert body["parity"]["steps"][-1]["reference_scores_max_abs_diff"] == checked["max_abs_diff"]


def test_pairs_truncated_otherwise_at_another_max_length_are_not_compared():
    """tiny-qwen3's scores were made at 160 tokens; served at 512, the pairs cut at 160 then are whole now and
    cannot be compared, and the others still are."""
    checked = readyz(serve_args(FIXTURES / "tiny-qwen3", *F32))["reference_scores"]
    assert checked["pairs"] == 14 and checked["compared"] == 9 and checked["passed"] is True


def test_a_file_none_of_whose_pairs_can_be_compared_is_reported_not_checked(tmp_path, caplog):
    """Scores made at 10 tokens per pair, served at 512: the 40-token pair was cut then and is whole now. Nothing can
    be compared, so nothing is refused, and /readyz says so (`passed` null), as does a warning."""
    model = broken_copy(tmp_path, "tiny-xlmr")
    (model / FILE_NAME).write_text(reference_scores_json(
        [("what is the capital of france", "Paris is the capital and largest city of France.", None, 0.5)], 1e-4, 10,
        {"tool": "test"}))
    checked = readyz(serve_args(model))["reference_scores"]
    assert checked["compared"] == 0 and checked["passed"] is None and checked["max_abs_diff"] is None
    assert "none of its 1 pairs can be compared" in caplog.text


# ---------------------------------------------------------------------------------------------- what it catches


def write_template(model, template: str, **more) -> None:
    (model / "rerank_template.json").write_text(json.dumps({"template": template, **more}))


def break_llama_template(model):
    template = json.loads((model / "rerank_template.json").read_text())
    write_template(model, template["template"].replace("\nRelevant:", "\nRelevant: "),
                   default_instruction=template["default_instruction"], add_special_tokens=True)


def break_nemotron_template(model):
    write_template(model, "query:{query} \n \n passage:{document}", add_special_tokens=True)


def break_qwen3_template(model):
    """A template file that wins over the built-in Qwen3-Reranker one, with "<Passage>" for "<Document>"."""
    write_template(model, QWEN3_RERANKER.template.replace("<Document>: ", "<Passage>: "),
                   default_instruction=QWEN3_RERANKER.default_instruction)


def break_xlmr_normalizer(model):
    """XLM-R's normalizer with a Lowercase step added: every other file is right."""
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["normalizer"]["normalizers"].insert(2, {"type": "Lowercase"})
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))


def break_bert_normalizer(model):
    """The uncased BERT normalizer made cased."""
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["normalizer"]["lowercase"] = False
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))


BREAKAGES = {"llama template": ("tiny-llama", break_llama_template),
             "nemotron template": ("tiny-nemotron", break_nemotron_template),
             "qwen3 template file": ("tiny-qwen3", break_qwen3_template),
             "xlmr normalizer": ("tiny-xlmr", break_xlmr_normalizer),
             "bert normalizer": ("tiny-bert-qint8", break_bert_normalizer)}


@pytest.mark.parametrize("policy", ["fallback", "refuse"])
@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_wrong_template_or_tokenizer_stops_startup_with_exit_9(tmp_path, capsys, breakage, policy):
    """No compile configuration can fix a wrong template or tokenizer, so both policies exit 9 with one line at the
    exact f32 reference compile, before any fallback is tried. The nemotron template's change ("query:" for
    "question:") moves scores by about 0.013, within the 0.02 parity tolerance: only the exact compile's check at
    the file's own tolerance (1e-4) sees it."""
    name, breaks = BREAKAGES[breakage]
    model = broken_copy(tmp_path, name)
    breaks(model)
    core = FakeCore()
    assert RunningServer(serve_args(model, "--on-parity-failure", policy), core=core).wait_exit() == \
        EXIT_REFERENCE_SCORES
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if "error:" in line]) == 1
    assert f"the model's reference scores {model / IR_DIRS[name] / FILE_NAME} disagree with its IR" in err[-1]
    assert "the tokenizer, prompt template, pad id or IR is not what the scores were made with" in err[-1]
    # the configured compile (once per replica) and the reference: no fallback was compiled
    assert core.compiles[-1] == parity.REFERENCE_PROPERTIES and len({str(c) for c in core.compiles[:-1]}) == 1


def test_a_pad_id_that_reaches_the_pooled_token_is_caught(tmp_path, monkeypatch, capsys):
    """A decoder's pad id matters only where padding can reach the token the graph pools: Qwen3's export pools the
    last token that is not pad_token_id, so the head pads on the left, where any id is harmless (a wrong pad id in
    config.json passes, scores unchanged). A head that padded on the right with a wrong pad id would pool padding:
    the reference pairs, scored in padded batches, catch it."""
    model = broken_copy(tmp_path, "tiny-qwen3")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "pad_token_id": 0}))
    args = serve_args(model, "--max-length", "160")
    checked = readyz(args)["reference_scores"]
    assert checked["passed"] is True and checked["exact_max_abs_diff"] < 1e-4  # left: harmless
    monkeypatch.setattr(DecoderRerankerHead, "padding_side", "right")
    assert RunningServer(args).wait_exit() == EXIT_REFERENCE_SCORES
    assert "pad_token_id 0" in capsys.readouterr().err


def token_only_in_reference_pairs(name: str) -> int:
    """A token id that the reference pairs hold and the parity pairs do not."""
    import openvino as ov

    files = load_model_files(FIXTURES / name, 0)
    head = make_head(files, load_tokenizer(files.tokenizer), ov.Core().read_model(str(files.xml)))
    parity_ids = set(np.concatenate(head.encode(parity.PARITY_QUERY, list(parity.PARITY_DOCUMENTS)).ids).tolist())
    pairs = files.reference_scores.pairs
    ids = set(np.concatenate(head.encode([p.query for p in pairs], [p.document for p in pairs]).ids).tolist())
    return min(ids - parity_ids)


def test_a_compile_that_passes_parity_but_misses_the_reference_scores_falls_back(tmp_path):
    """A step must pass both checks. The stand-in corrupts multi-stream compiles only on rows holding a token the
    parity pairs do not hold: the configured compile passes parity, misses the reference scores, and the ladder's
    one-stream step serves."""
    core = FakeCore(corrupt="multi", f32_compute=True, corrupt_rows_with=token_only_in_reference_pairs("tiny-xlmr"))
    body = readyz(serve_args(FIXTURES / "tiny-xlmr", "--performance-hint", "throughput"), core=core)
    configured, one_stream = body["parity"]["steps"]
    assert configured["max_abs_diff"] < 1e-4 and configured["reference_scores_max_abs_diff"] > 0.1
    assert configured["passed"] is False and one_stream["passed"] is True and body["parity"]["step"] == "one_stream"
    assert body["reference_scores"]["max_abs_diff"] == one_stream["reference_scores_max_abs_diff"] < 1e-4


def test_refuse_exits_6_when_the_served_scores_miss_the_reference_scores(capsys):
    core = FakeCore(corrupt="multi", f32_compute=True, corrupt_rows_with=token_only_in_reference_pairs("tiny-xlmr"))
    args = serve_args(FIXTURES / "tiny-xlmr", "--performance-hint", "throughput", "--on-parity-failure", "refuse")
    assert RunningServer(args, core=core).wait_exit() == EXIT_STARTUP_CHECK
    assert "from the model's reference scores" in capsys.readouterr().err


def test_without_the_file_nothing_more_is_scored(tiny_model, monkeypatch):
    """No reference file, no extra work: the reference pairs are never scored, /readyz says null."""

    def never(*args, **kwargs):
        raise AssertionError("reference pairs scored without a reference file")

    monkeypatch.setattr(parity, "score_reference_pairs", never)
    body = readyz(serve_args(tiny_model.path, *F32))
    assert body["reference_scores"] is None and body["parity"]["steps"][0]["reference_scores_max_abs_diff"] is None
