"""A learning rate per layer (``tuner.lr_scales``): the weights' optimizer groups.

Why a scale rather than a rate per layer: the run has one rate, which a schedule shapes, hypergradient
descent tunes, a roll-back halves and a replay follows; fine-tuning asks for that rate at a fixed ratio
between layers (a pretrained backbone at a tenth of its new head's), and the ratio carries through every
one of those. Each scaled layer's parameters form one parameter group of the weights' optimizer, tagged
``lr_scale``, after the group of the parameters no pattern names (group 0, which trains at the rate
itself and may be empty); whatever writes group 0's rate writes ``rate x lr_scale`` into the others
(:func:`follows`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .objective import check_pattern, holders, matches

__all__ = ["follows", "rate_groups"]


def rate_groups(model: torch.nn.Module, params: Sequence[torch.Tensor], scales: Mapping[str, float],
                lr: float) -> list[dict[str, Any]]:
    """The optimizer groups of ``params`` (the network's own trainable weights, held by ``model``'s
    layers): first those no pattern of ``scales`` names, at ``lr``, then one group per pattern, at
    ``lr x scale`` and tagged ``lr_scale`` and ``lr_pattern`` (which a checkpoint keeps). A layer answers to
    the first pattern that names it (by :func:`~selftune.objective.matches`: the layer or a block holding
    it); a parameter two layers share, to its first holder. Order within a group is ``params``' order, so a
    run without scales has the optimizer it had before.

    Raises:
        ConfigError: a pattern that reaches no parameter (it names no layer, only frozen layers, only tied
            ones, or only layers an earlier pattern took), naming ``tuner.lr_scales["pattern"]``.
    """
    patterns = list(scales)
    owned = holders(model, params)
    which: dict[int, int] = {}
    for name, own in owned:
        index = next((i for i, pattern in enumerate(patterns) if matches(pattern, name)), None)
        if index is not None:
            which.update((id(p), index) for p in own)
    for index, pattern in enumerate(patterns):
        check_pattern(f"tuner.lr_scales[\"{pattern}\"]", pattern, model, owned, index in which.values(),
                      "a rate scale", "a tied parameter has one rate")
    rest = [p for p in params if id(p) not in which]
    groups: list[dict[str, Any]] = [{"params": rest}]
    for index, pattern in enumerate(patterns):
        scale = float(scales[pattern])
        groups.append({"params": [p for p in params if which.get(id(p)) == index], "lr": lr * scale,
                       "lr_scale": scale, "lr_pattern": pattern})
    return groups


def follows(index: int, group: Mapping[str, Any]) -> bool:
    """Whether parameter group ``index`` of the weights' optimizer trains at the run's rate: group 0, or a
    scaled layer's group (at the rate x its ``lr_scale``). STN's response group does not (it has its own
    ``response_lr``)."""
    return index == 0 or "lr_scale" in group
