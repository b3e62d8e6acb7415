"""Configuration: every option is a flag and an OPENVINO_RERANKER_* variable, parsed here and nowhere else."""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import os
import re
import socket
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from . import __version__
from .errors import EXIT_CODES, EXIT_CONFIG, StartupError

DEFAULT_MODEL = "cross-encoder/ms-marco-MiniLM-L6-v2"
# Where earlier versions looked by default (an optimum-cli export): still served when it exists and no model is named
LEGACY_MODEL_DIR = "~/.cache/openvino-models/rerankers/ms-marco-MiniLM-L6-v2-int8-ov"
DEFAULT_NPU_BUSY_PATH = "/sys/class/accel/accel0/device/npu_busy_time_us"
MAX_SUPPORTED_LENGTH = 8192  # the longest max_length and bucket accepted (decoder rerankers take long pairs)
DEFAULT_MAX_LENGTH = 512  # max_length 0: the model's limit, but at most this
ENV_PREFIX = "OPENVINO_RERANKER_"


@dataclass(frozen=True, order=True)
class ShapeBucket:
    """One static input shape `[rows, length]` compiled for the NPU (or for CPU in static mode)."""

    rows: int
    length: int

    def __str__(self) -> str:
        return f"{self.rows}x{self.length}"


@dataclass(frozen=True)
class IntRange:
    """A bounded integer, parsed the same way wherever it comes from (an option, a JSON field, a header): ASCII
    digits only (`int()` also takes '²', '١' and '1_000'), and a value outside lo..hi is an error, not clamped."""

    lo: int
    hi: int

    def check(self, value: int) -> int:
        if not self.lo <= value <= self.hi:
            raise ValueError(f"{value} is outside {self.lo}..{self.hi}")
        return value

    def parse_text(self, text: str) -> int:
        m = re.fullmatch(r"[ \t]*(-?[0-9]{1,20})[ \t]*", text)
        if not m:
            raise ValueError(f"{text[:40]!r} is not an integer")
        return self.check(int(m.group(1)))

    __call__ = parse_text  # an option's parser


TIMEOUT_MS = IntRange(1, 3_600_000)  # request_timeout_ms, the body's timeout_ms and X-Request-Timeout-Ms


def _int(lo: int, hi: int) -> IntRange:
    return IntRange(lo, hi)


_DEVICE_RE = re.compile(r"^(CPU|GPU(\.\d+)?|NPU(\.\d+)?|(AUTO|MULTI|HETERO)(:[A-Z0-9.]+(,[A-Z0-9.]+)*)?)$")


def _parse_device(text: str) -> str:
    device = text.strip().upper()
    if not _DEVICE_RE.match(device):
        raise ValueError(f"{text!r} is not a device (use NPU, CPU, GPU, GPU.1, AUTO or AUTO:NPU,CPU)")
    return device


def _parse_buckets(text: str) -> tuple[ShapeBucket, ...]:
    buckets = set()
    for part in text.replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)x(\d+)", part)
        if not m:
            raise ValueError(f"{part!r} is not ROWSxLENGTH (example: 8x128)")
        rows, length = int(m.group(1)), int(m.group(2))
        if not (1 <= rows <= 256 and 8 <= length <= MAX_SUPPORTED_LENGTH):
            raise ValueError(f"{part}: rows must be 1..256 and length 8..{MAX_SUPPORTED_LENGTH}")
        buckets.add(ShapeBucket(rows, length))
    return tuple(sorted(buckets, key=lambda b: (b.length, b.rows)))


@dataclass(frozen=True)
class Choice:
    """A value out of a fixed list, matched in any case and returned as listed; --help shows the list."""

    values: tuple[str, ...]

    def __call__(self, text: str) -> str:
        value = text.strip().lower()
        for choice in self.values:
            if choice.lower() == value:
                return choice
        raise ValueError(f"{text!r} is not one of {', '.join(self.values)}")


def _parse_text(text: str) -> str:
    return text.strip()


def _parse_path(text: str) -> str:
    return os.path.expanduser(text.strip()) if text.strip() else ""


def _parse_bool_option(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"{text!r} is not true or false")
    return value in ("true", "1", "yes")


def _parse_hosts(text: str) -> tuple[str, ...]:
    """Host names or IP addresses, comma-separated (no scheme, port or path): compared with a URL's host in lower
    case; an IPv6 address with or without brackets."""
    hosts = []
    for part in text.split(","):
        host = part.strip().lower()
        if not host:
            continue
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            ipaddress.ip_address(bare)
            hosts.append(bare)
            continue
        except ValueError:
            pass
        if not re.fullmatch(r"[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*\.?", host):
            raise ValueError(f"{part.strip()[:60]!r} is not a host name or IP address (no scheme, port or path)")
        hosts.append(host.rstrip("."))
    return tuple(dict.fromkeys(hosts))


def _parse_fraction(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise ValueError(f"{value} is outside (0, 1)")
    return value


@dataclass(frozen=True)
class Option:
    name: str  # the Config field; the flag is --name-with-dashes, the env var OPENVINO_RERANKER_NAME
    parse: Callable[[str], Any]
    default: str
    help: str
    switch: bool = False  # a true/false option: the flag alone means true, `--flag false` still works
    metavar: str = ""  # the value's name in --help; '' = N for an integer, else the option's name in capitals

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


def option(parse: Callable[[str], Any], default: str, help: str, switch: bool = False, metavar: str = "") -> Any:
    """A Config field that is an option: its flag and variable are named after the field (`Option`)."""
    return field(metadata={"option": Option("", parse, default, help, switch, metavar)})


@dataclass(frozen=True)
class Config:
    """Every option, written once: each field is an option (flag --name-with-dashes, variable OPENVINO_RERANKER_NAME)
    with its parser, default (as the text a user would type), help and, for --help, its value's name. `OPTIONS` is
    derived from these fields, in this order."""

    host: str = option(_parse_text, "127.0.0.1", "address to bind")
    port: int = option(_int(0, 65535), "18818", "TCP port to bind (0 = any free port)")
    device: str = option(_parse_device, "NPU", "OpenVINO device: NPU, CPU, GPU[.N], AUTO[:list]")
    model: str = option(_parse_text, DEFAULT_MODEL,
        "a local model directory, or a Hugging Face Hub id org/name[@revision] fetched into the Hub cache",
        metavar="ID|DIR")
    model_dir: str = option(_parse_text, "",
        "a local model directory (the same as --model DIR; not with --model)", metavar="DIR")
    model_file: str = option(_parse_text, "",
        "the IR inside the model (a path ending .xml); '' = the first present of "
        "openvino/openvino_model_qint8_quantized.xml, openvino_model.xml, openvino/openvino_model.xml",
        metavar="XML")
    prompt_template: str = option(_parse_path, "",
        "JSON file with a decoder reranker's prompt template; '' = rerank_template.json beside the IR, else the "
        "built-in one for the model's model_type (qwen3)", metavar="FILE")
    instruction: str = option(_parse_text, "",
        "instruction for decoder rerankers whose template takes one, when a request names none; '' = the "
        "template's default", metavar="TEXT")
    max_length: int = option(_int(0, MAX_SUPPORTED_LENGTH), "0",
        f"tokens per (query, document) pair; 0 = the model's limit, at most {DEFAULT_MAX_LENGTH}")
    shape_mode: str = option(Choice(("auto", "static", "dynamic")), "auto",
        "static shape buckets or dynamic shapes; auto = static on NPU, dynamic elsewhere")
    buckets: tuple[ShapeBucket, ...] = option(_parse_buckets, "8x64,8x128,8x256,8x512",
        "static shapes ROWSxLENGTH, comma-separated (lengths above max_length are dropped)", metavar="LIST")
    batch_size: int = option(_int(0, 256), "0",
        "pairs per micro-batch with dynamic shapes; 0 = the CPU class's measured default, else 8")
    pad_multiple: int = option(_int(0, 512), "0",
        "a dynamic micro-batch's length is rounded up to a multiple of this; 0 = the CPU class's measured "
        "default, else 8")
    performance_hint: str = option(Choice(("auto", "latency", "throughput")), "auto",
        "OpenVINO PERFORMANCE_HINT; auto = the CPU class's measured default, else latency (every compile "
        "is checked: docs/performance.md)")
    num_streams: int = option(_int(0, 64), "0", "NUM_STREAMS; 0 = what the hint decides")
    replicas: int = option(_int(0, 16), "0",
        "CPU compiles run side by side, one stream and a share of the cores each; 0 = the CPU class's default")
    inference_threads: int = option(_int(0, 1024), "0", "INFERENCE_NUM_THREADS; 0 = the plugin's default")
    infer_requests: int = option(_int(0, 64), "0",
        "infer requests per compiled model; 0 = the device's OPTIMAL_NUMBER_OF_INFER_REQUESTS")
    inference_precision: str = option(Choice(("default", "f32", "bf16", "f16")), "default",
        "INFERENCE_PRECISION_HINT; default = the device's choice")
    pooled_row_only: str = option(Choice(("on", "off")), "on",
        "exact rewrite: layers above a one-row pooling run on that row")
    parity_tolerance: float = option(_parse_fraction, "0.02",
        "largest score difference from the f32 CPU reference at startup", metavar="X")
    on_parity_failure: str = option(Choice(("fallback", "refuse")), "fallback",
        "when the serving compile disagrees with the reference: recompile safely or refuse")
    cache_dir: str = option(_parse_path, "~/.cache/openvino-reranker", "OpenVINO compile cache ('' disables)",
        metavar="DIR")
    npu_busy_path: str = option(_parse_path, DEFAULT_NPU_BUSY_PATH, "sysfs NPU busy-time counter (microseconds)",
        metavar="PATH")
    max_body_bytes: int = option(_int(1024, 1 << 30), str(2 * 1024 * 1024), "largest request body accepted")
    max_documents: int = option(_int(1, 100_000), "1000", "most documents in one request")
    max_query_chars: int = option(_int(1, 10_000_000), "8192", "longest query, in characters")
    max_document_chars: int = option(_int(1, 10_000_000), "2097152",
        "longest document text, in characters (only what truncation or chunking keeps is tokenized)")
    max_total_tokens: int = option(_int(1, 100_000_000), "131072",
        "most tokens per request after truncation, every document counted (as usage counts them)")
    max_image_bytes: int = option(_int(1024, 1 << 30), str(10 * 1024 * 1024),
        "largest image file, base64-decoded or fetched")
    max_image_pixels: int = option(_int(1, 1 << 31), "40000000",
        "most pixels an image header may declare")
    max_images_per_request: int = option(_int(1, 100_000), "64", "most image documents in a request")
    score_cache_size: int = option(_int(0, 10_000_000), "10000",
        "pairs whose scores are kept for repeats (about 300 bytes each; 0 disables)")
    max_queued_requests: int = option(_int(1, 100_000), "32",
        "scoring requests admitted at once (running + waiting); beyond it 503 overloaded")
    request_timeout_ms: int = option(TIMEOUT_MS, "30000",
        "default per-request deadline; a request may ask for less or more (X-Request-Timeout-Ms, timeout_ms)")
    read_timeout_s: int = option(_int(1, 3600), "10", "seconds to receive a whole request once it has begun")
    idle_timeout_s: int = option(_int(1, 3600), "30", "seconds a keep-alive connection may sit idle")
    first_byte_timeout_s: int = option(_int(1, 3600), "5",
        "seconds a new connection may wait before sending its first byte (idle_timeout_s applies after a request)")
    max_header_bytes: int = option(_int(1024, 1 << 20), "65536",
        "largest request line plus headers, read before the API key is checked; beyond it 414 or 431")
    max_connections: int = option(_int(1, 100_000), "128", "open client connections; beyond it 503 at once")
    image_url_hosts: tuple[str, ...] = option(_parse_hosts, "",
        "hosts whose http(s) image URLs are fetched, comma-separated; '' = refuse image URLs", metavar="LIST")
    image_fetch_timeout_s: int = option(_int(1, 600), "10", "seconds to fetch one image URL, all of it")
    drain_grace_s: int = option(_int(0, 3600), "0",
        "on SIGTERM, seconds to keep serving with /readyz at 503 before the drain, so that a load balancer "
        "stops sending requests first (0 = drain at once)")
    drain_timeout_s: int = option(_int(0, 3600), "10", "on SIGTERM, seconds to let in-flight requests finish")
    failures_before_unready: int = option(_int(1, 1000), "3",
        "consecutive inference failures that flip /readyz to 503 (a success flips it back)")
    api_key: str = option(_parse_text, "",
        "require 'Authorization: Bearer KEY' on scoring routes and /metrics", metavar="KEY")
    api_key_file: str = option(_parse_path, "", "file holding the API key (first line); instead of api_key",
        metavar="FILE")
    allow_remote_without_key: bool = option(_parse_bool_option, "false",
        "allow binding a non-loopback address with no API key (a switch; the older `true`/`false` value still "
        "works)", switch=True)
    log_level: str = option(Choice(("DEBUG", "INFO", "WARNING", "ERROR")), "INFO", "how much the log says")
    strict_env: bool = option(_parse_bool_option, "false",
        f"stop at startup (exit 2) when an {ENV_PREFIX}* variable is not an option, instead of warning",
        switch=True)

    # The two questions about the NPU, answered here only:
    @property
    def is_npu(self) -> bool:
        """The NPU is asked for by name (NPU, NPU.N): the fail-closed proof applies."""
        return self.device.split(".")[0] == "NPU"

    @property
    def may_use_npu(self) -> bool:
        """The NPU may run the model (NPU, or AUTO/MULTI/HETERO listing it): static shapes by default, and the
        busy counter is read and reported (but only required when `is_npu`)."""
        return "NPU" in self.device

    @property
    def static_shapes(self) -> bool:
        return self.shape_mode == "static" or (self.shape_mode == "auto" and self.may_use_npu)


OPTIONS = tuple(replace(f.metadata["option"], name=f.name) for f in fields(Config))


# --help's sections, in order, and the options in each
HELP_GROUPS = (
    ("model", ("model", "model_dir", "model_file", "prompt_template", "instruction", "max_length")),
    ("device and speed", ("device", "shape_mode", "buckets", "batch_size", "pad_multiple", "performance_hint",
                          "num_streams", "replicas", "inference_threads", "infer_requests", "inference_precision",
                          "pooled_row_only",
                          "parity_tolerance", "on_parity_failure", "cache_dir", "score_cache_size", "npu_busy_path")),
    ("HTTP and access", ("host", "port", "api_key", "api_key_file", "allow_remote_without_key", "max_connections",
                         "max_header_bytes", "first_byte_timeout_s", "read_timeout_s", "idle_timeout_s",
                         "image_url_hosts", "image_fetch_timeout_s")),
    ("limits", ("max_body_bytes", "max_documents", "max_query_chars", "max_document_chars", "max_total_tokens",
                "max_image_bytes", "max_image_pixels", "max_images_per_request", "max_queued_requests",
                "request_timeout_ms")),
    ("operations", ("drain_grace_s", "drain_timeout_s", "failures_before_unready", "log_level", "strict_env")),
)
HELP_WIDTH = 100  # the examples' and exit codes' lines


class OneLineArgumentParser(argparse.ArgumentParser):
    """The server's and its subcommands' parser: a bad command line is one line and exit 2, not argparse's usage
    block."""

    def error(self, message: str):
        raise StartupError(f"bad command line: {message}", EXIT_CONFIG)


def int_argument(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse `type` for an integer in lo..hi, parsed as IntRange parses every integer here."""
    def parse(text: str) -> int:
        try:
            return IntRange(lo, hi).parse_text(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def invoked_as(argv0: str) -> str:
    """How to run this program again, as it was started: `openvino-reranker` for the installed command, `python
    server.py` for the script."""
    name = os.path.basename(argv0) or "openvino-reranker"
    return f"python {name}" if name.endswith(".py") else name


DEMO_MODEL_COMMAND = "demo-model"
EVAL_COMMAND = "eval"  # evaluate.py: a running service's ranking on the user's data
QUANTIZE_COMMAND = "quantize"  # quantize.py: a calibrated full-INT8 copy of a model (needs the quantize extra)


def parse_demo_model_args(argv: Sequence[str]) -> str:
    """`demo-model DIR`'s arguments: the directory, as typed."""
    parser = OneLineArgumentParser(prog=f"{os.path.basename(sys.argv[0])} {DEMO_MODEL_COMMAND}",
                             description="Write the demo model, a tiny cross-encoder with random weights built in "
                                         "code, to DIR (no network needed); then serve it with --model DIR. Its "
                                         "scores are meaningless: it shows the service working, not ranking.")
    parser.add_argument("dir", metavar="DIR", help="a new or empty directory (an earlier demo model is rewritten)")
    return parser.parse_args(argv).dir


def _metavar(opt: Option) -> dict[str, Any]:
    """How --help shows an option's value: a switch's optional true|false, a choice's list, else its name."""
    if opt.switch:
        return {"nargs": "?", "const": "true", "metavar": "true|false"}
    if isinstance(opt.parse, Choice):
        return {"metavar": "{" + ",".join(opt.parse.values) + "}"}
    return {"metavar": opt.metavar or ("N" if isinstance(opt.parse, IntRange) else opt.name.upper())}


def _help_epilog(command: str) -> str:
    """Two examples and the exit codes, with the program named as it was invoked."""
    demo = "~/openvino-reranker-demo"
    examples = ((f"{command} --device CPU",
                 "serve the default model on the CPU (fetched from the Hugging Face Hub on the first start)"),
                (f"{command} demo-model {demo} && {command} --device CPU --model {demo}",
                 "without the Hub: build the demo model (random weights, so meaningless scores) and serve it"))
    lines = ["examples:"]
    for example, what in examples:
        lines += [f"  {example}", f"      {what}"]
    lines += ["", "exit codes:"]
    for code, meaning in EXIT_CODES:
        lines += textwrap.wrap(meaning, HELP_WIDTH, initial_indent=f"  {code}  ", subsequent_indent=" " * 5)
    return "\n".join(lines)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's layout, but the description and epilog as written, the help text beginning further right so that
    most flags share its line, and a default such as a path or a Hub id never broken inside."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=34)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_long_words=False, break_on_hyphens=False)


def build_parser(argv0: str | None = None) -> argparse.ArgumentParser:
    """The command line: every option in its --help group, named as the program was invoked (`openvino-reranker`,
    `server.py`)."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    parser = OneLineArgumentParser(
        prog=os.path.basename(argv0) or "openvino-reranker", formatter_class=_HelpFormatter,
        usage="%(prog)s [OPTION ...]\n       %(prog)s demo-model DIR\n"
              "       %(prog)s eval --url URL --dataset DIR --run RUN [--compare URL2] [...]\n"
              "       %(prog)s quantize --model MODEL --output DIR [--calibration FILE.jsonl] [...]",
        description="A local reranker over HTTP on OpenVINO (NPU, CPU, GPU); SPEC.md has the contract.\n"
                    f"Every option is also an {ENV_PREFIX}* variable: --max-length is {ENV_PREFIX}MAX_LENGTH\n"
                    "(a flag wins). `demo-model DIR` writes a demo model, to try the service without the Hub.\n"
                    "`eval` measures a running service's ranking on your own data (`eval --help`).\n"
                    "`quantize` writes a calibrated full-INT8 copy of a model (`quantize --help`).",
        epilog=_help_epilog(invoked_as(argv0)))
    by_name = {opt.name: opt for opt in OPTIONS}
    for title, names in HELP_GROUPS:
        group = parser.add_argument_group(title)
        for opt in map(by_name.__getitem__, names):
            group.add_argument(opt.flag, dest=opt.name, default=None, **_metavar(opt),
                               help=f"{opt.help} (default: {opt.default or 'none'})")
    parser.add_argument("--version", action="version", version=f"openvino-reranker {__version__}")
    return parser


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Flags beat OPENVINO_RERANKER_* variables, which beat defaults. A bad value raises StartupError."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    values, explicit = {}, set()
    for opt in OPTIONS:
        raw, source = getattr(args, opt.name), opt.flag
        if raw is None and opt.env in environ:
            raw, source = environ[opt.env], opt.env
        if raw is None:
            raw, source = opt.default, "default"
        else:
            explicit.add(opt.name)
        try:
            values[opt.name] = opt.parse(raw)
        except ValueError as exc:
            raise StartupError(f"bad value for {source}: {exc}", EXIT_CONFIG) from None
    if not values["host"]:
        raise StartupError("bad value for host: empty", EXIT_CONFIG)
    if values["api_key"] and values["api_key_file"]:
        raise StartupError("set either api_key or api_key_file, not both", EXIT_CONFIG)
    if values["replicas"] > 1 and values["device"] != "CPU":
        raise StartupError(f"replicas above 1 are for the CPU device only (device {values['device']})", EXIT_CONFIG)
    if values["replicas"] > 1 and (values["performance_hint"] == "throughput" or values["num_streams"] > 1):
        raise StartupError("replicas above 1 run one stream each: set replicas, or performance_hint throughput / "
                           "num_streams, not both", EXIT_CONFIG)
    values["model"] = _model_source(values, explicit)
    unknown = unknown_variables(environ)
    if values["strict_env"] and unknown:
        raise StartupError(f"{'; '.join(map(describe_unknown_variable, unknown))}; --strict-env refuses unknown "
                           f"{ENV_PREFIX}* variables", EXIT_CONFIG)
    return Config(**values)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """The OPENVINO_RERANKER_* variables (in any case) that are not an option's: a misspelling is otherwise
    silently ignored."""
    known = {opt.env for opt in OPTIONS}
    return sorted(name for name in environ if name.upper().startswith(ENV_PREFIX) and name not in known)


def describe_unknown_variable(name: str) -> str:
    """'OPENVINO_RERANKER_DEVIC is not an option (did you mean OPENVINO_RERANKER_DEVICE?)': the closest option's
    variable by difflib's ratio of the names after the prefix, when one is close enough."""
    by_suffix = {opt.env[len(ENV_PREFIX):]: opt.env for opt in OPTIONS}
    close = difflib.get_close_matches(name[len(ENV_PREFIX):].upper(), by_suffix, n=1, cutoff=0.6)
    hint = f"did you mean {by_suffix[close[0]]}?" if close else "no option has a similar name; see --help"
    return f"{name} is not an option ({hint})"


def _model_source(values: dict, explicit: set) -> str:
    """What --model serves: --model-dir when given (the older flag), the model named, or by default the directory
    earlier versions served by default if it holds an export, else DEFAULT_MODEL from the Hub."""
    if values["model_dir"]:
        if "model" in explicit:
            raise StartupError("set either model or model_dir, not both", EXIT_CONFIG)
        return values["model_dir"]
    if not values["model"]:
        raise StartupError("bad value for model: empty", EXIT_CONFIG)
    legacy = os.path.expanduser(LEGACY_MODEL_DIR)
    if "model" not in explicit and os.path.isfile(os.path.join(legacy, "openvino_model.xml")):
        return legacy
    return values["model"]


def load_api_key(config: Config) -> str:
    """The API key from api_key or the first line of api_key_file; '' when none is set."""
    return read_api_key(config.api_key, config.api_key_file)


def read_api_key(api_key: str, api_key_file: str) -> str:
    """`api_key` itself, or the first line of the file `api_key_file`; '' when neither is set."""
    if not api_key_file:
        return _check_api_key(api_key, "api_key") if api_key else ""
    try:
        with open(api_key_file, encoding="utf-8") as f:
            key = f.readline().strip()
    except OSError as exc:
        raise StartupError(f"cannot read api_key_file {api_key_file}: {exc.strerror}", EXIT_CONFIG) from None
    except UnicodeDecodeError:
        raise StartupError(f"api_key_file {api_key_file} is not UTF-8 text", EXIT_CONFIG) from None
    if not key:
        raise StartupError(f"api_key_file {api_key_file} is empty", EXIT_CONFIG)
    return _check_api_key(key, f"the key in {api_key_file}")


def client_api_key(environ: Mapping[str, str]) -> str:
    """The key a client of this service sends (`openvino-reranker eval`): OPENVINO_RERANKER_API_KEY, or the first
    line of OPENVINO_RERANKER_API_KEY_FILE, read and checked as the server reads its own; '' when neither is set."""
    key = environ.get(ENV_PREFIX + "API_KEY", "").strip()
    key_file = _parse_path(environ.get(ENV_PREFIX + "API_KEY_FILE", ""))
    if key and key_file:
        raise StartupError(f"set either {ENV_PREFIX}API_KEY or {ENV_PREFIX}API_KEY_FILE, not both", EXIT_CONFIG)
    return read_api_key(key, key_file)


def _check_api_key(key: str, source: str) -> str:
    """HTTP header values are Latin-1 on the wire and clients send keys as ASCII: a key with other characters
    could never match, so it stops startup instead of locking every client out."""
    if not all(33 <= ord(c) <= 126 for c in key):
        raise StartupError(f"{source} must be printable ASCII without spaces", EXIT_CONFIG)
    return key


def is_loopback(host: str) -> bool:
    """True when every address `host` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)
