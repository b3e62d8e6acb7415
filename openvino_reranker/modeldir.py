"""The model's files: which IR, tokenizer and template serve, the model head they call for, and the effective
max_length. A model is a local directory (an optimum-cli export, or anything laid out like a Hub repo) or a Hub
repo fetched into the Hub cache by `hub.fetch_model`; either way the same files are read from a directory."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DEFAULT_MAX_LENGTH, DEFAULT_MODEL, MAX_SUPPORTED_LENGTH, OPTIONS, Config, ShapeBucket
from .encoding import BUILTIN_TEMPLATES, CrossEncoderHead, DecoderRerankerHead, ModelHead, PromptTemplate
from .errors import EXIT_CONFIG, EXIT_MODEL, StartupError
from .hub import HubSettings, check_repo_file, fetch_model, parse_repo_id
from .images import DEFAULT_MAX_IMAGE_PIXELS, require_pillow
from .referencescores import FILE_NAME as REFERENCE_SCORES_FILE
from .referencescores import ReferenceScores, parse_reference_scores
from .vision import TilingSettings
from .visionhead import IMAGE_EMBEDS, VisionLanguageHead

# The IR served when --model-file is not given: the first of these the model has. INT8 first, as the service is
# meant to serve INT8: sentence-transformers publishes a fully quantized static INT8 IR (NNCF post-training
# quantization) beside the plain one in the `openvino/` folder of the cross-encoder/* repos; optimum-cli exports
# and the OpenVINO/* repos have the IR at the root.
IR_CANDIDATES = ("openvino/openvino_model_qint8_quantized.xml", "openvino_model.xml", "openvino/openvino_model.xml")
TEMPLATE_FILE = "rerank_template.json"
# Fetched with the IR when the repo has them; only tokenizer.json is required besides the IR. The reference scores
# live in the IR's folder.
REQUIRED_FILES = ("tokenizer.json",)
OPTIONAL_FILES = ("config.json", "tokenizer_config.json", TEMPLATE_FILE)
OPTIONAL_BESIDE_IR = (REFERENCE_SCORES_FILE,)
# config.json model_type values of decoder models: served by DecoderRerankerHead, which needs a prompt template
DECODER_MODEL_TYPES = frozenset({
    "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "llama", "mistral", "mixtral", "gemma", "gemma2", "gemma3",
    "gemma3_text", "phi", "phi3", "olmo", "olmo2", "granite", "stablelm", "starcoder2", "gpt2", "gpt_neox",
    "llama_bidirec", "llama_nemoretriever_cross_encoder", "llama_nemotron_vl_rerank"})
# config.json model_type values of vision-language rerankers (tools/export_nemotron_vl.py): the language-model IR is
# the one served (openvino_model.xml), the vision encoder's IR lies beside it
VISION_LANGUAGE_MODEL_TYPES = frozenset({"llama_nemotron_vl_rerank"})
VISION_IR = "openvino_vision.xml"
IMG_CONTEXT_TOKEN_ID = 128258  # the checkpoint config's default img_context_token_id
# RoBERTa-style position ids start after the pad id: max_position_embeddings 514 means 512 tokens
ROBERTA_MODEL_TYPES = frozenset({"roberta", "xlm-roberta", "camembert", "xlm-roberta-xl", "longformer"})
# What to do about a model directory that is missing or holds no model: a Hub id first (the default repo and the
# OpenVINO/* ones publish IRs), then the export recipe, which needs torch in an environment of its own.
EXPORT_HINT = (f"serve a model from the Hugging Face Hub with --model ORG/NAME (the default, {DEFAULT_MODEL}, "
               f"publishes ready IRs), or export one with `optimum-cli export openvino --model ORG/NAME --task "
               f"text-classification DIR` in an environment with torch (docs/models.md, \"Export a model "
               f"yourself\") and serve DIR")


def missing_model_dir(typed: str, path: Path) -> str:
    """The message for a model directory that does not exist: the path as it was typed (not normalised, `~` kept),
    and where that is when it differs (a relative path, `~`), then what to do."""
    where = str(path.absolute())
    looked = "" if where == typed else f" (looked for {where})"
    problem = "is not a directory" if path.exists() else "does not exist"
    return f"model directory {typed} {problem}{looked}: {EXPORT_HINT}"


@dataclass(frozen=True)
class ModelFiles:
    model_dir: Path  # the directory served (for a Hub model, its snapshot in the Hub cache)
    name: str
    xml: Path
    tokenizer: Path
    max_length: int  # effective, after the model's limit and the config
    model_type: str | None = None  # config.json's
    pad_token_id: int | None = None  # config.json's: decoder graphs compare input ids with it
    pad_tokens: tuple[str, ...] = ()  # tokenizer_config.json's pad_token then eos_token, when it names them
    template: PromptTemplate | None = None  # set for decoder rerankers
    source: Mapping[str, Any] = field(default_factory=dict)  # a Hub model's repo, revision and commit
    reference_scores: ReferenceScores | None = None  # reference_scores.json beside the IR, when there is one
    vision: VisionFiles | None = None  # a vision-language model's vision IR and image settings

    @property
    def head_kind(self) -> str:
        if self.vision is not None:
            return VisionLanguageHead.kind
        return DecoderRerankerHead.kind if self.template is not None else CrossEncoderHead.kind


@dataclass(frozen=True)
class VisionFiles:
    """A vision-language model's vision encoder IR (beside the language model's) and, from config.json, how its
    images are tiled and which token id the image's embeddings replace."""

    xml: Path
    tiling: TilingSettings
    image_context_id: int


def vision_files(root: Path, xml: Path, config: Mapping[str, Any]) -> VisionFiles:
    """The vision IR beside `xml` and the image settings of a vision-language model's config.json."""
    vision_xml = xml.parent / VISION_IR
    for path in (vision_xml, vision_xml.with_suffix(".bin")):
        if not path.is_file():
            raise StartupError(f"model dir {root} holds a vision-language reranker but has no "
                               f"{path.relative_to(root)} (export it with tools/export_nemotron_vl.py)", EXIT_MODEL)
    try:
        tiling = TilingSettings.from_config(config)
    except ValueError as exc:
        raise StartupError(f"{root / 'config.json'}: {exc}", EXIT_MODEL) from None
    context = config.get("img_context_token_id", IMG_CONTEXT_TOKEN_ID)
    if not isinstance(context, int) or isinstance(context, bool) or context < 0:
        raise StartupError(f"{root / 'config.json'}: img_context_token_id must be a token id", EXIT_MODEL)
    return VisionFiles(vision_xml, tiling, context)


def files_called_for(snapshot: Path) -> tuple[str, ...]:
    """What a Hub model's fetched files call for beside its IR: a vision-language model's config.json (its
    `model_type`) its vision IR. Asked of the snapshot after the IR, tokenizer and config.json are in it, so that no
    other model asks the Hub for these files or remembers them as absent."""
    config = _read_json(snapshot / "config.json") or {}
    if config.get("model_type") in VISION_LANGUAGE_MODEL_TYPES:
        return VISION_IR, VISION_IR[:-len(".xml")] + ".bin"
    return ()


def _read_json(path: Path) -> dict | None:
    """An optional JSON object file: None when absent; a present one that cannot be read is a broken model."""
    if not path.exists():
        return None
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
    return data


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 8 <= value < 1_000_000 else None


def pick_ir(root: Path, model_file: str) -> Path:
    """The IR to serve: `model_file` inside `root`, else the first of IR_CANDIDATES present."""
    if model_file:
        xml = root / model_file
        if not model_file.endswith(".xml") or not xml.is_file():
            raise StartupError(f"model file {model_file} is not an .xml file in {root}", EXIT_MODEL)
        return xml
    for candidate in IR_CANDIDATES:
        if (root / candidate).is_file():
            return root / candidate
    raise StartupError(f"model dir {root} has no OpenVINO IR (looked for {', '.join(IR_CANDIDATES)}); {EXPORT_HINT}",
                       EXIT_MODEL)


def pick_template(root: Path, template_path: str, model_type: str | None) -> PromptTemplate | None:
    """A decoder reranker's prompt template: --prompt-template, else rerank_template.json beside the IR, else the
    built-in one for the model_type; None for a cross-encoder. A decoder model_type without any is an error."""
    path = Path(template_path) if template_path else root / TEMPLATE_FILE
    if template_path or path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise StartupError(f"cannot read prompt template {path}: {exc.strerror or exc}",
                               EXIT_CONFIG if template_path else EXIT_MODEL) from None
        except UnicodeDecodeError as exc:
            raise StartupError(f"prompt template {path} is not UTF-8 text (byte {exc.start})", EXIT_MODEL) from None
        try:
            return PromptTemplate.from_json(text, str(path))
        except ValueError as exc:
            raise StartupError(f"prompt template {path}: {exc}", EXIT_CONFIG if template_path else EXIT_MODEL) \
                from None
    if model_type in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[model_type]
    if model_type in DECODER_MODEL_TYPES:
        raise StartupError(f"{root} holds a {model_type} model, a decoder: it needs its prompt template, in "
                           f"{TEMPLATE_FILE} beside the IR or named by --prompt-template (see docs/models.md, "
                           f"\"Decoder rerankers\")", EXIT_MODEL)
    return None


def load_reference_scores(path: Path) -> ReferenceScores | None:
    """The model's reference scores (`reference_scores.json` beside the IR), or None when it has none; a file that
    is there but cannot be read or is malformed is a broken model (exit 4)."""
    if not path.is_file():
        return None
    try:
        return parse_reference_scores(path.read_text(encoding="utf-8"), str(path))
    except OSError as exc:
        raise StartupError(f"cannot read {path}: {exc.strerror or exc}", EXIT_MODEL) from None
    except UnicodeDecodeError as exc:
        raise StartupError(f"{path} is not UTF-8 text (byte {exc.start})", EXIT_MODEL) from None
    except ValueError as exc:
        raise StartupError(f"reference scores {path}: {exc}", EXIT_MODEL) from None


def locate_model(config: Config, environ: Mapping[str, str], on_progress: Callable[[str], None] | None = None
                 ) -> tuple[Path, str, dict]:
    """Where the model's files are: (directory, IR file inside it or '' for the default order, source). `--model`
    is a directory when one exists at that path or it is written as a path; else a Hub id, fetched (or found in the
    Hub cache) by `hub.fetch_model`, whose snapshot directory is then served like a local one."""
    text = config.model
    path = Path(os.path.expanduser(text))
    parsed = None if path.is_dir() or text.startswith(("/", ".", "~")) else parse_repo_id(text)
    if parsed is None:
        if not path.is_dir() and "/" not in text:
            raise StartupError(f"model {text!r} is neither a directory nor a Hub id (org/name or org/name@revision)",
                               EXIT_CONFIG)
        if not path.is_dir():
            raise StartupError(missing_model_dir(text, path), EXIT_MODEL)
        return path, config.model_file, {}
    repo_id, revision = parsed
    if config.model_file:
        try:
            check_repo_file(config.model_file)
        except ValueError as exc:
            raise StartupError(f"bad value for model_file: {exc}", EXIT_CONFIG) from None
    fetched = fetch_model(repo_id, revision, (config.model_file,) if config.model_file else IR_CANDIDATES,
                          REQUIRED_FILES, OPTIONAL_FILES, HubSettings.from_environ(environ), on_progress,
                          OPTIONAL_BESIDE_IR, files_called_for)
    return fetched.snapshot, fetched.ir_file, {"repo": repo_id, "revision": revision, "commit": fetched.commit,
                                               "from_cache_only": fetched.from_cache_only}


def load_model_files(model_dir: str | Path, requested_max_length: int, model_file: str = "",
                     template_path: str = "", source: Mapping[str, Any] | None = None) -> ModelFiles:
    """Check a model directory and work out the IR, the template and the max length; every problem is one
    StartupError line."""
    root = Path(model_dir)
    if not root.is_dir():
        raise StartupError(missing_model_dir(str(model_dir), root), EXIT_MODEL)
    if not os.access(root, os.R_OK | os.X_OK):
        raise StartupError(f"model dir {root}: permission denied (the service's user must be able to read it)",
                           EXIT_MODEL)
    xml, tok = pick_ir(root, model_file), root / "tokenizer.json"
    for path in (xml, xml.with_suffix(".bin"), tok):
        if not path.is_file():
            raise StartupError(f"model dir {root} has no {path.relative_to(root)}; {EXPORT_HINT}", EXIT_MODEL)
        if not os.access(path, os.R_OK):
            raise StartupError(f"cannot read {path}: permission denied", EXIT_MODEL)
    config = _read_json(root / "config.json") or {}
    tokenizer_config = _read_json(root / "tokenizer_config.json") or {}
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    pad_token_id = config.get("pad_token_id")
    pad_token_id = pad_token_id if isinstance(pad_token_id, int) and not isinstance(pad_token_id, bool) and \
        pad_token_id >= 0 else None
    limits = []
    positions = _positive_int(config.get("max_position_embeddings"))
    if positions is not None:
        pad = 1 if pad_token_id is None else pad_token_id
        limits.append(positions - pad - 1 if model_type in ROBERTA_MODEL_TYPES else positions)
    if _positive_int(tokenizer_config.get("model_max_length")) is not None:
        limits.append(tokenizer_config["model_max_length"])
    model_limit = min(limits + [MAX_SUPPORTED_LENGTH])
    vision = vision_files(root, xml, config) if model_type in VISION_LANGUAGE_MODEL_TYPES else None
    default_length = DEFAULT_MAX_LENGTH
    if vision is not None:  # room for the largest image besides the default's text
        default_length += vision.tiling.max_tiles * vision.tiling.tokens_per_tile
    if requested_max_length > model_limit:
        raise StartupError(f"max_length {requested_max_length} exceeds the model's limit of {model_limit} tokens",
                           EXIT_CONFIG)
    name = root.name
    if source and source.get("repo"):
        name = str(source["repo"])
    elif isinstance(config.get("_name_or_path"), str) and config["_name_or_path"]:
        name = config["_name_or_path"]
    pad_tokens = []
    for key in ("pad_token", "eos_token"):
        token = tokenizer_config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and token:
            pad_tokens.append(token)
    return ModelFiles(root, name, xml, tok, requested_max_length or min(model_limit, default_length),
                      model_type, pad_token_id, tuple(pad_tokens), pick_template(root, template_path, model_type),
                      dict(source or {}), load_reference_scores(xml.parent / REFERENCE_SCORES_FILE), vision)


def decoder_pad_id(files: ModelFiles, tokenizer) -> int:
    """The pad id a decoder graph compares input ids with: config.json's pad_token_id, else the tokenizer's pad
    token (tokenizer_config.json), else its end-of-text token."""
    if files.pad_token_id is not None:
        return files.pad_token_id
    for token in files.pad_tokens:
        if tokenizer.token_to_id(token) is not None:
            return tokenizer.token_to_id(token)
    return 0


def make_head(files: ModelFiles, tokenizer, model, instruction: str = "",
              max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ModelHead:
    """The head the model's files call for, its contract checked against the IR. A vision-language model needs
    Pillow (the `vision` extra): without it, a StartupError (exit 2) names the extra."""
    template = files.template
    if instruction and (template is None or not template.takes_instruction):
        takes_none = "the model is a cross-encoder" if template is None else \
            f"the prompt template ({template.source}) has no {{instruction}}"
        raise StartupError(f"instruction is set but {takes_none}: it takes no instruction", EXIT_CONFIG)
    if template is None:
        return CrossEncoderHead(tokenizer, files.max_length, CrossEncoderHead.check_contract(model))
    if instruction:
        template = PromptTemplate(template.template, instruction, template.add_special_tokens,
                                  f"{template.source}, instruction from the configuration")
    if files.vision is not None:
        require_pillow(f"the model {files.name}, a vision-language reranker,")
        contract = VisionLanguageHead.check_contract(model)
        hidden = model.input(IMAGE_EMBEDS).get_partial_shape()[2].get_length()
        return VisionLanguageHead(tokenizer, files.max_length, contract, template, decoder_pad_id(files, tokenizer),
                                  files.vision.tiling, files.vision.image_context_id, max_image_pixels, hidden)
    return DecoderRerankerHead(tokenizer, files.max_length, DecoderRerankerHead.check_contract(model), template,
                               decoder_pad_id(files, tokenizer))


# A bucket must hold the head's shortest pair (a decoder's prompt template alone can take 60 tokens) plus this many
# tokens of query and document; a shorter one would be compiled for nothing, or fail the startup check.
BUCKET_ROOM = 32


DEFAULT_BUCKETS = next(o.parse(o.default) for o in OPTIONS if o.name == "buckets")


def longer_buckets(longest: int, rows: int, max_length: int) -> tuple[ShapeBucket, ...]:
    """Buckets past the default ones for a max_length above them (decoder rerankers): each doubling of the length
    halves the rows (at least 1), so a bucket holds about as many tokens as the longest default one; the last is
    exactly max_length."""
    out = []
    while longest < max_length:
        longest, rows = min(longest * 2, max_length), max(1, rows // 2)
        out.append(ShapeBucket(rows, longest))
    return tuple(out)


def static_buckets_for(config: Config, max_length: int, min_pair_tokens: int = 0,
                       log: Callable[[str], None] | None = None) -> tuple[ShapeBucket, ...] | None:
    """The buckets to compile, or None for dynamic shapes. The default buckets grow to a max_length above 512
    (`longer_buckets`); buckets longer than max_length are dropped, and so are those too short for the head's
    shortest pair plus BUCKET_ROOM tokens (with a line to `log`); the largest remaining must reach max_length so
    that every truncated pair fits."""
    if not config.static_shapes:
        return None
    buckets = config.buckets
    if buckets == DEFAULT_BUCKETS:
        buckets = buckets + longer_buckets(max(b.length for b in buckets), max(b.rows for b in buckets), max_length)
    shortest = min_pair_tokens + BUCKET_ROOM if min_pair_tokens else 0
    short = tuple(b for b in buckets if b.length < shortest and b.length <= max_length)
    if short and log is not None:
        log(f"skipping buckets {','.join(map(str, short))}: the model's shortest pair takes {min_pair_tokens} tokens "
            f"(its prompt template), leaving no room for a query and a document")
    kept = tuple(b for b in buckets if shortest <= b.length <= max_length)
    if not kept or max(b.length for b in kept) < max_length:
        raise StartupError(f"buckets {','.join(map(str, buckets))} do not cover max_length {max_length}"
                           + (f" with buckets of at least {shortest} tokens" if short else "")
                           + f": add a bucket of length {max_length} or lower --max-length", EXIT_CONFIG)
    return kept
