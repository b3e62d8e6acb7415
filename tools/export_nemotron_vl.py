"""Export nvidia/llama-nemotron-rerank-vl-1b-v2 (a vision-language cross-encoder: SigLIP vision encoder, pixel
shuffle, MLP projector, bidirectional Llama 3.2 1B, mean pooling, one-logit head) to the two OpenVINO IRs that
openvino-reranker serves.

Usage:
    python tools/export_nemotron_vl.py --model nvidia/llama-nemotron-rerank-vl-1b-v2 OUTPUT_DIR [--weight-format fp16]
    python tools/export_nemotron_vl.py --model /path/to/checkpoint OUTPUT_DIR [--weight-format fp32|fp16|int8]
        [--max-input-tiles N]

`--model`, `--revision` and `--weight-format` as in tools/export_nemotron.py (fp16 is the default; int8 is
weight-only INT8 through `nncf.compress_weights`, on both IRs). `--max-input-tiles N` sets how many tiles an image
is cut into at most (written into the exported config.json, which the server reads); the default is the
checkpoint's own `max_input_tiles` (2). Install as tools/export_nemotron.py says (torch first, from the CPU index).

The model, as its remote code (`modeling_llama_nemotron_vl.py`, `configuration_llama_nemotron_vl.py`,
`processing_llama_nemotron_vl.py`: LlamaNemotronVLForSequenceClassification, LlamaNemotronVLRerankProcessor), NeMo
AutoModel (`nemo_automodel/components/models/llama_nemotron_vl/`) and vLLM (`vllm/model_executor/models/
nemotron_vl.py`, `examples/pooling/score/template/nemotron-vl-rerank.jinja`) define it:
- config.json: `model_type: llama_nemotron_vl_rerank`, `vision_config` (`siglip_vision_model`), `llm_config` (a
  `llama_bidirec` Llama), `force_image_size`, `downsample_ratio` (0.5), `dynamic_image_size`, `use_thumbnail`,
  `max_input_tiles`, `img_context_token_id` (128258), `pooling` (`avg`), `temperature`, `prompt_template` (`v1`);
- weights: `model.vision_model.*` (transformers' SiglipVisionModel, no pooling head), `model.mlp1.{0,1,3}.*`
  (LayerNorm, Linear, GELU, Linear), `model.language_model.*` (LlamaModel: embed_tokens, layers, norm),
  `score.weight` (bias-free Linear to one logit);
- an image: tiles of `force_image_size` pixels on the grid whose aspect ratio fits best (at most `max_input_tiles`,
  plus a thumbnail when there is more than one), bicubic, x/255, (x - 0.5) / 0.5; SigLIP's last hidden state,
  pixel-shuffled (each 2x2 patches -> one token of 4x the width), through mlp1: (size/patch)^2/4 tokens per tile;
- the prompt: `<img>` + `<IMG_CONTEXT>` x tokens + `</img> question:{query} \\n \\n passage:{text}` for an image
  document (`question:{query} \\n \\n passage:{text}` for a text one), BOS added, padding on the left; the
  <IMG_CONTEXT> tokens' embeddings replaced by the image's; bidirectional attention under the padding mask, mean
  pooling over it, `score`, divided by `temperature`.
transformers' own SiglipVisionModel and LlamaModel are loaded with the weights (no trust_remote_code).

Two IRs, not one: the vision encoder runs once per distinct image (the server caches its output by the image's
digest and batches the images of concurrent requests), the language model once per (query, document) pair; one graph
would run the vision tower again for every query an image is paired with, and would need a static image count per
pair for the NPU. Writes into OUTPUT_DIR:
- `openvino_vision.xml` / `.bin`: input `pixel_values` (f32, [tiles, 3, size, size], tiles dynamic), output
  `image_embeds` (f32, [tiles, tokens per tile, hidden]);
- `openvino_model.xml` / `.bin`: inputs `input_ids`, `attention_mask` (i64, [batch, sequence]) and `image_embeds`
  (f32, [batch, sequence, hidden]: a row's image embeddings at its <IMG_CONTEXT> positions, anything elsewhere),
  output `logits` (f32, [batch, 1]);
- `tokenizer.json` (+ `tokenizer_config.json`, `special_tokens_map.json`), `config.json` (the checkpoint's, with
  `max_input_tiles` as chosen), `rerank_template.json`;
- `reference_scores.json`: torch's scores of text, image and image+text documents (the images are made-up pages,
  stored as PNG), prepared as the model's processor prepares them (its tiling and transform re-written below with
  Pillow and torch, no torchvision), one pair at a time, in f32 (the processor casts pixels to bf16; not here).
Once written, both IRs are compiled on the CPU (f32) and compared with torch; an fp32 export that differs by more than
1e-3 is removed again (exit 2).
"""

from __future__ import annotations

import argparse
import io
import json
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
    sigmoid,
    versions,
)

from openvino_reranker.referencescores import EXPORT_PAIRS, reference_scores_json, tolerance_for  # noqa: E402
from openvino_reranker.referencescores import FILE_NAME as REFERENCE_SCORES_FILE  # noqa: E402

MODEL_TYPE = "llama_nemotron_vl_rerank"
TEMPLATES = {"v1": "question:{query} \n \n passage:{document}"}  # prompt_template; any other: "{q} \n {d}"
PLAIN_TEMPLATE = "{query} \n {document}"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
# (query, text, (width, height, seed) of a made-up page or None): text, image-only and image+text documents; the
# page sizes give 1 tile (square), a 2x1 grid and a 1x2 grid with the thumbnail
IMAGE_PAIRS = (
    ("what does the chart show", "", (64, 64, 11)),
    ("what does the chart show", "", (200, 90, 12)),
    ("quarterly revenue table", "Revenue grew in the third quarter.", (90, 200, 13)),
    ("quarterly revenue table", "The museum is closed on Mondays.", (120, 120, 14)),
    ("scanned invoice total", "Invoice", (300, 60, 15)),
)
try:  # optional until used: the modules' classes need torch.nn.Module as their base
    import torch

    _TorchModule = torch.nn.Module
except ImportError:
    torch = None
    _TorchModule = object


# ------------------------------------------------------------------------------------------------ the checkpoint


def read_config(checkpoint: Path, max_input_tiles: int | None) -> dict:
    config = read_config_json(checkpoint)
    if config.get("model_type") != MODEL_TYPE:
        raise ExportError(f"{checkpoint}: model_type is {config.get('model_type')!r}; this script exports "
                          f"vision-language rerankers (model_type {MODEL_TYPE})")
    vision, llm = config.get("vision_config"), config.get("llm_config")
    if not isinstance(vision, dict) or vision.get("model_type") != "siglip_vision_model":
        raise ExportError(f"{checkpoint}: vision_config must be a siglip_vision_model")
    if not isinstance(llm, dict) or (llm.get("architectures") or [""])[0] not in (
            "LlamaBidirectionalModel", "LlamaBidirectionalForSequenceClassification"):
        raise ExportError(f"{checkpoint}: llm_config must be a LlamaBidirectionalModel")
    if config.get("pooling", "avg") != "avg":
        raise ExportError(f"{checkpoint}: pooling {config['pooling']!r} is not supported, only 'avg' (mean)")
    if config.get("select_layer", -1) != -1:
        raise ExportError(f"{checkpoint}: select_layer {config['select_layer']} is not supported, only -1")
    ratio = config.get("downsample_ratio", 0.5)
    if ratio != 0.5:
        raise ExportError(f"{checkpoint}: downsample_ratio {ratio} is not supported, only 0.5")
    if max_input_tiles is not None:
        config["max_input_tiles"] = max_input_tiles
    config.setdefault("max_input_tiles", 2)
    return config


def image_size(config: dict) -> int:
    return int(config.get("force_image_size") or config["vision_config"]["image_size"])


def tokens_per_tile(config: dict) -> int:
    return int((image_size(config) // config["vision_config"]["patch_size"]) ** 2 * 0.25)


def split_weights(weights: dict) -> tuple[dict, dict, dict, object]:
    """(SiglipVisionModel's state dict, mlp1's, LlamaModel's, score.weight) from the checkpoint's names. The vision
    tower is stored as SiglipVisionModel's own (`model.vision_model.vision_model.*`) or without its inner
    `vision_model.` (vLLM's weight mapper accepts both); both are taken."""
    vision, mlp1, llm, score = {}, {}, {}, weights.get("score.weight")
    for key, value in weights.items():
        if key.startswith("model.vision_model."):
            rest = key.removeprefix("model.vision_model.")
            vision[rest if rest.startswith("vision_model.") else f"vision_model.{rest}"] = value
        elif key.startswith("model.mlp1."):
            mlp1[key.removeprefix("model.mlp1.")] = value
        elif key.startswith("model.language_model."):
            llm[key.removeprefix("model.language_model.").removeprefix("model.")] = value
    if score is None or not vision or not mlp1 or not llm:
        raise ExportError("the checkpoint lacks model.vision_model.*, model.mlp1.*, model.language_model.* or "
                          "score.weight: is it llama-nemotron-rerank-vl?")
    llm = {k: v for k, v in llm.items() if not k.startswith("score.")}  # an inner head the outer model ignores
    return vision, mlp1, llm, score


# ------------------------------------------------------------------------------------------------ the modules


def build_modules(config: dict, weights: dict):
    """(VisionProjector, LanguageReranker): the two torch modules to convert, with the checkpoint's weights."""
    require("torch")
    require("transformers")
    from transformers import SiglipVisionConfig, SiglipVisionModel

    vision_weights, mlp1_weights, llm_weights, score = split_weights(weights)
    vision_config = {k: v for k, v in config["vision_config"].items() if k not in ("model_type", "architectures")}
    vision_config["vision_use_head"] = any(k.startswith("vision_model.head.") for k in vision_weights)
    siglip_config = SiglipVisionConfig(**vision_config)
    siglip_config._attn_implementation = "eager"
    siglip = SiglipVisionModel(siglip_config)
    missing, unexpected = siglip.load_state_dict(vision_weights, strict=False)
    if missing or unexpected:
        raise ExportError(f"the vision weights do not fit SiglipVisionModel: missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}")
    vit_hidden = siglip_config.hidden_size * 4
    llm_hidden = int(config["llm_config"]["hidden_size"])
    mlp1 = torch.nn.Sequential(torch.nn.LayerNorm(vit_hidden), torch.nn.Linear(vit_hidden, llm_hidden),
                               torch.nn.GELU(), torch.nn.Linear(llm_hidden, llm_hidden))
    try:
        mlp1.load_state_dict(mlp1_weights)
    except RuntimeError as exc:
        raise ExportError(f"the mlp1 weights do not fit LayerNorm, Linear, GELU, Linear: {exc}") from None
    decoder = bidirectional_llama(config["llm_config"], llm_weights)
    head = torch.nn.Linear(score.shape[1], score.shape[0], bias=False)
    head.weight.data.copy_(score)
    context_id = int(config.get("img_context_token_id", 128258))
    return (VisionProjector(siglip, mlp1).eval(),
            LanguageReranker(decoder, head, float(config.get("temperature", 1.0)), context_id).eval())


def pixel_shuffle(x, scale_factor: float = 0.5):
    """The remote code's pixel_shuffle (InternVL's, ps_version v2): [n, w, h, c] -> [n, w/2, h/2, 4c]."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    return x.permute(0, 2, 1, 3).contiguous()


class VisionProjector(_TorchModule):
    """extract_feature: SigLIP's last hidden state (no CLS token to drop), pixel shuffle, mlp1."""

    def __init__(self, siglip, mlp1):
        super().__init__()
        self.siglip, self.mlp1 = siglip, mlp1

    def forward(self, pixel_values):
        vit = self.siglip(pixel_values=pixel_values).last_hidden_state
        n, tokens, c = vit.shape
        side = int(tokens ** 0.5)
        vit = pixel_shuffle(vit.reshape(n, side, side, c))
        return self.mlp1(vit.reshape(n, -1, vit.shape[-1]))


class LanguageReranker(_TorchModule):
    """The language model's part: token embeddings with the image's at <IMG_CONTEXT> positions, the bidirectional
    Llama, mean pooling over the mask, the score head, the temperature."""

    def __init__(self, decoder, head, temperature: float, context_id: int):
        super().__init__()
        self.decoder, self.head, self.temperature, self.context_id = decoder, head, temperature, context_id

    def forward(self, input_ids, attention_mask, image_embeds):
        hidden = self.decoder.embed_tokens(input_ids)
        hidden = torch.where((input_ids == self.context_id)[..., None], image_embeds, hidden)
        keep = attention_mask.to(hidden.dtype)
        hidden = run_bidirectional(self.decoder, hidden, keep)
        pooled = (hidden * keep[..., None]).sum(dim=1) / keep.sum(dim=1, keepdim=True)
        return self.head(pooled) / self.temperature


# ------------------------------------------------------------------------------------------------ the processor


def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    """The processor's grid choice (processing_llama_nemotron_vl.py), as written there."""
    best_factor, best_ratio = float("-inf"), (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        area_ratio = (ratio[0] * ratio[1] * image_size * image_size) / area
        factor = min(area_ratio, 0.6) * min(target_aspect_ratio / aspect_ratio, aspect_ratio / target_aspect_ratio)
        if factor > best_factor:
            best_factor, best_ratio = factor, ratio
    return best_ratio


def dynamic_preprocess(image, min_num=1, max_num=6, image_size=448, use_thumbnail=False):
    """The processor's tiling, as written there: PIL's `resize` with its default filter (bicubic) and `crop`."""
    orig_width, orig_height = image.size
    target_ratios = set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                        if max_num >= i * j >= min_num)
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    ratio = find_closest_aspect_ratio(orig_width / orig_height, target_ratios, orig_width, orig_height, image_size)
    target_width, target_height = image_size * ratio[0], image_size * ratio[1]
    resized = image.resize((target_width, target_height))
    tiles = []
    for i in range(ratio[0] * ratio[1]):
        columns = target_width // image_size
        tiles.append(resized.crop(((i % columns) * image_size, (i // columns) * image_size,
                                   (i % columns + 1) * image_size, (i // columns + 1) * image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def processor_pixels(image_bytes: bytes, config: dict):
    """pixel_values [tiles, 3, size, size] as the processor makes them: tiles, then build_transform (RGB, a
    bicubic Resize to the tile size, which leaves a tile of that size as it is, ToTensor, Normalize 0.5/0.5)."""
    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(image_bytes))
    image.load()
    image = image.convert("RGB")
    size = image_size(config)
    if config.get("dynamic_image_size", True):
        tiles = dynamic_preprocess(image, image_size=size, max_num=int(config["max_input_tiles"]),
                                   use_thumbnail=bool(config.get("use_thumbnail", True)))
    else:
        tiles = [image]
    tiles = [tile if tile.size == (size, size) else tile.resize((size, size), Image.Resampling.BICUBIC)
             for tile in tiles]
    x = torch.stack([torch.from_numpy(np.asarray(t, dtype=np.uint8).copy()).permute(2, 0, 1) for t in tiles])
    return x.float().div(255).sub(0.5).div(0.5)


def prompt(query: str, document: str, tiles: int, config: dict) -> str:
    """The processor's prompt: the template filled, `<image> ` before it when there is an image, `<image>` then
    replaced by the image's tokens."""
    template = TEMPLATES.get(config.get("prompt_template"), PLAIN_TEMPLATE)
    text = template.format(query=query, document=document)
    if tiles:
        text = IMG_START + IMG_CONTEXT * (tokens_per_tile(config) * tiles) + IMG_END + " " + text
    return text


def made_up_page(width: int, height: int, seed: int) -> bytes:
    from openvino_reranker.vision import synthetic_page

    return synthetic_page(width, height, seed)


# ------------------------------------------------------------------------------------------------ conversion


def convert(vision_module, lm_module, config: dict, weight_format: str):
    ov = require("openvino")
    size = image_size(config)
    hidden = int(config["llm_config"]["hidden_size"])
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, size, size, generator=gen)
    ids, mask, embeds = check_batch(config, tokens_per_tile(config))
    with torch.no_grad():
        vision_ir = ov.convert_model(vision_module, example_input={"pixel_values": pixels},
                                     input=[("pixel_values", ov.PartialShape([-1, 3, size, size]), ov.Type.f32)])
        lm_ir = ov.convert_model(lm_module, example_input={"input_ids": ids, "attention_mask": mask,
                                                           "image_embeds": embeds},
                                 input=[("input_ids", ov.PartialShape([-1, -1]), ov.Type.i64),
                                        ("attention_mask", ov.PartialShape([-1, -1]), ov.Type.i64),
                                        ("image_embeds", ov.PartialShape([-1, -1, hidden]), ov.Type.f32)])
    vision_ir.inputs[0].get_tensor().set_names({"pixel_values"})
    vision_ir.outputs[0].get_tensor().set_names({"image_embeds"})
    for port, name in zip(lm_ir.inputs, ("input_ids", "attention_mask", "image_embeds"), strict=True):
        port.get_tensor().set_names({name})
    lm_ir.outputs[0].get_tensor().set_names({"logits"})
    if weight_format == "int8":
        nncf = require("nncf")
        vision_ir, lm_ir = nncf.compress_weights(vision_ir), nncf.compress_weights(lm_ir)
    return vision_ir, lm_ir


def check_batch(config: dict, tokens: int):
    """A left- and right-padded batch with image tokens in two rows, to trace with and to compare on."""
    gen = torch.Generator().manual_seed(1)
    vocab = int(config["llm_config"]["vocab_size"])
    hidden = int(config["llm_config"]["hidden_size"])
    ids = torch.randint(0, vocab, (3, 12 + tokens), generator=gen)
    ids[ids == int(config.get("img_context_token_id", 128258))] = 1
    context = int(config.get("img_context_token_id", 128258))
    ids[0, 2:2 + tokens] = context
    ids[2, 6:6 + tokens] = context
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, :5] = 0
    return ids, mask, torch.randn(3, ids.shape[1], hidden, generator=gen)


def compare(vision_module, lm_module, config: dict, vision_xml: Path, lm_xml: Path) -> float:
    """Largest |IR - torch| over the vision IR's embeddings of random tiles and the language IR's logits of the
    check batch, both compiled on the CPU at f32."""
    ov = require("openvino")
    core = ov.Core()
    size = image_size(config)
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    ids, mask, embeds = check_batch(config, tokens_per_tile(config))
    with torch.no_grad():
        want_vision = vision_module(pixels).numpy()
        want_logits = lm_module(ids, mask, embeds).numpy()
    got_vision = core.compile_model(str(vision_xml), "CPU", OV_F32)({"pixel_values": pixels.numpy()})[0]
    got_logits = core.compile_model(str(lm_xml), "CPU", OV_F32)(
        {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "image_embeds": embeds.numpy()})["logits"]
    return float(max(abs(got_vision - want_vision).max(), abs(got_logits - want_logits).max()))


def reference_pairs(config: dict) -> list[tuple[str, str, bytes | None]]:
    return [(q, d, None) for q, d in EXPORT_PAIRS] + \
        [(q, d, made_up_page(*page) if page else None) for q, d, page in IMAGE_PAIRS]


def score_pair(vision_module, lm_module, tokenizer, config: dict, query: str, document: str, image: bytes | None):
    """torch's logit of one pair (the processor's inputs, batch 1, unpadded) and those inputs."""
    pixels = processor_pixels(image, config) if image is not None else None
    text = prompt(query, document, 0 if pixels is None else len(pixels), config)
    ids = torch.tensor([tokenizer(text).input_ids])
    mask = torch.ones_like(ids)
    hidden = int(config["llm_config"]["hidden_size"])
    embeds = torch.zeros(1, ids.shape[1], hidden)
    with torch.no_grad():
        if pixels is not None:
            vit = vision_module(pixels).reshape(-1, hidden)
            where = (ids[0] == lm_module.context_id).nonzero()[:, 0]
            if len(where) != len(vit):
                raise ExportError(f"the tokenizer gave {len(where)} {IMG_CONTEXT} tokens for {len(vit)} image tokens")
            embeds[0, where] = vit
        logit = float(lm_module(ids, mask, embeds)[0, 0])
    return logit, pixels, ids, mask, embeds


def reference_scores(vision_module, lm_module, config: dict, checkpoint: Path, vision_xml: Path, lm_xml: Path):
    """torch's scores of the reference pairs, and the largest difference of the written IRs' f32 scores of the
    same inputs from them."""
    ov = require("openvino")
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(checkpoint))
    core = ov.Core()
    vision_ir = core.compile_model(str(vision_xml), "CPU", OV_F32)
    lm_ir = core.compile_model(str(lm_xml), "CPU", OV_F32)
    pairs, measured = [], 0.0
    for query, document, image in reference_pairs(config):
        logit, pixels, ids, mask, embeds = score_pair(vision_module, lm_module, tokenizer, config, query, document,
                                                      image)
        feed = embeds.numpy().copy()
        if pixels is not None:
            vit = vision_ir({"pixel_values": pixels.numpy()})[0].reshape(-1, feed.shape[-1])
            feed[0, (ids[0] == lm_module.context_id).numpy()] = vit
        ir_logit = float(lm_ir({"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                "image_embeds": feed})["logits"][0, 0])
        pairs.append((query, document, None, sigmoid(logit), image))
        measured = max(measured, abs(sigmoid(ir_logit) - sigmoid(logit)))
    return pairs, measured


def export(model: str, output: Path, weight_format: str, revision: str | None,
           max_input_tiles: int | None = None) -> float:
    for name in ("torch", "transformers", "openvino", "PIL", *(("nncf",) if weight_format == "int8" else ())):
        require(name)
    checkpoint = resolve_checkpoint(model, revision)
    config = read_config(checkpoint, max_input_tiles)
    if not (checkpoint / "tokenizer.json").is_file():
        raise ExportError(f"{checkpoint}: no tokenizer.json")
    vision_module, lm_module = build_modules(config, read_weights(checkpoint))
    vision_ir, lm_ir = convert(vision_module, lm_module, config, weight_format)
    try:
        output.mkdir(parents=True, exist_ok=True)
        vision_xml, lm_xml = output / "openvino_vision.xml", output / "openvino_model.xml"
        diff = save_checked([(vision_ir, vision_xml), (lm_ir, lm_xml)], weight_format,
                            lambda: compare(vision_module, lm_module, config, vision_xml, lm_xml))
        copy_tokenizer(checkpoint, output)
        (output / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        template = TEMPLATES.get(config.get("prompt_template"), PLAIN_TEMPLATE)
        (output / "rerank_template.json").write_text(
            json.dumps({"template": template, "add_special_tokens": True}, indent=2) + "\n", encoding="utf-8")
        pairs, measured = reference_scores(vision_module, lm_module, config, checkpoint, vision_xml, lm_xml)
        produced_by = {"tool": "tools/export_nemotron_vl.py", "model": model, "weight_format": weight_format,
                       "scores": "torch fp32 (the modules converted), the processor's tiling and prompt, one pair "
                                 "at a time, unpadded",
                       "max_input_tiles": config["max_input_tiles"],
                       "versions": versions("torch", "transformers", "openvino", "pillow"),
                       "ir": ["openvino_vision.xml", "openvino_model.xml"], "ir_f32_max_abs_diff": measured}
        (output / REFERENCE_SCORES_FILE).write_text(
            reference_scores_json(pairs, tolerance_for(measured), None, produced_by), encoding="utf-8")
    except OSError as exc:
        raise ExportError(f"{output}: cannot write ({exc.strerror or exc})") from None
    return diff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a vision-language reranker (llama-nemotron-rerank-vl) to "
                                                 "OpenVINO IRs for openvino-reranker.")
    parser.add_argument("--model", required=True, help="checkpoint directory or Hub id (org/name)")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    parser.add_argument("--weight-format", choices=("fp32", "fp16", "int8"), default="fp16")
    parser.add_argument("--max-input-tiles", type=int, default=None,
                        help="tiles an image is cut into at most (default: the checkpoint's max_input_tiles, 2)")
    parser.add_argument("output", type=Path, help="directory to write the IRs and their files into")
    args = parser.parse_args(argv)
    if args.max_input_tiles is not None and not 1 <= args.max_input_tiles <= 12:
        parser.error("--max-input-tiles must be 1..12")
    try:
        diff = export(args.model, args.output, args.weight_format, args.revision, args.max_input_tiles)
    except ExportError as exc:
        print(f"export_nemotron_vl: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({args.weight_format}); IRs vs torch on check inputs: max |diff| {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
