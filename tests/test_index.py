"""Index build / load / search / resume, on small corpora (tiny random BERT, or a hash embedder).

Run: .venv/bin/pytest tests/test_index.py -q
"""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

import retrieval_index as ri
from retrieval_index.embed import EMBEDDINGS_FILE, SHARD_DIR, shard_path
from tests.helpers.index import HashEmbedder, make_rows


@pytest.fixture(scope="module")
def embedder(tiny_dirs):
    return ri.TextDocumentEmbedder.from_folder(tiny_dirs[0], batch_size=32)


@pytest.fixture(scope="module")
def flat_index(embedder, tmp_path_factory):
    rows = make_rows(300)
    out = tmp_path_factory.mktemp("flat") / "index"
    return ri.build_index(
        rows, out, embedder=embedder, shard_size=64, progress=False, num_recall_queries=100
    )


def test_flat_finds_every_stored_vector_under_its_own_key(flat_index):
    n = len(flat_index)
    vectors = flat_index.vectors(np.arange(n))
    scores, keys = flat_index.search(vectors, k=1)
    np.testing.assert_array_equal(keys[:, 0], np.arange(n))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    rows = make_rows(n)
    assert flat_index.ids_of(keys[:, 0]) == [r["id"] for r in rows]
    np.testing.assert_array_equal(
        flat_index.key_of([r["id"] for r in rows[::7]]), np.arange(n)[::7]
    )
    docs = flat_index.documents([5, -1, 0])
    assert (
        docs[0]["text"] == rows[5]["text"] and docs[0]["id"] == "doc-5" and docs[0]["image"] is None
    )
    assert docs[1] is None and docs[2]["key"] == 0


def test_manifest_records_the_build(flat_index, tiny_dirs):
    manifest = json.loads((flat_index.path / "manifest.json").read_text())
    assert manifest == flat_index.manifest
    assert manifest["status"] == "complete" and manifest["count"] == 300 and manifest["dim"] == 32
    assert manifest["metric"] == "inner_product" and manifest["dtype"] == "float32"
    assert manifest["encoder"]["path"] == str(tiny_dirs[0].resolve())
    assert manifest["encoder"]["content_hash"].startswith("sha256:")
    assert manifest["build"]["shard_size"] == 64 and manifest["build"]["max_length"] == 256
    assert manifest["versions"]["faiss"] == faiss.__version__
    assert manifest["report"]["recall_at_10"] == 1.0 and manifest["report"]["qps"] > 0
    assert manifest["report"]["embedding"] == {"shards": 5, "reused": 0, "embedded": 5}
    assert not (flat_index.path / SHARD_DIR).exists()  # joined into embeddings.npy


def test_texts_and_vectors_give_the_same_results(flat_index, embedder):
    texts = [r["text"] for r in make_rows(300)[:20]] + ["quiet harbor", "copper engine signal"]
    by_text = flat_index.search(texts, k=5)
    by_vector = flat_index.search(embedder.embed(texts, [None] * len(texts)), k=5)
    np.testing.assert_array_equal(by_text[1], by_vector[1])
    np.testing.assert_allclose(by_text[0], by_vector[0], rtol=1e-6)
    np.testing.assert_array_equal(by_text[1][:20, 0], np.arange(20))  # a document's own text


def test_vectors_shape_and_missing_keys(flat_index):
    keys = np.array([[0, 3, -1], [299, 1, 2]])
    vectors = flat_index.vectors(keys)
    assert vectors.shape == (2, 3, 32) and vectors.dtype == np.float32
    assert not vectors[0, 2].any()
    np.testing.assert_array_equal(vectors[1, 0], flat_index.vectors([299])[0])
    scores, found = flat_index.search(vectors[0, :1], k=400)  # more than the corpus
    assert (found[0, 300:] == -1).all() and np.isneginf(scores[0, 300:]).all()
    with pytest.raises(IndexError, match="out of range"):
        flat_index.vectors([300])
    with pytest.raises(ValueError, match=r"shape \(n, 32\)"):
        flat_index.search(np.zeros((2, 16), dtype=np.float32))


def test_default_embedder_comes_from_the_manifest(flat_index):
    loaded = ri.load(flat_index.path)
    _scores, keys = loaded.search(["doc 3 " + make_rows(300)[3]["text"][7:]], k=1)
    assert keys[0, 0] == 3
    assert (
        loaded.embedder.identity()["content_hash"] == flat_index.manifest["encoder"]["content_hash"]
    )


def test_other_encoder_is_refused_naming_both(flat_index, tiny_dirs):
    other = ri.TextDocumentEmbedder.from_folder(tiny_dirs[1])
    with pytest.raises(ri.EncoderMismatchError) as err:
        ri.load(flat_index.path, embedder=other)
    message = str(err.value)
    built, used = flat_index.manifest["encoder"]["content_hash"], other.identity()["content_hash"]
    assert (
        built[:19] in message
        and used[:19] in message
        and "tiny_a" in message
        and "tiny_b" in message
    )
    assert "content_hash" in message
    ri.load(flat_index.path, embedder=other, check_encoder=False)  # the override works


def test_resumed_build_equals_uninterrupted(embedder, tmp_path):
    rows = make_rows(250)
    kwargs = {"embedder": embedder, "shard_size": 40, "progress": False, "num_recall_queries": 50}
    reference = ri.build_index(rows, tmp_path / "ref", index_factory="IVF4,Flat", **kwargs)

    def stop_after_three(shard, num_shards):
        if shard == 2:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        ri.build_index(
            rows, tmp_path / "run", index_factory="IVF4,Flat", on_shard=stop_after_three, **kwargs
        )
    with pytest.raises(ValueError, match="incomplete"):
        ri.load(tmp_path / "run")
    assert (
        shard_path(tmp_path / "run", 2).is_file() and not shard_path(tmp_path / "run", 3).exists()
    )
    shard_path(tmp_path / "run", 1).write_bytes(b"torn write")  # a damaged shard is recomputed
    resumed = ri.build_index(rows, tmp_path / "run", index_factory="IVF4,Flat", **kwargs)

    assert resumed.manifest["report"]["embedding"] == {"shards": 7, "reused": 2, "embedded": 5}
    all_keys = np.arange(len(rows))
    np.testing.assert_array_equal(resumed.vectors(all_keys), reference.vectors(all_keys))
    queries = reference.vectors(all_keys[:50])
    np.testing.assert_array_equal(resumed.search(queries, 10)[1], reference.search(queries, 10)[1])
    assert resumed.manifest["corpus"] == reference.manifest["corpus"]


def test_resume_with_other_settings_is_refused(embedder, tmp_path):
    rows = make_rows(120)

    def crash(shard, num_shards):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ri.build_index(
            rows, tmp_path, embedder=embedder, shard_size=50, on_shard=crash, progress=False
        )
    with pytest.raises(ri.ResumeMismatchError, match=r"build.shard_size 50 vs now 60.*--overwrite"):
        ri.build_index(rows, tmp_path, embedder=embedder, shard_size=60, progress=False)
    for _ in range(2):  # the refusal must not forget the partial build's corpus
        with pytest.raises(ri.ResumeMismatchError, match="corpus"):
            ri.build_index(rows[:-1], tmp_path, embedder=embedder, shard_size=50, progress=False)
    (tmp_path / "notes.txt").write_text("a user's file: --overwrite keeps it")
    index = ri.build_index(
        rows, tmp_path, embedder=embedder, shard_size=60, overwrite=True, progress=False
    )
    assert len(index) == 120 and index.manifest["build"]["shard_size"] == 60
    assert (tmp_path / "notes.txt").is_file()
    with pytest.raises(ri.IndexExistsError, match="--overwrite"):
        ri.build_index(rows, tmp_path, embedder=embedder, progress=False)


@pytest.mark.parametrize(
    "factory, params, min_recall",
    [
        ("IVF16,Flat", {"nprobe": 8}, 0.8),
        ("HNSW32", {"efSearch": 128}, 0.95),
        ("IVF16,PQ8x4np,RFlat", {"nprobe": 8, "k_factor_rf": 4}, 0.5),  # np: no polysemous training
        ("IVF16,PQ8x4,Refine(Flat)", {"nprobe": 8, "k_factor_rf": 4}, 0.5),
        ("IDMap,Flat", {}, 1.0),
    ],
)
def test_approximate_indexes_build_search_and_report_recall(factory, params, min_recall, tmp_path):
    rows = make_rows(800, seed=1)
    index = ri.build_index(
        rows,
        tmp_path,
        embedder=HashEmbedder(),
        index_factory=factory,
        shard_size=300,
        progress=False,
        num_recall_queries=200,
    )
    report = index.manifest["report"]
    assert index.manifest["build"]["search_params"] == params
    assert min_recall <= report["recall_at_10"] <= 1.0 and report["num_queries"] == 200
    assert index.manifest["build"]["train_size"] == (
        0 if factory in ("HNSW32", "IDMap,Flat") else 800
    )
    sample = np.arange(0, 800, 37)
    _, keys = index.search(index.vectors(sample), k=10)
    assert (keys[:, 0] == sample).mean() >= 0.9  # near-exact queries find their own key first
    reloaded = ri.load(tmp_path, embedder=HashEmbedder())
    np.testing.assert_array_equal(reloaded.search(index.vectors(sample), 10)[1], keys)


def test_search_param_overrides(tmp_path):
    rows = make_rows(200, seed=2)
    index = ri.build_index(
        rows, tmp_path, embedder=HashEmbedder(), index_factory="IVF8,Flat", nprobe=8, progress=False
    )
    assert index.manifest["build"]["search_params"] == {"nprobe": 8}
    assert index.manifest["report"]["recall_at_10"] == 1.0  # every list probed: exact
    with pytest.raises(ValueError, match="efSearch=64 does not apply"):
        ri.build_index(
            rows, tmp_path / "x", embedder=HashEmbedder(), index_factory="Flat", ef_search=64
        )


def test_invalid_factories_fail_before_any_work(tmp_path):
    rows = make_rows(100)
    with pytest.raises(ri.FactoryError, match=r"--index-factory.*'IVFX,Flat'.*Examples: 'Flat'"):
        ri.build_index(rows, tmp_path / "a", embedder=HashEmbedder(), index_factory="IVFX,Flat")
    with pytest.raises(
        ri.FactoryError, match=r"needs at least 1024 training vectors.*100 documents"
    ):
        ri.build_index(rows, tmp_path / "b", embedder=HashEmbedder(), index_factory="IVF1024,Flat")
    with pytest.raises(ri.FactoryError, match="multiple of the number of subquantizers"):
        ri.build_index(rows, tmp_path / "c", embedder=HashEmbedder(), index_factory="PQ5")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_image_corpus_with_an_image_embedder(tmp_path):
    from PIL import Image

    rows = make_rows(60)
    for i in range(0, 60, 3):
        rows[i]["image"] = Image.new("RGB", (8, 8), (i * 4, 0, 255 - i * 4))
    index = ri.build_index(rows, tmp_path, embedder=HashEmbedder(), progress=False)
    doc = index.documents([3])[0]
    assert doc["image"].size == (8, 8) and doc["image"].getpixel((0, 0)) == (12, 0, 243)
    assert (tmp_path / EMBEDDINGS_FILE).is_file()


def test_cli_builds_from_a_parquet_corpus(tiny_dirs, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from scripts.build_index import main

    rows = make_rows(90)
    table = pa.table({"doc_id": [r["id"] for r in rows], "body": [r["text"] for r in rows]})
    pq.write_table(table, tmp_path / "corpus.parquet")
    args = [
        "--corpus",
        str(tmp_path / "corpus.parquet"),
        "--encoder",
        str(tiny_dirs[0]),
        "--id-column",
        "doc_id",
        "--text-column",
        "body",
        "--shard-size",
        "40",
    ]
    main([*args, "--out", str(tmp_path / "idx"), "--index-factory", "IVF4,Flat", "--nprobe", "2"])
    index = ri.load(tmp_path / "idx")
    assert len(index) == 90 and index.manifest["build"]["search_params"] == {"nprobe": 2}
    assert "recall@10" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--index-factory"):
        main([*args, "--out", str(tmp_path / "bad"), "--index-factory", "IVF4,Nope"])
