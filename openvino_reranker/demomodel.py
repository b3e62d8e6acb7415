"""The demo model: a tiny BERT cross-encoder with random INT8 weights and a WordPiece tokenizer, built in code with
OpenVINO's opset API, so that the service can be tried without any network (`openvino-reranker demo-model DIR`,
then `--model DIR`). Its weights are random: the service, the API and the errors behave as with a real model, but
the scores are meaningless. The tests serve the same model (tests/tinymodel.py adds an independent numpy forward
pass as their reference), and bench/bench.py writes real weights through the same builder.

The directory follows the layout `optimum-cli export openvino --task text-classification` writes:
`openvino_model.xml/.bin`, `tokenizer.json`, `config.json`; inputs `input_ids`, `attention_mask` and (optionally)
`token_type_ids`, all i64 `[?, ?]`; output `logits` `[?, num_labels]`. Weights are keyed by Hugging Face BERT names
(`encoder.layer.0.attention.self.query.weight`, ...). Every 2-D weight is stored as int8 with one scale per output row
(weight-only INT8: Constant(i8) -> Convert -> Multiply(scale)), the pattern NNCF's weight compression writes.
Only the runtime dependencies (openvino, tokenizers, numpy) are used.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EXIT_CONFIG, StartupError

LN_EPS = 1e-12
MASK_NEG = -10000.0  # BERT's additive attention-mask constant
DEMO_MODEL_NAME = "openvino-reranker-demo"  # config.json's _name_or_path: /readyz's "model"
DEMO_SEED = 0  # the tests' tiny model has the same seed and shape: the same weights, so tests/fixtures/smoke-tiny.json
DEMO_NOTE = ("openvino-reranker's demo model: a tiny BERT cross-encoder with random weights, built in code. Its scores "
             "are meaningless; it shows the service working, not ranking.")


@dataclass(frozen=True)
class BertShape:
    vocab_size: int
    hidden: int = 32
    layers: int = 2
    heads: int = 2
    intermediate: int = 64
    max_positions: int = 128
    type_vocab: int = 2
    num_labels: int = 1


# --------------------------------------------------------------------------------------------- weights


def random_weights(shape: BertShape, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random weights in HF BERT naming (classifier included)."""
    rng = np.random.default_rng(seed)
    h, i = shape.hidden, shape.intermediate

    def w(*dims, scale=0.5):
        return (rng.standard_normal(dims) * scale / math.sqrt(dims[-1])).astype(np.float32)

    def ln(prefix, out):
        out[prefix + ".weight"] = (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32)
        out[prefix + ".bias"] = (0.1 * rng.standard_normal(h)).astype(np.float32)

    out: dict[str, np.ndarray] = {
        "embeddings.word_embeddings.weight": w(shape.vocab_size, h, scale=4.0),
        "embeddings.position_embeddings.weight": w(shape.max_positions, h, scale=2.0),
        "embeddings.token_type_embeddings.weight": w(shape.type_vocab, h, scale=2.0),
    }
    ln("embeddings.LayerNorm", out)
    for n in range(shape.layers):
        p = f"encoder.layer.{n}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            out[p + name + ".weight"] = w(h, h, scale=2.0)
            out[p + name + ".bias"] = w(h, scale=0.5)
        ln(p + "attention.output.LayerNorm", out)
        out[p + "intermediate.dense.weight"] = w(i, h, scale=2.0)
        out[p + "intermediate.dense.bias"] = w(i, scale=0.5)
        out[p + "output.dense.weight"] = w(h, i, scale=2.0)
        out[p + "output.dense.bias"] = w(h, scale=0.5)
        ln(p + "output.LayerNorm", out)
    out["pooler.dense.weight"] = w(h, h, scale=2.0)
    out["pooler.dense.bias"] = w(h, scale=0.5)
    out["classifier.weight"] = w(shape.num_labels, h, scale=3.0)
    out["classifier.bias"] = w(shape.num_labels, scale=0.5)
    return out


def quantize_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row INT8: returns (int8 values, float32 scale of shape [rows, 1])."""
    scale = np.abs(weight).max(axis=1, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


# --------------------------------------------------------------------------------------------- OpenVINO graph


def build_ir(weights: dict[str, np.ndarray], shape: BertShape, with_token_types: bool = True, int8: bool = True):
    """An `ov.Model` computing BERT-for-sequence-classification logits from int8 weights (`int8=False`: the float32
    weights as given, an fp32 IR like `optimum-cli export openvino --weight-format fp32` writes)."""
    import openvino as ov
    import openvino.opset13 as ops

    def const(a):
        return ops.constant(np.array(a, order="C"))

    def int8_weight(name):
        if not int8:
            return const(weights[name].astype(np.float32))
        q, s = quantize_int8(weights[name])
        return ops.multiply(ops.convert(const(q), ov.Type.f32), const(s))

    def linear(x, prefix):
        y = ops.matmul(x, int8_weight(prefix + ".weight"), transpose_a=False, transpose_b=True)
        return ops.add(y, const(weights[prefix + ".bias"]))

    def layer_norm(x, prefix):
        y = ops.mvn(x, const(np.array([-1], np.int64)), True, LN_EPS, "inside_sqrt")
        return ops.add(ops.multiply(y, const(weights[prefix + ".weight"])), const(weights[prefix + ".bias"]))

    def embed(table_name, ids):
        return ops.gather(int8_weight(table_name), ids, const(np.array(0, np.int64)))

    ids = ops.parameter([-1, -1], ov.Type.i64, name="input_ids")
    mask = ops.parameter([-1, -1], ov.Type.i64, name="attention_mask")
    params = [ids, mask]
    x = embed("embeddings.word_embeddings.weight", ids)
    seq_len = ops.gather(ops.shape_of(ids), const(np.array([1], np.int64)), const(np.array(0, np.int64)))
    positions = ops.range(const(np.array(0, np.int64)), ops.squeeze(seq_len, const(np.array([0], np.int64))),
                          const(np.array(1, np.int64)), ov.Type.i64)
    x = ops.add(x, embed("embeddings.position_embeddings.weight", positions))
    if with_token_types:
        types = ops.parameter([-1, -1], ov.Type.i64, name="token_type_ids")
        params.append(types)
        x = ops.add(x, embed("embeddings.token_type_embeddings.weight", types))
    else:
        x = ops.add(x, ops.gather(int8_weight("embeddings.token_type_embeddings.weight"),
                                  const(np.array([0], np.int64)), const(np.array(0, np.int64))))
    x = layer_norm(x, "embeddings.LayerNorm")

    # additive mask [B, 1, 1, L]
    m = ops.convert(ops.unsqueeze(mask, const(np.array([1, 2], np.int64))), ov.Type.f32)
    add_mask = ops.multiply(ops.subtract(const(np.array(1.0, np.float32)), m), const(np.array(MASK_NEG, np.float32)))

    heads, head_dim = shape.heads, shape.hidden // shape.heads

    def split_heads(t):  # [B, L, H] -> [B, heads, L, d]
        t = ops.reshape(t, const(np.array([0, 0, heads, head_dim], np.int64)), special_zero=True)
        return ops.transpose(t, const(np.array([0, 2, 1, 3], np.int64)))

    for n in range(shape.layers):
        p = f"encoder.layer.{n}."
        q = split_heads(linear(x, p + "attention.self.query"))
        k = split_heads(linear(x, p + "attention.self.key"))
        v = split_heads(linear(x, p + "attention.self.value"))
        scores = ops.multiply(ops.matmul(q, k, False, True), const(np.array(1.0 / math.sqrt(head_dim), np.float32)))
        probs = ops.softmax(ops.add(scores, add_mask), -1)
        ctx = ops.transpose(ops.matmul(probs, v, False, False), const(np.array([0, 2, 1, 3], np.int64)))
        ctx = ops.reshape(ctx, const(np.array([0, 0, shape.hidden], np.int64)), special_zero=True)
        x = layer_norm(ops.add(linear(ctx, p + "attention.output.dense"), x), p + "attention.output.LayerNorm")
        inter = ops.gelu(linear(x, p + "intermediate.dense"), "erf")
        x = layer_norm(ops.add(linear(inter, p + "output.dense"), x), p + "output.LayerNorm")

    cls = ops.gather(x, const(np.array(0, np.int64)), const(np.array(1, np.int64)))  # [B, H]
    pooled = ops.tanh(linear(cls, "pooler.dense"))
    logits = linear(pooled, "classifier")
    logits.output(0).get_tensor().set_names({"logits"})
    return ov.Model([logits], params, "tiny-cross-encoder")


# --------------------------------------------------------------------------------------------- tokenizer + model dir

WORDS = (
    "the a of and to in is was for on with as by at from that this it are be or an which were has have not but "
    "who their its also had been one two three new first after more other into can used all would may time when "
    "city river music film water energy system data model search query document rank score light solar wind power "
    "paris france capital tower museum art history war king queen ocean fish ship train car road bridge mountain "
    "snow rain cloud sun moon star planet earth space rocket engine computer program code python network server "
    "cat dog bird horse farm food bread cheese wine coffee tea sugar salt health doctor disease cell protein gene "
    "school student teacher book library language word sentence translation how what why where does do much many "
    "boil temperature degrees celsius fahrenheit sea level pressure tallest highest largest small big fast slow"
).split()


def build_tokenizer(words=WORDS):
    """A lowercasing WordPiece tokenizer with BERT's pair template ([CLS] a [SEP] b [SEP], type ids 0/1)."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = sorted({c for w in words for c in w} | set("0123456789.,?!'-"))
    vocab_list = specials + sorted(set(words)) + chars + ["##" + c for c in chars]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece()
    return tok


def write_model_dir(out_dir, weights, shape: BertShape, tokenizer, with_token_types=True, name="tiny-cross-encoder",
                    int8: bool = True):
    """Write an optimum-style model directory: openvino_model.xml/.bin, tokenizer.json, config.json (`int8`: see
    `build_ir`)."""
    import openvino as ov

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ov.save_model(build_ir(weights, shape, with_token_types, int8), str(out / "openvino_model.xml"),
                  compress_to_fp16=False)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "_name_or_path": name, "architectures": ["BertForSequenceClassification"], "model_type": "bert",
        "hidden_size": shape.hidden, "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
        "intermediate_size": shape.intermediate, "max_position_embeddings": shape.max_positions,
        "type_vocab_size": shape.type_vocab, "vocab_size": shape.vocab_size,
        "id2label": {str(i): f"LABEL_{i}" for i in range(shape.num_labels)},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


# --------------------------------------------------------------------------------------------- the demo model


def demo_shape(tokenizer) -> BertShape:
    """The demo model's shape: 2 layers of 32, one logit, 128 positions (about 100 kB of weights)."""
    return BertShape(vocab_size=tokenizer.get_vocab_size())


def holds_demo_model(directory: Path) -> bool:
    """True when `directory` holds a demo model written earlier (its config.json names DEMO_MODEL_NAME)."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("_name_or_path") == DEMO_MODEL_NAME


def write_demo_model(out_dir: str) -> Path:
    """Build the demo model into `out_dir` (a new or empty directory, or an earlier demo model, which is rewritten)
    and return its path. Needs no network: the weights are seeded random numbers, the vocabulary a word list."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise StartupError(f"{out_dir} exists and is not a directory: name a new directory for the demo model",
                           EXIT_CONFIG)
    if out.is_dir() and any(out.iterdir()) and not holds_demo_model(out):
        raise StartupError(f"{out_dir} is not empty: name a new or empty directory for the demo model", EXIT_CONFIG)
    tokenizer = build_tokenizer()
    shape = demo_shape(tokenizer)
    try:
        write_model_dir(out, random_weights(shape, DEMO_SEED), shape, tokenizer, name=DEMO_MODEL_NAME)
        (out / "README.md").write_text(f"# {DEMO_MODEL_NAME}\n\n{DEMO_NOTE}\n", encoding="utf-8")
    except OSError as exc:
        raise StartupError(f"cannot write the demo model to {out_dir}: {exc.strerror or exc}", EXIT_CONFIG) from None
    return out
