"""A tuner callback that checkpoints a run and records it in the store as it goes."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from ..tuner import Callback, SelfTuner
from ._store import RunStore


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` so that a reader sees the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class StoreRecorder(Callback):
    """Checkpoints every ``every`` steps and at each epoch end, and commits the rows logged since the
    previous checkpoint together with it; beats the heartbeat in between.

    Args:
        store: the run store.
        run_id: the run being recorded.
        checkpoint_dir: folder for this run's checkpoint files (created).
        every: steps between checkpoints.
        keep: checkpoint files kept on disk (older ones are deleted once a newer one is committed).
        heartbeat_s: seconds between heartbeats when no checkpoint happens.
        at_epoch_end: also checkpoint at every epoch end (benchmarks turn it off: only the final one).
    """

    def __init__(self, store: RunStore, run_id: int, checkpoint_dir: str | Path, *, every: int = 100,
                 keep: int = 2, heartbeat_s: float = 10.0, at_epoch_end: bool = True) -> None:
        self.store, self.run_id = store, run_id
        self.dir = Path(checkpoint_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.every, self.keep, self.heartbeat_s, self.at_epoch_end = every, keep, heartbeat_s, at_epoch_end
        self._trajectory: list[dict[str, float]] = []
        self._epochs: list[dict[str, float]] = []
        self._last_beat = time.monotonic()
        self._last_step = -1

    def on_step(self, tuner: SelfTuner, row: dict[str, float] | None) -> None:
        if row is not None:
            self._trajectory.append(row)
        if tuner.counters.steps % self.every == 0:
            self.checkpoint(tuner)
        elif time.monotonic() - self._last_beat > self.heartbeat_s:
            self.store.heartbeat(self.run_id)
            self._last_beat = time.monotonic()

    def on_epoch_end(self, tuner: SelfTuner, row: dict[str, float]) -> None:
        self._epochs.append(row)
        if self.at_epoch_end:
            self.checkpoint(tuner, force=True)

    def on_fit_end(self, tuner: SelfTuner) -> None:
        self.checkpoint(tuner)

    def checkpoint(self, tuner: SelfTuner, force: bool = False) -> None:
        step = tuner.counters.steps
        if step == self._last_step and not force and not (self._trajectory or self._epochs):
            return
        path = self.dir / f"step-{step:09d}-epoch-{tuner.epoch:05d}.pt"
        state = tuner.state_dict()
        save_atomic(state, path)
        self.store.commit_checkpoint(self.run_id, step=step, epoch=tuner.epoch, path=str(path),
                                     trajectory=self._trajectory, epochs=self._epochs)
        self._trajectory, self._epochs = [], []
        self._last_step, self._last_beat = step, time.monotonic()
        tuner.mark_good(state)  # a roll-back after divergence lands on this checkpoint
        self._prune(path)

    def on_divergence(self, tuner: SelfTuner, info: dict[str, Any]) -> None:
        # The tuner rolled back to the last checkpoint: rows logged since then never happened.
        self._trajectory, self._epochs = [], []
        self.store.add_event(self.run_id, step=int(info["step"]), kind="divergence", message=info["message"])

    def _prune(self, newest: Path) -> None:
        files = sorted(p for p in self.dir.glob("step-*.pt") if p != newest)
        for old in files[: max(0, len(files) - (self.keep - 1))]:
            old.unlink(missing_ok=True)
