"""What a run did to its hyperparameters, in sentences: the end-of-run explanation.

A tuned run returns numbers; a user needs to know which hyperparameters moved and which way, which
ended on a bound of their range (the range may be too narrow), which never received a hypergradient
or drive nothing (declared but unused), and how the validation loss moved while tuning. Positions
are measured in the unit space of each transform (a share of the range, log-scaled where declared),
so "moved 3% of its range" means the same for a dropout rate and a weight decay.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .tuner import SelfTuner

__all__ = ["explain"]

#: A hyperparameter that moved less than this share of its range "barely moved".
STILL = 0.01
#: A final position within this share of a bound "ended on" that bound.
ON_BOUND = 0.01


def _units(tuner: SelfTuner, values: dict[str, float]) -> list[float]:
    space = tuner.net.space
    v = torch.tensor([float(values[n]) for n in space.names], dtype=torch.float64)
    return torch.sigmoid(space.to_unconstrained(v)).tolist()


def _moves(tuner: SelfTuner, start: dict[str, float], end: dict[str, float], indices: Iterable[int]) -> list[str]:
    """One line per tuned hyperparameter of ``indices``: how far it moved, or why it did not."""
    log, names = tuner.log, tuner.net.space.names
    u0, u1 = _units(tuner, start), _units(tuner, end)
    hyper_steps = log.counters.hyper_steps
    # delta-ift after its handover: hyperparameters the implicit hypergradient never reached stopped there
    # (a rate bound to the weights' optimizer follows its own hypergradient throughout)
    implicit = log.algorithm.get("implicit_seen")
    bound = {b.index for b in (tuner.lr_tuner, tuner.momentum_tuner) if b is not None}
    augmented = set(tuner.augment.hyperparameters()) if tuner.augment is not None else set()
    lines = []
    for i in indices:
        name = names[i]
        delta = u1[i] - u0[i]
        what = f"{name}: {start[name]:.4g} -> {end[name]:.4g}"
        if log.idle and name in log.idle:
            lines.append(f"{what}: drives nothing (no dropout, augmentation or loss term reads it)")
            continue
        if hyper_steps and not log.hypergrad_seen[i]:
            lines.append(f"{what}: never received a hypergradient in {hyper_steps} hyper steps")
            continue
        frozen = ""
        if implicit is not None and not implicit[i] and i not in bound:
            why = ("an augmentation's strength has no gradient through its draws" if name in augmented else
                   "the implicit hypergradient did not reach it")
            frozen = (f"; it stayed where Delta-STN left it after the handover (epoch "
                      f"{log.algorithm.get('handover_epoch')}): {why}")
        if abs(delta) < STILL:
            lines.append(f"{what}: barely moved (under {STILL:.0%} of its range){frozen}")
            continue
        move = f"moved {'up' if delta > 0 else 'down'} {abs(delta):.0%} of its range"
        edge = " and ended on its upper bound" if u1[i] > 1 - ON_BOUND else \
            " and ended on its lower bound" if u1[i] < ON_BOUND else ""
        lines.append(f"{what}: {move}{edge}" + (" (the range may be too narrow)" if edge else "") + frozen)
    return lines


#: A last validation loss this many times its run's lowest gets a line pointing to ``tuner.keep = "best"``.
DEGRADED = 1.5


#: A best validation loss at least this share of log C (the cross-entropy of a uniform guess over C classes)
#: gets a line saying the network learned next to nothing (a dead network from too much regularisation gives
#: no hypergradient to lower it with: stop 34's digits_bn from its over-regularised start).
UNLEARNED = 0.95


def explain(tuner: SelfTuner, kept_epoch: int | None = None,
            kept_values: dict[str, float | int] | None = None) -> list[str]:
    """One line per hyperparameter, then on the validation loss, for the run ``tuner`` holds; ``kept_epoch``:
    the epoch whose weights the run returns (``tuner.keep = "best"``), ``None`` for the last step's, and
    ``kept_values`` its hyperparameters (the lines above end at the last step's). Both default to what the
    tuner returns (:meth:`~selftune.SelfTuner.result`), so ``explain(tuner)`` describes a ``keep = "best"``
    run as it is."""
    if kept_epoch is None and tuner.settings.keep == "best":
        kept = tuner.result()
        kept_epoch, kept_values = kept.kept_epoch, kept_values or kept.hparams
    log, space = tuner.log, tuner.net.space
    start, end = log.start, tuner.net.values()
    if not start:
        return []
    lines: list[str] = []
    follow = tuner.settings.follow
    if follow is not None:
        names = ", ".join(follow.values) or "no hyperparameter"
        lr = " and the weights' learning rate" if follow.lr is not None else ""
        lines.append(f"{tuner.method}: {names}{lr} followed a recorded schedule ({len(follow.steps)} rows"
                     + (f", from {follow.source}" if follow.source else "") + ")")
    elif not tuner.algorithm.tunes:
        # hd: plain training whose bound rate (and momentum) follow their own hypergradient
        bound = {b.index for b in (tuner.lr_tuner, tuner.momentum_tuner) if b is not None and b.tune}
        if not bound:
            lines.append(f"{tuner.method}: every hyperparameter held at its init value (the baseline)")
        else:
            held = [n for i, n in enumerate(space.names) if i not in bound]
            lines.extend(_moves(tuner, start, end, sorted(bound)))
            if held:
                lines.append(f"{tuner.method}: {', '.join(held)} held at "
                             + ("its init value" if len(held) == 1 else "their init values"))
    else:
        hyper_steps = log.counters.hyper_steps
        lines.extend(_moves(tuner, start, end, range(len(space))))
        if hyper_steps == 0:
            warmup, epochs = tuner.settings.warmup_epochs, tuner.epoch
            interval = tuner.algorithm.hyper_interval(tuner)
            knob = ("tuner.train_steps" if interval <= tuner.settings.train_steps else
                    "raise tuner.compute_budget (the implicit steps' spacing follows it)")
            why = (f"{warmup} warm-up epochs cover the run" if warmup >= epochs else
                   f"the {epochs - warmup} epochs after warm-up took fewer than the {interval} weight steps "
                   "between hyper steps"
                   + ("; the batch grew (tuner.adaptive_batch), leaving fewer steps an epoch"
                      if tuner.settings.adaptive_batch is not None else "")
                   + f"; train longer or {'lower ' + knob if knob == 'tuner.train_steps' else knob}")
            lines.append(f"no hyper step was taken ({why})")
        state = log.algorithm
        if "handover_epoch" in state:
            lines.append(f"{tuner.method}: by epoch {state['handover_epoch']} the validation loss had stood above "
                         f"its best so far (epoch {state['best_epoch']}, {state['best_val']:.4f}) in every epoch "
                         f"since, so implicit hypergradients took over from Delta-STN after epoch "
                         f"{state['handover_epoch']} (the model over-fitted)")
        elif tuner.method == "delta-ift" and hyper_steps:
            lines.append(f"{tuner.method}: Delta-STN for the whole run (the validation loss never stood "
                         f"{tuner.settings.handover_rise:.0%} above its best for long enough to hand over)")
        s = tuner.settings
        cut = []
        if int(state.get("neumann_terms", s.neumann_terms)) < s.neumann_terms:
            cut.append(f"{state['neumann_terms']} Neumann terms instead of {s.neumann_terms}")
        if int(state.get("hyper_interval", 0)) > s.train_steps:
            cut.append(f"a hyper step every {state['hyper_interval']} weight steps instead of {s.train_steps}")
        if cut:
            lines.append(f"{tuner.method}: {' and '.join(cut)}, to keep the run within {state['budget']:g} plain "
                         "runs' examples (tuner.compute_budget)")
        if "budget" in state and tuner.planned_epochs:
            used = log.counters.examples / (tuner.planned_epochs * tuner.order.epoch_examples)
            if used > float(state["budget"]) + 1e-9:
                # roll-backs after the plan re-trained the steps they discarded, and those examples count (the
                # plan counted those before it); otherwise the budget went before the implicit steps began
                rolled = tuner.divergences - int(state.get("divergences_at_plan", 0))
                if rolled > 0:
                    times = "once" if rolled == 1 else f"{rolled} times"
                    why = (f"it rolled back {times}, and the steps a roll-back discards are trained again and "
                           "counted; the plan cannot foresee roll-backs")
                elif tuner.method == "delta-ift":
                    why = ("it was spent before the implicit steps began: raise tuner.compute_budget or lower "
                           "tuner.response_fraction")
                else:
                    why = "it was spent before the implicit steps began: raise tuner.compute_budget"
                lines.append(f"{tuner.method}: the run used {used:.2f} plain runs' examples, over its budget of "
                             f"{state['budget']:g} ({why})")
        if state.get("overflows"):
            lines.append(f"{tuner.method}: {state['overflows']} hyper steps skipped, their Neumann series of the "
                         "weight update overflowed (the update expands violently: a learning rate far too large "
                         "for the curvature, or weights it has already blown up)")
        plan = log.hyper_lr
        if plan.get("rule") == "travel" and hyper_steps:  # a rate no hyper step used is no news
            lines.append(f"hyper learning rate {plan['lr']:.3g}: raised from the default so that "
                         f"{plan['planned_steps']} planned hyper steps can move a hyperparameter {plan['travel']:g} "
                         "units (tuner.hyper_travel)")
    if log.divergences:
        times = "once: the run" if log.divergences == 1 else f"{log.divergences} times: each time the run"
        lines.append(f"diverged {times} went back to its last healthy state with the offending "
                     f"learning rate x{tuner.settings.divergence_lr_factor:g} (the weights' rate is now "
                     f"{tuner.weights_lr:.3g}); a rate that needs this is likely too large (events: selftune show)")
    if log.val_gave_up is not None:
        lines.append(f"the validation loss stayed above {log.val_ratio:g}x an untrained "
                     f"network's ({log.val_reference:.4g}) through {tuner.settings.max_divergences} roll-backs in a "
                     f"row, so from epoch {log.val_gave_up} on the run no longer rolled back on it: the model is "
                     "confidently wrong on some validation rows (over-fitting a small validation set, or a rate "
                     "too large; tuner.rollback_val_ratio)")
    val = [(int(r["epoch"]), r["val_loss"]) for r in log.history if not math.isnan(r["val_loss"])]
    if val:
        first, last = val[0], val[-1]
        best = min(val, key=lambda e: e[1])
        lines.append(f"validation loss: {first[1]:.4f} after epoch {first[0]} -> {last[1]:.4f} after epoch {last[0]} "
                     f"(best {best[1]:.4f} after epoch {best[0]})")
        classes = tuner._n_outputs if tuner.objective.loss is None else None  # (the default cross-entropy)
        if classes and classes > 1 and len(val) >= 2 and best[1] >= UNLEARNED * math.log(classes):
            lines.append(f"the validation loss never went below {UNLEARNED:g}x a uniform guess's (log {classes} = "
                         f"{math.log(classes):.4f}): the network learned next to nothing, and a network that learns "
                         "nothing gives the hyperparameters no signal either; from a heavily regularised start, start "
                         "lighter; otherwise check the learning rate and the data")
        kept = next((e for e in val if e[0] == kept_epoch), None)
        if kept is not None:
            which = "the last epoch's too" if kept[0] == last[0] else "not the last epoch's"
            values = "" if not kept_values else ": " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kept_values.items())
            lines.append(f"returned the weights and hyperparameters of epoch {kept[0]}, the lowest validation loss "
                         f"({kept[1]:.4f}; {which}) (tuner.keep = \"best\"){values}")
        elif kept_epoch is None and last[0] > best[0] and best[1] > 0 and last[1] > DEGRADED * best[1]:
            lines.append(f"the validation loss ended {last[1] / best[1]:.2g}x its lowest: the model returned is the "
                         f"last epoch's; tuner.keep = \"best\" would return epoch {best[0]}'s (a noisy pick on a small "
                         "validation set)")
    return lines
