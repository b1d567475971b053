"""The retriever warm-up under PipelineStrategy equals one process.

`RAGModule(retriever_warmup_steps=3)` with its own optimizer and LR schedule (a warm-up
phase and a joint phase, each with its own linear warm-up and cosine decay), fit for 4
steps with gradient clipping on 2 gloo processes (pp=2, GPipe with one micro-batch, so the
joint step's in-batch negatives are the whole batch as in the module's own step): steps 1-3
train the query encoder alone on stage 0 (the other stage idles: no gradients), step 4
trains jointly through the pipeline. Every step's logged loss
(`train/retriever_warmup_loss`, then `train/loss`) and learning rate, step one's gradients
(the query encoder's, and none elsewhere) and values after AdamW, and every value after
step 4 equal the module's own `training_step` in one process; so do the values after step
4 of a run resumed from the checkpoint `ModelCheckpoint` saved after step 2 (inside the
warm-up: stage 1's optimizer has never stepped, stage 0's only for the query encoder)
equal one process resumed the same way (the saves do not change the uninterrupted run).
Under FSDP2 (dp=2 on 2 processes, pp=2 x dp=2 on 4) the warm-up runs through the retrieval
unit's `forward`, so FSDP2 gathers and reduces it: each replica takes its in-batch
negatives from its own rows, and every step equals one process stepping on the replicas'
halves of the global batch accumulated (the loss: their contrastive losses summed over the
gold rows of all).

Run: .venv/bin/pytest tests/distributed/test_retriever_warmup.py -q    (on the 2-core
machine, run alone at load ~5: pp=2 40 s, dp=2 25 s, pp=2 x dp=2 50 s; the whole file
4 min 27 s at load 10)
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from rag_mm.model import synthetic_batch
from tests.helpers.parallel import (
    ALL,
    LR,
    NUM_DOCS,
    TWO,
    Reference,
    assert_fp32_close,
    full_tensor,
    make_scheduled_module,
)
from trainers.parallel.strategy import PipelineStrategy

WARMUP, STEPS, EPOCH, BATCH = 3, 4, 2, 4  # 2 epochs of 2 batches


def make_module():
    return make_scheduled_module(retriever_warmup_steps=WARMUP)


class Recorder(L.Callback):
    """Per step: the logged loss and the learning rate; step one's gradients and values."""

    def __init__(self) -> None:
        self.losses, self.lrs = [], []
        self.grads, self.values = {}, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])
        if len(self.lrs) == 1:
            self.grads = {n: full_tensor(p.grad).clone() for n, p in pl_module.named_parameters()
                          if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        warmup = trainer.global_step <= WARMUP  # the step just taken was a warm-up step
        name = "train/retriever_warmup_loss" if warmup else "train/loss"
        self.losses.append(trainer.callback_metrics[name].item())
        if len(self.losses) == 1:
            self.values = _values(pl_module)


def fit(module, *, resume: Path | None = None, save_dir: Path | None = None,
        batches: list[dict[str, torch.Tensor]] | None = None, **trainer_kwargs) -> Recorder:
    """Epochs of EPOCH batches (default BATCH rows each), STEPS steps in all; with
    `save_dir`, `ModelCheckpoint` saves after every epoch."""
    recorder = Recorder()
    callbacks: list = [recorder]
    if save_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=save_dir, filename="{epoch}", save_top_k=-1,
                                         every_n_epochs=1, save_on_train_epoch_end=True))
    if batches is None:
        batches = [synthetic_batch(module.config, BATCH, seed=i, num_docs=NUM_DOCS)
                   for i in range(EPOCH)]
    trainer = L.Trainer(accelerator="cpu", max_steps=STEPS, logger=False,
                        enable_checkpointing=save_dir is not None, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False,
                        gradient_clip_val=1.0, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None), ckpt_path=resume)
    return recorder


def _strategy() -> PipelineStrategy:
    return PipelineStrategy(partition=TWO, pipeline_parallel_size=2, num_microbatches=1,
                            schedule="gpipe")


def _values(module) -> dict[str, torch.Tensor]:
    """Every trainable value, whole (gathered from FSDP2's shards: every replica calls)."""
    return {n: full_tensor(p.detach()).clone() for n, p in module.named_parameters()
            if p.requires_grad}


def _worker(rank: int, world_size: int, out_dir: str) -> None:
    """Uninterrupted, with `ModelCheckpoint` saving after epoch 1 (step 2, inside the
    warm-up: stage 1 has never stepped, stage 0 only its query encoder); then a fresh
    module resumed from that checkpoint."""
    module = make_module()
    saved = Path(out_dir) / "checkpoints"
    recorder = fit(module, save_dir=saved, devices=world_size, strategy=_strategy())
    values = _values(module)
    checkpoint = saved / "epoch=0.ckpt"
    resumed = make_module()
    after = fit(resumed, resume=checkpoint, devices=world_size, strategy=_strategy())
    torch.save({"losses": recorder.losses, "lrs": recorder.lrs, "grads": recorder.grads,
                "first_values": recorder.values, "values": values, "resumed": _values(resumed),
                "resumed_losses": after.losses, "resumed_lrs": after.lrs},
               Path(out_dir) / f"warmup_{rank}.pt")


@pytest.mark.distributed
@pytest.mark.slow
def test_retriever_warmup_matches_single_process(tmp_path):
    from trainers.parallel.local import run_local

    module = make_module()
    module.configure_model()  # built on the meta device: materialised in this process
    initial = _values(module)
    ref = fit(module, save_dir=tmp_path / "ref", devices=1)
    ref_values = _values(module)
    resumed = make_module()  # one process resumed from its own mid-warm-up checkpoint
    ref_resumed = fit(resumed, resume=tmp_path / "ref" / "epoch=0.ckpt", devices=1)
    ref_resumed_values = _values(resumed)
    assert set(ref.grads) and all(".query_encoder." in n for n in ref.grads)
    assert ref.lrs[1] > ref.lrs[2] < ref.lrs[3]  # the warm-up phase decays, the joint one restarts
    # the same two one-process runs in float64: the truth for assert_fp32_close
    module = make_module()
    exact = fit(module, save_dir=tmp_path / "exact", devices=1, precision="64-true")
    exact_values = _values(module)
    resumed = make_module()
    exact_resumed = fit(resumed, resume=tmp_path / "exact" / "epoch=0.ckpt", devices=1,
                        precision="64-true")
    exact_resumed_values = _values(resumed)

    run_local(_worker, 2, str(tmp_path))
    results = [torch.load(tmp_path / f"warmup_{r}.pt") for r in range(2)]
    # the losses within fp32 error of the float64 run (by step 3 the contrastive loss is
    # ~0.005, where a relative 1e-5 is below what the two fp32 runs' clipping and AdamW
    # steps (lr / eps = 10) leave)
    losses = Reference(torch.tensor(ref.losses), torch.tensor(exact.losses))
    for result in results:
        assert_fp32_close(torch.tensor(result["losses"]), losses, "losses")
        assert result["lrs"] == pytest.approx(ref.lrs, rel=1e-12)
        assert result["resumed_lrs"] == pytest.approx(ref_resumed.lrs, rel=1e-12)
        assert_fp32_close(torch.tensor(result["resumed_losses"]), Reference(
            torch.tensor(ref_resumed.losses), torch.tensor(exact_resumed.losses)),
            "resumed losses")
    assert ref_resumed.lrs == pytest.approx(ref.lrs[EPOCH:], rel=1e-12)
    assert results[1]["grads"] == {}  # stage 1 idles during the warm-up
    for key, expected_all in (("grads", Reference.pair(ref.grads, exact.grads)),
                              ("first_values", Reference.pair(ref.values, exact.values)),
                              ("values", Reference.pair(ref_values, exact_values)),
                              ("resumed", Reference.pair(ref_resumed_values,
                                                         exact_resumed_values))):
        kept = {n: v for r in results for n, v in r[key].items()}
        assert kept.keys() == expected_all.keys(), key
        for name, expected in expected_all.items():
            assert_fp32_close(kept[name], expected, f"{key} {name}")
    moved = {n for n in ref_values if not torch.equal(ref_values[n], initial[n])}
    assert any(n.startswith("model.blocks.") for n in moved)  # the joint step trained them


def _dp_worker(rank: int, world_size: int, out_dir: str, pp: int, tp: int = 1,
               precision: str = "32-true") -> None:
    """dp = world_size // (pp * tp) replicas, each fed its slice of the global batch (ranks
    are (dp, pp, tp) row-major); gradients and values gathered whole from the shards."""
    module = make_module()
    dp = world_size // (pp * tp)
    strategy = PipelineStrategy(partition=TWO if pp == 2 else ALL, pipeline_parallel_size=pp,
                                tensor_parallel_size=tp, num_microbatches=1, schedule="gpipe")
    dp_rank = rank // (pp * tp)
    batches = [{k: v[dp_rank * BATCH:(dp_rank + 1) * BATCH] for k, v in b.items()}
               for b in global_batches(module, dp)]
    recorder = fit(module, batches=batches, devices=world_size, strategy=strategy,
                   precision=precision)
    torch.save({"losses": recorder.losses, "lrs": recorder.lrs, "grads": recorder.grads,
                "first_values": recorder.values, "values": _values(module)},
               Path(out_dir) / f"dp_{rank}.pt")


def global_batches(module, dp: int) -> list[dict[str, torch.Tensor]]:
    """EPOCH batches of dp * BATCH rows; the first row has no gold document, so the first
    replica has fewer gold rows than the others (a mean per replica would weigh wrong)."""
    batches = [synthetic_batch(module.config, dp * BATCH, seed=i, num_docs=NUM_DOCS)
               for i in range(EPOCH)]
    for batch in batches:
        batch["gold_keys"][0] = -1
    return batches


def accumulated_fit(dp: int, precision: str) -> tuple[Recorder, dict[str, torch.Tensor]]:
    """One process on the global batches, each step over the replicas' slices as one
    process accumulates them (in-batch negatives within a slice, as the replicas take
    them): the warm-up loss is the contrastive losses of every slice summed over the gold
    rows of all, the joint loss the mean of the slices' losses."""
    module = make_module()

    def step(batch, batch_idx):
        parts = [{k: v[i * BATCH:(i + 1) * BATCH] for k, v in batch.items()} for i in range(dp)]
        if module.in_retriever_warmup():
            gold = (batch["gold_keys"] >= 0).sum().clamp(min=1)
            loss = sum(module.model.retriever_losses(part).sum() for part in parts) / gold
            module.log("train/retriever_warmup_loss", loss)
            return loss
        loss = sum(module.model(part)["loss"] for part in parts) / dp
        module.log("train/loss", loss)
        return loss

    module.training_step = step
    recorder = fit(module, batches=global_batches(module, dp), devices=1, precision=precision)
    return recorder, _values(module)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world_size,pp", [(2, 1), (4, 2)], ids=["dp2", "pp2xdp2"])
def test_retriever_warmup_under_data_parallelism_matches_one_process(tmp_path, world_size, pp):
    """FSDP2 over dp = 2 replicas (alone, and with pp=2: the stage-1 ranks idle, their FSDP2
    units never run): every step's loss and learning rate, step one's gradients (the query
    encoder's only) and values after AdamW, and the values after the joint step 4 equal
    one process accumulating the replicas' slices of the global batch."""
    from trainers.parallel.local import run_local

    dp = world_size // pp
    ref, ref_values = accumulated_fit(dp, "32-true")
    exact, exact_values = accumulated_fit(dp, "64-true")
    assert set(ref.grads) and all(".query_encoder." in n for n in ref.grads)

    run_local(_dp_worker, world_size, str(tmp_path), pp)
    results = [torch.load(tmp_path / f"dp_{r}.pt") for r in range(world_size)]
    losses = Reference(torch.tensor(ref.losses), torch.tensor(exact.losses))
    for result in results:
        assert_fp32_close(torch.tensor(result["losses"]), losses, "losses")
        assert result["lrs"] == pytest.approx(ref.lrs, rel=1e-12)
    if pp == 2:
        assert all(r["grads"] == {} for r in results[1::2])  # stage 1 idles in the warm-up
    for key, expected_all in (("grads", Reference.pair(ref.grads, exact.grads)),
                              ("first_values", Reference.pair(ref.values, exact.values)),
                              ("values", Reference.pair(ref_values, exact_values))):
        for replica in range(dp):  # every replica holds the same whole values
            kept = {n: v for r in results[replica * pp:(replica + 1) * pp]
                    for n, v in r[key].items()}
            assert kept.keys() == expected_all.keys(), key
            for name, expected in expected_all.items():
                assert_fp32_close(kept[name], expected, f"{key} {name} (replica {replica})")


def test_saving_the_optimizer_of_an_idle_stage_leaves_it_untouched():
    """A checkpoint saved during the warm-up on a rank whose optimizer never stepped (torch
    fills an empty state with a zero-lr step to save it) must neither change its later
    steps nor record that state."""
    strategy = PipelineStrategy(partition=TWO, pipeline_parallel_size=2)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    strategy.model = model
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    saved = strategy.optimizer_state(optimizer)
    assert not optimizer.state  # and saved without state, as one process saves it
    assert saved and all(key.startswith("param_groups.") for key in saved)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    steps = {id(p): optimizer.state[p]["step"].item() for p in model.parameters()}
    strategy.optimizer_state(optimizer)
    assert {id(p): optimizer.state[p]["step"].item() for p in model.parameters()} == steps
    assert set(steps.values()) == {1.0}
