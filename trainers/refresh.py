"""Index refresh during training: when to refresh, the swap at a step boundary, staleness.

`RAGModule(train_doc_encoder=True, refresh_every=N)` owns an `IndexRefresh`:

- after optimizer step s with s % N == 0 and no refresh running, the document tower's weights
  are copied (the only work on the training thread: a tensor copy) and
  `retrieval_index.refresh.RefreshJob` re-embeds the corpus of the index in use with them, in
  a child process, into `root/index-step{s:07d}`;
- before each training step the job is polled (never waited for); a finished one is swapped
  in there, between two steps: the model searches the new index from that step on;
- logged every step: `refresh/steps_since` (optimizer steps since the weights that embedded
  the index in use; 0..N-1 plus the build time), `refresh/count`, `refresh/failures`; at a
  swap: `refresh/stale_recall@C` (the replaced index's top-C against the new one's, on the
  last `sample` training queries; C = the retriever's num_candidates), `refresh/seconds`;
- a failed refresh leaves the index in use and says so (a warning line naming the error and
  the job's log); the next one starts N steps later;
- when training ends (`stop`, from `on_train_end`) a refresh still running is ended, not
  waited for: its child is terminated, its thread joined for at most 10 s, its folders and
  log removed, and the log says so; the index in use stays the run's index;
- the checkpoint records the index in use (`retrieval_index.refresh.index_record`: path and
  manifest sha256) and the refresh counters; a resumed fit searches that index again.

One process only (refused under several: every rank would have to swap at the same step).
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

from retrieval_index.refresh import RefreshJob, encoder_dir, index_record, stale_recall

log = logging.getLogger("trainers.refresh")
if not log.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)

INDEX_RECORD = "retrieval_index"  # the checkpoint key


class IndexRefresh:
    """Start, poll and swap background index refreshes (see the module doc)."""

    def __init__(self, every: int, root: str | Path, *, sample: int = 256, keep: int = 2,
                 threads: int = 1, nice: int = 10) -> None:
        self.every = every
        self.nice = nice
        self.root = Path(root)
        self.keep = keep
        self.threads = threads
        self.job: RefreshJob | None = None
        self.job_step = 0
        self.snapshot_step = 0  # the step whose weights embedded the index in use
        self.refreshes = 0
        self.failures = 0
        self.events: list[dict] = []  # one per finished refresh (swapped or failed)
        self._queries: deque[np.ndarray] = deque(maxlen=sample)
        self._pending: dict = {}

    # -- the two step hooks ---------------------------------------------------------------------
    def after_step(self, step: int, model) -> None:
        """After optimizer step `step`: remember the batch's queries; maybe start a refresh."""
        queries = model.retrieval.last_queries
        if queries is not None:
            self._queries.extend(queries.float().cpu().numpy())
        if step % self.every or (self.job is not None and self.job.running):
            return
        backend = model.retrieval.backend
        weights = {k: v.detach().to("cpu", copy=True)
                   for k, v in model.retrieval.doc_encoder.text.model.state_dict().items()}
        out = self.root / f"index-step{step:07d}"
        if out.exists():  # a partial build left by an interrupted run at the same step
            shutil.rmtree(out)
        out.with_name(out.name + ".log").unlink(missing_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.job = RefreshJob.start(weights, source_dir=backend.path, out_dir=out,
                                    threads=self.threads, nice=self.nice)
        self.job_step = step

    def at_step_boundary(self, step: int, model) -> dict[str, float]:
        """Before step `step` runs: swap in a finished refresh; the metrics to log."""
        result = self.job.poll() if self.job is not None else None
        if result is not None:
            self.job = None
            if result.ok:
                self._swap(step, model, result)
            else:
                self.failures += 1
                self.events.append({"step": step, "ok": False, "weights_step": self.job_step,
                                    "seconds": result.seconds, "error": result.error})
                log.warning(f"index refresh from step {self.job_step} failed after "
                            f"{result.seconds:.1f} s; still using {model.retrieval.backend.path} "
                            f"({result.error}; log: {result.path}.log)")
        metrics = {"refresh/steps_since": float(step - self.snapshot_step),
                   "refresh/count": float(self.refreshes),
                   "refresh/failures": float(self.failures), **self._pending}
        self._pending = {}
        return metrics

    def _swap(self, step: int, model, result) -> None:
        old = model.retrieval.backend
        k = model.config.retriever.num_candidates
        recall = (stale_recall(old, result.index, np.stack(self._queries), k)
                  if self._queries else float("nan"))
        model.attach(result.index, check_encoder=False)  # its encoder is the snapshot
        self.snapshot_step = self.job_step
        self.refreshes += 1
        event = {"step": step, "ok": True, "weights_step": self.job_step, "path": str(result.path),
                 "seconds": result.seconds, f"stale_recall@{k}": recall,
                 "queries": len(self._queries)}
        self.events.append(event)
        self._pending = {f"refresh/stale_recall@{k}": recall, "refresh/seconds": result.seconds}
        log.info(f"index refresh {self.refreshes} (weights of step {self.job_step}, "
                 f"{result.seconds:.1f} s) swapped in before step {step}: now searching "
                 f"{result.path}; the replaced index's recall@{k} against it: {recall:.3f} on "
                 f"{len(self._queries)} recent queries")
        self._remove_old(keep_path=Path(old.path))

    def _remove_old(self, keep_path: Path) -> None:
        """Keep the `keep` newest refreshed indexes (and the one just replaced)."""
        built = sorted(p for p in self.root.glob("index-step*") if p.suffix == "")
        for path in built[: -self.keep]:
            if path != keep_path:
                shutil.rmtree(path, ignore_errors=True)
                shutil.rmtree(encoder_dir(path), ignore_errors=True)
                path.with_name(path.name + ".log").unlink(missing_ok=True)

    def stop(self, in_use=None, timeout: float = 10.0) -> None:
        """Training is over: end a refresh still running without waiting for it (its child is
        terminated, its thread joined for at most `timeout` s, its folders and log removed; see
        `RefreshJob.stop`). One that finished after the last step boundary was never searched:
        its index is removed too. `in_use`: the index the run ends with (for the log line)."""
        job, self.job = self.job, None
        if job is None:
            return
        using = f"; still using {in_use}" if in_use is not None else ""
        result = job.poll()
        if result is not None and not result.ok:  # failed after the last boundary: as there
            self.failures += 1
            self.events.append({"step": None, "ok": False, "weights_step": self.job_step,
                                "seconds": result.seconds, "error": result.error})
            log.warning(f"index refresh from step {self.job_step} failed after "
                        f"{result.seconds:.1f} s{using} ({result.error}; log: {result.path}.log)")
            return
        started = time.perf_counter()
        ended = job.stop(timeout)
        seconds = time.perf_counter() - started
        if result is not None:
            what = "finished after the last step, never searched; its index was removed"
        elif ended:
            what = f"stopped in {seconds:.1f} s: training ended first; its files were removed"
        else:
            what = (f"not stopped after {seconds:.1f} s (its thread is still writing the "
                    f"snapshot or loading the index): training ended first; the thread removes "
                    f"its files when that step returns")
        log.info(f"index refresh from step {self.job_step} {what}{using}")

    def summary(self) -> dict:
        """What the run's refreshes did (for `train_summary.json`): counts and one event per
        finished refresh (the step it was swapped in before, or failed at; the step whose
        weights it embedded; seconds; stale recall)."""
        return {"every": self.every, "refreshes": self.refreshes, "failures": self.failures,
                "snapshot_step": self.snapshot_step, "events": self.events}

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"snapshot_step": self.snapshot_step, "refreshes": self.refreshes,
                "failures": self.failures}

    def load_state_dict(self, state: dict) -> None:
        self.snapshot_step = state["snapshot_step"]
        self.refreshes = state["refreshes"]
        self.failures = state["failures"]


def checkpoint_record(backend, refresh: IndexRefresh | None) -> dict | None:
    """What a checkpoint stores about the index: path, manifest sha256, refresh counters."""
    path = getattr(backend, "path", None)
    if path is None:
        return None
    record = index_record(path)
    if refresh is not None:
        record["refresh"] = refresh.state_dict()
    return record
