"""Load and validate corpus and example tables into Hugging Face ``datasets``.

A corpus has rows ``id, text[, image]``; examples have rows ``image, prompt, target[, gold_id]``.
Source column names are configurable (:class:`CorpusColumns`, :class:`ExampleColumns`); the
returned dataset always uses the canonical names, ids and texts as strings and images as the
``datasets.Image`` feature (decoded to PIL RGB). Formats are detected from the path (see
``FORMATS_HELP``). Bad rows raise :class:`DataError` naming the file, row and fault, or are
skipped and counted with ``on_bad="skip"``.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import io
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets import Dataset, DatasetInfo, Features, Value
from datasets import Image as ImageFeature
from datasets.table import InMemoryTable
from PIL import Image as PILImage

ON_BAD = ("error", "skip")
FORMATS_HELP = (
    "a .parquet file or a folder of .parquet files; a .jsonl file (image column = file paths "
    "relative to the jsonl's folder); an imagefolder folder (images + metadata.jsonl or "
    "metadata.csv with a file_name column); a folder written by Dataset.save_to_disk "
    "(state.json + dataset_info.json)"
)
IMAGE_STORAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


class DataError(ValueError):
    """A data file is unusable as given: the message names the file, row or column and the fix."""


# --------------------------------------------------------------------------- column configs


def _check_names(columns) -> None:
    names = [getattr(columns, f.name) for f in fields(columns)]
    for f, name in zip(fields(columns), names):
        if not isinstance(name, str) or not name:
            raise ValueError(f"{type(columns).__name__}.{f.name} must be a non-empty string")
    if len(set(names)) != len(names):
        raise ValueError(f"{type(columns).__name__} maps two fields to one column: {names}")


@dataclass(frozen=True, kw_only=True)
class CorpusColumns:
    """Source column names of a corpus table. ``image`` is optional in the data."""

    id: str = "id"
    text: str = "text"
    image: str = "image"

    def __post_init__(self) -> None:
        _check_names(self)


@dataclass(frozen=True, kw_only=True)
class ExampleColumns:
    """Source column names of an example table. ``gold_id`` is optional in the data."""

    image: str = "image"
    prompt: str = "prompt"
    target: str = "target"
    gold_id: str = "gold_id"

    def __post_init__(self) -> None:
        _check_names(self)


@dataclass(frozen=True)
class _Col:
    name: str  # canonical name (= field of the columns dataclass)
    kind: str  # "id" (unique, non-empty), "text" (non-empty), "ref" (nullable id), "image"
    required: bool

    @property
    def flag(self) -> str:
        return f"--{self.name.replace('_', '-')}-column"


_CORPUS = (_Col("id", "id", True), _Col("text", "text", True), _Col("image", "image", False))
_EXAMPLES = (
    _Col("image", "image", True),
    _Col("prompt", "text", True),
    _Col("target", "text", True),
    _Col("gold_id", "ref", False),
)


def add_column_args(parser: argparse.ArgumentParser, columns: type, prefix: str = "") -> None:
    """Add ``--{prefix}<field>-column`` flags for ``CorpusColumns`` or ``ExampleColumns``."""
    for f in fields(columns):
        flag = f"--{prefix}{f.name.replace('_', '-')}-column"
        parser.add_argument(flag, default=f.default, help=f"source column for '{f.name}'")


def columns_from_args(args: argparse.Namespace, columns: type, prefix: str = ""):
    """Build ``columns`` from flags added by :func:`add_column_args`."""
    key = prefix.replace("-", "_")
    return columns(**{f.name: getattr(args, f"{key}{f.name}_column") for f in fields(columns)})


# --------------------------------------------------------------------------- results


@dataclass
class LoadReport:
    """Counts from one load: rows read and kept, skipped rows per reason, images fixed."""

    path: str
    format: str
    rows_read: int
    rows_kept: int
    skipped: dict[str, int] = field(default_factory=dict)
    images_fixed: int = 0

    def __str__(self) -> str:
        total = sum(self.skipped.values())
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
        skipped = f"skipped {total}" + (f" ({reasons})" if reasons else "")
        return (
            f"{self.path} [{self.format}]: read {self.rows_read}, kept {self.rows_kept}, "
            f"{skipped}, fixed {self.images_fixed} images"
        )


@dataclass(frozen=True)
class _Locator:
    """Maps a global row of the concatenated table back to (file, row in that file)."""

    files: tuple[str, ...]
    starts: tuple[int, ...]

    def where(self, row: int, row_id: str | None = None) -> str:
        i = bisect.bisect_right(self.starts, row) - 1
        text = f"{self.files[i]}, row {row - self.starts[i]}"
        return text + (f" (id {row_id!r})" if row_id is not None else "")


@dataclass(frozen=True)
class LoadResult:
    """A validated dataset, its load report and, per kept row, its row in the source."""

    dataset: Dataset
    report: LoadReport
    source_rows: np.ndarray = field(repr=False)
    locator: _Locator = field(repr=False)


# --------------------------------------------------------------------------- public loaders


def load_corpus(
    path: str | Path,
    *,
    columns: CorpusColumns = CorpusColumns(),
    on_bad: str = "error",
    image_size: int | None = None,
    fix_images: bool = False,
) -> LoadResult:
    """Load a corpus (``id, text[, image]``); ids must be unique and texts non-blank."""
    return _load(path, _CORPUS, columns, on_bad, image_size, fix_images)


def load_examples(
    path: str | Path,
    *,
    columns: ExampleColumns = ExampleColumns(),
    on_bad: str = "error",
    image_size: int | None = 32,
    fix_images: bool = False,
) -> LoadResult:
    """Load examples (``image, prompt, target[, gold_id]``); images must be RGB and square."""
    return _load(path, _EXAMPLES, columns, on_bad, image_size, fix_images)


def check_gold_ids(
    examples: LoadResult, corpus: LoadResult | Dataset, *, on_bad: str = "error"
) -> LoadResult:
    """Check that every non-null ``gold_id`` of ``examples`` is an id of ``corpus``."""
    _check_on_bad(on_bad)
    ds = examples.dataset
    if "gold_id" not in ds.column_names:
        raise DataError(f"{examples.report.path}: examples have no gold_id column to check")
    corpus_ds = corpus.dataset if isinstance(corpus, LoadResult) else corpus
    corpus_name = corpus.report.path if isinstance(corpus, LoadResult) else "the corpus"
    gold = ds.data.table.column("gold_id")
    corpus_ids = pc.cast(corpus_ds.data.table.column("id"), pa.string()).combine_chunks()
    known = pc.is_in(gold, value_set=corpus_ids)
    bad = np.flatnonzero(~pc.fill_null(pc.or_(known, pc.is_null(gold)), True).to_numpy())
    problems = {}
    for row in bad:
        src = int(examples.source_rows[row])
        msg = (
            f"{examples.locator.where(src)}: gold_id {gold[int(row)].as_py()!r} is not an id "
            f"in {corpus_name} ({len(corpus_ds)} ids); gold_id must name a corpus row or be null"
        )
        problems[src] = ("unknown_gold_id", msg)
    _raise_if_errors(problems, on_bad)
    keep = np.ones(len(ds), dtype=bool)
    keep[bad] = False
    skipped = dict(examples.report.skipped)
    report = replace(examples.report, rows_kept=int(keep.sum()), skipped=skipped)
    if len(bad):
        report.skipped["unknown_gold_id"] = report.skipped.get("unknown_gold_id", 0) + len(bad)
    return LoadResult(
        ds.select(np.flatnonzero(keep)) if len(bad) else ds,
        report,
        examples.source_rows[keep],
        examples.locator,
    )


# --------------------------------------------------------------------------- reading sources


@dataclass(frozen=True)
class _Source:
    name: str  # the file (or folder of parquet files) named in whole-table errors
    table: pa.Table
    features: Features
    format: str
    locator: _Locator
    base_dirs: tuple[Path, ...]  # per file: folder that relative image paths are relative to

    def base_dir(self, row: int) -> Path:
        return self.base_dirs[bisect.bisect_right(self.locator.starts, row) - 1]


def _read_source(path: Path) -> _Source:
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; expected {FORMATS_HELP}")
    if path.is_file() and path.suffix == ".parquet":
        return _read_parquet(path, [path])
    if path.is_file() and path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.is_dir() and (path / "dataset_dict.json").exists():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise DataError(
            f"{path} holds a DatasetDict with splits {splits}; pass one split's folder, "
            f"e.g. {path / (splits[0] if splits else 'train')}"
        )
    if path.is_dir() and (path / "state.json").exists() and (path / "dataset_info.json").exists():
        return _read_saved(path)
    if path.is_dir() and any((path / m).exists() for m in ("metadata.jsonl", "metadata.csv")):
        return _read_imagefolder(path)
    if path.is_dir() and (files := sorted(path.rglob("*.parquet"))):
        return _read_parquet(path, files)
    raise DataError(f"{path}: unknown data format; supported: {FORMATS_HELP}")


def _read_parquet(path: Path, files: list[Path]) -> _Source:
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f))
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{f}: not a readable parquet file ({e})") from e
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException as e:
        raise DataError(f"{path}: parquet files have incompatible schemas ({e})") from e
    starts = tuple(np.cumsum([0] + [t.num_rows for t in tables[:-1]]).tolist())
    locator = _Locator(tuple(str(f) for f in files), starts)
    base_dirs = tuple(f.parent for f in files)
    features = Features.from_arrow_schema(tables[0].schema)
    return _Source(str(path), table, features, "parquet", locator, base_dirs)


def _read_jsonl(path: Path) -> _Source:
    records = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {line_no}: invalid JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise DataError(f"{path}, line {line_no}: expected a JSON object per line")
            records.append(record)
    names = list(dict.fromkeys(k for r in records for k in r))
    table = pa.table({n: _json_column([r.get(n) for r in records]) for n in names})
    locator = _Locator((str(path),), (0,))
    features = Features.from_arrow_schema(table.schema)
    return _Source(str(path), table, features, "jsonl", locator, (path.parent,))


def _json_column(values: list) -> pa.Array:
    """An arrow column; mixed scalar types (e.g. int and str ids) become strings."""
    try:
        return pa.array(values)
    except (pa.ArrowException, TypeError, ValueError):
        return pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values])


def _read_saved(path: Path) -> _Source:
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: cannot load a Dataset.save_to_disk folder ({e})") from e
    ds = ds.flatten_indices() if ds._indices is not None else ds
    locator = _Locator((str(path),), (0,))
    return _Source(str(path), ds.data.table, ds.features, "save_to_disk", locator, (path,))


def _read_imagefolder(path: Path) -> _Source:
    meta = path / ("metadata.jsonl" if (path / "metadata.jsonl").exists() else "metadata.csv")
    _check_metadata_has_file_name(meta)
    try:
        ds = datasets.load_dataset("imagefolder", data_dir=str(path), split="train")
    except Exception as e:
        raise DataError(f"{path}: cannot load as imagefolder ({type(e).__name__}: {e})") from e
    locator = _Locator((str(meta),), (0,))
    return _Source(str(meta), ds.data.table, ds.features, "imagefolder", locator, (path,))


def _check_metadata_has_file_name(meta: Path) -> None:
    with open(meta, encoding="utf-8") as fh:
        if meta.suffix == ".csv":
            header = next(csv.reader(fh), [])
        else:
            first = next((line for line in fh if line.strip()), "{}")
            try:
                header = list(json.loads(first))
            except json.JSONDecodeError as e:
                raise DataError(f"{meta}: first record is not valid JSON ({e.msg})") from e
    if "file_name" not in header:
        raise DataError(
            f"{meta}: imagefolder metadata needs a 'file_name' column with image paths "
            f"relative to {meta.parent}; found columns {header}"
        )


# --------------------------------------------------------------------------- validation


def _check_on_bad(on_bad: str) -> None:
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad (--on-bad) must be one of {ON_BAD}, got {on_bad!r}")


def _load(path, specs, columns, on_bad, image_size, fix_images) -> LoadResult:
    _check_on_bad(on_bad)
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(
            f"image_size (--image-size) must be a positive int or None, got {image_size!r}"
        )
    path = Path(path)
    source = _read_source(path)
    table, specs = _select_columns(source, specs, columns)
    ids = table.column("id").to_pylist() if "id" in table.column_names else None
    problems = _text_problems(table, specs, source.locator, ids)
    images, fixed = None, set()
    if "image" in table.column_names:
        required = any(s.name == "image" and s.required for s in specs)
        images, fixed = _check_images(
            table, source, ids, required, image_size, fix_images, problems
        )
    if ids is not None:
        _duplicate_problems(ids, source.locator, problems)
    _raise_if_errors(problems, on_bad)
    return _build_result(path, source, table, specs, images, problems, fixed)


def _select_columns(source: _Source, specs, columns) -> tuple[pa.Table, tuple[_Col, ...]]:
    """Rename source columns to canonical names (canonical first) and cast ids/texts to str."""
    table, present = source.table, []
    file = source.name
    for spec in specs:
        name = getattr(columns, spec.name)
        if name in table.column_names:
            present.append((spec, name))
        elif spec.required or name != spec.name:
            raise DataError(
                f"{file}: missing column {name!r} ({spec.name}); columns are "
                f"{table.column_names}; pass {spec.flag} NAME "
                f"({type(columns).__name__}({spec.name}=NAME)) to use another column"
            )
    sources = {name for _, name in present}
    extras = [n for n in table.column_names if n not in sources]
    clash = [n for n in extras if n in {s.name for s, _ in present}]
    if clash:
        raise DataError(
            f"{file}: column {clash[0]!r} would be overwritten by a renamed column; "
            f"rename or drop it first"
        )
    arrays = [_canonical_array(table, spec, name, file) for spec, name in present]
    arrays += [table.column(n) for n in extras]
    names = [spec.name for spec, _ in present] + extras
    return pa.table(arrays, names=names), tuple(spec for spec, _ in present)


def _canonical_array(table: pa.Table, spec: _Col, name: str, file) -> pa.ChunkedArray:
    col = table.column(name)
    if spec.kind == "image":
        return col
    if pa.types.is_string(col.type):
        return col
    try:
        return pc.cast(col, pa.string())
    except (pa.ArrowException, NotImplementedError) as e:
        raise DataError(
            f"{file}: column {name!r} ({spec.name}) has type {col.type}; expected strings"
        ) from e


def _text_problems(table, specs, locator, ids) -> dict[int, tuple[str, str]]:
    """Vectorised checks: null/blank ids, prompts, texts and targets."""
    problems: dict[int, tuple[str, str]] = {}
    for spec in specs:
        if spec.kind not in ("id", "text"):
            continue
        col = table.column(spec.name)
        blank = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0), True)
        if spec.name == "text" and "image" in table.column_names:  # an image-only document
            blank = pc.and_(blank, pc.is_null(table.column("image")))
        bad = np.flatnonzero(blank.to_numpy(zero_copy_only=False))
        reason = "missing_id" if spec.kind == "id" else f"empty_{spec.name}"
        for row in bad:
            row = int(row)
            row_id = ids[row] if ids is not None and spec.kind != "id" else None
            msg = (
                f"{locator.where(row, row_id)}: {spec.name} is empty or whitespace-only; "
                f"every row needs a non-blank {spec.name}"
            )
            problems.setdefault(row, (reason, msg))
    return problems


def _duplicate_problems(ids: list, locator: _Locator, problems: dict) -> None:
    """Flag every repeat of an id among rows that are otherwise good (the first one is kept)."""
    first: dict[str, int] = {}
    for row, row_id in enumerate(ids):
        if row in problems:
            continue
        if row_id in first:
            msg = (
                f"{locator.where(row, row_id)}: duplicate id {row_id!r}, first at "
                f"{locator.where(first[row_id])}; ids must be unique "
                f"(on_bad='skip' keeps the first)"
            )
            problems[row] = ("duplicate_id", msg)
        else:
            first[row_id] = row


def _check_images(table, source, ids, required, image_size, fix, problems) -> tuple[list, set]:
    """Decode every image once; returns storage values per row and the rows fixed."""
    col = table.column("image")
    if not _is_image_type(col.type):
        raise DataError(
            f"{source.name}: column 'image' has type {col.type}; expected image "
            f"bytes, file paths or the datasets Image feature"
        )
    values, fixed_rows = [], set()
    for row, value in enumerate(col.to_pylist()):
        ref = _image_ref(value, source.base_dir(row))
        if ref is None:
            values.append(None)
            if required:
                msg = f"{source.locator.where(row)}: no image; every example needs one"
                problems.setdefault(row, ("bad_image", msg))
            continue
        where = source.locator.where(row, ids[row] if ids is not None else None)
        stored, problem, fixed = _check_one_image(ref, where, image_size, fix)
        values.append(stored)
        if fixed:
            fixed_rows.add(row)
        if problem is not None:
            problems.setdefault(row, problem)
    return values, fixed_rows


def _is_image_type(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        return {t.field(i).name for i in range(t.num_fields)} == {"bytes", "path"}
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_string(t) or (
        pa.types.is_large_string(t) or pa.types.is_null(t)
    )


def _image_ref(value, base_dir: Path) -> dict | None:
    """Normalise a cell to ``{"bytes", "path"}`` with an absolute path, or None."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data, path = bytes(value), None
    else:
        data, path = None, value
    if data is None and not path:
        return None
    if path and data is None and not Path(path).is_absolute():
        path = str(base_dir / path)
    return {"bytes": data, "path": path}


def _check_one_image(ref: dict, where: str, image_size: int | None, fix: bool):
    """Returns (stored value, problem or None, whether it was fixed)."""
    shown = f" {ref['path']}" if ref["path"] else ""
    try:
        data = ref["bytes"] if ref["bytes"] is not None else Path(ref["path"]).read_bytes()
        img = PILImage.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many exception types for corrupt files
        return ref, ("bad_image", f"{where}: cannot read image{shown} ({e})"), False
    wrong_mode = img.mode != "RGB"
    wrong_size = image_size is not None and img.size != (image_size, image_size)
    if not (wrong_mode or wrong_size):
        return ref, None, False
    if fix:
        return {"bytes": _fixed_png(img, image_size), "path": ref["path"]}, None, True
    if wrong_mode:
        msg = f"{where}: image{shown} has mode {img.mode}, expected RGB"
        return ref, ("image_mode", msg + "; pass fix_images=True (--fix-images) to convert"), False
    size = f"{img.size[0]}x{img.size[1]}"
    msg = f"{where}: image{shown} is {size}, expected {image_size}x{image_size} (image_size)"
    return ref, ("image_size", msg + "; pass fix_images=True (--fix-images) to resize"), False


def _fixed_png(img: PILImage.Image, image_size: int | None) -> bytes:
    img = img.convert("RGB")
    if image_size is not None and img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), PILImage.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _raise_if_errors(problems: dict, on_bad: str) -> None:
    if on_bad == "error" and problems:
        first = min(problems)
        more = f" ({len(problems) - 1} more bad rows)" if len(problems) > 1 else ""
        raise DataError(
            f"{problems[first][1]}{more}; fix the data or pass on_bad='skip' (--on-bad skip) "
            f"to skip and count bad rows"
        )


def _build_result(path, source, table, specs, images, problems, fixed) -> LoadResult:
    keep = np.ones(table.num_rows, dtype=bool)
    keep[list(problems)] = False
    kept_rows = np.flatnonzero(keep)
    table = table.filter(pa.array(keep))
    canonical = {s.name: s.kind for s in specs}
    features = {n: _feature_for(n, canonical, source, table) for n in table.column_names}
    if images is not None:
        kept = pa.array([images[i] for i in kept_rows], type=IMAGE_STORAGE)
        table = table.set_column(table.column_names.index("image"), "image", kept)
    info = DatasetInfo(features=Features(features))
    dataset = Dataset(InMemoryTable(table.replace_schema_metadata(None)), info=info)
    skipped: dict[str, int] = {}
    for reason, _ in problems.values():
        skipped[reason] = skipped.get(reason, 0) + 1
    num_fixed = len(fixed - problems.keys())
    report = LoadReport(str(path), source.format, len(keep), len(kept_rows), skipped, num_fixed)
    return LoadResult(dataset, report, kept_rows, source.locator)


def _feature_for(name: str, canonical: dict, source: _Source, table: pa.Table):
    if name in canonical:
        return ImageFeature() if canonical[name] == "image" else Value("string")
    feature = source.features.get(name)
    return feature if feature is not None else Features.from_arrow_schema(table.schema)[name]
