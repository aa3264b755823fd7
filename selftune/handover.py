"""``delta-ift``: Delta-STN until the run shows that the model over-fits, implicit hypergradients after.

Why: measured on the suite (docs/benchmarks/README.md), Delta-STN's one-step response wins wherever the
model is still learning (every digits start, every over-regularised start) and barely moves the
regularisation once the model over-fits; the implicit-function-theorem hypergradient (``ift``,
:mod:`selftune.implicit`) wins from starts that clearly over-fit (diabetes, Adult from no
regularisation) and loses where the weights are far from a training optimum, which it assumes. Which
regime a user's run is in is not known in advance, but the run shows it in its validation loss, read
here per epoch on the full validation set.

The rule: from the end of the warm-up, track the best epoch validation loss; once it has not improved for
as many epochs as it took to reach that best, and for at least ``tuner.handover_patience`` of the run's
epochs (2 at the least), and has stood on average ``tuner.handover_rise`` (10%) above that best since,
hand over for the rest of the run.

* The wait reads the run's own time scale: a validation loss that peaked at epoch 2 of 150 and has been
  rising since (a wide MLP on 150 diabetes patients) hands over at epoch ~20; one whose best keeps
  arriving a few noisy epochs apart until late in the run (the digits MLP, validation loss 0.12 +- 0.01
  from epoch 9 to 40) rarely does, because each new best doubles the wait. A plain patience of 10% of
  the run handed over on 7 of 9 digits cases (epochs 13-30), and the implicit steps that followed more
  than doubled digits' test loss (seed 0: 0.117 against Delta-STN's 0.052 from the over-fitting start,
  0.167 against 0.079 from the default one).
* The rise tells a model that over-fits from one whose validation loss only stalls: on adult-mlp-small
  the wait alone passed by epoch 8 from every start, while the loss since the best stood 64-91% above it
  from no regularisation (where ``ift`` wins) and 0-14% from the default and over-regularised starts
  (where Delta-STN does).

After the handover the weight steps are plain steps at the current hyperparameters (the response paths
stop training: their cost ends too), and every hyper step takes the implicit hypergradient on the last
training batch, through the same hyperparameter optimizer, re-planned (:meth:`DeltaIFT._hand_over`). The
epoch of the handover is recorded in the run's algorithm state (checkpointed, so a resumed run hands over
exactly where an uninterrupted one does) and reported by :func:`handover_epoch`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from .algorithms import DeltaSTN, register
from .implicit import ImplicitDifferentiation, spacing

if TYPE_CHECKING:
    from .settings import TunerSettings
    from .tuner import SelfTuner

#: The fewest epochs without improvement that count as a stall, whatever the run's length.
MIN_PATIENCE = 2
#: RMSprop's momentum after the handover (the implicit hypergradient is noisy; Adam's beta1).
HANDOVER_MOMENTUM = 0.9


def handover_epoch(algorithm_state: dict[str, Any]) -> int | None:
    """The epoch after which a ``delta-ift`` run took implicit hypergradients (``None``: it did not)."""
    epoch = algorithm_state.get("handover_epoch")
    return None if epoch is None else int(epoch)


def patience(settings: TunerSettings, epochs: int, improving: int) -> int:
    """Epochs without a new best validation loss that trigger the handover, in a run of ``epochs`` whose
    validation loss improved for ``improving`` tuning epochs before its best: at least as long as it
    improved, and at least ``handover_patience`` of the run (2 epochs at the least)."""
    return max(MIN_PATIENCE, math.ceil(settings.handover_patience * epochs), improving)


@register
class DeltaIFT(DeltaSTN):
    """Delta-STN that hands over to implicit differentiation once the validation loss shows over-fitting
    (module docstring)."""

    name = "delta-ift"
    description = "Delta-STN, then implicit hypergradients once the model over-fits (the default)"
    #: ``tuner.compute_budget`` when unset: the default method costs at most two plain runs
    default_budget = 2.0

    def __init__(self, settings: TunerSettings, lr: float | None = None) -> None:
        super().__init__(settings, lr)
        self._implicit = ImplicitDifferentiation(settings, lr)

    @staticmethod
    def handed_over(tuner: SelfTuner) -> bool:
        return handover_epoch(tuner.log.algorithm) is not None

    def uses_implicit(self, tuner: SelfTuner) -> bool:
        return self.handed_over(tuner)

    def hyper_interval(self, tuner: SelfTuner) -> int:
        """Delta-STN's ``train_steps`` until the handover, then the spacing planned at the handover
        (:meth:`_hand_over`) so the whole run stays within its compute budget."""
        if not self.handed_over(tuner):
            return self.settings.train_steps
        return int(tuner.log.algorithm.get("hyper_interval", self.settings.train_steps))

    def step(self, tuner: SelfTuner, x: Any, y: Any) -> float:
        if not self.handed_over(tuner):
            return super().step(tuner, x, y)
        self._implicit.remember(tuner, x, y)
        return tuner.weight_step(x, y, None, self.lr_group, respond=False)

    def hypergradient(self, tuner: SelfTuner, x: Any, y: Any) -> torch.Tensor:
        val_loss = self._implicit.hypergradient(tuner, x, y)
        opt, hparams = tuner.optimizers["hyper"], tuner.net.hparams
        if isinstance(opt, torch.optim.RMSprop) and not opt.state[hparams] and hparams.grad is not None:
            # RMSprop has no bias correction: from an empty state its first steps are 1 / sqrt(1 - alpha)
            # = 10x its rate, which after a handover threw the input dropout of the diabetes MLP from 0.03
            # to 0.75 in a few steps. Its running average starts at the first implicit hypergradient's
            # square instead, so the first step is the planned move, as Adam's would be.
            state = opt.state[hparams]
            state["step"] = torch.zeros((), dtype=torch.get_default_dtype())
            state["square_avg"] = hparams.grad.detach().pow(2).clone()
            if opt.param_groups[0]["momentum"] > 0:
                state["momentum_buffer"] = torch.zeros_like(hparams)
            if opt.param_groups[0]["centered"]:
                state["grad_avg"] = torch.zeros_like(hparams)
        if hparams.grad is not None:
            # which hyperparameters the implicit hypergradient reaches (an augmentation's strength has no
            # gradient through its draws, so it stays where Delta-STN left it): the explanation says so
            seen = tuner.log.algorithm.get("implicit_seen") or [False] * hparams.numel()
            tuner.log.algorithm["implicit_seen"] = [bool(a or b) for a, b in zip(
                seen, (hparams.grad != 0).tolist(), strict=True)]
        return val_loss

    def on_epoch_end(self, tuner: SelfTuner, row: dict[str, float]) -> None:
        state, epoch = tuner.log.algorithm, int(row["epoch"])
        if self.handed_over(tuner) or epoch <= self.settings.warmup_epochs:
            return
        val = float(row["val_loss"])
        if val < float(state.get("best_val", math.inf)):
            state["best_val"], state["best_epoch"], state["since_best"] = val, epoch, []
            return
        state["since_best"] = [*state.get("since_best", []), val]
        epochs, best = tuner.planned_epochs, int(state.get("best_epoch", epoch))
        waited = epoch - best >= patience(self.settings, epochs, best - self.settings.warmup_epochs)
        since = state["since_best"]
        mean, best_val = sum(since) / len(since), float(state["best_val"])
        # a relative rise, of more than float rounding: from a best of exactly 0 (a task fitted perfectly) any
        # 1e-8 read as risen, and the run "over-fitted"; measured on the loss's size, so a loss of the user's
        # that is negative (a Gaussian NLL) must rise too (1.1 x -4.04 lies below -4.04: a stall read as a rise)
        rise = self.settings.handover_rise
        bar = (1 + rise) * best_val if best_val >= 0 else best_val + rise * abs(best_val)
        risen = mean >= bar and mean - best_val > 1e-6 * abs(best_val) + 1e-12
        if waited and risen and epoch < epochs:
            state["handover_epoch"] = epoch
            state["handover_lr"] = self._hand_over(tuner, epochs)

    def _hand_over(self, tuner: SelfTuner, epochs: int) -> float:
        """Re-plan the hyperparameter optimizer for implicit hypergradients; returns the per-step move.

        Its running averages hold Delta-STN's hypergradients, orders of magnitude above implicit ones (on
        diabetes the decay never moved after a handover that kept them), so they start afresh. The move
        per step is the one ``ift`` plans for its Adam: a hyperparameter pushed the same way at every hyper
        step of the whole run could cross ``tuner.hyper_travel`` units (so a late handover moves the
        values less). RMSprop (Delta-STN's) gets momentum 0.9, which averages the noisy implicit
        hypergradient as Adam's first moment does, at a rate that makes the same move; its running
        average starts at the first implicit hypergradient (:meth:`hypergradient`). The implicit steps
        cost more than Delta-STN's, so their Neumann terms, and then their spacing if need be, are fitted
        to the run's compute budget (:func:`~selftune.implicit.spacing`), and the planned steps counted
        at that spacing."""
        s, opt = self.settings, tuner.optimizers["hyper"]
        opt.state.clear()
        budget = float(s.compute_budget if s.compute_budget is not None else self.default_budget)
        interval, terms = spacing(tuner, budget)
        tuner.log.algorithm.update(budget=budget, hyper_interval=interval, neumann_terms=terms,
                                   divergences_at_plan=tuner.divergences)  # roll-backs the plan already saw
        planned = tuner.planned_hyper_steps(epochs, interval) * s.val_steps
        move = s.hyper_lr if s.hyper_lr is not None else \
            max(self._implicit.default_hyper_lr, s.hyper_travel / planned)
        group = opt.param_groups[0]  # the hyperparameters (group 1, the scales, no longer gets gradients)
        if isinstance(opt, torch.optim.RMSprop):
            group["momentum"] = HANDOVER_MOMENTUM
            group["lr"] = move * (1 - HANDOVER_MOMENTUM)
        else:
            group["lr"] = move
        return float(move)
