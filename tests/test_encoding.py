"""The model head: pairs to inputs (the tokenizer's pair template, longest-first truncation, padding) and its
contract check."""

import numpy as np
from conftest import fake_head

from openvino_reranker.config import ShapeBucket
from openvino_reranker.encoding import EncodedPairs, pad_pairs


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
