"""The self-tuning loop: weights and hyperparameters trained together in one run.

``SelfTuner.fit`` reads top to bottom as the STN alternation: after a warm-up that trains only the
weights (at perturbed hyperparameters), every ``train_steps`` weight steps are followed by
``val_steps`` hyperparameter steps on validation batches. The algorithm (``fixed``, ``stn``,
``delta-stn``, ... from :data:`selftune.algorithms.ALGORITHMS`) decides what a weight step is and
owns the optimizers; the tuner owns the loop, the hyper step, the roll-back point and the
bookkeeping (:class:`~selftune.bookkeeping.BatchOrder`, :class:`~selftune.bookkeeping.RunLog`).

A hyperparameter step runs the model in eval mode (no dropout, no augmentation) on a validation
batch, so the hyperparameters get their gradient only through the best-response layers, and
minimises ``L_val - tau * entropy(sigma)``.

Everything random comes from one ``torch.Generator`` owned by the tuner, and ``state_dict`` holds
it together with the data order and position, so a restored tuner continues bit-for-bit.
"""

from __future__ import annotations

import copy
import itertools
import math
import numbers
import operator
import signal
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, Dataset, default_collate

from .algorithms import DEFAULT_ALGORITHM, Algorithm, get_algorithm
from .augment import Augment
from .batch_size import (
    AdaptiveBatchSettings,
    GradientNoise,
    adaptive_batch_size,
    chunked,
    example_rows,
    gradient_noise,
    lr_scale,
    per_example_gradients,
    scaling_rule,
)
from .batches import Fields, Kwargs, Source, batch_seed, early_workers, loader_batching, rows, to_device
from .batches import batch_size as batch_of
from .bookkeeping import NORM_GROWTH, BatchOrder, Counters, RunLog
from .errors import ConfigError, ConfigTypeError, DataError, DivergenceError, SelftuneWarning
from .hd import HypergradientLR, HypergradientMomentum
from .layer_rates import follows
from .nn import Dropout, EmbeddingDropout
from .nn.hypernet import HyperNet, copy_module, linearizable
from .objective import (
    IGNORE_INDEX,
    LossFn,
    Objective,
    classes_in_dim_1,
    classes_last,
    flatten_tokens,
    layout_of,
)
from .schedules import HyperSchedule, TorchSchedule, factor, stayed
from .settings import TunerSettings
from .validation import as_dataset, check_all_targets, check_batch, check_batch_sizes, check_targets

__all__ = ["Callback", "DivergenceError", "FitResult", "NonFiniteError", "SelfTuner", "evaluate", "score"]

#: Share of a hyperparameter's range (in the unit space of its transform) kept between a tuned init and a bound.
BOUND_MARGIN = 0.02

DataLike = Dataset | DataLoader | tuple[torch.Tensor, torch.Tensor]


def _as_source(data: Any, what: str, batch: int | None = None, batch_dim: int = 0, *,
               weighted: bool = False, workers: int | None = None) -> Source:
    """Validated ``data`` (a pair, Dataset or DataLoader) with the collate its batches need; its worker
    processes, if any, start before the checks read a first example (:func:`~selftune.batches.early_workers`)."""
    pool = early_workers(data, what, workers)
    dataset = as_dataset(data, what)
    return Source(data if isinstance(data, DataLoader) else dataset, what, batch, batch_dim, weighted=weighted,
                  dataset=dataset, workers=pool if pool is not None else 0)


def _check_loss_parameters(loss: Any, net: torch.nn.Module) -> None:
    """Refuse a loss module with trainable parameters of its own (a learnable temperature, a class-weight
    vector left trainable): the tuner trains the model's weights, so they would stay at their initial values
    while their gradients piled up, silently. The model's own parameters, held by a loss that adds a penalty
    on them (``Loss(model)``), are trained, and pass."""
    if not isinstance(loss, torch.nn.Module):
        return
    model = {id(p) for p in net.parameters()}
    trainable = [name for name, p in loss.named_parameters() if p.requires_grad and id(p) not in model]
    if trainable:
        raise ConfigError("loss", f"{type(loss).__name__} has trainable parameters ({', '.join(trainable[:3])}"
                                  f"{', ...' if len(trainable) > 3 else ''}), which nothing would train: the tuner "
                                  "trains the model's weights; move them into the model (its forward can apply "
                                  "them) or freeze them with requires_grad_(False)")


def _is_classification(outputs: Any, target: Any) -> bool:
    """Accuracy means something: class scores ``(B, [T,] C)`` (or ``(B, C, d1, ...)``, the classes in
    dimension 1) against integer labels ``(B, [T])`` (``(B, d1, ...)``)."""
    return (isinstance(outputs, torch.Tensor) and isinstance(target, torch.Tensor) and outputs.dim() >= 2
            and not target.is_floating_point()
            and (target.shape == outputs.shape[:-1] or classes_in_dim_1(outputs, target)))


Metric = Callable[[Any, Any], "torch.Tensor | float"]


@torch.no_grad()
def score(net: torch.nn.Module, data: Any, *, loss: LossFn | None = None, metrics: Mapping[str, Metric] | None = None,
          input_key: str | Sequence[str] | None = None, target_key: str | None = None, batch_size: int = 512,
          device: torch.device | str | None = None, batch_dim: int | None = None,
          classes_dim: int | None = None) -> dict[str, float]:
    """Quality of ``net`` at its current hyperparameters (eval mode) on ``data``: a HyperNet, or any plain
    module, such as the one :func:`~selftune.export` returns (so the exported model is scored the same
    way as the tuned one).

    Returns ``{"loss": ...}`` (the mean of ``loss``, by default cross-entropy per predicted token), plus
    ``"accuracy"`` where it means something (the default loss on integer class labels), plus each of
    ``metrics``: ``metric(outputs, targets)`` is a batch's mean, averaged over examples.

    Args:
        data: an ``(inputs, targets)`` pair, a Dataset or a DataLoader (its collate is used).
        loss, input_key, target_key: as :class:`SelfTuner` takes them.
        device: where batches go; by default the net's (its first parameter's or buffer's).
        batch_dim: the batch dimension of the inputs; by default the HyperNet's, 0 for a plain module (pass
            the HyperNet's ``batch_dim`` to score the exported copy of a sequence-first model).
        classes_dim: where the default cross-entropy finds the classes in outputs of 3+ dimensions (1 or -1;
            :class:`~selftune.objective.Objective`); ``None``: the first batch whose shapes tell.
    """
    if not isinstance(net, torch.nn.Module):
        raise TypeError(f"score needs a torch.nn.Module (a HyperNet or a plain model), got {type(net).__name__}")
    dim = getattr(net, "batch_dim", 0) if batch_dim is None else batch_dim
    source = _as_source(data, "data", batch_dim=dim)
    if device is None:  # where the model's weights (or, without any, its buffers) are
        device = net.hparams.device if isinstance(net, HyperNet) else \
            next((t.device for t in itertools.chain(net.parameters(), net.buffers())), torch.device("cpu"))
    else:  # (a CUDA device on a CPU build failed inside PyTorch)
        device = _usable_device(device)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError("batch_size", f"must be a whole number >= 1 (got {batch_size!r})")
    return _score(net, source, Objective(loss=loss, classes_dim=classes_dim), _checked_metrics(metrics),
                  Fields(input_key, target_key),
                  batch_size, device, dim)


def _checked_metrics(metrics: Mapping[str, Metric] | None) -> dict[str, Metric]:
    """The user's metrics, each callable and none called ``loss``: it was added into the validation loss,
    which every roll-back, ``keep = "best"`` and handover then judged. (One called ``accuracy`` is the
    user's own accuracy: with a loss of their own, selftune computes none; with the default one, theirs
    is the column.)"""
    if metrics is not None and not isinstance(metrics, Mapping):
        raise ConfigTypeError("metrics", f"takes a dict {{name: fn(outputs, targets)}} (got {type(metrics).__name__})")
    checked = dict(metrics or {})
    for name, metric in checked.items():
        if not callable(metric):
            raise ConfigTypeError(f"metrics[{name!r}]", f"must be a callable metric(outputs, targets) (got "
                                                        f"{type(metric).__name__})")
        if name == "loss":
            raise ConfigError("metrics['loss']", "'loss' is the validation loss selftune computes itself (val_loss) "
                                                 "and judges the run by; name the metric otherwise, e.g. 'my_loss'")
    return checked


@torch.no_grad()
def _score(net: torch.nn.Module, source: Source, objective: Objective, metrics: Mapping[str, Metric],
           fields: Fields, batch_size: int, device: torch.device | str, batch_dim: int | None = None
           ) -> dict[str, float]:
    loss = objective.loss
    was_training = net.training
    net.eval()
    sums: dict[str, float] = {}
    count, tokens, correct, classification = 0, 0, 0, loss is None
    layout, warned = objective.classes_dim, False
    n = len(source)
    try:
        for start in range(0, n, batch_size):
            index = torch.arange(start, min(start + batch_size, n))
            x, y = source.take(index, fields)
            if not source.checked_whole:  # a NaN input would be a NaN loss, read as a divergence
                check_batch(x, y, index if source.origin is None else source.origin[index], source.what,
                            classes=None, batch_dim=batch_dim or 0)
            x, y = to_device(x, device), to_device(y, device)
            # a plain module (export's copy) takes keyword inputs as keywords; a HyperNet unpacks them itself
            out = net(**x) if isinstance(x, Kwargs) and not isinstance(net, HyperNet) else net(x)
            b = batch_of(x, getattr(net, "batch_dim", 0) if batch_dim is None else batch_dim)
            if loss is None:
                if layout is None and isinstance(out, torch.Tensor):  # (score() of a plain module: the first batch
                    layout = layout_of(out, y)                         # whose shapes tell says it for the rest)
                    if layout is None and not warned and out.dim() > 2 and isinstance(y, torch.Tensor) and \
                            tuple(y.shape) == tuple(out.shape[:-1]) == (out.shape[0], *out.shape[2:]):
                        warned = True
                        warnings.warn(SelftuneWarning(
                            f"{source.what}: outputs {tuple(out.shape)} against targets {tuple(y.shape)} fit both "
                            "(batch, classes, length) and (batch, steps, classes); read with the classes last: pass "
                            "classes_dim=1 if they are in dimension 1"), stacklevel=3)
                logits, flat = flatten_tokens(out, y, layout)
                scored = len(flat)
                if not flat.is_floating_point() and len(flat):  # a label the outputs lack (on a GPU: no assert)
                    kept = flat[flat != IGNORE_INDEX]  # (padding: not scored, as F.cross_entropy skips it)
                    scored = len(kept)
                    low, high = (int(kept.min()), int(kept.max())) if scored else (0, 0)
                    if low < 0 or high >= logits.shape[-1]:  # the split, the example and the label, as training's
                        check_batch((), y, index if source.origin is None else source.origin[index], source.what,
                                    classes=logits.shape[-1], batch_dim=batch_dim or 0)
                        bad = low if low < 0 else high
                        raise DataError(f"{source.what}: label {bad} is outside the model's {logits.shape[-1]} "
                                        "outputs; labels must be class indices from 0 to the number of outputs - 1 "
                                        f"(or {IGNORE_INDEX}, not scored)")
                sums["loss"] = sums.get("loss", 0.0) + F.cross_entropy(logits, flat, reduction="sum").item()
                tokens += scored
                classification = classification and _is_classification(out, y)
                if classification:
                    correct += int((logits.argmax(-1) == flat).sum())
            else:
                sums["loss"] = sums.get("loss", 0.0) + objective.eval_loss(out, y).item() * b
            for name, metric in metrics.items():
                sums[name] = sums.get(name, 0.0) + float(metric(out, y)) * b
            count += b
    finally:
        net.train(was_training)
    if loss is None and count and not tokens:
        raise DataError(f"data: every label is {IGNORE_INDEX} (ignored, as padding is): there is nothing to score")
    result = {"loss": sums["loss"] / (tokens if loss is None else count)}
    if classification:
        result["accuracy"] = correct / tokens
    result.update({name: sums[name] / count for name in metrics})
    return result


def evaluate(net: torch.nn.Module, data: Any, batch_size: int = 512,
             device: torch.device | str | None = None, batch_dim: int | None = None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of a classifier ``net`` at its current hyperparameters (eval
    mode); for sequence models, per predicted token (``exp`` of the loss is the perplexity). Batches go
    to ``device``, by default the net's. For another loss or metrics, use :func:`score`."""
    result = score(net, data, batch_size=batch_size, device=device, batch_dim=batch_dim)
    return result["loss"], result.get("accuracy", math.nan)


#: what to change when a group of parameters keeps diverging (the one-line error names it)
_DIVERGENCE_FIX = {
    "hyper": "lower tuner.hyper_lr",
    "weights": "lower tuner.lr",
}
#: A jump of an unconstrained hyperparameter or perturbation scale beyond this since the roll-back point is a
#: runaway hyper step, not tuning (sigmoid(50) is 1 - 2e-22; a run moves them by units between roll-back points).
RUNAWAY = 50.0


#: ``tuner.rollback_val_ratio`` when unset, with the default cross-entropy. Why 8: of 248 suite
#: runs that did not diverge, the highest epoch-end validation loss was 3.6x log C (digits at 10x its rate, a
#: run that never learned) and the next 2.2x; a breast-cancer MLP over-fitting 4-8 validation rows went past
#: 4x at 98% test accuracy; the blow-ups it is for went on past 8x (up to 10^5x) and are caught there too
#: (docs/benchmarks/README.md, "A validation loss that blew up").
VAL_RATIO = 8.0


class NonFiniteError(FloatingPointError):
    """A non-finite loss, gradient or hyperparameter; ``group`` is the optimizer to blame
    (``"hyper"`` or a weight group)."""

    def __init__(self, what: str, group: str, step: int, how: str = "became non-finite", *,
                 epoch_end: bool = False) -> None:
        super().__init__(f"{what} {how} at step {step}")
        self.what, self.group, self.step, self.how, self.epoch_end = what, group, step, how, epoch_end

    def __reduce__(self) -> tuple:
        # copy and pickle rebuild an exception from its constructor's arguments: Ray copies a PBT
        # member's DivergenceError with this as its cause, and a plain reduce failed there
        return _rebuild_non_finite, (type(self), self.what, self.group, self.step, self.how, self.epoch_end)


def _rebuild_non_finite(cls: type[NonFiniteError], what: str, group: str, step: int, how: str,
                        epoch_end: bool) -> NonFiniteError:
    return cls(what, group, step, how, epoch_end=epoch_end)


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
        net: the trained HyperNet (call it to predict at the tuned hyperparameters): the last step's, or
            with ``TunerSettings.keep = "best"`` a copy at the epoch of the lowest validation loss.
        hparams: the hyperparameters of ``net`` (integers rounded): the final ones, or the kept epoch's.
        trajectory: rows ``{step, epoch, <hparam>..., <hparam>_scale..., train_loss, val_loss}``
            every ``log_every`` steps; hyperparameter values are continuous (unrounded).
        history: one row per epoch with the full validation loss and accuracy.
        compute: ``examples`` (forwarded + backwarded, hyper steps included), ``eval_examples``
            (forward only), ``seconds``, ``steps``, ``hyper_steps``.
        schedule: the values every hyperparameter (and the weights' rate) took over the steps, as a
            :class:`~selftune.schedules.HyperSchedule` a plain loop or a ``fixed`` run
            (``TunerSettings(follow=...)``) can follow; ``None`` before the first step.
        kept_epoch: with ``keep = "best"``, the epoch whose net this is (counted from 1); ``None`` otherwise.
    """

    net: HyperNet
    hparams: dict[str, float | int]
    trajectory: list[dict[str, float]]
    history: list[dict[str, float]]
    compute: dict[str, float]
    schedule: HyperSchedule | None = None
    kept_epoch: int | None = None


class SelfTuner:
    """Trains a :class:`~selftune.nn.HyperNet`'s weights and hyperparameters in one run.

    Args:
        net: from :func:`~selftune.hypernetize`; its form must match the algorithm (``"stn"`` for STN,
            ``"delta"`` for Delta-STN; ``fixed`` accepts either).
        train: training data: an ``(inputs, targets)`` pair of tensors, a map-style Dataset of pairs or
            dicts, or a DataLoader (its dataset and ``collate_fn``; the tuner draws its own batches).
        val: validation data for the hyper steps (held out from training), in the same forms.
        method: a registered algorithm name (``"delta-stn"``, ``"stn"``, ``"fixed"``, ...) or class.
        settings: loop settings (:class:`~selftune.settings.TunerSettings`).
        objective: loss-side hyperparameters (weight decay, label smoothing).
        augment: augmentations applied to training batches at per-example strengths.
        seed: seeds the tuner's generator (data order, perturbations, masks, augmentations).
        device: where batches are moved before the forward pass.
        loss: ``loss(outputs, targets) -> scalar``, the batch's mean loss (regression, multi-label,
            sequence, ...); ``None``: cross-entropy. The hyper steps minimise it on validation batches.
        metrics: ``{name: metric(outputs, targets)}``, each a batch's mean, reported per epoch on
            validation data (``val_<name>``) and by :meth:`score`. Accuracy is added by itself only
            where it means something (cross-entropy on integer labels).
        input_key, target_key: for dict examples, which key is the target and which the input (a
            list of keys: the model receives them as keyword arguments); see :class:`~selftune.batches.Fields`.

    Raises:
        ConfigError: an unknown method.
        DataError: data that cannot be trained on (NaN/inf inputs, labels outside the model's outputs,
            lengths that differ, empty splits, a batch larger than its split).
        TypeError: ``net`` is not a HyperNet (wrap the model with :func:`~selftune.hypernetize`).
        ValueError: a net whose form does not fit the method.
        LookupError: when the objective or augmentations name a hyperparameter the space lacks.
    """

    def __init__(self, net: HyperNet, train: DataLike, val: DataLike, *,
                 method: str | type[Algorithm] = DEFAULT_ALGORITHM,
                 settings: TunerSettings | Mapping[str, Any] | None = None,
                 objective: Objective | None = None, augment: Augment | None = None, seed: int = 0,
                 device: torch.device | str = "cpu", loss: LossFn | None = None,
                 metrics: Mapping[str, Metric] | None = None, input_key: str | Sequence[str] | None = None,
                 target_key: str | None = None) -> None:
        if not isinstance(net, HyperNet):
            raise TypeError(f"net must be a HyperNet from selftune.hypernetize(model, space) "
                            f"(got {type(net).__name__}); wrap your model first")
        if isinstance(settings, Mapping):  # settings={"lr": 0.1}: the same fields, the same one-line errors
            settings = TunerSettings(**settings)
        elif settings is not None and not isinstance(settings, TunerSettings):
            raise TypeError(f"settings must be a TunerSettings or a mapping of its fields (got "
                            f"{type(settings).__name__})")
        self.settings = settings or TunerSettings()
        cls = method if isinstance(method, type) else get_algorithm(method)
        lr_name = _bound_lr(net, self.settings, cls)
        momentum_name = _bound_momentum(net, self.settings)
        self.algorithm: Algorithm = cls(self.settings, lr=None if lr_name is None else float(net.values()[lr_name]))
        self.algorithm.check_net(net)
        self.net, self.method = net, cls.name
        self._follow = self._check_follow(lr_name or momentum_name)
        self.objective = objective or Objective()
        if loss is not None:
            if self.objective.loss is not None and self.objective.loss is not loss:
                raise ConfigError("loss", "it is given twice (loss= and objective.loss) with different functions; "
                                          "pass one")
            try:
                self.objective = replace(self.objective, loss=loss)
            except ConfigError:
                raise
            except (TypeError, ValueError) as err:
                raise ConfigError("loss", str(err)) from None
        _check_loss_parameters(self.objective.loss, net)
        self.metrics = _checked_metrics(metrics)
        self.fields = Fields(input_key, target_key)
        for field, net_has, where in (("init_scale", getattr(net, "init_scale", None), "init_scale"),
                                      ("encoding", net.encoding, "encoding")):
            given = getattr(self.settings, field)
            if field in self.settings.model_fields_set and net_has is not None and given != net_has:
                # hypernetize sets them (the CLI passes the config's); set here, they were silently ignored
                raise ConfigError(f"tuner.{field}", f"{given!r} differs from the net's {net_has!r}, which "
                                                    f"hypernetize set; pass it there: selftune.hypernetize(model, "
                                                    f"space, {where}={given!r})")
        if isinstance(augment, list | tuple):  # a list of ops: the chain they make
            augment = Augment(augment)
        self.augment = augment
        _check_declared(net.space, self.objective, augment)
        _check_meanings(net, self.objective)
        s = self.settings
        self.sources = {"train": _as_source(train, "train", s.batch_size, net.batch_dim, weighted=True,
                                            workers=s.workers),
                        "val": _as_source(val, "val", s.val_batch_size or s.batch_size, net.batch_dim,
                                          workers=s.workers)}
        self.train_data, self.val_data = self.sources["train"].dataset, self.sources["val"].dataset
        self.device = _usable_device(device)
        # On the training device, so masks and perturbations are drawn where they are used.
        given = seed
        try:
            seed = operator.index(seed)  # an int, NumPy's, a 0-d integer tensor
        except TypeError:
            seed = 2**64
        if not -(2**63) <= seed < 2**64:  # what torch.Generator.manual_seed takes
            raise ConfigError("seed", f"must be an integer in [-2**63, 2**64) (got {given!r}), as PyTorch's seeds")
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))
        self.seed = int(seed)
        # PyTorch's global generators as this run left them (None: not yet trained; fit seeds them from
        # ``seed``), see _own_rng
        self._rng: torch.Tensor | None = None
        self._rehearsed: tuple[float, int] | None = None  # the scheduler run check_schedule stepped through
        self._n_outputs: int | None = None  # the model's outputs under the default cross-entropy
        self._looked_up: set[str] = set()  # names the loss terms and augmentations asked for (_lookup)
        self._cuda_rng: list[torch.Tensor] | None = None
        self._in_fit = False
        self.n_train = len(self.train_data)  # type: ignore[arg-type]
        self.n_val = len(self.val_data)  # type: ignore[arg-type]
        check_batch_sizes(self.n_train, self.n_val, s.batch_size, s.val_batch_size)
        # Unset, a validation batch is a training batch's size, at most the whole validation set (a small one
        # is then one batch: every hyper step sees all of it); a size given explicitly is checked above.
        self.val_batch_size = s.val_batch_size or min(s.batch_size, self.n_val)
        if s.batch_size * s.accumulate > self.n_train:
            raise DataError(f"tuner.batch_size x tuner.accumulate ({s.batch_size} x {s.accumulate}) is larger than the "
                            f"training set ({self.n_train} examples); lower tuner.accumulate")
        self._check_targets()
        if net.best_response_layers():  # a layer every example shares (positional embeddings) responds to their mean
            pick = [0, 1, 1, 0, 1] if self.n_train > 1 else [0] * 5  # two examples, unevenly repeated: a model
            few, more = (to_device(self.sources["train"].take(torch.tensor(index), self.fields)[0],  # padding its
                                   net.hparams.device) for index in (pick[:2], pick))  # batch still differs
            net.find_shared_layers(few, more)
        # A weight step draws all its micro-batches at once: the order, and so the run, is the one of a
        # batch accumulate times larger (weight_step splits it).
        drop_last = s.drop_last or (isinstance(train, DataLoader) and loader_batching(train)[1])
        if drop_last != s.drop_last:  # a DataLoader's drop_last: the settings say what the run does
            self.settings = s = s.model_copy(update={"drop_last": drop_last})
        #: whether the model normalises over its batch (its running statistics skip extra passes)
        self.batch_norm = has_batch_norm(net)
        #: the layers that keep running statistics (BatchNorm, an InstanceNorm with track_running_stats)
        self._tracking = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)
                          and m.track_running_stats]
        #: whether the model cannot train on a batch of one example (BatchNorm over features alone): a
        #: leftover example joins the batch before it, and a response step keeps at least two
        self.needs_two = self.batch_norm and self._fails_on_one_example()
        if self.needs_two and s.batch_size == 1:
            raise ConfigError("tuner.batch_size", "the model's BatchNorm cannot train on batches of 1 example; use "
                                                  "at least 2")
        weights = self.sources["train"].weights
        if weights is not None and drop_last and weights[1] < s.batch_size * s.accumulate:
            raise DataError(f"train: the WeightedRandomSampler draws {weights[1]} examples an epoch, fewer than a "
                            f"batch (tuner.batch_size x tuner.accumulate = {s.batch_size * s.accumulate}), and "
                            "drop_last drops them all; raise num_samples or lower tuner.batch_size")
        self.order = BatchOrder(self.n_train, self.n_val, s.batch_size * s.accumulate, self.val_batch_size,
                                drop_last=drop_last, fold_single=self.needs_two, weights=weights)
        # The batch can change (tuner.adaptive_batch grows it) and the rate can follow it (lr_batch_scaling).
        self._start_batch = s.batch_size * s.accumulate
        adaptive = s.adaptive_batch
        self._batch_limit = self._start_batch if adaptive is None else \
            min(adaptive.max_batch_size or self.n_train, self.n_train)
        self._lr_rule = None if s.lr_batch_scaling == "none" else \
            scaling_rule(s.optimizer) if s.lr_batch_scaling == "auto" else s.lr_batch_scaling
        self._reference_batch = s.reference_batch_size or self._start_batch
        self.log = RunLog(hypergrad_seen=[False] * len(net.space))
        if not isinstance(s.lr, str):
            fields = type(s).model_fields
            unused = [n for n in ("lr_signal", "lr_fall", "lr_travel") if getattr(s, n) != fields[n].default]
            if unused:
                warnings.warn(SelftuneWarning(
                    f"tuner.{', tuner.'.join(unused)}: set for a tuned learning rate, but tuner.lr is a number, "
                    f"so {'it has' if len(unused) == 1 else 'they have'} no effect; bind the rate to a "
                    "hyperparameter (tuner.lr = \"name\") to tune it"),
                    stacklevel=2)
        if self.algorithm.tunes:
            self._pull_off_bounds()
        elif self.algorithm.tunes_lr and (lr_name is not None or momentum_name is not None):
            self._pull_off_bounds([net.space.index(n) for n in (lr_name, momentum_name) if n is not None])

        # Parameter groups are fixed for the run; collecting them walks the module tree, so do it once.
        self.general_params = net.general_parameters()
        self._weights = net.weight_parameters()
        self.optimizers: dict[str, torch.optim.Optimizer] = self.algorithm.weight_optimizers(net)
        self.algorithm.rehearse_optimizers(self.optimizers, self.device)
        hyper = self.algorithm.hyper_optimizer(net)
        if hyper is not None:
            self.optimizers["hyper"] = hyper
        # A learning rate bound to a hyperparameter: applied at every step, tuned by hypergradient
        # descent where the algorithm tunes it (hd, stn, delta-stn), held at its value by fixed.
        # (one-pass differentiates them within its own hypergradient instead)
        by_descent = self.algorithm.tunes_lr and not self.algorithm.differentiates_update
        self.lr_tuner: HypergradientLR | None = None
        if lr_name is not None:
            self.lr_tuner = HypergradientLR(net, lr_name, self.optimizers[self.algorithm.lr_group],
                                            tune=by_descent, margin=BOUND_MARGIN,
                                            fall=self.settings.lr_fall, signal=self.settings.lr_signal)
        # A momentum bound to a hyperparameter (SGD's heavy ball, Adam's beta1): the same, by its hypergradient.
        self.momentum_tuner: HypergradientMomentum | None = None
        if momentum_name is not None:
            group = self.algorithm.lr_group
            self.momentum_tuner = HypergradientMomentum(
                net, momentum_name, self.optimizers[group], tune=by_descent, margin=BOUND_MARGIN,
                also=[o for k, o in self.optimizers.items() if k not in (group, "hyper")])
        # Base rates of the weight groups: a schedule multiplies them, a roll-back halves them.
        self._base_lrs = {k: [g["lr"] for g in o.param_groups] for k, o in self.optimizers.items() if k != "hyper"}
        #: the bases before any roll-back lowered them: a followed schedule's rates are scaled by base / first
        self._first_lrs = {k: list(v) for k, v in self._base_lrs.items()}
        self._planned_steps = 0  # set at a fresh fit: the schedule's run length
        self.planned_epochs = 0  # the epochs of the current fit (its total, also when resumed)
        self._torch_schedule: TorchSchedule | None = None  # settings.lr_scheduler, built with the run's length
        # the weights of each decay (objective.weight_decay: one for all, or one per layer pattern)
        # (not a parametrized layer's own tensors: its weight is computed from them, and a penalty on them is not
        # the weight's; an orthogonal map sends a decayed raw matrix to a zero weight, fuzz round 44)
        raw = {id(p) for m in net.model.modules() if isinstance(m, parametrize.ParametrizationList)
               for p in m.parameters()}
        self._decayed = self.objective.weight_groups(
            net.model, [p for p in self.general_params if p.dim() > 1 and id(p) not in raw])
        self._stop = False
        self._step_clock = 0  # _progress() before the current batch was drawn (adaptive batch)
        self._trained_batch: int | None = None  # examples in the current step's batch (None before the first)
        self.clip_factor = 1.0  # what tuner.grad_clip scaled the last step's gradient by
        self._good: dict[str, Any] | None = None  # the one roll-back point (see snapshot())
        #: the latest roll-back point whose validation loss was judged (an epoch end, a fit's start) while a later
        #: point between two epoch ends is _good; None: _good is one (see snapshot())
        self._checked: dict[str, Any] | None = None
        #: with settings.keep = "best": the epoch of the lowest validation loss so far, that loss and a copy of the
        #: net's state then (weights and hyperparameters), which result() returns (see _remember_best)
        self._best: dict[str, Any] | None = None
        #: the validation gradient of the general weights an implicit hypergradient just took (by parameter),
        #: which the rate's validation signal reuses instead of a second pass (:meth:`_validate_lr`)
        self.val_grads: dict[torch.nn.Parameter, torch.Tensor] | None = None

    @property
    def _validates_lr(self) -> bool:
        """Whether hyper steps step the bound learning rate on the validation signal."""
        return self.lr_tuner is not None and self.lr_tuner.tune and self.lr_tuner.signal == "val"

    def _pull_off_bounds(self, only: list[int] | None = None) -> None:
        """A hyperparameter that starts on (or next to) a bound of its range cannot move: the sigmoid
        is flat there, so neither its perturbations nor its steps change the value (measured: 120
        epochs at 1e-4). Tuning algorithms start it :data:`BOUND_MARGIN` of the range inside, and
        say so; ``fixed`` keeps the exact value (the baseline trains where the user said)."""
        net = self.net
        with torch.no_grad():
            unit = torch.sigmoid(net.hparams.double())
            inside = unit.clamp(BOUND_MARGIN, 1 - BOUND_MARGIN)
            if only is not None:  # hd tunes the learning rate alone: the other values stay where they are
                keep = torch.ones_like(unit, dtype=torch.bool)
                keep[only] = False
                inside = torch.where(keep, unit, inside)
            moved = (inside != unit).tolist()
            if not any(moved):
                return
            before = {p.name: p.init for p in net.space}
            net.hparams.copy_(torch.logit(inside).to(net.hparams.dtype))
            after = net.space.values_dict(net.hparams)
        names = [n for n, m in zip(net.space.names, moved, strict=True) if m]
        shifts = ", ".join(f"{n} {before[n]:.4g} -> {after[n]:.4g}" for n in names)
        warnings.warn(SelftuneWarning(
            f"space: {shifts}: an init on a bound of its range, or within {BOUND_MARGIN:.0%} of one, barely moves (the "
            f"transform is flat there), so {self.method} starts {BOUND_MARGIN:.0%} of the range inside; widen the "
            "range if the bound itself must stay reachable"), stacklevel=3)

    def _check_follow(self, lr_name: str | None) -> tuple[HyperSchedule, list[int]] | None:
        """The schedule to follow and the space columns it sets, checked against the space and method."""
        schedule = self.settings.follow
        if schedule is None:
            return None
        if self.algorithm.tunes or (lr_name is not None and self.algorithm.tunes_lr):
            raise ConfigError("tuner.follow", f"method {self.method!r} tunes hyperparameters itself; a run that "
                                              "follows a schedule trains with method \"fixed\"")
        space = self.net.space
        unknown = [n for n in schedule.values if n not in space]
        if unknown:
            raise ConfigError("tuner.follow", f"the schedule sets {', '.join(unknown)}, which the space does not "
                                              f"declare; the space has {', '.join(space.names)}")
        for name, column in schedule.values.items():
            p = space[name]
            slack = 0.5 if p.is_int else 0.0
            bad = [v for v in column if not p.low - slack <= v <= p.high + slack]
            if bad:
                raise ConfigError("tuner.follow", f"the schedule's {name}={bad[0]:g} lies outside its range "
                                                  f"[{p.low:g}, {p.high:g}]; widen [space.{name}] or fix the schedule")
        return schedule, [space.index(n) for n in schedule.values]

    def _warn_follow_length(self, epochs: int) -> None:
        """A schedule is followed by weight step: recorded at another number of steps per epoch (another
        batch size, another training set) its path is squeezed or stretched over this run's epochs, and a
        run longer than it holds its last values. Both were silent (fuzz round 46)."""
        assert self._follow is not None
        schedule = self._follow[0]
        per_epoch, total = self.batches_per_epoch, epochs * self.batches_per_epoch
        if schedule.steps_per_epoch and schedule.steps_per_epoch != per_epoch:
            warnings.warn(SelftuneWarning(
                f"tuner.follow: the schedule was recorded at {schedule.steps_per_epoch} weight steps an epoch, this "
                f"run takes {per_epoch}; it is followed step by step, so its epochs do not line up with this "
                "run's (follow it at the batch size and data it was recorded with)"), stacklevel=3)
        elif schedule.steps_per_epoch and len(schedule.steps) > 1 and \
                total > schedule.steps[-1] + max(per_epoch, self.settings.log_every):  # (a run's, not a constant)
            warnings.warn(SelftuneWarning(
                f"tuner.follow: the schedule covers {schedule.steps[-1] + 1} weight steps, this run takes {total}; "
                "its last values hold for the rest"), stacklevel=3)

    def _follow_step(self) -> None:
        """Set the followed hyperparameters to the schedule's values for the step about to be taken."""
        assert self._follow is not None
        schedule, columns = self._follow
        values = schedule.at(self.log.counters.steps)
        net = self.net
        with torch.no_grad():
            current = net.space.to_constrained(net.hparams.double())
            for name, col in zip(values, columns, strict=True):
                current[col] = values[name]
            net.hparams[columns] = net.space.to_unconstrained(current)[columns].to(net.hparams.dtype)

    def _undriven(self) -> list[str]:
        """Declared hyperparameters nothing has read so far (the model's reads accumulate over the run)."""
        used = self.net.hyperparameters_read | self.objective.hyperparameters() | self._looked_up
        used |= {b.name for b in self._bound()}
        if self.augment is not None:
            used |= self.augment.hyperparameters()
        return [n for n in self.net.space.names if n not in used]

    def _check_driven(self) -> None:
        """After the first weight step: warn about declared hyperparameters nothing reads."""
        self.log.idle = self._undriven()
        if self.log.idle:
            warnings.warn(SelftuneWarning(
                f"space: {', '.join(self.log.idle)} drive(s) nothing: no dropout, augmentation or loss term reads "
                "them, so tuning them is meaningless; remove them from the space or use them in the model"),
                stacklevel=3)

    def _check_targets(self) -> None:
        """Targets must fit the model's outputs and the loss: checked on the first examples of each split
        (and every integer label of a tensor dataset, for cross-entropy) before the first step, so a bad
        label or a loss that does not take the model's outputs fails now, in one line, not hours in.
        Runs in eval mode without the tuner's generator and restores the global RNG, so the run is
        bit-identical with or without this check."""
        for what, source in self.sources.items():
            self._check_source(source, what)

    def check_data(self, data: Any, what: str = "test") -> None:
        """Check data the run will be scored on (the test split) as the training and validation splits
        are checked before the first step: its first examples through the model, the loss and the metrics,
        and with cross-entropy every integer label against the model's outputs.

        Raises:
            DataError: a label outside the model's outputs, or a loss or metric that fails on its outputs.
        """
        self._check_source(_as_source(data, what, batch_dim=self.net.batch_dim), what)

    def _check_source(self, source: Source, what: str) -> None:
        net, device = self.net, self.net.hparams.device
        was_training, classes = net.training, 0
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                net.eval()
                # a metric is a batch mean over up to 512 examples when scored (score()): one that needs more
                # than one class (an AUC) is checked on as many, a loss on the first two
                x, y = source.take(torch.arange(min(512 if self.metrics else 2, len(source))), self.fields)
                if self.augment is not None and what == "train" and not isinstance(x, torch.Tensor):
                    raise ConfigError("augment", f"augmentations need tensor inputs, but a batch's inputs are a "
                                                 f"{type(x).__name__}; remove the augmentations")
                x, y = to_device(x, device), to_device(y, device)
                if self.augment is not None and what == "train":
                    self._check_augment(x)
                try:
                    out = net(x)
                except torch.OutOfMemoryError:
                    raise
                except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as err:
                    reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
                    raise DataError(f"{what}: the model failed on the first examples ({reason}); its inputs are "
                                    f"{_shape(x)}: make them what the model takes") from err
                if self.objective.loss is None:
                    if not isinstance(out, torch.Tensor):
                        raise DataError(f"{what}: the model returns a {type(out).__name__}, and the default loss "
                                        "(cross-entropy) needs a tensor of logits; return the logits, or pass a loss "
                                        "that takes the model's outputs (Task.loss, SelfTuner(loss=...))")
                    if not isinstance(y, torch.Tensor):
                        first = y[0] if isinstance(y, list | tuple) and y else y
                        raise DataError(f"{what}: the targets are a {type(y).__name__}"
                                        + (f" of {type(first).__name__} ({first!r:.40})" if first is not y else "")
                                        + ", and the default loss (cross-entropy) needs class indices as a tensor; map "
                                          "the labels to integers in the dataset (e.g. {'cat': 0, 'dog': 1}), or pass "
                                          "a loss that takes these targets")
                    check_targets(out, y, what)
                    classes = classes_last(out, y).shape[-1]
                    if what == "train":
                        self._fix_layout(out, y)
                if what == "train" and self.settings.linearize and net.form == "delta" and not linearizable(out):
                    raise ConfigError("tuner.linearize", f"the model returns {type(out).__name__} objects, whose "
                                                         "tensors the first-order response cannot reach; return a "
                                                         "tensor, or a tuple, list or dict of them, or turn linearize "
                                                         "off")
                self._try_loss(out, y, what, loss=self.objective.loss is not None)
                if what == "train" and self.objective.loss is not None and isinstance(out, torch.Tensor) \
                        and isinstance(y, torch.Tensor) and net.batch_dim == 0:
                    if y.dim() >= 1 and len(y) < 3 <= len(source):  # (the sum test needs three at least)
                        x, y = source.take(torch.arange(min(4, len(source))), self.fields)
                        x, y = to_device(x, device), to_device(y, device)
                        out = net(x)
                    self._refuse_summed(self.objective.eval_loss, out, y)
            if what == "train":
                self._check_differentiable(source)
                self._refuse_recomputation(source)
        finally:
            net.train(was_training)
        if self.objective.loss is None and source.collate is default_collate:  # a loader's own may map labels
            check_all_targets(source.dataset, classes, what, origin=source.origin)
        if self.objective.loss is None and what in ("train", "val"):
            self._n_outputs = classes  # what each batch of a dataset not checked whole is checked against

    def _fix_layout(self, logits: Any, y: Any) -> None:
        """Fix the default cross-entropy's layout for the run (``Objective.classes_dim``) from the first
        training batch whose shapes say where the classes are: a later batch padded to a length equal to
        the number of classes fits both readings. (A first batch that fits both leaves it open: fixing it
        then could read every later batch the wrong way.)"""
        if self.objective.loss is None and self.objective.classes_dim is None and isinstance(logits, torch.Tensor):
            layout = layout_of(logits, y)
            if layout is not None:
                self.objective = replace(self.objective, classes_dim=layout)

    def _fails_on_one_example(self) -> bool:
        """Whether a training-mode pass over one training example fails as BatchNorm does on a batch of one
        (over features alone: ``BatchNorm1d`` on ``(B, C)``; a ``BatchNorm2d`` has pixels to average over)."""
        net, device = self.net, self.net.hparams.device
        x, _ = self.sources["train"].take(torch.arange(1), self.fields)
        was_training = net.training
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                    self.kept_statistics():
                net.train()
                net(to_device(x, device))
        except ValueError as err:
            return "Expected more than 1 value per channel" in str(err)
        finally:
            net.train(was_training)
        return False

    def _check_augment(self, x: torch.Tensor) -> None:
        """Run the augmentations once on the first training examples (their own generator: the run's
        draws are untouched), so inputs they cannot take (cutout on a table's rows) are a one-line error
        before training, not a traceback at the first step."""
        net = self.net
        assert self.augment is not None
        values = net.space.discretize(net.space.to_constrained(
            net.hparams.detach().expand(batch_of(x, net.batch_dim), -1)))
        generator = torch.Generator(device=x.device).manual_seed(0)
        for op in self.augment.ops:
            try:
                x = op(x, self._lookup(values), generator)
            except torch.OutOfMemoryError:
                raise
            except (ValueError, RuntimeError, IndexError, TypeError) as err:
                # the built-in ops by their config names (cutout, noise, shift, flip), a user's callable by itself
                name = type(op).__name__.lower() if type(op).__module__ == Augment.__module__ else repr(op)[:60]
                raise ConfigError("augment", f"{name} cannot augment the training inputs ({str(err).splitlines()[0]}); "
                                             "remove it from [[augment]] (Python: from the Augment list)") from None

    def _check_differentiable(self, source: Source) -> None:
        """A loss of the user's own must return a tensor the weights' gradient flows through: one that detaches
        its input (``.item()``, ``.detach()``, NumPy, ``torch.no_grad`` inside it) failed at the first
        backward pass with PyTorch's "element 0 of tensors does not require grad". On the first two training
        examples (a forward with gradients on the checks' batch, up to 512 for a metric, could run out of
        the memory a training batch fits)."""
        if self.objective.loss is None:
            return
        device = self.net.hparams.device
        x, y = source.take(torch.arange(min(2, len(source))), self.fields)
        with torch.enable_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            value = self.objective.eval_loss(self.net(to_device(x, device)), to_device(y, device))
        if not isinstance(value, torch.Tensor) or not value.requires_grad:
            got = "a tensor without a gradient" if isinstance(value, torch.Tensor) else type(value).__name__
            raise DataError(f"loss: it returned {got} on the first examples, so training cannot differentiate it; "
                            "compute it from the model's outputs with torch operations (no .item(), .detach(), "
                            "NumPy or torch.no_grad inside it) and return the tensor")

    def _refuse_recomputation(self, source: Source) -> None:
        """One backward pass through the loss on the first two training examples (in evaluation mode, cuDNN
        off, as its RNNs refuse a backward in evaluation mode; every gradient put back after it), so a model
        that recomputes selftune layers in its backward pass (``torch.utils.checkpoint``) is refused before
        the run is recorded (:func:`~selftune.nn.state.refuse_recomputation`). It is a probe for that alone:
        anything else it meets is left to the checks above and to training."""
        device = self.net.hparams.device
        grads = {p: p.grad for p in self.net.parameters() if p.requires_grad}
        try:
            with torch.enable_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                    torch.backends.cudnn.flags(enabled=False):
                x, y = source.take(torch.arange(min(2, len(source))), self.fields)
                value = self.objective.eval_loss(self.net(to_device(x, device)), to_device(y, device))
                if isinstance(value, torch.Tensor) and value.requires_grad and value.dim() == 0:
                    value.backward()  # (not autograd.grad, which a reentrant checkpoint refuses)
        except ConfigError:
            raise
        except Exception:  # a probe: a model it cannot run this way trains as before
            pass
        finally:
            for p, grad in grads.items():
                p.grad = grad

    def _try_loss(self, out: Any, y: Any, what: str, loss: bool = True) -> None:
        """The user's loss (unless ``loss`` is false) and metrics on a first batch: a shape mismatch, or a
        metric that is not one number, is a DataError naming both."""
        checks = [*((("loss", self.objective.eval_loss),) if loss else ()),
                  *((f"metrics[{k!r}]", m) for k, m in self.metrics.items())]
        for name, fn in checks:
            try:
                with warnings.catch_warnings():
                    # PyTorch's mse/l1/huber warn on (B, 1) outputs against (B,) targets; other warnings pass
                    warnings.filterwarnings("error", message=".*broadcasting.*", category=UserWarning)
                    value = fn(out, y)
                float(value)
                if name == "loss" and what == "train":  # (one warning: the splits share the loss)
                    self._warn_pairwise(fn, out, y, what)
            except UserWarning as err:
                if "broadcasting" not in str(err):  # another warning a user's filter made an error: theirs
                    raise
                squeeze = isinstance(out, torch.Tensor) and isinstance(y, torch.Tensor) and \
                    out.shape[-1:] == (1,) and out.shape[:-1] == y.shape
                raise DataError(f"{what}: {name}(outputs, targets) broadcasts the model's outputs {_shape(out)} "
                                f"against the targets {_shape(y)}, which pairs outputs with the wrong targets; "
                                "make them one shape" + (", e.g. loss=lambda out, y: mse_loss(out.squeeze(-1), y)"
                                                         if squeeze else "")) from err
            except Exception as err:
                reason = " ".join(f"{type(err).__name__}: {err}".split())
                raise DataError(f"{what}: {name}(outputs, targets) failed on the first examples ({reason}); the "
                                f"model's outputs are {_shape(out)} and the targets {_shape(y)}") from err

    def _refuse_summed(self, fn: Callable[[Any, Any], torch.Tensor], out: Any, y: Any) -> None:
        """A loss of the user's own that sums over the batch (``F.cross_entropy(out, y, reduction="sum")``,
        ``((out - y) ** 2).sum()``) scales with the batch: the hyper steps compare losses over batches of other
        sizes, and scores depend on the scoring batch. A mean is the same over a batch and over that batch
        twice; a sum doubles, and is also the sum of its two halves' (an in-batch softmax over B examples at
        uniform scores, log B, doubles from B = 2 to 4: hence three examples at least, and both tests). On CPU
        copies (a probe that fails, a loss holding another device's tensors, is skipped). (The module form,
        ``reduction='sum'``, is refused by :class:`Objective`.)"""
        if not (isinstance(out, torch.Tensor) and isinstance(y, torch.Tensor) and self.net.batch_dim == 0
                and out.dim() >= 1 and y.dim() >= 1 and len(out) == len(y) >= 3):
            return
        out, y = out.detach().cpu(), y.detach().cpu()
        half = len(out) // 2
        try:
            once = float(fn(out, y))
            twice = float(fn(torch.cat([out, out]), torch.cat([y, y])))
            halves = float(fn(out[:half], y[:half])) + float(fn(out[half:], y[half:]))
        except Exception:  # a loss that cannot take these batches here: nothing to compare
            return
        if not math.isfinite(once) or abs(once) < 1e-6:
            return

        def close(a: float, b: float) -> bool:
            return abs(a - b) <= 1e-4 * max(abs(a), abs(b))

        if close(twice, 2 * once) and close(halves, once) and not close(twice, once):
            raise ConfigTypeError("loss", f"it sums over the batch (over these examples twice it is {twice:.4g}, "
                                          f"once {once:.4g}), and selftune needs the batch's mean loss (it compares "
                                          "losses over batches of other sizes); return the mean (reduction='mean', "
                                          ".mean()), and a larger learning rate where the sum set its scale")

    @staticmethod
    def _warn_pairwise(fn: Callable[[Any, Any], torch.Tensor], out: Any, y: Any, what: str) -> None:
        """A hand-written loss such as ``((out - y) ** 2).mean()`` on ``(B, 1)`` outputs and ``(B,)`` targets
        broadcasts to ``(B, B)``, pairing every output with every target, and PyTorch says nothing (its own
        losses warn, which :meth:`_try_loss` turns into an error). Such a loss does not change when two
        examples swap their targets, which any loss that pairs each output with its own target does (sum or
        mean reduced alike): that is said, as a warning, since a loss may compare examples on purpose."""
        if not (isinstance(out, torch.Tensor) and isinstance(y, torch.Tensor) and y.is_floating_point()
                and out.dim() == 2 and out.shape[1] == 1 and y.shape == out.shape[:1] and len(y) >= 2):
            return
        t = y[:2]
        if bool(t[0] == t[1]):
            return
        o = t[:, None].to(out.dtype)  # outputs equal to the targets: the swap then moves a per-example loss
        try:  # by the targets' own spread, whatever their scale (house prices), not the untrained outputs'
            kept, swapped = float(fn(o, t)), float(fn(o, t.flip(0)))
        except Exception:  # a loss that cannot take two examples: nothing to compare
            return
        if math.isfinite(kept) and abs(kept - swapped) <= 1e-6 * max(1.0, abs(kept), abs(swapped)):
            warnings.warn(SelftuneWarning(
                f"{what}: the loss does not change when two examples swap their targets ({kept:.4g}): with outputs "
                f"{_shape(out)} and targets {_shape(y)}, a loss written as ((out - y) ** 2).mean() broadcasts to "
                "every (output, target) pair; make them one shape (out.squeeze(-1)), unless your loss compares "
                "examples on purpose"), stacklevel=4)

    # -- views kept for callbacks and users ------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """Epochs completed."""
        return self.order.epoch

    @property
    def batches_per_epoch(self) -> int:
        return self.order.batches_per_epoch

    @property
    def counters(self) -> Counters:
        return self.log.counters

    @property
    def trajectory(self) -> list[dict[str, float]]:
        return self.log.trajectory

    @property
    def history(self) -> list[dict[str, float]]:
        return self.log.history

    @property
    def divergences(self) -> int:
        return self.log.divergences

    # ------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------
    def fit(self, epochs: int, *, callbacks: Sequence[Callback] = (), max_steps: int | None = None) -> FitResult:
        """Train until ``epochs`` epochs are done (continuing from the current state).

        Args:
            epochs: total epochs of the run (not additional ones): a restored tuner resumes. A fresh run
                plans from it (the schedule's length, the tuned rate's step size, the hyper learning
                rate); a later ``fit`` with more epochs continues on that plan, so ``fit(2)`` then
                ``fit(4)`` is not ``fit(4)``.
            callbacks: :class:`Callback` hooks (progress, checkpoints, logging).
            max_steps: stop after this global step count, leaving a resumable state.

        Returns:
            The :class:`FitResult` of the run so far.

        Raises:
            DivergenceError: the run diverged more than ``settings.max_divergences`` times in a row, without
                getting past the step where the previous roll-back's divergence happened.
            KeyboardInterrupt: a Ctrl-C (SIGINT), after the step it came in has finished: ``fit`` again goes
                on exactly (with Python's own SIGINT handler, in the main thread; a second Ctrl-C stops at
                once).
        """
        if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:  # (numpy's too)
            raise ConfigError("epochs", f"must be a whole number >= 1 (got {epochs!r})")
        epochs = int(epochs)
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral)
                                      or max_steps < 1):
            raise ConfigError("max_steps", f"must be a whole number >= 1, or None for no limit (got {max_steps!r})")
        max_steps = None if max_steps is None else int(max_steps)
        if isinstance(callbacks, Callback | str) or not isinstance(callbacks, Iterable):
            raise TypeError(f"callbacks must be a list of selftune.Callback instances (got {type(callbacks).__name__}; "
                            "a single one: [callback])")
        callbacks = list(callbacks)
        for i, cb in enumerate(callbacks):  # one of another class failed at its first missing hook, mid-run
            if not isinstance(cb, Callback):
                raise ConfigTypeError(f"callbacks[{i}]", f"{type(cb).__name__} is not a selftune.Callback; subclass "
                                                         "it (its hooks do nothing until you override them)")
        self._check_trainable()
        if self.log.start and self._planned_steps and epochs * self.batches_per_epoch > self._planned_steps:
            self._check_extension(epochs)
        if epochs < self.order.epoch:  # (equal: a finished run asked again, which returns its result)
            warnings.warn(SelftuneWarning(
                f"fit({epochs}): this tuner has already trained {self.order.epoch} epochs, so nothing is trained; "
                f"epochs is the run's total, not more epochs (fit({self.order.epoch + epochs}) trains {epochs} "
                "more)"), stacklevel=2)
        self.planned_epochs = epochs
        if self._follow is not None and not self.log.start:  # a fresh fit that follows a recorded schedule
            self._warn_follow_length(epochs)
        self._stop = False
        was_training = self.net.training  # put back afterwards, as score() does: a net the caller had in
        try:                              # eval() mode predicts without dropout after fit too
            with self._own_rng(), self._interrupt_between_steps() as interrupted:
                result = self._fit(epochs, callbacks, max_steps)
            if interrupted and self.order.epoch < epochs and (max_steps is None or self.counters.steps < max_steps):
                raise KeyboardInterrupt(f"fit stopped after step {self.counters.steps} (Ctrl-C); the tuner is as "
                                        "after that step, so fit again goes on exactly (tuner.result() holds the run "
                                        "so far)")
            return result  # (a Ctrl-C after the last step: the run is whole)
        finally:
            self.net.train(was_training)
            for source in self.sources.values():  # a batch fetched ahead for a step that did not come
                source.drop_ahead()

    @contextmanager
    def _interrupt_between_steps(self) -> Iterator[list[bool]]:
        """A Ctrl-C (SIGINT) during ``fit`` stops it after the current step, whose batch was drawn and whose
        update was half made: interrupted there, the next ``fit`` skipped that batch and trained another run
        (found by fuzz round 46). A second Ctrl-C interrupts at once. Only where Python's own handler is in
        place, in the main thread (``selftune run`` has its own, which checkpoints); yields a list that holds
        ``True`` once interrupted."""
        caught: list[bool] = []
        in_main = threading.current_thread() is threading.main_thread()
        if not in_main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            yield caught
            return

        def stop(signum: int, frame: Any) -> None:
            if caught:  # the second one: at once
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            caught.append(True)
            self.request_stop()

        signal.signal(signal.SIGINT, stop)
        try:
            yield caught
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    @contextmanager
    def _own_rng(self) -> Iterator[None]:
        """PyTorch's global generators, the run's own while it trains: a model's own ``nn.Dropout``, a
        Transformer layer's dropout or a ``torch.rand`` in its forward draws from them, so two runs of one
        seed differed wherever the caller's global state did. A fresh run seeds them from ``seed`` (a
        stream apart from the tuner's own generator), a later ``fit`` or a restored run continues where
        they were, and the caller's global state is put back afterwards."""
        cuda = self.device.type == "cuda"
        devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()] if cuda \
            else []
        with torch.random.fork_rng(devices=devices):
            if self._rng is None:
                torch.manual_seed((self.seed + _GLOBAL_SEED_OFFSET) % 2**64)
            else:
                torch.set_rng_state(self._rng)
                if cuda and self._cuda_rng is not None and len(self._cuda_rng) == torch.cuda.device_count():
                    torch.cuda.set_rng_state_all(self._cuda_rng)
            self._in_fit = True
            try:
                yield
            finally:
                self._in_fit = False
                self._rng = torch.get_rng_state()
                self._cuda_rng = torch.cuda.get_rng_state_all() if cuda else None

    def _fit(self, epochs: int, callbacks: Sequence[Callback], max_steps: int | None) -> FitResult:
        for cb in callbacks:
            cb.on_fit_start(self, epochs * self.batches_per_epoch)
        self.net.to(self.device).train()
        if not self.log.start:  # a fresh run (a restored one carries both in its state)
            self.log.start = dict(self.net.values())
            self._plan_hyper_lr(epochs)
            self._planned_steps = epochs * self.batches_per_epoch
            for bound in self._bound():  # the validation signal moves the rate once per round of hyper steps
                validated = bound is self.lr_tuner and self._validates_lr
                rounds = max(1, self._planned_validation(epochs) // self.settings.val_steps)
                bound.plan(rounds if validated else self._planned_steps, self.settings.lr_travel)
            self._build_torch_schedule()
            self._score_untrained()
        self.log.start_clock()
        if self._good is None:
            self.snapshot(judged=True)
        try:
            while True:
                try:
                    self._loop(epochs, callbacks, max_steps)
                    break
                except NonFiniteError as div:
                    self._roll_back(div, callbacks)
        finally:
            self.log.stop_clock()
        for cb in callbacks:
            cb.on_fit_end(self)
        return self.result()

    def _build_torch_schedule(self) -> None:
        """``settings.lr_scheduler`` on the run's starting rate and length (see :class:`TorchSchedule`)."""
        s = self.settings
        if s.lr_scheduler is None:
            return
        start, total = self._torch_schedule_plan(self._planned_steps)
        self.check_schedule(self._planned_steps // self.batches_per_epoch)
        self._torch_schedule = TorchSchedule(s.lr_scheduler, s.lr_scheduler_args, initial_lr=start, total=total)

    def _torch_schedule_plan(self, planned_steps: int) -> tuple[float, int]:
        group = self.algorithm.lr_group
        start = self.lr_tuner.value if self.lr_tuner is not None else self._base_lrs[group][0]
        total = planned_steps if self.settings.lr_scheduler_interval == "step" else \
            planned_steps // self.batches_per_epoch
        return start, total

    def _check_extension(self, epochs: int) -> None:
        """A later fit past the epochs the first one planned keeps that plan (the schedule's length, the
        tuned rate's step, the hyper learning rate): a scheduler that cannot step past its length
        (OneCycleLR) is refused now, in one line, and a schedule whose curve the run's length set (a cosine,
        a filled-in ``T_max``) is a warning, since its rate past the plan is its end's (about 0) or a
        restart."""
        s = self.settings
        planned = self._planned_steps // self.batches_per_epoch
        fix = f"give the whole run's epochs to the first fit (fit({epochs}) on a fresh tuner)"
        if s.lr_scheduler is not None:
            start, total = self._torch_schedule_plan(self._planned_steps)
            steps = epochs * self.batches_per_epoch if s.lr_scheduler_interval == "step" else epochs
            try:
                TorchSchedule.rehearse(s.lr_scheduler, s.lr_scheduler_args, initial_lr=start, total=total, steps=steps)
            except ValueError as err:
                raise ConfigError("epochs", f"fit({epochs}) trains past the {planned} epochs this tuner's first fit "
                                            f"planned torch.optim.lr_scheduler.{s.lr_scheduler} for, and {err}; "
                                            f"{fix}") from None
        planned_by_length = (TorchSchedule.planned_arguments(s.lr_scheduler, s.lr_scheduler_args)
                             if s.lr_scheduler is not None else s.schedule.kind not in ("constant", "step"))
        if planned_by_length:  # (a step schedule, a warm-up, StepLR... go on exactly as in one longer fit)
            warnings.warn(SelftuneWarning(
                f"fit({epochs}): this tuner's first fit planned its learning-rate schedule for {planned} epochs; "
                f"the epochs past them keep that plan (the rate where it ended, or where the scheduler goes "
                f"next); {fix}"), stacklevel=3)

    def check_schedule(self, epochs: int) -> None:
        """Step ``settings.lr_scheduler`` through a run of ``epochs`` before it starts (a fresh run's
        :meth:`fit` does; the command line before it records the run).

        Raises:
            ConfigError: naming ``tuner.lr_scheduler_args``: the scheduler fails within the run or gives a
                negative or non-finite rate.
        """
        s = self.settings
        if s.lr_scheduler is None:
            return
        start, total = self._torch_schedule_plan(epochs * self.batches_per_epoch)
        if self._rehearsed == (start, total):  # checked already (the command line's, then fit's): ~60 us a step
            return
        try:
            TorchSchedule.rehearse(s.lr_scheduler, s.lr_scheduler_args, initial_lr=start, total=total)
            self._rehearsed = (start, total)
        except ValueError as err:
            raise ConfigError("tuner.lr_scheduler_args", f"torch.optim.lr_scheduler.{s.lr_scheduler} with "
                                                         f"{s.lr_scheduler_args}: {err}") from None

    def _planned_validation(self, epochs: int) -> int:
        """Hyper steps (validation batches) a fresh run of ``epochs`` plans at its start."""
        return self.planned_hyper_steps(epochs, self.algorithm.hyper_interval(self)) * self.settings.val_steps

    def planned_hyper_steps(self, epochs: int, interval: int) -> int:
        """The hyper steps a run of ``epochs`` takes every ``interval`` weight steps (at least 1), at the
        starting batch size (a batch that ``adaptive_batch`` grows makes epochs of fewer steps).

        The loop steps the hyperparameters after every weight step whose number (counted from the run's
        start, warm-up included) is a multiple of ``interval`` (``train_steps``, or an implicit method's
        spacing), once warm-up is over: the multiples in ``(warmup, epochs]`` epochs' steps. (Counting the
        tuning epochs' steps alone missed one where warm-up ends between two multiples: on a 3-epoch run of
        4 steps an epoch, 1 planned against 2 taken, and a hyper learning rate planned to travel 8 units
        travelled 16.)"""
        per = self.batches_per_epoch
        warmup = min(self.settings.warmup_epochs, epochs)
        return max(1, epochs * per // interval - warmup * per // interval)

    def _plan_hyper_lr(self, epochs: int) -> None:
        """Scale an Adam hyper learning rate to the run (``settings.hyper_travel``).

        Adam moves a parameter by about its learning rate per step, so ``lr * steps`` bounds how far a
        hyperparameter can go. Hyper steps come every ``train_steps`` weight steps (or the algorithm's
        wider :meth:`~selftune.algorithms.Algorithm.hyper_interval`), so their number
        follows the data size and the run length: 141 in a 40-epoch run on 1,150 digits, where STN's
        official 3e-3 allows 0.4 units and STN barely moved (measured: 3% of a range). The floor keeps
        the official rate wherever it already covers the travel. RMSprop (Delta-STN's default) is left
        alone: without bias correction its first steps are up to ``1/sqrt(1 - alpha)`` = 10x its rate,
        so it already crosses a range in such a run, and raising it measured worse (docs/benchmarks)."""
        if not self.algorithm.tunes or "hyper" not in self.optimizers:
            return
        s = self.settings
        optimizer, default, _ = self.algorithm.hyper_settings()
        planned = self._planned_validation(epochs)
        lr, rule = default, "given" if s.hyper_lr is not None else "default"
        if s.hyper_lr is None and optimizer == "adam" and s.hyper_travel > 0 and s.hyper_travel / planned > default:
            lr, rule = s.hyper_travel / planned, "travel"
            groups = self.optimizers["hyper"].param_groups
            groups[0]["lr"] = lr
            if s.scale_lr is None and len(groups) > 1:
                groups[1]["lr"] = lr
        self.log.hyper_lr = {"lr": lr, "planned_steps": planned, "travel": s.hyper_travel, "rule": rule}

    def _loop(self, epochs: int, callbacks: Sequence[Callback], max_steps: int | None) -> None:
        s, order, log = self.settings, self.order, self.log
        while order.epoch < epochs and not self._stop:
            while not order.epoch_done and not self._stop:
                self._step_clock = self._progress()
                x, y = self._batch("train", order.next_train(self.generator))
                self._trained_batch = batch_of(x, self.net.batch_dim)  # an epoch's last batch may be short
                if self._follow is not None:
                    self._follow_step()
                grown = None
                adaptive = s.adaptive_batch
                if adaptive is not None and log.counters.steps % adaptive.every == 0 \
                        and order.batch_size < self._batch_limit and self._trained_batch == order.batch_size:
                    # full batches only: an epoch's short remainder reads a noisier statistic, and a batch
                    # that only grows would keep what that noise asked for
                    grown = self._test_batch(x, y)  # on the weights this batch's gradient is taken at
                log.add_train_loss(self.algorithm.step(self, x, y))
                # this step's rate for a full batch of the size it drew (before any growth), for the records
                log.end_lr = self.weights_lr / self._short_batch_factor()
                if log.counters.steps == 0:  # the first step's rate begins the run's schedule (schedule())
                    log.start.setdefault("weights_lr", self.weights_lr)
                    if self._follow is not None:  # the followed values are what the run started from
                        log.start.update(self._follow[0].at(0))
                if grown is not None:
                    order.batch_size = grown  # from the next batch on
                log.counters.steps += 1
                if self._torch_schedule is not None and s.lr_scheduler_interval == "step":
                    self._torch_schedule.step()
                if self._follow is not None:  # the values of the next step, so the logged row shows them
                    self._follow_step()
                if log.idle is None:
                    self._check_driven()
                tuning = (self.algorithm.tunes or self._validates_lr) and order.epoch >= s.warmup_epochs
                if tuning and log.counters.steps % self.algorithm.hyper_interval(self) == 0:
                    for _ in range(s.val_steps):
                        self._hyper_step(*self._batch("val", order.next_val(self.generator)))
                row = None
                if log.counters.steps % s.log_every == 0:
                    row = log.log_row(order.epoch, self._hparam_columns())
                for cb in callbacks:
                    cb.on_step(self, None if row is None else dict(row))  # (a copy: the run's own stays whole)
                if max_steps is not None and log.counters.steps >= max_steps:
                    self._stop = True
            if order.epoch_done:
                row = self._end_epoch()
                for cb in callbacks:
                    cb.on_epoch_end(self, dict(row))
                self._check_trainable()  # a callback may have unfrozen layers

    def _check_trainable(self) -> None:
        """Refuse weights that train now but were frozen when the tuner was built: its optimizers were built
        over the weights that trained then, so "train the head, then unfreeze the backbone" computed the
        backbone's gradients at every step and never moved it, silently (fuzz round 44).

        Raises:
            ConfigError: naming ``model`` and the first such weights.
        """
        held = {id(p) for o in self.optimizers.values() for g in o.param_groups for p in g["params"]}
        held.update(id(p) for p in self.net.response_parameters())  # (a method that trains none: fixed, hd, ift)
        new = [n for n, p in self.net.model.named_parameters() if p.requires_grad and id(p) not in held]
        if new:
            shown = ", ".join(new[:4]) + (f" and {len(new) - 4} more" if len(new) > 4 else "")
            they, them, were = ("they", "them", "were") if len(new) > 1 else ("it", "it", "was")
            raise ConfigError("model", f"{shown} {'train' if len(new) > 1 else 'trains'} now (requires_grad=True) "
                                       f"but no optimizer holds {them} ({they} {were} frozen, or not in the model, "
                                       f"when this SelfTuner was built), so {they} would never move; build a new "
                                       "SelfTuner after unfreezing or replacing layers (they stay plain; hypernetize a "
                                       "fresh model for them to respond)")

    def _bound(self) -> list[HypergradientLR | HypergradientMomentum]:
        """The optimizer settings bound to hyperparameters (``tuner.lr``, ``tuner.momentum``)."""
        return [b for b in (self.lr_tuner, self.momentum_tuner) if b is not None]

    def _progress(self) -> int:
        """Weight steps done in this run's epochs, in steps of the starting batch: what [tuner.schedule]
        runs on when the batch grows (the step count while it does not), so a schedule still ends with
        the run."""
        order = self.order
        return order.epoch * order.batches_per_epoch + math.ceil(order.pos / self._start_batch)

    def gradient_noise(self, x: Any, y: Any, *, test: str | None = None, ratio: float | None = None,
                       vectorize: bool = True) -> GradientNoise:
        """AdAdaGrad's test statistic on batch ``(x, y)`` at the current weights (see
        :mod:`selftune.batch_size`): per-example gradients of the training loss of the network's own
        weights, at the current hyperparameters, in eval mode. ``test`` and ``ratio`` default to
        ``settings.adaptive_batch`` (or the norm test at 0.1)."""
        net, settings = self.net, self.settings.adaptive_batch or AdaptiveBatchSettings()
        test = test or settings.test
        ratio = ratio or (settings.eta if test == "norm" else settings.theta)
        owned = {id(p) for g in self.optimizers[self.algorithm.lr_group].param_groups for p in g["params"]}
        params = {name: p for name, p in net.named_parameters() if id(p) in owned}
        with torch.no_grad():
            values = net.space.discretize(net.space.to_constrained(net.hparams.detach().unsqueeze(0)))
        lookup, dim, n = self._lookup(values), net.batch_dim, batch_of(x, net.batch_dim)

        def loss(p: dict[str, torch.Tensor], xi: Any, yi: Any) -> torch.Tensor:
            return self.objective.train_loss(torch.func.functional_call(net, p, (xi,)), yi, lookup, batch_dim=dim)

        def matrix(start: int, stop: int) -> torch.Tensor:
            return per_example_gradients(loss, params, example_rows(x, start, stop, dim, n),
                                         example_rows(y, start, stop, dim, n), batch_dim=dim, vectorize=vectorize)

        was_training = net.training
        net.eval()
        try:
            return gradient_noise(chunked(matrix, n, self.settings.batch_size), test, ratio)
        finally:
            net.train(was_training)

    def _test_batch(self, x: Any, y: Any) -> int:
        """The batch size AdAdaGrad's test asks for after this batch (counted as the examples it
        forwarded and backwarded)."""
        s = self.settings.adaptive_batch
        assert s is not None
        noise = self.gradient_noise(x, y)
        spent = noise["examples"] * (2 if s.test == "inner_product" else 1)
        self.log.counters.examples += spent
        self.log.counters.test_examples += spent
        return adaptive_batch_size(self.order.batch_size, noise, self._batch_limit)

    def _batch_scale(self) -> float:
        """The rate's factor for the current batch (settings.lr_batch_scaling; 1 without it)."""
        if self._lr_rule is None:
            return 1.0
        # the examples this step averages over: an epoch's short last batch after the batch grew must not
        # take the grown batch's rate (30 examples at the rate of 1,100 under the linear rule)
        batch = self.order.batch_size if self._trained_batch is None else min(self.order.batch_size,
                                                                               self._trained_batch)
        return lr_scale(batch, self._reference_batch, self._lr_rule)

    def _short_batch_factor(self) -> float:
        """How much below a full batch's rate this step's is: an epoch's short last batch under
        ``lr_batch_scaling`` (1 otherwise). A trajectory row records the full batch's rate, and a run that
        follows it applies this factor again, so a short step's reduced rate is not replayed on the
        ``log_every`` full steps its row stands for."""
        if self._lr_rule is None:
            return 1.0
        return self._batch_scale() / lr_scale(self.order.batch_size, self._reference_batch, self._lr_rule)

    # ------------------------------------------------------------------------------------------
    # The roll-back point: one owner (this tuner); divergence rolls back to it
    # ------------------------------------------------------------------------------------------
    def snapshot(self, point: bool = True, *, judged: bool = False) -> dict[str, Any]:
        """The current :meth:`state_dict`, which also becomes the roll-back point if the run is healthy.

        Points (``point=True``) are taken at fit start, at every epoch end and at every checkpoint a
        recorder takes on its schedule: each judges the training since the previous point
        (:meth:`~selftune.bookkeeping.RunLog.close_interval`: a training loss and a weight norm that both
        grew far past their recent lows are a blow-up), and a healthy one becomes the roll-back point; a
        point with no step since the previous one keeps that one's verdict. ``point=False`` (a checkpoint
        off the schedule: an interrupt, the end of a fit) judges nothing and moves nothing, so a run
        resumed from it goes on exactly as an uninterrupted one. The returned state carries the roll-back
        point under ``"rollback"`` when it is not this state, so a resumed run rolls back where an
        uninterrupted one would; a roll-back behind a checkpoint a recorder committed is the recorder's
        to undo (:meth:`Callback.on_divergence`).

        ``judged``: the state's validation loss was just judged (an epoch end, the start of a fit). A point
        between two epoch ends is judged on the training loss only, so when it becomes the roll-back point
        the latest judged one is kept too (``"rollback_checked"`` in the state): a validation loss that blew
        up by the next epoch end (``settings.rollback_val_ratio``) rolls back there, not to a state from
        inside the epoch that blew up."""
        log = self.log
        here = (self.counters.steps, self.epoch)
        if point:
            verdict = log.close_interval(self.settings.rollback_loss_ratio, self._weight_norm())
            if verdict is not None:
                log.train_healthy = verdict
            log.healthy = log.train_healthy and log.val_healthy
            # past every divergence of the streak: the roll-backs worked (an epoch end's validation blow-up
            # counts at that epoch end, which a judged point at the same step passes)
            passed = here[0] > log.diverged_at or (judged and here[0] == log.diverged_at)
            if log.healthy and log.streak and passed:
                log.streak = 0
            log.last_point = here
        state = self._state()
        # a second point at the roll-back point's own position (a recorder's checkpoint at the epoch end the
        # tuner just judged) keeps it: a copy of the same state would only cost memory and checkpoint space
        if self._good is None or (point and log.healthy and _position(self._good) != here):
            if judged or not self._val_rule_on:
                self._checked = None
            elif self._checked is None and self._good is not None:
                self._checked = self._good  # judged (else _checked would be set): it stays the fallback
            # the kept epoch's tensors are never changed in place: the roll-back point shares them
            shared = {id(t): t for t in (self._best or {}).get("net", {}).values()}
            # the log's rows are fresh dicts of numbers (RunLog.state_dict) that nothing changes afterwards:
            # copying them again took most of the snapshot's time, and grew with the run (each epoch end
            # copied every row so far)
            for key in ("trajectory", "history"):
                rows = state["log"][key]
                shared[id(rows)] = rows
                shared.update((id(r), r) for r in rows)
            self._good = copy.deepcopy(state, shared)
        good = self._good
        state["rollback"] = None if _position(good) == _position(state) else good
        if self._checked is not None:
            state["rollback_checked"] = self._checked
        return state

    def _weight_norm(self) -> float:
        """The norm of the network's own weights (a roll-back point's health, with the training loss)."""
        with torch.no_grad():
            return math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in self.net.general_parameters()))

    def _divergence_fix(self, group: str) -> str:
        """What to change, for a run that diverged in optimizer ``group``: only the settings this run has."""
        if group == "hyper":
            return _DIVERGENCE_FIX["hyper"] + ("" if self.settings.scale_lr is None else " or tuner.scale_lr")
        fix = _DIVERGENCE_FIX["weights"]
        if isinstance(self.settings.lr, str):  # a rate bound to a hyperparameter starts at its init
            fix = f"lower space.{self.settings.lr}.init (and its high bound; tuner.lr is bound to it)"
        if "response" in self.optimizers:
            fix += " (tuner.response_lr for the best-response weights)"
        return fix + (" or set tuner.grad_clip" if self.settings.grad_clip is None else " or lower tuner.grad_clip")

    def _runaway_hyper(self) -> bool:
        """Hyperparameters or perturbation scales that jumped far past any meaningful value since the roll-back
        point: a hyper step ran away (tuner.hyper_lr far too large), and the weights' loss turned non-finite
        only as a result. A jump, not a level, so a value a long run parked on its bound, or a large
        init_scale, leaves a weights' divergence blamed on the weights."""
        assert self._good is not None
        good = self._good["net"]
        with torch.no_grad():
            net = self.net
            u_jump = (net.hparams.detach().cpu() - good["hparams"].cpu()).abs().max()
            scale_then = torch.nn.functional.softplus(good["scale_raw"].cpu())
            grew = (net.scale.detach().cpu() - scale_then).max()
            return bool(u_jump > RUNAWAY) or bool(grew > RUNAWAY)

    def _roll_back(self, div: NonFiniteError, callbacks: Sequence[Callback]) -> None:
        assert self._good is not None
        if div.group != "hyper" and self.algorithm.tunes and self._runaway_hyper():
            div = NonFiniteError(f"{div.what} (driven by hyperparameters that ran away)", "hyper", div.step, div.how,
                                 epoch_end=div.epoch_end)
        log = self.log
        # a validation loss judged at an epoch end: a point inside that epoch was never judged on it and is
        # no safe target; the last judged point is
        checked = self._checked
        target = checked if div.epoch_end and checked is not None else self._good
        if log.streak >= self.settings.max_divergences:
            total = "" if log.divergences == log.streak else f", {log.divergences + 1} in all"
            raise DivergenceError(
                f"run diverged {_times(log.streak + 1)} in a row{total} (last: {div}); the last good state is at step "
                f"{target['log']['counters']['steps']}; "
                f"{self._divergence_fix(div.group)}") from div
        count, seconds, spent = log.divergences + 1, log.seconds, log.counters
        streak, furthest = log.streak + 1, max(log.diverged_at, div.step)
        last = self.log.last_point
        behind = last is not None and _position(target) < last
        self.load_state_dict(copy.deepcopy(target))  # a copy: the optimizers would share its tensors
        self._checked = None if target is checked else checked
        self.net.train()  # a divergence inside a hyper step (or a validation pass) left it in eval mode
        self.val_grads = None
        self.log.divergences = count
        self.log.streak, self.log.diverged_at = streak, furthest
        # the discarded steps were computed all the same: their time and examples stay counted
        c = self.log.counters
        c.seconds = seconds
        c.examples, c.eval_examples, c.test_examples = spent.examples, spent.eval_examples, spent.test_examples
        self.log.start_clock()
        groups = ["hyper"] if div.group == "hyper" else [k for k in self.optimizers if k != "hyper"]
        changes = []
        factor = self.settings.divergence_lr_factor
        for key in groups:
            for i, group in enumerate(self.optimizers[key].param_groups):
                bound = self.lr_tuner is not None and key == self.algorithm.lr_group and follows(i, group)
                if bound and i > 0:  # a scaled layer's rate follows the bound one, which is lowered once
                    continue
                if bound:
                    old = self.lr_tuner.value
                    self.lr_tuner.scale(factor)  # the rate is a hyperparameter: lower it there
                    new = self.lr_tuner.value
                elif key == "hyper":
                    old = group["lr"]
                    new = group["lr"] = old * factor
                else:  # the base rate; the schedule's factor applies on top at the next step
                    old = self._base_lrs[key][i]
                    new = self._base_lrs[key][i] = old * factor
                    group["lr"] = group["lr"] * factor
                scale = group.get("lr_scale")  # a layer's group (tuner.lr_scales): which one, by its pattern
                label = f"{key} lr" if scale is None else f"{key} lr of {group.get('lr_pattern')!r} (x{scale:g})"
                changes.append(f"{label} {old:.3g} -> {new:.3g}")
        if div.group != "hyper" and "response" in self.optimizers and self.net.form == "delta":
            # the restored state may hold a response already on its way up (HyperNet.reset_response)
            self.net.reset_response()
            self.optimizers["response"].state.clear()
            changes.append("response paths reset")
        self._good = None
        self.snapshot(judged=self._checked is None)  # the lowered rates are part of the new roll-back target
        val_ratio = self.log.val_ratio
        val_rule = "" if not val_ratio else f", or the validation loss rose above {val_ratio / 2:g}x an untrained " \
                                            "network's"
        why = "" if not behind else (
            " (the last epoch end whose validation loss was judged healthy: the states since were never scored "
            "on the validation data)" if target is checked else
            f" (the last state whose validation loss was at most {val_ratio / 2:g}x an untrained network's and "
            f"whose training loss and weights had not grown more than {self.settings.rollback_loss_ratio:g}x and "
            f"{NORM_GROWTH:g}x: the later ones were finite but already blowing up)" if div.epoch_end else
            f" (the last state before the training loss grew more than {self.settings.rollback_loss_ratio:g}x "
            f"and the weights {NORM_GROWTH:g}x{val_rule}: the later ones were finite but already blowing up)")
        info = {"step": div.step, "what": div.what, "group": div.group, "rolled_back_to": self.counters.steps,
                "rolled_back_to_epoch": self.epoch, "divergences": count,
                "message": f"{div}; rolled back to step {self.counters.steps}{why}; {', '.join(changes)}"}
        for cb in callbacks:
            cb.on_divergence(self, info)

    def request_stop(self) -> None:
        """Stop :meth:`fit` after the current step (the state stays resumable)."""
        self._stop = True

    def close(self) -> None:
        """Stop the worker processes that fetch this tuner's examples (a DataLoader's ``num_workers``). They
        live as long as the tuner otherwise, ready for the next ``fit`` or ``score`` (a finished notebook
        cell keeps them, each with its copy of the dataset); a later batch starts them again. Also on leaving
        ``with SelfTuner(...) as tuner:``."""
        for source in self.sources.values():
            source.close()

    def __enter__(self) -> SelfTuner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def stop_requested(self) -> bool:
        return self._stop

    # ------------------------------------------------------------------------------------------
    # Steps
    # ------------------------------------------------------------------------------------------
    def weight_step(self, x: torch.Tensor, y: torch.Tensor, u: torch.Tensor | None, group: str,
                    respond: bool = True, linearize: bool = False) -> float:
        """One step of optimizer ``group`` at per-example unconstrained hyperparameters ``u``
        (``None``: the current ones); what algorithms compose their weight steps from."""
        net = self.net
        self._check(net.hparams, "hyperparameters", "hyper")
        # Inside a user's torch.autocast region, autocast keeps its low-precision copy of each weight until
        # the region ends: without this, every step after the first would run on the first step's weights.
        torch.clear_autocast_cache()
        net.zero_grad(set_to_none=True)
        total, size, value = batch_of(x, net.batch_dim), self.settings.batch_size, 0.0
        # Gradient accumulation: micro-batches of batch_size, each loss weighted by its share of the
        # batch, so the summed gradient is the whole batch's mean-loss gradient (decay term included once).
        bounds = [(start, min(start + size, total)) for start in range(0, total, size)]
        if self.needs_two and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
            bounds[-2:] = [(bounds[-2][0], total)]  # a micro-batch of one example joins the one before
        for start, stop in bounds:
            whole = start == 0 and stop == total
            dim = net.batch_dim
            loss = self._micro_step(x if whole else rows(x, start, stop, dim, total),
                                    y if whole else rows(y, start, stop, dim, total),
                                    u if u is None or whole else u[start:stop], u is None, group, respond,
                                    linearize, (stop - start) / total)
            value += loss
        params = [p for g in self.optimizers[group].param_groups for p in g["params"]]
        clip = self.settings.grad_clip or math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        self._check(norm, "weight gradient", group)
        # the factor the clip scaled this step's gradient by (torch's rule), for one-pass's written-out update
        self.clip_factor = 1.0 if clip == math.inf else min(1.0, clip / (float(norm) + 1e-6))
        bound = self._bound() if group == self.algorithm.lr_group else []
        for b in bound:
            if b.before_step():
                self.log.hypergrad_seen[b.index] = True
        self._apply_schedule(group)
        self.optimizers[group].step()
        for b in bound:
            b.after_step()
        self.log.counters.examples += total
        return value

    def _micro_step(self, x: Any, y: Any, u: torch.Tensor | None, unperturbed: bool, group: str, respond: bool,
                    linearize: bool, share: float) -> float:
        """Forward and backward one micro-batch of a weight step; returns its weighted training loss."""
        net = self.net
        with torch.no_grad():
            values = net.space.discretize(net.space.to_constrained(
                net.hparams.expand(batch_of(x, net.batch_dim), -1) if unperturbed else u))
        lookup = self._lookup(values)
        if self.augment is not None:
            x = self.augment(x, lookup, self.generator)
        norms = None
        if linearize and u is not None:
            # The first-order response has no effective weights to decay: the decay sees the general ones.
            logits = net.forward_linearized(x, u, generator=self.generator)
        elif self.objective.weight_decay is None:
            logits = net(x, u, respond=respond, generator=self.generator)
        else:
            with net.recording_norms(self._decayed) as recorded:
                logits = net(x, u, respond=respond, generator=self.generator)
            norms = recorded()
        if self.objective.classes_dim is None and self.objective.loss is None:
            self._fix_layout(logits, y)
        loss = self.objective.train_loss(logits, y, lookup, self._decayed, norms=norms, batch_dim=net.batch_dim)
        self._check(loss, "training loss", group)
        (loss * share if share != 1.0 else loss).backward()
        return loss.item() * share

    def _apply_schedule(self, group: str) -> None:
        """Set ``group``'s rates to base x the schedule's factor at this step (the bound rate's base is
        its hyperparameter)."""
        if self._follow is not None and group == self.algorithm.lr_group:
            lr = self._follow[0].lr_at(self.log.counters.steps)
            if lr is not None:  # the recorded rate already includes any schedule's factor and tuning
                # times what roll-backs did to the base: a run that diverges while it follows does slow down
                bases = self._base_lrs[group]
                lr *= bases[0] / self._first_lrs[group][0] * self._short_batch_factor()
                for g, base in zip(self.optimizers[group].param_groups, bases, strict=True):
                    g["lr"] = lr * base / bases[0]
                return
        s, torch_schedule = self.settings.schedule, self._torch_schedule
        if torch_schedule is None and s.kind == "constant" and s.warmup_epochs == 0 and self._lr_rule is None:
            if self.lr_tuner is None or group != self.algorithm.lr_group:
                return
        if torch_schedule is not None:
            f = torch_schedule.factor
        else:
            clock = self.log.counters.steps if self.settings.adaptive_batch is None else self._step_clock
            f = factor(s, clock, self._planned_steps or self.batches_per_epoch, self.batches_per_epoch)
        f *= self._batch_scale()
        for i, g in enumerate(self.optimizers[group].param_groups):
            bound = self.lr_tuner is not None and group == self.algorithm.lr_group and follows(i, g)
            g["lr"] = (self.lr_tuner.value * g.get("lr_scale", 1.0) if bound else self._base_lrs[group][i]) * f

    @property
    def weights_lr(self) -> float:
        """The rate the network's own weights trained at in the last step (schedule and tuning included)."""
        return float(self.optimizers[self.algorithm.lr_group].param_groups[0]["lr"])

    def _hyper_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One step of the hyperparameters (and scales) on a validation batch, in eval mode."""
        net, s = self.net, self.settings
        net.eval()
        torch.clear_autocast_cache()  # the weights changed since the last cast (see weight_step)
        if not self.algorithm.tunes:  # hd on the validation signal: the rate's step is the whole hyper step
            value = self._validate_lr(x, y)
            net.train()
            self.log.counters.hyper_steps += 1
            if value is not None:
                self.log.add_val_loss(value)
            return
        if self.algorithm.uses_implicit(self):  # the algorithm computes the hypergradient (selftune.implicit)
            net.zero_grad(set_to_none=True)
            self.val_grads = None
            val_loss = self.algorithm.hypergradient(self, x, y)
            self._check(val_loss, "validation loss", "weights")
            self._apply_hypergradient()
            self._validate_lr(x, y, known=self.val_grads)
            self.val_grads = None
            net.train()
            self.log.add_val_loss(val_loss.item())
            self.log.counters.hyper_steps += 1
            return
        with self.frozen(self._weights):
            net.zero_grad(set_to_none=True)
            if s.tune_scales:
                u = net.perturb(batch_of(x, net.batch_dim), self.generator)
            else:
                u = net.hparams.unsqueeze(0).expand(batch_of(x, net.batch_dim), -1)
            val_loss = self.objective.eval_loss(net(x, u), y)
            loss = val_loss - s.entropy_weight * net.entropy() if s.tune_scales else val_loss
            # The hyperparameters are bounded by construction, so a non-finite validation loss comes
            # from the weights: blame their learning rate, not the hyperparameters'.
            self._check(loss, "validation loss", "weights")
            loss.backward()
            self._apply_hypergradient()
        self._validate_lr(x, y)
        net.train()
        self.log.counters.examples += batch_of(x, net.batch_dim)
        self.log.counters.hyper_steps += 1
        self.log.add_val_loss(val_loss.item())

    def _validate_lr(self, x: Any, y: Any, known: dict[torch.nn.Parameter, torch.Tensor] | None = None) -> float | None:
        """The validation signal of a bound learning rate (``tuner.lr_signal``): the gradient of the
        validation batch's loss in the rate's weights, at the current hyperparameters, of the network as
        :meth:`score` evaluates it (``known``: that gradient, already taken by an implicit hypergradient),
        steps the rate along the weights' travel since the last call
        (:meth:`~selftune.hd.HypergradientLR.observe_validation`). Returns the batch's loss where it was
        computed here; ``None`` where the signal is off or ``known`` was used."""
        bound = self.lr_tuner
        if bound is None or not self._validates_lr:
            return None
        params = bound.params
        value = None
        if known is not None:
            grads = [known.get(p) for p in params]
        elif not bound.travelled():  # the round's later batches: the weights have not moved since the first
            return None
        else:
            live = [p for p in params if p.requires_grad]
            if not live:  # the user froze every weight the rate drives: nothing to judge
                return None
            self.net.eval()  # an implicit hypergradient leaves the net in training mode
            with torch.enable_grad():
                # the network as score() evaluates it (STN's response path is part of it at these values)
                loss = self.objective.eval_loss(self.net(x), y)
                self._check(loss, "validation loss", "weights")
                found = dict(zip(live, torch.autograd.grad(loss, live, allow_unused=True), strict=True))
            grads = [found.get(p) for p in params]
            value = loss.item()
            self.log.counters.examples += batch_of(x, self.net.batch_dim)
        if bound.observe_validation(grads):
            self.log.hypergrad_seen[bound.index] = True
        return value

    def _apply_hypergradient(self) -> None:
        """Step the hyperparameters on the gradient in ``net.hparams.grad`` (checked, recorded)."""
        net = self.net
        for bound in self._bound() if not self.algorithm.differentiates_update else ():
            # The rate (and momentum) reach no validation loss through the gates (they drive no module):
            # only their own hypergradient moves them, and their perturbation scales stay put.
            for p in (net.hparams, net.scale_raw):
                if p.grad is not None:
                    p.grad[bound.index] = 0
        if self.log.idle:  # read again: a dropout on a path the first batch skipped (stochastic depth) is read later
            self.log.idle = self._undriven()
        for name in self.log.idle or ():
            # A name nothing reads still feeds the response layers, so it had a hypergradient and drifted while
            # the explanation said it drives nothing: it keeps its init value (and its perturbation scale).
            for p in (net.hparams, net.scale_raw):
                if p.grad is not None:
                    p.grad[net.space.index(name)] = 0
        self._check(net.hparams.grad, "hypergradient", "hyper")
        if net.hparams.grad is not None:
            seen = (net.hparams.grad != 0).tolist()
            self.log.hypergrad_seen = [a or b for a, b in zip(self.log.hypergrad_seen, seen, strict=True)]
        rate = self.lr_tuner.value if self.lr_tuner is not None and self.algorithm.differentiates_update else None
        self.optimizers["hyper"].step()
        if rate is not None:  # at most MAX_CHANGE x per step either way, as hd's own steps
            self.lr_tuner.limit(rate)
        self._check(net.hparams, "hyperparameters", "hyper")

    # ------------------------------------------------------------------------------------------
    # Helpers
    # ------------------------------------------------------------------------------------------
    def _lookup(self, values: torch.Tensor):
        """Per-example values by name, for the loss terms and augmentations; a name asked for counts as read
        (a custom augmentation reads its strength through it: without this it was "drives nothing", its
        hypergradient zeroed)."""
        index, read = self.net.space.index, self._looked_up

        def lookup(name: str) -> torch.Tensor:
            read.add(name)
            return values[:, index(name)]

        return lookup

    @contextmanager
    def kept_statistics(self) -> Iterator[None]:
        """Leave BatchNorm's (and a tracking InstanceNorm's) running statistics as they are across one extra
        training-mode pass (Delta-STN's response step at perturbed values, ``ift``'s second pass over a
        batch): evaluation normalises with the statistics of the plain network's own steps, as fixed
        training's, and each batch counts once."""
        layers = self._tracking
        if not layers:
            yield
            return
        names = ("running_mean", "running_var", "num_batches_tracked")
        # the pass updates copies, and the originals are put back: a graph that differentiates the pass
        # again (ift) keeps the copies it saved, so nothing it needs is changed in place
        saved = [{n: getattr(m, n) for n in names if getattr(m, n) is not None} for m in layers]
        for m, buffers in zip(layers, saved, strict=True):
            for n, b in buffers.items():
                setattr(m, n, b.clone())
        try:
            yield
        finally:
            for m, buffers in zip(layers, saved, strict=True):
                for n, b in buffers.items():
                    setattr(m, n, b)

    @staticmethod
    @contextmanager
    def frozen(params: list[torch.nn.Parameter]) -> Iterator[None]:
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

    def _batch(self, split: str, index: torch.Tensor, *, loop: bool = True) -> tuple[Any, Any]:
        """The batch ``index`` of ``split``, checked, on the device. ``loop``: one the training loop drew
        just now (``order`` has counted it), whose examples' random transforms are seeded by its place in the
        run (:func:`~selftune.batches.batch_seed`); after a training batch, the next one is handed to the
        workers to fetch while this one trains (:meth:`~selftune.batches.Source.prefetch`)."""
        source, order = self.sources[split], self.order
        seed = self._batch_seed(split, order.epoch, order.batch) if loop else None
        x, y = source.take(index, self.fields, seed=seed)
        if not source.checked_whole:  # a Dataset of the user's: each batch as it comes (validation.check_batch)
            check_batch(x, y, index if source.origin is None else source.origin[index], split,
                        classes=self._n_outputs, batch_dim=self.net.batch_dim)
        if loop and split == "train" and source.workers is not None:
            ahead = order.peek_train()
            if ahead is not None:
                source.prefetch(ahead, self._batch_seed("train", order.epoch, order.batch + 1))
        return to_device(x, self.device), to_device(y, self.device)

    def _batch_seed(self, split: str, epoch: int, batch: int) -> int:
        """The seed of the examples of training batch ``batch`` (counted from 1) of ``epoch``, or of the
        validation batch drawn after it (the hyper steps taken so far tell several apart: after one step,
        validation batches that wrap around the validation set end at the same place)."""
        if split == "train":
            return batch_seed(self.seed, 0, epoch, batch)
        return batch_seed(self.seed, 1, epoch, batch, self.order.val_pos, self.log.counters.hyper_steps)

    def score(self, data: Any | None = None, batch_size: int = 512, *, net: HyperNet | None = None) -> dict[str, float]:
        """:func:`score` of ``net`` (default: the tuner's own) on ``data`` (default: the validation data, with
        its loader's collate) with this tuner's loss, metrics and fields."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError("batch_size", f"must be a whole number >= 1 (got {batch_size!r})")
        source = self.sources["val"] if data is None else _as_source(data, "data", batch_dim=self.net.batch_dim)
        if data is not None:  # as the splits were: inputs the model cannot take, labels past its outputs
            self._check_source(source, "data")
        net = self.net if net is None else net
        return _score(net, source, self.objective, self.metrics, self.fields, batch_size, self.device,
                      self.net.batch_dim)

    def _hparam_columns(self) -> dict[str, float]:
        net = self.net
        with torch.no_grad():
            values = net.space.to_constrained(net.hparams.double()).tolist()
            scales = net.scale.double().tolist()
        row = dict(zip(net.space.names, values, strict=True))
        row.update({f"{n}_scale": v for n, v in zip(net.space.names, scales, strict=True)})
        # the last step's rate for a full batch of its size (_short_batch_factor)
        row["weights_lr"] = self.log.end_lr if self.log.end_lr is not None else self.weights_lr
        if self.settings.adaptive_batch is not None or self._lr_rule is not None:
            row["batch_size"] = float(self.order.batch_size)
        return row

    def _score_untrained(self) -> None:
        """The reference of ``settings.rollback_val_ratio``: the validation loss of the network before its
        first step (one validation pass, counted), with the default cross-entropy at least
        log C. Why the untrained network: its loss is what knowing nothing costs, so a loss several times above
        it is a model that has become confidently wrong, which over-fitting alone does not reach (measured:
        docs/benchmarks/README.md); a first epoch's loss would be a stricter, data-dependent reference."""
        ratio = self.settings.rollback_val_ratio
        if ratio == 0:
            return
        scored = self.score()
        self.net.train()
        self.log.counters.eval_examples += self.n_val
        loss = scored["loss"]
        # the default cross-entropy (a metric of the user's may be called "accuracy" too: not the test)
        classes = self.objective.loss is None
        if classes and math.isfinite(loss):
            # log C is what predicting uniformly costs, and a floor for a network that starts trained
            # (fine-tuning), whose own low loss would make a strict reference
            loss = max(loss, math.log(self._classes()))
        if ratio is None:  # unset: a loss of the user's own has a zero point a ratio cannot judge (an NLL's)
            ratio = VAL_RATIO if classes else 0.0
        usable = ratio > 0 and math.isfinite(loss) and loss > 0
        self.log.val_reference = float(loss) if usable else None
        self.log.val_ratio = float(ratio) if usable else 0.0

    @property
    def _val_rule_on(self) -> bool:
        """Whether epoch ends judge the validation loss (``settings.rollback_val_ratio``)."""
        log = self.log
        return bool(log.val_ratio) and log.val_reference is not None and log.val_gave_up is None

    @torch.no_grad()
    def _classes(self) -> int:
        """The number of classes the network's outputs score (one validation example, in eval mode)."""
        x, y = self._batch("val", torch.arange(1), loop=False)
        was_training = self.net.training
        self.net.eval()
        try:
            logits, _ = flatten_tokens(self.net(x), y, self.objective.classes_dim)
        finally:
            self.net.train(was_training)
        return int(logits.shape[-1])

    def _judge_validation(self, loss: float) -> None:
        """Roll back (as a divergence of the weights) if epoch's validation loss ``loss`` is not finite or
        above ``settings.rollback_val_ratio`` times the untrained network's; a loss above half that is left to
        run, but its state is no roll-back point. A slow blow-up stays finite: on breast-cancer, a run at a
        high rate with dropouts tuned to 0.9 ended with a validation loss near 0 turned into a test loss of 267
        (a few rows wrong with certainty), while the training-loss rule of :meth:`snapshot` passed it."""
        log = self.log
        ratio, reference = log.val_ratio, log.val_reference
        if not self._val_rule_on:  # a ratio cannot judge a loss of the user's, but a NaN/inf is never a result
            if not math.isfinite(loss):
                raise NonFiniteError("validation loss", "weights", self.counters.steps, epoch_end=True)
            return
        if log.streak >= self.settings.max_divergences and (not math.isfinite(loss) or loss > ratio * reference):
            # roll-backs in a row did not bring it down: over-fitting far past the untrained loss (tiny validation
            # sets), or a model confidently wrong for good; the run goes on without the rule rather than fail
            log.val_gave_up, log.val_healthy = self.epoch + 1, True
            return
        if not math.isfinite(loss):
            raise NonFiniteError("validation loss", "weights", self.counters.steps, epoch_end=True)
        if loss > ratio * reference:
            raise NonFiniteError(f"validation loss ({loss:.4g}, over {ratio:g}x {reference:.4g}, the loss of an "
                                 "untrained network)", "weights", self.counters.steps, "blew up", epoch_end=True)
        self.log.val_healthy = loss <= ratio / 2 * reference

    def _end_epoch(self) -> dict[str, float]:
        val = self.score()
        self.net.train()
        self.log.counters.eval_examples += self.n_val
        self._judge_validation(val["loss"])
        self._remember_best(self.order.epoch + 1, val["loss"])
        row = self.log.epoch_row(self.order.epoch + 1, val, self._hparam_columns())
        self.algorithm.on_epoch_end(self, row)
        if self._torch_schedule is not None and self.settings.lr_scheduler_interval == "epoch":
            self._torch_schedule.step(val["loss"])
        self.order.end_epoch()
        self.snapshot(judged=True)
        return row

    def _remember_best(self, epoch: int, loss: float) -> None:
        """With ``settings.keep = "best"``: copy the net's state if epoch ``epoch``'s validation loss is the
        lowest so far (ties keep the earlier epoch: the shorter run that scored as well). A copy of the state,
        not of the module, so it is checkpointed with the run (a resumed run keeps the same epoch) and rolled
        back with it (a best epoch from a stretch a roll-back discarded is gone with the stretch)."""
        if self.settings.keep != "best" or not math.isfinite(loss):
            return
        if self._best is None or loss < self._best["loss"]:
            # on the CPU: a GPU run keeps no second model in device memory for it
            state = {k: v.detach().to("cpu", copy=True) for k, v in self.net.state_dict().items()}
            self._best = {"epoch": epoch, "loss": float(loss), "net": state}

    def kept(self) -> tuple[HyperNet, int | None]:
        """The net the run returns and its epoch: with ``settings.keep = "best"``, a copy of the net at the
        epoch of the lowest validation loss so far (``None`` before the first epoch ends: the net itself);
        otherwise the net itself. A copy, so training can go on from the last step's weights."""
        if self.settings.keep != "best" or self._best is None:
            return self.net, None
        net = copy_module(self.net)
        net.load_state_dict(self._best["net"])
        return net, int(self._best["epoch"])

    def result(self) -> FitResult:
        """The run so far as a :class:`FitResult` (its net and hyperparameters are :meth:`kept`'s)."""
        c = self.counters
        net, epoch = self.kept()
        return FitResult(
            net=net, hparams=net.values(), trajectory=[dict(r) for r in self.trajectory],
            history=[dict(r) for r in self.history],
            compute={"examples": c.examples, "eval_examples": c.eval_examples, "seconds": self.log.seconds,
                     "steps": c.steps, "hyper_steps": c.hyper_steps},
            schedule=self.schedule(), kept_epoch=epoch)

    def schedule(self) -> HyperSchedule | None:
        """The hyperparameter schedule of the run so far (``None`` before the first step): its start
        and every trajectory row, at :attr:`TunerSettings.log_every` resolution. ``None`` too for a run shorter
        than ``log_every`` steps whose values or rate moved: it recorded no row, so the start alone would be
        presented as the schedule it followed (a fixed run's is exact: nothing moved)."""
        if not self.log.start:
            return None
        if self.log.counters.steps and not any(int(r["step"]) > 0 for r in self.trajectory):
            # every epoch's end (a value that moved and came back, or a kept epoch, is seen there) and the last step
            # (a followed run's values are already the next step's: its epoch rows tell)
            ends = [*self.history, *([] if self._follow is not None else
                                     [{**self.net.values(), "weights_lr": self.last_lr}])]
            if not all(stayed(self.log.start, end, end.get("weights_lr")) for end in ends):
                return None
        return HyperSchedule.from_trajectory(self.log.start, self.trajectory, self.net.space.names,
                                             steps_per_epoch=self.batches_per_epoch, end_lr=self.last_lr)

    @property
    def last_lr(self) -> float | None:
        """The rate of the run's last step, a full batch's (see :meth:`_short_batch_factor`); ``None``
        before the first step."""
        return self.log.end_lr if self.log.counters.steps else None

    # ------------------------------------------------------------------------------------------
    # Checkpointing
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, hyperparameters, optimizers, RNG, data
        order and the run log, and the roll-back point (as :meth:`snapshot` with ``point=False``: a run
        resumed from it rolls back where the uninterrupted one would; without it the resume point became
        the roll-back point). Holds only tensors and plain Python values, so it loads with
        ``torch.load(weights_only=True)``."""
        state = self._state()
        if self._good is not None:
            state["rollback"] = None if _position(self._good) == _position(state) else self._good
            if self._checked is not None:
                state["rollback_checked"] = self._checked
        return state

    def _state(self) -> dict[str, Any]:
        """The tuner's own state, without roll-back points (what a roll-back point itself is)."""
        return {
            "format": _STATE_FORMAT,
            "method": self.method,
            "net": self.net.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "optimizer_classes": {k: type(o).__name__ for k, o in self.optimizers.items()},
            "generator": self.generator.get_state(),
            # PyTorch's global generators: a model's own nn.Dropout, a Transformer layer's dropout or a
            # torch.rand in its forward draw from them, so a resumed run needs them to equal an uninterrupted one
            # (the run's own, see _own_rng: None before its first fit, which seeds them)
            "torch_rng": torch.get_rng_state() if self._in_fit else self._rng,
            "cuda_rng": (torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None) if self._in_fit
            else self._cuda_rng,
            "order": self.order.state_dict(),
            # what the net's hyperparameter vector means, position by position (load_state_dict checks it)
            "space": [[h.name, float(h.low), float(h.high), bool(h.log)] for h in self.net.space.params],
            "log": self.log.state_dict(),
            "lr": self.lr_tuner.state_dict() if self.lr_tuner is not None else None,
            "momentum": self.momentum_tuner.state_dict() if self.momentum_tuner is not None else None,
            "schedule": {"base_lrs": self._base_lrs, "planned_steps": self._planned_steps},
            "lr_scheduler": None if self._torch_schedule is None else self._torch_schedule.state_dict(),
            "best": self._best,
        }

    def _check_fits(self, state: dict[str, Any]) -> None:
        """Refuse a state this tuner would misread, before anything is loaded: the hyperparameters are one
        vector restored by position (another order swaps values silently, other bounds reinterpret them),
        and the data order indexes the training and validation sets it was drawn over."""
        space = self.net.space
        mine = [[h.name, float(h.low), float(h.high), bool(h.log)] for h in space.params]
        saved = state.get("space")  # absent before stop 29: the names, from the run's start values
        names = [s[0] for s in saved] if saved is not None else \
            [k for k in (state.get("log") or {}).get("start") or {} if k != "weights_lr"]  # the first step's rate
        if names and names != space.names:
            raise ConfigError("checkpoint", f"it was saved with the hyperparameters {names}, this tuner has "
                                            f"{space.names} (in this order); declare the space it was saved with")
        changed = next((f"{m[0]} ([{s[1]:g}, {s[2]:g}]{', log' if s[3] else ''} -> [{m[1]:g}, {m[2]:g}]"
                        f"{', log' if m[3] else ''})" for s, m in zip(saved or [], mine, strict=False)
                        if list(s) != m), None)
        if changed:
            raise ConfigError("checkpoint", f"it was saved with other bounds for {changed}; its values would "
                                            "be read on the new scale: declare the bounds it was saved with")
        order = self.order.mismatch(state["order"])
        if order:
            raise ConfigError("checkpoint", f"{order}; a run continues on the data it started with")
        mine_net = self.net.state_dict()
        saved_net = state.get("net") or {}
        shapes = next((f"{k} {tuple(v.shape)} (this net's {tuple(mine_net[k].shape)})" for k, v in saved_net.items()
                       if k in mine_net and isinstance(v, torch.Tensor) and v.shape != mine_net[k].shape), None)
        missing = sorted(set(mine_net) ^ set(saved_net))
        if shapes or missing:
            what = f"a weight of another shape, {shapes}" if shapes else f"other weights ({', '.join(missing[:3])}" \
                   f"{', ...' if len(missing) > 3 else ''} in one and not the other)"
            raise ConfigError("checkpoint", f"it was saved by a net with {what}; build the net it was saved with")
        classes = state.get("optimizer_classes") or {}  # (absent in states of selftune before stop 35)
        for key, opt in self.optimizers.items():  # another optimizer's state fails inside torch, half loaded
            if key in classes and classes[key] != type(opt).__name__:
                raise ConfigError("checkpoint", f"it was saved with optimizer {classes[key]} for the {key!r} weights, "
                                                f"this tuner has {type(opt).__name__} (tuner.optimizer); build it with "
                                                "the optimizer it was saved with")
        group = self.algorithm.lr_group  # the layers' rate scales are the optimizer's groups (tuner.lr_scales)
        saved_groups = ((state.get("optimizers") or {}).get(group) or {}).get("param_groups")
        if saved_groups is not None:
            groups = self.optimizers[group].param_groups
            saved_scales = {g.get("lr_pattern"): g["lr_scale"] for g in saved_groups if "lr_scale" in g}
            mine = {g["lr_pattern"]: g["lr_scale"] for g in groups if "lr_scale" in g}
            sizes = [len(g["params"]) for g in saved_groups], [len(g["params"]) for g in groups]
            if list(saved_scales.items()) != list(mine.items()) or (mine and sizes[0] != sizes[1]):
                raise ConfigError("checkpoint", f"it was saved with layer rate scales {saved_scales or 'none'}, this "
                                                f"tuner has {mine or 'none'} (tuner.lr_scales); build it with the "
                                                "scales it was saved with")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` into a tuner built with the same net, data and settings.

        Raises:
            ConfigError: the state was saved by a tuner of another method or an older selftune, over other
                data sizes, hyperparameters, net weights or shapes, optimizer class or ``lr_scales``; or it is
                not a tuner's state (a network's ``state_dict``). Nothing is loaded then.
        """
        if not isinstance(state, Mapping) or ("format" not in state and "method" not in state):
            looks = "a network's state_dict (load it with net.load_state_dict)" if isinstance(state, Mapping) and \
                state and all(isinstance(v, torch.Tensor) for v in state.values()) else "not a tuner's state"
            raise ConfigError("checkpoint", f"this is {looks}; pass what tuner.state_dict() returned, or a "
                                            "checkpoint file's \"tuner\" entry")
        if state.get("format") != _STATE_FORMAT:
            raise ConfigError("checkpoint", "it was written by an older selftune (format "
                                            f"{state.get('format', 1)}, this one reads {_STATE_FORMAT}); "
                                            "start the run again")
        if state["method"] != self.method:
            raise ConfigError("checkpoint", f"it was saved by method {state['method']!r}, this tuner runs "
                                            f"{self.method!r}")
        self._check_fits(state)
        # copies: a state handed over in memory (another tuner's state_dict(), a fork of a run) would otherwise
        # share its optimizer buffers and kept epoch with the tuner it came from, and train both
        state = copy.deepcopy(state)
        if "rollback" in state:  # a checkpoint (see snapshot()): its roll-back point, or itself
            rollback = state["rollback"]
            # the state itself is loaded into the optimizers, which then share its tensors: the point is a copy
            good = rollback if rollback is not None else \
                copy.deepcopy({k: v for k, v in state.items() if k not in ("rollback", "rollback_checked")})
            checked = state.get("rollback_checked")
        else:  # a state of the tuner alone (a roll-back's own target): fit() or the roll-back snapshots it
            good = checked = None
        self.net.load_state_dict(state["net"])
        for key, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][key])
        self._good, self._checked = good, checked  # (after the loads, which _check_fits has made safe)
        self._best = state.get("best")
        self.generator.set_state(state["generator"])
        # absent in checkpoints of selftune before stop 27; None before a run's first fit (which seeds them)
        rng = state.get("torch_rng")
        self._rng = None if rng is None else rng.cpu()  # a checkpoint loaded with map_location="cuda"
        if self._in_fit and self._rng is not None:  # a roll-back inside fit
            torch.set_rng_state(self._rng)
        cuda_rng = state.get("cuda_rng")
        self._cuda_rng = None
        if cuda_rng is not None and torch.cuda.is_available():
            if len(cuda_rng) == torch.cuda.device_count():
                self._cuda_rng = [r.cpu() for r in cuda_rng]
                if self._in_fit:
                    torch.cuda.set_rng_state_all(self._cuda_rng)
            else:  # another machine: the run goes on, with other draws in the model's own CUDA dropouts
                warnings.warn(f"checkpoint: saved with {len(cuda_rng)} CUDA devices, resumed with "
                              f"{torch.cuda.device_count()}; PyTorch's CUDA generators start afresh, so a model's own "
                              "nn.Dropout on the GPU draws differently from the uninterrupted run",
                              SelftuneWarning, stacklevel=2)
        self.order.load_state_dict(state["order"])
        self.log.load_state_dict(state["log"])
        if self.lr_tuner is not None:
            self.lr_tuner.load_state_dict(state.get("lr") or {})
        if self.momentum_tuner is not None:
            self.momentum_tuner.load_state_dict(state.get("momentum") or {})
        schedule = state.get("schedule") or {}
        if "base_lrs" in schedule:
            self._base_lrs = {k: list(v) for k, v in schedule["base_lrs"].items()}
            self._planned_steps = int(schedule["planned_steps"])
        if self.settings.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self._build_torch_schedule()
            assert self._torch_schedule is not None
            self._torch_schedule.load_state_dict(state["lr_scheduler"])


def has_batch_norm(net: torch.nn.Module) -> bool:
    """Whether ``net`` normalises over its batch (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``), which cannot
    train on a batch of one example."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())


def _shape(v: Any) -> str:
    """A batch's shape for a message: a tensor's, else its type (a dict or tuple of inputs)."""
    return str(tuple(v.shape)) if isinstance(v, torch.Tensor) else type(v).__name__


#: added to a run's seed for PyTorch's global generators, so their stream is not the tuner's own generator's
#: (the same seed in both would draw a model's own dropout masks in step with selftune's)
_GLOBAL_SEED_OFFSET = 0x9E3779B97F4A7C15


def _check_declared(space: Any, objective: Objective, augment: Augment | None) -> None:
    """Every hyperparameter the objective and augmentations name is declared, or a one-line error names
    the field (as the config's keys) and the names the space has."""
    wd = objective.weight_decay
    named: list[tuple[str, Any]] = [
        *(((f'objective.weight_decay["{k}"]', v) for k, v in wd.items()) if isinstance(wd, Mapping)
          else (("objective.weight_decay", wd),)),
        ("objective.label_smoothing", objective.label_smoothing),
        *(("augment", n) for n in sorted(augment.hyperparameters() if augment else ()))]
    for field, name in named:
        if isinstance(name, str) and name not in space:
            raise ConfigError(field, f"{name!r} is not a hyperparameter of the space (it has {space.names}); "
                                     "fix the name or declare it in the space")


def _check_meanings(net: HyperNet, objective: Objective) -> None:
    """Values a regulariser cannot take are refused before training: a dropout rate outside [0, 1) (1 drops
    everything, above 1 or below 0 is not a probability), a negative weight decay (it rewards large weights:
    the training loss falls without bound) and a label smoothing outside [0, 1). A range that reaches them
    would otherwise be trained on, silently."""
    space = net.space
    rules: dict[str, tuple[str, float, float]] = {}
    for module in net.model.modules():
        name = getattr(module, "name", None)
        if isinstance(module, Dropout | EmbeddingDropout) and name in space:
            rules[name] = ("drives a dropout, whose rate lies in [0, 1)", 0.0, 1.0)
    for spec in objective.decays():
        if isinstance(spec, str):
            rules[spec] = ("is a weight decay, which must be >= 0", 0.0, math.inf)
        elif not math.isfinite(spec):  # (it trained to a divergence that blamed the rate)
            raise ConfigError("objective.weight_decay", f"{spec:g} is not a finite number; use a value >= 0")
        elif spec < 0:
            raise ConfigError("objective.weight_decay", f"{spec:g} is negative: a negative decay rewards large "
                                                        "weights; use a value >= 0")
    smoothing = objective.label_smoothing
    if isinstance(smoothing, str):
        rules[smoothing] = ("is a label smoothing, which lies in [0, 1)", 0.0, 1.0)
    elif smoothing is not None and not 0.0 <= smoothing < 1.0:
        raise ConfigError("objective.label_smoothing", f"{smoothing:g} is outside [0, 1); use a rate in it")
    for name, (what, low, high) in rules.items():
        h = space[name]
        if h.low < low or h.high > high or (high == 1.0 and h.high >= 1.0):
            top = "< 1" if high == 1.0 else ""
            raise ConfigError(f"space.{name}", f"{what}, but its range is [{h.low:g}, {h.high:g}]; declare low >= "
                                               f"{low:g}{' and high ' + top if top else ''}")


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


def _position(state: dict[str, Any]) -> tuple[int, int]:
    """(weight steps, epochs) of a :meth:`SelfTuner.state_dict`: where in the run it was taken."""
    return int(state["log"]["counters"]["steps"]), int(state["order"]["epoch"])


def _bound_momentum(net: HyperNet, settings: TunerSettings) -> str | None:
    """The hyperparameter ``settings.momentum`` names (``None``: a number), checked against the space
    and the optimizer.

    Raises:
        ConfigError: an undeclared name, a range outside [0, 1), an optimizer without SGD's heavy ball,
            or Nesterov momentum (whose hypergradient is not the heavy ball's).
    """
    name = settings.momentum if isinstance(settings.momentum, str) else None
    if name is None:
        return None
    if name not in net.space:
        raise ConfigError("tuner.momentum", f"{name!r} is not declared; add a [space.{name}] table (low = 0.0, "
                                            "high = 0.99) or use a number")
    param = net.space[name]
    if param.is_int or param.low < 0 or param.high >= 1:
        raise ConfigError("tuner.momentum", f"hyperparameter {name!r} must be a float in [0, 1) to be a momentum "
                                            f"(got low={param.low}, high={param.high}); e.g. high = 0.99")
    if settings.optimizer.lower() not in ("sgd", "adam", "adamw"):
        raise ConfigError("tuner.momentum", f"a tuned momentum drives SGD's heavy ball or Adam's (AdamW's) beta1; "
                                            f"optimizer {settings.optimizer!r} has its own update (set its "
                                            "arguments in tuner.optimizer_args) or use sgd, adam or adamw")
    if "momentum" in settings.optimizer_args:
        raise ConfigError("tuner.optimizer_args.momentum", "tuner.momentum names a hyperparameter that sets it; "
                                                           "remove one of them")
    if settings.optimizer_args.get("maximize"):
        raise ConfigError("tuner.optimizer_args.maximize", "a tuned momentum's hypergradient assumes the optimizer "
                                                           "descends; remove maximize or use a number")
    if settings.optimizer_args.get("nesterov"):
        raise ConfigError("tuner.optimizer_args.nesterov", "a tuned momentum follows the plain heavy ball's "
                                                           "hypergradient; Nesterov's step depends on it "
                                                           "differently: remove nesterov or use a number")
    return name


def _usable_device(device: torch.device | str) -> torch.device:
    """``device`` as a torch.device, refused in one line where this machine cannot run it (PyTorch
    would fail later, at the first ``.to()``, with a message about how it was compiled).

    Raises:
        ConfigError: a malformed name, or a CUDA/MPS device this machine does not have.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError("device", f"{device!r} is not a device ({err}); use 'cpu' or 'cuda'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", f"{str(dev)!r}: CUDA is not available here (no GPU, or a CPU build of "
                                        "PyTorch); use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError("device", f"{str(dev)!r}: this machine has {torch.cuda.device_count()} CUDA "
                                        "device(s); pick one of them")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device", "'mps' is not available here; use device='cpu'")
    elif dev.type == "meta":
        raise ConfigError("device", "'meta' tensors hold shapes, not values: nothing can train on them; use "
                                    "device='cpu' or 'cuda'")
    elif dev.type != "cpu":  # xla, xpu, hpu, a backend of a plug-in: the tuner needs tensors and a generator there
        try:
            torch.empty(1, device=dev)
            torch.Generator(device=dev)
        except (RuntimeError, TypeError, NotImplementedError, AssertionError, ImportError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError("device", f"{str(dev)!r} cannot run the tuner here ({first[:160]}); use device='cpu' "
                                        "or 'cuda'") from None
    return dev


def _bound_lr(net: HyperNet, settings: TunerSettings, algorithm: type[Algorithm]) -> str | None:
    """The hyperparameter ``settings.lr`` names (``None``: a number), checked against the space.

    Raises:
        ConfigError: an undeclared name, a range that is not a positive real, or an algorithm that
            tunes only the learning rate without such a binding.
    """
    name = settings.lr if isinstance(settings.lr, str) else None
    if name is None:
        if algorithm.needs_lr:
            raise ConfigError("tuner.lr", f"method {algorithm.name!r} tunes the learning rate: name a hyperparameter "
                                          "that holds it, e.g. [space.lr] low = 1e-4, high = 1.0, init = 0.01, "
                                          "log = true and [tuner] lr = \"lr\"")
        return None
    if name not in net.space:
        raise ConfigError("tuner.lr", f"{name!r} is not declared; add a [space.{name}] table or use a number")
    param = net.space[name]
    if param.is_int or not param.low > 0:
        raise ConfigError("tuner.lr", f"hyperparameter {name!r} must be a float with low > 0 to be a learning rate "
                                      f"(got {type(param).__name__} low={param.low}); declare it log = true")
    return name


_STATE_FORMAT = 2
