"""Learning-rate schedules: a factor of the base rate at every weight step.

A schedule multiplies whatever rate the weights have: the number in ``[tuner] lr``, or the rate a
hypergradient tunes (``[tuner] lr = "name"``, :mod:`selftune.hd`), which then sets the level while
the schedule sets the shape (``d log(base * factor) = d log(base)``, so the hypergradient is the
same). Roll-backs halve the base, never the factor. The factor depends only on the step and the
planned run length, so a resumed run follows the same curve.

Kinds (``[tuner.schedule] kind``), with ``t`` the share of the post-warm-up steps done (0 to 1):

* ``constant``: 1.
* ``cosine``: ``final + (1 - final) (1 + cos(pi t)) / 2`` (Loshchilov & Hutter's annealing).
* ``cosine_power``: sharpDARTS' cosine power annealing (Hundt et al. 2019, ahundt/sharpDARTS):
  with ``c = (1 + cos(pi t)) / 2`` and base ``p = power``, the shape ``(p^(c+1) - p) / (p^2 - p)``
  goes from 1 to 0, faster than cosine early and slower late; ``p = 1`` is cosine. The official code
  evaluates it on epochs 1..E and rescales by the sampled extremes (its first epoch gets the full rate);
  here it is continuous over steps, 1 at the first post-warm-up step and ``final`` after the last.
* ``step``: ``gamma ** floor(epochs done / step_epochs)``.

``warmup_epochs`` first ramps the factor linearly, ``(step + 1) / warm-up steps``, as sharpDARTS'
warm-up does per epoch.

:class:`HyperSchedule` is the other kind of schedule: every hyperparameter's value (and the weights'
rate) over the steps of a run, as a tuning run recorded it. A plain training loop can follow it
(:meth:`HyperSchedule.at`), and ``[tuner] follow`` makes a ``fixed`` run follow it: the STN paper's
protocol of re-training from scratch on the tuned schedule (``selftune replay``).

:class:`TorchSchedule` lets a ``torch.optim.lr_scheduler`` class (``[tuner] lr_scheduler``) give the
factor instead of the kinds above.
"""

from __future__ import annotations

import bisect
import csv
import inspect
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from .errors import ConfigError, from_validation

__all__ = ["HyperSchedule", "ScheduleSettings", "TorchSchedule", "factor", "lr_scheduler_class"]


class ScheduleSettings(BaseModel):
    """``[tuner.schedule]``: the shape of the weights' learning rate over the run."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    kind: Literal["constant", "cosine", "cosine_power", "step"] = "constant"
    final: float = Field(0.0, ge=0.0, le=1.0, description="cosine, cosine_power: the last factor (share of the base)")
    power: float = Field(10.0, ge=1.0, description="cosine_power: the exponent base (sharpDARTS' exponent_order; "
                                                    "1 is plain cosine, larger decays faster early)")
    warmup_epochs: float = Field(0.0, ge=0.0, description="linear warm-up from 0 over this many epochs")
    step_epochs: PositiveInt = Field(30, description="step: epochs between two multiplications by gamma")
    gamma: PositiveFloat = Field(0.1, description="step: the factor applied every step_epochs")


def factor(schedule: ScheduleSettings, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The factor of the base rate at weight step ``step`` (0-based) of a run of ``total_steps``."""
    warm = schedule.warmup_epochs * steps_per_epoch
    if step < warm:  # linear to the base rate, never past it (a fractional warm-up ends mid-step)
        return min((step + 1) / warm, 1.0)
    kind = schedule.kind
    if kind == "constant":
        return 1.0
    if kind == "step":
        return schedule.gamma ** math.floor((step / steps_per_epoch) / schedule.step_epochs)
    t = min(max((step - warm) / max(total_steps - warm, 1.0), 0.0), 1.0)
    c = (1 + math.cos(math.pi * t)) / 2
    if kind == "cosine_power" and schedule.power > 1:
        p = schedule.power
        c = (p ** (c + 1) - p) / (p * p - p)
    return schedule.final + (1 - schedule.final) * c


#: Scheduler classes that wrap other schedulers (they need scheduler objects, not arguments) or are bases.
_NOT_NAMEABLE = {"LRScheduler", "_LRScheduler", "SequentialLR", "ChainedScheduler"}


def lr_scheduler_class(name: str) -> type:
    """The ``torch.optim.lr_scheduler`` class called ``name`` (any case).

    Raises:
        ValueError: no such scheduler (the message lists them).
    """
    from torch.optim import lr_scheduler

    classes = {n.lower(): c for n, c in vars(lr_scheduler).items()
               if isinstance(c, type) and issubclass(c, lr_scheduler.LRScheduler) and n not in _NOT_NAMEABLE}
    try:
        return classes[name.lower()]
    except KeyError:
        names = sorted(c.__name__ for c in classes.values())
        raise ValueError(f"unknown learning-rate scheduler {name!r}; choose a torch.optim.lr_scheduler class: "
                         f"{', '.join(names)}") from None


class TorchSchedule:
    """A ``torch.optim.lr_scheduler`` class as the factor of the weights' rate.

    Why not attach the scheduler to the weights' optimizer: the tuner owns each group's rate (a tuned
    rate moves every step, a roll-back halves it, Delta-STN has two optimizers), and a scheduler that
    writes ``group["lr"]`` itself would undo those. Here the scheduler runs on a stand-in optimizer that
    starts at the run's rate, and the tuner trains at ``base x stand-in rate / starting rate``: exactly
    the scheduler's curve for a plain run (absolute arguments such as OneCycleLR's ``max_lr`` keep their
    meaning), and the same shape on top of a tuned or lowered rate.

    Args:
        name: the class name (any case).
        args: its keyword arguments; ``total_steps`` (OneCycleLR) and ``T_max`` (CosineAnnealingLR)
            default to ``total``, and ``cycle_momentum`` to ``False``.
        initial_lr: the run's starting rate.
        total: the run's length in the scheduler's steps (epochs or weight steps).
    """

    def __init__(self, name: str, args: dict[str, Any], *, initial_lr: float, total: int) -> None:
        import torch
        from torch.optim import lr_scheduler

        cls = lr_scheduler_class(name)
        args = dict(args)
        for key in self.planned_arguments(name, args):
            args[key] = max(int(total), 1)
        if "cycle_momentum" in inspect.signature(cls.__init__).parameters:
            args.setdefault("cycle_momentum", False)
        self.initial = float(initial_lr)
        self._param = torch.nn.Parameter(torch.zeros(()))
        self.optimizer = torch.optim.SGD([self._param], lr=self.initial)
        self.scheduler = cls(self.optimizer, **args)
        self.plateau = isinstance(self.scheduler, lr_scheduler.ReduceLROnPlateau)

    @staticmethod
    def planned_arguments(name: str, args: dict[str, Any]) -> list[str]:
        """The arguments the run's length fills in where ``args`` leaves them out: OneCycleLR's
        ``total_steps`` (unless ``epochs`` is given), CosineAnnealingLR's ``T_max``."""
        takes = set(inspect.signature(lr_scheduler_class(name).__init__).parameters)
        keys = []
        if "total_steps" in takes and args.get("total_steps") is None and args.get("epochs") is None:
            keys.append("total_steps")
        if "T_max" in takes and "T_max" not in args:
            keys.append("T_max")
        return keys

    @property
    def factor(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"]) / self.initial

    @classmethod
    def rehearse(cls, name: str, args: dict[str, Any], *, initial_lr: float, total: int,
                 steps: int | None = None) -> None:
        """Step a copy through the whole run before it starts: arguments a constructor accepts may still fail
        when stepped (StepLR's ``step_size = 0``, a OneCycleLR shorter than the run) or give a negative rate
        (ExponentialLR's ``gamma < 0``), which would stop or reverse the run after it was recorded.
        ``steps``: step that many times a schedule planned for ``total`` (a later fit past the plan).

        Raises:
            ValueError: what failed, and at which of its ``total`` steps.
        """
        schedule = cls(name, args, initial_lr=initial_lr, total=total)
        total = total if steps is None else steps
        for step in range(1, max(int(total), 1) + 1):
            try:
                schedule.step(1.0)
            except (ValueError, ZeroDivisionError, TypeError, IndexError) as err:
                raise ValueError(f"it fails at step {step} of the run's {total}: "
                                 f"{' '.join(str(err).split()) or type(err).__name__}") from None
            if not (schedule.factor >= 0.0 and math.isfinite(schedule.factor)):
                raise ValueError(f"it gives the rate {schedule.factor * initial_lr:g} at step {step} of the run's "
                                 f"{total}; a rate must be finite and >= 0")

    def step(self, metric: float | None = None) -> None:
        """Advance one scheduler step (``metric``: the validation loss, for ReduceLROnPlateau)."""
        self.optimizer.step()  # no gradient: nothing moves, but PyTorch sees the order it expects
        if self.plateau:
            self.scheduler.step(metric)
        else:
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(), "lr": float(self.optimizer.param_groups[0]["lr"]),
                "initial": self.initial}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.optimizer.param_groups[0]["lr"] = float(state["lr"])
        self.initial = float(state["initial"])


#: the CSV column of the weights' learning rate (as in ``epochs.csv``): ``lr`` is the name configs give
#: the hyperparameter a tuned rate is bound to, whose values are a column of their own
RATE_COLUMN = "weights_lr"


def stayed(start: Mapping[str, Any], end: Mapping[str, Any], end_lr: float | None) -> bool:
    """Whether ``end`` (a run's values at some step: an epoch row, its last step) holds the values of
    ``start`` (and its rate ``weights_lr``, where both are known): a run that recorded no trajectory row has
    its start for a schedule only where every such point stayed there."""
    def same(a: Any, b: Any) -> bool:
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)))

    rate = start.get(RATE_COLUMN)
    return all(n in end and same(v, end[n]) for n, v in start.items() if n != RATE_COLUMN) and (
        rate is None or end_lr is None or same(rate, end_lr))


class HyperSchedule(BaseModel):
    """Hyperparameter values (and the weights' learning rate) over the steps of a run.

    Row ``k`` applies from weight step ``steps[k]`` (0-based: the number of steps taken before it)
    until the next row's step; the last row holds to the end. A tuning run's schedule
    (:attr:`selftune.FitResult.schedule`, ``schedule.csv`` in its output folder) has one row at step
    0 with the starting values and one per trajectory row (every ``log_every`` steps) with the values
    the hyper steps had reached, and ``lr`` the rate the weights trained at in the last step the row
    holds for (every step's own rate at ``log_every = 1``).

    Attributes:
        steps: first step of each row, strictly increasing from 0.
        values: ``{name: [value per row]}`` in the space's units (integers may be fractional; they are
            rounded where applied, as during tuning).
        lr: the weights' learning rate per row, or ``None`` to keep the run's own rate.
        steps_per_epoch: weight steps per epoch of the run that recorded it (for the ``epoch`` column).
        source: where it came from (a run's UUID, a file), for records.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, steps: Any = None, values: Any = None, /, **data: Any) -> None:
        """``HyperSchedule(steps, values, lr=...)`` as documented (pydantic alone takes keywords only); a
        schedule that is not consistent is a one-line :class:`~selftune.errors.ConfigError` naming
        ``tuner.follow.<field>``, as a config's ``[tuner.follow]`` gets (pydantic's own is several lines)."""
        for name, value in (("steps", steps), ("values", values)):
            if value is not None:
                data[name] = value
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise from_validation(err, prefix="tuner.follow") from None

    steps: list[NonNegativeInt]
    values: dict[str, list[float]]
    lr: list[NonNegativeFloat] | None = None  # a torch scheduler may end at exactly 0
    steps_per_epoch: PositiveInt | None = None
    source: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> HyperSchedule:
        if not self.steps or self.steps[0] != 0:
            raise ValueError("steps must start at 0 (the first row holds the starting values)")
        if any(b <= a for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise ValueError("steps must be strictly increasing")
        n = len(self.steps)
        for name, column in (*self.values.items(), *((("lr", self.lr),) if self.lr is not None else ())):
            if len(column) != n:
                raise ValueError(f"{name} has {len(column)} values for {n} steps")
            if not all(math.isfinite(v) for v in column):
                raise ValueError(f"{name} has a value that is not finite")
        return self

    # -- reading ----------------------------------------------------------------------------------
    def _row(self, step: int) -> int:
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be a whole number >= 0, a weight step's 0-based index (got {step!r})")
        return max(bisect.bisect_right(self.steps, step) - 1, 0)

    def at(self, step: int) -> dict[str, float]:
        """The hyperparameter values for weight step ``step`` (0-based)."""
        k = self._row(step)
        return {name: column[k] for name, column in self.values.items()}

    def lr_at(self, step: int) -> float | None:
        """The weights' learning rate for weight step ``step``, or ``None`` if the schedule has none."""
        return None if self.lr is None else self.lr[self._row(step)]

    def rows(self) -> list[dict[str, float]]:
        """One dict per row: ``step``, ``epoch`` (fractional, when steps per epoch are known), the
        values and ``weights_lr`` (the weights' rate; not ``lr``, which a space may declare as the
        hyperparameter it binds the rate to): what ``to_csv`` writes."""
        out = []
        for k, step in enumerate(self.steps):
            row: dict[str, float] = {"step": step}
            if self.steps_per_epoch:
                row["epoch"] = step / self.steps_per_epoch
            row.update({name: column[k] for name, column in self.values.items()})
            if self.lr is not None:
                row[RATE_COLUMN] = self.lr[k]
            out.append(row)
        return out

    # -- building ---------------------------------------------------------------------------------
    @classmethod
    def from_trajectory(cls, start: Mapping[str, float], trajectory: Sequence[Mapping[str, Any]],
                        names: Sequence[str], *, steps_per_epoch: int | None = None,
                        source: str = "", end_lr: float | None = None) -> HyperSchedule:
        """A run's schedule from its starting values (and ``weights_lr``, the first step's rate, where
        known) and trajectory rows (``step``, each name and ``weights_lr``, as :class:`~selftune.FitResult`
        and the store keep them); ``end_lr``: the rate of the run's last step, which the last row holds to."""
        rows = [r for r in trajectory if int(r["step"]) > 0]
        steps = [0, *(int(r["step"]) for r in rows)]
        values = {n: [float(start[n]), *(float(r[n]) for r in rows)] for n in names}
        lr = None
        if rows and all(r.get("weights_lr") not in (None, "") for r in rows):
            # A trajectory row at step s records the rate step s - 1 trained at. The schedule's row k holds
            # for steps s_k to s_{k+1} - 1, so it takes the rate of its last step, which the next trajectory
            # row recorded: exact at log_every = 1 (a follower trains every step at the recorded run's rate;
            # taking the row's own record put every step one step behind, low all through a warm-up). At a
            # coarser resolution a row holds the rate its interval ended on, except row 0, which holds the
            # run's first rate (start["weights_lr"], where known: where a schedule begins). The last row
            # holds to the run's last step, whose rate ``end_lr`` is (where known; else the last one recorded:
            # a run whose steps are not a multiple of log_every then replayed its tail at a stale rate).
            recorded = [float(r["weights_lr"]) for r in rows]
            lr = [float(start.get("weights_lr", recorded[0])), *recorded[1:],
                  recorded[-1] if end_lr is None else float(end_lr)]
        elif not rows and start.get("weights_lr") not in (None, ""):  # a run shorter than log_every: one row
            lr = [float(start["weights_lr"])]
        return cls(steps=steps, values=values, lr=lr, steps_per_epoch=steps_per_epoch, source=source)

    # -- files ------------------------------------------------------------------------------------
    def to_csv(self, path: str | Path) -> None:
        """Write the rows as CSV (``step, epoch, <names>, weights_lr``)."""
        rows = self.rows()
        with Path(path).open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    def to_json(self, path: str | Path | None = None) -> str:
        """The schedule as JSON (and written to ``path`` when given)."""
        text = self.model_dump_json(indent=1)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def load(cls, path: str | Path) -> HyperSchedule:
        """Read a schedule from ``.json`` (as :meth:`to_json` writes) or ``.csv`` (a ``step`` column,
        one column per hyperparameter, optional ``epoch`` and ``weights_lr``, the weights' rate). A file
        without ``weights_lr`` may give the rate as ``lr`` (the column's earlier name, and hand-written
        files); with ``weights_lr`` present, ``lr`` is a hyperparameter's column like any other.

        Raises:
            ValueError: a missing or unreadable file, or a schedule that is not consistent (the
                message names the file and the problem).
        """
        path = Path(path)
        rate: str | None = None  # the CSV column the weights' rate came from, if any
        try:
            if path.suffix.lower() == ".json":
                schedule = cls.model_validate_json(path.read_text())
            else:
                with path.open(newline="") as f:
                    table = list(csv.DictReader(f))
                if not table or "step" not in table[0]:
                    raise ValueError("a schedule CSV needs a header with a step column and at least one row")
                rate = RATE_COLUMN if RATE_COLUMN in table[0] else "lr" if "lr" in table[0] else None
                names = [c for c in table[0] if c not in ("step", "epoch", rate)]
                needed = ("step", *names, *([rate] if rate else []))
                for line, r in enumerate(table, start=2):  # a short row reads None, an empty cell ""
                    empty = next((c for c in needed if r.get(c) in (None, "")), None)
                    if empty is not None:
                        raise ValueError(f"line {line} has no value for {empty}")
                lr = [float(r[rate]) for r in table] if rate is not None else None
                steps = [float(r["step"]) for r in table]
                odd = next((v for v in steps if not math.isfinite(v) or v != int(v)), None)
                if odd is not None:
                    raise ValueError(f"step {odd:g} is not a whole number of weight steps")
                # the epoch column (to_csv writes it where steps per epoch are known) gives them back
                per_epoch = {round(int(v) / float(r["epoch"])) for v, r in zip(steps, table, strict=True)
                             if float(r.get("epoch") or 0) > 0} if "epoch" in table[0] else set()
                schedule = cls.model_validate({
                    "steps": [int(v) for v in steps], "values": {n: [float(r[n]) for r in table] for n in names},
                    "lr": lr, "steps_per_epoch": per_epoch.pop() if len(per_epoch) == 1 else None})
        except OSError as err:
            raise ValueError(f"cannot read schedule {str(path)!r}: {err.strerror}") from None
        except ValidationError as err:  # pydantic's own text carries the whole input and a link: say what is wrong
            first = err.errors()[0]
            raised = first.get("ctx", {}).get("error")
            column = RATE_COLUMN if rate == RATE_COLUMN else "lr"  # what the file calls the rate
            if isinstance(raised, ConfigError):  # the constructor's one line, naming tuner.follow.<field>[row]
                parts = re.sub(r"\[(\d+)\]", r".\1", raised.field.removeprefix("tuner.follow")).strip(".").split(".")
                loc, message = [p for p in parts if p], raised.message
            else:
                loc, message = list(first["loc"]), first["msg"].removeprefix("Value error, ")
            where = ".".join(column if part == "lr" and i == 0 else str(part) for i, part in enumerate(loc))
            detail = f"{where}: {message}" if where else message  # steps.3: the fourth row
            raise ValueError(f"schedule {str(path)!r} is not valid: {detail}") from None
        except (ValueError, KeyError, TypeError) as err:
            first = str(err).splitlines()
            detail = " ".join(line.strip() for line in first[-2:]) if len(first) > 1 else str(err)
            raise ValueError(f"schedule {str(path)!r} is not valid: {detail}") from None
        return schedule if schedule.source else schedule.model_copy(update={"source": str(path.resolve())})
