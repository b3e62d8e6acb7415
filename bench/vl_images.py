"""Image-document pairs per second of the vision-language reranker, in-process (startup's own build_reranker: both
IRs compiled, then Reranker.score_pairs), on the CPU.

    # a stand-in checkpoint of the real model's layout with random weights, exported (the torch environment of
    # tests/fixtures/models/generate.py; the stand-in's dimensions are STANDIN below)
    ~/.venvs/fixtures/bin/python bench/vl_images.py --make-standin /tmp/vl-standin
    # the measurement (the service's environment)
    python bench/vl_images.py --model-dir /tmp/vl-standin [--requests 8] [--documents 10] [--clients 2]

Each request pairs one query with `documents` image documents (made-up pages of about A4's aspect ratio, each
distinct, so that every image is decoded, tiled and encoded: the embedding cache never hits), `clients` requests at
a time. Reports pairs/s and the share of wall time the vision encoder took. Not CI.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# the stand-in: SigLIP 224 px tiles of 14 px patches (64 image tokens a tile after the pixel shuffle), width 256,
# 4 layers; a Llama of width 256, 4 layers; up to 2 tiles + thumbnail = 192 image tokens an image
STANDIN = {"image_size": 224, "patch_size": 14, "vision_hidden": 256, "vision_layers": 4, "vision_heads": 4,
           "llm_hidden": 256, "llm_layers": 4, "llm_heads": 8, "llm_kv_heads": 4, "llm_intermediate": 1024}


def make_standin(out: Path) -> None:
    import subprocess
    import tempfile

    sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "models"))
    import generate as g
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaModel, SiglipVisionConfig, SiglipVisionModel

    g.seeded(5)
    tok = g.vl_tokenizer()
    shape = g.llama_shape(len(tok), tok.convert_tokens_to_ids("<|finetune_right_pad_id|>"), tok.bos_token_id,
                          tok.eos_token_id, max_position_embeddings=131072, rope_scaling=dict(g.LLAMA3_ROPE),
                          rms_norm_eps=1e-5, hidden_act="silu", attention_bias=False, mlp_bias=False)
    s = STANDIN
    shape.update(hidden_size=s["llm_hidden"], num_hidden_layers=s["llm_layers"], num_attention_heads=s["llm_heads"],
                 num_key_value_heads=s["llm_kv_heads"], head_dim=s["llm_hidden"] // s["llm_heads"],
                 intermediate_size=s["llm_intermediate"], initializer_range=0.02)
    llm = LlamaModel(LlamaConfig(**shape))
    vision = SiglipVisionConfig(hidden_size=s["vision_hidden"], intermediate_size=4 * s["vision_hidden"],
                                num_hidden_layers=s["vision_layers"], num_attention_heads=s["vision_heads"],
                                image_size=s["image_size"], patch_size=s["patch_size"], vision_use_head=False)
    siglip = SiglipVisionModel(vision)
    width = 4 * s["vision_hidden"]
    mlp1 = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, s["llm_hidden"]), torch.nn.GELU(),
                               torch.nn.Linear(s["llm_hidden"], s["llm_hidden"]))
    weights = {f"model.vision_model.{k}": v for k, v in siglip.state_dict().items()}
    weights.update({f"model.mlp1.{k}": v for k, v in mlp1.state_dict().items()})
    weights.update({f"model.language_model.{k}": v for k, v in llm.state_dict().items()})
    weights["score.weight"] = torch.randn(1, s["llm_hidden"])
    with tempfile.TemporaryDirectory() as work:
        checkpoint = Path(work)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(checkpoint / "model.safetensors"))
        vision_json = {**{k: v for k, v in vision.to_dict().items() if k not in ("transformers_version", "dtype")},
                       "model_type": "siglip_vision_model"}
        llm_json = {**shape, "architectures": ["LlamaBidirectionalModel"], "model_type": "llama_bidirec"}
        config = {**g.NEMOTRON_VL_CONFIG, "vision_config": vision_json, "llm_config": llm_json,
                  "force_image_size": s["image_size"], "vocab_size": len(tok),
                  "img_context_token_id": tok.convert_tokens_to_ids("<IMG_CONTEXT>")}
        (checkpoint / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        tok.save_pretrained(checkpoint)
        subprocess.run([sys.executable, str(ROOT / "tools" / "export_nemotron_vl.py"), "--model", str(checkpoint),
                        "--weight-format", "fp16", str(out)], check=True)


def measure(model_dir: Path, requests: int, documents: int, clients: int) -> dict:
    from openvino_reranker.config import load_config
    from openvino_reranker.scoring import ImageDocument
    from openvino_reranker.startup import build_reranker
    from openvino_reranker.vision import synthetic_page

    config = load_config(["--device", "CPU", "--model", str(model_dir), "--cache-dir", "", "--score-cache-size", "0"])
    reranker, files, info, _ = build_reranker(config, None)
    try:
        pages = [[ImageDocument(synthetic_page(595 + n, 842, 1000 * r + n)) for n in range(documents)]
                 for r in range(requests + 1)]
        reranker.score_pairs("warm up", pages[-1][:2], use_cache=False)
        vision = reranker.engine.vision
        spent = [0.0]
        original = vision.embed

        def timed(pixels, deadline=None):
            t0 = time.perf_counter()
            try:
                return original(pixels, deadline)
            finally:
                spent[0] += time.perf_counter() - t0

        vision.embed = timed
        todo = list(range(requests))
        lock = threading.Lock()

        def client():
            while True:
                with lock:
                    if not todo:
                        return
                    r = todo.pop()
                reranker.score_pairs(f"what does page {r} say about revenue", pages[r], use_cache=False)

        started = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        return {"pairs": requests * documents, "wall_s": round(wall, 2),
                "pairs_per_s": round(requests * documents / wall, 1),
                "vision_share": round(spent[0] / clients / wall, 2), "max_length": files.max_length,
                "max_image_tokens": reranker.head.max_image_tokens, "properties": dict(info.properties)}
    finally:
        reranker.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-standin", type=Path)
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--documents", type=int, default=10)
    parser.add_argument("--clients", type=int, default=2)
    args = parser.parse_args()
    if args.make_standin:
        make_standin(args.make_standin)
    if args.model_dir:
        print(json.dumps(measure(args.model_dir, args.requests, args.documents, args.clients)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
