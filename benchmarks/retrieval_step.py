"""The retrieval share of a training step on CPU: search, lookup and scoring, against the whole
step (forward + backward + AdamW) of the demo model, batch 32 per process.

The index is a real index directory built by `retrieval_index.build_index` over synthetic
clustered unit vectors (an embedder that returns precomputed vectors: no encoder run) and
short texts; the model is `rag_mm` at the demo size with the bundled MiniLM query tower. The
documents are not in the query encoder's space (the index is attached with
check_encoder=False): the work per step is the same, the hits are arbitrary.

Three layouts per index (the last two in 2 gloo processes, one intra-op thread each, so the
comparison runs under the same load):
- `one process`: the whole index in one process;
- `2 procs, replicated`: each process holds the whole index (today's data parallelism);
- `2 procs, sharded`: each process holds half (`retrieval_index.ShardedIndex`);
- `one process, torch` (Flat): `load(search="torch")`, the exact torch search on CPU.
Columns: ms per step; search, lookup (`vectors` + `documents`), scoring (the rest of
`retrieve` after query encoding, search and lookup: scores, contrastive loss) in ms per step;
share = (search + lookup + scoring) / step; backend MB = the process's RSS growth when the
backend was opened (mean over ranks).

    .venv/bin/python benchmarks/retrieval_step.py --num-docs 100000 [--factories Flat 'IVF1024,Flat']
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from index_build import clustered_vectors

import retrieval_index as ri
from rag_mm.config import model_config
from rag_mm.model import build_model, synthetic_batch
from trainers.parallel.local import run_local

WORDS = ["river", "stone", "light", "ancient", "market", "signal", "harbor", "quiet", "engine", "forest", "glass"]


class PrecomputedEmbedder:
    """Document i ("doc i ...") -> row i of a fixed array of unit vectors."""

    def __init__(self, vectors: np.ndarray):
        self.vectors, self.dim = vectors, vectors.shape[1]

    def identity(self) -> dict:
        return {"kind": "synthetic", "name": "clustered", "dim": self.dim}

    def embed(self, texts, images) -> np.ndarray:
        rows = [int(t.split(" ", 2)[1]) for t in texts]
        return self.vectors[rows]


def build(root: Path, num_docs: int, factory: str, seed: int) -> Path:
    vectors = clustered_vectors(num_docs, 384, 2000, 0.8, seed)
    rng = np.random.default_rng(seed)
    corpus = [{"id": f"d{i}", "text": f"doc {i} " + " ".join(rng.choice(WORDS, 12))}
              for i in range(num_docs)]
    out = root / f"{factory.replace(',', '_')}_{num_docs}"
    start = time.perf_counter()
    ri.build_index(corpus, out, embedder=PrecomputedEmbedder(vectors), index_factory=factory,
                   shard_size=50_000, search_shards=2, progress=False, num_recall_queries=200)
    print(f"built {factory} over {num_docs} documents in {time.perf_counter() - start:.0f} s",
          flush=True)
    return out


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Timed:
    """The backend, with the seconds spent in search / vectors / documents counted."""

    def __init__(self, backend, seconds: dict):
        self.backend, self.seconds = backend, seconds

    def _timed(self, name, *args):
        start = time.perf_counter()
        out = getattr(self.backend, name)(*args)
        self.seconds[name] += time.perf_counter() - start
        return out

    def search(self, queries, k):
        return self._timed("search", queries, k)

    def vectors(self, keys):
        return self._timed("vectors", keys)

    def documents(self, keys):
        return self._timed("documents", keys)

    def __len__(self):
        return len(self.backend)


def measure(backend_factory, steps: int, seed: int) -> dict:
    """ms per step and per part, averaged over `steps` after one warm-up step."""
    before = rss_mb()
    backend = backend_factory()
    opened_mb = rss_mb() - before
    config = model_config("demo")
    torch.manual_seed(0)
    seconds = defaultdict(float)
    model = build_model(config)
    model.attach(Timed(backend, seconds), check_encoder=False)
    model.set_shared_negatives(np.arange(0, len(backend), max(1, len(backend) // 4096)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    encoder, retrieve = model.retrieval.query_encoder, model.retrieval.retrieve

    def timed_encoder(*args, _f=encoder.forward):
        start = time.perf_counter()
        out = _f(*args)
        seconds["encode"] += time.perf_counter() - start
        return out

    def timed_retrieve(*args, _f=retrieve):
        start = time.perf_counter()
        out = _f(*args)
        seconds["retrieve"] += time.perf_counter() - start
        return out

    encoder.forward, model.retrieval.retrieve = timed_encoder, timed_retrieve
    total = 0.0
    for step in range(steps + 1):
        if step == 1:
            seconds.clear()
        batch = synthetic_batch(config, 32, seed=seed * 1000 + step, num_docs=len(backend))
        start = time.perf_counter()
        model(batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = 0.0 if step == 0 else total + time.perf_counter() - start
    encoder.forward = model.retrieval.retrieve = None  # break the closures' cycles
    del model, backend, optimizer, encoder, retrieve
    gc.collect()  # one index in memory at a time (1M x 384 fp32 is 1.5 GB)
    ms = {name: 1000 * value / steps for name, value in seconds.items()}
    lookup = ms["vectors"] + ms["documents"]
    scoring = ms["retrieve"] - ms["encode"] - ms["search"] - ms["vectors"]
    step_ms = 1000 * total / steps
    return {"step_ms": step_ms, "search_ms": ms["search"], "lookup_ms": lookup,
            "scoring_ms": scoring, "share": (ms["search"] + lookup + scoring) / step_ms,
            "backend_mb": opened_mb}


def _rank(rank: int, world_size: int, index_dir: str, sharded: bool, steps: int, out: str):
    import faiss

    faiss.omp_set_num_threads(1)  # like torch here: one thread per process

    def factory():
        if sharded:
            return ri.ShardedIndex(index_dir, ri.TorchCollective())
        return ri.load(index_dir, check_encoder=False, search="faiss")

    result = measure(factory, steps, seed=rank)
    Path(f"{out}.{rank}.json").write_text(json.dumps(result))


def two_processes(index_dir: Path, sharded: bool, steps: int, tmp: Path) -> dict:
    out = tmp / ("sharded" if sharded else "replicated")
    run_local(_rank, 2, str(index_dir), sharded, steps, str(out))
    parts = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(2)]
    return {k: float(np.mean([p[k] for p in parts])) for k in parts[0]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-docs", type=int, default=100_000)
    p.add_argument("--factories", nargs="+", default=["Flat", "IVF1024,Flat"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="retrieval_step_") as tmp:
        tmp = Path(tmp)
        for factory in args.factories:
            index_dir = build(tmp, args.num_docs, factory, args.seed)
            layouts = {
                "one process": measure(
                    lambda d=index_dir: ri.load(d, check_encoder=False, search="faiss"),
                    args.steps, seed=0),
                "2 procs, replicated": two_processes(index_dir, False, args.steps, tmp),
                "2 procs, sharded": two_processes(index_dir, True, args.steps, tmp),
            }
            if factory == "Flat":  # the opt-in exact torch search on CPU
                layouts["one process, torch"] = measure(
                    lambda d=index_dir: ri.load(d, check_encoder=False, search="torch"),
                    args.steps, seed=0)
            for layout, result in layouts.items():
                rows.append({"factory": factory, "docs": args.num_docs, "layout": layout,
                             **{k: round(v, 3) for k, v in result.items()}})
            for path in index_dir.iterdir():  # keep the disk use to one index at a time
                if path.is_file():
                    path.unlink()

    header = f"{'factory':14} {'docs':>8} {'layout':20} {'step ms':>8} {'search':>7} " \
             f"{'lookup':>7} {'scoring':>8} {'share':>6} {'backend MB':>10}"
    print(header)
    for r in rows:
        print(f"{r['factory']:14} {r['docs']:>8} {r['layout']:20} {r['step_ms']:8.0f} "
              f"{r['search_ms']:7.1f} {r['lookup_ms']:7.1f} {r['scoring_ms']:8.1f} "
              f"{r['share']:6.1%} {r['backend_mb']:10.0f}")
    print(json.dumps({"benchmark": "retrieval_step", "rows": rows}))


if __name__ == "__main__":
    main()
