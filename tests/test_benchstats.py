"""bench/benchstats.py: the paired block ratios, their median and spread, the rotation of systems, and the FLOP
count bench/bench.py divides by time. Arithmetic only: nothing here runs a model or measures a speed."""

import sys

import pytest
from support import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import benchstats  # noqa: E402

MINILM = benchstats.EncoderShape(hidden=384, layers=6, intermediate=1536, num_labels=1)


def test_paired_ratios_pair_blocks_and_skip_missing_ones():
    assert benchstats.paired_ratios([2.0, 3.0, None, 8.0], [1.0, 3.0, 5.0, 0.0]) == [2.0, 1.0]
    with pytest.raises(ValueError):
        benchstats.paired_ratios([1.0], [1.0, 2.0])


def test_paired_ratios_cancel_a_slow_block():
    # the machine halves both systems' speed in blocks 2 and 3: the totals would mislead, the block ratios do not
    fast = [100.0, 50.0, 50.0, 100.0]
    slow = [80.0, 40.0, 40.0, 80.0]
    assert benchstats.spread(benchstats.paired_ratios(fast, slow)).median == pytest.approx(1.25)


def test_spread_median_quartiles_and_range():
    s = benchstats.spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.q1, s.q3, s.low, s.high, s.n) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    even = benchstats.spread([1.0, 2.0, 3.0, 4.0])
    assert (even.median, even.q1, even.q3) == (2.5, 1.75, 3.25)  # numpy's linear interpolation
    assert benchstats.spread([float("nan"), 2.0]).n == 1
    empty = benchstats.spread([])
    assert empty.n == 0 and empty.text() == "n/a"


def test_spread_text_names_median_middle_half_and_range():
    assert benchstats.spread([1.0, 1.2, 1.4]).text() == "1.20x (middle half 1.10-1.30, range 1.00-1.40, 3 blocks)"


def test_quantile_matches_numpy():
    numpy = pytest.importorskip("numpy")
    values = sorted([0.3, 1.7, 0.9, 2.2, 1.1, 0.4, 3.0])
    for q in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
        assert benchstats.quantile(values, q) == pytest.approx(float(numpy.quantile(values, q)))


def test_rotation_puts_each_system_first_in_turn():
    names = ["a", "b", "c"]
    orders = [benchstats.rotation(names, b) for b in range(4)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert benchstats.rotation([], 3) == []


def test_sequence_flops_by_hand():
    # hidden 2, intermediate 3, one layer, length 4, one label:
    # per token 4*4 + 2*2*3 + 2*4*2 = 16 + 12 + 16 = 44; 4 tokens -> 176; pooler 4, classifier 2 -> 182; x2
    assert benchstats.sequence_flops(benchstats.EncoderShape(2, 1, 3, 1), 4) == 364


def test_minilm_flops_per_token():
    # about 21 MFLOP per token at short lengths for the MiniLM-L6 shape (6 x 2 x (4 x 384^2 + 2 x 384 x 1536))
    per_token = benchstats.sequence_flops(MINILM, 128) / 128
    assert 21.2e6 < per_token < 22.5e6


def test_batch_flops_counts_padding_apart():
    useful, padding = benchstats.batch_flops(MINILM, [100, 60], 104)
    assert useful == benchstats.sequence_flops(MINILM, 100) + benchstats.sequence_flops(MINILM, 60)
    assert useful + padding == 2 * benchstats.sequence_flops(MINILM, 104)
    # a static bucket's spare rows are padding too
    useful2, padding2 = benchstats.batch_flops(MINILM, [100, 60], 104, rows=4)
    assert useful2 == useful and padding2 == padding + 2 * benchstats.sequence_flops(MINILM, 104)
    assert benchstats.batch_flops(MINILM, [64], 64) == (benchstats.sequence_flops(MINILM, 64), 0)


def test_batch_flops_refuses_a_pair_longer_than_its_batch():
    with pytest.raises(ValueError):
        benchstats.batch_flops(MINILM, [120], 112)
    with pytest.raises(ValueError):
        benchstats.batch_flops(MINILM, [10, 10, 10], 16, rows=2)
