"""Does the score cache pay? The same workload against the service with --score-cache-size 0 and with the default.

    python bench/cache.py --model-dir DIR [--sessions 30] [--device CPU]

The workload is what RAG pipelines repeat (each session: one query and 20 candidates, then the same query
re-ranked over 30 candidates of which 20 are the first set — a widened retrieval or a second stage — and, every
fourth session, a retry of the first request, as a client whose first attempt timed out sends), one client at a
time over keep-alive. Reports wall time, requests/s and the cache's hit rate from /metrics. Loopback only; not CI.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from serverproc import ServerError, start_server  # noqa: E402
from soak import WORDS  # noqa: E402


def workload(sessions: int, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def words(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    requests = []
    for s in range(sessions):
        query = words(4, 12)
        first = [words(40, 120) for _ in range(20)]
        widened = first + [words(40, 120) for _ in range(10)]
        rng.shuffle(widened)
        requests.append({"query": query, "documents": first})
        requests.append({"query": query, "documents": widened})
        if s % 4 == 0:
            requests.append({"query": query, "documents": first})
    return requests


def run(port: int, requests: list[dict]) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    started = time.perf_counter()
    for body in requests:
        conn.request("POST", "/rerank", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            sys.exit(f"HTTP {response.status}: {response.read()[:200]!r}")
        response.read()
    return time.perf_counter() - started


def cache_counts(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    counts = {}
    for line in conn.getresponse().read().decode().splitlines():
        for name in ("score_cache_hits_total", "score_cache_misses_total"):
            if line.startswith(f"openvino_reranker_{name} "):
                counts[name] = int(float(line.split()[1]))
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--device", default="CPU")
    parser.add_argument("--sessions", type=int, default=30)
    parser.add_argument("--cache-size", type=int, default=10000, help="the size measured against 0")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    requests = workload(args.sessions, args.seed)
    pairs = sum(len(r["documents"]) for r in requests)
    report = {"requests": len(requests), "pairs": pairs}
    for size in (0, args.cache_size):
        try:
            server = start_server(["--device", args.device, "--model-dir", args.model_dir, "--log-level", "WARNING",
                                   "--cache-dir", "", "--score-cache-size", str(size)])
        except ServerError as e:
            sys.exit(str(e))
        with server:
            run(server.port, workload(2, args.seed + 1))  # warm-up on other texts: nothing of it is reused below
            before = cache_counts(server.port)
            seconds = run(server.port, requests)
            counts = {name: value - before.get(name, 0) for name, value in cache_counts(server.port).items()}
            report[f"cache {size}"] = {"seconds": round(seconds, 2), "pairs_per_s": round(pairs / seconds, 1),
                                       **counts}
    report["speedup"] = round(report["cache 0"]["seconds"] / report[f"cache {args.cache_size}"]["seconds"], 2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
