"""Activation checkpointing in one process: the setting, its refusals, and parity.

A checkpointed unit reruns the same kernels on the same inputs in backward (same shapes,
same thread count, CPU kernels deterministic), and torch's random state is restored for
the rerun, so the loss and every gradient are expected bitwise equal to the run without
checkpointing; each test also checks that the recompute really ran (forward calls of the
units' attention / norm counted), so an unapplied setting fails.

Run: .venv/bin/pytest tests/test_activation_checkpointing.py -q       (about 10 s on 2 cores)
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from rag_mm.model import InMemoryBackend, synthetic_batch
from tests.helpers.parallel import BATCH_SIZE, NUM_DOCS, TWO, tiny_model
from trainers.parallel.checkpointing import (
    SPLIT_BACKWARD_SCHEDULES,
    ActivationCheckpointing,
    CheckpointingError,
    apply_activation_checkpointing,
    check_checkpoint_schedule,
)
from trainers.parallel.strategy import PipelineStrategy

CHAIN = ["retrieval", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "head"]


@pytest.mark.parametrize("setting, units", [
    ("off", []), (None, []), ("every", ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4"]),
    (1, ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4"]),
    (2, ["blocks.1", "blocks.3"]), ("3", ["blocks.2"]), ("full", CHAIN[1:-1]),
    (["head", "blocks.1"], ["blocks.1", "head"]), ("blocks.4, head", ["blocks.4", "head"]),
])
def test_settings_name_units_over_the_whole_chain(setting, units):
    assert ActivationCheckpointing.parse(setting).unit_names(CHAIN) == units


def test_the_partitioner_costs_the_blocks_the_runtime_checkpoints():
    from dataclasses import fields, replace

    from rag_mm.config import model_config
    from trainers.partition.chain import checkpointed_layers
    from trainers.partition.hardware import local_device_spec
    from trainers.partition.models import profile_rag
    from trainers.partition.units import chain_from_profile

    config = model_config("tiny")
    config = replace(config, generator=replace(config.generator, num_layers=5))
    as_fields = {f.name: getattr(config, f.name) for f in fields(config) if f.name != "name"}
    chain = chain_from_profile(profile_rag("tiny", analytic=True, batch_size=1,
                                           device=local_device_spec(), **as_fields))
    assert [u.name for u in chain.units] == CHAIN
    for setting in ("off", "every", 1, 2, 3, ["blocks.1", "blocks.4", "head"]):
        blocks = ActivationCheckpointing.parse(setting).planner_blocks(CHAIN)
        assert list(checkpointed_layers(chain, blocks)) == blocks
        if setting not in ("every", "off") and not isinstance(setting, list):
            assert list(checkpointed_layers(chain, setting)) == blocks


@pytest.mark.parametrize("setting, words", [
    (0, "needs n >= 1"), (-2, "needs n >= 1"), ("0", "needs n >= 1"),
    (["blocks.9"], "names ['blocks.9'], which the model does not have"),
    ("block.1", "names ['block.1'], which the model does not have"),
    (["retrieval"], "unit 'retrieval' cannot be checkpointed"),
    ([], "use 'off', 'every'"),
])
def test_bad_settings_are_refused_by_name(setting, words):
    with pytest.raises(CheckpointingError) as info:
        ActivationCheckpointing.parse(setting).unit_names(CHAIN)
    assert words in str(info.value)


def test_split_backward_schedules_are_refused_before_any_work():
    for schedule in SPLIT_BACKWARD_SCHEDULES:
        with pytest.raises(CheckpointingError, match=f"schedule='{schedule}'.*splits the backward"):
            PipelineStrategy(partition=TWO, schedule=schedule, activation_checkpointing="every")
        check_checkpoint_schedule("off", schedule)
    PipelineStrategy(partition=TWO, schedule="1f1b", activation_checkpointing=2)
    with pytest.raises(CheckpointingError, match="needs n >= 1"):
        PipelineStrategy(partition=TWO, activation_checkpointing=0)


def test_yaml_and_command_line_reach_both_settings_which_must_agree(tmp_path):
    from trainers.cli import cli_main
    from trainers.module import RAGModule
    from trainers.parallel.mesh import ParallelConfigError

    recipe = tmp_path / "pp.yaml"
    recipe.write_text(
        "trainer:\n"
        "  strategy:\n"
        "    class_path: trainers.parallel.strategy.PipelineStrategy\n"
        "    init_args:\n"
        "      partition: [[retrieval, blocks.0], [blocks.1, head]]\n"
        "      activation_checkpointing: [blocks.1, head]\n")
    cli = cli_main(["--config", str(recipe), "--model.size", "tiny",
                    "--model.activation_checkpointing", "every", "--trainer.accelerator", "cpu",
                    "--trainer.devices", "1"], run=False)
    strategy, module = cli.trainer.strategy, cli.model
    assert strategy.activation_checkpointing == ["blocks.1", "head"]
    assert [n for n, unit in module.model.units()
            if getattr(unit, "activation_checkpointed", False)] == ["blocks.0", "blocks.1"]
    chain = [name for name, _ in module.model.units()]
    strategy._lightning_module = module
    with pytest.raises(ParallelConfigError, match=r"activation_checkpointing=\['blocks.1', "
                                                  r"'head'\] in PipelineStrategy but 'every' in "
                                                  r"the LightningModule"):
        strategy._checkpointing_setting(chain)
    for own, agreed in ((None, "every"), (1, 1), ("every", "every")):
        strategy = PipelineStrategy(partition=TWO, activation_checkpointing=own)
        strategy._lightning_module = module
        assert strategy._checkpointing_setting(chain) == agreed
    strategy = PipelineStrategy(partition=TWO, activation_checkpointing=["blocks.5"])
    strategy._lightning_module = RAGModule(size="tiny")
    with pytest.raises(CheckpointingError, match="blocks.5"):
        strategy._checkpointing_setting(chain)
    with pytest.raises(CheckpointingError, match="unit 'retrieval' cannot be checkpointed"):
        RAGModule(size="tiny", activation_checkpointing="retrieval")


def count_calls(modules: list[nn.Module]) -> list[int]:
    """Forward calls of each module so far (a list updated in place by hooks)."""
    counts = [0] * len(modules)
    for i, module in enumerate(modules):
        module.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


@functools.cache
def plain_run():
    return loss_and_grads("off")


def loss_and_grads(setting):
    model, config = tiny_model()
    names = apply_activation_checkpointing(model, setting)
    calls = count_calls([model.blocks[0].attn, model.blocks[1].attn, model.head.norm])
    batch = synthetic_batch(config, BATCH_SIZE, num_docs=NUM_DOCS)
    loss = model(batch)["loss"]
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, names, calls


@pytest.mark.parametrize("setting, names, calls", [
    ("every", ["blocks.0", "blocks.1"], [2, 2, 1]),
    (2, ["blocks.1"], [1, 2, 1]),
    (["blocks.1", "head"], ["blocks.1", "head"], [1, 2, 2]),
])
def test_checkpointed_model_matches_the_plain_one_bitwise(setting, names, calls):
    loss, grads, none, plain_calls = plain_run()
    assert none == [] and plain_calls == [1, 1, 1]
    ac_loss, ac_grads, ac_names, ac_calls = loss_and_grads(setting)
    assert ac_names == names and ac_calls == calls  # forward + one recompute each
    assert torch.equal(ac_loss, loss)
    assert ac_grads.keys() == grads.keys()
    assert grads["retrieval.query_encoder.image_proj.weight"].abs().sum() > 0
    for name, grad in grads.items():
        assert torch.equal(ac_grads[name], grad), name


class DropoutChain(nn.Module):
    """Two units with dropout, in the `units()` shape `apply_activation_checkpointing` reads."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5), nn.GELU()) for _ in range(2))

    def units(self):
        return [(f"blocks.{i}", block) for i, block in enumerate(self.blocks)]

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x.square().sum()


def dropout_grads(setting, seed: int) -> dict[str, torch.Tensor]:
    model = DropoutChain()
    apply_activation_checkpointing(model, setting)
    torch.manual_seed(seed)
    model(torch.ones(8, 16)).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_the_recompute_draws_the_same_dropout_masks():
    plain, checkpointed = dropout_grads("off", 1), dropout_grads("every", 1)
    assert all(torch.equal(checkpointed[n], g) for n, g in plain.items())
    other_masks = dropout_grads("off", 2)  # dropout is live: another draw changes gradients
    assert not torch.equal(other_masks["blocks.0.0.weight"], plain["blocks.0.0.weight"])


def test_module_checkpoints_what_its_setting_names_and_trains_alike():
    from trainers.module import RAGModule

    torch.manual_seed(0)  # the weights of tiny_model()
    module = RAGModule(size="tiny", activation_checkpointing=2)
    module.configure_model()  # built on the meta device: materialised in this process
    flagged = [n for n, unit in module.model.units() if getattr(unit, "activation_checkpointed", False)]
    assert flagged == ["blocks.1"] and module.hparams.activation_checkpointing == 2
    module.model.attach(InMemoryBackend.random(NUM_DOCS))
    loss = module.model(synthetic_batch(module.config, BATCH_SIZE, num_docs=NUM_DOCS))["loss"]
    assert torch.equal(loss.detach(), plain_run()[0])
