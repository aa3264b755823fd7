"""The self-tuning loop: weights and hyperparameters trained together in one run.

``SelfTuner.fit`` reads top to bottom as the STN alternation: after a warm-up that trains only the
weights (at perturbed hyperparameters), every ``train_steps`` weight steps are followed by
``val_steps`` hyperparameter steps on validation batches. The method decides what a weight step is:

* ``fixed``: one plain step at the current hyperparameters (the baseline; response path off);
* ``stn``: one step of every weight at per-example perturbed hyperparameters;
* ``delta-stn``: a step of the general weights at the unperturbed hyperparameters, then a step of
  the response weights at perturbed ones (Bae & Grosse 2020).

A hyperparameter step runs the model in eval mode (no dropout, no augmentation) on a validation
batch, so the hyperparameters get their gradient only through the best-response layers, and
minimises ``L_val - tau * entropy(sigma)``.

Everything random comes from one ``torch.Generator`` owned by the tuner, and ``state_dict`` holds
it together with the data order and position, so a restored tuner continues bit-for-bit.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset, default_collate

from .augment import Augment
from .nn.hypernet import HyperNet
from .objective import Objective, flatten_tokens
from .settings import METHODS, TunerSettings

__all__ = ["Callback", "DivergenceError", "FitResult", "NonFiniteError", "SelfTuner", "evaluate"]

DataLike = Dataset | tuple[torch.Tensor, torch.Tensor]


def _as_dataset(data: DataLike, what: str) -> Dataset:
    if isinstance(data, tuple):
        if len(data) != 2 or not all(isinstance(t, torch.Tensor) for t in data):
            raise TypeError(f"{what} must be a Dataset or an (inputs, targets) pair of tensors")
        return TensorDataset(*data)
    if not isinstance(data, Dataset):
        raise TypeError(f"{what} must be a Dataset or an (inputs, targets) pair of tensors, got {type(data).__name__}")
    if len(data) == 0:  # type: ignore[arg-type]
        raise ValueError(f"{what} is empty")
    return data


def _take(data: Dataset, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, TensorDataset):
        x, y = (t[index] for t in data.tensors)
    else:
        x, y = default_collate([data[i] for i in index.tolist()])
    return x, y


def _batches(n: int, size: int) -> int:
    return max(1, math.ceil(n / size))


@torch.no_grad()
def evaluate(net: HyperNet, data: DataLike, batch_size: int = 512,
             device: torch.device | str | None = None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``net`` at its current hyperparameters (eval mode); for
    sequence models, per predicted token (``exp`` of the loss is the perplexity). Batches go to
    ``device``, by default the net's."""
    data = _as_dataset(data, "data")
    device = device or net.hparams.device
    was_training = net.training
    net.eval()
    total_loss, correct, count = 0.0, 0, 0
    n = len(data)  # type: ignore[arg-type]
    for start in range(0, n, batch_size):
        x, y = _take(data, torch.arange(start, min(start + batch_size, n)))
        x, y = x.to(device), y.to(device)
        logits, y = flatten_tokens(net(x), y)
        total_loss += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(-1) == y).sum())
        count += len(y)
    net.train(was_training)
    return total_loss / count, correct / count


class NonFiniteError(FloatingPointError):
    """A non-finite loss, gradient or hyperparameter; ``group`` is the optimizer to blame
    (``"hyper"`` or a weight group)."""

    def __init__(self, what: str, group: str, step: int) -> None:
        super().__init__(f"{what} became non-finite at step {step}")
        self.what, self.group, self.step = what, group, step


class DivergenceError(RuntimeError):
    """The run diverged more often than ``max_divergences`` allows."""


class Callback:
    """Hooks into :meth:`SelfTuner.fit`; override what you need. ``tuner.request_stop()`` ends the fit
    cleanly after the current step (the state stays resumable)."""

    def on_fit_start(self, tuner: SelfTuner, total_steps: int) -> None: ...
    def on_step(self, tuner: SelfTuner, row: dict[str, float] | None) -> None: ...
    def on_epoch_end(self, tuner: SelfTuner, row: dict[str, float]) -> None: ...
    def on_fit_end(self, tuner: SelfTuner) -> None: ...
    def on_divergence(self, tuner: SelfTuner, info: dict[str, Any]) -> None: ...


@dataclass
class FitResult:
    """What one run produced.

    Attributes:
        net: the trained HyperNet (call it to predict at the tuned hyperparameters).
        hparams: final hyperparameters (integers rounded).
        trajectory: rows ``{step, epoch, <hparam>..., <hparam>_scale..., train_loss, val_loss}``
            every ``log_every`` steps; hyperparameter values are continuous (unrounded).
        history: one row per epoch with the full validation loss and accuracy.
        compute: ``examples`` (forwarded + backwarded, hyper steps included), ``eval_examples``
            (forward only), ``seconds``, ``steps``, ``hyper_steps``.
    """

    net: HyperNet
    hparams: dict[str, float | int]
    trajectory: list[dict[str, float]]
    history: list[dict[str, float]]
    compute: dict[str, float]


@dataclass
class _Counters:
    examples: int = 0
    eval_examples: int = 0
    seconds: float = 0.0
    steps: int = 0
    hyper_steps: int = 0


@dataclass
class _Running:
    """Losses accumulated since the last trajectory row / since the epoch started."""

    train_sum: float = 0.0
    train_n: int = 0
    val_sum: float = 0.0
    val_n: int = 0
    epoch_sum: float = 0.0
    epoch_n: int = 0


class SelfTuner:
    """Trains a :class:`~selftune.nn.HyperNet`'s weights and hyperparameters in one run.

    Args:
        net: from :func:`~selftune.hypernetize`; its form must match the method (``"stn"`` for STN,
            ``"delta"`` for Delta-STN; ``fixed`` accepts either).
        train: training data, an ``(inputs, targets)`` pair or an indexable Dataset.
        val: validation data for the hyper steps (held out from training).
        method: ``"delta-stn"``, ``"stn"`` or ``"fixed"``.
        settings: loop settings (:class:`~selftune.settings.TunerSettings`).
        objective: loss-side hyperparameters (weight decay, label smoothing).
        augment: augmentations applied to training batches at per-example strengths.
        seed: seeds the tuner's generator (data order, perturbations, masks, augmentations).
        device: where batches are moved before the forward pass.

    Raises:
        ValueError: on an unknown method or a net whose form does not fit it.
        LookupError: when the objective or augmentations name a hyperparameter the space lacks.
    """

    def __init__(self, net: HyperNet, train: DataLike, val: DataLike, *, method: str = "delta-stn",
                 settings: TunerSettings | None = None, objective: Objective | None = None,
                 augment: Augment | None = None, seed: int = 0, device: torch.device | str = "cpu") -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS} (got {method!r})")
        expected = {"stn": "stn", "delta-stn": "delta"}.get(method)
        if expected is not None and net.form != expected:
            raise ValueError(f"method {method!r} needs a net built with form={expected!r} (got {net.form!r})")
        self.net, self.method = net, method
        self.settings = settings or TunerSettings()
        self.objective = objective or Objective()
        self.augment = augment
        for name in self.objective.hyperparameters() | (augment.hyperparameters() if augment else set()):
            net.space.index(name)
        self.train_data = _as_dataset(train, "train")
        self.val_data = _as_dataset(val, "val")
        self.device = torch.device(device)
        # On the training device, so masks and perturbations are drawn where they are used.
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))
        self.seed = int(seed)
        s = self.settings
        self.val_batch_size = s.val_batch_size or s.batch_size
        self.n_train = len(self.train_data)  # type: ignore[arg-type]
        self.n_val = len(self.val_data)  # type: ignore[arg-type]
        self.batches_per_epoch = _batches(self.n_train, s.batch_size)

        # Parameter groups are fixed for the run; collecting them walks the module tree, so do it once.
        self._general, self._response = net.general_parameters(), net.response_parameters()
        self._weights = net.weight_parameters()
        make = (lambda p: torch.optim.SGD(p, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)) \
            if s.optimizer == "sgd" else (lambda p: torch.optim.Adam(p, lr=s.lr, weight_decay=s.weight_decay))
        response = {"params": self._response, "lr": s.response_lr or s.lr}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        if method == "delta-stn":
            self.optimizers["general"] = make(self._general)
            self.optimizers["response"] = make([response])
        elif method == "stn":
            self.optimizers["weights"] = make([{"params": self._general}, response])
        else:
            self.optimizers["weights"] = make(self._general)
        if method != "fixed":
            opt, lr, scale_lr = s.resolved_hyper(method)
            groups = [{"params": [net.hparams], "lr": lr}]
            if s.tune_scales:
                groups.append({"params": [net.scale_raw], "lr": scale_lr})
            cls = torch.optim.Adam if opt == "adam" else torch.optim.RMSprop
            self.optimizers["hyper"] = cls(groups)
        self._decayed = [p for p in self._general if p.dim() > 1]

        # Progress and bookkeeping: all of it is in state_dict().
        self.epoch = 0
        self.batch_in_epoch = 0
        self._perm: torch.Tensor | None = None
        self._val_perm: torch.Tensor | None = None
        self._val_pos = 0
        self.counters = _Counters()
        self._running = _Running()
        self.trajectory: list[dict[str, float]] = []
        self.history: list[dict[str, float]] = []
        self._stop = False
        self.divergences = 0
        self._good: dict[str, Any] | None = None  # last known-good state, the roll-back target

    # ------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------
    def fit(self, epochs: int, *, callbacks: Sequence[Callback] = (), max_steps: int | None = None) -> FitResult:
        """Train until ``epochs`` epochs are done (continuing from the current state).

        Args:
            epochs: total epochs of the run (not additional ones): a restored tuner resumes.
            callbacks: :class:`Callback` hooks (progress, checkpoints, logging).
            max_steps: stop after this global step count, leaving a resumable state.

        Returns:
            The :class:`FitResult` of the run so far.
        """
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1 (got {epochs})")
        self._stop = False
        for cb in callbacks:
            cb.on_fit_start(self, epochs * self.batches_per_epoch)
        self.net.to(self.device).train()
        started = time.perf_counter()
        if self._good is None:
            self.mark_good()
        try:
            while True:
                try:
                    self._loop(epochs, callbacks, max_steps, started)
                    break
                except NonFiniteError as div:
                    self._roll_back(div, callbacks)
        finally:
            self.counters.seconds += time.perf_counter() - started
        for cb in callbacks:
            cb.on_fit_end(self)
        return self.result()

    def _loop(self, epochs: int, callbacks: Sequence[Callback], max_steps: int | None, started: float) -> None:
        s = self.settings
        while self.epoch < epochs and not self._stop:
            if self._perm is None:
                self._perm = self._randperm(self.n_train)
            while self.batch_in_epoch < self.batches_per_epoch and not self._stop:
                x, y = self._train_batch()
                if self.method == "fixed":
                    loss = self._fixed_step(x, y)
                elif self.method == "stn":
                    loss = self._stn_step(x, y)
                else:
                    loss = self._delta_stn_step(x, y)
                self._record_train(loss)
                self.batch_in_epoch += 1
                self.counters.steps += 1
                tuning = self.method != "fixed" and self.epoch >= s.warmup_epochs
                if tuning and self.counters.steps % s.train_steps == 0:
                    for _ in range(s.val_steps):
                        self._hyper_step(*self._val_batch())
                row = self._log_row() if self.counters.steps % s.log_every == 0 else None
                for cb in callbacks:
                    cb.on_step(self, row)
                if max_steps is not None and self.counters.steps >= max_steps:
                    self._stop = True
            if self.batch_in_epoch >= self.batches_per_epoch:
                row = self._end_epoch(started)
                for cb in callbacks:
                    cb.on_epoch_end(self, row)

    # ------------------------------------------------------------------------------------------
    # Divergence: roll back to the last good state and lower the offending learning rate
    # ------------------------------------------------------------------------------------------
    def mark_good(self, state: dict[str, Any] | None = None) -> None:
        """Remember the current state (or ``state``, a :meth:`state_dict` of it) as the roll-back target.
        Called at fit start and at every epoch end, and by checkpointing callbacks after each checkpoint,
        so a roll-back lands exactly on the last checkpoint."""
        self._good = copy.deepcopy(state if state is not None else self.state_dict())

    def _roll_back(self, div: NonFiniteError, callbacks: Sequence[Callback]) -> None:
        assert self._good is not None
        if self.divergences >= self.settings.max_divergences:
            raise DivergenceError(
                f"run diverged {self.divergences + 1} times (last: {div}); the last good state is at step "
                f"{self._good['counters']['steps']}; lower tuner.lr / tuner.hyper_lr") from div
        count = self.divergences + 1
        self.load_state_dict(self._good)
        self.divergences = count
        groups = ["hyper"] if div.group == "hyper" else [k for k in self.optimizers if k != "hyper"]
        changes = []
        for key in groups:
            for group in self.optimizers[key].param_groups:
                old = group["lr"]
                group["lr"] = old * self.settings.divergence_lr_factor
                changes.append(f"{key} lr {old:.3g} -> {group['lr']:.3g}")
        self._good = None
        self.mark_good()  # the lowered rates are part of the new roll-back target
        info = {"step": div.step, "what": div.what, "group": div.group, "rolled_back_to": self.counters.steps,
                "divergences": count,
                "message": f"{div}; rolled back to step {self.counters.steps}; {', '.join(changes)}"}
        for cb in callbacks:
            cb.on_divergence(self, info)

    def request_stop(self) -> None:
        """Stop :meth:`fit` after the current step."""
        self._stop = True

    # ------------------------------------------------------------------------------------------
    # Steps
    # ------------------------------------------------------------------------------------------
    def _fixed_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return self._weight_step(x, y, None, "weights", respond=False)

    def _stn_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        u = self.net.perturb(x.shape[0], self.generator).detach()
        return self._weight_step(x, y, u, "weights")

    def _delta_stn_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        # General weights at the current hyperparameters: no bias from perturbed training data.
        loss = self._weight_step(x, y, None, "general")
        # Response weights at perturbed hyperparameters: learn how the weights should move.
        # They are few functions of few hyperparameters, so a share of the batch can be enough.
        keep = max(1, math.ceil(self.settings.response_fraction * x.shape[0]))
        x, y = x[:keep], y[:keep]
        u = self.net.perturb(x.shape[0], self.generator).detach()
        with self._frozen(self._general):
            self._weight_step(x, y, u, "response", linearize=self.settings.linearize)
        return loss

    def _weight_step(self, x: torch.Tensor, y: torch.Tensor, u: torch.Tensor | None, group: str,
                     respond: bool = True, linearize: bool = False) -> float:
        """One SGD step of the ``group`` weights at per-example hyperparameters ``u`` (None: current)."""
        net = self.net
        self._check(net.hparams, "hyperparameters", "hyper")
        with torch.no_grad():
            values = net.space.discretize(net.space.to_constrained(
                net.hparams.expand(x.shape[0], -1) if u is None else u))
        lookup = self._lookup(values)
        if self.augment is not None:
            x = self.augment(x, lookup, self.generator)
        net.zero_grad(set_to_none=True)
        if linearize and u is not None:
            logits = net.forward_linearized(x, u, generator=self.generator)
        else:
            logits = net(x, u, respond=respond, generator=self.generator)
        loss = self.objective.train_loss(logits, y, lookup, self._decayed)
        self._check(loss, "training loss", group)
        loss.backward()
        params = [p for g in self.optimizers[group].param_groups for p in g["params"]]
        clip = self.settings.grad_clip or math.inf
        self._check(torch.nn.utils.clip_grad_norm_(params, clip), "weight gradient", group)
        self.optimizers[group].step()
        self.counters.examples += x.shape[0]
        return loss.item()

    def _hyper_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One step of the hyperparameters (and scales) on a validation batch, in eval mode."""
        net, s = self.net, self.settings
        net.eval()
        with self._frozen(self._weights):
            net.zero_grad(set_to_none=True)
            if s.tune_scales:
                u = net.perturb(x.shape[0], self.generator)
            else:
                u = net.hparams.unsqueeze(0).expand(x.shape[0], -1)
            val_loss = self.objective.eval_loss(net(x, u), y)
            loss = val_loss - s.entropy_weight * net.entropy() if s.tune_scales else val_loss
            # The hyperparameters are bounded by construction, so a non-finite validation loss comes
            # from the weights: blame their learning rate, not the hyperparameters'.
            self._check(loss, "validation loss", "weights")
            loss.backward()
            self._check(net.hparams.grad, "hypergradient", "hyper")
            self.optimizers["hyper"].step()
            self._check(net.hparams, "hyperparameters", "hyper")
        net.train()
        self.counters.examples += x.shape[0]
        self.counters.hyper_steps += 1
        self._running.val_sum += val_loss.item()
        self._running.val_n += 1

    # ------------------------------------------------------------------------------------------
    # Helpers
    # ------------------------------------------------------------------------------------------
    def _lookup(self, values: torch.Tensor):
        index = self.net.space.index
        return lambda name: values[:, index(name)]

    @staticmethod
    @contextmanager
    def _frozen(params: list[torch.nn.Parameter]) -> Iterator[None]:
        """Skip gradients of ``params`` for one pass: their backward work is saved, not just unused."""
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, f in zip(params, flags, strict=True):
                p.requires_grad_(f)

    def _check(self, value: torch.Tensor | None, what: str, group: str) -> None:
        if value is not None and not bool(torch.isfinite(value).all()):
            raise NonFiniteError(what, group, self.counters.steps + 1)

    def _randperm(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.generator, device=self.generator.device).cpu()

    def _train_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._perm is not None
        size = self.settings.batch_size
        index = self._perm[self.batch_in_epoch * size:(self.batch_in_epoch + 1) * size]
        x, y = _take(self.train_data, index)
        return x.to(self.device), y.to(self.device)

    def _val_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.val_batch_size
        if self._val_perm is None or self._val_pos + size > self.n_val:
            self._val_perm = self._randperm(self.n_val)
            self._val_pos = 0
        index = self._val_perm[self._val_pos:self._val_pos + size]
        self._val_pos += size
        x, y = _take(self.val_data, index)
        return x.to(self.device), y.to(self.device)

    def _record_train(self, loss: float) -> None:
        r = self._running
        r.train_sum += loss
        r.train_n += 1
        r.epoch_sum += loss
        r.epoch_n += 1

    def _hparam_columns(self) -> dict[str, float]:
        net = self.net
        with torch.no_grad():
            values = net.space.to_constrained(net.hparams.double()).tolist()
            scales = net.scale.double().tolist()
        row = dict(zip(net.space.names, values, strict=True))
        row.update({f"{n}_scale": v for n, v in zip(net.space.names, scales, strict=True)})
        return row

    def _log_row(self) -> dict[str, float]:
        r = self._running
        row: dict[str, float] = {"step": self.counters.steps, "epoch": self.epoch}
        row.update(self._hparam_columns())
        row["train_loss"] = r.train_sum / r.train_n if r.train_n else math.nan
        row["val_loss"] = r.val_sum / r.val_n if r.val_n else math.nan
        r.train_sum, r.train_n, r.val_sum, r.val_n = 0.0, 0, 0.0, 0
        self.trajectory.append(row)
        return row

    def _end_epoch(self, started: float) -> dict[str, float]:
        val_loss, val_acc = evaluate(self.net, self.val_data, device=self.device)
        self.net.train()
        self.counters.eval_examples += self.n_val
        r = self._running
        row: dict[str, float] = {
            "epoch": self.epoch + 1, "step": self.counters.steps,
            "train_loss": r.epoch_sum / max(r.epoch_n, 1), "val_loss": val_loss, "val_accuracy": val_acc,
            "seconds": self.counters.seconds + time.perf_counter() - started,
        }
        row.update(self._hparam_columns())
        self.history.append(row)
        r.epoch_sum, r.epoch_n = 0.0, 0
        self.epoch += 1
        self.batch_in_epoch = 0
        self._perm = None
        self.mark_good()
        return row

    def result(self) -> FitResult:
        """The run so far as a :class:`FitResult`."""
        c = self.counters
        return FitResult(
            net=self.net, hparams=self.net.values(), trajectory=list(self.trajectory), history=list(self.history),
            compute={"examples": c.examples, "eval_examples": c.eval_examples, "seconds": c.seconds,
                     "steps": c.steps, "hyper_steps": c.hyper_steps})

    # ------------------------------------------------------------------------------------------
    # Checkpointing
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, hyperparameters, optimizers, RNG, data
        position, counters and the records so far. Holds only tensors and plain Python values, so it
        loads with ``torch.load(weights_only=True)``."""
        r = self._running
        return {
            "method": self.method,
            "net": self.net.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "generator": self.generator.get_state(),
            "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "perm": self._perm, "val_perm": self._val_perm, "val_pos": self._val_pos,
            "counters": vars(self.counters).copy(),
            "running": [r.train_sum, r.train_n, r.val_sum, r.val_n, r.epoch_sum, r.epoch_n],
            "trajectory": [dict(row) for row in self.trajectory],
            "history": [dict(row) for row in self.history],
            "divergences": self.divergences,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` into a tuner built with the same net, data and settings.

        Raises:
            ValueError: when the state was saved by a tuner of another method.
        """
        if state["method"] != self.method:
            raise ValueError(f"state was saved by method {state['method']!r}, this tuner runs {self.method!r}")
        self.net.load_state_dict(state["net"])
        for key, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][key])
        self.generator.set_state(state["generator"])
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self._perm, self._val_perm, self._val_pos = state["perm"], state["val_perm"], state["val_pos"]
        self.counters = _Counters(**state["counters"])
        ts, tn, vs, vn, es, en = state["running"]
        self._running = _Running(ts, tn, vs, vn, es, en)
        self.trajectory = [dict(row) for row in state["trajectory"]]
        self.history = [dict(row) for row in state["history"]]
        self.divergences = int(state.get("divergences", 0))
