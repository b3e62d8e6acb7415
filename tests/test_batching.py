import pytest

from openvino_reranker.batching import length_order, pick_length, plan_batches
from openvino_reranker.config import ShapeBucket


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
