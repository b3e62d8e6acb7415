"""The real compiled model: served scores against the independent numpy reference, the model directory, the
NPU busy counter."""

import threading
import time

import numpy as np
import openvino as ov
import pytest
from support.engines import FakeEngine, real_reranker
from support.models import F32_LATENCY, SCORE_TOLERANCE

from openvino_reranker.compilecache import CONFIGURATION_FILE, open_compile_cache
from openvino_reranker.config import ShapeBucket
from openvino_reranker.encoding import CrossEncoderHead
from openvino_reranker.engine import InferenceEngine, NpuBusyCounter, ReplicaSet, make_engine
from openvino_reranker.errors import EXIT_MODEL, DeadlineExceededError, StartupError
from openvino_reranker.modeldir import load_model_files
from openvino_reranker.reranker import Reranker

QUERY = "how does solar power work"
DOCS = [
    "solar power is energy from the sun turned into electricity by cells",
    "the cat sat on the farm",
    "water boils at one hundred degrees celsius at sea level, and at lower temperatures on a high mountain",
    "paris",
    "wind and solar energy are power for a city grid " * 6,
]


@pytest.fixture
def make_reranker():
    made = []

    def make(model, buckets=None, max_length=None, batch_size=2, core=None, cache=None):
        made.append(real_reranker(model, buckets, max_length or 0, batch_size, core, cache=cache))
        return made[-1]

    yield make
    for reranker in made:
        reranker.close()


def test_the_engine_and_the_tests_stand_in_have_what_the_batcher_uses(make_reranker, tiny_model):
    engine = make_reranker(tiny_model).engine
    assert isinstance(engine, InferenceEngine) and engine.num_requests >= 1
    assert isinstance(FakeEngine(), InferenceEngine)


class _HeldReplica:
    """An Engine stand-in with one infer request whose `infer` waits until the test releases it."""

    def __init__(self, name: str):
        self.name, self.num_requests, self.buckets = name, 1, None
        self.contract = self.device = self.properties = self.cache_dir = None
        self.entered, self.release = threading.Event(), threading.Event()

    def infer(self, feed, shape, deadline=None):
        self.entered.set()
        assert self.release.wait(10)
        return np.full((1, 1), ord(self.name), np.float32)


def test_a_replica_set_runs_batches_on_every_replica_at_once():
    a, b = _HeldReplica("a"), _HeldReplica("b")
    replicas = ReplicaSet([a, b])
    assert isinstance(replicas, InferenceEngine) and replicas.num_requests == 2
    results = []
    threads = [threading.Thread(target=lambda: results.append(replicas.infer({}, None))) for _ in range(2)]
    for t in threads:
        t.start()
    assert a.entered.wait(10) and b.entered.wait(10)  # both busy at once: neither waits for the other
    with pytest.raises(DeadlineExceededError):  # a third batch waits for a free replica, up to its deadline
        replicas.infer({}, None, deadline=time.monotonic() + 0.05)
    a.release.set()
    b.release.set()
    for t in threads:
        t.join(10)
    assert sorted(float(r[0, 0]) for r in results) == [ord("a"), ord("b")]


def test_replicas_of_the_tiny_model_score_like_one_compile(tiny_model):
    files = load_model_files(str(tiny_model.path), 0)
    core = ov.Core()
    ir = core.read_model(str(files.xml))
    head = CrossEncoderHead.from_file(files.tokenizer, files.max_length, CrossEncoderHead.check_contract(ir))
    properties = {**F32_LATENCY, "INFERENCE_NUM_THREADS": "1", "ENABLE_CPU_PINNING": "NO"}
    engine = make_engine(core, ir, "CPU", None, properties, head.contract, replicas=2)
    assert isinstance(engine, ReplicaSet) and len(engine.replicas) == 2
    info = engine.info()
    assert (info.replicas, info.infer_requests, len(info.loaded_from_cache)) == (2, 2, 2)
    reranker = Reranker(head, engine, 2)
    try:
        scores = reranker.score_pairs(QUERY, DOCS * 4).scores
    finally:
        reranker.close()
    assert np.abs(scores - tiny_model.reference_scores(QUERY, DOCS * 4)).max() < SCORE_TOLERANCE


@pytest.mark.parametrize("buckets", [None, (ShapeBucket(1, 32), ShapeBucket(4, 32), ShapeBucket(2, 128))])
def test_scores_match_the_numpy_reference(make_reranker, tiny_model, buckets):
    scored = make_reranker(tiny_model, buckets).score_pairs(QUERY, DOCS)
    expected = tiny_model.reference_scores(QUERY, DOCS)
    assert abs(scored.scores - expected).max() < SCORE_TOLERANCE
    assert scored.batches >= 2  # micro-batched, and still in request order


def test_truncation_matches_the_reference_at_a_short_max_length(make_reranker, tiny_model):
    scored = make_reranker(tiny_model, max_length=12).score_pairs(QUERY, DOCS)
    assert abs(scored.scores - tiny_model.reference_scores(QUERY, DOCS, max_length=12)).max() < SCORE_TOLERANCE
    assert scored.truncated.any() and scored.lengths.max() == 12


def test_two_label_model_scores_positive_class_probability(make_reranker, tiny_model_2labels):
    scored = make_reranker(tiny_model_2labels).score_pairs(QUERY, DOCS)
    assert abs(scored.scores - tiny_model_2labels.reference_scores(QUERY, DOCS)).max() < SCORE_TOLERANCE


def test_model_without_token_type_ids(make_reranker, tiny_model_no_types):
    reranker = make_reranker(tiny_model_no_types, buckets=(ShapeBucket(2, 128),))
    assert reranker.head.contract.input_names == ("input_ids", "attention_mask")
    scored = reranker.score_pairs(QUERY, DOCS)
    assert abs(scored.scores - tiny_model_no_types.reference_scores(QUERY, DOCS)).max() < SCORE_TOLERANCE


def test_compile_cache_is_reported(make_reranker, tiny_model, tmp_path):
    """Two static buckets compile into one keyed directory, one blob each, and both load from it the second time."""
    buckets = (ShapeBucket(2, 64), ShapeBucket(4, 32))

    def compile_once():
        cache = open_compile_cache(str(tmp_path), tiny_model.path / "openvino_model.xml")
        return make_reranker(tiny_model, buckets, core=ov.Core(), cache=cache).engine.info()

    first, second = compile_once(), compile_once()
    assert first.loaded_from_cache == (False, False) and second.loaded_from_cache == (True, True)
    keyed = tmp_path / first.cache_dir
    assert first.cache_dir == second.cache_dir and keyed.parent == tmp_path
    assert len(list(keyed.glob("*.blob"))) == 2 and (keyed / CONFIGURATION_FILE).is_file()


def test_a_cache_dir_set_on_the_core_is_never_used(make_reranker, tiny_model, tmp_path):
    """Without a compile cache the engine compiles with CACHE_DIR "": a Core-wide CACHE_DIR (as this service set
    before issue 17) can neither hand it a blob nor receive one."""
    def compile_once():
        core = ov.Core()
        core.set_property({"CACHE_DIR": str(tmp_path)})
        return make_reranker(tiny_model, core=core).engine.info()

    assert [compile_once().loaded_from_cache for _ in range(2)] == [(False,), (False,)]
    assert compile_once().cache_dir is None and list(tmp_path.iterdir()) == []


def test_model_contract_is_checked(tiny_model):
    import openvino.opset13 as ops

    p = ops.parameter([-1, -1], ov.Type.i64, name="input_ids")
    bad = ov.Model([ops.convert(p, ov.Type.f32)], [p])
    with pytest.raises(StartupError) as info:
        CrossEncoderHead.check_contract(bad)
    assert info.value.exit_code == EXIT_MODEL and "attention_mask" in str(info.value)


@pytest.mark.parametrize("broken, needle", [
    ("no_dir", "does not exist"), ("no_tokenizer", "no tokenizer.json"), ("bad_config", "not valid JSON"),
])
def test_model_dir_problems_are_one_line(tiny_model, tmp_path, broken, needle):
    import shutil

    target = tmp_path / "m"
    if broken != "no_dir":
        shutil.copytree(tiny_model.path, target)
    if broken == "no_tokenizer":
        (target / "tokenizer.json").unlink()
    if broken == "bad_config":
        (target / "config.json").write_text("{not json")
    with pytest.raises(StartupError) as info:
        load_model_files(str(target), 0)
    assert needle in str(info.value) and info.value.exit_code == EXIT_MODEL


def test_max_length_comes_from_the_model_and_is_capped(tiny_model):
    assert load_model_files(str(tiny_model.path), 0).max_length == 128
    assert load_model_files(str(tiny_model.path), 64).max_length == 64
    with pytest.raises(StartupError):
        load_model_files(str(tiny_model.path), 256)


def test_npu_busy_counter_reads_the_sysfs_format(tmp_path):
    f = tmp_path / "npu_busy_time_us"
    f.write_text("123456\n")
    assert NpuBusyCounter(str(f)).read() == 123456
    f.write_text("garbage")
    assert NpuBusyCounter(str(f)).read() is None
    assert NpuBusyCounter(str(tmp_path / "missing")).read() is None
    assert NpuBusyCounter("").read() is None
