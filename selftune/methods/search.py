"""Black-box searches through Optuna: each trial is a full ``fixed`` training run.

Uses Optuna itself (RandomSampler, TPESampler, GridSampler, SuccessiveHalvingPruner); studies live in the same
SQLAlchemy database as the run store, so ``optuna-dashboard URL`` opens them next to selftune's runs.
A trial reports the per-epoch validation loss (what the pruner of ``tpe-asha`` acts on); the study
minimises the final validation loss, and the method returns the test loss of the best trial's model.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..algorithms import Fixed
from ..config import comparable
from ..errors import DivergenceError
from ..extras import install_hint, missing
from ..task import code_digest
from ..tuner import Callback, SelfTuner
from ._base import Context, Method, MethodResult, own_metrics

if TYPE_CHECKING:
    import optuna

    from ..config import RunConfig


class _Report(Callback):
    """Report each epoch's validation loss to the trial; stop the run when the pruner says so.
    Only used with a pruner: every report is a database write."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.pruned = False

    def on_epoch_end(self, tuner: SelfTuner, row: dict[str, float]) -> None:
        self.trial.report(row["val_loss"], int(row["epoch"]))
        if self.trial.should_prune():
            self.pruned = True
            tuner.request_stop()


def _suggest(trial: optuna.Trial, config: RunConfig) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, h in config.space.items():
        if h.type == "int":
            values[name] = trial.suggest_int(name, int(h.low), int(h.high))
        else:
            values[name] = trial.suggest_float(name, h.low, h.high, log=h.log)
    return values


def grid_points(config: RunConfig, n_trials: int) -> dict[str, list[float | int]]:
    """The values the ``grid`` method tries for each hyperparameter it varies (``[bench] grid``, or every
    one of the space): ``k`` per hyperparameter with ``k**d <= n_trials`` (``k >= 2``; ``d``
    hyperparameters), at the centres of ``k`` equal cells of the range, in log space for a log range
    (a grid's usual placement: no point on a bound, where a dropout of 0.95 or a decay of 1e-2 says
    little). Integers are rounded and repeated values dropped."""
    names = list(config.bench.grid) or list(config.space)
    k = max(2, math.floor(n_trials ** (1 / len(names)) + 1e-9))
    points: dict[str, list[float | int]] = {}
    for name in names:
        h = config.space[name]
        lo, hi = (math.log(h.low), math.log(h.high)) if h.log else (float(h.low), float(h.high))
        values = [lo + (i + 0.5) * (hi - lo) / k for i in range(k)]
        values = [math.exp(v) for v in values] if h.log else values
        points[name] = list(dict.fromkeys(round(v) for v in values)) if h.type == "int" else values
    return points


class Search(Method):
    """An Optuna study whose trials are full ``fixed`` training runs of the task.

    Args:
        name: registry key.
        sampler: builds the Optuna sampler from the seed.
        pruned: prune with Optuna's SuccessiveHalvingPruner on per-epoch validation losses (ASHA).
    """

    #: each trial draws from a sampler seeded by the seed and the finished trials (``_sampling``); a grid
    #: assigns points by trial number from one seeded shuffle instead, so it keeps one sampler
    slot_seeded = True

    def __init__(self, name: str, sampler: Callable[[int], optuna.samplers.BaseSampler], *,
                 pruned: bool = False) -> None:
        super().__init__(name)
        self.sampler, self.pruned = sampler, pruned

    def budget(self, ctx: Context) -> str:
        return f" ({ctx.trials} trials)"

    def trials(self, ctx: Context) -> int:
        return ctx.trials

    def unusable(self, config: RunConfig) -> str | None:
        if missing("optuna"):
            return f"{self.name} is an Optuna study, and Optuna is not installed: {install_hint('search')}"
        return None

    def run(self, config: RunConfig, seed: int, ctx: Context) -> MethodResult:
        return run_search(config, self, seed, ctx.trials, ctx.store.url.render_as_string(hide_password=False),
                          self.study_name(config, seed, ctx), progress=ctx.progress)

    def study_name(self, config: RunConfig, seed: int, ctx: Context) -> str:
        """Names the study in the store: the same task, method, seed and budget continue one study. The
        name ends in a digest of what a trial trains (:func:`trial_digest`), so an edited file or a
        ``--set`` that changes the training starts a study of its own instead of continuing one whose
        trials trained something else. A ``[task]``'s study is also named by the values of its data
        (:func:`~selftune.task.data_digest`): a task that reads a file beside it builds the same code from
        an edited file, and its study would go on with trials that trained on the old values."""
        name = f"{ctx.label}-{self.name}-seed{seed}-{ctx.trials}trials-{trial_digest(config)}"
        if config.task is not None:
            import random

            import numpy as np
            import torch

            from ..task import call_task, data_digest, seed_task_generators

            state = (random.getstate(), np.random.get_state())
            try:
                with torch.random.fork_rng(devices=[]):
                    seed_task_generators(seed)  # (as each trial's run builds it)
                    task = call_task(config.task.source, config.task.args)
            finally:
                random.setstate(state[0])
                np.random.set_state(state[1])
            name += f"-data{data_digest({'train': task.train, 'val': task.val, 'test': task.test})[:8]}"
        return name

    def make_sampler(self, seed: int, config: RunConfig, n_trials: int) -> optuna.samplers.BaseSampler:
        return self.sampler(seed)

    def planned_trials(self, config: RunConfig, n_trials: int) -> int:
        """Trials the study runs for a budget of ``n_trials``."""
        return n_trials

    def suggest(self, trial: optuna.Trial, config: RunConfig) -> dict[str, Any]:
        """The trial's hyperparameters (every one of the space, sampled)."""
        return _suggest(trial, config)


def trial_digest(config: RunConfig) -> str:
    """Eight hex digits of what a search trial trains: the config without its method, seed, ``[bench]``
    table and the settings only tuning reads (:data:`~selftune.settings.TUNING_ONLY`), and a ``[task]``
    (and a ``tuner.optimizer`` file) by the contents of its file and of the modules and packages beside it
    that it can import (:func:`~selftune.task.code_digest`), rather than its path: a moved checkout
    continues its studies; an edited task file or helper does not."""
    from ..settings import TUNING_ONLY

    task = config.model_dump(mode="json", exclude={"method": True, "seed": True, "bench": True,
                                                   "tuner": set(TUNING_ONLY)})
    for key, default in (("keep", "last"), ("drop_last", False)):
        if task["tuner"].get(key) == default:  # a default newer than the study: studies named before it go on
            del task["tuner"][key]
    if config.task is not None:
        task["task"]["source"] = code_digest(config.task.source)
    if ".py:" in config.tuner.optimizer:  # a user's optimizer class from a file: the same rule
        task["tuner"]["optimizer"] = code_digest(config.tuner.optimizer)
    return hashlib.sha1(json.dumps(comparable(task), sort_keys=True).encode()).hexdigest()[:8]




class Grid(Search):
    """A fixed grid (Optuna's GridSampler over :func:`grid_points`), visited in an order the seed shuffles;
    hyperparameters outside ``[bench] grid`` stay at their ``init``. A grid larger than the trial budget
    (2 values of more than log2(trials) hyperparameters) is visited only in part."""

    by_default = False
    slot_seeded = False

    def __init__(self) -> None:
        super().__init__("grid", _random)

    def make_sampler(self, seed: int, config: RunConfig, n_trials: int) -> optuna.samplers.BaseSampler:
        import optuna

        return optuna.samplers.GridSampler(grid_points(config, n_trials), seed=seed)

    def planned_trials(self, config: RunConfig, n_trials: int) -> int:
        return min(n_trials, math.prod(len(v) for v in grid_points(config, n_trials).values()))

    def budget(self, ctx: Context) -> str:
        return f" (a grid within {ctx.trials} trials)"

    def study_name(self, config: RunConfig, seed: int, ctx: Context) -> str:
        """With the grid's values in it, a changed ``[bench] grid`` or space starts a study of its own."""
        points = json.dumps(grid_points(config, ctx.trials), sort_keys=True)
        return f"{super().study_name(config, seed, ctx)}-{hashlib.sha1(points.encode()).hexdigest()[:8]}"

    def suggest(self, trial: optuna.Trial, config: RunConfig) -> dict[str, Any]:
        varied = set(config.bench.grid) or set(config.space)
        values = {name: h.init for name, h in config.space.items() if name not in varied}
        for name, h in config.space.items():
            if name in varied:
                values[name] = trial.suggest_int(name, int(h.low), int(h.high)) if h.type == "int" else \
                    trial.suggest_float(name, h.low, h.high, log=h.log)
        return values


def _random(seed: int) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


def _tpe(seed: int) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.TPESampler(seed=seed)


#: The black-box searches, in the order tables show them.
SEARCHES: tuple[Search, ...] = (Search("random", _random), Search("tpe", _tpe), Search("tpe-asha", _tpe, pruned=True),
                                Grid())


def run_search(config: RunConfig, search: Search, seed: int, n_trials: int, storage: str,
               study_name: str, progress: Callable[[str], None] | None = None) -> MethodResult:
    """Run an Optuna study of ``n_trials`` full training runs.

    Args:
        config: the task; its space gives the search ranges; every trial trains it with ``fixed``.
        search: which sampler, pruned or not.
        seed: seeds the sampler and every trial's training.
        n_trials: trials to run.
        storage: SQLAlchemy URL for the study (the run store's).
        study_name: unique study name (``load_if_exists``: a re-run continues the study, and processes
            running the same study at once share its trials: ``_study``).
        progress: told when this process waits for trials another process runs.
    """
    import optuna

    from ..runner import execute, prepare
    from ._study import claim, open_storage, run_budget

    pruner = optuna.pruners.SuccessiveHalvingPruner() if search.pruned else optuna.pruners.NopPruner()
    # Optuna warns with a full traceback for a trial an exception ended, then re-raises it; every such
    # exception reaches the user once anyway (a Ctrl-C as "stopped: interrupted", an error in one line), so
    # its log would only repeat it in 60 lines.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    from ._sampling import SlotSeeded, retry_lost_points

    if search.slot_seeded:  # each draw follows from the seed and the finished trials: a resumed study
        budget = n_trials   # continues as an uninterrupted one would (_sampling)
        sampler: optuna.samplers.BaseSampler = SlotSeeded(lambda s: search.make_sampler(s, config, budget), seed)
    else:
        sampler = search.make_sampler(seed, config, n_trials)
    n_trials = search.planned_trials(config, n_trials)
    rdb = open_storage(storage)
    try:
        study = optuna.create_study(study_name=study_name, storage=rdb, sampler=sampler, pruner=pruner,
                                    direction="minimize", load_if_exists=True)
    except BaseException:
        rdb.engine.dispose()
        raise

    def objective(trial: optuna.Trial) -> float:
        claim(study, trial, n_trials)  # a trial past the budget (another process ran the rest) ends here
        values = search.suggest(trial, config)
        report = _Report(trial)
        callbacks = [report] if search.pruned else []
        prepared = prepare(config.derive(method=Fixed.name, seed=seed, values=values))
        try:
            _, result = execute(prepared, callbacks)
        except DivergenceError:
            # A sampled configuration that diverges ends its trial, not the study (a search samples the
            # whole space, unstable corners included): it is pruned with no intermediate value, which TPE
            # ranks with the worst trials. Its compute is counted as the tuner's counters hold it at the
            # end: the examples up to the last roll-back target (the steps discarded by earlier roll-backs
            # are not), and every second spent.
            trial.set_user_attr("examples", int(prepared.tuner.counters.examples))
            trial.set_user_attr("seconds", float(prepared.tuner.log.seconds))
            trial.set_user_attr("diverged", True)
            raise optuna.TrialPruned() from None
        trial.set_user_attr("examples", int(result.compute["examples"]))
        trial.set_user_attr("seconds", float(result.compute["seconds"]))
        for key in ("loss", "accuracy"):
            trial.set_user_attr(f"test_{key}", result.test.get(key, math.nan))
        trial.set_user_attr("test_metrics", own_metrics(result.test))
        if not math.isfinite(result.val["loss"]):  # Optuna fails such a trial, which would be drawn again
            trial.set_user_attr("diverged", True)  # for ever: it counts as a diverged one
            raise optuna.TrialPruned()
        if report.pruned:
            raise optuna.TrialPruned()
        return result.val["loss"]

    # A re-run continues the study (the same name in the same store): it runs only the trials still
    # missing, and the compute and the curve are read back from the study's first n_trials finished trials,
    # so a study interrupted and resumed reports what an uninterrupted one does (a grid already visited
    # runs none), and so does every process that shared it.
    try:
        trials = run_budget(study, rdb, objective, n_trials, progress=progress,
                            before_each=(lambda: None) if search.slot_seeded else lambda: retry_lost_points(study))
    finally:
        rdb.remove_session()
        rdb.engine.dispose()
    examples, seconds = 0, 0.0
    best: optuna.trial.FrozenTrial | None = None
    curve: list[tuple[int, float]] = []
    for t in trials:
        examples += int(t.user_attrs.get("examples", 0))
        seconds += float(t.user_attrs.get("seconds", 0.0))
        if t.state == optuna.trial.TrialState.COMPLETE and (best is None or t.value < best.value):
            best = t
        curve.append((examples, best.user_attrs["test_loss"] if best is not None else math.nan))
    if best is None:
        raise DivergenceError(f"every trial of the {search.name} study diverged; narrow the space or lower tuner.lr")
    hparams = {**{n: h.init for n, h in config.space.items()}, **best.params}  # a grid varies only some
    return MethodResult(method=search.name, seed=seed, test_loss=best.user_attrs["test_loss"],
                        test_accuracy=best.user_attrs["test_accuracy"], val_loss=float(best.value),
                        hparams=hparams, examples=examples, seconds=seconds,
                        trials=len(trials), study=study_name, curve=curve,
                        test_metrics=dict(best.user_attrs.get("test_metrics", {})))
