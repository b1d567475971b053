"""Preemption: SIGTERM (spot reclaim, SLURM at the time limit) or SIGUSR1 (SLURM's warning
signal, `sbatch --signal=USR1@120`) finishes the current step, saves a checkpoint and exits
with `EXIT_PREEMPTED` (75, EX_TEMPFAIL: "try again"), so a scheduler requeues the job and
`--resume` (or `ckpt_path="last"`) continues from that step.

The signal handler only notes the signal. After every optimizer step the ranks agree
(one all-reduce of a flag) whether any of them got one, so all of them save the same step
and stop together. This replaces Lightning's own SIGTERM handling during training, which
exits with code 0 without saving.
"""

from __future__ import annotations

import signal
import time

from lightning.pytorch.callbacks import Callback

from trainers.run.checkpoints import RunCheckpoints

EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Training stopped on a signal after saving `checkpoint` at `step` (exit code 75)."""

    def __init__(self, step: int, checkpoint, signum: int) -> None:
        super().__init__(EXIT_PREEMPTED)
        self.step, self.checkpoint, self.signum = step, checkpoint, signum

    def __str__(self) -> str:
        return (f"preempted by {signal.Signals(self.signum).name} at step {self.step}: "
                f"saved {self.checkpoint}")


class Preemption(Callback):
    """Save and stop on `signals` (see the module doc); `checkpoints` does the saving."""

    def __init__(self, checkpoints: RunCheckpoints, signals=SIGNALS) -> None:
        self.checkpoints = checkpoints
        self.signals = tuple(signals)
        self.received: int | None = None
        self.received_at: float | None = None
        self._previous: dict = {}

    def _note(self, signum, frame) -> None:
        if self.received is None:
            self.received, self.received_at = signum, time.monotonic()

    def on_train_start(self, trainer, pl_module) -> None:
        # after Lightning registered its handlers (they would exit 0 without saving)
        self._previous = {s: signal.signal(s, self._note) for s in self.signals}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        path = self.checkpoints.save(trainer)
        raise Preempted(trainer.global_step, path, self.received or signal.SIGTERM)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
