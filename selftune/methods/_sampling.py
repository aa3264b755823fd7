"""Optuna samplers whose draw for a study's next trial depends on the seed and the study's finished
trials only, so an interrupted study that is run again continues as the uninterrupted one would.

Why: a sampler built from a seed draws from one random stream, trial after trial. A study resumed in a new
process builds its sampler afresh and starts that stream from the beginning again: after 3 finished
trials of 8, the next 5 repeated trials 0-4 and the winner (the uninterrupted study's trial 7) was never
tried. Here each trial gets a sampler seeded by ``(seed, slot)``, ``slot`` being the lowest one that no
trial before it holds (:func:`free_slot`): alone, how many trials of the study had finished (complete or
pruned) when it began; beside another process sharing the study (``_study``), a slot of its own. Trials
that never finished (a Ctrl-C fails one; one a killed process left ``RUNNING`` is failed before the next
trial starts) free their slot, so the next trial draws what the interrupted one would have. TPE's model
reads only finished trials, so it sees the same history. (The pruner of ``tpe-asha`` also reads the
intermediate values an interrupted trial reported, so a resumed ``tpe-asha`` study may prune
differently.) A grid is not re-seeded: Optuna's GridSampler gives trial ``k`` the ``k``-th point of one
seeded shuffle, and :func:`retry_lost_points` queues the points of failed trials again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

#: The trials that take a slot: those that gave the study a result.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


#: the trial attribute recording the slot a trial drew from
SLOT = "selftune_slot"


def free_slot(study: Study, number: int) -> int:
    """The lowest slot that no trial numbered below ``number`` holds. A trial holds its slot while it runs
    or once it finished (a failed one frees it); one without a recorded slot (an older study's, or one
    another process has just begun) holds the lowest free one at its turn, in number order. Alone, every
    trial before a new one has finished or failed, so its slot is the number of finished trials, as before
    slots were recorded; two processes at once take distinct slots, and a trial that failed in one gives
    its slot, and its point, to the next trial of either."""
    held: set[int] = set()

    def lowest() -> int:
        return next(s for s in range(len(held) + 1) if s not in held)

    for t in sorted(study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING)), key=lambda t: t.number):
        if t.number < number:
            recorded = t.user_attrs.get(SLOT)
            held.add(int(recorded) if recorded is not None and int(recorded) not in held else lowest())
    return lowest()


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
        slot = free_slot(study, trial.number)
        study._storage.set_trial_user_attr(trial._trial_id, SLOT, slot)
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


def retry_lost_points(study: Study) -> None:
    """A grid's points whose trial failed (a Ctrl-C ends its trial as failed; one a killed process left
    running is failed by ``_study.fail_dead``) count as visited for Optuna's GridSampler, which would then
    end the study short of them and repeat a finished point: queue each such point once more, unless a
    trial has it already (finished, queued, or being run by another process)."""
    trials = study.get_trials(deepcopy=False)
    taken = [t.params for t in trials if t.state in (*FINISHED, TrialState.RUNNING)]
    queued = [t.params for t in trials if t.state == TrialState.WAITING]
    for t in trials:
        if t.state == TrialState.FAIL and t.params and t.params not in taken and t.params not in queued:
            study.enqueue_trial(t.params)
            queued.append(t.params)
