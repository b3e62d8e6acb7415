"""The decoder-reranker head on its own: prompt templates, truncation that keeps the template whole, left padding,
and which head and template a model directory calls for. Served scores against torch are in test_model_families.py."""

import json
import logging

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_encoding import CORPUS, TEXTS

from openvino_reranker.config import ShapeBucket, load_config
from openvino_reranker.encoding import (
    QWEN3_RERANKER,
    DecoderRerankerHead,
    EncodedPairs,
    ModelContract,
    PromptTemplate,
    pad_pairs,
)
from openvino_reranker.errors import EXIT_CONFIG, EXIT_MODEL, PayloadTooLargeError, StartupError
from openvino_reranker.modeldir import load_model_files, static_buckets_for
from openvino_reranker.scoring import Truncation

DECODER_CONTRACT = ModelContract(("input_ids", "attention_mask"), 1)


def qwen_like_tokenizer():
    """Byte-level BPE with Qwen's chat special tokens, trained here on a few sentences (no special tokens added
    around a text, as Qwen's tokenizer)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS + [QWEN3_RERANKER.template] * 5, trainers.BpeTrainer(
        vocab_size=1200, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    return tok


@pytest.fixture(scope="module")
def tokenizer():
    return qwen_like_tokenizer()


def qwen_head(tokenizer, max_length, template=QWEN3_RERANKER):
    pad = tokenizer.token_to_id("<|endoftext|>")
    return DecoderRerankerHead(tokenizer, max_length, DECODER_CONTRACT, template, pad)


# ---- templates

@pytest.mark.parametrize("data, needle", [
    ({"template": "{query} {document}", "extra": 1}, "unknown field 'extra'"),
    ({"template": "{query}"}, "{document} exactly once"),
    ({"template": "{query} {document} {document}"}, "{document} exactly once (it holds it 2 times)"),
    ({"template": "{instruction} {query} {document}"}, "needs a default_instruction"),
    ({"template": 3}, "template must be a string"),
    ({"template": "{query} {document}", "add_special_tokens": "yes"}, "true or false"),
    ([1], "not a JSON object"),
])
def test_a_bad_template_file_says_what_is_wrong(data, needle):
    with pytest.raises(ValueError, match=needle.replace("{", r"\{").replace("}", r"\}").replace("(", r"\(")
                       .replace(")", r"\)")):
        PromptTemplate.from_json(json.dumps(data), "t.json")


def test_fill_puts_values_in_once_and_reports_their_spans():
    template = PromptTemplate("I: {instruction}\nQ: {query}\nD: {document}!", "find it").checked()
    text, q, d = template.fill("what {document}?", "the {query} doc")
    assert text == "I: find it\nQ: what {document}?\nD: the {query} doc!"
    assert text[q[0]:q[1]] == "what {document}?" and text[d[0]:d[1]] == "the {query} doc"
    assert template.fill("q", "d", "my own")[0].startswith("I: my own\n")


# ---- encoding

def test_short_pairs_are_the_whole_template_tokenized(tokenizer):
    head = qwen_head(tokenizer, 256)
    text, _, _ = QWEN3_RERANKER.fill("solar power", "energy from the sun")
    encoded = head.encode("solar power", ["energy from the sun"])
    assert encoded.ids[0].tolist() == tokenizer.encode(text, add_special_tokens=False).ids
    assert not encoded.truncated[0] and encoded.type_ids[0].sum() == 0


def template_ends(tokenizer):
    before, after = QWEN3_RERANKER.template.split("{document}")
    tail = tokenizer.encode(after, add_special_tokens=False).ids
    head_ids = tokenizer.encode(before.split("<Instruct>")[0], add_special_tokens=False).ids
    return head_ids, tail


def test_a_long_document_loses_its_end_and_the_template_stays_whole(tokenizer):
    head = qwen_head(tokenizer, 160)
    document = " ".join(["the cat sat on the mat near the door"] * 40) + " ENDMARK"
    encoded = head.encode("where is the cat", [document])
    ids = encoded.ids[0].tolist()
    prefix, suffix = template_ends(tokenizer)
    assert len(ids) == 160 and encoded.truncated[0]
    assert ids[:len(prefix)] == prefix and ids[-len(suffix):] == suffix
    assert "ENDMARK" not in tokenizer.decode(ids) and "where is the cat" in tokenizer.decode(ids)
    left = head.encode("where is the cat", [document], Truncation(side="left")).ids[0].tolist()
    assert len(left) == 160 and left[-len(suffix):] == suffix and "ENDMARK" in tokenizer.decode(left)


def test_a_query_too_long_for_the_pair_is_cut_at_its_end_after_the_whole_document(tokenizer):
    head = qwen_head(tokenizer, 140)
    query = " ".join(["water boils at one hundred degrees"] * 30)
    ids = head.encode(query, ["solar power"]).ids[0].tolist()
    _, suffix = template_ends(tokenizer)
    assert len(ids) == 140 and ids[-len(suffix):] == suffix
    assert "\n<Document>:" in tokenizer.decode(ids) and "solar" not in tokenizer.decode(ids)


def test_an_instruction_too_long_for_max_length_is_a_413(tokenizer):
    head = qwen_head(tokenizer, 140)
    with pytest.raises(PayloadTooLargeError, match="instruction"):
        head.encode("q", ["d"], instruction=" ".join(["solar power is energy from the sun"] * 20))


def test_a_max_length_that_cannot_hold_the_template_stops_startup(tokenizer):
    with pytest.raises(StartupError, match="cannot hold the prompt template") as err:
        qwen_head(tokenizer, 40)
    assert err.value.exit_code == EXIT_CONFIG


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=TEXTS.filter(lambda t: t.strip()), text=TEXTS.filter(lambda t: t.strip()),
       max_length=st.sampled_from([110, 150]), side=st.sampled_from(["right", "left"]))
def test_cutting_long_texts_first_changes_no_token_kept(tokenizer, query, text, max_length, side):
    """The head cuts a document to max_length words before tokenizing; the result must be what dropping the
    document's tokens from the whole pair would give."""
    head = qwen_head(tokenizer, max_length)
    got = head.encode(query, [text], Truncation(side=side)).ids[0].tolist()
    full, query_span, doc_span = QWEN3_RERANKER.fill(query, text)
    enc = tokenizer.encode(full, add_special_tokens=False)
    excess = len(enc.ids) - max_length
    expected = enc.ids if excess <= 0 else \
        np.delete(enc.ids, DecoderRerankerHead._drop(enc, doc_span, query_span, excess, side)).tolist()
    assert got == expected


# ---- padding

def test_decoder_heads_pad_on_the_left_with_the_pad_id():
    encoded = EncodedPairs([np.array([5, 6, 7]), np.array([8])], [np.zeros(3, np.int64), np.zeros(1, np.int64)],
                           np.array([3, 1]), np.array([False, False]))
    feed = pad_pairs(encoded, [0, 1], ShapeBucket(3, 4), ("input_ids", "attention_mask"), 9, side="left")
    assert feed["input_ids"].tolist() == [[9, 5, 6, 7], [9, 9, 9, 8], [9, 9, 9, 8]]
    assert feed["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 1]]


# ---- which head, which template

def write_model(path, config=None, template=None, tokenizer_config=None):
    path.mkdir(parents=True, exist_ok=True)
    for name in ("openvino_model.xml", "openvino_model.bin", "tokenizer.json"):
        (path / name).write_text("x")
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if template is not None:
        (path / "rerank_template.json").write_text(template if isinstance(template, str) else json.dumps(template))
    if tokenizer_config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return path


def test_qwen3_gets_the_built_in_template_and_bert_none(tmp_path):
    qwen = load_model_files(write_model(tmp_path / "q", {"model_type": "qwen3", "pad_token_id": 3,
                                                         "max_position_embeddings": 40960}), 0)
    assert qwen.template is QWEN3_RERANKER and qwen.head_kind == "decoder" and qwen.pad_token_id == 3
    assert qwen.max_length == 512  # the default cap, not the model's 40960
    assert load_model_files(tmp_path / "q", 2048).max_length == 2048
    bert = load_model_files(write_model(tmp_path / "b", {"model_type": "bert"}), 0)
    assert bert.template is None and bert.head_kind == "cross-encoder"


def test_a_template_file_beside_the_ir_wins_and_a_flag_wins_over_it(tmp_path):
    own = {"template": "question:{query} \n \n passage:{document}", "add_special_tokens": True}
    files = load_model_files(write_model(tmp_path / "m", {"model_type": "qwen3"}, own), 0)
    assert files.template.template == own["template"] and files.template.add_special_tokens
    flag = tmp_path / "flag.json"
    flag.write_text(json.dumps({"template": "Q {query} D {document}"}))
    assert load_model_files(tmp_path / "m", 0, template_path=str(flag)).template.template == "Q {query} D {document}"


@pytest.mark.parametrize("config, template, flag, needle, code", [
    ({"model_type": "llama"}, None, False, "decoder: it needs its prompt template", EXIT_MODEL),
    ({"model_type": "llama"}, "{not json", False, "rerank_template.json: not valid JSON", EXIT_MODEL),
    ({"model_type": "llama"}, {"template": "{query}"}, True, "exactly once", EXIT_CONFIG),
    ({"model_type": "bert"}, None, True, "cannot read prompt template", EXIT_CONFIG),
])
def test_template_problems_are_one_line(tmp_path, config, template, flag, needle, code):
    root = write_model(tmp_path / "m", config, None if flag else template)
    path = ""
    if flag:
        path = str(tmp_path / "flag.json")
        if template is not None:
            (tmp_path / "flag.json").write_text(json.dumps(template))
    with pytest.raises(StartupError, match=needle) as err:
        load_model_files(root, 0, template_path=path)
    assert err.value.exit_code == code


def test_roberta_positions_leave_out_the_pad_offset(tmp_path):
    root = write_model(tmp_path / "x", {"model_type": "xlm-roberta", "max_position_embeddings": 514,
                                        "pad_token_id": 1})
    assert load_model_files(root, 512).max_length == 512
    with pytest.raises(StartupError, match="limit of 512"):
        load_model_files(root, 514)


def test_the_ir_is_picked_int8_first_or_as_named(tmp_path):
    root = write_model(tmp_path / "r")
    (root / "openvino").mkdir()
    for name in ("openvino_model_qint8_quantized", "openvino_model"):
        (root / "openvino" / f"{name}.xml").write_text("x")
        (root / "openvino" / f"{name}.bin").write_text("x")
    assert load_model_files(root, 0).xml == root / "openvino/openvino_model_qint8_quantized.xml"
    assert load_model_files(root, 0, "openvino/openvino_model.xml").xml == root / "openvino/openvino_model.xml"
    with pytest.raises(StartupError, match="not an .xml file"):
        load_model_files(root, 0, "openvino/missing.xml")


def test_buckets_too_short_for_the_template_are_skipped_with_a_line(caplog):
    config = load_config(["--device", "NPU", "--buckets", "8x64,8x128,8x256"], {})
    lines = []
    assert static_buckets_for(config, 256, 62, lines.append) == (ShapeBucket(8, 128), ShapeBucket(8, 256))
    assert lines and "8x64" in lines[0] and "62 tokens" in lines[0]
    with pytest.raises(StartupError, match="at least 94 tokens"):
        static_buckets_for(load_config(["--device", "NPU", "--buckets", "8x64"], {}), 64, 62, logging.info)


def test_a_cross_encoder_refuses_an_instruction_and_readyz_names_its_head(cpu_server):
    from support.http import request

    status, body = request(cpu_server.port, "POST", "/rerank", {"query": "q", "documents": ["d"],
                                                                 "instruction": "find it"})[:2]
    assert status == 400 and body["error"]["field"] == "instruction" and "cross-encoder" in body["error"]["message"]
    status, body = request(cpu_server.port, "POST", "/rerank", {"query": "q", "documents": ["d"],
                                                                 "instruction": 3})[:2]
    assert status == 400 and "instruction must be a string" in body["error"]["message"]
    ready = request(cpu_server.port, "GET", "/readyz")[1]
    assert ready["head"]["kind"] == "cross-encoder" and ready["head"]["padding_side"] == "right"
    assert ready["model_file"] == "openvino_model.xml" and ready["source"] is None


def test_default_buckets_grow_to_a_long_max_length_and_named_ones_do_not():
    npu = load_config(["--device", "NPU"], {})
    assert [str(b) for b in static_buckets_for(npu, 3000, 62)] == \
        ["8x128", "8x256", "8x512", "4x1024", "2x2048", "1x3000"]
    assert [str(b) for b in static_buckets_for(npu, 512)] == ["8x64", "8x128", "8x256", "8x512"]
    with pytest.raises(StartupError, match="do not cover max_length 1024"):
        static_buckets_for(load_config(["--device", "NPU", "--buckets", "8x128,8x512"], {}), 1024)


@pytest.mark.parametrize("name, needle", [("tiny-xlmr", "the model is a cross-encoder"),
                                          ("tiny-nemotron", "has no {instruction}")])
def test_an_instruction_for_a_model_that_takes_none_stops_startup(name, needle):
    import openvino as ov
    from support import ROOT

    from openvino_reranker.encoding import load_tokenizer
    from openvino_reranker.modeldir import make_head

    files = load_model_files(ROOT / "tests" / "fixtures" / "models" / name, 64)
    with pytest.raises(StartupError, match=needle.replace("{", r"\{").replace("}", r"\}")) as err:
        make_head(files, load_tokenizer(files.tokenizer), ov.Core().read_model(str(files.xml)), "find it")
    assert err.value.exit_code == EXIT_CONFIG


def test_without_a_pad_token_id_the_decoder_pads_with_the_tokenizers_pad_then_eos_token(tmp_path, tokenizer):
    from openvino_reranker.modeldir import decoder_pad_id

    named = load_model_files(write_model(tmp_path / "p", {"model_type": "qwen3"},
                                         tokenizer_config={"pad_token": {"content": "<|im_end|>"},
                                                           "eos_token": "<|endoftext|>"}), 0)
    assert named.pad_tokens == ("<|im_end|>", "<|endoftext|>")
    assert decoder_pad_id(named, tokenizer) == tokenizer.token_to_id("<|im_end|>")
    eos_only = load_model_files(write_model(tmp_path / "e", {"model_type": "qwen3"},
                                            tokenizer_config={"pad_token": "<none>", "eos_token": "<|endoftext|>"}), 0)
    assert decoder_pad_id(eos_only, tokenizer) == tokenizer.token_to_id("<|endoftext|>")
    config_wins = load_model_files(write_model(tmp_path / "c", {"model_type": "qwen3", "pad_token_id": 7},
                                               tokenizer_config={"pad_token": "<|im_end|>"}), 0)
    assert decoder_pad_id(config_wins, tokenizer) == 7
