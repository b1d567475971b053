"""Embedding throughput: the index job's TextDocumentEmbedder vs sentence-transformers' encode.

Same bundled all-MiniLM-L6-v2, same synthetic corpus (docs of 20-120 words), same batch size,
same process; each side is warmed up, then timed `--repeats` times (best kept), alternating.

    .venv/bin/python benchmarks/embed_throughput.py [--num-docs 5000] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

_VOCABULARY = """
the of and to in is was for on that with as by at from his her an are were which this
be or had not but also its their have one after first new has two been other who time
city river school world war year state music film team game company station church
village population river mountain island language species album season museum bridge
railway university government history century national district county king queen army
battle ocean forest market harbour engine signal copper glass ancient quiet bright
"""
WORDS = _VOCABULARY.split()


def synthetic_corpus(num_docs: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 121, size=num_docs)
    return [" ".join(rng.choice(WORDS, size=n)).capitalize() + "." for n in lengths]


def timed(fn, texts: list[str]) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = fn(texts)
    return time.perf_counter() - start, out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--num-docs", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from sentence_transformers import SentenceTransformer

    from rag_mm.text_encoder import default_encoder_path
    from retrieval_index import TextDocumentEmbedder

    texts = synthetic_corpus(args.num_docs, args.seed)
    ours = TextDocumentEmbedder.from_folder(batch_size=args.batch_size, device="cpu")
    reference = SentenceTransformer(str(default_encoder_path()), device="cpu")
    runners = {
        "retrieval_index.TextDocumentEmbedder": lambda t: ours.embed(t, [None] * len(t)),
        "sentence_transformers.encode": lambda t: reference.encode(
            t, batch_size=args.batch_size, normalize_embeddings=True, convert_to_numpy=True
        ),
    }
    for run in runners.values():
        run(texts[: 2 * args.batch_size])  # warm-up
    best: dict[str, float] = {}
    outputs = {}
    for _ in range(args.repeats):
        for name, run in runners.items():
            seconds, outputs[name] = timed(run, texts)
            best[name] = min(best.get(name, float("inf")), seconds)
    a, b = outputs.values()
    min_cosine = float((a * b).sum(1).min())
    rates = {name: args.num_docs / s for name, s in best.items()}
    ratio = rates["retrieval_index.TextDocumentEmbedder"] / rates["sentence_transformers.encode"]

    print(f"{'embedder':40s} {'seconds':>8s} {'docs/s':>8s}")
    for name in runners:
        print(f"{name:40s} {best[name]:8.2f} {rates[name]:8.1f}")
    print(
        f"ratio ours / sentence-transformers: {ratio:.2f}x   min cosine between outputs: {min_cosine:.6f}"
    )
    print(
        json.dumps(
            {
                "benchmark": "embed_throughput",
                "num_docs": args.num_docs,
                "batch_size": args.batch_size,
                "repeats": args.repeats,
                "torch_threads": torch.get_num_threads(),
                "docs_per_s": {k: round(v, 1) for k, v in rates.items()},
                "ratio": round(ratio, 3),
                "min_cosine": round(min_cosine, 6),
            }
        )
    )


if __name__ == "__main__":
    main()
