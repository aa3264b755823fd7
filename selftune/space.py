"""Hyperparameter declarations and the transforms between their three representations.

A hyperparameter lives in three forms, and keeping them apart is what makes gradient-based tuning
stable:

* **unconstrained** ``u`` (any real): what the optimizer updates and what gets perturbed, so a step
  can never leave the legal range;
* **unit** ``g = sigmoid(u)`` in (0, 1): the position inside the range, shared by linear, log and
  integer parameters, and the input of the gate encoding;
* **constrained** ``v``: the value a regulariser uses (a dropout rate, a cutout length).

Bounded floats use a stretched sigmoid ``v = low + (high - low) * g`` (log scale: the same in log
space). Integers use the continuous range ``[low - 0.5, high + 0.5]`` so that rounding gives every
integer an equally wide cell; they are rounded only where applied to data (:meth:`Space.discretize`),
while the best-response layers see the continuous value.

Two encodings feed the best-response gates (:data:`ENCODINGS`):

* ``"logit"`` (default): the unconstrained value ``u`` itself, as the official STN and Delta-STN code
  feed it. Its slope is 1 everywhere, so a hyperparameter near a bound (a dropout of 0.05) gets as
  strong a hypergradient as one in the middle of its range, and Delta-STN's centred input
  ``u - lambda`` is exactly the perturbation.
* ``"mip"``: MIP's constant-norm map ``[cos(pi g / 2), sin(pi g / 2)]`` (Ortiz et al. 2023), bounded
  whatever ``u`` is. Its slope ``(pi / 2) g (1 - g)`` is 0.075 at ``g = 0.05``, against 0.39 in the
  middle: near a bound it shrinks the hypergradient ~13x relative to the middle and ~100x relative
  to the logit input's, which measurably kept rates from leaving small values
  (docs/benchmarks/official-delta-stn).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["ENCODINGS", "Encoding", "Float", "Hyperparameter", "Int", "Space"]

Encoding = Literal["logit", "mip"]
ENCODINGS: tuple[str, ...] = ("logit", "mip")

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Keeps the unit value away from 0 and 1 so the inverse transform stays finite for an init on a bound.
_UNIT_EPS = 1e-4


@dataclass(frozen=True)
class Float:
    """A real hyperparameter in ``[low, high]``.

    Args:
        name: identifier used by regularisers to look the value up.
        low, high: bounds (``low < high``); with ``log=True`` both must be positive.
        init: starting value, inside the bounds.
        log: search in log space (learning rates, weight decay).

    Raises:
        ValueError: naming the offending field when bounds or init are invalid.
    """

    name: str
    low: float
    high: float
    init: float
    log: bool = False

    def __post_init__(self) -> None:
        _check_common(self)
        if self.log and self.low <= 0:
            raise ValueError(f"{self.name}.low must be > 0 for a log-scale range (got {self.low})")

    @property
    def is_int(self) -> bool:
        return False

    def _span(self) -> tuple[float, float]:
        if self.log:
            return math.log(self.low), math.log(self.high)
        return float(self.low), float(self.high)


@dataclass(frozen=True)
class Int:
    """An integer hyperparameter in ``[low, high]`` (both included), tuned as a continuous value.

    Args:
        name: identifier used by regularisers to look the value up.
        low, high: integer bounds, ``low < high``.
        init: starting integer, inside the bounds.

    Raises:
        ValueError: naming the offending field.
    """

    name: str
    low: int
    high: int
    init: int

    def __post_init__(self) -> None:
        for field in ("low", "high", "init"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{self.name}.{field} must be an integer (got {value!r})")
        _check_common(self)

    @property
    def is_int(self) -> bool:
        return True

    @property
    def log(self) -> bool:
        return False

    def _span(self) -> tuple[float, float]:
        return self.low - 0.5, self.high + 0.5


Hyperparameter = Float | Int


def _check_common(p: Float | Int) -> None:
    if not isinstance(p.name, str) or not _NAME.match(p.name):
        raise ValueError(f"hyperparameter name {p.name!r} must be an identifier (letters, digits, _)")
    for field in ("low", "high", "init"):
        value = getattr(p, field)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{p.name}.{field} must be a finite number (got {value!r})")
    if not p.low < p.high:
        raise ValueError(f"{p.name}: low ({p.low}) must be smaller than high ({p.high})")
    if not p.low <= p.init <= p.high:
        raise ValueError(f"{p.name}.init ({p.init}) must lie within [{p.low}, {p.high}]")


#: Column names a run's records (trajectory, epochs, schedule.csv) use beside the hyperparameters' own: a
#: hyperparameter of one of these names (or ``val_*``, ``*_scale``) would be overwritten in them silently.
RESERVED = frozenset({"step", "epoch", "train_loss", "seconds", "weights_lr", "batch_size"})


class Space:
    """An ordered set of hyperparameters and the vectorised transforms over all of them.

    Tensors carry hyperparameters in the last dimension, in declaration order, so ``(B, H)``
    per-example values and ``(H,)`` shared values go through the same code.

    Args:
        params: the declarations; names must be unique.

    Raises:
        ValueError: on an empty space, a duplicated name, or a name the run's records reserve
            (:data:`RESERVED`, ``val_*``, ``*_scale``).
        TypeError: on something that is not a :class:`Float` or :class:`Int`.
    """

    def __init__(self, params: Iterable[Float | Int]) -> None:
        self.params: tuple[Float | Int, ...] = tuple(params)
        if not self.params:
            raise ValueError("a space needs at least one hyperparameter")
        seen: set[str] = set()
        for p in self.params:
            if not isinstance(p, Float | Int):
                raise TypeError(f"expected selftune.Float or selftune.Int, got {type(p).__name__}")
            if p.name in seen:
                raise ValueError(f"hyperparameter {p.name!r} is declared twice")
            if p.name in RESERVED or p.name.startswith("val_") or p.name.endswith("_scale"):
                raise ValueError(f"hyperparameter {p.name!r}: the run's records use that name for a column of their "
                                 f"own ({', '.join(sorted(RESERVED))}, val_*, *_scale); rename it")
            seen.add(p.name)
        self._index = {p.name: i for i, p in enumerate(self.params)}
        spans = [p._span() for p in self.params]
        self._lo = torch.tensor([s[0] for s in spans], dtype=torch.float64)
        self._width = torch.tensor([s[1] - s[0] for s in spans], dtype=torch.float64)
        self._log = torch.tensor([p.log for p in self.params])
        self._int = torch.tensor([p.is_int for p in self.params])
        # Bounds of the continuous value, to clamp away float rounding of exp(log(low)).
        self._min = torch.tensor([p.low - 0.5 if p.is_int else p.low for p in self.params], dtype=torch.float64)
        self._max = torch.tensor([p.high + 0.5 if p.is_int else p.high for p in self.params], dtype=torch.float64)
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    # -- container protocol -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.params)

    def __iter__(self) -> Iterator[Float | Int]:
        return iter(self.params)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __getitem__(self, name: str) -> Float | Int:
        return self.params[self.index(name)]

    def __repr__(self) -> str:
        return f"Space({list(self.params)!r})"

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def encoding_width(self, kind: Encoding = "logit") -> int:
        """Width of :meth:`encode`'s output for ``kind``: one feature per hyperparameter for
        ``"logit"``, two for ``"mip"``."""
        if kind not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS} (got {kind!r})")
        return (2 if kind == "mip" else 1) * len(self.params)

    def index(self, name: str) -> int:
        """Position of ``name`` in the last dimension of every tensor of this space.

        Raises:
            LookupError: naming the unknown hyperparameter and the known ones.
        """
        try:
            return self._index[name]
        except KeyError:
            raise LookupError(f"unknown hyperparameter {name!r}; the space has {self.names}") from None

    # -- transforms -----------------------------------------------------------------------------
    def _consts(self, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(lo, width, log, is_int, min, max)`` on ``like``'s device and dtype, cached: the
        transforms run on every training step."""
        key = (like.device, like.dtype)
        cached = self._cache.get(key)
        if cached is None:
            cached = tuple(t.to(device=like.device, dtype=like.dtype) if t.is_floating_point() else t.to(like.device)
                           for t in (self._lo, self._width, self._log, self._int, self._min, self._max))
            self._cache[key] = cached
        return cached

    def to_constrained(self, u: torch.Tensor) -> torch.Tensor:
        """Map unconstrained reals ``(..., H)`` to values inside the declared bounds (differentiable)."""
        lo, width, log, _, vmin, vmax = self._consts(u)
        v = lo + width * torch.sigmoid(u)
        v = torch.where(log, torch.exp(v), v)
        return torch.clamp(v, vmin, vmax)

    def to_unconstrained(self, v: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_constrained`; values on a bound map to a large finite logit."""
        lo, width, log, *_ = self._consts(v)
        v = torch.where(log, torch.log(v.clamp_min(torch.finfo(v.dtype).tiny)), v)
        g = ((v - lo) / width).clamp(_UNIT_EPS, 1 - _UNIT_EPS)
        return torch.logit(g)

    def encode(self, u: torch.Tensor, kind: Encoding = "logit") -> torch.Tensor:
        """Gate input for unconstrained ``u`` ``(..., H)``: ``u`` itself (``"logit"``) or the
        constant-norm ``(..., 2H)`` map (``"mip"``); see the module docstring for the trade-off."""
        if kind == "logit":
            return u
        if kind != "mip":
            raise ValueError(f"encoding must be one of {ENCODINGS} (got {kind!r})")
        angle = (math.pi / 2) * torch.sigmoid(u)
        return torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)

    def discretize(self, v: torch.Tensor) -> torch.Tensor:
        """Round the integer hyperparameters of constrained ``v`` and clamp them to their bounds."""
        lo, width, _, is_int, *_ = self._consts(v)
        rounded = torch.minimum(torch.maximum(torch.round(v), lo + 0.5), lo + width - 0.5)
        return torch.where(is_int, rounded, v)

    def init_unconstrained(self) -> torch.Tensor:
        """The declared ``init`` values as an unconstrained ``(H,)`` float32 tensor."""
        init = torch.tensor([float(p.init) for p in self.params], dtype=torch.float64)
        return self.to_unconstrained(init).float()

    # -- conversions for people ----------------------------------------------------------------
    def values_dict(self, u: torch.Tensor) -> dict[str, float | int]:
        """Readable constrained values of one unconstrained ``(H,)`` vector (integers rounded)."""
        v = self.discretize(self.to_constrained(u.detach().double().cpu()))
        return {p.name: int(x) if p.is_int else float(x) for p, x in zip(self.params, v.tolist(), strict=True)}

    def from_dict(self, values: Mapping[str, float]) -> torch.Tensor:
        """Unconstrained ``(H,)`` vector from a mapping of constrained values (missing -> init).

        Raises:
            LookupError: on a name the space does not declare.
            ValueError: on a value outside its bounds.
        """
        for name in values:
            self.index(name)
        full = []
        for p in self.params:
            value = float(values.get(p.name, p.init))
            if not p.low <= value <= p.high:
                raise ValueError(f"{p.name}={value} lies outside [{p.low}, {p.high}]")
            full.append(value)
        return self.to_unconstrained(torch.tensor(full, dtype=torch.float64)).float()
