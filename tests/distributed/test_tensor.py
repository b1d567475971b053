"""Tensor parallelism (DTensor, column/row-wise attention and MLP; optional sequence
parallel norms): plan, checks, parity.

The distributed tests compare tp=2 (2 gloo processes) and pp=2 x tp=2 (4 processes, 1F1B),
each also with sequence parallel (on a tiny model with 48-position sequences), and dp=2 x
tp=2 with sequence parallel (FSDP2 over the tensor-parallel DTensors, 4 processes), with
single-process training of the tiny RAG model: loss, every gradient (gathered from the
shards) and every parameter after one AdamW step. Sequence parallel over 47 positions
must be refused with an error naming the length and tp.

Run: .venv/bin/pytest tests/distributed/test_tensor.py -q       (about 70 s on 2 cores)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor, Replicate

from rag_mm.layers import Attention
from rag_mm.model import synthetic_batch
from tests.helpers.parallel import (
    ADAM_EPS,
    ALL,
    BATCH_SIZE,
    LR,
    NUM_DOCS,
    TWO,
    assert_fp32_close,
    full_tensor,
    reference_step,
    tiny_model,
)
from trainers.parallel.mesh import ParallelConfigError, ParallelDims
from trainers.parallel.pipeline import PipelineConfig, build_pipeline
from trainers.parallel.tensor import check_tensor_parallel, tensor_parallel_plan

# tiny's fused sequence: 16 document + 16 image + 13 prompt + 3 target = 48 positions
# (its own 12 prompt tokens make 47, which sequence parallel over tp=2 must refuse)
EVEN = {"max_prompt_tokens": 13}


def test_plan_splits_every_attention_and_mlp_layer():
    model, config = tiny_model()
    plan = tensor_parallel_plan(model)
    styles = {name: type(style).__name__ for name, style in plan.items()}
    assert styles["blocks.1.attn.q_proj"] == "ColwiseParallel"
    assert styles["blocks.1.attn.o_proj"] == "RowwiseParallel"
    assert styles["blocks.0.mlp.up"] == "ColwiseParallel"
    assert styles["blocks.0.mlp.down"] == "RowwiseParallel"
    assert styles["retrieval.query_encoder.vision.blocks.0.attn.v_proj"] == "ColwiseParallel"
    layers = config.generator.num_layers + 2 * config.vision.num_layers
    assert len(plan) == 6 * layers  # q, k, v, o, up, down per block
    assert not any(name.startswith("retrieval.query_encoder.text") for name in plan)
    stage_plan = tensor_parallel_plan(model.blocks[0])
    assert set(stage_plan) == {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                               "mlp.up", "mlp.down"}


def test_head_count_must_divide_by_tp():
    model, _ = tiny_model()
    check_tensor_parallel(model, 2)
    with pytest.raises(ParallelConfigError, match=r"blocks\.0\.attn has 2 attention heads, "
                                                  "not divisible by tensor_parallel_size=4"):
        check_tensor_parallel(model, 4)


def _save_step(named_params, losses, path: Path, save: bool) -> None:
    """Gather every gradient and (after one AdamW step) value; collective over tp."""
    named_params = list(named_params)
    grads = {n: full_tensor(p.grad).clone() for n, p in named_params if p.grad is not None}
    torch.optim.AdamW([p for _, p in named_params if p.requires_grad], lr=LR, eps=ADAM_EPS).step()
    values = {n: full_tensor(p.detach()).clone() for n, p in named_params if p.requires_grad}
    if save:
        torch.save({"losses": losses, "grads": grads, "values": values}, path)


def _tp_worker(rank: int, world_size: int, out_dir: str) -> None:
    """Plain tp, then sequence parallel on a model with even sequences, then odd ones."""
    from trainers.parallel.tensor import apply_tensor_parallel

    mesh = ParallelDims(world_size=world_size, tensor_parallel_size=world_size).build_mesh()
    model, config = tiny_model()
    heads = {name: m.num_heads for name, m in model.named_modules() if isinstance(m, Attention)}
    apply_tensor_parallel(model, mesh["tp"])
    local = {name: m.num_heads for name, m in model.named_modules() if isinstance(m, Attention)}
    assert local == {name: count // world_size for name, count in heads.items()}
    assert isinstance(model.blocks[0].attn.q_proj.weight, DTensor)
    _train_step(model, config, Path(out_dir) / f"tp_{rank}.pt")

    model, config = tiny_model(**EVEN)
    apply_tensor_parallel(model, mesh["tp"], sequence_parallel=True)
    seen = []
    model.blocks[0].mlp_norm.register_forward_hook(lambda m, i, out: seen.append(out.to_local()))
    _train_step(model, config, Path(out_dir) / f"sp_{rank}.pt")
    assert seen[0].shape[1] == config.seq_len // world_size  # the norm ran on its share
    assert model.blocks[0].mlp_norm.weight.grad.placements == (Replicate(),)  # summed

    model, config = tiny_model()  # 47 positions
    apply_tensor_parallel(model, mesh["tp"], sequence_parallel=True)
    batch = synthetic_batch(config, BATCH_SIZE, num_docs=NUM_DOCS)
    try:
        model.run_chain(model.retrieval(batch))
        error = None
    except ParallelConfigError as exc:
        error = str(exc)
    torch.save(error, Path(out_dir) / f"odd_{rank}.pt")


def _train_step(model, config, path: Path) -> None:
    batch = synthetic_batch(config, BATCH_SIZE, num_docs=NUM_DOCS)
    losses = model.head(*model.run_chain(model.retrieval(batch)))
    losses.mean(0).sum().backward()
    _save_step(model.named_parameters(), losses.detach(), path, save=True)


def _pp_tp_worker(rank: int, world_size: int, out_dir: str) -> None:
    """pp=2 x tp=2, 1F1B over 2 micro-batches; then the same with sequence parallel."""
    from trainers.parallel.tensor import apply_tensor_parallel

    dims = ParallelDims(world_size=world_size, pipeline_parallel_size=2, tensor_parallel_size=2)
    mesh = dims.build_mesh()
    coords = dims.coordinates(rank)
    for name, sequence_parallel, overrides in (("pptp", False, {}), ("ppsp", True, EVEN)):
        model, config = tiny_model(**overrides)
        batch = synthetic_batch(config, BATCH_SIZE, num_docs=NUM_DOCS)
        pipe = build_pipeline(
            model, PipelineConfig(stages=TWO, schedule="1f1b", num_microbatches=2), batch,
            pp_group=mesh["pp"].get_group(), device=torch.device("cpu"),
            parallelize=lambda m, sp=sequence_parallel: apply_tensor_parallel(
                m, mesh["tp"], sequence_parallel=sp))
        losses = pipe.step(batch)
        _save_step(pipe.named_parameters(), losses, Path(out_dir) / f"{name}_{coords['pp']}.pt",
                   save=coords["tp"] == 0)
    _dp_tp_sequence_parallel_step(rank, world_size, out_dir)


def _dp_tp_sequence_parallel_step(rank: int, world_size: int, out_dir: str) -> None:
    """dp=2 x tp=2 with sequence parallel, one stage: FSDP2 over tensor-parallel DTensors as
    the strategy shards them (every unit, then the stage as root); each replica reads half
    the batch in one micro-batch."""
    from torch.distributed.fsdp import fully_shard

    from trainers.parallel.tensor import apply_tensor_parallel

    dims = ParallelDims(world_size=world_size, tensor_parallel_size=2)
    mesh = dims.build_mesh()
    coords = dims.coordinates(rank)
    model, config = tiny_model(**EVEN)
    batch = synthetic_batch(config, BATCH_SIZE, num_docs=NUM_DOCS)
    half = BATCH_SIZE // 2
    batch = {k: v[coords["dp"] * half:(coords["dp"] + 1) * half] for k, v in batch.items()}
    apply_tensor_parallel(model, mesh["tp"], sequence_parallel=True)
    for _, unit in model.units():
        fully_shard(unit, mesh=mesh["dp"])
    pipe = build_pipeline(model, PipelineConfig(stages=ALL, schedule="gpipe"), batch,
                          pp_group=mesh["pp"].get_group(), device=torch.device("cpu"),
                          parallelize=lambda stage: fully_shard(stage, mesh=mesh["dp"]))
    losses = pipe.step(batch)
    _save_step(pipe.named_parameters(), losses, Path(out_dir) / f"dpsp_{rank}.pt",
               save=coords["tp"] == 0)


def _collect(paths: list[Path]) -> tuple[list, dict, dict]:
    results = [torch.load(p) for p in paths]
    losses = [r["losses"] for r in results if r["losses"] is not None]
    grads = {n: g for r in results for n, g in r["grads"].items()}
    values = {n: v for r in results for n, v in r["values"].items()}
    return losses, grads, values


def _assert_matches_reference(losses, grads, values, micro: int, **overrides) -> None:
    ref = reference_step(micro, **overrides)
    assert losses and all(loss.shape == (BATCH_SIZE, 2) for loss in losses)
    for loss in losses:
        assert loss.mean(0).sum().item() == pytest.approx(ref["loss"], rel=1e-6)
    assert grads.keys() == ref["grads"].keys() and values.keys() == ref["values"].keys()
    for name, expected in ref["grads"].items():
        assert_fp32_close(grads[name], expected, name)
    for name, expected in ref["values"].items():
        assert_fp32_close(values[name], expected, name)


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory):
    from trainers.parallel.local import run_local

    out_dir = tmp_path_factory.mktemp("tensor")
    run_local(_tp_worker, 2, str(out_dir))
    return out_dir


@pytest.mark.distributed
@pytest.mark.slow
def test_tp2_step_matches_single_process(tp_runs):
    losses, grads, values = _collect([tp_runs / f"tp_{r}.pt" for r in range(2)])
    assert len(losses) == 2  # every tp rank holds the full loss
    _assert_matches_reference(losses, grads, values, micro=1)


@pytest.mark.distributed
@pytest.mark.slow
def test_tp2_sequence_parallel_step_matches_single_process(tp_runs):
    losses, grads, values = _collect([tp_runs / f"sp_{r}.pt" for r in range(2)])
    assert len(losses) == 2
    _assert_matches_reference(losses, grads, values, micro=1, **EVEN)
    for rank in range(2):
        error = torch.load(tp_runs / f"odd_{rank}.pt")
        assert error == ("sequence_parallel: blocks.0 gets sequences of length 47, not "
                         "divisible by tensor_parallel_size=2; choose sequence lengths that "
                         "divide, or sequence_parallel=False")


@pytest.fixture(scope="module")
def pp_tp_runs(tmp_path_factory):
    from trainers.parallel.local import run_local

    out_dir = tmp_path_factory.mktemp("pipeline_tensor")
    run_local(_pp_tp_worker, 4, str(out_dir))
    return out_dir


@pytest.mark.distributed
@pytest.mark.slow
def test_dp2_tp2_sequence_parallel_step_matches_single_process(pp_tp_runs):
    replicas = [torch.load(pp_tp_runs / f"dpsp_{r}.pt") for r in (0, 2)]  # tp rank 0 of each
    ref = reference_step(2, **EVEN)  # the two halves as micro-batches
    assert all(r["losses"].shape == (BATCH_SIZE // 2, 2) for r in replicas)
    loss = sum(r["losses"].mean(0).sum().item() for r in replicas) / 2
    assert loss == pytest.approx(ref["loss"], rel=1e-6)
    grads, values = replicas[0]["grads"], replicas[0]["values"]  # gathered over dp and tp
    assert grads.keys() == ref["grads"].keys() and values.keys() == ref["values"].keys()
    for name, expected in ref["grads"].items():
        assert_fp32_close(grads[name], expected, name)
        assert torch.equal(replicas[1]["grads"][name], grads[name]), name
    for name, expected in ref["values"].items():
        assert_fp32_close(values[name], expected, name)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name, overrides", [("pptp", {}), ("ppsp", EVEN)],
                         ids=["tp", "sequence-parallel"])
def test_pp2_tp2_step_matches_single_process(name, overrides, pp_tp_runs):
    losses, grads, values = _collect([pp_tp_runs / f"{name}_{p}.pt" for p in range(2)])
    assert len(losses) == 1
    _assert_matches_reference(losses, grads, values, micro=2, **overrides)
