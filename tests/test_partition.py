"""Partitioner: exact search against brute force, constraints, determinism, errors.

Run: .venv/bin/pytest tests/test_partition.py -q
"""

from __future__ import annotations

import itertools
import math
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from trainers.partition.chain import (
    CostChain,
    MemoryModel,
    UnitCost,
    checkpointed_layers,
    with_activation_checkpointing,
)
from trainers.partition.partition import (
    InfeasibleError,
    PartitionConfig,
    balanced_param_cuts,
    equal_layer_cuts,
    evaluate_split,
    make_problem,
    plan_partition,
)
from trainers.partition.schedule import (
    TORCH_CLASSES,
    TORCH_ORDERED,
    V_SHAPED,
    ScheduleSpec,
    simulate,
    simulate_order,
    stage_ranks,
    torch_order,
)

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@st.composite
def chains(draw, min_units=2, max_units=9):
    n = draw(st.integers(min_units, max_units))
    floats = st.floats(0.1, 10.0, allow_nan=False)
    backward = [draw(floats) for _ in range(n)]
    units = tuple(UnitCost(name=f"u{i}", fwd_ms=draw(floats), bwd_ms=backward[i],
                           weight_grad_ms=backward[i] * draw(st.floats(0.0, 0.7)),
                           param_count=draw(st.integers(0, 1000)),
                           param_bytes=draw(st.integers(0, 4000)),
                           act_bytes=draw(st.integers(0, 500)),
                           recompute_bytes=draw(st.one_of(st.just(0), st.integers(0, 3000))),
                           out_bytes=draw(st.integers(0, 10**9)),
                           is_layer=draw(st.booleans()))
                  for i in range(n))
    groups = []
    if n > 3 and draw(st.booleans()):
        a = draw(st.integers(0, n - 2))
        groups.append((a, draw(st.integers(a + 1, min(n - 1, a + 2)))))
    return CostChain(units=units, groups=tuple(groups), microbatch_size=4)


def brute_force(chain, config):
    """Every split, scored exactly as the search scores one."""
    problem = make_problem(chain, config)
    best = None
    for cuts in itertools.combinations(chain.allowed_cuts(), config.num_chunks - 1):
        plan = evaluate_split(chain, cuts, config, method="brute", keep_ops=False)
        memory = max(plan.rank_memory_bytes)
        if memory > problem.memory_cap:
            continue
        value = problem.objective(plan.step_ms, memory)
        if best is None or value < best[0]:
            best = (value, cuts)
    return best


def assert_search_is_brute_force(chain, config):
    """The search's plan has brute force's objective, or both find nothing that fits;
    the plan (None when nothing fits)."""
    expected = brute_force(chain, config)
    if expected is None:
        with pytest.raises(InfeasibleError):
            plan_partition(chain, config)
        return None
    result = plan_partition(chain, config)
    assert result.exact
    assert objective_of(result) == pytest.approx(expected[0], rel=1e-9)
    return result


def objective_of(result):
    problem = make_problem(result.chain, result.config)
    return problem.objective(result.plan.step_ms, max(result.plan.rank_memory_bytes))


def _config(chain, data, schedule_names=("1f1b", "gpipe"), max_v=1):
    segments = chain.num_segments()
    v = data.draw(st.integers(1, max_v))
    p = data.draw(st.integers(1, max(1, min(4, segments // v))))
    if p * v > segments:
        v = 1
    name = "interleaved_1f1b" if v > 1 else data.draw(st.sampled_from(schedule_names))
    m = p * data.draw(st.integers(1, 3))
    cap = data.draw(st.one_of(st.none(), st.floats(2000, 60000)))
    optimize = data.draw(st.sampled_from(["speed", "memory", 0.3]))
    return PartitionConfig(num_stages=p, memory_cap_bytes=cap, optimize=optimize,
                           schedule=ScheduleSpec(name=name, num_microbatches=m,
                                                 virtual_stages=v),
                           link_gb_per_s=100.0)


@SETTINGS
@given(chain=chains(), data=st.data())
def test_search_matches_brute_force(chain, data):
    config = _config(chain, data)
    assert_search_is_brute_force(chain, config)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chain=chains(min_units=6, max_units=10), data=st.data())
def test_interleaved_search_matches_brute_force(chain, data):
    p = data.draw(st.integers(2, chain.num_segments() // 2))
    config = PartitionConfig(
        num_stages=p, optimize=data.draw(st.sampled_from(["speed", "memory", 0.3])),
        memory_cap_bytes=data.draw(st.one_of(st.none(), st.floats(2000, 60000))),
        schedule=ScheduleSpec(name="interleaved_1f1b", num_microbatches=p * data.draw(
            st.integers(1, 2)), virtual_stages=2), link_gb_per_s=100.0)
    assert_search_is_brute_force(chain, config)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chain=chains(min_units=2, max_units=9), data=st.data())
def test_torch_ordered_search_matches_brute_force(chain, data):
    """torch's own orders (looped BFS and the zero-bubble ones; chunks placed where torch
    runs them: a V under ZB-V and DualPipeV) are searched exactly: the search's bound is
    weaker under a split backward (a rank may defer its weight gradients), never wrong."""
    name = data.draw(st.sampled_from(sorted(TORCH_CLASSES)))
    v = 2 if name in V_SHAPED else data.draw(st.integers(1, 2))
    if chain.num_segments() < v:
        return
    p = data.draw(st.integers(1, min(3, chain.num_segments() // v)))
    spec = ScheduleSpec(name=name, num_microbatches=p * data.draw(st.integers(1, 2)),
                        virtual_stages=v)
    try:
        spec.check(p)
    except ValueError:
        assume(False)  # sizes torch refuses (DualPipeV: m >= 2p)
    config = PartitionConfig(
        num_stages=p, optimize=data.draw(st.sampled_from(["speed", "memory", 0.3])),
        memory_cap_bytes=data.draw(st.one_of(st.none(), st.floats(2000, 60000))),
        schedule=spec, link_gb_per_s=100.0)
    result = assert_search_is_brute_force(chain, config)
    if result is not None:
        assert [s.rank for s in result.plan.stages] == list(stage_ranks(spec, p))


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_split_backward_start_bound_never_exceeds_the_step(data):
    """What the search prunes with under torch's orders: a rank's work cannot start before
    the forward through every stage before its first one, so ``T >= fwd_prefix + m * load``
    (search._Interleaved with split_backward)."""
    name = data.draw(st.sampled_from(sorted(TORCH_ORDERED)))
    v = 2 if name in V_SHAPED else data.draw(st.integers(1, 2))
    p = data.draw(st.integers(2, 3))
    spec = ScheduleSpec(name=name, num_microbatches=p * data.draw(st.integers(1, 2)),
                        virtual_stages=v)
    try:
        spec.check(p)
    except ValueError:
        assume(False)
    n, m = p * v, spec.num_microbatches
    times = st.floats(0.1, 5.0, allow_nan=False)
    f, i, w = ([data.draw(times) for _ in range(n)] for _ in range(3))
    comm = [data.draw(st.floats(0.0, 2.0)) for _ in range(n - 1)]
    ranks = stage_ranks(spec, p)
    step = simulate_order(torch_order(name, p, m, v), f, i, w, comm).step_ms
    for r in range(p):
        first = ranks.index(r)
        moved = sum(comm[k] for k in range(first) if ranks[k] != ranks[k + 1])
        load = sum(f[k] + i[k] + w[k] for k in range(n) if ranks[k] == r)
        assert sum(f[:first]) + moved + m * load <= step * (1 + 1e-9)


def test_round_trip_bound_would_be_wrong_under_split_backward():
    """Why the search's start bound counts only the forward there: under 1F1B a rank's last
    backward still has to travel back through the stages before it, but under ZB-V rank 1
    defers weight gradients past its last input gradient while rank 0 finishes, so the step
    (52.5 ms) is below prefix round trip + its work (4.5 + 52)."""
    f, i, w = [0.5, 0.5, 4.0, 1.5], [1.0, 3.0, 2.0, 2.5], [3.0, 2.0, 1.5, 3.0]
    step = simulate_order(torch_order("zbv_zero_bubble", 2, 4, 2), f, i, w).step_ms
    rank1 = 4 * sum(f[k] + i[k] + w[k] for k in (1, 2))
    assert step == pytest.approx(52.5)
    assert f[0] + rank1 <= step < f[0] + i[0] + w[0] + rank1


def _even_chain(n, weight_grad_ms=1.0):
    return CostChain(units=tuple(
        UnitCost(name=f"u{i}", fwd_ms=1.0, bwd_ms=2.0, weight_grad_ms=weight_grad_ms,
                 param_count=10, param_bytes=40 * (i + 1), act_bytes=100.0)
        for i in range(n)))


def test_zbv_plan_by_hand():
    """Two ranks, four equal stages (F = I = W = 1 ms), one micro-batch, free links. Rank 0
    holds stages 0 and 3, rank 1 stages 1 and 2. Forwards down the V end at 4 ms; then
    I3 [4, 5] and W3 on rank 0; I2 [5, 6], W2 [6, 7] (torch's order puts it before I1),
    I1 [7, 8] on rank 1; I0 [8, 9] and W0 [9, 10] on rank 0: a 10 ms step. Rank 0 holds
    the first and the last stage's parameters, and both activations at once."""
    chain = _even_chain(4)
    config = PartitionConfig(num_stages=2, link_latency_ms=0.0, schedule=ScheduleSpec(
        name="zbv_zero_bubble", num_microbatches=1, virtual_stages=2))
    plan = plan_partition(chain, config).plan
    assert [s.rank for s in plan.stages] == [0, 1, 1, 0]
    assert plan.step_ms == pytest.approx(10.0)
    assert plan.rank_compute_ms == (6.0, 6.0)
    static = [MemoryModel().static_bytes(u) for u in chain.units]
    assert plan.rank_memory_bytes == (static[0] + static[3] + 200.0,
                                      static[1] + static[2] + 200.0)
    ops = {(op.kind, op.chunk): (op.start_ms, op.end_ms) for op in plan.simulation.ops}
    assert [ops[key] for key in (("F", 3), ("W", 2), ("I", 1), ("I", 0), ("W", 0))] == [
        (3.0, 4.0), (6.0, 7.0), (7.0, 8.0), (8.0, 9.0), (9.0, 10.0)]
    # With no weight-gradient time known (W = 0, I = 2 ms) the backwards run back to back
    # up the V: 4 F + 4 I = 12 ms.
    whole = plan_partition(_even_chain(4, weight_grad_ms=0.0), config).plan
    assert whole.step_ms == pytest.approx(12.0)


def test_looped_bfs_holds_every_microbatch():
    """Looped BFS (torch's order) runs all m micro-batches through a rank's first chunk
    before its second, so at its peak a rank holds m x v activations, where interleaved
    1F1B holds fewer; the planner counted it as interleaved 1F1B before."""
    chain = _even_chain(4)
    static = [MemoryModel().static_bytes(u) for u in chain.units]
    plans = {name: plan_partition(chain, PartitionConfig(num_stages=2, schedule=ScheduleSpec(
        name=name, num_microbatches=4, virtual_stages=2))).plan
        for name in ("looped_bfs", "interleaved_1f1b")}
    assert [s.rank for s in plans["looped_bfs"].stages] == [0, 1, 0, 1]
    assert plans["looped_bfs"].rank_memory_bytes[0] == static[0] + static[2] + 8 * 100.0
    assert plans["interleaved_1f1b"].rank_memory_bytes[0] < static[0] + static[2] + 8 * 100.0


def test_split_backward_refuses_checkpointing_like_the_runtime():
    with pytest.raises(ValueError, match="activation_checkpointing='full' with schedule="
                                         "'zbv_zero_bubble'"):
        PartitionConfig(num_stages=2, activation_checkpointing="full", schedule=ScheduleSpec(
            name="zbv_zero_bubble", num_microbatches=4, virtual_stages=2))


def test_torch_refusal_is_named():
    with pytest.raises(ValueError, match="torch refuses it"):
        plan_partition(_even_chain(8), PartitionConfig(num_stages=2, schedule=ScheduleSpec(
            name="interleaved_zero_bubble", num_microbatches=5, virtual_stages=2)))


def test_runtime_and_planner_place_stages_alike():
    """partition='auto' plans each runtime schedule with the stages on the ranks the
    runtime puts them on (trainers.parallel.pipeline.stage_ranks)."""
    from trainers.parallel import pipeline
    from trainers.parallel.auto import planner_schedule

    for name, (_, per_rank, _) in pipeline.SCHEDULES.items():
        for p in (2, 3, 4):
            spec = planner_schedule(name, 2 * p)
            chunks = p * spec.virtual_stages
            assert (per_rank == "one") == (spec.virtual_stages == 1), name
            assert stage_ranks(spec, p) == tuple(pipeline.stage_ranks(chunks, p, name)), name


@SETTINGS
@given(chain=chains(min_units=3), data=st.data())
def test_groups_and_memory_cap_always_hold(chain, data):
    config = _config(chain, data, max_v=2)
    try:
        result = plan_partition(chain, config)
    except InfeasibleError:
        return
    stage_of = {name: s.chunk for s in result.plan.stages for name in s.units}
    for group in chain.groups:
        assert len({stage_of[chain.units[i].name] for i in range(min(group), max(group) + 1)}) == 1
    if config.memory_cap_bytes is not None:
        assert max(result.plan.rank_memory_bytes) <= config.memory_cap_bytes
    assert [u for s in result.plan.stages for u in s.units] == [u.name for u in chain.units]


@SETTINGS
@given(chain=chains(min_units=3), data=st.data())
def test_infeasible_names_smallest_fitting_pipeline(chain, data):
    p = data.draw(st.integers(1, min(3, chain.num_segments())))
    cap = data.draw(st.floats(500, 20000))
    config = PartitionConfig(num_stages=p, memory_cap_bytes=cap,
                             schedule=ScheduleSpec(name="1f1b", num_microbatches=8))
    try:
        plan_partition(chain, config)
        return
    except InfeasibleError as err:
        fitting = err.smallest_fitting
        assert ("num_stages=" in str(err)) == (fitting is not None)

    def trial(q):  # the error's promise: 1F1B with num_microbatches >= q
        return PartitionConfig(num_stages=q, memory_cap_bytes=cap,
                               schedule=ScheduleSpec(name="1f1b", num_microbatches=max(8, q)))

    for q in range(1, (fitting or chain.num_segments() + 1)):
        assert brute_force(chain, trial(q)) is None, f"p={q} fits but {fitting} was named"
    if fitting is not None:
        assert brute_force(chain, trial(fitting)) is not None


@SETTINGS
@given(chain=chains(min_units=3), data=st.data())
def test_balanced_param_baseline_is_min_max(chain, data):
    parts = data.draw(st.integers(1, chain.num_segments()))
    cuts = balanced_param_cuts(chain, parts)
    weights = chain.param_weights()

    def worst(cs):
        bounds = (0,) + tuple(cs) + (len(chain),)
        return max(sum(weights[a:e]) for a, e in pairwise(bounds))

    best = min(worst(cs) for cs in itertools.combinations(chain.allowed_cuts(), parts - 1))
    assert worst(cuts) == pytest.approx(best)


def test_equal_layers_baseline_counts_layers():
    units = [UnitCost(name="emb", fwd_ms=1, bwd_ms=1, is_layer=False)]
    units += [UnitCost(name=f"blocks.{i}", fwd_ms=1, bwd_ms=2) for i in range(10)]
    units += [UnitCost(name="head", fwd_ms=1, bwd_ms=1, is_layer=False)]
    chain = CostChain(units=tuple(units))
    cuts = equal_layer_cuts(chain, 4)
    bounds = (0,) + cuts + (len(units),)
    layer_counts = [sum(u.is_layer for u in units[a:e]) for a, e in pairwise(bounds)]
    assert layer_counts == [3, 3, 2, 2]
    assert units[bounds[1] - 1].name == "blocks.2"  # embedding stays in stage 0


def test_same_chain_same_plan():
    chain = CostChain.from_lists([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [1e6] * 11,
                                 act_bytes=[1e5] * 11, groups=[[2, 3]])
    config = PartitionConfig(num_stages=3, schedule=ScheduleSpec(num_microbatches=6))
    first, second = plan_partition(chain, config), plan_partition(chain, config)
    again = CostChain.from_lists([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [1e6] * 11,
                                 act_bytes=[1e5] * 11, groups=[[2, 3]])
    third = plan_partition(again, config)
    assert first.plan.cuts == second.plan.cuts == third.plan.cuts
    assert first.plan.step_ms == third.plan.step_ms


def test_optimal_never_worse_than_baselines():
    chain = CostChain.from_lists([5, 1, 1, 2, 2, 2, 2, 2, 2, 8, 1], [1e6] * 11,
                                 act_bytes=[1e5] * 11, out_bytes=[1e6] * 11)
    for p in (2, 3, 4):
        result = plan_partition(chain, PartitionConfig(
            num_stages=p, schedule=ScheduleSpec(num_microbatches=8)))
        for baseline in result.baselines.values():
            assert result.plan.step_ms <= baseline.step_ms + 1e-9


def test_simulator_matches_closed_forms():
    p, m = 4, 8
    for name, v in (("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2)):
        chunks = p * v
        sim = simulate([1.0 / v] * chunks, [2.0 / v] * chunks, [0.0] * (chunks - 1),
                       ScheduleSpec(name=name, num_microbatches=m, virtual_stages=v),
                       num_ranks=p, act_bytes=[1.0] * chunks)
        assert sim.step_ms == pytest.approx((m + (p - 1) / v) * 3.0)
        assert sim.bubble == pytest.approx((p - 1) / v / (m + (p - 1) / v))
    sim = simulate([1.0] * p, [2.0] * p, [0.0] * (p - 1), ScheduleSpec(num_microbatches=m),
                   num_ranks=p, act_bytes=[1.0] * p)
    assert sim.peak_inflight == (4, 3, 2, 1)  # under 1F1B stage s holds p - s micro-batches
    ranks_ops = {(op.rank, op.kind, op.microbatch) for op in sim.ops}
    assert len(ranks_ops) == 2 * p * m


def test_memory_model_counts_adam_state():
    unit = UnitCost(name="u", fwd_ms=1, bwd_ms=1, param_count=10, param_bytes=20)
    assert MemoryModel().static_bytes(unit) == 20 + 20 + 80
    assert MemoryModel(grad_bytes_per_param=4, master_bytes_per_param=4).static_bytes(unit) \
        == 20 + 40 + 120


def test_more_stages_than_units_is_an_error():
    chain = CostChain.from_lists([1, 2, 3, 4], [1, 1, 1, 1], groups=[[1, 2]])
    with pytest.raises(ValueError, match=r"num_stages = 4 exceeds the 3 units.*4 units before"):
        plan_partition(chain, PartitionConfig(num_stages=4,
                                              schedule=ScheduleSpec(num_microbatches=8)))


def test_fewer_microbatches_than_stages_under_1f1b_is_an_error():
    chain = CostChain.from_lists([1] * 6, [1] * 6)
    with pytest.raises(ValueError, match="num_microbatches >= num_stages"):
        plan_partition(chain, PartitionConfig(num_stages=4,
                                              schedule=ScheduleSpec(num_microbatches=3)))


def test_batch_not_divisible_by_microbatches_is_an_error():
    with pytest.raises(ValueError, match="batch_size=10 is not divisible by num_microbatches=4"):
        PartitionConfig(num_stages=2, batch_size=10, schedule=ScheduleSpec(num_microbatches=4))


def test_group_naming_unknown_unit_is_an_error():
    with pytest.raises(ValueError, match="no unit named 'blokcs.1'.*blocks.1"):
        CostChain.from_lists([1, 1, 1], [1, 1, 1], names=["blocks.0", "blocks.1", "head"],
                             groups=[["blokcs.1", "head"]])


def test_batch_size_rescales_costs():
    chain = CostChain.from_lists([3.0] * 4, [0] * 4, act_bytes=[100] * 4, microbatch_size=2)
    result = plan_partition(chain, PartitionConfig(
        num_stages=2, batch_size=16, schedule=ScheduleSpec(num_microbatches=4)))
    assert result.chain.microbatch_size == 4
    assert result.plan.stages[0].compute_ms == pytest.approx(2 * 6.0)
    assert result.plan.stages[0].act_bytes == pytest.approx(2 * 200)


def test_memory_knob_trades_time_for_memory():
    # Heavy parameters at the start; fast compute there. Speed and memory disagree.
    chain = CostChain.from_lists([1, 1, 1, 6, 6, 6], [90, 90, 1, 1, 1, 1])
    speed = plan_partition(chain, PartitionConfig(num_stages=2, optimize="speed",
                                                  schedule=ScheduleSpec(num_microbatches=4)))
    memory = plan_partition(chain, PartitionConfig(num_stages=2, optimize="memory",
                                                   schedule=ScheduleSpec(num_microbatches=4)))
    assert max(memory.plan.rank_memory_bytes) < max(speed.plan.rank_memory_bytes)
    assert speed.plan.step_ms < memory.plan.step_ms
    assert math.isfinite(memory.plan.imbalance)


@settings(max_examples=60, deadline=None)
@given(p=st.integers(1, 4), v=st.integers(1, 3), k=st.integers(1, 3), data=st.data())
def test_simulated_schedules_respect_every_dependency(p, v, k, data):
    name = data.draw(st.sampled_from(["gpipe", "1f1b"])) if v == 1 else "interleaved_1f1b"
    if name == "interleaved_1f1b" and p == 1:
        return
    m = p * k
    chunks = p * v
    times = st.floats(0.0, 5.0, allow_nan=False)
    fwd = [data.draw(times) for _ in range(chunks)]
    bwd = [data.draw(times) for _ in range(chunks)]
    comm = [data.draw(times) for _ in range(chunks - 1)]
    sim = simulate(fwd, bwd, comm, ScheduleSpec(name=name, num_microbatches=m, virtual_stages=v),
                   num_ranks=p, act_bytes=[1.0] * chunks)
    ops = {(op.kind, op.chunk, op.microbatch): op for op in sim.ops}
    assert len(ops) == 2 * chunks * m
    eps = 1e-9
    for (kind, c, i), op in ops.items():
        assert op.rank == c % p
        if kind == "F" and c > 0:
            assert op.start_ms >= ops[("F", c - 1, i)].end_ms + comm[c - 1] - eps
        if kind == "B":
            assert op.start_ms >= ops[("F", c, i)].end_ms - eps
            if c < chunks - 1:
                assert op.start_ms >= ops[("B", c + 1, i)].end_ms + comm[c] - eps
    for r in range(p):
        mine = [op for op in sim.ops if op.rank == r]  # in the rank's execution order
        assert all(a.end_ms <= b.start_ms + eps for a, b in pairwise(mine))
    assert sim.step_ms == pytest.approx(max(op.end_ms for op in sim.ops))
    busy = sum(op.end_ms - op.start_ms for op in sim.ops)
    if sim.step_ms > 0:
        assert sim.bubble == pytest.approx(1 - busy / (p * sim.step_ms))
    if name == "1f1b":
        assert sim.peak_inflight == tuple(min(p - s, m) for s in range(p))


def _blocks_chain(num_blocks=4):
    """embed, blocks.0 .. blocks.{n-1}, head: each 1 ms forward, 2 ms backward, 1000 static
    bytes, 10 output bytes; blocks keep 100 activation bytes, embed and head 50."""
    def unit(name, layer=None, act=100.0):
        return UnitCost(name=name, fwd_ms=1, bwd_ms=2, state_bytes=1000, act_bytes=act,
                        out_bytes=10, flops=30, is_layer=layer is not None, layer=layer)
    return CostChain(units=(unit("embed", act=50),
                            *(unit(f"blocks.{i}", f"blocks.{i}") for i in range(num_blocks)),
                            unit("head", act=50)))


def test_activation_checkpointing_units_by_hand():
    chain = _blocks_chain()
    assert checkpointed_layers(chain, "full") == checkpointed_layers(chain, 1) == tuple(
        f"blocks.{i}" for i in range(4))
    assert checkpointed_layers(chain, 2) == ("blocks.1", "blocks.3")  # 1-based multiples
    assert checkpointed_layers(chain, 3) == ("blocks.2",)
    assert checkpointed_layers(chain, "off") == checkpointed_layers(chain, 0) == ()
    assert checkpointed_layers(chain, ["blocks.3", "blocks.0"]) == ("blocks.0", "blocks.3")
    ckpt = with_activation_checkpointing(chain, 2).units
    # blocks.1: keeps its input (the 10 bytes blocks.0 sends), backward = 2 + 1 recomputed
    # forward, rebuilds its 100 bytes for that backward, runs 30 + 10 FLOPs
    assert (ckpt[2].act_bytes, ckpt[2].bwd_ms, ckpt[2].recompute_bytes, ckpt[2].flops) == (
        10, 3, 100, 40)
    assert (ckpt[1].act_bytes, ckpt[1].bwd_ms, ckpt[1].recompute_bytes) == (100, 2, 0)


@pytest.mark.parametrize("value, message", [
    (-1, r"activation_checkpointing=-1: must be >= 0"),
    ("some", r"activation_checkpointing='some': valid: 'off', 'full'"),
    (["blocks.9"], r"names \['blocks.9'\], which are not blocks of the chain"),
])
def test_activation_checkpointing_bad_values(value, message):
    with pytest.raises(ValueError, match=message):
        checkpointed_layers(_blocks_chain(), value)


def test_activation_checkpointing_memory_and_step_by_hand():
    """2 stages, 1F1B, 4 micro-batches: [embed, blocks.0, blocks.1] | [blocks.2, blocks.3,
    head]; rank 0 holds 2 micro-batches in flight, rank 1 one."""
    chain = _blocks_chain()
    plans = {}
    for ac in (None, "full", 2):
        plans[ac] = plan_partition(chain, PartitionConfig(
            num_stages=2, activation_checkpointing=ac,
            schedule=ScheduleSpec(name="1f1b", num_microbatches=4))).plan
        assert plans[ac].cuts == (3,)
    # off: 3000 static + in flight x (50 + 100 + 100) / (100 + 100 + 50)
    assert plans[None].rank_memory_bytes == (3000 + 2 * 250, 3000 + 1 * 250)
    # every block: each keeps its 10-byte input; + one block's 100 bytes rebuilt
    assert plans["full"].rank_memory_bytes == (3000 + 2 * (50 + 10 + 10) + 100,
                                               3000 + 1 * (10 + 10 + 50) + 100)
    # every 2nd block (blocks.1, blocks.3)
    assert plans[2].rank_memory_bytes == (3000 + 2 * (50 + 100 + 10) + 100,
                                          3000 + 1 * (100 + 10 + 50) + 100)
    # per micro-batch per rank 9 ms, + 1 ms per recomputed block on the rank; 1F1B with
    # balanced stages: (m + p - 1) x that, the same transfers either way
    for ac, per_rank in ((None, 9), ("full", 11), (2, 10)):
        assert plans[ac].rank_compute_ms == (per_rank, per_rank)
        assert plans[ac].step_ms - plans[None].step_ms == pytest.approx(5 * (per_rank - 9))


def test_plan_json_says_the_checkpointing(tmp_path):
    from trainers.partition.plan_io import read_json, stage_units, write_json

    result = plan_partition(_blocks_chain(), PartitionConfig(
        num_stages=2, activation_checkpointing=["blocks.1"],
        schedule=ScheduleSpec(name="1f1b", num_microbatches=4)))
    write_json(result, tmp_path / "plan.json")
    data = read_json(tmp_path / "plan.json")
    assert data["config"]["activation_checkpointing"] == ["blocks.1"]
    assert [s["recompute_bytes"] for s in data["optimal"]["stages"]] == [100, 0]
    assert stage_units(data) == [["embed", "blocks.0", "blocks.1"],
                                 ["blocks.2", "blocks.3", "head"]]


def test_auto_partition_refuses_a_memory_budget_no_layout_meets():
    """partition='auto' plans before any weight is placed: a device too small for every split
    of the 1b model into 2 stages is refused by name, with the pipeline size that fits."""
    from dataclasses import replace

    from rag_mm.config import model_config
    from trainers.parallel.auto import auto_partition
    from trainers.partition.hardware import device_spec_for

    small = replace(device_spec_for("a100-40gb"), memory_gib=8.0)
    with pytest.raises(InfeasibleError, match=r"no split into 2 stages .* fits memory_cap_bytes="
                                              r"8\.59e\+09; the smallest pipeline that fits is "
                                              r"num_stages=\d+") as refused:
        auto_partition(model_config("1b"), pp_size=2, schedule="1f1b", num_microbatches=2,
                       batch_size=2, device=small)
    fitting = refused.value.smallest_fitting
    assert fitting > 2
    auto_partition(model_config("1b"), pp_size=fitting, schedule="1f1b",
                   num_microbatches=fitting, batch_size=fitting, device=small)


def test_auto_partition_cuts_for_the_v_under_zbv():
    """partition='auto' with the runtime's zbv_zero_bubble: the 1b model cut for torch's
    order and its V (rank 0 holds the first and the last stage, so the retrieval, the
    embedding and the head), never slower than the cut interleaved 1F1B would choose, run
    under the same schedule (exact search over both)."""
    from rag_mm.config import model_config
    from trainers.parallel.auto import auto_plan

    kwargs = {"pp_size": 2, "num_microbatches": 4, "batch_size": 8, "device": "h100-80gb"}
    zbv = auto_plan(model_config("1b"), schedule="zbv_zero_bubble", **kwargs)
    looped = auto_plan(model_config("1b"), schedule="interleaved_1f1b", **kwargs)
    stages = zbv.plan.stages
    assert zbv.config.schedule.name == "zbv_zero_bubble" and zbv.exact
    assert [s.rank for s in stages] == [0, 1, 1, 0]
    assert stages[0].units[0] == "retrieval" and stages[-1].units[-1] == "head"
    assert all(0 < s.weight_grad_ms < s.bwd_ms for s in stages)
    as_looped = evaluate_split(zbv.chain, looped.plan.cuts, zbv.config, method="looped")
    assert zbv.plan.step_ms <= as_looped.step_ms
