"""GPU retrieval: torch exact search vs faiss-cpu, and embedding throughput vs sentence-transformers.

Needs a CUDA device (exits with a one-line message otherwise). Two parts, one process:

1. Search: `retrieval_index.torch_search.TorchExactSearch` on the GPU (fp16, bf16, fp32) over
   `--num-docs` synthetic clustered 384-d unit vectors, against faiss-cpu `IndexFlatIP` on the
   same vectors; queries/s at batch 32 (a training step's queries) and at 1000, and recall@10
   of each torch dtype against faiss (exact, fp32).
2. Embedding: `retrieval_index.TextDocumentEmbedder` (CUDA autocast, bf16 where supported)
   against `SentenceTransformer.encode` in its default fp32 and after `.half()`, the same
   bundled MiniLM, the same synthetic corpus (20-120 words) and batch size; docs/s, the ratios
   and the lowest cosine between our vectors and the fp32 reference's.

    .venv/bin/python benchmarks/gpu_retrieval.py [--num-docs 1000000] [--embed-docs 20000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_throughput import synthetic_corpus
from index_build import clustered_vectors


def _cuda_seconds(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats, out


def search_part(num_docs: int, seed: int) -> list[dict]:
    import faiss

    from retrieval_index.torch_search import TorchExactSearch

    vectors = clustered_vectors(num_docs, 384, 2000, 0.8, seed)
    rng = np.random.default_rng(seed + 1)
    queries = vectors[rng.integers(0, num_docs, 1000)] + 0.005 * rng.standard_normal(
        (1000, 384)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    flat = faiss.IndexFlatIP(384)
    flat.add(vectors)
    rows = []
    truth = None
    for batch in (32, 1000):
        q = queries[:batch]
        start = time.perf_counter()
        _, found = flat.search(q, 10)
        seconds = time.perf_counter() - start
        truth = found if batch == 1000 else truth
        rows.append({"search": f"faiss-cpu IndexFlatIP ({faiss.omp_get_max_threads()} threads)",
                     "batch": batch, "qps": batch / seconds, "recall_at_10": 1.0})
    for dtype in ("float16", "bfloat16", "float32"):
        search = TorchExactSearch(vectors, device="cuda", dtype=dtype)
        for batch in (32, 1000):
            q = torch.from_numpy(queries[:batch]).cuda()
            seconds, (_, keys) = _cuda_seconds(lambda q=q, s=search: s.search_tensors(q, 10), 5)
            recall = float("nan")
            if batch == 1000:
                keys = keys.cpu().numpy()
                recall = float(np.mean([len(np.intersect1d(a, b)) / 10
                                        for a, b in zip(keys, truth)]))
            rows.append({"search": f"torch {dtype} (GPU)", "batch": batch,
                         "qps": batch / seconds, "recall_at_10": recall})
        del search
        torch.cuda.empty_cache()
    return rows


def embed_part(num_docs: int, batch_size: int, seed: int) -> list[dict]:
    from sentence_transformers import SentenceTransformer

    from rag_mm.text_encoder import default_encoder_path
    from retrieval_index import TextDocumentEmbedder

    texts = synthetic_corpus(num_docs, seed)
    ours = TextDocumentEmbedder.from_folder(batch_size=batch_size, device="cuda")
    fp32 = SentenceTransformer(str(default_encoder_path()), device="cuda")
    fp16 = SentenceTransformer(str(default_encoder_path()), device="cuda").half()

    def encode(model):
        return lambda: model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True)

    runners = {f"TextDocumentEmbedder ({ours.compute_dtype} autocast)":
               lambda: ours.embed(texts, [None] * len(texts)),
               "sentence_transformers encode (fp32, default)": encode(fp32),
               "sentence_transformers encode (fp16, .half())": encode(fp16)}
    results = {name: _cuda_seconds(run, 1) for name, run in runners.items()}
    reference = results["sentence_transformers encode (fp32, default)"][1]
    rows = []
    for name, (seconds, out) in results.items():
        rows.append({"embedder": name, "docs_per_s": num_docs / seconds,
                     "min_cosine_vs_fp32": float((np.asarray(out) * reference).sum(1).min())})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-docs", type=int, default=1_000_000)
    p.add_argument("--embed-docs", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_retrieval.py: needs a CUDA device (torch.cuda.is_available() is False)")

    search = search_part(args.num_docs, args.seed)
    print(f"{'search over ' + str(args.num_docs) + ' docs':44s} {'batch':>6s} {'QPS':>10s} "
          f"{'recall@10':>9s}")
    for r in search:
        print(f"{r['search']:44s} {r['batch']:6d} {r['qps']:10.0f} {r['recall_at_10']:9.3f}")
    embed = embed_part(args.embed_docs, args.batch_size, args.seed)
    print(f"\n{'embedder (' + str(args.embed_docs) + ' docs)':48s} {'docs/s':>9s} {'min cos':>8s}")
    for r in embed:
        print(f"{r['embedder']:48s} {r['docs_per_s']:9.0f} {r['min_cosine_vs_fp32']:8.5f}")
    rate = {r["embedder"]: r["docs_per_s"] for r in embed}
    ours = next(v for k, v in rate.items() if k.startswith("TextDocumentEmbedder"))
    ratios = {"vs_fp32": ours / rate["sentence_transformers encode (fp32, default)"],
              "vs_fp16": ours / rate["sentence_transformers encode (fp16, .half())"]}
    print(f"ours / encode fp32: {ratios['vs_fp32']:.2f}x, ours / encode fp16: "
          f"{ratios['vs_fp16']:.2f}x (goal: 2x and 1.5x)")
    print(json.dumps({"benchmark": "gpu_retrieval", "device": torch.cuda.get_device_name(),
                      "search": search, "embed": embed,
                      "ratios": {k: round(v, 3) for k, v in ratios.items()}}))


if __name__ == "__main__":
    main()
