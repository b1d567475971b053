"""Pictures of a plan: stage bars (compute and memory) and the simulated schedule."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from trainers.partition.partition import LayoutPlan, PartitionResult

METHOD_LABELS = {"optimal": "optimal (ours)", "equal_layers": "equal layers (torchtitan/Megatron)",
                 "balanced_params": "balanced params (DeepSpeed)"}


def draw_partition(result: PartitionResult, path: str | Path, title: str = "") -> None:
    """Per-rank compute (ms per micro-batch) and memory (GiB) for the plan and baselines."""
    plans = [result.plan] + [p for p in result.baselines.values() if p is not None]
    ranks = range(result.config.num_stages)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    width = 0.8 / len(plans)
    for j, plan in enumerate(plans):
        xs = [r - 0.4 + width * (j + 0.5) for r in ranks]
        label = (f"{METHOD_LABELS.get(plan.method, plan.method)}: step {plan.step_ms:.1f} ms, "
                 f"imbalance {plan.imbalance:.3f}")
        top.bar(xs, plan.rank_compute_ms, width, label=label)
        static = _rank_static(plan)
        acts = [m - s for m, s in zip(plan.rank_memory_bytes, static)]
        bottom.bar(xs, [s / 2**30 for s in static], width, color=f"C{j}", alpha=0.9,
                   label=f"{METHOD_LABELS.get(plan.method, plan.method)}: params+grads+optim")
        bottom.bar(xs, [a / 2**30 for a in acts], width, bottom=[s / 2**30 for s in static],
                   color=f"C{j}", alpha=0.4, hatch="//")
    for stage in result.plan.stages:
        first, last = stage.units[0], stage.units[-1]
        name = first if first == last else f"{first}..{last}"
        top.annotate(name, (stage.rank, 0), xytext=(0, 2), textcoords="offset points",
                     rotation=90, fontsize=7, ha="center", va="bottom")
    if result.config.memory_cap_bytes:
        bottom.axhline(result.config.memory_cap_bytes / 2**30, color="red", ls="--", label="cap")
    top.set_ylabel("compute per micro-batch (ms)")
    bottom.set_ylabel("memory (GiB; hatched: activations in flight)")
    bottom.set_xlabel("pipeline rank")
    bottom.set_xticks(list(ranks))
    top.legend(fontsize=8)
    bottom.legend(fontsize=7)
    sched = result.config.schedule
    top.set_title(title or f"{result.config.num_stages} stages, {sched.name}, "
                  f"m={sched.num_microbatches}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rank_static(plan: LayoutPlan) -> list[float]:
    static = [0.0] * len(plan.rank_memory_bytes)
    for stage in plan.stages:
        static[stage.rank] += stage.static_bytes
    return static


def draw_timeline(plan: LayoutPlan, path: str | Path, title: str = "") -> None:
    """Which micro-batch each rank runs when: forward light, backward dark, one colour per
    chunk (interleaved schedules), micro-batch number inside each box."""
    ops = plan.simulation.ops
    num_ranks = len(plan.rank_compute_ms)
    fig, ax = plt.subplots(figsize=(12, 0.6 * num_ranks + 1.5))
    cmap = plt.get_cmap("tab10")
    for op in ops:
        colour = cmap((op.chunk // num_ranks) % 10)
        ax.barh(op.rank, op.end_ms - op.start_ms, left=op.start_ms, height=0.8,
                color=colour, alpha=0.45 if op.kind == "F" else 0.95, edgecolor="black",
                linewidth=0.3)
        if op.end_ms - op.start_ms > plan.step_ms / 150:
            ax.text((op.start_ms + op.end_ms) / 2, op.rank, str(op.microbatch), ha="center",
                    va="center", fontsize=6)
    ax.set_yticks(range(num_ranks))
    ax.set_yticklabels([f"rank {r}" for r in range(num_ranks)])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_title(title or f"{METHOD_LABELS.get(plan.method, plan.method)}: step "
                 f"{plan.step_ms:.1f} ms, bubble {plan.bubble:.1%} (light: forward, dark: "
                 f"backward)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
