"""`openvino-reranker eval` end to end: a real server with the tiny model on loopback, a second scorer for
--compare, and small stdlib stand-in services that fail on purpose (retry once, one query failing, every request
failing, not ready, an API key); the JSON shape exactly; bad arguments and dataset files; the progress line."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from evaldata import write_dataset
from support import ROOT
from support.engines import FakeEngine
from support.http import request
from support.servers import free_port, server_env

from openvino_reranker import evaluate, ranking
from openvino_reranker.evaluate import Progress, plan_requests
from openvino_reranker.ranking import (
    METRICS,
    EvalSet,
    agreement,
    load_evalset,
    mean_metrics,
    reranked_order,
    trec_order,
)

TOP_KEYS = {"metrics", "queries", "pairs", "pairs_per_s", "errors"}
METRIC_KEYS = {"ndcg@10", "mrr@10", "recall@10", "recall@100"}


@pytest.fixture
def data(tmp_path):
    return write_dataset(tmp_path, queries=8, documents=60, run_depth=30, seed=3)


def run_eval(*args, env=None) -> tuple[int, str, str]:
    """evaluate.main in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = evaluate.main([str(a) for a in args], env or {}, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def eval_args(url, data, *extra):
    return ["--url", url, "--dataset", data.dataset, "--run", data.run, *extra]


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("openvino-reranker eval: error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def direct_scores(port: int, evalset: EvalSet) -> dict[str, dict[str, float]]:
    """Each query's candidates scored by a plain POST /rerank from the test (the texts as eval should send them)."""
    scores = {}
    for qid, query in evalset.queries.items():
        docs = [d for d in evalset.candidates(qid) if evalset.documents[d]]
        status, body, _ = request(port, "POST", "/rerank",
                                  {"query": query, "documents": [evalset.documents[d] for d in docs]})
        assert status == 200, body
        scores[qid] = {docs[r["index"]]: r["score"] for r in body["results"]}
    return scores


def expected_reranked(evalset: EvalSet, scores) -> dict[str, float]:
    rankings = {q: reranked_order(evalset.first_stage[q], scores.get(q, {})) for q in evalset.queries}
    return mean_metrics(rankings, evalset.qrels)


def sent_pairs(evalset: EvalSet) -> int:
    return sum(1 for q in evalset.queries for d in evalset.candidates(q) if evalset.documents[d])


# ---------------------------------------------------------------------------------------------- a real server


def test_json_against_the_tiny_model(cpu_server, data):
    code, out, err = run_eval(*eval_args(cpu_server.base, data, "--depth", "20", "--json"))
    assert code == 0, err
    assert out.count("\n") == 1
    report = json.loads(out)
    assert set(report) == TOP_KEYS
    assert set(report["metrics"]) == METRIC_KEYS
    for values in report["metrics"].values():
        assert set(values) == {"first_stage", "reranked"}
        assert all(isinstance(v, float) and 0 <= v <= 1 for v in values.values())
    evalset = load_evalset(data.dataset, data.run, "test", 20)
    assert report["queries"] == 8 == len(evalset.queries)  # q-unjudged skipped, q-no-run left out
    assert report["pairs"] == sent_pairs(evalset) == 8 * 20 - 1  # the candidate without text is not sent
    assert report["errors"] == 0 and report["pairs_per_s"] > 0
    # the reranked column is what the service's own scores give; the first stage what the run gives
    expected = expected_reranked(evalset, direct_scores(cpu_server.port, evalset))
    assert {k: v["reranked"] for k, v in report["metrics"].items()} == pytest.approx(expected, abs=1e-12)
    first = mean_metrics(evalset.first_stage, evalset.qrels)
    assert {k: v["first_stage"] for k, v in report["metrics"].items()} == pytest.approx(first, abs=1e-12)
    # beyond --depth the run's order is kept: Recall@100 cannot change by reranking the first 20
    assert report["metrics"]["recall@100"]["reranked"] == report["metrics"]["recall@100"]["first_stage"]


def test_text_report_and_progress(cpu_server, data):
    code, out, err = run_eval(*eval_args(cpu_server.base, data))
    assert code == 0, err
    assert "8 judged queries of the run, the first 100 candidates of each reranked (left out: 1 run query without " \
           "qrels, 1 judged query not in the run)" in out
    assert f"{cpu_server.base} (tiny-cross-encoder on CPU): 239 pairs in " in out
    rows = {line.split()[0] for line in out.splitlines() if line}
    assert {"metric", "nDCG@10", "MRR@10", "Recall@10", "Recall@100"} <= rows
    # stderr is not a terminal: plain progress lines, no carriage return, the last one complete
    assert "\r" not in err
    assert err.splitlines()[-1].startswith(f"eval {cpu_server.base}: 8/8 queries, 239 pairs, ")


def test_compare_with_itself_agrees_fully(cpu_server, data):
    code, out, err = run_eval(*eval_args(cpu_server.base, data, "--json", "--compare", cpu_server.base + "/rerank"))
    assert code == 0, err
    report = json.loads(out)
    assert set(report) == TOP_KEYS | {"compare"}
    compare = report["compare"]
    assert set(compare) == {"url", "metrics", "pairs", "pairs_per_s", "errors", "agreement"}
    assert compare["url"] == cpu_server.base + "/rerank"
    for name in METRIC_KEYS:
        assert compare["metrics"][name] == {"reranked": report["metrics"][name]["reranked"], "delta": 0.0}
    assert compare["agreement"] == {"queries": 8, "spearman": {"mean": 1.0, "min": 1.0},
                                    "top1": {"mean": 1.0, "min": 1.0}, "top10_overlap": {"mean": 1.0, "min": 1.0}}
    assert compare["pairs"] == report["pairs"] and compare["errors"] == 0


def test_compare_with_another_scorer(cpu_server, fake_server, data):
    """The second service ranks by length (the engine stand-in's logit is the token count / 10): agreement and
    deltas are what the two services' own scores give."""
    other = fake_server().start(FakeEngine())
    code, out, err = run_eval(*eval_args(cpu_server.base, data, "--json", "--depth", "15", "--concurrency", "3",
                                         "--compare", f"http://127.0.0.1:{other.port}"))
    assert code == 0, err
    report = json.loads(out)
    evalset = load_evalset(data.dataset, data.run, "test", 15)
    ours, theirs = direct_scores(cpu_server.port, evalset), direct_scores(other.port, evalset)
    expected = agreement(ours, theirs)
    got = report["compare"]["agreement"]
    assert got["queries"] == expected["queries"] == 8
    for key in ("spearman", "top1", "top10_overlap"):
        assert got[key] == pytest.approx(expected[key], abs=1e-12)
    assert got["spearman"]["min"] < 1  # they do disagree
    mine, other_metrics = expected_reranked(evalset, ours), expected_reranked(evalset, theirs)
    for name in METRIC_KEYS:
        assert report["compare"]["metrics"][name]["reranked"] == pytest.approx(other_metrics[name], abs=1e-12)
        assert report["compare"]["metrics"][name]["delta"] == pytest.approx(other_metrics[name] - mine[name],
                                                                             abs=1e-12)
    # the text report has both columns and the agreement line
    code, out, err = run_eval(*eval_args(cpu_server.base, data, "--depth", "15", "--compare",
                                         f"http://127.0.0.1:{other.port}"))
    assert code == 0, err
    assert "compared - reranked" in out and "rank agreement of" in out and "over 8 queries" in out


def test_server_py_eval_is_the_console_command(cpu_server, data):
    """`python server.py eval ...` (the same entry point as `openvino-reranker eval`), in its own process."""
    proc = subprocess.run([sys.executable, str(ROOT / "server.py"), "eval", *map(str, eval_args(
        cpu_server.base, data, "--json"))], capture_output=True, text=True, timeout=120, env=server_env())
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)) == TOP_KEYS
    help_text = subprocess.run([sys.executable, str(ROOT / "server.py"), "eval", "--help"], capture_output=True,
                               text=True, timeout=60, env=server_env())
    assert help_text.returncode == 0
    assert help_text.stdout.startswith("usage: server.py eval [-h] --url URL --dataset DIR --run RUN")
    assert "--compare" in help_text.stdout


# ---------------------------------------------------------------------------------------------- stand-in services


def stub_score(query: str, text: str) -> float:
    return zlib.crc32(f"{query}|{text}".encode()) % 1000 / 1000


class StubService:
    """A stdlib HTTP/1.1 service speaking the native /rerank: scores are a hash of the pair. `fail(number, query)`
    (number counts /rerank calls from 1) returns a status to answer instead, or None. Records connections,
    requests and their headers."""

    def __init__(self, fail=lambda number, query: None, api_key: str | None = None, ready: bool = True):
        stub = self
        self.calls, self.connections, self.bodies, self.headers = 0, 0, [], []
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                with stub.lock:
                    stub.connections += 1

            def log_message(self, *args):
                pass

            def answer(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if ready:
                    self.answer(200, {"ready": True, "model": "stub", "device": "CPU"})
                else:
                    self.answer(503, {"ready": False, "reason": "loading and compiling the model"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.calls += 1
                    number = stub.calls
                    stub.bodies.append(body)
                    stub.headers.append(dict(self.headers))
                if api_key is not None and self.headers.get("Authorization") != f"Bearer {api_key}":
                    return self.answer(401, {"ok": False, "error": {"type": "unauthorized", "message": "bad key"}})
                status = fail(number, body["query"])
                if status is not None:
                    return self.answer(status, {"ok": False, "error": {"type": "inference_failed",
                                                                       "message": "device lost"}})
                scores = [stub_score(body["query"], t) for t in body["documents"]]
                order = sorted(range(len(scores)), key=lambda i: -scores[i])
                self.answer(200, {"ok": True, "results": [{"index": i, "score": scores[i]} for i in order]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    made = []

    def make(**kwargs) -> StubService:
        made.append(StubService(**kwargs))
        return made[-1]

    yield make
    for s in made:
        s.close()


def stub_expected(evalset: EvalSet, failed=()) -> dict[str, float]:
    scores = {q: {d: stub_score(evalset.queries[q], evalset.documents[d]) for d in evalset.candidates(q)
                  if evalset.documents[d]} for q in evalset.queries if q not in failed}
    return expected_reranked(evalset, scores)


def reranked_of(report) -> dict[str, float]:
    return {name: values["reranked"] for name, values in report["metrics"].items()}


def test_a_failed_request_is_retried_once(stub, data, monkeypatch):
    monkeypatch.setattr(evaluate, "RETRY_DELAY_S", 0.01)
    service = stub(fail=lambda number, query: 500 if number == 1 else None)
    code, out, err = run_eval(*eval_args(service.url, data, "--json", "--concurrency", "1"))
    assert code == 0, err
    report = json.loads(out)
    evalset = load_evalset(data.dataset, data.run, "test", 100)
    assert report["errors"] == 1  # counted
    assert report["pairs"] == sent_pairs(evalset)  # and every pair scored after the retry
    assert service.calls == len(evalset.queries) + 1
    assert service.bodies[0] == service.bodies[1]  # the retry is the same request
    assert reranked_of(report) == pytest.approx(stub_expected(evalset), abs=1e-12)


def test_a_query_that_fails_twice_keeps_its_first_stage_order(stub, data, monkeypatch):
    monkeypatch.setattr(evaluate, "RETRY_DELAY_S", 0.01)
    evalset = load_evalset(data.dataset, data.run, "test", 100)
    broken = evalset.queries["q2"]
    service = stub(fail=lambda number, query: 503 if query == broken else None)
    code, out, err = run_eval(*eval_args(service.url, data, "--json"))
    assert code == evaluate.EXIT_INCOMPLETE == 1
    report = json.loads(out)  # the report is still printed
    assert report["errors"] == 2  # the request and its one retry
    assert report["pairs"] == sent_pairs(evalset) - len([d for d in evalset.candidates("q2") if evalset.documents[d]])
    assert reranked_of(report) == pytest.approx(stub_expected(evalset, failed={"q2"}), abs=1e-12)
    assert f"eval {service.url}: 1 query kept the first-stage order: a request failed twice; last error: " \
           "HTTP 503: device lost" in err
    code, out, err = run_eval(*eval_args(service.url, data))
    assert code == 1 and f"{service.url} (stub on CPU): " in out and ", 2 errors, 1 query kept the first-stage order" \
        in out


def test_every_request_failing_is_one_line_and_exit_3(stub, data, monkeypatch):
    monkeypatch.setattr(evaluate, "RETRY_DELAY_S", 0.01)
    service = stub(fail=lambda number, query: 500)
    code, out, err = run_eval(*eval_args(service.url, data, "--json"))
    assert code == evaluate.EXIT_UNREACHABLE == 3
    assert out == ""
    assert one_error_line(err) == (f"openvino-reranker eval: error: every request to {service.url} failed (16 errors);"
                                   " last: HTTP 500: device lost")


def test_an_unreachable_or_unready_service_is_one_line_and_exit_3(stub, data):
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = run_eval(*eval_args(url, data))
    assert (code, out) == (3, "")
    assert one_error_line(err) == f"openvino-reranker eval: error: cannot reach {url}: ConnectionRefusedError: " \
                                  "Connection refused"
    service = stub(ready=False)
    code, out, err = run_eval(*eval_args(service.url, data))
    assert (code, out) == (3, "")
    assert one_error_line(err) == f"openvino-reranker eval: error: {service.url} is not ready: loading and " \
                                  "compiling the model"
    assert service.calls == 0


def test_the_api_key_comes_from_the_usual_variables(stub, data, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "RETRY_DELAY_S", 0.01)
    service = stub(api_key="s3cret")
    code, out, err = run_eval(*eval_args(service.url, data, "--json"), env={"OPENVINO_RERANKER_API_KEY": "s3cret"})
    assert code == 0, err
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    code, out, err = run_eval(*eval_args(service.url, data), env={"OPENVINO_RERANKER_API_KEY_FILE": str(key_file)})
    assert code == 0, err
    code, out, err = run_eval(*eval_args(service.url, data))
    assert code == 3
    assert "last: HTTP 401: bad key (is OPENVINO_RERANKER_API_KEY set to the service's key?)" in one_error_line(err)
    code, _, err = run_eval(*eval_args(service.url, data), env={"OPENVINO_RERANKER_API_KEY": "a b"})
    assert code == 2 and "api_key must be printable ASCII without spaces" in one_error_line(err)
    both = {"OPENVINO_RERANKER_API_KEY": "s3cret", "OPENVINO_RERANKER_API_KEY_FILE": str(key_file)}
    code, _, err = run_eval(*eval_args(service.url, data), env=both)
    assert code == 2 and "set either OPENVINO_RERANKER_API_KEY or OPENVINO_RERANKER_API_KEY_FILE, not both" in err


def test_keep_alive_connections_one_per_worker_and_no_cache(stub, data):
    service = stub()
    code, out, err = run_eval(*eval_args(service.url, data, "--concurrency", "2"))
    assert code == 0, err
    assert service.calls == 8
    assert service.connections <= 3  # /readyz's, then at most one per worker thread, kept alive
    assert all(h["Cache-Control"] == "no-cache" and h["Content-Type"] == "application/json"
               and "Authorization" not in h for h in service.headers)


def test_a_query_split_over_several_requests_scores_the_same(stub, data, monkeypatch):
    service = stub()
    code, out, _ = run_eval(*eval_args(service.url, data, "--json"))
    whole = json.loads(out)
    monkeypatch.setattr(evaluate, "MAX_DOCUMENTS_PER_REQUEST", 7)
    service = stub()
    code, out, err = run_eval(*eval_args(service.url, data, "--json"))
    assert code == 0, err
    split = json.loads(out)
    assert max(len(b["documents"]) for b in service.bodies) == 7
    assert service.calls == 8 * 5  # 30 candidates (29 for the query with an empty one) in requests of 7
    assert split["metrics"] == whole["metrics"] and split["pairs"] == whole["pairs"]


def test_plan_requests_keeps_bodies_under_the_limit(tmp_path, monkeypatch):
    made = write_dataset(tmp_path, queries=3, documents=30, run_depth=30, seed=1, doc_words=(150, 200))
    evalset = load_evalset(made.dataset, made.run, "test", 30)
    monkeypatch.setattr(evaluate, "MAX_BODY_BYTES", 4000)
    requests = plan_requests(evalset)
    for r in requests:
        body = evaluate.rerank_body(evalset.queries[r.query_id], [evalset.documents[d] for d in r.doc_ids])
        assert len(body) <= 4000
    for qid in evalset.queries:  # every non-empty candidate once, in candidate order
        sent = [d for r in requests if r.query_id == qid for d in r.doc_ids]
        assert sent == [d for d in evalset.candidates(qid) if evalset.documents[d]]


# ---------------------------------------------------------------------------------------------- bad input


def corrupt(data, name: str, text: str, mode: str = "append") -> int:
    """Append `text` to a file (or replace it); the number its first line gets."""
    path = {"corpus": data.dataset / "corpus.jsonl", "queries": data.dataset / "queries.jsonl",
            "qrels": data.dataset / "qrels" / "test.tsv", "run": data.run}[name]
    before = path.read_text() if mode == "append" else ""
    path.write_text(before + text)
    return before.count("\n") + 1


BAD_FILES = [
    ("run", "q0 Q0 doc1 1 0.5\n", "run.trec line {next}: expected 'qid Q0 docid rank score tag', got 5 fields"),
    ("run", "q0 Q0 docX 1 nan t\n", "run.trec line {next}: the score 'nan' is not a finite number"),
    ("run", "q0 Q0 docX 1 1e999 t\n", "the score '1e999' is not a finite number"),
    ("run", "q1 Q0 doc-new 1 99 t\n", "1 candidate documents of the run are not in"),
    ("run", "q0 Q0 doc0 1 0.5 t\nq0 Q0 doc0 2 0.4 t\n", "query 'q0' lists 'doc0' twice"),
    ("qrels", "q0\tdoc1\thigh\n", "the score 'high' is not an integer"),
    ("qrels", "q0\tdoc1\n", "expected 'query-id corpus-id score', got 2 fields"),
    ("qrels", "q0\tdoc59\t1\nq0\tdoc59\t2\n", "query 'q0' judges 'doc59' twice"),
    ("corpus", "{not json\n", "corpus.jsonl line {next}: not JSON"),
    ("corpus", '{"title": "no id"}\n', 'corpus.jsonl line {next}: not an object with a string "_id"'),
    ("queries", "", "8 judged run queries are not in"),
    ("run", "nobody Q0 doc0 1 1 t\n", "no query of the run"),
]


@pytest.mark.parametrize("name, text, message", BAD_FILES)
def test_bad_dataset_files_are_one_line_and_exit_2(data, name, text, message):
    mode = "write" if (name == "queries" or message.startswith("no query")) else "append"
    next_line = corrupt(data, name, text, mode)
    code, out, err = run_eval(*eval_args("http://127.0.0.1:9", data))  # never reached: the files are read first
    assert (code, out) == (2, "")
    assert message.format(next=next_line) in one_error_line(err)


def test_missing_and_unreadable_files_exit_2(data, tmp_path):
    (data.dataset / "corpus.jsonl").unlink()
    code, _, err = run_eval(*eval_args("http://127.0.0.1:9", data))
    assert code == 2 and "corpus file" in one_error_line(err) and "does not exist" in err
    code, _, err = run_eval("--url", "http://127.0.0.1:9", "--dataset", tmp_path / "none", "--run", data.run)
    assert code == 2 and "is not a directory" in one_error_line(err)
    (tmp_path / "bad.trec").write_bytes(b"q0 Q0 \xff 1 1 t\n")
    code, _, err = run_eval("--url", "http://127.0.0.1:9", "--dataset", data.dataset, "--run", tmp_path / "bad.trec")
    assert code == 2 and "is not UTF-8 text" in one_error_line(err)
    code, _, err = run_eval(*eval_args("http://127.0.0.1:9", data, "--split", "dev"))
    assert code == 2 and "qrels/dev.tsv does not exist" in one_error_line(err)


@pytest.mark.parametrize("args, message", [
    (["--depth", "0"], "argument --depth: 0 is outside 1..1000"),
    (["--concurrency", "x"], "argument --concurrency: 'x' is not an integer"),
    (["--url", "ftp://host"], "argument --url: 'ftp://host' is not http://HOST:PORT or https://HOST:PORT"),
    (["--url", "http://h:1/v1/rerank"], "names a Cohere-compatible route"),
    (["--compare", "http://u:p@h:1"], "must not carry a query string, a fragment or credentials"),
    (["--split", "../x"], "is not a split name"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_arguments_are_one_line_and_exit_2(data, args, message):
    code, out, err = run_eval(*eval_args("http://127.0.0.1:9", data), *args)
    assert (code, out) == (2, "")
    assert one_error_line(err).startswith("openvino-reranker eval: error: bad command line: ")
    assert message in err


def test_urls_are_read_as_client_py_reads_them():
    for url, route in [("http://h:1", "/rerank"), ("http://h:1/", "/rerank"), ("http://h:1/rerank/", "/rerank"),
                       ("http://h/reranker", "/reranker/rerank"), ("https://h/p/rerank", "/p/rerank")]:
        service = evaluate.parse_service_url(url)
        assert service.rerank_path == route and service.readyz_path == route.removesuffix("rerank") + "readyz"
    assert evaluate.parse_service_url("https://h/x").port == 443
    assert evaluate.parse_service_url("http://[::1]:5/").host == "::1"


# ---------------------------------------------------------------------------------------------- progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_rewrites_one_line():
    clock, stream = Clock(), Terminal()
    progress = Progress(stream, "http://x", 10, clock)
    clock.now = 0.2
    progress.update(1, 10, 0)  # too soon
    assert stream.getvalue() == ""
    clock.now = 1.0
    progress.update(2, 20, 0)
    clock.now = 2.0
    progress.update(10, 100, 1, final=True)
    assert stream.getvalue() == ("\reval http://x: 2/10 queries, 20 pairs, 20.0 pairs/s, 0 errors"
                                 "\reval http://x: 10/10 queries, 100 pairs, 50.0 pairs/s, 1 errors\n")


def test_progress_in_a_log_is_plain_lines_every_10_s():
    clock, stream = Clock(), io.StringIO()
    progress = Progress(stream, "u", 100, clock)
    for second in range(1, 25):
        clock.now = float(second)
        progress.update(second, second * 10, 0)
    progress.update(100, 1000, 0, final=True)
    lines = stream.getvalue().splitlines()
    assert lines == ["eval u: 10/100 queries, 100 pairs, 10.0 pairs/s, 0 errors",
                     "eval u: 20/100 queries, 200 pairs, 10.0 pairs/s, 0 errors",
                     "eval u: 100/100 queries, 1000 pairs, 41.7 pairs/s, 0 errors"]


def test_text_helpers():
    assert evaluate.signed(-2.4e-5) == "-0.0000" and evaluate.signed(-0.00251) == "-0.0025"
    assert evaluate.signed(0.5) == "+0.5000"
    assert evaluate.count(1, "query", "queries") == "1 query" and evaluate.count(0, "query", "queries") == "0 queries"


def test_the_server_help_points_at_eval():
    proc = subprocess.run([sys.executable, str(ROOT / "server.py"), "--help"], capture_output=True, text=True,
                          timeout=60, env=server_env())
    assert proc.returncode == 0 and "server.py eval --url URL --dataset DIR --run RUN" in proc.stdout
    assert "`eval` measures a running service's ranking on your own data (`eval --help`)." in proc.stdout


def test_metrics_table_in_metrics_order():
    assert list(METRICS) == [key for key, _ in ranking.CUTOFF_METRICS]
    assert trec_order({"b": 1.0, "a": 1.0}) == ["b", "a"]


def test_run_file_paths_may_be_relative(cpu_server, data, monkeypatch):
    monkeypatch.chdir(data.run.parent)
    code, out, err = run_eval("--url", cpu_server.base, "--dataset", Path("dataset"), "--run", Path("run.trec"),
                              "--json", "--depth", "5")
    assert code == 0, err
