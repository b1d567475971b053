"""Readable tables (and JSON-ready dicts) of partitions, layout rankings and the 16x8 case."""

from __future__ import annotations

from trainers.partition.partition import LayoutPlan, PartitionResult
from trainers.partition.planner import Estimate

GIB = 2**30
COLUMNS = (("optimal", "optimal (ours)"), ("equal_layers", "equal layers (titan/Megatron)"),
           ("balanced_params", "balanced params (DeepSpeed)"))


def _units(stage) -> str:
    first, last = stage.units[0], stage.units[-1]
    span = first if first == last else f"{first}..{last}"
    return span if len(span) <= 22 else span[:21] + "~"


def format_partition(result: PartitionResult) -> str:
    """The optimal split beside both baselines: per stage units, ms, GiB; then totals."""
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
        lines.append(f"{'stage ' + str(k):<12}" + "".join(cells))
    for label, fn in (("step ms", lambda p: f"{p.step_ms:.2f}"),
                      ("imbalance", lambda p: f"{p.imbalance:.3f}"),
                      ("bubble", lambda p: f"{p.bubble:.1%}"),
                      ("max mem GiB", lambda p: f"{max(p.rank_memory_bytes) / GIB:.3f}"),
                      ("fits cap", lambda p: "yes" if p.fits else "NO")):
        row = "".join(f"{(fn(plans[k]) if plans.get(k) else 'n/a'):<{width}}" for k, _ in COLUMNS)
        lines.append(f"{label:<12}" + row)
    return "\n".join(lines)


def format_layouts(ranked: list[Estimate], top: int = 15) -> str:
    fitting = [e for e in ranked if e.fits]
    lines = [f"{len(ranked)} layouts, {len(fitting)} fit; best {min(top, len(fitting))}:",
             (f"{'#':>3} {'layout':<40}{'step ms':>10}{'samples/s':>11}{'GiB/GPU':>9}"
              f"{'bubble':>8}{'imbal':>7}{'tp ms':>9}{'dp ms':>8}{'GB/GPU tp/pp/dp':>22}")]
    for i, e in enumerate(fitting[:top], 1):
        comm = "/".join(f"{e.comm_bytes.get(k, 0) / 1e9:.1f}" for k in ("tp", "pp", "dp"))
        mark = "" if e.exact else " *"
        lines.append(f"{i:>3} {e.layout.describe() + mark:<40}{e.step_ms:>10.1f}{e.samples_per_s:>11.1f}"
                     f"{e.memory_bytes / GIB:>9.2f}{e.bubble:>8.1%}{e.imbalance:>7.3f}"
                     f"{e.tp_ms:>9.1f}{e.dp_ms:>8.1f}{comm:>22}")
    if any(not e.exact for e in fitting[:top]):
        lines.append("  * partition search hit its node budget: best split found, not proven")
    return "\n".join(lines)


def estimate_dict(e: Estimate | None) -> dict | None:
    if e is None:
        return None
    return {"layout": e.layout.describe(), "dp": e.layout.dp, "pp": e.layout.pp,
            "tp": e.layout.tp, "num_microbatches": e.layout.num_microbatches,
            "schedule": e.layout.schedule, "virtual_stages": e.layout.virtual_stages,
            "fits": e.fits, "reason": e.reason, "step_ms": e.step_ms,
            "pipeline_ms": e.pipeline_ms, "tp_ms": e.tp_ms, "dp_ms": e.dp_ms,
            "optimizer_ms": e.optimizer_ms, "bubble": e.bubble, "imbalance": e.imbalance,
            "memory_bytes_per_gpu": e.memory_bytes, "comm_bytes_per_gpu": e.comm_bytes,
            "samples_per_s": e.samples_per_s, "exact_partition": e.exact}


def layouts_dict(ranked: list[Estimate]) -> list[dict]:
    return [estimate_dict(e) for e in ranked]


def source_case_dict(case: dict) -> dict:
    return {k: (estimate_dict(v) if isinstance(v, Estimate) else v) for k, v in case.items()
            if k != "cluster"}


def format_source_case(case: dict) -> str:
    a, b = case["tp_across_nodes"], case["pipeline_across_nodes"]
    lines = ["16 nodes x 8 A100, 400 Gb/s between nodes:"]
    for label, e in (("tensor parallel across nodes", a), ("pipeline across nodes, tp in node", b),
                     ("best layout found", case["best"])):
        if label.startswith("best") and e is None:
            continue
        if e is None:
            lines.append(f"  {label:<36} does not fit")
            continue
        lines.append(f"  {label:<36} {e.layout.describe():<38} step {e.step_ms:9.1f} ms "
                     f"(tp all-reduce {e.tp_ms:8.1f}, bubble {e.bubble:.1%}, "
                     f"{e.memory_bytes / GIB:.1f} GiB/GPU)")
    if "predicted_ratio" in case:
        lines.append(f"  new/old step time: predicted {case['predicted_ratio']:.3f}, authors' "
                     f"estimate {case['authors_estimate_ratio']:.3f}, measured "
                     f"{case['authors_measured_ratio']:.3f} (38% faster)")
    return "\n".join(lines)
