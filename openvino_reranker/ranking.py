"""Ranking quality as trec_eval computes it, on BEIR data: the metrics (nDCG@10, MRR@10, Recall@10/100), rank agreement
between two scorings, a BEIR dataset and a TREC first-stage run read and checked, and the report of a first stage
against a reranked order. Pure functions and file reading only: `evaluate` scores the candidates through a running
service, `quantize` in its own process, and both report with these.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any

from .errors import EXIT_CONFIG, StartupError

EXIT_BAD_INPUT = EXIT_CONFIG  # a bad argument or dataset file (2, as the server's configuration errors)
CUTOFF_METRICS = (("ndcg@10", "nDCG@10"), ("mrr@10", "MRR@10"), ("recall@10", "Recall@10"),
                  ("recall@100", "Recall@100"))  # (JSON key, printed name)
AGREEMENT_DEPTH = 10  # top-k overlap


class EvalError(StartupError):
    """Stops the command: one line on stderr and its exit code, as a StartupError stops the server."""


# ---------------------------------------------------------------------------------------------- metrics


def trec_order(scores: Mapping[str, float]) -> list[str]:
    """Document ids best first as trec_eval ranks a run: score descending, equal scores by document id descending
    (trec_eval compares docnos with strcmp, byte by byte in UTF-8, which orders as Python compares str). A run's
    rank column plays no part, in trec_eval or here."""
    return sorted(scores, key=lambda doc: (scores[doc], doc), reverse=True)


def dcg(gains: Sequence[float]) -> float:
    """Discounted cumulative gain: the gain at rank r (from 1) divided by log2(r + 1)."""
    return sum(gain / math.log2(rank + 1) for rank, gain in enumerate(gains, 1))


def gain(grade: int) -> int:
    """A judged grade's gain in nDCG, as trec_eval's ndcg_cut: the grade itself, linear; negative grades gain 0."""
    return max(grade, 0)


def ndcg_at(ranking: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    """trec_eval's ndcg_cut_k: DCG of the first k documents over the DCG of the k best judged grades (0 when no
    document has a positive grade)."""
    ideal = dcg(sorted((gain(g) for g in judged.values()), reverse=True)[:k])
    return dcg([gain(judged.get(doc, 0)) for doc in ranking[:k]]) / ideal if ideal > 0 else 0.0


def mrr_at(ranking: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    """Reciprocal rank of the first relevant document (grade > 0) within the first k, else 0 (trec_eval's
    recip_rank cut at k)."""
    return next((1 / rank for rank, doc in enumerate(ranking[:k], 1) if judged.get(doc, 0) > 0), 0.0)


def recall_at(ranking: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    """trec_eval's recall_k: relevant documents (grade > 0) within the first k over all judged relevant documents,
    retrieved or not (0 when the query has none)."""
    relevant = {doc for doc, grade in judged.items() if grade > 0}
    return len(relevant.intersection(ranking[:k])) / len(relevant) if relevant else 0.0


METRICS: dict[str, Callable[[Sequence[str], Mapping[str, int]], float]] = {
    "ndcg@10": lambda ranking, judged: ndcg_at(ranking, judged, 10),
    "mrr@10": lambda ranking, judged: mrr_at(ranking, judged, 10),
    "recall@10": lambda ranking, judged: recall_at(ranking, judged, 10),
    "recall@100": lambda ranking, judged: recall_at(ranking, judged, 100),
}


def mean_metrics(rankings: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """Every metric, averaged over the queries of `rankings` (each of which has judgments in `qrels`)."""
    return {name: fmean(metric(rankings[q], qrels[q]) for q in rankings) if rankings else 0.0
            for name, metric in METRICS.items()}


def reranked_order(first_stage: Sequence[str], scores: Mapping[str, float]) -> list[str]:
    """The reranked ranking of one query: the candidates the service scored, by its scores in trec_eval's order,
    then every other document of the run (beyond --depth, an empty text, or a query whose requests failed) in
    first-stage order."""
    return trec_order(scores) + [doc for doc in first_stage if doc not in scores]


# ---------------------------------------------------------------------------------------------- rank agreement


def spearman(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Spearman's rank correlation of two orders of the same documents (each a trec_order, so without ties):
    1 - 6 * sum(d^2) / (n (n^2 - 1)). None for fewer than two documents."""
    n = len(a)
    if n < 2:
        return None
    position = {doc: i for i, doc in enumerate(b)}
    squares = sum((i - position[doc]) ** 2 for i, doc in enumerate(a))
    return 1 - 6 * squares / (n * (n * n - 1))


def top1_agreement(a: Sequence[str], b: Sequence[str]) -> float:
    """1.0 when both orders put the same document first, else 0.0."""
    return float(a[0] == b[0])


def overlap_at(a: Sequence[str], b: Sequence[str], k: int) -> float:
    """The share of the first k (or of all, when fewer) documents that both orders have there."""
    return len(set(a[:k]) & set(b[:k])) / min(k, len(a))


def summary(values: Sequence[float]) -> dict[str, float | None]:
    return {"mean": fmean(values) if values else None, "min": min(values) if values else None}


def agreement(a: Mapping[str, Mapping[str, float]], b: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """Per-query agreement of two services' orders of the same candidates, over the queries both scored whole:
    Spearman (queries with at least two candidates), top-1 agreement and top-10 overlap, each as mean and min."""
    both = [(trec_order(a[q]), trec_order(b[q])) for q in sorted(a.keys() & b.keys()) if a[q]]
    return {"queries": len(both),
            "spearman": summary([rho for x, y in both if (rho := spearman(x, y)) is not None]),
            "top1": summary([top1_agreement(x, y) for x, y in both]),
            "top10_overlap": summary([overlap_at(x, y, AGREEMENT_DEPTH) for x, y in both])}


# ---------------------------------------------------------------------------------------------- the dataset


@dataclass(frozen=True)
class EvalSet:
    """What is evaluated: the judged queries of the run, their candidates' texts and their judgments."""

    queries: dict[str, str]  # query id -> text, for every evaluated query (judged and in the run)
    first_stage: dict[str, list[str]]  # query id -> the run's documents in trec_order
    qrels: dict[str, dict[str, int]]  # query id -> judged document -> grade
    documents: dict[str, str]  # candidate id -> the text sent: title + " " + text, stripped (as BEIR joins them)
    depth: int
    run_queries_without_qrels: int  # left out: nothing to measure them against
    judged_queries_not_in_run: int  # left out: as trec_eval without -c, and as BEIR

    def candidates(self, query_id: str) -> list[str]:
        """The documents sent for this query: the first `depth` of the run."""
        return self.first_stage[query_id][:self.depth]


def bad_input(message: str) -> EvalError:
    return EvalError(message, EXIT_BAD_INPUT)


def read_lines(path: Path, what: str):
    """(line number, line) of a UTF-8 text file; EvalError (exit 2) naming it when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            yield from enumerate(f, 1)
    except FileNotFoundError:
        raise bad_input(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise bad_input(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise bad_input(f"{what} {path} is not UTF-8 text") from None


def parse_int(text: str) -> int | None:
    return int(text) if re.fullmatch(r"[+-]?[0-9]{1,18}", text) else None


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """BEIR's qrels/<split>.tsv: a header line (`query-id corpus-id score`), then `query-id corpus-id grade` per
    line, tab- or space-separated; the grade an integer. A first line whose third field is an integer is read as a
    judgment (no header). A pair judged twice is an error, as in trec_eval."""
    qrels: dict[str, dict[str, int]] = {}
    for number, line in read_lines(path, "qrels file"):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3:
            raise bad_input(f"{path} line {number}: expected 'query-id corpus-id score', got {len(fields)} fields")
        grade = parse_int(fields[2])
        if grade is None:
            if number == 1:
                continue  # the header
            raise bad_input(f"{path} line {number}: the score {fields[2][:40]!r} is not an integer")
        judged = qrels.setdefault(fields[0], {})
        if fields[1] in judged:
            raise bad_input(f"{path} line {number}: query {fields[0]!r} judges {fields[1]!r} twice")
        judged[fields[1]] = grade
    return qrels


def read_run(path: Path) -> dict[str, dict[str, float]]:
    """A TREC run: `qid Q0 docid rank score tag` per line, whitespace-separated; the score a finite number. The rank
    column is not used (trec_eval orders by score, see trec_order). A document listed twice for a query is an
    error, as in trec_eval."""
    run: dict[str, dict[str, float]] = {}
    for number, line in read_lines(path, "run file"):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 6:
            raise bad_input(f"{path} line {number}: expected 'qid Q0 docid rank score tag', got {len(fields)} fields")
        qid, _, docid, _, score_text, _ = fields
        try:
            score = float(score_text)
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise bad_input(f"{path} line {number}: the score {score_text[:40]!r} is not a finite number")
        scores = run.setdefault(qid, {})
        if docid in scores:
            raise bad_input(f"{path} line {number}: query {qid!r} lists {docid!r} twice")
        scores[docid] = score
    return run


def read_jsonl(path: Path, what: str, wanted: set[str], text_of: Callable[[dict], str]) -> dict[str, str]:
    """id -> text_of(record) for the records of a JSON-lines file whose `_id` (a string or an integer) is wanted;
    the others are parsed and dropped, so a large corpus costs no memory."""
    found: dict[str, str] = {}
    for number, line in read_lines(path, what):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise bad_input(f"{path} line {number}: not JSON") from None
        doc_id = record.get("_id") if isinstance(record, dict) else None
        if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
            raise bad_input(f"{path} line {number}: not an object with a string \"_id\"")
        if str(doc_id) in wanted:
            try:
                found[str(doc_id)] = text_of(record)
            except ValueError as exc:
                raise bad_input(f"{path} line {number}: {exc}") from None
    return found


def field_text(record: dict, name: str) -> str:
    """A record's string field; a missing or null field is ''."""
    value = record.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f'"{name}" is not a string')
    return value


def document_text(record: dict) -> str:
    """The text a candidate is scored by: title, a space, text, stripped (BEIR's reranking joins them so)."""
    return (field_text(record, "title") + " " + field_text(record, "text")).strip()


def missing(what: str, ids: set[str], path: Path) -> EvalError:
    first = sorted(ids)[0]
    return bad_input(f"{len(ids)} {what} not in {path} (first: {first[:80]!r})")


def load_evalset(dataset: Path, run_path: Path, split: str, depth: int) -> EvalSet:
    """The evaluated queries are those both judged (at least one line in the qrels) and in the run. Every one must
    have a text in queries.jsonl, and every candidate (the first `depth` of its run) a record in corpus.jsonl."""
    if not dataset.is_dir():
        raise bad_input(f"--dataset {dataset} is not a directory")
    qrels = read_qrels(dataset / "qrels" / f"{split}.tsv")
    run = read_run(run_path)
    evaluated = sorted(run.keys() & qrels.keys())
    if not evaluated:
        raise bad_input(f"no query of the run {run_path} is judged in {dataset / 'qrels' / f'{split}.tsv'} "
                        f"({len(run)} run queries, {len(qrels)} judged)")
    first_stage = {q: trec_order(run[q]) for q in evaluated}
    queries_path = dataset / "queries.jsonl"
    queries = read_jsonl(queries_path, "queries file", set(evaluated), lambda r: field_text(r, "text").strip())
    if len(queries) < len(evaluated):
        raise missing("judged run queries are", set(evaluated) - queries.keys(), queries_path)
    empty = sorted(q for q, text in queries.items() if not text)
    if empty:
        raise bad_input(f"{queries_path}: {len(empty)} evaluated queries have an empty text (first: {empty[0]!r})")
    wanted = {doc for q in evaluated for doc in first_stage[q][:depth]}
    corpus_path = dataset / "corpus.jsonl"
    documents = read_jsonl(corpus_path, "corpus file", wanted, document_text)
    if len(documents) < len(wanted):
        raise missing("candidate documents of the run are", wanted - documents.keys(), corpus_path)
    return EvalSet(queries, first_stage, {q: qrels[q] for q in evaluated}, documents, depth,
                   len(run.keys() - qrels.keys()), len(qrels.keys() - run.keys()))


@dataclass
class ServiceRun:
    """What one service made of the candidates."""

    url: str
    described: str  # "model X on DEVICE", from /readyz, or ""
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # only queries whose every request succeeded
    failed_queries: set[str] = field(default_factory=set)  # a request failed twice: first-stage order kept
    pairs: int = 0  # pairs scored (documents in successful requests)
    errors: int = 0  # failed requests, each attempt counted (a request that failed, then passed, counts 1)
    seconds: float = 0.0
    last_error: str = ""

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------- the report


def build_report(evalset: EvalSet, run: ServiceRun, compared: ServiceRun | None = None) -> dict[str, Any]:
    """The --json object: the metrics of the first stage and of the reranked order, the counts, and with --compare
    the second service's metrics, their deltas and the rank agreement."""

    def reranked(service_run: ServiceRun) -> dict[str, float]:
        rankings = {q: reranked_order(evalset.first_stage[q], service_run.scores.get(q, {})) for q in evalset.queries}
        return mean_metrics(rankings, evalset.qrels)

    first = mean_metrics(evalset.first_stage, evalset.qrels)
    ours = reranked(run)
    report: dict[str, Any] = {
        "metrics": {name: {"first_stage": first[name], "reranked": ours[name]} for name in METRICS},
        "queries": len(evalset.queries), "pairs": run.pairs, "pairs_per_s": round(run.pairs_per_s, 2),
        "errors": run.errors,
    }
    if compared is not None:
        theirs = reranked(compared)
        report["compare"] = {
            "url": compared.url,
            "metrics": {name: {"reranked": theirs[name], "delta": theirs[name] - ours[name]} for name in METRICS},
            "pairs": compared.pairs, "pairs_per_s": round(compared.pairs_per_s, 2), "errors": compared.errors,
            "agreement": agreement(run.scores, compared.scores),
        }
    return report
