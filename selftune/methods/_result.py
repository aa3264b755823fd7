"""The common result of every tuning method."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class MethodResult:
    """What a method returned on one task and seed.

    Attributes:
        method, seed: which.
        test_loss, test_accuracy: of the model the method returns (the best trial's, for searches).
        val_loss: the validation loss the method selected on.
        hparams: the final (or best) hyperparameters.
        examples: training examples forwarded + backwarded, summed over every trial (pruned included).
        seconds: wall-clock seconds of training, summed over trials.
        trials: full or partial training runs the method used (1 for single-run methods).
        run_id: store id of the run (single-run methods).
        study: Optuna study name (searches), in the same database as the store.
        curve: ``(examples so far, best test loss so far)`` after each trial, for compute plots.
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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
