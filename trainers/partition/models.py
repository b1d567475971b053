"""Profiles of the project's own model (``rag_mm``), measured or analytic.

Imports ``rag_mm`` only when called, so the partitioner itself needs nothing but torch.
"""

from __future__ import annotations

import torch

from trainers.partition.costs import DeviceSpec
from trainers.partition.trace import Profile, trace_model


def profile_rag(name: str, *, analytic: bool, batch_size: int = 2, runs: int = 5,
                num_docs: int = 64, device: DeviceSpec | None = None, seed: int = 0,
                **overrides) -> Profile:
    """Trace ``rag_mm`` size ``name`` on one synthetic micro-batch of ``batch_size``.

    analytic: build on the meta device and cost from shapes (any size, on a CPU); else
    build for real on the CPU and time ``runs`` passes.
    overrides: ``ModelConfig`` fields to replace (e.g. a bigger ``generator``).
    """
    from rag_mm.config import model_config
    from rag_mm.model import InMemoryBackend, build_model, synthetic_batch

    config = model_config(name, **overrides)
    backend = InMemoryBackend.random(num_docs, seed=seed)
    torch.manual_seed(seed)
    if analytic:
        with torch.device("meta"):
            model = build_model(config, backend=backend)
    else:
        model = build_model(config, backend=backend)
    batch = synthetic_batch(config, batch_size, seed=seed, num_docs=num_docs)
    return trace_model(model, batch, runs=runs, analytic=analytic, device=device,
                       batch_size=batch_size)


def gpt_shape(name: str):
    """The decoder of ``rag_mm`` size ``name`` as a ``gpt.GPTShape`` (its fused sequence
    length; torch's SDPA attention, so no stored scores, at FlashAttention-2's rate: SDPA's
    flash backend is FlashAttention-2 since torch 2.2; no dropout), and the sequences a
    training example becomes (one per document read)."""
    from rag_mm.config import model_config
    from trainers.partition.gpt import GPTShape

    config = model_config(name)
    gen = config.generator
    shape = GPTShape(num_layers=gen.num_layers, hidden=gen.hidden_size, num_heads=gen.num_heads,
                     seq_len=config.seq_len, vocab=gen.vocab_size,
                     ffn_hidden=int(gen.mlp_ratio * gen.hidden_size), flash_attention=True,
                     flash_kernel="flash2", dropout=False, tied_embeddings=gen.tie_embeddings)
    return shape, config.docs_per_query
