"""`parallelize` and the meta-device build: each rank materialises only its own units.

- pp=2 under `PipelineStrategy` (a real `Trainer.fit` step, 2 gloo processes): the module
  builds its model on the meta device; every rank initialises exactly its stage's units
  (`RAGModel.init_unit` is recorded), only the stage-0 rank loads the pretrained text tower,
  and its parameter bytes equal the sum over its stage's units of a whole one-process model
  (the partition's plan) — nothing of the other stage is ever allocated: a rank's
  parameters are those of its units only; `parallelize` ran once, at setup (the pipeline
  existed before the first batch).
- one process (a world of 1): `parallelize` of a meta-built model gives the loss and every
  gradient of the same model built whole by `build_model` and run by hand, within fp32
  error (`assert_fp32_close`, with the float64 run as the truth).
- `compile=True` where a compiler works (inductor with this machine's g++): each decoder
  block compiled (dynamo and AOTAutograd counters, no graph break), the loss and every
  gradient of one step equal eager within fp32 error (one process; compiling is most of
  this file's time).
- bad settings are refused by name before any work: compile where no compiler works, no
  process group.

Run: .venv/bin/pytest tests/distributed/test_parallelize.py -q     (about 90 s on 2 cores)
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from rag_mm.config import model_config
from rag_mm.model import RAGModel, RetrievalUnit, build_model, synthetic_batch
from tests.helpers.parallel import (
    BATCH_SIZE,
    NUM_DOCS,
    TWO,
    Reference,
    assert_fp32_close,
    make_batches,
    make_module,
)
from trainers.parallel.mesh import ParallelConfigError, ParallelDims
from trainers.parallel.parallelize import ParallelConfig, parallelize
from trainers.parallel.pipeline import PipelineConfig
from trainers.parallel.strategy import PipelineStrategy


def _param_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in params}.values())


def _strategy_worker(rank: int, world_size: int, out_dir: str) -> None:
    initialised, pretrained = [], []
    init_unit, load_text = RAGModel.init_unit, RetrievalUnit.load_pretrained_text

    def record_init(self, name, unit):
        initialised.append(name)
        init_unit(self, name, unit)

    def record_text(self, unit=None):
        pretrained.append(rank)
        load_text(self, unit)

    RAGModel.init_unit, RetrievalUnit.load_pretrained_text = record_init, record_text
    from trainers.parallel import strategy as strategy_module

    calls, built_before_first_batch = [], []
    run = strategy_module.parallelize
    strategy_module.parallelize = lambda *args, **kwargs: calls.append(1) or run(*args, **kwargs)

    class FirstBatch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            built_before_first_batch.append(trainer.strategy.pipeline is not None)

    module = make_module()
    on_meta = all(p.is_meta for p in module.parameters())
    strategy = PipelineStrategy(partition=TWO, pipeline_parallel_size=2, num_microbatches=2)
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy=strategy, max_steps=1,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, use_distributed_sampler=False,
                        callbacks=[FirstBatch()])
    trainer.fit(module, torch.utils.data.DataLoader(make_batches(module, BATCH_SIZE),
                                                    batch_size=None))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "built_on_meta": on_meta, "initialised": initialised, "pretrained": pretrained,
        "parallelize_calls": len(calls), "built_before_first_batch": built_before_first_batch,
        "param_bytes": _param_bytes(module.parameters()),
        "names": sorted(n for n, _ in module.named_parameters()),
        "stages": strategy.pipeline_config.stages}))


@pytest.mark.distributed
def test_each_rank_materialises_only_its_stage(tmp_path):
    from trainers.parallel.local import run_local

    run_local(_strategy_worker, 2, str(tmp_path))
    full = make_module()
    full.configure_model()
    units = dict(full.model.units())
    for rank, stage in enumerate(TWO):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["built_on_meta"]
        # parallelize ran once, at setup: the pipeline existed before the first batch
        assert result["parallelize_calls"] == 1
        assert result["built_before_first_batch"] == [True]
        assert result["stages"] == TWO
        assert result["initialised"] == stage  # every unit of its stage, once; nothing else
        assert result["pretrained"] == ([rank] if "retrieval" in stage else [])
        planned = sum(_param_bytes(units[name].parameters()) for name in stage)
        assert result["param_bytes"] == planned
        expected = sorted(f"model.{name}.{local}" for name in stage
                          for local, _ in units[name].named_parameters())
        assert result["names"] == expected


def _tiny_on_meta():
    """The tiny model built on meta with a random in-memory index, a batch for it, and its
    units as one stage: what the one-process parallelize tests start from."""
    from rag_mm.model import InMemoryBackend

    torch.manual_seed(0)
    config = model_config("tiny")
    with torch.device("meta"):
        model = build_model(config)
    model.attach(InMemoryBackend.random(NUM_DOCS))
    batch = synthetic_batch(config, BATCH_SIZE, num_docs=NUM_DOCS)
    return model, batch, [[name for name, _ in model.units()]]


def _one_process_worker(rank: int, world_size: int, out_dir: str) -> None:
    model, batch, stages = _tiny_on_meta()
    dims = ParallelDims(world_size=1)
    pipeline = parallelize(model, dims, ParallelConfig(pipeline=PipelineConfig(
        stages=stages, schedule="gpipe", num_microbatches=1)), batch,
        mesh=dims.build_mesh("cpu"), device=torch.device("cpu"))
    losses = pipeline.step(batch)
    torch.save({"loss": losses.sum(-1).mean(),
                "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None}},
               Path(out_dir) / "parallelized.pt")


def _by_hand(dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    config = model_config("tiny")
    from rag_mm.model import InMemoryBackend

    model = build_model(config, backend=InMemoryBackend.random(NUM_DOCS)).to(dtype)
    batch = synthetic_batch(config, BATCH_SIZE, num_docs=NUM_DOCS)
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    loss = model(batch)["loss"]
    loss.backward()
    return {"loss": loss.detach(),
            "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None}}


@pytest.mark.distributed
def test_parallelize_on_one_process_equals_the_model(tmp_path):
    from trainers.parallel.local import run_local

    run_local(_one_process_worker, 1, str(tmp_path))
    result = torch.load(tmp_path / "parallelized.pt")
    fp32, fp64 = _by_hand(torch.float32), _by_hand(torch.float64)
    assert result["grads"].keys() == fp32["grads"].keys()
    assert_fp32_close(result["loss"], Reference(fp32["loss"], fp64["loss"]), "loss")
    for name, grad in result["grads"].items():
        assert_fp32_close(grad, Reference(fp32["grads"][name], fp64["grads"][name]), name)


def test_compile_without_a_compiler_is_refused_before_any_work(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = build_model(model_config("tiny"))
    config = ParallelConfig(pipeline=PipelineConfig(stages=[[n for n, _ in model.units()]],
                                                    schedule="gpipe"), compile=True)
    with pytest.raises(ParallelConfigError, match="compile=True on CPU needs a C\\+\\+ compiler"):
        parallelize(model, ParallelDims(world_size=1), config, {}, mesh=None,
                    device=torch.device("cpu"))
    assert all(p.is_meta for p in model.parameters())  # nothing was built
    assert isinstance(model.head, torch.nn.Module) and not hasattr(model.head, "unit_name")


def test_parallelize_without_a_process_group_is_refused_before_any_work():
    torch.manual_seed(0)
    with torch.device("meta"):
        model = build_model(model_config("tiny"))
    config = ParallelConfig(pipeline=PipelineConfig(stages=[[n for n, _ in model.units()]],
                                                    schedule="gpipe"))
    with pytest.raises(ParallelConfigError, match="need a process group: call "
                                                  "torch.distributed.init_process_group"):
        parallelize(model, ParallelDims(world_size=1), config, {}, mesh=None,
                    device=torch.device("cpu"))
    assert all(p.is_meta for p in model.parameters())  # nothing was built


def _compiled_worker(rank: int, world_size: int, out_dir: str) -> None:
    import torch._inductor.config
    from torch._dynamo.utils import counters

    # one compile worker: on 2 cores a pool of them costs more to start than it saves
    # (measured 73 s cold for this test's worker with the pool, 52 s without, under load 8)
    torch._inductor.config.compile_threads = 1
    model, batch, stages = _tiny_on_meta()
    pipeline = parallelize(model, ParallelDims(world_size=1), ParallelConfig(
        pipeline=PipelineConfig(stages=stages, schedule="gpipe", num_microbatches=1),
        compile=True), batch, mesh=None, device=torch.device("cpu"))
    loss = pipeline.step(batch).sum(-1).mean()
    torch.save({"loss": loss.detach(),
                "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                "compiled_blocks": [b._compiled_call_impl is not None for b in model.blocks],
                "counters": {k: dict(v) for k, v in counters.items()}},
               Path(out_dir) / "compiled.pt")


@pytest.mark.distributed
def test_compile_through_parallelize_equals_eager(tmp_path):
    """`compile=True` on this CPU (inductor with the machine's C++ compiler; where there is
    none, the refusal above is what holds): every decoder block is compiled (it holds a
    compiled call, dynamo captured graphs without a break and AOTAutograd compiled their
    backward) and the loss and every gradient of one step equal the eager model run by hand,
    within fp32 error (`assert_fp32_close` against the float64 run: inductor's fused kernels
    round in other places, by errors of one size)."""
    from trainers.parallel.local import run_local
    from trainers.parallel.parallelize import check_compile

    check_compile("cpu")
    run_local(_compiled_worker, 1, str(tmp_path))
    result = torch.load(tmp_path / "compiled.pt")
    counters = result["counters"]
    assert result["compiled_blocks"] == [True, True]
    assert counters["stats"]["unique_graphs"] >= 1, counters
    assert counters["aot_autograd"]["total"] >= 1, counters
    assert not counters.get("graph_break"), counters
    fp32, fp64 = _by_hand(torch.float32), _by_hand(torch.float64)
    assert result["grads"].keys() == fp32["grads"].keys()
    assert_fp32_close(result["loss"], Reference(fp32["loss"], fp64["loss"]), "loss")
    for name, grad in result["grads"].items():
        assert_fp32_close(grad, Reference(fp32["grads"][name], fp64["grads"][name]), name)
