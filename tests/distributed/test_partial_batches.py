"""A partial last batch under PipelineStrategy equals one process.

Two gloo processes (pp=2, 1F1B, 2 micro-batches) and data loaders of batch size 4 over 7
examples, so the last batch has 3 rows (the pipeline's stage shapes are fixed at 4: the
strategy pads the batch with copies of its rows, hidden from the in-batch negatives, and
gives them weight 0):

- `Trainer.validate` logs `val/loss`, `val/generator_loss`, `val/retriever_loss`,
  `val/exact_match` and `val/recall@2` equal to one process running the module's losses
  over the same micro-batches and its own `answer_metrics` (neither metric 0 or 1: some
  targets are the model's own answers, some gold keys one of its retrieved documents);
- `Trainer.fit` for 2 steps over batches of 4 and 3 (drop_last=False): both steps' losses,
  the partial step's every gradient and every value after AdamW equal one process's;
- over dp=2 replicas (pp=1, FSDP2), `Trainer.validate` through `EvalShardSampler` (7 rows:
  shares of 4 and 3 + a filler row marked not valid) logs what one process logs over the
  7 rows once each (Lightning's `DistributedSampler` would count row 0 twice).

Run: .venv/bin/pytest tests/distributed/test_partial_batches.py -q     (about 40 s on 2 cores)
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from rag_mm.model import synthetic_batch
from tests.helpers.parallel import (
    ALL,
    NUM_DOCS,
    TWO,
    Reference,
    assert_fp32_close,
    make_module,
)
from trainers.parallel.strategy import PipelineStrategy

ROWS = 7
BATCH = 4  # loader batch size: batches of 4, then 3
MICRO = 2  # micro-batches per batch: 2 rows each
METRICS = ("val/loss", "val/generator_loss", "val/retriever_loss", "val/exact_match",
           "val/recall@2")
MATCHED = [0, 3, 5]  # targets set to the model's own greedy answer
GOLD = [1, 4, 6]  # gold key set to the model's 2nd retrieved document


def stack(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([row[k] for row in rows]) for k in rows[0]}


def loader(examples: dict[str, torch.Tensor]) -> torch.utils.data.DataLoader:
    rows = [{k: v[i] for k, v in examples.items()} for i in range(ROWS)]
    return torch.utils.data.DataLoader(rows, batch_size=BATCH, collate_fn=stack, drop_last=False)


def make_case() -> tuple[dict, dict, dict]:
    """The module's weights (with [SEP] pushed up, so some answers end early), the
    validation examples (made so neither metric is trivial) and the training examples."""
    module = make_module()
    module.configure_model()  # built on the meta device: materialised in this process
    model = module.model.eval()
    val = synthetic_batch(model.config, ROWS, seed=100, num_docs=NUM_DOCS)
    tokens, _ = model.generate(val)
    with torch.no_grad():
        model.head.lm_head.weight[model.sep_token_id] = 2 * model.head.lm_head.weight[tokens[0, 1]]
    tokens, retrieved = model.generate(val)
    val["target_ids"][MATCHED] = tokens[MATCHED]
    val["gold_keys"][GOLD] = torch.as_tensor(retrieved.keys[GOLD, 1])
    train = synthetic_batch(model.config, ROWS, seed=200, num_docs=NUM_DOCS)
    return module.state_dict(), val, train


def micro_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(rows, 2) per-example losses, computed over the pipeline's micro-batches of
    BATCH // MICRO rows (in-batch negatives are taken within one)."""
    size = BATCH // MICRO
    parts = [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, len(batch["images"]), size)]
    return torch.cat([model.head(*model.run_chain(model.retrieval(part))) for part in parts])


class Recorder(L.Callback):
    """Every step's logged loss; gradients before, values after each optimizer step."""

    def __init__(self) -> None:
        self.losses, self.grads, self.values = [], [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters()
                           if p.grad is not None})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(trainer.callback_metrics["train/loss"].item())
        self.values.append({n: p.detach().clone() for n, p in pl_module.named_parameters()
                            if p.requires_grad})


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False,
                     use_distributed_sampler=False, num_sanity_val_steps=0, **kwargs)


def run(case: dict, *, world_size: int, phases=("validate", "fit"),
        precision: str = "32-true") -> dict:
    """validate on the validation examples, then (a fresh module) fit 2 steps: under the
    strategy (pp=2) with world_size 2, else in one process."""
    results = {}
    for phase in phases:
        module = make_module()
        module.load_state_dict(case["state_dict"])
        trainer_kwargs = {"devices": world_size, "precision": precision}
        if world_size > 1:  # a fresh strategy per Trainer
            trainer_kwargs["strategy"] = PipelineStrategy(
                partition=TWO, pipeline_parallel_size=2, num_microbatches=MICRO, schedule="1f1b")
        else:
            one_process(module)
        if phase == "validate":
            run_trainer = trainer(**trainer_kwargs)
            run_trainer.validate(module, loader(case["val"]))
            results["logged"] = {m: run_trainer.callback_metrics[m].item() for m in METRICS}
        else:
            recorder = Recorder()
            trainer(max_steps=2, callbacks=[recorder], gradient_clip_val=1.0,
                    **trainer_kwargs).fit(module, loader(case["train"]))
            results.update(losses=recorder.losses, grads=recorder.grads, values=recorder.values)
    return results


def one_process(module) -> None:
    """The module's losses over the pipeline's micro-batches, its own generation metrics."""
    def step(batch, prefix):
        means = micro_losses(module.model, batch).mean(0)
        metrics = {f"{prefix}/loss": means.sum(), f"{prefix}/generator_loss": means[0],
                   f"{prefix}/retriever_loss": means[1]}
        if prefix == "val":
            metrics.update({f"val/{k}": v for k, v in module.answer_metrics(batch).items()})
        module.log_dict(metrics, batch_size=len(batch["images"]))
        return means.sum()

    module.training_step = lambda batch, batch_idx: step(batch, "train")
    module.validation_step = lambda batch, batch_idx: step(batch, "val")


def _worker(rank: int, world_size: int, out_dir: str) -> None:
    case = torch.load(Path(out_dir) / "case.pt", weights_only=False)
    result = run(case, world_size=world_size)
    torch.save(result, Path(out_dir) / f"partial_{rank}.pt")


@pytest.mark.distributed
@pytest.mark.slow
def test_partial_last_batches_match_single_process(tmp_path):
    from trainers.parallel.local import run_local

    state_dict, val, train = make_case()
    case = {"state_dict": state_dict, "val": val, "train": train}
    torch.save(case, tmp_path / "case.pt")
    ref = run(case, world_size=1)
    exact = run(case, world_size=1, phases=("fit",), precision="64-true")  # the fp32 truth
    assert 0 < ref["logged"]["val/exact_match"] < 1 and 0 < ref["logged"]["val/recall@2"] < 1
    assert len(ref["losses"]) == 2

    run_local(_worker, 2, str(tmp_path))
    results = [torch.load(tmp_path / f"partial_{r}.pt", weights_only=False) for r in range(2)]
    for result in results:  # every rank logs the one-process numbers
        for name in METRICS:  # fp32: the same per-row sums in another order
            assert result["logged"][name] == pytest.approx(ref["logged"][name], rel=1e-5), name
        assert result["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    for key in ("grads", "values"):
        kept = {n: v for r in results for n, v in r[key][1].items()}  # step 2: 3 rows
        assert kept.keys() == ref[key][1].keys(), key
        for name, expected in Reference.pair(ref[key][1], exact[key][1]).items():
            assert_fp32_close(kept[name], expected, f"{key} {name}")


def stack_marked(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([torch.as_tensor(row[k]) for row in rows]) for k in rows[0]}


def _dp_worker(rank: int, world_size: int, out_dir: str) -> None:
    from trainers.data import EvalShardSampler, MarkedRows

    case = torch.load(Path(out_dir) / "case.pt", weights_only=False)
    module = make_module()
    module.load_state_dict(case["state_dict"])
    rows = [{k: v[i] for k, v in case["val"].items()} for i in range(ROWS)]
    loader = torch.utils.data.DataLoader(
        MarkedRows(rows), batch_size=2, collate_fn=stack_marked,
        sampler=EvalShardSampler(rows, num_replicas=world_size, rank=rank))
    strategy = PipelineStrategy(partition=ALL, pipeline_parallel_size=1, data_parallel_size=2,
                                num_microbatches=1, schedule="gpipe")
    run_trainer = trainer(devices=world_size, strategy=strategy)
    run_trainer.validate(module, loader)
    logged = {m: run_trainer.callback_metrics[m].item() for m in METRICS}
    torch.save(logged, Path(out_dir) / f"dp_{rank}.pt")


@pytest.mark.distributed
@pytest.mark.slow
def test_validation_over_data_parallel_replicas_counts_every_row_once(tmp_path):
    from trainers.parallel.local import run_local

    state_dict, val, _ = make_case()
    torch.save({"state_dict": state_dict, "val": val}, tmp_path / "case.pt")
    module = make_module()
    module.load_state_dict(state_dict)
    model = module.model.eval()
    # the replicas' batches (rank 0: rows 0 2 4 6, rank 1: rows 1 3 5 + a filler), one
    # micro-batch each: in-batch negatives are taken within these groups
    groups = [[0, 2], [4, 6], [1, 3], [5]]
    with torch.no_grad():
        losses = torch.cat([model.head(*model.run_chain(model.retrieval(
            {k: v[group] for k, v in val.items()}))) for group in groups]).mean(0)
    expected = {"val/loss": losses.sum().item(), "val/generator_loss": losses[0].item(),
                "val/retriever_loss": losses[1].item(),
                **{f"val/{k}": v.item() for k, v in module.answer_metrics(val).items()}}
    assert 0 < expected["val/exact_match"] < 1 and 0 < expected["val/recall@2"] < 1

    run_local(_dp_worker, 2, str(tmp_path))
    for rank in range(2):
        logged = torch.load(tmp_path / f"dp_{rank}.pt")
        for name in METRICS:  # rates of counts: equal; losses: fp32 sums in another order
            assert logged[name] == pytest.approx(expected[name], rel=1e-5), name


def test_eval_shards_cover_every_row_once_in_equal_lengths():
    from trainers.data import EvalShardSampler

    for size, replicas in [(7, 2), (8, 2), (10, 4), (2, 4), (0, 2)]:
        shares = [list(EvalShardSampler(range(size), num_replicas=replicas, rank=r))
                  for r in range(replicas)]
        assert len({len(share) for share in shares}) == 1
        assert all(len(share) == -(-size // replicas) for share in shares)
        valid = sorted(row for share in shares for row, ok in share if ok)
        assert valid == list(range(size))
        for share in shares:  # fillers come last
            marks = [ok for _, ok in share]
            assert marks == sorted(marks, reverse=True)
