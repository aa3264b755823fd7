"""The batch size as a run setting that can change: the learning rate that goes with it, and a batch
that grows when the gradient noise says so.

**Rate versus batch size** (Granziol et al., "Learning rates as a function of batch size", JMLR
2022). For SGD the rate that keeps the same noise-to-signal ratio grows *linearly* with the batch;
for adaptive optimizers (Adam and its kin) it grows with the *square root* of the batch. A rate tuned
at ``reference`` examples per step is used at ``batch`` as ``lr * scale`` (:func:`lr_scale`);
:func:`scaling_rule` picks the rule from the optimizer's name. ``[tuner] lr_batch_scaling`` applies it
in a run (to a changed ``batch_size`` against ``reference_batch_size``, and to a batch that grows).

**Adaptive batch size** (AdAdaGrad: Lau, Liu & Kolar 2024, timlautk/AdAdaGrad). Every ``every``
weight steps the per-example gradients ``g_i`` of the step's batch (``B`` examples, mean ``g``) give
the batch the gradient noise asks for:

* the *norm test*: ``b = sum_j Var_i(g_ij) / (eta^2 ||g||^2)`` (the variance with Bessel's
  correction, summed over every weight), i.e. the batch at which the noise of the mean gradient is
  ``eta`` times its norm;
* the *inner-product test*: ``b = Var_i(<g_i, g>) / (theta^2 ||g||^4)``, which only asks that the
  noise *along* the mean gradient be small, and so grows the batch less.

The batch never shrinks (``max(B, ceil(b))``), and stops at ``max_batch_size`` (default: the
training set). The official code sums the inner-product variance tensor by tensor, which leaves out
the covariances between tensors; here it is the variance of the inner product over all the weights
at once, the paper's definition.

The per-example gradients come from ``torch.func.vmap(torch.func.grad(...))`` over the training
loss of the network at its current hyperparameters in eval mode (no dropout noise: the test measures
the noise of *sampling* examples, which is what the batch size controls). Where the model cannot be
vmapped (in-place buffers, data-dependent control flow, inputs that are not tensors) a loop of
one-example backward passes gives the same numbers, slower. Either way the test forwards and
backwards every example of the batch once more (twice for the inner-product test), and the run's
example count includes it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

if TYPE_CHECKING:  # torch is imported where used: the settings load with the CLI, which must stay fast
    import torch

__all__ = ["AdaptiveBatchSettings", "GradientNoise", "adaptive_batch_size", "gradient_noise",
           "lr_scale", "per_example_gradients", "scaling_rule"]

Rule = Literal["linear", "sqrt"]

#: optimizers whose update is normalised by a running second moment: the rate scales with sqrt(batch)
_ADAPTIVE = {"adam", "adamw", "nadam", "radam", "adamax", "adagrad", "adadelta", "adafactor", "rmsprop",
             "sparseadam"}


def scaling_rule(optimizer: str) -> Rule:
    """``"sqrt"`` for Adam-like optimizers (a per-weight second moment divides the step), ``"linear"``
    for SGD and everything else (Granziol et al. 2022)."""
    return "sqrt" if optimizer.lower() in _ADAPTIVE else "linear"


def lr_scale(batch: float, reference: float, rule: Rule) -> float:
    """The factor of a rate tuned at ``reference`` examples per step when it trains at ``batch``.

    >>> lr_scale(512, 128, "linear"), lr_scale(512, 128, "sqrt")
    (4.0, 2.0)
    """
    if batch <= 0 or reference <= 0:
        raise ValueError(f"batch sizes must be positive (got batch={batch}, reference={reference})")
    ratio = batch / reference
    if rule == "linear":
        return ratio
    if rule == "sqrt":
        return math.sqrt(ratio)
    raise ValueError(f"unknown scaling rule {rule!r}; choose 'linear' (SGD) or 'sqrt' (Adam)")


class AdaptiveBatchSettings(BaseModel):
    """``[tuner.adaptive_batch]``: grow the batch when the gradient noise asks for it (AdAdaGrad)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    test: Literal["norm", "inner_product"] = Field(
        "norm", description="norm: the noise of the mean gradient below eta times its norm; inner_product: only "
                            "the noise along it below theta times its norm (grows the batch less)")
    eta: PositiveFloat = Field(0.1, description="norm test: allowed noise-to-norm ratio (AdAdaGrad's MNIST runs: "
                                                 "0.1; larger keeps the batch smaller)")
    theta: PositiveFloat = Field(0.1, description="inner-product test: allowed ratio")
    every: PositiveInt = Field(1, description="run the test every this many weight steps (each test costs one more "
                                              "forward and backward of the batch, two for the inner-product "
                                              "test)")
    max_batch_size: PositiveInt | None = Field(None, description="the batch never grows past this; None: the "
                                                                 "training set")


# -- per-example gradients -----------------------------------------------------------------------------
LossFn = Callable[[dict[str, "torch.Tensor"], Any, Any], "torch.Tensor"]


def per_example_gradients(loss: LossFn, params: dict[str, torch.Tensor], x: Any, y: Any, *,
                          batch_dim: int = 0, vectorize: bool = True) -> torch.Tensor:
    """The ``(B, P)`` matrix of per-example gradients of ``loss(params, x_i, y_i)``, flattened over
    ``params`` in their order.

    ``loss`` receives one-example batches (the batch axis kept, of size 1), so the model sees the
    layout it trains on. With ``vectorize`` the examples go through ``torch.func.vmap`` where ``x``
    and ``y`` are tensors; otherwise, or where vmap fails, one backward pass per example.
    """
    import torch

    from .batches import batch_size

    n = batch_size(x, batch_dim)
    detached = {k: v.detach() for k, v in params.items()}
    if vectorize and isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        try:
            return _vmapped(loss, detached, x, y, n, batch_dim)
        except Exception as err:  # any op without a batching rule: fall back to the exact loop
            warnings.warn(f"per-example gradients: vmap failed ({type(err).__name__}: {str(err)[:120]}); "
                          "using one backward pass per example", RuntimeWarning, stacklevel=2)
    return _looped(loss, detached, x, y, n, batch_dim)


def _vmapped(loss: LossFn, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, n: int,
             batch_dim: int) -> torch.Tensor:
    import torch

    from .batches import data_axis

    ax, ay = data_axis(x, n, batch_dim), data_axis(y, n, batch_dim)

    def one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return loss(p, xi.unsqueeze(ax), yi.unsqueeze(ay))

    grads = torch.func.vmap(torch.func.grad(one), in_dims=(None, ax, ay), randomness="different")(params, x, y)
    return torch.cat([grads[k].reshape(n, -1) for k in params], dim=1)


def _looped(loss: LossFn, params: dict[str, torch.Tensor], x: Any, y: Any, n: int, batch_dim: int) -> torch.Tensor:
    import torch

    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    out = []
    for i in range(n):
        value = loss(leaves, example_rows(x, i, i + 1, batch_dim, n), example_rows(y, i, i + 1, batch_dim, n))
        grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
        out.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                              for g, p in zip(grads, leaves.values(), strict=True)]))
    return torch.stack(out)


# -- the tests -----------------------------------------------------------------------------------------
class GradientNoise(dict):
    """What a test measured on one batch: ``examples`` (B), ``variance`` (the norm test's summed
    per-weight variance, or the inner-product variance), ``grad_norm_sq`` (``||g||^2``) and ``batch``
    (the batch the test asks for, before rounding and bounds)."""


def gradient_noise(chunks: Callable[[], Iterator[torch.Tensor]], test: str, ratio: float) -> GradientNoise:
    """Run ``test`` on per-example gradients delivered in chunks (rows of ``(b, P)`` matrices).

    ``chunks`` is called once for the norm test and twice for the inner-product test (which needs the
    mean gradient before the inner products), so no more than one chunk is held at a time. Sums run in
    float64: ``sum_i ||g_i||^2 - B ||g||^2`` cancels when the noise is small.
    """
    import torch

    total: torch.Tensor | None = None
    squares, n = 0.0, 0
    for g in chunks():
        g = g.double()
        total = g.sum(0) if total is None else total + g.sum(0)
        squares += float(g.pow(2).sum())
        n += g.shape[0]
    if total is None or n < 2:
        raise ValueError(f"the {test} test needs at least 2 examples (got {n})")
    mean = total / n
    norm_sq = float(mean.pow(2).sum())
    if test == "norm":
        variance = max(squares - n * norm_sq, 0.0) / (n - 1)
        wanted = variance / (ratio ** 2 * norm_sq) if norm_sq > 0 else math.inf
    elif test == "inner_product":
        dots = torch.cat([g.double() @ mean for g in chunks()])
        variance = float(dots.var(correction=1))
        wanted = variance / (ratio ** 2 * norm_sq ** 2) if norm_sq > 0 else math.inf
    else:
        raise ValueError(f"unknown test {test!r}; choose 'norm' or 'inner_product'")
    return GradientNoise(examples=n, variance=variance, grad_norm_sq=norm_sq, batch=wanted)


def adaptive_batch_size(current: int, noise: GradientNoise, limit: int) -> int:
    """The next batch: the test's, rounded up, never below ``current`` nor above ``limit``.

    A statistic that is NaN (a non-finite gradient) keeps the current batch: the batch never shrinks, so
    one bad reading would otherwise fix it at ``limit`` for the rest of the run. An infinite one (a mean
    gradient of zero with some variance: no direction to trust) asks for the limit."""
    wanted = noise["batch"]
    if math.isnan(wanted):
        warnings.warn("the adaptive batch test read a NaN statistic (non-finite gradients); the batch stays "
                      f"at {current}", RuntimeWarning, stacklevel=2)
        return int(min(current, limit))
    grown = math.ceil(wanted) if math.isfinite(wanted) else limit
    return int(min(max(current, grown), limit))


def chunked(matrix_of: Callable[[int, int], torch.Tensor], n: int, size: int) -> Callable[[], Iterator[torch.Tensor]]:
    """A re-startable iterator over ``matrix_of(start, stop)`` for consecutive chunks of ``size`` rows."""
    def run() -> Iterator[torch.Tensor]:
        for start in range(0, n, size):
            yield matrix_of(start, min(start + size, n))
    return run


def example_rows(x: Any, start: int, stop: int, batch_dim: int, n: int) -> Any:
    """Examples ``start:stop`` of a batch (the whole batch uncut)."""
    from .batches import rows

    return x if start == 0 and stop == n else rows(x, start, stop, batch_dim, n)
