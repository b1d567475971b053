"""Distributed index builds (issue 11, item 4) on 2 gloo processes: each rank embeds its share
of the shards and resumes its own, rank 0 builds FAISS; the files equal a one-process build
byte for byte; an error on one rank stops both, naming it; a world size with fewer shards than
ranks is refused by name. Multi-node, simulated on this machine: two torchrun launchers
(`--nnodes=2 --nproc_per_node=1 --node_rank=0|1`, static rendezvous at 127.0.0.1) of
`scripts/build_index.py` give the same bytes with one progress bar, and resume per rank.

Run: .venv/bin/pytest tests/test_distributed_build.py -q        (55 s at load 4, 100 s at load 7 on 2 cores)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import retrieval_index as ri
from retrieval_index.job import check_world_size
from tests.helpers.index import make_rows
from trainers.parallel.local import run_local

ROOT = Path(__file__).resolve().parents[1]
NUM_DOCS, SHARD_SIZE = 70, 10  # 7 shards: rank 0 embeds 4, rank 1 embeds 3
FILES = ("embeddings.npy", "index.faiss", "docs.arrow")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dirs):
    """The one-process build, with one intra-op thread like each rank."""
    out = tmp_path_factory.mktemp("one_process") / "index"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ri.build_index(make_rows(NUM_DOCS), out, shard_size=SHARD_SIZE, progress=False,
                       embedder=ri.TextDocumentEmbedder.from_folder(tiny_dirs[0]),
                       index_factory="IVF4,Flat", num_recall_queries=20)
    finally:
        torch.set_num_threads(threads)
    return out


def _build(out: Path, encoder: str, stop_on_rank1: bool):
    def stop(shard, num_shards):
        if stop_on_rank1 and shard == 1:
            raise ValueError("stopped after shard 1")

    return ri.build_index(make_rows(NUM_DOCS), out, shard_size=SHARD_SIZE, progress=False,
                          embedder=ri.TextDocumentEmbedder.from_folder(encoder),
                          index_factory="IVF4,Flat", num_recall_queries=20,
                          collective=ri.TorchCollective(), on_shard=stop)


def _interrupted_then_resumed(rank: int, world_size: int, out: str, encoder: str) -> None:
    out = Path(out)
    failure = ValueError  # rank 1's own error; rank 0: RemoteBuildError (a ValueError) naming it
    with pytest.raises(failure, match="stopped after shard 1") as info:
        _build(out, encoder, stop_on_rank1=True)
    assert (rank == 0) == (type(info.value) is ri.embed.RemoteBuildError)
    if rank == 0:
        assert str(info.value).startswith("rank 1 of the build stopped: ValueError")
    index = _build(out, encoder, stop_on_rank1=False)
    assert (index is None) == (rank == 1)
    if rank == 0:
        (out.parent / "report.json").write_text(json.dumps(index.manifest["report"]))


def test_two_ranks_build_the_one_process_index_and_resume_per_rank(reference, tiny_dirs,
                                                                   tmp_path):
    out = tmp_path / "index"
    run_local(_interrupted_then_resumed, 2, str(out), str(tiny_dirs[0]))
    for name in FILES:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    report = json.loads((tmp_path / "report.json").read_text())
    # the first run stopped both ranks at the exchange after round 0 (shards 0 and 1 written,
    # rank 1's error raised after its shard 1): the resumed run reuses those two
    assert report["embedding"] == {"shards": 7, "reused": 2, "embedded": 5}


def test_torchrun_build_index_py_equals_one_process(reference, tiny_dirs, tmp_path):
    frame = pd.DataFrame(make_rows(NUM_DOCS))
    frame.to_parquet(tmp_path / "corpus.parquet")
    out = tmp_path / "index"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         str(ROOT / "scripts" / "build_index.py"), "--corpus", str(tmp_path / "corpus.parquet"),
         "--out", str(out), "--encoder", str(tiny_dirs[0]), "--shard-size", str(SHARD_SIZE),
         "--index-factory", "IVF4,Flat"],
        check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "embeddings.npy").read_bytes() == (reference / "embeddings.npy").read_bytes()
    assert (out / "docs.arrow").read_bytes() == (reference / "docs.arrow").read_bytes()
    bars = [line for line in done.stderr.replace("\r", "\n").splitlines() if "embed:" in line]
    assert bars and all(f"/{NUM_DOCS} " in line for line in bars)  # one bar, over all ranks
    assert done.stdout.count("building 'IVF4,Flat' index of 70 documents") == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_nodes(script_args: list[str], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Two torchrun launchers on this machine, one per simulated node (--nnodes=2, one
    process each, static rendezvous at 127.0.0.1), run together; node 0's, node 1's result."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    port = _free_port()
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
         f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}",
         *script_args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for node in (0, 1)]
    done = []
    for launcher in launchers:
        try:
            stdout, stderr = launcher.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for other in launchers:
                other.kill()
            raise
        done.append(subprocess.CompletedProcess(launcher.args, launcher.returncode, stdout,
                                                stderr))
    return done


@pytest.mark.distributed
def test_two_nodes_build_index_py_equals_one_process(reference, tiny_dirs, tmp_path):
    """Multi-node: two launchers (--nnodes=2 --node_rank=0/1) on a file system both see."""
    frame = pd.DataFrame(make_rows(NUM_DOCS))
    frame.to_parquet(tmp_path / "corpus.parquet")
    out = tmp_path / "index"
    nodes = _two_nodes([str(ROOT / "scripts" / "build_index.py"),
                        "--corpus", str(tmp_path / "corpus.parquet"), "--out", str(out),
                        "--encoder", str(tiny_dirs[0]), "--shard-size", str(SHARD_SIZE),
                        "--index-factory", "IVF4,Flat"], cwd=tmp_path)
    for node, done in enumerate(nodes):
        assert done.returncode == 0, f"node {node}: {done.stderr[-3000:]}"
    for name in FILES:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    report = json.loads((out / "manifest.json").read_text())["report"]
    assert report["embedding"] == {"shards": 7, "reused": 0, "embedded": 7}
    bars = [[line for line in done.stderr.replace("\r", "\n").splitlines() if "embed:" in line]
            for done in nodes]
    assert bars[0] and all(f"/{NUM_DOCS} " in line for line in bars[0])  # over both nodes
    assert bars[1] == []  # one bar: node 1's rank prints none
    built = "building 'IVF4,Flat' index of 70 documents"
    assert [done.stdout.count(built) for done in nodes] == [1, 0]


@pytest.mark.distributed
@pytest.mark.slow  # a second two-node launch: 11 s at load 4, 22 s at load 7 on the 2 cores
def test_two_nodes_resume_per_rank(reference, tiny_dirs, tmp_path):
    """The same two-node launch of the interrupted-then-resumed build as above (rank 1 stops
    after its shard 1, both ranks stop, a rerun reuses the finished shards)."""
    out = tmp_path / "index"
    script = tmp_path / "resume.py"
    script.write_text(
        "import sys\n"
        "import torch.distributed as dist\n"
        "from tests.test_distributed_build import _interrupted_then_resumed\n"
        "dist.init_process_group('gloo')\n"
        "_interrupted_then_resumed(dist.get_rank(), dist.get_world_size(), sys.argv[1], "
        "sys.argv[2])\n"
        "dist.barrier()\n"  # both ranks leave together, as scripts/build_index.py does
        "dist.destroy_process_group()\n")
    nodes = _two_nodes([str(script), str(out), str(tiny_dirs[0])], cwd=ROOT)
    for node, done in enumerate(nodes):
        assert done.returncode == 0, f"node {node}: {done.stderr[-3000:]}"
    for name in FILES:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["embedding"] == {"shards": 7, "reused": 2, "embedded": 5}


def test_more_ranks_than_shards_are_refused_by_name():
    check_world_size(70, 10, 7)
    with pytest.raises(ValueError, match=r"--shard-size \(shard_size=\) 10 splits the 70 "
                                         r"documents into 7 shard\(s\), fewer than the world "
                                         r"size 8 .* use --shard-size <= 8"):
        check_world_size(70, 10, 8)
