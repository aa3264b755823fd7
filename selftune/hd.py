"""The learning rate as a hyperparameter, tuned online by hypergradient descent.

Hypergradient descent (Baydin et al. 2018, gbaydin/hypergradient-descent) differentiates the
training loss after a step with respect to the learning rate of the step before. The previous
update was ``delta = -lr * direction``, so ``d theta_t / d lr = delta / lr`` and

    dL(theta_t) / d log(lr) = g_t . delta_{t-1}

for any optimizer whose update is proportional to its rate (SGD, momentum, Adam): gradients that
keep pointing the way the last step went say the rate is too small, gradients that turn back say
it is too large. Upstream adds ``beta * g_t . g_{t-1}`` to the raw rate, which turns negative or
explodes under large gradients (its issue #4). This module keeps the paper's *multiplicative*,
normalised form instead, applied in the declared hyperparameter's bounded unconstrained space, and
averages that signal the way Adam averages a gradient:

    c_t = cos(g_t, delta_{t-1})               (in [-1, 1]: the size of the gradients never matters)
    u  <- clamp(u - step * m_hat(c) / sqrt(v_hat(c)))

Consecutive mini-batch gradients agree only weakly (cosines of a few hundredths on digits), so the raw
cosine moved a rate 10x too small by a fraction of the way; Adam's ratio turns a weak but consistent
signal into full steps and keeps a noisy one small. One step moves ``u`` by at most ``step`` up and
``fall x step`` down (the ratio is clipped to [-1, 1]; ``fall`` is ``settings.lr_fall``, 1 by default)
and the rate by at most a factor :data:`MAX_CHANGE` either way; the rate is ``low..high`` by construction
(the space's transform), ``u`` stays where the transform is not flat
(:data:`selftune.tuner.BOUND_MARGIN` inside each bound), and a NaN-free but exploding loss can push the
rate down at most ``fall x step`` per step. ``step`` follows the run: ``travel / planned steps``, so a
rate pushed the same way at every step crosses ``travel`` units in the run, however long the run is (the
rule of ``hyper_travel`` for the other hyperparameters).

``signal = "val"`` (``settings.lr_signal``) differentiates a validation batch's loss instead, at each
hyper step, along the weights' travel since the previous one (``theta_t - theta_s``: every step between
scaled by the rate, so ``dL_val(theta_t) / d log(lr) = g_val . (theta_t - theta_s)``, the earlier steps'
directions held fixed), in the same normalised form, one move of at most ``step`` per hyper step. It is
the validation hypergradient of RTHO (Franceschi et al. 2017) and MARTHE (Donini et al. 2020) in that
form: a rate whose steps have begun to over-fit comes down. Measured worse than the training signal
on aggregate (docs/algorithms.md), so it is an option, not the default.

Why a separate ``fall``: the risks are not symmetric. A rate 10x too large breaks the network within
the first epoch (dead units, loss at chance) long before a rate that may cross its range only once
per run has come down; a rate too small only slows training. ``lr_fall > 1`` lets it come down
faster, at a price: mini-batch noise then moves it down more than up, a ratchet that pulls a good
rate low (measured in docs/algorithms.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .layer_rates import follows
from .nn import HyperNet

__all__ = ["HypergradientLR", "HypergradientMomentum"]

#: Adam's moment decays for the normalised hypergradient (Kingma & Ba's defaults)
_BETA1, _BETA2 = 0.9, 0.999
#: One step changes the rate by at most this factor either way. ``lr_travel / planned steps`` is small in
#: a run of hundreds of steps, but a run of a few (a short run on the validation signal: 3 hyper steps)
#: would let one step move the rate 20x (measured: 0.01 -> 0.21 in one step, then a finite blow-up
#: that no roll-back caught); halving, as a roll-back does, is the largest move either way.
MAX_CHANGE = 2.0


def _following(optimizer: torch.optim.Optimizer) -> tuple[list[dict[str, Any]], list[torch.nn.Parameter],
                                                         list[float]]:
    """The groups of ``optimizer`` that train at the run's rate (:func:`~selftune.layer_rates.follows`), their
    parameters in order, and each parameter's ``lr_scale``."""
    groups = [g for i, g in enumerate(optimizer.param_groups) if follows(i, g)]
    params = [p for g in groups for p in g["params"]]
    scales = [float(g.get("lr_scale", 1.0)) for g in groups for _ in g["params"]]
    return groups, params, scales


class HypergradientLR:
    """Drives the learning rate of ``optimizer``'s first parameter group (and of the scaled layers' groups,
    ``tuner.lr_scales``, at the rate x their scale) from hyperparameter ``name``.

    Args:
        net: the HyperNet whose space declares ``name`` (its ``hparams`` hold the rate).
        name: the hyperparameter bound to the learning rate (``[tuner] lr = "name"``).
        optimizer: the weight optimizer whose first group (the network's own weights) and scaled layers'
            groups it sets.
        tune: ``False`` only applies the hyperparameter's value (fixed training, search trials).
        margin: share of the unit range kept free at each bound (the transform is flat there).
    """

    def __init__(self, net: HyperNet, name: str, optimizer: torch.optim.Optimizer, *, tune: bool,
                 margin: float, fall: float = 1.0, signal: str = "train") -> None:
        self.net, self.name, self.optimizer, self.tune = net, name, optimizer, tune
        self.index = net.space.index(name)
        self.step_size = 0.0
        self.fall = fall  # a step down may be this many times a step up (settings.lr_fall)
        self.signal = signal  # "train": every weight step's next batch; "val": each hyper step (settings.lr_signal)
        self._limits = (math.log(margin / (1 - margin)), math.log((1 - margin) / margin))
        self._previous: list[torch.Tensor] | None = None  # the last update of the group's weights
        self._before: list[torch.Tensor] | None = None
        self._anchor: list[torch.Tensor] | None = None  # "val": the weights at the previous validation gradient
        self._m = self._v = 0.0
        self._t = 0
        self.apply()

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """The weights that train at the rate: the first group's, and a scaled layer's (``tuner.lr_scales``),
        whose update the rate scales alike, so ``g . delta`` over them all is the rate's hypergradient."""
        return _following(self.optimizer)[1]

    @property
    def value(self) -> float:
        """The learning rate the hyperparameter stands for now."""
        return float(self.net.space.values_dict(self.net.hparams)[self.name])

    def apply(self) -> None:
        """Write the hyperparameter's value into the optimizer: the first group, and a scaled layer's group
        times its ``lr_scale``."""
        value = self.value
        for group in _following(self.optimizer)[0]:
            group["lr"] = value * group.get("lr_scale", 1.0)

    def plan(self, steps: int, travel: float) -> None:
        """Size the per-step move so ``travel`` unconstrained units take ``steps`` steps (on the
        validation signal, hyper steps, the first of which judges the travel from here)."""
        self.step_size = travel / max(steps, 1)
        if self.tune and self.signal == "val":
            self._anchor = [p.detach().clone() for p in self.params]

    # -- around each step of the optimizer -------------------------------------------------------
    def before_step(self) -> bool:
        """Update the rate from this step's gradients and the last update; call after ``backward``
        (and clipping), before ``optimizer.step()``. Returns whether the rate received a hypergradient."""
        moved = False
        if self.tune and self.signal == "train" and self._previous is not None:
            moved = self._descend([p.grad for p in self.params], self._previous)
        self.apply()
        if self.tune and self.signal == "train":
            self._before = [p.detach().clone() for p in self.params]
        return moved

    def observe_validation(self, grads: Sequence[torch.Tensor | None]) -> bool:
        """``signal = "val"``: step the rate on the validation gradient ``grads`` (of :attr:`params`, at
        the current weights) along the weights' travel since the previous call, then start a new travel.
        Returns whether the rate received a hypergradient."""
        if not (self.tune and self.signal == "val"):
            return False
        moved = False
        if self._anchor is not None:
            travel = [p.detach() - a for p, a in zip(self.params, self._anchor, strict=True)]
            moved = self._descend(list(grads), travel)
            # not applied here: the next weight step writes it with its schedule's factor, and the row
            # logged until then shows the rate the last step used
        self._anchor = [p.detach().clone() for p in self.params]
        return moved

    def travelled(self) -> bool:
        """Whether the weights moved since the last validation gradient (a second validation batch of
        the same round has no travel to judge)."""
        return self._anchor is None or any(not torch.equal(p.detach(), a)
                                           for p, a in zip(self.params, self._anchor, strict=True))

    def _descend(self, grads: Sequence[torch.Tensor | None], direction: Sequence[torch.Tensor]) -> bool:
        """One normalised step of ``u`` down ``cos(grads, direction)`` (the module docstring's rule)."""
        if self.step_size <= 0:
            return False
        pairs = [(g, d) for g, d in zip(grads, direction, strict=True) if g is not None]
        if not pairs:
            return False
        dot = sum(float((g.double() * d.double()).sum()) for g, d in pairs)
        g_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g, _ in pairs))
        d_norm = math.sqrt(sum(float(d.double().pow(2).sum()) for _, d in pairs))
        if not (g_norm > 0 and d_norm > 0 and math.isfinite(dot) and math.isfinite(g_norm * d_norm)):
            return False
        cosine = max(-1.0, min(1.0, dot / (g_norm * d_norm)))
        self._m = _BETA1 * self._m + (1 - _BETA1) * cosine
        self._v = _BETA2 * self._v + (1 - _BETA2) * cosine * cosine
        self._t += 1
        m_hat = self._m / (1 - _BETA1 ** self._t)
        v_hat = self._v / (1 - _BETA2 ** self._t)
        move = max(-1.0, min(1.0, m_hat / (math.sqrt(v_hat) + 1e-12)))
        before = self.value
        with torch.no_grad():
            u = self.net.hparams[self.index]
            step = self.step_size * (self.fall if move > 0 else 1.0)
            u.copy_((u - step * move).clamp(*self._limits))
        after = self.value
        if after > MAX_CHANGE * before or after < before / MAX_CHANGE:  # a short run's large step
            self._set(min(max(after, before / MAX_CHANGE), MAX_CHANGE * before))
        return cosine != 0

    def _set(self, value: float) -> None:
        """Put the hyperparameter at rate ``value`` (inside the space, off its bounds)."""
        space = self.net.space
        with torch.no_grad():
            u = space.from_dict({**space.values_dict(self.net.hparams), self.name: value})[self.index]
            self.net.hparams[self.index] = u.clamp(*self._limits)

    def limit(self, before: float) -> None:
        """Undo the part of a move from rate ``before`` beyond :data:`MAX_CHANGE` either way: the rule of this
        module's own steps, for a rate another hypergradient moved (``one-pass``'s Adam hyper step, whose
        rate the run's length sets: a 4-epoch run's 4 planned steps moved a rate 80x in one epoch)."""
        after = self.value
        if after > MAX_CHANGE * before or after < before / MAX_CHANGE:
            self._set(min(max(after, before / MAX_CHANGE), MAX_CHANGE * before))

    def after_step(self) -> None:
        """Remember the update the optimizer just made (the direction the next gradient is tested on)."""
        if self._before is not None:
            self._previous = [p.detach() - b for p, b in zip(self.params, self._before, strict=True)]
            self._before = None

    def forget(self) -> None:
        """Drop the last update (after a roll-back it no longer leads to the current weights)."""
        self._previous, self._before, self._anchor = None, None, None

    def scale(self, factor: float) -> None:
        """Multiply the rate by ``factor`` (a roll-back), staying inside the space and off its bounds."""
        self._set(max(self.value * factor, self.net.space[self.name].low))
        self.forget()
        self.apply()

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"previous": self._previous, "anchor": self._anchor, "step_size": self.step_size,
                "moments": [self._m, self._v, self._t]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._previous = state.get("previous")
        self._anchor = state.get("anchor")
        self.step_size = float(state.get("step_size", self.step_size))
        self._m, self._v, self._t = state.get("moments", [0.0, 0.0, 0])
        self._before = None
        self.apply()


class HypergradientMomentum:
    """Drives the momentum of ``optimizer``'s groups from hyperparameter ``name`` (``[tuner]
    momentum = "name"``): SGD's heavy ball, or Adam's (and AdamW's) ``beta1``, by the same normalised
    hypergradient as the rate.

    With PyTorch's heavy ball ``b_t = mu b_{t-1} + g_t`` and ``theta_{t+1} = theta_t - lr b_t``, the
    step's dependence on the momentum is ``d theta_{t+1} / d mu = -lr b_{t-1}`` (the earlier steps held
    fixed, as hypergradient descent holds them for the rate), so

        dL(theta_{t+1}) / d mu = -lr g_{t+1} . b_{t-1}

    Adam's first moment ``m_t = beta1 m_{t-1} + (1 - beta1) g_t`` steps ``theta_{t+1} = theta_t - lr
    m_hat_t / (sqrt(v_hat_t) + eps)``, so (the bias correction's own dependence on ``beta1`` left out,
    as it fades after the first steps)

        dL(theta_{t+1}) / d beta1 = -lr / (1 - beta1^t) g_{t+1} . (m_{t-1} - g_t) / (sqrt(v_hat_t) + eps)

    Either way the hypergradient is ``-g_{t+1} . d_t`` with ``d_t`` the direction the momentum adds to
    step ``t`` (the buffer before last; the preconditioned difference between the old moment and the
    new gradient). A gradient that still points along it says the steps could have carried on further
    (more momentum); one that turns against it says they overshot. The signal is the cosine of
    ``g_{t+1}`` and ``d_t``, averaged and normalised as Adam does, one move of at most ``step`` per
    weight step, the value inside the space's bounds (whose ``high`` must stay below 1).
    """

    def __init__(self, net: HyperNet, name: str, optimizer: torch.optim.Optimizer, *, tune: bool,
                 margin: float, also: Sequence[torch.optim.Optimizer] = ()) -> None:
        self.net, self.name, self.optimizer, self.tune = net, name, optimizer, tune
        #: "adam": beta1 of Adam/AdamW; "heavy_ball": SGD's momentum
        self.kind = "adam" if isinstance(optimizer, torch.optim.Adam) else "heavy_ball"
        # every other group that trains with momentum (STN's response group, Delta-STN's response
        # optimizer) takes the same value, so a momentum trains alike as a number and as a hyperparameter
        self.also = list(also)
        self.index = net.space.index(name)
        self.step_size = 0.0
        self._limits = (math.log(margin / (1 - margin)), math.log((1 - margin) / margin))
        self._older: list[torch.Tensor | None] | None = None  # b_{t-1}: the buffers before the last step
        self._m = self._v = 0.0
        self._t = 0
        self.apply()

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """The weights that train at the rate (:attr:`HypergradientLR.params`)."""
        return _following(self.optimizer)[1]

    @property
    def value(self) -> float:
        return float(self.net.space.values_dict(self.net.hparams)[self.name])

    def apply(self) -> None:
        value = self.value
        for opt in (self.optimizer, *self.also):
            for group in opt.param_groups:
                if "momentum" in group:
                    group["momentum"] = value
                elif isinstance(opt, torch.optim.Adam):
                    group["betas"] = (value, group["betas"][1])

    def plan(self, steps: int, travel: float) -> None:
        self.step_size = travel / max(steps, 1)

    def _buffers(self) -> list[torch.Tensor | None]:
        """``d_t`` of each parameter for the coming step (class docstring); call after ``backward``."""
        state = self.optimizer.state
        if self.kind == "heavy_ball":
            return [state[p].get("momentum_buffer") if p in state else None for p in self.params]
        group = self.optimizer.param_groups[0]
        _, beta2 = group["betas"]
        decay = group["weight_decay"] if not group.get("decoupled_weight_decay", False) else 0.0
        directions: list[torch.Tensor | None] = []
        for p in self.params:
            if p.grad is None:
                directions.append(None)
                continue
            g = p.grad.detach() if decay == 0 else p.grad.detach() + decay * p.detach()  # Adam's L2 joins g
            st = state[p] if p in state else {}
            step = float(st["step"]) + 1 if "step" in st else 1.0
            m = st["exp_avg"] if "exp_avg" in st else torch.zeros_like(g)
            v = beta2 * st["exp_avg_sq"] + (1 - beta2) * g * g if "exp_avg_sq" in st else (1 - beta2) * g * g
            if group.get("amsgrad") and "max_exp_avg_sq" in st:
                v = torch.maximum(st["max_exp_avg_sq"], v)
            directions.append((m - g) / ((v / (1 - beta2 ** step)).sqrt() + group["eps"]))
        return directions

    def before_step(self) -> bool:
        """Update the momentum from this step's gradients and the buffers before the last step; call
        after ``backward``, before ``optimizer.step()``. Returns whether it received a hypergradient."""
        moved = False
        if self.tune and self._older is not None and self.step_size > 0:
            # dL/dmu sums -lr_i g_i . b_i: a scaled layer's term (tuner.lr_scales) counts at its rate
            pairs = [(p.grad, b if s == 1.0 else b * s) for p, b, s in zip(
                self.params, self._older, _following(self.optimizer)[2], strict=True)
                if p.grad is not None and b is not None]
            if pairs:
                dot = sum(float((g.double() * b.double()).sum()) for g, b in pairs)
                g_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g, _ in pairs))
                b_norm = math.sqrt(sum(float(b.double().pow(2).sum()) for _, b in pairs))
                if g_norm > 0 and b_norm > 0 and math.isfinite(dot) and math.isfinite(g_norm * b_norm):
                    # dL/dmu is -lr (g . b): descending it moves mu *up* when g and b agree
                    cosine = -max(-1.0, min(1.0, dot / (g_norm * b_norm)))
                    self._m = _BETA1 * self._m + (1 - _BETA1) * cosine
                    self._v = _BETA2 * self._v + (1 - _BETA2) * cosine * cosine
                    self._t += 1
                    m_hat = self._m / (1 - _BETA1 ** self._t)
                    v_hat = self._v / (1 - _BETA2 ** self._t)
                    move = max(-1.0, min(1.0, m_hat / (math.sqrt(v_hat) + 1e-12)))
                    with torch.no_grad():
                        u = self.net.hparams[self.index]
                        u.copy_((u - self.step_size * move).clamp(*self._limits))
                    moved = cosine != 0
        self.apply()
        if self.tune:
            self._older = [None if b is None else b.detach().clone() for b in self._buffers()]
        return moved

    def after_step(self) -> None:
        """Nothing to record after the step (the buffers were copied before it)."""

    def forget(self) -> None:
        """Drop the remembered buffers (after a roll-back they no longer lead to the current weights)."""
        self._older = None

    def state_dict(self) -> dict[str, Any]:
        return {"older": self._older, "step_size": self.step_size, "moments": [self._m, self._v, self._t]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._older = state.get("older")
        self.step_size = float(state.get("step_size", self.step_size))
        self._m, self._v, self._t = state.get("moments", [0.0, 0.0, 0])
        self.apply()
