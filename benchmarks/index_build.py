"""FAISS build time, queries/s and recall@10 for a few factory strings, on CPU.

Synthetic clustered, L2-normalised 384-d vectors stand in for MiniLM embeddings (no encoder
run, so it is quick); the build and the recall/QPS report are the index job's own functions
(`retrieval_index.build.train_and_add`, `recall_report`: 1000 noisy stored vectors as queries,
recall against exact search, default search parameters).

    .venv/bin/python benchmarks/index_build.py [--num-docs 100000] [--factories Flat 'IVF1024,Flat' HNSW32]
"""

from __future__ import annotations

import argparse
import json
import time

import faiss
import numpy as np

from retrieval_index.build import (
    apply_search_params,
    default_search_params,
    recall_report,
    train_and_add,
)


def clustered_vectors(
    num_docs: int, dim: int, num_clusters: int, spread: float, seed: int
) -> np.ndarray:
    """Unit vectors around `num_clusters` random centres (noise of norm ~`spread`)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors = centres[rng.integers(0, num_clusters, size=num_docs)]
    vectors += rng.standard_normal((num_docs, dim)).astype(np.float32) * (spread / np.sqrt(dim))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--num-docs", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--num-clusters", type=int, default=2000)
    p.add_argument(
        "--spread", type=float, default=0.8, help="noise norm around each cluster centre"
    )
    p.add_argument("--factories", nargs="+", default=["Flat", "IVF1024,Flat", "HNSW32"])
    p.add_argument("--num-queries", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    vectors = clustered_vectors(args.num_docs, args.dim, args.num_clusters, args.spread, args.seed)
    rows = []
    for factory in args.factories:
        start = time.perf_counter()
        index, info = train_and_add(vectors, factory, train_size=None, seed=args.seed)
        build_seconds = time.perf_counter() - start
        params = default_search_params(index)
        apply_search_params(index, params)
        report = recall_report(index, vectors, num_queries=args.num_queries, seed=args.seed)
        rows.append(
            {
                "factory": factory,
                "build_s": round(build_seconds, 2),
                "train_s": info["train_seconds"],
                "qps": report["qps"],
                "recall_at_10": report["recall_at_10"],
                "search_params": params,
            }
        )

    print(
        f"{args.num_docs} docs x {args.dim}-d, {faiss.omp_get_max_threads()} FAISS threads, "
        f"{args.num_queries} queries (stored vectors + noise 0.1), k=10"
    )
    print(f"{'factory':22s} {'build s':>8s} {'train s':>8s} {'QPS':>10s} {'recall@10':>9s}  params")
    for r in rows:
        print(
            f"{r['factory']:22s} {r['build_s']:8.2f} {r['train_s']:8.2f} {r['qps']:10.0f} "
            f"{r['recall_at_10']:9.3f}  {r['search_params']}"
        )
    print(
        json.dumps(
            {
                "benchmark": "index_build",
                "num_docs": args.num_docs,
                "dim": args.dim,
                "faiss": faiss.__version__,
                "faiss_threads": faiss.omp_get_max_threads(),
                "results": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
