"""Run a function on N local CPU processes over gloo (tests and benchmarks).

Real jobs start with `torchrun` or SLURM; this is the in-Python equivalent for one machine.
Each process gets `fn(rank, world_size, *args)` with the default group initialised, the
variables torchrun sets (so Lightning sees processes created externally), and one
intra-op thread so N processes share few cores fairly.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # every rank leaves together (not after a failure: that one may hang)
    finally:
        dist.destroy_process_group()


def run_local(fn, world_size: int, *args) -> None:
    """Spawn `world_size` processes running `fn(rank, world_size, *args)`; raise if any
    fails. `fn` must be importable (a module-level function); results go through files."""
    mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
