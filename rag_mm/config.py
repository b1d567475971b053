"""Model configurations: one keyword-only dataclass per concern, and the named sizes.

`model_config("tiny" | "demo" | "1b")` returns a fresh `ModelConfig`; override fields with
`dataclasses.replace` or the `overrides` keyword.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

MODES = ("rag", "closed_book", "random", "gold")
ATTENTION_KINDS = ("masked", "causal", "flex")
READERS = ("rag", "fid")


@dataclass(kw_only=True)
class VisionConfig:
    """A ViT-style tower: non-overlapping patches, pre-norm encoder blocks."""

    image_size: int = 32  # square input images, pixels per side
    patch_size: int = 8  # pixels per patch side
    num_channels: int = 3
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision image_size={self.image_size} is not divisible by patch_size={self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"vision hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(kw_only=True)
class GeneratorConfig:
    """The fused decoder-only stack that reads [document | image patches | prompt | target]."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    mlp_ratio: float = 4.0
    vocab_size: int = 30522  # the MiniLM / BERT WordPiece vocabulary
    tie_embeddings: bool = False  # ties the LM head to the token embedding (forces one stage)
    # How the decoder blocks attend (`rag_mm.layers.decoder_attention`): "masked" SDPA with a
    # boolean causal + padding mask (any padding; rules out FlashAttention); "flex" the same
    # rule as a FlexAttention block mask (a fused kernel under torch.compile on GPU; no CPU
    # backward); "causal" SDPA is_causal=True without a mask (FlashAttention / cuDNN), for
    # sequences whose only padding is at the end of the target (refused otherwise).
    attention: str = "masked"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"generator attention={self.attention!r} is not one of "
                             f"{', '.join(ATTENTION_KINDS)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"generator hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}"
            )
        if self.num_layers < 1:
            raise ValueError(f"generator num_layers must be >= 1, got {self.num_layers}")


@dataclass(kw_only=True)
class RetrieverConfig:
    """The query encoder (prompt + image) and how documents are scored and used."""

    text_encoder: str | None = None  # local HF encoder folder; None = the bundled MiniLM
    train_text_encoder: bool = False  # fine-tune the text tower of the query encoder
    # Score the retrieved and gold documents with a trainable copy of the text tower that
    # embedded the index (`rag_mm.doc_encoder`) instead of the index's stored vectors; the
    # search still uses the stored ones until an index refresh rebuilds them.
    train_doc_encoder: bool = False
    # Order the over-retrieved candidates by a second score before the reader takes the top_k:
    # a query head of its own and a light trainable document tower over the frozen text
    # tower's token states (`rag_mm.rescorer`). Demo task, retriever alone, 6000 steps:
    # held-out recall@1 59% without, 80% with (the first stage's own 59% -> 72%).
    rescore: bool = False
    rescore_heads: int = 1  # token-attention heads of the rescoring document tower
    # Folder of the query encoder's vision path (rag_mm.query_vision): the query encoder starts
    # from it, and an index of image documents must have been embedded with it (attach checks).
    vision_dir: str | None = None
    top_k: int = 4  # documents marginalised over by the generator
    num_candidates: int = 16  # over-retrieved list (recall@num_candidates, hard negatives)
    # Use the over-retrieved non-gold documents as extra negatives. Off by default: documents
    # that are never a training positive (held-out entities) then only ever get pushed away,
    # and held-out recall@1 fell from 26% to 5% on the demo task.
    hard_negatives: bool = False
    # While training, put the gold document in place of the last of the top-k when the search
    # missed it, so the generator always has a document to copy from. Without it the demo's
    # generator learned to memorise training facts instead (held-out exact match 9%).
    gold_in_training: bool = True
    # Every training example's gold document is a negative for every other query (besides the
    # in-batch ones): up to this many, a fixed sample beyond; 0 = in-batch only. Taken from the
    # training set's gold ids (`RAGModel.set_shared_negatives`), so held-out documents are never
    # pushed away. On the demo task, batch 32: held-out recall@1 27% -> 48-60% (3000 steps).
    shared_negatives: int = 4096
    temperature: float = 0.05  # document score = <q, d> / temperature
    contrastive_weight: float = 1.0  # weight of the in-batch + hard-negative loss on (q, gold)

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"retriever top_k must be >= 1, got {self.top_k}")
        if self.num_candidates < self.top_k:
            raise ValueError(
                f"retriever num_candidates={self.num_candidates} must be >= top_k={self.top_k}"
            )
        if self.shared_negatives < 0:
            raise ValueError(f"retriever shared_negatives must be >= 0, got {self.shared_negatives}")
        if self.temperature <= 0:
            raise ValueError(f"retriever temperature must be > 0, got {self.temperature}")
        if self.rescore_heads < 1:
            raise ValueError(f"retriever rescore_heads must be >= 1, got {self.rescore_heads}")
        if self.rescore and self.train_text_encoder:
            raise ValueError("retriever rescore caches the frozen text tower's token states: "
                             "it needs train_text_encoder=False")
        if self.rescore and self.train_doc_encoder:
            raise ValueError("retriever rescore and train_doc_encoder both rescore documents "
                             "with a trainable tower: choose one")


@dataclass(kw_only=True, frozen=True)
class ReaderConfig:
    """How the generator reads the retrieved documents and produces the answer."""

    # "rag": each document read in its own sequence, the answers mixed by the document scores
    # (the RAG marginal); "fid": fusion-in-decoder, all top-k documents in one sequence that
    # the generator attends across; the scores are trained towards the documents the answer
    # was copied from (needs `copy`).
    kind: str = "rag"
    # Mix a copy distribution over the read documents' tokens into the LM head (a pointer,
    # See et al. 2017), so an answer the LM head never produced in training can be copied.
    copy: bool = True
    # While training, the probability that an example's answer is replaced, inside its gold
    # document and as its target, by another example's answer of the same batch (Longpre et
    # al. 2021), so that answering from memory stops paying. Applies where the target's tokens
    # appear verbatim in the gold document's tokens; other examples are left unchanged.
    counterfactual: float = 0.5
    # Of those counterfactual answers, the share that is a random span of 1-3 word pieces from
    # the tokenizer's vocabulary (a whole-word piece and up to two continuation pieces, at most
    # max_target_tokens - 1) instead of another example's answer. Another example's answer is
    # always a training target; a random span teaches the copy of answers that never are,
    # including words split into several pieces: on the demo, every never-trained answer of
    # two pieces (`zebras` = `zebra ##s`) failed with the gold document without it.
    novel_spans: float = 0.5
    # fid: weight of KL(copy sources || softmax(doc scores)), how the scores are trained
    distill_weight: float = 1.0
    # fid: in training, put each example's documents in a random order, so that a slot's
    # position says nothing about its rank. Off: on the demo the ranked fid reader's exact
    # match equals recall@1 (it reads the first slot), but the shuffled one fell to 13.8%
    # held-out (44.5% on training entities) after 700 joint steps: it did not learn to find
    # the matching document among four.
    shuffle_slots: bool = False
    # rag: the generator also scores each document it reads (a relevance logit r_k from its
    # state before the answer, which has attended over the document, the picture and the
    # prompt: a cross-encoder), and the documents are mixed by softmax(s_k + r_k) instead of
    # softmax(s_k). r is trained by a listwise loss, -log softmax(r)_gold over the read
    # documents, on examples whose gold document is among them (with `gold_in_training`,
    # every example that has a gold id); examples without a gold id train r only through
    # the marginal. The fid reader has no per-document state and refuses it. Off: on the
    # demo r stayed at chance (14% of held-out, 25% of training-entity questions put the
    # gold document first among four) after 513 joint steps, and RAG did not gain.
    rerank: bool = False
    rerank_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in READERS:
            raise ValueError(f"reader={self.kind!r} is not one of {', '.join(READERS)}")
        if self.kind == "fid" and not self.copy:
            raise ValueError("reader='fid' trains the document scores from the copy pointer's "
                             "sources; set copy=True (--copy) or use reader='rag'")
        if not 0.0 <= self.counterfactual <= 1.0:
            raise ValueError(f"counterfactual must be in [0, 1], got {self.counterfactual}")
        if not 0.0 <= self.novel_spans <= 1.0:
            raise ValueError(f"novel_spans must be in [0, 1], got {self.novel_spans}")
        if self.distill_weight < 0:
            raise ValueError(f"distill_weight must be >= 0, got {self.distill_weight}")
        if self.rerank and self.kind != "rag":
            raise ValueError(f"rerank=True needs reader='rag' (each document in its own "
                             f"sequence); reader={self.kind!r} has no per-document state, "
                             f"use rerank=False (--no-rerank)")
        if self.rerank_weight < 0:
            raise ValueError(f"rerank_weight must be >= 0, got {self.rerank_weight}")



@dataclass(kw_only=True)
class ModelConfig:
    """Everything needed to build a `RAGModel`."""

    name: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    mode: str = "rag"  # rag | closed_book | random | gold (baselines)
    max_doc_tokens: int = 24  # tokens kept per retrieved document
    max_prompt_tokens: int = 16
    max_target_tokens: int = 4  # answer tokens incl. the closing [SEP]
    use_doc_images: bool = False  # give image documents' patches to the generator

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {', '.join(MODES)}")
        for name in ("max_doc_tokens", "max_prompt_tokens", "max_target_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def docs_per_query(self) -> int:
        """Sequences the generator runs per example under the configured mode: one per
        document read (rag reader), or one holding all of them (fid reader)."""
        if self.reader.kind == "fid":
            return 1
        return self.retriever.top_k if self.mode in ("rag", "random") else 1

    @property
    def doc_slot_len(self) -> int:
        """Positions one document takes: its tokens, then its image patches (if used)."""
        return self.max_doc_tokens + (self.vision.num_patches if self.use_doc_images else 0)

    @property
    def doc_slots(self) -> int:
        """Documents in one fused sequence: top_k for the fid reader (empty slots where a
        mode reads fewer), else 1."""
        return self.retriever.top_k if self.reader.kind == "fid" else 1

    @property
    def num_positions(self) -> int:
        """Learned positions: one document slot and the rest. Every fid slot reuses the
        document positions (the documents form a set, as in fusion-in-decoder), so both
        readers have the same parameters and a checkpoint loads under either."""
        return (self.doc_slot_len + self.vision.num_patches + self.max_prompt_tokens
                + self.max_target_tokens)

    @property
    def seq_len(self) -> int:
        """Fused sequence: [doc slot(s) | image patches | prompt | target], a doc slot being
        [doc tokens | doc image patches]."""
        return (self.doc_slots * self.doc_slot_len + self.vision.num_patches
                + self.max_prompt_tokens + self.max_target_tokens)


def _tiny() -> ModelConfig:
    return ModelConfig(
        name="tiny",
        # the vision towers only see B images (not B x k sequences): cheap, and they must
        # learn to recognise held-out combinations of attributes for retrieval to work
        vision=VisionConfig(hidden_size=64, num_layers=2, num_heads=4),
        generator=GeneratorConfig(hidden_size=64, num_layers=2, num_heads=2),
        retriever=RetrieverConfig(top_k=2, num_candidates=8),
        max_doc_tokens=16,
        max_prompt_tokens=12,
        max_target_tokens=3,
    )


def _demo() -> ModelConfig:
    return ModelConfig(
        name="demo",
        vision=VisionConfig(hidden_size=64, num_layers=2, num_heads=4),
        generator=GeneratorConfig(hidden_size=128, num_layers=3, num_heads=4),
        retriever=RetrieverConfig(top_k=4, num_candidates=16),
        max_doc_tokens=16,
        max_prompt_tokens=12,
        max_target_tokens=3,
    )


def _one_billion() -> ModelConfig:
    return ModelConfig(
        name="1b",
        vision=VisionConfig(image_size=224, patch_size=14, hidden_size=768, num_layers=12,
                            num_heads=12),
        generator=GeneratorConfig(hidden_size=2048, num_layers=20, num_heads=16),
        retriever=RetrieverConfig(top_k=4, num_candidates=32),
        max_doc_tokens=128,
        max_prompt_tokens=32,
        max_target_tokens=16,
    )


NAMED_CONFIGS = {"tiny": _tiny, "demo": _demo, "1b": _one_billion}


def model_config(name: str, **overrides) -> ModelConfig:
    """A named size (`tiny`, `demo`, `1b`) with top-level fields replaced by `overrides`."""
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown model size {name!r}; choose one of {', '.join(NAMED_CONFIGS)}")
    return replace(NAMED_CONFIGS[name](), **overrides)
