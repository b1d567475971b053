"""Document store round trips, corpus checks, and the text-only embedder's image refusal.

Run: .venv/bin/pytest tests/test_index_store.py -q
"""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from PIL import Image

import retrieval_index as ri
from retrieval_index.store import DocumentStore, write_store
from tests.helpers.index import HashEmbedder, make_rows


def image(i: int, size=(6, 4)) -> Image.Image:
    pixels = (np.arange(size[0] * size[1] * 3).reshape(size[1], size[0], 3) * (i + 1)) % 256
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def image_rows(n: int) -> list[dict]:
    rows = make_rows(n)
    for i, row in enumerate(rows):
        row["image"] = image(i) if i % 2 == 0 else None
    return rows


def test_store_round_trip_with_images(tmp_path):
    rows = image_rows(9)
    info = write_store(rows, tmp_path)
    store = DocumentStore(tmp_path)
    assert info["count"] == len(store) == 9 and info["fingerprint"].startswith("sha256:")
    got = store.get([8, 1, 0])
    for doc, i in zip(got, [8, 1, 0]):
        assert doc["id"] == rows[i]["id"] and doc["text"] == rows[i]["text"] and doc["key"] == i
        if rows[i]["image"] is None:
            assert doc["image"] is None
        else:
            assert doc["image"].mode == "RGB"
            np.testing.assert_array_equal(np.asarray(doc["image"]), np.asarray(rows[i]["image"]))
    assert store.first_image_row() == 0
    assert store.images(1, 2) == [None]


def test_dataset_and_list_of_dicts_give_the_same_store(tmp_path):
    rows = image_rows(7)
    dataset = datasets.Dataset.from_list(
        rows,
        features=datasets.Features(
            {
                "id": datasets.Value("string"),
                "text": datasets.Value("string"),
                "image": datasets.Image(),
            }
        ),
    )
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert write_store(rows, tmp_path / "a") == write_store(dataset, tmp_path / "b")


def test_key_of_names_unknown_ids(tmp_path):
    write_store(make_rows(5), tmp_path)
    store = DocumentStore(tmp_path)
    np.testing.assert_array_equal(store.key_of(["doc-4", "doc-0"]), [4, 0])
    with pytest.raises(KeyError) as err:
        store.key_of(["doc-1", "nope", "missing-7"])
    assert isinstance(err.value, ri.UnknownIdError)
    assert (
        "2 id(s)" in str(err.value)
        and "'nope'" in str(err.value)
        and "'missing-7'" in str(err.value)
    )
    with pytest.raises(IndexError, match="out of range"):
        store.get([5])


@pytest.mark.parametrize(
    "rows, match",
    [
        (
            [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}],
            r"row 1: duplicate id 'a' \(first seen at row 0\)",
        ),
        (
            [{"id": "a", "text": "x"}, {"id": "", "text": "y"}],
            "row 1: id must be a non-empty string",
        ),
        ([{"id": "a", "text": None}], r"row 0 \(id 'a'\): text must be a string"),
        ([{"id": "a", "body": "x"}], r"lacks column\(s\) \['text'\].*--text-column"),
        ([], "empty"),
    ],
)
def test_bad_corpora_name_the_row_or_column(rows, match, tmp_path):
    with pytest.raises(ri.CorpusError, match=match):
        write_store(rows, tmp_path)
    assert not (tmp_path / "docs.arrow").exists()


def test_text_embedder_refuses_image_documents_naming_the_row(tiny_dirs, tmp_path):
    rows = make_rows(30)
    rows[17]["image"] = image(17)
    embedder = ri.TextDocumentEmbedder.from_folder(tiny_dirs[0])
    with pytest.raises(
        ri.UnsupportedImageError, match=r"corpus row 17 \(id 'doc-17'\).*embedder="
    ) as err:
        ri.build_index(rows, tmp_path, embedder=embedder, shard_size=10, progress=False)
    assert err.value.row == 17
    assert not list((tmp_path / "shards").glob("*.npy"))  # refused before embedding anything
    index = ri.build_index(rows, tmp_path / "mm", embedder=HashEmbedder(), progress=False)
    assert index.documents([17])[0]["image"].size == (6, 4)
