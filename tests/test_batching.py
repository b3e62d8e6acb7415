import numpy as np
import pytest

from openvino_reranker.batching import MicroBatch, length_order, pad_batch, pick_length, plan_batches
from openvino_reranker.config import ShapeBucket
from openvino_reranker.encoding import EncodedPairs


def encoded(lengths):
    ids = [np.arange(1, n + 1, dtype=np.int64) + 100 * i for i, n in enumerate(lengths)]
    types = [np.r_[np.zeros(n // 2, np.int64), np.ones(n - n // 2, np.int64)] for n in lengths]
    return EncodedPairs(ids, types, np.array(lengths), np.zeros(len(lengths), bool))


def test_length_order_is_descending_and_stable():
    assert length_order([3, 9, 3, 9, 1]) == [1, 3, 0, 2, 4]


@pytest.mark.parametrize("lengths", [[5], [3, 9, 3, 9, 1], list(range(40, 0, -3)), [7] * 20])
def test_every_pair_is_planned_exactly_once(lengths):
    for buckets in (None, (ShapeBucket(1, 16), ShapeBucket(8, 16), ShapeBucket(4, 64))):
        plan = plan_batches(lengths, buckets, 4, 64)
        seen = sorted(i for b in plan for i in b.indices)
        assert seen == list(range(len(lengths)))
        for b in plan:
            assert len(b.indices) <= b.shape.rows
            assert max(lengths[i] for i in b.indices) <= b.shape.length


def test_dynamic_plan_pads_to_a_multiple_of_8_within_max_length():
    plan = plan_batches([10, 50, 3, 49, 17], None, 2, 52)
    assert [(b.indices, b.shape) for b in plan] == [
        ((1, 3), ShapeBucket(2, 52)),  # 56 would exceed max_length
        ((4, 0), ShapeBucket(2, 24)),
        ((2,), ShapeBucket(1, 8)),
    ]
    assert not any(b.static for b in plan)


def test_static_plan_uses_smallest_fitting_length_and_fills_rows():
    buckets = (ShapeBucket(1, 64), ShapeBucket(8, 64), ShapeBucket(8, 128))
    lengths = [100] * 9 + [20] * 11
    plan = plan_batches(lengths, buckets, 8, 128)
    shapes = [(b.shape, len(b.indices)) for b in plan]
    assert shapes == [(ShapeBucket(8, 128), 8), (ShapeBucket(8, 128), 1),
                      (ShapeBucket(8, 64), 8), (ShapeBucket(8, 64), 3)]
    plan = plan_batches([20], buckets, 8, 128)
    assert [(b.shape, b.indices) for b in plan] == [(ShapeBucket(1, 64), (0,))]
    assert all(b.static for b in plan)


def test_pick_length():
    assert pick_length(1, [64, 128]) == 64
    assert pick_length(64, [64, 128]) == 64
    assert pick_length(65, [64, 128]) == 128
    with pytest.raises(ValueError):
        pick_length(129, [64, 128])


def test_pad_batch_masks_padding_and_fills_spare_rows_with_a_real_row():
    enc = encoded([5, 3])
    feed = pad_batch(enc, MicroBatch((0, 1), ShapeBucket(4, 8), True),
                     ("input_ids", "attention_mask", "token_type_ids"), pad_id=0)
    assert {k: v.shape for k, v in feed.items()} == {k: (4, 8) for k in feed}
    assert feed["input_ids"][0, :5].tolist() == enc.ids[0].tolist() and feed["input_ids"][0, 5:].tolist() == [0] * 3
    assert feed["attention_mask"].sum(axis=1).tolist() == [5, 3, 3, 3]
    assert feed["input_ids"][2].tolist() == feed["input_ids"][1].tolist() == feed["input_ids"][3].tolist()
    assert feed["token_type_ids"][0, :5].tolist() == enc.type_ids[0].tolist()


def test_pad_batch_feeds_only_the_model_inputs():
    feed = pad_batch(encoded([4]), MicroBatch((0,), ShapeBucket(1, 8), False), ("input_ids", "attention_mask"), 0)
    assert set(feed) == {"input_ids", "attention_mask"}
