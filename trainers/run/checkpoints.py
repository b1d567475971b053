"""Crash-safe run checkpoints: written beside the previous one, switched atomically.

    OUT/checkpoints/step-0000650.ckpt     a checkpoint (a file, or a torch.distributed
    OUT/checkpoints/step-0003700.ckpt     .checkpoint folder under the parallel strategy)
    OUT/checkpoints/last.ckpt -> step-0003700.ckpt      the pointer every reader uses

A save goes to a hidden temporary name, is flushed to disk (fsync), renamed to its final
name, and only then does `last.ckpt` (a symlink) switch to it, by an atomic rename of a new
link over the old one. The last `keep` checkpoints stay; older ones are deleted after the
switch. A SIGKILL at any moment therefore leaves `last.ckpt` pointing at a complete
checkpoint: the new one, or the one before it.

`RunCheckpoints` saves every `every_n_steps` optimizer steps and always at the final step
(or wherever training ends), and refuses to save non-finite weights. `load_module` reads
either kind of checkpoint into a plain `RAGModule`.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_info

from retrieval_index.durable import fsync_path

LAST = "last.ckpt"
PREFIX = "step-"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used as asked (named in the message)."""


def step_name(step: int) -> str:
    return f"{PREFIX}{step:07d}.ckpt"


def latest(dirpath: str | Path) -> Path | None:
    """The checkpoint `last.ckpt` points to, or None when the folder has none."""
    pointer = Path(dirpath) / LAST
    if pointer.is_symlink() or pointer.exists():
        target = pointer.resolve()
        if not target.exists():
            raise CheckpointError(f"{pointer} points to {target}, which does not exist")
        return target
    return None


def saved_steps(dirpath: str | Path) -> list[Path]:
    """Finished step checkpoints in `dirpath`, oldest first."""
    folder = Path(dirpath)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"{PREFIX}*.ckpt") if not p.name.startswith("."))


def _fsync(path: Path) -> None:
    """Flush a file, or every file of a folder and the folder itself, to disk."""
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()] + [path]
    for p in paths:
        fsync_path(p)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def point_last(dirpath: Path, target: Path) -> None:
    """Switch `last.ckpt` to `target` atomically (a new symlink renamed over the old)."""
    link = dirpath / f".{LAST}.new"
    _remove(link)
    link.symlink_to(target.name)
    os.replace(link, dirpath / LAST)
    fsync_path(dirpath)


class RunCheckpoints(Checkpoint):
    """Periodic, final and on-demand checkpoints of a run, crash-safe (see the module doc).

    Args:
        dirpath: the run's checkpoint folder (None: `default_root_dir/checkpoints`, set at
            setup or by `resolve_dirpath`).
        every_n_steps: also save every N optimizer steps (None: only the final step).
        keep: how many step checkpoints to keep (>= 1); the newest is always one of them.
    """

    def __init__(self, dirpath: str | Path | None = None, *, every_n_steps: int | None = None,
                 keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep={keep}: at least the newest checkpoint must be kept (keep >= 1)")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be >= 1 (or None)")
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.every_n_steps = every_n_steps
        self.keep = keep
        self.saved_step: int | None = None
        self.saved_path: Path | None = None

    def resolve_dirpath(self, trainer) -> Path:
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "checkpoints"
        return self.dirpath

    def setup(self, trainer, pl_module, stage: str) -> None:
        folder = self.resolve_dirpath(trainer)
        if trainer.is_global_zero and folder.is_dir():
            pointed = (folder / LAST).resolve()
            for stale in folder.glob(".*.partial"):  # saves cut short by a kill
                if stale.resolve() != pointed:  # (a re-save of `last`'s step points there)
                    _remove(stale)

    @property
    def last_model_path(self) -> str:
        """What `ckpt_path="last"` resumes from (Lightning reads this attribute)."""
        if self.dirpath is None or latest(self.dirpath) is None:
            return ""
        return str(self.dirpath / LAST)

    # -- when -------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self.saved_step or step == 0:
            return
        final = 0 < trainer.max_steps <= step
        if final or (self.every_n_steps and step % self.every_n_steps == 0):
            self.save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # an epoch-based run's last epoch: saved here, where Lightning resumes from cleanly
        last_epoch = trainer.max_epochs not in (None, -1) and \
            trainer.current_epoch + 1 >= trainer.max_epochs
        if (last_epoch or trainer.should_stop) and trainer.global_step != self.saved_step:
            self.save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self.saved_step:  # training ended off the step grid
            self.save(trainer)

    # -- how --------------------------------------------------------------------------------------
    def save(self, trainer) -> Path:
        """Save the trainer's state now (every rank calls this), switch `last.ckpt` to it and
        prune old checkpoints; returns the checkpoint's path."""
        step = trainer.global_step
        started = time.monotonic()
        self._check_finite(trainer, step)
        final = self.dirpath / step_name(step)
        partial = self.dirpath / f".{final.name}.partial"
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            _remove(partial)
        trainer.strategy.barrier("run_checkpoints_prepare")
        previous = self.saved_step
        self.saved_step = step  # recorded inside the checkpoint: resuming it does not re-save it
        try:
            # a collective under the parallel strategy; weights_only=False (the full state,
            # optimizer and loops included) said outright, so Lightning does not log it
            trainer.save_checkpoint(partial, weights_only=False)
        except BaseException:
            self.saved_step = previous
            raise
        if trainer.is_global_zero:
            _fsync(partial)
            if final.exists():  # this step again (a resumed run): never leave `last` dangling
                if (self.dirpath / LAST).resolve() == final.resolve():
                    point_last(self.dirpath, partial)
                _remove(final)
            os.replace(partial, final)
            fsync_path(self.dirpath)
            point_last(self.dirpath, final)
            for old in saved_steps(self.dirpath)[: -self.keep]:
                _remove(old)
        trainer.strategy.barrier("run_checkpoints_done")
        self.saved_path = final
        rank_zero_info(f"checkpoint: step {step} saved to {final} in "
                       f"{time.monotonic() - started:.2f} s")
        return final

    @staticmethod
    def _check_finite(trainer, step: int) -> None:
        bad = [n for n, p in trainer.lightning_module.named_parameters()
               if p.numel() and not bool(torch.isfinite(_local(p)).all())]
        if trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            raise CheckpointError(
                f"step {step}: parameters are not finite ({', '.join(bad[:3]) or 'on another rank'}"
                f"); not saving over the last good checkpoint")

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"saved_step": self.saved_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.saved_step = state_dict.get("saved_step")


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param


def load_module(path: str | Path, **overrides):
    """A `RAGModule` (on the CPU) with the weights of a checkpoint file, or of a
    torch.distributed.checkpoint folder saved under any parallel layout. `overrides` replace
    saved hyperparameters (e.g. `index_dir`)."""
    from trainers.module import RAGModule

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    path = path.resolve()
    if path.is_file():
        return RAGModule.load_from_checkpoint(path, map_location="cpu", **overrides)
    meta = path / "meta.pt"
    if not meta.is_file():
        raise CheckpointError(f"{path} is a folder but not a distributed checkpoint (no meta.pt)")
    from torch.distributed.checkpoint import load

    hparams = dict(torch.load(meta, map_location="cpu", weights_only=False)["hyper_parameters"])
    # LightningCLI records how it built the module; load_from_checkpoint drops it too
    hparams.pop("_instantiator", None)
    hparams.update(overrides)
    module = RAGModule(**hparams)
    module.configure_model()  # built on the meta device: materialised, then overwritten
    state = {"state_dict": module.state_dict()}
    load(state, checkpoint_id=path)
    module.load_state_dict(state["state_dict"])
    return module
