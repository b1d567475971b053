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
    """Which micro-batch each rank runs when: forward light, backward dark (a split
    backward's weight-gradient part hatched), one colour per chunk (interleaved and V
    schedules), micro-batch number inside each box."""
    ops = plan.simulation.ops
    split = any(op.kind == "W" for op in ops)
    num_ranks = len(plan.rank_compute_ms)
    fig, ax = plt.subplots(figsize=(12, 0.6 * num_ranks + 1.5))
    cmap = plt.get_cmap("tab10")
    for op in ops:
        colour = cmap((op.chunk // num_ranks) % 10)
        ax.barh(op.rank, op.end_ms - op.start_ms, left=op.start_ms, height=0.8,
                color=colour, alpha=0.45 if op.kind == "F" else 0.95, edgecolor="black",
                linewidth=0.3, hatch="///" if op.kind == "W" else None)
        if op.end_ms - op.start_ms > plan.step_ms / 150:
            ax.text((op.start_ms + op.end_ms) / 2, op.rank, str(op.microbatch), ha="center",
                    va="center", fontsize=6)
    ax.set_yticks(range(num_ranks))
    ax.set_yticklabels([f"rank {r}" for r in range(num_ranks)])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_title(title or f"{METHOD_LABELS.get(plan.method, plan.method)}: step "
                 f"{plan.step_ms:.1f} ms, bubble {plan.bubble:.1%} (light: forward, dark: "
                 f"backward{', hatched: weight gradients' if split else ''})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_published(groups: list[tuple[str, list[dict]]], path: str | Path,
                   title: str = "") -> None:
    """Every published run's prediction error against its published step: one marker per
    set (``groups``: a label and the rows ``published.compare`` returns), the 20 % target
    as dashed lines, the runs outside it named."""
    fig, ax = plt.subplots(figsize=(13, 6.5))
    markers = "osD^v<>pP*Xh"
    for i, (label, rows) in enumerate(groups):
        ax.scatter([r["published_s"] for r in rows], [100 * r["error"] for r in rows],
                   s=22, marker=markers[i % len(markers)], color=f"C{i % 10}", alpha=0.75,
                   label=f"{label} ({len(rows)})", edgecolors="none")
    missed = sorted((r for _, rows in groups for r in rows if abs(r["error"]) >= 0.20),
                    key=lambda r: r["published_s"])
    for j, r in enumerate(missed, 1):  # numbered on the plot, named beside it
        ax.annotate(str(j), (r["published_s"], 100 * r["error"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    if missed:
        ax.text(1.01, 0.0, "outside 20 %:\n" + "\n".join(
            f"{j} {r['run']}: {r['error']:+.1%}" for j, r in enumerate(missed, 1)),
            transform=ax.transAxes, fontsize=7, va="bottom")
    for target in (-20, 20):
        ax.axhline(target, color="red", ls="--", lw=0.8)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("published step (s, log scale)")
    ax.set_ylabel("predicted / published - 1 (%)")
    total = sum(len(rows) for _, rows in groups)
    within = sum(abs(r["error"]) < 0.20 for _, rows in groups for r in rows)
    ax.set_title(title or f"planner against published runs: {within} of {total} within 20 % "
                          "(dashed)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
