"""Generation metrics under PipelineStrategy equal one process's.

`Trainer.validate` of the tiny RAG module under the strategy (pp=2 on 2 gloo processes;
pp=2 x dp=2 with FSDP2 on 4) logs `val/exact_match` and `val/recall@2` from greedy answers
decoded through the pipeline (`trainers.parallel.answer`). The case is made so that neither
is trivially 0: the [SEP] row of the LM head is pushed so that some answers end early, and
per batch some targets are the model's own greedy answers and some gold keys one of its
retrieved documents. Every rank must log the one-process values, and the answer tokens and
retrieved keys themselves must equal `RAGModel.generate`'s.

Run: .venv/bin/pytest tests/distributed/test_answer.py -q
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from rag_mm.model import synthetic_batch
from tests.helpers.parallel import NUM_DOCS, TWO, make_module
from trainers.parallel.strategy import PipelineStrategy

GLOBAL_BATCH = 4
NUM_BATCHES = 2
MATCHED_ROWS = ([0, 1, 3], [2])  # per batch: targets set to the model's own answer
GOLD_ROWS = ([1, 2], [0])  # per batch: gold key set to the 2nd retrieved document
METRICS = ("val/exact_match", "val/recall@2")


def make_case() -> tuple[dict, list[dict]]:
    """The module's weights (with [SEP] pushed up) and the validation batches."""
    module = make_module()
    module.configure_model()  # built on the meta device: materialised in this process
    model = module.model.eval()
    batches = [synthetic_batch(model.config, GLOBAL_BATCH, seed=100 + i, num_docs=NUM_DOCS)
               for i in range(NUM_BATCHES)]
    tokens, _ = model.generate(batches[0])
    with torch.no_grad():  # [SEP] wins wherever row 0's second token would: some answers end
        if model.head.pointer is not None:  # the vocabulary decides (the copy term, weight
            # sigmoid(-12) ~ 6e-6, is still mixed in and computed on both sides)
            model.head.pointer.gate.bias.fill_(12.0)
            tokens, _ = model.generate(batches[0])
        model.head.lm_head.weight[model.sep_token_id] = 2 * model.head.lm_head.weight[tokens[0, 1]]
    for batch, matched, gold_rows in zip(batches, MATCHED_ROWS, GOLD_ROWS, strict=True):
        tokens, retrieved = model.generate(batch)
        batch["target_ids"][matched] = tokens[matched]
        batch["gold_keys"][gold_rows] = torch.as_tensor(retrieved.keys[gold_rows, 1])
    return module.state_dict(), batches


def validate(module, batches: list[dict], **trainer_kwargs) -> tuple[dict, list]:
    """The logged validation metrics, and (tokens, keys) of every batch's decoding."""
    decoded = []
    counts = module.answer_counts

    def recording(batch, tokens, keys):
        decoded.append((tokens.clone(), keys.copy()))
        return counts(batch, tokens, keys)

    module.answer_counts = recording
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False,
                        **trainer_kwargs)
    trainer.validate(module, torch.utils.data.DataLoader(batches, batch_size=None))
    logged = {name: trainer.callback_metrics[name].item() for name in METRICS}
    return logged, decoded


def _answer_worker(rank: int, world_size: int, out_dir: str, pp: int) -> None:
    case = torch.load(Path(out_dir) / "case.pt", weights_only=False)
    module = make_module()
    module.load_state_dict(case["state_dict"])
    dp, dp_rank = world_size // pp, rank // pp  # ranks are (dp, pp) row-major
    size = GLOBAL_BATCH // dp
    batches = [{k: v[dp_rank * size:(dp_rank + 1) * size] for k, v in b.items()}
               for b in case["batches"]]
    strategy = PipelineStrategy(partition=TWO, pipeline_parallel_size=pp, num_microbatches=2,
                                schedule="1f1b")
    logged, decoded = validate(module, batches, devices=world_size, strategy=strategy)
    torch.save({"logged": logged, "decoded": decoded, "dp_rank": dp_rank},
               Path(out_dir) / f"answer_{rank}.pt")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world_size, pp", [(2, 2), (4, 2)], ids=["pp2", "pp2xdp2"])
def test_generation_metrics_match_single_process(world_size, pp, tmp_path):
    from trainers.parallel.local import run_local

    state_dict, batches = make_case()
    torch.save({"state_dict": state_dict, "batches": batches}, tmp_path / "case.pt")
    module = make_module()
    module.load_state_dict(state_dict)
    ref_logged, ref_decoded = validate(module, batches, devices=1)
    assert 0 < ref_logged["val/exact_match"] < 1 and 0 < ref_logged["val/recall@2"] < 1
    ref_tokens = torch.stack([tokens for tokens, _ in ref_decoded])
    ended = (ref_tokens[..., :-1] == module.model.sep_token_id).any(-1)
    assert ended.any() and not ended.all()  # early ends and full-length answers both occur

    run_local(_answer_worker, world_size, str(tmp_path), pp)
    dp = world_size // pp
    for rank in range(world_size):
        result = torch.load(tmp_path / f"answer_{rank}.pt", weights_only=False)
        logged = result["logged"]
        for name in METRICS:
            assert logged[name] == pytest.approx(ref_logged[name], rel=1e-6, abs=0), name
        size = GLOBAL_BATCH // dp
        rows = slice(result["dp_rank"] * size, (result["dp_rank"] + 1) * size)
        assert len(result["decoded"]) == NUM_BATCHES
        for (tokens, keys), (ref_tok, ref_keys) in zip(result["decoded"], ref_decoded, strict=True):
            assert torch.equal(tokens, ref_tok[rows]), (rank, tokens, ref_tok[rows])
            assert (keys == ref_keys[rows]).all(), (rank, keys, ref_keys[rows])
