"""The tests' tiny model (the package's demo model, `openvino_reranker.demomodel`) and an independent numpy forward
pass: the reference the served scores are checked against.

The graph, the weights and the tokenizer are built by `openvino_reranker.demomodel` (the same builder that
`openvino-reranker demo-model DIR` runs, and that bench/bench.py uses with real all-MiniLM-L6-v2 weights). Every 2-D
weight is int8 with one scale per output row; `numpy_forward` recomputes the logits in float64 from the same
dequantized weights, without OpenVINO.

Run `python tests/tinymodel.py OUT_DIR` to write the tiny test model to OUT_DIR (CI's smoke run uses it).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: the package of this checkout

from openvino_reranker.demomodel import (  # noqa: E402  (re-exported: the tests and bench/bench.py use them from here)
    LN_EPS,
    MASK_NEG,
    WORDS,
    BertShape,
    build_ir,
    build_tokenizer,
    quantize_int8,
    random_weights,
    write_model_dir,
)

__all__ = ["BertShape", "WORDS", "build_ir", "build_tokenizer", "dequantized", "make_tiny_model", "numpy_forward",
           "quantize_int8", "random_weights", "write_model_dir"]


# --------------------------------------------------------------------------------------------- numpy reference


def dequantized(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The float weights the INT8 IR really computes with (2-D weights pass through quantize_int8)."""
    out = {}
    for k, v in weights.items():
        if v.ndim == 2:
            q, s = quantize_int8(v)
            out[k] = q.astype(np.float32) * s
        else:
            out[k] = v
    return out


def _layer_norm(x, w, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + LN_EPS) * w + b


def _gelu(x):
    from math import erf

    return 0.5 * x * (1.0 + np.vectorize(erf)(x / math.sqrt(2.0)))


def numpy_forward(weights: dict[str, np.ndarray], shape: BertShape, input_ids, attention_mask, token_type_ids=None):
    """Reference logits in float64 for one unpadded or padded batch, computed from the dequantized weights."""
    wt = {k: v.astype(np.float64) for k, v in dequantized(weights).items()}
    ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask, dtype=np.float64)
    types = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids)
    b, length = ids.shape
    x = (wt["embeddings.word_embeddings.weight"][ids] + wt["embeddings.position_embeddings.weight"][np.arange(length)]
         + wt["embeddings.token_type_embeddings.weight"][types])
    x = _layer_norm(x, wt["embeddings.LayerNorm.weight"], wt["embeddings.LayerNorm.bias"])
    add_mask = (1.0 - mask)[:, None, None, :] * MASK_NEG
    hd = shape.hidden // shape.heads

    def lin(t, p):
        return t @ wt[p + ".weight"].T + wt[p + ".bias"]

    def split(t):
        return t.reshape(b, length, shape.heads, hd).transpose(0, 2, 1, 3)

    for n in range(shape.layers):
        p = f"encoder.layer.{n}."
        q, k, v = (split(lin(x, p + "attention.self." + s)) for s in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd) + add_mask
        s = np.exp(s - s.max(-1, keepdims=True))
        ctx = (s / s.sum(-1, keepdims=True)) @ v
        ctx = ctx.transpose(0, 2, 1, 3).reshape(b, length, shape.hidden)
        x = _layer_norm(lin(ctx, p + "attention.output.dense") + x,
                        wt[p + "attention.output.LayerNorm.weight"], wt[p + "attention.output.LayerNorm.bias"])
        x = _layer_norm(lin(_gelu(lin(x, p + "intermediate.dense")), p + "output.dense") + x,
                        wt[p + "output.LayerNorm.weight"], wt[p + "output.LayerNorm.bias"])
    pooled = np.tanh(lin(x[:, 0], "pooler.dense"))
    return lin(pooled, "classifier")


def make_tiny_model(out_dir, num_labels=1, with_token_types=True, seed=0, max_positions=128):
    """The test model: returns (model_dir, weights, shape, tokenizer)."""
    tokenizer = build_tokenizer()
    shape = BertShape(vocab_size=tokenizer.get_vocab_size(), num_labels=num_labels, max_positions=max_positions)
    weights = random_weights(shape, seed)
    path = write_model_dir(out_dir, weights, shape, tokenizer, with_token_types)
    return path, weights, shape, tokenizer


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/tinymodel.py OUT_DIR")
    print(make_tiny_model(sys.argv[1])[0])
