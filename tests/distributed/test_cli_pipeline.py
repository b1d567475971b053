"""The README's parallel recipe end to end: LightningCLI under torchrun with PipelineStrategy.

On a small demo task written by `scripts/make_demo_data.py` and a FAISS index built by
`scripts/build_index.py` (the README's first two demo steps), the README's command

    torchrun --nproc_per_node=4 scripts/finetune.py fit --config configs/demo_rag.yaml \\
        --config configs/pipeline_2x2.yaml --trainer.accelerator cpu

(pp=2 x tp=2, partition "auto", 1F1B over 4 micro-batches) runs at the tiny size with a
third YAML for the small settings: 3 steps (the first a retriever warm-up step on stage 0,
then joint), validation after step 3 over 18 examples in batches of 8 (the last one
partial), the final-step checkpoint `trainers.run` writes. Then `finetune.py test --ckpt_path` on
4 processes from that checkpoint. Checked: every logged number is finite, the checkpoint is
a torch.distributed.checkpoint folder, and the test's generator loss, exact match and
recall@k equal a one-process `Trainer.test` of the same checkpoint (those do not depend on
micro-batching; the retriever loss's in-batch negatives do).

Run: .venv/bin/pytest tests/distributed/test_cli_pipeline.py -q     (about 1.5 min on 2 cores)
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ["--config", "configs/demo_rag.yaml", "--config", "configs/pipeline_2x2.yaml"]
BATCH = 8
SAME = ("generator_loss", "exact_match")  # + recall@k: independent of micro-batching


def run(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(list(args), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def torchrun(*args: str) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4",
               "scripts/finetune.py", *args)


def metrics(csv_path: Path) -> dict[str, float]:
    """The last logged value of every metric in a CSVLogger file."""
    logged: dict[str, float] = {}
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            logged.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return logged


@pytest.fixture(scope="module")
def demo_task(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli_demo")
    python = sys.executable
    run(python, "scripts/make_demo_data.py", "--out", str(root / "data"), "--entities", "20",
        "--examples-per-fact", "2", "--eval-examples-per-fact", "2")
    run(python, "scripts/build_index.py", "--corpus", str(root / "data" / "corpus.parquet"),
        "--out", str(root / "index"))
    return root


@pytest.mark.distributed
@pytest.mark.slow
def test_readme_parallel_recipe_fits_then_tests_from_its_checkpoint(demo_task, tmp_path):
    small = tmp_path / "small.yaml"
    small.write_text(
        f"model:\n  size: tiny\n  index_dir: {demo_task / 'index'}\n"
        f"  retriever_warmup_steps: 1\n  warmup_steps: 1\n"
        f"data:\n  data_dir: {demo_task / 'data'}\n  batch_size: {BATCH}\n"
        f"trainer:\n  max_steps: 3\n  val_check_interval: 3\n  log_every_n_steps: 1\n"
        f"  enable_progress_bar: false\n  default_root_dir: {tmp_path / 'run'}\n"
        f"  logger:\n    class_path: lightning.pytorch.loggers.CSVLogger\n"
        f"    init_args:\n      save_dir: {tmp_path / 'logs'}\n      name: cli\n")
    config = [*RECIPE, "--config", str(small), "--trainer.accelerator", "cpu"]
    torchrun("fit", *config)

    fit = metrics(tmp_path / "logs" / "cli" / "version_0" / "metrics.csv")
    recall = next(name for name in fit if name.startswith("val/recall@"))
    for name in ("train/retriever_warmup_loss", "train/loss", "val/loss", "val/exact_match",
                 recall):
        assert math.isfinite(fit[name]), (name, fit)
    assert fit["step"] >= 2  # the joint steps after the warm-up step were logged
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"  # trainers.run's final-step save
    checkpoint = last.resolve()
    assert checkpoint.name == "step-0000003.ckpt" and (checkpoint / ".metadata").is_file()

    torchrun("test", *config, "--ckpt_path", str(checkpoint))
    tested = metrics(tmp_path / "logs" / "cli" / "version_1" / "metrics.csv")
    for name in ("loss", "retriever_loss", *SAME, recall.split("/")[1]):
        assert math.isfinite(tested[f"test/{name}"]), (name, tested)

    reference = one_process_test(demo_task, checkpoint)
    for name in (*SAME, recall.split("/")[1]):  # tp=2 sums in another order: fp32 slack
        assert tested[f"test/{name}"] == pytest.approx(reference[f"test/{name}"], rel=1e-4), name


def one_process_test(demo_task: Path, checkpoint: Path) -> dict[str, float]:
    """`Trainer.test` in this process of the checkpoint's weights, read with plain
    torch.distributed.checkpoint (no process group)."""
    import lightning as L
    import torch.distributed.checkpoint as dcp

    from trainers.data import RAGDataModule
    from trainers.module import RAGModule
    from trainers.run.checkpoints import load_module

    recipe = yaml.safe_load((ROOT / "configs" / "demo_rag.yaml").read_text())["model"]
    module = RAGModule(size="tiny", mode="rag", index_dir=str(demo_task / "index"),
                       rescore=recipe["rescore"], novel_spans=recipe["novel_spans"])
    state = {"state_dict": module.state_dict()}
    dcp.load(state, checkpoint_id=checkpoint)
    module.load_state_dict(state["state_dict"])
    # scripts/evaluate.py's reader gives the same weights from the CLI's checkpoint (whose
    # hyperparameters carry LightningCLI's `_instantiator`)
    read = load_module(checkpoint, index_dir=str(demo_task / "index")).state_dict()
    assert read.keys() == state["state_dict"].keys()
    assert all(torch.equal(read[k], v) for k, v in state["state_dict"].items())
    data = RAGDataModule(str(demo_task / "data"), index_dir=str(demo_task / "index"),
                         model_size="tiny", batch_size=BATCH)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    torch.manual_seed(0)
    (logged,) = trainer.test(module, datamodule=data, verbose=False)
    return logged
