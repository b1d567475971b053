"""Partition a model into pipeline stages, rank parallel layouts, or show the 16x8 case.

    python scripts/plan.py partition --model demo --stages 4 --microbatches 8 \
        --json plan.json --png plan.png --timeline-png timeline.png
    python scripts/plan.py partition --model 1b --analytic --stages 8 --microbatches 16
    python scripts/plan.py layouts --model 1b --nodes 16 --gpus-per-node 8 --global-batch 512
    python scripts/plan.py source-case --model 1b --global-batch 512
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.partition.chain import MemoryModel
from trainers.partition.costs import DeviceSpec
from trainers.partition.draw import draw_partition, draw_timeline
from trainers.partition.partition import PartitionConfig, plan_partition
from trainers.partition.plan_io import write_json
from trainers.partition.planner import ClusterSpec, compare_source_case, rank_layouts
from trainers.partition.report import (
    format_layouts,
    format_partition,
    format_source_case,
    layouts_dict,
    source_case_dict,
)
from trainers.partition.schedule import ScheduleSpec
from trainers.partition.trace import Profile
from trainers.partition.units import chain_from_profile


def _profile(args) -> Profile:
    if args.from_profile:
        return Profile.from_dict(json.loads(Path(args.from_profile).read_text()))
    from trainers.partition.models import profile_rag

    analytic = args.analytic if args.analytic is not None else args.model == "1b"
    overrides = {}
    if args.generator_layers or args.generator_hidden:
        from rag_mm.config import model_config

        gen = model_config(args.model).generator
        hidden = args.generator_hidden or gen.hidden_size
        overrides["generator"] = replace(gen, num_layers=args.generator_layers or gen.num_layers,
                                         hidden_size=hidden, num_heads=max(1, hidden // 128))
    profile = profile_rag(args.model, analytic=analytic, batch_size=args.profile_batch,
                          runs=args.runs, **overrides)
    if args.save_profile:
        Path(args.save_profile).write_text(json.dumps(profile.to_dict()))
    return profile


def _chain(args):
    declared = None if args.chain == "auto" else args.chain == "declared"
    return chain_from_profile(_profile(args), declared=declared,
                              tied=args.tied, max_unit_share=args.max_unit_share)


def cmd_partition(args) -> None:
    chain = _chain(args)
    cap = args.memory_cap_gib * 2**30 if args.memory_cap_gib else None
    config = PartitionConfig(
        num_stages=args.stages, batch_size=args.batch_size, memory_cap_bytes=cap,
        optimize=float(args.optimize) if args.optimize[0].isdigit() else args.optimize,
        link_gb_per_s=args.link_gb_per_s,
        memory=MemoryModel(optimizer_bytes_per_param=args.optimizer_bytes_per_param),
        schedule=ScheduleSpec(name=args.schedule, num_microbatches=args.microbatches,
                              virtual_stages=args.virtual_stages))
    result = plan_partition(chain, config)
    print(format_partition(result))
    if args.json:
        write_json(result, args.json, model=args.model)
    if args.png:
        draw_partition(result, args.png, title=f"{args.model}: {args.stages} stages")
    if args.timeline_png:
        draw_timeline(result.plan, args.timeline_png)


def _cluster(args) -> ClusterSpec:
    gpu = DeviceSpec(name=args.gpu_name, tflops=args.tflops, memory_gib=args.gpu_memory_gib,
                     mem_gb_per_s=args.mem_gb_per_s)
    return ClusterSpec(num_nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu=gpu,
                       intra_node_gb_per_s=args.intra_gb_per_s,
                       inter_node_gbit_per_s=args.inter_gbit_per_s)


def cmd_layouts(args) -> None:
    args.analytic = True
    chain = _chain(args)
    ranked = rank_layouts(chain, _cluster(args), global_batch=args.global_batch,
                          precision=args.precision)
    print(format_layouts(ranked, top=args.top))
    if args.json:
        Path(args.json).write_text(json.dumps(layouts_dict(ranked), indent=1, default=str))


def cmd_source_case(args) -> None:
    args.analytic = True
    chain = _chain(args)
    case = compare_source_case(chain, global_batch=args.global_batch, precision=args.precision,
                               rank_all=args.rank_all)
    print(format_source_case(case))
    if args.json:
        Path(args.json).write_text(json.dumps(source_case_dict(case), indent=1, default=str))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="demo", choices=["tiny", "demo", "1b"])
    common.add_argument("--from-profile", help="a profile JSON written by --save-profile")
    common.add_argument("--save-profile", help="write the traced profile here (JSON)")
    common.add_argument("--profile-batch", type=int, default=2,
                        help="samples in the traced micro-batch")
    common.add_argument("--runs", type=int, default=5, help="timed passes (median)")
    common.add_argument("--chain", choices=["auto", "declared", "walk"], default="auto",
                        help="the model's units() chain (auto: when it has one), or walk "
                             "the module tree")
    common.add_argument("--max-unit-share", type=float, default=1 / 32)
    common.add_argument("--tied", choices=["colocate", "replicate"], default="colocate")
    common.add_argument("--json", help="write the result as JSON here")
    common.add_argument("--generator-layers", type=int, help="override the decoder depth")
    common.add_argument("--generator-hidden", type=int,
                        help="override the decoder width (heads of 128)")

    part = sub.add_parser("partition", parents=[common], help="cut into pipeline stages")
    mode = part.add_mutually_exclusive_group()
    mode.add_argument("--analytic", dest="analytic", action="store_true", default=None,
                      help="cost from shapes on the meta device (default for 1b)")
    mode.add_argument("--measured", dest="analytic", action="store_false",
                      help="time a real pass on this machine (default for tiny, demo)")
    part.add_argument("--stages", type=int, required=True)
    part.add_argument("--microbatches", type=int, default=8)
    part.add_argument("--schedule", default="1f1b",
                      choices=["1f1b", "gpipe", "interleaved_1f1b"])
    part.add_argument("--virtual-stages", type=int, default=1)
    part.add_argument("--batch-size", type=int, help="samples per step (rescales the costs)")
    part.add_argument("--memory-cap-gib", type=float)
    part.add_argument("--optimize", default="speed", help="speed, memory, or a weight 0..1")
    part.add_argument("--optimizer-bytes-per-param", type=float, default=8.0)
    part.add_argument("--link-gb-per-s", type=float, default=25.0)
    part.add_argument("--png", help="stage bars (compute, memory)")
    part.add_argument("--timeline-png", help="simulated schedule timeline")
    part.set_defaults(func=cmd_partition)

    for name, func, helptext in (("layouts", cmd_layouts, "rank (dp, pp, tp, m, schedule)"),
                                 ("source-case", cmd_source_case,
                                  "16x8 A100: tp across nodes vs pipeline across nodes")):
        p = sub.add_parser(name, parents=[common], help=helptext)
        p.add_argument("--global-batch", type=int, default=512)
        p.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "fp32"])
        p.add_argument("--nodes", type=int, default=16)
        p.add_argument("--gpus-per-node", type=int, default=8)
        p.add_argument("--gpu-name", default="A100-40GB bf16")
        p.add_argument("--tflops", type=float, default=312.0)
        p.add_argument("--gpu-memory-gib", type=float, default=40.0)
        p.add_argument("--mem-gb-per-s", type=float, default=1555.0)
        p.add_argument("--intra-gb-per-s", type=float, default=300.0)
        p.add_argument("--inter-gbit-per-s", type=float, default=400.0)
        p.add_argument("--top", type=int, default=15)
        p.add_argument("--rank-all", action="store_true",
                       help="source-case: also rank every layout to name the best")
        p.set_defaults(func=func)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
