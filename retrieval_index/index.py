"""A built index directory, opened for search: FAISS + document store + stored vectors."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import faiss
import numpy as np
import torch

from retrieval_index.build import apply_search_params
from retrieval_index.embed import (
    EMBEDDINGS_FILE,
    NORM_TOLERANCE,
    DocumentEmbedder,
    MultimodalDocumentEmbedder,
    TextDocumentEmbedder,
    load_embeddings,
)
from retrieval_index.manifest import (
    MANIFEST_FILE,
    METRIC,
    EncoderMismatchError,
    check_encoder,
    check_query_encoder,
    describe,
    identity_differences,
    read_manifest,
)
from retrieval_index.store import STORE_FILE, DocumentStore
from retrieval_index.torch_search import TorchExactSearch

INDEX_FILE = "index.faiss"
SEARCH_CHOICES = ("auto", "faiss", "torch", "none")
NORM_SAMPLE = 1024  # stored vectors whose norm `load` checks (evenly spaced rows)


class IndexFileError(ValueError):
    """An index directory whose files disagree with its manifest (or with the rules)."""


class Index:
    """Search by texts or vectors; fetch documents, stored vectors and keys. Keys are int64 rows."""

    def __init__(
        self,
        path: Path,
        manifest: dict,
        *,
        embedder: DocumentEmbedder | None,
        check: bool,
        search: str = "auto",
        search_device=None,
        search_dtype=None,
    ):
        self.path = path
        self.manifest = manifest
        _check_manifest(path, manifest)
        for name in (INDEX_FILE, STORE_FILE, EMBEDDINGS_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} is missing: rebuild the index")
        self.store = DocumentStore(path)
        self._vectors = load_embeddings(path)
        self.torch_search = None
        self.faiss_index = None
        use_torch = _use_torch(search, manifest["index_factory"], path)
        if not use_torch and search != "none":  # torch search reads embeddings.npy instead
            self.faiss_index = faiss.read_index(str(path / INDEX_FILE))
            apply_search_params(self.faiss_index, manifest["build"]["search_params"])
        _check_files(self)
        if use_torch:
            self.torch_search = TorchExactSearch(
                self._vectors, device=search_device, dtype=search_dtype
            )
        self._check = check
        self._embedder = embedder
        if embedder is not None and check:
            check_encoder(manifest, embedder.identity(), index_dir=path)

    def __len__(self) -> int:
        return len(self.store)

    def __repr__(self) -> str:
        return f"Index({str(self.path)!r}, count={len(self)}, factory={self.manifest['index_factory']!r})"

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def check_encoder(self, identity: dict, *, what: str = "the query encoder") -> None:
        """Refuse (`EncoderMismatchError`) a query encoder that embeds into another space than
        this index's encoder: `identity` as `rag_mm.text_encoder.encoder_identity(DIR)` gives
        it; content hash, dim, pooling and normalisation must match."""
        check_query_encoder(self.manifest, identity, index_dir=self.path, what=what)

    @property
    def embedder(self) -> DocumentEmbedder:
        """The embedder for text queries: the one passed to `load`, else the manifest's encoder."""
        if self._embedder is None:
            self._embedder = self._manifest_embedder()
        return self._embedder

    def _manifest_embedder(self) -> DocumentEmbedder:
        from rag_mm.text_encoder import default_encoder_path

        built = self.manifest["encoder"]
        if built.get("kind") not in ("text", "multimodal"):
            raise ValueError(
                f"the index at {self.path} was built with a {built.get('kind')!r} embedder "
                f"{describe(built)}; pass it as load(..., embedder=...) to search with texts"
            )
        candidates = [Path(built["path"]), default_encoder_path()]
        for folder in candidates:
            if not folder.is_dir():
                continue
            embedder = TextDocumentEmbedder.from_folder(
                folder, max_length=built["max_length"], ignore_images="images" in built
            )
            if built["kind"] == "multimodal":
                embedder = MultimodalDocumentEmbedder(embedder, built["vision"]["path"])
            if not identity_differences(built, embedder.identity()) or not self._check:
                return embedder
        raise EncoderMismatchError(
            f"the index at {self.path} was built with encoder {describe(built)}, which is not at "
            f"{[str(c) for c in candidates]}; pass load(..., embedder=...) with that encoder"
        )

    def search(
        self, queries: Sequence[str] | np.ndarray, k: int = 10
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k `(scores float32 (n, k), keys int64 (n, k))`; missing hits are key -1, score -inf.

        `queries` is a list of texts (embedded with `self.embedder`) or a float array (n, dim).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if isinstance(queries, str):
            raise TypeError(
                "search takes a list of query texts (or an (n, dim) array), not one string"
            )
        if isinstance(queries, torch.Tensor):
            vectors = queries.detach()
        elif not isinstance(queries, np.ndarray) and all(isinstance(q, str) for q in queries):
            vectors = self.embedder.embed(list(queries), [None] * len(queries))
        else:
            vectors = np.asarray(queries)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(
                f"query vectors must have shape (n, {self.dim}), got {tuple(vectors.shape)}"
            )
        if self.torch_search is not None:  # a tensor query stays on its device
            return self.torch_search.search(vectors, k)
        if self.faiss_index is None:
            raise ValueError(f"the index at {self.path} was opened with search='none' (lookups only)")
        if isinstance(vectors, torch.Tensor):
            vectors = vectors.float().cpu().numpy()
        scores, keys = self.faiss_index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        scores[keys < 0] = -np.inf
        return scores.astype(np.float32), keys.astype(np.int64)

    def documents(self, keys: Iterable[int]) -> list[dict | None]:
        """`{"key", "id", "text", "image"}` per key (PIL image or None); None for key -1."""
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        found = keys >= 0
        rows = iter(self.store.get(keys[found]))
        return [next(rows) if ok else None for ok in found]

    def vectors(self, keys) -> np.ndarray:
        """Stored float32 embeddings, shape keys.shape + (dim,); key -1 gives a zero vector."""
        keys = np.asarray(keys, dtype=np.int64)
        if keys.size and (keys.max() >= len(self) or keys.min() < -1):
            raise IndexError(f"keys out of range for an index of {len(self)} documents (-1 = none)")
        flat = keys.reshape(-1)
        out = np.zeros((flat.size, self.dim), dtype=np.float32)
        found = flat >= 0
        order = np.argsort(flat[found], kind="stable")  # sorted reads from the memory map
        out_rows = np.flatnonzero(found)[order]
        out[out_rows] = self._vectors[flat[found][order]]
        return out.reshape(keys.shape + (self.dim,))

    def key_of(self, ids: Iterable[str]) -> np.ndarray:
        """int64 keys of document ids; `KeyError` names the unknown ones."""
        return self.store.key_of(ids)

    def ids_of(self, keys: Iterable[int]) -> list[str]:
        return self.store.ids(keys)

    def set_search_params(self, **params) -> None:
        """Override search parameters, e.g. `nprobe=64`, `efSearch=256`, `k_factor_rf=8`."""
        if self.faiss_index is None:
            raise ValueError(f"search parameters {params} do not apply to exact torch search")
        apply_search_params(self.faiss_index, params)


def _check_manifest(path: Path, manifest: dict) -> None:
    file = path / MANIFEST_FILE
    if manifest.get("metric") != METRIC:
        raise IndexFileError(
            f"{file}: metric {manifest.get('metric')!r} is not supported; this code searches "
            f"{METRIC!r} over L2-normalised vectors"
        )
    if manifest.get("dtype") != "float32":
        raise IndexFileError(f"{file}: dtype {manifest.get('dtype')!r}; expected 'float32'")
    for key in ("dim", "count"):
        value = manifest.get(key)
        if not isinstance(value, int) or value < 1:
            raise IndexFileError(f"{file}: {key} {value!r}; expected a positive integer")


def _check_files(index: Index) -> None:
    """Every file agrees with the manifest: dims, metric, counts, dtype, unit-norm vectors."""
    dim, count = index.manifest["dim"], index.manifest["count"]
    said = f"manifest.json says dim {dim}, count {count}"
    vectors, faiss_index = index._vectors, index.faiss_index
    embeddings = index.path / EMBEDDINGS_FILE
    if vectors.dtype != np.float32:
        raise IndexFileError(f"{embeddings}: dtype {vectors.dtype}; expected float32")
    if vectors.shape != (count, dim):
        raise IndexFileError(f"{embeddings}: shape {vectors.shape}; {said}")
    faiss_file = index.path / INDEX_FILE
    if faiss_index is None:  # exact torch search over embeddings.npy
        pass
    elif faiss_index.d != dim:
        raise IndexFileError(f"{faiss_file}: dim {faiss_index.d}; {said}")
    elif faiss_index.ntotal != count:
        raise IndexFileError(f"{faiss_file}: {faiss_index.ntotal} vectors; {said}")
    elif faiss_index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IndexFileError(
            f"{faiss_file}: metric type {faiss_index.metric_type} (faiss.METRIC_L2 = "
            f"{faiss.METRIC_L2}); expected inner product ({faiss.METRIC_INNER_PRODUCT})"
        )
    if len(index.store) != count:
        raise IndexFileError(f"{index.store.path}: {len(index.store)} documents; {said}")
    rows = np.unique(np.linspace(0, count - 1, min(count, NORM_SAMPLE)).astype(np.int64))
    norms = np.linalg.norm(np.asarray(vectors[rows], dtype=np.float64), axis=1)
    worst = int(np.argmax(np.abs(norms - 1.0)))
    if not abs(norms[worst] - 1.0) <= NORM_TOLERANCE:
        raise IndexFileError(
            f"{embeddings}: row {int(rows[worst])} has norm {norms[worst]:.4f}; the index searches "
            f"by inner product over L2-normalised vectors (norm 1 within {NORM_TOLERANCE})"
        )


def _use_torch(search: str, factory: str, path: Path) -> bool:
    if search not in SEARCH_CHOICES:
        raise ValueError(f"search={search!r} is not one of {SEARCH_CHOICES}")
    if search == "torch" and factory != "Flat":
        raise ValueError(
            f"search='torch' is exact search over the stored vectors; the index at {path} is "
            f"{factory!r} (use search='faiss', or build a 'Flat' index)"
        )
    return search == "torch" or (search == "auto" and factory == "Flat" and torch.cuda.is_available())


def load(
    index_dir: str | Path,
    *,
    embedder: DocumentEmbedder | None = None,
    check_encoder: bool = True,
    search: str = "auto",
    search_device=None,
    search_dtype=None,
) -> Index:
    """Open a complete index directory; with `embedder`, refuse one built by another encoder.

    `search`: "auto" (torch exact search for a Flat index when CUDA is present, else FAISS),
    "faiss", "none" (documents, vectors and keys only: `index.faiss` is not read), or "torch"
    (Flat only; on `search_device`, default CUDA if present, in
    `search_dtype`, default fp16 on CUDA and fp32 on CPU; `retrieval_index.torch_search`)."""
    path = Path(index_dir).expanduser().resolve()
    manifest = read_manifest(path)
    if manifest["status"] != "complete":
        raise ValueError(
            f"the index at {path} is incomplete (status {manifest['status']!r}): rerun the build "
            f"with the same arguments to resume it"
        )
    return Index(path, manifest, embedder=embedder, check=check_encoder, search=search,
                 search_device=search_device, search_dtype=search_dtype)
