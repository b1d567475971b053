"""Tracer and unit chain: module tree, shared parameters, conservation, analytic == measured.

Run: .venv/bin/pytest tests/test_partition_trace.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from trainers.partition.costs import DeviceSpec
from trainers.partition.partition import PartitionConfig, plan_partition
from trainers.partition.schedule import ScheduleSpec
from trainers.partition.trace import Profile, trace_model
from trainers.partition.units import chain_from_profile


class Block(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(h)
        self.attn = nn.Linear(h, h)
        self.mlp = nn.Sequential(nn.Linear(h, 4 * h), nn.GELU(), nn.Linear(4 * h, h))

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class TiedLM(nn.Module):
    """Embedding, blocks in a ModuleList, LM head tied to the embedding; loss in forward."""

    def __init__(self, h: int = 32, layers: int = 4, vocab: int = 50) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, h)
        self.blocks = nn.ModuleList(Block(h) for _ in range(layers))
        self.head = nn.Linear(h, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return nn.functional.cross_entropy(self.head(x).flatten(0, 1), ids.flatten())


class Glue(nn.Module):
    """A root with its own parameters and heavy work before the first and after the last
    child (what the unit chain must hand to the right unit)."""

    def __init__(self, h: int = 64) -> None:
        super().__init__()
        self.before = nn.Parameter(torch.randn(h, h))
        self.a = nn.Linear(h, h)
        self.b = nn.Linear(h, h)
        self.after = nn.Parameter(torch.randn(h, 8 * h))

    def forward(self, x):
        x = x @ self.before @ self.before
        return (self.b(self.a(x)) @ self.after).sum()


IDS = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def measured() -> Profile:
    torch.manual_seed(0)
    return trace_model(TiedLM(), IDS, runs=3)


@pytest.fixture(scope="module")
def analytic() -> Profile:
    with torch.device("meta"):
        model = TiedLM()
    return trace_model(model, IDS, analytic=True)


def test_tree_order_shapes_and_shared_parameters(measured):
    mods = measured.modules
    order = [mods[n].order for n in ("emb", "blocks.0", "blocks.1", "blocks.3", "head")]
    assert order == sorted(order) and order[0] > mods[""].order
    assert mods["blocks.0"].input_shapes == [[4, 16, 32]]
    assert mods["blocks.0"].output_bytes == 4 * 16 * 32 * 4
    assert mods["blocks"].order == -1  # a ModuleList never runs itself
    assert measured.shared == [["emb", "head"]]
    assert measured.shared_params[0]["numel"] == 50 * 32
    for name in ("blocks.0", "head", "emb"):
        assert mods[name].fwd_ms > 0 and mods[name].bwd_ms > 0, name
    assert mods["blocks.0"].act_bytes > mods["blocks.0"].output_bytes
    assert mods[""].param_count == sum(p.numel() for p in TiedLM().parameters())


@pytest.mark.parametrize("runs", [1, None])
def test_unit_costs_add_up_to_the_whole(runs, analytic):
    """Exact for one pass (medians of parts need not add up to the median of the whole)."""
    torch.manual_seed(0)
    profile = trace_model(TiedLM(), IDS, runs=runs) if runs else analytic
    chain = chain_from_profile(profile, max_unit_share=0.05)
    root = profile.root
    assert sum(u.compute_ms for u in chain.units) == pytest.approx(root.fwd_ms + root.bwd_ms)
    assert sum(u.flops for u in chain.units) == pytest.approx(root.flops)
    assert sum(u.param_count for u in chain.units) == root.param_count  # tied counted once
    assert len(chain) > 6  # descended below the blocks
    assert {u.layer for u in chain.units} >= {"blocks.0", "blocks.3", None}
    assert chain.units[0].name == "emb"


def test_tied_weights_are_never_split(measured):
    chain = chain_from_profile(measured, tied="colocate")
    assert chain.num_segments() == 1
    with pytest.raises(ValueError, match="exceeds the 1 units"):
        plan_partition(chain, PartitionConfig(num_stages=2,
                                              schedule=ScheduleSpec(num_microbatches=4)))
    replicated = chain_from_profile(measured, tied="replicate")
    assert sum(u.param_count for u in replicated.units) == measured.root.param_count + 50 * 32
    plan = plan_partition(replicated, PartitionConfig(num_stages=2,
                                                      schedule=ScheduleSpec(num_microbatches=4)))
    assert len(plan.plan.stages) == 2


def test_declared_groups_stay_together_and_unknown_names_fail(measured):
    chain = chain_from_profile(measured, tied="replicate", groups=[["blocks.1", "blocks.2"]],
                               max_unit_share=1.0 / 8)
    plan = plan_partition(chain, PartitionConfig(num_stages=4,
                                                 schedule=ScheduleSpec(num_microbatches=8)))
    holders = {s.chunk for s in plan.plan.stages for m in s.modules
               if m.startswith(("blocks.1", "blocks.2"))}
    assert len(holders) == 1
    with pytest.raises(ValueError, match=r"'blocks.9' is not a module.*blocks"):
        chain_from_profile(measured, groups=[["blocks.0", "blocks.9"]])


def test_analytic_flops_match_the_measured_count(measured, analytic):
    for name in ("", "emb", "blocks.0", "blocks.2.mlp", "head"):
        assert analytic.modules[name].flops == pytest.approx(measured.modules[name].flops), name
        assert analytic.modules[name].act_bytes == pytest.approx(
            measured.modules[name].act_bytes, rel=0.25), name
    tokens, h = 4 * 16, 32
    linear_params = h * h + h * 4 * h * 2
    assert analytic.modules["blocks.0"].flops >= 6 * tokens * linear_params
    assert analytic.source == "analytic"
    assert analytic.modules["blocks.0"].fwd_ms > 0


def test_analytic_times_are_derived_from_flops(analytic):
    """Each op costs max(flops / compute rate, bytes / memory rate): with memory never the
    limit, a module's forward + backward is exactly its FLOPs at the matmul rate; on the
    default device it is never less."""
    fast_memory = DeviceSpec(mem_gb_per_s=1e12)
    with torch.device("meta"):
        profile = trace_model(TiedLM(), IDS, analytic=True, device=fast_memory)
        slower = trace_model(TiedLM(), IDS, analytic=True,
                             device=DeviceSpec(mem_gb_per_s=1e12, tflops=fast_memory.tflops / 2))
    rate = fast_memory.tflops * 1e12 * fast_memory.matmul_efficiency / 1e3  # FLOPs per ms
    for name in ("", "blocks.0", "blocks.2.mlp", "head"):
        module, default = profile.modules[name], analytic.modules[name]
        assert module.flops > 0 and module.fwd_ms > 0 and module.bwd_ms > 0, name
        assert module.fwd_ms + module.bwd_ms == pytest.approx(module.flops / rate, rel=1e-5), name
        assert default.fwd_ms + default.bwd_ms >= module.flops / rate * (1 - 1e-6), name
    assert slower.root.fwd_ms == pytest.approx(2 * profile.root.fwd_ms, rel=1e-5)


def test_weight_gradients_are_the_matmuls_second_product(measured):
    """What a split-backward schedule runs apart as W: the weight-gradient GEMM of every
    matmul by a parameter, as long as that matmul's forward (compute-bound device: exact
    from FLOPs); none for layer norms and embedding lookups. The chain's units share it
    out as they share the backward."""
    fast_memory = DeviceSpec(mem_gb_per_s=1e12)
    with torch.device("meta"):
        profile = trace_model(TiedLM(), IDS, analytic=True, device=fast_memory)
    rate = fast_memory.tflops * 1e12 * fast_memory.matmul_efficiency / 1e3  # FLOPs per ms
    tokens, h, vocab = 4 * 16, 32, 50
    mods = profile.modules
    assert mods["blocks.0"].wgrad_ms == pytest.approx(2 * tokens * 9 * h * h / rate, rel=1e-5)
    assert mods["head"].wgrad_ms == pytest.approx(2 * tokens * h * vocab / rate, rel=1e-5)
    assert mods["blocks.0.norm"].wgrad_ms == mods["emb"].wgrad_ms == 0.0
    chain = chain_from_profile(profile, max_unit_share=0.05)
    assert sum(u.weight_grad_ms for u in chain.units) == pytest.approx(profile.root.wgrad_ms)
    assert all(0 <= u.weight_grad_ms <= u.bwd_ms for u in chain.units)
    timed = measured.modules["blocks.0"]
    assert 0 < timed.wgrad_ms < timed.bwd_ms


def test_analytic_trace_leaves_a_meta_model_on_meta():
    with torch.device("meta"):
        model = TiedLM()
    trace_model(model, IDS, analytic=True)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.head.weight is model.emb.weight


def test_glue_goes_to_the_neighbouring_unit():
    with torch.device("meta"):
        model = Glue()
    profile = trace_model(model, torch.zeros(4, 64), analytic=True)
    chain = chain_from_profile(profile, max_unit_share=0.01)
    assert [u.name for u in chain.units] == ["a", "b"]
    a, b = chain.units
    assert a.param_count == 64 * 65 + 64 * 64  # `before` is used before a runs
    assert b.param_count == 64 * 65 + 64 * 512  # `after` is used after b
    mm = 2 * 4 * 64 * 64  # one (4, 64) @ (64, 64)
    # x @ before @ before: 2 forward, backward 1 (x needs no grad) + 2
    assert a.flops == profile.modules["a"].flops + 5 * mm
    assert b.flops == profile.modules["b"].flops + 3 * 8 * mm  # @ after (64 x 512)
    assert sum(u.flops for u in chain.units) == pytest.approx(profile.root.flops)


def test_same_profile_same_plan(measured, analytic):
    """The whole result (chain, plan, simulation, baselines, search counts) is a function of
    the profile: equal after a JSON round trip, and for two analytic traces of two models."""
    again = Profile.from_dict(json.loads(json.dumps(measured.to_dict())))
    config = PartitionConfig(num_stages=3, schedule=ScheduleSpec(num_microbatches=6))
    first = plan_partition(chain_from_profile(measured, tied="replicate"), config)
    second = plan_partition(chain_from_profile(again, tied="replicate"), config)
    assert first.plan.cuts == second.plan.cuts
    assert first.plan.step_ms == second.plan.step_ms
    assert first == second
    with torch.device("meta"):
        other = trace_model(TiedLM(), IDS, analytic=True)
    assert other.to_dict() == {**analytic.to_dict(), "fwd_wall_ms": other.fwd_wall_ms,
                               "bwd_wall_ms": other.bwd_wall_ms}  # CPU clocks of the pass
    plans = [plan_partition(chain_from_profile(p, tied="replicate"), config)
             for p in (analytic, other)]
    assert plans[0] == plans[1]
    assert plans[0].plan.step_ms > 0 and plans[0].plan.step_ms != first.plan.step_ms


def test_plan_script_writes_json_and_pictures(measured, tmp_path):
    """scripts/plan.py partition from a saved profile: table, JSON, both pictures."""
    import importlib.util
    from pathlib import Path

    from trainers.partition import plan
    from trainers.partition.plan_io import read_json, stage_units

    saved = tmp_path / "profile.json"
    saved.write_text(json.dumps(measured.to_dict()))
    script = Path(__file__).resolve().parents[1] / "scripts" / "plan.py"
    spec = importlib.util.spec_from_file_location("plan_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "plan.json"
    module.main(["partition", "--from-profile", str(saved), "--tied", "replicate",
                 "--stages", "3", "--microbatches", "6", "--json", str(out),
                 "--png", str(tmp_path / "stages.png"),
                 "--timeline-png", str(tmp_path / "timeline.png")])
    data = read_json(out)
    stages = data["optimal"]["stages"]
    assert len(stages) == 3 and data["exact"]
    assert [u for s in stage_units(data) for u in s] == [u["name"] for u in data["units"]]
    assert data["optimal"]["imbalance"] == pytest.approx(
        max(s["compute_ms"] for s in stages) / (sum(s["compute_ms"] for s in stages) / 3))
    assert set(data["baselines"]) == {"equal_layers", "balanced_params"}
    assert (tmp_path / "stages.png").stat().st_size > 10_000
    assert (tmp_path / "timeline.png").stat().st_size > 10_000
    same = plan(measured, PartitionConfig(num_stages=3, schedule=ScheduleSpec(
        num_microbatches=6)), tied="replicate")
    assert list(same.plan.cuts) == data["optimal"]["cuts"]


def test_published_picture_draws_every_row_and_names_the_misses(tmp_path, monkeypatch):
    """`plan.py published --png`: one marker set per group, the misses (|error| >= 20 %)
    numbered in published-step order and named beside the plot, the count within 20 % in
    the title."""
    import matplotlib.axes

    from trainers.partition.draw import draw_published

    marks, names, titles = [], [], []
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate",
                        lambda self, text, *a, **k: marks.append(text))
    monkeypatch.setattr(matplotlib.axes.Axes, "text",
                        lambda self, x, y, text, *a, **k: names.append(text))
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda self, text, *a, **k: titles.append(text))
    groups = [("a", [{"run": "ok", "published_s": 2.0, "error": -0.19},
                     {"run": "slow", "published_s": 5.0, "error": -0.25}]),
              ("b", [{"run": "fast", "published_s": 9.0, "error": 0.20}])]
    draw_published(groups, tmp_path / "published.png")
    assert (tmp_path / "published.png").stat().st_size > 10_000
    assert marks == ["1", "2"]
    assert names == ["outside 20 %:\n1 slow: -25.0%\n2 fast: +20.0%"]
    assert titles == ["planner against published runs: 1 of 3 within 20 % (dashed)"]
