"""The LightningDataModule: validated example tables -> tokenised, batched tensors.

A data directory holds each split in any format `rag_mm.data.load_examples` reads:
`train.parquet` (as written by `scripts/make_demo_data.py`), `train.jsonl` (+ image files),
or a `train/` folder (parquet files, an imagefolder, a `save_to_disk` folder); likewise `val`
and `test`. Or each split is given as its own path. The load reports (rows read, kept,
skipped per reason, images fixed) are printed at setup and logged as `data/...` metrics. Gold document ids are turned into index keys once, at
setup, so batches carry `gold_keys` (-1 where an example has no gold document).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from rag_mm.config import model_config
from rag_mm.data import DataError, ExampleColumns, load_examples
from rag_mm.images import to_tensor
from rag_mm.tokenizer import load_tokenizer
from trainers.data_sources import (  # noqa: F401  (add_data_arguments, data_kwargs: for scripts)
    add_data_arguments,
    data_kwargs,
    find_split,
    missing_split,
    report_metrics,
)
from trainers.run.resume import ResumableSampler, resume_position

SPLITS = ("train", "val", "test")
ROW_VALID = "row_valid"  # batch key: False marks a row that only fills a replica's share


class EvalShardSampler(DistributedSampler):
    """One data-parallel replica's share of an evaluation split, every row exactly once
    over all replicas: rows rank, rank + n, rank + 2n, ... in order. The shares must be
    equally long (the replicas' steps run collectives together), so a share one row short
    ends with a repeat of its last row marked not valid (`DistributedSampler` repeats rows
    unmarked, and every metric counts them twice). Yields (row, valid) for `MarkedRows`."""

    def __init__(self, dataset, *, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)

    def __iter__(self):
        rows = list(range(self.rank, len(self.dataset), self.num_replicas))
        yield from ((row, True) for row in rows)
        fill = rows[-1] if rows else 0
        yield from ((fill, False) for _ in range(self.num_samples - len(rows)))


class MarkedRows(Dataset):
    """A dataset indexed by `EvalShardSampler`'s (row, valid): the row, and whether it counts."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, bool]) -> dict:
        row, valid = key
        return {**self.dataset[row], ROW_VALID: valid}


class Collator:
    """Rows {image, prompt, target, gold_key} -> the batch dict `RAGModel` consumes."""

    def __init__(self, tokenizer, *, image_size: int, max_prompt_tokens: int,
                 max_target_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.max_prompt_tokens = max_prompt_tokens
        self.max_target_tokens = max_target_tokens

    def targets(self, texts: list[str]) -> list[list[int]]:
        """Answer tokens + [SEP] (the generator's end-of-answer)."""
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [t + [self.tokenizer.sep_token_id] for t in ids]

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        prompts = self.tokenizer(
            [r["prompt"] for r in rows], padding="max_length", truncation=True,
            max_length=self.max_prompt_tokens, return_tensors="pt",
        )
        target_ids = torch.zeros(len(rows), self.max_target_tokens, dtype=torch.long)
        for i, tokens in enumerate(self.targets([r["target"] for r in rows])):
            target_ids[i, : len(tokens)] = torch.tensor(tokens[: self.max_target_tokens])
        return {
            "images": torch.stack([to_tensor(r["image"], self.image_size) for r in rows]),
            "prompt_ids": prompts["input_ids"],
            "prompt_mask": prompts["attention_mask"],
            "target_ids": target_ids,
            "target_mask": target_ids != 0,
            "gold_keys": torch.tensor([r.get("gold_key", -1) for r in rows], dtype=torch.long),
            **({ROW_VALID: torch.tensor([r[ROW_VALID] for r in rows])} if ROW_VALID in rows[0]
               else {}),
        }


class RAGDataModule(L.LightningDataModule):
    """Loads train/val/test examples, checks them against the model size and the index.

    Args:
        data_dir: folder with the splits, each as `SPLIT.parquet`, `SPLIT.jsonl` or `SPLIT/`.
        train_path / val_path / test_path: explicit per-split paths (override `data_dir`).
        index_dir: the index the model searches; gold ids are mapped to its keys.
        model_size: named model size; gives image size and token budgets.
        batch_size, num_workers: DataLoader settings.
        seed: of the training order (default: the run's `seed_everything` seed, else 0).
        on_bad: "error" (default) or "skip" bad rows (counted in the load report).
        fix_images: convert images to RGB and resize them instead of refusing them.
        columns: source column names of the example tables.
    """

    def __init__(self, data_dir: str | None = None, *, train_path: str | None = None,
                 val_path: str | None = None, test_path: str | None = None,
                 index_dir: str | None = None, model_size: str = "demo", batch_size: int = 32,
                 num_workers: int = 0, seed: int | None = None, on_bad: str = "error",
                 fix_images: bool = False,
                 columns: ExampleColumns | None = None) -> None:
        super().__init__()
        self.data_dir = None if data_dir is None else Path(data_dir)
        self.paths = {s: self._split_path(s, data_dir, p)
                      for s, p in zip(SPLITS, (train_path, val_path, test_path))}
        self.index_dir = index_dir
        self.config = model_config(model_size)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = int(os.environ.get("PL_GLOBAL_SEED", "0")) if seed is None else seed
        self.on_bad, self.fix_images = on_bad, fix_images
        self.columns = columns or ExampleColumns()
        self.tokenizer = load_tokenizer(self.config.retriever.text_encoder)
        self.collate = Collator(
            self.tokenizer, image_size=self.config.vision.image_size,
            max_prompt_tokens=self.config.max_prompt_tokens,
            max_target_tokens=self.config.max_target_tokens,
        )
        self.datasets: dict = {}
        self.reports: dict = {}

    @staticmethod
    def _split_path(split: str, data_dir: str | None, path: str | None) -> Path | None:
        if path is not None:
            return Path(path)
        if data_dir is None:
            return None
        return find_split(data_dir, split)

    def setup(self, stage: str | None = None) -> None:
        index = None
        if self.index_dir is not None:
            import retrieval_index

            # keys of gold ids only: no search structure (FAISS, or vectors on the GPU)
            index = retrieval_index.load(self.index_dir, check_encoder=False, search="none")
        for split, path in self.paths.items():
            if path is None or split in self.datasets or not path.exists():
                continue
            result = load_examples(path, columns=self.columns, on_bad=self.on_bad,
                                   image_size=self.config.vision.image_size,
                                   fix_images=self.fix_images)
            dataset = self._check_targets(result, path)
            dataset, report = self._add_gold_keys(dataset, index, path, result.report)
            self.datasets[split], self.reports[split] = dataset, report
            self._report(split, report)
        if "train" not in self.datasets and stage in ("fit", None):
            raise DataError(missing_split("train", self.data_dir, self.paths["train"]))

    def _report(self, split: str, report) -> None:
        """Print one split's load report and log it (`data/SPLIT/...`) to the trainer's loggers."""
        rank = getattr(self.trainer, "global_rank", 0) if self._trainer_attached() else 0
        if rank != 0:
            return
        print(f"{split}: {report}", flush=True)
        if self._trainer_attached():
            metrics = report_metrics({split: report})
            for logger in self.trainer.loggers:
                logger.log_metrics(metrics, step=0)

    def _trainer_attached(self) -> bool:
        return getattr(self, "trainer", None) is not None

    def load_report_metrics(self) -> dict[str, float]:
        """The load reports of the splits set up so far, as flat `data/...` numbers."""
        return report_metrics(self.reports)

    def _check_targets(self, result, path: Path):
        dataset = result.dataset
        lengths = [len(t) for t in self.collate.targets(list(dataset["target"]))]
        too_long = [i for i, n in enumerate(lengths) if n > self.config.max_target_tokens]
        if too_long:
            row = too_long[0]
            raise DataError(
                f"{path}: row {int(result.source_rows[row])}: target {dataset[row]['target']!r} "
                f"is {lengths[row]} tokens "
                f"with [SEP]; model size {self.config.name!r} allows max_target_tokens="
                f"{self.config.max_target_tokens} ({len(too_long)} rows too long)"
            )
        return dataset

    def _add_gold_keys(self, dataset, index, path: Path, report):
        """Add `gold_key`; gold ids the index lacks are an error, or skipped with on_bad="skip"
        (counted as `unknown_gold_id`)."""
        if "gold_id" not in dataset.column_names or index is None:
            return dataset.add_column("gold_key", [-1] * len(dataset)), report
        ids = list(dataset["gold_id"])
        present = [i for i, g in enumerate(ids) if g is not None]
        keys = np.full(len(ids), -1, dtype=np.int64)
        try:
            keys[present] = index.key_of([ids[i] for i in present])
        except KeyError as err:
            if self.on_bad != "skip":
                raise DataError(
                    f"{path}: gold_id not in the index {index.path}: {err} (--on-bad skip skips "
                    f"such rows)"
                ) from None
            known = set(index.store.table.column("id").to_pylist())
            keep = [i for i, g in enumerate(ids) if g is None or g in known]
            for i in keep:
                if ids[i] is not None:
                    keys[i] = index.key_of([ids[i]])[0]
            skipped = dict(report.skipped)
            skipped["unknown_gold_id"] = skipped.get("unknown_gold_id", 0) + len(ids) - len(keep)
            report = replace(report, rows_kept=len(keep), skipped=skipped)
            dataset, keys = dataset.select(keep), keys[keep]
        return dataset.add_column("gold_key", keys.tolist()), report

    def gold_keys(self, split: str = "train") -> np.ndarray:
        """The index keys of a split's gold documents (-1 where none), after `setup`."""
        if split not in self.datasets:
            return np.zeros(0, dtype=np.int64)
        return np.asarray(self.datasets[split]["gold_key"], dtype=np.int64)

    def _loader(self, split: str, sampler=None) -> DataLoader:
        if split not in self.datasets:
            raise DataError(missing_split(split, self.data_dir, self.paths[split]))
        # A loader of its own generator: each `iter()` draws its workers' base seed from it, not
        # from torch's global generator, which the run's checkpoints restore. Drawing from the
        # global one made a resume at an epoch boundary diverge: the uninterrupted run drew for
        # its next epoch's iterator after the save, the resumed run before the restore.
        return DataLoader(self.datasets[split], batch_size=self.batch_size, sampler=sampler,
                          collate_fn=self.collate, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, drop_last=sampler is not None,
                          generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch from (seed, epoch) alone, one share per data-parallel replica,
        full batches only; a resumed run starts where the interrupted one stopped."""
        trainer = self.trainer
        replicas = getattr(trainer.strategy, "distributed_sampler_kwargs", None) if trainer else None
        sampler = ResumableSampler(self.datasets.get("train", []), seed=self.seed,
                                   **(replicas or {}))
        loader = self._loader("train", sampler)
        sampler.start_at(resume_position(trainer, len(loader)) * self.batch_size)
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _eval_loader(self, split: str) -> DataLoader:
        """In order; over data-parallel replicas, every row once (`EvalShardSampler`: a
        share one row short is filled with a row marked `row_valid` False, which the module
        and `PipelineStrategy` leave out of every loss and metric)."""
        trainer = self.trainer
        replicas = getattr(trainer.strategy, "distributed_sampler_kwargs", None) if trainer else None
        if not replicas or replicas.get("num_replicas", 1) == 1 or split not in self.datasets:
            return self._loader(split)
        sampler = EvalShardSampler(self.datasets[split], num_replicas=replicas["num_replicas"],
                                   rank=replicas["rank"])
        return DataLoader(MarkedRows(self.datasets[split]), batch_size=self.batch_size,
                          sampler=sampler, collate_fn=self.collate, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)
