"""Optuna samplers whose draw for a study's next trial depends on the seed and the study's finished
trials only, so an interrupted study that is run again continues as the uninterrupted one would.

Why: a sampler built from a seed draws from one random stream, trial after trial. A study resumed in a new
process builds its sampler afresh and starts that stream from the beginning again: after 3 finished
trials of 8, the next 5 repeated trials 0-4 and the winner (the uninterrupted study's trial 7) was never
tried. Here each trial gets a sampler seeded by ``(seed, slot)``, ``slot`` being how many trials of the
study had finished (complete or pruned) when it began. Trials that never finished (a process killed
mid-trial leaves one ``RUNNING``; a failed one) take no slot, so the next trial draws what the
interrupted one would have. TPE's model reads only finished trials, so it sees the same history.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

#: The trials that take a slot: those that gave the study a result.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def slot_seed(seed: int, slot: int) -> int:
    """The seed of the sampler that draws a study's trial at ``slot`` (independent streams per slot)."""
    return int(np.random.SeedSequence([seed, slot]).generate_state(1)[0])


class SlotSeeded(BaseSampler):
    """Delegates to ``make(slot_seed(seed, slot))``, built afresh before each trial (module docstring).

    Args:
        make: builds the sampler (Random, TPE, Grid, ...) from a seed.
        seed: the study's seed.
    """

    def __init__(self, make: Callable[[int], BaseSampler], seed: int) -> None:
        self._make, self._seed = make, seed
        self._inner = make(slot_seed(seed, 0))

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        slot = len(study.get_trials(deepcopy=False, states=FINISHED))
        self._inner = self._make(slot_seed(self._seed, slot))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def heartbeat_storage(url: str, interval: int = 60) -> optuna.storages.RDBStorage:
    """The study's storage with Optuna's trial heartbeat: a trial whose process died (``kill -9``, a lost
    machine) is marked failed by the next run's ``optimize`` once ``2 * interval`` seconds have passed
    without a beat, instead of staying ``RUNNING`` for ever. (Optuna marks the argument experimental; its
    warning would reach every bench's output.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=interval)
