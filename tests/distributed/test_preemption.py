"""Preemption and exact resume under PipelineStrategy, 2 gloo processes: pp=2, and dp=2
(FSDP2 shards, each replica reading its own share of the data).

The tiny module on the tiny demo task (real FAISS index, `RAGDataModule` with its resumable
sampler), with the run callbacks of `trainers.run`. A SIGTERM sent to rank 0 alone after
step 2, mid-epoch and inside the retriever warm-up (4 steps), stops both ranks at that
step: they agree (one all-reduce of a flag per step), save one torch.distributed.checkpoint
folder and raise `Preempted` (exit code 75). Resumed from it, the run finishes the warm-up,
goes on into joint training and ends with the same weights on every rank as an
uninterrupted run.

Run: .venv/bin/pytest tests/distributed/test_preemption.py -q     (about 1 min on 2 cores)
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from tests.helpers.parallel import ALL, TWO, full_tensor

# 6 batches an epoch (3 a replica under dp=2): the signal lands mid-epoch and mid-warm-up
STEPS, WARMUP, BATCH, SIGNAL_AFTER = 8, 4, 16, 2


class SignalRankZero(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == 0 and trainer.global_step == SIGNAL_AFTER:
            os.kill(os.getpid(), signal.SIGTERM)


# (partition, pipeline_parallel_size, data_parallel_size) of each layout
LAYOUTS = {"pp2": (TWO, 2, 1), "dp2": (ALL, 1, 2)}


def fit(demo: Path, out: Path, layout: str, *, interrupt: bool = False, resume: bool = False):
    from trainers.data import RAGDataModule
    from trainers.module import RAGModule
    from trainers.parallel.strategy import PipelineStrategy
    from trainers.run import LAST, run_callbacks

    L.seed_everything(0)
    data = RAGDataModule(demo / "data", index_dir=str(demo / "index"), model_size="tiny",
                         batch_size=BATCH)
    module = RAGModule(size="tiny", index_dir=str(demo / "index"), retriever_warmup_steps=WARMUP)
    partition, pp, dp = LAYOUTS[layout]
    strategy = PipelineStrategy(partition=partition, pipeline_parallel_size=pp,
                                data_parallel_size=dp, num_microbatches=2, schedule="1f1b")
    callbacks = [*([SignalRankZero()] if interrupt else []), *run_callbacks(out, every_n_steps=100)]
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=STEPS,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0,
                        callbacks=callbacks)
    trainer.fit(module, datamodule=data, ckpt_path=out / LAST if resume else None)
    return {n: full_tensor(p.detach()).clone() for n, p in module.named_parameters()
            if p.requires_grad}  # whole over dp=2's FSDP2 shards


def _worker(rank: int, world_size: int, out_dir: str, demo_dir: str, layout: str) -> None:
    from trainers.run import Preempted, latest

    out, demo = Path(out_dir), Path(demo_dir)
    straight = fit(demo, out / "straight", layout)
    stopped_at = None
    try:
        fit(demo, out / "run", layout, interrupt=True)
    except Preempted as stop:
        stopped_at = stop.step
    saved = latest(out / "run")
    resumed = fit(demo, out / "run", layout, resume=True)
    torch.save({"stopped_at": stopped_at, "saved": saved.name if saved else None,
                "straight": straight, "resumed": resumed}, out / f"rank{rank}.pt")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sigterm_on_one_rank_stops_all_at_one_step_and_resume_is_exact(demo, tmp_path, layout):
    from trainers.parallel.local import run_local

    assert SIGNAL_AFTER < WARMUP < STEPS  # stopped inside the warm-up, resumed through it
    run_local(_worker, 2, str(tmp_path), str(demo), layout)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["stopped_at"] == SIGNAL_AFTER, rank  # rank 1 got no signal itself
        assert result["saved"] == f"step-{SIGNAL_AFTER:07d}.ckpt"
        straight, resumed = result["straight"], result["resumed"]
        assert straight and straight.keys() == resumed.keys()
        worst = max((resumed[k] - straight[k]).abs().max().item() for k in straight)
        assert worst <= 1e-6, f"rank {rank}: resumed weights differ by {worst:.3g}"
    final = (tmp_path / "run" / "last.ckpt").resolve()
    assert final.name == f"step-{STEPS:07d}.ckpt" and (final / ".metadata").is_file()
