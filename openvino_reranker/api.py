"""The wire, inbound: the JSON codec and request parsing per API dialect, into one `RerankRequest` (what each dialect
answers, and the dialect table that joins both, are dialects.py's). The field names of scoring requests appear only
here. It depends on errors, config and scoring alone, and on images for the magic bytes of PNG and JPEG (an image
document is sniffed here, never decoded: Pillow is not imported on the wire).
"""

from __future__ import annotations

import binascii
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .config import TIMEOUT_MS, Config, IntRange
from .errors import DOCUMENTS, BadRequestError, DocumentNames, PayloadTooLargeError
from .images import image_format
from .scoring import TRUNCATE_RIGHT, ImageDocument, Truncation

# ---- JSON


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def decode_json(raw: bytes) -> Any:
    """A request body: UTF-8 JSON without NaN, Infinity or numbers that overflow to them."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequestError(f"the body is not valid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise BadRequestError("the body is not valid JSON: nested too deeply") from None
    except ValueError as exc:
        raise BadRequestError(f"the body is not valid JSON: {exc}") from None


def encode_json(payload: Any) -> bytes:
    """A response body. Strings a client sent are echoed in some answers; a lone surrogate among them (JSON allows
    "\\ud800") is written back as the same escape instead of failing the whole answer."""
    return json.dumps(payload, ensure_ascii=False, allow_nan=False).encode("utf-8", "backslashreplace")


# ---- requests


@dataclass(frozen=True)
class Document:
    index: int
    text: str  # an image document's text ("" for none)
    id: str | int | None = None
    original: Any = None  # the object as sent (echoed on the Cohere route with return_documents)
    query: str | None = None  # its own query (the pairs dialect), else the request's
    image: ImageDocument | None = None  # an image document's image (with `text`), once its bytes are here
    image_url: str | None = None  # an image sent as an http(s) URL, fetched after the whole body was parsed
    image_field: str | None = None  # where the body holds the image (`documents[3].image`), for errors

    @property
    def is_image(self) -> bool:
        return self.image is not None or self.image_url is not None

    @property
    def content(self) -> str | ImageDocument:
        """What is scored: the text, or the ImageDocument (an image URL must have been fetched first)."""
        if self.image_url is not None and self.image is None:
            raise ValueError(f"{self.image_field} has not been fetched")
        return self.image if self.image is not None else self.text


@dataclass(frozen=True)
class RerankRequest:
    query: str
    documents: tuple[Document, ...]
    top_k: int | None
    return_documents: bool
    model: str | None = None
    timeout_ms: int | None = None
    truncation: Truncation = TRUNCATE_RIGHT
    raw_scores: bool = False  # TEI: the model's logit instead of the 0..1 score
    instruction: str | None = None  # decoder rerankers whose prompt template takes one; else the template's default
    names: DocumentNames = DOCUMENTS  # how the body named its documents (errors found after parsing name them so)


@dataclass(frozen=True)
class RequestLimits:
    """Checked while parsing, before anything is tokenized (a 50 MB string costs a length check)."""

    max_documents: int
    max_query_chars: int
    max_document_chars: int
    max_image_bytes: int = 10 * 1024 * 1024
    max_images_per_request: int = 64
    image_url_hosts: tuple[str, ...] = ()  # hosts whose image URLs may be fetched; none: image URLs are refused

    @classmethod
    def from_config(cls, config: Config) -> RequestLimits:
        return cls(config.max_documents, config.max_query_chars, config.max_document_chars, config.max_image_bytes,
                   config.max_images_per_request, config.image_url_hosts)


NATIVE_FIELDS = {"query", "documents", "top_k", "return_documents", "timeout_ms", "truncation_direction",
                 "max_chunks_per_doc", "instruction"}
NATIVE_DOCUMENT_FIELDS = {"id", "text", "image", "content"}
COHERE_UNSUPPORTED = {  # fields that would change results if they were ignored
    "rank_fields": "rank_fields is not supported: send each document as a string or as {\"text\": ...}",
    "relevant_spans": "relevant_spans is not supported: only scores are returned",
}
TEI_TEXTS = DocumentNames("texts", "texts")
NIM_PASSAGES = DocumentNames("passages", "passages")
BARE_PAIRS = DocumentNames("pairs", "")  # a bare array: its entries are [0], [1], ...
MAX_TOKENS = IntRange(1, 1_000_000)
MAX_CHUNKS = IntRange(1, 1000)


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _require_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise BadRequestError(f"the request body must be a JSON object, not {_type_name(body)}")
    return body


def _check_encodable(value: str, path: str) -> None:
    """JSON may carry lone surrogates (\\ud800); they are not text the tokenizer can take."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequestError(f"{path} contains an unpaired surrogate at character {exc.start}", path) from None


def _parse_string(value: Any, path: str, max_chars: int, limit_name: str) -> str:
    """A non-empty text: the length limit is checked before anything else looks at it."""
    if not isinstance(value, str):
        raise BadRequestError(f"{path} must be a string, not {_type_name(value)}", path)
    if len(value) > max_chars:
        raise PayloadTooLargeError(f"{path} has {len(value)} characters; the limit ({limit_name}) is {max_chars}",
                                   path)
    if not value.strip():
        raise BadRequestError(f"{path} must not be empty or whitespace only", path)
    _check_encodable(value, path)
    return value


def _parse_query(body: dict, limits: RequestLimits, path: str = "query") -> str:
    if "query" not in body:
        raise BadRequestError(f"{path} is required", path)
    return _parse_string(body["query"], path, limits.max_query_chars, "max_query_chars")


def _parse_positive_int(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequestError(f"{name} must be an integer >= 1, not {_type_name(value)}", name)
    if value < 1:
        raise BadRequestError(f"{name} must be >= 1, got {value}", name)
    return value


def _parse_bounded_int(body: dict, name: str, bounds: IntRange) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not bounds.lo <= value <= bounds.hi:
        shown = _type_name(value) if isinstance(value, bool) or not isinstance(value, int) else \
            (str(value) if len(str(value)) <= 20 else "a longer integer")
        raise BadRequestError(f"{name} must be an integer {bounds.lo}..{bounds.hi}, not {shown}", name)
    return value


def _parse_model(body: dict) -> str | None:
    """A compatibility body's model name: any string (the loaded model answers whatever is named)."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequestError(f"model must be a string, not {_type_name(model)}", "model")
    return model


def _parse_bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise BadRequestError(f"{name} must be true or false, not {_type_name(value)}", name)
    return value


def _parse_text(value: Any, path: str, limits: RequestLimits) -> str:
    return _parse_string(value, path, limits.max_document_chars, "max_document_chars")


def _parse_documents(body: dict, limits: RequestLimits, parse_one: Callable[[int, Any], Document],
                     key: str = DOCUMENTS.array) -> tuple:
    if key not in body:
        raise BadRequestError(f"{key} is required", key)
    docs = body[key]
    if not isinstance(docs, list):
        raise BadRequestError(f"{key} must be an array, not {_type_name(docs)}", key)
    return _parse_list(docs, limits, parse_one, key)


def _parse_list(docs: list, limits: RequestLimits, parse_one: Callable[[int, Any], Document], key: str) -> tuple:
    if not docs:
        raise BadRequestError(f"{key} must not be empty", key)
    if len(docs) > limits.max_documents:
        raise PayloadTooLargeError(f"{key} has {len(docs)} entries; the limit (max_documents) is "
                                   f"{limits.max_documents}", key)
    return tuple(parse_one(i, d) for i, d in enumerate(docs))


# ---- image documents

IMAGE_MEDIA_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG"}
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,31}:")
_SPACE = re.compile(r"\s")
_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")


def image_url_refusal(url: str, hosts: tuple[str, ...]) -> str | None:
    """Why an http(s) image URL may not be fetched, or None: another scheme, userinfo, no host or a bad port, or a
    host not in image_url_hosts (none set: no URL is fetched). The remote fetcher asks again at each redirect."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a malformed port raises here)
    except ValueError:
        return "a malformed URL"
    if parts.scheme.lower() not in ("http", "https"):
        return "not an http or https URL"
    host = (parts.hostname or "")[:100]
    if not host or "@" in parts.netloc:
        return "an http(s) URL without a host, or with a user name"
    where = f"{parts.scheme.lower()}://{host}"
    if not hosts:
        return (f"a remote image URL ({where}); fetching image URLs is off: send the image inline as base64 or a "
                f"data: URL, or allow its host with image_url_hosts (--image-url-hosts)")
    if host.rstrip(".") not in hosts:
        return f"a remote image URL ({where}) whose host is not in image_url_hosts"
    return None


def _decode_base64(text: str, field: str, max_bytes: int) -> bytes:
    """Standard or URL-safe base64, padding optional, ASCII whitespace (MIME line breaks) ignored. The decoded size
    is checked from the length first, so an oversized image is refused before it is decoded."""
    if _SPACE.search(text):
        text = _SPACE.sub("", text)
    body = text.rstrip("=")
    size = len(body) * 3 // 4
    if size > max_bytes:
        raise PayloadTooLargeError(f"{field} holds an image of about {size} bytes; the limit (max_image_bytes) is "
                                   f"{max_bytes}", field)
    if len(text) - len(body) > 2 or len(body) % 4 == 1:
        raise BadRequestError(f"{field} is not valid base64 (its length or padding is wrong)", field)
    if ("-" in body or "_" in body) and ("+" in body or "/" in body):
        raise BadRequestError(f"{field} is not valid base64 (it mixes the standard and URL-safe alphabets)", field)
    try:
        data = binascii.a2b_base64((body.translate(_URLSAFE_TO_STANDARD) + "=" * (-len(body) % 4)).encode("ascii"),
                                   strict_mode=True)
    except (UnicodeEncodeError, binascii.Error):
        raise BadRequestError(f"{field} is not valid base64 (standard or URL-safe alphabet)", field) from None
    if not data:
        raise BadRequestError(f"{field} must not be empty", field)
    return data


def _parse_image(value: Any, field: str, limits: RequestLimits, bare_base64: bool) -> tuple[bytes | None, str | None]:
    """An image as sent: (its file's bytes, None), or (None, an http(s) URL to fetch once the body is parsed). A
    data: URL's media type must be image/png or image/jpeg and agree with the file's magic bytes; bare base64
    (Jina's `image`) is sniffed. Messages never hold the data."""
    kinds = "base64, a data: URL or an http(s) URL" if bare_base64 else "a data: URL or an http(s) URL"
    if not isinstance(value, str):
        raise BadRequestError(f"{field} must be a string ({kinds}), not {_type_name(value)}", field)
    if not value.strip():
        raise BadRequestError(f"{field} must not be empty", field)
    value = value.strip()
    scheme = _URL_SCHEME.match(value)
    declared = None
    if scheme and scheme.group(0).lower() in ("http:", "https:"):
        refusal = image_url_refusal(value, limits.image_url_hosts)
        if refusal is not None:
            raise BadRequestError(f"{field} is {refusal}", field)
        return None, value
    if scheme and scheme.group(0).lower() == "data:":
        header, comma, payload = value.partition(",")
        params = [p.strip().lower() for p in header[5:].split(";")]
        if not comma or "base64" not in params[1:]:
            raise BadRequestError(f"{field} must be a base64 data: URL (data:image/png;base64,...)", field)
        declared = IMAGE_MEDIA_TYPES.get(params[0])
        if declared is None:
            shown = params[0] if len(params[0]) <= 40 and params[0].isprintable() else "another type"
            raise BadRequestError(f"{field} is a data: URL of {shown or 'no type'}; only image/png and image/jpeg "
                                  f"are served", field)
        value = payload
    elif scheme:
        raise BadRequestError(f"{field} must be {kinds}; {scheme.group(0)[:-1][:20]!r} URLs are not fetched", field)
    elif not bare_base64:
        raise BadRequestError(f"{field} must be {kinds}", field)
    data = _decode_base64(value, field, limits.max_image_bytes)
    found = image_format(data)
    if found is None:
        raise BadRequestError(f"{field} is not a PNG or JPEG file (from its first bytes)", field)
    if declared is not None and found != declared:
        raise BadRequestError(f"{field} is declared {declared} by its data: URL but holds a {found} file", field)
    return data, None


class _ImageDocuments:
    """A request's image documents as they are parsed, counted against max_images_per_request before each image is
    decoded."""

    def __init__(self, limits: RequestLimits, array: str = DOCUMENTS.array):
        self.limits, self.array, self.count = limits, array, 0

    def parse(self, i: int, doc: dict, path: str, **kwargs) -> Document:
        """Jina's {"image", "text"?} or vLLM's {"content": [parts]} (an object with either key); other keys are
        the caller's."""
        if "content" in doc:
            if "image" in doc or "text" in doc:
                raise BadRequestError(f"{path} has content and also image or text; send one form",
                                      f"{path}.content")
            text, image, field = self._content(doc["content"], f"{path}.content")
            if image is None:  # text parts only: a text document
                return Document(i, text, **kwargs)
        else:
            text = self._text(doc.get("text"), f"{path}.text")
            image, field = doc["image"], f"{path}.image"
        self.count += 1
        if self.count > self.limits.max_images_per_request:
            raise PayloadTooLargeError(f"{self.array} has more than {self.limits.max_images_per_request} image "
                                       f"documents; the limit (max_images_per_request) is "
                                       f"{self.limits.max_images_per_request}", self.array)
        data, url = _parse_image(image, field, self.limits, bare_base64=field.endswith(".image"))
        return Document(i, text, image=ImageDocument(data, text) if data is not None else None, image_url=url,
                        image_field=field, **kwargs)

    def _text(self, value: Any, field: str) -> str:
        """An image document's text: absent, null or "" for none."""
        return "" if value is None or value == "" else _parse_text(value, field, self.limits)

    def _content(self, parts: Any, path: str) -> tuple[str, Any, str | None]:
        """vLLM's (and OpenAI's) content parts: text parts joined by a line break, at most one image_url part."""
        if not isinstance(parts, list) or not parts:
            raise BadRequestError(f"{path} must be a non-empty array of content parts, not {_type_name(parts)}", path)
        texts, image, field = [], None, None
        for j, part in enumerate(parts):
            where = f"{path}[{j}]"
            if not isinstance(part, dict):
                raise BadRequestError(f"{where} must be an object with type, not {_type_name(part)}", where)
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise BadRequestError(f"{where}.text must be a string", f"{where}.text")
                texts.append(part["text"])
            elif kind == "image_url":
                if image is not None:
                    raise BadRequestError(f"{where} is a second image; a document holds one image", where)
                url = part.get("image_url")
                image, field = (url.get("url"), f"{where}.image_url.url") if isinstance(url, dict) else \
                    (url, f"{where}.image_url")
                if image is None:
                    raise BadRequestError(f"{where}.image_url.url is required", f"{where}.image_url.url")
            else:
                shown = repr(kind)[:40] if isinstance(kind, str) else _type_name(kind)
                raise BadRequestError(f"{where}.type {shown} is not supported (text, image_url)", f"{where}.type")
        text = "\n".join(t for t in texts if t)
        if image is None:
            return _parse_text(text, path, self.limits), None, None
        return self._text(text, path), image, field


def _is_image_object(doc: Any) -> bool:
    return isinstance(doc, dict) and ("image" in doc or "content" in doc)



def parse_native(body: Any, limits: RequestLimits) -> RerankRequest:
    """POST /rerank: strict; an unknown field is a 400 so that typos such as `topk` do not pass unnoticed (even
    when null). A known optional field sent as null counts as not sent, as on every route."""
    body = _require_object(body)
    for name in sorted(body.keys() - NATIVE_FIELDS):
        raise BadRequestError(f"unknown field {name!r} (allowed: {', '.join(sorted(NATIVE_FIELDS))})", name)
    body = _without_nulls(body)
    query = _parse_query(body, limits)
    images = _ImageDocuments(limits)

    def parse_one(i: int, doc: Any) -> Document:
        path = DOCUMENTS.entry(i)
        if isinstance(doc, str):
            return Document(i, _parse_text(doc, path, limits))
        if not isinstance(doc, dict):
            raise BadRequestError(f"{path} must be a string or an object with text, image or content, not "
                                  f"{_type_name(doc)}", path)
        for name in sorted(doc.keys() - NATIVE_DOCUMENT_FIELDS):
            allowed = ", ".join(sorted(NATIVE_DOCUMENT_FIELDS))
            raise BadRequestError(f"unknown field {name!r} in {path} (allowed: {allowed})", f"{path}.{name}")
        doc_id = doc.get("id")
        if doc_id is not None and (isinstance(doc_id, bool) or not isinstance(doc_id, (str, int))):
            raise BadRequestError(f"{path}.id must be a string or an integer, not {_type_name(doc_id)}",
                                  f"{path}.id")
        if isinstance(doc_id, str):
            _check_encodable(doc_id, f"{path}.id")
        if _is_image_object(doc):
            return images.parse(i, doc, path, id=doc_id)
        if "text" not in doc:
            raise BadRequestError(f"{path}.text is required", f"{path}.text")
        return Document(i, _parse_text(doc["text"], f"{path}.text", limits), doc_id)

    documents = _parse_documents(body, limits, parse_one)
    first_seen: dict[Any, int] = {}
    for doc in documents:
        if doc.id is None:
            continue
        key = (type(doc.id), doc.id)
        if key in first_seen:
            raise BadRequestError(f"documents[{doc.index}].id {doc.id!r} repeats documents[{first_seen[key]}].id",
                                  f"documents[{doc.index}].id")
        first_seen[key] = doc.index
    instruction = None
    if "instruction" in body:  # limited like a query: it is tokenized with every pair
        instruction = _parse_string(body["instruction"], "instruction", limits.max_query_chars, "max_query_chars")
    return RerankRequest(query, documents, _parse_positive_int(body, "top_k"), _parse_bool(body, "return_documents"),
                         timeout_ms=_parse_bounded_int(body, "timeout_ms", TIMEOUT_MS),
                         truncation=Truncation(_parse_side(body), max_chunks=_parse_max_chunks(body)),
                         instruction=instruction)


def _parse_side(body: dict) -> str:
    side = body.get("truncation_direction", "right")
    if not isinstance(side, str) or side.lower() not in ("left", "right"):
        raise BadRequestError("truncation_direction must be \"right\" (keep the start) or \"left\" (keep the end)",
                              "truncation_direction")
    return side.lower()


def _parse_max_chunks(body: dict) -> int | None:
    """Long documents: truncated (no max_chunks_per_doc) or chunked into up to this many windows."""
    return _parse_bounded_int(body, "max_chunks_per_doc", MAX_CHUNKS)


def parse_cohere(body: Any, limits: RequestLimits) -> RerankRequest:
    """POST /v1/rerank and /v2/rerank (and Jina's /api/v1/rerank): Cohere's fields. Null means "not given".
    Fields Cohere has but we do not support are a 400; other unknown fields (which gateways and SDKs add, such as
    `user`) are ignored."""
    body = _without_nulls(_require_object(body))
    for name, message in COHERE_UNSUPPORTED.items():
        if name in body:
            raise BadRequestError(message, name)
    model = _parse_model(body)
    query = _parse_query(body, limits)
    images = _ImageDocuments(limits)

    def parse_one(i: int, doc: Any) -> Document:
        path = DOCUMENTS.entry(i)
        if isinstance(doc, str):
            return Document(i, _parse_text(doc, path, limits), original={"text": doc})
        if not isinstance(doc, dict):
            raise BadRequestError(f"{path} must be a string or an object with text, image or content, not "
                                  f"{_type_name(doc)}", path)
        if _is_image_object(doc):
            return images.parse(i, doc, path, original=doc)
        if "text" not in doc:
            raise BadRequestError(f"{path}.text is required", f"{path}.text")
        return Document(i, _parse_text(doc["text"], f"{path}.text", limits), original=doc)

    documents = _parse_documents(body, limits, parse_one)
    max_tokens = _parse_bounded_int(body, "max_tokens_per_doc", MAX_TOKENS)
    return RerankRequest(query, documents, _parse_positive_int(body, "top_n"), _parse_bool(body, "return_documents"),
                         model, truncation=Truncation(max_document_tokens=max_tokens,
                                                      max_chunks=_parse_max_chunks(body)))


def parse_tei(body: Any, limits: RequestLimits) -> RerankRequest:
    """POST /rerank with `texts`: Hugging Face text-embeddings-inference's request. `truncate` left out means
    truncate (as TEI started with --auto-truncate); `truncate: false` makes a pair longer than max_length a 413.
    `top_n` (litellm sends it) keeps the best n. Other fields are ignored."""
    body = _without_nulls(_require_object(body))
    query = _parse_query(body, limits)

    def parse_one(i: int, text: Any) -> Document:
        return Document(i, _parse_text(text, TEI_TEXTS.entry(i), limits))

    texts = _parse_documents(body, limits, parse_one, TEI_TEXTS.array)
    truncate = body.get("truncate", True)
    if not isinstance(truncate, bool):
        raise BadRequestError(f"truncate must be true or false, not {_type_name(truncate)}", "truncate")
    return RerankRequest(query, texts, _parse_positive_int(body, "top_n"), _parse_bool(body, "return_text"),
                         truncation=Truncation(_parse_side(body), None, truncate, _parse_max_chunks(body)),
                         raw_scores=_parse_bool(body, "raw_scores"), names=TEI_TEXTS)


INFINITY_KEYS = ("model", "top_n", "raw_scores")  # on /rerank, any of these makes a body infinity/vLLM-shaped


def parse_infinity(body: Any, limits: RequestLimits) -> RerankRequest:
    """POST /rerank with `model`, `top_n` or `raw_scores`: what infinity's and vLLM's clients send (infinity_client,
    langchain-community's InfinityRerank, litellm's infinity/ and hosted_vllm/). `model` is any name. Documents
    are echoed (as strings, infinity's form) only to infinity_client's family, which sends `raw_scores`: litellm's
    two providers send byte-identical requests but parse the document in incompatible ways (a string vs
    {"text"}), so a litellm request gets no document. Other fields are ignored."""
    body = _without_nulls(_require_object(body))
    model = _parse_model(body)
    query = _parse_query(body, limits)
    images = _ImageDocuments(limits)

    def parse_one(i: int, doc: Any) -> Document:
        path = DOCUMENTS.entry(i)
        if _is_image_object(doc):
            return images.parse(i, doc, path)
        if isinstance(doc, dict) and "text" in doc:
            return Document(i, _parse_text(doc["text"], f"{path}.text", limits), original=doc["text"])
        return Document(i, _parse_text(doc, path, limits), original=doc)

    documents = _parse_documents(body, limits, parse_one)
    echo = _parse_bool(body, "return_documents") and "raw_scores" in body
    return RerankRequest(query, documents, _parse_positive_int(body, "top_n"), echo, model,
                         truncation=Truncation(max_chunks=_parse_max_chunks(body)),
                         raw_scores=_parse_bool(body, "raw_scores"))


def parse_pairs(body: Any, limits: RequestLimits) -> RerankRequest:
    """POST /rerank with a JSON array of {"query", "passage"}: each pair scored with its own query (the MOSEC-style
    RAG integration). Strict, like the native body."""

    def parse_one(i: int, pair: Any) -> Document:
        path = BARE_PAIRS.entry(i)
        if not isinstance(pair, dict):
            raise BadRequestError(f"{path} must be an object with query and passage, not {_type_name(pair)}", path)
        for name in sorted(pair.keys() - {"query", "passage"}):
            raise BadRequestError(f"unknown field {name!r} in {path} (allowed: query, passage)", f"{path}.{name}")
        if "passage" not in pair:
            raise BadRequestError(f"{path}.passage is required", f"{path}.passage")
        query = _parse_query(pair, limits, f"{path}.query")
        return Document(i, _parse_text(pair["passage"], f"{path}.passage", limits), query=query)

    pairs = _parse_list(body, limits, parse_one, BARE_PAIRS.array)
    return RerankRequest(pairs[0].query, pairs, None, False, names=BARE_PAIRS)


def parse_nim(body: Any, limits: RequestLimits) -> RerankRequest:
    """POST /v1/ranking: NVIDIA NIM's ranking API, which langchain-nvidia-ai-endpoints' NVIDIARerank sends (with
    page images for nvidia/llama-nemotron-rerank-vl-1b-v2): `query` as {"text"}, `passages` as {"text", "image"?}
    (an image passage's text may be ""), `truncate` "END" (the default here, as on every route) or "NONE" (a pair
    longer than max_length is a 413). Every passage is ranked; other fields are ignored."""
    body = _without_nulls(_require_object(body))
    model = _parse_model(body)
    query = body.get("query")
    if isinstance(query, dict):
        if "text" not in query:
            raise BadRequestError("query.text is required", "query.text")
        query = _parse_string(query["text"], "query.text", limits.max_query_chars, "max_query_chars")
    elif "query" in body:
        raise BadRequestError(f"query must be an object with text, not {_type_name(query)}", "query")
    else:
        raise BadRequestError("query is required", "query")
    images = _ImageDocuments(limits, NIM_PASSAGES.array)

    def parse_one(i: int, passage: Any) -> Document:
        path = NIM_PASSAGES.entry(i)
        if not isinstance(passage, dict):
            raise BadRequestError(f"{path} must be an object with text, not {_type_name(passage)}", path)
        if passage.get("image") is not None:
            return images.parse(i, {"image": passage["image"], "text": passage.get("text")}, path)
        if "text" not in passage:
            raise BadRequestError(f"{path}.text is required", f"{path}.text")
        return Document(i, _parse_text(passage["text"], f"{path}.text", limits))

    passages = _parse_documents(body, limits, parse_one, NIM_PASSAGES.array)
    truncate = body.get("truncate", "END")
    if truncate not in ("END", "NONE"):
        raise BadRequestError('truncate must be "END" (cut the passage) or "NONE" (refuse a pair that does not fit)',
                              "truncate")
    return RerankRequest(query, passages, None, False, model,
                         truncation=Truncation(allowed=truncate == "END"), names=NIM_PASSAGES)


def _without_nulls(body: dict) -> dict:
    """Clients send null for optional fields they were not given (langchain-cohere: "max_tokens_per_doc": null)."""
    return {key: value for key, value in body.items() if value is not None}
