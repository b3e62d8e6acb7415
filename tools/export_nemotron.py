"""Export nvidia/llama-nemotron-rerank-1b-v2 (a bidirectional Llama cross-encoder) to an OpenVINO IR that
openvino-reranker serves.

Usage:
    python tools/export_nemotron.py --model nvidia/llama-nemotron-rerank-1b-v2 OUTPUT_DIR [--weight-format fp16]
    python tools/export_nemotron.py --model /path/to/checkpoint OUTPUT_DIR [--weight-format fp32|fp16|int8]

`--model` is a local checkpoint directory or a Hugging Face Hub id (`org/name`, with `--revision`); a Hub id is
fetched with `huggingface_hub` (`HF_TOKEN`, `HF_ENDPOINT` and `HF_HUB_OFFLINE` apply). `--weight-format`: `fp32`,
`fp16` (weights stored as FP16, the default), or `int8` (weight-only INT8 through `nncf.compress_weights`).

Install, in an environment of its own (the service itself never imports torch). torch comes FIRST and from the
CPU index: an unpinned or plain `pip install torch` pulls a multi-GB CUDA build:
    python3 -m venv ~/.venvs/ov-export
    ~/.venvs/ov-export/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    ~/.venvs/ov-export/bin/pip install '.[export]'      # in this repository: transformers, safetensors, nncf, ...

Why a script: optimum-cli cannot export this model (its architecture is custom, defined by remote code). The
model, as its remote code (`llama_bidirectional_model.py`: LlamaBidirectionalModel and
LlamaBidirectionalForSequenceClassification) and vLLM's support for it define it:
- config.json: `model_type: llama_bidirec`, the Llama 3.2 1B fields, `pooling: "avg"`, `temperature` (1.0);
- weights: a standard Llama decoder stack (`model.embed_tokens`, `model.layers.N.*`, `model.norm`) plus
  `score.weight`, a bias-free Linear from the hidden size to one logit;
- attention is bidirectional: every layer's causal mask is replaced by the padding mask alone;
- the last hidden state is mean-pooled over the attention mask, scored, and divided by `temperature`;
- the prompt is `question:{query} \\n \\n passage:{passage}`, tokenized with the Llama 3 tokenizer's defaults
  (BOS added), padding on the left, truncation cutting the end (the passage's end).
This script loads the weights into transformers' own LlamaModel (no trust_remote_code: that code does not run on
transformers 5), wraps it in a module that builds the bidirectional mask from `attention_mask`, runs the layers,
mean-pools and applies the score head, and converts it with `openvino.convert_model`.

Writes into OUTPUT_DIR:
- `openvino_model.xml` / `.bin`: inputs `input_ids`, `attention_mask` (i64, [batch, sequence], both dynamic),
  output `logits` (f32, [batch, 1]); padding may be on either side and with any id, the mask decides;
- `tokenizer.json` (+ `tokenizer_config.json`, `special_tokens_map.json` when the checkpoint has them), copied;
- `config.json`, the checkpoint's own (`model_type` `llama_bidirec`);
- `rerank_template.json`: `{"template": "question:{query} \\n \\n passage:{document}", "add_special_tokens": true}`;
- `reference_scores.json`: the torch module's scores (sigmoid of the logit) of a fixed set of short public pairs,
  written through the template and tokenized with the checkpoint's tokenizer, one pair at a time, with the
  tolerance the IR was made for (1.25 x its measured difference from them at f32, rounded up, at least 1e-4): the
  server checks them at startup (SPEC.md, "Reference scores").
Once written, the IR is compiled on the CPU (f32) and compared with the torch module on a padded batch; an fp32 IR
that differs by more than 1e-3 is removed again (exit 2).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/exportlib.py

from exportlib import (  # noqa: E402
    OV_F32,
    ExportError,
    bidirectional_llama,
    copy_tokenizer,
    read_config_json,
    read_weights,
    require,
    resolve_checkpoint,
    run_bidirectional,
    save_checked,
    versions,
)
from exportlib import sigmoid as _sigmoid  # noqa: E402

from openvino_reranker.referencescores import EXPORT_PAIRS, reference_scores_json, tolerance_for  # noqa: E402
from openvino_reranker.referencescores import FILE_NAME as REFERENCE_SCORES_FILE  # noqa: E402

TEMPLATE = {"template": "question:{query} \n \n passage:{document}", "add_special_tokens": True}
try:  # optional until used: the module's class needs torch.nn.Module as its base
    import torch

    _TorchModule = torch.nn.Module
except ImportError:
    torch = None
    _TorchModule = object

def read_config(checkpoint: Path) -> dict:
    config = read_config_json(checkpoint)
    if config.get("model_type") not in ("llama_bidirec", "llama"):
        raise ExportError(f"{checkpoint}: model_type is {config.get('model_type')!r}; this script exports "
                          "bidirectional Llama rerankers (model_type llama_bidirec)")
    if config.get("pooling", "avg") != "avg":
        raise ExportError(f"{checkpoint}: pooling {config['pooling']!r} is not supported, only 'avg' (mean)")
    return config


# ------------------------------------------------------------------------------------------------ the module


def build_reranker(config: dict, weights: dict):
    """The torch module to convert: LlamaModel's weights and layers, a bidirectional padding mask, mean pooling,
    the score head and the temperature."""
    if "score.weight" not in weights:
        raise ExportError("the checkpoint has no score.weight (the classification head): is it the reranker?")
    body = {key.removeprefix("model."): value for key, value in weights.items() if key != "score.weight"}
    decoder = bidirectional_llama(config, body)
    score = weights["score.weight"]
    head = torch.nn.Linear(score.shape[1], score.shape[0], bias=False)
    head.weight.data.copy_(score)
    return BidirectionalMeanPoolReranker(decoder, head, float(config.get("temperature", 1.0))).eval()


class BidirectionalMeanPoolReranker(_TorchModule):
    """LlamaModel's embedding, layers and norm under a bidirectional padding mask, mean pooling over the mask, the
    score head, divided by the temperature: the reranker's forward pass, traceable by openvino.convert_model."""

    def __init__(self, decoder, head, temperature: float):
        super().__init__()
        self.decoder, self.head, self.temperature = decoder, head, temperature
        for layer in decoder.layers:
            layer.self_attn.is_causal = False

    def forward(self, input_ids, attention_mask):
        hidden = self.decoder.embed_tokens(input_ids)
        keep = attention_mask.to(hidden.dtype)
        hidden = run_bidirectional(self.decoder, hidden, keep)
        pooled = (hidden * keep[..., None]).sum(dim=1) / keep.sum(dim=1, keepdim=True)
        return self.head(pooled) / self.temperature


# ------------------------------------------------------------------------------------------------ conversion


def check_batch(vocab_size: int):
    """A right- and left-padded batch to trace with and to compare torch and OpenVINO on."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, :5] = 0
    return ids, mask


def convert(module, vocab_size: int, weight_format: str):
    ov = require("openvino")
    ids, mask = check_batch(vocab_size)
    dynamic = ov.PartialShape([-1, -1])
    with torch.no_grad():
        ov_model = ov.convert_model(module, example_input={"input_ids": ids, "attention_mask": mask},
                                    input=[("input_ids", dynamic, ov.Type.i64),
                                           ("attention_mask", dynamic, ov.Type.i64)])
    for port, name in zip(ov_model.inputs, ("input_ids", "attention_mask"), strict=True):
        port.get_tensor().set_names({name})
    ov_model.outputs[0].get_tensor().set_names({"logits"})
    if weight_format == "int8":
        ov_model = require("nncf").compress_weights(ov_model)
    return ov_model


def compare(module, xml: Path, vocab_size: int) -> float:
    """Largest |IR - torch| logit on the check batch, the written IR compiled on the CPU at f32."""
    ov = require("openvino")
    ids, mask = check_batch(vocab_size)
    with torch.no_grad():
        expected = module(ids, mask).numpy()
    compiled = ov.Core().compile_model(str(xml), "CPU", OV_F32)
    got = compiled({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})["logits"]
    return float(abs(got - expected).max())


def reference_scores(module, checkpoint: Path, xml: Path) -> tuple[list[tuple[str, str, None, float]], float]:
    """The torch module's scores of EXPORT_PAIRS (the template filled, the checkpoint's tokenizer with its special
    tokens, one pair at a time, unpadded), and the largest difference of the written IR's f32 scores from them."""
    ov = require("openvino")
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(checkpoint))
    compiled = ov.Core().compile_model(str(xml), "CPU", OV_F32)
    pairs, measured = [], 0.0
    for query, document in EXPORT_PAIRS:
        text = TEMPLATE["template"].format(query=query, document=document)
        ids = torch.tensor([tokenizer(text, add_special_tokens=TEMPLATE["add_special_tokens"]).input_ids])
        mask = torch.ones_like(ids)
        with torch.no_grad():
            score = _sigmoid(float(module(ids, mask)[0, 0]))
        ir_score = _sigmoid(float(compiled({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})["logits"][0, 0]))
        pairs.append((query, document, None, score))
        measured = max(measured, abs(ir_score - score))
    return pairs, measured


def write_reference_scores(output: Path, model: str, weight_format: str, pairs, measured: float) -> None:
    produced_by = {"tool": "tools/export_nemotron.py", "model": model, "weight_format": weight_format,
                   "scores": "torch fp32 (the module converted), one pair at a time, unpadded",
                   "versions": versions("torch", "transformers", "openvino"), "ir": "openvino_model.xml",
                   "ir_f32_max_abs_diff": measured}
    (output / REFERENCE_SCORES_FILE).write_text(reference_scores_json(pairs, tolerance_for(measured), None,
                                                                      produced_by), encoding="utf-8")


def export(model: str, output: Path, weight_format: str, revision: str | None) -> float:
    for name in ("torch", "transformers", "openvino", *(("nncf",) if weight_format == "int8" else ())):
        require(name)
    checkpoint = resolve_checkpoint(model, revision)
    config = read_config(checkpoint)
    if not (checkpoint / "tokenizer.json").is_file():
        raise ExportError(f"{checkpoint}: no tokenizer.json")
    module = build_reranker(config, read_weights(checkpoint))
    vocab_size = module.decoder.embed_tokens.num_embeddings
    ov_model = convert(module, vocab_size, weight_format)
    try:
        output.mkdir(parents=True, exist_ok=True)
        xml = output / "openvino_model.xml"
        diff = save_checked([(ov_model, xml)], weight_format, lambda: compare(module, xml, vocab_size))
        copy_tokenizer(checkpoint, output)
        shutil.copyfile(checkpoint / "config.json", output / "config.json")
        (output / "rerank_template.json").write_text(json.dumps(TEMPLATE, indent=2) + "\n", encoding="utf-8")
        write_reference_scores(output, model, weight_format, *reference_scores(module, checkpoint, xml))
    except OSError as exc:
        raise ExportError(f"{output}: cannot write ({exc.strerror or exc})") from None
    return diff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a bidirectional Llama reranker (llama-nemotron-rerank) "
                                                 "to an OpenVINO IR for openvino-reranker.")
    parser.add_argument("--model", required=True, help="checkpoint directory or Hub id (org/name)")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    parser.add_argument("--weight-format", choices=("fp32", "fp16", "int8"), default="fp16")
    parser.add_argument("output", type=Path, help="directory to write the IR and its files into")
    args = parser.parse_args(argv)
    try:
        diff = export(args.model, args.output, args.weight_format, args.revision)
    except ExportError as exc:
        print(f"export_nemotron: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({args.weight_format}); IR vs torch on a padded check batch: max |diff| {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
