"""Layout planner: collectives, ranking, memory, the 16x8 A100 comparison.

Run: .venv/bin/pytest tests/test_planner.py -q
"""

from __future__ import annotations

import math

import pytest

from trainers.partition.chain import CostChain, UnitCost
from trainers.partition.costs import DeviceSpec
from trainers.partition.planner import (
    ClusterSpec,
    Layout,
    allreduce_ms,
    compare_source_case,
    estimate,
    group_span,
    rank_layouts,
)


def transformer_chain(layers: int = 8, block_ms: float = 40.0, params: int = 200_000_000,
                      hidden_bytes: float = 2 * 2048 * 512 * 4) -> CostChain:
    """An embedding, ``layers`` equal blocks and a head, costed for micro-batch 2 (fp32)."""
    units = [UnitCost(name="embed", fwd_ms=1, bwd_ms=2, param_count=60_000_000,
                      param_bytes=240e6, act_bytes=hidden_bytes, out_bytes=hidden_bytes,
                      is_layer=False)]
    units += [UnitCost(name=f"blocks.{i}", fwd_ms=block_ms / 3, bwd_ms=2 * block_ms / 3,
                       param_count=params, param_bytes=4.0 * params, act_bytes=12 * hidden_bytes,
                       out_bytes=hidden_bytes, layer=f"blocks.{i}") for i in range(layers)]
    units += [UnitCost(name="head", fwd_ms=3, bwd_ms=6, param_count=60_000_000,
                       param_bytes=240e6, act_bytes=hidden_bytes, out_bytes=8, is_layer=False)]
    return CostChain(units=tuple(units), microbatch_size=2, source="given")


CLUSTER = ClusterSpec(num_nodes=2, gpus_per_node=4, gpu=DeviceSpec(memory_gib=40.0),
                      intra_node_gb_per_s=300.0, inter_node_gbit_per_s=100.0)


def test_allreduce_follows_the_alpha_beta_model():
    cluster = ClusterSpec(num_nodes=16, gpus_per_node=8, intra_latency_us=0.0,
                          inter_latency_us=0.0)
    one_gb = 1e9
    inside = allreduce_ms(one_gb, group_span(cluster, 8, 1), cluster)
    assert inside == pytest.approx(2 * 7 / 8 * one_gb / 300e9 * 1e3)
    # Across nodes the bandwidth term barely grows with the node count (not log2 n).
    four = allreduce_ms(one_gb, group_span(cluster, 32, 1), cluster)
    sixteen = allreduce_ms(one_gb, group_span(cluster, 128, 1), cluster)
    # inter: 2 (N-1)/N of S/8 through each GPU's 1/8 of 50 GB/s; intra: 2 * 7/8 S at 300 GB/s
    intra = 2 * 7 / 8 / 6
    assert sixteen / four == pytest.approx((2 * 15 / 16 + intra) / (2 * 3 / 4 + intra))
    assert four > inside
    with_latency = ClusterSpec(num_nodes=16, gpus_per_node=8)
    tiny = allreduce_ms(8.0, group_span(with_latency, 128, 1), with_latency)
    assert tiny == pytest.approx(2 * math.log2(128) * 15e-3, rel=0.01)  # latency: log steps


def test_group_span_places_tensor_ranks_inside_nodes():
    cluster = ClusterSpec(num_nodes=16, gpus_per_node=8)
    assert group_span(cluster, 8, 1).nodes == 1
    assert group_span(cluster, 128, 1).nodes == 16
    assert group_span(cluster, 16, 8).nodes == 16  # data parallel over nodes, stride 8
    assert group_span(cluster, 2, 4).nodes == 1


def test_ranking_is_sorted_and_consistent():
    chain = transformer_chain()
    ranked = rank_layouts(chain, CLUSTER, global_batch=64, schedules=("1f1b", "gpipe"))
    assert ranked
    fitting = [e for e in ranked if e.fits]
    assert fitting and fitting == ranked[:len(fitting)]
    assert [e.step_ms for e in fitting] == sorted(e.step_ms for e in fitting)
    for e in ranked:
        layout = e.layout
        assert layout.dp * layout.pp * layout.tp == CLUSTER.num_gpus
    for e in fitting:
        assert e.memory_bytes <= CLUSTER.gpu.memory_gib * 2**30
        assert 0.0 <= e.bubble < 1.0
        assert e.step_ms >= e.pipeline_ms
        assert e.samples_per_s == pytest.approx(64 / e.step_ms * 1e3)


def test_memory_and_communication_respond_to_the_layout():
    chain = transformer_chain(params=400_000_000)
    pure_dp = estimate(chain, CLUSTER, Layout(dp=8, pp=1, tp=1, num_microbatches=1),
                       global_batch=64)
    piped = estimate(chain, CLUSTER, Layout(dp=1, pp=8, tp=1, num_microbatches=8),
                     global_batch=64)
    tensor = estimate(chain, CLUSTER, Layout(dp=2, pp=1, tp=4, num_microbatches=1),
                      global_batch=64)
    assert not pure_dp.fits  # 3.3 B params at 16 bytes each (bf16 + Adam) exceed 40 GB
    assert piped.fits and tensor.fits
    assert piped.comm_bytes["tp"] == 0 and piped.comm_bytes["pp"] > 0
    assert tensor.comm_bytes["tp"] > 0 and tensor.comm_bytes["pp"] == 0
    assert tensor.comm_bytes["dp"] > 0 and piped.comm_bytes["dp"] == 0
    assert piped.bubble > tensor.bubble


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="num_nodes=0"):
        ClusterSpec(num_nodes=0, gpus_per_node=8)
    with pytest.raises(ValueError, match="precision='fp8'"):
        estimate(transformer_chain(), CLUSTER, Layout(dp=8, pp=1, tp=1, num_microbatches=1),
                 global_batch=64, precision="fp8")
    bad = estimate(transformer_chain(), CLUSTER, Layout(dp=3, pp=1, tp=1, num_microbatches=1),
                   global_batch=64)
    assert not bad.fits and "8 GPUs" in bad.reason


def test_source_case_prefers_the_pipeline_across_nodes():
    chain = transformer_chain(layers=16, params=300_000_000)
    case = compare_source_case(chain, global_batch=256)
    tp, pp = case["tp_across_nodes"], case["pipeline_across_nodes"]
    assert tp.layout.tp == 128 and pp.layout.pp == 16 and pp.layout.tp == 8
    assert case["predicted_ratio"] == pytest.approx(pp.step_ms / tp.step_ms)
    assert case["predicted_ratio"] < 1.0
    assert tp.tp_ms > pp.tp_ms  # the cross-node all-reduces are what the pipeline removes
