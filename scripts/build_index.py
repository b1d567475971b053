"""Build a retrieval index directory from a corpus file (resumable).

    python scripts/build_index.py --corpus data/corpus.parquet --out indexes/corpus \
        [--index-factory 'IVF1024,Flat'] [--encoder DIR] [--batch-size 64] [--shard-size 10000]

The corpus is read by rag_mm.data.load_corpus (parquet, jsonl, imagefolder, save_to_disk);
rerunning an interrupted build with the same arguments resumes from its finished shards.
One builder per --out (a second one is refused); a user error prints one line and exits 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import retrieval_index
from rag_mm.data import (
    FORMATS_HELP,
    ON_BAD,
    CorpusColumns,
    add_column_args,
    columns_from_args,
    load_corpus,
)
from retrieval_index.build import FACTORY_EXAMPLES
from trainers.errors import run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--corpus", required=True, type=Path, help=f"corpus: {FORMATS_HELP}")
    p.add_argument("--out", required=True, type=Path, help="index directory to create (or resume)")
    p.add_argument(
        "--index-factory", default="Flat", help=f"FAISS factory string, e.g. {FACTORY_EXAMPLES}"
    )
    p.add_argument(
        "--encoder", type=Path, help="local text encoder folder (default: bundled all-MiniLM-L6-v2)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="documents per encoder batch")
    p.add_argument("--shard-size", type=int, default=10_000, help="documents per embedding shard")
    p.add_argument("--max-length", type=int, help="tokens per document (default: the encoder's)")
    p.add_argument(
        "--nprobe",
        type=int,
        help="IVF lists to search (default nlist/16, in [min(8, nlist/2), 256])",
    )
    p.add_argument("--ef-search", type=int, help="HNSW efSearch (default 128)")
    p.add_argument("--seed", type=int, default=0)
    add_column_args(p, CorpusColumns)
    p.add_argument(
        "--on-bad", choices=ON_BAD, default="error", help="bad corpus rows: stop or skip"
    )
    p.add_argument(
        "--fix-images", action="store_true", help="convert corpus images that are not RGB to RGB"
    )
    p.add_argument(
        "--drop-images", action="store_true", help="index the texts only, ignoring images"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the index files in --out")
    return p.parse_args(argv)


def main(argv=None) -> None:
    """The command line; a user error prints one line and exits 2 (`trainers.errors.run_cli`)."""
    run_cli(lambda args: build(parse_args(args)), argv, prog="build_index.py")


def build(args: argparse.Namespace) -> None:
    loaded = load_corpus(
        args.corpus,
        columns=columns_from_args(args, CorpusColumns),
        on_bad=args.on_bad,
        fix_images=args.fix_images,
    )
    print(loaded.report, flush=True)
    corpus = loaded.dataset
    if args.drop_images and "image" in corpus.column_names:
        corpus = corpus.remove_columns("image")
    options = {} if args.max_length is None else {"max_length": args.max_length}
    embedder = retrieval_index.TextDocumentEmbedder.from_folder(
        args.encoder, batch_size=args.batch_size, **options
    )
    retrieval_index.build_index(
        corpus,
        args.out,
        embedder=embedder,
        index_factory=args.index_factory,
        shard_size=args.shard_size,
        seed=args.seed,
        nprobe=args.nprobe,
        ef_search=args.ef_search,
        overwrite=args.overwrite,
    )


if __name__ == "__main__":
    main()
