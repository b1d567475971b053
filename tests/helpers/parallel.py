"""The tiny RAG model and module, single-process references and fp32 comparisons shared by
the pipeline / tensor / strategy / checkpoint / answer tests (tests/distributed/)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

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


# Seeds torch's RNG right before a training step, in one process and in the pipeline
# workers alike: training forwards draw from it (the fid reader's slot order, counterfactual
# answers), and building a pipeline runs a forward of its own.
STEP_SEED = 1


def tiny_model(seed: int = 0, *, tied: bool = False, **overrides):
    """The tiny RAG model over random documents; `overrides`: ModelConfig fields."""
    torch.manual_seed(seed)
    config = model_config("tiny", **overrides)
    if tied:
        config = replace(config, generator=replace(config.generator, tie_embeddings=True))
    return build_model(config, backend=InMemoryBackend.random(NUM_DOCS)), config


@functools.cache
def reference_step(micro: int, tied: bool = False, **overrides) -> dict:
    """Single-process training: gradient accumulation over the same micro-batches, one AdamW
    step. "loss", "norm" and {name: Reference} "grads" and "values": the fp32 result, the
    same computation in float64 (the truth it approximates) and the a-priori part of its
    error bound (see `assert_fp32_close`)."""
    run32, run64 = _accumulated_step(micro, torch.float32, tied, overrides), \
        _accumulated_step(micro, torch.float64, tied, overrides)
    gamma = micro * FP32_UNIT  # the micro-batch sum, in any order: gamma_m * sum_i |g_i|
    grads = {n: Reference(g, run64["grads"][n], gamma * run64["terms"][n])
             for n, g in run32["grads"].items()}
    # AdamW's first step moves p by lr * g / (|g| + eps) (bias-corrected): d/dg <= lr / eps, so
    # a gradient off by e moves its value by at most (lr / eps) * e (plus the value's rounding).
    values = {n: Reference(v, run64["values"][n],
                           LR / ADAM_EPS * grads[n].allowed() if n in grads else 0.0)
              for n, v in run32["values"].items()}
    return {"loss": run32["loss"], "norm": run32["norm"], "grads": grads, "values": values}


def _accumulated_step(micro: int, dtype: torch.dtype, tied: bool, overrides: dict) -> dict:
    model, config = tiny_model(tied=tied, **overrides)
    model.to(dtype)
    batch = synthetic_batch(config, BATCH_SIZE, num_docs=NUM_DOCS)
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    size = BATCH_SIZE // micro
    total = 0.0
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    terms = {n: torch.zeros_like(p) for n, p in params.items()}  # sum_i |g_i|
    torch.manual_seed(STEP_SEED)  # the step's draws start here, as in the pipeline workers
    for i in range(micro):
        before = {n: p.grad.clone() if p.grad is not None else 0 for n, p in params.items()}
        loss = model({k: v[i * size:(i + 1) * size] for k, v in batch.items()})["loss"] / micro
        loss.backward()
        total += loss.item()
        for n, p in params.items():
            if p.grad is not None:
                terms[n] += (p.grad - before[n]).abs()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    norm = torch.nn.utils.get_total_norm(list(grads.values()))
    torch.optim.AdamW(list(params.values()), lr=LR, eps=ADAM_EPS).step()
    values = {n: p.detach().clone() for n, p in params.items()}
    return {"loss": total, "grads": grads, "values": values, "norm": norm.item(),
            "terms": terms}


FP32_UNIT = 2.0 ** -24  # u: fp32's unit roundoff (round to nearest)
MARGIN = 8.0  # two fp32 evaluations in different orders: errors of one size, not one value


@dataclass(frozen=True)
class Reference:
    """One result of the single-process run: `fp32` as the parity test computes it, `exact`
    the same maths in float64, `bound` (elementwise or scalar) the a-priori error terms
    that the fp32 reference's own measured error does not cover."""

    fp32: torch.Tensor
    exact: torch.Tensor
    bound: torch.Tensor | float = 0.0

    @classmethod
    def pair(cls, fp32: dict, exact: dict) -> dict[str, Reference]:
        """{name: Reference} of two runs' {name: tensor} (same keys), no a-priori terms."""
        assert fp32.keys() == exact.keys(), fp32.keys() ^ exact.keys()
        return {n: cls(t, exact[n]) for n, t in fp32.items()}

    def allowed(self) -> torch.Tensor:
        """|fp32 result - exact| allowed elementwise (float64): see `assert_fp32_close`."""
        exact = self.exact.double()
        measured = (self.fp32.double() - exact).abs().max()
        return MARGIN * (measured + FP32_UNIT * exact.abs()) + self.bound


def assert_fp32_close(actual: torch.Tensor, ref: Reference, name: str) -> None:
    """`actual` (a parallel fp32 result) is the single-process result up to fp32 error.

    Derivation. Both the parallel run and the single-process `ref.fp32` are fp32 evaluations
    of the same maths in other orders (micro-batch sums, tensor-parallel partial sums, FSDP
    reduce-scatters, other kernels' blockings), so each is off from the float64 truth
    `ref.exact` by rounding error of one size but not one value. The allowed error of each
    entry is

        MARGIN * (max |ref.fp32 - ref.exact| + u |ref.exact|) + ref.bound

    - max |ref.fp32 - ref.exact| over the tensor: the fp32 error this computation has on this
      machine (its kernels and thread count), measured rather than assumed; its max over
      the tensor, since which entries a summation order rounds worst differs between runs;
    - u |exact| (u = 2^-24): the rounding of the result itself, a floor where the reference
      happens to be exact (tensors of a few entries);
    - MARGIN = 8: the two evaluations' errors are draws of one size, not one value. Their
      ratio, measured over every tensor of tests/distributed/test_pipeline.py, has median
      1.1-1.3 and reached 4.8 (dualpipev, the vision tower: there one upstream error, that
      of the query's gradient, dominates every tensor, so the tensors do not average it
      out); 8 leaves room for that on other machines;
    - ref.bound: the a-priori terms of what the parallel run sums differently: for a
      gradient accumulated over m micro-batches (or replicas), reordering that sum costs at
      most gamma_m * sum_i |g_i| with gamma_m ~ m u (the recursive-summation bound
      gamma_{m-1} sum |x_i|, Higham, Accuracy and Stability of Numerical Algorithms, ch. 4);
      for a value after AdamW's first step, (lr / eps) times the gradient's allowed error
      (the step's derivative in g is at most lr / eps). `reference_step` fills these in;
      a Lightning run's Reference (`Reference.pair` of an fp32 and a `precision="64-true"`
      one-process run) has the measured term alone.

    It still catches bugs (measured on every case of test_pipeline.py): a gradient scaled
    by 1.001 or a micro-batch left out fails every case; see trainers/parallel/README.md."""
    expected = ref.exact.double()
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    error = (actual.double() - expected).abs()
    allowed = ref.allowed().expand_as(error)
    worst = int((error - allowed).argmax())
    if error.flatten()[worst] > allowed.flatten()[worst]:
        raise AssertionError(
            f"{name}: off from the float64 truth by {error.flatten()[worst].item():.3g} "
            f"with {allowed.flatten()[worst].item():.3g} allowed (entry {worst}; the fp32 "
            f"reference is off by at most {(ref.fp32.double() - expected).abs().max().item():.3g}"
            f"; greatest error {error.max().item():.3g})")


def make_module(*, tied: bool = False):
    from trainers.module import RAGModule

    torch.manual_seed(0)
    module = RAGModule(size="tiny", mode="rag")
    if tied:  # RAGModule has no flag for it: rebuild its model with tied embeddings
        generator = replace(module.config.generator, tie_embeddings=True)
        module.config = replace(module.config, generator=generator)
        torch.manual_seed(0)
        with torch.device("meta"):  # as RAGModule builds it
            module.model = build_model(module.config)
    module.model.attach(InMemoryBackend.random(NUM_DOCS))
    # Adam's step is lr * m / (sqrt(v) + eps): with eps >> fp32 noise, gradients ~0 (summation
    # order) do not become +-lr updates, and several steps stay comparable. Parameters are
    # read when Lightning asks, after the strategy kept this rank's units.
    module.configure_optimizers = lambda: torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad], lr=LR, eps=ADAM_EPS)
    return module


def make_scheduled_module(**hparams):
    """The tiny `RAGModule` with its own optimizer groups and LR schedule (`hparams`: e.g.
    `retriever_warmup_steps`), only AdamW's eps raised to ADAM_EPS (see there)."""
    from trainers.module import RAGModule

    torch.manual_seed(0)
    module = RAGModule(size="tiny", mode="rag", lr=LR, warmup_steps=2, **hparams)
    module.model.attach(InMemoryBackend.random(NUM_DOCS))
    configure = module.configure_optimizers

    def configure_optimizers():
        config = configure()
        for group in config["optimizer"].param_groups:
            group["eps"] = ADAM_EPS
        return config

    module.configure_optimizers = configure_optimizers
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
