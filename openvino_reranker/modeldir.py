"""The model directory: the optimum export layout and the effective max_length."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .config import MAX_SUPPORTED_LENGTH, Config, ShapeBucket
from .errors import EXIT_CONFIG, EXIT_MODEL, StartupError


@dataclass(frozen=True)
class ModelFiles:
    model_dir: Path
    name: str
    xml: Path
    tokenizer: Path
    max_length: int  # effective, after the model's limit and the config


def load_model_files(model_dir: str, requested_max_length: int) -> ModelFiles:
    """Check the optimum export layout and work out the max length; every problem is one StartupError line."""
    root = Path(model_dir)
    hint = "export one with: optimum-cli export openvino --model cross-encoder/ms-marco-MiniLM-L6-v2 " \
           "--task text-classification --weight-format int8 DIR (see README)"
    if not root.is_dir():
        raise StartupError(f"model dir {root} does not exist; {hint}", EXIT_MODEL)
    if not os.access(root, os.R_OK | os.X_OK):
        raise StartupError(f"model dir {root}: permission denied (the service's user must be able to read it)",
                           EXIT_MODEL)
    xml, tok = root / "openvino_model.xml", root / "tokenizer.json"
    for path in (xml, xml.with_suffix(".bin"), tok):
        if not path.is_file():
            raise StartupError(f"model dir {root} has no {path.name}; {hint}", EXIT_MODEL)
        if not os.access(path, os.R_OK):
            raise StartupError(f"cannot read {path}: permission denied", EXIT_MODEL)
    limits, name = [MAX_SUPPORTED_LENGTH], root.name
    for filename, key in (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length")):
        path = root / filename
        if not path.exists():
            continue  # optional; but one that exists and cannot be read is a broken directory
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise StartupError(f"cannot read {path}: {exc.strerror or exc}", EXIT_MODEL) from None
        except UnicodeDecodeError as exc:
            raise StartupError(f"{path} is not UTF-8 text (byte {exc.start})", EXIT_MODEL) from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise StartupError(f"{path} is not valid JSON: {exc}", EXIT_MODEL) from None
        if not isinstance(data, dict):
            raise StartupError(f"{path} is not a JSON object", EXIT_MODEL)
        value = data.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 8 <= value < 1_000_000:
            limits.append(value)
        if filename == "config.json" and isinstance(data.get("_name_or_path"), str) and data["_name_or_path"]:
            name = data["_name_or_path"]
    model_limit = min(limits)
    if requested_max_length > model_limit:
        raise StartupError(f"max_length {requested_max_length} exceeds the model's limit of {model_limit} tokens",
                           EXIT_CONFIG)
    return ModelFiles(root, name, xml, tok, requested_max_length or model_limit)


def static_buckets_for(config: Config, max_length: int) -> tuple[ShapeBucket, ...] | None:
    """The buckets to compile, or None for dynamic shapes. Buckets longer than max_length are dropped, and the
    largest remaining must reach max_length so that every truncated pair fits."""
    if not config.static_shapes:
        return None
    kept = tuple(b for b in config.buckets if b.length <= max_length)
    if not kept or max(b.length for b in kept) < max_length:
        raise StartupError(f"buckets {','.join(map(str, config.buckets))} do not cover max_length {max_length}: "
                           f"add a bucket of length {max_length} or lower --max-length", EXIT_CONFIG)
    return kept
