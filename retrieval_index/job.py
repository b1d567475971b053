"""`build_index`: corpus -> index directory, resumable, ending with a recall/QPS report.

Steps, each recorded in `manifest.json` (status "building" until the end):
1. check the factory string; take the exclusive lock `OUT/.lock` (a second builder is refused);
   check the output directory (resume a partial build or refuse);
2. write the document store `docs.arrow` (fingerprinting the corpus; a partial build's store
   is replaced only after the fingerprint matched);
3. embed in shards (finished shards whose ledger entry checks out are kept on restart), then
   join them in `embeddings.npy` (its sha256 recorded in the manifest);
4. train + add the FAISS index, save `index.faiss`;
5. measure recall@10 against exact search and QPS; write the complete manifest.
Every file is written to a tmp name, fsynced and renamed, so a kill at any point leaves a
directory that the same command resumes.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss

from retrieval_index.build import (
    add_rows,
    apply_search_params,
    check_trainable,
    default_search_params,
    make_index,
    recall_report,
    train_and_add,
    train_size_for,
)
from retrieval_index.collective import Collective, LocalCollective
from retrieval_index.durable import LOCK_FILE, BuildLock, replace_durably
from retrieval_index.embed import (
    EMBEDDINGS_FILE,
    SHARD_DIR,
    DocumentEmbedder,
    TextDocumentEmbedder,
    consolidate,
    embed_store,
    file_sha256,
    load_embeddings,
    raise_if_any_failed,
)
from retrieval_index.index import INDEX_FILE, Index, load
from retrieval_index.manifest import (
    MANIFEST_FILE,
    check_resumable,
    new_manifest,
    read_manifest,
    write_manifest,
)
from retrieval_index.sharded import SEARCH_SHARD_DIR, search_shard_path, shard_bounds
from retrieval_index.store import STORE_FILE, DocumentStore, write_store

ARTIFACTS = (MANIFEST_FILE, STORE_FILE, EMBEDDINGS_FILE, INDEX_FILE, SHARD_DIR, SEARCH_SHARD_DIR)
# The query vision folder scripts/build_index.py writes for an image corpus; kept by --overwrite.
VISION_DIR = "vision"


class IndexExistsError(ValueError):
    """The output directory already holds a complete index or unrelated files."""


@dataclass(kw_only=True)
class BuildConfig:
    """Settings of one build; a resumed build must match all but the search-time ones and batch_size."""

    index_factory: str = "Flat"  # any FAISS index_factory string (inner-product metric)
    shard_size: int = 10_000  # documents per embedding shard (the unit of resumption)
    batch_size: int | None = None  # documents per encoder batch (default embedder only; 64)
    seed: int = 0  # training sample and recall-query sample
    train_size: int | None = None  # training vectors; None = min(n, max(10k, 40 * nlist))
    nprobe: int | None = None  # IVF lists searched; None = nlist/16 within [min(8, nlist/2), 256]
    ef_search: int | None = None  # HNSW efSearch; None = 128
    num_recall_queries: int = 1000  # queries of the recall@10 / QPS report
    # Search shards for sharded search over data-parallel ranks (`retrieval_index.sharded`):
    # S FAISS files over contiguous row ranges; a world size must divide S. Flat needs none.
    search_shards: int | None = None

    def __post_init__(self) -> None:
        if not self.index_factory or not isinstance(self.index_factory, str):
            raise ValueError(
                f"index_factory must be a FAISS factory string, got {self.index_factory!r}"
            )
        for name in (
            "shard_size",
            "batch_size",
            "train_size",
            "nprobe",
            "ef_search",
            "num_recall_queries",
            "search_shards",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


def build_index(
    corpus,
    out_dir: str | Path,
    *,
    embedder: DocumentEmbedder | None = None,
    index_factory: str = "Flat",
    batch_size: int | None = None,
    shard_size: int = 10_000,
    seed: int = 0,
    train_size: int | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
    num_recall_queries: int = 1000,
    search_shards: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_shard: Callable[[int, int], None] | None = None,
    collective: Collective | None = None,
) -> Index | None:
    """Embed `corpus` (a `datasets.Dataset` or list of dicts with id, text[, image]) into an
    index at `out_dir` and return it loaded. Without `embedder`, the bundled all-MiniLM-L6-v2
    embeds texts. A partial build at `out_dir` with the same settings is resumed.
    `on_shard(shard, num_shards)` is called after each embedding shard is on disk.

    With a `collective` of N ranks (e.g. `TorchCollective()` under torchrun), every rank calls
    this with the same arguments: rank 0 takes the lock, writes the store and, at the end,
    builds the FAISS index; every rank embeds its share of the shards (shard s on rank s % N)
    and resumes its own. Rank 0 returns the index, the others None.
    """
    config = BuildConfig(
        index_factory=index_factory,
        shard_size=shard_size,
        batch_size=batch_size,
        seed=seed,
        train_size=train_size,
        nprobe=nprobe,
        ef_search=ef_search,
        num_recall_queries=num_recall_queries,
        search_shards=search_shards,
    )
    embedder = _resolve_embedder(embedder, batch_size)
    out_dir = Path(out_dir).expanduser().resolve()
    build = _plan(config, embedder, len(corpus))
    collective = collective or LocalCollective()
    check_world_size(len(corpus), config.shard_size, collective.world_size)
    if collective.world_size == 1:
        with BuildLock(out_dir):
            manifest, timings = _start(corpus, out_dir, embedder, config, build, overwrite, progress)
            start = time.perf_counter()
            embedding = _embed(out_dir, embedder, config, manifest, on_shard, progress)
            timings["embed_seconds"] = _since(start)
            _finish(out_dir, config, build, manifest, timings, embedding, progress)
        return load(out_dir, embedder=embedder)
    _build_distributed(corpus, out_dir, embedder, config, build, overwrite, progress, on_shard,
                       collective)
    return load(out_dir, embedder=embedder) if collective.rank == 0 else None


def check_world_size(count: int, shard_size: int, world_size: int) -> None:
    """Every rank of a distributed build needs a shard: refuse more ranks than shards."""
    num_shards = -(-count // shard_size)
    if num_shards < world_size:
        raise ValueError(
            f"--shard-size (shard_size=) {shard_size} splits the {count} documents into "
            f"{num_shards} shard(s), fewer than the world size {world_size} (WORLD_SIZE, "
            f"--nproc_per_node x nodes): use --shard-size <= {max(1, count // world_size)} or "
            f"at most {num_shards} processes"
        )


def _build_distributed(corpus, out_dir, embedder, config, build, overwrite, progress, on_shard,
                       collective) -> None:
    """Rank 0 holds the lock throughout and does the steps before and after the embedding;
    each step ends with an exchange, so an error on one rank stops all of them, named."""
    with ExitStack() as stack:

        def start():
            stack.enter_context(BuildLock(out_dir))
            manifest, timings = _start(corpus, out_dir, embedder, config, build, overwrite,
                                       progress)
            return manifest, timings, _embedded_already(out_dir, config, manifest)

        manifest, timings, already = _on_lead(collective, start)
        begin = time.perf_counter()
        if already is None:
            stats = embed_store(DocumentStore(out_dir), embedder, out_dir,
                                shard_size=config.shard_size, on_shard=on_shard,
                                progress=progress, collective=collective)
        timings["embed_seconds"] = _since(begin)

        def finish():
            embedding = already or _join(out_dir, embedder, config, manifest, stats)
            _finish(out_dir, config, build, manifest, timings, embedding, progress)

        _on_lead(collective, finish)


def _on_lead(collective, step):
    """Run `step()` on rank 0; every rank gets its result, or raises if it failed."""
    result, error = None, None
    if collective.rank == 0:
        try:
            result = step()
        except Exception as err:  # noqa: BLE001 - re-raised after the other ranks learn of it
            error = err
    raise_if_any_failed(collective, error)
    return collective.all_gather_object(result)[0]


def _start(corpus, out_dir, embedder, config, build, overwrite, progress) -> tuple[dict, dict]:
    """Check or clear `out_dir`, write the building manifest and the store (steps 1-2)."""
    partial = _prepare_out_dir(out_dir, overwrite)
    manifest = new_manifest(
        encoder=embedder.identity(),
        dim=embedder.dim,
        index_factory=config.index_factory,
        build=build,
    )
    if partial is not None:
        check_resumable(partial, manifest, out_dir=out_dir)
        manifest.update(
            created=partial["created"],
            corpus=partial["corpus"],
            count=partial["count"],
            embeddings=partial.get("embeddings"),
        )
    write_manifest(out_dir, manifest)
    _log(
        f"building {config.index_factory!r} index of {len(corpus)} documents in {out_dir}",
        progress,
    )

    def same_corpus(corpus_info: dict) -> None:  # before the new store replaces the old one
        if partial is not None:
            check_resumable(partial, {**manifest, "corpus": corpus_info}, out_dir=out_dir)

    timings = {}
    start = time.perf_counter()
    corpus_info = write_store(corpus, out_dir, progress=progress, check=same_corpus)
    timings["store_seconds"] = _since(start)
    manifest.update(corpus=corpus_info, count=corpus_info["count"])
    write_manifest(out_dir, manifest)
    return manifest, timings


def _finish(out_dir, config, build, manifest, timings, embedding, progress) -> None:
    """FAISS, the recall / QPS report and the complete manifest (steps 4-5)."""
    report = _index_and_report(out_dir, config, build, progress)
    manifest.update(status="complete", report={**report, **timings, **embedding})
    write_manifest(out_dir, manifest)
    _log(_summary(manifest), progress)


def _plan(config: BuildConfig, embedder: DocumentEmbedder, count: int) -> dict:
    """Build parameters, checked (factory, training size, search params) before any work."""
    empty = make_index(config.index_factory, embedder.dim)
    check_trainable(empty, count, config.index_factory)
    if config.search_shards is not None and config.search_shards > count:
        raise ValueError(
            f"search_shards (--search-shards) {config.search_shards} is larger than the {count} "
            f"documents; every search shard needs at least one"
        )
    build = asdict(config)
    build.pop("index_factory")
    build["batch_size"] = getattr(embedder, "batch_size", config.batch_size)
    build["max_length"] = getattr(embedder, "max_length", None)
    if empty.is_trained:
        build["train_size"] = 0
    else:
        build["train_size"] = min(count, config.train_size or train_size_for(empty, count))
    build["search_params"] = _search_params(empty, config)
    return build


def _index_and_report(out_dir: Path, config: BuildConfig, build: dict, progress: bool) -> dict:
    """Train + add + save the FAISS index; its recall@10 / QPS report with timings."""
    vectors = load_embeddings(out_dir)
    shards = config.search_shards if config.index_factory != "Flat" else None

    def write_search_shards(empty: faiss.Index) -> None:
        (out_dir / SEARCH_SHARD_DIR).mkdir(exist_ok=True)
        for shard, (start, stop) in enumerate(shard_bounds(len(vectors), shards)):
            part = faiss.clone_index(empty)
            add_rows(part, vectors, start, stop)
            _save_index(part, search_shard_path(out_dir, shard))

    index, info = train_and_add(
        vectors,
        config.index_factory,
        train_size=build["train_size"],
        seed=config.seed,
        progress=progress,
        on_trained=write_search_shards if shards else None,
    )
    _save_index(index, out_dir / INDEX_FILE)
    apply_search_params(index, build["search_params"])
    report = recall_report(index, vectors, num_queries=config.num_recall_queries, seed=config.seed)
    return {**report, **info}


def _resolve_embedder(
    embedder: DocumentEmbedder | None, batch_size: int | None
) -> DocumentEmbedder:
    if embedder is None:
        return TextDocumentEmbedder.from_folder(batch_size=batch_size or 64)
    if batch_size is not None:
        raise ValueError(
            "batch_size= sets the batch of the default embedder; with embedder= set the batch "
            "size on your embedder instead"
        )
    return embedder


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> dict | None:
    """The partial manifest to resume from, or None for a fresh build (after clearing)."""
    if overwrite and out_dir.exists():
        for name in ARTIFACTS:  # never LOCK_FILE: this process holds it
            for path in (out_dir / name, out_dir / f"{name}.tmp"):
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
    if overwrite or not any(p.name not in (LOCK_FILE, VISION_DIR) for p in out_dir.iterdir()):
        out_dir.mkdir(parents=True, exist_ok=True)
        return None
    if not (out_dir / MANIFEST_FILE).is_file():
        raise IndexExistsError(
            f"--out {out_dir} exists, is not empty and holds no {MANIFEST_FILE}; choose a new --out "
            f"(or pass --overwrite / overwrite=True to replace index files there)"
        )
    manifest = read_manifest(out_dir)
    if manifest["status"] == "complete":
        raise IndexExistsError(
            f"--out {out_dir} already holds a complete index ({manifest['count']} documents, built "
            f"{manifest['created']}); pass --overwrite (overwrite=True) to rebuild it or choose a new --out"
        )
    return manifest


def _embed(out_dir: Path, embedder, config: BuildConfig, manifest: dict, on_shard, progress):
    """Shards -> `embeddings.npy`, its sha256 recorded in the manifest before `shards/` goes.

    Returns the report's `embedding` (shard counts) and `shard_checks` (re-embedded shards
    per reason, the environment that embedded them)."""
    already = _embedded_already(out_dir, config, manifest)
    if already is not None:
        return already
    stats = embed_store(
        DocumentStore(out_dir), embedder, out_dir, shard_size=config.shard_size,
        on_shard=on_shard, progress=progress,
    )
    return _join(out_dir, embedder, config, manifest, stats)


def _embedded_already(out_dir: Path, config: BuildConfig, manifest: dict) -> dict | None:
    """The report's embedding entries when `embeddings.npy` is recorded and intact, else None."""
    done = out_dir / EMBEDDINGS_FILE
    recorded = manifest.get("embeddings") or {}
    if not (done.is_file() and recorded.get("sha256") == file_sha256(done)):
        return None
    shutil.rmtree(out_dir / SHARD_DIR, ignore_errors=True)  # killed before it was removed
    num_shards = -(-manifest["count"] // config.shard_size)
    stats = {"shards": num_shards, "reused": num_shards, "embedded": 0}
    return {"embedding": stats, "shard_checks": recorded.get("shard_checks")}


def _join(out_dir: Path, embedder, config: BuildConfig, manifest: dict, stats: dict) -> dict:
    """Consolidate the shards into `embeddings.npy`, record its sha256, remove `shards/`."""
    done = out_dir / EMBEDDINGS_FILE
    checks = {"reembedded": stats.pop("reembedded"), "environment": stats.pop("environment")}
    consolidate(out_dir, count=manifest["count"], dim=embedder.dim, shard_size=config.shard_size)
    manifest["embeddings"] = {"sha256": file_sha256(done), "shard_checks": checks}
    write_manifest(out_dir, manifest)
    shutil.rmtree(out_dir / SHARD_DIR)
    return {"embedding": stats, "shard_checks": checks}


def _search_params(index: faiss.Index, config: BuildConfig) -> dict:
    params = default_search_params(index)
    overrides = {"nprobe": config.nprobe, "efSearch": config.ef_search}
    for name, value in overrides.items():
        if value is None:
            continue
        if name not in params:
            raise ValueError(
                f"{name}={value} does not apply to --index-factory {config.index_factory!r} "
                f"(its search parameters: {sorted(params) or 'none'})"
            )
        params[name] = value
    return params


def _save_index(index: faiss.Index, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    replace_durably(tmp, path)


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 3)


def _log(message: str, enabled: bool) -> None:
    if enabled:
        print(message, flush=True)


def _summary(manifest: dict) -> str:
    report = manifest["report"]
    recall = next(v for k, v in report.items() if k.startswith("recall_at_"))
    return (
        f"index {manifest['index_factory']!r}: {manifest['count']} docs, dim {manifest['dim']}, "
        f"recall@{report['k']} {recall:.3f} vs exact on {report['num_queries']} queries, "
        f"{report['qps']:.0f} queries/s, search params {manifest['build']['search_params']}"
    )
