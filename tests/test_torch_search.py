"""Exact torch search (issue 11, item 3): the same code that runs on CUDA, on CPU, against FAISS.

Scores are compared with float64 exact scores within `score_error_bound(dtype, dim)` (derived
from the dtype's unit roundoff, see retrieval_index/torch_search.py); ids are compared with
FAISS's wherever the exact scores leave room for neither side to swap two documents (gaps
larger than both error bounds), and that must be nearly every row.

Run: .venv/bin/pytest tests/test_torch_search.py -q        (about 10 s on 2 cores)
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

import retrieval_index as ri
from retrieval_index.torch_search import TorchExactSearch, score_error_bound
from tests.helpers.index import HashEmbedder, make_rows

DIM, COUNT, QUERIES, K = 64, 5000, 200, 10


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, DIM))
    docs = centres[rng.integers(0, 50, COUNT)] + 0.5 * rng.standard_normal((COUNT, DIM))
    docs = (docs / np.linalg.norm(docs, axis=1, keepdims=True)).astype(np.float32)
    queries = docs[rng.integers(0, COUNT, QUERIES)] + 0.05 * rng.standard_normal((QUERIES, DIM))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    exact = queries.astype(np.float64) @ docs.astype(np.float64).T
    return docs, queries, exact


def _separated(exact: np.ndarray, margin: float) -> np.ndarray:
    """(n, k) bool: ranks whose exact score is more than `margin` from the scores ranked just
    above and below it, so that no search within the margin can order them otherwise."""
    top = -np.sort(-exact, axis=1)[:, : K + 1]
    gaps = -np.diff(top, axis=1)  # gaps[:, j] = top[:, j] - top[:, j + 1]
    above = np.concatenate([np.full((len(top), 1), np.inf), gaps[:, : K - 1]], axis=1)
    return (above > margin) & (gaps[:, :K] > margin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_search_gives_faiss_ids_and_scores_within_the_derived_bound(data, dtype):
    docs, queries, exact = data
    flat = faiss.IndexFlatIP(DIM)
    flat.add(docs)
    faiss_scores, faiss_keys = flat.search(queries, K)
    search = TorchExactSearch(docs, device="cpu", dtype=dtype, chunk_rows=1024)
    scores, keys = search.search(torch.from_numpy(queries), K)
    bound = score_error_bound(dtype, DIM)
    np.testing.assert_array_less(np.abs(scores - np.take_along_axis(exact, keys, 1)), bound)
    faiss_bound = score_error_bound(torch.float32, DIM)
    assert np.abs(faiss_scores - np.take_along_axis(exact, faiss_keys, 1)).max() < faiss_bound
    ranks = _separated(exact, 2 * (bound + faiss_bound))
    # the check is not vacuous: at least this share of the ranks is compared
    assert ranks.mean() > {torch.float32: 0.95, torch.float16: 0.2, torch.bfloat16: 0.05}[dtype]
    np.testing.assert_array_equal(keys[ranks], faiss_keys[ranks])


def test_chunks_and_padding(data):
    docs, queries, _ = data
    one = TorchExactSearch(docs, device="cpu")
    many = TorchExactSearch(docs, device="cpu", chunk_rows=7)
    np.testing.assert_array_equal(one.search(queries, K)[1], many.search(queries, K)[1])
    scores, keys = TorchExactSearch(docs[:3], device="cpu").search(queries[:2], 5)
    assert (keys[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()


def test_index_search_torch_equals_faiss_and_keeps_the_query_tensor(tmp_path):
    ri.build_index(make_rows(300), tmp_path / "flat", embedder=HashEmbedder(), progress=False,
                   num_recall_queries=20)
    by_faiss = ri.load(tmp_path / "flat", search="faiss")
    by_torch = ri.load(tmp_path / "flat", search="torch")
    assert by_torch.faiss_index is None and by_faiss.torch_search is None
    lookups = ri.load(tmp_path / "flat", search="none")  # e.g. the data module's gold-id keys
    assert lookups.faiss_index is None and lookups.torch_search is None
    assert lookups.key_of(["doc-7"]).tolist() == [7]
    with pytest.raises(ValueError, match="search='none'"):
        lookups.search(np.zeros((1, 32), np.float32), 1)
    q = torch.from_numpy(by_faiss.vectors(np.arange(0, 300, 7)))
    np.testing.assert_array_equal(by_torch.search(q, 5)[1], by_faiss.search(q, 5)[1])

    from dataclasses import replace

    from rag_mm.config import model_config
    from rag_mm.model import build_model, synthetic_batch

    config = model_config("tiny")
    model = build_model(config)
    backend = _Dim32(by_torch, model.retrieval.query_encoder.dim)
    model.attach(backend, check_encoder=False)
    model.retrieval.retrieve(synthetic_batch(replace(config), 2, num_docs=300))
    assert isinstance(backend.queries, torch.Tensor)  # the model hands over q, not a host copy


class _Dim32:
    """The tiny model's 384-d queries cut to the 32-d test index (a stand-in backend)."""

    def __init__(self, index, dim):
        self.index, self.dim = index, dim

    def search(self, queries, k):
        self.queries = queries
        return self.index.search(queries[:, :32].contiguous(), k)

    def vectors(self, keys):
        return np.pad(self.index.vectors(keys), [(0, 0)] * np.ndim(keys) + [(0, self.dim - 32)])

    def documents(self, keys):
        return self.index.documents(keys)

    def __len__(self):
        return len(self.index)


def test_torch_search_of_a_trained_index_is_refused(tmp_path):
    ri.build_index(make_rows(300), tmp_path / "ivf", embedder=HashEmbedder(), progress=False,
                   index_factory="IVF4,Flat", num_recall_queries=20)
    with pytest.raises(ValueError, match="search='torch' is exact search .* 'IVF4,Flat'"):
        ri.load(tmp_path / "ivf", search="torch")
    with pytest.raises(ValueError, match="search dtype 'int8'"):
        TorchExactSearch(np.zeros((2, 4), np.float32), dtype="int8")
