"""Turn raw arrays into normalised train/validation/test tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset

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


def _corpus_splits(name: str, seq_len: int, train_subset: int, test_subset: int) -> Splits:
    train, valid, test, vocabulary = CORPORA[name]()
    sets = {"train": _sequences(train, seq_len), "val": _sequences(valid, seq_len), "test": _sequences(test, seq_len)}
    for key, keep in (("train", train_subset), ("test", test_subset)):
        if keep:  # a prefix: consecutive text, the same on every machine
            sets[key] = TensorDataset(*(t[:keep] for t in sets[key].tensors))
    return Splits(name=name, train=sets["train"], val=sets["val"], test=sets["test"], input_shape=(seq_len,),
                  num_classes=len(vocabulary), kind="language-model")


def load_dataset(name: str, *, val_fraction: float = 0.2, test_fraction: float = 0.2, train_subset: int = 0,
                 test_subset: int = 0, split_seed: int = 0, seq_len: int = 35) -> Splits:
    """Load ``name`` and split it reproducibly.

    Text corpora (``ptb``) keep their official train/valid/test splits, cut into ``seq_len``-token
    sequences; ``val_fraction``, ``test_fraction`` and ``split_seed`` do not apply to them, and the
    subsets count sequences.

    Args:
        name: one of :data:`DATASETS` (``digits``, ``mnist``, ``fashion-mnist``, ``adult``) or
            :data:`CORPORA` (``ptb``).
        val_fraction: share of the training set held out for validation (hyper steps).
        test_fraction: share held out as test set, only for datasets without an official one.
        train_subset: keep only this many training examples (0: all), for quick runs.
        test_subset: keep only this many test examples (0: all).
        split_seed: seed of the shuffle that draws the splits (independent of the run seed).
        seq_len: tokens per example, for text corpora.

    Returns:
        :class:`Splits` whose inputs are standardised with the training set's mean and std.

    Raises:
        LookupError: on an unknown dataset name.
        DatasetUnavailable: when the package shipping the data is not installed.
    """
    if name not in DATASETS and name not in CORPORA:
        raise LookupError(f"unknown dataset {name!r}; choose one of {sorted([*DATASETS, *CORPORA])}")
    if not 0 < val_fraction < 1 or not 0 < test_fraction < 1:
        raise ValueError("val_fraction and test_fraction must lie in (0, 1)")
    if name in CORPORA:
        return _corpus_splits(name, seq_len, train_subset, test_subset)
    train_x, train_y, test_x, test_y = DATASETS[name]()
    rng = np.random.default_rng(split_seed)
    order = rng.permutation(len(train_x))
    if test_x is None or test_y is None:
        n_test = round(test_fraction * len(order))
        test_idx, order = order[:n_test], order[n_test:]
        test_x, test_y = train_x[test_idx], train_y[test_idx]
    n_val = round(val_fraction * len(order))
    val_idx, train_idx = order[:n_val], order[n_val:]
    if train_subset:
        train_idx = train_idx[:train_subset]
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
