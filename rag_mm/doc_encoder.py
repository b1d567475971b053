"""A trainable document tower: fresh, differentiable vectors for the documents a step scores.

With `RetrieverConfig.train_doc_encoder`, the retrieval unit keeps its own copy of the text
tower that embedded the index (the bundled MiniLM by default) and scores the retrieved and
gold documents with `d_k = DocumentEncoder(text_k)` instead of the index's stored vectors, so
the loss trains it. The search still runs over the stored vectors (a stale copy of this
tower's output) until an index refresh rebuilds them with a snapshot of these weights
(`retrieval_index.refresh`, swapped in by `trainers.refresh`).

A document is tokenized as `retrieval_index.TextDocumentEmbedder` does (special tokens,
truncation at the tower's `max_length`), so at initialisation a fresh vector equals the stored
one up to float rounding. Text documents only: `RetrievalUnit.attach` refuses an index whose
vectors also embed images.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from rag_mm.text_encoder import TextEncoder


def encode_by_key(keys: np.ndarray, like: torch.Tensor, cache: dict, cache_size: int,
                  compute: Callable[[list[int]], list],
                  encode: Callable[[list], torch.Tensor]) -> torch.Tensor:
    """Rows of shape keys.shape + (dim,), one per key: each distinct key >= 0 encoded once,
    zeros for -1 (looked up as key 0). `cache` maps a key to what `encode` needs of it;
    `compute(missing keys) -> their items, in order` fills it (emptied first when it would
    grow past `cache_size`; then every key of this call is missing); `encode(items) ->
    (distinct keys, dim)`, one row per distinct key in ascending order, on `like`'s device,
    gives the dtype (multiplied by a mask of `like`'s dtype)."""
    keys = np.asarray(keys, dtype=np.int64)
    flat = keys.reshape(-1)
    unique, inverse = np.unique(np.maximum(flat, 0), return_inverse=True)
    missing = [int(k) for k in unique if int(k) not in cache]
    if missing and len(cache) + len(missing) > cache_size:
        cache.clear()  # this call's cached keys too: computed again with the missing ones
        missing = [int(k) for k in unique]
    if missing:
        cache.update(zip(missing, compute(missing)))
    out = encode([cache[int(k)] for k in unique])[torch.as_tensor(inverse, device=like.device)]
    out = out * torch.as_tensor(flat >= 0, device=like.device, dtype=like.dtype)[:, None]
    return out.view(*keys.shape, out.shape[-1])


class DocumentEncoder(nn.Module):
    """`forward(texts) -> (N, dim)` unit vectors, differentiable; token ids cached per key."""

    def __init__(self, text: TextEncoder, tokenizer, *, cache_size: int = 200_000) -> None:
        super().__init__()
        self.text = text
        self.tokenizer = tokenizer
        self.max_length = text.pooling.max_length
        self.cache_size = cache_size
        self._tokens: dict[int, list[int]] = {}

    @property
    def dim(self) -> int:
        return self.text.dim

    def clear_cache(self) -> None:
        self._tokens.clear()

    def encode_keys(self, keys: np.ndarray, documents, like: torch.Tensor) -> torch.Tensor:
        """Vectors of shape keys.shape + (dim,) in `like`'s device and dtype: each distinct key
        >= 0 encoded once (its text read with `documents(keys) -> [{"text": ...}]`), zeros for
        -1."""
        return encode_by_key(keys, like, self._tokens, self.cache_size,
                             lambda missing: self._tokenize(missing, documents),
                             lambda ids: self._encode(ids, like.device).to(like.dtype))

    def _tokenize(self, keys: list[int], documents) -> list[list[int]]:
        texts = [doc["text"] for doc in documents(np.array(keys, dtype=np.int64))]
        return self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]

    def _encode(self, ids: list[list[int]], device: torch.device) -> torch.Tensor:
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, tokens in enumerate(ids):
            input_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        return self.text(input_ids.to(device), mask.to(device))
