"""A small synthetic BEIR dataset and a first-stage TREC run, for `openvino-reranker eval` (tests and the
example in docs/performance.md). Deterministic for a seed; nothing is downloaded.

    python tests/evaldata.py OUT_DIR [--queries 40] [--documents 400] [--seed 0]

writes OUT_DIR/dataset/{corpus.jsonl, queries.jsonl, qrels/test.tsv} and OUT_DIR/run.trec.

Each query is a few words taken from one document (its answer, grade 2); the documents sharing most of its words
besides that one get grade 1, and two random ones grade 0. The first stage is word overlap: a document's score is
the number of distinct query words it contains, so scores tie often (which exercises trec_eval's tie-break), and
the run's rank column numbers the documents in an order that differs from that tie-break on purpose. One judged
query is missing from the run and one run query has no judgments; one candidate has neither title nor text.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from tinymodel import WORDS


@dataclass(frozen=True)
class Generated:
    dataset: Path  # the BEIR directory
    run: Path  # the TREC run file
    qrels: dict[str, dict[str, int]]
    run_scores: dict[str, dict[str, float]]


def write_dataset(out: Path, queries: int = 8, documents: int = 60, run_depth: int = 30, seed: int = 0,
                  words: tuple[str, ...] | list[str] = WORDS, doc_words: tuple[int, int] = (12, 30)) -> Generated:
    rng = random.Random(seed)
    vocabulary = sorted(set(words))

    def phrase(lo: int, hi: int) -> list[str]:
        return [rng.choice(vocabulary) for _ in range(rng.randint(lo, hi))]

    corpus = {}
    for i in range(documents):
        title = " ".join(phrase(1, 3)) if i % 3 else ""  # some documents have no title, as in many BEIR sets
        corpus[f"doc{i}"] = {"_id": f"doc{i}", "title": title, "text": " ".join(phrase(*doc_words))}
    corpus["doc-empty"] = {"_id": "doc-empty", "title": "", "text": ""}
    doc_words_of = {d: set((r["title"] + " " + r["text"]).split()) for d, r in corpus.items()}

    query_texts, qrels, run = {}, {}, {}
    for i in range(queries):
        qid = f"q{i}"
        answer = f"doc{rng.randrange(documents)}"
        terms = rng.sample(sorted(doc_words_of[answer]), k=min(4, len(doc_words_of[answer])))
        query_texts[qid] = " ".join(terms)
        overlap = {d: len(doc_words_of[d] & set(terms)) for d in corpus}
        near = sorted((d for d in corpus if d != answer), key=lambda d: (-overlap[d], d))[:2]
        qrels[qid] = {answer: 2, **{d: 1 for d in near}}
        for d in rng.sample(sorted(set(corpus) - {answer, *near}), k=2):
            qrels[qid][d] = 0
        ranked = sorted(corpus, key=lambda d: -overlap[d])[:run_depth]  # stable: corpus order within a tie
        run[qid] = {d: float(overlap[d]) for d in ranked if d != "doc-empty"}
        if i == 0:  # a candidate without text, near the top
            run[qid] = {**dict(list(run[qid].items())[:run_depth - 1]), "doc-empty": float(overlap[ranked[0]])}
    query_texts["q-unjudged"] = "a query nobody judged"
    run["q-unjudged"] = {"doc0": 1.0, "doc1": 0.5}
    query_texts["q-no-run"] = "a judged query the first stage missed"
    qrels["q-no-run"] = {"doc1": 1}

    dataset = out / "dataset"
    (dataset / "qrels").mkdir(parents=True, exist_ok=True)
    (dataset / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus.values()), encoding="utf-8")
    (dataset / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": t, "metadata": {}}) + "\n" for q, t in query_texts.items()),
        encoding="utf-8")
    (dataset / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n"
        + "".join(f"{q}\t{d}\t{g}\n" for q, judged in qrels.items() for d, g in judged.items()), encoding="utf-8")
    run_path = out / "run.trec"
    run_path.write_text("".join(f"{q} Q0 {d} {rank} {score:g} overlap\n" for q, scores in run.items()
                                for rank, (d, score) in enumerate(scores.items(), 1)), encoding="utf-8")
    return Generated(dataset, run_path, qrels, run)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--documents", type=int, default=400)
    parser.add_argument("--run-depth", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    made = write_dataset(args.out, args.queries, args.documents, args.run_depth, args.seed)
    print(f"{made.dataset} {made.run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
