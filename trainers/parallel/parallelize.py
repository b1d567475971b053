"""`parallelize`: one plain function that turns a model built on the meta device into this
rank's share of a pipeline x tensor x data parallel run, in torchtitan's order.

    model = build_model(config)                    # under torch.device("meta"): no memory
    pipeline = parallelize(model, dims, ParallelConfig(pipeline=...), example_batch,
                           mesh=dims.build_mesh("cpu"), device=torch.device("cpu"))
    losses = pipeline.step(batch)                  # forward + backward over micro-batches

For this rank only, in this order:

1. keep its pipeline stages' units (the others become `RemoteUnit`s: never allocated);
2. tensor parallelism over "tp" (`tensor.apply_tensor_parallel`);
3. activation checkpointing of the units the setting names (`checkpointing.py`);
4. `torch.compile` of every decoder block it holds (optional);
5. FSDP2 over "dp" (`fully_shard` per unit, then per stage as the root; with a bf16
   `param_dtype` every attention and MLP layer first gets a group of its own with a bf16
   `MixedPrecisionPolicy`: bf16 parameters in compute, fp32 gradient reduction; the rest
   stays fp32, as autocast leaves it, see `matmul_modules`);
6. `to_empty(device)` and the random init of its units only, each from its own seed
   (`RAGModel.init_unit`), so the values do not depend on the layout; a unit whose
   parameters are sharded (DTensor) is initialised whole on a copy, one unit at a time, and
   each rank keeps its slice;
7. the pretrained text tower (MiniLM) is loaded only where the retrieval unit is;
8. the torch schedule over its stages, their boundary shapes found by running
   `example_batch` (a per-replica batch of the size training uses: shapes are fixed then).

One process is the same path with one stage (`dims` all 1): no rank ever holds a unit it
does not run, and nothing is applied twice or later at the first batch.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from rag_mm.layers import MLP, Attention
from trainers.parallel.checkpointing import (
    ActivationCheckpointing,
    CheckpointSetting,
    apply_activation_checkpointing,
    check_checkpoint_schedule,
)
from trainers.parallel.mesh import ParallelConfigError, ParallelDims
from trainers.parallel.pipeline import (
    Pipeline,
    PipelineConfig,
    binding_groups,
    build_pipeline,
    check_partition,
    check_schedule,
    stage_ranks,
    tied_parameters,
)
from trainers.parallel.tensor import apply_tensor_parallel, check_tensor_parallel


class RemoteUnit(nn.Module):
    """Stands in for a unit that lives on another pipeline rank."""

    def __init__(self, name: str, pp_rank: int) -> None:
        super().__init__()
        self.unit_name, self.pp_rank = name, pp_rank

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            f"unit {self.unit_name!r} lives on pipeline rank {self.pp_rank}; under "
            f"a pipeline only the pipeline's schedule runs the model"
        )


@dataclass(kw_only=True)
class ParallelConfig:
    """What `parallelize` applies besides the mesh sizes (`ParallelDims`).

    Args:
        pipeline: the partition (stages must be chosen), schedule and micro-batches.
        sequence_parallel: with tp > 1, shard the blocks' norms on the sequence dim.
        compile: `torch.compile` every decoder block this rank holds; refused where no
            compiler works (no C/C++ compiler on CPU, no Triton on CUDA).
        activation_checkpointing: "off" / None, "every" (block), n (every n-th block) or
            unit names (`trainers.parallel.checkpointing`), resolved over the whole chain.
        param_dtype: bf16 -> FSDP2's `MixedPrecisionPolicy` for the attention and MLP layers
            (bf16 parameters in forward and backward, fp32 gradient reduction) when dp > 1;
            None: parameters as they are.
    """

    pipeline: PipelineConfig
    sequence_parallel: bool = False
    compile: bool = False
    param_dtype: torch.dtype | None = None
    activation_checkpointing: CheckpointSetting = None


def check_compile(device_type: str) -> None:
    """Refuse `compile=True` where torch.compile's default backend cannot build kernels."""
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError as error:
            raise ParallelConfigError(
                "compile=True on CUDA needs Triton (torch.compile's inductor backend), which "
                "is not installed; install triton or set compile=False") from error
        return
    if device_type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        raise ParallelConfigError(
            "compile=True on CPU needs a C++ compiler (g++, c++ or clang++ on PATH) for "
            "torch.compile's inductor backend; none was found: install one or set compile=False")


def local_units(stages: list[list[str]], schedule: str, pp_size: int, pp_rank: int) -> list[str]:
    """The unit names of the stages pipeline rank `pp_rank` holds, in chain order."""
    owners = stage_ranks(len(stages), pp_size, schedule)
    return [name for stage, names in enumerate(stages) if owners[stage] == pp_rank
            for name in names]


def keep_local_units(model: nn.Module, stages: list[list[str]], schedule: str,
                     pp_size: int, pp_rank: int) -> list[str]:
    """Replace every unit of another pipeline rank by a `RemoteUnit`; this rank's names."""
    owners = stage_ranks(len(stages), pp_size, schedule)
    for stage, names in enumerate(stages):
        if owners[stage] != pp_rank:
            for name in names:
                model.set_submodule(name, RemoteUnit(name, owners[stage]))
    return local_units(stages, schedule, pp_size, pp_rank)


def check_parallelize(model: nn.Module, dims: ParallelDims, config: ParallelConfig) -> list:
    """Everything `parallelize` would refuse, checked on the (meta) model before any work;
    returns the model's tied parameters."""
    pipeline = config.pipeline
    if pipeline.stages is None:
        raise ParallelConfigError("parallelize needs the stages chosen (PipelineConfig.stages; "
                                  "trainers.parallel.auto.auto_partition picks them)")
    check_schedule(pipeline, dims.pp)
    units = dict(model.units())
    ties = tied_parameters(units)
    check_partition(pipeline.stages, list(units), binding_groups(model, pipeline, ties))
    check_tensor_parallel(model, dims.tp)
    ActivationCheckpointing.parse(config.activation_checkpointing).unit_names(list(units))
    check_checkpoint_schedule(config.activation_checkpointing, pipeline.schedule)
    return ties


def parallelize(model: nn.Module, dims: ParallelDims, config: ParallelConfig,
                example_batch: dict[str, torch.Tensor], *, mesh: DeviceMesh | None,
                device: torch.device) -> Pipeline:
    """This rank's units of `model` (a `rag_mm` chain, built on the meta device or not)
    parallelised, materialised on `device`, initialised, and wrapped in the schedule that
    runs them; see the module docstring for the order. `mesh`: the ("dp", "pp", "tp")
    mesh of `dims` (None: a world of one). A process group is needed even for one process
    (torch's pipeline stages use it; refused by name without one). Every rank calls this
    together, with the same `example_batch` shapes."""
    ties = check_parallelize(model, dims, config)
    if config.compile:
        check_compile(device.type)
    if not dist.is_initialized():
        raise ParallelConfigError(
            "parallelize builds torch.distributed.pipelining stages, which need a process "
            "group: call torch.distributed.init_process_group first (for one process: "
            "backend='gloo', world_size=1, rank=0)")
    pp_group = mesh["pp"].get_group() if mesh is not None else None
    pp_rank = mesh["pp"].get_local_rank() if mesh is not None else 0
    stages, schedule = config.pipeline.stages, config.pipeline.schedule
    names = keep_local_units(model, stages, schedule, dims.pp, pp_rank)
    units = dict(model.units())
    on_meta = any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    sharded = dims.tp > 1 or dims.dp > 1
    # full-size stand-ins of the units that get sharded, to draw their init from (free on meta)
    templates = {name: _meta_copy(units[name]) for name in names} if on_meta and sharded else {}

    if dims.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], sequence_parallel=config.sequence_parallel)
    apply_activation_checkpointing(model, config.activation_checkpointing, only=names)
    if config.compile:
        for name in names:
            if name.startswith("blocks."):
                units[name].compile()
    fsdp = {}
    if dims.dp > 1:
        fsdp = {"mesh": mesh["dp"]}
        if config.param_dtype is not None:
            low = MixedPrecisionPolicy(param_dtype=config.param_dtype, reduce_dtype=torch.float32)
            for name in names:  # their own FSDP2 groups, gathered in bf16
                for sub in matmul_modules(units[name]):
                    fully_shard(sub, mesh=mesh["dp"], mp_policy=low)
            fsdp["mp_policy"] = MixedPrecisionPolicy(reduce_dtype=torch.float32)
        for name in names:
            fully_shard(units[name], **fsdp)
    if on_meta:
        materialize(model, names, device, templates, seed=_shared_seed(model, mesh))
    else:
        model.to(device)

    root = (lambda stage: fully_shard(stage, **fsdp)) if fsdp else None
    return build_pipeline(model, config.pipeline, example_batch, pp_group=pp_group,
                          device=device, parallelize=root, ties=ties)


# The layers `matmul_modules` gives bf16 FSDP2 groups (the planner's memory model counts
# their whole weights in bf16: trainers.parallel.auto, trainers.partition.gpt).
MATMUL_MODULE_TYPES = (Attention, MLP)


def matmul_modules(unit: nn.Module) -> list[nn.Module]:
    """The attention and MLP layers of `unit` (`rag_mm.layers.Attention` / `MLP`): nothing
    in them but linear layers and what runs on their bf16 outputs, so bf16 copies of their
    parameters compute exactly what autocast computes from fp32 ones (the same
    round-to-nearest of each weight and of the input, the same bf16 outputs). The rest of a
    unit (norms, embeddings, the heads' small layers) keeps fp32 parameters, as under
    autocast in one process: a norm on bf16 weights, or every unit's input cast to bf16,
    would put the residual stream in bf16."""
    return [sub for sub in unit.modules() if isinstance(sub, MATMUL_MODULE_TYPES)]


def materialize(model: nn.Module, names: list[str], device: torch.device | str,
                templates: dict[str, nn.Module] | None = None, *, seed: int | None = None) -> None:
    """`to_empty` on `device`, then the init of the units `names` (the ones this process
    holds) and the pretrained text tower where the retrieval unit is among them. A unit
    with a template (a full-size meta copy taken before sharding) is initialised on the
    copy and each rank keeps its slice; the others in place. `seed`: the init seed agreed
    by every rank (default the model's own)."""
    if seed is not None:
        model.init_seed = seed
    model.to_empty(device=device)
    model.tie_weights()
    units = dict(model.units())
    for name in names:
        template = (templates or {}).pop(name, None)
        target = units[name] if template is None else template.to_empty(device=device)
        model.init_unit(name, target)
        if name == "retrieval":
            model.retrieval.load_pretrained_text(target)
        if template is not None:
            _copy_into(units[name], template)
            del template, target  # one unit's full copy at a time


def _meta_copy(unit: nn.Module) -> nn.Module:
    """A deep copy of a meta-device unit, sharing what is not its structure (the search
    backend, tokenizer and caches of the retrieval unit)."""
    shared = {id(v): v for k, v in vars(unit).items() if not k.startswith("_")
              and not isinstance(v, (nn.Module, torch.Tensor))}
    return copy.deepcopy(unit, memo=shared)


@torch.no_grad()
def _copy_into(unit: nn.Module, full: nn.Module) -> None:
    """Every parameter and buffer of `unit` (plain, tensor-parallel or FSDP2 DTensors) set
    to its slice of the same-named whole tensor of `full`, and every submodule to its
    train / eval mode (the pretrained text tower loads in eval mode)."""
    modes = {name: sub.training for name, sub in full.named_modules()}
    for name, sub in unit.named_modules():
        sub.training = modes.get(name, sub.training)
    source = dict(full.named_parameters()) | dict(full.named_buffers())
    for name, tensor in [*unit.named_parameters(), *unit.named_buffers()]:
        whole = source[name].to(tensor.dtype)
        if isinstance(tensor, DTensor):
            part = distribute_tensor(whole, tensor.device_mesh, tensor.placements,
                                     src_data_rank=None).to_local()
            tensor.to_local().copy_(part)
        else:
            tensor.copy_(whole)


def _shared_seed(model: nn.Module, mesh: DeviceMesh | None) -> int:
    """The init seed of global rank 0, on every rank (ranks that were not seeded alike
    still build one model)."""
    if mesh is None or not dist.is_initialized() or dist.get_world_size() == 1:
        return model.init_seed
    seed = [model.init_seed]
    dist.broadcast_object_list(seed, src=0)
    return seed[0]


__all__ = ["MATMUL_MODULE_TYPES", "ParallelConfig", "RemoteUnit", "check_compile", "check_parallelize",
           "keep_local_units", "local_units", "materialize", "matmul_modules", "parallelize"]
