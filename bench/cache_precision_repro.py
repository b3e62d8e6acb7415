"""OpenVINO CPU model cache: a compile with another INFERENCE_PRECISION_HINT loads the blob of an earlier compile.

Standalone (openvino and numpy only); written so that it can be filed upstream as is.

Summary: with CACHE_DIR set, compiling the same model on the CPU first without INFERENCE_PRECISION_HINT (bf16 by
default on CPUs with AMX or AVX512-BF16) and then with INFERENCE_PRECISION_HINT=f32 (or the other way round) loads
the first compile's blob for the second: LOADED_FROM_CACHE is true and the cache directory holds one blob. The hint
is not part of the cache key. For a graph that the CPU plugin transforms differently per precision, the second
compile then computes something other than what it was asked for:
- the default after f32: the outputs are NaN, for the small ScaledDotProductAttention model this script builds and
  for a tiny random Qwen3 reranker IR (optimum-cli export); in a serving process on that IR it crashed with SIGSEGV
  in 3 of 4 runs;
- f32 after the default: on the Qwen3 IR the outputs differ from an uncached f32 compile (by 8e-3 to 1.3e-2 on the
  logits, depending on the inputs; up to 2e-3 on sigmoid scores) while the compiled model reports
  INFERENCE_PRECISION_HINT f32. The model built here returns the right outputs in this order, as do small graphs of
  MatMuls, RMS norms or RoPE alone: they load the other blob too, but apparently recompute it at the precision asked.

Found with: OpenVINO 2026.4.1-22982-e213a147257-releases/2026/4 (pip wheel), numpy 2.4.6, Python 3.11.7, Linux x86_64;
CPU "Intel(R) Xeon(R) Processor" (2 vCPUs) with amx_bf16, amx_int8, amx_tile, avx512_bf16, avx512_fp16;
core.get_property("CPU", "INFERENCE_PRECISION_HINT") = bf16, OPTIMIZATION_CAPABILITIES = BF16, WINOGRAD, FP32, FP16,
INT8, BIN, EXPORT_IMPORT.

Steps (each compile in a new ov.Core(); run this script to do them):
1. compile M on "CPU" with {CACHE_DIR: D}; infer X
2. compile M on "CPU" with {CACHE_DIR: D, INFERENCE_PRECISION_HINT: f32}; infer X
3. compile M on "CPU" with {INFERENCE_PRECISION_HINT: f32} (no cache); infer X
then the same with the two configurations swapped (f32 first, then no hint; compared with an uncached default).

Expected: step 2 does not load step 1's blob (LOADED_FROM_CACHE false, a second blob in D), or at least returns
what step 3 returns.
Actual: step 2 has LOADED_FROM_CACHE true, D holds one blob, and its outputs differ from step 3's (NaN in the
swapped order).

On a CPU whose default precision is f32 (no AMX or AVX512-BF16) both configurations are the same f32 compile, so
reusing the blob is harmless and this script reports nothing wrong: the bug cannot be seen there.

Usage: python bench/cache_precision_repro.py [IR.xml]   (default: a small model with ScaledDotProductAttention
built here; tests/fixtures/models/tiny-qwen3/openvino_model.xml in this repository shows the f32-after-default order
too). Exits 1 when a compile returned outputs other than an uncached compile of its own properties, else 0.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import openvino as ov
import openvino.opset13 as ops

F32 = {"INFERENCE_PRECISION_HINT": "f32"}
ORDERS = {"f32 after default": ({}, F32), "default after f32": (F32, {})}
HIDDEN, HEADS, BATCH, TOKENS = 64, 4, 4, 40


def attention_model() -> ov.Model:
    """x [batch, tokens, 64] -> one causal self-attention block (ScaledDotProductAttention) -> mean -> [batch, 1]."""
    rng = np.random.default_rng(0)

    def weight(*shape):
        return ops.constant((rng.standard_normal(shape) * 0.125).astype(np.float32))

    def heads(t):  # [b, s, 64] -> [b, 4, s, 16]
        return ops.transpose(ops.reshape(t, [0, 0, HEADS, HIDDEN // HEADS], True), [0, 2, 1, 3])

    x = ops.parameter([-1, -1, HIDDEN], ov.Type.f32, name="x")
    q, k, v = (heads(ops.matmul(x, weight(HIDDEN, HIDDEN), False, False)) for _ in range(3))
    attended = ops.scaled_dot_product_attention(q, k, v, causal=True)
    merged = ops.reshape(ops.transpose(attended, [0, 2, 1, 3]), [0, 0, HIDDEN], True)
    h = ops.add(x, ops.matmul(merged, weight(HIDDEN, HIDDEN), False, False))
    return ov.Model([ops.matmul(ops.reduce_mean(h, [1], False), weight(HIDDEN, 1), False, False)], [x], "attention")


def inputs_for(model: ov.Model) -> dict:
    """Fixed inputs: dynamic dimensions become BATCH then TOKENS; an integer input named like a mask is all ones,
    other integer inputs are ids in [1, 100); float inputs are standard normal."""
    rng = np.random.default_rng(1)
    feed = {}
    for port in model.inputs:
        dims = [d.get_length() if d.is_static else (BATCH if i == 0 else TOKENS)
                for i, d in enumerate(port.get_partial_shape())]
        name, dtype = port.get_any_name(), port.get_element_type().to_dtype()
        if np.issubdtype(dtype, np.integer):
            feed[name] = np.ones(dims, dtype) if "mask" in name else rng.integers(1, 100, dims).astype(dtype)
        else:
            feed[name] = rng.standard_normal(dims).astype(dtype)
    return feed


def run_order(order: str, ir_path: str | None) -> dict:
    """One order's three compiles; what each returned."""
    first, second = ORDERS[order]
    model = ov.Core().read_model(ir_path) if ir_path else attention_model()
    feed = inputs_for(model)
    cache_dir = tempfile.mkdtemp(prefix="ov-cache-")

    def compile_and_infer(properties):
        compiled = ov.Core().compile_model(model, "CPU", properties)
        output = compiled.create_infer_request().infer(feed)[0].copy()
        return output, bool(compiled.get_property("LOADED_FROM_CACHE")), \
            compiled.get_property("INFERENCE_PRECISION_HINT").to_string()

    try:
        compile_and_infer({"CACHE_DIR": cache_dir, **first})
        cached, loaded, precision = compile_and_infer({"CACHE_DIR": cache_dir, **second})
        blobs = len(os.listdir(cache_dir))
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    uncached, _, _ = compile_and_infer(dict(second))
    nan = bool(np.isnan(cached).any())
    return {"loaded_from_cache": loaded, "reported_precision": precision, "blobs": blobs, "nan": nan,
            "max_abs_diff": None if nan else float(np.abs(cached - uncached).max())}


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512_fp16")))
    return f"{model}; {', '.join(wanted) or 'no AMX / AVX512-BF16 / AVX512-FP16 flags'}"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--order"]:  # the child process of one order
        print(json.dumps(run_order(argv[1], argv[2] if len(argv) > 2 else None)))
        return 0
    ir_path = argv[0] if argv else None
    core = ov.Core()
    default_precision = core.get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
    print(f"OpenVINO {ov.get_version()}, numpy {np.__version__}, Python {platform.python_version()}, "
          f"{platform.system()} {platform.machine()}")
    print(f"CPU: {cpu_flags()}")
    print(f"CPU default INFERENCE_PRECISION_HINT: {default_precision}; OPTIMIZATION_CAPABILITIES: "
          f"{', '.join(core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES'))}")
    print(f"model: {ir_path or 'built here (one ScaledDotProductAttention block)'}\n")
    wrong = False
    for order in ORDERS:
        # a child process per order: the wrong blob can crash the process that loads it
        child = subprocess.run([sys.executable, __file__, "--order", order, *([ir_path] if ir_path else [])],
                               capture_output=True, text=True)
        if child.returncode != 0:
            wrong = True
            print(f"{order}: the process died (exit status {child.returncode}): {child.stderr.strip()[-300:]}")
            continue
        found = json.loads(child.stdout.strip().splitlines()[-1])
        outputs = "NaN" if found["nan"] else f"max |difference| {found['max_abs_diff']:.3g}"
        print(f"{order}: second compile LOADED_FROM_CACHE={found['loaded_from_cache']} (reports "
              f"INFERENCE_PRECISION_HINT {found['reported_precision']}), {found['blobs']} blob(s) in the cache dir; "
              f"outputs against an uncached compile of the same properties: {outputs}")
        wrong = wrong or found["nan"] or found["max_abs_diff"] > 1e-6
    if default_precision == "f32":
        print("\nThis CPU computes in f32 by default: both configurations are the same compile here, so a reused blob "
              "is harmless and the bug cannot show. Run it on a CPU with AMX or AVX512-BF16.")
    print("\nBUG REPRODUCED: a compile returned outputs of another configuration's blob" if wrong else
          "\nnot reproduced: every compile returned what an uncached compile of its properties returns")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
