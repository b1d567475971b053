"""The second stage (`rag_mm.rescorer`): it starts as the search's order, orders the
candidates by its own score, that score is what the reader mixes by, its gradients reach the
query encoder, it learns which document tokens queries predict, and bad settings are refused.

Run: `.venv/bin/python -m pytest tests/test_rescorer.py -q`
"""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import retrieval_index
from rag_mm.config import RetrieverConfig, model_config
from rag_mm.model import build_model
from rag_mm.rescorer import Rescorer
from rag_mm.tokenizer import load_tokenizer


def _rescoring_model(demo, **retriever):
    config = model_config("tiny", mode="rag")
    config = replace(config, retriever=replace(config.retriever, rescore=True, **retriever))
    torch.manual_seed(0)
    return build_model(config, backend=retrieval_index.load(demo / "index"))


def _batch(demo, config, rows: int = 6):
    examples = pd.read_parquet(demo / "data" / "test.parquet").head(rows)
    tok = load_tokenizer(None)
    prompts = tok(list(examples["prompt"]), padding="max_length",
                  max_length=config.max_prompt_tokens, truncation=True, return_tensors="pt")
    index = retrieval_index.load(demo / "index")
    ids = [d["id"] for d in index.documents(np.arange(len(index)))]
    targets = tok(list(examples["target"]), padding="max_length",
                  max_length=config.max_target_tokens, return_tensors="pt",
                  add_special_tokens=False, truncation=True)["input_ids"]
    g = torch.Generator().manual_seed(0)
    return {"images": torch.rand(rows, 3, 32, 32, generator=g) * 2 - 1,
            "prompt_ids": prompts["input_ids"], "prompt_mask": prompts["attention_mask"],
            "target_ids": targets, "target_mask": targets != 0,
            "gold_keys": torch.tensor([ids.index(i) for i in examples["gold_id"]])}


def test_at_init_the_second_stage_is_the_index_and_keeps_the_search_order(demo):
    """q' = q and, for the mean-pooling MiniLM, d' = the stored vector (up to the rounding of
    another batch shape), so the candidates keep the search's order and the scores are the
    first stage's."""
    model = _rescoring_model(demo).eval()
    unit = model.retrieval
    batch = _batch(demo, model.config)
    keys = np.arange(len(unit.backend)).reshape(1, -1)
    stored = torch.as_tensor(unit.backend.vectors(keys[0]))
    torch.testing.assert_close(unit._rescored_vectors(keys, stored)[0], stored,
                               atol=2e-6, rtol=0)
    with torch.no_grad():
        retrieved = unit.retrieve(batch)
        q = unit.query_encoder(batch["images"], batch["prompt_ids"], batch["prompt_mask"])
        _, searched = unit.backend.search(q, model.config.retriever.num_candidates)
    np.testing.assert_array_equal(retrieved.candidates, searched)
    first = torch.einsum("bd,bkd->bk", q, unit._stored_vectors(retrieved.keys, q))
    torch.testing.assert_close(retrieved.doc_logits, first / model.config.retriever.temperature,
                               atol=1e-4, rtol=0)


def test_candidates_are_ordered_by_the_second_score_and_the_reader_mixes_by_it(demo):
    model = _rescoring_model(demo).eval()
    unit = model.retrieval
    with torch.no_grad():  # a second stage far from its init, so the order changes
        for p in (unit.rescorer.token_score.weight, unit.rescorer.mix.weight,
                  unit.rescorer.image_proj.weight):
            p.normal_(0.0, 0.5)
    batch = _batch(demo, model.config)
    with torch.no_grad():
        retrieved = unit.retrieve(batch)
        text, image = unit.query_encoder.features(batch["images"], batch["prompt_ids"],
                                                  batch["prompt_mask"])
        q, q2 = unit.query_encoder.combine(text, image), unit.rescorer.query(text, image)
        _, searched = unit.backend.search(q, model.config.retriever.num_candidates)
        scores = torch.einsum("bd,bkd->bk", q2, unit._rescored_vectors(retrieved.candidates, q2))
    assert (np.sort(retrieved.candidates, 1) == np.sort(searched, 1)).all()  # the same set
    assert (retrieved.candidates != searched).any()  # in another order,
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # the second stage's, best first
    k = model.config.retriever.top_k
    torch.testing.assert_close(retrieved.doc_logits,
                               scores[:, :k] / model.config.retriever.temperature)


@pytest.mark.parametrize("reader", ["rag", "fid"])
def test_generator_loss_reaches_both_query_heads_and_the_document_tower(demo, reader):
    """Contrastive weight 0: the reader's loss reaches the query encoder's vision tower, the
    second query head and the document tower only through the second stage's scores."""
    config = model_config("tiny", mode="rag")
    config = replace(config, reader=replace(config.reader, kind=reader, counterfactual=0.0),
                     retriever=replace(config.retriever, rescore=True, contrastive_weight=0.0))
    torch.manual_seed(0)
    model = build_model(config, backend=retrieval_index.load(demo / "index"))
    with torch.no_grad():
        model.retrieval.rescorer.mix.weight.normal_(0.0, 0.1)  # so token_score has a gradient
    losses = model(_batch(demo, config))
    losses["loss"].backward()
    rescorer = model.retrieval.rescorer
    for name, p in [("token_score", rescorer.token_score.weight), ("mix", rescorer.mix.weight),
                    ("image_proj'", rescorer.image_proj.weight),
                    ("query vision", next(model.retrieval.query_encoder.vision.parameters()))]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the first stage's own head learns only from its contrastive loss (weight 0 here)
    grad = model.retrieval.query_encoder.image_proj.weight.grad
    assert grad is None or grad.abs().sum() == 0


def test_retriever_loss_trains_the_second_stage_against_the_same_positives(demo):
    model = _rescoring_model(demo)
    batch = _batch(demo, model.config)
    model.set_shared_negatives(batch["gold_keys"].numpy())
    loss = model.retrieval(batch, contrastive_only=True)
    assert loss.shape == (len(batch["gold_keys"]),)
    loss.sum().backward()
    assert model.retrieval.rescorer.mix.weight.grad.abs().sum() > 0
    assert model.retrieval.query_encoder.image_proj.weight.grad.abs().sum() > 0
    # the sum of the two stages' InfoNCE: without the second stage, the first one's alone
    plain = replace(model.config, retriever=replace(model.config.retriever, rescore=False))
    torch.manual_seed(0)
    first = build_model(plain, backend=model.retrieval.backend)
    first.load_state_dict({k: v for k, v in model.state_dict().items()
                           if ".rescorer." not in k})
    first.set_shared_negatives(batch["gold_keys"].numpy())
    with torch.no_grad():
        alone = first.retrieval(batch, contrastive_only=True)
        both = model.retrieval(batch, contrastive_only=True)
    assert (both > alone + 1e-3).all()  # the second stage's term is > 0 for every example


def test_the_document_tower_learns_which_tokens_queries_predict():
    """Documents of 2 name tokens and 6 noise tokens of the same norm (a name token carries a
    feature the noise lacks, as token identity does in a real tower's states); a query is
    the mean of its document's names. Mean pooling (the init) gives the noise 3/4 of each
    vector; trained on half the documents, the tower finds the other half's documents from
    their queries, though most of their names never occurred in training."""
    g = torch.Generator().manual_seed(0)
    dim, docs, names = 32, 200, 400
    name_vocab = F.normalize(torch.randn(names, dim, generator=g), dim=-1)
    name_vocab[:, 0] = 1.0
    picks = torch.stack([torch.randperm(names, generator=g)[:2] for _ in range(docs)])
    noise = F.normalize(torch.randn(docs, 6, dim, generator=g), dim=-1)
    noise[..., 0] = 0.0
    hidden = torch.cat([name_vocab[picks], noise], dim=1)
    mask = torch.ones(docs, 8, dtype=torch.bool)
    queries = F.normalize(name_vocab[picks].mean(1), dim=-1)
    tower = Rescorer(dim, 4)
    params = [tower.token_score.weight, tower.token_score.bias, tower.mix.weight]
    for p in params:
        torch.nn.init.zeros_(p)
    train, held_out = torch.arange(0, docs, 2), torch.arange(1, docs, 2)

    def recall() -> float:
        with torch.no_grad():
            best = (queries[held_out] @ tower.pool(hidden, mask).T).argmax(1)
        return float((best == held_out).float().mean())

    before = recall()
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(300):
        logits = queries[train] @ tower.pool(hidden[train], mask[train]).T / 0.05
        loss = F.cross_entropy(logits, torch.arange(len(train)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = recall()
    assert before < 0.6 and after > 0.9, (before, after)  # measured: 0.45 -> 0.96


def test_bad_settings_are_refused_by_name(demo):
    with pytest.raises(ValueError, match="rescore.*train_text_encoder=False"):
        RetrieverConfig(rescore=True, train_text_encoder=True)
    with pytest.raises(ValueError, match="rescore and train_doc_encoder"):
        RetrieverConfig(rescore=True, train_doc_encoder=True)
    with pytest.raises(ValueError, match="rescore_heads must be >= 1"):
        RetrieverConfig(rescore_heads=0)

    class ImageIndex:
        def __init__(self) -> None:
            self.path = "some/index"
            self.manifest = {"encoder": {"kind": "multimodal"}}

    model = _rescoring_model(demo)
    with pytest.raises(ValueError, match="rescore embeds document texts only.*some/index.*"
                                         "rescore=False"):
        model.retrieval.attach(ImageIndex(), check_encoder=False)
