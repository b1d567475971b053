"""A one-process checkpoint file resumes under PipelineStrategy.

One process (no strategy) fits the tiny RAG module (its own two AdamW groups and LR
schedule, gradient clipping) for 4 steps (2 epochs of 2 batches), `RunCheckpoints` saving
`checkpoints/step-0000002.ckpt` and `step-0000004.ckpt` as `scripts/pretrain.py` does;
`last.ckpt` is then pointed back at step 2 (a run preempted there). Two gloo processes
(pp=2, GPipe with one micro-batch, so the in-batch negatives are the whole batch as in the
module's own step) resume `last.ckpt` and fit steps 3-4; so do four (pp=2 x tp=2: DTensor
shards; pp=2 x dp=2: FSDP2 shards). Their losses and learning rates and every parameter
at the end equal the uninterrupted one-process run, within fp32 error
(`assert_fp32_close`, against the same run in float64). Without processes: the optimizer state read back by name equals
the saved one, and a file without the parameter names is refused by name.

Run: .venv/bin/pytest tests/distributed/test_resume_from_one_process.py -q  (about 90 s on 2 cores)
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from rag_mm.model import synthetic_batch
from tests.helpers.parallel import (
    NUM_DOCS,
    TWO,
    Reference,
    assert_fp32_close,
    full_tensor,
    make_scheduled_module,
)
from trainers.parallel.strategy import PipelineStrategy

STEPS, EPOCH, BATCH = 4, 2, 4  # 2 epochs of 2 batches


def make_module():
    return make_scheduled_module()


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.losses, self.lrs = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(trainer.callback_metrics["train/loss"].item())


def fit(module, *, resume: Path | None = None, save_dir: Path | None = None,
        **trainer_kwargs) -> tuple[Recorder, dict[str, torch.Tensor]]:
    """The STEPS-step run; with `save_dir`, RunCheckpoints there every 2 steps."""
    from trainers.run.checkpoints import RunCheckpoints

    recorder = Recorder()
    callbacks: list = [recorder] + ([RunCheckpoints(save_dir, every_n_steps=2)] if save_dir else [])
    batches = [synthetic_batch(module.config, BATCH, seed=i, num_docs=NUM_DOCS)
               for i in range(EPOCH)]
    trainer = L.Trainer(accelerator="cpu", max_steps=STEPS, logger=False,
                        enable_checkpointing=save_dir is not None, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False,
                        gradient_clip_val=1.0, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None), ckpt_path=resume)
    values = {n: full_tensor(p.detach()).clone() for n, p in module.named_parameters()
              if p.requires_grad}
    return recorder, values


def _resume(rank: int, world_size: int, out_dir: str, layouts: tuple[str, ...]) -> None:
    """Resume last.ckpt at pp=2 (x tp=2, or x dp=2 with FSDP2: every replica reads the same
    batches, so dp=2 trains like dp=1)."""
    for layout in layouts:
        strategy = PipelineStrategy(partition=TWO, pipeline_parallel_size=2,
                                    tensor_parallel_size=2 if layout == "pp2xtp2" else 1,
                                    num_microbatches=1, schedule="gpipe")
        recorder, values = fit(make_module(), devices=world_size, strategy=strategy,
                               resume=Path(out_dir) / "checkpoints" / "last.ckpt")
        torch.save({"losses": recorder.losses, "lrs": recorder.lrs, "values": values},
                   Path(out_dir) / f"{layout}_{rank}.pt")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Recorder, dict]:
    """One process uninterrupted, saved as scripts/pretrain.py saves; `last.ckpt` pointed
    back at step 2."""
    from trainers.run.checkpoints import point_last

    out = tmp_path_factory.mktemp("one_process")
    folder = out / "checkpoints"
    recorder, values = fit(make_module(), save_dir=folder, devices=1)
    point_last(folder, folder / "step-0000002.ckpt")
    return out, recorder, values


@pytest.fixture(scope="module")
def exact() -> tuple[Recorder, dict]:
    """The uninterrupted run in float64: the truth for assert_fp32_close."""
    return fit(make_module(), devices=1, precision="64-true")


@pytest.mark.distributed
@pytest.mark.slow
def test_one_process_file_resumes_at_pp2(saved, exact):
    from trainers.parallel.local import run_local

    run_local(_resume, 2, str(saved[0]), ("pp2",))
    _assert_resumed_like_one_process(saved, exact, "pp2", 2)


@pytest.mark.distributed
@pytest.mark.slow
def test_one_process_file_resumes_with_tensor_and_data_parallel_shards(saved, exact):
    from trainers.parallel.local import run_local

    run_local(_resume, 4, str(saved[0]), ("pp2xtp2", "pp2xdp2"))
    for layout in ("pp2xtp2", "pp2xdp2"):
        _assert_resumed_like_one_process(saved, exact, layout, 4)


def _assert_resumed_like_one_process(saved, exact, layout: str, ranks: int) -> None:
    saved, ref, ref_values = saved
    exact, exact_values = exact
    assert len(ref.losses) == STEPS and ref.lrs[2] != ref.lrs[3]  # the schedule moves
    results = [torch.load(saved / f"{layout}_{r}.pt") for r in range(ranks)]
    losses = Reference(torch.tensor(ref.losses[EPOCH:]), torch.tensor(exact.losses[EPOCH:]))
    for result in results:  # every rank logs the one-process numbers of steps 3-4
        assert result["lrs"] == pytest.approx(ref.lrs[EPOCH:], rel=1e-12)
        assert_fp32_close(torch.tensor(result["losses"]), losses, f"{layout} losses")
    values = {n: v for r in results for n, v in r["values"].items()}
    expected = Reference.pair(ref_values, exact_values)
    assert values.keys() == expected.keys(), layout
    for name, reference in expected.items():
        assert_fp32_close(values[name], reference, f"{layout} {name}")


def test_optimizer_state_comes_back_by_name(saved):
    from trainers.parallel.single_device import PARAM_NAMES, load_single_device_checkpoint

    path = saved[0] / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    module = make_module()
    module.configure_model()  # built on the meta device: materialised in this process
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    decay = [p.ndim >= 2 and "embed" not in n for n, p in params]  # RAGModule's two groups
    optimizer = torch.optim.AdamW([{"params": [p for (_, p), d in zip(params, decay) if d]},
                                   {"params": [p for (_, p), d in zip(params, decay) if not d]}])
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # sets initial_lr, as there
    load_single_device_checkpoint(module, [optimizer], checkpoint, path, strict=True)
    for name, param in module.named_parameters():
        assert torch.equal(param, checkpoint["state_dict"][name]), name
    back = optimizer.state_dict()
    def groups(state):  # torch's loading gives betas back as a list
        return [{**g, "betas": tuple(g["betas"])} for g in state["param_groups"]]

    assert groups(back) == groups(checkpoint["optimizer_states"][0])
    assert back["state"].keys() == checkpoint["optimizer_states"][0]["state"].keys()
    for index, state in back["state"].items():
        for key, value in state.items():
            assert torch.equal(value, checkpoint["optimizer_states"][0]["state"][index][key])

    del checkpoint[PARAM_NAMES]  # a file saved before the names were recorded
    with pytest.raises(ValueError, match=f"without its optimizer's parameter names "
                                         f"\\('{PARAM_NAMES}'"):
        load_single_device_checkpoint(module, [optimizer], checkpoint, path, strict=True)
