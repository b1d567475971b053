"""Parallel degrees and the ("dp", "pp", "tp") device mesh.

`ParallelDims` checks a layout against the world size before any process group work, and
builds the mesh once the group exists. Ranks are laid out row-major over (dp, pp, tp), so
tensor parallelism is the fastest-varying axis (neighbouring ranks, one node) and data
parallelism the slowest:

    rank = (dp_rank * pp + pp_rank) * tp + tp_rank
"""

from __future__ import annotations

from dataclasses import dataclass

MESH_AXES = ("dp", "pp", "tp")


class ParallelConfigError(ValueError):
    """A parallel layout that cannot run; raised before any work starts."""


@dataclass(kw_only=True)
class ParallelDims:
    """How `world_size` ranks split into data, pipeline and tensor parallel groups.

    Args:
        world_size: number of processes in the job.
        pipeline_parallel_size: pipeline ranks (each holds one or more stages).
        tensor_parallel_size: ranks that shard each attention and MLP layer.
        data_parallel_size: model replicas; None takes the rest of the world size.
    """

    world_size: int
    pipeline_parallel_size: int = 1
    tensor_parallel_size: int = 1
    data_parallel_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("world_size", "pipeline_parallel_size", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ParallelConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        model_ranks = self.pipeline_parallel_size * self.tensor_parallel_size
        if self.data_parallel_size is None:
            if self.world_size % model_ranks:
                raise ParallelConfigError(
                    f"world size {self.world_size} is not divisible by pipeline_parallel_size="
                    f"{self.pipeline_parallel_size} x tensor_parallel_size="
                    f"{self.tensor_parallel_size} = {model_ranks}; choose sizes whose product "
                    f"divides {self.world_size}"
                )
            self.data_parallel_size = self.world_size // model_ranks
        elif self.data_parallel_size < 1:
            raise ParallelConfigError(
                f"data_parallel_size must be >= 1 (or None for the rest of the world), "
                f"got {self.data_parallel_size}"
            )
        product = self.data_parallel_size * model_ranks
        if product != self.world_size:
            raise ParallelConfigError(
                f"data_parallel_size={self.data_parallel_size} x pipeline_parallel_size="
                f"{self.pipeline_parallel_size} x tensor_parallel_size="
                f"{self.tensor_parallel_size} = {product}, but the world size is "
                f"{self.world_size}; the product must equal the world size (leave "
                f"data_parallel_size unset to take the rest)"
            )

    @property
    def dp(self) -> int:
        return self.data_parallel_size  # type: ignore[return-value]

    @property
    def pp(self) -> int:
        return self.pipeline_parallel_size

    @property
    def tp(self) -> int:
        return self.tensor_parallel_size

    @property
    def shape(self) -> tuple[int, int, int]:
        """Mesh shape in `MESH_AXES` order."""
        return self.dp, self.pp, self.tp

    def coordinates(self, rank: int) -> dict[str, int]:
        """This rank's position on each axis: {"dp": ..., "pp": ..., "tp": ...}."""
        if not 0 <= rank < self.world_size:
            raise ParallelConfigError(f"rank {rank} is outside the world of {self.world_size}")
        dp_rank, rest = divmod(rank, self.pp * self.tp)
        pp_rank, tp_rank = divmod(rest, self.tp)
        return {"dp": dp_rank, "pp": pp_rank, "tp": tp_rank}

    def group_ranks(self, axis: str, rank: int) -> list[int]:
        """The global ranks that share `rank`'s group along `axis` (ordered by that axis)."""
        if axis not in MESH_AXES:
            raise ParallelConfigError(f"unknown mesh axis {axis!r}; axes are {MESH_AXES}")
        coords = self.coordinates(rank)
        ranks = []
        for index in range(dict(zip(MESH_AXES, self.shape))[axis]):
            c = {**coords, axis: index}
            ranks.append((c["dp"] * self.pp + c["pp"]) * self.tp + c["tp"])
        return ranks

    def build_mesh(self, device_type: str = "cpu"):
        """The `DeviceMesh` over the default process group, axes ("dp", "pp", "tp")."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            raise RuntimeError("build_mesh needs torch.distributed.init_process_group first")
        if dist.get_world_size() != self.world_size:
            raise ParallelConfigError(
                f"ParallelDims was checked for world size {self.world_size}, but the "
                f"process group has {dist.get_world_size()} ranks"
            )
        return init_device_mesh(device_type, self.shape, mesh_dim_names=MESH_AXES)
