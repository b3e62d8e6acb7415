"""Image documents through a real server: the text-only tiny model refuses them naming the model (and fetches
nothing); a stand-in vision head (the real parsing, service, Reranker, score cache and Batcher over a FakeEngine)
scores them: identical images once, repeats from the cache, image URLs fetched from an allowed loopback server only
after the whole body was parsed, and nothing of an image in the log. The recorded body of NVIDIARerank
(langchain-nvidia-ai-endpoints) on the NIM route. The wire never imports Pillow for a text request."""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import sys
from collections.abc import Sequence

import pytest
from support import ROOT
from support.engines import FAKE_CONTRACT, FakeEngine, close_reranker
from support.http import request
from support.imagefiles import JPEG, PNG, ImageServer, data_url, part, send

from openvino_reranker.cache import ScoreCache
from openvino_reranker.encoding import CrossEncoderHead
from openvino_reranker.reranker import Reranker
from openvino_reranker.scoring import TRUNCATE_RIGHT, ImageDocument

RECORDED = json.loads((ROOT / "tests" / "fixtures" / "clients" / "nvidia-rerank-vl.json").read_text())
PNG64 = base64.b64encode(PNG).decode()


class StandInVisionHead(CrossEncoderHead):
    """A cross-encoder head that says it takes images and encodes an ImageDocument as a text standing for its
    digest and text, recording every document it was given: what reaches a vision head, without one."""

    takes_images = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list = []

    def encode(self, query, texts: Sequence, truncation=TRUNCATE_RIGHT, instruction=None):
        self.seen.extend(texts)
        stand_ins = [f"image {t.digest[:12]} {t.text}" if isinstance(t, ImageDocument) else t for t in texts]
        return super().encode(query, stand_ins, truncation, instruction)


@pytest.fixture
def vision(fake_server, tiny_model):
    """A FakeServer whose Reranker has the stand-in vision head and a score cache; image URLs allowed from
    127.0.0.1, at most 4 images a request."""
    images = ImageServer()
    images.routes["/page.png"] = lambda h: send(h, PNG)
    images.routes["/page.jpg"] = lambda h: send(h, JPEG)
    fake = fake_server("--image-url-hosts", "127.0.0.1", "--max-images-per-request", "4").start(FakeEngine())
    close_reranker(fake.service.reranker)
    head = StandInVisionHead.from_file(tiny_model.path / "tokenizer.json", 64, FAKE_CONTRACT)
    fake.service.reranker = Reranker(head, fake.engine, 8, cache=ScoreCache(100))
    fake.head, fake.images = head, images
    yield fake
    images.close()


def scores_by_index(results, key="score"):
    return {r["index"]: r[key] for r in results}


def test_image_documents_are_scored_once_each_and_cached(vision, caplog):
    docs = ["a text passage", {"id": "p1", "image": PNG64, "text": "page one"}, {"image": data_url(JPEG, "image/jpeg")},
            {"id": "p1-again", "image": PNG64, "text": "page one"}]
    body = {"query": "q", "documents": docs, "return_documents": True}
    with caplog.at_level(logging.INFO, logger="openvino_reranker"):
        status, payload, _ = request(vision.port, "POST", "/rerank", body)
    assert status == 200, payload
    seen = vision.head.seen
    assert seen.count(ImageDocument(PNG, "page one")) == 1 and ImageDocument(JPEG) in seen and len(seen) == 3
    assert next(d for d in seen if d == ImageDocument(JPEG)).image == JPEG  # the bytes themselves reach the head
    by_index = {r["index"]: r for r in payload["results"]}
    assert by_index[1]["score"] == by_index[3]["score"] and by_index[1]["id"] == "p1"
    assert by_index[1]["image_sha256"] == ImageDocument(PNG).digest and by_index[1]["text"] == "page one"
    assert "text" not in by_index[2] and by_index[0]["text"] == "a text passage"
    calls = vision.engine.calls
    status, again, _ = request(vision.port, "POST", "/v1/rerank", {"query": "q", "documents": docs})  # Jina shape
    assert status == 200 and vision.engine.calls == calls  # every pair from the cache
    assert scores_by_index(again["results"], "relevance_score") == scores_by_index(payload["results"])
    lines = [r.getMessage() for r in caplog.records]
    assert any("documents=4 images=3" in line for line in lines)
    assert not any(PNG64[:16] in line or base64.b64encode(JPEG).decode()[:16] in line for line in lines)


@pytest.mark.parametrize("path, body", [
    ("/v1/rerank", {"model": "jina-reranker-m0", "query": "q", "return_documents": True,
                    "documents": [{"image": PNG64}, {"image": PNG64, "text": "caption", "title": "t"}, "text"]}),
    ("/v2/rerank", {"model": "m", "query": "q", "return_documents": True,
                    "documents": [{"content": [part(data_url(PNG))]},
                                  {"content": [part(data_url(PNG)), {"type": "text", "text": "caption"}]}, "text"]}),
    ("/rerank", {"model": "m", "query": "q", "top_n": 3,
                 "documents": [{"content": [part(data_url(PNG))]},
                               {"content": [{"type": "text", "text": "caption"}, part(data_url(PNG))]}, "text"]}),
])
def test_every_object_dialect_takes_them(vision, path, body):
    status, payload, _ = request(vision.port, "POST", path, body)
    assert status == 200, payload
    assert {r["index"] for r in payload["results"]} == {0, 1, 2}
    for r in payload["results"]:
        if "document" in r and r["index"] < 2:
            assert r["document"]["image_sha256"] == ImageDocument(PNG).digest and "image" not in r["document"]
            assert "content" not in r["document"]
    assert ImageDocument(PNG, "caption") in vision.head.seen and ImageDocument(PNG) in vision.head.seen


def test_the_recorded_nvidia_rerank_body(vision):
    """NVIDIARerank's request as recorded: passages with page images, a NIM answer it parses (index, logit)."""
    assert (RECORDED["method"], RECORDED["path"]) == ("POST", "/v1/ranking")
    status, payload, _ = request(vision.port, "POST", RECORDED["path"], RECORDED["body"])
    assert status == 200, payload
    rankings = payload["rankings"]
    assert sorted(r["index"] for r in rankings) == [0, 1, 2] and all(set(r) == {"index", "logit"} for r in rankings)
    logits = [r["logit"] for r in rankings]
    assert logits == sorted(logits, reverse=True)
    orange = base64.b64decode(RECORDED["body"]["passages"][0]["image"].split(",", 1)[1])
    assert ImageDocument(orange, "The picture of a cat.") in vision.head.seen and ImageDocument(orange) in \
        vision.head.seen
    status, payload, _ = request(vision.port, "POST", "/v1/ranking", {**RECORDED["body"], "passages": [{"text": ""}]})
    assert status == 400 and payload["field"] == "passages[0].text" and "empty" in payload["detail"]


def test_image_urls_are_fetched_after_the_whole_body_is_valid(vision):
    url = vision.images.url("/page.jpg")
    status, payload, _ = request(vision.port, "POST", "/rerank",
                                 {"query": "q", "documents": [{"image": url}, {"text": ""}]})
    assert status == 400 and payload["error"]["field"] == "documents[1].text"
    status, payload, _ = request(vision.port, "POST", "/rerank",
                                 {"query": "q", "documents": [{"image": url}, {"image": PNG64}] * 3})
    assert status == 413 and payload["error"]["field"] == "documents"
    assert vision.images.requests == []  # refused bodies fetched nothing
    body = {"query": "q", "documents": [{"image": url, "text": "t"}, {"content": [part(url)]},
                                        {"image": vision.images.url("/page.png")}]}
    status, payload, _ = request(vision.port, "POST", "/rerank", body)
    assert status == 200, payload
    assert vision.images.requests == ["/page.jpg", "/page.png"]  # each URL once
    assert ImageDocument(JPEG, "t") in vision.head.seen and ImageDocument(PNG) in vision.head.seen
    status, payload, _ = request(vision.port, "POST", "/v1/rerank",
                                 {"query": "q", "documents": [{"image": vision.images.url("/missing.png")}]})
    assert status == 400 and payload["field"] == "documents[0].image" and "answered 404" in payload["message"]


# ---------------------------------------------------------------------------------------------- a text-only model


def test_a_text_only_model_refuses_images_naming_the_model(cpu_server):
    for path, body, field in [
        ("/rerank", {"query": "q", "documents": ["text", {"image": PNG64}]}, "documents[1]"),
        ("/v1/rerank", {"query": "q", "documents": [{"content": [part(data_url(PNG))]}]}, "documents[0]"),
        ("/v1/ranking", RECORDED["body"], "passages[0]"),
    ]:
        status, payload, _ = request(cpu_server.port, "POST", path, body)
        message = payload.get("message") or payload.get("detail") or payload["error"]["message"]
        assert status == 400, payload
        assert "the model (tiny-cross-encoder, a cross-encoder) takes text only" in message
        assert (payload.get("field") or payload["error"]["field"]) == field


def test_a_text_only_model_fetches_no_image_url(fake_server):
    """An image URL on an allowed host is not fetched for a model that cannot use it."""
    images = ImageServer()
    images.routes["/page.png"] = lambda h: send(h, PNG)
    try:
        fake = fake_server("--image-url-hosts", "127.0.0.1").start(FakeEngine())
        status, payload, _ = request(fake.port, "POST", "/rerank",
                                     {"query": "q", "documents": [{"image": images.url("/page.png")}]})
        assert status == 400 and "takes text only" in payload["error"]["message"] and images.requests == []
    finally:
        images.close()


def test_an_image_url_is_refused_by_default_naming_the_option(cpu_server):
    status, payload, _ = request(cpu_server.port, "POST", "/rerank",
                                 {"query": "q", "documents": [{"image": "https://example.com/page.png"}]})
    assert status == 400 and payload["error"]["field"] == "documents[0].image"
    assert "image_url_hosts (--image-url-hosts)" in payload["error"]["message"]


def test_the_nim_route_serves_text_with_logits(cpu_server):
    body = {"model": "m", "query": {"text": "boiling water"},
            "passages": [{"text": "water boils at sea level"}, {"text": "paris museums"}]}
    status, payload, _ = request(cpu_server.port, "POST", "/v1/ranking", body)
    native = request(cpu_server.port, "POST", "/rerank",
                     {"query": "boiling water", "documents": ["water boils at sea level", "paris museums"]})[1]
    import math

    assert status == 200 and [r["index"] for r in payload["rankings"]] == [r["index"] for r in native["results"]]
    for ranking, result in zip(payload["rankings"], native["results"], strict=True):
        assert abs(1 / (1 + math.exp(-ranking["logit"])) - result["score"]) < 1e-6
    status, payload, _ = request(cpu_server.port, "POST", "/v1/ranking", {**body, "truncate": "START"})
    assert status == 400 and payload["field"] == "truncate" and "detail" in payload


def test_the_wire_never_imports_pillow():
    """Parsing image documents (sniffed, not decoded) and a text request through the service: no PIL module."""
    script = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from openvino_reranker.api import RequestLimits, parse_native, parse_cohere
import openvino_reranker.httpserver, openvino_reranker.startup, openvino_reranker.service
limits = RequestLimits(10, 100, 100)
parse_native({{"query": "q", "documents": ["t", {{"image": {PNG64!r}}}]}}, limits)
content = [{{"type": "image_url", "image_url": {{"url": "data:image/png;base64,{PNG64}"}}}}]
parse_cohere({{"query": "q", "documents": [{{"content": content}}]}}, limits)
print(sorted(m for m in sys.modules if m == "PIL" or m.startswith("PIL.")))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
