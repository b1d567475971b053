"""The embedding job: documents -> float32 vectors, written in resumable shards.

Any object with the small `DocumentEmbedder` shape can embed an index; `TextDocumentEmbedder`
is the text-only one (a `rag_mm.TextEncoder` + its tokenizer). `embed_store` runs it over a
`DocumentStore` in shards `shards/00000.npy, ...` of `shard_size` rows, each written
atomically (tmp + fsync + rename) and then recorded in the ledger `shards/ledger.json`: its
rows, sha256, and the environment that embedded it (device type, compute dtype, torch /
transformers / faiss versions). A restarted job reuses a shard only when the ledger records
it, its checksum matches and it was embedded by the same device type, dtype, torch and
transformers (the libraries that compute the vectors); any other shard is re-embedded, with a
line saying why. So a resumed job gives the same vectors as an uninterrupted one, and never
mixes vectors from two environments. `consolidate` then joins the shards into one
memory-mappable `embeddings.npy`.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from retrieval_index.durable import replace_durably
from retrieval_index.manifest import library_versions, write_json_durably
from retrieval_index.store import DocumentStore

SHARD_DIR = "shards"
LEDGER_FILE = "ledger.json"
EMBEDDINGS_FILE = "embeddings.npy"
# Vectors must be unit length within this (bf16/fp16 encoders on CUDA are ~1e-3 off).
NORM_TOLERANCE = 1e-2
# Environment fields that must match for a finished shard to be reused.
REUSE_KEYS = ("device", "dtype", "torch", "transformers")


@runtime_checkable
class DocumentEmbedder(Protocol):
    """What the index job needs from a document encoder.

    - `dim`: the embedding width.
    - `identity()`: a JSON-able dict naming the vector space (weights hash, pooling, ...). It is
      stored in the manifest and compared, minus its `path`, when an index is loaded.
    - `embed(texts, images)`: one float32 row per document, shape (len(texts), dim), normally
      L2-normalised (the index searches by inner product). `images[i]` is a PIL image or None.
      An embedder without an image path raises `UnsupportedImageError` for image rows.
    """

    dim: int

    def identity(self) -> dict: ...

    def embed(self, texts: list[str], images: list[Image.Image | None]) -> np.ndarray: ...


class UnsupportedImageError(ValueError):
    """A document has an image but the embedder embeds text only."""

    def __init__(self, row: int, reason: str, *, where: str | None = None):
        super().__init__(f"{where or f'document {row}'}: {reason}")
        self.row = row
        self.reason = reason


class TextDocumentEmbedder:
    """Embeds document texts with a `TextEncoder`: length-sorted batches, inference mode.

    On CUDA it runs under bf16 (or fp16) autocast; on CPU in fp32. Images are refused. The
    identity is the encoder folder's (content hash): after changing the weights in memory, save
    them to a new folder and load from there, so the manifest names what embedded the index.
    """

    def __init__(
        self,
        encoder,
        tokenizer,
        *,
        max_length: int = 256,
        batch_size: int = 64,
        device=None,
        ignore_images: bool = False,
    ):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 tokens, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if encoder.path is None:
            raise ValueError(
                "TextDocumentEmbedder needs an encoder loaded from a folder (its identity is the "
                "folder's content hash): save it with encoder.save_pretrained(DIR, tokenizer=...) "
                "and load TextEncoder.from_pretrained(DIR)"
            )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.encoder = encoder.eval().to(self.device)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.dim = encoder.dim
        self.ignore_images = ignore_images
        self._identity: dict | None = None

    @property
    def compute_dtype(self) -> str:
        """The dtype the encoder computes in: bf16/fp16 autocast on CUDA, else float32."""
        if self.device.type != "cuda":
            return "float32"
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"

    @classmethod
    def from_folder(cls, path=None, **kwargs) -> TextDocumentEmbedder:
        """Encoder + tokenizer from one local folder (default: the bundled all-MiniLM-L6-v2)."""
        from rag_mm.text_encoder import TextEncoder
        from rag_mm.tokenizer import load_tokenizer

        encoder = TextEncoder.from_pretrained(path)
        kwargs.setdefault("max_length", encoder.pooling.max_length)
        return cls(encoder, load_tokenizer(encoder.path), **kwargs)

    def identity(self) -> dict:
        if self._identity is None:
            from rag_mm.text_encoder import encoder_identity

            self._identity = {
                "kind": "text",
                **encoder_identity(self.encoder.path),
                "max_length": self.max_length,
            }
            if self.ignore_images:  # the store keeps the images; the vectors are the texts'
                self._identity["images"] = "not embedded"
        return dict(self._identity)

    def embed(self, texts: list[str], images: list[Image.Image | None] | None = None) -> np.ndarray:
        if images is not None and not self.ignore_images:
            self._refuse_images(images)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        order = np.argsort([-len(x) for x in ids], kind="stable")
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            out[rows] = self._embed_batch([ids[i] for i in rows], pad)
        return out

    def _embed_batch(self, ids: list[list[int]], pad: int) -> np.ndarray:
        width = max(len(x) for x in ids)
        input_ids = np.full((len(ids), width), pad, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = x
            mask[i, : len(x)] = 1
        input_ids = torch.from_numpy(input_ids).to(self.device)
        mask = torch.from_numpy(mask).to(self.device)
        with torch.inference_mode(), _autocast(self.device):
            vectors = self.encoder(input_ids, mask)
        return vectors.float().cpu().numpy()

    def _refuse_images(self, images: list) -> None:
        for row, image in enumerate(images):
            if image is not None:
                raise UnsupportedImageError(
                    row,
                    "has an image but TextDocumentEmbedder embeds text only; embed the images "
                    "too (build_index(..., embedder=MultimodalDocumentEmbedder(text, vision_dir)); "
                    "CLI: the default for an image corpus, --vision DIR), or embed the texts "
                    "only and keep the images in the store "
                    "(TextDocumentEmbedder(..., ignore_images=True); CLI: --drop-images)",
                )


FUSION = "normalize(text(text) + image_proj(mean(vision(image))))"


class MultimodalDocumentEmbedder:
    """Embeds documents of text, an image, or both, into the query encoder's space.

    A document is embedded the way `rag_mm.retriever.QueryEncoder` embeds a query at
    initialisation (`text_proj` = identity): `d = normalize(t + v)`, where `t` is the text
    encoder's (unit) sentence embedding of the text and `v = image_proj(mean over patches of
    vision(image)))` the query vision path of the folder `vision_dir`
    (`rag_mm.query_vision`). A text-only document is `t` (the `TextDocumentEmbedder` vector),
    an image-only document (empty text) `normalize(v)`. The model's query encoder must start
    from the same folder (`RetrieverConfig.vision_dir`), which attach checks through the
    identity's `vision` hash.
    """

    def __init__(self, text: TextDocumentEmbedder, vision_dir, *, batch_size: int | None = None):
        from rag_mm.query_vision import load_query_vision, vision_identity

        self.text = text
        self.vision = load_query_vision(vision_dir).to(text.device)
        if self.vision.dim != text.dim:
            raise ValueError(
                f"query vision folder {vision_dir} projects to dim {self.vision.dim}, but the text "
                f"encoder {text.encoder.path} embeds {text.dim}: save the vision path of a model "
                f"built with this text encoder"
            )
        self._vision_identity = vision_identity(vision_dir)
        self.dim = text.dim
        self.device = text.device
        self.batch_size = batch_size or text.batch_size
        self.max_length = text.max_length

    @property
    def compute_dtype(self) -> str:
        return self.text.compute_dtype

    def identity(self) -> dict:
        return {**self.text.identity(), "kind": "multimodal", "vision": self._vision_identity,
                "fusion": FUSION}

    def embed(self, texts: list[str], images: list[Image.Image | None]) -> np.ndarray:
        has_text = np.array([bool(t) for t in texts], dtype=bool)
        has_image = np.array([img is not None for img in images], dtype=bool)
        out = np.zeros((len(texts), self.dim), dtype=np.float64)
        rows = np.flatnonzero(has_text)
        if rows.size:
            out[rows] = self.text.embed([texts[i] for i in rows])
        rows = np.flatnonzero(has_image)
        for start in range(0, rows.size, self.batch_size):
            chunk = rows[start : start + self.batch_size]
            out[chunk] += self._embed_images([images[i] for i in chunk], chunk)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        empty = np.flatnonzero(norms[:, 0] == 0)
        if empty.size:
            raise ValueError(f"document {int(empty[0])} has neither text nor image")
        return (out / norms).astype(np.float32)

    def _embed_images(self, images: list, rows: np.ndarray) -> np.ndarray:
        from rag_mm.images import to_tensor

        size = self.vision.config.image_size
        tensors = []
        for row, image in zip(rows, images):
            try:
                tensors.append(to_tensor(image, size))
            except (OSError, ValueError, TypeError) as err:
                raise UnsupportedImageError(
                    int(row), f"image cannot be read as an RGB picture ({err})"
                ) from None
        batch = torch.stack(tensors).to(self.device)
        with torch.inference_mode(), _autocast(self.device):
            vectors = self.vision(batch)
        return vectors.double().cpu().numpy()


def _autocast(device: torch.device):
    if device.type != "cuda":
        return torch.autocast("cpu", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def shard_path(out_dir: Path, shard: int) -> Path:
    return Path(out_dir) / SHARD_DIR / f"{shard:05d}.npy"


def save_atomic(path: Path, array: np.ndarray) -> str:
    """np.save to `path` via tmp + fsync + rename (never half-written); returns its sha256."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    data = buffer.getvalue()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    replace_durably(tmp, path)
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def embedding_environment(embedder: DocumentEmbedder) -> dict:
    """What computed the vectors: device type, compute dtype, library versions."""
    device = getattr(embedder, "device", "cpu")
    versions = library_versions()
    return {
        "device": getattr(device, "type", str(device).split(":")[0]),
        "dtype": str(getattr(embedder, "compute_dtype", "float32")),
        **{k: versions[k] for k in ("torch", "transformers", "faiss")},
    }


def ledger_name(rank: int, world_size: int) -> str:
    """One process writes `ledger.json`; rank r of a distributed build `ledger-r.json`."""
    return LEDGER_FILE if world_size == 1 else f"ledger-{rank:05d}.json"


def read_ledger(out_dir: Path) -> dict:
    """`{shard name: {"rows", "sha256", environment...}}` of every ledger file (`ledger.json`,
    then each rank's `ledger-*.json`, oldest first, so the newest entry of a shard wins); {}
    when none is readable."""
    folder = Path(out_dir) / SHARD_DIR
    ranks = sorted(folder.glob("ledger-*.json"), key=lambda p: p.stat().st_mtime_ns)
    merged = {}
    for path in [folder / LEDGER_FILE, *ranks]:
        try:
            merged.update(json.loads(path.read_text())["shards"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return merged


def _write_ledger(out_dir: Path, shards: dict, name: str = LEDGER_FILE) -> None:
    write_json_durably(Path(out_dir) / SHARD_DIR / name, {"shards": shards})


class RemoteBuildError(ValueError):
    """Another rank of a distributed build stopped with an error (its message is quoted)."""


def raise_if_any_failed(collective, error: BaseException | None) -> list:
    """All-gather whether each rank failed; re-raise this rank's error, else the first other
    rank's as `RemoteBuildError`. Returns the gathered `None`s when every rank succeeded."""
    message = None if error is None else f"{type(error).__name__}: {error}"
    gathered = collective.all_gather_object(message)
    if error is not None:
        raise error
    failed = [(rank, m) for rank, m in enumerate(gathered) if m is not None]
    if failed:
        rank, message = failed[0]
        raise RemoteBuildError(f"rank {rank} of the build stopped: {message}")
    return gathered


def reuse_problem(
    path: Path, entry: dict | None, rows: int, dim: int, env: dict
) -> tuple[str, str] | None:
    """`(reason, message)` saying why the shard at `path` must be (re-)embedded, or None when
    it can be reused. Reasons: missing, unrecorded, environment, unreadable, shape, checksum."""
    if not path.is_file():
        return "missing", "missing"
    if entry is None:
        return "unrecorded", "not recorded in the ledger (the job stopped before recording it)"
    changed = [k for k in REUSE_KEYS if entry.get(k) != env[k]]
    if changed:
        then = ", ".join(f"{k} {entry.get(k)}" for k in changed)
        now = ", ".join(f"{k} {env[k]}" for k in changed)
        return "environment", f"embedded with {then}, now {now}"
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:
        return "unreadable", f"unreadable ({err})"
    if array.shape != (rows, dim) or array.dtype != np.float32:
        return "shape", f"holds {array.dtype} {array.shape}, expected float32 {(rows, dim)}"
    actual = file_sha256(path)
    if actual != entry.get("sha256"):
        recorded = str(entry.get("sha256"))
        return "checksum", f"checksum {actual[:19]}… differs from the ledger's {recorded[:19]}…"
    return None


def embed_store(
    store: DocumentStore,
    embedder: DocumentEmbedder,
    out_dir: str | Path,
    *,
    shard_size: int,
    on_shard: Callable[[int, int], None] | None = None,
    progress: bool = True,
    collective=None,
) -> dict:
    """Embed every row of `store` into `out_dir/shards/`; returns `{"shards", "reused", "embedded"}`
    plus `"reembedded"` (shards on disk that could not be reused, per reason) and `"environment"`.

    `on_shard(shard, num_shards)` is called after each shard this process embeds or reuses.
    With a `collective` of N ranks (a distributed build), rank r takes shards r, r + N, ...,
    in rounds: after each round the ranks exchange their row counts (rank 0's progress bar
    counts all of them) and whether one failed (then every rank stops, naming it). Each rank
    records its shards in its own ledger file; the counts returned are summed over ranks.
    """
    from retrieval_index.collective import LocalCollective

    collective = collective or LocalCollective()
    rank, world = collective.rank, collective.world_size
    out_dir = Path(out_dir)
    (out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    n = len(store)
    num_shards = -(-n // shard_size)
    _check_images_supported(store, embedder)
    env = embedding_environment(embedder)
    ledger = read_ledger(out_dir)
    mine = ledger if world == 1 else {}
    bar = _bar(n, progress and rank == 0)
    counts = {"reused": 0, "reembedded": {}}
    for first in range(0, num_shards, world):
        shard, rows, error = first + rank, 0, None
        if shard < num_shards:
            try:
                rows = _embed_shard(store, embedder, out_dir, shard, shard_size, ledger, mine,
                                    env, counts, bar, ledger_name(rank, world))
                if on_shard is not None:
                    on_shard(shard, num_shards)
            except Exception as err:  # noqa: BLE001 - re-raised after every rank learns of it
                error = err
        if world > 1:
            raise_if_any_failed(collective, error)
            rows = sum(collective.all_gather_object(rows))
        elif error is not None:
            raise error
        bar.update(rows)
    bar.close()
    reused = sum(collective.all_gather_object(counts["reused"]))
    reembedded = {}
    for part in collective.all_gather_object(counts["reembedded"]):
        for reason, count in part.items():
            reembedded[reason] = reembedded.get(reason, 0) + count
    return {
        "shards": num_shards,
        "reused": reused,
        "embedded": num_shards - reused,
        "reembedded": reembedded,
        "environment": env,
    }


def _embed_shard(store, embedder, out_dir, shard, shard_size, ledger, mine, env, counts, bar,
                 ledger_file) -> int:
    """Reuse or (re-)embed one shard, recording it in `mine` (written to `ledger_file`)."""
    n = len(store)
    start, stop = shard * shard_size, min(n, (shard + 1) * shard_size)
    path = shard_path(out_dir, shard)
    problem = reuse_problem(path, ledger.get(path.stem), stop - start, embedder.dim, env)
    if problem is None:
        counts["reused"] += 1
        if mine is not ledger:
            mine[path.stem] = ledger[path.stem]
            _write_ledger(out_dir, mine, ledger_file)
        return stop - start
    reason, message = problem
    if reason != "missing":
        counts["reembedded"][reason] = counts["reembedded"].get(reason, 0) + 1
        bar.write(f"shard {path}: {message}; re-embedding it")
    vectors = _embed_rows(store, embedder, start, stop)
    _check_vectors(vectors, stop - start, embedder.dim, start)
    digest = save_atomic(path, np.ascontiguousarray(vectors, dtype=np.float32))
    mine[path.stem] = {"rows": stop - start, "sha256": digest, **env}
    _write_ledger(out_dir, mine, ledger_file)
    return stop - start


def _embed_rows(store: DocumentStore, embedder: DocumentEmbedder, start: int, stop: int):
    """The embedder's vectors of store rows [start, stop); an image it cannot read is refused
    naming the store file, the corpus row and its id."""
    try:
        return embedder.embed(store.texts(start, stop), store.images(start, stop))
    except UnsupportedImageError as err:
        row = start + err.row
        doc_id = store.ids([row])[0]
        raise UnsupportedImageError(
            row, err.reason, where=f"{store.path}: corpus row {row} (id {doc_id!r})"
        ) from None


def _check_images_supported(store: DocumentStore, embedder: DocumentEmbedder) -> None:
    """Fail before the long job when the store has images the embedder cannot take."""
    row = store.first_image_row()
    if row is None:
        return
    try:
        embedder.embed(store.texts(row, row + 1), store.images(row, row + 1))
    except UnsupportedImageError as err:
        doc_id = store.ids([row])[0]
        raise UnsupportedImageError(
            row, err.reason, where=f"corpus row {row} (id {doc_id!r})"
        ) from None


def _check_vectors(vectors: np.ndarray, rows: int, dim: int, first_row: int = 0) -> None:
    if vectors.shape != (rows, dim):
        raise ValueError(
            f"embedder returned shape {vectors.shape} for {rows} documents; expected ({rows}, {dim})"
        )
    if not np.isfinite(vectors).all():
        raise ValueError("embedder returned non-finite values (NaN/inf); check the encoder weights")
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    worst = int(np.argmax(np.abs(norms - 1.0))) if rows else 0
    if rows and abs(norms[worst] - 1.0) > NORM_TOLERANCE:
        raise ValueError(
            f"embedder returned a vector of norm {norms[worst]:.4f} for document {first_row + worst}; "
            f"the index searches by inner product over L2-normalised vectors (norm 1 within "
            f"{NORM_TOLERANCE}): normalise in the embedder"
        )


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="embed", unit="doc", disable=not enabled, smoothing=0.1)


def consolidate(out_dir: str | Path, *, count: int, dim: int, shard_size: int) -> Path:
    """Join the shards into `embeddings.npy` (tmp + fsync + rename); the caller removes `shards/`
    once it has recorded the file."""
    out_dir = Path(out_dir)
    path = out_dir / EMBEDDINGS_FILE
    tmp = path.with_name(path.name + ".tmp")
    joined = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(count, dim))
    start = 0
    for shard in range(-(-count // shard_size)):
        part = np.load(shard_path(out_dir, shard), mmap_mode="r")
        joined[start : start + len(part)] = part
        start += len(part)
    assert start == count, (start, count)
    joined.flush()
    del joined
    replace_durably(tmp, path)
    return path


def load_embeddings(out_dir: str | Path) -> np.ndarray:
    """The consolidated (count, dim) float32 embeddings, memory-mapped read-only."""
    return np.load(Path(out_dir) / EMBEDDINGS_FILE, mmap_mode="r")
