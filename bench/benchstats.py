"""The arithmetic of bench/bench.py, apart so that tests/test_benchstats.py can check it: paired block ratios and
their median and spread, and a BERT encoder's FLOPs for the tokens a batch really ran, padding counted apart.

Why paired blocks: on a shared VM the same engine measured 47 and 107 pairs/s an hour apart, so totals of phases
run one after the other compare the machine's moods, not the systems. The bench runs every system on the same few
requests in short blocks, one after another in a rotating order, and compares systems block by block: a slow minute
slows both sides of a ratio. The median of the block ratios is the figure; the quartiles and the range say how far
it can be trusted. Standard library only.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Spread:
    """The median of some values, their quartiles (the middle half lies between q1 and q3) and range."""

    median: float
    q1: float
    q3: float
    low: float
    high: float
    n: int

    def text(self, unit: str = "x") -> str:
        if self.n == 0:
            return "n/a"
        return (f"{self.median:.2f}{unit} (middle half {self.q1:.2f}-{self.q3:.2f}, range {self.low:.2f}-"
                f"{self.high:.2f}, {self.n} blocks)")

    def as_dict(self) -> dict:
        return {"median": self.median, "q1": self.q1, "q3": self.q3, "low": self.low, "high": self.high, "n": self.n}


def quantile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile of sorted values, linearly interpolated between the two nearest ranks (numpy's default)."""
    if not ordered:
        raise ValueError("no values")
    position = (len(ordered) - 1) * q
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def spread(values: Iterable[float]) -> Spread:
    """Median, quartiles and range of the finite values (NaN for all when there are none)."""
    ordered = sorted(v for v in values if math.isfinite(v))
    if not ordered:
        nan = float("nan")
        return Spread(nan, nan, nan, nan, nan, 0)
    return Spread(statistics.median(ordered), quantile(ordered, 0.25), quantile(ordered, 0.75), ordered[0],
                  ordered[-1], len(ordered))


def paired_ratios(numerator: Sequence[float | None], denominator: Sequence[float | None]) -> list[float]:
    """Block by block, numerator / denominator: the blocks where both ran (neither None) and the denominator is
    positive. The two lists are indexed by block."""
    if len(numerator) != len(denominator):
        raise ValueError(f"{len(numerator)} blocks against {len(denominator)}")
    return [a / b for a, b in zip(numerator, denominator, strict=True)
            if a is not None and b is not None and b > 0]


def rotation(names: Sequence[str], block: int) -> list[str]:
    """The order the systems run in during `block`: rotated by one each block, so that none always runs first
    (warm caches, a neighbour's burst) or always right after the same other system."""
    if not names:
        return []
    k = block % len(names)
    return list(names[k:]) + list(names[:k])


# ------------------------------------------------------------------------------------------------ FLOPs


@dataclass(frozen=True)
class EncoderShape:
    """What a BERT-style encoder's FLOPs depend on."""

    hidden: int
    layers: int
    intermediate: int
    num_labels: int = 1


def sequence_flops(shape: EncoderShape, length: int) -> int:
    """FLOPs (a multiply-add is 2) of one sequence of `length` tokens through the encoder and the classifier head:
    per layer the Q, K, V and output projections (4 H^2 per token), the feed-forward (2 H I per token), and
    attention's scores and weighted sum (2 L H per token); then the pooler (H^2) and the classifier (H x labels)
    on one token. Embedding look-ups, layer norms, softmax and activations are not multiply-adds and not counted."""
    h, i = shape.hidden, shape.intermediate
    per_token = 4 * h * h + 2 * h * i + 2 * length * h
    return 2 * (shape.layers * length * per_token + h * h + h * shape.num_labels)


def batch_flops(shape: EncoderShape, lengths: Sequence[int], padded_length: int, rows: int | None = None
                ) -> tuple[int, int]:
    """(useful, padding) FLOPs of one batch: `lengths` are its pairs' real token counts, `padded_length` the length
    it ran at, `rows` its rows (spare rows of a static bucket count as padding; default one per pair). Useful work
    is each pair at its own length; padding is the rest of what the device computed."""
    rows = len(lengths) if rows is None else rows
    if rows < len(lengths) or any(n > padded_length for n in lengths):
        raise ValueError("a pair longer than the batch, or more pairs than rows")
    useful = sum(sequence_flops(shape, n) for n in lengths)
    return useful, rows * sequence_flops(shape, padded_length) - useful
