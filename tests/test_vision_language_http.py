"""The vision-language reranker end to end over HTTP (issue 20's "Done when"): `python server.py` serving the tiny
nemotron-VL fixture (tests/fixtures/models/tiny-nemotron-vl) at f32, dynamic shapes and static buckets. Every route
that takes image documents (native /rerank, Cohere/Jina /v1/rerank, Cohere v2, infinity/vLLM content parts, NIM's
/v1/ranking) scores the fixture's text, PNG, JPEG and image+text cases as torch did (reference.json) within
SCORE_TOLERANCE; the seed's own request and NVIDIARerank's recorded request; identical images encoded once and repeats
answered from the score cache (/metrics counts both); a decompression bomb refused from its header at little memory;
broken images a 400 on a connection that stays usable; an image URL from an allowed loopback host scored as the
image inline; chunking leaves an image document one window; a server without Pillow refuses a VL model in one line
and still serves a text-only one. One server per configuration: each is started once for the module."""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import struct
import zlib

import pytest
from support import ROOT
from support.http import request
from support.imagefiles import ImageServer, send
from support.models import F32, SCORE_TOLERANCE
from support.servers import run_server, spawn_server

FIXTURE = ROOT / "tests" / "fixtures" / "models" / "tiny-nemotron-vl"
REFERENCE = json.loads((FIXTURE / "reference.json").read_text())
CASES = REFERENCE["cases"]
LENGTH = REFERENCE["max_length"]
RECORDED = json.loads((ROOT / "tests" / "fixtures" / "clients" / "nvidia-rerank-vl.json").read_text())
NO_CACHE = {"Cache-Control": "no-cache"}
BASE = ["--device", "CPU", *F32, "--model-dir", str(FIXTURE), "--cache-dir", "", "--max-length", str(LENGTH),
        "--max-body-bytes", str(16 << 20)]
STATIC = ["--shape-mode", "static", "--buckets", f"1x64,4x64,2x{LENGTH},4x{LENGTH}"]  # image tokens: at most 12


def is_jpeg(case: dict) -> bool:
    return base64.b64decode(case["image"]).startswith(b"\xff\xd8\xff")


def media(case: dict) -> str:
    return "image/jpeg" if is_jpeg(case) else "image/png"


def data_url(case: dict) -> str:
    return f"data:{media(case)};base64,{case['image']}"


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    finally:
        proc.stdout.close()
        proc.stderr.close()


@pytest.fixture(scope="module")
def images():
    """A loopback server with the fixture's JPEG page at /page.jpg."""
    server = ImageServer()
    page = base64.b64decode(next(c for c in CASES if "image" in c and is_jpeg(c))["image"])
    server.routes["/page.jpg"] = lambda handler: send(handler, page, headers={"Content-Type": "image/jpeg"})
    yield server
    server.close()


@pytest.fixture(scope="module")
def dynamic():
    """Dynamic shapes, the score cache on, image URLs allowed from 127.0.0.1."""
    proc, port = spawn_server([*BASE, "--image-url-hosts", "127.0.0.1"])
    yield proc, port
    stop(proc)


@pytest.fixture(scope="module")
def static():
    proc, port = spawn_server([*BASE, *STATIC])
    yield proc, port
    stop(proc)


@pytest.fixture(params=["dynamic", "static"])
def shapes(request):
    return request.param, request.getfixturevalue(request.param)[1]


def metrics(port: int) -> dict[str, float]:
    """GET /metrics as {sample name (labels included): value}."""
    status, text, _ = request(port, "GET", "/metrics")
    assert status == 200
    return {line.rpartition(" ")[0]: float(line.rpartition(" ")[2]) for line in text.splitlines()
            if line and not line.startswith("#")}


# ---------------------------------------------------------------------------------------------- each route vs torch


def by_query() -> dict[str, list[dict]]:
    """The fixture's cases grouped by query: requests of one query and several documents (padding among them)."""
    groups: dict[str, list[dict]] = {}
    for case in CASES:
        groups.setdefault(case["query"], []).append(case)
    return groups


def jina(case: dict):
    if "image" not in case:
        return case["document"]
    return {"image": case["image"], **({"text": case["document"]} if case["document"] else {})}


def parts(case: dict):
    if "image" not in case:
        return case["document"]
    content = [{"type": "image_url", "image_url": {"url": data_url(case)}}]
    return {"content": content + ([{"type": "text", "text": case["document"]}] if case["document"] else [])}


# route: (path, body of a query and its cases, [(index, score)] from the answer)
ROUTES = {
    "native": ("/rerank", lambda q, cs: {"query": q, "documents": [jina(c) for c in cs], "return_documents": True},
               lambda body: [(r["index"], r["score"]) for r in body["results"]]),
    "native data: URL": ("/rerank", lambda q, cs: {"query": q, "documents": [
        {"image": data_url(c), "text": c["document"]} if "image" in c else {"text": c["document"]} for c in cs]},
        lambda body: [(r["index"], r["score"]) for r in body["results"]]),
    "jina": ("/v1/rerank", lambda q, cs: {"model": "jina-reranker-m0", "query": q, "documents": [jina(c) for c in cs]},
             lambda body: [(r["index"], r["relevance_score"]) for r in body["results"]]),
    "cohere v2": ("/v2/rerank", lambda q, cs: {"model": "m", "query": q, "documents": [parts(c) for c in cs]},
                  lambda body: [(r["index"], r["relevance_score"]) for r in body["results"]]),
    "vllm": ("/rerank", lambda q, cs: {"model": "m", "query": q, "documents": [parts(c) for c in cs],
                                       "top_n": len(cs)},
             lambda body: [(r["index"], r["relevance_score"]) for r in body["results"]]),
    "nim": ("/v1/ranking", lambda q, cs: {"model": "nvidia/llama-nemotron-rerank-vl-1b-v2", "query": {"text": q},
                                          "passages": [{"text": c["document"], **({"image": data_url(c)}
                                                                                  if "image" in c else {})}
                                                       for c in cs]},
            lambda body: [(r["index"], 1 / (1 + math.exp(-r["logit"]))) for r in body["rankings"]]),
}


@pytest.mark.parametrize("route", ROUTES)
def test_every_route_scores_text_png_jpeg_and_image_text_documents_as_torch(shapes, route):
    kind, port = shapes
    path, make, scores_of = ROUTES[route]
    worst, seen = 0.0, set()
    for query, cases in by_query().items():
        for together in (cases, *([c] for c in cases)) if len(cases) > 1 else (cases,):  # batched, then alone
            status, body, _ = request(port, "POST", path, make(query, together), NO_CACHE)
            assert status == 200, (route, body)
            answered = scores_of(body)
            assert sorted(i for i, _ in answered) == list(range(len(together)))
            for index, score in answered:
                case = together[index]
                worst = max(worst, abs(score - case["score"]))
                seen.add("text" if "image" not in case else "jpeg" if is_jpeg(case) else
                         "png+text" if case["document"] else "png")
    assert seen == {"text", "png", "jpeg", "png+text"}
    assert worst < SCORE_TOLERANCE, f"{kind} {route}: served scores differ from torch by {worst:.3g}"


def test_the_nim_logit_is_the_models_logit(dynamic):
    case = next(c for c in CASES if "image" in c and c["document"])
    status, body, _ = request(dynamic[1], "POST", "/v1/ranking", ROUTES["nim"][1](case["query"], [case]), NO_CACHE)
    assert status == 200 and abs(body["rankings"][0]["logit"] - case["logit"]) < 4 * SCORE_TOLERANCE


def test_the_issues_seed_request_gets_sigmoid_relevance_scores(shapes):
    """`{"query", "documents", "top_n": 2}` with text documents: the two best, as `relevance_score`, sigmoid."""
    kind, port = shapes
    text = [c for c in CASES if "image" not in c]
    query = text[0]["query"]
    status, body, _ = request(port, "POST", "/rerank", {"query": query, "documents": [c["document"] for c in text],
                                                       "top_n": 2})
    assert status == 200, body
    results = body["results"]
    assert len(results) == 2 and all(set(r) == {"index", "relevance_score"} for r in results)
    assert results[0]["relevance_score"] >= results[1]["relevance_score"]
    native = request(port, "POST", "/rerank", {"query": query, "documents": [c["document"] for c in text]})[1]
    expected = sorted(((r["index"], r["score"]) for r in native["results"]), key=lambda r: -r[1])[:2]
    assert [r["index"] for r in results] == [i for i, _ in expected]
    assert [r["relevance_score"] for r in results] == pytest.approx([s for _, s in expected], abs=1e-12)
    assert all(0 < r["relevance_score"] < 1 for r in results)
    first = next(r for r in results + native["results"] if r["index"] == 0)  # the one pair torch scored
    assert abs(first.get("relevance_score", first.get("score")) - text[0]["score"]) < SCORE_TOLERANCE


def test_nvidia_reranks_recorded_request_gets_the_models_logits(shapes):
    """langchain-nvidia-ai-endpoints' NVIDIARerank, as recorded: page images and text on /v1/ranking; each logit is
    the logit the same document scores on the native route."""
    kind, port = shapes
    status, body, _ = request(port, RECORDED["method"], RECORDED["path"], RECORDED["body"], NO_CACHE)
    assert status == 200, body
    rankings = body["rankings"]
    passages = RECORDED["body"]["passages"]
    assert sorted(r["index"] for r in rankings) == list(range(len(passages)))
    assert [r["logit"] for r in rankings] == sorted((r["logit"] for r in rankings), reverse=True)
    documents = [{"image": p["image"], "text": p["text"]} if p.get("image") else p["text"] for p in passages]
    status, native, _ = request(port, "POST", "/rerank", {"query": RECORDED["body"]["query"]["text"],
                                                         "documents": documents}, NO_CACHE)
    assert status == 200, native
    scores = {r["index"]: r["score"] for r in native["results"]}
    for ranking in rankings:
        score = scores[ranking["index"]]
        assert abs(ranking["logit"] - math.log(score / (1 - score))) < 1e-6
    assert len(set(scores.values())) == len(passages)  # the images and texts tell the passages apart


# ---------------------------------------------------------------------------------------------- once, then cached


def test_identical_images_are_encoded_once_and_a_repeat_comes_from_the_score_cache(dynamic):
    from openvino_reranker.vision import synthetic_page

    port = dynamic[1]
    page = base64.b64encode(synthetic_page(77, 61, 4242)).decode()  # an image no other test sends
    body = {"query": "quarterly revenue", "documents": [{"image": page, "text": "page 1"}, {"image": page},
                                                        {"image": page, "text": "page 1"}, "a text passage"]}
    before = metrics(port)
    status, first, _ = request(port, "POST", "/rerank", body)
    assert status == 200, first
    after = metrics(port)
    assert after["openvino_reranker_images_encoded_total"] - before["openvino_reranker_images_encoded_total"] == 1
    # three distinct pairs (the first and third documents are one) went to the model
    assert after["openvino_reranker_score_cache_misses_total"] - \
        before["openvino_reranker_score_cache_misses_total"] == 3
    scores = {r["index"]: r["score"] for r in first["results"]}
    assert scores[0] == scores[2] and first["timings_ms"]["infer"] > 0

    status, again, _ = request(port, "POST", "/v1/rerank", {**body, "model": "m"})  # another dialect: same keys
    assert status == 200 and again["results"]
    repeated = metrics(port)
    assert repeated["openvino_reranker_score_cache_hits_total"] - after["openvino_reranker_score_cache_hits_total"] \
        == 3  # the distinct pairs
    for name in ("openvino_reranker_score_cache_misses_total", "openvino_reranker_images_encoded_total",
                 'openvino_reranker_stage_duration_seconds_sum{stage="infer"}'):
        assert repeated[name] == after[name], name  # no inference at all
    assert {r["index"]: r["relevance_score"] for r in again["results"]} == scores

    status, bypassed, _ = request(port, "POST", "/rerank", body, NO_CACHE)
    assert status == 200 and bypassed["timings_ms"]["infer"] > 0  # scored by the model again
    last = metrics(port)
    assert last["openvino_reranker_score_cache_hits_total"] == repeated["openvino_reranker_score_cache_hits_total"]
    assert last["openvino_reranker_images_encoded_total"] == repeated["openvino_reranker_images_encoded_total"], \
        "the image's embeddings are kept by digest: no-cache skips the score cache, not the embedding cache"
    assert {r["index"]: r["score"] for r in bypassed["results"]} == pytest.approx(scores, abs=1e-12)


# ---------------------------------------------------------------------------------------------- refusals


def png_bomb(width: int, height: int, rows: int | None = None) -> bytes:
    """A PNG of width x height black pixels, its rows deflated in pieces (a real decompression bomb: a few hundred
    kB that decode to width x height x 3 bytes); with `rows`, only that many rows' data (a truncated one)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    deflate, row, idat = zlib.compressobj(9), bytes(1 + 3 * width), []
    for _ in range(0, height if rows is None else rows, 256):
        idat.append(deflate.compress(row * 256))
    idat.append(deflate.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """The fixture's JPEG with its frame header (SOF0) declaring width x height: its data decodes to no such
    image, but the size is read from the header."""
    jpeg = bytearray(base64.b64decode(next(c for c in CASES if "image" in c and is_jpeg(c))["image"]))
    at = jpeg.index(b"\xff\xc0")
    jpeg[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(jpeg)


def post_costs(proc, port: int, body: bytes, conn: http.client.HTTPConnection) -> tuple[int, dict, int]:
    """(status, JSON body, peak RSS growth in bytes) of one request on `conn`, the peak reset just before it."""
    def kib(field: str) -> int:
        with open(f"/proc/{proc.pid}/status") as f:
            return int(next(line for line in f if line.startswith(field)).split()[1])

    with open(f"/proc/{proc.pid}/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak) to the current RSS
    before = kib("VmRSS:")
    conn.request("POST", "/rerank", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = json.loads(response.read())
    return response.status, payload, (kib("VmHWM:") - before) * 1024


def test_a_decompression_bomb_is_a_413_naming_the_document_and_costs_its_header(dynamic):
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("cannot reset the peak RSS here (/proc/PID/clear_refs is not writable)")
    proc, port = dynamic
    bombs = {"PNG 8000x8000 (64 Mpx, under Pillow's own guard)": png_bomb(8000, 8000),
             "PNG 30000x30000 (900 Mpx, its first rows)": png_bomb(30000, 30000, 2048),
             "JPEG declaring 7000x7000": jpeg_declaring(7000, 7000),
             "JPEG declaring 60000x60000": jpeg_declaring(60000, 60000)}
    small = next(c for c in CASES if "image" in c)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        def body(image: str) -> bytes:
            return json.dumps({"query": "q", "documents": ["a text", {"image": image}]}).encode()

        baseline = 0
        for _ in range(2):  # a real image decoded and scored: what an ordinary request grows by
            status, _, grown = post_costs(proc, port, body(small["image"]), conn)
            assert status == 200
            baseline = max(baseline, grown)
        for name, bomb in bombs.items():
            assert len(bomb) < 1 << 20, name  # each a small file...
            status, payload, grown = post_costs(proc, port, body(base64.b64encode(bomb).decode()), conn)
            assert status == 413, (name, payload)
            assert payload["error"]["field"] == "documents[1]" and "max_image_pixels" in payload["error"]["message"]
            # ...refused before a pixel is decoded: 64 Mpx of RGB would be 192 MB
            assert grown <= 4 * baseline + 24 * 2**20, (name, grown, baseline)
        status, _, _ = post_costs(proc, port, body(small["image"]), conn)
        assert status == 200  # the same connection goes on
    finally:
        conn.close()


def test_a_truncated_or_corrupt_image_is_a_400_naming_the_document_on_a_usable_connection(dynamic):
    port = dynamic[1]
    case = next(c for c in CASES if c.get("tiles") == 3 and not is_jpeg(c))
    png, jpeg = base64.b64decode(case["image"]), jpeg_declaring(45, 112)
    broken = {"truncated PNG": png[:len(png) // 2], "truncated JPEG": jpeg[:len(jpeg) // 2],
              "corrupt PNG": png[:40] + bytes(200) + png[240:], "a PNG's signature only": png[:8],
              "a JPEG's signature and zeros": jpeg[:4] + bytes(300)}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for name, data in broken.items():
            encoded = base64.b64encode(data).decode()
            url = f"data:image/{'jpeg' if 'JPEG' in name else 'png'};base64,{encoded}"
            for path, body, field, error in [
                ("/rerank", {"query": "q", "documents": ["t", "u", {"image": encoded}]}, "documents[2]",
                 lambda p: p["error"]),
                ("/v1/rerank", {"query": "q", "documents": ["t", {"image": encoded, "text": "x"}]}, "documents[1]",
                 lambda p: p),
                ("/v1/ranking", {"model": "m", "query": {"text": "q"},
                                 "passages": [{"text": "", "image": url}]},
                 "passages[0]", lambda p: {"message": p["detail"], **p}),
            ]:
                status, payload, _ = request(port, "POST", path, body, NO_CACHE, conn=conn)
                assert status == 400, (name, path, payload)
                assert error(payload)["field"] == field and error(payload)["message"].startswith(field), payload
        status, payload, _ = request(port, "POST", "/rerank", {"query": case["query"],
                                                               "documents": [{"image": case["image"]}]}, conn=conn)
        assert status == 200 and abs(payload["results"][0]["score"] - case["score"]) < SCORE_TOLERANCE
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------- URLs and chunks


def test_an_image_url_from_an_allowed_host_scores_as_the_image_inline(dynamic, images):
    port = dynamic[1]
    case = next(c for c in CASES if "image" in c and is_jpeg(c))
    url = {"query": case["query"], "documents": [{"image": images.url("/page.jpg")}, "a text passage"]}
    status, fetched, _ = request(port, "POST", "/rerank", url, NO_CACHE)
    assert status == 200, fetched
    inline = {**url, "documents": [{"image": case["image"]}, "a text passage"]}
    status, sent, _ = request(port, "POST", "/rerank", inline, NO_CACHE)
    assert status == 200, sent
    assert images.requests == ["/page.jpg"]
    by_url, by_value = ({r["index"]: r["score"] for r in b["results"]} for b in (fetched, sent))
    assert by_url == pytest.approx(by_value, abs=1e-12)
    assert abs(by_url[0] - case["score"]) < SCORE_TOLERANCE
    status, refused, _ = request(port, "POST", "/rerank", {**url, "documents": [
        {"image": images.url("/page.jpg", host="localhost")}]})
    assert status == 400 and "image_url_hosts" in refused["error"]["message"]  # only the hosts listed


def test_an_image_document_is_one_window_when_documents_are_chunked(shapes):
    kind, port = shapes
    long_image = next(c for c in CASES if "image" in c and len(c["input_ids"]) == LENGTH)  # its text is cut
    image_only = next(c for c in CASES if "image" in c and not c["document"])
    long_text = next(c for c in CASES if "image" not in c and len(c["input_ids"]) == LENGTH)
    for case in (long_image, image_only):
        body = {"query": case["query"], "max_chunks_per_doc": 4,
                "documents": [{"image": case["image"], "text": case["document"]}, long_text["document"]]}
        status, payload, _ = request(port, "POST", "/rerank", body, NO_CACHE)
        assert status == 200, payload
        results = {r["index"]: r for r in payload["results"]}
        assert results[0]["chunks"] == 1 and results[1]["chunks"] > 1
        assert results[0]["truncated"] == (case is long_image)
        assert abs(results[0]["score"] - case["score"]) < SCORE_TOLERANCE  # as without chunking: torch's score
        assert results[0]["tokens"] == len(case["input_ids"])


# ---------------------------------------------------------------------------------------------- without Pillow


@pytest.fixture(scope="module")
def no_pillow(tmp_path_factory):
    """A PYTHONPATH whose sitecustomize makes `import PIL` fail, as where the `vision` extra is not installed."""
    where = tmp_path_factory.mktemp("no-pillow")
    (where / "sitecustomize.py").write_text("import sys\nsys.modules['PIL'] = None  # import PIL: ImportError\n")
    return {"PYTHONPATH": str(where)}


def test_without_pillow_a_vision_language_model_exits_2_in_one_line_naming_the_extra(no_pillow):
    result = run_server(["--device", "CPU", "--model-dir", str(FIXTURE), "--cache-dir", "", "--port", "0"],
                        no_pillow)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr
    assert "Pillow" in errors[0] and "vision" in errors[0] and "pip install" in errors[0]


def test_without_pillow_a_text_only_model_still_serves(tiny_model, no_pillow):
    proc, port = spawn_server(["--device", "CPU", "--model-dir", str(tiny_model.path), "--cache-dir", ""], no_pillow)
    try:
        status, body, _ = request(port, "POST", "/rerank", {"query": "q", "documents": ["a text", "another"]})
        assert status == 200, body
        status, body, _ = request(port, "POST", "/rerank", {"query": "q", "documents": [{"image": CASES[3]["image"]}]})
        assert status == 400 and "takes text only" in body["error"]["message"]
    finally:
        stop(proc)
