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
from retrieval_index.durable import IndexLockedError
from retrieval_index.embed import DocumentEmbedder, TextDocumentEmbedder, UnsupportedImageError
from retrieval_index.index import Index, IndexFileError, load
from retrieval_index.job import BuildConfig, IndexExistsError, build_index
from retrieval_index.manifest import EncoderMismatchError, ResumeMismatchError
from retrieval_index.store import CorpusError, DocumentStore, UnknownIdError

__all__ = [
    "BuildConfig",
    "CorpusError",
    "DocumentEmbedder",
    "DocumentStore",
    "EncoderMismatchError",
    "FactoryError",
    "Index",
    "IndexExistsError",
    "IndexFileError",
    "IndexLockedError",
    "ResumeMismatchError",
    "TextDocumentEmbedder",
    "UnknownIdError",
    "UnsupportedImageError",
    "build_index",
    "load",
]
