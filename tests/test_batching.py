import pytest

from openvino_reranker.batching import chunk_bounds, length_order, pick_length, plan_batches, slice_round
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


@pytest.mark.parametrize("count, batch, parallel, sizes", [
    (20, 8, 1, [8, 8, 4]),  # one infer request: full batches, the remainder last
    (20, 8, 2, [5, 5, 5, 5]),  # two replicas: 3 batches -> 4, evenly, so each runs 10 pairs
    (100, 8, 2, [7, 7, 7, 7, 7, 7, 8, 7, 7, 7, 7, 7, 7, 8]),  # 13 -> 14 batches of 7 or 8
    (16, 8, 2, [8, 8]),  # already a multiple: unchanged
    (1, 8, 2, [1]),  # never more batches than pairs
    (3, 8, 4, [1, 1, 1]),
    (0, 8, 2, []),
])
def test_chunk_bounds_share_pairs_evenly_over_parallel_requests(count, batch, parallel, sizes):
    bounds = chunk_bounds(count, batch, parallel)
    assert bounds[0] == 0 and bounds[-1] == count
    assert [b - a for a, b in zip(bounds, bounds[1:], strict=False)] == sizes


def test_a_parallel_plan_balances_the_replicas_work():
    lengths = [40 + i for i in range(20)]
    plan = plan_batches(lengths, None, 8, 512, 16, parallel=2)
    assert [len(b.indices) for b in plan] == [5, 5, 5, 5]
    assert sorted(i for b in plan for i in b.indices) == list(range(20))
    assert [b.shape.length for b in plan] == [64, 64, 64, 48]  # longest first (59, 54, 49, 44), padded to x16


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


def test_a_round_takes_whole_small_requests_in_queue_order():
    assert slice_round([[10, 10], [10], [10, 10, 10]], max_pairs=64, max_tokens=1000) == [2, 1, 3]
    assert slice_round([], max_pairs=64, max_tokens=1000) == []


def test_a_round_stops_at_max_pairs_and_later_requests_give_nothing():
    assert slice_round([[10] * 5, [10] * 5, [10]], max_pairs=6, max_tokens=1000) == [5, 1, 0]
    assert slice_round([[10] * 10, [10]], max_pairs=4, max_tokens=1000) == [4, 0]


def test_a_round_stops_once_its_tokens_reach_max_tokens_taking_the_pair_that_crosses_it():
    assert slice_round([[100, 100, 100]], max_pairs=64, max_tokens=150) == [2]
    assert slice_round([[50, 50, 50]], max_pairs=64, max_tokens=100) == [2]  # exactly reached: no more
    assert slice_round([[100, 100, 100], [5], [5]], max_pairs=64, max_tokens=250) == [3, 0, 0]
    assert slice_round([[60], [60], [60]], max_pairs=64, max_tokens=100) == [1, 1, 0]


def test_a_round_always_takes_at_least_one_pair():
    assert slice_round([[5000]], max_pairs=1, max_tokens=10) == [1]
    assert slice_round([[], [7]], max_pairs=1, max_tokens=10) == [0, 1]


@pytest.mark.parametrize("max_pairs,max_tokens", [(1, 1), (3, 50), (8, 1000), (64, 64 * 128)])
def test_a_round_never_exceeds_max_pairs_nor_a_request_its_pending_pairs(max_pairs, max_tokens):
    pending = [[40] * 7, [3], [120, 90, 12], [], [64] * 20]
    counts = slice_round(pending, max_pairs, max_tokens)
    assert 1 <= sum(counts) <= max_pairs
    assert all(0 <= n <= len(lengths) for n, lengths in zip(counts, pending, strict=True))
    # the requests reached form a prefix of the queue (an empty request aside), each given its pairs in order
    reached = [i for i, n in enumerate(counts) if n]
    assert reached == [i for i in range(reached[-1] + 1) if pending[i]]
