"""The API dialects against the real server: the request bodies real RAG clients send (recorded from the client
libraries through a logging proxy), the response shapes they parse, their error shapes, and the real cohere SDK.
Every dialect must give the same scores as a direct native call."""

import math

import pytest
from support.http import request
from support.models import SCORE_TOLERANCE

QUERY = "how to boil water at sea level"
DOCS = [
    "water boils at one hundred degrees celsius at sea level",
    "the museum in paris has art from the history of france",
    "boil the water, then add salt and the pasta",
    "solar power is energy from the sun",
]


@pytest.fixture(scope="module")
def native(cpu_server):
    """index -> score from the native route: what every dialect must reproduce."""
    body = request(cpu_server.port, "POST", "/rerank", {"query": QUERY, "documents": DOCS})[1]
    return {r["index"]: r["score"] for r in body["results"]}


def native_order(native):
    return sorted(native, key=lambda i: (-native[i], i))


def assert_same(native, pairs, top=None):
    """pairs: [(index, score)] in the order a client received them."""
    expected = native_order(native)[:top]
    assert [i for i, _ in pairs] == expected
    assert all(abs(s - native[i]) < SCORE_TOLERANCE for i, s in pairs)


# ---------------------------------------------------------------------------------------------- Cohere v2


@pytest.mark.parametrize("body", [
    {"model": "rerank-v3.5", "query": QUERY, "documents": DOCS, "top_n": 3},  # cohere ClientV2, llama-index
    {"model": "rerank-v3.5", "query": QUERY, "documents": DOCS, "top_n": 3, "max_tokens_per_doc": None},  # langchain
    {"model": "rerank-v3.5", "query": QUERY, "documents": DOCS, "top_n": 3, "max_tokens_per_doc": 4096},  # Haystack
    {"model": "rerank-v3.5", "query": QUERY, "top_n": 3, "documents": DOCS, "return_documents": True},  # litellm
])
def test_cohere_v2_bodies(cpu_server, native, body):
    status, payload, resp = request(cpu_server.port, "POST", "/v2/rerank", body)
    assert status == 200, payload
    assert payload["meta"]["api_version"]["version"] == "2" and payload["meta"]["billed_units"] == {"search_units": 1}
    assert payload["id"] == resp.getheader("X-Request-ID")
    assert_same(native, [(r["index"], r["relevance_score"]) for r in payload["results"]], 3)
    if body.get("return_documents"):
        assert all(r["document"] == {"text": DOCS[r["index"]]} for r in payload["results"])
    else:
        assert all(set(r) == {"index", "relevance_score"} for r in payload["results"])


def test_max_tokens_per_doc_is_honoured(cpu_server, tiny_model):
    from tokenizers import Tokenizer

    head = "water boils at sea level"
    k = len(Tokenizer.from_file(str(tiny_model.path / "tokenizer.json")).encode(head, add_special_tokens=False).ids)
    long_doc = head + " and the museum in paris has art from france" * 10
    cut = request(cpu_server.port, "POST", "/v2/rerank",
                  {"model": "m", "query": QUERY, "documents": [long_doc], "max_tokens_per_doc": k})[1]
    whole = request(cpu_server.port, "POST", "/v2/rerank", {"model": "m", "query": QUERY, "documents": [long_doc]})[1]
    first_five = request(cpu_server.port, "POST", "/rerank",
                         {"query": QUERY, "documents": [head]})
    assert abs(cut["results"][0]["relevance_score"] - first_five[1]["results"][0]["score"]) < SCORE_TOLERANCE
    assert abs(cut["results"][0]["relevance_score"] - whole["results"][0]["relevance_score"]) > 1e-3
    status, payload, _ = request(cpu_server.port, "POST", "/v2/rerank",
                                 {"model": "m", "query": QUERY, "documents": DOCS, "max_tokens_per_doc": 0})
    assert status == 400 and payload["field"] == "max_tokens_per_doc" and "message" in payload


def test_the_real_cohere_sdk(cpu_server, native):
    import cohere
    v2 = cohere.ClientV2(api_key="unused", base_url=cpu_server.base)
    response = v2.rerank(model="rerank-v3.5", query=QUERY, documents=DOCS, top_n=2)
    assert_same(native, [(r.index, r.relevance_score) for r in response.results], 2)
    v1 = cohere.Client(api_key="unused", base_url=cpu_server.base)
    response = v1.rerank(model="rerank-v3.5", query=QUERY, documents=DOCS, top_n=4, return_documents=True)
    assert_same(native, [(r.index, r.relevance_score) for r in response.results])
    assert [r.document.text for r in response.results] == [DOCS[r.index] for r in response.results]
    with pytest.raises(cohere.core.api_error.ApiError) as info:
        v2.rerank(model="rerank-v3.5", query="", documents=DOCS)
    assert info.value.status_code == 400 and "query" in info.value.body["message"]


# ---------------------------------------------------------------------------------------------- Cohere v1 / Jina


@pytest.mark.parametrize("path", ["/v1/rerank", "/api/v1/rerank"])
def test_jina_bodies_read_model_and_usage(cpu_server, native, path):
    body = {"model": "jina-reranker-v2-base-multilingual", "query": QUERY, "documents": DOCS, "top_n": 2,
            "return_documents": True}
    status, payload, _ = request(cpu_server.port, "POST", path, body)
    assert status == 200 and payload["model"] == "tiny-cross-encoder"
    assert payload["usage"]["total_tokens"] == payload["meta"]["tokens"]["input_tokens"] > 0
    assert_same(native, [(r["index"], r["relevance_score"]) for r in payload["results"]], 2)
    assert all(r["document"] == {"text": DOCS[r["index"]]} for r in payload["results"])


def test_unsupported_cohere_fields_are_400_and_nulls_are_absent(cpu_server):
    for field in ("rank_fields", "relevant_spans"):
        status, payload, _ = request(cpu_server.port, "POST", "/v1/rerank",
                                     {"query": QUERY, "documents": DOCS, field: ["x"]})
        assert status == 400 and payload["field"] == field
    status, _, _ = request(cpu_server.port, "POST", "/v1/rerank",
                           {"query": QUERY, "documents": DOCS, "top_n": None, "rank_fields": None, "user": "u"})
    assert status == 200


# ---------------------------------------------------------------------------------------------- TEI


@pytest.mark.parametrize("body", [
    {"query": QUERY, "texts": DOCS},  # llama-index TextEmbeddingInference
    {"query": QUERY, "texts": DOCS, "raw_scores": False},  # Haystack HuggingFaceTEIRanker
    {"raw_scores": False, "truncate": False, "truncation_direction": "Right", "query": QUERY, "top_n": 4,
     "texts": DOCS, "return_text": True},  # litellm huggingface/
])
def test_tei_bodies_get_a_bare_list(cpu_server, native, body):
    status, payload, _ = request(cpu_server.port, "POST", "/rerank", body)
    assert status == 200 and isinstance(payload, list) and len(payload) == len(DOCS)
    assert_same(native, [(r["index"], r["score"]) for r in payload])
    for r in payload:
        assert ("text" in r) == bool(body.get("return_text")) and r.get("text", DOCS[r["index"]]) == DOCS[r["index"]]


def test_tei_raw_scores_are_the_logits(cpu_server, native):
    payload = request(cpu_server.port, "POST", "/rerank", {"query": QUERY, "texts": DOCS, "raw_scores": True})[1]
    assert [r["index"] for r in payload] == native_order(native)
    for r in payload:
        assert abs(1 / (1 + math.exp(-r["score"])) - native[r["index"]]) < SCORE_TOLERANCE


def test_tei_truncate_false_refuses_a_pair_that_does_not_fit_and_left_truncation_keeps_the_end(cpu_server):
    long_doc = "the museum in paris has art " * 40 + "water boils at sea level"
    status, payload, _ = request(cpu_server.port, "POST", "/rerank",
                                 {"query": QUERY, "texts": ["short", long_doc], "truncate": False})
    assert status == 413 and payload["error_type"] == "Validation" and "max_length" in payload["error"]
    right = request(cpu_server.port, "POST", "/rerank", {"query": QUERY, "texts": [long_doc]})[1][0]["score"]
    left = request(cpu_server.port, "POST", "/rerank",
                   {"query": QUERY, "texts": [long_doc], "truncation_direction": "Left"})[1][0]["score"]
    assert abs(left - right) > 1e-3  # a different part of the document was scored
    status, payload, _ = request(cpu_server.port, "POST", "/rerank",
                                 {"query": QUERY, "texts": DOCS, "truncation_direction": "middle"})
    assert status == 400 and payload["error_type"] == "Validation"


# ---------------------------------------------------------------------------------------------- infinity / vLLM


@pytest.mark.parametrize("body, documents", [
    # litellm infinity/ and hosted_vllm/ (byte-identical): no document, since they parse it in opposite ways
    ({"model": "BAAI/bge-reranker-base", "query": QUERY, "top_n": 4, "documents": DOCS, "return_documents": True},
     False),
    # infinity_client: documents echoed as strings when asked
    ({"query": QUERY, "documents": DOCS, "return_documents": True, "raw_scores": False,
      "model": "default/not-specified", "top_n": 4}, True),
    # langchain-community InfinityRerank with its own client: model null, no top_n
    ({"query": QUERY, "documents": DOCS, "return_documents": False, "raw_scores": False, "model": None}, False),
])
def test_infinity_and_vllm_bodies(cpu_server, native, body, documents):
    status, payload, resp = request(cpu_server.port, "POST", "/rerank", body)
    assert status == 200, payload
    # what infinity_client requires, and what the litellm providers read
    assert payload["object"] == "rerank" and payload["model"] == "tiny-cross-encoder"
    assert payload["usage"]["prompt_tokens"] == payload["usage"]["total_tokens"] > 0
    assert payload["id"] == resp.getheader("X-Request-ID") and isinstance(payload["created"], int)
    assert_same(native, [(r["index"], r["relevance_score"]) for r in payload["results"]], body.get("top_n"))
    for r in payload["results"]:
        assert ("document" in r) == documents and r.get("document", DOCS[r["index"]]) == DOCS[r["index"]]


def test_infinity_raw_scores_are_logits(cpu_server, native):
    body = {"query": QUERY, "documents": DOCS, "raw_scores": True, "model": "m"}
    payload = request(cpu_server.port, "POST", "/rerank", body)[1]
    for r in payload["results"]:
        assert abs(1 / (1 + math.exp(-r["relevance_score"])) - native[r["index"]]) < SCORE_TOLERANCE


# ---------------------------------------------------------------------------------------------- pairs, dedupe


def test_pairs_with_their_own_queries_score_in_input_order(cpu_server):
    pairs = [{"query": QUERY, "passage": DOCS[0]}, {"query": "solar energy", "passage": DOCS[3]},
             {"query": QUERY, "passage": DOCS[1]}]
    status, payload, _ = request(cpu_server.port, "POST", "/rerank", pairs)
    assert status == 200 and set(payload) == {"scores"} and len(payload["scores"]) == 3
    for pair, score in zip(pairs, payload["scores"], strict=True):
        alone = request(cpu_server.port, "POST", "/rerank", {"query": pair["query"], "documents": [pair["passage"]]})
        assert abs(alone[1]["results"][0]["score"] - score) < SCORE_TOLERANCE
    status, payload, _ = request(cpu_server.port, "POST", "/rerank", [{"query": "q", "passage": "a", "x": 1}])
    assert status == 400 and payload["error"]["field"] == "[0].x"


def test_identical_documents_are_scored_once_and_keep_index_order(cpu_server):
    docs = [DOCS[1], DOCS[0], DOCS[1], DOCS[0], DOCS[1]]
    body = request(cpu_server.port, "POST", "/rerank", {"query": QUERY, "documents": docs})[1]
    by_index = {r["index"]: r["score"] for r in body["results"]}
    assert by_index[0] == by_index[2] == by_index[4] and by_index[1] == by_index[3]
    order = [r["index"] for r in body["results"]]
    assert order == sorted(order, key=lambda i: (-by_index[i], i))
