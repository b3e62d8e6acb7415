"""The model head: how a (query, document) pair becomes model inputs, and how the model's logits become scores.

A head owns everything that differs between model families: the template that joins query and document, how the
tokenizer truncates the pair, which inputs the graph takes and with which pad id, which output holds the logits,
and the activation. The engine and the batcher only move arrays; they never look inside a pair or a logit.
`CrossEncoderHead` serves BERT- and XLM-R-style cross-encoders; README.md, "Development", says how to add another.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ShapeBucket
from .errors import EXIT_MODEL, StartupError, error_reason
from .scoring import logits_to_scores


@dataclass(frozen=True)
class EncodedPairs:
    """Token ids of (query, document) pairs, unpadded, in request order."""

    ids: list[np.ndarray]
    type_ids: list[np.ndarray]
    lengths: np.ndarray  # tokens per pair, special tokens included
    truncated: np.ndarray  # bool per pair: truncation removed tokens

    @staticmethod
    def concat(parts: Sequence[EncodedPairs]) -> EncodedPairs:
        if len(parts) == 1:
            return parts[0]
        return EncodedPairs([i for p in parts for i in p.ids], [t for p in parts for t in p.type_ids],
                            np.concatenate([p.lengths for p in parts]).astype(np.int64),
                            np.concatenate([p.truncated for p in parts]).astype(bool))


@dataclass(frozen=True)
class ModelContract:
    """What the compiled graph takes and gives, as the head checked it: the inputs fed (in this order), their
    integer type, the output that holds the logits, and logits per pair."""

    input_names: tuple[str, ...]
    num_labels: int
    output_name: str = "logits"
    output_index: int = 0  # the logits' position among the model's outputs (picked by name when checked)
    input_dtype: type = np.int64


_WORD = re.compile(r"[^ ]+")


@dataclass(frozen=True)
class Truncation:
    """How a request wants its pairs cut to max_length: from the end (`right`, the default) or the start (`left`,
    TEI's truncation_direction), each document first cut after its first `max_document_tokens` tokens (Cohere's
    max_tokens_per_doc), and whether cutting is allowed at all (TEI's truncate=false: a pair that does not fit is
    an error)."""

    side: str = "right"
    max_document_tokens: int | None = None
    allowed: bool = True
    max_chunks: int | None = None  # chunk instead: a long document is scored as its best of up to this many windows


TRUNCATE_RIGHT = Truncation()


def cut_to_words(text: str, words: int, side: str = "right") -> str:
    """`text` up to the end of its `words`-th space-separated word that holds a letter or a digit (from the start
    of its `words`-th last such word with side="left"); the whole text if it has fewer. Its cost is proportional
    to `words`, not to the text: it is what keeps a 100,000-character document from costing seconds of
    tokenizing. Tokenizers that split at spaces (WordPiece, byte-level BPE, Metaspace) give at least one token per
    such word and never join tokens across a space, so the cut text's tokens are the first (last) tokens of the
    whole text, and there are at least `words` of them. `CrossEncoderHead.encode` picks `words` so that
    longest-first truncation keeps exactly what it keeps of the whole text."""
    if side == "left":  # the same, counted from the end: the text from the start of its `words`-th last word
        flipped = cut_to_words(text[::-1], words)
        return text[len(text) - len(flipped):]
    count = 0
    for match in _WORD.finditer(text):
        if any(c.isalnum() for c in match.group()):
            count += 1
            if count == words:
                return text[:match.end()]
    return text


def pad_pairs(encoded: EncodedPairs, rows: Sequence[int], shape: ShapeBucket, input_names: Sequence[str],
              pad_id: int, dtype=np.int64) -> dict[str, np.ndarray]:
    """Inputs for one micro-batch of the pairs at `rows`: right-padded with pad_id and a zero attention mask.
    Spare rows (static buckets) repeat the last listed row, which is the batch's shortest; their outputs are
    dropped."""
    n_rows, length = shape.rows, shape.length
    ids = np.full((n_rows, length), pad_id, dtype=dtype)
    mask = np.zeros((n_rows, length), dtype=dtype)
    types = np.zeros((n_rows, length), dtype=dtype)
    sources = list(rows) + [rows[-1]] * (n_rows - len(rows))
    for row, i in enumerate(sources):
        n = int(encoded.lengths[i])
        ids[row, :n] = encoded.ids[i]
        mask[row, :n] = 1
        types[row, :n] = encoded.type_ids[i]
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {name: feed[name] for name in input_names}


class CrossEncoderHead:
    """BERT / RoBERTa / XLM-R cross-encoders exported with `optimum-cli export openvino --task
    text-classification`: the tokenizer's own pair template supplies the special tokens and type ids; truncation
    is longest-first at max_length (sentence-transformers' CrossEncoder behaviour); right padding with the
    tokenizer's pad id; the `logits` output is [batch, 1] (sigmoid) or [batch, 2] (the positive class's softmax
    probability)."""

    kind = "cross-encoder"
    REQUIRED_INPUTS = ("input_ids", "attention_mask")
    OPTIONAL_INPUTS = ("token_type_ids",)
    OUTPUT = "logits"

    def __init__(self, tokenizer, max_length: int, contract: ModelContract):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.contract = contract
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length, strategy="longest_first")
        self.pad_id = self._pad_id(tokenizer)
        # truncation settings belong to a Tokenizer object, and requests may ask for either side: one copy each
        from tokenizers import Tokenizer

        left = Tokenizer.from_str(tokenizer.to_str())
        left.no_padding()
        left.enable_truncation(max_length, strategy="longest_first", direction="left")
        self._tokenizers = {"right": tokenizer, "left": left}
        self._counter = Tokenizer.from_str(tokenizer.to_str())  # counts a query's tokens, untruncated
        self._counter.no_truncation()

    @staticmethod
    def load_tokenizer(tokenizer_path: Path):
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # tokenizers raises its own exception type for a malformed file
            raise StartupError(f"cannot load {tokenizer_path}: {error_reason(exc)}", EXIT_MODEL) from None

    @classmethod
    def from_file(cls, tokenizer_path: Path, max_length: int, contract: ModelContract) -> CrossEncoderHead:
        return cls(cls.load_tokenizer(tokenizer_path), max_length, contract)

    @classmethod
    def check_contract(cls, model) -> ModelContract:
        """Inputs input_ids + attention_mask (+ token_type_ids); an output named `logits` of [?, 1 or 2]."""
        names = [p.get_any_name() for p in model.inputs]
        missing = [n for n in cls.REQUIRED_INPUTS if n not in names]
        extra = [n for n in names if n not in cls.REQUIRED_INPUTS + cls.OPTIONAL_INPUTS]
        if missing or extra:
            raise StartupError(f"the model's inputs are {names}: it needs {list(cls.REQUIRED_INPUTS)} (plus "
                               f"optional token_type_ids) and nothing else", EXIT_MODEL)
        named = [i for i, o in enumerate(model.outputs) if cls.OUTPUT in o.get_names()]
        if not named and len(model.outputs) == 1:
            named = [0]  # a single output is the logits, whatever its name
        if len(named) != 1:
            raise StartupError(f"the model has no output named '{cls.OUTPUT}'", EXIT_MODEL)
        index = named[0]
        shape = model.outputs[index].get_partial_shape()
        if shape.rank.is_dynamic or shape.rank.get_length() != 2 or shape[1].is_dynamic or \
                shape[1].get_length() not in (1, 2):
            raise StartupError(f"the model's logits have shape {shape}: a cross-encoder gives [batch, 1] or "
                               f"[batch, 2]", EXIT_MODEL)
        ordered = tuple(n for n in cls.REQUIRED_INPUTS + cls.OPTIONAL_INPUTS if n in names)
        dtype = model.input("input_ids").get_element_type().to_dtype().type
        return ModelContract(ordered, shape[1].get_length(), cls.OUTPUT, index, dtype)

    @staticmethod
    def _pad_id(tokenizer) -> int:
        if tokenizer.padding and tokenizer.padding.get("pad_id") is not None:
            return int(tokenizer.padding["pad_id"])
        for token in ("[PAD]", "<pad>", "<|pad|>"):
            token_id = tokenizer.token_to_id(token)
            if token_id is not None:
                return token_id
        return 0

    # ---- pairs -> inputs

    def encode(self, query: str | Sequence[str], texts: Sequence[str],
               truncation: Truncation = TRUNCATE_RIGHT) -> EncodedPairs:
        """Pairs as the tokenizer's pair template makes them, truncated longest-first to max_length on the side
        asked for (each text is first cut to what that truncation can keep, see `cut_to_words`). `query` is one
        query for every text, or one per text."""
        side = truncation.side
        tokenizer = self._tokenizers[side]
        queries = [query] * len(texts) if isinstance(query, str) else list(query)
        # Longest-first keeps at most max_length tokens of a document, and splits the budget by which of the query
        # and the document is longer: a document cut after more words than both max_length and the query's
        # tokens keeps both, so it is cut there (the query, at most max_query_chars, is never cut).
        words = {q: max(self.max_length, len(self._counter.encode(q, add_special_tokens=False).ids) + 1)
                 for q in set(queries)}
        texts = [cut_to_words(text, words[q], side) for q, text in zip(queries, texts, strict=True)]
        shortened = np.zeros(len(texts), dtype=bool)
        if truncation.max_document_tokens is not None and truncation.max_document_tokens < self.max_length:
            texts, shortened = self._first_tokens(texts, truncation.max_document_tokens)
        encodings = tokenizer.encode_batch(list(zip(queries, texts, strict=True)))
        ids = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        truncated = np.array([bool(e.overflowing) for e in encodings], dtype=bool)
        return EncodedPairs(
            ids=ids,
            type_ids=[np.asarray(e.type_ids, dtype=np.int64) for e in encodings],
            lengths=np.array([len(x) for x in ids], dtype=np.int64),
            truncated=truncated | shortened,
        )

    def windows(self, query: str, text: str, max_chunks: int) -> tuple[list[str], bool]:
        """A document as overlapping windows that each fit max_length together with the query, cut at word
        starts and ends (the tokenizer's own word ids and offsets), a quarter of a window overlapping the next;
        at most `max_chunks` of them. Returns the windows and whether text was left over. A document that fits
        is one window: itself."""
        specials = self.tokenizer.post_processor.num_special_tokens_to_add(True) if self.tokenizer.post_processor \
            else 0
        query_tokens = len(self._counter.encode(query, add_special_tokens=False).ids)
        size = max(8, self.max_length - specials - min(query_tokens, self.max_length // 2))
        step = size - size // 4
        text = cut_to_words(text, step * max_chunks + size)  # nothing past what the windows can reach
        enc = self._counter.encode(text, add_special_tokens=False)
        n, words, offsets = len(enc.ids), enc.word_ids, enc.offsets
        if n <= size:
            return [text], False

        def word_start(i: int, floor: int) -> int:
            """i moved back to the first token of its word, unless that is at or before `floor` (a word longer
            than a window is split inside)."""
            j = i
            while floor < j < n and words[j] is not None and words[j] == words[j - 1]:
                j -= 1
            return j if j > floor else i

        windows, start = [], 0
        while start < n and len(windows) < max_chunks:
            end = min(n, start + size)
            if end < n:
                end = word_start(end, start)
            windows.append(text[offsets[start][0]:offsets[end - 1][1]])
            if end >= n:
                return windows, False
            start = max(start + 1, word_start(end - size // 4, start))
        return windows, True

    def _first_tokens(self, texts: list[str], n: int) -> tuple[list[str], np.ndarray]:
        """Each text cut after its first n tokens, at the end offset of the n-th (the tokenizer's own offsets)."""
        out, shortened = [], np.zeros(len(texts), dtype=bool)
        for i, (text, enc) in enumerate(zip(texts, self.tokenizer.encode_batch(texts, add_special_tokens=False),
                                            strict=True)):
            if len(enc.offsets) > n:
                shortened[i] = True
                text = text[:enc.offsets[n - 1][1]]
            out.append(text)
        return out, shortened

    def feed(self, encoded: EncodedPairs, rows: Sequence[int], shape: ShapeBucket) -> dict[str, np.ndarray]:
        return pad_pairs(encoded, rows, shape, self.contract.input_names, self.pad_id, self.contract.input_dtype)

    # ---- logits -> scores

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """float64 scores from this head's logits; a non-finite logit is an InferenceError."""
        return logits_to_scores(logits)

    def raw_scores(self, logits: np.ndarray) -> np.ndarray:
        """The logit whose sigmoid is the score: the single logit, or l1 - l0 for two."""
        x = np.asarray(logits, dtype=np.float64)
        return x[:, 0] if x.shape[1] == 1 else x[:, 1] - x[:, 0]
