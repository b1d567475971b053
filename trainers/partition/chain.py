"""The input of the partitioner: an ordered chain of units with costs, and groups.

A unit is the smallest piece the partitioner places: a module (or a run of modules) that
stays whole. Costs are per micro-batch of ``CostChain.microbatch_size`` samples. Groups are
sets of units that must share a stage; since stages are contiguous, a group forbids every
cut between its first and last unit.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace


@dataclass(frozen=True, kw_only=True)
class UnitCost:
    """Costs of one unit for one micro-batch.

    fwd_ms, bwd_ms: forward and backward compute time.
    param_count, param_bytes: parameters owned (shared ones counted once, by the first user).
    low_precision_param_count: how many of them the runtime gathers in a lower precision
        than they are stored in (under bf16-mixed its FSDP2 groups of the attention and MLP
        layers gather bf16 copies of fp32 weights); ``MemoryModel.low_precision_bytes``.
    state_bytes: other fixed memory (buffers; or, for plain lists, all static memory).
    act_bytes: activation bytes kept from forward until backward.
    recompute_bytes: under activation checkpointing, the bytes the unit's recomputed
        forward rebuilds and holds during its backward (one such block at a time per rank);
        0 when it is not checkpointed.
    out_bytes: bytes of the output sent to the next unit (a stage boundary's transfer).
    flops: forward + backward floating point operations, when known.
    weight_grad_ms: the part of ``bwd_ms`` that computes weight gradients of matmul weights
        (their GEMMs' second backward product, as long as their forward GEMM); a schedule
        that splits the backward runs it apart, as a W action, and the rest (``bwd_ms -
        weight_grad_ms``) as the I action. 0 when unknown: the whole backward is I.
    modules: names of the modules the unit covers.
    is_layer: part of a "layer" (a repeated block) for the equal-layer-count baseline.
    layer: the layer (or other whole item) this unit is a piece of; consecutive units with
        the same ``layer`` form one item the baselines never cut. None: the unit alone.
    """

    name: str
    fwd_ms: float
    bwd_ms: float
    param_count: int = 0
    param_bytes: float = 0.0
    low_precision_param_count: int = 0
    state_bytes: float = 0.0
    act_bytes: float = 0.0
    recompute_bytes: float = 0.0
    out_bytes: float = 0.0
    flops: float = 0.0
    weight_grad_ms: float = 0.0
    modules: tuple[str, ...] = ()
    is_layer: bool = True
    layer: str | None = None

    def __post_init__(self) -> None:
        for key in ("fwd_ms", "bwd_ms", "param_count", "param_bytes",
                    "low_precision_param_count", "state_bytes",
                    "act_bytes", "recompute_bytes", "out_bytes", "flops", "weight_grad_ms"):
            if getattr(self, key) < 0:
                raise ValueError(f"unit {self.name!r}: {key}={getattr(self, key)} must be >= 0")
        if self.weight_grad_ms > self.bwd_ms * (1 + 1e-9):
            raise ValueError(f"unit {self.name!r}: weight_grad_ms={self.weight_grad_ms} exceeds "
                             f"bwd_ms={self.bwd_ms}, of which it is a part")

    @property
    def compute_ms(self) -> float:
        return self.fwd_ms + self.bwd_ms


@dataclass(frozen=True, kw_only=True)
class MemoryModel:
    """Bytes a stage holds besides activations.

    grad_bytes_per_param: gradient bytes per parameter; None means the parameter's own dtype.
    optimizer_bytes_per_param: optimizer state; Adam keeps two fp32 moments = 8.
    master_bytes_per_param: an fp32 master copy under mixed precision (4), else 0.
    data_parallel_shards: FSDP2 over this many data-parallel ranks (the runtime's
        ``fully_shard`` on the "dp" mesh axis); 1 for none. It divides the optimizer state
        and the parameters at rest by it.
    deferred_gradient_sync: with data_parallel_shards > 1, the stage's parameters and
        gradients are also held whole during a step, as the runtime runs them:
        ``torch.distributed.pipelining`` backs every micro-batch of an FSDP2 stage through
        without gradient sync and without resharding (``PipelineStage.
        backward_maybe_with_nosync``: ``set_requires_gradient_sync(False)``,
        ``set_reshard_after_backward(False)``) and reduce-scatters once after the last
        (``perform_reduce_grad``), so from the first backward to the step's end every rank
        holds the unsharded parameters and their unsharded gradients beside its shards.
        False: ZeRO-3 / FSDP with a reduce-scatter every backward (parameters, gradients
        and optimizer state all divided by the shards).
    low_precision_bytes: bytes per parameter of the whole copy that FSDP2 gathers of a
        unit's ``low_precision_param_count`` parameters and holds during the step (2: the
        runtime's bf16 MixedPrecisionPolicy on its attention and MLP layers under
        bf16-mixed, ``trainers.parallel.parallelize``); None: their stored dtype. Their
        whole gradients stay in the stored dtype: FSDP2 accumulates them in its fp32 reduce
        dtype while sync is deferred (``FSDPParam.to_accumulated_grad_if_needed``).
    """

    grad_bytes_per_param: float | None = None
    optimizer_bytes_per_param: float = 8.0
    master_bytes_per_param: float = 0.0
    data_parallel_shards: int = 1
    deferred_gradient_sync: bool = True
    low_precision_bytes: float | None = None

    def __post_init__(self) -> None:
        if self.low_precision_bytes is not None and self.low_precision_bytes < 0:
            raise ValueError(f"low_precision_bytes={self.low_precision_bytes} must be >= 0")
        for key in ("optimizer_bytes_per_param", "master_bytes_per_param"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 0")
        if self.grad_bytes_per_param is not None and self.grad_bytes_per_param < 0:
            raise ValueError(f"grad_bytes_per_param={self.grad_bytes_per_param} must be >= 0")
        if self.data_parallel_shards < 1:
            raise ValueError(f"data_parallel_shards={self.data_parallel_shards} must be >= 1")

    def static_bytes(self, unit: UnitCost) -> float:
        grads = (unit.param_bytes if self.grad_bytes_per_param is None
                 else unit.param_count * self.grad_bytes_per_param)
        per_param = self.optimizer_bytes_per_param + self.master_bytes_per_param
        shards = self.data_parallel_shards
        optimizer = unit.param_count * per_param / shards
        if shards > 1 and self.deferred_gradient_sync:
            weights = unit.param_bytes
            if self.low_precision_bytes is not None and unit.low_precision_param_count:
                stored = unit.param_bytes / unit.param_count  # bytes a parameter at rest
                weights -= unit.low_precision_param_count * (stored - self.low_precision_bytes)
            whole = weights + grads  # unsharded during the step
            return unit.param_bytes / shards + whole + optimizer + unit.state_bytes
        return (unit.param_bytes + grads) / shards + optimizer + unit.state_bytes


@dataclass(frozen=True, kw_only=True)
class CostChain:
    """Ordered units plus groups of unit indices that must share a stage.

    microbatch_size: samples per micro-batch the costs describe; None if unknown.
    source: "measured", "analytic" or "given".
    """

    units: tuple[UnitCost, ...]
    groups: tuple[tuple[int, ...], ...] = ()
    microbatch_size: int | None = None
    source: str = "given"
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.units:
            raise ValueError("the chain has no units")
        names = [u.name for u in self.units]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"unit names must be unique; repeated: {dup}")
        for group in self.groups:
            bad = [i for i in group if not 0 <= i < len(self.units)]
            if bad:
                raise ValueError(f"group {group} has unit indices {bad} outside "
                                 f"0..{len(self.units) - 1}")
        if self.microbatch_size is not None and self.microbatch_size < 1:
            raise ValueError(f"microbatch_size={self.microbatch_size} must be >= 1")

    def __len__(self) -> int:
        return len(self.units)

    def allowed_cuts(self) -> tuple[int, ...]:
        """Positions k (1..n-1) where a stage may start: no group spans units k-1 and k."""
        blocked = set()
        for group in self.groups:
            blocked.update(range(min(group) + 1, max(group) + 1))
        return tuple(k for k in range(1, len(self.units)) if k not in blocked)

    def num_segments(self) -> int:
        """Most stages this chain can be cut into."""
        return len(self.allowed_cuts()) + 1

    def scaled(self, factor: float) -> CostChain:
        """Costs for micro-batches ``factor`` times larger (time and activations linear)."""
        units = tuple(replace(u, fwd_ms=u.fwd_ms * factor, bwd_ms=u.bwd_ms * factor,
                              weight_grad_ms=u.weight_grad_ms * factor,
                              act_bytes=u.act_bytes * factor, out_bytes=u.out_bytes * factor,
                              recompute_bytes=u.recompute_bytes * factor,
                              flops=u.flops * factor) for u in self.units)
        size = None if self.microbatch_size is None else self.microbatch_size * factor
        return replace(self, units=units,
                       microbatch_size=None if size is None else max(1, round(size)))

    def index_of(self, name: str) -> int:
        """Index of the unit called ``name`` (ValueError naming close matches if absent)."""
        for i, unit in enumerate(self.units):
            if unit.name == name:
                return i
        raise ValueError(f"no unit named {name!r}; close: "
                         f"{difflib.get_close_matches(name, [u.name for u in self.units])}")

    @classmethod
    def from_lists(cls, compute_ms, memory_bytes, *, act_bytes=None, out_bytes=None,
                   params=None, groups=(), names=None, backward_share: float = 2 / 3,
                   microbatch_size: int | None = None) -> CostChain:
        """A chain from plain lists.

        compute_ms: forward + backward time per unit, split by ``backward_share``.
        memory_bytes: static bytes per unit (parameters, gradients, optimizer state).
        params: parameter counts for the balanced-parameter baseline (default: memory).
        groups: lists of unit indices or names that must share a stage.
        """
        n = len(compute_ms)
        if len(memory_bytes) != n:
            raise ValueError(f"memory_bytes has {len(memory_bytes)} entries; compute_ms has {n}")
        for label, values in (("act_bytes", act_bytes), ("out_bytes", out_bytes),
                              ("params", params), ("names", names)):
            if values is not None and len(values) != n:
                raise ValueError(f"{label} has {len(values)} entries; compute_ms has {n}")
        if not 0.0 <= backward_share <= 1.0:
            raise ValueError(f"backward_share={backward_share} must be within [0, 1]")
        names = list(names) if names is not None else [f"unit{i}" for i in range(n)]
        units = tuple(
            UnitCost(name=names[i], fwd_ms=compute_ms[i] * (1 - backward_share),
                     bwd_ms=compute_ms[i] * backward_share,
                     param_count=int(params[i]) if params is not None else 0,
                     state_bytes=float(memory_bytes[i]),
                     act_bytes=float(act_bytes[i]) if act_bytes is not None else 0.0,
                     out_bytes=float(out_bytes[i]) if out_bytes is not None else 0.0,
                     modules=(names[i],))
            for i in range(n))
        chain = cls(units=units, microbatch_size=microbatch_size)
        resolved = tuple(tuple(g if isinstance(g, int) else chain.index_of(g) for g in group)
                         for group in groups)
        return replace(chain, groups=resolved)

    def item_starts(self) -> tuple[int, ...]:
        """Unit indices that begin a whole item (a layer, or a unit of its own)."""
        units = self.units
        return tuple(i for i in range(len(units)) if i == 0 or units[i].layer is None
                     or units[i].layer != units[i - 1].layer)

    def param_weights(self) -> list[float]:
        """Weights for the balanced-parameter baseline: counts, else static bytes."""
        if any(u.param_count for u in self.units):
            return [float(u.param_count) for u in self.units]
        return [u.state_bytes + u.param_bytes for u in self.units]


def checkpointed_layers(chain: CostChain, activation_checkpointing) -> tuple[str, ...]:
    """The layers (repeated blocks, ``UnitCost.layer``, in chain order) that
    ``activation_checkpointing`` wraps.

    None, "off" or 0: none. "full" or 1: every block. An int n >= 2: every n-th block, the
    ones whose 1-based position is a multiple of n (torchtitan's ``selective_ac_option``
    counter). A sequence of layer names: exactly those.
    """
    layers = list(dict.fromkeys(u.layer for u in chain.units if u.is_layer and u.layer))
    value = activation_checkpointing
    if value is None or value == "off":
        return ()
    if value == "full":
        value = 1
    if isinstance(value, (bool, str)):
        raise ValueError(  # noqa: TRY004 - a user's value, refused like the others
            f"activation_checkpointing={value!r}: valid: 'off', 'full', an int >= 0 (every "
            f"n-th block; 0 = off, 1 = every block) or block names")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"activation_checkpointing={value}: must be >= 0 (0 = off, "
                             f"1 = every block, n = every n-th block)")
        return tuple(layers[value - 1::value]) if value else ()
    names = tuple(value)
    unknown = [n for n in names if n not in layers]
    if unknown:
        shown = layers if len(layers) <= 6 else [*layers[:3], "...", *layers[-2:]]
        raise ValueError(f"activation_checkpointing names {unknown}, which are not blocks of "
                         f"the chain; blocks: {shown}")
    return tuple(n for n in layers if n in names)


def with_activation_checkpointing(chain: CostChain, activation_checkpointing) -> CostChain:
    """The chain's costs with the blocks ``activation_checkpointing`` names checkpointed
    (``checkpointed_layers``), as ``torch.utils.checkpoint`` runs them:

    * kept for backward: only the block's input (the output of the unit before it; the
      block's own output when it is the first unit), put on its first unit;
    * backward: one more forward first (``bwd_ms += fwd_ms``, ``flops`` + the forward's
      share), whose activations (the block's ``act_bytes`` without checkpointing) live
      until that backward ends: ``recompute_bytes``, on every unit of the block.
    """
    chosen = set(checkpointed_layers(chain, activation_checkpointing))
    if not chosen:
        return chain
    units = list(chain.units)
    for layer in chosen:
        idx = [i for i, u in enumerate(units) if u.layer == layer]
        first = idx[0]
        full = sum(units[i].act_bytes for i in idx)
        kept = units[first - 1].out_bytes if first > 0 else units[first].out_bytes
        for i in idx:
            u = units[i]
            fwd_flops = u.flops * u.fwd_ms / u.compute_ms if u.compute_ms > 0 else 0.0
            units[i] = replace(u, act_bytes=kept if i == first else 0.0,
                               recompute_bytes=full, bwd_ms=u.bwd_ms + u.fwd_ms,
                               flops=u.flops + fwd_flops)
    return replace(chain, units=tuple(units),
                   notes=chain.notes + (f"activation checkpointing: {len(chosen)} blocks",))
