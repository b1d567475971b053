"""The scripts' data side: every split format in a data folder, the data flags, load reports
printed and logged, and one-line user errors (no traceback, exit code 2).

Run: .venv/bin/pytest tests/test_data_formats.py -q
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
from pathlib import Path
from types import SimpleNamespace

import datasets
import pandas as pd
import pytest
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from rag_mm.data import DataError
from tests.helpers.index import make_rows
from trainers.data import RAGDataModule, add_data_arguments, data_kwargs
from trainers.errors import UserExit, run_cli

ROOT = Path(__file__).resolve().parents[1]
COLOURS = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (200, 200, 10)]


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path, monkeypatch):
    """Keep the imagefolder builder's cache inside the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def png(colour, size=(32, 32), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def rows(split: str, n: int = 4) -> list[dict]:
    return [
        {"prompt": f"{split} question {i} ?", "target": "paris", "colour": COLOURS[i % 4]}
        for i in range(n)
    ]


def write_parquet(path: Path, split: str, **png_args) -> None:
    data = rows(split)
    Dataset.from_dict(
        {
            "image": [{"bytes": png(r["colour"], **png_args), "path": None} for r in data],
            "prompt": [r["prompt"] for r in data],
            "target": [r["target"] for r in data],
        },
        features=Features(
            {"image": ImageFeature(), "prompt": Value("string"), "target": Value("string")}
        ),
    ).to_parquet(str(path))


def write_jsonl(root: Path, split: str) -> None:
    (root / "images").mkdir(exist_ok=True)
    lines = []
    for i, r in enumerate(rows(split)):
        (root / "images" / f"{split}{i}.png").write_bytes(png(r["colour"]))
        lines.append({"image": f"images/{split}{i}.png", "prompt": r["prompt"], "target": r["target"]})
    (root / f"{split}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def write_imagefolder(root: Path, split: str) -> None:
    folder = root / split
    folder.mkdir()
    meta = []
    for i, r in enumerate(rows(split)):
        (folder / f"{i}.png").write_bytes(png(r["colour"]))
        meta.append({"file_name": f"{i}.png", "prompt": r["prompt"], "target": r["target"]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in meta))


def write_saved(root: Path, split: str) -> None:
    data = rows(split)
    Dataset.from_dict(
        {
            "image": [{"bytes": png(r["colour"]), "path": None} for r in data],
            "prompt": [r["prompt"] for r in data],
            "target": [r["target"] for r in data],
        },
        features=Features(
            {"image": ImageFeature(), "prompt": Value("string"), "target": Value("string")}
        ),
    ).save_to_disk(str(root / split))


def test_each_split_in_any_format_is_discovered(tmp_path):
    """train.jsonl + image files, val/ an imagefolder, test/ a save_to_disk folder."""
    write_jsonl(tmp_path, "train")
    write_imagefolder(tmp_path, "val")
    write_saved(tmp_path, "test")
    data = RAGDataModule(tmp_path, model_size="tiny", batch_size=2)
    data.setup(None)
    assert {s: r.format for s, r in data.reports.items()} == {
        "train": "jsonl", "val": "imagefolder", "test": "save_to_disk",
    }
    for split in ("train", "val", "test"):
        ds = data.datasets[split]
        assert ds["prompt"] == [r["prompt"] for r in rows(split)]
        assert [ds[i]["image"].getpixel((3, 3)) for i in range(4)] == COLOURS
    assert next(iter(data.val_dataloader()))["images"].shape == (2, 3, 32, 32)


def test_parquet_folder_split(tmp_path):
    (tmp_path / "train").mkdir()
    write_parquet(tmp_path / "train" / "part-0.parquet", "train")
    data = RAGDataModule(tmp_path, model_size="tiny")
    data.setup("fit")
    assert data.reports["train"].format == "parquet" and len(data.datasets["train"]) == 4


def test_a_folder_without_splits_names_the_folder_and_the_accepted_names(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    data = RAGDataModule(tmp_path, model_size="tiny")
    with pytest.raises(DataError) as err:
        data.setup("fit")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path) in message
    for name in ("train.parquet", "train.jsonl", "train/", "imagefolder", "save_to_disk"):
        assert name in message
    with pytest.raises(DataError, match=r"data folder .*missing does not exist"):
        RAGDataModule(tmp_path / "missing", model_size="tiny")


def test_two_sources_for_one_split_are_refused(tmp_path):
    write_parquet(tmp_path / "train.parquet", "train")
    write_jsonl(tmp_path, "train")
    with pytest.raises(DataError, match=r"split 'train' is given 2 times \(train.parquet, train.jsonl\)"):
        RAGDataModule(tmp_path, model_size="tiny")


class RecordingLogger:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, metrics))


def test_load_reports_are_printed_and_logged(tmp_path, capsys):
    write_parquet(tmp_path / "train.parquet", "train")
    frame = pd.read_parquet(tmp_path / "train.parquet")
    frame.loc[1, "prompt"] = "   "
    frame.to_parquet(tmp_path / "train.parquet")
    data = RAGDataModule(tmp_path, model_size="tiny", on_bad="skip")
    logger = RecordingLogger()
    data.trainer = SimpleNamespace(global_rank=0, loggers=[logger])
    data.setup("fit")
    out = capsys.readouterr().out
    assert "train: " in out and "read 4, kept 3, skipped 1 (empty_prompt=1)" in out
    step, metrics = logger.logged[0]
    assert step == 0 and metrics["data/train/rows_read"] == 4.0
    assert metrics["data/train/skipped/empty_prompt"] == 1.0
    assert data.load_report_metrics() == metrics


def test_data_flags_reach_the_data_module(tmp_path):
    """--fix-images resizes a 64x32 image, --prompt-column renames, --on-bad skip skips."""
    write_parquet(tmp_path / "train.parquet", "train", size=(64, 32))
    frame = pd.read_parquet(tmp_path / "train.parquet").rename(columns={"prompt": "question"})
    frame.to_parquet(tmp_path / "train.parquet")
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    with pytest.raises(DataError, match=r"row 0: image is 64x32, expected 32x32.*--fix-images"):
        RAGDataModule(tmp_path, model_size="tiny", **data_kwargs(parser.parse_args(
            ["--prompt-column", "question"]))).setup("fit")
    args = parser.parse_args(["--fix-images", "--on-bad", "skip", "--prompt-column", "question"])
    data = RAGDataModule(tmp_path, model_size="tiny", **data_kwargs(args))
    data.setup("fit")
    assert data.reports["train"].images_fixed == 4
    assert data.datasets["train"][0]["image"].size == (32, 32)


def test_unknown_gold_ids_are_skipped_and_counted_with_on_bad_skip(tmp_path):
    write_parquet(tmp_path / "train.parquet", "train")
    frame = pd.read_parquet(tmp_path / "train.parquet")
    frame["gold_id"] = ["doc-0", "no-such-doc", None, "doc-3"]
    frame.to_parquet(tmp_path / "train.parquet")
    import retrieval_index
    from tests.helpers.index import HashEmbedder

    retrieval_index.build_index(make_rows(5), tmp_path / "index", embedder=HashEmbedder(),
                                progress=False, num_recall_queries=5)
    data = RAGDataModule(tmp_path, index_dir=str(tmp_path / "index"), model_size="tiny",
                         on_bad="skip")
    data.setup("fit")
    assert data.datasets["train"]["gold_key"] == [0, -1, 3]
    assert data.reports["train"].skipped == {"unknown_gold_id": 1}
    assert data.reports["train"].rows_kept == 3


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_cli_prints_one_line_and_exits_2(capsys):
    def main(argv):
        raise DataError("data/train.parquet, row 7: image is 64x32\n expected 32x32")

    with pytest.raises(UserExit) as exit_info:
        run_cli(main, [], prog="x.py")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "x.py: error: data/train.parquet, row 7: image is 64x32 expected 32x32\n"
    )
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_cli(lambda argv: 1 / 0, [])


def test_build_index_fix_images_and_one_line_errors(tiny_dirs, tmp_path, capsys):
    """A corpus with greyscale images: refused by name without --fix-images, built with it."""
    frame = pd.DataFrame(make_rows(12))
    frame["image"] = [{"bytes": png((90, 90, 90), mode="L"), "path": None}] * 12
    frame.to_parquet(tmp_path / "corpus.parquet")
    build_index = load_script("build_index")
    args = ["--corpus", str(tmp_path / "corpus.parquet"), "--encoder", str(tiny_dirs[0]),
            "--drop-images"]
    with pytest.raises(SystemExit) as exit_info:
        build_index.main([*args, "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "corpus.parquet, row 0 (id 'doc-0')" in err and "mode L" in err and "--fix-images" in err
    build_index.main([*args, "--out", str(tmp_path / "b"), "--fix-images"])
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["count"] == 12
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        build_index.main(["--corpus", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "nope.parquet" in err


def test_load_report_reaches_a_lightning_csv_logger(tmp_path, capsys):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    write_parquet(tmp_path / "train.parquet", "train")
    data = RAGDataModule(tmp_path, model_size="tiny")
    logger = CSVLogger(tmp_path / "logs", name="run")
    data.trainer = L.Trainer(logger=logger, accelerator="cpu", devices=1,
                             enable_progress_bar=False, enable_model_summary=False)
    data.setup("fit")
    logger.save()
    metrics = pd.read_csv(Path(logger.log_dir) / "metrics.csv")
    assert metrics.loc[0, "data/train/rows_read"] == 4 and metrics.loc[0, "step"] == 0
