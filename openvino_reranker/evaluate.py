"""`openvino-reranker eval`: the ranking quality of a running service on the user's own data (the metrics, the
dataset and the report are `ranking`'s; this module is the client of the service and the command).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from . import __version__
from .config import ENV_PREFIX, EVAL_COMMAND, OneLineArgumentParser, client_api_key, int_argument
from .errors import StartupError
from .ranking import CUTOFF_METRICS, EvalError, EvalSet, ServiceRun, build_report, load_evalset

EXIT_INCOMPLETE = 1  # the run finished, but some queries' requests failed twice: they kept their first-stage order
EXIT_UNREACHABLE = 3  # the service cannot be reached, is not ready, or failed every request: no metrics

MAX_DOCUMENTS_PER_REQUEST = 100  # a query's candidates beyond this go in further requests (scores are per pair)
MAX_BODY_BYTES = 1 << 20  # likewise for the body: half the service's default max_body_bytes
RETRY_DELAY_S = 1.0  # before the one retry of a failed request (an overloaded service answers Retry-After: 1)
PROGRESS_INTERVAL_S = {True: 0.5, False: 10.0}  # how often the progress line is written: a terminal, a log


class RequestFailed(Exception):
    """One POST /rerank did not give a score for every document sent; the message says why."""


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
