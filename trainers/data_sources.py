"""Where the data module's splits come from, its command-line flags and its load reports.

- `find_split(data_dir, split)`: `train.parquet`, `train.jsonl` or a `train/` folder (parquet
  files, an imagefolder or a `save_to_disk` folder), whichever `data_dir` holds.
- `add_data_arguments(parser)` / `data_kwargs(args)`: `--on-bad`, `--fix-images` and the
  example column flags for any script that builds a `RAGDataModule`.
- `report_metrics(reports)`: the load reports as flat numbers for a Lightning logger.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rag_mm.data import (
    ON_BAD,
    DataError,
    ExampleColumns,
    LoadReport,
    add_column_args,
    columns_from_args,
)


def split_candidates(data_dir: Path, split: str) -> list[Path]:
    return [data_dir / f"{split}.parquet", data_dir / f"{split}.jsonl", data_dir / split]


def accepted_names(split: str) -> str:
    return (
        f"{split}.parquet, {split}.jsonl (+ image files) or a {split}/ folder (parquet files, "
        f"an imagefolder with metadata.jsonl/metadata.csv, or a save_to_disk folder)"
    )


def find_split(data_dir: str | Path, split: str) -> Path | None:
    """The one source of `split` in `data_dir`, or None; `DataError` if there are two."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        kind = "is not a folder" if data_dir.exists() else "does not exist"
        raise DataError(
            f"data folder {data_dir} {kind}; it should hold the splits as {accepted_names('train')}"
        )
    found = [p for p in split_candidates(data_dir, split) if p.exists()]
    if len(found) > 1:
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in found)
        raise DataError(
            f"{data_dir}: split {split!r} is given {len(found)} times ({names}); keep one"
        )
    return found[0] if found else None


def missing_split(split: str, data_dir: Path | None, path: Path | None) -> str:
    """One line saying why there are no `split` examples."""
    if path is not None:
        return f"no {split} examples: {path} does not exist"
    if data_dir is not None:
        return f"no {split} examples in {data_dir}: expected {accepted_names(split)}"
    return f"no {split} examples: pass data_dir (--data) or {split}_path"


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """`--on-bad`, `--fix-images` and `--image-column` ... `--gold-id-column` (examples)."""
    parser.add_argument(
        "--on-bad",
        choices=ON_BAD,
        default="error",
        help="bad example rows: stop with an error naming the row, or skip and count them",
    )
    parser.add_argument(
        "--fix-images",
        action="store_true",
        help="convert example images to RGB and resize them to the model's size instead of "
        "refusing them",
    )
    add_column_args(parser, ExampleColumns)


def data_kwargs(args: argparse.Namespace) -> dict:
    """`RAGDataModule(..., **data_kwargs(args))` for flags added by `add_data_arguments`."""
    return {
        "on_bad": args.on_bad,
        "fix_images": args.fix_images,
        "columns": columns_from_args(args, ExampleColumns),
    }


def report_metrics(reports: dict[str, LoadReport]) -> dict[str, float]:
    """`{"data/train/rows_read": ..., "data/train/skipped/bad_image": ...}` per split."""
    metrics = {}
    for split, report in reports.items():
        prefix = f"data/{split}"
        metrics[f"{prefix}/rows_read"] = report.rows_read
        metrics[f"{prefix}/rows_kept"] = report.rows_kept
        metrics[f"{prefix}/skipped"] = sum(report.skipped.values())
        metrics[f"{prefix}/images_fixed"] = report.images_fixed
        for reason, count in sorted(report.skipped.items()):
            metrics[f"{prefix}/skipped/{reason}"] = count
    return {k: float(v) for k, v in metrics.items()}
