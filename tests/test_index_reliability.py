"""Index builds survive kills and concurrent builders; loading refuses inconsistent files.

The first test runs real `scripts/build_index.py` processes (tiny random BERT, 600
documents in 30 shards, one thread each): SIGKILLs at random points, a second builder
refused while the first holds the lock, a corrupted shard, and a resumed build that ends
byte-identical to an uninterrupted one. Set KILL_SEED=N to replay the kill points of a run.

Run: .venv/bin/pytest tests/test_index_reliability.py -q
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest
import torch

import retrieval_index as ri
from rag_mm.config import model_config
from rag_mm.model import build_model
from rag_mm.text_encoder import encoder_identity
from retrieval_index.embed import EMBEDDINGS_FILE, SHARD_DIR, shard_path
from retrieval_index.index import INDEX_FILE
from retrieval_index.store import STORE_FILE
from tests.helpers.index import HashEmbedder, make_rows

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "build_index.py"
NUM_DOCS, SHARD_SIZE = 600, 20
NUM_SHARDS = NUM_DOCS // SHARD_SIZE
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "OMP_NUM_THREADS": "1",  # the reference build runs with one torch thread too
    "PYTHONUNBUFFERED": "1",  # a killed builder's lines are not lost in its buffer
}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def num_shards_on_disk(out: Path) -> int:
    return len(list((out / SHARD_DIR).glob("*.npy")))


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_when(proc: subprocess.Popen, condition, what: str, *, stop_first=None) -> str:
    """SIGKILL `proc` as soon as `condition()` holds (optionally SIGSTOP it and run
    `stop_first()` while it is stopped, still holding its lock); returns its stdout. If the
    build finished before the poll saw `condition` (a loaded machine), its returncode is 0."""
    deadline = time.monotonic() + 120
    while not condition():
        assert proc.poll() is None, f"the build ended ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)
    if stop_first is not None:
        proc.send_signal(signal.SIGSTOP)
        stop_first()
    proc.send_signal(signal.SIGKILL)
    stdout, _ = proc.communicate()
    assert proc.returncode in (-signal.SIGKILL, 0), f"{what}: exit code {proc.returncode}"
    return stdout


def load_script():
    spec = importlib.util.spec_from_file_location("build_index_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sigkill_at_random_points_and_a_second_builder(tiny_dirs, tmp_path):
    """Kill points: (1) while the first builder holds the lock, after a random number of
    shards, with a second builder refused by name meanwhile; (2) after a random later number
    of shards, after which a finished shard is corrupted; (3) right when the shards have been
    joined into embeddings.npy. The final resume equals the uninterrupted build, byte for byte."""
    seed = int(os.environ.get("KILL_SEED", time.time_ns() % 2**31))
    rng = random.Random(seed)
    corpus = tmp_path / "corpus.parquet"
    pd.DataFrame(make_rows(NUM_DOCS, seed=3)).to_parquet(corpus)
    common = ["--corpus", str(corpus), "--encoder", str(tiny_dirs[0]), "--shard-size",
              str(SHARD_SIZE), "--index-factory", "Flat"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load_script().main([*common, "--out", str(tmp_path / "reference")])
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "resumed"
    args = [*common, "--out", str(out)]
    first, second = rng.randint(1, 8), rng.randint(12, NUM_SHARDS - 6)
    note = f"KILL_SEED={seed}: kills after {first} and {second} shards, then at embeddings.npy"

    builder = start(args)
    refused = {}

    def second_builder():
        refused["proc"] = subprocess.run(
            [sys.executable, str(SCRIPT), *args], env=ENV, capture_output=True, text=True,
            check=False,
        )

    kill_when(builder, lambda: num_shards_on_disk(out) >= first, f"shard {first}",
              stop_first=second_builder)
    assert builder.returncode == -signal.SIGKILL  # it was stopped, so it cannot have finished
    proc = refused["proc"]
    last_line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert last_line == (
        f"build_index.py: error: --out {out} is being built by another process "
        f"(pid {builder.pid}, lock {out / '.lock'}); wait for it to finish, or choose another --out"
    )

    killed = start(args)
    kill_when(killed, lambda: num_shards_on_disk(out) >= second, f"shard {second}")
    assert killed.returncode == -signal.SIGKILL, note  # 6+ shards were left to embed
    victim = shard_path(out, 0)
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last vector
    victim.write_bytes(bytes(data))
    last = start(args)
    stdout = kill_when(last, lambda: (out / EMBEDDINGS_FILE).exists(), EMBEDDINGS_FILE)
    assert f"shard {victim}: checksum sha256:" in stdout, stdout

    print(f"{note}: the last builder was {'killed' if last.returncode else 'done first'}")
    if last.returncode != 0:  # killed; else it finished between two polls
        final = subprocess.run(
            [sys.executable, str(SCRIPT), *args], env=ENV, capture_output=True, text=True,
            check=False,
        )
        assert final.returncode == 0, f"{note}\n{final.stderr}"
    for name in (EMBEDDINGS_FILE, INDEX_FILE, STORE_FILE):
        assert sha(out / name) == sha(tmp_path / "reference" / name), f"{name} differs; {note}"
    manifest = json.loads((out / "manifest.json").read_text())
    reference = json.loads((tmp_path / "reference" / "manifest.json").read_text())
    for key in ("status", "count", "dim", "corpus", "encoder", "build"):
        assert manifest[key] == reference[key], (key, note)
    assert manifest["embeddings"]["sha256"] == reference["embeddings"]["sha256"]
    assert not (out / SHARD_DIR).exists()
    assert ri.load(out).search(["river stone"], k=3)[1].shape == (1, 3)


class EnvEmbedder(HashEmbedder):
    """A hash embedder that says which device and dtype computed its vectors."""

    def __init__(self, device="cpu", compute_dtype="float32"):
        super().__init__()
        self.device, self.compute_dtype = device, compute_dtype


def interrupted_build(rows, out, embedder, *, after_shard: int):
    def stop(shard, num_shards):
        if shard == after_shard:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ri.build_index(rows, out, embedder=embedder, shard_size=10, progress=False,
                       on_shard=stop, num_recall_queries=10)


def test_shards_from_another_device_or_dtype_are_reembedded(tmp_path, capsys):
    rows = make_rows(50)
    interrupted_build(rows, tmp_path, EnvEmbedder(), after_shard=2)
    ledger = json.loads((tmp_path / SHARD_DIR / "ledger.json").read_text())["shards"]
    assert sorted(ledger) == ["00000", "00001", "00002"]
    assert ledger["00000"]["device"] == "cpu" and ledger["00000"]["dtype"] == "float32"
    assert ledger["00000"]["sha256"] == "sha256:" + sha(shard_path(tmp_path, 0))
    assert {"torch", "transformers", "faiss"} <= set(ledger["00000"])
    index = ri.build_index(rows, tmp_path, embedder=EnvEmbedder("cuda", "bfloat16"),
                           shard_size=10, progress=False, num_recall_queries=10)
    report = index.manifest["report"]
    assert report["embedding"] == {"shards": 5, "reused": 0, "embedded": 5}
    assert report["shard_checks"]["reembedded"] == {"environment": 3}
    assert report["shard_checks"]["environment"]["dtype"] == "bfloat16"
    assert "embedded with device cpu, dtype float32, now device cuda, dtype bfloat16" in (
        capsys.readouterr().out
    )


def test_same_environment_reuses_shards_and_a_stray_shard_is_reembedded(tmp_path):
    rows = make_rows(50)
    interrupted_build(rows, tmp_path, EnvEmbedder(), after_shard=1)
    np.save(shard_path(tmp_path, 3), np.zeros((10, 32), np.float32))  # not in the ledger
    index = ri.build_index(rows, tmp_path, embedder=EnvEmbedder(), shard_size=10,
                           progress=False, num_recall_queries=10)
    assert index.manifest["report"]["embedding"] == {"shards": 5, "reused": 2, "embedded": 3}
    assert index.manifest["report"]["shard_checks"]["reembedded"] == {"unrecorded": 1}
    fresh = ri.build_index(rows, tmp_path / "fresh", embedder=EnvEmbedder(), shard_size=10,
                           progress=False, num_recall_queries=10)
    np.testing.assert_array_equal(index.vectors(np.arange(50)), fresh.vectors(np.arange(50)))


def test_a_changed_corpus_is_refused_before_the_store_is_replaced(tmp_path):
    rows = make_rows(50)
    interrupted_build(rows, tmp_path, HashEmbedder(), after_shard=1)
    before = sha(tmp_path / STORE_FILE)
    changed = [dict(r) for r in rows]
    changed[7]["text"] = "an edited document"
    with pytest.raises(ri.ResumeMismatchError, match=r"partial build .* corpus"):
        ri.build_index(changed, tmp_path, embedder=HashEmbedder(), shard_size=10, progress=False)
    assert sha(tmp_path / STORE_FILE) == before
    assert not (tmp_path / f"{STORE_FILE}.tmp").exists()
    assert num_shards_on_disk(tmp_path) == 2


def test_a_lock_held_in_this_process_refuses_a_builder(tmp_path):
    from retrieval_index.durable import BuildLock

    locked = pytest.raises(ri.IndexLockedError, match=rf"pid {os.getpid()}, lock .*\.lock")
    with BuildLock(tmp_path / "idx"), locked:
        ri.build_index(make_rows(5), tmp_path / "idx", embedder=HashEmbedder(), progress=False)
    index = ri.build_index(make_rows(5), tmp_path / "idx", embedder=HashEmbedder(),
                           progress=False, num_recall_queries=5)  # released: the .lock is ignored
    assert len(index) == 5


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "index"
    ri.build_index(make_rows(40), out, embedder=HashEmbedder(), progress=False,
                   num_recall_queries=10)
    return out


def _edit_manifest(**fields):
    def edit(path: Path):
        manifest = json.loads((path / "manifest.json").read_text())
        manifest.update(fields)
        (path / "manifest.json").write_text(json.dumps(manifest))
    return edit


def _write_vectors(make):
    def edit(path: Path):
        vectors = np.load(path / EMBEDDINGS_FILE)
        np.save(path / EMBEDDINGS_FILE, make(vectors))
    return edit


def _l2_index(path: Path):
    vectors = np.load(path / EMBEDDINGS_FILE)
    index = faiss.IndexFlatL2(vectors.shape[1])
    index.add(vectors)
    faiss.write_index(index, str(path / INDEX_FILE))


def _half_scaled(v):
    v = v.copy()
    v[13] *= 0.5
    return v


@pytest.mark.parametrize(
    "tamper, message",
    [
        (_edit_manifest(metric="l2"), r"manifest.json: metric 'l2' is not supported"),
        (_edit_manifest(dtype="float16"), r"manifest.json: dtype 'float16'; expected 'float32'"),
        (_edit_manifest(dim=64), r"embeddings.npy: shape \(40, 32\); manifest.json says dim 64"),
        (_edit_manifest(count=41), r"embeddings.npy: shape \(40, 32\); .*count 41"),
        (_write_vectors(lambda v: v.astype(np.float16)), r"embeddings.npy: dtype float16"),
        (_write_vectors(lambda v: v[:39]), r"embeddings.npy: shape \(39, 32\)"),
        (_write_vectors(_half_scaled), r"embeddings.npy: row 13 has norm 0.5000"),
        (_l2_index, r"index.faiss: metric type 1 \(faiss.METRIC_L2 = 1\)"),
    ],
    ids=["metric", "dtype", "dim", "count", "vector_dtype", "rows", "norm", "faiss_metric"],
)
def test_load_names_the_file_and_the_value(built, tmp_path, tamper, message):
    import shutil

    path = tmp_path / "index"
    shutil.copytree(built, path)
    tamper(path)
    with pytest.raises((ri.IndexFileError, ValueError)) as err:
        ri.load(path)
    assert "\n" not in str(err.value)
    assert str(path) in str(err.value)
    import re

    assert re.search(message, str(err.value)), str(err.value)


def test_unnormalised_embedder_is_refused_at_build(tmp_path):
    class Unnormalised(HashEmbedder):
        def embed(self, texts, images):
            return super().embed(texts, images) * 3

    with pytest.raises(ValueError, match=r"norm 3.0000 for document \d+.*normalise"):
        ri.build_index(make_rows(5), tmp_path, embedder=Unnormalised(), progress=False)


def test_the_model_refuses_an_index_built_with_another_encoder(tiny_dirs, tmp_path):
    index = ri.build_index(make_rows(20), tmp_path, progress=False, num_recall_queries=5,
                           embedder=ri.TextDocumentEmbedder.from_folder(tiny_dirs[0]))
    index.check_encoder(encoder_identity(tiny_dirs[0]))
    with pytest.raises(ri.EncoderMismatchError, match=r"differ in \['content_hash'\]"):
        index.check_encoder(encoder_identity(tiny_dirs[1]))

    def model_with(text_encoder):
        config = model_config("tiny")
        config = replace(config, retriever=replace(config.retriever, text_encoder=str(text_encoder)))
        with torch.device("meta"):  # no weights needed to compare identities
            return build_model(config)

    model_with(tiny_dirs[0]).attach(index)
    model = model_with(tiny_dirs[1])
    with pytest.raises(ri.EncoderMismatchError, match=r"but the model's query text encoder is 'tiny_b'"):
        model.attach(index)
    model.attach(index, check_encoder=False)
    assert model.retrieval.backend is index
