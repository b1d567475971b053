"""Documents of text, images or both (issue 11, item 1): the query encoder's vision path embeds
document images, so a query picture finds the document with a similar picture where the text
cannot tell the documents apart; the store keeps the images; the model refuses an image index
embedded with other vision weights.

Run: .venv/bin/pytest tests/test_index_images.py -q        (about 20 s on 2 cores)
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

import retrieval_index as ri
from rag_mm.config import model_config
from rag_mm.demo_data import COLOURS, SHAPES, render_entity
from rag_mm.images import to_tensor
from rag_mm.model import build_model
from rag_mm.query_vision import QueryVision, save_query_vision

NUM_DOCS = 12
QUERIES_PER_DOC = 3
TEXT = "a creature"  # every document and every prompt: the text alone cannot tell them apart


def _pictures():
    combos = [(c, "solid", s) for c in COLOURS for s in SHAPES[:2]][:NUM_DOCS]
    return [render_entity(*combo) for combo in combos]


def _vision_folder(folder, seed: int, dim: int):
    seeded = QueryVision.seeded(model_config("tiny").vision, dim, seed)
    return save_query_vision(folder, seeded.vision, seeded.image_proj)


@pytest.fixture(scope="module")
def image_task(tmp_path_factory, tiny_dirs):
    root = tmp_path_factory.mktemp("image_docs")
    encoder = tiny_dirs[0]
    vision = _vision_folder(root / "vision", seed=0, dim=32)
    rows = [{"id": f"e{i}", "text": TEXT, "image": p} for i, p in enumerate(_pictures())]
    text = ri.TextDocumentEmbedder.from_folder(encoder)
    both = ri.build_index(rows, root / "multimodal", progress=False,
                          embedder=ri.MultimodalDocumentEmbedder(text, vision))
    texts_only = ri.build_index(rows, root / "texts", progress=False,
                                embedder=ri.TextDocumentEmbedder.from_folder(
                                    encoder, ignore_images=True))
    return {"root": root, "encoder": encoder, "vision": vision, "rows": rows,
            "multimodal": both, "texts": texts_only}


def _model(encoder, vision, **overrides):
    config = model_config("tiny", **overrides)
    retriever = replace(config.retriever, text_encoder=str(encoder),
                        vision_dir=None if vision is None else str(vision))
    torch.manual_seed(0)
    return build_model(replace(config, retriever=retriever)).eval()


def _query_batch(model, pictures, seed: int = 0):
    """Each document's picture with pixel noise (std 0.1 of the [-1, 1] range), and the prompt."""
    g = torch.Generator().manual_seed(seed)
    images = torch.stack([to_tensor(p, 32) + 0.1 * torch.randn(3, 32, 32, generator=g)
                          for p in pictures for _ in range(QUERIES_PER_DOC)])
    tokens = model.retrieval.tokenizer([TEXT] * len(images), padding="max_length",
                                       max_length=model.config.max_prompt_tokens,
                                       return_tensors="pt")
    return {"images": images, "prompt_ids": tokens["input_ids"],
            "prompt_mask": tokens["attention_mask"],
            "gold_keys": torch.full((len(images),), -1, dtype=torch.long)}


def test_a_query_picture_finds_the_document_with_a_similar_picture(image_task):
    model = _model(image_task["encoder"], image_task["vision"])
    pictures = [r["image"] for r in image_task["rows"]]
    batch = _query_batch(model, pictures)
    gold = np.repeat(np.arange(NUM_DOCS), QUERIES_PER_DOC)

    model.attach(image_task["multimodal"])
    with torch.no_grad():
        keys = model.retrieval.retrieve(batch).keys
    assert (keys[:, 0] == gold).mean() == 1.0

    # the same corpus indexed by its texts: every document vector is the same
    texts = image_task["texts"]
    assert np.allclose(texts.vectors(np.arange(NUM_DOCS)), texts.vectors([0]))
    model.attach(texts)
    with torch.no_grad():
        keys = model.retrieval.retrieve(batch).keys
    assert (keys[:, 0] == gold).mean() <= 1 / NUM_DOCS

    for index in (image_task["multimodal"], texts):  # the store keeps the images either way
        stored = index.documents([5])[0]["image"]
        assert np.array_equal(np.asarray(stored), np.asarray(pictures[5]))


def test_the_fusion_is_the_query_encoders_formula_at_initialisation(image_task):
    """d = normalize(t + image_proj(mean(vision(image)))): the query encoder's q for the same
    text and picture (text_proj = identity at init)."""
    model = _model(image_task["encoder"], image_task["vision"])
    pictures = [r["image"] for r in image_task["rows"]]
    tokens = model.retrieval.tokenizer([TEXT] * 2, return_tensors="pt", padding=True)
    with torch.no_grad():
        q = model.retrieval.query_encoder(torch.stack([to_tensor(p, 32) for p in pictures[:2]]),
                                          tokens["input_ids"], tokens["attention_mask"])
    stored = image_task["multimodal"].vectors([0, 1])
    np.testing.assert_allclose(q.numpy(), stored, atol=1e-5)


def test_attach_refuses_an_image_index_embedded_with_other_vision_weights(image_task, tmp_path):
    index = image_task["multimodal"]
    with pytest.raises(ri.EncoderMismatchError, match="has no vision_dir: set the model's vision_dir"):
        _model(image_task["encoder"], None).attach(index)
    other = _vision_folder(tmp_path / "other", seed=1, dim=32)
    with pytest.raises(ri.EncoderMismatchError, match=f"has vision_dir {other}"):
        _model(image_task["encoder"], other).attach(index)
    # a text index takes a model with a vision folder
    _model(image_task["encoder"], other).attach(image_task["texts"])


def test_the_generator_reads_document_images_with_use_doc_images(image_task, tmp_path):
    model = _model(image_task["encoder"], image_task["vision"], use_doc_images=True)
    model.attach(image_task["multimodal"])
    batch = _query_batch(model, [r["image"] for r in image_task["rows"][:2]])
    targets = torch.full((len(batch["images"]), model.config.max_target_tokens), 102)
    batch.update(target_ids=targets, target_mask=torch.ones_like(targets))
    with torch.no_grad():
        retrieved = model.retrieval.retrieve(batch)
        hidden, key_valid, *_ = model.retrieval.assemble(batch, retrieved)
    patches = model.config.vision.num_patches
    doc_image = slice(model.config.max_doc_tokens, model.config.max_doc_tokens + patches)
    assert key_valid[:, doc_image].all()  # every retrieved document has a picture
    assert hidden.shape[1] == model.config.seq_len

    from trainers.module import RAGModule

    with pytest.raises(ValueError, match="dim 32 vs the query text encoder's 384"):
        RAGModule(size="tiny", vision_dir=str(image_task["vision"]))  # a MiniLM model
    minilm = _vision_folder(tmp_path / "minilm", seed=0, dim=384)
    module = RAGModule(size="tiny", use_doc_images=True, vision_dir=str(minilm))
    module.configure_model()  # built on the meta device: materialised in this process
    assert module.config.use_doc_images and module.config.retriever.vision_dir == str(minilm)
    loaded = QueryVision.seeded(model_config("tiny").vision, 384, 0)
    encoder = module.model.retrieval.query_encoder
    assert torch.equal(encoder.image_proj.weight, loaded.image_proj.weight)


def test_build_index_cli_indexes_an_image_corpus_as_it_comes(image_task, tmp_path, capsys):
    import scripts.build_index as cli

    rows = [{"id": r["id"], "text": r["text"] if i % 3 else "",  # some image-only documents
             "image": {"bytes": _png(r["image"]), "path": None}}
            for i, r in enumerate(image_task["rows"])]
    pd.DataFrame(rows).to_parquet(tmp_path / "corpus.parquet")
    out = tmp_path / "index"
    cli.build(cli.parse_args(["--corpus", str(tmp_path / "corpus.parquet"), "--out", str(out),
                              "--encoder", str(image_task["encoder"]), "--vision-size", "tiny"]))
    assert f"vision_dir={out / 'vision'}" in capsys.readouterr().out
    index = ri.load(out)
    assert index.manifest["encoder"]["kind"] == "multimodal"
    assert index.manifest["encoder"]["vision"]["path"] == str(out / "vision")
    assert all(d["image"] is not None for d in index.documents(np.arange(NUM_DOCS)))
    model = _model(image_task["encoder"], out / "vision")
    model.attach(index)  # the printed folder is what the model needs
    # the same seed and size give the fixture's folder: the same document vectors
    np.testing.assert_array_equal(index.vectors([1, 2]), image_task["multimodal"].vectors([1, 2]))

    texts_out = tmp_path / "texts"
    cli.build(cli.parse_args(["--corpus", str(tmp_path / "corpus.parquet"), "--out",
                              str(texts_out), "--encoder", str(image_task["encoder"]),
                              "--drop-images"]))
    texts = ri.load(texts_out)
    assert texts.manifest["encoder"]["images"] == "not embedded"
    assert texts.documents([4])[0]["image"] is not None  # --drop-images keeps them in the store


def test_an_image_the_embedder_cannot_read_is_refused_by_row_and_id(image_task, tmp_path):
    rows = [dict(r) for r in image_task["rows"][:4]]
    rows[2]["image"] = b"\x89PNG not really"
    text = ri.TextDocumentEmbedder.from_folder(image_task["encoder"])
    with pytest.raises(ri.CorpusError, match=r"corpus row 2 \(id 'e2'\): its image cannot be read"):
        ri.build_index(rows, tmp_path / "bad", progress=False,
                       embedder=ri.MultimodalDocumentEmbedder(text, image_task["vision"]))


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
