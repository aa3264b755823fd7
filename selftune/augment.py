"""Batch augmentations in plain torch whose strength is a per-example hyperparameter.

Every function takes a ``(B, C, H, W)`` float batch and ``(B,)`` strengths, so each example of a
batch is augmented at its own (perturbed) hyperparameters. :class:`Augment` chains them and reads
the strengths from the space by name; it is what the tuner applies to training batches (never to
validation batches: the hyper step runs without augmentation, as in STN).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .errors import ConfigTypeError

__all__ = ["Augment", "Cutout", "Flip", "Noise", "Shift", "cutout", "gaussian_noise", "random_flip", "random_shift"]


def _check_images(x: torch.Tensor, *strengths: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"augmentations need (B, C, H, W) images, got shape {tuple(x.shape)}")
    for s in strengths:
        if s.shape != (x.shape[0],):
            raise ValueError(f"strengths must have shape ({x.shape[0]},), got {tuple(s.shape)}")


def cutout(x: torch.Tensor, length: torch.Tensor, holes: torch.Tensor,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero ``holes[i]`` squares of side ``length[i]`` in image ``i`` (DeVries & Taylor 2017).

    Centres are uniform over the image; squares may be clipped at the border. Lengths and hole counts
    are rounded to integers.
    """
    _check_images(x, length, holes)
    b, _, h, w = x.shape
    length = length.detach().round().clamp_min(0)
    holes = holes.detach().round().clamp_min(0).long()
    k = int(holes.max()) if b else 0
    if k == 0:
        return x
    cy = torch.randint(0, h, (b, k), generator=generator, device=x.device)
    cx = torch.randint(0, w, (b, k), generator=generator, device=x.device)
    top = (cy - torch.div(length, 2, rounding_mode="floor").unsqueeze(1)).unsqueeze(-1)  # (B, K, 1)
    left = (cx - torch.div(length, 2, rounding_mode="floor").unsqueeze(1)).unsqueeze(-1)
    size = length.view(b, 1, 1)
    rows = torch.arange(h, device=x.device).view(1, 1, h)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    in_rows = (rows >= top) & (rows < top + size)  # (B, K, H)
    in_cols = (cols >= left) & (cols < left + size)  # (B, K, W)
    active = (torch.arange(k, device=x.device).view(1, k) < holes.view(b, 1)).view(b, k, 1, 1)
    cut = (in_rows.unsqueeze(-1) & in_cols.unsqueeze(-2) & active).any(dim=1)  # (B, H, W)
    return x * (~cut).unsqueeze(1).to(x.dtype)


def gaussian_noise(x: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add ``N(0, std[i]^2)`` noise to every element of example ``i``."""
    if std.shape != (x.shape[0],):
        raise ValueError(f"std must have shape ({x.shape[0]},), got {tuple(std.shape)}")
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + std.detach().to(x.dtype).view(-1, *([1] * (x.dim() - 1))) * noise


def random_shift(x: torch.Tensor, max_shift: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate image ``i`` by a uniform integer offset in ``[-max_shift[i], max_shift[i]]`` per axis,
    filling with zeros."""
    _check_images(x, max_shift)
    b, _, h, w = x.shape
    m = max_shift.detach().round().clamp(0, max(h, w) - 1).long()
    pad = int(m.max()) if b else 0
    if pad == 0:
        return x
    unit = torch.rand(b, 2, generator=generator, device=x.device)
    offset = (unit * (2 * m + 1).unsqueeze(1)).floor().long() - m.unsqueeze(1)  # (B, 2) in [-m, m]
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (torch.arange(h, device=x.device).view(1, h) + pad - offset[:, :1])  # (B, H)
    cols = (torch.arange(w, device=x.device).view(1, w) + pad - offset[:, 1:])  # (B, W)
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch, rows.unsqueeze(-1), cols.unsqueeze(1)]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def random_flip(x: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror image ``i`` left-right with probability ``p[i]``."""
    _check_images(x, p)
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < p.detach()
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


Strength = str | float
Lookup = Callable[[str], torch.Tensor]


def _strength(spec: Strength, lookup: Lookup, batch: int, like: torch.Tensor) -> torch.Tensor:
    if isinstance(spec, str):
        return lookup(spec)
    return torch.full((batch,), float(spec), device=like.device)


@dataclass(frozen=True)
class Cutout:
    """Cutout with ``length`` and ``holes`` each a hyperparameter name or a constant."""

    length: Strength
    holes: Strength = 1.0

    def __call__(self, x: torch.Tensor, lookup: Lookup, generator: torch.Generator | None) -> torch.Tensor:
        b = x.shape[0]
        return cutout(x, _strength(self.length, lookup, b, x), _strength(self.holes, lookup, b, x), generator)


@dataclass(frozen=True)
class Noise:
    """Additive Gaussian noise whose ``std`` is a hyperparameter name or a constant."""

    std: Strength

    def __call__(self, x: torch.Tensor, lookup: Lookup, generator: torch.Generator | None) -> torch.Tensor:
        return gaussian_noise(x, _strength(self.std, lookup, x.shape[0], x), generator)


@dataclass(frozen=True)
class Shift:
    """Random translation of up to ``max_shift`` pixels (hyperparameter name or constant)."""

    max_shift: Strength

    def __call__(self, x: torch.Tensor, lookup: Lookup, generator: torch.Generator | None) -> torch.Tensor:
        return random_shift(x, _strength(self.max_shift, lookup, x.shape[0], x), generator)


@dataclass(frozen=True)
class Flip:
    """Random horizontal flip with probability ``p`` (hyperparameter name or constant)."""

    p: Strength

    def __call__(self, x: torch.Tensor, lookup: Lookup, generator: torch.Generator | None) -> torch.Tensor:
        return random_flip(x, _strength(self.p, lookup, x.shape[0], x), generator)


class Augment:
    """A chain of augmentations applied in order to a training batch.

    Args:
        ops: :class:`Cutout`, :class:`Noise`, :class:`Shift`, :class:`Flip` (or any callable with the
            same ``(x, lookup, generator)`` signature, which reads a hyperparameter's per-example values as
            ``lookup(name)``: a name it asks for counts as read, and is tuned through it).

    Raises:
        ConfigTypeError: an op that is not callable, or ``ops`` that is not a sequence of them.
    """

    def __init__(self, ops: Sequence[Callable[[torch.Tensor, Lookup, torch.Generator | None], torch.Tensor]]) -> None:
        if isinstance(ops, Augment):
            ops = ops.ops
        if callable(ops) or not isinstance(ops, Sequence) or isinstance(ops, str):
            raise ConfigTypeError("augment", f"takes a list of augmentations (got {type(ops).__name__}); wrap one: "
                                             "Augment([op])")
        for i, op in enumerate(ops):
            if not callable(op):
                raise ConfigTypeError(f"augment[{i}]", f"{type(op).__name__} is not an augmentation: pass Cutout, "
                                                       "Noise, Shift, Flip or a callable (x, lookup, generator) -> x")
        self.ops = tuple(ops)

    def hyperparameters(self) -> set[str]:
        """Names of the hyperparameters the chain's built-in ops name (a callable of your own is counted as it
        reads them through ``lookup``)."""
        names: set[str] = set()
        for op in self.ops:
            names.update(v for v in getattr(op, "__dict__", {}).values() if isinstance(v, str))
        return names

    def __call__(self, x: torch.Tensor, lookup: Lookup, generator: torch.Generator | None = None) -> torch.Tensor:
        with torch.no_grad():
            for op in self.ops:
                x = op(x, lookup, generator)
        return x

    def __repr__(self) -> str:
        return f"Augment({list(self.ops)!r})"
