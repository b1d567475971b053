"""The LightningModule: joint retriever-generator training of a `RAGModel`.

The module owns optimisation and metrics; the model (a plain `nn.Module` chain) owns the
maths. The index is attached at setup and never saved in checkpoints: a checkpoint records
the index directory and the encoder identity it was trained against.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import torch

from rag_mm.config import MODES, model_config
from rag_mm.model import RAGModel, build_model
from trainers.data import ROW_VALID
from trainers.parallel.checkpointing import apply_activation_checkpointing

# Two Lightning warnings that every run printed and that ask nothing of the user: the frozen
# towers (the index's document encoder, the frozen text tower) are in eval mode by design,
# and Lightning's own tree utilities use a torch API that torch has deprecated.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start "
                        r"of training")
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class RAGModule(L.LightningModule):
    """Train and evaluate a retrieval-augmented VLM.

    The model is built on the meta device (no memory) and materialised by
    `configure_model` (Lightning calls it): whole in one process, per rank under
    `PipelineStrategy` (only the units a rank runs; `trainers.parallel.parallelize`).

    Args:
        size: named model size (`tiny`, `demo`, `1b`).
        mode: `rag` (retrieve top-k), or a baseline: `closed_book`, `random`, `gold`.
        index_dir: the index to search (needed for every mode but `closed_book`).
        top_k: documents marginalised over (default: the size's).
        contrastive_weight: weight of the retriever's (q, gold) loss (default: the size's).
        train_text_encoder: also fine-tune the query encoder's text tower.
        lr: peak AdamW learning rate; weight_decay: on matrices only.
        warmup_steps: linear warm-up, then cosine decay to 10% over the trainer's max_steps
            (each phase has its own: the retriever warm-up, then joint training).
        retriever_warmup_steps: first train the query encoder alone (contrastive loss on
            (query, gold document), no generator: cheap), so the gold document is in the
            top-k by the time the generator starts learning from retrieved documents.
        activation_checkpointing: recompute activations in backward instead of keeping
            them: "off", "every" (block), n (every n-th block: blocks.0, blocks.n, ...) or a
            list of unit names (`trainers.parallel.checkpointing`). `PipelineStrategy` reads
            it too (or takes its own, which must then agree).
        use_doc_images: the generator also reads the retrieved documents' images (their
            patches before the query image's).
        vision_dir: the query vision folder an index of image documents was embedded with
            (scripts/build_index.py prints it; `rag_mm.query_vision`): the query encoder's
            vision path starts from it, and `setup` refuses an image index without it.
        shard_index: under data parallelism, each replica holds 1/N of the index and searches
            with the others (`retrieval_index.ShardedIndex` over the strategy's
            `retrieval_group()`, else the world); without processes, the whole index.
        reader: `rag` (each document read alone, answers mixed by the scores) or `fid`
            (fusion-in-decoder: all top-k documents in one sequence); see
            `rag_mm.config.ReaderConfig`.
        copy: mix a copy pointer over the documents' tokens into the LM head (default on).
        counterfactual: training-time rate of counterfactual answers in the gold document
            (default: `ReaderConfig`'s).
        train_doc_encoder: score the retrieved and gold documents with a trainable copy of the
            text tower that embedded the index (`rag_mm.doc_encoder`); the search keeps using
            the index's stored vectors until a refresh rebuilds them.
        refresh_every: every N optimizer steps, re-embed the corpus in the background with a
            snapshot of the document tower and swap the new index in at a step boundary
            (`trainers.refresh`; needs `train_doc_encoder`; under several processes rank 0
            builds and every rank swaps at the same step; not with `shard_index`).
        rerank: the rag reader mixes its documents by softmax(s + r), r the generator's own
            relevance logit of each (`ReaderConfig.rerank`; rag reader only, off by default).
        refresh_dir: where refreshed indexes go (default: the trainer's
            `default_root_dir/index_refresh`).
        novel_spans: the share of counterfactual answers that are random word-piece spans
            instead of another example's answer (default: `ReaderConfig`'s, 0.5).
        rescore: order the over-retrieved candidates by a second, trained score before the
            reader takes the top-k (`rag_mm.rescorer`; text-vector indexes, a frozen text
            tower; off here, on in the recipes).
    """

    def __init__(self, size: str = "demo", mode: str = "rag", index_dir: str | None = None,
                 top_k: int | None = None, contrastive_weight: float | None = None,
                 train_text_encoder: bool = False, lr: float = 1e-3, weight_decay: float = 0.01,
                 warmup_steps: int = 50, retriever_warmup_steps: int = 0,
                 activation_checkpointing: str | int | list[str] | None = None,
                 use_doc_images: bool = False, vision_dir: str | None = None,
                 shard_index: bool = False, reader: str = "rag", copy: bool = True,
                 counterfactual: float | None = None, train_doc_encoder: bool = False,
                 refresh_every: int | None = None, refresh_dir: str | None = None,
                 rerank: bool = False, rescore: bool = False,
                 novel_spans: float | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_refresh_settings(refresh_every, train_doc_encoder, index_dir, mode, shard_index)
        base = model_config(size, mode=mode)
        retriever = replace(
            base.retriever,
            top_k=top_k or base.retriever.top_k,
            contrastive_weight=(base.retriever.contrastive_weight if contrastive_weight is None
                                else contrastive_weight),
            train_text_encoder=train_text_encoder,
            vision_dir=vision_dir,
            train_doc_encoder=train_doc_encoder,
            rescore=rescore,
        )
        reader_config = replace(
            base.reader, kind=reader, copy=copy,
            counterfactual=(base.reader.counterfactual if counterfactual is None
                            else counterfactual),
            novel_spans=base.reader.novel_spans if novel_spans is None else novel_spans,
            rerank=rerank,
        )
        self.config = replace(base, retriever=retriever, use_doc_images=use_doc_images,
                              reader=reader_config)
        with torch.device("meta"):  # no memory yet: see configure_model
            self.model: RAGModel = build_model(self.config)
        apply_activation_checkpointing(self.model, activation_checkpointing)
        self.refresh = None  # an IndexRefresh once fitting starts (refresh_every)
        self._refresh_metrics: dict[str, float] = {}
        self._refresh_seen = (None, None)  # the global steps the two refresh hooks last saw

    def configure_model(self) -> None:
        """Materialise the model (built on the meta device): in one process all of it
        (`to_empty`, every unit's init, the pretrained text tower); under
        `PipelineStrategy` nothing here: each rank materialises only its own units
        (`trainers.parallel.parallelize`). Lightning calls this before `fit`, `validate`
        and `test`; call it yourself to use the model outside a Trainer. Idempotent."""
        from trainers.parallel.parallelize import materialize
        from trainers.parallel.strategy import PipelineStrategy

        if self._trainer is not None and isinstance(self.trainer.strategy, PipelineStrategy):
            return
        if self.model_on_meta():
            device = self.trainer.strategy.root_device if self._trainer is not None else "cpu"
            materialize(self.model, [name for name, _ in self.model.units()], device)

    def model_on_meta(self) -> bool:
        """Whether the model has not been materialised yet (`configure_model`)."""
        return any(p.is_meta for p in self.model.parameters())

    def state_dict(self, *args, **kwargs):
        """A model still on the meta device is materialised first, so a plain process can
        read a checkpoint into it (`dcp.load({"state_dict": module.state_dict()}, ...)`)."""
        if self.model_on_meta():
            self.configure_model()
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """A model still on the meta device is materialised first (e.g. `load_from_checkpoint`)."""
        if self.model_on_meta():
            self.configure_model()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def setup(self, stage: str) -> None:
        if self.model.retrieval.backend is None and self.hparams.index_dir is not None:
            backend = self._open_index()
            if backend is not None:
                self.model.attach(backend)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if stage == "fit" and hasattr(datamodule, "gold_keys"):
            # the training set's gold documents are negatives for every query (never held-out ones)
            self.model.set_shared_negatives(datamodule.gold_keys("train"))
        if stage == "fit" and self.hparams.refresh_every and self.refresh is None:
            self.refresh = self._make_refresh()

    def _open_index(self, index_dir=None):
        """The whole index, or this rank's shard of it (`shard_index`); None on a rank that
        does not search (a pipeline stage without the retrieval unit)."""
        import retrieval_index

        index_dir = index_dir or self.hparams.index_dir
        if not self.hparams.shard_index:
            return retrieval_index.load(index_dir)
        collective = retrieval_collective(self.trainer.strategy if self._trainer else None)
        if collective is None:
            return None
        return retrieval_index.ShardedIndex(index_dir, collective)

    def _make_refresh(self):
        import torch.distributed as dist

        from trainers.refresh import IndexRefresh, TorchSync

        world = self.trainer.world_size if self._trainer else 1
        sync = None
        if world > 1 and dist.is_available() and dist.is_initialized():
            # every rank joins one tiny all-reduce per step; rank 0 (pipeline stage 0) builds
            sync = TorchSync(self.trainer.strategy.root_device)
        elif world > 1:
            raise ValueError(f"refresh_every={self.hparams.refresh_every} (--refresh-every) under "
                             f"{world} processes needs torch.distributed initialised (the "
                             f"ranks agree on each swap); launch with torchrun or a "
                             f"Lightning strategy over processes")
        root = Path(self.hparams.refresh_dir or Path(self.trainer.default_root_dir) / "index_refresh")
        try:  # here, not at the first refresh N steps in
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"refresh_dir {root} (--refresh-dir) cannot be created ({err}); "
                             f"choose a writable folder") from None
        return IndexRefresh(self.hparams.refresh_every, root, sync=sync)

    # -- index refresh (trainers.refresh) ------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx):
        # Both hooks act once per optimizer step: under gradient accumulation they run for every
        # micro-batch, and a swap between two micro-batches of one step, or a second refresh
        # started at the same step (or one at step 0, from the untrained tower), must not be.
        boundary = self._refresh_seen[0] != self.global_step
        self._refresh_seen = (self.global_step, self._refresh_seen[1])
        if self.refresh is not None and boundary:  # a finished refresh is swapped in here
            metrics = self.refresh.at_step_boundary(self.global_step, self.model)
            swap = {k: v for k, v in metrics.items() if k not in STEP_REFRESH_METRICS}
            if swap:  # once per swap: past log_every_n_steps' throttle, straight to the loggers
                for logger in self.loggers:
                    logger.log_metrics(swap, step=self.global_step)
            self._refresh_metrics = {k: metrics[k] for k in STEP_REFRESH_METRICS}

    def on_train_batch_end(self, outputs, batch, batch_idx):
        stepped = self._refresh_seen[1] is not None and self._refresh_seen[1] != self.global_step
        self._refresh_seen = (self._refresh_seen[0], self.global_step)
        if self.refresh is not None:
            self.refresh.after_step(self.global_step, self.model, stepped=stepped)

    def on_train_start(self):
        # a resumed run's first step boundary is the restored step, as an uninterrupted run's
        self._refresh_seen = (None, self.global_step)

    def on_train_end(self):
        if self.refresh is not None:  # never waits for a refresh still running
            backend = getattr(self.model.retrieval, "backend", None)  # None: not stage 0
            self.refresh.stop(in_use=getattr(backend, "path", None))

    def set_mode(self, mode: str) -> None:
        """Evaluate the same weights under another document source (baselines)."""
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {', '.join(MODES)}")
        self.config.mode = mode

    # -- steps ---------------------------------------------------------------------------------
    def in_retriever_warmup(self) -> bool:
        """Whether this step trains the query encoder alone (`retriever_warmup_steps`);
        `PipelineStrategy`, which runs the training step itself, asks this too."""
        return self.global_step < self.hparams.retriever_warmup_steps and self.config.mode == "rag"

    def training_step(self, batch, batch_idx):
        if self._refresh_metrics:
            self.log_dict(self._refresh_metrics, batch_size=len(batch["images"]))
            self._refresh_metrics = {}
        if self.in_retriever_warmup():
            loss = self.model.retriever_loss(batch)
            self.log("train/retriever_warmup_loss", loss, prog_bar=True,
                     batch_size=len(batch["images"]))
            return loss
        out = self.model(batch)
        self.log_dict({f"train/{k}": v for k, v in out.items()}, prog_bar=True,
                      batch_size=len(batch["images"]))
        return out["loss"]

    def _eval_step(self, batch, prefix: str) -> None:
        batch = valid_rows(batch)
        if len(batch["images"]) == 0:  # a replica's share filler alone (see EvalShardSampler)
            return
        out = self.model(batch)
        metrics = {f"{prefix}/{k}": v for k, v in out.items()}
        metrics.update({f"{prefix}/{k}": v for k, v in self.answer_metrics(batch).items()})
        self.log_dict(metrics, prog_bar=prefix == "val", batch_size=len(batch["images"]))

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    @torch.no_grad()
    def answer_metrics(self, batch) -> dict[str, torch.Tensor]:
        """Exact match of the greedy answer, and recall@k of the gold document."""
        tokens, retrieved = self.model.generate(batch)
        return rates(self.answer_counts(batch, tokens, retrieved.keys))

    def answer_counts(self, batch, tokens: torch.Tensor, keys: np.ndarray
                      ) -> dict[str, torch.Tensor]:
        """{metric: (hits, examples)} behind `answer_metrics`, for generated `tokens` (B, T) and
        retrieved document `keys` (B, k); counts of data-parallel replicas add up."""
        exact = exact_match(tokens, batch["target_ids"], batch["target_mask"])
        counts = {"exact_match": torch.tensor([exact.sum().item(), len(exact)], dtype=torch.float64)}
        gold = batch["gold_keys"].cpu().numpy()
        if self.config.mode == "rag":
            hit = (keys == gold[:, None]).any(axis=1)[gold >= 0]
            counts[f"recall@{keys.shape[1]}"] = torch.tensor([hit.sum(), len(hit)],
                                                             dtype=torch.float64)
        return counts

    # -- optimisation --------------------------------------------------------------------------
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 and "embed" not in name else no_decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr, betas=(0.9, 0.95),
        )
        total = max(self.trainer.max_steps, 1) if self.trainer else 1
        phases = phase_bounds(total, self.hparams.retriever_warmup_steps
                              if self.config.mode == "rag" else 0)

        def schedule(step: int) -> float:
            start, end = [phase for phase in phases if phase[0] <= step][-1]
            return warmup_cosine(step - start, end - start, self.hparams.warmup_steps)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record each optimizer group's parameter names: torch keys a one-process optimizer
        state by index, and `PipelineStrategy` resumes such a file by name."""
        from trainers.parallel.single_device import PARAM_NAMES, param_names
        from trainers.refresh import INDEX_RECORD, checkpoint_record

        if self._trainer is not None:
            checkpoint[PARAM_NAMES] = param_names(self, self.trainer.optimizers)
        # under PipelineStrategy only stage 0 holds the retrieval unit (else a RemoteUnit)
        record = checkpoint_record(getattr(self.model.retrieval, "backend", None), self.refresh)
        if record is not None:
            checkpoint[INDEX_RECORD] = record

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resumed fit searches the index the checkpoint records (refused if it is gone or
        changed) and continues its refresh counters; evaluation keeps the index it was given."""
        from retrieval_index.refresh import check_record
        from trainers.refresh import INDEX_RECORD

        record = checkpoint.get(INDEX_RECORD)
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if record is None or not fitting or not hasattr(self.model.retrieval, "backend"):
            return  # (no backend: another pipeline rank holds the retrieval unit)
        path = check_record(record)
        attached = getattr(self.model.retrieval.backend, "path", None)
        if attached is None or Path(attached).resolve() != path:
            self.model.attach(self._open_index(path), check_encoder=False)
        if self.refresh is not None and "refresh" in record:
            self.refresh.load_state_dict(record["refresh"])


STEP_REFRESH_METRICS = ("refresh/steps_since", "refresh/count", "refresh/failures")


def check_refresh_settings(refresh_every, train_doc_encoder: bool, index_dir, mode: str,
                           shard_index: bool = False) -> None:
    """An index refresh needs a trainable document tower, an index and retrieval, and refreshes
    a whole index (not a sharded one)."""
    if refresh_every is None:
        return
    if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
        raise ValueError(f"refresh_every (--refresh-every) must be a whole number of steps >= 1, "
                         f"got {refresh_every!r}")
    if not train_doc_encoder:
        raise ValueError(f"refresh_every={refresh_every} (--refresh-every) needs a trainable "
                         f"document encoder: set train_doc_encoder=True (--train-doc-encoder, "
                         f"YAML model.train_doc_encoder: true); with a frozen one a refresh "
                         f"rebuilds the same index")
    if index_dir is None or mode != "rag":
        raise ValueError(f"refresh_every={refresh_every} refreshes the index a rag run searches; "
                         f"this run has mode={mode!r}, index_dir={index_dir!r}")
    if shard_index:
        raise ValueError(f"refresh_every={refresh_every} (--refresh-every) with shard_index=True "
                         f"(--shard-index): a refresh rebuilds and swaps a whole index; refreshing a "
                         f"sharded index is not built; set shard_index to false (every rank "
                         f"searches the whole index) or refresh_every to null")


def retrieval_collective(strategy):
    """The ranks that search one sharded index together: the strategy's `retrieval_group()`
    (None: this rank does not search), else every process (data parallelism), else one."""
    import torch.distributed as dist

    from retrieval_index import LocalCollective, TorchCollective

    hook = getattr(strategy, "retrieval_group", None)
    if hook is not None:
        group = hook()
        return None if group is None else TorchCollective(group)
    if dist.is_available() and dist.is_initialized():
        return TorchCollective()
    return LocalCollective()


def phase_bounds(total: int, retriever_warmup: int) -> list[tuple[int, int]]:
    """[(start, end)) step ranges that each get their own warm-up and decay: the retriever's
    warm-up phase, then joint training (whose generator starts from scratch)."""
    if 0 < retriever_warmup < total:
        return [(0, retriever_warmup), (retriever_warmup, total)]
    return [(0, total)]


def warmup_cosine(step: int, length: int, warmup: int) -> float:
    """LR factor: linear warm-up over `warmup` steps, then cosine decay to 10% at `length`."""
    warmup = min(warmup, max(1, length // 2))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, length - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def valid_rows(batch: dict) -> dict:
    """`batch` without the rows its `row_valid` marks False (fillers of a data-parallel
    replica's share, `trainers.data.EvalShardSampler`), and without that key."""
    if ROW_VALID not in batch:
        return batch
    keep = batch[ROW_VALID].bool()
    return {k: v[keep.to(v.device)] if isinstance(v, torch.Tensor) else v
            for k, v in batch.items() if k != ROW_VALID}


def rates(counts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{metric: hits / examples} of `RAGModule.answer_counts`, leaving out metrics with none."""
    return {name: (hits / total).float() for name, (hits, total) in counts.items() if total > 0}


def exact_match(predicted: torch.Tensor, target: torch.Tensor, target_mask: torch.Tensor
                ) -> torch.Tensor:
    """(B,) bool: the predicted tokens equal the target tokens up to and including [SEP]."""
    predicted = predicted.masked_fill(~target_mask.bool(), 0)
    return (predicted == target.masked_fill(~target_mask.bool(), 0)).all(dim=1)
