"""Split a chain of units into pipeline stages: the optimal split and two baselines.

``plan_partition(chain, config)`` returns the split with the least simulated step time (or
memory, see ``optimize``) under a per-device memory cap, found by exact search
(``search.py``), next to the two common defaults evaluated on the same costs:

* ``equal_layers``: the same number of layers per stage, non-layer units (embedding,
  retrieval, head) kept with the first or last stage (torchtitan's and Megatron's default).
* ``balanced_params``: the least possible largest parameter count per stage, stages filled
  from the left (DeepSpeed's ``partition_method="parameters"``).

Both baselines move a cut that would split a group to the nearest allowed position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from itertools import pairwise

from trainers.partition.chain import (
    CostChain,
    MemoryModel,
    with_activation_checkpointing,
)
from trainers.partition.schedule import (
    ScheduleSpec,
    Simulation,
    simulate,
    simulate_order,
    stage_ranks,
    torch_order,
)
from trainers.partition.search import Problem, Score, SearchResult, fits_memory, search

OPTIMIZE = {"speed": 0.0, "memory": 1.0}


class InfeasibleError(ValueError):
    """No split fits the memory cap; ``smallest_fitting`` names a pipeline size that does."""

    def __init__(self, message: str, smallest_fitting: int | None) -> None:
        super().__init__(message)
        self.smallest_fitting = smallest_fitting


@dataclass(frozen=True, kw_only=True)
class PartitionConfig:
    """What to plan for.

    num_stages: pipeline ranks ``p``.
    schedule: schedule, micro-batches ``m`` and chunks per rank ``v``.
    batch_size: samples per step in one pipeline; costs are rescaled from the chain's
        micro-batch size to ``batch_size / m``. None: use the chain's costs as they are.
    memory_cap_bytes: per-device limit; None for none.
    optimize: "speed" (step time only), "memory" (largest per-rank memory only) or a weight
        in [0, 1] on memory, like SageMaker model parallel's ``optimize``.
    link_gb_per_s, link_latency_ms: the link between consecutive stages.
    memory: bytes per parameter for gradients and optimizer state.
    activation_checkpointing: which blocks run under ``torch.utils.checkpoint`` (None /
        "off", "full" = every block, n = every n-th block, or block names; see
        ``chain.with_activation_checkpointing``): they keep only their input for backward,
        recompute their forward in it, and hold one block's activations while they do.
        Refused under the split-backward schedules, as the runtime refuses it there.
    max_nodes: search budget; past it the answer is the best found, marked not exact.
    """

    num_stages: int
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    batch_size: int | None = None
    memory_cap_bytes: float | None = None
    optimize: str | float = "speed"
    link_gb_per_s: float = 25.0
    link_latency_ms: float = 0.01
    memory: MemoryModel = field(default_factory=MemoryModel)
    activation_checkpointing: str | int | tuple[str, ...] | None = None
    max_nodes: int = 500_000

    def __post_init__(self) -> None:
        if self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages} must be >= 1")
        if isinstance(self.optimize, str) and self.optimize not in OPTIMIZE:
            raise ValueError(f"optimize={self.optimize!r}: use 'speed', 'memory' or a number "
                             f"in [0, 1]")
        if not isinstance(self.optimize, str) and not 0.0 <= self.optimize <= 1.0:
            raise ValueError(f"optimize={self.optimize} must be within [0, 1]")
        if self.link_gb_per_s <= 0 or self.link_latency_ms < 0:
            raise ValueError(f"link_gb_per_s={self.link_gb_per_s} must be > 0 and "
                             f"link_latency_ms={self.link_latency_ms} >= 0")
        if self.memory_cap_bytes is not None and self.memory_cap_bytes <= 0:
            raise ValueError(f"memory_cap_bytes={self.memory_cap_bytes} must be > 0")
        if self.schedule.split_backward and self.activation_checkpointing not in (
                None, "off", 0, ()):
            raise ValueError(f"activation_checkpointing={self.activation_checkpointing!r} with "
                             f"schedule={self.schedule.name!r}: that schedule splits the "
                             f"backward, and each part reruns a checkpointed block's forward; "
                             f"use 'off' or a schedule that does not split it")
        m = self.schedule.num_microbatches
        if self.batch_size is not None and (self.batch_size < 1 or self.batch_size % m):
            raise ValueError(f"batch_size={self.batch_size} is not divisible by "
                             f"num_microbatches={m}; use a multiple of {m}")

    @property
    def alpha(self) -> float:
        return OPTIMIZE[self.optimize] if isinstance(self.optimize, str) else float(self.optimize)

    @property
    def num_chunks(self) -> int:
        return self.num_stages * self.schedule.virtual_stages


@dataclass(frozen=True)
class StagePlan:
    """One chunk of the chain (a stage when v = 1) and what it costs per micro-batch."""

    chunk: int
    rank: int
    units: tuple[str, ...]
    modules: tuple[str, ...]
    fwd_ms: float
    bwd_ms: float
    param_count: int
    static_bytes: float
    act_bytes: float
    recompute_bytes: float = 0.0  # the most one checkpointed unit rebuilds for its backward
    weight_grad_ms: float = 0.0  # the part of bwd_ms a split-backward schedule runs as W

    @property
    def compute_ms(self) -> float:
        return self.fwd_ms + self.bwd_ms


@dataclass(frozen=True)
class LayoutPlan:
    """A split, evaluated: per-rank compute and memory, simulated step, balance."""

    method: str
    cuts: tuple[int, ...]
    stages: tuple[StagePlan, ...]
    rank_compute_ms: tuple[float, ...]  # f + b per micro-batch, summed over a rank's chunks
    rank_memory_bytes: tuple[float, ...]  # static + peak in-flight activations
    imbalance: float  # max / mean of rank_compute_ms
    memory_imbalance: float
    step_ms: float
    bubble: float
    comm_bytes: float  # stage-boundary bytes per step, both directions
    fits: bool
    simulation: Simulation


@dataclass(frozen=True)
class PartitionResult:
    config: PartitionConfig
    chain: CostChain  # as planned (rescaled to the micro-batch size)
    plan: LayoutPlan
    baselines: dict[str, LayoutPlan | None]
    exact: bool
    search_nodes: int
    search_leaves: int


def plan_partition(chain: CostChain, config: PartitionConfig) -> PartitionResult:
    """The optimal split of ``chain`` for ``config``, with both baselines."""
    chain = with_activation_checkpointing(microbatch_chain(chain, config),
                                          config.activation_checkpointing)
    _check_sizes(chain, config)
    problem = make_problem(chain, config)
    baseline_cuts = {"equal_layers": equal_layer_cuts(chain, config.num_chunks),
                     "balanced_params": balanced_param_cuts(chain, config.num_chunks)}
    seeds = [c for c in (*baseline_cuts.values(), _item_level_cuts(chain, config))
             if c is not None]
    result = search(problem, lambda cuts: _score(chain, cuts, config, problem),
                    max_nodes=config.max_nodes, seeds=seeds)
    if result.cuts is None:
        raise _infeasible(chain, config)
    plan = evaluate_split(chain, result.cuts, config, method="optimal")
    baselines = {key: _maybe(chain, cuts, config, key) for key, cuts in baseline_cuts.items()}
    return PartitionResult(config, chain, plan, baselines, result.exact, result.nodes,
                           result.leaves)


def _item_level_cuts(chain: CostChain, config: PartitionConfig) -> tuple[int, ...] | None:
    """The best split that cuts only between whole items (layers), to seed the search."""
    starts = chain.item_starts()
    if len(starts) == len(chain) or len(starts) < config.num_chunks:
        return None
    bounds = starts + (len(chain),)
    items = []
    for i, (a, e) in enumerate(pairwise(bounds)):
        part = chain.units[a:e]
        items.append(replace(part[0], name=f"item{i}", fwd_ms=sum(u.fwd_ms for u in part),
                             bwd_ms=sum(u.bwd_ms for u in part),
                             param_count=sum(u.param_count for u in part),
                             param_bytes=sum(u.param_bytes for u in part),
                             low_precision_param_count=sum(u.low_precision_param_count
                                                           for u in part),
                             state_bytes=sum(u.state_bytes for u in part),
                             act_bytes=sum(u.act_bytes for u in part), out_bytes=part[-1].out_bytes,
                             recompute_bytes=max(u.recompute_bytes for u in part),
                             flops=sum(u.flops for u in part),
                             weight_grad_ms=sum(u.weight_grad_ms for u in part), layer=None))
    where = {a: i for i, a in enumerate(starts)}
    groups = tuple(tuple(sorted({where[max(s for s in starts if s <= k)] for k in g}))
                   for g in chain.groups)
    coarse = CostChain(units=tuple(items), groups=groups, microbatch_size=chain.microbatch_size)
    try:
        result = plan_partition(coarse, replace(config, batch_size=None))
    except ValueError:
        return None
    return tuple(starts[k] for k in result.plan.cuts)


def microbatch_chain(chain: CostChain, config: PartitionConfig) -> CostChain:
    """The chain's costs at the micro-batch size ``config`` implies."""
    if config.batch_size is None:
        return chain
    micro = config.batch_size // config.schedule.num_microbatches
    if chain.microbatch_size is None:
        raise ValueError("batch_size is set but the chain does not say which micro-batch size "
                         "its costs describe (CostChain.microbatch_size)")
    if micro == chain.microbatch_size:
        return chain
    scaled = chain.scaled(micro / chain.microbatch_size)
    return CostChain(units=scaled.units, groups=scaled.groups, microbatch_size=micro,
                     source=scaled.source, notes=scaled.notes)


def _check_sizes(chain: CostChain, config: PartitionConfig) -> None:
    segments = chain.num_segments()
    if config.num_chunks > segments:
        merged = ""
        if segments < len(chain):
            spans = [f"{chain.units[min(g)].name}..{chain.units[max(g)].name}"
                     for g in chain.groups if len(g) > 1 or min(g) != max(g)]
            merged = (f" ({len(chain)} units before merging groups {spans}; a tied weight far "
                      f"apart can be copied instead: chain_from_profile(tied='replicate'))")
        what = ("num_stages" if config.schedule.virtual_stages == 1
                else f"num_stages * virtual_stages = {config.num_stages} * "
                     f"{config.schedule.virtual_stages}")
        raise ValueError(f"{what} = {config.num_chunks} exceeds the {segments} units that can "
                         f"be placed apart{merged}; use at most {segments}")
    config.schedule.check(config.num_stages)


def make_problem(chain: CostChain, config: PartitionConfig) -> Problem:
    """Prefix sums and bounds' inputs for ``search``."""
    p, sched = config.num_stages, config.schedule
    m = sched.num_microbatches
    pf, pc, ps, pa, pw = [0.0], [0.0], [0.0], [0.0], [0.0]
    for unit in chain.units:
        pf.append(pf[-1] + unit.fwd_ms)
        pc.append(pc[-1] + unit.compute_ms)
        pw.append(pw[-1] + unit.weight_grad_ms)
        ps.append(ps[-1] + config.memory.static_bytes(unit))
        pa.append(pa[-1] + unit.act_bytes)
    comm = (0.0,) + tuple(transfer_ms(chain.units[k - 1].out_bytes, config)
                          for k in range(1, len(chain)))
    recompute = tuple(u.recompute_bytes for u in chain.units)
    recompute = recompute if any(recompute) else ()
    inflight = tuple(m if sched.name == "gpipe" else min(p - s, m) for s in range(p))
    time_ref = pc[-1] * (m + p - 1) / p if pc[-1] > 0 else 1.0
    memory_ref = (ps[-1] + pa[-1] * min(p, m)) / p if ps[-1] + pa[-1] > 0 else 1.0
    cap = math.inf if config.memory_cap_bytes is None else float(config.memory_cap_bytes)
    return Problem(num_units=len(chain), num_ranks=p, virtual_stages=sched.virtual_stages,
                   num_microbatches=m, fwd_prefix=tuple(pf), compute_prefix=tuple(pc),
                   static_prefix=tuple(ps),
                   act_prefix=tuple(pa), comm_ms=comm, allowed_cuts=chain.allowed_cuts(),
                   inflight=inflight, schedule=sched.name, memory_cap=cap, alpha=config.alpha,
                   time_ref=time_ref, memory_ref=memory_ref, recompute_bytes=recompute,
                   stage_rank=stage_ranks(sched, p), split_backward=sched.split_backward,
                   weight_prefix=tuple(pw))


def transfer_ms(num_bytes: float, config: PartitionConfig) -> float:
    """One boundary transfer: latency plus bytes over the link."""
    return config.link_latency_ms + num_bytes / (config.link_gb_per_s * 1e9) * 1e3


def _score(chain, cuts, config, problem: Problem) -> Score | None:
    """The objective of a split, without building its plan (the search calls this a lot)."""
    p = config.num_stages
    bounds = (0,) + tuple(cuts) + (len(chain),)
    pf, pc, ps, pa = (problem.fwd_prefix, problem.compute_prefix, problem.static_prefix,
                      problem.act_prefix)
    pairs = list(pairwise(bounds))
    fwd = [pf[e] - pf[a] for a, e in pairs]
    bwd = [pc[e] - pc[a] - f for (a, e), f in zip(pairs, fwd)]
    weight = [problem.weight_prefix[e] - problem.weight_prefix[a] for a, e in pairs]
    comm = [problem.comm_ms[b] if p > 1 else 0.0 for b in bounds[1:-1]]
    sim = _simulate(fwd, bwd, weight, comm, [pa[e] - pa[a] for a, e in pairs], config,
                    keep_ops=False)
    memory = list(sim.peak_act_bytes)
    rebuilt = [0.0] * p
    for k, (a, e) in enumerate(pairs):
        r = problem.stage_rank[k]
        memory[r] += ps[e] - ps[a]
        rebuilt[r] = max(rebuilt[r], problem.recompute_peak(a, e))
    memory = [mem + extra for mem, extra in zip(memory, rebuilt)]
    worst = max(memory)
    if worst > problem.memory_cap:
        return None
    return Score(problem.objective(sim.step_ms, worst), worst, sim.step_ms)


def evaluate_split(chain: CostChain, cuts, config: PartitionConfig, *, method: str,
                   keep_ops: bool = True) -> LayoutPlan:
    """Simulate the split whose chunks start at units ``cuts`` (after chunk 0)."""
    p = config.num_stages
    bounds = (0,) + tuple(cuts) + (len(chain),)
    assert len(bounds) == config.num_chunks + 1 and all(
        a < b for a, b in pairwise(bounds)), f"bad cuts {cuts}"
    ranks = stage_ranks(config.schedule, p)
    stages = tuple(_stage(chain, k, ranks[k], bounds[k], bounds[k + 1], config.memory)
                   for k in range(config.num_chunks))
    comm = [transfer_ms(chain.units[b - 1].out_bytes, config) if p > 1 else 0.0
            for b in bounds[1:-1]]
    sim = _simulate([s.fwd_ms for s in stages], [s.bwd_ms for s in stages],
                    [s.weight_grad_ms for s in stages], comm, [s.act_bytes for s in stages],
                    config, keep_ops=keep_ops)
    compute = [0.0] * p
    memory = list(sim.peak_act_bytes)
    rebuilt = [0.0] * p
    for stage in stages:
        compute[stage.rank] += stage.compute_ms
        memory[stage.rank] += stage.static_bytes
        rebuilt[stage.rank] = max(rebuilt[stage.rank], stage.recompute_bytes)
    memory = [mem + extra for mem, extra in zip(memory, rebuilt)]
    cap = config.memory_cap_bytes
    comm_bytes = 2 * config.schedule.num_microbatches * sum(
        chain.units[b - 1].out_bytes for b in bounds[1:-1]) if p > 1 else 0.0
    return LayoutPlan(method, tuple(cuts), stages, tuple(compute), tuple(memory),
                      _ratio(compute), _ratio(memory), sim.step_ms, sim.bubble, comm_bytes,
                      cap is None or max(memory) <= cap, sim)


def _simulate(fwd, bwd, weight, comm, act, config: PartitionConfig, *,
              keep_ops: bool) -> Simulation:
    """One step of the configured schedule over per-chunk costs: ``schedule.simulate``, or
    torch's order (``simulate_order``; I = bwd - weight and W = weight under a
    split-backward schedule, whole backwards otherwise)."""
    sched, p = config.schedule, config.num_stages
    if not sched.torch_ordered:
        return simulate(fwd, bwd, comm, sched, num_ranks=p, act_bytes=act, keep_ops=keep_ops)
    if not sched.split_backward:
        weight = [0.0] * len(bwd)
    orders = torch_order(sched.name, p, sched.num_microbatches, sched.virtual_stages)
    sim = simulate_order(orders, fwd, [b - w for b, w in zip(bwd, weight)], weight, comm,
                         act_bytes=act, keep_ops=keep_ops)
    return Simulation(sim.step_ms, sim.bubble, sim.busy_ms, sim.peak_held,
                      sim.peak_act_bytes, sim.ops)


def _stage(chain, chunk, rank, a, e, memory: MemoryModel) -> StagePlan:
    units = chain.units[a:e]
    return StagePlan(chunk, rank, tuple(u.name for u in units),
                     tuple(m for u in units for m in u.modules),
                     sum(u.fwd_ms for u in units), sum(u.bwd_ms for u in units),
                     sum(u.param_count for u in units),
                     sum(memory.static_bytes(u) for u in units), sum(u.act_bytes for u in units),
                     max((u.recompute_bytes for u in units), default=0.0),
                     sum(u.weight_grad_ms for u in units))


def _ratio(values) -> float:
    mean = sum(values) / len(values)
    return max(values) / mean if mean > 0 else 1.0


def _maybe(chain, cuts, config, method) -> LayoutPlan | None:
    return None if cuts is None else evaluate_split(chain, cuts, config, method=method)


def equal_layer_cuts(chain: CostChain, num_chunks: int) -> tuple[int, ...] | None:
    """Cuts giving each chunk the same number of layers (extra ones to the first chunks);
    units before the first layer go with the first chunk, after the last with the last."""
    starts = chain.item_starts()
    layers = [i for i in starts if chain.units[i].is_layer] or list(starts)
    if len(layers) < num_chunks:
        return None
    base, extra = divmod(len(layers), num_chunks)
    wanted, pos = [], 0
    for k in range(num_chunks - 1):
        pos += base + (1 if k < extra else 0)
        wanted.append(layers[pos])
    return snap_cuts(wanted, _baseline_cuts(chain))


def _baseline_cuts(chain: CostChain) -> tuple[int, ...]:
    """Where the baselines may cut: between whole items, outside groups."""
    starts = set(chain.item_starts())
    return tuple(k for k in chain.allowed_cuts() if k in starts)


def snap_cuts(wanted, allowed) -> tuple[int, ...] | None:
    """Move each wanted cut to the nearest allowed one, keeping them increasing."""
    chosen: list[int] = []
    for j, cut in enumerate(wanted):
        later = len(wanted) - j - 1
        options = [k for k in allowed if (not chosen or k > chosen[-1])]
        options = options[:len(options) - later] if later else options
        if not options:
            return None
        chosen.append(min(options, key=lambda k: (abs(k - cut), k)))
    return tuple(chosen)


def balanced_param_cuts(chain: CostChain, num_chunks: int) -> tuple[int, ...] | None:
    """Least largest per-chunk parameter weight, chunks filled greedily from the left."""
    weights = chain.param_weights()
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    starts = (0,) + _baseline_cuts(chain)
    n = len(chain)
    if num_chunks > len(starts):
        return None
    best = _min_max_table(prefix, starts, n, num_chunks)
    target = best[num_chunks][0]
    cuts, a = [], 0
    for left in range(num_chunks, 1, -1):
        options = [e for e in starts if e > a and prefix[e] - prefix[a] <= target
                   and best[left - 1][e] <= target]
        a = max(options)
        cuts.append(a)
    return tuple(cuts)


def _min_max_table(prefix, starts, n, parts):
    """best[r][i]: least largest part sum cutting units i..n-1 into r parts."""
    best = [dict.fromkeys(starts + (n,), math.inf) for _ in range(parts + 1)]
    best[0][n] = 0.0
    for r in range(1, parts + 1):
        for a in starts:
            ends = (n,) if r == 1 else [e for e in starts if e > a]
            for e in ends:
                best[r][a] = min(best[r][a], max(prefix[e] - prefix[a], best[r - 1][e]))
    return best


def _infeasible(chain: CostChain, config: PartitionConfig) -> InfeasibleError:
    cap = config.memory_cap_bytes
    fitting = smallest_fitting_stages(chain, config)
    hint = (f"the smallest pipeline that fits is num_stages={fitting} (1F1B, "
            f"num_microbatches >= {fitting})" if fitting
            else f"no pipeline of up to {chain.num_segments()} stages fits")
    return InfeasibleError(f"no split into {config.num_stages} stages "
                           f"(schedule={config.schedule.name!r}) fits "
                           f"memory_cap_bytes={cap:.4g}; {hint}", fitting)


def smallest_fitting_stages(chain: CostChain, config: PartitionConfig) -> int | None:
    """Smallest p (one chunk per rank, 1F1B or GPipe as configured) with a split under the cap."""
    name = "gpipe" if config.schedule.name == "gpipe" else "1f1b"
    for p in range(1, chain.num_segments() + 1):
        m = max(config.schedule.num_microbatches, p)
        trial = PartitionConfig(num_stages=p, schedule=ScheduleSpec(name=name, num_microbatches=m),
                                memory_cap_bytes=config.memory_cap_bytes, memory=config.memory,
                                link_gb_per_s=config.link_gb_per_s)
        if fits_memory(make_problem(chain, trial)):
            return p
    return None


__all__ = [
    "InfeasibleError",
    "LayoutPlan",
    "PartitionConfig",
    "PartitionResult",
    "SearchResult",
    "StagePlan",
    "balanced_param_cuts",
    "equal_layer_cuts",
    "evaluate_split",
    "plan_partition",
    "smallest_fitting_stages",
]
