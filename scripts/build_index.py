"""Build a retrieval index directory from a corpus file (resumable).

    python scripts/build_index.py --corpus data/corpus.parquet --out indexes/corpus \
        [--index-factory 'IVF1024,Flat'] [--encoder DIR] [--batch-size 64] [--shard-size 10000]
    torchrun --nproc_per_node=N scripts/build_index.py ...    (each rank embeds 1/N of the shards)

The corpus is read by rag_mm.data.load_corpus (parquet, jsonl, imagefolder, save_to_disk);
rerunning an interrupted build with the same arguments resumes from its finished shards.
One builder per --out (a second one is refused); a user error prints one line and exits 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import retrieval_index
from rag_mm.config import NAMED_CONFIGS, model_config
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
    p.add_argument(
        "--search-shards",
        type=int,
        help="also write S search shards (sharded search over a world size dividing S; "
        "not needed for Flat)",
    )
    p.add_argument("--seed", type=int, default=0)
    add_column_args(p, CorpusColumns)
    p.add_argument(
        "--on-bad", choices=ON_BAD, default="error", help="bad corpus rows: stop or skip"
    )
    p.add_argument(
        "--fix-images", action="store_true", help="convert corpus images that are not RGB to RGB"
    )
    p.add_argument(
        "--vision",
        type=Path,
        help="query vision folder (rag_mm.query_vision) that embeds document images; default "
        "for an image corpus: --out/vision, written once from --vision-from or seeded from "
        "--vision-size and --seed. Train with the model's vision_dir set to it",
    )
    p.add_argument(
        "--vision-from",
        type=Path,
        help="a RAGModule checkpoint (.ckpt) whose query vision path embeds the images",
    )
    p.add_argument(
        "--vision-size",
        default="demo",
        choices=sorted(NAMED_CONFIGS),
        help="model size whose vision tower a new seeded vision folder has",
    )
    p.add_argument(
        "--drop-images",
        action="store_true",
        help="embed the texts only; the images stay in the document store (use_doc_images)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the index files in --out")
    return p.parse_args(argv)


def main(argv=None) -> None:
    """The command line; a user error prints one line and exits 2 (`trainers.errors.run_cli`)."""
    run_cli(lambda args: build(parse_args(args)), argv, prog="build_index.py")


def build(args: argparse.Namespace) -> None:
    """One process, or every rank of `torchrun --nproc_per_node=N scripts/build_index.py ...`
    (WORLD_SIZE > 1: each rank embeds its share of the shards, rank 0 builds FAISS)."""
    collective = distributed_collective()
    try:
        build_on(args, collective)
        if collective.world_size > 1:
            # leave together: a rank that exits while rank 0 still loads the index closes
            # its connections under rank 0's process group
            collective.barrier()
    finally:
        if collective.world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def distributed_collective():
    """TorchCollective over gloo when torchrun started N > 1 processes, else one process."""
    import os
    from datetime import timedelta

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return retrieval_index.LocalCollective()
    import torch.distributed as dist

    # rank 0 trains FAISS while the others wait in a collective: allow long steps
    dist.init_process_group("gloo", timeout=timedelta(hours=12))
    return retrieval_index.TorchCollective()


def build_on(args: argparse.Namespace, collective) -> None:
    import torch

    from retrieval_index.embed import raise_if_any_failed

    lead = collective.rank == 0
    loaded = load_corpus(
        args.corpus,
        columns=columns_from_args(args, CorpusColumns),
        on_bad=args.on_bad,
        fix_images=args.fix_images,
    )
    if lead:
        print(loaded.report, flush=True)
    corpus = loaded.dataset
    options = {} if args.max_length is None else {"max_length": args.max_length}
    if collective.world_size > 1 and torch.cuda.is_available():
        options["device"] = f"cuda:{collective.rank % torch.cuda.device_count()}"
    embedder = retrieval_index.TextDocumentEmbedder.from_folder(
        args.encoder, batch_size=args.batch_size, ignore_images=args.drop_images, **options
    )
    table = corpus.data
    has_images = "image" in table.column_names and table.column("image").null_count < len(table)
    if (has_images and not args.drop_images) or args.vision or args.vision_from:
        folder, error = None, None
        if lead:  # writes --out/vision once
            try:
                folder = vision_folder(args, embedder.dim)
            except Exception as err:  # noqa: BLE001 - re-raised after the other ranks learn of it
                error = err
        if collective.world_size > 1:
            raise_if_any_failed(collective, error)
            folder = collective.all_gather_object(folder)[0]
        elif error is not None:
            raise error
        embedder = retrieval_index.MultimodalDocumentEmbedder(embedder, folder)
    retrieval_index.build_index(
        corpus,
        args.out,
        embedder=embedder,
        index_factory=args.index_factory,
        shard_size=args.shard_size,
        seed=args.seed,
        nprobe=args.nprobe,
        ef_search=args.ef_search,
        search_shards=args.search_shards,
        overwrite=args.overwrite,
        collective=collective,
    )


def vision_folder(args: argparse.Namespace, dim: int) -> Path:
    """--vision, else --out/vision: reused when it exists, else written from --vision-from or
    seeded (the model's random initialisation of --vision-size, seed --seed)."""
    from rag_mm.query_vision import (
        CONFIG_FILE,
        QueryVision,
        save_query_vision,
        vision_from_checkpoint,
    )

    if args.vision is not None:
        if args.vision_from is not None:
            raise ValueError("--vision and --vision-from both name the vision weights; pass one")
        return args.vision
    folder = args.out / retrieval_index.VISION_DIR
    if (folder / CONFIG_FILE).is_file():
        print(f"document images: embedded with the query vision folder {folder}", flush=True)
        return folder
    if args.vision_from is not None:
        vision_from_checkpoint(args.vision_from, folder)
        origin = f"the query encoder of {args.vision_from}"
    else:
        seeded = QueryVision.seeded(model_config(args.vision_size).vision, dim, args.seed)
        save_query_vision(folder, seeded.vision, seeded.image_proj)
        origin = f"a seeded initialisation (size {args.vision_size}, seed {args.seed})"
    print(
        f"document images: embedded with the query vision folder {folder}, from {origin}; "
        f"train with the model's vision_dir={folder}",
        flush=True,
    )
    return folder


if __name__ == "__main__":
    main()
