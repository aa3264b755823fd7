"""Implicit-function-theorem hypergradients with a Neumann-series inverse Hessian (Lorraine et al. 2020).

Delta-STN learns how the weights respond to the hyperparameters with a small network trained along the
run; its hypergradient sees how the validation loss changes *now* when the weights adapt a little.
From an over-fitting start that view prefers less regularisation (the measured one-direction
behaviour, docs/benchmarks/README.md). The implicit function theorem asks instead how the weights *at
the optimum of the training loss* would move:

    dL_val/dlam = dL_val/dlam (direct) - dL_val/dw . H^-1 . d2L_train/(dw dlam)

with ``H`` the Hessian of the training loss in the weights. ``H^-1`` is approximated by ``alpha *
sum_{j<=K} (I - alpha H)^j`` applied to the validation gradient (Hessian-vector products only), as the
official code (lorraine2/implicit-hyper-opt) does; ``K`` is ``tuner.neumann_terms``.

How each hyperparameter reaches ``d2L_train/(dw dlam)``:

* weight decay and label smoothing: the training loss is differentiated in them directly;
* dropout rates (embedding dropout's too): the hyper step's training loss uses concrete (relaxed Bernoulli)
  masks, a smooth function of the rate (the official RNN code's ``concrete`` dropout);
* augmentation strengths draw discrete transforms that no gradient passes: they get none, and the run's
  explanation says so ("never received a hypergradient").

Differences from the official code, and why: the Neumann step size ``alpha`` is not the weights'
learning rate (meaningless for Adam) but ``1 / (largest curvature)`` from a power iteration at the first
hyper step, halved whenever a term grows (the series diverges past ``2 / curvature``); the series uses
the last training batch (the one the weights just stepped on) rather than a fresh one, so a hyper step
costs no data draw and the data order of the run is that of ``fixed``.

Cost per hyper step: one validation forward/backward, one training forward with a differentiable
backward, ``K`` Hessian-vector products and one mixed product; counted in ``compute.examples`` as the
validation batch plus ``K + 2`` passes over the training batch. At ``K = 5`` and one hyper step every 5
weight steps that alone is 1.6 plain runs more, so ``K`` and then the spacing of the hyper steps are
fitted to a compute budget (``tuner.compute_budget``, :func:`spacing`): from the batch sizes and the
examples already spent, not from the task.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .algorithms import Fixed, register
from .batches import batch_size as batch_of
from .batches import head

if TYPE_CHECKING:
    from .nn import HyperNet
    from .tuner import SelfTuner

#: Power-iteration steps for the curvature that sets the default Neumann step size.
POWER_STEPS = 10


def spacing(tuner: SelfTuner, budget: float, *, terms_first: bool = True,
            power_iteration: bool = True) -> tuple[int, int]:
    """``(weight steps between rounds of implicit hyper steps, Neumann terms)`` from here to the end of
    the run, so that it uses at most ``budget`` plain runs' examples (``epochs x`` the training set).

    What is left of the budget after the examples already counted and the weight steps still to come
    (one pass each) pays for the hyper steps, each a validation batch plus ``K + 2`` passes over a
    training batch (and the one-off power iteration if it has not run). Fewer Neumann terms are given up
    first, down to one: measured with ``delta-ift`` on the diabetes MLP (10 seeds), 2-4 terms every 5
    steps matched 5 terms (test loss 0.504 / 0.500 against 0.504 / 0.500 from the over-fitting and the
    default start) while 5 terms every 8-9 steps, the same budget, lost (0.512 / 0.508, one seed 0.59),
    so the number of hyper steps matters more than the series' length (docs/algorithms.md has the
    table, and Adult). Only if one term does not fit are
    the rounds spaced further than ``tuner.train_steps``; at least one round remains even if the budget
    is spent (a budget below what the run already used cannot be met; ``compute.examples`` shows it).
    ``terms_first=False`` keeps all ``neumann_terms`` and only spaces the steps (the measured alternative,
    scripts/budget_variants.py). ``power_iteration=False``: the series' step size needs no power iteration
    (``one-pass`` steps with the weights' own update, :mod:`selftune.onepass`)."""
    s, order = tuner.settings, tuner.order
    n, epochs, b = order.epoch_examples, tuner.planned_epochs, order.batch_size
    plain = epochs * n
    done = min(order.epoch * n + order.pos, plain)
    # weight steps still to come, each epoch ending in its own short batch; hyper steps begin after the warm-up
    per_epoch = order.steps_left(0)
    remaining = order.steps_left(order.pos) + max(epochs - order.epoch - 1, 0) * per_epoch
    tuned_from = min(s.warmup_epochs, epochs)  # the first epoch that takes hyper steps
    steps = remaining if order.epoch >= tuned_from else (epochs - tuned_from) * per_epoch
    first = tuner.log.counters.steps + remaining - steps  # weight steps done before the first of them
    micro = s.batch_size if s.accumulate > 1 else b  # what the series differentiates
    power = POWER_STEPS * micro if power_iteration and s.neumann_lr is None \
        and "neumann_lr" not in tuner.log.algorithm else 0
    left = budget * plain - tuner.log.counters.examples - (plain - done) - power

    def cost(terms: int) -> int:  # one round of val_steps hyper steps
        return s.val_steps * (order.val_batch_size + (terms + 2) * micro)

    def taken(interval: int) -> int:  # rounds the loop takes: multiples of interval among those steps
        return (first + steps) // interval - first // interval

    dense = max(1, taken(s.train_steps))  # rounds at the closest spacing
    fits = math.floor((left / dense / s.val_steps - order.val_batch_size) / micro) - 2
    terms = min(s.neumann_terms, max(fits, min(1, s.neumann_terms))) if terms_first else s.neumann_terms
    rounds = max(1, math.floor(left / cost(terms)))
    interval = max(s.train_steps, math.ceil(steps / rounds))
    while taken(interval) > rounds and interval <= steps:
        interval += 1
    return interval, terms


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))


def _norm(a: list[torch.Tensor]) -> float:
    return float(_dot(a, a).sqrt())


@register
class ImplicitDifferentiation(Fixed):
    """Plain weight steps at the current hyperparameters; hyper steps from the implicit-function-theorem
    hypergradient (module docstring). No best-response layers are used (any net form works)."""

    name = "ift"
    tunes = True
    tunes_lr = True
    implicit = True
    default_hyper_optimizer = "adam"
    default_hyper_lr = 1e-2
    #: ``tuner.compute_budget`` when unset: Clarke et al. (2022) report 2-3x a plain run for implicit methods
    default_budget = 3.0
    description = "implicit differentiation, Neumann-series inverse Hessian (Lorraine et al. 2020)"
    #: the Neumann step size defaults to ``1 / curvature`` by power iteration (``False``: to 1)
    power_iteration = True
    halve_on_growth = True

    def __init__(self, settings: Any, lr: float | None = None) -> None:
        super().__init__(settings, lr)
        self._last: tuple[Any, Any] | None = None

    def hyper_optimizer(self, net: HyperNet) -> torch.optim.Optimizer | None:
        """The hyperparameters only: without perturbations there are no scales to learn."""
        opt, lr, _ = self.hyper_settings()
        cls = torch.optim.Adam if opt == "adam" else torch.optim.RMSprop
        return cls([{"params": [net.hparams], "lr": lr}])

    def budget(self) -> float:
        """The run's compute budget in plain runs (``tuner.compute_budget`` or :attr:`default_budget`)."""
        given = self.settings.compute_budget
        return float(given) if given is not None else self.default_budget

    def hyper_interval(self, tuner: SelfTuner) -> int:
        """Planned once, at the start of the run (:func:`spacing`), and kept in the checkpointed state."""
        state = tuner.log.algorithm
        if "hyper_interval" not in state:
            state["budget"] = self.budget()
            state["divergences_at_plan"] = tuner.divergences  # roll-backs the plan already saw (explain)
            state["hyper_interval"], state["neumann_terms"] = spacing(
                tuner, state["budget"], power_iteration=self.power_iteration)
        return int(state["hyper_interval"])

    def step(self, tuner: SelfTuner, x: Any, y: Any) -> float:
        self.remember(tuner, x, y)
        return tuner.weight_step(x, y, None, "weights", respond=False)

    def remember(self, tuner: SelfTuner, x: Any, y: Any) -> None:
        """Keep the training batch the next hyper step differentiates: its first micro-batch when
        gradients accumulate, so the second-order graph fits where one micro-batch's does."""
        k = self.settings.batch_size
        dim = tuner.net.batch_dim
        n = batch_of(x, dim)
        self._last = (x, y) if self.settings.accumulate == 1 else (head(x, k, dim, n), head(y, k, dim, n))

    def _train_gradient(self, tuner: SelfTuner, weights: list[torch.nn.Parameter]) -> list[torch.Tensor | None]:
        """``dL_train/dw`` on the last training batch, as a graph differentiable again in the weights and
        the hyperparameters (relaxed dropout masks, decay and smoothing kept as functions of ``hparams``)."""
        assert self._last is not None, "a hyper step follows a weight step"
        net, x, y = tuner.net, *self._last
        net.train()
        u = net.hparams.unsqueeze(0).expand(batch_of(x, net.batch_dim), -1)
        values = net.space.discretize(net.space.to_constrained(u))
        if tuner.augment is not None:
            x = tuner.augment(x, tuner._lookup(values.detach()), tuner.generator)
        # PyTorch's fused attention kernels (flash, memory-efficient) have no double backward; the math
        # one does, and this graph is differentiated again (a Transformer's attention). Nor has cuDNN's
        # LSTM/GRU ("Double backwards is not supported for CuDNN RNNs"): PyTorch's own CUDA kernels then run.
        with net.relaxed(self.settings.relax_temperature), sdpa_kernel(SDPBackend.MATH), tuner.kept_statistics(), \
                torch.backends.cudnn.flags(enabled=False):
            outputs = net(x, u, respond=False, generator=tuner.generator)
        loss = tuner.objective.train_loss(outputs, y, tuner._lookup(values), tuner._decayed, differentiable=True,
                                          batch_dim=net.batch_dim)
        # (None for a weight the training loss never reaches: an auxiliary head, a layer left unused)
        return list(torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True))

    def _curvature(self, tuner: SelfTuner, mapped: list[torch.Tensor], weights: list[torch.nn.Parameter]) -> float:
        """The largest |eigenvalue| of the map's Jacobian in the weights (the training loss's Hessian for
        ``ift``), by power iteration."""
        vec = [torch.randn(w.shape, generator=tuner.generator, device=w.device, dtype=w.dtype) for w in weights]
        scale = _norm(vec)
        vec = [v / scale for v in vec]
        value = 0.0
        for _ in range(POWER_STEPS):
            hv = [h if h is not None else torch.zeros_like(w) for h, w in zip(
                torch.autograd.grad(mapped, weights, grad_outputs=vec, retain_graph=True, allow_unused=True),
                weights, strict=True)]
            value = abs(float(_dot(vec, list(hv))))
            size = _norm(list(hv))
            if size == 0.0:
                break
            vec = [h / size for h in hv]
        return value

    def differentiated_at(self, tuner: SelfTuner, weights: list[torch.nn.Parameter]) -> AbstractContextManager:
        """Where the series and the mixed term are taken: the current weights (``one-pass`` puts the
        weights before the last step in place for that time)."""
        return nullcontext()

    def mapped(self, tuner: SelfTuner, weights: list[torch.nn.Parameter],
               train_grad: list[torch.Tensor]) -> list[torch.Tensor]:
        """What the implicit function theorem is applied to: a function of the weights and the
        hyperparameters that is zero where training stops. Here the training loss's gradient, whose
        Jacobian in the weights is the Hessian; ``one-pass`` uses the weights' update instead."""
        return train_grad

    def hypergradient(self, tuner: SelfTuner, x: Any, y: Any) -> torch.Tensor:
        net, s, state = tuner.net, self.settings, tuner.log.algorithm
        weights = [w for w in tuner.general_params if w.requires_grad]
        val_loss = tuner.objective.eval_loss(net(x, respond=False), y)
        raw = torch.autograd.grad(val_loss, weights, allow_unused=True)
        tuner.val_grads = dict(zip(weights, raw, strict=True))  # a validated learning rate reuses it
        val_grad = [g if g is not None else torch.zeros_like(w) for g, w in zip(raw, weights, strict=True)]
        skipped = False
        with self.differentiated_at(tuner, weights):
            train_grad = self._train_gradient(tuner, weights)
            # Weights the training loss never reaches (an auxiliary head the loss ignores, a layer left over)
            # do not move with the hyperparameters: the theorem is applied to the others. Their
            # gradient was the raw autograd error "appears to not have been used in the graph", mid-run.
            reached = [i for i, g in enumerate(train_grad) if g is not None]
            weights = [weights[i] for i in reached]
            val_grad = [val_grad[i] for i in reached]
            mapped = self.mapped(tuner, weights, [train_grad[i] for i in reached])
            if "neumann_lr" not in state:
                if s.neumann_lr is not None or not self.power_iteration:
                    state["neumann_lr"] = s.neumann_lr if s.neumann_lr is not None else 1.0
                else:
                    curvature = self._curvature(tuner, mapped, weights)
                    state["neumann_lr"] = 1.0 / curvature if curvature > 0 else 1.0
                    tuner.log.counters.examples += POWER_STEPS * batch_of(self._last[0], tuner.net.batch_dim)
            alpha = float(state["neumann_lr"])
            term = [g.detach() for g in val_grad]
            total = [t.clone() for t in term]
            used = 0
            for _ in range(int(state.get("neumann_terms", s.neumann_terms))):
                hv = [h if h is not None else torch.zeros_like(w) for h, w in zip(
                    torch.autograd.grad(mapped, weights, grad_outputs=term, retain_graph=True, allow_unused=True),
                    weights, strict=True)]
                following = [t - alpha * h for t, h in zip(term, hv, strict=True)]
                used += 1
                # (I - alpha J) expands: alpha is past 2 / curvature (one-pass keeps the official, unhalved series)
                if self.halve_on_growth and _norm(following) > _norm(term):
                    state["neumann_lr"] = alpha / 2
                    state["halvings"] = int(state.get("halvings", 0)) + 1
                    break
                term = following
                total = [a + t for a, t in zip(total, term, strict=True)]
            preconditioned = [alpha * t for t in total]
            (mixed,) = torch.autograd.grad(mapped, [net.hparams], grad_outputs=preconditioned, allow_unused=True)
            if not self.halve_on_growth and (not bool(torch.isfinite(torch.stack([t.abs().sum() for t in total])).all())
                                             or (mixed is not None and bool(torch.isinf(mixed).any()))):
                # The unhalved series overflowed: the update expands violently (weights a rate far too large
                # has already blown up). No hypergradient can be read from it, and plain training goes on
                # from these weights, so the hyper step is skipped and counted, not made a divergence
                # (measured: rolling back and halving the rate four times did not stop the overflow on a
                # digits network a rate 10x too large had broken, and failed the run).
                state["overflows"] = int(state.get("overflows", 0)) + 1
                skipped = True
        if skipped:  # no gradient at all: the hyper optimizer leaves the values and its moments alone
            net.hparams.grad = None
        else:
            net.hparams.grad = -mixed.detach() if mixed is not None else torch.zeros_like(net.hparams)
        dim = tuner.net.batch_dim
        tuner.log.counters.examples += batch_of(x, dim) + (used + 2) * batch_of(self._last[0], dim)
        return val_loss.detach()


# the algorithms that build on this one register after it (see the end of selftune.algorithms)
from . import handover as _handover  # noqa: E402,F401  (delta-ift: Delta-STN, then these hypergradients)
from . import onepass as _onepass  # noqa: E402,F401  (one-pass: these hypergradients without a response)
