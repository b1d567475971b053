"""An exception in rank 0's index-refresh hook does not leave rank 1 waiting in the agreement.

Two gloo processes run the refresh hooks as `RAGModule` does (`at_step_boundary`, then
`after_step` ending step 2, then the next boundary) with the real `TorchSync` over a group
whose collectives time out after 20 s. Rank 0 cannot write its refresh folder (a file), so
its `after_step` raises; both ranks raise at step 2's boundary: rank 0 its own error, rank 1
a RuntimeError naming rank 0 and the step. A regression (rank 0 raising at once) leaves
rank 1 in the all-reduce: it fails (gloo: "Connection closed by peer", or the 20 s timeout).

Run: .venv/bin/pytest tests/distributed/test_refresh_failure.py -q      (a few seconds)
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

GROUP_TIMEOUT_S = 20


def _worker(rank: int, world_size: int, out_dir: str) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    from trainers.refresh import IndexRefresh, TorchSync

    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    out = Path(out_dir)
    tower = SimpleNamespace(text=SimpleNamespace(model=torch.nn.Linear(2, 2)))
    model = SimpleNamespace(retrieval=SimpleNamespace(backend=SimpleNamespace(path=out / "index"),
                                                      doc_encoder=tower))
    refresh = IndexRefresh(2, out / "refresh", sync=TorchSync(torch.device("cpu"), group=group))
    outcome = "nothing raised"
    try:
        refresh.at_step_boundary(1, model)
        refresh.after_step(2, model)  # rank 0 starts the refresh: its folder cannot be written
        refresh.at_step_boundary(2, model)
    except Exception as err:  # noqa: BLE001 - what the test checks
        outcome = f"{type(err).__name__}: {err}"
    (out / f"rank{rank}.txt").write_text(outcome)


@pytest.mark.distributed
@pytest.mark.timeout(3 * GROUP_TIMEOUT_S)
def test_rank_one_raises_when_rank_zeros_refresh_hook_throws(tmp_path):
    from trainers.parallel.local import run_local

    (tmp_path / "refresh").write_text("a file where the refresh folder should be")
    run_local(_worker, 2, str(tmp_path))
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text() for r in range(2))
    assert rank1 == ("RuntimeError: index refresh: rank 0 raised in its refresh hook at step 2 "
                     "(its log has the error); every rank stops at the boundary before step 2")
    assert rank0.startswith("NotADirectoryError: ") and "index-step0000002.log" in rank0
