"""A tuner callback that checkpoints a run and records it in the store as it goes."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..tuner import Callback, SelfTuner
from ._store import RunStore


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` so that a reader sees the old file or the whole new one, never a part.
    The temporary file is unique to this write, so two writers never interleave in one file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class StoreRecorder(Callback):
    """Checkpoints every ``every`` steps and at each epoch end, and commits the trajectory and epoch
    rows logged since the previous checkpoint together with it; beats the heartbeat in between.

    The rows are read from the tuner's :class:`~selftune.bookkeeping.RunLog`, never buffered here:
    each checkpoint is taken with :meth:`SelfTuner.snapshot`, which makes it the tuner's roll-back
    point, so a divergence can only roll back rows that were not committed yet.

    A checkpoint file holds ``{"run_uuid": ..., "tuner": state}``: a resume checks that the file
    belongs to the run it resumes.

    Args:
        store: the run store.
        run_id: the run being recorded.
        checkpoint_dir: folder for this run's checkpoint files (created).
        run_uuid: the run's UUID, written into every checkpoint.
        every: steps between checkpoints.
        keep: checkpoint files kept on disk (older ones are deleted once a newer one is committed; a
            resume falls back to the previous one when the newest is torn).
        heartbeat_s: seconds between heartbeats when no checkpoint happens.
        at_epoch_end: also checkpoint at every epoch end (benchmarks turn it off: only the final one).
    """

    def __init__(self, store: RunStore, run_id: int, checkpoint_dir: str | Path, *, run_uuid: str, every: int = 100,
                 keep: int = 2, heartbeat_s: float = 10.0, at_epoch_end: bool = True) -> None:
        self.store, self.run_id, self.uuid = store, run_id, run_uuid
        self.dir = Path(checkpoint_dir)
        self.every, self.keep, self.heartbeat_s, self.at_epoch_end = every, keep, heartbeat_s, at_epoch_end
        self._last_beat = time.monotonic()
        self._committed: tuple[int, int] | None = None  # (steps, epochs) the store holds rows up to

    def on_fit_start(self, tuner: SelfTuner, total_steps: int) -> None:
        self._committed = (tuner.counters.steps, tuner.epoch)  # a resumed store holds rows up to here

    def on_step(self, tuner: SelfTuner, row: dict[str, float] | None) -> None:
        if tuner.counters.steps % self.every == 0:
            self.checkpoint(tuner)
        elif time.monotonic() - self._last_beat > self.heartbeat_s:
            self.store.heartbeat(self.run_id)
            self._last_beat = time.monotonic()

    def on_epoch_end(self, tuner: SelfTuner, row: dict[str, float]) -> None:
        if self.at_epoch_end:
            self.checkpoint(tuner)

    def on_fit_end(self, tuner: SelfTuner) -> None:
        self.checkpoint(tuner)

    def checkpoint(self, tuner: SelfTuner, *, suffix: str = "") -> None:
        """Save the tuner's state and commit it with the rows logged since the previous checkpoint
        (``suffix``: a second checkpoint at the same step, after a roll-back, see :meth:`on_divergence`)."""
        steps, epochs = tuner.counters.steps, tuner.epoch
        if self._committed == (steps, epochs) and not suffix:
            return
        last_step, last_epoch = self._committed or (-1, 0)
        trajectory = [r for r in tuner.trajectory if r["step"] > last_step]
        history = [r for r in tuner.history if r["epoch"] > last_epoch]
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step-{steps:09d}-epoch-{epochs:05d}{suffix}.pt"
        save_atomic({"run_uuid": self.uuid, "tuner": tuner.snapshot()}, path)
        self.store.commit_checkpoint(self.run_id, step=steps, epoch=epochs, path=str(path), trajectory=trajectory,
                                     epochs=history)
        self._committed, self._last_beat = (steps, epochs), time.monotonic()
        self._prune(path)

    def on_divergence(self, tuner: SelfTuner, info: dict[str, Any]) -> None:
        """Record the divergence. The tuner rolled back to its last healthy state (SelfTuner.snapshot):
        usually at or after the last commit, so the rows it dropped were never committed. When it lies
        before the last commit (the run blew up over several checkpoints while its values stayed finite),
        the rows and checkpoints after it are dropped here, and the rolled-back state, at its lowered
        rates, is checkpointed at once: a resume then starts from it, as the run goes on from it. The event
        is recorded at that step, so the resume's own rewind keeps it."""
        step, epoch = tuner.counters.steps, tuner.epoch
        if self._committed is None or step >= self._committed[0]:
            self.store.add_event(self.run_id, step=int(info["step"]), kind="divergence", message=info["message"])
            return
        later = [Path(p) for s, e, p in self.store.checkpoints(self.run_id) if (s, e) > (step, epoch)]
        self.store.rewind(self.run_id, step, epoch, events=False)
        self.store.add_event(self.run_id, step=step, kind="divergence", message=info["message"])
        for path in later:  # this run committed them: its own files
            path.unlink(missing_ok=True)
        self._committed = (step, epoch)
        self.checkpoint(tuner, suffix=f"-rollback-{int(info['divergences'])}")

    def _prune(self, newest: Path) -> None:
        """Keep the files of the ``keep`` newest committed checkpoints. Delete the older files this run
        committed, and, in a folder named by this run's UUID (nobody else's), uncommitted leftovers of a
        crash between a save and its commit. Files of other runs are never touched."""
        committed = [Path(path) for _, _, path in self.store.checkpoints(self.run_id)]
        kept = {newest, *committed[-self.keep:]}
        doomed = set(committed) - kept
        if self.dir.name == self.uuid:
            doomed |= {p for p in self.dir.glob("step-*.pt") if p not in kept}
        for old in doomed:
            old.unlink(missing_ok=True)
