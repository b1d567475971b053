"""Automatic pipeline partitioner and parallel-layout planner (torch only, no Lightning).

    profile = trace_model(model, batch)                  # or trace_model(..., analytic=True)
    result = plan(profile, PartitionConfig(num_stages=4))
    result.plan.stages, result.plan.imbalance, result.baselines
    estimate_step(GPTShape(...), Cluster(gpu=GPUS["a100-80gb"], num_nodes=8),
                  TrainLayout(tp=8, pp=8, global_batch=64))   # a layout's step and memory

``plan`` also takes a ``CostChain`` (e.g. ``CostChain.from_lists(times, memories, groups=...)``).
See ``trainers/partition/README.md`` for what is exact and the JSON format.
"""

from __future__ import annotations

from trainers.partition.chain import CostChain, MemoryModel, UnitCost
from trainers.partition.costs import DeviceSpec
from trainers.partition.gpt import GPTShape, StepEstimate, TrainLayout, estimate_step, rank_layouts
from trainers.partition.hardware import GPUS, Cluster, gpu_spec
from trainers.partition.partition import (
    InfeasibleError,
    PartitionConfig,
    PartitionResult,
    plan_partition,
)
from trainers.partition.schedule import ScheduleSpec
from trainers.partition.trace import Profile, trace_model
from trainers.partition.units import chain_from_profile


def plan(source: Profile | CostChain, config: PartitionConfig, **chain_options) -> PartitionResult:
    """The optimal split of a profile (made into a chain with ``chain_options``) or a chain."""
    chain = chain_from_profile(source, **chain_options) if isinstance(source, Profile) else source
    return plan_partition(chain, config)


__all__ = ["GPUS", "Cluster", "CostChain", "DeviceSpec", "GPTShape", "InfeasibleError",
           "MemoryModel", "PartitionConfig", "PartitionResult", "Profile", "ScheduleSpec",
           "StepEstimate", "TrainLayout", "UnitCost", "chain_from_profile", "estimate_step",
           "gpu_spec", "plan", "plan_partition", "rank_layouts", "trace_model"]
