"""Write the synthetic picture-question demo task (corpus, train/val/test/seen, meta.json).

Usage: python scripts/make_demo_data.py --out demo_out/data [--seed 0] [--entities 120]
       [--novel-answers]
"""

import argparse
import time

from rag_mm.demo_data import make_demo_data, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--entities", type=int, default=120, help="number of entities (<= 192)")
    parser.add_argument("--examples-per-fact", type=int, default=12,
                        help="train examples per (entity, relation)")
    parser.add_argument("--eval-examples-per-fact", type=int, default=3,
                        help="val/test examples per (entity, relation)")
    parser.add_argument("--corpus-images", action="store_true",
                        help="add a canonical picture of the entity to every passage")
    parser.add_argument("--novel-answers", action="store_true",
                        help="held-out entities' answers from a vocabulary no training target "
                             "uses (they can only be copied from the passage)")
    args = parser.parse_args()
    start = time.perf_counter()
    meta = make_demo_data(
        args.out,
        seed=args.seed,
        num_entities=args.entities,
        examples_per_fact=args.examples_per_fact,
        eval_examples_per_fact=args.eval_examples_per_fact,
        corpus_images=args.corpus_images,
        novel_answers=args.novel_answers,
    )
    print(summary(meta, args.out))
    print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
