"""Index swap evaluation: do a trained model's answers follow the passages it reads?

    python scripts/swap_eval.py --rag runs/rag/checkpoints/last.ckpt --index demo_out/index \
        --corpus demo_out/data/corpus.parquet --examples demo_out/data/seen.parquet \
        --out runs/swap --group-by relation

1. Index B: the corpus with its facts permuted among the passages the examples ask about
   (`rag_mm.swap.swap_facts`: same ids, same passages, each swapped passage now states another
   passage's answer; `--group-by COLUMN` permutes only within a value of an examples column),
   written to OUT/corpus.parquet and indexed into OUT/index with the encoder of index A.
   OUT/A/test.parquet and OUT/B/test.parquet hold the swapped examples with their old and new
   targets (evaluate.py reads them too).
2. The model answers them with index A (exact match against A's targets) and with index B
   (against B's targets: "follows B"; against A's: "answers from memory"), for the retrieved
   top-k (RAG) and the gold document. Prints a table, writes OUT/swap.json.

Use examples the model was trained on facts of (e.g. new pictures of training entities): a
swap among facts the model never saw tests nothing that held-out evaluation does not.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import retrieval_index
from rag_mm.data import load_corpus, load_examples
from rag_mm.swap import swap_facts
from trainers.data import RAGDataModule
from trainers.errors import run_cli
from trainers.evaluate import exact_match_rate
from trainers.run import load_module

ROWS = {"RAG (retrieved top-k)": "rag", "gold document (oracle)": "gold"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rag", required=True, help="checkpoint trained with --mode rag")
    p.add_argument("--index", required=True, help="index A, the one the model was trained with")
    p.add_argument("--corpus", required=True, help="index A's corpus (id, text)")
    p.add_argument("--examples", required=True,
                   help="examples (image, prompt, target, gold_id) about facts seen in training")
    p.add_argument("--out", required=True, help="folder for index B and the results")
    p.add_argument("--group-by", help="examples column: permute facts only within its values")
    p.add_argument("--max-examples", type=int, default=None,
                   help="evaluate the first N swapped examples (default: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="of the permutation")
    return p.parse_args(argv)


def make_index_b(args) -> tuple[Path, Path, dict]:
    """Write OUT/corpus.parquet, OUT/index, OUT/A/test.parquet, OUT/B/test.parquet."""
    out = Path(args.out)
    corpus = load_corpus(args.corpus).dataset
    examples = load_examples(args.examples).dataset
    for needed in ["gold_id", "target", *([args.group_by] if args.group_by else [])]:
        if needed not in examples.column_names:
            raise ValueError(f"--examples {args.examples} has no column {needed!r} "
                             f"(columns: {', '.join(examples.column_names)})")
    columns = ["gold_id", "target", *([args.group_by] if args.group_by else [])]
    rows = [dict(zip(columns, values)) for values in zip(*(examples[c] for c in columns))]
    if args.group_by:
        for row in rows:
            row["group"] = row[args.group_by]
    passages = dict(zip(corpus["id"], corpus["text"]))
    swapped, new_targets, report = swap_facts(passages, rows, seed=args.seed,
                                              group="group" if args.group_by else None)
    keep = [i for i, t in enumerate(new_targets) if t is not None][: args.max_examples]
    if not keep:
        raise ValueError(f"--examples {args.examples}: no example's target occurs exactly once "
                         f"as a word in its gold passage, nothing to swap ({report})")
    report["examples_evaluated"] = len(keep)
    out.mkdir(parents=True, exist_ok=True)
    corpus_b = corpus.map(lambda row: {"text": swapped[row["id"]]})
    corpus_b.to_parquet(str(out / "corpus.parquet"))
    subset = examples.select(keep)
    for name, targets in [("A", subset["target"]), ("B", [new_targets[i] for i in keep])]:
        (out / name).mkdir(exist_ok=True)
        subset.remove_columns("target").add_column("target", targets).to_parquet(
            str(out / name / "test.parquet"))
    index_a = retrieval_index.load(args.index, check_encoder=False)
    retrieval_index.build_index(load_corpus(out / "corpus.parquet").dataset, out / "index",
                                embedder=index_a.embedder,
                                index_factory=index_a.manifest["index_factory"],
                                overwrite=True)
    return out / "index", out, report


def rates(module, examples: Path, index: Path, size: str, batch_size: int) -> dict[str, float]:
    """Exact match of every row on `examples` (read with `index`'s gold keys)."""
    data = RAGDataModule(test_path=str(examples), index_dir=str(index), model_size=size,
                         batch_size=batch_size)
    data.setup("test")
    result = {}
    for label, mode in ROWS.items():
        module.set_mode(mode)
        result[label] = exact_match_rate(module.model, data.test_dataloader(), label)
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    index_b, out, report = make_index_b(args)
    module = load_module(args.rag, index_dir=args.index)
    module.setup("test")
    module.eval()
    size = module.hparams.size
    on_a = rates(module, out / "A" / "test.parquet", Path(args.index), size, args.batch_size)
    module.model.attach(retrieval_index.load(index_b))
    follows_b = rates(module, out / "B" / "test.parquet", index_b, size, args.batch_size)
    memory = rates(module, out / "A" / "test.parquet", index_b, size, args.batch_size)
    results = {"swap": report, "rows": {
        label: {"a_on_a": on_a[label], "b_on_b": follows_b[label], "a_on_b": memory[label],
                "follow_ratio": follows_b[label] / on_a[label] if on_a[label] else None}
        for label in ROWS}}
    print(format_table(results))
    (out / "swap.json").write_text(json.dumps(results, indent=2))
    return results


def format_table(results: dict) -> str:
    swap = results["swap"]
    lines = [(f"Index swap: {swap['swapped']} of {swap['passages']} passages swapped, "
              f"{swap['examples_evaluated']} examples"), "",
             ("| system | index A: A's answer | index B: B's answer (follows) | "
              "index B: A's answer (memory) | follow ratio B / A |"),
             "| --- | --- | --- | --- | --- |"]
    for label, row in results["rows"].items():
        ratio = "n/a" if row["follow_ratio"] is None else f"{row['follow_ratio']:.2f}"
        lines.append(f"| {label} | {row['a_on_a']:.1%} | {row['b_on_b']:.1%} | "
                     f"{row['a_on_b']:.1%} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main, prog="swap_eval.py")
