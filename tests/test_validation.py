import pytest

from openvino_reranker.api import RequestLimits, parse_cohere, parse_native
from openvino_reranker.config import load_config
from openvino_reranker.errors import BadRequestError, PayloadTooLargeError

LIMITS = RequestLimits.from_config(load_config(["--max-documents", "10"], {}))


def test_native_strings_and_objects():
    r = parse_native({"query": "q", "documents": ["a", {"id": "x", "text": "b"}, {"text": "c"}, {"id": 7, "text": "d"}],
                      "top_k": 2, "return_documents": True}, LIMITS)
    assert r.query == "q" and r.top_k == 2 and r.return_documents
    assert [(d.index, d.id, d.text) for d in r.documents] == [(0, None, "a"), (1, "x", "b"), (2, None, "c"),
                                                               (3, 7, "d")]


def test_native_defaults():
    r = parse_native({"query": "q", "documents": ["a"]}, LIMITS)
    assert r.top_k is None and r.return_documents is False


@pytest.mark.parametrize("body, field, needle", [
    ([], None, "JSON object"),
    ({"documents": ["a"]}, "query", "required"),
    ({"query": 3, "documents": ["a"]}, "query", "string"),
    ({"query": "  \n", "documents": ["a"]}, "query", "empty"),
    ({"query": "q"}, "documents", "required"),
    ({"query": "q", "documents": "a"}, "documents", "array"),
    ({"query": "q", "documents": []}, "documents", "empty"),
    ({"query": "q", "documents": ["a", 5]}, "documents[1]", "string or an object"),
    ({"query": "q", "documents": ["a", " "]}, "documents[1]", "empty"),
    ({"query": "q", "documents": ["a", {"id": "i"}]}, "documents[1].text", "required"),
    ({"query": "q", "documents": ["a", {"text": ""}]}, "documents[1].text", "empty"),
    ({"query": "q", "documents": ["a", {"text": ["x"]}]}, "documents[1].text", "string"),
    ({"query": "q", "documents": [{"text": "a", "title": "t"}]}, "documents[0].title", "unknown field"),
    ({"query": "q", "documents": [{"text": "a", "id": True}]}, "documents[0].id", "string or an integer"),
    ({"query": "q", "documents": [{"text": "a", "id": 1.5}]}, "documents[0].id", "string or an integer"),
    ({"query": "q", "documents": [{"text": "a", "id": "x"}, {"text": "b", "id": "x"}]}, "documents[1].id", "repeats"),
    ({"query": "q", "documents": ["a"], "top_k": 0}, "top_k", ">= 1"),
    ({"query": "q", "documents": ["a"], "top_k": -3}, "top_k", ">= 1"),
    ({"query": "q", "documents": ["a"], "top_k": True}, "top_k", "integer"),
    ({"query": "q", "documents": ["a"], "top_k": 2.0}, "top_k", "integer"),
    ({"query": "q", "documents": ["a"], "top_k": "2"}, "top_k", "integer"),
    ({"query": "q", "documents": ["a"], "return_documents": 1}, "return_documents", "true or false"),
    ({"query": "q", "documents": ["a"], "topk": 1}, "topk", "unknown field"),
    ({"query": "q", "documents": ["a"], "top_n": 1}, "top_n", "unknown field"),
])
def test_native_rejects_with_the_field_named(body, field, needle):
    with pytest.raises(BadRequestError) as info:
        parse_native(body, LIMITS)
    assert info.value.field == field and needle in info.value.message
    assert info.value.status == 400


def test_ids_of_different_types_do_not_collide():
    r = parse_native({"query": "q", "documents": [{"text": "a", "id": 1}, {"text": "b", "id": "1"}]}, LIMITS)
    assert [d.id for d in r.documents] == [1, "1"]


def test_document_count_limit_is_413():
    with pytest.raises(PayloadTooLargeError) as info:
        parse_native({"query": "q", "documents": ["a"] * 11}, LIMITS)
    assert info.value.status == 413 and info.value.field == "documents"
    assert "limit (max_documents) is 10" in info.value.message
    with pytest.raises(PayloadTooLargeError):
        parse_cohere({"query": "q", "documents": ["a"] * 11}, LIMITS)


def test_cohere_fields():
    r = parse_cohere({"model": "rerank-v3.5", "query": "q", "documents": ["a", {"text": "b", "title": "t"}],
                      "top_n": 1, "return_documents": True, "user": "ignored"}, LIMITS)
    assert r.model == "rerank-v3.5" and r.top_k == 1 and r.return_documents
    assert [d.original for d in r.documents] == [{"text": "a"}, {"text": "b", "title": "t"}]


@pytest.mark.parametrize("body, field, needle", [
    ({"query": "q", "documents": ["a"], "rank_fields": ["text"]}, "rank_fields", "not supported"),
    ({"query": "q", "documents": ["a"], "max_chunks_per_doc": 0}, "max_chunks_per_doc", "1..1000"),
    ({"query": "q", "documents": ["a"], "relevant_spans": {"enabled": True}}, "relevant_spans", "not supported"),
    ({"query": "q", "documents": ["a"], "model": 3}, "model", "string"),
    ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n", ">= 1"),
    ({"query": "q", "documents": [{"title": "t"}]}, "documents[0].text", "required"),
    ({"query": "", "documents": ["a"]}, "query", "empty"),
])
def test_cohere_rejects(body, field, needle):
    with pytest.raises(BadRequestError) as info:
        parse_cohere(body, LIMITS)
    assert info.value.field == field and needle in info.value.message


@pytest.mark.parametrize("body, field", [
    ({"query": "a\ud800b", "documents": ["x"]}, "query"),
    ({"query": "q", "documents": ["x", "\udfff"]}, "documents[1]"),
    ({"query": "q", "documents": [{"text": "ok \ud83d"}]}, "documents[0].text"),
])
def test_lone_surrogates_are_400(body, field):
    with pytest.raises(BadRequestError) as info:
        parse_native(body, LIMITS)
    assert info.value.field == field and "surrogate" in info.value.message


def test_null_means_not_given_but_an_unknown_null_field_is_still_caught():
    body = {"query": "q", "documents": ["a"], "top_k": None, "return_documents": None, "timeout_ms": None,
            "max_chunks_per_doc": None, "truncation_direction": None}
    request = parse_native(body, LIMITS)
    assert (request.top_k, request.return_documents, request.timeout_ms) == (None, False, None)
    with pytest.raises(BadRequestError) as info:
        parse_native({"query": "q", "documents": ["a"], "topk": None}, LIMITS)
    assert info.value.field == "topk"
