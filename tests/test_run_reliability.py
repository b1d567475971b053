"""Long runs survive (trainers/run/): final step saved, preemption by real signals, exact
resume mid-epoch, crash-safe checkpoints under SIGKILL, the non-finite guard, refusals.

Training runs are the tiny model on the tiny demo task (the `demo` fixture: 96 training
examples), batch 16 so an epoch is 6 steps: resumes land mid-epoch and the runs cross an
epoch boundary.

Run: .venv/bin/pytest tests/test_run_reliability.py -q        (about 3 min on 2 cores)
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from trainers.data import RAGDataModule
from trainers.module import RAGModule
from trainers.run import (
    EXIT_PREEMPTED,
    LAST,
    CheckpointError,
    NonFiniteError,
    Preempted,
    RunCheckpoints,
    latest,
    run_callbacks,
    saved_steps,
)

ROOT = Path(__file__).resolve().parents[1]
BATCH = 16
STEPS = 12
WARMUP = 8  # retriever-only steps (cheap); the last 4 are joint training
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


class SignalAt(Callback):
    """Sends `signum` to this very process after optimizer step `step` (a real signal)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def fit(demo: Path, out: Path, *, extra=(), resume: bool = False, max_nonfinite: int = 10,
        every: int = 5, max_steps: int = STEPS):
    """The tiny module trained in this process with the run callbacks (checkpoints in
    OUT/checkpoints); returns it."""
    L.seed_everything(0)
    data = RAGDataModule(demo / "data", index_dir=str(demo / "index"), model_size="tiny",
                         batch_size=BATCH)
    module = RAGModule(size="tiny", index_dir=str(demo / "index"), retriever_warmup_steps=WARMUP,
                       rescore=True)  # as pretrain.py runs it: its cached states must resume too
    callbacks = [*extra, *run_callbacks(out / "checkpoints", every_n_steps=every,
                                        max_nonfinite=max_nonfinite)]
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, val_check_interval=5,
                        check_val_every_n_epoch=None, num_sanity_val_steps=0,
                        limit_val_batches=1, gradient_clip_val=1.0, default_root_dir=out)
    trainer.fit(module, datamodule=data,
                ckpt_path=out / "checkpoints" / LAST if resume else None)
    return module


def trained_values(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def saved_values(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def assert_same_weights(actual: dict, expected: dict) -> None:
    """A resumed fp32 CPU run repeats the uninterrupted one's arithmetic: the issue's bar is
    identical or within 1e-6 (measured here: identical)."""
    assert actual.keys() == expected.keys()
    worst = max((actual[k].float() - expected[k].float()).abs().max().item() for k in expected)
    assert worst <= 1e-6, f"resumed weights differ from uninterrupted ones by {worst:.3g}"


@pytest.fixture(scope="module")
def straight(demo, tmp_path_factory):
    """The uninterrupted run: its final weights and its checkpoint folder."""
    out = tmp_path_factory.mktemp("straight")
    return trained_values(fit(demo, out)), out / "checkpoints"


def test_final_step_is_saved_and_last_points_to_it(straight):
    values, out = straight
    assert latest(out) == out / "step-0000012.ckpt"  # 12 is off the every-5 grid
    assert [p.name for p in saved_steps(out)] == ["step-0000010.ckpt", "step-0000012.ckpt"]
    saved = torch.load(out / LAST, map_location="cpu", weights_only=False)
    assert saved["global_step"] == STEPS
    for name, value in values.items():
        assert torch.equal(saved["state_dict"][name], value), name


@pytest.mark.parametrize("step", [4, 6], ids=["mid-epoch", "epoch-boundary"])
def test_sigusr1_saves_the_step_and_resume_is_exact(demo, tmp_path, straight, step):
    """Saved by SIGUSR1 after step 4 (mid-epoch, after no validation) or step 6 (the last batch
    of epoch 0, after the step-5 validation): the resumed run ends with the uninterrupted
    run's weights. The step-6 case failed (5.8e-3 off) while the data loaders drew their
    iterators' seeds from torch's global generator, which the checkpoint restores."""
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(Preempted) as stop:
        fit(demo, tmp_path, extra=[SignalAt(step, signal.SIGUSR1)])
    assert stop.value.code == EXIT_PREEMPTED and stop.value.step == step
    assert latest(tmp_path / "checkpoints") == tmp_path / "checkpoints" / f"step-{step:07d}.ckpt"
    assert signal.getsignal(signal.SIGUSR1) == before  # the run's handler is gone again
    resumed = fit(demo, tmp_path, resume=True)
    assert_same_weights(trained_values(resumed), straight[0])


def test_sigterm_to_the_script_saves_exits_75_and_resumes_exactly(demo, tmp_path, straight):
    """scripts/pretrain.py in a real process: SIGTERM after the step-4 checkpoint (saved as
    its --save-every); the resumed run ends with the uninterrupted run's weights."""
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--data",
               str(demo / "data"), "--index", str(demo / "index"), "--size", "tiny",
               "--batch-size", str(BATCH), "--max-steps", str(STEPS), "--val-every", "5",
               "--save-every", "4", "--retriever-warmup-steps", str(WARMUP), "--lr", "1e-3",
               "--out", str(out)]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    wait_for(out / "checkpoints" / "step-0000004.ckpt", process)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    seconds = time.monotonic() - sent
    assert process.returncode == EXIT_PREEMPTED, stderr[-2000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["status"] == "preempted" and summary["checkpoint_step"] == summary["steps"]
    assert 4 <= summary["steps"] < STEPS and "preempted by SIGTERM" in stderr
    print(f"SIGTERM -> exit {seconds:.1f} s, saved step {summary['steps']}")
    done = subprocess.run([*command, "--resume"], check=False, env=ENV, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["status"] == "complete" and summary["checkpoint_step"] == STEPS
    assert_same_weights(saved_values(out / "checkpoints" / LAST),
                        saved_values(straight[1] / LAST))


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended ({process.returncode}) before {path} appeared: "
                                 f"{process.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.05)


def test_sigkill_at_random_moments_leaves_a_loadable_latest_checkpoint(demo, tmp_path):
    """A run saving every step is SIGKILLed at random moments, resumed each time; after every
    kill `last.ckpt` loads and names a saved step. RAG_MM_SIGKILL_TRIALS sets the count."""
    trials = int(os.environ.get("RAG_MM_SIGKILL_TRIALS", "4"))
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--data",
               str(demo / "data"), "--index", str(demo / "index"), "--size", "tiny",
               "--batch-size", "8", "--max-steps", "400", "--val-every", "1000",
               "--save-every", "1", "--retriever-warmup-steps", "400", "--out", str(out)]
    rng = random.Random(0)
    mid_save = 0
    for trial in range(trials):
        resume = ["--resume"] if latest(out / "checkpoints") is not None else []
        process = subprocess.Popen([*command, *resume], env=ENV, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        folder = out / "checkpoints"
        before = {p.name for p in saved_steps(folder)}
        deadline = time.monotonic() + 240
        while {p.name for p in saved_steps(folder)} <= before:  # a first save of this attempt
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        if trial % 2 == 0:  # every other kill lands while a save is being written
            while not any(p.name.endswith(".partial") for p in folder.iterdir()):
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.005)
        else:
            time.sleep(rng.uniform(0.0, 1.5))
        process.kill()
        process.wait()
        mid_save += any(p.name.endswith(".partial") for p in folder.iterdir())
        target = latest(folder)
        assert target is not None and target.name.startswith("step-"), trial
        saved = torch.load(folder / LAST, map_location="cpu", weights_only=False)
        assert target.name == f"step-{saved['global_step']:07d}.ckpt", trial
    print(f"{trials} SIGKILLs survived, {mid_save} of them during a save")


class Poison(Callback):
    """Makes the gradients (or the loss) of chosen steps NaN."""

    def __init__(self, grad_steps=(), loss_steps=()) -> None:
        self.grad_steps, self.loss_steps = set(grad_steps), set(loss_steps)
        self.before: dict[int, dict] = {}
        self.after: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before[trainer.global_step] = trained_values(pl_module)
        if trainer.global_step in self.loss_steps:
            batch["images"][0] = float("nan")  # a NaN input gives a NaN loss

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step in self.grad_steps:
            next(p for p in pl_module.parameters() if p.grad is not None).grad[0] = float("inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after[trainer.global_step - 1] = trained_values(pl_module)


def test_non_finite_steps_are_skipped_then_stop_without_saving(demo, tmp_path):
    """0-based steps 2 (inf gradient), 3, 5, 6, 7 (NaN loss) are skipped; three in a row
    (the 1-based steps 6..8) stop the run before step 8 could save."""
    poison = Poison(grad_steps={2}, loss_steps={3, 5, 6, 7})
    with pytest.raises(NonFiniteError, match=r"steps 6\.\.8: .* 3 times in a row"):
        fit(demo, tmp_path, extra=[poison], max_nonfinite=3, every=1)
    for step in (2, 3, 5, 6):  # skipped: no weight moved
        for name, value in poison.before[step].items():
            assert torch.equal(poison.after[step][name], value), (step, name)
    moved = [n for n, v in poison.before[4].items() if not torch.equal(poison.after[4][n], v)]
    assert moved, "a finite step must train"
    folder = tmp_path / "checkpoints"
    assert latest(folder).name == "step-0000007.ckpt"  # the step that raised saved nothing
    saved = torch.load(folder / LAST, map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())
    guard = next(v for k, v in saved["callbacks"].items() if "NonFiniteGuard" in k)
    assert guard == {"skipped": 4, "consecutive": 2}  # 2, 3, 5, 6 by the end of step 7


def test_non_finite_weights_are_never_saved(demo, tmp_path):
    module = RAGModule(size="tiny", index_dir=str(demo / "index"))
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, callbacks=[RunCheckpoints(tmp_path)])
    trainer.strategy.connect(module)
    module.configure_model()  # built on the meta device: materialised in this process
    with torch.no_grad():
        module.model.head.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="model.head.lm_head.weight.*not saving"):
        trainer.checkpoint_callback.save(trainer)
    assert latest(tmp_path) is None and not list(tmp_path.glob("*.ckpt"))


def test_resume_refusals_are_one_line_errors(demo, tmp_path, straight, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import pretrain

    base = ["--data", str(demo / "data"), "--index", str(demo / "index"), "--size", "tiny"]
    with pytest.raises(SystemExit) as exit_:
        pretrain.cli([*base, "--out", str(tmp_path / "empty"), "--resume"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().endswith(
        "--resume: nothing to resume in " + str(tmp_path / "empty" / "checkpoints")
        + " (no last.ckpt); run without --resume to start")
    with pytest.raises(SystemExit) as exit_:
        pretrain.cli([*base, "--out", str(straight[1].parent)])  # holds checkpoints/
    assert exit_.value.code == 2 and "already holds checkpoints" in capsys.readouterr().err


def test_cli_saves_resumes_from_last_and_refuses_to_overwrite(demo, tmp_path):
    from trainers.cli import cli_main

    def args(max_steps: int, *extra: str) -> list[str]:
        return ["fit", "--model.size", "tiny", "--model.index_dir", str(demo / "index"),
                "--model.retriever_warmup_steps", "2", "--data.data_dir", str(demo / "data"),
                "--data.batch_size", str(BATCH), "--trainer.max_steps", str(max_steps),
                "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2",
                "--trainer.check_val_every_n_epoch", "null", "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", str(tmp_path), *extra]

    cli_main(args(3))
    folder = tmp_path / "checkpoints"
    assert [p.name for p in saved_steps(folder)] == ["step-0000002.ckpt", "step-0000003.ckpt"]
    cli = cli_main(args(4, "--ckpt_path", "last"))
    # resumed from step 3 (a fresh start would also end at step 4: the restored path says it)
    assert cli.trainer.ckpt_path == str(folder / LAST)
    assert cli.trainer.global_step == 4 and latest(folder).name == "step-0000004.ckpt"
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        cli_main(args(5))
    with pytest.raises(CheckpointError, match=r"continue it with --ckpt_path last, or choose "
                                              r"another --trainer.default_root_dir$"):
        cli_main(args(5))  # the CLI's own flags, not pretrain.py's
    tested = cli_main(["test", *args(4, "--ckpt_path", "last")[1:]])
    assert tested.trainer.ckpt_path == str(folder / LAST)  # the step-4 weights, not a new init
    with pytest.raises(CheckpointError, match="--ckpt_path last: nothing to resume"):
        cli_main(args(4, "--ckpt_path", "last", "--trainer.default_root_dir",
                      str(tmp_path / "empty")))


def test_an_epoch_based_run_saves_its_last_epoch_and_resumes_exactly(demo, tmp_path):
    """max_epochs instead of max_steps: the final save happens at the end of the last epoch
    (a clean resume point), and a 1-epoch run resumed to 2 epochs equals a 2-epoch run."""

    def epochs(out: Path, count: int, resume: bool = False):
        L.seed_everything(0)
        data = RAGDataModule(demo / "data", index_dir=str(demo / "index"), model_size="tiny",
                             batch_size=BATCH)
        module = RAGModule(size="tiny", index_dir=str(demo / "index"),
                           retriever_warmup_steps=100)
        trainer = L.Trainer(max_epochs=count, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, default_root_dir=out,
                            callbacks=run_callbacks(out / "checkpoints"))
        trainer.fit(module, datamodule=data,
                    ckpt_path=out / "checkpoints" / LAST if resume else None)
        return trainer.global_step, trained_values(module)

    steps, straight = epochs(tmp_path / "straight", 2)
    assert steps == 12  # 96 examples in batches of 16, two epochs
    assert epochs(tmp_path / "run", 1)[0] == 6
    assert latest(tmp_path / "run" / "checkpoints").name == "step-0000006.ckpt"
    steps, resumed = epochs(tmp_path / "run", 2, resume=True)
    assert steps == 12
    assert_same_weights(resumed, straight)
