"""Profile a model: one forward and backward of a real micro-batch, module by module.

Every top-level torch call is an *op*. A ``TorchFunctionMode`` times each op's forward
(median of several runs), notes which modules are on the call stack, and tags the autograd
nodes the op created; hooks on those nodes time the backward of the same op. Saved-tensor
hooks count the activation bytes each op keeps for backward (each storage once, parameters
excluded). Summing ops gives each module's inclusive forward/backward time, FLOPs and
activation bytes, and the part of the backward that is weight gradients (``wgrad_ms``: half
the backward of a matmul by a parameter, its second GEMM product); ops a parent runs itself
between its children ("glue": a residual add, the loss) are kept apart, keyed by the child
that runs next, so a unit chain can hand them to the right unit. Parameters reached from
several modules are found by identity.

``analytic=True`` costs the same pass from shapes instead of clocks (``costs.ShapeOnlyMode``),
so a model built on the meta device is costed on a CPU.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from trainers.partition.costs import (
    CountingMode,
    DeviceSpec,
    ShapeOnlyMode,
    logical_bytes,
    median,
    placeholder,
)


@dataclass
class GlueCost:
    """Work a module does itself, outside its children, before ``next_child`` runs
    (None: after the last child)."""

    next_child: str | None
    fwd_ms: float = 0.0
    bwd_ms: float = 0.0
    flops: float = 0.0
    act_bytes: float = 0.0
    wgrad_ms: float = 0.0


@dataclass
class ModuleRecord:
    """One module of the tree (inclusive of its children unless said otherwise)."""

    name: str
    type: str
    depth: int
    parent: str | None
    children: list[str]
    param_count: int
    param_bytes: int
    own_param_count: int  # registered on this module itself
    own_param_bytes: int
    buffer_bytes: int
    input_shapes: list = field(default_factory=list)
    output_shapes: list = field(default_factory=list)
    input_bytes: float = 0.0
    output_bytes: float = 0.0
    fwd_ms: float = 0.0
    bwd_ms: float = 0.0
    flops: float = 0.0
    act_bytes: float = 0.0
    wgrad_ms: float = 0.0  # the part of bwd_ms that computes matmul weights' gradients
    order: int = -1  # position of its first call; -1 if never called
    calls: int = 0
    glue: list[GlueCost] = field(default_factory=list)
    # Parameters registered here: name, numel, bytes, used, and the child running next at
    # their first use by this module itself (None: after the last child).
    own_params: list[dict] = field(default_factory=list)


@dataclass
class Profile:
    """The traced tree, root named ``""``, in execution order."""

    modules: dict[str, ModuleRecord]
    shared: list[list[str]]  # module names that share a parameter or are the same module
    shared_params: list[dict]  # each shared parameter: {"modules", "numel", "bytes"}
    source: str  # "measured" or "analytic"
    device: str
    batch_size: int | None
    runs: int
    fwd_wall_ms: float = 0.0  # whole-pass times, to judge how much the ops cover
    bwd_wall_ms: float = 0.0
    declared_units: list[str] | None = None
    declared_groups: list[list[str]] = field(default_factory=list)

    @property
    def root(self) -> ModuleRecord:
        return self.modules[""]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Profile:
        modules = {}
        for name, rec in data["modules"].items():
            rec = dict(rec)
            rec["glue"] = [GlueCost(**g) for g in rec.get("glue", [])]
            modules[name] = ModuleRecord(**rec)
        return cls(**{**data, "modules": modules})


# Torch calls that multiply by their weight: with a parameter of 2 or more dimensions among
# the arguments, their backward is two products of the forward's size, one for the input's
# gradient and one for the weight's (a split-backward schedule's I and W).
WEIGHT_MATMULS = frozenset({"linear", "matmul", "mm", "addmm", "bmm", "baddbmm", "einsum",
                            "__matmul__", "__rmatmul__", "conv1d", "conv2d", "conv3d"})


@dataclass
class _Op:
    stack: tuple[str, ...]
    params: tuple[int, ...] = ()
    fwd_ms: float = 0.0
    bwd_ms: float = 0.0
    flops: float = 0.0
    act_bytes: float = 0.0
    weight_matmul: bool = False

    @property
    def wgrad_ms(self) -> float:
        return self.bwd_ms / 2 if self.weight_matmul else 0.0


class _Recorder(TorchFunctionMode):
    """Collects ops, their module stacks, timings and saved bytes for one pass."""

    def __init__(self, names: dict[int, str], clock: Callable[[], float],
                 device: DeviceSpec | None, param_keys: set[int], storage_bytes: bool) -> None:
        super().__init__()
        self.names, self.clock, self.device = names, clock, device
        self.param_keys, self.storage_bytes = param_keys, storage_bytes
        self.stack: list[str] = []
        self.ops: list[_Op] = []
        self.current: int | None = None
        self.backward = False
        self.tagged: dict[int, int] = {}
        self.alive: list[Any] = []
        self.saved: set[int] = set()
        self.first_call: dict[str, int] = {}
        self.calls: dict[str, int] = defaultdict(int)
        self.io: dict[str, tuple] = {}
        self.node_start = 0.0
        self.param_names: dict[int, tuple[str, str]] = {}

    # -- forward ------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        index, previous = len(self.ops), self.current
        self.ops.append(_Op(tuple(self.stack)))
        self.current = index
        start = self.clock()
        try:
            out = func(*args, **kwargs)
        finally:
            elapsed = self.clock() - start
            self.current = previous
        leaves = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not leaves:
            self.ops.pop()  # shape queries and the like
            return out
        if self.device is None:
            self.ops[index].fwd_ms += elapsed * 1e3
        params = [t for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, nn.Parameter) and id(t) in self.param_names]
        self.ops[index].params = tuple(id(t) for t in params)
        self.ops[index].weight_matmul = (getattr(func, "__name__", None) in WEIGHT_MATMULS
                                         and any(t.dim() >= 2 for t in params))
        self._tag(leaves, index)
        return out

    def count(self, flops: float, num_bytes: float) -> None:
        """Dispatch-mode sink: costs of one ATen call inside the current op."""
        if self.current is None:
            return
        op = self.ops[self.current]
        op.flops += flops
        if self.device is not None:
            ms = self.device.op_ms(flops, num_bytes)
            if self.backward:
                op.bwd_ms += ms
            else:
                op.fwd_ms += ms

    def pack(self, t: torch.Tensor):
        if self.current is not None and not self.backward:
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in self.saved and key not in self.param_keys:
                self.saved.add(key)
                size = storage.nbytes() if self.storage_bytes else t.numel() * t.element_size()
                self.ops[self.current].act_bytes += size
        return t

    # -- backward -----------------------------------------------------------------------
    def _tag(self, leaves, index: int) -> None:
        todo = [t.grad_fn for t in leaves if t.grad_fn is not None]
        while todo:
            node = todo.pop()
            if node is None or id(node) in self.tagged or type(node).__name__ == "AccumulateGrad":
                continue
            self.tagged[id(node)] = index
            self.alive.append(node)
            node.register_prehook(self._enter(index))
            node.register_hook(self._leave(index))
            todo.extend(n for n, _ in node.next_functions)

    def _enter(self, index: int):
        def hook(grad_outputs):
            self.current, self.backward = index, True
            self.node_start = self.clock()
        return hook

    def _leave(self, index: int):
        def hook(grad_inputs, grad_outputs):
            if self.device is None:
                self.ops[index].bwd_ms += (self.clock() - self.node_start) * 1e3
            self.current = None
        return hook

    # -- modules ------------------------------------------------------------------------
    def pre_hook(self, module, args, kwargs):
        name = self.names[id(module)]
        self.stack.append(name)
        self.calls[name] += 1
        if name not in self.first_call:
            self.first_call[name] = len(self.first_call)
            self.io[name] = (_shapes((args, kwargs)), logical_bytes((args, kwargs)))

    def post_hook(self, module, args, kwargs, output):
        name = self.stack.pop()
        if len(self.io[name]) == 2:
            self.io[name] += (_shapes(output), logical_bytes(output))


def _shapes(tree) -> list:
    return [list(t.shape) for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def default_loss(output) -> torch.Tensor:
    """The scalar to differentiate: ``output["loss"]``, a tensor's sum, or a tuple's first."""
    if isinstance(output, dict):
        if "loss" not in output:
            raise ValueError(f"the model returned a dict without 'loss' (keys: {list(output)}); "
                             f"pass loss_fn")
        output = output["loss"]
    if isinstance(output, (tuple, list)):
        output = output[0]
    return output if output.dim() == 0 else output.float().sum()


def trace_model(model: nn.Module, batch, *, runs: int = 5, analytic: bool = False,
                device: DeviceSpec | None = None, loss_fn: Callable = default_loss,
                batch_size: int | None = None) -> Profile:
    """Profile one forward + backward of ``model(batch)`` (a dict/tuple/tensor batch).

    runs: timed passes; each module's times are the median (after one untimed warm-up that
        also counts FLOPs). Ignored when ``analytic``.
    analytic: cost from shapes on ``device`` (default A100-like); works on meta models.
    """
    if runs < 1:
        raise ValueError(f"runs={runs} must be >= 1")
    names = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), name)
    if analytic:
        device = device or DeviceSpec()
        with _placeholders(model):
            records, fwd_wall, bwd_wall = _passes(model, _placeholder_batch(batch), names, 1,
                                                  device, loss_fn)
        source, device_name = "analytic", device.name
    else:
        records, fwd_wall, bwd_wall = _passes(model, batch, names, runs, None, loss_fn)
        source, device_name = "measured", _device_of(model)
    modules = _module_records(model, records)
    declared_units = ([name for name, _ in model.units()]
                      if callable(getattr(model, "units", None)) else None)
    declared_groups = (model.colocation_groups()
                       if callable(getattr(model, "colocation_groups", None)) else [])
    return Profile(modules=modules, shared=shared_modules(model),
                   shared_params=shared_parameters(model), source=source,
                   device=device_name, batch_size=batch_size or _batch_size(batch),
                   runs=1 if analytic else runs, fwd_wall_ms=fwd_wall, bwd_wall_ms=bwd_wall,
                   declared_units=declared_units, declared_groups=declared_groups)


def _passes(model, batch, names, runs, device, loss_fn):
    """Warm-up/counting pass plus timed passes; per-module medians."""
    cuda = any(p.is_cuda for p in model.parameters())

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    param_keys = {p.untyped_storage().data_ptr() for p in model.parameters()}
    counted = _one_pass(model, batch, names, clock, device, loss_fn, param_keys, count=True)
    if device is not None:
        return [counted[0]], counted[1], counted[2]
    timed = [_one_pass(model, batch, names, clock, None, loss_fn, param_keys, count=False)
             for _ in range(runs)]
    for run, _, _ in timed:  # FLOPs come from the counting pass, time from the timed ones
        for name, rec in run.items():
            rec["flops"] = counted[0].get(name, {}).get("flops", 0.0)
            for key, glue in rec["glue"].items():
                glue[2] = counted[0][name]["glue"][key][2] if name in counted[0] else 0.0
    return ([t[0] for t in timed], median([t[1] for t in timed]),
            median([t[2] for t in timed]))


def _one_pass(model, batch, names, clock, device, loss_fn, param_keys, *, count: bool):
    recorder = _Recorder(names, clock, device, param_keys, storage_bytes=device is None)
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            recorder.param_names.setdefault(id(param), (name, pname))
    handles = [m.register_forward_pre_hook(recorder.pre_hook, with_kwargs=True)
               for m in model.modules()]
    handles += [m.register_forward_hook(recorder.post_hook, with_kwargs=True)
                for m in model.modules()]
    counter = None
    if count:
        counter = (ShapeOnlyMode if device is not None else CountingMode)(recorder.count)
    model.zero_grad(set_to_none=True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(recorder.pack, lambda t: t):
            start = clock()
            with recorder, (counter if counter is not None else _null()):
                loss = loss_fn(model(batch))
                middle = clock()
                loss.backward()
            end = clock()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    return _aggregate(recorder), (middle - start) * 1e3, (end - middle) * 1e3


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _aggregate(recorder: _Recorder) -> dict[str, dict]:
    """Per module: inclusive sums over its ops, glue by next child, calls and io."""
    out: dict[str, dict] = {}
    for name in recorder.first_call:
        io = recorder.io[name] + ([], 0.0) * (len(recorder.io[name]) == 2)
        out[name] = {"fwd_ms": 0.0, "bwd_ms": 0.0, "flops": 0.0, "act_bytes": 0.0,
                     "wgrad_ms": 0.0, "order": recorder.first_call[name],
                     "calls": recorder.calls[name], "io": io,
                     "glue": defaultdict(lambda: [0.0, 0.0, 0.0, 0.0, 0.0]), "uses": {}}
    next_child: dict[str, str] = {}
    for op in reversed(recorder.ops):
        if not op.stack:
            continue
        for pid in op.params:  # first use wins: we walk backwards
            owner, pname = recorder.param_names[pid]
            if owner == op.stack[-1]:
                out[owner]["uses"][pname] = next_child.get(owner)
            elif owner in op.stack:
                out[owner]["uses"][pname] = op.stack[op.stack.index(owner) + 1]
        for name in set(op.stack):
            rec = out[name]
            rec["fwd_ms"] += op.fwd_ms
            rec["bwd_ms"] += op.bwd_ms
            rec["flops"] += op.flops
            rec["act_bytes"] += op.act_bytes
            rec["wgrad_ms"] += op.wgrad_ms
        glue = out[op.stack[-1]]["glue"][next_child.get(op.stack[-1])]
        for i, value in enumerate((op.fwd_ms, op.bwd_ms, op.flops, op.act_bytes, op.wgrad_ms)):
            glue[i] += value
        for outer, inner in zip(op.stack, op.stack[1:]):
            next_child[outer] = inner
    return out


def _module_records(model: nn.Module, runs: list[dict]) -> dict[str, ModuleRecord]:
    first = runs[0]
    records = {}
    for name, module in model.named_modules():
        params = list(module.parameters())
        own = list(module.parameters(recurse=False))
        children = [f"{name}.{c}" if name else c for c, _ in module.named_children()]
        children.sort(key=lambda c: (first[c]["order"] if c in first else 1 << 30))
        rec = ModuleRecord(
            name=name, type=type(module).__name__, depth=name.count(".") + (1 if name else 0),
            parent=None if not name else name.rpartition(".")[0],
            children=children, param_count=sum(p.numel() for p in params),
            param_bytes=sum(p.numel() * p.element_size() for p in params),
            own_param_count=sum(p.numel() for p in own),
            own_param_bytes=sum(p.numel() * p.element_size() for p in own),
            buffer_bytes=sum(b.numel() * b.element_size() for b in module.buffers()))
        if name in first:
            in_shapes, in_bytes, out_shapes, out_bytes = first[name]["io"]
            rec.input_shapes, rec.input_bytes = in_shapes, in_bytes
            rec.output_shapes, rec.output_bytes = out_shapes, out_bytes
            rec.order, rec.calls = first[name]["order"], first[name]["calls"]
            for key in ("fwd_ms", "bwd_ms", "flops", "act_bytes", "wgrad_ms"):
                setattr(rec, key, median([r[name][key] for r in runs if name in r]))
            keys = sorted(first[name]["glue"], key=lambda k: (k is None, str(k)))
            uses = first[name]["uses"]
            rec.own_params = [{"name": pname, "numel": p.numel(),
                               "bytes": p.numel() * p.element_size(),
                               "used": pname in uses, "next_child": uses.get(pname)}
                              for pname, p in module.named_parameters(recurse=False)]
            rec.glue = [GlueCost(k, *(median([r[name]["glue"][k][i] for r in runs
                                               if name in r]) for i in range(5)))
                        for k in keys]
        records[name] = rec
    return dict(sorted(records.items(), key=lambda kv: (kv[1].order < 0, kv[1].order)))


def shared_modules(model: nn.Module) -> list[list[str]]:
    """Groups of module names holding the same parameter object, or being the same module."""
    owners: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        for _, param in module.named_parameters(recurse=False):
            if name not in owners[id(param)]:
                owners[id(param)].append(name)
        if name not in owners[-id(module) - 1]:  # the module object itself, by identity
            owners[-id(module) - 1].append(name)
    groups = {tuple(sorted(v)) for v in owners.values() if len(v) > 1}
    return [list(g) for g in sorted(groups)]


def shared_parameters(model: nn.Module) -> list[dict]:
    """Every parameter registered on more than one module, with its size."""
    owners: dict[int, list[str]] = defaultdict(list)
    sizes: dict[int, tuple[int, int]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for _, param in module.named_parameters(recurse=False):
            if name not in owners[id(param)]:
                owners[id(param)].append(name)
            sizes[id(param)] = (param.numel(), param.numel() * param.element_size())
    return [{"modules": sorted(names), "numel": sizes[key][0], "bytes": sizes[key][1]}
            for key, names in owners.items() if len(names) > 1]


def _device_of(model: nn.Module) -> str:
    param = next(model.parameters(), None)
    if param is None or param.device.type == "cpu":
        return "cpu"
    return torch.cuda.get_device_name(param.device) if param.is_cuda else str(param.device)


def _batch_size(batch) -> int | None:
    leaves = [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor) and t.dim()]
    return int(leaves[0].shape[0]) if leaves else None


def _placeholder_batch(batch):
    def convert(t):
        if not isinstance(t, torch.Tensor) or t.device.type != "meta":
            return t
        return placeholder(t) if t.is_floating_point() else torch.zeros(t.shape, dtype=t.dtype)
    return tree_map(convert, batch)


class _placeholders:
    """Swap every parameter and buffer for a CPU placeholder; put them back on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.saved = model, []

    def __enter__(self):
        made: dict[int, Any] = {}
        for module in self.model.modules():
            for store in (module._parameters, module._buffers):
                for key, value in store.items():
                    if value is None:
                        continue
                    if id(value) not in made:
                        made[id(value)] = _placeholder_like(value)
                    self.saved.append((store, key, value))
                    store[key] = made[id(value)]
        return self

    def __exit__(self, *exc):
        for store, key, value in self.saved:
            store[key] = value
        return False


def _placeholder_like(value: torch.Tensor):
    fake = placeholder(value) if value.is_floating_point() else torch.zeros(value.shape,
                                                                            dtype=value.dtype)
    if isinstance(value, nn.Parameter):
        return nn.Parameter(fake, requires_grad=value.requires_grad)
    return fake
