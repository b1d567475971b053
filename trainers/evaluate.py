"""Held-out evaluation: exact match per document source, and retriever recall@k.

`evaluate(...)` returns a JSON-able dict; `format_table(...)` prints it as Markdown.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rag_mm.model import RAGModel, build_model
from trainers.module import RAGModule, exact_match

SYSTEMS = {  # row label -> (which checkpoint, mode)
    "closed-book": ("closed_book", "closed_book"),
    "random document": ("rag", "random"),
    "RAG (retrieved top-k)": ("rag", "rag"),
    "gold document (oracle)": ("rag", "gold"),
}


@torch.no_grad()
def exact_match_rate(model: RAGModel, loader: DataLoader, desc: str) -> float:
    model.eval()
    hits = []
    for batch in tqdm(loader, desc=desc, leave=False):
        tokens, _ = model.generate(batch)
        hits.append(exact_match(tokens, batch["target_ids"], batch["target_mask"]))
    return float(torch.cat(hits).float().mean())


@torch.no_grad()
def recall_at(model: RAGModel, loader: DataLoader, ks: list[int], desc: str) -> dict[str, float]:
    """Fraction of examples whose gold document is in the first k retrieved, per k."""
    model.eval()
    mode = model.config.mode
    model.config.mode = "rag"
    hits = {k: [] for k in ks}
    try:
        for batch in tqdm(loader, desc=desc, leave=False):
            gold = batch["gold_keys"].numpy()
            candidates = model.retrieval.retrieve(batch).candidates
            for k in ks:
                hits[k].append((candidates[:, :k] == gold[:, None]).any(axis=1)[gold >= 0])
    finally:
        model.config.mode = mode
    return {f"recall@{k}": float(np.mean(np.concatenate(h))) for k, h in hits.items()}


@torch.no_grad()
def reader_recall(model: RAGModel, loader: DataLoader, desc: str) -> float:
    """Fraction of examples whose gold document gets the largest mixture weight among the
    top-k the reader reads: softmax(s + r) with the rag reader's `rerank`, else the
    retriever's own top-1 (then equal to recall@1)."""
    model.eval()
    mode = model.config.mode
    model.config.mode = "rag"
    hits = []
    try:
        for batch in tqdm(loader, desc=desc, leave=False):
            retrieved = model.retrieval.retrieve(batch)
            carry = model.run_chain(
                model.retrieval.answer_carry(batch, retrieved, model.start_answers(batch)))
            keys, _ = model.retrieval.slots(retrieved)
            mix, _ = model.head.mixture_logits(carry[0], carry[4])
            best = keys[np.arange(len(keys)), mix.argmax(-1).cpu().numpy()]
            gold = batch["gold_keys"].numpy()
            hits.append((best == gold)[gold >= 0])
    finally:
        model.config.mode = mode
    return float(np.mean(np.concatenate(hits)))


def untrained_like(module: RAGModule, seed: int) -> RAGModel:
    """The model as it was before training: same config, same seed, fresh init."""
    torch.manual_seed(seed)
    model = build_model(replace(module.config, mode="rag"))
    model.attach(module.model.retrieval.backend)
    return model


def evaluate(checkpoints: dict[str, RAGModule], loader: DataLoader, *, seed: int = 0) -> dict:
    """`checkpoints`: {"rag": module, "closed_book": module (optional)} -> results dict."""
    rag = checkpoints["rag"].model
    ks = sorted({1, rag.config.retriever.top_k, rag.config.retriever.num_candidates})
    results = {"systems": {}, "num_examples": len(loader.dataset)}
    for label, (which, mode) in SYSTEMS.items():
        if which not in checkpoints:
            continue
        module = checkpoints[which]
        previous = module.config.mode
        module.set_mode(mode)
        np.random.seed(seed)  # the random-document row draws the same documents every time
        try:
            results["systems"][label] = {"exact_match": exact_match_rate(module.model, loader, label)}
        finally:
            module.set_mode(previous)
    results["retriever"] = {
        "before training": recall_at(untrained_like(checkpoints["rag"], seed), loader, ks, "recall (init)"),
        "after training": recall_at(rag, loader, ks, "recall (trained)"),
    }
    if rag.config.reader.kind == "rag":
        results["reader@1"] = reader_recall(rag, loader, "reader@1")
    return results


def format_table(results: dict) -> str:
    lines = [f"Held-out entities: {results['num_examples']} examples", "",
             "| system | exact match |", "| --- | --- |"]
    lines += [f"| {name} | {row['exact_match']:.1%} |" for name, row in results["systems"].items()]
    recall = results["retriever"]
    ks = list(next(iter(recall.values())))
    lines += ["", "| query encoder | " + " | ".join(ks) + " |", "| --- |" + " --- |" * len(ks)]
    lines += [f"| {when} | " + " | ".join(f"{row[k]:.1%}" for k in ks) + " |"
              for when, row in recall.items()]
    if "reader@1" in results:
        lines += ["", (f"reader@1 (the gold document has the largest mixture weight among "
                       f"the top-k read): {results['reader@1']:.1%}")]
    return "\n".join(lines)
