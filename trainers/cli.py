"""LightningCLI for fine-tuning: `python scripts/finetune.py fit --config configs/demo_rag.yaml`."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from trainers.data import RAGDataModule
from trainers.module import RAGModule


class RAGCLI(LightningCLI):
    """Links the model's size and index to the data module, so each is set once."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.size", "data.model_size")
        parser.link_arguments("model.index_dir", "data.index_dir")


def cli_main(args=None, *, run: bool = True) -> RAGCLI:
    return RAGCLI(RAGModule, RAGDataModule, args=args, run=run,
                  save_config_kwargs={"overwrite": True})
