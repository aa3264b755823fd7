"""A tuner callback that checkpoints a run and records it in the store as it goes."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..tuner import Callback, SelfTuner
from ._store import RunStore


def torch_save(state: Any, f: Any, path: Path) -> None:
    """``torch.save(state, f)``, where a write that fails (a full disk) is the ``OSError`` it is: PyTorch's
    writer reports it as a ``RuntimeError`` ("unexpected pos"), which the callers' one-line handling of a
    full disk or an unwritable folder would not recognise."""
    try:
        torch.save(state, f)
    except RuntimeError as err:
        if "enforce fail" not in str(err) and "PytorchStreamWriter" not in str(err):
            raise
        try:
            full = shutil.disk_usage(path.parent).free < 64 * 2**20
        except OSError:
            full = False
        code = errno.ENOSPC if full else errno.EIO
        raise OSError(code, "no space left on the device" if full else "the write failed", str(path)) from None


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` so that a reader sees the old file or the whole new one, never a part.
    The temporary file is unique to this write, so two writers never interleave in one file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch_save(state, f, path)
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
    point when the run is healthy there, so a divergence usually rolls back only rows that were not
    committed yet; when it rolls back further (a blow-up that stayed finite), :meth:`on_divergence`
    undoes the rows and checkpoints after its target.

    A checkpoint file holds ``{"run_uuid": ..., "tuner": state, "checkpointing": ..., "data": ...}``: a
    resume checks that the file belongs to the run it resumes, checkpoints at the same interval, and
    says when the data it is built from now differs from what the checkpoint was trained on.

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
        epoch_gap_s: skip an epoch end's checkpoint when the last one is more recent than this: a run of
            short epochs (150 epochs of 5 steps) spent more time checkpointing than training. An epoch end's
            checkpoint is no roll-back point of its own (the tuner takes one there anyway), so skipping it
            changes no result, only how far back a crash resumes from.
        data: what the run trains on (name, split sizes and, for a user's task, its file's digest; the
            ``data`` entry of ``result.json``), kept in every checkpoint.
    """

    def __init__(self, store: RunStore, run_id: int, checkpoint_dir: str | Path, *, run_uuid: str, every: int = 100,
                 keep: int = 2, heartbeat_s: float = 10.0, at_epoch_end: bool = True, epoch_gap_s: float = 0.0,
                 data: dict[str, Any] | None = None) -> None:
        self.store, self.run_id, self.uuid = store, run_id, run_uuid
        self.data = dict(data) if data is not None else None
        self.dir = Path(checkpoint_dir)
        self.every, self.keep, self.heartbeat_s, self.at_epoch_end = every, keep, heartbeat_s, at_epoch_end
        self.epoch_gap_s = epoch_gap_s
        self._last_beat = self._last_saved = time.monotonic()
        self._committed: tuple[int, int] | None = None  # (steps, epochs) the store holds rows up to
        self._deleted: set[Path] = set()  # checkpoint files _prune deleted (a path written again leaves it)

    def on_fit_start(self, tuner: SelfTuner, total_steps: int) -> None:
        self._committed = (tuner.counters.steps, tuner.epoch)  # a resumed store holds rows up to here

    def on_step(self, tuner: SelfTuner, row: dict[str, float] | None) -> None:
        if tuner.counters.steps % self.every == 0:
            self.checkpoint(tuner)
        elif time.monotonic() - self._last_beat > self.heartbeat_s:
            self.store.heartbeat(self.run_id)
            self._last_beat = time.monotonic()

    def on_epoch_end(self, tuner: SelfTuner, row: dict[str, float]) -> None:
        if self.at_epoch_end and time.monotonic() - self._last_saved >= self.epoch_gap_s:
            self.checkpoint(tuner)

    def on_fit_end(self, tuner: SelfTuner) -> None:
        # off the schedule (an interrupt, max_steps, the end): judged by no one, so a resume goes on exactly
        self.checkpoint(tuner, point=False)

    def checkpoint(self, tuner: SelfTuner, *, point: bool = True) -> None:
        """Save the tuner's state and commit it with the rows logged since the previous checkpoint
        (``point``: see :meth:`SelfTuner.snapshot`)."""
        steps, epochs = tuner.counters.steps, tuner.epoch
        if self._committed == (steps, epochs):
            return
        last_step, last_epoch = self._committed or (-1, 0)
        trajectory = [r for r in tuner.trajectory if r["step"] > last_step]
        history = [r for r in tuner.history if r["epoch"] > last_epoch]
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step-{steps:09d}-epoch-{epochs:05d}.pt"
        save_atomic(self._payload(tuner.snapshot(point)), path)
        self._deleted.discard(path)  # (a roll-back can train back to a step whose file was pruned)
        self.store.commit_checkpoint(self.run_id, step=steps, epoch=epochs, path=str(path), trajectory=trajectory,
                                     epochs=history)
        self._committed, self._last_beat = (steps, epochs), time.monotonic()
        self._last_saved = self._last_beat
        self._prune(path)

    def _payload(self, state: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint file's contents. The interval is kept so that a resume checkpoints (and so rolls
        back) where the uninterrupted run does; the data, so that it can tell a task file edited since."""
        payload = {"run_uuid": self.uuid, "tuner": state,
                   "checkpointing": {"every": self.every, "at_epoch_end": self.at_epoch_end}}
        if self.data is not None:
            payload["data"] = self.data
        return payload

    def on_divergence(self, tuner: SelfTuner, info: dict[str, Any]) -> None:
        """Record the divergence. The tuner rolled back to its last healthy state (SelfTuner.snapshot):
        usually at or after the last commit, so the rows it dropped were never committed. When it lies
        before the last commit (the run blew up over several checkpoints while its values stayed finite),
        the rolled-back state, at its lowered rates, is saved first; then one transaction drops the rows
        and checkpoints after it, records the event and commits the new checkpoint; then the dropped
        checkpoints' files (this run's) are deleted. A crash before the commit resumes from the old
        checkpoints and replays the divergence; after it, from the rolled-back state, and the resume's
        rewind keeps the events that state's divergence count holds (RunStore.rewind)."""
        here = (tuner.counters.steps, tuner.epoch)
        if self._committed is None or here >= self._committed:
            self.store.add_event(self.run_id, step=int(info["step"]), kind="divergence", message=info["message"])
            return
        later = [Path(p) for s, e, p in self.store.checkpoints(self.run_id) if (s, e) > here]
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step-{here[0]:09d}-epoch-{here[1]:05d}-rollback-{int(info['divergences'])}.pt"
        save_atomic(self._payload(tuner.snapshot(point=False)), path)
        self._deleted.discard(path)
        self._last_saved = time.monotonic()
        self.store.roll_back(self.run_id, step=here[0], epoch=here[1], path=str(path), event_step=int(info["step"]),
                             message=info["message"])
        self._committed, self._last_beat = here, time.monotonic()
        for old in later:
            if old != path:
                old.unlink(missing_ok=True)
        self._prune(path)

    def _prune(self, newest: Path) -> None:
        """Keep the files of the ``keep`` newest committed checkpoints. Delete the older files this run
        committed, and, in a folder named by this run's UUID (nobody else's), uncommitted leftovers of a
        crash between a save and its commit. Files of other runs are never touched."""
        committed = [Path(path) for _, _, path in self.store.checkpoints(self.run_id)]
        kept = {newest, *committed[-self.keep:]}
        doomed = set(committed) - kept - self._deleted  # (each file once: every commit listed them all again)
        if self.dir.name == self.uuid:
            doomed |= {p for p in self.dir.glob("step-*.pt") if p not in kept}
        for old in doomed:
            old.unlink(missing_ok=True)
        self._deleted |= doomed
