"""DTensor tensor parallelism for the model's attention and MLP layers, and optional
sequence parallelism for the norms between them.

Megatron-style: in every `rag_mm.layers.Attention`, `q_proj`, `k_proj`, `v_proj` are split
column-wise (each rank owns whole heads) and `o_proj` row-wise (one all-reduce after the
layer); in every `MLP`, `up` is column-wise and `down` row-wise. Inputs and outputs of each
layer stay plain, replicated tensors, so everything else (norms, embeddings, the retrieval
unit, pipeline stage boundaries) is untouched. The text tower of the query encoder (a
Hugging Face BERT) is not split.

Sequence parallel (`sequence_parallel=True`): inside every pre-norm `rag_mm.layers.Block`
(decoder blocks and the vision towers' blocks) the residual stream is sharded on the
sequence dim, so each rank runs the two LayerNorms and the residual adds on T / tp
positions; the attention and MLP inputs are all-gathered, and `o_proj` / `down`
reduce-scatter instead of all-reduce. A block takes and returns the whole sequence (it is
cut at entry and all-gathered at exit: one all-gather per block more than plain tensor
parallelism), so activations between blocks and stages stay whole. Norms outside blocks
(the vision towers' and the head's final norms) and the BERT text tower run whole.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from rag_mm.layers import MLP, Attention, Block
from trainers.parallel.mesh import ParallelConfigError

SEQUENCE_DIM = 1  # (batch, seq, hidden) everywhere in the model


class SequenceShardedBlock(ParallelStyle):
    """A block whose first input (whole, replicated over tp) is cut on the sequence dim
    at entry, and whose output (first of a tuple) is all-gathered whole at exit."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        tp_size = device_mesh.size()

        def shard(_module, args):
            hidden, *rest = args
            length = hidden.shape[SEQUENCE_DIM]
            if length % tp_size:
                raise ParallelConfigError(
                    f"sequence_parallel: {self.name or 'the block'} gets sequences of length "
                    f"{length}, not divisible by tensor_parallel_size={tp_size}; choose sequence "
                    f"lengths that divide, or sequence_parallel=False"
                )
            whole = DTensor.from_local(hidden, device_mesh, [Replicate()], run_check=False)
            return (whole.redistribute(device_mesh, [Shard(SEQUENCE_DIM)]), *rest)

        def gather(_module, _args, output):
            first = output[0] if isinstance(output, tuple) else output
            first = first.redistribute(device_mesh, [Replicate()]).to_local()
            return (first, *output[1:]) if isinstance(output, tuple) else first

        module.register_forward_pre_hook(shard)
        module.register_forward_hook(gather)
        return module


def _gather_input(*layouts) -> PrepareModuleInput:
    """The module's inputs (sequence-sharded where a layout is given) all-gathered whole."""
    return PrepareModuleInput(
        input_layouts=layouts, use_local_output=True,
        desired_input_layouts=tuple(None if layout is None else Replicate() for layout in layouts))


def _sum_partial_grad(grad: DTensor) -> DTensor:
    """A sequence-parallel norm's weight gradient arrives as per-rank partial sums (each
    rank saw T / tp positions); sum it at once so `.grad` is whole, like the weight."""
    return grad.redistribute(grad.device_mesh, [Replicate()])


def tensor_parallel_plan(module: nn.Module, *, sequence_parallel: bool = False) -> dict[str, object]:
    """{submodule path: ParallelStyle} for every attention and MLP layer under `module`, and
    with `sequence_parallel` for every `Block`'s norms and sequence layout."""
    seq = Shard(SEQUENCE_DIM)
    plan: dict[str, object] = {}
    in_blocks = set()
    if sequence_parallel:
        for name, sub in module.named_modules():
            if isinstance(sub, Block):
                prefix = f"{name}." if name else ""
                plan[name] = SequenceShardedBlock(name)
                plan[prefix + "attn_norm"] = SequenceParallel(sequence_dim=SEQUENCE_DIM)
                plan[prefix + "attn"] = _gather_input(seq, None)  # (hidden, mask)
                plan[prefix + "mlp_norm"] = SequenceParallel(sequence_dim=SEQUENCE_DIM)
                plan[prefix + "mlp"] = _gather_input(seq)
                in_blocks.update({prefix + "attn", prefix + "mlp"})
    for name, sub in module.named_modules():
        prefix = f"{name}." if name else ""
        # inside a sequence-parallel block the output is reduce-scattered onto the sequence
        out = {"output_layouts": seq, "use_local_output": False} if name in in_blocks else {}
        if isinstance(sub, Attention):
            for proj in ("q_proj", "k_proj", "v_proj"):
                plan[prefix + proj] = ColwiseParallel()
            plan[prefix + "o_proj"] = RowwiseParallel(**out)
        elif isinstance(sub, MLP):
            plan[prefix + "up"] = ColwiseParallel()
            plan[prefix + "down"] = RowwiseParallel(**out)
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


def apply_tensor_parallel(module: nn.Module, tp_mesh: DeviceMesh, *,
                          sequence_parallel: bool = False) -> nn.Module:
    """Shard `module`'s attention and MLP layers over the 1-D `tp_mesh`, in place (and with
    `sequence_parallel` the blocks' norms over the sequence dim).

    Weights become DTensors (each rank keeps its columns / rows; sequence-parallel norms
    keep whole, replicated weights); each attention layer's `num_heads` becomes the local
    head count its `view(batch, seq, heads, -1)` needs."""
    tp_size = tp_mesh.size()
    check_tensor_parallel(module, tp_size)
    if tp_size == 1:
        return module
    plan = tensor_parallel_plan(module, sequence_parallel=sequence_parallel)
    parallelize_module(module, tp_mesh, plan)
    for name, style in plan.items():
        if isinstance(style, SequenceParallel):
            for param in module.get_submodule(name).parameters():
                param.register_hook(_sum_partial_grad)
    for sub in module.modules():
        if isinstance(sub, Attention):
            sub.num_heads //= tp_size
    return module
