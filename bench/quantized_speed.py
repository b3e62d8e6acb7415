"""CPU pairs/s of model directories (an IR and its `openvino-reranker quantize` output), measured interleaved.

    python bench/quantized_speed.py DIR [DIR ...] [--rounds 5] [--requests 10] [--documents 20] [--precision default]

Each directory is loaded as the server loads it (its head, an Engine compiled on the CPU with the server's default
properties, PERFORMANCE_HINT=LATENCY, and the precision asked for) and scores the deterministic workload of
bench/bench.py (queries of 4-12 words, documents of 40-120 words) through `Reranker.score_pairs`, without HTTP. The
models take turns, one round each, so that the machine's other load falls on all of them alike; each round's
pairs/s, the total and the median round are printed. A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import make_workload  # noqa: E402
from openvino_reranker.encoding import load_tokenizer  # noqa: E402
from openvino_reranker.engine import Engine, open_core, read_model  # noqa: E402
from openvino_reranker.modeldir import load_model_files, make_head  # noqa: E402
from openvino_reranker.parity import EXACT_F32_CPU  # noqa: E402
from openvino_reranker.reranker import Reranker  # noqa: E402


def open_reranker(core, model_dir: Path, precision: str) -> Reranker:
    files = load_model_files(model_dir, 0)
    model = read_model(core, files.xml)
    head = make_head(files, load_tokenizer(files.tokenizer), model)
    properties = {"PERFORMANCE_HINT": "LATENCY"}
    if precision == "f32":
        properties.update(EXACT_F32_CPU)
    elif precision != "default":
        properties["INFERENCE_PRECISION_HINT"] = precision
    return Reranker(head, Engine(core, model, "CPU", None, properties, head.contract), 8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", type=Path, nargs="+")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=10, help="requests per round")
    parser.add_argument("--documents", type=int, default=20)
    parser.add_argument("--precision", default="default", choices=["default", "f32", "bf16", "f16"])
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    core = open_core("CPU")
    rerankers = [open_reranker(core, d, args.precision) for d in args.dirs]
    workload = make_workload(args.requests, args.documents, args.seed)
    totals = [[0, 0.0] for _ in rerankers]
    rates: list[list[float]] = [[] for _ in rerankers]
    try:
        for reranker in rerankers:
            reranker.score_pairs(*workload[0], use_cache=False)  # warm-up
        for round_number in range(1, args.rounds + 1):
            line = []
            for total, rate, reranker in zip(totals, rates, rerankers, strict=True):
                started = time.perf_counter()
                pairs = sum(len(reranker.score_pairs(query, docs, use_cache=False).scores)
                            for query, docs in workload)
                seconds = time.perf_counter() - started
                total[0] += pairs
                total[1] += seconds
                rate.append(pairs / seconds)
                line.append(f"{pairs / seconds:7.1f}")
            print(f"round {round_number}: " + "  ".join(line) + " pairs/s", flush=True)
    finally:
        for reranker in rerankers:
            reranker.close()
    for directory, (pairs, seconds), rate in zip(args.dirs, totals, rates, strict=True):
        print(f"{directory}: {pairs} pairs in {seconds:.1f} s, {pairs / seconds:.1f} pairs/s, median round "
              f"{statistics.median(rate):.1f} ({args.precision})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
