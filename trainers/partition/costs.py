"""FLOPs and bytes of every ATen operation, and the analytic (shape-only) execution mode.

``CountingMode`` counts what each operation costs while the real computation runs.
``ShapeOnlyMode`` runs a model without computing: floating point results are stride-0 zero
placeholders of the right shape (one element of storage), found by running the operation
on the meta device; integer and boolean operations run for real, so code that needs data
(an index search on a query, boolean masks, token ids) still works. That is how a model
built on the meta device is costed on a CPU: ``trace.trace_model(..., analytic=True)``.

Time from counts is a roofline: ``max(flops / (peak * efficiency), bytes / (memory bw *
efficiency))`` per operation, for the device described by ``DeviceSpec``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """A device for analytic timing.

    tflops: peak dense matmul TFLOP/s at the training dtype.
    mem_gb_per_s: memory bandwidth.
    matmul_efficiency, memory_efficiency: the share of peak real kernels reach.
    """

    name: str = "A100-40GB bf16"
    tflops: float = 312.0
    mem_gb_per_s: float = 1555.0
    memory_gib: float = 40.0
    matmul_efficiency: float = 0.5
    memory_efficiency: float = 0.7

    def __post_init__(self) -> None:
        for key in ("tflops", "mem_gb_per_s", "memory_gib"):
            if getattr(self, key) <= 0:
                raise ValueError(f"DeviceSpec {key}={getattr(self, key)} must be > 0")
        for key in ("matmul_efficiency", "memory_efficiency"):
            if not 0 < getattr(self, key) <= 1:
                raise ValueError(f"DeviceSpec {key}={getattr(self, key)} must be in (0, 1]")

    def op_ms(self, flops: float, num_bytes: float) -> float:
        compute = flops / (self.tflops * 1e12 * self.matmul_efficiency)
        memory = num_bytes / (self.mem_gb_per_s * 1e9 * self.memory_efficiency)
        return max(compute, memory) * 1e3


def _sdpa_cpu_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    """Flash attention on CPU: two (q k^T, p v) batched matmuls."""
    b, h, s_q, d = query.shape
    return 4 * b * h * s_q * key.shape[-2] * d


def _sdpa_cpu_backward_flops(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    """Recompute q k^T, then grads of p v (2 matmuls) and of q k^T (2 matmuls)."""
    b, h, s_q, d = query.shape
    return 10 * b * h * s_q * key.shape[-2] * d


_EXTRA_FLOPS: dict = {}
for _name, _fn in (("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu_flops),
                   ("_scaled_dot_product_flash_attention_for_cpu_backward",
                    _sdpa_cpu_backward_flops)):
    if hasattr(aten, _name):
        _EXTRA_FLOPS[getattr(aten, _name)] = _fn


def op_flops(func, args, kwargs, out) -> float:
    """Floating point operations of one ATen call (0 for ones without a formula)."""
    packet = func.overloadpacket
    if packet in _EXTRA_FLOPS:
        return float(_EXTRA_FLOPS[packet](*args, out_val=out, **kwargs))
    if packet in flop_registry:
        return float(flop_registry[packet](*args, **kwargs, out_val=out))
    return 0.0


def logical_bytes(tree) -> float:
    """Bytes of every tensor in ``tree`` by shape and dtype (not by storage)."""
    leaves, _ = tree_flatten(tree)
    return float(sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor)))


class CountingMode(TorchDispatchMode):
    """Reports ``(flops, bytes)`` of every ATen call to ``sink`` while computing for real."""

    def __init__(self, sink: Callable[[float, float], None]) -> None:
        super().__init__()
        self.sink = sink

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.sink(op_flops(func, args, kwargs, out), logical_bytes((args, kwargs, out)))
        return out


def placeholder(t: torch.Tensor, *, device="cpu") -> torch.Tensor:
    """A stride-0 zero tensor shaped like ``t`` (one element of storage)."""
    return torch.zeros((), dtype=t.dtype, device=device).expand(t.shape)


def _is_float(t) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


class ShapeOnlyMode(CountingMode):
    """Counts like ``CountingMode`` but computes no floating point result (see module doc)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if tensors and (not any(map(_is_float, tensors)) or getattr(func, "is_view", False)):
            out = func(*args, **kwargs)  # integer work and aliasing views: real and cheap
            self.sink(op_flops(func, args, kwargs, out) if any(map(_is_float, tensors)) else 0.0,
                      logical_bytes((args, kwargs, out)))
            return out
        meta_args, meta_kwargs = _to_meta(func, args, kwargs)
        try:
            meta_out = func(*meta_args, **meta_kwargs)
        except (RuntimeError, NotImplementedError):  # data-dependent on float input: run it
            out = func(*args, **kwargs)
            self.sink(op_flops(func, args, kwargs, out), logical_bytes((args, kwargs, out)))
            return out
        if not tensors and not any(map(_is_float, tree_flatten(meta_out)[0])):
            return func(*args, **kwargs)  # an integer or boolean factory: make it for real
        self.sink(op_flops(func, meta_args, meta_kwargs, meta_out),
                  logical_bytes((meta_args, meta_kwargs, meta_out)))
        if func._schema.is_mutable:
            return kwargs["out"] if "out" in kwargs else args[0]
        return tree_map(lambda t: placeholder(t) if isinstance(t, torch.Tensor) else t, meta_out)


_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
              aten._index_put_impl_.default}


def _to_meta(func, args, kwargs):
    """Arguments on the meta device; boolean indices become integer ones (computed for real)."""
    if func in _INDEX_OPS:
        indices = []
        for index in args[1]:
            if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
                indices.extend(index.nonzero().unbind(1))
            else:
                indices.append(index)
        args = (args[0], indices, *args[2:])

    def convert(t):
        return t.to("meta") if isinstance(t, torch.Tensor) and t.device.type != "meta" else t

    meta_kwargs = tree_map(convert, kwargs)
    if "device" in meta_kwargs:
        meta_kwargs["device"] = torch.device("meta")
    return tree_map(convert, args), meta_kwargs


def median(values) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def is_finite_number(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
