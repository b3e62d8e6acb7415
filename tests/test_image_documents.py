"""Image documents on the wire (issue 20): every shape a client sends them in (Jina's {"image", "text"}, vLLM's content
parts), on the routes that take them; base64 and data: URLs sniffed by magic bytes; every refusal with its status,
type and field; the limits checked before the costly step they guard; what `return_documents` echoes; the options;
the score cache's key. Parsing only: the fetcher is tests/test_remoteimages.py's, the HTTP path
tests/test_image_requests.py's."""

import base64

import pytest
from support.imagefiles import GIF, JPEG, PNG, data_url, part

from openvino_reranker.api import (
    RequestLimits,
    parse_cohere,
    parse_infinity,
    parse_native,
    parse_pairs,
    parse_tei,
)
from openvino_reranker.cache import ScoreCache
from openvino_reranker.config import load_config
from openvino_reranker.dialects import ResponseContext, render_cohere, render_infinity, render_native
from openvino_reranker.errors import BadRequestError, PayloadTooLargeError, StartupError
from openvino_reranker.images import DEFAULT_MAX_IMAGE_PIXELS
from openvino_reranker.scoring import ImageDocument, ScoredPairs, Truncation

PNG64 = base64.b64encode(PNG).decode()
LIMITS = RequestLimits.from_config(load_config(["--max-documents", "10", "--max-images-per-request", "3",
                                                "--max-image-bytes", "4096", "--image-url-hosts",
                                                "127.0.0.1,images.example"], {}))
NO_URLS = RequestLimits.from_config(load_config([], {}))


# ---------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("doc, image, text", [
    ({"image": PNG64}, PNG, ""),  # Jina: bare base64
    ({"image": data_url(PNG)}, PNG, ""),  # Jina: a data: URL
    ({"image": data_url(JPEG, "image/jpeg"), "text": "a caption"}, JPEG, "a caption"),
    ({"image": data_url(JPEG, "image/jpg")}, JPEG, ""),  # a common misspelling of the media type
    ({"image": base64.urlsafe_b64encode(JPEG).decode().rstrip("=")}, JPEG, ""),  # URL-safe, no padding
    ({"image": "\n".join(PNG64[i:i + 76] for i in range(0, len(PNG64), 76))}, PNG, ""),  # MIME line breaks
    ({"image": PNG64, "text": ""}, PNG, ""),  # "" is no text
    ({"image": PNG64, "text": None}, PNG, ""),
    ({"content": [part(data_url(PNG)), {"type": "text", "text": "page 3"}]}, PNG, "page 3"),  # vLLM
    ({"content": [{"type": "text", "text": "a"}, part(data_url(PNG)), {"type": "text", "text": "b"}]}, PNG, "a\nb"),
    ({"content": [{"type": "image_url", "image_url": data_url(JPEG, "image/jpeg")}]}, JPEG, ""),  # url as a string
    ({"content": [{"type": "image_url", "image_url": {"url": data_url(PNG), "detail": "high"}}]}, PNG, ""),
])
@pytest.mark.parametrize("parse", [parse_native, parse_cohere, parse_infinity])
def test_image_document_shapes(parse, doc, image, text):
    body = {"query": "q", "documents": ["a text", doc]}
    if parse is parse_infinity:
        body["model"] = "m"
    request = parse(body, LIMITS)
    text_doc, image_doc = request.documents
    assert text_doc.content == "a text" and not text_doc.is_image
    assert image_doc.is_image and image_doc.image_url is None and image_doc.text == text
    assert image_doc.content == ImageDocument(image, text) and image_doc.content.image == image
    assert image_doc.image_field.startswith("documents[1].")


def test_native_image_documents_take_ids_and_content_with_only_text_is_a_text_document():
    request = parse_native({"query": "q", "documents": [{"id": "p1", "image": PNG64},
                                                        {"content": [{"type": "text", "text": "only text"}]}]},
                           LIMITS)
    assert request.documents[0].id == "p1" and request.documents[0].is_image
    assert request.documents[1].content == "only text" and not request.documents[1].is_image


def test_an_allowed_image_url_is_kept_to_fetch_after_parsing():
    for doc, field in [({"image": "http://127.0.0.1:8/p.png"}, "documents[0].image"),
                       ({"content": [part("https://IMAGES.example/p.png?sig=1")]},
                        "documents[0].content[0].image_url.url")]:
        (parsed,) = parse_cohere({"query": "q", "documents": [doc]}, LIMITS).documents
        assert parsed.is_image and parsed.image is None and parsed.image_field == field
        assert parsed.image_url.lower().startswith(("http://127.0.0.1", "https://images.example"))
        with pytest.raises(ValueError):
            parsed.content  # noqa: B018 (not scorable until fetched)


def test_text_only_dialects_are_unchanged():
    """TEI's texts and the pairs' passages are strings, as before."""
    with pytest.raises(BadRequestError) as info:
        parse_tei({"query": "q", "texts": [{"image": PNG64}]}, LIMITS)
    assert info.value.field == "texts[0]"
    with pytest.raises(BadRequestError) as info:
        parse_pairs([{"query": "q", "passage": {"image": PNG64}}], LIMITS)
    assert info.value.field == "[0].passage"


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("doc, status, field, needle", [
    ({"image": 5}, 400, "documents[0].image", "must be a string (base64, a data: URL or an http(s) URL)"),
    ({"image": "  "}, 400, "documents[0].image", "must not be empty"),
    ({"image": "not*base64!"}, 400, "documents[0].image", "not valid base64"),
    ({"image": "QUJDRA" + "=" * 3}, 400, "documents[0].image", "padding"),
    ({"image": "QU-_+/AA"}, 400, "documents[0].image", "mixes the standard and URL-safe"),
    ({"image": "====="}, 400, "documents[0].image", "not valid base64"),
    ({"image": base64.b64encode(GIF).decode()}, 400, "documents[0].image", "not a PNG or JPEG file"),
    ({"image": data_url(GIF, "image/gif")}, 400, "documents[0].image", "data: URL of image/gif; only image/png"),
    ({"image": data_url(JPEG, "image/png")}, 400, "documents[0].image",
     "declared PNG by its data: URL but holds a JPEG"),
    ({"image": "data:image/png," + PNG64}, 400, "documents[0].image", "base64 data: URL"),
    ({"image": "file:///etc/passwd"}, 400, "documents[0].image", "'file' URLs are not fetched"),
    ({"image": "ftp://127.0.0.1/p.png"}, 400, "documents[0].image", "'ftp' URLs are not fetched"),
    ({"image": "http://10.0.0.1/p.png"}, 400, "documents[0].image", "host is not in image_url_hosts"),
    ({"image": "http://user@127.0.0.1/p.png"}, 400, "documents[0].image", "user name"),
    ({"image": "http://127.0.0.1:99999/p.png"}, 400, "documents[0].image", "malformed URL"),
    ({"image": PNG64, "text": 3}, 400, "documents[0].text", "must be a string"),
    ({"image": PNG64, "text": "  "}, 400, "documents[0].text", "empty"),
    ({"content": "x"}, 400, "documents[0].content", "non-empty array of content parts"),
    ({"content": []}, 400, "documents[0].content", "non-empty array"),
    ({"content": ["x"]}, 400, "documents[0].content[0]", "object with type"),
    ({"content": [{"type": "image_pil", "image_pil": "x"}]}, 400, "documents[0].content[0].type", "not supported"),
    ({"content": [{"type": "video_url"}]}, 400, "documents[0].content[0].type", "not supported (text, image_url)"),
    ({"content": [{"image_url": {"url": "x"}}]}, 400, "documents[0].content[0].type", "not supported"),
    ({"content": [part(data_url(PNG)), part(data_url(PNG))]}, 400, "documents[0].content[1]", "one image"),
    ({"content": [{"type": "image_url", "image_url": {}}]}, 400, "documents[0].content[0].image_url.url",
     "required"),
    ({"content": [part(PNG64)]}, 400, "documents[0].content[0].image_url.url", "a data: URL or an http(s) URL"),
    ({"content": [{"type": "text", "text": 5}]}, 400, "documents[0].content[0].text", "string"),
    ({"content": [{"type": "text", "text": " "}]}, 400, "documents[0].content", "empty"),
    ({"content": [part(data_url(PNG))], "text": "t"}, 400, "documents[0].content", "send one form"),
    ({"image": base64.b64encode(bytes(5000)).decode()}, 413, "documents[0].image", "limit (max_image_bytes) is 4096"),
])
@pytest.mark.parametrize("parse", [parse_native, parse_cohere, parse_infinity])
def test_refusals_name_the_field(parse, doc, status, field, needle):
    with pytest.raises(BadRequestError if status == 400 else PayloadTooLargeError) as info:
        parse({"query": "q", "documents": [doc], "model": "m"} if parse is not parse_native else
              {"query": "q", "documents": [doc]}, LIMITS)
    assert (info.value.status, info.value.field) == (status, field) and needle in info.value.message
    for data in (PNG64, PNG64[:40], base64.b64encode(bytes(5000)).decode()[:40], "etc/passwd"):
        assert data not in info.value.message  # no message echoes a document's data (nor a URL's path)


def test_an_image_url_is_refused_by_default_naming_the_option():
    for doc in ({"image": "https://example.com/p.png"}, {"content": [part("http://127.0.0.1/p.png")]}):
        with pytest.raises(BadRequestError) as info:
            parse_cohere({"query": "q", "documents": [doc]}, NO_URLS)
        assert "image_url_hosts (--image-url-hosts)" in info.value.message
        assert "inline as base64 or a data: URL" in info.value.message and "p.png" not in info.value.message


def test_an_oversized_image_is_refused_from_its_length_before_it_is_decoded():
    """Not valid base64 at all, but too long: 413, so nothing was decoded."""
    with pytest.raises(PayloadTooLargeError) as info:
        parse_native({"query": "q", "documents": [{"image": "*" * 6000}]}, LIMITS)
    assert info.value.field == "documents[0].image" and "about 4500 bytes" in info.value.message


def test_too_many_images_is_413_before_the_next_image_is_decoded():
    docs = [{"image": PNG64}] * 3 + [{"image": "not base64 and never decoded"}]
    for parse in (parse_native, parse_cohere):
        with pytest.raises(PayloadTooLargeError) as info:
            parse({"query": "q", "documents": docs}, LIMITS)
        assert info.value.field == "documents" and "limit (max_images_per_request) is 3" in info.value.message
    parse_native({"query": "q", "documents": docs[:3] + ["text documents do not count"] * 5}, LIMITS)


def test_the_native_body_stays_strict():
    with pytest.raises(BadRequestError) as info:
        parse_native({"query": "q", "documents": [{"image": PNG64, "caption": "x"}]}, LIMITS)
    assert info.value.field == "documents[0].caption" and "allowed: content, id, image, text" in info.value.message
    with pytest.raises(BadRequestError) as info:
        parse_native({"query": "q", "documents": [{"id": "x"}]}, LIMITS)
    assert info.value.field == "documents[0].text"  # neither text nor an image: text is what is missing


# ---------------------------------------------------------------------------------------------- echo


def scored(n: int) -> ScoredPairs:
    import numpy as np

    return ScoredPairs(np.linspace(0.9, 0.1, n), np.zeros(n), np.full(n, 7), np.zeros(n, bool), 0.0, 0.0, 1, None)


CTX = ResponseContext("id", "m", "CPU", 1.0)


def test_return_documents_echoes_a_digest_never_the_image():
    docs = ["plain", {"image": PNG64, "text": "cap", "title": "p. 3"},
            {"content": [part(data_url(JPEG, "image/jpeg"))]}, {"text": "object", "title": "t"}]
    request = parse_cohere({"query": "q", "documents": docs, "return_documents": True}, LIMITS)
    echoed = [r["document"] for r in render_cohere(request, scored(4), CTX)["results"]]
    digest = ImageDocument(PNG).digest
    assert echoed == [{"text": "plain"}, {"title": "p. 3", "text": "cap", "image_sha256": digest},
                      {"image_sha256": ImageDocument(JPEG).digest}, {"text": "object", "title": "t"}]
    native = parse_native({"query": "q", "documents": ["plain", {"id": 1, "image": PNG64, "text": "cap"},
                                                       {"image": PNG64}], "return_documents": True}, LIMITS)
    results = render_native(native, scored(3), CTX)["results"]
    assert results[0]["text"] == "plain" and "image_sha256" not in results[0]
    assert (results[1]["text"], results[1]["image_sha256"], results[1]["id"]) == ("cap", digest, 1)
    assert "text" not in results[2] and results[2]["image_sha256"] == digest
    infinity = parse_infinity({"query": "q", "documents": [{"image": PNG64, "text": "cap"}], "raw_scores": False,
                               "return_documents": True}, LIMITS)
    assert render_infinity(infinity, scored(1), CTX)["results"][0]["document"] == "cap"  # infinity's string
    assert PNG64[:20] not in repr(render_cohere(request, scored(4), CTX))


# ---------------------------------------------------------------------------------------------- options, cache


def test_options_and_their_defaults():
    config = load_config([], {})
    assert (config.max_image_bytes, config.max_images_per_request, config.image_url_hosts,
            config.image_fetch_timeout_s) == (10 * 1024 * 1024, 64, (), 10)
    assert config.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS  # one default for the option and the head
    hosts = load_config(["--image-url-hosts", " Images.Example., 127.0.0.1,[::1],::2,images.example "], {})
    assert hosts.image_url_hosts == ("images.example", "127.0.0.1", "::1", "::2")
    assert load_config([], {"OPENVINO_RERANKER_IMAGE_URL_HOSTS": "a.b"}).image_url_hosts == ("a.b",)
    for bad in ("http://a.b", "a.b:80", "a.b/x", "a b"):
        with pytest.raises(StartupError) as info:
            load_config(["--image-url-hosts", bad], {})
        assert info.value.exit_code == 2 and "image-url-hosts" in str(info.value)


def test_the_cache_key_of_an_image_is_its_digest_and_text():
    key = ScoreCache.key
    t = Truncation()
    a = key(t, "q", ImageDocument(PNG, "cap"))
    assert a == key(t, "q", ImageDocument(bytes(bytearray(PNG)), "cap"))  # the same bytes, another object
    others = [key(t, "q", ImageDocument(PNG, "")), key(t, "q", ImageDocument(JPEG, "cap")), key(t, "q", "cap"),
              key(t, "q2", ImageDocument(PNG, "cap")), key(t, "q", {"image_sha256": ImageDocument(PNG).digest,
                                                                    "text": "cap"}.__repr__())]
    assert len({a, *others}) == 1 + len(others)
