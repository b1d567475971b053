"""The RAG model as plain nn.Modules: chain of units, losses, gradients, baselines, sizes.

Run: `.venv/bin/python -m pytest tests/test_model.py -q`
"""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rag_mm.config import ModelConfig, VisionConfig, model_config
from rag_mm.model import IGNORE, InMemoryBackend, build_model, synthetic_batch

NUM_DOCS = 40


@pytest.fixture(scope="module")
def backend():
    return InMemoryBackend.random(NUM_DOCS, seed=0)


@pytest.fixture(scope="module")
def tiny(backend):
    torch.manual_seed(0)
    return build_model(model_config("tiny"), backend=backend)


def test_units_form_the_declared_chain(tiny):
    names = [name for name, _ in tiny.units()]
    assert names == ["retrieval", "blocks.0", "blocks.1", "head"]
    assert tiny.colocation_groups() == [["retrieval"]]
    covered = {id(p) for _, unit in tiny.units() for p in unit.parameters()}
    assert covered == {id(p) for p in tiny.parameters()}


def test_running_the_units_in_order_equals_forward(tiny):
    batch = synthetic_batch(tiny.config, 4, num_docs=NUM_DOCS)
    torch.manual_seed(1)
    expected = tiny(batch)["loss"]
    carry = tiny.retrieval(batch)
    for name, unit in tiny.units()[1:-1]:
        carry = unit(*carry)
    losses = tiny.head(*carry)
    assert losses.shape == (4, 2)
    torch.testing.assert_close(losses.mean(0).sum(), expected)


def test_rag_marginal_matches_a_direct_computation(tiny):
    batch = synthetic_batch(tiny.config, 3, num_docs=NUM_DOCS)
    tiny = build_model(replace(tiny.config, reader=replace(tiny.config.reader, copy=False)),
                       backend=tiny.retrieval.backend)
    tiny.head.rerank = True
    tiny.train()  # gold_in_training: every example's gold document is read
    hidden, valid, labels, copy_ids, doc_logits, contrastive, gold = tiny.retrieval(batch)
    assert (gold.sum(1) == 1).all()
    hidden = tiny.run_chain((hidden, valid, labels, copy_ids, doc_logits, contrastive, gold))[0]
    states = tiny.head.norm(hidden)
    logits = tiny.head.lm_head(states).log_softmax(-1)
    k = doc_logits.shape[1]
    seq_logp = torch.zeros(len(hidden))
    relevance = torch.zeros(len(hidden))
    for row in range(len(hidden)):
        for pos in (labels[row] != IGNORE).nonzero().flatten():
            seq_logp[row] += logits[row, pos, labels[row, pos]]
        # the state that predicts the first answer token scores the document
        first = (labels[row] != IGNORE).nonzero().flatten()[0]
        relevance[row] = tiny.head.relevance(states[row, first])[0]
    r = relevance.view(-1, k)
    p_doc = (doc_logits + r).softmax(-1)
    marginal = -torch.log((p_doc * seq_logp.view(-1, k).exp()).sum(-1))
    rerank = -(r.log_softmax(-1) * gold).sum(-1)
    got = tiny.head(hidden, valid, labels, copy_ids, doc_logits, contrastive, gold)[:, 0]
    torch.testing.assert_close(got, marginal + rerank, rtol=1e-4, atol=1e-4)
    tiny.head.rerank = False  # the plain RAG marginal
    got = tiny.head(hidden, valid, labels, copy_ids, doc_logits, contrastive, gold)[:, 0]
    expected = -torch.log((doc_logits.softmax(-1) * seq_logp.view(-1, k).exp()).sum(-1))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_generator_gradient_reaches_the_query_encoder_through_document_scores(backend):
    torch.manual_seed(0)
    config = model_config("tiny")
    config = replace(config, retriever=replace(config.retriever, contrastive_weight=0.0))
    model = build_model(config, backend=backend)
    model(synthetic_batch(config, 4, num_docs=NUM_DOCS))["loss"].backward()
    query = model.retrieval.query_encoder
    assert query.image_proj.weight.grad.abs().sum() > 0
    assert query.text_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in query.text.parameters())  # frozen text tower


@pytest.mark.parametrize("mode,docs", [("closed_book", 1), ("gold", 1), ("random", 2), ("rag", 2)])
def test_every_mode_trains_and_generates(backend, mode, docs):
    torch.manual_seed(0)
    config = model_config("tiny", mode=mode)
    model = build_model(config, backend=backend)
    batch = synthetic_batch(config, 4, num_docs=NUM_DOCS)
    out = model(batch)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    tokens, retrieved = model.generate(batch)
    assert tokens.shape == (4, config.max_target_tokens)
    assert retrieved.keys.shape == (4, docs)


def test_gold_mode_names_examples_without_gold(backend):
    model = build_model(model_config("tiny", mode="gold"), backend=backend)
    batch = synthetic_batch(model.config, 3, num_docs=NUM_DOCS)
    batch["gold_keys"][1] = -1
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        model(batch)


def test_retrieval_without_an_index_says_how_to_attach_one():
    model = build_model(model_config("tiny"))
    with pytest.raises(ValueError, match="attach"):
        model(synthetic_batch(model.config, 2, num_docs=NUM_DOCS))


def test_closed_book_ignores_documents_entirely():
    model = build_model(model_config("tiny", mode="closed_book"))  # no backend needed
    carry = model.retrieval(synthetic_batch(model.config, 2))
    doc_tokens = carry[1][:, : model.config.max_doc_tokens]
    assert not doc_tokens.any()


def test_tied_embeddings_are_declared_as_a_colocation_group(backend):
    config = model_config("tiny")
    config = replace(config, generator=replace(config.generator, tie_embeddings=True))
    model = build_model(config, backend=backend)
    assert model.head.lm_head.weight is model.retrieval.tok_embed.weight
    assert ["retrieval", "head"] in model.colocation_groups()


def test_one_billion_configuration_on_meta_device():
    with torch.device("meta"):
        model = build_model(model_config("1b"))
    total = sum(p.numel() for p in model.parameters())
    assert 1.0e9 < total < 2.0e9
    assert all(p.device.type == "meta" for p in model.parameters())


def test_same_seed_same_weights(backend):
    def weights():
        torch.manual_seed(3)
        return build_model(model_config("tiny"), backend=backend).state_dict()

    first, second = weights(), weights()
    for name in first:
        torch.testing.assert_close(first[name], second[name])


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="patch_size"):
        VisionConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="mode"):
        ModelConfig(mode="oracle")
    with pytest.raises(ValueError, match="unknown model size"):
        model_config("7b")


def test_frozen_text_cache_gives_the_uncached_embedding(tiny):
    batch = synthetic_batch(tiny.config, 3)
    encoder = tiny.retrieval.query_encoder
    cached = encoder.embed_text(batch["prompt_ids"], batch["prompt_mask"])
    again = encoder.embed_text(batch["prompt_ids"], batch["prompt_mask"])
    direct = encoder.text(batch["prompt_ids"], batch["prompt_mask"])
    torch.testing.assert_close(cached, direct)
    torch.testing.assert_close(again, direct)
    assert F.cosine_similarity(cached, direct).min() > 0.9999


def test_gold_document_joins_the_top_k_only_in_training(backend):
    torch.manual_seed(0)
    model = build_model(model_config("tiny"), backend=backend)
    batch = synthetic_batch(model.config, 8, num_docs=NUM_DOCS)
    gold = batch["gold_keys"].numpy()
    assert (model.retrieval.retrieve(batch).keys == gold[:, None]).any(axis=1).all()
    model.eval()
    searched = model.retrieval.retrieve(batch)
    assert (searched.keys == searched.candidates[:, :2]).all()


def test_image_documents_reach_the_generator_when_enabled():
    from PIL import Image

    random = InMemoryBackend.random(6, seed=1)
    images = [Image.new("RGB", (32, 32), (40 * i, 0, 0)) if i % 2 else None for i in range(6)]
    backend = InMemoryBackend(random.vectors(np.arange(6)), [d["text"] for d in
                              random.documents(np.arange(6))], images)
    model = build_model(replace(model_config("tiny"), use_doc_images=True), backend=backend)
    batch = synthetic_batch(model.config, 3, num_docs=6)
    _, key_valid, *_ = model.retrieval(batch)
    patches = model.config.vision.num_patches
    image_slots = key_valid[:, model.config.max_doc_tokens : model.config.max_doc_tokens + patches]
    keys = model.retrieval.retrieve(batch).keys.reshape(-1)
    assert image_slots.all(dim=1).tolist() == [bool(k % 2) for k in keys]
    assert torch.isfinite(model(batch)["loss"])


def test_shared_negatives_enter_the_softmax_once():
    from rag_mm.retriever import contrastive_loss

    torch.manual_seed(0)
    q = F.normalize(torch.randn(3, 8), dim=-1)
    docs = F.normalize(torch.randn(6, 8), dim=-1)
    gold = torch.tensor([0, 1, 1])
    none = torch.full((3, 1), -1)
    shared_keys = torch.tensor([1, 4, 5])  # doc 1 is a gold of the batch: already a column
    got = contrastive_loss(q, docs[gold], gold, docs[none.clamp(min=0)], none, 0.1,
                           docs[shared_keys], shared_keys)
    for row in range(3):
        # in-batch golds (a duplicate gold counts once) + the shared docs not in the batch
        others = sorted({0, 1} - {int(gold[row])} | {4, 5})
        logits = (q[row] @ docs[[int(gold[row]), *others]].T) / 0.1
        torch.testing.assert_close(got[row], -F.log_softmax(logits, dim=0)[0])
    empty = contrastive_loss(q, docs[gold], gold, docs[none.clamp(min=0)], none, 0.1,
                             docs[:0], shared_keys[:0])
    plain = contrastive_loss(q, docs[gold], gold, docs[none.clamp(min=0)], none, 0.1)
    torch.testing.assert_close(empty, plain)
    assert (got > plain).all()  # more negatives, larger loss


def test_shared_negatives_are_training_gold_keys_capped_and_train_only(backend):
    torch.manual_seed(0)
    config = model_config("tiny")
    model = build_model(replace(config, retriever=replace(config.retriever, shared_negatives=5)),
                        backend=backend)
    model.set_shared_negatives([3, 3, -1, 7, 1])
    assert model.retrieval.shared_negative_keys.tolist() == [1, 3, 7]
    model.set_shared_negatives(np.arange(20))
    kept = model.retrieval.shared_negative_keys
    assert len(kept) == 5 and len(set(kept.tolist())) == 5 and kept.max() < 20
    batch = synthetic_batch(model.config, 4, num_docs=NUM_DOCS)
    with_pool = model.retrieval.retrieve(batch).contrastive
    model.set_shared_negatives([])
    without = model.retrieval.retrieve(batch).contrastive
    assert (with_pool > without).all()
    model.eval()  # evaluation losses use in-batch negatives only: the pool changes nothing
    evaluated = {}
    for pool in ([], np.arange(20), [0, 1]):
        model.set_shared_negatives(pool)
        with torch.no_grad():
            evaluated[len(pool)] = (model.retrieval.retrieve(batch).contrastive,
                                    model(batch)["loss"])
    for size in (20, 2):
        for got, expected in zip(evaluated[size], evaluated[0], strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert evaluated[0][1] > 0 and not torch.equal(evaluated[0][0], with_pool)
    with pytest.raises(ValueError, match="shared_negatives"):
        replace(config.retriever, shared_negatives=-1)


def test_caches_that_overflow_recompute_the_batch_they_serve(tiny):
    """A batch whose new entries push a cache past its size empties it and computes the whole
    batch again: before, the batch's already-cached entries were gone (a KeyError for the
    frozen prompt embeddings, empty documents for the token cache)."""
    batch = synthetic_batch(tiny.config, 3)
    encoder = tiny.retrieval.query_encoder
    encoder.cache_size = 2
    first = encoder.embed_text(batch["prompt_ids"][:2], batch["prompt_mask"][:2])
    both = encoder.embed_text(batch["prompt_ids"][1:], batch["prompt_mask"][1:])  # 1 cached
    direct = encoder.text(batch["prompt_ids"], batch["prompt_mask"])
    torch.testing.assert_close(first, direct[:2])
    torch.testing.assert_close(both, direct[1:])
    retrieval = tiny.retrieval
    retrieval.doc_token_cache_size = 2
    keys = np.array([[0, 1], [1, 2]])
    expected = [tiny.retrieval.tokenizer(d["text"], add_special_tokens=False, truncation=True,
                                         max_length=tiny.config.max_doc_tokens)["input_ids"]
                for d in retrieval._require_backend().documents(np.array([0, 1, 1, 2]))]
    assert retrieval.document_rows(keys[:1]) == expected[:2]
    assert retrieval.document_rows(keys) == expected  # key 2 overflows the cache
