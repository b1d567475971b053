"""Lightning glue: data module, training steps, checkpoints, evaluation, CLI recipes.

Run: `.venv/bin/python -m pytest tests/test_trainers.py -q`
"""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch

import retrieval_index
from rag_mm.data import DataError
from trainers.data import RAGDataModule
from trainers.evaluate import evaluate, format_table
from trainers.module import RAGModule, exact_match

ROOT = Path(__file__).resolve().parents[1]


def test_batches_carry_index_keys_of_the_gold_documents(demo):
    data = RAGDataModule(demo / "data", index_dir=str(demo / "index"), model_size="tiny",
                         batch_size=8)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["images"].shape == (8, 3, 32, 32)
    assert batch["prompt_ids"].shape == (8, 12)
    index = retrieval_index.load(demo / "index", check_encoder=False)
    rows = data.datasets["train"]
    assert list(index.key_of(rows["gold_id"][:5])) == rows["gold_key"][:5]
    # every target ends with [SEP] inside the budget
    sep = data.tokenizer.sep_token_id
    assert ((batch["target_ids"] == sep).sum(1) == 1).all()


def test_too_long_targets_name_the_row_and_the_budget(demo, tmp_path):
    frame = pd.read_parquet(demo / "data" / "train.parquet").head(6)
    frame.loc[4, "target"] = "a very long answer that cannot fit"
    frame.to_parquet(tmp_path / "train.parquet")
    data = RAGDataModule(train_path=str(tmp_path / "train.parquet"), model_size="tiny")
    with pytest.raises(DataError, match=r"row 4: .*max_target_tokens=3"):
        data.setup("fit")


def test_unknown_gold_ids_are_refused(demo, tmp_path):
    frame = pd.read_parquet(demo / "data" / "train.parquet").head(6)
    frame.loc[2, "gold_id"] = "no-such-doc"
    frame.to_parquet(tmp_path / "train.parquet")
    data = RAGDataModule(train_path=str(tmp_path / "train.parquet"),
                         index_dir=str(demo / "index"), model_size="tiny")
    with pytest.raises(DataError, match="no-such-doc"):
        data.setup("fit")


def test_fit_checkpoint_and_evaluate(demo, tmp_path):
    L.seed_everything(0)
    data = RAGDataModule(demo / "data", index_dir=str(demo / "index"), model_size="tiny",
                         batch_size=8)
    module = RAGModule(size="tiny", index_dir=str(demo / "index"), retriever_warmup_steps=2)
    trainer = L.Trainer(max_steps=4, logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, limit_val_batches=1, val_check_interval=4,
                        num_sanity_val_steps=0, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    train_golds = set(data.gold_keys("train").tolist())
    shared = module.model.retrieval.shared_negative_keys.tolist()
    assert shared and set(shared) == train_golds - {-1}  # never a held-out document
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = RAGModule.load_from_checkpoint(ckpt, map_location="cpu")
    loaded.setup("test")
    for name, tensor in module.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor)
    assert loaded.model.retrieval.backend is not None  # re-attached from hparams.index_dir

    data.setup("test")
    results = evaluate({"rag": loaded}, data.test_dataloader())
    assert set(results["systems"]) == {"random document", "RAG (retrieved top-k)",
                                       "gold document (oracle)"}
    assert set(results["retriever"]["after training"]) == {"recall@1", "recall@2", "recall@8"}
    assert "| RAG (retrieved top-k) |" in format_table(results)
    json.dumps(results)


def test_exact_match_needs_every_target_token_and_the_end():
    target = torch.tensor([[2000, 102, 0], [2001, 102, 0]])
    mask = target != 0
    predicted = torch.tensor([[2000, 102, 0], [2001, 2002, 102]])
    assert exact_match(predicted, target, mask).tolist() == [True, False]


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_recipe_parses_against_the_cli(recipe):
    """Through the script itself; tests/test_recipes.py trains each recipe a few steps."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "finetune.py"), "fit", "--config", str(recipe),
         "--print_config"],
        check=False, capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model:" in result.stdout and "data:" in result.stdout


def test_retriever_warmup_and_joint_training_each_get_a_warmup_and_decay():
    from trainers.module import phase_bounds, warmup_cosine

    assert phase_bounds(100, 0) == [(0, 100)]
    assert phase_bounds(100, 100) == [(0, 100)]
    assert phase_bounds(100, 60) == [(0, 60), (60, 100)]
    factors = [warmup_cosine(s, 40, 10) for s in range(40)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0
    assert factors[-1] == pytest.approx(0.1, abs=0.01)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))  # decays after the warm-up
    assert warmup_cosine(0, 4, 50) == pytest.approx(0.5)  # short phases warm up in half
