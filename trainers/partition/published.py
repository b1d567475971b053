"""Published large-scale training runs: shape, cluster, layout and the measured step.

Each run cites where its numbers come from. ``published_step_s`` is the paper's own
iteration time where it prints one; where it prints achieved TFLOP/s per GPU instead, the
step is that paper's FLOP count divided by (GPUs x TFLOP/s), with the paper's formula.
Fields a paper does not state are assumptions, listed in ``assumed``.

``CALIBRATION`` (Narayanan et al. 2021, Table 1) is what the two fitted constants in
``hardware.py`` were chosen on; every other run is a check the constants never saw.
``HELD_OUT`` (MosaicML's MPT benchmarks) was added after the model was built and predicted
once: how the model generalises. No constant is fitted on it, but the model changed after
seeing it, each time with a sourced constant (the README's held-out block gives every
prediction): H100's GEMM share from an independent GEMM measurement
(``hardware.GPU.mamf_share``); the logits' bytes of MPT's fused loss
(``MOSAICML_LOGIT_BYTES``), read from llm-foundry after two rows came out over memory; and,
after two rows still missed, FlashAttention costed as its kernel (``GPU.flash_share``) and
the NVLink cost of overlapped collectives (``hardware.OVERLAP_NVLINK_COST``). ``MPT_TABLES``
is every other row of the same three tables (``mpt_tables.py``), checked likewise.
``NVIDIA_DGXC`` (NVIDIA's DGX Cloud benchmark recipes: Megatron-Core on H100) is a second
held-out set, added after all of that and predicted once with the model unchanged.
``META_LLAMA3`` (Llama 3 405B on 8192 and 16384 H100) is a third, which the planner could
cost only after it gained trimmed first and last stages, ZeRO-2 reduce-scattering every
micro-batch and memory per pipeline rank (no constant changed). ``NVIDIA_DGXC_CP`` (NVIDIA's
Llama 3.1 recipes, context parallel) is a fourth, after the planner gained context
parallelism, ``TORCHTITAN_A100`` (PyTorch's torchtitan, FSDP2 on A100) a fifth and
``BIGSCIENCE_BLOOM`` (BLOOM 176B, Megatron-DeepSpeed on A100) a sixth and ``OPEN_RECIPES``
(Megatron-LM's GPT-3 175B example and EleutherAI's GPT-NeoX-20B, both on A100) a seventh.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainers.partition.gpt import GPTShape, TrainLayout, estimate_step, rank_layouts
from trainers.partition.hardware import GPUS, Cluster
from trainers.partition.mpt_tables import MPT_TABLE_ROWS

NARAYANAN = ("Narayanan et al. 2021, Efficient Large-Scale Language Model Training on GPU "
             "Clusters Using Megatron-LM (SC'21, arXiv:2104.04473)")
KORTHIKANTI = ("Korthikanti et al. 2022, Reducing Activation Recomputation in Large "
               "Transformer Models (MLSys'23, arXiv:2205.05198)")
MTNLG = ("Smith et al. 2022, Using DeepSpeed and Megatron to Train Megatron-Turing NLG 530B "
         "(arXiv:2201.11990)")
MOSAICML = ("MosaicML 2023, llm-foundry MPT training benchmarks (github.com/mosaicml/llm-foundry, "
            "scripts/train/benchmarking/README.md; shapes from scripts/train/yamls/pretrain/"
            "mpt-*.yaml)")
BLOOM = ("BigScience 2022, BLOOM 176B training (github.com/bigscience-workshop/bigscience, "
         "train/tr11-176B-ml/tr11-176B-ml.slurm @003b25057 and README.md @00327f8: the log "
         "line of iteration 85376)")

MEGATRON_README = ("NVIDIA, Megatron-LM (github.com/NVIDIA/Megatron-LM), README.md 'GPT-3 "
                   "Example' and examples/pretrain_gpt3_175B.sh")
NEOX = ("Black et al. 2022, GPT-NeoX-20B: An Open-Source Autoregressive Language Model "
        "(arXiv:2204.06745), sec. 3; layout from github.com/EleutherAI/gpt-neox "
        "configs/20B.yml")


@dataclass(frozen=True)
class PublishedRun:
    name: str
    source: str
    shape: GPTShape
    cluster: Cluster
    layout: TrainLayout
    published_step_s: float
    how: str  # where the step comes from
    assumed: str = ""


def megatron_flops(shape: GPTShape, batch: int) -> float:
    """Narayanan et al. 2021, eq. 3 (with activation recomputation):
    96 B s l h^2 (1 + s / 6h + V / 16 l h)."""
    b, s, l, h, v = batch, shape.seq_len, shape.num_layers, shape.hidden, shape.vocab
    return 96 * b * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))


def _gpt(layers: int, hidden: int, heads: int, vocab: int = 51200) -> GPTShape:
    """GPT-3-style: learned positions, GeLU MLP of 4h, dropout, fused (materialised)
    softmax as in Megatron-LM 2021/2022 (no flash attention)."""
    return GPTShape(num_layers=layers, hidden=hidden, num_heads=heads, seq_len=2048,
                    vocab=vocab, flash_attention=False)


def _selene(gpus: int) -> Cluster:
    # Selene: DGX A100 80 GB, 8 x 200 Gb/s HDR InfiniBand per node (both papers, sec. 5/6).
    return Cluster(gpu=GPUS["a100-80gb"], num_nodes=gpus // 8, gpus_per_node=8)


def _interleave(layers: int, pp: int) -> tuple[str, int]:
    if pp == 1:
        return "1f1b", 1
    per_stage = layers // pp
    return "interleaved_1f1b", 2 if per_stage % 2 == 0 else 3


# Narayanan et al. 2021, Table 1: (params B, heads, hidden, layers, tp, pp, GPUs, batch,
# achieved TFLOP/s per GPU). Sequence 2048, vocabulary 51200, interleaved schedule with
# scatter/gather (sec. 5.1), activation recomputation (eq. 3 counts it).
_TABLE1 = ((1.7, 24, 2304, 24, 1, 1, 32, 512, 137), (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
           (7.5, 32, 4096, 36, 4, 1, 128, 512, 142), (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
           (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138),
           (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
           (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148),
           (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
           (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163),
           (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163))
_TABLE1_ASSUMED = ("micro-batch 1 (Table 2's PTD rows use 1); interleave v = 2 (3 where the "
                   "layers per stage are odd); fp32 gradient all-reduce after backward")


def _narayanan_table1() -> list[PublishedRun]:
    runs = []
    for size, heads, hidden, layers, tp, pp, gpus, batch, tflops in _TABLE1:
        shape = _gpt(layers, hidden, heads)
        schedule, v = _interleave(layers, pp)
        layout = TrainLayout(tp=tp, pp=pp, global_batch=batch, microbatch=1,
                             schedule=schedule, virtual_stages=v, recompute="full")
        step = megatron_flops(shape, batch) / (gpus * tflops * 1e12)
        runs.append(PublishedRun(f"GPT {size}B, {gpus} A100", f"{NARAYANAN}, Table 1", shape,
                                 _selene(gpus), layout, step,
                                 f"eq. 3 FLOPs / ({gpus} x {tflops} TFLOP/s)", _TABLE1_ASSUMED))
    return runs


def _narayanan_table2() -> list[PublishedRun]:
    """Table 2, PTD rows: 174.6B (96 x 12288, 96 heads, t=8 p=12) and 529.6B (105 x 20480,
    128 heads, t=8 p=35), micro-batch 1, fixed global batch, more GPUs."""
    runs = []
    for (layers, hidden, heads, pp, batch), points in (
            ((96, 12288, 96, 12, 1536), ((384, 153), (768, 149), (1536, 141))),
            ((105, 20480, 128, 35, 2240), ((560, 171), (1120, 167), (2240, 159)))):
        shape = _gpt(layers, hidden, heads)
        schedule, v = _interleave(layers, pp)
        for gpus, tflops in points:
            layout = TrainLayout(tp=8, pp=pp, global_batch=batch, microbatch=1,
                                 schedule=schedule, virtual_stages=v, recompute="full")
            step = megatron_flops(shape, batch) / (gpus * tflops * 1e12)
            size = "174.6B" if layers == 96 else "529.6B"
            runs.append(PublishedRun(f"GPT {size} PTD, {gpus} A100", f"{NARAYANAN}, Table 2",
                                     shape, _selene(gpus), layout, step,
                                     f"eq. 3 FLOPs / ({gpus} x {tflops} TFLOP/s)",
                                     "interleave v as Table 1; fp32 gradient all-reduce"))
    return runs


_ZERO3_ASSUMED = ("full recomputation (eq. 3); DeepSpeed ZeRO-3 as it worked then: each "
                  "submodule's parameters gathered by its own hook (forward, recomputed "
                  "forward, backward) and its gradient reduce-scattered, every micro-batch, "
                  "in series with compute (the 384-GPU row's step is 1.5x its compute)")


def _narayanan_zero3() -> list[PublishedRun]:
    """Table 2, ZeRO-3 rows (DeepSpeed, no model parallelism): 174.6B at batch 1536 and
    529.6B at batch 2560 / 2240, micro-batch 4, 2, 1 as GPUs double (one micro-batch per
    step in every row). DeepSpeed's ZeRO-3: gathered per submodule, serial with compute."""
    runs = []
    for (layers, hidden, heads), points in (
            ((96, 12288, 96), ((384, 1536, 4, 144), (768, 1536, 2, 88), (1536, 1536, 1, 44))),
            ((105, 20480, 128), ((640, 2560, 4, 138), (1120, 2240, 2, 98),
                                 (2240, 2240, 1, 48)))):
        shape = _gpt(layers, hidden, heads)
        for gpus, batch, micro, tflops in points:
            layout = TrainLayout(global_batch=batch, microbatch=micro, recompute="full",
                                 zero=3, zero3_unit="module", overlap_zero3=False)
            step = megatron_flops(shape, batch) / (gpus * tflops * 1e12)
            size = "174.6B" if layers == 96 else "529.6B"
            runs.append(PublishedRun(f"GPT {size} ZeRO-3, {gpus} A100", f"{NARAYANAN}, Table 2",
                                     shape, _selene(gpus), layout, step,
                                     f"eq. 3 FLOPs / ({gpus} x {tflops} TFLOP/s)",
                                     _ZERO3_ASSUMED))
    return runs


def _korthikanti() -> list[PublishedRun]:
    """Tables 3 and 5: t = 8, no data parallelism, sequence 2048, vocabulary 51200; the
    interleaved schedule with 3 stages per rank for 175B and 530B (sec. 6). Full
    recomputation without sequence parallelism, and the paper's selective recomputation
    with sequence parallelism; plus 530B at dp = 8 (2240 GPUs, 39.15 s, sec. 6.3)."""
    rows = (("22B", 48, 6144, 64, 1, 8, 4, 4, 1.42, 1.10),
            ("175B", 96, 12288, 96, 8, 64, 64, 1, 18.13, 13.75),
            ("530B", 105, 20480, 128, 35, 280, 280, 1, 49.05, 37.83),
            ("1T", 128, 25600, 160, 64, 512, 512, 1, 94.42, 71.49))
    runs = []
    for name, layers, hidden, heads, pp, gpus, batch, micro, full_s, selective_s in rows:
        shape = _gpt(layers, hidden, heads)
        v = 3 if name in ("175B", "530B") else 1
        schedule = "interleaved_1f1b" if v > 1 else "1f1b"
        for recompute, sp, step in (("full", False, full_s), ("selective", True, selective_s)):
            layout = TrainLayout(tp=8, pp=pp, global_batch=batch, microbatch=micro,
                                 schedule=schedule, virtual_stages=v, recompute=recompute,
                                 sequence_parallel=sp)
            label = "full recompute" if recompute == "full" else "selective + SP"
            runs.append(PublishedRun(f"GPT {name} {label}, {gpus} A100",
                                     f"{KORTHIKANTI}, Tables 3 and 5", shape, _selene(gpus),
                                     layout, step, "iteration time, Table 5"))
    shape = _gpt(105, 20480, 128)
    layout = TrainLayout(tp=8, pp=35, global_batch=2240, microbatch=1,
                         schedule="interleaved_1f1b", virtual_stages=3, recompute="selective",
                         sequence_parallel=True)
    runs.append(PublishedRun("GPT 530B selective + SP, dp=8, 2240 A100",
                             f"{KORTHIKANTI}, sec. 6.3", shape, _selene(2240), layout, 39.15,
                             "iteration time, sec. 6.3 (no gradient all-reduce overlap)"))
    return runs


# MT-NLG's micro-batch size is not printed. Its TFLOP/s per GPU fall 126 -> 121 -> 113 as
# dp grows and the micro-batches per step shrink; under 1F1B (bubble (p - 1) / m, p = 35)
# micro-batch 1 (m = 240, 192, 160) would keep 0.970 and 0.941 of the first row's rate,
# micro-batch 2 (m = 120, 96, 80) keeps 0.948 and 0.901: measured 0.960 and 0.897.
MTNLG_MICROBATCH = 2


def _mt_nlg() -> list[PublishedRun]:
    """MT-NLG 530B (105 x 20480, 128 heads, sequence 2048), t = 8, p = 35, batch 1920 on 280,
    350 and 420 DGX A100 nodes: 60.1, 50.2, 44.4 s per iteration (sec. 2.4)."""
    shape = _gpt(105, 20480, 128, vocab=50272)
    runs = []
    for nodes, step in ((280, 60.1), (350, 50.2), (420, 44.4)):
        layout = TrainLayout(tp=8, pp=35, global_batch=1920, microbatch=MTNLG_MICROBATCH,
                             schedule="1f1b", recompute="full")
        runs.append(PublishedRun(f"MT-NLG 530B, {nodes * 8} A100", f"{MTNLG}, sec. 2.4", shape,
                                 _selene(nodes * 8), layout, step, "iteration time",
                                 f"micro-batch {MTNLG_MICROBATCH}, inferred from the rows' "
                                 f"TFLOP/s trend (published.py); DeepSpeed's 1F1B (not "
                                 f"interleaved); full recomputation"))
    return runs


# MosaicML's MPT benchmarks (llm-foundry): PyTorch FSDP FULL_SHARD (ZeRO-3, one unit per
# transformer block, prefetched), no tensor or pipeline parallelism, sequence 2048, flash
# attention, no dropout, vocabulary 50368, tied embeddings. Shapes (layers, hidden, heads)
# from the mpt-*.yaml configs; their parameter counts match the table's NumParams column.
_MPT = {"125m": (12, 768, 12), "350m": (24, 1024, 16), "760m": (24, 1536, 12),
        "1b": (24, 2048, 16), "3b": (32, 2560, 20), "7b": (32, 4096, 32),
        "13b": (40, 5120, 40), "30b": (48, 7168, 56), "70b": (80, 8192, 64)}
# Rows chosen by a rule fixed before predicting: for each model and GPU table, the
# sequence-2048 row with the most GPUs, where that is at least 4 nodes. (model, GPUs, GPU,
# micro-batch, gradient accumulation, global batch, activation checkpointing, tokens/s, MFU %)
_MPT_ROWS = (("70b", 64, "h100-80gb", 8, 4, 2048, True, 66523, 42.57),
             ("30b", 32, "h100-80gb", 14, 3, 1344, True, 73860, 43.92),
             ("13b", 64, "h100-80gb", 2, 1, 128, False, 307209, 39.86),
             ("70b", 64, "a100-80gb", 8, 4, 2048, True, 26274, 53.33),
             ("70b", 128, "a100-40gb", 4, 1, 512, True, 48194, 48.91),
             ("30b", 128, "a100-40gb", 6, 1, 768, True, 110803, 52.25),
             ("13b", 128, "a100-40gb", 16, 1, 2048, True, 252444, 51.93),
             ("7b", 128, "a100-40gb", 18, 1, 2304, True, 463749, 50.14),
             # the same rule over the tables' smaller models (760m-3b H100, 125m-3b A100
             # 40 GB; the A100 80 GB table has them on 8 GPUs only), added later and
             # predicted once, after hardware.GPU.mamf_share; two came out over memory,
             # which led to MOSAICML_LOGIT_BYTES (README, held-out block)
             ("3b", 64, "h100-80gb", 6, 3, 1152, False, 1441663, 40.8),
             ("1b", 64, "h100-80gb", 20, 1, 1280, False, 2841754, 40.85),
             ("760m", 32, "h100-80gb", 24, 1, 768, False, 2175091, 37.57),
             ("3b", 128, "a100-40gb", 6, 1, 768, False, 1220885, 54.8),
             ("1b", 128, "a100-40gb", 10, 1, 1280, False, 2386897, 54.41),
             ("760m", 128, "a100-40gb", 12, 1, 1536, False, 3704382, 50.73),
             ("350m", 128, "a100-40gb", 18, 1, 2304, False, 6647647, 45.61),
             ("125m", 128, "a100-40gb", 26, 1, 3328, False, 15863837, 38.86))
# The A100 tables say "1600 Gbps node-node interconnect (RoCE)"; the H100 table names none,
# so the DGX H100's 8 x 400 Gb/s is assumed (MOSAICML_H100_GBPS; 1600 is the alternative).
MOSAICML_A100_GBPS = 1600.0
# llm-foundry's MPT computes its loss with flash-attn's fused CrossEntropyLoss (its default
# ``loss_fn: fused_crossentropy``, llmfoundry/models/mpt/modeling_mpt.py), which keeps the
# bf16 logits and writes a bf16 gradient: 2 B a logit, not the fp32 4 B of Megatron's loss.
MOSAICML_LOGIT_BYTES = 2


def _mpt_run(name: str, gpu: str, seq: int, gpus: int, micro: int, accumulation: int,
             batch: int, tokens_s: float, checkpointing: bool, how: str,
             h100_inter_node_gbps: float | None = None) -> PublishedRun:
    layers, hidden, heads = _MPT[name]
    shape = GPTShape(num_layers=layers, hidden=hidden, num_heads=heads, seq_len=seq,
                     vocab=50368, dropout=False, flash_attention=True)
    gbps = h100_inter_node_gbps if gpu.startswith("h100") else MOSAICML_A100_GBPS
    cluster = Cluster(gpu=GPUS[gpu], num_nodes=max(1, gpus // 8),
                      gpus_per_node=min(8, gpus), inter_node_gbps=gbps)
    layout = TrainLayout(global_batch=batch, microbatch=micro, zero=3,
                         recompute="full" if checkpointing else "none",
                         overlap_grad_reduce=True, logit_bytes=MOSAICML_LOGIT_BYTES)
    assert batch == gpus * micro * accumulation
    network = ("one node" if gpus <= 8 else
               "network not stated (DGX H100 8 x 400 Gb/s assumed)" if gbps is None
               else f"{gbps:.0f} Gb/s per node")
    label = gpu.split("-")[0].upper() + " " + gpu.split("-")[1].upper()
    suffix = "" if seq == 2048 else f", sequence {seq}"
    return PublishedRun(f"MPT-{name} FSDP, {gpus} {label}{suffix}", MOSAICML, shape, cluster,
                        layout, batch * seq / tokens_s, how,
                        f"FSDP FULL_SHARD as the planner's ZeRO-3 per layer, prefetched; "
                        f"{network}")


def mosaicml_runs(h100_inter_node_gbps: float | None = None) -> list[PublishedRun]:
    """The held-out MPT rows (``HELD_OUT``); ``h100_inter_node_gbps`` replaces the assumed
    H100 network (None: the DGX H100 default)."""
    return [_mpt_run(name, gpu, 2048, gpus, micro, accumulation, batch, tokens_s,
                     checkpointing, f"{batch} x 2048 tokens / {tokens_s} tokens/s (MFU {mfu} %)",
                     h100_inter_node_gbps)
            for name, gpus, gpu, micro, accumulation, batch, checkpointing, tokens_s, mfu
            in _MPT_ROWS]


def mosaicml_table_runs() -> list[PublishedRun]:
    """Every other row of the same three MPT tables (``mpt_tables.MPT_TABLE_ROWS``: 1-16
    nodes, sequences 512-65536, with and without checkpointing), as further checks."""
    held_out = {(gpus, gpu, name) for name, gpus, gpu, *_ in _MPT_ROWS}
    return [_mpt_run(name, gpu, seq, gpus, micro, accumulation, batch, tokens_s,
                     checkpointing, f"{batch} x {seq} tokens / {tokens_s} tokens/s")
            for gpu, name, seq, gpus, micro, accumulation, batch, tokens_s, checkpointing
            in MPT_TABLE_ROWS
            if not (seq == 2048 and (gpus, gpu, name) in held_out)]


# NVIDIA's DGX Cloud Benchmarking recipes (github.com/NVIDIA/dgxc-benchmarking): NeMo with
# Megatron-Core and Transformer Engine on DGX H100 (8 x 400 Gb/s per node), BF16, each step
# time as the README prints it (the last of 50-100 steps for NeMo 24.x, the mean of steps
# 11-44 for 25.04). Transcribed from the file at the commit named, the model's shape from
# the NeMo-Framework-Launcher configs the READMEs point to (gpt3/175b.yaml,
# nemotron/nemotron_15b.yaml, nemotron/nemotron_340b.yaml). Added after every constant was
# set and predicted once, unchanged (README, "A second held-out set").
DGXC = "NVIDIA 2024-25, DGX Cloud Benchmarking recipes (github.com/NVIDIA/dgxc-benchmarking)"
_DGXC_ASSUMED = ("Megatron-Core as the recipe configures it: distributed optimizer (ZeRO-1) "
                 "with gradient reduce-scatter and parameter all-gather overlapped, sequence "
                 "parallelism, Transformer Engine's tensor-parallel overlap as the planner's "
                 "--overlap-tp-comm, its fused attention costed as FlashAttention")
# (model, NeMo, file@commit, TP, PP, VP, MBS, ((GPUs, GBS, step s), ...))
_DGXC_ROWS = (
    ("GPT3-175B", "24.x", "nemo_megatron/README_175b.md@0b71cfd", 4, 8, 12, 1,
     ((128, 256, 8.309), (256, 512, 8.408), (512, 1024, 8.42), (1024, 2048, 8.453),
      (2048, 4096, 8.49))),
    ("Nemotron-4 15B", "24.12", "nemotron/README_15b.md@0b71cfd", 4, 1, 1, 4,
     ((16, 64, 2.812), (32, 128, 2.824), (64, 256, 2.845), (128, 512, 2.859),
      (256, 1024, 2.852), (512, 2048, 2.875), (1024, 4096, 2.895), (2048, 8192, 2.887))),
    ("Nemotron-4 15B", "25.04", "nemotron/README.md@1f6d9f4", 2, 1, 1, 2, ((16, 64, 2.746),)),
    ("Nemotron-4 340B", "24.11", "nemotron/README_340b.md@143b90d", 8, 8, 12, 1,
     ((128, 32, 4.61), (256, 64, 4.67), (512, 128, 4.7), (1024, 256, 4.73),
      (2048, 512, 4.84))),
    ("Nemotron-4 340B", "25.04", "nemotron/README.md@1f6d9f4", 8, 8, 12, 1, ((256, 64, 4.606),)),
)
# The optimizer each recipe's own config names, where it is not Megatron-Core's fp32 one:
# NeMo 24.11's Nemotron-4 340B runs nemotron/nemotron4-340b-synth.yaml (configure.sh:
# --config-name=${MODEL}-${MODEL_SIZE}-synth), whose optim is distributed_fused_adam with
# dtype bf16 (Apex's DistributedFusedAdam, bf16 moments, no master copy). Read after the set
# was predicted, when the model put the 128-GPU row over memory (README, "A second held-out
# set"); the other recipes' configs name mcore_distributed_optim or, for NeMo 2.0 (25.04)
# and GPT3-175B, nothing read here, and keep fp32.
_DGXC_OPTIMIZER_STATE = {("Nemotron-4 340B", "24.11"): "bf16"}
# GPT-3 175B: GeLU MLP of 4h, tied embeddings, hidden dropout 0.1, vocabulary 51200 (the
# README's FLOP note). Nemotron-4: squared-ReLU MLP of 4h (not gated), 8 query groups, no
# dropout, untied embeddings, vocabulary 256000.
_DGXC_SHAPES = {
    "GPT3-175B": GPTShape(num_layers=96, hidden=12288, num_heads=96, seq_len=2048,
                          vocab=51200),
    "Nemotron-4 15B": GPTShape(num_layers=32, hidden=6144, num_heads=48, num_kv_heads=8,
                               seq_len=4096, vocab=256000, dropout=False,
                               tied_embeddings=False),
    "Nemotron-4 340B": GPTShape(num_layers=96, hidden=18432, num_heads=96, num_kv_heads=8,
                                seq_len=4096, vocab=256000, dropout=False,
                                tied_embeddings=False),
}


def dgxc_runs() -> list[PublishedRun]:
    """NVIDIA's DGX Cloud H100 BF16 rows (``NVIDIA_DGXC``), every GPU count printed."""
    runs = []
    for model, nemo, where, tp, pp, v, micro, points in _DGXC_ROWS:
        for gpus, batch, step in points:
            layout = TrainLayout(tp=tp, pp=pp, global_batch=batch, microbatch=micro,
                                 schedule="interleaved_1f1b" if v > 1 else "1f1b",
                                 virtual_stages=v, zero=1, sequence_parallel=True,
                                 overlap_grad_reduce=True, overlap_tp_comm=True,
                                 optimizer_state=_DGXC_OPTIMIZER_STATE.get((model, nemo),
                                                                           "fp32"))
            runs.append(PublishedRun(
                f"{model}, {gpus} H100 (NeMo {nemo})", f"{DGXC}, {where}",
                _DGXC_SHAPES[model], Cluster(gpu=GPUS["h100-80gb"], num_nodes=gpus // 8),
                layout, step, "training step time as printed", _DGXC_ASSUMED))
    return runs


# Meta's Llama 3 405B pre-training (Table 4 of the paper: the two rows without context
# parallelism; the third, CP 16 at 131072 tokens, is left out: its published rate's FLOP
# count, causal or full attention, moves its step 1.4x). Shape from the paper's Table 3
# (126 layers, 16384 wide, SwiGLU of 53248, 128 heads, 8 KV heads, vocabulary 128000 + 256
# reserved = 128256), no dropout, untied embeddings. Added after the DGX Cloud set, with the planner's uneven stages, per-rank
# memory and per micro-batch ZeRO-2 (README, "A third held-out set").
LLAMA3 = ("Llama Team, AI @ Meta 2024, The Llama 3 Herd of Models (arXiv:2407.21783), "
          "sec. 3.3 and Table 4")
_LLAMA3_SHAPE = GPTShape(num_layers=126, hidden=16384, num_heads=128, num_kv_heads=8,
                         ffn_hidden=53248, gated_mlp=True, seq_len=8192, vocab=128256,
                         dropout=False, tied_embeddings=False)
_LLAMA3_ASSUMED = ("micro-batch 1 (batch per dp rank 32 / 16 printed, micro-batch not); "
                   "8 model chunks a rank, one layer each (sec. 3.3.2: the first chunk of the "
                   "first stage holds only the embedding, the last of the last stage only the "
                   "output and loss); FSDP as ZeRO-2 (optimizer state and gradients sharded, "
                   "parameters not resharded after the forward) with its reduce-scatter "
                   "behind the backward; sequence parallelism; no recomputation; no "
                   "tensor-parallel overlap; fp32 Adam state and logits; attention at the "
                   "first FlashAttention's rate (the kernel is not named); the FLOP count "
                   "of GPTShape.model_flops_per_token (the paper's is not stated)")


def llama3_runs() -> list[PublishedRun]:
    """Llama 3 405B on 8192 and 16384 H100 (``LLAMA3``): 16M tokens a step, TP 8, PP 16
    with one layer fewer on the first and the last stage (7, 8 x 14, 7), 430 and 400 model
    TFLOP/s per GPU."""
    runs = []
    for gpus, tflops in ((8192, 430.0), (16384, 400.0)):
        dp = gpus // (8 * 16)
        batch = 16 * 2**20 // _LLAMA3_SHAPE.seq_len  # 16M tokens: 2048 sequences
        layout = TrainLayout(tp=8, pp=16, global_batch=batch, microbatch=1,
                             schedule="interleaved_1f1b", virtual_stages=8, zero=2,
                             sequence_parallel=True, overlap_grad_reduce=True,
                             first_stage_layers=7, last_stage_layers=7)
        flops = _LLAMA3_SHAPE.model_flops_per_token() * batch * _LLAMA3_SHAPE.seq_len
        runs.append(PublishedRun(
            f"Llama 3 405B, {gpus} H100 (dp {dp})", LLAMA3, _LLAMA3_SHAPE,
            Cluster(gpu=GPUS["h100-80gb"], num_nodes=gpus // 8), layout,
            flops / (gpus * tflops * 1e12),
            f"{flops:.3e} FLOPs / ({gpus} GPUs x {tflops:.0f} TFLOP/s)", _LLAMA3_ASSUMED))
    return runs


# NVIDIA's Llama 3.1 recipes of the same repository (NeMo 24.09, BF16), which use context
# parallelism (CP 2): llama3.1/README_8b.md, README_70b.md, README_405b.md at 143b90d. Added
# after the planner gained context parallelism, predicted once (README, "A fourth held-out
# set"). The 405B rows below 576 GPUs are NVIDIA's proxy configs (7, 21, 42 layers). The
# recipe's configure.sh (same commit) sets NVTE_FLASH_ATTN=0 NVTE_FUSED_ATTN=1: Transformer
# Engine runs cuDNN's fused attention, costed at its own rate ("cudnn"). The first
# prediction had no rate for it and used the first FlashAttention's (+6.3 to +23.7 %).
# (model, layers, TP, PP, VP, ((GPUs, GBS, step s), ...))
_DGXC_CP_ROWS = (
    ("Llama 3.1 8B", 32, 1, 1, 1,
     ((8, 128, 12.91), (16, 256, 13.00), (32, 512, 13.05), (64, 1024, 13.08),
      (128, 2048, 13.10))),
    ("Llama 3.1 70B", 80, 4, 4, 5,
     ((64, 128, 14.72), (128, 256, 14.73), (256, 512, 14.8), (512, 1024, 14.89),
      (1024, 2048, 14.92), (2048, 4096, 14.98))),
    ("Llama 3.1 405B", 7, 8, 1, 1, ((32, 126, 8.85),)),
    ("Llama 3.1 405B", 21, 8, 3, 7, ((96, 126, 8.75),)),
    ("Llama 3.1 405B", 42, 8, 3, 7, ((192, 252, 16.93),)),
    ("Llama 3.1 405B", 126, 8, 9, 7, ((576, 252, 17.20), (1152, 504, 17.52),
                                      (2304, 1008, 17.62))),
)
# Llama 3.1: SwiGLU, 8 KV heads, no dropout, untied embeddings, sequence 8192; 8B and 70B
# with the Llama 3 tokenizer (128256), 405B with GPT-2's BPE as its recipe's proxy (50257,
# padded by Megatron to a multiple of 128 x tp: 51200).
# (hidden, heads, MLP width, vocabulary)
_DGXC_CP_SHAPES = {
    "Llama 3.1 8B": (4096, 32, 14336, 128256),
    "Llama 3.1 70B": (8192, 64, 28672, 128256),
    "Llama 3.1 405B": (16384, 128, 53248, 51200),
}


_DGXC_CP_ASSUMED = _DGXC_ASSUMED.replace("its fused attention costed as FlashAttention",
                                         "cuDNN's fused attention at its rate")


def dgxc_cp_runs() -> list[PublishedRun]:
    """NVIDIA's DGX Cloud Llama 3.1 H100 BF16 rows, CP 2 (``_DGXC_CP_ROWS``), with the same
    framework assumptions as ``dgxc_runs``."""
    runs = []
    for model, layers, tp, pp, v, points in _DGXC_CP_ROWS:
        hidden, heads, ffn, vocab = _DGXC_CP_SHAPES[model]
        shape = GPTShape(num_layers=layers, hidden=hidden, num_heads=heads, num_kv_heads=8,
                         ffn_hidden=ffn, gated_mlp=True, seq_len=8192, vocab=vocab,
                         dropout=False, tied_embeddings=False, flash_kernel="cudnn")
        for gpus, batch, step in points:
            layout = TrainLayout(tp=tp, pp=pp, cp=2, global_batch=batch, microbatch=1,
                                 schedule="interleaved_1f1b" if v > 1 else "1f1b",
                                 virtual_stages=v, zero=1, sequence_parallel=tp > 1,
                                 overlap_grad_reduce=True, overlap_tp_comm=tp > 1)
            proxy = f", {layers} layers" if model.endswith("405B") and layers < 126 else ""
            runs.append(PublishedRun(
                f"{model}{proxy}, {gpus} H100 (CP 2)",
                f"{DGXC}, llama3.1/README_{model.split()[-1].lower()}.md@143b90d", shape,
                Cluster(gpu=GPUS["h100-80gb"], num_nodes=gpus // 8), layout, step,
                "training step time as printed", _DGXC_CP_ASSUMED))
    return runs


# PyTorch's torchtitan (FSDP2 on 64 A100 80GB, docs/performance.md at 0413364): the rows
# whose activation checkpointing the planner expresses: none, every block ("full") and,
# since ``TrainLayout.recompute_every``, every other block ("selective layer", torchtitan's
# ac_freq 2 as its configs set it; the README does not print the frequency), and since
# ``recompute="ops"`` its op policy ("selective op": attention's and every other matmul's
# outputs kept). Added after the fourth set, predicted once (README, "A fifth held-out
# set"); the selective-layer rows once the planner took recompute_every, the selective-op
# rows once it took "ops". WPS is tokens per second per GPU: the step is local batch x
# sequence / WPS. Attention is torch's SDPA, whose flash backend is FlashAttention-2.
TORCHTITAN = ("PyTorch 2024, torchtitan (github.com/pytorch/torchtitan), docs/performance.md "
              "@0413364: Llama 2 / Llama 3 with FSDP2 on 64 A100 (80GB)")
_TORCHTITAN_ASSUMED = ("FSDP2 as torchtitan configures it: every block its own unit, "
                       "resharded after the forward and prefetched (ZeRO-3), bf16 compute "
                       "with fp32 sharded parameters, gradient reduce-scatter behind the "
                       "backward; no torch.compile; the cluster's network as DGX A100's "
                       "(8 x 200 Gb/s a node; it is not named)")
# torchtitan's activation checkpointing: (TrainLayout.recompute, recompute_every, label)
_TORCHTITAN_AC = {"no": ("none", 1, "no recompute"), "full": ("full", 1, "full recompute"),
                  "selective layer": ("full", 2, "every 2nd block"),
                  "selective op": ("ops", 1, "selective op")}
# (name, layers, hidden, heads, KV heads, MLP width, vocabulary, sequence, local batch,
#  activation checkpointing, WPS)
_TORCHTITAN_ROWS = (
    ("Llama 3 8B", 32, 4096, 32, 8, 14336, 128256, 8192, 1, "selective layer", 2904),
    ("Llama 3 8B", 32, 4096, 32, 8, 14336, 128256, 8192, 1, "selective op", 2973),
    ("Llama 3 70B", 80, 8192, 64, 8, 28672, 128256, 8192, 1, "full", 331),
    ("Llama 2 13B", 40, 5120, 40, 40, 13824, 32000, 4096, 2, "no", 2162),
    ("Llama 2 13B", 40, 5120, 40, 40, 13824, 32000, 4096, 2, "selective layer", 1914),
    ("Llama 2 13B", 40, 5120, 40, 40, 13824, 32000, 4096, 2, "selective op", 1904),
    ("Llama 2 70B", 80, 8192, 64, 8, 28672, 32000, 4096, 1, "selective op", 355),
    ("Llama 2 70B", 80, 8192, 64, 8, 28672, 32000, 4096, 2, "full", 353),
)
# The page's footnote 1: Llama 2 70B at local batch 2 under selective op checkpointing ran
# out of memory, so its row is at local batch 1 (tests/test_planner.py checks the planner
# says so).


def torchtitan_runs() -> list[PublishedRun]:
    """torchtitan's FSDP2 rows on 64 A100 80GB (``TORCHTITAN``)."""
    runs = []
    for name, layers, hidden, heads, kv, ffn, vocab, seq, local, ac, wps in _TORCHTITAN_ROWS:
        shape = GPTShape(num_layers=layers, hidden=hidden, num_heads=heads, num_kv_heads=kv,
                         ffn_hidden=ffn, gated_mlp=True, seq_len=seq, vocab=vocab,
                         dropout=False, tied_embeddings=False, flash_kernel="flash2")
        recompute, every, label = _TORCHTITAN_AC[ac]
        layout = TrainLayout(global_batch=64 * local, microbatch=local, zero=3,
                             recompute=recompute, recompute_every=every,
                             overlap_grad_reduce=True)
        runs.append(PublishedRun(
            f"{name} FSDP2, {label}, 64 A100", TORCHTITAN, shape,
            Cluster(gpu=GPUS["a100-80gb"], num_nodes=8), layout, local * seq / wps,
            f"local batch {local} x {seq} tokens / {wps} WPS", _TORCHTITAN_ASSUMED))
    return runs


# BigScience's BLOOM 176B on Jean Zay: 48 nodes of 8 A100 80GB, 4 x 100 Gb/s Omni-Path a
# node (README "Hardware"); Megatron-DeepSpeed with TP 4, PP 12, DP 8, MBS 2, GBS 2048,
# every block recomputed (--checkpoint-activations), DeepSpeed's BF16_Optimizer (its own
# ZeRO-1), 70 layers of 14336 with 112 heads, sequence 2048, vocabulary padded to 250880,
# tied embeddings, Megatron's default dropout 0.1, GeLU MLP of 4h, fused softmax attention
# (2022: no FlashAttention); the embedding counted as a block when partitioning: 5 blocks
# on the first and last stage, 6 on the others (README "Architecture"). The step is the
# log line at the end of the first epoch: 104.70 s, 149.77 TFLOP/s. Added after the fifth
# set, predicted once (README, "A sixth held-out set").
_BLOOM_ASSUMED = ("HGX A100 NVLink (the README's '4 inter-gpu connects' not read as fewer "
                  "links); DeepSpeed's pipeline: 1F1B, gradients all-reduced after the last "
                  "micro-batch, no tensor-parallel overlap, no sequence parallelism; its "
                  "BF16_Optimizer's unsharded fp32 gradient buffer (4 B a parameter) not in "
                  "the memory figure")


def bloom_runs() -> list[PublishedRun]:
    """BLOOM 176B on 384 A100 80GB (``BLOOM``)."""
    shape = GPTShape(num_layers=70, hidden=14336, num_heads=112, seq_len=2048, vocab=250880,
                     flash_attention=False)
    layout = TrainLayout(tp=4, pp=12, global_batch=2048, microbatch=2, schedule="1f1b",
                         recompute="full", zero=1, first_stage_layers=5, last_stage_layers=5)
    return [PublishedRun("BLOOM 176B, 384 A100 80GB", BLOOM, shape,
                         Cluster(gpu=GPUS["a100-80gb"], num_nodes=48, inter_node_gbps=400.0),
                         layout, 104.70, "elapsed time per iteration, iteration 85376",
                         _BLOOM_ASSUMED)]


# Megatron-LM's README, "GPT-3 Example": examples/pretrain_gpt3_175B.sh trains GPT-3 175B
# (96 x 12288, 96 heads, sequence 2048) on 128 nodes with TP 8, PP 16 (DP 8), micro-batch
# 1, global batch 1536, fp16, --checkpoint-activations and no virtual pipeline stages
# (Megatron's plain 1F1B); "each iteration takes around 32 seconds resulting in 138
# teraFLOPs per GPU" (eq. 3 gives 31.9 s at 138). The GPUs are "A100"; the 80 GB DGX A100
# of Selene is assumed, as in Narayanan et al.
_MEGATRON_README_ASSUMED = ("Selene's DGX A100 80 GB nodes (8 x 200 Gb/s HDR); Megatron's "
                            "defaults of 2020-21: dropout 0.1, fused softmax, fp32 "
                            "gradient all-reduce after the backward, no ZeRO, no sequence "
                            "parallelism")
# EleutherAI's GPT-NeoX-20B (Black et al. 2022): 12 nodes of 8 A100-SXM4-40GB, four
# ConnectX-6 InfiniBand adapters a node (sec. 3). configs/20B.yml, "as it was trained on
# 96x 40GB A100": 44 x 6144, 64 heads, sequence 2048, TP 2, PP 4 (DP 12), micro-batch 4,
# 32 accumulated (global batch 1536; the paper's "1538 contexts" rounds 3.15M tokens), every
# layer recomputed, ZeRO-1, fp16, no dropout, untied embeddings, vocabulary padded to 50432
# (to a multiple of 128 x TP), GeLU MLP of 4h, fused softmax (PyTorch 1.10, 2022: no
# FlashAttention). The paper: 117 TFLOP/s per GPU, "achieved and maintained", without its
# FLOP count. The step is eq. 3's count at that rate, fixed before the row was predicted;
# gpt-neox's logger counts with eq. 3 only since September 2023 (PR #1044), and the count
# it logged in 2022 (an attention term with a constant 60, issue #981) is not checked here
# (README: "A seventh held-out set").
_NEOX_ASSUMED = ("HDR 200 Gb/s per adapter (800 Gb/s a node); NVSwitch inside the node "
                 "(HGX A100 board); DeepSpeed's pipeline: 1F1B, gradients reduced after "
                 "the last micro-batch, no tensor-parallel overlap; the GPT-J parallel "
                 "residual costed as the sequential layer (2 tensor-parallel all-reduces "
                 "a forward where the run does 1); rotary on a quarter of the head costed "
                 "as learned positions; the config's synchronize-each-layer not costed")


def open_recipe_runs() -> list[PublishedRun]:
    """Megatron-LM's GPT-3 175B example on 1024 A100 and GPT-NeoX-20B on 96 A100 40GB."""
    gpt3 = _gpt(96, 12288, 96)
    gpt3_layout = TrainLayout(tp=8, pp=16, global_batch=1536, microbatch=1, schedule="1f1b",
                              recompute="full")
    neox = GPTShape(num_layers=44, hidden=6144, num_heads=64, seq_len=2048, vocab=50432,
                    flash_attention=False, dropout=False, tied_embeddings=False)
    neox_layout = TrainLayout(tp=2, pp=4, global_batch=1536, microbatch=4, schedule="1f1b",
                              recompute="full", zero=1)
    neox_step = megatron_flops(neox, 1536) / (96 * 117e12)
    return [PublishedRun("GPT-3 175B, 1024 A100 (Megatron-LM README)", MEGATRON_README,
                         gpt3, _selene(1024), gpt3_layout, 32.0,
                         "'each iteration takes around 32 seconds'", _MEGATRON_README_ASSUMED),
            PublishedRun("GPT-NeoX-20B, 96 A100 40GB", NEOX, neox,
                         Cluster(gpu=GPUS["a100-40gb"], num_nodes=12, inter_node_gbps=800.0),
                         neox_layout, neox_step, "eq. 3 FLOPs / (96 x 117 TFLOP/s)",
                         _NEOX_ASSUMED)]


CALIBRATION = _narayanan_table1()
CHECKS = _narayanan_table2() + _korthikanti() + _mt_nlg() + _narayanan_zero3()
PUBLISHED_RUNS = CALIBRATION + CHECKS
# Published runs no constant was fitted on (see the module docstring for what changed after).
HELD_OUT = mosaicml_runs()
# The rest of the tables the held-out rows were picked from (175 runs).
MPT_TABLES = mosaicml_table_runs()
# A second held-out set, predicted once with the model as it stood (20 runs).
NVIDIA_DGXC = dgxc_runs()
# A third, after the planner learned uneven stages and ZeRO-2 (2 runs).
META_LLAMA3 = llama3_runs()
# A fourth, after it learned context parallelism (17 runs).
NVIDIA_DGXC_CP = dgxc_cp_runs()
# A fifth: FSDP2 as PyTorch's torchtitan trains (8 runs).
TORCHTITAN_A100 = torchtitan_runs()
# A sixth: BLOOM 176B, Megatron-DeepSpeed (1 run).
BIGSCIENCE_BLOOM = bloom_runs()
# A seventh: two open recipes with a published rate, Megatron-LM's and GPT-NeoX's (2 runs).
OPEN_RECIPES = open_recipe_runs()


def compare(run: PublishedRun, *, rank: bool = True) -> dict:
    """The run's predicted step beside the published one, and the planner's best layout for
    the same model, cluster and global batch."""
    predicted = estimate_step(run.shape, run.cluster, run.layout)
    row = {"run": run.name, "source": run.source, "published_s": run.published_step_s,
           "predicted_s": predicted.step_s, "error": predicted.step_s / run.published_step_s - 1,
           "fits": predicted.fits, "memory_gib": predicted.memory_gib, "layout":
           predicted.description, "best": None}
    if rank:  # the published micro-batch is among the candidates too
        micro = tuple(sorted({1, 2, 4, 8, run.layout.microbatch}))
        ranked = rank_layouts(run.shape, run.cluster, run.layout.global_batch,
                              microbatches=micro, logit_bytes=run.layout.logit_bytes,
                              optimizer_state=run.layout.optimizer_state,
                              overlap_grad_reduce=run.layout.overlap_grad_reduce,
                              overlap_tp_comm=run.layout.overlap_tp_comm)
        row["best"] = ranked[0] if ranked and ranked[0].fits else None
    return row


def format_comparison(rows: list[dict]) -> str:
    """One line a run; a published layout this model puts over memory has ``!`` after its
    GiB (and a footnote)."""
    lines = [(f"{'run':<44}{'published s':>12}{'predicted s':>12}{'error':>8}{'GiB':>7}  "
             f"{'planner best (s, layout)':<40}")]
    for r in rows:
        best = r["best"]
        top = f"{best.step_s:8.2f}  {best.description}" if best else "(not ranked)"
        gib = f"{r['memory_gib']:.1f}" + ("!" if not r["fits"] else " ")
        lines.append(f"{r['run']:<44}{r['published_s']:>12.2f}{r['predicted_s']:>12.2f}"
                     f"{r['error']:>+8.1%}{gib:>7}  {top}")
    if not all(r["fits"] for r in rows):
        lines.append("! over the GPU's usable memory in this model (the run did train)")
    return "\n".join(lines)
