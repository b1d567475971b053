"""LightningCLI for fine-tuning: `python scripts/finetune.py fit --config configs/demo_rag.yaml`.

Every run gets the long-run callbacks of `trainers.run`: step checkpoints under
`default_root_dir/checkpoints` (`last.ckpt` the newest, the final step always saved, every
`val_check_interval` steps too), SIGTERM / SIGUSR1 save-and-exit 75, exact resume with
`--ckpt_path last`, and the non-finite step guard.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from trainers.data import RAGDataModule
from trainers.module import RAGModule
from trainers.run import Preempted, RunCheckpoints, resume_path, run_callbacks

RESUME_FLAG = "--ckpt_path last"


class RAGCLI(LightningCLI):
    """Links the model's size and index to the data module, so each is set once."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.size", "data.model_size")
        parser.link_arguments("model.index_dir", "data.index_dir")

    def before_fit(self) -> None:
        checkpoints = next(c for c in self.trainer.callbacks if isinstance(c, RunCheckpoints))
        folder = checkpoints.resolve_dirpath(self.trainer)
        interval = self.trainer.val_check_interval
        if checkpoints.every_n_steps is None and isinstance(interval, int):
            checkpoints.every_n_steps = interval
        if self.config_init[self.subcommand].get("ckpt_path") is None:
            resume_path(folder, resume=False, flag=RESUME_FLAG,  # refuses to write over
                        folder_flag="--trainer.default_root_dir")  # an earlier run
        self._resolve_last()

    def _resolve_last(self) -> None:
        """`--ckpt_path last` means this run's newest save (`checkpoints/last.ckpt`), refused
        by name if there is none. Lightning resolves "last" only through its own
        ModelCheckpoint: with `RunCheckpoints` it warned, started again from step 0 and
        overwrote the run's `last.ckpt`."""
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            checkpoints = next(c for c in self.trainer.callbacks
                               if isinstance(c, RunCheckpoints))
            folder = checkpoints.resolve_dirpath(self.trainer)
            config["ckpt_path"] = str(resume_path(folder, resume=True, flag=RESUME_FLAG))

    before_validate = before_test = before_predict = _resolve_last


def cli_main(args=None, *, run: bool = True) -> RAGCLI:
    try:
        return RAGCLI(RAGModule, RAGDataModule, args=args, run=run,
                      save_config_kwargs={"overwrite": True},
                      trainer_defaults={"callbacks": run_callbacks(None)})
    except Preempted as stop:  # exit code 75: requeue, then `fit ... --ckpt_path last`
        print(f"{stop}; continue with --ckpt_path last", file=sys.stderr, flush=True)
        raise
