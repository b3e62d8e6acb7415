"""Run the real RAG client libraries against the service and check they get the native route's ranking.

Not part of CI: it creates one venv per client (cached), installs pinned releases from the package registry, and
runs a small snippet in each that calls the service the way the client's docs say. Every client talks to the service
through a small logging proxy in this script, so the request path and body each client sent are recorded.

    .venv/bin/python bench/clients.py --start                 # build the tests' tiny model and start server.py
    .venv/bin/python bench/clients.py --url http://127.0.0.1:18818 --only cohere-v2 litellm-cohere
    .venv/bin/python bench/clients.py --start --json /tmp/clients.json

For each client it prints `client version route result`, where result is `ok` or `FAIL: <reason>`, then the request(s)
the client sent; the exit code is 1 when any client failed, 2 when the run could not be set up. A client passes when
it returns every document in the native route's order (score descending, ties by ascending index) with scores within
1e-4 of the native scores (sigmoid of the client's number for a client that returns raw logits).

Standard library only. Never installs torch: each env's resolution is checked with `pip install --dry-run --report`
first and refused if it names torch, triton or an nvidia-* package.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from serverproc import ServerError, start_server

REPO = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4
DEFAULT_ENVS = Path.home() / ".cache" / "openvino-reranker-clients"

QUERY = "how to boil water at sea level"
DOCS = [
    "water boils at one hundred degrees celsius at sea level",
    "the museum in paris has art from the history of france",
    "boil the water, then add salt and the pasta",
    "solar power is energy from the sun",
    "at sea level water boils sooner than on a mountain",
]

# One venv per entry: the pip requirements it is built from (the cache key).
ENVS = {
    "cohere": ["cohere==7.3.1"],
    "langchain-cohere": ["langchain-cohere==0.6.0"],
    "llama-cohere": ["llama-index-postprocessor-cohere-rerank==0.10.0"],
    "llama-tei": ["llama-index-postprocessor-tei-rerank==0.6.0"],
    "llama-jina": ["llama-index-postprocessor-jinaai-rerank==0.6.0"],
    "litellm": ["litellm==1.106.2"],
    "infinity-client": ["infinity_client==0.0.78"],
    # InfinityRerank imports infinity_client lazily: without it the class cannot be built.
    "langchain-community": ["langchain-community==0.4.2", "infinity_client==0.0.78"],
    # HuggingFaceTEIRanker left haystack-ai in 3.x: it is in the huggingface-api-haystack integration.
    "haystack": ["haystack-ai==3.4.0", "cohere-haystack==11.0.0", "jina-haystack==2.0.1",
                 "huggingface-api-haystack==3.1.0"],
}
FORBIDDEN = ("torch", "triton", "nvidia-")

# ---------------------------------------------------------------------------------------------- the snippets
# Each runs in its client's venv with BASE (the proxy's base URL), QUERY, DOCS and N = len(DOCS) defined, and sets
# RESULT to [(index, score), ...] in the order the client returned them.

COHERE_V1 = """
import cohere
co = cohere.Client(api_key="unused", base_url=BASE)
r = co.rerank(model="rerank-v3.5", query=QUERY, documents=DOCS, top_n=N)
RESULT = [(x.index, x.relevance_score) for x in r.results]
"""

COHERE_V2 = """
import cohere
co = cohere.ClientV2(api_key="unused", base_url=BASE)
r = co.rerank(model="rerank-v3.5", query=QUERY, documents=DOCS, top_n=N)
RESULT = [(x.index, x.relevance_score) for x in r.results]
"""

LANGCHAIN_COHERE = """
from langchain_cohere import CohereRerank
from langchain_core.documents import Document
rr = CohereRerank(base_url=BASE, cohere_api_key="unused", model="rerank-v3.5", top_n=N)
out = rr.compress_documents([Document(page_content=d, metadata={"i": i}) for i, d in enumerate(DOCS)], QUERY)
RESULT = [(d.metadata["i"], d.metadata["relevance_score"]) for d in out]
"""

LLAMA_NODES = """
from llama_index.core.schema import NodeWithScore, TextNode
NODES = [NodeWithScore(node=TextNode(text=d, id_=str(i))) for i, d in enumerate(DOCS)]
def from_nodes(out):
    return [(int(n.node.node_id), n.score) for n in out]
"""

LLAMA_COHERE = LLAMA_NODES + """
from llama_index.postprocessor.cohere_rerank import CohereRerank
rr = CohereRerank(api_key="unused", base_url=BASE, top_n=N, model="rerank-v3.5", max_retries=1)
RESULT = from_nodes(rr.postprocess_nodes(NODES, query_str=QUERY))
"""

LLAMA_TEI = LLAMA_NODES + """
from llama_index.postprocessor.tei_rerank import TextEmbeddingInference
rr = TextEmbeddingInference(base_url=BASE, top_n=N)
RESULT = from_nodes(rr.postprocess_nodes(NODES, query_str=QUERY))
"""

LLAMA_JINA = LLAMA_NODES + """
from llama_index.postprocessor.jinaai_rerank import JinaRerank
# base_url is the API root including /v1 (default "https://api.jina.ai/v1"); the class appends /rerank.
rr = JinaRerank(api_key="unused", base_url=BASE + "/v1", top_n=N, model="jina-reranker-v2-base-multilingual")
RESULT = from_nodes(rr.postprocess_nodes(NODES, query_str=QUERY))
"""

LITELLM = """
import litellm
r = litellm.rerank(model=MODEL, query=QUERY, documents=DOCS, top_n=N, api_base=BASE + SUFFIX, api_key="unused")
RESULT = [(x["index"], x["relevance_score"]) for x in r.results]
"""

INFINITY_CLIENT = """
from infinity_client import Client
from infinity_client.api.default import rerank
from infinity_client.models import ReRankResult, RerankInput
with Client(base_url=BASE) as client:
    resp = rerank.sync_detailed(client=client, body=RerankInput(query=QUERY, documents=DOCS, top_n=N))
if not isinstance(resp.parsed, ReRankResult):
    raise RuntimeError(f"HTTP {int(resp.status_code)}: {resp.content[:300].decode('utf-8', 'replace')}")
RESULT = [(x.index, x.relevance_score) for x in resp.parsed.results]
"""

LANGCHAIN_INFINITY = """
from infinity_client import Client
from langchain_community.document_compressors.infinity_rerank import InfinityRerank
from langchain_core.documents import Document
rr = InfinityRerank(client=Client(base_url=BASE), model="mixedbread-ai/mxbai-rerank-xsmall-v1", top_n=N)
out = rr.compress_documents([Document(page_content=d, metadata={"i": i}) for i, d in enumerate(DOCS)], QUERY)
RESULT = [(d.metadata["i"], d.metadata["relevance_score"]) for d in out]
"""

HAYSTACK_DOCS = """
from haystack import Document
from haystack.utils import Secret
DOCUMENTS = [Document(content=d, id=str(i)) for i, d in enumerate(DOCS)]
def from_docs(out):
    return [(int(d.id), d.score) for d in out["documents"]]
"""

HAYSTACK_COHERE = HAYSTACK_DOCS + """
from haystack_integrations.components.rankers.cohere import CohereRanker
ranker = CohereRanker(api_key=Secret.from_token("unused"), api_base_url=BASE, top_k=N)
RESULT = from_docs(ranker.run(query=QUERY, documents=DOCUMENTS))
"""

HAYSTACK_JINA = HAYSTACK_DOCS + """
from haystack_integrations.components.rankers.jina import JinaRanker
# base_url is the full endpoint (default "https://api.jina.ai/v1/rerank").
ranker = JinaRanker(api_key=Secret.from_token("unused"), base_url=BASE + "/v1/rerank", top_k=N)
RESULT = from_docs(ranker.run(query=QUERY, documents=DOCUMENTS))
"""

HAYSTACK_TEI = HAYSTACK_DOCS + """
from haystack_integrations.components.rankers.huggingface_api import HuggingFaceTEIRanker
ranker = HuggingFaceTEIRanker(url=BASE, top_k=N)
RESULT = from_docs(ranker.run(query=QUERY, documents=DOCUMENTS))
"""


@dataclass(frozen=True)
class ClientSpec:
    name: str
    env: str
    packages: tuple[str, ...]  # first: the client itself; the rest are shown in parentheses
    code: str
    setup: str = ""  # prepended (e.g. MODEL = ...)
    raw_logits: bool = False  # the client returns logits: compare sigmoid(score)


def litellm_client(name: str, model: str, suffix: str = "") -> ClientSpec:
    """litellm.rerank with api_base = the base URL plus suffix (infinity/ and hosted_vllm/ append /rerank to it)."""
    return ClientSpec(name, "litellm", ("litellm",), LITELLM, setup=f"MODEL = {model!r}\nSUFFIX = {suffix!r}\n")


CLIENTS = [
    ClientSpec("cohere-v1", "cohere", ("cohere",), COHERE_V1),
    ClientSpec("cohere-v2", "cohere", ("cohere",), COHERE_V2),
    ClientSpec("langchain-cohere", "langchain-cohere", ("langchain-cohere", "cohere"), LANGCHAIN_COHERE),
    ClientSpec("llama-index-cohere", "llama-cohere",
               ("llama-index-postprocessor-cohere-rerank", "cohere", "llama-index-core"), LLAMA_COHERE),
    ClientSpec("llama-index-tei", "llama-tei", ("llama-index-postprocessor-tei-rerank", "llama-index-core"),
               LLAMA_TEI),
    ClientSpec("llama-index-jina", "llama-jina", ("llama-index-postprocessor-jinaai-rerank", "llama-index-core"),
               LLAMA_JINA),
    litellm_client("litellm-cohere", "cohere/rerank-v3.5"),
    litellm_client("litellm-huggingface", "huggingface/BAAI/bge-reranker-base"),
    litellm_client("litellm-jina_ai", "jina_ai/jina-reranker-v2-base-multilingual"),
    litellm_client("litellm-infinity", "infinity/BAAI/bge-reranker-base"),
    litellm_client("litellm-hosted_vllm", "hosted_vllm/BAAI/bge-reranker-base"),
    # An api_base ending in /v1 (a common way to write an OpenAI-style base) makes both call /v1/rerank.
    litellm_client("litellm-infinity-v1", "infinity/BAAI/bge-reranker-base", "/v1"),
    litellm_client("litellm-hosted_vllm-v1", "hosted_vllm/BAAI/bge-reranker-base", "/v1"),
    ClientSpec("infinity_client", "infinity-client", ("infinity_client",), INFINITY_CLIENT),
    ClientSpec("langchain-infinity", "langchain-community", ("langchain-community", "infinity_client"),
               LANGCHAIN_INFINITY),
    ClientSpec("haystack-cohere", "haystack", ("cohere-haystack", "haystack-ai", "cohere"), HAYSTACK_COHERE),
    ClientSpec("haystack-jina", "haystack", ("jina-haystack", "haystack-ai"), HAYSTACK_JINA),
    ClientSpec("haystack-tei", "haystack", ("huggingface-api-haystack", "haystack-ai"), HAYSTACK_TEI),
]

# Runs in the client's venv: reads {"code", "packages", "base", "query", "docs"} on stdin, prints one marked JSON line.
HARNESS = r"""
import json, sys, traceback
import importlib.metadata as md
cfg = json.load(sys.stdin)
out = {"versions": {}}
for p in cfg["packages"]:
    try:
        out["versions"][p] = md.version(p)
    except Exception:
        out["versions"][p] = None
ns = {"BASE": cfg["base"], "QUERY": cfg["query"], "DOCS": cfg["docs"], "N": len(cfg["docs"])}
try:
    exec(compile(cfg["code"], "<client snippet>", "exec"), ns)
    out["results"] = [[int(i), float(s)] for i, s in ns["RESULT"]]
except BaseException as e:
    traceback.print_exc()
    out["error"] = (type(e).__name__ + ": " + str(e)).strip()
sys.stdout.flush()
print("\n@@CLIENTS-RESULT@@" + json.dumps(out))
"""
MARK = "@@CLIENTS-RESULT@@"

# Quiet, offline-friendly client settings: no telemetry, no model-cost-map download, no proxies for loopback.
CLIENT_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOG": "ERROR",
    "HAYSTACK_TELEMETRY_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "NO_PROXY": "127.0.0.1,localhost,::1",
    "no_proxy": "127.0.0.1,localhost,::1",
    "PYTHONUNBUFFERED": "1",
}


# ---------------------------------------------------------------------------------------------- logging proxy

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "content-length", "host", "accept-encoding", "expect"}


def decode_body(raw: bytes):
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


class Proxy:
    """A loopback HTTP proxy in a thread: forwards every request to the service and records it."""

    def __init__(self, upstream_host: str, upstream_port: int):
        self.records: list[dict] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def read_body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def forward(self):
                body = self.read_body()
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                record = {"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                          "body": decode_body(body)}
                try:
                    conn = http.client.HTTPConnection(upstream_host, upstream_port, timeout=120)
                    conn.request(self.command, self.path, body=body if body or self.command != "GET" else None,
                                 headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    status, reason, resp_headers = resp.status, resp.reason, resp.getheaders()
                    conn.close()
                except OSError as e:
                    status, reason, resp_headers = 502, "Bad Gateway", [("Content-Type", "application/json")]
                    data = json.dumps({"error": f"proxy: {e}"}).encode()
                record["status"] = status
                record["response"] = decode_body(data)
                with proxy.lock:
                    proxy.records.append(record)
                self.send_response(status, reason)
                for k, v in resp_headers:
                    if k.lower() not in HOP_BY_HOP and k.lower() not in ("date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------------------------- envs


class EnvError(Exception):
    pass


def python_in(env_dir: Path) -> Path:
    return env_dir / "bin" / "python"


def ensure_env(envs: Path, name: str, log) -> Path:
    """The venv for ENVS[name], created and installed once; later runs reuse it while its requirements match."""
    reqs = ENVS[name]
    env_dir = envs / name
    marker = env_dir / ".clients-spec"
    if python_in(env_dir).exists() and marker.exists() and marker.read_text().strip() == " ".join(reqs):
        return python_in(env_dir)
    log(f"[env] creating {env_dir}: pip install {' '.join(reqs)}")
    shutil.rmtree(env_dir, ignore_errors=True)
    envs.mkdir(parents=True, exist_ok=True)
    python3 = shutil.which("python3") or sys.executable
    run = subprocess.run([python3, "-m", "venv", str(env_dir)], capture_output=True, text=True)
    if run.returncode:
        raise EnvError(f"venv: {run.stderr.strip()[-300:]}")
    pip = [str(python_in(env_dir)), "-m", "pip", "--disable-pip-version-check"]
    report = env_dir / "dry-run.json"
    run = subprocess.run(pip + ["install", "--dry-run", "--quiet", "--report", str(report), *reqs],
                         capture_output=True, text=True, timeout=600)
    if run.returncode:
        raise EnvError(f"pip resolve: {run.stderr.strip()[-300:]}")
    names = [item["metadata"]["name"].lower() for item in json.loads(report.read_text()).get("install", [])]
    bad = [n for n in names if n == "torch" or n == "triton" or n.startswith("nvidia-")]
    if bad:
        raise EnvError(f"refused: the install would pull {', '.join(bad)} (install with --no-deps instead)")
    run = subprocess.run(pip + ["install", "--quiet", *reqs], capture_output=True, text=True, timeout=900)
    if run.returncode:
        raise EnvError(f"pip install: {run.stderr.strip()[-300:]}")
    marker.write_text(" ".join(reqs) + "\n")
    return python_in(env_dir)


# ---------------------------------------------------------------------------------------------- service


def die(msg: str):
    """Setup failed: exit 2 (a client failure is 1)."""
    print(msg, file=sys.stderr)
    raise SystemExit(2)


def call(host: str, port: int, method: str, path: str, body=None, timeout: float = 60.0):
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        return resp.status, decode_body(resp.read())
    finally:
        conn.close()


def loopback_target(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        die(f"--url must be http://HOST:PORT on loopback, got {url!r}")
    if parts.path not in ("", "/"):
        die(f"--url is the service's base URL (no path), got {url!r}")
    port = parts.port or 80
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)}
    except OSError as e:
        die(f"--url: cannot resolve {parts.hostname}: {e}")
    if not addrs or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
        die(f"--url must point at a loopback address, {parts.hostname} is {sorted(addrs)}")
    return parts.hostname, port


class Service:
    """server.py on the tests' tiny model, started and stopped by this script."""

    def __init__(self, python: str, log):
        self.tmp = Path(tempfile.mkdtemp(prefix="clients-service-"))
        run = subprocess.run([python, str(REPO / "tests" / "tinymodel.py"), str(self.tmp / "model")],
                             capture_output=True, text=True, timeout=300)
        if run.returncode:
            shutil.rmtree(self.tmp, ignore_errors=True)
            die(f"tests/tinymodel.py failed:\n{run.stderr[-2000:]}")
        model_dir = run.stdout.strip().splitlines()[-1]
        args = ["--device", "CPU", "--inference-precision", "f32", "--model-dir", model_dir, "--cache-dir", ""]
        log(f"[service] {python} server.py {' '.join(args)}")
        try:
            self.server = start_server(args, python=python, ready_within_s=180, log_path=self.tmp / "server.log")
        except ServerError as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            die(str(e))
        self.port = self.server.port
        log(f"[service] ready on 127.0.0.1:{self.port}")

    def stop(self) -> None:
        self.server.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- running and checking


@dataclass
class Outcome:
    client: str
    version: str = ""
    routes: list[str] = field(default_factory=list)
    ok: bool = False
    reason: str = ""
    results: list | None = None
    requests: list[dict] = field(default_factory=list)
    stderr_tail: str = ""

    def route(self) -> str:
        return ",".join(self.routes) or "-"

    def result(self) -> str:
        return "ok" if self.ok else "FAIL: " + self.reason


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def compare(native: dict[int, float], results: list, raw_logits: bool) -> str:
    """'' when the client's [(index, score)] in its order match the native ranking, else why not."""
    expected = sorted(native, key=lambda i: (-native[i], i))
    got = [i for i, _ in results]
    if got != expected:
        return f"order {got} != native {expected}"
    scores = {i: (sigmoid(s) if raw_logits else s) for i, s in results}
    worst = max(expected, key=lambda i: abs(scores[i] - native[i]))
    gap = abs(scores[worst] - native[worst])
    if not gap <= TOLERANCE:
        return f"score of document {worst}: {scores[worst]:.6g} vs native {native[worst]:.6g} (|diff| {gap:.2g})"
    return ""


def version_text(spec: ClientSpec, versions: dict) -> str:
    main = f"{spec.packages[0]} {versions.get(spec.packages[0]) or '?'}"
    extra = [f"{p} {versions.get(p) or '?'}" for p in spec.packages[1:]]
    return main + (f" ({', '.join(extra)})" if extra else "")


def run_client(spec: ClientSpec, envs: Path, upstream: tuple[str, int], native: dict[int, float],
               timeout: float, log, env_locks: dict[str, threading.Lock]) -> Outcome:
    outcome = Outcome(spec.name, version=spec.packages[0])
    try:
        with env_locks[spec.env]:
            python = ensure_env(envs, spec.env, log)
    except (EnvError, subprocess.TimeoutExpired, OSError) as e:
        outcome.reason = f"env {spec.env}: {e}"
        return outcome
    proxy = Proxy(*upstream)
    try:
        payload = json.dumps({"code": spec.setup + spec.code, "packages": list(spec.packages), "base": proxy.base,
                              "query": QUERY, "docs": DOCS})
        env = {**os.environ, **CLIENT_ENV}
        for var in ("COHERE_API_KEY", "CO_API_KEY", "JINA_API_KEY", "JINAAI_API_KEY", "HF_TOKEN", "HF_API_TOKEN"):
            env.pop(var, None)
        try:
            run = subprocess.run([str(python), "-c", HARNESS], input=payload, capture_output=True, text=True,
                                 timeout=timeout, env=env, cwd=tempfile.gettempdir())
            stdout, stderr = run.stdout, run.stderr
        except subprocess.TimeoutExpired as e:
            err = e.stderr or ""
            stdout, stderr = "", err.decode("utf-8", "replace") if isinstance(err, bytes) else err
            outcome.reason = f"timed out after {timeout:.0f} s"
    finally:
        proxy.close()
    outcome.requests = proxy.records
    outcome.routes = list(dict.fromkeys(f"{r['method']} {r['path']}" if r["method"] != "POST" else r["path"]
                                        for r in proxy.records))
    outcome.stderr_tail = stderr[-4000:]
    marked = [line for line in stdout.splitlines() if line.startswith(MARK)]
    if not marked:
        outcome.reason = outcome.reason or f"no result from the snippet: {stderr.strip()[-300:]}"
        return outcome
    result = json.loads(marked[-1][len(MARK):])
    outcome.version = version_text(spec, result.get("versions", {}))
    if "error" in result:
        statuses = [str(r["status"]) for r in proxy.records if r.get("status") != 200]
        outcome.reason = (f"HTTP {','.join(statuses)}; " if statuses else "") + one_line(result["error"], 400)
        return outcome
    outcome.results = result["results"]
    outcome.reason = compare(native, outcome.results, spec.raw_logits)
    outcome.ok = not outcome.reason
    return outcome


def one_line(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running service's base URL (loopback only), e.g. http://127.0.0.1:18818")
    where.add_argument("--start", action="store_true",
                       help="build the tests' tiny model and start server.py on a free port (stopped at the end)")
    parser.add_argument("--envs", type=Path, default=DEFAULT_ENVS, help=f"venv cache (default {DEFAULT_ENVS})")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these clients: "
                        + ", ".join(c.name for c in CLIENTS))
    parser.add_argument("--json", metavar="PATH", help="also write every outcome, with the recorded requests and "
                        "responses, as JSON to PATH ('-' for stdout)")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per client snippet (default 240)")
    parser.add_argument("--jobs", type=int, default=2, help="clients run at once (default 2)")
    parser.add_argument("--server-python", default=sys.executable,
                        help="python that runs server.py and tests/tinymodel.py with --start (default: this one)")
    args = parser.parse_args(argv)

    names = {c.name for c in CLIENTS}
    if args.only and (unknown := [n for n in args.only if n not in names]):
        parser.error(f"unknown client(s) {unknown}; known: {', '.join(c.name for c in CLIENTS)}")
    chosen = [c for c in CLIENTS if not args.only or c.name in args.only]
    to_stdout = args.json == "-"

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if to_stdout else sys.stdout, flush=True)

    service = Service(args.server_python, log) if args.start else None
    try:
        upstream = ("127.0.0.1", service.port) if service else loopback_target(args.url)
        try:
            status, body = call(*upstream, "POST", "/rerank", {"query": QUERY, "documents": DOCS})
        except OSError as e:
            die(f"native POST /rerank to {upstream[0]}:{upstream[1]} failed: {e}")
        if status != 200 or not isinstance(body, dict):
            die(f"native POST /rerank failed: {status} {body}")
        native = {r["index"]: r["score"] for r in body["results"]}
        locks = {name: threading.Lock() for name in ENVS}
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [pool.submit(run_client, spec, args.envs, upstream, native, args.timeout, log, locks)
                       for spec in chosen]
            outcomes = [f.result() for f in futures]
    finally:
        if service:
            service.stop()

    out = sys.stderr if to_stdout else sys.stdout
    print(f"\nnative POST /rerank order {sorted(native, key=lambda i: (-native[i], i))}, scores "
          + json.dumps({i: round(native[i], 6) for i in sorted(native)}), file=out)
    rows = [("client", "version", "route", "result")] + [(o.client, o.version, o.route(), o.result()) for o in outcomes]
    widths = [max(len(row[k]) for row in rows) for k in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)) + "  " + row[3], file=out)
    print("\nrequests sent (path and body, through the logging proxy):", file=out)
    for o in outcomes:
        for r in o.requests:
            ua = r["headers"].get("User-Agent") or r["headers"].get("user-agent") or ""
            print(f"  {o.client:<{widths[0]}}  {r['method']} {r['path']} -> {r['status']}  UA={ua!r}\n"
                  f"  {'':<{widths[0]}}  {json.dumps(r['body'], separators=(',', ':'))}", file=out)
        if not o.requests:
            print(f"  {o.client:<{widths[0]}}  (no request)", file=out)
    if args.json:
        doc = {"query": QUERY, "documents": DOCS, "native": {str(i): s for i, s in native.items()},
               "clients": [o.__dict__ for o in outcomes]}
        text = json.dumps(doc, indent=2)
        if to_stdout:
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    failed = [o.client for o in outcomes if not o.ok]
    print(f"\n{len(outcomes) - len(failed)} ok, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""),
          file=out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
