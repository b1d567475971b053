"""The retriever: a query encoder over (prompt, image), and the backend it searches.

The model never imports FAISS: it talks to any object with the `RetrievalBackend` shape
(`retrieval_index.load(DIR)` returns one; `InMemoryBackend` is an exact, in-memory one for
tests and profiling).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rag_mm.config import VisionConfig
from rag_mm.layers import VisionTower
from rag_mm.text_encoder import TextEncoder, default_encoder_path, read_pooling_config


class RetrievalBackend(Protocol):
    """What the retrieval unit needs from an index. Keys are int64 row numbers."""

    def search(self, queries: torch.Tensor | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(num_queries, dim) queries -> (scores, keys), numpy, each (num_queries, k); -1 = none.

        The model passes its query tensor as it is (on its device, detached): a GPU backend
        searches it there; a CPU one copies it to the host."""

    def vectors(self, keys: np.ndarray) -> np.ndarray:
        """The stored (fixed) document embeddings for `keys`, shape keys.shape + (dim,)."""

    def documents(self, keys: np.ndarray) -> list[dict]:
        """Rows with at least `text` and `image` (PIL image or None)."""

    def __len__(self) -> int: ...


class InMemoryBackend:
    """Exact inner-product search over vectors held in memory."""

    def __init__(self, vectors: np.ndarray, texts: list[str], images: list | None = None) -> None:
        if len(vectors) != len(texts):
            raise ValueError(f"{len(vectors)} vectors but {len(texts)} texts")
        self._vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self._texts = list(texts)
        self._images = list(images) if images is not None else [None] * len(texts)

    @classmethod
    def random(cls, num_docs: int, *, dim: int = 384, seed: int = 0) -> InMemoryBackend:
        """Unit vectors and short word-salad texts: enough to run the model for real."""
        rng = np.random.default_rng(seed)
        vectors = rng.standard_normal((num_docs, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        words = ["red", "blue", "circle", "star", "lives", "in", "paris", "eats", "rice", "the"]
        texts = [" ".join(rng.choice(words, size=8)) for _ in range(num_docs)]
        return cls(vectors, texts)

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(queries, torch.Tensor):
            queries = queries.detach().float().cpu().numpy()
        k_found = min(k, len(self))
        sims = queries.astype(np.float32) @ self._vectors.T
        keys = np.argsort(-sims, axis=1, kind="stable")[:, :k_found]
        scores = np.take_along_axis(sims, keys, axis=1)
        if k_found < k:
            pad = k - k_found
            keys = np.pad(keys, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        return scores.astype(np.float32), keys.astype(np.int64)

    def vectors(self, keys: np.ndarray) -> np.ndarray:
        return self._vectors[np.asarray(keys)]

    def documents(self, keys: np.ndarray) -> list[dict]:
        return [{"text": self._texts[k], "image": self._images[k]} for k in np.asarray(keys)]

    def __len__(self) -> int:
        return len(self._texts)


def build_text_encoder(path: str | Path | None, *, pretrained: bool) -> TextEncoder:
    """The text tower from a local HF folder: its weights, or only its config (meta builds)."""
    path = Path(path) if path is not None else default_encoder_path()
    if pretrained:
        return TextEncoder.from_pretrained(path)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    return TextEncoder.from_config(config, pooling=read_pooling_config(path))


TEXT_CHUNK = 16  # rows per frozen-text-tower call (see `QueryEncoder._embed_in_chunks`)


class QueryEncoder(nn.Module):
    """q = normalize(text_proj(text(prompt)) + image_proj(mean(vision(image)))).

    The text tower is the document encoder's (MiniLM by default), so at initialisation
    (`text_proj` = identity) a query is its prompt's sentence embedding, in the index's
    space; training teaches the vision path to add what the picture shows. A frozen text
    tower's prompt embeddings are cached by token ids (prompts repeat across examples).
    """

    def __init__(self, text: TextEncoder, vision: VisionConfig, *, train_text: bool,
                 cache_size: int = 100_000, vision_dir: str | Path | None = None) -> None:
        super().__init__()
        self.text = text
        self.vision_dir = vision_dir
        self.train_text = train_text
        self.text.requires_grad_(train_text)
        self.cache_size = cache_size
        self._text_cache: dict[bytes, torch.Tensor] = {}
        self.vision = VisionTower(vision)
        self.text_proj = nn.Linear(text.dim, text.dim, bias=False)
        self.image_proj = nn.Linear(vision.hidden_size, text.dim, bias=False)
        if vision_dir is not None:  # refused when built (on meta too), not when initialised
            from rag_mm.query_vision import check_fits

            check_fits(vision_dir, vision, text.dim)

    @property
    def dim(self) -> int:
        return self.text.dim

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self.vision(images).mean(dim=1))

    def forward(
        self, images: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
    ) -> torch.Tensor:
        return self.combine(*self.features(images, prompt_ids, prompt_mask))

    def features(self, images: torch.Tensor, prompt_ids: torch.Tensor,
                 prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the prompt's text embedding, the picture's mean vision feature): what `combine`
        projects into q, and what a second query head (`rag_mm.rescorer`) reads too."""
        return self.embed_text(prompt_ids, prompt_mask), self.vision(images).mean(dim=1)

    def combine(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text) + self.image_proj(image), dim=-1)

    def embed_text(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        if self.train_text:
            return self.text(prompt_ids, prompt_mask)
        keys = [row.tobytes() for row in (prompt_ids * prompt_mask).cpu().numpy()]
        missing = list(dict.fromkeys(k for k in keys if k not in self._text_cache))
        if missing and len(self._text_cache) + len(missing) > self.cache_size:
            self._text_cache.clear()  # this batch's cached prompts too: embedded again below
            missing = list(dict.fromkeys(keys))
        if missing:
            rows = torch.tensor([keys.index(k) for k in missing], device=prompt_ids.device)
            fresh = self._embed_in_chunks(prompt_ids[rows], prompt_mask[rows])
            self._text_cache.update(zip(missing, fresh))
        return torch.stack([self._text_cache[k] for k in keys])

    @torch.no_grad()
    def _embed_in_chunks(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The frozen tower's embeddings, computed in chunks of exactly `TEXT_CHUNK` rows (the
        last one padded). A matmul's rounding depends on how many rows it has, so a prompt's
        cached embedding must not depend on which other prompts were new in its batch: then
        a resumed run (with a fresh cache) computes what the uninterrupted one did."""
        out = []
        for start in range(0, len(ids), TEXT_CHUNK):
            chunk_ids, chunk_mask = ids[start:start + TEXT_CHUNK], mask[start:start + TEXT_CHUNK]
            pad = TEXT_CHUNK - len(chunk_ids)
            if pad:
                chunk_ids = torch.cat([chunk_ids, chunk_ids[:1].expand(pad, -1)])
                chunk_mask = torch.cat([chunk_mask, chunk_mask[:1].expand(pad, -1)])
            out.append(self.text(chunk_ids, chunk_mask)[: TEXT_CHUNK - pad])
        return torch.cat(out)

    def train(self, mode: bool = True):
        self._text_cache.clear()  # weights may change between modes (e.g. a loaded state)
        super().train(mode)
        if not self.train_text:
            self.text.eval()  # a frozen tower runs without dropout, in every mode
        return self

    def init_weights(self) -> None:
        """text_proj = identity; image_proj normal(0, 0.02), or the vision tower and image_proj
        of `vision_dir` (the weights that embedded the index's document images); the text tower
        keeps its weights."""
        nn.init.eye_(self.text_proj.weight)
        nn.init.normal_(self.image_proj.weight, 0.0, 0.02)
        if self.vision_dir is not None:
            from rag_mm.query_vision import check_fits, load_query_vision

            check_fits(self.vision_dir, self.vision.config, self.dim)
            loaded = load_query_vision(self.vision_dir)
            self.vision.load_state_dict(loaded.vision.state_dict())
            self.image_proj.load_state_dict(loaded.image_proj.state_dict())

    def save_vision(self, folder: str | Path) -> Path:
        """Write the vision path to `folder` (`rag_mm.query_vision`), e.g. to embed an index."""
        from rag_mm.query_vision import save_query_vision

        return save_query_vision(folder, self.vision, self.image_proj)

    def identity(self, text_folder: str | Path | None) -> dict:
        """The vector space of the queries: the text tower's folder identity, plus `vision`
        (the `vision_dir` identity) when the vision path started from a folder."""
        from rag_mm.text_encoder import encoder_identity

        identity = encoder_identity(text_folder)
        if self.vision_dir is not None:
            from rag_mm.query_vision import vision_identity

            identity["vision"] = vision_identity(self.vision_dir)
        return identity


def contrastive_loss(
    q: torch.Tensor,
    gold_vectors: torch.Tensor,
    gold_keys: torch.Tensor,
    negative_vectors: torch.Tensor,
    negative_keys: torch.Tensor,
    temperature: float,
    shared_vectors: torch.Tensor | None = None,
    shared_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example InfoNCE of q against its gold document, with in-batch, hard and shared
    negatives.

    q, gold_vectors: (B, D); gold_keys: (B,) with -1 for "no gold" (such rows give 0);
    negative_vectors: (B, C, D) and negative_keys: (B, C) from over-retrieval. Candidates
    that are the example's own gold (or missing, -1) are masked out of the negatives, and a
    gold shared by several examples is one in-batch negative for the others.
    shared_vectors (P, D) and shared_keys (P,) are negatives for every query; those that are
    a gold document of the batch are masked (they already count as in-batch columns).
    """
    has_gold = gold_keys >= 0
    same_doc = gold_keys[None, :] == gold_keys[:, None]
    eye = torch.eye(len(q), dtype=torch.bool, device=q.device)
    repeated = (same_doc & torch.ones_like(eye).tril(-1)).any(dim=1)  # gold seen in a row above
    hidden = ((same_doc | repeated[None, :]) & ~eye) | ~has_gold[None, :]  # each doc counts once
    in_batch = (q @ gold_vectors.T).masked_fill(hidden, -torch.inf)
    hard = torch.einsum("bd,bcd->bc", q, negative_vectors)
    hard = hard.masked_fill((negative_keys == gold_keys[:, None]) | (negative_keys < 0), -torch.inf)
    columns = [in_batch, hard]
    if shared_vectors is not None and len(shared_vectors):
        in_batch_gold = (shared_keys[:, None] == gold_keys[None, :]).any(dim=1)
        columns.append((q @ shared_vectors.T).masked_fill(in_batch_gold[None, :], -torch.inf))
    logits = torch.cat(columns, dim=1) / temperature
    safe_target = torch.arange(len(q), device=q.device)
    loss = F.cross_entropy(logits, safe_target, reduction="none")
    return torch.where(has_gold, loss, torch.zeros_like(loss))
