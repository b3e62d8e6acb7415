"""Where an IR's inference time goes on this CPU: OpenVINO's per-node counters (PERF_COUNT) summed by node type, with
each type's kernels, for one micro-batch shape, and the achieved FLOP/s of the FullyConnected (dense) layers.

    python bench/profile_ops.py --model-dir DIR [--batch 8] [--length 128] [--property SNIPPETS_MODE=DISABLE ...]

The input is random token ids of exactly [batch, length], every position attended but half of the last row's (a
padded row, as in a real micro-batch). The dense FLOPs are 2 x tokens x the weights of every 2-D MatMul constant in
the IR (embeddings excluded), so the FullyConnected line's TFLOP/s is comparable with cpu.peak_flops. Not CI.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def dense_weights(model) -> int:
    """Multiply-adds per token of the IR's dense layers: the 2-D constant operands of its MatMuls (through a
    Convert/Multiply decompression chain when the weights are compressed)."""
    total = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        for port in op.inputs():
            shape = port.get_partial_shape()
            node = port.get_source_output().get_node()
            while node.get_type_name() in ("Convert", "Multiply", "Subtract", "Reshape") and node.inputs():
                node = node.input(0).get_source_output().get_node()
            if node.get_type_name() == "Constant" and shape.rank.get_length() == 2 and shape.is_static:
                total += shape[0].get_length() * shape[1].get_length()
    return total


def main() -> int:
    import openvino as ov

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--property", action="append", default=[], help="KEY=VALUE, an OpenVINO compile property")
    args = parser.parse_args()
    core = ov.Core()
    model = core.read_model(args.model_dir / "openvino_model.xml")
    properties = {"PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True}
    properties.update(dict(p.split("=", 1) for p in args.property))
    compiled = core.compile_model(model, "CPU", properties)
    request = compiled.create_infer_request()
    rng = np.random.default_rng(0)
    b, n = args.batch, args.length
    ids = rng.integers(1000, 20000, size=(b, n)).astype(np.int64)
    mask = np.ones((b, n), np.int64)
    mask[-1, n // 2:] = 0
    feed = {p.get_any_name(): ids if p.get_any_name() == "input_ids" else
            mask if p.get_any_name() == "attention_mask" else np.zeros((b, n), np.int64) for p in model.inputs}
    for _ in range(5):
        request.infer(feed)
    times: collections.Counter = collections.Counter()
    kernels: dict[str, set] = collections.defaultdict(set)
    for _ in range(args.runs):
        request.infer(feed)
        for info in request.profiling_info:
            times[info.node_type] += info.real_time.total_seconds() * 1000 / args.runs
            kernels[info.node_type].add(info.exec_type)
    total = sum(times.values())
    print(f"{args.model_dir}  [{b}, {n}]  precision {compiled.get_property('INFERENCE_PRECISION_HINT')}  "
          f"{total:.2f} ms per call ({b / total * 1000:.0f} pairs/s at this shape)")
    for kind, ms in times.most_common(10):
        print(f"  {ms:7.2f} ms {100 * ms / total:5.1f}%  {kind:<16} {', '.join(sorted(kernels[kind]))}")
    flops = 2 * b * n * dense_weights(model)
    if times["FullyConnected"]:
        print(f"  FullyConnected: {flops / 1e9:.1f} GFLOP in {times['FullyConnected']:.2f} ms = "
              f"{flops / times['FullyConnected'] / 1e9:.2f} TFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
