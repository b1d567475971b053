"""Exact search for the best contiguous split of a chain.

Objective: ``J = (1 - alpha) * T / T_ref + alpha * M / M_ref`` where ``T`` is the step time
from the schedule simulator and ``M`` the largest per-rank memory, subject to every rank's
memory <= cap. Ties (within 1e-9 relative) go to lower ``M``, then to the first split found
in a fixed search order, so the same input always gives the same answer.

Exactness comes from branch and bound over all splits with bounds that never exceed the
true value, so no split that could win is ever skipped:

* Step time. A rank executes its work serially. Rank r's first forward cannot start before
  micro-batch 0 has crossed every unit before its first chunk (the prefix compute and the
  transfers there), and after its last backward that micro-batch's gradient must still cross
  them again. So ``T >= prefix(start_r) + comm_before(start_r) + m * load_r`` for every rank,
  for any schedule the simulator runs. With one chunk per rank there are two more, from
  the round trips through every later unit (``suffix``): the stage's last backward waits
  for the last micro-batch's, after its m forwards and the backwards its schedule orders
  first (1F1B, w = p - s - 1 warm-up forwards: ``T >= prefix + m f + (m - w) b + suffix``);
  its first backward waits for micro-batch 0's, and everything after it in the schedule
  still runs (``T >= prefix + f + suffix + (m - w - 1) f + m b``). All depend only on the
  stage's own boundaries (the transfers before it relaxed to its own incoming one, those
  after to its outgoing one), so a dynamic programme gives, for every suffix of the chain,
  the least achievable maximum: the bound used to prune.
* Memory. Per-rank parameter, gradient and optimizer bytes plus in-flight activations; for
  one chunk per rank the in-flight count of stage s is fixed by the schedule (1F1B: p - s),
  so the suffix dynamic programme for memory is exact.
* Interleaved schedules (v > 1 chunks per rank): the same per-rank time bound; the rest of
  the chain is poured, as if divisible, into the ranks that still receive chunks (the least
  level it can reach bounds the final maximum); static bytes bound the memory. Still exact,
  but the search can grow with p * v; ``max_nodes`` caps it and the result then says
  ``exact=False``.
* Schedules in torch's own order (``schedule.TORCH_CLASSES``, any v; chunk k on rank
  ``stage_rank[k]``, a V under ZB-V and DualPipeV): the interleaved search. Looped BFS runs
  whole backwards, so its bounds hold as they are. Under a split backward the start bound
  is weaker: a rank may run weight gradients after its last input gradient while the ranks
  before it finish, so nothing is owed after its work, and before it only the forward
  through the chunks before its first and the transfers between them where ranks differ:
  ``T >= fwd_prefix(start_r) + comm + m * load_r``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

REL_TIE = 1e-9


@dataclass(frozen=True)
class Score:
    """What the objective sees of one split."""

    objective: float
    memory: float
    step_ms: float


@dataclass(frozen=True)
class SearchResult:
    cuts: tuple[int, ...] | None  # start unit of every chunk after the first; None if none fits
    score: Score | None
    nodes: int
    leaves: int
    exact: bool


@dataclass(frozen=True, kw_only=True)
class Problem:
    """Prefix sums and settings of one search (built by ``partition.py``)."""

    num_units: int
    num_ranks: int
    virtual_stages: int
    num_microbatches: int
    fwd_prefix: tuple[float, ...]  # length n + 1, forward per micro-batch
    compute_prefix: tuple[float, ...]  # length n + 1, forward + backward per micro-batch
    static_prefix: tuple[float, ...]
    act_prefix: tuple[float, ...]
    comm_ms: tuple[float, ...]  # comm_ms[k]: one-way transfer at cut k (index 0 unused)
    allowed_cuts: tuple[int, ...]
    inflight: tuple[int, ...]  # per stage for v == 1
    schedule: str = "1f1b"
    memory_cap: float  # math.inf when uncapped
    alpha: float
    time_ref: float
    memory_ref: float
    recompute_bytes: tuple[float, ...] = ()  # per unit; empty when nothing is checkpointed
    stage_rank: tuple[int, ...] = ()  # rank of each chunk; empty: round robin (k % p)
    split_backward: bool = False  # torch's I/W order (``schedule.TORCH_ORDERED``)
    weight_prefix: tuple[float, ...] = ()  # length n + 1, weight-gradient part of the backward

    def rank_of(self, chunk: int) -> int:
        return self.stage_rank[chunk] if self.stage_rank else chunk % self.num_ranks

    def recompute_peak(self, a: int, e: int) -> float:
        """The most bytes one checkpointed unit among a..e-1 rebuilds for its backward."""
        return max(self.recompute_bytes[a:e], default=0.0) if self.recompute_bytes else 0.0

    def objective(self, step_ms: float, memory: float) -> float:
        return ((1 - self.alpha) * step_ms / self.time_ref
                + self.alpha * memory / self.memory_ref)


class _Best:
    def __init__(self) -> None:
        self.cuts: tuple[int, ...] | None = None
        self.score: Score | None = None

    def prunes(self, bound: float, memory_bound: float) -> bool:
        if self.score is None:
            return False
        tol = REL_TIE * max(abs(self.score.objective), 1e-30)
        if bound > self.score.objective + tol:
            return True
        mem_tol = REL_TIE * max(self.score.memory, 1e-30)
        return bound >= self.score.objective - tol and memory_bound > self.score.memory + mem_tol

    def offer(self, cuts: tuple[int, ...], score: Score | None) -> None:
        if score is None:  # over the memory cap
            return
        if self.score is None:
            self.cuts, self.score = cuts, score
            return
        tol = REL_TIE * max(abs(self.score.objective), 1e-30)
        mem_tol = REL_TIE * max(self.score.memory, 1e-30)
        if score.objective < self.score.objective - tol or (
                score.objective <= self.score.objective + tol
                and score.memory < self.score.memory - mem_tol):
            self.cuts, self.score = cuts, score


def search(problem: Problem, evaluate: Callable[[tuple[int, ...]], Score | None],
           *, max_nodes: int = 2_000_000, seeds=()) -> SearchResult:
    """Best split of the chain; ``evaluate`` scores a full split (None: over the cap).

    seeds: splits to score first (good ones prune more; they never change the answer).
    """
    one_each = problem.virtual_stages == 1 and problem.schedule in ("gpipe", "1f1b")
    finder = (_Pipeline if one_each else _Interleaved)(problem, evaluate, max_nodes)
    for cuts in seeds:
        finder.best.offer(tuple(cuts), evaluate(tuple(cuts)))
    return finder.run()


def fits_memory(problem: Problem) -> bool:
    """Whether some split into one stage per rank keeps every stage under the memory cap."""
    return _Pipeline(problem, None, 0).suffix_mem[problem.num_ranks][0] < math.inf


class _Pipeline:
    """Branch and bound over p contiguous stages (one per rank)."""

    def __init__(self, problem: Problem, evaluate, max_nodes: int) -> None:
        self.pb, self.evaluate, self.max_nodes = problem, evaluate, max_nodes
        self.best, self.nodes, self.leaves, self.exact = _Best(), 0, 0, True
        self.suffix_time, self.suffix_mem = self._suffix_bounds()

    def stage_time(self, a: int, e: int, comm_before: float, stage: int) -> float:
        """A lower bound on the step from stage ``stage`` holding units a..e-1.

        The prefix before its first forward and after its last backward, plus the most of:
        its busy time; the wait for the last micro-batch's round trip through every later
        unit before its last backward; the wait for micro-batch 0's round trip before its
        first backward, after which the rest of its work still has to run (1F1B: every
        backward and the forwards after the w + 1 it did first).
        """
        pb, m = self.pb, self.pb.num_microbatches
        pc, pf = pb.compute_prefix, pb.fwd_prefix
        fwd, bwd = pf[e] - pf[a], pc[e] - pc[a] - (pf[e] - pf[a])
        start = pc[a] + comm_before
        after = pc[pb.num_units] - pc[e] + (2 * pb.comm_ms[e] if e < pb.num_units else 0.0)
        if pb.schedule == "gpipe":
            last_trip = m * fwd + max(m * bwd, after + bwd)
            first_trip = max(m * fwd, fwd + after) + m * bwd
        else:
            warm = min(pb.num_ranks - stage - 1, m)
            last_trip = m * fwd + (m - warm) * bwd + after
            first_trip = fwd + after + (m - warm - 1) * fwd + m * bwd
        return start + max(m * (fwd + bwd), last_trip, first_trip)

    def stage_memory(self, a: int, e: int, stage: int) -> float:
        pb = self.pb
        return (pb.static_prefix[e] - pb.static_prefix[a]
                + pb.inflight[stage] * (pb.act_prefix[e] - pb.act_prefix[a])
                + pb.recompute_peak(a, e))

    def _suffix_bounds(self):
        """For r stages left starting at unit i: least max time bound, least max memory."""
        pb, p, n = self.pb, self.pb.num_ranks, self.pb.num_units
        starts = (0,) + pb.allowed_cuts
        time = [dict.fromkeys(starts + (n,), math.inf) for _ in range(p + 1)]
        mem = [dict.fromkeys(starts + (n,), math.inf) for _ in range(p + 1)]
        time[0][n] = mem[0][n] = 0.0
        for r in range(1, p + 1):
            stage = p - r
            for a in starts:
                own = 2 * pb.comm_ms[a] if a else 0.0
                for e in self._ends(a, r):
                    m_stage = self.stage_memory(a, e, stage)
                    if m_stage > pb.memory_cap or time[r - 1][e] == math.inf:
                        continue
                    t = max(self.stage_time(a, e, own, stage), time[r - 1][e])
                    time[r][a] = min(time[r][a], t)
                    mem[r][a] = min(mem[r][a], max(m_stage, mem[r - 1][e]))
        return time, mem

    def _ends(self, a: int, stages_left: int):
        if stages_left == 1:
            return (self.pb.num_units,)
        return tuple(k for k in self.pb.allowed_cuts if k > a)

    def run(self) -> SearchResult:
        if self.suffix_time[self.pb.num_ranks][0] < math.inf:
            self._dfs(0, 0, 0.0, 0.0, 0.0, ())
        return SearchResult(self.best.cuts, self.best.score, self.nodes, self.leaves, self.exact)

    def _dfs(self, stage, a, part_time, part_mem, comm_before, cuts) -> None:
        pb = self.pb
        self.nodes += 1
        if self.nodes > self.max_nodes:
            self.exact = False
            return
        left = pb.num_ranks - stage
        children = []
        for e in self._ends(a, left):
            rest_t, rest_m = self.suffix_time[left - 1][e], self.suffix_mem[left - 1][e]
            m_stage = self.stage_memory(a, e, stage)
            if rest_t == math.inf or m_stage > pb.memory_cap:
                continue
            t = max(part_time, self.stage_time(a, e, comm_before, stage))
            m = max(part_mem, m_stage)
            bound_m = max(m, rest_m)
            children.append((pb.objective(max(t, rest_t), bound_m), bound_m, e, t, m))
        children.sort()
        for bound, bound_m, e, t, m in children:
            if self.best.prunes(bound, bound_m):
                continue
            if e == pb.num_units:
                self.leaves += 1
                self.best.offer(cuts, self.evaluate(cuts))
            else:
                self._dfs(stage + 1, e, t, m, comm_before + 2 * pb.comm_ms[e], cuts + (e,))


def _water_level(bases, receivers, amount: float) -> float:
    """Least possible max of bases after pouring ``amount`` into the receiving ranks.

    A relaxation (work divisible at will) of placing the rest of the chain, so it never
    exceeds the true per-rank bound.
    """
    top = max(bases)
    levels = sorted(bases[r] for r in receivers)
    if not levels or amount <= 0:
        return top
    filled = 0
    for i, level in enumerate(levels):
        # Raise the i lowest receivers to `level`: costs sum(level - lower ones).
        need = i * level - filled
        if need >= amount:
            return max(top, (amount + filled) / i)
        filled += level
    return max(top, (amount + filled) / len(levels))


class _Interleaved:
    """Branch and bound over p * v contiguous chunks, chunk k on rank ``rank_of(k)``."""

    def __init__(self, problem: Problem, evaluate, max_nodes: int) -> None:
        self.pb, self.evaluate, self.max_nodes = problem, evaluate, max_nodes
        self.best, self.nodes, self.leaves, self.exact = _Best(), 0, 0, True
        self.num_chunks = problem.num_ranks * problem.virtual_stages
        self.index = {k: j for j, k in enumerate(problem.allowed_cuts)}

    def run(self) -> SearchResult:
        if len(self.pb.allowed_cuts) + 1 >= self.num_chunks:
            p = self.pb.num_ranks
            self._dfs(0, 0, [0.0] * p, [0.0] * p, [None] * p, 0.0, ())
        return SearchResult(self.best.cuts, self.best.score, self.nodes, self.leaves, self.exact)

    def _ends(self, a: int, chunk: int):
        n, cuts = self.pb.num_units, self.pb.allowed_cuts
        later = self.num_chunks - chunk - 1  # chunks still to place after this one
        if later == 0:
            return (n,)
        first = 0 if a == 0 else self.index[a] + 1
        last = len(cuts) - later  # keep `later - 1` cuts after the chosen one
        return cuts[first:last + 1]

    def _dfs(self, chunk, a, loads, statics, offsets, comm_before, cuts) -> None:
        pb = self.pb
        self.nodes += 1
        if self.nodes > self.max_nodes:
            self.exact = False
            return
        m, pc, ps = pb.num_microbatches, pb.compute_prefix, pb.static_prefix
        before = pb.fwd_prefix if pb.split_backward else pc  # owed before a rank's first chunk
        r = pb.rank_of(chunk)
        offset = offsets[r] if offsets[r] is not None else before[a] + comm_before
        children = []
        for e in self._ends(a, chunk):
            static = statics[r] + ps[e] - ps[a]
            if static > pb.memory_cap:
                continue
            load = loads[r] + pc[e] - pc[a]
            bases = [(o + m * l) if o is not None else before[e]
                     for o, l in zip(offsets, loads)]
            bases[r] = offset + m * load
            receivers = {pb.rank_of(j) for j in range(chunk + 1, self.num_chunks)}
            bound_t = _water_level(bases, receivers, m * (pc[pb.num_units] - pc[e]))
            bound_m = max(max(statics), static)
            children.append((pb.objective(bound_t, bound_m), bound_m, e, load, static))
        children.sort()
        for bound, bound_m, e, load, static in children:
            if self.best.prunes(bound, bound_m):
                continue
            if e == pb.num_units:
                self.leaves += 1
                self.best.offer(cuts, self.evaluate(cuts))
                continue
            new_loads, new_statics, new_offsets = list(loads), list(statics), list(offsets)
            new_loads[r], new_statics[r], new_offsets[r] = load, static, offset
            self._dfs(chunk + 1, e, new_loads, new_statics, new_offsets,
                      comm_before + self._crossing(chunk, e), cuts + (e,))

    def _crossing(self, chunk: int, e: int) -> float:
        """What the cut at unit e (after ``chunk``) adds to the wait before later chunks: the
        round trip (under a split backward the forward transfer alone); nothing between
        chunks on one rank, where nothing is moved."""
        pb = self.pb
        if pb.rank_of(chunk) == pb.rank_of(chunk + 1):
            return 0.0
        return pb.comm_ms[e] if pb.split_backward else 2 * pb.comm_ms[e]
