"""`partition="auto"`: the partitioner's plan for a `rag_mm` model, as stage unit lists.

The model is costed analytically (meta device, shapes only) for the device this process
trains on (`hardware.local_device_spec`: the named GPU spec under CUDA, a fixed CPU spec
otherwise, the same on every rank; or a GPU named by the caller), at the batch size it
trains with, with FSDP2 over dp as the runtime runs it and the blocks it checkpoints, cut by
`trainers.partition.plan_partition` under that device's memory and the planner schedule
of the run (those with several stages a rank at 2 each, the ones torch orders itself
simulated in its order and placement), and returned as unit-name lists in stage order
(chunk c of an interleaved plan is stage c).
"""

from __future__ import annotations

from dataclasses import fields

from trainers.parallel.pipeline import SCHEDULES


def planner_schedule(schedule: str, num_microbatches: int):
    """The planner's ScheduleSpec for the runtime's `schedule`: the same schedule, with 2
    stages per rank where it takes several (those of
    `trainers.partition.schedule.TORCH_CLASSES`, looped BFS and the split-backward ones,
    simulated in torch's own order and stage placement)."""
    from trainers.partition.schedule import ScheduleSpec

    stages_per_rank = 1 if SCHEDULES[schedule][1] == "one" else 2
    return ScheduleSpec(name=schedule, num_microbatches=num_microbatches,
                        virtual_stages=stages_per_rank)


def auto_partition(config, *, pp_size: int, schedule: str, num_microbatches: int,
                   batch_size: int | None = None, dp_size: int = 1,
                   activation_checkpointing=None, device=None,
                   bf16: bool = False) -> list[list[str]]:
    """Stages (unit names) for a `rag_mm.config.ModelConfig` on `pp_size` pipeline ranks.

    batch_size: samples per step in one pipeline, i.e. one data-parallel replica's loader
        batch (None: costed per micro-batch of one sample).
    dp_size: data-parallel ranks FSDP2 shards over, costed as the runtime runs it (the
        optimizer state and resting weights sharded; weights and gradients whole during the
        step: `trainers.partition.chain.MemoryModel.deferred_gradient_sync`).
    activation_checkpointing: the blocks the runtime checkpoints: None / "off", "full"
        (every block), n (every n-th block) or block names
        (`trainers.partition.chain.with_activation_checkpointing`).
    device: a GPU name of `trainers.partition.hardware.GPUS` (e.g. "h100-80gb"),
        "measured" (this machine timed, `hardware.measured_device_spec`; under
        torch.distributed every rank times and all take the slowest, so they plan alike), a
        `trainers.partition.costs.DeviceSpec`, or None: this process's device
        (`hardware.local_device_spec`).
    bf16: the run trains under a bf16 precision, so with dp > 1 `parallelize` gives the
        attention and MLP layers bf16 FSDP2 groups: their whole weights during the step are
        bf16 (2 B), not fp32 (`MemoryModel.low_precision_bytes`); their gradients stay fp32.
    """
    result = auto_plan(config, pp_size=pp_size, schedule=schedule,
                       num_microbatches=num_microbatches, batch_size=batch_size,
                       dp_size=dp_size, activation_checkpointing=activation_checkpointing,
                       device=device, bf16=bf16)
    stages = sorted(result.plan.stages, key=lambda stage: stage.chunk)
    return [list(stage.units) for stage in stages]


def auto_plan(config, *, pp_size: int, schedule: str, num_microbatches: int,
              batch_size: int | None = None, dp_size: int = 1,
              activation_checkpointing=None, device=None, bf16: bool = False):
    """The partitioner's whole `PartitionResult` behind `auto_partition` (per-stage
    parameter counts, memory and times of the chosen split); the same arguments."""
    from trainers.parallel.parallelize import MATMUL_MODULE_TYPES
    from trainers.partition.chain import MemoryModel
    from trainers.partition.hardware import (
        device_spec_for,
        local_device_spec,
        measured_device_spec,
    )
    from trainers.partition.models import profile_rag
    from trainers.partition.partition import PartitionConfig, plan_partition
    from trainers.partition.units import chain_from_profile

    if device == "measured":
        device = _agreed(measured_device_spec())
    elif isinstance(device, str):
        device = device_spec_for(device)
    device = device or local_device_spec()
    as_fields = {f.name: getattr(config, f.name) for f in fields(config) if f.name != "name"}
    profile = profile_rag("tiny", analytic=True, batch_size=1, device=device, **as_fields)
    low = tuple(cls.__name__ for cls in MATMUL_MODULE_TYPES)
    return plan_partition(chain_from_profile(profile, low_precision_types=low), PartitionConfig(
        num_stages=pp_size, batch_size=batch_size, memory_cap_bytes=device.memory_gib * 2**30,
        memory=MemoryModel(data_parallel_shards=dp_size,
                           low_precision_bytes=2.0 if bf16 else None),
        activation_checkpointing=activation_checkpointing,
        schedule=planner_schedule(schedule, num_microbatches)))


def _agreed(spec):
    """The same spec on every rank: the minimum of each timed rate over the process group
    (every rank plans alike); ``spec`` itself outside torch.distributed."""
    from dataclasses import replace

    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return spec
    on = "cuda" if dist.get_backend() == "nccl" else "cpu"
    rates = torch.tensor([spec.tflops, spec.mem_gb_per_s, spec.memory_gib],
                         dtype=torch.float64, device=on)
    dist.all_reduce(rates, op=dist.ReduceOp.MIN)
    tflops, gb_per_s, memory_gib = rates.tolist()
    return replace(spec, tflops=tflops, mem_gb_per_s=gb_per_s, memory_gib=memory_gib)
