"""The few collectives sharded search and distributed builds need, behind one small interface.

`Collective` is what `ShardedIndex` and the distributed build job call; `TorchCollective`
implements it over a `torch.distributed` process group (gloo, NCCL), `LocalCollective` is the
one-process case. No Lightning here: the trainer hands in its data-parallel group.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch


class Collective(Protocol):
    rank: int
    world_size: int

    def all_gather_array(self, array: np.ndarray) -> list[np.ndarray]:
        """Every rank's `array` (same dtype and trailing shape; the first dim may differ)."""

    def all_gather_tensor(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `tensor`, on this rank's device (the first dim may differ)."""

    def all_gather_object(self, obj: Any) -> list[Any]: ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over ranks (returned; the input may be reused)."""

    def barrier(self) -> None: ...


class LocalCollective:
    """One process: every collective is the identity."""

    rank, world_size = 0, 1

    def all_gather_array(self, array: np.ndarray) -> list[np.ndarray]:
        return [array]

    def all_gather_tensor(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor]

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        pass


class TorchCollective:
    """A `torch.distributed` process group (default: the world). Tensors travel on `device`
    (CPU for gloo; the rank's CUDA device for NCCL)."""

    def __init__(self, group=None, *, device: torch.device | str | None = None):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("TorchCollective needs torch.distributed.init_process_group first")
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if device is None:
            nccl = dist.get_backend(group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu"
        self.device = torch.device(device)

    def all_gather_tensor(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `tensor` (the first dim may differ between ranks)."""
        tensor = tensor.to(self.device)
        sizes = self.all_gather_sizes(len(tensor))
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[: len(tensor)] = tensor
        out = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._dist.all_gather(out, padded.contiguous(), group=self.group)
        return [part[:size] for part, size in zip(out, sizes)]

    def all_gather_sizes(self, size: int) -> list[int]:
        mine = torch.tensor([size], dtype=torch.int64, device=self.device)
        sizes = [torch.empty_like(mine) for _ in range(self.world_size)]
        self._dist.all_gather(sizes, mine, group=self.group)
        return [int(s.item()) for s in sizes]

    def all_gather_array(self, array: np.ndarray) -> list[np.ndarray]:
        parts = self.all_gather_tensor(torch.from_numpy(np.ascontiguousarray(array)).to(self.device))
        return [p.cpu().numpy() for p in parts]

    def all_gather_object(self, obj: Any) -> list[Any]:
        out = [None] * self.world_size
        self._dist.all_gather_object(out, obj, group=self.group)
        return out

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        moved = tensor.to(self.device)
        self._dist.all_reduce(moved, group=self.group)
        return moved.to(tensor.device)

    def barrier(self) -> None:
        self._dist.barrier(group=self.group)
