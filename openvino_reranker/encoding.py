"""The model head: how a (query, document) pair becomes model inputs, and how the model's logits become scores.

A head owns everything that differs between model families: the template that joins query and document, how the
tokenizer truncates the pair, which inputs the graph takes and with which pad id, which output holds the logits,
and the activation. The engine and the batcher only move arrays; they never look inside a pair or a logit.
`CrossEncoderHead` serves BERT- and XLM-R-style cross-encoders, `DecoderRerankerHead` decoder rerankers (Qwen3-Reranker
and other one-logit decoder classifiers, nemotron-style bidirectional Llama) through a `PromptTemplate`;
ARCHITECTURE.md, "Adding a model head", says how to add another.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ShapeBucket
from .errors import EXIT_CONFIG, EXIT_MODEL, PayloadTooLargeError, StartupError, error_reason
from .scoring import TRUNCATE_RIGHT, Truncation, logits_to_scores
from .textcut import TextCutter
from .vision import PreparedImage


@dataclass(frozen=True)
class EncodedPairs:
    """Token ids of (query, document) pairs, unpadded, in request order."""

    ids: list[np.ndarray]
    type_ids: list[np.ndarray]
    lengths: np.ndarray  # tokens per pair, special tokens included
    truncated: np.ndarray  # bool per pair: truncation removed tokens
    # per pair, for a vision-language head: its image and where its <IMG_CONTEXT> tokens start in `ids`, or None
    images: list[tuple[PreparedImage, int] | None] | None = None

    @staticmethod
    def concat(parts: Sequence[EncodedPairs]) -> EncodedPairs:
        if len(parts) == 1:
            return parts[0]
        images = None
        if any(p.images is not None for p in parts):
            images = [image for p in parts for image in (p.images or [None] * len(p.lengths))]
        return EncodedPairs([i for p in parts for i in p.ids], [t for p in parts for t in p.type_ids],
                            np.concatenate([p.lengths for p in parts]).astype(np.int64),
                            np.concatenate([p.truncated for p in parts]).astype(bool), images)


class DocumentError(ValueError):
    """A document a head cannot encode (an image that is broken, or too large to decode or to fit max_length):
    `index` is its position in the `texts` of that encode call, which the caller maps to the name the request gave
    it (reranker.py); `too_large` makes it a 413 rather than a 400."""

    def __init__(self, index: int, reason: str, too_large: bool = False):
        super().__init__(reason)
        self.index, self.reason, self.too_large = index, reason, too_large


@dataclass(frozen=True)
class ModelContract:
    """What the compiled graph takes and gives, as the head checked it: the inputs fed (in this order), their
    integer type, the output that holds the logits, and logits per pair."""

    input_names: tuple[str, ...]
    num_labels: int
    output_name: str = "logits"
    output_index: int = 0  # the logits' position among the model's outputs (picked by name when checked)
    input_dtype: type = np.int64


def pad_pairs(encoded: EncodedPairs, rows: Sequence[int], shape: ShapeBucket, input_names: Sequence[str],
              pad_id: int, dtype=np.int64, side: str = "right") -> dict[str, np.ndarray]:
    """Inputs for one micro-batch of the pairs at `rows`: padded with pad_id and a zero attention mask, after the
    tokens (side="right") or before them ("left"). Spare rows (static buckets) repeat the last listed row, which is
    the batch's shortest; their outputs are dropped."""
    n_rows, length = shape.rows, shape.length
    ids = np.full((n_rows, length), pad_id, dtype=dtype)
    mask = np.zeros((n_rows, length), dtype=dtype)
    types = np.zeros((n_rows, length), dtype=dtype)
    sources = list(rows) + [rows[-1]] * (n_rows - len(rows))
    for row, i in enumerate(sources):
        n = int(encoded.lengths[i])
        cols = slice(0, n) if side == "right" else slice(length - n, length)
        ids[row, cols] = encoded.ids[i]
        mask[row, cols] = 1
        types[row, cols] = encoded.type_ids[i]
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {name: feed[name] for name in input_names}


def split_windows(cutter: TextCutter, text: str, size: int, max_chunks: int) -> tuple[list[str], bool]:
    """`text` as overlapping windows of at most `size` tokens (of `cutter`'s tokenizer, which adds no special tokens
    and does not truncate), cut at word starts and ends (the tokenizer's own word ids and offsets), a quarter of a
    window overlapping the next; at most `max_chunks` of them. Returns the windows and whether text was left over.
    A text that fits is one window: itself."""
    step = size - size // 4
    text = cutter.cut(text, step * max_chunks + size)  # nothing past what the windows can reach
    enc = cutter.tokenizer.encode(text, add_special_tokens=False)
    n, words, offsets = len(enc.ids), enc.word_ids, enc.offsets
    if n <= size:
        return [text], False

    def word_start(i: int, floor: int) -> int:
        """i moved back to the first token of its word, unless that is at or before `floor` (a word longer than a
        window is split inside)."""
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


def first_tokens(tokenizer, texts: list[str], n: int) -> tuple[list[str], np.ndarray]:
    """Each text cut after its first n tokens (no special tokens), at the end offset of the n-th (the tokenizer's
    own offsets); and which texts were cut."""
    out, shortened = [], np.zeros(len(texts), dtype=bool)
    for i, (text, enc) in enumerate(zip(texts, tokenizer.encode_batch(texts, add_special_tokens=False),
                                        strict=True)):
        if len(enc.offsets) > n:
            shortened[i] = True
            text = text[:enc.offsets[n - 1][1]]
        out.append(text)
    return out, shortened


def load_tokenizer(tokenizer_path: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(tokenizer_path))
    except Exception as exc:  # tokenizers raises its own exception type for a malformed file
        raise StartupError(f"cannot load {tokenizer_path}: {error_reason(exc)}", EXIT_MODEL) from None


def _copy(tokenizer):
    """An independent copy of a tokenizer (settings such as truncation belong to the object), without padding and
    without truncation."""
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_padding()
    copy.no_truncation()
    return copy


def logit_output(model, name: str = "logits") -> int:
    """The position of the output that holds the logits: the one named `name`, or the only output."""
    named = [i for i, o in enumerate(model.outputs) if name in o.get_names()]
    if not named and len(model.outputs) == 1:
        named = [0]  # a single output is the logits, whatever its name
    if len(named) != 1:
        raise StartupError(f"the model has no output named '{name}'", EXIT_MODEL)
    return named[0]


class ModelHead(ABC):
    """What the rest of the service uses of a model head, and what every head shares. A head declares the model it
    serves (`check_contract`), writes pairs as model inputs (`encode`, then `feed` for one micro-batch, padded on
    `padding_side` with `pad_id`), cuts a long document into windows for chunking (`window_size`, `windows`) and turns
    logits into scores (`scores`, `raw_scores`); `describe` is its part of /readyz. Subclasses own the template,
    truncation and the contract; the engine and the batcher never look inside a pair or a logit."""

    kind: str = ""  # "cross-encoder", "decoder": named in /readyz and in errors
    padding_side: str = "right"  # where `feed` pads: "right" (after the tokens) or "left"
    takes_instruction: bool = False  # whether a request's `instruction` means anything to this head
    takes_images: bool = False  # whether `encode` takes ImageDocuments (a vision-language model); else text only
    max_length: int  # tokens per pair, special tokens and template included
    min_pair_tokens: int  # the shortest pair it can make (one query and one document token): buckets must hold it
    pad_id: int
    contract: ModelContract  # what the compiled graph takes and gives, as `check_contract` found it
    _counter = None  # a copy of the tokenizer that neither truncates nor pads
    _cutter: TextCutter  # cuts long texts to what truncation keeps, with _counter

    @classmethod
    @abstractmethod
    def check_contract(cls, model) -> ModelContract:
        """The inputs this head feeds and the output that holds the logits, checked on an OpenVINO model; a model it
        cannot serve is a StartupError (exit 3)."""

    @abstractmethod
    def describe(self) -> dict:
        """The head as /readyz shows it (`head`): kind, padding side, pad id, template and what else it has."""

    # ---- pairs -> inputs

    @abstractmethod
    def encode(self, query: str | Sequence[str], texts: Sequence[str], truncation: Truncation = TRUNCATE_RIGHT,
               instruction: str | None = None) -> EncodedPairs:
        """(query, text) pairs as token ids, cut to max_length as `truncation` asks; `query` is one query for every
        text or one per text, `instruction` replaces the template's default (heads that take one)."""

    @abstractmethod
    def window_size(self, query: str, instruction: str | None) -> int:
        """Tokens of a document that fit in one pair with this query (and instruction)."""

    def windows(self, query: str, text: str, max_chunks: int, instruction: str | None = None
                ) -> tuple[list[str], bool]:
        """A document as overlapping windows that each fit max_length together with the query (`split_windows`)."""
        return split_windows(self._cutter, text, max(8, self.window_size(query, instruction)), max_chunks)

    def feed(self, encoded: EncodedPairs, rows: Sequence[int], shape: ShapeBucket) -> dict[str, np.ndarray]:
        """The model's inputs for the pairs at `rows`, padded to `shape`."""
        return pad_pairs(encoded, rows, shape, self.contract.input_names, self.pad_id, self.contract.input_dtype,
                         self.padding_side)

    # ---- logits -> scores

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """float64 scores from this head's logits; a non-finite logit is an InferenceError."""
        return logits_to_scores(logits)

    @abstractmethod
    def raw_scores(self, logits: np.ndarray) -> np.ndarray:
        """The logit each score is the sigmoid of (TEI's raw_scores), float64."""


class CrossEncoderHead(ModelHead):
    """BERT / RoBERTa / XLM-R cross-encoders exported with `optimum-cli export openvino --task
    text-classification`: the tokenizer's own pair template supplies the special tokens and type ids; truncation
    is longest-first at max_length (sentence-transformers' CrossEncoder behaviour); right padding with the
    tokenizer's pad id (these models read the first position: left padding would score wrongly); the `logits`
    output is [batch, 1] (sigmoid) or [batch, 2] (the positive class's softmax probability)."""

    kind = "cross-encoder"
    REQUIRED_INPUTS = ("input_ids", "attention_mask")
    OPTIONAL_INPUTS = ("token_type_ids",)
    OUTPUT = "logits"
    padding_side = "right"
    takes_instruction = False

    def __init__(self, tokenizer, max_length: int, contract: ModelContract):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.contract = contract
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length, strategy="longest_first")
        self.pad_id = self._pad_id(tokenizer)
        # truncation settings belong to a Tokenizer object, and requests may ask for either side: one copy each
        left = _copy(tokenizer)
        left.enable_truncation(max_length, strategy="longest_first", direction="left")
        self._tokenizers = {"right": tokenizer, "left": left}
        self._counter = _copy(tokenizer)  # counts a query's tokens, untruncated
        self._cutter = TextCutter(self._counter)
        self.min_pair_tokens = self._specials() + 2  # the special tokens, one query token and one document token

    @classmethod
    def from_file(cls, tokenizer_path: Path, max_length: int, contract: ModelContract) -> CrossEncoderHead:
        return cls(load_tokenizer(tokenizer_path), max_length, contract)

    @classmethod
    def check_contract(cls, model) -> ModelContract:
        """Inputs input_ids + attention_mask (+ token_type_ids); an output named `logits` of [?, 1 or 2]."""
        names = [p.get_any_name() for p in model.inputs]
        missing = [n for n in cls.REQUIRED_INPUTS if n not in names]
        extra = [n for n in names if n not in cls.REQUIRED_INPUTS + cls.OPTIONAL_INPUTS]
        if missing or extra:
            raise StartupError(f"the model's inputs are {names}: it needs {list(cls.REQUIRED_INPUTS)} (plus "
                               f"optional token_type_ids) and nothing else", EXIT_MODEL)
        index = logit_output(model, cls.OUTPUT)
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

    def _specials(self) -> int:
        processor = self.tokenizer.post_processor
        return processor.num_special_tokens_to_add(True) if processor else 0

    def describe(self) -> dict:
        return {"kind": self.kind, "padding_side": self.padding_side, "pad_token_id": self.pad_id,
                "template": "the tokenizer's pair template"}

    # ---- pairs -> inputs

    def encode(self, query: str | Sequence[str], texts: Sequence[str], truncation: Truncation = TRUNCATE_RIGHT,
               instruction: str | None = None) -> EncodedPairs:
        """Pairs as the tokenizer's pair template makes them, truncated longest-first to max_length on the side
        asked for (each text is first cut to what that truncation can keep, see `TextCutter`). `query` is one
        query for every text, or one per text. A cross-encoder takes no instruction (the service refuses one)."""
        side = truncation.side
        tokenizer = self._tokenizers[side]
        queries = [query] * len(texts) if isinstance(query, str) else list(query)
        # Longest-first keeps at most max_length tokens of a document, and splits the budget by which of the query
        # and the document is longer: a document cut to more tokens than both max_length and the query's tokens
        # keeps both, so it is cut there (the query, at most max_query_chars, is never cut).
        keep = {q: max(self.max_length, len(self._counter.encode(q, add_special_tokens=False).ids) + 1)
                for q in set(queries)}
        texts = [self._cutter.cut(text, keep[q], side) for q, text in zip(queries, texts, strict=True)]
        shortened = np.zeros(len(texts), dtype=bool)
        if truncation.max_document_tokens is not None and truncation.max_document_tokens < self.max_length:
            texts, shortened = first_tokens(self._counter, texts, truncation.max_document_tokens)
        encodings = tokenizer.encode_batch(list(zip(queries, texts, strict=True)))
        ids = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        truncated = np.array([bool(e.overflowing) for e in encodings], dtype=bool)
        return EncodedPairs(
            ids=ids,
            type_ids=[np.asarray(e.type_ids, dtype=np.int64) for e in encodings],
            lengths=np.array([len(x) for x in ids], dtype=np.int64),
            truncated=truncated | shortened,
        )

    def window_size(self, query: str, instruction: str | None) -> int:
        """Longest-first splits max_length between the query and the window: the window gets at least half."""
        query_tokens = len(self._counter.encode(query, add_special_tokens=False).ids)
        return self.max_length - self._specials() - min(query_tokens, self.max_length // 2)

    # ---- logits -> scores

    def raw_scores(self, logits: np.ndarray) -> np.ndarray:
        """The logit whose sigmoid is the score: the single logit, or l1 - l0 for two."""
        x = np.asarray(logits, dtype=np.float64)
        return x[:, 0] if x.shape[1] == 1 else x[:, 1] - x[:, 0]


# ---- decoder rerankers

_PLACEHOLDER = re.compile(r"\{(instruction|query|document)\}")


@dataclass(frozen=True)
class PromptTemplate:
    """How a decoder reranker wants a pair written: one text with `{query}` and `{document}` (once each) and
    optionally `{instruction}`; whether the tokenizer adds its special tokens (a BOS) around it. Only the
    document is truncated (then the query, if the query alone does not fit); the template's own text is kept
    whole. Read from a JSON file (`from_json`) or taken from BUILTIN_TEMPLATES by the model's `model_type`."""

    template: str
    default_instruction: str | None = None
    add_special_tokens: bool = False
    source: str = ""  # where it came from, for /readyz and errors

    @classmethod
    def from_json(cls, text: str, source: str) -> PromptTemplate:
        """A template file's JSON: {"template": ..., "default_instruction": ..., "add_special_tokens": ...}.
        Anything else, or a template without its placeholders, is a ValueError naming what is wrong."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        unknown = sorted(data.keys() - {"template", "default_instruction", "add_special_tokens"})
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r} (allowed: add_special_tokens, default_instruction, "
                             f"template)")
        template, instruction = data.get("template"), data.get("default_instruction")
        add_special = data.get("add_special_tokens", False)
        if not isinstance(template, str):
            raise ValueError("template must be a string")
        if instruction is not None and not isinstance(instruction, str):
            raise ValueError("default_instruction must be a string")
        if not isinstance(add_special, bool):
            raise ValueError("add_special_tokens must be true or false")
        return cls(template, instruction, add_special, source).checked()

    def checked(self) -> PromptTemplate:
        found = [m.group(1) for m in _PLACEHOLDER.finditer(self.template)]
        for name in ("query", "document"):
            if found.count(name) != 1:
                raise ValueError(f"the template must hold {{{name}}} exactly once (it holds it {found.count(name)} "
                                 f"times)")
        if found.count("instruction") > 1:
            raise ValueError("the template may hold {instruction} at most once")
        if "instruction" in found and not self.default_instruction:
            raise ValueError("a template with {instruction} needs a default_instruction")
        return self

    @property
    def takes_instruction(self) -> bool:
        return "{instruction}" in self.template

    def fill(self, query: str, document: str, instruction: str | None = None
             ) -> tuple[str, tuple[int, int], tuple[int, int]]:
        """The pair's text, and the character spans of the query and the document in it. The values are put in
        in one pass, so a query that holds "{document}" stays text."""
        values = {"query": query, "document": document, "instruction": instruction or self.default_instruction or ""}
        parts, spans, at, pos = [], {}, 0, 0
        for m in _PLACEHOLDER.finditer(self.template):
            parts.append(self.template[pos:m.start()])
            at += m.start() - pos
            value = values[m.group(1)]
            spans[m.group(1)] = (at, at + len(value))
            parts.append(value)
            at += len(value)
            pos = m.end()
        parts.append(self.template[pos:])
        return "".join(parts), spans["query"], spans["document"]


QWEN3_RERANKER = PromptTemplate(
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n"
    "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
    "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    default_instruction="Given a web search query, retrieve relevant passages that answer the query",
    add_special_tokens=False, source="built-in: Qwen3-Reranker (config.json model_type qwen3)").checked()

# Templates known by config.json's model_type: a converted Qwen3-Reranker needs no template file or flag.
BUILTIN_TEMPLATES = {"qwen3": QWEN3_RERANKER}


def _spans_tokens(offsets, span: tuple[int, int], specials) -> list[int]:
    """Positions of the tokens whose characters overlap `span` (special tokens never do)."""
    lo, hi = span
    return [i for i, (start, end) in enumerate(offsets) if not specials[i] and start < hi and end > lo]


class DecoderRerankerHead(ModelHead):
    """Decoder rerankers served as one-logit classifiers: a Qwen3-Reranker (or Qwen2, Llama...) converted to
    `*ForSequenceClassification` with the "yes" minus "no" rows of its LM head and exported with `optimum-cli
    export openvino --task text-classification`, or a bidirectional Llama with mean pooling (nemotron-style,
    exported by tools/export_nemotron.py). The pair is written by a PromptTemplate and tokenized whole; when it is
    longer than max_length the document's tokens are removed (from its end, or its start with side="left"), then
    the query's, never the template's. Padding is on the left with the model's pad_token_id: the graph pools the
    last position that is not a pad id (or averages over the attention mask), and left padding keeps every pair's
    last real token in the last position whatever id the graph compares with. score = sigmoid(logit)."""

    kind = "decoder"
    REQUIRED_INPUTS = ("input_ids", "attention_mask")
    OUTPUT = "logits"
    padding_side = "left"

    def __init__(self, tokenizer, max_length: int, contract: ModelContract, template: PromptTemplate, pad_id: int):
        # one copy that neither truncates nor pads: the head truncates by token positions itself
        self.tokenizer = self._counter = _copy(tokenizer)
        self._cutter = TextCutter(self._counter)
        self.max_length = max_length
        self.contract = contract
        self.template = template
        self.pad_id = pad_id
        self.takes_instruction = template.takes_instruction
        empty = self.template_tokens()
        self.min_pair_tokens = empty + 2
        if self.min_pair_tokens > max_length:
            raise StartupError(f"max_length {max_length} cannot hold the prompt template ({template.source}), "
                               f"which takes {empty} tokens with an empty query and document: raise --max-length",
                               EXIT_CONFIG)

    @classmethod
    def check_contract(cls, model) -> ModelContract:
        """Inputs input_ids + attention_mask; an output named `logits` of [?, 1]."""
        names = [p.get_any_name() for p in model.inputs]
        if sorted(names) != sorted(cls.REQUIRED_INPUTS):
            raise StartupError(f"the model's inputs are {names}: a decoder reranker needs exactly "
                               f"{list(cls.REQUIRED_INPUTS)} (export with optimum-cli --task text-classification)",
                               EXIT_MODEL)
        index = logit_output(model, cls.OUTPUT)
        shape = model.outputs[index].get_partial_shape()
        if shape.rank.is_dynamic or shape.rank.get_length() != 2 or shape[1].is_dynamic or shape[1].get_length() != 1:
            raise StartupError(f"the model's logits have shape {shape}: a decoder reranker gives [batch, 1] (convert "
                               f"the LM head's yes/no rows into one label first; see docs/models.md)", EXIT_MODEL)
        dtype = model.input("input_ids").get_element_type().to_dtype().type
        return ModelContract(cls.REQUIRED_INPUTS, 1, cls.OUTPUT, index, dtype)

    def template_tokens(self, query: str = "", instruction: str | None = None) -> int:
        """Tokens of the template with this query and instruction and an empty document."""
        text, _, _ = self.template.fill(query, "", instruction)
        return len(self._counter.encode(text, add_special_tokens=self.template.add_special_tokens).ids)

    def describe(self) -> dict:
        return {"kind": self.kind, "padding_side": self.padding_side, "pad_token_id": self.pad_id,
                "template": self.template.source, "takes_instruction": self.takes_instruction,
                "default_instruction": self.template.default_instruction if self.takes_instruction else None}

    # ---- pairs -> inputs

    def encode(self, query: str | Sequence[str], texts: Sequence[str], truncation: Truncation = TRUNCATE_RIGHT,
               instruction: str | None = None) -> EncodedPairs:
        queries = [query] * len(texts) if isinstance(query, str) else list(query)
        return self._encode_prompts(queries, list(texts), truncation, instruction, self.template,
                                    [self.max_length] * len(texts))

    def _encode_prompts(self, queries: list[str], texts: list[str], truncation: Truncation,
                        instruction: str | None, template: PromptTemplate, budgets: Sequence[int]) -> EncodedPairs:
        """The pairs written by `template`, each cut to its own budget of tokens (max_length, less what a pair's
        image takes for a vision-language head)."""
        side = truncation.side
        # a document keeps at most its budget of tokens (fewer: the template takes some)
        texts = [self._cutter.cut(text, int(budget), side) for text, budget in zip(texts, budgets, strict=True)]
        shortened = np.zeros(len(texts), dtype=bool)
        if truncation.max_document_tokens is not None and truncation.max_document_tokens < self.max_length:
            texts, shortened = first_tokens(self._counter, texts, truncation.max_document_tokens)
        filled = [template.fill(q, t, instruction) for q, t in zip(queries, texts, strict=True)]
        encodings = self._counter.encode_batch([text for text, _, _ in filled],
                                               add_special_tokens=template.add_special_tokens)
        ids, truncated = [], np.zeros(len(texts), dtype=bool)
        for i, ((_, query_span, doc_span), enc, budget) in enumerate(zip(filled, encodings, budgets, strict=True)):
            kept = np.asarray(enc.ids, dtype=np.int64)
            excess = len(kept) - int(budget)
            if excess > 0:
                kept = np.delete(kept, self._drop(enc, doc_span, query_span, excess, side))
                truncated[i] = True
                if len(kept) > budget:  # only a long instruction can leave too much
                    raise PayloadTooLargeError(f"the prompt template with this instruction takes more than "
                                               f"max_length ({self.max_length} tokens)", "instruction")
            ids.append(kept)
        return EncodedPairs(ids=ids, type_ids=[np.zeros(len(x), dtype=np.int64) for x in ids],
                            lengths=np.array([len(x) for x in ids], dtype=np.int64), truncated=truncated | shortened)

    @staticmethod
    def _drop(enc, doc_span, query_span, excess: int, side: str) -> list[int]:
        """Which token positions to remove: the document's (from its end, or from its start with side="left"),
        then, if the query alone does not fit, the query's from its end."""
        specials = enc.special_tokens_mask
        doc = _spans_tokens(enc.offsets, doc_span, specials)
        doc = doc[::-1] if side == "right" else doc
        drop = doc[:excess]
        if len(drop) < excess:
            taken = set(drop)
            query = _spans_tokens(enc.offsets, query_span, specials)[::-1]
            drop += [i for i in query if i not in taken][:excess - len(drop)]
        return drop

    def window_size(self, query: str, instruction: str | None) -> int:
        """What the template with this query and instruction leaves of max_length."""
        return self.max_length - self.template_tokens(query, instruction)

    # ---- logits -> scores

    def raw_scores(self, logits: np.ndarray) -> np.ndarray:
        return np.asarray(logits, dtype=np.float64)[:, 0]
