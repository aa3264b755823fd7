"""One Optuna study, driven by any number of processes at once, that runs exactly its budget of trials.

Why: a search's study is named by its task, seed and budget (``Search.study_name``), so a re-run continues
it, and so do two ``selftune bench`` commands of the same task started side by side on one store (two
``--out`` folders, or two machines on one PostgreSQL store). Each used to count the trials finished when
it began and run the rest itself: the study ended with twice its budget, the two drew the same points
(their samplers seeded alike), and each reported another best trial. Here:

* a trial that starts when the study already has its budget of trials before it (finished, running or
  queued) is **surplus**: it ends at once as failed, before it samples anything (failed trials take no
  slot and count nowhere), so the study holds exactly ``n`` trials that count, whoever ran them;
* a process whose remaining trials are all being run by others **waits** for them, then reads the same
  ``n`` trials as they do: every process reports the same best trial;
* a trial a **dead process** left ``RUNNING`` is failed, so it neither blocks the wait nor takes a slot:
  the process's host, pid and PID namespace are recorded on the trial (a process of this host and
  namespace that has exited is dead at once), and Optuna's heartbeat (``RDBStorage(heartbeat_interval=
  ...)``) fails any other after :data:`GRACE_S` seconds of silence. A ``RUNNING`` trial with neither an
  owner nor a heartbeat (an older selftune's) is dead once :data:`ORPHAN_AFTER_S` old;
* a process whose trial another one failed meanwhile (it was paused past the grace, or its heartbeat
  starved) drops that trial's result and goes on, where Optuna's ``tell`` of a failed trial raised.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from optuna.trial import TrialState

from ..errors import Interrupted, SelftuneError, StoreError
from ..store import process_gone
from ._sampling import FINISHED

if TYPE_CHECKING:
    import optuna

#: seconds between a running trial's heartbeats, and the silence after which another process fails it
HEARTBEAT_S, GRACE_S = 15, 60
#: age after which a running trial that names no owning process counts as dead
ORPHAN_AFTER_S = 30.0
#: seconds between two looks at trials other processes are running
POLL_S = 2.0
#: trial attributes naming the process that runs it
HOST, PID, NAMESPACE = "selftune_host", "selftune_pid", "selftune_pid_namespace"
#: the trials that hold a place in the budget: finished, being run, or queued to run
COUNTED = (*FINISHED, TrialState.RUNNING, TrialState.WAITING)


class SurplusTrialError(Exception):
    """Raised at the start of a trial the study's budget has no place for; Optuna records it as failed."""


def open_storage(url: str, timeout_s: float = 30.0) -> optuna.storages.RDBStorage:
    """Optuna's storage on ``url`` with heartbeats on, waiting up to ``timeout_s`` for SQLite's locks (two
    processes write the same file). Two processes that open a database without Optuna's tables at the same
    moment both create them and one fails on the other's half-made schema: that one tries again."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    engine = {"connect_args": {"timeout": timeout_s}} if url.startswith("sqlite") else {}
    for attempt in range(6):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9; nothing to act on
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                                                  grace_period=GRACE_S)
        except SQLAlchemyError:
            if attempt == 5:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def claim(study: optuna.Study, trial: optuna.Trial, n_trials: int) -> None:
    """Record this process as the trial's owner, or raise :class:`SurplusTrialError` when ``n_trials`` trials
    that count come before it (numbers are handed out in order by the storage, so exactly the first
    ``n_trials`` pass, however many processes ask at once). The owner is recorded first: counting may wait on
    a busy database."""
    import optuna

    try:
        for key, value in owner().items():
            trial.set_user_attr(key, value)
    except optuna.exceptions.UpdateFinishedTrialError:  # another process failed it already: let it go
        raise SurplusTrialError("another process took this trial for dead before it began") from None
    ahead = sum(t.number < trial.number for t in study.get_trials(deepcopy=False, states=COUNTED))
    if ahead >= n_trials:
        raise SurplusTrialError(f"the study has its {n_trials} trials")


def owner() -> dict[str, str | int]:
    """What names this process on a trial: host, pid and PID namespace (containers that share a host name,
    docker's ``--net=host``, number their processes apart: there a pid says nothing about another's)."""
    return {HOST: socket.gethostname(), PID: os.getpid(), NAMESPACE: _pid_namespace()}


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:  # no /proc (macOS, Windows): the host name alone tells
        return ""


def _heartbeating(storage: optuna.storages.RDBStorage, trial_ids: list[int]) -> set[int]:
    """The trials among ``trial_ids`` that have an Optuna heartbeat (every trial this module runs has one
    from the moment Optuna asks for it, before :func:`claim` names its owner)."""
    from sqlalchemy import bindparam, text

    if not trial_ids:
        return set()
    query = text("SELECT trial_id FROM trial_heartbeats WHERE trial_id IN :ids").bindparams(
        bindparam("ids", expanding=True))
    with storage.engine.connect() as conn:
        return {int(row[0]) for row in conn.execute(query, {"ids": trial_ids})}


def fail_dead(study: optuna.Study, storage: optuna.storages.RDBStorage) -> None:
    """Fail the running trials whose process is gone (module docstring)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # silent for GRACE_S: its process died (or sleeps)
    now, here = datetime.now(), owner()  # Optuna stamps trials in local time
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    beating = _heartbeating(storage, [t._trial_id for t in running if t.user_attrs.get(PID) is None])
    for t in running:
        host, pid, namespace = (t.user_attrs.get(k) for k in (HOST, PID, NAMESPACE))
        if pid is not None:  # a process of this host and namespace is checked at once; any other by heartbeat
            gone = ((host, namespace) == (here[HOST], here[NAMESPACE]) and int(pid) != os.getpid()
                    and process_gone(str(host), int(pid)))
        elif t._trial_id in beating:  # asked by a live optimize that has not claimed it yet
            gone = False
        else:  # an older selftune's, without heartbeats: by its age
            gone = t.datetime_start is None or now - t.datetime_start > timedelta(seconds=ORPHAN_AFTER_S)
        if gone:
            try:
                storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:  # it finished, or another process failed it
                pass


class _Between:
    """SIGINT/SIGTERM while a study runs: inside a trial's training they stop it at once (KeyboardInterrupt:
    the trial fails, as a Ctrl-C in a training loop does); inside Optuna's own bookkeeping (creating a
    trial, committing its result) they wait until it is done. A KeyboardInterrupt raised in the middle of
    a commit broke Optuna's tell (a raw ``UnboundLocalError`` traceback), and one raised in a garbage
    collector's callback was swallowed (the bench ran to its end); the signal is kept here either way."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.in_trial = False

    def __call__(self, signum: int, _frame: object) -> None:
        second = self.signum is not None
        self.signum = self.signum or signum
        if self.in_trial or second:  # (a second one also stops bookkeeping that hangs: a store that is locked)
            raise KeyboardInterrupt

    def stop_if_signalled(self, study: optuna.Study) -> None:
        """Stop as the signal asks, now that Optuna's bookkeeping is done: a SIGINT as the KeyboardInterrupt a
        caller expects of a Ctrl-C (a bench says how to go on), a SIGTERM as :class:`Interrupted`."""
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is not None:
            name = signal.Signals(self.signum).name
            raise Interrupted(f"study {study.study_name} stopped by {name} (the trials it finished are kept); run "
                              "it again to go on", self.signum)


@contextmanager
def _signals_between_trials() -> Iterator[_Between]:
    guard = _Between()
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        guard.in_trial = True
        yield guard
        return
    old = {s: signal.signal(s, guard) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield guard
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def run_budget(study: optuna.Study, storage: optuna.storages.RDBStorage, objective: Callable[[optuna.Trial], float],
               n_trials: int, *, before_each: Callable[[], None] = lambda: None,
               progress: Callable[[str], None] | None = None) -> list[optuna.trial.FrozenTrial]:
    """Run trials of ``study`` until it has ``n_trials`` finished ones, sharing the work with any other
    process doing the same; return those trials, by number. ``objective`` must call :func:`claim` first.
    ``before_each`` runs before each trial (a grid queues points of failed trials again)."""
    import optuna

    waited, ran, lost = False, [], 0  # ran: the trial whose objective this process ran to its end (or pruned)

    def run(trial: optuna.Trial) -> float:
        guard.in_trial = True  # (first: a signal from here on stops the trial at once)
        try:
            if guard.signum is not None:  # (a signal while Optuna created this trial: it fails, nothing trains)
                raise KeyboardInterrupt
            value = objective(trial)
        except optuna.TrialPruned:
            ran.append(trial.number)
            raise
        finally:
            guard.in_trial = False
        ran.append(trial.number)  # an error inside the objective is the user's to see, never "lost"
        return value

    while True:
        fail_dead(study, storage)
        trials = study.get_trials(deepcopy=False)
        finished = [t for t in trials if t.state in FINISHED]
        if len(finished) >= n_trials:
            return sorted(finished, key=lambda t: t.number)[:n_trials]
        before_each()
        trials = study.get_trials(deepcopy=False)
        others = [t for t in trials if t.state == TrialState.RUNNING]
        if len(finished) + len(others) >= n_trials and not any(t.state == TrialState.WAITING for t in trials):
            if progress is not None and not waited:
                progress(f"    waiting for {len(others)} trial(s) another process is running in this study")
            waited = True
            time.sleep(POLL_S)
            continue
        ran.clear()
        try:
            with _signals_between_trials() as guard:
                try:
                    study.optimize(run, n_trials=1, catch=(SurplusTrialError,))
                except KeyboardInterrupt:
                    if guard.signum in (None, signal.SIGINT):
                        raise
                guard.stop_if_signalled(study)
        except Exception as err:  # Optuna's tell of a trial another process failed meanwhile (module docstring)
            if isinstance(err, SelftuneError) or not ran or not _failed_elsewhere(study, ran[-1]):
                raise
            lost += 1
            if lost > n_trials:  # a study that loses every trial it runs would never end
                raise StoreError(f"study {study.study_name}: {lost} trials of this process were failed by another "
                                 "process that took it for dead; give it a steadier machine, or run one bench at "
                                 "a time") from None
            if progress is not None:
                progress(f"    trial {ran[-1]} was failed by another process that took this one for dead (no "
                         "heartbeat for a while); its result is dropped and its point drawn again")


def _failed_elsewhere(study: optuna.Study, number: int) -> bool:
    """Whether trial ``number``, which this process ran to its end, ended failed (by another process)."""
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    return trial is not None and trial.state == TrialState.FAIL
