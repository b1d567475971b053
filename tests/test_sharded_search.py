"""Sharded search (issue 11, item 2) on 2 gloo processes: each rank holds half of the vectors
and of the store; a search all-gathers the queries, takes a local top-k and merges. Exact
Flat gives the unsharded index's ids and scores bit for bit; IVF over search shards (one
trained quantizer) gives the unsharded IVF's ids, and its recall against exact is written out.

Run: .venv/bin/pytest tests/test_sharded_search.py -q        (about 15 s on 2 cores)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import retrieval_index as ri
from retrieval_index.sharded import merge_top_k, rank_shards
from retrieval_index.torch_search import score_error_bound
from tests.helpers.index import HashEmbedder, make_rows
from trainers.parallel.local import run_local

NUM_DOCS = 600
QUERIES = (5, 7)  # per rank: the ranks' batches may differ in size


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    rows = make_rows(NUM_DOCS)
    for i in range(0, NUM_DOCS, 50):
        rows[i]["image"] = np.full((4, 6, 3), i % 255, dtype=np.uint8)
    from PIL import Image

    for row in rows:
        if "image" in row:
            row["image"] = Image.fromarray(row["image"])
    ri.build_index(rows, root / "flat", embedder=HashEmbedder(), progress=False,
                   num_recall_queries=50)
    ri.build_index(rows, root / "ivf", embedder=HashEmbedder(), index_factory="IVF16,Flat",
                   search_shards=4, progress=False, num_recall_queries=50)
    return root


def _queries(rank: int) -> np.ndarray:
    rng = np.random.default_rng(100 + rank)
    q = rng.standard_normal((QUERIES[rank], 32)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def _worker(rank: int, world_size: int, root: str) -> None:
    root = Path(root)
    collective = ri.TorchCollective()
    report = {}
    for name in ("flat", "ivf"):
        whole = ri.load(root / name)
        sharded = ri.ShardedIndex(root / name, collective)
        assert sharded.rows.shape == (NUM_DOCS // world_size, 32)  # half of the vectors
        assert sharded.documents_table.num_rows == NUM_DOCS // world_size  # half of the store
        queries = _queries(rank)
        scores, keys = sharded.search(torch.from_numpy(queries), 10)
        want_scores, want_keys = whole.search(queries, 10)
        np.testing.assert_array_equal(keys, want_keys)
        if name == "flat":
            np.testing.assert_array_equal(scores, want_scores)  # bit for bit
        else:  # another number of queries per FAISS call: rounding may differ in the last bits
            np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-6)
        if name == "flat":  # the torch path (as on GPUs, here on CPU over gloo)
            on_device = ri.ShardedIndex(root / name, collective, search="torch")
            torch_scores, torch_keys = on_device.search(torch.from_numpy(queries), 10)
            np.testing.assert_array_equal(torch_keys, want_keys)
            np.testing.assert_allclose(torch_scores, want_scores, rtol=0, atol=2 * score_error_bound(
                torch.float32, 32))
        exact = ri.build.exact_search(np.asarray(whole._vectors), queries, 10)[1]
        report[name] = {"recall_at_10": float(np.mean([len(np.intersect1d(a, b)) / 10
                                                       for a, b in zip(keys, exact)]))}
        # lookups: every rank asks for keys the other rank holds
        wanted = np.concatenate([keys[:, :3].reshape(-1), [-1, NUM_DOCS - 1 - rank]])
        np.testing.assert_array_equal(sharded.vectors(wanted), whole.vectors(wanted))
        docs, want = sharded.documents(wanted), whole.documents(wanted)
        for got, ref in zip(docs, want):
            assert (got is None) == (ref is None)
            if got is not None:
                assert (got["id"], got["text"]) == (ref["id"], ref["text"])
                assert (got["image"] is None) == (ref["image"] is None)
                if got["image"] is not None:
                    assert np.array_equal(np.asarray(got["image"]), np.asarray(ref["image"]))
    (root / f"report{rank}.json").write_text(json.dumps(report))


def test_sharded_search_equals_the_unsharded_index_on_two_ranks(indexes):
    run_local(_worker, 2, str(indexes))
    for rank in range(2):
        report = json.loads((indexes / f"report{rank}.json").read_text())
        assert report["flat"]["recall_at_10"] == 1.0
        print(f"rank {rank}: IVF16,Flat (4 search shards) recall@10 vs exact "
              f"{report['ivf']['recall_at_10']:.3f}")


def test_a_world_size_the_layout_cannot_split_is_refused_by_name(indexes):
    ivf = ri.load(indexes / "ivf").manifest
    assert len(rank_shards(ivf, 2, index_dir="x")) == 4
    with pytest.raises(ri.ShardLayoutError, match="4 search shards .* world size 3"):
        rank_shards(ivf, 3, index_dir="x")
    flat = ri.load(indexes / "flat").manifest
    assert len(rank_shards(flat, 3, index_dir="x")) == 3  # Flat splits over any world size
    with pytest.raises(ri.ShardLayoutError, match="world size 601 is larger than the 600"):
        rank_shards(flat, 601, index_dir="x")
    with pytest.raises(ValueError, match="search_shards .* 700 is larger than the 600"):
        ri.build_index(make_rows(NUM_DOCS), indexes / "too_many", embedder=HashEmbedder(),
                       index_factory="IVF16,Flat", search_shards=700, progress=False)


def test_merge_orders_by_score_then_key_and_puts_missing_last():
    scores = np.array([[0.5, -np.inf, 0.9, 0.5]], dtype=np.float32)
    keys = np.array([[7, -1, 3, 2]])
    merged_scores, merged_keys = merge_top_k(scores, keys, 4)
    assert merged_keys.tolist() == [[3, 2, 7, -1]]
    assert merged_scores[0, :3].tolist() == [np.float32(0.9), 0.5, 0.5]


@pytest.fixture(scope="module")
def text_index(tmp_path_factory, tiny_dirs):
    root = tmp_path_factory.mktemp("sharded_text")
    embedder = ri.TextDocumentEmbedder.from_folder(tiny_dirs[0])
    ri.build_index(make_rows(40), root / "index", embedder=embedder, progress=False,
                   num_recall_queries=20)
    return root, tiny_dirs[0]


def _model_worker(rank: int, world_size: int, root: str, encoder: str) -> None:
    from dataclasses import replace

    from rag_mm.config import model_config
    from rag_mm.model import build_model, synthetic_batch
    from trainers.module import retrieval_collective

    config = model_config("tiny")
    config = replace(config, retriever=replace(config.retriever, text_encoder=encoder))
    batch = synthetic_batch(config, 3 + rank, seed=rank, num_docs=40)
    outputs = []
    for backend in (ri.load(Path(root) / "index"),
                    ri.ShardedIndex(Path(root) / "index", retrieval_collective(None))):
        torch.manual_seed(0)
        model = build_model(config, backend=backend)
        model.set_shared_negatives(np.arange(0, 40, 3))
        retrieved = model.retrieval.retrieve(batch)  # training mode: gold in the top-k
        carry = model.retrieval.assemble(batch, retrieved)
        outputs.append((retrieved, carry))
    (whole, whole_carry), (sharded, sharded_carry) = outputs
    np.testing.assert_array_equal(sharded.keys, whole.keys)
    np.testing.assert_array_equal(sharded.candidates, whole.candidates)
    assert torch.equal(sharded.doc_logits, whole.doc_logits)
    assert torch.equal(sharded.contrastive, whole.contrastive)
    for got, want in zip(sharded_carry, whole_carry):
        assert torch.equal(got, want)
    (Path(root) / f"checked_{rank}").touch()  # every check above ran on this rank


def test_the_model_retrieves_the_same_through_a_sharded_index(text_index):
    """Keys, document scores, the contrastive loss (gold and shared negatives looked up on
    the other rank) and the assembled sequences equal the unsharded index's, on 2 ranks with
    batches of different sizes."""
    root, encoder = text_index
    run_local(_model_worker, 2, str(root), str(encoder))
    assert all((root / f"checked_{rank}").exists() for rank in range(2))
