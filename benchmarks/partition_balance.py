"""Stage balance of the optimal split against the two common defaults.

The `demo` model measured on this CPU (median of timed passes) and the `1b` model costed
analytically (meta device, A100 roofline), each with its declared chain (retrieval, blocks,
head: what the pipeline runtime cuts) and with the module tree walked inside the blocks.
For p = 2, 4, 8 under 1F1B with m = 4p micro-batches: imbalance (max / mean stage compute)
and simulated step time of ours, equal layer counts (torchtitan / Megatron) and balanced
parameters (DeepSpeed). The CPU is shared, so measured times are medians and still noisy;
every column is computed on the same profile.

    .venv/bin/python benchmarks/partition_balance.py [--runs 7] [--microbatches-per-stage 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.partition.models import profile_rag
from trainers.partition.partition import PartitionConfig, plan_partition
from trainers.partition.schedule import ScheduleSpec
from trainers.partition.units import chain_from_profile

STAGES = (2, 4, 8)


def rows_for(label: str, chain, per_stage: int) -> list[dict]:
    rows = []
    for p in STAGES:
        row = {"model": label, "units": len(chain), "p": p}
        if p > chain.num_segments():
            row["note"] = f"only {chain.num_segments()} units"
            rows.append(row)
            continue
        result = plan_partition(chain, PartitionConfig(
            num_stages=p, schedule=ScheduleSpec(num_microbatches=per_stage * p),
            max_nodes=3_000_000))
        row["exact"] = result.exact
        row["microbatches"] = per_stage * p
        for key, plan in (("ours", result.plan), *result.baselines.items()):
            row[f"{key}_imbalance"] = None if plan is None else round(plan.imbalance, 4)
            row[f"{key}_step_ms"] = None if plan is None else round(plan.step_ms, 2)
        rows.append(row)
    return rows


def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--microbatches-per-stage", type=int, default=4)
    args = parser.parse_args()
    start = time.perf_counter()
    demo = profile_rag("demo", analytic=False, batch_size=2, runs=args.runs)
    big = profile_rag("1b", analytic=True, batch_size=2)
    rows = []
    for label, profile in (("demo measured", demo), ("1b analytic", big)):
        rows += rows_for(f"{label}, declared", chain_from_profile(profile), args.microbatches_per_stage)
        walked = chain_from_profile(profile, declared=False, max_unit_share=1 / 32)
        rows += rows_for(f"{label}, walked", walked, args.microbatches_per_stage)
    header = (f"{'model / chain':<28}{'units':>6}{'p':>3}{'exact':>6}  {'imbalance: ours':>15}"
              f"{'equal layers':>13}{'bal. params':>12}   {'step ms: ours':>13}"
              f"{'equal layers':>13}{'bal. params':>12}")
    print(header)
    for r in rows:
        if "note" in r:
            print(f"{r['model']:<28}{r['units']:>6}{r['p']:>3}  {r['note']}")
            continue
        print(f"{r['model']:<28}{r['units']:>6}{r['p']:>3}{'yes' if r['exact'] else 'no':>6}  "
              f"{fmt(r['ours_imbalance'], '.3f'):>15}"
              f"{fmt(r['equal_layers_imbalance'], '.3f'):>13}"
              f"{fmt(r['balanced_params_imbalance'], '.3f'):>12}   "
              f"{fmt(r['ours_step_ms'], '.1f'):>13}{fmt(r['equal_layers_step_ms'], '.1f'):>13}"
              f"{fmt(r['balanced_params_step_ms'], '.1f'):>12}")
    print(json.dumps({"benchmark": "partition_balance",
                      "microbatches_per_stage": args.microbatches_per_stage,
                      "runs": args.runs, "seconds": round(time.perf_counter() - start, 1),
                      "rows": rows}))


if __name__ == "__main__":
    main()
