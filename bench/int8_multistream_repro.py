"""OpenVINO CPU: a MatMul with INT8 weights, compiled with two streams at the default bf16 precision, returns garbage.

Standalone (openvino and numpy only); written so that it can be filed upstream as is.

Summary: on a CPU whose default inference precision is bf16 (AMX, AVX512-BF16), a model whose MatMul weights are
INT8 (Constant(i8) -> Convert(f32) -> Multiply(per-row scale), the weight-only compression NNCF and
`optimum-cli --weight-format int8` write) compiled with PERFORMANCE_HINT=THROUGHPUT or NUM_STREAMS=2 and dynamic
input shapes returns outputs off by hundreds where they are at most about 13, on every compile, even for one input
on one infer request. The same model is right with one stream (bf16 rounding only), with
INFERENCE_PRECISION_HINT=f32 on two streams, and with f32 weights on two streams. For the single MatMul built here,
DYNAMIC_QUANTIZATION_GROUP_SIZE=0, INFERENCE_NUM_THREADS=1 or a static input shape also give right outputs; for a
whole BERT encoder with INT8 weights (tests/tinymodel.py, or an optimum-cli INT8 export of all-MiniLM-L6-v2 with a
one-logit head) DYNAMIC_QUANTIZATION_GROUP_SIZE=0 does not help: logits off by 14 to 260.

Found with: OpenVINO 2026.4.1-22982-e213a147257-releases/2026/4 (pip wheel), numpy 2.4.6, Python 3.11.7, Linux x86_64;
CPU "Intel(R) Xeon(R) Processor" (2 vCPUs) with amx_bf16, amx_int8, amx_tile, avx512_bf16, avx512_fp16;
core.get_property("CPU", "INFERENCE_PRECISION_HINT") = bf16.

Steps: build M = MatMul(x[?, ?, 32], dequantized INT8 weight [32, 32], transpose_b); compile on "CPU" with
{INFERENCE_PRECISION_HINT: f32} (the reference) and with each configuration below; infer one x of [1, 5, 32].
Expected: every configuration within bf16 rounding of the reference (about 0.1 here).
Actual: NUM_STREAMS=2 and PERFORMANCE_HINT=THROUGHPUT are off by 729 for outputs of at most 12.7 (two such MatMuls
in a row: off by 280,000). With IR.xml: the tests' tiny INT8 BERT 218, the MiniLM INT8 export 138, on logits of at
most 2.3 and 0.13.

On a CPU whose default precision is f32 (no AMX or AVX512-BF16) every configuration computes in f32 and this script
reports nothing wrong: the bug cannot be seen there.

Usage: python bench/int8_multistream_repro.py [IR.xml]   (with an IR: each configuration is compared on random
input ids of [1, 24], every input of the IR fed the same; for cross-encoder IRs such as the tests' tiny model).
Exits 1 when a configuration was off by more than 1.0 (far above bf16 rounding, far below the failure), else 0.
"""

from __future__ import annotations

import sys

import numpy as np
import openvino as ov

CONFIGURATIONS = {
    "LATENCY (one stream)": {"PERFORMANCE_HINT": "LATENCY"},
    "THROUGHPUT": {"PERFORMANCE_HINT": "THROUGHPUT"},
    "NUM_STREAMS=2": {"NUM_STREAMS": "2"},
    "NUM_STREAMS=2, f32": {"NUM_STREAMS": "2", "INFERENCE_PRECISION_HINT": "f32"},
}
REFERENCE = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
WRONG = 1.0


def int8_matmul_model(hidden: int = 32, seed: int = 0) -> ov.Model:
    """x [?, ?, hidden] @ W.T, W stored as int8 with one f32 scale per output row."""
    import openvino.opset13 as ops

    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((hidden, hidden)).astype(np.float32)
    scale = (np.abs(weight).max(axis=1, keepdims=True) / 127).astype(np.float32)
    quantized = np.round(weight / scale).astype(np.int8)
    x = ops.parameter([-1, -1, hidden], ov.Type.f32, name="x")
    dequantized = ops.multiply(ops.convert(ops.constant(quantized), ov.Type.f32), ops.constant(scale))
    return ov.Model([ops.result(ops.matmul(x, dequantized, False, True))], [x], "int8_weight_matmul")


def inputs_for(model: ov.Model) -> dict:
    rng = np.random.default_rng(1)
    if model.inputs[0].get_element_type() == ov.Type.f32:
        return {model.inputs[0].get_any_name(): rng.standard_normal((1, 5, 32)).astype(np.float32)}
    ids = rng.integers(5, 200, (1, 24))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {p.get_any_name(): feeds[p.get_any_name()] for p in model.inputs}


def main(argv: list[str]) -> int:
    core = ov.Core()
    model = core.read_model(argv[0]) if argv else int8_matmul_model()
    feed = inputs_for(model)
    print(f"OpenVINO {ov.get_version()}; CPU default precision {core.get_property('CPU', 'INFERENCE_PRECISION_HINT')}")
    reference = core.compile_model(model, "CPU", {**REFERENCE, "CACHE_DIR": ""})(feed)[0]
    print(f"reference (f32, one stream): max |output| {float(np.abs(reference).max()):.4g}")
    wrong = False
    for name, properties in CONFIGURATIONS.items():
        compiled = core.compile_model(model, "CPU", {**properties, "CACHE_DIR": ""})
        diff = float(np.abs(compiled(feed)[0] - reference).max())
        wrong |= diff > WRONG
        print(f"{name:22s} streams {compiled.get_property('NUM_STREAMS')}, precision "
              f"{compiled.get_property('INFERENCE_PRECISION_HINT')}: max |output - reference| {diff:.4g}"
              f"{'  WRONG' if diff > WRONG else ''}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
