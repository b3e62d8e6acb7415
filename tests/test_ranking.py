"""The metrics of `openvino-reranker eval` and `quantize` (openvino_reranker/ranking.py): hand-computed cases, then
agreement with trec_eval itself (pytrec_eval, from the test extras) on random datasets full of ties, per query and
averaged, for the first stage and for the reranked order (scored candidates first, the rest of the run after them)."""

from __future__ import annotations

import math
import random

import pytest
from evaldata import write_dataset

from openvino_reranker.ranking import (
    METRICS,
    ServiceRun,
    agreement,
    build_report,
    load_evalset,
    mean_metrics,
    mrr_at,
    ndcg_at,
    overlap_at,
    recall_at,
    reranked_order,
    spearman,
    top1_agreement,
    trec_order,
)

# ---------------------------------------------------------------------------------------------- by hand

JUDGED = {"d1": 0, "d2": 2, "d3": 1, "d4": 3}  # d4 is relevant but not retrieved


def test_ndcg_by_hand():
    # DCG of [d1, d2, d3] = 0/log2(2) + 2/log2(3) + 1/log2(4) = 1.2618595 + 0.5
    # ideal: grades 3, 2, 1, 0 -> 3/log2(2) + 2/log2(3) + 1/log2(4) = 3 + 1.2618595 + 0.5
    two_over_log2_3 = 1.2618595071429148
    expected = (two_over_log2_3 + 0.5) / (3 + two_over_log2_3 + 0.5)
    assert ndcg_at(["d1", "d2", "d3"], JUDGED, 10) == pytest.approx(expected, abs=1e-15)
    assert ndcg_at(["d1", "d2", "d3"], JUDGED, 10) == pytest.approx(0.3699940, abs=1e-7)
    # cut at 1: DCG 0 (d1 has grade 0)
    assert ndcg_at(["d1", "d2", "d3"], JUDGED, 1) == 0.0
    # cut at 2: DCG 2/log2(3) over the ideal's first two, 3 + 2/log2(3)
    assert ndcg_at(["d1", "d2"], JUDGED, 2) == pytest.approx(two_over_log2_3 / (3 + two_over_log2_3), abs=1e-15)
    # the ideal order scores 1; unjudged documents gain nothing
    assert ndcg_at(["d4", "d2", "d3", "x"], JUDGED, 10) == pytest.approx(1.0, abs=1e-15)
    assert ndcg_at(["x", "y"], JUDGED, 10) == 0.0


def test_ndcg_gain_is_linear_and_negative_grades_gain_nothing():
    # gain = grade (not 2**grade - 1): grade 3 at rank 1 and grade 1 at rank 2 against the ideal 3, 1
    assert ndcg_at(["a", "b"], {"a": 3, "b": 1}, 10) == 1.0
    # [b, a]: (1 + 3/log2(3)) / (3 + 1/log2(3)) = 0.8175...
    assert ndcg_at(["b", "a"], {"a": 3, "b": 1}, 10) == pytest.approx((1 + 3 / math.log2(3)) / (3 + 1 / math.log2(3)))
    # a grade of -1 counts as 0, in the ranking and in the ideal
    assert ndcg_at(["z", "y"], {"y": 2, "z": -1}, 10) == pytest.approx(1 / math.log2(3))
    assert ndcg_at(["z"], {"z": -1, "w": 0}, 10) == 0.0  # no positive grade: 0, not a division by zero


def test_mrr_by_hand():
    assert mrr_at(["d1", "d2", "d3"], JUDGED, 10) == 0.5  # d1 has grade 0: not relevant
    assert mrr_at(["d3", "d2"], JUDGED, 10) == 1.0  # any grade above 0 is relevant
    ranking = [f"x{i}" for i in range(9)] + ["d2"]
    assert mrr_at(ranking, JUDGED, 10) == pytest.approx(0.1)  # rank 10 counts
    assert mrr_at(["x"] + ranking, JUDGED, 10) == 0.0  # rank 11 does not
    assert mrr_at([], JUDGED, 10) == 0.0


def test_recall_by_hand():
    # relevant: d2, d3, d4 (grade > 0); retrieved within 10: d2, d3
    assert recall_at(["d1", "d2", "d3"], JUDGED, 10) == pytest.approx(2 / 3)
    assert recall_at(["d1", "d2", "d3"], JUDGED, 2) == pytest.approx(1 / 3)
    assert recall_at(["d4", "d3", "d2"], JUDGED, 100) == 1.0
    assert recall_at(["d1"], {"d1": 0}, 10) == 0.0  # no relevant document: 0


def test_mean_is_over_the_queries_given():
    rankings = {"q1": ["a"], "q2": ["b"]}
    qrels = {"q1": {"a": 1}, "q2": {"a": 1}}
    means = mean_metrics(rankings, qrels)
    assert means == {"ndcg@10": 0.5, "mrr@10": 0.5, "recall@10": 0.5, "recall@100": 0.5}


def test_ties_go_by_document_id_descending_as_in_trec_eval():
    scores = {"doc10": 1.0, "doc9": 1.0, "doc2": 1.0, "a": 2.0, "b": 0.5, "é": 1.0, "Z": 1.0}
    # 2.0 first; then the 1.0 tie by id descending as strcmp orders bytes ("é" is 0xC3 0xA9, above ASCII;
    # "Z" is below every lower-case letter); then 0.5
    assert trec_order(scores) == ["a", "é", "doc9", "doc2", "doc10", "Z", "b"]


def test_reranked_order_puts_the_scored_candidates_first():
    first_stage = ["a", "b", "c", "d", "e"]
    # b and d were scored; a (say, an empty text), c and e (beyond --depth) keep their first-stage order
    assert reranked_order(first_stage, {"d": 0.9, "b": 0.1}) == ["d", "b", "a", "c", "e"]
    assert reranked_order(first_stage, {}) == first_stage  # a query whose requests failed
    assert reranked_order(first_stage, {"b": 0.5, "a": 0.5}) == ["b", "a", "c", "d", "e"]  # tie: id descending


def test_agreement_by_hand():
    assert spearman(["x", "y", "z", "w"], ["y", "x", "z", "w"]) == pytest.approx(1 - 6 * 2 / (4 * 15))  # 0.8
    assert spearman(["x", "y", "z"], ["z", "y", "x"]) == -1.0
    assert spearman(["x", "y"], ["x", "y"]) == 1.0
    assert spearman(["x"], ["x"]) is None
    assert top1_agreement(["x", "y"], ["y", "x"]) == 0.0
    assert overlap_at([str(i) for i in range(20)], [str(i) for i in range(5, 25)], 10) == 0.5
    assert overlap_at(["a", "b", "c"], ["c", "a", "b"], 10) == 1.0  # fewer than 10: all of them


def test_agreement_over_queries_both_scored():
    a = {"q1": {"x": 0.9, "y": 0.5, "z": 0.1}, "q2": {"x": 0.2, "y": 0.8}, "q3": {"only": 1.0}}
    b = {"q1": {"x": 0.9, "y": 0.5, "z": 0.1}, "q2": {"x": 0.7, "y": 0.3}}  # q3 failed on b
    result = agreement(a, b)
    assert result["queries"] == 2
    assert result["spearman"] == {"mean": 0.0, "min": -1.0}
    assert result["top1"] == {"mean": 0.5, "min": 0.0}
    assert result["top10_overlap"] == {"mean": 1.0, "min": 1.0}
    assert agreement({}, {}) == {"queries": 0, "spearman": {"mean": None, "min": None},
                                 "top1": {"mean": None, "min": None}, "top10_overlap": {"mean": None, "min": None}}


# ---------------------------------------------------------------------------------------------- against trec_eval

# pytrec_eval's names for the same measures: recip_rank is not cut, so MRR@10 is it where the first relevant
# document is within the first 10 (recip_rank >= 1/10), else 0.
PYTREC_MEASURES = {"ndcg_cut.10", "recall.10,100", "recip_rank"}


def pytrec_values(values: dict) -> dict[str, float]:
    rr = values["recip_rank"]
    return {"ndcg@10": values["ndcg_cut_10"], "mrr@10": rr if rr >= 0.1 - 1e-12 else 0.0,
            "recall@10": values["recall_10"], "recall@100": values["recall_100"]}


def random_case(rng: random.Random):
    """Queries with qrels (grades -1..3, some queries with no positive grade), runs with scores on a coarse grid
    (many ties), document ids that sort differently as numbers, as text, and in case; some run queries unjudged and
    some judged queries absent from the run."""
    ids = [f"d{i}" for i in range(60)] + [f"D{i}" for i in range(10)] + ["é1", "ß", "doc-1", "doc_1", "x.y"]
    qrels, run = {}, {}
    for q in range(25):
        qid = f"q{q}"
        if q % 7 != 3:  # judged
            qrels[qid] = {d: rng.choice([-1, 0, 0, 1, 1, 2, 3]) for d in rng.sample(ids, rng.randint(1, 15))}
        if q % 11 != 5:  # in the run
            run[qid] = {d: rng.randrange(8) / 8 for d in rng.sample(ids, rng.randint(1, 70))}
    return qrels, run


@pytest.mark.parametrize("seed", range(20))
def test_metrics_equal_trec_eval_per_query(seed):
    pytrec_eval = pytest.importorskip("pytrec_eval", reason="the reference implementation is in the test extras")
    qrels, run = random_case(random.Random(seed))
    reference = pytrec_eval.RelevanceEvaluator(qrels, PYTREC_MEASURES).evaluate(run)
    evaluated = run.keys() & qrels.keys()
    assert set(reference) == evaluated  # trec_eval evaluates the judged queries of the run, as eval does
    for qid in evaluated:
        ours = {name: metric(trec_order(run[qid]), qrels[qid]) for name, metric in METRICS.items()}
        assert ours == pytest.approx(pytrec_values(reference[qid]), abs=1e-12), qid
    means = mean_metrics({q: trec_order(run[q]) for q in evaluated}, {q: qrels[q] for q in evaluated})
    expected = {name: sum(pytrec_values(reference[q])[name] for q in evaluated) / len(evaluated) for name in METRICS}
    assert means == pytest.approx(expected, abs=1e-12)


def pytrec_mean(pytrec_eval, qrels, run) -> dict[str, float]:
    per_query = pytrec_eval.RelevanceEvaluator(qrels, PYTREC_MEASURES).evaluate(run)
    values = [pytrec_values(v) for v in per_query.values()]
    return {name: sum(v[name] for v in values) / len(values) for name in METRICS}


@pytest.mark.parametrize("seed", range(6))
def test_report_equals_trec_eval_on_written_files(tmp_path, seed):
    """The whole path from files to the report: the dataset and run written, read back, a service's scores for
    some queries' candidates (others failed), and the report's two columns against trec_eval on the equivalent
    runs: reranked = the scored candidates' scores plus 10, every other document its first-stage score minus 10
    (scores on a grid of 1/16, so the shifts are exact and keep every tie)."""
    pytrec_eval = pytest.importorskip("pytrec_eval", reason="the reference implementation is in the test extras")
    rng = random.Random(seed)
    depth = rng.choice([3, 10, 25])
    made = write_dataset(tmp_path, queries=12, documents=80, run_depth=40, seed=seed)
    evalset = load_evalset(made.dataset, made.run, "test", depth)
    judged_run = {q: s for q, s in made.run_scores.items() if q in made.qrels}
    assert set(evalset.queries) == set(judged_run)

    service = ServiceRun("http://stand-in", "")
    failed = set(rng.sample(sorted(evalset.queries), 2))
    for qid in evalset.queries:
        if qid not in failed:  # the empty document is never sent, so never scored
            service.scores[qid] = {d: rng.randrange(16) / 16 for d in evalset.candidates(qid)
                                   if evalset.documents[d]}
    report = build_report(evalset, service)

    first = pytrec_mean(pytrec_eval, made.qrels, judged_run)
    reranked_run = {}
    for qid, scores in judged_run.items():
        served = service.scores.get(qid, {})
        reranked_run[qid] = {d: (served[d] + 10 if d in served else s - 10) for d, s in scores.items()}
    reranked = pytrec_mean(pytrec_eval, made.qrels, reranked_run)
    for name in METRICS:
        assert report["metrics"][name]["first_stage"] == pytest.approx(first[name], abs=1e-12), name
        assert report["metrics"][name]["reranked"] == pytest.approx(reranked[name], abs=1e-12), name
    # the candidates are the run's first `depth` in trec_eval's order (score descending, id descending)
    for qid, scores in judged_run.items():
        top = sorted(scores, key=lambda d: (scores[d], d), reverse=True)[:depth]
        assert evalset.candidates(qid) == top
