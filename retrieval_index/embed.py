"""The embedding job: documents -> float32 vectors, written in resumable shards.

Any object with the small `DocumentEmbedder` shape can embed an index; `TextDocumentEmbedder`
is the text-only one (a `rag_mm.TextEncoder` + its tokenizer). `embed_store` runs it over a
`DocumentStore` in shards `shards/00000.npy, ...` of `shard_size` rows, each written
atomically (tmp + rename); a restarted job keeps finished shards whose shape checks out, so a
resumed job gives the same vectors as an uninterrupted one. `consolidate` then joins the shards
into one memory-mappable `embeddings.npy`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from retrieval_index.store import DocumentStore

SHARD_DIR = "shards"
EMBEDDINGS_FILE = "embeddings.npy"


@runtime_checkable
class DocumentEmbedder(Protocol):
    """What the index job needs from a document encoder.

    - `dim`: the embedding width.
    - `identity()`: a JSON-able dict naming the vector space (weights hash, pooling, ...). It is
      stored in the manifest and compared, minus its `path`, when an index is loaded.
    - `embed(texts, images)`: one float32 row per document, shape (len(texts), dim), normally
      L2-normalised (the index searches by inner product). `images[i]` is a PIL image or None.
      An embedder without an image path raises `UnsupportedImageError` for image rows.
    """

    dim: int

    def identity(self) -> dict: ...

    def embed(self, texts: list[str], images: list[Image.Image | None]) -> np.ndarray: ...


class UnsupportedImageError(ValueError):
    """A document has an image but the embedder embeds text only."""

    def __init__(self, row: int, reason: str, *, where: str | None = None):
        super().__init__(f"{where or f'document {row}'}: {reason}")
        self.row = row
        self.reason = reason


class TextDocumentEmbedder:
    """Embeds document texts with a `TextEncoder`: length-sorted batches, inference mode.

    On CUDA it runs under bf16 (or fp16) autocast; on CPU in fp32. Images are refused. The
    identity is the encoder folder's (content hash): after changing the weights in memory, save
    them to a new folder and load from there, so the manifest names what embedded the index.
    """

    def __init__(
        self, encoder, tokenizer, *, max_length: int = 256, batch_size: int = 64, device=None
    ):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 tokens, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if encoder.path is None:
            raise ValueError(
                "TextDocumentEmbedder needs an encoder loaded from a folder (its identity is the "
                "folder's content hash): save it with encoder.save_pretrained(DIR, tokenizer=...) "
                "and load TextEncoder.from_pretrained(DIR)"
            )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.encoder = encoder.eval().to(self.device)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.dim = encoder.dim
        self._identity: dict | None = None

    @classmethod
    def from_folder(cls, path=None, **kwargs) -> TextDocumentEmbedder:
        """Encoder + tokenizer from one local folder (default: the bundled all-MiniLM-L6-v2)."""
        from rag_mm.text_encoder import TextEncoder
        from rag_mm.tokenizer import load_tokenizer

        encoder = TextEncoder.from_pretrained(path)
        kwargs.setdefault("max_length", encoder.pooling.max_length)
        return cls(encoder, load_tokenizer(encoder.path), **kwargs)

    def identity(self) -> dict:
        if self._identity is None:
            from rag_mm.text_encoder import encoder_identity

            self._identity = {
                "kind": "text",
                **encoder_identity(self.encoder.path),
                "max_length": self.max_length,
            }
        return dict(self._identity)

    def embed(self, texts: list[str], images: list[Image.Image | None] | None = None) -> np.ndarray:
        if images is not None:
            self._refuse_images(images)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        order = np.argsort([-len(x) for x in ids], kind="stable")
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            out[rows] = self._embed_batch([ids[i] for i in rows], pad)
        return out

    def _embed_batch(self, ids: list[list[int]], pad: int) -> np.ndarray:
        width = max(len(x) for x in ids)
        input_ids = np.full((len(ids), width), pad, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = x
            mask[i, : len(x)] = 1
        input_ids = torch.from_numpy(input_ids).to(self.device)
        mask = torch.from_numpy(mask).to(self.device)
        with torch.inference_mode(), _autocast(self.device):
            vectors = self.encoder(input_ids, mask)
        return vectors.float().cpu().numpy()

    def _refuse_images(self, images: list) -> None:
        for row, image in enumerate(images):
            if image is not None:
                raise UnsupportedImageError(
                    row,
                    "has an image but TextDocumentEmbedder embeds text only; pass an embedder "
                    "with an image path (build_index(..., embedder=<DocumentEmbedder that embeds "
                    "images>)), or index the texts only (CLI: --drop-images)",
                )


def _autocast(device: torch.device):
    if device.type != "cuda":
        return torch.autocast("cpu", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def shard_path(out_dir: Path, shard: int) -> Path:
    return Path(out_dir) / SHARD_DIR / f"{shard:05d}.npy"


def save_atomic(path: Path, array: np.ndarray) -> None:
    """np.save to `path` via a tmp file + rename, so a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def finished_shard(path: Path, rows: int, dim: int) -> bool:
    """True when `path` holds a float32 (rows, dim) array (else the shard is recomputed)."""
    if not path.is_file():
        return False
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError):
        return False
    return array.shape == (rows, dim) and array.dtype == np.float32


def embed_store(
    store: DocumentStore,
    embedder: DocumentEmbedder,
    out_dir: str | Path,
    *,
    shard_size: int,
    on_shard: Callable[[int, int], None] | None = None,
    progress: bool = True,
) -> dict:
    """Embed every row of `store` into `out_dir/shards/`; returns `{"shards", "reused", "embedded"}`.

    `on_shard(shard, num_shards)` is called after each shard is on disk (progress hooks).
    """
    out_dir = Path(out_dir)
    (out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    n = len(store)
    num_shards = -(-n // shard_size)
    _check_images_supported(store, embedder)
    bar = _bar(n, progress)
    reused = 0
    for shard in range(num_shards):
        start, stop = shard * shard_size, min(n, (shard + 1) * shard_size)
        path = shard_path(out_dir, shard)
        if finished_shard(path, stop - start, embedder.dim):
            reused += 1
        else:
            vectors = embedder.embed(store.texts(start, stop), store.images(start, stop))
            _check_vectors(vectors, stop - start, embedder.dim)
            save_atomic(path, np.ascontiguousarray(vectors, dtype=np.float32))
        bar.update(stop - start)
        if on_shard is not None:
            on_shard(shard, num_shards)
    bar.close()
    return {"shards": num_shards, "reused": reused, "embedded": num_shards - reused}


def _check_images_supported(store: DocumentStore, embedder: DocumentEmbedder) -> None:
    """Fail before the long job when the store has images the embedder cannot take."""
    row = store.first_image_row()
    if row is None:
        return
    try:
        embedder.embed(store.texts(row, row + 1), store.images(row, row + 1))
    except UnsupportedImageError as err:
        doc_id = store.ids([row])[0]
        raise UnsupportedImageError(
            row, err.reason, where=f"corpus row {row} (id {doc_id!r})"
        ) from None


def _check_vectors(vectors: np.ndarray, rows: int, dim: int) -> None:
    if vectors.shape != (rows, dim):
        raise ValueError(
            f"embedder returned shape {vectors.shape} for {rows} documents; expected ({rows}, {dim})"
        )
    if not np.isfinite(vectors).all():
        raise ValueError("embedder returned non-finite values (NaN/inf); check the encoder weights")


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="embed", unit="doc", disable=not enabled, smoothing=0.1)


def consolidate(out_dir: str | Path, *, count: int, dim: int, shard_size: int) -> Path:
    """Join the shards into `embeddings.npy` (atomic) and remove `shards/`."""
    out_dir = Path(out_dir)
    path = out_dir / EMBEDDINGS_FILE
    tmp = path.with_name(path.name + ".tmp")
    joined = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(count, dim))
    start = 0
    for shard in range(-(-count // shard_size)):
        part = np.load(shard_path(out_dir, shard), mmap_mode="r")
        joined[start : start + len(part)] = part
        start += len(part)
    assert start == count, (start, count)
    joined.flush()
    del joined
    os.replace(tmp, path)
    shutil.rmtree(out_dir / SHARD_DIR)
    return path


def load_embeddings(out_dir: str | Path) -> np.ndarray:
    """The consolidated (count, dim) float32 embeddings, memory-mapped read-only."""
    return np.load(Path(out_dir) / EMBEDDINGS_FILE, mmap_mode="r")
