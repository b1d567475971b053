"""TextEncoder parity with sentence-transformers and local-folder handling.

Run: .venv/bin/pytest tests/test_text_encoder.py -q
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import BertConfig

from rag_mm.text_encoder import (
    ModelFolderError,
    PoolingConfig,
    TextEncoder,
    default_encoder_path,
    encoder_identity,
    read_pooling_config,
)
from rag_mm.tokenizer import load_tokenizer

_VOCABULARY = """
river stone light ancient market signal harbor quiet engine forest glass copper
"""
WORDS = _VOCABULARY.split()


def varied_texts() -> list[str]:
    """~50 texts: empty-ish, short, medium, unicode, and long ones past 256 tokens."""
    rng = np.random.default_rng(0)
    texts = ["a", "?", "Hello world.", "  padded   spaces  ", "UPPER lower MiXeD"]
    texts += ["Zürich, Ελλάδα, 東京, Москва — naïve café 🍵", "emoji 🚀🔥 and accents éèê"]
    for n in (3, 8, 15, 30, 60, 90, 120):
        for _ in range(4):
            texts.append(" ".join(rng.choice(WORDS, size=n)) + ".")
    for n in (300, 400, 700):  # well past max_seq_length=256 tokens: truncation must match
        texts.append(" ".join(rng.choice(WORDS, size=n)))
    texts += [f"document number {i} about {WORDS[i % len(WORDS)]}" for i in range(12)]
    return texts


def embed(encoder: TextEncoder, tokenizer, texts: list[str]) -> np.ndarray:
    batch = tokenizer(
        texts,
        padding=True,
        truncation=True,
        max_length=encoder.pooling.max_length,
        return_tensors="pt",
    )
    with torch.inference_mode():
        return encoder(batch["input_ids"], batch["attention_mask"]).numpy()


@pytest.mark.parametrize("normalize", [True, False])
def test_bundled_minilm_matches_sentence_transformers(normalize):
    from sentence_transformers import SentenceTransformer

    texts = varied_texts()
    assert len(texts) >= 50
    path = default_encoder_path()
    reference = SentenceTransformer(str(path), device="cpu").encode(
        texts, normalize_embeddings=normalize, batch_size=16, convert_to_numpy=True
    )
    encoder = TextEncoder.from_pretrained(path)
    tokenizer = load_tokenizer(path)
    ours = embed(encoder, tokenizer, texts)
    assert ours.shape == reference.shape == (len(texts), encoder.dim)
    if normalize:  # the folder declares Normalize, so our vectors are already unit length
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    # In float64: 1 - 1e-7 is one fp32 ulp below 1, so a float32 cosine could not tell.
    # Measured: min cosine 1 - 1.7e-12, largest entry difference of the unit vectors 2.8e-7.
    ours, reference = unit(ours.astype(np.float64)), unit(reference.astype(np.float64))
    cosine = (ours * reference).sum(1)
    bad = np.flatnonzero(cosine < 0.9999999)
    assert cosine.min() >= 0.9999999, [(texts[i][:40], 1 - cosine[i]) for i in bad]
    np.testing.assert_allclose(ours, reference, rtol=0, atol=2e-6)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_bundled_pooling_config_and_identity():
    pooling = read_pooling_config(default_encoder_path())
    assert pooling == PoolingConfig(mode="mean", normalize=True, max_length=256)
    identity = encoder_identity()
    assert identity["dim"] == 384 and identity["pooling"] == "mean" and identity["normalize"]
    assert identity["content_hash"].startswith("sha256:")
    assert encoder_identity(default_encoder_path()) == identity


def tiny_config() -> BertConfig:
    return BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )


def test_random_encoder_round_trip_and_cls_pooling(tmp_path):
    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    encoder = TextEncoder.from_config(
        tiny_config(), pooling=PoolingConfig(mode="cls", normalize=False)
    )
    folder = encoder.save_pretrained(tmp_path / "tiny", tokenizer=tokenizer)
    loaded = TextEncoder.from_pretrained(folder)
    assert loaded.pooling == encoder.pooling and loaded.dim == 32
    texts = ["one short text", "another, slightly longer text about rivers"]
    np.testing.assert_allclose(
        embed(loaded, load_tokenizer(folder), texts),
        embed(encoder.eval(), tokenizer, texts),
        atol=1e-6,
    )
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = encoder.model(**batch).last_hidden_state
    np.testing.assert_allclose(embed(encoder, tokenizer, texts), hidden[:, 0].numpy(), atol=1e-6)


def test_identity_hash_changes_with_weights_and_is_cached(tmp_path):
    tokenizer = load_tokenizer()
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        encoder = TextEncoder.from_config(tiny_config())
        folders.append(encoder.save_pretrained(tmp_path / f"enc{seed}", tokenizer=tokenizer))
    first, second = (encoder_identity(f) for f in folders)
    assert first["content_hash"] != second["content_hash"]
    assert first["name"] == "enc0" and first["path"] == str(folders[0].resolve())
    copy = shutil.copytree(folders[0], tmp_path / "copy")
    assert encoder_identity(copy)["content_hash"] == first["content_hash"]  # content, not path
    (copy / "config.json").write_text(
        json.dumps({**json.loads((copy / "config.json").read_text()), "x": 1})
    )
    assert encoder_identity(copy)["content_hash"] != first["content_hash"]  # mtime-keyed cache


def test_missing_folders_and_weights_are_refused(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        TextEncoder.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ModelFolderError, match="not a tokenizer folder"):
        load_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(tiny_config().to_json_string())
    with pytest.raises(ModelFolderError, match="no weights"):
        TextEncoder.from_pretrained(tmp_path)
