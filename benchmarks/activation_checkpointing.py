"""Activation checkpointing: saved-activation bytes and step time, off / every block /
every 2nd block, one process on CPU, ratios against the run without it.

The model is the `demo` size with a wider, deeper generator (`--hidden`, `--layers`;
default 256 x 8, 4 documents per example), trained with AdamW on synthetic batches over
random documents. For each setting:

- saved MiB: what autograd keeps from the forward for the backward, measured (not
  estimated) with `torch.autograd.graph.saved_tensors_hooks` around one forward: every
  tensor packed for backward, counted once per storage, parameters left out, plus the
  inputs each checkpointed unit holds for its recompute (the checkpoint keeps those itself,
  outside autograd's saved tensors);
- block MiB: the same restricted to the decoder blocks (tensors packed while a block runs,
  and the checkpointed blocks' inputs): the part checkpointing acts on;
- step ms: the median over steps of forward + backward + AdamW step, in this process's CPU
  time (`time.process_time`, one intra-op thread: the work done, which other jobs on a
  shared machine barely change) and in wall time; the settings take turns step by step so
  that machine load hits them alike;
- ratios against `off` in the same process.

    .venv/bin/python benchmarks/activation_checkpointing.py [--steps 6] [--batch-size 8]
        [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from rag_mm.config import model_config
from rag_mm.model import InMemoryBackend, build_model, synthetic_batch
from trainers.parallel.checkpointing import apply_activation_checkpointing

SETTINGS = {"off": "off", "every": "every", "every 2nd": 2}
NUM_DOCS = 256


def build(args, setting):
    torch.manual_seed(0)
    base = model_config("demo")
    config = replace(base, generator=replace(base.generator, hidden_size=args.hidden,
                                             num_layers=args.layers, num_heads=args.heads))
    model = build_model(config, backend=InMemoryBackend.random(NUM_DOCS))
    names = apply_activation_checkpointing(model, setting)
    batch = synthetic_batch(config, args.batch_size, num_docs=NUM_DOCS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, names, batch, optimizer


def saved_bytes(model: nn.Module, names: list[str], batch) -> tuple[int, int]:
    """(all, decoder blocks): bytes of distinct non-parameter storages autograd saves in one
    forward, plus the inputs of checkpointed units."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, bool]] = {}  # storage -> (bytes, saved inside a block)
    inside = [False]

    def keep(t: torch.Tensor, in_block: bool) -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = (storage.nbytes(), in_block)

    def pack(t):
        keep(t, inside[0])
        return t

    hooks = []
    units = dict(model.units())
    for name, unit in units.items():
        if name.startswith("blocks."):
            checkpointed = name in names
            hooks.append(unit.register_forward_pre_hook(
                lambda m, args, c=checkpointed: (inside.__setitem__(0, True),
                                                 [keep(a, True) for a in args
                                                  if c and isinstance(a, torch.Tensor)])[0]))
            hooks.append(unit.register_forward_hook(lambda *_: inside.__setitem__(0, False)))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(batch)["loss"]
    for hook in hooks:
        hook.remove()
    loss.backward()
    model.zero_grad(set_to_none=True)
    total = sum(b for b, _ in seen.values())
    return total, sum(b for b, in_block in seen.values() if in_block)


def step(model, batch, optimizer) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one training step."""
    cpu, wall = time.process_time(), time.perf_counter()
    model(batch)["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.process_time() - cpu, time.perf_counter() - wall


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per setting")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    runs = {label: build(args, setting) for label, setting in SETTINGS.items()}
    memory = {label: saved_bytes(model, names, batch)
              for label, (model, names, batch, _) in runs.items()}
    times: dict[str, list[tuple[float, float]]] = {label: [] for label in runs}
    for label, (model, _, batch, optimizer) in runs.items():  # warm-up step
        step(model, batch, optimizer)
    for _ in range(args.steps):
        for label, (model, _, batch, optimizer) in runs.items():
            times[label].append(step(model, batch, optimizer))

    config = runs["off"][0].config
    params = sum(p.numel() for p in runs["off"][0].parameters())
    print(f"demo size, generator {args.hidden} x {args.layers} layers, {params / 1e6:.1f} M "
          f"parameters, batch {args.batch_size} x {config.docs_per_query} documents x "
          f"{config.seq_len} positions; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, load average {os.getloadavg()[0]:.1f}")
    print("| setting | checkpointed | saved MiB | block MiB | step CPU ms | step wall ms | "
          "saved vs off | block vs off | step CPU vs off | step wall vs off |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    base_total, base_block = memory["off"]

    def median_ms(label: str, which: int) -> float:
        return statistics.median(t[which] for t in times[label]) * 1e3

    base_cpu, base_wall = median_ms("off", 0), median_ms("off", 1)
    for label, (_, names, _, _) in runs.items():
        total, block = memory[label]
        cpu, wall = median_ms(label, 0), median_ms(label, 1)
        rows.append({"setting": label, "checkpointed": names, "saved_bytes": total,
                     "block_saved_bytes": block, "step_cpu_ms": round(cpu, 1),
                     "step_wall_ms": round(wall, 1),
                     "saved_ratio": round(total / base_total, 3),
                     "block_saved_ratio": round(block / base_block, 3),
                     "step_cpu_ratio": round(cpu / base_cpu, 3),
                     "step_wall_ratio": round(wall / base_wall, 3)})
        print(f"| {label} | {len(names)} of {args.layers} blocks | {total / 2**20:.1f} | "
              f"{block / 2**20:.1f} | {cpu:.0f} | {wall:.0f} | {total / base_total:.2f} | "
              f"{block / base_block:.2f} | {cpu / base_cpu:.2f} | {wall / base_wall:.2f} |")
    print(json.dumps({"benchmark": "activation_checkpointing", "params": params,
                      "batch_size": args.batch_size, "hidden": args.hidden,
                      "layers": args.layers, "steps": args.steps,
                      "load_average": round(os.getloadavg()[0], 2), "rows": rows}))


if __name__ == "__main__":
    main()
