"""How much of a decoder block's backward is weight gradients: torch's split against the trace.

The split-backward schedules (`interleaved_zero_bubble`, `zbv_zero_bubble`, `dualpipev`) run
each backward as an input-gradient action (I, torch's `stage_backward_input`) and a
weight-gradient action (W, `stage_backward_weight`). The partitioner costs W from the trace
(`trace.py`: half the backward of every matmul by a parameter). This times both of torch's
actions on one `rag_mm.layers.Block` (causal SDPA, CPU, one thread), in the same process as
a measured trace of the same block at the same shape, and prints W's share of the backward:

- torch: median W / (I + W) of torch's own two functions;
- traced: the trace's ``wgrad_ms / bwd_ms`` for the block (measured, median of runs);
- a100 spec: the same share costed from shapes for an A100 (what `partition="auto"` uses
  on such a GPU); a different device, so not comparable with the two CPU columns.

    .venv/bin/python benchmarks/weight_grad_split.py [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn
from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

from rag_mm.layers import Block
from trainers.partition.trace import trace_model

SHAPES = ((128, 2, 512), (256, 4, 512), (512, 8, 256))  # hidden, heads, tokens per sample
BATCH = 4


class _Causal(nn.Module):
    """The block with causal attention, its input the only argument (what trace_model calls)."""

    def __init__(self, block: Block) -> None:
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x, is_causal=True)


def torch_split(block: nn.Module, x: torch.Tensor, runs: int) -> tuple[float, float]:
    """Median ms of torch's I and W actions on one micro-batch through ``block``."""
    params = list(block.parameters())
    times_i, times_w = [], []
    for _ in range(runs + 1):  # the first is a warm-up
        block.zero_grad(set_to_none=True)
        inp = x.detach().requires_grad_(True)
        out = block(inp)
        grad = torch.ones_like(out)
        start = time.perf_counter()
        _, groups = stage_backward_input([out], [grad], [inp], iter(params))
        middle = time.perf_counter()
        stage_backward_weight(iter(params), groups)
        end = time.perf_counter()
        times_i.append((middle - start) * 1e3)
        times_w.append((end - middle) * 1e3)
    return statistics.median(times_i[1:]), statistics.median(times_w[1:])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for hidden, heads, tokens in SHAPES:
        model = _Causal(Block(hidden, heads, 4.0))
        x = torch.randn(BATCH, tokens, hidden)
        i_ms, w_ms = torch_split(model, x, args.runs)
        traced = trace_model(model, x, runs=args.runs).modules["block"]
        with torch.device("meta"):
            meta = _Causal(Block(hidden, heads, 4.0))
        analytic = trace_model(meta, torch.empty(BATCH, tokens, hidden, device="meta"),
                               analytic=True).modules["block"]
        rows.append({"hidden": hidden, "tokens": BATCH * tokens, "torch_i_ms": i_ms,
                     "torch_w_ms": w_ms, "torch_share": w_ms / (i_ms + w_ms),
                     "traced_share": traced.wgrad_ms / traced.bwd_ms,
                     "analytic_share": analytic.wgrad_ms / analytic.bwd_ms})
    print(f"{'hidden':>6} {'tokens':>6} {'torch I ms':>10} {'torch W ms':>10} "
          f"{'W share: torch':>14} {'traced':>7} {'a100 spec':>9}")
    for r in rows:
        print(f"{r['hidden']:>6} {r['tokens']:>6} {r['torch_i_ms']:>10.2f} "
              f"{r['torch_w_ms']:>10.2f} {r['torch_share']:>14.3f} {r['traced_share']:>7.3f} "
              f"{r['analytic_share']:>9.3f}")
    print(json.dumps({"benchmark": "weight_grad_split", "rows": rows}))


if __name__ == "__main__":
    main()
