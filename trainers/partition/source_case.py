"""The source's case: 16 nodes x 8 A100, 400 Gb/s between nodes; tensor parallelism across
nodes against a pipeline across nodes with tensor parallelism inside each node.

The source measured the pipeline layout 1.38x faster (new / old step 0.725) and had
estimated 1/2 + 1/2 x 1/log2(16) = 0.625. Its model shape, batch and the exact earlier
layout are not known, so ``source_case`` predicts the ratio for several earlier layouts
(the tensor group over all 16 nodes, or over 2 nodes) on a given shape; the README says
which assumption reproduces the measurement.
"""

from __future__ import annotations

import math

from trainers.partition.gpt import GPTShape, StepEstimate, TrainLayout, estimate_step
from trainers.partition.hardware import GPUS, Cluster

MEASURED_RATIO = 1 / 1.38
AUTHORS_ESTIMATE = 0.5 + 0.5 / math.log2(16)
# (label, tp, pp): the earlier layouts compared with the pipeline across nodes (tp=8, pp=16).
EARLIER_LAYOUTS = (("tp=128 across 16 nodes", 128, 1),
                   ("tp=16 across 2 nodes, pp=8", 16, 8),
                   ("tp=16 across 2 nodes, dp=8", 16, 1))
PIPELINE_LAYOUT = ("pp=16 across nodes, tp=8 in node", 8, 16)


def source_cluster(gpu: str = "a100-80gb") -> Cluster:
    return Cluster(gpu=GPUS[gpu], num_nodes=16, gpus_per_node=8, inter_node_gbps=400.0)


def best_layout(shape: GPTShape, cluster: Cluster, global_batch: int, *, tp: int,
                pp: int, overlap_tp_comm: bool = False) -> StepEstimate | None:
    """The fastest fitting layout with these tp and pp over micro-batch size, schedule,
    recomputation and ZeRO stage; None when none is valid and fits."""
    best = None
    dp = cluster.num_gpus // (tp * pp)
    schedules = [("1f1b", 1)] + ([("interleaved_1f1b", 2)] if pp > 1 else [])
    for micro in (1, 2, 4, 8, 16):
        for schedule, v in schedules:
            for recompute in ("none", "selective", "full"):
                for zero in ((0, 1, 3) if dp > 1 else (0,)):
                    layout = TrainLayout(tp=tp, pp=pp, global_batch=global_batch,
                                         microbatch=micro, schedule=schedule,
                                         virtual_stages=v, recompute=recompute, zero=zero,
                                         sequence_parallel=True,
                                         overlap_tp_comm=overlap_tp_comm)
                    try:
                        e = estimate_step(shape, cluster, layout)
                    except ValueError:
                        continue
                    if e.fits and (best is None or e.step_s < best.step_s):
                        best = e
    return best


def source_case(shape: GPTShape, global_batch: int, gpu: str = "a100-80gb",
                overlap_tp_comm: bool = False) -> dict:
    """Predicted new / old step time against each earlier layout (both sides with the
    backward tensor-parallel all-reduces overlapped, or neither)."""
    cluster = source_cluster(gpu)
    label, tp, pp = PIPELINE_LAYOUT
    new = best_layout(shape, cluster, global_batch, tp=tp, pp=pp,
                      overlap_tp_comm=overlap_tp_comm)
    rows = []
    for old_label, old_tp, old_pp in EARLIER_LAYOUTS:
        old = best_layout(shape, cluster, global_batch, tp=old_tp, pp=old_pp,
                          overlap_tp_comm=overlap_tp_comm)
        ratio = new.step_s / old.step_s if new and old else None
        rows.append({"earlier": old_label, "old": old, "ratio": ratio})
    return {"pipeline": new, "pipeline_label": label, "rows": rows,
            "measured": MEASURED_RATIO, "authors_estimate": AUTHORS_ESTIMATE}


def format_source_case(case: dict) -> str:
    new = case["pipeline"]
    lines = ["16 nodes x 8 A100, 400 Gb/s between nodes (per node):"]
    if new is None:
        return "\n".join(lines + [("  the pipeline layout (pp=16, tp=8) is not valid or does "
                                  "not fit for this shape: it needs layers divisible by 16 "
                                  "and heads by 8 (tp=128 needs heads divisible by 128)")])
    lines.append(f"  new: {case['pipeline_label']:<34} {new.description:<52} "
                 f"step {new.step_s:8.3f} s")
    for row in case["rows"]:
        old = row["old"]
        if old is None:
            lines.append(f"  old: {row['earlier']:<34} not valid or does not fit")
            continue
        comm = old.time_s["tp_comm"] / old.step_s
        lines.append(f"  old: {row['earlier']:<34} {old.description:<52} step {old.step_s:8.3f} s"
                     f"  (tp comm {comm:.0%})  new/old {row['ratio']:.3f}")
    lines.append(f"  measured new/old {case['measured']:.3f}; the source's estimate "
                 f"{case['authors_estimate']:.3f}")
    return "\n".join(lines)
