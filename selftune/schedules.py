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
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

__all__ = ["ScheduleSettings", "factor"]


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
    if step < warm:
        return (step + 1) / warm
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
