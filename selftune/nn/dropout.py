"""Dropout whose rate is a hyperparameter, one rate per example.

Per-example rates are what STN's perturbation needs: every example of a training batch is trained
at its own sampled hyperparameters, which is how the best-response layers learn how the weights
should change with the rate.
"""

from __future__ import annotations

import torch

from .state import HyperModule


def dropout(x: torch.Tensor, p: torch.Tensor, *, training: bool = True, channelwise: bool = False,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Inverted dropout with a per-example rate.

    Args:
        x: ``(B, ...)`` activations.
        p: ``(B,)`` drop probabilities in ``[0, 1)``; not differentiated (STN tunes rates through the
            best-response path, not through the mask).
        training: identity when ``False``.
        channelwise: drop whole channels (dimension 1) as ``nn.Dropout2d`` does, instead of
            single elements.
        generator: random source, for reproducible masks.

    Returns:
        ``x`` with dropped entries zeroed and kept ones scaled by ``1 / (1 - p)``.
    """
    if not training:
        return x
    if p.dim() != 1 or p.shape[0] != x.shape[0]:
        raise ValueError(f"p must have shape ({x.shape[0]},), got {tuple(p.shape)}")
    keep = (1.0 - p.detach()).clamp_min(1e-6).to(x.dtype)
    mask_shape = (*x.shape[:2], *([1] * (x.dim() - 2))) if channelwise else x.shape
    keep = keep.view(-1, *([1] * (x.dim() - 1)))
    mask = torch.rand(mask_shape, generator=generator, device=x.device, dtype=x.dtype) < keep
    return x * mask / keep


class Dropout(HyperModule):
    """Drop-in replacement for ``nn.Dropout`` (or ``nn.Dropout2d`` with ``channelwise=True``) whose
    rate is the hyperparameter ``name``, looked up on every forward pass.

    Put one on the input to get input dropout. Inactive in ``eval()`` mode, as ``nn.Dropout`` is.

    Args:
        name: the hyperparameter holding the rate (declare it with bounds inside ``[0, 1)``).
        channelwise: drop whole feature maps instead of elements.
    """

    def __init__(self, name: str, *, channelwise: bool = False) -> None:
        super().__init__()
        self.name = name
        self.channelwise = channelwise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        state = self.hyper_state
        return dropout(x, state.value(self.name), channelwise=self.channelwise,
                       generator=state.generator)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, channelwise={self.channelwise}"
