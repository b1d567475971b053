"""FAISS from any `index_factory` string, over inner product (the vectors are L2-normalised).

Keys are row numbers: vectors are added in row order, so FAISS position == key (an `IDMap`
factory gets the same keys explicitly). Training (IVF, PQ) uses a seeded random sample; the
work runs on GPU when FAISS sees one and the index type has a GPU version, and the index is
moved back to CPU to be saved. Search parameters (nprobe, efSearch, k_factor_rf) get sensible
defaults and are recorded, so a loaded index searches the way its build report measured.
"""

from __future__ import annotations

import math
import time

import faiss
import numpy as np

FACTORY_EXAMPLES = (
    "'Flat' (exact), 'IVF1024,Flat', 'HNSW32', 'IVF256,PQ16x8,RFlat', "
    "'IVF256,PQ16x8,Refine(Flat)', 'IVF4096_HNSW32,Flat'"
)
MIN_TRAIN_SIZE = 10_000
POINTS_PER_CENTROID = 40
ADD_CHUNK = 65_536
EXACT_CHUNK = 262_144


class FactoryError(ValueError):
    """An index factory string that FAISS cannot build, or cannot train on this corpus."""


def make_index(factory: str, dim: int) -> faiss.Index:
    """An empty inner-product index; `FactoryError` names `--index-factory` and examples."""
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1].split(": ", 1)[-1]
        raise FactoryError(
            f"--index-factory (index_factory=) {factory!r} is not a valid FAISS factory string "
            f"for {dim}-d vectors ({reason}). Examples: {FACTORY_EXAMPLES}"
        ) from None


def _parts(index: faiss.Index):
    """The index and the indexes it wraps (refine base, IDMap/PreTransform inner), downcast."""
    index = faiss.downcast_index(index)
    yield index
    for attr in ("base_index", "index"):
        inner = getattr(index, attr, None)
        if isinstance(inner, faiss.Index):
            yield from _parts(inner)


def nlist_of(index: faiss.Index) -> int | None:
    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        return None


def min_training_points(index: faiss.Index) -> int:
    """The fewest vectors training can use: nlist for IVF, 2**nbits for PQ codebooks."""
    if index.is_trained:
        return 0
    need = nlist_of(index) or 1
    for part in _parts(index):
        pq = getattr(part, "pq", None)
        if pq is not None:
            need = max(need, int(pq.ksub))
    return need


def check_trainable(index: faiss.Index, count: int, factory: str) -> None:
    need = min_training_points(index)
    if count < need:
        nlist = max(1, 2 ** int(math.log2(max(1, count // POINTS_PER_CENTROID))))
        raise FactoryError(
            f"--index-factory {factory!r} needs at least {need} training vectors (IVF nlist / PQ "
            f"codebook size) but the corpus has {count} documents; use fewer lists, e.g. "
            f"'IVF{nlist},Flat', or an index without training: 'Flat', 'HNSW32'"
        )


def train_size_for(index: faiss.Index, count: int) -> int:
    """Rule of thumb: 40 points per centroid, at least 10k, at most the corpus."""
    if index.is_trained:
        return 0
    return min(count, max(MIN_TRAIN_SIZE, POINTS_PER_CENTROID * min_training_points(index)))


def default_search_params(index: faiss.Index) -> dict:
    """nprobe ~ nlist/16 (at least min(8, nlist/2), at most 256), efSearch 128, k_factor_rf 4."""
    params = {}
    nlist = nlist_of(index)
    if nlist:
        low = min(8, max(1, nlist // 2))
        params["nprobe"] = int(min(256, max(low, nlist // 16)))
    parts = list(_parts(index))
    if any(isinstance(p, faiss.IndexHNSW) for p in parts):
        params["efSearch"] = 128
    if any(isinstance(p, faiss.IndexRefine) for p in parts):
        params["k_factor_rf"] = 4
    return params


def apply_search_params(index: faiss.Index, params: dict) -> None:
    space = faiss.ParameterSpace()
    for name, value in params.items():
        try:
            space.set_index_parameter(index, name, value)
        except RuntimeError:
            raise ValueError(
                f"search parameter {name}={value} does not apply to this index "
                f"({type(faiss.downcast_index(index)).__name__})"
            ) from None


def _to_gpu(index: faiss.Index):
    """(index on GPU 0, resources) when FAISS has a GPU and this index type runs there."""
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return index, None
    try:
        resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(resources, 0, index), resources
    except (RuntimeError, AttributeError):  # e.g. HNSW has no GPU version
        return index, None


def _is_idmap(index: faiss.Index) -> bool:
    return isinstance(faiss.downcast_index(index), (faiss.IndexIDMap, faiss.IndexIDMap2))


def train_and_add(
    vectors: np.ndarray,
    factory: str,
    *,
    train_size: int | None,
    seed: int,
    progress: bool = False,
    on_trained=None,
) -> tuple[faiss.Index, dict]:
    """Build the index over `vectors` (row i gets key i); returns it (on CPU) and timings.
    `on_trained(empty)` gets a CPU copy of the trained, still empty index (search shards)."""
    count, dim = vectors.shape
    cpu_index = make_index(factory, dim)
    check_trainable(cpu_index, count, factory)
    size = train_size_for(cpu_index, count) if train_size is None else min(train_size, count)
    index, resources = _to_gpu(cpu_index)
    info = {"build_device": "cpu" if resources is None else "cuda", "train_seconds": 0.0}
    if not index.is_trained:
        start = time.perf_counter()
        _train(index, vectors, size, seed, factory)
        info["train_seconds"] = round(time.perf_counter() - start, 3)
    if on_trained is not None:
        on_trained(faiss.index_gpu_to_cpu(index) if resources is not None else faiss.clone_index(index))
    start = time.perf_counter()
    _add_in_order(index, vectors, progress)
    info["add_seconds"] = round(time.perf_counter() - start, 3)
    if resources is not None:
        index = faiss.index_gpu_to_cpu(index)
    return index, info


def _train(index: faiss.Index, vectors: np.ndarray, size: int, seed: int, factory: str) -> None:
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size=size, replace=False))
    sample = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    try:
        index.train(sample)
    except RuntimeError as err:
        raise FactoryError(
            f"training --index-factory {factory!r} on {size} vectors failed: {err}"
        ) from None


def add_rows(index: faiss.Index, vectors: np.ndarray, start: int, stop: int) -> None:
    """Add rows [start, stop) of `vectors` to an empty `index` under keys 0 .. stop - start."""
    idmap = _is_idmap(index)
    for first in range(start, stop, ADD_CHUNK):
        chunk = np.ascontiguousarray(vectors[first : min(stop, first + ADD_CHUNK)], dtype=np.float32)
        if idmap:
            index.add_with_ids(chunk, np.arange(first - start, first - start + len(chunk)))
        else:
            index.add(chunk)
    assert index.ntotal == stop - start, (index.ntotal, start, stop)


def _add_in_order(index: faiss.Index, vectors: np.ndarray, progress: bool) -> None:
    from tqdm.auto import tqdm

    idmap = _is_idmap(index)
    with tqdm(total=len(vectors), desc="add", unit="vec", disable=not progress) as bar:
        for start in range(0, len(vectors), ADD_CHUNK):
            chunk = np.ascontiguousarray(vectors[start : start + ADD_CHUNK], dtype=np.float32)
            if idmap:
                index.add_with_ids(chunk, np.arange(start, start + len(chunk), dtype=np.int64))
            else:
                assert index.ntotal == start, (index.ntotal, start)  # position == key
                index.add(chunk)
            bar.update(len(chunk))
    assert index.ntotal == len(vectors), (index.ntotal, len(vectors))


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k over (memory-mapped) `vectors`, in chunks."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start in range(0, len(vectors), EXACT_CHUNK):
        chunk = np.ascontiguousarray(vectors[start : start + EXACT_CHUNK], dtype=np.float32)
        scores, keys = faiss.knn(
            queries, chunk, min(k, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT
        )
        heap.add_result(np.ascontiguousarray(scores), np.ascontiguousarray(keys + start))
    heap.finalize()
    return heap.D, heap.I


def recall_report(
    index: faiss.Index,
    vectors: np.ndarray,
    *,
    num_queries: int,
    seed: int,
    k: int = 10,
    noise: float = 0.1,
) -> dict:
    """recall@k of `index` against exact search, and its queries/s, on noisy stored vectors.

    Queries are the stored vectors of a random sample of documents plus Gaussian noise of
    total norm ~`noise`, re-normalised: near-duplicates of real documents, not the documents.
    """
    count, dim = vectors.shape
    k = min(k, count)
    rng = np.random.default_rng(seed + 1)
    rows = np.sort(rng.choice(count, size=min(num_queries, count), replace=False))
    queries = vectors[rows] + rng.standard_normal((len(rows), dim)).astype(np.float32) * (
        noise / math.sqrt(dim)
    )
    queries = np.ascontiguousarray(
        queries / np.linalg.norm(queries, axis=1, keepdims=True), dtype=np.float32
    )
    _, truth = exact_search(vectors, queries, k)
    index.search(queries[: min(8, len(queries))], k)  # warm-up
    start = time.perf_counter()
    _, found = index.search(queries, k)
    seconds = time.perf_counter() - start
    hits = sum(len(np.intersect1d(t, f)) for t, f in zip(truth, found))
    return {
        f"recall_at_{k}": round(hits / (k * len(rows)), 4),
        "k": k,
        "num_queries": len(rows),
        "query_noise": noise,
        "qps": round(len(rows) / max(seconds, 1e-9), 1),
        "search_seconds": round(seconds, 4),
        "faiss_threads": faiss.omp_get_max_threads(),
    }
