"""What the export tools share (tools/export_nemotron.py, tools/export_nemotron_vl.py): the checkpoint (a local
directory or a Hub id), its config and safetensors weights, transformers' LlamaModel loaded from them as a
bidirectional body, errors as one line, and the files copied beside the IR. torch, transformers and OpenVINO are
imported when used, so that `--help` works without them."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this repository's openvino_reranker, when run here

INSTALL_HINT = ("install it first: pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu "
                "&& pip install '.[export]'")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
OV_F32 = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}  # OpenVINO on the CPU at f32
# config.json keys that are the remote code's own, not LlamaConfig's
NOT_LLAMA_KEYS = ("auto_map", "architectures", "model_type", "pooling", "temperature", "transformers_version",
                  "torch_dtype", "dtype", "_name_or_path")


class ExportError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


def require(module: str):
    try:
        return __import__(module)
    except ImportError as exc:
        raise ExportError(f"this needs the Python package '{module}' ({exc}); {INSTALL_HINT}") from None


def resolve_checkpoint(model: str, revision: str | None) -> Path:
    """A local directory as is; anything else that looks like `org/name` is fetched from the Hub (only the
    JSON and safetensors files)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise ExportError(f"--model {model}: no such directory (a Hub id looks like org/name)")
    require("huggingface_hub")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=["*.json", "*.safetensors"]))
    except RepositoryNotFoundError:
        raise ExportError(f"--model {model}: no such repository on the Hub, or it is gated (set HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        raise ExportError(f"--model {model}: not in the local cache and the Hub cannot be reached") from None
    except (HfHubHTTPError, OSError) as exc:
        raise ExportError(f"--model {model}: download failed: {str(exc).splitlines()[0]}") from None


def read_config_json(checkpoint: Path) -> dict:
    try:
        config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{checkpoint}: no config.json") from None
    except (ValueError, OSError) as exc:
        raise ExportError(f"{checkpoint / 'config.json'}: not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ExportError(f"{checkpoint / 'config.json'}: not a JSON object")
    return config


def read_weights(checkpoint: Path) -> dict:
    """All tensors of the checkpoint's safetensors file(s), as float32."""
    require("safetensors")
    from safetensors.torch import load_file

    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        files = sorted(p.name for p in checkpoint.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{checkpoint}: no *.safetensors weights")
    tensors = {}
    for name in files:
        try:
            tensors.update(load_file(str(checkpoint / name)))
        except (OSError, ValueError) as exc:
            raise ExportError(f"{checkpoint / name}: cannot read the weights ({exc})") from None
    return {key: value.float() for key, value in tensors.items()}


def bidirectional_llama(llm_config: dict, weights: dict):
    """transformers' own LlamaModel with these weights (`embed_tokens`, `layers.N.*`, `norm`), every layer's
    attention made non-causal (the mask the caller builds decides)."""
    require("torch")
    require("transformers")
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(**{k: v for k, v in llm_config.items() if k not in NOT_LLAMA_KEYS})
    config._attn_implementation = "sdpa"
    decoder = LlamaModel(config)
    missing, unexpected = decoder.load_state_dict(weights, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    if missing or unexpected:
        raise ExportError(f"the weights do not fit a Llama decoder: missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}")
    for layer in decoder.layers:
        layer.self_attn.is_causal = False
    return decoder


def run_bidirectional(decoder, hidden, keep):
    """LlamaModel's layers and norm over input embeddings `hidden` [batch, sequence, hidden] under a bidirectional
    padding mask (`keep`, 1.0 for a real position): every position attends to every real position. Positions are
    0..n-1 whatever the padding, as transformers numbers them by default (RoPE is relative and attention is
    bidirectional, so a shift by left padding changes nothing)."""
    import torch

    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    rotary = decoder.rotary_emb(hidden, position_ids)
    blocked = (1.0 - keep)[:, None, None, :] * torch.finfo(hidden.dtype).min
    mask = blocked.expand(-1, 1, hidden.shape[1], -1)
    for layer in decoder.layers:
        out = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids)
        hidden = out[0] if isinstance(out, tuple) else out
    return decoder.norm(hidden)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


FP32_TOLERANCE = 1e-3  # IR (f32 CPU) vs torch on the check inputs; a real 1B model is far inside this


def save_checked(irs, weight_format: str, compare) -> float:
    """Save each (OpenVINO model, .xml path) of `irs` (fp16 weights for `weight_format` fp16), compare them with
    torch (`compare()`, the largest difference), and at fp32 remove them all again and raise an ExportError when
    they differ by more than FP32_TOLERANCE: a converted IR that is wrong is not left behind."""
    ov = require("openvino")
    for ir, xml in irs:
        ov.save_model(ir, str(xml), compress_to_fp16=weight_format == "fp16")
    diff = compare()
    if weight_format == "fp32" and diff > FP32_TOLERANCE:
        for _, xml in irs:
            xml.unlink()
            xml.with_suffix(".bin").unlink()
        what = "IRs differ" if len(irs) > 1 else "IR differs"
        raise ExportError(f"the converted {what} from torch by {diff:.2e} (over {FP32_TOLERANCE}): removed")
    return diff


def copy_tokenizer(checkpoint: Path, output: Path) -> None:
    for name in TOKENIZER_FILES:
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, output / name)


def versions(*names: str) -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in names}
