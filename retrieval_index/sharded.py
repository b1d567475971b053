"""Sharded search over data-parallel ranks (Atlas' scheme): each rank holds 1/N of the index.

    queries --all_gather--> local top-k over this rank's rows --all_gather--> merge (top-k of
    the N * k candidates, by score then key) --> this rank's queries' keys

Rank r of N holds rows [r * count // N, (r + 1) * count // N): their stored vectors (in memory),
their slice of the document store, and the search structure over them. The layout on disk does
not depend on N: a `Flat` index searches the stored vectors (`embeddings.npy`) of its rows; any
other factory searches the `search_shards/` a build wrote (`build_index(..., search_shards=S)`,
S files over contiguous row ranges, all from one trained index, so their inverted lists use the
same centroids), of which each rank loads S / N; S must be a multiple of N.

A `Flat` index's local search is `TorchExactSearch` when CUDA is present (`search="auto"`;
`"torch"` forces it, `"faiss"` never): the queries are gathered and searched on the
collective's device and only the candidates come to the host.

Lookups are collective too: `vectors(keys)` all-gathers the keys every rank asks for, each
rank fills the rows it holds and a sum-all-reduce gives each rank its rows (exact: other
ranks add zeros); the documents of those keys travel in the same step and are cached, so
`documents(keys)` of keys whose vectors were looked up (the model scores every document it
reads) is local. Every rank must call `search` and `vectors` the same number of times, in the
same order (data-parallel replicas do).
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import torch

from retrieval_index.build import apply_search_params, exact_search
from retrieval_index.collective import Collective
from retrieval_index.embed import EMBEDDINGS_FILE, load_embeddings
from retrieval_index.index import _check_manifest, _use_torch
from retrieval_index.manifest import check_query_encoder, read_manifest
from retrieval_index.store import STORE_FILE, DocumentStore, _decode
from retrieval_index.torch_search import TorchExactSearch

SEARCH_SHARD_DIR = "search_shards"
DOC_CACHE_LIMIT = 200_000


class ShardLayoutError(ValueError):
    """A world size (or shard count) the index's layout cannot be split over."""


def search_shard_path(index_dir: Path, shard: int) -> Path:
    return Path(index_dir) / SEARCH_SHARD_DIR / f"{shard:05d}.faiss"


def shard_bounds(count: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous row ranges [start, stop) of `num_shards` near-equal shards."""
    return [(s * count // num_shards, (s + 1) * count // num_shards) for s in range(num_shards)]


def rank_shards(manifest: dict, world_size: int, *, index_dir) -> range:
    """The search shards each rank holds S / N of; `ShardLayoutError` names the sizes."""
    count, factory = manifest["count"], manifest["index_factory"]
    if world_size > count:
        raise ShardLayoutError(
            f"world size {world_size} is larger than the {count} documents of the index at "
            f"{index_dir}: every rank must hold at least one document"
        )
    if factory == "Flat":
        return range(world_size)
    shards = manifest["build"].get("search_shards") or 0
    if shards < world_size or shards % world_size:
        have = f"{shards} search shards" if shards else "no search shards"
        raise ShardLayoutError(
            f"the {factory!r} index at {index_dir} has {have} (build_index search_shards=, "
            f"build_index.py --search-shards), which do not split evenly over world size "
            f"{world_size}; use a world size that divides {shards}, or rebuild with "
            f"--search-shards a multiple of {world_size} (a Flat index splits over any world size)"
        )
    return range(shards)


class ShardedIndex:
    """The `RetrievalBackend` of one rank: search and lookups over all ranks' shards."""

    collective_calls = True  # search / vectors are collectives (see the module docstring)

    def __init__(self, index_dir: str | Path, collective: Collective, *, search: str = "auto",
                 search_dtype=None):
        self.path = Path(index_dir).expanduser().resolve()
        self.manifest = read_manifest(self.path)
        _check_manifest(self.path, self.manifest)
        if self.manifest["status"] != "complete":
            raise ValueError(f"the index at {self.path} is incomplete: finish its build first")
        self.collective = collective
        rank, world = collective.rank, collective.world_size
        count = self.manifest["count"]
        shards = rank_shards(self.manifest, world, index_dir=self.path)
        per_rank = len(shards) // world
        mine = shards[rank * per_rank : (rank + 1) * per_rank]
        bounds = shard_bounds(count, len(shards))
        self.start, self.stop = bounds[mine[0]][0], bounds[mine[-1]][1]
        self.rows = np.array(load_embeddings(self.path)[self.start : self.stop])  # 1/N resident
        if self.rows.shape[1] != self.dim:
            raise ValueError(f"{self.path / EMBEDDINGS_FILE}: dim {self.rows.shape[1]} != {self.dim}")
        store = DocumentStore(self.path / STORE_FILE)
        self.documents_table = store.table.slice(self.start, self.stop - self.start)
        self._count = count
        self._faiss_shards = [] if self.manifest["index_factory"] == "Flat" else [
            (bounds[s][0] - self.start, self._read_shard(s)) for s in mine
        ]
        self._docs: dict[int, dict] = {}
        self.torch_search = None
        if _use_torch(search, self.manifest["index_factory"], self.path):
            device = getattr(collective, "device", None)
            device = device if device is not None and device.type == "cuda" else None
            self.torch_search = TorchExactSearch(self.rows, device=device, dtype=search_dtype)

    def _read_shard(self, shard: int) -> faiss.Index:
        index = faiss.read_index(str(search_shard_path(self.path, shard)))
        apply_search_params(index, self.manifest["build"]["search_params"])
        return index

    def __len__(self) -> int:
        return self._count

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def check_encoder(self, identity: dict, *, what: str = "the query encoder") -> None:
        check_query_encoder(self.manifest, identity, index_dir=self.path, what=what)

    def set_search_params(self, **params) -> None:
        for _, index in self._faiss_shards:
            apply_search_params(index, params)

    # -- search --------------------------------------------------------------------------------
    def local_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over this rank's rows: (scores, global keys), -inf / -1 where fewer."""
        if not self._faiss_shards:
            scores, keys = exact_search(self.rows, queries, min(k, len(self.rows)))
        else:
            heap = faiss.ResultHeap(len(queries), k, keep_max=True)
            for offset, index in self._faiss_shards:
                scores, keys = index.search(queries, k)
                keys = np.where(keys >= 0, keys + offset, -1)
                heap.add_result(np.ascontiguousarray(scores), np.ascontiguousarray(keys))
            heap.finalize()
            scores, keys = heap.D, heap.I
        return _pad(scores, np.where(keys >= 0, keys + self.start, -1), k)

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Collective: (scores float32 (n, k), keys int64 (n, k)) over all ranks' rows."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.torch_search is not None:
            return self._search_on_device(queries, k)
        if isinstance(queries, torch.Tensor):
            queries = queries.detach().float().cpu().numpy()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"query vectors must have shape (n, {self.dim}), got {queries.shape}")
        parts = self.collective.all_gather_array(queries)
        scores, keys = self.local_search(np.concatenate(parts), k)
        all_scores = self.collective.all_gather_array(scores)
        all_keys = self.collective.all_gather_array(keys)
        scores, keys = merge_top_k(np.concatenate(all_scores, 1), np.concatenate(all_keys, 1), k)
        first = sum(len(p) for p in parts[: self.collective.rank])
        return scores[first : first + len(queries)], keys[first : first + len(queries)]

    def _search_on_device(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The torch path: queries gathered and searched on the device (NCCL: the GPU); only
        the (n, N * k) candidates come to the host to be merged."""
        if not isinstance(queries, torch.Tensor):
            queries = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"query vectors must have shape (n, {self.dim}), got {tuple(queries.shape)}")
        parts = self.collective.all_gather_tensor(queries.detach().float())
        scores, keys = self.torch_search.search_tensors(torch.cat(parts), k)
        keys = torch.where(keys >= 0, keys + self.start, -1)
        all_scores = torch.cat(self.collective.all_gather_tensor(scores), 1).cpu().numpy()
        all_keys = torch.cat(self.collective.all_gather_tensor(keys), 1).cpu().numpy()
        scores, keys = merge_top_k(all_scores, all_keys, k)
        first = sum(len(p) for p in parts[: self.collective.rank])
        return scores[first : first + len(queries)], keys[first : first + len(queries)]

    # -- lookups -------------------------------------------------------------------------------
    def vectors(self, keys) -> np.ndarray:
        """Collective: stored float32 vectors, keys.shape + (dim,); key -1 gives zeros. The
        documents of the keys are fetched in the same step (see `documents`)."""
        keys = np.asarray(keys, dtype=np.int64)
        flat = keys.reshape(-1)
        if flat.size and (flat.max() >= len(self) or flat.min() < -1):
            raise IndexError(f"keys out of range for an index of {len(self)} documents (-1 = none)")
        requests = self.collective.all_gather_array(flat)
        every = np.concatenate(requests)
        owned = (every >= self.start) & (every < self.stop)
        filled = np.zeros((len(every), self.dim), dtype=np.float32)
        filled[owned] = self.rows[every[owned] - self.start]
        total = self.collective.all_reduce_sum(torch.from_numpy(filled)).numpy()
        docs = self._owned_documents(np.unique(every[owned]))
        self._remember(self.collective.all_gather_object(docs), set(flat.tolist()))
        first = sum(len(r) for r in requests[: self.collective.rank])
        return total[first : first + flat.size].reshape(keys.shape + (self.dim,))

    def _owned_documents(self, keys: np.ndarray) -> dict[int, tuple]:
        if not len(keys):
            return {}
        rows = self.documents_table.take(pa_int64(keys - self.start)).to_pylist()
        return {int(k): (r["id"], r["text"], r["image"]) for k, r in zip(keys, rows)}

    def _remember(self, gathered: list[dict], wanted: set[int]) -> None:
        if len(self._docs) > DOC_CACHE_LIMIT:
            self._docs.clear()
        for part in gathered:
            for key, (doc_id, text, image) in part.items():
                if key in wanted:
                    self._docs[key] = {"key": key, "id": doc_id, "text": text, "png": image}

    def documents(self, keys) -> list[dict | None]:
        """`{"key", "id", "text", "image"}` of keys whose vectors this rank looked up; None for -1."""
        out = []
        for key in np.asarray(keys, dtype=np.int64).reshape(-1).tolist():
            if key < 0:
                out.append(None)
                continue
            doc = self._docs.get(key)
            if doc is None:
                raise KeyError(
                    f"document {key} was not looked up on this rank: a sharded index serves the "
                    f"documents of keys passed to vectors() (a collective) first"
                )
            out.append({"key": key, "id": doc["id"], "text": doc["text"],
                        "image": _decode(doc["png"])})
        return out


def pa_int64(values: np.ndarray):
    import pyarrow as pa

    return pa.array(values, pa.int64())


def _pad(scores: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = np.where(keys >= 0, scores, -np.inf).astype(np.float32)
    if keys.shape[1] < k:
        pad = ((0, 0), (0, k - keys.shape[1]))
        scores = np.pad(scores, pad, constant_values=-np.inf)
        keys = np.pad(keys, pad, constant_values=-1)
    return scores, keys.astype(np.int64)


def merge_top_k(scores: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best of the candidates: higher score first, then lower key; -1 last."""
    missing = keys < 0
    order = np.lexsort((np.where(missing, np.iinfo(np.int64).max, keys),
                        np.where(missing, np.inf, -scores.astype(np.float64))), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(keys, order, 1)
