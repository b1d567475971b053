"""Pipeline stages from unit lists, torch's schedules, and parity with one process.

The distributed test runs every schedule on 2 gloo processes (pp=2) with the tiny RAG model
and compares the loss, the gradient norm over both stages, every gradient (query encoder
included) and every parameter after one AdamW step with single-process training over the
same micro-batches; also with tied embeddings forced onto different stages, and under the
fusion-in-decoder reader (one sequence of all top-k documents per example crosses the stage
boundary: (B, k * T_doc + ..., H)).

Run: .venv/bin/pytest tests/distributed/test_pipeline.py -q       (about 40 s on 2 cores)
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from rag_mm.config import ReaderConfig, model_config
from rag_mm.model import build_model, synthetic_batch
from tests.helpers.parallel import (
    ADAM_EPS,
    BATCH_SIZE,
    LR,
    NUM_DOCS,
    STEP_SEED,
    TWO,
    assert_fp32_close,
    reference_step,
    tiny_model,
)
from trainers.parallel.mesh import ParallelConfigError, ParallelDims
from trainers.parallel.pipeline import (
    SCHEDULES,
    PartitionError,
    PipelineConfig,
    StageModule,
    build_pipeline,
    check_batch,
    check_partition,
    check_schedule,
    stage_ranks,
)

FOUR = [["retrieval"], ["blocks.0"], ["blocks.1"], ["head"]]
# name -> (schedule, stages, micro-batches); GPipe with one micro-batch is plain full-batch.
CASES = {
    "gpipe": ("gpipe", TWO, 1),
    "1f1b": ("1f1b", TWO, 2),
    "interleaved_1f1b": ("interleaved_1f1b", FOUR, 2),
    "looped_bfs": ("looped_bfs", FOUR, 2),
    "interleaved_zero_bubble": ("interleaved_zero_bubble", FOUR, 2),
    "zbv_zero_bubble": ("zbv_zero_bubble", FOUR, 2),
}
if "dualpipev" in SCHEDULES:
    CASES["dualpipev"] = ("dualpipev", FOUR, 4)
# Tied embeddings (token embedding = LM head) forced onto different stages.
CASES["1f1b_split_tie"] = ("1f1b", TWO, 2)
TIED = {"1f1b_split_tie"}
# The fusion-in-decoder reader: a longer sequence per example instead of k sequences.
CASES["1f1b_fid"] = ("1f1b", TWO, 2)
OVERRIDES = {"1f1b_fid": {"reader": ReaderConfig(kind="fid")}}


# -- checks that need no processes ---------------------------------------------------------------
def test_partition_must_cover_the_chain_in_order():
    chain = ["retrieval", "blocks.0", "blocks.1", "head"]
    check_partition(TWO, chain, [["retrieval"]])
    with pytest.raises(PartitionError, match="missing: \\['head'\\]"):
        check_partition([["retrieval", "blocks.0"], ["blocks.1"]], chain)
    with pytest.raises(PartitionError, match="chain order"):
        check_partition([["retrieval", "blocks.1"], ["blocks.0", "head"]], chain)
    with pytest.raises(PartitionError, match="unknown: \\['blocks.7'\\]"):
        check_partition([["retrieval", "blocks.0", "blocks.1"], ["blocks.7", "head"]], chain)
    with pytest.raises(PartitionError, match="at least one unit"):
        PipelineConfig(stages=[["retrieval"], []])


def test_partition_that_splits_tied_weights_is_refused():
    torch.manual_seed(0)
    base = model_config("tiny")
    config = replace(base, generator=replace(base.generator, tie_embeddings=True))
    with torch.device("meta"):
        model = build_model(config)
    with pytest.raises(PartitionError, match="co-location group \\['retrieval', 'head'\\]"):
        check_partition(TWO, [n for n, _ in model.units()], model.colocation_groups())


@pytest.mark.parametrize(
    "schedule, stages, micro, pp_size, words",
    [
        ("1f1b", TWO, 1, 2, ["num_microbatches >= the number of stages (2)"]),
        ("gpipe", FOUR, 2, 2, ["one stage per pipeline rank", "4 stages"]),
        ("interleaved_1f1b", FOUR, 5, 2, ["multiple of", "= 2, got 5"]),
        ("interleaved_1f1b", FOUR, 2, 3, ["multiple of pipeline_parallel_size=3"]),
        ("zbv_zero_bubble", FOUR * 2, 4, 2, ["exactly 2 stages per rank"]),
    ],
)
def test_schedule_combinations_torch_rejects_fail_early(schedule, stages, micro, pp_size, words):
    config = PipelineConfig(stages=stages, schedule=schedule, num_microbatches=micro)
    with pytest.raises(ParallelConfigError) as info:
        check_schedule(config, pp_size)
    for word in words:
        assert word in str(info.value)


def test_bad_schedule_name_and_batch_split():
    with pytest.raises(ParallelConfigError, match="schedule='2f2b' is unknown"):
        PipelineConfig(stages=TWO, schedule="2f2b")
    with pytest.raises(ParallelConfigError, match="batch size 6 is not divisible by "
                                                  "num_microbatches=4"):
        check_batch(6, 4)
    check_batch(8, 4)


def test_stage_ranks_loop_and_v():
    assert stage_ranks(4, 2, "interleaved_1f1b") == [0, 1, 0, 1]
    assert stage_ranks(4, 2, "zbv_zero_bubble") == [0, 1, 1, 0]
    assert stage_ranks(2, 2, "1f1b") == [0, 1]


def test_stage_modules_keep_model_names_and_compose_to_the_model():
    model, config = tiny_model()
    batch = synthetic_batch(config, 2, num_docs=NUM_DOCS)
    units = dict(model.units())
    keys = tuple(sorted(batch))
    stages = [StageModule([(n, units[n]) for n in names], batch_keys=keys if i == 0 else None)
              for i, names in enumerate(TWO)]
    names = {n for stage in stages for n, _ in stage.named_parameters()}
    assert names == {n for n, _ in model.named_parameters()}
    carry = stages[0](*(batch[k] for k in keys))
    losses = stages[1](*carry)
    assert losses.shape == (2, 2)
    expected = model(batch)["loss"]
    assert torch.allclose(losses.mean(0).sum(), expected, rtol=1e-6, atol=1e-6)


# -- two processes, every schedule ---------------------------------------------------------------
def _pipeline_worker(rank: int, world_size: int, out_dir: str) -> None:
    dims = ParallelDims(world_size=world_size, pipeline_parallel_size=world_size)
    mesh = dims.build_mesh("cpu")
    pp_group = mesh["pp"].get_group()
    assert torch.distributed.get_process_group_ranks(pp_group) == dims.group_ranks("pp", rank)
    from trainers.parallel.strategy import total_grad_norm

    for name, (schedule, stages, micro) in CASES.items():
        model, config = tiny_model(tied=name in TIED, **OVERRIDES.get(name, {}))
        batch = synthetic_batch(config, BATCH_SIZE, num_docs=NUM_DOCS)
        if name in OVERRIDES:  # the carry that crosses the boundary is one sequence per example
            assert model.retrieval(batch)[0].shape[:2] == (BATCH_SIZE, config.seq_len)
        pipe = build_pipeline(model, PipelineConfig(stages=stages, schedule=schedule,
                                                    num_microbatches=micro,
                                                    split_tied_weights=name in TIED),
                              batch, pp_group=pp_group, device=torch.device("cpu"))
        torch.manual_seed(STEP_SEED)
        losses = pipe.step(batch)
        norm = total_grad_norm(pipe.norm_parameters(), pp_group)
        params = [p for p in pipe.parameters() if p.requires_grad]
        grads = {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}
        torch.optim.AdamW(params, lr=LR, eps=ADAM_EPS).step()
        values = {n: p.detach().clone() for n, p in pipe.named_parameters() if p.requires_grad}
        torch.save({"losses": losses, "grads": grads, "values": values, "norm": norm},
                   Path(out_dir) / f"{name}_{rank}.pt")


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory):
    from trainers.parallel.local import run_local

    out_dir = tmp_path_factory.mktemp("pipeline")
    run_local(_pipeline_worker, 2, str(out_dir))
    return out_dir


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_step_matches_single_process(case, pipeline_runs):
    micro = CASES[case][2]
    ref = reference_step(micro, tied=case in TIED, **OVERRIDES.get(case, {}))
    results = [torch.load(pipeline_runs / f"{case}_{r}.pt") for r in range(2)]
    losses = [r["losses"] for r in results if r["losses"] is not None]
    assert len(losses) == 1 and losses[0].shape == (BATCH_SIZE, 2)
    assert losses[0].mean(0).sum().item() == pytest.approx(ref["loss"], rel=1e-6)
    for result in results:  # the norm over all stages, a tied weight counted once
        assert result["norm"].item() == pytest.approx(ref["norm"], rel=1e-5)
    grads = {n: g for r in results for n, g in r["grads"].items()}
    values = {n: v for r in results for n, v in r["values"].items()}
    if case in TIED:  # one parameter in one process; a copy on each stage here
        assert "head.lm_head.weight" not in ref["grads"]
        for kept in (grads, values):
            torch.testing.assert_close(kept.pop("head.lm_head.weight"),
                                       kept["retrieval.tok_embed.weight"], rtol=0, atol=0)
    assert grads.keys() == ref["grads"].keys()
    assert values.keys() == ref["values"].keys()
    assert ref["grads"]["retrieval.query_encoder.image_proj.weight"].fp32.abs().sum() > 0
    for name, expected in ref["grads"].items():  # fp32 error bounds: see assert_fp32_close
        assert_fp32_close(grads[name], expected, name)
    for name, expected in ref["values"].items():
        assert_fp32_close(values[name], expected, name)



def _autocast_worker(rank: int, world_size: int, out_dir: str) -> None:
    model, config = tiny_model()
    batch = synthetic_batch(config, BATCH_SIZE, num_docs=NUM_DOCS)
    pipe = build_pipeline(model, PipelineConfig(stages=[[n for s in TWO for n in s]],
                                                schedule="gpipe"),
                          batch, pp_group=dist.group.WORLD, device=torch.device("cpu"))
    pipe.step(batch)  # built and run without autocast
    with torch.autocast("cpu", torch.bfloat16), \
            pytest.raises(ParallelConfigError, match=r"built with autocast off and runs with "
                                                     r"autocast on \(bfloat16\)"):
        pipe.step(batch)
    Path(out_dir, "ok").touch()


@pytest.mark.distributed
def test_a_pipeline_run_under_another_autocast_than_it_was_built_is_refused(tmp_path):
    """Stage buffers take the trial run's dtypes (bf16 document scores under autocast): run
    under another precision, torch's stages would receive into the wrong dtype silently."""
    from trainers.parallel.local import run_local

    run_local(_autocast_worker, 1, str(tmp_path))
    assert (tmp_path / "ok").exists()
