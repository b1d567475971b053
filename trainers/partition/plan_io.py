"""Plans as JSON: what ``scripts/plan.py --json`` writes and other code reads back.

Format (all times per micro-batch unless named ``step``; bytes per GPU)::

    {"format": "rag-mm-partition-plan/1",
     "source": "measured" | "analytic" | "given", "microbatch_size": int | null,
     "config": {"num_stages", "schedule", "num_microbatches", "virtual_stages",
                "memory_cap_bytes", "optimize", "link_gb_per_s", "link_latency_ms"},
     "exact": bool, "search_nodes": int,
     "units": [{"name", "modules", "fwd_ms", "bwd_ms", "weight_grad_ms", "param_count",
                "act_bytes", "out_bytes", "flops", "layer"}],
     "groups": [[unit name, ...]],
     "optimal": PLAN, "baselines": {"equal_layers": PLAN | null, "balanced_params": PLAN | null}}

    PLAN = {"method", "cuts", "step_ms", "bubble", "imbalance", "memory_imbalance",
            "max_memory_bytes", "fits", "comm_bytes",
            "stages": [{"stage", "rank", "units", "modules", "fwd_ms", "bwd_ms",
                        "weight_grad_ms", "compute_ms", "param_count", "static_bytes",
                        "act_bytes_per_microbatch", "recompute_bytes", "memory_bytes"}]}

``imbalance`` is max / mean of per-rank compute; a stage's ``memory_bytes`` is its rank's
peak (parameters, gradients, optimizer state and in-flight activations); ``weight_grad_ms``
the part of ``bwd_ms`` a split-backward schedule runs apart (W).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from trainers.partition.partition import LayoutPlan, PartitionResult

FORMAT = "rag-mm-partition-plan/1"


def plan_to_dict(plan: LayoutPlan) -> dict:
    return {
        "method": plan.method, "cuts": list(plan.cuts), "step_ms": plan.step_ms,
        "bubble": plan.bubble, "imbalance": plan.imbalance,
        "memory_imbalance": plan.memory_imbalance,
        "max_memory_bytes": max(plan.rank_memory_bytes), "fits": plan.fits,
        "comm_bytes": plan.comm_bytes,
        "stages": [{"stage": s.chunk, "rank": s.rank, "units": list(s.units),
                    "modules": list(s.modules), "fwd_ms": s.fwd_ms, "bwd_ms": s.bwd_ms,
                    "weight_grad_ms": s.weight_grad_ms, "compute_ms": s.compute_ms,
                    "param_count": s.param_count,
                    "static_bytes": s.static_bytes, "act_bytes_per_microbatch": s.act_bytes,
                    "recompute_bytes": s.recompute_bytes,
                    "memory_bytes": plan.rank_memory_bytes[s.rank]} for s in plan.stages]}


def _jsonable(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def result_to_dict(result: PartitionResult) -> dict:
    config, chain = result.config, result.chain
    return {
        "format": FORMAT, "source": chain.source, "microbatch_size": chain.microbatch_size,
        "config": {"num_stages": config.num_stages, "schedule": config.schedule.name,
                   "num_microbatches": config.schedule.num_microbatches,
                   "virtual_stages": config.schedule.virtual_stages,
                   "memory_cap_bytes": config.memory_cap_bytes, "optimize": config.optimize,
                   "link_gb_per_s": config.link_gb_per_s,
                   "link_latency_ms": config.link_latency_ms,
                   "memory": asdict(config.memory),
                   "activation_checkpointing": _jsonable(config.activation_checkpointing)},
        "exact": result.exact, "search_nodes": result.search_nodes,
        "units": [{"name": u.name, "modules": list(u.modules), "fwd_ms": u.fwd_ms,
                   "bwd_ms": u.bwd_ms, "weight_grad_ms": u.weight_grad_ms,
                   "param_count": u.param_count, "act_bytes": u.act_bytes,
                   "out_bytes": u.out_bytes, "flops": u.flops, "layer": u.layer}
                  for u in chain.units],
        "groups": [[chain.units[i].name for i in g] for g in chain.groups],
        "notes": list(chain.notes),
        "optimal": plan_to_dict(result.plan),
        "baselines": {k: (plan_to_dict(v) if v is not None else None)
                      for k, v in result.baselines.items()},
    }


def write_json(result: PartitionResult, path: str | Path, **extra) -> dict:
    data = {**result_to_dict(result), **extra}
    Path(path).write_text(json.dumps(data, indent=1, default=str))
    return data


def stage_units(data: dict, method: str = "optimal") -> list[list[str]]:
    """Unit names per stage (chunk order): what ``trainers.parallel.pipeline`` takes."""
    plan = data[method] if method == "optimal" else data["baselines"][method]
    return [list(stage["units"]) for stage in plan["stages"]]


def read_json(path: str | Path) -> dict:
    data = json.loads(Path(path).read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a partition plan (format={data.get('format')!r}, "
                         f"expected {FORMAT!r})")
    return data
