"""Pipeline stages built by hand from a partition, run by torch's pipeline schedules.

A partition is a list of stages, each a list of unit names over the model's declared chain
(`model.units()`: `retrieval`, `blocks.0`, ..., `head`). Each stage becomes a `StageModule`
that holds its units under their model names (so `blocks.1.attn.q_proj.weight` keeps its
name, and checkpoints do not depend on the layout) and a `torch.distributed.pipelining.
PipelineStage`. torch's schedules (`ScheduleGPipe`, `Schedule1F1B`, interleaved and
zero-bubble) run the forward and backward of every micro-batch.

What crosses a stage boundary is the model's carry, a tuple of tensors; the first stage
takes the batch's tensors positionally (in sorted key order) and rebuilds the dict. Stage
inputs and outputs are given to torch up front (static metadata), found once by running
one micro-batch through the chain stage by stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import pipelining as pp
from torch.distributed.tensor import DTensor

from trainers.parallel.mesh import ParallelConfigError

# name -> (torch schedule class, stages per rank: "one" or "many", rank layout "loop" or "v")
SCHEDULES: dict[str, tuple[type, str, str]] = {
    "gpipe": (pp.ScheduleGPipe, "one", "loop"),
    "1f1b": (pp.Schedule1F1B, "one", "loop"),
    "interleaved_1f1b": (pp.ScheduleInterleaved1F1B, "many", "loop"),
    "looped_bfs": (pp.ScheduleLoopedBFS, "many", "loop"),
    "interleaved_zero_bubble": (pp.ScheduleInterleavedZeroBubble, "many", "loop"),
    "zbv_zero_bubble": (pp.ScheduleZBVZeroBubble, "many", "v"),
}
if hasattr(pp, "ScheduleDualPipeV"):
    SCHEDULES["dualpipev"] = (pp.ScheduleDualPipeV, "many", "v")


class PartitionError(ParallelConfigError):
    """A partition that does not cover the model's chain, or splits a co-location group."""


@dataclass(kw_only=True)
class PipelineConfig:
    """How the model is cut and scheduled.

    Args:
        stages: unit names per stage, in chain order (e.g. [["retrieval", "blocks.0"],
            ["blocks.1", "head"]]). With `pp` ranks, a "one"-stage-per-rank schedule needs
            `pp` stages; interleaved and V schedules take a multiple of `pp`. None: not
            chosen yet (the strategy's `partition="auto"` fills it in at setup).
        schedule: one of `SCHEDULES`.
        num_microbatches: micro-batches per step; must divide the (per-replica) batch.
        split_tied_weights: allow co-located units that share a parameter (tied embeddings)
            on different stages; each holder keeps a copy and their gradients are summed
            after every step, so the copies stay equal.
    """

    stages: list[list[str]] | None
    schedule: str = "1f1b"
    num_microbatches: int = 1
    split_tied_weights: bool = False

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ParallelConfigError(
                f"schedule={self.schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}"
            )
        if self.num_microbatches < 1:
            raise ParallelConfigError(f"num_microbatches must be >= 1, got {self.num_microbatches}")
        if self.stages is not None and (not self.stages or any(not s for s in self.stages)):
            raise PartitionError(f"every stage needs at least one unit, got stages={self.stages}")

    @property
    def num_stages(self) -> int:
        return len(self.stages)


def check_partition(stages: list[list[str]], chain: list[str],
                    colocation_groups: list[list[str]] = ()) -> None:
    """Raise `PartitionError` unless `stages` cut `chain` into contiguous pieces, in order,
    each unit once, with every co-location group inside one stage."""
    flat = [name for stage in stages for name in stage]
    if flat != list(chain):
        unknown = sorted(set(flat) - set(chain))
        missing = [name for name in chain if name not in flat]
        raise PartitionError(
            f"partition {stages} must list the model's units once each, in chain order "
            f"{chain}; unknown: {unknown}, missing: {missing}"
        )
    stage_of = {name: index for index, stage in enumerate(stages) for name in stage}
    for group in colocation_groups:
        where = {name: stage_of[name] for name in group}
        if len(set(where.values())) > 1:
            raise PartitionError(
                f"co-location group {group} is split across stages {where}; these units "
                f"share weights or the retrieval sub-graph and must be in one stage"
            )


def check_schedule(config: PipelineConfig, pp_size: int) -> None:
    """The schedule / stage count / micro-batch combinations torch accepts, checked early."""
    _, per_rank, layout = SCHEDULES[config.schedule]
    n, m = config.num_stages, config.num_microbatches
    if per_rank == "one" and n != pp_size:
        raise ParallelConfigError(
            f"schedule={config.schedule!r} runs one stage per pipeline rank: the partition "
            f"has {n} stages but pipeline_parallel_size={pp_size}; use {pp_size} stages or an "
            f"interleaved schedule"
        )
    if per_rank == "many" and n % pp_size:
        raise ParallelConfigError(
            f"schedule={config.schedule!r} needs a multiple of pipeline_parallel_size="
            f"{pp_size} stages, got {n}"
        )
    if layout == "v" and n != 2 * pp_size:
        raise ParallelConfigError(
            f"schedule={config.schedule!r} needs exactly 2 stages per rank "
            f"({2 * pp_size} stages), got {n}"
        )
    if config.schedule in ("1f1b", "dualpipev") and m < n:
        raise ParallelConfigError(
            f"schedule={config.schedule!r} needs num_microbatches >= the number of stages "
            f"({n}), got {m}"
        )
    if config.schedule in ("interleaved_1f1b", "interleaved_zero_bubble"):
        rounds = max(1, m // pp_size)
        if m % rounds:
            raise ParallelConfigError(
                f"schedule={config.schedule!r} needs num_microbatches to be a multiple of "
                f"max(1, num_microbatches // pipeline_parallel_size) = {rounds}, got {m}"
            )


def check_batch(batch_size: int, num_microbatches: int) -> None:
    if batch_size % num_microbatches:
        raise ParallelConfigError(
            f"batch size {batch_size} is not divisible by num_microbatches={num_microbatches}"
        )


def stage_ranks(num_stages: int, pp_size: int, schedule: str) -> list[int]:
    """The pipeline rank that holds each stage: round-robin, or V-shaped (0..p-1, p-1..0)."""
    if SCHEDULES[schedule][2] == "loop":
        return [stage % pp_size for stage in range(num_stages)]
    return [s if s < pp_size else 2 * pp_size - 1 - s for s in range(num_stages)]


class StageModule(nn.Module):
    """The units of one stage, kept under their model names, run in chain order.

    The first stage takes the batch tensors positionally (`batch_keys` order) and gives the
    first unit the batch dict; every other unit takes and returns the carry tuple.
    """

    def __init__(self, units: list[tuple[str, nn.Module]], *,
                 batch_keys: tuple[str, ...] | None = None) -> None:
        super().__init__()
        self.unit_names = [name for name, _ in units]
        self.batch_keys = batch_keys
        for name, unit in units:
            _set_submodule(self, name, unit)

    def forward(self, *args: torch.Tensor):
        names = self.unit_names
        carry = args
        if self.batch_keys is not None:
            carry = self.get_submodule(names[0])(dict(zip(self.batch_keys, args, strict=True)))
            names = names[1:]
        for name in names:
            carry = self.get_submodule(name)(*carry)
        return carry


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Place `module` at dotted `path`, creating plain containers on the way."""
    *parents, leaf = path.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    node.add_module(leaf, module)


def microbatch_loss(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The training loss of one micro-batch from the head's (b, 2) per-example losses and
    the schedule's `target`, here (b,) per-example weights: sum_i w_i (gen_i + ret_i).

    torch's schedules divide gradients by the micro-batch count m; `Pipeline.step` gives
    each real row m / rows (padding rows 0), so the step's gradient is that of the mean
    over the real rows, as in `RAGModel.forward`."""
    return (losses.float().sum(dim=-1) * weights).sum()


@dataclass
class _TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool

    @classmethod
    def of(cls, t: torch.Tensor) -> _TensorSpec:
        return cls(tuple(t.shape), t.dtype, t.requires_grad)

    def example(self, device: torch.device) -> torch.Tensor:
        """Zeros (valid as labels, masks and ids alike), flagged as the real tensor is."""
        t = torch.zeros(self.shape, dtype=self.dtype, device=device)
        return t.requires_grad_(self.requires_grad) if t.is_floating_point() else t


@dataclass
class Pipeline:
    """This rank's stages of the model and the torch schedule that runs them.

    Build with `build_pipeline`. `step(batch)` runs forward and backward of every
    micro-batch and leaves gradients (already averaged over micro-batches) in `.grad`.
    """

    config: PipelineConfig
    modules: list[StageModule]
    stages: list[pp.PipelineStage]
    schedule: object
    batch_keys: tuple[str, ...]
    batch_size: int
    pp_group: dist.ProcessGroup | None = None
    split_ties: list[_SplitTie] = field(default_factory=list)
    autocast: torch.dtype | None = None  # the autocast dtype it was built under (None: off)
    has_first: bool = field(init=False)
    has_last: bool = field(init=False)

    def __post_init__(self) -> None:
        self.has_first = any(stage.is_first for stage in self.stages)
        self.has_last = any(stage.is_last for stage in self.stages)

    def parameters(self):
        for module in self.modules:
            yield from module.parameters()

    def named_parameters(self):
        """(model name, parameter) for every parameter this rank holds."""
        for module in self.modules:
            yield from module.named_parameters()

    def norm_parameters(self, parameters=None) -> list[nn.Parameter]:
        """This rank's parameters (or those of `parameters`), less tied copies another rank
        counts: summed over the pipeline ranks, each parameter enters a gradient norm once."""
        skip = {id(t.param) for t in self.split_ties if t.held and not t.counts}
        return [p for p in (parameters or self.parameters()) if id(p) not in skip]

    @torch.no_grad()
    def _sum_split_tie_grads(self) -> None:
        """Every holder of a tied parameter gets the sum of all holders' gradients, added in
        the same order everywhere (so the copies stay equal). Under FSDP2 each holder's
        gradient is already its dp shard, averaged over dp, and the shards of all copies
        cover the same rows: summing the shards of the pipeline ranks is enough."""
        for tie in self.split_ties:
            if tie.held:
                if tie.param.grad is None:
                    tie.param.grad = torch.zeros_like(tie.param)
                grad = tie.param.grad
                parts = _exchange(_local(grad), tie.ranks, self.pp_group)
                total = parts[0].clone()
                for part in parts[1:]:
                    total += part
                _local(grad).copy_(total)

    def step(self, batch: dict[str, torch.Tensor],
             weights: torch.Tensor | None = None) -> torch.Tensor | None:
        """Forward + backward over the micro-batches of `batch` (exactly `batch_size` rows);
        returns the per-example (B, 2) losses on the rank that holds the last stage, None
        elsewhere. `weights` (B,): each row's weight in the step's loss (0 for padding);
        by default 1 / B, the batch mean."""
        if weights is None:
            weights = torch.full((self.batch_size,), 1 / self.batch_size)
        losses = self._run(batch, self.schedule.step, weights)
        self._sum_split_tie_grads()
        return losses

    def evaluate(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Forward only (no gradients), same return as `step`."""
        with torch.no_grad():
            return self._run(batch, self.schedule.eval,
                             torch.full((self.batch_size,), 1 / self.batch_size))

    def _run(self, batch: dict[str, torch.Tensor], run, weights: torch.Tensor
             ) -> torch.Tensor | None:
        batch_size = len(batch[self.batch_keys[0]])
        if batch_size != self.batch_size:
            raise ParallelConfigError(
                f"the pipeline was built for batches of {self.batch_size} (stage shapes are "
                f"fixed when it is built), got {batch_size}; pad smaller batches to "
                f"{self.batch_size} rows (PipelineStrategy does) and keep one batch size"
            )
        running = autocast_dtype(self.stages[0].device)
        if running != self.autocast:
            raise ParallelConfigError(
                f"the pipeline was built with autocast {_named(self.autocast)} and runs with "
                f"autocast {_named(running)}: the dtypes its stages send are fixed when it is "
                f"built; build and run it under the same precision context"
            )
        kwargs = {}
        if self.has_last:  # the schedule splits `target` into micro-batches with the batch
            kwargs["target"] = (weights * self.config.num_microbatches).to(self.stages[0].device)
        args = tuple(batch[k] for k in self.batch_keys) if self.has_first else ()
        output = run(*args, **kwargs)
        return output.detach() if self.has_last else None


def build_pipeline(model: nn.Module, config: PipelineConfig, example_batch: dict, *,
                   pp_group: dist.ProcessGroup, device: torch.device,
                   parallelize: Callable[[nn.Module], object] | None = None,
                   ties: list[Tie] | None = None) -> Pipeline:
    """Cut `model` (it must have `units()` and may have `colocation_groups()`) into the
    stages of `config`, keep this rank's, and set up the schedule.

    `example_batch` is one full (per-replica) batch; its first micro-batch fixes the shapes
    that cross stage boundaries. `parallelize` (e.g. tensor parallelism) is applied to each
    local stage module before anything runs. `ties` (from `tied_parameters`) is for a model
    whose remote units were already dropped; by default it is found on `model`. Every rank
    of `pp_group` must call this together.
    """
    units = dict(model.units())
    ties = tied_parameters(units) if ties is None else ties
    check_partition(config.stages, list(units), binding_groups(model, config, ties))
    pp_size = dist.get_world_size(pp_group)
    check_schedule(config, pp_size)
    batch_keys = tuple(sorted(k for k, v in example_batch.items() if isinstance(v, torch.Tensor)))
    batch_size = len(example_batch[batch_keys[0]])
    check_batch(batch_size, config.num_microbatches)

    owners = stage_ranks(config.num_stages, pp_size, config.schedule)
    pp_rank = dist.get_rank(pp_group)
    local = [s for s in range(config.num_stages) if owners[s] == pp_rank]
    modules = {
        s: StageModule([(name, units[name]) for name in config.stages[s]],
                       batch_keys=batch_keys if s == 0 else None).to(device)
        for s in local
    }
    for module in modules.values():
        if parallelize is not None:
            parallelize(module)
    micro = config.num_microbatches
    first_micro = tuple(example_batch[k][: batch_size // micro].to(device) for k in batch_keys)
    io = _infer_stage_io(modules, owners, first_micro, pp_group, device)
    stages = [
        pp.PipelineStage(modules[s], s, config.num_stages, device,
                         input_args=io[s][0], output_args=io[s][1], group=pp_group)
        for s in local
    ]
    schedule_cls, per_rank, _ = SCHEDULES[config.schedule]
    stage_arg = stages[0] if per_rank == "one" else stages
    schedule = schedule_cls(stage_arg, n_microbatches=micro, loss_fn=microbatch_loss)
    stage_of = {name: index for index, names in enumerate(config.stages) for name in names}
    split = [t for t in (_split_tie(tie, modules, owners, stage_of, pp_group) for tie in ties)
             if t is not None]
    return Pipeline(config, [modules[s] for s in local], stages, schedule, batch_keys, batch_size,
                    pp_group, split, autocast_dtype(device))


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The dtype autocast computes in on `device` now, None where it is off. The stages'
    receive buffers take the dtypes of the build's trial run: a boundary tensor made by an
    autocast op (e.g. bf16 document scores) must have the same dtype when the pipeline runs,
    or torch's stages receive it into buffers of the other dtype without an error."""
    kind = torch.device(device).type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def _named(dtype: torch.dtype | None) -> str:
    return "off" if dtype is None else f"on ({str(dtype).removeprefix('torch.')})"


def binding_groups(model: nn.Module, config: PipelineConfig,
                   ties: list[Tie]) -> list[list[str]]:
    """The model's co-location groups that this config must keep whole: all of them, less
    the tied-weight groups when `split_tied_weights` is set."""
    groups = model.colocation_groups() if hasattr(model, "colocation_groups") else []
    if not config.split_tied_weights:
        return groups
    return [g for g in groups if not any(set(g) >= set(tie.holders) for tie in ties)]


@dataclass
class Tie:
    """A parameter that more than one unit holds (tied weights)."""

    param: nn.Parameter  # as built, before any sharding
    paths: dict[str, str]  # holder unit -> the parameter's model name through it, chain order

    @property
    def holders(self) -> list[str]:
        return list(self.paths)


def tied_parameters(units: dict[str, nn.Module]) -> list[Tie]:
    """Parameters that more than one unit holds, with their names through each holder."""
    ties: dict[int, Tie] = {}
    for name, unit in units.items():
        for local_name, param in unit.named_parameters(remove_duplicate=False):
            tie = ties.setdefault(id(param), Tie(param, {}))
            tie.paths.setdefault(name, f"{name}.{local_name}")
    return [tie for tie in ties.values() if len(tie.paths) > 1]


@dataclass
class _SplitTie:
    """A tied parameter whose holders are on several pipeline ranks: this rank's copy (as
    it is now: plain, or an FSDP2 shard over dp, sharded alike on every holder), the
    holders' pipeline ranks, and whether this rank counts it in gradient norms."""

    param: nn.Parameter | None  # None where this rank holds no copy
    ranks: list[int]
    counts: bool

    @property
    def held(self) -> bool:
        return self.param is not None


def _split_tie(tie: Tie, modules: dict[int, StageModule], owners: list[int],
               stage_of: dict[str, int], pp_group: dist.ProcessGroup) -> _SplitTie | None:
    """The tie as this rank sees it, if its holders are on more than one pipeline rank; every
    copy then starts from the first holder's values."""
    ranks = sorted({owners[stage_of[unit]] for unit in tie.holders})
    if len(ranks) == 1:
        return None
    local = {modules[stage_of[unit]].get_parameter(path) for unit, path in tie.paths.items()
             if stage_of[unit] in modules}
    assert len(local) <= 1, f"one copy of a split tied weight per rank, got {len(local)}"
    pp_rank = dist.get_rank(pp_group)
    split = _SplitTie(next(iter(local), None), ranks, counts=pp_rank == ranks[0])
    if split.held:
        with torch.no_grad():
            first = _exchange(_local(split.param), ranks, pp_group)[0]
            _local(split.param).copy_(first)
    return split


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t` (its FSDP2 shard), writable in place."""
    return t.to_local() if isinstance(t, DTensor) else t


def _exchange(tensor: torch.Tensor, ranks: list[int], group: dist.ProcessGroup
              ) -> list[torch.Tensor]:
    """Every pipeline rank of `ranks` (this one among them) sends `tensor` to the others:
    their tensors, in `ranks` order."""
    me = dist.get_rank(group)
    parts = {rank: tensor if rank == me else torch.empty_like(tensor) for rank in ranks}
    ops = []
    for rank in ranks:
        if rank != me:
            peer = dist.get_global_rank(group, rank)
            ops += [dist.P2POp(dist.isend, tensor.contiguous(), peer, group),
                    dist.P2POp(dist.irecv, parts[rank], peer, group)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return [parts[rank] for rank in ranks]


def _infer_stage_io(modules: dict[int, StageModule], owners: list[int], first_micro: tuple,
                    pp_group: dist.ProcessGroup, device: torch.device) -> dict[int, tuple]:
    """Example (inputs, outputs) of each local stage, found by running one micro-batch
    stage by stage; shapes travel between ranks as small objects.

    Later stages run on zeros of the right shape: values do not matter, but whether each
    output needs a gradient does, so this runs with autograd on and nothing is kept."""
    pp_rank = dist.get_rank(pp_group)
    io: dict[int, tuple] = {}
    specs: list[_TensorSpec] | None = None
    for s, owner in enumerate(owners):
        if owner != pp_rank:
            continue
        if s == 0:
            inputs = first_micro
        else:
            if owners[s - 1] != pp_rank:
                received = [None]
                dist.recv_object_list(received, src=dist.get_global_rank(pp_group, owners[s - 1]),
                                      group=pp_group, device=device)
                specs = received[0]
            inputs = tuple(spec.example(device) for spec in specs)
        with torch.enable_grad():
            outputs = modules[s](*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        specs = [_TensorSpec.of(t) for t in outputs]
        io[s] = (tuple(_detached(t) for t in inputs), tuple(spec.example(device) for spec in specs))
        if s + 1 < len(owners) and owners[s + 1] != pp_rank:
            dist.send_object_list([specs], dst=dist.get_global_rank(pp_group, owners[s + 1]),
                                  group=pp_group, device=device)
    return io


def _detached(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(t.requires_grad) if t.is_floating_point() else t.detach()
