"""Checks on training and validation data that run before anything trains.

Every problem the tuner would otherwise meet as a traceback (an ``AssertionError`` from
``TensorDataset``, an ``IndexError`` from cross-entropy after an hour, a NaN loss at step one) is
found here and raised as a :class:`~selftune.errors.DataError` (or a
:class:`~selftune.errors.ConfigError` for a setting) whose one-line message names the problem and
the fix. The checks are cheap: a pass over each floating-point tensor in chunks, a min/max over the
targets, and the first example of a Dataset that is not a ``TensorDataset``.

This is core code: it imports only torch and selftune's core (errors, batches, objective).
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Iterator, Mapping, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, default_collate

from .batches import data_axis, loader_dataset, subset_origin
from .errors import ConfigError, DataError, SelftuneWarning
from .objective import IGNORE_INDEX, classes_in_dim_1

__all__ = ["as_dataset", "check_all_targets", "check_batch_sizes", "check_targets"]

#: Elements checked for NaN/inf at a time, so a large tensor needs no second full-size copy in memory.
CHUNK_ELEMENTS = 1 << 22
_ACCEPTED = "an (inputs, targets) tuple of tensors, a map-style torch.utils.data.Dataset or a DataLoader over one"
_PART_NAMES = ("inputs", "targets")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _part(i: int) -> str:
    return _PART_NAMES[i] if i < len(_PART_NAMES) else f"tensor {i}"


def _labels(num_outputs: int) -> str:
    return f"0..{num_outputs - 1}" if num_outputs > 1 else "0"


def as_dataset(data: Any, what: str) -> Dataset:
    """Validate training or validation data and return it as an indexable Dataset.

    Args:
        data: an ``(inputs, targets)`` tuple of tensors (becomes a ``TensorDataset``), a map-style
            Dataset with ``__len__`` whose items are ``(input, target)`` pairs or dicts, or a
            ``DataLoader`` over one (its items may be anything its ``collate_fn`` takes).
        what: how messages name the data (``"train"``, ``"val"``).

    Returns:
        ``data`` itself if it is a Dataset (a loader's dataset for a loader), else a ``TensorDataset``
        of the pair; tensors that carry autograd history are detached (views, not copies).

    Raises:
        DataError: on another type, a pair of other than two tensors or of different lengths, an
            empty dataset, an ``IterableDataset`` or one without ``__len__``, and NaN/inf values:
            anywhere in the floating-point tensors of a pair or ``TensorDataset`` (checked in chunks
            of :data:`CHUNK_ELEMENTS`), in the first example of any other Dataset.
    """
    custom_collate, origin = False, None
    if isinstance(data, DataLoader):
        custom_collate = data.collate_fn is not default_collate
        origin = subset_origin(data)  # rows of the user's dataset, which messages name
        data = loader_dataset(data)
        if not isinstance(data, Dataset | tuple) and hasattr(data, "__getitem__") and isinstance(data, Sized):
            data = _Indexed(data)  # DataLoader(list_of_examples): PyTorch takes any indexable as map-style
    if isinstance(data, tuple):
        # detached (a view, no copy): features a user's encoder computed outside torch.no_grad() carry its
        # graph, and every batch's backward would run into it ("backward through the graph a second time")
        tensors = _detached(_pair(data, what))
        dataset: Dataset = TensorDataset(*tensors)
    elif isinstance(data, TensorDataset):
        if len(data.tensors) != 2:
            raise DataError(f"{what}: a TensorDataset must hold 2 tensors (inputs, targets), got "
                            f"{len(data.tensors)}; build it as TensorDataset(inputs, targets)")
        tensors = _same_length(data.tensors, what)
        dataset = data
        if any(t.requires_grad for t in tensors):  # as for a pair
            tensors = _detached(tensors)
            dataset = TensorDataset(*tensors)
    elif isinstance(data, IterableDataset):
        raise DataError(f"{what}: an IterableDataset cannot be indexed, but the tuner draws examples by index; "
                        f"pass {_ACCEPTED}")
    elif isinstance(data, Dataset):
        if not isinstance(data, Sized):
            raise DataError(f"{what}: {type(data).__name__} has no __len__, but the tuner needs the number of "
                            "examples; define __len__ on it or pass an (inputs, targets) tuple of tensors")
        if len(data) == 0:
            raise DataError(f"{what}: the dataset is empty (0 examples); give at least one example")
        _check_first_item(data, what, any_item=custom_collate)
        return data
    else:
        hint = "; wrap it with TensorDataset(inputs, targets) or pass a tuple" if isinstance(data, list) else ""
        hint = hint or ("; pass a tuple (inputs, targets)" if isinstance(data, torch.Tensor) else "")
        raise DataError(f"{what}: expected {_ACCEPTED}, got {type(data).__name__}{hint}")
    if len(tensors[0]) == 0:
        raise DataError(f"{what}: the dataset is empty (0 examples); give at least one example")
    for i, t in enumerate(tensors):
        _check_finite(t, f"{what}: {_part(i)}", origin)
    return dataset


class _Indexed(Dataset):
    """A loader's dataset that is a plain indexable (a list of examples), as a ``Dataset``."""

    def __init__(self, items: Any) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


def _detached(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The tensors without their autograd history (views, no copy); the same objects when none has any."""
    return tuple(t.detach() for t in tensors) if any(t.requires_grad for t in tensors) else tensors


def _pair(data: tuple, what: str) -> tuple[torch.Tensor, ...]:
    if len(data) != 2 or not all(isinstance(t, torch.Tensor) for t in data):
        kinds = ", ".join(type(t).__name__ for t in data)
        raise DataError(f"{what}: expected {_ACCEPTED}, got a tuple of {len(data)} ({kinds}); pass exactly two "
                        "tensors (torch.as_tensor converts arrays)")
    for i, t in enumerate(data):
        if t.dim() == 0:
            raise DataError(f"{what}: {_part(i)} are a 0-dimensional tensor; give one row per example")
    return _same_length(data, what)


def _same_length(tensors: tuple[torch.Tensor, ...], what: str) -> tuple[torch.Tensor, ...]:
    inputs, targets = tensors[0], tensors[1]
    if len(inputs) != len(targets):
        raise DataError(f"{what}: inputs have {len(inputs)} rows but targets {len(targets)}; "
                        "give one target per input")
    return tuple(tensors)


def _check_finite(t: torch.Tensor, label: str, origin: torch.Tensor | None = None) -> None:
    """Count NaN/inf in a floating-point tensor, ``CHUNK_ELEMENTS`` at a time, and name the first bad row
    (``origin``: the user's row of each of ``t``'s, where a ``SubsetRandomSampler`` took them)."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    rows = max(1, CHUNK_ELEMENTS // max(1, t[0].numel()))
    total = torch.float64 if t.dtype == torch.float64 else torch.float32
    count, first = 0, -1
    for start in range(0, len(t), rows):
        chunk = t[start:start + rows]
        # Fast path: a finite sum proves every element finite (NaN and inf propagate through additions);
        # a non-finite one (NaN/inf, or rarely an overflow) is settled element by element.
        if bool(torch.isfinite(chunk.sum(dtype=total))):
            continue
        bad = torch.isfinite(chunk).logical_not_()
        n = int(torch.count_nonzero(bad))
        if n and first < 0:
            first = start + int(bad.reshape(bad.shape[0], -1).any(dim=1).nonzero()[0, 0])
        count += n
    if count:
        first = first if origin is None else int(origin[first])
        raise DataError(f"{label} contain {count} NaN/inf value{'s' if count > 1 else ''} (first at row {first}); "
                        "clean or impute them before training")


def _tensors(value: Any) -> Iterator[Any]:
    if isinstance(value, Mapping):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _tensors(v)
    else:
        yield value


def _check_first_item(data: Dataset, what: str, *, any_item: bool = False) -> None:
    """Check example 0 of a Dataset (cheap; RNG states are restored in case reading it draws randomness):
    an ``(input, target)`` pair or a dict (``any_item``: anything, a custom collate reads it), free of
    NaN/inf."""
    py_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            item = data[0]
    except Exception as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise DataError(f"{what}: reading example 0 failed ({reason}); the tuner reads examples by index "
                        "0..len-1, so fix the dataset's __getitem__") from err
    finally:
        random.setstate(py_state)
    if isinstance(item, Mapping):
        parts: list[Any] = list(item.values())
        names = [f"field {k!r}" for k in item]
    elif isinstance(item, tuple | list) and len(item) == 2:
        parts, names = list(item), list(_PART_NAMES)
    elif any_item:
        parts, names = [item], ["values"]
    else:
        got = f"a {type(item).__name__} of {len(item)}" if isinstance(item, tuple | list) else \
            f"a {type(item).__name__}"
        raise DataError(f"{what}: example 0 is {got}; each example must be an (input, target) pair or a dict "
                        "(name its target with target_key), or pass a DataLoader whose collate_fn reads it")
    for i, part in enumerate(parts):
        bad = 0
        for v in _tensors(part):
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                bad += int(torch.count_nonzero(torch.isfinite(v).logical_not_()))
            elif isinstance(v, float) and not math.isfinite(v):
                bad += 1
        if bad:
            raise DataError(f"{what}: example 0's {names[i]} contain {bad} NaN/inf value{'s' if bad > 1 else ''}; "
                            "clean or impute them before training")


def check_batch_sizes(n_train: int, n_val: int, batch_size: int, val_batch_size: int | None) -> None:
    """Refuse batch sizes larger than the data they are drawn from.

    Args:
        n_train: training examples.
        n_val: validation examples.
        batch_size: ``tuner.batch_size``.
        val_batch_size: ``tuner.val_batch_size``; ``None`` or 0: unset, then ``min(batch_size, n_val)``
            (the tuner's rule), which always fits.

    Raises:
        ConfigError: on a batch size below 1.
        DataError: when ``batch_size`` exceeds ``n_train`` or a given validation batch size ``n_val``.
    """
    if batch_size < 1:
        raise ConfigError("tuner.batch_size", f"must be at least 1 (got {batch_size})")
    if val_batch_size is not None and val_batch_size < 0:
        raise ConfigError("tuner.val_batch_size", f"must be at least 1 (got {val_batch_size})")
    if batch_size > n_train:
        raise DataError(f"tuner.batch_size ({batch_size}) is larger than the training set ({n_train} examples); "
                        f"lower it to at most {n_train}")
    if val_batch_size and val_batch_size > n_val:
        raise DataError(f"tuner.val_batch_size ({val_batch_size}) is larger than the validation set ({n_val} "
                        f"examples); set it to at most {n_val}, or leave it unset (the batch size, at most the "
                        "validation set)")


def check_targets(outputs: torch.Tensor, targets: torch.Tensor, what: str) -> None:
    """Check that a batch's targets fit the model's outputs for cross-entropy.

    Integer targets are class labels: they must be ``torch.int64``, have the outputs' shape without
    the class dimension (``(B,)`` for ``(B, C)`` outputs, ``(B, T)`` for a sequence model's
    ``(B, T, C)``, or ``(B, d1, ...)`` for outputs ``(B, C, d1, ...)`` with the classes in dimension 1, as
    ``F.cross_entropy`` takes them) and lie in ``[0, C)``. Floating-point targets
    (class probabilities) must have the outputs' shape; their values are not checked.

    Args:
        outputs: the model's output on a small batch.
        targets: that batch's targets.
        what: how messages name the data (``"train"``, ``"val"``).

    Raises:
        DataError: naming the bad label and ``C``, the mismatched shapes, or the wrong dtype.
    """
    out_shape, tgt_shape = _shape(outputs), _shape(targets)
    if outputs.dim() < 2:
        hint = f"; {_REGRESSION_FIX}" if targets.is_floating_point() else ""
        raise DataError(f"{what}: the model's outputs have shape {out_shape}, but cross-entropy needs one score per "
                        f"class, (batch, classes) or (batch, steps, classes); check the model's last layer{hint}")
    if targets.dim() == 0:
        raise DataError(f"{what}: targets are a 0-dimensional tensor; give one label per example")
    if len(targets) != len(outputs):
        raise DataError(f"{what}: the model returned {len(outputs)} output rows for {len(targets)} examples "
                        f"(outputs {out_shape}, targets {tgt_shape}); the model must keep the batch dimension "
                        "first, or, for a sequence-first model, say so with hypernetize(..., batch_dim=1) "
                        "(Task.batch_dim)")
    if targets.is_floating_point():
        _check_probabilities(outputs, targets, what)
        return
    if targets.dtype != torch.int64:
        raise DataError(f"{what}: targets are {targets.dtype}, but class labels must be torch.int64; "
                        "convert them with .long()")
    expected = out_shape[:-1]
    dim_1 = classes_in_dim_1(outputs, targets)  # PyTorch's (B, C, d1, ...) layout
    if tgt_shape != expected and not dim_1:
        also = f" (or {(out_shape[0], *out_shape[2:])}, with the classes in dimension 1)" if outputs.dim() > 2 else ""
        raise DataError(f"{what}: targets have shape {tgt_shape} but the model's outputs {out_shape} need targets of "
                        f"shape {expected}{also} (one class label per output row); reshape the targets or check the "
                        "model")
    if outputs.dim() > 2 and tgt_shape == (out_shape[0], *out_shape[2:]) and not dim_1:
        warnings.warn(SelftuneWarning(
            f"{what}: outputs {out_shape} against targets {tgt_shape} are read with the classes in the last dimension "
            f"({out_shape[-1]} of them, as a sequence model's (batch, steps, classes)); if the model puts them in "
            "dimension 1, as F.cross_entropy takes them ((batch, classes, length)), pass "
            "loss=torch.nn.functional.cross_entropy"), stacklevel=3)
    scored = targets.detach()[targets.detach() != IGNORE_INDEX]  # (padding: not scored)
    if scored.numel():
        classes = outputs.shape[1 if dim_1 else -1]
        low, high = (int(v) for v in torch.aminmax(scored))
        if high >= classes:
            _label_error(what, high, "", classes, 1)
        if low < 0:
            _label_error(what, low, "", classes, 1)


#: How to say "this is regression": the default loss is cross-entropy, so float targets need a loss.
_REGRESSION_FIX = ("floating-point targets that are values to predict need a regression loss of outputs shaped "
                   "as the targets: pass loss=lambda out, y: torch.nn.functional.mse_loss(out.squeeze(-1), y) for "
                   "(N,) targets and a one-output head, or mse_loss for targets shaped as the outputs "
                   "(SelfTuner(loss=...) or Task(loss=...))")


def _check_probabilities(outputs: torch.Tensor, targets: torch.Tensor, what: str) -> None:
    """Floating-point targets under cross-entropy must be class probabilities. Regression targets pass
    the shape check whenever the model has one output per target (``(B, 1)`` against ``(B, 1)``), and
    cross-entropy over one class is 0 whatever the weights: the run would train on nothing, silently."""
    out_shape, tgt_shape = _shape(outputs), _shape(targets)
    if tgt_shape != out_shape:
        raise DataError(f"{what}: floating-point targets (class probabilities) have shape {tgt_shape} but the "
                        f"model's outputs {out_shape}; give integer labels or one probability per output, or, "
                        f"for regression: {_REGRESSION_FIX}")
    if outputs.shape[-1] == 1:
        raise DataError(f"{what}: cross-entropy over a single output is 0 whatever the model predicts (outputs and "
                        f"floating-point targets both {out_shape}); {_REGRESSION_FIX}")
    _check_distributions(targets, what)


def _check_distributions(targets: torch.Tensor, what: str, name: Callable[[int], str] = lambda r: f"row {r}") -> None:
    """Floating-point targets under cross-entropy: non-negative rows that sum to 1. The message names the
    first example (dimension 0; ``name`` says where it is in the user's data) with a row that is not one and, for
    0/1 targets with a row of several 1s, says that multi-label data needs a binary loss per output.
    Checked in chunks of :data:`CHUNK_ELEMENTS` (a distillation set's soft targets are large), each
    reduced in float64."""
    if not targets.numel():
        return
    n = len(targets)
    step = max(1, CHUNK_ELEMENTS // max(1, targets[0].numel()))
    count, first, binary, several = 0, None, True, False
    for start in range(0, n, step):
        t = targets[start:start + step].detach().double()
        sums = t.sum(-1)
        bad = (t < 0).any(-1) | ((sums - 1).abs() > 1e-3)
        count += int(bad.sum())
        if first is None and bool(bad.any()):
            k = int(bad.reshape(len(t), -1).any(1).nonzero()[0, 0])
            first = (start + k, t[k].min().item(), sums[k][bad[k]].reshape(-1)[0].item() if bad[k].dim()
                     else sums[k].item())
        binary = binary and bool(((t == 0) | (t == 1)).all())
        several = several or bool((sums > 1).any())
    if first is None:
        return
    row, low, total = first
    where = f"{name(row)}: min {low:.4g}, sums to {total:.4g}"
    fix = ("several labels per example are multi-label targets: pass loss=torch.nn.BCEWithLogitsLoss() "
           "(SelfTuner(loss=...) or Task(loss=...))" if binary and several else _REGRESSION_FIX)
    raise DataError(f"{what}: floating-point targets are read as class probabilities by cross-entropy, but "
                    f"these are not ({where}; {count} such rows); {fix}")


def _label_error(what: str, label: int, where: str, classes: int, count: int) -> None:
    extra = f"; {count} labels are out of range" if count > 1 else ""
    if label < 0:
        raise DataError(f"{what}: label {label}{where} is negative (labels must be {_labels(classes)}, or "
                        f"{IGNORE_INDEX} for a label not scored, as PyTorch's cross-entropy skips it{extra}); mark "
                        f"ignored labels (padding) with {IGNORE_INDEX}, map missing ones to a class or drop those "
                        "examples")
    raise DataError(f"{what}: label {label}{where} is outside the model's {classes} outputs (labels must be "
                    f"{_labels(classes)}{extra}); check num_classes or the labels")


def check_all_targets(data: Dataset, num_outputs: int, what: str, origin: torch.Tensor | None = None) -> None:
    """Check that every integer target of a ``TensorDataset`` lies in ``[0, num_outputs)``, and that every
    row of floating-point targets is a distribution (class probabilities).

    A min/max over the whole target tensor (no copy), so a bad label deep in the data is found before
    training instead of when its batch comes up. Other Datasets are skipped: :func:`check_batch` checks
    each of their batches as it is drawn.

    Args:
        data: the dataset (as returned by :func:`as_dataset`).
        num_outputs: the model's number of classes, ``outputs.shape[-1]``.
        what: how messages name the data (``"train"``, ``"val"``).
        origin: the rows of the user's dataset that ``data`` holds (a ``SubsetRandomSampler``'s), which
            messages name.

    Raises:
        DataError: naming the first bad label, its row and ``num_outputs``.
    """
    if not isinstance(data, TensorDataset) or len(data.tensors) < 2:
        return
    targets = data.tensors[1]

    def row_of(r: int) -> str:
        return f"row {r if origin is None else int(origin[r])}"

    if targets.is_floating_point() and targets.dim() >= 2:  # class probabilities, every row
        _check_distributions(targets, what, row_of)
        return
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool or not targets.numel():
        return
    low, high = (int(v) for v in torch.aminmax(targets))
    if low >= 0 and high < num_outputs:
        return
    bad = ((targets < 0) & (targets != IGNORE_INDEX)) | (targets >= num_outputs)  # only on failure or padding
    if not bool(bad.any()):
        if not bool((targets != IGNORE_INDEX).any()):
            raise DataError(f"{what}: every label is {IGNORE_INDEX} (not scored, as padding is): there is nothing to "
                            "train or score on")
        return
    row = int(bad.reshape(len(targets), -1).any(dim=1).nonzero()[0, 0])
    value = int(targets[row].reshape(-1)[bad[row].reshape(-1)][0])
    _label_error(what, value, f" at {row_of(row)}", num_outputs, int(bad.sum()))


def check_batch(x: Any, y: Any, index: torch.Tensor, what: str, *, classes: int | None, batch_dim: int = 0) -> None:
    """Check one batch of a dataset that was not checked whole before training (a ``Dataset`` of your own:
    reading every example up front would cost an epoch of loading): floating-point inputs finite, and
    under cross-entropy (``classes``: the model's outputs) integer labels in range and floating-point
    targets distributions. Each problem is the ``DataError`` a tensor dataset gets before training,
    naming the example by its index in the dataset, instead of a raw error or a run that "diverges".
    A finite sum settles a tensor at once (NaN and inf propagate through it), as before training.

    Args:
        x, y: the batch's inputs (any nesting of tensors) and targets.
        index: the batch's examples, as indices into the user's dataset.
        what: how messages name the data.
        classes: the model's number of outputs when the loss is the default cross-entropy, else ``None``.
        batch_dim: the model's batch dimension (sequence-first models: 1).
    """
    n = len(index)

    def example(t: torch.Tensor, bad: torch.Tensor) -> str:
        """`` at example i of the dataset`` for the first example with an entry of ``bad`` (``t``'s shape)."""
        try:
            axis = data_axis(t, n, batch_dim)
        except ValueError:
            return ""
        rows = bad.movedim(axis, 0).reshape(n, -1).any(1).nonzero()
        return f" at example {int(index[int(rows[0, 0])])} of the dataset" if len(rows) else ""

    for t in _tensors(x):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()):
            continue
        if bool(torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))):
            continue
        bad = ~torch.isfinite(t)
        if bool(bad.any()):  # (else a finite tensor whose sum overflowed)
            raise DataError(f"{what}: inputs contain NaN/inf values{example(t, bad)}; clean or impute them "
                            "before training")
    if classes is None or not isinstance(y, torch.Tensor) or not y.numel():
        return
    if y.is_floating_point():
        if y.dim() >= 2:
            try:
                axis: int | None = data_axis(y, n, batch_dim)
            except ValueError:
                axis = None
            _check_distributions(y if axis is None else y.movedim(axis, 0), what,
                                 (lambda r: f"row {r} of the batch") if axis is None else
                                 (lambda r: f"example {int(index[r])} of the dataset"))
        return
    if y.is_complex() or y.dtype == torch.bool:
        return
    low, high = (int(v) for v in torch.aminmax(y.detach()))
    if low >= 0 and high < classes:
        return
    bad = ((y < 0) & (y != IGNORE_INDEX)) | (y >= classes)
    if not bool(bad.any()):
        return  # padding (IGNORE_INDEX) only
    value = int(y[bad].reshape(-1)[0])
    _label_error(what, value, example(y, bad), classes, int(bad.sum()))
