"""A model's own reference scores: `reference_scores.json` beside the IR, written when the model is exported.

It holds pairs (query, document and, for a template that takes one, the instruction) and the score the original
model (torch, before conversion) gave each, as this service scores: sigmoid of the one logit (of l1 - l0 for two).
The startup guard scores the same pairs through the model head and the compiled IR and compares (parity.py): that
is what catches a wrong prompt template, pad id or tokenizer, which comparing two compiles of one IR cannot. The
export tools write the file with `reference_scores_json`; docs/models.md, "Reference scores", has the format and
SPEC.md, "Reference scores", the check. This module only reads and writes the format: standard library only, so
that export tools can import it.

A vision-language model's pairs may hold a page image: `image` is the image file (PNG or JPEG) in standard base64,
and the document is then that image with `document` as its text (which may be empty).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

FILE_NAME = "reference_scores.json"
FORMAT = "openvino-reranker reference scores"
VERSION = 1
SCORE_KIND = "sigmoid"  # the service's score: sigmoid(logit), or sigmoid(l1 - l0) = softmax(l)[1] for two logits
MAX_PAIRS = 1000  # each is scored at every start: a few dozen is plenty
FIELDS = ("format", "version", "score", "max_length", "tolerance", "produced_by", "pairs")
PAIR_FIELDS = ("query", "document", "instruction", "score", "image")
MAX_IMAGE_BYTES = 4 << 20  # an image of a reference pair: a small page is plenty

# Pairs for an export tool that has no cases of its own: short (no truncation at 128 tokens), some relevant and some
# not, so that scores spread.
EXPORT_PAIRS = (
    ("what is the capital of france", "Paris is the capital and largest city of France."),
    ("what is the capital of france", "Bread is baked from flour, water, salt and yeast."),
    ("how do solar panels work", "Photovoltaic cells turn sunlight directly into electricity."),
    ("how do solar panels work", "The museum is closed on Mondays."),
    ("boiling point of water", "Water boils at one hundred degrees Celsius at sea level."),
    ("boiling point of water", "The train to the airport leaves every fifteen minutes."),
    ("who wrote hamlet", "Hamlet is a tragedy written by William Shakespeare around 1600."),
    ("who wrote hamlet", "Coffee is one of the most popular drinks in the world."),
)


@dataclass(frozen=True)
class ReferencePair:
    query: str
    document: str
    instruction: str | None  # None: the template takes no instruction (a template that takes one names it)
    score: float
    image: bytes | None = None  # a vision-language pair's image file; `document` is then its text ("" for none)


@dataclass(frozen=True)
class ReferenceScores:
    """The file's content. `tolerance`: how far an exact (f32) run of this IR through the right head may be from
    these scores (the export's own error: fp16 or INT8 weights). `max_length`: the tokens per pair the scores were
    made with (longer pairs were truncated as the service truncates); None when no pair was truncated."""

    pairs: tuple[ReferencePair, ...]
    tolerance: float
    max_length: int | None
    produced_by: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""  # the file it was read from


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _unknown(data: Mapping, allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} in {where} (allowed: {', '.join(allowed)})")


def _pair(data: Any, n: int) -> ReferencePair:
    where = f"pairs[{n}]"
    if not isinstance(data, dict):
        raise ValueError(f"{where} is not an object")
    _unknown(data, PAIR_FIELDS, where)
    query, document, instruction, score, image = (data.get(k) for k in PAIR_FIELDS)
    if not isinstance(query, str) or not query.strip():
        raise ValueError(f"{where}.query must be a non-empty string")
    if image is not None:
        if not isinstance(image, str) or not image:
            raise ValueError(f"{where}.image must be a non-empty base64 string or absent")
        try:
            image = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{where}.image is not valid base64") from None
        if len(image) > MAX_IMAGE_BYTES:
            raise ValueError(f"{where}.image is larger than {MAX_IMAGE_BYTES} bytes")
        if not isinstance(document, str):
            raise ValueError(f"{where}.document must be a string (the image's text, may be empty)")
    elif not isinstance(document, str) or not document.strip():
        raise ValueError(f"{where}.document must be a non-empty string")
    if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
        raise ValueError(f"{where}.instruction must be a non-empty string or absent")
    if not _number(score) or not 0.0 <= score <= 1.0:
        raise ValueError(f"{where}.score must be a number from 0 to 1")
    return ReferencePair(query, document, instruction, float(score), image)


def parse_reference_scores(text: str, source: str = "") -> ReferenceScores:
    """The file's JSON, checked field by field; anything else is a ValueError naming what is wrong."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    _unknown(data, FIELDS, "the file")
    if data.get("format") != FORMAT:
        raise ValueError(f"format must be {FORMAT!r}")
    if data.get("version") != VERSION:
        raise ValueError(f"version {data.get('version')!r} is not supported (this server reads version {VERSION})")
    if data.get("score") != SCORE_KIND:
        raise ValueError(f"score must be {SCORE_KIND!r} (the service's score, sigmoid of the logit)")
    max_length, tolerance = data.get("max_length"), data.get("tolerance")
    if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1):
        raise ValueError("max_length must be a positive integer or null")
    if not _number(tolerance) or not 0.0 < tolerance < 1.0:
        raise ValueError("tolerance must be a number above 0 and below 1")
    if not isinstance(data.get("produced_by"), dict):
        raise ValueError("produced_by must be an object saying what made the scores")
    pairs = data.get("pairs")
    if not isinstance(pairs, list) or not 1 <= len(pairs) <= MAX_PAIRS:
        raise ValueError(f"pairs must be a list of 1 to {MAX_PAIRS} pairs")
    return ReferenceScores(tuple(_pair(p, n) for n, p in enumerate(pairs)), float(tolerance), max_length,
                           data["produced_by"], source)


def reference_scores_json(pairs: Iterable[tuple], tolerance: float,
                          max_length: int | None, produced_by: Mapping[str, Any]) -> str:
    """The file's text for (query, document, instruction or None, score) pairs, or (query, document, instruction,
    score, image file bytes or None) for a vision-language model's; checked by reading it back."""

    def pair(q, d, i, s, image=None) -> dict:
        return {"query": q, "document": d, **({"instruction": i} if i is not None else {}), "score": s,
                **({"image": base64.b64encode(image).decode("ascii")} if image is not None else {})}

    body = {"format": FORMAT, "version": VERSION, "score": SCORE_KIND, "max_length": max_length,
            "tolerance": tolerance, "produced_by": dict(produced_by), "pairs": [pair(*p) for p in pairs]}
    text = json.dumps(body, indent=1, ensure_ascii=False) + "\n"
    parse_reference_scores(text)
    return text


def tolerance_for(measured: float, floor: float = 1e-4) -> float:
    """The tolerance to write for an export whose IR (at f32) was measured `measured` from the original model's
    scores: 1.25 times that, rounded up to one significant digit, and at least `floor`."""
    wanted = max(floor, 1.25 * measured)
    exponent = math.floor(math.log10(wanted))
    digit = math.ceil(round(wanted / 10 ** exponent, 9))
    return float(f"{digit}e{exponent}")
