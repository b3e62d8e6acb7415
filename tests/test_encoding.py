"""The model head: pairs to inputs (the tokenizer's pair template, longest-first truncation, padding) and its
contract check."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.engines import FAKE_CONTRACT, fake_head

from openvino_reranker.config import ShapeBucket
from openvino_reranker.encoding import CrossEncoderHead, EncodedPairs, pad_pairs
from openvino_reranker.scoring import Truncation
from openvino_reranker.textcut import BertRuns, TextCutter


def encoded(lengths):
    ids = [np.arange(1, n + 1, dtype=np.int64) + 100 * i for i, n in enumerate(lengths)]
    types = [np.r_[np.zeros(n // 2, np.int64), np.ones(n - n // 2, np.int64)] for n in lengths]
    return EncodedPairs(ids, types, np.array(lengths), np.zeros(len(lengths), bool))


def test_encoder_uses_the_pair_template_and_truncates_longest_first(tiny_model):
    enc = fake_head(tiny_model.path / "tokenizer.json", 16)
    pairs = enc.encode("capital of france", ["paris", "the capital city of france is paris " * 4])
    assert pairs.lengths.tolist() == [len(pairs.ids[0]), 16]
    assert pairs.truncated.tolist() == [False, True]
    tokens = [enc.tokenizer.id_to_token(i) for i in pairs.ids[0]]
    assert tokens == ["[CLS]", "capital", "of", "france", "[SEP]", "paris", "[SEP]"]
    assert pairs.type_ids[0].tolist() == [0, 0, 0, 0, 0, 1, 1]
    # longest-first: the short query survives whole while the long document is cut
    assert [enc.tokenizer.id_to_token(i) for i in pairs.ids[1][:5]] == ["[CLS]", "capital", "of", "france", "[SEP]"]
    assert enc.pad_id == enc.tokenizer.token_to_id("[PAD]")


def test_pad_pairs_masks_padding_and_fills_spare_rows_with_a_real_row():
    enc = encoded([5, 3])
    feed = pad_pairs(enc, (0, 1), ShapeBucket(4, 8), ("input_ids", "attention_mask", "token_type_ids"), pad_id=0)
    assert {k: v.shape for k, v in feed.items()} == {k: (4, 8) for k in feed}
    assert feed["input_ids"][0, :5].tolist() == enc.ids[0].tolist() and feed["input_ids"][0, 5:].tolist() == [0] * 3
    assert feed["attention_mask"].sum(axis=1).tolist() == [5, 3, 3, 3]
    assert feed["input_ids"][2].tolist() == feed["input_ids"][1].tolist() == feed["input_ids"][3].tolist()
    assert feed["token_type_ids"][0, :5].tolist() == enc.type_ids[0].tolist()


def test_pad_pairs_feeds_only_the_model_inputs():
    feed = pad_pairs(encoded([4]), (0,), ShapeBucket(1, 8), ("input_ids", "attention_mask"), 0)
    assert set(feed) == {"input_ids", "attention_mask"}


# ---- cutting long texts before tokenizing


def bpe_tokenizer():
    """A byte-level BPE tokenizer with RoBERTa's pair template, trained here on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                      ("<s>", tok.token_to_id("<s>")))
    return tok


def unigram_tokenizer():
    """A SentencePiece-style Unigram tokenizer with Metaspace and XLM-R's pair template."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=200, special_tokens=specials, unk_token="<unk>"))
    s, e = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                       special_tokens=[("<s>", s), ("</s>", e)])
    return tok


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def digits_bpe_tokenizer():
    """A byte-level BPE tokenizer with Llama 3's pre-tokenizer (numbers in groups of up to three digits), trained on
    numbers so that its vocabulary has multi-digit tokens: a cut that misaligns the groups changes its tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    numbers = ["1234567890" * 30, "9" * 90, "12" * 90, "7" + "12" * 90] * 20
    tok.train_from_iterator(CORPUS + numbers, trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


CORPUS = ["solar power is energy from the sun", "the cat sat on the mat near the door",
          "water boils at one hundred degrees", "Paris est la capitale de la France, été 2024",
          "東京は日本の首都です", "numbers like 3.14159 and 42 appear often"] * 20

WORDS = st.text(alphabet="abcdeé中1!-.,\n\t\u00a0\u0301", min_size=0, max_size=12)
TEXTS = st.lists(WORDS, min_size=0, max_size=60).map(lambda ws: " ".join(ws))
SPACING = st.sampled_from([" ", "  ", " \n ", "\t"])


def heads(tiny_path, max_length):
    contract = FAKE_CONTRACT
    yield fake_head(tiny_path, max_length)
    yield CrossEncoderHead(bpe_tokenizer(), max_length, contract)
    yield CrossEncoderHead(unigram_tokenizer(), max_length, contract)


def uncut(head, query, texts, side="right"):
    """The tokenizer alone, on the whole texts (the head's settings for that side, no cutting)."""
    return head._tokenizers[side].encode_batch([(query, t) for t in texts])


@pytest.fixture(scope="module")
def all_heads(tiny_model):
    return {max_length: list(heads(tiny_model.path / "tokenizer.json", max_length)) for max_length in (12, 40)}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=TEXTS, text=TEXTS, max_length=st.sampled_from([12, 40]), side=st.sampled_from(["right", "left"]))
def test_cutting_changes_no_token_that_truncation_keeps(all_heads, query, text, max_length, side):
    for head in all_heads[max_length]:
        got = head.encode(query, [text], Truncation(side))
        want = uncut(head, query, [text], side)[0]
        assert got.ids[0].tolist() == want.ids and got.type_ids[0].tolist() == want.type_ids
        assert bool(got.truncated[0]) == bool(want.overflowing)


def test_a_huge_document_is_cut_cheaply(tiny_model):
    import time
    head = fake_head(tiny_model.path / "tokenizer.json", 128)
    text = ("xqzj" * 25 + " ") * 980  # 99k characters: the wedge from the robustness issue
    cutter = TextCutter(head._counter)
    # 128 one-token words take 13k characters; the window doubles, so it may hold up to twice that
    assert len(cutter.cut(text, 128)) < 27_000 and len(cutter.cut(text, 128, "left")) < 27_000
    started = time.perf_counter()
    got = head.encode("q", [text] * 19)
    assert time.perf_counter() - started < 5  # generous: the point is not seconds per document
    want = uncut(head, "q", [text])[0]
    assert got.ids[0].tolist() == want.ids


# Texts with few or no spaces: one long "word", CJK, emoji, combining marks (of two classes, which NFC reorders), a
# run of one punctuation character, digits (grouped in threes by Llama 3's pre-tokenizer), control characters.
RUNS = st.sampled_from(["a", "中", "\U0001f600", "\u0301", "\u0323\u0301", ",", "7", "\x00", "e\u0301", "\u00a0",
                        "\u200b", "\t", "-", "ab", "1,2", "12345", "2024 "])
RUN_TEXTS = st.lists(st.tuples(RUNS, st.integers(1, 400)), min_size=1, max_size=6).map(
    lambda parts: "".join(piece * count for piece, count in parts))
FIXTURE_TOKENIZERS = ["tiny-bert-qint8", "tiny-llama", "tiny-nemotron", "tiny-qwen3", "tiny-xlmr"]


@pytest.fixture(scope="module")
def cutters(tiny_model):
    """A TextCutter for each tokenizer family the fixtures hold (WordPiece, byte-level BPE with and without NFC,
    Unigram with NFKC), the tests' own tiny WordPiece, and the trained byte-level BPE and Unigram above."""
    from support import ROOT
    from tokenizers import Tokenizer

    tokenizers = [Tokenizer.from_file(str(ROOT / "tests" / "fixtures" / "models" / name / "tokenizer.json"))
                  for name in FIXTURE_TOKENIZERS]
    tokenizers += [Tokenizer.from_file(str(tiny_model.path / "tokenizer.json")), bpe_tokenizer(), unigram_tokenizer(),
                   digits_bpe_tokenizer()]
    for tok in tokenizers:
        tok.no_truncation()
        tok.no_padding()
    return [TextCutter(tok) for tok in tokenizers]


def assert_cut_keeps(cutter, text, keep, side):
    tok = cutter.tokenizer
    cut = cutter.cut(text, keep, side)
    whole = tok.encode(text, add_special_tokens=False).ids
    got = tok.encode(cut, add_special_tokens=False).ids
    if side == "right":
        assert got[:keep] == whole[:keep], (text[:80], cut[:80])
    else:
        assert got[-keep:] == whole[-keep:], (text[-80:], cut[-80:])
    assert (len(got) >= keep) == (len(whole) >= keep)
    return cut


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(RUN_TEXTS, st.tuples(TEXTS, RUN_TEXTS, TEXTS).map("".join)),
       keep=st.sampled_from([1, 5, 24, 60]), side=st.sampled_from(["right", "left"]))
def test_cutting_texts_without_spaces_keeps_the_tokens_truncation_keeps(cutters, text, keep, side):
    for cutter in cutters:
        assert_cut_keeps(cutter, text, keep, side)


@pytest.mark.parametrize("text", [",", "中", "\U0001f600", "a", "\u0301\u0323", "\x00", " ", "7", "e\u0301\u0323"],
                         ids=["comma", "cjk", "emoji", "letter", "marks", "nul", "space", "digit", "accented"])
def test_a_two_megabyte_run_costs_what_its_kept_tokens_cost(cutters, text):
    """Each family, each side: the cut of a 2 MB run of one character keeps the tokens and is short, or, where the
    run is few tokens (a 2 MB word is one unknown token for WordPiece), is found without tokenizing 2 MB."""
    import time

    run = text * (2_000_000 // len(text.encode()))
    for cutter in cutters:
        for side in ("right", "left"):
            started = time.perf_counter()
            cut = cutter.cut("q " + run + " z" if side == "left" else run, 512, side)
            elapsed = time.perf_counter() - started
            assert len(cut) < 60_000 or elapsed < 1.5, (cutter.tokenizer.model, side, len(cut), elapsed)


@pytest.mark.parametrize("source", ["tiny", "exported"])
def test_bert_runs_shorten_without_changing_a_token(tiny_model, source):
    from support import ROOT
    from tokenizers import Tokenizer

    path = tiny_model.path if source == "tiny" else ROOT / "tests" / "fixtures" / "models" / "tiny-bert-qint8"
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    runs = BertRuns.for_tokenizer(tok, json.loads(tok.to_str()))
    assert runs is not None and runs.max_word_chars == 100
    cases = ["a" * 5000 + " b", "x" + " \t\n" * 300 + "y", "[SE\x00P] a", "e" + "\u0301" * 900 + "f",
             "\U0001f600" * 3000, "abc\x00" * 400, "中" * 300 + "a" * 300, "\u00e9" * 500 + "!"]
    for text in cases:
        short = runs.shorten(text)
        assert tok.encode(short, add_special_tokens=False).ids == tok.encode(text, add_special_tokens=False).ids
    assert len(runs.shorten("a" * 5000)) == 101 and runs.shorten("x   y") == "x y"
    if source == "exported":  # sentence-transformers' export lists [SEP] as an added token, matched before cleaning
        assert runs.shorten("[SE\x00P]") == "[SE\x00P]"  # deleting the NUL would spell it
    bpe = bpe_tokenizer()
    assert BertRuns.for_tokenizer(bpe, json.loads(bpe.to_str())) is None


@pytest.mark.parametrize("text, keep, side, expected", [
    ("a b c", 5, "right", "a b c"), ("", 3, "right", ""), ("short", 1, "left", "short"),
])
def test_a_text_shorter_than_the_first_window_is_whole(tiny_model, text, keep, side, expected):
    head = fake_head(tiny_model.path / "tokenizer.json", 64)
    assert TextCutter(head._counter).cut(text, keep, side) == expected


def test_max_document_tokens_keeps_the_first_tokens(tiny_model):
    head = fake_head(tiny_model.path / "tokenizer.json", 64)
    text = "solar power is energy from the sun turned into electricity by cells"
    tokens = head.tokenizer.encode(text, add_special_tokens=False).ids
    query = head.tokenizer.encode("q", add_special_tokens=False).ids
    for k in (1, 4, 9):
        got = head.encode("q", [text], Truncation(max_document_tokens=k))
        assert got.ids[0].tolist()[len(query) + 2:-1] == tokens[:k] and got.truncated.tolist() == [True]
    assert head.encode("q", [text], Truncation(max_document_tokens=500)).truncated.tolist() == [False]
    assert head.encode("q", [text], Truncation(max_document_tokens=len(tokens))).truncated.tolist() == [False]


# ---- the model contract


def test_the_logits_output_is_picked_by_name_not_position(tiny_model):
    """An IR whose first output is something else: the head finds `logits` by name and the engine serves it."""
    import openvino as ov
    import openvino.opset13 as ops
    from support.models import F32_LATENCY, SCORE_TOLERANCE

    from openvino_reranker.engine import Engine
    from openvino_reranker.reranker import Reranker

    core = ov.Core()
    model = core.read_model(str(tiny_model.path / "openvino_model.xml"))
    logits = model.outputs[0].get_node().input_value(0)
    ids = model.input("input_ids").get_node().output(0)
    extra = ops.reduce_sum(ops.convert(ids, ov.Type.f32), ops.constant([1]), keep_dims=True).output(0)
    extra.set_names({"token_id_sum"})
    two = ov.Model([extra, logits], model.get_parameters(), "two-outputs")
    contract = CrossEncoderHead.check_contract(two)
    assert (contract.output_name, contract.output_index, contract.num_labels) == ("logits", 1, 1)
    head = CrossEncoderHead.from_file(tiny_model.path / "tokenizer.json", 128, contract)
    reranker = Reranker(head, Engine(core, two, "CPU", None, F32_LATENCY, contract), 4)
    try:
        docs = ["solar power is energy from the sun", "the cat sat on the farm"]
        scored = reranker.score_pairs("solar power", docs)
        assert abs(scored.scores - tiny_model.reference_scores("solar power", docs)).max() < SCORE_TOLERANCE
    finally:
        reranker.close()


def test_a_model_without_logits_among_several_outputs_is_refused(tiny_model):
    import openvino as ov
    import openvino.opset13 as ops

    from openvino_reranker.errors import EXIT_MODEL, StartupError

    model = ov.Core().read_model(str(tiny_model.path / "openvino_model.xml"))
    logits = model.outputs[0].get_node().input_value(0)
    other = ops.multiply(logits, ops.constant(np.float32(2))).output(0)
    other.set_names({"doubled"})
    renamed = ops.multiply(logits, ops.constant(np.float32(1))).output(0)
    renamed.set_names({"scores"})
    with pytest.raises(StartupError) as info:
        CrossEncoderHead.check_contract(ov.Model([other, renamed], model.get_parameters()))
    assert info.value.exit_code == EXIT_MODEL and "no output named 'logits'" in str(info.value)


def test_unigram_runs_shorten_without_changing_a_token():
    from support import ROOT
    from tokenizers import Tokenizer

    from openvino_reranker.textcut import UnigramRuns

    tok = Tokenizer.from_file(str(ROOT / "tests" / "fixtures" / "models" / "tiny-xlmr" / "tokenizer.json"))
    runs = UnigramRuns.for_tokenizer(tok, json.loads(tok.to_str()))
    assert runs is not None and runs.collapse_spaces
    cases = ["a" + " " * 500 + "b", "\U0001f600" * 300 + "a", "x\U0001f600\U0001f680\U0001f600y", "a\u1100\u1161b",
             "e" + "\u0301" * 50, "\u4e2d" * 40]
    for text in cases:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.encode(runs.shorten(text), add_special_tokens=False).ids == ids, text
        normalized = tok.normalizer.normalize_str(text)
        assert tok.encode(runs.shorten(normalized, normalized=True), add_special_tokens=False).ids == ids, text
    assert runs.shorten("a" + " " * 500 + "b") == "a b" and len(runs.shorten("\U0001f600" * 300)) == 1
    assert runs.shorten("e\u0301\u0301") == "e\u0301\u0301"  # a mark composes: left alone unless normalized
    bpe = bpe_tokenizer()
    assert UnigramRuns.for_tokenizer(bpe, json.loads(bpe.to_str())) is None


@pytest.mark.parametrize("digits", [999, 1000, 1001, 5000])
def test_a_suffix_inside_a_digit_run_keeps_the_groups_of_three(digits):
    """Llama 3's pre-tokenizer groups a run of digits in threes from the run's start: a suffix must start a whole
    number of groups into the run, or every group (and so every token) after it differs."""
    tok = digits_bpe_tokenizer()
    for group in ("123", "456", "789", "999", "121", "212"):  # the vocabulary has multi-digit tokens
        assert len(tok.encode(group, add_special_tokens=False).ids) == 1, group
    cutter = TextCutter(tok)
    assert cutter.digit_group == 3
    for text in ["x " + "1234567890" * (digits // 10) + "12345"[:digits % 10 % 5], "9" * digits, "7" + "12" * digits]:
        for keep in (1, 4, 30):
            cut = assert_cut_keeps(cutter, text, keep, "left")
            assert len(cut) < len(text)
