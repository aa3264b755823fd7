"""The loss, and the loss-side hyperparameters: weight decay and label smoothing, per example.

The loss is cross-entropy unless the user gives their own (``loss(outputs, targets) -> scalar``:
regression, multi-label, sequence or anything else). The hyperparameters enter only the *training*
loss: the hyper step scores the plain loss on validation data, so they, like dropout rates, are
tuned through the best-response path (how the weights respond to them decides the validation loss).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

Lookup = Callable[[str], torch.Tensor]
#: A user's loss: ``loss(outputs, targets)`` returns the batch's mean loss as a scalar tensor.
LossFn = Callable[[Any, Any], torch.Tensor]


def flatten_tokens(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence outputs ``(B, T, C)`` with targets ``(B, T)`` become ``(B*T, C)`` and ``(B*T,)``:
    a language model's loss is the mean over every predicted token. Classifier outputs pass unchanged."""
    if logits.dim() > 2:
        return logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    return logits, target


def smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: torch.Tensor, *,
                           differentiable: bool = False) -> torch.Tensor:
    """Mean cross-entropy with a per-example label-smoothing rate ``smoothing`` ``(B,)``.

    Example ``i`` scores ``(1 - s_i) * nll_i + s_i * mean_k(-log p_ik)``, which equals
    ``F.cross_entropy(..., label_smoothing=s)`` when every ``s_i = s``.
    """
    logp = F.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    uniform = -logp.mean(dim=-1)
    s = (smoothing if differentiable else smoothing.detach()).to(logits.dtype)
    return ((1 - s) * nll + s * uniform).mean()


def cross_entropy(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The default loss: mean cross-entropy, per predicted token for sequence outputs."""
    return F.cross_entropy(*flatten_tokens(outputs, target))


@dataclass(frozen=True)
class Objective:
    """The training and validation loss, with optional loss-side hyperparameters.

    Args:
        weight_decay: hyperparameter name (or constant) multiplying ``0.5 * sum ||W||^2`` over the
            weight matrices and kernels of the network (biases excluded).
        label_smoothing: hyperparameter name (or constant) for the label-smoothing rate (only with
            the default cross-entropy: a custom loss has no labels to smooth).
        loss: ``loss(outputs, targets) -> scalar`` mean loss of a batch; ``None``: cross-entropy.
            It is both the training loss (plus the decay) and what the hyper steps minimise on
            validation data, so it must be differentiable in the outputs.

    Raises:
        ValueError: label smoothing together with a custom loss.
    """

    weight_decay: str | float | None = None
    label_smoothing: str | float | None = None
    loss: LossFn | None = None

    def __post_init__(self) -> None:
        for field_name in ("weight_decay", "label_smoothing"):
            value = getattr(self, field_name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, str | int | float)):
                raise TypeError(f"objective.{field_name} must be a hyperparameter's name or a number (got "
                                f"{type(value).__name__}); one decay applies to every weight matrix and kernel "
                                "(per-layer decays are not supported yet), so name one hyperparameter for all")
        if self.loss is not None and self.label_smoothing is not None:
            raise ValueError("objective.label_smoothing applies to the default cross-entropy only; remove it, or "
                             "smooth the targets inside your own loss")
        if self.loss is not None and not callable(self.loss):
            raise TypeError(f"loss must be a callable loss(outputs, targets) -> scalar tensor (got "
                            f"{type(self.loss).__name__})")

    def hyperparameters(self) -> set[str]:
        return {v for v in (self.weight_decay, self.label_smoothing) if isinstance(v, str)}

    @staticmethod
    def _per_example(spec: str | float, lookup: Lookup, batch: int, like: torch.Tensor) -> torch.Tensor:
        if isinstance(spec, str):
            return lookup(spec)
        return torch.full((batch,), float(spec), device=like.device, dtype=like.dtype)

    def train_loss(self, logits: torch.Tensor, target: torch.Tensor, lookup: Lookup,
                   decayed: Iterable[torch.Tensor] = (), *, norms: torch.Tensor | None = None,
                   differentiable: bool = False) -> torch.Tensor:
        """Training loss at per-example hyperparameters ``lookup(name) -> (B,)``; sequence outputs
        ``(B, T, C)`` average over tokens, each token at its example's hyperparameters.

        Weight decay penalises ``0.5 * mean_i(wd_i * norms_i)`` when ``norms`` (the ``(B,)`` squared
        norms of each example's effective weights, from :meth:`~selftune.nn.HyperNet.recording_norms`)
        is given, else ``0.5 * mean(wd) * sum ||p||^2`` over ``decayed``.

        ``differentiable``: keep the loss's dependence on the decay and smoothing rates (implicit
        differentiation takes the mixed derivative in weights and hyperparameters); otherwise they
        are constants of the weight step."""
        if self.loss is not None:
            loss = self.eval_loss(logits, target)
        elif self.label_smoothing is None:
            loss = cross_entropy(logits, target)
        else:
            tokens = logits[0].numel() // logits.shape[-1]  # predictions per example (1 for classifiers)
            flat_logits, flat_target = flatten_tokens(logits, target)
            smoothing = self._per_example(self.label_smoothing, lookup, logits.shape[0], logits)
            loss = smoothed_cross_entropy(flat_logits, flat_target, smoothing.repeat_interleave(tokens),
                                          differentiable=differentiable)
        if self.weight_decay is not None:
            # A constant decay is one value for every example; a named one is read per example.
            wd = self._per_example(self.weight_decay, lookup, 1, loss)
            wd = wd if differentiable else wd.detach()
            if norms is not None:
                loss = loss + 0.5 * (wd * norms).mean()
            else:
                loss = loss + 0.5 * wd.mean() * sum((p * p).sum() for p in decayed)
        return loss

    def eval_loss(self, outputs: Any, target: Any) -> torch.Tensor:
        """Validation/test loss: the plain loss (cross-entropy per token for sequences, or the user's),
        whatever the hyperparameters.

        Raises:
            TypeError: a custom loss that returns something other than a scalar tensor.
        """
        if self.loss is None:
            return cross_entropy(outputs, target)
        value = self.loss(outputs, target)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(f"loss must return the batch's mean loss as a scalar tensor (got {shape}); reduce it "
                            "with .mean()")
        return value.reshape(())
