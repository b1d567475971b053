"""Distributed index build speed-up: `build_index.py` in one process against
`torchrun --nproc_per_node=N build_index.py`, the same corpus, encoder and flags.

The one process uses all intra-op threads torch gives it; each of the N ranks one
(OMP_NUM_THREADS=1), so both runs use the machine's cores. Times are the wall clock of each
command (start-up included) and the manifest's `embed_seconds`; the load average before and
after is printed, and the two `embeddings.npy` must be byte-identical.

    .venv/bin/python benchmarks/distributed_build.py [--num-docs 2000] [--nproc 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_throughput import synthetic_corpus

ROOT = Path(__file__).resolve().parents[1]


def run(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-docs", type=int, default=2000)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--shard-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="distributed_build_") as tmp:
        tmp = Path(tmp)
        texts = synthetic_corpus(args.num_docs, args.seed)
        pd.DataFrame({"id": [f"d{i}" for i in range(len(texts))], "text": texts}).to_parquet(
            tmp / "corpus.parquet")
        flags = ["--corpus", str(tmp / "corpus.parquet"), "--shard-size", str(args.shard_size)]
        script = str(ROOT / "scripts" / "build_index.py")
        load_before = os.getloadavg()
        one = run([sys.executable, script, *flags, "--out", str(tmp / "one")], env)
        ranks = run([sys.executable, "-m", "torch.distributed.run",
                     f"--nproc_per_node={args.nproc}", script, *flags, "--out",
                     str(tmp / "ranks")], {**env, "OMP_NUM_THREADS": "1"})
        load_after = os.getloadavg()
        embed = {name: json.loads((tmp / name / "manifest.json").read_text())["report"][
            "embed_seconds"] for name in ("one", "ranks")}
        same = ((tmp / "one" / "embeddings.npy").read_bytes()
                == (tmp / "ranks" / "embeddings.npy").read_bytes())

    print(f"{'build':28s} {'wall s':>8s} {'embed s':>8s}")
    print(f"{'1 process':28s} {one:8.1f} {embed['one']:8.1f}")
    print(f"{f'torchrun {args.nproc} ranks':28s} {ranks:8.1f} {embed['ranks']:8.1f}")
    print(f"speed-up: wall {one / ranks:.2f}x, embedding {embed['one'] / embed['ranks']:.2f}x; "
          f"embeddings identical: {same}; load average {load_before[0]:.1f} -> "
          f"{load_after[0]:.1f} on {os.cpu_count()} cores")
    print(json.dumps({"benchmark": "distributed_build", "num_docs": args.num_docs,
                      "nproc": args.nproc, "wall_seconds": {"one": round(one, 2),
                                                            "ranks": round(ranks, 2)},
                      "embed_seconds": embed, "speedup_wall": round(one / ranks, 3),
                      "speedup_embed": round(embed["one"] / embed["ranks"], 3),
                      "identical": same, "cores": os.cpu_count(),
                      "load_average": [round(load_before[0], 2), round(load_after[0], 2)]}))


if __name__ == "__main__":
    main()
