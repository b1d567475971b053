"""Pipeline step time and bubble for pp=2 on CPU gloo, against theory and the planner.

A small RAG model (the `tiny` size with a 6-layer, 128-wide generator) trains with a global
batch of 8 split into m = 1, 2, 4, 8 micro-batches (GPipe for m = 1, 1F1B otherwise), on 2
processes with one thread each. For every m the partitioner plans the split from a profile
measured at that micro-batch size, the pipeline runs it, and the table shows:

- step_ms: median measured pipeline step (forward + backward of all micro-batches);
- seq_ms: the same micro-batches run one after another in one process (no pipeline);
- bubble: measured idle share, 1 - seq_ms / (p * step_ms) (includes stage imbalance and
  transfers, which the textbook (p-1)/(m+p-1) leaves out);
- plan_ms, plan_bubble: the planner's simulated step and bubble; err = step_ms / plan_ms - 1
  (target: within 25%).

The CPU is shared with other work, so times are medians and still noisy; the load average
is printed with the table. When fewer than 2 cores are free the stages cannot overlap and
the measured bubble sits near 1 - 1/p whatever m is.

    .venv/bin/python benchmarks/pipeline_bubble.py [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from rag_mm.config import GeneratorConfig, model_config
from rag_mm.model import InMemoryBackend, build_model, synthetic_batch
from trainers.parallel.local import run_local
from trainers.parallel.pipeline import PipelineConfig, build_pipeline

PP = 2
BATCH = 8
MICROBATCHES = (1, 2, 4, 8)
NUM_DOCS = 64
OVERRIDES = {"generator": GeneratorConfig(hidden_size=128, num_layers=6, num_heads=4)}


def schedule_for(m: int) -> str:
    return "gpipe" if m < PP else "1f1b"


def build():
    torch.manual_seed(0)
    config = model_config("tiny", **OVERRIDES)
    model = build_model(config, backend=InMemoryBackend.random(NUM_DOCS))
    return model, synthetic_batch(config, BATCH, num_docs=NUM_DOCS)


def plan(m: int, runs: int) -> dict:
    """The partitioner's split and simulated step for m micro-batches of BATCH / m."""
    from trainers.partition.models import profile_rag
    from trainers.partition.partition import PartitionConfig, plan_partition
    from trainers.partition.schedule import ScheduleSpec
    from trainers.partition.units import chain_from_profile

    profile = profile_rag("tiny", analytic=False, batch_size=BATCH // m, runs=runs,
                          num_docs=NUM_DOCS, **OVERRIDES)
    result = plan_partition(chain_from_profile(profile), PartitionConfig(
        num_stages=PP, schedule=ScheduleSpec(name=schedule_for(m), num_microbatches=m)))
    return {"stages": [list(s.units) for s in result.plan.stages],
            "plan_ms": result.plan.step_ms, "plan_bubble": result.plan.bubble}


def sequential_ms(m: int, steps: int) -> float:
    """One process, the same micro-batches one after another (gradient accumulation)."""
    model, batch = build()
    size = BATCH // m
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        for i in range(m):
            (model({k: v[i * size:(i + 1) * size] for k, v in batch.items()})["loss"] / m).backward()
        times.append((time.perf_counter() - start) * 1e3)
        model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def _worker(rank: int, world_size: int, plans: dict, steps: int, out: str) -> None:
    results = {}
    for m, planned in plans.items():
        model, batch = build()
        pipe = build_pipeline(model, PipelineConfig(stages=planned["stages"],
                                                    schedule=schedule_for(m), num_microbatches=m),
                              batch, pp_group=dist.group.WORLD, device=torch.device("cpu"))
        times = []
        for _ in range(steps + 1):
            dist.barrier()
            start = time.perf_counter()
            pipe.step(batch)
            elapsed = torch.tensor((time.perf_counter() - start) * 1e3)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times.append(elapsed.item())
            for p in pipe.parameters():
                p.grad = None
        results[m] = statistics.median(times[1:])
    if rank == 0:
        torch.save(results, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per m (median)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    plans = {m: plan(m, runs=args.steps) for m in MICROBATCHES}
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "times.pt")
        run_local(_worker, PP, plans, args.steps, out)
        step_ms = torch.load(out)
    rows = []
    for m in MICROBATCHES:
        seq = sequential_ms(m, args.steps)
        rows.append({
            "m": m, "schedule": schedule_for(m), "stages": plans[m]["stages"],
            "step_ms": round(step_ms[m], 1), "seq_ms": round(seq, 1),
            "bubble": round(1 - seq / (PP * step_ms[m]), 3),
            "theory_bubble": round((PP - 1) / (m + PP - 1), 3),
            "plan_ms": round(plans[m]["plan_ms"], 1),
            "plan_bubble": round(plans[m]["plan_bubble"], 3),
            "err": round(step_ms[m] / plans[m]["plan_ms"] - 1, 3),
        })
    print(f"{'m':>2} {'sched':>5} {'step_ms':>8} {'seq_ms':>7} {'bubble':>6} {'theory':>6} "
          f"{'plan_ms':>7} {'plan_bub':>8} {'err':>6}  split")
    for r in rows:
        split = " | ".join(f"{s[0]}..{s[-1]}" for s in r["stages"])
        print(f"{r['m']:>2} {r['schedule']:>5} {r['step_ms']:>8} {r['seq_ms']:>7} "
              f"{r['bubble']:>6} {r['theory_bubble']:>6} {r['plan_ms']:>7} "
              f"{r['plan_bubble']:>8} {r['err']:>+6.1%}  {split}")
    load = os.getloadavg()[0]
    print(f"load average {load:.1f} on {os.cpu_count()} cores (the pipeline needs {PP} idle ones)")
    print(json.dumps({"benchmark": "pipeline_bubble", "pp": PP, "batch": BATCH,
                      "device": "cpu-gloo", "cores": os.cpu_count(), "load": round(load, 2),
                      "rows": rows}))


if __name__ == "__main__":
    main()
