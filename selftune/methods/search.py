"""Black-box searches through Optuna: each trial is a full ``fixed`` training run.

Uses Optuna itself (RandomSampler, TPESampler, SuccessiveHalvingPruner); studies live in the same
SQLAlchemy database as the run store, so ``optuna-dashboard URL`` opens them next to selftune's runs.
A trial reports the per-epoch validation loss (what the pruner of ``tpe-asha`` acts on); the study
minimises the final validation loss, and the method returns the test loss of the best trial's model.
"""

from __future__ import annotations

from typing import Any

import optuna

from ..config import RunConfig, apply_overrides, parse_config
from ..runner import execute, prepare
from ..tuner import Callback, SelfTuner
from ._result import MethodResult

SEARCH_METHODS: tuple[str, ...] = ("random", "tpe", "tpe-asha")


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


def run_search(config: RunConfig, method: str, seed: int, n_trials: int, storage: str,
               study_name: str) -> MethodResult:
    """Run an Optuna study of ``n_trials`` full training runs.

    Args:
        config: the task; its space gives the search ranges, ``method`` is forced to ``fixed``.
        method: ``random``, ``tpe`` or ``tpe-asha``.
        seed: seeds the sampler and every trial's training.
        n_trials: trials to run.
        storage: SQLAlchemy URL for the study (the run store's).
        study_name: unique study name (``load_if_exists``: a re-run continues the study).
    """
    if method not in SEARCH_METHODS:
        raise ValueError(f"{method!r} is not a search method {SEARCH_METHODS}")
    sampler = optuna.samplers.RandomSampler(seed=seed) if method == "random" else \
        optuna.samplers.TPESampler(seed=seed)
    pruner = optuna.pruners.SuccessiveHalvingPruner() if method == "tpe-asha" else optuna.pruners.NopPruner()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner,
                                direction="minimize", load_if_exists=True)
    base = config.model_dump(mode="json")
    totals = {"examples": 0, "seconds": 0.0}
    curve: list[tuple[int, float]] = []
    best = {"val": float("inf"), "test": float("nan")}

    def objective(trial: optuna.Trial) -> float:
        values = _suggest(trial, config)
        sets = ['method="fixed"', f"seed={seed}", *(f"space.{k}.init={v!r}" for k, v in values.items())]
        report = _Report(trial)
        callbacks = [report] if method == "tpe-asha" else []
        _, result = execute(prepare(parse_config(apply_overrides(_copy(base), sets))), callbacks)
        totals["examples"] += int(result["compute"]["examples"])
        totals["seconds"] += result["compute"]["seconds"]
        for key in ("loss", "accuracy"):
            trial.set_user_attr(f"test_{key}", result["test"][key])
        trial.set_user_attr("examples", int(result["compute"]["examples"]))
        if not report.pruned and result["val"]["loss"] < best["val"]:
            best.update(val=result["val"]["loss"], test=result["test"]["loss"])
        curve.append((totals["examples"], best["test"]))
        if report.pruned:
            raise optuna.TrialPruned()
        return result["val"]["loss"]

    study.optimize(objective, n_trials=n_trials)
    chosen = study.best_trial
    return MethodResult(method=method, seed=seed, test_loss=chosen.user_attrs["test_loss"],
                        test_accuracy=chosen.user_attrs["test_accuracy"], val_loss=float(chosen.value),
                        hparams=dict(chosen.params), examples=totals["examples"], seconds=totals["seconds"],
                        trials=n_trials, study=study_name, curve=curve)


def _copy(raw: dict[str, Any]) -> dict[str, Any]:
    import copy

    return copy.deepcopy(raw)
