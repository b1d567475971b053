"""Tests for rag_mm.data: every format loads, every bad input fails clearly or is skipped.

Run: .venv/bin/pytest tests/test_data.py -q
"""

import argparse
import io
import json
import time

import datasets
import numpy as np
import pytest
from datasets import Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from rag_mm.data import (
    CorpusColumns,
    DataError,
    ExampleColumns,
    add_column_args,
    check_gold_ids,
    columns_from_args,
    load_corpus,
    load_examples,
)

RED, BLUE = (200, 10, 10), (10, 10, 200)


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path, monkeypatch):
    """Keep the imagefolder builder's cache inside the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def png(color=RED, size=32, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), color if mode == "RGB" else 128).save(buf, format="PNG")
    return buf.getvalue()


def image_cells(*blobs):
    return [None if b is None else {"bytes": b, "path": None} for b in blobs]


EXAMPLE_FEATURES = Features(
    {"img": ImageFeature(), "q": Value("string"), "a": Value("string"), "doc": Value("string")}
)
RENAMED = ExampleColumns(image="img", prompt="q", target="a", gold_id="doc")


def write_examples_parquet(path, images, prompts=None, targets=None, docs=None):
    n = len(images)
    Dataset.from_dict(
        {
            "img": image_cells(*images),
            "q": prompts or [f"question {i} ?" for i in range(n)],
            "a": targets or [f"answer{i}" for i in range(n)],
            "doc": docs or [f"d{i}" for i in range(n)],
        },
        features=EXAMPLE_FEATURES,
    ).to_parquet(str(path))
    return path


def write_corpus_parquet(path, ids, texts):
    Dataset.from_dict({"pid": ids, "body": texts}).to_parquet(str(path))
    return path


CORPUS_RENAMED = CorpusColumns(id="pid", text="body")


# --------------------------------------------------------------------------- formats


def test_parquet_file_with_renamed_columns(tmp_path):
    path = write_examples_parquet(tmp_path / "ex.parquet", [png(RED), png(BLUE)])
    result = load_examples(path, columns=RENAMED)
    ds = result.dataset
    assert ds.column_names == ["image", "prompt", "target", "gold_id"]
    assert isinstance(ds.features["image"], ImageFeature)
    first = ds[0]
    assert first["image"].mode == "RGB" and first["image"].size == (32, 32)
    assert first["image"].getpixel((5, 5)) == RED and ds[1]["image"].getpixel((0, 0)) == BLUE
    assert (first["prompt"], first["target"], first["gold_id"]) == ("question 0 ?", "answer0", "d0")
    assert result.report.rows_read == 2 and result.report.rows_kept == 2
    assert "\n" not in str(result.report) and "kept 2" in str(result.report)


def test_parquet_folder_names_the_file_of_a_bad_row(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_corpus_parquet(folder / "part-0.parquet", ["a", "b"], ["alpha", "beta"])
    write_corpus_parquet(folder / "part-1.parquet", ["c", "d"], ["gamma", " "])
    with pytest.raises(DataError, match=r"part-1\.parquet, row 1 \(id 'd'\): text is empty"):
        load_corpus(folder, columns=CORPUS_RENAMED)
    result = load_corpus(folder, columns=CORPUS_RENAMED, on_bad="skip")
    assert result.dataset["id"] == ["a", "b", "c"]
    with pytest.raises(DataError, match=rf"{folder}: missing column 'text'"):
        load_corpus(folder, columns=CorpusColumns(id="pid"))
    assert result.report.skipped == {"empty_text": 1} and result.report.format == "parquet"


def test_jsonl_with_relative_image_paths_and_int_ids(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (32, 32), BLUE).save(tmp_path / "imgs" / "x.png")
    rows = [{"img": "imgs/x.png", "q": "what ?", "a": "blue", "doc": 7}]
    (tmp_path / "ex.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_examples(tmp_path / "ex.jsonl", columns=RENAMED).dataset
    assert ds[0]["image"].getpixel((3, 3)) == BLUE and ds[0]["gold_id"] == "7"

    lines = [{"pid": 1, "body": "one"}, {"pid": "two", "body": "deux", "extra": 2}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    corpus = load_corpus(tmp_path / "c.jsonl", columns=CORPUS_RENAMED).dataset
    assert corpus["id"] == ["1", "two"] and corpus["extra"] == [None, 2]
    assert "image" not in corpus.column_names


def test_jsonl_invalid_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: invalid JSON"):
        load_corpus(path)


@pytest.mark.parametrize("meta_format", ["jsonl", "csv"])
def test_imagefolder_with_metadata(tmp_path, meta_format):
    folder = tmp_path / "folder"
    folder.mkdir()
    Image.new("RGB", (32, 32), RED).save(folder / "r.png")
    Image.new("RGB", (32, 32), BLUE).save(folder / "b.png")
    rows = [("b.png", "which colour ?", "blue"), ("r.png", "and this one ?", "red")]
    if meta_format == "jsonl":
        text = "".join(json.dumps({"file_name": f, "q": q, "a": a}) + "\n" for f, q, a in rows)
    else:
        text = "file_name,q,a\n" + "".join(f"{f},{q},{a}\n" for f, q, a in rows)
    (folder / f"metadata.{meta_format}").write_text(text)
    result = load_examples(folder, columns=ExampleColumns(prompt="q", target="a"))
    ds = result.dataset
    assert result.report.format == "imagefolder"
    assert ds["target"] == ["blue", "red"] and "gold_id" not in ds.column_names
    assert ds[0]["image"].getpixel((1, 1)) == BLUE and ds[1]["image"].getpixel((1, 1)) == RED


def test_imagefolder_metadata_without_file_name(tmp_path):
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"image": "a.png", "q": "x"}) + "\n")
    with pytest.raises(DataError, match=r"metadata\.jsonl.*'file_name'.*\['image', 'q'\]"):
        load_examples(tmp_path)


def test_save_to_disk(tmp_path):
    ds = Dataset.from_dict(
        {"pid": [3, 4], "body": ["three", "four"], "image": image_cells(png(RED), png(BLUE))},
        features=Features(
            {"pid": Value("int64"), "body": Value("string"), "image": ImageFeature()}
        ),
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    result = load_corpus(tmp_path / "saved", columns=CORPUS_RENAMED)
    out = result.dataset
    assert result.report.format == "save_to_disk"
    assert out["id"] == ["3", "4"] and out.features["id"] == Value("string")
    assert out[1]["image"].getpixel((0, 0)) == BLUE


def test_unknown_formats_list_the_supported_ones(tmp_path):
    (tmp_path / "data.csv").write_text("id,text\na,b\n")
    with pytest.raises(DataError, match=r"data\.csv: unknown data format.*parquet.*jsonl.*"
                       r"imagefolder.*save_to_disk"):
        load_corpus(tmp_path / "data.csv")
    with pytest.raises(DataError, match="no such file"):
        load_corpus(tmp_path / "missing.parquet")
    DatasetDict({"train": Dataset.from_dict({"id": ["a"], "text": ["b"]})}).save_to_disk(
        str(tmp_path / "dd")
    )
    with pytest.raises(DataError, match=r"DatasetDict with splits \['train'\]"):
        load_corpus(tmp_path / "dd")


# --------------------------------------------------------------------------- bad input


def test_missing_column_names_file_column_columns_and_flag(tmp_path):
    path = write_corpus_parquet(tmp_path / "c.parquet", ["a"], ["alpha"])
    with pytest.raises(DataError) as err:
        load_corpus(path, columns=CorpusColumns(id="pid", text="passage"))
    msg = str(err.value)
    for part in ["c.parquet", "'passage'", "['pid', 'body']", "--text-column"]:
        assert part in msg
    # on_bad="skip" never hides a missing column
    with pytest.raises(DataError, match="missing column"):
        load_corpus(path, columns=CorpusColumns(id="pid", text="passage"), on_bad="skip")


def test_missing_optional_column_only_fails_when_renamed(tmp_path):
    path = write_corpus_parquet(tmp_path / "c.parquet", ["a"], ["alpha"])
    assert "image" not in load_corpus(path, columns=CORPUS_RENAMED).dataset.column_names
    with pytest.raises(DataError, match="'pic'.*--image-column"):
        load_corpus(path, columns=CorpusColumns(id="pid", text="body", image="pic"))


@pytest.mark.parametrize("column", ["q", "a"])
def test_blank_prompt_or_target(tmp_path, column):
    values = ["fine", "\t \n", None]
    kwargs = {"prompts" if column == "q" else "targets": values}
    path = write_examples_parquet(tmp_path / "ex.parquet", [png()] * 3, **kwargs)
    name = "prompt" if column == "q" else "target"
    with pytest.raises(DataError, match=rf"ex\.parquet, row 1: {name} is empty.*1 more bad"):
        load_examples(path, columns=RENAMED)
    result = load_examples(path, columns=RENAMED, on_bad="skip")
    assert len(result.dataset) == 1 and result.report.skipped == {f"empty_{name}": 2}


def test_missing_and_blank_ids(tmp_path):
    path = write_corpus_parquet(tmp_path / "c.parquet", ["a", None, ""], ["x", "y", "z"])
    with pytest.raises(DataError, match=r"row 1: id is empty"):
        load_corpus(path, columns=CORPUS_RENAMED)
    assert load_corpus(path, columns=CORPUS_RENAMED, on_bad="skip").report.skipped == {
        "missing_id": 2
    }


def test_duplicate_ids_name_both_rows(tmp_path):
    path = write_corpus_parquet(
        tmp_path / "c.parquet", ["a", "b", "a", "a"], ["first", "x", "second", "third"]
    )
    with pytest.raises(DataError, match=r"row 2 \(id 'a'\): duplicate id 'a', first at "
                       r".*c\.parquet, row 0"):
        load_corpus(path, columns=CORPUS_RENAMED)
    result = load_corpus(path, columns=CORPUS_RENAMED, on_bad="skip")
    assert result.dataset["text"] == ["first", "x"]
    assert result.report.skipped == {"duplicate_id": 2}
    assert list(result.source_rows) == [0, 1]


def test_duplicate_of_a_skipped_row_is_kept(tmp_path):
    path = write_corpus_parquet(tmp_path / "c.parquet", ["a", "a"], ["  ", "real"])
    result = load_corpus(path, columns=CORPUS_RENAMED, on_bad="skip")
    assert result.dataset["text"] == ["real"] and result.report.skipped == {"empty_text": 1}


def test_corrupt_and_missing_image_files_are_named(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (32, 32), RED).save(tmp_path / "imgs" / "ok.png")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png at all")
    rows = [
        {"image": "imgs/ok.png", "prompt": "p", "target": "t"},
        {"image": "imgs/broken.png", "prompt": "p", "target": "t"},
        {"image": "imgs/gone.png", "prompt": "p", "target": "t"},
        {"image": None, "prompt": "p", "target": "t"},
    ]
    path = tmp_path / "ex.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        load_examples(path)
    msg = str(err.value)
    assert "ex.jsonl, row 1" in msg and str(tmp_path / "imgs" / "broken.png") in msg
    assert "cannot read image" in msg and "2 more bad rows" in msg
    result = load_examples(path, on_bad="skip")
    assert len(result.dataset) == 1 and result.report.skipped == {"bad_image": 3}


def test_corrupt_embedded_image_in_corpus(tmp_path):
    ds = Dataset.from_dict(
        {"id": ["a", "b", "c"], "text": ["x", "y", "z"],
         "image": image_cells(png(), b"\x89PNG truncated", None)},
        features=Features(
            {"id": Value("string"), "text": Value("string"), "image": ImageFeature()}
        ),
    )
    ds.to_parquet(str(tmp_path / "c.parquet"))
    with pytest.raises(DataError, match=r"c\.parquet, row 1 \(id 'b'\): cannot read image"):
        load_corpus(tmp_path / "c.parquet")
    out = load_corpus(tmp_path / "c.parquet", on_bad="skip").dataset
    assert out["id"] == ["a", "c"] and out[1]["image"] is None  # corpus images are optional


def test_wrong_mode_and_size_fail_then_fix(tmp_path):
    images = [png(RED), png(mode="L"), png(BLUE, size=48), png(mode="RGBA")]
    path = write_examples_parquet(tmp_path / "ex.parquet", images)
    with pytest.raises(DataError, match=r"row 1: image has mode L, expected RGB.*--fix-images"):
        load_examples(path, columns=RENAMED)
    sized = write_examples_parquet(tmp_path / "sized.parquet", [png(), png(size=48)])
    with pytest.raises(DataError, match=r"row 1: image is 48x48, expected 32x32.*--fix-images"):
        load_examples(sized, columns=RENAMED)
    result = load_examples(path, columns=RENAMED, on_bad="skip")
    assert result.report.skipped == {"image_mode": 2, "image_size": 1}
    fixed = load_examples(path, columns=RENAMED, fix_images=True)
    assert fixed.report.images_fixed == 3 and fixed.report.skipped == {}
    for img in fixed.dataset["image"]:
        assert img.mode == "RGB" and img.size == (32, 32)
    assert fixed.dataset[2]["image"].getpixel((16, 16)) == BLUE
    resized = load_examples(path, columns=RENAMED, fix_images=True, image_size=16).dataset
    assert {img.size for img in resized["image"]} == {(16, 16)}
    assert load_examples(path, columns=RENAMED, image_size=None, fix_images=True).dataset[2][
        "image"
    ].size == (48, 48)


def test_gold_id_check(tmp_path):
    corpus = load_corpus(
        write_corpus_parquet(tmp_path / "c.parquet", ["d0", "d2"], ["a", "b"]),
        columns=CORPUS_RENAMED,
    )
    path = write_examples_parquet(
        tmp_path / "ex.parquet", [png()] * 4, docs=["d0", "d1", None, "d2"]
    )
    examples = load_examples(path, columns=RENAMED)
    with pytest.raises(DataError, match=r"ex\.parquet, row 1: gold_id 'd1' is not an id in "
                       r".*c\.parquet \(2 ids\)"):
        check_gold_ids(examples, corpus)
    checked = check_gold_ids(examples, corpus, on_bad="skip")
    assert checked.dataset["gold_id"] == ["d0", None, "d2"]
    assert checked.report.skipped == {"unknown_gold_id": 1} and checked.report.rows_kept == 3
    assert check_gold_ids(examples, corpus.dataset, on_bad="skip").report.rows_kept == 3
    empty = Dataset.from_dict({"id": [], "text": []})
    assert check_gold_ids(examples, empty, on_bad="skip").dataset["gold_id"] == [None]


def test_gold_id_error_names_the_source_row_after_skips(tmp_path):
    corpus = Dataset.from_dict({"id": ["d0"], "text": ["a"]})
    path = write_examples_parquet(
        tmp_path / "ex.parquet", [png()] * 3, prompts=[" ", "ok", "ok"], docs=["d0", "d0", "zz"]
    )
    examples = load_examples(path, columns=RENAMED, on_bad="skip")
    with pytest.raises(DataError, match=r"row 2: gold_id 'zz'"):
        check_gold_ids(examples, corpus)


def test_config_errors():
    with pytest.raises(ValueError, match="two fields to one column"):
        CorpusColumns(id="x", text="x")
    with pytest.raises(ValueError, match="non-empty"):
        ExampleColumns(prompt="")
    with pytest.raises(TypeError):
        CorpusColumns("id")  # keyword-only
    with pytest.raises(ValueError, match="--on-bad"):
        load_corpus("anything", on_bad="ignore")
    with pytest.raises(ValueError, match="--image-size"):
        load_examples("anything", image_size=0)


def test_column_flags_round_trip():
    parser = argparse.ArgumentParser()
    add_column_args(parser, CorpusColumns)
    add_column_args(parser, ExampleColumns, prefix="train-")
    args = parser.parse_args(["--text-column", "body", "--train-gold-id-column", "doc"])
    assert columns_from_args(args, CorpusColumns) == CorpusColumns(text="body")
    assert columns_from_args(args, ExampleColumns, prefix="train-") == ExampleColumns(gold_id="doc")


def test_validation_of_100k_text_rows_is_fast(tmp_path):
    n = 100_000
    ids = [f"doc{i}" for i in range(n)]
    texts = [f"passage number {i} ." for i in range(n)]
    ids[-1], texts[5] = "doc3", " "
    path = write_corpus_parquet(tmp_path / "big.parquet", ids, texts)
    start = time.perf_counter()
    result = load_corpus(path, columns=CORPUS_RENAMED, on_bad="skip")
    elapsed = time.perf_counter() - start
    assert result.report.skipped == {"duplicate_id": 1, "empty_text": 1}
    assert result.report.rows_kept == n - 2
    assert elapsed < 30, f"validating {n} rows took {elapsed:.1f}s"  # loose: catches O(n^2)
    assert np.array_equal(result.source_rows[:6], [0, 1, 2, 3, 4, 6])
