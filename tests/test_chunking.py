"""Long documents, chunked: a document is scored as its best window, on every dialect; truncation (head or tail)
stays the default. The engine stand-in scores by which words a window holds, so relevance is known exactly."""

import numpy as np
import pytest
from support.engines import FakeEngine, fake_head
from support.http import request

from openvino_reranker.reranker import Reranker
from openvino_reranker.scoring import Truncation

FILLER = "solar power energy from the sun and wind over the ocean "  # 11 tokens, none of them relevant
NEEDLE = "paris"  # the only relevant word


class WordEngine(FakeEngine):
    """logit 5 for a row holding `paris`, 1 for one holding `cat`, else -5."""

    def __init__(self, tokenizer):
        super().__init__()
        self.needle, self.mild = tokenizer.token_to_id("paris"), tokenizer.token_to_id("cat")

    def infer(self, feed, shape, deadline=None):
        ids = feed["input_ids"]
        return np.where((ids == self.needle).any(axis=1), 5.0,
                        np.where((ids == self.mild).any(axis=1), 1.0, -5.0))[:, None].astype(np.float32)


@pytest.fixture
def reranker(tiny_model):
    head = fake_head(tiny_model.path / "tokenizer.json", 128)
    made = Reranker(head, WordEngine(head.tokenizer), 8)
    yield made
    made.close()


def long_document(tokens: int) -> str:
    return FILLER * (tokens // 11) + NEEDLE


def test_chunking_finds_a_passage_in_the_last_window_that_truncation_cuts_off(reranker):
    docs = [long_document(5000), "the cat sat on the farm"]
    truncated = reranker.score_pairs("where is it", docs)
    assert truncated.scores[0] < truncated.scores[1]  # the needle is far past max_length
    chunked = reranker.score_pairs("where is it", docs, truncation=Truncation(max_chunks=200))
    assert chunked.scores[0] > chunked.scores[1]  # ... and chunking finds it in the last window
    assert chunked.chunks.tolist()[1] == 1 and chunked.chunks[0] > 40 and not chunked.truncated[0]


def test_max_chunks_bounds_the_windows_and_reports_what_was_left(reranker):
    chunked = reranker.score_pairs("where is it", [long_document(5000)], truncation=Truncation(max_chunks=3))
    assert chunked.chunks.tolist() == [3] and chunked.truncated.tolist() == [True]
    assert chunked.scores[0] < 0.5  # the needle was in a window that was not scored


def test_windows_fit_with_the_query_overlap_and_cover_the_text(reranker):
    head = reranker.head
    import random

    import tinymodel

    rng = random.Random(0)
    text = " ".join(rng.choice(tinymodel.WORDS) for _ in range(700))  # not periodic: each window is found once
    windows, left_over = head.windows("where is it", text, 100)
    assert not left_over and len(windows) > 3
    encoded = head.encode("where is it", windows)
    assert not encoded.truncated.any() and encoded.lengths.max() <= 128  # every window fits whole
    assert windows[0] == text[:len(windows[0])] and text.endswith(windows[-1])
    spans, start = [], 0
    for window in windows:  # each window is a slice of the text, starting at a word and after the previous start
        start = text.index(window, start + (1 if spans else 0))
        assert start == 0 or text[start - 1] == " "
        spans.append((start, start + len(window)))
    for (_, end_a), (start_b, _) in zip(spans, spans[1:], strict=False):
        assert start_b < end_a  # consecutive windows overlap
    assert spans[-1][1] == len(text)
    assert head.windows("where is it", "a short document", 5) == (["a short document"], False)


@pytest.mark.parametrize("path, body, read", [
    ("/rerank", {"query": "where is it", "documents": None, "max_chunks_per_doc": 200},
     lambda p: [r["index"] for r in p["results"]]),
    ("/v1/rerank", {"query": "where is it", "documents": None, "max_chunks_per_doc": 200},
     lambda p: [r["index"] for r in p["results"]]),
    ("/v2/rerank", {"model": "m", "query": "where is it", "documents": None, "max_chunks_per_doc": 200},
     lambda p: [r["index"] for r in p["results"]]),
    ("/rerank", {"query": "where is it", "texts": None, "max_chunks_per_doc": 200}, lambda p: [r["index"] for r in p]),
])
def test_every_dialect_can_chunk(fake_server, tiny_model, path, body, read):
    fake = fake_server()
    head = fake_head(tiny_model.path / "tokenizer.json", 64)
    fake.start(WordEngine(head.tokenizer))
    docs = ["the cat sat on the farm", long_document(3000)]
    key = "texts" if "texts" in body else "documents"
    chunked = dict(body, **{key: docs})
    status, payload, _ = request(fake.port, "POST", path, chunked)
    assert status == 200 and read(payload) == [1, 0], payload
    plain = {k: v for k, v in chunked.items() if k != "max_chunks_per_doc"}
    assert read(request(fake.port, "POST", path, plain)[1]) == [0, 1]


def test_native_results_report_tokens_and_chunks(fake_server, tiny_model):
    fake = fake_server()
    head = fake_head(tiny_model.path / "tokenizer.json", 64)
    fake.start(WordEngine(head.tokenizer))
    body = {"query": "q", "documents": ["the cat", long_document(500)], "max_chunks_per_doc": 50}
    results = {r["index"]: r for r in request(fake.port, "POST", "/rerank", body)[1]["results"]}
    assert results[0]["chunks"] == 1 and results[1]["chunks"] > 5 and results[1]["tokens"] > 500
    status, payload, _ = request(fake.port, "POST", "/rerank", dict(body, max_chunks_per_doc=0))
    assert status == 400 and payload["error"]["field"] == "max_chunks_per_doc"


def test_a_document_over_100000_characters_is_scored(fake_server):
    fake = fake_server().start(FakeEngine())
    status, payload, _ = request(fake.port, "POST", "/rerank",
                                 {"query": "q", "documents": ["solar power " * 20_000, "cat"]})
    assert status == 200 and len(payload["results"]) == 2


def test_a_word_longer_than_a_window_is_split_inside_it(tiny_model):
    head = fake_head(tiny_model.path / "tokenizer.json", 32)  # windows of about 28 tokens
    from tokenizers import Tokenizer

    word = "electricity" * 8  # one word of 88 one-letter word pieces (WordPiece gives [UNK] past 100 characters)
    counter = Tokenizer.from_file(str(tiny_model.path / "tokenizer.json"))
    assert len(counter.encode(word, add_special_tokens=False).ids) == 88
    windows, left_over = head.windows("q", f"{word} tail", 20)
    assert not left_over and 3 <= len(windows) <= 6 and windows[-1].endswith("tail")
    assert all(len(w) > 10 for w in windows)  # not one-token slivers
