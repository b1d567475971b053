"""PipelineStrategy checkpoints: exact resume, and loading under another layout.

One process (pp=1) trains the tiny RAG module for an epoch of 2 batches and saves a
torch.distributed.checkpoint folder (and, apart, two epochs uninterrupted); then:
- two processes: pp=2 resumed from its own checkpoint trains epoch 2 exactly like an
  uninterrupted pp=2 run, and so does pp=2 resumed from the pp=1 checkpoint; the pp=2
  checkpoint loads into a plain one-process model with the saved weights;
- four processes: pp=2 x tp=2 (DTensor shards) and pp=2 x dp=2 (FSDP2 shards) save after
  an epoch, and pp=2 x tp=2 resumes from the pp=1 checkpoint; then one process resumes
  from each four-process checkpoint. Every resumed run's epoch 2 (losses, then every
  parameter) matches the uninterrupted one-process run, and a plain process reads each
  four-process checkpoint back as the weights it saved.

Run: .venv/bin/pytest tests/distributed/test_checkpoint.py -q     (about 2 min on 2 cores)
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from tests.helpers.parallel import (
    ALL,
    BATCH_SIZE,
    TWO,
    Recorder,
    Reference,
    assert_fp32_close,
    full_tensor,
    make_batches,
    make_module,
)
from trainers.parallel.strategy import PipelineStrategy


def train(out: Path, name: str, *, pp: int, tp: int = 1, dp: int = 1, epochs: int,
          resume: Path | None = None, save: Path | None = None) -> None:
    """Fit up to `epochs` epochs of 2 batches; record losses and this rank's values (whole
    over tp / dp shards). Every replica reads the same batches, so dp=2 trains like dp=1."""
    module = make_module()
    strategy = PipelineStrategy(partition=TWO if pp == 2 else ALL, pipeline_parallel_size=pp,
                                tensor_parallel_size=tp, num_microbatches=2,
                                schedule="1f1b" if pp == 2 else "gpipe")
    recorder = Recorder()
    trainer = L.Trainer(accelerator="cpu", devices=pp * tp * dp, strategy=strategy,
                        max_epochs=epochs, limit_val_batches=0, num_sanity_val_steps=0,
                        enable_checkpointing=False, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[recorder])
    batches = make_batches(module, BATCH_SIZE)[:2]
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None),
                ckpt_path=resume)
    if save is not None:
        trainer.save_checkpoint(save)
    values = {n: full_tensor(p.detach()).clone() for n, p in module.named_parameters()
              if p.requires_grad}
    torch.save({"losses": recorder.losses, "values": values},
               out / f"{name}_{trainer.global_rank}.pt")


def _one_process(rank: int, world_size: int, out_dir: str) -> None:
    out = Path(out_dir)
    train(out, "pp1", pp=1, epochs=1, save=out / "ckpt_pp1")
    train(out, "pp1_straight", pp=1, epochs=2)


def _two_processes(rank: int, world_size: int, out_dir: str) -> None:
    out = Path(out_dir)
    train(out, "straight", pp=2, epochs=2)
    train(out, "first", pp=2, epochs=1, save=out / "ckpt_pp2")
    train(out, "resumed", pp=2, epochs=2, resume=out / "ckpt_pp2")
    train(out, "from_pp1", pp=2, epochs=2, resume=out / "ckpt_pp1")


def _four_processes(rank: int, world_size: int, out_dir: str) -> None:
    out = Path(out_dir)
    train(out, "pptp", pp=2, tp=2, epochs=1, save=out / "ckpt_pptp")
    train(out, "pptp_from_pp1", pp=2, tp=2, epochs=2, resume=out / "ckpt_pp1")
    train(out, "ppdp", pp=2, dp=2, epochs=1, save=out / "ckpt_ppdp")


def _back_to_one_process(rank: int, world_size: int, out_dir: str) -> None:
    out = Path(out_dir)
    train(out, "pp1_from_pptp", pp=1, epochs=2, resume=out / "ckpt_pptp")
    train(out, "pp1_from_ppdp", pp=1, epochs=2, resume=out / "ckpt_ppdp")


def _load(out: Path, name: str, ranks: int) -> tuple[list, dict]:
    results = [torch.load(out / f"{name}_{r}.pt") for r in range(ranks)]
    return results[0]["losses"], {n: v for r in results for n, v in r["values"].items()}


def _exact_straight() -> tuple[list, dict]:
    """pp1_straight's two epochs in float64, in one process without the strategy (the
    module's model over the same 2 micro-batches of each batch): the fp32 runs' truth."""
    module = make_module()

    def split_step(batch, batch_idx):
        half = BATCH_SIZE // 2
        parts = [{k: v[i * half:(i + 1) * half] for k, v in batch.items()} for i in range(2)]
        loss = sum(module.model(part)["loss"] for part in parts) / 2
        module.log("train/loss", loss)
        return loss

    module.training_step = split_step
    recorder = Recorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="64-true", max_epochs=2,
                        limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[recorder])
    batches = make_batches(module, BATCH_SIZE)[:2]
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return recorder.losses, {n: p.detach().clone() for n, p in module.named_parameters()
                             if p.requires_grad}


def _plain_load(folder: Path) -> dict[str, torch.Tensor]:
    """A checkpoint folder read into a one-process model (no process group)."""
    from torch.distributed.checkpoint import load

    module = make_module()
    state = {"state_dict": module.state_dict()}
    load(state, checkpoint_id=folder)
    module.load_state_dict(state["state_dict"])
    return dict(module.named_parameters())


@pytest.fixture(scope="module")
def pp1_runs(tmp_path_factory):
    """One process: an epoch saved (ckpt_pp1), and two epochs uninterrupted."""
    from trainers.parallel.local import run_local

    out = tmp_path_factory.mktemp("checkpoints")
    run_local(_one_process, 1, str(out))
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_and_reshard(pp1_runs):
    from trainers.parallel.local import run_local

    tmp_path = pp1_runs
    run_local(_two_processes, 2, str(tmp_path))
    straight_losses, straight = _load(tmp_path, "straight", 2)
    first_losses, first = _load(tmp_path, "first", 2)
    assert len(straight_losses) == 4 and first_losses == straight_losses[:2]
    for name in ("resumed", "from_pp1"):
        losses, values = _load(tmp_path, name, 2)
        assert losses == pytest.approx(straight_losses[2:], rel=1e-6), name
        assert values.keys() == straight.keys()
        for key, expected in straight.items():
            torch.testing.assert_close(
                values[key], expected, rtol=1e-5, atol=1e-6,
                msg=lambda detail, key=key, name=name: f"{name} {key}: {detail}")
    # pp=2 -> one plain process: every weight comes back as saved.
    loaded = _plain_load(tmp_path / "ckpt_pp2")
    for key, expected in first.items():
        assert torch.equal(loaded[key], expected), key
    # ... and so does what scripts/evaluate.py reads (trainers.run.load_module)
    from trainers.run import load_module

    evaluated = dict(load_module(tmp_path / "ckpt_pp2").named_parameters())
    for key, expected in first.items():
        assert torch.equal(evaluated[key], expected), key
    pp1_losses, _ = _load(tmp_path, "pp1", 1)
    assert pp1_losses == pytest.approx(first_losses, rel=1e-5)


@pytest.mark.distributed
@pytest.mark.slow
def test_reshard_across_tensor_and_data_parallel_layouts(pp1_runs):
    """pp=2 x tp=2 and pp=2 x dp=2 (FSDP2) checkpoints load at pp=1 (strategy and plain
    process) and a pp=1 checkpoint resumes at pp=2 x tp=2; training continues like the
    uninterrupted one-process run (fp32 summation-order tolerance: other layouts)."""
    from trainers.parallel.local import run_local

    out = pp1_runs
    run_local(_four_processes, 4, str(out))
    run_local(_back_to_one_process, 1, str(out))
    pp1_losses, _ = _load(out, "pp1", 1)
    straight_losses, straight = _load(out, "pp1_straight", 1)
    assert len(straight_losses) == 4 and straight_losses[:2] == pp1_losses
    assert straight_losses[2:] != pytest.approx(pp1_losses, rel=1e-3)  # epoch 2 learnt
    for name in ("pptp", "ppdp"):
        losses, saved = _load(out, name, 4)
        assert losses == pytest.approx(pp1_losses, rel=1e-5), name
        loaded = _plain_load(out / f"ckpt_{name}")
        assert saved.keys() == straight.keys()
        for key, expected in saved.items():
            assert torch.equal(loaded[key], expected), (name, key)
    exact_losses, exact = _exact_straight()
    losses_ref = Reference(torch.tensor(straight_losses[2:]), torch.tensor(exact_losses[2:]))
    expected = Reference.pair(straight, exact)
    for name, ranks in (("pptp_from_pp1", 4), ("pp1_from_pptp", 1), ("pp1_from_ppdp", 1)):
        losses, values = _load(out, name, ranks)
        assert_fp32_close(torch.tensor(losses), losses_ref, f"{name} losses")
        assert values.keys() == straight.keys(), name
        for key, reference in expected.items():
            assert_fp32_close(values[key], reference, f"{name} {key}")
