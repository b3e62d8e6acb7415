"""openvino-reranker: a local cross-encoder reranking service on the Intel NPU, with a CPU fallback.

SPEC.md is the contract for routes, fields, errors and exit codes; README.md, "Development", maps the modules.
"""

__version__ = "0.1.0"
