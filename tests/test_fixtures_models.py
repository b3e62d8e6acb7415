"""The committed model fixtures in tests/fixtures/models/ (tiny random Qwen3 and Llama decoder rerankers, a tiny
nemotron-style bidirectional Llama, a tiny XLM-R cross-encoder; made by generate.py there) against the torch
reference scores stored beside them, with OpenVINO and `tokenizers` only (no torch at test time).

Each IR is compiled on the CPU at f32 and fed each case's reference input_ids alone and in padded batches; its
logits must match torch's within 1e-4. The tokenizer.json files alone, through `tokenizers` as the service reads
them, must reproduce the reference input_ids from each family's official recipe.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
from tokenizers import Tokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "models"
NAMES = ("tiny-qwen3", "tiny-llama", "tiny-nemotron", "tiny-xlmr")
TOLERANCE = 1e-4  # |OpenVINO logit - torch logit|, f32 CPU
F32 = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
# Padding each family takes (decoder seq-cls heads find the last token by comparing ids with pad_token_id, so
# either side works with the right id; the nemotron head mean-pools over the mask; XLM-R reads position 0)
PAD_SIDES = {"qwen3": ("right", "left"), "llama": ("right", "left"), "nemotron": ("right", "left"),
             "xlm-roberta": ("right",)}

# Qwen3-Reranker's official recipe (its model card), which tiny-qwen3's reference follows
QWEN3_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
                "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def load_json(name: str, filename: str) -> dict:
    return json.loads((FIXTURES / name / filename).read_text(encoding="utf-8"))


class Fixture:
    """One fixture's reference and config, and its IR compiled on the CPU at f32."""

    def __init__(self, name: str):
        self.path = FIXTURES / name
        self.reference = load_json(name, "reference.json")
        self.config = load_json(name, "config.json")
        self.family = self.reference["family"]
        self.cases = self.reference["cases"]
        self.compiled = ov.Core().compile_model(str(self.path / "openvino_model.xml"), "CPU", F32)

    @property
    def pad_id(self) -> int:
        return self.config["pad_token_id"]

    def infer(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.compiled({"input_ids": ids, "attention_mask": mask})["logits"][:, 0]

    def torch_logits(self) -> np.ndarray:
        return np.array([c["logit"] for c in self.cases])


@pytest.fixture(scope="module", params=NAMES)
def fixture(request) -> Fixture:
    return Fixture(request.param)


def padded(rows: list[list[int]], pad_id: int, side: str, width: int = 0) -> tuple[np.ndarray, np.ndarray]:
    width = width or max(map(len, rows))
    ids = np.full((len(rows), width), pad_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for n, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[n, span], mask[n, span] = row, 1
    return ids, mask


# ---------------------------------------------------------------------------------------------- the reference


def test_every_fixture_directory_is_complete():
    for name in NAMES:
        files = {p.name for p in (FIXTURES / name).iterdir()}
        assert {"openvino_model.xml", "openvino_model.bin", "tokenizer.json", "tokenizer_config.json",
                "config.json", "reference.json"} <= files, name


@pytest.mark.parametrize("name", NAMES)
def test_reference_scores_are_the_sigmoid_of_the_logits_and_spread(name):
    reference = load_json(name, "reference.json")
    logits = [c["logit"] for c in reference["cases"]]
    for c in reference["cases"]:
        assert c["score"] == pytest.approx(1 / (1 + math.exp(-c["logit"])), abs=1e-12)
        assert 0 < len(c["input_ids"]) <= reference["max_length"]
    # a reference whose logits barely differ would let a wrong model pass within the tolerance
    assert np.std(logits) > 0.3 and len(set(map(len, (c["input_ids"] for c in reference["cases"])))) > 3


# ---------------------------------------------------------------------------------------------- OpenVINO vs torch


def test_each_case_alone_matches_torch(fixture):
    got = np.array([fixture.infer(np.array([c["input_ids"]]), np.ones((1, len(c["input_ids"])), np.int64))[0]
                    for c in fixture.cases])
    assert np.abs(got - fixture.torch_logits()).max() < TOLERANCE


def test_padded_batches_match_torch(fixture):
    rows = [c["input_ids"] for c in fixture.cases]
    for side in PAD_SIDES[fixture.family]:
        got = fixture.infer(*padded(rows, fixture.pad_id, side))
        assert np.abs(got - fixture.torch_logits()).max() < TOLERANCE, f"{side}-padded"


def test_a_static_shape_padded_to_max_length_matches_torch(fixture):
    """The IR reshaped to [cases, max_length], as a static bucket on the NPU would be."""
    rows = [c["input_ids"] for c in fixture.cases]
    model = ov.Core().read_model(str(fixture.path / "openvino_model.xml"))
    width = fixture.reference["max_length"]
    model.reshape({port.get_any_name(): [len(rows), width] for port in model.inputs})
    compiled = ov.Core().compile_model(model, "CPU", F32)
    for side in PAD_SIDES[fixture.family]:
        ids, mask = padded(rows, fixture.pad_id, side, width)
        got = compiled({"input_ids": ids, "attention_mask": mask})["logits"][:, 0]
        assert np.abs(got - fixture.torch_logits()).max() < TOLERANCE, f"{side}-padded to {width}"


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-llama"])
def test_padding_with_another_id_than_pad_token_id_gives_wrong_decoder_scores(name):
    """The exported decoder heads find each row's last token by comparing input_ids with pad_token_id: pad with
    any other id and the scores are silently wrong. (Also proves the padded check above can fail.)"""
    fixture = Fixture(name)
    assert fixture.pad_id != 0
    got = fixture.infer(*padded([c["input_ids"] for c in fixture.cases], 0, "right"))
    assert np.abs(got - fixture.torch_logits()).max() > 0.1


def test_left_padding_gives_wrong_xlmr_scores():
    """XLM-R's head reads position 0: left padding moves the scores (why the service pads encoders on the right)."""
    fixture = Fixture("tiny-xlmr")
    got = fixture.infer(*padded([c["input_ids"] for c in fixture.cases], fixture.pad_id, "left"))
    assert np.abs(got - fixture.torch_logits()).max() > 0.1


# ---------------------------------------------------------------------------------------------- tokenizer.json


def tokenizer(name: str) -> Tokenizer:
    return Tokenizer.from_file(str(FIXTURES / name / "tokenizer.json"))


def test_qwen3_ids_follow_the_official_recipe():
    """Prefix and suffix whole, the middle truncated (longest-first, from its end) to what is left of max_length."""
    reference = load_json("tiny-qwen3", "reference.json")
    tok = tokenizer("tiny-qwen3")
    prefix = tok.encode(QWEN3_PREFIX, add_special_tokens=False).ids
    suffix = tok.encode(QWEN3_SUFFIX, add_special_tokens=False).ids
    tok.enable_truncation(reference["max_length"] - len(prefix) - len(suffix))
    truncated = 0
    for c in reference["cases"]:
        middle = f"<Instruct>: {c['instruction'] or QWEN3_INSTRUCTION}\n<Query>: {c['query']}\n<Document>: " \
                 f"{c['document']}"
        ids = prefix + tok.encode(middle, add_special_tokens=False).ids + suffix
        assert ids == c["input_ids"], c["query"]
        truncated += len(ids) == reference["max_length"]
    assert truncated >= 3 and sum(c["instruction"] is not None for c in reference["cases"]) >= 2


def test_llama_ids_are_the_filled_template_with_bos():
    reference = load_json("tiny-llama", "reference.json")
    template = load_json("tiny-llama", "rerank_template.json")
    assert template["add_special_tokens"] is True
    tok = tokenizer("tiny-llama")
    bos = tok.token_to_id("<|begin_of_text|>")
    for c in reference["cases"]:
        text = template["template"].format(instruction=c["instruction"] or template["default_instruction"],
                                           query=c["query"], document=c["document"])
        assert tok.encode(text).ids == c["input_ids"] and c["input_ids"][0] == bos, c["query"]
    assert sum(c["instruction"] is not None for c in reference["cases"]) >= 2


def test_nemotron_ids_are_the_template_truncated_at_the_end():
    reference = load_json("tiny-nemotron", "reference.json")
    template = load_json("tiny-nemotron", "rerank_template.json")
    assert template == {"template": "question:{query} \n \n passage:{document}", "add_special_tokens": True}
    tok = tokenizer("tiny-nemotron")
    tok.enable_truncation(reference["max_length"])
    for c in reference["cases"]:
        assert tok.encode(template["template"].format(query=c["query"], document=c["document"])).ids == \
            c["input_ids"], c["query"]
    assert sum(len(c["input_ids"]) == reference["max_length"] for c in reference["cases"]) >= 2


def test_xlmr_ids_are_the_pair_template_truncated_longest_first():
    reference = load_json("tiny-xlmr", "reference.json")
    tok = tokenizer("tiny-xlmr")
    tok.enable_truncation(reference["max_length"], strategy="longest_first")
    for c in reference["cases"]:
        ids = c["input_ids"]
        assert tok.encode(c["query"], c["document"]).ids == ids and ids[0] == 0 and ids[-1] == 2, c["query"]
    assert sum(len(c["input_ids"]) == reference["max_length"] for c in reference["cases"]) >= 3
