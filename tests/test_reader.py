"""The reader: the copy pointer, counterfactual answers, the fusion-in-decoder layout, and
the document scores' gradients under both readers.

Run: `.venv/bin/python -m pytest tests/test_reader.py -q`
"""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rag_mm.config import model_config
from rag_mm.model import IGNORE, InMemoryBackend, build_model
from rag_mm.reader import (
    CopyPointer,
    find_span,
    mixture_logprobs,
    substitute_answers,
    target_logprobs,
)
from rag_mm.tokenizer import load_tokenizer

NUM_DOCS = 12


def _pointer_case():
    torch.manual_seed(0)
    pointer = CopyPointer(4).double()
    queries, states = torch.randn(2, 1, 4, dtype=torch.float64), torch.randn(2, 5, 4,
                                                                             dtype=torch.float64)
    copy_ids = torch.tensor([[3, 7, 3, -1, -1], [-1, -1, -1, -1, -1]])  # row 1: nothing to copy
    vocab_logp = torch.randn(2, 1, 10, dtype=torch.float64).log_softmax(-1)
    return pointer, queries, states, copy_ids, vocab_logp


def test_copy_mixture_is_a_distribution_equal_to_a_hand_computation():
    pointer, queries, states, copy_ids, vocab_logp = _pointer_case()
    out = pointer(queries, states, copy_ids)
    mixed = mixture_logprobs(vocab_logp, out, copy_ids).exp()[:, 0]
    torch.testing.assert_close(mixed.sum(-1), torch.ones(2, dtype=torch.float64))
    # by hand: attention over the three source positions, the gate, the mixture
    scores = (pointer.query(queries[0, 0]) @ pointer.key(states[0, :3]).T) / 2.0
    a = torch.softmax(scores, -1)
    g = torch.sigmoid(pointer.gate(queries[0, 0]))[0]
    expected = g * vocab_logp[0, 0].exp()
    expected[3] += (1 - g) * (a[0] + a[2])
    expected[7] += (1 - g) * a[1]
    torch.testing.assert_close(mixed[0], expected)
    torch.testing.assert_close(mixed[1], vocab_logp[1, 0].exp())  # no sources: LM head alone
    # the training path gives the same numbers for the targets
    targets = torch.tensor([[3], [7]])
    logp, shares = target_logprobs(vocab_logp, targets, out, copy_ids)
    torch.testing.assert_close(logp[:, 0], mixed.gather(-1, targets)[:, 0].log())
    torch.testing.assert_close(shares[0, 0, :3].sum(), (1 - g) * (a[0] + a[2]) / mixed[0, 3])
    assert shares[1].abs().sum() == 0


def test_copy_gradients_stay_finite_where_nothing_can_be_copied():
    pointer, queries, states, copy_ids, vocab_logp = _pointer_case()
    vocab_logp.requires_grad_(True)
    out = pointer(queries, states, copy_ids)
    logp, _ = target_logprobs(vocab_logp, torch.tensor([[5], [5]]), out, copy_ids)  # 5: no source
    logp.sum().backward()
    grads = [vocab_logp.grad, *(p.grad for p in pointer.parameters())]
    assert all(torch.isfinite(g).all() for g in grads)
    assert pointer.gate.weight.grad.abs().sum() > 0  # copying 5 is impossible: the gate learns


def test_counterfactual_rule_is_verbatim_tokens_in_the_gold_document():
    assert find_span([1, 5, 6, 2], [5, 6]) == 1 and find_span([1, 5, 2], [5, 6]) == -1
    keys = np.array([[7, 3], [4, 8], [5, 6]])
    gold = np.array([3, 8, -1])
    rows = [[1, 2], [10, 11, 50, 51, 12], [9], [30, 31], [1], [2]]
    answers = [[50, 51], [77], [60]]  # 0: in its gold doc; 1: not in its gold doc; 2: no gold
    torch.manual_seed(0)
    new, donors = substitute_answers(rows, keys, gold, answers, rate=1.0, max_doc_tokens=8)
    assert donors[1] == donors[2] == -1 and donors[0] in (1, 2)
    assert new[1] == [10, 11, *answers[donors[0]], 12]
    assert [r for i, r in enumerate(new) if i != 1] == [r for i, r in enumerate(rows) if i != 1]
    # a new answer that would not fit the document budget, and rate 0, change nothing
    assert substitute_answers(rows, keys, gold, [[50, 51], [7, 7, 7, 7], [7, 7, 7, 7]],
                              rate=1.0, max_doc_tokens=5)[1] == [-1, -1, -1]
    assert substitute_answers(rows, keys, gold, answers, rate=0.0, max_doc_tokens=8)[1] == [-1] * 3


def _word_backend():
    """Documents 'the shape number i lives in CITY_i .' with their own random vectors."""
    rng = np.random.default_rng(0)
    cities = ["paris", "tokyo", "london", "berlin", "rome", "madrid", "cairo", "moscow", "lima",
              "oslo", "athens", "prague"]
    vectors = rng.standard_normal((NUM_DOCS, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return InMemoryBackend(vectors, [f"the shape number {i} lives in {c} ." for i, c in
                                     enumerate(cities)]), cities


def _batch(config, cities, gold: list[int], seed: int = 0):
    tok = load_tokenizer(None)
    g = torch.Generator().manual_seed(seed)
    prompts = tok(["where does it live ?"] * len(gold), padding="max_length",
                  max_length=config.max_prompt_tokens, return_tensors="pt")
    targets = torch.zeros(len(gold), config.max_target_tokens, dtype=torch.long)
    for i, key in enumerate(gold):
        ids = tok(cities[key], add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
        targets[i, : len(ids)] = torch.tensor(ids)
    return {"images": torch.rand(len(gold), 3, 32, 32, generator=g) * 2 - 1,
            "prompt_ids": prompts["input_ids"], "prompt_mask": prompts["attention_mask"],
            "target_ids": targets, "target_mask": targets != 0,
            "gold_keys": torch.tensor(gold)}


def _tiny(reader: str, *, mode: str = "rag", **reader_fields):
    config = model_config("tiny", mode=mode)
    config = replace(config, reader=replace(config.reader, kind=reader, **reader_fields),
                     retriever=replace(config.retriever, contrastive_weight=0.0))
    backend, cities = _word_backend()
    torch.manual_seed(0)
    return build_model(config, backend=backend), cities


def test_counterfactual_batch_changes_the_gold_document_and_target_together():
    model, cities = _tiny("rag", counterfactual=1.0)
    batch = _batch(model.config, cities, [0, 1, 2, 3])
    retrieval = model.retrieval
    retrieved = retrieval.retrieve(batch)  # training: the gold document is among the top-k
    keys = retrieval.slots(retrieved)[0]
    torch.manual_seed(0)
    new_batch, rows = retrieval.counterfactual(batch, keys)
    stored = retrieval.document_rows(keys)
    k = keys.shape[1]
    for i in range(4):
        answer = [t for t in new_batch["target_ids"][i].tolist() if t][:-1]
        assert answer != [t for t in batch["target_ids"][i].tolist() if t][:-1]
        gold_slot = i * k + list(keys[i]).index(i)
        assert find_span(rows[gold_slot], answer) >= 0
        assert all(rows[r] == stored[r] for r in range(i * k, (i + 1) * k) if r != gold_slot)
    model.eval()  # never outside training
    torch.testing.assert_close(model.retrieval(batch)[2], retrieval.assemble(batch, retrieved)[2])


def test_fid_reads_all_top_k_documents_in_one_sequence():
    model, cities = _tiny("fid", counterfactual=0.0)
    config = model.config
    batch = _batch(config, cities, [0, 5, 9])
    model.eval()
    hidden, _, labels, copy_ids, _, _, _ = model.retrieval(batch)
    k, slot = config.retriever.top_k, config.doc_slot_len
    assert hidden.shape[:2] == (3, config.seq_len) and config.seq_len == (
        k * slot + config.vision.num_patches + config.max_prompt_tokens + config.max_target_tokens)
    keys = model.retrieval.retrieve(batch).keys
    tokens = model.retrieval.document_rows(keys)
    for i in range(3):
        for s in range(k):
            ids = copy_ids[i, s * slot : (s + 1) * slot]
            assert ids[ids >= 0].tolist() == tokens[i * k + s]
    assert (labels[:, -config.max_target_tokens - 1 : -1] != IGNORE).any()
    # every slot has the document positions: both readers have the same parameters
    assert model.retrieval.pos_embed.num_embeddings == config.num_positions
    rag = build_model(replace(config, reader=replace(config.reader, kind="rag")))
    assert {n: p.shape for n, p in rag.state_dict().items()} == {
        n: p.shape for n, p in model.state_dict().items()}
    for mode in ("gold", "closed_book"):  # fewer documents: the same layout, empty slots
        model.config.mode = mode
        h, valid, _, ids, logits, _, _ = model.retrieval(batch)
        assert h.shape == hidden.shape and logits.shape == (3, k)
        assert not valid[:, slot if mode == "gold" else 0 : k * slot].any()
        tokens, _ = model.generate(batch)
        assert tokens.shape == (3, config.max_target_tokens)
    model.config.mode = "rag"


def test_fid_training_shuffles_the_slots_with_their_scores_and_counterfactuals():
    model, cities = _tiny("fid", counterfactual=1.0, shuffle_slots=True)
    batch = _batch(model.config, cities, [0, 5, 9, 2])
    retrieved = model.retrieval.retrieve(batch)
    stored = model.retrieval.document_rows(retrieved.keys)
    torch.manual_seed(1)
    _, _, labels, copy_ids, doc_logits, _, _ = model.retrieval(batch)
    k, slot, steps = model.config.retriever.top_k, model.config.doc_slot_len, 3
    moved = False
    for i in range(4):
        slots = [copy_ids[i, s * slot : (s + 1) * slot] for s in range(k)]
        slots = [ids[ids >= 0].tolist() for ids in slots]
        answer = [t for t in labels[i, -steps - 1 : -1].tolist() if t >= 0][:-1]  # no [SEP]
        changed = [s for s in range(k) if slots[s] not in stored[i * k : (i + 1) * k]]
        assert len(changed) == 1  # the gold document, now with the new answer
        assert find_span(slots[changed[0]], answer) >= 0
        order = [stored[i * k : (i + 1) * k].index(row) if row in stored[i * k : (i + 1) * k]
                 else None for row in slots]
        moved |= order != sorted(order, key=lambda o: -1 if o is None else o)
        torch.testing.assert_close(doc_logits[i].sort().values, retrieved.doc_logits[i].sort().values)
    assert moved


@pytest.mark.parametrize("reader", ["rag", "fid"])
def test_generator_loss_reaches_the_query_encoder_under_both_readers(reader):
    """Contrastive weight 0: the only path to the query encoder is through the document
    scores: the marginal (rag), the distillation towards the copied-from documents (fid)."""
    model, cities = _tiny(reader, counterfactual=0.0)
    batch = _batch(model.config, cities, [0, 5, 9, 2])
    losses = model(batch)
    losses["loss"].backward()
    query = model.retrieval.query_encoder
    assert query.image_proj.weight.grad.abs().sum() > 0
    assert query.text_proj.weight.grad.abs().sum() > 0
    if reader == "fid":
        assert losses["retriever_loss"] > 0  # the distillation term alone
        model, cities = _tiny(reader, counterfactual=0.0, distill_weight=0.0)
        model(batch)["loss"].backward()
        assert model.retrieval.query_encoder.image_proj.weight.grad.abs().sum() == 0


def test_rerank_mixes_the_documents_by_retriever_score_plus_relevance_when_decoding():
    """rag reader, rerank on: next-token log-probs are log sum_k softmax(s + r)_k
    p_k(y), r the relevance head at the position predicting the first answer token; with
    rerank off, softmax(s). A hand computation from the per-document distributions."""
    model, cities = _tiny("rag", counterfactual=0.0, rerank=True)
    with torch.no_grad():
        model.head.relevance.weight.normal_(0.0, 1.0)  # r far from 0, so the test can fail
    batch = _batch(model.config, cities, [0, 5, 9])
    model.eval()
    with torch.no_grad():
        retrieved = model.retrieval.retrieve(batch)
        carry = model.run_chain(model.retrieval.answer_carry(batch, retrieved,
                                                             model.start_answers(batch)))
        hidden, _, _, copy_ids, doc_logits, _, _ = carry
        head, k = model.head, doc_logits.shape[1]
        position = hidden.shape[1] - model.config.max_target_tokens - 1
        vocab_logp, pointer = head._answer_logprobs(hidden, copy_ids,
                                                    slice(position, position + 1))
        per_doc = mixture_logprobs(vocab_logp, pointer, copy_ids)[:, 0].view(3, k, -1)
        r = head.relevance(head.norm(hidden[:, position]))[:, 0].view(3, k)
        assert r.std() > 0.1
        for rerank, weights in ((True, (doc_logits + r).softmax(-1)),
                                (False, doc_logits.softmax(-1))):
            head.rerank = rerank
            expected = torch.log((weights[..., None] * per_doc.exp()).sum(1))
            torch.testing.assert_close(head.next_token_logprobs(*carry, step=0), expected,
                                       rtol=1e-5, atol=1e-5)


def test_rerank_loss_trains_the_relevance_head_on_gold_ids_only():
    model, cities = _tiny("rag", counterfactual=0.0, rerank=True)
    batch = _batch(model.config, cities, [0, 5, 9, 2])
    _, _, _, _, _, _, gold = model.retrieval(batch)  # training: gold in the top-k
    assert gold.sum(1).tolist() == [1, 1, 1, 1]
    model(batch)["loss"].backward()
    assert model.head.relevance.weight.grad.abs().sum() > 0
    # without gold ids: no relevance loss; r still learns through the marginal
    no_gold = {**batch, "gold_keys": torch.full((4,), -1)}
    model.zero_grad()
    _, _, _, _, _, _, gold = model.retrieval(no_gold)
    assert gold.sum() == 0
    r = torch.randn(4, gold.shape[1])
    assert torch.equal(model.head.rerank_loss(r, gold), torch.zeros(4))
    one_hot = F.one_hot(torch.arange(4) % gold.shape[1], gold.shape[1])
    torch.testing.assert_close(model.head.rerank_loss(r, one_hot),
                               -(r.log_softmax(-1) * one_hot).sum(-1))


def test_rerank_is_for_the_rag_reader():
    from rag_mm.config import ReaderConfig

    assert not ReaderConfig().rerank and ReaderConfig(rerank=True).rerank
    with pytest.raises(ValueError, match="rerank=True needs reader='rag'"):
        ReaderConfig(kind="fid", rerank=True)


@pytest.mark.slow
def test_a_tiny_reader_follows_a_swapped_index_and_copies_answers_never_trained(demo, tmp_path):
    """The tiny generator, trained a little on the gold documents of the small demo task (copy
    pointer and counterfactual answers on), then asked (a) about training entities whose
    facts were permuted among the passages (`rag_mm.swap`), (b) about held-out entities of the
    novel-answer variant, whose answers were never a training target."""
    import retrieval_index
    from rag_mm.data import load_corpus, load_examples
    from rag_mm.demo_data import make_demo_data
    from rag_mm.swap import swap_facts
    from trainers.data import Collator, RAGDataModule
    from trainers.module import exact_match

    torch.manual_seed(0)
    config = replace(model_config("tiny", mode="gold"),
                     reader=replace(model_config("tiny").reader, counterfactual=0.5))
    index = retrieval_index.load(demo / "index")
    model = build_model(config, backend=index)
    data = RAGDataModule(demo / "data", index_dir=str(demo / "index"), model_size="tiny",
                         batch_size=32, seed=0)
    data.setup("fit")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for step, batch in zip(range(150), _forever(data.train_dataloader)):
        optimizer.zero_grad()
        model(batch)["loss"].backward()
        optimizer.step()
    model.eval()
    collate = Collator(load_tokenizer(None), image_size=32,
                       max_prompt_tokens=config.max_prompt_tokens,
                       max_target_tokens=config.max_target_tokens)
    keys = dict(zip(index.store.table.column("id").to_pylist(), range(len(index))))
    vectors = index.vectors(np.arange(len(index)))

    def gold_exact_match(rows, texts):
        model.attach(InMemoryBackend(vectors, texts), check_encoder=False)
        batch = collate([{**r, "gold_key": keys[r["gold_id"]]} for r in rows])
        with torch.no_grad():
            tokens, _ = model.generate(batch)
        return exact_match(tokens, batch["target_ids"], batch["target_mask"]).float().mean().item()

    corpus = dict(zip(*index.store.table.select(["id", "text"]).to_pydict().values()))
    seen = list(load_examples(demo / "data" / "seen.parquet").dataset)
    swapped, targets, _ = swap_facts(corpus, [{**r, "group": r["relation"]} for r in seen],
                                     seed=0, group="group")
    rows = [{**r, "target": t} for r, t in zip(seen, targets) if t is not None]
    texts_a = [corpus[i] for i in keys]
    texts_b = [swapped[i] for i in keys]
    assert gold_exact_match(rows, texts_b) >= 0.9  # follows index B
    assert gold_exact_match([{**r, "target": s["target"]} for r, s in
                             zip(rows, [s for s, t in zip(seen, targets) if t is not None])],
                            texts_b) <= 0.1  # not A's answer from memory
    assert gold_exact_match(seen, texts_a) >= 0.9

    make_demo_data(tmp_path, seed=1, num_entities=24, examples_per_fact=2, novel_answers=True)
    novel = list(load_examples(tmp_path / "test.parquet").dataset)
    novel_corpus = load_corpus(tmp_path / "corpus.parquet").dataset
    novel_corpus = dict(zip(novel_corpus["id"], novel_corpus["text"]))
    trained = set(data.datasets["train"]["target"])
    assert not trained & {r["target"] for r in novel}
    assert gold_exact_match(novel, [novel_corpus[i] for i in keys]) >= 0.8


def _forever(loader_fn):
    while True:
        yield from loader_fn()


def test_novel_spans_are_random_word_pieces_spliced_into_the_gold_document_and_target():
    """novel_spans=1: every counterfactual answer is a random span of 1-3 word pieces (a whole
    word, then continuations), in the gold document in place of the answer and as the target
    closed by [SEP]; the other documents are unchanged."""
    from rag_mm.reader import random_spans, span_vocabulary

    tok = load_tokenizer(None)
    words, pieces = span_vocabulary(tok)
    torch.manual_seed(0)
    spans = random_spans(300, words, pieces, max_pieces=3)
    assert {len(s) for s in spans} == {1, 2, 3}
    vocab = {i: t for t, i in tok.get_vocab().items()}
    for span in spans:
        assert not vocab[span[0]].startswith("##") and all(
            vocab[p].startswith("##") for p in span[1:])
    assert {len(s) for s in random_spans(50, words, pieces, max_pieces=1)} == {1}

    model, cities = _tiny("rag", counterfactual=1.0, novel_spans=1.0)
    batch = _batch(model.config, cities, [0, 1, 2, 3])
    retrieval = model.retrieval
    keys = retrieval.slots(retrieval.retrieve(batch))[0]
    stored = retrieval.document_rows(keys)
    new_batch, rows = retrieval.counterfactual(batch, keys)
    k, sep = keys.shape[1], tok.sep_token_id
    for i in range(4):
        target = new_batch["target_ids"][i][new_batch["target_mask"][i].bool()].tolist()
        assert target[-1] == sep and 1 <= len(target) - 1 <= model.config.max_target_tokens - 1
        span = target[:-1]
        assert tok.decode(span).replace(" ", "") not in cities  # not a batch answer
        gold_slot = i * k + list(keys[i]).index(i)
        assert find_span(rows[gold_slot], span) >= 0
        assert all(rows[r] == stored[r] for r in range(i * k, (i + 1) * k) if r != gold_slot)
