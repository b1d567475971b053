"""Small corpora, tiny random BERT encoder folders and a network-free embedder for the
index tests (the `tiny_dirs` fixture in tests/conftest.py builds on these)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from transformers import BertConfig

from rag_mm.text_encoder import TextEncoder
from rag_mm.tokenizer import load_tokenizer

_VOCABULARY = """
river stone light ancient market signal harbor quiet engine forest glass copper red
blue green tall short old new bright
"""
WORDS = _VOCABULARY.split()


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "id": f"doc-{i}",
            "text": f"doc {i} " + " ".join(rng.choice(WORDS, size=rng.integers(3, 25))),
        }
        for i in range(n)
    ]


def save_tiny_encoder(folder, seed: int):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    return TextEncoder.from_config(config).save_pretrained(folder, tokenizer=load_tokenizer())


class HashEmbedder:
    """A DocumentEmbedder without a network: unit vectors seeded by the text (images welcome)."""

    def __init__(self, dim: int = 32):
        self.dim = dim

    def identity(self) -> dict:
        return {"kind": "hash", "name": "hash", "dim": self.dim}

    def embed(self, texts, images) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, (text, image) in enumerate(zip(texts, images)):
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            out[i] = np.random.default_rng(seed).standard_normal(self.dim)
            if image is not None:
                out[i, 0] += float(np.asarray(image).mean()) / 64
        return out / np.linalg.norm(out, axis=1, keepdims=True)
