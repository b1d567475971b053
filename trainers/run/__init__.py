"""Long runs survive: crash-safe checkpoints, preemption, exact resume, a non-finite guard.

    callbacks = run_callbacks("runs/mine/checkpoints", every_n_steps=650)
    trainer = L.Trainer(..., callbacks=callbacks)
    trainer.fit(module, datamodule=data, ckpt_path=resume_path("runs/mine/checkpoints", resume=True))

- `checkpoints.RunCheckpoints`: periodic and final saves beside the previous one, `last.ckpt`
  switched atomically, the last K kept; `load_module` reads a file or a distributed folder.
- `preemption.Preemption`: SIGTERM / SIGUSR1 -> finish the step, save, exit 75.
- `resume.RandomState`, `resume.ResumableSampler`: the generators and the data position.
- `guards.NonFiniteGuard`: NaN / inf steps skipped, counted, and a stop after N in a row.
"""

from __future__ import annotations

from pathlib import Path

from trainers.run.checkpoints import (
    LAST,
    CheckpointError,
    RunCheckpoints,
    latest,
    load_module,
    saved_steps,
)
from trainers.run.guards import NonFiniteError, NonFiniteGuard
from trainers.run.preemption import EXIT_PREEMPTED, Preempted, Preemption
from trainers.run.resume import RandomState, ResumableSampler


def run_callbacks(dirpath: str | Path, *, every_n_steps: int | None = None, keep: int = 2,
                  max_nonfinite: int = 10) -> list:
    """The callbacks of a run that survives: checkpoints, preemption, RNG state, the guard."""
    checkpoints = RunCheckpoints(dirpath, every_n_steps=every_n_steps, keep=keep)
    return [Preemption(checkpoints), RandomState(), NonFiniteGuard(max_nonfinite), checkpoints]


def resume_path(dirpath: str | Path, *, resume: bool, flag: str = "--resume",
                folder_flag: str = "--out") -> Path | None:
    """The checkpoint to resume from. With `resume`, the latest one (refused if there is
    none); without, None, and a folder that already holds a run's checkpoints is refused
    (continue it with `flag`, or choose another `folder_flag`) so nothing is overwritten."""
    found = latest(dirpath)
    if resume:
        if found is None:
            raise CheckpointError(f"{flag}: nothing to resume in {dirpath} (no {LAST}); "
                                  f"run without {flag} to start")
        return Path(dirpath) / LAST
    if found is not None or saved_steps(dirpath):
        raise CheckpointError(f"{dirpath} already holds checkpoints of a run; continue it with "
                              f"{flag}, or choose another {folder_flag}")
    return None


__all__ = ["EXIT_PREEMPTED", "LAST", "CheckpointError", "NonFiniteError", "NonFiniteGuard",
           "Preempted", "Preemption", "RandomState", "ResumableSampler", "RunCheckpoints",
           "latest", "load_module", "resume_path", "run_callbacks", "saved_steps"]
