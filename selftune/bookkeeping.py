"""The loop's bookkeeping, apart from the learning: where the data order stands, and what was logged.

:class:`BatchOrder` is the position in the data (epoch, batch, the permutations, the validation
cursor); :class:`RunLog` is what the run has recorded (counters, running loss sums, trajectory and
epoch rows, wall-clock seconds). Each has its own ``state_dict`` so a checkpoint restores both
exactly, and each is restored as a whole on a divergence roll-back: the tuner owns the one
roll-back point, and recorders read rows from the log instead of keeping copies of their own.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["BatchOrder", "Counters", "RunLog"]


class BatchOrder:
    """Epoch and batch position, the epoch's permutation, and the validation cursor.

    Every permutation is drawn from the generator passed in, so the order is reproducible from the
    seed and a restored order continues exactly.
    """

    def __init__(self, n_train: int, n_val: int, batch_size: int, val_batch_size: int, *,
                 drop_last: bool = False, fold_single: bool = False,
                 weights: tuple[torch.Tensor, int, bool] | None = None) -> None:
        #: a DataLoader's WeightedRandomSampler ``(weights, num_samples, replacement)``: an epoch is then
        #: ``num_samples`` examples drawn by weight (as the sampler draws them), not a permutation
        self.weights = weights
        #: examples in the training set; ``n_train`` is those an epoch draws (the same unless weighted)
        self.n_data = n_train
        if weights is not None:
            n_train = weights[1]
        self.n_train, self.n_val = n_train, n_val
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        #: an epoch ends where fewer than a batch's examples are left (``tuner.drop_last``)
        self.drop_last = drop_last
        #: a single example left after a batch joins that batch (a model that cannot train on one example)
        self.fold_single = fold_single and not drop_last
        #: batches of an epoch at the starting batch size (the unit of planned steps and schedules)
        whole = n_train // batch_size
        self.batches_per_epoch = max(1, whole if drop_last or (self.fold_single and n_train % batch_size == 1)
                                     else math.ceil(n_train / batch_size))
        self.epoch = 0
        self.batch = 0
        self.pos = 0  # examples of this epoch's permutation drawn so far (the batch size may grow mid-epoch)
        self.perm: torch.Tensor | None = None
        self.val_perm: torch.Tensor | None = None
        self.val_pos = 0

    @staticmethod
    def _randperm(n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randperm(n, generator=generator, device=generator.device).cpu()

    @property
    def epoch_examples(self) -> int:
        """Training examples an epoch trains on: all of them, less a short last batch ``drop_last`` drops."""
        return self.n_train - self.n_train % self.batch_size if self.drop_last else self.n_train

    def steps_left(self, pos: int) -> int:
        """Weight steps of an epoch from position ``pos`` on, at the current batch size."""
        left = max(self.n_train - pos, 0)
        if self.drop_last:
            return left // self.batch_size
        steps = math.ceil(left / self.batch_size)
        return steps - 1 if self.fold_single and steps > 1 and left % self.batch_size == 1 else steps

    @property
    def epoch_done(self) -> bool:
        return self.pos >= self.n_train or (self.drop_last and self.n_train - self.pos < self.batch_size)

    def next_train(self, generator: torch.Generator) -> torch.Tensor:
        """Indices of the next training batch (a new permutation at the start of each epoch)."""
        if self.perm is None:
            if self.weights is None:
                self.perm = self._randperm(self.n_train, generator)
            else:
                weights, n, replacement = self.weights
                self.perm = torch.multinomial(weights.to(generator.device), n, replacement, generator=generator).cpu()
        index = self.perm[self.pos:self._train_stop()]
        self.pos += len(index)
        self.batch += 1
        return index

    def _train_stop(self) -> int:
        stop = self.pos + self.batch_size
        if self.fold_single and self.n_train - stop == 1 and stop > self.pos + 1:
            stop += 1  # (a single example left would make a batch of one: it joins this one)
        return stop

    def peek_train(self) -> torch.Tensor | None:
        """Indices :meth:`next_train` will give next if nothing changes before (the batch size, a roll-back),
        without drawing anything; ``None`` where they are not known yet (a new epoch's permutation is drawn
        by that call). What the tuner's workers fetch ahead while a step trains."""
        if self.perm is None or self.epoch_done:
            return None
        return self.perm[self.pos:self._train_stop()]

    def next_val(self, generator: torch.Generator) -> torch.Tensor:
        """Indices of the next validation batch (cycling through reshuffled permutations)."""
        size = self.val_batch_size
        if self.val_perm is None or self.val_pos + size > self.n_val:
            self.val_perm = self._randperm(self.n_val, generator)
            self.val_pos = 0
        index = self.val_perm[self.val_pos:self.val_pos + size]
        self.val_pos += size
        return index

    def end_epoch(self) -> None:
        self.epoch += 1
        self.batch = self.pos = 0
        self.perm = None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "perm": self.perm, "val_perm": self.val_perm,
                "val_pos": self.val_pos, "pos": self.pos, "batch_size": self.batch_size,
                "n_train": self.n_train, "n_val": self.n_val, "n_data": self.n_data}

    def mismatch(self, state: dict[str, Any]) -> str | None:
        """Why ``state`` cannot continue in this order (it was drawn over other training or validation
        sets: a permutation of other indices would hang the epoch or index past the data), or ``None``."""
        for what, mine, saved in (
                ("training", self.n_data, state.get("n_data")),
                ("training", self.n_train, state.get("n_train", None if state.get("perm") is None
                                                    else len(state["perm"]))),
                ("validation", self.n_val, state.get("n_val", None if state.get("val_perm") is None
                                                     else len(state["val_perm"])))):
            if saved is not None and int(saved) != mine:
                return f"it was saved by a run on {int(saved)} {what} examples, this tuner has {mine}"
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.batch_size = int(state.get("batch_size", self.batch_size))
        self.pos = int(state.get("pos", min(self.batch * self.batch_size, self.n_train)))
        self.perm, self.val_perm, self.val_pos = state["perm"], state["val_perm"], int(state["val_pos"])


@dataclass
class Counters:
    """Compute so far: training examples (forward + backward, hyper steps and batch-size tests
    included), evaluation examples (forward only), wall-clock seconds of training, weight steps and
    hyper steps."""

    examples: int = 0
    eval_examples: int = 0
    seconds: float = 0.0
    steps: int = 0
    hyper_steps: int = 0
    #: examples the adaptive batch's gradient-noise tests forwarded and backwarded (included in ``examples``)
    test_examples: int = 0


@dataclass
class _Sums:
    train: float = 0.0
    train_n: int = 0
    val: float = 0.0
    val_n: int = 0
    epoch: float = 0.0
    epoch_n: int = 0
    point: float = 0.0  # training losses since the last roll-back point (SelfTuner.snapshot)
    point_n: int = 0


#: Roll-back points whose mean training loss and weight norm a new point is compared with (the lowest of them).
HEALTH_WINDOW = 4
#: A stretch is a blow-up only if the weights' norm also grew past this multiple of the window's lowest.
#: Why both: a training loss also rises for good reasons, which leave the norm alone or shrink it (a weight
#: decay tuned up 1e4-fold: the loss 100-200x its low; a loss near zero that is noisy: 30-44x; 9% of the
#: epochs of 81 held-out runs broke a 2x loss rule, none of them diverging); a blow-up inflates both
#: (measured: loss 7 -> 10 -> 17 -> 42, norm 18 -> 22 -> 33 -> 49 per epoch before the overflow).
NORM_GROWTH = 1.5


@dataclass
class RunLog:
    """What the run has recorded: counters, the running loss sums, trajectory rows (every
    ``log_every`` steps) and epoch rows.

    Seconds run on a clock started by :meth:`start_clock`, and :meth:`state_dict` includes the time
    elapsed so far, so a checkpoint taken mid-fit carries the time up to that checkpoint and a run
    resumed from it counts the sum of its pieces.
    """

    counters: Counters = field(default_factory=Counters)
    sums: _Sums = field(default_factory=_Sums)
    trajectory: list[dict[str, float]] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    divergences: int = 0
    #: roll-backs since the run last got past the furthest step where one of them diverged (the limit
    #: ``max_divergences`` applies to these: a run that recovers each time goes on), and that step
    streak: int = 0
    diverged_at: int = -1
    #: per hyperparameter: has any hyper step given it a non-zero gradient? (for the run's explanation)
    hypergrad_seen: list[bool] = field(default_factory=list)
    #: declared hyperparameters that nothing in the model, loss or augmentation read (None: not checked yet)
    idle: list[str] | None = None
    #: hyperparameter values when the run started (before its first step), and ``weights_lr``: the rate of that step
    start: dict[str, float] = field(default_factory=dict)
    #: how the hyper learning rate was chosen: ``{"lr", "planned_steps", "travel", "rule"}`` (empty: not tuning)
    hyper_lr: dict[str, Any] = field(default_factory=dict)
    #: what an algorithm keeps between hyper steps (the implicit method's Neumann step size), checkpointed
    algorithm: dict[str, Any] = field(default_factory=dict)
    #: mean training loss between consecutive roll-back points, the last :data:`HEALTH_WINDOW` of them
    point_losses: list[float] = field(default_factory=list)
    #: the weights' norm at those points
    point_norms: list[float] = field(default_factory=list)
    #: the run's first training loss (the untrained network's, on its first batch) and the weights' norm
    #: before its first step: what the first stretch, which has no earlier one, is judged against (and
    #: only it: later ones are judged against their own window)
    first_loss: float | None = None
    start_norm: float | None = None
    #: the latest step's rate for a full batch of the size it drew (``SelfTuner._short_batch_factor``): what
    #: trajectory rows and a schedule's last row record
    end_lr: float | None = None
    #: the verdict of the latest judged stretch (:meth:`close_interval`), that verdict with the validation loss's
    #: (``val_healthy``), and where that point was (steps, epoch)
    train_healthy: bool = True
    healthy: bool = True
    last_point: tuple[int, int] | None = None
    #: the untrained network's validation loss (``tuner.rollback_val_ratio``; None: not scored), the multiple of
    #: it the run judges by (0: off), the epoch where the rule stopped acting after too many roll-backs in a
    #: row (None: it did not), and whether the latest epoch's validation loss left its state fit to be a
    #: roll-back point
    val_reference: float | None = None
    val_ratio: float = 0.0
    val_gave_up: int | None = None
    val_healthy: bool = True
    _clock: float | None = None

    # -- time ----------------------------------------------------------------------------------------
    def start_clock(self) -> None:
        self._clock = time.perf_counter()

    def stop_clock(self) -> None:
        self.counters.seconds = self.seconds
        self._clock = None

    @property
    def seconds(self) -> float:
        """Training seconds so far, the running fit included."""
        extra = time.perf_counter() - self._clock if self._clock is not None else 0.0
        return self.counters.seconds + extra

    # -- losses --------------------------------------------------------------------------------------
    def add_train_loss(self, loss: float) -> None:
        if self.counters.steps == 0 and (self.first_loss is None or not math.isfinite(self.first_loss)):
            self.first_loss = float(loss)
        s = self.sums
        s.train += loss
        s.train_n += 1
        s.epoch += loss
        s.epoch_n += 1
        s.point += loss
        s.point_n += 1

    def close_interval(self, ratio: float, norm: float) -> bool | None:
        """End the stretch of training since the previous roll-back point, whose weights have norm ``norm``;
        is the state at its end a healthy one to roll back to? ``None``: no training step since that point,
        so nothing to judge.

        Unhealthy: a mean training loss that is not finite, or one above ``ratio`` times the lowest mean of
        the previous :data:`HEALTH_WINDOW` stretches while the weights' norm is above :data:`NORM_GROWTH`
        times the lowest norm of those points. Why: divergence is
        detected when a value turns non-finite, which a loss that grows geometrically reaches only after it
        has inflated the weights for several epochs (measured on a held-out task, SGD at 0.05 with 0.8
        dropout: training loss 7, 10, 17, 42, 120, 1,899 per epoch, weight norm 18 -> 384 -> 1.9e17, then
        NaN); rolling back to the last finite state and halving the rate then diverges again from it every
        time, while a state from before the growth recovers at half the rate. The window, rather than the
        run's best, lets a loss that rises for a good reason (regularisation tuned up) become the new normal
        after a few points. A loss that is not positive cannot be judged by a ratio: only a non-finite one
        is then unhealthy, as before this rule. The first stretch of a run is judged against the run's start
        (its first training loss and the weights' norm before the first step): a rate far too large that blew
        the weights up within the first epoch made that epoch's end the roll-back point, so every roll-back
        landed on broken weights and the run failed where going back to the start at a lower rate trains."""
        s = self.sums
        if s.point_n == 0:
            if not self.point_norms and self.start_norm is None and math.isfinite(norm):  # the run's start
                self.start_norm = norm
            return None
        mean = s.point / s.point_n
        losses = [v for v in self.point_losses if math.isfinite(v)]
        norms = [v for v in self.point_norms if math.isfinite(v)]
        if not self.point_losses:  # the first stretch: against the untrained network
            losses = [self.first_loss] if self.first_loss is not None and math.isfinite(self.first_loss) else []
            norms = [self.start_norm] if self.start_norm is not None else []
        lowest = min(losses) if losses else math.inf
        grew = lowest > 0 and mean > ratio * lowest and bool(norms) and norm > NORM_GROWTH * min(norms)
        healthy = math.isfinite(mean) and math.isfinite(norm) and not grew
        self.point_losses = [*self.point_losses, mean][-HEALTH_WINDOW:]
        self.point_norms = [*self.point_norms, norm][-HEALTH_WINDOW:]
        s.point, s.point_n = 0.0, 0
        return healthy

    def add_val_loss(self, loss: float) -> None:
        self.sums.val += loss
        self.sums.val_n += 1

    def log_row(self, epoch: int, hparams: dict[str, float]) -> dict[str, float]:
        """Append and return a trajectory row: mean losses since the previous row, current hparams."""
        s = self.sums
        row: dict[str, float] = {"step": self.counters.steps, "epoch": epoch, **hparams,
                                 "train_loss": s.train / s.train_n if s.train_n else math.nan,
                                 "val_loss": s.val / s.val_n if s.val_n else math.nan}
        s.train, s.train_n, s.val, s.val_n = 0.0, 0, 0.0, 0
        self.trajectory.append(row)
        return row

    def epoch_row(self, epoch: int, val: dict[str, float], hparams: dict[str, float]) -> dict[str, float]:
        """Append and return the row of the epoch that just ended (``epoch`` counts from 1); ``val``'s
        metrics (``loss``, ``accuracy``, the user's) become ``val_<name>`` columns."""
        s = self.sums
        row: dict[str, float] = {"epoch": epoch, "step": self.counters.steps,
                                 "train_loss": s.epoch / max(s.epoch_n, 1),
                                 **{f"val_{k}": v for k, v in val.items()}, "seconds": self.seconds, **hparams}
        s.epoch, s.epoch_n = 0.0, 0
        self.history.append(row)
        return row

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        counters = asdict(self.counters)
        counters["seconds"] = self.seconds
        return {"counters": counters, "sums": asdict(self.sums), "divergences": self.divergences,
                "streak": self.streak, "diverged_at": self.diverged_at,
                "hypergrad_seen": list(self.hypergrad_seen), "idle": self.idle, "start": dict(self.start),
                "hyper_lr": dict(self.hyper_lr), "algorithm": dict(self.algorithm),
                "point_losses": list(self.point_losses), "point_norms": list(self.point_norms),
                "first_loss": self.first_loss, "start_norm": self.start_norm, "end_lr": self.end_lr,
                "train_healthy": self.train_healthy, "healthy": self.healthy,
                "last_point": None if self.last_point is None else list(self.last_point),
                "val_reference": self.val_reference, "val_ratio": self.val_ratio, "val_gave_up": self.val_gave_up,
                "val_healthy": self.val_healthy,
                "trajectory": [dict(r) for r in self.trajectory], "history": [dict(r) for r in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counters = Counters(**state["counters"])
        self.sums = _Sums(**state["sums"])
        self.divergences = int(state["divergences"])
        # a checkpoint from before the limit counted roll-backs in a row: every roll-back then was one
        self.streak = int(state.get("streak", self.divergences))
        self.diverged_at = int(state.get("diverged_at", -1))
        self.hypergrad_seen = list(state.get("hypergrad_seen", self.hypergrad_seen))
        self.idle = state.get("idle")
        self.start = dict(state.get("start", {}))
        self.hyper_lr = dict(state.get("hyper_lr", {}))
        self.algorithm = dict(state.get("algorithm", {}))
        self.point_losses = [float(v) for v in state.get("point_losses", [])]
        self.point_norms = [float(v) for v in state.get("point_norms", [])]
        first = state.get("first_loss")  # None in a checkpoint from before: the first stretch is unjudged
        self.first_loss = None if first is None else float(first)
        start = state.get("start_norm")
        self.start_norm = None if start is None else float(start)
        end = state.get("end_lr")
        self.end_lr = None if end is None else float(end)
        self.healthy = bool(state.get("healthy", True))
        self.train_healthy = bool(state.get("train_healthy", self.healthy))
        last = state.get("last_point")
        self.last_point = None if last is None else (int(last[0]), int(last[1]))
        reference = state.get("val_reference")  # None in a checkpoint from before the rule: it stays off
        self.val_reference = None if reference is None else float(reference)
        self.val_ratio = float(state.get("val_ratio", 0.0))
        gave_up = state.get("val_gave_up")
        self.val_gave_up = None if gave_up is None else int(gave_up)
        self.val_healthy = bool(state.get("val_healthy", True))
        self.trajectory = [dict(r) for r in state["trajectory"]]
        self.history = [dict(r) for r in state["history"]]
        if self._clock is not None:  # loaded mid-fit (a roll-back): the clock restarts from the loaded time
            self._clock = time.perf_counter()
