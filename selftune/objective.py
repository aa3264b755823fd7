"""Loss-side hyperparameters: weight decay and label smoothing, per example.

They enter only the *training* loss. The hyper step scores plain cross-entropy on validation data,
so these hyperparameters, like dropout rates, are tuned through the best-response path: how the
weights respond to them decides the validation loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Lookup = Callable[[str], torch.Tensor]


def flatten_tokens(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence outputs ``(B, T, C)`` with targets ``(B, T)`` become ``(B*T, C)`` and ``(B*T,)``:
    a language model's loss is the mean over every predicted token. Classifier outputs pass unchanged."""
    if logits.dim() > 2:
        return logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    return logits, target


def smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy with a per-example label-smoothing rate ``smoothing`` ``(B,)``.

    Example ``i`` scores ``(1 - s_i) * nll_i + s_i * mean_k(-log p_ik)``, which equals
    ``F.cross_entropy(..., label_smoothing=s)`` when every ``s_i = s``.
    """
    logp = F.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    uniform = -logp.mean(dim=-1)
    s = smoothing.detach().to(logits.dtype)
    return ((1 - s) * nll + s * uniform).mean()


@dataclass(frozen=True)
class Objective:
    """Classification objective with optional loss-side hyperparameters.

    Args:
        weight_decay: hyperparameter name (or constant) multiplying ``0.5 * sum ||W||^2`` over the
            weight matrices and kernels of the network (biases excluded).
        label_smoothing: hyperparameter name (or constant) for the label-smoothing rate.
    """

    weight_decay: str | float | None = None
    label_smoothing: str | float | None = None

    def hyperparameters(self) -> set[str]:
        return {v for v in (self.weight_decay, self.label_smoothing) if isinstance(v, str)}

    @staticmethod
    def _per_example(spec: str | float, lookup: Lookup, batch: int, like: torch.Tensor) -> torch.Tensor:
        if isinstance(spec, str):
            return lookup(spec)
        return torch.full((batch,), float(spec), device=like.device, dtype=like.dtype)

    def train_loss(self, logits: torch.Tensor, target: torch.Tensor, lookup: Lookup,
                   decayed: Iterable[torch.Tensor] = (), *, norms: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss at per-example hyperparameters ``lookup(name) -> (B,)``; sequence outputs
        ``(B, T, C)`` average over tokens, each token at its example's hyperparameters.

        Weight decay penalises ``0.5 * mean_i(wd_i * norms_i)`` when ``norms`` (the ``(B,)`` squared
        norms of each example's effective weights, from :meth:`~selftune.nn.HyperNet.recording_norms`)
        is given, else ``0.5 * mean(wd) * sum ||p||^2`` over ``decayed``."""
        batch = logits.shape[0]
        tokens = logits[0].numel() // logits.shape[-1]  # predictions per example (1 for classifiers)
        flat_logits, flat_target = flatten_tokens(logits, target)
        if self.label_smoothing is None:
            loss = F.cross_entropy(flat_logits, flat_target)
        else:
            smoothing = self._per_example(self.label_smoothing, lookup, batch, logits)
            loss = smoothed_cross_entropy(flat_logits, flat_target, smoothing.repeat_interleave(tokens))
        if self.weight_decay is not None:
            wd = self._per_example(self.weight_decay, lookup, batch, logits).detach()
            if norms is not None:
                loss = loss + 0.5 * (wd * norms).mean()
            else:
                loss = loss + 0.5 * wd.mean() * sum((p * p).sum() for p in decayed)
        return loss

    @staticmethod
    def eval_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Validation/test loss: plain mean cross-entropy (per token for sequences), whatever the
        hyperparameters."""
        return F.cross_entropy(*flatten_tokens(logits, target))
