"""Soak test: N concurrent keep-alive clients for M minutes against openvino-reranker on loopback.

    python bench/soak.py --model-dir DIR [--clients 8] [--minutes 10] [--documents 20] [--device CPU] [--hostile]
    python bench/soak.py --url http://127.0.0.1:18818 --pid PID ...      # an already running server

Starts the server itself (on a free loopback port, without the score cache: the workload repeats 64 requests, and
hits would skip inference) unless --url is given. Every client sends valid requests and,
every 50th request, one invalid request that must get a 400 (the error path under load). With --hostile, one more
client sends, in turn, the hostile requests that once wedged, dropped or 500'd the service (HOSTILE below), each on
its own connection, and checks each answer's status; the valid clients must still see no error. Bounded in time
(--minutes) and count (--max-requests). Reports requests, unexpected errors, latency percentiles, throughput and
the server's RSS at start, end and peak. Loopback only; not part of CI.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import sys
import threading
import time
from urllib.parse import urlsplit

from serverproc import ServerError, start_server

WORDS = ("the solar power energy city river water music history system model search document light wind ocean "
         "train engine computer network bread coffee health school library language temperature pressure mountain "
         "capital france paris tower museum planet earth space rocket program python server data cell protein gene "
         "doctor disease farm horse bird cat dog cheese wine sugar salt bridge road car ship fish king queen war art"
         ).split()


def make_requests(count: int, documents: int, seed: int) -> list[dict]:
    """A deterministic workload: queries of 4-12 words, documents of 40-120 words."""
    rng = random.Random(seed)

    def words(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [{"query": words(4, 12), "documents": [words(40, 120) for _ in range(documents)]} for _ in range(count)]


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _raw(head: str, body: bytes = b"") -> bytes:
    return head.encode("latin-1").replace(b"\n", b"\r\n") + b"\r\n" + body


def _post(body: bytes, extra: str = "", path: str = "/rerank") -> bytes:
    return _raw(f"POST {path} HTTP/1.1\nHost: x\nContent-Type: application/json\nContent-Length: {len(body)}\n"
                f"{extra}", body)


_HUGE = json.dumps({"query": "q", "documents": [("xqzj" * 25 + " ") * 980] * 19, "timeout_ms": 5000}).encode()
# distinct documents: identical ones are scored once, and would not reach the token limit
_TOKENS = json.dumps({"query": "q", "documents": [f"{i} " + "solar power " * 158 for i in range(1000)]}).encode()


def _spaceless(text: str, side: str = "right") -> bytes:
    """A TEI body with one document of about 2 MB that holds no space (it must cost what 2 MB with spaces costs)."""
    return json.dumps({"query": "q", "texts": [text], "truncation_direction": side}, ensure_ascii=False).encode()


# (name, raw request, acceptable statuses); None means: the server closes the connection without an answer
HOSTILE = [
    ("timeout_ms beyond int64", _post(b'{"query":"q","documents":["a"],"timeout_ms":9223372036854775807}'), {400}),
    ("19 documents of 99k characters", _post(_HUGE), {200}),
    ("token limit with 1000 x 1900 characters", _post(_TOKENS), {413}),
    ("Content-Length in superscript digits", _raw("POST /rerank HTTP/1.1\nHost: x\nContent-Length: \u00b2\n"), {400}),
    ("Content-Length with \\x1c", _raw("POST /rerank HTTP/1.1\nHost: x\nContent-Length: \x1c31\x1c\n"), {400}),
    ("lone surrogate as a JSON key", _post(b'{"query":"q","documents":["a"],"\\ud800":1}'), {400}),
    ("JSON nested 100000 deep", _post(b"[" * 100_000), {400}),
    ("timeout_ms 10**400", _post(b'{"query":"q","documents":["a"],"timeout_ms":1' + b"0" * 400 + b"}"), {400}),
    ("X-Request-Timeout-Ms in superscripts", _post(b'{"query":"q","documents":["a"]}',
                                                   "X-Request-Timeout-Ms: \u00b9\u00b2\n"), {400}),
    ("duplicate Content-Length", _raw("POST /rerank HTTP/1.1\nHost: x\nContent-Type: application/json\n"
                                      "Content-Length: 2\nContent-Length: 31\n", b"{}"), {400}),
    ("header line without a colon", _post(b'{"query":"q","documents":["a"]}', "NoColonHere\n"), {400}),
    ("100 header lines of 64 KB", _raw("GET /healthz HTTP/1.1\nHost: x\n" +
                                       "".join(f"X-Pad-{i}: {'a' * 65000}\n" for i in range(100))), {431}),
    ("body over max_body_bytes", _post(b"x" * (3 * 1024 * 1024)), {413}),
    ("echoed document with a lone surrogate", _post(b'{"query":"q","documents":[{"text":"a","x":"\\ud800"}],'
                                                    b'"return_documents":true}', path="/v1/rerank"), {200}),
    ("2,000,000 commas", _post(_spaceless("," * 2_000_000)), {200}),
    ("690,000 CJK characters, cut from the left", _post(_spaceless("\u4e2d" * 690_000, "left")), {200}),
    ("one 2 MB word", _post(_spaceless("a" * 2_000_000)), {200}),
    ("500,000 emoji", _post(_spaceless("\U0001f600" * 500_000, "left")), {200}),
    ("a 2 MB run of combining marks", _post(_spaceless("e" + "\u0301\u0323" * 499_000)), {200}),
]


def hostile_loop(url, stop_at, stats, lock):
    """Send HOSTILE in turn, each on a fresh connection, until stop_at; record answers that are not acceptable."""
    parts = urlsplit(url)
    i = 0
    while time.monotonic() < stop_at:
        name, raw, acceptable = HOSTILE[i % len(HOSTILE)]
        i += 1
        try:
            with socket.create_connection((parts.hostname, parts.port), timeout=60) as s:
                s.sendall(raw)
                resp = http.client.HTTPResponse(s)
                resp.begin()
                body = resp.read()
                status = resp.status
                if status >= 400:
                    json.loads(body)  # every error is JSON
        except (OSError, http.client.HTTPException, ValueError) as exc:
            status = f"{type(exc).__name__}: {exc}"
        with lock:
            stats["hostile"] += 1
            if status not in acceptable:
                stats["hostile_unexpected"].append(f"{name}: {status}")
        time.sleep(0.5)


def client_loop(url, workload, stop_at, max_requests, counter, lock, stats, offset):
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    i = offset
    while time.monotonic() < stop_at:
        with lock:
            if counter[0] >= max_requests:
                return
            counter[0] += 1
            n = counter[0]
        bad = n % 50 == 0
        body = {"query": "", "documents": ["x"]} if bad else workload[i % len(workload)]
        i += 1
        started = time.perf_counter()
        try:
            conn.request("POST", "/rerank", body=json.dumps(body), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = json.loads(resp.read())
            elapsed = time.perf_counter() - started
            expected = 400 if bad else 200
            ok = resp.status == expected and (bad or len(payload["results"]) == len(body["documents"]))
            with lock:
                if ok and not bad:
                    stats["latencies"].append(elapsed)
                    stats["pairs"] += len(body["documents"])
                elif not ok:
                    stats["errors"].append(f"HTTP {resp.status}: {str(payload)[:200]}")
                else:
                    stats["expected_4xx"] += 1
        except (OSError, http.client.HTTPException, ValueError) as exc:
            with lock:
                stats["errors"].append(f"{type(exc).__name__}: {exc}")
            conn.close()
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="start a server on this model (CPU unless --device)")
    parser.add_argument("--device", default="CPU")
    parser.add_argument("--url", help="use a running server instead")
    parser.add_argument("--pid", type=int, help="the running server's pid, for RSS")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--max-requests", type=int, default=1_000_000)
    parser.add_argument("--documents", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--hostile", action="store_true", help="also send the hostile requests (HOSTILE) in turn")
    parser.add_argument("--with-score-cache", dest="score_cache_off", action="store_false",
                        help="keep the started server's score cache (off by default: the workload repeats)")
    args = parser.parse_args()
    if bool(args.model_dir) == bool(args.url):
        parser.error("give exactly one of --model-dir and --url")
    host = urlsplit(args.url).hostname if args.url else "127.0.0.1"
    if host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("soak tests run on loopback only")

    # the workload cycles through 64 requests: with the score cache on, all but the first pass would be cache hits
    # and the soak would not exercise inference, so the server it starts has no score cache
    extra = ["--score-cache-size", "0"] if args.score_cache_off else []
    server = None
    if args.model_dir:
        try:
            server = start_server(["--device", args.device, "--model-dir", args.model_dir, "--log-level", "WARNING",
                                   *extra])
        except ServerError as e:
            sys.exit(str(e))
    url = server.url if server else args.url
    pid = server.pid if server else args.pid
    workload = make_requests(64, args.documents, args.seed)
    stats = {"latencies": [], "errors": [], "pairs": 0, "expected_4xx": 0, "hostile": 0, "hostile_unexpected": []}
    lock, counter = threading.Lock(), [0]
    rss_samples = []
    # one warm-up pass so that the start RSS is taken in steady state
    client_loop(url, workload, time.monotonic() + 5, 4, [0], threading.Lock(), {"latencies": [], "errors": [],
                                                                               "pairs": 0, "expected_4xx": 0}, 0)
    rss_start = rss_kib(pid) if pid else None
    started = time.monotonic()
    stop_at = started + args.minutes * 60
    threads = [threading.Thread(target=client_loop, args=(url, workload, stop_at, args.max_requests, counter, lock,
                                                          stats, k * 8), daemon=True) for k in range(args.clients)]
    if args.hostile:
        threads.append(threading.Thread(target=hostile_loop, args=(url, stop_at, stats, lock), daemon=True))
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(5)
        if pid:
            rss_samples.append(rss_kib(pid))
        done = len(stats["latencies"])
        print(f"  t={time.monotonic() - started:6.0f}s requests={done} errors={len(stats['errors'])} "
              f"rss={rss_samples[-1] if rss_samples else '?'} KiB", flush=True)
    duration = time.monotonic() - started
    rss_end = rss_kib(pid) if pid else None
    lat = stats["latencies"]
    report = {
        "clients": args.clients, "minutes": round(duration / 60, 2), "documents_per_request": args.documents,
        "requests_ok": len(lat), "expected_400s": stats["expected_4xx"], "errors": len(stats["errors"]),
        "first_errors": stats["errors"][:5],
        "hostile_requests": stats["hostile"], "hostile_unexpected": len(stats["hostile_unexpected"]),
        "first_hostile_unexpected": stats["hostile_unexpected"][:10],
        "requests_per_s": round(len(lat) / duration, 2), "pairs_per_s": round(stats["pairs"] / duration, 1),
        "latency_ms": {q: round(percentile(lat, p) * 1000, 1) for q, p in
                       (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))},
        "rss_kib": {"start": rss_start, "end": rss_end,
                    "peak": max((r for r in rss_samples if r), default=None)},
    }
    print(json.dumps(report, indent=2))
    if server:
        status = server.stop()
        print(f"server exit status after SIGTERM: {'killed' if status is None else status}")
    return 0 if not stats["errors"] and not stats["hostile_unexpected"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
