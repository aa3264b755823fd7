"""The per-forward hyperparameter state shared by a :class:`~selftune.nn.HyperNet` and its layers.

A user's ``forward`` keeps its signature: best-response layers and hyperparameter-driven regularisers
read the current per-example hyperparameters from this shared object instead of from arguments.
The state is set only for the duration of one forward pass (:meth:`HyperState.bind`), so a stale
value can never leak into the next call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..batches import batch_axis, data_axis
from ..errors import ConfigError
from ..space import Space


@dataclass
class HyperState:
    """What the modules of one HyperNet see during a forward pass.

    Attributes:
        space: the hyperparameter space (for name -> column lookups).
        values: ``(B, H)`` constrained per-example hyperparameters, integers rounded.
        cond: ``(B, 2H)`` gate input of best-response layers, or ``None`` to skip the response path
            (plain training, or Delta-STN at the unperturbed point where the response is exactly 0).
        generator: random source for dropout masks (the tuner's, so runs are reproducible).
        read: names of the hyperparameters some module has read (a declared one that is never read
            drives nothing in the model).
        norms: while :meth:`~selftune.nn.HyperNet.recording_norms` is active, each best-response layer
            stores here the per-example squared norm of its *effective* weights (general plus
            response), keyed by the layer, with the weights that norm covers.
        relax: while :meth:`~selftune.nn.HyperNet.relaxed` is active, the temperature of the concrete
            (relaxed Bernoulli) dropout masks, which makes a training loss differentiable in the rates
            (implicit differentiation needs that); ``None``: ordinary masks.
        batch_dim: where the model's activations hold the examples (0: batch-first; 1: sequence-first
            models), as :func:`~selftune.batches.batch_axis` reads it.
    """

    space: Space
    values: torch.Tensor | None = None
    cond: torch.Tensor | None = None
    generator: torch.Generator | None = None
    _active: bool = field(default=False, repr=False)
    read: set[str] = field(default_factory=set, repr=False)
    norms: dict[int, tuple[list[torch.nn.Parameter], torch.Tensor]] | None = field(default=None, repr=False)
    relax: float | None = field(default=None, repr=False)
    batch_dim: int = 0

    def record_norm(self, module: torch.nn.Module, covered: list[torch.nn.Parameter], norm: torch.Tensor) -> None:
        """Store ``module``'s ``(B,)`` squared effective-weight norm if norms are being recorded (a
        layer called twice in one pass, like a tied embedding, is counted once)."""
        if self.norms is not None:
            self.norms[id(module)] = (covered, norm)

    @contextmanager
    def bind(self, values: torch.Tensor, cond: torch.Tensor | None,
             generator: torch.Generator | None) -> Iterator[None]:
        if self._active:
            raise RuntimeError("HyperNet forward passes cannot be nested")
        self.values, self.cond, self.generator, self._active = values, cond, generator, True
        try:
            yield
        finally:
            self.values, self.cond, self.generator, self._active = None, None, None, False

    def batch_axis(self, t: torch.Tensor) -> int:
        """The dimension of activation ``t`` that holds this pass's examples (see :func:`batch_axis`)."""
        if self.values is None:
            return 0
        return batch_axis(t, self.values.shape[0], self.batch_dim)

    def data_axis(self, t: torch.Tensor) -> int:
        """The dimension of ``t`` holding the examples when ``t`` is laid out as data (token ids fed to an
        embedding): a ``(T, B)`` tensor with ``T == B`` is read sequence-first (see :func:`data_axis`)."""
        if self.values is None:
            return 0
        return data_axis(t, self.values.shape[0], self.batch_dim)

    def value(self, name: str) -> torch.Tensor:
        """``(B,)`` per-example value of one hyperparameter.

        Raises:
            RuntimeError: when called outside a HyperNet forward pass.
            LookupError: for a name the space does not declare.
        """
        if self.values is None:
            refuse_recomputation()
            raise RuntimeError(f"hyperparameter {name!r} read outside a HyperNet forward pass")
        self.read.add(name)
        return self.values[:, self.space.index(name)]


def refuse_recomputation() -> None:
    """Raise when a selftune module runs inside a backward pass: ``torch.utils.checkpoint`` recomputes a
    block there, after its HyperNet forward pass has ended, so the pass's hyperparameters, responses and
    dropout masks are gone; the recomputed block would read none (a crash) or compute the plain layer (a
    gradient of another function than the loss's, silently).

    Raises:
        ConfigError: naming ``model``.
    """
    if torch._C._current_graph_task_id() != -1:
        raise ConfigError("model", "a selftune layer ran again during the backward pass (torch.utils.checkpoint "
                                   "recomputes its block there), after its HyperNet forward pass had ended, so that "
                                   "pass's hyperparameters and dropout masks are gone; selftune does not support "
                                   "gradient checkpointing: remove it around blocks that hold selftune layers")


class HyperModule(torch.nn.Module):
    """Base of every module that reads hyperparameters; :func:`~selftune.hypernetize` binds it."""

    _hyper_state: HyperState | None = None

    def bind_state(self, state: HyperState) -> None:
        # A plain attribute, not a submodule or buffer: the state is transient and never saved.
        object.__setattr__(self, "_hyper_state", state)

    @property
    def hyper_state(self) -> HyperState:
        if self._hyper_state is None:
            fixed = (f"; or, to train it as a plain model (your class loaded from an exported state_dict, which "
                     f"holds no rates), give it a constant rate: module.fixed = p (result.hparams[{self.name!r}])"
                     if hasattr(self, "fixed") and isinstance(getattr(self, "name", None), str) else "")
            raise RuntimeError(
                f"{type(self).__name__} is not attached to a HyperNet: wrap the model with "
                f"selftune.hypernetize(model, space) before calling it{fixed}")
        return self._hyper_state
