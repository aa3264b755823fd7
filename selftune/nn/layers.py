"""Best-response layers: weights that respond to the hyperparameters.

Two forms of the same structured hypernetwork, per output unit (per output channel for convolutions):

* ``"stn"`` (MacKay et al. 2019): ``y = s*(W x + b) + g_w(c) * (W_r x) + g_b(c) * b_r`` with
  ``c`` the encoding of the (perturbed) hyperparameters, gates ``g = V c`` and ``V ~ N(0, 0.01^2)``.
* ``"delta"`` (Bae & Grosse 2020): ``y = W x + b + g_w(c) * (W_r x) + g_b(c) * b_r`` with
  ``c = enc(lam_tilde) - enc(lam)`` centred on the current hyperparameters and ``V = 0`` at init, so
  the layer is the plain layer at the current hyperparameters.

The general weights keep the names ``weight`` and ``bias`` so a plain layer's ``state_dict`` loads
into them and :func:`~selftune.hypernetize` preserves a model's initialisation.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .state import HyperModule

Form = Literal["stn", "delta"]
FORMS: tuple[str, ...] = ("stn", "delta")


class _BestResponse(HyperModule):
    """Shared gate machinery; subclasses supply the linear operator ``_op``."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    out_units: int

    def _init_response(self, encoding_size: int, form: str) -> None:
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS} (got {form!r})")
        self.form = form
        self.encoding_size = encoding_size
        self.response_weight = nn.Parameter(torch.empty_like(self.weight))
        nn.init.kaiming_uniform_(self.response_weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            self.response_bias = nn.Parameter(torch.empty_like(self.bias).uniform_(-bound, bound))
        else:
            self.register_parameter("response_bias", None)
        self.gate = nn.Parameter(torch.zeros(2 * self.out_units, encoding_size))
        if form == "stn":
            nn.init.normal_(self.gate, std=0.01)
            self.scale = nn.Parameter(torch.ones(1))
        else:
            self.register_parameter("scale", None)

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _unit_view(self, g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def general_parameters(self) -> list[nn.Parameter]:
        """Weights that do not depend on the hyperparameters (``W0``, ``b0`` and the STN scale)."""
        return [p for p in (self.weight, self.bias, self.scale) if p is not None]

    def response_parameters(self) -> list[nn.Parameter]:
        """Weights of the response path: ``W_r``, ``b_r`` and the gate map ``V``."""
        return [p for p in (self.response_weight, self.response_bias, self.gate) if p is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._op(x, self.weight, self.bias)
        if self.scale is not None:
            y = y * self.scale
        state = self._hyper_state
        cond = state.cond if state is not None else None
        if cond is None:
            return y
        gates = F.linear(cond, self.gate)
        g_w, g_b = gates[:, : self.out_units], gates[:, self.out_units:]
        response = self._unit_view(g_w, y) * self._op(x, self.response_weight, None)
        if self.response_bias is not None:
            response = response + self._unit_view(g_b * self.response_bias, y)
        return y + response


class BestResponseLinear(_BestResponse):
    """``nn.Linear`` whose output responds to the hyperparameters.

    Args:
        in_features, out_features, bias: as for ``nn.Linear``.
        encoding_size: width of the gate input (``space.encoding_size``).
        form: ``"stn"`` or ``"delta"``.
    """

    def __init__(self, in_features: int, out_features: int, encoding_size: int, *,
                 bias: bool = True, form: Form = "delta") -> None:
        super().__init__()
        plain = nn.Linear(in_features, out_features, bias=bias)
        self.in_features, self.out_features, self.out_units = in_features, out_features, out_features
        self.weight = plain.weight
        self.bias = plain.bias
        self._init_response(encoding_size, form)

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def _unit_view(self, g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # (B, out) -> (B, 1, ..., 1, out) for inputs with extra middle dimensions (sequences).
        return g.view(g.shape[0], *([1] * (like.dim() - 2)), g.shape[1])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, form={self.form!r}")


class BestResponseConv2d(_BestResponse):
    """``nn.Conv2d`` whose output channels respond to the hyperparameters.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as for
            ``nn.Conv2d`` (zero padding only).
        encoding_size: width of the gate input (``space.encoding_size``).
        form: ``"stn"`` or ``"delta"``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 encoding_size: int, *, stride: int | tuple[int, int] = 1,
                 padding: int | tuple[int, int] | str = 0, dilation: int | tuple[int, int] = 1,
                 groups: int = 1, bias: bool = True, form: Form = "delta") -> None:
        super().__init__()
        plain = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                          dilation=dilation, groups=groups, bias=bias)
        self.in_channels, self.out_channels, self.out_units = in_channels, out_channels, out_channels
        self.kernel_size, self.stride, self.padding = plain.kernel_size, plain.stride, plain.padding
        self.dilation, self.groups = plain.dilation, plain.groups
        self.weight = plain.weight
        self.bias = plain.bias
        self._init_response(encoding_size, form)

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _unit_view(self, g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return g.view(g.shape[0], g.shape[1], 1, 1)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, form={self.form!r}")
