"""openvino-reranker's entry point: `python server.py --help`. The service lives in the `openvino_reranker`
package; SPEC.md is the contract for routes, fields, errors, configuration and exit codes."""

import sys

from openvino_reranker.startup import main

if __name__ == "__main__":
    sys.exit(main())
