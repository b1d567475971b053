"""Second-stage scoring of the over-retrieved candidates: which of them does the query name?

The index's vectors are the text tower's mean over all of a document's tokens, so every word
weighs the same, also the words a query cannot predict (on the demo task, the fact's answer:
`the red striped square lives in *vienna*`). A query encoder trained against such vectors
must guess those words too; for documents it never saw as positives the guess is noise, and
it fits the training documents instead (held-out recall@1 59%, training pictures 100%).

`Rescorer` (`RetrieverConfig.rescore`) scores the `num_candidates` documents the search
returned with
    r_k = <q', d'_k> / T,
- `q' = normalize(text_proj'(text) + image_proj'(image))`: a query head of its own on the
  query encoder's text and pooled image features, a copy of the first stage's at init (the
  first stage's `q` still searches, and learns against the stored vectors as before);
- `d'_k = normalize(sum_h a_h . H_k / heads + mix(a_1 . H_k, ..., a_heads . H_k))`: a light
  trainable document tower over the frozen text tower's token states `H_k` (T, D), with
  attention weights `a_h = softmax_t(w_h . H_k,t + b_h)` that learn which tokens queries
  predict, and a linear `mix`, zero at init. At init the weights are uniform and `mix` is 0,
  so for a mean-pooling text tower `d'_k` is the stored vector, and the order is the search's.
The candidates are ordered by `r`, the first `top_k` are read, and `r` is the document score
of the reader's marginal; the retriever loss adds the same InfoNCE for `(q', d')` as for
`(q, stored)`. The token states are computed once per document (no gradient: the text tower
is frozen; one document per forward, so they do not depend on the batch) and cached, so a
step costs the tower on `B x num_candidates` cached states.
Nothing here knows a task's words.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rag_mm.doc_encoder import encode_by_key
from rag_mm.text_encoder import TextEncoder


class Rescorer(nn.Module):
    """`query(text, image) -> (B, D)`, `documents(keys, ...) -> keys.shape + (D,)`."""

    def __init__(self, dim: int, image_dim: int, *, heads: int = 1,
                 cache_size: int = 200_000) -> None:
        super().__init__()
        self.heads = heads
        self.text_proj = nn.Linear(dim, dim, bias=False)
        self.image_proj = nn.Linear(image_dim, dim, bias=False)
        self.token_score = nn.Linear(dim, heads)
        self.mix = nn.Linear(dim * heads, dim, bias=False)
        self.cache_size = cache_size
        self._states: dict[int, torch.Tensor] = {}  # key -> (T, D) frozen token states

    @torch.no_grad()
    def init_weights(self, query_encoder: nn.Module) -> None:
        """The query head a copy of the (initialised) query encoder's projections, uniform
        token weights and a zero `mix`: at init q' = q and, for a mean-pooling text tower,
        d' = the stored vector, so the second stage starts as the search's order."""
        self.text_proj.weight.copy_(query_encoder.text_proj.weight)
        self.image_proj.weight.copy_(query_encoder.image_proj.weight)
        for tensor in (self.token_score.weight, self.token_score.bias, self.mix.weight):
            nn.init.zeros_(tensor)

    def clear_cache(self) -> None:
        self._states.clear()

    def query(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text) + self.image_proj(image), dim=-1)

    def documents(self, keys: np.ndarray, read_documents, tower: TextEncoder, tokenizer,
                  like: torch.Tensor) -> torch.Tensor:
        """`d'` for `keys` (any shape; -1 gives zeros) in `like`'s device and dtype; the token
        states of documents not cached yet are computed with `tower` (texts read with
        `read_documents(keys) -> [{"text": ...}]`, tokenized as the index embedded them)."""
        return encode_by_key(keys, like, self._states, self.cache_size,
                             lambda missing: self._token_states(missing, read_documents, tower,
                                                                tokenizer),
                             lambda states: self._pool_states(states, like))

    def _pool_states(self, states: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """Cached (T_n, D) token states, padded into one batch in `like`'s device and dtype,
        pooled: (N, D)."""
        width = max(len(s) for s in states)
        hidden = like.new_zeros(len(states), width, states[0].shape[-1])
        mask = torch.zeros(len(states), width, dtype=torch.bool, device=like.device)
        for row, state in enumerate(states):
            hidden[row, : len(state)] = state.to(like.device, like.dtype)
            mask[row, : len(state)] = True
        return self.pool(hidden, mask)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, T, D) token states and their (N, T) mask -> (N, D) unit vectors."""
        weights = self.token_score(hidden).masked_fill(~mask[..., None], -torch.inf).softmax(1)
        pooled = torch.einsum("nth,ntd->nhd", weights, hidden)  # (N, heads, D)
        return F.normalize(pooled.mean(1) + self.mix(pooled.flatten(1)), dim=-1)

    @torch.no_grad()
    def _token_states(self, keys: list[int], read_documents, tower: TextEncoder,
                      tokenizer) -> list[torch.Tensor]:
        """The frozen tower's (T, D) token states of documents `keys`, on the CPU in float32."""
        texts = [doc["text"] for doc in read_documents(np.array(keys, dtype=np.int64))]
        ids = tokenizer(texts, truncation=True, max_length=tower.pooling.max_length)["input_ids"]
        device = next(tower.parameters()).device
        states = []
        for tokens in ids:
            # one document per forward: its states must not depend on which other documents
            # were new in the same step (padding changes the matmul shapes, so the rounding),
            # so a resumed run with a fresh cache computes what the uninterrupted one did
            input_ids = torch.tensor([tokens], dtype=torch.long, device=device)
            hidden = tower.model(input_ids=input_ids,
                                 attention_mask=torch.ones_like(input_ids)).last_hidden_state
            states.append(hidden[0].float().cpu())
        return states
