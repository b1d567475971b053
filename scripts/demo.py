"""The end-to-end demo: every step of the framework on embedded defaults, resumable.

    python scripts/demo.py [--out demo_out] [--steps 700] [--warmup-steps 6000] [--size demo]
                           [--reader rag|fid] [--no-copy] [--counterfactual 0.5] [--novel-spans 0.5]
                           [--rerank] [--no-rescore]

1. generate the synthetic multimodal knowledge task       (scripts/make_demo_data.py)
2. embed the corpus with MiniLM and build the FAISS index (scripts/build_index.py)
3. train retriever and generator jointly (RAG)            (scripts/pretrain.py --mode rag)
4. train the closed-book baseline                         (scripts/pretrain.py --mode closed_book)
5. evaluate on held-out entities, print the table         (scripts/evaluate.py)
6. index swap: the training entities' facts permuted in a (scripts/swap_eval.py)
   second index; do the answers follow it?
7. novel answers: the same task whose held-out entities'  (make_demo_data.py --novel-answers,
   answers are never a training target (its train split     build_index.py, evaluate.py)
   is this one's, so the same models are evaluated)

A step whose output exists is skipped, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent


def run(script: str, *args: str) -> None:
    command = [sys.executable, str(SCRIPTS / script), *map(str, args)]
    print(f"\n$ {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True)


def index_complete(index: Path) -> bool:
    manifest = index / "manifest.json"
    return manifest.exists() and json.loads(manifest.read_text()).get("status") == "complete"


def trained(run_dir: Path, steps: int) -> bool:
    summary = run_dir / "train_summary.json"
    if not summary.exists():
        return False
    saved = json.loads(summary.read_text())
    return saved.get("status") == "complete" and (saved.get("checkpoint_step") or 0) >= steps


def resume(run_dir: Path) -> list[str]:
    """`--resume` when an interrupted run left a checkpoint to continue from."""
    return ["--resume"] if (run_dir / "checkpoints" / "last.ckpt").exists() else []


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="demo_out", type=Path)
    p.add_argument("--size", default="demo")
    p.add_argument("--steps", type=int, default=700, help="joint training steps")
    p.add_argument("--warmup-steps", type=int, default=6000,
                   help="retriever-only (contrastive) steps before joint training")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--entities", type=int, default=192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reader", default="rag", choices=["rag", "fid"])
    p.add_argument("--copy", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--counterfactual", type=float, default=0.5)
    p.add_argument("--novel-spans", type=float, default=0.5,
                   help="share of the counterfactual answers that are random word-piece spans")
    p.add_argument("--rerank", action=argparse.BooleanOptionalAction, default=False,
                   help="rag reader: mix documents by softmax(score + the generator's relevance "
                        "logit) (default off)")
    p.add_argument("--rescore", action=argparse.BooleanOptionalAction, default=True,
                   help="order the retrieved candidates by a second trained score before the "
                        "reader takes the top-k (rag_mm.rescorer; default on)")
    p.add_argument("--swap-examples", type=int, default=300,
                   help="training-entity questions asked under the swapped index")
    args = p.parse_args(argv)
    data, index = args.out / "data", args.out / "index"
    rag_run, closed_run = args.out / "runs" / "rag", args.out / "runs" / "closed_book"
    start = time.time()

    if not (data / "meta.json").exists():
        run("make_demo_data.py", "--out", data, "--seed", args.seed, "--entities", args.entities)
    if not index_complete(index):
        run("build_index.py", "--corpus", data / "corpus.parquet", "--out", index)
    common = ["--data", data, "--index", index, "--size", args.size, "--seed", args.seed,
              "--lr", args.lr]
    rag_steps = args.steps + args.warmup_steps
    if not trained(rag_run, rag_steps):
        run("pretrain.py", *common, "--mode", "rag", "--max-steps", rag_steps,
            "--retriever-warmup-steps", args.warmup_steps, "--reader", args.reader,
            "--copy" if args.copy else "--no-copy", "--counterfactual", args.counterfactual,
            "--novel-spans", args.novel_spans,
            "--rerank" if args.rerank else "--no-rerank",
            "--rescore" if args.rescore else "--no-rescore",
            "--out", rag_run, *resume(rag_run))
    if not trained(closed_run, args.steps):
        run("pretrain.py", *common, "--mode", "closed_book", "--max-steps", args.steps,
            "--out", closed_run, *resume(closed_run))
    checkpoints = ["--rag", rag_run / "checkpoints" / "last.ckpt",
                   "--closed-book", closed_run / "checkpoints" / "last.ckpt"]
    run("evaluate.py", *checkpoints, "--data", data, "--index", index, "--seed", args.seed,
        "--json", args.out / "results.json")
    run("swap_eval.py", "--rag", rag_run / "checkpoints" / "last.ckpt", "--index", index,
        "--corpus", data / "corpus.parquet", "--examples", data / "seen.parquet",
        "--out", args.out / "swap", "--group-by", "relation",
        "--max-examples", args.swap_examples, "--seed", args.seed)
    novel_data, novel_index = args.out / "data_novel", args.out / "index_novel"
    if not (novel_data / "meta.json").exists():
        run("make_demo_data.py", "--out", novel_data, "--seed", args.seed,
            "--entities", args.entities, "--novel-answers")
    if not index_complete(novel_index):
        run("build_index.py", "--corpus", novel_data / "corpus.parquet", "--out", novel_index)
    run("evaluate.py", *checkpoints, "--data", novel_data, "--index", novel_index,
        "--seed", args.seed, "--json", args.out / "results_novel.json")
    print(f"\ndemo finished in {(time.time() - start) / 60:.1f} min; results in {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
