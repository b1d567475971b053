"""One training step of a big model over a CPU pipeline, each rank materialising only its
stage: parameter bytes per rank against the partitioner's plan, and peak memory.

p gloo processes (one thread each) build the model on the meta device, ask the
partitioner for the split (`trainers.parallel.auto.auto_plan`, the split `partition="auto"`
uses), and call `trainers.parallel.parallelize.parallelize`: each keeps its stage's units,
materialises and initialises them (only the stage-0 rank loads the pretrained MiniLM),
builds the schedule from a synthetic batch, then runs one step: forward and backward of
the batch (GPipe, one micro-batch by default) and an optimizer step.

Per rank: param_bytes (the parameters it holds), planned_param_bytes (the plan's parameter
count of its stage times the element size), peak_rss_bytes (`resource.getrusage` maxrss of
the process at the end: everything it ever held resident, torch itself included), the RSS
before the model was built, and the step time. Targets: param_bytes within 10% of the plan,
and no rank above 1/p of the model's parameter bytes plus its largest unit's.

The host is shared: a watchdog stops the run if the machine's available memory falls under
--min-available-gib.

    nice -n 10 .venv/bin/python benchmarks/big_model_memory.py --size 1b --pp 8
    .venv/bin/python benchmarks/big_model_memory.py --size tiny --pp 2      (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from rag_mm.config import model_config
from rag_mm.model import InMemoryBackend, build_model, synthetic_batch
from trainers.parallel.auto import auto_plan
from trainers.parallel.local import run_local
from trainers.parallel.mesh import ParallelDims
from trainers.parallel.parallelize import ParallelConfig, parallelize
from trainers.parallel.pipeline import PipelineConfig

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
NUM_DOCS = 64


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1b", help="named model size (rag_mm.config)")
    p.add_argument("--pp", type=int, default=8, help="pipeline ranks (gloo processes)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                   help="parameter (and gradient) dtype; bfloat16 runs under autocast")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="sgd: no optimizer state; adamw: two fp-sized moments per parameter")
    p.add_argument("--batch-size", type=int, default=1, help="examples per step")
    p.add_argument("--microbatches", type=int, default=1)
    p.add_argument("--schedule", default="gpipe")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--min-available-gib", type=float, default=3.0,
                   help="stop the run if the host's MemAvailable falls below this")
    return p.parse_args(argv)


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _unique_param_bytes(params) -> int:
    seen = {id(p): p for p in params}
    return sum(p.numel() * p.element_size() for p in seen.values())


def _worker(rank: int, world_size: int, args: argparse.Namespace, stages: list, out: str) -> None:
    rss_start = _maxrss_bytes()
    torch.manual_seed(0)
    config = model_config(args.size)
    with torch.device("meta"):
        model = build_model(config)
    model.to(DTYPES[args.dtype])
    model.attach(InMemoryBackend.random(NUM_DOCS))
    dims = ParallelDims(world_size=world_size, pipeline_parallel_size=world_size)
    pipeline_config = PipelineConfig(stages=stages, schedule=args.schedule,
                                     num_microbatches=args.microbatches)
    batch = synthetic_batch(config, args.batch_size, num_docs=NUM_DOCS)
    batch["images"] = batch["images"].to(DTYPES[args.dtype])
    # the model mixes fp32 pieces (the text tower's pooled output, losses) into bf16 layers
    # the way Lightning's bf16 precisions run it: under autocast
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    start = time.perf_counter()
    with autocast:
        pipeline = parallelize(model, dims, ParallelConfig(pipeline=pipeline_config), batch,
                               mesh=dims.build_mesh("cpu"), device=torch.device("cpu"))
    build_s = time.perf_counter() - start
    params = list(pipeline.parameters())
    trained = [p for p in params if p.requires_grad]
    optimizer = (torch.optim.SGD(trained, lr=args.lr) if args.optimizer == "sgd"
                 else torch.optim.AdamW(trained, lr=args.lr))
    start = time.perf_counter()
    with autocast:
        losses = pipeline.step(batch)
    optimizer.step()
    step_s = time.perf_counter() - start
    finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in trained)
    result = {"rank": rank, "units": [n for m in pipeline.modules for n in m.unit_names],
              "param_bytes": _unique_param_bytes(params), "peak_rss_bytes": _maxrss_bytes(),
              "rss_before_build_bytes": rss_start, "build_s": build_s, "step_s": step_s,
              "finite_grads": finite,
              "loss": None if losses is None else losses.float().sum(-1).mean().item()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _watchdog(limit_gib: float, done: threading.Event) -> None:
    """Kill this run's worker processes (by id) and itself if the host runs short of memory."""
    while not done.wait(1.0):
        if _available_gib() < limit_gib:
            print(f"host MemAvailable under {limit_gib} GiB: stopping", file=sys.stderr,
                  flush=True)
            for pid in _children(os.getpid()):
                os.kill(pid, 9)
            os._exit(3)


def main(argv=None) -> dict:
    args = parse_args(argv)
    config = model_config(args.size)
    with torch.device("meta"):
        full = build_model(config)
    element = torch.empty(0, dtype=DTYPES[args.dtype]).element_size()
    unit_bytes = {name: _unique_param_bytes(unit.parameters()) // 4 * element
                  for name, unit in full.units()}
    model_bytes = _unique_param_bytes(full.parameters()) // 4 * element
    plan = auto_plan(config, pp_size=args.pp, schedule=args.schedule,
                     num_microbatches=args.microbatches, batch_size=args.batch_size)
    chunks = sorted(plan.plan.stages, key=lambda stage: stage.chunk)
    stages = [list(stage.units) for stage in chunks]
    planned = [stage.param_count * element for stage in chunks]  # one stage per rank here
    del full

    done = threading.Event()
    threading.Thread(target=_watchdog, args=(args.min_available_gib, done), daemon=True).start()
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        run_local(_worker, args.pp, args, stages, out)
        wall_s = time.perf_counter() - start
        done.set()
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(args.pp)]

    largest = max(unit_bytes.values())
    print(f"{args.size}: {model_bytes / 2**30:.2f} GiB of {args.dtype} parameters, "
          f"pp={args.pp}, {args.schedule} m={args.microbatches}, batch {args.batch_size}, "
          f"{args.optimizer}; wall {wall_s:.0f} s; load {os.getloadavg()[0]:.1f}")
    print("| rank | units | param MiB | planned MiB | param/plan | bound MiB | peak RSS MiB "
          "| RSS before build MiB | step s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for r, (rank, plan_bytes) in enumerate(zip(ranks, planned, strict=True)):
        own_largest = max(unit_bytes[n] for n in rank["units"])
        bound = model_bytes / args.pp + own_largest
        units = rank["units"]
        span = units[0] if len(units) == 1 else f"{units[0]} .. {units[-1]}"
        print(f"| {r} | {span} | {rank['param_bytes'] / 2**20:.0f} | {plan_bytes / 2**20:.0f} "
              f"| {rank['param_bytes'] / plan_bytes:.3f} | {bound / 2**20:.0f} "
              f"| {rank['peak_rss_bytes'] / 2**20:.0f} | {rank['rss_before_build_bytes'] / 2**20:.0f} "
              f"| {rank['step_s']:.1f} |")
        rows.append({"param_bytes": rank["param_bytes"], "planned_param_bytes": plan_bytes,
                     "peak_rss_bytes": rank["peak_rss_bytes"]})
    within = all(abs(row["param_bytes"] / row["planned_param_bytes"] - 1) <= 0.10 for row in rows)
    bounded = all(rank["param_bytes"] <= model_bytes / args.pp + max(
        unit_bytes[n] for n in rank["units"]) for rank in ranks)
    loss = next(rank["loss"] for rank in ranks if rank["loss"] is not None)
    print(f"loss {loss:.4f}; finite gradients on every rank: "
          f"{all(rank['finite_grads'] for rank in ranks)}; param bytes within 10% of the plan: "
          f"{within}; every rank under 1/p of the model + its largest unit: {bounded}; sum of "
          f"peak RSS {sum(row['peak_rss_bytes'] for row in rows) / 2**30:.2f} GiB")
    summary = {"ranks": rows, "model_param_bytes": model_bytes,
               "largest_unit_param_bytes": largest}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
