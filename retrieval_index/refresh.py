"""Index refresh: re-embed an index's corpus with a snapshot of a document encoder, in the
background, into a new index directory.

    job = RefreshJob.start(state_dict, source_dir="runs/x/index", out_dir="runs/x/refresh/r1")
    ...                                  # training goes on; nothing here blocks it
    result = job.poll()                  # None while running, then a RefreshResult

`RefreshJob.start` returns at once. A thread writes the snapshot (the weights given, plus the
config, tokenizer and pooling files of the encoder folder the source index names) to
`out_dir.encoder/` (beside the index), then runs `python -m retrieval_index.refresh` as a child process (one
intra-op thread and `nice` +10 by default, so training keeps the other cores), which builds the
new index with `build_index` from the source's document store (same rows, ids and order: the
keys do not change; the corpus fingerprint is checked), its factory and build settings, and
`TextDocumentEmbedder` over the snapshot. The snapshot's weights are deleted once the index is
built (the manifest keeps their sha256; the weights travel in the training checkpoint).

A failed build (any error in the thread or the child) gives `RefreshResult(ok=False, error=...)`
with the last lines of the child's log (`out_dir.log`); the source index is never touched.

`stop()` (training ended first) never waits for the build: it terminates the child (SIGKILL
after `KILL_AFTER` s if it is still alive), joins the thread for at most `timeout` s, and the
job's files (`out_dir`, `out_dir.encoder/`, `out_dir.log`) are removed: by `stop()` once the
thread has ended, else by the thread itself as soon as it leaves the step it was in (writing
the snapshot or loading a finished index; both are checked for a stop after they return).
Text corpora only (the snapshot is a text tower). No Lightning here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval_index.manifest import read_manifest

ENCODER_SUFFIX = ".encoder"
KILL_AFTER = 3.0  # seconds between SIGTERM and SIGKILL for a stopped build
COPIED_FILES = ("config.json", "modules.json", "sentence_bert_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@dataclass
class RefreshResult:
    ok: bool
    path: Path  # the new index directory (complete only when ok)
    seconds: float  # from start to the new index loaded
    error: str | None = None
    index: object | None = None  # the new `Index`, loaded in the background (when ok)


class RefreshJob:
    """One background refresh; `poll()` never blocks, `wait()` does, `stop()` ends it."""

    def __init__(self, out_dir: Path, log_path: Path) -> None:
        self.out_dir = out_dir
        self.log_path = log_path
        self.started = time.perf_counter()
        self._process: subprocess.Popen | None = None
        self._result: RefreshResult | None = None
        self._stopped = False
        self._lock = threading.Lock()  # _stopped against the child's start
        self._thread: threading.Thread | None = None

    @classmethod
    def start(cls, state_dict: dict, *, source_dir: str | Path, out_dir: str | Path,
              threads: int = 1, nice: int = 10) -> RefreshJob:
        """Start re-embedding `source_dir`'s corpus with `state_dict` (the weights of a
        transformers model of the source encoder's architecture, already copied off the
        training tensors) into `out_dir` (must not exist)."""
        source_dir = Path(source_dir).resolve()
        out_dir = Path(out_dir).resolve()
        if out_dir.exists():
            raise FileExistsError(f"refresh output {out_dir} already exists")
        job = cls(out_dir, out_dir.with_name(out_dir.name + ".log"))
        job._thread = threading.Thread(
            target=job._run, args=(state_dict, source_dir, threads, nice), daemon=True,
            name=f"index-refresh-{out_dir.name}")
        job._thread.start()
        return job

    def child_command(self, source_dir: Path, encoder: Path, threads: int,
                      nice: int) -> list[str]:
        """The child process that builds the refreshed index."""
        return [sys.executable, "-m", "retrieval_index.refresh", "--source", str(source_dir),
                "--encoder", str(encoder), "--out", str(self.out_dir),
                "--threads", str(threads), "--nice", str(nice), "--parent", str(os.getpid())]

    def _run(self, state_dict: dict, source_dir: Path, threads: int, nice: int) -> None:
        try:
            encoder = write_snapshot(state_dict, source_dir, encoder_dir(self.out_dir))
            del state_dict
            command = self.child_command(source_dir, encoder, threads, nice)
            with self.log_path.open("w") as log:
                env = {**os.environ, "OMP_NUM_THREADS": str(threads),
                       "MKL_NUM_THREADS": str(threads)}
                with self._lock:  # stop() either sees the child or the child is never started
                    if self._stopped:
                        raise _Stopped("before the build started")
                    self._process = subprocess.Popen(
                        command, stdout=log, stderr=subprocess.STDOUT, env=env)
                code = self._process.wait()
            if self._stopped:
                raise _Stopped(f"the build was ended (exit code {code})")
            if code != 0:
                raise RuntimeError(f"the build exited with code {code}: {self._log_tail()}")
            from retrieval_index.index import load

            index = load(self.out_dir, check_encoder=False)  # the encoder is the snapshot
            if self._stopped:
                raise _Stopped("after the build, while its index was loaded")
            self._finish(RefreshResult(True, self.out_dir, self._since(), index=index))
        except _Stopped as stop:
            self.remove_files()
            self._finish(RefreshResult(False, self.out_dir, self._since(), f"stopped {stop}"))
        except Exception as err:  # noqa: BLE001 - reported to the trainer, which keeps its index
            if self._stopped:  # e.g. the snapshot folder removed under it by stop()
                self.remove_files()
            self._finish(RefreshResult(False, self.out_dir, self._since(), f"{err}"))

    def _finish(self, result: RefreshResult) -> None:
        self._result = result

    def _since(self) -> float:
        return round(time.perf_counter() - self.started, 3)

    def _log_tail(self, lines: int = 3) -> str:
        if not self.log_path.is_file():
            return "(no log)"
        tail = [line for line in self.log_path.read_text().splitlines() if line.strip()]
        return " | ".join(tail[-lines:]) or "(empty log)"

    @property
    def running(self) -> bool:
        return self._result is None

    def poll(self) -> RefreshResult | None:
        return self._result

    def wait(self, timeout: float | None = None) -> RefreshResult | None:
        if self._thread is not None:
            self._thread.join(timeout)
        return self._result

    def stop(self, timeout: float = 10.0) -> bool:
        """End the build without waiting for it: terminate the child (killed after
        `KILL_AFTER` s), join the thread for at most `timeout` s in all, remove the job's files.
        True when the thread has ended (files removed here); False when it is still in a step
        it cannot leave early (writing the snapshot, loading the finished index): it removes
        the files itself when that step returns."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._stopped = True
            process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(max(0.0, min(KILL_AFTER, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                process.kill()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        ended = self._thread is None or not self._thread.is_alive()
        if ended:
            self.remove_files()
        return ended

    def remove_files(self) -> None:
        """The job's index folder, snapshot folder and log."""
        shutil.rmtree(self.out_dir, ignore_errors=True)
        shutil.rmtree(encoder_dir(self.out_dir), ignore_errors=True)
        self.log_path.unlink(missing_ok=True)


class _Stopped(Exception):
    """The job was stopped (`RefreshJob.stop`); its files are removed."""


def encoder_dir(out_dir: Path) -> Path:
    """The snapshot's encoder folder beside the refreshed index `out_dir`."""
    return out_dir.with_name(out_dir.name + ENCODER_SUFFIX)


def write_snapshot(state_dict: dict, source_dir: Path, folder: Path) -> Path:
    """An encoder folder: `state_dict` as model.safetensors plus the source encoder folder's
    config, tokenizer and pooling files (the folder the source index's manifest names)."""
    from safetensors.torch import save_file

    from rag_mm.text_encoder import default_encoder_path

    manifest = read_manifest(source_dir)
    encoder = manifest["encoder"]
    if encoder.get("kind") != "text":
        raise ValueError(f"index refresh re-embeds text corpora only; the index at {source_dir} "
                         f"has {encoder.get('kind')!r} document vectors")
    original = Path(encoder.get("path") or default_encoder_path())
    if not (original / "config.json").is_file():
        raise FileNotFoundError(f"the encoder folder {original} that built {source_dir} is gone; "
                                f"its config and tokenizer are needed for a refresh")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    tmp = folder / "model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp))
    tmp.rename(folder / "model.safetensors")
    for name in COPIED_FILES:
        if (original / name).is_file():
            shutil.copy2(original / name, folder / name)
    if (original / "1_Pooling").is_dir():
        shutil.copytree(original / "1_Pooling", folder / "1_Pooling")
    return folder


def index_record(index_dir: str | Path) -> dict:
    """Which index a run uses: its resolved path and the sha256 of its manifest.json."""
    import hashlib

    path = Path(index_dir).resolve()
    digest = hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
    return {"path": str(path), "manifest_sha256": f"sha256:{digest}"}


def check_record(record: dict) -> Path:
    """The directory `record` (`index_record`) names, refused if it is gone or changed."""
    path = Path(record["path"])
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"the checkpoint was trained against the index {path}, which no "
                                f"longer exists (manifest {record['manifest_sha256']}); restore it "
                                f"to resume")
    found = index_record(path)["manifest_sha256"]
    if found != record["manifest_sha256"]:
        raise ValueError(f"the index {path} has changed since the checkpoint was saved (manifest "
                         f"{found}, the checkpoint's {record['manifest_sha256']}); restore the "
                         f"index the run used to resume it")
    return path


def stale_recall(stale, fresh, queries: np.ndarray, k: int) -> float:
    """Mean |top-k(stale) & top-k(fresh)| / k over `queries`: how much of what the fresh index
    returns the stale one still finds."""
    _, old = stale.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    _, new = fresh.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    hits = [len(set(a[a >= 0]) & set(b[b >= 0])) / k for a, b in zip(old, new)]
    return float(np.mean(hits)) if hits else float("nan")


# -- the child process ---------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this process when the training process dies (no orphaned builds)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != parent:
        sys.exit("the training process ended before the refresh started")


def build_refreshed(source: Path, encoder: Path, out: Path) -> None:
    """The child's work: the source's corpus, re-embedded with `encoder`, built like the source."""
    from retrieval_index.embed import TextDocumentEmbedder
    from retrieval_index.job import build_index
    from retrieval_index.store import DocumentStore

    manifest = read_manifest(source)
    build = manifest["build"]
    store = DocumentStore(source)
    # The source's vectors embed texts (a trainable tower refuses image vectors at attach);
    # a store that keeps images beside them (`build_index.py --drop-images`) keeps them here
    # too, so the generator still reads them (use_doc_images).
    images = store.first_image_row() is not None
    ids, texts = store.table.column("id").to_pylist(), store.table.column("text").to_pylist()
    corpus = [{"id": i, "text": t} for i, t in zip(ids, texts)]
    if images:
        for row, png in zip(corpus, store.table.column("image").to_pylist()):
            row["image"] = png
    embedder = TextDocumentEmbedder.from_folder(
        encoder, max_length=manifest["encoder"].get("max_length") or 256,
        batch_size=build.get("batch_size") or 64, ignore_images=images)
    started = time.perf_counter()
    build_index(corpus, out, embedder=embedder, index_factory=manifest["index_factory"],
                shard_size=build["shard_size"], seed=build["seed"],
                nprobe=build.get("nprobe"), ef_search=build.get("ef_search"),
                num_recall_queries=min(build.get("num_recall_queries") or 1000, len(corpus)),
                progress=False)
    built = read_manifest(out)
    if built["corpus"]["fingerprint"] != manifest["corpus"]["fingerprint"]:
        raise ValueError(f"the refreshed index at {out} holds another corpus than {source}")
    print(json.dumps({"refreshed": str(out), "documents": len(corpus),
                      "seconds": round(time.perf_counter() - started, 3)}), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="re-embed an index's corpus (run by RefreshJob)")
    p.add_argument("--source", type=Path, required=True)
    p.add_argument("--encoder", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--nice", type=int, default=0)
    p.add_argument("--parent", type=int, default=None)
    args = p.parse_args(argv)
    if args.parent is not None:
        _die_with_parent(args.parent)
    if args.nice:
        os.nice(args.nice)
    import torch

    torch.set_num_threads(args.threads)
    build_refreshed(args.source, args.encoder, args.out)
    # The encoder folder is the job's snapshot (written for this child alone): its weights go
    # as soon as they are embedded. Only here: build_refreshed never deletes what it is given.
    (args.encoder / "model.safetensors").unlink()


if __name__ == "__main__":
    main()
