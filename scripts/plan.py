"""Partition a model into pipeline stages, estimate or rank parallel layouts, or show the
16x8 case.

    python scripts/plan.py partition --model demo --stages 4 --microbatches 8 \
        --json plan.json --png plan.png --timeline-png timeline.png
    python scripts/plan.py estimate --layers 96 --hidden 12288 --heads 96 --seq-len 2048 \
        --vocab 51200 --gpu a100-80gb --nodes 8 --tp 8 --pp 8 --global-batch 64 \
        --microbatch 1 --recompute selective --json step.json
    python scripts/plan.py layouts --model 1b --gpu a100-40gb --nodes 16 --global-batch 512
    python scripts/plan.py source-case --layers 96 --hidden 16384 --heads 128 --seq-len 2048 \
        --vocab 51200 --global-batch 512
    python scripts/plan.py published
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.errors import run_cli
from trainers.partition.chain import MemoryModel
from trainers.partition.draw import draw_partition, draw_published, draw_timeline
from trainers.partition.gpt import (
    OPS_NEEDS_FLASH,
    PIPELINE_SCHEDULES,
    RANKED_RECOMPUTE,
    RANKED_SCHEDULES,
    RECOMPUTE,
    RUNTIME_RECOMPUTE,
    GPTShape,
    TrainLayout,
    estimate_step,
    rank_layouts,
    runtime_trains,
)
from trainers.partition.hardware import FLASH_KERNELS, GPUS, Cluster, gpu_spec
from trainers.partition.partition import PartitionConfig, plan_partition
from trainers.partition.plan_io import write_json
from trainers.partition.report import format_partition, format_step, format_steps, step_dict
from trainers.partition.schedule import TORCH_CLASSES, ScheduleSpec
from trainers.partition.source_case import format_source_case, source_case
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
        activation_checkpointing=(int(args.activation_checkpointing)
                                  if args.activation_checkpointing.isdigit()
                                  else args.activation_checkpointing),
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


def _shape(args) -> tuple[GPTShape, int]:
    """The decoder shape from --layers/--hidden/... or a project size; and sequences per
    example (a RAG example is one sequence per document read)."""
    if args.layers is None:
        from trainers.partition.models import gpt_shape

        shape, per_example = gpt_shape(args.model)  # its own attention: SDPA, flash2
        return _with_attention(shape, args.attention), per_example
    missing = [flag for flag, value in (("--hidden", args.hidden), ("--heads", args.heads),
                                        ("--seq-len", args.seq_len), ("--vocab", args.vocab))
               if value is None]
    if missing:
        raise ValueError(f"--layers needs {', '.join(missing)} too (or use --model)")
    shape = GPTShape(num_layers=args.layers, hidden=args.hidden, num_heads=args.heads,
                     num_kv_heads=args.kv_heads, ffn_hidden=args.ffn_hidden,
                     gated_mlp=args.gated_mlp, seq_len=args.seq_len, vocab=args.vocab,
                     tied_embeddings=not args.untied_embeddings, dropout=not args.no_dropout)
    return _with_attention(shape, args.attention), 1


def _with_attention(shape: GPTShape, attention: str | None) -> GPTShape:
    """`shape` with `--attention` applied (None: the shape's own)."""
    if attention is None:
        return shape
    if attention == "materialized":
        return replace(shape, flash_attention=False)
    return replace(shape, flash_attention=True, flash_kernel=attention)


def _cluster(args) -> Cluster:
    return Cluster(gpu=gpu_spec(args.gpu), num_nodes=args.nodes,
                   gpus_per_node=args.gpus_per_node, intra_node_gbps=args.intra_node_gbps,
                   inter_node_gbps=args.inter_node_gbps)


def cmd_estimate(args) -> None:
    shape, per_example = _shape(args)
    layout = TrainLayout(tp=args.tp, pp=args.pp, dp=args.dp, cp=args.cp,
                         global_batch=args.global_batch * per_example,
                         microbatch=args.microbatch, schedule=args.schedule,
                         virtual_stages=args.virtual_stages, recompute=args.recompute,
                         recompute_every=args.recompute_every,
                         zero=args.zero, sequence_parallel=args.sequence_parallel,
                         overlap_grad_reduce=args.overlap_grad_reduce,
                         overlap_tp_comm=args.overlap_tp_comm,
                         zero3_unit=args.zero3_unit, overlap_zero3=not args.serial_zero3,
                         deferred_grad_sync=args.deferred_grad_sync,
                         logit_bytes=args.logit_bytes, optimizer_state=args.optimizer_state,
                         first_stage_layers=args.first_stage_layers,
                         last_stage_layers=args.last_stage_layers)
    cluster = _cluster(args)
    if args.runtime:  # as trainers/parallel trains it
        if args.cp > 1:
            raise ValueError(f"--runtime with --cp {args.cp}: this project's runtime has no "
                             "context parallelism; valid with --runtime: --cp 1")
        if args.recompute not in RUNTIME_RECOMPUTE:
            raise ValueError(f"--runtime with --recompute {args.recompute}: the runtime "
                             "checkpoints whole blocks; valid with --runtime: none, full")
        if not runtime_trains(args.schedule, args.recompute):
            raise ValueError(f"--runtime with --recompute {args.recompute} and --schedule "
                             f"{args.schedule}: the runtime does not checkpoint under the "
                             "split-backward schedules; valid with it: --recompute none")
        dp = args.dp or cluster.num_gpus // (args.tp * args.pp)
        layout = replace(layout, zero=3 if dp > 1 else 0, fp32_params=True,
                         deferred_grad_sync=True, bf16_matmul_params=True)
    estimate = estimate_step(shape, cluster, layout)
    print(format_step(estimate, shape))
    if args.json:
        Path(args.json).write_text(json.dumps(step_dict(estimate), indent=1))


def cmd_layouts(args) -> None:
    shape, per_example = _shape(args)
    if args.runtime and args.zero is not None:
        raise ValueError(f"--runtime with --zero {' '.join(map(str, args.zero))}: the runtime "
                         "shards as it trains (FSDP2 over dp); drop --zero or --runtime")
    zero = (0, 1, 2, 3) if args.zero is None else tuple(sorted(set(args.zero)))
    recompute = RANKED_RECOMPUTE if args.recompute is None else tuple(
        r for r in RECOMPUTE if r in args.recompute)
    if args.runtime and args.recompute and not set(recompute) <= set(RUNTIME_RECOMPUTE):
        raise ValueError(f"--runtime with --recompute {' '.join(args.recompute)}: the runtime "
                         "checkpoints whole blocks or none; valid with --runtime: none, full")
    if "ops" in recompute and not shape.flash_attention:
        raise ValueError(OPS_NEEDS_FLASH)
    if recompute == ("selective",) and shape.flash_attention:
        raise ValueError("--recompute selective frees nothing under flash attention, so it "
                         "is not ranked there; valid: none, ops, full")
    schedules = RANKED_SCHEDULES if args.schedules is None else tuple(args.schedules)
    ranked = rank_layouts(shape, _cluster(args), args.global_batch * per_example, zero=zero,
                          recompute=recompute, schedules=schedules,
                          runtime=args.runtime, logit_bytes=args.logit_bytes,
                          optimizer_state=args.optimizer_state,
                          overlap_grad_reduce=args.overlap_grad_reduce,
                          overlap_tp_comm=args.overlap_tp_comm)
    print(format_steps(ranked, top=args.top))
    if args.json:
        Path(args.json).write_text(json.dumps([step_dict(e) for e in ranked[:args.top]],
                                              indent=1))


def cmd_source_case(args) -> None:
    shape, per_example = _shape(args)
    case = source_case(shape, args.global_batch * per_example, gpu=gpu_spec(args.gpu).name,
                       overlap_tp_comm=args.overlap_tp_comm)
    print(format_source_case(case))
    if args.json:
        rows = [{"earlier": r["earlier"], "ratio": r["ratio"],
                 "old": step_dict(r["old"]) if r["old"] else None} for r in case["rows"]]
        Path(args.json).write_text(json.dumps({
            "pipeline": step_dict(case["pipeline"]) if case["pipeline"] else None,
            "rows": rows, "measured": case["measured"],
            "authors_estimate": case["authors_estimate"]}, indent=1))


def cmd_published(args) -> None:
    from trainers.partition.published import (
        BIGSCIENCE_BLOOM,
        HELD_OUT,
        META_LLAMA3,
        MPT_TABLES,
        NVIDIA_DGXC,
        NVIDIA_DGXC_CP,
        OPEN_RECIPES,
        PUBLISHED_RUNS,
        TORCHTITAN_A100,
        compare,
        format_comparison,
    )

    rows = [compare(run) for run in PUBLISHED_RUNS]
    held_out = [compare(run) for run in HELD_OUT]
    tables = [compare(run, rank=False) for run in MPT_TABLES]
    print(format_comparison(rows))
    print("\nheld out (not used to fit):")
    print(format_comparison(held_out))
    print(f"\nthe rest of the MPT tables ({len(tables)} runs, not ranked):")
    for gpu in ("H100 80GB", "A100 80GB", "A100 40GB"):
        errors = [r["error"] for r in tables if gpu in r["run"]]
        within = sum(abs(e) < 0.20 for e in errors)
        print(f"  {gpu}: {within} of {len(errors)} within 20 % "
              f"({min(errors):+.1%} to {max(errors):+.1%})")
    missed = [r for r in tables if abs(r["error"]) >= 0.20]
    if missed:
        print(format_comparison(missed).replace("(not ranked)", ""))
    # The held-out sets added later, each printed, drawn and written under its JSON name:
    # (name, runs, the picture's label, the printout's title)
    later = (("nvidia_dgxc", NVIDIA_DGXC, "NVIDIA DGX Cloud",
              "second set (NVIDIA DGX Cloud benchmarks, H100 BF16; predicted once)"),
             ("meta_llama3", META_LLAMA3, "Meta's Llama 3 405B",
              "third set (Meta's Llama 3 405B, H100; uneven stages, ZeRO-2)"),
             ("nvidia_dgxc_cp", NVIDIA_DGXC_CP, "NVIDIA Llama 3.1 CP 2",
              "fourth set (NVIDIA's Llama 3.1 recipes, H100 BF16, context parallel 2)"),
             ("torchtitan_a100", TORCHTITAN_A100, "torchtitan FSDP2",
              "fifth set (PyTorch's torchtitan, FSDP2 on 64 A100 80GB)"),
             ("bigscience_bloom", BIGSCIENCE_BLOOM, "BLOOM 176B",
              "sixth set (BLOOM 176B, Megatron-DeepSpeed on 384 A100 80GB)"),
             ("open_recipes", OPEN_RECIPES, "Megatron-LM / GPT-NeoX recipes",
              "seventh set (Megatron-LM's GPT-3 175B example, GPT-NeoX-20B; A100)"))
    groups = [("published", rows), ("held_out", held_out), ("mpt_tables", tables)]
    labels = {"published": "calibration and checks (Megatron, DeepSpeed)",
              "held_out": "held out: MosaicML", "mpt_tables": "MosaicML's other rows"}
    for name, runs, label, title in later:
        compared = [compare(run) for run in runs]
        print(f"\nheld out, {title}:")
        print(format_comparison(compared))
        groups.append((name, compared))
        labels[name] = f"held out: {label}"
    if args.png:
        draw_published([(labels[name], group) for name, group in groups], args.png)
    if args.json:
        held = {"held_out"} | {name for name, *_ in later}
        Path(args.json).write_text(json.dumps([
            {**{k: v for k, v in row.items() if k != "best"},
             "held_out": name in held, "set": name,
             "best": step_dict(row["best"]) if row["best"] else None}
            for name, group in groups for row in group], indent=1))


def _shape_and_cluster_flags(p: argparse.ArgumentParser, *, source_case: bool = False) -> None:
    model = p.add_argument_group("model (a project size, or a decoder-only shape)")
    model.add_argument("--model", default="1b", choices=["tiny", "demo", "1b"],
                       help="a project size's decoder (ignored when --layers is given)")
    model.add_argument("--layers", type=int)
    model.add_argument("--hidden", type=int)
    model.add_argument("--heads", type=int)
    model.add_argument("--kv-heads", type=int, help="grouped-query attention (default: --heads)")
    model.add_argument("--ffn-hidden", type=int, help="MLP width (default: 4 x --hidden)")
    model.add_argument("--gated-mlp", action="store_true", help="SwiGLU: three MLP matrices")
    model.add_argument("--no-dropout", action="store_true",
                       help="no dropout masks kept for backward (Llama-style models)")
    model.add_argument("--untied-embeddings", action="store_true",
                       help="an output layer of its own (default: tied to the embedding)")
    model.add_argument("--seq-len", type=int)
    model.add_argument("--vocab", type=int)
    model.add_argument("--attention", choices=[*FLASH_KERNELS, "materialized"],
                       help="flash: scores never stored, at the first FlashAttention's rate "
                            "(the default with --layers); flash2 / flash3: the same at "
                            "FlashAttention-2's / -3's (-3 Hopper only; flash2 is the default "
                            "with --model: torch's SDPA); cudnn: cuDNN's fused attention "
                            "(Transformer Engine's with NVTE_FUSED_ATTN=1; Hopper only); "
                            "materialized: Megatron's fused softmax keeps them")
    cluster = p.add_argument_group("cluster")
    cluster.add_argument("--gpu", default="a100-80gb", help=f"one of {', '.join(GPUS)}")
    if not source_case:
        cluster.add_argument("--nodes", type=int, default=1)
        cluster.add_argument("--gpus-per-node", type=int, default=8)
        cluster.add_argument("--intra-node-gbps", type=float,
                             help="NVLink per GPU, one way, Gb/s (default: the GPU's)")
        cluster.add_argument("--inter-node-gbps", type=float,
                             help="network per node, Gb/s (default: the reference server's, "
                                  "e.g. 8 x 200 for DGX A100)")
    p.add_argument("--global-batch", type=int, default=512,
                   help="examples per step (a project size: each becomes top_k sequences)")
    p.add_argument("--json", help="write the result as JSON here")
    if not source_case:
        p.add_argument("--runtime", action="store_true",
                       help="as this project's runtime trains: fp32 parameters under bf16 "
                            "autocast, FSDP2 over dp with one reduce-scatter per step and "
                            "the attention and MLP weights gathered in bf16 "
                            "(--zero 3 when dp > 1), recompute none or full")


def _logit_bytes_flag(p) -> None:
    p.add_argument("--logit-bytes", type=int, default=4, choices=[2, 4],
                   help="bytes of a logit and of its gradient in the loss: 4 = fp32 cross "
                        "entropy (Megatron, torch autocast, the runtime), 2 = a fused bf16 "
                        "loss (flash-attn's CrossEntropyLoss)")


def _optimizer_state_flag(p) -> None:
    p.add_argument("--optimizer-state", default="fp32", choices=["fp32", "bf16"],
                   help="Adam's state: fp32 = fp32 master copy and moments, 12 B a parameter "
                        "(Megatron, DeepSpeed); bf16 = bf16 moments and no master copy, 4 B "
                        "(NeMo's distributed_fused_adam with optim.dtype bf16)")


def _add_shape_commands(sub) -> None:
    est = sub.add_parser("estimate", help="predict one layout: step, tokens/s, memory")
    _shape_and_cluster_flags(est)
    layout = est.add_argument_group("layout")
    layout.add_argument("--tp", type=int, default=1)
    layout.add_argument("--pp", type=int, default=1)
    layout.add_argument("--dp", type=int, help="default: the rest of the GPUs")
    layout.add_argument("--cp", type=int, default=1,
                        help="context parallelism: each sequence split over cp GPUs "
                             "(needs flash attention)")
    layout.add_argument("--microbatch", type=int, default=1)
    layout.add_argument("--schedule", default="1f1b", choices=PIPELINE_SCHEDULES,
                        help="interleaved_zero_bubble / zbv_zero_bubble: the runtime's "
                             "split-backward schedules, costed in torch's order")
    layout.add_argument("--virtual-stages", type=int, default=1)
    layout.add_argument("--first-stage-layers", type=int,
                        help="layers on the first pipeline stage, the rest equal over the "
                             "others (default: equal stages)")
    layout.add_argument("--last-stage-layers", type=int,
                        help="layers on the last pipeline stage (see --first-stage-layers)")
    layout.add_argument("--recompute", default="none", choices=RECOMPUTE,
                        help="ops: torchtitan's op-level selective checkpointing (attention's "
                             "and every other matmul's outputs kept)")
    layout.add_argument("--recompute-every", type=int, default=1,
                        help="with --recompute full: every N-th block recomputed, the others "
                             "keep their activations (torchtitan's selective layer "
                             "checkpointing: 2)")
    layout.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3],
                        help="3 = ZeRO-3 / FSDP (the runtime's FSDP2: with "
                             "--deferred-grad-sync)")
    layout.add_argument("--sequence-parallel", action="store_true")
    layout.add_argument("--overlap-grad-reduce", action="store_true")
    layout.add_argument("--overlap-tp-comm", action="store_true",
                        help="backward tensor-parallel all-reduces behind weight gradients")
    layout.add_argument("--zero3-unit", default="layer", choices=["layer", "module"],
                        help="ZeRO-3 gathers per layer (FSDP2, the runtime) or per submodule "
                             "(DeepSpeed)")
    layout.add_argument("--deferred-grad-sync", action="store_true",
                        help="ZeRO-3 as the runtime runs FSDP2 under pipelining: one "
                             "reduce-scatter per step, parameters and gradients whole during it")
    layout.add_argument("--serial-zero3", action="store_true",
                        help="ZeRO-3 collectives in series with compute (default: prefetched "
                             "behind it, as FSDP2)")
    _logit_bytes_flag(layout)
    _optimizer_state_flag(layout)
    est.set_defaults(func=cmd_estimate)
    lay = sub.add_parser("layouts", help="rank (dp, pp, tp, micro-batch, schedule, "
                                         "recompute, ZeRO) layouts")
    _shape_and_cluster_flags(lay)
    lay.add_argument("--top", type=int, default=15)
    framework = lay.add_argument_group(
        "what the framework overlaps (default: each layout ranked both ways; a pick that "
        "needs it says grad-overlap / tp-overlap)")
    framework.add_argument("--overlap-grad-reduce", action=argparse.BooleanOptionalAction,
                           help="data-parallel gradient reduction behind the last backward")
    framework.add_argument("--overlap-tp-comm", action=argparse.BooleanOptionalAction,
                           help="backward tensor-parallel all-reduces behind weight gradients")
    framework.add_argument("--zero", type=int, nargs="+", choices=[0, 1, 2, 3],
                           help="the ZeRO stages it offers (default: all; e.g. 0 1 3 for "
                                "Megatron-Core or DeepSpeed, which do not run ZeRO-2 under "
                                "a pipeline)")
    framework.add_argument("--recompute", nargs="+", choices=RECOMPUTE,
                           help="the activation checkpointing it offers (default: "
                                f"{' '.join(RANKED_RECOMPUTE)}; e.g. none ops full for "
                                "torchtitan)")
    framework.add_argument("--schedules", nargs="+",
                           choices=[s for s in PIPELINE_SCHEDULES if s != "gpipe"],
                           help="the pipeline schedules it offers (default: "
                                f"{' '.join(RANKED_SCHEDULES)}; 1f1b always where a rank "
                                "has one stage; e.g. add zbv_zero_bubble for torchtitan "
                                "or this runtime)")
    _logit_bytes_flag(lay)
    _optimizer_state_flag(lay)
    lay.set_defaults(func=cmd_layouts)
    case = sub.add_parser("source-case", help="16x8 A100: tp across nodes vs pipeline "
                                              "across nodes")
    _shape_and_cluster_flags(case, source_case=True)
    case.add_argument("--overlap-tp-comm", action="store_true",
                      help="both sides hide backward tensor-parallel all-reduces")
    case.set_defaults(func=cmd_source_case)
    published = sub.add_parser("published", help="predicted against published step times "
                                                 "(trainers/partition/published.py)")
    published.add_argument("--json", help="write the rows as JSON here")
    published.add_argument("--png", help="draw every row's error against its published step")
    published.set_defaults(func=cmd_published)


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
                      choices=["1f1b", "gpipe", "interleaved_1f1b", *TORCH_CLASSES],
                      help="looped_bfs and the zero-bubble ones: torch's order and stage "
                           "placement (a V for zbv_zero_bubble and dualpipev: rank 0 holds "
                           "the first and the last stage)")
    part.add_argument("--virtual-stages", type=int, default=1)
    part.add_argument("--batch-size", type=int, help="samples per step (rescales the costs)")
    part.add_argument("--memory-cap-gib", type=float)
    part.add_argument("--optimize", default="speed", help="speed, memory, or a weight 0..1")
    part.add_argument("--optimizer-bytes-per-param", type=float, default=8.0)
    part.add_argument("--link-gb-per-s", type=float, default=25.0)
    part.add_argument("--activation-checkpointing", default="off",
                      help="off, full (every block) or N (every N-th block)")
    part.add_argument("--png", help="stage bars (compute, memory)")
    part.add_argument("--timeline-png", help="simulated schedule timeline")
    part.set_defaults(func=cmd_partition)

    _add_shape_commands(sub)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    run_cli(main, prog="plan.py")  # a user error: one line naming the flag, exit 2
