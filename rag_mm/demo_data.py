"""A synthetic knowledge-intensive multimodal task: answer questions about pictured creatures.

An entity is a (colour, pattern, shape) drawn as a 32x32 picture. Each entity has one random
fact per relation ("lives in" a city, "eats" a food, "fears" an animal), written once in the
corpus ("the red striped triangle lives in paris ."). An example shows a freshly rendered
picture of the entity and a question that never names it ("where does the creature in the
picture live ?"); the target is the single-word answer. Held-out entities never appear in
train examples and their facts are independent random draws, so a closed-book model is at
chance on them: it must recognise the entity in the picture and retrieve its passage.

Variants for checking that the generator answers from what it reads:
- `novel_answers=True`: held-out (val and test) entities draw their facts from a second
  vocabulary per relation that no training target uses, so an answer can only come from the
  passage (some of these words are two wordpieces).
- every data set also has `seen.parquet`: fresh pictures of the training entities (the
  index-swap evaluation asks about them, `scripts/swap_eval.py`).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SUPERSAMPLE = 4  # shapes are drawn at 4x and averaged down (anti-aliasing)
SPLIT_FRACTIONS = {"val": 0.15, "test": 0.15}  # the rest is train

COLOURS = {  # far apart in RGB: nearest pair (red, orange) is > 100 apart
    "red": (210, 20, 20),
    "green": (20, 150, 40),
    "blue": (30, 60, 235),
    "yellow": (240, 230, 0),
    "purple": (130, 30, 175),
    "orange": (255, 120, 0),
    "black": (15, 15, 15),
    "pink": (250, 120, 200),
}
PATTERNS = ("solid", "striped", "dotted", "hollow")
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")


@dataclass(frozen=True)
class Relation:
    """A relation: how its passage reads, how questions ask for it, its answer words."""

    passage: str  # formatted with entity= and answer=
    prompts: tuple[str, ...]
    vocab: tuple[str, ...]
    novel_vocab: tuple[str, ...]  # held-out entities' answers under novel_answers=True


RELATIONS = {
    "lives": Relation(
        passage="the {entity} lives in {answer} .",
        prompts=(
            "where does the creature in the picture live ?",
            "in which city does this creature live ?",
            "which city is the creature in the image from ?",
            "name the home city of the pictured creature .",
        ),
        vocab=(
            "paris", "tokyo", "london", "berlin", "rome", "madrid", "cairo", "moscow",
            "sydney", "dublin", "vienna", "lima", "oslo", "athens", "prague", "delhi",
            "seoul", "boston", "chicago", "toronto", "lisbon", "warsaw", "beijing", "denver",
        ),
        novel_vocab=(
            "miami", "dallas", "kyoto", "milan", "munich", "zurich", "geneva", "venice",
            "bangkok", "havana", "nairobi", "seattle",
        ),
    ),
    "eats": Relation(
        passage="the {entity} eats {answer} .",
        prompts=(
            "what does the creature in the picture eat ?",
            "which food does this creature like to eat ?",
            "what is the favourite food of the pictured creature ?",
            "name the food that the creature in the image eats .",
        ),
        vocab=(
            "rice", "bread", "cheese", "apples", "fish", "honey", "soup", "nuts",
            "eggs", "corn", "beans", "meat", "cake", "pasta", "pizza", "bananas",
            "grapes", "potatoes", "berries", "salad", "milk", "butter", "seeds", "cookies",
        ),
        novel_vocab=(
            "sugar", "salt", "onions", "tomatoes", "chocolate", "noodles", "pork", "chicken",
            "coffee", "peanuts", "lemons", "carrots",
        ),
    ),
    "fears": Relation(
        passage="the {entity} fears {answer} .",
        prompts=(
            "what is the creature in the picture afraid of ?",
            "which animal does this creature fear ?",
            "what scares the creature in the image ?",
            "name the animal that the pictured creature fears .",
        ),
        vocab=(
            "wolves", "snakes", "spiders", "bees", "owls", "rats", "bats", "sharks",
            "bears", "lions", "tigers", "eagles", "crows", "wasps", "dogs", "cats",
            "foxes", "frogs", "mice", "ants", "horses", "cows", "goats", "pigs",
        ),
        novel_vocab=(
            "whales", "dolphins", "monkeys", "rabbits", "ducks", "geese", "deer", "hawks",
            "moths", "lizards", "zebras", "camels",
        ),
    ),
}


@dataclass(frozen=True)
class Entity:
    id: str
    colour: str
    pattern: str
    shape: str
    split: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.pattern} {self.shape}"


# --------------------------------------------------------------------------- rendering


def _shape_points(shape: str) -> list[tuple[float, float]]:
    """Polygon of ``shape`` in unit coordinates [-1, 1] (y down); circle handled apart."""
    if shape == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if shape == "diamond":
        return [(0, -1), (1, 0), (0, 1), (-1, 0)]
    if shape == "triangle":
        return [(0, -1), (1, 0.8), (-1, 0.8)]
    if shape == "star":
        angles = np.pi * (np.arange(10) / 5 - 0.5)
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return list(zip(radii * np.cos(angles), radii * np.sin(angles)))
    if shape == "cross":
        a, b = 0.33, 1.0
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a),
                (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")


def _shape_masks(shape: str, cx: float, cy: float, half: float) -> tuple[np.ndarray, np.ndarray]:
    """(filled, outline) masks in [0, 1] at supersampled resolution."""
    size, s = IMAGE_SIZE * SUPERSAMPLE, SUPERSAMPLE
    fill, edge = Image.new("L", (size, size)), Image.new("L", (size, size))
    fd, ed = ImageDraw.Draw(fill), ImageDraw.Draw(edge)
    width = 3 * s  # centred on the edge: 1.5 px fall inside the shape
    if shape == "circle":
        r = 0.9 * half * s
        box = [cx * s - r, cy * s - r, cx * s + r, cy * s + r]
        fd.ellipse(box, fill=255)
        ed.ellipse(box, outline=255, width=width)
    else:
        pts = [((cx + half * x) * s, (cy + half * y) * s) for x, y in _shape_points(shape)]
        fd.polygon(pts, fill=255)
        ed.line(pts + [pts[0]], fill=255, width=width, joint="curve")
    return np.asarray(fill, np.float32) / 255, np.asarray(edge, np.float32) / 255


def _pattern_alpha(pattern: str, fill, edge, phase: tuple[int, int]) -> np.ndarray:
    """Coverage of the entity's colour at supersampled resolution."""
    s = SUPERSAMPLE
    y, x = np.mgrid[: fill.shape[0], : fill.shape[1]]
    if pattern == "solid":
        return fill
    if pattern == "hollow":
        return edge * fill
    if pattern == "striped":  # 2 px stripes every 4 px
        inside = ((y + phase[0]) // (2 * s)) % 2 == 0
    elif pattern == "dotted":  # 2x2 px dots every 5 px
        inside = (((y + phase[0]) % (5 * s)) < 2 * s) & (((x + phase[1]) % (5 * s)) < 2 * s)
    else:
        raise ValueError(f"unknown pattern {pattern!r}; valid: {PATTERNS}")
    return np.maximum(fill * inside, edge * fill)


def render_entity(
    colour: str, pattern: str, shape: str, rng: np.random.Generator | None = None
) -> Image.Image:
    """A 32x32 RGB picture of the entity; ``rng`` jitters position, scale, colour and noise
    (None: a centred, noise-free canonical picture)."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; valid: {tuple(COLOURS)}")
    jitter = rng is not None
    half = rng.uniform(8.5, 12.5) if jitter else 11.0
    lo, hi = half + 1, IMAGE_SIZE - half - 1
    cx, cy = (rng.uniform(lo, hi), rng.uniform(lo, hi)) if jitter else (16.0, 16.0)
    phase = tuple(rng.integers(0, 4 * SUPERSAMPLE, size=2)) if jitter else (0, 0)
    fill, edge = _shape_masks(shape, cx, cy, half)
    alpha = _pattern_alpha(pattern, fill, edge, phase)
    alpha = alpha.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE).mean(axis=(1, 3))
    ink = np.array(COLOURS[colour], np.float32)
    background = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 225.0, np.float32)
    if jitter:
        ink = ink + rng.uniform(-12, 12, size=3)
        background += rng.uniform(-10, 10) + rng.normal(0, 6, size=background.shape)
    pixels = background * (1 - alpha[..., None]) + ink * alpha[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), mode="RGB")


def _png(image: Image.Image) -> dict:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


# --------------------------------------------------------------------------- entities, facts


def make_entities(num_entities: int, rng: np.random.Generator) -> list[Entity]:
    """``num_entities`` distinct (colour, pattern, shape) combinations with a train/val/test
    split; train covers every colour, pattern and shape in use when it can."""
    combos = [(c, p, s) for c in COLOURS for p in PATTERNS for s in SHAPES]
    if not 3 <= num_entities <= len(combos):
        raise ValueError(
            f"num_entities (--entities) must be in [3, {len(combos)}] = {len(COLOURS)} "
            f"colours x {len(PATTERNS)} patterns x {len(SHAPES)} shapes, got {num_entities}"
        )
    chosen = [combos[i] for i in sorted(rng.choice(len(combos), num_entities, replace=False))]
    splits = _split_labels(chosen, rng)
    return [Entity(f"e{i:03d}", *c, split) for i, (c, split) in enumerate(zip(chosen, splits))]


def _split_labels(chosen: list[tuple[str, str, str]], rng: np.random.Generator) -> list[str]:
    n = len(chosen)
    counts = {k: max(1, round(f * n)) for k, f in SPLIT_FRACTIONS.items()}
    labels = ["val"] * counts["val"] + ["test"] * counts["test"]
    labels += ["train"] * (n - len(labels))
    needed = [set(values) for values in zip(*chosen)]
    for _ in range(100):
        order = rng.permutation(labels).tolist()
        train = [c for c, lab in zip(chosen, order) if lab == "train"]
        if all(set(values) == need for values, need in zip(zip(*train), needed)):
            break
    return order


def assign_answers(entities: list[Entity], rng: np.random.Generator, *,
                   novel_answers: bool = False) -> dict[tuple[str, str], str]:
    """A random answer per (entity, relation). Train entities use every vocab word when there
    are enough of them (so the reader has seen each word); others draw uniformly, from the
    relation's `novel_vocab` under `novel_answers` (a uniform draw from `vocab` mapped onto
    it, so that the train split and the training entities' passages are those of the data
    set without `novel_answers`, and a model trained on either can be tested on both)."""
    answers = {}
    train = [e for e in entities if e.split == "train"]
    others = [e for e in entities if e.split != "train"]
    for name, rel in RELATIONS.items():
        vocab = list(rel.vocab)
        pool = vocab * (len(train) // len(vocab))
        pool += rng.choice(vocab, len(train) - len(pool), replace=False).tolist()
        for e, word in zip(train, rng.permutation(pool)):
            answers[e.id, name] = str(word)
        for e in others:
            word = str(rng.choice(vocab))
            if novel_answers:  # the same draw, mapped: every other file stays the same
                word = rel.novel_vocab[vocab.index(word) % len(rel.novel_vocab)]
            answers[e.id, name] = word
    return answers


def passage_id(entity_id: str, relation: str) -> str:
    return f"{entity_id}-{relation}"


# --------------------------------------------------------------------------- tables


def make_corpus(entities, answers, *, with_images: bool = False) -> dict[str, list]:
    """One passage per (entity, relation); optional canonical picture per passage."""
    rows: dict[str, list] = {"id": [], "text": []} | ({"image": []} if with_images else {})
    for e in entities:
        for name, rel in RELATIONS.items():
            rows["id"].append(passage_id(e.id, name))
            rows["text"].append(rel.passage.format(entity=e.name, answer=answers[e.id, name]))
            if with_images:
                rows["image"].append(_png(render_entity(e.colour, e.pattern, e.shape)))
    return rows


def make_examples(entities, answers, per_fact: int, rng: np.random.Generator) -> dict[str, list]:
    """``per_fact`` examples per (entity, relation), each with a freshly rendered picture."""
    keys = ("image", "prompt", "target", "gold_id", "entity", "relation")
    rows: dict[str, list] = {k: [] for k in keys}
    for e in entities:
        for name, rel in RELATIONS.items():
            offset = int(rng.integers(len(rel.prompts)))
            for k in range(per_fact):
                rows["image"].append(_png(render_entity(e.colour, e.pattern, e.shape, rng)))
                rows["prompt"].append(rel.prompts[(offset + k) % len(rel.prompts)])
                rows["target"].append(answers[e.id, name])
                rows["gold_id"].append(passage_id(e.id, name))
                rows["entity"].append(e.id)
                rows["relation"].append(name)
    return rows


def _shuffled(rows: dict[str, list], rng: np.random.Generator) -> dict[str, list]:
    order = rng.permutation(len(next(iter(rows.values()))))
    return {k: [v[i] for i in order] for k, v in rows.items()}


def _write_parquet(rows: dict[str, list], path: Path) -> None:
    features = Features({k: ImageFeature() if k == "image" else Value("string") for k in rows})
    pq.write_table(Dataset.from_dict(rows, features=features).data.table, path)


# --------------------------------------------------------------------------- entry point


def make_demo_data(
    out_dir: str | Path,
    *,
    seed: int = 0,
    num_entities: int = 120,
    examples_per_fact: int = 12,
    eval_examples_per_fact: int = 3,
    corpus_images: bool = False,
    novel_answers: bool = False,
) -> dict:
    """Write corpus/train/val/test/seen parquet files and meta.json to ``out_dir``; returns
    meta. ``seen``: ``eval_examples_per_fact`` fresh pictures per training fact."""
    for flag, value in [("--examples-per-fact", examples_per_fact),
                        ("--eval-examples-per-fact", eval_examples_per_fact)]:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} must be a positive int, got {value!r}")
    rng_entities, rng_answers, rng_images = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
    )
    entities = make_entities(num_entities, rng_entities)
    answers = assign_answers(entities, rng_answers, novel_answers=novel_answers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = {"corpus": len(entities) * len(RELATIONS)}
    corpus = make_corpus(entities, answers, with_images=corpus_images)
    _write_parquet(corpus, out / "corpus.parquet")
    for split in ("train", "val", "test"):
        members = [e for e in entities if e.split == split]
        per_fact = examples_per_fact if split == "train" else eval_examples_per_fact
        table = make_examples(members, answers, per_fact, rng_images)
        table = _shuffled(table, rng_images) if split == "train" else table
        _write_parquet(table, out / f"{split}.parquet")
        rows[split] = len(table["target"])
    # drawn after the splits, so the other files are the same with or without it
    train = [e for e in entities if e.split == "train"]
    seen = make_examples(train, answers, eval_examples_per_fact, rng_images)
    _write_parquet(seen, out / "seen.parquet")
    rows["seen"] = len(seen["target"])
    meta = _meta(seed, entities, rows, examples_per_fact, eval_examples_per_fact, corpus_images,
                 novel_answers)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def _meta(seed, entities, rows, per_fact, eval_per_fact, corpus_images, novel_answers) -> dict:
    return {
        "seed": seed,
        "image_size": IMAGE_SIZE,
        "num_entities": {s: sum(e.split == s for e in entities) for s in ("train", "val", "test")},
        "rows": rows,
        "examples_per_fact": per_fact,
        "eval_examples_per_fact": eval_per_fact,
        "corpus_images": corpus_images,
        "novel_answers": novel_answers,
        "colours": COLOURS,
        "patterns": list(PATTERNS),
        "shapes": list(SHAPES),
        "relations": {
            name: {"passage": r.passage, "prompts": list(r.prompts), "vocab": list(r.vocab),
                   "novel_vocab": list(r.novel_vocab)}
            for name, r in RELATIONS.items()
        },
        "entities": [
            {"id": e.id, "colour": e.colour, "pattern": e.pattern, "shape": e.shape,
             "split": e.split}
            for e in entities
        ],
    }


def summary(meta: dict, out_dir: str | Path) -> str:
    """A few lines describing what :func:`make_demo_data` wrote."""
    n, rows = meta["num_entities"], meta["rows"]
    vocab = sum(len(r["vocab"]) for r in meta["relations"].values())
    return (
        f"wrote {out_dir}: corpus {rows['corpus']} passages, train {rows['train']} / "
        f"val {rows['val']} / test {rows['test']} examples, seen {rows.get('seen', 0)} (new "
        f"pictures of training entities)\n"
        f"entities: train {n['train']}, val {n['val']}, test {n['test']} (held out); "
        f"{len(meta['relations'])} relations, {vocab} answer words, seed {meta['seed']}"
        + ("; held-out answers from a disjoint vocabulary" if meta.get("novel_answers") else "")
    )
