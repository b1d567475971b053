"""Index refresh during training: when to refresh, the swap at a step boundary, staleness.

`RAGModule(train_doc_encoder=True, refresh_every=N)` owns an `IndexRefresh`:

- after optimizer step s with s % N == 0 and no refresh running, the document tower's weights
  are copied (the only work on the training thread: a tensor copy) and
  `retrieval_index.refresh.RefreshJob` re-embeds the corpus of the index in use with them, in
  a child process, into `root/index-step{s:07d}`;
- before each training step the job is polled (never waited for); a finished one is swapped
  in there, between two steps: the model searches the new index from that step on;
- under several processes (torchrun, Lightning DDP, `PipelineStrategy` with dp/pp/tp) global
  rank 0 (which holds the retrieval unit: pipeline stage 0) snapshots the tower and runs the
  job; the ranks holding the tower gather FSDP2 / tensor-parallel shards with `full_tensor()`
  at the same step (whether a refresh starts depends on agreed state only). At every step
  boundary every rank joins one all-reduce of 6 integers (`TorchSync`): rank 0's "index of
  step s built" (or "failed"), each searching rank's "loaded", and any rank's "my refresh hook
  raised" (see the last point). When rank 0 announces, the
  other searching ranks load `root/index-step{s}` in a thread; once every one has it, all swap
  before the same step, so every replica searches the same index at every step. This needs
  `root` to be the same folder on every rank: one node, any local disk; several nodes, a
  shared filesystem (a rank that cannot load the announced index fails that refresh on every
  rank: all keep the index in use, and the log says why);
- logged every step: `refresh/steps_since` (optimizer steps since the weights that embedded
  the index in use; 0..N-1 plus the build time), `refresh/count`, `refresh/failures` (the same
  on every rank); at a swap: `refresh/stale_recall@C` (the replaced index's top-C against the
  new one's, on this rank's last `sample` training queries; C = the retriever's
  num_candidates), `refresh/seconds` (rank 0's build time);
- a failed refresh leaves the index in use on every rank and says so (a warning line naming
  the error and the job's log); the next one starts N steps later;
- when training ends (`stop`, from `on_train_end`) a refresh still running is ended, not
  waited for: rank 0 terminates its child, joins its thread for at most 10 s and removes its
  folders and log, and the log says so; the other ranks drop what they were loading; the index
  in use stays the run's index;
- the checkpoint records the index in use (`retrieval_index.refresh.index_record`: path and
  manifest sha256) and the refresh counters; a resumed fit searches that index again, on
  every rank (each reads the record); a refresh in flight at the save is not resumed. The
  folders a killed run left unfinished (an `index-step*` folder whose manifest does not say
  "complete", with its snapshot and log) are removed when the leader's `IndexRefresh` is made;
- an exception in a hook on one rank (starting a build, copying the tower, swapping, writing
  the refresh folder) is held until the next step boundary's all-reduce, which every rank
  joins as always: there every rank raises (the failing one its own exception, with a note
  naming the rank and step; the others a `RuntimeError` naming the failing rank and step)
  instead of waiting in the all-reduce for a rank that left. The failing rank finishes the
  step it is in first (its peers wait for it in that step's collectives). One held after the
  last boundary is raised by `stop`, on that rank (no peer waits for it).

Not built: a refresh of a sharded index (`shard_index=True`, refused by name).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import threading
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


class LocalSync:
    """One process: it runs the refreshes and searches; the agreement is its own values."""

    leader = True
    rank = 0

    def agree(self, values: list[int]) -> list[int]:
        return list(values)


class TorchSync:
    """Several processes: global rank `leader_rank` runs the refreshes; `agree` is one
    all-reduce (MAX) of a few int64s over `group` (default: every process), called by every
    rank at every step boundary, so every rank takes the same decision at the same step."""

    def __init__(self, device, group=None, leader_rank: int = 0) -> None:
        import torch.distributed as dist

        self.device = device
        self.group = group
        self.rank = dist.get_rank()
        self.leader = self.rank == leader_rank

    def agree(self, values: list[int]) -> list[int]:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return tensor.tolist()


NOT_SEARCHING = 1 << 62  # a rank without the retrieval unit never holds a swap back
RANK_SLOTS = 1 << 20  # a held failure is agreed as step * RANK_SLOTS + rank + 1 (0: none)


class _Load:
    """A searching rank other than the leader: the announced index, loaded in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.index = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"index-refresh-load-{path.name}")
        self._thread.start()

    def _run(self) -> None:
        from retrieval_index.index import load

        try:
            self.index = load(self.path, check_encoder=False)  # the encoder is the snapshot
        except Exception as err:  # noqa: BLE001 - reported to every rank, which keep their index
            self.error = f"{type(err).__name__}: {err}"

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return self.done


class IndexRefresh:
    """Start, poll and swap background index refreshes (see the module doc)."""

    def __init__(self, every: int, root: str | Path, *, sample: int = 256, keep: int = 2,
                 threads: int = 1, nice: int = 10, sync=None) -> None:
        self.every = every
        self.nice = nice
        self.root = Path(root)
        self.keep = keep
        self.threads = threads
        self.sync = sync or LocalSync()
        self.leader = self.sync.leader  # this rank starts the jobs (global rank 0)
        self.job: RefreshJob | None = None  # the leader's, until every rank has swapped
        self.job_step = 0
        self.in_flight = False  # agreed: the same on every rank at every step
        self.announced = 0  # agreed: the job step whose index every searching rank now loads
        self.loader: _Load | None = None  # a searching rank other than the leader
        self.snapshot_step = 0  # the step whose weights embedded the index in use
        self.refreshes = 0
        self.failures = 0
        self.events: list[dict] = []  # one per finished refresh (swapped or failed)
        self._queries: deque[np.ndarray] = deque(maxlen=sample)
        self._pending: dict = {}
        self._error: tuple[int, Exception] | None = None  # raised here, not yet agreed
        if self.leader:
            self.remove_unfinished()

    def out_dir(self, step: int) -> Path:
        return self.root / f"index-step{step:07d}"

    # -- the two step hooks ---------------------------------------------------------------------
    def after_step(self, step: int, model, stepped: bool = True) -> None:
        """After a training batch: remember its queries; if it ended optimizer step `step`
        (`stepped`: not a micro-batch inside gradient accumulation), maybe start a refresh.
        Every rank calls this after every batch; whether a refresh starts depends on agreed
        state only, so the ranks that hold the document tower gather it at the same step.
        An exception is held for the next step boundary (see the module doc)."""
        unit = model.retrieval
        try:
            queries = getattr(unit, "last_queries", None)
            if queries is not None:
                self._queries.extend(queries.float().cpu().numpy())
        except Exception as err:  # noqa: BLE001 - raised on every rank at the next boundary
            self._hold(step, f"after step {step}", err)
        if not stepped or step % self.every or self.in_flight:
            return
        self.in_flight = True
        self.job_step = step
        try:
            weights = self._snapshot(unit)
            if self.leader:
                self._start(step, unit, weights)
        except Exception as err:  # noqa: BLE001 - raised on every rank at the next boundary
            self._hold(step, f"after step {step}, starting the refresh", err)

    def _snapshot(self, unit) -> dict | None:
        """The leader's CPU copy of the document tower's weights (None where no tower is held).
        A DTensor's `full_tensor()` is a collective of every holder, in the same order: a
        holder whose copy failed still joins the others' (its error is raised after them)."""
        tower = getattr(unit, "doc_encoder", None)
        if tower is None:
            return None
        weights, error = {}, None
        for name, value in tower.text.model.state_dict().items():
            if hasattr(value, "full_tensor"):  # an FSDP2 / tensor-parallel DTensor
                value = value.full_tensor()
            if self.leader and error is None:
                try:
                    weights[name] = value.detach().to("cpu", copy=True)
                except Exception as err:  # noqa: BLE001 - raised after the last gather
                    error = err
        if error is not None:
            raise error
        return weights

    def _start(self, step: int, unit, weights: dict | None) -> None:
        if weights is None:
            raise RuntimeError("index refresh: the leading rank (global rank 0) holds no document "
                               "tower; it must hold the retrieval unit (pipeline stage 0)")
        out = self.out_dir(step)
        if out.exists():  # a partial build left by an interrupted run at the same step
            shutil.rmtree(out)
        out.with_name(out.name + ".log").unlink(missing_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.job = RefreshJob.start(weights, source_dir=unit.backend.path, out_dir=out,
                                    threads=self.threads, nice=self.nice)

    def at_step_boundary(self, step: int, model) -> dict[str, float]:
        """Before step `step` runs: agree with the other ranks (one all-reduce of 6 integers;
        nothing in one process) on a finished refresh and swap it in on every searching rank
        once all have it loaded; the metrics to log. Raises, on every rank, when a rank held
        an exception from its hooks since the last boundary (see the module doc)."""
        backend = getattr(model.retrieval, "backend", None)
        result, values = None, [0, 0, 0, 0, 0]
        try:
            result, values = self._local_state(backend)
        except Exception as err:  # noqa: BLE001 - raised on every rank just below
            self._hold(step, f"at the boundary before step {step}", err)
        *agreed, failure = self.sync.agree([*values, self._failure_code()])
        if failure:
            self._raise_failure(step, failure)
        try:
            self._decide(step, model, backend, result, agreed)
        except Exception as err:  # noqa: BLE001 - raised on every rank at the next boundary
            self._hold(step, f"at the boundary before step {step}", err)
        metrics = {"refresh/steps_since": float(step - self.snapshot_step),
                   "refresh/count": float(self.refreshes),
                   "refresh/failures": float(self.failures), **self._pending}
        self._pending = {}
        return metrics

    def _local_state(self, backend) -> tuple:
        """This rank's poll of the build and (or) the load: the result, and the values to agree
        on ([built, failed, -ready, load_failed, millis]; MAX over ranks)."""
        result = self.job.poll() if self.job is not None else None
        built = failed = millis = 0
        if result is not None:
            millis = int(result.seconds * 1000)
            if result.ok:
                built = self.job_step
            else:
                failed = self.job_step
        if backend is None:
            ready, load_failed = NOT_SEARCHING, 0
        elif self.leader:
            ready, load_failed = built, 0
        else:
            loader = self.loader
            ready = self.announced if loader is not None and loader.done and loader.error is None \
                else 0
            load_failed = self.announced if loader is not None and loader.done and loader.error \
                else 0
        return result, [built, failed, -ready, load_failed, millis]

    def _decide(self, step: int, model, backend, result, agreed: list[int]) -> None:
        """What every rank does with the agreed values: fail, swap or announce a refresh."""
        built, failed, ready, load_failed, millis = agreed
        ready = -ready
        if failed:
            self._failed(step, backend, millis / 1000, result.error if result is not None else
                         f"on rank 0 (see its log and {self.out_dir(failed)}.log)")
        elif built and load_failed == built:
            error = (f"here ({self.loader.error})" if self.loader is not None and
                     self.loader.error else "on another rank")
            self._failed(step, backend, millis / 1000,
                         f"the refreshed index {self.out_dir(built)} could not be loaded {error}; "
                         f"under several nodes the refresh folder must be on a filesystem every "
                         f"node sees")
        elif built and ready == built:
            self._swap(step, model, millis / 1000)
        elif built and built != self.announced:
            self.announced = built
            if backend is not None and not self.leader:
                self.loader = _Load(self.out_dir(built))

    # -- an exception in a hook ------------------------------------------------------------------
    def _hold(self, step: int, where: str, err: Exception) -> None:
        """Keep `err` for the next agreement: a rank raising now would leave the others
        waiting for it in that all-reduce. The first one held counts."""
        if self._error is None:
            if hasattr(err, "add_note"):  # Python 3.11+; the log line names it anyway
                err.add_note(f"index refresh: raised on rank {self.sync.rank} {where}")
            self._error = (step, err)

    def _failure_code(self) -> int:
        return 0 if self._error is None else self._error[0] * RANK_SLOTS + self.sync.rank + 1

    def _raise_failure(self, step: int, code: int) -> None:
        """Every rank, at the boundary before step `step`: a rank's hook raised (`code`, the
        agreed MAX of the held failures: the latest step's highest rank)."""
        if self._error is not None:
            self._raise_held(f"every rank stops at the boundary before step {step}")
        failed_step, rank = divmod(code - 1, RANK_SLOTS)
        raise RuntimeError(f"index refresh: rank {rank} raised in its refresh hook at step "
                           f"{failed_step} (its log has the error); every rank stops at the "
                           f"boundary before step {step}")

    def _raise_held(self, what: str) -> None:
        failed_step, err = self._error
        self._error = None
        log.error(f"index refresh: rank {self.sync.rank} raised at step {failed_step}: "
                  f"{type(err).__name__}: {err}; {what}")
        raise err

    def _resolved(self) -> None:
        """The refresh in flight is over on every rank (swapped or failed)."""
        self.job = None
        self.loader = None
        self.announced = 0
        self.in_flight = False

    def _failed(self, step: int, backend, seconds: float, error: str) -> None:
        self.failures += 1
        self.events.append({"step": step, "ok": False, "weights_step": self.job_step,
                            "seconds": seconds, "error": error})
        using = getattr(backend, "path", None)
        log.warning(f"index refresh from step {self.job_step} failed after {seconds:.1f} s; "
                    f"still using {using} ({error}; log: {self.out_dir(self.job_step)}.log)")
        self._resolved()

    def _swap(self, step: int, model, seconds: float) -> None:
        """Every searching rank attaches the new index before step `step`; the others count."""
        old = getattr(model.retrieval, "backend", None)
        path = self.out_dir(self.job_step)
        event = {"step": step, "ok": True, "weights_step": self.job_step, "path": str(path),
                 "seconds": seconds}
        if old is not None:
            new = self.job.poll().index if self.leader else self.loader.index
            k = model.config.retriever.num_candidates
            recall = (stale_recall(old, new, np.stack(self._queries), k)
                      if self._queries else float("nan"))  # this rank's recent queries
            model.attach(new, check_encoder=False)  # its encoder is the snapshot
            event.update({f"stale_recall@{k}": recall, "queries": len(self._queries)})
            self._pending = {f"refresh/stale_recall@{k}": recall, "refresh/seconds": seconds}
        self.snapshot_step = self.job_step
        self.refreshes += 1
        self.events.append(event)
        if old is not None:
            log.info(f"index refresh {self.refreshes} (weights of step {self.job_step}, "
                     f"{seconds:.1f} s) swapped in before step {step}: now searching {path}; the "
                     f"replaced index's recall@{k} against it: {recall:.3f} on "
                     f"{len(self._queries)} recent queries")
        if self.leader:
            self._remove_old(keep_path=Path(old.path))
        self._resolved()

    def _remove_old(self, keep_path: Path) -> None:
        """Keep the `keep` newest refreshed indexes (and the one just replaced)."""
        built = sorted(p for p in self.root.glob("index-step*") if p.suffix == "")
        for path in built[: -self.keep]:
            if path != keep_path:
                _remove_refresh(path)

    def remove_unfinished(self) -> list[Path]:
        """Remove what an interrupted run left unfinished under `root`: each `index-step*`
        folder whose manifest does not say "complete" (the build's own completion marker),
        with its snapshot folder and log, and a snapshot or log whose index folder is missing.
        Never searched (a resumed run searches the complete index its checkpoint records; a
        refresh at the same step rebuilds), they would count among the `keep` newest and hold
        a snapshot's weights. The index folders removed."""
        names = {p.name.split(".")[0] for p in self.root.glob("index-step*")}
        unfinished = [self.root / name for name in sorted(names)
                      if not _complete(self.root / name)]
        for path in unfinished:
            _remove_refresh(path)
        if unfinished:
            names = ", ".join(p.name for p in unfinished)
            log.info(f"index refresh: removed {len(unfinished)} unfinished refresh folder(s) an "
                     f"interrupted run left in {self.root}: {names}")
        return unfinished

    def stop(self, in_use=None, timeout: float = 10.0) -> None:
        """Training is over: end a refresh still running without waiting for it (its child is
        terminated, its thread joined for at most `timeout` s, its folders and log removed; see
        `RefreshJob.stop`). One that finished after the last step boundary was never searched:
        its index is removed too. `in_use`: the index the run ends with (for the log line).
        Only the leader has a job; the other ranks drop what they were loading. Then an
        exception a hook held after the last step boundary is raised, on its rank alone (no
        peer waits for it in an agreement any more)."""
        self._end_job(in_use, timeout)
        if self._error is not None:
            self._raise_held("raised when training ended (after the last step boundary)")

    def _end_job(self, in_use, timeout: float) -> None:
        job, self.job = self.job, None
        self.loader = None
        self.in_flight = False
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


def _complete(index_dir: Path) -> bool:
    """Whether `index_dir`'s manifest says its build finished (`retrieval_index.job`)."""
    try:
        return json.loads((index_dir / "manifest.json").read_text()).get("status") == "complete"
    except (OSError, ValueError):  # no manifest yet, or one cut short
        return False


def _remove_refresh(index_dir: Path) -> None:
    """A refreshed index folder, its snapshot folder and its log."""
    shutil.rmtree(index_dir, ignore_errors=True)
    shutil.rmtree(encoder_dir(index_dir), ignore_errors=True)
    index_dir.with_name(index_dir.name + ".log").unlink(missing_ok=True)


def checkpoint_record(backend, refresh: IndexRefresh | None) -> dict | None:
    """What a checkpoint stores about the index: path, manifest sha256, refresh counters."""
    path = getattr(backend, "path", None)
    if path is None:
        return None
    record = index_record(path)
    if refresh is not None:
        record["refresh"] = refresh.state_dict()
    return record
