"""PipelineStrategy checkpoints: exact resume, and loading under another layout.

One process (pp=1) and two (pp=2) train the tiny RAG module for an epoch of 2 batches and
save a torch.distributed.checkpoint folder; then:
- pp=2 resumed from its own checkpoint trains epoch 2 exactly like an uninterrupted run;
- pp=2 resumed from the pp=1 checkpoint does too (pp=1 -> pp=2);
- the pp=2 checkpoint loads into a plain one-process model with the saved weights
  (pp=2 -> pp=1).

Run: .venv/bin/pytest tests/test_parallel_checkpoint.py -q     (about 1 min on 2 cores)
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from tests.test_parallel_strategy import BATCH_SIZE, TWO, Recorder, make_batches, make_module
from trainers.parallel.strategy import PipelineStrategy

ALL = [[unit for stage in TWO for unit in stage]]


def train(out: Path, name: str, *, pp: int, epochs: int, resume: Path | None = None,
          save: Path | None = None) -> None:
    """Fit up to `epochs` epochs of 2 batches; record losses and this rank's values."""
    module = make_module()
    strategy = PipelineStrategy(partition=TWO if pp == 2 else ALL, pipeline_parallel_size=pp,
                                num_microbatches=2, schedule="1f1b" if pp == 2 else "gpipe")
    recorder = Recorder()
    trainer = L.Trainer(accelerator="cpu", devices=pp, strategy=strategy, max_epochs=epochs,
                        limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[recorder])
    batches = make_batches(module, BATCH_SIZE)[:2]
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None),
                ckpt_path=resume)
    if save is not None:
        trainer.save_checkpoint(save)
    values = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    torch.save({"losses": recorder.losses, "values": values},
               out / f"{name}_{trainer.global_rank}.pt")


def _one_process(rank: int, world_size: int, out_dir: str) -> None:
    out = Path(out_dir)
    train(out, "pp1", pp=1, epochs=1, save=out / "ckpt_pp1")


def _two_processes(rank: int, world_size: int, out_dir: str) -> None:
    out = Path(out_dir)
    train(out, "straight", pp=2, epochs=2)
    train(out, "first", pp=2, epochs=1, save=out / "ckpt_pp2")
    train(out, "resumed", pp=2, epochs=2, resume=out / "ckpt_pp2")
    train(out, "from_pp1", pp=2, epochs=2, resume=out / "ckpt_pp1")


def _load(out: Path, name: str, ranks: int) -> tuple[list, dict]:
    results = [torch.load(out / f"{name}_{r}.pt") for r in range(ranks)]
    return results[0]["losses"], {n: v for r in results for n, v in r["values"].items()}


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_and_reshard(tmp_path):
    from torch.distributed.checkpoint import load

    from trainers.parallel.local import run_local

    run_local(_one_process, 1, str(tmp_path))
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
    # pp=2 -> one plain process: every weight (frozen text tower too) comes back as saved.
    module = make_module()
    state = {"state_dict": module.state_dict()}
    load(state, checkpoint_id=tmp_path / "ckpt_pp2")
    module.load_state_dict(state["state_dict"])
    for key, expected in first.items():
        assert torch.equal(dict(module.named_parameters())[key], expected), key
    pp1_losses, _ = _load(tmp_path, "pp1", 1)
    assert pp1_losses == pytest.approx(first_losses, rel=1e-5)
