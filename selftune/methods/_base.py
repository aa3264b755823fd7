"""The interface every tuning method answers to, and the result it returns."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..store import RunStore


@dataclass
class MethodResult:
    """What a method returned on one task and seed.

    Attributes:
        method, seed: which.
        test_loss, test_accuracy: of the model the method returns (the best trial's, for searches).
        test_metrics: the task's own metrics (``metrics=`` of a ``[task]`` or ``SelfTuner``) of that model on
            the test split, by name: the bench judges the loss, and a loss can win where a metric the user
            cares about loses (an over-regularised multi-label net: lower cross-entropy, F1 halved).
        val_loss: the validation loss the method selected on.
        hparams: the final (or best) hyperparameters.
        examples: training examples forwarded + backwarded, summed over every trial (pruned included).
        seconds: wall-clock seconds of training, summed over trials.
        trials: full or partial training runs the method used (1 for single-run methods).
        run_id: store id of the run (single-run methods and PBT's best member).
        study: Optuna study name (searches), in the same database as the store.
        curve: ``(examples so far, best test loss so far)`` after each trial, for compute plots.
        start: the named benchmark start the run began from (``""``: the method samples the whole
            space, so it has no start).
        start_values: the hyperparameters of its start, as named (``[bench.starts.NAME]``).
        began: the values the run itself began from, where they differ: a tuning method starts an init on
            a bound 2% of the range inside (:meth:`~selftune.SelfTuner.fit`), and how far it moved is
            measured from there (``{}``: as ``start_values``).
        failed: why the run failed (a divergence past ``max_divergences``); ``""`` when it finished.
            A failed run has no model: its losses are NaN and benchmark tables count it apart.
    """

    method: str
    seed: int
    test_loss: float
    test_accuracy: float
    val_loss: float
    hparams: dict[str, Any]
    examples: int
    seconds: float
    trials: int = 1
    run_id: int | None = None
    study: str | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)
    start: str = ""
    start_values: dict[str, Any] = field(default_factory=dict)
    failed: str = ""
    began: dict[str, Any] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def own_metrics(test: dict[str, Any]) -> dict[str, float]:
    """The task's own metrics in a split's scores (``loss`` and ``accuracy`` have fields of their own)."""
    return {k: float(v) for k, v in test.items() if k not in ("loss", "accuracy")}


@dataclass
class Context:
    """Where and how much a method may run.

    Attributes:
        store: the run store (searches keep their Optuna studies in its database).
        folder: the benchmark folder; a method writes under ``runs/``, ``checkpoints/``, ``ray/`` there.
        label: names this task and budget (study names, Ray experiment names), e.g. ``digits-mlp-quick``.
        trials: trials of a search.
        population: members of a population method.
        start: name of the benchmark start being run (part of each run's folder name), or ``""``.
        progress: where a method says what it waits for (a search sharing its study with another process)
            or what it kept of an earlier benchmark.
        fresh: train every single run anew, keeping nothing an earlier benchmark in the folder finished.
        trained: store ids of the single runs this benchmark has trained or kept so far (shared by the
            contexts of its starts: a ``-replay`` method takes its tuning run from there, ``fresh`` or not).
    """

    store: RunStore
    folder: Path
    label: str
    trials: int = 20
    population: int = 8
    start: str = ""
    progress: Callable[[str], None] | None = None
    fresh: bool = False
    trained: set[int] = field(default_factory=set)

    def run_folder(self, method: str, seed: int) -> Path:
        start = f"{self.start}-" if self.start else ""
        return self.folder / "runs" / f"{method}-{start}seed{seed}"


class Method(ABC):
    """A way to tune a task. The harness and the CLI call :meth:`run` and nothing else.

    Attributes:
        name: registry key (``selftune bench --methods NAME``).
        schedule: its result carries a hyperparameter schedule worth plotting beside the others'.
    """

    #: The result depends on the space's init values (single runs); searches and PBT sample the space.
    uses_start: bool = False
    #: Run by ``selftune bench`` when no ``--methods`` are named (variants that repeat another
    #: method's work, like ``delta-stn-replay``, run only when asked for).
    by_default: bool = True

    def __init__(self, name: str, *, schedule: bool = False) -> None:
        self.name, self.schedule = name, schedule

    def unusable(self, config: RunConfig) -> str | None:
        """Why this method cannot run ``config`` (``None``: it can), e.g. a learning-rate tuner on a
        config whose learning rate is a number."""
        return None

    def budget(self, ctx: Context) -> str:
        """What one run of this method costs, in words (for progress lines)."""
        return ""

    def trials(self, ctx: Context) -> int:
        """Training runs the method uses (for tables)."""
        return 1

    @abstractmethod
    def run(self, config: RunConfig, seed: int, ctx: Context) -> MethodResult:
        """Tune ``config`` with ``seed``; every run it trains has the config's epochs and splits."""


def began_from(extra: dict[str, Any], config: RunConfig) -> dict[str, float]:
    """The values a recorded run began from, by name (``RunResult.extra["start"]``, its log's start: an init
    on a bound pulled inside); ``{}`` for a result without them."""
    start = extra.get("start") or {}
    return {n: float(start[n]) for n in config.space if n in start}
