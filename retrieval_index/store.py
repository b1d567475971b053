"""The document store: one Arrow IPC file of `id, text, image (PNG bytes or null)` rows.

Row number == the int64 key FAISS returns, so `get(keys)` is a memory-mapped `take`. The file
is written once per build (`write_store`) and opened read-only (`DocumentStore`).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from retrieval_index.durable import replace_durably

STORE_FILE = "docs.arrow"
SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.large_string(), nullable=False),
        pa.field("image", pa.binary(), nullable=True),
    ]
)
ROWS_PER_BATCH = 1024


class UnknownIdError(KeyError):
    """Ids asked for that the store does not hold."""

    def __str__(self) -> str:
        return str(self.args[0])


class CorpusError(ValueError):
    """A corpus row or column the index job cannot use (names the row or column)."""


def iter_corpus(corpus, *, batch_size: int = ROWS_PER_BATCH) -> Iterator[tuple[list, list, list]]:
    """`(ids, texts, images)` batches from a `datasets.Dataset` or a list of dicts.

    Canonical columns: `id` (str), `text` (str), optional `image` (PIL image, bytes or None).
    """
    if isinstance(corpus, Sequence) and not hasattr(corpus, "column_names"):
        if corpus and not isinstance(corpus[0], Mapping):
            raise CorpusError(
                f"corpus rows must be dicts with id/text[/image], got {type(corpus[0])}"
            )
        _check_columns(set(corpus[0]) if corpus else {"id", "text"})
        for start in range(0, len(corpus), batch_size):
            rows = corpus[start : start + batch_size]
            yield (
                [r.get("id") for r in rows],
                [r.get("text") for r in rows],
                [r.get("image") for r in rows],
            )
        return
    _check_columns(set(corpus.column_names))
    has_image = "image" in corpus.column_names
    for batch in corpus.iter(batch_size=batch_size):
        n = len(batch["id"])
        yield batch["id"], batch["text"], batch["image"] if has_image else [None] * n


def _check_columns(columns: set) -> None:
    missing = {"id", "text"} - columns
    if missing:
        raise CorpusError(
            f"corpus lacks column(s) {sorted(missing)}; it has {sorted(columns)}. The index job "
            f"expects canonical columns id, text[, image] (rag_mm.data.load_corpus renames them; "
            f"the CLI takes --id-column/--text-column/--image-column)"
        )


def to_png(image, *, row: int, doc_id: str | None = None) -> bytes | None:
    """PNG bytes of a PIL image (or of encoded image bytes / a datasets image dict); None stays
    None. An image that cannot be decoded is a `CorpusError` naming the row and id."""
    try:
        return _to_png(image, row=row)
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, CorpusError):
            raise
        where = f"corpus row {row}" + (f" (id {doc_id!r})" if doc_id is not None else "")
        raise CorpusError(f"{where}: its image cannot be read ({err}); fix or drop that row "
                          f"(CLI: --on-bad skip)") from None


def _to_png(image, *, row: int) -> bytes | None:
    if image is None:
        return None
    if isinstance(image, Mapping):  # datasets Image feature with decode=False
        image = image.get("bytes") or (Image.open(image["path"]) if image.get("path") else None)
        if image is None:
            return None
    if isinstance(image, bytes | bytearray):
        image = Image.open(io.BytesIO(image))
    if not isinstance(image, Image.Image):
        raise CorpusError(
            f"corpus row {row}: image must be a PIL image, bytes or None, got {type(image)}"
        )
    if image.mode not in ("RGB", "RGBA", "L", "LA", "P", "I", "I;16", "1"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def write_store(
    corpus, out_dir: str | Path, *, progress: bool = False, check: Callable[[dict], None] | None = None
) -> dict:
    """Write `out_dir/docs.arrow` atomically; returns `{"count", "fingerprint"}` of the rows.

    The fingerprint is a sha256 over ids, texts and image bytes in row order; a resumed build
    compares it to refuse a changed corpus. Duplicate or empty ids and non-string texts raise
    `CorpusError` naming the row. `check(info)` runs before the new file replaces the old one:
    if it raises, the tmp file is removed and the existing store is left as it was.
    """
    path = Path(out_dir) / STORE_FILE
    tmp = path.with_name(path.name + ".tmp")
    digest = hashlib.sha256()
    seen: dict[str, int] = {}
    try:
        _write_rows(corpus, tmp, digest, seen, progress)
        info = {"count": len(seen), "fingerprint": "sha256:" + digest.hexdigest()}
        if not seen:
            raise CorpusError("the corpus is empty: an index needs at least one document")
        if check is not None:
            check(info)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    replace_durably(tmp, path)
    return info


def _write_rows(corpus, tmp: Path, digest, seen: dict[str, int], progress: bool) -> None:
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
        batches = iter_corpus(corpus)
        for ids, texts, images in _progress(batches, progress, len(corpus)):
            start = len(seen)
            texts = [t if t is not None or img is None else "" for t, img in zip(texts, images)]
            _check_rows(ids, texts, start, seen)
            pngs = [to_png(img, row=start + i, doc_id=d) for i, (img, d) in enumerate(zip(images, ids))]
            for doc_id, text, png in zip(ids, texts, pngs):
                digest.update(_row_bytes(doc_id, text, png))
            writer.write_batch(
                pa.record_batch(
                    [
                        pa.array(ids, pa.string()),
                        pa.array(texts, pa.large_string()),
                        pa.array(pngs, pa.binary()),
                    ],
                    schema=SCHEMA,
                )
            )


def _check_rows(ids: list, texts: list, start: int, seen: dict[str, int]) -> None:
    for i, (doc_id, text) in enumerate(zip(ids, texts)):
        row = start + i
        if not isinstance(doc_id, str) or not doc_id:
            raise CorpusError(f"corpus row {row}: id must be a non-empty string, got {doc_id!r}")
        if not isinstance(text, str):
            raise CorpusError(
                f"corpus row {row} (id {doc_id!r}): text must be a string, got {type(text)}"
            )
        if doc_id in seen:
            raise CorpusError(
                f"corpus row {row}: duplicate id {doc_id!r} (first seen at row {seen[doc_id]})"
            )
        seen[doc_id] = row


def _row_bytes(doc_id: str, text: str, png: bytes | None) -> bytes:
    image = b"\x00" if png is None else b"\x01" + hashlib.sha256(png).digest()
    return doc_id.encode() + b"\x1f" + text.encode() + b"\x1e" + image


def _progress(batches: Iterable, enabled: bool, num_rows: int) -> Iterable:
    if not enabled:
        return batches
    from tqdm.auto import tqdm

    total = -(-num_rows // ROWS_PER_BATCH)
    return tqdm(batches, desc="store", unit="batch", total=total, leave=False)


class DocumentStore:
    """Read-only, memory-mapped view of `docs.arrow`: `get(keys)`, `key_of(ids)`, `len()`."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / STORE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"document store {path} does not exist")
        self.path = path
        self.table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        self._key_by_id: dict[str, int] | None = None

    def __len__(self) -> int:
        return self.table.num_rows

    def texts(self, start: int, stop: int) -> list[str]:
        return self.table.column("text").slice(start, stop - start).to_pylist()

    def images(self, start: int, stop: int) -> list[Image.Image | None]:
        column = self.table.column("image").slice(start, stop - start)
        if column.null_count == len(column):
            return [None] * len(column)
        return [_decode(b) for b in column.to_pylist()]

    def first_image_row(self) -> int | None:
        """The first row that has an image, or None for a text-only store."""
        column = self.table.column("image")
        if column.null_count == len(column):
            return None
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        return int(np.argmax(valid))

    def get(self, keys) -> list[dict]:
        """Rows `{"key", "id", "text", "image"}` for int64 keys (images decoded to PIL)."""
        keys = self._check_keys(keys)
        rows = self.table.take(pa.array(keys, pa.int64())).to_pylist()
        return [
            {"key": int(k), "id": r["id"], "text": r["text"], "image": _decode(r["image"])}
            for k, r in zip(keys, rows)
        ]

    def ids(self, keys) -> list[str]:
        keys = self._check_keys(keys)
        return self.table.column("id").take(pa.array(keys, pa.int64())).to_pylist()

    def key_of(self, ids: Iterable[str]) -> np.ndarray:
        """int64 keys of `ids`; `UnknownIdError` (a KeyError) names the ids not in the store."""
        if self._key_by_id is None:
            self._key_by_id = {
                doc_id: i for i, doc_id in enumerate(self.table.column("id").to_pylist())
            }
        ids = [ids] if isinstance(ids, str) else list(ids)
        unknown = [i for i in ids if i not in self._key_by_id]
        if unknown:
            raise UnknownIdError(
                f"{len(unknown)} id(s) not in the document store {self.path}: {unknown[:5]}"
                + (" ..." if len(unknown) > 5 else "")
            )
        return np.fromiter((self._key_by_id[i] for i in ids), dtype=np.int64, count=len(ids))

    def _check_keys(self, keys) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        bad = keys[(keys < 0) | (keys >= len(self))]
        if bad.size:
            raise IndexError(
                f"keys {bad[:5].tolist()} out of range for a store of {len(self)} documents"
            )
        return keys


def _decode(png: bytes | None) -> Image.Image | None:
    if png is None:
        return None
    image = Image.open(io.BytesIO(png))
    image.load()
    return image
