"""`manifest.json`: what an index directory holds and how it was built.

Fields: `format_version`, `status` ("building" until the build finishes, then "complete"),
`encoder` (the embedder's identity: name, path, content hash, dim, pooling, ...), `dim`,
`metric`, `count`, `dtype`, `index_factory`, `build` (requested and resolved parameters),
`corpus` (count + fingerprint), `versions`, `created`, `report` (recall@10, QPS, timings).

Loading compares `encoder` with the embedder in use (`check_encoder`); a resumed build
compares the whole partial manifest (`check_resumable`); training compares it with the
model's query text encoder (`check_query_encoder`: the vector space only).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from retrieval_index.durable import replace_durably

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
METRIC = "inner_product"
# Identity keys that locate an encoder but do not change its vectors.
LOCATION_KEYS = ("path", "name")
# Build parameters that may change when a build is resumed: they change neither the embeddings
# nor the trained index (only the batching, the search-time parameters and the report).
RESUMABLE_CHANGES = ("batch_size", "nprobe", "ef_search", "search_params", "num_recall_queries")
# Identity keys that define the vector space a query encoder must share with the index (not
# the document max_length, which only truncates documents).
SPACE_KEYS = ("content_hash", "dim", "pooling", "normalize")


class EncoderMismatchError(ValueError):
    """The embedder in use is not the one the index was built with."""


class ResumeMismatchError(ValueError):
    """A partial build in the output directory was started with other settings."""


def new_manifest(*, encoder: dict, dim: int, index_factory: str, build: dict) -> dict:
    """A manifest with status "building" (the corpus, count and report come later)."""
    return {
        "format_version": FORMAT_VERSION,
        "status": "building",
        "encoder": encoder,
        "dim": dim,
        "metric": METRIC,
        "count": None,
        "dtype": "float32",
        "index_factory": index_factory,
        "build": build,
        "corpus": None,
        "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "report": None,
    }


def library_versions() -> dict:
    import faiss
    import numpy
    import torch
    import transformers

    return {
        "faiss": faiss.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
    }


def write_json_durably(path: Path, value: dict) -> None:
    """Write JSON to `path` via tmp + fsync + rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n")
    replace_durably(tmp, path)


def write_manifest(out_dir: str | Path, manifest: dict) -> None:
    write_json_durably(Path(out_dir) / MANIFEST_FILE, manifest)


def read_manifest(index_dir: str | Path) -> dict:
    path = Path(index_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{index_dir} is not an index directory: it has no {MANIFEST_FILE} "
            f"(build one with scripts/build_index.py --out {index_dir})"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {manifest.get('format_version')!r} is not supported "
            f"(this code reads {FORMAT_VERSION}); rebuild the index"
        )
    return manifest


def describe(identity: dict) -> str:
    """One line naming an encoder identity: name, hash prefix, dim, pooling, path."""
    digest = str(identity.get("content_hash", "?"))
    fields = ", ".join(
        f"{k}={identity[k]}" for k in ("dim", "pooling", "normalize", "max_length") if k in identity
    )
    return f"{identity.get('name', '?')!r} ({digest[:19]}…, {fields}, path {identity.get('path')})"


def identity_differences(built: dict, in_use: dict) -> list[str]:
    """Keys (other than location keys) whose values differ between two identities."""
    keys = (set(built) | set(in_use)) - set(LOCATION_KEYS)
    return sorted(k for k in keys if built.get(k) != in_use.get(k))


def check_encoder(manifest: dict, identity: dict, *, index_dir: str | Path) -> None:
    """Raise `EncoderMismatchError` naming both identities if they differ."""
    differences = identity_differences(manifest["encoder"], identity)
    if differences:
        raise EncoderMismatchError(
            f"the index at {index_dir} was built with encoder {describe(manifest['encoder'])}, "
            f"but the embedder in use is {describe(identity)}; they differ in {differences}. "
            f"Query with the encoder the index was built with, rebuild the index with this one, "
            f"or pass check_encoder=False if you know the vector spaces agree"
        )


def check_query_encoder(
    manifest: dict, identity: dict, *, index_dir: str | Path, what: str = "the query encoder"
) -> None:
    """Raise `EncoderMismatchError` if `identity` (e.g. `rag_mm.text_encoder.encoder_identity`
    of the model's query text tower) embeds into another space than the index's encoder:
    content hash, dim, pooling or normalisation differ."""
    built = manifest["encoder"]
    differences = [k for k in SPACE_KEYS if built.get(k) != identity.get(k)]
    if differences:
        raise EncoderMismatchError(
            f"the index at {index_dir} was built with encoder {describe(built)}, but {what} is "
            f"{describe(identity)}; they differ in {differences}. Build the index with the "
            f"model's text encoder (scripts/build_index.py --encoder DIR), or configure the model "
            f"with the encoder the index was built with"
        )
    built_vision = built.get("vision")
    if built_vision is None:
        return
    vision = identity.get("vision")
    if vision is None or vision.get("content_hash") != built_vision["content_hash"]:
        now = "no vision_dir" if vision is None else f"vision_dir {vision['path']} ({vision['content_hash'][:19]}…)"
        raise EncoderMismatchError(
            f"the index at {index_dir} embeds document images with the query vision folder "
            f"{built_vision['path']} ({built_vision['content_hash'][:19]}…), but the model's query "
            f"encoder has {now}: set the model's vision_dir (RAGModule vision_dir=, "
            f"RetrieverConfig.vision_dir) to that folder, so a query picture and a document "
            f"picture are embedded by the same weights, or rebuild the index with --vision DIR"
        )


def check_resumable(partial: dict, new: dict, *, out_dir: str | Path) -> None:
    """Raise `ResumeMismatchError` if a partial build was started with other settings."""
    problems = []
    differences = identity_differences(partial["encoder"], new["encoder"])
    if differences:
        problems.append(
            f"encoder {describe(partial['encoder'])} vs now {describe(new['encoder'])} "
            f"(differs in {differences})"
        )
    for key in ("dim", "index_factory"):
        if partial[key] != new[key]:
            problems.append(f"{key} {partial[key]!r} vs now {new[key]!r}")
    for key in sorted(set(partial["build"]) | set(new["build"])):
        if key not in RESUMABLE_CHANGES and partial["build"].get(key) != new["build"].get(key):
            problems.append(
                f"build.{key} {partial['build'].get(key)!r} vs now {new['build'].get(key)!r}"
            )
    if partial.get("corpus") and new.get("corpus") and partial["corpus"] != new["corpus"]:
        problems.append(f"corpus {partial['corpus']} vs now {new['corpus']}")
    if problems:
        raise ResumeMismatchError(
            f"{out_dir} holds a partial build started with other settings: "
            + "; ".join(problems)
            + ". Resume with the same settings, or pass a new --out, or --overwrite "
            "(overwrite=True) to start over"
        )
