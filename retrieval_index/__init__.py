"""Index side of rag_mm: embed a corpus, build FAISS, store documents, version it all.

    import retrieval_index
    index = retrieval_index.build_index(dataset, "indexes/wiki", index_factory="IVF1024,Flat")
    index = retrieval_index.load("indexes/wiki")           # checks the encoder when given one
    scores, keys = index.search(["a query"], k=10)         # or an (n, dim) float array
    docs, vectors = index.documents(keys[0]), index.vectors(keys)

An index directory holds `manifest.json`, `docs.arrow` (the document store), `embeddings.npy`
(the stored vectors) and `index.faiss`. No Lightning here.
"""

from retrieval_index.build import FactoryError
from retrieval_index.collective import Collective, LocalCollective, TorchCollective
from retrieval_index.durable import IndexLockedError
from retrieval_index.embed import (
    DocumentEmbedder,
    MultimodalDocumentEmbedder,
    TextDocumentEmbedder,
    UnsupportedImageError,
)
from retrieval_index.index import Index, IndexFileError, load
from retrieval_index.job import VISION_DIR, BuildConfig, IndexExistsError, build_index
from retrieval_index.manifest import EncoderMismatchError, ResumeMismatchError
from retrieval_index.sharded import ShardedIndex, ShardLayoutError
from retrieval_index.store import CorpusError, DocumentStore, UnknownIdError

__all__ = [
    "VISION_DIR",
    "BuildConfig",
    "Collective",
    "CorpusError",
    "DocumentEmbedder",
    "DocumentStore",
    "EncoderMismatchError",
    "FactoryError",
    "Index",
    "IndexExistsError",
    "IndexFileError",
    "IndexLockedError",
    "LocalCollective",
    "MultimodalDocumentEmbedder",
    "ResumeMismatchError",
    "ShardLayoutError",
    "ShardedIndex",
    "TextDocumentEmbedder",
    "TorchCollective",
    "UnknownIdError",
    "UnsupportedImageError",
    "build_index",
    "load",
]
