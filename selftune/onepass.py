"""``one-pass``: implicit hypergradients of the weight update (Clarke, Oldewage & Hernandez-Lobato, ICLR 2022).

``ift`` (:mod:`selftune.implicit`) applies the implicit function theorem to the training loss's gradient,
which is zero at a training optimum. The learning rate and the momentum do not appear there (SGD and
Adam stop at the same optimum whatever their rate), so ``ift`` leaves them to hypergradient descent,
whose signal is one step long (:mod:`selftune.hd`). Clarke et al. apply the theorem to the optimizer's
*update* instead: with ``w' = w - u(w, lam)``, training stops where ``u = 0``, and

    dL_val/dlam = -dL_val/dw . (du/dw)^-1 . du/dlam

where ``lam`` now holds the rate and the momentum beside the regularisers. ``(du/dw)^-1`` is the Neumann
series ``sum_{j<=K} (I - du/dw)^j`` applied to the validation gradient (vector-Jacobian products through
one differentiable update); for plain SGD ``du/dw = lr H``, so the series is ``ift``'s with the weights'
own rate as its step size, and the regularisers get ``ift``'s hypergradient. For Adam the update's
Jacobian carries Adam's preconditioning, so the series is taken in the geometry the weights move in.

What is differentiated: the step the weights just took, from the weights, the optimizer state
(momentum buffer; Adam's moments and step count) and the rate before it, on its training batch, while
the validation gradient is taken after it (as the official code does): the weights before the step are
kept only for a step that a hyper step follows, and put back in place while the series is taken. The
update is written out as PyTorch writes it:

* ``SGD``: ``d = g + wd w``; with momentum ``b = mu buf + (1 - dampening) d`` (``b = d`` before the
  first step), ``d = b`` or Nesterov's ``d + mu b``; ``u = lr d``.
* ``Adam``/``AdamW``: ``m = beta1 m + (1 - beta1) g``, ``v = beta2 v + (1 - beta2) g^2`` (AMSGrad's
  running maximum included), ``u = lr m_hat / (sqrt(v_hat) + eps)`` with bias corrections at the next
  step count; Adam's L2 decay joins ``g``, AdamW's decoupled decay adds ``lr wd w``.

The rate is the one the last step used (schedule and batch scaling included) times ``value / value``
of the bound hyperparameter, so ``du/dlog(lr) = u``; the momentum (``[tuner] momentum``: SGD's heavy
ball or Adam's ``beta1``) enters as its value. Both then step with the other hyperparameters, through
the same hyperparameter optimizer (Adam, moves planned by ``tuner.hyper_travel``): hypergradient
descent does not touch them in this method.

Departures from the official code (rmclarke/OptimisingWeightUpdateHyperparameters), and why:

* It differentiates the step through the ``higher`` library; this writes the three supported updates
  out (tested against the optimizers' own steps), so any model that trains with them works unchanged.
  Both hold the optimizer state from before the step constant. The step's gradient is taken again on
  its batch with relaxed dropout masks (so the rates are differentiable, as in ``ift``), not the masks the
  step drew.
* The series' step size is 1 as there (the update already carries the rate), and it is not halved when a
  term grows (``ift``'s is): where the rate is too large for the curvature the terms alternate and grow in
  that direction, and that is what turns the rate's hypergradient round (measured in docs/algorithms.md).
  A series that overflows (weights a rate far too large has blown up) skips its hyper step, counted in
  the run's algorithm state as ``overflows`` and in its explanation; plain training goes on.
* ``neumann_terms`` counts Jacobian-vector products, as ``ift``'s does, so 5 (the default) sums ``j <= 5``:
  one term more than the official ``hyperparameter_rollback_distance`` of 5. One hyper step every
  ``tuner.train_steps`` weight steps (5; the paper's 10); both are fitted to ``tuner.compute_budget`` (3
  plain runs, the paper's "2-3x") as ``ift``'s are.
* With ``tuner.grad_clip`` the written-out update scales the gradient by the factor the step's clip used.
  With gradient accumulation (``tuner.accumulate``) the gradient is taken again on the step's first
  micro-batch only (as ``ift``'s), so the update differentiated approximates the step taken.
* The hyperparameters keep selftune's bounded transforms (the rate log-uniform in its declared range) in
  place of the paper's ``10^x`` and sigmoid with clipping.

Optimizers other than SGD, Adam and AdamW, and ``maximize``, are refused (a one-line ConfigError).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from .algorithms import register
from .errors import ConfigError
from .implicit import ImplicitDifferentiation
from .layer_rates import follows

if TYPE_CHECKING:
    from .tuner import SelfTuner

#: The optimizers whose update this method writes out differentiably.
SUPPORTED = ("SGD", "Adam", "AdamW")


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` whose gradient is 0, not NaN, where ``x`` is 0 (a weight that never had a gradient)."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


@register
class OnePass(ImplicitDifferentiation):
    """Implicit hypergradients of the weights' update: the learning rate, the momentum and the
    regularisers in one series (module docstring)."""

    name = "one-pass"
    #: the hypergradient reaches a bound learning rate and momentum through the update itself
    differentiates_update = True
    power_iteration = False
    halve_on_growth = False
    description = "implicit differentiation of the weight update: rate, momentum and regularisers (Clarke et al. 2022)"

    def __init__(self, settings: Any, lr: float | None = None) -> None:
        super().__init__(settings, lr)
        from .settings import optimizer_class

        cls = optimizer_class(settings.optimizer)
        if cls not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):  # the updates it differentiates
            raise ConfigError("tuner.optimizer", f"method 'one-pass' differentiates the update of "
                                                 f"{', '.join(SUPPORTED)}; got {cls.__name__}: choose one of them, "
                                                 "or method 'ift'")
        if settings.optimizer_args.get("maximize"):
            raise ConfigError("tuner.optimizer_args", "method 'one-pass' minimises the training loss: drop maximize "
                                                      "and negate the loss instead")
        #: the weights, optimizer state and rates before the last step, when a hyper step follows it
        self._before: dict[str, Any] | None = None

    def step(self, tuner: SelfTuner, x: Any, y: Any) -> float:
        self.remember(tuner, x, y)
        s = self.settings
        follows = tuner.order.epoch >= s.warmup_epochs and \
            (tuner.log.counters.steps + 1) % self.hyper_interval(tuner) == 0
        self._before = self.stash(tuner) if follows else None
        loss = tuner.weight_step(x, y, None, self.lr_group, respond=False)
        if self._before is not None:
            self.record_rates(tuner)
        return loss

    def stash(self, tuner: SelfTuner) -> dict[str, Any]:
        """Copies of the weights and of their optimizer state before a step (call :meth:`record_rates`
        after it)."""
        optimizer = tuner.optimizers[self.lr_group]
        weights = [w for w in tuner.general_params if w.requires_grad]

        def copy(state: dict[str, Any]) -> dict[str, Any]:
            return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in state.items()}

        return {"weights": [w.detach().clone() for w in weights],
                "state": {id(w): copy(optimizer.state[w]) for w in weights if w in optimizer.state}}

    def record_rates(self, tuner: SelfTuner) -> None:
        """The rates and momenta the step used (the schedule sets them inside the step)."""
        assert self._before is not None
        groups = tuner.optimizers[self.lr_group].param_groups
        self._before["groups"] = [{k: g[k] for k in ("lr", "momentum", "betas") if k in g} for g in groups]
        self._before["clip"] = tuner.clip_factor

    @contextmanager
    def differentiated_at(self, tuner: SelfTuner, weights: list[torch.nn.Parameter]) -> Iterator[None]:
        """The weights before the last step in place (the series, the training gradient and the update
        are taken there), the weights after it back afterwards; the current weights where no step was
        kept (the next update from them is differentiated instead)."""
        before = self._before
        if before is None or "groups" not in before:
            yield
            return
        after = [w.detach().clone() for w in weights]
        with torch.no_grad():
            for w, old in zip(weights, before["weights"], strict=True):
                w.copy_(old)
        torch.clear_autocast_cache()  # a user's autocast keeps low-precision copies of the weights it saw
        try:
            yield
        finally:
            with torch.no_grad():
                for w, new in zip(weights, after, strict=True):
                    w.copy_(new)
            torch.clear_autocast_cache()

    def mapped(self, tuner: SelfTuner, weights: list[torch.nn.Parameter],
               train_grad: list[torch.Tensor]) -> list[torch.Tensor]:
        """The update of each weight (module docstring), differentiable in the weights (through
        ``train_grad``) and in ``net.hparams`` (the regularisers through ``train_grad``; the bound rate
        and momentum directly): the last step's, from what :meth:`stash` kept, or else the next one's."""
        net = tuner.net
        optimizer = tuner.optimizers[self.lr_group]
        before = self._before if self._before is not None and "groups" in self._before else None
        groups = before["groups"] if before is not None else optimizer.param_groups
        values = net.space.to_constrained(net.hparams.unsqueeze(0))[0]
        where = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        adam = isinstance(optimizer, torch.optim.Adam)
        decoupled = isinstance(optimizer, torch.optim.AdamW)
        lr_bound = tuner.lr_tuner.index if tuner.lr_tuner is not None else None
        mu_bound = tuner.momentum_tuner.index if tuner.momentum_tuner is not None else None
        clip = before["clip"] if before is not None else 1.0
        updates: list[torch.Tensor] = []
        for w, g in zip(weights, train_grad, strict=True):
            g = g * clip if clip != 1.0 else g
            index = where[id(w)]
            group, settings = groups[index], optimizer.param_groups[index]
            state = before["state"].get(id(w), {}) if before is not None else optimizer.state.get(w, {})
            lr: Any = group["lr"]
            mu: Any = group["betas"][0] if adam else group.get("momentum", 0.0)
            if lr_bound is not None and follows(index, settings):  # the bound rate drives these groups
                value = values[lr_bound]
                lr = lr * value / value.detach()
            if mu_bound is not None:  # d u / d mu at the value the step used
                value = values[mu_bound]
                mu = mu + (value - value.detach())
            wd = settings["weight_decay"]
            if adam:
                coupled = not (decoupled or settings.get("decoupled_weight_decay", False))
                if wd and coupled:
                    g = g + wd * w
                beta2, eps = settings["betas"][1], settings["eps"]
                step = float(state["step"]) + 1 if "step" in state else 1.0
                m = mu * state["exp_avg"] + (1 - mu) * g if "exp_avg" in state else (1 - mu) * g
                v = beta2 * state["exp_avg_sq"] + (1 - beta2) * g * g if "exp_avg_sq" in state \
                    else (1 - beta2) * g * g
                if settings.get("amsgrad") and "max_exp_avg_sq" in state:
                    v = torch.maximum(state["max_exp_avg_sq"], v)
                u = lr * (m / (1 - mu ** step)) / (_safe_sqrt(v / (1 - beta2 ** step)) + eps)
                if wd and not coupled:
                    u = u + lr * wd * w
            else:
                d = g + wd * w if wd else g
                if mu_bound is not None or mu != 0:
                    buf = state.get("momentum_buffer")
                    b = d if buf is None else mu * buf + (1 - settings.get("dampening", 0.0)) * d
                    d = d + mu * b if settings.get("nesterov", False) else b
                u = lr * d
            updates.append(u)
        return updates
