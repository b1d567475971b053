"""Resume a one-process Lightning checkpoint file under `PipelineStrategy`.

A one-process run (no strategy: `scripts/pretrain.py`'s `OUT/checkpoints/last.ckpt`) saves
one file: the whole `state_dict` under the module's parameter names, and each optimizer's
`state_dict()`, which torch keys by parameter index (0, 1, ... over the param groups in
order) and not by name. `RAGModule.on_save_checkpoint` records each group's parameter
names beside it (`PARAM_NAMES`), so here every rank takes

- the weights of the parameters and buffers it holds (its pipeline units), sliced into
  its tensor-parallel (DTensor) and FSDP2 shards by `set_model_state_dict(...,
  full_state_dict=True)`;
- the optimizer state of those parameters, re-keyed by name and sliced the same way by
  `set_optimizer_state_dict(..., full_state_dict=True)`; a parameter the file has no
  state for (AdamW had not stepped it yet) gets none, as in one process;

and Lightning restores the loops, LR schedulers and callbacks from the returned dict. A
file without `PARAM_NAMES` (saved before it was recorded, or by another module) is refused
by name: resuming its weights without their optimizer state would silently change the run
(`trainers.run.load_module` reads the weights alone, to start a new run from them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    set_model_state_dict,
    set_optimizer_state_dict,
)

PARAM_NAMES = "optimizer_param_names"  # [optimizer][group] -> parameter names, in order
_FULL = StateDictOptions(full_state_dict=True, strict=False)


class SingleDeviceCheckpointError(ValueError):
    """A checkpoint file that cannot be resumed under the strategy (named in the message)."""


def param_names(module: nn.Module, optimizers) -> list[list[list[str]]]:
    """Each optimizer's groups as parameter names (what `PARAM_NAMES` records)."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [[[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
            for optimizer in optimizers]


def load_single_device_checkpoint(model: nn.Module, optimizers, checkpoint: dict[str, Any],
                                  path: Path, *, strict: bool) -> dict[str, Any]:
    """Load this rank's share of a one-process `checkpoint` (read from `path`) into `model`
    (the LightningModule, holding only this rank's units) and `optimizers`; returns the
    checkpoint for Lightning to restore the rest from."""
    local = model.state_dict()
    missing = sorted(set(local) - set(checkpoint["state_dict"]))
    if strict and missing:
        raise SingleDeviceCheckpointError(
            f"{path} has no weights for {len(missing)} of this rank's entries "
            f"(e.g. {missing[:3]}); it was saved by another model")
    weights = {k: v for k, v in checkpoint["state_dict"].items() if k in local}
    set_model_state_dict(model, weights, options=_FULL)
    if optimizers:
        saved = checkpoint.get("optimizer_states", [])
        names = checkpoint.get(PARAM_NAMES)
        if names is None:
            raise SingleDeviceCheckpointError(
                f"{path} was saved without its optimizer's parameter names ('{PARAM_NAMES}', "
                f"written by RAGModule.on_save_checkpoint), so its optimizer state (keyed by "
                f"parameter index) cannot be given to this rank's parameters; resume it in "
                f"one process, or start a new run from its weights "
                f"(trainers.run.load_module)")
        if len(saved) != len(optimizers) or len(names) != len(optimizers):
            raise SingleDeviceCheckpointError(
                f"{path} has {len(saved)} optimizer states; this run has {len(optimizers)}")
        recorded = {n for groups in names for group in groups for n in group}
        unknown = sorted(n for n, p in model.named_parameters()
                         if p.requires_grad and n not in recorded)
        if unknown:  # e.g. the second copy of a tied weight (split_tied_weights)
            raise SingleDeviceCheckpointError(
                f"{path}: its optimizer had no parameter {unknown[:3]} that this rank "
                f"trains; resume it with the same parameters (split_tied_weights=False)")
        for optimizer, state, groups in zip(optimizers, saved, names):
            _load_optimizer(model, optimizer, _by_name(state, groups, path))
    return checkpoint


def _by_name(state: dict[str, Any], groups: list[list[str]], path: Path) -> dict[str, Any]:
    """A torch optimizer `state_dict()` (parameters as indices) keyed by parameter name."""
    if [len(g["params"]) for g in state["param_groups"]] != [len(g) for g in groups]:
        raise SingleDeviceCheckpointError(
            f"{path}: the recorded parameter names do not match its optimizer's groups")
    index_name = {i: n for g, names in zip(state["param_groups"], groups)
                  for i, n in zip(g["params"], names)}
    return {"state": {index_name[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": names}
                             for g, names in zip(state["param_groups"], groups)]}


def _load_optimizer(model: nn.Module, optimizer, state: dict[str, Any]) -> None:
    """This rank's parameters' entries of `state` (keyed by name, whole tensors) into
    `optimizer`; torch fills the parameters the file has no state for with a zero-lr
    step's state, which is then forgotten (they had none when the file was saved)."""
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=_FULL)
    for name, param in model.named_parameters():
        if name not in state["state"]:
            optimizer.state.pop(param, None)
