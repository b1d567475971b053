"""PipelineStrategy in a real Lightning Trainer against single-process training.

Two gloo processes (pp=2, 1F1B, 2 micro-batches; also bf16-mixed with partition="auto",
and tied embeddings split across the stages; and dp=2 alone, FSDP2 over 2 replicas, in fp32
and in bf16-mixed with FSDP2's bf16 MixedPrecisionPolicy) and
four (pp=2 x dp=2, FSDP2; and with tied embeddings split across the stages, pp=2 x dp=2 and
pp=2 x tp=2) and eight (dp=2 x pp=2 x tp=2: FSDP2 over tensor-parallel DTensors in a
pipeline) run `Trainer.fit` of the tiny RAG module for a few steps with gradient
clipping on, validating after every step; every step's logged loss, gradient norm (over
all stages, a split tied weight counted once) and validation loss, and every parameter at
the end, match a one-process Trainer on the same global batches. In fp32, step one's every
gradient (query encoder included, gathered from the shards) and every value after the
AdamW step match too; in bf16, step one's every gradient and value, tensor by tensor, and
the final values are as close to the float64 run as one process's bf16 run, within 2x.

Run: .venv/bin/pytest tests/distributed/test_strategy.py -q       (about 8 min on 2 cores,
     of which dp2xpp2xtp2 on 8 processes about 3.5 min)
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from tests.helpers.parallel import (
    ALL,
    BATCH_SIZE,
    STEPS,
    TWO,
    Recorder,
    Reference,
    assert_fp32_close,
    full_tensor,
    make_batches,
    make_module,
)
from trainers.parallel.mesh import ParallelConfigError
from trainers.parallel.pipeline import PartitionError
from trainers.parallel.strategy import PipelineStrategy

TIED_NAMES = ("model.retrieval.tok_embed.weight", "model.head.lm_head.weight")


def fit(module, recorder: Recorder, batches: list[dict], **trainer_kwargs) -> None:
    """STEPS steps on batches[:-1], validating on batches[-1] after every step."""
    trainer = L.Trainer(accelerator="cpu", max_steps=STEPS, val_check_interval=1,
                        num_sanity_val_steps=0, enable_checkpointing=False, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, gradient_clip_val=1.0,
                        callbacks=[recorder], **trainer_kwargs)
    loader = torch.utils.data.DataLoader
    trainer.fit(module, train_dataloaders=loader(batches[:-1], batch_size=None),
                val_dataloaders=loader(batches[-1:], batch_size=None))


def _strategy_worker(rank: int, world_size: int, out_dir: str, pp: int, tp: int,
                     precision: str, tied: bool) -> None:
    """pp=1 or 2 x tp (x dp = the rest): each replica reads its slice of the global batch."""
    module = make_module(tied=tied)
    recorder = Recorder(first_step=True)
    dp = world_size // (pp * tp)
    partition = "auto" if precision == "bf16-mixed" else TWO if pp == 2 else ALL
    strategy = PipelineStrategy(partition=partition, pipeline_parallel_size=pp,
                                tensor_parallel_size=tp, num_microbatches=2,
                                schedule="1f1b" if pp == 2 else "gpipe",
                                split_tied_weights=tied)
    dp_rank = rank // (pp * tp)  # ranks are (dp, pp, tp) row-major
    batches = [{k: v[dp_rank * BATCH_SIZE:(dp_rank + 1) * BATCH_SIZE] for k, v in b.items()}
               for b in make_batches(module, dp * BATCH_SIZE)]
    fit(module, recorder, batches, devices=world_size, strategy=strategy, precision=precision)
    values = {n: full_tensor(p.detach()).clone() for n, p in module.named_parameters()
              if p.requires_grad}
    torch.save({"losses": recorder.losses, "norms": recorder.norms, "values": values,
                "val_losses": recorder.val_losses, "grads": recorder.grads,
                "first_values": recorder.values}, Path(out_dir) / f"fit_{rank}.pt")


def reference_fit(dp: int, precision: str, tied: bool = False) -> dict:
    """One process, the global batch in the same 2 * dp micro-batches, averaged."""
    module = make_module(tied=tied)
    module.configure_model()  # built on the meta device: materialised in this process
    initial = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    step = module.training_step

    chunks = 2 * dp
    size = BATCH_SIZE // 2

    def split_step(batch, batch_idx, prefix="train"):  # the pipeline's micro-batches
        parts = [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(chunks)]
        loss = sum(module.model(part)["loss"] for part in parts) / chunks
        module.log(f"{prefix}/loss", loss)
        return loss

    module.training_step = split_step
    module.validation_step = lambda batch, batch_idx: split_step(batch, batch_idx, "val")
    recorder = Recorder(first_step=True)
    fit(module, recorder, make_batches(module, dp * BATCH_SIZE), devices=1, precision=precision)
    module.training_step = step
    values = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    return {"losses": recorder.losses, "norms": recorder.norms, "values": values,
            "initial": initial, "val_losses": recorder.val_losses, "grads": recorder.grads,
            "first_values": recorder.values}


def test_bad_configurations_fail_before_any_work():
    with pytest.raises(ParallelConfigError, match="schedule='zb' is unknown"):
        PipelineStrategy(partition=TWO, schedule="zb")
    with pytest.raises(ParallelConfigError, match="num_microbatches must be >= 1"):
        PipelineStrategy(partition=TWO, num_microbatches=0)
    with pytest.raises(PartitionError, match="at least one unit"):
        PipelineStrategy(partition=[["retrieval"], []])


def test_split_tie_that_tensor_parallelism_would_shard_is_refused(monkeypatch):
    from trainers.parallel import strategy as strategy_module
    from trainers.parallel.mesh import ParallelDims
    from trainers.parallel.pipeline import tied_parameters

    model = make_module(tied=True).model
    strategy = PipelineStrategy(partition=TWO, pipeline_parallel_size=2, tensor_parallel_size=2,
                                split_tied_weights=True)
    strategy.dims = ParallelDims(world_size=4, pipeline_parallel_size=2, tensor_parallel_size=2)
    strategy._ties = tied_parameters(dict(model.units()))
    assert [tie.holders for tie in strategy._ties] == [["retrieval", "head"]]
    strategy._check_split_ties(model)  # attention and MLP only: the tied embedding stays whole
    plan = strategy_module.tensor_parallel_plan
    monkeypatch.setattr(strategy_module, "tensor_parallel_plan",  # a vocab-parallel LM head
                        lambda m, **kw: {**plan(m, **kw), "head.lm_head": None})
    with pytest.raises(ParallelConfigError, match=r"head\.lm_head\.weight \(tied across "
                                                  r"\['retrieval', 'head'\]\) would be sharded"):
        strategy._check_split_ties(model)


@pytest.mark.parametrize("schedule, num_stages", [("1f1b", 2), ("interleaved_1f1b", 4),
                                                  ("zbv_zero_bubble", 4)])
def test_auto_partition_is_the_planners_valid_split(schedule, num_stages):
    from rag_mm.config import model_config
    from trainers.parallel.auto import auto_partition
    from trainers.parallel.pipeline import check_partition

    config = model_config("tiny")
    stages = auto_partition(config, pp_size=2, schedule=schedule, num_microbatches=2)
    assert len(stages) == num_stages
    check_partition(stages, ["retrieval", "blocks.0", "blocks.1", "head"], [["retrieval"]])
    with pytest.raises(ParallelConfigError, match="partition='even'"):
        PipelineStrategy(partition="even")


def test_lightning_cli_yaml_selects_the_strategy(tmp_path):
    from trainers.cli import cli_main

    recipe = tmp_path / "pp.yaml"
    recipe.write_text(
        "trainer:\n"
        "  strategy:\n"
        "    class_path: trainers.parallel.strategy.PipelineStrategy\n"
        "    init_args:\n"
        "      partition: [[retrieval, blocks.0], [blocks.1, head]]\n"
        "      pipeline_parallel_size: 2\n"
        "      num_microbatches: 4\n"
        "      schedule: interleaved_1f1b\n"
        "      sequence_parallel: true\n")
    cli = cli_main(["--config", str(recipe), "--model.size", "tiny",
                    "--trainer.accelerator", "cpu", "--trainer.devices", "1"], run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, PipelineStrategy)
    assert strategy.pipeline_config.stages == TWO
    assert strategy.pipeline_config.schedule == "interleaved_1f1b"
    assert strategy.pipeline_config.num_microbatches == 4
    assert strategy.sequence_parallel is True


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world_size, pp, tp, precision, tied",
                         [(2, 2, 1, "32-true", False), (4, 2, 1, "32-true", False),
                          (2, 1, 1, "32-true", False),
                          (2, 2, 1, "bf16-mixed", False), (2, 1, 1, "bf16-mixed", False),
                          (2, 2, 1, "32-true", True), (4, 2, 1, "32-true", True),
                          (4, 2, 2, "32-true", True), (8, 2, 2, "32-true", False)],
                         ids=["pp2", "pp2xdp2", "dp2", "pp2-bf16", "dp2-bf16", "pp2-split-tie",
                              "pp2xdp2-split-tie", "pp2xtp2-split-tie", "dp2xpp2xtp2"])
def test_fit_matches_single_process_training(world_size, pp, tp, precision, tied, tmp_path):
    from trainers.parallel.local import run_local

    run_local(_strategy_worker, world_size, str(tmp_path), pp, tp, precision, tied)
    results = [torch.load(tmp_path / f"fit_{r}.pt") for r in range(world_size)]
    ref = reference_fit(dp=world_size // (pp * tp), precision=precision, tied=tied)
    # bf16 autocast rounds every matmul input to bf16 (unit roundoff u = 2^-8): computed in
    # another order (micro-batches, stages), roundings land elsewhere and a logged loss can
    # differ by about u relative (measured 2.7e-3 to 3.9e-3 across runs); allow 2u.
    rel = 1e-5 if precision == "32-true" else 2 * 2.0**-8
    for result in results:  # every rank logs the same numbers
        assert result["losses"] == pytest.approx(ref["losses"], rel=rel)
        # FSDP sums each gradient's squares shard by shard (fp32 over ~1e6 entries).
        assert result["norms"] == pytest.approx(ref["norms"], rel=max(rel, 1e-4))
        assert len(ref["val_losses"]) == STEPS
        assert result["val_losses"] == pytest.approx(ref["val_losses"], rel=rel)
    assert min(ref["norms"]) > 1.0  # clipping was active
    values = {n: v for r in results for n, v in r["values"].items()}
    if tied:  # every rank's copy (both stages, every tp / dp rank) stays the same
        copies = [r["values"][n] for r in results for n in TIED_NAMES if n in r["values"]]
        assert len(copies) == world_size and all(torch.equal(c, copies[0]) for c in copies)
        # one parameter in one process: compare the one copy
        assert torch.equal(values.pop("model.head.lm_head.weight"),
                           values["model.retrieval.tok_embed.weight"])
    assert values.keys() == ref["values"].keys()
    moved = sum(((ref["values"][n] - ref["initial"][n]) ** 2).sum() for n in values).sqrt()
    assert moved > 0.1
    exact = reference_fit(dp=world_size // (pp * tp), precision="64-true", tied=tied)
    if precision == "32-true":
        error = sum(((values[n] - ref["values"][n]) ** 2).sum() for n in values).sqrt()
        assert error < 1e-4 * moved, (error.item(), moved.item())
        _assert_first_step_matches(results, ref, exact, tied)
        for name, expected in Reference.pair(ref["values"], exact["values"]).items():
            assert_fp32_close(values[name], expected, f"values {name}")  # after STEPS steps
    else:
        _assert_first_step_as_close_as_one_process(results, ref, exact)
        _assert_as_close_as_one_process(values, ref["values"], exact["values"], moved)


def _assert_as_close_as_one_process(values: dict, one: dict, exact: dict,
                                    moved: torch.Tensor) -> None:
    """bf16 autocast rounds every matmul input to 8 significant bits, and document scores
    near a tie can reorder a search, so after STEPS AdamW steps one process's bf16 values are
    ~1% of their movement off the float64 run (measured 0.80%), and the pipeline's rounding
    lands elsewhere (pipeline against one process: 0.48%). What must hold: the pipeline is as
    close to float64 as one process is, within 2x (errors of one size, not one value; measured
    0.94x). A real defect shows as more: stages receiving bf16 scores into fp32 buffers were
    4.1% off, 5x."""
    def distance(a: dict) -> torch.Tensor:
        return sum(((a[n].double() - exact[n].double()) ** 2).sum() for n in exact).sqrt()

    pipeline, one_process = distance(values), distance(one)
    assert one_process < 0.05 * moved  # bf16 training moved the way float64 did
    assert pipeline < 2 * one_process, (pipeline.item(), one_process.item(), moved.item())


def _assert_first_step_as_close_as_one_process(results: list[dict], ref: dict,
                                               exact: dict) -> None:
    """bf16, step one: every gradient (before clipping) and every value after the AdamW step,
    tensor by tensor, is as close to the float64 run as one process's bf16 run is, within
    2x (the rule above: two bf16 evaluations in other orders err by one size, not one value;
    measured at most 1.24x over the tiny model's 130 tensors at dp=2 and the median 1.00).
    Under FSDP2 (dp > 1) this checks its bf16 MixedPrecisionPolicy against autocast over
    fp32 parameters: when every parameter was gathered in bf16 (norms and embeddings too, and
    each unit's input cast to bf16), the residual stream ran in bf16 and the decoder norms'
    bias gradients were 6-12x further off than one process's (final values 3.0x)."""
    for key in ("grads", "first_values"):
        kept = {n: v for r in results for n, v in r[key].items()}
        assert kept.keys() == ref[key].keys(), key
        for name, truth in exact[key].items():
            truth = truth.double()
            parallel = (kept[name].double() - truth).norm()
            one_process = (ref[key][name].double() - truth).norm()
            floor = 2.0**-24 * truth.norm()  # both exact up to fp32 rounding: no ratio to take
            assert parallel <= 2 * one_process + floor, (
                key, name, parallel.item(), one_process.item())


def _assert_first_step_matches(results: list[dict], ref: dict, exact: dict, tied: bool) -> None:
    """Step one: every gradient (query encoder included) and every value after AdamW, within
    fp32 error of the float64 run (see assert_fp32_close)."""
    for key in ("grads", "first_values"):
        kept = {n: v for r in results for n, v in r[key].items()}
        if tied:
            torch.testing.assert_close(kept.pop("model.head.lm_head.weight"),
                                       kept["model.retrieval.tok_embed.weight"], rtol=0, atol=0)
        assert kept.keys() == ref[key].keys(), key
        for name, expected in Reference.pair(ref[key], exact[key]).items():
            assert_fp32_close(kept[name], expected, f"{key} {name}")
    assert ref["grads"]["model.retrieval.query_encoder.image_proj.weight"].abs().sum() > 0
