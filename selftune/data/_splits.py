"""Turn raw arrays into normalised train/validation/test tensors."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..errors import ConfigError
from ._loaders import CORPORA, DATASETS


@dataclass
class Splits:
    """Train, validation and test sets of one dataset, with what a model needs to know of it.

    ``kind`` is ``"classification"`` or ``"language-model"``; for the latter each example is a
    sequence of ``input_shape[0]`` token ids, its target the same sequence shifted by one, and
    ``num_classes`` the vocabulary size.
    """

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    input_shape: tuple[int, ...]
    num_classes: int
    kind: str = "classification"

    def sizes(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in ("train", "val", "test")}


def _to_float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


def _sequences(ids: np.ndarray, seq_len: int) -> TensorDataset:
    """Cut a token stream into consecutive, non-overlapping ``seq_len`` windows and their next tokens."""
    n = (len(ids) - 1) // seq_len
    x = torch.from_numpy(ids[: n * seq_len].reshape(n, seq_len).copy())
    y = torch.from_numpy(ids[1: n * seq_len + 1].reshape(n, seq_len).copy())
    return TensorDataset(x, y)


def _check_fraction(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
        raise ConfigError(field, f"must be a number strictly between 0 and 1 (got {value!r})")


def _check_subset(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ConfigError(field, f"must be 0 (all examples) or a positive whole number of examples (got {value!r})")


def _check_subset_size(field: str, keep: int, available: int, what: str) -> None:
    """A subset is a prefix of its split: asking for more than the split holds would silently give less."""
    if keep > available:
        raise ConfigError(field, f"{keep} is more than the {available} {what}; use at most {available} (0 keeps all)")


def _smallest_fraction(total: int) -> float | None:
    """The shortest decimal ``f`` (one significant digit) with ``round(f * total) >= 1``, to suggest in a message."""
    scale = 10.0 ** -math.floor(math.log10(1 / total))  # a power of ten >= 1, so f below is the parsed decimal
    f = math.ceil(scale / total - 1e-9) / scale
    return f if f < 1 and round(f * total) >= 1 else None


def _largest_fraction(total: int, keep: int) -> float | None:
    """The shortest decimal ``f`` with ``round(f * total) == total - keep`` (the most it can take while leaving
    ``keep``), to suggest in a message."""
    if total - keep < 1:
        return None
    for digits in range(1, 10):
        f = math.floor((total - keep) / total * 10**digits + 1e-9) / 10**digits
        if 0 < f and round(f * total) == total - keep:
            return f
    return None


def _at_least(field: str, value: float, total: int, of: str, leaves: str) -> ConfigError:
    """``value * total`` rounds to 0: suggest the smallest short fraction that keeps 1 example."""
    smallest = _smallest_fraction(total)
    fix = f"use at least {smallest:g} (1 example)" if smallest else "use a larger dataset"
    return ConfigError(field, f"{float(value):g} of {total} {of} leaves 0 for {leaves}; {fix}")


def _at_most(field: str, value: float, total: int, keep: int, of: str, leaves: str) -> ConfigError:
    """``value * total`` leaves fewer than ``keep`` of ``total``: suggest the largest fraction that leaves ``keep``."""
    largest = _largest_fraction(total, keep)
    left = total - round(value * total)
    fix = f"use at most {largest:g}" if largest else "use a larger dataset"
    return ConfigError(field, f"{float(value):g} of {total} {of} leaves {left} for {leaves} "
                              f"(at least {keep} needed); {fix}")


def _check_split_counts(n_total: int, val_fraction: float, test_fraction: float, held_out_test: bool) -> None:
    """Refuse fractions that leave the test, validation or training split empty (same rounding as the split)."""
    if held_out_test:
        n_test = round(test_fraction * n_total)
        if n_test < 1:
            raise _at_least("data.test_fraction", test_fraction, n_total, "examples", "testing")
        if n_total - n_test < 2:
            raise _at_most("data.test_fraction", test_fraction, n_total, 2, "examples", "training and validation")
        n_total -= n_test
    of = "examples left after the test split" if held_out_test else "training examples"
    n_val = round(val_fraction * n_total)
    if n_val < 1:
        raise _at_least("data.val_fraction", val_fraction, n_total, of, "validation")
    if n_total - n_val < 1:
        raise _at_most("data.val_fraction", val_fraction, n_total, 1, of, "training")


def _corpus_splits(name: str, seq_len: int, train_subset: int, val_subset: int, test_subset: int) -> Splits:
    train, valid, test, vocabulary = CORPORA[name]()
    if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral) or seq_len < 1:
        raise ConfigError("data.seq_len", f"must be a positive whole number of tokens (got {seq_len!r})")
    for split, ids in (("training", train), ("validation", valid), ("test", test)):
        if (len(ids) - 1) // seq_len < 1:
            raise ConfigError("data.seq_len", f"{seq_len} tokens per sequence leaves no {split} sequence (that split "
                                              f"has {len(ids)} tokens); use at most {len(ids) - 1}")
    sets = {"train": _sequences(train, seq_len), "val": _sequences(valid, seq_len), "test": _sequences(test, seq_len)}
    for key, keep in (("train", train_subset), ("val", val_subset), ("test", test_subset)):
        _check_subset_size(f"data.{key}_subset", keep, len(sets[key]), f"{key} sequences")
        if keep:  # a prefix: consecutive text, the same on every machine
            sets[key] = TensorDataset(*(t[:keep] for t in sets[key].tensors))
    return Splits(name=name, train=sets["train"], val=sets["val"], test=sets["test"], input_shape=(seq_len,),
                  num_classes=len(vocabulary), kind="language-model")


def load_dataset(name: str, *, val_fraction: float = 0.2, test_fraction: float = 0.2, train_subset: int = 0,
                 test_subset: int = 0, split_seed: int = 0, seq_len: int = 35, val_subset: int = 0) -> Splits:
    """Load ``name`` and split it reproducibly.

    Text corpora (``ptb``) keep their official train/valid/test splits, cut into ``seq_len``-token
    sequences; ``val_fraction``, ``test_fraction`` and ``split_seed`` do not apply to them, and the
    subsets count sequences.

    Args:
        name: one of :data:`DATASETS` (``digits``, ``breast-cancer``, ``mnist``,
            ``fashion-mnist``, ``adult``) or
            :data:`CORPORA` (``ptb``).
        val_fraction: share of the training set held out for validation (hyper steps).
        test_fraction: share held out as test set, only for datasets without an official one.
        train_subset: keep only this many training examples (0: all), for quick runs.
        test_subset: keep only this many test examples (0: all).
        val_subset: keep only this many validation examples (0: all). Mostly for corpora, whose official
            validation split is fixed: a full PTB validation pass costs three times a 600-sequence
            training epoch, and the run takes one every epoch.
        split_seed: seed of the shuffle that draws the splits (independent of the run seed).
        seq_len: tokens per example, for text corpora.

    Returns:
        :class:`Splits` whose inputs are standardised with the training set's mean and std.

    Raises:
        LookupError: on an unknown dataset name.
        DatasetUnavailable: when the package shipping the data is not installed.
        ConfigError: (a ``ValueError``) naming the ``data.*`` field, before any split is drawn, when a
            fraction lies outside (0, 1) or leaves the test, validation or training split empty, when
            a subset is negative or larger than its split (subsets are prefixes of the split, so they
            never grow it), or when ``seq_len`` leaves a corpus split without a sequence.
    """
    if name not in DATASETS and name not in CORPORA:
        raise LookupError(f"unknown dataset {name!r}; choose one of {sorted([*DATASETS, *CORPORA])}")
    _check_fraction("data.val_fraction", val_fraction)
    _check_fraction("data.test_fraction", test_fraction)
    _check_subset("data.train_subset", train_subset)
    _check_subset("data.test_subset", test_subset)
    _check_subset("data.val_subset", val_subset)
    if name in CORPORA:
        return _corpus_splits(name, seq_len, train_subset, val_subset, test_subset)
    train_x, train_y, test_x, test_y = DATASETS[name]()
    held_out_test = test_x is None or test_y is None
    _check_split_counts(len(train_x), val_fraction, test_fraction, held_out_test)
    rng = np.random.default_rng(split_seed)
    order = rng.permutation(len(train_x))
    if test_x is None or test_y is None:
        n_test = round(test_fraction * len(order))
        test_idx, order = order[:n_test], order[n_test:]
        test_x, test_y = train_x[test_idx], train_y[test_idx]
    n_val = round(val_fraction * len(order))
    val_idx, train_idx = order[:n_val], order[n_val:]
    _check_subset_size("data.train_subset", train_subset, len(train_idx), "training examples left after the splits")
    _check_subset_size("data.test_subset", test_subset, len(test_x), "test examples")
    _check_subset_size("data.val_subset", val_subset, len(val_idx), "validation examples")
    if train_subset:
        train_idx = train_idx[:train_subset]
    if val_subset:
        val_idx = val_idx[:val_subset]
    if test_subset:
        test_x, test_y = test_x[:test_subset], test_y[:test_subset]

    xs = {"train": _to_float(train_x[train_idx]), "val": _to_float(train_x[val_idx]), "test": _to_float(test_x)}
    ys = {"train": train_y[train_idx], "val": train_y[val_idx], "test": test_y}
    if xs["train"].ndim == 2:  # tabular: standardise each feature (one-hot columns included)
        mean, std = xs["train"].mean(axis=0), xs["train"].std(axis=0)
        std[std == 0] = 1.0
    else:  # images: one mean and std for all pixels, so spatial structure is kept
        mean, std = float(xs["train"].mean()), float(xs["train"].std()) or 1.0
    sets = {k: TensorDataset(torch.from_numpy((xs[k] - mean) / std), torch.from_numpy(ys[k])) for k in xs}
    return Splits(name=name, train=sets["train"], val=sets["val"], test=sets["test"],
                  input_shape=tuple(xs["train"].shape[1:]), num_classes=int(train_y.max()) + 1)
