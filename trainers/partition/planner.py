"""Rank (dp, pp, tp, micro-batches, schedule) layouts of a model on a cluster.

For each layout the unit chain (costed once, at some micro-batch size) is rescaled to the
layout's micro-batch, sharded by tensor parallelism, partitioned exactly into pipeline
stages under the GPU memory, and simulated. The predicted step time is

    pipeline (simulated; tensor-parallel all-reduces on every unit's critical path,
              stage transfers overlapped with compute)
  + data-parallel gradient all-reduce (not overlapped: an upper bound)
  + optimizer update (memory bound).

Placement: tensor parallel ranks innermost (consecutive GPUs of a node), then data
parallel, then pipeline stages outermost (Megatron's order). A group whose GPUs sit in
several nodes shares each node's network link among all the node's GPUs.

Collectives follow the alpha-beta model of NCCL: an all-reduce of S bytes over n GPUs moves
2 (n-1)/n S bytes per GPU through the slowest link (bandwidth optimal, independent of how
many nodes), plus 2 ceil(log2 n) link latencies (tree). Across nodes it is hierarchical:
reduce-scatter and all-gather inside each node, all-reduce of the node's 1/g share between
nodes.

Tensor parallelism (Megatron): unit compute, parameters and activations divide by tp; a
layer does 4 all-reduces of its hidden activation per micro-batch (2 forward, 2 backward),
other units 2; stage transfers send 1/tp of the activation from every tensor rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from trainers.partition.chain import CostChain, MemoryModel
from trainers.partition.costs import DeviceSpec
from trainers.partition.partition import (
    InfeasibleError,
    PartitionConfig,
    PartitionResult,
    plan_partition,
)
from trainers.partition.schedule import ScheduleSpec

PRECISIONS = {
    # name: (bytes scale from an fp32 trace, memory model)
    "bf16-mixed": (0.5, MemoryModel(grad_bytes_per_param=2, optimizer_bytes_per_param=8,
                                    master_bytes_per_param=4)),
    "fp32": (1.0, MemoryModel()),
}


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    """Nodes of identical GPUs.

    gpu: peak TFLOP/s, memory, memory bandwidth of one GPU.
    intra_node_gb_per_s: per-GPU bandwidth to the other GPUs of its node (NVLink), one way.
    inter_node_gbit_per_s: one node's network bandwidth, shared by its GPUs.
    """

    num_nodes: int
    gpus_per_node: int
    gpu: DeviceSpec = field(default_factory=DeviceSpec)
    intra_node_gb_per_s: float = 300.0
    inter_node_gbit_per_s: float = 400.0
    intra_latency_us: float = 5.0
    inter_latency_us: float = 15.0

    def __post_init__(self) -> None:
        if self.num_nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"num_nodes={self.num_nodes} and gpus_per_node="
                             f"{self.gpus_per_node} must be >= 1")
        if self.intra_node_gb_per_s <= 0 or self.inter_node_gbit_per_s <= 0:
            raise ValueError("intra_node_gb_per_s and inter_node_gbit_per_s must be > 0")

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def inter_gb_per_s_per_gpu(self) -> float:
        return self.inter_node_gbit_per_s / 8 / self.gpus_per_node


@dataclass(frozen=True, kw_only=True)
class Layout:
    dp: int
    pp: int
    tp: int
    num_microbatches: int
    schedule: str = "1f1b"
    virtual_stages: int = 1

    def describe(self) -> str:
        v = f" v={self.virtual_stages}" if self.virtual_stages > 1 else ""
        return (f"dp={self.dp} pp={self.pp} tp={self.tp} m={self.num_microbatches} "
                f"{self.schedule}{v}")


@dataclass(frozen=True)
class Estimate:
    """A layout's predicted step, memory and traffic (per GPU)."""

    layout: Layout
    fits: bool
    reason: str
    step_ms: float = math.inf
    pipeline_ms: float = 0.0
    tp_ms: float = 0.0  # tensor-parallel all-reduce time inside the pipeline (per step)
    dp_ms: float = 0.0
    optimizer_ms: float = 0.0
    bubble: float = 0.0
    imbalance: float = 0.0
    memory_bytes: float = 0.0
    comm_bytes: dict = field(default_factory=dict)  # per GPU per step: tp, pp, dp
    samples_per_s: float = 0.0
    exact: bool = True
    partition: PartitionResult | None = None


@dataclass(frozen=True)
class _Span:
    size: int
    nodes: int
    per_node: int


def group_span(cluster: ClusterSpec, size: int, stride: int) -> _Span:
    """Where a group of ``size`` GPUs spaced ``stride`` apart sits."""
    g = cluster.gpus_per_node
    if stride >= g:
        nodes = size
    else:
        nodes = max(1, math.ceil(size * stride / g))
    return _Span(size, nodes, max(1, size // nodes))


def allreduce_ms(num_bytes: float, span: _Span, cluster: ClusterSpec) -> float:
    """One all-reduce of ``num_bytes`` (each GPU's full operand) over ``span``."""
    n = span.size
    if n <= 1 or num_bytes <= 0:
        return 0.0
    steps = 2 * math.ceil(math.log2(n))
    if span.nodes == 1:
        return (2 * (n - 1) / n * num_bytes / (cluster.intra_node_gb_per_s * 1e9) * 1e3
                + steps * cluster.intra_latency_us / 1e3)
    g, nodes = span.per_node, span.nodes
    intra = 2 * (g - 1) / g * num_bytes / (cluster.intra_node_gb_per_s * 1e9) if g > 1 else 0.0
    inter = 2 * (nodes - 1) / nodes * (num_bytes / g) / (cluster.inter_gb_per_s_per_gpu * 1e9)
    return (intra + inter) * 1e3 + steps * cluster.inter_latency_us / 1e3


def estimate(chain: CostChain, cluster: ClusterSpec, layout: Layout, *, global_batch: int,
             precision: str = "bf16-mixed", max_nodes: int = 20_000) -> Estimate:
    """Predict one layout. ``chain`` costs are for ``chain.microbatch_size`` samples."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)}")
    dp, pp, tp, m = layout.dp, layout.pp, layout.tp, layout.num_microbatches
    if dp * pp * tp != cluster.num_gpus:
        return Estimate(layout, False, f"dp*pp*tp={dp * pp * tp} != {cluster.num_gpus} GPUs")
    if global_batch % (dp * m):
        return Estimate(layout, False, f"global batch {global_batch} not divisible by dp*m")
    scale, memory = PRECISIONS[precision]
    sharded = shard_chain(chain, cluster, tp, global_batch // (dp * m), scale)
    link_gb_per_s, latency_us = _stage_link(cluster, tp, dp)
    config = PartitionConfig(
        num_stages=pp, memory=memory, link_gb_per_s=link_gb_per_s,
        link_latency_ms=latency_us / 1e3, memory_cap_bytes=cluster.gpu.memory_gib * 2**30,
        max_nodes=max_nodes, schedule=ScheduleSpec(name=layout.schedule, num_microbatches=m,
                                                   virtual_stages=layout.virtual_stages))
    try:
        result = plan_partition(sharded, config)
    except InfeasibleError as err:
        return Estimate(layout, False, f"out of memory: {err}")
    except ValueError as err:
        return Estimate(layout, False, str(err))
    plan = result.plan
    rank_params = [0] * pp
    for stage in plan.stages:
        rank_params[stage.rank] += stage.param_count
    grad_bytes = max(rank_params) * (memory.grad_bytes_per_param or 4)
    dp_ms = allreduce_ms(grad_bytes, group_span(cluster, dp, tp), cluster)
    optimizer_ms = max(rank_params) * 16 / (cluster.gpu.mem_gb_per_s * 1e9) * 1e3  # Adam r/w
    tp_ms, comm = _traffic(result, sharded, cluster, layout)
    comm["dp"] = grad_bytes * 2 * (dp - 1) / dp if dp > 1 else 0.0
    step = plan.step_ms + dp_ms + optimizer_ms
    return Estimate(layout, plan.fits, "" if plan.fits else "over memory", step,
                    plan.step_ms, tp_ms, dp_ms, optimizer_ms, plan.bubble,
                    plan.imbalance, max(plan.rank_memory_bytes), comm,
                    global_batch / step * 1e3, result.exact, result)


def _stage_link(cluster: ClusterSpec, tp: int, dp: int) -> tuple[float, float]:
    """Per-GPU bandwidth and latency between pipeline neighbours (``tp * dp`` GPUs apart)."""
    if tp * dp >= cluster.gpus_per_node and cluster.num_nodes > 1:
        return cluster.inter_gb_per_s_per_gpu, cluster.inter_latency_us
    return cluster.intra_node_gb_per_s, cluster.intra_latency_us


def _traffic(result: PartitionResult, sharded: CostChain, cluster: ClusterSpec,
             layout: Layout) -> tuple[float, dict]:
    """Busiest rank's tensor-parallel all-reduce time per step, and bytes per GPU per step."""
    pp, tp, m = layout.pp, layout.tp, layout.num_microbatches
    tp_span = group_span(cluster, tp, 1)
    tp_ms, tp_bytes, pp_bytes = [0.0] * pp, [0.0] * pp, [0.0] * pp
    for stage in result.plan.stages:
        for name in stage.units:
            unit = sharded.units[sharded.index_of(name)]
            operand = unit.out_bytes * tp  # each tensor rank all-reduces the whole activation
            tp_ms[stage.rank] += m * _tp_count(unit) * allreduce_ms(operand, tp_span, cluster)
            tp_bytes[stage.rank] += m * _tp_count(unit) * operand * 2 * (tp - 1) / tp
    for chunk, cut in enumerate(result.plan.cuts, start=1):  # sender and receiver
        sent = 2 * m * sharded.units[cut - 1].out_bytes
        pp_bytes[(chunk - 1) % pp] += sent
        pp_bytes[chunk % pp] += sent
    return max(tp_ms), {"tp": max(tp_bytes), "pp": max(pp_bytes)}


def shard_chain(chain: CostChain, cluster: ClusterSpec, tp: int, micro: int,
                scale: float) -> CostChain:
    """Per-GPU unit costs at micro-batch ``micro`` under ``tp``-way tensor parallelism."""
    if chain.microbatch_size is None:
        raise ValueError("the chain must say its micro-batch size (CostChain.microbatch_size)")
    factor = micro / chain.microbatch_size
    span = group_span(cluster, tp, 1)
    units = []
    for unit in chain.units:
        out = unit.out_bytes * factor * scale
        tp_ms = _tp_count(unit) * allreduce_ms(out, span, cluster) / 2
        units.append(replace(
            unit, fwd_ms=unit.fwd_ms * factor / tp + tp_ms, bwd_ms=unit.bwd_ms * factor / tp + tp_ms,
            param_count=math.ceil(unit.param_count / tp), param_bytes=unit.param_bytes * scale / tp,
            state_bytes=unit.state_bytes * scale / tp,
            act_bytes=unit.act_bytes * factor * scale / tp, out_bytes=out / tp,
            flops=unit.flops * factor / tp))
    return CostChain(units=tuple(units), groups=chain.groups, microbatch_size=micro,
                     source=chain.source, notes=chain.notes)


def _tp_count(unit) -> int:
    return 4 if unit.is_layer else 2


def candidate_layouts(chain: CostChain, cluster: ClusterSpec, global_batch: int,
                      *, max_tp: int | None = None, schedules=("1f1b", "gpipe",
                                                                "interleaved_1f1b")):
    """Every (dp, pp, tp, m, schedule) worth estimating."""
    n = cluster.num_gpus
    segments = chain.num_segments()
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    for tp in divisors:
        if max_tp is not None and tp > max_tp:
            continue
        for pp in divisors:
            if (n // tp) % pp or pp > segments:
                continue
            dp = n // (tp * pp)
            if global_batch % dp:
                continue
            per_replica = global_batch // dp
            for m in sorted({pp * k for k in (1, 2, 4, 8)} | {1}):
                if m > per_replica or per_replica % m:
                    continue
                for name in schedules:
                    if pp == 1 and name != "1f1b":
                        continue
                    if name in ("1f1b", "interleaved_1f1b") and m < pp:
                        continue
                    if name == "interleaved_1f1b" and (m % pp or 2 * pp > segments or pp == 1):
                        continue
                    v = 2 if name == "interleaved_1f1b" else 1
                    yield Layout(dp=dp, pp=pp, tp=tp, num_microbatches=m, schedule=name,
                                 virtual_stages=v)


def rank_layouts(chain: CostChain, cluster: ClusterSpec, *, global_batch: int,
                 precision: str = "bf16-mixed", max_tp: int | None = None,
                 schedules=("1f1b", "gpipe", "interleaved_1f1b")) -> list[Estimate]:
    """All candidate layouts, fitting ones first, each group by predicted step time."""
    estimates = [estimate(chain, cluster, layout, global_batch=global_batch,
                          precision=precision)
                 for layout in candidate_layouts(chain, cluster, global_batch, max_tp=max_tp,
                                                 schedules=schedules)]
    return sorted(estimates, key=lambda e: (not e.fits, e.step_ms, e.layout.describe()))


def source_case_cluster() -> ClusterSpec:
    """16 nodes x 8 A100 (40 GB), 400 Gb/s between nodes, NVLink inside."""
    return ClusterSpec(num_nodes=16, gpus_per_node=8, gpu=DeviceSpec(),
                       intra_node_gb_per_s=300.0, inter_node_gbit_per_s=400.0)


def compare_source_case(chain: CostChain, *, global_batch: int, precision: str = "bf16-mixed",
                        rank_all: bool = False) -> dict:
    """Tensor parallelism across all 16 nodes (tp=128) against a 16-stage pipeline across
    nodes with tp=8 inside each node; each with its best micro-batch count and schedule.
    ``rank_all`` also ranks every layout to name the best one overall."""
    cluster = source_case_cluster()
    layouts = [lay for lay in candidate_layouts(chain, cluster, global_batch)
               if (lay.pp, lay.tp) in ((1, 128), (16, 8)) or rank_all]
    ranked = sorted((estimate(chain, cluster, lay, global_batch=global_batch,
                              precision=precision) for lay in layouts),
                    key=lambda e: (not e.fits, e.step_ms, e.layout.describe()))

    def best(pp: int, tp: int) -> Estimate | None:
        pick = [e for e in ranked if e.layout.pp == pp and e.layout.tp == tp and e.fits]
        return pick[0] if pick else None

    tp_across, pipeline = best(1, 128), best(16, 8)
    out = {"cluster": cluster, "tp_across_nodes": tp_across, "pipeline_across_nodes": pipeline,
           "authors_estimate_ratio": 0.5 + 0.5 / math.log2(16),
           "authors_measured_ratio": 1 / 1.38,
           "best": next((e for e in ranked if e.fits), None) if rank_all else None}
    if tp_across and pipeline:
        out["predicted_ratio"] = pipeline.step_ms / tp_across.step_ms
    return out
