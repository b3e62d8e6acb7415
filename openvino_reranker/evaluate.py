"""`openvino-reranker eval`: the ranking quality of a running service on the user's own data.

A BEIR dataset (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) and a TREC run from the user's first stage: the top
--depth candidates of every judged query of the run are posted to the service's native /rerank, and nDCG@10, MRR@10,
Recall@10 and Recall@100 of the first stage and of the reranked order are computed as trec_eval computes them.
--compare scores the same candidates on a second service and adds per-query rank agreement. docs/rag.md,
"openvino-reranker eval", is the contract. Standard library only: http.client with one keep-alive connection per
worker thread.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any, TextIO
from urllib.parse import urlsplit

from . import __version__
from .config import ENV_PREFIX, EVAL_COMMAND, OneLineArgumentParser, client_api_key, int_argument
from .errors import EXIT_CONFIG, StartupError

EXIT_INCOMPLETE = 1  # the run finished, but some queries' requests failed twice: they kept their first-stage order
EXIT_BAD_INPUT = EXIT_CONFIG  # a bad argument or dataset file (2, as the server's configuration errors)
EXIT_UNREACHABLE = 3  # the service cannot be reached, is not ready, or failed every request: no metrics

CUTOFF_METRICS = (("ndcg@10", "nDCG@10"), ("mrr@10", "MRR@10"), ("recall@10", "Recall@10"),
                  ("recall@100", "Recall@100"))  # (JSON key, printed name)
AGREEMENT_DEPTH = 10  # top-k overlap
MAX_DOCUMENTS_PER_REQUEST = 100  # a query's candidates beyond this go in further requests (scores are per pair)
MAX_BODY_BYTES = 1 << 20  # likewise for the body: half the service's default max_body_bytes
RETRY_DELAY_S = 1.0  # before the one retry of a failed request (an overloaded service answers Retry-After: 1)
PROGRESS_INTERVAL_S = {True: 0.5, False: 10.0}  # how often the progress line is written: a terminal, a log


class EvalError(StartupError):
    """Stops the command: one line on stderr and its exit code, as a StartupError stops the server."""


class RequestFailed(Exception):
    """One POST /rerank did not give a score for every document sent; the message says why."""


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


@dataclass(frozen=True)
class Request:
    """One POST /rerank: a query and some of its candidates."""

    query_id: str
    doc_ids: tuple[str, ...]


def plan_requests(evalset: EvalSet) -> list[Request]:
    """Each query's candidates with a non-empty text (the service refuses empty ones; the others keep their
    first-stage place, see reranked_order), in as few requests as MAX_DOCUMENTS_PER_REQUEST and MAX_BODY_BYTES
    allow. A cross-encoder scores each pair alone, so splitting a query changes no score."""
    requests = []
    for query_id in evalset.queries:
        budget = MAX_BODY_BYTES - len(json_bytes(evalset.queries[query_id])) - 100
        batch: list[str] = []
        size = 0
        for doc in evalset.candidates(query_id):
            text = evalset.documents[doc]
            if not text:
                continue
            cost = len(json_bytes(text)) + 2
            if batch and (len(batch) == MAX_DOCUMENTS_PER_REQUEST or size + cost > budget):
                requests.append(Request(query_id, tuple(batch)))
                batch, size = [], 0
            batch.append(doc)
            size += cost
        if batch:
            requests.append(Request(query_id, tuple(batch)))
    return requests


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


# ---------------------------------------------------------------------------------------------- the service


@dataclass(frozen=True)
class Service:
    """Where a service's routes are, from --url or --compare."""

    url: str
    https: bool
    host: str
    port: int
    rerank_path: str
    readyz_path: str


def parse_service_url(url: str) -> Service:
    """The service's base URL or its /rerank route, read as client.py reads RAG_RERANK_URL: trailing slashes are
    dropped, a path ending in /rerank is the route, any other path (a reverse proxy's prefix) gets /rerank
    appended; /readyz is beside it. ValueError saying what is wrong."""
    if not url or not url.isascii() or any(ch.isspace() or not ch.isprintable() for ch in url):
        raise ValueError(f"{url!r} must not be empty or contain spaces, control or non-ASCII characters")
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r} has a bad port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        raise ValueError(f"{url!r} is not http://HOST:PORT or https://HOST:PORT")
    if "?" in url or "#" in url or "@" in parts.netloc:
        raise ValueError(f"{url!r} must not carry a query string, a fragment or credentials")
    base = parts.path.rstrip("/")
    if re.search(r"/v[12]/rerank$", base):
        raise ValueError(f"{url!r} names a Cohere-compatible route; eval speaks the native /rerank")
    base = base.removesuffix("/rerank")
    https = parts.scheme == "https"
    return Service(url, https, parts.hostname, port or (443 if https else 80), base + "/rerank", base + "/readyz")


def rerank_body(query: str, texts: Sequence[str]) -> bytes:
    """The native /rerank request: the query and the documents as strings; every result comes back."""
    return json_bytes({"query": query, "documents": list(texts)})


def scores_from_answer(data: bytes, count: int) -> list[float]:
    """The score of each document sent, in the order sent, from a /rerank answer; RequestFailed unless it holds
    exactly one finite score for each."""
    try:
        results = json.loads(data).get("results")
    except (ValueError, AttributeError):
        raise RequestFailed("the answer is not a JSON object") from None
    if not isinstance(results, list) or len(results) != count:
        raise RequestFailed(f"the answer has {len(results) if isinstance(results, list) else 'no'} results for "
                            f"{count} documents")
    scores: list[float | None] = [None] * count
    for result in results:
        index = result.get("index") if isinstance(result, dict) else None
        score = result.get("score") if isinstance(result, dict) else None
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count or scores[index] is not None:
            raise RequestFailed(f"the answer has an index that matches no document sent: {index!r}")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise RequestFailed(f"the answer has a score that is not a finite number: {score!r}")
        scores[index] = float(score)
    return scores  # type: ignore[return-value]


def exc_reason(exc: BaseException) -> str:
    """One line for an exchange that failed: "ConnectionRefusedError: Connection refused"."""
    detail = getattr(exc, "strerror", None) or str(exc) or "no detail"
    return f"{type(exc).__name__}: {detail}"


def failure_reason(status: int, data: bytes) -> str:
    """One line for a refused request: the status and the service's own message (or the body's start)."""
    try:
        body = json.loads(data)
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
    except ValueError:
        message = None
    text = message if isinstance(message, str) else data[:200].decode("utf-8", "replace")
    hint = f" (is {ENV_PREFIX}API_KEY set to the service's key?)" if status == 401 else ""
    return f"HTTP {status}: {' '.join(text.split())}{hint}"


class ServiceClient:
    """One service's /readyz and /rerank over HTTP/1.1 keep-alive connections, one per calling thread; a
    connection that failed is closed and the next call opens a new one."""

    def __init__(self, service: Service, api_key: str, timeout_s: float):
        self.service, self.api_key, self.timeout_s = service, api_key, timeout_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[http.client.HTTPConnection] = []

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            kind = http.client.HTTPSConnection if self.service.https else http.client.HTTPConnection
            conn = kind(self.service.host, self.service.port, timeout=self.timeout_s)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def exchange(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """(status, body); OSError or http.client.HTTPException when the exchange itself failed."""
        headers = {"Accept": "application/json", "User-Agent": f"openvino-reranker-eval/{__version__}"}
        if body is not None:
            # no-cache: every pair is scored by the model, so that pairs/s measures it and not the score cache
            headers.update({"Content-Type": "application/json", "Cache-Control": "no-cache"})
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        conn = self._connection()
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        except BaseException:
            conn.close()
            self._local.conn = None
            raise

    def score(self, query: str, texts: Sequence[str]) -> list[float]:
        """The service's score of each text, in the order given; RequestFailed saying why not."""
        try:
            status, data = self.exchange("POST", self.service.rerank_path, rerank_body(query, texts))
        except TimeoutError:
            raise RequestFailed(f"no answer within {self.timeout_s:g} s") from None
        except (OSError, http.client.HTTPException) as exc:
            raise RequestFailed(exc_reason(exc)) from None
        if status != 200:
            raise RequestFailed(failure_reason(status, data))
        return scores_from_answer(data, len(texts))

    def readiness(self) -> dict:
        """GET /readyz: its JSON (model, device) when the service is ready; {} when the route gives no answer this
        command can use (a proxy that does not route it). EvalError (exit 3) when the service cannot be reached or
        says it is not ready."""
        try:
            status, data = self.exchange("GET", self.service.readyz_path)
        except (OSError, http.client.HTTPException) as exc:
            raise EvalError(f"cannot reach {self.service.url}: {exc_reason(exc)}", EXIT_UNREACHABLE) from None
        try:
            body = json.loads(data)
        except ValueError:
            body = None
        body = body if isinstance(body, dict) else {}
        if status == 503:
            raise EvalError(f"{self.service.url} is not ready: {body.get('reason', 'HTTP 503')}", EXIT_UNREACHABLE)
        return body if status == 200 else {}

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()


# ---------------------------------------------------------------------------------------------- scoring


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


class Progress:
    """The progress line on stderr: rewritten in place (\\r) on a terminal at most every 0.5 s; elsewhere (a log)
    a plain line at most every 10 s, and a last one when done."""

    def __init__(self, stream: TextIO, label: str, total: int, clock: Callable[[], float] = time.monotonic):
        self.stream, self.label, self.total, self.clock = stream, label, total, clock
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.started = self.last = clock()
        self.width = 0

    def line(self, done: int, pairs: int, errors: int) -> str:
        elapsed = self.clock() - self.started
        rate = pairs / elapsed if elapsed > 0 else 0.0
        return (f"eval {self.label}: {done}/{self.total} queries, {pairs} pairs, {rate:.1f} pairs/s, "
                f"{errors} errors")

    def update(self, done: int, pairs: int, errors: int, final: bool = False) -> None:
        now = self.clock()
        if not final and now - self.last < PROGRESS_INTERVAL_S[self.tty]:
            return
        self.last = now
        text = self.line(done, pairs, errors)
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width) + ("\n" if final else ""))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def score_candidates(client: ServiceClient, evalset: EvalSet, requests: Sequence[Request], concurrency: int,
                     progress: Progress) -> ServiceRun:
    """Every request on a pool of `concurrency` threads; a failed request is retried once after RETRY_DELAY_S. A
    query keeps the service's scores only if all its requests succeeded."""
    run = ServiceRun(client.service.url, "")
    left = {}  # query id -> requests not yet answered
    for request in requests:
        left[request.query_id] = left.get(request.query_id, 0) + 1
    done = 0

    def attempt(request: Request) -> tuple[list[float] | None, int, str]:
        query, texts = evalset.queries[request.query_id], [evalset.documents[d] for d in request.doc_ids]
        failures, reason = 0, ""
        for tries in range(2):
            if tries:
                time.sleep(RETRY_DELAY_S)
            try:
                return client.score(query, texts), failures, reason
            except RequestFailed as exc:
                failures, reason = failures + 1, str(exc)
        return None, failures, reason

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency, thread_name_prefix="eval") as pool:
        futures = {pool.submit(attempt, request): request for request in requests}
        try:
            for future in as_completed(futures):
                request = futures[future]
                scores, failures, reason = future.result()
                run.errors += failures
                run.last_error = reason or run.last_error
                if scores is None:
                    run.failed_queries.add(request.query_id)
                else:
                    run.pairs += len(scores)
                    run.scores.setdefault(request.query_id, {}).update(zip(request.doc_ids, scores, strict=True))
                left[request.query_id] -= 1
                done += not left[request.query_id]
                progress.update(done, run.pairs, run.errors)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    run.seconds = time.monotonic() - started
    for query_id in run.failed_queries:
        run.scores.pop(query_id, None)
    progress.update(done, run.pairs, run.errors, final=True)
    return run


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


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def signed(value: float) -> str:
    """A difference to 4 places with its sign: -0.0000 is a real difference under 0.00005 (the JSON has it whole)."""
    return f"{value:+.4f}"


def count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def format_table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns two spaces apart, the first left-aligned and the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(widths[i]) if i else cell.ljust(widths[i]) for i, cell in enumerate(row))
            for row in rows]


def render_text(report: dict[str, Any], evalset: EvalSet, runs: Sequence[ServiceRun]) -> str:
    """The report as a reader wants it: what was evaluated, each service's pairs, speed and errors, the metric
    table and, with --compare, the agreement."""
    lines = [f"{count(report['queries'], 'judged query', 'judged queries')} of the run, the first {evalset.depth} "
             f"candidates of each reranked (left out: "
             f"{count(evalset.run_queries_without_qrels, 'run query', 'run queries')} without qrels, "
             f"{count(evalset.judged_queries_not_in_run, 'judged query', 'judged queries')} not in the run)"]
    for service_run in runs:
        described = f" ({service_run.described})" if service_run.described else ""
        lines.append(f"{service_run.url}{described}: {service_run.pairs} pairs in {service_run.seconds:.1f} s, "
                     f"{service_run.pairs_per_s:.1f} pairs/s, {service_run.errors} errors"
                     + (f", {count(len(service_run.failed_queries), 'query', 'queries')} kept the first-stage order"
                        if service_run.failed_queries else ""))
    compare = report.get("compare")
    header = ["metric", "first stage", "reranked", "change"]
    if compare:
        header += ["compared", "compared - reranked"]
    rows = [header]
    for key, name in CUTOFF_METRICS:
        values = report["metrics"][key]
        row = [name, number(values["first_stage"]), number(values["reranked"]),
               signed(values["reranked"] - values["first_stage"])]
        if compare:
            row += [number(compare["metrics"][key]["reranked"]), signed(compare["metrics"][key]["delta"])]
        rows.append(row)
    lines += ["", *format_table(rows)]
    if compare:
        a = compare["agreement"]
        lines += ["", f"rank agreement of {compare['url']} with {runs[0].url} over {a['queries']} queries "
                      f"(mean / min): Spearman {number(a['spearman']['mean'])} / {number(a['spearman']['min'])}, "
                      f"top-1 {number(a['top1']['mean'])} / {number(a['top1']['min'])}, "
                      f"top-10 overlap {number(a['top10_overlap']['mean'])} / {number(a['top10_overlap']['min'])}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- the command


def _service(text: str) -> Service:
    try:
        return parse_service_url(text.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _split(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", text) or text.startswith("."):
        raise argparse.ArgumentTypeError(f"{text!r} is not a split name such as test or dev")
    return text


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = OneLineArgumentParser(
        prog=f"{os.path.basename(sys.argv[0]) or 'openvino-reranker'} {EVAL_COMMAND}",
        description="Measure a running service's ranking on your data: a BEIR dataset and a TREC run from your first "
                    "stage; the top --depth candidates of each judged query are reranked by the service. Sends "
                    f"{ENV_PREFIX}API_KEY (or the first line of {ENV_PREFIX}API_KEY_FILE) as a Bearer key when set. "
                    "Exit 0; 1 when some queries' requests failed twice; 2 for bad arguments or files; 3 when the "
                    "service cannot be reached or failed every request.")
    parser.add_argument("--url", required=True, type=_service, help="the service: http://HOST:PORT (or its /rerank)")
    parser.add_argument("--dataset", required=True, type=Path, metavar="DIR",
                        help="BEIR directory: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv")
    parser.add_argument("--run", required=True, type=Path, help="TREC run file: qid Q0 docid rank score tag")
    parser.add_argument("--split", default="test", type=_split, metavar="SPLIT",
                        help="the qrels file qrels/SPLIT.tsv (default test)")
    parser.add_argument("--depth", default=100, type=int_argument(1, 1000), metavar="N",
                        help="candidates per query sent to the service (default 100)")
    parser.add_argument("--concurrency", default=4, type=int_argument(1, 64), metavar="N",
                        help="requests in flight (default 4)")
    parser.add_argument("--timeout-s", default=120, type=int_argument(1, 3600), metavar="S",
                        help="seconds to wait for one answer (default 120)")
    parser.add_argument("--compare", type=_service, default=None, metavar="URL2",
                        help="a second service: scores the same candidates and reports rank agreement")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser.parse_args(argv)


def describe(readyz: Mapping[str, Any]) -> str:
    model, device = readyz.get("model"), readyz.get("device")
    return f"{model} on {device}" if isinstance(model, str) and isinstance(device, str) else ""


def evaluate_service(service: Service, api_key: str, args: argparse.Namespace, evalset: EvalSet,
                     requests: Sequence[Request], stderr: TextIO) -> ServiceRun:
    """/readyz, then every request; EvalError (exit 3) when the service cannot be reached or failed them all."""
    client = ServiceClient(service, api_key, args.timeout_s)
    try:
        described = describe(client.readiness())
        progress = Progress(stderr, service.url, len({r.query_id for r in requests}))
        run = score_candidates(client, evalset, requests, args.concurrency, progress)
    finally:
        client.close()
    run.described = described
    if requests and not run.pairs:
        raise EvalError(f"every request to {service.url} failed ({run.errors} errors); last: {run.last_error}",
                        EXIT_UNREACHABLE)
    if run.failed_queries:
        stderr.write(f"eval {service.url}: {count(len(run.failed_queries), 'query', 'queries')} kept the first-stage "
                     f"order: a request failed twice; last error: {run.last_error}\n")
    return run


def main(argv: Sequence[str], environ: Mapping[str, str] | None = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """`openvino-reranker eval ...`: returns the exit code (docs/rag.md, "openvino-reranker eval")."""
    environ = os.environ if environ is None else environ
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    try:
        args = parse_args(argv)
        api_key = client_api_key(environ)
        evalset = load_evalset(args.dataset, args.run, args.split, args.depth)
        requests = plan_requests(evalset)
        runs = [evaluate_service(service, api_key, args, evalset, requests, stderr)
                for service in (args.url, args.compare) if service is not None]
        report = build_report(evalset, *runs)
        stdout.write(json.dumps(report) + "\n" if args.json else render_text(report, evalset, runs))
        stdout.flush()
        return EXIT_INCOMPLETE if any(run.failed_queries for run in runs) else 0
    except StartupError as exc:  # EvalError too
        stderr.write(f"openvino-reranker eval: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        stderr.write("openvino-reranker eval: interrupted\n")
        return 130
