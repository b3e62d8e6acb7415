"""Batching and shapes: pure functions that slice rounds across requests and plan micro-batches (padding them is the
model head's job)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .config import ShapeBucket


@dataclass(frozen=True)
class MicroBatch:
    indices: tuple[int, ...]  # positions in the request, longest first
    shape: ShapeBucket  # rows >= len(indices); spare rows are filled and their scores dropped
    static: bool  # True: shape is a compiled bucket; False: a dynamic shape


def length_order(lengths: Sequence[int]) -> list[int]:
    """Indices by descending length, ties by ascending index (a stable order, so plans are reproducible)."""
    return sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))


def slice_round(pending: Sequence[Sequence[int]], max_pairs: int, max_tokens: int) -> list[int]:
    """How many pairs each waiting request gives to the next round: `pending` holds, in queue order, the token
    lengths of each request's pairs not yet planned, in the order they are to run. The requests take their turn in
    order, each giving pairs until the round holds `max_pairs` pairs or its tokens reach `max_tokens` (the pair that
    crosses it still goes, so a round always takes at least one pair); a request the round does not reach gives 0.
    """
    counts = []
    pairs_left, tokens_left = max_pairs, max_tokens
    for lengths in pending:
        n = 0
        while n < len(lengths) and n < pairs_left and tokens_left > 0:
            tokens_left -= int(lengths[n])
            n += 1
        pairs_left -= n
        counts.append(n)
    return counts


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def pick_length(length: int, bucket_lengths: Sequence[int]) -> int:
    """The smallest bucket length that holds `length` tokens."""
    for candidate in bucket_lengths:
        if candidate >= length:
            return candidate
    raise ValueError(f"{length} tokens fit no bucket (largest {max(bucket_lengths)})")


def chunk_bounds(count: int, batch_size: int, parallel: int = 1) -> list[int]:
    """Where `count` length-sorted pairs are cut into dynamic micro-batches: chunks of `batch_size` (the last one
    smaller); with `parallel` > 1 (batches that run side by side, one per replica) the number of chunks is rounded
    up to a multiple of `parallel` and the pairs are shared out evenly, so that no replica is left with a short
    tail while another runs a second full batch (20 pairs on two replicas: 5, 5, 5, 5 rather than 8, 8, 4)."""
    chunks = -(-count // batch_size)
    if parallel <= 1 or chunks == 0:
        return [*range(0, count, batch_size), count]
    chunks = min(count, _round_up(chunks, parallel))
    return [count * k // chunks for k in range(chunks + 1)]


def plan_batches(lengths: Sequence[int], buckets: Sequence[ShapeBucket] | None, batch_size: int,
                 max_length: int, pad_multiple: int = 8, parallel: int = 1) -> list[MicroBatch]:
    """Group pairs sorted by length into micro-batches so that little padding is computed.

    Dynamic shapes: chunks of `batch_size` (`chunk_bounds`: evenly shared when `parallel` batches run at once),
    each padded to its longest pair rounded up to `pad_multiple` (fewer distinct shapes for the CPU plugin), never
    beyond `max_length`.
    Static buckets: each pair goes to the smallest bucket length that holds it; within a length, full batches use
    the bucket with the most rows and the remainder the smallest bucket whose rows hold it.
    """
    order = length_order(lengths)
    plan = []
    if buckets is None:
        bounds = chunk_bounds(len(order), batch_size, parallel)
        for start, end in zip(bounds, bounds[1:], strict=False):
            chunk = tuple(order[start:end])
            longest = int(lengths[chunk[0]])
            plan.append(MicroBatch(chunk, ShapeBucket(len(chunk), min(_round_up(longest, pad_multiple), max_length)),
                                   static=False))
        return plan
    bucket_lengths = sorted({b.length for b in buckets})
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(pick_length(int(lengths[i]), bucket_lengths), []).append(i)
    for length in sorted(groups, reverse=True):
        members = groups[length]
        shapes = sorted((b for b in buckets if b.length == length), key=lambda b: b.rows)
        largest = shapes[-1]
        while members:
            if len(members) >= largest.rows:
                shape = largest
            else:
                shape = next(b for b in shapes if b.rows >= len(members))
            take, members = members[:shape.rows], members[shape.rows:]
            plan.append(MicroBatch(tuple(take), shape, static=True))
    return plan
