"""Readable tables (and JSON-ready dicts) of partitions and layout estimates."""

from __future__ import annotations

from trainers.partition.gpt import GPTShape, StepEstimate
from trainers.partition.partition import LayoutPlan, PartitionResult

GIB = 2**30
COLUMNS = (("optimal", "optimal (ours)"), ("equal_layers", "equal layers (titan/Megatron)"),
           ("balanced_params", "balanced params (DeepSpeed)"))


def _units(stage) -> str:
    first, last = stage.units[0], stage.units[-1]
    span = first if first == last else f"{first}..{last}"
    return span if len(span) <= 22 else span[:21] + "~"


def format_partition(result: PartitionResult) -> str:
    """The optimal split beside both baselines: per stage units, ms, GiB (of the rank that
    holds it, rN where ranks hold several stages); then totals."""
    plans: dict[str, LayoutPlan | None] = {"optimal": result.plan, **result.baselines}
    sched = result.config.schedule
    v = f", v={sched.virtual_stages}" if sched.virtual_stages > 1 else ""
    lines = [(f"{len(result.chain)} units ({result.chain.source}, micro-batch "
              f"{result.chain.microbatch_size}), {len(result.chain.groups)} group(s); "
              f"{result.config.num_stages} stages, {sched.name}, m={sched.num_microbatches}{v}; "
              f"search {'exact' if result.exact else 'NOT exact (budget hit)'}, "
              f"{result.search_nodes} nodes")]
    width = 42
    lines.append(f"{'':<12}" + "".join(f"{title:<{width}}" for _, title in COLUMNS))
    for k in range(result.config.num_chunks):
        cells = []
        for key, _ in COLUMNS:
            plan = plans.get(key)
            if plan is None:
                cells.append(f"{'n/a':<{width}}")
                continue
            stage = plan.stages[k]
            cells.append(f"{_units(stage):<23}{stage.compute_ms:9.2f} ms "
                         f"{plan.rank_memory_bytes[stage.rank] / GIB:6.2f}G ")
        label = f"stage {k}" + (f" r{result.plan.stages[k].rank}" if v else "")
        lines.append(f"{label:<12}" + "".join(cells))
    for label, fn in (("step ms", lambda p: f"{p.step_ms:.2f}"),
                      ("imbalance", lambda p: f"{p.imbalance:.3f}"),
                      ("bubble", lambda p: f"{p.bubble:.1%}"),
                      ("max mem GiB", lambda p: f"{max(p.rank_memory_bytes) / GIB:.3f}"),
                      ("fits cap", lambda p: "yes" if p.fits else "NO")):
        row = "".join(f"{(fn(plans[k]) if plans.get(k) else 'n/a'):<{width}}" for k, _ in COLUMNS)
        lines.append(f"{label:<12}" + row)
    return "\n".join(lines)


def format_step(e: StepEstimate, shape: GPTShape) -> str:
    """One layout's prediction: step, throughput, time and memory breakdown, fit."""
    memory = "  ".join(f"{k} {v / GIB:.2f}" for k, v in e.memory_bytes.items())
    time = "  ".join(f"{k} {v:.3f}" for k, v in e.time_s.items() if v > 0)
    return "\n".join([
        (f"model: {shape.num_params / 1e9:.2f} B parameters, {shape.num_layers} layers x "
        f"{shape.hidden} hidden, {shape.num_heads} heads, sequence {shape.seq_len}"),
        f"layout: {e.description} ({e.num_microbatches} micro-batches per step)",
        (f"step {e.step_s:.3f} s   tokens/s {e.tokens_per_s:,.0f}   model TFLOP/s per GPU "
        f"{e.tflops_per_gpu:.1f} (run, with recomputation: {e.hardware_tflops_per_gpu:.1f})"),
        f"time s: {time}",
        (f"memory GiB per GPU: {memory}  total {e.memory_gib:.2f}  "
        f"fits: {'yes' if e.fits else 'NO'}")])


def format_steps(ranked: list[StepEstimate], top: int = 15) -> str:
    fitting = [e for e in ranked if e.fits]
    width = max([58] + [len(e.description) + 1 for e in fitting[:top]])
    lines = [f"{len(ranked)} layouts, {len(fitting)} fit; best {min(top, len(fitting))}:",
             (f"{'#':>3} {'layout':<{width}}{'step s':>9}{'tokens/s':>12}{'TFLOP/s':>9}"
              f"{'GiB/GPU':>9}")]
    for i, e in enumerate(fitting[:top], 1):
        lines.append(f"{i:>3} {e.description:<{width}}{e.step_s:>9.3f}{e.tokens_per_s:>12,.0f}"
                     f"{e.tflops_per_gpu:>9.1f}{e.memory_gib:>9.2f}")
    return "\n".join(lines)


def step_dict(e: StepEstimate) -> dict:
    """The JSON of ``plan.py estimate --json``."""
    return {"layout": e.description, "dp": e.dp, "num_microbatches": e.num_microbatches,
            "step_s": e.step_s, "tokens_per_s": e.tokens_per_s,
            "tflops_per_gpu": e.tflops_per_gpu,
            "hardware_tflops_per_gpu": e.hardware_tflops_per_gpu,
            "memory_gib_per_gpu": {**{k: v / GIB for k, v in e.memory_bytes.items()},
                                   "total": e.memory_gib},
            "fits": e.fits, "time_s": e.time_s}
