"""Joint retriever-generator training, top to bottom.

    python scripts/pretrain.py --data demo_out/data --index demo_out/index --size demo \
        --max-steps 600 --out runs/rag

Writes checkpoints (`OUT/checkpoints/step-NNNNNNN.ckpt`, the newest always reachable as
`OUT/checkpoints/last.ckpt`; the final step is always saved), CSV and TensorBoard logs and
`train_summary.json` (what was saved, at which step) under OUT.

Long runs: SIGTERM or SIGUSR1 finishes the current step, saves, and exits with code 75
(requeue the job); `--resume` continues exactly where it stopped. A step with a NaN or inf
loss or gradient norm is skipped; `--max-nonfinite` of them in a row stop the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from rag_mm.config import MODES, NAMED_CONFIGS, READERS
from trainers.data import RAGDataModule, add_data_arguments, data_kwargs
from trainers.errors import run_cli
from trainers.module import RAGModule
from trainers.run import NonFiniteError, Preempted, RunCheckpoints, resume_path, run_callbacks


def default_rescore(args) -> bool:
    """The second stage is on unless the run cannot use it: a trainable document tower
    already rescores, an image index (it comes with --vision-dir) has no text-only vectors,
    closed-book reads no documents."""
    return not (args.train_doc_encoder or args.vision_dir or args.mode == "closed_book")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True,
                   help="folder with the splits: train, val, test as .parquet, .jsonl or a folder")
    add_data_arguments(p)  # --on-bad, --fix-images, --image-column ... --gold-id-column
    p.add_argument("--index", help="index folder from scripts/build_index.py (not for closed_book)")
    p.add_argument("--out", required=True, help="run folder: checkpoints and logs")
    p.add_argument("--size", default="demo", choices=sorted(NAMED_CONFIGS))
    p.add_argument("--mode", default="rag", choices=MODES)
    p.add_argument("--max-steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--use-doc-images", action="store_true",
                   help="the generator also reads the retrieved documents' images")
    p.add_argument("--vision-dir", help="the query vision folder the image index was embedded "
                   "with (build_index.py prints it)")
    p.add_argument("--reader", default="rag", choices=READERS,
                   help="rag: each document read alone, answers mixed by the document scores; "
                        "fid: fusion-in-decoder, all top-k documents in one sequence")
    p.add_argument("--copy", action=argparse.BooleanOptionalAction, default=True,
                   help="mix a copy pointer over the documents' tokens into the LM head")
    p.add_argument("--counterfactual", type=float, default=None,
                   help="training-time rate of counterfactual answers swapped into the gold "
                        "document and the target (default 0.5; 0 = off)")
    p.add_argument("--novel-spans", type=float, default=None,
                   help="share of the counterfactual answers that are random spans of 1-3 word "
                        "pieces instead of another example's answer (default 0.5; 0 = off)")
    p.add_argument("--rerank", action=argparse.BooleanOptionalAction, default=False,
                   help="rag reader: mix the documents by softmax(retriever score + the "
                        "generator's relevance logit) (default off; fid refuses it)")
    p.add_argument("--rescore", action=argparse.BooleanOptionalAction, default=None,
                   help="order the retrieved candidates by a second trained score (a query head "
                        "and a light document tower over the text tower's token states) before "
                        "the reader takes the top-k (default on; off with --train-doc-encoder, "
                        "--vision-dir (image indexes) or --mode closed_book)")
    p.add_argument("--retriever-warmup-steps", type=int, default=0,
                   help="train the query encoder alone (contrastive) for the first N steps")
    p.add_argument("--activation-checkpointing", default=None, metavar="SETTING",
                   help="recompute activations in backward: off | every | N (every N-th "
                        "block) | unit names, comma-separated (trainers/parallel/checkpointing.py)")
    p.add_argument("--train-doc-encoder", action="store_true",
                   help="score documents with a trainable copy of the index's text encoder")
    p.add_argument("--refresh-every", type=int, default=None,
                   help="re-embed the corpus in the background every N steps with the trained "
                        "document encoder and swap the new index in (needs --train-doc-encoder)")
    p.add_argument("--refresh-dir", help="where refreshed indexes go (default OUT/index_refresh)")
    p.add_argument("--val-every", type=int, default=650, help="validate every N steps")
    p.add_argument("--save-every", type=int, default=None,
                   help="also checkpoint every N steps (default: --val-every); the final step "
                        "is always saved")
    p.add_argument("--keep", type=int, default=2, help="step checkpoints kept (newest first)")
    p.add_argument("--max-nonfinite", type=int, default=10,
                   help="stop after N steps in a row with a NaN/inf loss or gradient norm")
    p.add_argument("--precision", default="auto", help="auto | bf16-mixed | 32-true | 16-mixed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoints/last.ckpt (refused if there is none)")
    args = p.parse_args(argv)
    if args.mode != "closed_book" and args.index is None:
        p.error(f"--mode {args.mode} needs --index (build one with scripts/build_index.py)")
    return args


def auto_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def main(argv=None) -> Path:
    args = parse_args(argv)
    L.seed_everything(args.seed, workers=True)
    out = Path(args.out)
    resume = resume_path(out / "checkpoints", resume=args.resume)  # before any work

    # -- data and model ----------------------------------------------------------------------
    data = RAGDataModule(args.data, index_dir=args.index, model_size=args.size,
                         batch_size=args.batch_size, **data_kwargs(args))
    module = RAGModule(size=args.size, mode=args.mode, index_dir=args.index, top_k=args.top_k,
                       lr=args.lr, warmup_steps=args.warmup_steps,
                       retriever_warmup_steps=args.retriever_warmup_steps,
                       use_doc_images=args.use_doc_images, vision_dir=args.vision_dir,
                       reader=args.reader, copy=args.copy, counterfactual=args.counterfactual,
                       rerank=args.rerank, novel_spans=args.novel_spans,
                       rescore=default_rescore(args) if args.rescore is None else args.rescore,
                       activation_checkpointing=args.activation_checkpointing,
                       train_doc_encoder=args.train_doc_encoder, refresh_every=args.refresh_every,
                       refresh_dir=args.refresh_dir)

    # -- trainer -------------------------------------------------------------------------------
    callbacks = run_callbacks(out / "checkpoints", every_n_steps=args.save_every or args.val_every,
                              keep=args.keep, max_nonfinite=args.max_nonfinite)
    checkpoints = next(c for c in callbacks if isinstance(c, RunCheckpoints))
    trainer = L.Trainer(
        max_steps=args.max_steps,
        precision=auto_precision(args.precision),
        logger=[CSVLogger(out, name="logs"), TensorBoardLogger(out, name="tb")],
        callbacks=[*callbacks, LearningRateMonitor("step")],
        val_check_interval=args.val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        gradient_clip_val=1.0,
        default_root_dir=out,
    )

    # -- train -------------------------------------------------------------------------------
    start = time.time()
    status = "complete"
    resumed_from = str(resume.resolve()) if resume else None
    try:
        trainer.fit(module, datamodule=data, ckpt_path=resume)
    except Preempted as stop:
        status = "preempted"
        print(f"{stop}; rerun with --resume to continue", file=sys.stderr, flush=True)
        raise
    except BaseException:
        status = "failed"
        raise
    finally:
        summary = {"mode": args.mode, "size": args.size, "reader": args.reader,
                   "copy": args.copy, "counterfactual": module.config.reader.counterfactual,
                   "rerank": module.config.reader.rerank,
                   "rescore": module.config.retriever.rescore,
                   "novel_spans": module.config.reader.novel_spans,
                   "status": status,
                   "steps": trainer.global_step, "max_steps": args.max_steps,
                   "seconds": round(time.time() - start, 1),
                   "checkpoint": str(checkpoints.saved_path) if checkpoints.saved_path else None,
                   "checkpoint_step": checkpoints.saved_step,
                   "resumed_from": resumed_from,
                   "index": index_in_use(module),
                   "refresh": module.refresh.summary() if module.refresh is not None else None}
        if trainer.is_global_zero:
            (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
            print(json.dumps(summary))
    return checkpoints.saved_path


def index_in_use(module: RAGModule) -> str | None:
    """The index the run searched at its end (a refreshed one after a swap)."""
    path = getattr(getattr(module.model.retrieval, "backend", None), "path", None)
    return None if path is None else str(path)


def cli(argv=None) -> None:
    try:
        run_cli(main, argv, prog="pretrain.py")
    except NonFiniteError as err:
        print(f"pretrain.py: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(3) from None


if __name__ == "__main__":
    cli()
