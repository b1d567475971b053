"""Greedy answers under a pipeline: the model's own decoding steps, driven stage by stage.

`RAGModel.generate` is a loop over answer positions of per-step pieces; here each piece
runs where its unit lives. Per answer token, one forward-only pass through the stages, on
the whole per-replica batch (no micro-batches):

    stage 0      first unit: `retrieve(batch)` once, then `answer_carry(batch, retrieved,
                 answers)`: the fused sequences with the answer so far
    stages       the units as in training, the carry sent on from rank to rank
    last stage   last unit: `next_token_logprobs(*carry, step=...)`: the documents' mixed
                 next-token log-probabilities; the greedy choice is broadcast to every
                 pipeline rank, which all keep the same `GreedyAnswers`

With FSDP2 (dp > 1) the first and last units are gathered whole for the whole loop (their
decoding methods are not `forward`, so FSDP's hooks do not gather them); the other units
gather per pass as in training. Decoding stops when every row of every data-parallel
replica has ended (the all-gathers need all replicas in every pass). The retrieved keys
(recall@k) are sent from stage 0 to every pipeline rank. Tensor-parallel ranks run their
stages together, each pipeline group (one per tp rank) passing its own copy of the carry.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from trainers.parallel.pipeline import Pipeline, stage_ranks


@torch.no_grad()
def pipeline_generate(model: nn.Module, pipeline: Pipeline, batch: dict[str, torch.Tensor], *,
                      dp_group: dist.ProcessGroup | None = None
                      ) -> tuple[torch.Tensor, np.ndarray]:
    """`model.generate(batch)` through this rank's stages of `pipeline`: the greedy answer
    tokens (B, T) and the retrieved keys (B, k), on every pipeline rank alike. Every rank of
    the pipeline (and of `dp_group`) must call it together."""
    first = _unit(pipeline.modules[0], 0) if pipeline.has_first else None
    last = _unit(pipeline.modules[-1], -1) if pipeline.has_last else None
    owners = stage_ranks(pipeline.config.num_stages, dist.get_world_size(pipeline.pp_group),
                         pipeline.config.schedule)
    answers = model.start_answers(batch)
    with _gathered(first, last):
        retrieved = first.retrieve(batch) if first is not None else None
        while True:
            mixed = _answer_pass(pipeline, owners, batch, retrieved, answers)
            chosen = (answers.choose(mixed) if mixed is not None
                      else torch.zeros_like(answers.tokens[:, 0]))
            _broadcast(chosen, owners[-1], pipeline.pp_group)
            answers.append(chosen)
            if _all_finished(answers.finished, dp_group, chosen.device):
                break
    keys = [retrieved.keys if retrieved is not None else None]
    src = dist.get_global_rank(pipeline.pp_group, owners[0])
    dist.broadcast_object_list(keys, src=src, group=pipeline.pp_group, device=chosen.device)
    return answers.tokens, keys[0]


def _unit(module: nn.Module, index: int) -> nn.Module:
    return module.get_submodule(module.unit_names[index])


@contextmanager
def _gathered(*units: nn.Module | None):
    """FSDP2-sharded `units` gathered whole inside the block (others untouched)."""
    sharded = [unit for unit in units if isinstance(unit, FSDPModule)]
    for unit in sharded:
        unit.unshard()
    try:
        yield
    finally:
        for unit in sharded:
            unit.reshard()


def _answer_pass(pipeline: Pipeline, owners: list[int], batch, retrieved, answers
                 ) -> torch.Tensor | None:
    """One forward-only pass of this rank's stages for the next answer token: the mixed
    log-probabilities (B, V) where the last stage is, None elsewhere."""
    group = pipeline.pp_group
    me = dist.get_rank(group)
    last = len(owners) - 1
    carry = None
    for stage, module in zip(pipeline.stages, pipeline.modules, strict=True):
        s, names = stage.stage_index, list(module.unit_names)
        if s == 0:
            carry = module.get_submodule(names.pop(0)).answer_carry(batch, retrieved, answers)
        elif owners[s - 1] != me:
            carry = _recv_carry(owners[s - 1], group, stage.device)
        final = names.pop() if s == last else None
        for name in names:
            carry = module.get_submodule(name)(*carry)
        if final is not None:
            return module.get_submodule(final).next_token_logprobs(*carry, step=answers.step)
        if owners[s + 1] != me:
            _send_carry(carry, owners[s + 1], group, stage.device)
    return None


def _send_carry(carry: tuple[torch.Tensor, ...], dst: int, group, device) -> None:
    peer = dist.get_global_rank(group, dst)
    specs = [(tuple(t.shape), t.dtype) for t in carry]
    dist.send_object_list([specs], dst=peer, group=group, device=device)
    for t in carry:
        dist.send(t.contiguous(), dst=peer, group=group)


def _recv_carry(src: int, group, device) -> tuple[torch.Tensor, ...]:
    peer = dist.get_global_rank(group, src)
    specs = [None]
    dist.recv_object_list(specs, src=peer, group=group, device=device)
    carry = tuple(torch.empty(shape, dtype=dtype, device=device) for shape, dtype in specs[0])
    for t in carry:
        dist.recv(t, src=peer, group=group)
    return carry


def _broadcast(tensor: torch.Tensor, src: int, group) -> None:
    if dist.get_world_size(group) > 1:
        dist.broadcast(tensor, src=dist.get_global_rank(group, src), group=group)


def _all_finished(finished: bool, dp_group, device) -> bool:
    if dp_group is None or dist.get_world_size(dp_group) == 1:
        return finished
    flag = torch.tensor([float(finished)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=dp_group)
    return bool(flag.item())
