"""Evaluate trained checkpoints on held-out examples; print a table and write JSON.

    python scripts/evaluate.py --rag runs/rag/checkpoints/last.ckpt \
        --closed-book runs/closed_book/checkpoints/last.ckpt \
        --data demo_out/data --index demo_out/index --json runs/eval.json

Rows: closed-book, random document, RAG (retrieved top-k), gold document; and the query
encoder's recall@k before and after training.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from trainers.data import RAGDataModule, add_data_arguments, data_kwargs
from trainers.errors import run_cli
from trainers.evaluate import evaluate, format_table
from trainers.module import RAGModule
from trainers.run import load_module


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rag", required=True,
                   help="checkpoint trained with --mode rag (a file, or a distributed folder)")
    p.add_argument("--closed-book", help="checkpoint trained with --mode closed_book")
    p.add_argument("--data", required=True, help="folder with the split to evaluate")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--index", required=True, help="the index the RAG model was trained with")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the training run (for 'before')")
    p.add_argument("--json", help="write the results here")
    add_data_arguments(p)  # --on-bad, --fix-images, the column flags
    return p.parse_args(argv)


def load(checkpoint: str, index: str) -> RAGModule:
    """A checkpoint file, or a distributed checkpoint folder (the parallel strategy's)."""
    module = load_module(checkpoint, index_dir=index)
    module.setup("test")
    return module.eval()


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    modules = {"rag": load(args.rag, args.index)}
    if args.closed_book:
        modules["closed_book"] = load(args.closed_book, args.index)
    data = RAGDataModule(args.data, index_dir=args.index, model_size=modules["rag"].hparams.size,
                         batch_size=args.batch_size, **data_kwargs(args))
    data.setup(args.split)
    loader = data.test_dataloader() if args.split == "test" else data.val_dataloader()
    results = evaluate(modules, loader, seed=args.seed)
    print(format_table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    run_cli(main, prog="evaluate.py")
