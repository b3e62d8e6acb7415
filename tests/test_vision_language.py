"""The vision-language reranker (nvidia/llama-nemotron-rerank-vl-1b-v2's layout) against torch: the committed tiny
random checkpoint exported by tools/export_nemotron_vl.py (tests/fixtures/models/generate.py --only
tiny-nemotron-vl), served through the real startup path (the parity guard, the model's reference scores, both IRs
compiled), its text-only, image-only and image+text documents scored within SCORE_TOLERANCE of torch on dynamic
shapes and static buckets; broken images as 400/413 naming the document; images decoded once and encoded once across
concurrent requests; a missing Pillow as one startup line naming the extra."""

import base64
import io
import json
import sys
import threading

import numpy as np
import pytest
from support import ROOT
from support.http import request
from support.models import F32, SCORE_TOLERANCE
from support.servers import RunningServer

from openvino_reranker.batcher import WorkLimits
from openvino_reranker.config import load_config
from openvino_reranker.encoding import DocumentError, load_tokenizer
from openvino_reranker.errors import BadRequestError, DocumentNames, PayloadTooLargeError, StartupError
from openvino_reranker.modeldir import load_model_files, make_head
from openvino_reranker.referencescores import parse_reference_scores, reference_scores_json
from openvino_reranker.scoring import ImageDocument
from openvino_reranker.startup import build_reranker
from openvino_reranker.vision import TilingSettings, closest_aspect_ratio, synthetic_page, target_ratios
from openvino_reranker.visionhead import VisionLanguageHead

FIXTURE = ROOT / "tests" / "fixtures" / "models" / "tiny-nemotron-vl"
REFERENCE = json.loads((FIXTURE / "reference.json").read_text())
CASES = REFERENCE["cases"]
LENGTH = REFERENCE["max_length"]
KINDS = {"text": lambda c: "image" not in c, "image": lambda c: "image" in c and not c["document"],
         "image+text": lambda c: "image" in c and bool(c["document"])}
MEASURED: dict[tuple[str, str], float] = {}  # (shapes, kind) -> max |served - torch|, printed at the end


def document(case: dict):
    return ImageDocument(base64.b64decode(case["image"]), case["document"]) if "image" in case else case["document"]


def args(shapes: str, *extra: str) -> list[str]:
    out = ["--device", "CPU", *F32, "--model", str(FIXTURE), "--max-length", str(LENGTH), "--cache-dir", "",
           "--score-cache-size", "0", *extra]
    if shapes == "static":
        out += ["--shape-mode", "static", "--buckets", f"1x64,4x64,2x{LENGTH},4x{LENGTH}"]
    return out


@pytest.fixture(scope="module", params=["dynamic", "static"])
def served(request):
    """The fixture served as the server serves it (startup.build_reranker: both IRs compiled, the parity guard with
    image documents, the model's reference scores checked), in-process."""
    reranker, files, info, parity = build_reranker(load_config(args(request.param)), None)
    try:
        yield request.param, reranker, files, info, parity
    finally:
        reranker.close()


def head():
    import openvino as ov

    files = load_model_files(FIXTURE, LENGTH)
    model = ov.Core().read_model(str(files.xml))
    return make_head(files, load_tokenizer(files.tokenizer), model)


def test_the_head_feeds_exactly_the_ids_torch_was_fed():
    vl = head()
    assert isinstance(vl, VisionLanguageHead) and vl.takes_images and vl.kind == "vision-language"
    encoded = vl.encode([c["query"] for c in CASES], [document(c) for c in CASES])
    for case, ids, images in zip(CASES, encoded.ids, encoded.images, strict=True):
        assert ids.tolist() == case["input_ids"], case["query"]
        assert (images is None) == ("image" not in case)
        if images is not None:
            assert images[0].count == case["tiles"]
    assert sum(bool(t) for t in encoded.truncated) == sum(len(c["input_ids"]) == LENGTH for c in CASES) >= 2


@pytest.mark.parametrize("kind", KINDS)
def test_served_scores_match_torch(served, kind):
    shapes, reranker, files, info, parity = served
    cases = [c for c in CASES if KINDS[kind](c)]
    assert cases
    expected = np.array([c["score"] for c in cases])
    together = reranker.score_pairs([c["query"] for c in cases], [document(c) for c in cases], use_cache=False)
    worst = float(np.abs(together.scores - expected).max())
    for case in cases:  # one pair alone: no padding
        alone = reranker.score_pairs(case["query"], [document(case)], use_cache=False)
        worst = max(worst, abs(float(alone.scores[0]) - case["score"]))
    everything = reranker.score_pairs([c["query"] for c in CASES], [document(c) for c in CASES], use_cache=False)
    mine = np.array([KINDS[kind](c) for c in CASES])
    worst = max(worst, float(np.abs(everything.scores[mine] - expected).max()))  # padded among the other kinds
    MEASURED[(shapes, kind)] = worst
    print(f"\n{shapes} {kind}: max |served - torch| = {worst:.3g}")
    assert worst < SCORE_TOLERANCE, f"{shapes} {kind}: served scores differ from torch by {worst:.3g}"


def test_startup_checked_both_irs_and_the_image_reference_scores(served):
    shapes, reranker, files, info, parity = served
    assert files.vision is not None and files.vision.xml.name == "openvino_vision.xml"
    assert len(info.loaded_from_cache) == (1 if shapes == "dynamic" else 4) + 1  # the vision encoder's compile too
    checked = parity.reference_scores
    assert checked is not None and checked.passed and checked.compared == len(CASES)
    assert any(pair.image is not None for pair in files.reference_scores.pairs)
    assert parity.max_abs_diff <= parity.tolerance
    assert (reranker.engine.vision.tiles is None) == (shapes == "dynamic")


def test_token_counts_include_the_image_tokens(served):
    shapes, reranker, *_ = served
    case = next(c for c in CASES if c.get("tiles") == 3)
    scored = reranker.score_pairs(case["query"], [document(case)], use_cache=False)
    assert scored.lengths[0] == len(case["input_ids"])  # 3 tiles x 4 tokens of <IMG_CONTEXT> counted
    limits = WorkLimits(max_total_tokens=len(case["input_ids"]) - 1)
    with pytest.raises(PayloadTooLargeError):
        reranker.score_pairs(case["query"], [document(case)], limits, use_cache=False)


def corrupt_cases():
    png = base64.b64decode(next(c for c in CASES if c.get("tiles") == 3)["image"])
    return {"truncated": png[:len(png) // 2], "not an image": b"GIF89a this is not a png",
            "corrupt": png[:40] + bytes(200) + png[240:]}


@pytest.mark.parametrize("what", ["truncated", "not an image", "corrupt"])
def test_a_broken_image_is_a_400_naming_the_document(served, what):
    shapes, reranker, *_ = served
    documents = ["Paris is the capital of France.", ImageDocument(corrupt_cases()[what], "a page")]
    with pytest.raises(BadRequestError) as caught:
        reranker.score_pairs("capital", documents, WorkLimits(names=DocumentNames("texts", "texts")))
    assert caught.value.field == "texts[1]" and "texts[1]" in caught.value.message
    assert caught.value.status == 400


def test_an_image_over_max_image_pixels_is_a_413_naming_the_document(served):
    shapes, reranker, *_ = served
    big = synthetic_page(4000, 3000, 9)  # 12 million pixels: more than the head's limit below
    vl = reranker.head
    saved, vl.max_image_pixels = vl.max_image_pixels, 1_000_000
    try:
        # the dedupe keeps request positions: the image stands third, after two copies of one text
        with pytest.raises(PayloadTooLargeError) as caught:
            reranker.score_pairs("q", ["a", "a", ImageDocument(big)], use_cache=False)
    finally:
        vl.max_image_pixels = saved
    assert caught.value.field == "documents[2]" and caught.value.status == 413
    assert "max_image_pixels" in caught.value.message


def test_the_head_names_a_broken_image_by_its_position():
    with pytest.raises(DocumentError) as caught:
        head().encode("q", ["text", ImageDocument(b"\x89PNG\r\n\x1a\n broken")])
    assert caught.value.index == 1 and not caught.value.too_large


def test_images_are_deduped_and_batched_across_concurrent_requests(served):
    shapes, reranker, *_ = served
    engine = reranker.engine
    pages = [synthetic_page(60 + 7 * i, 50, 100 + i) for i in range(4)]
    before = engine.cache.encoded
    gate = threading.Barrier(4)
    results, errors = {}, []

    def client(n):
        try:
            gate.wait()
            # every request pairs its query with all four pages, each twice (with and without text)
            docs = [ImageDocument(p) for p in pages] + [ImageDocument(p, f"page {i}") for i, p in enumerate(pages)]
            results[n] = reranker.score_pairs(f"query {n}", docs, use_cache=False).scores
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    assert engine.cache.encoded - before == 4  # 32 image pairs, 4 distinct images: each encoded once
    alone = reranker.score_pairs("query 2", [ImageDocument(pages[1])], use_cache=False).scores[0]
    assert abs(alone - results[2][1]) < SCORE_TOLERANCE


def test_a_text_only_request_through_a_real_server():
    """The native route passes strings today; the VL model serves them like the text reranker does."""
    text = [c for c in CASES if "image" not in c]
    with RunningServer(args("dynamic")).wait_ready() as srv:
        ready = request(srv.port, "GET", "/readyz")[1]
        assert ready["head"]["kind"] == "vision-language" and ready["head"]["max_image_tokens"] == 12
        for case in text:
            status, body = request(srv.port, "POST", "/rerank", {"query": case["query"],
                                                                  "documents": [case["document"]], "top_n": 1})[:2]
            assert status == 200, body
            assert abs(body["results"][0]["relevance_score"] - case["score"]) < SCORE_TOLERANCE


def test_startup_refuses_in_one_line_naming_the_extra_without_pillow(monkeypatch):
    for name in [m for m in sys.modules if m == "PIL" or m.startswith("PIL.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL raises ImportError
    with pytest.raises(StartupError) as caught:
        head()
    message = str(caught.value)
    assert caught.value.exit_code == 2 and "\n" not in message
    assert "vision" in message and "pip install" in message


def test_max_length_must_hold_the_largest_image():
    import openvino as ov

    files = load_model_files(FIXTURE, 16)
    with pytest.raises(StartupError, match="cannot hold an image document"):
        make_head(files, load_tokenizer(files.tokenizer), ov.Core().read_model(str(files.xml)))


def test_tiling_follows_the_processor():
    settings = TilingSettings(56, 2, True, True, 4)
    assert settings.max_tiles == 3
    assert target_ratios(2) == [(1, 1), (1, 2), (2, 1)]
    assert closest_aspect_ratio(112 / 45, target_ratios(2), 112, 45, 56) == (2, 1)
    assert closest_aspect_ratio(1.0, target_ratios(6), 2000, 2000, 512) == (2, 2)
    config = json.loads((FIXTURE / "config.json").read_text())
    assert TilingSettings.from_config(config) == settings
    with pytest.raises(ValueError, match="patch"):
        TilingSettings.from_config({**config, "force_image_size": 50})


def test_reference_scores_carry_images():
    png = synthetic_page(20, 20, 1)
    text = reference_scores_json([("q", "", None, 0.5, png), ("q", "doc", None, 0.25)], 1e-4, None, {"tool": "t"})
    parsed = parse_reference_scores(text)
    assert parsed.pairs[0].image == png and parsed.pairs[0].document == ""
    assert parsed.pairs[1].image is None
    broken = json.loads(text)
    broken["pairs"][0]["image"] = "not base64!"
    with pytest.raises(ValueError, match="base64"):
        parse_reference_scores(json.dumps(broken))
    broken["pairs"][0].pop("image")
    with pytest.raises(ValueError, match="document"):
        parse_reference_scores(json.dumps(broken))


def test_a_jpeg_document_is_served():
    case = next(c for c in CASES if base64.b64decode(c.get("image", "")).startswith(b"\xff\xd8\xff"))
    from PIL import Image

    assert Image.open(io.BytesIO(base64.b64decode(case["image"]))).format == "JPEG"
