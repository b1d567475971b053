"""Activation checkpointing: a unit keeps only its inputs in forward and recomputes its
activations in backward (less memory in flight, one more forward per checkpointed unit).

One setting, read the same way by the one-process module (`RAGModule(activation_checkpointing=)`)
and by `PipelineStrategy(activation_checkpointing=)`:

    "off" / None          nothing is checkpointed
    "every" / "full" / 1  every decoder block
    n (an int >= 2)       every n-th decoder block, those whose 1-based position is a
                          multiple of n: blocks.{n-1}, blocks.{2n-1}, ... (torchtitan's count)
    ["blocks.3", "head"]  these units (a list, or a comma-separated string on a command line)

Blocks are counted over the whole chain (not per pipeline stage), so a setting means the
same units under any partition, and the partitioner costs the same blocks
(`trainers.partition.chain.checkpointed_layers` counts alike). The retrieval unit is never checkpointed: its forward
searches the index on the host and fills caches, which a recompute would redo outside
autograd (and `mode="random"` draws its documents from numpy's generator, which torch
does not restore).

Applied from outside (`apply_activation_checkpointing`): the unit's `forward` runs under
`torch.utils.checkpoint.checkpoint(use_reentrant=False)`, so module and parameter names do
not change (checkpoints and optimizer state stay keyed as before), torch and CUDA random
states are restored for the recompute (dropout draws the same mask), and FSDP2 / tensor
parallel hooks applied after it stay outside the recomputed region.

Under the pipeline, `gpipe`, `1f1b`, `interleaved_1f1b` and `looped_bfs` recompute each
checkpointed unit once per micro-batch. The schedules that split the backward into input
and weight gradients (`interleaved_zero_bubble`, `zbv_zero_bubble`, `dualpipev`) give the
same gradients (bitwise, checked) but recompute the unit's forward once for the input
gradients and again for each weight-gradient pass: measured on the tiny model's blocks,
9 extra forwards per micro-batch under the zero-bubble ones and 3 under DualPipeV, instead
of 1. That loses more time than the schedule's bubble saves, so they are refused with
checkpointing (`check_checkpoint_schedule`).
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from torch.utils.checkpoint import checkpoint

from trainers.parallel.mesh import ParallelConfigError

CheckpointSetting = str | int | Sequence[str] | None
NOT_CHECKPOINTABLE = {"retrieval": "it searches the index on the host and fills caches, "
                                   "which a recompute would redo outside autograd"}


class CheckpointingError(ParallelConfigError):
    """An activation checkpointing setting that names no valid units."""


@dataclass(frozen=True)
class ActivationCheckpointing:
    """A parsed setting: every `every`-th decoder block (0: none), or the `units` named."""

    every: int = 0
    units: tuple[str, ...] = ()

    @classmethod
    def parse(cls, setting: CheckpointSetting) -> ActivationCheckpointing:
        if isinstance(setting, ActivationCheckpointing):
            return setting
        if setting is None or setting is False or setting == "off":
            return cls()
        if setting is True or setting in ("every", "full"):
            return cls(every=1)
        if isinstance(setting, str) and setting.strip().lstrip("-").isdigit():
            setting = int(setting)
        if isinstance(setting, int):
            if setting < 1:
                raise CheckpointingError(
                    f"activation_checkpointing={setting}: every n-th block needs n >= 1 "
                    f"(1 = every block); use 'off' for none")
            return cls(every=setting)
        names = setting.split(",") if isinstance(setting, str) else list(setting)
        names = tuple(name.strip() for name in names if name.strip())
        if not names or not all(isinstance(name, str) for name in names):
            raise CheckpointingError(
                f"activation_checkpointing={setting!r}: use 'off', 'every', an int n >= 1 "
                f"(every n-th block) or a list of unit names")
        return cls(units=names)

    @property
    def enabled(self) -> bool:
        return bool(self.every or self.units)

    def planner_blocks(self, chain: Sequence[str]) -> list[str]:
        """The decoder blocks checkpointed, for the partitioner's cost model (which knows
        blocks only; a checkpointed head is not costed)."""
        return [name for name in self.unit_names(chain) if name.startswith("blocks.")]

    def unit_names(self, chain: Sequence[str]) -> list[str]:
        """The units of `chain` (a model's `units()` names) this setting checkpoints, in chain
        order; a name the chain lacks, or a unit that cannot be recomputed, is refused."""
        blocks = [name for name in chain if name.startswith("blocks.")]
        if self.every:
            chosen = set(blocks[self.every - 1:: self.every])
        else:
            unknown = [name for name in self.units if name not in chain]
            if unknown:
                raise CheckpointingError(
                    f"activation_checkpointing names {unknown}, which the model does not have; "
                    f"its units are {list(chain)}")
            chosen = set(self.units)
        for name, why in NOT_CHECKPOINTABLE.items():
            if name in chosen:
                raise CheckpointingError(
                    f"activation_checkpointing: unit {name!r} cannot be checkpointed ({why}); "
                    f"checkpoint decoder blocks or the head")
        return [name for name in chain if name in chosen]


# schedules whose backward runs in two parts (input gradients, then weight gradients); each
# part unpacks a checkpointed unit's saved tensors again and so reruns its forward
SPLIT_BACKWARD_SCHEDULES = ("interleaved_zero_bubble", "zbv_zero_bubble", "dualpipev")


def check_checkpoint_schedule(setting: CheckpointSetting, schedule: str) -> None:
    """Refuse activation checkpointing under a schedule that splits the backward (see the
    module docstring: each checkpointed unit would be recomputed several times per
    micro-batch)."""
    if ActivationCheckpointing.parse(setting).enabled and schedule in SPLIT_BACKWARD_SCHEDULES:
        raise CheckpointingError(
            f"activation_checkpointing={setting!r} with schedule={schedule!r}: that schedule "
            f"splits the backward into input and weight gradients, and each part reruns a "
            f"checkpointed unit's forward (4-10 forwards per micro-batch instead of 2); use "
            f"gpipe, 1f1b, interleaved_1f1b or looped_bfs, or activation_checkpointing='off'")


def apply_activation_checkpointing(model: nn.Module, setting: CheckpointSetting, *,
                                   only: Sequence[str] | None = None) -> list[str]:
    """Checkpoint the units of `model` (a chain with `units()`) that `setting` names,
    resolved over the whole chain; with `only`, just those of them (this pipeline rank's
    units). Returns the names checkpointed. Applying twice changes nothing."""
    plan = ActivationCheckpointing.parse(setting)
    if not plan.enabled:
        return []
    units = dict(model.units())
    names = plan.unit_names(list(units))
    if only is not None:
        names = [name for name in names if name in set(only)]
    for name in names:
        checkpoint_module(units[name])
    return names


def checkpoint_module(module: nn.Module) -> None:
    """Run `module`'s forward under non-reentrant `torch.utils.checkpoint`, in place."""
    if getattr(module, "activation_checkpointed", False):
        return
    module.forward = types.MethodType(_checkpointed_forward, module)
    module.activation_checkpointed = True


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    # type(self).forward, not a saved bound method: a deepcopy or FSDP2's class swap keeps
    # recomputing the right module
    return checkpoint(type(self).forward, self, *args, use_reentrant=False,
                      preserve_rng_state=True, **kwargs)


__all__ = [
    "SPLIT_BACKWARD_SCHEDULES",
    "ActivationCheckpointing",
    "CheckpointingError",
    "apply_activation_checkpointing",
    "check_checkpoint_schedule",
    "checkpoint_module",
]
