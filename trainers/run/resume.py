"""Exact resume mid-epoch: the data order and every random number generator.

- `ResumableSampler` draws each epoch's order from (seed, epoch) alone, split over the
  data-parallel replicas like `DistributedSampler`, and can start an epoch part-way: a run
  resumed after step s starts at batch s mod (batches per epoch), so it sees the batches
  the uninterrupted run would have seen.
- `RandomState` saves the torch, CUDA, numpy and Python generators of every rank in the
  checkpoint and restores them when training starts (after set-up, which may draw).

With the optimizer, LR schedule and loop counters that Lightning restores itself, a resumed
run continues exactly like an uninterrupted one.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` (deterministic per epoch, one share per replica) whose next
    epoch can start at a given batch (`start_at`)."""

    def __init__(self, dataset, *, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=True)
        self._skip = 0

    def start_at(self, num_samples: int) -> None:
        """Skip the first `num_samples` of the next epoch (once)."""
        self._skip = num_samples

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])


def resume_position(trainer, batches_per_epoch: int) -> int:
    """Batches of the current epoch the restored run has already trained on."""
    if trainer is None or batches_per_epoch <= 0:
        return 0
    consumed = trainer.global_step * trainer.accumulate_grad_batches
    return consumed % batches_per_epoch


def _snapshot() -> dict:
    """This process's generators as plain bytes and numbers (safe to gather and to load)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state().numpy().tobytes(),
        "numpy": [kind, keys.astype(np.uint32).tobytes(), position, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu().numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    return state


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _restore(state: dict) -> None:
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.frombuffer(keys, dtype=np.uint32).copy(), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_bytes_tensor(s) for s in state["cuda"]])


class RandomState(Callback):
    """Every rank's generators travel with the checkpoint (see the module doc)."""

    def __init__(self) -> None:
        self._pending: list[dict] | None = None

    def state_dict(self) -> dict:
        states = [_snapshot()]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, _snapshot())
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict.get("ranks")

    def on_train_start(self, trainer, pl_module) -> None:
        if not self._pending:
            return
        if len(self._pending) != trainer.world_size:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"the checkpoint holds random states of {len(self._pending)} ranks, "
                           f"this run has {trainer.world_size}: rank 0's are used on every rank")
        _restore(self._pending[trainer.global_rank if len(self._pending) == trainer.world_size
                               else 0])
        self._pending = None
