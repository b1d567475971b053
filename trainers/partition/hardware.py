"""GPUs, links and collectives for the shape-level cost model (``gpt.py``).

Every constant says where it comes from. Two are calibrated (fitted once, on Table 1 of
Narayanan et al. 2021, and then used unchanged for every other run and GPU):
``GEMM_PEAK_SHARE`` and ``NVLINK_BUS_SHARE``. See trainers/partition/README.md, "Cost model".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Share of the dense peak a large, square bf16 GEMM reaches (cuBLAS). Calibrated on
# Narayanan et al. 2021, Table 1 (the only fitted compute constant; README "Calibration").
GEMM_PEAK_SHARE = 0.80
# Measured maximum achievable matmul FLOP/s (MAMF: the best of a sweep of large bf16 GEMM
# shapes, no sparsity) as a share of the dense peak: A100 SXM 267.9 of 312 TFLOP/s (0.859),
# H100 SXM 792.1 of 989 (0.801), both CUDA 12.1 (S. Bekman, "Machine Learning Engineering
# Open Book", github.com/stas00/ml-engineering, compute/accelerator/README.md, "Maximum
# Achievable Matmul FLOPS comparison table"; a later version of the same page lists
# H100/H200 SXM at 794.5, 0.803). GEMM_PEAK_SHARE was fitted on A100 runs only; another
# GPU's large GEMMs reach it scaled by that GPU's MAMF share over A100's (``GPU.gemm_share``;
# H100 and H200: 0.80 x 0.801 / 0.859 = 0.746). Not fitted on any run.
A100_MAMF_SHARE = 267.9 / 312.0
H100_MAMF_SHARE = 792.1 / 989.0
# Share of the HBM bandwidth that elementwise kernels (norms, GeLU, softmax, dropout,
# residual adds) reach. An assumption, not fitted (with the 2x-the-stored-activations
# traffic in gpt.py); elementwise work is 14-34 % of a layer's forward in Narayanan's Table 1
# rows, mostly the materialised attention scores, so it matters most for small hidden sizes.
MEMORY_BW_SHARE = 0.80
# NCCL all-reduce bus bandwidth over NVLink as a share of the one-way NVLink bandwidth.
# Calibrated with GEMM_PEAK_SHARE on Narayanan et al. 2021, Table 1 (rows with tp = 2..8);
# the fit is flat from 0.7 to 0.9 (README "Calibration"), 0.70 is its lower end.
NVLINK_BUS_SHARE = 0.70
# Share of the InfiniBand line rate GPU-to-GPU transfers reach: 24 GB/s per 200 Gb/s HDR
# adapter (= 0.96), measured on Selene with GPUDirect RDMA, and NCCL on DGX A100 at 192 GB/s,
# i.e. a collective uses all eight NICs of a node (NVIDIA technical blog, Newburn, Datta,
# Shainer 2020, "Accelerating IO in the Modern Data Center: Network IO", fig. 3 and sec. NCCL).
NETWORK_SHARE = 0.96
# Latency of one ring step (alpha of the alpha-beta model), seconds; assumed, near NCCL's own
# tuning model (src/graph/tuning.cc, ring, Simple protocol: 3.4 us per NVLink hop, 14.0 us
# per network hop, 8.4 us per collective) and the blog above (3.4 us MPI latency between
# two Selene nodes). A ring spanning nodes pays NETWORK_LATENCY_S on each of its steps.
NVLINK_LATENCY_S = 5e-6
NETWORK_LATENCY_S = 15e-6
# Memory the framework cannot use for tensors: CUDA context, NCCL buffers, cuBLAS
# workspace, allocator fragmentation (an assumption, stated as such).
RESERVED_GIB = 3.0
# Compute that a collective run behind it takes back, per second of the collective's NVLink
# transfer. NCCL moves data between the GPUs of a node with its own kernels, on the SMs and
# HBM the overlapped GEMMs use; between nodes the NIC moves it (GPUDirect RDMA). Lee et al.
# 2025 ("Characterizing Compute-Communication Overlap in GPU-Accelerated Distributed Deep
# Learning", arXiv:2507.03114; GPT and Llama training on 4 A100 / H100 / MI250 / MI210)
# measured the overlapped compute 18.9 % slower on average than alone (40 % at most), and
# compute and communication in series 10.2 % slower on average than overlapped: so the
# communication took C = 1.102 x 1.189 - 1 = 0.31 of the compute, and the slowdown,
# 0.189, is 0.6 of it. Taken from those two averages, not fitted (README, "Calibration").
OVERLAP_NVLINK_COST = 0.6
# Share of the dense peak that FlashAttention's kernels reach, forward and backward, per
# GPU: see ``GPU.flash_share``. Dao 2023 ("FlashAttention-2", arXiv:2307.08691): the first
# FlashAttention reaches 25-40 % of A100's peak, FlashAttention-2 50-73 %; Shah et al. 2024
# ("FlashAttention-3", arXiv:2407.08608): FlashAttention-2 reaches 35 % of H100's.
# The published flash-attention runs here (MosaicML's MPT, 2023) ran llm-foundry's Triton
# FlashAttention (``attn_impl: triton``, of the first FlashAttention's generation), so
# A100 is costed at the middle of that range, 0.325; a kernel of that generation keeps on
# H100 the share FlashAttention-2 keeps, 35 / 61.5 (the middle of 50-73) = 0.57 of it.
A100_FLASH_SHARE = (0.25 + 0.40) / 2
AMPERE_KERNEL_ON_HOPPER = 0.35 / ((0.50 + 0.73) / 2)
# Later kernels, for runs that use them (``GPTShape.flash_kernel``; of the published rows
# only the fourth held-out set's, which ran cuDNN's, name one): FlashAttention-2 at the
# middle of its 50-73 % of A100's peak and at 35 % of H100's (Dao 2023; Shah et al. 2024);
# FlashAttention-3 (Hopper only) 1.5-2.0 x FlashAttention-2 on H100 (Shah et al. 2024,
# abstract), the middle of that.
A100_FLASH2_SHARE = (0.50 + 0.73) / 2
HOPPER_FLASH2_SHARE = 0.35
HOPPER_FLASH3_SHARE = HOPPER_FLASH2_SHARE * (1.5 + 2.0) / 2
# FlashAttention's backward runs five matmuls of the forward's size to its two (it recomputes
# the scores), so 2.5 x its forward FLOPs (Dao 2023, FlashAttention-2, sec. 4.1).
FLASH_BACKWARD_RATIO = 2.5
# cuDNN's fused attention (cuDNN 9, what Transformer Engine runs as "FusedAttention" when
# NVTE_FUSED_ATTN=1; Hopper only here): its bars in Shah et al. 2024's figures 5 (forward,
# causal mask) and 6 (backward), head dim 128, BF16, H100 80GB SXM5, TFLOP/s at sequence
# 2k, 4k, 8k, 16k. Forward and backward at their 1 : 2.5 FLOPs (FLASH_BACKWARD_RATIO), the
# time they take together: 505 TFLOP/s, 0.51 of H100's peak. The same figures put
# FlashAttention-2 at 0.29-0.34 of it, as HOPPER_FLASH2_SHARE's 35 % says.
HOPPER_CUDNN_FORWARD_TFLOPS = (484.0, 518.0, 529.0, 539.0)
HOPPER_CUDNN_BACKWARD_TFLOPS = (465.0, 499.0, 518.0, 516.0)
HOPPER_CUDNN_SHARE = (1 + FLASH_BACKWARD_RATIO) / (
    len(HOPPER_CUDNN_FORWARD_TFLOPS) / sum(HOPPER_CUDNN_FORWARD_TFLOPS)
    + FLASH_BACKWARD_RATIO * len(HOPPER_CUDNN_BACKWARD_TFLOPS)
    / sum(HOPPER_CUDNN_BACKWARD_TFLOPS)) / 989.0
FLASH_KERNELS = ("flash", "flash2", "flash3", "cudnn")


@dataclass(frozen=True, kw_only=True)
class GPU:
    """One GPU model: dense bf16 peak, memory, HBM bandwidth, NVLink (one way), and the
    network of the reference server it ships in (per node)."""

    name: str
    peak_tflops: float
    memory_gib: float
    hbm_gb_per_s: float
    nvlink_gb_per_s: float
    node_network_gbps: float
    mamf_share: float  # measured best bf16 GEMM rate / peak (A100_MAMF_SHARE, ...)
    flash_share: float  # FlashAttention's FLOP rate / peak (A100_FLASH_SHARE, ...)
    source: str
    flash2_share: float | None = None  # FlashAttention-2's (None: not measured on this GPU)
    flash3_share: float | None = None  # FlashAttention-3's (None: it does not run here)
    cudnn_share: float | None = None  # cuDNN's fused attention (None: not measured here)

    def __post_init__(self) -> None:
        for key in ("peak_tflops", "memory_gib", "hbm_gb_per_s", "nvlink_gb_per_s",
                    "node_network_gbps", "mamf_share", "flash_share"):
            if getattr(self, key) <= 0:
                raise ValueError(f"GPU {self.name}: {key}={getattr(self, key)} must be > 0")
        for key in ("flash2_share", "flash3_share", "cudnn_share"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ValueError(f"GPU {self.name}: {key}={getattr(self, key)} must be > 0")

    def attention_share(self, kernel: str) -> float:
        """The share of the peak FlashAttention ``kernel`` reaches on this GPU
        (``FLASH_KERNELS``: "flash" the first generation, "flash2", "flash3", "cudnn");
        refused, naming what is valid, where this GPU has no rate for it."""
        share = self._attention_shares().get(kernel)
        if share is None:
            here = [k for k, v in self._attention_shares().items() if v]
            where = [g.name for g in GPUS.values() if g._attention_shares().get(kernel)]
            runs_on = f"; {kernel} runs on {', '.join(where)}" if where else ""
            raise ValueError(f"--attention {kernel}: no rate for {self.name} (valid here: "
                             f"{', '.join(here)}, materialized{runs_on})")
        return share

    def _attention_shares(self) -> dict[str, float | None]:
        return {"flash": self.flash_share, "flash2": self.flash2_share,
                "flash3": self.flash3_share, "cudnn": self.cudnn_share}

    @property
    def gemm_share(self) -> float:
        """Share of the peak a large bf16 GEMM reaches in training: the A100-calibrated
        GEMM_PEAK_SHARE, scaled by this GPU's measured MAMF share over A100's."""
        return GEMM_PEAK_SHARE * (self.mamf_share / A100_MAMF_SHARE)

    @property
    def flops_per_byte(self) -> float:
        """Peak FLOP/s over HBM byte/s: the GEMM size where memory stops mattering."""
        return self.peak_tflops * 1e12 / (self.hbm_gb_per_s * 1e9)


GPUS = {
    # NVIDIA A100 datasheet: 312 TFLOP/s dense bf16, 1555 GB/s (40 GB) / 2039 GB/s (80 GB),
    # NVLink 3 600 GB/s both ways; DGX A100: 8 x 200 Gb/s HDR InfiniBand for compute.
    "a100-40gb": GPU(name="a100-40gb", peak_tflops=312.0, memory_gib=40.0, hbm_gb_per_s=1555.0,
                     nvlink_gb_per_s=300.0, node_network_gbps=1600.0,
                     mamf_share=A100_MAMF_SHARE, flash_share=A100_FLASH_SHARE,
                     flash2_share=A100_FLASH2_SHARE,
                     source="NVIDIA A100 datasheet; DGX A100 user guide"),
    "a100-80gb": GPU(name="a100-80gb", peak_tflops=312.0, memory_gib=80.0, hbm_gb_per_s=2039.0,
                     nvlink_gb_per_s=300.0, node_network_gbps=1600.0,
                     mamf_share=A100_MAMF_SHARE, flash_share=A100_FLASH_SHARE,
                     flash2_share=A100_FLASH2_SHARE,
                     source="NVIDIA A100 datasheet; DGX A100 user guide"),
    # NVIDIA H100 SXM datasheet: 989 TFLOP/s dense bf16 (1979 with sparsity), 3.35 TB/s,
    # NVLink 4 900 GB/s both ways; DGX H100: 8 x 400 Gb/s NDR.
    "h100-80gb": GPU(name="h100-80gb", peak_tflops=989.0, memory_gib=80.0, hbm_gb_per_s=3350.0,
                     nvlink_gb_per_s=450.0, node_network_gbps=3200.0,
                     mamf_share=H100_MAMF_SHARE,
                     flash_share=A100_FLASH_SHARE * AMPERE_KERNEL_ON_HOPPER,
                     flash2_share=HOPPER_FLASH2_SHARE, flash3_share=HOPPER_FLASH3_SHARE,
                     cudnn_share=HOPPER_CUDNN_SHARE,
                     source="NVIDIA H100 SXM datasheet; DGX H100 user guide"),
    # NVIDIA H200 SXM datasheet: same compute as H100, 141 GB HBM3e at 4.8 TB/s; the same
    # GH100 chip, so H100's MAMF share (the later MAMF table's H100/H200 row).
    "h200": GPU(name="h200", peak_tflops=989.0, memory_gib=141.0, hbm_gb_per_s=4800.0,
                nvlink_gb_per_s=450.0, node_network_gbps=3200.0, mamf_share=H100_MAMF_SHARE,
                flash_share=A100_FLASH_SHARE * AMPERE_KERNEL_ON_HOPPER,
                flash2_share=HOPPER_FLASH2_SHARE, flash3_share=HOPPER_FLASH3_SHARE,
                cudnn_share=HOPPER_CUDNN_SHARE, source="NVIDIA H200 SXM datasheet; HGX H200"),
}


def gpu_spec(name: str) -> GPU:
    """The named GPU, or a ValueError naming the flag and the known names."""
    if name not in GPUS:
        raise ValueError(f"--gpu {name!r} is unknown; valid: {', '.join(GPUS)}")
    return GPUS[name]


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """``num_nodes`` nodes of ``gpus_per_node`` GPUs.

    intra_node_gbps: one GPU's NVLink bandwidth to its node, one way, Gb/s (None: the GPU's).
    inter_node_gbps: one node's network bandwidth, Gb/s, shared by its GPUs (None: the
        reference server's, e.g. 8 x 200 Gb/s for DGX A100).
    """

    gpu: GPU
    num_nodes: int
    gpus_per_node: int = 8
    intra_node_gbps: float | None = None
    inter_node_gbps: float | None = None

    def __post_init__(self) -> None:
        if self.num_nodes < 1:
            raise ValueError(f"--nodes {self.num_nodes}: must be >= 1")
        if self.gpus_per_node < 1:
            raise ValueError(f"--gpus-per-node {self.gpus_per_node}: must be >= 1")
        for flag, value in (("--intra-node-gbps", self.intra_node_gbps),
                            ("--inter-node-gbps", self.inter_node_gbps)):
            if value is not None and value <= 0:
                raise ValueError(f"{flag} {value}: must be > 0 (Gb/s)")

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def nvlink_bytes_per_s(self) -> float:
        """Achievable NCCL bus bandwidth inside a node, per GPU, bytes/s."""
        gbps = self.intra_node_gbps or self.gpu.nvlink_gb_per_s * 8
        return gbps / 8 * 1e9 * NVLINK_BUS_SHARE

    @property
    def network_bytes_per_s_per_gpu(self) -> float:
        """Achievable network bandwidth of one GPU (its share of the node's), bytes/s."""
        gbps = self.inter_node_gbps or self.gpu.node_network_gbps
        return gbps / 8 * 1e9 * NETWORK_SHARE / self.gpus_per_node


def group_nodes(cluster: Cluster, size: int, stride: int) -> int:
    """Nodes a group of ``size`` ranks ``stride`` apart spans (ranks fill nodes in order)."""
    if size <= 1:
        return 1
    if stride >= cluster.gpus_per_node:
        return size
    return max(1, math.ceil(size * stride / cluster.gpus_per_node))


def ring_seconds(num_bytes: float, size: int, nodes: int, cluster: Cluster, *,
                 factor: float) -> float:
    """A ring collective moving ``factor * (n-1)/n * num_bytes`` per GPU (all-reduce: 2,
    reduce-scatter or all-gather: 1), hierarchical across nodes: inside each node over
    NVLink, the node's 1/g share between nodes over the network."""
    if size <= 1 or num_bytes <= 0:
        return 0.0
    steps = factor * (size - 1)
    intra = ring_nvlink_seconds(num_bytes, size, nodes, cluster, factor=factor)
    if nodes <= 1:
        return intra + steps * NVLINK_LATENCY_S
    per_node = max(1, size // nodes)
    inter = (factor * (nodes - 1) / nodes * num_bytes / per_node
             / cluster.network_bytes_per_s_per_gpu)
    return intra + inter + steps * NETWORK_LATENCY_S


def ring_nvlink_seconds(num_bytes: float, size: int, nodes: int, cluster: Cluster, *,
                        factor: float) -> float:
    """The NVLink bandwidth part of ``ring_seconds`` (its latency and network parts left
    out): the bytes NCCL's own kernels copy between the GPUs of a node."""
    if size <= 1 or num_bytes <= 0:
        return 0.0
    per_node = size if nodes <= 1 else max(1, size // nodes)
    if per_node <= 1:
        return 0.0
    return factor * (per_node - 1) / per_node * num_bytes / cluster.nvlink_bytes_per_s


def gemm_seconds(m: float, n: float, k: float, gpu: GPU, *, count: float = 1.0) -> float:
    """``count`` GEMMs of (m x k) @ (k x n) in bf16.

    An additive roofline: the time at ``gpu.gemm_share`` of the peak (GEMM_PEAK_SHARE on
    A100) plus the time to move the three operands once through HBM (2 bytes an element),
    i.e. an efficiency of ``1 / (1 / share + (peak / bandwidth) * (1/m + 1/n + 1/k))``:
    small or thin GEMMs lose to memory, large square ones approach the share of the peak.
    """
    flops = 2.0 * m * n * k * count
    compute = flops / (gpu.peak_tflops * 1e12 * gpu.gemm_share)
    memory = 2.0 * (m * k + k * n + m * n) * count / (gpu.hbm_gb_per_s * 1e9)
    return compute + memory


def memory_seconds(num_bytes: float, gpu: GPU) -> float:
    """Elementwise kernels moving ``num_bytes`` through HBM."""
    return num_bytes / (gpu.hbm_gb_per_s * 1e9 * MEMORY_BW_SHARE)


# The CPU spec ``partition="auto"`` costs with when no GPU is present: fixed (not timed), so
# every process of a job computes the same plan. Its figures are those of one recent
# server core pair (an assumption); only the ratio of compute to memory time matters here.
CPU_TFLOPS, CPU_GB_PER_S = 0.2, 20.0


def device_spec_for(name: str):
    """The ``costs.DeviceSpec`` of a GPU named in ``GPUS`` at its GEMM share and the memory
    share (ValueError naming the known names otherwise)."""
    from trainers.partition.costs import DeviceSpec

    if name not in GPUS:
        raise ValueError(f"partition device {name!r} is unknown; valid: {', '.join(GPUS)}")
    gpu = GPUS[name]
    return DeviceSpec(name=gpu.name, tflops=gpu.peak_tflops, mem_gb_per_s=gpu.hbm_gb_per_s,
                      memory_gib=gpu.memory_gib, matmul_efficiency=gpu.gemm_share,
                      memory_efficiency=MEMORY_BW_SHARE)


def local_device_spec():
    """A ``costs.DeviceSpec`` for the device this process trains on: the named GPU when CUDA
    is present (matched by name and memory), else the fixed CPU spec."""
    import torch

    from trainers.partition.costs import DeviceSpec

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name().upper()
        memory_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        key = ("h200" if "H200" in name else "h100-80gb" if "H100" in name
               else ("a100-80gb" if memory_gib > 60 else "a100-40gb") if "A100" in name
               else None)
        if key is not None:
            return device_spec_for(key)
        raise ValueError(f"partition='auto': no spec for GPU {name!r} (known: "
                         f"{', '.join(GPUS)}); name one with partition_device=, or give the "
                         f"strategy explicit stages")
    import os

    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return DeviceSpec(name="cpu", tflops=CPU_TFLOPS, mem_gb_per_s=CPU_GB_PER_S,
                      memory_gib=ram_gib, matmul_efficiency=1.0, memory_efficiency=1.0)


def measured_device_spec(device=None, *, repeats: int = 3):
    """A ``costs.DeviceSpec`` from timing this machine: the best of ``repeats`` square
    GEMMs (bf16 4096^3 on a GPU, fp32 512^3 on a CPU) and copies of a 256 MiB (GPU) / 32 MiB
    (CPU) tensor, at efficiency 1 (the rates are achieved ones); memory: the GPU's, or RAM.
    Ranks time differently: agree on one result before planning
    (``trainers.parallel.auto.auto_partition(device="measured")`` takes the minimum)."""
    import os
    import time

    import torch

    from trainers.partition.costs import DeviceSpec

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    n, dtype = (4096, torch.bfloat16) if gpu else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    src = torch.empty((256 if gpu else 32) * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)

    def best(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            if gpu:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if gpu:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return min(times)

    tflops = 2 * n**3 / best(lambda: a @ b) / 1e12
    gb_per_s = 2 * src.numel() / best(lambda: dst.copy_(src)) / 1e9  # read + write
    if gpu:
        memory_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
        name = f"measured {torch.cuda.get_device_name(device)}"
    else:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        name = "measured cpu"
    return DeviceSpec(name=name, tflops=tflops, mem_gb_per_s=gb_per_s, memory_gib=memory_gib,
                      matmul_efficiency=1.0, memory_efficiency=1.0)
