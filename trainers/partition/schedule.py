"""Pipeline schedule simulator: GPipe, 1F1B and interleaved 1F1B; and (``simulate_order``)
any per-rank order of forwards, whole backwards and input- and weight-gradient backwards, as
torch's schedule classes run them (``torch_order``: looped BFS and the split-backward ones).

The chain is cut into ``num_ranks * virtual_stages`` chunks; chunk ``k`` lives on rank
``k % num_ranks`` (round robin, as in Megatron's interleaved schedule), or, under the
schedules torch orders, where its order puts it (``stage_ranks``: a V for ``V_SHAPED``). Each rank runs
its operations in the fixed order of the schedule; an operation starts when its rank is
free and its input has arrived (forward: the previous chunk's forward plus the boundary
transfer; backward: the next chunk's backward plus the transfer). Transfers overlap
compute. The result is the step time, the bubble, the activations each rank holds at its
peak, and every operation's start and end for drawing a timeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from torch.distributed import pipelining

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")

# The runtime's split-backward schedules (``trainers.parallel.pipeline.SCHEDULES``), costed in
# the order torch runs them: each backward is an input-gradient part (I) and a weight-gradient
# part (W) that the schedule places apart to fill the bubble (Qi et al. 2024, "Zero Bubble
# Pipeline Parallelism", ICLR; ZB-V: two stages per rank in a V, rank r holding stages r and
# 2p - 1 - r). name -> torch.distributed.pipelining schedule class name.
# DualPipeV (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", section 3.2.1: DualPipe; its
# V-shaped half as torch builds it) where this torch has it, as the runtime offers it: its
# overlapped forward-and-backward pairs run one after the other, as torch's runtime runs them.
TORCH_ORDERED = {"interleaved_zero_bubble": "InterleavedZeroBubble",
                 "zbv_zero_bubble": "ZBVZeroBubble"}
V_SHAPED = ("zbv_zero_bubble",)
if hasattr(pipelining, "ScheduleDualPipeV"):
    TORCH_ORDERED["dualpipev"] = "DualPipeV"
    V_SHAPED += ("dualpipev",)
# Every runtime schedule the partitioner simulates in torch's order: the split-backward ones
# and looped BFS (Lamy-Poirier 2021, "Breadth-First Pipeline Parallelism": each rank runs
# every micro-batch through one chunk before the next, so it holds all m x v at its peak).
TORCH_CLASSES = {**TORCH_ORDERED, "looped_bfs": "LoopedBFS"}


@dataclass(frozen=True, kw_only=True)
class ScheduleSpec:
    """Which pipeline schedule to simulate.

    name: one of ``SCHEDULES``, or of ``TORCH_CLASSES`` (simulated in torch's own order).
    num_microbatches: micro-batches per step (``m``).
    virtual_stages: chunks per rank (``v``); >= 2 for ``interleaved_1f1b``, 2 for the
        V-shaped ones, any for ``interleaved_zero_bubble`` and ``looped_bfs``, else 1.
    """

    name: str = "1f1b"
    num_microbatches: int = 8
    virtual_stages: int = 1

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES and self.name not in TORCH_CLASSES:
            raise ValueError(f"schedule={self.name!r} is unknown; valid: "
                             f"{', '.join((*SCHEDULES, *TORCH_CLASSES))}")
        if self.num_microbatches < 1:
            raise ValueError(f"num_microbatches={self.num_microbatches} must be >= 1")
        if self.virtual_stages < 1:
            raise ValueError(f"virtual_stages={self.virtual_stages} must be >= 1")
        if self.name == "interleaved_1f1b" and self.virtual_stages < 2:
            raise ValueError("schedule='interleaved_1f1b' needs virtual_stages >= 2; "
                             "use schedule='1f1b' for one chunk per rank")
        if self.name in V_SHAPED and self.virtual_stages != 2:
            raise ValueError(f"schedule={self.name!r} runs 2 stages per rank in a V; got "
                             f"virtual_stages={self.virtual_stages}")
        if self.name in ("gpipe", "1f1b") and self.virtual_stages != 1:
            raise ValueError(f"virtual_stages={self.virtual_stages} needs an interleaved or "
                             f"V schedule, not {self.name!r}")

    @property
    def split_backward(self) -> bool:
        """Whether the schedule runs each backward as an I and a W action (torch's order)."""
        return self.name in TORCH_ORDERED

    @property
    def torch_ordered(self) -> bool:
        """Whether the step is simulated in the order torch's schedule class runs
        (``TORCH_CLASSES``), not in one derived here."""
        return self.name in TORCH_CLASSES

    def check(self, num_ranks: int) -> None:
        """Raise ValueError when this schedule cannot run on ``num_ranks`` ranks."""
        m = self.num_microbatches
        if self.torch_ordered:
            torch_order(self.name, num_ranks, m, self.virtual_stages)
            return
        if self.name in ("1f1b", "interleaved_1f1b") and m < num_ranks:
            raise ValueError(f"schedule={self.name!r} needs num_microbatches >= num_stages; got "
                             f"num_microbatches={m} < num_stages={num_ranks}")
        if self.name == "interleaved_1f1b" and m % num_ranks:
            raise ValueError(f"schedule='interleaved_1f1b' needs num_microbatches divisible by "
                             f"num_stages; got {m} % {num_ranks} = {m % num_ranks}")


@dataclass(frozen=True)
class Op:
    """One scheduled operation of a chunk on a micro-batch: forward ('F'), backward ('B'),
    or, under a split-backward schedule, its input-gradient ('I') or weight-gradient ('W')
    part."""

    rank: int
    chunk: int
    microbatch: int
    kind: str
    start_ms: float
    end_ms: float


@dataclass(frozen=True)
class Simulation:
    """What a simulated step looks like."""

    step_ms: float
    bubble: float  # idle share of rank time: 1 - busy / (ranks * step)
    busy_ms: tuple[float, ...]  # per rank
    peak_inflight: tuple[int, ...]  # most micro-batch chunks whose activations a rank holds
    peak_act_bytes: tuple[float, ...]  # those activations' bytes at the rank's peak
    ops: tuple[Op, ...]


def rank_order(spec: ScheduleSpec, num_ranks: int, rank: int) -> list[tuple[str, int, int]]:
    """Operations of ``rank`` in execution order, as (kind, global chunk, micro-batch)."""
    m, v, p = spec.num_microbatches, spec.virtual_stages, num_ranks
    if spec.name == "gpipe":
        return [("F", rank, i) for i in range(m)] + [("B", rank, i) for i in range(m)]
    if spec.name == "1f1b":
        warm = min(p - rank - 1, m)
        fwd = [("F", rank, i) for i in range(m)]
        bwd = [("B", rank, i) for i in range(m)]
    else:
        warm = min((p - rank - 1) * 2 + (v - 1) * p, m * v)
        fwd = [("F", _interleaved_chunk(j, p, v, False) * p + rank, _interleaved_mb(j, p, v))
               for j in range(m * v)]
        bwd = [("B", _interleaved_chunk(j, p, v, True) * p + rank, _interleaved_mb(j, p, v))
               for j in range(m * v)]
    order = fwd[:warm]
    for j in range(len(fwd) - warm):
        order += [fwd[warm + j], bwd[j]]
    return order + bwd[len(fwd) - warm:]


def _interleaved_chunk(j: int, p: int, v: int, backward: bool) -> int:
    local = (j // p) % v
    return v - 1 - local if backward else local


def _interleaved_mb(j: int, p: int, v: int) -> int:
    return (j // (p * v)) * p + j % p


def simulate(fwd_ms, bwd_ms, comm_ms, spec: ScheduleSpec, *, num_ranks: int,
             act_bytes=None, keep_ops: bool = True) -> Simulation:
    """Simulate one step.

    fwd_ms, bwd_ms: per chunk (``num_ranks * virtual_stages`` entries), per micro-batch.
    comm_ms: per boundary (one fewer entry than chunks): time to move the activation (and,
    backwards, its gradient) from chunk k to chunk k+1 on another rank.
    act_bytes: per chunk, activation bytes one micro-batch keeps until its backward.
    """
    assert len(fwd_ms) == num_ranks * spec.virtual_stages == len(bwd_ms)
    assert len(comm_ms) == len(fwd_ms) - 1
    spec.check(num_ranks)
    plan = _compiled(spec, num_ranks)
    end = [0.0] * len(plan)
    free = [0.0] * num_ranks
    busy = [0.0] * num_ranks
    for j, (rank, is_fwd, chunk, _, dep, dep_comm, own) in enumerate(plan):
        ready = 0.0 if dep < 0 else end[dep] + (comm_ms[dep_comm] if dep_comm >= 0 else 0.0)
        if own >= 0 and end[own] > ready:
            ready = end[own]
        start = max(ready, free[rank])
        dur = fwd_ms[chunk] if is_fwd else bwd_ms[chunk]
        end[j] = free[rank] = start + dur
        busy[rank] += dur
    step = max(free)
    bubble = 1.0 - sum(busy) / (num_ranks * step) if step > 0 else 0.0
    peaks = [_peak(vectors, act_bytes) for vectors in _inflight_vectors(spec, num_ranks)]
    ops = tuple(Op(rank, chunk, mb, "F" if is_fwd else "B", end[j] - (
        fwd_ms[chunk] if is_fwd else bwd_ms[chunk]), end[j])
        for j, (rank, is_fwd, chunk, mb, *_) in enumerate(plan)) if keep_ops else ()
    return Simulation(step, bubble, tuple(busy), tuple(c for c, _ in peaks),
                      tuple(b for _, b in peaks), ops)


@lru_cache(maxsize=256)
def _orders(spec: ScheduleSpec, num_ranks: int):
    return tuple(tuple(rank_order(spec, num_ranks, r)) for r in range(num_ranks))


@lru_cache(maxsize=256)
def _compiled(spec: ScheduleSpec, num_ranks: int):
    """Operations in an order where each comes after the ones it waits for.

    Each entry: (rank, is_forward, chunk, micro-batch, index of the op whose output it needs
    or -1, boundary index of that transfer or -1, index of its own forward for a backward or
    -1). Ranks keep their schedule order; the order does not depend on durations, so it is
    computed once per schedule and pipeline size.
    """
    orders = _orders(spec, num_ranks)
    num_chunks = num_ranks * spec.virtual_stages
    index: dict[tuple[str, int, int], int] = {}
    plan, pos = [], [0] * num_ranks
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for r in range(num_ranks):
            while pos[r] < len(orders[r]):
                kind, k, i = orders[r][pos[r]]
                if kind == "F":
                    dep, own = (("F", k - 1, i) if k else None), None
                else:
                    dep = ("B", k + 1, i) if k < num_chunks - 1 else None
                    own = ("F", k, i)
                if (dep is not None and dep not in index) or (own is not None and own not in index):
                    break
                comm = -1 if dep is None else (k - 1 if kind == "F" else k)
                plan.append((r, kind == "F", k, i, -1 if dep is None else index[dep], comm,
                             -1 if own is None else index[own]))
                index[(kind, k, i)] = len(plan) - 1
                pos[r] += 1
                remaining -= 1
                progressed = True
        assert progressed, "schedule deadlocked"
    return tuple(plan)


@lru_cache(maxsize=256)
def _inflight_vectors(spec: ScheduleSpec, num_ranks: int):
    """Per rank: the undominated {chunk: micro-batches held} states along its order."""
    result = []
    for order in _orders(spec, num_ranks):
        held: dict[int, int] = {}
        states = []
        for kind, k, _ in order:
            held[k] = held.get(k, 0) + (1 if kind == "F" else -1)
            if kind == "F":
                states.append(tuple(sorted(held.items())))
        keep = [a for a in set(states) if not any(
            b != a and all(dict(b).get(k, 0) >= c for k, c in a) for b in states)]
        result.append(tuple(sorted(keep)))
    return tuple(result)


def _peak(vectors, act_bytes) -> tuple[int, float]:
    count = max(sum(c for _, c in vec) for vec in vectors)
    if act_bytes is None:
        return count, 0.0
    return count, max(sum(c * act_bytes[k] for k, c in vec) for vec in vectors)


def inflight_microbatches(spec: ScheduleSpec, num_ranks: int, rank: int) -> int:
    """Micro-batches whose activations stage ``rank`` holds at its peak (v = 1 schedules)."""
    m = spec.num_microbatches
    if spec.name == "gpipe":
        return m
    if spec.name == "1f1b":
        return min(num_ranks - rank, m)
    raise ValueError("inflight_microbatches is per stage; interleaved peaks depend on chunks")


def stage_ranks(spec: ScheduleSpec, num_ranks: int) -> tuple[int, ...]:
    """The rank holding each of the ``num_ranks * virtual_stages`` chunks: where torch's
    order runs it for ``TORCH_CLASSES`` (a V for ``V_SHAPED``), else round robin
    (``k % num_ranks``)."""
    chunks = num_ranks * spec.virtual_stages
    if not spec.torch_ordered:
        return tuple(k % num_ranks for k in range(chunks))
    orders = torch_order(spec.name, num_ranks, spec.num_microbatches, spec.virtual_stages)
    owner = {stage: r for r, order in enumerate(orders) for _, stage, _ in order}
    return tuple(owner[k] for k in range(chunks))


@lru_cache(maxsize=128)
def torch_order(name: str, num_ranks: int, num_microbatches: int,
                stages_per_rank: int) -> tuple[tuple[tuple[str, int, int], ...], ...]:
    """Per rank, the compute actions of the runtime schedule ``name`` (``TORCH_CLASSES``) as
    (kind, stage, micro-batch) in the order torch's schedule class runs them; kind F, I, W or
    B (a whole backward). The class is built for every rank at once from stand-in stages, as
    it only reads their count and the pipeline size. ValueError where torch refuses the
    sizes, with its reason."""
    from unittest import mock

    from torch.distributed.pipelining.schedules import get_schedule_class
    from torch.distributed.pipelining.stage import PipelineStage

    if name not in TORCH_CLASSES:
        raise ValueError(f"schedule={name!r}: valid: {', '.join(TORCH_CLASSES)}")
    stage = mock.create_autospec(PipelineStage, instance=True)
    stage.group_rank, stage.group_size, stage.submod = 0, num_ranks, None
    stage.num_stages = num_ranks * stages_per_rank
    try:
        schedule = get_schedule_class(TORCH_CLASSES[name])([stage] * stages_per_rank,
                                                            num_microbatches)
    except (ValueError, RuntimeError, AssertionError) as err:
        raise ValueError(f"schedule={name!r} with {num_ranks} pipeline ranks, "
                         f"{stages_per_rank} stages each and {num_microbatches} "
                         f"micro-batches: torch refuses it ({err})") from None
    orders = []
    for rank in range(num_ranks):
        actions = []
        for action in schedule.pipeline_order[rank]:
            if action is None:
                continue
            for part in getattr(action, "sub_actions", None) or (action,):  # OVERLAP_F_B
                kind = str(part.computation_type.value)
                if kind not in ("F", "I", "W", "B"):
                    raise ValueError(f"schedule={name!r}: action {part} is not costed here")
                actions.append((kind, part.stage_index, part.microbatch_index))
        orders.append(tuple(actions))
    return tuple(orders)


@dataclass(frozen=True)
class OrderSimulation:
    """A step of a schedule given as per-rank action orders (``simulate_order``)."""

    step_ms: float
    bubble: float  # idle share of rank time: 1 - busy / (ranks * step)
    busy_ms: tuple[float, ...]  # per rank
    peak_held: tuple[int, ...]  # most (stage, micro-batch) activations a rank holds at once
    peak_act_bytes: tuple[float, ...] = ()  # their bytes at the rank's peak (given act_bytes)
    ops: tuple[Op, ...] = ()  # every action's start and end (keep_ops)


def simulate_order(orders, fwd_ms, input_ms, weight_ms, comm_ms=None, *, act_bytes=None,
                   keep_ops: bool = False) -> OrderSimulation:
    """Simulate one step of per-rank action orders (``torch_order``).

    fwd_ms, input_ms, weight_ms: per stage, per micro-batch: the forward, the backward's
    input-gradient part and its weight-gradient part (a whole backward, B, is the two).
    comm_ms: per boundary (one fewer than stages), the transfer from stage s to s + 1 when
    they are on different ranks (None: free). A forward waits for the previous stage's; an I
    or B waits for the next stage's and for its own forward; a W for its own I. A rank runs
    its actions in order, each as soon as its inputs are there. Activations are held from a
    forward until that stage and micro-batch's W or B.
    act_bytes: per stage, the activation bytes one micro-batch holds there; with it,
    ``peak_act_bytes`` is each rank's most held at once.
    """
    num_stages = len(fwd_ms)
    assert len(input_ms) == num_stages == len(weight_ms)
    comm = [0.0] * (num_stages - 1) if comm_ms is None else list(comm_ms)
    assert len(comm) == num_stages - 1
    duration = {"F": fwd_ms, "I": input_ms, "W": weight_ms,
                "B": [i + w for i, w in zip(input_ms, weight_ms)]}
    plan = _compiled_order(tuple(tuple(order) for order in orders))
    end = [0.0] * len(plan)
    free = [0.0] * len(orders)
    busy = [0.0] * len(orders)
    for j, (r, kind, s, _, deps) in enumerate(plan):
        ready = 0.0
        for dep, boundary in deps:
            ready = max(ready, end[dep] + (comm[boundary] if boundary >= 0 else 0.0))
        dur = duration[kind][s]
        end[j] = free[r] = max(ready, free[r]) + dur
        busy[r] += dur
    step = max(free)
    bubble = 1.0 - sum(busy) / (len(orders) * step) if step > 0 else 0.0
    peak_bytes = () if act_bytes is None else tuple(_peak_bytes(o, act_bytes) for o in orders)
    ops = tuple(Op(r, s, i, kind, end[j] - duration[kind][s], end[j])
                for j, (r, kind, s, i, _) in enumerate(plan)) if keep_ops else ()
    return OrderSimulation(step, bubble, tuple(busy), tuple(peak_held(o) for o in orders),
                           peak_bytes, ops)


@lru_cache(maxsize=256)
def _compiled_order(orders):
    """The actions of ``orders`` in an order where each comes after those it waits for:
    (rank, kind, stage, micro-batch, ((index of an action it waits for, boundary whose
    transfer it waits for or -1), ...)). Ranks keep their order; computed once per order."""
    num_stages = 1 + max(s for order in orders for _, s, _ in order)
    owner = {stage: r for r, order in enumerate(orders) for _, stage, _ in order}
    present = {(kind, s, i) for order in orders for kind, s, i in order}
    index: dict[tuple[str, int, int], int] = {}
    plan, pos = [], [0] * len(orders)
    remaining = sum(len(order) for order in orders)
    while remaining:
        progressed = False
        for r, order in enumerate(orders):
            while pos[r] < len(order):
                kind, s, i = order[pos[r]]
                needs = _needs(kind, s, i, present, num_stages)
                if any(key not in index for key, _ in needs):
                    break
                deps = tuple((index[key], b if b is not None and owner[b] != owner[b + 1]
                              else -1) for key, b in needs)
                index[(kind, s, i)] = len(plan)
                plan.append((r, kind, s, i, deps))
                pos[r] += 1
                remaining -= 1
                progressed = True
        assert progressed, "schedule deadlocked"
    return tuple(plan)


def _needs(kind, s, i, present, num_stages):
    """What action (kind, s, i) waits for: (action, boundary it crosses or None)."""
    if kind == "F":
        return [] if s == 0 else [(("F", s - 1, i), s - 1)]
    if kind == "W":
        return [(("I", s, i), None)]
    # I or B: its own forward, and the next stage's input gradient (from its I or its B)
    needs = [(("F", s, i), None)]
    if s < num_stages - 1:
        later = ("I", s + 1, i) if ("I", s + 1, i) in present else ("B", s + 1, i)
        needs.append((later, s))
    return needs


def _peak_bytes(order, act_bytes) -> float:
    held = peak = 0.0
    for kind, s, _ in order:
        held += act_bytes[s] if kind == "F" else -act_bytes[s] if kind in ("W", "B") else 0.0
        peak = max(peak, held)
    return peak


def peak_held(order) -> int:
    """The most (stage, micro-batch) activations one rank's order holds at once: from a
    forward to that stage and micro-batch's W or B."""
    held = peak = 0
    for kind, _, _ in order:
        held += 1 if kind == "F" else -1 if kind in ("W", "B") else 0
        peak = max(peak, held)
    return peak
