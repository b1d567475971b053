"""Activation checkpointing under a pp=2 gloo pipeline equals one process without it.

Two processes: (1) the pipeline layer with 1F1B (every block and the head checkpointed) and
interleaved 1F1B over 4 stages (every 2nd block: blocks.1): the loss, every gradient and every value
after one AdamW step within fp32 error of single-process training over the same
micro-batches (`assert_fp32_close`); the units' recomputes are counted, so an unapplied
setting fails. (2) `Trainer.fit` with `PipelineStrategy(activation_checkpointing="every")`
(the strategy's own path: the partitioner plans for it, each rank applies it to its
units at setup), 3 steps with clipping:
the logged losses and gradient norms and the final parameters equal a one-process Trainer
without checkpointing.

Run: .venv/bin/pytest tests/distributed/test_activation_checkpointing.py -q   (about 40 s on 2 cores)
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from rag_mm.model import synthetic_batch
from tests.helpers.parallel import (
    ADAM_EPS,
    BATCH_SIZE,
    LR,
    NUM_DOCS,
    STEPS,
    TWO,
    Recorder,
    assert_fp32_close,
    make_batches,
    make_module,
    reference_step,
    tiny_model,
)
from trainers.parallel.checkpointing import apply_activation_checkpointing
from trainers.parallel.pipeline import PipelineConfig, build_pipeline

FOUR = [["retrieval"], ["blocks.0"], ["blocks.1"], ["head"]]
# name -> (schedule, stages, setting, units checkpointed)
CASES = {"1f1b": ("1f1b", TWO, ["blocks.0", "blocks.1", "head"]),
         "interleaved_1f1b": ("interleaved_1f1b", FOUR, 2)}
MICRO = 2


def _fit(module, recorder: Recorder, **trainer_kwargs) -> None:
    trainer = L.Trainer(accelerator="cpu", max_steps=STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False,
                        gradient_clip_val=1.0, callbacks=[recorder], **trainer_kwargs)
    batches = make_batches(module, BATCH_SIZE)[:STEPS]
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))


def _worker(rank: int, world_size: int, out_dir: str) -> None:
    from trainers.parallel.mesh import ParallelDims
    from trainers.parallel.strategy import PipelineStrategy

    mesh = ParallelDims(world_size=world_size, pipeline_parallel_size=world_size).build_mesh("cpu")
    for name, (schedule, stages, setting) in CASES.items():
        model, config = tiny_model()
        checkpointed = apply_activation_checkpointing(model, setting)
        units = dict(model.units())
        attn = [units[n].attn if n != "head" else units[n].norm for n in checkpointed]
        calls = [0] * len(attn)
        for i, module in enumerate(attn):
            module.register_forward_hook(lambda *_, i=i, calls=calls:
                                         calls.__setitem__(i, calls[i] + 1))
        batch = synthetic_batch(config, BATCH_SIZE, num_docs=NUM_DOCS)
        pipe = build_pipeline(model, PipelineConfig(stages=stages, schedule=schedule,
                                                    num_microbatches=MICRO),
                              batch, pp_group=mesh["pp"].get_group(), device=torch.device("cpu"))
        local = {n for m in pipe.modules for n in m.unit_names}
        before = list(calls)  # the shape-finding run
        losses = pipe.step(batch)
        runs = {n: calls[i] - before[i] for i, n in enumerate(checkpointed) if n in local}
        grads = {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}
        torch.optim.AdamW([p for p in pipe.parameters() if p.requires_grad], lr=LR,
                          eps=ADAM_EPS).step()
        values = {n: p.detach().clone() for n, p in pipe.named_parameters() if p.requires_grad}
        torch.save({"losses": losses, "grads": grads, "values": values, "runs": runs},
                   Path(out_dir) / f"{name}_{rank}.pt")
    module, recorder = make_module(), Recorder()
    strategy = PipelineStrategy(partition="auto", pipeline_parallel_size=2,
                                num_microbatches=MICRO, activation_checkpointing="every")
    _fit(module, recorder, devices=world_size, strategy=strategy)
    flagged = [n for n, unit in module.model.units() if getattr(unit, "activation_checkpointed", 0)]
    values = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    torch.save({"losses": recorder.losses, "norms": recorder.norms, "values": values,
                "flagged": flagged}, Path(out_dir) / f"fit_{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from trainers.parallel.local import run_local

    out_dir = tmp_path_factory.mktemp("checkpointing")
    run_local(_worker, 2, str(out_dir))
    return out_dir


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_checkpointed_pipeline_matches_single_process(case, runs):
    ref = reference_step(MICRO)
    results = [torch.load(runs / f"{case}_{r}.pt") for r in range(2)]
    recomputed = {n: k for r in results for n, k in r["runs"].items()}
    expected_units = {"1f1b": ["blocks.0", "blocks.1", "head"], "interleaved_1f1b": ["blocks.1"]}
    # every checkpointed unit: a forward and one recompute per micro-batch
    assert recomputed == {n: 2 * MICRO for n in expected_units[case]}
    losses = [r["losses"] for r in results if r["losses"] is not None]
    assert losses[0].mean(0).sum().item() == pytest.approx(ref["loss"], rel=1e-6)
    for key in ("grads", "values"):
        got = {n: v for r in results for n, v in r[key].items()}
        assert got.keys() == ref[key].keys()
        for name, expected in ref[key].items():
            assert_fp32_close(got[name], expected, f"{key} {name}")


@pytest.mark.distributed
def test_strategy_fit_with_checkpointing_matches_one_process(runs):
    results = [torch.load(runs / f"fit_{r}.pt") for r in range(2)]
    assert sorted(n for r in results for n in r["flagged"]) == ["blocks.0", "blocks.1"]
    module, recorder = make_module(), Recorder()
    module.configure_model()  # built on the meta device: materialised in this process
    initial = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    size = BATCH_SIZE // MICRO

    def microbatched_step(batch, batch_idx):  # in-batch negatives are per micro-batch
        parts = [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(MICRO)]
        loss = sum(module.model(part)["loss"] for part in parts) / MICRO
        module.log("train/loss", loss)
        return loss

    module.training_step = microbatched_step
    _fit(module, recorder, devices=1)
    for result in results:  # fp32, another summation order (micro-batches): as test_strategy
        assert result["losses"] == pytest.approx(recorder.losses, rel=1e-5)
        assert result["norms"] == pytest.approx(recorder.norms, rel=1e-4)
    assert min(recorder.norms) > 1.0  # clipping was active
    values = {n: v for r in results for n, v in r["values"].items()}
    expected = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    assert values.keys() == expected.keys()
    moved = sum(((expected[n] - initial[n]) ** 2).sum() for n in values).sqrt()
    error = sum(((values[n] - expected[n]) ** 2).sum() for n in values).sqrt()
    assert moved > 0.1 and error < 1e-4 * moved, (error.item(), moved.item())
