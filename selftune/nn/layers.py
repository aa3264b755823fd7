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

import contextlib
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..errors import DataError
from .state import HyperModule, refuse_recomputation

Form = Literal["stn", "delta"]
FORMS: tuple[str, ...] = ("stn", "delta")


class BestResponseModule(HyperModule):
    """A layer whose weights respond to the hyperparameters; the tuner trains its two groups apart."""

    #: its output has no batch dimension (set by :meth:`~selftune.HyperNet.find_shared_layers`)
    unbatched: bool = False
    #: its name in the model, for messages (set there too)
    qualified_name: str = ""

    def general_parameters(self) -> list[nn.Parameter]:
        """Weights that do not depend on the hyperparameters (``W0``, ``b0``)."""
        raise NotImplementedError

    def response_parameters(self) -> list[nn.Parameter]:
        """Weights of the response path (``W_r``, ``b_r``, the gate map ``V``) and STN's scale ``s``: the
        multipliers of the layer's output, which take ``tuner.response_lr`` (one scalar gain of a whole
        layer cannot take a plain weight's step)."""
        raise NotImplementedError

    def plain(self, cond: torch.Tensor | None) -> nn.Module:
        """The plain PyTorch layer (``nn.Linear``, ...) that computes what this one does at gate input
        ``cond``, with the same parameter names as the layer it replaced."""
        raise NotImplementedError

    def _cond(self) -> torch.Tensor | None:
        state = self._hyper_state
        if state is not None and state.values is None:
            refuse_recomputation()  # outside a pass: plain weights, unless autograd is recomputing a pass's block
        return state.cond if state is not None else None


def _effective_sq_norm(rows: torch.Tensor, response_rows: torch.Tensor, g: torch.Tensor | None,
                       batch: int) -> torch.Tensor:
    """Per-example ``||W + diag(g_i) R||^2`` for unit rows ``W``, ``R`` ``(U, k)`` and gates ``g`` ``(B, U)``,
    without building the ``B`` effective matrices: ``sum_j |W_j|^2 + 2 g_ij <W_j, R_j> + g_ij^2 |R_j|^2``.

    Weight decay penalises the weights a layer actually applies. With the response path included, the
    response learns how the weights shrink when the decay grows, which is the only route by which a
    decay rate reaches the validation loss (a penalty on the general weights alone is constant for the
    response step, and the decay would receive no hypergradient)."""
    plain = (rows * rows).sum()
    if g is None:
        return plain.expand(batch)
    cross = (rows * response_rows).sum(1)
    own = (response_rows * response_rows).sum(1)
    return plain + 2 * (g @ cross) + (g * g) @ own


def _batch_view(layer: HyperModule, g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-example, per-unit gates ``(B, out)`` shaped to multiply an output ``like`` whose last dimension
    is the units: ``(B, 1, ..., 1, out)`` batch-first, ``(1, B, ..., out)`` sequence-first."""
    shape = [1] * like.dim()
    if getattr(layer, "unbatched", False):  # shared by every example: their mean (HyperNet.find_shared_layers)
        shape[-1] = g.shape[1]
        return g.mean(0).view(shape)
    state = layer._hyper_state
    hint = getattr(layer, "batch_axis_hint", None)  # (HyperNet.find_shared_layers: the dimension that grew)
    try:
        if state is None or getattr(layer, "batch_first", False):
            axis = 0
        elif hint is not None and like.dim() > hint and like.shape[hint] == g.shape[0]:
            axis = hint
        else:
            axis = state.batch_axis(like)
    except ValueError as err:
        name = getattr(layer, "qualified_name", "") or type(layer).__name__
        raise DataError(f"model.{name}: {err}. A layer applied to a tensor every example shares (and also to "
                        "per-example inputs, or in a path only training takes) cannot respond per example; leave "
                        "it plain: hypernetize(..., modules=[...]) without it") from None
    shape[axis], shape[-1] = g.shape[0], g.shape[1]
    return g.view(shape)


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS} (got {form!r})")


class _BestResponse(BestResponseModule):
    """Shared gate machinery of single-map layers; subclasses supply the linear operator ``_op``."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    out_units: int

    def _init_response(self, encoding_size: int, form: str) -> None:
        _check_form(form)
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

    def _unit_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` as one row per output unit (the unit a gate multiplies)."""
        return weight.flatten(1)

    def _record_norm(self, g_w: torch.Tensor | None) -> None:
        state = self._hyper_state
        if state is None or state.norms is None or state.values is None:
            return
        rows = self._unit_rows(self.weight)
        if self.scale is not None:
            rows = rows * self.scale
        state.record_norm(self, [self.weight], _effective_sq_norm(rows, self._unit_rows(self.response_weight), g_w,
                                                                  state.values.shape[0]))

    def general_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.weight, self.bias) if p is not None]

    def response_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.response_weight, self.response_bias, self.gate, self.scale) if p is not None]

    def _plain_shell(self) -> nn.Module:
        """A new plain module of this layer's kind and shape (its weights are overwritten)."""
        raise NotImplementedError

    def _from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_unit_rows`."""
        return rows.view_as(self.weight)

    @torch.no_grad()
    def plain(self, cond: torch.Tensor | None) -> nn.Module:
        """The plain PyTorch layer this one computes at gate input ``cond`` (``(E,)``; ``None``: no
        response, as Delta-STN at its own hyperparameters): ``s W + diag(g_w) W_r`` and
        ``s b + g_b * b_r`` folded into one weight and bias."""
        scale = 1.0 if self.scale is None else float(self.scale)
        rows = self._unit_rows(self.weight) * scale
        bias = None if self.bias is None else self.bias * scale
        if cond is not None:
            gates = F.linear(cond.reshape(1, -1), self.gate)[0]
            g_w, g_b = gates[: self.out_units], gates[self.out_units:]
            rows = rows + g_w[:, None] * self._unit_rows(self.response_weight)
            if bias is not None and self.response_bias is not None:
                bias = bias + g_b * self.response_bias
        shell = self._plain_shell().to(device=self.weight.device, dtype=self.weight.dtype)
        shell.weight.copy_(self._from_rows(rows))
        if bias is not None:
            shell.bias.copy_(bias)
        return shell

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cond = self._cond()  # first: a recomputation in backward stops at the first result it needs
        y = self._op(x, self.weight, self.bias)
        if self.scale is not None:
            y = y * self.scale
        if cond is None:
            self._record_norm(None)
            return y
        gates = F.linear(cond, self.gate)
        g_w, g_b = gates[:, : self.out_units], gates[:, self.out_units:]
        self._record_norm(g_w)
        response = self._unit_view(g_w, y) * self._op(x, self.response_weight, None)
        if self.response_bias is not None:
            response = response + self._unit_view(g_b * self.response_bias, y)
        return y + response


class BestResponseLinear(_BestResponse):
    """``nn.Linear`` whose output responds to the hyperparameters.

    Args:
        in_features, out_features, bias: as for ``nn.Linear``.
        encoding_size: width of the gate input (``space.encoding_width(encoding)``).
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
        return _batch_view(self, g, like)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, form={self.form!r}")


    def _plain_shell(self) -> nn.Module:
        return nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)


class BestResponseConv2d(_BestResponse):
    """``nn.Conv2d`` whose output channels respond to the hyperparameters.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as for
            ``nn.Conv2d`` (zero padding only).
        encoding_size: width of the gate input (``space.encoding_width(encoding)``).
        form: ``"stn"`` or ``"delta"``.
    """

    _plain_conv: type[nn.Conv1d] | type[nn.Conv2d] = nn.Conv2d

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 encoding_size: int, *, stride: int | tuple[int, int] = 1,
                 padding: int | tuple[int, int] | str = 0, dilation: int | tuple[int, int] = 1,
                 groups: int = 1, bias: bool = True, form: Form = "delta") -> None:
        super().__init__()
        plain = self._plain_conv(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
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


    def _plain_shell(self) -> nn.Module:
        return self._plain_conv(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                                padding=self.padding, dilation=self.dilation, groups=self.groups,
                                bias=self.bias is not None)


class BestResponseConv1d(BestResponseConv2d):
    """``nn.Conv1d`` whose output channels respond to the hyperparameters (as :class:`BestResponseConv2d`)."""

    _plain_conv = nn.Conv1d

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv1d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _unit_view(self, g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return g.view(g.shape[0], g.shape[1], 1)


class BestResponseEmbedding(_BestResponse):
    """``nn.Embedding`` whose vectors respond to the hyperparameters, one gate per embedding dimension:
    ``y = E[ids] + g(c) * E_r[ids]`` (``s * E[ids]`` first for STN).

    Args:
        num_embeddings, embedding_dim, padding_idx, scale_grad_by_freq: as for ``nn.Embedding``.
        encoding_size: width of the gate input (``space.encoding_width(encoding)``).
        form: ``"stn"`` or ``"delta"``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, encoding_size: int, *,
                 padding_idx: int | None = None, scale_grad_by_freq: bool = False, form: Form = "delta") -> None:
        super().__init__()
        plain = nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.scale_grad_by_freq = scale_grad_by_freq
        self.num_embeddings, self.embedding_dim, self.out_units = num_embeddings, embedding_dim, embedding_dim
        self.padding_idx = plain.padding_idx
        self.weight = plain.weight
        self.bias = None
        self._init_response(encoding_size, form)
        with torch.no_grad():
            self.response_weight.normal_(0.0, 1.0)  # nn.Embedding's own initialisation
            if self.padding_idx is not None:  # as nn.Embedding's: padding embeds to 0 at every value (and gets
                self.response_weight[self.padding_idx].zero_()  # no gradient, so it stays 0)

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.embedding(x, weight, self.padding_idx, scale_grad_by_freq=self.scale_grad_by_freq)

    def _unit_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t()  # a gate scales one embedding dimension across the vocabulary

    def _from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.t()

    def _plain_shell(self) -> nn.Module:
        return nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                            scale_grad_by_freq=self.scale_grad_by_freq)

    def _unit_view(self, g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _batch_view(self, g, like)

    def extra_repr(self) -> str:
        freq = ", scale_grad_by_freq=True" if self.scale_grad_by_freq else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{freq}, form={self.form!r}"


_RNN_UNITS = {"LSTM": 4, "GRU": 3}


def _flip(x: torch.Tensor, reverse: torch.Tensor | None) -> torch.Tensor:
    """Batch-first ``x`` with each sequence's steps reversed: all of them, or (``reverse``, ``(B, T)``
    indices) the steps within each one's length, its padding left in place."""
    if reverse is None:
        return x.flip(1)
    return x.gather(1, reverse[..., None].expand(-1, -1, x.shape[2]))


class BestResponseRecurrent(BestResponseModule):
    """An ``nn.LSTM`` or ``nn.GRU`` (any number of layers, one or two directions) whose input and
    recurrent maps respond to the hyperparameters.

    In every layer and direction the pre-activations are, per example ``b`` and step ``t``::

        s * (W_ih x_t + b_ih) + g_ih(c) * (R_ih x_t) + g_b(c) * r_b      (input part)
        s * (W_hh h_{t-1} + b_hh) + g_hh(c) * (R_hh h_{t-1})              (recurrent part)

    combined as the LSTM or GRU cell combines them (for the GRU, the reset gate multiplies the
    recurrent part of the candidate, as in ``nn.GRU``), with one gate value per pre-activation unit and
    ``s = 1`` for Delta-STN. Without a response (plain training, or Delta-STN at the current
    hyperparameters) the layer runs PyTorch's fused kernel; with one it unrolls the steps in Python,
    both recurrent maps in one matrix product per step. The general weights keep PyTorch's names
    (``weight_ih_l1_reverse``, ...), so a plain module's ``state_dict`` loads, and :meth:`plain` gives
    the module back. A ``PackedSequence`` goes in and comes out as the plain module takes it. The
    response parameters of layer 0's forward direction have no suffix (``response_weight_ih``,
    ``gate``), the others ``_l{k}`` and ``_reverse`` as PyTorch's do.

    PyTorch's own ``dropout`` between stacked layers is kept as it is, untuned (as an attention's own
    ``dropout``): it draws from PyTorch's global generator, which a run seeds and checkpoints (on a GPU the
    layer then runs without cuDNN, whose RNN dropout keeps a state no checkpoint holds). To tune it, stack
    one-layer modules with a :class:`~selftune.nn.Dropout` between them.
    """

    mode = "LSTM"

    def __init__(self, input_size: int, hidden_size: int, encoding_size: int, *, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, bidirectional: bool = False,
                 dropout: float = 0.0, form: Form = "delta") -> None:
        super().__init__()
        _check_form(form)
        self.dropout = float(dropout)
        plain = self._plain_class()(input_size, hidden_size, num_layers=num_layers, bias=bias,
                                    batch_first=batch_first, bidirectional=bidirectional)
        self.input_size, self.hidden_size, self.batch_first, self.form = input_size, hidden_size, batch_first, form
        self.num_layers, self.bidirectional, self.encoding_size = num_layers, bidirectional, encoding_size
        self.has_bias = bias
        self._names = list(plain._flat_weights_names)
        for name in self._names:
            setattr(self, name, getattr(plain, name))
        units = _RNN_UNITS[self.mode] * hidden_size
        bound = 1 / math.sqrt(hidden_size)
        for layer, direction in self._cells():
            width = input_size if layer == 0 else hidden_size * self.directions
            sfx = self._response_suffix(layer, direction)
            self.register_parameter(f"response_weight_ih{sfx}",
                                    nn.Parameter(torch.empty(units, width).uniform_(-bound, bound)))
            self.register_parameter(f"response_weight_hh{sfx}",
                                    nn.Parameter(torch.empty(units, hidden_size).uniform_(-bound, bound)))
            self.register_parameter(f"response_bias{sfx}",
                                    nn.Parameter(torch.empty(units).uniform_(-bound, bound)) if bias else None)
            gate = nn.Parameter(torch.zeros(3 * units, encoding_size))
            if form == "stn":
                nn.init.normal_(gate, std=0.01)
            self.register_parameter(f"gate{sfx}", gate)
        self.scale: nn.Parameter | None = nn.Parameter(torch.ones(1)) if form == "stn" else None

    # -- structure ------------------------------------------------------------------------------------
    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _plain_class(self) -> type[nn.RNNBase]:
        return nn.LSTM if self.mode == "LSTM" else nn.GRU

    def _cells(self) -> list[tuple[int, int]]:
        return [(k, d) for k in range(self.num_layers) for d in range(self.directions)]

    @staticmethod
    def _response_suffix(layer: int, direction: int) -> str:
        if layer == 0 and direction == 0:
            return ""  # the names of the one-layer LSTM this class generalises (older checkpoints load)
        return f"_l{layer}" + ("_reverse" if direction else "")

    def _general(self, layer: int, direction: int) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter | None,
                                                             nn.Parameter | None]:
        sfx = f"_l{layer}" + ("_reverse" if direction else "")
        bias = self.has_bias
        return (getattr(self, f"weight_ih{sfx}"), getattr(self, f"weight_hh{sfx}"),
                getattr(self, f"bias_ih{sfx}") if bias else None, getattr(self, f"bias_hh{sfx}") if bias else None)

    def _response(self, layer: int, direction: int) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter | None,
                                                              nn.Parameter]:
        sfx = self._response_suffix(layer, direction)
        return (getattr(self, f"response_weight_ih{sfx}"), getattr(self, f"response_weight_hh{sfx}"),
                getattr(self, f"response_bias{sfx}"), getattr(self, f"gate{sfx}"))

    def general_parameters(self) -> list[nn.Parameter]:
        return [getattr(self, n) for n in self._names]

    def response_parameters(self) -> list[nn.Parameter]:
        params = [p for cell in self._cells() for p in self._response(*cell) if p is not None]
        return params + ([self.scale] if self.scale is not None else [])

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor | PackedSequence, hx: Any = None) -> tuple[Any, Any]:
        self._cond()  # first: refuses a recomputation in backward (torch.utils.checkpoint) before any result
        if isinstance(x, PackedSequence):
            return self._packed(x, hx)
        if x.dim() != 3:
            raise ValueError(f"{type(self).__name__} takes batched 3-d input, got shape {tuple(x.shape)}")
        if not self.batch_first:
            x = x.transpose(0, 1)
        batch = x.shape[0]
        if hx is None:
            zeros = x.new_zeros(self.num_layers * self.directions, batch, self.hidden_size)
            hx = (zeros, zeros) if self.mode == "LSTM" else zeros
        cond = self._cond()
        self._record_norm(cond)
        if cond is None and self.scale is None:
            weights = self.general_parameters()
            run = torch.lstm if self.mode == "LSTM" else torch.gru
            with _own_dropout_generator(self, x):
                out, *state = run(x, hx, weights, self.has_bias, self.num_layers, self.dropout, self.training,
                                  self.bidirectional, True)
        else:
            out, state = self._unrolled(x, hx, cond)
        out = out if self.batch_first else out.transpose(0, 1)
        return out, (tuple(state) if self.mode == "LSTM" else state[0])

    def _packed(self, x: PackedSequence, hx: Any) -> tuple[PackedSequence, Any]:
        """A ``PackedSequence`` in and out, as ``nn.LSTM``/``nn.GRU`` take it (``hx`` and the final states in
        the batch's own order). Without a response PyTorch's packed kernel runs; with one the sequences are
        laid out padded, in the batch's order (each example's perturbation is its own row), and the steps
        past a sequence's length leave its state alone, so the final state is the one of its last step and the
        reverse direction starts at that step, as the packed kernel does."""
        data, sizes, order, unorder = x.data, x.batch_sizes, x.sorted_indices, x.unsorted_indices
        batch, steps = int(sizes[0]), len(sizes)
        lstm = self.mode == "LSTM"
        if hx is None:
            zeros = data.new_zeros(self.num_layers * self.directions, batch, self.hidden_size)
            hx = (zeros, zeros) if lstm else zeros

        def permute(h: Any, index: torch.Tensor | None) -> Any:
            if index is None:
                return h
            return tuple(t.index_select(1, index) for t in h) if isinstance(h, tuple) else h.index_select(1, index)

        cond = self._cond()
        self._record_norm(cond)
        if cond is None and self.scale is None:
            run = torch.lstm if lstm else torch.gru
            with _own_dropout_generator(self, data):
                out, *state = run(data, sizes, permute(hx, order), self.general_parameters(), self.has_bias,
                                  self.num_layers, self.dropout, self.training, self.bidirectional)
            final = permute(tuple(state) if lstm else state[0], unorder)
            return PackedSequence(out, sizes, order, unorder), final
        # where each sorted sequence's step t sits in the packed data: time-major, batch_sizes[t] rows a step
        valid = torch.arange(batch)[:, None] < sizes[None, :]  # (B, T) in sorted order, on the CPU as sizes is
        starts = torch.cumsum(sizes, 0) - sizes
        rows = (starts[None, :] + torch.arange(batch)[:, None]).masked_fill(~valid, 0).to(data.device)
        padded = data.index_select(0, rows.flatten()).view(batch, steps, -1) * valid.to(data)[..., None]
        lengths = valid.sum(1).to(data.device)
        if unorder is not None:  # to the batch's own order: cond's rows are its examples
            padded, lengths = padded.index_select(0, unorder), lengths.index_select(0, unorder)
        out, state = self._unrolled(padded, hx, cond, lengths)
        if order is not None:
            out = out.index_select(0, order)
        packed = out.reshape(batch * steps, -1).index_select(
            0, (torch.arange(batch)[:, None] * steps + torch.arange(steps)[None, :]).t()[valid.t()].to(data.device))
        return PackedSequence(packed, sizes, order, unorder), (tuple(state) if lstm else state[0])

    def _unrolled(self, x: torch.Tensor, hx: Any, cond: torch.Tensor | None, lengths: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Every layer and direction step by step on batch-first ``x``; ``lengths`` (``(B,)``): sequences
        padded past their length (a packed batch), whose state stops there and whose reverse pass starts there."""
        lstm = self.mode == "LSTM"
        h0, c0 = hx if lstm else (hx, None)
        finals_h, finals_c = [], []
        layer_input = x
        reverse = None
        if lengths is not None:  # step t of the reversed sequence is step length - 1 - t (padding stays put)
            t = torch.arange(x.shape[1], device=x.device)[None, :]
            reverse = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.directions):
                i = layer * self.directions + direction
                seq = _flip(layer_input, reverse) if direction else layer_input
                out, h, c = self._cell_sequence(seq, h0[i], None if c0 is None else c0[i], cond, layer, direction,
                                                lengths)
                outputs.append(_flip(out, reverse) if direction else out)
                finals_h.append(h)
                finals_c.append(c)
            layer_input = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
            if self.dropout and layer < self.num_layers - 1:  # PyTorch's: on every layer's output but the last
                layer_input = F.dropout(layer_input, self.dropout, self.training)
        state = [torch.stack(finals_h)] + ([torch.stack(finals_c)] if lstm else [])
        return layer_input, state

    def _cell_sequence(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None, cond: torch.Tensor | None,
                       layer: int, direction: int, lengths: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        w_ih, w_hh, b_ih, b_hh = self._general(layer, direction)
        r_ih, r_hh, r_b, gate = self._response(layer, direction)
        units = _RNN_UNITS[self.mode] * self.hidden_size
        lstm = self.mode == "LSTM"
        # LSTM: both biases sum before the cell; GRU: b_hh stays in the recurrent part (reset gate).
        in_bias = None if b_ih is None else (b_ih + b_hh if lstm else b_ih)
        inputs = F.linear(x, w_ih, in_bias)  # every step's input map at once: (B, T, units)
        recurrent, rec_bias = w_hh, (None if lstm else b_hh)
        if self.scale is not None:
            inputs, recurrent = inputs * self.scale, recurrent * self.scale
            rec_bias = None if rec_bias is None else rec_bias * self.scale
        g_hh = None
        if cond is not None:
            g_ih, g_hh, g_b = F.linear(cond, gate).split(units, dim=1)
            inputs = inputs + g_ih.unsqueeze(1) * F.linear(x, r_ih)
            if r_b is not None:
                inputs = inputs + (g_b * r_b).unsqueeze(1)
            recurrent = torch.cat([recurrent, r_hh])  # both recurrent maps in one product
        outputs = []
        for t in range(x.shape[1]):
            z = F.linear(h, recurrent)
            rec = z if g_hh is None else z[:, :units] + g_hh * z[:, units:]
            if rec_bias is not None:
                rec = rec + rec_bias
            h_before, c_before = h, c
            if lstm:
                i, f, g, o = (inputs[:, t] + rec).chunk(4, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            else:
                x_r, x_z, x_n = inputs[:, t].chunk(3, dim=1)
                h_r, h_z, h_n = rec.chunk(3, dim=1)
                reset, update = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
                candidate = torch.tanh(x_n + reset * h_n)
                h = (1 - update) * candidate + update * h
            if lengths is not None:  # a sequence already ended keeps its last state
                running = (t < lengths)[:, None]
                h = torch.where(running, h, h_before)
                c = c if c is None or c_before is None else torch.where(running, c, c_before)
            outputs.append(h)
        return torch.stack(outputs, dim=1), h, c

    # -- weight decay and export ----------------------------------------------------------------------
    def _record_norm(self, cond: torch.Tensor | None) -> None:
        state = self._hyper_state
        if state is None or state.norms is None or state.values is None:
            return
        batch, units = state.values.shape[0], _RNN_UNITS[self.mode] * self.hidden_size
        norm: torch.Tensor | None = None
        decayed = []
        for cell in self._cells():
            w_ih, w_hh, _, _ = self._general(*cell)
            r_ih, r_hh, _, gate = self._response(*cell)
            g_ih = g_hh = None
            if cond is not None:
                g_ih, g_hh, _ = F.linear(cond, gate).split(units, dim=1)
            s_ih, s_hh = (w_ih, w_hh) if self.scale is None else (w_ih * self.scale, w_hh * self.scale)
            part = _effective_sq_norm(s_ih, r_ih, g_ih, batch) + _effective_sq_norm(s_hh, r_hh, g_hh, batch)
            norm = part if norm is None else norm + part
            decayed += [w_ih, w_hh]
        assert norm is not None
        state.record_norm(self, decayed, norm)

    @torch.no_grad()
    def plain(self, cond: torch.Tensor | None) -> nn.RNNBase:
        """The ``nn.LSTM``/``nn.GRU`` this layer computes at gate input ``cond`` (``(E,)``; ``None``: no
        response): every map folded as ``s W + diag(g) R``, each response bias into its ``bias_ih``."""
        scale = 1.0 if self.scale is None else float(self.scale)
        first = self.general_parameters()[0]
        module = self._plain_class()(self.input_size, self.hidden_size, num_layers=self.num_layers, bias=self.has_bias,
                                     batch_first=self.batch_first, bidirectional=self.bidirectional,
                                     dropout=self.dropout)
        module = module.to(device=first.device, dtype=first.dtype)
        units = _RNN_UNITS[self.mode] * self.hidden_size
        for layer, direction in self._cells():
            sfx = f"_l{layer}" + ("_reverse" if direction else "")
            w_ih, w_hh, b_ih, b_hh = (None if p is None else p * scale for p in self._general(layer, direction))
            r_ih, r_hh, r_b, gate = self._response(layer, direction)
            if cond is not None:
                g_ih, g_hh, g_b = F.linear(cond.reshape(1, -1), gate)[0].split(units)
                w_ih = w_ih + g_ih[:, None] * r_ih
                w_hh = w_hh + g_hh[:, None] * r_hh
                if b_ih is not None and r_b is not None:
                    b_ih = b_ih + g_b * r_b
            getattr(module, f"weight_ih{sfx}").copy_(w_ih)
            getattr(module, f"weight_hh{sfx}").copy_(w_hh)
            if b_ih is not None:
                getattr(module, f"bias_ih{sfx}").copy_(b_ih)
                getattr(module, f"bias_hh{sfx}").copy_(b_hh)
        return module

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, bias={self.has_bias}, "
                f"batch_first={self.batch_first}, bidirectional={self.bidirectional}"
                + (f", dropout={self.dropout:g}" if self.dropout else "") + f", form={self.form!r}")


def _own_dropout_generator(layer: BestResponseRecurrent, x: torch.Tensor) -> Any:
    """cuDNN draws an RNN's dropout between layers from a state of its own, which no checkpoint holds, so a
    resumed run would drop other units than an uninterrupted one: with that dropout on, a GPU run trains the
    layer with PyTorch's own kernels, which draw from the CUDA generator the run checkpoints (slower)."""
    return torch.backends.cudnn.flags(enabled=False) if layer.dropout and layer.num_layers > 1 and layer.training \
        and x.is_cuda else contextlib.nullcontext()


class BestResponseLSTM(BestResponseRecurrent):
    """``nn.LSTM`` as a best-response layer (:class:`BestResponseRecurrent`); forward returns
    ``(output, (h_n, c_n))`` as ``nn.LSTM`` does."""

    mode = "LSTM"


class BestResponseGRU(BestResponseRecurrent):
    """``nn.GRU`` as a best-response layer (:class:`BestResponseRecurrent`); forward returns
    ``(output, h_n)`` as ``nn.GRU`` does."""

    mode = "GRU"


class BestResponseMultiheadAttention(BestResponseModule):
    """``nn.MultiheadAttention`` whose query/key/value and output projections respond to the
    hyperparameters (the projections inside every ``nn.TransformerEncoderLayer`` / ``DecoderLayer``).

    PyTorch applies ``in_proj_weight`` inside ``F.multi_head_attention_forward``, where no per-example
    response can enter, so this module computes attention itself: the packed projection is a
    :class:`BestResponseLinear` ``in_proj`` (``embed_dim -> 3 embed_dim``, one gate per output unit), the
    output projection another (``out_proj``), and the attention between them is PyTorch's
    ``scaled_dot_product_attention`` (explicit softmax where ``need_weights``), with the same masks,
    attention dropout and return values as ``nn.MultiheadAttention.forward``. Equal query, key and
    value embedding sizes only, without ``add_bias_kv`` / ``add_zero_attn`` (others stay plain, and
    the summary says why). :meth:`plain` gives the ``nn.MultiheadAttention`` back.
    """

    def __init__(self, embed_dim: int, num_heads: int, encoding_size: int, *, dropout: float = 0.0,
                 bias: bool = True, batch_first: bool = False, form: Form = "delta") -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.head_dim = embed_dim // num_heads
        self.kdim = self.vdim = embed_dim
        self._qkv_same_embed_dim = True  # read by nn.TransformerEncoder before it runs a layer
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self.in_proj = BestResponseLinear(embed_dim, 3 * embed_dim, encoding_size, bias=bias, form=form)
        self.out_proj = BestResponseLinear(embed_dim, embed_dim, encoding_size, bias=bias, form=form)
        for layer in (self.in_proj, self.out_proj):
            layer.batch_first = True  # forward() puts the examples first, whatever the net's layout

    # The two projections are best-response layers of their own: their parameters are reported there.
    def general_parameters(self) -> list[nn.Parameter]:
        return []

    def response_parameters(self) -> list[nn.Parameter]:
        return []

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if query.dim() != 3:
            raise ValueError(f"a best-response attention takes batched 3-D inputs (got query {tuple(query.shape)})")
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        same = query is key and key is value
        if not self.batch_first:  # the gates index examples in dimension 0
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, tgt, e = query.shape
        src = key.shape[1]
        if same:
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
        else:  # cross-attention: each input through its third of the packed projection
            q = self.in_proj(query)[..., :e]
            k = self.in_proj(key)[..., e:2 * e]
            v = self.in_proj(value)[..., 2 * e:]
        q, k, v = (t.reshape(n, -1, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        mask = self._mask(attn_mask, key_padding_mask, n, tgt, src, q.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            attention = torch.softmax(scores, dim=-1)
            if p > 0:
                attention = F.dropout(attention, p)
            out = attention @ v
            weights = attention.mean(1) if average_attn_weights else attention
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(n, tgt, e))
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _mask(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, n: int, tgt: int,
              src: int, dtype: torch.dtype) -> torch.Tensor | None:
        """One additive float mask ``(n, heads, tgt, src)`` (or broadcastable) from PyTorch's two masks:
        boolean ``True`` is -inf (not attended), float masks are added, as ``nn.MultiheadAttention``."""
        def additive(m: torch.Tensor) -> torch.Tensor:
            if m.dtype == torch.bool:
                return torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf"))
            return m.to(dtype)

        mask = None
        if attn_mask is not None:
            mask = additive(attn_mask)
            mask = mask.view(1, 1, tgt, src) if mask.dim() == 2 else mask.view(n, self.num_heads, tgt, src)
        if key_padding_mask is not None:
            padding = additive(key_padding_mask).view(n, 1, 1, src)
            mask = padding if mask is None else mask + padding
        return mask

    @torch.no_grad()
    def plain(self, cond: torch.Tensor | None) -> nn.Module:
        """The ``nn.MultiheadAttention`` this module computes at gate input ``cond``."""
        inner, outer = self.in_proj.plain(cond), self.out_proj.plain(cond)
        bias = inner.bias is not None
        shell = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout, bias=bias,
                                      batch_first=self.batch_first)
        shell = shell.to(device=inner.weight.device, dtype=inner.weight.dtype)
        shell.in_proj_weight.copy_(inner.weight)
        shell.out_proj.weight.copy_(outer.weight)
        if bias:
            shell.in_proj_bias.copy_(inner.bias)
            shell.out_proj.bias.copy_(outer.bias)
        return shell

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}")
