"""The retrieval-augmented vision-language model, built as an ordered chain of units.

    retrieval  ->  blocks.0 ... blocks.{L-1}  ->  head

`retrieval` is the whole retrieval sub-graph (query encoder, index search, document
scoring, context assembly, input embeddings) and stays in one pipeline stage. Every unit
passes the same tuple of tensors, the `Carry`:

    hidden (N, T, H)     fused sequences: N = B*k, one per (example, document), for the rag
                         reader; N = B, all k documents in one, for the fid reader
    key_valid (N, T)     which positions are real tokens
    labels (N, T)        next-token targets, -100 where none
    copy_ids (N, T)      the document token each position offers the copy pointer, -1 if none
    doc_logits (B, k)    document scores <q, d> / temperature, differentiable in q
    contrastive (B,)     per-example retriever loss, computed where q is
    gold_slots (B, k)    1 where a slot holds the example's gold document (the rag reader's
                         relevance loss, `ReaderConfig.rerank`), else 0

so the document scores reach the last stage with the activations, and the head returns the
per-example losses. Parallelism is applied from outside; nothing here knows about it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rag_mm.config import ModelConfig
from rag_mm.doc_encoder import DocumentEncoder
from rag_mm.layers import Block, VisionTower, decoder_attention, init_weights
from rag_mm.reader import (
    CopyPointer,
    mixture_logprobs,
    random_spans,
    span_vocabulary,
    substitute_answers,
    target_logprobs,
)
from rag_mm.rescorer import Rescorer
from rag_mm.retriever import (
    InMemoryBackend,
    QueryEncoder,
    RetrievalBackend,
    build_text_encoder,
    contrastive_loss,
)
from rag_mm.text_encoder import at_least_fp32
from rag_mm.tokenizer import load_tokenizer

Carry = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
              torch.Tensor]
IGNORE = -100


@dataclass
class Retrieved:
    """What one search produced for a batch."""

    keys: np.ndarray  # (B, k) documents the generator reads; -1 = none
    candidates: np.ndarray  # (B, C) the over-retrieved list (recall@C)
    doc_logits: torch.Tensor  # (B, k) <q, d> / temperature
    contrastive: torch.Tensor  # (B,) the retriever's loss per example


class RetrievalUnit(nn.Module):
    """Query encoder + search + scoring + context assembly + the generator's input embeddings."""

    def __init__(self, config: ModelConfig, *, pretrained_text: bool = True) -> None:
        super().__init__()
        self.config = config
        text = (pretrained_text_encoder(config) if pretrained_text
                else build_text_encoder(config.retriever.text_encoder, pretrained=False))
        self.query_encoder = QueryEncoder(
            text, config.vision, train_text=config.retriever.train_text_encoder,
            vision_dir=config.retriever.vision_dir,
        )
        gen = config.generator
        self.vision = VisionTower(config.vision)
        self.image_proj = nn.Linear(config.vision.hidden_size, gen.hidden_size)
        self.tok_embed = nn.Embedding(gen.vocab_size, gen.hidden_size)
        self.pos_embed = nn.Embedding(config.num_positions, gen.hidden_size)
        self.tokenizer = load_tokenizer(config.retriever.text_encoder)
        self.doc_encoder = None  # trainable document tower (`train_doc_encoder`)
        if config.retriever.train_doc_encoder:
            doc_text = (pretrained_text_encoder(config) if pretrained_text else
                        build_text_encoder(config.retriever.text_encoder, pretrained=False))
            self.doc_encoder = DocumentEncoder(doc_text, self.tokenizer)
        self.rescorer = None  # second-stage scores of the candidates (`rescore`)
        if config.retriever.rescore:
            self.rescorer = Rescorer(text.dim, config.vision.hidden_size,
                                     heads=config.retriever.rescore_heads)
        self.last_queries: torch.Tensor | None = None  # the latest training batch's q, detached
        self.backend: RetrievalBackend | None = None
        self._doc_tokens: dict[int, list[int]] = {}
        self.doc_token_cache_size = 200_000  # documents whose token ids stay cached
        self._span_vocabulary: tuple[list[int], list[int]] | None = None  # novel_spans
        self.shared_negative_keys = np.zeros(0, dtype=np.int64)
        self._shared: tuple[torch.Tensor, torch.Tensor] | None = None  # (vectors, keys) cache

    def load_pretrained_text(self, unit: nn.Module | None = None) -> None:
        """Load the pretrained text tower's weights and buffers (the local encoder folder
        of the config; default the bundled MiniLM) into this unit's query encoder (and its
        trainable document tower, if any), or into `unit`'s (a copy of this unit): for a unit built on the meta device and
        materialised with `to_empty` (`pretrained_text_encoder`)."""
        unit = unit or self
        towers = [unit.query_encoder.text]
        if unit.doc_encoder is not None:  # the trainable document tower starts from it too
            towers.append(unit.doc_encoder.text)
        loaded = pretrained_text_encoder(self.config)
        source = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
        with torch.no_grad():
            for text in towers:
                for name, tensor in [*text.named_parameters(), *text.named_buffers()]:
                    tensor.copy_(source[name])
                text.path = loaded.path
                text.model.train(loaded.model.training)  # as loaded: eval (no dropout)

    # -- retrieval -------------------------------------------------------------------------
    def attach(self, backend: RetrievalBackend | None, *, check_encoder: bool = True) -> None:
        """Use `backend` for search and document lookup (not a parameter, not saved).

        A backend with `check_encoder` (a `retrieval_index.Index`) must have been built with
        this model's query text encoder (same weights hash, dim, pooling, normalisation), else
        `EncoderMismatchError` names both; `check_encoder=False` skips the check."""
        if backend is not None and check_encoder and hasattr(backend, "check_encoder"):
            identity = self.query_encoder.identity(self.config.retriever.text_encoder)
            backend.check_encoder(identity, what="the model's query text encoder")
        if self.doc_encoder is not None and backend is not None:
            check_text_documents(backend, "train_doc_encoder")
            self.doc_encoder.clear_cache()
        if self.rescorer is not None and backend is not None:
            check_text_documents(backend, "rescore")
            self.rescorer.clear_cache()
        self.backend = backend
        self._doc_tokens.clear()
        self._shared = None

    def set_shared_negatives(self, keys) -> None:
        """Documents that are negatives for every training query (see
        `RetrieverConfig.shared_negatives`): the unique keys >= 0 of `keys`, a fixed sample of
        at most that many. Give the training set's gold keys: never held-out documents."""
        keys = np.unique(np.asarray(keys, dtype=np.int64))
        keys = keys[keys >= 0]
        limit = self.config.retriever.shared_negatives
        if len(keys) > limit:
            keys = np.sort(np.random.default_rng(0).choice(keys, size=limit, replace=False))
        self.shared_negative_keys = keys
        self._shared = None

    def _shared_negatives(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(vectors (P, D), keys (P,)) of the shared negatives, read from the index once per
        backend, device and dtype; none outside training (evaluation uses in-batch only)."""
        if not self.training or not len(self.shared_negative_keys):
            return like.new_zeros(0, like.shape[-1]), torch.zeros(0, dtype=torch.long,
                                                                  device=like.device)
        cached = self._shared
        if cached is None or cached[0].device != like.device or cached[0].dtype != like.dtype:
            keys = self.shared_negative_keys  # stored vectors (a memory bank of the index)
            self._shared = (self._stored_vectors(keys, like),
                            torch.as_tensor(keys, device=like.device))
        return self._shared

    def _require_backend(self) -> RetrievalBackend:
        if self.backend is None:
            raise ValueError(
                f"mode={self.config.mode!r} needs an index: call model.attach(retrieval_index.load(DIR))"
            )
        return self.backend

    def _stored_vectors(self, keys: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        vectors = self._require_backend().vectors(np.maximum(keys, 0))
        return torch.as_tensor(vectors, device=like.device, dtype=like.dtype)

    def _vectors(self, keys: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        """The vectors documents are scored with: fresh from the trainable document tower
        (differentiable), else the index's stored ones."""
        if self.doc_encoder is None:
            return self._stored_vectors(keys, like)
        return self.doc_encoder.encode_keys(keys, self._require_backend().documents, like)

    def retrieve(self, batch: dict[str, torch.Tensor]) -> Retrieved:
        """Encode the queries and pick the documents each example reads."""
        cfg, mode = self.config.retriever, self.config.mode
        batch_size = len(batch["images"])
        if mode == "closed_book":
            zeros = torch.zeros(batch_size, device=batch["images"].device)
            keys = np.full((batch_size, 1), -1, dtype=np.int64)
            return Retrieved(keys, keys, zeros[:, None], zeros)
        text, image = self.query_encoder.features(batch["images"], batch["prompt_ids"],
                                                  batch["prompt_mask"])
        q = self.query_encoder.combine(text, image)
        q2 = None if self.rescorer is None else self.rescorer.query(text, image)
        if self.training:
            self.last_queries = q.detach()  # an index refresh measures staleness on these
        gold_keys = batch["gold_keys"]
        if mode == "gold":
            missing = (gold_keys < 0).nonzero().flatten().tolist()
            if missing:
                raise ValueError(f"mode='gold' needs a gold_id for every example; rows {missing} have none")
            keys = gold_keys.cpu().numpy()[:, None]
            candidates = keys
        elif mode == "random":
            keys = np.random.randint(0, len(self._require_backend()), (batch_size, cfg.top_k))
            candidates = keys
        else:
            # q stays a tensor on its device: a GPU backend searches it there
            _, candidates = self._require_backend().search(q.detach(), cfg.num_candidates)
            if q2 is not None:  # the second stage orders the candidates
                candidates = self._rescored_order(q2, candidates)
            keys = candidates[:, : cfg.top_k]
            if self.training and cfg.gold_in_training:
                keys = with_gold(keys, gold_keys.cpu().numpy())
        doc_logits = self._scores(q if q2 is None else q2, keys, second=q2 is not None)
        negatives = candidates if cfg.hard_negatives else np.full_like(candidates[:, :1], -1)
        shared_vectors, shared_keys = self._shared_negatives(q)
        contrastive = contrastive_loss(
            q,
            self._vectors(gold_keys.cpu().numpy(), q),
            gold_keys,
            self._vectors(negatives, q),
            torch.as_tensor(negatives, device=q.device),
            cfg.temperature,
            shared_vectors,
            shared_keys,
        )
        if q2 is not None:  # the second stage learns from the same positives and negatives
            contrastive = contrastive + contrastive_loss(
                q2,
                self._rescored_vectors(gold_keys.cpu().numpy(), q2),
                gold_keys,
                self._rescored_vectors(negatives, q2),
                torch.as_tensor(negatives, device=q.device),
                cfg.temperature,
                self._rescored_vectors(shared_keys.cpu().numpy(), q2) if len(shared_keys)
                else None,
                shared_keys,
            )
        return Retrieved(keys, candidates, doc_logits, contrastive)

    def _scores(self, q: torch.Tensor, keys: np.ndarray, *, second: bool) -> torch.Tensor:
        """(B, k) document scores <q, d> / T, -inf for key -1: d the rescorer's vectors
        (`second`), else the ones documents are scored with (`_vectors`)."""
        vectors = self._rescored_vectors(keys, q) if second else self._vectors(keys, q)
        logits = torch.einsum("bd,bkd->bk", q, vectors) / self.config.retriever.temperature
        return logits.masked_fill(torch.as_tensor(keys < 0, device=q.device), -torch.inf)

    def _rescored_vectors(self, keys: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        return self.rescorer.documents(keys, self._require_backend().documents,
                                       self.query_encoder.text, self.tokenizer, like)

    def _rescored_order(self, q2: torch.Tensor, candidates: np.ndarray) -> np.ndarray:
        """`candidates` (B, C) sorted by the second stage's score, best first (a stable
        sort: ties keep the search's order; -1 stays last)."""
        with torch.no_grad():
            scores = self._scores(q2, candidates, second=True).float().cpu()
        order = torch.argsort(-scores, dim=1, stable=True).numpy()
        return np.take_along_axis(candidates, order, axis=1)

    # -- context assembly ------------------------------------------------------------------
    def slots(self, retrieved: Retrieved) -> tuple[np.ndarray, torch.Tensor]:
        """(keys, doc_logits) per document slot: as retrieved for the rag reader; for the fid
        reader always `top_k` slots (the sequence layout is fixed), -1 / -inf where a mode
        reads fewer documents (gold, closed_book)."""
        keys, logits = retrieved.keys, retrieved.doc_logits
        slots = self.config.doc_slots
        if self.config.reader.kind != "fid" or keys.shape[1] == slots:
            return keys, logits
        pad = slots - keys.shape[1]
        keys = np.concatenate([keys, np.full((len(keys), pad), -1, dtype=keys.dtype)], axis=1)
        logits = F.pad(logits, (0, pad), value=-torch.inf)
        return keys, logits

    def document_rows(self, keys: np.ndarray) -> list[list[int]]:
        """Token ids of each document in `keys` (row-major); key -1 gives an empty document."""
        flat = [int(k) for k in keys.reshape(-1)]
        self._tokenize_missing(sorted({k for k in flat if k >= 0}))
        return [self._doc_tokens.get(key, []) for key in flat]

    def _document_tokens(self, rows: list[list[int]], device: torch.device):
        """Token ids (N, max_doc_tokens) and their mask from `document_rows`."""
        ids = torch.zeros(len(rows), self.config.max_doc_tokens, dtype=torch.long)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for row, tokens in enumerate(rows):
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = True
        return ids.to(device), mask.to(device)

    def _tokenize_missing(self, keys: list[int]) -> None:
        """Tokenize (and cache) the documents not seen before; the store is read only for them."""
        missing = [k for k in keys if k not in self._doc_tokens]
        if not missing:
            return
        if len(self._doc_tokens) + len(missing) > self.doc_token_cache_size:
            self._doc_tokens.clear()  # these keys' cached tokens too: read again below
            missing = list(keys)
        texts = [d["text"] for d in self._require_backend().documents(np.array(missing))]
        encoded = self.tokenizer(
            texts, add_special_tokens=False, truncation=True, max_length=self.config.max_doc_tokens
        )["input_ids"]
        self._doc_tokens.update(zip(missing, encoded))

    def _image_patches(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self.vision(images))

    def _doc_image_patches(self, documents: list, like: torch.Tensor):
        """(N, P, H) patches of image documents and a (N, P) mask; zeros where no image."""
        from rag_mm.images import to_tensor

        num_patches = self.config.vision.num_patches
        has_image = [d is not None and d.get("image") is not None for d in documents]
        patches = like.new_zeros(len(documents), num_patches, like.shape[-1])
        if any(has_image):
            rows = [i for i, h in enumerate(has_image) if h]
            images = torch.stack([to_tensor(documents[i]["image"], self.config.vision.image_size)
                                  for i in rows]).to(like.device, like.dtype)
            patches[rows] = self._image_patches(images)
        mask = torch.tensor(has_image, device=like.device)[:, None].expand(-1, num_patches)
        return patches, mask

    def _document_slots(self, keys: np.ndarray, rows: list[list[int]], like: torch.Tensor):
        """(B*k, S, H) embedded document slots [doc tokens | doc image], their mask and copy
        ids (the token at each text position, -1 elsewhere)."""
        doc_ids, doc_mask = self._document_tokens(rows, like.device)
        segments, masks = [self.tok_embed(doc_ids)], [doc_mask]
        copy_ids = [doc_ids.masked_fill(~doc_mask, -1)]
        if self.config.use_doc_images:
            flat = keys.reshape(-1)
            found = self._require_backend().documents(np.maximum(flat, 0))
            documents = [doc if key >= 0 else None for key, doc in zip(flat, found)]
            doc_patches, doc_image_mask = self._doc_image_patches(documents, like)
            segments.append(doc_patches)
            masks.append(doc_image_mask)
            copy_ids.append(torch.full(doc_image_mask.shape, -1, dtype=torch.long,
                                       device=like.device))
        return torch.cat(segments, 1), torch.cat(masks, 1), torch.cat(copy_ids, 1)

    def assemble(self, batch: dict[str, torch.Tensor], retrieved: Retrieved,
                 rows: list[list[int]] | None = None) -> Carry:
        """Embed [doc slot | image | prompt | target] per (example, document) (rag reader), or
        [doc slot 1 | ... | doc slot k | image | prompt | target] per example (fid reader).
        `rows`: the documents' tokens (default: as stored, `document_rows`)."""
        cfg = self.config
        keys, doc_logits = self.slots(retrieved)
        batch_size, k = keys.shape
        device = batch["images"].device
        image = self._image_patches(batch["images"])
        docs, doc_mask, doc_copy = self._document_slots(
            keys, self.document_rows(keys) if rows is None else rows, image)
        fused = cfg.reader.kind == "fid"
        per_example = 1 if fused else k  # sequences per example
        if fused:
            docs, doc_mask, doc_copy = (t.reshape(batch_size, k * t.shape[1], *t.shape[2:])
                                        for t in (docs, doc_mask, doc_copy))
        prompt_ids = batch["prompt_ids"][:, : cfg.max_prompt_tokens]
        prompt_mask = batch["prompt_mask"][:, : cfg.max_prompt_tokens].bool()
        prompt_ids = F.pad(prompt_ids, (0, cfg.max_prompt_tokens - prompt_ids.shape[1]))
        prompt_mask = F.pad(prompt_mask, (0, cfg.max_prompt_tokens - prompt_mask.shape[1]))
        targets, target_mask = batch["target_ids"], batch["target_mask"].bool()
        rest = [image, self.tok_embed(prompt_ids), self.tok_embed(targets)]
        rest_masks = [torch.ones(image.shape[:2], dtype=torch.bool, device=device), prompt_mask,
                      target_mask]
        hidden = torch.cat([docs, *(t.repeat_interleave(per_example, 0) for t in rest)], dim=1)
        hidden = hidden + self.pos_embed(self._positions(k if fused else 1, device))
        key_valid = torch.cat([doc_mask, *(m.repeat_interleave(per_example, 0)
                                           for m in rest_masks)], dim=1)
        copy_ids = F.pad(doc_copy, (0, hidden.shape[1] - doc_copy.shape[1]), value=-1)
        if cfg.generator.attention == "causal":
            check_padded_at_end(key_valid, cfg.max_target_tokens)
        labels = torch.full(key_valid.shape, IGNORE, dtype=torch.long, device=device)
        start = hidden.shape[1] - cfg.max_target_tokens
        labels[:, start - 1 : -1] = torch.where(target_mask, targets, IGNORE).repeat_interleave(
            per_example, 0)
        gold = batch["gold_keys"].cpu().numpy()[:, None]
        gold_slots = torch.as_tensor((keys == gold) & (keys >= 0) & (gold >= 0), device=device)
        return (hidden, key_valid, labels, copy_ids, doc_logits, retrieved.contrastive,
                gold_slots.long())

    def _positions(self, slots: int, device: torch.device) -> torch.Tensor:
        """Position ids of [doc slot x `slots` | image | prompt | target]: each slot reuses
        the document positions 0..S-1."""
        slot, total = self.config.doc_slot_len, self.config.num_positions
        return torch.cat([torch.arange(slot, device=device).repeat(slots),
                          torch.arange(slot, total, device=device)])

    def counterfactual(self, batch: dict[str, torch.Tensor], keys: np.ndarray
                       ) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
        """`batch` and the document rows with counterfactual answers (`ReaderConfig.
        counterfactual`, `rag_mm.reader.substitute_answers`): an example whose gold document
        holds its target's tokens verbatim may get another example's answer or a random span
        of word pieces (`ReaderConfig.novel_spans`), in that document and as its target; the
        rest are unchanged."""
        targets, mask = batch["target_ids"], batch["target_mask"].bool()
        sep = self.tokenizer.sep_token_id
        answers = []
        for row, row_mask in zip(targets.tolist(), mask.tolist()):
            tokens = [t for t, m in zip(row, row_mask) if m]
            answers.append(tokens[:-1] if tokens and tokens[-1] == sep else tokens)
        reader, spans = self.config.reader, None
        if reader.novel_spans > 0:
            if self._span_vocabulary is None:
                self._span_vocabulary = span_vocabulary(self.tokenizer)
            spans = random_spans(len(answers), *self._span_vocabulary,
                                 max_pieces=self.config.max_target_tokens - 1)
        rows, donors = substitute_answers(
            self.document_rows(keys), keys, batch["gold_keys"].cpu().numpy(), answers,
            rate=reader.counterfactual, max_doc_tokens=self.config.max_doc_tokens,
            spans=spans, span_rate=reader.novel_spans)
        changed = [i for i, j in enumerate(donors) if j >= 0]
        if changed:
            new_ids, new_mask = targets.clone(), batch["target_mask"].clone()
            for i in changed:
                j = donors[i]
                if j < len(answers):  # another example's answer
                    new_ids[i], new_mask[i] = targets[j], batch["target_mask"][j]
                else:  # a random span, closed by [SEP]
                    row = spans[j - len(answers)] + [sep]
                    new_ids[i], new_mask[i] = 0, 0
                    new_ids[i, : len(row)] = torch.tensor(row, device=targets.device)
                    new_mask[i, : len(row)] = 1
            batch = {**batch, "target_ids": new_ids, "target_mask": new_mask}
        return batch, rows

    def forward(self, batch: dict[str, torch.Tensor], *,
                contrastive_only: bool = False) -> Carry | torch.Tensor:
        """The carry for the first block; with `contrastive_only`, only the per-example
        contrastive loss (B,) of the queries (`RAGModel.retriever_losses`: the warm-up). It
        is a path through `forward` so that whatever wraps the unit's forward (a data
        parallel wrapper's parameter gathering and gradient reduction) also runs for it."""
        retrieved = self.retrieve(batch)
        if contrastive_only:
            return retrieved.contrastive
        if self.training and self.config.reader.kind == "fid" and self.config.reader.shuffle_slots:
            retrieved = shuffled(retrieved)
        if not (self.training and self.config.reader.counterfactual > 0):
            return self.assemble(batch, retrieved)
        batch, rows = self.counterfactual(batch, self.slots(retrieved)[0])
        return self.assemble(batch, retrieved, rows)

    def answer_carry(self, batch: dict[str, torch.Tensor], retrieved: Retrieved,
                     answers: GreedyAnswers) -> Carry:
        """The carry for decoding the next answer token: `batch` with the answer so far."""
        return self.assemble(answers.inputs(batch), retrieved)


def check_padded_at_end(key_valid: torch.Tensor, target_slots: int) -> None:
    """For `attention="causal"` (no mask): every position before the target is real and the
    target is padded only at its end, so each position that is read (labels, the next-token
    position of decoding) attends exactly the keys `causal_mask` gives it."""
    start = key_valid.shape[1] - target_slots
    target = key_valid[:, start:]
    bad = ~key_valid[:, :start].all(dim=1) | (target[:, 1:] & ~target[:, :-1]).any(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        first_pad = int((~key_valid[row]).nonzero()[0])
        raise ValueError(
            f"generator attention='causal' runs without a mask, so a fused sequence may be "
            f"padded only at the end of its target (its last {target_slots} of "
            f"{key_valid.shape[1]} positions); sequence {row} (and {int(bad.sum()) - 1} more) "
            f"has padding at position {first_pad}: use attention='masked' or 'flex', or fill "
            f"every document and prompt slot")


def check_text_documents(backend, setting: str) -> None:
    """A trainable document tower embeds texts: refuse an index whose vectors embed images."""
    encoder = getattr(backend, "manifest", {}).get("encoder", {})
    if encoder.get("kind") not in (None, "text"):
        raise ValueError(
            f"{setting} embeds document texts only, but the index at "
            f"{getattr(backend, 'path', '?')} has {encoder.get('kind')!r} document vectors "
            f"(images embedded); rebuild it with --drop-images or train with "
            f"{setting}=False"
        )


def shuffled(retrieved: Retrieved) -> Retrieved:
    """`retrieved` with each row's documents (keys and scores together) in a random order
    (torch's global RNG)."""
    order = torch.argsort(torch.rand(retrieved.keys.shape), dim=1)
    keys = np.take_along_axis(retrieved.keys, order.numpy(), axis=1)
    logits = retrieved.doc_logits.gather(1, order.to(retrieved.doc_logits.device))
    return replace(retrieved, keys=keys, doc_logits=logits)


def pretrained_text_encoder(config: ModelConfig):
    """The config's pretrained text tower; what its folder lacks (BERT's pooler, unused)
    gets the random values of a fixed seed, so every build loads the same tower."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_text_encoder(config.retriever.text_encoder, pretrained=True)


def with_gold(keys: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """`keys` with each row's last entry replaced by its gold key where the row lacks it."""
    missed = (gold >= 0) & ~(keys == gold[:, None]).any(axis=1)
    keys = keys.copy()
    keys[missed, -1] = gold[missed]
    return keys


class DecoderBlock(Block):
    """A causal pre-norm block that passes the rest of the carry through untouched;
    `attention`: `GeneratorConfig.attention`."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, *,
                 attention: str = "masked") -> None:
        super().__init__(hidden_size, num_heads, mlp_ratio)
        self.attention = attention

    def forward(self, hidden, key_valid, labels, copy_ids, doc_logits, contrastive, gold_slots
                ) -> Carry:
        mask, is_causal = decoder_attention(key_valid, self.attention)
        hidden = super().forward(hidden, mask, is_causal=is_causal)
        return hidden, key_valid, labels, copy_ids, doc_logits, contrastive, gold_slots


class Head(nn.Module):
    """Final norm + LM head (+ copy pointer) -> per-example (generative, retriever) losses.

    rag reader: -log sum_k softmax(s + r)_k p(y | doc_k) - w log softmax(r)_gold, r the
    generator's own relevance logit of each read document (`ReaderConfig.rerank`; without
    it, softmax(s) and no second term); fid reader: -log p(y | doc_1..doc_k),
    and the document scores are trained towards the documents the answer was copied from,
    KL(sources || softmax(s)) (the reader-to-retriever distillation of Izacard & Grave 2021,
    with the copy pointer's posterior as the reader's judgement)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.generator.hidden_size
        self.contrastive_weight = config.retriever.contrastive_weight
        self.max_target_tokens = config.max_target_tokens
        self.fused = config.reader.kind == "fid"
        self.distill_weight = config.reader.distill_weight
        self.doc_slot_len = config.doc_slot_len
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, config.generator.vocab_size, bias=False)
        self.pointer = CopyPointer(hidden) if config.reader.copy else None
        # the relevance logit of a read document (`ReaderConfig.rerank`); built under every
        # setting, so the readers keep the same parameters and a checkpoint loads under either
        self.relevance = nn.Linear(hidden, 1)
        self.rerank = config.reader.rerank
        self.rerank_weight = config.reader.rerank_weight

    def _answer_logprobs(self, hidden, copy_ids, positions: slice):
        """(vocab log-probs (N, P, V), pointer output or None) at `positions`."""
        states = self.norm(hidden)
        queries = states[:, positions]
        vocab_logp = F.log_softmax(at_least_fp32(self.lm_head(queries)), dim=-1)
        pointer = None if self.pointer is None else self.pointer(queries, states, copy_ids)
        return vocab_logp, pointer

    def token_logprobs(self, hidden, labels, copy_ids):
        """log p(label) at the answer positions (N, max_target_tokens), 0 where unlabelled,
        and each copy source's share of it (N, P, T) or None without a pointer."""
        positions = slice(-self.max_target_tokens - 1, -1)
        targets = labels[:, positions]
        labelled = targets != IGNORE
        vocab_logp, pointer = self._answer_logprobs(hidden, copy_ids, positions)
        logp, shares = target_logprobs(vocab_logp, targets.clamp(min=0), pointer, copy_ids)
        return logp.masked_fill(~labelled, 0.0), shares

    def sequence_logprob(self, hidden: torch.Tensor, labels: torch.Tensor,
                         copy_ids: torch.Tensor) -> torch.Tensor:
        """Sum over labelled positions of log p(label), per sequence: (N,)."""
        return self.token_logprobs(hidden, labels, copy_ids)[0].sum(dim=1)

    def distillation(self, shares: torch.Tensor, labels: torch.Tensor,
                     doc_logits: torch.Tensor) -> torch.Tensor:
        """(B,) KL(q || softmax(s)), q the documents' shares of the copied answer tokens
        (fixed targets); 0 for examples that copied nothing."""
        batch_size, k = doc_logits.shape
        labelled = labels[:, -self.max_target_tokens - 1 : -1] != IGNORE
        per_slot = shares.detach()[..., : k * self.doc_slot_len] * labelled[..., None]
        mass = per_slot.reshape(batch_size, -1, k, self.doc_slot_len).sum(dim=(1, 3))
        total = mass.sum(-1, keepdim=True)
        target = mass / total.clamp(min=torch.finfo(mass.dtype).tiny)
        logits = at_least_fp32(doc_logits)
        log_q = F.log_softmax(logits.masked_fill(~torch.isfinite(logits), -1e9), dim=-1)
        kl = (torch.xlogy(target, target) - target * log_q).sum(-1)
        return torch.where(total[:, 0] > 0, kl, torch.zeros_like(kl))

    def relevance_logits(self, hidden: torch.Tensor, doc_logits: torch.Tensor) -> torch.Tensor:
        """(B, k) r: each read document's relevance, from the state at the position that
        predicts the first answer token (it has attended over the document, the picture and
        the prompt, never the answer); -inf where no document was read."""
        batch_size, k = doc_logits.shape
        position = hidden.shape[1] - self.max_target_tokens - 1
        r = at_least_fp32(self.relevance(self.norm(hidden[:, position])).squeeze(-1))
        return r.view(batch_size, k).masked_fill(~torch.isfinite(doc_logits), -torch.inf)

    def mixture_logits(self, hidden: torch.Tensor, doc_logits: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The logits the rag reader mixes its documents by, s (+ r with `rerank`), and r."""
        logits = at_least_fp32(doc_logits)
        if self.fused or not self.rerank:
            return logits, None
        r = self.relevance_logits(hidden, doc_logits)
        return logits + r, r

    @staticmethod
    def rerank_loss(r: torch.Tensor, gold_slots: torch.Tensor) -> torch.Tensor:
        """(B,) -log softmax(r)_gold over the read documents; 0 where the gold one is not read."""
        gold = gold_slots.bool()
        log_q = F.log_softmax(r, dim=-1).masked_fill(~gold, 0.0)  # no -inf * 0 in backward
        return -log_q.sum(-1)

    def forward(self, hidden, key_valid, labels, copy_ids, doc_logits, contrastive, gold_slots
                ) -> torch.Tensor:
        """(B, 2): the generative loss (with `rerank`, plus the weighted relevance loss) and
        the weighted retriever loss per example."""
        batch_size, k = doc_logits.shape
        token_logp, shares = self.token_logprobs(hidden, labels, copy_ids)
        retriever = self.contrastive_weight * at_least_fp32(contrastive)
        if self.fused:
            generative = -token_logp.sum(dim=1)
            retriever = retriever + self.distill_weight * self.distillation(shares, labels,
                                                                            doc_logits)
        else:
            seq_logp = token_logp.sum(dim=1).view(batch_size, k)
            mix, r = self.mixture_logits(hidden, doc_logits)
            generative = -torch.logsumexp(F.log_softmax(mix, dim=-1) + seq_logp, dim=-1)
            if r is not None:
                generative = generative + self.rerank_weight * self.rerank_loss(r, gold_slots)
        return torch.stack([generative, retriever], dim=-1)

    def next_token_logprobs(self, hidden, key_valid, labels, copy_ids, doc_logits, contrastive,
                            gold_slots, *, step: int) -> torch.Tensor:
        """(B, V) log p(answer token `step` | documents, image, prompt, answer[:step]), from a
        carry assembled with the answer so far (`RetrievalUnit.answer_carry`): the rag reader
        mixes its documents' distributions by softmax(s) (softmax(s + r) with `rerank`), the
        fid reader has one."""
        batch_size = doc_logits.shape[0]
        position = hidden.shape[1] - self.max_target_tokens + step - 1  # predicts token `step`
        vocab_logp, pointer = self._answer_logprobs(hidden, copy_ids,
                                                    slice(position, position + 1))
        logp = mixture_logprobs(vocab_logp, pointer, copy_ids)[:, 0]
        if self.fused:
            return logp
        doc_logp = F.log_softmax(self.mixture_logits(hidden, doc_logits)[0], dim=-1)
        return torch.logsumexp(doc_logp[..., None] + logp.view(batch_size, -1, logp.shape[-1]), 1)


@dataclass
class GreedyAnswers:
    """Greedy answers being decoded, one row per example: the tokens so far (0 after [SEP]
    and where not decoded yet), which rows have ended, and the next position."""

    tokens: torch.Tensor  # (B, max_target_tokens)
    done: torch.Tensor  # (B,) bool
    sep_token_id: int
    step: int = 0

    @classmethod
    def start(cls, batch_size: int, length: int, sep_token_id: int,
              device: torch.device) -> GreedyAnswers:
        tokens = torch.zeros(batch_size, length, dtype=torch.long, device=device)
        return cls(tokens, torch.zeros(batch_size, dtype=torch.bool, device=device), sep_token_id)

    @property
    def finished(self) -> bool:
        return self.step == self.tokens.shape[1] or bool(self.done.all())

    def inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`batch` with the answer so far as its target (the rest masked out)."""
        mask = torch.zeros_like(self.tokens, dtype=torch.bool)
        mask[:, : self.step] = True
        return {**batch, "target_ids": self.tokens, "target_mask": mask}

    def choose(self, mixed_logprobs: torch.Tensor) -> torch.Tensor:
        """(B,) the most likely next tokens; 0 for rows that have ended."""
        return torch.where(self.done, torch.zeros_like(self.done, dtype=torch.long),
                           mixed_logprobs.argmax(-1))

    def append(self, next_tokens: torch.Tensor) -> None:
        self.tokens[:, self.step] = next_tokens
        self.done |= next_tokens == self.sep_token_id
        self.step += 1


class RAGModel(nn.Module):
    """Retrieval unit, decoder blocks and head; `forward(batch)` returns the losses."""

    def __init__(self, config: ModelConfig, *, pretrained_text: bool = True) -> None:
        super().__init__()
        self.config = config
        # the seed of every unit's random init (`init_weights`), drawn from torch's RNG, so
        # torch.manual_seed before building fixes the weights on any layout
        self.init_seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())
        gen = config.generator
        self.retrieval = RetrievalUnit(config, pretrained_text=pretrained_text)
        self.blocks = nn.ModuleList(
            DecoderBlock(gen.hidden_size, gen.num_heads, gen.mlp_ratio, attention=gen.attention)
            for _ in range(gen.num_layers)
        )
        self.head = Head(config)
        self.sep_token_id = self.retrieval.tokenizer.sep_token_id  # ends a generated answer
        if gen.tie_embeddings:
            self.head.lm_head.weight = self.retrieval.tok_embed.weight

    # -- the chain a partitioner cuts -------------------------------------------------------
    def units(self) -> list[tuple[str, nn.Module]]:
        blocks = [(f"blocks.{i}", block) for i, block in enumerate(self.blocks)]
        return [("retrieval", self.retrieval), *blocks, ("head", self.head)]

    def colocation_groups(self) -> list[list[str]]:
        """Units that must share a stage: the retrieval sub-graph (one unit), tied weights."""
        groups = [["retrieval"]]
        if self.config.generator.tie_embeddings:
            groups.append(["retrieval", "head"])
        return groups

    def attach(self, backend: RetrievalBackend | None, *, check_encoder: bool = True) -> None:
        self.retrieval.attach(backend, check_encoder=check_encoder)

    def set_shared_negatives(self, keys) -> None:
        self.retrieval.set_shared_negatives(keys)

    def init_weights(self, units: list[str] | None = None) -> None:
        """Random init of every unit, or of the units named in `units`, each from a seed of
        its own (`unit_seed(self.init_seed, name)`), so a unit's values do not depend on
        which other units a process holds (a pipeline rank initialises only its stage's).
        The pretrained text tower is not touched (`RetrievalUnit.load_pretrained_text`)."""
        for name, unit in self.units():
            if units is None or name in units:
                self.init_unit(name, unit)

    def init_unit(self, name: str, unit: nn.Module) -> None:
        """Initialise unit `name` (the model's own, or a copy of it of the same structure):
        - `retrieval`: the vision towers, projections and embeddings (`layers.init_weights`),
          the query encoder's projections (`QueryEncoder.init_weights`), the rescorer's
          (`Rescorer.init_weights`: a copy of the query encoder's);
        - `blocks.i`: `layers.init_weights` with residual projections scaled for the depth;
        - `head`: likewise, less a weight tied to the token embedding (the retrieval unit's).
        """
        depth = self.config.generator.num_layers
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(unit_seed(self.init_seed, name))
            if name == "retrieval":
                for module in [unit.vision, unit.image_proj, unit.tok_embed, unit.pos_embed,
                               unit.query_encoder.vision]:
                    init_weights(module, residual_layers=depth)
                unit.query_encoder.init_weights()
                if unit.rescorer is not None:
                    unit.rescorer.init_weights(unit.query_encoder)
            elif name == "head" and self.config.generator.tie_embeddings:
                for child_name, child in unit.named_children():
                    if child_name != "lm_head":  # the token embedding's, set by `retrieval`
                        init_weights(child, residual_layers=depth)
            else:
                init_weights(unit, residual_layers=depth)

    def tie_weights(self) -> None:
        """Point the LM head at the token embedding again (with `tie_embeddings`, where this
        process holds both units): moving a model off the meta device unties them."""
        if (self.config.generator.tie_embeddings and isinstance(self.head, Head)
                and isinstance(self.retrieval, RetrievalUnit)):
            self.head.lm_head.weight = self.retrieval.tok_embed.weight

    # -- training and inference -------------------------------------------------------------
    def run_chain(self, carry: Carry) -> Carry:
        for block in self.blocks:
            carry = block(*carry)
        return carry

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        losses = self.head(*self.run_chain(self.retrieval(batch))).mean(dim=0)
        return {"loss": losses.sum(), "generator_loss": losses[0], "retriever_loss": losses[1]}

    def retriever_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The query encoder's contrastive loss alone: a cheap warm-up before joint training
        (the generator is not run), so the gold document reaches the top-k sooner. The mean
        of `retriever_losses` over the rows with a gold document."""
        has_gold = batch["gold_keys"] >= 0
        return self.retriever_losses(batch).sum() / has_gold.sum().clamp(min=1)

    def retriever_losses(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) per-example contrastive losses of the query encoder (0 where no gold), in-batch
        negatives within `batch`; through the retrieval unit's `forward`."""
        return self.retrieval(batch, contrastive_only=True)

    def start_answers(self, batch: dict[str, torch.Tensor]) -> GreedyAnswers:
        batch_size, device = len(batch["images"]), batch["images"].device
        return GreedyAnswers.start(batch_size, self.config.max_target_tokens, self.sep_token_id,
                                   device)

    @torch.no_grad()
    def generate(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Retrieved]:
        """Greedy answer tokens (B, max_target_tokens), mixing documents at every step:
        next = argmax_y sum_k softmax(s + r)_k p(y | doc_k, image, prompt, y_<t) (rag reader), or
        argmax_y p(y | doc_1..doc_k, image, prompt, y_<t) (fid reader). Each step reruns
        the whole chain on the answer so far; a pipeline drives the same pieces stage by stage
        (`trainers.parallel.answer`)."""
        retrieved = self.retrieval.retrieve(batch)
        answers = self.start_answers(batch)
        while not answers.finished:
            carry = self.run_chain(self.retrieval.answer_carry(batch, retrieved, answers))
            answers.append(answers.choose(self.head.next_token_logprobs(*carry, step=answers.step)))
        return answers.tokens, retrieved


def build_model(config: ModelConfig, *, backend: RetrievalBackend | None = None) -> RAGModel:
    """Build and initialise a model. Under `torch.device("meta")` nothing is loaded or
    initialised (the text tower is built from its config): to cost large sizes, or to
    materialise later only the units a process runs (`to_empty`, then `init_weights` /
    `init_unit` and `RetrievalUnit.load_pretrained_text` for the units it holds)."""
    on_meta = torch.empty(0).device.type == "meta"
    model = RAGModel(config, pretrained_text=not on_meta)
    if not on_meta:
        model.init_weights()
    model.attach(backend)
    return model


def unit_seed(seed: int, name: str) -> int:
    """The seed of unit `name`'s random init, from the model's `init_seed`."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def synthetic_batch(config: ModelConfig, batch_size: int, *, seed: int = 0,
                    num_docs: int | None = None) -> dict[str, torch.Tensor]:
    """A random but well-formed batch (gold keys < num_docs), for profiling and tests."""
    g = torch.Generator().manual_seed(seed)
    vision = config.vision
    prompt_len, target_len = config.max_prompt_tokens, config.max_target_tokens
    prompt_ids = torch.randint(1000, 5000, (batch_size, prompt_len), generator=g)
    prompt_ids[:, 0] = 101  # [CLS]
    target_ids = torch.randint(1000, 5000, (batch_size, target_len), generator=g)
    target_ids[:, -1] = 102  # [SEP]
    gold = torch.randint(0, num_docs or 1, (batch_size,), generator=g)
    return {
        "images": torch.rand(batch_size, vision.num_channels, vision.image_size, vision.image_size,
                             generator=g) * 2 - 1,
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "target_ids": target_ids,
        "target_mask": torch.ones_like(target_ids),
        "gold_keys": gold if num_docs else torch.full((batch_size,), -1),
    }


__all__ = ["Carry", "GreedyAnswers", "InMemoryBackend", "RAGModel", "build_model",
           "synthetic_batch"]
