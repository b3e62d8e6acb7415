"""openvino-reranker: a local cross-encoder reranking service on the Intel NPU, with a CPU fallback.

SPEC.md is the contract for routes, fields, errors and exit codes; ARCHITECTURE.md, "Modules", maps the modules.
"""

__version__ = "0.1.0"

# The modules in reading order, which is also the import order: each imports only modules listed before it
# (tests/test_structure.py checks this), so the package reads top to bottom along a request's path.
MODULES = (
    "errors", "config", "cpu", "scoring", "batching", "textcut", "images", "vision", "encoding", "visionhead", "cache",
    "compilecache", "graphfacts", "graphopt", "engine", "batcher", "reranker", "hub", "referencescores", "modeldir",
    "demomodel", "checks", "parity", "api", "dialects", "remoteimages", "metrics", "service", "framing",
    "connection", "httpserver", "ranking", "evaluate", "quantize", "systemd", "startup",
)
