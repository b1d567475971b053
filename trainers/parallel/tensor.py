"""DTensor tensor parallelism for the model's attention and MLP layers.

Megatron-style: in every `rag_mm.layers.Attention`, `q_proj`, `k_proj`, `v_proj` are split
column-wise (each rank owns whole heads) and `o_proj` row-wise (one all-reduce after the
layer); in every `MLP`, `up` is column-wise and `down` row-wise. Inputs and outputs of each
layer stay plain, replicated tensors, so everything else (norms, embeddings, the retrieval
unit, pipeline stage boundaries) is untouched. The text tower of the query encoder (a
Hugging Face BERT) is not split.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from rag_mm.layers import MLP, Attention
from trainers.parallel.mesh import ParallelConfigError


def tensor_parallel_plan(module: nn.Module) -> dict[str, object]:
    """{submodule path: ParallelStyle} for every attention and MLP layer under `module`."""
    plan: dict[str, object] = {}
    for name, sub in module.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(sub, Attention):
            for proj in ("q_proj", "k_proj", "v_proj"):
                plan[prefix + proj] = ColwiseParallel()
            plan[prefix + "o_proj"] = RowwiseParallel()
        elif isinstance(sub, MLP):
            plan[prefix + "up"] = ColwiseParallel()
            plan[prefix + "down"] = RowwiseParallel()
    return plan


def check_tensor_parallel(module: nn.Module, tp_size: int) -> None:
    """Raise unless every attention layer's heads and every MLP's width split `tp_size` ways."""
    for name, sub in module.named_modules():
        if isinstance(sub, Attention) and sub.num_heads % tp_size:
            raise ParallelConfigError(
                f"{name or 'model'} has {sub.num_heads} attention heads, not divisible by "
                f"tensor_parallel_size={tp_size}; choose a size that divides the head count"
            )
        if isinstance(sub, MLP) and sub.up.out_features % tp_size:
            raise ParallelConfigError(
                f"{name or 'model'} has MLP width {sub.up.out_features}, not divisible by "
                f"tensor_parallel_size={tp_size}"
            )


def apply_tensor_parallel(module: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard `module`'s attention and MLP layers over the 1-D `tp_mesh`, in place.

    Weights become DTensors (each rank keeps its columns / rows); each attention layer's
    `num_heads` becomes the local head count its `view(batch, seq, heads, -1)` needs."""
    tp_size = tp_mesh.size()
    check_tensor_parallel(module, tp_size)
    if tp_size == 1:
        return module
    parallelize_module(module, tp_mesh, tensor_parallel_plan(module))
    for sub in module.modules():
        if isinstance(sub, Attention):
            sub.num_heads //= tp_size
    return module
