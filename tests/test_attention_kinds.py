"""The decoder's attention kinds (`GeneratorConfig.attention`) against the masked default.

"causal" (SDPA is_causal=True, no mask: what lets FlashAttention run) must give the masked
model's loss and every gradient wherever the masks are all true, and where the only padding
is at the end of the target; padding anywhere else is refused by name. "flex" (the same
mask rule as a FlexAttention block mask) must give the masked loss with padding inside the
sequence (forward only: FlexAttention has no CPU backward). Tolerances: the masked model in
fp32 and float64 (`assert_fp32_close`): another kernel is another fp32 evaluation order.

Run: .venv/bin/pytest tests/test_attention_kinds.py -q       (about 10 s on 2 cores)
"""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch

from rag_mm.model import InMemoryBackend, synthetic_batch
from tests.helpers.parallel import BATCH_SIZE, NUM_DOCS, Reference, assert_fp32_close, tiny_model


def set_attention(model, kind: str) -> None:
    model.config.generator = replace(model.config.generator, attention=kind)
    for block in model.blocks:
        block.attention = kind


def full_documents() -> InMemoryBackend:
    """Documents long enough to fill every one of tiny's 16 document slots."""
    base = InMemoryBackend.random(NUM_DOCS)
    return InMemoryBackend(base.vectors(range(NUM_DOCS)),
                           [" ".join([d["text"]] * 3) for d in base.documents(range(NUM_DOCS))])


def padded_target(batch: dict) -> dict:
    """Rows 0 and 2 end one answer token early (padding at the end of the target only)."""
    mask = batch["target_mask"].clone()
    mask[[0, 2], -1] = 0
    return {**batch, "target_mask": mask}


def run(model, batch, kind: str, *, grad: bool = True):
    set_attention(model, kind)
    model.train()  # also empties the query encoder's text cache (its dtype may have changed)
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grad):
        loss = model(batch)["loss"]
    if grad:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@functools.cache
def setup():
    model, config = tiny_model()
    model.attach(full_documents())
    return model, synthetic_batch(config, BATCH_SIZE, num_docs=NUM_DOCS)


@pytest.mark.parametrize("case", ["all real", "target padded at its end"])
def test_causal_equals_masked_where_only_the_end_is_padded(case):
    model, batch = setup()
    batch = padded_target(batch) if case != "all real" else batch
    key_valid = model.retrieval(batch)[1]
    assert bool(key_valid.all()) == (case == "all real")
    loss, grads = run(model, batch, "causal")
    ref32 = run(model, batch, "masked")
    model.double()
    ref64 = run(model, {k: v.double() if v.is_floating_point() else v for k, v in batch.items()},
                "masked")
    model.float().train()  # the setup is shared: back to fp32, text cache emptied
    assert_fp32_close(loss, Reference(ref32[0], ref64[0]), "loss")
    assert grads.keys() == ref32[1].keys() and len(grads) > 10
    for name, expected in Reference.pair(ref32[1], ref64[1]).items():
        assert_fp32_close(grads[name], expected, name)


@pytest.fixture
def short_documents():
    """The shared model over random documents, shorter than their 16 slots (padding inside
    every sequence); the full ones back afterwards."""
    model, batch = setup()
    full = model.retrieval.backend
    model.attach(InMemoryBackend.random(NUM_DOCS))
    yield model, batch
    model.float().train()
    model.attach(full)


def test_causal_refuses_padding_before_the_target(short_documents):
    model, batch = short_documents
    set_attention(model, "causal")
    with pytest.raises(ValueError, match=r"attention='causal' runs without a mask.*sequence 0 "
                                         r"\(and 7 more\) has padding at position \d+: use "
                                         r"attention='masked' or 'flex'"):
        model(batch)


def test_flex_equals_masked_with_padding_inside_the_sequence(short_documents):
    model, batch = short_documents
    set_attention(model, "masked")
    assert not bool(model.retrieval(batch)[1].all())  # documents padded in the middle
    loss, _ = run(model, batch, "flex", grad=False)
    ref32, _ = run(model, batch, "masked", grad=False)
    model.double()
    ref64, _ = run(model, {k: v.double() if v.is_floating_point() else v for k, v in batch.items()},
                   "masked", grad=False)
    assert_fp32_close(loss, Reference(ref32, ref64), "loss")


def test_unknown_attention_kind_is_refused():
    from rag_mm.config import GeneratorConfig

    with pytest.raises(ValueError, match="attention='flash' is not one of masked, causal, flex"):
        GeneratorConfig(attention="flash")
