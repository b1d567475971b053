"""How the generator reads what was retrieved: the copy pointer and counterfactual answers.

- `CopyPointer`: the answer distribution is a mixture of the LM head and a copy distribution
  over the read documents' tokens (See et al. 2017, "Get To The Point"),

      p(y) = g p_vocab(y) + (1 - g) sum_j a_j [x_j = y],

  `a` the answer position's attention over the document positions, `g` a learned gate; rows
  without any document token use the LM head alone (g = 1). A token never produced as a
  training target can be produced by copying it.
- `substitute_answers`: counterfactual training examples (Longpre et al. 2021): the answer
  inside the gold document and the target are replaced together by another example's
  answer, so the generator cannot gain by answering from memory. The rule is token-level
  and corpus-independent: an example takes part when its target's tokens (without the
  closing [SEP]) appear verbatim and contiguously in its gold document's tokens; otherwise it
  is left unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rag_mm.text_encoder import at_least_fp32


def _safe_log(p: torch.Tensor) -> torch.Tensor:
    """log p, -inf where p == 0, with a zero (not NaN) gradient there."""
    positive = p > 0
    return torch.where(positive, torch.log(torch.where(positive, p, torch.ones_like(p))),
                       torch.full_like(p, -math.inf))


class CopyPointer(nn.Module):
    """Attention of answer positions over copyable positions, and the gate between copying
    and the LM head."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.gate = nn.Linear(hidden_size, 1)

    def forward(self, queries: torch.Tensor, states: torch.Tensor, copy_ids: torch.Tensor):
        """queries (N, P, H) at answer positions, states (N, T, H) everywhere, copy_ids (N, T)
        (the token a position offers, -1 where none) -> attention (N, P, T), log g (N, P) and
        log (1 - g) (N, P)."""
        scores = torch.einsum("nph,nth->npt", self.query(queries), self.key(states))
        scores = scores / math.sqrt(queries.shape[-1])
        source = copy_ids >= 0
        has_source = source.any(dim=1)[:, None]  # (N, 1)
        scores = scores.masked_fill(~source[:, None, :], -math.inf)
        # rows without sources get uniform (unused) weights instead of NaN
        scores = torch.where(has_source[..., None], scores, torch.zeros_like(scores))
        attention = at_least_fp32(scores).softmax(dim=-1)
        gate = at_least_fp32(self.gate(queries).squeeze(-1))
        log_gate = torch.where(has_source, F.logsigmoid(gate), torch.zeros_like(gate))
        log_copy = torch.where(has_source, F.logsigmoid(-gate), torch.full_like(gate, -math.inf))
        return attention, log_gate, log_copy


def target_logprobs(vocab_logp: torch.Tensor, targets: torch.Tensor,
                    pointer: tuple | None, copy_ids: torch.Tensor):
    """log p(target) (N, P) under the mixture, and each source position's share of it
    (N, P, T): (1 - g) a_j [x_j = y] / p(y), the posterior that y was copied from j (None
    without a pointer). `targets` are token ids >= 0 (clamp ignored labels first)."""
    vocab_t = vocab_logp.gather(-1, targets[..., None]).squeeze(-1)
    if pointer is None:
        return vocab_t, None
    attention, log_gate, log_copy = pointer
    match = copy_ids[:, None, :] == targets[..., None]
    copied = attention * match
    copy_term = log_copy + _safe_log(copied.sum(-1))
    logp = torch.logaddexp(log_gate + vocab_t, copy_term)
    shares = copied * torch.exp(log_copy - logp)[..., None]
    return logp, shares


def mixture_logprobs(vocab_logp: torch.Tensor, pointer: tuple | None,
                     copy_ids: torch.Tensor) -> torch.Tensor:
    """The whole distribution (N, P, V): log(g p_vocab + (1 - g) copy), for decoding."""
    if pointer is None:
        return vocab_logp
    attention, log_gate, log_copy = pointer
    n, p, _ = attention.shape
    index = copy_ids.clamp(min=0)[:, None, :].expand(n, p, -1)
    copy = torch.zeros_like(vocab_logp).scatter_add_(-1, index,
                                                     attention * (copy_ids >= 0)[:, None, :])
    return torch.logaddexp(log_gate[..., None] + vocab_logp,
                           log_copy[..., None] + _safe_log(copy))


def find_span(tokens: list[int], span: list[int]) -> int:
    """Index of the first verbatim occurrence of `span` in `tokens`, -1 if none (or empty)."""
    width = len(span)
    if not width:
        return -1
    for start in range(len(tokens) - width + 1):
        if tokens[start:start + width] == span:
            return start
    return -1


def substitute_answers(doc_rows: list[list[int]], keys, gold, answers: list[list[int]], *,
                       rate: float, max_doc_tokens: int, spans: list[list[int]] | None = None,
                       span_rate: float = 0.0) -> tuple[list[list[int]], list[int]]:
    """Counterfactual answers for one batch.

    doc_rows: document tokens per (example, slot), B * k rows in example order; keys (B, k)
    the documents read, gold (B,) each example's gold key (-1: none); answers: each
    example's target tokens without [SEP]. With probability `rate`, an example whose gold
    document is read and holds its answer verbatim gets another example's (different)
    answer, drawn uniformly, spliced into that document in place of its own, if the new
    answer still fits in `max_doc_tokens`; with probability `span_rate` the new answer is
    instead `spans[i]` (a random span, `random_spans`). Returns the new rows and, per example,
    the index of the example whose answer it now has, `batch + i` for its span (-1:
    unchanged). Uses torch's global RNG."""
    batch, k = keys.shape
    donors = [-1] * batch
    rows = list(doc_rows)
    draws = torch.rand(batch).tolist()
    use_span = (torch.rand(batch) < span_rate).tolist() if spans and span_rate > 0 else [False] * batch
    for i in range(batch):
        if draws[i] >= rate or gold[i] < 0:
            continue
        slots = [s for s in range(k) if keys[i, s] == gold[i]]
        if not slots:
            continue
        row = rows[i * k + slots[0]]
        start = find_span(row, answers[i])
        others = [j for j in range(batch) if answers[j] and answers[j] != answers[i]]
        if use_span[i] and spans[i] != answers[i]:
            others = [batch + i]
        if start < 0 or not others:
            continue
        j = others[int(torch.randint(len(others), ()).item())]
        answer = spans[i] if j >= batch else answers[j]
        if start + len(answer) > max_doc_tokens:
            continue
        new = row[:start] + answer + row[start + len(answers[i]):]
        rows[i * k + slots[0]] = new[:max_doc_tokens]
        donors[i] = j
    return rows, donors


def span_vocabulary(tokenizer) -> tuple[list[int], list[int]]:
    """(whole-word pieces, continuation pieces) of a WordPiece-style vocabulary: alphabetic
    pieces of at least 2 letters, `##` marking a continuation; special tokens excluded."""
    special = set(tokenizer.all_special_ids)
    words, pieces = [], []
    for token, index in tokenizer.get_vocab().items():
        if index in special:
            continue
        if token.startswith("##") and token[2:].isalpha() and len(token) >= 4:
            pieces.append(index)
        elif token.isalpha() and token.isascii() and len(token) >= 2:
            words.append(index)
    return sorted(words), sorted(pieces)


def random_spans(count: int, words: list[int], pieces: list[int], max_pieces: int
                 ) -> list[list[int]]:
    """`count` random answers: a whole-word piece, then 0, 1 or 2 continuation pieces (each
    equally likely, at most `max_pieces` in all; no continuation when the vocabulary has
    none). Uses torch's global RNG."""
    spans = []
    extra = torch.randint(0, 3, (count,)).tolist()
    for n in extra:
        span = [words[int(torch.randint(len(words), ()).item())]]
        for _ in range(min(n, max_pieces - 1) if pieces else 0):
            span.append(pieces[int(torch.randint(len(pieces), ()).item())])
        spans.append(span)
    return spans
