"""The tiny RAG model and module, single-process references and fp32 comparisons shared by
the pipeline / tensor / strategy / checkpoint / answer tests (tests/distributed/)."""

from __future__ import annotations

import functools
from dataclasses import replace

import lightning as L
import torch

from rag_mm.config import model_config
from rag_mm.model import InMemoryBackend, build_model, synthetic_batch
from trainers.parallel.strategy import PipelineStrategy

BATCH_SIZE = 4
NUM_DOCS = 40
STEPS = 3
LR = 1e-2
# Adam's first step is lr * g / (|g| + eps): eps >> fp32 noise keeps g ~ 0 entries comparable
ADAM_EPS = 1e-3
TWO = [["retrieval", "blocks.0"], ["blocks.1", "head"]]
ALL = [[unit for stage in TWO for unit in stage]]


def tiny_model(seed: int = 0, *, tied: bool = False, **overrides):
    """The tiny RAG model over random documents; `overrides`: ModelConfig fields."""
    torch.manual_seed(seed)
    config = model_config("tiny", **overrides)
    if tied:
        config = replace(config, generator=replace(config.generator, tie_embeddings=True))
    return build_model(config, backend=InMemoryBackend.random(NUM_DOCS)), config


@functools.cache
def reference_step(micro: int, tied: bool = False, **overrides) -> dict:
    """Single-process training: gradient accumulation over the same micro-batches."""
    model, config = tiny_model(tied=tied, **overrides)
    batch = synthetic_batch(config, BATCH_SIZE, num_docs=NUM_DOCS)
    size = BATCH_SIZE // micro
    total = 0.0
    for i in range(micro):
        loss = model({k: v[i * size:(i + 1) * size] for k, v in batch.items()})["loss"] / micro
        loss.backward()
        total += loss.item()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    norm = torch.nn.utils.get_total_norm(list(grads.values()))
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, eps=ADAM_EPS).step()
    values = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"loss": total, "grads": grads, "values": values, "norm": norm.item()}


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor, name: str, *,
                      slack: float = 0.0) -> None:
    """Equal up to fp32 summation order: relative 1e-5, absolute 1e-5 of the tensor's scale
    (micro-batch sums cancel in small entries). After an Adam step, `slack` allows for
    g / (|g| + eps) amplifying that noise where g ~ 0 (a wrong gradient moves by ~lr)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale + 1e-8 + slack,
                               msg=lambda detail: f"{name}: {detail}")


def make_module(*, tied: bool = False):
    from trainers.module import RAGModule

    torch.manual_seed(0)
    module = RAGModule(size="tiny", mode="rag")
    if tied:  # RAGModule has no flag for it: rebuild its model with tied embeddings
        generator = replace(module.config.generator, tie_embeddings=True)
        module.config = replace(module.config, generator=generator)
        torch.manual_seed(0)
        module.model = build_model(module.config)
    module.model.attach(InMemoryBackend.random(NUM_DOCS))
    # Adam's step is lr * m / (sqrt(v) + eps): with eps >> fp32 noise, gradients ~0 (summation
    # order) do not become +-lr updates, and several steps stay comparable. Parameters are
    # read when Lightning asks, after the strategy kept this rank's units.
    module.configure_optimizers = lambda: torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad], lr=LR, eps=ADAM_EPS)
    return module


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP / TP shard (collective over its mesh)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class Recorder(L.Callback):
    """Per step: the logged loss, and the gradient norm over the whole model before clipping;
    with `first_step=True` also every gradient (before clipping) and value after step one,
    gathered whole from the shards (a collective: every rank records)."""

    def __init__(self, *, first_step: bool = False) -> None:
        self.losses: list[float] = []
        self.norms: list[float] = []
        self.val_losses: list[float] = []
        self.first_step = first_step
        self.grads: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.val_losses.append(trainer.callback_metrics["val/loss"].item())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for p in pl_module.parameters() if p.grad is not None]
        if isinstance(trainer.strategy, PipelineStrategy):
            norm = trainer.strategy.grad_norm(params)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        self.norms.append(norm.item())
        if self.first_step and len(self.norms) == 1:
            self.grads = {n: full_tensor(p.grad).clone() for n, p in pl_module.named_parameters()
                          if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(trainer.callback_metrics["train/loss"].item())
        if self.first_step and len(self.losses) == 1:
            self.values = {n: full_tensor(p.detach()).clone()
                           for n, p in pl_module.named_parameters() if p.requires_grad}


def make_batches(module, batch_size: int) -> list[dict]:
    return [synthetic_batch(module.config, batch_size, seed=i, num_docs=NUM_DOCS)
            for i in range(STEPS + 1)]
