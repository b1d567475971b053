"""ParallelDims: degrees from the world size, clear errors, rank layout, the device mesh.

Run: .venv/bin/pytest tests/test_parallel_mesh.py -q
"""

from __future__ import annotations

import itertools

import pytest

from trainers.parallel.mesh import MESH_AXES, ParallelConfigError, ParallelDims


def test_data_parallel_takes_the_rest_of_the_world():
    dims = ParallelDims(world_size=16, pipeline_parallel_size=2, tensor_parallel_size=4)
    assert (dims.dp, dims.pp, dims.tp) == (2, 2, 4)
    assert dims.shape == (2, 2, 4)
    assert ParallelDims(world_size=3).shape == (3, 1, 1)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"world_size": 6, "pipeline_parallel_size": 4}, ["world size 6", "divisible", "= 4"]),
        ({"world_size": 8, "pipeline_parallel_size": 2, "tensor_parallel_size": 2,
              "data_parallel_size": 3}, ["data_parallel_size=3", "12", "world size is 8"]),
        ({"world_size": 4, "tensor_parallel_size": 0}, ["tensor_parallel_size", ">= 1"]),
        ({"world_size": 4, "data_parallel_size": 0}, ["data_parallel_size", ">= 1"]),
    ],
)
def test_bad_sizes_name_the_flag_and_the_world(kwargs, words):
    with pytest.raises(ParallelConfigError) as info:
        ParallelDims(**kwargs)
    for word in words:
        assert word in str(info.value)
    assert isinstance(info.value, ValueError)


def test_rank_layout_is_row_major_over_dp_pp_tp():
    dims = ParallelDims(world_size=12, pipeline_parallel_size=3, tensor_parallel_size=2)
    seen = set()
    for rank in range(12):
        c = dims.coordinates(rank)
        assert rank == (c["dp"] * dims.pp + c["pp"]) * dims.tp + c["tp"]
        seen.add(tuple(c[a] for a in MESH_AXES))
    assert seen == set(itertools.product(range(2), range(3), range(2)))
    # tp neighbours are adjacent ranks; each axis' group varies only that coordinate.
    assert dims.group_ranks("tp", 7) == [6, 7]
    assert dims.group_ranks("pp", 7) == [7, 9, 11] and dims.group_ranks("pp", 1) == [1, 3, 5]
    assert dims.group_ranks("dp", 7) == [1, 7]
    with pytest.raises(ParallelConfigError, match="rank 12"):
        dims.coordinates(12)
    with pytest.raises(ParallelConfigError, match="unknown mesh axis"):
        dims.group_ranks("ep", 0)


def test_build_mesh_needs_a_process_group_of_the_checked_size():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ParallelDims(world_size=2).build_mesh()
