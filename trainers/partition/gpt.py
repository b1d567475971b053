"""Step time and memory of a decoder-only transformer on a cluster, from its shape.

``estimate_step(shape, cluster, layout)`` predicts one training step under tensor (tp),
pipeline (pp) and data (dp) parallelism, laid out like the runtime's ("dp", "pp", "tp")
mesh (trainers/parallel/mesh.py: tp fastest, dp slowest). The pieces:

* Compute per layer: every GEMM of the layer with its per-GPU shape (tokens x hidden x
  hidden/tp ...), timed by an additive roofline (``hardware.gemm_seconds``); backward is
  two GEMMs per forward one; elementwise work moves the layer's activations through HBM.
  The attention core is FlashAttention's fused kernel (its causal FLOPs at the GPU's
  ``flash_share`` of the peak, backward 2.5 x forward) or, materialised, two batched GEMMs
  with the s x s scores through HBM. Recomputation adds a forward (full) or the attention
  core's forward (selective: under flash attention it frees nothing, as there are no
  scores, and costs the rerun all the same, as Megatron-Core runs it), or, torchtitan's op
  policy ("ops"), the elementwise kernels and every other matmul, attention's output kept.
* Tensor parallelism: 2 all-reduces of the layer's (b, s, h) activation forward and 2
  backward (reduce-scatter + all-gather of the same volume under sequence parallelism),
  on NVLink when tp fits in a node, else hierarchical over the network; the backward ones
  optionally behind the weight-gradient GEMMs (``overlap_tp_comm``).
* Pipeline: Megatron's closed form ``(m + (p - 1) / v) * t_rank`` where ``t_rank`` is the
  busiest rank's time per micro-batch (its layers, the embedding on the first stage, the
  logits on the last) plus its point-to-point sends (1/tp of the activation from each
  tensor rank, forward and backward, once per chunk), on the network when neighbouring
  stages sit in different nodes. GPipe has the same bubble and holds all m micro-batches.
  The schedules torch orders itself (``TORCH_CLASSES``: looped BFS and the runtime's
  split-backward zero-bubble ones, ``TORCH_ORDERED``) replace the closed form by torch's
  own order simulated at the busiest rank's forward, input- and weight-gradient times
  (``_order_factor``; looped BFS runs whole backwards).
* Data parallelism: gradient all-reduce (ZeRO 0), reduce-scatter + all-gather once a step
  (ZeRO 1), the gradient reduce-scattered every micro-batch (its shard is all it keeps)
  and the parameters all-gathered once a step (ZeRO 2), or, every micro-batch, each
  unit's parameters all-gathered for forward and backward and its gradient
  reduce-scattered (ZeRO 3: one ring collective per layer as FSDP2 wraps blocks, or per
  submodule as DeepSpeed hooks them, each paying its ring's latencies;
  prefetched behind the compute of the same phase, forward or backward, or in series with
  it; the runtime's FSDP2 under pipelining reduce-scatters once a step and holds whole
  weights and gradients meanwhile); the
  once-a-step reduction overlapped with the last micro-batch's backward or not. A
  collective overlapped with compute still costs it ``hardware.OVERLAP_NVLINK_COST`` of its
  NVLink transfer time (``overlapped_seconds``).
* Optimizer: Adam's update reads and writes 16 bytes per local parameter (memory bound).
* Memory per GPU: weights, gradients, fp32 master + Adam moments (ZeRO/FSDP sharded over
  dp), activations per Korthikanti et al. 2022 (eq. 1-6) for the micro-batches in flight,
  on the fullest pipeline rank (the logits on the last only).
* Stages: equal layer counts, or the first and last trimmed (``TrainLayout``'s
  first_stage_layers / last_stage_layers, as Llama 3 405B ran 126 layers on 16 stages).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from trainers.partition import hardware
from trainers.partition.hardware import (
    FLASH_BACKWARD_RATIO,
    RESERVED_GIB,
    Cluster,
    gemm_seconds,
    group_nodes,
    memory_seconds,
    ring_nvlink_seconds,
    ring_seconds,
)
from trainers.partition.schedule import (
    TORCH_CLASSES,
    TORCH_ORDERED,
    V_SHAPED,
    peak_held,
    simulate_order,
    torch_order,
)

GIB = 2**30
RECOMPUTE = ("none", "selective", "ops", "full")
# What the ranking offers (``candidate_layouts``). "ops" is costed when a layout names it,
# not ranked: it is torch's selective checkpointing as torchtitan configures it, which the
# Megatron / DeepSpeed layouts of the ranking do not run.
RANKED_RECOMPUTE = ("none", "selective", "full")
# The schedules the ranking offers unless asked for others (``candidate_layouts``): those of
# Megatron and DeepSpeed, whose runs the model is checked against. Looped BFS and the
# split-backward ones (``TORCH_CLASSES``) are costed when named, in torch's order.
RANKED_SCHEDULES = ("1f1b", "interleaved_1f1b")
# What this project's runtime checkpoints: whole blocks or none.
RUNTIME_RECOMPUTE = ("none", "full")


def runtime_trains(schedule: str, recompute: str) -> bool:
    """Whether this project's runtime trains ``recompute`` under ``schedule``: whole blocks
    or none (``RUNTIME_RECOMPUTE``), and none under the split-backward schedules
    (``TORCH_ORDERED``), which it does not checkpoint (``trainers.parallel.checkpointing``)."""
    return recompute in RUNTIME_RECOMPUTE and (recompute == "none"
                                               or schedule not in TORCH_ORDERED)

# "ops" keeps the fused attention kernel's output, so it needs one.
OPS_NEEDS_FLASH = ("--recompute ops keeps the fused attention kernel's output; valid with "
                   "--attention materialized: --recompute none, selective, full")
# The matmuls whose tensor-parallel split is of their input (row-parallel); the rest split
# their output (``GPTShape.ops_matmuls``).
ROW_PARALLEL_MATMULS = ("out", "down")
PIPELINE_SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b", *TORCH_CLASSES)
# Schedules with more than one chunk per rank (--virtual-stages); the V ones take exactly 2
MULTI_CHUNK_SCHEDULES = ("interleaved_1f1b", *TORCH_CLASSES)
# Bytes per parameter under bf16 mixed precision with Adam (Rajbhandari et al. 2020, ZeRO,
# section 3.1: 2 + 2 + K with K = 12: fp32 master, momentum, variance).
WEIGHT_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 2, 2, 12
# Adam's state per parameter by the precision it is kept in (``TrainLayout.optimizer_state``):
# "fp32" the fp32 master copy and both moments (K = 12 above; Megatron, DeepSpeed); "bf16"
# both moments in bf16 and no master copy, the bf16 weights updated in place: Apex's
# DistributedFusedAdam as NeMo builds it for ``optim.dtype: bf16`` (its state buckets hold
# exp_avg and exp_avg_sq in that dtype, and NeMo sets store_params=False when the optimizer's
# dtype is the model's), the optimizer of NVIDIA's Nemotron-4 340B benchmark recipe.
OPTIMIZER_STATE_BYTES = {"fp32": OPTIMIZER_BYTES, "bf16": 4}
# Megatron-LM accumulates and all-reduces gradients in fp32 (its main_grad buffers, option
# --accumulate-allreduce-grads-in-fp32) without ZeRO; ZeRO / FSDP reduce them in bf16.
GRAD_REDUCE_BYTES = {0: 4, 1: 2, 2: 2, 3: 2}
# fp32 parameters under autocast (Lightning's "bf16-mixed", this project's runtime): fp32
# weights and gradients, Adam's two fp32 moments.
FP32_WEIGHT_BYTES, FP32_GRAD_BYTES, FP32_OPTIMIZER_BYTES = 4, 4, 8
# The runtime's FSDP2 under bf16-mixed (trainers/parallel/parallelize.py, ``matmul_modules``):
# every attention and MLP layer is its own FSDP2 group with a bf16 ``MixedPrecisionPolicy``
# (param_dtype bf16, reduce_dtype fp32), so those weights are all-gathered in bf16 and held
# whole in bf16 during the step; their whole gradients are accumulated in fp32 (FSDP2's
# ``FSDPParam.to_accumulated_grad_if_needed`` upcasts to the reduce dtype while gradient sync
# is deferred). Norms and embeddings stay fp32 throughout.
BF16_MATMUL_WEIGHT_BYTES = 2


def state_bytes(layout: TrainLayout) -> tuple[int, int, int, int]:
    """(weight, gradient, optimizer, reduced-gradient) bytes per parameter."""
    if layout.fp32_params:
        return FP32_WEIGHT_BYTES, FP32_GRAD_BYTES, FP32_OPTIMIZER_BYTES, FP32_GRAD_BYTES
    return (WEIGHT_BYTES, GRAD_BYTES, OPTIMIZER_STATE_BYTES[layout.optimizer_state],
            GRAD_REDUCE_BYTES[layout.zero])


ZERO3_UNITS = ("layer", "module")


@dataclass(frozen=True, kw_only=True)
class GPTShape:
    """A decoder-only transformer.

    num_kv_heads: grouped-query attention (None: as many as num_heads).
    ffn_hidden: MLP width (None: 4 x hidden). gated_mlp: SwiGLU (three MLP matrices).
    flash_attention: attention scores never stored (no s x s tensors); else Megatron's
        fused softmax materialises them (the 5as/h term of Korthikanti et al.).
    flash_kernel: which FlashAttention sets the attention core's rate
        (``hardware.FLASH_KERNELS``, ``GPU.attention_share``): "flash" (the first
        generation, the default), "flash2", "flash3" or "cudnn" (cuDNN's fused attention).
    dropout: dropout masks kept for backward (GPT-3 style models).
    """

    num_layers: int
    hidden: int
    num_heads: int
    seq_len: int
    vocab: int
    num_kv_heads: int | None = None
    ffn_hidden: int | None = None
    gated_mlp: bool = False
    flash_attention: bool = True
    flash_kernel: str = "flash"
    dropout: bool = True
    tied_embeddings: bool = True

    def __post_init__(self) -> None:
        for flag, value in (("--layers", self.num_layers), ("--hidden", self.hidden),
                            ("--heads", self.num_heads), ("--seq-len", self.seq_len),
                            ("--vocab", self.vocab)):
            if value < 1:
                raise ValueError(f"{flag} {value}: must be >= 1")
        if self.hidden % self.num_heads:
            raise ValueError(f"--hidden {self.hidden} is not divisible by --heads "
                             f"{self.num_heads}; use a head count that divides it")
        if self.flash_kernel not in hardware.FLASH_KERNELS:
            raise ValueError(f"--attention {self.flash_kernel!r}: valid: "
                             f"{', '.join(hardware.FLASH_KERNELS)}, materialized")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"--kv-heads {self.kv_heads} must divide --heads {self.num_heads}")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def ffn(self) -> int:
        return self.ffn_hidden or 4 * self.hidden

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        h = self.hidden
        attention = 2 * h * h + 2 * h * self.kv_dim
        mlp = (3 if self.gated_mlp else 2) * h * self.ffn
        return attention + mlp + 4 * h  # two norms (weight + bias)

    @property
    def matmul_layer_params(self) -> int:
        """A layer's attention and MLP weights (everything but its two norms)."""
        return self.layer_params - 4 * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def num_params(self) -> int:
        head = 0 if self.tied_embeddings else self.embedding_params
        return self.num_layers * self.layer_params + self.embedding_params + head

    def model_flops_per_token(self) -> float:
        """Forward + backward FLOPs of one token without recomputation (3 x forward):
        every weight matmul, the attention scores and values over the full sequence
        (Megatron's convention), and the logits."""
        h, s = self.hidden, self.seq_len
        forward = 2 * (self.layer_params - 4 * h) + 4 * s * h
        return 3 * (self.num_layers * forward + 2 * h * self.vocab)

    def activation_bytes(self, micro: int, tp: int, sequence_parallel: bool,
                         recompute: str) -> float:
        """Bytes one layer keeps for backward for one micro-batch on one GPU.

        Korthikanti et al. 2022, eq. 1-6, generalised to GQA, any MLP width and gating:
        sbh x (norm inputs 4, QKV input 2, Q 2, K and V 4 kv/h, projection input 2,
        MLP input 2, MLP hidden 2f/h (x 2 gated) twice, dropout masks 2) + 5 a s^2 b for
        materialised scores; only the norms, dropout masks and the inputs of the
        column-parallel GEMMs are whole on every tensor rank unless sequence parallel.
        Recompute "full" keeps the layer's input only; "ops" that and
        ``_ops_saved_bytes``.
        """
        s, b, h = self.seq_len, micro, self.hidden
        sbh = s * b * h
        split_input = 2 * sbh / (tp if sequence_parallel else 1)  # the layer's input
        if recompute == "full":
            return split_input
        if recompute == "ops":
            return split_input + self._ops_saved_bytes(micro, tp, sequence_parallel)
        mlp_hidden = 2 * self.ffn / h * (3 if self.gated_mlp else 2)
        masks = 2 if self.dropout else 0
        replicated = 4 + 4 + masks  # two norm inputs, two GEMM inputs, masks
        sharded = 2 + 4 * self.kv_dim / h + 2 + mlp_hidden
        scores = 0.0
        if not self.flash_attention and recompute == "none":
            scores = (5 if self.dropout else 2) * self.num_heads * s * s * b / tp
        split = replicated / tp if sequence_parallel else replicated
        return sbh * (split + sharded / tp) + scores

    def ops_matmuls(self) -> tuple[tuple[str, float, float], ...]:
        """A block's weight matmuls in the order its forward calls them, as (name, output
        width, input width) per token before tensor parallelism: Q, K and V separate (as
        torchtitan's and Hugging Face's Llama), the output projection, the MLP's gate and
        up (gated) or up, and down."""
        h, kv, f = self.hidden, self.kv_dim, self.ffn
        mlp = (("gate", f, h), ("up", f, h)) if self.gated_mlp else (("up", f, h),)
        return (("q", h, h), ("k", kv, h), ("v", kv, h), ("out", h, h)) + mlp + (
            ("down", h, f),)

    def _ops_saved_bytes(self, micro: int, tp: int, sequence_parallel: bool) -> float:
        """What ``recompute="ops"`` keeps of a layer beyond its input (torchtitan's "op"
        selective checkpointing, ``torch.utils.checkpoint`` with a policy that saves the
        outputs of attention and of every other matmul, the 1st, 3rd, ...; the rest is
        rerun in the backward): those matmuls' outputs in bf16 (Q, V, gate and down under a
        gated MLP, down's whole before its reduction; Q, V and up without), the attention
        output with its fp32 log-sum-exp, and under sequence parallelism the two
        reduce-scatters' outputs."""
        s, b, h = self.seq_len, micro, self.hidden
        matmuls = sum(width / (1 if name in ROW_PARALLEL_MATMULS else tp)
                      for i, (name, width, _) in enumerate(self.ops_matmuls()) if i % 2 == 0)
        attention = (h + 2 * self.num_heads) / tp  # output; log-sum-exp, fp32 a head
        scatters = 2 * h / tp if sequence_parallel and tp > 1 else 0.0
        return 2 * s * b * (matmuls + attention + scatters)


@dataclass(frozen=True, kw_only=True)
class TrainLayout:
    """How the model is trained: parallel degrees, batch, schedule, memory savers.

    dp: None means the rest of the cluster (GPUs / (tp x cp x pp)).
    cp: context parallelism (Megatron-Core's ``--context-parallel-size``, Llama 3's CP):
        each sequence split over cp GPUs in 2 cp load-balanced chunks, K and V passed
        round a ring during attention; weights replicated over cp, gradients reduced and
        ZeRO shards spread over dp x cp. Needs flash attention. Placed between pp and tp:
        the mesh is ("dp", "pp", "cp", "tp"), Llama 3's [TP, CP, PP, DP] order.
    overlap_grad_reduce: data-parallel gradient reduction runs during the last
        micro-batch's backward (PyTorch DDP / FSDP2); else after it (Megatron 2021).
    overlap_tp_comm: the two backward tensor-parallel all-reduces of a layer run behind
        its weight-gradient GEMMs (Korthikanti et al. 2022, sec. 6.2); else exposed.
    recompute_every: with recompute "full", every this many-th block is recomputed and the
        others keep their activations (1: every block; 2: every other, torchtitan's
        selective layer checkpointing, ``ac_freq``), costed as that share of the layers.
    zero3_unit: what ZeRO-3 gathers and reduces at a time, each collective paying its
        ring's dp - 1 step latencies: "layer" (FSDP2's ``fully_shard`` per transformer
        block, as the runtime wraps units) or "module" (DeepSpeed ZeRO-3's pre-forward hook
        on every submodule holding partitioned parameters: QKV, projection, MLP up, (gate,)
        down per layer; ``zero3_units_per_layer``).
    overlap_zero3: ZeRO-3's per micro-batch all-gathers and reduce-scatters run on their
        own stream behind compute, phase by phase (FSDP / FSDP2 prefetch: the forward's
        gathers exposed only beyond the forward's compute, the backward's gathers and
        reduce-scatters only beyond the backward's); else in series with it.
    fp32_params: weights and gradients in fp32 under autocast, Adam 8 bytes (Lightning's
        bf16-mixed, the runtime); else bf16 weights and gradients with an fp32 master copy
        in the optimizer state (Megatron, DeepSpeed).
    bf16_matmul_params: with fp32_params and ZeRO-3 over dp > 1, the runtime's FSDP2 under
        bf16-mixed: the attention and MLP weights gathered and held whole in bf16 (their
        own groups' bf16 MixedPrecisionPolicy), their gradients reduced and accumulated in
        fp32; norms and embeddings fp32 (``BF16_MATMUL_WEIGHT_BYTES``).
    logit_bytes: bytes of a logit and of its gradient in the loss: 4 (default) where the
        cross entropy runs on fp32 logits (Megatron's vocab-parallel cross entropy upcasts
        them; torch autocast runs cross_entropy in fp32, as this runtime's bf16-mixed), 2
        where a fused loss keeps the bf16 logits and writes a bf16 gradient (flash-attn's
        ``CrossEntropyLoss``, llm-foundry's default for MPT).
    optimizer_state: the precision of Adam's state (``OPTIMIZER_STATE_BYTES``): "fp32"
        (default: fp32 master copy and moments) or "bf16" (bf16 moments, no master copy);
        with fp32_params the moments are fp32.
    first_stage_layers, last_stage_layers: transformer layers on the first and on the last
        pipeline rank, the rest spread equally over the others (Megatron-Core's
        ``--decoder-first-pipeline-num-layers`` / ``--decoder-last-pipeline-num-layers``):
        trimming the stages that also hold the embedding and the logits, as Llama 3 405B's
        126 layers ran on 16 stages (7, 8 x 14, 7). None: equal stages. Under the
        interleaved schedule the middle ranks' layers divide into the chunks; the first
        and last rank's chunks may be uneven (a chunk holding only the embedding or only
        the logits, as in Llama 3's schedule and Megatron-Core's
        ``--pipeline-model-parallel-layout``).
    deferred_grad_sync: ZeRO-3 as this project's runtime runs FSDP2 under
        ``torch.distributed.pipelining``: micro-batches back through without gradient sync
        or resharding and one reduce-scatter per unit ends the step, so parameters and
        gradients are whole on every rank during the step (chain.MemoryModel has the same
        rule); the parameters are still gathered for each forward and backward.
    """

    tp: int = 1
    pp: int = 1
    dp: int | None = None
    cp: int = 1
    global_batch: int
    microbatch: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    recompute: str = "none"
    recompute_every: int = 1
    zero: int = 0
    sequence_parallel: bool = False
    overlap_grad_reduce: bool = False
    overlap_tp_comm: bool = False
    zero3_unit: str = "layer"
    overlap_zero3: bool = True
    deferred_grad_sync: bool = False
    fp32_params: bool = False
    bf16_matmul_params: bool = False
    logit_bytes: int = 4
    optimizer_state: str = "fp32"
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None

    def __post_init__(self) -> None:
        for flag, value in (("--tp", self.tp), ("--pp", self.pp), ("--cp", self.cp),
                            ("--global-batch", self.global_batch),
                            ("--microbatch", self.microbatch),
                            ("--virtual-stages", self.virtual_stages)):
            if value < 1:
                raise ValueError(f"{flag} {value}: must be >= 1")
        if self.dp is not None and self.dp < 1:
            raise ValueError(f"--dp {self.dp}: must be >= 1")
        if self.schedule not in PIPELINE_SCHEDULES:
            raise ValueError(f"--schedule {self.schedule!r}: valid: "
                             f"{', '.join(PIPELINE_SCHEDULES)}")
        if (self.schedule in MULTI_CHUNK_SCHEDULES) != (self.virtual_stages > 1):
            raise ValueError(f"--virtual-stages {self.virtual_stages} with --schedule "
                             f"{self.schedule}: {', '.join(MULTI_CHUNK_SCHEDULES)} need >= 2, "
                             "the others 1")
        if self.schedule in TORCH_CLASSES and self.uneven_stages:
            raise ValueError(f"--first-stage-layers / --last-stage-layers with --schedule "
                             f"{self.schedule}: valid with equal stages only")
        if self.schedule in V_SHAPED and self.virtual_stages != 2:
            raise ValueError(f"--virtual-stages {self.virtual_stages} with --schedule "
                             f"{self.schedule}: valid: 2 (a V of two stages per rank)")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"--recompute {self.recompute!r}: valid: {', '.join(RECOMPUTE)}")
        if self.recompute_every < 1 or (self.recompute_every > 1 and self.recompute != "full"):
            raise ValueError(f"--recompute-every {self.recompute_every} with --recompute "
                             f"{self.recompute}: valid: >= 1, and > 1 only with --recompute "
                             "full")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"--zero {self.zero}: valid: 0, 1, 2, 3")
        if self.logit_bytes not in (2, 4):
            raise ValueError(f"logit_bytes={self.logit_bytes}: valid: 2 (bf16), 4 (fp32)")
        if self.optimizer_state not in OPTIMIZER_STATE_BYTES:
            raise ValueError(f"--optimizer-state {self.optimizer_state!r}: valid: "
                             f"{', '.join(OPTIMIZER_STATE_BYTES)}")
        if self.fp32_params and self.optimizer_state != "fp32":
            raise ValueError(f"--optimizer-state {self.optimizer_state}: fp32 parameters "
                             "(the runtime) keep fp32 moments; valid with them: fp32")
        if self.zero3_unit not in ZERO3_UNITS:
            raise ValueError(f"--zero3-unit {self.zero3_unit!r}: valid: {', '.join(ZERO3_UNITS)}")
        for flag, value in (("--first-stage-layers", self.first_stage_layers),
                            ("--last-stage-layers", self.last_stage_layers)):
            if value is not None and value < 0:
                raise ValueError(f"{flag} {value}: must be >= 0")
            if value is not None and self.pp < 2:
                raise ValueError(f"{flag} needs a pipeline: --pp {self.pp}, valid: >= 2")

    @property
    def recompute_share(self) -> float:
        """The share of the blocks full recomputation reruns (0 without it)."""
        return 1 / self.recompute_every if self.recompute == "full" else 0.0

    @property
    def head_rank(self) -> int:
        """The pipeline rank with the logits: the last, or under a V schedule the first (its
        last stage is the first rank's second)."""
        return 0 if self.schedule in V_SHAPED else self.pp - 1

    @property
    def uneven_stages(self) -> bool:
        return self.first_stage_layers is not None or self.last_stage_layers is not None

    def describe(self, dp: int) -> str:
        v = f" v={self.virtual_stages}" if self.virtual_stages > 1 else ""
        extras = [f"recompute={self.recompute}"] if self.recompute != "none" else []
        extras += ([f"recompute-every={self.recompute_every}"] if self.recompute_every > 1
                   else [])
        extras += [f"zero={self.zero}"] if self.zero else []
        if self.zero == 3:
            extras += ["zero3-per-module"] if self.zero3_unit == "module" else []
            extras += ["zero3-serial"] if not self.overlap_zero3 else []
            extras += ["deferred-sync"] if self.deferred_grad_sync else []
            extras += ["bf16-gather"] if self.fp32_params and self.bf16_matmul_params else []
        extras += ["sp"] if self.sequence_parallel else []
        extras += ["bf16-adam"] if self.optimizer_state == "bf16" else []
        extras += ["tp-overlap"] if self.overlap_tp_comm else []
        if self.first_stage_layers is not None:
            extras += [f"first-stage={self.first_stage_layers}"]
        if self.last_stage_layers is not None:
            extras += [f"last-stage={self.last_stage_layers}"]
        extras += (["grad-overlap"] if self.overlap_grad_reduce and dp * self.cp > 1
                   else [])
        cp = f" cp={self.cp}" if self.cp > 1 else ""
        return (f"dp={dp} pp={self.pp} tp={self.tp}{cp} mb={self.microbatch} "
                f"m={self.global_batch // (dp * self.microbatch)} {self.schedule}{v} "
                + " ".join(extras)).strip()


@dataclass(frozen=True)
class StepEstimate:
    """One layout's predicted step (seconds) and memory (bytes per GPU)."""

    description: str
    dp: int
    num_microbatches: int
    step_s: float
    tokens_per_s: float
    tflops_per_gpu: float  # model FLOPs (no recomputation) per second per GPU
    hardware_tflops_per_gpu: float  # FLOPs actually run, recomputation included
    fits: bool
    memory_bytes: dict = field(default_factory=dict)  # params, grads, optimizer, activations
    time_s: dict = field(default_factory=dict)  # breakdown of step_s
    layout: TrainLayout | None = None

    @property
    def memory_gib(self) -> float:
        return sum(self.memory_bytes.values()) / GIB


def _untrimmed(shape: GPTShape, layout: TrainLayout) -> tuple[int, int]:
    """(stages the trimming flags leave unset, layers left for them)."""
    first, last = layout.first_stage_layers, layout.last_stage_layers
    return (layout.pp - (first is not None) - (last is not None),
            shape.num_layers - (first or 0) - (last or 0))


def stage_layers(shape: GPTShape, layout: TrainLayout) -> tuple[int, ...]:
    """Transformer layers on each pipeline rank, first to last (``check_layout`` has
    checked that they add up)."""
    p = layout.pp
    if not layout.uneven_stages:
        return (shape.num_layers // p,) * p
    first, last = layout.first_stage_layers, layout.last_stage_layers
    middle, rest = _untrimmed(shape, layout)
    per = rest // middle if middle else 0
    return ((per if first is None else first,) + (per,) * (p - 2)
            + (per if last is None else last,))


def _check_stages(shape: GPTShape, layout: TrainLayout) -> None:
    """Equal stages: the layers divide into pp x v chunks. Uneven: the layers the first and
    last stage do not take divide equally over the other stages, and into their chunks."""
    pp, v = layout.pp, layout.virtual_stages
    if not layout.uneven_stages:
        chunks = pp * v
        if shape.num_layers % chunks:
            valid = [d for d in range(1, shape.num_layers + 1) if shape.num_layers % d == 0]
            raise ValueError(f"--layers {shape.num_layers} not divisible by the {chunks} "
                             f"pipeline chunks (--pp {pp} x --virtual-stages {v}); valid "
                             f"chunk counts: {valid}, or trim the first and last stage "
                             f"(--first-stage-layers, --last-stage-layers)")
        return
    first, last = layout.first_stage_layers, layout.last_stage_layers
    set_flags = " + ".join(f"{flag} {value}" for flag, value in
                           (("--first-stage-layers", first), ("--last-stage-layers", last))
                           if value is not None)
    middle, rest = _untrimmed(shape, layout)
    if rest < 0 or (middle == 0 and rest):
        raise ValueError(f"{set_flags}: {rest} of --layers {shape.num_layers} left for "
                         f"{middle} other stages; valid: a sum of {shape.num_layers}"
                         + (" or less" if middle else ""))
    if middle and (rest % middle or rest // middle % v):
        raise ValueError(f"{set_flags}: {rest} of --layers {shape.num_layers} left for the "
                         f"other {middle} stages x --virtual-stages {v} chunks, not "
                         f"divisible; valid: leave a multiple of {middle * v}")


def check_layout(shape: GPTShape, cluster: Cluster, layout: TrainLayout) -> int:
    """Raise ValueError (naming the flag and what is valid) for a layout that cannot run;
    return dp."""
    tp, pp = layout.tp, layout.pp
    if shape.num_heads % tp or shape.kv_heads % tp:
        valid = [d for d in range(1, shape.kv_heads + 1) if shape.kv_heads % d == 0
                 and shape.num_heads % d == 0]
        raise ValueError(f"--heads {shape.num_heads} (--kv-heads {shape.kv_heads}) not "
                         f"divisible by --tp {tp}; valid --tp: {valid}")
    _check_stages(shape, layout)
    cp = layout.cp
    if cp > 1 and not shape.flash_attention:
        raise ValueError(f"--cp {cp} needs flash attention (--attention flash, flash2 or "
                         "flash3); valid with --attention materialized: --cp 1")
    if layout.recompute == "ops" and not shape.flash_attention:
        raise ValueError(OPS_NEEDS_FLASH)
    if layout.recompute == "ops" and layout.zero == 3 and layout.zero3_unit == "module":
        raise ValueError("--recompute ops is torch's checkpointing under FSDP (a unit per "
                         "block); valid with it: --zero3-unit layer")
    if shape.seq_len % (2 * cp):
        valid = [c for c in range(1, shape.seq_len // 2 + 1) if shape.seq_len % (2 * c) == 0]
        raise ValueError(f"--cp {cp}: --seq-len {shape.seq_len} not divisible into 2 x {cp} "
                         f"load-balanced chunks; valid --cp: {valid[:12]}")
    model = tp * cp * pp
    cps = f" x --cp {cp}" if cp > 1 else ""
    if cluster.num_gpus % model:
        raise ValueError(f"--tp {tp}{cps} x --pp {pp} = {model} does not divide the "
                         f"{cluster.num_gpus} GPUs (--nodes x --gpus-per-node)")
    dp = layout.dp or cluster.num_gpus // model
    if dp * model != cluster.num_gpus:
        raise ValueError(f"--dp {dp} x --tp {tp}{cps} x --pp {pp} = {dp * model}, but the "
                         f"cluster has {cluster.num_gpus} GPUs; leave --dp unset for the rest")
    per_step = dp * layout.microbatch
    if layout.global_batch % per_step:
        raise ValueError(f"--global-batch {layout.global_batch} is not divisible by dp {dp} "
                         f"x --microbatch {layout.microbatch} = {per_step}; use a multiple "
                         f"of {per_step}")
    m = layout.global_batch // per_step
    if layout.schedule in TORCH_CLASSES:
        try:
            torch_order(layout.schedule, pp, m, layout.virtual_stages)
        except ValueError as err:
            raise ValueError(f"--schedule {layout.schedule} with --pp {pp}, --virtual-stages "
                             f"{layout.virtual_stages} and {m} micro-batches (global batch / "
                             f"(dp x microbatch)): {err}") from None
    elif layout.schedule != "gpipe" and pp > 1 and m < pp:
        raise ValueError(f"--schedule {layout.schedule} needs micro-batches (global batch / "
                         f"(dp x microbatch) = {m}) >= --pp {pp}")
    if layout.schedule == "interleaved_1f1b" and m % pp:
        raise ValueError(f"--schedule interleaved_1f1b needs micro-batches ({m}) divisible "
                         f"by --pp {pp}")
    if layout.sequence_parallel and shape.seq_len % (tp * cp):
        raise ValueError(f"sequence parallel needs --seq-len {shape.seq_len} divisible by "
                         f"--tp {tp}{cps}")
    return dp


def flash_attention_flops(shape: GPTShape, micro: int, tp: int) -> float:
    """Forward FLOPs FlashAttention runs for one layer and micro-batch on one GPU: Q K^T and
    P V, 2 s^2 d each per head, over the causal half of the blocks."""
    s = shape.seq_len
    return 0.5 * 2 * 2 * micro * shape.num_heads / tp * s * s * shape.head_dim


def _layer_forward_s(shape: GPTShape, cluster: Cluster, layout: TrainLayout) -> dict:
    """One layer, one micro-batch, one GPU: GEMM, attention core and elementwise forward
    seconds, one tensor-parallel all-reduce of the activation, and (cp > 1) the forward's
    pass of K and V round the context-parallel ring."""
    gpu, tp, b, cp = cluster.gpu, layout.tp, layout.microbatch, layout.cp
    s, h, a = shape.seq_len, shape.hidden, shape.num_heads
    tokens = b * s / cp  # this GPU's share of the micro-batch's tokens
    gemms = (gemm_seconds(tokens, (h + 2 * shape.kv_dim) / tp, h, gpu)  # QKV
             + gemm_seconds(tokens, h, h / tp, gpu)  # attention output projection
             + gemm_seconds(tokens, shape.ffn / tp, h, gpu,
                            count=2 if shape.gated_mlp else 1)  # MLP up (and gate)
             + gemm_seconds(tokens, h, shape.ffn / tp, gpu))  # MLP down
    heads = b * a / tp
    if shape.flash_attention:  # one fused kernel; the causal mask skips half the blocks
        # (under cp, 1/cp of the causal blocks: Megatron-Core's load-balanced split)
        core = flash_attention_flops(shape, b, tp) / cp / (
            gpu.peak_tflops * 1e12 * gpu.attention_share(shape.flash_kernel))
    else:  # Megatron's: two batched GEMMs, the s x s scores through HBM between them
        core = (gemm_seconds(s, s, shape.head_dim, gpu, count=heads)  # Q K^T
                + gemm_seconds(s, shape.head_dim, s, gpu, count=heads))  # P V
    # Elementwise kernels write what they produce and read it again once (2x the bytes a
    # layer keeps without recomputation).
    saved = shape.activation_bytes(b, tp, layout.sequence_parallel, "none") / cp
    elementwise = memory_seconds(2 * saved, gpu)
    nodes = group_nodes(cluster, tp, 1)
    allreduce = ring_seconds(2 * tokens * h, tp, nodes, cluster, factor=2)
    allreduce_nvlink = ring_nvlink_seconds(2 * tokens * h, tp, nodes, cluster, factor=2)
    # Context parallelism: each GPU's bf16 K and V block (its tokens x kv_dim / tp) goes
    # cp - 1 steps round the ring, as an all-gather of the blocks moves it
    kv_blocks = cp * 2 * 2 * tokens * shape.kv_dim / tp
    cp_nodes = group_nodes(cluster, cp, tp)
    kv = ring_seconds(kv_blocks, cp, cp_nodes, cluster, factor=1)
    kv_nvlink = ring_nvlink_seconds(kv_blocks, cp, cp_nodes, cluster, factor=1)
    return {"gemm": gemms, "attention": core, "elementwise": elementwise,
            "allreduce": allreduce, "allreduce_nvlink": allreduce_nvlink,
            "cp_kv": kv, "cp_kv_nvlink": kv_nvlink}


def _layer_seconds(shape: GPTShape, cluster: Cluster, layout: TrainLayout) -> tuple[float, float,
                                                                                   float]:
    """One layer, one micro-batch: (compute forward + backward + recompute, tensor-parallel
    communication, compute FLOPs run) on one GPU."""
    f = _layer_forward_s(shape, cluster, layout)
    forward = f["gemm"] + f["attention"] + f["elementwise"]
    compute = 3 * forward  # backward: dgrad + wgrad per GEMM, elementwise twice
    if shape.flash_attention:  # its backward recomputes the scores: 2.5 x its forward
        compute += (FLASH_BACKWARD_RATIO - 2) * f["attention"]
    backward_comm = 2 * f["allreduce"]
    if layout.overlap_tp_comm:  # behind the weight-gradient GEMMs (= forward GEMMs)
        backward_comm = overlapped_seconds(backward_comm, 2 * f["allreduce_nvlink"], f["gemm"])
    comm = 2 * f["allreduce"] + backward_comm
    # Context parallelism: the K / V ring runs behind the attention blocks it feeds (as
    # Megatron-Core / Transformer Engine overlap each step's send with the previous block's
    # attention); the backward passes K and V again and their gradients back
    forward_kv = overlapped_seconds(f["cp_kv"], f["cp_kv_nvlink"], f["attention"])
    comm += forward_kv + overlapped_seconds(2 * f["cp_kv"], 2 * f["cp_kv_nvlink"],
                                            FLASH_BACKWARD_RATIO * f["attention"])
    tokens = layout.microbatch * shape.seq_len / layout.cp
    layer_flops = (2 * (shape.layer_params - 4 * shape.hidden) * tokens
                   + 4 * tokens * shape.seq_len * shape.hidden) / layout.tp
    ran = 3 * layer_flops
    if layout.recompute == "full":  # every block, or the share recompute_every picks
        share = layout.recompute_share
        compute += share * forward
        comm += share * (2 * f["allreduce"] + forward_kv)
        ran += share * layer_flops
    elif layout.recompute == "selective":
        # the attention core's forward again (Korthikanti et al. sec. 4.2; with flash
        # attention it frees no scores, but Megatron-Core still reruns the fused core, its
        # K / V ring under cp included)
        compute += f["attention"]
        if shape.flash_attention:
            comm += forward_kv
        ran += 4 * tokens * shape.seq_len * shape.hidden / layout.tp
    elif layout.recompute == "ops":
        # every elementwise kernel and every other matmul (``_ops_saved_bytes``) forward
        # again; attention and, under sequence parallelism, the reduce-scatters are kept,
        # so the forward's two all-gathers rerun (sp: together one all-reduce's volume) or,
        # without sp, the all-reduce after the out projection (the one after down feeds
        # only the residual add, past the last tensor the backward needs, where torch's
        # checkpoint stops its rerun: early stop, on by default)
        gemms, flops = _ops_rerun_gemms(shape, cluster, layout, tokens)
        compute += f["elementwise"] + gemms
        comm += f["allreduce"]
        ran += flops
    return compute, comm, ran


def _ops_rerun_gemms(shape: GPTShape, cluster: Cluster, layout: TrainLayout,
                     tokens: float) -> tuple[float, float]:
    """(seconds, FLOPs) of the matmuls ``recompute="ops"`` reruns on one GPU: the 2nd, 4th,
    ... of ``GPTShape.ops_matmuls``, column-parallel but for the out and down projections."""
    seconds = flops = 0.0
    for i, (name, width, depth) in enumerate(shape.ops_matmuls()):
        if i % 2 == 1:
            n, k = (width, depth / layout.tp) if name in ROW_PARALLEL_MATMULS else (
                width / layout.tp, depth)
            seconds += gemm_seconds(tokens, n, k, cluster.gpu)
            flops += 2 * tokens * n * k
    return seconds, flops


def _head_parts(shape: GPTShape, cluster: Cluster, layout: TrainLayout) -> tuple[float, float]:
    """(the logits GEMM forward, the loss's reads and writes of the logits forward and
    backward) seconds (vocab-parallel GEMM, softmax cross-entropy on ``logit_bytes``
    logits)."""
    tokens = layout.microbatch * shape.seq_len / layout.cp
    vocab = shape.vocab / layout.tp
    gemm = gemm_seconds(tokens, vocab, shape.hidden, cluster.gpu)
    # the logits read and written, forward and backward
    loss = memory_seconds(4 * tokens * vocab * layout.logit_bytes, cluster.gpu)
    return gemm, loss


def _head_seconds(shape: GPTShape, cluster: Cluster, layout: TrainLayout) -> float:
    """The logits forward + backward (backward: two GEMMs per forward one)."""
    gemm, loss = _head_parts(shape, cluster, layout)
    return 3 * gemm + loss


def _forward_seconds(shape: GPTShape, cluster: Cluster, layout: TrainLayout, layers: int,
                     logits: bool) -> float:
    """A rank's forward compute per micro-batch: its ``layers`` layers' forward and, on the
    last rank (``logits``), the logits' (the GEMM and half the loss's traffic)."""
    f = _layer_forward_s(shape, cluster, layout)
    gemm, loss = _head_parts(shape, cluster, layout)
    head = gemm + loss / 2 if logits else 0.0
    return layers * (f["gemm"] + f["attention"] + f["elementwise"]) + head


def _busiest_rank(shape: GPTShape, layout: TrainLayout, layer_seconds: float,
                  head_seconds: float) -> int:
    """The pipeline rank with the most compute per micro-batch (its layers, and the logits
    on ``head_rank``: the last, or the first under a V schedule); ties go to the rank with
    the logits, then to the later one."""
    last = layout.head_rank
    times = [n * layer_seconds + (head_seconds if r == last else 0.0)
             for r, n in enumerate(stage_layers(shape, layout))]
    return max(range(layout.pp), key=lambda r: (times[r], r == last, r))


def _edge_params(shape: GPTShape, layout: TrainLayout, rank: int) -> int:
    """The embedding on the first rank, the output layer on the last (for tied weights a
    copy, as Megatron keeps); the first rank holds both, one copy if tied, when pp = 1 or
    under a V schedule (its last stage is there)."""
    if layout.pp == 1 or layout.head_rank == 0:  # one rank holds both (a V schedule)
        both = 1 if shape.tied_embeddings else 2
        return shape.embedding_params * both if rank == 0 else 0
    return shape.embedding_params if rank in (0, layout.pp - 1) else 0


def _params_rank(shape: GPTShape, layout: TrainLayout) -> int:
    """The pipeline rank holding the most parameters; ties go to the last rank."""
    totals = [n * shape.layer_params + _edge_params(shape, layout, r)
              for r, n in enumerate(stage_layers(shape, layout))]
    return max(range(layout.pp), key=lambda r: (totals[r], r))


def _rank_params(shape: GPTShape, layout: TrainLayout, rank: int) -> float:
    """Parameters on one pipeline rank (its layers, and the embedding on the first and the
    output layer on the last rank), per tensor rank."""
    layers = stage_layers(shape, layout)[rank]
    return (layers * shape.layer_params + _edge_params(shape, layout, rank)) / layout.tp


def _stage_params(shape: GPTShape, layout: TrainLayout) -> float:
    """Parameters on the pipeline rank holding the most, per tensor rank."""
    return _rank_params(shape, layout, _params_rank(shape, layout))


def _gathered_bytes(shape: GPTShape, layout: TrainLayout, rank: int | None = None) -> float:
    """Bytes of a pipeline rank's parameters (default: the rank holding the most) once
    gathered whole (ZeRO-3): every weight at the layout's weight bytes, or, for the
    runtime's bf16 FSDP2 groups, the attention and MLP weights in bf16 and the rest (norms,
    embeddings) in fp32."""
    rank = _params_rank(shape, layout) if rank is None else rank
    weight_bytes = state_bytes(layout)[0]
    params = _rank_params(shape, layout, rank)
    if not (layout.fp32_params and layout.bf16_matmul_params):
        return params * weight_bytes
    layers = stage_layers(shape, layout)[rank]
    matmul = layers * shape.matmul_layer_params / layout.tp
    return params * weight_bytes - matmul * (weight_bytes - BF16_MATMUL_WEIGHT_BYTES)


def _in_flight(layout: TrainLayout, m: int, rank: int = 0) -> float:
    """Micro-batches of a rank's layers' activations alive at its peak (the first rank's
    is the highest)."""
    p, v = layout.pp, layout.virtual_stages
    if layout.schedule == "gpipe":
        return m
    if layout.schedule in TORCH_CLASSES:  # the stage-micro-batches torch's order holds
        return peak_held(torch_order(layout.schedule, p, m, v)[rank]) / v
    if v > 1:
        # Korthikanti et al. 2022, section 4.2.3: the first rank p x (1 + (p - 1) / (p v));
        # rank r runs 2 (p - r - 1) + (v - 1) p warm-up chunks (Megatron's interleaved
        # schedule) and holds one more in the steady state, each 1 / v of its layers. With
        # m <= p every rank runs all m v forward chunks first and holds all m.
        return m if m <= p else p + (p - 1 - 2 * rank) / v
    return min(p - rank, m)


def memory_per_gpu(shape: GPTShape, layout: TrainLayout, dp: int, m: int) -> dict:
    """Bytes on the fullest GPU (params, grads, optimizer, activations): the pipeline rank
    whose parameters, activations in flight and (on the last rank) logits add up to the
    most. The candidates are the first rank (most micro-batches in flight), the second (the
    first of the middle ranks, which hold equal layers and fewer micro-batches the later
    they are: the fullest of them where the first stage is trimmed) and the last (the
    logits)."""
    ranks = sorted({0, min(1, layout.pp - 1), layout.pp - 1})
    if layout.schedule in TORCH_CLASSES:  # in-flight counts differ rank by rank
        ranks = range(layout.pp)
    return max((_rank_memory(shape, layout, dp, m, r) for r in ranks),
               key=lambda memory: sum(memory.values()))


def _rank_memory(shape: GPTShape, layout: TrainLayout, dp: int, m: int, rank: int) -> dict:
    params = _rank_params(shape, layout, rank)
    layers = stage_layers(shape, layout)[rank]
    dp *= layout.cp  # the weights are replicated over cp: ZeRO shards over dp x cp
    cp = layout.cp  # each GPU keeps its 1/cp of the sequence's activations and logits
    zero = layout.zero
    weight_bytes, grad_bytes, optimizer_bytes, reduced_bytes = state_bytes(layout)
    weights = params * weight_bytes / (dp if zero >= 3 else 1)
    grads = params * grad_bytes / (dp if zero >= 2 else 1)
    if zero == 3 and dp > 1 and layout.deferred_grad_sync:  # whole during the step
        weights += _gathered_bytes(shape, layout, rank)
        grads = params * grad_bytes
    elif zero == 3 and dp > 1:  # the unit computing and the one prefetched, gathered whole
        per_layer = zero3_units_per_layer(shape, layout)
        unit = max(shape.layer_params / per_layer, shape.embedding_params) / layout.tp
        weights += 2 * unit * weight_bytes
    if zero == 0:
        grads = params * reduced_bytes  # fp32 main gradients (Megatron) or fp32 grads
    optimizer = params * optimizer_bytes / (dp if zero >= 1 else 1)
    def kept(recompute: str) -> float:  # one layer's activations for backward
        return shape.activation_bytes(layout.microbatch, layout.tp,
                                      layout.sequence_parallel, recompute) / cp

    if layout.recompute == "full":  # the blocks not recomputed keep all they make
        share = layout.recompute_share
        per_layer = share * kept("full") + (1 - share) * kept("none")
    else:
        per_layer = kept(layout.recompute)
    act = layers * per_layer * _in_flight(layout, m, rank)
    if layout.recompute in ("full", "ops") and layers:
        # one layer's activations rebuilt at a time, counted whole on top of what that layer
        # keeps (its input; under ops also Q, V, gate, down, attention): a slight overcount
        act += kept("none")
    logits = 0.0
    if rank == layout.head_rank:  # the logits and their gradient
        logits = (2 * layout.logit_bytes * layout.microbatch * shape.seq_len * shape.vocab
                  / layout.tp / cp)
    return {"params": weights, "grads": grads, "optimizer": optimizer,
            "activations": act + logits}


def _p2p_seconds(shape: GPTShape, cluster: Cluster, layout: TrainLayout) -> float:
    """One rank's point-to-point time per micro-batch: send and receive, forward and
    backward, once per chunk; 1/tp of the activation per tensor rank (scatter-gather).
    A pipeline is tp x pp consecutive ranks: once it is more than a node, some boundary
    crosses the network, and that one sets the pace."""
    if layout.pp == 1:
        return 0.0
    num_bytes = 2 * layout.microbatch * shape.seq_len * shape.hidden / layout.tp / layout.cp
    across = (layout.tp * layout.cp * layout.pp > cluster.gpus_per_node
              and cluster.num_nodes > 1)
    bandwidth = cluster.network_bytes_per_s_per_gpu if across else cluster.nvlink_bytes_per_s
    return 2 * layout.virtual_stages * num_bytes / bandwidth


# DeepSpeed ZeRO-3 keeps parameters with fewer elements than this whole on every rank
# (``stage3_param_persistence_threshold``, default 1e5, DeepSpeed ZeRO config docs): a GPT
# layer's norms (h elements) are never gathered unless h >= 1e5.
DEEPSPEED_PERSISTENCE_THRESHOLD = 100_000
# DeepSpeed's ZeRO-3 of 2021 moves each gathered or reduced parameter through HBM more than
# the collective itself does. Its all-gather (``partition_parameters._allgather_param``)
# zero-fills a whole-parameter buffer (``torch.zeros``: 1 pass, a write) and hands
# ``torch.distributed.all_gather`` a list of dp views into it; PyTorch's NCCL process group
# (1.8-1.10, ``ProcessGroupNCCL::allgather``) gathers a list into a new flat buffer and then
# copies each rank's chunk out into the list (read + write: 2 passes). Its gradient
# reduce-scatter (``_reduce_scatter_gradient``) passes a list of dp views of the gradient,
# which ``ProcessGroupNCCL::reduce_scatter`` first copies into one flat input (2 passes).
# HBM passes of the whole unit per collective, at the elementwise bandwidth share; they run
# on the collective's stream, so in series with it. FSDP / FSDP2 (``zero3_unit="layer"``)
# gather into one flat buffer (``all_gather_into_tensor``) and pay none of these.
DEEPSPEED_GATHER_HBM_PASSES = 3
DEEPSPEED_REDUCE_SCATTER_HBM_PASSES = 2


def zero3_units_per_layer(shape: GPTShape, layout: TrainLayout) -> int:
    """One (FSDP2 per block) or the submodules with partitioned parameters (DeepSpeed: QKV,
    projection, MLP up, (gate,) down; the norms too when h >= the persistence threshold)."""
    if layout.zero3_unit == "layer":
        return 1
    norms = 2 if shape.hidden >= DEEPSPEED_PERSISTENCE_THRESHOLD else 0
    return 4 + (1 if shape.gated_mlp else 0) + norms


def zero3_units(shape: GPTShape, layout: TrainLayout) -> int:
    """Gathered units on the rank holding the most parameters: its layers' units plus the
    embedding."""
    layers = stage_layers(shape, layout)[_params_rank(shape, layout)]
    return layers * zero3_units_per_layer(shape, layout) + 1


def zero3_gathers(layout: TrainLayout) -> float:
    """All-gathers of every unit per micro-batch: forward and backward; DeepSpeed's module
    hooks fire again for the forward that full recomputation reruns, on the blocks it
    reruns (FSDP2 unshards a block once for its backward, recomputation included)."""
    return 2 + (layout.recompute_share if layout.zero3_unit == "module" else 0.0)


class DataParallelComm(NamedTuple):
    """Data-parallel communication seconds, each with its NVLink part (``*_nvlink``): the
    gradient reduction per step, and ZeRO-3's per micro-batch collectives in the forward
    and in the backward."""

    grad_reduce: float = 0.0
    forward: float = 0.0
    backward: float = 0.0
    grad_reduce_nvlink: float = 0.0
    forward_nvlink: float = 0.0
    backward_nvlink: float = 0.0


def _dp_seconds(shape: GPTShape, cluster: Cluster, layout: TrainLayout, dp: int,
                m: int) -> DataParallelComm:
    """The data-parallel collectives of a step (``DataParallelComm``).

    ZeRO-3 gathers every unit's parameters for its forward and again for its backward, and
    reduce-scatters its gradient, every micro-batch (Rajbhandari et al. 2020, sec. 7.2.2:
    3x the parameters per GPU; ``zero3_gathers`` for recomputation); one ring collective
    per unit and kind, so the dp - 1 step latencies are paid per unit. The forward part is
    one gather per unit; the rest (the backward's gathers, DeepSpeed's recomputation
    gather, the reduce-scatters unless deferred) runs in the backward. ZeRO-2 keeps only its
    shard of the gradient, so each micro-batch's backward reduce-scatters the whole
    gradient (DeepSpeed ZeRO-2, FSDP's SHARD_GRAD_OP), and the updated parameters are
    all-gathered once a step.
    """
    # gradients are reduced over dp x cp (the weights are replicated over cp): the cp ranks
    # tp apart, the dp ranks tp x cp x pp apart
    nodes = min(cluster.num_nodes,
                group_nodes(cluster, layout.cp, layout.tp)
                * group_nodes(cluster, dp, layout.tp * layout.cp * layout.pp))
    dp *= layout.cp
    if dp == 1:
        return DataParallelComm()
    params = _stage_params(shape, layout)
    weight_bytes, _, _, reduced_bytes = state_bytes(layout)
    grad_bytes = params * reduced_bytes

    def ring(num_bytes: float, factor: float) -> tuple[float, float]:
        return (ring_seconds(num_bytes, dp, nodes, cluster, factor=factor),
                ring_nvlink_seconds(num_bytes, dp, nodes, cluster, factor=factor))

    if layout.zero == 0:
        total, nvlink = ring(grad_bytes, 2)
        return DataParallelComm(grad_reduce=total, grad_reduce_nvlink=nvlink)
    (rs, rs_nv), (ag, ag_nv) = ring(grad_bytes, 1), ring(params * weight_bytes, 1)
    if layout.zero == 1:  # reduce-scatter, and the updated parameters gathered, once a step
        return DataParallelComm(grad_reduce=rs + ag, grad_reduce_nvlink=rs_nv + ag_nv)
    if layout.zero == 2:  # a reduce-scatter every backward, the gather once a step
        return DataParallelComm(grad_reduce=ag, backward=rs, grad_reduce_nvlink=ag_nv,
                                backward_nvlink=rs_nv)
    units = zero3_units(shape, layout)
    gather, gather_nv = ring(_gathered_bytes(shape, layout) / units, 1)
    reduce_scatter, reduce_scatter_nv = ring(grad_bytes / units, 1)
    if layout.zero3_unit == "module":  # DeepSpeed's list collectives copy through HBM
        gather += memory_seconds(DEEPSPEED_GATHER_HBM_PASSES * params * weight_bytes / units,
                                 cluster.gpu)
        reduce_scatter += memory_seconds(DEEPSPEED_REDUCE_SCATTER_HBM_PASSES * grad_bytes
                                         / units, cluster.gpu)
    later = units * (zero3_gathers(layout) - 1)  # the backward's gathers
    if layout.deferred_grad_sync:  # one reduce-scatter per unit, after the last backward
        return DataParallelComm(units * reduce_scatter, units * gather, later * gather,
                                units * reduce_scatter_nv, units * gather_nv,
                                later * gather_nv)
    return DataParallelComm(0.0, units * gather, later * gather + units * reduce_scatter,
                            0.0, units * gather_nv,
                            later * gather_nv + units * reduce_scatter_nv)


def overlapped_seconds(comm: float, nvlink: float, compute: float) -> float:
    """What a collective of ``comm`` seconds (``nvlink`` of them NVLink transfer) run behind
    ``compute`` seconds of kernels adds to them: the part that outlasts the compute, plus
    ``hardware.OVERLAP_NVLINK_COST`` of the hidden part's NVLink share (NCCL's kernels copy
    over NVLink on the GPU's own SMs, taken from the compute they overlap)."""
    if comm <= 0.0:
        return 0.0
    hidden = min(comm, compute)
    return comm - hidden + hardware.OVERLAP_NVLINK_COST * hidden * nvlink / comm


def estimate_step(shape: GPTShape, cluster: Cluster, layout: TrainLayout) -> StepEstimate:
    """Predict one training step (see the module docstring for the model)."""
    dp = check_layout(shape, cluster, layout)
    m = layout.global_batch // (dp * layout.microbatch)
    p, v = layout.pp, layout.virtual_stages
    layer_compute, layer_comm, layer_flops = _layer_seconds(shape, cluster, layout)
    head = _head_seconds(shape, cluster, layout)
    # Busiest rank per micro-batch: the last one (its layers and the logits) unless a
    # trimmed last stage makes it another
    busiest = _busiest_rank(shape, layout, layer_compute, head)
    layers = stage_layers(shape, layout)[busiest]
    logits = busiest == layout.head_rank
    rank_compute = layers * layer_compute + (head if logits else 0.0)
    rank_comm = layers * layer_comm
    dpc = _dp_seconds(shape, cluster, layout, dp, m)
    grad_reduce = dpc.grad_reduce
    # ZeRO-2's per micro-batch reduce-scatter runs behind the backward as the framework's
    # gradient reduction does (overlap_grad_reduce); ZeRO-3's by its prefetch
    if layout.overlap_zero3 if layout.zero == 3 else layout.overlap_grad_reduce:
        # FSDP / FSDP2 prefetch hides ZeRO-3's collectives behind compute up to its length,
        # phase by phase: a forward all-gather is issued during the forward and overlaps
        # forward compute only (PyTorch FSDP notes, "FSDP Prefetch Nuances"); the backward's
        # gathers and reduce-scatters overlap backward compute (recomputation included).
        forward_compute = _forward_seconds(shape, cluster, layout, layers, logits)
        exposed_gathers = (
            overlapped_seconds(dpc.forward, dpc.forward_nvlink, forward_compute)
            + overlapped_seconds(dpc.backward, dpc.backward_nvlink,
                                 rank_compute - forward_compute))
    else:
        exposed_gathers = dpc.forward + dpc.backward
    per_micro = rank_compute + rank_comm + _p2p_seconds(shape, cluster, layout) + exposed_gathers
    if layout.schedule in TORCH_CLASSES:
        pipeline = m * per_micro * _order_factor(shape, cluster, layout, m, layers, logits,
                                                 rank_compute)
    else:
        pipeline = (m + (p - 1) / v) * per_micro
    if layout.overlap_grad_reduce:
        grad_reduce = overlapped_seconds(grad_reduce, dpc.grad_reduce_nvlink,
                                         layers * layer_compute * 2 / 3)
    params = _stage_params(shape, layout) / (dp * layout.cp if layout.zero >= 1 else 1)
    # Adam reads and writes each parameter's weight, gradient and state once
    state = sum(state_bytes(layout)[:3])  # 16 B a parameter, 8 with bf16 state
    optimizer = memory_seconds(params * state * 2, cluster.gpu)
    step = pipeline + grad_reduce + optimizer
    tokens = layout.global_batch * shape.seq_len
    model_flops = shape.model_flops_per_token() * tokens
    ran = (layer_flops * shape.num_layers * layout.tp * layout.cp + 6 * shape.hidden
           * shape.vocab * layout.microbatch * shape.seq_len) * m * dp
    memory = memory_per_gpu(shape, layout, dp, m)
    usable = (cluster.gpu.memory_gib - RESERVED_GIB) * GIB
    time = {"compute": m * rank_compute, "tp_comm": m * rank_comm,
            "pp_p2p": m * _p2p_seconds(shape, cluster, layout),
            "bubble": pipeline - m * per_micro, "fsdp_gather_exposed": m * exposed_gathers,
            "dp_grad_reduce": grad_reduce, "optimizer": optimizer}
    return StepEstimate(layout.describe(dp), dp, m, step, tokens / step,
                        model_flops / step / cluster.num_gpus / 1e12,
                        ran / step / cluster.num_gpus / 1e12,
                        sum(memory.values()) <= usable, memory, time, layout)


def _order_factor(shape: GPTShape, cluster: Cluster, layout: TrainLayout, m: int, layers: int,
                  logits: bool, rank_compute: float) -> float:
    """A torch-ordered schedule's step over its busiest rank's work (``TORCH_CLASSES``):
    torch's order simulated with every stage at that rank's forward, input-gradient and
    weight-gradient shares, or their sum, a whole backward, where the order does not split
    it (looped BFS). The weight gradients are the GEMMs' second backward product, as long as
    their forward (the logits' too on the rank holding them); the input gradients the rest
    of the backward: the other GEMM product, attention's and the elementwise kernels'
    backward, and any recomputation."""
    p, v = layout.pp, layout.virtual_stages
    forward = _forward_seconds(shape, cluster, layout, layers, logits)
    weight = layers * _layer_forward_s(shape, cluster, layout)["gemm"]
    if logits:
        weight += _head_parts(shape, cluster, layout)[0]
    grad_input = rank_compute - forward - weight
    stages = p * v
    sim = simulate_order(torch_order(layout.schedule, p, m, v), [forward / v] * stages,
                         [grad_input / v] * stages, [weight / v] * stages)
    return sim.step_ms / (m * rank_compute)


def candidate_layouts(shape: GPTShape, cluster: Cluster, global_batch: int, *,
                      recompute=RANKED_RECOMPUTE, zero=(0, 1, 2, 3),
                      microbatches=(1, 2, 4, 8), schedules=RANKED_SCHEDULES,
                      runtime: bool = False, logit_bytes: int = 4,
                      optimizer_state: str = "fp32",
                      overlap_grad_reduce: bool | None = None,
                      overlap_tp_comm: bool | None = None):
    """Every layout worth ranking: tp within a node dividing the heads, pp dividing the
    layers (or, where it cannot, with the first and last stage trimmed:
    ``trimmed_stages``), each schedule, micro-batch size, recomputation and ZeRO stage.

    overlap_grad_reduce, overlap_tp_comm: what the framework overlaps (``TrainLayout``'s
    fields of the same names), features of the software the layout will run on: True or
    False for every candidate, or None (the default) to rank each layout both ways, so a
    pick that needs the overlap says so in its description. The runtime's are its own
    (neither).

    runtime: only what this project's runtime trains (equal stages): fp32 parameters under
    autocast, FSDP2 with deferred sync over dp (zero 3) or no sharding at dp = 1, activation
    checkpointing of every block or none (``recompute`` full / none), and under bf16-mixed
    the attention and MLP weights gathered in bf16 (``bf16_matmul_params``).
    recompute: the activation checkpointing the framework offers (``RANKED_RECOMPUTE``
        unless asked: "ops" is ranked only when named).
    schedules: the pipeline schedules it offers (``RANKED_SCHEDULES`` unless asked; any of
        ``PIPELINE_SCHEDULES`` but gpipe; one stage per rank falls back to 1f1b).
    logit_bytes: the loss's logit bytes for every candidate (``TrainLayout.logit_bytes``).
    optimizer_state: the framework's Adam state precision for every candidate
        (``TrainLayout.optimizer_state``).
    """
    if runtime:
        recompute = tuple(r for r in recompute if r in RUNTIME_RECOMPUTE)
    elif shape.flash_attention:  # selective frees nothing there, and is slower
        recompute = tuple(r for r in recompute if r != "selective")
    else:  # ops keeps the fused attention kernel's output
        recompute = tuple(r for r in recompute if r != "ops")
    grad_overlaps = (False,) if runtime else _both(overlap_grad_reduce)
    tp_overlaps = (False,) if runtime else _both(overlap_tp_comm)

    def overlaps(dp: int, tp: int) -> list[tuple[bool, bool]]:
        """(gradient, tensor-parallel) overlap pairs: only where there is that comm."""
        return [(g, t) for g in (grad_overlaps if dp > 1 else (False,))
                for t in (tp_overlaps if tp > 1 else (False,))]
    n = cluster.num_gpus
    for tp in (d for d in range(1, n + 1) if n % d == 0):
        if shape.num_heads % tp or shape.kv_heads % tp or tp > cluster.gpus_per_node:
            continue
        for cp in context_parallel_sizes(shape, n // tp, runtime=runtime):
            yield from _with_cp_and_tp(shape, cluster, global_batch, tp, cp, runtime=runtime,
                                       recompute=recompute, zero=zero, schedules=schedules,
                                       microbatches=microbatches, overlaps=overlaps,
                                       logit_bytes=logit_bytes,
                                       optimizer_state=optimizer_state)


# Context-parallel degrees the ranking offers: while each GPU keeps at least this many tokens
# of a sequence (a choice of candidates, not a cost: below it the planner is not asked
# to weigh the ring against the attention blocks it hides behind).
CP_MIN_TOKENS = 2048
CP_SIZES = (1, 2, 4, 8, 16)


def context_parallel_sizes(shape: GPTShape, gpus: int, *, runtime: bool = False):
    """cp degrees worth ranking on ``gpus`` GPUs: 1, and with flash attention those that
    leave a GPU at least ``CP_MIN_TOKENS`` of the sequence in 2 cp equal chunks; the
    runtime has no context parallelism."""
    for cp in CP_SIZES:
        if cp == 1 or (not runtime and shape.flash_attention and gpus % cp == 0
                       and shape.seq_len % (2 * cp) == 0
                       and shape.seq_len // cp >= CP_MIN_TOKENS):
            yield cp


def _with_cp_and_tp(shape, cluster, global_batch, tp, cp, *, runtime, recompute, zero,
                    schedules, microbatches, overlaps, logit_bytes, optimizer_state):
    n = cluster.num_gpus
    for pp in (d for d in range(1, n // (tp * cp) + 1) if (n // (tp * cp)) % d == 0):
        split = trimmed_stages(shape.num_layers, pp)
        if split is None or (runtime and split != (None, None)):
            continue
        first, last = split
        per_stage = shape.num_layers // pp if first is None else -(-shape.num_layers // pp)
        dp = n // (tp * cp * pp)
        for mb in microbatches:
            if global_batch % (dp * mb):
                continue
            m = global_batch // (dp * mb)
            for schedule, v in _schedules(per_stage, pp, m, schedules, first is not None):
                for rc in recompute:
                    if runtime and not runtime_trains(schedule, rc):
                        continue
                    for z in ((3 if dp > 1 else 0,) if runtime else zero):
                        if z and dp * cp == 1:
                            continue
                        for grad_overlap, tp_overlap in overlaps(dp * cp, tp):
                            yield TrainLayout(
                                tp=tp, pp=pp, dp=dp, cp=cp, global_batch=global_batch,
                                microbatch=mb, schedule=schedule, virtual_stages=v,
                                recompute=rc, zero=z,
                                sequence_parallel=tp > 1 and shape.seq_len % (tp * cp) == 0,
                                fp32_params=runtime, deferred_grad_sync=runtime,
                                bf16_matmul_params=runtime, logit_bytes=logit_bytes,
                                optimizer_state=optimizer_state,
                                overlap_grad_reduce=grad_overlap,
                                overlap_tp_comm=tp_overlap,
                                first_stage_layers=first, last_stage_layers=last)


def _both(option: bool | None) -> tuple[bool, ...]:
    return (False, True) if option is None else (option,)


def trimmed_stages(num_layers: int, pp: int) -> tuple[int | None, int | None] | None:
    """How ``num_layers`` go on ``pp`` stages: (None, None) for equal stages where pp
    divides them; else (first, last) stage layers with every other stage at
    ceil(layers / pp) and the rest split between the first and last stage (the first one
    more when odd: the last holds the logits); None where no such split exists."""
    if num_layers % pp == 0:
        return None, None
    per_stage = -(-num_layers // pp)
    rest = num_layers - (pp - 2) * per_stage
    if rest < 0:
        return None
    first, last = rest - rest // 2, rest // 2
    return (first, last) if first <= per_stage else None


def _schedules(per_stage: int, pp: int, m: int, schedules=RANKED_SCHEDULES,
               trimmed: bool = False):
    """(schedule, chunks per rank) for ``per_stage`` layers on each of the middle ranks, of
    the ``schedules`` offered (split-backward ones only on equal stages, where torch takes
    the sizes)."""
    if pp == 1:
        yield "1f1b", 1
        return
    if m >= pp:
        yield "1f1b", 1
        if m % pp == 0 and "interleaved_1f1b" in schedules:  # micro-batches in groups of pp
            for v in range(2, per_stage + 1):  # down to one layer per model chunk
                if per_stage % v == 0:
                    yield "interleaved_1f1b", v
    for name in () if trimmed else (s for s in TORCH_CLASSES if s in schedules):
        for v in (2,) if name in V_SHAPED else range(2, per_stage + 1):
            if per_stage % v == 0 and _torch_takes(name, pp, m, v):
                yield name, v


def _torch_takes(name: str, pp: int, m: int, v: int) -> bool:
    try:
        torch_order(name, pp, m, v)
    except ValueError:
        return False
    return True


def rank_layouts(shape: GPTShape, cluster: Cluster, global_batch: int,
                 **options) -> list[StepEstimate]:
    """Every candidate layout, fitting ones first, fastest first; ties to less memory, then
    to less context parallelism (where the model prices a cp split like more data
    parallelism, the simpler layout)."""
    estimates = [estimate_step(shape, cluster, layout)
                 for layout in candidate_layouts(shape, cluster, global_batch, **options)]
    return sorted(estimates, key=lambda e: (not e.fits, round(e.step_s, 6),
                                            round(e.memory_gib, 3), e.layout.cp,
                                            e.description))
